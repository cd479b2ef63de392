"""Pure tensor code for pruning masks: scores in, boolean keep-masks out (torch and the torch-free
validators of :mod:`asrprune.config`).

A *keep-mask* is a bool tensor of the parameter's shape where ``True`` means "keep this weight".
*Scores* rank weights: the lowest scores are pruned first (magnitude pruning uses ``|w|``).

Exactness rules shared by every function here:

- ``sparsity`` is a fraction in [0, 1] and exactly ``round(sparsity * numel)`` entries are pruned
  (Python's ``round``, the same count that ``torch.nn.utils.prune`` uses).
- Ties are broken deterministically by flat index: among equal scores the entry with the lower
  flat (row-major) index is pruned first; in pooled masks the flat index runs over the
  concatenation of the tensors in the order given. A plain ``score <= threshold`` comparison would
  over-prune when scores tie (sparsegpt's pitfall); the count here never depends on ties.

The k-th smallest score is found with ``torch.kthvalue`` (linear time, no full sort), then
only the entries that tie with it are resolved by index, so pooling over all linear weights of a
large Whisper needs about one extra copy of the scores.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .config import check_nm, check_sparsity, parse_nm

# The plans' validators, under the names this module has always exported.
validate_sparsity = check_sparsity
parse_nm_pattern = parse_nm

__all__ = [
    "validate_sparsity",
    "n_to_prune",
    "keep_mask",
    "pooled_keep_masks",
    "keep_mask_count",
    "row_counts",
    "row_keep_mask",
    "nm_keep_mask",
    "parse_nm_pattern",
    "apply_keep_mask_",
    "measure_sparsity",
    "count_nonzero",
]


def n_to_prune(numel: int, sparsity: float) -> int:
    """Number of entries pruned from ``numel`` at ``sparsity``: ``round(sparsity * numel)``.

    Raises:
        ValueError: when ``sparsity`` is outside [0, 1].
    """
    value = check_sparsity(sparsity, error=ValueError)
    return min(int(numel), int(round(value * int(numel))))


def _as_float_scores(scores: Tensor) -> Tensor:
    """Detached floating-point view of the scores (fp16/bf16 widen to fp32 exactly)."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    s = scores.detach()
    if s.dtype != torch.float64:
        s = s.to(torch.float32)
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN; every weight needs a comparable score")
    return s


def _pooled_keep_flat(flats: Sequence[Tensor], n_prune: int) -> list[Tensor]:
    """Keep-masks (flat) pruning the ``n_prune`` lowest entries over the concatenation of ``flats``."""
    total = sum(int(f.numel()) for f in flats)
    if n_prune <= 0:
        return [torch.ones_like(f, dtype=torch.bool) for f in flats]
    if n_prune >= total:
        return [torch.zeros_like(f, dtype=torch.bool) for f in flats]
    pooled = flats[0] if len(flats) == 1 else torch.cat(list(flats))
    threshold = torch.kthvalue(pooled, n_prune).values
    del pooled
    above = [f > threshold for f in flats]
    equal = [f == threshold for f in flats]
    n_eq = [int(e.sum()) for e in equal]
    n_below = total - sum(int(a.sum()) for a in above) - sum(n_eq)
    # Entries strictly below the k-th value are pruned; the remaining quota goes to the entries
    # equal to it, lowest (pooled) flat index first.
    ties_left = n_prune - n_below
    masks = []
    for keep, eq, count in zip(above, equal, n_eq):
        if ties_left >= count:  # every tie in this tensor is pruned
            ties_left -= count
        elif ties_left > 0:
            eq_rank = torch.cumsum(eq, dim=0, dtype=torch.int64)  # 1-based rank among ties
            keep |= eq & (eq_rank > ties_left)
            ties_left = 0
        else:
            keep |= eq
        masks.append(keep)
    return masks


def keep_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask pruning the ``round(sparsity * numel)`` lowest-scored entries of one tensor.

    Equivalent to ``torch.nn.utils.prune.l1_unstructured`` when ``scores = |w|`` has no ties.

    Args:
        scores: importance scores, any shape ``S``; lower = pruned first. Not modified.
        sparsity: fraction in [0, 1].

    Returns:
        Bool tensor of shape ``S`` on ``scores.device``; exactly ``round(sparsity * numel)``
        entries are False. Ties are broken by flat index (lower index pruned first).

    Raises:
        ValueError: sparsity outside [0, 1] or NaN scores.
    """
    n_prune = n_to_prune(scores.numel(), sparsity)
    flat = _as_float_scores(scores).reshape(-1)
    return _pooled_keep_flat([flat], n_prune)[0].reshape(scores.shape)


def keep_mask_count(scores: Tensor, n_prune: int) -> Tensor:
    """Keep-mask pruning exactly ``n_prune`` lowest-scored entries (ties: lower flat index first)."""
    n_prune = max(0, min(int(n_prune), scores.numel()))
    flat = _as_float_scores(scores).reshape(-1)
    return _pooled_keep_flat([flat], n_prune)[0].reshape(scores.shape)


def row_counts(n_rows: int, n_cols: int, sparsity: float) -> list[int]:
    """How many entries each row loses so that a matrix loses exactly ``round(s * rows * cols)``:
    ``floor(s * cols)`` per row, and one more for the first rows until the total is reached."""
    total = n_to_prune(n_rows * n_cols, sparsity)
    base, extra = divmod(total, n_rows) if n_rows else (0, 0)
    return [base + (1 if r < extra else 0) for r in range(n_rows)]


def row_keep_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask comparing scores within each output row (Wanda's grouping).

    Every row of a ``(out_features, in_features)`` score matrix loses its lowest-scored entries,
    ``row_counts`` of them, so the matrix as a whole loses exactly ``round(s * numel)`` (Wanda's
    reference code prunes ``int(s * in_features)`` per row, slightly fewer). Ties within a row:
    lower column first.

    Raises:
        ValueError: not a 2-D tensor, sparsity outside [0, 1], NaN scores.
    """
    if scores.dim() != 2:
        raise ValueError(f"row keep-masks need a 2-D score matrix, got shape {tuple(scores.shape)}")
    s = _as_float_scores(scores)
    rows, cols = s.shape
    counts = torch.tensor(row_counts(rows, cols, sparsity), device=s.device)
    order = torch.argsort(s, dim=1, stable=True)  # ascending: the first counts[r] of row r go
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(cols, device=s.device).expand(rows, cols))
    return rank >= counts[:, None]


