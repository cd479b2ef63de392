"""Speech sets: read any supported layout into :class:`Utterance` records.

Supported sources (detected automatically by :func:`read_speech_set`):

- ``jsonl``: our manifest, one JSON object per line with ``id``, ``audio`` (path relative to the
  manifest), ``text`` and optionally ``duration_s``, ``speaker``, ``start_s``, ``end_s``,
  ``source``; other fields are kept in ``Utterance.extra``. Give the file or its folder.
- ``csv`` / ``tsv``: a header row naming ``path`` (or ``audio``) and ``text`` columns, optionally
  ``id``, ``duration_s``, ``speaker``; paths relative to the file; without ``id`` the id is the
  audio file's stem.
- ``librispeech``: a LibriSpeech split folder (``<speaker>/<chapter>/<chapter-id>.trans.txt`` and
  ``<utt-id>.flac``); a chapter, speaker or ``LibriSpeech/`` root folder works too.
- ``commonvoice``: a Common Voice release folder (``<split>.tsv`` with columns ``path``,
  ``sentence``, ``client_id``, and ``clips/*.mp3``); ``split`` picks the tsv (default ``test``).
- ``tedlium``: a TED-LIUM 3 folder (``stm/*.stm`` + ``sph/*.sph``, or ``legacy/<split>/...``);
  each stm line becomes one segment of its talk's sph file.
- ``ljspeech``: an LJ Speech folder (``metadata.csv`` without header + ``wavs/``).
- ``hf``: a Hugging Face ``datasets`` id ``name[:config]`` (needs the hub, or a local HF cache).

Texts are kept as the source gives them (casing, punctuation), except TED-LIUM: see
:func:`clean_tedlium_text`. Normalisation for scoring belongs to ``evaluation``.

Audio is loaded by :mod:`asrprune.audio` (``load_audio``, re-exported here); fingerprints and the
calibration/evaluation overlap guard are in :mod:`asrprune.overlap`.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import fnmatch
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from . import hub
from .audio import AudioError, load_audio, probe_duration
from .files import iter_json_lines

log = logging.getLogger(__name__)

__all__ = [
    "AudioError",
    "DatasetUnavailableError",
    "LAYOUTS",
    "ManifestError",
    "SpeechSet",
    "Utterance",
    "clean_tedlium_text",
    "load_audio",
    "read_speech_set",
    "speech_set_from_hf",
    "write_manifest",
]

#: layout name -> one-line description (used in error messages and docs)
LAYOUTS: dict[str, str] = {
    "jsonl": "asrprune manifest: manifest.jsonl (or its folder) with id, audio, text per line",
    "csv": "CSV/TSV file with a header row naming the columns path (or audio) and text",
    "librispeech": "LibriSpeech folder: <speaker>/<chapter>/*.trans.txt next to the .flac files",
    "commonvoice": "Common Voice release folder: <split>.tsv (path, sentence, client_id) + clips/",
    "tedlium": "TED-LIUM 3 folder: stm/*.stm + sph/*.sph (or legacy/<split>/stm, .../sph)",
    "ljspeech": "LJ Speech folder: metadata.csv (id|text|normalized text, no header) + wavs/",
    "hf": "Hugging Face datasets id NAME[:CONFIG] (needs the hub or a local HF cache)",
}

_WARN_LIMIT = 20  # bad lines logged one by one; beyond this, one summary line


# ----------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Utterance:
    """One utterance: an id, where its audio is, and its reference text.

    ``audio`` is an absolute path (or a URI-like label for hub data). ``start_s``/``end_s`` mark a
    segment of a longer file (TED-LIUM). Utterances from Hugging Face datasets carry their audio
    in memory: either decoded (``array`` of shape (n_samples,) or (n_samples, channels) at
    ``sampling_rate``) or still encoded (``audio_bytes``). In-memory fields take no part in
    equality or hashing.
    """

    id: str
    audio: str
    text: str
    duration_s: float | None = None
    speaker: str | None = None
    start_s: float | None = None
    end_s: float | None = None
    source: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)
    array: np.ndarray | None = field(default=None, compare=False, repr=False)
    sampling_rate: int | None = field(default=None, compare=False)
    audio_bytes: bytes | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The manifest fields (no in-memory audio) as a JSON-ready dict."""
        row: dict[str, Any] = {"id": self.id, "audio": self.audio, "text": self.text}
        for key in ("duration_s", "speaker", "start_s", "end_s"):
            value = getattr(self, key)
            if value is not None:
                row[key] = value
        if self.source:
            row["source"] = self.source
        row.update({k: v for k, v in self.extra.items() if k not in row})
        return row


@dataclass(frozen=True)
class ManifestError:
    """A line of a speech-set file that could not be read (the rest of the file still is)."""

    file: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "reason": self.reason}


