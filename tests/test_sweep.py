"""Sweeps: spec validation, run ids, atomic rows, resume after a kill, failed runs, encoder reuse,
the paper's plans and the reproduce study (on a tiny random Whisper saved with save_pretrained)."""

from __future__ import annotations

import json
import numpy as np
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from asrprune.decoding import DecodeOptions
from asrprune.files import append_jsonl as append_row
from asrprune.files import latest_rows
from asrprune.files import read_jsonl as read_rows
from asrprune.study import StudyGrid, StudySpec, paper_plans, reproduce, study_variants
from asrprune.sweep import DataSpec, SweepRunner, SweepSpec, SweepSpecError, expand_runs, run_sweep
from conftest import REPO, make_tiny_whisper

DECODE = {"max_new_tokens": 4, "device": "cpu", "batch_size": 4, "num_workers": 0}


# ----------------------------------------------------------------------------------------------
# fixtures: a tiny random Whisper directory and small manifests from the shared audio
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The tiny model's cost is per-op overhead; one thread avoids spinning on a shared 2-core CPU.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _manifest(shared_data: Path, out: Path, set_name: str, n: int) -> Path:
    """The n shortest utterances of a shared set, with absolute audio paths."""
    src = shared_data / set_name / "manifest.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    rows = sorted(rows, key=lambda r: (r["duration_s"], r["id"]))[:n]
    with open(out, "w") as fh:
        for r in rows:
            r["audio"] = str((src.parent / r["audio"]).resolve())
            fh.write(json.dumps(r) + "\n")
    return out


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory, shared_data) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("manifests")
    return {
        "eval": _manifest(shared_data, d / "eval3.jsonl", "librispeech_test_other", 3),
        "calib": _manifest(shared_data, d / "calib2.jsonl", "ljspeech", 2),
    }


def _spec(model: Path, data: Path, **kw) -> SweepSpec:
    base = dict(models=[str(model)], data=[str(data)], decode=DECODE)
    base.update(kw)
    return SweepSpec.from_dict(base)


def _hyps(run_dir: Path) -> dict[str, str]:
    rows = [json.loads(x) for x in (run_dir / "utterances.jsonl").read_text().splitlines() if x.strip()]
    return {r["id"]: r["hypothesis"] for r in rows}


# ----------------------------------------------------------------------------------------------
# spec, expansion, run ids
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, field",
    [
        ({"modells": ["x"]}, "modells"),
        ({"models": []}, "models"),
        ({"data": []}, "data"),
        ({"protocols": ["greedy"]}, "protocol"),
        ({"selectors": ["decoder_ffn"]}, "sparsities"),
        ({"selectors": ["decoder_ffn"], "sparsities": [50]}, "sparsit"),
        ({"decode": {"beam": 2}}, "decode"),
        ({"decode": {"protocol": "paper"}}, "protocols"),
        ({"encoder_cache": "gpu"}, "encoder_cache"),
        ({"plans": [{"name": "a", "plan": "decoder_ffn=0.3", "colour": 1}]}, "colour"),
        ({"plans": [{"name": "a", "plan": "decoder_ffn=1.5"}]}, r"plans\[0\] \(a\)"),
        ({"plans": [{"name": "baseline", "plan": "decoder_ffn=0.5"}]}, "baseline"),
        ({"limit": 0}, "limit"),
        ({"data": [{"path": "x.jsonl"}]}, "path"),
    ],
)
def test_invalid_specs_name_the_field(change, field):
    obj = {"models": ["tiny.en"], "data": ["x.jsonl"], "decode": {}}
    obj.update(change)
    with pytest.raises(SweepSpecError, match=field):
        SweepSpec.from_dict(obj)


