"""Evaluation: transcribe a speech set with Whisper, normalise, count errors, and compare runs.

The pieces, in the order a run uses them:

- :class:`DecodeOptions` is the decoding spec (protocol, beam size, batch size, dtype, device,
  token cap, language), validated once when it is built and written into every result.
- :func:`evaluate` loads audio in worker threads, batches utterances by length, computes log-mel
  features with the processor's feature extractor, runs the encoder (through an optional
  :class:`EncoderCache`) and ``model.generate`` under ``torch.inference_mode``, then scores each
  utterance and appends it to ``utterances.jsonl`` as it goes. ``summary.json`` is written at the
  end. A rerun into the same directory resumes where it stopped.
- :func:`score` / :func:`score_utterance` count word errors with ``jiwer.process_words`` and
  character errors with ``jiwer.process_characters`` after one normaliser applied to both sides.
- :func:`bootstrap_ci` and :func:`compare` give confidence intervals and a paired test.

Protocols (recorded as ``protocol`` in every result):

``standard``
    The Open ASR leaderboard's way: multilingual models are forced to English
    (``language="en"``, ``task="transcribe"``; ``DecodeOptions.language`` overrides the language),
    no timestamps, greedy search (``beam_size`` 1 unless set), temperature 0 without fallback.
``paper``
    What the study's authors ran: plain ``model.generate(features)`` with the checkpoint's
    generation-config defaults, so a multilingual model detects the language itself. Only the
    beam size and token cap of the options are passed (and ``language`` when it is set;
    utterances over 30 s get ``return_timestamps=True``, which long-form generation requires,
    where the authors' pipeline silently truncated them to 30 s).

Utterances longer than the model's 30 s window are never truncated: they are decoded whole with
transformers' sequential long-form generation (full-length features, ``attention_mask``,
timestamps on, as that algorithm requires), in batches of their own after the short ones. This
is the one place where the ``standard`` protocol predicts timestamp tokens (they are removed
from the text). Long-form utterances bypass the :class:`EncoderCache`.

Per-utterance diagnostics (see :func:`detect_hallucination`): the detected language of a
multilingual model, the insertion count, and a hallucination flag with its reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jiwer
import numpy as np
import torch

from .manifests import AudioError, Utterance, fingerprint as data_fingerprint, load_audio
from .models import model_fingerprint

log = logging.getLogger(__name__)

__all__ = [
    "PROTOCOLS",
    "DTYPES",
    "DecodeOptions",
    "ErrorCounts",
    "WerResult",
    "Comparison",
    "EncoderCache",
    "RunMismatchError",
    "evaluate",
    "score",
    "score_utterance",
    "bootstrap_ci",
    "paired_bootstrap",
    "permutation_pvalue",
    "compare",
    "load_result",
    "detect_hallucination",
    "default_normalizer",
]

PROTOCOLS = ("standard", "paper")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
SAMPLING_RATE = 16000
# Bumped when a change to this module can change a transcript or a count, so that a resumed run
# never mixes rows of two implementations.
_SCORING_VERSION = 1

UTTERANCES_FILE = "utterances.jsonl"
SUMMARY_FILE = "summary.json"
RUN_FILE = "run.json"


# ------------------------------------------------------------------------------------------------
# options
# ------------------------------------------------------------------------------------------------


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
            positions after a 4-token prompt).
        language: language for multilingual models (``standard``: default ``"en"``; ``paper``:
            default ``None`` = detect).
        num_workers: threads that load and resample audio ahead of the decoder (0 = inline).
        long_form_batch_size: utterances per long-form (> 30 s) ``generate`` call.

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

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {self.protocol!r}")
        dtype = str(self.dtype).removeprefix("torch.")
        dtype = _DTYPE_ALIASES.get(dtype, dtype)
        if dtype not in DTYPES:
            allowed = sorted(DTYPES) + sorted(_DTYPE_ALIASES)
            raise ValueError(f"dtype must be one of {allowed}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        for name, low in (("beam_size", 1), ("batch_size", 1), ("max_new_tokens", 1),
                          ("long_form_batch_size", 1), ("num_workers", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.max_new_tokens > 448:
            raise ValueError(f"max_new_tokens must be <= 448 (Whisper's decoder positions), got {self.max_new_tokens}")
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
        return DTYPES[self.dtype]

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
        }


class RunMismatchError(ValueError):
    """An output directory holds results of a different run (other model, data or options)."""


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorCounts:
    """Word and character edit counts; corpus metrics are derived from summed counts.

    ``wer = (S + D + I) / (S + D + H)`` over all reference words (not a mean of per-utterance
    WERs); ``cer`` likewise over characters (spaces included, as ``jiwer.cer``).
    """

    ref_words: int = 0
    hits: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    ref_chars: int = 0
    char_hits: int = 0
    char_substitutions: int = 0
    char_deletions: int = 0
    char_insertions: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def char_errors(self) -> int:
        return self.char_substitutions + self.char_deletions + self.char_insertions

    @property
    def wer(self) -> float:
        return _ratio(self.errors, self.ref_words)

    @property
    def cer(self) -> float:
        return _ratio(self.char_errors, self.ref_chars)

    def __add__(self, other: "ErrorCounts") -> "ErrorCounts":
        return ErrorCounts(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["errors"] = self.errors
        d["char_errors"] = self.char_errors
        return d

    @classmethod
    def from_row(cls, row: Mapping) -> "ErrorCounts":
        return cls(**{f.name: int(row.get(f.name, 0) or 0) for f in dataclasses.fields(cls)})


def _ratio(num: float, den: float) -> float:
    """num/den with the edge cases of an empty reference: 0/0 = 0, x/0 = inf."""
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def default_normalizer(processor=None) -> tuple[Callable[[str], str], str]:
    """Whisper's English normaliser and its name.

    ``processor.tokenizer.normalize`` when the tokenizer carries the English spelling map
    (``normalizer.json``), otherwise the same ``EnglishTextNormalizer`` from the
    ``whisper-normalizer`` package (which ships the map).

    Returns:
        (callable, name) where the name is recorded in results.
    """
    tok = getattr(processor, "tokenizer", None)
    if tok is not None and getattr(tok, "english_spelling_normalizer", None):
        return tok.normalize, "transformers.WhisperTokenizer.normalize"
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer(), "whisper_normalizer.english.EnglishTextNormalizer"


def score_utterance(reference: str, hypothesis: str, normalizer: Callable[[str], str] | None) -> dict:
    """Normalise both sides and count word and character edits for one utterance.

    Args:
        reference: reference text as the data gives it.
        hypothesis: decoded text.
        normalizer: applied to both sides; ``None`` leaves the text as it is (whitespace is
            still collapsed).

    Returns:
        dict with ``reference_norm``, ``hypothesis_norm`` and the :class:`ErrorCounts` fields.
        An empty reference scores every hypothesis word as an insertion; an empty hypothesis
        every reference word as a deletion.
    """
    norm = normalizer or (lambda s: s)
    ref = " ".join(norm(reference or "").split())
    hyp = " ".join(norm(hypothesis or "").split())
    words = jiwer.process_words(ref, hyp)
    chars = jiwer.process_characters(ref, hyp)
    counts = ErrorCounts(
        ref_words=words.hits + words.substitutions + words.deletions,
        hits=words.hits,
        substitutions=words.substitutions,
        deletions=words.deletions,
        insertions=words.insertions,
        ref_chars=chars.hits + chars.substitutions + chars.deletions,
        char_hits=chars.hits,
        char_substitutions=chars.substitutions,
        char_deletions=chars.deletions,
        char_insertions=chars.insertions,
    )
    return {"reference_norm": ref, "hypothesis_norm": hyp, **dataclasses.asdict(counts)}


def score(
    references: Sequence[str], hypotheses: Sequence[str], normalizer: Callable[[str], str] | None
) -> ErrorCounts:
    """Corpus error counts of paired references and hypotheses (one normaliser on both sides).

    Raises:
        ValueError: when the two sequences differ in length.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"score needs as many hypotheses as references, got {len(hypotheses)} and {len(references)}")
    total = ErrorCounts()
    for ref, hyp in zip(references, hypotheses):
        total = total + ErrorCounts.from_row(score_utterance(ref, hyp, normalizer))
    return total


