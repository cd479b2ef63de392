"""The result files of a study directory and the reading of their rows (torch-free).

:func:`load_study` reads ``study.json``, ``runs.jsonl`` (last row per run id), ``sensitivity/``,
``plans/plan_check.json`` and ``methods.json``; :class:`Study` also reads a run's
``utterances.jsonl`` on demand. The helpers here say what a row is (finished, collapsed, its
group, the paper's number for it, its comparison, whether the change is significant) and how
numbers are written (percent, signed points, p).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import yaml

from .files import latest_rows, read_jsonl

log = logging.getLogger(__name__)

ALPHA = 0.05
# The paper's LibriSpeech WER (%) for Whisper-small (see ../shared/PAPER.md), keyed by
# "<group>@<sparsity>" and the LibriSpeech split.
PAPER_WER: dict[str, dict[str, float]] = {
    "baseline": {"test-clean": 3.45, "test-other": 11.64},
    "decoder_self_attn@0.5": {"test-clean": 3.29, "test-other": 9.26},
    "late_encoder@0.5": {"test-clean": 3.31, "test-other": 9.92},
    "global@0.4": {"test-other": 61.32},
    "sensitivity_aware@0.4": {"test-other": 11.84},
}
PAPER_NOTE = (
    "Paper numbers: Irigoyen et al. 2025 (arXiv 2511.08092), Whisper-small on the full "
    "LibriSpeech splits under their protocol; the sensitivity-aware row is their 40.8% model."
)
_GROUP_ALIASES = {
    "decoder_self_attention": "decoder_self_attn",
    "dec_self_attn": "decoder_self_attn",
    "last4_encoder": "late_encoder",
    "encoder_last4": "late_encoder",
    "global_magnitude": "global",
    "sensitivity_aware": "allocated",
    "allocation": "allocated",
}
# groups whose runs are not points of one curve
_NO_CURVE_GROUPS = {"baseline", "probe", "paper_plan"}


class ReportError(ValueError):
    """The study directory cannot be read into a report."""


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


@dataclass
class Study:
    """What a study directory holds: options, runs (last row per run id) and sensitivity."""

    root: Path
    options: dict
    runs: list[dict]
    bad_lines: list[str] = field(default_factory=list)
    sensitivity: dict | None = None
    heatmaps: list[Path] = field(default_factory=list)
    plan_check: dict | None = None  # plans/plan_check.json: whole-plan calibration loss
    methods: dict | None = None  # methods.json: the method rows against dense and global magnitude
    _utterances: dict = field(default_factory=dict)

    def utterances(self, row: Mapping) -> list[dict] | None:
        """The run's ``utterances.jsonl`` rows (cached), or None when the file is not there."""
        rid = str(row.get("run_id"))
        if rid not in self._utterances:
            path = self.root / str(row.get("run_dir") or f"runs/{rid}") / "utterances.jsonl"
            self._utterances[rid] = read_jsonl(path) if path.is_file() else None
        return self._utterances[rid]

    def baseline_of(self, row: Mapping) -> dict | None:
        """The run's baseline row (by ``baseline_run_id``, else the baseline of its model,
        protocol and data set)."""
        bid = row.get("baseline_run_id") or (row.get("comparison") or {}).get("baseline_run_id")
        for r in self.runs:
            if bid and r.get("run_id") == bid:
                return r
        key = (row.get("model"), row.get("protocol"), row.get("dataset"))
        return next((r for r in self.runs if _ok(r) and normalise_group(r.get("group")) == "baseline"
                     and (r.get("model"), r.get("protocol"), r.get("dataset")) == key), None)


def read_runs(path: Path) -> tuple[list[dict], list[str]]:
    """Rows of ``runs.jsonl``, one per ``run_id`` (:func:`asrprune.files.latest_rows`: the last
    ``ok`` row wins, else the last row; a row without ``status`` is not ``ok``).

    Returns:
        (rows in order of first appearance, descriptions of the skipped lines)
    """
    bad: list[str] = []
    rows = read_jsonl(path, errors=bad)
    keyed = [dict(r, run_id=r.get("run_id") or f"line{n}") for n, r in enumerate(rows, 1)]
    return list(latest_rows(keyed).values()), bad


def _json_file(path: Path) -> dict | None:
    """The JSON content of a result file, ``None`` when there is none.

    Raises:
        ReportError: the file is not valid JSON (named in the message).
    """
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc})") from None


