"""Saving pruned models: HF directory + pruning.json, compressed sparse safetensors, CTranslate2."""

from __future__ import annotations

import datetime as dt
import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from asrprune.export import (
    COMPRESSED_FILENAME,
    PRUNING_FILENAME,
    SPARSE_FORMAT,
    SparseFormatError,
    export_compressed,
    export_ctranslate2,
    load_compressed,
    load_compressed_model,
    save_compressed,
    save_pruned,
)
from asrprune.config import PrunePlan
from asrprune.models import model_fingerprint
from asrprune.prune import prune_model

from conftest import make_tiny_whisper

DECODER_SELF_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")


def _decoder_self_attn_weights(model):
    return [
        getattr(layer.self_attn, proj).weight
        for layer in model.model.decoder.layers
        for proj in DECODER_SELF_ATTN
    ]


def _prune_decoder_self_attn(model, sparsity: float) -> dict:
    return prune_model(model, PrunePlan.parse(f"decoder.self_attn={sparsity}")).to_dict()


def _logits(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, model.config.num_mel_bins, 2 * model.config.max_source_positions, generator=g)
    decoder_ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=g)
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=decoder_ids).logits


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor, so that equality means bit equality (-0.0, NaN)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_state_bit_equal(a: dict, b: dict):
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(_bits(a[name]), _bits(b[name])), name


# ----------------------------------------------------------------------------------------------
# save_pruned: HF directory + pruning.json
# ----------------------------------------------------------------------------------------------


def test_save_pruned_round_trip_identical_logits_and_pruning_json(tmp_path):
    from transformers import WhisperForConditionalGeneration

    model = make_tiny_whisper()
    source_fp = model_fingerprint(model)
    nonzero_before = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    pruning = _prune_decoder_self_attn(model, 0.5)
    # independent count: half of the 2 layers x 4 (16 x 16) matrices, none of them zero before
    n_selected = sum(w.numel() for w in _decoder_self_attn_weights(model))
    assert n_selected == 2 * 4 * 16 * 16
    expected_nonzero = nonzero_before - n_selected // 2

    out = save_pruned(model, None, tmp_path / "pruned", pruning=pruning, source="tiny-random",
                      source_fingerprint=source_fp)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", PRUNING_FILENAME]

    reloaded = WhisperForConditionalGeneration.from_pretrained(out).eval()
    assert torch.equal(_logits(reloaded), _logits(model))
    _assert_state_bit_equal(dict(model.named_parameters()), dict(reloaded.named_parameters()))
    assert reloaded.proj_out.weight is reloaded.model.decoder.embed_tokens.weight

    info = json.loads((out / PRUNING_FILENAME).read_text())
    assert info["format"] == "asrprune-pruned-model" and info["format_version"] == 1
    assert info["source"] == {"spec": "tiny-random", "fingerprint": source_fp}
    assert info["model"]["fingerprint"] == model_fingerprint(reloaded) != source_fp
    assert info["model"]["tied_parameters"] == [["model.decoder.embed_tokens.weight", "proj_out.weight"]]
    assert info["saved_sparsity"]["n_nonzero"] == expected_nonzero
    assert info["saved_sparsity"]["n_parameters"] == sum(p.numel() for p in model.parameters())
    assert info["pruning"] == json.loads(json.dumps(pruning))
    assert info["asrprune_version"]
    created = dt.datetime.fromisoformat(info["created_utc"])
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 600
    assert info["environment"]["torch"] == torch.__version__