def test_yaml_round_trip_and_relative_paths(tmp_path):
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "p.yaml").write_text("entries:\n  - {selector: decoder_ffn, sparsity: 0.3}\n")
    (tmp_path / "set.jsonl").write_text("")
    text = """
name: demo
models: [tiny.en]
data: [set.jsonl, {source: set.jsonl, include: "LJ002-*", name: lj}]
plans:
  - {name: from_file, file: plans/p.yaml, group: decoder_ffn, target_sparsity: 0.3}
  - {name: inline, plan: {entries: [{selector: all_linear, sparsity: 0.4}], mode: global}}
selectors: [decoder_self_attn]
sparsities: [0.1, 0.5]
protocols: [standard]
baseline_protocols: [standard, paper]
decode: {batch_size: 8}
limit: 5
"""
    (tmp_path / "s.yaml").write_text(text)
    spec = SweepSpec.from_yaml(tmp_path / "s.yaml")
    assert spec.data[0].source == str((tmp_path / "set.jsonl").resolve())
    assert spec.data[1].display_name == "lj" and spec.data[1].include == "LJ002-*"
    assert spec.plans[0].plan.entries[0].selector == "decoder_ffn"
    assert spec.plans[1].plan.mode == "global"
    assert [v.name for v in spec.variants()] == [
        "baseline", "from_file", "inline", "decoder_self_attn@0.1", "decoder_self_attn@0.5",
    ]
    again = SweepSpec.from_dict(yaml.safe_load(spec.to_yaml()))
    assert again == spec


def test_data_spec_names():
    assert DataSpec.parse("/d/librispeech_test_other/manifest.jsonl").display_name == "librispeech_test_other"
    lj = DataSpec.parse("/d/ljspeech/manifest.jsonl::LJ002-*")
    assert lj.include == "LJ002-*" and lj.display_name == "ljspeech_LJ002"
    assert DataSpec.parse("/tmp/eval3.jsonl").display_name == "eval3"


def test_expansion_order_and_stable_ids():
    spec = SweepSpec.from_dict({
        "models": ["tiny.en", "base"], "data": ["a/manifest.jsonl", "b/manifest.jsonl"],
        "selectors": ["decoder_self_attn", "late_encoder"], "sparsities": [0.3, 0.5],
        "plans": [{"name": "same_as_grid", "plan": "decoder_self_attn=0.3"}],
        "protocols": ["standard"], "baseline_protocols": ["standard", "paper"], "decode": DECODE,
    })
    keys = {d: f"key-{d.display_name}" for d in spec.data}
    runs = expand_runs(spec, keys)
    # per model x data: 2 baselines + 1 plan + 4 grid points - 1 duplicate of the plan
    assert len(runs) == 2 * 2 * (2 + 1 + 4 - 1)
    assert len({r.run_id for r in runs}) == len(runs)
    assert runs[0].is_baseline and runs[1].is_baseline and {runs[0].protocol, runs[1].protocol} == {"standard", "paper"}
    assert [r.model for r in runs[:6]] == ["tiny.en"] * 6
    # every pruned run points at the baseline of its model, data and protocol
    ids = {r.run_id for r in runs}
    assert all(r.baseline_run_id in ids for r in runs)
    assert expand_runs(spec, keys) == runs  # deterministic
    # batch size and audio workers cannot change a transcript: same ids; max_new_tokens can
    same = expand_runs(SweepSpec.from_dict({**spec.to_dict(), "decode": {**DECODE, "batch_size": 1, "num_workers": 3}}), keys)
    assert [r.run_id for r in same] == [r.run_id for r in runs]
    other = expand_runs(SweepSpec.from_dict({**spec.to_dict(), "decode": {**DECODE, "max_new_tokens": 9}}), keys)
    assert not ({r.run_id for r in other} & ids)
    changed_data = expand_runs(spec, {d: k + "x" for d, k in keys.items()})
    assert not ({r.run_id for r in changed_data} & ids)


# ----------------------------------------------------------------------------------------------
# runs.jsonl
# ----------------------------------------------------------------------------------------------


def test_append_row_survives_a_torn_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    append_row(path, {"run_id": "a", "status": "ok", "x": 1})
    with open(path, "a") as fh:
        fh.write('{"run_id": "b", "sta')  # a writer killed mid-line
    append_row(path, {"run_id": "c", "status": "failed"})
    append_row(path, {"run_id": "c", "status": "ok"})
    append_row(path, {"run_id": "a", "status": "failed"})  # an ok row is not superseded
    rows = read_rows(path)
    assert [r["run_id"] for r in rows] == ["a", "c", "c", "a"]
    latest = latest_rows(rows)
    assert latest["a"]["status"] == "ok" and latest["a"]["x"] == 1 and latest["c"]["status"] == "ok"
    assert path.read_text().endswith("\n")


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------


