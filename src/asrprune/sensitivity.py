"""Sensitivity diagnostics of Whisper components, and a check of whether they predict pruning damage.

Everything is measured on *calibration* data with the teacher-forced cross-entropy of the
decoder (no decoding in the loop), one utterance per backward pass so that every per-utterance
gradient ``g_i`` is exact. The per-utterance loss ``L_i`` is the sequence negative
log-likelihood ``-log p(y_i | x_i)`` = the *sum* of the token cross-entropies over the text and
end-of-text targets (``loss_reduction="sum"``, default). Why the sum and not the per-token mean
(HF's ``labels=`` loss): the Fisher identity ``E[g g^T] ~ E[Hessian]`` that OBD relies on holds
for a log-likelihood. For the mean over ``T`` tokens the squared gradient scales like ``1/T^2``
but the Hessian like ``1/T``, so the OBD term would come out about ``T`` times too small
(``T`` ~ 25 tokens on LJ Speech) against the measured loss change. The objective of the
predictions and of the measured ablation is therefore the mean over utterances of ``L_i``
(nats per utterance); ``loss_reduction="mean"`` is available for comparison with the paper.
Per parameter ``w`` (all in fp32, over ``n`` utterances):

- ``gradient``  = mean_i |g_i|                 (the authors' "gradient sensitivity"; they
                                                  min-max normalise it across weight matrices)
- ``taylor``    = mean_i |w * g_i| = |w| * mean_i |g_i|
                  (first-order Taylor importance, *per-utterance* absolute values averaged, not
                  ``|w * mean_i g_i|``: near a trained optimum the mean gradient largely cancels
                  across utterances and what is left mostly reflects which utterances happened to
                  be drawn; the per-utterance form measures how strongly each weight drives each
                  utterance's loss. The signed data-set term enters the predicted loss below.)
- ``fisher``    = mean_i g_i^2                 (empirical Fisher diagonal from per-utterance
                                                  gradients, never the square of a batch-mean gradient)
- ``obd``       = 1/2 * fisher * w^2           (Optimal Brain Damage saliency with the Fisher as
                                                  the diagonal Hessian)

Predicted loss increase of pruning a component at sparsity ``s`` (the weights ``R`` that
magnitude pruning removes, found by running :func:`asrprune.prune.prune_model` and restoring):
``first_order = sum_{j in R} -gbar_j * w_j`` (``gbar`` = mean gradient; setting ``w`` to 0 is a
step ``-w``), ``second_order = sum_{j in R} obd_j``, ``total = first_order + second_order``.
Both the loss and these terms are in units of the mean over utterances of ``L_i``.

Labels, their text form and teacher forcing: :mod:`asrprune.calibration`. Predicted and measured
damage: :mod:`asrprune.damage`. The layout of ``sensitivity.json`` is written down once, in
``docs/architecture.md`` ("sensitivity.json"), and :mod:`asrprune.allocate` reads exactly it.

Output directory (see :func:`write_outputs`): ``sensitivity.json``, CSV tables, ``labels.jsonl``,
the accumulator checkpoint ``accumulators.safetensors`` (+ ``.json``) and ``ablation.jsonl``;
every step resumes from these. The heatmaps are drawn from ``sensitivity.json`` by
:func:`asrprune.figures.draw_heatmaps`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from .calibration import (
    CalibrationOptions,
    collect_input_stats,
    LOSS_REDUCTIONS,
    LabelSpec,
    build_examples,
)
from .components import SelectorError, linear_weight_names, list_components, select_components, select_parameters
from .config import CALIBRATED_SCORES, DIAGNOSTICS, check_sparsity, score_scopes
from .damage import measure_ablation, predict_loss_curve, target_key
from .decoding import DecodeOptions, EncoderCache
from .evaluation import evaluate
from .gradients import GradientStats, ResumeMismatchError, accumulate_gradients
from .files import OutputLock, atomic_write_json, env_stamp, jsonable, prepare_out_dir
from .manifests import Utterance
from .models import model_fingerprint
from .prune import PruningMethod
from .overlap import Overlap, check_disjoint
from .stats import spearman_with_ci

log = logging.getLogger(__name__)

__all__ = [
    "PREDICTION_TERMS",
    "DEFAULT_GROUPS",
    "SensitivityOptions",
    "GradientStats",
    "SensitivityResult",
    "ResumeMismatchError",
    "accumulate_gradients",
    "Unit",
    "analysis_units",
    "unit_for_selector",
    "aggregate",
    "correlate",
    "prediction_check",
    "score_sensitivity",
    "write_outputs",
    "load_sensitivity_json",
]

PREDICTION_TERMS = ("first_order", "second_order", "total")
# Groups ablated besides the per-layer components (names of components.py's named groups);
# a name the model lacks is skipped with a log line.
DEFAULT_GROUPS = (
    "encoder_self_attn",
    "encoder_ffn",
    "late_encoder",
    "decoder_self_attn",
    "cross_attn",
    "decoder_ffn",
    "early_decoder",
    "biases",
)
SCHEMA = "asrprune.sensitivity/1"
DEFAULT_PREDICTION_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

DEFINITIONS = {
    "gradient": "mean over utterances of |dL_i/dw|, L_i the teacher-forced loss of utterance i "
    "(batch 1; see loss_units)",
    "taylor": "mean over utterances of |w * dL_i/dw| = |w| * gradient (per-utterance absolute "
    "values averaged, not |w * mean gradient|)",
    "fisher": "empirical Fisher diagonal: mean over utterances of (dL_i/dw)^2",
    "obd": "Optimal Brain Damage saliency 0.5 * fisher * w^2",
    "first_order": "predicted loss change, first-order term: sum over the weights magnitude "
    "pruning removes of -mean_gradient * w",
    "second_order": "predicted loss change, second-order term: sum over the removed weights of "
    "0.5 * fisher * w^2 (= OBD)",
    "total": "first_order + second_order",
    "loss_delta": "measured change of the mean of L_i over the calibration "
    "utterances when only this component is magnitude-pruned at s (weights restored after)",
    "wer_delta": "measured change of calibration WER (fraction) when only this component is "
    "pruned at s (evaluation.evaluate, greedy)",
    "sum": "sum of the per-parameter diagnostic over the unit's parameters",
    "mean": "per-parameter mean over the unit's parameters (sum / n_params)",
    "minmax": "(mean - min) / (max - min) of the per-parameter means across the units of the "
    "same level (matrix level: across all parameter tensors, the authors' normalisation)",
    "loss_units": "mean over utterances of L_i; with loss_reduction 'sum' (default) L_i is the "
    "sequence NLL (sum of token cross-entropies over text + end-of-text targets, nats per "
    "utterance), with 'mean' the per-token mean (nats per token)",
}




# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SensitivityOptions:
    """Options of a sensitivity run (checked once, here).

    Attributes:
        labels: how calibration utterances are labelled for teacher forcing
            (:class:`asrprune.calibration.LabelSpec`; a string is read as its ``labels`` field,
            ``"reference"`` or ``"greedy"``).
        ablation_sparsities: sparsities of the measured ablation (empty: no ablation).
        prediction_sparsities: sparsities at which the predicted loss change is tabulated
            (the ablation sparsities are always added).
        groups: named component groups ablated besides the per-layer components.
        ablation_wer: also measure calibration WER per ablation (decoding; slow).
        checkpoint_every: write the accumulator checkpoint every this many utterances.
        n_bootstrap: bootstrap resamples (over components) for the Spearman intervals.
        seed: seed of the bootstrap.
        cache_mb: memory budget for cached encoder states in the ablation.
        targets: selectors to analyse instead of the default units (one per component kind
            per layer, see :func:`analysis_units`).
        loss_reduction: per-utterance loss: ``"sum"`` (sequence NLL; default, see the module
            docstring) or ``"mean"`` (per-token mean, as HF's ``labels=`` loss).
        method: how the ablation prunes (``magnitude``, ``wanda``, ``sparsegpt``): measure the
            sensitivity under the method that will prune. A calibrated method prunes each target
            from one pass of dense-model statistics over the calibration set (what its sequential
            pass would give a component pruned alone), and only targets made of linear weights
            are ablated.
        calibration: the calibrated method's options (frames, damp, block size; its labels are
            ``labels``).
    """

    labels: LabelSpec = field(default_factory=LabelSpec)
    ablation_sparsities: tuple[float, ...] = (0.3, 0.5)
    prediction_sparsities: tuple[float, ...] = DEFAULT_PREDICTION_SPARSITIES
    groups: tuple[str, ...] = DEFAULT_GROUPS
    ablation_wer: bool = False
    checkpoint_every: int = 10
    n_bootstrap: int = 2000
    seed: int = 0
    cache_mb: float = 2048.0
    targets: tuple[str, ...] | None = None
    loss_reduction: str = "sum"
    method: str = "magnitude"
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)

    def __post_init__(self) -> None:
        if isinstance(self.labels, str):
            object.__setattr__(self, "labels", LabelSpec(labels=self.labels))
        if self.method not in ("magnitude", *CALIBRATED_SCORES):
            raise ValueError(f"method must be one of {['magnitude', *CALIBRATED_SCORES]}, got {self.method!r}")
        if not isinstance(self.calibration, CalibrationOptions):
            raise ValueError("calibration must be CalibrationOptions")
        if not isinstance(self.labels, LabelSpec):
            raise ValueError(f"labels must be a LabelSpec or 'reference'/'greedy', got {self.labels!r}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {list(LOSS_REDUCTIONS)}, got {self.loss_reduction!r}")
        for what in ("ablation_sparsities", "prediction_sparsities"):
            values = tuple(getattr(self, what))
            for s in values:
                check_sparsity(s, f"{what}: every sparsity", positive=True, error=ValueError)
            object.__setattr__(self, what, tuple(sorted({float(s) for s in values})))
        object.__setattr__(self, "groups", tuple(self.groups))
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
            if not self.targets:
                raise ValueError("targets, when given, must name at least one selector")
        for what in ("checkpoint_every", "n_bootstrap"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be a positive integer, got {value!r}")
        if not self.cache_mb >= 0:
            raise ValueError(f"cache_mb must be >= 0, got {self.cache_mb!r}")

    @property
    def label_spec(self) -> LabelSpec:
        """How calibration utterances are labelled (:class:`asrprune.calibration.LabelSpec`)."""
        return self.labels

    @property
    def all_prediction_sparsities(self) -> tuple[float, ...]:
        return tuple(sorted(set(self.prediction_sparsities) | set(self.ablation_sparsities)))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.method == "magnitude":  # as before the option existed: older files compare equal
            d.pop("method")
            d.pop("calibration")
        else:
            d["calibration"] = self.calibration.to_dict()
        return d




@dataclass(frozen=True)
class Unit:
    """A set of parameters analysed and ablated together (the default units: one per component
    kind per layer, plus the layer-less parts).

    Attributes:
        id: a selector (``encoder.layers.3.self_attn``, ``decoder.embed_tokens``, a group name).
        kind: ``components.ComponentKind`` value shared by its components (or ``"mixed"``).
        side: ``"encoder"``, ``"decoder"``, ``"model"`` or ``"mixed"``.
        layer: layer index when all its components are in one layer, else None.
        category: ``"linear"``, ``"norm"``, ``"conv"``, ``"embedding"``, ``"other"`` or ``"mixed"``.
        params: the parameter names the selector picks (what pruning it touches).
    """

    id: str
    kind: str
    side: str
    layer: int | None
    category: str
    params: tuple[str, ...]


def _unit_part(c) -> str:
    head = c.part[0] if c.part else c.id.rsplit(".", 1)[-1]
    if c.layer is not None:
        if head in ("fc1", "fc2"):
            return "ffn"
        if head.endswith("layer_norm"):
            return "layer_norms"
        return head
    if head in ("conv1", "conv2"):
        return "conv"
    return head


def unit_for_selector(model, selector: str) -> Unit:
    """Describe a selector as a :class:`Unit` (kind, side, layer from its components).

    Raises:
        components.SelectorError: the selector matches nothing.
    """
    names = tuple(select_parameters(model, selector))
    comps = select_components(model, selector)

    def one(values, default):
        values = set(values)
        return values.pop() if len(values) == 1 else default

    return Unit(
        id=selector,
        kind=one((_kind_str(c.kind) for c in comps), "mixed"),
        side=one((c.side for c in comps), "mixed"),
        layer=one((c.layer for c in comps), None),
        category=one((c.category for c in comps), "mixed"),
        params=names,
    )


def analysis_units(model) -> list[Unit]:
    """The default units: each component kind in each layer, plus the layer-less parts.

    E.g. ``encoder.layers.0.self_attn`` (q, k, v, out weights), ``encoder.layers.0.ffn`` (fc1,
    fc2), ``encoder.layers.0.layer_norms``, ``decoder.layers.0.encoder_attn``, ``encoder.conv``,
    ``encoder.embed_positions``, ``decoder.embed_tokens``, ``decoder.layer_norm``. The units
    are disjoint and cover every weight; biases are selected by none of them (the ``biases``
    group covers them), following the selector rule of ``components``.

    Returns:
        Units in model order.
    """
    seen: dict[str, list] = {}
    for c in list_components(model):
        p = _unit_part(c)
        if c.side not in ("encoder", "decoder"):
            uid = p if p == "proj_out" else c.id
        elif c.layer is not None:
            uid = f"{c.side}.layers.{c.layer}.{p}"
        else:
            uid = f"{c.side}.{p}"
        seen.setdefault(uid, []).append(c)
    units = []
    for uid, comps in seen.items():
        try:
            unit = unit_for_selector(model, uid)
        except SelectorError:
            unit = unit_for_selector(model, "+".join(c.id for c in comps))
        if unit.params:
            units.append(unit)
    return units


# ----------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------


def aggregate(
    param_sums: Mapping[str, Mapping[str, float]],
    numels: Mapping[str, int],
    units: Mapping[str, Sequence[str]],
) -> dict[str, dict[str, dict[str, float]]]:
    """Aggregate per-parameter diagnostics to units (matrices, components, layers, kinds).

    Args:
        param_sums: diagnostic -> parameter name -> sum of the diagnostic over that tensor.
        numels: parameter name -> number of elements.
        units: unit id -> parameter names (a parameter may be in several units).

    Returns:
        unit id -> diagnostic -> ``{"sum", "mean", "minmax"}`` where ``mean`` is per parameter
        and ``minmax`` normalises ``mean`` to [0, 1] across the given units (0.0 when all equal).
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for unit, names in units.items():
        n = sum(int(numels[p]) for p in names)
        out[unit] = {}
        for diag, sums in param_sums.items():
            total = float(sum(sums[p] for p in names))
            out[unit][diag] = {"sum": total, "mean": total / n if n else float("nan")}
    for diag in param_sums:
        means = [v[diag]["mean"] for v in out.values() if math.isfinite(v[diag]["mean"])]
        lo, hi = (min(means), max(means)) if means else (0.0, 0.0)
        for v in out.values():
            m = v[diag]["mean"]
            v[diag]["minmax"] = (m - lo) / (hi - lo) if hi > lo and math.isfinite(m) else 0.0
    return out