@dataclass
class SpeechSet:
    """Utterances read from one source, plus the lines that failed (``errors``)."""

    name: str
    utterances: list[Utterance]
    source: str
    errors: list[ManifestError] = field(default_factory=list)
    layout: str = ""

    def __len__(self) -> int:
        return len(self.utterances)

    def __iter__(self) -> Iterator[Utterance]:
        return iter(self.utterances)

    def __getitem__(self, index):
        return self.utterances[index]

    @property
    def ids(self) -> list[str]:
        return [u.id for u in self.utterances]

    @property
    def total_duration_s(self) -> float:
        """Sum of the known durations (utterances without one count 0)."""
        return float(sum(u.duration_s or 0.0 for u in self.utterances))


class DatasetUnavailableError(FileNotFoundError):
    """A Hugging Face dataset id could not be loaded (offline, unknown id, no cache)."""


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


def read_speech_set(
    source: str | os.PathLike,
    *,
    limit: int | None = None,
    sample: int | None = None,
    seed: int = 0,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    hf_config: str | None = None,
    hf_split: str = "test",
    audio_column: str = "audio",
    text_column: str = "text",
    streaming: bool = False,
    split: str | None = None,
    layout: str | None = None,
    probe_durations: bool = True,
    encoding: str = "utf-8",
) -> SpeechSet:
    """Read a speech set from a manifest, a CSV/TSV, a corpus folder or a Hugging Face dataset.

    Selection happens in this order: ``include``/``exclude`` id patterns, then the seeded
    ``sample``, then ``limit``. The result keeps the source's order.

    Args:
        source: a file or folder path (layout detected, see the module docstring and
            :data:`LAYOUTS`) or a Hugging Face dataset id ``name[:config]``.
        limit: keep the first ``limit`` utterances (after the other selections).
        sample: keep a seeded random subset of this many utterances. The subset depends only on
            ``seed`` and the ids (each id is ranked by ``sha256(f"{seed}:{id}")``), so it is the
            same whatever the file order, and ``sample=n`` is contained in ``sample=n+k``.
        seed: seed of ``sample``.
        include: fnmatch pattern(s) on utterance ids to keep, e.g. ``"LJ001-*"`` (case-sensitive).
        exclude: fnmatch pattern(s) on utterance ids to drop.
        hf_config: dataset config for hub ids (``name:config`` in ``source`` works too).
        hf_split: split of a hub dataset; also picks ``<split>.tsv`` of a Common Voice folder
            and ``<split>/`` of TED-LIUM and LibriSpeech root folders.
        audio_column: audio column of a hub dataset.
        text_column: text column of a hub dataset (``sentence``, ``transcript``,
            ``transcription``, ``normalized_text`` are tried when the default ``text`` is absent).
        streaming: stream a hub dataset instead of downloading it.
        split: same as ``hf_split`` (wins when given).
        layout: force a layout (a key of :data:`LAYOUTS`) instead of detecting it.
        encoding: the text encoding of manifests, transcripts and metadata files (``utf-8``,
            with or without a byte-order mark, by default); a line that does not decode is
            recorded as a :class:`ManifestError` of that file and line and skipped.
        probe_durations: read missing durations from the selected files' headers.

    Returns:
        A :class:`SpeechSet`; lines that could not be read are in ``.errors`` (and logged as
        warnings), the rest is read.

    Raises:
        FileNotFoundError: ``source`` looks like a path and does not exist.
        DatasetUnavailableError: a hub id that cannot be loaded (e.g. offline); the message
            names the id and suggests a local manifest.
        ValueError: a folder of no supported layout, a CSV without the required header, bad
            selection arguments, or nothing left to read after selection.
    """
    split = split if split is not None else hf_split
    for name, value in (("limit", limit), ("sample", sample)):
        bad = isinstance(value, bool) or not isinstance(value, int) or value < 1
        if value is not None and bad:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"unknown text encoding {encoding!r} (--encoding); e.g. utf-8, latin-1, cp1252") from None
    include_patterns = _patterns(include, "include")
    exclude_patterns = _patterns(exclude, "exclude")

    path = Path(os.path.expanduser(str(source)))
    if layout == "hf" or (layout is None and not path.exists() and _looks_like_hub_id(str(source))):
        # Stop reading a stream once enough rows passed the filters (no sample: order is kept).
        stop_after = limit if sample is None else None
        speech_set = _read_hf(
            str(source), hf_config, split, audio_column, text_column, streaming,
            include_patterns, exclude_patterns, stop_after,
        )
    else:
        if not path.exists():
            raise FileNotFoundError(f"speech set not found: {path} (no such file or folder)")
        found, target = (layout, path) if layout is not None else _detect_layout(path, split)
        speech_set = _READERS[found](target, split, encoding)
        speech_set.layout = found
    _log_errors(speech_set.errors)

    n_read = len(speech_set.utterances)
    utts = _select(speech_set.utterances, include_patterns, exclude_patterns, sample, seed, limit)
    if not utts:
        detail = f"{n_read} utterances were read"
        if include_patterns or exclude_patterns:
            detail += f", none matched include={include_patterns} exclude={exclude_patterns}"
            if speech_set.utterances:
                detail += f" (first ids: {', '.join(u.id for u in speech_set.utterances[:3])})"
        if speech_set.errors:
            detail += f"; {len(speech_set.errors)} lines failed, first: {speech_set.errors[0]}"
        raise ValueError(f"no utterances to use from {speech_set.source}: {detail}")
    if probe_durations:
        utts = [_with_duration(u) for u in utts]
    speech_set.utterances = utts
    log.info(
        "read %d utterances (%s layout, %.1f s of audio) from %s; %d lines failed",
        len(utts), speech_set.layout, speech_set.total_duration_s, speech_set.source,
        len(speech_set.errors),
    )
    return speech_set


