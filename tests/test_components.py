"""components.py: Whisper taxonomy, selector language, named groups, errors."""

from __future__ import annotations

import re

import pytest
from conftest import make_tiny_whisper

from asrprune.components import (
    GROUPS,
    Component,
    ComponentKind,
    SelectorError,
    component_table,
    group_table,
    layer_thirds,
    linear_weight_names,
    list_components,
    select_components,
    select_parameters,
    tied_parameters,
)

K = ComponentKind


def names(model, pattern: str) -> list[str]:
    """Independent oracle: parameter names fully matching a regex, in model order."""
    rx = re.compile(pattern)
    return [n for n, _ in model.named_parameters() if rx.fullmatch(n)]


def layers_of(param_names) -> set[int]:
    return {int(m.group(1)) for n in param_names if (m := re.search(r"layers\.(\d+)\.", n))}


@pytest.fixture(scope="module")
def tw():
    return make_tiny_whisper()


@pytest.fixture(scope="module", params=[(4, 4), (6, 6), (12, 12)], ids=["tiny-4", "base-6", "small-12"])
def sized(request):
    """Random Whispers with the layer counts of tiny (4), base (6) and small (12), d_model 16."""
    enc, dec = request.param
    return enc, dec, make_tiny_whisper(encoder_layers=enc, decoder_layers=dec)


# -- taxonomy ----------------------------------------------------------------------------------


def test_every_parameter_in_exactly_one_component(tw):
    comps = list_components(tw)
    owned = [p for c in comps for p in c.params]
    assert sorted(owned) == sorted(n for n, _ in tw.named_parameters())
    assert len(owned) == len(set(owned))
    assert all(isinstance(c, Component) for c in comps)
    ids = {n for n, _ in tw.named_modules()}
    assert all(c.id in ids for c in comps)


def test_kind_counts_tiny(tw):
    counts: dict[ComponentKind, int] = {}
    for c in list_components(tw):
        counts[c.kind] = counts.get(c.kind, 0) + 1
    assert counts == {
        K.ENCODER_CONV: 2,
        K.ENCODER_POS_EMBED: 1,
        K.ENCODER_SELF_ATTN: 8,  # 4 projections x 2 layers
        K.ENCODER_FFN: 4,
        K.ENCODER_LAYER_NORM: 5,  # 2 per layer + final
        K.DECODER_TOKEN_EMBED: 1,
        K.DECODER_POS_EMBED: 1,
        K.DECODER_SELF_ATTN: 8,
        K.DECODER_CROSS_ATTN: 8,
        K.DECODER_FFN: 4,
        K.DECODER_LAYER_NORM: 7,  # 3 per layer + final
    }


def test_cross_attention_is_decoder_never_encoder(tw):
    for c in list_components(tw):
        if "encoder_attn" in c.id:
            assert c.side == "decoder"
            assert c.kind in (K.DECODER_CROSS_ATTN, K.DECODER_LAYER_NORM)
        if c.kind.value.startswith("encoder"):
            assert ".encoder." in f".{c.id}." and "encoder_attn" not in c.id


def test_component_fields(tw):
    by_id = {c.id: c for c in list_components(tw)}
    q = by_id["model.decoder.layers.1.encoder_attn.q_proj"]
    assert (q.kind, q.side, q.layer, q.part, q.category) == (K.DECODER_CROSS_ATTN, "decoder", 1, ("encoder_attn", "q_proj"), "linear")
    assert q.params == ("model.decoder.layers.1.encoder_attn.q_proj.weight", "model.decoder.layers.1.encoder_attn.q_proj.bias")
    k = by_id["model.encoder.layers.0.self_attn.k_proj"]
    assert k.params == ("model.encoder.layers.0.self_attn.k_proj.weight",)  # Whisper's k_proj has no bias
    ln = by_id["model.encoder.layer_norm"]
    assert (ln.kind, ln.layer, ln.category) == (K.ENCODER_LAYER_NORM, None, "norm")
    conv = by_id["model.encoder.conv2"]
    assert (conv.kind, conv.category) == (K.ENCODER_CONV, "conv")
    assert str(K.DECODER_FFN) == "decoder_ffn"


