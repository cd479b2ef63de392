"""Early stop of collapsed variants (a recorded decision), and the repetition stop of a loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from asrprune.early_stop import EarlyStop, EarlyStopOptions
from asrprune.stats import paired_bootstrap


def _rows(errors, words, prefix="u"):
    return [{"id": f"{prefix}{i}", "errors": e, "ref_words": w} for i, (e, w) in enumerate(zip(errors, words))]


def test_decision_is_the_paired_interval_on_the_utterances_done():
    rng = np.random.default_rng(0)
    words = rng.integers(5, 30, 100)
    base = _rows(rng.binomial(words, 0.1), words)
    collapsed = _rows(rng.binomial(words, 0.1) + 3 * words, words)  # +300 points
    stop = EarlyStop(base, EarlyStopOptions(min_utterances=10, check_every=5))
    assert stop.check(collapsed[:9], 100) is None  # fewer than the minimum
    d = stop.check(collapsed[:20], 100)
    a = np.array([r["errors"] for r in base[:20]], float)
    b = np.array([r["errors"] for r in collapsed[:20]], float)
    w = np.array(words[:20], float)
    assert d["n_scored"] == 20 and d["n_total"] == 100 and d["looks"] == 1
    assert d["delta"] == pytest.approx((b.sum() - a.sum()) / w.sum())
    assert d["ci"] == pytest.approx(list(paired_bootstrap(a, b, w, confidence=0.99, seed=0)))
    assert d["ci"][0] > 0.2 and d["p"] < 0.01 and d["threshold"] == 0.2
    # a healthy variant (a small real difference) is never stopped, at any look
    healthy = _rows(rng.binomial(words, 0.12), words)
    stop = EarlyStop(base, EarlyStopOptions(min_utterances=10, check_every=5))
    assert all(stop.check(healthy[:n], 100) is None for n in range(10, 100, 5))
    # all utterances done: nothing to save, no stop
    assert EarlyStop(base, EarlyStopOptions(min_utterances=10)).check(collapsed, 100) is None


def test_batch_order_is_a_seeded_permutation_and_options_are_checked():
    stop = EarlyStop([], EarlyStopOptions(seed=3))
    batches = [[i] for i in range(20)]
    order = stop.order(batches)
    assert sorted(order) == batches and order != batches and order == EarlyStop([], EarlyStopOptions(seed=3)).order(batches)
    for bad in ({"threshold": -0.1}, {"min_utterances": 0}, {"confidence": 1.0}):
        with pytest.raises(ValueError):
            EarlyStopOptions(**bad)
    assert EarlyStopOptions.from_obj(False) is None and EarlyStopOptions.from_obj(True) == EarlyStopOptions()
    with pytest.raises(ValueError, match="unknown"):
        EarlyStopOptions.from_obj({"treshold": 0.3})


def test_repetition_stop_ends_a_loop_and_nothing_else():
    from asrprune.decoding import _RepetitionStop

    proc = _RepetitionStop(3, eos_id=9)
    proc.set_begin_index(2)
    scores = torch.zeros(3, 10)
    ids = torch.tensor([[1, 2, 5, 6, 5, 6, 5, 6],     # "5 6" three times -> end
                        [1, 2, 4, 4, 4, 7, 4, 4],     # no threefold repeat at the end
                        [1, 2, 3, 3, 3, 3, 3, 3]])    # "3" six times -> end
    out = proc(ids, scores.clone())
    assert torch.isinf(out[0]).sum() == 9 and out[0, 9] == 0
    assert torch.equal(out[1], scores[1])
    assert out[2, 9] == 0 and torch.isinf(out[2, :9]).all()
    # the prompt does not count: a repeat inside it alone ends nothing
    proc.set_begin_index(6)
    assert torch.equal(proc(torch.tensor([[3, 3, 3, 3, 3, 3, 1, 2]]), torch.zeros(1, 10)), torch.zeros(1, 10))


@pytest.mark.integration
def test_collapsed_variant_stops_early_and_completes_on_rerun(tmp_path, shared_data):
    """tiny.en on 12 test-other utterances: layer norms at 10% collapse (the study's probe) and stop
    after the first look; decoder self-attention at 10% is healthy and runs to the end with the
    very hypotheses of a run without early stopping; a rerun without early stopping completes the
    collapsed run to the WER of an uninterrupted run; the report shows it as collapsed."""
    from asrprune.files import latest_rows, read_jsonl
    from asrprune.report import build_report
    from asrprune.sweep import SweepSpec, run_sweep
    from test_sweep import _manifest

    data = _manifest(shared_data, tmp_path / "eval.jsonl", "librispeech_test_other", 12)
    base = {"models": ["tiny.en"], "data": [str(data)], "decode": {"device": "cpu", "batch_size": 4, "max_new_tokens": 60},
            "plans": [{"name": "norms", "plan": "layer_norms=0.1"}, {"name": "dsa", "plan": "decoder.self_attn=0.1"}]}
    early = {"min_utterances": 4, "check_every": 4}

    def rows(out):
        return {r["variant"]: r for r in latest_rows(read_jsonl(out / "runs.jsonl")).values()}

    def hyps(out, row):
        return {r["id"]: r["hypothesis"] for r in read_jsonl(out / row["run_dir"] / "utterances.jsonl")}

    stopped, full = tmp_path / "stopped", tmp_path / "full"
    summary = run_sweep(SweepSpec.from_dict({**base, "early_stop": early}), stopped, progress=False)
    assert len(summary.collapsed) == 1 and summary.failed == []
    r = rows(stopped)
    c = r["norms"]["collapsed"]
    assert r["norms"]["status"] == "collapsed" and r["norms"]["summary"]["wer"] is None
    assert 4 <= c["n_scored"] < 12 and c["ci"][0] > 0.2 and c["threshold"] == 0.2 and c["n_total"] == 12
    assert len(read_jsonl(stopped / r["norms"]["run_dir"] / "utterances.jsonl")) == c["n_scored"]
    assert r["dsa"]["status"] == "ok" and r["dsa"]["summary"]["n_utterances"] == 12

    run_sweep(SweepSpec.from_dict({**base, "early_stop": False}), full, progress=False)
    f = rows(full)
    assert f["norms"]["status"] == "ok"
    assert hyps(stopped, r["dsa"]) == hyps(full, f["dsa"])
    assert r["dsa"]["summary"]["wer"] == f["dsa"]["summary"]["wer"]

    md = build_report(stopped).markdown.read_text()
    assert f"collapsed (stopped after {c['n_scored']} of 12 utterances)" in md and "> +20" in md

    # with early stopping on, the decision stands; with it off, the run completes
    again = run_sweep(SweepSpec.from_dict({**base, "early_stop": early}), stopped, progress=False)
    assert again.ran == [] and len(again.collapsed) == 1
    run_sweep(SweepSpec.from_dict({**base, "early_stop": False}), stopped, progress=False)
    done = rows(stopped)["norms"]
    assert done["status"] == "ok" and done["summary"]["n_utterances"] == 12
    assert done["summary"]["wer"] == pytest.approx(f["norms"]["summary"]["wer"])
    assert json.loads((stopped / done["run_dir"] / "summary.json").read_text())["throughput"]["resumed_rows"] == c["n_scored"]


def test_reproduce_counts_a_collapsed_run_apart_from_a_failed_one():
    """A collapsed run is a recorded decision: `reproduce` counts it apart and does not fail for it
    (it exited 1 for a study whose only non-ok runs were collapsed ones)."""
    from asrprune.cli_study import run_counts

    rows = [{"status": "ok"}, {"status": "collapsed"}, {"status": "collapsed"}, {"status": "failed"}, {}]
    assert run_counts(rows) == {"ok": 1, "collapsed": 2, "failed": 2}
    assert run_counts([{"status": "ok"}, {"status": "collapsed"}])["failed"] == 0
