"""OWL, the authors' rule and the measured allocation: closed forms and the target met exactly."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from asrprune.allocate import AllocationError, ComponentCurve, ParamCounts, SensitivityCurves
from asrprune.allocation_rules import (
    authors_allocation,
    authors_rate,
    fit_to_target,
    measured_allocation,
    owl_allocation,
    owl_sparsities,
    write_rule_allocation,
)
from asrprune.components import linear_weight_names, select_parameters
from asrprune.prune import PruningMethod, WeightSnapshot, measure_model, prune_model
from asrprune.models import model_fingerprint
from test_criteria import _examples


def test_fit_to_target_meets_a_weighted_mean_with_clipping():
    w = np.array([1.0, 3.0, 12.0])
    for how, raw in (("shift", [0.9, 0.1, 0.4]), ("scale", [0.7, 0.1, 0.3])):
        s = fit_to_target(raw, w, 0.4, how=how, hi=0.8)
        assert float((s * w).sum() / w.sum()) == pytest.approx(0.4, abs=1e-9)
        assert s.max() <= 0.8 + 1e-12 and s.min() >= 0
    with pytest.raises(AllocationError):
        fit_to_target([0.5], [1.0], 0.99, hi=0.95)


def test_owl_sparsities_are_the_reference_mapping_centred_by_weight():
    d = np.array([2.0, 4.0, 6.0, 10.0])  # outlier ratios (%)
    n = np.array([12, 12, 16, 16])  # encoder layers 12 d^2, decoder layers 16 d^2
    s = owl_sparsities(d, n, 0.5, lam=0.08)
    r = (d - 2.0) / 8.0 * 0.16  # the reference: (D - min) / (max - min) * 2 lambda
    expected = 0.5 - (r - (r * n).sum() / n.sum())
    np.testing.assert_allclose(s, expected, atol=1e-12)
    assert float((s * n).sum() / n.sum()) == pytest.approx(0.5, abs=1e-12)
    assert s.max() - s.min() == pytest.approx(0.16)  # the range is 2 lambda, outliers pruned least
    assert np.argmin(s) == 3
    # equal layers: the reference's plain mean
    np.testing.assert_allclose(owl_sparsities(d, [1, 1, 1, 1], 0.5), 0.5 - (r - r.mean()), atol=1e-12)


def test_owl_allocation_prunes_the_target_exactly(tiny_whisper):
    model = tiny_whisper
    fp = model_fingerprint(model)
    alloc = owl_allocation(model, _examples(model), 0.4, progress=False)
    assert model_fingerprint(model) == fp  # statistics only
    assert alloc.plan.score == "wanda" and len(alloc.plan.entries) == 4  # 2 encoder + 2 decoder layers
    assert alloc.achieved == pytest.approx(0.4, abs=2e-4)
    sizes = [r["n_weights"] for r in alloc.rows]
    d, f = model.config.d_model, model.config.encoder_ffn_dim
    assert sizes[0] == 4 * d * d + 2 * d * f and sizes[2] == 8 * d * d + 2 * d * f  # 12 d^2 and 16 d^2 at f = 4d
    res = prune_model(model, alloc.plan, calibration=_examples(model))
    assert res.model.linear_weights.sparsity == pytest.approx(0.4, abs=2e-3)


def test_authors_rate_is_their_sigmoid():
    rates = authors_rate([1.0, 0.5, 0.0])
    np.testing.assert_allclose(rates, [0.7 - 0.6 / (1 + np.exp(-4)), 0.4, 0.7 - 0.6 / (1 + np.exp(4))])


def _linear_units(model):
    """(id, kind, n_weights) of every per-layer linear unit of the tiny model (2 + 2 layers)."""
    params = dict(model.named_parameters())
    for side, kinds in (("encoder", ("self_attn", "ffn")), ("decoder", ("self_attn", "encoder_attn", "ffn"))):
        for i in range(2):
            for kind in kinds:
                cid = f"{side}.layers.{i}.{kind}"
                yield cid, f"{side}_{kind}", sum(params[p].numel() for p in select_parameters(model, cid))


def _fake_sensitivity(model, importance) -> dict:
    return {"components": [{"id": cid, "n_weights": n, "diagnostics": {"gradient": {"mean": importance(cid)}}}
                           for cid, _, n in _linear_units(model)]}


def test_authors_allocation_follows_importance_and_meets_the_target(tiny_whisper, tmp_path):
    model = tiny_whisper
    sens = _fake_sensitivity(model, lambda cid: 10.0 if "self_attn" in cid else 1.0)
    alloc = authors_allocation(sens, model, 0.4)
    rows = {r["id"]: r for r in alloc.rows}
    # 2 layers: thirds are early (layer 0) and late (layer 1); no middle
    assert set(rows) == {f"{s}.layers[{a}:{a + 1}].{k}" for s, ks in (("encoder", ("self_attn", "ffn")),
                         ("decoder", ("self_attn", "encoder_attn", "ffn"))) for a in (0, 1) for k in ks}
    assert rows["encoder.layers[0:1].self_attn"]["sparsity"] < rows["encoder.layers[0:1].ffn"]["sparsity"]
    ratio = rows["encoder.layers[0:1].ffn"]["sparsity"] / rows["encoder.layers[0:1].self_attn"]["sparsity"]
    assert ratio == pytest.approx(authors_rate([10, 1])[1] / authors_rate([10, 1])[0], rel=1e-2)  # one common scale (4-decimal rounding)
    assert rows["encoder.layers[0:1].ffn"]["rate"] == pytest.approx(authors_rate([10, 1])[1])
    assert alloc.achieved == pytest.approx(0.4, abs=2e-4)
    with WeightSnapshot(model):
        assert prune_model(model, alloc.plan).model.linear_weights.sparsity == pytest.approx(0.4, abs=1e-3)
    paths = write_rule_allocation(alloc, tmp_path / "authors.yaml")
    assert json.loads(paths["table"].read_text())["rule"] == "authors"


def _curves(model, damage) -> SensitivityCurves:
    params = dict(model.named_parameters())
    comps = [ComponentCurve(id=cid, kind=kind, n_weights=n, linear=True,
                            points=((0.3, damage(cid) * 0.3), (0.5, damage(cid) * 1.0)), source="ablation")
             for cid, kind, n in _linear_units(model)]
    n_lin = sum(params[p].numel() for p in linear_weight_names(model))
    return SensitivityCurves(components=tuple(comps), counts=ParamCounts(linear=n_lin, all=sum(p.numel() for p in params.values())))


def test_measured_allocation_keeps_the_best_checked_plan_within_budget(tiny_whisper):
    model = tiny_whisper
    torch.manual_seed(0)
    examples = _examples(model)
    curves = _curves(model, lambda cid: 1.0 + ("decoder" in cid))
    fp = model_fingerprint(model)
    seen = []
    alloc = measured_allocation(model, examples, curves, 0.4, budget=5, on_check=seen.append)
    assert model_fingerprint(model) == fp
    trace = alloc.info["trace"]
    assert len(trace) == len(seen) == 5
    assert [t["move"] for t in trace[:3]] == ["additive", "uniform", "line l=0.5"]
    best = min(trace, key=lambda t: t["loss_delta"])
    assert alloc.info["chosen"] == best["move"] and alloc.info["chosen_loss_delta"] == best["loss_delta"]
    for t in trace:  # every candidate is at the target
        assert t["sparsity_linear"] == pytest.approx(0.4, abs=2e-3)
    # the chosen plan, pruned again, gives the loss that was measured for it
    from asrprune.damage import check_plans
    again = check_plans(model, examples, {"x": alloc.plan})["plans"]["x"]
    assert again["loss_delta"] == pytest.approx(best["loss_delta"], rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="budget"):
        measured_allocation(model, examples, curves, 0.4, budget=1)


def test_measured_allocation_under_sparsegpt(tiny_whisper):
    model = tiny_whisper
    examples = _examples(model, n=4)
    curves = _curves(model, lambda cid: 1.0)
    curves = SensitivityCurves(components=curves.components, counts=curves.counts, scope="matrix", score="sparsegpt")
    method = PruningMethod("sparsegpt", calibration=examples)
    alloc = measured_allocation(model, examples, curves, 0.5, budget=2, method=method)
    assert alloc.plan.score == "sparsegpt" and alloc.info["method"]["statistics"] == "sequential"
    assert {t["move"] for t in alloc.info["trace"]} == {"additive", "uniform"}
    assert measure_model(model).linear_weights.sparsity == 0  # restored


def test_cli_owl_needs_no_sensitivity_and_the_other_rules_say_they_do(tiny_dir, shared_data, tmp_path, capsys):
    from asrprune.cli import main
    from asrprune.config import PrunePlan

    out = tmp_path / "owl.yaml"
    calib = f"{shared_data / 'ljspeech' / 'manifest.jsonl'}::LJ001-*"
    rc = main(["allocate", "--rule", "owl", "--model", str(tiny_dir), "--calibration", calib,
               "--calibration-limit", "2", "--target", "0.4", "--no-progress", "--out", str(out)])
    assert rc == 0
    assert re.search(r"owl: 0\.400\d of linear weights \(target 0\.4000\)", capsys.readouterr().out)
    assert PrunePlan.from_yaml(out).score == "wanda"
    for rule in ("additive", "measured", "authors"):
        assert main(["allocate", "--rule", rule, "--model", str(tiny_dir), "--target", "0.4", "--out", str(out)]) == 2
        assert f"--rule {rule} needs --sensitivity" in capsys.readouterr().err