def load_study(study_dir: str | Path) -> Study:
    """Read ``study.json``, ``runs.jsonl`` and ``sensitivity/`` of a study directory.

    Raises:
        FileNotFoundError: the directory or its ``runs.jsonl`` is missing.
        ReportError: ``study.json`` or ``sensitivity.json`` is not valid JSON.
    """
    root = Path(study_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"study directory not found: {root}")
    runs_path = root / "runs.jsonl"
    if not runs_path.is_file():
        raise FileNotFoundError(
            f"{runs_path} not found: a study directory holds runs.jsonl written by "
            "`asrprune sweep` or `asrprune reproduce`"
        )
    if not (root / "study.json").is_file():
        log.warning("%s has no study.json; the report will lack the study options", root)
    options = _json_file(root / "study.json") or {}
    runs, bad = read_runs(runs_path)
    runs = planned_order(runs, options, root / "sweep.yaml")
    sdir = root / "sensitivity"
    heatmaps = sorted(sdir.glob("*.png")) if sdir.is_dir() else []
    sens = _json_file(sdir / "sensitivity.json")
    plan_check = _json_file(root / "plans" / "plan_check.json")
    return Study(root=root, options=options, runs=runs, bad_lines=bad, sensitivity=sens, heatmaps=heatmaps,
                 plan_check=plan_check, methods=_json_file(root / "methods.json"))


