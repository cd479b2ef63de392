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
through :class:`asrprune.evaluation.EncoderCache`, keyed by encoder fingerprint and utterance id,
so a decoder-only variant costs only its decoding.

:func:`reproduce` builds and runs the paper's whole study on one model (see its docstring).

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import yaml

log = logging.getLogger(__name__)

ROW_SCHEMA = 1
PROTOCOLS = ("standard", "paper")
ENCODER_CACHE_MODES = ("memory", "disk", "off")
SCOPES = ("component", "matrix")
RUNS_FILE = "runs.jsonl"
SPEC_FILE = "sweep.yaml"
LOCK_FILE = ".sweep.lock"
RUN_SPEC_FILE = "sweep_run.json"  # evaluate writes its own run.json next to it
BASELINE = "baseline"


class SweepSpecError(ValueError):
    """A sweep spec (YAML file or arguments) is invalid; the message names the field."""


class SweepBusyError(OSError):
    """Another process is running a sweep in the same directory."""


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _slug(text: str, max_len: int = 48) -> str:
    """A file-name-safe form of ``text`` (letters, digits, ``._=-``), at most ``max_len`` chars."""
    s = re.sub(r"[^A-Za-z0-9._=-]+", "-", str(text)).strip("-.")
    return (s or "x")[:max_len]


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _short_hash(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(_canonical_json(obj).encode()).hexdigest()[:n]


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _format_sparsity(s: float) -> str:
    return f"{s:g}"


# ----------------------------------------------------------------------------------------------
# runs.jsonl: atomic appends, tolerant reads
# ----------------------------------------------------------------------------------------------


def append_row(path: str | os.PathLike, row: Mapping[str, Any]) -> None:
    """Append one JSON row to a JSONL file atomically and durably.

    The whole line is written with a single ``write`` on an ``O_APPEND`` descriptor while an
    exclusive ``flock`` is held, then flushed to disk with ``fsync``; a reader never sees half a
    row from a live writer, and a row that was appended survives a crash of the writer. If an
    earlier writer was killed mid-line (the file does not end in a newline), a newline is written
    first so the new row stays parseable.

    Args:
        path: the JSONL file (created if missing).
        row: a JSON-serialisable mapping (non-JSON values are written with ``str``).
    """
    line = (json.dumps(row, sort_keys=False, default=str) + "\n").encode()
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with _flock(fd):
            size = os.fstat(fd).st_size
            if size > 0:
                with open(os.fspath(path), "rb") as fh:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _flock(fd: int, *, blocking: bool = True) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: a single writer per directory is assumed
        yield
        return
    flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
    fcntl.flock(fd, flags)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read every parseable row of a JSONL results file, in file order.

    Lines that are not JSON objects (e.g. a line cut short by a killed writer) are skipped with
    a warning naming the file and line number. A missing file gives an empty list.
    """
    path = Path(path)
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is not valid JSON (cut short?); skipped", path, lineno)
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                log.warning("%s line %d is not a JSON object; skipped", path, lineno)
    return rows


def latest_rows(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """One row per ``run_id``: the last ``ok`` row, else the last row (as ``report`` reads it).

    A retried run appends a new row, which supersedes the earlier failed one.
    """
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        rid = row.get("run_id")
        if not rid:
            continue
        old = out.get(str(rid))
        if old is None or row.get("status") == "ok" or old.get("status") != "ok":
            out[str(rid)] = dict(row)
    return out


# ----------------------------------------------------------------------------------------------
# spec dataclasses
# ----------------------------------------------------------------------------------------------


def _check_keys(obj: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise SweepSpecError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )


def _check_sparsity(value: Any, where: str) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise SweepSpecError(f"{where}: sparsity {value!r} is not a number") from None
    if not (0.0 <= s <= 1.0) or math.isnan(s):
        raise SweepSpecError(
            f"{where}: sparsity {value!r} is outside [0, 1] (sparsity is a fraction, not a percentage)"
        )
    return s


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

    FIELDS = ("source", "name", "include", "exclude", "limit", "sample", "seed")

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
        base = base or _slug(self.source)
        if self.include:
            inc = re.sub(r"[*?\[\]]+", "", self.include).strip("-_.") or "subset"
            base = f"{base}_{inc}"
        return _slug(base, 64)

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
    plan: Any = None  # PrunePlan | None
    group: str | None = None
    target_sparsity: float | None = None
    protocols: tuple[str, ...] | None = None
    note: str | None = None
    condition: str | None = None
    selector: str | None = None
    paper_key: str | None = None

    LABEL_FIELDS = ("group", "target_sparsity", "note", "condition", "selector", "paper_key")

    @property
    def is_baseline(self) -> bool:
        return self.plan is None

    @property
    def label(self) -> str:
        return self.condition or self.name

    def plan_dict(self) -> dict[str, Any] | None:
        return None if self.plan is None else _plan_to_dict(self.plan)


def _plan_to_dict(plan: Any) -> dict[str, Any]:
    return plan.to_dict()


def _plan_from_obj(obj: Any, where: str, *, base_dir: Path | None = None) -> Any:
    """A PrunePlan from CLI plan text, a YAML file path, or a mapping (``PrunePlan.to_dict`` form)."""
    from asrprune.config import PrunePlan

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


_VARIANT_KEYS = ("name", "plan", "file", "protocols", *Variant.LABEL_FIELDS)


def _variant_from_obj(obj: Any, index: int, *, base_dir: Path | None) -> Variant:
    where = f"plans[{index}]"
    if isinstance(obj, Variant):
        return obj
    if isinstance(obj, str):
        plan = _plan_from_obj(obj, where, base_dir=base_dir)
        return Variant(name=_slug(obj, 80), plan=plan)
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

    YAML_KEYS = (
        "name", "models", "data", "plans", "selectors", "sparsities", "scope", "protocols",
        "baseline_protocols", "baseline", "decode", "limit", "sample", "seed", "encoder_cache",
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
        if not isinstance(self.decode, Mapping):
            raise SweepSpecError("sweep: 'decode' must be a mapping of decoding options")
        if "protocol" in self.decode:
            raise SweepSpecError("sweep: set the protocol with 'protocols', not inside 'decode'")
        if not self.baseline and not (self.plans or self.selectors):
            raise SweepSpecError("sweep: nothing to run (no baseline, no plans, no selectors)")
        for p in self.all_protocols:
            decode_options(p, self.decode)  # validates the decode fields once

    # -- views ---------------------------------------------------------------------------------

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
        from asrprune.config import PlanEntry, PrunePlan

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
        for key in ("scope", "baseline", "limit", "sample", "seed", "encoder_cache", "name"):
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
        if not path.is_file():
            raise FileNotFoundError(f"sweep spec {path} not found")
        try:
            obj = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise SweepSpecError(f"sweep spec {path} is not valid YAML: {exc}") from exc
        try:
            return cls.from_dict(obj or {}, base_dir=path.resolve().parent)
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
        }
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def decode_options(protocol: str, decode: Mapping[str, Any]):
    """Build ``evaluation.DecodeOptions(protocol=..., **decode)``; bad fields raise SweepSpecError."""
    from asrprune.evaluation import DecodeOptions

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

    @property
    def is_baseline(self) -> bool:
        return self.variant.is_baseline


def model_display_name(model: str) -> str:
    """``tiny.en`` for a built-in name, the folder name for a path."""
    p = Path(model)
    return _slug(p.name if (p.is_absolute() or os.sep in model) and p.name else model, 40)


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
    return _short_hash(key, 12), _canonical_json(key)


def expand_runs(spec: SweepSpec, data_keys: Mapping[DataSpec, str]) -> list[RunSpec]:
    """Expand a sweep into runs, grouped by model then data set, baselines first.

    Args:
        spec: the sweep.
        data_keys: :func:`data_key` of every ``spec.data`` entry's selected utterances.

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
                protocols = variant.protocols if variant.protocols is not None else spec.protocols
                for protocol in protocols:
                    opts = decode_options(protocol, spec.decode)
                    options = dataclasses.asdict(opts)
                    # Hash only what can change a transcript (batch size and workers cannot).
                    key_opts = opts.run_key() if hasattr(opts, "run_key") else options
                    h, _ = compute_run_id(model, variant.plan_dict(), dkey, protocol, key_opts)
                    bh, _ = compute_run_id(model, None, dkey, protocol, key_opts)
                    rid = f"{mname}__{_slug(variant.name, 60)}__{d.display_name}__{protocol}__{h}"
                    brid = f"{mname}__{BASELINE}__{d.display_name}__{protocol}__{bh}"
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
                        )
                    )
    return out


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
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "total": self.total,
            "ran": len(self.ran),
            "skipped_finished": len(self.skipped),
            "failed": len(self.failed),
            "skipped_failed": len(self.skipped_failed),
            "failed_run_ids": self.failed + self.skipped_failed,
            "wall_s": round(self.wall_s, 2),
        }