def write_manifest(utterances: Iterable[Utterance], path: str | os.PathLike) -> Path:
    """Write utterances as our JSONL manifest, audio paths relative to the manifest when possible.

    Args:
        utterances: file-backed utterances (in-memory hub audio cannot be written).
        path: the manifest file to write (its folder is created).

    Returns:
        The manifest path.

    Raises:
        ValueError: an utterance has only in-memory audio.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    lines = []
    for utt in utterances:
        if utt.array is not None or utt.audio_bytes is not None:
            raise ValueError(
                f"utterance '{utt.id}' has in-memory audio only and cannot be written to {path}"
            )
        row = utt.to_dict()
        try:
            row["audio"] = os.path.relpath(utt.audio, base)
        except ValueError:  # other drive (Windows)
            row["audio"] = utt.audio
        lines.append(json.dumps(row, ensure_ascii=False))
    path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return path


def _patterns(value: str | Sequence[str] | None, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    patterns = tuple(value)
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{name} must be a pattern string or a list of them, got {value!r}")
    return patterns


def _select(
    utts: list[Utterance],
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    sample: int | None,
    seed: int,
    limit: int | None,
) -> list[Utterance]:
    if include:
        utts = [u for u in utts if any(fnmatch.fnmatchcase(u.id, p) for p in include)]
    if exclude:
        utts = [u for u in utts if not any(fnmatch.fnmatchcase(u.id, p) for p in exclude)]
    if sample is not None:
        if sample > len(utts):
            log.warning("sample=%d but only %d utterances are available: using all",
                        sample, len(utts))
        ranked = sorted(
            range(len(utts)),
            key=lambda i: hashlib.sha256(f"{seed}:{utts[i].id}".encode()).hexdigest(),
        )
        keep = set(ranked[:sample])
        utts = [u for i, u in enumerate(utts) if i in keep]
    if limit is not None:
        utts = utts[:limit]
    return utts


def _log_errors(errors: list[ManifestError]) -> None:
    for err in errors[:_WARN_LIMIT]:
        log.warning("skipped %s", err)
    if len(errors) > _WARN_LIMIT:
        log.warning("... and %d more bad lines (see SpeechSet.errors)", len(errors) - _WARN_LIMIT)


def _looks_like_hub_id(text: str) -> bool:
    """``name``, ``org/name`` or either with ``:config``, without a file suffix or path prefix."""
    if text.startswith((".", "/", "~")) or "\\" in text:
        return False
    if Path(text.split(":", 1)[0]).suffix.lower() in {".jsonl", ".json", ".csv", ".tsv", ".stm"}:
        return False
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?(:[\w.-]+)?", text) is not None


def _detect_layout(path: Path, split: str) -> tuple[str, Path]:
    """Return (layout, the path its reader takes)."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return "jsonl", path
        if suffix in (".csv", ".tsv"):
            header = _header(path)
            if path.name == "metadata.csv" and (path.parent / "wavs").is_dir() and "|" in header:
                return "ljspeech", path.parent
            if suffix == ".tsv" and {"path", "sentence"} <= set(header.split("\t")):
                return "commonvoice", path
            return "csv", path
        if suffix == ".stm":
            return "tedlium", path
        if path.name.endswith(".trans.txt"):
            return "librispeech", path
        raise ValueError(_no_layout_message(path, "a file with an unknown suffix"))

    if (path / "manifest.jsonl").is_file():
        return "jsonl", path / "manifest.jsonl"
    for folder in (path, path / split, path / "legacy" / split):
        if (folder / "stm").is_dir() and any((folder / "stm").glob("*.stm")):
            return "tedlium", folder
    if (path / "clips").is_dir() and any(path.glob("*.tsv")):
        return "commonvoice", path
    # a cv-corpus-<version>/ root holding one language folder
    languages = [p for p in sorted(path.iterdir())
                 if p.is_dir() and (p / "clips").is_dir() and any(p.glob("*.tsv"))]
    if len(languages) == 1:
        return "commonvoice", languages[0]
    if len(languages) > 1:
        raise ValueError(
            f"{path} holds several Common Voice languages ({', '.join(p.name for p in languages)});"
            f" pass one of them, e.g. {languages[0]}"
        )
    if (path / "metadata.csv").is_file() and (path / "wavs").is_dir():
        return "ljspeech", path
    for depth in range(4):
        if next(path.glob("*/" * depth + "*.trans.txt"), None) is not None:
            return "librispeech", path
    tables = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".csv", ".tsv")]
    if len(tables) == 1:
        return "csv", tables[0]
    raise ValueError(_no_layout_message(path, "a folder that matches none of them"))


