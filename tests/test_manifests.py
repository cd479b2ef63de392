"""Speech-set readers, audio loading and the calibration/evaluation overlap guard.

Every layout is tested on a small folder built in tmp_path from the shared real speech
(LibriSpeech test-clean 1089-*), and audio read back is compared with the original samples.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from scipy import signal

from asrprune.manifests import (
    LAYOUTS,
    AudioError,
    DatasetUnavailableError,
    ManifestError,
    SpeechSet,
    Utterance,
    clean_tedlium_text,
    load_audio,
    read_speech_set,
    speech_set_from_hf,
    write_manifest,
)
from asrprune.overlap import OverlapError, check_disjoint, fingerprint

CLEAN_IDS = ["1089-134686-0000", "1089-134686-0001", "1089-134691-0000", "1089-134691-0001"]


@pytest.fixture(scope="module")
def clean_dir(shared_data) -> Path:
    return shared_data / "librispeech_test_clean"


@pytest.fixture(scope="module")
def clean(clean_dir) -> dict[str, dict]:
    """The shared test-clean manifest rows by id, with the audio path made absolute."""
    rows = {}
    for line in (clean_dir / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        row["audio"] = str(clean_dir / row["audio"])
        rows[row["id"]] = row
    return rows


def _pcm(path) -> np.ndarray:
    """The file's samples as float32 in [-1, 1), read independently of asrprune."""
    data, _ = sf.read(path, dtype="int16")
    return data.astype(np.float32) / 32768.0


