"""prune.py: plan -> pruned model, agreement with torch.nn.utils.prune, measured sparsity."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny_whisper
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils import prune as tprune

from asrprune.components import SelectorError, linear_weight_names, select_parameters
from asrprune.config import PlanEntry, PlanError, PrunePlan
from asrprune.prune import dict_scorer, measure_model, prune_model


def randomized(seed: int = 0, **overrides):
    """Tiny Whisper with every parameter random and non-zero (HF initialises biases to 0)."""
    model = make_tiny_whisper(seed=seed, **overrides)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def base_model():
    return randomized()


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def modules_of(model, param_names):
    mods = dict(model.named_modules())
    return [(mods[n.rsplit(".", 1)[0]], n.rsplit(".", 1)[1]) for n in param_names]


def assert_untouched(model, before, selected):
    for n, p in model.named_parameters():
        if n not in selected:
            assert torch.equal(p.detach(), before[n]), n


# -- agreement with torch.nn.utils.prune -------------------------------------------------------


@pytest.mark.parametrize("selector", ["decoder.self_attn", "late_encoder", "cross_attn", "all_linear"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 1.0])
def test_component_scope_equals_global_unstructured(model, selector, sparsity):
    reference = copy.deepcopy(model)
    selected = select_parameters(model, selector)
    tprune.global_unstructured(modules_of(reference, selected), pruning_method=tprune.L1Unstructured,
                               amount=sparsity)
    for mod, name in modules_of(reference, selected):
        tprune.remove(mod, name)
    before = state(model)
    result = prune_model(model, PrunePlan.parse(f"{selector}={sparsity}"))
    ref = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), ref[n].detach()), n
    assert_untouched(model, before, set(selected))
    numel = sum(before[n].numel() for n in selected)
    (entry,) = result.entries
    assert entry.stats.numel == numel
    assert entry.stats.zeros == round(sparsity * numel)
    assert entry.measured_sparsity == round(sparsity * numel) / numel


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.77])
def test_matrix_scope_equals_l1_unstructured(model, sparsity):
    reference = copy.deepcopy(model)
    selected = select_parameters(model, "decoder.ffn+encoder.layers[0]")
    for mod, name in modules_of(reference, selected):
        tprune.l1_unstructured(mod, name, amount=sparsity)
        tprune.remove(mod, name)
    result = prune_model(model, PrunePlan.parse(f"decoder.ffn+encoder.layers[0]={sparsity}@matrix"))
    ref = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), ref[n].detach()), n
        if n in selected:
            assert int((p == 0).sum()) == round(sparsity * p.numel())
    assert result.entries[0].scope == "matrix"


def test_global_mode_pools_over_all_entries(model):
    reference = copy.deepcopy(model)
    selected = select_parameters(model, "decoder.self_attn") + select_parameters(model, "encoder.ffn")
    tprune.global_unstructured(modules_of(reference, selected), pruning_method=tprune.L1Unstructured, amount=0.4)
    for mod, name in modules_of(reference, selected):
        tprune.remove(mod, name)
    plan = PrunePlan.parse("decoder.self_attn=0.4,encoder.ffn=0.4", mode="global")
    result = prune_model(model, plan)
    ref = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), ref[n].detach()), n
    total = sum(e.stats.numel for e in result.entries)
    assert sum(e.stats.zeros for e in result.entries) == round(0.4 * total)
    assert all(e.scope == "global" for e in result.entries)


def test_global_magnitude_40_equals_one_entry_all_linear(base_model):
    a, b = copy.deepcopy(base_model), copy.deepcopy(base_model)
    prune_model(a, PrunePlan.parse("all_linear=0.4"))
    prune_model(b, PrunePlan.parse("encoder=0.4,decoder=0.4", mode="global"))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


# -- measurement -------------------------------------------------------------------------------


def test_measured_sparsity_and_counts(model):
    params = {n: p.numel() for n, p in model.named_parameters()}
    plan = PrunePlan.parse("decoder.self_attn=0.5,late_encoder=0.5,decoder_ffn=0.3")
    result = prune_model(model, plan)
    sa, le, ffn = (select_parameters(model, s) for s in ("decoder.self_attn", "late_encoder", "decoder_ffn"))
    zeros = sum(round(s * sum(params[n] for n in g)) for s, g in ((0.5, sa), (0.5, le), (0.3, ffn)))
    total = sum(params.values())
    linear = sum(params[n] for n in linear_weight_names(model))
    assert total == model.num_parameters()
    assert result.model.all_parameters.numel == total
    assert result.model.all_parameters.nonzero == total - zeros
    assert result.overall_sparsity == pytest.approx(zeros / total)
    assert result.model.linear_weights.numel == linear
    assert result.linear_sparsity == pytest.approx(zeros / linear)
    assert [e.measured_sparsity for e in result.entries] == pytest.approx([0.5, 0.5, 0.3], abs=1e-3)
    kinds = result.model.kinds
    assert kinds["decoder_self_attn"]["weights"].sparsity == pytest.approx(0.5, abs=1e-3)
    assert kinds["decoder_self_attn"]["biases"].zeros == 0
    assert kinds["decoder_cross_attn"]["weights"].zeros == 0  # cross-attention untouched
    assert result.before.all_parameters.zeros == 0
    d = result.to_dict()
    json.dumps(d)
    assert d["overall"]["all_parameters"]["sparsity"] == result.overall_sparsity
    assert d["overall"]["linear_weights"]["nonzero"] == linear - zeros
    assert d["plan_text"] == plan.to_text() and d["score"] == "magnitude"
    assert len(d["components"]) == len(result.model.components)


def test_measure_model_of_fresh_model(base_model):
    m = measure_model(base_model)
    assert m.all_parameters.zeros == 0 and m.linear_weights.sparsity == 0.0
    assert m.weights.numel + m.biases.numel == m.all_parameters.numel


def test_sparsity_zero_changes_nothing_and_one_zeroes_all(model):
    before = state(model)
    prune_model(model, PrunePlan.parse("all_linear=0"))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    result = prune_model(model, PrunePlan.parse("decoder.ffn=1"))
    assert result.entries[0].measured_sparsity == 1.0


def test_biases_layer_norms_embeddings_conv_only_explicit(model):
    before = state(model)
    plan = PrunePlan.parse("biases=0.1@matrix,layer_norms=0.5,conv=0.2,positional_embeddings=0.3")
    result = prune_model(model, plan)
    chosen = {n for e in result.entries for n in e.parameters}
    assert_untouched(model, before, chosen)
    assert {n for n in chosen if n.endswith(".bias")} == {n for n in before if n.endswith(".bias")}
    for n in chosen:
        if n.endswith(".bias"):
            assert int((dict(model.named_parameters())[n] == 0).sum()) == round(0.1 * before[n].numel())


# -- N:M ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern(model, pattern):
    n, m = map(int, pattern.split(":"))
    before = state(model)
    result = prune_model(model, PrunePlan.parse(f"decoder.ffn+encoder.conv={pattern}"))
    params = dict(model.named_parameters())
    for name in result.entries[0].parameters:
        w = params[name].detach()
        groups = (w.reshape(w.shape[0], -1) != 0).reshape(-1, m)
        assert (groups.sum(dim=1) == n).all(), name
        kept = w != 0
        assert torch.equal(w[kept], before[name][kept])
    assert result.entries[0].measured_sparsity == 1 - n / m
    assert_untouched(model, before, set(result.entries[0].parameters))


def test_nm_pattern_indivisible_names_parameter():
    model = randomized(encoder_ffn_dim=30, decoder_ffn_dim=30)
    with pytest.raises(ValueError, match="fc2.weight.*divisible by 4"):
        prune_model(model, PrunePlan.parse("decoder.ffn=2:4"))


# -- plans that must fail ----------------------------------------------------------------------


@pytest.mark.parametrize("text,fragment", [
    ("decoder.self_attn=0.5,decoder.layers[0]=0.3", "both select model.decoder.layers.0.self_attn"),
    ("all_linear=0.4,late_encoder=0.5", "overlapping"),
    ("biases=0.1,decoder.self_attn.bias=0.2", "overlapping"),
    ("embeddings=0.1,proj_out=0.2", "embed_tokens.weight"),
])
def test_overlapping_entries_rejected(model, text, fragment):
    before = state(model)
    with pytest.raises(PlanError) as exc:
        prune_model(model, PrunePlan.parse(text))
    assert fragment in str(exc.value)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing pruned


def test_unmatched_selector_rejected_before_pruning(model):
    before = state(model)
    with pytest.raises(SelectorError, match="out of range"):
        prune_model(model, PrunePlan.parse("decoder.self_attn=0.5,decoder.layers[9]=0.5"))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# -- tied embeddings ---------------------------------------------------------------------------


def test_tied_embeddings_pruned_together_and_reported(model):
    result = prune_model(model, PrunePlan.parse("proj_out=0.25"))
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    assert torch.equal(model.proj_out.weight == 0, model.model.decoder.embed_tokens.weight == 0)
    assert result.entries[0].parameters == ("model.decoder.embed_tokens.weight",)
    assert any("proj_out.weight" in n and "tied" in n for n in result.notes)
    assert "tied" in json.dumps(result.to_dict()["notes"])


# -- other scores ------------------------------------------------------------------------------


def test_dict_scorer_changes_ranking(model):
    names = select_parameters(model, "decoder.self_attn")
    params = dict(model.named_parameters())
    # "inverse magnitude": prunes the largest weights, the opposite of magnitude pruning
    scores = {n: -params[n].detach().abs() for n in names}
    originals = {n: params[n].detach().clone() for n in names}
    result = prune_model(model, PrunePlan.parse("decoder.self_attn=0.5", score="taylor"),
                         scorer=dict_scorer(scores, name="taylor"))
    assert result.score == "taylor"
    pruned = torch.cat([originals[n][params[n] == 0].abs() for n in names])
    kept = torch.cat([originals[n][params[n] != 0].abs() for n in names])
    assert pruned.min() >= kept.max()


def test_scorer_errors(model):
    with pytest.raises(ValueError, match="no scorer"):
        prune_model(model, PrunePlan.parse("decoder.self_attn=0.5", score="obd"))
    with pytest.raises(ValueError, match="no entry for parameter"):
        prune_model(model, PrunePlan.parse("decoder.self_attn=0.5"), scorer=dict_scorer({}))
    with pytest.raises(ValueError, match="shape"):
        prune_model(model, PrunePlan.parse("decoder.ffn=0.5"), scorer=lambda n, p: torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        prune_model(model, PrunePlan.parse("decoder.ffn=0.5"), scorer=lambda n, p: p * float("nan"))


def test_pruned_model_still_runs(model):
    prune_model(model, PrunePlan.parse("all_linear=0.5"))
    features = torch.randn(1, 80, 60)
    with torch.no_grad():
        out = model(input_features=features, decoder_input_ids=torch.tensor([[85, 1, 2]]))
    assert torch.isfinite(out.logits).all()


def test_already_pruned_selection_is_noted(model):
    prune_model(model, PrunePlan.parse("decoder.ffn=0.5"))
    result = prune_model(model, PrunePlan.parse("decoder.ffn=0.3"))
    assert result.entries[0].measured_sparsity == pytest.approx(0.5, abs=1e-3)
    assert any("held" in n and "zeros" in n for n in result.notes)


# -- property: exact counts, unselected parameters bit-identical --------------------------------

SELECTORS = ["decoder.self_attn", "late_encoder", "cross_attn", "encoder.layers[0].ffn", "decoder.layers[1].fc2",
             "conv", "layer_norms", "biases", "decoder.embed_positions", "decoder.layers[0].encoder_attn.q_proj"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chosen=st.lists(st.sampled_from(SELECTORS), min_size=1, max_size=3, unique=True),
    data=st.data(),
)
def test_property_random_plans(base_model, chosen, data):
    model = copy.deepcopy(base_model)
    entries = []
    for s in chosen:
        if data.draw(st.booleans(), label="pattern") and s in ("decoder.self_attn", "cross_attn", "late_encoder"):
            entries.append(PlanEntry(s, None, pattern="2:4"))
        else:
            entries.append(PlanEntry(s, data.draw(st.floats(0, 1, allow_nan=False), label=s),
                                     scope=data.draw(st.sampled_from(["component", "matrix"]), label="scope")))
    plan = PrunePlan(tuple(entries))
    try:
        selections = [set(select_parameters(model, e.selector)) for e in entries]
    except SelectorError:
        raise
    overlapping = any(a & b for i, a in enumerate(selections) for b in selections[i + 1:])
    before = state(model)
    if overlapping:
        with pytest.raises(PlanError):
            prune_model(model, plan)
        return
    result = prune_model(model, plan)
    assert_untouched(model, before, set().union(*selections))
    params = dict(model.named_parameters())
    for e, er in zip(entries, result.entries):
        numels = [params[n].numel() for n in er.parameters]
        if e.pattern is not None:
            expected = sum(numels) // 2
        elif e.scope == "matrix":
            expected = sum(round(e.sparsity * k) for k in numels)
        else:
            expected = round(e.sparsity * sum(numels))
        assert er.stats.zeros == expected
        for n in er.parameters:  # kept weights are unchanged
            kept = params[n] != 0
            assert torch.equal(params[n][kept], before[n][kept])


# -- real tiny.en ------------------------------------------------------------------------------


@pytest.mark.integration
def test_tiny_en_paper_configurations(tiny_en):
    model = copy.deepcopy(tiny_en[0])
    result = prune_model(model, PrunePlan.parse("decoder.self_attn=0.5,late_encoder=0.5"))
    sa, le = result.entries
    assert sa.stats.numel == 4 * 4 * 384 * 384 and sa.stats.zeros == sa.stats.numel // 2
    assert le.stats.numel == 2 * (4 * 384 * 384 + 2 * 384 * 1536)
    assert result.model.all_parameters.numel == 37_760_256
    assert result.model.linear_weights.numel == 16_515_072
    # the checkpoint holds a few exact zeros already (20 in its linear weights)
    zeros_elsewhere = result.before.linear_weights.zeros - sa.stats_before.zeros - le.stats_before.zeros
    assert result.model.linear_weights.zeros == sa.stats.zeros + le.stats.zeros + zeros_elsewhere
    assert result.linear_sparsity == pytest.approx(0.5 * (sa.stats.numel + le.stats.numel) / 16_515_072, abs=2e-6)