# ----------------------------------------------------------------------------------------------
# correlations
# ----------------------------------------------------------------------------------------------


def correlate(components: Sequence[Mapping], sparsities: Sequence[float], *, n_bootstrap: int, seed: int) -> list[dict]:
    """Spearman correlations of every diagnostic / prediction with the measured ablation changes.

    Computed over two populations: ``"all"`` units, and ``"linear"`` units only (attention and
    FFN matrices, what pruning plans mostly touch; layer norms and embeddings dominate the
    ranks of ``"all"``).

    Args:
        components: component rows of ``sensitivity.json`` (with ``diagnostics``, ``predicted``,
            ``ablation``); components that pruning leaves untouched at ``s`` are left out.
        sparsities: ablation sparsities.
        n_bootstrap, seed: bootstrap settings.

    Returns:
        Rows ``{"population", "predictor", "target", "sparsity", "rho", "p", "ci", "n"}``.
    """
    rows = []
    populations = {"all": list(components), "linear": [c for c in components if c.get("linear")]}
    for population, members in populations.items():
        for s in sparsities:
            key = f"{s:g}"
            use = [c for c in members if key in c.get("ablation", {}) and c["ablation"][key].get("n_removed", 1) > 0]
            if not use:
                continue
            predictors: dict[str, list[float]] = {}
            for diag in DIAGNOSTICS:
                for agg in ("mean", "sum"):
                    predictors[f"{diag}.{agg}"] = [c["diagnostics"][diag][agg] for c in use]
            for term in PREDICTION_TERMS:
                predictors[f"predicted.{term}"] = [c["predicted"].get(key, {}).get(term, float("nan")) for c in use]
            for target in ("loss_delta", "wer_delta"):
                ys = [c["ablation"][key].get(target) for c in use]
                if all(y is None for y in ys):
                    continue
                ys = [float("nan") if y is None else float(y) for y in ys]
                for name, xs in predictors.items():
                    r = spearman_with_ci(xs, ys, n_bootstrap=n_bootstrap, seed=seed)
                    rows.append({"population": population, "predictor": name, "target": target, "sparsity": s, **r})
    return rows


