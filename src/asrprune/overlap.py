"""Data identity: fingerprints of speech sets and the calibration/evaluation overlap guard.

Calibration data must never be evaluation data: diagnostics (and pruning criteria) fitted on
the test set overstate what they predict. :func:`check_disjoint` compares ids and the audio
itself (identical bytes under other ids count too); :func:`fingerprint` names a selection of
utterances so that results can record exactly what they were computed on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .manifests import SpeechSet, Utterance

log = logging.getLogger(__name__)

__all__ = ["Overlap", "OverlapError", "calibration_record", "check_against_record", "check_disjoint", "fingerprint"]


class OverlapError(ValueError):
    """Calibration and evaluation data share utterances (ids or identical audio)."""

    def __init__(self, message: str, overlap: "Overlap"):
        self.overlap = overlap
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.args[0], self.overlap))


def _flatten(items) -> list[Utterance]:
    if isinstance(items, (SpeechSet, Utterance)):
        items = [items]
    out: list[Utterance] = []
    for item in items:
        if isinstance(item, Utterance):
            out.append(item)
        elif isinstance(item, SpeechSet):
            out.extend(item.utterances)
        else:
            out.extend(_flatten(item))
    return out


def _array_digest(utt: Utterance) -> str:
    h = hashlib.sha256()
    h.update(f"{utt.sampling_rate}:".encode())
    if utt.array is not None:
        arr = np.ascontiguousarray(utt.array)
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(arr.tobytes())
    else:
        h.update(utt.audio_bytes or b"")
    return h.hexdigest()


def fingerprint(utterances: Iterable[Utterance] | SpeechSet) -> str:
    """Short hex id of a set of utterances: ids, texts, segments and audio sizes, order-free.

    File sizes (not mtimes, which change on every copy) stand for the audio, so the same data
    on two machines gets the same fingerprint; in-memory audio is hashed in full.

    Args:
        utterances: utterances or a SpeechSet (nested lists of them work too).

    Returns:
        16 hex characters of a sha256.
    """
    h = hashlib.sha256()
    for utt in sorted(_flatten(utterances), key=lambda u: u.id):
        if utt.array is not None or utt.audio_bytes is not None:
            audio = _array_digest(utt)
        else:
            try:
                audio = os.path.getsize(utt.audio)
            except OSError:
                audio = -1
        h.update(json.dumps([utt.id, utt.text, utt.start_s, utt.end_s, audio],
                            ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Overlap:
    """What calibration and evaluation share: ids, and (calibration id, evaluation id) pairs
    with identical audio under different ids."""

    shared_ids: tuple[str, ...] = ()
    identical_audio: tuple[tuple[str, str], ...] = ()

    @property
    def count(self) -> int:
        """Number of evaluation utterances involved."""
        return len(set(self.shared_ids) | {e for _, e in self.identical_audio})

    def __bool__(self) -> bool:
        return self.count > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "shared_ids": list(self.shared_ids),
            "identical_audio": [list(p) for p in self.identical_audio],
            "count": self.count,
        }


def _cheap_audio_key(utt: Utterance) -> tuple | None:
    """A key equal for every pair of possibly identical audio (size + span); None if unreadable."""
    span = (utt.start_s, utt.end_s)
    if utt.array is not None or utt.audio_bytes is not None:
        return ("mem", _array_digest(utt), span)
    try:
        return ("file", os.path.getsize(utt.audio), span)
    except OSError:
        return None


def _file_digest(path: str, cache: dict[str, str]) -> str:
    if path not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
        cache[path] = h.hexdigest()
    return cache[path]


def check_disjoint(
    calibration: Iterable[Utterance] | SpeechSet,
    evaluation: Iterable[Utterance] | SpeechSet | Sequence[SpeechSet],
    *,
    allow_overlap: bool = False,
) -> Overlap:
    """Refuse calibration data that overlaps the evaluation data.

    Two utterances overlap when they share an id or their audio is identical: the sha256 of
    the file bytes plus the segment span (segments of one file only match on the same span),
    or of the in-memory audio. Files are hashed only when their size matches a file of the
    other side.

    Args:
        calibration: calibration utterances (or SpeechSet).
        evaluation: evaluation utterances, a SpeechSet, or several SpeechSets.
        allow_overlap: log a warning instead of raising.

    Returns:
        The :class:`Overlap` found (empty when disjoint).

    Raises:
        OverlapError: overlap found and ``allow_overlap`` is False; the message lists up to 10
            offenders, their count, and how to allow it.
    """
    calib = _flatten(calibration)
    evals = _flatten(evaluation)
    calib_ids = {u.id for u in calib}
    shared = sorted({u.id for u in evals if u.id in calib_ids})

    calib_keys: dict[tuple, list[Utterance]] = {}
    for utt in calib:
        key = _cheap_audio_key(utt)
        if key is not None:
            calib_keys.setdefault(key, []).append(utt)
    cache: dict[str, str] = {}

    def digest(utt: Utterance) -> str:
        if utt.array is not None or utt.audio_bytes is not None:
            return _array_digest(utt)
        return _file_digest(utt.audio, cache)

    identical: list[tuple[str, str]] = []
    shared_set = set(shared)
    for utt in evals:
        key = _cheap_audio_key(utt)
        if key is None or key not in calib_keys:
            continue
        try:
            target = digest(utt)
            for other in calib_keys[key]:
                if other.id != utt.id and utt.id not in shared_set and digest(other) == target:
                    identical.append((other.id, utt.id))
                    break
        except OSError as exc:
            log.debug("overlap check could not hash %s: %s", utt.audio, exc)
    overlap = Overlap(tuple(shared), tuple(identical))
    if not overlap:
        return overlap

    parts = []
    if shared:
        shown = ", ".join(shared[:10]) + (", ..." if len(shared) > 10 else "")
        parts.append(f"{len(shared)} shared utterance ids ({shown})")
    if identical:
        shown = ", ".join(f"{e} = {c}" for c, e in identical[:10])
        parts.append(
            f"{len(identical)} evaluation utterances whose audio is identical to a calibration "
            f"utterance (evaluation = calibration: {shown}{', ...' if len(identical) > 10 else ''})"
        )
    message = (
        f"calibration and evaluation data overlap in {overlap.count} of {len(evals)} evaluation "
        f"utterances: {'; '.join(parts)}. Diagnostics calibrated on test data overstate what "
        "they predict; choose disjoint sets (e.g. --include/--exclude id patterns), or pass "
        "allow_overlap=True (CLI: --allow-overlap) to proceed anyway."
    )
    if allow_overlap:
        log.warning("%s (allowed)", message)
        return overlap
    raise OverlapError(message, overlap)


def calibration_record(utterances: Iterable[Utterance] | SpeechSet) -> dict[str, Any]:
    """What a pruned model records of its calibration data, so that any later evaluation can be
    checked against it without the data: the fingerprint, and per utterance its id, audio size,
    segment and the sha256 of its audio."""
    cache: dict[str, str] = {}
    rows = []
    for utt in _flatten(utterances):
        if utt.array is not None or utt.audio_bytes is not None:
            size, digest = None, _array_digest(utt)
        else:
            try:
                size, digest = os.path.getsize(utt.audio), _file_digest(utt.audio, cache)
            except OSError:
                size, digest = None, None
        rows.append({"id": utt.id, "size": size, "start_s": utt.start_s, "end_s": utt.end_s, "sha256": digest})
    return {"fingerprint": fingerprint(utterances), "n_utterances": len(rows), "utterances": rows}


def check_against_record(
    record: Mapping[str, Any],
    evaluation: Iterable[Utterance] | SpeechSet | Sequence[SpeechSet],
    *,
    allow_overlap: bool = False,
    what: str = "the model's calibration data",
) -> Overlap:
    """:func:`check_disjoint` against a :func:`calibration_record` (a pruned model's pruning.json).

    Raises:
        OverlapError: the evaluation shares ids or identical audio with the record, unless
            ``allow_overlap`` (then a warning).
    """
    rows = list(record.get("utterances") or [])
    ids = {r["id"] for r in rows}
    by_key = {(r.get("size"), r.get("start_s"), r.get("end_s")): r for r in rows if r.get("sha256")}
    evals = _flatten(evaluation)
    shared = sorted({u.id for u in evals if u.id in ids})
    identical: list[tuple[str, str]] = []
    cache: dict[str, str] = {}
    for utt in evals:
        if utt.id in ids:
            continue
        if utt.array is not None or utt.audio_bytes is not None:
            key, digest = None, _array_digest(utt)
            match = next((r for r in rows if r.get("sha256") == digest), None)
        else:
            try:
                key = (os.path.getsize(utt.audio), utt.start_s, utt.end_s)
            except OSError:
                continue
            match = by_key.get(key)
            if match is not None and _file_digest(utt.audio, cache) != match["sha256"]:
                match = None
        if match is not None:
            identical.append((match["id"], utt.id))
    overlap = Overlap(tuple(shared), tuple(identical))
    if overlap:
        shown = ", ".join(list(shared[:5]) + [f"{e} = {c}" for c, e in identical[:5]])
        message = (f"the evaluation data overlaps {what} in {overlap.count} of {len(evals)} utterances ({shown}); "
                   "a model pruned with calibration on test data is scored on what it was fitted to. "
                   "Choose disjoint data, or pass --allow-overlap (recorded) to proceed anyway")
        if not allow_overlap:
            raise OverlapError(message, overlap)
        log.warning("%s (allowed)", message)
    return overlap