class _ModelSlot:
    """The unpruned model of one spec, with an exact copy of its weights for restoring."""

    def __init__(self, spec: str, model, processor, *, device: str = "cpu", dtype: str = "float32"):
        import torch

        self.spec = spec
        self.key = (spec, str(device), str(dtype))
        self.model = model
        self.processor = processor
        self.device = next(model.parameters()).device
        # One CPU copy per distinct storage: tied tensors (token embedding / output projection)
        # are copied once and restored through every name that points at them.
        snap: dict[int, torch.Tensor] = {}
        self.names: dict[str, int] = {}
        with torch.no_grad():
            for name, t in model.state_dict(keep_vars=False).items():
                ptr = t.data_ptr()
                if ptr not in snap:
                    snap[ptr] = t.detach().to("cpu", copy=True)
                self.names[name] = ptr
        self._snap = snap
        self.fingerprint = _model_fingerprint(model)

    def restore(self) -> None:
        """Copy the saved weights back into the model (exact, in place; also after untying)."""
        import torch

        with torch.no_grad():
            for name, t in self.model.state_dict(keep_vars=False).items():
                src = self._snap[self.names[name]]
                if t.shape != src.shape:
                    raise RuntimeError(f"cannot restore {name}: shape changed to {tuple(t.shape)}")
                t.copy_(src.to(t.device))
        self.model.eval()

    def encoder_changed(self) -> bool:
        import torch

        for name, t in self.model.state_dict(keep_vars=False).items():
            if ".encoder." in f".{name}" and not torch.equal(t.cpu(), self._snap[self.names[name]]):
                return True
        return False


