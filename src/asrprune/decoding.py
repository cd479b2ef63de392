"""Decoding: the options, the ``generate`` arguments of each protocol, the batched decoder, and
encoder-output reuse.

- :class:`DecodeOptions` is the decoding spec (protocol, beam size, batch size, dtype, device,
  token cap, language), validated once when it is built and recorded with every result. Its
  fields are the one home of each decoding default; the CLI and the study read them from here.
- :func:`generate_kwargs` gives the arguments ``generate`` gets under a protocol, and
  :func:`max_new_tokens_for` the token budget the model's decoder positions allow.
- :class:`Decoder` turns audio arrays into hypotheses: log-mel features, the encoder (through an
  optional :class:`EncoderCache`), ``model.generate`` with the generation config transformers
  expects (task and language as flags, not ``forced_decoder_ids``; an encoder attention mask),
  and the token counts.

Protocols (recorded as ``protocol`` in every result):

``standard``
    The Open ASR leaderboard's way: multilingual models are forced to English
    (``language="en"``, ``task="transcribe"``; ``DecodeOptions.language`` overrides the language),
    no timestamps, greedy search (``beam_size`` 1 unless set), temperature 0 without fallback.
``paper``
    What the study's authors ran: plain ``model.generate(features)`` with the checkpoint's
    generation-config defaults, so a multilingual model detects the language itself (the task
    the checkpoint's prompt names, ``transcribe``, is passed as the flag transformers expects).
    Only the beam size and token cap of the options are passed (and ``language`` when it is set;
    utterances over 30 s get ``return_timestamps=True``, which long-form generation requires,
    where the authors' pipeline silently truncated them to 30 s).

Utterances longer than the model's 30 s window are never truncated: they are decoded whole with
transformers' sequential long-form generation (full-length features, ``attention_mask``,
timestamps on, as that algorithm requires), in batches of their own after the short ones. This
is the one place where the ``standard`` protocol predicts timestamp tokens (they are removed
from the text). Long-form utterances bypass the :class:`EncoderCache`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import zlib
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import LogitsProcessorList
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from .audio import AudioError, load_audio
from .config import PROTOCOLS, check_dtype
from .files import apply_umask
from .manifests import Utterance
from .models import is_multilingual, torch_dtype

log = logging.getLogger(__name__)

__all__ = [
    "SAMPLING_RATE",
    "DecodeOptions",
    "Decoder",
    "DiskEncoderCache",
    "EncoderCache",
    "FALLBACK_COMPRESSION_RATIO",
    "FALLBACK_TEMPERATURES",
    "compression_ratio",
    "generate_kwargs",
    "loaded_batches",
    "max_new_tokens_for",
]

SAMPLING_RATE = 16000


class _TransformersWhisperNotice(logging.Filter):
    """Drops the two notices that transformers' own Whisper ``generate`` causes, which no caller can.

    ``WhisperGenerationMixin.generate`` fills its generation config with the global defaults
    (``max_length=20`` when the checkpoint has none) and passes it, together with
    ``suppress_tokens``/``begin_suppress_tokens`` (a workaround in transformers itself, PR #48108),
    to ``GenerationMixin.generate``, which then warns that a generation config was passed with
    generation arguments, and, on every batch, that both ``max_new_tokens`` and ``max_length`` are
    set. Both happen whatever the caller passes. Every other notice is left alone: asrprune removes
    their causes (task and language as flags, the encoder's attention mask; see :class:`Decoder`).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "together with generation-related arguments" in msg and "suppress_tokens" in msg:
            return False
        return "seem to have been set. `max_new_tokens` will take precedence" not in msg


logging.getLogger("transformers.generation.utils").addFilter(_TransformersWhisperNotice())


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode; every field is recorded with the result.

    Args:
        protocol: ``"standard"`` or ``"paper"`` (see the module docstring).
        beam_size: beams of the search (1 = greedy).
        batch_size: sequences decoded together in one ``generate`` call (short-form): that many
            utterances with greedy search, ``ceil(batch_size / beam_size)`` with beam search
            (every utterance carries ``beam_size`` hypotheses). Results do not depend on it
            beyond floating-point noise, so a resumed run may change it.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (aliases fp32/fp16/bf16 accepted).
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        max_new_tokens: cap on generated tokens per 30 s window (444 fills Whisper's 448
            positions after a 4-token prompt); a larger value is cut to what the model's decoder
            positions leave after its prompt (:func:`max_new_tokens_for`).
        language: language for multilingual models (``standard``: default ``"en"``; ``paper``:
            default ``None`` = detect).
        num_workers: threads that load and resample audio ahead of the decoder (0 = inline).
        long_form_batch_size: utterances per long-form (> 30 s) ``generate`` call.
        stop_repetitions: end a hypothesis (with end-of-text) once its last tokens are one n-gram
            (n <= :data:`REPETITION_MAX_NGRAM`) repeated this many times in a row; ``None`` (the
            default) never does. A loop then costs a few tokens instead of the token cap, and the
            looping hypothesis keeps its first repetitions only, so its insertions, and with them
            the WER of a collapsed model, fall: the option changes results and is recorded
            (short-form decoding; long-form keeps transformers' own loop).
        temperature_fallback: Whisper's temperature fallback, as OpenAI's ``transcribe`` runs it
            with its compression rule: a short-form hypothesis whose text compresses (zlib) by
            more than :data:`FALLBACK_COMPRESSION_RATIO` (a repetition loop) is decoded again by
            sampling at each of :data:`FALLBACK_TEMPERATURES` in turn, seeded by the utterance id
            and the temperature, until one compresses by at most that ratio; when none does, the
            last is kept (as ``transcribe`` does). Greedy search only; OpenAI's log-probability
            and no-speech rules are not applied; long-form utterances are decoded as without it.
            Off by default; it changes results and is recorded, and each row keeps the
            temperature that gave its hypothesis and the first (greedy) hypothesis.

    Raises:
        ValueError: naming the bad field and the allowed values.
    """

    protocol: str = "standard"
    beam_size: int = 1
    batch_size: int = 16
    dtype: str = "float32"
    device: str = "auto"
    max_new_tokens: int = 444
    language: str | None = None
    num_workers: int = 2
    long_form_batch_size: int = 4
    stop_repetitions: int | None = None
    temperature_fallback: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.temperature_fallback, bool):
            raise ValueError(f"temperature_fallback must be true or false, got {self.temperature_fallback!r}")
        if self.temperature_fallback and self.beam_size != 1:
            raise ValueError("temperature_fallback (--temperature-fallback) works with greedy search only "
                             f"(beam_size 1), got beam_size={self.beam_size} (--beam-size)")
        if self.stop_repetitions is not None and (isinstance(self.stop_repetitions, bool) or not isinstance(
                self.stop_repetitions, int) or self.stop_repetitions < 2):
            raise ValueError(f"stop_repetitions must be an integer >= 2 or None, got {self.stop_repetitions!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {self.protocol!r}")
        object.__setattr__(self, "dtype", check_dtype(self.dtype))
        for name, low in (("beam_size", 1), ("batch_size", 1), ("max_new_tokens", 1),
                          ("long_form_batch_size", 1), ("num_workers", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        device = str(self.device)
        if device != "auto" and device != "cpu" and not device.startswith(("cuda", "mps", "xpu")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        object.__setattr__(self, "device", device)
        if self.language is not None and (not isinstance(self.language, str) or not self.language.strip()):
            raise ValueError(f"language must be a language code such as 'en' or None, got {self.language!r}")

    @property
    def utterances_per_batch(self) -> int:
        """Utterances per short-form ``generate`` call (see ``batch_size``)."""
        return max(1, -(-self.batch_size // self.beam_size))

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    def resolved_device(self) -> torch.device:
        """The device this run uses: ``auto`` becomes ``cuda`` when CUDA is available."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_key(self) -> dict:
        """The options that can change a transcript (batch size and workers cannot)."""
        return {
            "protocol": self.protocol,
            "beam_size": self.beam_size,
            "dtype": self.dtype,
            "device_type": self.resolved_device().type,
            "max_new_tokens": self.max_new_tokens,
            "language": self.language,
            # only when set: older run keys stay valid
            **({"stop_repetitions": self.stop_repetitions} if self.stop_repetitions is not None else {}),
            **({"temperature_fallback": True} if self.temperature_fallback else {}),
        }


class EncoderCache:
    """Encoder outputs (``last_hidden_state``) kept across :func:`evaluate` calls.

    Keyed by (encoder fingerprint, utterance id). The fingerprint hashes the encoder's parameter
    bytes, the feature-extractor settings and the device type, so pruning the decoder keeps every
    entry valid and changing one encoder weight invalidates all of them. Outputs are stored on
    the CPU in the model's dtype; reusing them gives the same transcripts as recomputing them.
    Long-form (> 30 s) utterances are not cached.

    Args:
        max_bytes: least-recently-used entries are dropped beyond this size (None = no limit).

    Attributes:
        encoder_calls: encoder forward calls made through this cache (a test hook).
        encoded: utterances encoded; ``hits`` / ``misses``: lookups served / not served.
    """

    def __init__(self, max_bytes: int | None = 4 * 2**30) -> None:
        self.max_bytes = max_bytes
        self._store: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.encoder_calls = 0
        self.encoded = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        self._store.clear()
        self._bytes = 0

    def get(self, key: tuple[str, str]) -> torch.Tensor | None:
        value = self._store.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._store.move_to_end(key)
        return value

    def put(self, key: tuple[str, str], value: torch.Tensor) -> None:
        """Store one utterance's output, shape (T, D)."""
        value = value.detach().to("cpu").contiguous()
        if key in self._store:
            self._bytes -= self._store.pop(key).nbytes
        self._store[key] = value
        self._bytes += value.nbytes
        while self.max_bytes is not None and self._bytes > self.max_bytes and len(self._store) > 1:
            _, old = self._store.popitem(last=False)
            self._bytes -= old.nbytes

    @staticmethod
    def fingerprint(model, feature_extractor=None) -> str:
        """sha256 (16 hex) over encoder parameters and buffers, feature settings, device type."""
        encoder = model.get_encoder()
        h = hashlib.sha256()
        for name, tensor in sorted(encoder.state_dict().items()):
            t = tensor.detach().contiguous().cpu()
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        if feature_extractor is not None:
            keys = ("feature_size", "sampling_rate", "hop_length", "n_fft", "chunk_length", "dither")
            h.update(json.dumps({k: getattr(feature_extractor, k, None) for k in keys}).encode())
        h.update(next(model.parameters()).device.type.encode())
        return h.hexdigest()[:16]


class DiskEncoderCache(EncoderCache):
    """An :class:`EncoderCache` that also keeps every output as a file, so a rerun reuses them.

    Files: ``DIR/<encoder fingerprint>/<sha256 of the utterance id>.safetensors`` (no pickles).
    """

    def __init__(self, directory: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: tuple[str, str]) -> Path:
        fp, utt_id = key
        return self.directory / fp / (hashlib.sha256(utt_id.encode()).hexdigest()[:24] + ".safetensors")

    def get(self, key: tuple[str, str]) -> torch.Tensor | None:
        value = super().get(key)
        if value is not None:
            return value
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            value = load_file(str(path))["hidden"]
        except Exception as exc:  # noqa: BLE001 - a torn file is recomputed
            log.warning("encoder cache file %s unreadable (%s); recomputing", path, exc)
            return None
        self.misses -= 1
        self.hits += 1
        super().put(key, value)
        return value

    def put(self, key: tuple[str, str], value: torch.Tensor) -> None:
        super().put(key, value)
        path = self._path(key)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            save_file({"hidden": value.detach().to("cpu").contiguous()}, str(tmp))
            os.replace(apply_umask(tmp), path)


def _prompt_length(model) -> int:
    """Tokens of the prompt: start, [language, task,] no-timestamps."""
    return 4 if is_multilingual(model) else 2


def max_new_tokens_for(model, requested: int) -> int:
    """The token budget of one 30 s window: ``requested``, cut to what the decoder's positions
    leave after the prompt (more new tokens than fit would index past the position table)."""
    return max(1, min(int(requested), int(model.config.max_target_positions) - _prompt_length(model)))


def _prompt_task(model) -> str:
    """The task the checkpoint's prompt names (``forced_decoder_ids``), ``transcribe`` by default."""
    gc = model.generation_config
    task_ids = {v: k for k, v in (getattr(gc, "task_to_id", None) or {}).items()}
    for _, token in getattr(gc, "forced_decoder_ids", None) or []:
        if token in task_ids:
            return task_ids[token]
    return "transcribe"


def generate_kwargs(model, options: DecodeOptions, *, long_form: bool) -> dict:
    """The keyword arguments ``generate`` gets under the options' protocol.

    Raises:
        ValueError: a language other than English for an English-only model.
    """
    multilingual = is_multilingual(model)
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens_for(model, options.max_new_tokens),
                          "num_beams": options.beam_size}
    if options.protocol == "standard":
        kw.update(do_sample=False, temperature=0.0, condition_on_prev_tokens=False)
        # Long-form generation needs timestamp tokens to move its 30 s window.
        kw["return_timestamps"] = bool(long_form)
        if multilingual:
            kw.update(language=options.language or "en", task="transcribe")
    else:
        if multilingual:
            # the checkpoint's prompt task as the flag transformers reads (forced_decoder_ids is
            # deprecated there and ignored once a flag is set); the language is detected
            kw["task"] = _prompt_task(model)
            if options.language:
                kw["language"] = options.language
        if long_form:
            # The authors' pipeline truncated audio to 30 s (the feature extractor's default);
            # we never truncate, and transformers' long-form algorithm needs timestamp tokens.
            kw["return_timestamps"] = True
    if not multilingual and options.language not in (None, "en", "english"):
        raise ValueError(f"language={options.language!r} was set, but the model is English-only")
    return kw


def _generation_config(model, *, keep_suppress: bool):
    """A copy of the model's generation config in the form transformers expects.

    - ``forced_decoder_ids`` is dropped: the prompt comes from the ``language``/``task`` flags
      (:func:`generate_kwargs`); an English-only model also loses its ``lang_to_id`` table (the
      hub's English-only configs carry one), so that no language is detected for it: its prompt
      stays start + no-timestamps, the tokens ``forced_decoder_ids`` gave;
    - without ``keep_suppress``, the suppress lists are dropped too: short-form decoding applies
      them through :class:`_SuppressTokens` instead.
    """
    gc = copy.deepcopy(model.generation_config)
    gc.forced_decoder_ids = None
    if not is_multilingual(model) and hasattr(gc, "lang_to_id"):
        del gc.lang_to_id
    if not keep_suppress:
        gc.suppress_tokens = None
        gc.begin_suppress_tokens = None
    return gc


@contextlib.contextmanager
def _swapped_generation_config(model, gc) -> Iterator[None]:
    original = model.generation_config
    model.generation_config = gc
    try:
        yield
    finally:
        model.generation_config = original


def _load_one(utt: Utterance) -> np.ndarray | AudioError:
    try:
        return load_audio(utt, SAMPLING_RATE)
    except AudioError as exc:
        return exc
    except Exception as exc:  # a decoder library error must fail one utterance, not the run
        return AudioError(utt.id, utt.audio, f"{type(exc).__name__}: {exc}")


def loaded_batches(
    batches: Iterable[list[Utterance]], num_workers: int
) -> Iterator[tuple[list[Utterance], list]]:
    """Yield (batch, audio-or-error list), loading the next batches in threads meanwhile."""
    if num_workers <= 0:
        for batch in batches:
            yield batch, [_load_one(u) for u in batch]
        return
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="asrprune-audio") as pool:
        it = iter(batches)
        pending: deque = deque()

        def submit() -> None:
            batch = next(it, None)
            if batch is not None:
                pending.append((batch, [pool.submit(_load_one, u) for u in batch]))

        for _ in range(2):
            submit()
        while pending:
            batch, futures = pending.popleft()
            submit()
            yield batch, [f.result() for f in futures]


REPETITION_MAX_NGRAM = 8
#: OpenAI Whisper's ``transcribe`` defaults (``compression_ratio_threshold``, ``temperature``)
FALLBACK_COMPRESSION_RATIO = 2.4
FALLBACK_TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)