def prediction_check(components: Sequence[Mapping], sparsities: Sequence[float]) -> list[dict]:
    """How well the predicted loss changes hold in absolute terms (not only in rank).

    Args:
        components: component rows with ``predicted`` and ``ablation``.
        sparsities: ablation sparsities.

    Returns:
        One row per sparsity and predicted term: ``n``, ``median_ratio`` (median over components
        of measured / predicted), ``sign_agreement`` (fraction where both have the same sign),
        ``within_2x`` (fraction with 0.5 <= measured / predicted <= 2) and ``pearson_log``
        (correlation of log10|measured| with log10|predicted|).
    """
    rows = []
    for sp in sparsities:
        k = f"{sp:g}"
        use = [c for c in components if k in c.get("ablation", {}) and c["ablation"][k].get("n_removed", 1) > 0
               and c["ablation"][k].get("loss_delta") is not None]
        for term in PREDICTION_TERMS:
            m = np.array([float(c["ablation"][k]["loss_delta"]) for c in use])
            pr = np.array([float(c["predicted"].get(k, {}).get(term, float("nan"))) for c in use])
            ok = np.isfinite(m) & np.isfinite(pr) & (pr != 0)
            m, pr = m[ok], pr[ok]
            n = int(len(m))
            if n == 0:
                rows.append({"sparsity": sp, "predicted": term, "n": 0})
                continue
            ratio = m / pr
            nz = (m != 0)
            pearson = float("nan")
            if nz.sum() >= 3:
                lm, lp = np.log10(np.abs(m[nz])), np.log10(np.abs(pr[nz]))
                if np.ptp(lm) > 0 and np.ptp(lp) > 0:
                    pearson = float(np.corrcoef(lm, lp)[0, 1])
            rows.append({
                "sparsity": sp, "predicted": term, "n": n,
                "median_ratio": float(np.median(ratio)),
                "sign_agreement": float(np.mean(np.sign(m) == np.sign(pr))),
                "within_2x": float(np.mean((ratio >= 0.5) & (ratio <= 2.0))),
                "pearson_log": pearson,
            })
    return rows