def test_tied_embeddings(tw):
    assert tw.proj_out.weight is tw.model.decoder.embed_tokens.weight
    assert tied_parameters(tw) == {"model.decoder.embed_tokens.weight": ("proj_out.weight",)}
    emb = [c for c in list_components(tw) if c.kind == K.DECODER_TOKEN_EMBED]
    assert len(emb) == 1 and emb[0].tied_with == ("proj_out.weight",)
    assert not any(c.kind == K.OUTPUT_PROJ for c in list_components(tw))
    assert select_parameters(tw, "proj_out") == ["model.decoder.embed_tokens.weight"]
    assert select_parameters(tw, "re:^proj_out") == ["model.decoder.embed_tokens.weight"]
    row = next(r for r in component_table(tw) if r["kind"] == "decoder_token_embed")
    assert "proj_out.weight" in row["note"] and "prunes the other" in row["note"]


def test_untied_output_projection():
    model = make_tiny_whisper(tie_word_embeddings=False)
    assert model.proj_out.weight is not model.model.decoder.embed_tokens.weight
    out = [c for c in list_components(model) if c.kind == K.OUTPUT_PROJ]
    assert len(out) == 1 and out[0].params == ("proj_out.weight",) and out[0].side == "model"
    assert select_parameters(model, "proj_out") == ["proj_out.weight"]
    assert "proj_out.weight" not in select_parameters(model, "all_linear")
    assert "proj_out.weight" not in select_parameters(model, "embeddings")


def test_whisper_model_without_lm_head(tw):
    base = tw.model  # WhisperModel: names start with encoder./decoder.
    got = select_parameters(base, "decoder.self_attn")
    assert got == names(base, r"decoder\.layers\.\d+\.self_attn\.[qkvo]\w*_proj\.weight")
    assert select_parameters(base, "model.decoder.self_attn") == got


def test_component_table_counts(tw):
    rows = component_table(tw)
    modules = dict(tw.named_modules())
    for r in rows:
        mod = modules[r["id"]]
        w = mod.weight.numel() if getattr(mod, "weight", None) is not None else 0
        b = mod.bias.numel() if getattr(mod, "bias", None) is not None else 0
        assert (r["weights"], r["biases"]) == (w, b)
        assert set(r) >= {"id", "kind", "layer", "weights", "biases", "nonzero", "sparsity"}
    assert sum(r["weights"] + r["biases"] for r in rows) == tw.num_parameters()


def test_linear_weight_names(tw):
    expected = names(tw, r"model\.(encoder|decoder)\.layers\.\d+\.((self_attn|encoder_attn)\.[qkvo]\w*_proj|fc[12])\.weight")
    assert linear_weight_names(tw) == expected
    assert len(expected) == 2 * 6 + 2 * 10


# -- selectors ---------------------------------------------------------------------------------

