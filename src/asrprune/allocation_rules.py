"""Allocations beyond the additive one: OWL, the authors' rule, and the search on whole plans.

The additive allocator (:mod:`asrprune.allocate`) sums single-component damages; on Whisper the
measured damage of its whole plan was 1.4x (tiny.en) to 2.9x (base) its prediction. Three
other ways to spread a target sparsity over the model live here, each returning a
:class:`RuleAllocation` (a plan at the target plus the table behind it):

- :func:`owl_allocation`: **OWL** (outlier-weighted layer-wise sparsity, Yin et al. 2023, the
  reference code of ``luuyin/OWL``). Per layer (encoder layers and decoder layers alike), the
  outlier ratio ``D_l`` is the percentage of the layer's Wanda scores ``|W_ij| * ||X_j||``
  (over all its linear matrices, from one dense pass over the calibration set) above ``M``
  times their mean. The ratios are mapped linearly onto ``[0, 2*lambda]``, then centred: layer
  ``l`` gets sparsity ``target - (r_l - mean_w(r))``, so layers rich in outliers are pruned
  less. The reference centres on the plain mean (its layers are all the same size); a Whisper
  decoder layer holds 16·d² linear weights and an encoder layer 12·d², so here the mean is
  *weighted by each layer's linear weight count* and the target is met exactly.
- :func:`authors_allocation`: **the authors' rule** (their final script): parts are the early /
  middle / late thirds of each stack (:func:`asrprune.components.layer_thirds`) times the
  component kinds (self-attention, FFN; cross-attention in the decoder); a part's importance is
  the size-weighted mean of its components' gradient diagnostic (mean |dL/dw|, from the
  sensitivity stage); its rate is ``0.7 - 0.6 * sigmoid(8 * (imp / max - 0.5))`` (10-70%),
  and the rates are scaled by one common factor so that the plan prunes the target.
- :func:`measured_allocation`: **measured mode**: the additive allocation, checked as a whole plan
  on the calibration loss and moved within a budget of whole-plan checks (the moves: its
  docstring); the best measured plan at the target wins.

Every plan prunes a fraction ``target`` of all linear weights (``round(s * n)`` per matrix, so
the achieved sparsity is within a few weights of it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .allocate import AllocationError, SensitivityCurves, allocate_plan
from .calibration import CalibrationExample, CalibrationOptions, collect_input_stats, layer_linears
from .components import layer_thirds, select_parameters
from .config import CALIBRATED_SCORES, PlanEntry, PrunePlan, check_sparsity
from .damage import check_plans
from .files import atomic_write_text

log = logging.getLogger(__name__)

__all__ = [
    "OWL_LAMBDA",
    "OWL_M",
    "RuleAllocation",
    "authors_allocation",
    "authors_rate",
    "fit_to_target",
    "measured_allocation",
    "owl_allocation",
    "owl_sparsities",
    "write_rule_allocation",
]

OWL_M = 5.0  # outlier threshold: M times the layer's mean score (OWL's Hyper_m)
OWL_LAMBDA = 0.08  # half-width of the sparsity range around the target (OWL's Lamda)
MAX_SPARSITY = 0.95


@dataclass(frozen=True)
class RuleAllocation:
    """A plan at a target sparsity and the table that produced it.

    Attributes:
        rule: ``owl``, ``authors`` or ``measured``.
        plan: the plan (one entry per unit).
        target: the requested fraction of all linear weights.
        achieved: pruned linear weights / all linear weights, counted ``round(s * n)`` per unit.
        rows: per unit: ``id``, ``n_weights``, ``sparsity`` and the rule's statistic.
        info: the rule's parameters and, for the measured mode, the trace of its checks.
    """

    rule: str
    plan: PrunePlan
    target: float
    achieved: float
    rows: tuple[Mapping[str, Any], ...]
    info: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "target": self.target, "achieved": self.achieved,
                "plan": self.plan.to_dict(), "plan_text": self.plan.to_text(), "info": dict(self.info),
                "rows": [dict(r) for r in self.rows]}


def fit_to_target(raw: Sequence[float], weights: Sequence[float], target: float, *, how: str = "shift",
                  lo: float = 0.0, hi: float = MAX_SPARSITY) -> np.ndarray:
    """Sparsities ``clip(f(raw), lo, hi)`` whose weighted mean is ``target``.

    ``how="shift"``: ``f(x) = x + c`` (centring: OWL); ``how="scale"``: ``f(x) = c * x`` (the
    authors' rescaling). ``c`` is found by bisection (the weighted mean is monotone in ``c``), so
    clipping at ``lo``/``hi`` is accounted for.

    Raises:
        AllocationError: the target is out of reach within ``[lo, hi]``.
    """
    x = np.asarray(raw, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if x.shape != w.shape or not len(x):
        raise ValueError("raw and weights must be non-empty and of one length")
    if not lo * w.sum() <= target * w.sum() <= hi * w.sum():
        raise AllocationError(f"target {target} is outside [{lo}, {hi}]")

    def mean(c: float) -> float:
        v = x + c if how == "shift" else c * x
        return float((np.clip(v, lo, hi) * w).sum() / w.sum())

    if how == "shift":
        a, b = lo - x.max() - 1.0, hi - x.min() + 1.0
    elif how == "scale":
        if x.min() < 0 or x.max() <= 0:
            raise ValueError("scale needs non-negative rates, one of them positive")
        a, b = 0.0, hi / x[x > 0].min() + 1.0
    else:
        raise ValueError(f"how must be 'shift' or 'scale', got {how!r}")
    for _ in range(200):
        c = 0.5 * (a + b)
        if mean(c) < target:
            a = c
        else:
            b = c
    v = x + b if how == "shift" else b * x
    return np.clip(v, lo, hi)


def _rounded(values: np.ndarray, weights: Sequence[int], target: float, decimals: int = 4) -> list[float]:
    """Round to ``decimals`` and put the rounding error on the largest unit, so the plan's
    weighted mean stays at the target to within one weight per unit."""
    out = [round(float(v), decimals) for v in values]
    w = np.asarray(weights, dtype=np.float64)
    err = target * w.sum() - float((np.asarray(out) * w).sum())
    i = int(np.argmax(w))
    out[i] = round(min(MAX_SPARSITY, max(0.0, out[i] + err / w[i])), 6)
    return out


def _achieved(sparsities: Sequence[float], counts: Sequence[Sequence[int]], n_linear: int) -> float:
    return sum(int(round(s * n)) for s, ns in zip(sparsities, counts) for n in ns) / n_linear


def _linear_total(model) -> int:
    from .components import linear_weight_names

    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in linear_weight_names(model))


# ----------------------------------------------------------------------------------------------
# OWL
# ----------------------------------------------------------------------------------------------


def _layers(model) -> list[tuple[str, int]]:
    return [("encoder", i) for i in range(len(model.get_encoder().layers))] + \
           [("decoder", i) for i in range(len(model.get_decoder().layers))]


def owl_sparsities(outlier_ratio: Sequence[float], n_weights: Sequence[int], target: float, *,
                   lam: float = OWL_LAMBDA) -> np.ndarray:
    """OWL's layer sparsities from the layers' outlier ratios (the reference's mapping, centred
    on the mean weighted by ``n_weights``; clipping, if any, absorbed by :func:`fit_to_target`)."""
    d = np.asarray(outlier_ratio, dtype=np.float64)
    span = d.max() - d.min()
    r = (d - d.min()) / span * (2 * lam) if span > 0 else np.zeros_like(d)
    w = np.asarray(n_weights, dtype=np.float64)
    raw = target - (r - (r * w).sum() / w.sum())
    return fit_to_target(raw, w, target, how="shift")


def owl_allocation(
    model,
    examples: Sequence[CalibrationExample],
    target: float,
    *,
    m: float = OWL_M,
    lam: float = OWL_LAMBDA,
    score: str = "wanda",
    options: CalibrationOptions | None = None,
    progress: bool = True,
) -> RuleAllocation:
    """OWL's per-layer sparsities at ``target`` (module docstring), as a plan pruned by ``score``.

    Args:
        model: the dense model (unchanged).
        examples: calibration examples (never evaluation data).
        target: fraction of all linear weights to prune.
        m, lam: OWL's outlier threshold ``M`` and range ``lambda`` (defaults 5 and 0.08).
        score: the method the plan prunes with (``wanda`` as in OWL; any score works).
        options: how the calibration data enters the statistics (:class:`CalibrationOptions`).
        progress: a bar over the calibration pass.
    """
    check_sparsity(target, "target", positive=True)
    options = options or CalibrationOptions()
    stats = collect_input_stats(model, examples, gram=False, frames=options.frames, progress=progress)
    rows, ratios, sizes, counts = [], [], [], []
    for side, i in _layers(model):
        mods = layer_linears(model, side, i)
        with torch.no_grad():
            metric = torch.cat([(m_.weight.detach().abs().float() * stats[n].norm[None, :].to(m_.weight.device)).reshape(-1)
                                for n, m_ in mods.items()])
        ratio = 100.0 * float((metric > metric.mean() * m).float().mean())
        n = int(metric.numel())
        ratios.append(ratio)
        sizes.append(n)
        counts.append([int(m_.weight.numel()) for m_ in mods.values()])
        rows.append({"id": f"{side}.layers.{i}", "n_weights": n, "outlier_ratio": ratio})
    s = _rounded(owl_sparsities(ratios, sizes, target, lam=lam), sizes, target)
    for row, v in zip(rows, s):
        row["sparsity"] = v
    plan = PrunePlan(entries=tuple(PlanEntry(selector=f"{r['id'].rsplit('.', 1)[0]}[{r['id'].rsplit('.', 1)[1]}]",
                                             sparsity=v) for r, v in zip(rows, s) if v > 0), score=score,
                     name=f"owl_{round(100 * target)}")
    return RuleAllocation("owl", plan, target, _achieved(s, counts, _linear_total(model)), tuple(rows),
                          {"M": m, "lambda": lam, "score": score, "frames": options.frames,
                           "n_calibration": len(examples), "centring": "mean weighted by linear weights per layer"})


# ----------------------------------------------------------------------------------------------
# the authors' rule
# ----------------------------------------------------------------------------------------------


def authors_rate(importance: Sequence[float]) -> np.ndarray:
    """``0.7 - 0.6 * sigmoid(8 * (imp / max - 0.5))``: 10% for the most important part, up to
    ~70% for the least (the authors' final script)."""
    imp = np.asarray(importance, dtype=np.float64)
    top = imp.max()
    x = imp / top if top > 0 else np.zeros_like(imp)
    return 0.7 - 0.6 / (1.0 + np.exp(-8.0 * (x - 0.5)))


_KINDS = {"encoder": ("self_attn", "ffn"), "decoder": ("self_attn", "encoder_attn", "ffn")}


def authors_allocation(sensitivity: Mapping[str, Any], model, target: float, *, diagnostic: str = "gradient",
                       score: str = "magnitude", scope: str | None = "matrix") -> RuleAllocation:
    """The authors' allocation at ``target`` from a sensitivity run (``sensitivity.json``).

    Args:
        sensitivity: the parsed ``sensitivity.json`` (its per-component diagnostics).
        model: the model the plan is for (layer counts, matrix sizes).
        target: fraction of all linear weights to prune.
        diagnostic: the importance (``gradient``: mean |dL/dw|, the authors' choice).
        score, scope: how the plan prunes (default: magnitude per matrix, as their final script's
            ``l1_unstructured``).
    """
    check_sparsity(target, "target", positive=True)
    comps = {c["id"]: c for c in sensitivity.get("components") or []}
    n_layers = {"encoder": len(model.get_encoder().layers), "decoder": len(model.get_decoder().layers)}
    params = dict(model.named_parameters())
    parts = []
    for side in ("encoder", "decoder"):
        for third, layers in zip(("early", "middle", "late"), layer_thirds(n_layers[side])):
            if not len(layers):
                continue
            for kind in _KINDS[side]:
                ids = [f"{side}.layers.{i}.{kind}" for i in layers]
                missing = [i for i in ids if i not in comps]
                if missing:
                    raise AllocationError(f"sensitivity results lack components {missing[:3]} (run sensitivity on this model)")
                n = [int(comps[i]["n_weights"]) for i in ids]
                imp = sum(float(comps[i]["diagnostics"][diagnostic]["mean"]) * k for i, k in zip(ids, n)) / sum(n)
                selector = f"{side}.layers[{layers[0]}:{layers[-1] + 1}].{kind}"
                counts = [int(params[p].numel()) for p in select_parameters(model, selector)]
                parts.append({"id": selector, "part": f"{side} {third} {kind}", "n_weights": sum(counts),
                              "importance": imp, "counts": counts})
    rates = authors_rate([p["importance"] for p in parts])
    sizes = [p["n_weights"] for p in parts]
    s = _rounded(fit_to_target(rates, sizes, target, how="scale"), sizes, target)
    rows = []
    for p, r, v in zip(parts, rates, s):
        rows.append({"id": p["id"], "part": p["part"], "n_weights": p["n_weights"], "importance": p["importance"],
                     "rate": float(r), "sparsity": v})
    plan = PrunePlan(entries=tuple(PlanEntry(selector=r["id"], sparsity=r["sparsity"], scope=scope)
                                   for r in rows if r["sparsity"] > 0), score=score,
                     name=f"authors_{round(100 * target)}")
    return RuleAllocation("authors", plan, target, _achieved(s, [p["counts"] for p in parts], _linear_total(model)),
                          tuple(rows), {"diagnostic": diagnostic, "score": score,
                                        "rule": "0.7 - 0.6*sigmoid(8*(imp/max - 0.5)), scaled to the target"})


# ----------------------------------------------------------------------------------------------
# measured mode
# ----------------------------------------------------------------------------------------------


def measured_allocation(
    model,
    examples: Sequence[CalibrationExample],
    curves: SensitivityCurves,
    target: float,
    *,
    budget: int = 8,
    method=None,
    loss_reduction: str = "sum",
    shift: float = 0.05,
    allocate_kwargs: Mapping[str, Any] | None = None,
    on_check: Callable[[Mapping[str, Any]], None] | None = None,
) -> RuleAllocation:
    """The additive allocation, checked and moved on whole plans; the best measured plan wins.

    Each check prunes the whole candidate plan (with ``method``: e.g. SparseGPT, sequentially
    calibrated) and measures the teacher-forced loss on ``examples``
    (:func:`asrprune.damage.check_plans`). Every candidate prunes exactly ``target`` of the
    curves' linear components. The moves, in order, until ``budget`` checks are spent:

    1. the additive plan ``A`` (:func:`asrprune.allocate.allocate_plan`) and the uniform plan
       ``U`` (every component at the target);
    2. a line search between them: ``s(l) = U + l * (A - U)`` at ``l = 0.5``, then at the middle
       of the better half (0.25 or 0.75);
    3. from the best so far, shift sparsity between encoder and decoder: the encoder's
       components ``+d``, the decoder's ``-d * n_enc / n_dec`` (then re-centred on the target),
       for ``d = +shift`` and ``-shift``; a shift that helped is doubled, one that did not is
       halved, while checks remain.

    The losses are measured on the calibration data that SparseGPT was fitted to, so the choice
    is in-sample; the evaluation set stays untouched.

    Args:
        model: the dense model (restored bit-exactly after each check).
        examples: calibration examples.
        curves: sensitivity curves measured under ``method`` (``curves.score``).
        target: fraction of linear weights.
        budget: whole-plan checks (at least 2: ``A`` and ``U``).
        method: :class:`~asrprune.prune.PruningMethod` (default: the curves' score, which must then
            be magnitude).
        loss_reduction: per-utterance loss of the checks.
        shift: the first encoder/decoder shift.
        allocate_kwargs: options of the additive allocator.
        on_check: called with each check's record as it finishes (progress, logs).
    """
    from .prune import PruningMethod

    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 2:
        raise ValueError(f"budget must be an integer >= 2 (the additive and the uniform plan), got {budget!r}")
    if method is None:
        if curves.score in CALIBRATED_SCORES:
            raise ValueError(f"the curves were measured under {curves.score}; give the method (with calibration)")
        method = PruningMethod(curves.score)
    add = allocate_plan(curves, target, **dict(allocate_kwargs or {}))
    rows = [r for r in add.rows if r.linear and r.n_weights > 0]
    ids = [r.id for r in rows]
    n = np.array([r.n_weights for r in rows], dtype=np.float64)
    caps = np.array([max(r.cap, target) for r in rows])
    enc = np.array([i.startswith("encoder") for i in ids])
    share = float(n.sum()) / curves.counts.linear  # the curves' components may not cover every linear weight
    local_target = target / share if share > 0 else target
    s_add = np.array([r.sparsity for r in rows])
    s_uni = np.full(len(rows), local_target)

    def centred(s: np.ndarray) -> np.ndarray:
        return fit_to_target(s, n, local_target, how="shift", hi=float(min(caps.max(), MAX_SPARSITY)))

    def plan_of(s: np.ndarray, name: str) -> PrunePlan:
        scope = "component" if method.score == "magnitude" else None
        vals = _rounded(s, list(n.astype(int)), local_target)
        return PrunePlan(entries=tuple(PlanEntry(selector=i, sparsity=v, scope=scope) for i, v in zip(ids, vals) if v > 0),
                         score=method.score, name=name)

    trace: list[dict[str, Any]] = []
    base_loss: list[float] = []

    def check(s: np.ndarray, move: str) -> float:
        plan = plan_of(s, f"measured_{len(trace)}")
        res = check_plans(model, examples, {move: plan}, loss_reduction=loss_reduction, method=method)
        base_loss[:] = [res["baseline_loss"]]
        info = res["plans"][move]
        rec = {"check": len(trace) + 1, "move": move, "loss_delta": info["loss_delta"], "loss": info["loss"],
               "sparsity_linear": info["sparsity_linear"], "encoder_sparsity": float((s * n)[enc].sum() / max(n[enc].sum(), 1)),
               "decoder_sparsity": float((s * n)[~enc].sum() / max(n[~enc].sum(), 1)), "plan": plan.to_text(),
               "sparsities": [float(x) for x in s]}
        trace.append(rec)
        log.info("measured allocation check %d (%s): loss delta %.4f", rec["check"], move, rec["loss_delta"])
        if on_check is not None:
            on_check(rec)
        return rec["loss_delta"]

    results: list[tuple[float, np.ndarray, str]] = []

    def run(s: np.ndarray, move: str) -> None:
        if len(trace) < budget:
            results.append((check(s, move), s, move))

    run(s_add, "additive")
    run(s_uni, "uniform")
    lo, hi = 0.0, 1.0  # l of uniform, l of additive
    loss_at = {1.0: results[0][0], 0.0: results[1][0]}
    for _ in range(2):
        if len(trace) >= budget:
            break
        mid = 0.5 * (lo + hi)
        run(centred(s_uni + mid * (s_add - s_uni)), f"line l={mid:g}")
        loss_at[mid] = results[-1][0]
        # keep the half around the better end
        if loss_at[lo] <= loss_at[hi]:
            hi = mid
        else:
            lo = mid
    d, flipped = shift, False
    while len(trace) < budget and abs(d) >= 0.005 and enc.any() and (~enc).any():
        best_loss, best_s, _ = min(results, key=lambda t: t[0])
        s_new = best_s.copy()
        s_new[enc] += d
        s_new[~enc] -= d * n[enc].sum() / n[~enc].sum()
        run(centred(np.clip(s_new, 0.0, caps)), f"shift encoder {d:+.3f}")
        if results[-1][0] < best_loss:
            d *= 2  # it helped: go further that way
        elif not flipped:
            d, flipped = -d, True  # try the other way
        else:
            d /= 2
    best_loss, best_s, best_move = min(results, key=lambda t: t[0])
    plan = plan_of(best_s, f"measured_{round(100 * target)}")
    vals = _rounded(best_s, list(n.astype(int)), local_target)
    params = dict(model.named_parameters())
    counts = [[int(params[p].numel()) for p in select_parameters(model, i)] for i in ids]
    out_rows = tuple({"id": i, "n_weights": int(k), "sparsity": v, "additive": float(a)}
                     for i, k, v, a in zip(ids, n, vals, s_add))
    return RuleAllocation("measured", plan, target, _achieved(vals, counts, _linear_total(model)), out_rows, {
        "budget": budget, "checks": len(trace), "chosen": best_move, "chosen_loss_delta": best_loss,
        "additive_predicted_damage": add.predicted_damage, "baseline_loss": base_loss[0] if base_loss else None,
        "method": method.describe(), "loss_reduction": loss_reduction, "trace": trace,
        "moves": "additive, uniform, line search between them, encoder/decoder shifts (see measured_allocation)",
    })


def write_rule_allocation(alloc: RuleAllocation, out: str | Path) -> dict[str, Path]:
    """``out`` (the plan YAML, a header of comments) and ``<stem>.json`` (the table)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    head = (f"# {alloc.rule} allocation: target {alloc.target:.4f} of linear weights, achieved "
            f"{alloc.achieved:.4f}\n")
    atomic_write_text(out, head + alloc.plan.to_yaml())
    table = out.with_suffix(".json")
    atomic_write_text(table, json.dumps(alloc.to_dict(), indent=2, default=float) + "\n")
    return {"plan": out, "table": table}