def _model_fingerprint(model) -> str:
    from asrprune.models import model_fingerprint

    return model_fingerprint(model)


def measure_model(model) -> dict[str, Any]:
    """Measured sparsity of a model as it is (``prune.measure_model``), as flat row fields.

    Returns:
        ``{"sparsity_linear", "sparsity_all", "nonzero_params", "total_params",
        "nonzero_linear", "linear_params"}``: fractions of zero entries among all linear weights
        (every attention projection and FFN matrix) and among all parameters (tied tensors
        counted once), and the counts behind them.
    """
    from asrprune.prune import measure_model as _measure

    m = _measure(model)
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
    }


class SweepRunner:
    """Runs expanded sweeps; keeps one unpruned model in memory and encoder outputs for reuse.

    One runner may run several specs in a row (e.g. the stages of :func:`reproduce`); the model
    of the last spec stays loaded between calls.

    Args:
        progress: show tqdm progress bars.
    """

    def __init__(self, *, progress: bool = True):
        self.progress = progress
        self._slot: _ModelSlot | None = None
        self._load_errors: dict[tuple[str, str, str], BaseException] = {}
        self._encoder_caches: dict[tuple, Any] = {}
        # counted by a forward hook on the encoder: forward calls, and the 30 s windows they ran
        # on (a CPU encodes one window per call, a GPU a whole batch)
        self.encoder_calls = 0
        self.encoder_windows = 0

    # -- models --------------------------------------------------------------------------------

    def model(self, spec: str, *, device: str = "cpu", dtype: str = "float32") -> _ModelSlot:
        """The unpruned model for ``spec`` (loaded on first use, weights restored)."""
        key = (spec, str(device), str(dtype))
        if key in self._load_errors:
            raise self._load_errors[key]
        slot = self._slot
        if slot is None or slot.key != key:
            self._slot = None
            self._encoder_caches.clear()
            from asrprune.models import load_model

            log.info("loading model %s (%s, %s)", spec, device, dtype)
            try:
                model, processor = load_model(spec, device=device, dtype=dtype)
            except Exception as exc:
                self._load_errors[key] = exc
                raise
            slot = _ModelSlot(spec, model, processor, device=device, dtype=dtype)
            model.get_encoder().register_forward_hook(self._count_encoder_call)
            self._slot = slot
        else:
            slot.restore()
        return slot

    def _count_encoder_call(self, module, args, output) -> None:
        self.encoder_calls += 1
        self.encoder_windows += int(output.last_hidden_state.shape[0])

    def encoder_cache(self, slot: _ModelSlot, dkey: str, mode: str, out_dir: Path):
        """The EncoderCache shared by every run of this model on this data set."""
        if mode == "off":
            return None
        key = (slot.spec, dkey, mode)
        cache = self._encoder_caches.get(key)
        if cache is None:
            # Drop other data sets' caches: runs are grouped by data set, so they are not
            # needed again and would only hold memory.
            self._encoder_caches.clear()
            from asrprune.evaluation import EncoderCache

            if mode == "disk":
                cache = _make_encoder_cache(EncoderCache, out_dir / "encoder_cache" / _slug(slot.spec))
            else:
                cache = _make_encoder_cache(EncoderCache, None)
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
        t0, started_at = time.perf_counter(), _now_iso()
        with _sweep_lock(out):
            (out / SPEC_FILE).write_text(spec.to_yaml(), encoding="utf-8")
            speech_sets = {d: _read_data(d, spec) for d in spec.data}
            keys = {d: data_key(ss.utterances) for d, ss in speech_sets.items()}
            update_study_json(out, _study_fields(spec, speech_sets), only_missing=("started",))
            runs = expand_runs(spec, keys)
            summary = SweepSummary(out_dir=out, total=len(runs))
            done = latest_rows(read_rows(out / RUNS_FILE))
            todo: list[RunSpec] = []
            for run in runs:
                row = done.get(run.run_id)
                if row is not None and row.get("status") == "ok":
                    summary.skipped.append(run.run_id)
                elif row is not None and not retry_failed:
                    summary.skipped_failed.append(run.run_id)
                else:
                    todo.append(run)
            log.info(
                "sweep %s: %d runs, %d finished, %d failed earlier%s, %d to run",
                spec.name, len(runs), len(summary.skipped), len(summary.skipped_failed),
                "" if not summary.skipped_failed else " (rerun with --retry-failed)", len(todo),
            )  # fmt: skip
            bar = _tqdm(todo, desc=f"sweep {spec.name}", unit="run", disable=not self.progress)
            for run in bar:
                row = self._execute(run, speech_sets[run.data], spec, out, done)
                append_row(out / RUNS_FILE, row)
                done[run.run_id] = row
                (summary.ran if row["status"] == "ok" else summary.failed).append(run.run_id)
                if row["status"] != "ok":
                    log.error("run %s failed: %s", run.run_id, row.get("error"))
        summary.wall_s = time.perf_counter() - t0
        if record_time:
            _record_session(out, started_at, summary.wall_s)
        return summary

    def _execute(self, run: RunSpec, speech_set, spec: SweepSpec, out: Path, done: Mapping) -> dict:
        """Run one run; always returns its row (``status`` ``failed`` with the error if it raised)."""
        run_dir = out / "runs" / run.run_id
        started_at, t0, c0 = _now_iso(), time.perf_counter(), time.process_time()
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
        }
        calls_before, windows_before = self.encoder_calls, self.encoder_windows
        try:
            options = decode_options(run.protocol, {k: x for k, x in run.options.items() if k != "protocol"})
            slot = self.model(run.model, device=str(options.resolved_device()), dtype=options.dtype)
            row["model_fingerprint"] = slot.fingerprint
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_json(run_dir / RUN_SPEC_FILE, {k: row[k] for k in row if k not in ("status", "error", "traceback")})
            row["pruning"] = None
            if v.plan is not None:
                from asrprune.prune import prune_model

                full = prune_model(slot.model, v.plan).to_dict()
                _write_json(run_dir / "pruning.json", full)
                row["pruning"] = _pruning_summary(full)
            row.update(measure_model(slot.model))
            row["encoder_touched"] = slot.encoder_changed()
            cache = self.encoder_cache(slot, run.data_key, spec.encoder_cache, out)
            hits_before = _cache_hits(cache)
            from asrprune.evaluation import evaluate

            evaluate(
                slot.model,
                slot.processor,
                speech_set,
                options,
                out_dir=run_dir,
                progress=self.progress,
                encoder_cache=cache,
                model_spec=run.model,
                data_name=run.data.display_name,
            )
            row["summary"] = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
            row["encoder_cache_hits"] = None if cache is None else _cache_hits(cache) - hits_before
            row["comparison"] = None if run.is_baseline else _compare_with_baseline(out, run, done)
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - a failed run is recorded and the sweep goes on
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc()
        row["encoder_calls"] = self.encoder_calls - calls_before
        row["encoder_windows"] = self.encoder_windows - windows_before
        row["started_at"] = started_at
        row["finished_at"] = _now_iso()
        row["wall_s"] = round(time.perf_counter() - t0, 3)
        row["cpu_s"] = round(time.process_time() - c0, 3)  # all threads of this process
        return row