def _write_mp3(path: Path, x: np.ndarray, rate: int, out_rate: int = 32000) -> None:
    """Encode mono float audio to MP3 with PyAV (ffmpeg's own resampler to ``out_rate``)."""
    with av.open(str(path), "w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=out_rate, layout="mono")
        samples = x[None, :].astype(np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate = rate
        resampler = av.AudioResampler(
            format=stream.codec_context.format.name, layout="mono", rate=out_rate
        )
        for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(chunk):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


# ----------------------------------------------------------------------------------------------
# our JSONL manifest
# ----------------------------------------------------------------------------------------------


def test_jsonl_manifest_file_and_folder(clean_dir, clean):
    by_folder = read_speech_set(clean_dir)
    by_file = read_speech_set(clean_dir / "manifest.jsonl")
    assert by_folder.layout == by_file.layout == "jsonl"
    assert by_folder.name == "librispeech_test_clean"
    assert by_folder.ids == by_file.ids == CLEAN_IDS
    assert by_folder.errors == []
    for utt in by_folder:
        row = clean[utt.id]
        assert utt.text == row["text"]
        assert utt.audio == str(Path(row["audio"]).resolve())
        assert utt.duration_s == row["duration_s"]
        assert utt.speaker == "1089"
        assert utt.extra["chapter"] == row["chapter"]
        assert utt.source.startswith("github:")


def test_load_audio_shared_flac_is_16k_mono_exact(clean_dir):
    utt = read_speech_set(clean_dir, include="1089-134691-0000")[0]
    audio = load_audio(utt)
    expected = _pcm(utt.audio)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == sf.info(utt.audio).frames == round(utt.duration_s * 16000)
    np.testing.assert_array_equal(audio, expected)


def test_long_test_other_utterance_loads_whole(shared_data):
    """7018-75789-0029 is 33.7 s: nothing may cut it to Whisper's 30 s window."""
    utt = read_speech_set(shared_data / "librispeech_test_other", include="7018-75789-0029")[0]
    audio = load_audio(utt)
    frames = sf.info(utt.audio).frames
    assert len(audio) == frames
    assert len(audio) > 30 * 16000
    assert abs(len(audio) / 16000 - 33.7) < 0.05
    assert abs(utt.duration_s - len(audio) / 16000) < 1e-3


def test_write_manifest_round_trip(tmp_path, clean_dir):
    original = read_speech_set(clean_dir)
    path = write_manifest(original, tmp_path / "copy" / "manifest.jsonl")
    row = json.loads(path.read_text().splitlines()[0])
    assert not Path(row["audio"]).is_absolute()  # relative to the manifest
    again = read_speech_set(path)
    assert again.utterances == original.utterances


# ----------------------------------------------------------------------------------------------
# layouts users download
# ----------------------------------------------------------------------------------------------


def test_librispeech_folder(tmp_path, clean):
    split = tmp_path / "LibriSpeech" / "test-clean"
    for chapter in ("134686", "134691"):
        folder = split / "1089" / chapter
        folder.mkdir(parents=True)
        ids = [i for i in CLEAN_IDS if i.split("-")[1] == chapter]
        for utt_id in ids:
            shutil.copy(clean[utt_id]["audio"], folder / f"{utt_id}.flac")
        (folder / f"1089-{chapter}.trans.txt").write_text(
            "".join(f"{i} {clean[i]['text']}\n" for i in ids)
        )
    for source in (split, tmp_path / "LibriSpeech", split / "1089" / "134686"):
        got = read_speech_set(source)
        assert got.layout == "librispeech"
        expected = CLEAN_IDS if source != split / "1089" / "134686" else CLEAN_IDS[:2]
        assert got.ids == expected
        for utt in got:
            assert utt.text == clean[utt.id]["text"]
            assert utt.speaker == "1089"
            assert utt.extra["chapter"] == utt.id.split("-")[1]
            assert utt.duration_s == pytest.approx(clean[utt.id]["duration_s"], abs=1e-6)
    assert read_speech_set(split).name == "test-clean"
    np.testing.assert_array_equal(
        load_audio(read_speech_set(split)[1]), _pcm(clean[CLEAN_IDS[1]]["audio"])
    )


def test_librispeech_root_with_two_splits_needs_a_choice(tmp_path, clean):
    for split in ("test-clean", "test-other"):
        folder = tmp_path / split / "1089" / "134686"
        folder.mkdir(parents=True)
        shutil.copy(clean[CLEAN_IDS[0]]["audio"], folder / f"{CLEAN_IDS[0]}.flac")
        (folder / "1089-134686.trans.txt").write_text(f"{CLEAN_IDS[0]} HE HOPED\n")
    with pytest.raises(ValueError, match="several LibriSpeech splits"):
        read_speech_set(tmp_path)
    assert read_speech_set(tmp_path, split="test-other").ids == [CLEAN_IDS[0]]


def test_common_voice_folder_with_mp3_clips(tmp_path, clean):
    release = tmp_path / "cv-corpus-15.0" / "en"
    (release / "clips").mkdir(parents=True)
    columns = "client_id path sentence up_votes down_votes age gender accents locale segment"
    header = "\t".join(columns.split()) + "\n"
    rows = {"test": CLEAN_IDS[:3], "dev": CLEAN_IDS[3:]}
    sentences = {}
    for split, ids in rows.items():
        lines = [header]
        for k, utt_id in enumerate(ids):
            clip = f"common_voice_en_{k}{split}.mp3"
            x, rate = sf.read(clean[utt_id]["audio"], dtype="float32")
            _write_mp3(release / "clips" / clip, x, rate)
            # Common Voice sentences have casing, punctuation and bare double quotes.
            sentence = f'"{clean[utt_id]["text"].capitalize()}," he said.'
            sentences[Path(clip).stem] = (sentence, utt_id)
            lines.append(f"client{k}\t{clip}\t{sentence}\t2\t0\tthirties\t\t\ten\t\n")
        (release / f"{split}.tsv").write_text("".join(lines))

    test = read_speech_set(tmp_path / "cv-corpus-15.0")  # release root with one language
    assert test.layout == "commonvoice"
    assert test.ids == ["common_voice_en_0test", "common_voice_en_1test", "common_voice_en_2test"]
    dev = read_speech_set(release, split="dev")
    assert dev.ids == ["common_voice_en_0dev"]
    for utt in [*test, *dev]:
        sentence, utt_id = sentences[utt.id]
        assert utt.text == sentence
        assert utt.speaker.startswith("client")
        assert utt.extra["age"] == "thirties"
        assert utt.duration_s == pytest.approx(clean[utt_id]["duration_s"], abs=0.05)
    # MP3 at 32 kHz -> 16 kHz: same length, and close to the original (lossy codec)
    utt = test[2]
    audio = load_audio(utt)
    original = _pcm(clean[sentences[utt.id][1]]["audio"])
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - len(original)) <= 160
    n = min(len(audio), len(original))
    assert np.corrcoef(audio[:n], original[:n])[0, 1] > 0.98
    with pytest.raises(FileNotFoundError, match="no train.tsv; available splits: dev, test"):
        read_speech_set(release, split="train")


def _nist_header(n_samples: int, rate: int = 16000) -> bytes:
    """A NIST SPHERE header laid out as in the TED-LIUM 3 .sph files."""
    fields = (
        "NIST_1A\n   1024\n"
        f"sample_count -i {n_samples}\n"
        "sample_n_bytes -i 2\nchannel_count -i 1\nsample_byte_format -s2 01\n"
        f"sample_rate -i {rate}\nsample_coding -s3 pcm\nsample_min -i -32768\n"
        "sample_max -i 32767\nend_head\n"
    )
    return fields.encode().ljust(1024, b"\0")


def test_tedlium_folder_segments_cut_by_stm_times(tmp_path, clean):
    root = tmp_path / "TEDLIUM_release-3" / "legacy" / "test"
    (root / "stm").mkdir(parents=True)
    (root / "sph").mkdir()
    # Talk A (written by soundfile): 0.5 s silence, utt 0, gap to 11.00 s, utt 1 at 12.00 s.
    pcm = {i: sf.read(clean[i]["audio"], dtype="int16")[0] for i in CLEAN_IDS}
    talk = np.zeros(16000 * 16, dtype=np.int16)
    talk[8000:8000 + len(pcm[CLEAN_IDS[0]])] = pcm[CLEAN_IDS[0]]
    talk[192000:192000 + len(pcm[CLEAN_IDS[1]])] = pcm[CLEAN_IDS[1]]
    sf.write(root / "sph" / "TalkA_2010.sph", talk, 16000, format="NIST", subtype="PCM_16")
    end0 = 0.5 + len(pcm[CLEAN_IDS[0]]) / 16000
    end1 = 12.0 + len(pcm[CLEAN_IDS[1]]) / 16000
    (root / "stm" / "TalkA_2010.stm").write_text(
        f"TalkA_2010 1 TalkA_2010 0.50 {end0:.3f} <o,f0,male> he hoped there would be <unk> "
        "stew for dinner\n"
        "TalkA_2010 1 TalkA_2010 11.00 11.80 <o,f0,male> ignore_time_segment_in_scoring\n"
        f"TalkA_2010 1 TalkA_2010 12.00 {end1:.3f} <o,f0,male> stuff it into you his belly 's "
        "counselled him do n't\n"
    )
    # Talk B: the NIST header written by hand, as in the corpus; one segment = the whole file.
    x = pcm[CLEAN_IDS[2]]
    (root / "sph" / "TalkB_2011.sph").write_bytes(_nist_header(len(x)) + x.astype("<i2").tobytes())
    (root / "stm" / "TalkB_2011.stm").write_text(
        f"TalkB_2011 1 TalkB_2011 0.00 {len(x) / 16000:.3f} <o,f0,female> he could wait no longer\n"
    )

    got = read_speech_set(tmp_path / "TEDLIUM_release-3")  # finds legacy/test
    assert got.layout == "tedlium"
    # ids as Kaldi's TED-LIUM recipe makes them: speaker-int(start*100+.5)-int(end*100+.5)
    assert got.ids == ["TalkA_2010-0000050-0001094", "TalkA_2010-0001200-0001528",
                       "TalkB_2011-0000000-0000209"]
    assert [u.text for u in got] == [
        "he hoped there would be stew for dinner",
        "stuff it into you his belly's counselled him don't",
        "he could wait no longer",
    ]
    assert got[0].extra["text_raw"].count("<unk>") == 1
    assert got[1].start_s == 12.0 and got[1].end_s == pytest.approx(end1, abs=1e-3)
    assert got[1].duration_s == pytest.approx(end1 - 12.0, abs=1e-3)
    for utt, utt_id in zip(got, CLEAN_IDS[:2] + CLEAN_IDS[2:3]):
        np.testing.assert_array_equal(load_audio(utt), pcm[utt_id].astype(np.float32) / 32768.0)
    assert read_speech_set(root / "stm" / "TalkB_2011.stm").ids == ["TalkB_2011-0000000-0000209"]


def test_clean_tedlium_text():
    assert clean_tedlium_text("<unk> it 's a {NOISE} way <sil> 'cause") == "it's a way 'cause"
    assert clean_tedlium_text("i don 't know we 're here ca n't you 'll") == \
        "i don't know we're here can't you'll"
    assert clean_tedlium_text("") == ""


def test_csv_and_tsv(tmp_path, clean):
    audio = tmp_path / "data" / "audio"
    audio.mkdir(parents=True)
    for utt_id in CLEAN_IDS:
        shutil.copy(clean[utt_id]["audio"], audio / f"{utt_id}.flac")
    (tmp_path / "data" / "set.csv").write_text(
        "path,text,speaker\n"
        f'audio/{CLEAN_IDS[0]}.flac,"Hello, world",1089\n'
        f"audio/{CLEAN_IDS[1]}.flac,,1089\n"                       # empty reference: kept
        f"audio/{CLEAN_IDS[2]}.flac,too,many,columns\n"            # recorded, rest read
        f"{audio / CLEAN_IDS[3]}.flac,absolute path,\n"
    )
    got = read_speech_set(tmp_path / "data" / "set.csv")
    assert got.layout == "csv"
    assert got.ids == [CLEAN_IDS[0], CLEAN_IDS[1], CLEAN_IDS[3]]
    assert [u.text for u in got] == ["Hello, world", "", "absolute path"]
    assert [u.speaker for u in got] == ["1089", "1089", None]
    assert got[0].audio == str((audio / f"{CLEAN_IDS[0]}.flac").resolve())
    assert got[0].duration_s == pytest.approx(clean[CLEAN_IDS[0]]["duration_s"], abs=1e-6)
    assert len(got.errors) == 1 and got.errors[0].line == 4 and "columns" in got.errors[0].reason

    (tmp_path / "data" / "set.tsv").write_text(
        "id\taudio\ttext\tduration_s\n"
        f"utt-a\taudio/{CLEAN_IDS[2]}.flac\tHe said \"wait\".\t2.085\n"
        f"utt-b\taudio/{CLEAN_IDS[3]}.flac\tsecond\tnot-a-number\n"
    )
    tsv = read_speech_set(tmp_path / "data" / "set.tsv")
    assert tsv.ids == ["utt-a"] and tsv[0].text == 'He said "wait".' and tsv[0].duration_s == 2.085
    assert tsv.errors[0].line == 3 and "duration_s" in tsv.errors[0].reason

    (tmp_path / "noheader.csv").write_text(f"audio/{CLEAN_IDS[0]}.flac,HELLO\n")
    with pytest.raises(ValueError, match="needs a header row"):
        read_speech_set(tmp_path / "noheader.csv")


def test_unknown_folder_and_missing_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="Supported speech-set layouts") as info:
        read_speech_set(tmp_path / "empty")
    for layout in ("librispeech", "commonvoice", "tedlium", "jsonl", "csv"):
        assert layout in str(info.value)
    assert set(LAYOUTS) >= {"jsonl", "csv", "librispeech", "commonvoice", "tedlium", "hf"}
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_speech_set(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="nothere"):
        read_speech_set(str(tmp_path / "nothere"))


