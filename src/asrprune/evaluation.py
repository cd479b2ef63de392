"""Evaluation: transcribe a speech set, score it, and compare two runs by the paired test.

- :func:`evaluate` loads audio in worker threads, batches utterances by length, decodes them
  (:class:`asrprune.decoding.Decoder`), scores each utterance (:mod:`asrprune.scoring`) and
  appends it to ``utterances.jsonl`` as it goes. ``summary.json`` is written at the end. A rerun
  into the same directory resumes where it stopped.
- :func:`load_result` reads a finished (or partial) run back; :func:`compare` gives the paired
  bootstrap interval of delta WER, the paired permutation p-value and how much of the change
  its top utterances carry (statistics in :mod:`asrprune.stats`).

Per-utterance diagnostics (see :func:`asrprune.scoring.detect_hallucination`): the detected
language of a multilingual model, the insertion count, and a hallucination flag with its reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .audio import AudioError
from .early_stop import EarlyStop
from .evidence import is_scored, paired_change
from .decoding import (FALLBACK_COMPRESSION_RATIO, SAMPLING_RATE, DecodeOptions, Decoder, EncoderCache,
                       compression_ratio, generate_kwargs, loaded_batches)
from .files import OutputLock, append_jsonl, atomic_write_json, atomic_write_text, env_stamp, prepare_out_dir, read_json, read_jsonl
from .manifests import Utterance
from .models import model_fingerprint
from .overlap import check_against_record
from .overlap import fingerprint as data_fingerprint
from .scoring import ErrorCounts, default_normalizer, detect_hallucination, score_utterance
from .stats import bootstrap_ci, ratio

log = logging.getLogger(__name__)

__all__ = [
    "EMPTY_REFERENCE_POLICIES",
    "Comparison",
    "EvaluationFailedError",
    "RunMismatchError",
    "WerResult",
    "compare",
    "evaluate",
    "load_result",
]


UTTERANCES_FILE = "utterances.jsonl"

SUMMARY_FILE = "summary.json"

RUN_FILE = "run.json"

_SCORING_VERSION = 1


class RunMismatchError(ValueError):
    """An output directory holds results of a different run (other model, data or options)."""


class EvaluationFailedError(ValueError):
    """A run scored nothing, or more utterances failed than allowed: no WER to report.

    ``summary.json`` is still written (``wer`` and ``cer`` null, ``status`` ``failed``) so that
    the failures can be read; the message says how many failed and why.
    """


#: what to do with an utterance whose reference is empty after normalisation
EMPTY_REFERENCE_POLICIES = ("skip", "score", "error")


@dataclass
class WerResult:
    """A scored run: corpus metrics, per-utterance rows (input order) and the summary dict.

    ``wer``/``cer`` and intervals are fractions. ``rows`` hold what ``utterances.jsonl`` holds.
    """

    wer: float
    cer: float
    wer_ci: tuple[float, float]
    cer_ci: tuple[float, float]
    counts: ErrorCounts
    n_utterances: int
    n_failed: int
    rows: list[dict]
    summary: dict
    out_dir: Path | None = None

    def to_dict(self) -> dict:
        return self.summary

    def scored_rows(self) -> list[dict]:
        policy = self.summary.get("empty_reference", {}).get("policy", "score")
        return [r for r in self.rows if is_scored(r, policy)]


def _finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def _summarize(
    rows: list[dict],
    *,
    bootstrap_n: int,
    bootstrap_seed: int,
    bootstrap_speakers: bool,
    confidence: float = 0.95,
    empty_reference: str = "skip",
) -> dict:
    """Corpus metrics of scored rows (failed rows are counted, not scored; empty references
    under ``skip`` are counted apart). WER and CER are ``None`` when no reference word (character)
    was scored: a run that scored nothing has no error rate, not a rate of 0."""
    scored = [r for r in rows if is_scored(r, empty_reference)]
    failed = [r for r in rows if r.get("failed")]
    empty = [r["id"] for r in rows if not r.get("failed") and int(r.get("ref_words", 0) or 0) == 0]
    counts = ErrorCounts()
    for r in scored:
        counts = counts + ErrorCounts.from_row(r)
    out: dict[str, Any] = {
        "wer": _finite(counts.wer) if counts.ref_words else None,
        "cer": _finite(counts.cer) if counts.ref_chars else None,
        "wer_ci": [None, None],
        "cer_ci": [None, None],
        "n_utterances": len(scored),
        "n_failed": len(failed),
        "counts": counts.to_dict(),
    }
    if scored and counts.ref_words:
        groups = [r.get("speaker") or r["id"] for r in scored] if bootstrap_speakers else None
        kw = dict(n_resamples=bootstrap_n, seed=bootstrap_seed, groups=groups, confidence=confidence)
        counts_each = [ErrorCounts.from_row(r) for r in scored]
        wlo, whi = bootstrap_ci([c.errors for c in counts_each], [c.ref_words for c in counts_each], **kw)
        clo, chi = bootstrap_ci([c.char_errors for c in counts_each], [c.ref_chars for c in counts_each], **kw)
        out["wer_ci"] = [_finite(wlo), _finite(whi)]
        out["cer_ci"] = [_finite(clo), _finite(chi)]
    out["bootstrap"] = {
        "n_resamples": bootstrap_n,
        "seed": bootstrap_seed,
        "confidence": confidence,
        "unit": "speaker" if bootstrap_speakers else "utterance",
        "method": "percentile",
    }
    languages: dict[str, int] = {}
    for r in scored:
        lang = r.get("language_detected") or r.get("language")
        if lang:
            languages[lang] = languages.get(lang, 0) + 1
    out["languages"] = languages
    flagged = [r for r in scored if r.get("hallucination")]
    out["n_hallucination"] = len(flagged)
    out["hallucination_ids"] = [r["id"] for r in flagged][:50]
    if any("fallback_temperature" in r for r in scored):  # decoded with temperature fallback
        fell = [r for r in scored if r.get("fallback_temperature")]
        out["fallback"] = {"n": len(fell), "ids": [r["id"] for r in fell][:50],
                           "unresolved": sum(compression_ratio(r["hypothesis"]) > FALLBACK_COMPRESSION_RATIO
                                             for r in fell)}
    out["n_empty_reference"] = len(empty)
    out["empty_reference"] = {"policy": empty_reference, "n": len(empty), "ids": empty[:50],
                              "scored": empty_reference == "score"}
    out["failures"] = [{"id": r["id"], "reason": r.get("failure")} for r in rows if r.get("failed")][:200]
    return out


def load_result(out_dir: str | os.PathLike) -> WerResult:
    """Read a finished (or partial) evaluation directory back into a :class:`WerResult`.

    Raises:
        FileNotFoundError: when the directory has no ``utterances.jsonl``.
    """
    out_dir = Path(out_dir)
    rows_path = out_dir / UTTERANCES_FILE
    if not rows_path.is_file():
        raise FileNotFoundError(f"{rows_path} not found: is {out_dir} an `asrprune evaluate` output directory?")
    rows = read_jsonl(rows_path)
    summary_path = out_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    order = summary.get("order")
    if order:
        pos = {i: k for k, i in enumerate(order)}
        rows.sort(key=lambda r: pos.get(r["id"], len(pos)))
    bs = summary.get("bootstrap", {})
    if "empty_reference" in summary:
        policy = summary["empty_reference"]["policy"]
    elif summary:  # written before the policy existed: empty references were scored
        policy = "score"
    else:  # a run in progress
        policy = (read_json(out_dir / RUN_FILE, {}) or {}).get("empty_reference", "skip")
    stats = _summarize(rows, bootstrap_n=bs.get("n_resamples", 1000), bootstrap_seed=bs.get("seed", 0),
                       bootstrap_speakers=bs.get("unit") == "speaker", empty_reference=policy)
    merged = {**stats, **{k: v for k, v in summary.items() if k not in stats}}
    if summary.get("status") == "collapsed":  # stopped early: its rows are an interim sample
        merged.update({k: None for k in ("wer", "cer", "wer_ci", "cer_ci")})
    return _result_from(merged, rows, out_dir)


def _result_from(summary: dict, rows: list[dict], out_dir: Path | None) -> WerResult:
    def num(x):
        return math.nan if x is None else float(x)

    return WerResult(
        wer=num(summary["wer"]),
        cer=num(summary["cer"]),
        wer_ci=tuple(num(x) for x in (summary["wer_ci"] or (None, None))),
        cer_ci=tuple(num(x) for x in (summary["cer_ci"] or (None, None))),
        counts=ErrorCounts(**{k: summary["counts"][k] for k in (f.name for f in dataclasses.fields(ErrorCounts))}),
        n_utterances=summary["n_utterances"],
        n_failed=summary["n_failed"],
        rows=rows,
        summary=summary,
        out_dir=out_dir,
    )


@dataclass
class Comparison:
    """Paired comparison of run b against run a on the same utterances.

    ``delta_wer = wer_b - wer_a`` (negative: b is better), with a paired bootstrap interval and
    a paired permutation p-value; ``delta_cer`` likewise over characters. ``top`` lists the 5 utterances that contribute most to the
    delta in its direction, with ``top_share`` their part of it (1.0 = the whole delta; above 1
    when the other utterances move the other way), and ``delta_wer_without_top`` the delta with
    them left out.
    """

    n_utterances: int
    wer_a: float
    wer_b: float
    delta_wer: float
    delta_ci: tuple[float, float]
    p_value: float
    cer_a: float
    cer_b: float
    top: list[dict]
    top_share: float | None
    delta_wer_without_top: float | None
    n_excluded_failed: int
    n_improved: int
    n_worsened: int
    n_excluded_empty: int = 0
    delta_cer: float = 0.0
    delta_cer_ci: tuple[float, float] = (0.0, 0.0)
    p_value_cer: float = 1.0
    settings: dict = field(default_factory=dict)
    a: dict = field(default_factory=dict)
    b: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("wer_a", "wer_b", "delta_wer", "cer_a", "cer_b", "top_share", "delta_wer_without_top"):
            d[k] = _finite(d[k]) if d[k] is not None else None
        d["delta_ci"] = [_finite(x) for x in self.delta_ci]
        d["delta_cer"] = _finite(self.delta_cer)
        d["delta_cer_ci"] = [_finite(x) for x in self.delta_cer_ci]
        return d


def _as_result(x) -> WerResult:
    return x if isinstance(x, WerResult) else load_result(x)


def compare(
    a: "WerResult | str | os.PathLike",
    b: "WerResult | str | os.PathLike",
    *,
    n_resamples: int = 1000,
    n_permutations: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
    by_speaker: bool = False,
    top_k: int = 5,
) -> Comparison:
    """Compare two evaluation runs on the same utterance ids.

    Utterances that failed (audio error) in either run are left out of both and counted in
    ``n_excluded_failed``; empty references the runs did not score (``--empty-reference skip``)
    are left out too (``n_excluded_empty``).

    Args:
        a, b: :class:`WerResult` or evaluation output directories; delta is ``b - a``.
        n_resamples: paired bootstrap resamples for the interval.
        n_permutations: sign flips for the p-value (see :func:`permutation_pvalue`).
        seed: seeds both the bootstrap and the permutations.
        by_speaker: resample / flip whole speakers instead of utterances.
        top_k: how many utterances the concentration figure uses.

    Returns:
        :class:`Comparison`.

    Raises:
        ValueError: when the id sets differ (naming the counts and a few ids) or when the
            normalised references differ (different data or normaliser).
    """
    ra, rb = _as_result(a), _as_result(b)
    rows_a = {r["id"]: r for r in ra.rows}
    rows_b = {r["id"]: r for r in rb.rows}
    only_a = sorted(set(rows_a) - set(rows_b))
    only_b = sorted(set(rows_b) - set(rows_a))
    if only_a or only_b:
        raise ValueError(
            f"compare needs the same utterances in both runs: A has {len(rows_a)}, B has {len(rows_b)}; "
            f"{len(only_a)} only in A (e.g. {only_a[:3]}), {len(only_b)} only in B (e.g. {only_b[:3]}). "
            "Evaluate both on the same data with the same --limit/--sample/--include."
        )
    ids = [r["id"] for r in ra.rows]
    excluded = [i for i in ids if rows_a[i].get("failed") or rows_b[i].get("failed")]
    policy_a = ra.summary.get("empty_reference", {}).get("policy", "score")
    policy_b = rb.summary.get("empty_reference", {}).get("policy", "score")
    if policy_a != policy_b:
        raise ValueError(f"compare: the runs scored empty references differently ({policy_a} and {policy_b}); "
                         "evaluate both with the same --empty-reference")
    empty = [i for i in ids if i not in set(excluded)
             and not (is_scored(rows_a[i], policy_a) and is_scored(rows_b[i], policy_b))]
    ids = [i for i in ids if i not in set(excluded) and i not in set(empty)]
    if not ids:
        raise ValueError("compare: no utterance was scored in both runs")
    mismatched = [i for i in ids if rows_a[i].get("reference_norm") != rows_b[i].get("reference_norm")]
    if mismatched:
        raise ValueError(
            f"compare: the normalised references differ for {len(mismatched)} of {len(ids)} utterances "
            f"(e.g. {mismatched[:3]}); the runs used different data or normalisers"
        )
    ca = [ErrorCounts.from_row(rows_a[i]) for i in ids]
    cb = [ErrorCounts.from_row(rows_b[i]) for i in ids]
    tot_a = sum(ca, ErrorCounts())
    tot_b = sum(cb, ErrorCounts())
    groups = [rows_a[i].get("speaker") or i for i in ids] if by_speaker else None
    # the numbers (WER and CER changes, intervals, p, the top utterances) come from one place,
    # which the report also uses on older result files
    pc = paired_change([rows_a[i] for i in ids], [rows_b[i] for i in ids], policy="score", n_resamples=n_resamples,
                       n_permutations=n_permutations, confidence=confidence, seed=seed, groups=groups, top_k=top_k)
    d = np.array([b.errors - a.errors for a, b in zip(ca, cb)])
    delta, ci, p = pc["delta_wer"], pc["delta_ci"], pc["p_value"]
    share, without = pc["top_share"], pc["delta_wer_without_top"]
    pos = {i: k for k, i in enumerate(ids)}
    top = [
        {
            "id": i,
            "delta_errors": int(d[pos[i]]),
            "errors_a": int(ca[pos[i]].errors),
            "errors_b": int(cb[pos[i]].errors),
            "ref_words": int(ca[pos[i]].ref_words),
            "hallucination_a": rows_a[i].get("hallucination"),
            "hallucination_b": rows_b[i].get("hallucination"),
        }
        for i in pc["top"]
    ]
    return Comparison(
        n_utterances=len(ids),
        wer_a=tot_a.wer,
        wer_b=tot_b.wer,
        delta_wer=delta,
        delta_ci=ci,
        p_value=p,
        cer_a=tot_a.cer,
        cer_b=tot_b.cer,
        top=top,
        top_share=share,
        delta_wer_without_top=without,
        delta_cer=pc["delta_cer"],
        delta_cer_ci=tuple(pc["delta_cer_ci"]),
        p_value_cer=pc["p_value_cer"],
        n_excluded_failed=len(excluded),
        n_excluded_empty=len(empty),
        n_improved=int((d < 0).sum()),
        n_worsened=int((d > 0).sum()),
        settings={
            "n_resamples": n_resamples,
            "n_permutations": n_permutations,
            "confidence": confidence,
            "seed": seed,
            "unit": "speaker" if by_speaker else "utterance",
            "interval": "paired percentile bootstrap of sum(errors_b - errors_a) / sum(ref_words)",
            "p_value": "two-sided paired permutation test (random sign flips of per-unit error differences)",
            "top_k": top_k,
        },
        a=_run_label(ra),
        b=_run_label(rb),
    )


def _run_label(r: WerResult) -> dict:
    s = r.summary
    return {
        "out_dir": str(r.out_dir) if r.out_dir else None,
        "model": s.get("model"),
        "protocol": s.get("protocol"),
        "data": s.get("data"),
    }


def _run_key(model_fp: str, data_fp: str, options: DecodeOptions, normalizer_name: str,
             empty_reference: str = "skip") -> dict:
    key = {
        "model_fingerprint": model_fp,
        "data_fingerprint": data_fp,
        "options": options.run_key(),
        "normalizer": normalizer_name,
        "scoring_version": _SCORING_VERSION,
    }
    if empty_reference != "skip":  # the default is left out, so that older run keys stay valid
        key["empty_reference"] = empty_reference
    return key


# what changed, in the words of the flag that changes it
_KEY_FLAGS = {
    "model_fingerprint": "MODEL (another model, or the same one pruned otherwise)",
    "data_fingerprint": "DATA or its selection (--limit, --sample, --seed, --include, --exclude)",
    "options.protocol": "--protocol",
    "options.beam_size": "--beam-size",
    "options.dtype": "--dtype",
    "options.device_type": "--device",
    "options.max_new_tokens": "--max-new-tokens",
    "options.language": "--language",
    "normalizer": "the text normaliser",
    "scoring_version": "the asrprune version (its scoring changed)",
    "empty_reference": "--empty-reference",
}
_SELECTION_FLAGS = ("limit", "sample", "seed", "include", "exclude")


def _diff_keys(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += _diff_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k}")
    return diffs


def _mismatch(old: Mapping, key: Mapping, selection: Mapping | None) -> str | None:
    """What differs between the run in a folder and this one, named by flag; None if nothing."""
    old_key = {k: v for k, v in old.items() if k != "selection"}
    parts = []
    for path in _diff_keys(old_key, key):
        a = _lookup(old_key, path)
        b = _lookup(key, path)
        if path == "data_fingerprint" and selection is not None and isinstance(old.get("selection"), Mapping):
            changed = [f"--{f} {old['selection'].get(f)!r} -> {selection.get(f)!r}" for f in _SELECTION_FLAGS
                       if old["selection"].get(f) != selection.get(f)]
            if changed:
                parts.append(", ".join(changed))
                continue
        parts.append(f"{_KEY_FLAGS.get(path, path)}: {a!r} -> {b!r}")
    return "; ".join(parts) or None


def _lookup(d: Mapping, path: str):
    for part in path.split("."):
        d = d.get(part) if isinstance(d, Mapping) else None
    return d


def _prepare_out_dir(out_dir: Path, key: dict, overwrite: bool,
                     selection: Mapping | None = None) -> tuple[dict[str, dict], int]:
    """Validate (or start) the output directory.

    Returns:
        The rows already finished (by id), and how many rows that failed earlier are retried.
    """
    run_path, rows_path = out_dir / RUN_FILE, out_dir / UTTERANCES_FILE
    if overwrite:
        for name in (RUN_FILE, UTTERANCES_FILE, SUMMARY_FILE):
            (out_dir / name).unlink(missing_ok=True)
    if run_path.is_file():
        old = read_json(run_path, {}) or {}
        what = _mismatch(old, key, selection)
        if what:
            raise RunMismatchError(
                f"{out_dir} holds results of another run ({what}); use a new --out directory, "
                "rerun with what it was run with, or pass --overwrite to discard them"
            )
    elif rows_path.is_file() and rows_path.stat().st_size > 0:
        raise RunMismatchError(
            f"{rows_path} exists but {run_path} does not, so it cannot be resumed safely; "
            "use a new --out directory, or --overwrite to discard it"
        )
    atomic_write_json(run_path, {**key, "selection": dict(selection or {})})
    done: dict[str, dict] = {}
    n_failed = 0
    if rows_path.is_file():
        rows = read_jsonl(rows_path)
        # Failed rows (unreadable audio) are retried: the file may have been fixed meanwhile.
        done = {r["id"]: r for r in rows if "id" in r and not r.get("failed")}
        n_failed = len({r["id"] for r in rows if "id" in r and r.get("failed")} - set(done))
        # Rewrite without torn lines so that appending continues on a clean line.
        atomic_write_text(rows_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()))
    return done, n_failed


def _row_of(utt: Utterance, **fields) -> dict:
    """The per-utterance row of an utterance that was not decoded (its own fields, then ``fields``)."""
    return {"id": utt.id, "audio": str(utt.audio), "speaker": utt.speaker, "reference": utt.text, **fields}


def _skipped_row(utt: Utterance, reference_norm: str) -> dict:
    return _row_of(utt, reference_norm=reference_norm, ref_words=0, duration_s=utt.duration_s, failed=False,
                   skipped="empty_reference")


def _failed_row(utt: Utterance, reason: str) -> dict:
    return _row_of(utt, duration_s=utt.duration_s, failed=True, failure=reason)


def evaluate(
    model,
    processor,
    utterances,
    options: DecodeOptions | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    encoder_cache: EncoderCache | None = None,
    normalizer: Callable[[str], str] | None = None,
    normalizer_name: str | None = None,
    model_spec: str | None = None,
    data_name: str | None = None,
    data_fp: str | None = None,
    manifest_errors: Sequence = (),
    overwrite: bool = False,
    bootstrap_n: int = 1000,
    bootstrap_seed: int = 0,
    bootstrap_speakers: bool = False,
    empty_reference: str = "skip",
    max_failed_fraction: float | None = None,
    selection: Mapping | None = None,
    calibration: Mapping | None = None,
    allow_overlap: bool = False,
    early_stop: "EarlyStop | None" = None,
    decode_batches: Callable | None = None,
) -> WerResult:
    """Transcribe and score a speech set; write results as they go; resume an interrupted run.

    The model is moved to the options' device and dtype in place if it is elsewhere, and put in
    eval mode. Audio that cannot be read (``AudioError``) becomes a failed row with its reason,
    counted in ``n_failed``; the rest is scored.

    Args:
        model: ``WhisperForConditionalGeneration``.
        processor: ``WhisperProcessor`` (feature extractor + tokenizer).
        utterances: sequence of ``manifests.Utterance`` or a ``SpeechSet`` (whose name and
            manifest errors are then recorded). Ids must be unique.
        options: :class:`DecodeOptions` (default: ``DecodeOptions()``).
        out_dir: where ``run.json``, ``utterances.jsonl`` (appended and flushed per batch) and
            ``summary.json`` go; None keeps everything in memory. An existing directory of the
            same run (model fingerprint, data fingerprint, transcript-relevant options,
            normaliser) is resumed, skipping finished ids.
        progress: show a tqdm bar.
        encoder_cache: reuse encoder outputs across calls (see :class:`EncoderCache`).
        normalizer: text normaliser for both sides (default :func:`default_normalizer`).
        normalizer_name: its name in the results (default: derived).
        model_spec: how the model was named (recorded; default ``config._name_or_path``).
        data_name / data_fp: recorded data name / fingerprint (default: from ``utterances``).
        manifest_errors: manifest lines that could not be read, recorded in the summary.
        overwrite: discard existing results in ``out_dir`` instead of resuming.
        bootstrap_n / bootstrap_seed / bootstrap_speakers: the confidence intervals.
        empty_reference: an utterance whose reference is empty after normalisation is not
            decoded and not scored (``"skip"``, the default, as the Open ASR leaderboard drops
            empty references: any hypothesis word would count as an insertion against nothing),
            scored (``"score"``: its words are insertions), or refused before decoding
            (``"error"``). A warning names the ids; the policy is recorded in the summary and,
            when not the default, in the run's key.
        max_failed_fraction: raise :class:`EvaluationFailedError` when more than this fraction
            of the utterances failed (``None``: only when none was scored).
        selection: how the utterances were selected (``limit``, ``sample``, ``seed``,
            ``include``, ``exclude``), recorded so that a resume refused for other data can name
            the flag that changed.
        calibration: the calibration record of a pruned model (``pruning.json``'s
            ``calibration``, :func:`asrprune.overlap.calibration_record`): the evaluation set must
            not overlap it (ids or identical audio), unless ``allow_overlap`` (recorded).
        allow_overlap: evaluate despite such an overlap.
        early_stop: stop a hopeless run early (:class:`asrprune.early_stop.EarlyStop`, built on
            the baseline's rows; sweeps and studies pass one, ``asrprune evaluate`` never does):
            the batches are decoded in a seeded random order and, once the decision is made, the
            summary has ``status: "collapsed"``, ``wer`` null and the interim statistics under
            ``collapsed``; a rerun without it completes the remaining utterances.
        decode_batches: decode the batches elsewhere: called once with every batch (lists of
            utterances, as this function forms them), returns their rows batch by batch
            (:func:`asrprune.executor.sharded_batches`: workers of a Ray cluster). Resume, scoring
            and the summary stay here.

    Returns:
        :class:`WerResult` with rows in input order.

    Raises:
        RunMismatchError: ``out_dir`` holds another run's results (a ValueError).
        EvaluationFailedError: no utterance was scored, or too many failed (``summary.json`` is
            written first, with ``wer`` null).
        OutputBusyError: another process writes into ``out_dir``.
        NotADirectoryError: ``out_dir`` is a file.
        OverlapError: the evaluation set overlaps the model's calibration data.
        ValueError: duplicate utterance ids, an empty reference under ``"error"``, or options
            the model cannot honour.
    """
    if empty_reference not in EMPTY_REFERENCE_POLICIES:
        raise ValueError(f"empty_reference must be one of {list(EMPTY_REFERENCE_POLICIES)}, got {empty_reference!r}")
    if max_failed_fraction is not None and not 0.0 <= float(max_failed_fraction) < 1.0:
        raise ValueError(f"max_failed_fraction must be in [0, 1), got {max_failed_fraction!r}")
    overlap = None
    if calibration:  # before anything is written: test data the model was fitted to is refused
        units = list(getattr(utterances, "utterances", utterances))
        overlap = check_against_record(calibration, units, allow_overlap=allow_overlap).to_dict()
        overlap["allowed"] = bool(allow_overlap)
    out_path = prepare_out_dir(out_dir) if out_dir is not None else None
    with OutputLock(out_path) if out_path is not None else contextlib.nullcontext():
        return _evaluate(
            model, processor, utterances, options or DecodeOptions(), out_path=out_path, progress=progress,
            encoder_cache=encoder_cache, normalizer=normalizer, normalizer_name=normalizer_name,
            model_spec=model_spec, data_name=data_name, data_fp=data_fp, manifest_errors=manifest_errors,
            overwrite=overwrite, bootstrap_n=bootstrap_n, bootstrap_seed=bootstrap_seed,
            bootstrap_speakers=bootstrap_speakers, empty_reference=empty_reference,
            max_failed_fraction=max_failed_fraction, selection=selection, calibration_overlap=overlap,
            early_stop=early_stop, decode_batches=decode_batches,
        )


def _evaluate(model, processor, utterances, options: DecodeOptions, *, out_path: Path | None, progress: bool,
              encoder_cache: EncoderCache | None, normalizer: Callable[[str], str] | None,
              normalizer_name: str | None, model_spec: str | None, data_name: str | None, data_fp: str | None,
              manifest_errors: Sequence, overwrite: bool, bootstrap_n: int, bootstrap_seed: int,
              bootstrap_speakers: bool, empty_reference: str, max_failed_fraction: float | None,
              selection: Mapping | None, calibration_overlap: Mapping | None = None,
              early_stop: "EarlyStop | None" = None, decode_batches: Callable | None = None) -> WerResult:
    """:func:`evaluate` with the output folder locked."""
    if hasattr(utterances, "utterances"):
        data_name = data_name or getattr(utterances, "name", None)
        manifest_errors = list(manifest_errors) or list(getattr(utterances, "errors", []) or [])
        data_source = str(getattr(utterances, "source", "") or "")
        utterances = list(utterances.utterances)
    else:
        utterances = list(utterances)
        data_source = ""
    ids = [u.id for u in utterances]
    if len(set(ids)) != len(ids):
        seen, dups = set(), []
        for i in ids:
            if i in seen:
                dups.append(i)
            seen.add(i)
        raise ValueError(f"utterance ids must be unique; duplicated: {sorted(set(dups))[:5]}")
    if normalizer is None:
        normalizer, default_name = default_normalizer(processor)
        normalizer_name = normalizer_name or default_name
    normalizer_name = normalizer_name or getattr(normalizer, "__qualname__", type(normalizer).__name__)

    device = options.resolved_device()
    param = next(model.parameters())
    if param.device != device and not (device.type == param.device.type and device.index is None):
        log.info("moving the model to %s", device)
        model.to(device)
    if param.dtype != options.torch_dtype:
        log.info("casting the model to %s", options.dtype)
        model.to(options.torch_dtype)
    model.eval()

    # empty references, named before anything is decoded
    empty_refs = {u.id: " ".join(normalizer(u.text or "").split()) for u in utterances}
    empty_refs = {i: r for i, r in empty_refs.items() if not r}
    if empty_refs:
        shown = ", ".join(list(empty_refs)[:10]) + (", ..." if len(empty_refs) > 10 else "")
        what = {"skip": "not decoded and not scored", "score": "scored: every hypothesis word is an insertion",
                "error": "refused"}[empty_reference]
        message = (f"{len(empty_refs)} of {len(utterances)} utterances have an empty reference after "
                   f"normalisation ({shown}); --empty-reference {empty_reference}: {what}")
        if empty_reference == "error":
            raise ValueError(message + "; choose --empty-reference skip or score, or fix the references")
        log.warning("%s", message)

    model_fp = model_fingerprint(model)
    data_fp = data_fp or data_fingerprint(utterances)
    key = _run_key(model_fp, data_fp, options, normalizer_name, empty_reference)
    done: dict[str, dict] = {}
    if out_path is not None:
        done, n_retry = _prepare_out_dir(out_path, key, overwrite, selection)
        n_done = len(set(done) & set(ids))
        if done or n_retry:
            log.warning("resuming %s: %d of %d utterances already done, %d to decode%s", out_path, n_done, len(ids),
                        len(ids) - n_done, f" ({n_retry} that failed before are tried again)" if n_retry else "")

    todo = [u for u in utterances if u.id not in done]
    if empty_reference == "skip":
        skipped = [_skipped_row(u, "") for u in todo if u.id in empty_refs]
        todo = [u for u in todo if u.id not in empty_refs]
    else:
        skipped = []
    decoder = Decoder(model, processor, options, encoder_cache)
    window_s = decoder.window_samples / SAMPLING_RATE
    # Longest first: similar lengths decode for similar numbers of steps in one batch. Those the
    # manifest already marks as longer than the window go in smaller batches of their own.
    todo_sorted = sorted(todo, key=lambda u: -(u.duration_s or 0.0))
    known_long = [u for u in todo_sorted if (u.duration_s or 0.0) > window_s + 0.5]
    short = todo_sorted[len(known_long):]
    per_call = options.utterances_per_batch
    batches = [short[i:i + per_call] for i in range(0, len(short), per_call)]
    step = options.long_form_batch_size
    if early_stop is not None:  # batches in a seeded random order: each look sees a random sample
        batches = early_stop.order(batches)
    batches += [known_long[i:i + step] for i in range(0, len(known_long), step)]
    collapsed = None
    if early_stop is not None and done:  # a resumed run may have enough already
        collapsed = early_stop.check(list(done.values()), len(utterances))
    long_queue: list[tuple[Utterance, np.ndarray]] = []
    new_rows: list[dict] = []
    audio_seconds = 0.0

    bar = tqdm(total=len(todo), unit="utt", desc="evaluate", disable=not progress)
    t0 = time.perf_counter()

    def emit(rows: list[dict]) -> None:
        new_rows.extend(rows)
        if out_path is not None:
            append_jsonl(out_path / UTTERANCES_FILE, rows)
        bar.update(len(rows))

    if skipped:
        new_rows.extend(skipped)
        if out_path is not None:
            append_jsonl(out_path / UTTERANCES_FILE, skipped)

    def score_batch(batch: list[Utterance], audios: list[np.ndarray], long_form: bool) -> list[dict]:
        with torch.inference_mode():
            decoded = decoder.decode([u.id for u in batch], audios, long_form)
        rows = []
        for utt, audio, dec in zip(batch, audios, decoded):
            s = score_utterance(utt.text, dec["hypothesis"], normalizer)
            reason = detect_hallucination(s["reference_norm"], s["hypothesis_norm"], hit_token_cap=dec["hit_token_cap"])
            rows.append({
                "id": utt.id,
                "audio": str(utt.audio),
                "speaker": utt.speaker,
                "duration_s": round(len(audio) / SAMPLING_RATE, 4),
                "reference": utt.text,
                "hypothesis": dec["hypothesis"],
                **s,
                "errors": s["substitutions"] + s["deletions"] + s["insertions"],
                "wer": _finite(ratio(s["substitutions"] + s["deletions"] + s["insertions"], s["ref_words"])),
                "n_tokens": dec["n_tokens"],
                "language": dec["language"],
                "language_detected": dec["language_detected"],
                "long_form": dec["long_form"],
                "hallucination": reason is not None,
                "hallucination_reason": reason,
                "failed": False,
                "failure": None,
                **{k: dec[k] for k in ("fallback_temperature", "first_hypothesis") if k in dec},
            })
        return rows

    if decode_batches is not None and batches:
        if early_stop is not None:
            raise ValueError("early_stop and decode_batches do not combine")
        for rows in decode_batches(batches):
            audio_seconds += sum(float(r.get("duration_s") or 0) for r in rows if not r.get("failed"))
            emit(rows)
        batches = []
    feed = loaded_batches(batches if collapsed is None else [], options.num_workers)
    try:
        for batch, loaded in feed:
            failed, ok_utts, ok_audio = [], [], []
            for utt, audio in zip(batch, loaded):
                if isinstance(audio, AudioError):
                    failed.append(_failed_row(utt, getattr(audio, "reason", None) or str(audio)))
                elif len(audio) == 0:
                    failed.append(_failed_row(utt, "audio is empty (0 samples)"))
                elif len(audio) > decoder.window_samples:
                    long_queue.append((utt, audio))  # decoded whole below, never truncated
                else:
                    ok_utts.append(utt)
                    ok_audio.append(audio)
            if failed:
                emit(failed)
            if ok_utts:
                audio_seconds += sum(len(a) for a in ok_audio) / SAMPLING_RATE
                emit(score_batch(ok_utts, ok_audio, long_form=False))
            known = len(done) + len(new_rows)
            if early_stop is not None and early_stop.due(known):
                collapsed = early_stop.check(list(done.values()) + new_rows, len(utterances))
                if collapsed is not None:
                    log.warning("stopped early after %d of %d utterances: ΔWER %+.2f points [%+.2f, %+.2f] > +%.0f "
                                "(collapsed)", collapsed["n_scored"], len(utterances), 100 * collapsed["delta"],
                                100 * collapsed["ci"][0], 100 * collapsed["ci"][1], 100 * collapsed["threshold"])
                    break
        long_queue.sort(key=lambda x: -len(x[1]))
        if collapsed is not None:
            long_queue = []
        for i in range(0, len(long_queue), step):
            chunk = long_queue[i:i + step]
            audio_seconds += sum(len(a) for _, a in chunk) / SAMPLING_RATE
            emit(score_batch([u for u, _ in chunk], [a for _, a in chunk], long_form=True))
    finally:
        feed.close()
        bar.close()
    wall = time.perf_counter() - t0

    by_id = {**done, **{r["id"]: r for r in new_rows}}
    rows = [by_id[i] for i in ids if i in by_id]
    stats = _summarize(rows, bootstrap_n=bootstrap_n, bootstrap_seed=bootstrap_seed,
                       bootstrap_speakers=bootstrap_speakers, empty_reference=empty_reference)
    error = None if collapsed is not None else _failure(stats, len(rows), max_failed_fraction)
    if collapsed is not None:  # never a full-set WER: the interim decision instead
        stats = {**stats, "wer": None, "cer": None, "wer_ci": None, "cer_ci": None}
    summary = {
        "status": "collapsed" if collapsed is not None else "failed" if error else "ok",
        "error": error,
        "collapsed": collapsed,
        **{k: stats[k] for k in ("wer", "cer", "wer_ci", "cer_ci", "n_utterances", "n_failed")},
        "n_total": len(rows),
        "n_manifest_errors": len(manifest_errors),
        "counts": stats["counts"],
        "protocol": options.protocol,
        "options": {**options.to_dict(), "resolved_device": str(device)},
        "generate_kwargs": {
            "short_form": generate_kwargs(model, options, long_form=False),
            "long_form": generate_kwargs(model, options, long_form=True),
        },
        "normalizer": normalizer_name,
        "model": {
            "spec": model_spec or getattr(model.config, "_name_or_path", None) or None,
            "fingerprint": model_fp,
            "multilingual": decoder.multilingual,
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "dtype": options.dtype,
        },
        "data": {
            "name": data_name,
            "source": data_source,
            "fingerprint": data_fp,
            "n_utterances": len(ids),
        },
        "bootstrap": stats["bootstrap"],
        "languages": stats["languages"],
        "n_hallucination": stats["n_hallucination"],
        "hallucination_ids": stats["hallucination_ids"],
        **({"fallback": stats["fallback"]} if "fallback" in stats else {}),
        "n_empty_reference": stats["n_empty_reference"],
        "empty_reference": stats["empty_reference"],
        "max_failed_fraction": max_failed_fraction,
        "calibration_overlap": calibration_overlap,
        "failures": stats["failures"],
        "manifest_errors": [str(e) for e in manifest_errors][:200],
        "throughput": {
            "audio_seconds": round(audio_seconds, 3),
            "wall_seconds": round(wall, 3),
            "audio_seconds_per_second": round(audio_seconds / wall, 3) if wall > 0 and audio_seconds else None,
            "decoded_this_run": len(new_rows) - len(skipped),
            "resumed_rows": len(set(done) & set(ids)),
            "encoder_calls": decoder.encoder_calls,
        },
        "encoder_cache": (
            {"hits": encoder_cache.hits, "misses": encoder_cache.misses, "entries": len(encoder_cache)}
            if encoder_cache is not None else None
        ),
        "environment": env_stamp(device),
        "order": ids,
    }
    if out_path is not None:
        atomic_write_json(out_path / SUMMARY_FILE, summary)
    if error:
        where = f" (summary.json in {out_path} records wer null)" if out_path is not None else ""
        raise EvaluationFailedError(error + where)
    log.info("WER %.4f over %d utterances (%d failed)", summary["wer"] if summary["wer"] is not None else math.nan,
             summary["n_utterances"], summary["n_failed"])
    return _result_from(summary, rows, out_path)


def _failure(stats: Mapping, n_total: int, max_failed_fraction: float | None) -> str | None:
    """Why a run has no WER to report (nothing scored, too many failures), or None."""
    n_failed = stats["n_failed"]
    reasons: dict[str, int] = {}
    for f in stats["failures"]:
        reasons[str(f.get("reason"))] = reasons.get(str(f.get("reason")), 0) + 1
    why = "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:5])
    examples = ", ".join(f["id"] for f in stats["failures"][:5])
    if stats["wer"] is None:
        if n_failed:
            return (f"no utterance was scored: {n_failed} of {n_total} failed ({why}; e.g. {examples}), "
                    f"{stats['n_empty_reference']} had an empty reference")
        return (f"no utterance was scored: all {n_total} have an empty reference after normalisation "
                "(--empty-reference score scores them as insertions)")
    if max_failed_fraction is not None and n_total and n_failed / n_total > max_failed_fraction:
        return (f"{n_failed} of {n_total} utterances failed ({100 * n_failed / n_total:.1f}% > "
                f"--max-failed-fraction {max_failed_fraction:g}): {why}; e.g. {examples}")
    return None