def _no_layout_message(path: Path, what: str) -> str:
    layouts = "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
    return f"{path} is {what}. Supported speech-set layouts are: {layouts}"


def _header(path: Path) -> str:
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        return handle.readline().rstrip("\r\n")


def _resolve(base: Path, audio: str) -> str:
    if "://" in audio:
        return audio
    p = Path(os.path.expanduser(audio))
    return str(p if p.is_absolute() else (base / p).resolve())


def _opt_float(value: Any, name: str) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"field {name} is not a number: {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"field {name} is not a number: {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"field {name} must be a finite number >= 0, got {value!r}")
    return number


def _opt_str(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


class _Collector:
    """Collects utterances of one file, recording bad lines and duplicate ids as errors."""

    def __init__(self) -> None:
        self.utterances: list[Utterance] = []
        self.errors: list[ManifestError] = []
        self._seen: dict[str, str] = {}

    def error(self, file: Path | str, line: int | None, reason: str) -> None:
        self.errors.append(ManifestError(str(file), line, reason))

    def add(self, utt: Utterance, file: Path | str, line: int | None) -> None:
        where = f"{file}:{line}" if line is not None else str(file)
        if utt.id in self._seen:
            self.error(file, line, f"duplicate id '{utt.id}' (first at {self._seen[utt.id]})")
            return
        self._seen[utt.id] = where
        self.utterances.append(utt)


_JSONL_KNOWN = {"id", "audio", "text", "duration_s", "speaker", "start_s", "end_s", "source"}


def _codec(encoding: str) -> str:
    """UTF-8 files may start with a byte-order mark: read them as ``utf-8-sig``."""
    return "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding


def _open_text(path: Path, encoding: str, newline: str | None = None):
    """A text file in ``encoding``; undecodable bytes survive as surrogates so that the line
    holding them can be named and skipped (:func:`_undecodable`) while the rest is read."""
    return open(path, encoding=_codec(encoding), errors="surrogateescape", newline=newline)


_SURROGATE = re.compile("[\udc80-\udcff]")


def _undecodable(out: _Collector, path: Path, lineno: int, text: str, encoding: str) -> bool:
    """Record a line that is not ``encoding`` text as an error of that line; True when it is."""
    m = _SURROGATE.search(text)
    if m is None:
        return False
    byte = ord(m.group()) - 0xDC00
    out.error(path, lineno, f"not {encoding} text (byte 0x{byte:02x} at column {m.start() + 1}); "
                            "declare the file's encoding (CLI: --encoding)")
    return True


def _table_rows(reader, header: list[str], path: Path, out: _Collector,
                encoding: str = "utf-8") -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, {column: cell})`` of a CSV/TSV reader; blank rows are skipped, and rows with
    another number of columns than the header or with undecodable bytes are recorded as errors."""
    for row in reader:
        lineno = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if _undecodable(out, path, lineno, "\t".join(row), encoding):
            continue
        if len(row) != len(header):
            out.error(path, lineno, f"has {len(row)} columns, the header has {len(header)}")
            continue
        yield lineno, dict(zip(header, row))


def _read_jsonl(path: Path, split: str = "", encoding: str = "utf-8") -> SpeechSet:
    if path.is_dir():
        path = path / "manifest.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    base = path.parent.resolve()
    out = _Collector()
    for lineno, row, why in iter_json_lines(path, encoding=encoding):
        if why is not None:
            out.error(path, lineno, why)
            continue
        if not isinstance(row, dict):
            out.error(path, lineno, f"expected a JSON object, got {type(row).__name__}")
            continue
        missing = [k for k in ("id", "audio", "text") if k not in row]
        if missing:
            out.error(path, lineno, f"missing field {', '.join(missing)}")
            continue
        if not isinstance(row["text"], str):
            out.error(path, lineno, f"field text is not a string: {row['text']!r}")
            continue
        if not isinstance(row["audio"], str) or not row["audio"]:
            out.error(path, lineno, f"field audio is not a non-empty path: {row['audio']!r}")
            continue
        if row["id"] is None or str(row["id"]) == "":
            out.error(path, lineno, "field id is empty")
            continue
        try:
            start_s = _opt_float(row.get("start_s"), "start_s")
            end_s = _opt_float(row.get("end_s"), "end_s")
            duration = _opt_float(row.get("duration_s"), "duration_s")
            if start_s is not None and end_s is not None and end_s <= start_s:
                raise ValueError(f"end_s {end_s} is not after start_s {start_s}")
        except ValueError as exc:
            out.error(path, lineno, str(exc))
            continue
        if duration is None and end_s is not None:
            duration = end_s - (start_s or 0.0)
        utt = Utterance(
            id=str(row["id"]),
            audio=_resolve(base, row["audio"]),
            text=row["text"],
            duration_s=duration,
            speaker=_opt_str(row.get("speaker")),
            start_s=start_s,
            end_s=end_s,
            source=str(row.get("source") or ""),
            extra={k: v for k, v in row.items() if k not in _JSONL_KNOWN},
        )
        out.add(utt, path, lineno)
    name = path.parent.name if path.name == "manifest.jsonl" else path.stem
    return SpeechSet(name, out.utterances, str(path), out.errors)


_PATH_COLUMNS = ("path", "audio", "audio_filepath", "file", "wav")
_TEXT_COLUMNS = ("text", "sentence", "transcript", "transcription")


def _read_csv(path: Path, split: str = "", encoding: str = "utf-8") -> SpeechSet:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    base = path.parent.resolve()
    out = _Collector()
    with _open_text(path, encoding, newline="") as handle:
        # TSV: no quoting, as Common Voice writes it (texts contain bare quotes).
        reader = csv.reader(handle, delimiter=delimiter,
                            quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty; it needs a header row naming path and text columns")
        header = [h.strip() for h in header]
        path_col = next((c for c in _PATH_COLUMNS if c in header), None)
        text_col = next((c for c in _TEXT_COLUMNS if c in header), None)
        if path_col is None or text_col is None:
            raise ValueError(
                f"{path} needs a header row with a path column (one of {', '.join(_PATH_COLUMNS)}) "
                f"and a text column (one of {', '.join(_TEXT_COLUMNS)}); its first row is "
                f"{delimiter.join(header)!r}"
            )
        for lineno, values in _table_rows(reader, header, path, out, encoding):
            audio = values[path_col].strip()
            if not audio:
                out.error(path, lineno, f"empty {path_col}")
                continue
            utt_id = values.get("id", "").strip() or Path(audio).stem
            try:
                duration = _opt_float(values.get("duration_s") or values.get("duration"),
                                      "duration_s")
            except ValueError as exc:
                out.error(path, lineno, str(exc))
                continue
            known = {path_col, text_col, "id", "duration_s", "duration", "speaker"}
            utt = Utterance(
                id=utt_id,
                audio=_resolve(base, audio),
                text=values[text_col],
                duration_s=duration,
                speaker=_opt_str(values.get("speaker", "").strip()),
                source=f"{path}:{lineno}",
                extra={k: v for k, v in values.items() if k not in known},
            )
            out.add(utt, path, lineno)
    return SpeechSet(path.stem, out.utterances, str(path), out.errors)


def _read_librispeech(path: Path, split: str, encoding: str = "utf-8") -> SpeechSet:
    if path.is_file():
        files = [path]
        root = path.parent
    else:
        root = path
        files = []
        for depth in range(4):
            files = sorted(path.glob("*/" * depth + "*.trans.txt"))
            if files:
                break
        if not files:
            raise ValueError(f"no LibriSpeech *.trans.txt files found under {path}")
        if depth == 3:
            # A LibriSpeech/ root: pick one split folder.
            splits = sorted({f.relative_to(path).parts[0] for f in files})
            if len(splits) > 1:
                if split in splits:
                    files = [f for f in files if f.relative_to(path).parts[0] == split]
                    root = path / split
                else:
                    raise ValueError(
                        f"{path} holds several LibriSpeech splits ({', '.join(splits)}); pass "
                        f"one folder, e.g. {path / splits[0]}, or split='{splits[0]}'"
                    )
            else:
                root = path / splits[0]
    out = _Collector()
    for trans in files:
        with _open_text(trans, encoding) as handle:
            for lineno, line in enumerate(handle, start=1):
                line = line.strip()
                if not line or _undecodable(out, trans, lineno, line, encoding):
                    continue
                utt_id, _, text = line.partition(" ")
                audio = trans.parent / f"{utt_id}.flac"
                if not audio.exists() and (trans.parent / f"{utt_id}.wav").exists():
                    audio = trans.parent / f"{utt_id}.wav"
                parts = utt_id.split("-")
                utt = Utterance(
                    id=utt_id,
                    audio=str(audio.resolve()),
                    text=text.strip(),
                    speaker=parts[0],
                    source=f"{trans}:{lineno}",
                    extra={"chapter": parts[1]} if len(parts) == 3 else {},
                )
                out.add(utt, trans, lineno)
    name = root.name if root.name else str(root)
    return SpeechSet(name, out.utterances, str(path), out.errors)


def _read_commonvoice(path: Path, split: str, encoding: str = "utf-8") -> SpeechSet:
    if path.is_file():
        tsv, folder = path, path.parent
    else:
        folder = path
        tsv = folder / f"{split}.tsv"
        if not tsv.is_file():
            available = sorted(p.stem for p in folder.glob("*.tsv"))
            raise FileNotFoundError(
                f"Common Voice folder {folder} has no {split}.tsv; available splits: "
                f"{', '.join(available) or 'none'} (choose one with split=/--split)"
            )
    clips = folder / "clips"
    durations = _cv_durations(folder / "clip_durations.tsv")
    out = _Collector()
    with _open_text(tsv, encoding, newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None) or []
        if "path" not in header or "sentence" not in header:
            raise ValueError(
                f"{tsv} needs the Common Voice columns path and sentence; its header is {header!r}"
            )
        for lineno, values in _table_rows(reader, header, tsv, out, encoding):
            clip = values["path"].strip()
            if not clip:
                out.error(tsv, lineno, "empty path")
                continue
            utt = Utterance(
                id=Path(clip).stem,
                audio=str((clips / clip).resolve()),
                text=values["sentence"],
                duration_s=durations.get(clip),
                speaker=_opt_str(values.get("client_id")),
                source=f"{tsv}:{lineno}",
                extra={k: v for k, v in values.items()
                       if k not in ("path", "sentence", "client_id") and v != ""},
            )
            out.add(utt, tsv, lineno)
    name = f"{folder.name}_{tsv.stem}"
    return SpeechSet(name, out.utterances, str(tsv), out.errors)


def _cv_durations(path: Path) -> dict[str, float]:
    """Common Voice's ``clip_durations.tsv`` (clip, duration[ms]) when the release has it."""
    if not path.is_file():
        return {}
    durations = {}
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader, None)
        for row in reader:
            try:
                durations[row[0]] = float(row[1]) / 1000.0
            except (IndexError, ValueError):
                continue
    return durations


