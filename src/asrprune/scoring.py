"""Scoring: one normaliser on both sides, word and character edit counts, hallucination flags.

:func:`score_utterance` counts word errors with ``jiwer.process_words`` and character errors with
``jiwer.process_characters`` after one normaliser applied to both the reference and the
hypothesis; :class:`ErrorCounts` sums them, and corpus metrics are derived from the summed
counts (errors / reference words), never averaged per utterance. :func:`detect_hallucination`
flags repetition loops, over-long hypotheses and hypotheses cut at the token cap.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import jiwer
from whisper_normalizer.english import EnglishTextNormalizer

from .stats import ratio

__all__ = [
    "ErrorCounts",
    "default_normalizer",
    "detect_hallucination",
    "longest_loop",
    "score",
    "score_utterance",
]


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
        return ratio(self.errors, self.ref_words)

    @property
    def cer(self) -> float:
        return ratio(self.char_errors, self.ref_chars)

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


def longest_loop(words: Sequence[str], max_n: int = 10) -> tuple[tuple[str, ...], int]:
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
    gram, repeats = longest_loop(hyp)
    if repeats >= 4 and repeats * len(gram) >= 6 and _repeats_of(ref, gram) < repeats:
        reasons.append("ngram_loop")
    if len(hyp) > 2 * len(ref) + 10:
        reasons.append("too_long")
    if hit_token_cap:
        reasons.append("token_cap")
    return "+".join(reasons) or None