def pooled_keep_masks(scores: Sequence[Tensor], sparsity: float) -> list[Tensor]:
    """Keep-masks from one threshold pooled over several tensors (``global_unstructured``).

    Exactly ``round(sparsity * sum(numel))`` entries are pruned in total; how many fall in each
    tensor depends on the scores (the paper's tau(rho, c) over a component's matrices).

    Args:
        scores: tensors of any shapes ``S_i``, all on one device.
        sparsity: fraction in [0, 1] of the pooled entries to prune.

    Returns:
        List of bool tensors, the i-th of shape ``S_i``. Ties are broken by the flat index in the
        concatenation of the flattened tensors (earlier tensor, lower index pruned first).

    Raises:
        ValueError: empty list, sparsity outside [0, 1], or NaN scores.
    """
    if len(scores) == 0:
        raise ValueError("pooled_keep_masks needs at least one score tensor")
    total = sum(int(s.numel()) for s in scores)
    n_prune = n_to_prune(total, sparsity)
    flats = [_as_float_scores(s).reshape(-1) for s in scores]
    masks = _pooled_keep_flat(flats, n_prune)
    return [m.reshape(s.shape) for m, s in zip(masks, scores)]


def nm_keep_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Semi-structured N:M keep-mask: keep the ``n`` highest scores in every ``m`` consecutive
    entries along the last (input) dimension.

    For a ``nn.Linear`` weight of shape ``(out_features, in_features)`` the groups run along
    ``in_features``, the layout that 2:4 sparse tensor cores expect.

    Args:
        scores: shape ``(..., K)`` with ``K % m == 0``.
        n: entries kept per group, ``1 <= n < m`` (the plans' rule).
        m: group size.

    Returns:
        Bool tensor of the shape of ``scores`` with exactly ``n`` True entries in every group;
        within a group ties are broken by position (lower index pruned first).

    Raises:
        ValueError: bad ``n``/``m``, a 0-d tensor, last dimension not divisible by ``m``,
            or NaN scores.
    """
    n, m = check_nm(n, m, error=ValueError)
    if scores.dim() == 0:
        raise ValueError("N:M masks need a tensor with at least one dimension")
    k = scores.shape[-1]
    if k % m != 0:
        raise ValueError(
            f"N:M {n}:{m} needs the last (input) dimension divisible by {m}, "
            f"got shape {tuple(scores.shape)}"
        )
    s = _as_float_scores(scores).reshape(-1, m)  # (groups, m)
    order = torch.argsort(s, dim=1, stable=True)  # ascending: first m - n are pruned
    keep = torch.ones_like(s, dtype=torch.bool)
    keep.scatter_(1, order[:, : m - n], False)
    return keep.reshape(scores.shape)


def apply_keep_mask_(param: Tensor, mask: Tensor) -> Tensor:
    """Zero the entries of ``param`` where ``mask`` is False, in place (no autograd record).

    ``masked_fill_`` is used rather than multiplication so that inf/NaN weights are zeroed too.

    Args:
        param: tensor or ``nn.Parameter`` of shape ``S``.
        mask: bool tensor of shape ``S`` (moved to ``param.device`` if needed).

    Returns:
        ``param`` itself.

    Raises:
        ValueError: shape mismatch or a non-bool mask.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"keep-mask must be a bool tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(param.shape):
        raise ValueError(
            f"keep-mask shape {tuple(mask.shape)} does not match parameter shape {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.masked_fill_(~mask.to(param.device), 0)
    return param


def count_nonzero(tensor: Tensor) -> int:
    """Number of entries that are not exactly zero."""
    return int(torch.count_nonzero(tensor.detach()))


def measure_sparsity(tensor: Tensor) -> float:
    """Measured sparsity: the fraction of entries exactly equal to zero (0.0 for empty tensors)."""
    numel = tensor.numel()
    if numel == 0:
        return 0.0
    return 1.0 - count_nonzero(tensor) / numel
