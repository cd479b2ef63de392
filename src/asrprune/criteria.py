"""Pruning criteria: what each method keeps of one weight matrix, given what enters it.

The methods, by the plan's ``score`` (groupings: :func:`asrprune.config.score_scopes`):

``magnitude``
    ``|W|``; pooled over a component, per matrix or per output row. Needs no data.
``wanda`` (Sun et al. 2023, locuslab/wanda)
    ``|W_ij| * ||X_j||_2`` over the calibration tokens entering the matrix, compared within each
    output row (the paper's grouping, the default) or over the matrix. Keeps the weights that
    carry large activations; changes no kept weight.
``sparsegpt`` (Frantar & Alistarh 2023, IST-DASLab/sparsegpt)
    Blocked Optimal Brain Surgeon: with the layer Hessian ``H = X^T X / n`` (dampened by a
    fraction of its mean diagonal), columns are processed left to right in blocks of 128; in
    each block the weights with the smallest ``w^2 / [chol(H^-1)]_jj^2`` are pruned and the
    error of every pruned weight is spread over the columns not yet processed (the OBS update),
    so the layer's output ``W X`` is reconstructed as well as the mask allows. Per matrix, or N:M.

Counts follow the project's rule everywhere: exactly ``round(s * numel)`` weights of a matrix
(SparseGPT's reference picks ``int(s * numel_block)`` per block with a ``<=`` threshold, which
over-prunes on ties; here each block gets its share of the matrix's count and ``topk`` picks
them), and N:M keeps exactly N of every M consecutive inputs. Every function works on the
weight's device; the Cholesky factorisations run in float64.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import CALIBRATED_SCORES, score_scopes
from .masks import keep_mask, keep_mask_count, n_to_prune, nm_keep_mask, row_keep_mask

log = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "Method",
    "sparsegpt_prune_",
    "wanda_keep_mask",
    "wanda_scores",
]


@dataclass(frozen=True)
class Method:
    """A pruning method: its name, its groupings (default first), what it needs and does."""

    name: str
    scopes: tuple[str, ...]
    calibrated: bool
    updates_weights: bool
    summary: str


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", score_scopes("magnitude"), False, False, "|W|"),
    "wanda": Method("wanda", score_scopes("wanda"), True, False, "|W| * ||X||_2 per input feature"),
    "sparsegpt": Method("sparsegpt", score_scopes("sparsegpt"), True, True,
                        "blocked OBS pruning with the OBS update of the kept weights"),
}
assert set(CALIBRATED_SCORES) == {m.name for m in METHODS.values() if m.calibrated}


# ----------------------------------------------------------------------------------------------
# Wanda
# ----------------------------------------------------------------------------------------------


def wanda_scores(weight: Tensor, input_norm: Tensor) -> Tensor:
    """``|W_ij| * ||X_j||_2``: shape ``(out, in)`` from a weight and the per-input-feature norm."""
    if input_norm.shape != (weight.shape[1],):
        raise ValueError(f"input norm of shape {tuple(input_norm.shape)} for a weight of shape {tuple(weight.shape)}")
    return weight.detach().abs().to(torch.float32) * input_norm.to(weight.device, torch.float32)[None, :]


def wanda_keep_mask(weight: Tensor, input_norm: Tensor, *, sparsity: float, scope: str = "row",
                    nm: tuple[int, int] | None = None) -> Tensor:
    """Wanda's keep-mask of one matrix: per row (default), per matrix, or N:M along the inputs."""
    scores = wanda_scores(weight, input_norm)
    if nm is not None:
        return nm_keep_mask(scores, *nm)
    if scope == "row":
        return row_keep_mask(scores, sparsity)
    if scope == "matrix":
        return keep_mask(scores, sparsity)
    raise ValueError(f"wanda compares scores per row or per matrix, not per {scope!r}")


# ----------------------------------------------------------------------------------------------
# SparseGPT
# ----------------------------------------------------------------------------------------------