_STM_LABEL = re.compile(r"<[^<>]*,[^<>]*>|<NA>", re.IGNORECASE)


def clean_tedlium_text(text: str) -> str:
    """TED-LIUM reference as scored here: markers dropped, split contractions rejoined.

    ``<unk>`` (a word the transcriber could not make out) and other ``<...>``/``{...}`` markers
    are removed, since no recogniser can be expected to output them; the corpus tokenises
    contractions as ``it 's`` / ``don 't`` (``do n't`` in Treebank style), which become ``it's`` /
    ``don't``; a word that starts with an apostrophe (``'cause``) stays apart. This follows the
    ESB benchmark's TED-LIUM preparation; the raw line is kept in ``extra["text_raw"]``.
    """
    tokens = [t for t in text.split() if not re.fullmatch(r"<[^<>]*>|\{[^{}]*\}", t)]
    joined = re.sub(r" '(s|re|ve|ll|d|m|t)\b", r"'\1", " ".join(tokens), flags=re.IGNORECASE)
    return re.sub(r" (n't)\b", r"\1", joined, flags=re.IGNORECASE)


def _centis(seconds: float) -> int:
    """Kaldi's TED-LIUM segment-id time: ``int(t * 100 + 0.5)`` (half up, float-safe)."""
    return int(math.floor(seconds * 100 + 0.5 + 1e-9))


