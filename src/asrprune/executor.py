"""Sweeps, studies and large evaluations on a Ray cluster (the optional extra ``asrprune[ray]``).

Without an executor, :class:`~asrprune.sweep.SweepRunner` runs one run after another in its own
process. :class:`RayExecutor` runs them as tasks of Ray actors, one per worker slot, with the same
results, the same resume and one writer per file:

- **Workers compute, the driver writes.** A worker runs the run into a temporary folder of its
  own and returns the run's row and its files (``utterances.jsonl``, ``summary.json``,
  ``run.json``, ``pruning.json``, ``sweep_run.json``); the driver writes them under ``--out`` and
  then appends the row, so ``runs.jsonl`` and every run folder keep one writer, and rerunning the
  command after any interruption runs exactly the runs without an ok row (a run that was cut off
  left no row). Partial ``utterances.jsonl`` of an earlier interrupted run (or of a ``collapsed``
  run being completed) are shipped to the worker, which resumes from them.
- **Order and dependencies.** Baselines run first; a pruned run waits for its baseline (its early
  stop and its paired comparison need the baseline's rows). The comparisons are computed by the
  driver from the files it wrote.
- **Encoder reuse.** Every actor keeps its own :class:`~asrprune.sweep.SweepRunner` (the unpruned
  model and its encoder cache in memory), and an idle actor takes the next run of the model and
  data set it ran last, so decoder-only variants of the same model and data mostly land on the
  same worker and reuse its encoder outputs; the cache is not shared through the object store (a
  30 s window of base is 1500 x 512 floats, 3 MB, per utterance: cheaper to recompute than to ship
  for one run).
- **Faults.** A Python exception in a run is a failed row at once, as locally. A worker process
  that dies (``RayActorError``) is restarted by Ray, and the run is tried again, at most
  ``max_retries`` times; then it gets a failed row naming the deaths. No partial row is written.
- **Reachability.** Workers read the audio by path (a shared filesystem, or the same machine) and
  load models by spec: built-in names and hub ids resolve on every worker; a local model
  directory that a worker does not see is shipped through the object store (``ship_models``) and
  unpacked there. A worker that cannot read an utterance's audio fails the run with a message
  that names the host and the path.

Sharded evaluation (:func:`sharded_batches`, ``asrprune evaluate --executor ray --shards N``)
splits one large evaluation across workers at batch boundaries: ``evaluate`` forms its batches as
always (longest first) and hands contiguous runs of them to the workers, so every decoder batch
is the one a single process would run, and the merged ``utterances.jsonl`` and ``summary.json``
equal the single-process run's.

Each row records the worker's ``host`` and ``pid``.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .files import atomic_write_text, read_jsonl

log = logging.getLogger(__name__)

__all__ = ["EXECUTORS", "RayExecutor", "sharded_batches"]

EXECUTORS = ("local", "ray")
FAULT_ENV = "ASRPRUNE_FAULT_INJECT"  # tests only: "VARIANT:N:DIR" kills a worker N times on VARIANT
_RUN_FILES = ("utterances.jsonl", "summary.json", "run.json", "pruning.json", "sweep_run.json")


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("the ray executor needs Ray: pip install 'asrprune[ray]'") from None
    return ray


def _init(address: str | None, init_kwargs: Mapping[str, Any] | None):
    ray = _ray()
    if not ray.is_initialized():
        kwargs = {"log_to_driver": False, "include_dashboard": False, **dict(init_kwargs or {})}
        ray.init(address=address, **kwargs)
    return ray


def _pack_dir(path: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(path.rglob("*")):
            if f.is_file():
                tar.add(f, arcname=str(f.relative_to(path)))
    return buf.getvalue()


def _fault_injection(variant: str) -> None:
    """Tests only: kill this worker process the first N times it runs ``variant``."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, n, folder = spec.split(":", 2)
    if name != variant:
        return
    marks = Path(folder)
    marks.mkdir(parents=True, exist_ok=True)
    count = len(list(marks.glob("kill-*")))
    if n == "always" or count < int(n):
        (marks / f"kill-{count}-{os.getpid()}").touch()
        os._exit(1)