def _longest_loop(words: Sequence[str], max_n: int = 10) -> tuple[tuple[str, ...], int]:
    """The n-gram (n <= max_n) with the most back-to-back repeats, and that repeat count."""
    best: tuple[tuple[str, ...], int] = ((), 0)
    best_len = 0
    for n in range(1, max_n + 1):
        run = 0
        for i in range(len(words) - n):
            run = run + 1 if words[i] == words[i + n] else 0
            if run:
                repeats = (run + n) // n
                if repeats >= 2 and repeats * n > best_len:
                    start = i + n - (repeats * n) + 1
                    best = (tuple(words[start:start + n]), repeats)
                    best_len = repeats * n
    return best


def _repeats_of(words: Sequence[str], gram: tuple[str, ...]) -> int:
    """Most back-to-back repeats of ``gram`` in ``words``."""
    n, best, i = len(gram), 0, 0
    if n == 0:
        return 0
    while i <= len(words) - n:
        r = 0
        while tuple(words[i + r * n:i + (r + 1) * n]) == gram:
            r += 1
        best = max(best, r)
        i += max(1, r * n)
    return best


def detect_hallucination(
    reference_norm: str, hypothesis_norm: str, *, hit_token_cap: bool = False
) -> str | None:
    """Why a hypothesis looks like a hallucination, or None.

    Reasons (joined by ``+`` when several apply):

    - ``ngram_loop``: an n-gram (1 <= n <= 10) repeated back to back at least 4 times covering
      at least 6 words (so a single word needs 6 repeats), where the reference does not repeat
      that n-gram as often (``ha ha ha ha ha ha`` in both is not flagged);
    - ``too_long``: more than ``2 * reference words + 10`` hypothesis words;
    - ``token_cap``: generation stopped at ``max_new_tokens`` instead of end-of-text.
    """
    ref, hyp = reference_norm.split(), hypothesis_norm.split()
    reasons = []
    gram, repeats = _longest_loop(hyp)
    if repeats >= 4 and repeats * len(gram) >= 6 and _repeats_of(ref, gram) < repeats:
        reasons.append("ngram_loop")
    if len(hyp) > 2 * len(ref) + 10:
        reasons.append("too_long")
    if hit_token_cap:
        reasons.append("token_cap")
    return "+".join(reasons) or None


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------


def _group_sums(values: np.ndarray, groups: Sequence | None) -> np.ndarray:
    """Sum rows of ``values`` (n, k) per group label; None -> one group per row."""
    if groups is None:
        return values
    labels, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    out = np.zeros((len(labels), values.shape[1]), dtype=np.float64)
    np.add.at(out, inverse, values)
    return out