def test_sweep_records_failure_goes_on_skips_and_retries(tiny_dir, small_sets, tmp_path):
    spec = _spec(
        tiny_dir, small_sets["eval"],
        plans=[{"name": "bad", "plan": "encoder.layers[7]=0.5", "group": "probe"}],
        selectors=["decoder_self_attn"], sparsities=[0.5],
    )
    out = tmp_path / "sweep"
    s1 = run_sweep(spec, out, progress=False)
    assert (len(s1.ran), len(s1.failed)) == (2, 1)
    rows = latest_rows(read_rows(out / "runs.jsonl"))
    bad = next(r for r in rows.values() if r["variant"] == "bad")
    assert bad["status"] == "failed" and "SelectorError" in bad["error"] and "Traceback" in bad["traceback"]
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert {r["variant"] for r in ok} == {"baseline", "decoder_self_attn@0.5"}
    base = next(r for r in ok if r["variant"] == "baseline")
    pruned = next(r for r in ok if r["variant"] != "baseline")
    assert base["comparison"] is None and base["summary"]["n_utterances"] == 3
    cmp = pruned["comparison"]
    assert cmp["baseline_run_id"] == base["run_id"] and cmp["n"] == 3
    assert cmp["delta"] == pytest.approx(pruned["summary"]["wer"] - base["summary"]["wer"])
    # measured sparsity: half of the decoder self-attention weights, counted independently
    model = make_tiny_whisper(vocab_size=51864, max_source_positions=1500, max_target_positions=64)
    sa = [p for n, p in model.named_parameters() if ".decoder." in n and ".self_attn." in n and n.endswith("proj.weight")]
    lin = [p for n, p in model.named_parameters()
           if n.endswith("proj.weight") and "_attn" in n or n.endswith(("fc1.weight", "fc2.weight"))]
    expected = round(0.5 * sum(p.numel() for p in sa)) / sum(p.numel() for p in lin)
    assert pruned["sparsity_linear"] == pytest.approx(expected, abs=1e-9)
    assert base["sparsity_linear"] == 0.0
    assert (out / pruned["run_dir"] / "pruning.json").is_file()
    study = json.loads((out / "study.json").read_text())
    assert study["datasets"]["eval3"]["n_utterances"] == 3

    # a rerun redoes nothing; the failed run is only retried when asked
    s2 = run_sweep(spec, out, progress=False)
    assert (s2.ran, s2.failed, len(s2.skipped), len(s2.skipped_failed)) == ([], [], 2, 1)
    s3 = run_sweep(spec, out, progress=False, retry_failed=True)
    assert s3.failed == [bad["run_id"]] and s3.ran == []
    all_rows = read_rows(out / "runs.jsonl")
    assert len(all_rows) == 4 and sum(r["run_id"] == bad["run_id"] for r in all_rows) == 2


def test_weights_restored_exactly_between_runs(tiny_dir):
    from asrprune.config import PrunePlan
    from asrprune.models import model_fingerprint
    from asrprune.prune import prune_model

    runner = SweepRunner(progress=False)
    slot = runner.model(str(tiny_dir))
    before = {k: v.clone() for k, v in slot.model.state_dict().items()}
    prune_model(slot.model, PrunePlan.parse("all_linear=0.7,token_embeddings=0.5,biases=0.5"))
    assert model_fingerprint(slot.model) != slot.fingerprint
    again = runner.model(str(tiny_dir))
    assert again is slot
    assert model_fingerprint(slot.model) == slot.fingerprint
    for k, v in slot.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the tie between token embeddings and the output projection survives
    assert slot.model.proj_out.weight.data_ptr() == slot.model.model.decoder.embed_tokens.weight.data_ptr()


