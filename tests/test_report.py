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
from asrprune.report import build_report, load_study, paper_key, paper_wer, significant

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
                "selector": sel,
                "target_sparsity": target,
                "plan": None if group == "baseline" else {"entries": [{"selector": sel, "sparsity": target}]},
                "sparsity_linear": pruned / LINEAR,
                "sparsity_all": pruned / TOTAL,
                "nonzero_params": TOTAL - pruned,
                "total_params": TOTAL,
                "summary": {"wer": wer, "wer_ci": _bootstrap(words, e), "cer": wer / 2,
                            "n_utterances": int(n), "n_failed": 0,
                            "n_hallucination": int((e > 0.8 * words).sum())},
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


def test_main_table_numbers_paper_and_marks(study_dir):
    root, exp = study_dir
    paths = build_report(root)
    md = paths.markdown.read_text()
    head = _header(md)
    col = {h: i for i, h in enumerate(head)}
    other = "librispeech_test_other"
    # paper column only for the LibriSpeech set
    assert f"{other} paper WER %" in col and "earnings22_test_4483589 paper WER %" not in col

    base = _table_rows(md, "baseline")[0]
    b = exp[("baseline", other)]["summary"]
    assert base[col[f"{other} WER % [95% CI]"]] == (
        f"{100 * b['wer']:.2f} [{100 * b['wer_ci'][0]:.2f}, {100 * b['wer_ci'][1]:.2f}]"
    )
    assert base[col[f"{other} paper WER %"]] == "11.64"
    assert base[col[f"{other} Δ WER [95% CI]"]] == "—"

    dsa = _table_rows(md, "decoder self-attn 50%")[0]
    r = exp[("decoder self-attn 50%", other)]
    c = r["comparison"]
    assert significant(c) and c["delta"] < 0
    assert dsa[col[f"{other} Δ WER [95% CI]"]] == (
        f"{100 * c['delta']:+.2f} [{100 * c['ci'][0]:+.2f}, {100 * c['ci'][1]:+.2f}] *"
    )
    assert dsa[col[f"{other} paper WER %"]] == "9.26"
    # sparsity: linear and all, measured
    assert dsa[col["sparsity % (linear / all)"]] == (
        f"{100 * r['sparsity_linear']:.1f} / {100 * r['sparsity_all']:.1f}"
    )
    assert _table_rows(md, "global 40%")[0][col[f"{other} paper WER %"]] == "61.32"
    assert _table_rows(md, "late encoder 50%")[0][col[f"{other} paper WER %"]] == "9.92"
    # a non-significant change carries no mark
    small = exp[("decoder self-attn 10%", other)]["comparison"]
    cell = _table_rows(md, "decoder self-attn 10%")[0][col[f"{other} Δ WER [95% CI]"]]
    assert cell.endswith("*") == significant(small)
    # the failed run shows as failed and is listed with its error
    ffn = _table_rows(md, "decoder FFN 50%")[0]
    assert ffn[col["earnings22_test_4483589 WER % [95% CI]"]] == "failed"
    assert "RuntimeError: out of memory" in md
    # the truncated last line is reported, not fatal
    assert "skipped unreadable lines of runs.jsonl" in md
    # rows: baseline first, then in group order, sparsities ascending
    main = md.split("### tiny.en — standard protocol")[1].split("\n\n|")[1]
    order = [line.split(" | ")[0].lstrip("| ") for line in main.splitlines()[2:] if line.startswith("|")]
    assert order == ["baseline", "decoder self-attn 10%", "decoder self-attn 30%", "decoder self-attn 50%",
                     "late encoder 50%", "global 40%", "decoder FFN 50%"]


def test_summary_words_and_top5(study_dir):
    root, exp = study_dir
    md = build_report(root).markdown.read_text()
    summary = md.split("## Summary")[1].split("## Results")[0]
    c = exp[("decoder self-attn 50%", "librispeech_test_other")]["comparison"]
    assert "significantly better — decoder self-attn 50%" in summary
    assert f"{100 * c['top5_share']:.0f}% of the change comes from the 5 utterances" in summary
    assert "significantly worse — global 40%" in summary
    g = exp[("global 40%", "librispeech_test_other")]["summary"]["n_hallucination"]
    b = exp[("baseline", "librispeech_test_other")]["summary"]["n_hallucination"]
    assert g > b and f"hallucination/repetition: {b} → {g}" in summary
    assert "no significant change — " in summary
    # 14 rows minus one failed; the partial line does not count as a run
    assert "14 runs recorded: 13 finished, 1 failed." in summary


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
    # curves for decoder_self_attn, late_encoder, global, decoder_ffn + 2 heatmaps
    assert len(srcs) == 6 == len(paths.images)
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(https?:|file:|/)', page)
    assert page.count("<table") == 5  # main, failed runs, non-zero counts, rank correlations, ranking
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
    assert package <= {"config", "files", "stats"}, package
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


def test_html_renders_in_headless_chromium(study_dir, tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are required under CI (apt-get install chromium chromium-driver)")
        pytest.skip("chromium/chromedriver not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    root, exp = study_dir
    paths = build_report(root)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.get(paths.html.resolve().as_uri())
        imgs = driver.find_elements(By.TAG_NAME, "img")
        assert len(imgs) == len(paths.images) == 6
        for img in imgs:
            loaded = driver.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth > 0 && arguments[0].naturalHeight > 0",
                img,
            )
            assert loaded, img.get_attribute("alt")
        tables = driver.find_elements(By.CSS_SELECTOR, "table.results")
        assert len(tables) >= 3
        headers = [th.text for th in tables[0].find_elements(By.TAG_NAME, "th")]
        assert "librispeech_test_other WER % [95% CI]" in headers
        cells = [td.text for td in tables[0].find_elements(By.TAG_NAME, "td")]
        assert "11.64" in cells and "9.26" in cells
        assert driver.title == "asrprune study report"
    finally:
        driver.quit()


def test_one_table_per_model_and_protocol(study_dir):
    root, exp = study_dir
    row = dict(exp[("baseline", "librispeech_test_other")], run_id="base-paper", model="base", protocol="paper")
    with open(root / "runs.jsonl", "a") as f:
        f.write("\n" + json.dumps(row) + "\n")
    md = build_report(root).markdown.read_text()
    assert "### tiny.en — standard protocol" in md and "### base — paper protocol" in md
    table = md.split("### base — paper protocol")[1].split("Paper numbers:")[0]
    assert table.count("\n| baseline |") == 1 and "decoder self-attn" not in table