def _make_encoder_cache(cls, directory: Path | None):
    return cls() if directory is None else _disk_cache_class(cls)(directory)


def _disk_cache_class(base):
    """An EncoderCache that also keeps every output as a file, so a rerun reuses them too."""

    class DiskEncoderCache(base):
        def __init__(self, directory: Path, **kwargs):
            super().__init__(**kwargs)
            self.directory = Path(directory)
            self.directory.mkdir(parents=True, exist_ok=True)

        def _path(self, key: tuple[str, str]) -> Path:
            fp, utt_id = key
            return self.directory / fp / (hashlib.sha256(utt_id.encode()).hexdigest()[:24] + ".pt")

        def get(self, key):
            value = super().get(key)
            if value is not None:
                return value
            path = self._path(key)
            if not path.is_file():
                return None
            import torch

            try:
                value = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - a torn file is recomputed
                log.warning("encoder cache file %s unreadable (%s); recomputing", path, exc)
                return None
            self.misses -= 1
            self.hits += 1
            super().put(key, value)
            return value

        def put(self, key, value):
            super().put(key, value)
            path = self._path(key)
            if not path.exists():
                import torch

                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
                torch.save(value.detach().to("cpu").contiguous(), tmp)
                os.replace(tmp, path)

    return DiskEncoderCache


def _cache_hits(cache) -> int:
    if cache is None:
        return 0
    for attr in ("hits", "n_hits"):
        v = getattr(cache, attr, None)
        if isinstance(v, int):
            return v
    return 0


