"""allocate.py: sensitivity-aware allocation on synthetic curves with known optima."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re

import numpy as np
import pytest
import torch

from asrprune.allocate import (
    AllocationError,
    ComponentCurve,
    ParamCounts,
    SensitivityCurves,
    allocate_plan,
    baseline_plans,
    curves_from_dict,
    interpolate_damage,
    load_sensitivity,
    lower_hull,
    parse_caps,
    uniform_damage,
    verify_allocation,
    write_allocation,
)
from asrprune.config import PrunePlan


def quad_curves(a, n, *, per_weight=False, step=0.01, s_max=0.9, kinds=None, extra=0):
    """Components with damage a_i * s**2 (times n_i if per_weight), known on a fine grid."""
    grid = np.round(np.arange(0, s_max + 1e-9, step), 10)
    comps = []
    for i, (ai, ni) in enumerate(zip(a, n)):
        scale = ai * ni if per_weight else ai
        comps.append(ComponentCurve(
            id=f"c{i}", kind=(kinds[i] if kinds else f"kind{i}"), n_weights=ni,
            points=tuple((float(s), float(scale * s * s)) for s in grid[1:]),
        ))
    total = sum(n)
    return SensitivityCurves(tuple(comps), ParamCounts(linear=total, all=total + extra))


def lagrange_quadratic(a, n, target_weights, caps, per_weight):
    """Closed-form optimum of sum c_i s_i^2 s.t. sum n_i s_i = W, s_i <= cap_i (water filling).

    Marginal cost per weight: 2 c_i s_i / n_i = lam  ->  s_i = lam n_i / (2 c_i), with
    c_i = a_i (per component) or a_i n_i (per weight, then s_i = lam / (2 a_i), i.e. ∝ 1/a_i).
    """
    c = [ai * ni if per_weight else ai for ai, ni in zip(a, n)]
    fixed = {}
    while True:
        free = [i for i in range(len(a)) if i not in fixed]
        rest = target_weights - sum(n[i] * fixed[i] for i in fixed)
        lam = rest / sum(n[i] ** 2 / (2 * c[i]) for i in free)
        s = {i: lam * n[i] / (2 * c[i]) for i in free}
        over = [i for i in free if s[i] > caps[i]]
        if not over:
            return [fixed.get(i, s.get(i)) for i in range(len(a))]
        for i in over:
            fixed[i] = caps[i]


@pytest.mark.parametrize("per_weight", [False, True])
@pytest.mark.parametrize("cap3", [None, 0.5])
def test_quadratic_matches_closed_form(per_weight, cap3):
    a, n = [1.0, 4.0, 0.5], [1000, 3000, 6000]
    curves = quad_curves(a, n, per_weight=per_weight)
    caps = {"c2": cap3} if cap3 is not None else None
    alloc = allocate_plan(curves, 0.4, caps=caps, grid_step=0.01, max_extrapolation=0.0)
    expect = lagrange_quadratic(a, n, 0.4 * sum(n), [0.9, 0.9, cap3 or 0.9], per_weight)
    got = [r.sparsity for r in alloc.rows]
    # piecewise-linear interpolation on a 0.01 grid: the optimum moves by at most one grid step
    assert got == pytest.approx(expect, abs=0.0101), (got, expect)
    if cap3 is not None:
        assert got[2] == pytest.approx(0.5, abs=1e-9)
    assert alloc.sparsity_linear == pytest.approx(0.4, abs=1e-3)


def test_per_weight_quadratic_gives_inverse_proportional_sparsities():
    # damage a_i * n_i * s^2 -> s_i ∝ 1/a_i (the brief's closed form)
    a, n = [1.0, 2.0, 4.0], [5000, 5000, 5000]
    alloc = allocate_plan(quad_curves(a, n, per_weight=True), 0.35, grid_step=0.01, max_extrapolation=0.0)
    s = [r.sparsity for r in alloc.rows]
    # 1/a = 1 : 1/2 : 1/4, mean 0.35 -> 0.6, 0.3, 0.15
    assert s == pytest.approx([0.6, 0.3, 0.15], abs=0.0101)


def test_optimum_against_brute_force_on_default_grid():
    a, n = [2.0, 1.0, 6.0], [2000, 5000, 3000]
    # points only at 0.3 and 0.5 as the ablation gives them; beyond 0.5 the conservative tail
    pts = [tuple((s, ai * s**2 + 0.05 * ai * s) for s in (0.3, 0.5)) for ai in a]
    curves = SensitivityCurves(
        tuple(ComponentCurve(f"c{i}", "k", ni, p) for i, (ni, p) in enumerate(zip(n, pts))),
        ParamCounts(sum(n), sum(n)),
    )
    target = 0.35
    alloc = allocate_plan(curves, target, max_extrapolation=0.2)  # caps 0.7, as the search below
    W = target * sum(n)
    best = np.inf
    for s0, s1 in itertools.product(np.arange(0, 0.7001, 0.005), repeat=2):
        s2 = (W - n[0] * s0 - n[1] * s1) / n[2]
        if 0 <= s2 <= 0.7:
            d = sum(float(interpolate_damage(c.points, s)) for c, s in zip(curves.components, (s0, s1, s2)))
            best = min(best, d)
    assert alloc.predicted_damage <= best + 1e-9
    assert alloc.predicted_damage < uniform_damage(curves, target)


def test_target_reached_on_random_curves():
    rng = np.random.default_rng(0)
    for trial in range(25):
        k = int(rng.integers(3, 15))
        n = rng.integers(1_000, 200_000, size=k)
        comps = []
        for i in range(k):
            d3 = float(rng.normal(0.05, 0.1))  # negative: the loss fell (clipped to 0)
            d5 = d3 + float(rng.exponential(0.2))
            comps.append(ComponentCurve(f"layer{i}.x", "attn" if i % 2 else "ffn", int(n[i]),
                                        ((0.3, d3), (0.5, d5))))
        extra = int(rng.integers(0, 100_000))
        curves = SensitivityCurves(tuple(comps), ParamCounts(int(n.sum()), int(n.sum()) + extra))
        caps = {"ffn": float(rng.uniform(0.2, 0.7))}
        target = float(rng.uniform(0.05, 0.5))
        denom = "all" if trial % 3 == 0 else "linear"
        try:
            alloc = allocate_plan(curves, target, caps=caps, denominator=denom)
        except AllocationError as exc:
            assert "not reachable" in str(exc)
            continue
        # independent recount from the plan and the sizes
        size = {c.id: c.n_weights for c in comps}
        pruned = sum(round(e.sparsity * size[e.selector]) for e in alloc.plan.entries)
        d = curves.counts.linear if denom == "linear" else curves.counts.all
        assert abs(pruned / d - target) <= 0.005
        assert alloc.achieved == pytest.approx(pruned / d)
        for r in alloc.rows:
            assert r.sparsity <= r.cap + 1e-12
            if r.kind == "ffn":
                assert r.sparsity <= caps["ffn"] + 1e-12


def test_caps_user_glob_fragile_and_unreachable():
    a, n = [0.1, 0.1, 5.0], [1000, 1000, 1000]
    curves = quad_curves(a, n, kinds=["decoder_ffn", "encoder_ffn", "decoder_self_attn"], step=0.05)
    alloc = allocate_plan(curves, 0.3, caps=parse_caps(["decoder_ffn=0.2", "enc*=0.25"]))
    s = {r.kind: r.sparsity for r in alloc.rows}
    assert s["decoder_ffn"] <= 0.2 + 1e-12 and s["encoder_ffn"] <= 0.25 + 1e-12
    assert s["decoder_ffn"] == pytest.approx(0.2) and s["encoder_ffn"] == pytest.approx(0.25)
    assert s["decoder_self_attn"] == pytest.approx(0.9 - 0.45, abs=1e-3)
    # fragile threshold: cap where damage a*s^2 exceeds 0.02 -> 5 s^2 <= 0.02 -> s <= 0.063 -> 0.05
    alloc = allocate_plan(curves, 0.25, fragile_threshold=0.02)
    row = [r for r in alloc.rows if r.kind == "decoder_self_attn"][0]
    assert row.cap == pytest.approx(0.05) and row.cap_reason.startswith("fragile")
    with pytest.raises(AllocationError, match="not reachable.*at most 0.3333"):
        allocate_plan(curves, 0.4, caps={"*": 1 / 3})
    with pytest.raises(ValueError, match="--cap"):
        parse_caps(["decoder_ffn"])
    with pytest.raises(ValueError, match="--cap"):
        parse_caps(["decoder_ffn=30"])


def test_equal_flat_curves_share_uniformly_and_denominator_all():
    comps = tuple(ComponentCurve(f"c{i}", "k", n, ((0.5, -0.1),)) for i, n in enumerate([1000, 2000, 3000]))
    curves = SensitivityCurves(comps, ParamCounts(6000, 8000))
    alloc = allocate_plan(curves, 0.3)
    assert [r.sparsity for r in alloc.rows] == pytest.approx([0.3, 0.3, 0.3], abs=0.051)
    assert alloc.sparsity_linear == pytest.approx(0.3, abs=1e-3)
    alloc = allocate_plan(curves, 0.3, denominator="all")
    assert alloc.sparsity_all == pytest.approx(0.3, abs=1e-3)
    assert alloc.sparsity_linear == pytest.approx(0.4, abs=1e-3)


def test_non_linear_and_bias_components_are_not_pruned_under_linear():
    comps = (
        ComponentCurve("encoder.conv1", "encoder_conv", 1000, ((0.5, 0.0),), linear=False),
        ComponentCurve("biases", "biases", 500, ((0.5, 0.0),), linear=False),
        ComponentCurve("decoder.layers.0.fc1", "decoder_ffn", 4000, ((0.5, 1.0),)),
    )
    curves = SensitivityCurves(comps, ParamCounts(4000, 6000))
    alloc = allocate_plan(curves, 0.25)
    s = {r.id: r.sparsity for r in alloc.rows}
    assert s["encoder.conv1"] == 0 and s["biases"] == 0 and s["decoder.layers.0.fc1"] == pytest.approx(0.25)
    alloc = allocate_plan(curves, 0.25, denominator="all")
    s = {r.id: r.sparsity for r in alloc.rows}
    assert s["biases"] == 0 and s["encoder.conv1"] > 0  # free damage goes first
    assert alloc.sparsity_all == pytest.approx(0.25, abs=1e-3)


def test_interpolation_is_monotone_and_extrapolates_conservatively():
    pts = ((0.3, 0.1), (0.5, 0.4))
    grid = np.linspace(0, 0.9, 19)
    d = interpolate_damage(pts, grid)
    assert np.all(np.diff(d) >= 0)
    assert float(interpolate_damage(pts, 0.4)) == pytest.approx(0.25)
    # beyond 0.5: fitted exponent log(4)/log(5/3) = 2.71 > 2
    p = np.log(4) / np.log(5 / 3)
    assert float(interpolate_damage(pts, 0.7)) == pytest.approx(max(0.4 * (0.7 / 0.5) ** p, 0.4 + 1.5 * 0.2))
    assert float(interpolate_damage(pts, 0.7)) >= 0.4 + 1.5 * 0.2  # never below the last slope
    # a negative measured change counts as zero, a dip is flattened
    assert float(interpolate_damage(((0.3, -0.2), (0.5, 0.1)), 0.3)) == 0.0
    assert float(interpolate_damage(((0.3, 0.2), (0.5, 0.1)), 0.5)) == pytest.approx(0.2)


def test_lower_hull():
    xs = np.array([0, 1, 2, 3, 4.0])
    ys = np.array([0, 3, 1, 5, 6.0])
    assert lower_hull(xs, ys) == [0, 2, 4]


def _sens_dict(model, selectors, damage):
    """A sensitivity.json-like dict for a real (tiny) model, sizes from the model itself."""
    from asrprune.components import linear_weight_names, select_parameters

    params = dict(model.named_parameters())
    comps = []
    for sel in selectors:
        n = sum(params[p].numel() for p in select_parameters(model, sel))
        comps.append({"id": sel, "kind": sel.split(".")[-1], "n_weights": n, "category": "linear",
                      "ablation": {"0.3": {"loss_delta": damage[sel] * 0.09},
                                   "0.5": {"loss_delta": damage[sel] * 0.25}},
                      "predicted": {f"{x:g}": {"first_order": -0.1 * damage[sel] * x, "second_order": damage[sel] * x * x,
                                              "total": damage[sel] * (x * x - 0.1 * x), "n_removed": 1}
                                    for x in (0.1, 0.3, 0.5, 0.7, 0.9)}})
    return {
        "components": comps,
        "param_counts": {"linear": sum(params[p].numel() for p in linear_weight_names(model)),
                         "all": sum(p.numel() for p in model.parameters())},
    }


SELECTORS = [f"{side}.layers.{i}.{part}" for side in ("encoder", "decoder") for i in range(2)
             for part in ("self_attn", "ffn")] + [f"decoder.layers.{i}.encoder_attn" for i in range(2)]


def test_plan_prunes_tiny_whisper_to_the_target(tiny_whisper):
    damage = {s: (1.0 + i) for i, s in enumerate(SELECTORS)}
    curves = curves_from_dict(_sens_dict(tiny_whisper, SELECTORS, damage), predicted_tail=False)
    assert {c.source for c in curves.components} == {"ablation:loss_delta"}
    state = {k: v.clone() for k, v in tiny_whisper.state_dict().items()}
    # linear weights are 10240 of 20064 parameters in the tiny model: 0.3 of all = 0.59 of linear
    for denom, target in (("linear", 0.4), ("all", 0.3)):
        alloc = allocate_plan(curves, target, denominator=denom)
        measured = verify_allocation(alloc, tiny_whisper)
        # the random model has no zero linear weights, so newly pruned == measured there
        assert measured["pruned_linear"] == measured["sparsity_linear"]
        assert measured["pruned_linear"] == pytest.approx(alloc.sparsity_linear, abs=1e-12)
        assert measured["pruned_all"] == pytest.approx(alloc.sparsity_all, abs=1e-12)
        assert abs((measured["pruned_linear"] if denom == "linear" else measured["pruned_all"]) - target) <= 0.005
    # the model is untouched
    assert all(torch.equal(v, state[k]) for k, v in tiny_whisper.state_dict().items())
    # a model of another size is refused
    bad = dataclasses.replace(alloc, counts=ParamCounts(linear=10, all=20))
    with pytest.raises(AllocationError, match="another model"):
        verify_allocation(bad, tiny_whisper)


def test_predicted_source_and_yaml_round_trip(tmp_path, tiny_whisper):
    damage = {s: (1.0 + i) for i, s in enumerate(SELECTORS)}
    data = _sens_dict(tiny_whisper, SELECTORS, damage)
    del data["components"][0]["ablation"]  # one component lacks ablation -> auto uses predicted
    obd = curves_from_dict(data, diagnostic="obd")  # alias of the second-order term
    assert {c.source for c in obd.components} == {"predicted:obd"}
    assert dict(obd.components[0].points)[0.5] == pytest.approx(damage[SELECTORS[0]] * 0.25)
    curves = curves_from_dict(data)  # default: the total predicted change
    assert {c.source for c in curves.components} == {"predicted:total"}
    assert dict(curves.components[1].points)[0.9] == pytest.approx(damage[SELECTORS[1]] * (0.81 - 0.09))
    alloc = allocate_plan(curves, 0.3)
    paths = write_allocation(alloc, tmp_path / "plans" / "plan.yaml")
    assert PrunePlan.from_yaml(paths["plan"]) == alloc.plan
    table = json.loads(paths["table"].read_text())
    assert table["denominator"] == "linear" and table["achieved"] == pytest.approx(0.3, abs=0.005)
    uni, glo = PrunePlan.from_yaml(paths["uniform"]), PrunePlan.from_yaml(paths["global"])
    assert uni == baseline_plans(0.3, curves.counts)["uniform"]
    assert uni.entries[0].scope == "matrix" and glo.mode == "global" and glo.entries[0].sparsity == 0.3


def test_baseline_plans_under_all_denominator():
    counts = ParamCounts(linear=6000, all=8000)
    plans = baseline_plans(0.3, counts, "all")
    assert plans["uniform"].entries[0].sparsity == pytest.approx(0.4)
    with pytest.raises(AllocationError):
        baseline_plans(0.8, counts, "all")


@pytest.mark.parametrize("bad", [
    {"components": []},
    {"components": [{"id": "a", "n_weights": 10, "ablation": {"0.5": {"loss_delta": 1}}}]},  # no counts
    {"components": [{"id": "a", "ablation": {"0.5": {"loss_delta": 1}}}], "param_counts": {"linear": 10, "all": 10}},
    # linear components larger than the model's linear count
    {"components": [{"id": "a", "n_weights": 100, "ablation": {"0.5": {"loss_delta": 1}}}],
     "param_counts": {"linear": 10, "all": 200}},
])
def test_invalid_sensitivity_data(bad):
    with pytest.raises(ValueError):
        curves_from_dict(bad)


def test_invalid_targets():
    curves = quad_curves([1.0], [100])
    for t in (-0.1, 0.0, 1.0, 1.5):
        with pytest.raises(AllocationError):
            allocate_plan(curves, t)
    with pytest.raises(ValueError, match="denominator"):
        allocate_plan(curves, 0.2, denominator="weights")


def test_cli_allocate(tmp_path, tiny_whisper, capsys):
    from asrprune.cli import main

    damage = {s: (1.0 + i) for i, s in enumerate(SELECTORS)}
    sdir = tmp_path / "sens"
    sdir.mkdir()
    (sdir / "sensitivity.json").write_text(json.dumps(_sens_dict(tiny_whisper, SELECTORS, damage)))
    out = tmp_path / "plan.yaml"
    rc = main(["allocate", "--target", "0.4", "--sensitivity", str(sdir), "--cap", "ffn=0.3",
               "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    m = re.search(r"achieved sparsity: ([0-9.]+) of linear weights \(target 0.4000\); linear ([0-9.]+) of (\d+), all ([0-9.]+) of (\d+)", text)
    assert m and abs(float(m.group(1)) - 0.4) <= 0.005
    assert int(m.group(3)) == 10240 and int(m.group(5)) == sum(p.numel() for p in tiny_whisper.parameters())
    plan = PrunePlan.from_yaml(out)
    assert all(e.sparsity <= 0.3 for e in plan.entries if e.selector.endswith("ffn"))
    assert (tmp_path / "plan.uniform.yaml").is_file() and (tmp_path / "plan.global.yaml").is_file()
    assert main(["allocate", "--target", "0.4", "--sensitivity", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert main(["allocate", "--target", "0.95", "--sensitivity", str(sdir), "--out", str(out)]) == 2
    assert "not reachable" in capsys.readouterr().err


def test_load_sensitivity_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="sensitivity.json"):
        load_sensitivity(tmp_path)


def test_measured_curve_with_predicted_tail():
    comp = {"id": "decoder.layers.1.ffn", "kind": "decoder_ffn", "n_weights": 1000,
            # the calibration loss fell at 0.3 and did not move at 0.5: measured damage 0
            "ablation": {"0.3": {"loss_delta": -0.02}, "0.5": {"loss_delta": 0.0}},
            "predicted": {"0.3": {"total": 0.1}, "0.5": {"total": 0.3}, "0.7": {"total": 1.3},
                          "0.9": {"total": 4.0}}}
    other = {"id": "encoder.layers.0.ffn", "kind": "encoder_ffn", "n_weights": 1000,
             "ablation": {"0.3": {"loss_delta": 0.05}, "0.5": {"loss_delta": 0.2}},
             "predicted": {"0.5": {"total": 0.2}, "0.7": {"total": 0.4}}}
    data = {"components": [comp, other], "param_counts": {"linear": 2000, "all": 2000}}
    curves = curves_from_dict(data)
    c = curves.components[0]
    assert c.source == "ablation:loss_delta+predicted:total" and c.known_max == 0.5
    # measured level 0 at 0.5 plus the predicted increase 1.3 - 0.3
    assert float(interpolate_damage(c.points, 0.7)) == pytest.approx(1.0)
    assert float(interpolate_damage(c.points, 0.6)) == pytest.approx(0.5)
    # without the tail the extrapolation from a zero level would call 0.7 free
    bare = curves_from_dict(data, predicted_tail=False).components[0]
    assert float(interpolate_damage(bare.points, 0.7)) == 0.0
    alloc = allocate_plan(curves, 0.6, max_extrapolation=0.2)
    s = {r.id: r.sparsity for r in alloc.rows}
    assert max(s.values()) <= 0.7 + 1e-12  # cap: measured 0.5 + 0.2
    with pytest.raises(AllocationError, match="at most 0.6000"):  # default caps: 0.5 + 0.1
        allocate_plan(curves, 0.65)
    # marginal costs: the first 0.5 of decoder.layers.1.ffn is free, beyond it costs 5 per unit
    # sparsity; encoder.layers.0.ffn costs 0.75 per unit from 0.3 to 0.5 and about 1.5 beyond
    # (power-law tail 0.2 * 1.4**2.71 = 0.50 at 0.7, above the predicted 0.2 + 0.2)
    assert float(interpolate_damage(curves.components[1].points, 0.7)) == pytest.approx(
        0.2 * 1.4 ** (np.log(4) / np.log(5 / 3)))
    assert s == pytest.approx({"decoder.layers.1.ffn": 0.5, "encoder.layers.0.ffn": 0.7}, abs=1e-3)


def test_measured_changes_read_with_one_standard_error():
    deltas = {"a@0.3": [-0.3, 0.1, -0.1, 0.05], "a@0.5": [0.2, 0.4, 0.0, 0.6]}
    comp = {"id": "a", "kind": "encoder_ffn", "n_weights": 100,
            "ablation": {"0.3": {"loss_delta": float(np.mean(deltas["a@0.3"]))},
                         "0.5": {"loss_delta": float(np.mean(deltas["a@0.5"]))}}}
    data = {"components": [comp], "param_counts": {"linear": 100, "all": 100},
            "ablation_per_utterance": {"baseline": [1, 2, 3, 4], "rows": deltas}}
    ucb = dict(curves_from_dict(data).components[0].points)
    for s, key in ((0.3, "a@0.3"), (0.5, "a@0.5")):
        x = np.array(deltas[key])
        assert ucb[s] == pytest.approx(x.mean() + x.std(ddof=1) / np.sqrt(len(x)))
    plain = dict(curves_from_dict(data, uncertainty=0).components[0].points)
    assert plain == pytest.approx({0.3: -0.0625, 0.5: 0.3})
    with pytest.raises(ValueError, match="uncertainty"):
        curves_from_dict(data, uncertainty=-1)
