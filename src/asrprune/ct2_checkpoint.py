"""CTranslate2 Whisper checkpoints: read ``model.bin`` without CTranslate2, convert to transformers.

The conversion is exact: every variable is copied bit for bit (fused q/k/v and k/v projections
are split, the all-zero k bias that CTranslate2 stores is dropped because Whisper's ``k_proj``
has none), so converting back with CTranslate2's own ``TransformersConverter`` (``export.py``)
gives the original ``model.bin`` variables. Whisper's English spelling map (``normalizer.json``),
which the CTranslate2 packages lack, is taken from the ``whisper-normalizer`` package so that
``processor.tokenizer.normalize`` works offline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np
import torch

from .files import apply_umask

log = logging.getLogger(__name__)

__all__ = [
    "CONVERSION_FILE",
    "CONVERSION_VERSION",
    "CT2Model",
    "ModelLoadError",
    "convert_ctranslate2",
    "ctranslate2_source_dir",
    "normalizer_json",
    "read_ctranslate2_model",
    "sha256_files",
]


CONVERSION_FILE = "asrprune_conversion.json"
CONVERSION_VERSION = 2


class ModelLoadError(OSError):
    """A model spec could not be resolved or loaded; the message says what to do instead."""


# Order of CTranslate2's DataType enum (include/ctranslate2/types.h; specs/model_spec.py).
_CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


class _ChainedReader(io.RawIOBase):
    """Reads several files as one stream (``model.bin`` split into parts)."""

    def __init__(self, paths: Iterable[Path]):
        self._files: list[BinaryIO] = [open(p, "rb") for p in paths]
        self._index = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._index < len(self._files):
            n = self._files[self._index].readinto(buffer)
            if n:
                return n
            self._index += 1
        return 0

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


@dataclasses.dataclass
class CT2Model:
    """Variables of a CTranslate2 ``model.bin``.

    Attributes:
        spec_name: e.g. ``WhisperSpec``.
        revision: spec revision.
        variables: name -> numpy array (fp16 arrays stay fp16; bf16 arrays are returned as a
            uint16 view and flagged in ``bfloat16``).
        aliases: alias name -> variable name (``decoder/projection/weight`` -> embeddings).
    """

    spec_name: str
    revision: int
    binary_version: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]
    bfloat16: frozenset[str] = frozenset()


def read_ctranslate2_model(parts: Path | Iterable[Path]) -> CT2Model:
    """Parse a CTranslate2 ``model.bin`` (binary version 6) without CTranslate2 itself.

    Args:
        parts: the ``model.bin`` path, or the paths of its parts in order.

    Returns:
        The variables and aliases, exactly as stored.

    Raises:
        ModelLoadError: the file is not a CTranslate2 model of a version we can read.
    """
    paths = [Path(parts)] if isinstance(parts, (str, os.PathLike)) else [Path(p) for p in parts]
    with io.BufferedReader(_ChainedReader(paths), buffer_size=1 << 20) as f:

        def read_exact(n: int) -> bytes:
            data = f.read(n)
            if len(data) != n:
                raise ModelLoadError(f"{paths[0]}: truncated CTranslate2 model (wanted {n} bytes)")
            return data

        def u(fmt: str):
            return struct.unpack("<" + fmt, read_exact(struct.calcsize(fmt)))[0]

        def string() -> str:
            return read_exact(u("H"))[:-1].decode("utf-8")

        version = u("I")
        if version < 5 or version > 6:
            raise ModelLoadError(
                f"{paths[0]}: CTranslate2 binary version {version} is not supported (5 or 6 expected)"
            )
        spec_name = string()
        revision = u("I")
        variables: dict[str, np.ndarray] = {}
        bf16: set[str] = set()
        for _ in range(u("I")):
            name = string()
            shape = tuple(u("I") for _ in range(u("B")))
            type_id = u("B")
            nbytes = u("I")
            dtype_name = _CT2_DTYPES[type_id]
            np_dtype = np.uint16 if dtype_name == "bfloat16" else np.dtype(dtype_name)
            if dtype_name == "bfloat16":
                bf16.add(name)
            array = np.frombuffer(read_exact(nbytes), dtype=np_dtype).reshape(shape)
            variables[name] = array
        aliases = {}
        for _ in range(u("I")):
            alias = string()
            aliases[alias] = string()
    return CT2Model(spec_name, revision, version, variables, aliases, frozenset(bf16))


def normalizer_json() -> Path:
    """Whisper's English spelling map, shipped by the ``whisper-normalizer`` package."""
    spec = importlib.util.find_spec("whisper_normalizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the package 'whisper-normalizer' (Whisper's English spelling map, normalizer.json) is "
            "not installed: pip install whisper-normalizer"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "normalizers" / "english.json"
    if not path.is_file():
        raise ModelLoadError(f"whisper-normalizer is installed but lacks {path}")
    return path


def _layer_count(variables: dict[str, np.ndarray], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"/layer_(\d+)/")
    return 1 + max(int(m.group(1)) for name in variables if (m := pattern.match(name)))


def _torch(array: np.ndarray, bf16: bool = False) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(array, copy=True))
    return tensor.view(torch.bfloat16) if bf16 else tensor


