"""Ship pruned Whisper models: Hugging Face directories, compressed sparse safetensors, CTranslate2.

Three forms, all built from one pruned model directory:

- ``save_pruned`` writes a directory that plain
  ``transformers.WhisperForConditionalGeneration.from_pretrained`` loads (``model.safetensors``,
  ``config.json``, ``generation_config.json``, processor and tokenizer files) plus
  ``pruning.json``, which records the plan, the measured sparsity, the source model and its
  fingerprint, the tool version and a timestamp.
- ``save_compressed`` / ``load_compressed`` write and read the ``asrprune-bitmask`` safetensors
  layout (see ``docs/sparse_format.md``): a packed bitmask of the non-zero positions plus the
  packed non-zero values per sparse tensor, so the file shrinks about in proportion to sparsity.
  compressed-tensors dropped its sparse formats (0.15, 2026; transformers followed in PR #46342),
  and no maintained standard replaced them, hence our own documented layout. Decompression is
  bit-exact for every dtype, -0.0 and NaN payloads included.
- ``export_ctranslate2`` converts a pruned directory with
  ``ctranslate2.converters.TransformersConverter``; faster-whisper loads the result.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .files import apply_umask, atomic_write_text, env_stamp
from .models import load_model, model_fingerprint, resolve_model_dir
from .shapes import STRUCTURE_KEY, STRUCTURED_WEIGHTS, record_structure

log = logging.getLogger(__name__)

__all__ = [
    "PRUNING_FILENAME",
    "COMPRESSED_FILENAME",
    "SPARSE_FORMAT",
    "SPARSE_FORMAT_VERSION",
    "CT2_QUANTIZATIONS",
    "SparseFormatError",
    "save_pruned",
    "read_pruning_info",
    "save_compressed",
    "load_compressed",
    "export_compressed",
    "load_compressed_model",
    "decompress_to_pretrained",
    "is_compressed_dir",
    "export_ctranslate2",
]

PRUNING_FILENAME = "pruning.json"
PRUNING_FORMAT = "asrprune-pruned-model"
PRUNING_FORMAT_VERSION = 1

COMPRESSED_FILENAME = "model.sparse.safetensors"
SPARSE_FORMAT = "asrprune-bitmask"
SPARSE_FORMAT_VERSION = 1
# Safetensors metadata key holding the JSON layout description (see docs/sparse_format.md).
_LAYOUT_KEY = "asrprune.layout"
_SEP = "::"  # separates a tensor name from its part (``name::bitmask``); never in torch names

CT2_QUANTIZATIONS = (
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
    "float32",
)

# Weight files of a save_pretrained directory: never copied between forms.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_WEIGHT_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Side files worth carrying from a source model directory (tokenizer, normalizer, processor).
_SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".tiktoken")
# Never carried from a source model directory: they describe that directory, not the new one
# (models.CONVERSION_FILE records how a CTranslate2 checkpoint was converted into the cache).
_NOT_SIDE_FILES = (PRUNING_FILENAME, "asrprune_conversion.json")
# What faster-whisper reads next to model.bin besides what the converter writes.
_CT2_SIDE_FILES = ("tokenizer.json", "preprocessor_config.json")


class SparseFormatError(ValueError):
    """A file is not a readable ``asrprune-bitmask`` safetensors file (names the file and why)."""


# ----------------------------------------------------------------------------------------------
# Hugging Face directory + pruning.json
# ----------------------------------------------------------------------------------------------


def save_pruned(
    model: torch.nn.Module,
    processor: Any | None,
    out_dir: str | os.PathLike,
    *,
    pruning: Mapping[str, Any],
    source: str,
    source_fingerprint: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a pruned Whisper as a ``save_pretrained`` directory plus ``pruning.json``.

    The directory loads with plain ``WhisperForConditionalGeneration.from_pretrained`` and with
    ``asrprune.models.load_model``. Tied parameters (``model.decoder.embed_tokens.weight`` and
    ``proj_out.weight``) are stored once and are tied again on load. Side files of the source
    model directory that ``save_pretrained`` does not write (``normalizer.json``,
    ``added_tokens.json``, ...) are copied so that ``tokenizer.normalize`` works offline.

    Args:
        model: the pruned ``WhisperForConditionalGeneration`` (masks already applied, i.e. no
            ``torch.nn.utils.prune`` re-parametrisation left).
        processor: its ``WhisperProcessor`` (or ``None`` to write weights and configs only).
        out_dir: directory to create.
        pruning: JSON-serialisable description of the pruning, normally
            ``PruneResult.to_dict()`` (plan, scopes, measured sparsity, non-zero counts).
        source: the spec the unpruned model was loaded from (built-in name, directory, hub id).
        source_fingerprint: ``models.model_fingerprint`` of the unpruned model, taken before
            pruning; stored as the source model's hash.
        overwrite: replace files in a non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        FileExistsError: ``out_dir`` is a non-empty directory and ``overwrite`` is False.
        ValueError: the model still carries ``torch.nn.utils.prune`` hooks, or ``pruning`` is not
            JSON-serialisable.
    """
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    _check_no_prune_hooks(model)
    try:
        pruning_json = json.loads(json.dumps(dict(pruning), default=_json_default))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"save_pruned: 'pruning' is not JSON-serialisable: {exc}") from exc

    out.mkdir(parents=True, exist_ok=True)
    # shapes the config can express go into it; the rest beside, with weights plain
    # transformers cannot mistake for its own (asrprune.shapes)
    if record_structure(model) is None:
        model.save_pretrained(out)
    else:
        _save_structured(model, out)
    if processor is not None:
        processor.save_pretrained(out)
    copied = _copy_side_files(_source_dir(source, processor), out)

    n_params, n_nonzero = _count_nonzero(model)
    info = {
        "format": PRUNING_FORMAT,
        "format_version": PRUNING_FORMAT_VERSION,
        "asrprune_version": env_stamp()["asrprune"] or "unknown",
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"spec": str(source), "fingerprint": source_fingerprint},
        "model": {
            "architecture": type(model).__name__,
            "fingerprint": model_fingerprint(model),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "tied_parameters": _tied_groups(model),
        },
        # Counted here again on what was written, independently of the pruning code.
        "saved_sparsity": {
            "n_parameters": n_params,
            "n_nonzero": n_nonzero,
            "sparsity": (1.0 - n_nonzero / n_params) if n_params else 0.0,
        },
        "pruning": pruning_json,
        "copied_side_files": copied,
        "environment": env_stamp(),
    }
    if source_fingerprint is None:
        log.warning("save_pruned: no source_fingerprint given; pruning.json records null")
    atomic_write_text(out / PRUNING_FILENAME, json.dumps(info, indent=2, default=_json_default) + "\n")
    apply_umask(out)
    log.info("saved pruned model to %s (%.2f%% zeros of %d parameters)", out,
             100 * info["saved_sparsity"]["sparsity"], n_params)
    return out