def bootstrap_ci(
    errors: Sequence[float],
    ref_words: Sequence[float],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    groups: Sequence | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of corpus WER (sum errors / sum words) over utterances.

    Args:
        errors: per-utterance edit counts, shape (n,).
        ref_words: per-utterance reference word counts, shape (n,).
        n_resamples: bootstrap resamples.
        confidence: two-sided coverage, e.g. 0.95.
        seed: seed of ``numpy.random.default_rng``; same inputs + seed give the same interval.
        groups: optional label per utterance (e.g. speaker); whole groups are resampled,
            which widens the interval when utterances of one speaker are correlated.

    Returns:
        (low, high) as fractions.

    Raises:
        ValueError: on mismatched lengths, no utterances, or bad confidence / n_resamples.
    """
    e = np.asarray(errors, dtype=np.float64)
    w = np.asarray(ref_words, dtype=np.float64)
    if e.shape != w.shape or e.ndim != 1:
        raise ValueError(f"errors and ref_words must be 1-D of equal length, got {e.shape} and {w.shape}")
    if len(e) == 0:
        raise ValueError("bootstrap_ci needs at least one utterance")
    if groups is not None and len(groups) != len(e):
        raise ValueError(f"groups must have one label per utterance, got {len(groups)} for {len(e)}")
    _check_stats_args(n_resamples, confidence)
    units = _group_sums(np.stack([e, w], axis=1), groups)  # (u, 2)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    for start in range(0, n_resamples, 256):
        stop = min(n_resamples, start + 256)
        idx = rng.integers(0, len(units), size=(stop - start, len(units)))
        sums = units[idx].sum(axis=1)  # (r, 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            stats[start:stop] = sums[:, 0] / sums[:, 1]
    stats = stats[np.isfinite(stats)]
    if len(stats) == 0:
        return (math.nan, math.nan)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return (float(low), float(high))


def _check_stats_args(n: int, confidence: float) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of resamples must be a positive integer, got {n!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")


def paired_bootstrap(
    errors_a: Sequence[float],
    errors_b: Sequence[float],
    ref_words: Sequence[float],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    groups: Sequence | None = None,
) -> tuple[float, float]:
    """Percentile interval of delta WER (b - a) with the same utterances resampled for both.

    Args: as :func:`bootstrap_ci`, with per-utterance errors of system a and b, shape (n,).

    Returns:
        (low, high) of ``sum(errors_b - errors_a) / sum(ref_words)`` over resamples.
    """
    a = np.asarray(errors_a, dtype=np.float64)
    b = np.asarray(errors_b, dtype=np.float64)
    w = np.asarray(ref_words, dtype=np.float64)
    if not (a.shape == b.shape == w.shape) or a.ndim != 1 or len(a) == 0:
        raise ValueError(
            f"errors_a, errors_b and ref_words must be 1-D of one non-zero length, got {a.shape}, {b.shape}, {w.shape}"
        )
    return bootstrap_ci(b - a, w, n_resamples=n_resamples, confidence=confidence, seed=seed, groups=groups)


def permutation_pvalue(
    errors_a: Sequence[float],
    errors_b: Sequence[float],
    *,
    n_permutations: int = 10000,
    seed: int = 0,
    groups: Sequence | None = None,
) -> float:
    """Two-sided paired permutation (approximate randomisation) p-value of delta WER.

    Under the null hypothesis the two systems are exchangeable on each utterance, so the sign
    of each per-utterance difference ``d_i = errors_b_i - errors_a_i`` is flipped at random.
    Both systems share the reference word count, so delta WER is proportional to ``sum(d)``
    and ``p = (1 + #{|sum(s * d)| >= |sum(d)|}) / (1 + n_permutations)``. Identical systems
    give ``p = 1``. With ``groups``, whole groups (speakers) are flipped together.

    Returns:
        p in (0, 1].
    """
    a = np.asarray(errors_a, dtype=np.float64)
    b = np.asarray(errors_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"errors_a and errors_b must be 1-D of one non-zero length, got {a.shape} and {b.shape}")
    _check_stats_args(n_permutations, 0.5)
    d = _group_sums((b - a)[:, None], groups)[:, 0]
    observed = abs(d.sum())
    if observed == 0:
        return 1.0
    rng = np.random.default_rng(seed)
    extreme = 0
    # Tolerance so that a permutation equal to the observed sum up to rounding counts as extreme.
    tol = 1e-9 * max(1.0, observed)
    for start in range(0, n_permutations, 1000):
        k = min(1000, n_permutations - start)
        signs = rng.integers(0, 2, size=(k, len(d)), dtype=np.int8) * 2 - 1
        extreme += int((np.abs(signs @ d) >= observed - tol).sum())
    return (1 + extreme) / (1 + n_permutations)


# ------------------------------------------------------------------------------------------------
# encoder-output reuse
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------


@dataclass
class WerResult:
    """A scored run: corpus metrics, per-utterance rows (input order) and the summary dict.

    ``wer``/``cer`` and intervals are fractions. ``rows`` hold what ``utterances.jsonl`` holds.
    """

    wer: float
    cer: float
    wer_ci: tuple[float, float]
    cer_ci: tuple[float, float]
    counts: ErrorCounts
    n_utterances: int
    n_failed: int
    rows: list[dict]
    summary: dict
    out_dir: Path | None = None

    def to_dict(self) -> dict:
        return self.summary

    def scored_rows(self) -> list[dict]:
        return [r for r in self.rows if not r.get("failed")]


def _finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def _summarize(
    rows: list[dict],
    *,
    bootstrap_n: int,
    bootstrap_seed: int,
    bootstrap_speakers: bool,
    confidence: float = 0.95,
) -> dict:
    """Corpus metrics of scored rows (failed rows are counted, not scored)."""
    scored = [r for r in rows if not r.get("failed")]
    counts = ErrorCounts()
    for r in scored:
        counts = counts + ErrorCounts.from_row(r)
    out: dict[str, Any] = {
        "wer": _finite(counts.wer),
        "cer": _finite(counts.cer),
        "wer_ci": [None, None],
        "cer_ci": [None, None],
        "n_utterances": len(scored),
        "n_failed": len(rows) - len(scored),
        "counts": counts.to_dict(),
    }
    if scored:
        groups = [r.get("speaker") or r["id"] for r in scored] if bootstrap_speakers else None
        kw = dict(n_resamples=bootstrap_n, seed=bootstrap_seed, groups=groups, confidence=confidence)
        counts_each = [ErrorCounts.from_row(r) for r in scored]
        wlo, whi = bootstrap_ci([c.errors for c in counts_each], [c.ref_words for c in counts_each], **kw)
        clo, chi = bootstrap_ci([c.char_errors for c in counts_each], [c.ref_chars for c in counts_each], **kw)
        out["wer_ci"] = [_finite(wlo), _finite(whi)]
        out["cer_ci"] = [_finite(clo), _finite(chi)]
    out["bootstrap"] = {
        "n_resamples": bootstrap_n,
        "seed": bootstrap_seed,
        "confidence": confidence,
        "unit": "speaker" if bootstrap_speakers else "utterance",
        "method": "percentile",
    }
    languages: dict[str, int] = {}
    for r in scored:
        lang = r.get("language_detected") or r.get("language")
        if lang:
            languages[lang] = languages.get(lang, 0) + 1
    out["languages"] = languages
    flagged = [r for r in scored if r.get("hallucination")]
    out["n_hallucination"] = len(flagged)
    out["hallucination_ids"] = [r["id"] for r in flagged][:50]
    out["n_empty_reference"] = sum(1 for r in scored if r.get("ref_words", 0) == 0)
    out["failures"] = [{"id": r["id"], "reason": r.get("failure")} for r in rows if r.get("failed")][:200]
    return out


def load_result(out_dir: str | os.PathLike) -> WerResult:
    """Read a finished (or partial) evaluation directory back into a :class:`WerResult`.

    Raises:
        FileNotFoundError: when the directory has no ``utterances.jsonl``.
    """
    out_dir = Path(out_dir)
    rows_path = out_dir / UTTERANCES_FILE
    if not rows_path.is_file():
        raise FileNotFoundError(f"{rows_path} not found: is {out_dir} an `asrprune evaluate` output directory?")
    rows = _read_rows(rows_path)
    summary_path = out_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    order = summary.get("order")
    if order:
        pos = {i: k for k, i in enumerate(order)}
        rows.sort(key=lambda r: pos.get(r["id"], len(pos)))
    bs = summary.get("bootstrap", {})
    stats = _summarize(rows, bootstrap_n=bs.get("n_resamples", 1000), bootstrap_seed=bs.get("seed", 0),
                       bootstrap_speakers=bs.get("unit") == "speaker")
    merged = {**stats, **{k: v for k, v in summary.items() if k not in stats}}
    return _result_from(merged, rows, out_dir)


def _result_from(summary: dict, rows: list[dict], out_dir: Path | None) -> WerResult:
    def num(x):
        return math.nan if x is None else float(x)

    return WerResult(
        wer=num(summary["wer"]),
        cer=num(summary["cer"]),
        wer_ci=tuple(num(x) for x in summary["wer_ci"]),
        cer_ci=tuple(num(x) for x in summary["cer_ci"]),
        counts=ErrorCounts(**{k: summary["counts"][k] for k in (f.name for f in dataclasses.fields(ErrorCounts))}),
        n_utterances=summary["n_utterances"],
        n_failed=summary["n_failed"],
        rows=rows,
        summary=summary,
        out_dir=out_dir,
    )


def _read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (interrupted write) is dropped with a warning."""
    rows, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    if bad:
        log.warning("%s: ignored %d unreadable line(s) (an interrupted write); they are redone", path, bad)
    return rows


# ------------------------------------------------------------------------------------------------
# comparison
# ------------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """Paired comparison of run b against run a on the same utterances.

    ``delta_wer = wer_b - wer_a`` (negative: b is better), with a paired bootstrap interval and
    a paired permutation p-value. ``top`` lists the 5 utterances that contribute most to the
    delta in its direction, with ``top_share`` their part of it (1.0 = the whole delta; above 1
    when the other utterances move the other way), and ``delta_wer_without_top`` the delta with
    them left out.
    """

    n_utterances: int
    wer_a: float
    wer_b: float
    delta_wer: float
    delta_ci: tuple[float, float]
    p_value: float
    cer_a: float
    cer_b: float
    top: list[dict]
    top_share: float | None
    delta_wer_without_top: float | None
    n_excluded_failed: int
    n_improved: int
    n_worsened: int
    settings: dict = field(default_factory=dict)
    a: dict = field(default_factory=dict)
    b: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("wer_a", "wer_b", "delta_wer", "cer_a", "cer_b", "top_share", "delta_wer_without_top"):
            d[k] = _finite(d[k]) if d[k] is not None else None
        d["delta_ci"] = [_finite(x) for x in self.delta_ci]
        return d


def _as_result(x) -> WerResult:
    return x if isinstance(x, WerResult) else load_result(x)


def compare(
    a: "WerResult | str | os.PathLike",
    b: "WerResult | str | os.PathLike",
    *,
    n_resamples: int = 1000,
    n_permutations: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
    by_speaker: bool = False,
    top_k: int = 5,
) -> Comparison:
    """Compare two evaluation runs on the same utterance ids.

    Utterances that failed (audio error) in either run are left out of both and counted in
    ``n_excluded_failed``.

    Args:
        a, b: :class:`WerResult` or evaluation output directories; delta is ``b - a``.
        n_resamples: paired bootstrap resamples for the interval.
        n_permutations: sign flips for the p-value (see :func:`permutation_pvalue`).
        seed: seeds both the bootstrap and the permutations.
        by_speaker: resample / flip whole speakers instead of utterances.
        top_k: how many utterances the concentration figure uses.

    Returns:
        :class:`Comparison`.

    Raises:
        ValueError: when the id sets differ (naming the counts and a few ids) or when the
            normalised references differ (different data or normaliser).
    """
    ra, rb = _as_result(a), _as_result(b)
    rows_a = {r["id"]: r for r in ra.rows}
    rows_b = {r["id"]: r for r in rb.rows}
    only_a = sorted(set(rows_a) - set(rows_b))
    only_b = sorted(set(rows_b) - set(rows_a))
    if only_a or only_b:
        raise ValueError(
            f"compare needs the same utterances in both runs: A has {len(rows_a)}, B has {len(rows_b)}; "
            f"{len(only_a)} only in A (e.g. {only_a[:3]}), {len(only_b)} only in B (e.g. {only_b[:3]}). "
            "Evaluate both on the same data with the same --limit/--sample/--include."
        )
    ids = [r["id"] for r in ra.rows]
    excluded = [i for i in ids if rows_a[i].get("failed") or rows_b[i].get("failed")]
    ids = [i for i in ids if i not in set(excluded)]
    if not ids:
        raise ValueError("compare: no utterance was scored in both runs")
    mismatched = [i for i in ids if rows_a[i].get("reference_norm") != rows_b[i].get("reference_norm")]
    if mismatched:
        raise ValueError(
            f"compare: the normalised references differ for {len(mismatched)} of {len(ids)} utterances "
            f"(e.g. {mismatched[:3]}); the runs used different data or normalisers"
        )
    ca = [ErrorCounts.from_row(rows_a[i]) for i in ids]
    cb = [ErrorCounts.from_row(rows_b[i]) for i in ids]
    ea = np.array([c.errors for c in ca], dtype=np.float64)
    eb = np.array([c.errors for c in cb], dtype=np.float64)
    w = np.array([c.ref_words for c in ca], dtype=np.float64)
    total_w = w.sum()
    tot_a = sum(ca, ErrorCounts())
    tot_b = sum(cb, ErrorCounts())
    groups = [rows_a[i].get("speaker") or i for i in ids] if by_speaker else None
    d = eb - ea
    delta = _ratio(d.sum(), total_w) if d.sum() else 0.0
    ci = paired_bootstrap(ea, eb, w, n_resamples=n_resamples, confidence=confidence, seed=seed, groups=groups)
    p = permutation_pvalue(ea, eb, n_permutations=n_permutations, seed=seed, groups=groups)
    top: list[dict] = []
    share = without = None
    if d.sum() != 0:
        direction = np.sign(d.sum())
        order = np.argsort(-direction * d, kind="stable")[:top_k]
        order = [k for k in order if d[k] * direction > 0]
        top = [
            {
                "id": ids[k],
                "delta_errors": int(d[k]),
                "errors_a": int(ea[k]),
                "errors_b": int(eb[k]),
                "ref_words": int(w[k]),
                "hallucination_a": rows_a[ids[k]].get("hallucination"),
                "hallucination_b": rows_b[ids[k]].get("hallucination"),
            }
            for k in order
        ]
        top_sum = float(sum(d[k] for k in order))
        share = top_sum / float(d.sum())
        rest_w = total_w - sum(w[k] for k in order)
        without = _ratio(float(d.sum()) - top_sum, rest_w) if rest_w else None
    return Comparison(
        n_utterances=len(ids),
        wer_a=tot_a.wer,
        wer_b=tot_b.wer,
        delta_wer=delta,
        delta_ci=ci,
        p_value=p,
        cer_a=tot_a.cer,
        cer_b=tot_b.cer,
        top=top,
        top_share=share,
        delta_wer_without_top=without,
        n_excluded_failed=len(excluded),
        n_improved=int((d < 0).sum()),
        n_worsened=int((d > 0).sum()),
        settings={
            "n_resamples": n_resamples,
            "n_permutations": n_permutations,
            "confidence": confidence,
            "seed": seed,
            "unit": "speaker" if by_speaker else "utterance",
            "interval": "paired percentile bootstrap of sum(errors_b - errors_a) / sum(ref_words)",
            "p_value": "two-sided paired permutation test (random sign flips of per-unit error differences)",
            "top_k": top_k,
        },
        a=_run_label(ra),
        b=_run_label(rb),
    )


def _run_label(r: WerResult) -> dict:
    s = r.summary
    return {
        "out_dir": str(r.out_dir) if r.out_dir else None,
        "model": s.get("model"),
        "protocol": s.get("protocol"),
        "data": s.get("data"),
    }


# ------------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------------


def _is_multilingual(model) -> bool:
    gc = model.generation_config
    flag = getattr(gc, "is_multilingual", None)
    if flag is not None:
        return bool(flag)
    return len(getattr(gc, "lang_to_id", None) or {}) > 1


def _generate_kwargs(model, options: DecodeOptions, *, long_form: bool) -> dict:
    """The keyword arguments ``generate`` gets under the options' protocol."""
    multilingual = _is_multilingual(model)
    # The prompt (start, [language, task,] no-timestamps) and the new tokens share the decoder's
    # positions; more new tokens than fit would index past the position table.
    prompt_len = 4 if multilingual else 2
    max_new = max(1, min(options.max_new_tokens, model.config.max_target_positions - prompt_len))
    kw: dict[str, Any] = {"max_new_tokens": max_new, "num_beams": options.beam_size}
    if options.protocol == "standard":
        kw.update(do_sample=False, temperature=0.0, condition_on_prev_tokens=False)
        # Long-form generation needs timestamp tokens to move its 30 s window.
        kw["return_timestamps"] = bool(long_form)
        if multilingual:
            kw.update(language=options.language or "en", task="transcribe")
    else:
        if options.language and multilingual:
            kw["language"] = options.language
        if long_form:
            # The authors' pipeline truncated audio to 30 s (the feature extractor's default);
            # we never truncate, and transformers' long-form algorithm needs timestamp tokens.
            kw["return_timestamps"] = True
    if not multilingual and options.language not in (None, "en", "english"):
        raise ValueError(f"language={options.language!r} was set, but the model is English-only")
    return kw


def _env_stamp(device: torch.device) -> dict:
    import transformers

    try:
        from importlib.metadata import version

        asr_version = version("asrprune")
    except Exception:  # pragma: no cover - not installed
        asr_version = None
    stamp = {
        "asrprune": asr_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "jiwer": getattr(jiwer, "__version__", None) or _pkg_version("jiwer"),
        "numpy": np.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        stamp["cuda_device"] = torch.cuda.get_device_name(device)
        stamp["cuda"] = torch.version.cuda
    return stamp


def _pkg_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def _load_one(utt: Utterance) -> np.ndarray | AudioError:
    try:
        return load_audio(utt, SAMPLING_RATE)
    except AudioError as exc:
        return exc
    except Exception as exc:  # a decoder library error must fail one utterance, not the run
        return AudioError(utt.id, utt.audio, f"{type(exc).__name__}: {exc}")


def _loaded_batches(
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


class _Decoder:
    """Turns audio arrays into hypotheses for one model + options (the decoding core)."""

    def __init__(self, model, processor, options: DecodeOptions, encoder_cache: EncoderCache | None):
        self.model = model
        self.processor = processor
        self.fe = processor.feature_extractor
        self.options = options
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache = encoder_cache
        self.multilingual = _is_multilingual(model)
        gc = model.generation_config
        self.id_to_lang = {v: k.strip("<|>") for k, v in (getattr(gc, "lang_to_id", None) or {}).items()}
        self.pad_id = gc.pad_token_id if gc.pad_token_id is not None else model.config.pad_token_id
        self.window_samples = int(self.fe.n_samples)
        self.enc_fp = EncoderCache.fingerprint(model, self.fe) if encoder_cache is not None else None
        self.encoder_calls = 0
        # Short-form generation swaps in a generation config without the suppress lists and gets
        # equivalent processors with a precomputed mask instead (see _SuppressTokens). Long-form
        # keeps the stock ones: there the timestamp processor's position among them matters.
        self.suppress = list(getattr(gc, "suppress_tokens", None) or [])
        self.begin_suppress = list(getattr(gc, "begin_suppress_tokens", None) or [])
        self.fast_gc = None
        if self.suppress or self.begin_suppress:
            import copy

            self.fast_gc = copy.deepcopy(gc)
            self.fast_gc.suppress_tokens = None
            self.fast_gc.begin_suppress_tokens = None

    def _beam_cache(self):
        """A cache for beam search that does not reorder the cross-attention keys/values.

        Beam search reorders the cache every step, but beams are only ever picked among the
        hypotheses of one utterance, whose cross-attention keys/values are identical copies; the
        stock cache still copies all of them (batch x beams x 1500 positions per layer) every step.
        """
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        class _SharedCrossAttentionCache(EncoderDecoderCache):
            def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
                self.self_attention_cache.reorder_cache(beam_idx)

        import copy

        config = copy.deepcopy(self.model.config)
        config.num_hidden_layers = config.decoder_layers
        return _SharedCrossAttentionCache(DynamicCache(config=config), DynamicCache(config=config))

    def _generate_short(self, enc, kwargs: dict) -> torch.Tensor:
        if kwargs.get("num_beams", 1) > 1:
            kwargs = {**kwargs, "cache": self._beam_cache()}
        if self.fast_gc is None:
            return self.model.generate(encoder_outputs=enc, **kwargs)
        from transformers import LogitsProcessorList

        processors = []
        if self.suppress:
            processors.append(_SuppressTokens(self.suppress))
        if self.begin_suppress:
            processors.append(_SuppressTokens(self.begin_suppress, at_begin=True))
        original = self.model.generation_config
        self.model.generation_config = self.fast_gc
        try:
            return self.model.generate(encoder_outputs=enc, logits_processor=LogitsProcessorList(processors), **kwargs)
        finally:
            self.model.generation_config = original

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

    def decode(self, ids: list[str], audios: list[np.ndarray], long_form: bool) -> list[dict]:
        """Hypotheses for one batch: text, token count, languages, generation flags."""
        from transformers.modeling_outputs import BaseModelOutput

        features, mask = self._features(audios, long_form)
        kwargs = _generate_kwargs(self.model, self.options, long_form=long_form)
        if long_form:
            window = self.model.config.max_source_positions * 2
            detected = self._detect(len(ids), input_features=features[:, :, :window])
            self.encoder_calls += 1  # generate's own encoder runs are not counted per window
            sequences = self.model.generate(input_features=features, attention_mask=mask, **kwargs)
        else:
            hidden = self._encode(ids, features)  # (B, T, D)
            enc = BaseModelOutput(last_hidden_state=hidden)
            detected = self._detect(len(ids), encoder_outputs=enc)
            try:
                sequences = self._generate_short(enc, kwargs)
            except TypeError as exc:
                # A damaged (pruned) model can emit timestamp tokens although none were asked
                # for; transformers then seeks into a second window, which it can only do from
                # input features, not from encoder outputs. Decode this batch the stock way.
                if "NoneType" not in str(exc):
                    raise
                log.info("batch of %d re-decoded from input features: %s", len(ids), exc)
                sequences = self.model.generate(input_features=features, **kwargs)
        if isinstance(sequences, dict) or hasattr(sequences, "sequences"):
            sequences = sequences["sequences"]
        texts = self.processor.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        if self.pad_id is not None:  # pad == eos for Whisper: counts the tokens before end-of-text
            n_tokens = (sequences != self.pad_id).sum(-1).tolist()
        else:
            n_tokens = [sequences.shape[-1]] * len(ids)
        forced = kwargs.get("language")
        out = []
        for k in range(len(ids)):
            out.append({
                "hypothesis": texts[k].strip(),
                "n_tokens": int(n_tokens[k]),
                "hit_token_cap": (not long_form) and int(n_tokens[k]) >= kwargs["max_new_tokens"],
                "language": forced or detected[k] or (None if self.multilingual else "en"),
                "language_detected": detected[k],
                "long_form": long_form,
            })
        return out


def _run_key(model_fp: str, data_fp: str, options: DecodeOptions, normalizer_name: str) -> dict:
    return {
        "model_fingerprint": model_fp,
        "data_fingerprint": data_fp,
        "options": options.run_key(),
        "normalizer": normalizer_name,
        "scoring_version": _SCORING_VERSION,
    }


def _diff_keys(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += _diff_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k} ({a!r} -> {b!r})")
    return diffs


def _prepare_out_dir(out_dir: Path, key: dict, overwrite: bool) -> dict[str, dict]:
    """Create or validate the output directory; return the rows already finished (by id)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run_path, rows_path = out_dir / RUN_FILE, out_dir / UTTERANCES_FILE
    if overwrite:
        for name in (RUN_FILE, UTTERANCES_FILE, SUMMARY_FILE):
            (out_dir / name).unlink(missing_ok=True)
    if run_path.is_file():
        old = json.loads(run_path.read_text())
        diffs = _diff_keys(old, key)
        if diffs:
            raise RunMismatchError(
                f"{out_dir} holds results of a different run (differs in: {'; '.join(diffs)}); "
                "use a new --out directory, or --overwrite to discard them"
            )
    elif rows_path.is_file() and rows_path.stat().st_size > 0:
        raise RunMismatchError(
            f"{rows_path} exists but {run_path} does not, so it cannot be resumed safely; "
            "use a new --out directory, or --overwrite to discard it"
        )
    _atomic_write(run_path, json.dumps(key, indent=2) + "\n")
    done: dict[str, dict] = {}
    if rows_path.is_file():
        rows = _read_rows(rows_path)
        # Failed rows (unreadable audio) are retried: the file may have been fixed meanwhile.
        done = {r["id"]: r for r in rows if "id" in r and not r.get("failed")}
        # Rewrite without torn lines so that appending continues on a clean line.
        _atomic_write(rows_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()))
    return done


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _failed_row(utt: Utterance, reason: str) -> dict:
    return {
        "id": utt.id,
        "audio": str(utt.audio),
        "speaker": utt.speaker,
        "reference": utt.text,
        "duration_s": utt.duration_s,
        "failed": True,
        "failure": reason,
    }


def evaluate(
    model,
    processor,
    utterances,
    options: DecodeOptions | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    encoder_cache: EncoderCache | None = None,
    normalizer: Callable[[str], str] | None = None,
    normalizer_name: str | None = None,
    model_spec: str | None = None,
    data_name: str | None = None,
    data_fp: str | None = None,
    manifest_errors: Sequence = (),
    overwrite: bool = False,
    bootstrap_n: int = 1000,
    bootstrap_seed: int = 0,
    bootstrap_speakers: bool = False,
) -> WerResult:
    """Transcribe and score a speech set; write results as they go; resume an interrupted run.

    The model is moved to the options' device and dtype in place if it is elsewhere, and put in
    eval mode. Audio that cannot be read (``AudioError``) becomes a failed row with its reason,
    counted in ``n_failed``; the rest is scored.

    Args:
        model: ``WhisperForConditionalGeneration``.
        processor: ``WhisperProcessor`` (feature extractor + tokenizer).
        utterances: sequence of ``manifests.Utterance`` or a ``SpeechSet`` (whose name and
            manifest errors are then recorded). Ids must be unique.
        options: :class:`DecodeOptions` (default: ``DecodeOptions()``).
        out_dir: where ``run.json``, ``utterances.jsonl`` (appended and flushed per batch) and
            ``summary.json`` go; None keeps everything in memory. An existing directory of the
            same run (model fingerprint, data fingerprint, transcript-relevant options,
            normaliser) is resumed, skipping finished ids.
        progress: show a tqdm bar.
        encoder_cache: reuse encoder outputs across calls (see :class:`EncoderCache`).
        normalizer: text normaliser for both sides (default :func:`default_normalizer`).
        normalizer_name: its name in the results (default: derived).
        model_spec: how the model was named (recorded; default ``config._name_or_path``).
        data_name / data_fp: recorded data name / fingerprint (default: from ``utterances``).
        manifest_errors: manifest lines that could not be read, recorded in the summary.
        overwrite: discard existing results in ``out_dir`` instead of resuming.
        bootstrap_n / bootstrap_seed / bootstrap_speakers: the confidence intervals.

    Returns:
        :class:`WerResult` with rows in input order.

    Raises:
        RunMismatchError: ``out_dir`` holds another run's results (a ValueError).
        ValueError: duplicate utterance ids, or options the model cannot honour.
    """
    options = options or DecodeOptions()
    if hasattr(utterances, "utterances"):
        data_name = data_name or getattr(utterances, "name", None)
        manifest_errors = list(manifest_errors) or list(getattr(utterances, "errors", []) or [])
        data_source = str(getattr(utterances, "source", "") or "")
        utterances = list(utterances.utterances)
    else:
        utterances = list(utterances)
        data_source = ""
    ids = [u.id for u in utterances]
    if len(set(ids)) != len(ids):
        seen, dups = set(), []
        for i in ids:
            if i in seen:
                dups.append(i)
            seen.add(i)
        raise ValueError(f"utterance ids must be unique; duplicated: {sorted(set(dups))[:5]}")
    if normalizer is None:
        normalizer, default_name = default_normalizer(processor)
        normalizer_name = normalizer_name or default_name
    normalizer_name = normalizer_name or getattr(normalizer, "__qualname__", type(normalizer).__name__)

    device = options.resolved_device()
    param = next(model.parameters())
    if param.device != device and not (device.type == param.device.type and device.index is None):
        log.info("moving the model to %s", device)
        model.to(device)
    if param.dtype != options.torch_dtype:
        log.info("casting the model to %s", options.dtype)
        model.to(options.torch_dtype)
    model.eval()

    model_fp = model_fingerprint(model)
    data_fp = data_fp or data_fingerprint(utterances)
    key = _run_key(model_fp, data_fp, options, normalizer_name)
    out_path = Path(out_dir) if out_dir is not None else None
    done: dict[str, dict] = _prepare_out_dir(out_path, key, overwrite) if out_path else {}
    if done:
        log.info("resuming: %d of %d utterances already done", len(set(done) & set(ids)), len(ids))

    todo = [u for u in utterances if u.id not in done]
    decoder = _Decoder(model, processor, options, encoder_cache)
    window_s = decoder.window_samples / SAMPLING_RATE
    # Longest first: similar lengths decode for similar numbers of steps in one batch. Those the
    # manifest already marks as longer than the window go in smaller batches of their own.
    todo_sorted = sorted(todo, key=lambda u: -(u.duration_s or 0.0))
    known_long = [u for u in todo_sorted if (u.duration_s or 0.0) > window_s + 0.5]
    short = todo_sorted[len(known_long):]
    per_call = options.utterances_per_batch
    batches = [short[i:i + per_call] for i in range(0, len(short), per_call)]
    step = options.long_form_batch_size
    batches += [known_long[i:i + step] for i in range(0, len(known_long), step)]
    long_queue: list[tuple[Utterance, np.ndarray]] = []
    new_rows: list[dict] = []
    audio_seconds = 0.0

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), unit="utt", desc="evaluate", disable=not progress)
    rows_file = open(out_path / UTTERANCES_FILE, "a", encoding="utf-8") if out_path else None
    t0 = time.perf_counter()

    def emit(rows: list[dict]) -> None:
        new_rows.extend(rows)
        if rows_file is not None:
            rows_file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            rows_file.flush()
        bar.update(len(rows))

    def score_batch(batch: list[Utterance], audios: list[np.ndarray], long_form: bool) -> list[dict]:
        with torch.inference_mode():
            decoded = decoder.decode([u.id for u in batch], audios, long_form)
        rows = []
        for utt, audio, dec in zip(batch, audios, decoded):
            s = score_utterance(utt.text, dec["hypothesis"], normalizer)
            reason = detect_hallucination(s["reference_norm"], s["hypothesis_norm"], hit_token_cap=dec["hit_token_cap"])
            rows.append({
                "id": utt.id,
                "audio": str(utt.audio),
                "speaker": utt.speaker,
                "duration_s": round(len(audio) / SAMPLING_RATE, 4),
                "reference": utt.text,
                "hypothesis": dec["hypothesis"],
                **s,
                "errors": s["substitutions"] + s["deletions"] + s["insertions"],
                "wer": _finite(_ratio(s["substitutions"] + s["deletions"] + s["insertions"], s["ref_words"])),
                "n_tokens": dec["n_tokens"],
                "language": dec["language"],
                "language_detected": dec["language_detected"],
                "long_form": dec["long_form"],
                "hallucination": reason is not None,
                "hallucination_reason": reason,
                "failed": False,
                "failure": None,
            })
        return rows

    try:
        for batch, loaded in _loaded_batches(batches, options.num_workers):
            failed, ok_utts, ok_audio = [], [], []
            for utt, audio in zip(batch, loaded):
                if isinstance(audio, AudioError):
                    failed.append(_failed_row(utt, getattr(audio, "reason", None) or str(audio)))
                elif len(audio) == 0:
                    failed.append(_failed_row(utt, "audio is empty (0 samples)"))
                elif len(audio) > decoder.window_samples:
                    long_queue.append((utt, audio))  # decoded whole below, never truncated
                else:
                    ok_utts.append(utt)
                    ok_audio.append(audio)
            if failed:
                emit(failed)
            if ok_utts:
                audio_seconds += sum(len(a) for a in ok_audio) / SAMPLING_RATE
                emit(score_batch(ok_utts, ok_audio, long_form=False))
        long_queue.sort(key=lambda x: -len(x[1]))
        for i in range(0, len(long_queue), step):
            chunk = long_queue[i:i + step]
            audio_seconds += sum(len(a) for _, a in chunk) / SAMPLING_RATE
            emit(score_batch([u for u, _ in chunk], [a for _, a in chunk], long_form=True))
    finally:
        bar.close()
        if rows_file is not None:
            rows_file.close()
    wall = time.perf_counter() - t0

    by_id = {**done, **{r["id"]: r for r in new_rows}}
    rows = [by_id[i] for i in ids if i in by_id]
    stats = _summarize(rows, bootstrap_n=bootstrap_n, bootstrap_seed=bootstrap_seed,
                       bootstrap_speakers=bootstrap_speakers)
    summary = {
        **{k: stats[k] for k in ("wer", "cer", "wer_ci", "cer_ci", "n_utterances", "n_failed")},
        "n_total": len(rows),
        "n_manifest_errors": len(manifest_errors),
        "counts": stats["counts"],
        "protocol": options.protocol,
        "options": {**options.to_dict(), "resolved_device": str(device)},
        "generate_kwargs": {
            "short_form": _generate_kwargs(model, options, long_form=False),
            "long_form": _generate_kwargs(model, options, long_form=True),
        },
        "normalizer": normalizer_name,
        "model": {
            "spec": model_spec or getattr(model.config, "_name_or_path", None) or None,
            "fingerprint": model_fp,
            "multilingual": decoder.multilingual,
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "dtype": options.dtype,
        },
        "data": {
            "name": data_name,
            "source": data_source,
            "fingerprint": data_fp,
            "n_utterances": len(ids),
        },
        "bootstrap": stats["bootstrap"],
        "languages": stats["languages"],
        "n_hallucination": stats["n_hallucination"],
        "hallucination_ids": stats["hallucination_ids"],
        "n_empty_reference": stats["n_empty_reference"],
        "failures": stats["failures"],
        "manifest_errors": [str(e) for e in manifest_errors][:200],
        "throughput": {
            "audio_seconds": round(audio_seconds, 3),
            "wall_seconds": round(wall, 3),
            "audio_seconds_per_second": round(audio_seconds / wall, 3) if wall > 0 and audio_seconds else None,
            "decoded_this_run": len(new_rows),
            "resumed_rows": len(set(done) & set(ids)),
            "encoder_calls": decoder.encoder_calls,
        },
        "encoder_cache": (
            {"hits": encoder_cache.hits, "misses": encoder_cache.misses, "entries": len(encoder_cache)}
            if encoder_cache is not None else None
        ),
        "environment": _env_stamp(device),
        "order": ids,
    }
    if out_path is not None:
        _atomic_write(out_path / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    log.info("WER %.4f over %d utterances (%d failed)", summary["wer"] or math.nan, summary["n_utterances"],
             summary["n_failed"])
    return _result_from(summary, rows, out_path)
