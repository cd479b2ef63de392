"""Sensitivity-aware allocation: a global target sparsity -> one sparsity per component.

The problem. Component ``i`` has ``n_i`` prunable weights and a damage curve ``D_i(s)``: the
increase of the calibration loss when that component alone is magnitude-pruned at sparsity
``s`` (measured by ``sensitivity``'s ablation, or predicted from its diagnostics). We look for
sparsities ``s_i`` that prune a fraction ``target`` of the denominator (all linear weights by
default, or all parameters)::

    minimise  sum_i D_i(s_i)   subject to   sum_i n_i * s_i = target * N_denominator,
                                            0 <= s_i <= cap_i.

Summing single-component damages assumes the damages add up; that is the usual first-order
assumption behind OBD-style allocation and it is the reason the result is called *predicted*
damage. The pruned model must still be evaluated.

The method, step by step:

1. Curve. The known points ``(s, dL)`` of each component plus ``(0, 0)`` are made monotone
   (negative changes, i.e. a calibration loss that *fell*, count as zero damage: we do not bank
   on improvements measured on a small calibration set; then a running maximum) and linearly
   interpolated on a grid (default 0, 0.05, ..., 0.9). Beyond the largest known sparsity
   ``s_max`` the curve is extrapolated conservatively: the larger of the linear continuation of
   the last segment and a power law ``D(s_max) * (s / s_max) ** p`` with ``p`` at least 2 (or
   the exponent fitted through the last two known points, if steeper, at most 6), and the
   component is capped at ``s_max + max_extrapolation`` (default 0.1) so that no allocation
   rests on far extrapolation. When the sensitivity results also hold a predicted loss change
   at sparsities beyond the measured ones, the tail is the larger of that extrapolation and the
   measured level plus the predicted increase (see :func:`curves_from_dict`): a component whose
   calibration loss did not move at 0.5 is not assumed to be free at 0.7.
2. Caps. ``cap_i`` is the smallest of: the extrapolation cap, ``max_sparsity``, user caps
   matched by component id or kind (exact or ``fnmatch`` glob, e.g. ``decoder_ffn=0.3``) and,
   if ``fragile_threshold`` is given, the largest sparsity at which the curve stays at or below
   that loss increase (fragile components get no more than that). Components whose weights are
   not linear weights (conv, layer norms, embeddings, biases) are only eligible under the
   ``all`` denominator and biases are never pruned (cap 0).
3. Solve. For a separable problem with convex ``D_i`` the optimum is the Lagrangian point where
   every component sits where its marginal damage per pruned weight ``D_i'(s) / n_i`` equals a
   common multiplier ``lambda``. We compute it exactly for the convexified curves: take each
   curve's lower convex hull on the grid, cut the hulls into segments with cost
   ``dD / (n_i * ds)`` (increasing along each hull), sort all segments of all components by
   cost and take them in that order until the target number of weights is reached, the last one
   fractionally. This is the classical greedy for the continuous knapsack over convex pieces; it
   is optimal for the convex hulls, and for non-convex curves all components but (at most) the
   last one sit on hull vertices, which are points of the real curve. The damage we report is
   always read from the real (interpolated) curve, not from the hull.

A tiny convex tie-break ``eps * (n_i / N) * s**2`` (``eps`` = 1e-6 of the largest damage) makes
components with identical (e.g. all-zero) curves share the load in proportion to their size
instead of being filled one after another.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from .components import select_parameters
from .config import PlanEntry, PrunePlan
from .files import atomic_write_text
from .prune import WeightSnapshot, measure_model, prune_model, resolve_plan
from .sensitivity import load_sensitivity_json

log = logging.getLogger(__name__)

DENOMINATORS = ("linear", "all")
SOURCES = ("auto", "ablation", "predicted")
# Kinds (substrings of a component's kind or id) whose weights are not linear weights.
_NON_LINEAR_MARKERS = ("conv", "norm", "embed", "position", "bias")
# How many percentage points the achieved sparsity may miss the target by (the bound).
TOLERANCE = 0.005


class AllocationError(ValueError):
    """The allocation problem cannot be solved as asked (unreachable target, bad inputs)."""


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of the model the sensitivity was measured on.

    Attributes:
        linear: number of weights of all linear layers (the default denominator).
        all: number of all parameters (every tensor, biases and norms included).
    """

    linear: int
    all: int

    def __post_init__(self) -> None:
        if self.linear <= 0 or self.all <= 0 or self.linear > self.all:
            raise ValueError(
                f"parameter counts must satisfy 0 < linear <= all, got linear={self.linear}, "
                f"all={self.all}"
            )

    def denominator(self, name: str) -> int:
        _check_denominator(name)
        return self.linear if name == "linear" else self.all


