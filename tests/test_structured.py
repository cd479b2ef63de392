"""Structured pruning: removing a unit equals zeroing it in the dense model; shapes, configs and
loading; CTranslate2 where it can express the shapes; bad plans; alignment heads."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from asrprune.config import PlanError, PrunePlan
from asrprune.export import export_ctranslate2, save_pruned
from asrprune.models import load_model, model_fingerprint
from asrprune.shapes import STRUCTURE_KEY
from asrprune.structured import prune_structured, remap_alignment_heads
from conftest import make_tiny_whisper
from test_criteria import _examples


def _logits(model, ex) -> torch.Tensor:
    with torch.no_grad():
        return model(input_features=ex.input_features, decoder_input_ids=ex.decoder_input_ids).logits


def _removed(result) -> list[dict]:
    return result.to_dict()["structure"]["removed"]


def test_removing_neurons_equals_zeroing_them(tiny_whisper):
    dense = tiny_whisper
    pruned = copy.deepcopy(dense)
    res = prune_structured(pruned, PrunePlan.parse("encoder.layers[1].ffn=0.25@neurons,decoder.ffn=0.5@neurons"))
    zeroed = copy.deepcopy(dense)
    for r in _removed(res):
        side, _, layer = r["where"].split(".")[:3]
        mod = getattr(zeroed.model, side).layers[int(layer)]
        idx = torch.tensor(r["removed"])
        assert len(idx) == round((0.25 if side == "encoder" else 0.5) * 32)
        with torch.no_grad():
            mod.fc1.weight[idx] = 0
            mod.fc1.bias[idx] = 0  # gelu(0) = 0: the neuron contributes nothing
    ex = _examples(dense, n=1)[0]
    torch.testing.assert_close(_logits(pruned, ex), _logits(zeroed, ex), rtol=1e-5, atol=1e-5)
    assert pruned.model.encoder.layers[1].fc1.out_features == 24 and pruned.model.encoder.layers[0].fc1.out_features == 32
    assert pruned.model.decoder.layers[0].fc2.in_features == 16


@pytest.mark.parametrize("attn", ["self_attn", "encoder_attn"])
def test_removing_heads_equals_zeroing_them(tiny_whisper, attn):
    dense = tiny_whisper
    pruned = copy.deepcopy(dense)
    sel = "decoder.self_attn" if attn == "self_attn" else "cross_attn"
    res = prune_structured(pruned, PrunePlan.parse(f"{sel}=0.5@heads,encoder.layers[0].self_attn=0.25@heads"))
    zeroed = copy.deepcopy(dense)
    hd = 16 // 4
    for r in _removed(res):
        side, _, layer, which = r["where"].split(".")
        a = getattr(getattr(zeroed.model, side).layers[int(layer)], which)
        for h in r["removed"]:
            with torch.no_grad():
                a.v_proj.weight[h * hd:(h + 1) * hd] = 0
                a.v_proj.bias[h * hd:(h + 1) * hd] = 0
    ex = _examples(dense, n=1)[0]
    torch.testing.assert_close(_logits(pruned, ex), _logits(zeroed, ex), rtol=1e-5, atol=1e-5)
    kept = getattr(pruned.model.decoder.layers[0], attn)
    assert kept.num_heads == 2 and kept.q_proj.weight.shape == (8, 16) and kept.out_proj.weight.shape == (16, 8)
    assert pruned.model.encoder.layers[0].self_attn.num_heads == 3  # round(0.25 * 4) = 1 removed


def test_dropping_a_layer_equals_skipping_it(tiny_whisper):
    dense = tiny_whisper
    pruned = copy.deepcopy(dense)
    res = prune_structured(pruned, PrunePlan.parse("decoder.layers[0]=drop,encoder.layers[1]=drop"))
    assert pruned.config.decoder_layers == 1 and pruned.config.encoder_layers == 1
    skipped = copy.deepcopy(dense)
    hooks = [layer.register_forward_hook(lambda m, a, o: (a[0], *o[1:]) if isinstance(o, tuple) else a[0])
             for layer in (skipped.model.decoder.layers[0], skipped.model.encoder.layers[1])]
    ex = _examples(dense, n=1)[0]
    torch.testing.assert_close(_logits(pruned, ex), _logits(skipped, ex), rtol=1e-5, atol=1e-5)
    for h in hooks:
        h.remove()
    st = res.to_dict()["structure"]
    assert st["kept_layers"] == {"encoder": [0], "decoder": [1]}
    assert st["params_after"] == sum(p.numel() for p in {id(p): p for p in pruned.parameters()}.values())
    # generation with the cache on the smaller decoder
    with torch.no_grad():
        out = pruned.generate(ex.input_features, max_new_tokens=3, decoder_start_token_id=85)
    assert out.shape[1] >= 2


def test_counts_and_rounding(tiny_whisper):
    model = copy.deepcopy(tiny_whisper)
    res = prune_structured(model, PrunePlan.parse("decoder.self_attn=0.375@heads"))  # 1.5 of 4 heads -> 2
    assert all(len(r["removed"]) == 2 for r in _removed(res))
    model = copy.deepcopy(tiny_whisper)
    res = prune_structured(model, PrunePlan.parse("decoder.layers=0.5@layers"))
    assert [len(r["removed"]) for r in _removed(res)] == [1]


@pytest.mark.parametrize("score", ["wanda", "fluctuation", "loss"])
def test_calibrated_importance_needs_and_uses_calibration(tiny_whisper, score):
    model = copy.deepcopy(tiny_whisper)
    plan = PrunePlan.parse("encoder.ffn=0.5@neurons,decoder.self_attn=0.5@heads,decoder.layers=0.5@layers", score=score)
    with pytest.raises(ValueError, match="needs calibration data"):
        prune_structured(copy.deepcopy(model), plan)
    res = prune_structured(model, plan, calibration=_examples(tiny_whisper, n=3))
    assert res.to_dict()["structure"]["calibration"]["n_utterances"] == 3
    assert model.config.decoder_layers == 1


def test_loss_importance_ranks_heads_by_measured_loss(tiny_whisper):
    """The head removed under score loss is the one whose zeroing raises the calibration loss least."""
    from asrprune.calibration import teacher_forced_loss

    examples = _examples(tiny_whisper, n=3)
    deltas = []
    for h in range(4):
        m = copy.deepcopy(tiny_whisper)
        with torch.no_grad():
            m.model.decoder.layers[1].self_attn.v_proj.weight[h * 4:(h + 1) * 4] = 0
            m.model.decoder.layers[1].self_attn.v_proj.bias[h * 4:(h + 1) * 4] = 0
            deltas.append(sum(float(teacher_forced_loss(m, e)) for e in examples))
    model = copy.deepcopy(tiny_whisper)
    res = prune_structured(model, PrunePlan.parse("decoder.layers[1].self_attn=0.25@heads", score="loss"),
                           calibration=examples)
    assert _removed(res)[0]["removed"] == [min(range(4), key=deltas.__getitem__)]


def test_bias_repair_restores_the_mean_contribution(tiny_whisper):
    """With FLAP's compensation, the FFN output's mean over the calibration tokens is unchanged."""
    examples = _examples(tiny_whisper, n=3)
    outs = {}
    for repair in ("none", "bias"):
        model = copy.deepcopy(tiny_whisper)
        prune_structured(model, PrunePlan.parse("encoder.layers[0].ffn=0.5@neurons", score="fluctuation"),
                         calibration=examples, repair=repair, options=None)
        outs[repair] = model
    from asrprune.calibration import CalibrationOptions

    def ffn_mean(model):
        layer = model.model.encoder.layers[0]
        xs = []
        h = layer.fc2.register_forward_hook(lambda m, a, o: xs.append(o[0].double()))
        with torch.no_grad():
            for e in examples:
                model.model.encoder(e.input_features)
        h.remove()
        return torch.cat(xs).mean(0)

    # statistics use the speech positions only; compare on "all" frames to match the forward above
    dense_mean = ffn_mean(tiny_whisper)
    model = copy.deepcopy(tiny_whisper)
    prune_structured(model, PrunePlan.parse("encoder.layers[0].ffn=0.5@neurons", score="fluctuation"),
                     calibration=examples, repair="bias", options=CalibrationOptions(frames="all"))
    torch.testing.assert_close(ffn_mean(model), dense_mean, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ffn_mean(outs["none"]), dense_mean, atol=1e-5)


def test_refit_repair_is_the_least_squares_optimum_of_the_next_layer(tiny_whisper):
    """``repair="refit"`` gives fc2 the kept-column weights and bias that a separate least-squares
    solve (torch.linalg.lstsq on the dense layer's inputs, captured by a hook) finds; its output
    error on those tokens is below the bias repair's, which is below no repair's."""
    from asrprune.calibration import CalibrationOptions

    examples = _examples(tiny_whisper, n=4)
    inputs = []
    dense_fc2 = tiny_whisper.model.encoder.layers[1].fc2
    h = dense_fc2.register_forward_hook(lambda m, a, o: inputs.append(a[0][0].double()))
    with torch.no_grad():
        for e in examples:
            tiny_whisper.model.encoder(e.input_features)
    h.remove()
    a = torch.cat(inputs)  # (tokens, 32): 4 x 30 encoder positions
    y = a @ dense_fc2.weight.detach().double().T + dense_fc2.bias.detach().double()
    errors = {}
    for repair in ("none", "bias", "refit"):
        model = copy.deepcopy(tiny_whisper)
        res = prune_structured(model, PrunePlan.parse("encoder.layers[1].ffn=0.5@neurons", score="fluctuation"),
                               calibration=examples, repair=repair, options=CalibrationOptions(frames="all", damp=0.0))
        keep = sorted(set(range(32)) - set(_removed(res)[0]["removed"]))
        fc2 = model.model.encoder.layers[1].fc2
        pred = a[:, keep] @ fc2.weight.detach().double().T + fc2.bias.detach().double()
        errors[repair] = float(((pred - y) ** 2).sum())
        if repair == "refit":
            design = torch.cat([a[:, keep], torch.ones(len(a), 1, dtype=a.dtype)], 1)
            sol = torch.linalg.lstsq(design, y).solution  # (17, 16)
            # fc2's inputs are GELU(fc1 x) with x of width 16, so their covariance is ill-conditioned
            # (condition ~2e4 on the kept columns); the statistics are fp32 sums, hence the tolerance
            # on the weights, while the error it reaches is the optimum's to 1e-4
            scale = float(sol.abs().max())
            torch.testing.assert_close(fc2.weight.double(), sol[:-1].T, rtol=0, atol=1e-3 * scale)
            torch.testing.assert_close(fc2.bias.double(), sol[-1], rtol=0, atol=1e-3 * scale)
            optimum = float(((design @ sol - y) ** 2).sum())
            assert optimum <= errors[repair] <= optimum * (1 + 1e-4)
            assert res.to_dict()["structure"]["repair_damp"] == 0.0
    assert errors["refit"] < errors["bias"] < errors["none"]


# ----------------------------------------------------------------------------------------------
# saving, loading, CTranslate2
# ----------------------------------------------------------------------------------------------


def _prune_dir(tiny_dir, tmp_path, text: str):
    model, processor = load_model(tiny_dir)
    res = prune_structured(model, PrunePlan.parse(text))
    out = save_pruned(model, processor, tmp_path / "pruned", pruning=res.to_dict(), source=str(tiny_dir))
    return model, processor, out


@pytest.mark.parametrize("text", ["encoder.ffn=0.5@neurons,decoder.ffn=0.25@neurons", "decoder.layers[0]=drop"])
def test_uniform_widths_and_dropped_layers_load_with_plain_transformers_and_ctranslate2(tiny_dir, tmp_path, text):
    from transformers import WhisperForConditionalGeneration

    model, processor, out = _prune_dir(tiny_dir, tmp_path, text)
    config = json.loads((out / "config.json").read_text())
    assert STRUCTURE_KEY not in config
    assert (config["encoder_ffn_dim"], config["decoder_ffn_dim"], config["decoder_layers"]) == (
        model.model.encoder.layers[0].fc1.out_features, model.model.decoder.layers[0].fc1.out_features,
        len(model.model.decoder.layers))
    plain = WhisperForConditionalGeneration.from_pretrained(out)
    assert model_fingerprint(plain) == model_fingerprint(model)
    _assert_same_greedy(plain, processor, export_ctranslate2(out, tmp_path / "ct2"))


def _assert_same_greedy(model, processor, ct2_dir) -> None:
    """The torch model and its CTranslate2 export give the same greedy tokens (random weights:
    8 tokens of 2 random inputs, no suppression on either side)."""
    import ctranslate2

    features = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ids = model.generate(features, max_new_tokens=8, num_beams=1, do_sample=False, return_timestamps=False)
    prompt = processor.tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    ct2 = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32")
    res = ct2.generate(ctranslate2.StorageView.from_array(features.numpy()), [prompt] * 2, beam_size=1,
                       max_length=8 + len(prompt), suppress_blank=False, suppress_tokens=[])
    torch_tokens = [[t for t in seq.tolist() if t not in (50256, 50257, 50362)] for seq in ids]
    ct2_tokens = [[t for t in r.sequences_ids[0] if t not in (50256, 50257, 50362)] for r in res]
    n = min(len(torch_tokens[0]), len(ct2_tokens[0]), 4)
    assert [t[:n] for t in torch_tokens] == [t[:n] for t in ct2_tokens] and n > 0


def test_per_layer_ffn_widths_convert_to_ctranslate2(tiny_dir, tmp_path):
    """CTranslate2 reads each layer's FFN width from its weights: per-layer widths, which the
    config cannot express, convert (through asrprune's loader) with the same greedy tokens."""
    model, processor, out = _prune_dir(tiny_dir, tmp_path, "encoder.layers[0].ffn=0.5@neurons,decoder.layers[1].ffn=0.25@neurons")
    assert STRUCTURE_KEY in json.loads((out / "config.json").read_text())
    _assert_same_greedy(model, processor, export_ctranslate2(out, tmp_path / "ct2"))


def test_per_layer_widths_and_removed_heads_round_trip_through_load_model(tiny_dir, tmp_path):
    from transformers import WhisperForConditionalGeneration

    model, _, out = _prune_dir(tiny_dir, tmp_path, "encoder.layers[0].ffn=0.5@neurons,decoder.self_attn=0.5@heads")
    config = json.loads((out / "config.json").read_text())
    assert config[STRUCTURE_KEY]["encoder"][0]["ffn"] == 16 and config[STRUCTURE_KEY]["encoder"][1]["ffn"] == 32
    assert [r["self_heads"] for r in config[STRUCTURE_KEY]["decoder"]] == [2, 2]
    again, _ = load_model(out)
    assert model_fingerprint(again) == model_fingerprint(model)
    ex = _examples(make_tiny_whisper(), n=1)[0]
    feats = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(1))
    dec = torch.tensor([[50257, 50362, 100, 200]])
    with torch.no_grad():
        a = model(input_features=feats, decoder_input_ids=dec).logits
        b = again(input_features=feats, decoder_input_ids=dec).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    del ex
    with pytest.raises(OSError):  # plain transformers finds no weights it could mistake for its own
        WhisperForConditionalGeneration.from_pretrained(out)
    with pytest.raises(ValueError, match="removed heads cannot be exported"):
        export_ctranslate2(out, tmp_path / "ct2")


# ----------------------------------------------------------------------------------------------
# bad plans, alignment heads
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, score, message", [
    ("encoder.ffn=1.0@neurons", "magnitude", "leaves nothing to compute"),
    ("decoder.self_attn=1@heads", "magnitude", "leaves nothing to compute"),
    ("encoder.ffn=0.3@neurons", "sparsegpt", "cannot remove whole structures"),
    ("encoder.ffn=2:4@neurons", "magnitude", "N:M pattern prunes weights"),
    ("all_linear=0.4", "loss", "ranks structured units"),
    ("encoder.ffn=drop@matrix", "magnitude", "takes no '@'"),
])
def test_bad_structured_plans_are_refused(text, score, message):
    with pytest.raises(PlanError, match=message):
        PrunePlan.parse(text, score=score)


