"""Wanda and SparseGPT against closed forms and independent computations; the calibration pass."""

from __future__ import annotations

import pytest
import torch

from asrprune.calibration import CalibrationExample, CalibrationOptions, InputStats, sequential_pass, speech_positions
from asrprune.config import PlanError, PrunePlan
from asrprune.criteria import sparsegpt_prune_, wanda_keep_mask, wanda_scores
from asrprune.masks import keep_mask, row_keep_mask
from asrprune.prune import prune_model
from conftest import make_tiny_whisper


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return (x.T @ x / x.shape[0]).to(torch.float64)


# ----------------------------------------------------------------------------------------------
# SparseGPT
# ----------------------------------------------------------------------------------------------


def test_sparsegpt_removing_one_weight_is_the_obs_error_and_update(rng):
    rows, cols = 3, 6
    x = torch.randn(200, cols, generator=rng, dtype=torch.float64)
    w = torch.randn(rows, cols, generator=rng, dtype=torch.float64)
    H = _hessian(x)
    Hinv = torch.linalg.inv(H)
    prune = torch.zeros(rows, cols, dtype=torch.bool)
    prune[1, 0] = True  # the first column is processed first: OBS with every other weight free
    weight = w.clone().to(torch.float32)
    out = sparsegpt_prune_(weight, H, prune_mask=prune, damp=0.0)
    q = 0
    expected_error = float(w[1, q] ** 2 / Hinv[q, q])
    assert out["error"] == pytest.approx(expected_error, rel=1e-4)
    expected = w[1] - w[1, q] / Hinv[q, q] * Hinv[:, q]  # the OBS update of the row
    assert weight[1, 0] == 0
    torch.testing.assert_close(weight[1].double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight[[0, 2]].double(), w[[0, 2]], rtol=0, atol=1e-6)  # other rows untouched
    # and the error is the increase of the reconstruction error (H = X^T X / n)
    recon = float(((w - weight.double()) @ x.T).pow(2).sum() / x.shape[0])
    assert recon == pytest.approx(expected_error, rel=1e-4)


def test_sparsegpt_with_a_diagonal_hessian_keeps_the_largest_w2h_and_updates_nothing(rng):
    w = torch.randn(4, 16, generator=rng)
    h = torch.rand(16, generator=rng, dtype=torch.float64) + 0.1
    weight = w.clone()
    sparsegpt_prune_(weight, torch.diag(h), sparsity=0.5, damp=0.0)
    expected_keep = keep_mask(w.double() ** 2 * h[None, :], 0.5)
    assert torch.equal(weight != 0, expected_keep)
    torch.testing.assert_close(weight[expected_keep], w[expected_keep], rtol=0, atol=0)


def _lstsq_error(w: torch.Tensor, keep: torch.Tensor, x: torch.Tensor) -> float:
    """The smallest ||(W - W') X|| for W' zero outside ``keep`` (per row, least squares)."""
    total = 0.0
    target = w @ x.T  # (rows, T)
    for r in range(w.shape[0]):
        cols = keep[r].nonzero().flatten()
        sol = torch.linalg.lstsq(x[:, cols], target[r][:, None]).solution.flatten()
        total += float((target[r] - x[:, cols] @ sol).pow(2).sum())
    return total


def test_sparsegpt_reconstructs_better_than_magnitude_and_never_beyond_least_squares(rng):
    rows, cols = 8, 48
    mix = torch.randn(cols, cols, generator=rng, dtype=torch.float64) / cols ** 0.5  # correlated inputs
    x = torch.randn(400, cols, generator=rng, dtype=torch.float64) @ mix * torch.linspace(0.2, 2.0, cols, dtype=torch.float64)
    w = torch.randn(rows, cols, generator=rng, dtype=torch.float64)
    weight = w.clone().float()
    sparsegpt_prune_(weight, _hessian(x), sparsity=0.5, block_size=16)
    err_gpt = float(((w - weight.double()) @ x.T).pow(2).sum())
    mag = w * keep_mask(w.abs(), 0.5)
    err_mag = float(((w - mag) @ x.T).pow(2).sum())
    keep = weight != 0
    assert int((~keep).sum()) == rows * cols // 2  # exact count
    assert err_gpt < err_mag
    assert err_gpt >= _lstsq_error(w, keep, x) * (1 - 1e-6)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_sparsegpt_nm_structure(nm, rng):
    n, m = nm
    x = torch.randn(300, 64, generator=rng)
    weight = torch.randn(6, 64, generator=rng)
    sparsegpt_prune_(weight, _hessian(x), nm=nm, block_size=16)
    kept = (weight != 0).reshape(6, -1, m).sum(-1)
    assert torch.all(kept == n)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_sparsegpt_exact_counts_across_blocks(sparsity, rng):
    x = torch.randn(100, 50, generator=rng)
    weight = torch.randn(7, 50, generator=rng) + 0.01  # no exact zeros to begin with
    sparsegpt_prune_(weight, _hessian(x), sparsity=sparsity, block_size=16)
    assert int((weight == 0).sum()) == round(sparsity * 350)