class _Worker:
    """A Ray actor: one SweepRunner (model + encoder cache) per worker process."""

    def __init__(self, threads: int):
        import torch

        from .sweep import SweepRunner

        torch.set_num_threads(max(1, int(threads)))
        self.runner = SweepRunner(progress=False)
        self.root = Path(tempfile.mkdtemp(prefix="asrprune-worker-"))
        self.models: dict[str, str] = {}

    def pid(self) -> int:
        return os.getpid()

    def _model_path(self, spec: str, packed) -> str:
        if packed is None or Path(spec).exists():
            return spec
        if spec not in self.models:
            ray = _ray()
            data = ray.get(packed) if not isinstance(packed, bytes) else packed
            dest = self.root / "models" / str(abs(hash(spec)))
            dest.mkdir(parents=True, exist_ok=True)
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                tar.extractall(dest, filter="data")
            self.models[spec] = str(dest)
        return self.models[spec]

    def execute(self, payload: Mapping[str, Any]) -> tuple[dict, dict[str, bytes]]:
        import dataclasses

        from .early_stop import EarlyStop

        run, ctx = payload["run"], payload["ctx"]
        _fault_injection(run.variant.name)
        speech_set = ctx.speech_sets[run.data]
        missing = [u.audio for u in speech_set.utterances[:1] + speech_set.utterances[-1:]
                   if isinstance(u.audio, (str, os.PathLike)) and u.audio and not Path(u.audio).exists()]
        if missing:
            raise FileNotFoundError(f"worker {socket.gethostname()} (pid {os.getpid()}) cannot read {missing[0]}: "
                                    "the audio must be on a filesystem every worker sees")
        model = self._model_path(run.model, payload.get("model_files"))
        local_run = dataclasses.replace(run, model=model) if model != run.model else run
        task_dir = Path(tempfile.mkdtemp(dir=self.root))
        run_dir = task_dir / "runs" / run.run_id
        run_dir.mkdir(parents=True)
        for name, data in (payload.get("resume") or {}).items():
            (run_dir / name).write_bytes(data)
        early = None
        if payload.get("baseline_rows") is not None and ctx.stop is not None:
            early = EarlyStop(payload["baseline_rows"], ctx.stop)
        try:
            row = self.runner._execute(local_run, speech_set, ctx.spec, run_dir, ctx.calib, early, self.root)
            row["model_spec"] = run.model
            files = {f.name: f.read_bytes() for f in run_dir.iterdir() if f.name in _RUN_FILES}
            return row, files
        finally:
            shutil.rmtree(task_dir, ignore_errors=True)

    def evaluate_shard(self, model_spec: str, packed, utterances, options, kwargs) -> list[dict]:
        """One shard of a sharded evaluation: its rows and this worker's host and pid."""
        from .evaluation import evaluate
        from .models import load_model

        spec = self._model_path(model_spec, packed)
        if getattr(self, "_shard_model", (None,))[0] != spec:
            model, processor = load_model(spec, device=str(options.resolved_device()), dtype=options.dtype)
            self._shard_model = (spec, model, processor)
        _, model, processor = self._shard_model
        res = evaluate(model, processor, utterances, options, progress=False, **dict(kwargs))
        return res.rows, {"host": socket.gethostname(), "pid": os.getpid()}