@pytest.mark.parametrize("text, message", [
    ("decoder.layers=drop", "removes all 2 decoder layers"),
    ("decoder.self_attn=0.5@neurons", "removes FFN neurons"),
    ("encoder.ffn=0.5@heads", "removes attention heads"),
    ("encoder.ffn=0.5@neurons,encoder.layers[0].fc1=0.5@neurons", "two structured entries"),
])
def test_structured_plans_checked_against_the_model(tiny_whisper, text, message):
    with pytest.raises(PlanError, match=message):
        prune_structured(copy.deepcopy(tiny_whisper), PrunePlan.parse(text))


def test_plan_text_and_dict_round_trip():
    plan = PrunePlan.parse("encoder.ffn=0.3@neurons,decoder.self_attn=0.25@heads,decoder.layers[1:-1]=drop,"
                           "all_linear=0.2@matrix")
    assert plan.to_text() == "encoder.ffn=0.3@neurons,decoder.self_attn=0.25@heads,decoder.layers[1:-1]=drop,all_linear=0.2@matrix"
    d = plan.to_dict()
    assert d["entries"][0] == {"selector": "encoder.ffn", "sparsity": 0.3, "unit": "neurons"}
    assert "unit" not in d["entries"][3]  # unit only when not weights: old plans keep their form
    assert PrunePlan.from_dict(d) == plan and PrunePlan.from_dict({"entries": [{"selector": "x", "sparsity": "drop"}]}).entries[0].unit == "layers"


