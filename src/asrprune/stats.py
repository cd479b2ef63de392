"""Statistics shared by evaluation, sensitivity and the report (torch-free: numpy and scipy).

- :func:`bootstrap_ci`: percentile bootstrap interval of a ratio of sums (corpus WER = summed
  errors / summed reference words), optionally resampling whole groups (speakers);
- :func:`paired_bootstrap`: the same for the difference of two systems on the same utterances;
- :func:`permutation_pvalue`: the paired sign-flip (approximate randomisation) test;
- :func:`spearman_with_ci`: Spearman's rank correlation with a bootstrap interval over pairs;
- :func:`ratio`: a ratio with the edge cases of an empty reference.

Every function is deterministic for a given ``seed`` (``numpy.random.default_rng``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import stats as sps

__all__ = [
    "bootstrap_ci",
    "paired_bootstrap",
    "permutation_pvalue",
    "spearman_with_ci",
    "ratio",
]


def ratio(num: float, den: float) -> float:
    """num/den with the edge cases of an empty reference: 0/0 = 0, x/0 = inf."""
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def group_sums(values: np.ndarray, groups: Sequence | None) -> np.ndarray:
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
    check_stats_args(n_resamples, confidence)
    units = group_sums(np.stack([e, w], axis=1), groups)  # (u, 2)
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


def check_stats_args(n: int, confidence: float) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of resamples must be a positive integer, got {n!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")


def paired_bootstrap(
    errors_a: Sequence[float],
    errors_b: Sequence[float],
    ref_words: Sequence[float],
    **kwargs: Any,
) -> tuple[float, float]:
    """Percentile interval of delta WER (b - a) with the same utterances resampled for both.

    Args: per-utterance errors of system a and b, shape (n,), the reference words, and the
        keyword arguments of :func:`bootstrap_ci` (``n_resamples``, ``confidence``, ``seed``,
        ``groups``).

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
    return bootstrap_ci(b - a, w, **kwargs)


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
    check_stats_args(n_permutations, 0.5)
    d = group_sums((b - a)[:, None], groups)[:, 0]
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


def spearman_with_ci(
    x: Sequence[float],
    y: Sequence[float],
    *,
    n_bootstrap: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Spearman rank correlation with a percentile bootstrap interval over the pairs.

    Args:
        x, y: paired values (non-finite pairs are dropped).
        n_bootstrap: resamples of the pairs (with replacement).
        seed: numpy seed.
        confidence: interval coverage.

    Returns:
        ``{"rho", "p", "ci": [low, high], "n"}``; NaN where fewer than 3 pairs or a constant
        side make the correlation undefined.
    """
    xa = np.asarray(x, dtype=float)
    ya = np.asarray(y, dtype=float)
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    n = int(len(xa))
    nan = float("nan")
    if n < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return {"rho": nan, "p": nan, "ci": [nan, nan], "n": n}
    res = sps.spearmanr(xa, ya)
    rho, p = float(res.statistic), float(res.pvalue)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_bootstrap, n))
    rx = sps.rankdata(xa[idx], axis=1)
    ry = sps.rankdata(ya[idx], axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = (rx * ry).sum(axis=1) / den
    boots = boots[np.isfinite(boots)]
    alpha = (1.0 - confidence) / 2
    ci = [float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))] if len(boots) else [nan, nan]
    return {"rho": rho, "p": p, "ci": ci, "n": n}