def test_encoder_reuse_identical_transcripts_and_fewer_encoder_calls(tiny_dir, small_sets, tmp_path):
    grid = dict(selectors=["decoder_self_attn", "decoder_ffn", "late_encoder"], sparsities=[0.5])
    outs = {}
    for mode in ("memory", "off"):
        spec = _spec(tiny_dir, small_sets["eval"], encoder_cache=mode, **grid)
        runner = SweepRunner(progress=False)
        run_sweep(spec, tmp_path / mode, progress=False, runner=runner)
        rows = {r["variant"]: r for r in latest_rows(read_rows(tmp_path / mode / "runs.jsonl")).values()}
        assert all(r["status"] == "ok" for r in rows.values())
        outs[mode] = (rows, runner.encoder_windows)
    reuse, plain = outs["memory"][0], outs["off"][0]
    for variant, row in reuse.items():
        assert row["run_id"] == plain[variant]["run_id"]
        assert _hyps(tmp_path / "memory" / row["run_dir"]) == _hyps(tmp_path / "off" / row["run_dir"])
        assert row["summary"]["wer"] == plain[variant]["summary"]["wer"]
    # encoder windows (30 s inputs) counted by a forward hook on the encoder (3 utterances per run)
    assert reuse["baseline"]["encoder_windows"] == 3
    assert reuse["decoder_self_attn@0.5"]["encoder_windows"] == 0 and reuse["decoder_ffn@0.5"]["encoder_windows"] == 0
    assert reuse["decoder_self_attn@0.5"]["encoder_calls"] == 0
    assert reuse["decoder_self_attn@0.5"]["encoder_cache_hits"] == 3
    assert reuse["late_encoder@0.5"]["encoder_windows"] == 3 and reuse["late_encoder@0.5"]["encoder_touched"]
    assert all(r["encoder_windows"] == 3 for r in plain.values())
    assert (outs["memory"][1], outs["off"][1]) == (6, 12)


def test_disk_encoder_cache_is_reused_by_a_new_runner(tiny_dir, small_sets, tmp_path):
    spec = _spec(tiny_dir, small_sets["eval"], encoder_cache="disk", selectors=["decoder_ffn"], sparsities=[0.3])
    run_sweep(spec, tmp_path / "a", progress=False)
    assert len(list((tmp_path / "a" / "encoder_cache").rglob("*.safetensors"))) == 3  # no pickles
    assert not list((tmp_path / "a" / "encoder_cache").rglob("*.pt"))
    spec2 = _spec(tiny_dir, small_sets["eval"], encoder_cache="disk", selectors=["decoder_ffn"], sparsities=[0.5])
    runner = SweepRunner(progress=False)
    run_sweep(spec2, tmp_path / "a", progress=False, runner=runner)
    assert runner.encoder_calls == 0 and runner.encoder_windows == 0  # only the new decoder-only run ran, from disk


