"""Sweeps: expand a grid of pruning runs, run them one by one, append one result row per run, resume.

A *sweep* is ``models x variants x data sets x protocols``, where a *variant* is either the
unpruned baseline or a named :class:`~asrprune.config.PrunePlan` (given explicitly, or expanded
from ``selectors x sparsities``). Every expanded run gets a stable ``run_id``: a readable prefix
plus a hash of everything that determines its result (model spec, plan, the selected utterances'
ids and texts, protocol and decoding options), so rerunning a sweep, or a larger sweep that
contains it, finds the runs that are already done.

Files in the sweep directory (see "Study directory layout" in ``docs/architecture.md``):

- ``sweep.yaml``: the spec last run in this directory;
- ``runs.jsonl``: one row per finished run (``status`` ``ok`` or ``failed``), appended atomically
  when the run ends; the last row of a ``run_id`` wins;
- ``runs/<run_id>/``: ``run.json`` (what was run), ``prune.json`` (measured sparsity), and the
  evaluation's ``utterances.jsonl`` + ``summary.json`` (itself resumable utterance by utterance).

The runner keeps the unpruned model of the current model spec in memory and restores its weights
exactly (a copy of every tensor of the state dict) before each run instead of reloading it.
Variants that leave the encoder untouched reuse the unpruned encoder's outputs for the same audio
through :class:`asrprune.decoding.EncoderCache`, keyed by encoder fingerprint and utterance id,
so a decoder-only variant costs only its decoding.

The paper's whole study on one model (:func:`asrprune.study.reproduce`) runs its stages through
this runner.

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
import json
import logging
import os
import re
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml
from tqdm.auto import tqdm

from .calibration import CalibrationOptions, LabelSpec, build_examples
from .config import CALIBRATED_SCORES, PROTOCOLS, SCOPES, PlanEntry, PrunePlan, check_keys, check_sparsity, load_yaml
from .decoding import DecodeOptions, DiskEncoderCache, EncoderCache
from .early_stop import EarlyStop, EarlyStopOptions
from .evaluation import EMPTY_REFERENCE_POLICIES, compare, evaluate
from .files import (
    OutputBusyError,
    OutputLock,
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    canonical_json,
    env_stamp,
    latest_rows,
    now_iso,
    read_json,
    read_jsonl,
    short_hash,
    slug,
)
from .manifests import SpeechSet, read_speech_set
from .models import load_model, model_fingerprint
from .export import calibration_of
from .overlap import calibration_record, check_disjoint, fingerprint
from .prune import WeightSnapshot, measure_model, prune_model
from .structured import prune_structured

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


# ----------------------------------------------------------------------------------------------
# the runner
# ----------------------------------------------------------------------------------------------


@dataclass
class SweepSummary:
    """What a call of :func:`run_sweep` did."""

    out_dir: Path
    total: int = 0
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped_failed: list[str] = field(default_factory=list)
    collapsed: list[str] = field(default_factory=list)  # stopped early (this call or before)
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "total": self.total,
            "ran": len(self.ran),
            "skipped_finished": len(self.skipped),
            "failed": len(self.failed),
            "skipped_failed": len(self.skipped_failed),
            "collapsed": len(self.collapsed),
            "failed_run_ids": self.failed + self.skipped_failed,
            "wall_s": round(self.wall_s, 2),
        }


class _ModelSlot:
    """The unpruned model of one spec, with an exact CPU copy of its weights for restoring."""

    def __init__(self, spec: str, model, processor, *, device: str = "cpu", dtype: str = "float32"):
        self.spec = spec
        self.key = (spec, str(device), str(dtype))
        self.model = model
        self.processor = processor
        self.device = next(model.parameters()).device
        self.snapshot = WeightSnapshot(model, device="cpu")
        self.fingerprint = model_fingerprint(model)

    def restore(self) -> None:
        """Copy the saved weights back into the model (exact, in place; also after untying)."""
        self.snapshot.restore()
        self.model.eval()

    def encoder_changed(self) -> bool:
        return self.snapshot.changed(".encoder.")


def sparsity_fields(model) -> dict[str, Any]:
    """Measured sparsity of a model as it is (:func:`asrprune.prune.measure_model`), as flat row
    fields.

    Returns:
        ``{"sparsity_linear", "sparsity_all", "nonzero_params", "total_params",
        "nonzero_linear", "linear_params"}``: fractions of zero entries among all linear weights
        (every attention projection and FFN matrix) and among all parameters (tied tensors
        counted once), and the counts behind them.
    """
    m = measure_model(model)
    return {
        "sparsity_linear": m.linear_weights.sparsity,
        "sparsity_all": m.all_parameters.sparsity,
        "nonzero_params": m.all_parameters.nonzero,
        "total_params": m.all_parameters.numel,
        "nonzero_linear": m.linear_weights.nonzero,
        "linear_params": m.linear_weights.numel,
    }


def _pruning_summary(d: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``PruneResult.to_dict()`` kept in a row (the full dict is in pruning.json)."""
    entries = [{k: v for k, v in e.items() if k != "parameters"} for e in d.get("entries", [])]
    return {
        "plan_text": d.get("plan_text"),
        "score": d.get("score"),
        "entries": entries,
        "overall": d.get("overall"),
        "notes": d.get("notes"),
        "elapsed_s": d.get("elapsed_s"),
        **({"calibration": _calibration_summary(d["calibration"])} if d.get("calibration") else {}),
    }


