"""Command-line interface: ``asrprune <command> ...``.

The CLI is thin: it parses flags, builds the library's spec objects, calls the public API and
writes files. Only this module sees ``argparse.Namespace`` and only this module prints.
Each command has one section below: ``_add_<command>(subparsers)`` declares its flags and
``_run_<command>(args) -> int`` runs it. ``_COMMANDS`` lists the adders in help order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger("asrprune")


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


# Sections below register their adders here, in help order (defined first so they can append).
_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------

def _add_models(sub) -> None:
    p = sub.add_parser(
        "models",
        help="list built-in and cached models; convert a CTranslate2 directory",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    msub = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    c = msub.add_parser(
        "convert",
        help="convert a CTranslate2 / faster-whisper directory to a transformers directory",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("src", type=Path, help="CTranslate2 directory (model.bin, config.json, tokenizer.json)")
    c.add_argument("out", type=Path, help="output directory (save_pretrained layout)")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_run_models)


def _run_models(args) -> int:
    from asrprune import models

    if args.models_command == "convert":
        out = models.convert_ctranslate2(args.src, args.out, overwrite=args.overwrite)
        print(f"converted {args.src} -> {out}")
        return 0
    rows = models.list_models()
    if args.json:
        _print_json([dataclasses.asdict(r) for r in rows])
        return 0
    print(f"cache: {models.cache_dir()}  (set ${models.CACHE_ENV} to move it)")
    print(f"{'name':<24} {'kind':<10} {'installed':<10} {'converted':<10} description")
    for r in rows:
        print(f"{r.name:<24} {r.kind:<10} {str(r.installed):<10} {str(r.converted):<10} {r.description}")
    return 0


_COMMANDS.append(_add_models)


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="rebuild report.md and report.html of a study directory from its result files",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("study_dir", type=Path, help="study directory (runs.jsonl, study.json, sensitivity/)")
    p.add_argument("--out", type=Path, default=None, help="write the report here (default: STUDY_DIR)")
    p.set_defaults(func=_run_report)


def _run_report(args) -> int:
    from .report import build_report

    paths = build_report(args.study_dir, out_dir=args.out)
    print(f"wrote {paths.markdown}")
    print(f"wrote {paths.html} ({len(paths.images)} images embedded)")
    return 0


_COMMANDS.append(_add_report)


# ----------------------------------------------------------------------------------------------
# components
# ----------------------------------------------------------------------------------------------


def _add_components(sub) -> None:
    p = sub.add_parser(
        "components",
        help="list a model's prunable components, their parameter counts and the selector groups",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="built-in name (tiny.en, base), CTranslate2 or save_pretrained directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--select", metavar="SELECTOR", default=None,
                   help="only show what SELECTOR selects (e.g. late_encoder, decoder.layers[0].ffn)")
    p.set_defaults(func=_run_components)


def _run_components(args) -> int:
    from .components import component_table, group_table, select_components, select_parameters
    from .models import load_model
    from .prune import measure_model

    model, _ = load_model(args.model)
    rows = component_table(model)
    selected = None
    if args.select:
        selected = select_parameters(model, args.select)
        ids = {c.id for c in select_components(model, args.select)}
        rows = [r for r in rows if r["id"] in ids]
    measured = measure_model(model)
    groups = group_table(model)
    if args.json:
        _print_json({
            "model": str(args.model),
            "components": rows,
            "selected_parameters": selected,
            "kinds": {k: {w: s.to_dict() for w, s in v.items()} for k, v in measured.kinds.items()},
            "all_parameters": measured.all_parameters.to_dict(),
            "linear_weights": measured.linear_weights.to_dict(),
            "groups": groups,
        })
        return 0
    strip = "model." if all(r["id"].startswith("model.") for r in rows) else ""
    width = max([len(r["id"]) - len(strip) for r in rows] + [9])
    print(f"{'component':<{width}}  {'kind':<19} {'layer':>5} {'weights':>10} {'biases':>8} "
          f"{'nonzero':>10} {'sparsity':>8}  note")
    for r in rows:
        layer = "" if r["layer"] is None else str(r["layer"])
        print(f"{r['id'][len(strip):]:<{width}}  {r['kind']:<19} {layer:>5} {r['weights']:>10,} "
              f"{r['biases']:>8,} {r['nonzero']:>10,} {r['sparsity']:>8.2%}  {r['note']}")
    if selected is not None:
        print(f"\n{args.select!r} selects {len(selected)} parameter tensors:")
        for name in selected:
            print(f"  {name}")
        return 0
    print(f"\n{'kind':<19} {'weights':>11} {'biases':>9} {'nonzero weights':>16} {'sparsity':>8}")
    for kind, s in measured.kinds.items():
        w, b = s["weights"], s["biases"]
        print(f"{kind:<19} {w.numel:>11,} {b.numel:>9,} {w.nonzero:>16,} {w.sparsity:>8.2%}")
    a, lw = measured.all_parameters, measured.linear_weights
    print(f"\nall parameters: {a.numel:,} ({a.nonzero:,} non-zero, sparsity {a.sparsity:.2%}); "
          f"linear weights (attention + FFN): {lw.numel:,} ({lw.nonzero:,} non-zero, "
          f"sparsity {lw.sparsity:.2%})")
    print(f"\n{'group':<22} {'tensors':>7} {'entries':>11}  meaning")
    for g in groups:
        layers = f" (layers {g['layers'][0]}-{g['layers'][-1]})" if g["layers"] else ""
        print(f"{g['group']:<22} {g['parameters']:>7} {g['numel']:>11,}  {g['description']}{layers}")
    return 0


_COMMANDS.append(_add_components)


# ----------------------------------------------------------------------------------------------
# allocate
# ----------------------------------------------------------------------------------------------


def _add_allocate(sub) -> None:
    p = sub.add_parser(
        "allocate",
        help="sensitivity-aware plan: per-component sparsities reaching a target sparsity",
        description="Turn sensitivity results into a per-component plan that reaches --target with "
        "the least predicted damage (greedy on convex hulls = Lagrangian optimum; see "
        "asrprune.allocate). Also writes uniform and global-magnitude plans at the same sparsity.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--target", type=float, required=True, help="fraction of the denominator to prune, e.g. 0.4")
    p.add_argument("--sensitivity", type=Path, required=True, help="sensitivity.json or its directory")
    p.add_argument("--denominator", choices=("linear", "all"), default="linear",
                   help="sparsity of all linear weights or of all parameters")
    p.add_argument("--cap", action="append", default=[], metavar="KIND_OR_ID=S",
                   help="max sparsity for components matching a kind, id or glob (repeatable)")
    p.add_argument("--source", choices=("auto", "ablation", "predicted"), default="auto",
                   help="damage curves: measured ablation, predicted from a diagnostic, or auto")
    p.add_argument("--diagnostic", default="total",
                   help="predicted curve: total, second_order (obd) or first_order (taylor)")
    p.add_argument("--metric", default="loss_delta", help="measured change used from the ablation")
    p.add_argument("--uncertainty", type=float, default=1.0,
                   help="read measured loss changes as mean + this many standard errors")
    p.add_argument("--fragile-threshold", type=float, default=None,
                   help="cap each component where its damage exceeds this loss increase")
    p.add_argument("--max-sparsity", type=float, default=0.9, help="no component above this")
    p.add_argument("--max-extrapolation", type=float, default=0.1,
                   help="how far beyond its largest measured sparsity a component may go")
    p.add_argument("--grid-step", type=float, default=0.05, help="sparsity grid step")
    p.add_argument("--model", default=None,
                   help="also check counts and the measured sparsity by pruning a copy of this model")
    p.add_argument("--no-baselines", action="store_true", help="do not write the uniform/global plans")
    p.add_argument("--out", type=Path, required=True, help="plan YAML to write")
    p.set_defaults(func=_run_allocate)


def _run_allocate(args) -> int:
    from .allocate import (
        allocate_plan, format_table, load_sensitivity, parse_caps, uniform_damage, write_allocation,
    )

    caps = parse_caps(args.cap)
    curves = load_sensitivity(args.sensitivity, source=args.source, diagnostic=args.diagnostic,
                              metric=args.metric, uncertainty=args.uncertainty)
    alloc = allocate_plan(
        curves, args.target, denominator=args.denominator, caps=caps, grid_step=args.grid_step,
        max_sparsity=args.max_sparsity, max_extrapolation=args.max_extrapolation,
        fragile_threshold=args.fragile_threshold,
    )
    print(format_table(alloc))
    s_u = args.target if args.denominator == "linear" else args.target * curves.counts.all / curves.counts.linear
    print(f"predicted damage of the uniform plan at the same sparsity: {uniform_damage(curves, s_u):.4g}")
    if args.model:
        from .allocate import verify_allocation
        from .models import load_model

        model, _ = load_model(args.model)
        m = verify_allocation(alloc, model)
        print(
            f"checked on {args.model}: newly pruned {m['pruned_linear']:.4f} of {m['linear_weights']} "
            f"linear weights, {m['pruned_all']:.4f} of {m['all_parameters']} parameters"
        )
    for what, path in write_allocation(alloc, args.out, baselines=not args.no_baselines).items():
        print(f"wrote {what}: {path}")
    return 0


_COMMANDS.append(_add_allocate)


# ----------------------------------------------------------------------------------------------
# sweep
# ----------------------------------------------------------------------------------------------


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a grid of pruning runs from a YAML spec; resumable, one result row per run",
        description="Run models x plans (or selectors x sparsities) x data sets x protocols from "
        "SPEC.yaml into --out: one row per finished run in runs.jsonl (appended atomically), "
        "evaluation outputs in runs/<run_id>/. A rerun skips finished runs; failed runs are "
        "recorded with their error and retried only with --retry-failed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("spec", type=Path, help="sweep spec YAML (see asrprune.sweep.SweepSpec)")
    p.add_argument("--out", type=Path, required=True, help="sweep directory (created; resumed if it exists)")
    p.add_argument("--retry-failed", action="store_true", help="also rerun runs that failed before")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args) -> int:
    from .sweep import SweepSpec, run_sweep

    spec = SweepSpec.from_yaml(args.spec)
    summary = run_sweep(spec, args.out, retry_failed=args.retry_failed, progress=not args.no_progress)
    d = summary.to_dict()
    print(
        f"sweep {spec.name}: {d['total']} runs; ran {d['ran']}, already finished {d['skipped_finished']}, "
        f"failed {d['failed']}, failed earlier and not retried {d['skipped_failed']} "
        f"({d['wall_s']:.0f} s); results in {args.out / 'runs.jsonl'}"
    )
    for run_id in d["failed_run_ids"]:
        print(f"  failed: {run_id} (see its row in runs.jsonl; rerun with --retry-failed)")
    return 1 if summary.failed else 0


_COMMANDS.append(_add_sweep)


# ----------------------------------------------------------------------------------------------
# reproduce
# ----------------------------------------------------------------------------------------------


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0.3,0.5, got {text!r}") from None
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"sparsities are fractions in (0, 1] such as 0.3,0.5, got {text!r}")
    return values


def _protocol_list(text: str) -> tuple[str, ...]:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [v for v in values if v not in ("standard", "paper")]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"protocols are standard and/or paper, comma-separated; got {text!r}")
    return values


def _add_reproduce(sub) -> None:
    p = sub.add_parser(
        "reproduce",
        help="run the paper's study (baselines, component sweeps, probes, global 40%%, "
        "sensitivity-aware 40%%, the paper's plans) and write a report",
        description="Baselines under both protocols; under --protocols: decoder self-attention, "
        "late encoder, decoder FFN and cross-attention sweeps, fragility probes, global magnitude "
        "and uniform 40%%, the paper's own plans; sensitivity on the calibration set (kept "
        "disjoint from every data set) and the sensitivity-aware 40%% plan; each pruned run "
        "compared with its baseline by the paired test; report.md/report.html in --out. "
        "DATA and --calibration take SOURCE or SOURCE::ID_PATTERN (e.g. "
        "ljspeech/manifest.jsonl::'LJ002-*'). Resumable: rerun the same command to continue.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="model spec (tiny.en, base, a directory)")
    p.add_argument("data", nargs="+", help="evaluation set(s): manifest, folder or SOURCE::ID_PATTERN")
    p.add_argument("--calibration", required=True, help="calibration set (SOURCE or SOURCE::ID_PATTERN)")
    p.add_argument("--out", type=Path, required=True, help="study directory")
    p.add_argument("--limit", type=int, default=None, help="first N utterances of each evaluation set")
    p.add_argument("--sample", type=int, default=None, help="seeded random N utterances of each set")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    p.add_argument("--calibration-limit", type=int, default=None,
                   help="calibration utterances (default: the preset's; quick 20, full all)")
    p.add_argument("--preset", choices=("quick", "main", "full"), default="quick",
                   help="quick: 30/50%% sweeps and 5 probes; main: the paper's headline configurations "
                   "(decoder self-attn 50%%, late encoder 50%%, decoder FFN 30%%, global/uniform 40%%, "
                   "the paper's plans, sensitivity-aware 40%%); full: the paper's 10-50%% grids")
    p.add_argument("--sparsities", type=_fractions, default=None,
                   help="levels of the component sweeps, e.g. 0.3,0.5 (replaces the preset's)")
    p.add_argument("--protocols", type=_protocol_list, default=("standard",),
                   help="protocols of the pruned runs (baselines always run under both)")
    p.add_argument("--target", type=float, default=0.4,
                   help="sparsity of all linear weights for global, uniform and sensitivity-aware plans")
    p.add_argument("--batch-size", type=int, default=None, help="decoding batch size")
    p.add_argument("--device", default=None, help="decoding device (auto, cpu, cuda)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on generated tokens per 30 s window (default: the evaluation's, 444); "
                   "bounds the time a collapsed, hallucinating variant takes")
    p.add_argument("--encoder-cache", choices=("memory", "disk", "off"), default="memory",
                   help="reuse the unpruned encoder's outputs for variants that leave it untouched")
    p.add_argument("--ablation-sparsities", type=_sparsity_list, default=None,
                   help="sparsities of the sensitivity stage's measured ablation (default 0.3,0.5; "
                   "e.g. 0.5 alone halves that stage on a large model)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="let calibration overlap evaluation data (recorded; not recommended)")
    p.add_argument("--retry-failed", action="store_true", help="rerun runs that failed before")
    p.add_argument("--no-report", action="store_true", help="do not build the report at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_reproduce)


def _study_sensitivity_options(args):
    if args.ablation_sparsities is None:
        return None
    from .sensitivity import SensitivityOptions

    return SensitivityOptions(ablation_sparsities=tuple(args.ablation_sparsities))


def _run_reproduce(args) -> int:
    from .sweep import latest_rows, read_rows, reproduce

    for flag, value in (("--limit", args.limit), ("--sample", args.sample), ("--calibration-limit", args.calibration_limit)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    decode = {k: v for k, v in (("batch_size", args.batch_size), ("device", args.device), ("dtype", args.dtype),
                                ("max_new_tokens", args.max_new_tokens)) if v is not None}
    result = reproduce(
        args.model, args.data, args.calibration, args.out,
        limit=args.limit, sample=args.sample, seed=args.seed, protocols=args.protocols,
        preset=args.preset, sparsities=args.sparsities, calibration_limit=args.calibration_limit,
        decode=decode, target=args.target, allow_overlap=args.allow_overlap,
        retry_failed=args.retry_failed, encoder_cache=args.encoder_cache,
        sensitivity_options=_study_sensitivity_options(args),
        progress=not args.no_progress, report=not args.no_report,
    )
    d = result.to_dict()
    for name, info in d["stages"].items():
        line = f"{name}: {info.get('status')}" + (f" ({info['wall_s']:.0f} s)" if info.get("wall_s") is not None else "")
        if info.get("error"):
            line += f": {info['error']}"
        print(line)
    rows = latest_rows(read_rows(args.out / "runs.jsonl")).values()
    failed = sum(r.get("status") != "ok" for r in rows)
    if d["report"]:
        print(f"wrote {d['report']['markdown']}")
        print(f"wrote {d['report']['html']}")
    print(f"this session {d['wall_s'] / 60:.1f} min; {len(rows)} runs recorded, {failed} failed; results in {args.out}")
    return 1 if failed or any(i.get("status") == "failed" for i in d["stages"].values()) else 0


_COMMANDS.append(_add_reproduce)


# ----------------------------------------------------------------------------------------------
# prune
# ----------------------------------------------------------------------------------------------

_EXPORT_FORMATS = ("hf", "compressed", "ctranslate2")


def _add_prune(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="one-shot prune a model by plan and save it (HF directory + pruning.json; "
        "optionally compressed sparse and CTranslate2 forms)",
        description="Prune MODEL in one shot by a plan of component selectors and sparsities, print "
        "the measured sparsity, and write --out: a directory that transformers' from_pretrained "
        "and 'asrprune evaluate' load, with pruning.json (plan, measured sparsity, source model "
        "and its fingerprint). --format compressed adds OUT/compressed/ (asrprune-bitmask "
        "safetensors, docs/sparse_format.md); --format ctranslate2 adds OUT/ctranslate2/ "
        "(faster-whisper). Plan syntax: SELECTOR=SPARSITY[@matrix] or SELECTOR=N:M, "
        "comma-separated, e.g. 'decoder.self_attn=0.5,late_encoder=0.5'; "
        "see 'asrprune components MODEL' for the selectors.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="built-in name (tiny.en, base), CTranslate2 or save_pretrained directory")
    plan = p.add_mutually_exclusive_group(required=True)
    plan.add_argument("--plan", metavar="TEXT", help="plan text, e.g. 'decoder.self_attn=0.5,late_encoder=0.5'")
    plan.add_argument("--plan-file", type=Path, metavar="YAML", help="plan YAML (see asrprune.config)")
    p.add_argument("--mode", choices=("per_entry", "global"), default=None,
                   help="global: one magnitude threshold pooled over all entries (all entries must "
                   "share one sparsity); default: the plan file's mode, else per_entry")
    p.add_argument("--out", type=Path, required=True, help="pruned model directory to write")
    p.add_argument("--format", dest="formats", action="append", choices=_EXPORT_FORMATS, default=None,
                   help="forms to write (repeatable); hf (OUT itself) is always written, "
                   "compressed goes to OUT/compressed, ctranslate2 to OUT/ctranslate2")
    p.add_argument("--quantization", default=None, metavar="TYPE",
                   help="CTranslate2 weight type (int8, float16, ...); default: keep float32")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="dtype the model is loaded, pruned and saved in")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    p.add_argument("--json", action="store_true", help="print the pruning result as JSON")
    p.set_defaults(func=_run_prune)


def _run_prune(args) -> int:
    import dataclasses
    import shutil

    from .config import PrunePlan
    from .export import (
        CT2_QUANTIZATIONS, PRUNING_FILENAME, export_compressed, export_ctranslate2, save_pruned,
    )
    from .models import load_model, model_fingerprint
    from .prune import prune_model

    formats = list(dict.fromkeys(args.formats or ["hf"]))
    if args.quantization is not None:
        if "ctranslate2" not in formats:
            raise ValueError("--quantization applies to --format ctranslate2 only; add --format ctranslate2")
        if args.quantization not in CT2_QUANTIZATIONS:
            raise ValueError(f"--quantization {args.quantization!r} is not one of {', '.join(CT2_QUANTIZATIONS)}")
    if args.plan is not None:
        plan = PrunePlan.parse(args.plan, mode=args.mode or "per_entry")
    else:
        plan = PrunePlan.from_yaml(args.plan_file)
        if args.mode is not None:
            plan = dataclasses.replace(plan, mode=args.mode)
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} is not empty; choose another directory or pass --overwrite")

    model, processor = load_model(args.model, dtype=args.dtype)
    source_fp = model_fingerprint(model)
    result = prune_model(model, plan)
    save_pruned(model, processor, out, pruning=result.to_dict(), source=str(args.model),
                source_fingerprint=source_fp, overwrite=args.overwrite)
    written = {"hf": out}
    for fmt in ("compressed", "ctranslate2"):
        target = out / fmt
        if fmt not in formats:
            # an export of an earlier run with another plan would contradict pruning.json
            if (target / PRUNING_FILENAME).is_file():
                shutil.rmtree(target)
            continue
        if fmt == "compressed":
            written[fmt] = export_compressed(out, target, overwrite=True).parent
        else:
            written[fmt] = export_ctranslate2(out, target, quantization=args.quantization, overwrite=True)

    if args.json:
        _print_json({"result": result.to_dict(), "written": {k: str(v) for k, v in written.items()}})
        return 0
    _print_prune_result(result)
    for fmt, path in written.items():
        print(f"wrote {fmt}: {path}")
    return 0


def _print_prune_result(result) -> None:
    width = max([len(e.selector) for e in result.entries] + [8])
    print(f"{'selector':<{width}}  {'scope':<9} {'tensors':>7} {'weights':>12} {'non-zero':>12} "
          f"{'requested':>9} {'measured':>9}")
    for e in result.entries:
        scope = e.scope + (f" {e.pattern}" if e.pattern else "")
        print(f"{e.selector:<{width}}  {scope:<9} {len(e.parameters):>7} {e.stats.numel:>12,} "
              f"{e.stats.nonzero:>12,} {e.requested_sparsity:>9.2%} {e.measured_sparsity:>9.2%}")
    a, lw = result.model.all_parameters, result.model.linear_weights
    print(f"\nall parameters: {a.numel:,}, non-zero {a.nonzero:,}, sparsity {a.sparsity:.2%}")
    print(f"linear weights (attention + FFN): {lw.numel:,}, non-zero {lw.nonzero:,}, "
          f"sparsity {lw.sparsity:.2%}")
    for note in result.notes:
        print(f"note: {note}")


_COMMANDS.append(_add_prune)


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="convert a pruned model directory to compressed sparse safetensors, CTranslate2, or back to hf",
        description="Write another form of a pruned model directory: compressed (asrprune-bitmask "
        "safetensors whose size shrinks with sparsity, docs/sparse_format.md), ctranslate2 "
        "(faster-whisper), or hf (a compressed directory decompressed to a plain save_pretrained "
        "directory).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("pruned_dir", type=Path, help="directory written by 'asrprune prune' (or a compressed export)")
    p.add_argument("--format", required=True, choices=_EXPORT_FORMATS, help="form to write")
    p.add_argument("--out", type=Path, required=True, help="directory to write")
    p.add_argument("--quantization", default=None, metavar="TYPE",
                   help="CTranslate2 weight type (int8, float16, ...); default: keep the saved dtype")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    import tempfile

    from .export import (
        decompress_to_pretrained, export_compressed, export_ctranslate2, is_compressed_dir,
    )

    src = Path(args.pruned_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"PRUNED_DIR {src} is not a directory")
    if args.quantization is not None and args.format != "ctranslate2":
        raise ValueError("--quantization applies to --format ctranslate2 only")
    compressed_src = is_compressed_dir(src)
    if args.format == "hf":
        if not compressed_src:
            raise ValueError(f"{src} is already a save_pretrained directory; --format hf converts a "
                             "compressed export (model.sparse.safetensors) back")
        out = decompress_to_pretrained(src, args.out, overwrite=args.overwrite)
    elif args.format == "compressed":
        if compressed_src:
            raise ValueError(f"{src} is already a compressed export")
        path = export_compressed(src, args.out, overwrite=args.overwrite)
        out = path.parent
        dense = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"{path.name}: {path.stat().st_size / 1e6:.1f} MB "
              f"(dense safetensors {dense / 1e6:.1f} MB, ratio {path.stat().st_size / max(dense, 1):.3f})")
    elif compressed_src:
        with tempfile.TemporaryDirectory(prefix="asrprune-export-") as tmp:
            hf = decompress_to_pretrained(src, Path(tmp) / "hf")
            out = export_ctranslate2(hf, args.out, quantization=args.quantization, overwrite=args.overwrite)
    else:
        out = export_ctranslate2(src, args.out, quantization=args.quantization, overwrite=args.overwrite)
    print(f"wrote {args.format}: {out}")
    return 0


_COMMANDS.append(_add_export)


# ----------------------------------------------------------------------------------------------
# sensitivity
# ----------------------------------------------------------------------------------------------


def _csv_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip() and x.strip().lower() != "none")


def _sparsity_list(text: str) -> tuple[float, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0.3,0.5, got {text!r}") from None
    if any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"sparsities are fractions in (0, 1] such as 0.3,0.5, got {text!r}")
    return values


def _add_sensitivity(sub) -> None:
    p = sub.add_parser(
        "sensitivity",
        help="per-component sensitivity (gradient, Taylor, Fisher, OBD) on calibration data, "
        "measured single-component ablation, and whether the diagnostics predict it",
        description="Teacher-forced cross-entropy gradients, one calibration utterance per backward "
        "pass: mean |g|, Taylor |w g|, empirical Fisher, OBD; predicted loss change of "
        "magnitude-pruning each component (kind x layer) and group; the measured loss change "
        "when it is pruned alone; Spearman correlations with bootstrap intervals. CALIBRATION_DATA "
        "is a manifest/folder, optionally SOURCE::ID_PATTERN (e.g. ljspeech/manifest.jsonl::'LJ001-*'). "
        "Writes sensitivity.json, CSV tables and heatmaps to --out; rerun the same command to resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="model spec (tiny.en, base, a directory)")
    p.add_argument("calibration", metavar="CALIBRATION_DATA", help="calibration set: SOURCE or SOURCE::ID_PATTERN")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--include", action="append", default=None, help="id pattern(s) to keep, e.g. 'LJ001-*'")
    p.add_argument("--limit", type=int, default=None, help="first N calibration utterances")
    p.add_argument("--sample", type=int, default=None, help="seeded random N calibration utterances")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample and of the bootstrap")
    p.add_argument("--labels", choices=("reference", "greedy"), default="reference",
                   help="teacher-force the reference transcripts or the model's own greedy ones")
    p.add_argument("--text-form", choices=("whisper", "raw"), default="whisper",
                   help="reference text as Whisper writes it (sentence case, leading space) or as given")
    p.add_argument("--language", default="en", help="language token for multilingual models")
    p.add_argument("--ablation-sparsities", type=_sparsity_list, default=(0.3, 0.5),
                   help="sparsities of the measured ablation ('none': no ablation)")
    p.add_argument("--prediction-sparsities", type=_sparsity_list, default=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                   help="sparsities at which predicted loss changes are tabulated")
    p.add_argument("--targets", type=_csv_list, default=None,
                   help="comma-separated selectors to analyse instead of every component kind x layer")
    p.add_argument("--groups", type=_csv_list, default=None,
                   help="comma-separated named groups ablated as well ('none'; default: the standard set)")
    p.add_argument("--ablation-wer", action="store_true", help="also measure calibration WER per ablation (decoding; slow)")
    p.add_argument("--eval-data", action="append", default=[],
                   help="evaluation set(s) the calibration must be disjoint from (SOURCE or SOURCE::ID_PATTERN)")
    p.add_argument("--allow-overlap", action="store_true", help="warn instead of failing when calibration overlaps --eval-data")
    p.add_argument("--checkpoint-every", type=int, default=10, help="accumulator checkpoint every N utterances")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the correlation intervals")
    p.add_argument("--cache-mb", type=float, default=2048.0, help="memory for cached encoder states in the ablation")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--dtype", default="float32", help="model dtype (statistics are accumulated in fp32)")
    p.add_argument("--loss-reduction", choices=("sum", "mean"), default="sum",
                   help="per-utterance loss: sequence NLL (sum over tokens) or per-token mean")
    p.add_argument("--restart", action="store_true", help="discard checkpoints in --out instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_sensitivity)


def _read_set(text: str, *, include=None, limit=None, sample=None, seed=0):
    from .manifests import read_speech_set

    source, _, pattern = str(text).partition("::")
    patterns = list(include or []) + ([pattern] if pattern else [])
    return read_speech_set(source, include=patterns or None, limit=limit, sample=sample, seed=seed)


def _run_sensitivity(args) -> int:
    from .models import load_model
    from .sensitivity import DEFAULT_GROUPS, SensitivityOptions, score_sensitivity

    for flag, value in (("--limit", args.limit), ("--sample", args.sample), ("--checkpoint-every", args.checkpoint_every)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    options = SensitivityOptions(
        labels=args.labels, text_form=args.text_form, language=args.language or None,
        ablation_sparsities=args.ablation_sparsities,
        prediction_sparsities=args.prediction_sparsities or args.ablation_sparsities or (0.5,),
        groups=DEFAULT_GROUPS if args.groups is None else args.groups,
        targets=args.targets or None, ablation_wer=args.ablation_wer,
        checkpoint_every=args.checkpoint_every, n_bootstrap=args.bootstrap, seed=args.seed,
        cache_mb=args.cache_mb, loss_reduction=args.loss_reduction,
    )
    calib = _read_set(args.calibration, include=args.include, limit=args.limit, sample=args.sample, seed=args.seed)
    if not calib.utterances:
        raise ValueError(f"{args.calibration}: no calibration utterances selected (check --include/--limit)")
    evaluation = None
    if args.eval_data:
        evaluation = [u for d in args.eval_data for u in _read_set(d).utterances]
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    wer_options = None
    if args.ablation_wer:
        from .evaluation import DecodeOptions

        wer_options = DecodeOptions(device=args.device, dtype=args.dtype)
    result = score_sensitivity(
        model, processor, calib.utterances, options=options, out_dir=args.out,
        evaluation=evaluation, allow_overlap=args.allow_overlap, wer_options=wer_options,
        data_info={"name": getattr(calib, "name", ""), "source": args.calibration, "include": args.include},
        restart=args.restart, progress=not args.no_progress,
    )
    d = result.to_dict()
    print(f"{args.model}: {d['data']['n_utterances']} calibration utterances, baseline loss "
          f"{d['baseline_loss']:.4f} {d['loss_units']} ({d['mean_targets_per_utterance']:.1f} targets per utterance), "
          f"{len(d['components'])} components, {len(d['groups'])} groups")
    print("wall time of this session: " + ", ".join(f"{k} {v:.1f} s" for k, v in d["timings_s"].items()))
    print("compute over all sessions: " + ", ".join(f"{k} {v:.1f} s" for k, v in d["compute_s"].items() if v is not None))
    for name, ids in d["ranking"].items():
        print(f"most sensitive by {name}: " + ", ".join(ids[:5]))
    if d["correlations"]:
        print("Spearman rho with the measured loss change (95% bootstrap interval over components):")
        for c in d["correlations"]:
            if c["target"] != "loss_delta" or not (c["predictor"].endswith(".mean") or c["predictor"].startswith("predicted.")):
                continue
            rho = "nan" if c["rho"] is None or c["rho"] != c["rho"] else f"{c['rho']:+.2f}"
            ci = c["ci"]
            ci_text = "" if ci[0] is None or ci[0] != ci[0] else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"
            print(f"  {c.get('population', 'all'):<6} s={c['sparsity']:g} {c['predictor']:<24} {rho}{ci_text} (n={c['n']})")
    print(f"wrote {args.out / 'sensitivity.json'} (+ CSV tables and heatmaps)")
    return 0


_COMMANDS.append(_add_sensitivity)


# ----------------------------------------------------------------------------------------------
# evaluate, compare
# ----------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_evaluate(sub) -> None:
    from .evaluation import PROTOCOLS

    p = sub.add_parser(
        "evaluate",
        help="transcribe a speech set and score WER/CER with confidence intervals",
        description="Transcribe DATA with MODEL and score it. Writes OUT/summary.json (wer, cer, "
        "wer_ci, counts, options, environment) and OUT/utterances.jsonl (one row per utterance, "
        "written as it goes); rerunning with the same OUT resumes an interrupted run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="built-in name (tiny.en, base), model directory, CTranslate2 directory or hub id")
    p.add_argument("data", help="manifest (.jsonl), CSV/TSV, corpus folder (LibriSpeech, Common Voice, "
                   "TED-LIUM) or Hugging Face dataset id")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--protocol", choices=PROTOCOLS, default="standard",
                   help="standard: English forced, no timestamps, greedy; paper: generate() defaults "
                   "with language detection")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N utterances (after other selections)")
    p.add_argument("--sample", type=_positive_int, default=None, help="seeded random subset of N utterances")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    p.add_argument("--include", action="append", default=None, metavar="PATTERN",
                   help="keep utterance ids matching this fnmatch pattern (repeatable), e.g. 'LJ001-*'")
    p.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                   help="drop utterance ids matching this pattern (repeatable)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="utterances per generate call")
    p.add_argument("--beam-size", type=_positive_int, default=1, help="beams (1 = greedy)")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--max-new-tokens", type=_positive_int, default=444, help="cap on generated tokens per 30 s window")
    p.add_argument("--language", default=None, help="language of multilingual models (standard: en; paper: detected)")
    p.add_argument("--workers", type=int, default=2, help="audio loading threads (0 = inline)")
    p.add_argument("--bootstrap-speakers", action="store_true",
                   help="bootstrap intervals resample whole speakers instead of utterances")
    p.add_argument("--bootstrap-n", type=_positive_int, default=1000, help="bootstrap resamples")
    p.add_argument("--hf-config", default=None, help="Hugging Face dataset config")
    p.add_argument("--hf-split", default="test", help="Hugging Face dataset split (also Common Voice / TED-LIUM split)")
    p.add_argument("--audio-column", default="audio", help="audio column of a Hugging Face dataset")
    p.add_argument("--text-column", default="text", help="text column of a Hugging Face dataset")
    p.add_argument("--streaming", action="store_true", help="stream a Hugging Face dataset")
    p.add_argument("--overwrite", action="store_true", help="discard results already in --out instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_evaluate)


def _fmt_pct(x) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.2f}%"


def _run_evaluate(args) -> int:
    from .evaluation import DecodeOptions, evaluate
    from .manifests import read_speech_set
    from .models import load_model

    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    options = DecodeOptions(
        protocol=args.protocol, beam_size=args.beam_size, batch_size=args.batch_size, dtype=args.dtype,
        device=args.device, max_new_tokens=args.max_new_tokens, language=args.language,
        num_workers=args.workers,
    )
    speech_set = read_speech_set(
        args.data, limit=args.limit, sample=args.sample, seed=args.seed, include=args.include,
        exclude=args.exclude, hf_config=args.hf_config, hf_split=args.hf_split,
        audio_column=args.audio_column, text_column=args.text_column, streaming=args.streaming,
    )
    for err in speech_set.errors[:10]:
        print(f"skipped: {err}", file=sys.stderr)
    if len(speech_set.errors) > 10:
        print(f"skipped {len(speech_set.errors) - 10} more unreadable lines", file=sys.stderr)
    if not speech_set.utterances:
        raise ValueError(f"{args.data}: no utterances selected (check --include/--exclude/--limit)")
    model, processor = load_model(args.model, device=options.resolved_device(), dtype=options.dtype)
    result = evaluate(
        model, processor, speech_set, options, out_dir=args.out, progress=not args.no_progress,
        model_spec=str(args.model), overwrite=args.overwrite, bootstrap_n=args.bootstrap_n,
        bootstrap_speakers=args.bootstrap_speakers,
    )
    s = result.summary
    unit = "speakers" if args.bootstrap_speakers else "utterances"
    print(f"{args.model} on {s['data']['name']} ({options.protocol} protocol): "
          f"WER {_fmt_pct(s['wer'])} [95% CI {_fmt_pct(s['wer_ci'][0])}, {_fmt_pct(s['wer_ci'][1])}], "
          f"CER {_fmt_pct(s['cer'])} [{_fmt_pct(s['cer_ci'][0])}, {_fmt_pct(s['cer_ci'][1])}] "
          f"(bootstrap over {unit})")
    c = s["counts"]
    print(f"{s['n_utterances']} utterances scored, {s['n_failed']} failed, {len(speech_set.errors)} manifest lines "
          f"skipped; {c['ref_words']} reference words: {c['substitutions']} substitutions, "
          f"{c['deletions']} deletions, {c['insertions']} insertions; {s['n_hallucination']} flagged as hallucination")
    for f in s["failures"][:5]:
        print(f"failed: {f['id']}: {f['reason']}", file=sys.stderr)
    t = s["throughput"]
    if t["audio_seconds_per_second"]:
        print(f"throughput: {t['audio_seconds_per_second']:.2f} audio-s/s ({t['audio_seconds']:.1f} s of audio "
              f"in {t['wall_seconds']:.1f} s on {s['options']['resolved_device']})")
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'utterances.jsonl'}")
    return 0


_COMMANDS.append(_add_evaluate)


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="paired comparison of two evaluate outputs (delta WER, CI, p-value)",
        description="Compare evaluation B against A on the same utterances: delta WER = B - A with a "
        "paired bootstrap interval, a paired permutation p-value, and the share of the delta that "
        "comes from its top utterances.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("a", type=Path, help="baseline evaluate output directory")
    p.add_argument("b", type=Path, help="evaluate output directory compared against A")
    p.add_argument("--out", type=Path, default=None,
                   help="write the comparison as JSON here (a .json file, or a directory for comparison.json)")
    p.add_argument("--n-resamples", type=_positive_int, default=1000, help="paired bootstrap resamples")
    p.add_argument("--n-permutations", type=_positive_int, default=10000, help="permutations of the p-value")
    p.add_argument("--seed", type=int, default=0, help="seed of bootstrap and permutations")
    p.add_argument("--by-speaker", action="store_true", help="resample and permute whole speakers")
    p.add_argument("--top", type=_positive_int, default=5, help="how many utterances the concentration figure uses")
    p.set_defaults(func=_run_compare)


def _run_compare(args) -> int:
    from .evaluation import compare

    comp = compare(args.a, args.b, n_resamples=args.n_resamples, n_permutations=args.n_permutations,
                   seed=args.seed, by_speaker=args.by_speaker, top_k=args.top)
    d = comp.to_dict()
    lo, hi = d["delta_ci"]
    pp = lambda x: "n/a" if x is None else f"{100 * x:+.2f}"  # noqa: E731
    print(f"A {args.a}: WER {_fmt_pct(d['wer_a'])}   B {args.b}: WER {_fmt_pct(d['wer_b'])}   "
          f"({d['n_utterances']} utterances, {d['n_excluded_failed']} excluded as failed)")
    print(f"delta WER (B - A): {pp(d['delta_wer'])} points, 95% CI [{pp(lo)}, {pp(hi)}], p = {d['p_value']:.4g}; "
          f"{d['n_improved']} utterances better, {d['n_worsened']} worse")
    if d["top"]:
        share = d["top_share"]
        print(f"top {len(d['top'])} utterances carry {100 * share:.0f}% of the delta; without them the delta is "
              f"{pp(d['delta_wer_without_top'])} points")
        for t in d["top"]:
            flags = "".join(f" [hallucination in {k}]" for k, v in (("A", t["hallucination_a"]), ("B", t["hallucination_b"])) if v)
            print(f"  {t['id']}: errors {t['errors_a']} -> {t['errors_b']} of {t['ref_words']} words{flags}")
    if args.out is not None:
        path = args.out / "comparison.json" if args.out.suffix != ".json" else args.out
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    return 0


_COMMANDS.append(_add_compare)


# ----------------------------------------------------------------------------------------------
# command registry and entry point
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asrprune",
        description="Sensitivity-aware one-shot pruning of Whisper ASR models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # help lists the commands in the order of a study, whatever order the sections are in
    order = ("models", "components", "evaluate", "compare", "prune", "export", "sensitivity",
             "allocate", "sweep", "reproduce", "report")
    rank = {f"_add_{name}": i for i, name in enumerate(order)}
    for add in sorted(_COMMANDS, key=lambda f: rank.get(f.__name__, len(order))):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; results written so far are kept and a rerun resumes", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as exc:
        # User-facing errors of the library are ValueError/OSError subclasses with a sentence
        # that names the file, field or flag; show that sentence, not a stack trace.
        if args.verbose:
            raise
        print(f"asrprune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