def _read_tedlium(path: Path, split: str, encoding: str = "utf-8") -> SpeechSet:
    if path.is_file():
        stm_files, root = [path], path.parent.parent
    else:
        root = path
        stm_files = sorted((path / "stm").glob("*.stm"))
    out = _Collector()
    n_ignored = 0
    for stm in stm_files:
        sph = root / "sph" / f"{stm.stem}.sph"
        with _open_text(stm, encoding) as handle:
            for lineno, line in enumerate(handle, start=1):
                line = line.strip()
                if not line or line.startswith(";;") or _undecodable(out, stm, lineno, line, encoding):
                    continue
                parts = line.split(maxsplit=5)
                if len(parts) < 5:
                    out.error(stm, lineno,
                              "expected 'file channel speaker start end [<label>] text'")
                    continue
                talk, _channel, speaker, start_text, end_text = parts[:5]
                rest = parts[5] if len(parts) > 5 else ""
                label = ""
                first, _, tail = rest.partition(" ")
                if _STM_LABEL.fullmatch(first):
                    label, rest = first, tail
                if rest.strip() == "ignore_time_segment_in_scoring":
                    n_ignored += 1
                    continue
                try:
                    start_s, end_s = float(start_text), float(end_text)
                    if not (0 <= start_s < end_s):
                        raise ValueError
                except ValueError:
                    out.error(stm, lineno, f"bad segment times {start_text!r} {end_text!r}")
                    continue
                audio = sph if talk == stm.stem else root / "sph" / f"{talk}.sph"
                utt = Utterance(
                    id=f"{speaker}-{_centis(start_s):07d}-{_centis(end_s):07d}",
                    audio=str(audio.resolve()),
                    text=clean_tedlium_text(rest),
                    duration_s=round(end_s - start_s, 6),
                    speaker=speaker,
                    start_s=start_s,
                    end_s=end_s,
                    source=f"{stm}:{lineno}",
                    extra={"text_raw": rest, "talk": talk, **({"label": label} if label else {})},
                )
                out.add(utt, stm, lineno)
    if n_ignored:
        log.info("TED-LIUM: skipped %d ignore_time_segment_in_scoring segments", n_ignored)
    name = f"tedlium_{root.name}"
    return SpeechSet(name, out.utterances, str(path), out.errors)