def compression_ratio(text: str) -> float:
    """Bytes of the text over bytes of its zlib compression (OpenAI Whisper's rule; 0 for "")."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _fallback_seed(utt_id: str, temperature: float) -> int:
    digest = hashlib.sha256(f"{utt_id}\0{temperature:.2f}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _RepetitionStop:
    """Force end-of-text on a sequence whose last ``k * n`` tokens are one n-gram repeated ``k``
    times (n = 1..``max_n``), counting only generated tokens (``DecodeOptions.stop_repetitions``)."""

    def __init__(self, repeats: int, eos_id: int, *, max_n: int = REPETITION_MAX_NGRAM):
        self.k, self.eos, self.max_n = int(repeats), int(eos_id), int(max_n)
        self.begin_index: int | None = None

    def set_begin_index(self, begin_index: int) -> None:
        self.begin_index = begin_index

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        gen = input_ids[:, (self.begin_index or 0):]
        hit = torch.zeros(gen.shape[0], dtype=torch.bool, device=gen.device)
        for n in range(1, self.max_n + 1):
            span = n * self.k
            if gen.shape[1] < span:
                break
            tail = gen[:, -span:].reshape(gen.shape[0], self.k, n)
            hit |= (tail == tail[:, :1]).all(-1).all(-1)
        if bool(hit.any()):
            scores = scores.clone()
            scores[hit] = -float("inf")
            scores[hit, self.eos] = 0.0
        return scores


class _SuppressTokens:
    """transformers' ``SuppressTokens(AtBegin)LogitsProcessor`` with its vocabulary mask built once.

    The stock processors rebuild the mask with ``arange`` + ``isin`` over the whole vocabulary at
    every step of every sequence, which on a CPU costs about as much as a tiny decoder step.
    Same result: the listed tokens get ``-inf`` (``at_begin``: only at the first free position).
    """

    def __init__(self, token_ids: Sequence[int], *, at_begin: bool = False):
        self.token_ids = torch.tensor(sorted({int(t) for t in token_ids}), dtype=torch.long)
        self.at_begin = at_begin
        self.begin_index: int | None = None
        self._mask: torch.Tensor | None = None

    def set_begin_index(self, begin_index: int) -> None:
        self.begin_index = begin_index

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at_begin and input_ids.shape[-1] != self.begin_index:
            return scores
        if self._mask is None or self._mask.shape[-1] != scores.shape[-1] or self._mask.device != scores.device:
            mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            ids = self.token_ids[self.token_ids < scores.shape[-1]].to(scores.device)
            mask[ids] = True
            self._mask = mask
        return scores.masked_fill(self._mask, -float("inf"))


class _SharedCrossAttentionCache(EncoderDecoderCache):
    """A beam-search cache that does not reorder the cross-attention keys/values.

    Beam search reorders the cache every step, but beams are only ever picked among the
    hypotheses of one utterance, whose cross-attention keys/values are identical copies; the
    stock cache still copies all of them (batch x beams x 1500 positions per layer) every step.
    """

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.self_attention_cache.reorder_cache(beam_idx)


class Decoder:
    """Turns audio arrays into hypotheses for one model + options (the decoding core).

    Args:
        model: ``WhisperForConditionalGeneration`` on its device and dtype.
        processor: its ``WhisperProcessor``.
        options: :class:`DecodeOptions`.
        encoder_cache: reuse encoder outputs (short-form utterances only).
    """

    def __init__(self, model, processor, options: DecodeOptions, encoder_cache: EncoderCache | None):
        self.model = model
        self.processor = processor
        self.fe = processor.feature_extractor
        self.options = options
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache = encoder_cache
        self.multilingual = is_multilingual(model)
        gc = model.generation_config
        self.id_to_lang = {v: k.strip("<|>") for k, v in (getattr(gc, "lang_to_id", None) or {}).items()}
        self.pad_id = gc.pad_token_id if gc.pad_token_id is not None else model.config.pad_token_id
        self.window_samples = int(self.fe.n_samples)
        self.enc_fp = EncoderCache.fingerprint(model, self.fe) if encoder_cache is not None else None
        self.encoder_calls = 0
        # Short-form generation gets a generation config without the suppress lists and
        # equivalent processors with a precomputed mask instead (see _SuppressTokens). Long-form
        # keeps the stock ones: there the timestamp processor's position among them matters.
        self.suppress = list(getattr(gc, "suppress_tokens", None) or [])
        self.begin_suppress = list(getattr(gc, "begin_suppress_tokens", None) or [])
        self.short_gc = _generation_config(model, keep_suppress=False)
        self.long_gc = _generation_config(model, keep_suppress=True)

    def _beam_cache(self) -> _SharedCrossAttentionCache:
        config = copy.deepcopy(self.model.config)
        config.num_hidden_layers = config.decoder_layers
        return _SharedCrossAttentionCache(DynamicCache(config=config), DynamicCache(config=config))

    def _generate_short(self, enc: BaseModelOutput, frames: int, kwargs: dict) -> torch.Tensor:
        if kwargs.get("num_beams", 1) > 1:
            kwargs = {**kwargs, "cache": self._beam_cache()}
        processors = []
        if self.options.stop_repetitions is not None:
            eos = self.model.generation_config.eos_token_id
            processors.append(_RepetitionStop(self.options.stop_repetitions, eos[0] if isinstance(eos, list) else eos))
        if self.suppress:
            processors.append(_SuppressTokens(self.suppress))
        if self.begin_suppress:
            processors.append(_SuppressTokens(self.begin_suppress, at_begin=True))
        # Whisper's encoder attends to every frame of the 30 s window; the mask says so, so that
        # generate does not have to guess one (pad and end-of-text are one token in Whisper).
        batch = enc.last_hidden_state.shape[0]
        mask = torch.ones(batch, frames, dtype=torch.long, device=self.device)
        with _swapped_generation_config(self.model, self.short_gc):
            return self.model.generate(encoder_outputs=enc, attention_mask=mask,
                                       logits_processor=LogitsProcessorList(processors), **kwargs)

    def _features(self, audios: list[np.ndarray], long_form: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if long_form:
            feats = self.fe(audios, sampling_rate=SAMPLING_RATE, return_tensors="pt", truncation=False,
                            padding="longest", return_attention_mask=True)
            mask = feats["attention_mask"].to(self.device)
        else:
            feats = self.fe(audios, sampling_rate=SAMPLING_RATE, return_tensors="pt")
            mask = None
        return feats["input_features"].to(self.device, self.dtype), mask  # (B, n_mels, frames)

    def _run_encoder(self, features: torch.Tensor) -> torch.Tensor:
        """The encoder on (B, n_mels, frames) features.

        On a CPU it runs one 30 s window at a time: on this project's 2-core machine a window
        costs 0.204 s alone and 0.249 s in a batch of 16 (tiny.en, fp32; cache locality), and
        each utterance's encoder output then does not depend on which others share its batch.
        On a GPU the whole batch goes at once.
        """
        encoder = self.model.get_encoder()
        step = 1 if self.device.type == "cpu" else features.shape[0]
        outs = [encoder(input_features=features[i:i + step]).last_hidden_state
                for i in range(0, features.shape[0], step)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _encode(self, ids: list[str], features: torch.Tensor) -> torch.Tensor:
        """Encoder outputs (B, T, D), computed only for cache misses."""
        if self.cache is None:
            self.encoder_calls += 1
            return self._run_encoder(features)
        found = [self.cache.get((self.enc_fp, i)) for i in ids]
        missing = [k for k, v in enumerate(found) if v is None]
        if missing:
            self.encoder_calls += 1
            self.cache.encoder_calls += 1
            self.cache.encoded += len(missing)
            out = self._run_encoder(features[missing])
            for j, k in enumerate(missing):
                found[k] = out[j]
                self.cache.put((self.enc_fp, ids[k]), out[j].clone())
        return torch.stack([f.to(self.device, self.dtype) for f in found])

    def _detect(self, n: int, **inputs) -> list[str | None]:
        """Language codes a multilingual model detects (the same call ``generate`` makes)."""
        if not self.multilingual or not self.id_to_lang:
            return [None] * n
        ids = self.model.detect_language(**inputs).tolist()
        return [self.id_to_lang.get(i) for i in ids]

    def generate_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Generated token sequences for short-form features ``(B, n_mels, frames)`` (no cache)."""
        kwargs = generate_kwargs(self.model, self.options, long_form=False)
        enc = BaseModelOutput(last_hidden_state=self._run_encoder(features))
        sequences = self._generate_short(enc, features.shape[-1], kwargs)
        return sequences["sequences"] if hasattr(sequences, "sequences") else sequences

    def decode(self, ids: list[str], audios: list[np.ndarray], long_form: bool) -> list[dict]:
        """Hypotheses for one batch: text, token count, languages, generation flags."""
        features, mask = self._features(audios, long_form)
        kwargs = generate_kwargs(self.model, self.options, long_form=long_form)
        if long_form:
            window = self.model.config.max_source_positions * 2
            detected = self._detect(len(ids), input_features=features[:, :, :window])
            self.encoder_calls += 1  # generate's own encoder runs are not counted per window
            with _swapped_generation_config(self.model, self.long_gc):
                sequences = self.model.generate(input_features=features, attention_mask=mask, **kwargs)
        else:
            hidden = self._encode(ids, features)  # (B, T, D)
            enc = BaseModelOutput(last_hidden_state=hidden)
            detected = self._detect(len(ids), encoder_outputs=enc)
            try:
                sequences = self._generate_short(enc, features.shape[-1], kwargs)
            except TypeError as exc:
                # A damaged (pruned) model can emit timestamp tokens although none were asked
                # for; transformers then seeks into a second window, which it can only do from
                # input features, not from encoder outputs. Decode this batch the stock way.
                if "NoneType" not in str(exc):
                    raise
                log.info("batch of %d re-decoded from input features: %s", len(ids), exc)
                frames_mask = torch.ones(features.shape[0], features.shape[-1], dtype=torch.long, device=self.device)
                with _swapped_generation_config(self.model, self.long_gc):
                    sequences = self.model.generate(input_features=features, attention_mask=frames_mask, **kwargs)
        if isinstance(sequences, dict) or hasattr(sequences, "sequences"):
            sequences = sequences["sequences"]
        texts, n_tokens = self._texts(sequences)
        fallback = None
        if self.options.temperature_fallback and not long_form:
            fallback = [self._fallback(ids[k], enc, features[k:k + 1], kwargs, texts[k], n_tokens[k], k)
                        for k in range(len(ids))]
        forced = kwargs.get("language")
        out = []
        for k in range(len(ids)):
            first = texts[k].strip()
            if fallback is not None:
                texts[k], n_tokens[k], temperature = fallback[k]
            out.append({
                "hypothesis": texts[k].strip(),
                "n_tokens": int(n_tokens[k]),
                "hit_token_cap": (not long_form) and int(n_tokens[k]) >= kwargs["max_new_tokens"],
                "language": forced or detected[k] or (None if self.multilingual else "en"),
                "language_detected": detected[k],
                "long_form": long_form,
            })
            if self.options.temperature_fallback:
                out[-1].update(fallback_temperature=temperature if fallback is not None else 0.0,
                               first_hypothesis=first)
        return out

    def _texts(self, sequences: torch.Tensor) -> tuple[list[str], list[int]]:
        """Decoded texts and token counts (tokens before end-of-text) of generated sequences."""
        texts = self.processor.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        if self.pad_id is not None:  # pad == eos for Whisper: counts the tokens before end-of-text
            n_tokens = (sequences != self.pad_id).sum(-1).tolist()
        else:
            n_tokens = [sequences.shape[-1]] * sequences.shape[0]
        return texts, [int(n) for n in n_tokens]

    def _fallback(self, utt_id: str, enc: BaseModelOutput, features: torch.Tensor, kwargs: dict,
                  text: str, n_tokens: int, k: int) -> tuple[str, int, float]:
        """(text, tokens, temperature) after Whisper's temperature fallback for utterance ``k`` of
        the batch (see ``DecodeOptions.temperature_fallback``)."""
        temperature = 0.0
        one = BaseModelOutput(last_hidden_state=enc.last_hidden_state[k:k + 1])
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        for t in FALLBACK_TEMPERATURES:
            if compression_ratio(text.strip()) <= FALLBACK_COMPRESSION_RATIO:
                break
            sampled = {**kwargs, "do_sample": True, "temperature": t, "num_beams": 1}
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(_fallback_seed(utt_id, t))
                try:
                    sequences = self._generate_short(one, features.shape[-1], sampled)
                except TypeError as exc:  # timestamp tokens of a damaged model (see decode)
                    if "NoneType" not in str(exc):
                        raise
                    mask = torch.ones(1, features.shape[-1], dtype=torch.long, device=self.device)
                    with _swapped_generation_config(self.model, self.long_gc):
                        sequences = self.model.generate(input_features=features, attention_mask=mask, **sampled)
            if isinstance(sequences, dict) or hasattr(sequences, "sequences"):
                sequences = sequences["sequences"]
            texts, counts = self._texts(sequences)
            text, n_tokens, temperature = texts[0], counts[0], t
        return text, n_tokens, temperature
