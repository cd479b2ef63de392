"""The paper's study on one model, end to end: :func:`reproduce`.

A study is a :class:`StudySpec` (model, evaluation sets, calibration set, preset grid, the one
:class:`~asrprune.decoding.DecodeOptions` every stage decodes with) run in stages, each resumable
(a rerun with the same spec skips what is done) and each recorded in ``study.json``:

1. ``sweep``: the baselines and the fixed variants (:func:`study_variants`: component sweeps,
   fragility probes, global and uniform magnitude at the target, the paper's own plans; and
   :func:`fixed_method_variants`: the method rows that need no measurement);
2. ``sensitivity``: diagnostics on the calibration set (``DIR/sensitivity``);
3. ``allocation`` and ``sweep_allocated``: the sensitivity-aware plan at the target and its runs;
4. the method rows made by a rule (presets ``main``: at 40%; ``methods``: at 30/40/50%):
   ``owl`` (OWL's layer sparsities for Wanda), ``authors`` (the authors' rule from the gradient
   diagnostic), ``sensitivity_sparsegpt`` (the ablation under SparseGPT) and ``measured`` (the
   measured allocation for SparseGPT), then ``sweep_methods`` and ``method_comparison``
   (``methods.json``); calibrated methods prune with the study's calibration set
   (:mod:`asrprune.allocation_rules`);
5. ``plan_check``: the teacher-forced calibration loss of the whole target-sparsity plans
   against the allocator's additive prediction (``DIR/plans/plan_check.json``);
6. ``report``: ``report.md`` / ``report.html`` (:func:`asrprune.report.build_report`).

A failed run or stage is recorded (``runs.jsonl`` / ``study.json``) and the study goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .allocate import allocate_plan, load_sensitivity, write_allocation
from .allocation_rules import authors_allocation, measured_allocation, owl_allocation, write_rule_allocation
from .calibration import CalibrationOptions, build_examples
from .config import PROTOCOLS, PlanEntry, PrunePlan, check_sparsity
from .damage import check_plans
from .decoding import DecodeOptions
from .files import OutputBusyError, OutputLock, atomic_write_json, atomic_write_text, now_iso, read_json, slug
from .overlap import check_disjoint, fingerprint
from .prune import PruningMethod
from .figures import draw_heatmaps
from .report import ReportPaths, build_report
from .sensitivity import SensitivityOptions, score_sensitivity
from .sweep import SweepRunner, SweepSummary, _read_data, _record_session, _study_fields, update_study_json
from .sweep_spec import DataSpec, SweepSpec, SweepSpecError, Variant, _format_sparsity

log = logging.getLogger(__name__)

__all__ = [
    "PRESETS",
    "STUDY_TARGET",
    "StudyGrid",
    "StudyResult",
    "StudySpec",
    "paper_plans",
    "reproduce",
    "study_variants",
]

PRESETS = ("quick", "main", "methods", "full")


STUDY_TARGET = 0.4  # the paper's ~40% models (global magnitude, sensitivity-aware)

#: the method rows: (name, group, label, score, how the plan is made)
METHODS: tuple[tuple[str, str, str, str, str], ...] = (
    ("global", "global", "global magnitude", "magnitude", "fixed"),
    ("uniform", "uniform", "uniform magnitude", "magnitude", "fixed"),
    ("authors", "authors_rule", "authors' rule (magnitude)", "magnitude", "authors"),
    ("wanda", "wanda_uniform", "Wanda uniform", "wanda", "fixed"),
    ("wanda_owl", "wanda_owl", "Wanda + OWL", "wanda", "owl"),
    ("sparsegpt", "sparsegpt_uniform", "SparseGPT uniform", "sparsegpt", "fixed"),
    ("sparsegpt_measured", "sparsegpt_measured", "SparseGPT + measured allocation", "sparsegpt", "measured"),
)
METHOD_ROWS = tuple(m[0] for m in METHODS)
METHOD_LEVELS = (0.3, 0.4, 0.5)
NM_ROWS = ("uniform", "wanda", "sparsegpt")  # 2:4 exists for these (no allocation at N:M)
MEASURED_BUDGET = 8  # whole-plan checks of the measured allocation


@dataclass(frozen=True)
class StudyGrid:
    """The sparsity levels of a study (a preset, optionally shrunk by ``--sparsities``)."""

    components: tuple[float, ...]  # decoder self-attention, decoder FFN, cross-attention
    late_encoder: tuple[float, ...]
    probes: tuple[tuple[str, float], ...]  # (selector, sparsity): the paper's fragility probes
    calibration_limit: int | None
    # per-group levels ((selector, levels), ...) replacing ``components``/``late_encoder``;
    # a group not listed is not swept (the ``main`` preset)
    group_levels: tuple[tuple[str, tuple[float, ...]], ...] | None = None
    # the method rows (METHOD_ROWS names) at ``method_levels`` of all linear weights, and those
    # of them also run at 2:4
    method_rows: tuple[str, ...] = ()
    method_levels: tuple[float, ...] = ()
    nm_rows: tuple[str, ...] = ()
    paper_plans: bool = True  # the paper's own ~40% plans (not in the method comparison)

    @classmethod
    def preset(cls, name: str, sparsities: Sequence[float] | None = None) -> "StudyGrid":
        """``quick`` (sized for a 2-core CPU), ``main`` or ``full`` (the paper's 10-50% grids).

        ``main`` is the paper's headline configurations alone: decoder self-attention 50%, late
        encoder 50%, decoder FFN 30%, no cross-attention sweep and no probes (global, uniform,
        the paper's plans and the sensitivity-aware plan are in every preset); calibration on
        all the utterances given.

        ``methods`` is the method comparison alone (no component sweeps, probes or paper plans): every row of
        :data:`METHOD_ROWS` at 30, 40 and 50% of all linear weights, and 2:4 for uniform
        magnitude, Wanda and SparseGPT. ``main`` has the method rows at 40%, ``quick`` SparseGPT
        at 40% (beside global magnitude at 40%), ``full`` everything.

        ``sparsities`` replaces the component and late-encoder levels (and ``main``'s
        per-group levels: every group of the sweep at those levels); for ``methods``, the
        method rows' levels.
        """
        if name == "quick":
            grid = cls(
                components=(0.3, 0.5),
                late_encoder=(0.5,),
                probes=(
                    ("biases", 0.1),
                    ("early_decoder", 0.5),
                    ("conv", 0.2),
                    ("layer_norms", 0.1),
                    ("token_embeddings", 0.2),
                ),
                calibration_limit=20,
                method_rows=("sparsegpt",),
                method_levels=(STUDY_TARGET,),
            )
        elif name == "main":
            grid = cls(
                components=(),
                late_encoder=(),
                probes=(),
                calibration_limit=None,
                group_levels=(("decoder_self_attn", (0.5,)), ("late_encoder", (0.5,)), ("decoder_ffn", (0.3,))),
                method_rows=METHOD_ROWS,
                method_levels=(STUDY_TARGET,),
            )
        elif name == "methods":
            grid = cls(components=(), late_encoder=(), probes=(), calibration_limit=None, group_levels=(),
                       method_rows=METHOD_ROWS, method_levels=METHOD_LEVELS, nm_rows=NM_ROWS, paper_plans=False)
        elif name == "full":
            grid = cls(
                components=(0.1, 0.2, 0.3, 0.4, 0.5),
                late_encoder=(0.3, 0.4, 0.5),
                probes=(
                    ("biases", 0.1),
                    ("early_decoder", 0.5),
                    ("conv", 0.1),
                    ("conv", 0.2),
                    ("layer_norms", 0.1),
                    ("layer_norms", 0.2),
                    ("token_embeddings", 0.1),
                    ("token_embeddings", 0.2),
                ),
                calibration_limit=None,
                method_rows=METHOD_ROWS,
                method_levels=METHOD_LEVELS,
                nm_rows=NM_ROWS,
            )
        else:
            raise SweepSpecError(f"preset {name!r} unknown; choose one of {', '.join(PRESETS)}")
        if sparsities:
            levels = tuple(sorted({check_sparsity(x, "--sparsities", positive=True, error=SweepSpecError)
                                   for x in sparsities}))
            if name == "methods":  # no component sweeps: the levels are the method rows'
                grid = dataclasses.replace(grid, method_levels=levels)
            else:
                grid = dataclasses.replace(grid, components=levels, late_encoder=levels, group_levels=None)
        return grid


STUDY_GROUPS = (
    ("decoder_self_attn", "decoder self-attn"),
    ("late_encoder", "late encoder"),
    ("decoder_ffn", "decoder FFN"),
    ("cross_attn", "cross-attn"),
)


_PROBE_LABELS = {
    "biases": "biases",
    "early_decoder": "early decoder layers",
    "conv": "convolutions",
    "layer_norms": "layer norms",
    "token_embeddings": "token embeddings (= tied output projection)",
}


def _pct(s: float) -> str:
    return f"{100 * s:g}%"


def paper_plans(n_encoder_layers: int, n_decoder_layers: int) -> list[tuple[Variant, str]]:
    """The paper's own ~40% plans translated to our selectors, with the translation notes.

    Two variants are listed in ``PAPER.md``:

    - ``paper_digest``: a digest of the paper gives decoder self-attention 50%, late encoder
      50%, encoder FFN 40%, convolutions 20%, layer norms 10%. The late encoder layers' FFNs
      belong to both "late encoder" and "encoder FFN"; we read "encoder FFN 40%" as the FFNs of
      the encoder layers outside ``late_encoder`` (``encoder.layers[0:n-k].ffn`` with
      k = ceil(n/3)), so each weight gets one sparsity (late encoder keeps its 50%).
      "Layer norms" is every layer-norm weight (gamma), not their biases (as the authors' code
      treats norm weights and biases apart).
    - ``paper_code``: the last configuration committed in the authors' code
      (``pruning/final_pruning_script/global_final_pruning.py``): encoder FFN 55, decoder FFN
      first/middle/last 25/45/30, encoder self-attention 40, decoder self-attention 50,
      cross-attention 45, token embeddings 25, conv 20, output projection 25, layer norms,
      positional embeddings and biases 0. That script pools one magnitude threshold per group
      (our scope ``component``). Its decoder-FFN split is hard-coded for 12 layers (0-3, 4-7,
      8-11); we split the decoder into proportional thirds (``numpy.array_split``: 4/4/4 of 12,
      2/2/2 of 6, 2/1/1 of 4). Whisper ties the output projection to the token embeddings, so
      "token embeddings 25" and "output projection 25" are one entry ``token_embeddings=0.25``.

    Args:
        n_encoder_layers, n_decoder_layers: the model's layer counts.

    Returns:
        ``[(Variant, note), ...]`` with group ``paper_plan`` and the paper row's key.
    """
    k = math.ceil(n_encoder_layers / 3)
    digest_entries = [
        PlanEntry("decoder_self_attn", 0.5),
        PlanEntry("late_encoder", 0.5),
    ]
    if n_encoder_layers - k > 0:
        digest_entries.append(PlanEntry(f"encoder.layers[0:{n_encoder_layers - k}].ffn", 0.4))
    digest_entries += [PlanEntry("conv", 0.2), PlanEntry("layer_norms", 0.1)]
    digest_note = (
        "paper digest: decoder self-attn 50%, late encoder 50%, encoder FFN 40% (read as the FFNs "
        f"of encoder layers 0-{n_encoder_layers - k - 1}, outside late_encoder), conv 20%, layer "
        "norms 10% (gamma weights)"
    )

    thirds = [list(map(int, part)) for part in _array_split(range(n_decoder_layers), 3)]
    ffn_levels = (0.25, 0.45, 0.30)
    code_entries = [PlanEntry("encoder_ffn", 0.55)]
    for layers, level in zip(thirds, ffn_levels):
        if layers:
            code_entries.append(PlanEntry(f"decoder.layers[{layers[0]}:{layers[-1] + 1}].ffn", level))
    code_entries += [
        PlanEntry("encoder_self_attn", 0.4),
        PlanEntry("decoder_self_attn", 0.5),
        PlanEntry("cross_attn", 0.45),
        PlanEntry("token_embeddings", 0.25),
        PlanEntry("conv", 0.2),
    ]
    code_note = (
        "authors' code, last committed config: encoder FFN 55%, decoder FFN first/middle/last "
        f"thirds {'/'.join(f'{len(t)}' for t in thirds)} layers at 25/45/30%, encoder self-attn 40%, "
        "decoder self-attn 50%, cross-attn 45%, token embeddings = tied output projection 25%, "
        "conv 20%; one threshold per group"
    )
    plans = (
        ("paper_digest", digest_entries, "paper's 40.8% plan (digest)", digest_note),
        ("paper_code", code_entries, "paper's plan (authors' code)", code_note),
    )
    return [
        (Variant(name=name, plan=PrunePlan(tuple(entries), name=name), group="paper_plan", condition=condition,
                 paper_key="sensitivity_aware@0.4", note=note), note)
        for name, entries, condition, note in plans
    ]


def _array_split(items: Sequence[int], n: int) -> list[Sequence[int]]:
    """``numpy.array_split`` for a sequence: n contiguous parts, the first ones one longer."""
    items = list(items)
    q, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        size = q + (1 if i < r else 0)
        out.append(items[start:start + size])
        start += size
    return out


def study_variants(
    grid: StudyGrid,
    n_encoder_layers: int,
    n_decoder_layers: int,
    *,
    target: float = STUDY_TARGET,
) -> list[Variant]:
    """The pruned variants of the study, except the sensitivity-aware plan (needs sensitivity).

    Component sweeps (decoder self-attention, late encoder, decoder FFN, cross-attention),
    fragility probes, global magnitude and uniform per-matrix at ``target`` (all linear
    weights), and the paper's own plans (:func:`paper_plans`).
    """
    # (name prefix, selector, sparsity, group, label) of every single-selector variant
    singles: list[tuple[str, str, float, str, str]] = []
    per_group = dict(grid.group_levels) if grid.group_levels is not None else None
    for selector, label in STUDY_GROUPS:
        if per_group is not None:
            levels = per_group.get(selector, ())
        else:
            levels = grid.late_encoder if selector == "late_encoder" else grid.components
        singles += [("", selector, s, selector, label) for s in levels]
    singles += [("probe_", selector, s, "probe", f"probe: {_PROBE_LABELS.get(selector, selector)}")
                for selector, s in grid.probes]
    out = [
        Variant(name=f"{prefix}{selector}@{_format_sparsity(s)}", plan=PrunePlan((PlanEntry(selector, s),)),
                group=group, selector=selector, target_sparsity=s, condition=f"{label} {_pct(s)}")
        for prefix, selector, s, group, label in singles
    ]
    # the two reference plans at the target: one pooled threshold, or each matrix on its own
    for group, plan, label in (
        ("global", PrunePlan((PlanEntry("all_linear", target),), mode="global"), "global magnitude"),
        ("uniform", PrunePlan((PlanEntry("all_linear", target, scope="matrix"),)), "uniform per-matrix"),
    ):
        out.append(Variant(name=f"{group}@{_format_sparsity(target)}", plan=plan, group=group, selector="all_linear",
                           target_sparsity=target, condition=f"{label} {_pct(target)}"))
    if grid.paper_plans:
        out.extend(v for v, _ in paper_plans(n_encoder_layers, n_decoder_layers))
    return out


def _method(name: str) -> tuple[str, str, str, str, str]:
    return next(m for m in METHODS if m[0] == name)


def method_variant(name: str, s: float, plan: PrunePlan, *, nm: bool = False, note: str | None = None) -> Variant:
    """The study's variant of method row ``name`` at sparsity ``s`` (or 2:4)."""
    _, group, label, _, _ = _method(name)
    if nm:
        return Variant(name=f"{name}@2of4", plan=plan, group=f"{group}_2of4", selector="all_linear",
                       target_sparsity=0.5, condition=f"{label} 2:4", note=note)
    return Variant(name=f"{name}@{_format_sparsity(s)}", plan=plan, group=group, selector="all_linear", target_sparsity=s,
                   condition=f"{label} {_pct(s)}", note=note)


def fixed_method_variants(grid: StudyGrid) -> list[Variant]:
    """The method rows whose plans need no measurement: global and uniform magnitude, Wanda
    and SparseGPT uniform (every matrix at the level), and their 2:4 forms."""
    out = []
    for name in grid.method_rows:
        _, _, _, score, how = _method(name)
        if how != "fixed":
            continue
        for s in grid.method_levels:
            if name == "global":
                plan = PrunePlan((PlanEntry("all_linear", s),), mode="global")
            elif name == "uniform":
                plan = PrunePlan((PlanEntry("all_linear", s, scope="matrix"),))
            else:
                plan = PrunePlan((PlanEntry("all_linear", s),), score=score)
            out.append(method_variant(name, s, plan))
    for name in grid.nm_rows:
        score = _method(name)[3]
        scope = "matrix" if score == "magnitude" else None
        out.append(method_variant(name, 0.5, PrunePlan((PlanEntry("all_linear", 0.5, scope=scope, pattern="2:4"),),
                                                       score=score), nm=True))
    return out


@dataclass
class StudyResult:
    """What :func:`reproduce` did: the sweeps' summaries, stage times, report paths."""

    out_dir: Path
    sweeps: list[SweepSummary] = field(default_factory=list)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: ReportPaths | None = None
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "stages": self.stages,
            "sweeps": [s.to_dict() for s in self.sweeps],
            "report": None if self.report is None else {
                "markdown": str(self.report.markdown), "html": str(self.report.html)
            },
            "wall_s": round(self.wall_s, 1),
        }


@dataclass(frozen=True)
class StudySpec:
    """What :func:`reproduce` runs (checked once, here).

    Attributes:
        model: model spec (:func:`asrprune.models.load_model`).
        data: evaluation sets (``SOURCE`` or ``SOURCE::INCLUDE`` strings, or :class:`DataSpec`).
        calibration: the calibration set (same forms); ``calibration_limit`` caps it (default:
            the preset's, 20 utterances for ``quick``, all for ``main`` and ``full``).
        limit, sample, seed: utterance selection of every evaluation set.
        protocols: protocols of the pruned runs; baseline_protocols: of the baselines.
        preset: ``quick``, ``main`` or ``full`` (:class:`StudyGrid`); ``sparsities`` replaces the
            component sweep levels.
        decode: how every stage decodes (the evaluation runs, greedy labels, the WER ablation);
            its ``protocol`` is set per run.
        sensitivity: options of the sensitivity stage.
        target: sparsity of the global, uniform and sensitivity-aware plans (linear weights).
        allow_overlap: let calibration overlap evaluation (recorded; not recommended).
        retry_failed: rerun runs that failed before.
        encoder_cache: ``memory``, ``disk`` or ``off`` (see :class:`~asrprune.sweep.SweepSpec`).
        empty_reference, max_failed_fraction: how evaluation treats empty references and when
            too many failed utterances fail a run (:func:`asrprune.evaluation.evaluate`).
        trust_pickle: also load a pickle checkpoint (``pytorch_model.bin``).
        measured_budget: whole-plan checks of the measured allocation (at least 2).
        early_stop: stop collapsed variants early (:mod:`asrprune.early_stop`): ``True``
            (default options), ``False`` or a mapping of :class:`EarlyStopOptions` fields.
        calibration_options: how Wanda and SparseGPT see the calibration set (its labels follow
            ``sensitivity``'s).
    """

    model: str
    data: tuple[DataSpec, ...]
    calibration: DataSpec
    limit: int | None = None
    sample: int | None = None
    seed: int = 0
    protocols: tuple[str, ...] = ("standard",)
    baseline_protocols: tuple[str, ...] = PROTOCOLS
    preset: str = "quick"
    sparsities: tuple[float, ...] | None = None
    calibration_limit: int | None = None
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    sensitivity: SensitivityOptions = field(default_factory=SensitivityOptions)
    target: float = STUDY_TARGET
    allow_overlap: bool = False
    retry_failed: bool = False
    encoder_cache: str = "memory"
    empty_reference: str = "skip"
    max_failed_fraction: float | None = None
    trust_pickle: bool = False
    measured_budget: int = MEASURED_BUDGET
    calibration_options: CalibrationOptions = field(default_factory=CalibrationOptions)
    early_stop: Any = True

    def __post_init__(self) -> None:
        data = tuple(DataSpec.from_obj(d) for d in (self.data if not isinstance(self.data, (str, DataSpec)) else [self.data]))
        if not data:
            raise SweepSpecError("reproduce: give at least one evaluation data set")
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "calibration", DataSpec.from_obj(self.calibration))
        object.__setattr__(self, "protocols", tuple(self.protocols))
        object.__setattr__(self, "baseline_protocols", tuple(self.baseline_protocols))
        if self.sparsities is not None:
            object.__setattr__(self, "sparsities", tuple(self.sparsities))
        for what in ("limit", "sample", "calibration_limit"):
            value = getattr(self, what)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SweepSpecError(f"reproduce: {what} must be a positive integer, got {value!r}")
        if not isinstance(self.decode, DecodeOptions):
            raise SweepSpecError(f"reproduce: decode must be DecodeOptions, got {type(self.decode).__name__}")
        if not isinstance(self.sensitivity, SensitivityOptions):
            raise SweepSpecError("reproduce: sensitivity must be SensitivityOptions")
        check_sparsity(self.target, "reproduce: target", positive=True, error=SweepSpecError)
        if isinstance(self.measured_budget, bool) or not isinstance(self.measured_budget, int) or self.measured_budget < 2:
            raise SweepSpecError(f"reproduce: measured_budget must be an integer >= 2, got {self.measured_budget!r}")
        self.grid  # validates preset and sparsities
        self.sweep_spec()  # validates protocols, decode options and the cache mode

    @property
    def grid(self) -> StudyGrid:
        return StudyGrid.preset(self.preset, self.sparsities)

    def decode_fields(self) -> dict[str, Any]:
        """The decode options as a sweep's ``decode`` mapping (every field but the protocol)."""
        return {k: v for k, v in dataclasses.asdict(self.decode).items() if k != "protocol"}

    def calibration_spec(self) -> DataSpec:
        """The calibration set with the study's cap applied."""
        cap = self.calibration_limit or self.grid.calibration_limit
        if self.calibration.limit is None and cap:
            return dataclasses.replace(self.calibration, limit=cap)
        return self.calibration

    def sweep_spec(self, variants: Sequence[Variant] = ()) -> SweepSpec:
        """The sweep of the study's runs: baselines plus ``variants``."""
        return SweepSpec(
            models=(self.model,),
            data=self.data,
            plans=tuple(variants),
            protocols=self.protocols,
            baseline_protocols=self.baseline_protocols,
            decode=self.decode_fields(),
            limit=self.limit,
            sample=self.sample,
            seed=self.seed,
            encoder_cache=self.encoder_cache,
            name="reproduce",
            empty_reference=self.empty_reference,
            max_failed_fraction=self.max_failed_fraction,
            trust_pickle=self.trust_pickle,
            early_stop=self.early_stop,
            **self._calibration_fields(variants),
        )

    def method_options(self) -> CalibrationOptions:
        """The calibrated methods' options, labelled as the sensitivity stage labels."""
        return dataclasses.replace(self.calibration_options, labels=self.sensitivity.label_spec)

    def _calibration_fields(self, variants: Sequence[Variant]) -> dict[str, Any]:
        if not any(v.plan is not None and v.plan.score in ("wanda", "sparsegpt") for v in variants):
            return {}
        o = self.method_options()
        return {"calibration": self.calibration_spec(), "allow_overlap": self.allow_overlap,
                "calibration_options": {"labels": dataclasses.asdict(o.labels), "frames": o.frames, "damp": o.damp,
                                        "block_size": o.block_size}}