# ----------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------


@dataclass
class SensitivityResult:
    """Everything ``sensitivity.json`` holds (``data`` is that JSON object)."""

    data: dict

    @property
    def components(self) -> list[dict]:
        return self.data["components"]

    def ranking(self, by: str) -> list[str]:
        return list(self.data["ranking"][by])

    def to_dict(self) -> dict:
        return self.data


def _kind_str(kind) -> str:
    return str(getattr(kind, "value", kind))


def score_sensitivity(
    model,
    processor,
    utterances: Sequence,
    *,
    labels: str | None = None,
    options: SensitivityOptions | None = None,
    out_dir: str | os.PathLike | None = None,
    evaluation: Sequence | None = None,
    allow_overlap: bool = False,
    decode: DecodeOptions | None = None,
    data_info: Mapping | None = None,
    restart: bool = False,
    progress: bool = True,
) -> SensitivityResult:
    """Diagnostics, predicted and measured ablation, correlations: the whole sensitivity study.

    Steps (wall time of each in ``timings_s``): ``labels`` (audio, features, teacher-forcing
    labels; greedy decoding for ``labels="greedy"``), ``gradients`` (accumulation),
    ``aggregate``, ``predict`` (magnitude keep-masks -> predicted loss change), ``ablation``
    (measured loss, optional WER), ``correlate``, ``write``.

    Args:
        model: Whisper model (restored bit-exactly; checked by fingerprint).
        processor: its processor.
        utterances: calibration utterances (``manifests.Utterance``).
        labels: shortcut for ``options.labels``.
        options: :class:`SensitivityOptions`.
        out_dir: output directory (written as results come, resumed from on a rerun).
        evaluation: evaluation utterances; when given, calibration must be disjoint from them.
        allow_overlap: turn that check's error into a warning (the overlap is still recorded).
        decode: how the stage decodes (greedy labels, the WER ablation): the same
            :class:`asrprune.decoding.DecodeOptions` a study evaluates with (its ``max_new_tokens``
            caps greedy labels too); default ``DecodeOptions()``.
        data_info: extra description of the calibration data for the JSON (name, source).
        restart: delete the checkpoints in ``out_dir`` instead of resuming from them.
        progress: tqdm bars.

    Returns:
        :class:`SensitivityResult` (the content of ``sensitivity.json``).

    Raises:
        manifests.OverlapError: calibration and evaluation share utterances.
        ResumeMismatchError: ``out_dir`` holds results for other inputs (and not ``restart``).
        OutputBusyError: another process writes into ``out_dir`` (one writer per folder).
        NotADirectoryError: ``out_dir`` is a file.
        components.SelectorError: an option's target or group selects nothing.
        ValueError: empty calibration set, bad options.
    """
    # the overlap guard first: nothing is created or computed for a calibration set that is test data
    overlap = check_disjoint(utterances, evaluation, allow_overlap=allow_overlap) if evaluation is not None else None
    out = prepare_out_dir(out_dir) if out_dir is not None else None
    with OutputLock(out) if out is not None else contextlib.nullcontext():
        return _score_sensitivity(model, processor, utterances, labels=labels, options=options, out_dir=out,
                                  evaluation=evaluation, overlap=overlap, decode=decode,
                                  data_info=data_info, restart=restart, progress=progress)


