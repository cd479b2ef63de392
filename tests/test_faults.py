"""No silent wrong numbers: every bad input and fault ends in a clear error or a recorded failure.

Each case runs the command as a user would (``main([...])`` or a subprocess) on the tiny random
Whisper with tiny.en's vocabulary, and checks the exit status, the message's key words and the
files left behind.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from asrprune.cli import main
from asrprune.files import LOCK_FILE, OutputLock, read_jsonl
from conftest import REPO

DECODE = ["--device", "cpu", "--max-new-tokens", "4", "--batch-size", "4", "--no-progress"]


def _manifest(path: Path, rows: list[dict], encoding: str = "utf-8") -> Path:
    path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode(encoding) + b"\n" for r in rows))
    return path


def _terminal(capsys, caplog) -> str:
    """What the user sees: stderr, plus the warnings that logging prints there outside pytest."""
    text = capsys.readouterr().err + caplog.text
    caplog.clear()
    return text


@pytest.fixture(scope="module")
def clean(shared_data) -> list[dict]:
    """The four LibriSpeech test-clean utterances with absolute audio paths."""
    src = shared_data / "librispeech_test_clean" / "manifest.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    for r in rows:
        r["audio"] = str((src.parent / r["audio"]).resolve())
    return rows


# ----------------------------------------------------------------------------------------------
# a run that scored nothing is not a perfect run
# ----------------------------------------------------------------------------------------------


def test_every_utterance_failed_is_an_error_with_wer_null(tiny_dir, tmp_path, capsys):
    (tmp_path / "empty.flac").write_bytes(b"")
    m = _manifest(tmp_path / "m.jsonl", [{"id": "gone", "audio": "nowhere.flac", "text": "a b"},
                                         {"id": "empty", "audio": "empty.flac", "text": "c d"}])
    out = tmp_path / "out"
    assert main(["evaluate", str(tiny_dir), str(m), "--out", str(out), *DECODE]) == 2
    err = capsys.readouterr().err
    assert "no utterance was scored" in err and "2 of 2 failed" in err
    assert "file not found" in err and "empty" in err and "wer null" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wer"] is None and summary["cer"] is None and summary["status"] == "failed"
    assert summary["n_utterances"] == 0 and summary["n_failed"] == 2
    assert [r["failed"] for r in read_jsonl(out / "utterances.jsonl")] == [True, True]


def test_a_sweep_records_a_run_that_scored_nothing_as_failed(tiny_dir, tmp_path):
    from asrprune.sweep import SweepSpec, run_sweep

    m = _manifest(tmp_path / "m.jsonl", [{"id": "gone", "audio": "nowhere.flac", "text": "a b"}])
    spec = SweepSpec.from_dict({"models": [str(tiny_dir)], "data": [str(m)], "baseline_protocols": ["standard"],
                                "decode": {"max_new_tokens": 4, "device": "cpu", "num_workers": 0}})
    summary = run_sweep(spec, tmp_path / "sweep", progress=False)
    rows = read_jsonl(tmp_path / "sweep" / "runs.jsonl")
    assert len(summary.failed) == 1 and len(rows) == 1
    assert rows[0]["status"] == "failed" and "no utterance was scored" in rows[0]["error"]
    assert "summary" not in rows[0]  # never an ok row with WER 0


def test_max_failed_fraction(tiny_dir, clean, tmp_path, capsys):
    m = _manifest(tmp_path / "m.jsonl", [clean[0], {"id": "gone", "audio": "nowhere.flac", "text": "a b"}])
    assert main(["evaluate", str(tiny_dir), str(m), "--out", str(tmp_path / "a"), *DECODE]) == 0  # off by default
    capsys.readouterr()
    rc = main(["evaluate", str(tiny_dir), str(m), "--out", str(tmp_path / "b"), "--max-failed-fraction", "0.2", *DECODE])
    err = capsys.readouterr().err
    assert rc == 2 and "1 of 2 utterances failed (50.0% > --max-failed-fraction 0.2)" in err
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["status"] == "failed"


# ----------------------------------------------------------------------------------------------
# empty references
# ----------------------------------------------------------------------------------------------


def test_empty_reference_is_named_and_follows_the_policy(tiny_dir, clean, tmp_path, capsys, caplog):
    m = _manifest(tmp_path / "m.jsonl", [clean[0], dict(clean[1], id="blank", text="  "), clean[2]])
    assert main(["evaluate", str(tiny_dir), str(m), "--out", str(tmp_path / "skip"), *DECODE]) == 0
    err = _terminal(capsys, caplog)
    assert "1 of 3 utterances have an empty reference" in err and "blank" in err and "skip" in err
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["n_utterances"] == 2 and summary["empty_reference"]["ids"] == ["blank"]
    assert main(["evaluate", str(tiny_dir), str(m), "--out", str(tmp_path / "score"), "--empty-reference", "score",
                 *DECODE]) == 0
    assert json.loads((tmp_path / "score" / "summary.json").read_text())["n_utterances"] == 3
    capsys.readouterr()
    assert main(["evaluate", str(tiny_dir), str(m), "--out", str(tmp_path / "err"), "--empty-reference", "error",
                 *DECODE]) == 2
    err = capsys.readouterr().err
    assert "blank" in err and "--empty-reference" in err
    assert not (tmp_path / "err" / "utterances.jsonl").exists()  # refused before decoding
    # the policy is part of the run's key: resuming "skip" as "score" is refused, naming the flag
    rc = main(["evaluate", str(tiny_dir), str(m), "--out", str(tmp_path / "skip"), "--empty-reference", "score",
               *DECODE])
    assert rc == 2 and "--empty-reference" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# manifests that are not UTF-8
# ----------------------------------------------------------------------------------------------


def test_latin1_manifest_names_file_and_line_and_encoding_reads_it(tiny_dir, clean, tmp_path, capsys, caplog):
    m = _manifest(tmp_path / "m.jsonl", [clean[0], dict(clean[1], text="CAFÉ " + clean[1]["text"])], "latin-1")
    assert main(["evaluate", str(tiny_dir), str(m), "--out", str(tmp_path / "a"), *DECODE]) == 0
    err = _terminal(capsys, caplog)
    assert f"{m}:2: not utf-8 text (byte 0xc9" in err and "--encoding" in err
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["n_utterances"] == 1
    assert main(["evaluate", str(tiny_dir), str(m), "--out", str(tmp_path / "b"), "--encoding", "latin-1", *DECODE]) == 0
    rows = read_jsonl(tmp_path / "b" / "utterances.jsonl")
    assert len(rows) == 2 and any(r["reference"].startswith("CAFÉ ") for r in rows)
    assert main(["evaluate", str(tiny_dir), str(m), "--out", str(tmp_path / "c"), "--encoding", "klingon", *DECODE]) == 2
    assert "unknown text encoding 'klingon' (--encoding)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# --out pointing at a file
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["evaluate", "sensitivity", "reproduce", "sweep", "compare", "prune"])
def test_out_that_is_a_file_is_one_clear_message(command, tiny_dir, clean, tmp_path, capsys):
    m = _manifest(tmp_path / "m.jsonl", clean[:1])
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    argv = {
        "evaluate": ["evaluate", str(tiny_dir), str(m), *DECODE],
        "sensitivity": ["sensitivity", str(tiny_dir), str(m), "--no-progress"],
        "reproduce": ["reproduce", str(tiny_dir), str(m), "--calibration", str(m), "--no-progress"],
        "sweep": ["sweep", str(tmp_path / "spec.yaml")],
        "compare": ["compare", str(tmp_path), str(tmp_path)],
        "prune": ["prune", str(tiny_dir), "--plan", "decoder.self_attn=0.5"],
    }[command] + ["--out", str(target)]
    (tmp_path / "spec.yaml").write_text(f"models: [{tiny_dir}]\ndata: [{m}]\n")
    if command == "compare":  # compare checks its inputs first; give it two runs
        for run in ("a", "b"):
            assert main(["evaluate", str(tiny_dir), str(m), "--out", str(tmp_path / run), *DECODE]) == 0
        argv[1:3] = [str(tmp_path / "a"), str(tmp_path / "b")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out {target} exists and is not a directory" in err
    assert target.read_text() == "keep me"


# ----------------------------------------------------------------------------------------------
# pickles are not loaded
# ----------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a file: the proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", ["evaluate", "components", "prune"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's own loader, reached on purpose with --trust-pickle
def test_pickle_checkpoint_is_refused_and_never_unpickled(command, tiny_dir, clean, tmp_path, capsys):
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        if (tiny_dir / name).is_file():
            (model_dir / name).write_bytes((tiny_dir / name).read_bytes())
    marker = tmp_path / "code-ran"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    m = _manifest(tmp_path / "m.jsonl", clean[:1])
    argv = {
        "evaluate": ["evaluate", str(model_dir), str(m), "--out", str(tmp_path / "o"), *DECODE],
        "components": ["components", str(model_dir)],
        "prune": ["prune", str(model_dir), "--plan", "decoder.self_attn=0.5", "--out", str(tmp_path / "p")],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pickle checkpoint (pytorch_model.bin)" in err and "--trust-pickle" in err and "save_pretrained" in err
    assert not marker.exists()
    # with --trust-pickle the file is handed to torch, whose weights-only loader still refuses it
    main(argv + ["--trust-pickle"])
    assert not marker.exists()


def test_sweep_spec_takes_trust_pickle():
    from asrprune.sweep import SweepSpec, SweepSpecError

    spec = SweepSpec.from_dict({"models": ["m"], "data": ["d.jsonl"], "trust_pickle": True})
    assert spec.trust_pickle and spec.to_dict()["trust_pickle"] is True
    with pytest.raises(SweepSpecError, match="trust_pickle"):
        SweepSpec.from_dict({"models": ["m"], "data": ["d.jsonl"], "trust_pickle": "yes"})


# ----------------------------------------------------------------------------------------------
# one writer per output folder
# ----------------------------------------------------------------------------------------------


def test_two_evaluations_on_one_folder(tiny_dir, clean, tmp_path):
    """While one process writes into --out, a second `asrprune evaluate` there is refused at once."""
    m = _manifest(tmp_path / "m.jsonl", clean[:2])
    out, ready = tmp_path / "out", tmp_path / "ready"
    first = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO / "src")!r})
        from asrprune.cli import main
        from asrprune.files import OutputLock
        with OutputLock({str(out)!r}):  # what evaluate takes; held while it runs
            open({str(ready)!r}, "w").close()
            rc = main(["evaluate", {str(tiny_dir)!r}, {str(m)!r}, "--out", {str(out)!r}, *{DECODE!r}])
            time.sleep(3)
        sys.exit(rc)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    a = subprocess.Popen([sys.executable, "-c", first], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert a.poll() is None and time.time() < deadline, a.communicate()
            time.sleep(0.1)
        b = subprocess.run([sys.executable, "-m", "asrprune", "evaluate", str(tiny_dir), str(m), "--out", str(out),
                            *DECODE], env=env, capture_output=True, text=True, timeout=300)
        assert b.returncode == 2
        assert f"{out} is in use by another asrprune process (pid {a.pid}" in b.stderr
    finally:
        out_a, err_a = a.communicate(timeout=300)
    assert a.returncode == 0, err_a
    rows = read_jsonl(out / "utterances.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in clean[:2])  # intact, one writer
    assert (out / LOCK_FILE).is_file()
    with OutputLock(out):  # released when the first process ended
        pass


# ----------------------------------------------------------------------------------------------
# files get the user's umask, weights included
# ----------------------------------------------------------------------------------------------


def test_files_and_weights_follow_the_umask(tiny_dir, clean, tmp_path):
    m = _manifest(tmp_path / "m.jsonl", clean[:1])
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out, ev = tmp_path / "pruned", tmp_path / "ev"
    for argv in (["prune", str(tiny_dir), "--plan", "decoder.self_attn=0.5", "--format", "compressed", "--out", str(out)],
                 ["evaluate", str(tiny_dir), str(m), "--out", str(ev), *DECODE]):
        subprocess.run([sys.executable, "-m", "asrprune", *argv], env=env, check=True, capture_output=True,
                       timeout=300, preexec_fn=lambda: os.umask(0o027))
    checked = 0
    for path in [out, *out.rglob("*"), ev, *ev.rglob("*")]:
        if path.name == LOCK_FILE:
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o750 if path.is_dir() else 0o640), (path, oct(mode))
        checked += 1
    assert (out / "model.safetensors").is_file() and (out / "compressed" / "model.sparse.safetensors").is_file()
    assert checked > 8


# ----------------------------------------------------------------------------------------------
# resume says what it found; a mismatch names the flag
# ----------------------------------------------------------------------------------------------


def test_resume_notice_and_the_flag_that_changed(tiny_dir, clean, tmp_path, capsys, caplog):
    m = _manifest(tmp_path / "m.jsonl", clean)
    out = tmp_path / "out"
    assert main(["evaluate", str(tiny_dir), str(m), "--out", str(out), "--limit", "2", *DECODE]) == 0
    _terminal(capsys, caplog)
    assert main(["evaluate", str(tiny_dir), str(m), "--out", str(out), "--limit", "2", *DECODE]) == 0
    assert f"resuming {out}: 2 of 2 utterances already done, 0 to decode" in _terminal(capsys, caplog)
    assert main(["evaluate", str(tiny_dir), str(m), "--out", str(out), "--limit", "3", *DECODE]) == 2
    err = capsys.readouterr().err
    assert "--limit 2 -> 3" in err and "--overwrite" in err and "data_fingerprint" not in err
    assert main(["evaluate", str(tiny_dir), str(m), "--out", str(out), "--limit", "2", *DECODE[:2],
                 "--max-new-tokens", "5", "--no-progress"]) == 2
    assert "--max-new-tokens: 4 -> 5" in capsys.readouterr().err