@dataclass(frozen=True)
class ComponentCurve:
    """The known damage points of one component.

    Attributes:
        id: component id (a selector ``select_parameters`` accepts).
        kind: component kind, e.g. ``decoder_self_attn``.
        n_weights: number of weights pruning this component at ``s`` zeroes a fraction ``s`` of.
        points: ``((sparsity, damage), ...)`` sorted by sparsity; damage is a loss increase.
        source: where the points come from (``ablation:loss_delta``, ``predicted:total``, ...).
        linear: whether the weights are linear-layer weights (count in the ``linear`` denominator).
        measured_max: the largest sparsity actually measured when ``points`` also hold a tail
            shaped by the prediction (the extrapolation cap counts from here); ``None``: the
            largest point.
    """

    id: str
    kind: str
    n_weights: int
    points: tuple[tuple[float, float], ...]
    source: str = ""
    linear: bool = True
    measured_max: float | None = None

    @property
    def known_max(self) -> float:
        """Largest sparsity the curve rests on a measurement for."""
        return self.measured_max if self.measured_max is not None else max(s for s, _ in self.points)

    def __post_init__(self) -> None:
        if self.n_weights <= 0:
            raise ValueError(f"component {self.id!r}: n_weights must be positive, got {self.n_weights}")
        for s, d in self.points:
            if not 0.0 <= s <= 1.0 or not math.isfinite(d):
                raise ValueError(
                    f"component {self.id!r}: damage point ({s}, {d}) needs 0 <= sparsity <= 1 "
                    "and a finite damage"
                )


@dataclass(frozen=True)
class SensitivityCurves:
    """Damage curves of the components of one model plus its parameter counts."""

    components: tuple[ComponentCurve, ...]
    counts: ParamCounts
    scope: str = "component"
    path: str | None = None
    model: str | None = None
    score: str = "magnitude"  # the method the damages were measured under (and the plan prunes with)


def _check_denominator(name: str) -> None:
    if name not in DENOMINATORS:
        raise ValueError(f"denominator must be one of {DENOMINATORS}, got {name!r}")


def _is_linear(kind: str, cid: str) -> bool:
    text = f"{kind} {cid}".lower()
    return not any(m in text for m in _NON_LINEAR_MARKERS)


def _float_keyed(mapping: Mapping, what: str) -> dict[float, object]:
    out = {}
    for k, v in mapping.items():
        try:
            out[float(k)] = v
        except (TypeError, ValueError):
            raise ValueError(f"{what}: sparsity key {k!r} is not a number") from None
    return out


def _ablation_points(
    entry: Mapping, metric: str, per_utterance: Mapping | None = None, uncertainty: float = 0.0
) -> list[tuple[float, float]]:
    abl = entry.get("ablation")
    if not abl:
        return []
    pts = []
    for s, v in _float_keyed(abl, f"component {entry.get('id')!r} ablation").items():
        val = v.get(metric) if isinstance(v, Mapping) else v
        if val is None or not math.isfinite(float(val)):
            continue
        val = float(val)
        deltas = (per_utterance or {}).get(f"{entry.get('id')}@{s:g}")
        if uncertainty and metric == "loss_delta" and deltas is not None and len(deltas) >= 2:
            x = np.asarray(deltas, dtype=float)
            val = float(x.mean() + uncertainty * x.std(ddof=1) / math.sqrt(len(x)))
        pts.append((s, val))
    return sorted(pts)


# names of the predicted terms in sensitivity.json (``predict_loss_change``) by diagnostic name
_PREDICTED_ALIASES = {"obd": "second_order", "taylor": "first_order", "predicted": "total"}


def _predicted_points(entry: Mapping, diagnostic: str) -> list[tuple[float, float]]:
    pred = entry.get("predicted")
    if not pred:
        return []
    pts = []
    for s, v in _float_keyed(pred, f"component {entry.get('id')!r} predicted").items():
        if isinstance(v, Mapping):
            val = v.get(diagnostic, v.get(_PREDICTED_ALIASES.get(diagnostic, ""), None))
        else:
            val = v
        if val is not None and math.isfinite(float(val)):
            pts.append((s, float(val)))
    return sorted(pts)


