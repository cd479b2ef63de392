"""report.py: tables, words, plots and a self-contained HTML page from a study directory.

The study directory is fabricated (report reads files only), but its numbers are internally
consistent: every WER, interval, paired change, p value and top-5 share below is computed from
synthetic per-utterance error counts by an independent numpy bootstrap.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from asrprune import report
from asrprune.findings import claim_verdict
from asrprune.report import build_report
from asrprune.results import load_study, paper_key, paper_wer, significant

TOTAL = 37_760_640  # parameters of the fabricated model
LINEAR = 20_643_840  # its linear weights
COMPONENT_WEIGHTS = {  # weights of each pruned group (fabricated, tiny.en-like)
    "decoder_self_attn": 2_359_296,
    "late_encoder": 7_077_888,
    "decoder_ffn": 4_718_592,
}


def _bootstrap(words, err_a, err_b=None, n=2000, seed=0):
    """WER CI (err_b None) or the paired delta's CI and two-sided p, resampling utterances."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(words), size=(n, len(words)))
    w = words[idx].sum(1)
    if err_b is None:
        wers = err_a[idx].sum(1) / w
        return [float(np.quantile(wers, 0.025)), float(np.quantile(wers, 0.975))]
    deltas = (err_b[idx].sum(1) - err_a[idx].sum(1)) / w
    p = 2 * min((deltas <= 0).mean(), (deltas >= 0).mean())
    return [float(np.quantile(deltas, 0.025)), float(np.quantile(deltas, 0.975))], float(min(1.0, max(p, 1 / n)))