D, E = r"model\.decoder", r"model\.encoder"
PROJ = r"[qkvo]\w*_proj"
CASES = {
    "decoder.self_attn": rf"{D}\.layers\.\d+\.self_attn\.{PROJ}\.weight",
    "decoder_self_attn": rf"{D}\.layers\.\d+\.self_attn\.{PROJ}\.weight",
    "encoder.self_attn": rf"{E}\.layers\.\d+\.self_attn\.{PROJ}\.weight",
    "encoder_ffn": rf"{E}\.layers\.\d+\.fc[12]\.weight",
    "decoder.ffn": rf"{D}\.layers\.\d+\.fc[12]\.weight",
    "decoder_ffn": rf"{D}\.layers\.\d+\.fc[12]\.weight",
    "decoder.mlp": rf"{D}\.layers\.\d+\.fc[12]\.weight",
    "cross_attn": rf"{D}\.layers\.\d+\.encoder_attn\.{PROJ}\.weight",
    "decoder.cross_attn": rf"{D}\.layers\.\d+\.encoder_attn\.{PROJ}\.weight",
    "decoder.layers[1].encoder_attn": rf"{D}\.layers\.1\.encoder_attn\.{PROJ}\.weight",
    "decoder.layers[0].ffn.fc1": rf"{D}\.layers\.0\.fc1\.weight",
    "decoder.layers.0.fc1": rf"{D}\.layers\.0\.fc1\.weight",
    "model.decoder.layers.0.fc1.weight": rf"{D}\.layers\.0\.fc1\.weight",
    "decoder.layers[0].fc1.bias": rf"{D}\.layers\.0\.fc1\.bias",
    "decoder.layers[0]": rf"{D}\.layers\.0\.((self_attn|encoder_attn)\.{PROJ}|fc[12])\.weight",
    "decoder.layers": rf"{D}\.layers\.\d+\.((self_attn|encoder_attn)\.{PROJ}|fc[12])\.weight",
    "decoder.attn": rf"{D}\.layers\.\d+\.(self_attn|encoder_attn)\.{PROJ}\.weight",
    "decoder.self_attn.q": rf"{D}\.layers\.\d+\.self_attn\.q_proj\.weight",
    "encoder.layers[-1].self_attn.out_proj": rf"{E}\.layers\.1\.self_attn\.out_proj\.weight",
    "encoder.layers[0,1].fc2": rf"{E}\.layers\.[01]\.fc2\.weight",
    "encoder": rf"{E}\.layers\.\d+\.(self_attn\.{PROJ}|fc[12])\.weight",
    "all_linear": rf"model\.(encoder|decoder)\.layers\.\d+\.((self_attn|encoder_attn)\.{PROJ}|fc[12])\.weight",
    "all_linear.bias": rf"model\.(encoder|decoder)\.layers\.\d+\.((self_attn|encoder_attn)\.{PROJ}|fc[12])\.bias",
    "decoder.self_attn.bias": rf"{D}\.layers\.\d+\.self_attn\.{PROJ}\.bias",
    "encoder.conv": rf"{E}\.conv[12]\.weight",
    "conv": rf"{E}\.conv[12]\.weight",
    "encoder.conv1.bias": rf"{E}\.conv1\.bias",
    "layer_norms": r"model\.(encoder|decoder)\.(layers\.\d+\.\w+_)?layer_norm\.weight",
    "layer_norms.bias": r"model\.(encoder|decoder)\.(layers\.\d+\.\w+_)?layer_norm\.bias",
    "decoder.layers.layer_norms": rf"{D}\.layers\.\d+\.\w+_layer_norm\.weight",
    "encoder.layer_norm": rf"{E}\.layer_norm\.weight",
    "decoder.layers[1].encoder_attn_layer_norm": rf"{D}\.layers\.1\.encoder_attn_layer_norm\.weight",
    "biases": r".*\.bias",
    "decoder.biases": rf"{D}\..*\.bias",
    "embeddings": r"model\.(encoder\.embed_positions|decoder\.embed_tokens|decoder\.embed_positions)\.weight",
    "token_embeddings": rf"{D}\.embed_tokens\.weight",
    "decoder.embed_tokens": rf"{D}\.embed_tokens\.weight",
    "positional_embeddings": r"model\.(encoder|decoder)\.embed_positions\.weight",
    "re:fc1": r".*fc1\.(weight|bias)",
    r"re:encoder_attn\.q_proj\.bias$": rf"{D}\.layers\.\d+\.encoder_attn\.q_proj\.bias",
    "decoder.self_attn+cross_attn": rf"{D}\.layers\.\d+\.(self_attn|encoder_attn)\.{PROJ}\.weight",
    "late_encoder.ffn+conv": rf"({E}\.layers\.1\.fc[12]|{E}\.conv[12])\.weight",
}


@pytest.mark.parametrize("selector", list(CASES))
def test_selector_matches_oracle(tw, selector):
    assert select_parameters(tw, selector) == names(tw, CASES[selector])


def test_default_rule_linear_weights_only(tw):
    got = select_parameters(tw, "decoder.layers[0]")
    assert len(got) == 10 and all(n.endswith(".weight") for n in got)
    assert not any("layer_norm" in n or "embed" in n for n in got)
    for s in ("encoder", "decoder", "all_linear", "late_encoder", "early_decoder"):
        assert not any(n.endswith(".bias") or "norm" in n or "conv" in n or "embed" in n
                       for n in select_parameters(tw, s))


def test_select_components(tw):
    comps = select_components(tw, "decoder.layers[0].ffn")
    assert [c.id for c in comps] == ["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"]


# -- named groups on tiny / base / small layer counts ------------------------------------------


@pytest.mark.parametrize("n,early,middle,late", [
    (2, [0], [], [1]), (4, [0, 1], [], [2, 3]), (6, [0, 1], [2, 3], [4, 5]),
    (12, [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]), (32, list(range(11)), list(range(11, 21)), list(range(21, 32))),
])
def test_layer_thirds(n, early, middle, late):
    assert [list(r) for r in layer_thirds(n)] == [early, middle, late]


