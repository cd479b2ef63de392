"""Result files: atomic writes, JSONL rows, output-folder locks and the environment stamp.

Every file asrprune writes goes through this module (torch-free), so that the rules hold
everywhere alike:

- **Atomic.** A file is written to a temporary sibling and renamed over the target, so a reader
  (or a run killed mid-write) never sees half a file. Files get the user's umask (the mode an
  ordinary ``open`` gives), weights included.
- **Rows.** A JSONL row is appended with one ``write`` under an exclusive ``flock`` and
  ``fsync``ed; a line a killed writer left unfinished is closed with a newline first. Readers
  skip unreadable lines with a warning naming file and line. Of several rows with one key the
  latest ``ok`` row wins, else the latest row; a row without ``status`` is not ``ok``.
- **One writer per output folder.** :class:`OutputLock` is an advisory ``flock`` on
  ``DIR/.asrprune.lock`` holding the owner's pid. It is re-entrant within a process (a study
  runs a sweep into its own folder), and a second process is refused at once with the folder
  and the holder's pid.
- **Environment stamp.** :func:`env_stamp` is the one record of versions and machine facts
  written with results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import re
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

log = logging.getLogger(__name__)

__all__ = [
    "LOCK_FILE",
    "OutputBusyError",
    "OutputLock",
    "append_jsonl",
    "apply_umask",
    "atomic_write_json",
    "atomic_write_text",
    "canonical_json",
    "env_stamp",
    "iter_json_lines",
    "jsonable",
    "latest_rows",
    "now_iso",
    "prepare_out_dir",
    "read_json",
    "read_jsonl",
    "short_hash",
    "slug",
]

LOCK_FILE = ".asrprune.lock"


# ----------------------------------------------------------------------------------------------
# small text helpers
# ----------------------------------------------------------------------------------------------


def canonical_json(obj: Any) -> str:
    """Key-sorted compact JSON: the form hashed into run ids."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def short_hash(obj: Any, n: int = 12) -> str:
    """The first ``n`` hex digits of sha256 over :func:`canonical_json` of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]


def slug(text: str, max_len: int = 48) -> str:
    """A file-name-safe form of ``text`` (letters, digits, ``._=-``), at most ``max_len`` chars."""
    s = re.sub(r"[^A-Za-z0-9._=-]+", "-", str(text)).strip("-.")
    return (s or "x")[:max_len]


def now_iso() -> str:
    """The current UTC time, ISO 8601 with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as ``None`` and dataclasses, numpy scalars and objects
    with ``to_dict`` turned into plain JSON values (anything else becomes its ``str``)."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "to_dict"):
        return jsonable(obj.to_dict())
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    return str(obj)


# ----------------------------------------------------------------------------------------------
# atomic files
# ----------------------------------------------------------------------------------------------


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary sibling + rename); returns the path."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (``default=str``) atomically, with a final newline."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=str, ensure_ascii=False) + "\n")