def calibration_of(model_spec: str | os.PathLike) -> dict[str, Any] | None:
    """The calibration record of a pruned model directory (``pruning.json``), if it has one:
    what an evaluation of that model must not overlap."""
    path = Path(model_spec)
    if not (path / PRUNING_FILENAME).is_file():
        return None
    info = json.loads((path / PRUNING_FILENAME).read_text(encoding="utf-8"))
    return ((info.get("pruning") or {}).get("calibration") or {}).get("data")


def read_pruning_info(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``pruning.json`` of a pruned model directory (or of a compressed/CTranslate2 export).

    Args:
        model_dir: directory written by ``save_pruned`` or an ``export_*`` function.

    Returns:
        The parsed JSON object.

    Raises:
        FileNotFoundError: the directory has no ``pruning.json``.
    """
    path = Path(model_dir) / PRUNING_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {model_dir} is not a pruned model directory "
                                "written by asrprune (save_pruned / asrprune prune)")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------
# Compressed sparse safetensors (asrprune-bitmask v1, docs/sparse_format.md)
# ----------------------------------------------------------------------------------------------


def save_compressed(
    tensors: torch.nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write tensors in the ``asrprune-bitmask`` safetensors layout.

    A floating-point tensor is stored as ``name::bitmask`` (uint8, ``ceil(numel / 8)`` bytes,
    bit ``i`` = flat element ``i`` is non-zero, little bit order) plus ``name::values`` (1-D, its
    dtype, the non-zero elements in row-major order) whenever that is smaller than the dense
    tensor; ``name::negzero`` (packed sign bits of the zero elements) is added only when some
    zeros are ``-0.0``. Every other tensor is stored densely under its own name. Tensors that
    share storage (tied weights) are stored once and listed as aliases.

    Args:
        tensors: a module (its ``state_dict()`` is written) or a name -> tensor mapping.
        path: output file, conventionally ``model.sparse.safetensors``.
        metadata: extra string metadata for the safetensors header.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: a tensor name contains ``"::"`` or a metadata key clashes with the layout's.
    """
    state = tensors.state_dict() if isinstance(tensors, torch.nn.Module) else dict(tensors)
    canonical, aliases = _split_aliases(state)
    out_tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    dense_bytes = 0
    storages: set[int | None] = {None}
    for name, tensor in canonical.items():
        if _SEP in name:
            raise ValueError(f"save_compressed: tensor name {name!r} contains {_SEP!r}, which the "
                             f"{SPARSE_FORMAT} layout reserves")
        t = tensor.detach().to("cpu").contiguous()
        dense_bytes += t.numel() * t.element_size()
        parts, entry = _encode(t)
        entries[name] = entry
        if entry["encoding"] == "dense":
            # safetensors refuses distinct tensors that share memory (slices of one buffer)
            storage = t.untyped_storage().data_ptr() if t.numel() else None
            out_tensors[name] = t.clone() if storage in storages else t
            storages.add(storage)
        else:
            out_tensors.update({f"{name}{_SEP}{part}": v for part, v in parts.items()})
    layout = {
        "format": SPARSE_FORMAT,
        "version": SPARSE_FORMAT_VERSION,
        "tensors": entries,
        "aliases": aliases,
    }
    header = {"format": "pt", "sparse_format": SPARSE_FORMAT,
              "sparse_format_version": str(SPARSE_FORMAT_VERSION), _LAYOUT_KEY: json.dumps(layout)}
    for key, value in (metadata or {}).items():
        if key in header:
            raise ValueError(f"save_compressed: metadata key {key!r} is reserved by the layout")
        header[str(key)] = str(value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out_tensors, str(path), metadata=header)
    apply_umask(path)
    size = path.stat().st_size
    log.info("wrote %s: %d tensors (%d bitmask), %.1f MB vs %.1f MB dense", path, len(entries),
             sum(e["encoding"] == "bitmask" for e in entries.values()), size / 1e6,
             dense_bytes / 1e6)
    return path


def load_compressed(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read an ``asrprune-bitmask`` file back into a dense state dict, bit-exactly.

    Args:
        path: a file written by ``save_compressed``.
        device: where the returned tensors live.

    Returns:
        name -> dense tensor, in the order written, with aliases (tied weights) pointing to the
        very same tensor object as their canonical name.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        SparseFormatError: the file is not safetensors, is not in this layout, has a newer
            layout version, or its parts are inconsistent.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compressed model file {path} not found")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise SparseFormatError(f"{path} is not a safetensors file: {exc}") from exc
    with handle as f:
        meta = f.metadata() or {}
        if meta.get("sparse_format") != SPARSE_FORMAT or _LAYOUT_KEY not in meta:
            raise SparseFormatError(f"{path} is not an {SPARSE_FORMAT} file (header "
                                    f"sparse_format={meta.get('sparse_format')!r})")
        layout = json.loads(meta[_LAYOUT_KEY])
        version = int(layout.get("version", 0))
        if version > SPARSE_FORMAT_VERSION:
            raise SparseFormatError(f"{path} uses {SPARSE_FORMAT} version {version}; this asrprune "
                                    f"reads up to version {SPARSE_FORMAT_VERSION}")
        keys = set(f.keys())
        state: dict[str, torch.Tensor] = {}
        for name, entry in layout["tensors"].items():
            if entry["encoding"] == "dense":
                state[name] = f.get_tensor(name)
                continue
            if entry["encoding"] != "bitmask":
                raise SparseFormatError(f"{path}: tensor {name!r} has unknown encoding "
                                        f"{entry['encoding']!r}")
            parts = {p: f.get_tensor(f"{name}{_SEP}{p}") for p in ("bitmask", "values", "negzero")
                     if f"{name}{_SEP}{p}" in keys}
            state[name] = _decode(parts, entry, where=f"{path}: {name}")
    for alias, target in layout.get("aliases", {}).items():
        state[alias] = state[target]
    if str(device) != "cpu":
        moved = {id(t): t.to(device) for t in state.values()}
        state = {k: moved[id(t)] for k, t in state.items()}
    return state


def export_compressed(
    model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Turn a pruned model directory into a compressed one (``model.sparse.safetensors``).

    All non-weight files of ``model_dir`` (configs, tokenizer/processor files, ``pruning.json``)
    are copied; the weights are written by ``save_compressed``. Read back with
    ``load_compressed_model``.

    Args:
        model_dir: a ``save_pretrained`` directory (e.g. written by ``save_pruned``).
        out_dir: directory to create.
        overwrite: replace files in a non-empty ``out_dir``.

    Returns:
        ``out_dir / COMPRESSED_FILENAME``.

    Raises:
        FileNotFoundError: ``model_dir`` has no safetensors weights.
        FileExistsError: ``out_dir`` is non-empty and ``overwrite`` is False.
    """
    src, out = Path(model_dir), Path(out_dir)
    state = _read_safetensors_dir(src)
    _check_out_dir(out, overwrite, create=True)
    for item in sorted(src.iterdir()):
        if item.is_file() and not _is_weight_file(item):
            shutil.copy2(item, out / item.name)
    return save_compressed(state, out / COMPRESSED_FILENAME,
                           metadata={"source_dir_name": src.name})


def load_compressed_model(path: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """Load a Whisper model from a directory written by ``export_compressed``.

    Args:
        path: the compressed directory (holding ``config.json`` and ``model.sparse.safetensors``)
            or the ``.safetensors`` file inside it.
        device: target device.

    Returns:
        ``WhisperForConditionalGeneration`` in eval mode with tied weights tied.

    Raises:
        FileNotFoundError: no ``config.json`` or compressed weights file.
        SparseFormatError: the weights do not match the architecture in ``config.json``.
    """
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    path = Path(path)
    model_dir, weights = (path.parent, path) if path.is_file() else (path, path / COMPRESSED_FILENAME)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir / 'config.json'} not found: not a compressed model "
                                "directory written by asrprune export --format compressed")
    state = load_compressed(weights)
    config = WhisperConfig.from_pretrained(model_dir)
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    loaded_ids = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in state}
    all_params = dict(model.named_parameters(remove_duplicate=False))
    # A key missing from the file is fine only when it is tied to one that was loaded.
    missing = [k for k in missing if not (k in all_params and id(all_params[k]) in loaded_ids)]
    if missing or unexpected:
        raise SparseFormatError(f"{weights} does not match {model_dir / 'config.json'}: "
                                f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model.to(device).eval()


def decompress_to_pretrained(
    compressed_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Inverse of ``export_compressed``: write a plain ``save_pretrained`` directory again.

    Args:
        compressed_dir: directory written by ``export_compressed``.
        out_dir: directory to create; gets ``model.safetensors`` plus every other file of
            ``compressed_dir`` (configs, tokenizer files, ``pruning.json``).
        overwrite: replace what a non-empty ``out_dir`` holds.

    Returns:
        The written directory.

    Raises:
        FileNotFoundError, SparseFormatError: as ``load_compressed_model``.
        FileExistsError: ``out_dir`` is non-empty and ``overwrite`` is False.
    """
    src, out = Path(compressed_dir), Path(out_dir)
    model = load_compressed_model(src)
    _check_out_dir(out, overwrite, create=True)
    model.save_pretrained(out)
    for item in sorted(src.iterdir()):
        if item.is_file() and not _is_weight_file(item) and not (out / item.name).exists():
            shutil.copy2(item, out / item.name)
    return apply_umask(out)


def is_compressed_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory written by ``export_compressed``."""
    return (Path(path) / COMPRESSED_FILENAME).is_file()


# ----------------------------------------------------------------------------------------------
# CTranslate2
# ----------------------------------------------------------------------------------------------


def export_ctranslate2(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    quantization: str | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Convert a pruned model directory to CTranslate2 (loadable by faster-whisper).

    Uses ``ctranslate2.converters.TransformersConverter``; copies ``tokenizer.json`` and
    ``preprocessor_config.json`` (which faster-whisper reads) and ``pruning.json``. Without
    quantization the weights keep their saved dtype, so zeros stay zeros.

    Args:
        model_dir: a ``save_pretrained`` directory with processor files (``save_pruned`` output).
        out_dir: directory to create (``model.bin``, ``config.json``, ``vocabulary.json``, ...).
        quantization: one of ``CT2_QUANTIZATIONS`` or None (keep the weights' dtype).

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: unknown ``quantization``.
        FileNotFoundError: ``model_dir`` has no ``config.json`` or no ``tokenizer.json``.
        FileExistsError: ``out_dir`` is non-empty and ``overwrite`` is False.
    """
    if quantization is not None and quantization not in CT2_QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not one of {', '.join(CT2_QUANTIZATIONS)}")
    src, out = Path(model_dir), Path(out_dir)
    for needed in ("config.json", "tokenizer.json"):
        if not (src / needed).is_file():
            raise FileNotFoundError(f"{src / needed} not found: export_ctranslate2 needs a model "
                                    "directory written with its processor (save_pruned)")
    _check_out_dir(out, overwrite)
    from ctranslate2.converters import TransformersConverter

    copy_files = [name for name in _CT2_SIDE_FILES if (src / name).is_file()]
    structure = json.loads((src / "config.json").read_text(encoding="utf-8")).get(STRUCTURE_KEY)
    if structure is None:
        converter = TransformersConverter(str(src), copy_files=copy_files)
    else:
        converter = _structured_converter(src, structure, copy_files)
    # The converter writes into a fresh directory; convert next to out_dir, then move in, so
    # that an existing out_dir (overwrite=True) keeps nothing stale and a crash leaves no half dir.
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / "ct2"
        converter.convert(str(staged), quantization=quantization, force=True)
        if (src / PRUNING_FILENAME).is_file():
            shutil.copy2(src / PRUNING_FILENAME, staged / PRUNING_FILENAME)
        if not (staged / "preprocessor_config.json").is_file():
            _write_preprocessor_config(src, staged)
        apply_umask(staged)
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(staged), str(out))
    log.info("exported CTranslate2 model to %s (quantization=%s)", out, quantization)
    return out


def _save_structured(model, out: Path) -> None:
    """Config, generation config and :data:`~asrprune.shapes.STRUCTURED_WEIGHTS` (the tied
    output projection stored once, as ``save_pretrained`` does)."""
    from safetensors.torch import save_file

    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    state = model.state_dict()
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        state.pop("proj_out.weight", None)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / STRUCTURED_WEIGHTS),
              metadata={"format": "pt"})