def _score_sensitivity(
    model,
    processor,
    utterances: Sequence,
    *,
    labels: str | None,
    options: SensitivityOptions | None,
    out_dir: Path | None,
    evaluation: Sequence | None,
    overlap: Overlap | None,
    decode: DecodeOptions | None,
    data_info: Mapping | None,
    restart: bool,
    progress: bool,
) -> SensitivityResult:
    """:func:`score_sensitivity` with the output folder locked."""
    options = options or SensitivityOptions()
    if labels is not None and labels != options.labels.labels:
        options = dataclasses.replace(options, labels=dataclasses.replace(options.labels, labels=labels))
    utterances = list(utterances)
    if not utterances:
        raise ValueError("the calibration set is empty")
    timings: dict[str, float] = {}
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if restart:
            for name in ("labels.jsonl", "accumulators.safetensors", "accumulators.safetensors.json", "ablation.jsonl"):
                (out / name).unlink(missing_ok=True)
    t_all = time.perf_counter()
    fp = model_fingerprint(model)

    # units first: a bad --targets selector fails before any slow step
    units = [unit_for_selector(model, t) for t in options.targets] if options.targets else analysis_units(model)
    groups = []
    for g in options.groups:
        try:
            groups.append(unit_for_selector(model, g))
        except SelectorError as exc:
            log.info("group %r skipped: %s", g, exc)

    # labels
    t0 = time.perf_counter()
    examples = build_examples(model, processor, utterances, spec=options.label_spec, decode=decode,
                              labels_path=(out / "labels.jsonl") if out else None, progress=progress)
    timings["labels"] = time.perf_counter() - t0
    label_digest = hashlib.sha256(
        json.dumps([[e.id, e.decoder_input_ids[0].tolist(), e.labels[0].tolist()] for e in examples]).encode()
    ).hexdigest()[:16]
    key = hashlib.sha256(json.dumps([fp, label_digest, options.loss_reduction]).encode()).hexdigest()[:16]

    # gradients
    t0 = time.perf_counter()
    stats = accumulate_gradients(model, examples, checkpoint=(out / "accumulators.safetensors") if out else None,
                                 checkpoint_every=options.checkpoint_every, key=key,
                                 reduction=options.loss_reduction, progress=progress)
    timings["gradients"] = time.perf_counter() - t0

    # aggregate: matrix (every parameter tensor), unit, layer, kind, group
    t0 = time.perf_counter()
    params = dict(model.named_parameters())
    weights = {n: p.detach() for n, p in params.items()}
    diags = stats.diagnostics(weights)
    mean_grad = stats.mean_grad()
    fisher = stats.fisher()
    numels = {n: int(p.numel()) for n, p in params.items()}
    param_sums = {d: {n: float(t.double().sum()) for n, t in diags[d].items()} for d in DIAGNOSTICS}
    del diags
    unit_params = {u.id: list(u.params) for u in units}
    layer_units: dict[str, list[str]] = defaultdict(list)
    kind_units: dict[str, list[str]] = defaultdict(list)
    for u in units:
        if u.layer is not None and u.side in ("encoder", "decoder"):
            layer_units[f"{u.side}.layers.{u.layer}"] += list(u.params)
        kind_units[u.kind] += list(u.params)
    group_params = {g.id: list(g.params) for g in groups}
    levels = {
        "matrix": aggregate(param_sums, numels, {n: [n] for n in params}),
        "component": aggregate(param_sums, numels, unit_params),
        "layer": aggregate(param_sums, numels, layer_units),
        "kind": aggregate(param_sums, numels, kind_units),
        "group": aggregate(param_sums, numels, group_params) if group_params else {},
    }
    timings["aggregate"] = time.perf_counter() - t0

    # predicted loss change at each sparsity, from magnitude keep-masks
    t0 = time.perf_counter()
    predicted: dict[str, dict[str, dict]] = {}
    for u in tqdm(units + groups, desc="predict", disable=not progress, unit="unit"):
        predicted[u.id] = predict_loss_curve(weights, mean_grad, fisher, u.params, options.all_prediction_sparsities)
        for pred in predicted[u.id].values():
            pred["obd"] = pred["second_order"]  # the key allocate.py reads by default
    timings["predict"] = time.perf_counter() - t0

    # measured ablation
    ablation = None
    method = None
    if options.ablation_sparsities:
        t0 = time.perf_counter()
        wer_fn = None
        if options.ablation_wer:
            wer_fn = _wer_function(model, processor, utterances, decode, out / "wer" if out else None, progress)
        targets = [u.id for u in units + groups]
        method_key = ""
        if options.method != "magnitude":
            copts = dataclasses.replace(options.calibration, labels=options.label_spec)
            stats_in = collect_input_stats(model, examples, gram=options.method == "sparsegpt",
                                           frames=copts.frames, progress=progress)
            method = PruningMethod(options.method, options=copts, input_stats=stats_in)
            skipped = [t for t in targets if not method.can_prune(model, t)]
            targets = [t for t in targets if t not in skipped]
            log.info("%s ablation: %d targets (%d not made of linear weights skipped)", options.method,
                     len(targets), len(skipped))
            method_key = "+" + hashlib.sha256(json.dumps([options.method, copts.to_dict()]).encode()).hexdigest()[:8]
            timings["input_statistics"] = time.perf_counter() - t0
        ablation = measure_ablation(
            model, examples, targets, options.ablation_sparsities,
            mean_grad=mean_grad, fisher=fisher,
            results_path=(out / "ablation.jsonl") if out else None,
            key=key + ("+wer" if options.ablation_wer else "") + method_key,
            cache_mb=options.cache_mb, wer=wer_fn, reduction=options.loss_reduction, progress=progress,
            method=method,
        )
        del method
        timings["ablation"] = time.perf_counter() - t0
        for row in ablation["rows"] if options.method == "magnitude" else ():
            expect = predicted[row["target"]][f"{row['sparsity']:g}"]
            if row.get("predicted") and (row["predicted"]["n_removed"] != expect["n_removed"]
                                         or not math.isclose(row["predicted"]["total"], expect["total"], rel_tol=1e-6, abs_tol=1e-12)):
                log.warning("%s@%g: the weights prune_model removed differ from the magnitude masks of the prediction",
                            row["target"], row["sparsity"])
    if model_fingerprint(model) != fp:
        raise RuntimeError("the model's weights changed during the sensitivity run")

    # rows, correlations, ranking
    t0 = time.perf_counter()
    abl_by: dict[str, dict] = defaultdict(dict)
    if ablation is not None:
        for row in ablation["rows"]:
            abl_by[row["target"]][f"{row['sparsity']:g}"] = {
                k: row.get(k) for k in ("loss", "loss_delta", "wer", "wer_delta", "n_removed", "measured_sparsity", "start", "wall_s")
            }
    comp_rows = [_unit_row(u, numels, levels["component"][u.id], predicted, abl_by) for u in units]
    group_rows = [_unit_row(g, numels, levels["group"][g.id], predicted, abl_by) for g in groups]
    correlations = (correlate(comp_rows, options.ablation_sparsities, n_bootstrap=options.n_bootstrap, seed=options.seed)
                    if ablation else [])
    ranking = _rankings(comp_rows, options)
    timings["correlate"] = time.perf_counter() - t0
    linear = linear_weight_names(model)
    data = {
        "schema": SCHEMA,
        "model": str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")),
        "model_fingerprint": fp,
        "options": options.to_dict(),
        "data": {
            **dict(data_info or {}),
            "n_utterances": len(utterances),
            "ids": [u.id for u in utterances],
            "overlap_checked": evaluation is not None,
            "overlap": jsonable(overlap),
        },
        "labels": [{"id": e.id, "text": e.text, "n_targets": e.n_targets} for e in examples],
        "definitions": DEFINITIONS,
        "scope": "component" if options.method == "magnitude" else score_scopes(options.method)[0],
        "method": options.method,
        "param_counts": {"linear": sum(numels[n] for n in linear if n in numels), "all": sum(numels.values())},
        "baseline_loss": ablation["baseline_loss"] if ablation else float(np.mean(stats.losses)),
        "baseline_wer": ablation["baseline_wer"] if ablation else None,
        "gradient_pass_loss": float(np.mean(stats.losses)),
        "loss_units": "nats per utterance (sequence NLL)" if options.loss_reduction == "sum" else "nats per token",
        "mean_targets_per_utterance": float(np.mean([e.n_targets for e in examples])),
        "components": comp_rows,
        "groups": group_rows,
        "layers": [{"id": k, "n_params": sum(numels[p] for p in v), "diagnostics": levels["layer"][k]} for k, v in layer_units.items()],
        "kinds": [{"id": k, "n_params": sum(numels[p] for p in v), "diagnostics": levels["kind"][k]} for k, v in kind_units.items()],
        "matrices": [{"id": n, "n_params": numels[n], "diagnostics": levels["matrix"][n]} for n in params],
        "correlations": correlations,
        "prediction_check": prediction_check(comp_rows, options.ablation_sparsities) if ablation else [],
        "ranking": ranking,
        "timings_s": timings,
        # what each step cost, summed over the sessions that did it (timings_s: this session only)
        "compute_s": {"labels": timings["labels"], "gradients": stats.wall_s,
                      "ablation": ablation["compute_s"] if ablation else None},
        "env": env_stamp(),
    }
    if ablation is not None:
        data["ablation_per_utterance"] = {
            "baseline": ablation["baseline_losses"],
            "rows": {target_key(r["target"], r["sparsity"]): r["loss_deltas"] for r in ablation["rows"]},
        }
    result = SensitivityResult(data)
    if out is not None:
        t0 = time.perf_counter()
        write_outputs(result, out)
        timings["write"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    if out is not None:
        atomic_write_json(out / "sensitivity.json", jsonable(data), indent=1)
    return result


def _unit_row(u: Unit, numels, diag, predicted, abl_by) -> dict:
    return {
        "id": u.id,
        "kind": u.kind,
        "side": u.side,
        "layer": u.layer,
        "category": u.category,
        "linear": u.category == "linear",
        "n_params": sum(numels[p] for p in u.params),
        "n_weights": sum(numels[p] for p in u.params),
        "params": list(u.params),
        "diagnostics": diag,
        "predicted": predicted.get(u.id, {}),
        "ablation": abl_by.get(u.id, {}),
    }


def _rankings(rows: Sequence[Mapping], options: SensitivityOptions) -> dict[str, list[str]]:
    """Component ids, most sensitive first, per diagnostic (per-parameter mean), prediction, ablation."""
    out = {}
    for d in DIAGNOSTICS:
        out[d] = [r["id"] for r in sorted(rows, key=lambda r: -r["diagnostics"][d]["mean"])]
    for s in options.ablation_sparsities:
        k = f"{s:g}"
        out[f"predicted.total@{k}"] = [r["id"] for r in sorted(rows, key=lambda r: -r["predicted"].get(k, {}).get("total", -math.inf))]
        if any(k in r["ablation"] for r in rows):
            out[f"loss_delta@{k}"] = [r["id"] for r in sorted(rows, key=lambda r: -_num(r["ablation"].get(k, {}).get("loss_delta")))]
            if any(r["ablation"].get(k, {}).get("wer_delta") is not None for r in rows):
                out[f"wer_delta@{k}"] = [r["id"] for r in sorted(rows, key=lambda r: -_num(r["ablation"].get(k, {}).get("wer_delta")))]
    return out


def _num(x) -> float:
    return -math.inf if x is None or not math.isfinite(float(x)) else float(x)


def _wer_function(model, processor, utterances: Sequence[Utterance], decode: DecodeOptions | None,
                  wer_dir: Path | None, progress: bool) -> Callable[[str], float]:
    """``run_name -> calibration WER`` of the model as it is when called (greedy decoding).

    One encoder cache is shared by all calls, so decoder-only ablations reuse encoder outputs
    (the cache is keyed by the encoder's fingerprint).
    """
    opts = decode or DecodeOptions()
    cache = EncoderCache()

    def run(name: str) -> float:
        d = None
        if wer_dir is not None:
            d = Path(wer_dir) / re.sub(r"[^A-Za-z0-9_.@-]+", "_", name)
        res = evaluate(model, processor, utterances, opts, out_dir=d, progress=False, encoder_cache=cache)
        return float(res.wer)

    return run


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in r])