def planned_order(runs: list[dict], options: Mapping, spec_path: Path | None = None) -> list[dict]:
    """The runs in the order the sweep planned them, not the order they finished in.

    ``runs.jsonl`` is appended as runs finish, so a distributed executor writes the rows of one
    study in another order than the local one; every table and figure of the report follows this
    order instead: model, data set, variant (baselines first, then the order of the plans in the
    sweep's ``sweep.yaml``, then variants of later sweeps as first seen), protocol. For a local
    run this is the file order.
    """
    names: list[str] = []
    if spec_path is not None and spec_path.is_file():
        try:
            doc = yaml.safe_load(spec_path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            log.warning("%s unreadable (%s); the report keeps the order the runs finished in", spec_path, e)
            doc = {}
        plans = doc.get("plans") if isinstance(doc, Mapping) else None
        names = [str(p["name"]) for p in plans or [] if isinstance(p, Mapping) and "name" in p]

    def ranks(values: Iterable) -> dict:
        out: dict = {}
        for v in values:
            out.setdefault(v, len(out))
        return out

    model = options.get("model")
    models = ranks([*([model] if isinstance(model, str) else []), *(r.get("model") for r in runs)])
    datasets = ranks([*(options.get("datasets") or {}), *(r.get("dataset") for r in runs)])
    protocols = ranks([*(options.get("protocols") or []), *(r.get("protocol") for r in runs)])
    def variant(r: Mapping):
        return r.get("variant") or r.get("condition")

    variants = ranks([*names, *(variant(r) for r in runs if normalise_group(r.get("group")) != "baseline")])

    def key(r: Mapping) -> tuple:
        v = -1 if normalise_group(r.get("group")) == "baseline" else variants[variant(r)]
        return (models[r.get("model")], datasets[r.get("dataset")], v, protocols[r.get("protocol")])

    return sorted(runs, key=key)


# ----------------------------------------------------------------------------------------------
# helpers on rows
# ----------------------------------------------------------------------------------------------


def _ok(row: Mapping) -> bool:
    return row.get("status") == "ok" and isinstance(row.get("summary"), Mapping)


def _collapsed(row: Mapping) -> bool:
    """Stopped early as collapsed (:mod:`asrprune.early_stop`): interim statistics, no WER."""
    return row.get("status") == "collapsed" and isinstance(row.get("collapsed"), Mapping)


def collapsed_cells(c: Mapping) -> tuple[str, str, str]:
    """(WER cell, Δ cell, p cell) of a collapsed run: never a full-set WER."""
    return (f"collapsed (stopped after {c['n_scored']} of {c['n_total']} utterances)",
            f"> +{100 * float(c['threshold']):g} (interim {_signed(float(c['delta']))} "
            f"[{_signed(float(c['ci'][0]))}, {_signed(float(c['ci'][1]))}], {100 * float(c['confidence']):g}% CI)",
            _p(c.get("p")))


def normalise_group(group: str | None) -> str:
    g = re.sub(r"[^a-z0-9]+", "_", str(group or "").lower()).strip("_")
    return _GROUP_ALIASES.get(g, g)


def paper_set(dataset: str) -> str | None:
    """The LibriSpeech split a data set name refers to (``test-other``/``test-clean``), or None."""
    d = dataset.lower().replace("_", "-")
    if "test-other" in d:
        return "test-other"
    if "test-clean" in d:
        return "test-clean"
    return None


def paper_key(row: Mapping) -> str | None:
    """The key of :data:`PAPER_WER` a run corresponds to (explicit ``paper_key`` wins)."""
    if row.get("paper_key"):
        return str(row["paper_key"])
    g = normalise_group(row.get("group"))
    t = row.get("target_sparsity")
    if g == "baseline":
        return "baseline"
    if t is None:
        return None
    t = float(t)
    if g in ("decoder_self_attn", "late_encoder") and abs(t - 0.5) < 0.011:
        return f"{g}@0.5"
    if g == "global" and abs(t - 0.4) < 0.011:
        return "global@0.4"
    if g in ("allocated", "paper_plan") and abs(t - 0.4) < 0.011:
        return "sensitivity_aware@0.4"
    return None


def paper_wer(row: Mapping) -> float | None:
    """The paper's WER (%) for this run's condition and data set, if it published one."""
    key, split = paper_key(row), paper_set(str(row.get("dataset", "")))
    if key is None or split is None:
        return None
    return PAPER_WER.get(key, {}).get(split)


def comparison(row: Mapping) -> dict | None:
    """The run's paired comparison with tolerant key names, or None."""
    c = row.get("comparison")
    if not isinstance(c, Mapping):
        return None
    delta = c.get("delta", c.get("delta_wer"))
    ci = c.get("ci", c.get("delta_ci", c.get("ci95")))
    if delta is None:
        return None
    return {
        "delta": float(delta),
        "ci": [float(ci[0]), float(ci[1])] if ci else None,
        "p": None if c.get("p", c.get("p_value")) is None else float(c.get("p", c.get("p_value"))),
        "top5_share": c.get("top5_share", c.get("top_share")),
        "without_top5": c.get("delta_wer_without_top"),
        "n": c.get("n", c.get("n_utterances")),
    }


def significant(cmp: Mapping | None, alpha: float = ALPHA) -> bool:
    """p < alpha and the 95% interval of the change excludes 0."""
    if not cmp or cmp.get("p") is None or not cmp.get("ci"):
        return False
    lo, hi = cmp["ci"]
    return cmp["p"] < alpha and (lo > 0 or hi < 0)


def _pct(x: float | None, nd: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{nd}f}"


def _signed(x: float, nd: int = 2) -> str:
    return f"{100 * x:+.{nd}f}"


def _p(p: float | None) -> str:
    if p is None:
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _p_eq(p: float | None) -> str:
    """``p = 0.012`` or ``p < 0.001`` for running text."""
    s = _p(p)
    return f"p {s[0]} {s[1:]}" if s.startswith("<") else f"p = {s}"


def _condition_key(row: Mapping) -> tuple:
    return (row.get("condition") or row.get("group") or "?", normalise_group(row.get("group")),
            row.get("target_sparsity"), row.get("selector"))


def _sort_conditions(keys: Iterable[tuple], first_seen: Mapping[str, int]) -> list[tuple]:
    def k(key):
        label, group, target, _sel = key
        return (group != "baseline", first_seen.get(group, 999), target if target is not None else -1, label)

    return sorted(keys, key=k)


def _datasets(study: Study) -> list[str]:
    names = list((study.options.get("datasets") or {}).keys())
    for r in study.runs:
        d = r.get("dataset")
        if d and d not in names:
            names.append(d)
    return names


# ----------------------------------------------------------------------------------------------
# building blocks (rendered to markdown and to HTML)
# ----------------------------------------------------------------------------------------------


def _delta_cell(c: Mapping | None) -> tuple[str, str]:
    if not c or c.get("delta") is None:
        return "—", "—"
    txt = _signed(float(c["delta"]))
    if c.get("ci"):
        txt += f" [{_signed(float(c['ci'][0]))}, {_signed(float(c['ci'][1]))}]"
    if significant({"p": c.get("p"), "ci": c.get("ci")}):
        txt += " *"
    return txt, _p(c.get("p"))