# ----------------------------------------------------------------------------------------------
# resampling and mixing
# ----------------------------------------------------------------------------------------------


def test_8k_stereo_file_resampled_matches_band_limited_original(tmp_path, clean):
    """8 kHz stereo -> 16 kHz mono equals the original low-passed below 4 kHz (scipy, not soxr)."""
    x = _pcm(clean[CLEAN_IDS[1]]["audio"]).astype(np.float64)
    taps = signal.firwin(511, 3400, fs=16000)
    band_limited = signal.filtfilt(taps, [1.0], x)  # zero phase, nothing above ~3.6 kHz
    x8 = band_limited[::2]  # exact 2:1 decimation of a signal with no content above 4 kHz
    wobble = 0.05 * np.sin(2 * np.pi * 440 * np.arange(len(x8)) / 8000)
    stereo = np.stack([x8 + wobble, x8 - wobble], axis=1)  # channel mean = x8
    path = tmp_path / "stereo8k.wav"
    sf.write(path, stereo, 8000, subtype="FLOAT")

    audio = load_audio(Utterance("stereo8k", str(path), "text"))
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == len(x)
    core = slice(1600, len(x) - 1600)  # ignore filter edges
    err = audio[core] - band_limited[core]
    assert np.corrcoef(audio[core], band_limited[core])[0, 1] > 0.999
    assert np.sqrt(np.mean(err**2)) / np.sqrt(np.mean(band_limited[core] ** 2)) < 0.02

    # The same samples in memory (as a hub dataset gives them) come back the same.
    in_memory = Utterance("mem", "hf://x", "text", array=stereo, sampling_rate=8000)
    np.testing.assert_allclose(load_audio(in_memory), audio, atol=1e-6)


