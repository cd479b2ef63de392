"""Audio of an utterance: decoded, averaged to mono and resampled, never truncated.

soundfile reads FLAC, WAV, OGG and NIST SPHERE; PyAV reads MP3, M4A and anything soundfile
cannot; soxr (quality ``HQ``) resamples to the requested rate. In-memory audio (Hugging Face
datasets) is either a decoded array or the still-encoded bytes.
"""

from __future__ import annotations

import io
import os
import urllib.parse
from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = ["AudioError", "load_audio", "probe_duration"]

class Utterance(Protocol):
    """What audio needs of an utterance (``manifests.Utterance`` has it; no import of it here)."""

    id: str
    audio: str
    start_s: float | None
    end_s: float | None
    array: np.ndarray | None
    sampling_rate: int | None
    audio_bytes: bytes | None


# suffixes PyAV decodes better than soundfile
AV_FIRST = {".mp3", ".m4a", ".mp4", ".aac", ".wma", ".webm", ".mkv", ".amr"}


class AudioError(ValueError):
    """An utterance's audio is missing, unreadable, corrupt or empty."""

    def __init__(self, utt_id: str, path: str, reason: str):
        self.utt_id = utt_id
        self.path = path
        self.reason = reason
        super().__init__(f"cannot load audio of utterance '{utt_id}' from {path}: {reason}")

    def __reduce__(self):  # keep picklable across worker processes
        return (type(self), (self.utt_id, self.path, self.reason))


class _DecodeError(Exception):
    pass


def load_audio(utt: Utterance, sampling_rate: int = 16000) -> np.ndarray:
    """Load an utterance's audio as mono float32 at ``sampling_rate``, its segment only.

    Channels are averaged; any input rate is resampled with soxr (quality ``HQ``). soundfile
    reads FLAC/WAV/OGG/NIST SPHERE; PyAV reads MP3/M4A and anything soundfile cannot.
    Nothing is truncated: a 34 s utterance comes back whole.

    Args:
        utt: the utterance (file-backed, ``start_s``/``end_s`` segment, or in-memory).
        sampling_rate: output rate in Hz.

    Returns:
        float32 array of shape (n_samples,), n_samples ~= duration * sampling_rate.

    Raises:
        AudioError: the file is missing, unreadable/corrupt, empty, or the segment lies outside it.
    """
    path = utt.audio
    if utt.array is not None:
        if not utt.sampling_rate:
            raise AudioError(utt.id, path, "in-memory audio has no sampling_rate")
        data = np.asarray(utt.array, dtype=np.float32)
        if data.ndim == 1:
            data = data[:, None]
        elif data.ndim != 2:
            raise AudioError(utt.id, path, f"in-memory audio has shape {data.shape}")
        rate = int(utt.sampling_rate)
        data = _slice_segment(utt, data, rate)
    else:
        if utt.audio_bytes is not None:
            opener = lambda: io.BytesIO(utt.audio_bytes)  # noqa: E731
            suffix = Path(urllib.parse.urlparse(path).path).suffix.lower()
        else:
            if "://" in path:
                raise AudioError(utt.id, path, "remote audio is not supported; download it first")
            if not os.path.isfile(path):
                raise AudioError(utt.id, path, "file not found")
            if os.path.getsize(path) == 0:
                raise AudioError(utt.id, path, "file is empty (0 bytes)")
            opener = lambda: path  # noqa: E731
            suffix = Path(path).suffix.lower()
        data, rate = _decode(utt, opener, suffix)
    if data.shape[0] == 0:
        where = " in the segment" if utt.end_s is not None else ""
        raise AudioError(utt.id, path, f"no audio samples{where}")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.all(np.isfinite(mono)):
        raise AudioError(utt.id, path, "audio contains NaN or infinite samples")
    if rate != sampling_rate:
        import soxr

        mono = soxr.resample(mono, rate, sampling_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _decode(utt: Utterance, opener, suffix: str) -> tuple[np.ndarray, int]:
    """(samples, channels) float32 and the file's rate; soundfile first unless PyAV suits better."""
    if suffix in AV_FIRST:
        order = (_decode_av, _decode_soundfile)
    else:
        order = (_decode_soundfile, _decode_av)
    reasons = []
    for decoder in order:
        try:
            return decoder(utt, opener())
        except AudioError:
            raise
        except Exception as exc:  # noqa: BLE001 - each backend fails its own way
            reasons.append(f"{decoder.__name__.removeprefix('_decode_')}: {exc}".strip())
    raise AudioError(utt.id, utt.audio, "unreadable or corrupt audio (" + "; ".join(reasons) + ")")


def _segment_outside(utt: Utterance, seconds: float) -> AudioError:
    return AudioError(utt.id, utt.audio, f"segment starts at {utt.start_s:.2f} s but the audio is only {seconds:.2f} s long")


def _segment_frames(utt: Utterance, rate: int, n_frames: int | None) -> tuple[int, int | None]:
    start = int(round(utt.start_s * rate)) if utt.start_s else 0
    stop = int(round(utt.end_s * rate)) if utt.end_s is not None else None
    if n_frames is not None:
        if start >= n_frames and (utt.start_s or 0) > 0:
            raise _segment_outside(utt, n_frames / rate)
        stop = n_frames if stop is None else min(stop, n_frames)
    return start, stop


def _slice_segment(utt: Utterance, data: np.ndarray, rate: int) -> np.ndarray:
    if utt.start_s is None and utt.end_s is None:
        return data
    start, stop = _segment_frames(utt, rate, data.shape[0])
    return data[start:stop]


def _decode_soundfile(utt: Utterance, src) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with sf.SoundFile(src) as f:
        rate = f.samplerate
        start, stop = _segment_frames(utt, rate, f.frames)
        if start:
            f.seek(start)
        data = f.read(max(stop - start, 0), dtype="float32", always_2d=True)
    return data, rate


def _decode_av(utt: Utterance, src) -> tuple[np.ndarray, int]:
    import av

    with av.open(src) as container:
        stream = next((s for s in container.streams if s.type == "audio"), None)
        if stream is None:
            raise _DecodeError("no audio stream")
        rate = stream.codec_context.sample_rate or stream.rate
        start, stop = _segment_frames(utt, rate, None)
        # Convert the sample format only (planar float); rate and channels stay, soxr resamples.
        resampler = av.AudioResampler(format="fltp")
        chunks, n = [], 0
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunk = out.to_ndarray()  # (channels, samples)
                chunks.append(chunk)
                n += chunk.shape[1]
            if stop is not None and n >= stop:
                break
        else:
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
    if not chunks:
        raise _DecodeError("no audio frames decoded")
    data = np.concatenate(chunks, axis=1).T.astype(np.float32, copy=False)
    if start >= data.shape[0] and start > 0:
        raise _segment_outside(utt, data.shape[0] / rate)
    return data[start:stop], rate


def probe_duration(path: str) -> float | None:
    if Path(path).suffix.lower() not in AV_FIRST:
        try:
            import soundfile as sf

            info = sf.info(path)
            if info.frames > 0:
                return info.frames / float(info.samplerate)
        except Exception:  # noqa: BLE001 - fall through to PyAV
            pass
    try:
        import av

        with av.open(path) as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is not None and stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            if container.duration:
                return container.duration / 1_000_000.0
    except Exception:  # noqa: BLE001 - unreadable files fail in load_audio with a reason
        return None
    return None