def _compare_with_baseline(out: Path, run: RunSpec, done: Mapping[str, Mapping]) -> dict[str, Any] | None:
    base_row = done.get(run.baseline_run_id)
    base_dir = out / "runs" / run.baseline_run_id
    if base_row is None or base_row.get("status") != "ok" or not (base_dir / "summary.json").exists():
        log.warning("run %s: baseline %s not available; no paired comparison", run.run_id, run.baseline_run_id)
        return None
    from asrprune.evaluation import compare

    comp = compare(base_dir, out / "runs" / run.run_id)
    d = comp.to_dict() if hasattr(comp, "to_dict") else dataclasses.asdict(comp)
    # The keys of the study layout first (docs/architecture.md), then everything compare gives.
    return {
        "baseline_run_id": run.baseline_run_id,
        "delta": d.get("delta_wer"),
        "ci": d.get("delta_ci"),
        "p": d.get("p_value"),
        "top5_share": d.get("top_share"),
        "n": d.get("n_utterances"),
        **d,
    }


def _read_data(d: DataSpec, spec: SweepSpec):
    from asrprune.manifests import read_speech_set

    limit = d.limit if d.limit is not None else spec.limit
    sample = d.sample if d.sample is not None else spec.sample
    seed = d.seed if d.seed is not None else spec.seed
    ss = read_speech_set(d.source, limit=limit, sample=sample, seed=seed, include=d.include, exclude=d.exclude)
    if not ss.utterances:
        raise SweepSpecError(f"data {d.source}: no utterances selected (include={d.include!r}, limit={limit})")
    if ss.errors:
        log.warning("data %s: %d manifest lines could not be read", d.source, len(ss.errors))
    return ss


@contextlib.contextmanager
def _sweep_lock(out: Path) -> Iterator[None]:
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover
            pass
        except BlockingIOError:
            raise SweepBusyError(
                f"another sweep is running in {out} (it holds {out / LOCK_FILE}); "
                "wait for it or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock (also when the process is killed)


def _study_fields(spec: SweepSpec, speech_sets: Mapping[DataSpec, Any]) -> dict[str, Any]:
    from asrprune.manifests import fingerprint

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
        "started": _now_iso(),
        "env": env_stamp(),
    }


def env_stamp() -> dict[str, Any]:
    """Versions and machine facts recorded with a study."""
    import platform
    import sys

    out: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}
    for pkg in ("asrprune", "torch", "transformers", "jiwer"):
        try:
            from importlib.metadata import version

            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing distribution is just not recorded
            out[pkg] = None
    return out


def _record_session(out: Path, started: str, wall_s: float) -> None:
    """Append this invocation to ``study.json`` ``sessions``; ``wall_s`` is their sum (resumes add up)."""
    path = Path(out) / "study.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    sessions = list(data.get("sessions") or [])
    sessions.append({"started": started, "finished": _now_iso(), "wall_s": round(wall_s, 1)})
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
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; rewriting it", path)
    keep = set(only_missing)
    for k, v in fields.items():
        if k in keep and data.get(k) is not None:
            continue
        if k == "datasets" and isinstance(data.get(k), dict) and isinstance(v, Mapping):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    _write_json(path, data)
    return data


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _tqdm(it, **kw):
    from tqdm.auto import tqdm

    return tqdm(it, **kw)