def _read_ljspeech(path: Path, split: str = "", encoding: str = "utf-8") -> SpeechSet:
    folder = path.parent if path.is_file() else path
    metadata = folder / "metadata.csv"
    out = _Collector()
    with _open_text(metadata, encoding) as handle:
        for lineno, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line or _undecodable(out, metadata, lineno, line, encoding):
                continue
            parts = line.split("|")
            if len(parts) < 2:
                out.error(metadata, lineno, "expected 'id|text|normalized text'")
                continue
            raw = parts[1]
            text = parts[2] if len(parts) > 2 and parts[2] else raw
            utt = Utterance(
                id=parts[0],
                audio=str((folder / "wavs" / f"{parts[0]}.wav").resolve()),
                text=text,
                speaker="LJ",
                source=f"{metadata}:{lineno}",
                extra={"text_raw": raw},
            )
            out.add(utt, metadata, lineno)
    return SpeechSet(folder.name, out.utterances, str(metadata), out.errors)


_READERS = {
    "jsonl": _read_jsonl,
    "csv": _read_csv,
    "librispeech": _read_librispeech,
    "commonvoice": _read_commonvoice,
    "tedlium": _read_tedlium,
    "ljspeech": _read_ljspeech,
}


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets
# ----------------------------------------------------------------------------------------------


def _read_hf(
    spec: str,
    config: str | None,
    split: str,
    audio_column: str,
    text_column: str,
    streaming: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    stop_after: int | None,
) -> SpeechSet:
    name, _, spec_config = spec.partition(":")
    if spec_config and config and spec_config != config:
        raise ValueError(f"dataset {spec!r} names config {spec_config!r} but hf_config={config!r}")
    config = config or spec_config or None
    label = f"{name}" + (f" (config {config})" if config else "") + f", split {split}"
    local_hint = (
        f"No local file or folder named '{spec}' exists either. Download the data once and use a "
        "local copy instead: a manifest.jsonl (id, audio, text per line), a CSV/TSV with "
        "path,text columns, or a LibriSpeech / Common Voice / TED-LIUM folder."
    )
    try:
        import datasets
    except ImportError:
        raise DatasetUnavailableError(
            f"'{spec}' looks like a Hugging Face dataset id, but the datasets package is not "
            f"installed (pip install 'asrprune[datasets]'). {local_hint}"
        ) from None

    offline = hub.hub_offline()
    reachable = True if offline else hub.hub_reachable()
    try:
        if offline or not reachable:
            with hub.offline_mode():
                ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
        else:
            ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear message
        if offline:
            why = "HF_HUB_OFFLINE is set and the dataset is not in the local Hugging Face cache"
        elif not reachable:
            why = "the Hugging Face hub is unreachable from here and the dataset is not cached"
        else:
            why = f"{type(exc).__name__}: {exc}"
        raise DatasetUnavailableError(
            f"cannot load Hugging Face dataset '{name}' ({label}): {why}. {local_hint}"
        ) from exc
    return speech_set_from_hf(
        ds, name=spec, split=split, audio_column=audio_column, text_column=text_column,
        include=include, exclude=exclude, stop_after=stop_after,
    )


_ID_COLUMNS = ("id", "utterance_id", "segment_id", "audio_id", "key", "file_id", "path")
_HF_TEXT_FALLBACKS = ("text", "sentence", "transcript", "transcription", "normalized_text")