def test_other_rates_and_segments(tmp_path, clean):
    x = _pcm(clean[CLEAN_IDS[2]]["audio"])
    path = tmp_path / "orig.flac"
    sf.write(path, x, 16000, subtype="PCM_16")
    # 48 kHz -> 16 kHz keeps the length; a segment is read alone
    up = signal.resample_poly(x, 3, 1)
    sf.write(tmp_path / "48k.wav", up, 48000, subtype="FLOAT")
    audio48 = load_audio(Utterance("u48", str(tmp_path / "48k.wav"), ""))
    assert len(audio48) == len(x)
    assert np.corrcoef(audio48[800:-800], x[800:-800])[0, 1] > 0.999
    seg = load_audio(Utterance("seg", str(path), "", start_s=0.5, end_s=1.25))
    np.testing.assert_array_equal(seg, x[8000:20000])
    # a different output rate
    assert len(load_audio(Utterance("u", str(path), ""), sampling_rate=8000)) == len(x) // 2


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_bad_manifest_lines_are_recorded_and_the_rest_read(tmp_path, clean, caplog):
    good = {"id": "a", "audio": clean[CLEAN_IDS[0]]["audio"], "text": "HELLO"}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"id": "b", "audio": "x.flac"}),                          # no text
        json.dumps({"id": "c", "text": "no audio"}),                         # no audio
        json.dumps({"audio": "x.flac", "text": "no id"}),                    # no id
        json.dumps({**good, "text": "again"}),                               # duplicate id
        "",                                                                  # blank: skipped
        json.dumps({"id": "e", "audio": "rel/e.flac", "text": ""}),          # empty reference
        json.dumps(["a", "list"]),
        json.dumps({"id": "f", "audio": "f.flac", "text": "x", "duration_s": "long"}),
        json.dumps({"id": "g", "audio": "g.flac", "text": "last"}),
    ]
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="asrprune.manifests"):
        got = read_speech_set(tmp_path, probe_durations=False)
    assert got.ids == ["a", "e", "g"]
    assert got[1].text == "" and got[1].audio == str((tmp_path / "rel" / "e.flac").resolve())
    assert got[0].text == "HELLO"
    by_line = {e.line: e.reason for e in got.errors}
    assert set(by_line) == {2, 3, 4, 5, 6, 9, 10}
    assert "not valid JSON" in by_line[2]
    assert by_line[3] == "missing field text"
    assert by_line[4] == "missing field audio"
    assert by_line[5] == "missing field id"
    assert "duplicate id 'a'" in by_line[6] and ":1" in by_line[6]
    assert "JSON object" in by_line[9]
    assert "duration_s" in by_line[10]
    assert all(isinstance(e, ManifestError) and e.file == str(path) for e in got.errors)
    assert str(got.errors[0]) == f"{path}:2: {by_line[2]}"
    assert sum("skipped" in r.message for r in caplog.records) == 7


