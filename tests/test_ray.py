"""The Ray executor on one local Ray cluster (separate worker processes): the same rows as the
local executor, sharded evaluation, lost workers, a killed driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")

from asrprune.decoding import DecodeOptions  # noqa: E402
from asrprune.evaluation import evaluate  # noqa: E402
from asrprune.executor import FAULT_ENV, RayExecutor  # noqa: E402
from asrprune.files import latest_rows, read_jsonl  # noqa: E402
from asrprune.manifests import read_speech_set  # noqa: E402
from asrprune.models import load_model  # noqa: E402
from asrprune.sweep import SweepSpec, run_sweep  # noqa: E402
from conftest import REPO  # noqa: E402
from test_sweep import DECODE, _manifest  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data):
    d = tmp_path_factory.mktemp("ray_data")
    return {"eval": _manifest(shared_data, d / "eval.jsonl", "librispeech_test_other", 3),
            "eval8": _manifest(shared_data, d / "eval8.jsonl", "librispeech_test_other", 8)}


def _spec(tiny_dir, data, **kw) -> SweepSpec:
    return SweepSpec.from_dict({"models": [str(tiny_dir)], "data": [str(data["eval"])], "decode": DECODE,
                                "plans": [{"name": "dsa", "plan": "decoder.self_attn=0.5"},
                                          {"name": "mag", "plan": "all_linear=0.4@matrix"}], **kw})


def _utterance_rows(out, row):
    return sorted(read_jsonl(out / row["run_dir"] / "utterances.jsonl"), key=lambda r: r["id"])


def test_ray_sweep_writes_the_rows_of_the_local_executor(cluster, tiny_dir, data, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "ray"
    run_sweep(_spec(tiny_dir, data), local, progress=False)
    ex = RayExecutor(workers=2)
    summary = run_sweep(_spec(tiny_dir, data), remote, progress=False, executor=ex)
    assert summary.failed == [] and len(summary.ran) == 3
    a = latest_rows(read_jsonl(local / "runs.jsonl"))
    b = latest_rows(read_jsonl(remote / "runs.jsonl"))
    assert set(a) == set(b)
    for run_id in a:
        assert a[run_id]["summary"]["wer"] == b[run_id]["summary"]["wer"]
        assert a[run_id]["comparison"] == b[run_id]["comparison"] or a[run_id]["comparison"]["delta"] == b[run_id]["comparison"]["delta"]
        assert _utterance_rows(local, a[run_id]) == _utterance_rows(remote, b[run_id])
        assert b[run_id]["worker"]["pid"] != os.getpid() and a[run_id]["worker"]["pid"] == os.getpid()
        assert json.loads((remote / b[run_id]["run_dir"] / "summary.json").read_text())["wer"] == b[run_id]["summary"]["wer"]
    ex.shutdown()


def test_sharded_evaluation_equals_the_unsharded_one(cluster, tiny_dir, data, tmp_path):
    model, processor = load_model(tiny_dir)
    ss = read_speech_set(data["eval8"])
    options = DecodeOptions(**{**DECODE, "batch_size": 2})
    single = evaluate(model, processor, ss, options, out_dir=tmp_path / "single", progress=False)
    ex = RayExecutor(workers=2)
    runner = ex.batch_runner(str(tiny_dir), options, 2)
    sharded = evaluate(model, processor, ss, options, out_dir=tmp_path / "sharded", progress=False, decode_batches=runner)
    assert len({w["pid"] for w in runner.workers}) == 2 and os.getpid() not in {w["pid"] for w in runner.workers}
    assert sharded.wer == single.wer and sharded.wer_ci == single.wer_ci and sharded.cer == single.cer
    assert sharded.rows == single.rows
    assert read_jsonl(tmp_path / "sharded" / "utterances.jsonl") == read_jsonl(tmp_path / "single" / "utterances.jsonl")
    ex.shutdown()


def test_a_lost_worker_is_retried_and_one_that_always_dies_fails_once(cluster, tiny_dir, data, tmp_path):
    marks = tmp_path / "marks"
    ex = RayExecutor(workers=1, runtime_env={"env_vars": {FAULT_ENV: f"dsa:1:{marks}"}})
    out = tmp_path / "once"
    summary = run_sweep(_spec(tiny_dir, data), out, progress=False, executor=ex)
    assert summary.failed == [] and len(list(marks.glob("kill-*"))) == 1
    rows = read_jsonl(out / "runs.jsonl")
    assert [r["variant"] for r in rows].count("dsa") == 1 and all(r["status"] == "ok" for r in rows)
    ex.shutdown()

    marks2 = tmp_path / "marks2"
    ex = RayExecutor(workers=1, max_retries=1, runtime_env={"env_vars": {FAULT_ENV: f"dsa:always:{marks2}"}})
    out = tmp_path / "always"
    summary = run_sweep(_spec(tiny_dir, data), out, progress=False, executor=ex)
    rows = read_jsonl(out / "runs.jsonl")
    dsa = [r for r in rows if r["variant"] == "dsa"]
    assert len(dsa) == 1 and dsa[0]["status"] == "failed" and "died 2 times" in dsa[0]["error"]
    assert len(list(marks2.glob("kill-*"))) == 2 and len(summary.failed) == 1
    assert not (out / dsa[0]["run_dir"] / "summary.json").exists()  # nothing partial was written
    assert {r["variant"] for r in rows if r["status"] == "ok"} == {"baseline", "mag"}
    ex.shutdown()


def test_rerun_after_killing_the_driver_runs_exactly_the_unfinished_runs(cluster, tiny_dir, data, tmp_path):
    # Ten plans and a 50 ms poll, so that the kill lands mid-sweep even where runs this short finish
    # in a fraction of a second (with four plans and a 0.5 s poll every run had ended before it).
    n_plans = 10
    out = tmp_path / "killed"
    spec_path = tmp_path / "spec.yaml"
    spec = _spec(tiny_dir, data, plans=[{"name": f"d{i}", "plan": f"decoder.self_attn={0.05 * (i + 1):.2f}"} for i in range(n_plans)])
    spec_path.write_text(spec.to_yaml())
    code = ("import sys; from asrprune.sweep import SweepSpec, run_sweep; from asrprune.executor import RayExecutor; "
            f"run_sweep(SweepSpec.from_yaml({str(spec_path)!r}), {str(out)!r}, progress=False, "
            f"executor=RayExecutor(address={cluster!r}, workers=1))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        rows = read_jsonl(out / "runs.jsonl") if (out / "runs.jsonl").is_file() else []
        if len(rows) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = latest_rows(read_jsonl(out / "runs.jsonl"))
    assert 2 <= len(before) < n_plans + 1 and all(r["status"] == "ok" for r in before.values())
    ex = RayExecutor(workers=2)
    summary = run_sweep(spec, out, progress=False, executor=ex)
    assert set(summary.skipped) == set(before)
    assert len(summary.ran) == n_plans + 1 - len(before) and summary.failed == []
    assert len(read_jsonl(out / "runs.jsonl")) == n_plans + 1  # one row per run: none twice, none partial
    ex.shutdown()