def speech_set_from_hf(
    ds,
    *,
    name: str,
    split: str = "test",
    audio_column: str = "audio",
    text_column: str = "text",
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    stop_after: int | None = None,
) -> SpeechSet:
    """Turn a loaded ``datasets`` (Iterable)Dataset into a :class:`SpeechSet` of in-memory audio.

    The audio column is read undecoded (``Audio(decode=False)``) where possible, so no
    ``torchcodec``/``librosa`` is needed: the encoded bytes are kept and decoded by
    :func:`load_audio`. Columns already holding ``{"array", "sampling_rate"}`` are kept as arrays.

    Args:
        ds: a ``datasets.Dataset`` or ``datasets.IterableDataset``.
        name: dataset label for ids of rows without an id column and for ``SpeechSet.name``.
        split: split label.
        audio_column: column with the audio.
        text_column: column with the reference (fallbacks: see :func:`read_speech_set`).
        include: id patterns to keep while reading.
        exclude: id patterns to drop while reading.
        stop_after: stop after this many kept rows (a stream is not read further).

    Returns:
        The speech set (errors: rows without usable audio or text).

    Raises:
        ValueError: the audio or text column does not exist.
    """
    import datasets

    columns = list(ds.column_names or []) if getattr(ds, "column_names", None) else []
    features = getattr(ds, "features", None) or {}
    if columns and audio_column not in columns:
        raise ValueError(
            f"dataset {name} has no audio column '{audio_column}' (columns: {', '.join(columns)}); "
            "pass audio_column=/--audio-column"
        )
    if columns and text_column not in columns:
        fallback = next((c for c in _HF_TEXT_FALLBACKS if c in columns), None)
        if text_column != "text" or fallback is None:
            raise ValueError(
                f"dataset {name} has no text column '{text_column}' (columns: "
                f"{', '.join(columns)}); pass text_column=/--text-column"
            )
        text_column = fallback
    if isinstance(features.get(audio_column), datasets.Audio):
        ds = ds.cast_column(audio_column, datasets.Audio(decode=False))
    id_column = next((c for c in _ID_COLUMNS if c in columns), None)

    out = _Collector()
    for index, row in enumerate(ds):
        audio = row.get(audio_column)
        utt_path = ""
        array = audio_bytes = rate = None
        if isinstance(audio, dict):
            utt_path = audio.get("path") or ""
            if audio.get("array") is not None:
                array = np.asarray(audio["array"])
                rate = audio.get("sampling_rate")
            elif audio.get("bytes"):
                audio_bytes = audio["bytes"]
        elif isinstance(audio, str):
            utt_path = audio
        if id_column is not None and row.get(id_column) not in (None, ""):
            utt_id = str(row[id_column])
            if id_column == "path":
                utt_id = Path(utt_id).stem
        elif utt_path:
            utt_id = Path(utt_path).stem
        else:
            utt_id = f"{split}-{index:06d}"
        if include and not any(fnmatch.fnmatchcase(utt_id, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(utt_id, p) for p in exclude):
            continue
        text = row.get(text_column)
        if not isinstance(text, str):
            out.error(name, None, f"row {index} ({utt_id}): text is not a string: {text!r}")
            continue
        local = utt_path and array is None and audio_bytes is None and Path(utt_path).is_file()
        if array is None and audio_bytes is None and not local:
            out.error(name, None, f"row {index} ({utt_id}): no audio in column '{audio_column}'")
            continue
        duration = None
        if array is not None and rate:
            duration = array.shape[0] / float(rate)
        if local:
            label = str(Path(utt_path).resolve())
        else:
            label = f"hf://{name}/{split}/{utt_path or index}"
        utt = Utterance(
            id=utt_id,
            audio=label,
            text=text,
            duration_s=duration,
            speaker=_opt_str(row.get("speaker_id") or row.get("speaker") or row.get("client_id")),
            source=f"hf:{name}:{split}:{index}",
            array=array,
            sampling_rate=int(rate) if rate else None,
            audio_bytes=audio_bytes,
        )
        out.add(utt, name, None)
        if stop_after is not None and len(out.utterances) >= stop_after:
            break
    return SpeechSet(f"{name}:{split}", out.utterances, f"hf:{name}:{split}", out.errors, "hf")


# ----------------------------------------------------------------------------------------------
# durations
# ----------------------------------------------------------------------------------------------


def _with_duration(utt: Utterance) -> Utterance:
    """Fill a missing duration from the file header (cheap); leave None when unreadable."""
    if utt.duration_s is not None:
        return utt
    duration = None
    if utt.array is not None and utt.sampling_rate:
        duration = np.asarray(utt.array).shape[0] / float(utt.sampling_rate)
    elif utt.audio_bytes is None and os.path.isfile(utt.audio):
        duration = probe_duration(utt.audio)
    if duration is None:
        return utt
    if utt.start_s is not None or utt.end_s is not None:
        duration = min(duration, utt.end_s or duration) - (utt.start_s or 0.0)
    return _replace(utt, duration_s=round(max(duration, 0.0), 6))


def _replace(utt: Utterance, **changes) -> Utterance:
    return dataclasses.replace(utt, **changes)