def curves_from_dict(
    data: Mapping,
    *,
    source: str = "auto",
    diagnostic: str = "total",
    metric: str = "loss_delta",
    predicted_tail: bool = True,
    uncertainty: float = 1.0,
    path: str | None = None,
) -> SensitivityCurves:
    """Build :class:`SensitivityCurves` from the content of a ``sensitivity.json``.

    Args:
        data: the parsed JSON (layout in docs/architecture.md, section allocate.py).
        source: ``ablation`` (measured loss changes), ``predicted`` (from ``diagnostic``) or
            ``auto`` (ablation when every component has it, else predicted).
        predicted_tail: with measured curves, shape the curve beyond the largest measured
            sparsity ``m`` with the prediction: at each predicted sparsity ``s > m`` the damage
            is the larger of the conservative extrapolation and ``D(m) + max(0, P(s) - P(m))``
            (the measured level plus the predicted increase). The extrapolation cap still counts
            from ``m``.
        diagnostic: which predicted loss change to use: ``total`` (first + second order, the
            default), ``second_order`` (alias ``obd``) or ``first_order`` (alias ``taylor``).
        metric: which measured change to use (``loss_delta`` or ``wer_delta``).
        uncertainty: measured loss changes are read as ``mean + uncertainty * SE`` over the
            calibration utterances (``ablation_per_utterance`` in the JSON; 0: the plain mean).
            Picking the components whose loss happened to fall on a small calibration set is a
            winner's curse; one standard error (the default) makes a change that is within the
            noise count as damage rather than as a free lunch.
        path: where the data came from, for messages.

    Returns:
        The curves and counts; components without any point of the chosen source are left out
        (with a warning) and so stay unpruned.

    Raises:
        ValueError: missing counts, no usable curve, or an unknown source.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    where = path or "sensitivity data"
    comps = data.get("components")
    if not isinstance(comps, list) or not comps:
        raise ValueError(f"{where}: no 'components' list")
    counts_raw = data.get("param_counts")
    if not isinstance(counts_raw, Mapping) or not {"linear", "all"} <= set(counts_raw):
        raise ValueError(
            f"{where}: missing 'param_counts' {{'linear': N, 'all': N}} (needed to turn sparsities "
            "into a model-wide sparsity)"
        )
    counts = ParamCounts(linear=int(counts_raw["linear"]), all=int(counts_raw["all"]))
    if uncertainty < 0:
        raise ValueError(f"uncertainty must be >= 0 (standard errors), got {uncertainty}")
    per_utt = (data.get("ablation_per_utterance") or {}).get("rows") or {}
    if source == "auto":
        has_abl = all(_ablation_points(c, metric) for c in comps)
        source = "ablation" if has_abl else "predicted"
        log.info("allocation source: %s", source)
    curves = []
    for c in comps:
        cid = c.get("id")
        if not cid:
            raise ValueError(f"{where}: a component has no 'id'")
        kind = str(c.get("kind", ""))
        n = c.get("n_weights")
        if n is None:
            raise ValueError(f"{where}: component {cid!r} has no 'n_weights'")
        measured_max = None
        if source == "ablation":
            pts = _ablation_points(c, metric, per_utt, uncertainty)
            src = f"ablation:{metric}" + (f"+{uncertainty:g}se" if uncertainty and per_utt else "")
            pred = dict(_predicted_points(c, diagnostic)) if predicted_tail and pts else {}
            m = max(s for s, _ in pts) if pts else 0.0
            if pred and m in pred and any(s > m for s in pred):
                d_m = float(interpolate_damage(pts, m))
                tail = [(s, max(float(interpolate_damage(pts, s)), d_m + max(0.0, p - pred[m])))
                        for s, p in sorted(pred.items()) if s > m]
                pts, src, measured_max = sorted(pts + tail), f"{src}+predicted:{diagnostic}", m
        else:
            pts, src = _predicted_points(c, diagnostic), f"predicted:{diagnostic}"
        if not pts:
            log.warning("component %s has no %s points; it stays unpruned", cid, src)
            continue
        linear = c.get("linear")
        if linear is None and c.get("category") is not None:
            linear = c.get("category") == "linear"
        curves.append(
            ComponentCurve(
                id=str(cid),
                kind=kind,
                n_weights=int(n),
                points=tuple(pts),
                source=src,
                linear=bool(linear) if linear is not None else _is_linear(kind, str(cid)),
                measured_max=measured_max,
            )
        )
    if not curves:
        raise ValueError(f"{where}: no component has a {source} damage curve")
    n_lin = sum(c.n_weights for c in curves if c.linear)
    if n_lin > counts.linear:
        raise ValueError(
            f"{where}: the linear components hold {n_lin} weights but param_counts.linear is "
            f"{counts.linear}; the counts do not belong to these components"
        )
    if n_lin < counts.linear:
        log.warning(
            "%s: the linear components with curves cover %d of %d linear weights (%.1f%%); the "
            "rest stays unpruned but counts in the denominator", where, n_lin, counts.linear,
            100 * n_lin / counts.linear,
        )
    return SensitivityCurves(
        components=tuple(curves),
        counts=counts,
        scope=str(data.get("scope", "component")),
        score=str(data.get("method") or "magnitude"),
        path=path,
        model=data.get("model") if isinstance(data.get("model"), str) else None,
    )


def load_sensitivity(path: str | Path, **kwargs) -> SensitivityCurves:
    """Read ``sensitivity.json`` (or a directory holding it) into curves.

    Args:
        path: the file or its directory.
        **kwargs: passed to :func:`curves_from_dict` (``source``, ``diagnostic``, ``metric``).

    Raises:
        FileNotFoundError: no ``sensitivity.json`` there.
        ValueError: the file is not valid JSON or lacks what allocation needs.
    """
    data = load_sensitivity_json(path)
    return curves_from_dict(data, path=data.pop("_path"), **kwargs)


# ----------------------------------------------------------------------------------------------
# curves on a grid, convex hulls
# ----------------------------------------------------------------------------------------------


def make_grid(step: float = 0.05, max_sparsity: float = 0.9) -> np.ndarray:
    """Sparsity grid ``0, step, ..., max_sparsity`` (shape (K,))."""
    if not 0 < step <= 0.5:
        raise ValueError(f"grid step must be in (0, 0.5], got {step}")
    if not 0 < max_sparsity <= 1:
        raise ValueError(f"max sparsity must be in (0, 1], got {max_sparsity}")
    k = int(round(max_sparsity / step))
    grid = np.round(np.arange(k + 1) * step, 10)
    if grid[-1] < max_sparsity - 1e-9:
        grid = np.append(grid, max_sparsity)
    return np.minimum(grid, max_sparsity)


def monotone_points(points: Iterable[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Known points + (0, 0), negatives clipped to 0, made non-decreasing (running max).

    Returns:
        (sparsities, damages), both shape (P,), sparsities strictly increasing from 0.
    """
    pts = {0.0: 0.0}
    for s, d in points:
        s = float(s)
        pts[s] = max(pts.get(s, 0.0) if s != 0.0 else 0.0, max(0.0, float(d)))
    s = np.array(sorted(pts))
    d = np.maximum.accumulate(np.array([pts[x] for x in s]))
    return s, d


