"""Sweep specs: a grid of pruning runs, its YAML form, its expansion into runs with stable ids.

A *sweep* is ``models x variants x data sets x protocols``, where a *variant* is either the
unpruned baseline or a named :class:`~asrprune.config.PrunePlan` (given explicitly, or expanded
from ``selectors x sparsities``). Every expanded run gets a stable ``run_id``: a readable prefix
plus a hash of everything that determines its result (model spec, plan, the selected utterances'
ids and texts, protocol and decoding options, and for calibrated plans the calibration set and
options), so rerunning a sweep, or a larger sweep that contains it, finds the runs that are
already done. :mod:`asrprune.sweep` runs them.

A sweep spec in YAML (relative paths are relative to the YAML file; unknown keys are errors)::

    name: decoder-study
    models: [tiny.en]
    data:
      - ../shared/data/librispeech_test_other/manifest.jsonl
      - {source: ../shared/data/ljspeech/manifest.jsonl, include: "LJ002-*", name: lj002}
    selectors: [decoder_self_attn, decoder_ffn]   # x sparsities: one run per pair
    sparsities: [0.1, 0.3, 0.5]
    plans:                                        # named plans: CLI text, a YAML file or a mapping
      - {name: global40, plan: {entries: [{selector: all_linear, sparsity: 0.4}], mode: global},
         group: global, target_sparsity: 0.4}
      - {name: mine, file: plans/mine.yaml}
    protocols: [standard]                         # pruned runs
    baseline_protocols: [standard, paper]         # baselines (default: protocols)
    decode: {batch_size: 16, device: auto}        # DecodeOptions fields except protocol
    limit: 40
    encoder_cache: memory                         # memory | disk | off
    calibration: {source: ../shared/data/ljspeech/manifest.jsonl, include: "LJ001-*", limit: 100}
    calibration_options: {labels: reference, frames: speech, damp: 0.01, block_size: 128}

Plans with ``score: wanda`` or ``score: sparsegpt`` are pruned with the sweep's ``calibration``
set (built once per model, never overlapping an evaluation set unless ``allow_overlap``); their
run ids also cover the calibration set's fingerprint and ``calibration_options``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from .calibration import CalibrationOptions, LabelSpec
from .config import CALIBRATED_SCORES, PROTOCOLS, SCOPES, PlanEntry, PrunePlan, check_keys, check_sparsity, load_yaml
from .decoding import DecodeOptions
from .early_stop import EarlyStopOptions
from .evaluation import EMPTY_REFERENCE_POLICIES
from .files import (
    OutputBusyError,
    canonical_json,
    short_hash,
    slug,
)

log = logging.getLogger(__name__)

ROW_SCHEMA = 1
ENCODER_CACHE_MODES = ("memory", "disk", "off")
RUNS_FILE = "runs.jsonl"
SPEC_FILE = "sweep.yaml"
RUN_SPEC_FILE = "sweep_run.json"  # evaluate writes its own run.json next to it
BASELINE = "baseline"


class SweepSpecError(ValueError):
    """A sweep spec (YAML file or arguments) is invalid; the message names the field."""


#: another process writes into the same sweep folder (:class:`asrprune.files.OutputLock`)
SweepBusyError = OutputBusyError


def _format_sparsity(s: float) -> str:
    return f"{s:g}"


def _check_sparsity(value: Any, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SweepSpecError(f"{where}: sparsity {value!r} is not a number") from None
    return check_sparsity(v, f"{where}: sparsity", error=SweepSpecError)


# ----------------------------------------------------------------------------------------------
# spec dataclasses
# ----------------------------------------------------------------------------------------------


def _check_keys(obj: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    check_keys(obj, allowed, where, error=SweepSpecError)


def _opt_int(value: Any, where: str, *, minimum: int = 0) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SweepSpecError(f"{where}: expected an integer >= {minimum} or null, got {value!r}")
    return value


def _as_tuple(value: Any, where: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, Mapping)):
        return (value,)
    if isinstance(value, Sequence):
        return tuple(value)
    raise SweepSpecError(f"{where}: expected a list, got {type(value).__name__}")


@dataclass(frozen=True)
class DataSpec:
    """One speech set of a sweep: a source as ``read_speech_set`` takes it, plus a selection.

    ``limit``/``sample`` left ``None`` fall back to the sweep-level values. ``name`` defaults to a
    name derived from the source (the manifest's folder) and the include pattern.
    """

    source: str
    name: str | None = None
    include: str | None = None
    exclude: str | None = None
    limit: int | None = None
    sample: int | None = None
    seed: int | None = None
    encoding: str | None = None  # of the manifest's text (None: utf-8)

    FIELDS = ("source", "name", "include", "exclude", "limit", "sample", "seed", "encoding")

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise SweepSpecError(f"data: source must be a non-empty string, got {self.source!r}")
        _opt_int(self.limit, f"data {self.source}: limit", minimum=1)
        _opt_int(self.sample, f"data {self.source}: sample", minimum=1)
        if self.seed is not None:
            _opt_int(self.seed, f"data {self.source}: seed")

    @classmethod
    def parse(cls, text: str) -> "DataSpec":
        """``SOURCE`` or ``SOURCE::INCLUDE`` (an id pattern, e.g. ``ljspeech/manifest.jsonl::LJ002-*``)."""
        source, sep, include = str(text).partition("::")
        return cls(source=source, include=include or None) if sep else cls(source=source)

    @classmethod
    def from_obj(cls, obj: Any, *, base_dir: Path | None = None) -> "DataSpec":
        if isinstance(obj, DataSpec):
            spec = obj
        elif isinstance(obj, str):
            spec = cls.parse(obj)
        elif isinstance(obj, Mapping):
            _check_keys(obj, cls.FIELDS, "data entry")
            if "source" not in obj:
                raise SweepSpecError(f"data entry {dict(obj)!r} has no 'source'")
            spec = cls(**{k: obj[k] for k in cls.FIELDS if k in obj})
        else:
            raise SweepSpecError(f"data entry must be a string or a mapping, got {obj!r}")
        if base_dir is not None and not Path(spec.source).is_absolute():
            candidate = base_dir / spec.source
            if candidate.exists():
                spec = dataclasses.replace(spec, source=str(candidate.resolve()))
        return spec

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        p = Path(self.source)
        if p.suffix in (".jsonl", ".json", ".csv", ".tsv", ".txt"):
            # ".../librispeech_test_other/manifest.jsonl" -> the folder; "my_set.jsonl" -> the stem
            base = p.parent.name if p.stem in ("manifest", "metadata", "test", "data") else p.stem
        else:
            base = p.name
        base = base or slug(self.source)
        if self.include:
            inc = re.sub(r"[*?\[\]]+", "", self.include).strip("-_.") or "subset"
            base = f"{base}_{inc}"
        return slug(base, 64)

    def to_obj(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.FIELDS if getattr(self, k) is not None}


@dataclass(frozen=True)
class Variant:
    """A named pruning plan of a sweep; ``plan is None`` is the unpruned baseline.

    The labels go into every result row for the report: ``condition`` (human label, default
    ``name``), ``group`` (curve family: a component group such as ``decoder_self_attn``, or
    ``global``, ``uniform``, ``allocated``, ``paper_plan``, ``probe``), ``selector`` and
    ``target_sparsity`` (the requested sparsity of the selector), ``paper_key`` (the paper's row,
    if it has one). ``protocols`` (if set) restricts the protocols the variant runs under.
    """

    name: str
    plan: PrunePlan | None = None
    group: str | None = None
    target_sparsity: float | None = None
    protocols: tuple[str, ...] | None = None
    note: str | None = None
    condition: str | None = None
    selector: str | None = None
    paper_key: str | None = None
    models: tuple[str, ...] | None = None  # if set: only these of the sweep's models

    LABEL_FIELDS = ("group", "target_sparsity", "note", "condition", "selector", "paper_key")

    @property
    def is_baseline(self) -> bool:
        return self.plan is None

    @property
    def label(self) -> str:
        return self.condition or self.name

    def plan_dict(self) -> dict[str, Any] | None:
        return None if self.plan is None else self.plan.to_dict()


def _plan_from_obj(obj: Any, where: str, *, base_dir: Path | None = None) -> PrunePlan:
    """A PrunePlan from CLI plan text, a YAML file path, or a mapping (``PrunePlan.to_dict`` form)."""
    try:
        if isinstance(obj, PrunePlan):
            return obj
        if isinstance(obj, str):
            p = Path(obj)
            if base_dir is not None and not p.is_absolute() and obj.endswith((".yaml", ".yml")):
                p = base_dir / p
            if obj.endswith((".yaml", ".yml")):
                return PrunePlan.from_yaml(p)
            return PrunePlan.parse(obj)
        if isinstance(obj, Mapping):
            return PrunePlan.from_dict(dict(obj), source=where)
    except FileNotFoundError as exc:
        raise SweepSpecError(f"{where}: {exc}") from None
    except ValueError as exc:
        raise SweepSpecError(f"{where}: invalid plan: {exc}") from None
    raise SweepSpecError(f"{where}: a plan must be a string, a YAML path or a mapping, got {obj!r}")


_VARIANT_KEYS = ("name", "plan", "file", "protocols", "models", *Variant.LABEL_FIELDS)


def _variant_from_obj(obj: Any, index: int, *, base_dir: Path | None) -> Variant:
    where = f"plans[{index}]"
    if isinstance(obj, Variant):
        return obj
    if isinstance(obj, str):
        plan = _plan_from_obj(obj, where, base_dir=base_dir)
        return Variant(name=slug(obj, 80), plan=plan)
    if not isinstance(obj, Mapping):
        raise SweepSpecError(f"{where}: expected a mapping with 'name' and 'plan', got {obj!r}")
    _check_keys(obj, _VARIANT_KEYS, where)
    if "name" not in obj:
        raise SweepSpecError(f"{where}: missing 'name'")
    if ("plan" in obj) == ("file" in obj):
        raise SweepSpecError(f"{where} ({obj['name']}): give exactly one of 'plan' or 'file'")
    src = obj.get("plan", obj.get("file"))
    plan = None if src is None else _plan_from_obj(src, f"{where} ({obj['name']})", base_dir=base_dir)
    ts = obj.get("target_sparsity")
    protocols = obj.get("protocols")
    models = obj.get("models")
    return Variant(
        name=str(obj["name"]),
        plan=plan,
        group=obj.get("group"),
        target_sparsity=None if ts is None else _check_sparsity(ts, f"{where}.target_sparsity"),
        protocols=None if protocols is None else tuple(_as_tuple(protocols, f"{where}.protocols")),
        note=obj.get("note"),
        condition=obj.get("condition"),
        selector=obj.get("selector"),
        paper_key=obj.get("paper_key"),
        models=None if models is None else tuple(str(m) for m in _as_tuple(models, f"{where}.models")),
    )


@dataclass(frozen=True)
class SweepSpec:
    """A grid of runs: ``models x (baseline + plans + selectors x sparsities) x data x protocols``.

    Attributes:
        models: model specs as :func:`asrprune.models.load_model` takes them.
        data: speech sets.
        plans: named plans (:class:`Variant`).
        selectors, sparsities: a grid of single-entry plans ``selector=sparsity`` with ``scope``.
        protocols: protocols for pruned runs.
        baseline_protocols: protocols for the baseline runs (default: ``protocols``).
        baseline: whether to run the unpruned baseline (pruned runs are compared with it).
        decode: :class:`asrprune.evaluation.DecodeOptions` fields other than ``protocol``.
        limit, sample, seed: default utterance selection for every data set.
        encoder_cache: ``memory`` (reuse encoder outputs within the sweep), ``disk`` (also keep
            them under ``DIR/encoder_cache``) or ``off``.
        name: a label for the sweep.
    """

    models: tuple[str, ...]
    data: tuple[DataSpec, ...]
    plans: tuple[Variant, ...] = ()
    selectors: tuple[str, ...] = ()
    sparsities: tuple[float, ...] = ()
    scope: str = "component"
    protocols: tuple[str, ...] = ("standard",)
    baseline_protocols: tuple[str, ...] | None = None
    baseline: bool = True
    decode: Mapping[str, Any] = field(default_factory=dict)
    limit: int | None = None
    sample: int | None = None
    seed: int = 0
    encoder_cache: str = "memory"
    name: str = "sweep"
    empty_reference: str = "skip"
    max_failed_fraction: float | None = None
    trust_pickle: bool = False
    calibration: DataSpec | None = None
    calibration_options: Mapping[str, Any] = field(default_factory=dict)
    allow_overlap: bool = False
    reference_model: str | None = None
    early_stop: Any = True  # True (defaults), False (off) or a mapping of EarlyStopOptions fields

    YAML_KEYS = (
        "name", "models", "data", "plans", "selectors", "sparsities", "scope", "protocols",
        "baseline_protocols", "baseline", "decode", "limit", "sample", "seed", "encoder_cache",
        "empty_reference", "max_failed_fraction", "trust_pickle", "calibration", "calibration_options",
        "allow_overlap", "reference_model", "early_stop",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if not self.models:
            raise SweepSpecError("sweep: 'models' is empty; give at least one model")
        for m in self.models:
            if not isinstance(m, str) or not m:
                raise SweepSpecError(f"sweep: model {m!r} is not a non-empty string")
        if not self.data:
            raise SweepSpecError("sweep: 'data' is empty; give at least one speech set")
        for d in self.data:
            if not isinstance(d, DataSpec):
                raise SweepSpecError(f"sweep: data entry {d!r} is not a DataSpec")
        for p in (*self.protocols, *(self.baseline_protocols or ())):
            if p not in PROTOCOLS:
                raise SweepSpecError(f"sweep: protocol {p!r} unknown; allowed: {', '.join(PROTOCOLS)}")
        if not self.protocols and not self.baseline_protocols:
            raise SweepSpecError("sweep: 'protocols' is empty")
        if self.scope not in SCOPES:
            raise SweepSpecError(f"sweep: scope {self.scope!r} unknown; allowed: {', '.join(SCOPES)}")
        if bool(self.selectors) != bool(self.sparsities):
            raise SweepSpecError(
                "sweep: 'selectors' and 'sparsities' go together (a grid selector x sparsity); "
                "give both or neither"
            )
        for s in self.sparsities:
            _check_sparsity(s, "sweep.sparsities")
        for v in self.plans:
            if not isinstance(v, Variant):
                raise SweepSpecError(f"sweep: plan {v!r} is not a Variant")
            unknown = [m for m in v.models or () if m not in self.models
                       and m not in {model_display_name(x) for x in self.models}]
            if unknown:
                raise SweepSpecError(f"sweep: plan {v.name}: models {unknown} are not among the sweep's models")
            for p in v.protocols or ():
                if p not in PROTOCOLS:
                    raise SweepSpecError(f"sweep: plan {v.name}: protocol {p!r} unknown")
        names = [v.name for v in self.plans]
        dupes = sorted({n for n in names if names.count(n) > 1} | ({BASELINE} & set(names)))
        if dupes:
            raise SweepSpecError(f"sweep: plan name(s) {dupes} used twice or reserved")
        _opt_int(self.limit, "sweep.limit", minimum=1)
        _opt_int(self.sample, "sweep.sample", minimum=1)
        _opt_int(self.seed, "sweep.seed")
        if self.encoder_cache not in ENCODER_CACHE_MODES:
            raise SweepSpecError(
                f"sweep: encoder_cache {self.encoder_cache!r} unknown; "
                f"allowed: {', '.join(ENCODER_CACHE_MODES)}"
            )
        if self.empty_reference not in EMPTY_REFERENCE_POLICIES:
            raise SweepSpecError(f"sweep: empty_reference {self.empty_reference!r} unknown; allowed: "
                                 f"{', '.join(EMPTY_REFERENCE_POLICIES)}")
        if self.max_failed_fraction is not None and not (
                isinstance(self.max_failed_fraction, (int, float)) and 0 <= self.max_failed_fraction < 1):
            raise SweepSpecError(f"sweep: max_failed_fraction must be in [0, 1), got {self.max_failed_fraction!r}")
        if not isinstance(self.trust_pickle, bool):
            raise SweepSpecError(f"sweep: trust_pickle must be true or false, got {self.trust_pickle!r}")
        if self.calibration is not None and not isinstance(self.calibration, DataSpec):
            raise SweepSpecError(f"sweep: calibration {self.calibration!r} is not a DataSpec")
        self.calibration_opts()  # validates calibration_options
        try:
            EarlyStopOptions.from_obj(self.early_stop)
        except (TypeError, ValueError) as exc:
            raise SweepSpecError(f"sweep: {exc}") from None
        if self.reference_model is not None and self.reference_model not in self.models:
            raise SweepSpecError(f"sweep: reference_model {self.reference_model!r} is not one of the models "
                                 f"({', '.join(self.models)}); list it (first, so its baselines run first)")
        if not isinstance(self.allow_overlap, bool):
            raise SweepSpecError(f"sweep: allow_overlap must be true or false, got {self.allow_overlap!r}")
        if self.calibration is None:
            for v in self.plans:
                if needs_calibration(v.plan):
                    raise SweepSpecError(
                        f"sweep: plan {v.name} prunes with score {v.plan.score}, which needs calibration data: "
                        "add 'calibration: {source: ..., include: ..., limit: ...}' (never test data)")
        if not isinstance(self.decode, Mapping):
            raise SweepSpecError("sweep: 'decode' must be a mapping of decoding options")
        if "protocol" in self.decode:
            raise SweepSpecError("sweep: set the protocol with 'protocols', not inside 'decode'")
        if not self.baseline and not (self.plans or self.selectors):
            raise SweepSpecError("sweep: nothing to run (no baseline, no plans, no selectors)")
        for p in self.all_protocols:
            decode_options(p, self.decode)  # validates the decode fields once

    # -- views ---------------------------------------------------------------------------------

    def calibration_opts(self) -> CalibrationOptions:
        """``calibration_options`` as :class:`~asrprune.calibration.CalibrationOptions`
        (``labels`` may be ``reference``/``greedy`` or a mapping of LabelSpec fields)."""
        obj = self.calibration_options
        if not isinstance(obj, Mapping):
            raise SweepSpecError("sweep: calibration_options must be a mapping")
        allowed = [f.name for f in dataclasses.fields(CalibrationOptions)]
        unknown = sorted(set(obj) - set(allowed))
        if unknown:
            raise SweepSpecError(f"sweep.calibration_options: unknown {unknown}; allowed: {', '.join(allowed)}")
        kwargs = dict(obj)
        try:
            labels = kwargs.get("labels")
            if isinstance(labels, Mapping):
                kwargs["labels"] = LabelSpec(**labels)
            return CalibrationOptions(**kwargs)
        except (TypeError, ValueError) as exc:
            raise SweepSpecError(f"sweep.calibration_options: {exc}") from None

    @property
    def calibrated(self) -> bool:
        """Whether any plan needs the calibration set."""
        return any(needs_calibration(v.plan) for v in self.plans)

    @property
    def all_protocols(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for p in (*(self.baseline_protocols or self.protocols), *self.protocols):
            seen[p] = None
        for v in self.plans:
            for p in v.protocols or ():
                seen[p] = None
        return tuple(seen)

    def variants(self) -> list[Variant]:
        """Baseline (if enabled), then the explicit plans, then the selector x sparsity grid."""
        out: list[Variant] = []
        if self.baseline:
            out.append(
                Variant(
                    name=BASELINE,
                    plan=None,
                    group=BASELINE,
                    target_sparsity=0.0,
                    protocols=tuple(self.baseline_protocols or self.protocols),
                    condition=BASELINE,
                )
            )
        out.extend(self.plans)
        for selector in self.selectors:
            for s in self.sparsities:
                plan = PrunePlan(entries=(PlanEntry(selector=selector, sparsity=float(s), scope=self.scope),))
                out.append(
                    Variant(
                        name=f"{selector}@{_format_sparsity(s)}",
                        plan=plan,
                        group=selector,
                        target_sparsity=float(s),
                        condition=f"{selector} {100 * float(s):g}%",
                        selector=selector,
                    )
                )
        return out

    # -- YAML ----------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], *, base_dir: str | os.PathLike | None = None) -> "SweepSpec":
        """Build from a mapping (a parsed YAML file); unknown keys are errors.

        Relative data sources, plan files and model directories are resolved against
        ``base_dir`` when the path exists there.
        """
        if not isinstance(obj, Mapping):
            raise SweepSpecError(f"sweep spec must be a mapping, got {type(obj).__name__}")
        _check_keys(obj, cls.YAML_KEYS, "sweep spec")
        bd = Path(base_dir) if base_dir is not None else None
        models = []
        for m in _as_tuple(obj.get("models"), "sweep.models"):
            m = str(m)
            if bd is not None and not Path(m).is_absolute() and (bd / m).exists():
                m = str((bd / m).resolve())
            models.append(m)
        data = tuple(DataSpec.from_obj(d, base_dir=bd) for d in _as_tuple(obj.get("data"), "sweep.data"))
        plans = tuple(
            _variant_from_obj(v, i, base_dir=bd) for i, v in enumerate(_as_tuple(obj.get("plans"), "sweep.plans"))
        )
        sparsities = tuple(
            _check_sparsity(s, "sweep.sparsities") for s in _as_tuple(obj.get("sparsities"), "sweep.sparsities")
        )
        bp = obj.get("baseline_protocols")
        kwargs: dict[str, Any] = dict(
            models=tuple(models),
            data=data,
            plans=plans,
            selectors=tuple(str(s) for s in _as_tuple(obj.get("selectors"), "sweep.selectors")),
            sparsities=sparsities,
            protocols=tuple(_as_tuple(obj.get("protocols", ["standard"]), "sweep.protocols")),
            baseline_protocols=None if bp is None else tuple(_as_tuple(bp, "sweep.baseline_protocols")),
            decode=dict(obj.get("decode") or {}),
        )
        if obj.get("calibration") is not None:
            kwargs["calibration"] = DataSpec.from_obj(obj["calibration"], base_dir=bd)
        if obj.get("calibration_options") is not None:
            kwargs["calibration_options"] = dict(obj["calibration_options"])
        if obj.get("reference_model") is not None:
            ref = str(obj["reference_model"])
            if bd is not None and not Path(ref).is_absolute() and (bd / ref).exists():
                ref = str((bd / ref).resolve())
            kwargs["reference_model"] = ref
        for key in ("scope", "baseline", "limit", "sample", "seed", "encoder_cache", "name", "empty_reference",
                    "max_failed_fraction", "trust_pickle", "allow_overlap", "early_stop"):
            if key in obj and obj[key] is not None:
                kwargs[key] = obj[key]
        if "baseline" in kwargs and not isinstance(kwargs["baseline"], bool):
            raise SweepSpecError(f"sweep.baseline must be true or false, got {kwargs['baseline']!r}")
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "SweepSpec":
        """Load a sweep spec from YAML.

        Raises:
            FileNotFoundError: the file does not exist.
            SweepSpecError: the spec is invalid (message names the field).
        """
        path = Path(path)
        obj = load_yaml(path, "sweep spec", error=SweepSpecError)
        try:
            return cls.from_dict(obj, base_dir=path.resolve().parent)
        except SweepSpecError as exc:
            raise SweepSpecError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        plans = []
        for v in self.plans:
            d: dict[str, Any] = {"name": v.name, "plan": v.plan_dict()}
            for k in Variant.LABEL_FIELDS:
                if getattr(v, k) is not None:
                    d[k] = getattr(v, k)
            if v.protocols is not None:
                d["protocols"] = list(v.protocols)
            if v.models is not None:
                d["models"] = list(v.models)
            plans.append(d)
        out: dict[str, Any] = {
            "name": self.name,
            "models": list(self.models),
            "data": [d.to_obj() for d in self.data],
            "plans": plans,
            "selectors": list(self.selectors),
            "sparsities": list(self.sparsities),
            "scope": self.scope,
            "protocols": list(self.protocols),
            "baseline_protocols": None if self.baseline_protocols is None else list(self.baseline_protocols),
            "baseline": self.baseline,
            "decode": dict(self.decode),
            "limit": self.limit,
            "sample": self.sample,
            "seed": self.seed,
            "encoder_cache": self.encoder_cache,
            "empty_reference": self.empty_reference,
            "max_failed_fraction": self.max_failed_fraction,
            "trust_pickle": self.trust_pickle,
        }
        if self.calibration is not None:  # only when set: older sweep.yaml files stay as they were
            out["calibration"] = self.calibration.to_obj()
            out["calibration_options"] = self.calibration_opts().to_dict()
            out["allow_overlap"] = self.allow_overlap
        if self.reference_model is not None:
            out["reference_model"] = self.reference_model
        opts = EarlyStopOptions.from_obj(self.early_stop)
        out["early_stop"] = False if opts is None else (True if opts == EarlyStopOptions() else opts.to_dict())
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def decode_options(protocol: str, decode: Mapping[str, Any]) -> DecodeOptions:
    """Build ``DecodeOptions(protocol=..., **decode)``; bad fields raise SweepSpecError."""
    try:
        return DecodeOptions(protocol=protocol, **dict(decode))
    except TypeError as exc:
        allowed = [f.name for f in dataclasses.fields(DecodeOptions) if f.name != "protocol"]
        raise SweepSpecError(f"sweep.decode: {exc}; allowed fields: {', '.join(allowed)}") from None
    except ValueError as exc:
        raise SweepSpecError(f"sweep.decode: {exc}") from None


# ----------------------------------------------------------------------------------------------
# expansion into runs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One expanded run of a sweep (what to run; its results go in ``runs/<run_id>/``)."""

    run_id: str
    model: str
    variant: Variant
    data: DataSpec
    data_key: str  # hash of the selected utterances' ids and texts
    protocol: str
    options: Mapping[str, Any]  # DecodeOptions as a dict (protocol included)
    baseline_run_id: str
    reference_run_id: str | None = None  # the reference model's baseline on the same data and protocol

    @property
    def is_baseline(self) -> bool:
        return self.variant.is_baseline


def model_display_name(model: str) -> str:
    """``tiny.en`` for a built-in name, the folder name for a path."""
    p = Path(model)
    return slug(p.name if (p.is_absolute() or os.sep in model) and p.name else model, 40)


def data_key(utterances: Sequence[Any]) -> str:
    """A content key for a selection of utterances: hash of their ids and reference texts.

    Unlike ``manifests.fingerprint`` it ignores file sizes and times, so copying the data keeps
    run ids stable; it changes when the selection or a reference changes.
    """
    h = hashlib.sha256()
    for u in utterances:
        h.update(f"{u.id}\t{u.text}\n".encode())
    return h.hexdigest()[:16]


def compute_run_id(model: str, plan_dict: Mapping | None, dkey: str, protocol: str, options: Mapping) -> tuple[str, str]:
    """(hash, key object) of a run; the hash covers everything that determines the result."""
    key = {
        "model": model,
        "plan": plan_dict,
        "data": dkey,
        "protocol": protocol,
        "options": dict(options),
    }
    return short_hash(key, 12), canonical_json(key)


def expand_runs(spec: SweepSpec, data_keys: Mapping[DataSpec, str], calibration_key: str | None = None) -> list[RunSpec]:
    """Expand a sweep into runs, grouped by model then data set, baselines first.

    Args:
        spec: the sweep.
        data_keys: :func:`data_key` of every ``spec.data`` entry's selected utterances.
        calibration_key: the calibration set's :func:`~asrprune.overlap.fingerprint`; it enters
            the run id of every plan pruned with a calibrated method (with the calibration
            options), and only theirs (magnitude run ids stay as they were).

    Returns:
        Runs in execution order. Variants with identical plans (same run id) are kept once, under
        the first name.
    """
    out: list[RunSpec] = []
    seen: dict[str, str] = {}
    variants = spec.variants()
    for model in spec.models:
        mname = model_display_name(model)
        for d in spec.data:
            dkey = data_keys[d]
            for variant in variants:
                if variant.models is not None and model not in variant.models and mname not in variant.models:
                    continue
                protocols = variant.protocols if variant.protocols is not None else spec.protocols
                for protocol in protocols:
                    opts = decode_options(protocol, spec.decode)
                    options = dataclasses.asdict(opts)
                    # Hash only what can change a transcript (batch size and workers cannot).
                    key_opts = opts.run_key()
                    if spec.empty_reference != "skip":  # the default stays out: older ids stay valid
                        key_opts = {**key_opts, "empty_reference": spec.empty_reference}
                    h, _ = compute_run_id(model, _plan_key(variant, spec, calibration_key), dkey, protocol, key_opts)
                    bh, _ = compute_run_id(model, None, dkey, protocol, key_opts)
                    rid = f"{mname}__{slug(variant.name, 60)}__{d.display_name}__{protocol}__{h}"
                    brid = f"{mname}__{BASELINE}__{d.display_name}__{protocol}__{bh}"
                    ref_id = None
                    if spec.reference_model is not None and model != spec.reference_model:
                        rh, _ = compute_run_id(spec.reference_model, None, dkey, protocol, key_opts)
                        ref_id = f"{model_display_name(spec.reference_model)}__{BASELINE}__{d.display_name}__{protocol}__{rh}"
                    if h in seen:
                        log.info("run %s duplicates %s (same plan); kept once", rid, seen[h])
                        continue
                    seen[h] = rid
                    out.append(
                        RunSpec(
                            run_id=rid,
                            model=model,
                            variant=variant,
                            data=d,
                            data_key=dkey,
                            protocol=protocol,
                            options=options,
                            baseline_run_id=brid,
                            reference_run_id=ref_id,
                        )
                    )
    return out


def needs_calibration(plan: PrunePlan | None) -> bool:
    """Whether pruning ``plan`` reads calibration data: Wanda, SparseGPT, and structured units
    ranked by activations or loss or repaired."""
    if plan is None:
        return False
    return plan.score in CALIBRATED_SCORES or (plan.structured and (plan.score != "magnitude" or plan.repair != "none"))


def _plan_key(variant: Variant, spec: SweepSpec, calibration_key: str | None) -> dict[str, Any] | None:
    """What of a variant enters its run id: the plan, and the calibration of a calibrated one."""
    d = variant.plan_dict()
    if d is None or not needs_calibration(variant.plan):
        return d
    if calibration_key is None:
        raise SweepSpecError(f"plan {variant.name}: score {variant.plan.score} needs the sweep's calibration set")
    return {**d, "calibration": {"fingerprint": calibration_key, "options": spec.calibration_opts().to_dict()}}