# ----------------------------------------------------------------------------------------------
# Wanda
# ----------------------------------------------------------------------------------------------


def test_wanda_masks_per_row_matrix_and_nm(rng):
    w = torch.randn(5, 8, generator=rng)
    norm = torch.rand(8, generator=rng) + 0.1
    scores = wanda_scores(w, norm)
    torch.testing.assert_close(scores, w.abs() * norm[None, :])
    assert torch.equal(wanda_keep_mask(w, norm, sparsity=0.5), row_keep_mask(scores, 0.5))
    assert (~wanda_keep_mask(w, norm, sparsity=0.5)).sum(1).tolist() == [4] * 5  # per row
    assert int((~wanda_keep_mask(w, norm, sparsity=0.5, scope="matrix")).sum()) == 20
    assert torch.all(wanda_keep_mask(w, norm, sparsity=0.5, nm=(1, 4)).reshape(5, 2, 4).sum(-1) == 1)


def _examples(model, n=3, seed=0, frames=60, length=5) -> list[CalibrationExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, 80, (1, length), generator=g)
        ids[0, 0] = model.config.decoder_start_token_id
        out.append(CalibrationExample(id=f"u{i}", input_features=torch.randn(1, 80, frames, generator=g),
                                      decoder_input_ids=ids, labels=ids.clone(), audio_s=30.0 * (i + 1) / (n + 1)))
    return out


def test_wanda_scores_equal_those_from_an_independent_forward(tiny_whisper):
    """The hook-collected ||X|| of encoder layer 1's q_proj equals the norm of its input recomputed
    from output_hidden_states of a separate forward (layer 0 unpruned, so the inputs agree)."""
    model = tiny_whisper
    examples = _examples(model)
    stats = sequential_pass(model, examples, wanted={"model.encoder.layers.1.self_attn.q_proj"}, frames="all",
                            progress=False)
    got = stats["model.encoder.layers.1.self_attn.q_proj"]
    enc = model.get_encoder()
    sq = torch.zeros(16, dtype=torch.float64)
    with torch.no_grad():
        for ex in examples:
            h = enc(ex.input_features, output_hidden_states=True).hidden_states[1][0]  # input of layer 1
            x = enc.layers[1].self_attn_layer_norm(h)
            sq += (x.double() ** 2).sum(0)
    torch.testing.assert_close(got.sq, sq, rtol=1e-5, atol=1e-6)
    assert got.n_tokens == 3 * 30  # 60 mel frames -> 30 encoder positions
    # Wanda with those statistics is |W| * ||X||, per row
    w = enc.layers[1].self_attn.q_proj.weight
    torch.testing.assert_close(wanda_scores(w, got.norm), w.abs() * sq.sqrt().float()[None, :])
    # frames="speech": only the positions that hold audio
    speech = sequential_pass(model, examples, wanted={"model.encoder.layers.1.self_attn.q_proj"},
                             frames="speech", progress=False)["model.encoder.layers.1.self_attn.q_proj"]
    assert speech.n_tokens == sum(speech_positions(ex, 30) for ex in examples) < got.n_tokens


