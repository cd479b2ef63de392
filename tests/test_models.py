"""Model loading: CTranslate2 -> transformers conversion is exact, built-ins, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from asrprune.models import (
    BUILTIN_MODELS,
    ModelLoadError,
    convert_ctranslate2,
    list_models,
    load_model,
    model_fingerprint,
    read_ctranslate2_model,
    resolve_model_dir,
)

from conftest import make_tiny_whisper


# ----------------------------------------------------------------------------------------------
# fast unit tests
# ----------------------------------------------------------------------------------------------


def test_unknown_spec_names_builtins_and_routes(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        resolve_model_dir("no-such-model")
    message = str(err.value)
    assert "tiny.en" in message and "base" in message and "directory" in message


def test_directory_that_is_no_model_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        resolve_model_dir(tmp_path)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_model("openai/whisper-small")
    message = str(err.value)
    assert "openai/whisper-small" in message and "tiny.en" in message and "save_pretrained" in message


def test_fingerprint_changes_with_one_weight():
    a, b = make_tiny_whisper(seed=0), make_tiny_whisper(seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.model.decoder.layers[0].fc1.weight[0, 0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)


def test_missing_ctranslate2_files_are_named(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="config.json"):
        convert_ctranslate2(tmp_path, tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# integration: the embedded tiny.en (and base behind the slow marker)
# ----------------------------------------------------------------------------------------------


def _ct2_dir(name: str, tmp_path: Path) -> Path:
    """The original CTranslate2 directory of a built-in (parts concatenated where split)."""
    builtin = BUILTIN_MODELS[name]
    parts = builtin.part_paths()
    files = builtin.file_paths()
    if len(parts) == 1:
        return parts[0].parent
    out = tmp_path / f"{name}-ct2"
    out.mkdir()
    with open(out / "model.bin", "wb") as f:
        for part in parts:
            f.write(part.read_bytes())
    for path in files:
        (out / path.name).write_bytes(path.read_bytes())
    return out


def _round_trip(name: str, tmp_path: Path) -> None:
    import ctranslate2

    source_dir = _ct2_dir(name, tmp_path)
    converted = resolve_model_dir(name)
    back = tmp_path / "back"
    converter = ctranslate2.converters.TransformersConverter(str(converted), load_as_float16=True)
    converter.convert(str(back))
    original = read_ctranslate2_model(source_dir / "model.bin")
    again = read_ctranslate2_model(back / "model.bin")
    # A newer converter may add spec flags the source predates (scalars such as
    # decoder/scale_alibi = False); every variable of the source must come back unchanged.
    extra = set(again.variables) - set(original.variables)
    assert not set(original.variables) - set(again.variables)
    assert all(again.variables[k].shape == () and not again.variables[k].any() for k in extra), extra
    assert again.aliases == original.aliases
    for key, value in original.variables.items():
        other = again.variables[key]
        assert other.dtype == value.dtype and other.shape == value.shape, key
        assert other.tobytes() == value.tobytes(), f"{key} differs after the round trip"
    source_config = json.loads((source_dir / "config.json").read_text())
    back_config = json.loads((back / "config.json").read_text())
    for key in ("suppress_ids", "suppress_ids_begin", "alignment_heads", "lang_ids"):
        assert back_config[key] == source_config[key], key


@pytest.mark.integration
def test_tiny_en_round_trip_is_bit_identical(tmp_path):
    _round_trip("tiny.en", tmp_path)


@pytest.mark.slow
def test_base_round_trip_is_bit_identical(tmp_path):
    _round_trip("base", tmp_path)


def _features(processor, shared_data: Path, n: int):
    import soundfile as sf

    manifest = shared_data / "librispeech_test_clean" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()][:n]
    feats = []
    for row in rows:
        audio, rate = sf.read(manifest.parent / row["audio"], dtype="float32")
        assert rate == 16000
        feats.append(processor.feature_extractor(audio, sampling_rate=16000, return_tensors="np").input_features[0])
    return rows, np.stack(feats)  # (B, 80, 3000)


def _prompt(model, processor) -> list[int]:
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids("<|startoftranscript|>")]
    if model.generation_config.is_multilingual:
        ids += [tok.convert_tokens_to_ids("<|en|>"), tok.convert_tokens_to_ids("<|transcribe|>")]
    return ids + [tok.convert_tokens_to_ids("<|notimestamps|>")]


def _teacher_forced_agreement(name: str, tmp_path: Path, shared_data: Path) -> float:
    import ctranslate2

    model, processor = load_model(name)
    rows, feats = _features(processor, shared_data, 1)
    prompt = _prompt(model, processor)
    text = " " + rows[0]["text"].capitalize()
    ids = prompt + processor.tokenizer(text, add_special_tokens=False).input_ids + [model.generation_config.eos_token_id]
    with torch.no_grad():
        logits = model(input_features=torch.from_numpy(feats), decoder_input_ids=torch.tensor([ids])).logits[0]
    ours = torch.log_softmax(logits.float(), dim=-1)  # (T, V)

    ct2 = ctranslate2.models.Whisper(str(_ct2_dir(name, tmp_path)), device="cpu", compute_type="float32")
    # CTranslate2 forces the prompt tokens after the start sequence and returns one logits vector
    # per decoding step, from the first position after the start sequence.
    result = ct2.generate(
        ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)),
        [ids[:-1]],
        beam_size=1,
        max_length=448,
        return_logits_vocab=True,
        suppress_blank=False,
        suppress_tokens=[],
    )[0]
    steps = len(ids) - len(prompt)
    theirs = torch.stack(
        [torch.log_softmax(torch.from_numpy(np.asarray(x)).float(), -1) for x in result.logits[0][:steps]]
    )
    start = len(prompt) - 1
    diff = (ours[start : start + steps] - theirs).abs()
    # log-probabilities of the reference tokens, and of the whole vocabulary
    target = torch.tensor(ids[len(prompt) :])
    token_diff = diff.gather(1, target[:, None]).max().item()
    assert token_diff < 1e-3, token_diff
    return diff.max().item()


@pytest.mark.integration
def test_tiny_en_teacher_forced_logprobs_match_ctranslate2(tmp_path, shared_data):
    assert _teacher_forced_agreement("tiny.en", tmp_path, shared_data) < 1e-3


@pytest.mark.slow
def test_base_teacher_forced_logprobs_match_ctranslate2(tmp_path, shared_data):
    assert _teacher_forced_agreement("base", tmp_path, shared_data) < 1e-3


@pytest.mark.integration
def test_tiny_en_greedy_transcripts_equal_ctranslate2(tmp_path, shared_data):
    import ctranslate2

    model, processor = load_model("tiny.en")
    rows, feats = _features(processor, shared_data, 4)
    assert len(rows) == 4
    ct2 = ctranslate2.models.Whisper(str(_ct2_dir("tiny.en", tmp_path)), device="cpu", compute_type="float32")
    prompt = _prompt(model, processor)
    theirs = ct2.generate(
        ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)),
        [prompt] * len(rows),
        beam_size=1,
        max_length=448,
    )
    with torch.no_grad():
        ours = model.generate(torch.from_numpy(feats), num_beams=1, do_sample=False, return_timestamps=False)
    for row, seq, result in zip(rows, ours, theirs):
        mine = processor.tokenizer.decode(seq, skip_special_tokens=True).strip()
        other = processor.tokenizer.decode(result.sequences_ids[0], skip_special_tokens=True).strip()
        assert mine == other, row["id"]
        assert mine  # a real transcript, not empty


@pytest.mark.integration
def test_normalizer_works_offline_and_matches_whisper_normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    _, processor = load_model("tiny.en")
    text = "Mr. Smith's colour was 10%"
    assert processor.tokenizer.normalize(text) == "mister smith is color was 10%"
    assert processor.tokenizer.normalize(text) == EnglishTextNormalizer()(text)


@pytest.mark.integration
def test_tokenizer_has_specials_and_timestamps():
    model, processor = load_model("tiny.en")
    tok = processor.tokenizer
    assert len(tok) == model.config.vocab_size == 51864
    assert tok.convert_tokens_to_ids("<|notimestamps|>") == model.generation_config.no_timestamps_token_id == 50362
    assert tok.convert_tokens_to_ids("<|0.00|>") == 50363
    assert tok.convert_tokens_to_ids("<|30.00|>") == 51863
    assert model.model.decoder.embed_tokens.weight.data_ptr() == model.proj_out.weight.data_ptr()
    names = {row.name for row in list_models()}
    assert {"tiny.en", "base"} <= names


@pytest.mark.integration
def test_ctranslate2_directory_spec_converts_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASRPRUNE_CACHE", str(tmp_path / "cache"))
    source = _ct2_dir("tiny.en", tmp_path)
    target = resolve_model_dir(source)
    assert target.is_dir() and (target / "normalizer.json").is_file()
    assert str(target).startswith(str(tmp_path / "cache"))
    # a second resolution reuses the conversion
    assert resolve_model_dir(source) == target


def test_is_multilingual_reads_the_flag_then_the_vocabulary():
    from types import SimpleNamespace

    from asrprune.models import is_multilingual

    def model(flag, vocab, lang_to_id=None):
        gc = SimpleNamespace(is_multilingual=flag, lang_to_id=lang_to_id or {})
        return SimpleNamespace(generation_config=gc, config=SimpleNamespace(vocab_size=vocab))

    assert is_multilingual(model(True, 51864)) and not is_multilingual(model(False, 51865))
    # no flag: the vocabulary decides; the hub's English-only configs carry a lang_to_id table too
    assert not is_multilingual(model(None, 51864, {"<|en|>": 50259, "<|de|>": 50261}))
    assert is_multilingual(model(None, 51865))
