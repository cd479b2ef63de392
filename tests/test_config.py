"""config.py: PlanEntry / PrunePlan validation, CLI text, YAML round trip."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from asrprune.config import PlanEntry, PlanError, PrunePlan


def test_parse_paper_example():
    plan = PrunePlan.parse("decoder.self_attn=0.5,encoder.layers[-4:]=0.5")
    assert plan.entries == (
        PlanEntry("decoder.self_attn", 0.5),
        PlanEntry("encoder.layers[-4:]", 0.5),
    )
    assert plan.mode == "per_entry" and plan.score == "magnitude"
    assert all(e.scope == "component" and e.pattern is None for e in plan.entries)


def test_parse_scopes_patterns_and_separators():
    plan = PrunePlan.parse(
        " decoder.ffn = 0.3@matrix ; re:fc[12]{1,2}\\.weight=0.2 ;\n encoder.layers[0,2].ffn=2:4 "
    )
    assert plan.entries[0] == PlanEntry("decoder.ffn", 0.3, scope="matrix")
    assert plan.entries[1] == PlanEntry("re:fc[12]{1,2}\\.weight", 0.2)
    e = plan.entries[2]
    assert (e.selector, e.pattern, e.nm, e.sparsity) == ("encoder.layers[0,2].ffn", "2:4", (2, 4), 0.5)


def test_commas_inside_brackets_do_not_split():
    plan = PrunePlan.parse("encoder.layers[0,1]=0.1,re:fc(1|2){1,1}=0.2")
    assert [e.selector for e in plan.entries] == ["encoder.layers[0,1]", "re:fc(1|2){1,1}"]


def test_regex_with_equals_splits_at_last_equals():
    plan = PrunePlan.parse("re:a(?=b)=0.25")
    assert plan.entries[0].selector == "re:a(?=b)" and plan.entries[0].sparsity == 0.25


def test_parse_options():
    plan = PrunePlan.parse("all_linear=0.4", mode="global", name="global 40%")
    assert plan.mode == "global" and plan.name == "global 40%"


@pytest.mark.parametrize("text,fragment", [
    ("", "empty"),
    ("decoder.self_attn", "no '='"),
    ("=0.5", "no selector"),
    ("decoder.self_attn=half", "not a sparsity"),
    ("decoder.self_attn=50", "0.5 for 50%"),
    ("decoder.self_attn=50%", "write 0.5 for 50%"),
    ("decoder.self_attn=-0.1", "[0, 1]"),
    ("decoder.self_attn=nan", "[0, 1]"),
    ("decoder.self_attn=0.5@layer", "scope must be one of"),
    ("decoder.self_attn=4:2", "1 <= N < M"),
    ("decoder.self_attn=2:4:8", "2:4"),
    ("decoder.self_attn=0.5,decoder.self_attn=0.3", "appears twice"),
])
def test_parse_invalid(text, fragment):
    with pytest.raises(ValueError) as exc:
        PrunePlan.parse(text)
    assert isinstance(exc.value, PlanError) and fragment in str(exc.value)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(selector="", sparsity=0.5), "non-empty"),
    (dict(selector="x", sparsity=1.01), "[0, 1]"),
    (dict(selector="x", sparsity=True), "number"),
    (dict(selector="x", sparsity="0.5"), "number"),
    (dict(selector="x", sparsity=None), "missing"),
    (dict(selector="x", sparsity=0.5, scope="global"), "scope"),
    (dict(selector="x", sparsity=0.3, pattern="2:4"), "contradicts"),
    (dict(selector="x", sparsity=None, pattern="2-4"), "2:4"),
])
def test_plan_entry_invalid(kwargs, fragment):
    with pytest.raises(ValueError, match=None) as exc:
        PlanEntry(**kwargs)
    assert fragment in str(exc.value)


def test_plan_entry_pattern_sparsity():
    assert PlanEntry("x", None, pattern="4:8").sparsity == 0.5
    assert PlanEntry("x", 0.75, pattern="1:4").sparsity == 0.75
    assert PlanEntry("x", None, pattern=" 2 : 4 ").pattern == "2:4"


@pytest.mark.parametrize("entries,mode,score,fragment", [
    ((), "per_entry", "magnitude", "at least one entry"),
    ((PlanEntry("a", 0.4), PlanEntry("b", 0.5)), "global", "magnitude", "one sparsity"),
    ((PlanEntry("a", None, pattern="2:4"),), "global", "magnitude", "patterns"),
    ((PlanEntry("a", 0.4),), "uniform", "magnitude", "mode must be one of"),
    ((PlanEntry("a", 0.4),), "per_entry", "l2", "score must be one of"),
    (("a=0.4",), "per_entry", "magnitude", "PlanEntry"),
])
def test_plan_invalid(entries, mode, score, fragment):
    with pytest.raises(ValueError) as exc:
        PrunePlan(entries, mode=mode, score=score)
    assert fragment in str(exc.value)


def test_global_plan_with_shared_sparsity_is_valid():
    plan = PrunePlan((PlanEntry("encoder", 0.4), PlanEntry("decoder", 0.4, scope="matrix")), mode="global")
    assert plan.mode == "global" and plan.selectors == ("encoder", "decoder")


def test_entries_list_becomes_tuple():
    plan = PrunePlan([PlanEntry("a", 0.1)])
    assert isinstance(plan.entries, tuple)


# -- YAML --------------------------------------------------------------------------------------


def test_yaml_round_trip(tmp_path):
    plan = PrunePlan(
        (PlanEntry("decoder.self_attn", 0.5), PlanEntry("late_encoder", 0.3, scope="matrix"),
         PlanEntry("decoder.ffn", None, pattern="2:4")),
        score="taylor", name="mix",
    )
    path = tmp_path / "plan.yaml"
    path.write_text(plan.to_yaml())
    back = PrunePlan.from_yaml(path)
    assert back == plan
    data = yaml.safe_load(path.read_text())
    assert data["entries"][2] == {"selector": "decoder.ffn", "sparsity": 0.5, "scope": "component", "pattern": "2:4"}
    assert PrunePlan.load(path) == plan
    assert PrunePlan.load(str(path)) == plan


def test_yaml_short_mapping_form(tmp_path):
    path = tmp_path / "p.yml"
    path.write_text("mode: per_entry\nentries:\n  decoder.self_attn: 0.5\n  decoder.ffn: '2:4'\n")
    plan = PrunePlan.from_yaml(path)
    assert plan.entries == (PlanEntry("decoder.self_attn", 0.5), PlanEntry("decoder.ffn", None, pattern="2:4"))


@pytest.mark.parametrize("text,fragment", [
    ("entries: []\nextra: 1\n", "unknown key(s) 'extra'"),
    ("mode: global\n", "'entries' is missing"),
    ("entries:\n  - selector: a\n    sparsity: 0.5\n    amount: 0.5\n", "unknown key(s) 'amount'"),
    ("entries:\n  - sparsity: 0.5\n", "'selector' is missing"),
    ("entries:\n  - selector: a\n    sparsity: 5\n", "[0, 1]"),
    ("entries: 3\n", "must be a list"),
    ("- a\n- b\n", "must be a mapping"),
    ("entries: [\n", "not valid YAML"),
    ("", "'entries' is missing"),
])
def test_yaml_invalid(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as exc:
        PrunePlan.from_yaml(path)
    assert fragment in str(exc.value) and str(path) in str(exc.value)


def test_yaml_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        PrunePlan.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError):
        PrunePlan.load(tmp_path / "nope.yaml")


def test_to_dict_and_text():
    plan = PrunePlan.parse("decoder.self_attn=0.5,late_encoder=0.3@matrix,decoder.ffn=2:4")
    assert plan.to_text() == "decoder.self_attn=0.5,late_encoder=0.3@matrix,decoder.ffn=2:4"
    assert PrunePlan.from_dict(plan.to_dict()) == plan
    odd = PrunePlan.parse("re:fc1|fc2=0.123456789")
    assert PrunePlan.parse(odd.to_text()) == odd
    commas = PrunePlan.parse("re:a{1,2}=0.1;encoder=0.2")
    assert ";" in commas.to_text() and PrunePlan.parse(commas.to_text()) == commas


selectors = st.sampled_from(["decoder.self_attn", "late_encoder", "encoder.layers[-4:]", "cross_attn",
                             "decoder.layers[0].ffn.fc1", "re:fc[12]{1,2}", "layer_norms", "biases"])
entries = st.one_of(
    st.builds(lambda s, x, scope: PlanEntry(s, x, scope=scope), selectors,
              st.floats(0, 1, allow_nan=False), st.sampled_from(["component", "matrix"])),
    st.builds(lambda s, nm: PlanEntry(s, None, pattern=nm), selectors, st.sampled_from(["2:4", "4:8", "1:2"])),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(entries, min_size=1, max_size=5, unique_by=lambda e: e.selector))
def test_property_text_and_yaml_round_trip(es):
    plan = PrunePlan(tuple(es))
    assert PrunePlan.parse(plan.to_text()) == plan
    assert PrunePlan.from_dict(yaml.safe_load(plan.to_yaml())) == plan