def make_study(root: Path, *, truncated_line: bool = True) -> dict:
    """Write study.json, runs.jsonl, sensitivity/ into root; return the expected numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(7)
    datasets = {"librispeech_test_other": 60, "earnings22_test_4483589": 40}
    conditions = [  # label, group, selector, target, effect on error rate
        ("baseline", "baseline", None, 0.0, 0.0),
        ("decoder self-attn 10%", "decoder_self_attn", "decoder.self_attn", 0.1, 0.0),
        ("decoder self-attn 30%", "decoder_self_attn", "decoder.self_attn", 0.3, -0.01),
        ("decoder self-attn 50%", "decoder_self_attn", "decoder.self_attn", 0.5, -0.05),
        ("late encoder 50%", "late_encoder", "late_encoder", 0.5, 0.0),
        ("global 40%", "global", "all_linear", 0.4, 0.5),
        ("decoder FFN 50%", "decoder_ffn", "decoder_ffn", 0.5, 0.2),
    ]
    expected = {}
    rows = []
    for ds, n in datasets.items():
        words = rng.integers(5, 30, size=n)
        base_err = rng.binomial(words, 0.12)
        errs = {}
        for label, group, sel, target, effect in conditions:
            if group == "baseline":
                e = base_err
            else:
                change = rng.binomial(words, abs(effect)) * (1 if effect > 0 else -1) if effect else 0
                e = np.clip(base_err + change + rng.integers(-1, 2, size=n) * (rng.random(n) < 0.1), 0, None)
            errs[label] = e
            wer = float(e.sum() / words.sum())
            n_w = COMPONENT_WEIGHTS.get(group, LINEAR if group == "global" else 0)
            pruned = int(round(target * n_w))
            row = {
                "run_id": f"{group}-{target}-{ds}",
                "status": "ok",
                "error": None,
                "model": "tiny.en",
                "dataset": ds,
                "protocol": "standard",
                "condition": label,
                "group": group,
                "variant": "baseline" if group == "baseline" else f"{group}@{target}",
                "selector": sel,
                "target_sparsity": target,
                "plan": None if group == "baseline" else {"entries": [{"selector": sel, "sparsity": target}]},
                "sparsity_linear": pruned / LINEAR,
                "sparsity_all": pruned / TOTAL,
                "nonzero_params": TOTAL - pruned,
                "total_params": TOTAL,
                "summary": {"wer": wer, "wer_ci": _bootstrap(words, e), "cer": wer / 2,
                            "n_utterances": int(n), "n_failed": 0,
                            "n_hallucination": int((e > 0.8 * words).sum()),
                            "counts": {"ref_words": int(words.sum()), "substitutions": int(e.sum()),
                                       "deletions": 0, "insertions": 0}},
                "comparison": None,
                "wall_s": 1.0,
            }
            if group != "baseline":
                ci, p = _bootstrap(words, base_err, e)
                d = e - base_err
                top5 = float(np.sort(np.abs(d))[::-1][:5].sum() / max(np.abs(d).sum(), 1))
                row["comparison"] = {"baseline_run_id": f"baseline-0.0-{ds}", "delta": wer - float(base_err.sum() / words.sum()),
                                     "ci": ci, "p": p, "top5_share": top5, "n": int(n)}
            if group == "decoder_ffn" and ds.startswith("earnings"):
                row.update(status="failed", error="RuntimeError: out of memory\ntraceback...", summary=None,
                           comparison=None)
            rows.append(row)
            expected[(label, ds)] = row
    (root / "sensitivity").mkdir(parents=True)
    lines = [json.dumps(r) for r in rows]
    text = "\n".join(lines) + "\n"
    if truncated_line:
        text += '{"run_id": "cut-off", "status": "o'  # a killed writer's partial line
    (root / "runs.jsonl").write_text(text)
    study = {
        "model": "tiny.en",
        "datasets": {ds: {"source": f"/data/{ds}/manifest.jsonl", "n_utterances": n, "fingerprint": "abc"}
                     for ds, n in datasets.items()},
        "calibration": {"source": "/data/ljspeech/manifest.jsonl", "include": "LJ001-*", "n_utterances": 20},
        "protocols": ["standard"],
        "limit": None,
        "seed": 0,
        "wall_s": 1234.0,
    }
    (root / "study.json").write_text(json.dumps(study))
    sens = {"correlations": {"obd": {"rho": 0.61, "ci": [0.2, 0.85], "target": "ablation loss_delta"},
                             "gradient": {"rho": -0.1, "ci": [-0.5, 0.3], "target": "ablation loss_delta"}},
            "ranking": {"loss_delta@0.5": ["decoder.layers.0.fc1", "decoder.layers.1.fc1",
                                           "encoder.layers.0.fc1", "encoder.layers.1.fc1"]}}
    (root / "sensitivity" / "sensitivity.json").write_text(json.dumps(sens))
    for diag in ("obd", "gradient"):
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.imshow(rng.random((4, 5)))
        fig.savefig(root / "sensitivity" / f"heatmap_{diag}.png")
        plt.close(fig)
    return expected


@pytest.fixture
def study_dir(tmp_path):
    root = tmp_path / "study"
    root.mkdir()
    expected = make_study(root)
    return root, expected


def _table_rows(md: str, first_cell: str) -> list[list[str]]:
    out = []
    for line in md.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            if cells[0] == first_cell:
                out.append(cells)
    return out


def _header(md: str) -> list[str]:
    for line in md.splitlines():
        if line.startswith("| condition | selector"):
            return [c.strip() for c in line.strip("|").split(" | ")]
    raise AssertionError("main table header not found")


def _section(md: str, title: str) -> str:
    return md.split(f"### {title}")[1].split("\n### ")[0].split("\n## ")[0]


def test_main_table_numbers_paper_and_marks(study_dir):
    root, exp = study_dir
    paths = build_report(root)
    md = paths.markdown.read_text()
    other = "librispeech_test_other"
    table = _section(md, f"tiny.en — {other} — standard protocol")
    earn = _section(md, "tiny.en — earnings22_test_4483589 — standard protocol")
    head = _header(table)
    col = {h: i for i, h in enumerate(head)}
    # paper column only for the LibriSpeech set
    assert "paper WER %" in col and "paper WER %" not in _header(earn)

    base = _table_rows(table, "baseline")[0]
    b = exp[("baseline", other)]["summary"]
    assert base[col["WER % [95% CI]"]] == f"{100 * b['wer']:.2f} [{100 * b['wer_ci'][0]:.2f}, {100 * b['wer_ci'][1]:.2f}]"
    assert base[col["paper WER %"]] == "11.64"
    assert base[col["Δ WER [95% CI]"]] == "—"

    dsa = _table_rows(table, "decoder self-attn 50%")[0]
    r = exp[("decoder self-attn 50%", other)]
    c = r["comparison"]
    assert significant(c) and c["delta"] < 0
    assert dsa[col["Δ WER [95% CI]"]] == f"{100 * c['delta']:+.2f} [{100 * c['ci'][0]:+.2f}, {100 * c['ci'][1]:+.2f}] *"
    assert dsa[col["paper WER %"]] == "9.26"
    assert dsa[col["sparsity % (linear / all)"]] == f"{100 * r['sparsity_linear']:.1f} / {100 * r['sparsity_all']:.1f}"
    assert _table_rows(table, "global 40%")[0][col["paper WER %"]] == "61.32"
    assert _table_rows(table, "late encoder 50%")[0][col["paper WER %"]] == "9.92"
    small = exp[("decoder self-attn 10%", other)]["comparison"]
    cell = _table_rows(table, "decoder self-attn 10%")[0][col["Δ WER [95% CI]"]]
    assert cell.endswith("*") == significant(small)
    # the failed run shows as failed and is listed with its error
    ecol = {h: i for i, h in enumerate(_header(earn))}
    assert _table_rows(earn, "decoder FFN 50%")[0][ecol["WER % [95% CI]"]] == "failed"
    assert "RuntimeError: out of memory" in md
    assert "skipped unreadable lines of runs.jsonl" in md
    order = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines() if line.startswith("| ")][1:]
    order = [o for o in order if not o.startswith("---")]
    assert order == ["baseline", "decoder self-attn 10%", "decoder self-attn 30%", "decoder self-attn 50%",
                     "late encoder 50%", "global 40%", "decoder FFN 50%"]


def test_verdicts_and_claims(study_dir):
    root, exp = study_dir
    md = build_report(root).markdown.read_text()
    glance = md.split("## At a glance")[1].split("## The paper's claims")[0]
    other = "librispeech_test_other"
    c = exp[("decoder self-attn 50%", other)]["comparison"]
    dsa = _table_rows(glance, "decoder self-attn 50%")[0]
    assert dsa[1] == f"better {100 * c['delta']:+.2f} *"
    g = exp[("global 40%", other)]["comparison"]
    assert _table_rows(glance, "global 40%")[0][1] == f"worse {100 * g['delta']:+.2f} *"
    small = exp[("decoder self-attn 10%", other)]["comparison"]
    if not significant(small):
        assert _table_rows(glance, "decoder self-attn 10%")[0][1] == f"no change {100 * small['delta']:+.2f}"
    assert "14 runs recorded: 13 finished, 0 stopped early as collapsed, 1 failed." in glance
    # the claims, with our numbers and verdicts (test-other rows only)
    claims = md.split("## The paper's claims")[1].split("## Results")[0]
    row = _table_rows(claims, "decoder self-attention 50% improves WER")[0]
    assert row[1] == "-2.38" and row[2] == f"{100 * c['delta']:+.2f} [{100 * c['ci'][0]:+.2f}, {100 * c['ci'][1]:+.2f}]"
    assert row[4] == "reproduced"  # our interval excludes 0 downwards, as the paper's change
    assert _table_rows(claims, "global magnitude 40% collapses")[0][4] == "reproduced"
    assert _table_rows(claims, "biases are fragile: +7.53 at 10%")[0][2] == "not in this study"


@pytest.mark.parametrize("ci, verdict", [((-0.05, -0.01), "reproduced"), ((0.01, 0.05), "opposite"),
                                         ((-0.005, 0.01), "not reproduced"), ((-0.03, 0.01), "inconclusive")])
def test_claim_verdicts(ci, verdict):
    assert claim_verdict({"ci": list(ci)}, -2.38, -1) == verdict


def test_nonzero_counts_and_sensitivity(study_dir):
    root, exp = study_dir
    md = build_report(root).markdown.read_text()
    r = exp[("global 40%", "librispeech_test_other")]
    assert f"| tiny.en | global 40% | {TOTAL:,} | {r['nonzero_params']:,} |" in md
    assert "| obd | ablation loss_delta | — | +0.61 | [+0.20, +0.85] | — | — |" in md
    assert "| loss_delta@0.5 | decoder.layers.0.fc1, decoder.layers.1.fc1 | encoder.layers.1.fc1, encoder.layers.0.fc1 |" in md
    assert "](sensitivity/heatmap_obd.png)" in md


def test_html_is_self_contained(study_dir):
    root, _ = study_dir
    paths = build_report(root)
    page = paths.html.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    # forest (WER; the fabricated rows have no CER), anatomy x 2 sets, curves for decoder_self_attn,
    # late_encoder, global, decoder_ffn, 2 heatmaps
    assert len(srcs) == 9 == len(paths.images)
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(https?:|file:|/)', page)
    # verdicts, claims, results x 2 sets, failed runs, anatomy x 2, non-zero counts, correlations, ranking
    assert page.count("<table") == 10
    # markdown links point to files that exist
    for link in re.findall(r"\]\(([^)]+\.png)\)", paths.markdown.read_text()):
        assert (root / link).is_file()


def test_rebuild_from_copied_files_only(study_dir, tmp_path):
    root, _ = study_dir
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    first = build_report(copy).markdown.read_text()
    second = build_report(copy).markdown.read_text()
    strip = lambda s: re.sub(r"Built .* from", "", s)  # noqa: E731
    assert strip(first) == strip(second)


def test_paper_key_inference():
    assert paper_key({"group": "baseline"}) == "baseline"
    assert paper_key({"group": "decoder.self_attn", "target_sparsity": 0.5}) == "decoder_self_attn@0.5"
    assert paper_key({"group": "decoder_self_attn", "target_sparsity": 0.3}) is None
    assert paper_key({"group": "allocated", "target_sparsity": 0.4}) == "sensitivity_aware@0.4"
    assert paper_key({"group": "x", "paper_key": "global@0.4"}) == "global@0.4"
    assert paper_wer({"group": "allocated", "target_sparsity": 0.4, "dataset": "librispeech_test_other"}) == 11.84
    assert paper_wer({"group": "baseline", "dataset": "librispeech_test_clean"}) == 3.45
    assert paper_wer({"group": "baseline", "dataset": "earnings22"}) is None


def test_significance_needs_both_p_and_interval():
    assert significant({"p": 0.01, "ci": [-0.03, -0.01]})
    assert not significant({"p": 0.01, "ci": [-0.03, 0.01]})
    assert not significant({"p": 0.2, "ci": [-0.03, -0.01]})
    assert not significant(None)


def test_missing_runs_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="runs.jsonl"):
        load_study(tmp_path)


def test_report_module_imports_no_torch():
    tree = ast.parse(Path(report.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0] if node.level == 0 else "." + (node.module or ""))
    assert "torch" not in names and "transformers" not in names, names
    # report.py imports only torch-free modules of the package, and none of them imports torch
    package = {n[1:] for n in names if n.startswith(".")}
    assert package <= {"config", "files", "stats", "evidence", "figures", "render", "results", "findings"}, package
    for module in package:
        sub = ast.parse((Path(report.__file__).parent / f"{module}.py").read_text())
        imported = {a.name.split(".")[0] for node in ast.walk(sub) if isinstance(node, ast.Import) for a in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(sub)
                     if isinstance(node, ast.ImportFrom) and node.level == 0}
        assert "torch" not in imported and "transformers" not in imported, (module, imported)


def test_report_builds_without_importing_torch(study_dir):
    import subprocess
    import sys

    root, _ = study_dir
    code = ("import sys; from asrprune.report import build_report; build_report(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_cli_report(study_dir, capsys):
    from asrprune.cli import main

    root, _ = study_dir
    assert main(["report", str(root)]) == 0
    out = capsys.readouterr().out
    assert "report.html" in out and (root / "report.md").is_file() and (root / "report.html").is_file()
    assert main(["report", str(root / "missing")]) == 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def make_utterance_study(root: Path, n_conditions: int = 60, n_utts: int = 40, seed: int = 3) -> dict:
    """A study with real per-utterance files: every condition's hypotheses are the references with
    known substitutions, deletions and insertions; runs.jsonl rows carry no comparison, so the
    report computes every change from the utterance files. Returns what was planted."""
    from asrprune.scoring import score_utterance

    rng = np.random.default_rng(seed)
    vocab = [f"w{k}" for k in range(300)]
    refs = {f"utt{u:03d}": " ".join(rng.choice(vocab, rng.integers(6, 20))) for u in range(n_utts)}

    def corrupt(text: str, rate: float, rng) -> str:
        words = text.split()
        out = []
        for w in words:
            r = rng.random()
            if r < rate / 3:
                out.append(w + "x")  # substitution
            elif r < 2 * rate / 3:
                continue  # deletion
            elif r < rate:
                out += [w, "ins"]  # insertion
            else:
                out.append(w)
        return " ".join(out)

    def write_run(run_id: str, hyps: dict[str, str]) -> dict:
        d = root / "runs" / run_id
        d.mkdir(parents=True)
        rows = []
        for uid, ref in refs.items():
            sc = score_utterance(ref, hyps[uid], None)
            rows.append({"id": uid, "reference": ref, "hypothesis": hyps[uid], **sc,
                         "errors": sc["substitutions"] + sc["deletions"] + sc["insertions"], "failed": False,
                         "hallucination": False})
        (d / "utterances.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        w = sum(r["ref_words"] for r in rows)
        e = sum(r["errors"] for r in rows)
        counts = {k: sum(r[k] for r in rows) for k in ("ref_words", "substitutions", "deletions", "insertions")}
        summary = {"status": "ok", "wer": e / w, "wer_ci": [e / w * 0.9, e / w * 1.1], "cer": 0.0, "n_utterances": len(rows),
                   "n_failed": 0, "counts": counts, "n_hallucination": 0, "empty_reference": {"policy": "skip"},
                   "order": list(refs)}
        (d / "summary.json").write_text(json.dumps(summary))
        return summary

    base_hyps = {u: corrupt(r, 0.1, rng) for u, r in refs.items()}
    runs = [{"run_id": "base", "status": "ok", "model": "tiny.en", "dataset": "librispeech_test_other",
             "protocol": "standard", "condition": "baseline", "group": "baseline", "variant": "baseline",
             "target_sparsity": 0.0, "run_dir": "runs/base", "summary": write_run("base", base_hyps)}]
    planted = {}
    for k in range(n_conditions):
        rate = 0.1 + 0.01 * k
        hyps = {u: corrupt(r, rate, rng) for u, r in refs.items()}
        if k == 7:  # a significant change that rests on few utterances, one with a known substitution
            hyps = dict(base_hyps)
            for u in list(refs)[:12]:  # a small change on many utterances makes it significant
                hyps[u] = base_hyps[u] + " ins ins"
            ref = refs["utt005"].split()
            hyps["utt005"] = " ".join(["zzzbad" if i == 0 else w for i, w in enumerate(ref)] + ["ins"] * 80)
            planted["sub"] = ("utt005", ref[0], "zzzbad")
        rid = f"c{k:02d}"
        runs.append({"run_id": rid, "status": "ok", "model": "tiny.en", "dataset": "librispeech_test_other",
                     "protocol": "standard", "condition": f"condition {k:02d} with a long descriptive label",
                     "group": f"g{k % 6}", "variant": rid, "target_sparsity": round(0.05 * (k % 10), 2),
                     "selector": "all_linear", "run_dir": f"runs/{rid}", "baseline_run_id": "base",
                     "summary": write_run(rid, hyps), "sparsity_linear": 0.1, "sparsity_all": 0.05,
                     "nonzero_params": 1000, "total_params": 2000})
        planted[rid] = f"condition {k:02d} with a long descriptive label"
    (root / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    (root / "study.json").write_text(json.dumps({"model": "tiny.en", "datasets": {"librispeech_test_other": {
        "source": "/data/x", "n_utterances": n_utts}}}))
    return planted


def test_forest_csv_equals_compare_on_the_same_files(tmp_path):
    """60 conditions whose rows carry no comparison: the report's forest data (WER and CER) are
    computed from the utterance files and equal asrprune.evaluation.compare on the same runs."""
    import csv
    import time

    from asrprune.evaluation import compare

    root = tmp_path / "s60"
    root.mkdir()
    planted = make_utterance_study(root)
    t0 = time.perf_counter()
    paths = build_report(root)
    built = time.perf_counter() - t0
    rows = list(csv.DictReader((root / "report" / "forest.csv").open()))
    assert len(rows) == 2 * 60
    by = {(r["variant"], r["metric"]): r for r in rows}
    for k in (0, 7, 31, 59):
        rid = f"c{k:02d}"
        c = compare(root / "runs" / "base", root / "runs" / rid).to_dict()
        w, ce = by[(rid, "wer")], by[(rid, "cer")]
        assert float(w["delta"]) == pytest.approx(c["delta_wer"], abs=1e-12)
        assert [float(w["ci_low"]), float(w["ci_high"])] == pytest.approx(c["delta_ci"], abs=1e-12)
        assert float(w["p"]) == pytest.approx(c["p_value"])
        assert float(ce["delta"]) == pytest.approx(c["delta_cer"], abs=1e-12)
        assert [float(ce["ci_low"]), float(ce["ci_high"])] == pytest.approx(c["delta_cer_ci"], abs=1e-12)
        assert w["significant"] == str(significant({"p": c["p_value"], "ci": c["delta_ci"]}))
        assert w["condition"] == planted[rid] and w["source"] == "computed"
    assert (root / "report" / "forest_wer.png").is_file() and (root / "report" / "forest_cer.png").is_file()
    md = paths.markdown.read_text()
    assert f"**{planted['c07']}" in md and "zzzbad" in md  # the one utterance behind condition 7, word by word
    print(f"report of 60 conditions built in {built:.1f} s")


def _chromium(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are required under CI (apt-get install chromium chromium-driver)")
        pytest.skip("chromium/chromedriver not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,800", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


_LAYOUT = """
const out = {docScroll: document.documentElement.scrollWidth, docClient: document.documentElement.clientWidth,
             tables: [], scrollers: []};