def run_sweep(
    spec: SweepSpec,
    out_dir: str | os.PathLike,
    *,
    retry_failed: bool = False,
    progress: bool = True,
    runner: SweepRunner | None = None,
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

    Returns:
        A :class:`SweepSummary` (counts of runs done, skipped, failed).

    Raises:
        SweepSpecError: a data set selects no utterances or decode options are invalid.
        FileNotFoundError: a data source does not exist.
        SweepBusyError: another process runs a sweep in ``out_dir``.
    """
    runner = runner or SweepRunner(progress=progress)
    return runner.run(spec, out_dir, retry_failed=retry_failed)


# ----------------------------------------------------------------------------------------------
# reproduce: the paper's study in one call
# ----------------------------------------------------------------------------------------------

PRESETS = ("quick", "main", "full")
STUDY_TARGET = 0.4  # the paper's ~40% models (global magnitude, sensitivity-aware)


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

    @classmethod
    def preset(cls, name: str, sparsities: Sequence[float] | None = None) -> "StudyGrid":
        """``quick`` (sized for a 2-core CPU), ``main`` or ``full`` (the paper's 10-50% grids).

        ``main`` is the paper's headline configurations alone: decoder self-attention 50%, late
        encoder 50%, decoder FFN 30%, no cross-attention sweep and no probes (global, uniform,
        the paper's plans and the sensitivity-aware plan are in every preset); calibration on
        all the utterances given.

        ``sparsities`` replaces the component and late-encoder levels (and ``main``'s
        per-group levels: every group of the sweep at those levels).
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
            )
        elif name == "main":
            grid = cls(
                components=(),
                late_encoder=(),
                probes=(),
                calibration_limit=None,
                group_levels=(("decoder_self_attn", (0.5,)), ("late_encoder", (0.5,)), ("decoder_ffn", (0.3,))),
            )
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
            )
        else:
            raise SweepSpecError(f"preset {name!r} unknown; choose one of {', '.join(PRESETS)}")
        if sparsities:
            levels = tuple(sorted({_check_sparsity(x, "--sparsities") for x in sparsities}))
            grid = dataclasses.replace(grid, components=levels, late_encoder=levels, group_levels=None)
        return grid


# The component groups swept by the study: (selector = group name, human label).
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
    from asrprune.config import PlanEntry, PrunePlan

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
    return [
        (
            Variant(
                name="paper_digest",
                plan=PrunePlan(tuple(digest_entries), name="paper_digest"),
                group="paper_plan",
                condition="paper's 40.8% plan (digest)",
                paper_key="sensitivity_aware@0.4",
                note=digest_note,
            ),
            digest_note,
        ),
        (
            Variant(
                name="paper_code",
                plan=PrunePlan(tuple(code_entries), name="paper_code"),
                group="paper_plan",
                condition="paper's plan (authors' code)",
                paper_key="sensitivity_aware@0.4",
                note=code_note,
            ),
            code_note,
        ),
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
    from asrprune.config import PlanEntry, PrunePlan

    out: list[Variant] = []
    per_group = dict(grid.group_levels) if grid.group_levels is not None else None
    for selector, label in STUDY_GROUPS:
        if per_group is not None:
            levels = per_group.get(selector, ())
        else:
            levels = grid.late_encoder if selector == "late_encoder" else grid.components
        for s in levels:
            out.append(
                Variant(
                    name=f"{selector}@{_format_sparsity(s)}",
                    plan=PrunePlan((PlanEntry(selector, s),)),
                    group=selector,
                    selector=selector,
                    target_sparsity=s,
                    condition=f"{label} {_pct(s)}",
                )
            )
    for selector, s in grid.probes:
        out.append(
            Variant(
                name=f"probe_{selector}@{_format_sparsity(s)}",
                plan=PrunePlan((PlanEntry(selector, s),)),
                group="probe",
                selector=selector,
                target_sparsity=s,
                condition=f"probe: {_PROBE_LABELS.get(selector, selector)} {_pct(s)}",
            )
        )
    out.append(
        Variant(
            name=f"global@{_format_sparsity(target)}",
            plan=PrunePlan((PlanEntry("all_linear", target),), mode="global"),
            group="global",
            selector="all_linear",
            target_sparsity=target,
            condition=f"global magnitude {_pct(target)}",
        )
    )
    out.append(
        Variant(
            name=f"uniform@{_format_sparsity(target)}",
            plan=PrunePlan((PlanEntry("all_linear", target, scope="matrix"),)),
            group="uniform",
            selector="all_linear",
            target_sparsity=target,
            condition=f"uniform per-matrix {_pct(target)}",
        )
    )
    out.extend(v for v, _ in paper_plans(n_encoder_layers, n_decoder_layers))
    return out


@dataclass
class StudyResult:
    """What :func:`reproduce` did: the sweeps' summaries, stage times, report paths."""

    out_dir: Path
    sweeps: list[SweepSummary] = field(default_factory=list)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: Any = None
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


def _layer_counts(model) -> tuple[int, int]:
    cfg = model.config
    return int(cfg.encoder_layers), int(cfg.decoder_layers)


def reproduce(
    model: str,
    data: Sequence[str | DataSpec],
    calibration: str | DataSpec,
    out_dir: str | os.PathLike,
    *,
    limit: int | None = None,
    sample: int | None = None,
    seed: int = 0,
    protocols: Sequence[str] = ("standard",),
    baseline_protocols: Sequence[str] = PROTOCOLS,
    preset: str = "quick",
    sparsities: Sequence[float] | None = None,
    calibration_limit: int | None = None,
    decode: Mapping[str, Any] | None = None,
    sensitivity_options: Any = None,
    target: float = STUDY_TARGET,
    allow_overlap: bool = False,
    retry_failed: bool = False,
    encoder_cache: str = "memory",
    progress: bool = True,
    report: bool = True,
) -> StudyResult:
    """Run the paper's study on one model and write a report.

    Steps (each resumable; a rerun with the same arguments skips what is done):

    1. read the evaluation sets and the calibration set; refuse calibration that overlaps any
       evaluation set (:func:`asrprune.manifests.check_disjoint`) unless ``allow_overlap``;
    2. sweep: baselines under ``baseline_protocols`` (default both), then under ``protocols``
       (default ``standard``): decoder self-attention, late encoder, decoder FFN and
       cross-attention at the preset's sparsities, the fragility probes (biases 10%, early
       decoder layers 50%, convolutions, layer norms, token embeddings), global magnitude and
       uniform per-matrix at ``target`` of all linear weights, and the paper's own plans
       (:func:`paper_plans`); every pruned run is compared with its baseline (paired test);
    3. sensitivity analysis on the calibration set (``DIR/sensitivity``), then the
       sensitivity-aware plan at ``target`` (``DIR/plans/allocated_40.yaml``) and its runs, then
       the teacher-forced calibration loss of the whole global, uniform and sensitivity-aware
       plans against the allocator's additive prediction (``DIR/plans/plan_check.json``);
    4. ``report.md`` / ``report.html`` (:func:`asrprune.report.build_report`).

    A failed run or stage is recorded (``runs.jsonl`` / ``study.json``) and the study goes on.

    Args:
        model: model spec (:func:`asrprune.models.load_model`).
        data: evaluation sets (``SOURCE`` or ``SOURCE::INCLUDE`` strings, or :class:`DataSpec`).
        calibration: the calibration set (same forms); ``calibration_limit`` caps it (default:
            the preset's, 20 utterances for ``quick``, all for ``full``).
        out_dir: the study directory.
        limit, sample, seed: utterance selection of every evaluation set.
        protocols: protocols of the pruned runs; baseline_protocols: of the baselines.
        preset: ``quick`` or ``full`` grids (:class:`StudyGrid`); ``sparsities`` replaces the
            component sweep levels.
        decode: :class:`asrprune.evaluation.DecodeOptions` fields (batch_size, device, ...).
        sensitivity_options: :class:`asrprune.sensitivity.SensitivityOptions`.
        target: sparsity of the global, uniform and sensitivity-aware plans (linear weights).
        allow_overlap: let calibration overlap evaluation (recorded; not recommended).
        retry_failed: rerun runs that failed before.
        encoder_cache: ``memory``, ``disk`` or ``off`` (see :class:`SweepSpec`).
        progress: progress bars.
        report: build the report at the end.

    Returns:
        :class:`StudyResult`.

    Raises:
        OverlapError: calibration overlaps an evaluation set.
        FileNotFoundError, ValueError: unreadable data, bad arguments.
        SweepBusyError: another sweep runs in ``out_dir``.
    """
    from asrprune.manifests import check_disjoint, fingerprint

    t_start, study_started = time.perf_counter(), _now_iso()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = StudyGrid.preset(preset, sparsities)
    data_specs = tuple(DataSpec.from_obj(d) for d in data)
    if not data_specs:
        raise SweepSpecError("reproduce: give at least one evaluation data set")
    calib_spec = DataSpec.from_obj(calibration)
    if calib_spec.limit is None and (calibration_limit or grid.calibration_limit):
        calib_spec = dataclasses.replace(calib_spec, limit=calibration_limit or grid.calibration_limit)
    decode = dict(decode or {})
    base_spec = SweepSpec(
        models=(model,),
        data=data_specs,
        protocols=tuple(protocols),
        baseline_protocols=tuple(baseline_protocols),
        decode=decode,
        limit=limit,
        sample=sample,
        seed=seed,
        encoder_cache=encoder_cache,
        name="reproduce",
    )  # validates protocols and decode options before anything runs

    # 1. data and the overlap guard
    calib_set = _read_data(calib_spec, base_spec)
    eval_sets = {d: _read_data(d, base_spec) for d in data_specs}
    overlap = check_disjoint(calib_set, list(eval_sets.values()), allow_overlap=allow_overlap)
    result = StudyResult(out_dir=out)
    update_study_json(
        out,
        {
            **_study_fields(base_spec, eval_sets),
            "model": model,
            "calibration": {
                "source": calib_spec.source,
                "include": calib_spec.include,
                "n_utterances": len(calib_set.utterances),
                "fingerprint": fingerprint(calib_set.utterances),
                "overlap_with_evaluation": overlap.count if hasattr(overlap, "count") else 0,
            },
            "preset": preset,
            "grid": dataclasses.asdict(grid),
            "target": target,
            "baseline_protocols": list(baseline_protocols),
            "finished": None,
        },
        only_missing=("started",),
    )

    runner = SweepRunner(progress=progress)
    slot = runner.model(model, device=str(decode_options("standard", decode).resolved_device()),
                        dtype=decode_options("standard", decode).dtype)
    n_enc, n_dec = _layer_counts(slot.model)
    variants = study_variants(grid, n_enc, n_dec, target=target)
    _write_plans(out / "plans", variants)
    update_study_json(out, {"paper_plans": {v.name: {"plan": v.plan.to_text(), "note": v.note}
                                            for v, _ in paper_plans(n_enc, n_dec)}})

    def stage(name: str, fn):
        t0 = time.perf_counter()
        info: dict[str, Any] = {"status": "running", "started": _now_iso()}
        result.stages[name] = info
        try:
            value = fn()
            info["status"] = "ok"
            return value
        except (SweepBusyError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - a failed stage is recorded, the study goes on
            log.error("study stage %s failed: %s", name, exc)
            info["status"] = "failed"
            info["error"] = f"{type(exc).__name__}: {exc}"
            info["traceback"] = traceback.format_exc()
            return None
        finally:
            info["wall_s"] = round(time.perf_counter() - t0, 1)
            update_study_json(out, {"stages": result.stages})

    # 2. baselines and the fixed variants
    spec_a = dataclasses.replace(base_spec, plans=tuple(variants))
    summary = stage("sweep", lambda: runner.run(spec_a, out, retry_failed=retry_failed, record_time=False))
    if summary is not None:
        result.sweeps.append(summary)

    # 3. sensitivity on the calibration set, the sensitivity-aware plan, its runs
    def sensitivity():
        from asrprune.sensitivity import score_sensitivity

        s = runner.model(model, device=str(decode_options("standard", decode).resolved_device()),
                         dtype=decode_options("standard", decode).dtype)
        try:
            score_sensitivity(
                s.model,
                s.processor,
                calib_set.utterances,
                options=sensitivity_options,
                out_dir=out / "sensitivity",
                evaluation=[u for ss in eval_sets.values() for u in ss.utterances],
                allow_overlap=allow_overlap,
                data_info={"name": calib_spec.display_name, "source": calib_spec.source,
                           "include": calib_spec.include},
                progress=progress,
            )
        finally:
            s.restore()

    def allocation():
        from asrprune.allocate import allocate_plan, load_sensitivity, write_allocation

        alloc = allocate_plan(load_sensitivity(out / "sensitivity"), target)
        write_allocation(alloc, out / "plans" / f"allocated_{round(100 * target)}.yaml")
        return Variant(
            name=f"allocated@{_format_sparsity(target)}",
            plan=alloc.plan,
            group="allocated",
            target_sparsity=target,
            condition=f"sensitivity-aware {_pct(target)}",
            note=f"allocated from sensitivity/ (predicted damage {alloc.predicted_damage:.4g})",
        )

    if _sensitivity_done(out / "sensitivity", slot.fingerprint, [u.id for u in calib_set.utterances]):
        log.info("sensitivity results for this model and calibration set found; not recomputed")
        result.stages["sensitivity"] = {"status": "ok", "note": "reused sensitivity/sensitivity.json"}
    else:
        stage("sensitivity", sensitivity)
    allocated = stage("allocation", allocation) if (out / "sensitivity" / "sensitivity.json").is_file() else None
    if allocated is not None:
        spec_c = dataclasses.replace(spec_a, plans=(*spec_a.plans, allocated))
        summary = stage("sweep_allocated", lambda: runner.run(spec_c, out, retry_failed=retry_failed, record_time=False))
        if summary is not None:
            result.sweeps.append(summary)

    # 3b. is damage additive? the whole target-sparsity plans on the calibration loss
    def plan_check():
        from asrprune.sensitivity import SensitivityOptions, build_examples, check_plans

        plans = {v.name: v.plan for v in variants if v.group in ("global", "uniform")}
        predicted: dict[str, float] = {}
        if allocated is not None:
            plans[allocated.name] = allocated.plan
            info_path = out / "plans" / f"allocated_{round(100 * target)}.json"
            if info_path.is_file():
                predicted[allocated.name] = json.loads(info_path.read_text(encoding="utf-8")).get("predicted_damage")
        key = {
            "model_fingerprint": slot.fingerprint,
            "calibration_ids": [u.id for u in calib_set.utterances],
            "plan_texts": {k: v.to_text() for k, v in plans.items()},
        }
        path = out / "plans" / "plan_check.json"
        if path.is_file():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                old = {}
            if {k: old.get(k) for k in key} == key:
                return old
        s = runner.model(model, device=str(decode_options("standard", decode).resolved_device()),
                         dtype=decode_options("standard", decode).dtype)
        opts = sensitivity_options or SensitivityOptions()
        try:
            examples = build_examples(s.model, s.processor, calib_set.utterances, options=opts,
                                      labels_path=out / "sensitivity" / "labels.jsonl", progress=False)
            checked = check_plans(s.model, examples, plans, loss_reduction=opts.loss_reduction, predicted=predicted)
        finally:
            s.restore()
        checked.update(key)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(checked, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return checked

    if (out / "sensitivity" / "sensitivity.json").is_file():
        stage("plan_check", plan_check)

    # 4. the report
    result.wall_s = time.perf_counter() - t_start
    _record_session(out, study_started, result.wall_s)
    if report:
        from asrprune.report import build_report

        result.report = stage("report", lambda: build_report(out))
    return result


def _sensitivity_done(sdir: Path, model_fp: str, ids: list[str]) -> bool:
    path = sdir / "sensitivity.json"
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return data.get("model_fingerprint") == model_fp and (data.get("data") or {}).get("ids") == ids


def _write_plans(plans_dir: Path, variants: Iterable[Variant]) -> None:
    """Every named plan of the study as YAML (``asrprune prune --plan plans/NAME.yaml``)."""
    plans_dir.mkdir(parents=True, exist_ok=True)
    for v in variants:
        if v.plan is None:
            continue
        head = f"# {v.label}\n" + (f"# {v.note}\n" if v.note else "")
        path = plans_dir / f"{_slug(v.name.replace('@', '_'), 80)}.yaml"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(head + v.plan.to_yaml(), encoding="utf-8")
        os.replace(tmp, path)