def test_killed_sweep_resumes_without_redoing_or_losing_runs(tiny_dir, small_sets, tmp_path):
    spec = {
        "name": "killme", "models": [str(tiny_dir)], "data": [str(small_sets["eval"])],
        "selectors": ["decoder_self_attn", "decoder_ffn", "cross_attn"], "sparsities": [0.3, 0.5],
        "decode": DECODE,
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "asrprune", "sweep", str(spec_path), "--out", str(out), "--no-progress"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    runs_path = out / "runs.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if runs_path.is_file() and runs_path.read_text().count("\n") >= 1:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = read_rows(runs_path)
    assert 1 <= len(before) < 7, "the sweep must be killed after its first row and before its last"
    mtimes = {r["run_id"]: (out / r["run_dir"] / "summary.json").stat().st_mtime_ns for r in before}

    from asrprune.cli import main

    assert main(["sweep", str(spec_path), "--out", str(out), "--no-progress"]) == 0
    after = read_rows(runs_path)
    ids = [r["run_id"] for r in after]
    assert len(ids) == len(set(ids)) == 7  # none redone, none lost
    assert all(r["status"] == "ok" for r in after)
    assert after[: len(before)] == before  # finished rows untouched
    for rid, mtime in mtimes.items():
        assert (out / "runs" / rid / "summary.json").stat().st_mtime_ns == mtime
    for r in after:
        assert _hyps(out / r["run_dir"]).keys() == {json.loads(x)["id"] for x in small_sets["eval"].read_text().splitlines()}


# ----------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_layers", [2, 4, 6, 12])
def test_paper_plans_apply_without_overlap(n_layers):
    from asrprune.prune import prune_model

    plans = dict((v.name, v) for v, _ in paper_plans(n_layers, n_layers))
    code = plans["paper_code"].plan.to_text()
    if n_layers == 12:  # the authors' hard-coded split 0-3 / 4-7 / 8-11
        assert "decoder.layers[0:4].ffn=0.25" in code and "decoder.layers[4:8].ffn=0.45" in code
        assert "decoder.layers[8:12].ffn=0.3" in code
        assert "encoder.layers[0:8].ffn=0.4" in plans["paper_digest"].plan.to_text()
    if n_layers == 4:
        assert "decoder.layers[0:2].ffn=0.25" in code and "decoder.layers[2:3].ffn=0.45" in code
    if n_layers > 4:
        return  # applying is checked on the small models
    model = make_tiny_whisper(encoder_layers=n_layers, decoder_layers=n_layers)
    for v in plans.values():
        res = prune_model(model, v.plan)
        for e in res.entries:
            assert e.measured_sparsity == pytest.approx(e.requested_sparsity, abs=0.02), (v.name, e.selector)


def test_quick_grid_variants():
    grid = StudyGrid.preset("quick")
    names = [v.name for v in study_variants(grid, 4, 4)]
    assert names[:7] == [
        "decoder_self_attn@0.3", "decoder_self_attn@0.5", "late_encoder@0.5",
        "decoder_ffn@0.3", "decoder_ffn@0.5", "cross_attn@0.3", "cross_attn@0.5",
    ]
    assert {"probe_biases@0.1", "probe_early_decoder@0.5", "global@0.4", "uniform@0.4",
            "paper_digest", "paper_code"} <= set(names)
    shrunk = StudyGrid.preset("full", [0.5, 0.2])
    assert shrunk.components == (0.2, 0.5) == shrunk.late_encoder
    with pytest.raises(SweepSpecError, match="preset"):
        StudyGrid.preset("huge")


def test_main_grid_is_the_papers_headline_configurations():
    grid = StudyGrid.preset("main")
    names = [v.name for v in study_variants(grid, 6, 6)]
    assert names == ["decoder_self_attn@0.5", "late_encoder@0.5", "decoder_ffn@0.3", "global@0.4",
                     "uniform@0.4", "paper_digest", "paper_code"]
    assert grid.calibration_limit is None  # every calibration utterance given
    # --sparsities replaces the per-group levels: every swept group at those levels
    shrunk = StudyGrid.preset("main", [0.3])
    assert [v.name for v in study_variants(shrunk, 6, 6)][:4] == [
        "decoder_self_attn@0.3", "late_encoder@0.3", "decoder_ffn@0.3", "cross_attn@0.3"]


def test_reproduce_cli_ablation_sparsities():
    from asrprune.cli import build_parser
    from asrprune.cli_study import _study_spec
    from asrprune.sensitivity import SensitivityOptions

    args = build_parser().parse_args(["reproduce", "base", "data.jsonl", "--calibration", "c.jsonl", "--out", "o",
                                      "--ablation-sparsities", "0.5"])
    opts = _study_spec(args).sensitivity
    assert opts.ablation_sparsities == (0.5,)
    assert opts.prediction_sparsities == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # still the whole curve
    default = build_parser().parse_args(["reproduce", "base", "data.jsonl", "--calibration", "c.jsonl", "--out", "o"])
    assert _study_spec(default).sensitivity == SensitivityOptions()  # its defaults (0.3 and 0.5)


def test_reproduce_max_new_tokens_reaches_every_stage():
    """One DecodeOptions, built once from the flags, is what the sweep and the sensitivity stage get."""
    from asrprune.cli import build_parser
    from asrprune.cli_study import _study_spec

    args = build_parser().parse_args(["reproduce", "base", "data.jsonl", "--calibration", "c.jsonl", "--out", "o",
                                      "--max-new-tokens", "200"])
    spec = _study_spec(args)
    assert spec.decode.max_new_tokens == 200
    assert spec.sweep_spec().decode["max_new_tokens"] == 200
    default = _study_spec(build_parser().parse_args(["reproduce", "base", "d.jsonl", "--calibration", "c", "--out", "o"]))
    assert default.decode == DecodeOptions()  # the defaults live in DecodeOptions alone


def test_reproduce_refuses_overlapping_calibration(tiny_dir, small_sets, tmp_path):
    from asrprune.overlap import OverlapError

    with pytest.raises(OverlapError):
        reproduce(StudySpec(str(tiny_dir), (str(small_sets["eval"]),), str(small_sets["eval"]),
                            decode=DecodeOptions(**DECODE)), tmp_path / "s", progress=False)
    assert not (tmp_path / "s" / "runs.jsonl").exists()


def test_reproduce_study_on_tiny_random_model(tiny_dir, small_sets, tmp_path):
    from asrprune.sensitivity import SensitivityOptions

    out = tmp_path / "study"
    opts = SensitivityOptions(labels="greedy", ablation_sparsities=(0.5,), prediction_sparsities=(0.5,),
                              groups=("decoder_self_attn",), n_bootstrap=20)
    spec = StudySpec(str(tiny_dir), (str(small_sets["eval"]),), str(small_sets["calib"]), limit=2, sparsities=(0.5,),
                     decode=DecodeOptions(**DECODE), sensitivity=opts)
    res = reproduce(spec, out, progress=False)
    assert all(s["status"] == "ok" for s in res.stages.values()), res.stages
    rows = latest_rows(read_rows(out / "runs.jsonl"))
    by = {(r["variant"], r["protocol"]): r for r in rows.values()}
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("error") for r in rows.values()]
    assert ("baseline", "standard") in by and ("baseline", "paper") in by
    assert {v for v, p in by if p == "paper"} == {"baseline"}
    for name in ("decoder_self_attn@0.5", "late_encoder@0.5", "global@0.4", "paper_digest", "allocated@0.4"):
        assert (name, "standard") in by
        assert by[(name, "standard")]["comparison"]["n"] == 2
    assert by[("allocated@0.4", "standard")]["sparsity_linear"] == pytest.approx(0.4, abs=0.005)
    assert by[("global@0.4", "standard")]["sparsity_linear"] == pytest.approx(0.4, abs=1e-3)
    study = json.loads((out / "study.json").read_text())
    assert study["calibration"]["n_utterances"] == 2 and study["wall_s"] > 0
    assert set(study["paper_plans"]) == {"paper_digest", "paper_code"}
    assert (out / "plans" / "allocated_40.yaml").is_file() and (out / "plans" / "paper_code.yaml").is_file()
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    # the whole 40% plans on the calibration loss, against the allocator's additive prediction
    check = json.loads((out / "plans" / "plan_check.json").read_text())
    assert set(check["plans"]) == {"global@0.4", "uniform@0.4", "allocated@0.4"}
    assert check["n_utterances"] == 2 and len(check["calibration_ids"]) == 2
    alloc_info = json.loads((out / "plans" / "allocated_40.json").read_text())
    assert check["plans"]["allocated@0.4"]["predicted_damage"] == pytest.approx(alloc_info["predicted_damage"])
    for row in check["plans"].values():
        assert row["sparsity_linear"] == pytest.approx(0.4, abs=0.005) and np.isfinite(row["loss_delta"])
    assert "Whole plans on the calibration loss" in (out / "report.md").read_text()
    check_mtime = (out / "plans" / "plan_check.json").stat().st_mtime_ns
    # a rerun finds everything done
    n = len(read_rows(out / "runs.jsonl"))
    again = reproduce(spec, out, progress=False, report=False)
    assert len(read_rows(out / "runs.jsonl")) == n and all(not s.ran for s in again.sweeps)
    assert (out / "plans" / "plan_check.json").stat().st_mtime_ns == check_mtime  # not recomputed