def interpolate_damage(
    points: Iterable[tuple[float, float]], sparsity: np.ndarray | float, *, min_exponent: float = 2.0
) -> np.ndarray:
    """Damage at arbitrary sparsities: piecewise-linear inside the known range, conservative outside.

    Beyond the largest known sparsity ``s_max`` the value is the larger of the linear
    continuation of the last segment and ``D(s_max) * (s / s_max) ** p`` with
    ``p = clip(max(min_exponent, fitted), ..., 6)`` where ``fitted`` is the power-law exponent
    through the last two known points with positive damage.

    Args:
        points: known ``(sparsity, damage)`` pairs.
        sparsity: where to evaluate, scalar or shape (K,).
        min_exponent: smallest extrapolation exponent.

    Returns:
        Damages, same shape as ``sparsity``.
    """
    xs, ys = monotone_points(points)
    q = np.asarray(sparsity, dtype=float)
    inside = np.interp(q, xs, ys)
    s_max, d_max = xs[-1], ys[-1]
    if s_max <= 0:  # nothing known: no information, assume nothing (caller caps these)
        return inside
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) >= 2 else 0.0
    p = min_exponent
    pos = [(x, y) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pos) >= 2 and pos[-1][1] > pos[-2][1]:
        fitted = math.log(pos[-1][1] / pos[-2][1]) / math.log(pos[-1][0] / pos[-2][0])
        p = max(p, fitted)
    p = min(p, 6.0)
    beyond = np.maximum(d_max + slope * (q - s_max), d_max * (np.maximum(q, s_max) / s_max) ** p)
    return np.where(q > s_max, beyond, inside)


