"""Sweeps: run the runs of a spec one by one, append one result row per run, resume.

What a sweep is, its YAML form and its run ids: :mod:`asrprune.sweep_spec` (its names are
re-exported here). A rerun of a sweep, or of a larger sweep that contains it, skips the runs that
already have an ok row.

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

The spec and its expansion into runs: :mod:`asrprune.sweep_spec`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from tqdm.auto import tqdm

from .calibration import CalibrationOptions, build_examples
from .decoding import DiskEncoderCache, EncoderCache
from .early_stop import EarlyStop, EarlyStopOptions
from .evaluation import compare, evaluate
from .files import (
    OutputLock,
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    env_stamp,
    latest_rows,
    now_iso,
    read_json,
    read_jsonl,
    slug,
)
from .manifests import SpeechSet, read_speech_set
from .models import load_model, model_fingerprint
from .export import calibration_of
from .overlap import calibration_record, check_disjoint, fingerprint
from .prune import WeightSnapshot, measure_model, prune_model
from .structured import prune_structured

from .sweep_spec import (  # the spec side: used here, and importable from here as before
    ROW_SCHEMA,
    ENCODER_CACHE_MODES,
    RUNS_FILE,
    SPEC_FILE,
    RUN_SPEC_FILE,
    BASELINE,
    DataSpec,
    RunSpec,
    SweepSpec,
    SweepSpecError,
    Variant,
    compute_run_id,
    data_key,
    decode_options,
    expand_runs,
    model_display_name,
    needs_calibration,
)

log = logging.getLogger(__name__)

__all__ = [
    # the runner
    "SweepRunner", "SweepSummary", "run_sweep", "sparsity_fields", "update_study_json",
    # the spec side (asrprune.sweep_spec), importable from here as before the split
    "BASELINE", "ENCODER_CACHE_MODES", "ROW_SCHEMA", "RUNS_FILE", "RUN_SPEC_FILE", "SPEC_FILE", "DataSpec", "RunSpec",
    "SweepSpec", "SweepSpecError", "Variant", "compute_run_id", "data_key", "decode_options", "expand_runs",
    "model_display_name", "needs_calibration",
]

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