def test_alignment_heads_are_remapped(tiny_whisper):
    pairs, note = remap_alignment_heads(type("G", (), {"alignment_heads": [[0, 1], [1, 0], [1, 3]]})(), [1], {1: [0, 2, 3]})
    assert pairs == [[0, 0], [0, 2]] and "1 of 3" in note
    pairs, note = remap_alignment_heads(type("G", (), {"alignment_heads": [[0, 1]]})(), [1], {})
    assert pairs is None and "none remain" in note
    model = copy.deepcopy(tiny_whisper)
    model.generation_config.alignment_heads = [[0, 2], [1, 1], [1, 3]]
    res = prune_structured(model, PrunePlan.parse("decoder.layers[0]=drop"))
    assert model.generation_config.alignment_heads == [[0, 1], [0, 3]]
    assert "alignment_heads" in res.to_dict()["structure"]["notes"][0]


def test_sweep_reloads_the_model_after_a_structured_variant(tiny_dir, tmp_path, shared_data):
    from asrprune.files import latest_rows, read_jsonl
    from asrprune.sweep import SweepSpec, run_sweep
    from test_sweep import DECODE, _manifest

    data = _manifest(shared_data, tmp_path / "eval.jsonl", "librispeech_test_other", 2)
    calib = _manifest(shared_data, tmp_path / "calib.jsonl", "ljspeech", 2)
    spec = SweepSpec.from_dict({
        "models": [str(tiny_dir)], "data": [str(data)], "decode": DECODE, "calibration": {"source": str(calib)},
        "plans": [
            {"name": "heads", "plan": {"entries": [{"selector": "decoder.self_attn", "sparsity": 0.5, "unit": "heads"}],
                                       "score": "wanda"}},
            {"name": "drop", "plan": "decoder.layers[0]=drop"},
            {"name": "mag", "plan": "all_linear=0.4@matrix"},
        ],
    })
    out = tmp_path / "sw"
    summary = run_sweep(spec, out, progress=False)
    assert summary.failed == []
    rows = {r["variant"]: r for r in latest_rows(read_jsonl(out / "runs.jsonl")).values()}
    assert rows["heads"]["structure"]["config_expresses"] is False
    assert rows["drop"]["structure"]["params_after"] < rows["drop"]["structure"]["params_before"]
    # the magnitude run after them pruned the dense model (all linear weights of the full shapes)
    assert rows["mag"]["linear_params"] == rows["baseline"]["linear_params"]
    assert rows["mag"]["sparsity_linear"] == pytest.approx(0.4, abs=1e-3)
    assert rows["drop"]["total_params"] < rows["baseline"]["total_params"]
    pruning = json.loads((out / rows["heads"]["run_dir"] / "pruning.json").read_text())
    assert [u["id"] for u in pruning["calibration"]["data"]["utterances"]] == [
        json.loads(x)["id"] for x in calib.read_text().splitlines()]