def lower_hull(xs: np.ndarray, ys: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of points sorted by x (monotone chain), first to last."""
    hull: list[int] = []
    for i in range(len(xs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> i
            cross = (xs[b] - xs[a]) * (ys[i] - ys[a]) - (ys[b] - ys[a]) * (xs[i] - xs[a])
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


# ----------------------------------------------------------------------------------------------
# the allocation
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentAllocation:
    """One row of the allocation table."""

    id: str
    kind: str
    n_weights: int
    linear: bool
    cap: float
    cap_reason: str
    sparsity: float
    pruned_weights: int
    predicted_damage: float
    source: str
    max_known_sparsity: float


@dataclass(frozen=True)
class Allocation:
    """A solved allocation.

    Attributes:
        plan: the plan (``PlanEntry(component_id, sparsity)`` for each pruned component).
        rows: the table, one row per component (pruned or not).
        target: the requested sparsity; denominator: ``linear`` or ``all``.
        sparsity_linear, sparsity_all: achieved sparsity of all linear weights / all parameters
            (pruned weights counted as ``round(s * n)`` per component, as ``keep_mask`` does).
        predicted_damage: sum of the components' predicted damages (real curves).
        multiplier: the Lagrange multiplier (marginal damage per pruned weight) at the optimum.
    """

    plan: PrunePlan
    rows: tuple[ComponentAllocation, ...]
    target: float
    denominator: str
    counts: ParamCounts
    sparsity_linear: float
    sparsity_all: float
    predicted_damage: float
    multiplier: float
    options: Mapping = field(default_factory=dict)

    @property
    def achieved(self) -> float:
        """Achieved sparsity under the chosen denominator."""
        return self.sparsity_linear if self.denominator == "linear" else self.sparsity_all

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "denominator": self.denominator,
            "achieved": self.achieved,
            "sparsity_linear": self.sparsity_linear,
            "sparsity_all": self.sparsity_all,
            "param_counts": {"linear": self.counts.linear, "all": self.counts.all},
            "pruned_weights": sum(r.pruned_weights for r in self.rows),
            "predicted_damage": self.predicted_damage,
            "multiplier": self.multiplier,
            "options": dict(self.options),
            "plan": self.plan.to_dict(),
            "components": [r.__dict__ for r in self.rows],
        }


def match_caps(cid: str, kind: str, caps: Mapping[str, float] | None) -> tuple[float, str] | None:
    """The smallest user cap whose key matches the component id or kind (exact or glob)."""
    best = None
    for key, value in (caps or {}).items():
        if key in (cid, kind) or fnmatch.fnmatchcase(cid, key) or fnmatch.fnmatchcase(kind, key):
            if best is None or value < best[0]:
                best = (float(value), f"cap {key}={value}")
    return best


def parse_caps(items: Sequence[str]) -> dict[str, float]:
    """Parse ``["decoder_ffn=0.3", "*bias*=0"]`` into a dict; raises ValueError naming the bad item."""
    caps = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            v = float(value)
        except ValueError:
            v = float("nan")
        if not sep or not key.strip() or not 0.0 <= v <= 1.0:
            raise ValueError(f"--cap {item!r}: expected KIND_OR_ID=SPARSITY with 0 <= SPARSITY <= 1")
        caps[key.strip()] = v
    return caps


def _fragile_cap(points, threshold: float, grid: np.ndarray) -> float:
    dam = interpolate_damage(points, grid)
    ok = grid[dam <= threshold + 1e-15]
    return float(ok.max()) if len(ok) else 0.0


def allocate_plan(
    curves: SensitivityCurves,
    target: float,
    *,
    denominator: str = "linear",
    caps: Mapping[str, float] | None = None,
    grid_step: float = 0.05,
    max_sparsity: float = 0.9,
    max_extrapolation: float = 0.1,
    fragile_threshold: float | None = None,
    scope: str | None = None,
    decimals: int = 4,
) -> Allocation:
    """Per-component sparsities reaching ``target`` with the least predicted damage.

    See the module docstring for the method.

    Args:
        curves: damage curves and parameter counts (:func:`load_sensitivity`).
        target: fraction of the denominator to prune, in (0, 1).
        denominator: ``linear`` (all linear weights) or ``all`` (all parameters).
        caps: ``{component id or kind or glob: max sparsity}``.
        grid_step, max_sparsity: the sparsity grid.
        max_extrapolation: how far beyond its largest measured sparsity a component may go
            (0.1: with the default ablation at 0.3 and 0.5, no component above 0.6).
        fragile_threshold: if given, cap each component where its curve exceeds this damage.
        scope: plan entry scope (default: the scope the ablation used, usually ``component``).
        decimals: sparsities in the plan are rounded to this many decimals.

    Returns:
        The :class:`Allocation`; its achieved sparsity is within 0.5 points of ``target``.

    Raises:
        AllocationError: the caps do not allow ``target`` or inputs are out of range.
    """
    _check_denominator(denominator)
    if not 0.0 < target < 1.0:
        raise AllocationError(f"target sparsity must be in (0, 1), got {target}")
    grid = make_grid(grid_step, max_sparsity)
    counts = curves.counts
    denom = counts.denominator(denominator)
    need = target * denom  # weights to prune

    comps = list(curves.components)
    total_curve_weights = sum(c.n_weights for c in comps)
    max_abs = max((abs(d) for c in comps for _, d in c.points), default=0.0)
    eps = 1e-6 * max_abs if max_abs > 0 else 1e-12

    # caps and per-component grids
    infos = []
    for c in comps:
        s_known = c.known_max
        cap, reason = max_sparsity, f"max sparsity {max_sparsity}"
        ext_cap = min(1.0, s_known + max_extrapolation)
        if ext_cap < cap:
            cap, reason = ext_cap, f"known up to {s_known:g} + {max_extrapolation:g}"
        user = match_caps(c.id, c.kind, caps)
        if user and user[0] < cap:
            cap, reason = user
        if fragile_threshold is not None:
            fc = _fragile_cap(c.points, fragile_threshold, grid)
            if fc < cap:
                cap, reason = fc, f"fragile: damage > {fragile_threshold:g} beyond {fc:g}"
        if "bias" in f"{c.kind} {c.id}".lower():
            cap, reason = 0.0, "biases are not pruned"
        if denominator == "linear" and not c.linear:
            cap, reason = 0.0, "not a linear weight (denominator linear)"
        cap = max(0.0, cap)
        xs = grid[grid < cap - 1e-12]
        xs = np.append(xs, cap) if cap > 0 else np.array([0.0])
        ys = interpolate_damage(c.points, xs) + eps * (c.n_weights / total_curve_weights) * xs**2
        infos.append((c, cap, reason, xs, ys, s_known))

    counts_in_num = [c.n_weights if (denominator == "all" or c.linear) else 0 for c, *_ in infos]
    reachable = sum(n * cap for n, (c, cap, *_ ) in zip(counts_in_num, infos))
    if reachable + 0.5 < need:
        raise AllocationError(
            f"target sparsity {target:.3f} of {denominator} weights is not reachable: the caps "
            f"allow at most {reachable / denom:.4f} (loosen --cap, --max-extrapolation or "
            "--max-sparsity, or use a lower --target)"
        )

    # hull segments: (cost per weight, component index, segment index, ds, dD)
    segments = []
    for i, (c, cap, reason, xs, ys, _) in enumerate(infos):
        if counts_in_num[i] == 0 or cap <= 0:
            continue
        h = lower_hull(xs, ys)
        for j in range(len(h) - 1):
            a, b = h[j], h[j + 1]
            ds, dd = xs[b] - xs[a], ys[b] - ys[a]
            segments.append((dd / (counts_in_num[i] * ds), i, j, float(xs[a]), float(ds)))
    segments.sort(key=lambda t: (t[0], t[1], t[2]))

    s_alloc = [0.0] * len(infos)
    remaining = need
    multiplier = 0.0
    for cost, i, _j, s0, ds in segments:
        if remaining <= 1e-9:
            break
        w = counts_in_num[i] * ds
        take = min(1.0, remaining / w)
        s_alloc[i] = s0 + take * ds
        remaining -= take * w
        multiplier = cost

    rows = []
    entries = []
    pruned_linear = pruned_all = 0
    total_damage = 0.0
    for i, (c, cap, reason, xs, ys, s_known) in enumerate(infos):
        s = min(cap, round(s_alloc[i], decimals))
        pruned = int(round(s * c.n_weights))
        dmg = float(interpolate_damage(c.points, s)) if s > 0 else 0.0
        total_damage += dmg
        pruned_all += pruned
        if c.linear:
            pruned_linear += pruned
        rows.append(
            ComponentAllocation(
                id=c.id, kind=c.kind, n_weights=c.n_weights, linear=c.linear, cap=cap,
                cap_reason=reason, sparsity=s, pruned_weights=pruned, predicted_damage=dmg,
                source=c.source, max_known_sparsity=s_known,
            )
        )
        if s > 0:
            entries.append(PlanEntry(selector=c.id, sparsity=s, scope=scope or curves.scope))
    sp_lin = pruned_linear / counts.linear
    sp_all = pruned_all / counts.all
    achieved = sp_lin if denominator == "linear" else sp_all
    if abs(achieved - target) > TOLERANCE:
        raise AllocationError(
            f"allocation reached {achieved:.4f} of {denominator} weights instead of {target:.4f}; "
            "this means the component sizes in the sensitivity results do not add up "
            "(check n_weights against param_counts)"
        )
    log.info(
        "allocated %d components: %.4f of linear weights, %.4f of all parameters, damage %.4g",
        len(entries), sp_lin, sp_all, total_damage,
    )
    return Allocation(
        plan=PrunePlan(entries=tuple(entries), score=curves.score),
        rows=tuple(rows),
        target=target,
        denominator=denominator,
        counts=counts,
        sparsity_linear=sp_lin,
        sparsity_all=sp_all,
        predicted_damage=total_damage,
        multiplier=multiplier,
        options={
            "grid_step": grid_step, "max_sparsity": max_sparsity,
            "max_extrapolation": max_extrapolation, "fragile_threshold": fragile_threshold,
            "caps": dict(caps or {}), "source": sorted({c.source for c in comps}),
            "sensitivity": curves.path,
        },
    )


def uniform_damage(curves: SensitivityCurves, sparsity: float) -> float:
    """Predicted damage when every linear component of ``curves`` is pruned at ``sparsity``."""
    return float(sum(interpolate_damage(c.points, sparsity) for c in curves.components if c.linear))


def baseline_plans(target: float, counts: ParamCounts, denominator: str = "linear") -> dict[str, PrunePlan]:
    """The two reference plans at the same sparsity as an allocation.

    ``uniform``: every linear weight matrix at the same sparsity (``all_linear``, scope
    ``matrix``). ``global``: one magnitude threshold pooled over all linear weights (``all_linear``,
    mode ``global``). Under the ``all`` denominator the linear sparsity is raised so that the
    pruned weights are ``target`` of all parameters.

    Raises:
        AllocationError: the ``all`` target needs more than all linear weights.
    """
    _check_denominator(denominator)
    s = target if denominator == "linear" else target * counts.all / counts.linear
    if s >= 1.0:
        raise AllocationError(
            f"target {target} of all parameters needs {s:.3f} of the linear weights (>= 1)"
        )
    s = round(s, 4)
    return {
        "uniform": PrunePlan(entries=(PlanEntry(selector="all_linear", sparsity=s, scope="matrix"),)),
        "global": PrunePlan(entries=(PlanEntry(selector="all_linear", sparsity=s),), mode="global"),
    }


def format_table(alloc: Allocation) -> str:
    """The allocation as a fixed-width text table (for the CLI)."""
    lines = [f"{'component':<48} {'kind':<20} {'weights':>10} {'cap':>6} {'sparsity':>8} {'damage':>10}"]
    for r in sorted(alloc.rows, key=lambda r: r.id):
        lines.append(
            f"{r.id:<48} {r.kind:<20} {r.n_weights:>10d} {r.cap:>6.3f} {r.sparsity:>8.4f} "
            f"{r.predicted_damage:>10.4g}"
        )
    lines.append(
        f"achieved sparsity: {alloc.achieved:.4f} of {alloc.denominator} weights "
        f"(target {alloc.target:.4f}); linear {alloc.sparsity_linear:.4f} of {alloc.counts.linear}, "
        f"all {alloc.sparsity_all:.4f} of {alloc.counts.all}; predicted damage "
        f"{alloc.predicted_damage:.4g}"
    )
    return "\n".join(lines)


def write_allocation(alloc: Allocation, out: str | Path, *, baselines: bool = True) -> dict[str, Path]:
    """Write ``plan.yaml`` (PrunePlan YAML, metadata as comments), ``<stem>.json`` and baselines.

    Args:
        alloc: the allocation.
        out: path of the plan YAML; siblings ``<stem>.json``, ``<stem>.uniform.yaml`` and
            ``<stem>.global.yaml`` are written next to it.
        baselines: also write the uniform and global plans at the same sparsity.

    Returns:
        ``{"plan": path, "table": path, "uniform": path, "global": path}``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# sensitivity-aware plan from asrprune allocate\n"
        f"# target {alloc.target:.4f} of {alloc.denominator} weights; achieved: linear "
        f"{alloc.sparsity_linear:.4f} of {alloc.counts.linear}, all {alloc.sparsity_all:.4f} of "
        f"{alloc.counts.all}\n# predicted damage {alloc.predicted_damage:.6g}\n"
    )
    paths = {"plan": out, "table": out.with_suffix(".json")}
    atomic_write_text(out, header + alloc.plan.to_yaml())
    atomic_write_text(paths["table"], json.dumps(alloc.to_dict(), indent=2) + "\n")
    if baselines:
        for name, plan in baseline_plans(alloc.target, alloc.counts, alloc.denominator).items():
            p = out.with_name(f"{out.stem}.{name}.yaml")
            atomic_write_text(
                p,
                f"# {name} baseline at the same sparsity: {alloc.target:.4f} of "
                f"{alloc.denominator} weights\n" + plan.to_yaml(),
            )
            paths[name] = p
    return paths