def umask() -> int:
    """The process's file-mode creation mask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> Path:
    """Give ``path`` (and, for a folder, everything under it) the modes an ordinary ``open`` and
    ``mkdir`` would: ``0o666`` / ``0o777`` less the umask.

    safetensors writes weights with mode 0600 and ``tempfile.mkdtemp`` makes folders 0700, which
    leaves a shared results folder unreadable to colleagues; every writer of weights calls this.
    """
    path = Path(path)
    mask = umask()
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in items:
        if item.is_symlink():
            continue
        item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)
    return path


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON content of ``path``; ``default`` when the file is missing or not valid JSON
    (the second case is logged, naming the file)."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        log.warning("%s is not valid JSON (%s); ignored", path, exc)
        return default


def prepare_out_dir(path: str | os.PathLike, *, flag: str = "--out", create: bool = True) -> Path:
    """Create an output folder (``create``), or say clearly why it cannot be one.

    Raises:
        NotADirectoryError: ``path`` exists and is not a folder (the message names the flag).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"{flag} {path} exists and is not a directory; give a directory (new or existing)"
        )
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------------
# JSONL rows
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _flock(fd: int, *, blocking: bool = True) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: one writer per folder is assumed
        yield
        return
    fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def append_jsonl(path: str | os.PathLike, row: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
    """Append one row (or several, in one write) to a JSONL file atomically and durably.

    The lines are written with a single ``write`` on an ``O_APPEND`` descriptor while an exclusive
    ``flock`` is held, then ``fsync``ed: a reader never sees half a row from a live writer, and a
    row that was appended survives a crash of the writer. If an earlier writer was killed
    mid-line (the file does not end in a newline), a newline is written first.

    Args:
        path: the JSONL file (created if missing).
        row: a JSON-serialisable mapping, or an iterable of them (non-JSON values are written
            with ``str``).
    """
    rows = [row] if isinstance(row, Mapping) else list(row)
    if not rows:
        return
    data = "".join(json.dumps(r, default=str, ensure_ascii=False) + "\n" for r in rows).encode()
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        with _flock(fd):
            size = os.fstat(fd).st_size
            if size > 0:
                with open(os.fspath(path), "rb") as fh:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        data = b"\n" + data
            os.write(fd, data)
            os.fsync(fd)
    finally:
        os.close(fd)


def iter_json_lines(path: str | os.PathLike, *, encoding: str = "utf-8") -> Iterator[tuple[int, Any, str | None]]:
    """``(line number, value, None)`` for every non-empty line that parses as JSON, and
    ``(line number, None, why)`` for one that does not: a line not in ``encoding`` (decoded line
    by line, so one bad line costs that line only), or not valid JSON. A byte-order mark is
    dropped."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as exc:
                yield lineno, None, (f"not {encoding} text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                                     "declare the file's encoding (CLI: --encoding)")
                continue
            if lineno == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield lineno, None, f"not valid JSON ({exc.msg} at column {exc.colno}; cut short?)"


def read_jsonl(path: str | os.PathLike, *, errors: list[str] | None = None) -> list[dict[str, Any]]:
    """Every readable JSON object of a JSONL file, in file order (a missing file: ``[]``).

    Lines that are not JSON objects (a line cut short by a killed writer, a foreign line) are
    skipped with a warning naming the file and line number; ``errors``, when given, collects
    those descriptions too.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    for lineno, row, why in iter_json_lines(path):
        if why is None and isinstance(row, dict):
            rows.append(row)
            continue
        why = f"{path.name} line {lineno}: " + (why or "not a JSON object")
        log.warning("%s; skipped (%s)", why, path)
        if errors is not None:
            errors.append(why)
    return rows


def latest_rows(rows: Iterable[Mapping[str, Any]], key: str = "run_id") -> dict[str, dict[str, Any]]:
    """One row per ``key``: the last ``ok`` row, else the last row, in order of first appearance.

    A row without ``status`` is not ``ok`` (it cannot be told from a row that scored nothing);
    a retried run appends a new row, which supersedes the earlier failed one.
    """
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        rid = row.get(key)
        if not rid:
            continue
        old = out.get(str(rid))
        if old is None or row.get("status") == "ok" or old.get("status") != "ok":
            out[str(rid)] = dict(row)
    return out


# ----------------------------------------------------------------------------------------------
# one writer per output folder
# ----------------------------------------------------------------------------------------------


class OutputBusyError(OSError):
    """Another process writes into the same output folder."""


_HELD: dict[str, list] = {}  # resolved folder -> [fd, depth]
_HELD_LOCK = threading.Lock()


class OutputLock:
    """Advisory lock making this process the one writer of an output folder.

    ``with OutputLock(dir):`` takes an exclusive non-blocking ``flock`` on ``dir/.asrprune.lock``
    and writes the pid into it. Within one process it is re-entrant (nested ``with`` blocks on the
    same folder share the lock); another process is refused at once.

    Raises:
        OutputBusyError: another process holds the lock (message: the folder and its pid).
    """

    def __init__(self, directory: str | os.PathLike, *, what: str = "asrprune"):
        self.directory = Path(directory)
        self.what = what
        self._key: str | None = None

    def __enter__(self) -> "OutputLock":
        prepare_out_dir(self.directory)
        key = str(self.directory.resolve())
        with _HELD_LOCK:
            held = _HELD.get(key)
            if held is not None:
                held[1] += 1
                self._key = key
                return self
            path = self.directory / LOCK_FILE
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # pragma: no cover - non-POSIX
                pass
            except BlockingIOError:
                try:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                except OSError:
                    holder = "unknown"
                os.close(fd)
                raise OutputBusyError(
                    f"{self.directory} is in use by another asrprune process (pid {holder}, lock "
                    f"{path}); wait for it to finish or use another --out"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _HELD[key] = [fd, 1]
            self._key = key
        return self

    def __exit__(self, *exc: object) -> None:
        with _HELD_LOCK:
            held = _HELD.get(self._key or "")
            if held is None:
                return
            held[1] -= 1
            if held[1] == 0:
                del _HELD[self._key]  # type: ignore[arg-type]
                os.close(held[0])  # closing the descriptor releases the flock


def lock_held(directory: str | os.PathLike) -> bool:
    """Whether this process holds :class:`OutputLock` on ``directory``."""
    with _HELD_LOCK:
        return str(Path(directory).resolve()) in _HELD


# ----------------------------------------------------------------------------------------------
# the environment stamp
# ----------------------------------------------------------------------------------------------

_STAMP_PACKAGES = ("asrprune", "torch", "transformers", "jiwer", "numpy", "ctranslate2")


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - a missing distribution is just not recorded
        return None


def _cpu_model() -> str | None:
    """The CPU's model name as the kernel reports it (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def env_stamp(device: str | None = None) -> dict[str, Any]:
    """Versions and machine facts recorded with every result (torch is not imported for it).

    Keys: ``asrprune``, ``torch``, ``transformers``, ``jiwer``, ``numpy``, ``ctranslate2``
    (installed versions), ``python``, ``platform``, ``cpu_count``, ``cpu_model`` (when known),
    ``torch_threads`` and ``cpu_capability`` (when torch is loaded), ``device`` (+ ``cuda_device``,
    ``cuda`` on a GPU), ``time_utc``.
    """
    stamp: dict[str, Any] = {pkg: _version(pkg) for pkg in _STAMP_PACKAGES}
    stamp.update(
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    cpu = _cpu_model()
    if cpu:
        stamp["cpu_model"] = cpu
    torch = sys.modules.get("torch")
    if torch is not None:
        stamp["torch_threads"] = torch.get_num_threads()
        # which vectorised kernels torch picked (DEFAULT, AVX2, AVX512...): float results, and with
        # them a SparseGPT pruning, can differ in the last bits between machines that differ here
        stamp["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if device is not None:
        stamp["device"] = str(device)
        if str(device).startswith("cuda") and torch is not None and torch.cuda.is_available():
            stamp["cuda_device"] = torch.cuda.get_device_name(torch.device(str(device)))
            stamp["cuda"] = torch.version.cuda
    return stamp
