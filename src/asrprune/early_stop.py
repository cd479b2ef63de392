"""Early stop of a collapsed variant: a recorded statistical decision, not a silent cut (torch-free).

A pruned variant that collapses (repetition loops up to the token cap on every utterance) costs a
study far more than a healthy one and teaches nothing after a few dozen utterances. With early
stopping, ``evaluate`` decodes such a run in looks: after every ``check_every`` utterances it
compares the run with its baseline *on the utterances done so far* (paired bootstrap of ΔWER over
the same utterances, :func:`asrprune.stats.paired_bootstrap`) and stops once the interval's lower
bound exceeds ``threshold`` (with at least ``min_utterances`` scored). The run is then recorded as
``collapsed``: the utterances scored, the interim ΔWER with its interval and p, the threshold, the
confidence and the number of looks; never a full-set WER.

Validity. The interim sample must stand for the whole set. The decoder batches utterances of
similar length (longest first); a longest-first prefix would be a biased sample (long utterances
have other error rates). So the *batches* are decoded in a seeded random order: each look sees a
random sample of batches (a cluster sample), while every batch holds exactly the utterances it
holds without early stopping, so a run that is not stopped decodes every utterance in the same
batch as it would otherwise, and its per-utterance results, hence its WER, are the same. Repeated
looks inflate the chance of a wrong stop; the default interval is 99% (not 95%) and the threshold
is +20 WER points, so a variant whose true ΔWER is far below that (every healthy one) is not
stopped in practice, and one right at the threshold at most once per look at 0.5%.

Resume. The early-stop setting is not part of a run's key: a ``collapsed`` run rerun with early
stopping off resumes from its ``utterances.jsonl`` and completes the remaining utterances.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .stats import paired_bootstrap, permutation_pvalue

__all__ = ["EarlyStop", "EarlyStopOptions"]


@dataclass(frozen=True)
class EarlyStopOptions:
    """When a variant counts as collapsed (checked once, here).

    Attributes:
        threshold: the paired interval's lower bound of ΔWER (fraction: 0.20 = +20 points) beyond
            which the run stops.
        min_utterances: scored utterances before the first decision.
        check_every: utterances between looks.
        confidence: of the paired bootstrap interval (0.99: see the module docstring).
        seed: of the batch order and of the bootstrap.
        n_resamples: bootstrap resamples per look.
    """

    threshold: float = 0.20
    min_utterances: int = 40
    check_every: int = 32
    confidence: float = 0.99
    seed: int = 0
    n_resamples: int = 1000

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, (int, float)) or not 0 < self.threshold:
            raise ValueError(f"early stop threshold must be a positive fraction of WER, got {self.threshold!r}")
        for what in ("min_utterances", "check_every", "n_resamples"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"early stop {what} must be a positive integer, got {v!r}")
        if not 0.5 < self.confidence < 1:
            raise ValueError(f"early stop confidence must be in (0.5, 1), got {self.confidence!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_obj(cls, obj: Any) -> "EarlyStopOptions | None":
        """``True``/``None``-free forms: ``True`` -> defaults, ``False`` -> None (off), a mapping
        of fields -> those."""
        if obj is False or obj is None:
            return None
        if obj is True:
            return cls()
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, Mapping):
            unknown = sorted(set(obj) - set(cls.__dataclass_fields__))
            if unknown:
                raise ValueError(f"early_stop: unknown {unknown}; allowed: {', '.join(cls.__dataclass_fields__)}")
            return cls(**dict(obj))
        raise ValueError(f"early_stop must be true, false or a mapping of its options, got {obj!r}")


def _scored(row: Mapping[str, Any]) -> bool:
    return not row.get("failed") and not row.get("skipped") and row.get("ref_words") is not None


class EarlyStop:
    """The decision of one run against its baseline's per-utterance rows.

    Args:
        baseline_rows: the baseline run's ``utterances.jsonl`` rows (same data, same protocol).
        options: :class:`EarlyStopOptions`.
    """

    def __init__(self, baseline_rows: Sequence[Mapping[str, Any]], options: EarlyStopOptions | None = None):
        self.options = options or EarlyStopOptions()
        self.baseline = {r["id"]: r for r in baseline_rows if _scored(r)}
        self.looks = 0
        self._last_n = 0

    def order(self, batches: list) -> list:
        """The batches in a seeded random order (the same order for the same batches)."""
        out = list(batches)
        random.Random(self.options.seed).shuffle(out)
        return out

    def due(self, n_rows: int) -> bool:
        """Whether a look is due after ``n_rows`` rows of this run are known."""
        return n_rows - self._last_n >= self.options.check_every or (self.looks == 0 and n_rows >= self.options.min_utterances)

    def check(self, rows: Sequence[Mapping[str, Any]], n_total: int) -> dict[str, Any] | None:
        """One look on the rows known so far; the decision record when the run collapsed.

        Returns:
            ``None`` (go on) or ``{"n_scored", "n_total", "delta", "ci", "p", "wer_partial",
            "baseline_wer_partial", "threshold", "confidence", "looks", "options"}``.
        """
        self._last_n = len(rows)
        if len(rows) >= n_total:  # nothing left to save: the run completes as it is
            return None
        pairs = [(self.baseline[r["id"]], r) for r in rows if _scored(r) and r["id"] in self.baseline]
        if len(pairs) < self.options.min_utterances:
            return None
        self.looks += 1
        a = np.array([float(b["errors"]) for b, _ in pairs])
        b = np.array([float(r["errors"]) for _, r in pairs])
        w = np.array([float(r["ref_words"]) for _, r in pairs])
        if w.sum() <= 0:
            return None
        lo, hi = paired_bootstrap(a, b, w, n_resamples=self.options.n_resamples, confidence=self.options.confidence,
                                  seed=self.options.seed)
        if not lo > self.options.threshold:
            return None
        return {
            "n_scored": len(pairs), "n_total": int(n_total), "delta": float((b.sum() - a.sum()) / w.sum()),
            "ci": [float(lo), float(hi)], "p": float(permutation_pvalue(a, b, seed=self.options.seed)),
            "wer_partial": float(b.sum() / w.sum()), "baseline_wer_partial": float(a.sum() / w.sum()),
            "threshold": self.options.threshold, "confidence": self.options.confidence, "looks": self.looks,
            "options": self.options.to_dict(),
        }