def _calibration_summary(c: Mapping[str, Any]) -> dict[str, Any]:
    data = c.get("data") or {}
    return {"method": c.get("method"), "order": c.get("order"), "options": c.get("options"),
            "n_utterances": c.get("n_utterances"), "fingerprint": data.get("fingerprint"),
            "source": data.get("source"), "n_tokens": c.get("n_tokens"), "warnings": len(c.get("warnings") or [])}


class SweepRunner:
    """Runs expanded sweeps; keeps one unpruned model in memory and encoder outputs for reuse.

    One runner may run several specs in a row (e.g. the stages of :func:`reproduce`); the model
    of the last spec stays loaded between calls.

    Args:
        progress: show tqdm progress bars.
    """

    def __init__(self, *, progress: bool = True, executor=None):
        self.progress = progress
        self.executor = executor  # None: run after run in this process (asrprune.executor.RayExecutor: a cluster)
        self._slot: _ModelSlot | None = None
        self._load_errors: dict[tuple[str, str, str], BaseException] = {}
        self._encoder_caches: dict[tuple, EncoderCache] = {}
        self._calibration: dict[tuple, list] = {}  # (model key, calibration fingerprint, labels) -> examples
        self._hook = None  # the encoder-counting forward hook of the loaded model
        self._reload = False  # the last run changed shapes: load the model afresh
        # counted by a forward hook on the encoder: forward calls, and the 30 s windows they ran
        # on (a CPU encodes one window per call, a GPU a whole batch)
        self.encoder_calls = 0
        self.encoder_windows = 0

    # -- models --------------------------------------------------------------------------------

    def model(self, spec: str, *, device: str = "cpu", dtype: str = "float32", trust_pickle: bool = False) -> _ModelSlot:
        """The unpruned model for ``spec`` (loaded on first use, weights restored)."""
        key = (spec, str(device), str(dtype))
        if key in self._load_errors:
            raise self._load_errors[key]
        slot = self._slot
        if slot is None or slot.key != key:
            self._release(keep_caches=slot is None)
            log.info("loading model %s (%s, %s)", spec, device, dtype)
            try:
                model, processor = load_model(spec, device=device, dtype=dtype, trust_pickle=trust_pickle)
            except Exception as exc:
                self._load_errors[key] = exc
                raise
            slot = _ModelSlot(spec, model, processor, device=device, dtype=dtype)
            self._hook = model.get_encoder().register_forward_hook(self._count_encoder_call)
            self._slot = slot
        else:
            slot.restore()
        return slot

    def _release(self, *, keep_caches: bool = False) -> None:
        """Forget the loaded model: remove its hook, drop it and (unless ``keep_caches``: the
        same model is reloaded after a shape change) its encoder caches and calibration examples."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._slot = None
        if not keep_caches:
            self._encoder_caches.clear()
            self._calibration.clear()

    def calibration_examples(self, slot: _ModelSlot, calib: SpeechSet, options: CalibrationOptions) -> list:
        """The calibration examples of ``calib`` for this model, built once (on the unpruned
        model: greedy labels are the dense model's)."""
        key = (slot.key, fingerprint(calib.utterances), options.labels)
        if key not in self._calibration:
            slot.restore()
            self._calibration[key] = build_examples(slot.model, slot.processor, calib.utterances,
                                                    spec=options.labels, progress=self.progress)
        return self._calibration[key]

    def _count_encoder_call(self, module, args, output) -> None:
        self.encoder_calls += 1
        self.encoder_windows += int(output.last_hidden_state.shape[0])

    def encoder_cache(self, slot: _ModelSlot, dkey: str, mode: str, out_dir: Path) -> EncoderCache | None:
        """The EncoderCache shared by every run of this model on this data set."""
        if mode == "off":
            return None
        key = (slot.spec, dkey, mode)
        cache = self._encoder_caches.get(key)
        if cache is None:
            # Drop other data sets' caches: runs are grouped by data set, so they are not
            # needed again and would only hold memory.
            self._encoder_caches.clear()
            if mode == "disk":
                cache = DiskEncoderCache(out_dir / "encoder_cache" / slug(slot.spec))
            else:
                cache = EncoderCache()
            self._encoder_caches[key] = cache
        return cache

    # -- one sweep -----------------------------------------------------------------------------

    def run(
        self,
        spec: SweepSpec,
        out_dir: str | os.PathLike,
        *,
        retry_failed: bool = False,
        record_time: bool = True,
    ) -> SweepSummary:
        """Run every run of ``spec`` not yet finished in ``out_dir``; see :func:`run_sweep`.

        ``record_time`` writes this call's end time and wall time into ``study.json``
        (:func:`reproduce` records the whole study's instead).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        t0, started_at = time.perf_counter(), now_iso()
        with OutputLock(out):
            atomic_write_text(out / SPEC_FILE, spec.to_yaml())
            speech_sets = {d: _read_data(d, spec) for d in spec.data}
            keys = {d: data_key(ss.utterances) for d, ss in speech_sets.items()}
            calib = self._calibration_set(spec, speech_sets)
            update_study_json(out, _study_fields(spec, speech_sets), only_missing=("started",))
            runs = expand_runs(spec, keys, None if calib is None else calib.key)
            summary = SweepSummary(out_dir=out, total=len(runs))
            done = latest_rows(read_jsonl(out / RUNS_FILE))
            todo: list[RunSpec] = []
            stop = EarlyStopOptions.from_obj(spec.early_stop)
            for run in runs:
                row = done.get(run.run_id)
                if row is not None and row.get("status") == "ok":
                    summary.skipped.append(run.run_id)
                elif row is not None and row.get("status") == "collapsed":
                    if stop is not None:  # decided; rerun with early_stop false to complete it
                        summary.skipped.append(run.run_id)
                        summary.collapsed.append(run.run_id)
                    else:
                        todo.append(run)
                elif row is not None and not retry_failed:
                    summary.skipped_failed.append(run.run_id)
                else:
                    todo.append(run)
            log.info(
                "sweep %s: %d runs, %d finished, %d failed earlier%s, %d to run",
                spec.name, len(runs), len(summary.skipped), len(summary.skipped_failed),
                "" if not summary.skipped_failed else " (rerun with --retry-failed)", len(todo),
            )  # fmt: skip
            ctx = _SweepContext(spec=spec, out=out, speech_sets=speech_sets, calib=calib, stop=stop)

            def finished(run: RunSpec, row: dict) -> None:
                """The one writer of runs.jsonl: comparisons, then the row (atomically)."""
                _finish_row(out, run, row, done)
                append_jsonl(out / RUNS_FILE, row)
                done[run.run_id] = row
                (summary.ran if row["status"] in ("ok", "collapsed") else summary.failed).append(run.run_id)
                if row["status"] == "collapsed":
                    summary.collapsed.append(run.run_id)
                elif row["status"] != "ok":
                    log.error("run %s failed: %s", run.run_id, row.get("error"))

            if self.executor is None:
                for run in tqdm(todo, desc=f"sweep {spec.name}", unit="run", disable=not self.progress):
                    finished(run, self.execute(run, ctx, done))
            else:
                self.executor.run(todo, ctx, done, finished)
        summary.wall_s = time.perf_counter() - t0
        if record_time:
            _record_session(out, started_at, summary.wall_s)
        return summary

    def _calibration_set(self, spec: SweepSpec, speech_sets: Mapping[DataSpec, SpeechSet]) -> "_Calibration | None":
        """The sweep's calibration set, checked disjoint from every evaluation set (unless
        ``allow_overlap``), when a plan needs it."""
        if spec.calibration is None or not spec.calibrated:
            return None
        ss = _read_data(spec.calibration, spec)
        overlap = check_disjoint(ss, list(speech_sets.values()), allow_overlap=spec.allow_overlap)
        record = {**calibration_record(ss.utterances), "source": spec.calibration.source,
                  "include": spec.calibration.include}
        return _Calibration(ss, record["fingerprint"], record, spec.calibration_opts(), overlap.count)

    def execute(self, run: RunSpec, ctx: "_SweepContext", done: Mapping) -> dict:
        """Run one run in this process, writing its files under ``ctx.out``."""
        early = None if run.is_baseline else _early_stop(ctx.out, run, done, ctx.stop)
        return self._execute(run, ctx.speech_sets[run.data], ctx.spec, ctx.out / "runs" / run.run_id, ctx.calib,
                             early, ctx.out)

    def _execute(self, run: RunSpec, speech_set, spec: SweepSpec, run_dir: Path,
                 calib: "_Calibration | None", early: EarlyStop | None, cache_root: Path) -> dict:
        """Run one run into ``run_dir``; always returns its row (``status`` ``failed`` with the
        error if it raised). The comparisons with baselines are added by the driver
        (:func:`_finish_row`), which also writes the row."""
        started_at, t0, c0 = now_iso(), time.perf_counter(), time.process_time()
        v = run.variant
        row: dict[str, Any] = {
            "schema": ROW_SCHEMA,
            "run_id": run.run_id,
            "status": "failed",
            "error": None,
            "traceback": None,
            "model": model_display_name(run.model),
            "model_spec": run.model,
            "dataset": run.data.display_name,
            "data_source": run.data.source,
            "data_include": run.data.include,
            "data_key": run.data_key,
            "protocol": run.protocol,
            "options": dict(run.options),
            "variant": v.name,
            "condition": v.label,
            "group": v.group,
            "selector": v.selector,
            "target_sparsity": v.target_sparsity,
            "paper_key": v.paper_key,
            "note": v.note,
            "plan": v.plan_dict(),
            "baseline_run_id": None if run.is_baseline else run.baseline_run_id,
            "run_dir": f"runs/{run.run_id}",
            "sweep": spec.name,
            "worker": {"host": socket.gethostname(), "pid": os.getpid()},
        }
        calls_before, windows_before = self.encoder_calls, self.encoder_windows
        try:
            options = decode_options(run.protocol, {k: x for k, x in run.options.items() if k != "protocol"})
            slot = self.model(run.model, device=str(options.resolved_device()), dtype=options.dtype,
                              trust_pickle=spec.trust_pickle)
            row["model_fingerprint"] = slot.fingerprint
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / RUN_SPEC_FILE, {k: row[k] for k in row if k not in ("status", "error", "traceback")})
            row["pruning"] = None
            calibration = calibration_of(run.model)  # a pruned model directory's own calibration
            if v.plan is not None:
                examples = None
                if needs_calibration(v.plan):
                    examples = self.calibration_examples(slot, calib.speech_set, calib.options)
                    calibration = calib.record
                if v.plan.structured:  # shapes change: the model is reloaded for the next run
                    self._reload = True
                    result = prune_structured(slot.model, v.plan, calibration=examples, options=calib.options if calib else None,
                                              progress=self.progress)
                else:
                    result = prune_model(slot.model, v.plan, calibration=examples,
                                         options=calib.options if calib else None, progress=self.progress)
                full = result.to_dict()
                if examples is not None:
                    full.setdefault("calibration", {})["data"] = calib.record
                row["structure"] = None if result.structure is None else {
                    k: result.structure[k] for k in ("params_before", "params_after", "size_reduction", "config_expresses")}
                atomic_write_json(run_dir / "pruning.json", full)
                row["pruning"] = _pruning_summary(full)
            row.update(sparsity_fields(slot.model))
            row["encoder_touched"] = slot.encoder_changed()
            cache = self.encoder_cache(slot, run.data_key, spec.encoder_cache, cache_root)
            hits_before = _cache_hits(cache)
            result = evaluate(
                slot.model,
                slot.processor,
                speech_set,
                options,
                out_dir=run_dir,
                progress=self.progress,
                encoder_cache=cache,
                model_spec=run.model,
                data_name=run.data.display_name,
                empty_reference=spec.empty_reference,
                max_failed_fraction=spec.max_failed_fraction,
                calibration=calibration,
                allow_overlap=spec.allow_overlap,
                early_stop=early,
            )
            row["summary"] = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
            row["encoder_cache_hits"] = None if cache is None else _cache_hits(cache) - hits_before
            row["early_stop"] = None if early is None else early.options.to_dict()
            if result.summary.get("status") == "collapsed":
                row["collapsed"] = result.summary["collapsed"]
                row["comparison"] = None
                row["status"] = "collapsed"
            else:
                row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - a failed run is recorded and the sweep goes on
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc()
        if self._reload:
            self._release(keep_caches=True)
            self._reload = False
        row["encoder_calls"] = self.encoder_calls - calls_before
        row["encoder_windows"] = self.encoder_windows - windows_before
        row["started_at"] = started_at
        row["finished_at"] = now_iso()
        row["wall_s"] = round(time.perf_counter() - t0, 3)
        row["cpu_s"] = round(time.process_time() - c0, 3)  # all threads of this process
        return row


@dataclass
class _SweepContext:
    """What every run of one sweep call shares (the executors get it)."""

    spec: SweepSpec
    out: Path
    speech_sets: Mapping[DataSpec, SpeechSet]
    calib: "_Calibration | None"
    stop: EarlyStopOptions | None


def _finish_row(out: Path, run: RunSpec, row: dict, done: Mapping[str, Mapping]) -> None:
    """The paired comparisons of a finished ok run with its baseline (and the reference model's),
    computed by the driver from the files under ``out``; a comparison that fails fails the row."""
    if row.get("status") != "ok":
        row.setdefault("comparison", None)
        return
    try:
        row["comparison"] = None if run.is_baseline else _compare_with_baseline(out, run, done)
        if run.reference_run_id is not None:  # e.g. a pruned base against dense tiny.en
            row["comparison_reference"] = _compare_with_baseline(out, run, done, baseline_id=run.reference_run_id)
    except Exception as exc:  # noqa: BLE001 - recorded in the row
        row["status"] = "failed"
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc()


def _early_stop(out: Path, run: RunSpec, done: Mapping[str, Mapping], stop: EarlyStopOptions | None) -> EarlyStop | None:
    """The early stop of a pruned run, built on its baseline's rows (None: off, or no baseline)."""
    if stop is None:
        return None
    base_row = done.get(run.baseline_run_id)
    path = out / "runs" / run.baseline_run_id / "utterances.jsonl"
    if base_row is None or base_row.get("status") != "ok" or not path.is_file():
        log.info("run %s: no finished baseline, so no early stop", run.run_id)
        return None
    return EarlyStop(read_jsonl(path), stop)


@dataclass(frozen=True)
class _Calibration:
    """A sweep's calibration set: the utterances, their fingerprint (the run-id key), the record
    a pruned model keeps (:func:`~asrprune.overlap.calibration_record`) and the options."""

    speech_set: SpeechSet
    key: str
    record: Mapping[str, Any]
    options: CalibrationOptions
    overlap: int


def _cache_hits(cache) -> int:
    if cache is None:
        return 0
    for attr in ("hits", "n_hits"):
        v = getattr(cache, attr, None)
        if isinstance(v, int):
            return v
    return 0


def _compare_with_baseline(out: Path, run: RunSpec, done: Mapping[str, Mapping], *,
                           baseline_id: str | None = None) -> dict[str, Any] | None:
    baseline_id = baseline_id or run.baseline_run_id
    base_row = done.get(baseline_id)
    base_dir = out / "runs" / baseline_id
    if base_row is None or base_row.get("status") != "ok" or not (base_dir / "summary.json").exists():
        log.warning("run %s: baseline %s not available; no paired comparison", run.run_id, baseline_id)
        return None
    comp = compare(base_dir, out / "runs" / run.run_id)
    d = comp.to_dict()
    # The keys of the study layout first (docs/architecture.md), then everything compare gives.
    return {
        "baseline_run_id": baseline_id,
        "delta": d.get("delta_wer"),
        "ci": d.get("delta_ci"),
        "p": d.get("p_value"),
        "top5_share": d.get("top_share"),
        "n": d.get("n_utterances"),
        **d,
    }


def _read_data(d: DataSpec, spec: SweepSpec) -> SpeechSet:
    limit = d.limit if d.limit is not None else spec.limit
    sample = d.sample if d.sample is not None else spec.sample
    seed = d.seed if d.seed is not None else spec.seed
    ss = read_speech_set(d.source, limit=limit, sample=sample, seed=seed, include=d.include, exclude=d.exclude,
                         encoding=d.encoding or "utf-8")
    if not ss.utterances:
        raise SweepSpecError(f"data {d.source}: no utterances selected (include={d.include!r}, limit={limit})")
    if ss.errors:
        log.warning("data %s: %d manifest lines could not be read", d.source, len(ss.errors))
    return ss


def _study_fields(spec: SweepSpec, speech_sets: Mapping[DataSpec, SpeechSet]) -> dict[str, Any]:
    datasets = {}
    for d, ss in speech_sets.items():
        datasets[d.display_name] = {
            "source": d.source,
            "include": d.include,
            "n_utterances": len(ss.utterances),
            "fingerprint": fingerprint(ss.utterances),
            "data_key": data_key(ss.utterances),
            "manifest_errors": len(getattr(ss, "errors", []) or []),
        }
    return {
        "model": list(spec.models) if len(spec.models) > 1 else spec.models[0],
        "datasets": datasets,
        "protocols": list(spec.all_protocols),
        "limit": spec.limit,
        "sample": spec.sample,
        "seed": spec.seed,
        "started": now_iso(),
        "env": env_stamp(),
    }


def _record_session(out: Path, started: str, wall_s: float) -> None:
    """Append this invocation to ``study.json`` ``sessions``; ``wall_s`` is their sum (resumes add up)."""
    data = read_json(Path(out) / "study.json", {}) or {}
    sessions = list(data.get("sessions") or [])
    sessions.append({"started": started, "finished": now_iso(), "wall_s": round(wall_s, 1)})
    update_study_json(out, {
        "sessions": sessions,
        "finished": sessions[-1]["finished"],
        "wall_s": round(sum(x["wall_s"] for x in sessions), 1),
    })


def update_study_json(out: Path, fields: Mapping[str, Any], *, only_missing: Iterable[str] = ()) -> dict[str, Any]:
    """Merge ``fields`` into ``out/study.json`` (atomic rewrite); ``datasets`` maps are merged.

    Keys named in ``only_missing`` are set only when the file lacks them (e.g. ``started``).
    """
    path = Path(out) / "study.json"
    data: dict[str, Any] = read_json(path, {}) or {}
    keep = set(only_missing)
    for k, v in fields.items():
        if k in keep and data.get(k) is not None:
            continue
        if k == "datasets" and isinstance(data.get(k), dict) and isinstance(v, Mapping):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    atomic_write_json(path, data)
    return data


def run_sweep(
    spec: SweepSpec,
    out_dir: str | os.PathLike,
    *,
    retry_failed: bool = False,
    progress: bool = True,
    runner: SweepRunner | None = None,
    executor=None,
) -> SweepSummary:
    """Run a sweep into ``out_dir``, appending one row per run to ``out_dir/runs.jsonl``.

    Runs whose latest row is ``ok`` are skipped; runs whose latest row is ``failed`` are skipped
    unless ``retry_failed``. A run that raises is recorded with its error and traceback and the
    sweep goes on; an interrupted run (killed process, Ctrl-C) has no row and is run again
    (its evaluation resumes from the utterances already written).

    Args:
        spec: the sweep.
        out_dir: the sweep directory (created).
        retry_failed: also rerun runs that failed before.
        progress: tqdm progress bars.
        runner: reuse a runner (and its loaded model) across calls.
        executor: run the runs elsewhere (:class:`asrprune.executor.RayExecutor`); ``None``: here.

    Returns:
        A :class:`SweepSummary` (counts of runs done, skipped, failed).

    Raises:
        SweepSpecError: a data set selects no utterances or decode options are invalid.
        FileNotFoundError: a data source does not exist.
        SweepBusyError: another process runs a sweep in ``out_dir``.
    """
    runner = runner or SweepRunner(progress=progress, executor=executor)
    return runner.run(spec, out_dir, retry_failed=retry_failed)


# The component groups swept by the study: (selector = group name, human label).