def _inverse_cholesky(hessian: Tensor, damp: float) -> tuple[Tensor, int, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` in float64.

    Inputs that never fired (zero diagonal) get a unit diagonal so that H stays invertible;
    their weights are pruned like any other (the reference zeroes them in addition, which would
    break the exact count). When the factorisation fails, the dampening grows tenfold (logged).
    """
    H = hessian.to(torch.float64).clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0
    mean = float(diag.mean())
    for attempt in range(6):
        factor = damp * 10 ** attempt
        Hd = H.clone()
        torch.diagonal(Hd).add_(factor * mean)
        try:
            L = torch.linalg.cholesky(Hd)
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True), int(dead.sum()), factor
        except torch.linalg.LinAlgError:
            log.warning("SparseGPT: H + %.3g * mean(diag) is not positive definite; dampening more", factor)
    raise ValueError("SparseGPT: the layer Hessian stays singular even with heavy dampening")


def _block_counts(total: int, cols: int, block: int) -> list[int]:
    """Each block's share of the matrix's count: ``round(total * i2 / cols) - round(total * i1 / cols)``."""
    edges = list(range(0, cols, block)) + [cols]
    marks = [round(total * e / cols) for e in edges]
    return [b - a for a, b in zip(marks, marks[1:])]


def sparsegpt_prune_(
    weight: Tensor,
    hessian: Tensor,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    prune_mask: Tensor | None = None,
) -> dict:
    """Prune one ``(out, in)`` weight matrix with SparseGPT, in place, and update the kept weights.

    Args:
        weight: the matrix (a ``nn.Linear`` weight; any float dtype and device).
        hessian: ``(in, in)`` ``X^T X / n`` of the calibration inputs of this matrix.
        sparsity: fraction of the matrix to prune (exactly ``round(s * numel)`` weights), or
        nm: ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs of each row.
        block_size: columns per block (masks are chosen block by block, adaptively).
        damp: dampening, a fraction of the mean diagonal of ``H``.
        prune_mask: a given ``(out, in)`` bool mask of the weights to prune (True = prune)
            instead of choosing one; the kept weights are still updated.

    Returns:
        ``{"error": sum over pruned weights of (w - q)^2 / [chol(H^-1)]_jj^2 (the OBS error, in
        units of H), "n_pruned", "dead_inputs", "damp"}``.
    """
    if weight.dim() != 2:
        raise ValueError(f"SparseGPT prunes 2-D weight matrices, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"a Hessian of shape {tuple(hessian.shape)} for a weight with {cols} inputs")
    if (sparsity is None) == (nm is None) and prune_mask is None:
        raise ValueError("give either a sparsity or an N:M pattern")
    W = weight.detach().to(torch.float32).clone()
    U, n_dead, damp_used = _inverse_cholesky(hessian.to(W.device), damp)
    Hinv = U.to(torch.float32)
    counts = _block_counts(n_to_prune(rows * cols, sparsity), cols, block_size) if sparsity is not None else None
    n_keep, m = nm if nm is not None else (0, 0)
    error = torch.zeros(rows, dtype=torch.float64, device=W.device)
    for b, i1 in enumerate(range(0, cols, block_size)):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diagonal(Hinv1)
        if prune_mask is not None:
            mask1 = prune_mask[:, i1:i2].to(W.device, torch.bool)
        elif nm is None:
            # the block's weights that are cheapest to remove, exactly its share of the count
            mask1 = ~keep_mask_count(W1 ** 2 / d[None, :] ** 2, counts[b])
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and prune_mask is None and i % m == 0:
                tmp = W1[:, i:i + m] ** 2 / d[None, i:i + m] ** 2
                mask1.scatter_(1, i + torch.topk(tmp, m - n_keep, dim=1, largest=False, sorted=True).indices, True)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            error += (err.to(torch.float64) ** 2)
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    with torch.no_grad():
        weight.copy_(W.to(weight.dtype))
    return {"error": float(error.sum()), "n_pruned": int((weight == 0).sum()), "dead_inputs": n_dead,
            "damp": damp_used}