class RayExecutor:
    """Runs a sweep's runs on Ray actors (module docstring).

    Args:
        address: a cluster address (``ray start --head`` prints it; ``auto`` joins the local one);
            ``None`` starts a local Ray with this machine's resources.
        workers: actors to start (default: as many as the cluster's CPUs, or GPUs, allow).
        num_cpus, num_gpus: resources of each actor (``num_gpus=1`` on a GPU cluster; torch uses
            ``num_cpus`` threads in each).
        max_retries: tries after a worker death, per run.
        ship_models: ship local model directories a worker does not see through the object store.
        init_kwargs: more ``ray.init`` arguments (tests pass ``num_cpus``).
        runtime_env: Ray runtime environment of the workers (``env_vars``, ``working_dir``, ...).
    """

    def __init__(self, *, address: str | None = None, workers: int | None = None, num_cpus: float = 1,
                 num_gpus: float = 0, max_retries: int = 2, ship_models: bool = True,
                 init_kwargs: Mapping[str, Any] | None = None, runtime_env: Mapping[str, Any] | None = None):
        self.address, self.workers = address, workers
        self.runtime_env = dict(runtime_env) if runtime_env else None
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.max_retries, self.ship_models = int(max_retries), ship_models
        self.init_kwargs = init_kwargs
        self._actors: list = []
        self._packed: dict[str, Any] = {}

    # -- actors --------------------------------------------------------------------------------

    def _n_workers(self, ray, wanted: int) -> int:
        if self.workers:
            return max(1, min(self.workers, wanted))
        res = ray.cluster_resources()
        by_cpu = int(res.get("CPU", 1) // max(self.num_cpus, 1e-9))
        by_gpu = int(res.get("GPU", 0) // self.num_gpus) if self.num_gpus else by_cpu
        return max(1, min(by_cpu, by_gpu, wanted))

    def actors(self, n: int) -> list:
        ray = _init(self.address, self.init_kwargs)
        if len(self._actors) < n:
            remote = ray.remote(_Worker).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=-1,
                                                 max_task_retries=0,
                                                 **({"runtime_env": self.runtime_env} if self.runtime_env else {}))
            self._actors += [remote.remote(max(1, int(self.num_cpus))) for _ in range(n - len(self._actors))]
        return self._actors[:n]

    @staticmethod
    def _alive_pid(actor, timeout_s: float = 300.0) -> int:
        """The pid of the actor's worker process, waiting while Ray restarts it."""
        ray = _ray()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get(actor.pid.remote(), timeout=60)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _model_files(self, spec: str):
        ray = _ray()
        path = Path(spec)
        if not self.ship_models or not path.is_dir():
            return None
        if spec not in self._packed:
            self._packed[spec] = ray.put(_pack_dir(path))
        return self._packed[spec]

    def shutdown(self) -> None:
        """Stop the actors (Ray itself keeps running)."""
        ray = _ray()
        for a in self._actors:
            ray.kill(a)
        self._actors = []

    # -- a sweep -------------------------------------------------------------------------------

    def run(self, todo: Sequence, ctx, done: dict, finished: Callable[[Any, dict], None]) -> None:
        """Run ``todo`` (RunSpecs) on the actors; ``finished(run, row)`` is called by the driver
        for each, after its files are written under ``ctx.out``."""
        if not todo:
            return
        ray = _init(self.address, self.init_kwargs)
        actors = self.actors(self._n_workers(ray, len(todo)))
        pending = list(todo)
        in_todo = {r.run_id for r in todo}
        attempts: dict[str, int] = {}
        running: dict[Any, tuple[Any, Any]] = {}  # future -> (actor, run)
        last: dict[int, tuple] = {}  # actor index -> (model, data key) of its last run
        idle = list(range(len(actors)))
        pids = [self._alive_pid(a) for a in actors]  # a new pid after an error: the worker died
        log.info("ray executor: %d runs on %d workers", len(todo), len(actors))

        def eligible(run) -> bool:
            if run.is_baseline:
                return True
            b = run.baseline_run_id
            return b in done or b not in in_todo  # its baseline finished (or is not part of this sweep)

        def pick(i: int):
            ready = [r for r in pending if eligible(r)]
            if not ready:
                return None
            same = [r for r in ready if (r.model, r.data_key) == last.get(i)]
            run = (same or ready)[0]
            pending.remove(run)
            return run

        while pending or running:
            for i in list(idle):
                run = pick(i)
                if run is None:
                    break
                idle.remove(i)
                last[i] = (run.model, run.data_key)
                fut = actors[i].execute.remote(self._payload(run, ctx, done))
                running[fut] = (i, run)
            if not running:
                if pending:  # nothing eligible and nothing running: baselines missing; run them as they are
                    for r in list(pending):
                        in_todo.discard(r.baseline_run_id)
                    continue
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            fut = ready[0]
            i, run = running.pop(fut)
            idle.append(i)
            try:
                row, files = ray.get(fut)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                pid = self._alive_pid(actors[i])  # Ray restarts a dead actor; wait for it
                died = pid != pids[i]
                pids[i] = pid
                if died:
                    attempts[run.run_id] = attempts.get(run.run_id, 0) + 1
                if not died or attempts[run.run_id] <= self.max_retries:
                    if died:
                        log.warning("run %s: its worker died (%s); trying again (%d of %d)", run.run_id,
                                    type(exc).__name__, attempts[run.run_id], self.max_retries)
                    pending.insert(0, run)
                    continue
                row, files = _died_row(run, ctx, attempts[run.run_id], exc), {}
            except Exception as exc:  # noqa: BLE001 - e.g. the payload could not be shipped
                row, files = _died_row(run, ctx, 0, exc), {}
            self._write(ctx.out / "runs" / run.run_id, files)
            finished(run, row)

    def _payload(self, run, ctx, done: Mapping) -> dict[str, Any]:
        run_dir = ctx.out / "runs" / run.run_id
        resume = {}
        if (run_dir / "utterances.jsonl").is_file() and (run_dir / "run.json").is_file():
            resume = {n: (run_dir / n).read_bytes() for n in ("utterances.jsonl", "run.json")}
        baseline_rows = None
        if not run.is_baseline and ctx.stop is not None:
            b = done.get(run.baseline_run_id)
            path = ctx.out / "runs" / run.baseline_run_id / "utterances.jsonl"
            if b is not None and b.get("status") == "ok" and path.is_file():
                baseline_rows = read_jsonl(path)
        return {"run": run, "ctx": _shippable(ctx, run), "resume": resume, "baseline_rows": baseline_rows,
                "model_files": self._model_files(run.model)}

    @staticmethod
    def _write(run_dir: Path, files: Mapping[str, bytes]) -> None:
        if not files:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            atomic_write_text(run_dir / name, data.decode("utf-8"))

    # -- sharded evaluation --------------------------------------------------------------------

    def batch_runner(self, model_spec: str, options, shards: int | None = None, **evaluate_kwargs) -> Callable:
        """The ``decode_batches`` hook of :func:`asrprune.evaluation.evaluate` (see
        :func:`sharded_batches`); ``shards=None``: as many as the cluster has worker slots."""
        if shards is None:
            shards = self._n_workers(_init(self.address, self.init_kwargs), 10**6)
        return sharded_batches(self, model_spec, options, shards, **evaluate_kwargs)


def _shippable(ctx, run):
    """The sweep context with only the run's own speech set (less to ship)."""
    import dataclasses

    return dataclasses.replace(ctx, speech_sets={run.data: ctx.speech_sets[run.data]}, out=Path("."))


def _died_row(run, ctx, deaths: int, exc: BaseException) -> dict:
    from .sweep_spec import ROW_SCHEMA, model_display_name

    why = (f"its worker died {deaths} times ({type(exc).__name__}); not retried further"
           if deaths else f"{type(exc).__name__}: {exc}")
    return {"schema": ROW_SCHEMA, "run_id": run.run_id, "status": "failed", "error": why, "traceback": None,
            "model": model_display_name(run.model), "model_spec": run.model, "dataset": run.data.display_name,
            "protocol": run.protocol, "variant": run.variant.name, "condition": run.variant.label,
            "group": run.variant.group, "target_sparsity": run.variant.target_sparsity, "plan": run.variant.plan_dict(),
            "baseline_run_id": None if run.is_baseline else run.baseline_run_id, "run_dir": f"runs/{run.run_id}",
            "sweep": ctx.spec.name, "worker": None}


def sharded_batches(executor: RayExecutor, model_spec: str, options, shards: int, **evaluate_kwargs) -> Callable:
    """A ``decode_batches(batches) -> rows per batch`` hook that decodes contiguous runs of
    ``evaluate``'s own batches on ``shards`` workers.

    Each worker evaluates its utterances with the same options; since a shard is a contiguous
    slice of the longest-first order cut at batch boundaries, the worker forms exactly those
    batches again. (Utterances longer than the window, found only once their audio is read,
    are batched within their shard.)
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")

    def run(batches: list[list]) -> list[list[dict]]:
        ray = _init(executor.address, executor.init_kwargs)
        actors = executor.actors(min(shards, max(1, len(batches))))
        n = len(actors)
        bounds = [round(k * len(batches) / n) for k in range(n + 1)]
        parts = [batches[bounds[k]:bounds[k + 1]] for k in range(n)]
        packed = executor._model_files(model_spec)
        futs = [a.evaluate_shard.remote(model_spec, packed, [u for b in part for u in b], options, evaluate_kwargs)
                for a, part in zip(actors, parts) if part]
        by_id: dict[str, dict] = {}
        for rows, worker in ray.get(futs):
            run.workers.append(worker)
            for r in rows:
                by_id[r["id"]] = r
        return [[by_id[u.id] for u in b] for b in batches]

    run.workers = []  # {host, pid} of the shards' workers, for the record
    return run