def verify_allocation(alloc: Allocation, model) -> dict:
    """Check an allocation against a real model: counts, component sizes, measured sparsity.

    Prunes ``model`` with ``alloc.plan``, counts the zeros before and after, and restores the
    weights bit for bit.
    Zeros the model already had (e.g. zero-initialised biases) are not the plan's doing, so the
    target is checked on the newly zeroed fraction; the measured totals are returned as well.

    Args:
        alloc: the allocation.
        model: the Whisper model the sensitivity results belong to (left unchanged).

    Returns:
        ``{"sparsity_linear", "sparsity_all"}``: measured fractions of zeros after pruning;
        ``{"pruned_linear", "pruned_all"}``: fractions newly zeroed by the plan;
        ``{"linear_weights", "all_parameters"}``: the model's counts.

    Raises:
        AllocationError: the model's counts or component sizes differ from the sensitivity
            results, or the newly pruned fraction misses the target by more than 0.5 points.
    """
    before = measure_model(model)
    n_lin, n_all = before.linear_weights.numel, before.all_parameters.numel
    if (n_lin, n_all) != (alloc.counts.linear, alloc.counts.all):
        raise AllocationError(
            f"the model has {n_lin} linear weights and {n_all} parameters, the sensitivity results "
            f"say {alloc.counts.linear} and {alloc.counts.all}: they belong to another model"
        )
    params = dict(model.named_parameters())
    for row in alloc.rows:
        n = sum(params[p].numel() for p in select_parameters(model, row.id))
        if n != row.n_weights:
            raise AllocationError(
                f"component {row.id!r} selects {n} weights in the model, the sensitivity results "
                f"say {row.n_weights}"
            )
    with WeightSnapshot(model, [n for names in resolve_plan(model, alloc.plan) for n in names]):
        after = prune_model(model, alloc.plan).model
    out = {
        "sparsity_linear": after.linear_weights.sparsity,
        "sparsity_all": after.all_parameters.sparsity,
        "pruned_linear": (after.linear_weights.zeros - before.linear_weights.zeros) / n_lin,
        "pruned_all": (after.all_parameters.zeros - before.all_parameters.zeros) / n_all,
        "linear_weights": n_lin,
        "all_parameters": n_all,
    }
    measured = out["pruned_linear"] if alloc.denominator == "linear" else out["pruned_all"]
    if abs(measured - alloc.target) > TOLERANCE:
        raise AllocationError(
            f"pruning the model with the plan zeroes {measured:.4f} of its {alloc.denominator} "
            f"weights, not {alloc.target:.4f} within {TOLERANCE}"
        )
    return out