def test_save_pruned_copies_side_files_of_source_dir(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("normalizer.json", "added_tokens.json", "merges.txt", "model.safetensors",
                 PRUNING_FILENAME, "asrprune_conversion.json", "config.json"):
        (source / name).write_text(json.dumps({"from": name}))
    out = save_pruned(make_tiny_whisper(), None, tmp_path / "out", pruning={}, source=str(source))
    assert json.loads((out / "normalizer.json").read_text()) == {"from": "normalizer.json"}
    assert (out / "added_tokens.json").is_file() and (out / "merges.txt").is_file()
    # the model's own files are not overwritten, and the source's pruning/conversion records
    # describe another model, so they are not carried over
    assert "model_type" in json.loads((out / "config.json").read_text())
    assert json.loads((out / PRUNING_FILENAME).read_text())["copied_side_files"] == [
        "added_tokens.json", "merges.txt", "normalizer.json"]
    assert not (out / "asrprune_conversion.json").exists()


def test_save_pruned_refuses_torch_prune_reparametrisation(tmp_path):
    model = make_tiny_whisper()
    import torch.nn.utils.prune as torch_prune

    torch_prune.l1_unstructured(model.model.decoder.layers[0].fc1, "weight", amount=0.5)
    with pytest.raises(ValueError, match="prune.remove"):
        save_pruned(model, None, tmp_path / "out", pruning={}, source="x")


def test_save_pruned_refuses_non_empty_out_dir(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        save_pruned(make_tiny_whisper(), None, tmp_path / "out", pruning={}, source="x")
    save_pruned(make_tiny_whisper(), None, tmp_path / "out", pruning={}, source="x", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_save_pruned_rejects_unserialisable_pruning(tmp_path):
    with pytest.raises(ValueError, match="pruning"):
        save_pruned(make_tiny_whisper(), None, tmp_path / "out", pruning={"x": object()}, source="x")


# ----------------------------------------------------------------------------------------------
# compressed sparse safetensors
# ----------------------------------------------------------------------------------------------


def _sparse_matrix(dtype, sparsity, shape=(384, 1536), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g).to(dtype)
    w[w == 0] = 1.0  # no accidental zeros: sparsity is exactly what we set
    idx = torch.randperm(w.numel(), generator=g)[: round(sparsity * w.numel())]
    w.view(-1)[idx] = 0.0
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_compressed_size_shrinks_with_sparsity_and_restores_bits(tmp_path, dtype, sparsity):
    w = _sparse_matrix(dtype, sparsity)
    save_file({"w": w}, str(tmp_path / "dense.safetensors"))
    save_compressed({"w": w}, tmp_path / "c.safetensors")
    ratio = os.path.getsize(tmp_path / "c.safetensors") / os.path.getsize(tmp_path / "dense.safetensors")
    b = w.element_size()
    if sparsity == 0.0:
        # bitmask would only add bytes: stored densely, the header is the only overhead
        assert 1.0 <= ratio < 1.002
    else:
        # values (1 - s) of the dense bytes + a 1-bit-per-element mask (docs/sparse_format.md)
        expected = (1 - sparsity) + 1 / (8 * b)
        assert expected - 0.001 < ratio < expected + 0.002, (ratio, expected)
    back = load_compressed(tmp_path / "c.safetensors")["w"]
    assert back.dtype == dtype and back.shape == w.shape
    assert torch.equal(_bits(back), _bits(w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_compressed_restores_negative_zero_nan_inf_and_subnormals_bit_exactly(tmp_path, dtype):
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), info.tiny / 4, -info.tiny / 4,
                            info.max, info.min], dtype=dtype)
    w = torch.zeros(64, 32, dtype=dtype)  # mostly +0.0 so the bitmask encoding is chosen
    w.view(-1)[:8] = special
    w.view(-1)[100:120] = -0.0
    nan_bits = _bits(torch.tensor([float("nan")], dtype=dtype)) | 1  # a NaN with a payload bit
    w.view(-1)[200:201] = nan_bits.view(dtype)
    w.view(-1)[300:400] = torch.linspace(-1, 1, 100).to(dtype)
    save_compressed({"w": w}, tmp_path / "c.safetensors")
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        assert set(f.keys()) == {"w::bitmask", "w::values", "w::negzero"}
    back = load_compressed(tmp_path / "c.safetensors")["w"]
    assert torch.equal(_bits(back), _bits(w))
    assert torch.signbit(back.view(-1)[100:120]).all()


def test_compressed_layout_decodes_with_plain_numpy_as_documented(tmp_path):
    """An independent decoder written from docs/sparse_format.md only."""
    w = _sparse_matrix(torch.float32, 0.7, shape=(37, 53))  # numel not a multiple of 8
    w.view(-1)[5] = -0.0
    ints = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    save_compressed({"layer.weight": w, "counter": ints, "dense.bias": torch.ones(3)},
                    tmp_path / "c.safetensors", metadata={"note": "hello"})
    with safe_open(str(tmp_path / "c.safetensors"), "np") as f:
        meta = f.metadata()
        layout = json.loads(meta["asrprune.layout"])
        assert meta["sparse_format"] == SPARSE_FORMAT and meta["sparse_format_version"] == "1"
        assert meta["note"] == "hello"
        entry = layout["tensors"]["layer.weight"]
        assert entry["encoding"] == "bitmask" and entry["shape"] == [37, 53] and entry["negzero"]
        assert layout["tensors"]["counter"]["encoding"] == "dense"
        assert layout["tensors"]["dense.bias"]["encoding"] == "dense"
        numel = 37 * 53
        bitmask = f.get_tensor("layer.weight::bitmask")
        assert bitmask.dtype == np.uint8 and bitmask.shape == (math.ceil(numel / 8),)
        bits = np.unpackbits(bitmask, count=numel, bitorder="little").astype(bool)
        flat = np.zeros(numel, np.float32)
        flat[bits] = f.get_tensor("layer.weight::values")
        zero_idx = np.flatnonzero(~bits)
        neg = np.unpackbits(f.get_tensor("layer.weight::negzero"), count=zero_idx.size,
                            bitorder="little").astype(bool)
        flat[zero_idx[neg]] = -0.0
        assert entry["nnz"] == int(bits.sum())
        np.testing.assert_array_equal(flat.reshape(37, 53).view(np.int32), w.numpy().view(np.int32))
        np.testing.assert_array_equal(f.get_tensor("counter"), ints.numpy())


def test_compressed_model_round_trip_keeps_ties_and_logits(tmp_path):
    model = make_tiny_whisper()
    _prune_decoder_self_attn(model, 0.5)
    save_compressed(model, tmp_path / "m.safetensors")
    state = load_compressed(tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        layout = json.loads(f.metadata()["asrprune.layout"])
        assert "proj_out.weight" not in {k.split("::")[0] for k in f.keys()}
    assert layout["aliases"] == {"proj_out.weight": "model.decoder.embed_tokens.weight"}
    assert state["proj_out.weight"] is state["model.decoder.embed_tokens.weight"]
    assert layout["tensors"]["model.decoder.layers.0.self_attn.q_proj.weight"]["encoding"] == "bitmask"
    _assert_state_bit_equal(model.state_dict(), state)

    fresh = make_tiny_whisper(seed=1)
    fresh.load_state_dict(state)
    assert torch.equal(_logits(fresh), _logits(model))


def test_export_compressed_directory_loads_back(tmp_path):
    model = make_tiny_whisper()
    pruning = _prune_decoder_self_attn(model, 0.5)
    pruned = save_pruned(model, None, tmp_path / "pruned", pruning=pruning, source="x")
    path = export_compressed(pruned, tmp_path / "compressed")
    assert path == tmp_path / "compressed" / COMPRESSED_FILENAME
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "config.json", "generation_config.json", COMPRESSED_FILENAME, PRUNING_FILENAME]
    loaded = load_compressed_model(path.parent)
    assert loaded.proj_out.weight is loaded.model.decoder.embed_tokens.weight
    assert torch.equal(_logits(loaded), _logits(model))
    assert not loaded.training


def test_compressed_handles_views_of_one_buffer(tmp_path):
    buffer = torch.arange(1, 13, dtype=torch.float32)  # no zeros: both stored densely
    state = {"a": buffer[:6].view(2, 3), "b": buffer[6:].view(3, 2), "c": buffer[:6].view(2, 3)}
    save_compressed(state, tmp_path / "c.safetensors")
    back = load_compressed(tmp_path / "c.safetensors")
    assert back["c"] is back["a"]
    assert torch.equal(back["a"], state["a"]) and torch.equal(back["b"], state["b"])


def test_load_compressed_rejects_other_files(tmp_path):
    save_file({"w": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(SparseFormatError, match="not an asrprune-bitmask file"):
        load_compressed(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SparseFormatError, match="not a safetensors file"):
        load_compressed(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_compressed(tmp_path / "missing.safetensors")


def test_load_compressed_rejects_newer_version(tmp_path):
    save_compressed({"w": torch.zeros(100)}, tmp_path / "c.safetensors")
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    layout = json.loads(meta["asrprune.layout"])
    layout["version"] = 99
    meta["asrprune.layout"] = json.dumps(layout)
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata=meta)
    with pytest.raises(SparseFormatError, match="version 99"):
        load_compressed(tmp_path / "c.safetensors")


# ----------------------------------------------------------------------------------------------
# CTranslate2 (argument checks; the real conversion is in the integration test below)
# ----------------------------------------------------------------------------------------------


def test_export_ctranslate2_checks_arguments(tmp_path):
    with pytest.raises(ValueError, match="quantization 'int4'"):
        export_ctranslate2(tmp_path, tmp_path / "out", quantization="int4")
    pruned = save_pruned(make_tiny_whisper(), None, tmp_path / "pruned", pruning={}, source="x")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        export_ctranslate2(pruned, tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# integration: real tiny.en, real speech
# ----------------------------------------------------------------------------------------------


def _test_clean(shared_data):
    import soundfile

    root = shared_data / "librispeech_test_clean"
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines() if line]
    assert len(rows) == 4
    audios = []
    for row in rows:
        audio, rate = soundfile.read(root / row["audio"], dtype="float32")
        assert rate == 16000 and audio.ndim == 1
        audios.append(audio)
    return audios


def _greedy_torch_and_ct2(model, processor, ct2_dir, audios) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy text tokens of the torch model and of its CTranslate2 export on the same features."""
    import ctranslate2

    features = processor.feature_extractor(audios, sampling_rate=16000, return_tensors="pt").input_features
    tok = processor.tokenizer
    with torch.no_grad():
        generated = model.generate(features, num_beams=1, do_sample=False, return_timestamps=False)
    special = set(tok.all_special_ids)
    torch_ids = [[t for t in seq.tolist() if t not in special] for seq in generated]
    ct2 = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32")
    prompt = tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    results = ct2.generate(ctranslate2.StorageView.from_array(features.numpy()), [prompt] * len(audios), beam_size=1)
    return torch_ids, [[t for t in r.sequences_ids[0] if t not in special] for r in results]


@pytest.fixture(scope="module")
def pruned_tiny_en(tmp_path_factory):
    """tiny.en with decoder self-attention pruned to 50%, saved and exported to CTranslate2."""
    from asrprune.models import load_model

    model, processor = load_model("tiny.en")
    source_fp = model_fingerprint(model)
    pruning = _prune_decoder_self_attn(model, 0.5)
    root = tmp_path_factory.mktemp("tiny_en_pruned")
    pruned_dir = save_pruned(model, processor, root / "hf", pruning=pruning, source="tiny.en",
                             source_fingerprint=source_fp)
    ct2_dir = export_ctranslate2(pruned_dir, root / "ct2")
    return model, processor, pruned_dir, ct2_dir


@pytest.mark.integration
def test_ctranslate2_export_gives_torch_greedy_transcripts(pruned_tiny_en, shared_data):
    from faster_whisper import WhisperModel

    model, processor, pruned_dir, ct2_dir = pruned_tiny_en
    assert {"model.bin", "tokenizer.json", "preprocessor_config.json", PRUNING_FILENAME} <= {
        p.name for p in ct2_dir.iterdir()}
    audios = _test_clean(shared_data)
    special = set(processor.tokenizer.all_special_ids)
    torch_ids, ct2_ids = _greedy_torch_and_ct2(model, processor, ct2_dir, audios)
    assert ct2_ids == torch_ids
    assert all(len(ids) > 3 for ids in torch_ids)

    # faster-whisper's own pipeline: it computes log-mels without padding the audio to 30 s and
    # pads the *features* with zeros, so the encoder input differs from the processor's and a
    # fragile pruned model may decode differently. Feed the torch model the very features
    # faster-whisper builds (same recipe as WhisperModel.generate_segments) and compare tokens.
    from faster_whisper.audio import pad_or_trim

    fw = WhisperModel(str(ct2_dir), device="cpu", compute_type="float32")
    fw_tokens, fw_features = [], []
    for audio in audios:
        segments, _ = fw.transcribe(audio, beam_size=1, temperature=0.0, without_timestamps=True,
                                    vad_filter=False, condition_on_previous_text=False, language="en")
        fw_tokens.append([t for s in segments for t in s.tokens if t not in special])
        fw_features.append(pad_or_trim(fw.feature_extractor(audio)[:, :-1]))
    with torch.no_grad():
        generated = model.generate(torch.from_numpy(np.stack(fw_features)), num_beams=1,
                                   do_sample=False, return_timestamps=False)
    assert fw_tokens == [[t for t in seq.tolist() if t not in special] for seq in generated]


@pytest.mark.integration
def test_pruned_tiny_en_directory_loads_everywhere(pruned_tiny_en):
    from transformers import WhisperForConditionalGeneration

    from asrprune.models import load_model

    model, _, pruned_dir, _ = pruned_tiny_en
    assert (pruned_dir / "normalizer.json").is_file()
    plain = WhisperForConditionalGeneration.from_pretrained(pruned_dir)
    assert plain.proj_out.weight is plain.model.decoder.embed_tokens.weight
    assert model_fingerprint(plain) == model_fingerprint(model)
    again, processor = load_model(pruned_dir)
    assert model_fingerprint(again) == model_fingerprint(model)
    assert processor.tokenizer.normalize("Mr. Smith's colour") == "mister smith is color"
    info = json.loads((pruned_dir / PRUNING_FILENAME).read_text())
    zeros = 4 * 4 * 384 * 384 // 2  # 4 decoder layers x q, k, v, out (384 x 384) at 50%
    assert info["saved_sparsity"]["n_parameters"] - info["saved_sparsity"]["n_nonzero"] >= zeros


# ----------------------------------------------------------------------------------------------
# CLI: asrprune prune / asrprune export
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prune", "tiny.en", "--plan", "decoder.self_attn=50", "--out", "{out}"], "write 0.5"),
        (["prune", "tiny.en", "--plan", "decoder.self_attn=0.5,late_encoder=0.3", "--mode", "global",
          "--out", "{out}"], "one sparsity shared"),
        (["prune", "tiny.en", "--plan", "decoder.self_attn=0.5", "--quantization", "int8",
          "--out", "{out}"], "--format ctranslate2"),
        (["prune", "tiny.en", "--plan-file", "{tmp}/missing.yaml", "--out", "{out}"], "missing.yaml"),
        (["prune", "tiny.en", "--plan", "decoder.self_attn=0.5", "--out", "{full}"], "not empty"),
        (["export", "{tmp}/nowhere", "--format", "compressed", "--out", "{out}"], "nowhere"),
        (["export", "{full}", "--format", "hf", "--out", "{out}"], "already a save_pretrained"),
    ],
)
def test_cli_rejects_bad_input_before_loading_a_model(tmp_path, capsys, argv, message):
    from asrprune.cli import main

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    argv = [a.format(out=tmp_path / "out", tmp=tmp_path, full=tmp_path / "full") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and f"asrprune {argv[0]}: error:" in err
    # a flag combination that cannot work is a usage error (usage + error); a bad value is one line
    assert err.startswith("usage:") == (message == "--format ctranslate2")
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_cli_prune_and_export_tiny_en(tmp_path, capsys, shared_data):
    from transformers import WhisperForConditionalGeneration

    from asrprune.cli import main

    out = tmp_path / "pruned"
    plan = tmp_path / "plan.yaml"
    plan.write_text("entries:\n  - {selector: decoder.self_attn, sparsity: 0.5}\n"
                    "  - {selector: late_encoder, sparsity: 0.5}\n")
    assert main(["prune", "tiny.en", "--plan-file", str(plan), "--out", str(out),
                 "--format", "hf", "--format", "compressed"]) == 0
    printed = capsys.readouterr().out
    # 4 decoder layers x 4 (384 x 384) matrices; late_encoder = last 2 of 4 encoder layers:
    # q, k, v, out (384 x 384) + fc1, fc2 (384 x 1536)
    dec, enc = 16 * 384 * 384, 2 * (4 * 384 * 384 + 2 * 384 * 1536)
    assert f"{dec:,}" in printed and f"{enc:,}" in printed and "50.00%" in printed
    assert "all parameters:" in printed and "linear weights (attention + FFN):" in printed
    assert f"wrote compressed: {out / 'compressed'}" in printed

    info = json.loads((out / PRUNING_FILENAME).read_text())
    assert info["source"]["spec"] == "tiny.en" and len(info["source"]["fingerprint"]) == 16
    entries = info["pruning"]["entries"]
    assert [(e["selector"], e["numel"], e["measured_sparsity"]) for e in entries] == [
        ("decoder.self_attn", dec, 0.5), ("late_encoder", enc, 0.5)]
    zeros = info["saved_sparsity"]["n_parameters"] - info["saved_sparsity"]["n_nonzero"]
    assert zeros == info["pruning"]["overall"]["all_parameters"]["numel"] - \
        info["pruning"]["overall"]["all_parameters"]["nonzero"]
    assert zeros >= (dec + enc) // 2
    # the compressed file stores tiny.en's 37.8M fp32 parameters; the pruned 3.1M zeros save
    # about 4 bytes each minus the 1-bit masks of the matrices stored as bitmask
    dense = (out / "model.safetensors").stat().st_size
    compressed = (out / "compressed" / COMPRESSED_FILENAME).stat().st_size
    assert dense - compressed > 0.8 * 4 * (dec + enc) // 2

    # compressed -> hf again: bit-identical to the pruned directory
    assert main(["export", str(out / "compressed"), "--format", "hf", "--out", str(tmp_path / "back")]) == 0
    a = WhisperForConditionalGeneration.from_pretrained(out)
    b = WhisperForConditionalGeneration.from_pretrained(tmp_path / "back")
    assert model_fingerprint(a) == model_fingerprint(b) == info["model"]["fingerprint"]
    assert (tmp_path / "back" / "normalizer.json").is_file()
    assert (tmp_path / "back" / PRUNING_FILENAME).read_text() == (out / PRUNING_FILENAME).read_text()

    # re-pruning into the same directory without --overwrite is refused; with it, stale
    # exports of the earlier plan are removed
    assert main(["prune", "tiny.en", "--plan", "decoder.self_attn=0.3", "--out", str(out)]) == 2
    assert main(["prune", "tiny.en", "--plan", "decoder.self_attn=0.3", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "compressed").exists()
    assert json.loads((out / PRUNING_FILENAME).read_text())["pruning"]["plan_text"] == "decoder.self_attn=0.3"

    # asrprune evaluate reads the pruned directory like any model
    ev = tmp_path / "eval"
    assert main(["evaluate", str(out), str(shared_data / "librispeech_test_clean" / "manifest.jsonl"),
                 "--out", str(ev), "--limit", "2", "--device", "cpu", "--workers", "0",
                 "--bootstrap-n", "50"]) == 0
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["n_utterances"] == 2 and summary["n_failed"] == 0 and 0 <= summary["wer"] < 0.5


@pytest.mark.integration
def test_sparsegpt_pruned_tiny_en_saves_loads_converts_and_refuses_its_calibration(tmp_path, capsys, shared_data):
    """CLI prune --score sparsegpt on real speech: the directory loads with plain transformers,
    CTranslate2 greedy tokens equal torch's, and an evaluation on the calibration data is refused."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from asrprune.cli import main
    from asrprune.models import load_model
    from asrprune.prune import measure_model

    out = tmp_path / "sgpt"
    lj = shared_data / "ljspeech" / "manifest.jsonl"
    assert main(["prune", "tiny.en", "--plan", "all_linear=0.4", "--score", "sparsegpt", "--calibration",
                 f"{lj}::LJ001-*", "--calibration-limit", "8", "--format", "ctranslate2", "--no-progress",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    info = json.loads((out / PRUNING_FILENAME).read_text())
    calib = info["pruning"]["calibration"]
    assert calib["method"] == "sparsegpt" and calib["n_utterances"] == 8 and calib["ids"][0].startswith("LJ001-")
    assert [u["id"] for u in calib["data"]["utterances"]] == calib["ids"] and calib["data"]["fingerprint"]
    plain = WhisperForConditionalGeneration.from_pretrained(out)
    assert plain.proj_out.weight is plain.model.decoder.embed_tokens.weight  # still tied, untouched
    assert measure_model(plain).linear_weights.sparsity == pytest.approx(0.4, abs=1e-5)
    ours, _ = load_model(out)
    assert model_fingerprint(ours) == model_fingerprint(plain)

    processor = WhisperProcessor.from_pretrained(out)
    torch_ids, ct2_ids = _greedy_torch_and_ct2(plain, processor, out / "ctranslate2", _test_clean(shared_data))
    assert ct2_ids == torch_ids
    assert all(len(ids) > 3 for ids in torch_ids)  # it still transcribes

    # the calibration utterances are not test data for this model
    ev = tmp_path / "ev"
    assert main(["evaluate", str(out), str(lj), "--include", "LJ001-*", "--limit", "2", "--out", str(ev)]) == 2
    assert "overlaps the model's calibration data" in capsys.readouterr().err and not ev.exists()
    assert main(["evaluate", str(out), str(lj), "--include", "LJ001-*", "--limit", "1", "--allow-overlap",
                 "--out", str(ev)]) == 0
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["calibration_overlap"]["count"] == 1 and summary["calibration_overlap"]["allowed"] is True


@pytest.mark.parametrize("argv, message", [
    (["--plan", "all_linear=0.4", "--score", "sparsegpt"], "--score sparsegpt needs --calibration"),
    (["--plan", "all_linear=0.4", "--calibration", "x.jsonl"], "--calibration is for --score wanda or sparsegpt"),
    (["--plan", "all_linear=0.4", "--score", "sparsegpt", "--mode", "global", "--calibration", "x.jsonl"],
     "global"),
])
def test_cli_prune_method_flags_refused_before_loading(tmp_path, capsys, argv, message):
    from asrprune.cli import main

    assert main(["prune", "tiny.en", *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