def _ct2_state_dict(ct2: CT2Model) -> tuple[dict[str, torch.Tensor], dict]:
    """Map CTranslate2 variables to ``WhisperForConditionalGeneration`` parameter names.

    Returns the state dict and the architecture numbers that ``WhisperConfig`` needs.
    """
    v = ct2.variables

    def t(name: str) -> torch.Tensor:
        return _torch(v[name], name in ct2.bfloat16)

    n_enc = _layer_count(v, "encoder")
    n_dec = _layer_count(v, "decoder")
    d_model = v["encoder/layer_norm/gamma"].shape[0]
    sd: dict[str, torch.Tensor] = {}

    def linear(hf: str, ct: str) -> None:
        sd[f"{hf}.weight"] = t(f"{ct}/weight")
        sd[f"{hf}.bias"] = t(f"{ct}/bias")

    def layer_norm(hf: str, ct: str) -> None:
        sd[f"{hf}.weight"] = t(f"{ct}/gamma")
        sd[f"{hf}.bias"] = t(f"{ct}/beta")

    def split_fused(hf: str, ct: str, names: tuple[str, ...]) -> None:
        # CTranslate2 fuses q/k/v (or k/v) along the output dim; Whisper's k_proj has no bias,
        # so the fused bias holds zeros at k's rows, which we check and drop.
        weight, bias = t(f"{ct}/weight"), t(f"{ct}/bias")
        ws = torch.split(weight, d_model, dim=0)
        bs = torch.split(bias, d_model, dim=0)
        assert len(ws) == len(names), (ct, weight.shape)
        for name, w, b in zip(names, ws, bs):
            sd[f"{hf}.{name}.weight"] = w.contiguous()
            if name == "k_proj":
                if torch.count_nonzero(b.float()) != 0:
                    raise ModelLoadError(
                        f"{ct}/bias has non-zero entries for the key projection, which Whisper's "
                        "k_proj cannot hold; this is not a Whisper model converted by CTranslate2"
                    )
            else:
                sd[f"{hf}.{name}.bias"] = b.contiguous()

    def layer(hf: str, ct: str, *, cross: bool) -> None:
        # one transformer layer: self-attention, [cross-attention,] FFN, each with its norm
        split_fused(f"{hf}.self_attn", f"{ct}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
        layer_norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        if cross:
            linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
            split_fused(f"{hf}.encoder_attn", f"{ct}/attention/linear_1", ("k_proj", "v_proj"))
            linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
            layer_norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
        linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
        layer_norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")

    enc, dec = "model.encoder", "model.decoder"
    for i in (1, 2):
        sd[f"{enc}.conv{i}.weight"] = t(f"encoder/conv{i}/weight")
        sd[f"{enc}.conv{i}.bias"] = t(f"encoder/conv{i}/bias")
    sd[f"{dec}.embed_tokens.weight"] = t("decoder/embeddings/weight")
    for hf_side, ct_side, n, cross in ((enc, "encoder", n_enc, False), (dec, "decoder", n_dec, True)):
        sd[f"{hf_side}.embed_positions.weight"] = t(f"{ct_side}/position_encodings/encodings")
        layer_norm(f"{hf_side}.layer_norm", f"{ct_side}/layer_norm")
        for i in range(n):
            layer(f"{hf_side}.layers.{i}", f"{ct_side}/layer_{i}", cross=cross)

    projection = ct2.aliases.get("decoder/projection/weight")
    if projection != "decoder/embeddings/weight":
        raise ModelLoadError(
            "the CTranslate2 model's output projection is not tied to the token embeddings "
            f"(alias {projection!r}); only tied Whisper checkpoints are supported"
        )

    arch = dict(
        d_model=int(d_model),
        encoder_layers=n_enc,
        decoder_layers=n_dec,
        encoder_attention_heads=int(v["encoder/num_heads"]),
        decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        num_mel_bins=int(v["encoder/conv1/weight"].shape[1]),
        max_source_positions=int(v["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(v["decoder/position_encodings/encodings"].shape[0]),
        vocab_size=int(v["decoder/embeddings/weight"].shape[0]),
    )
    return sd, arch


def _build_tokenizer(tokenizer_json: Path, vocab_size: int):
    """Whisper tokenizer from a ``tokenizer.json`` with every special and timestamp token."""
    from transformers import AddedToken, WhisperTokenizer

    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    specials = [t["content"] for t in spec.get("added_tokens", []) if t.get("special")]
    tokenizer = WhisperTokenizer(
        tokenizer_file=str(tokenizer_json),
        normalizer_file=str(normalizer_json()),
        extra_special_tokens=[s for s in specials if s != "<|endoftext|>"],
    )
    # Timestamp tokens <|0.00|> .. <|30.00|> fill the vocabulary after the specials, as in the
    # hub tokenizers (they are added tokens, not special ones, so decode() keeps them visible
    # only when asked for offsets).
    n_timestamps = vocab_size - len(tokenizer)
    if n_timestamps < 0:
        raise ModelLoadError(
            f"{tokenizer_json}: tokenizer has {len(tokenizer)} tokens, more than the model's "
            f"vocabulary of {vocab_size}"
        )
    tokenizer.add_tokens(
        [
            AddedToken("<|%.2f|>" % (i * 0.02), lstrip=False, rstrip=False, normalized=False, special=False)
            for i in range(n_timestamps)
        ]
    )
    return tokenizer


def _generation_config(tokenizer, ct2_config: dict, model_config):
    """A generation config equal in content to the hub's for the same checkpoint."""
    from transformers import GenerationConfig

    def tid(token: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(token))

    multilingual = model_config.vocab_size >= 51865
    eot = tid("<|endoftext|>")
    no_timestamps = tid("<|notimestamps|>")
    gen = GenerationConfig(
        decoder_start_token_id=tid("<|startoftranscript|>"),
        bos_token_id=eot if multilingual else tid("<|startoftranscript|>"),
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=model_config.max_target_positions,
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or [220, eot]),
        alignment_heads=[list(map(int, h)) for h in ct2_config.get("alignment_heads") or []],
        no_timestamps_token_id=no_timestamps,
        prev_sot_token_id=tid("<|startofprev|>"),
        is_multilingual=multilingual,
        max_initial_timestamp_index=50,
        return_timestamps=False,
    )
    # Language tokens in Whisper's order (<|en|>, <|zh|>, ...). CTranslate2's config lists their
    # ids; the hub's English-only configs carry the multilingual ids too, which we keep so that a
    # round trip through CTranslate2's converter reproduces config.json.
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    lang_ids = [int(i) for i in ct2_config.get("lang_ids") or []]
    if not lang_ids and multilingual:
        lang_ids = [tid(f"<|{code}|>") for code in LANGUAGES if tid(f"<|{code}|>") != tokenizer.unk_token_id]
    gen.lang_to_id = {f"<|{code}|>": i for code, i in zip(LANGUAGES, lang_ids)}
    if multilingual:
        for token, i in gen.lang_to_id.items():
            if tokenizer.convert_ids_to_tokens(i) != token:
                raise ModelLoadError(f"language id {i} is {tokenizer.convert_ids_to_tokens(i)!r} in the tokenizer, not {token!r}")
        gen.task_to_id = {"translate": tid("<|translate|>"), "transcribe": tid("<|transcribe|>")}
        # The hub checkpoints carry [[1, None], [2, transcribe]]: detect the language, transcribe.
        gen.forced_decoder_ids = [[1, None], [2, tid("<|transcribe|>")]]
    else:
        gen.forced_decoder_ids = [[1, no_timestamps]]
    return gen


def sha256_files(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def ctranslate2_source_dir(src: Path) -> list[Path]:
    """The ``model.bin`` part paths of a CTranslate2 directory (``model.bin`` or ``model.bin.part*``)."""
    single = src / "model.bin"
    if single.is_file():
        return [single]
    parts = sorted(src.glob("model.bin.part*"), key=lambda p: int(re.sub(r"\D", "", p.suffix) or 0))
    if not parts:
        raise ModelLoadError(f"{src}: no model.bin (nor model.bin.part*) in this CTranslate2 directory")
    return parts


def convert_ctranslate2(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    parts: list[Path] | None = None,
    files: list[Path] | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a CTranslate2 Whisper model to a transformers ``save_pretrained`` directory.

    The weights keep their stored dtype (float16 for the embedded models) and values.

    Args:
        src: the CTranslate2 directory (``model.bin``, ``config.json``, ``tokenizer.json``).
        out: the directory to write; written to a temporary sibling and renamed when complete,
            so an interrupted conversion leaves nothing half-written.
        parts: explicit ``model.bin`` parts (built-ins split across packages).
        files: explicit paths of ``config.json`` and ``tokenizer.json`` (built-ins).
        overwrite: replace an existing ``out``.

    Returns:
        ``out`` as a Path.

    Raises:
        ModelLoadError: a file is missing or the model is not a CTranslate2 Whisper model.
    """
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    src, out = Path(src), Path(out)
    parts = parts or ctranslate2_source_dir(src)
    named = {p.name: p for p in (files or [])}
    config_path = named.get("config.json", src / "config.json")
    tokenizer_path = named.get("tokenizer.json", src / "tokenizer.json")
    for path in (*parts, config_path, tokenizer_path):
        if not path.is_file():
            raise ModelLoadError(f"{path}: missing; a CTranslate2 Whisper directory needs model.bin, config.json and tokenizer.json")
    if out.exists() and not overwrite:
        raise ModelLoadError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")

    log.info("converting CTranslate2 model %s -> %s", src, out)
    ct2 = read_ctranslate2_model(parts)
    if ct2.spec_name != "WhisperSpec":
        raise ModelLoadError(f"{parts[0]}: a {ct2.spec_name} model, not a Whisper model (WhisperSpec)")
    ct2_config = json.loads(config_path.read_text(encoding="utf-8"))
    state_dict, arch = _ct2_state_dict(ct2)
    dtype = state_dict["model.encoder.conv1.weight"].dtype

    tokenizer = _build_tokenizer(tokenizer_path, arch["vocab_size"])
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    sot = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    config = WhisperConfig(
        **arch,
        activation_function="gelu",
        scale_embedding=False,
        pad_token_id=eot,
        bos_token_id=eot if arch["vocab_size"] >= 51865 else sot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or []),
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelLoadError(f"{parts[0]}: conversion left parameters unset: {missing[:5]}")
    model.to(dtype)
    model.generation_config = _generation_config(tokenizer, ct2_config, config)

    processor = WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=arch["num_mel_bins"]),
        tokenizer=tokenizer,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        shutil.copyfile(normalizer_json(), tmp / "normalizer.json")
        (tmp / CONVERSION_FILE).write_text(
            json.dumps(
                {
                    "conversion_version": CONVERSION_VERSION,
                    "source": str(src),
                    "source_files": [str(p) for p in parts],
                    "source_sha256": sha256_files(parts),
                    "source_dtype": str(dtype).replace("torch.", ""),
                    "ct2_binary_version": ct2.binary_version,
                    "ct2_spec_revision": ct2.revision,
                },
                indent=2,
            )
            + "\n"
        )
        apply_umask(tmp)  # mkdtemp and safetensors make them private
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
