"""Result files: atomic writes, JSONL rows, the output lock, the environment stamp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from asrprune.files import (
    LOCK_FILE,
    OutputBusyError,
    OutputLock,
    append_jsonl,
    atomic_write_json,
    env_stamp,
    iter_json_lines,
    latest_rows,
    prepare_out_dir,
    read_jsonl,
    short_hash,
)
from conftest import REPO


def test_append_and_read_rows_survive_a_torn_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    append_jsonl(path, {"run_id": "a", "status": "ok"})
    with open(path, "a") as f:
        f.write('{"run_id": "b", "sta')  # a writer killed mid-line
    append_jsonl(path, [{"run_id": "c", "status": "ok"}, {"run_id": "d"}])
    errors: list[str] = []
    rows = read_jsonl(path, errors=errors)
    assert [r["run_id"] for r in rows] == ["a", "c", "d"]
    assert len(errors) == 1 and "rows.jsonl line 2" in errors[0]


def test_latest_rows_an_ok_row_wins_and_a_row_without_status_is_not_ok():
    rows = [
        {"run_id": "a", "status": "ok", "n": 1},
        {"run_id": "a", "status": "failed", "n": 2},  # an ok row is not superseded by a failure
        {"run_id": "b", "status": "failed", "n": 1},
        {"run_id": "b", "status": "ok", "n": 2},  # a retry supersedes the failure
        {"run_id": "c", "n": 1},  # no status: it may have scored nothing
        {"run_id": "c", "status": "failed", "n": 2},
    ]
    latest = latest_rows(rows)
    assert latest["a"]["n"] == 1 and latest["b"]["n"] == 2
    assert latest["c"]["n"] == 2 and latest["c"]["status"] == "failed"
    assert latest_rows([{"run_id": "x"}])["x"].get("status") is None


def test_iter_json_lines_names_bad_lines_and_keeps_the_rest(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"b": \xc9}\nnot json\n[1, 2]\n')
    got = list(iter_json_lines(path))
    assert got[0] == (1, {"a": 1}, None)
    assert got[1][0] == 3 and got[1][1] is None and "utf-8" in got[1][2] and "0xc9" in got[1][2]
    assert got[2][0] == 4 and "not valid JSON" in got[2][2]
    assert got[3] == (5, [1, 2], None)
    latin = list(iter_json_lines(path, encoding="latin-1"))  # every byte decodes: line 3 is then bad JSON
    assert latin[1][0] == 3 and "not valid JSON" in latin[1][2]


def test_atomic_json_and_hash(tmp_path):
    path = atomic_write_json(tmp_path / "x.json", {"b": 1, "a": [1.5, None]})
    assert json.loads(path.read_text()) == {"b": 1, "a": [1.5, None]}
    assert not list(tmp_path.glob("*.tmp"))
    assert short_hash({"a": 1, "b": 2}) == short_hash({"b": 2, "a": 1}) and len(short_hash(1)) == 12


def test_prepare_out_dir_names_the_flag(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="--out .*file exists and is not a directory"):
        prepare_out_dir(tmp_path / "file")
    assert prepare_out_dir(tmp_path / "new" / "dir").is_dir()


def test_output_lock_is_reentrant_and_refuses_another_process(tmp_path):
    out = tmp_path / "study"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / "src")!r})
        from asrprune.files import OutputBusyError, OutputLock
        try:
            with OutputLock({str(out)!r}):
                print("got it")
        except OutputBusyError as exc:
            print("busy:", exc)
    """)
    with OutputLock(out):
        with OutputLock(out):  # re-entrant within the process (reproduce runs a sweep inside)
            assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
        other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert other.stdout.startswith("busy:") and str(out) in other.stdout and f"pid {os.getpid()}" in other.stdout
    # released after the outer block: another process gets it
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert other.stdout.strip() == "got it"
    assert issubclass(OutputBusyError, OSError)


def test_env_stamp_keys_and_no_torch_needed():
    stamp = env_stamp("cpu")
    for key in ("asrprune", "torch", "transformers", "jiwer", "python", "platform", "cpu_count", "time_utc", "device"):
        assert key in stamp
    import torch

    assert stamp["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    code = "import sys; from asrprune.files import env_stamp; env_stamp(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
