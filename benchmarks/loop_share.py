"""How much of each run's ΔWER is repetition loops: per run of one or more studies, the hypotheses
with more insertions than their reference has words, the WER points they carry, and the WER and Δ
on the utterances where neither the run nor its baseline loops.

    python benchmarks/loop_share.py STUDY_DIR [STUDY_DIR ...]

A reading aid for a study's results (it decodes nothing): the Δ without loops is *not* the run's
result (the standard protocol scores every utterance), it says how much of the loss a loop-free
decoding of the same model would leave.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _utterances(study: Path, row: dict) -> dict[str, dict]:
    from asrprune.files import read_jsonl

    return {u["id"]: u for u in read_jsonl(study / row["run_dir"] / "utterances.jsonl")}


def _loops(us: dict[str, dict]) -> set[str]:
    return {k for k, u in us.items() if not u.get("failed") and (u.get("insertions") or 0) > (u.get("ref_words") or 0)}


def main(argv=None) -> int:
    from asrprune.files import latest_rows, read_jsonl

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("studies", nargs="+", type=Path)
    args = p.parse_args(argv)
    print(f"{'study':20} {'run':22} {'n':>4} {'WER':>6} {'Δ':>7} {'loops':>5} {'loop pts':>8} | {'n':>4} {'WER':>6} {'dense':>6} {'Δ':>6}")
    for study in args.studies:
        rows = latest_rows(read_jsonl(study / "runs.jsonl"))
        by_id = {r["run_id"]: r for r in rows.values()}
        for r in rows.values():
            if r.get("status") != "ok" or not r.get("baseline_run_id") or r["baseline_run_id"] not in by_id:
                continue
            us, dense = _utterances(study, r), _utterances(study, by_id[r["baseline_run_id"]])
            shared = [k for k in us if k in dense and not us[k].get("failed") and not dense[k].get("failed")]
            loops, dense_loops = _loops(us), _loops(dense)
            w = sum(us[k]["ref_words"] for k in shared)
            e, d = sum(us[k]["errors"] for k in shared), sum(dense[k]["errors"] for k in shared)
            keep = [k for k in shared if k not in loops and k not in dense_loops]
            w2 = sum(us[k]["ref_words"] for k in keep)
            e2, d2 = sum(us[k]["errors"] for k in keep), sum(dense[k]["errors"] for k in keep)
            loop_pts = sum(us[k]["errors"] - dense[k]["errors"] for k in shared if k in loops) / w
            print(f"{study.name[:20]:20} {str(r.get('variant'))[:22]:22} {len(shared):4} {100 * e / w:6.2f} "
                  f"{100 * (e - d) / w:+7.2f} {len(loops):5} {100 * loop_pts:8.2f} | {len(keep):4} "
                  f"{100 * e2 / w2:6.2f} {100 * d2 / w2:6.2f} {100 * (e2 - d2) / w2:+6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