# ----------------------------------------------------------------------------------------------
# real tiny.en
# ----------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_tiny_en_decoder_only_variant_reuses_encoder_with_identical_transcripts(small_sets, tmp_path):
    from asrprune.config import PrunePlan
    from asrprune.decoding import DecodeOptions
    from asrprune.evaluation import evaluate
    from asrprune.models import load_model
    from asrprune.prune import prune_model

    spec = SweepSpec.from_dict({
        "models": ["tiny.en"], "data": [str(small_sets["eval"])],
        "selectors": ["decoder_self_attn"], "sparsities": [0.5], "decode": {"device": "cpu", "batch_size": 4},
    })
    runner = SweepRunner(progress=False)
    run_sweep(spec, tmp_path / "s", progress=False, runner=runner)
    rows = {r["variant"]: r for r in latest_rows(read_rows(tmp_path / "s" / "runs.jsonl")).values()}
    pruned = rows["decoder_self_attn@0.5"]
    assert pruned["status"] == "ok" and pruned["encoder_calls"] == 0 and pruned["encoder_cache_hits"] == 3
    # independent recomputation: a freshly loaded tiny.en, pruned, decoded without any cache
    model, processor = load_model("tiny.en")
    prune_model(model, PrunePlan.parse("decoder_self_attn=0.5"))
    from asrprune.manifests import read_speech_set

    res = evaluate(model, processor, read_speech_set(small_sets["eval"]),
                   DecodeOptions(device="cpu", batch_size=1), progress=False)
    assert {r["id"]: r["hypothesis"] for r in res.rows} == _hyps(tmp_path / "s" / pruned["run_dir"])
    assert pruned["summary"]["wer"] == pytest.approx(res.wer)