for (const t of document.querySelectorAll('table')) out.tables.push(t.getBoundingClientRect().right);
for (const el of document.querySelectorAll('body *')) {
  const ox = getComputedStyle(el).overflowX;
  if ((ox === 'auto' || ox === 'scroll') && el.scrollWidth > el.clientWidth + 1) out.scrollers.push(el.tagName);
}
return out;
"""


def test_html_renders_in_headless_chromium(study_dir, tmp_path):
    from selenium.webdriver.common.by import By

    root, exp = study_dir
    paths = build_report(root)
    driver = _chromium(tmp_path)
    try:
        driver.set_page_load_timeout(60)
        driver.get(paths.html.resolve().as_uri())
        imgs = driver.find_elements(By.TAG_NAME, "img")
        assert len(imgs) == len(paths.images) == 9
        for img in imgs:
            assert driver.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth > 0 && arguments[0].naturalHeight > 0", img)
        assert imgs[0].get_attribute("alt").startswith("Forest plot of ΔWER")  # the first figure
        tables = driver.find_elements(By.CSS_SELECTOR, "table.results")
        cells = [td.text for t in tables for td in t.find_elements(By.TAG_NAME, "td")]
        assert "11.64" in cells and "9.26" in cells
        assert driver.title == "asrprune study report"
        layout = driver.execute_script(_LAYOUT)
        assert layout["docScroll"] <= layout["docClient"] and max(layout["tables"]) <= 1280 and not layout["scrollers"]
    finally:
        driver.quit()


def test_report_fits_a_laptop_window_and_shows_the_utterances(tmp_path):
    """At 1280x800: the forest plot loads, nothing is wider than the window, no element scrolls
    sideways, the claims table is there, and the details block of the condition that rests on one
    utterance shows that utterance with its planted substitution marked."""
    from selenium.webdriver.common.by import By

    root = tmp_path / "s60"
    root.mkdir()
    planted = make_utterance_study(root)
    paths = build_report(root)
    driver = _chromium(tmp_path)
    try:
        driver.get(paths.html.resolve().as_uri())
        forest = driver.find_element(By.CSS_SELECTOR, "img[alt^='Forest plot of ΔWER']")
        assert driver.execute_script("return arguments[0].naturalWidth > 0", forest)
        layout = driver.execute_script(_LAYOUT)
        assert layout["docScroll"] <= layout["docClient"], layout
        assert max(layout["tables"]) <= 1280 and not layout["scrollers"], layout
        claims = [t for t in driver.find_elements(By.CSS_SELECTOR, "table.results")
                  if "claim" in [th.text for th in t.find_elements(By.TAG_NAME, "th")]]
        assert claims
        uid, ref_word, hyp_word = planted["sub"]
        details = [d for d in driver.find_elements(By.TAG_NAME, "details") if planted["c07"] in d.text or True]
        target = next(d for d in details if uid in d.get_attribute("textContent"))
        driver.execute_script("arguments[0].open = true", target)
        subs = target.find_elements(By.CSS_SELECTOR, ".w.sub")
        assert any(s.find_element(By.CSS_SELECTOR, ".r").text == ref_word and
                   s.find_element(By.CSS_SELECTOR, ".h").text == hyp_word for s in subs)
        layout = driver.execute_script(_LAYOUT)  # opened, it still fits
        assert layout["docScroll"] <= layout["docClient"] and not layout["scrollers"], layout
    finally:
        driver.quit()


def test_one_table_per_model_protocol_and_dataset(study_dir):
    root, exp = study_dir
    row = dict(exp[("baseline", "librispeech_test_other")], run_id="base-paper", model="base", protocol="paper")
    with open(root / "runs.jsonl", "a") as f:
        f.write("\n" + json.dumps(row) + "\n")
    md = build_report(root).markdown.read_text()
    assert "### tiny.en — librispeech_test_other — standard protocol" in md
    table = _section(md, "base — librispeech_test_other — paper protocol")
    assert table.count("\n| baseline |") == 1 and "decoder self-attn" not in table


def test_cli_compare_show_prints_the_top_utterances_aligned(tmp_path, capsys):
    from asrprune.cli import main

    root = tmp_path / "s"
    root.mkdir()
    planted = make_utterance_study(root, n_conditions=8)
    assert main(["compare", str(root / "runs" / "base"), str(root / "runs" / "c07"), "--show", "--top", "2"]) == 0
    out = capsys.readouterr().out
    uid, ref_word, hyp_word = planted["sub"]
    assert "delta CER (B - A):" in out and f"  {uid}:" in out
    block = out.split(f"  {uid}:")[1]
    ref_line = next(line for line in block.splitlines() if line.strip().startswith("REF:"))
    b_line = next(line for line in block.splitlines() if line.strip().startswith("B:"))
    assert ref_line.split()[1] == ref_word and b_line.split()[1] == hyp_word


def test_the_report_follows_the_planned_order_not_the_finishing_order(tmp_path):
    """A distributed executor appends rows as runs finish: the same rows in another order give
    the same report, byte for byte (but for the build time), and the planned order of the sweep."""
    import random

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    make_study(a, truncated_line=False)
    shutil.copytree(a, b)
    lines = (b / "runs.jsonl").read_text().splitlines(keepends=True)
    random.Random(1).shuffle(lines)
    assert lines != (a / "runs.jsonl").read_text().splitlines(keepends=True)
    (b / "runs.jsonl").write_text("".join(lines))
    planned = list(dict.fromkeys(json.loads(x)["variant"] for x in lines))[::-1]  # not the file order of a
    for root in (a, b):
        (root / "sweep.yaml").write_text("plans:\n" + "".join(f"- name: {v}\n" for v in planned if v != "baseline"))

    def text(root):
        md = build_report(root).markdown.read_text()
        return re.sub(r"Built .* UTC", "Built", md).replace(f"in {root.name}/.", "in ROOT/.")

    assert text(a) == text(b)
    order = [r["run_id"] for r in load_study(b).runs]
    assert order == [r["run_id"] for r in load_study(a).runs]
    variants = [r["variant"] for r in load_study(b).runs if r["dataset"] == "librispeech_test_other"]
    assert variants == ["baseline"] + [v for v in planned if v != "baseline"]