def test_sequential_pass_feeds_cross_attention_the_pruned_encoders_outputs(tiny_whisper):
    model = tiny_whisper
    examples = _examples(model)
    seen: list[torch.Tensor] = []
    handle = model.get_decoder().layers[0].encoder_attn.k_proj.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone()))
    try:
        plan = PrunePlan.parse("encoder=0.5,decoder=0.5", score="sparsegpt")
        prune_model(model, plan, calibration=examples, options=CalibrationOptions(frames="all"))
    finally:
        handle.remove()
    with torch.no_grad():  # the encoder as pruned (its layers pruned before the decoder's)
        pruned_outputs = [model.get_encoder()(ex.input_features).last_hidden_state for ex in examples]
    captured = seen[: len(examples)]  # the pass over decoder layer 0
    for got, want in zip(captured, pruned_outputs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_calibrated_plans_prune_exactly_and_record_the_calibration(tiny_whisper):
    model = tiny_whisper
    examples = _examples(model, n=4)
    result = prune_model(model, PrunePlan.parse("all_linear=0.4", score="wanda"), calibration=examples)
    params = dict(model.named_parameters())
    for name in result.entries[0].parameters:  # exactly round(s * numel) per matrix
        assert int((params[name] == 0).sum()) == round(0.4 * params[name].numel()), name
    assert result.linear_sparsity == pytest.approx(0.4, abs=2e-3)
    assert result.plan.entries[0].scope == "row"  # Wanda's default grouping
    rec = result.to_dict()["calibration"]
    assert rec["method"] == "wanda" and rec["ids"] == ["u0", "u1", "u2", "u3"] and rec["options"]["frames"] == "speech"
    assert rec["warnings"]  # 4 x 5 decoder tokens are fewer than 16 or 32 input features
    nm = prune_model(make_tiny_whisper(), PrunePlan.parse("decoder.ffn=2:4", score="sparsegpt"), calibration=examples)
    assert nm.entries[0].measured_sparsity == pytest.approx(0.5)


@pytest.mark.parametrize("text,score,fragment", [
    ("all_linear=0.4", "wanda", "needs calibration data"),
    ("layer_norms=0.1", "wanda", "not the weight of a linear layer"),
    ("token_embeddings=0.1", "sparsegpt", "Untie them first"),
])
def test_calibrated_methods_refuse_what_they_cannot_prune(text, score, fragment, tiny_whisper):
    examples = None if fragment == "needs calibration data" else _examples(tiny_whisper)
    with pytest.raises(ValueError, match=fragment):
        prune_model(tiny_whisper, PrunePlan.parse(text, score=score), calibration=examples)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(text="all_linear=0.4@component", score="wanda"), "groupings row, matrix"),
    (dict(text="all_linear=0.4@row", score="sparsegpt"), "groupings matrix"),
    (dict(text="all_linear=0.4", score="sparsegpt", mode="global"), "no such threshold"),
])
def test_plans_check_the_method_groupings(kwargs, fragment):
    with pytest.raises(PlanError, match=fragment):
        PrunePlan.parse(kwargs.pop("text"), **kwargs)


def test_default_scopes_and_to_dict_of_existing_plans_unchanged():
    assert PrunePlan.parse("decoder.ffn=0.3").to_dict() == {
        "mode": "per_entry", "score": "magnitude",
        "entries": [{"selector": "decoder.ffn", "sparsity": 0.3, "scope": "component"}]}
    assert PrunePlan.parse("all_linear=0.4", score="sparsegpt").entries[0].scope == "matrix"
    assert PrunePlan.parse("all_linear=0.4@row").entries[0].scope == "row"  # magnitude per row
    assert InputStats.empty(3, gram=False, device="cpu").gram is None


def test_modules_fed_one_tensor_share_their_statistics(tiny_whisper):
    """q, k and v see the same input: one InputStats (one Hessian) serves all three; fc1, fed a
    tensor that may reuse a freed address, is never mistaken for them; counts are per example."""
    model = tiny_whisper
    examples = _examples(model, n=3)
    stats = sequential_pass(model, examples, gram=True, frames="all", progress=False)
    enc = "model.encoder.layers.1."
    assert stats[enc + "self_attn.q_proj"] is stats[enc + "self_attn.k_proj"] is stats[enc + "self_attn.v_proj"]
    assert stats[enc + "fc1"] is not stats[enc + "self_attn.q_proj"]
    assert stats[enc + "self_attn.out_proj"] is not stats[enc + "self_attn.q_proj"]
    dec = "model.decoder.layers.0.encoder_attn."
    assert stats[dec + "k_proj"] is stats[dec + "v_proj"] and stats[dec + "q_proj"] is not stats[dec + "k_proj"]
    n_frames = sum(ex.input_features.shape[-1] // 2 for ex in examples)  # the conv stride halves the frames
    assert stats[enc + "self_attn.q_proj"].n_tokens == n_frames