def test_late_encoder_and_early_decoder_sizes(sized):
    enc, dec, model = sized
    k_enc, k_dec = {4: 2, 6: 2, 12: 4}[enc], {4: 2, 6: 2, 12: 4}[dec]
    late = select_parameters(model, "late_encoder")
    assert layers_of(late) == set(range(enc - k_enc, enc))
    assert len(late) == 6 * k_enc  # q, k, v, out, fc1, fc2 per layer
    assert all(".encoder." in n and n.endswith(".weight") for n in late)
    early = select_parameters(model, "early_decoder")
    assert layers_of(early) == set(range(k_dec)) and len(early) == 10 * k_dec
    if enc == 12:  # the paper's "encoder layers 9-12" of whisper small
        assert late == select_parameters(model, "encoder.layers[-4:]") == select_parameters(model, "encoder.layers[8:12]")
        ffn = select_parameters(model, "encoder.layers[8:12].ffn")
        assert ffn == names(model, r"model\.encoder\.layers\.(8|9|10|11)\.fc[12]\.weight")
    assert select_parameters(model, "late_encoder.ffn") == [n for n in late if ".fc" in n]


def test_group_table(sized):
    enc, _, model = sized
    rows = {r["group"]: r for r in group_table(model)}
    assert set(rows) == set(GROUPS)
    params = dict(model.named_parameters())
    for g, r in rows.items():
        if r["parameters"]:
            sel = select_parameters(model, g)
            assert r["parameters"] == len(sel) and r["numel"] == sum(params[n].numel() for n in sel)
    assert rows["late_encoder"]["layers"] == list(layer_thirds(enc)[2])
    assert (rows["middle_encoder"]["parameters"] == 0) == (enc == 4)


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("selector,fragment", [
    ("", "non-empty"),
    ("   ", "non-empty"),
    ("nonsense", "not a group"),
    ("decoder.layers[7]", "out of range"),
    ("decoder.layers[-3]", "out of range"),
    ("encoder.layers[5:9]", "empty"),
    ("encoder.layers[a]", "bad layer index"),
    ("encoder.layers[::0]", "bad layer index"),
    ("encoder.cross_attn", "belongs to the decoder"),
    ("encoder.encoder_attn", "no 'encoder_attn'"),
    ("decoder.conv", "no 'conv'"),
    ("decoder.ffn.q_proj", "no 'q_proj'"),
    ("decoder.feedforward", "unknown part"),
    ("decoder.weight.ffn", "must be the last"),
    ("decoder..ffn", "empty part"),
    ("decoder.ffn[0]", "only 'layers' takes brackets"),
    ("middle_encoder", "empty"),  # 2-layer encoder: no middle third
    ("re:(", "invalid regular expression"),
    ("re:no_such_parameter", "matches no parameter"),
    ("decoder.self_attn+", "empty alternative"),
    ("decoder.self_attn+nonsense", "not a group"),
    ("biases.fc1", "nothing can follow"),
    ("decoder.layers[0].layer_norm", "no 'layer_norm'"),
])
def test_invalid_selectors(tw, selector, fragment):
    with pytest.raises(ValueError) as exc:
        select_parameters(tw, selector)
    assert isinstance(exc.value, SelectorError)
    msg = str(exc.value)
    assert fragment in msg
    if selector.strip():
        # lists what exists
        assert "late_encoder" in msg and "encoder: 2 layers" in msg and "self_attn.q_proj" in msg


def test_not_a_whisper_model():
    import torch

    with pytest.raises(ValueError, match="Whisper"):
        list_components(torch.nn.Linear(2, 2))


# -- CLI ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_cli_components_tiny_en(capsys):
    import json

    from asrprune.cli import main

    assert main(["components", "tiny.en", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["all_parameters"]["numel"] == 37_760_256
    assert data["linear_weights"]["numel"] == 16_515_072  # 8 layers x (4 x 384^2 + 2 x 384 x 1536) + 4 x 4 x 384^2 cross
    rows = {r["id"]: r for r in data["components"]}
    assert rows["model.decoder.layers.3.encoder_attn.q_proj"]["kind"] == "decoder_cross_attn"
    assert rows["model.decoder.layers.3.fc1"]["weights"] == 1536 * 384
    assert "prunes the other" in rows["model.decoder.embed_tokens"]["note"]
    groups = {g["group"]: g for g in data["groups"]}
    assert groups["late_encoder"]["layers"] == [2, 3] and groups["late_encoder"]["parameters"] == 12

    assert main(["components", "tiny.en", "--select", "late_encoder.ffn"]) == 0
    out = capsys.readouterr().out
    assert "encoder.layers.2.fc1" in out and "encoder.layers.1.fc1" not in out
    assert "selects 4 parameter tensors" in out

    assert main(["components", "tiny.en"]) == 0
    out = capsys.readouterr().out
    assert "decoder_cross_attn" in out and "late_encoder" in out and "linear weights" in out

    assert main(["components", "tiny.en", "--select", "encoder.cross_attn"]) == 2
    err = capsys.readouterr().err
    assert "belongs to the decoder" in err and "groups:" in err
