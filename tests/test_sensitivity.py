"""Sensitivity diagnostics: known values against independent computations, resume, guards."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asrprune import calibration as calib
from asrprune import damage
from asrprune import sensitivity as sens
from asrprune.calibration import IGNORE_INDEX, CalibrationExample, LabelSpec, teacher_forcing, whisper_text_form
from asrprune.damage import predict_loss_change
from asrprune.sensitivity import (
    GradientStats,
    ResumeMismatchError,
    SensitivityOptions,
    accumulate_gradients,
    aggregate,
)
from asrprune.stats import spearman_with_ci
from conftest import make_tiny_whisper

L = 6  # decoder length of the synthetic examples


def make_examples(n: int = 4, seed: int = 0, length: int = L) -> list[CalibrationExample]:
    """Random features and label sequences for the tiny model (2 prompt targets ignored)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prefix = [85, 90, 91]
        text = torch.randint(1, 80, (length - len(prefix),), generator=g).tolist()
        inputs, labels = teacher_forcing(prefix, text, eot=98)
        out.append(CalibrationExample(
            id=f"u{i}",
            input_features=torch.randn(1, 80, 60, generator=g),
            decoder_input_ids=torch.tensor([inputs]),
            labels=torch.tensor([labels]),
        ))
    return out


def per_example_grads(model, examples):
    """Per-utterance gradients with torch.func (functional_call + vmap(grad)), independent of
    the library's loss and accumulator code."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    feats = torch.cat([e.input_features for e in examples])  # (B, 80, 60)
    dec = torch.cat([e.decoder_input_ids for e in examples])  # (B, L)
    lab = torch.cat([e.labels for e in examples])  # (B, L)

    def loss_fn(p, f, d, lb):
        out = functional_call(model, p, (), {"input_features": f[None], "decoder_input_ids": d[None], "use_cache": False})
        logp = torch.log_softmax(out.logits[0], dim=-1)  # (L, V)
        keep = lb != IGNORE_INDEX
        nll = -logp.gather(1, lb.clamp(min=0)[:, None])[:, 0]
        return (nll * keep).sum()  # the sequence NLL (the library's default reduction "sum")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vmap(grad(loss_fn), in_dims=(None, 0, 0, 0))(params, feats, dec, lab)  # name -> (B, *S)


# ----------------------------------------------------------------------------------------------
# text form and teacher forcing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("HE SAID THAT I'M GOING AND I WILL", " He said that I'm going and I will"),
        ("in being comparatively modern.", " In being comparatively modern."),
        ("Printing, in the only sense", " Printing, in the only sense"),
        ("  okay   so  ", " Okay so"),
        ("", ""),
        ("42 IS IT", " 42 is it"),
    ],
)
def test_whisper_text_form(text, expected):
    assert whisper_text_form(text) == expected


def test_teacher_forcing_masks_prompt_targets():
    inputs, labels = teacher_forcing([50257, 50362], [10, 11, 12], eot=50256)
    assert inputs == [50257, 50362, 10, 11, 12]
    assert labels == [IGNORE_INDEX, 10, 11, 12, 50256]
    inputs, labels = teacher_forcing([1, 2, 3, 4], [7], eot=9)
    assert inputs == [1, 2, 3, 4, 7] and labels == [IGNORE_INDEX] * 3 + [7, 9]
    inputs, labels = teacher_forcing([1, 2], [5, 6, 7, 8], eot=9, max_length=4)
    assert inputs == [1, 2, 5, 6] and labels == [IGNORE_INDEX, 5, 6, 9]


def test_loss_is_nll_over_text_and_eot_targets():
    model = make_tiny_whisper()
    ex = make_examples(1)[0]
    with torch.no_grad():
        logits = model(input_features=ex.input_features, decoder_input_ids=ex.decoder_input_ids).logits[0]
        logp = torch.log_softmax(logits, -1)
        targets = ex.labels[0].tolist()
        nll = [-float(logp[i, t]) for i, t in enumerate(targets) if t != IGNORE_INDEX]
        got_sum = float(calib.teacher_forced_loss(model, ex))
        got_mean = float(calib.teacher_forced_loss(model, ex, reduction="mean"))
    assert len(nll) == L - 2 == ex.n_targets
    assert got_sum == pytest.approx(sum(nll), rel=1e-5)
    assert got_mean == pytest.approx(sum(nll) / len(nll), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# per-parameter diagnostics against per-example gradients
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grads_and_stats():
    model = make_tiny_whisper()
    examples = make_examples(4)
    per = per_example_grads(model, examples)
    stats = accumulate_gradients(model, examples, progress=False)
    return model, examples, per, stats


def test_fisher_equals_mean_squared_per_example_gradients(grads_and_stats):
    model, _, per, stats = grads_and_stats
    fisher = stats.fisher()
    assert set(fisher) == set(per)
    for name, g in per.items():
        expected = (g.double() ** 2).mean(0)
        torch.testing.assert_close(fisher[name].double(), expected, rtol=1e-4, atol=1e-9, msg=name)
    # ... and is not the square of the batch-mean gradient (the mistake it must not make)
    name = "model.decoder.layers.0.fc1.weight"
    assert not torch.allclose(fisher[name].double(), per[name].double().mean(0) ** 2, rtol=1e-2)


def test_gradient_taylor_obd_equal_hand_computations(grads_and_stats):
    model, _, per, stats = grads_and_stats
    weights = dict(model.named_parameters())
    diags = stats.diagnostics(weights)
    for name, g in per.items():
        g = g.double()  # (B, *S)
        w = weights[name].detach().double()
        torch.testing.assert_close(diags["gradient"][name].double(), g.abs().mean(0), rtol=1e-4, atol=1e-9)
        # taylor: per-utterance |w * g_i| averaged over utterances
        torch.testing.assert_close(diags["taylor"][name].double(), (w * g).abs().mean(0), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(diags["obd"][name].double(), 0.5 * (g**2).mean(0) * w**2, rtol=1e-4, atol=1e-12)
        # the signed mean cancels: compare on the gradients' own scale (fp32 summation noise)
        torch.testing.assert_close(stats.mean_grad()[name].double(), g.mean(0), rtol=1e-4, atol=1e-5 * float(g.abs().max()))
    assert stats.n == 4 and stats.ids == ["u0", "u1", "u2", "u3"]
    # frozen parameters (Whisper's encoder positions) are frozen again afterwards
    assert model.model.encoder.embed_positions.weight.requires_grad is False
    assert all(p.grad is None for p in model.parameters())


def test_minmax_gradient_across_matrices(grads_and_stats):
    model, _, per, stats = grads_and_stats
    diags = stats.diagnostics(dict(model.named_parameters()))
    numels = {n: t.numel() for n, t in diags["gradient"].items()}
    sums = {"gradient": {n: float(t.double().sum()) for n, t in diags["gradient"].items()}}
    agg = aggregate(sums, numels, {n: [n] for n in numels})
    means = {n: float(per[n].double().abs().mean(0).mean()) for n in numels}
    lo, hi = min(means.values()), max(means.values())
    for n in numels:
        assert agg[n]["gradient"]["mean"] == pytest.approx(means[n], rel=1e-4)
        assert agg[n]["gradient"]["minmax"] == pytest.approx((means[n] - lo) / (hi - lo), rel=1e-3, abs=1e-6)


def test_aggregate_hand_case():
    sums = {"fisher": {"a": 6.0, "b": 2.0, "c": 0.0}}
    numels = {"a": 3, "b": 1, "c": 4}
    agg = aggregate(sums, numels, {"x": ["a", "b"], "y": ["c"], "z": ["a"]})
    assert agg["x"]["fisher"] == {"sum": 8.0, "mean": 2.0, "minmax": 1.0}
    assert agg["z"]["fisher"]["mean"] == 2.0 and agg["z"]["fisher"]["minmax"] == 1.0
    assert agg["y"]["fisher"] == {"sum": 0.0, "mean": 0.0, "minmax": 0.0}


# ----------------------------------------------------------------------------------------------
# predicted loss change
# ----------------------------------------------------------------------------------------------


def test_predict_loss_change_hand_case():
    w = {"a": torch.tensor([[1.0, -2.0], [0.5, 3.0]]), "b": torch.tensor([4.0, -1.0])}
    gbar = {"a": torch.tensor([[0.1, 0.2], [-0.4, 0.0]]), "b": torch.tensor([1.0, 2.0])}
    fisher = {"a": torch.tensor([[2.0, 1.0], [4.0, 1.0]]), "b": torch.tensor([0.5, 3.0])}
    keep = {"a": torch.tensor([[False, True], [False, True]]), "b": torch.tensor([True, False])}
    got = predict_loss_change(w, gbar, fisher, keep)
    # removed: a[0,0] (w=1, g=.1, F=2), a[1,0] (w=.5, g=-.4, F=4), b[1] (w=-1, g=2, F=3)
    first = -(0.1 * 1.0) - (-0.4 * 0.5) - (2.0 * -1.0)  # = -0.1 + 0.2 + 2.0
    second = 0.5 * (2.0 * 1.0 + 4.0 * 0.25 + 3.0 * 1.0)
    assert got["first_order"] == pytest.approx(first)
    assert got["second_order"] == pytest.approx(second)
    assert got["total"] == pytest.approx(first + second)
    assert got["n_removed"] == 3


def test_prediction_matches_quadratic_loss_exactly():
    """With a quadratic loss and its (diagonal) Hessian in place of the Fisher, the
    first + second-order prediction equals the exact loss change of zeroing the weights."""
    torch.manual_seed(0)
    w = torch.randn(5)
    xs = torch.eye(5)[torch.tensor([0, 1, 2, 3, 4, 0, 1])]
    ys = torch.randn(7)

    def loss(v):
        return (0.5 * (xs @ v - ys) ** 2).mean()

    gs = torch.stack([torch.autograd.functional.jacobian(lambda v: 0.5 * (xs[i] @ v - ys[i]) ** 2, w) for i in range(7)])
    gbar = gs.mean(0)
    keep = torch.tensor([True, False, True, False, True])
    hess = torch.autograd.functional.hessian(loss, w).diagonal()
    pred = predict_loss_change({"w": w}, {"w": gbar}, {"w": hess}, {"w": keep})
    exact = float(loss(w * keep) - loss(w))
    assert pred["total"] == pytest.approx(exact, rel=1e-5)


def test_predict_loss_curve_equals_masks_including_ties():
    model = make_tiny_whisper()
    with torch.no_grad():  # ties across the two tensors of a unit, and zeros
        p = dict(model.named_parameters())
        p["model.decoder.layers.0.fc1.weight"][:4] = 0.5
        p["model.decoder.layers.0.fc2.weight"][:2] = -0.5
        p["model.decoder.layers.0.fc2.weight"][2, :5] = 0.0
    g = torch.Generator().manual_seed(5)
    weights = {n: t.detach() for n, t in p.items()}
    gbar = {n: torch.randn(t.shape, generator=g) for n, t in p.items()}
    fisher = {n: torch.rand(t.shape, generator=g) for n, t in p.items()}
    sps = (0.0, 0.1, 0.37, 0.5, 0.9, 1.0)
    for unit in sens.analysis_units(model):
        curve = damage.predict_loss_curve(weights, gbar, fisher, unit.params, sps)
        for sp in sps:
            ref = predict_loss_change(weights, gbar, fisher, damage.magnitude_keep_masks(model, unit.params, sp))
            got = curve[f"{sp:g}"]
            assert got["n_removed"] == ref["n_removed"], (unit.id, sp)
            assert got["first_order"] == pytest.approx(ref["first_order"], rel=1e-9, abs=1e-9), (unit.id, sp)
            assert got["second_order"] == pytest.approx(ref["second_order"], rel=1e-9, abs=1e-9), (unit.id, sp)


# ----------------------------------------------------------------------------------------------
# resume
# ----------------------------------------------------------------------------------------------


class _Interrupting(list):
    """A list that raises KeyboardInterrupt once when item ``at`` is first read."""

    def __init__(self, items, at):
        super().__init__(items)
        self.at = at

    def __getitem__(self, i):
        if i == self.at and self.at is not None:
            self.at = None
            raise KeyboardInterrupt
        return super().__getitem__(i)


def test_resume_gives_the_uninterrupted_result(tmp_path):
    model = make_tiny_whisper()
    examples = make_examples(5)
    full = accumulate_gradients(model, examples, progress=False)
    ckpt = tmp_path / "accumulators.safetensors"
    with pytest.raises(KeyboardInterrupt):
        accumulate_gradients(model, _Interrupting(examples, at=3), checkpoint=ckpt, checkpoint_every=2, key="k", progress=False)
    saved, info = GradientStats.load(ckpt)
    assert saved.n == 2 and info["key"] == "k"
    resumed = accumulate_gradients(model, examples, checkpoint=ckpt, checkpoint_every=2, key="k", progress=False)
    assert resumed.n == 5 and resumed.ids == full.ids
    assert resumed.losses == pytest.approx(full.losses, rel=1e-6)
    for d in ("sum_abs", "sum", "sum_sq"):
        for name, t in getattr(full, d).items():
            torch.testing.assert_close(getattr(resumed, d)[name], t, rtol=1e-6, atol=0)
    with pytest.raises(ResumeMismatchError, match="other inputs"):
        accumulate_gradients(model, examples, checkpoint=ckpt, key="other", progress=False)
    with pytest.raises(ResumeMismatchError, match="other utterances"):
        accumulate_gradients(model, make_examples(5, seed=1)[::-1], checkpoint=ckpt, key="k", progress=False)


# ----------------------------------------------------------------------------------------------
# correlation, options
# ----------------------------------------------------------------------------------------------


def test_spearman_with_ci():
    from scipy.stats import spearmanr

    x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    r = spearman_with_ci(x, [10, 20, 30, 40, 50, 60], n_bootstrap=200)
    assert r["rho"] == pytest.approx(1.0) and r["ci"] == pytest.approx([1.0, 1.0]) and r["n"] == 6
    y = [3.0, 1.0, 4.0, 1.5, 5.0, 9.0]
    r = spearman_with_ci(x, y, n_bootstrap=500, seed=3)
    assert r["rho"] == pytest.approx(spearmanr(x, y).statistic)
    assert r["ci"][0] <= r["rho"] <= r["ci"][1]
    r = spearman_with_ci([1, 2, float("nan"), 4], [1, 1, 1, 1])
    assert math.isnan(r["rho"]) and r["n"] == 3


def test_correlate_and_prediction_check_hand_case():
    def comp(i, measured, total, n_removed=10):
        return {"id": f"c{i}", "diagnostics": {d: {"mean": float(i), "sum": float(-i)} for d in sens.DIAGNOSTICS},
                "predicted": {"0.5": {"first_order": total / 2, "second_order": total / 2, "total": total}},
                "ablation": {"0.5": {"loss_delta": measured, "n_removed": n_removed}}}

    comps = [comp(1, 0.1, 0.1), comp(2, 0.4, 0.1), comp(3, -0.3, 0.3), comp(4, 2.0, 1.0), comp(5, 9.0, 0.0, n_removed=0)]
    rows = {(r["predictor"], r["target"]): r for r in sens.correlate(comps, [0.5], n_bootstrap=100, seed=0)
            if r["population"] == "all"}
    # the untouched component (n_removed 0) is left out
    assert rows[("fisher.mean", "loss_delta")]["n"] == 4
    assert rows[("fisher.mean", "loss_delta")]["rho"] == pytest.approx(0.4)   # ranks 1234 vs 2314
    assert rows[("fisher.sum", "loss_delta")]["rho"] == pytest.approx(-0.4)
    check = {r["predicted"]: r for r in sens.prediction_check(comps, [0.5])}["total"]
    # ratios measured / predicted: 1, 4, -1, 2
    assert check["n"] == 4 and check["median_ratio"] == pytest.approx(1.5)
    assert check["sign_agreement"] == pytest.approx(0.75) and check["within_2x"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"labels": "teacher"},
        {"labels": 3},
        {"ablation_sparsities": (50,)},
        {"ablation_sparsities": (0.0,)},
        {"checkpoint_every": 0},
    ],
)
def test_invalid_options(kwargs):
    with pytest.raises(ValueError):
        SensitivityOptions(**kwargs)


@pytest.mark.parametrize("kwargs", [{"labels": "teacher"}, {"text_form": "upper"}, {"task": "summarise"}])
def test_invalid_label_spec(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LabelSpec(**kwargs)


def test_options_sorted_and_prediction_grid_includes_ablation():
    o = SensitivityOptions(ablation_sparsities=(0.5, 0.35), prediction_sparsities=(0.1,))
    assert o.ablation_sparsities == (0.35, 0.5)
    assert o.all_prediction_sparsities == (0.1, 0.35, 0.5)


# ----------------------------------------------------------------------------------------------
# units and measured ablation (real components + prune on the tiny model)
# ----------------------------------------------------------------------------------------------


def test_analysis_units_are_disjoint_and_cover_every_weight():
    model = make_tiny_whisper()
    units = sens.analysis_units(model)
    ids = [u.id for u in units]
    assert "encoder.layers.0.self_attn" in ids and "decoder.layers.1.encoder_attn" in ids
    assert "decoder.layers.0.ffn" in ids and "encoder.conv" in ids and "decoder.embed_tokens" in ids
    names = [p for u in units for p in u.params]
    assert len(names) == len(set(names))
    weights = {n for n, _ in model.named_parameters() if not n.endswith(".bias")}
    assert set(names) == weights
    u = {x.id: x for x in units}
    assert u["decoder.layers.1.encoder_attn"].kind == "decoder_cross_attn" and u["decoder.layers.1.encoder_attn"].layer == 1
    assert u["encoder.layers.0.layer_norms"].category == "norm" and u["encoder.layers.0.ffn"].category == "linear"
    assert len(u["encoder.layers.0.self_attn"].params) == 4


def _loss_of_pruned_copy(model, examples, selector, s):
    import copy

    from asrprune.config import PlanEntry, PrunePlan
    from asrprune.prune import prune_model

    m = copy.deepcopy(model)
    prune_model(m, PrunePlan(entries=(PlanEntry(selector, s),)))
    with torch.no_grad():
        losses = []
        for ex in examples:
            logits = m(input_features=ex.input_features, decoder_input_ids=ex.decoder_input_ids).logits[0]
            losses.append(float(F.cross_entropy(logits, ex.labels[0], ignore_index=IGNORE_INDEX, reduction="sum")))
    return float(np.mean(losses))


def test_measure_ablation_matches_independent_pruning_and_restores(tmp_path):
    from asrprune.models import model_fingerprint

    model = make_tiny_whisper()
    examples = make_examples(3)
    stats = accumulate_gradients(model, examples, progress=False)
    fp = model_fingerprint(model)
    targets = ["decoder.layers.0.self_attn", "encoder.layers.1.ffn", "encoder.conv", "decoder.embed_tokens",
               "encoder.layer_norm"]
    path = tmp_path / "ablation.jsonl"
    res = damage.measure_ablation(model, examples, targets, [0.5], mean_grad=stats.mean_grad(), fisher=stats.fisher(),
                                results_path=path, key="k", progress=False)
    assert model_fingerprint(model) == fp
    with torch.no_grad():
        base = float(np.mean([float(calib.teacher_forced_loss(model, ex)) for ex in examples]))
        evaluator = damage._LossEvaluator(model, examples, cache_mb=64, progress=False)
    assert evaluator.layer_inputs is not None and evaluator.outputs is not None  # the cached paths ran
    assert res["baseline_loss"] == pytest.approx(base, rel=1e-5)
    starts = {r["target"]: r["start"] for r in res["rows"]}
    assert starts == {"decoder.layers.0.self_attn": "decoder", "encoder.layers.1.ffn": "1", "encoder.conv": "None",
                      "decoder.embed_tokens": "decoder", "encoder.layer_norm": "2"}
    weights = {n: p.detach() for n, p in model.named_parameters()}
    for row in res["rows"]:
        expected = _loss_of_pruned_copy(model, examples, row["target"], 0.5)
        assert row["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6), row["target"]
        assert row["loss_delta"] == pytest.approx(expected - base, rel=1e-4, abs=1e-5)
        assert row["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
        # the prediction from what prune_model removed equals the one from magnitude masks
        names = sens.unit_for_selector(model, row["target"]).params
        pred = predict_loss_change(weights, stats.mean_grad(), stats.fisher(), damage.magnitude_keep_masks(model, names, 0.5))
        assert row["predicted"]["n_removed"] == pred["n_removed"] == row["n_removed"]
        assert row["predicted"]["total"] == pytest.approx(pred["total"], rel=1e-9, abs=1e-15)
    # resume: finished rows are reused, nothing is appended
    n_lines = len(path.read_text().splitlines())
    again = damage.measure_ablation(model, examples, targets, [0.5], results_path=path, key="k", progress=False)
    assert len(path.read_text().splitlines()) == n_lines
    assert [r["loss"] for r in again["rows"]] == [r["loss"] for r in res["rows"]]


def test_check_plans_equals_independent_pruning_and_restores():
    from asrprune.config import PlanEntry, PrunePlan
    from asrprune.models import model_fingerprint

    model = make_tiny_whisper()
    examples = make_examples(3)
    fp = model_fingerprint(model)
    plans = {
        "global": PrunePlan((PlanEntry("all_linear", 0.4),), mode="global"),
        "two": PrunePlan((PlanEntry("decoder.layers.0.self_attn", 0.5), PlanEntry("encoder.layers.1.ffn", 0.3))),
    }
    res = damage.check_plans(model, examples, plans, predicted={"two": 0.25})
    assert model_fingerprint(model) == fp  # restored bit-exactly
    with torch.no_grad():
        base = float(np.mean([float(calib.teacher_forced_loss(model, ex)) for ex in examples]))
    assert res["baseline_loss"] == pytest.approx(base, rel=1e-6) and res["n_utterances"] == 3
    import copy

    from asrprune.prune import prune_model

    for name, plan in plans.items():
        m = copy.deepcopy(model)
        measured = prune_model(m, plan).model
        with torch.no_grad():
            expected = float(np.mean([float(calib.teacher_forced_loss(m, ex)) for ex in examples]))
        row = res["plans"][name]
        assert row["loss"] == pytest.approx(expected, rel=1e-6)
        assert row["loss_delta"] == pytest.approx(expected - base, rel=1e-5, abs=1e-7)
        assert row["sparsity_linear"] == pytest.approx(measured.linear_weights.sparsity)
    assert res["plans"]["global"]["sparsity_linear"] == pytest.approx(0.4, abs=1e-3)
    assert res["plans"]["two"]["predicted_damage"] == 0.25 and res["plans"]["global"]["predicted_damage"] is None


def test_overlap_guard_raises_before_any_work(tmp_path):
    from asrprune.manifests import Utterance
    from asrprune.overlap import OverlapError

    calib = [Utterance(id="LJ001-0001", audio=str(tmp_path / "a.flac"), text="a"),
             Utterance(id="LJ001-0002", audio=str(tmp_path / "b.flac"), text="b")]
    evaluation = [Utterance(id="LJ001-0002", audio=str(tmp_path / "b.flac"), text="b")]
    with pytest.raises(OverlapError, match="LJ001-0002"):
        sens.score_sensitivity(make_tiny_whisper(), None, calib, evaluation=evaluation, out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# real tiny.en on real speech, through the CLI
# ----------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_cli_sensitivity_tiny_en_ljspeech(tmp_path, shared_data, capsys):
    from asrprune.cli import main

    manifest = shared_data / "ljspeech" / "manifest.jsonl"
    out = tmp_path / "sens"
    argv = ["sensitivity", "tiny.en", f"{manifest}::LJ001-000[23]", "--out", str(out),
            "--targets", "decoder.layers.0.self_attn,decoder.layers.3.ffn,encoder.layers.3.self_attn",
            "--groups", "none", "--ablation-sparsities", "0.5", "--prediction-sparsities", "0.5",
            "--bootstrap", "50", "--no-progress"]
    assert main(argv) == 0
    d = json.loads((out / "sensitivity.json").read_text())
    assert d["data"]["ids"] == ["LJ001-0002", "LJ001-0003"]
    assert d["labels"][0]["text"] == " In being comparatively modern."
    assert d["loss_units"].startswith("nats per utterance") and d["baseline_loss"] > 0
    comps = {c["id"]: c for c in d["components"]}
    assert set(comps) == {"decoder.layers.0.self_attn", "decoder.layers.3.ffn", "encoder.layers.3.self_attn"}
    for c in comps.values():
        a, p = c["ablation"]["0.5"], c["predicted"]["0.5"]
        assert a["n_removed"] == p["n_removed"] == c["n_weights"] // 2
        assert math.isfinite(a["loss_delta"]) and math.isfinite(p["total"])
        assert c["diagnostics"]["fisher"]["mean"] > 0
    assert comps["encoder.layers.3.self_attn"]["ablation"]["0.5"]["start"] == "3"
    assert {"labels", "gradients", "aggregate", "predict", "ablation", "correlate", "total"} <= set(d["timings_s"])
    for name in ("components.csv", "ablation.csv", "correlations.csv", "ranking.csv", "heatmap_fisher.png",
                 "heatmap_loss_delta_0.5.png", "accumulators.safetensors", "labels.jsonl", "ablation.jsonl"):
        assert (out / name).is_file(), name
    text = capsys.readouterr().out
    assert "most sensitive by fisher" in text and "Spearman" in text
    # a rerun resumes: nothing is recomputed or appended
    n_rows = len((out / "ablation.jsonl").read_text().splitlines())
    assert main(argv) == 0
    assert len((out / "ablation.jsonl").read_text().splitlines()) == n_rows
    again = json.loads((out / "sensitivity.json").read_text())
    assert again["components"] == d["components"]
    # the overlap guard: calibration shares LJ001-0002 with the evaluation set
    rc = main(argv[:3] + ["--out", str(tmp_path / "x"), "--eval-data", f"{manifest}::LJ001-0002", "--no-progress"])
    assert rc == 2 and "LJ001-0002" in capsys.readouterr().err


@pytest.mark.integration
def test_greedy_and_reference_labels_tiny_en(tmp_path, shared_data, tiny_en):
    from types import SimpleNamespace

    from asrprune.manifests import read_speech_set

    model, processor = tiny_en
    tok = processor.tokenizer
    utts = read_speech_set(shared_data / "ljspeech" / "manifest.jsonl", include="LJ001-0002").utterances
    path = tmp_path / "labels.jsonl"
    ex = calib.build_examples(model, processor, utts, spec=LabelSpec(labels="greedy"), labels_path=path, progress=False)[0]
    prefix = tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    assert ex.decoder_input_ids[0, :2].tolist() == prefix
    assert ex.labels[0, 0].item() == IGNORE_INDEX and ex.labels[0, -1].item() == tok.convert_tokens_to_ids("<|endoftext|>")
    with torch.no_grad():
        hyp = tok.batch_decode(model.generate(input_features=ex.input_features), skip_special_tokens=True)[0]
    assert ex.text.strip() == hyp.strip()
    assert "comparatively modern" in ex.text.lower()
    # the greedy transcript is reused from labels.jsonl, not decoded again
    model.generate = None  # would fail if called
    try:
        again = calib.build_examples(model, processor, utts, spec=LabelSpec(labels="greedy"), labels_path=path, progress=False)[0]
    finally:
        del model.generate
    assert torch.equal(again.labels, ex.labels)
    ref = calib.build_examples(model, processor, utts, labels_path=path, progress=False)[0]
    assert ref.text == " In being comparatively modern."
    assert tok.decode(ref.labels[0][ref.labels[0] != IGNORE_INDEX][:-1]) == ref.text
    # multilingual prompt: language and task tokens between sot and notimestamps
    multi = SimpleNamespace(generation_config=SimpleNamespace(is_multilingual=True), config=model.config)
    assert calib.prefix_token_ids(multi, tok, language="en") == tok.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"])
    with pytest.raises(ValueError, match="language"):
        calib.prefix_token_ids(multi, tok, language=None)


def test_ablation_under_sparsegpt_equals_the_sequential_method_for_one_component(tmp_path):
    """Sensitivity under the method that will prune: one dense pass of statistics, each component
    pruned from it, gives the very weights the sequential SparseGPT gives that component alone."""
    import copy

    from asrprune.calibration import collect_input_stats
    from asrprune.config import PlanEntry, PrunePlan
    from asrprune.prune import PruningMethod, prune_model

    model = make_tiny_whisper()
    examples = make_examples(4)
    stats = collect_input_stats(model, examples, gram=True, progress=False)
    method = PruningMethod("sparsegpt", input_stats=stats)
    targets = ["encoder.layers.1.ffn", "decoder.layers.0.encoder_attn"]
    res = damage.measure_ablation(model, examples, targets, [0.5], method=method, progress=False)
    for target, row in zip(targets, res["rows"]):
        seq = copy.deepcopy(model)
        prune_model(seq, PrunePlan((PlanEntry(target, 0.5),), score="sparsegpt"), calibration=examples)
        one = copy.deepcopy(model)
        method.prune(one, method.plan(target, 0.5))
        for (name, a), (_, b) in zip(seq.named_parameters(), one.named_parameters()):
            assert torch.equal(a, b), (target, name)
        with torch.no_grad():
            expected = float(np.mean([float(calib.teacher_forced_loss(seq, ex)) for ex in examples]))
        assert row["loss"] == pytest.approx(expected, rel=1e-5) and row["predicted"] is None
        assert row["measured_sparsity"] == pytest.approx(0.5)
    assert not method.can_prune(model, "encoder.conv") and not method.can_prune(model, "decoder.embed_tokens")