def test_reference_model_comparison_and_pareto_report(tiny_dir, tmp_path, shared_data):
    """A second model's runs are compared with the reference model's baseline on the same
    utterances, and the report draws the Pareto figure."""
    import shutil

    from asrprune.evaluation import compare
    from asrprune.files import latest_rows, read_jsonl
    from asrprune.report import build_report
    from asrprune.sweep import SweepSpec, SweepSpecError, run_sweep
    from test_sweep import DECODE, _manifest

    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    (other / "model.safetensors").unlink()
    m, _ = load_model(tiny_dir)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m.save_pretrained(other)
    data = _manifest(shared_data, tmp_path / "eval.jsonl", "librispeech_test_other", 2)
    base = {"models": [str(tiny_dir), str(other)], "data": [str(data)], "decode": DECODE,
            "plans": [{"name": "ffn", "plan": "encoder.ffn=0.5@neurons"}]}
    with pytest.raises(SweepSpecError, match="reference_model"):
        SweepSpec.from_dict({**base, "reference_model": "tiny.en"})
    out = tmp_path / "sw"
    assert run_sweep(SweepSpec.from_dict({**base, "reference_model": str(tiny_dir)}), out, progress=False).failed == []
    rows = list(latest_rows(read_jsonl(out / "runs.jsonl")).values())
    ref_base = next(r for r in rows if r["model_spec"] == str(tiny_dir) and r["variant"] == "baseline")
    for r in rows:
        if r["model_spec"] == str(other):
            c = r["comparison_reference"]
            assert c["baseline_run_id"] == ref_base["run_id"]
            expected = compare(out / ref_base["run_dir"], out / r["run_dir"]).to_dict()
            assert c["delta"] == pytest.approx(expected["delta_wer"])
        else:
            assert "comparison_reference" not in r
    paths = build_report(out)
    md = paths.markdown.read_text()
    assert "Structure: size, speed and WER" in md and "Δ vs reference model" in md
    assert (out / "report" / "pareto.png").is_file()