@pytest.mark.parametrize("flags", [["--sparsities", "50"], ["--sparsities", "0.3,x"], ["--protocols", "greedy"]])
def test_reproduce_cli_rejects_bad_flags(flags, tmp_path, capsys):
    from asrprune.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "tiny.en", "data.jsonl", "--calibration", "c.jsonl", "--out", str(tmp_path), *flags])
    assert exc.value.code == 2 and flags[0] in capsys.readouterr().err


def test_sweep_cli_names_a_bad_spec(tmp_path, capsys):
    from asrprune.cli import main

    (tmp_path / "s.yaml").write_text("models: [tiny.en]\ndata: [x.jsonl]\nsparsity: [0.5]\n")
    assert main(["sweep", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "s.yaml" in err and "'sparsity'" in err


# ----------------------------------------------------------------------------------------------
# calibrated plans (wanda, sparsegpt) in a sweep
# ----------------------------------------------------------------------------------------------


def _calibrated_spec(tiny_dir, small_sets, calib, **kw) -> SweepSpec:
    return _spec(tiny_dir, small_sets["eval"], calibration={"source": str(calib)},
                 plans=[{"name": "sgpt40", "plan": {"entries": [{"selector": "all_linear", "sparsity": 0.4}],
                                                    "score": "sparsegpt"}},
                        {"name": "mag40", "plan": "all_linear=0.4@matrix"}], **kw)


def test_sweep_needs_calibration_for_a_calibrated_plan(tiny_dir, small_sets):
    with pytest.raises(SweepSpecError, match="needs calibration data"):
        _spec(tiny_dir, small_sets["eval"], plans=[{"name": "w", "plan": {
            "entries": [{"selector": "all_linear", "sparsity": 0.4}], "score": "wanda"}}])
    with pytest.raises(SweepSpecError, match="calibration_options: unknown"):
        _calibrated_spec(tiny_dir, small_sets, small_sets["calib"], calibration_options={"dampening": 0.1})


def test_calibrated_run_ids_cover_the_calibration_set_and_options(tiny_dir, small_sets, tmp_path):
    other = tmp_path / "calib1.jsonl"
    other.write_text(small_sets["calib"].read_text().splitlines()[0] + "\n")
    spec = _calibrated_spec(tiny_dir, small_sets, small_sets["calib"])
    keys = {d: "k" for d in spec.data}
    ids = {r.variant.name: r.run_id for r in expand_runs(spec, keys, "fp1")}
    ids2 = {r.variant.name: r.run_id for r in expand_runs(spec, keys, "fp2")}
    damp = _calibrated_spec(tiny_dir, small_sets, small_sets["calib"], calibration_options={"damp": 0.05})
    ids3 = {r.variant.name: r.run_id for r in expand_runs(damp, keys, "fp1")}
    assert ids["sgpt40"] != ids2["sgpt40"] != ids3["sgpt40"] and ids["sgpt40"] != ids3["sgpt40"]
    # magnitude and baseline ids do not depend on the calibration set (old ids stay valid)
    plain = _spec(tiny_dir, small_sets["eval"], plans=[{"name": "mag40", "plan": "all_linear=0.4@matrix"}])
    plain_ids = {r.variant.name: r.run_id for r in expand_runs(plain, keys)}
    assert ids["mag40"] == ids2["mag40"] == ids3["mag40"] == plain_ids["mag40"]
    assert ids["baseline"] == plain_ids["baseline"]
    assert "calibration" not in plain.to_dict()


def test_sweep_prunes_with_the_calibration_set_and_refuses_overlap(tiny_dir, small_sets, tmp_path):
    spec = _calibrated_spec(tiny_dir, small_sets, small_sets["calib"])
    out = tmp_path / "sw"
    summary = run_sweep(spec, out, progress=False)
    assert summary.failed == [] and summary.total == 3
    rows = latest_rows(read_rows(out / "runs.jsonl"))
    row = next(r for r in rows.values() if r["variant"] == "sgpt40")
    assert abs(row["sparsity_linear"] - 0.4) < 1e-3
    pruning = json.loads((out / row["run_dir"] / "pruning.json").read_text())
    ids = [json.loads(x)["id"] for x in small_sets["calib"].read_text().splitlines()]
    assert pruning["calibration"]["ids"] == ids
    assert [u["id"] for u in pruning["calibration"]["data"]["utterances"]] == ids
    assert row["pruning"]["calibration"]["method"] == "sparsegpt"
    # the same sweep from YAML round-trips, and finds everything done
    again = SweepSpec.from_dict(yaml.safe_load(spec.to_yaml()))
    assert run_sweep(again, out, progress=False).skipped == summary.ran
    # evaluation overlapping the calibration set is refused before anything runs
    bad = _calibrated_spec(tiny_dir, {**small_sets, "eval": small_sets["calib"]}, small_sets["calib"])
    from asrprune.overlap import OverlapError
    with pytest.raises(OverlapError, match="allow-overlap"):
        run_sweep(bad, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad" / "runs.jsonl").exists()


def test_reproduce_methods_preset_on_tiny_random_model(tiny_dir, small_sets, tmp_path):
    """Every method row: fixed plans, OWL, the authors' rule, the SparseGPT sensitivity and the
    measured allocation, each at the level, and 2:4; compared with dense and with global."""
    from asrprune.sensitivity import SensitivityOptions

    out = tmp_path / "methods"
    opts = SensitivityOptions(labels="greedy", ablation_sparsities=(0.5,), prediction_sparsities=(0.5,),
                              groups=(), n_bootstrap=20)
    spec = StudySpec(str(tiny_dir), (str(small_sets["eval"]),), str(small_sets["calib"]), limit=2, preset="methods",
                     sparsities=(0.5,), decode=DecodeOptions(**DECODE), sensitivity=opts, measured_budget=2,
                     baseline_protocols=("standard",))
    res = reproduce(spec, out, progress=False)
    assert all(s["status"] == "ok" for s in res.stages.values()), res.stages
    rows = {r["variant"]: r for r in latest_rows(read_rows(out / "runs.jsonl")).values()}
    assert all(r["status"] == "ok" for r in rows.values()), {k: r.get("error") for k, r in rows.items()}
    expected = {"baseline", "global@0.5", "uniform@0.5", "authors@0.5", "wanda@0.5", "wanda_owl@0.5", "sparsegpt@0.5",
                "sparsegpt_measured@0.5", "uniform@2of4", "wanda@2of4", "sparsegpt@2of4",
                "global@0.4", "uniform@0.4", "allocated@0.4"}
    assert "paper_digest" not in rows  # the method comparison alone
    assert expected <= set(rows), expected - set(rows)
    for name in ("global@0.5", "uniform@0.5", "authors@0.5", "wanda@0.5", "wanda_owl@0.5", "sparsegpt@0.5",
                 "sparsegpt_measured@0.5", "uniform@2of4", "wanda@2of4", "sparsegpt@2of4"):
        assert rows[name]["sparsity_linear"] == pytest.approx(0.5, abs=2e-3), name
    assert rows["sparsegpt_measured@0.5"]["pruning"]["score"] == "sparsegpt"
    assert rows["wanda_owl@0.5"]["pruning"]["calibration"]["method"] == "wanda"
    measured = json.loads((out / "plans" / "sparsegpt_measured_50.json").read_text())
    assert measured["info"]["checks"] == 2
    assert json.loads((out / "sensitivity_sparsegpt" / "sensitivity.json").read_text())["method"] == "sparsegpt"
    report = (out / "report.md").read_text()
    assert "Methods" in report and "vs global magnitude" in report
    assert (out / "report" / "wer_vs_sparsity_methods.png").is_file()