def write_outputs(result: SensitivityResult | Mapping, out_dir: str | os.PathLike) -> list[Path]:
    """Write the CSV tables and the ranking of a result (not ``sensitivity.json``; the heatmaps
    are drawn from it by :func:`asrprune.figures.draw_heatmaps`).

    Files: ``components.csv``, ``groups.csv``, ``layers.csv``, ``kinds.csv``, ``matrices.csv``
    (diagnostics: sum, per-parameter mean, min-max), ``predicted.csv``, ``ablation.csv``,
    ``correlations.csv``, ``prediction_check.csv`` and ``ranking.csv``.

    Returns:
        The paths written.
    """
    data = result.data if isinstance(result, SensitivityResult) else dict(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    diag_cols = [f"{d}_{a}" for d in DIAGNOSTICS for a in ("sum", "mean", "minmax")]

    def diag_vals(row):
        return [row["diagnostics"][d][a] for d in DIAGNOSTICS for a in ("sum", "mean", "minmax")]

    for level, rows, extra in (
        ("components", data["components"], ("kind", "side", "layer")),
        ("groups", data.get("groups", []), ()),
        ("layers", data["layers"], ()),
        ("kinds", data["kinds"], ()),
        ("matrices", data["matrices"], ()),
    ):
        p = out / f"{level}.csv"
        _write_csv(p, ["id", *extra, "n_params", *diag_cols], ([r["id"], *[r.get(e) for e in extra], r["n_params"], *diag_vals(r)] for r in rows))
        written.append(p)
    units = list(data["components"]) + list(data.get("groups", []))
    p = out / "predicted.csv"
    _write_csv(p, ["id", "sparsity", "n_removed", *PREDICTION_TERMS],
               ([u["id"], float(s), v["n_removed"], *[v[t] for t in PREDICTION_TERMS]] for u in units for s, v in u["predicted"].items()))
    written.append(p)
    p = out / "ablation.csv"
    _write_csv(p, ["id", "sparsity", "n_removed", "loss", "loss_delta", "predicted_total", "predicted_first_order", "predicted_second_order", "wer", "wer_delta", "wall_s"],
               ([u["id"], float(s), a.get("n_removed"), a.get("loss"), a.get("loss_delta"),
                 u["predicted"].get(s, {}).get("total"), u["predicted"].get(s, {}).get("first_order"), u["predicted"].get(s, {}).get("second_order"),
                 a.get("wer"), a.get("wer_delta"), a.get("wall_s")] for u in units for s, a in u["ablation"].items()))
    written.append(p)
    p = out / "correlations.csv"
    _write_csv(p, ["population", "predictor", "target", "sparsity", "rho", "ci_low", "ci_high", "p", "n"],
               ([c.get("population", "all"), c["predictor"], c["target"], c["sparsity"], c["rho"], c["ci"][0], c["ci"][1], c["p"], c["n"]]
                for c in data["correlations"]))
    written.append(p)
    p = out / "prediction_check.csv"
    cols = ["sparsity", "predicted", "n", "median_ratio", "sign_agreement", "within_2x", "pearson_log"]
    _write_csv(p, cols, ([r.get(c) for c in cols] for r in data.get("prediction_check", [])))
    written.append(p)
    p = out / "ranking.csv"
    rk = data["ranking"]
    n = max((len(v) for v in rk.values()), default=0)
    _write_csv(p, ["rank", *rk.keys()], ([i + 1, *[v[i] if i < len(v) else "" for v in rk.values()]] for i in range(n)))
    written.append(p)
    return written


def load_sensitivity_json(path: str | os.PathLike) -> dict:
    """Read ``sensitivity.json`` (a file or the directory holding it).

    Returns:
        the parsed file, with ``"_path"`` holding the file it was read from.

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: the file is not valid JSON (naming it).
    """
    p = Path(path)
    if p.is_dir():
        p = p / "sensitivity.json"
    if not p.is_file():
        raise FileNotFoundError(f"sensitivity results not found: {p} (run `asrprune sensitivity` first)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: not a sensitivity.json (a JSON object expected)")
    data["_path"] = str(p)
    return data