class _Study:
    """One call of :func:`reproduce`: the runner, the data and the stage bookkeeping."""

    def __init__(self, spec: StudySpec, out: Path, *, progress: bool, executor=None):
        self.spec = spec
        self.out = out
        self.progress = progress
        self.result = StudyResult(out_dir=out)
        self.runner = SweepRunner(progress=progress, executor=executor)
        self.base_spec = spec.sweep_spec()
        self.calib_spec = spec.calibration_spec()
        self.calib_set = _read_data(self.calib_spec, self.base_spec)
        self.eval_sets = {d: _read_data(d, self.base_spec) for d in spec.data}
        self.device = str(spec.decode.resolved_device())
        self.dtype = spec.decode.dtype

    def model(self):
        """The unpruned model (weights restored)."""
        return self.runner.model(self.spec.model, device=self.device, dtype=self.dtype,
                                 trust_pickle=self.spec.trust_pickle)

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one stage; a failure is recorded in ``study.json`` and the study goes on."""
        t0 = time.perf_counter()
        info: dict[str, Any] = {"status": "running", "started": now_iso()}
        self.result.stages[name] = info
        try:
            value = fn()
            info["status"] = "ok"
            return value
        except (OutputBusyError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - a failed stage is recorded, the study goes on
            log.error("study stage %s failed: %s", name, exc)
            info["status"] = "failed"
            info["error"] = f"{type(exc).__name__}: {exc}"
            info["traceback"] = traceback.format_exc()
            return None
        finally:
            info["wall_s"] = round(time.perf_counter() - t0, 1)
            update_study_json(self.out, {"stages": self.result.stages})

    def sweep(self, variants: Sequence[Variant]) -> SweepSummary:
        return self.runner.run(self.base_spec if not variants else self.spec.sweep_spec(variants), self.out,
                               retry_failed=self.spec.retry_failed, record_time=False)

    def sensitivity(self) -> None:
        slot = self.model()
        try:
            score_sensitivity(
                slot.model,
                slot.processor,
                self.calib_set.utterances,
                options=self.spec.sensitivity,
                out_dir=self.out / "sensitivity",
                evaluation=[u for ss in self.eval_sets.values() for u in ss.utterances],
                allow_overlap=self.spec.allow_overlap,
                decode=self.spec.decode,
                data_info={"name": self.calib_spec.display_name, "source": self.calib_spec.source,
                           "include": self.calib_spec.include},
                progress=self.progress,
            )
        finally:
            slot.restore()
        draw_heatmaps_quietly(self.out / "sensitivity")

    def allocation(self) -> Variant:
        target = self.spec.target
        alloc = allocate_plan(load_sensitivity(self.out / "sensitivity"), target)
        write_allocation(alloc, self.out / "plans" / f"allocated_{round(100 * target)}.yaml")
        return Variant(
            name=f"allocated@{_format_sparsity(target)}",
            plan=alloc.plan,
            group="allocated",
            target_sparsity=target,
            condition=f"sensitivity-aware {_pct(target)}",
            note=f"allocated from sensitivity/ (predicted damage {alloc.predicted_damage:.4g})",
        )

    def plan_check(self, variants: Sequence[Variant], allocated: Variant | None, model_fp: str) -> dict:
        """Is damage additive? The whole target-sparsity plans on the calibration loss."""
        plans = {v.name: v.plan for v in variants if v.group in ("global", "uniform")}
        predicted: dict[str, float] = {}
        if allocated is not None:
            plans[allocated.name] = allocated.plan
            info = read_json(self.out / "plans" / f"allocated_{round(100 * self.spec.target)}.json")
            if isinstance(info, dict):
                predicted[allocated.name] = info.get("predicted_damage")
        key = {
            "model_fingerprint": model_fp,
            "calibration_ids": [u.id for u in self.calib_set.utterances],
            "plan_texts": {k: v.to_text() for k, v in plans.items()},
        }
        path = self.out / "plans" / "plan_check.json"
        old = read_json(path, {}) or {}
        if {k: old.get(k) for k in key} == key:
            return old
        slot = self.model()
        opts = self.spec.sensitivity
        try:
            examples = build_examples(slot.model, slot.processor, self.calib_set.utterances, spec=opts.label_spec,
                                      decode=self.spec.decode, labels_path=self.out / "sensitivity" / "labels.jsonl",
                                      progress=False)
            checked = check_plans(slot.model, examples, plans, loss_reduction=opts.loss_reduction, predicted=predicted)
        finally:
            slot.restore()
        checked.update(key)
        atomic_write_json(path, checked)
        return checked


    # -- the method rows -------------------------------------------------------------------

    def examples(self) -> list:
        """The calibration examples of the calibrated methods (built once, on the dense model)."""
        slot = self.model()
        return self.runner.calibration_examples(slot, self.calib_set, self.spec.method_options())

    def owl(self, grid: StudyGrid) -> list[Variant]:
        slot = self.model()
        out = []
        try:
            for s in grid.method_levels:
                path = self.out / "plans" / f"wanda_owl_{round(100 * s)}.yaml"
                alloc = owl_allocation(slot.model, self.examples(), s, score="wanda",
                                       options=self.spec.method_options(), progress=self.progress)
                write_rule_allocation(alloc, path)
                out.append(method_variant("wanda_owl", s, alloc.plan, note=f"OWL (M 5, lambda 0.08) from {path.name}"))
        finally:
            slot.restore()
        return out

    def authors(self, grid: StudyGrid) -> list[Variant]:
        slot = self.model()
        sens = read_json(self.out / "sensitivity" / "sensitivity.json")
        out = []
        for s in grid.method_levels:
            alloc = authors_allocation(sens, slot.model, s)
            path = self.out / "plans" / f"authors_{round(100 * s)}.yaml"
            write_rule_allocation(alloc, path)
            out.append(method_variant("authors", s, alloc.plan, note=f"the authors' rule, from {path.name}"))
        return out

    def sensitivity_under(self, method: str) -> Path:
        """The ablation under ``method`` (``DIR/sensitivity_<method>``): magnitude's gradient
        diagnostics plus the measured damage of pruning each component by ``method``."""
        sdir = self.out / f"sensitivity_{method}"
        slot = self.model()
        if _sensitivity_done(sdir, slot.fingerprint, [u.id for u in self.calib_set.utterances], method=method):
            return sdir
        opts = dataclasses.replace(self.spec.sensitivity, method=method,
                                   calibration=self.spec.method_options(), groups=())
        # the labels and gradient accumulators do not depend on the method: resume from the
        # magnitude run's (their checkpoint key is model + labels + loss reduction)
        sdir.mkdir(parents=True, exist_ok=True)
        for name in ("labels.jsonl", "accumulators.safetensors", "accumulators.safetensors.json"):
            src = self.out / "sensitivity" / name
            if src.is_file() and not (sdir / name).exists():
                shutil.copyfile(src, sdir / name)
        try:
            score_sensitivity(slot.model, slot.processor, self.calib_set.utterances, options=opts, out_dir=sdir,
                              evaluation=[u for ss in self.eval_sets.values() for u in ss.utterances],
                              allow_overlap=self.spec.allow_overlap, decode=self.spec.decode,
                              data_info={"name": self.calib_spec.display_name, "source": self.calib_spec.source,
                                         "include": self.calib_spec.include}, progress=self.progress)
        finally:
            slot.restore()
        return sdir

    def measured(self, grid: StudyGrid, sdir: Path) -> list[Variant]:
        slot = self.model()
        curves = load_sensitivity(sdir)
        method = PruningMethod("sparsegpt", calibration=self.examples(), options=self.spec.method_options())
        out = []
        try:
            for s in grid.method_levels:
                path = self.out / "plans" / f"sparsegpt_measured_{round(100 * s)}.yaml"
                old = read_json(path.with_suffix(".json"))
                key = {"sensitivity": str(curves.path), "budget": self.spec.measured_budget,
                       "calibration": [u.id for u in self.calib_set.utterances], "model": slot.fingerprint}
                if isinstance(old, dict) and (old.get("info") or {}).get("key") == key:
                    plan = PrunePlan.from_dict(old["plan"])
                else:
                    alloc = measured_allocation(slot.model, self.examples(), curves, s, budget=self.spec.measured_budget,
                                                method=method, loss_reduction=self.spec.sensitivity.loss_reduction)
                    alloc = dataclasses.replace(alloc, info={**alloc.info, "key": key})
                    write_rule_allocation(alloc, path)
                    plan = alloc.plan
                out.append(method_variant("sparsegpt_measured", s, plan,
                                          note=f"measured allocation ({self.spec.measured_budget} whole-plan checks), {path.name}"))
        finally:
            slot.restore()
        return out


    def method_comparison(self) -> dict:
        """Every method row against the dense baseline and against global magnitude at the
        same sparsity (paired tests on the same utterances): ``DIR/methods.json``."""
        from .evaluation import compare
        from .files import latest_rows, read_jsonl

        groups = {m[1]: m for m in METHODS}
        rows = [r for r in latest_rows(read_jsonl(self.out / "runs.jsonl")).values() if r.get("status") in ("ok", "collapsed")]
        method_rows = [r for r in rows if r.get("group") in groups or str(r.get("group", "")).removesuffix("_2of4") in groups]
        glob = {(r["model"], r["dataset"], r["protocol"], round(float(r["target_sparsity"]), 4)): r
                for r in method_rows if r.get("group") == "global" and r["status"] == "ok"}
        out_rows = []
        for r in method_rows:
            g = str(r["group"])
            nm = g.endswith("_2of4")
            entry = {k: r.get(k) for k in ("variant", "condition", "group", "model", "dataset", "protocol",
                                           "target_sparsity", "sparsity_linear", "run_id")}
            base = groups[g.removesuffix("_2of4")]
            entry.update({"method": base[0], "label": base[2], "score": base[3], "pattern": "2:4" if nm else None,
                          "wer": r["summary"].get("wer"), "wer_ci": r["summary"].get("wer_ci"),
                          "vs_dense": _cmp_fields(r.get("comparison")), "collapsed": r.get("collapsed")})
            ref = glob.get((r["model"], r["dataset"], r["protocol"], round(float(r["target_sparsity"]), 4)))
            entry["vs_global"] = None
            if ref is not None and ref["run_id"] != r["run_id"] and r["status"] == "ok":
                c = compare(self.out / ref["run_dir"], self.out / r["run_dir"]).to_dict()
                entry["vs_global"] = {"global_run_id": ref["run_id"], **_cmp_fields(c)}
            out_rows.append(entry)
        data = {"rows": out_rows, "note": "delta = method minus reference (WER points as fractions); paired "
                "bootstrap 95% interval and sign-flip permutation p over utterances"}
        atomic_write_json(self.out / "methods.json", data)
        return data


def _cmp_fields(c) -> dict | None:
    if not c:
        return None
    return {"delta": c.get("delta", c.get("delta_wer")), "ci": c.get("ci", c.get("delta_ci")),
            "p": c.get("p", c.get("p_value")), "n": c.get("n", c.get("n_utterances"))}


def draw_heatmaps_quietly(sensitivity_dir: Path) -> None:
    """Draw the sensitivity heatmaps; a plotting failure is logged, the results stand."""
    try:
        draw_heatmaps(sensitivity_dir)
    except Exception as exc:  # noqa: BLE001 - figures must not fail a finished analysis
        log.warning("heatmaps of %s not drawn: %s", sensitivity_dir, exc)


def reproduce(spec: StudySpec, out_dir: str | os.PathLike, *, progress: bool = True, report: bool = True,
              executor=None) -> StudyResult:
    """Run the paper's study on one model and write a report (stages: the module docstring).

    Args:
        spec: the study (:class:`StudySpec`).
        out_dir: the study directory (one writer at a time: :class:`asrprune.files.OutputLock`).
        progress: progress bars.
        report: build the report at the end.
        executor: run the sweeps' runs elsewhere (:class:`asrprune.executor.RayExecutor`); the
            other stages (sensitivity, allocation, checks, report) run here.

    Returns:
        :class:`StudyResult`.

    Raises:
        OverlapError: calibration overlaps an evaluation set (unless ``spec.allow_overlap``).
        FileNotFoundError, ValueError: unreadable data, bad arguments.
        OutputBusyError: another process writes into ``out_dir``.
    """
    t_start, study_started = time.perf_counter(), now_iso()
    out = Path(out_dir)
    with OutputLock(out):
        study = _Study(spec, out, progress=progress, executor=executor)
        grid = spec.grid
        # 1. the overlap guard, then what the study is
        overlap = check_disjoint(study.calib_set, list(study.eval_sets.values()), allow_overlap=spec.allow_overlap)
        calib = study.calib_spec
        update_study_json(
            out,
            {
                **_study_fields(study.base_spec, study.eval_sets),
                "model": spec.model,
                "calibration": {
                    "source": calib.source,
                    "include": calib.include,
                    "n_utterances": len(study.calib_set.utterances),
                    "fingerprint": fingerprint(study.calib_set.utterances),
                    "overlap_with_evaluation": overlap.count,
                },
                "preset": spec.preset,
                "grid": dataclasses.asdict(grid),
                "target": spec.target,
                "baseline_protocols": list(spec.baseline_protocols),
                "finished": None,
            },
            only_missing=("started",),
        )
        slot = study.model()
        n_enc, n_dec = int(slot.model.config.encoder_layers), int(slot.model.config.decoder_layers)
        variants = study_variants(grid, n_enc, n_dec, target=spec.target)
        # the method rows whose plans need no measurement run in the first sweep
        variants += [v for v in fixed_method_variants(grid) if v.name not in {x.name for x in variants}]
        _write_plans(out / "plans", variants)
        update_study_json(out, {"paper_plans": {v.name: {"plan": v.plan.to_text(), "note": v.note}
                                                for v, _ in paper_plans(n_enc, n_dec)}})

        # 2. baselines and the fixed variants
        summary = study.stage("sweep", lambda: study.sweep(variants))
        if summary is not None:
            study.result.sweeps.append(summary)

        # 3. sensitivity on the calibration set, the sensitivity-aware plan, its runs
        sens_dir = out / "sensitivity"
        if _sensitivity_done(sens_dir, slot.fingerprint, [u.id for u in study.calib_set.utterances]):
            log.info("sensitivity results for this model and calibration set found; not recomputed")
            study.result.stages["sensitivity"] = {"status": "ok", "note": "reused sensitivity/sensitivity.json"}
        else:
            study.stage("sensitivity", study.sensitivity)
        allocated = study.stage("allocation", study.allocation) if (sens_dir / "sensitivity.json").is_file() else None
        if allocated is not None:
            summary = study.stage("sweep_allocated", lambda: study.sweep([*variants, allocated]))
            if summary is not None:
                study.result.sweeps.append(summary)

        # 4. the method rows made by a rule: OWL, the authors' rule and the measured allocation
        done_variants = [*variants, *([allocated] if allocated is not None else [])]
        rules: list[Variant] = []
        if "wanda_owl" in grid.method_rows:
            rules += study.stage("owl", lambda: study.owl(grid)) or []
        if "authors" in grid.method_rows and (sens_dir / "sensitivity.json").is_file():
            rules += study.stage("authors", lambda: study.authors(grid)) or []
        if "sparsegpt_measured" in grid.method_rows:
            sdir = study.stage("sensitivity_sparsegpt", lambda: study.sensitivity_under("sparsegpt"))
            if sdir is not None:
                rules += study.stage("measured", lambda: study.measured(grid, sdir)) or []
        if rules:
            summary = study.stage("sweep_methods", lambda: study.sweep([*done_variants, *rules]))
            if summary is not None:
                study.result.sweeps.append(summary)

        if grid.method_rows:
            study.stage("method_comparison", study.method_comparison)

        # 5. is damage additive? the whole target-sparsity plans on the calibration loss
        if (sens_dir / "sensitivity.json").is_file():
            study.stage("plan_check", lambda: study.plan_check(variants, allocated, slot.fingerprint))

        # 6. the report
        study.result.wall_s = time.perf_counter() - t_start
        _record_session(out, study_started, study.result.wall_s)
        if report:
            study.result.report = study.stage("report", lambda: build_report(out))
    return study.result


def _sensitivity_done(sdir: Path, model_fp: str, ids: list[str], *, method: str = "magnitude") -> bool:
    data = read_json(sdir / "sensitivity.json")
    if not isinstance(data, dict):
        return False
    return (data.get("model_fingerprint") == model_fp and (data.get("data") or {}).get("ids") == ids
            and (data.get("method") or "magnitude") == method)


def _write_plans(plans_dir: Path, variants: Iterable[Variant]) -> None:
    """Every named plan of the study as YAML (``asrprune prune --plan plans/NAME.yaml``)."""
    plans_dir.mkdir(parents=True, exist_ok=True)
    for v in variants:
        if v.plan is None:
            continue
        head = f"# {v.label}\n" + (f"# {v.note}\n" if v.note else "")
        atomic_write_text(plans_dir / f"{slug(v.name.replace('@', '_'), 80)}.yaml", head + v.plan.to_yaml())