def test_load_audio_errors_name_utterance_path_and_reason(tmp_path):
    missing = Utterance("u-missing", str(tmp_path / "nope.flac"), "x")
    with pytest.raises(AudioError, match="u-missing.*nope.flac.*file not found") as info:
        load_audio(missing)
    assert isinstance(info.value, ValueError) and info.value.utt_id == "u-missing"

    corrupt = tmp_path / "corrupt.flac"
    corrupt.write_bytes(b"fLaC" + bytes(range(256)) * 20)
    with pytest.raises(AudioError, match="u-corrupt.*corrupt.flac.*unreadable or corrupt"):
        load_audio(Utterance("u-corrupt", str(corrupt), "x"))
    bad_mp3 = tmp_path / "bad.mp3"
    bad_mp3.write_bytes(b"\x00" * 5000)
    with pytest.raises(AudioError, match="u-mp3"):
        load_audio(Utterance("u-mp3", str(bad_mp3), "x"))

    (tmp_path / "zero.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="0 bytes"):
        load_audio(Utterance("u-zero", str(tmp_path / "zero.wav"), "x"))
    sf.write(tmp_path / "silent.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="u-empty.*no audio samples"):
        load_audio(Utterance("u-empty", str(tmp_path / "silent.wav"), "x"))
    sf.write(tmp_path / "short.wav", np.zeros(1600, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="segment starts at 5.00 s but the audio is only 0.10 s"):
        load_audio(Utterance("u-seg", str(tmp_path / "short.wav"), "x", start_s=5.0, end_s=6.0))
    with pytest.raises(AudioError, match="remote audio"):
        load_audio(Utterance("u-url", "https://example.org/a.flac", "x"))


# ----------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------


def test_include_exclude_limit_sample(shared_data):
    lj = shared_data / "ljspeech"
    everything = read_speech_set(lj)
    assert len(everything) == 200
    lj001 = read_speech_set(lj, include="LJ001-*")
    assert len(lj001) == 100 and all(i.startswith("LJ001-") for i in lj001.ids)
    assert read_speech_set(lj, include=["LJ001-000?", "LJ002-0100"]).ids == [
        *(f"LJ001-000{k}" for k in range(1, 10)), "LJ002-0100"]
    lj002 = [u for u in everything.ids if u.startswith("LJ002-")]
    assert read_speech_set(lj, exclude="LJ001-*").ids == lj002
    assert read_speech_set(lj, include="LJ002-*", limit=3).ids == lj002[:3]
    assert lj002[:3] == ["LJ002-0001", "LJ002-0002", "LJ002-0003"]

    a = read_speech_set(lj, include="LJ001-*", sample=10, seed=0)
    b = read_speech_set(lj, include="LJ001-*", sample=10, seed=0)
    c = read_speech_set(lj, include="LJ001-*", sample=10, seed=1)
    assert a.ids == b.ids and a.ids != c.ids and len(a) == 10
    assert all(i.startswith("LJ001-") for i in a.ids)
    assert a.ids == sorted(a.ids)  # the source's order is kept
    small = read_speech_set(lj, include="LJ001-*", sample=5, seed=0)
    assert set(small.ids) <= set(a.ids)  # nested subsets
    assert read_speech_set(lj, include="LJ001-*", sample=10, seed=0, limit=4).ids == a.ids[:4]

    with pytest.raises(ValueError, match="none matched include"):
        read_speech_set(lj, include="LJ009-*")
    with pytest.raises(ValueError, match="sample must be a positive integer"):
        read_speech_set(lj, sample=0)


# ----------------------------------------------------------------------------------------------
# fingerprint and overlap guard
# ----------------------------------------------------------------------------------------------


def test_fingerprint(clean_dir):
    utts = read_speech_set(clean_dir).utterances
    fp = fingerprint(utts)
    assert len(fp) == 16 and fp == fingerprint(list(reversed(utts)))
    assert fingerprint(SpeechSet("x", utts, "x")) == fp
    changed = [Utterance(**{**utts[0].__dict__, "text": utts[0].text + " X"}), *utts[1:]]
    assert fingerprint(changed) != fp
    assert fingerprint(utts[:3]) != fp


def test_overlap_guard(tmp_path, shared_data, clean):
    lj = shared_data / "ljspeech"
    calibration = read_speech_set(lj, include="LJ001-*")
    evaluation = read_speech_set(lj, include="LJ002-*")
    other = read_speech_set(shared_data / "librispeech_test_clean")
    assert not check_disjoint(calibration, [evaluation, other])

    # shared ids
    overlapping = read_speech_set(lj, include=["LJ001-009*", "LJ002-*"])
    with pytest.raises(OverlapError) as info:
        check_disjoint(calibration, overlapping)
    message = str(info.value)
    assert "10 shared utterance ids" in message and "LJ001-0090" in message
    assert "allow_overlap=True" in message and "--allow-overlap" in message
    assert info.value.overlap.count == 10 and isinstance(info.value, ValueError)

    # the same audio under another id (a copy of the file) -> identical audio
    copy = tmp_path / "renamed.flac"
    shutil.copy(calibration[3].audio, copy)
    renamed = Utterance("eval-0007", str(copy), "other text")
    with pytest.raises(OverlapError, match=r"1 evaluation utterances whose audio is identical.*"
                                           r"eval-0007 = LJ001-0004"):
        check_disjoint(calibration, [*evaluation, renamed])
    # a different file of the same size is not flagged
    data = bytearray(Path(calibration[3].audio).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "tweaked.flac").write_bytes(bytes(data))
    assert not check_disjoint(calibration, [Utterance("t", str(tmp_path / "tweaked.flac"), "")])

    # more than 10 offenders: first 10 listed plus the count; allowed -> report, no raise
    with pytest.raises(OverlapError, match=r"100 shared utterance ids \(.*, \.\.\.\)"):
        check_disjoint(calibration, calibration)
    overlap = check_disjoint(calibration, [renamed, *overlapping], allow_overlap=True)
    assert overlap.count == 11 and overlap.identical_audio == (("LJ001-0004", "eval-0007"),)

    # in-memory audio is compared by content too
    x = np.arange(100, dtype=np.float32)
    mem_a = Utterance("m1", "hf://a", "", array=x, sampling_rate=16000)
    mem_b = Utterance("m2", "hf://b", "", array=x.copy(), sampling_rate=16000)
    assert check_disjoint([mem_a], [mem_b], allow_overlap=True).identical_audio == (("m1", "m2"),)


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets
# ----------------------------------------------------------------------------------------------


def test_hub_dataset_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetUnavailableError) as info:
        read_speech_set("openslr/librispeech_asr:clean", split="test")
    message = str(info.value)
    assert "openslr/librispeech_asr" in message and "config clean" in message
    assert "HF_HUB_OFFLINE" in message and "manifest.jsonl" in message
    assert isinstance(info.value, FileNotFoundError)


def test_hub_dataset_unreachable_fails_fast(monkeypatch):
    import asrprune.hub as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DatasetUnavailableError, match="unreachable.*local copy"):
        read_speech_set("some-org/some-speech-set", hf_config="en")


def test_speech_set_from_hf_dataset(clean):
    datasets = pytest.importorskip("datasets")
    paths = [clean[i]["audio"] for i in CLEAN_IDS[:2]]
    encoded = Path(clean[CLEAN_IDS[2]]["audio"]).read_bytes()
    by_path = datasets.Dataset.from_dict(
        {"audio": paths, "sentence": ["one", "two"], "speaker_id": [1089, 1089]}
    ).cast_column("audio", datasets.Audio())
    got = speech_set_from_hf(by_path, name="local/files")
    assert got.ids == CLEAN_IDS[:2] and [u.text for u in got] == ["one", "two"]
    assert got[0].audio == str(Path(paths[0]).resolve()) and got[0].speaker == "1089"

    by_bytes = datasets.Dataset.from_dict(
        {"audio": [{"bytes": encoded, "path": "x.flac"}], "text": ["three"], "id": ["u3"]}
    ).cast_column("audio", datasets.Audio())
    utt = speech_set_from_hf(by_bytes, name="local/bytes")[0]
    assert utt.id == "u3" and utt.audio_bytes == encoded
    np.testing.assert_array_equal(load_audio(utt), _pcm(clean[CLEAN_IDS[2]]["audio"]))

    x = np.sin(np.arange(8000) / 5).astype(np.float32)
    arrays = datasets.Dataset.from_dict(
        {"audio": [{"array": x, "sampling_rate": 8000}], "text": [""]}
    )
    utt = speech_set_from_hf(arrays, name="local/arrays", split="validation")[0]
    assert utt.id == "validation-000000" and utt.duration_s == 1.0
    assert len(load_audio(utt)) == 16000
    with pytest.raises(ValueError, match="no text column 'words'"):
        speech_set_from_hf(arrays, name="local/arrays", text_column="words")