def _structured_converter(src: Path, structure: Mapping[str, Any], copy_files: list[str]):
    """The CTranslate2 converter for a model whose layers differ in shape (asrprune.shapes).

    CTranslate2's Whisper spec has one head count per side and derives the head size from it,
    so removed heads cannot be expressed; FFN widths are read from each layer's weights, so
    per-layer widths can, once the model is loaded by asrprune (plain transformers cannot).
    """
    from ctranslate2.converters import TransformersConverter

    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    heads = {"encoder": config["encoder_attention_heads"], "decoder": config["decoder_attention_heads"]}
    for side in ("encoder", "decoder"):
        for i, row in enumerate(structure[side]):
            for key in ("self_heads", "cross_heads"):
                if key in row and row[key] != heads[side]:
                    raise ValueError(
                        f"{src}: {side} layer {i} keeps {row[key]} of {heads[side]} {key.split('_')[0]}-attention heads; "
                        "CTranslate2's Whisper spec has one head count per side and derives the head size from it, "
                        "so a model with removed heads cannot be exported to CTranslate2 (it runs in PyTorch "
                        "through asrprune.load_model)")

    class Converter(TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            return load_model(model_name_or_path)[0]

    return Converter(str(src), copy_files=copy_files)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _encode(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Encode one tensor; returns (parts, layout entry). Parts are empty for dense tensors."""
    entry: dict[str, Any] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    numel, itemsize = t.numel(), t.element_size()
    if not t.is_floating_point() or numel == 0:
        return {}, {**entry, "encoding": "dense"}
    flat = t.reshape(-1)
    nonzero = flat != 0  # True for NaN too: NaNs are stored as values, bits intact
    nnz = int(nonzero.sum())
    zeros = flat[~nonzero]
    negzero = torch.signbit(zeros)
    has_negzero = bool(negzero.any())
    n_bytes = math.ceil(numel / 8) + nnz * itemsize + (math.ceil(zeros.numel() / 8) if has_negzero else 0)
    if n_bytes >= numel * itemsize:
        return {}, {**entry, "encoding": "dense"}
    parts = {"bitmask": _pack(nonzero), "values": flat[nonzero].clone()}
    if has_negzero:
        parts["negzero"] = _pack(negzero)
    return parts, {**entry, "encoding": "bitmask", "nnz": nnz, "negzero": has_negzero}


def _decode(parts: Mapping[str, torch.Tensor], entry: Mapping[str, Any], *, where: str) -> torch.Tensor:
    shape = [int(s) for s in entry["shape"]]
    numel = math.prod(shape)
    dtype = getattr(torch, entry["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise SparseFormatError(f"{where}: unknown dtype {entry['dtype']!r}")
    if "bitmask" not in parts or "values" not in parts:
        raise SparseFormatError(f"{where}: bitmask or values part missing")
    nonzero = _unpack(parts["bitmask"], numel)
    values = parts["values"]
    if values.dtype != dtype or values.numel() != int(nonzero.sum()):
        raise SparseFormatError(f"{where}: {values.numel()} {values.dtype} values for "
                                f"{int(nonzero.sum())} set bits of dtype {dtype}")
    flat = torch.zeros(numel, dtype=dtype)
    flat[nonzero] = values
    if entry.get("negzero"):
        if "negzero" not in parts:
            raise SparseFormatError(f"{where}: negzero part missing")
        zero_idx = (~nonzero).nonzero().squeeze(1)
        sign = _unpack(parts["negzero"], zero_idx.numel())
        flat[zero_idx[sign]] = -0.0
    return flat.reshape(shape)


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """(N,) bool -> (ceil(N / 8),) uint8, bit i at byte i // 8, position i % 8 (LSB first)."""
    return torch.from_numpy(np.packbits(bits.numpy(), bitorder="little"))


def _unpack(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of ``_pack``: (ceil(count / 8),) uint8 -> (count,) bool."""
    if packed.dtype != torch.uint8 or packed.numel() != math.ceil(count / 8):
        raise SparseFormatError(f"bitmask of {packed.numel()} {packed.dtype} for {count} elements")
    bits = np.unpackbits(packed.numpy(), count=count, bitorder="little")
    return torch.from_numpy(bits.astype(bool))


def _split_aliases(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep the first name of each group of tensors that are views of the same memory."""
    canonical: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        if t.numel() == 0:
            canonical[name] = t
            continue
        key = (t.device.type, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            canonical[name] = t
    return canonical, aliases


def _tied_groups(model: torch.nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _count_nonzero(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), each tied parameter counted once."""
    total = nonzero = 0
    for p in model.parameters():  # parameters() removes duplicates (tied weights)
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero


def _check_no_prune_hooks(model: torch.nn.Module) -> None:
    leftovers = [n for n, _ in model.named_parameters() if n.endswith("_orig")]
    if leftovers:
        raise ValueError(
            "the model still carries torch.nn.utils.prune re-parametrisation (e.g. "
            f"{leftovers[0]!r}); call torch.nn.utils.prune.remove(module, name) on each pruned "
            "module before saving, so that the zeros are written into the weights")


def _check_out_dir(out: Path, overwrite: bool, *, create: bool = False) -> None:
    """Refuse a file or a non-empty folder (unless ``overwrite``); ``create`` makes the folder."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory; give a directory (new or existing)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} is not empty; choose another --out or "
                              "pass overwrite=True (--overwrite)")
    if create:
        out.mkdir(parents=True, exist_ok=True)


def _source_dir(source: str, processor: Any | None) -> Path | None:
    """The directory the unpruned model came from, to copy its side files (best effort)."""
    candidates: list[Path] = []
    if source and Path(source).is_dir():
        candidates.append(Path(source))
    else:
        try:
            candidates.append(Path(resolve_model_dir(source)))
        except Exception as exc:  # a hub id or unknown name: nothing local to copy from
            log.debug("no local directory for source %r: %s", source, exc)
    tok = getattr(processor, "tokenizer", None)
    name_or_path = getattr(tok, "name_or_path", None)
    if name_or_path and Path(name_or_path).is_dir():
        candidates.append(Path(name_or_path))
    return next((c for c in candidates if c.is_dir()), None)


def _copy_side_files(src: Path | None, out: Path) -> list[str]:
    if src is None or src.resolve() == out.resolve():
        return []
    copied = []
    for item in sorted(src.iterdir()):
        if (item.is_file() and item.suffix in _SIDE_FILE_SUFFIXES and not _is_weight_file(item)
                and item.name not in _NOT_SIDE_FILES and not (out / item.name).exists()):
            shutil.copy2(item, out / item.name)
            copied.append(item.name)
    if copied:
        log.info("copied side files from %s: %s", src, ", ".join(copied))
    return copied


def _write_preprocessor_config(src: Path, out: Path) -> None:
    """faster-whisper reads the feature extractor settings (n_mels, ...) from
    ``preprocessor_config.json``; transformers 5 nests them in ``processor_config.json``."""
    nested = src / "processor_config.json"
    if nested.is_file():
        feature_extractor = json.loads(nested.read_text()).get("feature_extractor")
        if isinstance(feature_extractor, dict):
            atomic_write_text(out / "preprocessor_config.json", json.dumps(feature_extractor, indent=2, default=_json_default) + "\n")
            return
    log.warning("%s has no preprocessor settings; faster-whisper will use its defaults (80 mels)", src)


def _is_weight_file(path: Path) -> bool:
    return path.name.endswith(_WEIGHT_SUFFIXES) or path.name in _WEIGHT_INDEX_NAMES


def _read_safetensors_dir(src: Path) -> dict[str, torch.Tensor]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (src / STRUCTURED_WEIGHTS).is_file():
        raise ValueError(f"{src} is structurally pruned (its matrices are smaller, {STRUCTURED_WEIGHTS}); "
                         "the compressed form stores the zeros of unstructured sparsity and does not apply")
    else:
        raise FileNotFoundError(f"{src} has no model.safetensors (or index): not a save_pretrained "
                                "model directory")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(src / name)))
    return state


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")



