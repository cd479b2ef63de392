"""Command-line interface: ``asrprune <command> ...``.

The CLI is thin: it parses flags, builds the library's spec objects, calls the public API and
writes files. Only this module sees ``argparse.Namespace`` and only this module prints.
Each command has one section below: ``_add_<command>(sub)`` declares its flags and
``_run_<command>(args) -> int`` runs it; ``_COMMANDS`` names them in help order.

Defaults come from the spec dataclasses (``DecodeOptions``, ``SensitivityOptions``,
``StudySpec``) and the vocabulary of :mod:`asrprune.config`, never restated here. The parser is
built for the one command being run (the others are listed by name and one-line help only), so
``asrprune --help`` and ``asrprune report`` never import torch, and a command imports only what
it needs. Flag combinations that cannot work are refused with ``parser.error`` (usage + error);
library errors (a bad plan, a missing file) print one ``asrprune <command>: error:`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import DTYPES, MODES, PROTOCOLS, check_sparsity
from .files import prepare_out_dir

log = logging.getLogger("asrprune")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: X)`` where there is a default worth showing: not for ``None``
    (its meaning is in the help text), flags that are off, or help that names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def _field_defaults(cls) -> dict[str, Any]:
    """The field defaults of a spec dataclass (``default_factory`` called)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.4, got {text!r}") from None
    return check_sparsity(value, "the value", error=argparse.ArgumentTypeError)


def _sparsity_list(text: str) -> tuple[float, ...]:
    """Comma-separated fractions in (0, 1]; ``none`` or empty gives ``()``."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0.3,0.5, got {text!r}") from None
    for v in values:
        check_sparsity(v, f"sparsity {v:g} of {text!r}", positive=True, error=argparse.ArgumentTypeError)
    return values


def _fractions(text: str) -> tuple[float, ...]:
    """Like :func:`_sparsity_list`, but at least one value."""
    values = _sparsity_list(text)
    if not values:
        raise argparse.ArgumentTypeError(f"sparsities are fractions in (0, 1] such as 0.3,0.5, got {text!r}")
    return values


def _protocol_list(text: str) -> tuple[str, ...]:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [v for v in values if v not in PROTOCOLS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"protocols are {' and/or '.join(PROTOCOLS)}, comma-separated; got {text!r}")
    return values


def _csv_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip() and x.strip().lower() != "none")


def _fmt_pct(x) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.2f}%"


def _parser(args) -> argparse.ArgumentParser:
    """The subparser of the running command (for ``parser.error``)."""
    return args._parser


def _add_trust_pickle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-pickle", action="store_true",
                   help="also load a pickle checkpoint (pytorch_model.bin); pickles can run code when "
                   "loaded, so only safetensors are loaded otherwise")


def _add_scoring_flags(p: argparse.ArgumentParser) -> None:
    """How evaluation treats empty references and failed utterances (defaults: ``evaluate``'s)."""
    import inspect

    from .evaluation import EMPTY_REFERENCE_POLICIES, evaluate

    params = inspect.signature(evaluate).parameters
    p.add_argument("--empty-reference", choices=EMPTY_REFERENCE_POLICIES, default=params["empty_reference"].default,
                   help="an utterance whose reference is empty after normalisation: skip it (not decoded, "
                   "not scored, as the Open ASR leaderboard does), score it (its words are insertions) or "
                   "refuse the set")
    p.add_argument("--max-failed-fraction", type=_fraction, default=params["max_failed_fraction"].default,
                   help="fail the run when more than this fraction of the utterances cannot be read "
                   "(when not given: only when none is scored)")


def _add_encoding(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoding", default="utf-8",
                   help="text encoding of manifests and transcripts (a line that does not decode is "
                   "reported by file and line and skipped)")


# One-line help of every command, in the order of a study (``asrprune --help`` lists them).
_HELP = {
    "models": "list built-in and cached models; convert a CTranslate2 directory",
    "components": "list a model's prunable components, their parameter counts and the selector groups",
    "evaluate": "transcribe a speech set and score WER/CER with confidence intervals",
    "compare": "paired comparison of two evaluate outputs (delta WER, CI, p-value)",
    "prune": "one-shot prune a model by plan and save it (HF directory + pruning.json; optionally "
    "compressed sparse and CTranslate2 forms)",
    "export": "convert a pruned model directory to compressed sparse safetensors, CTranslate2, or back to hf",
    "sensitivity": "per-component sensitivity (gradient, Taylor, Fisher, OBD) on calibration data, "
    "measured single-component ablation, and whether the diagnostics predict it",
    "allocate": "sensitivity-aware plan: per-component sparsities reaching a target sparsity",
    "sweep": "run a grid of pruning runs from a YAML spec; resumable, one result row per run",
    "reproduce": "run the paper's study (baselines, component sweeps, probes, global 40%%, "
    "sensitivity-aware 40%%, the paper's plans) and write a report",
    "report": "rebuild report.md and report.html of a study directory from its result files",
}


def _subparser(sub, name: str, description: str | None = None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=_HELP[name], description=description, formatter_class=_HelpFormatter)
    p.set_defaults(_parser=p)
    return p


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------


def _add_models(sub) -> None:
    p = _subparser(sub, "models")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    msub = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    c = msub.add_parser(
        "convert",
        help="convert a CTranslate2 / faster-whisper directory to a transformers directory",
        formatter_class=_HelpFormatter,
    )
    c.add_argument("src", type=Path, help="CTranslate2 directory (model.bin, config.json, tokenizer.json)")
    c.add_argument("out", type=Path, help="output directory (save_pretrained layout)")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_run_models)


def _run_models(args) -> int:
    from . import models

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


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _add_report(sub) -> None:
    p = _subparser(sub, "report")
    p.add_argument("study_dir", type=Path, help="study directory (runs.jsonl, study.json, sensitivity/)")
    p.add_argument("--out", type=Path, default=None, help="write the report here (default: STUDY_DIR)")
    p.add_argument("--show", action="append", default=[], metavar="CONDITION",
                   help="also show this condition's top-5 utterances word by word (variant name or label; "
                   "'all'; repeatable); those whose change rests on few utterances are always shown")
    p.set_defaults(func=_run_report)


def _run_report(args) -> int:
    import time

    from .report import build_report

    t0 = time.perf_counter()
    paths = build_report(args.study_dir, out_dir=args.out, show=args.show)
    print(f"built in {time.perf_counter() - t0:.1f} s")
    print(f"wrote {paths.markdown}")
    print(f"wrote {paths.html} ({len(paths.images)} images embedded)")
    return 0


# ----------------------------------------------------------------------------------------------
# components
# ----------------------------------------------------------------------------------------------


def _add_components(sub) -> None:
    p = _subparser(sub, "components")
    p.add_argument("model", help="built-in name (tiny.en, base), CTranslate2 or save_pretrained directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--select", metavar="SELECTOR", default=None,
                   help="only show what SELECTOR selects (e.g. late_encoder, decoder.layers[0].ffn)")
    _add_trust_pickle(p)
    p.set_defaults(func=_run_components)


def _run_components(args) -> int:
    from .components import component_table, group_table, select_components, select_parameters
    from .models import load_model
    from .prune import measure_model

    model, _ = load_model(args.model, trust_pickle=args.trust_pickle)
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


# ----------------------------------------------------------------------------------------------
# allocate
# ----------------------------------------------------------------------------------------------


def _add_allocate(sub) -> None:
    import inspect

    from . import allocate
    from .allocation_rules import OWL_LAMBDA, OWL_M

    solve = inspect.signature(allocate.allocate_plan).parameters
    curves = inspect.signature(allocate.curves_from_dict).parameters
    p = _subparser(
        sub, "allocate",
        description="Turn sensitivity results into a per-component plan that reaches --target with "
        "the least predicted damage (greedy on convex hulls = Lagrangian optimum; see "
        "asrprune.allocate). Also writes uniform and global-magnitude plans at the same sparsity.",
    )
    p.add_argument("--target", type=float, required=True, help="fraction of the denominator to prune, e.g. 0.4")
    p.add_argument("--sensitivity", type=Path, required=True, help="sensitivity.json or its directory")
    p.add_argument("--denominator", choices=allocate.DENOMINATORS, default=solve["denominator"].default,
                   help="sparsity of all linear weights or of all parameters")
    p.add_argument("--cap", action="append", default=[], metavar="KIND_OR_ID=S",
                   help="max sparsity for components matching a kind, id or glob (repeatable)")
    p.add_argument("--source", choices=allocate.SOURCES, default=curves["source"].default,
                   help="damage curves: measured ablation, predicted from a diagnostic, or auto")
    p.add_argument("--diagnostic", default=curves["diagnostic"].default,
                   help="predicted curve: total, second_order (obd) or first_order (taylor)")
    p.add_argument("--metric", default=curves["metric"].default, help="measured change used from the ablation")
    p.add_argument("--uncertainty", type=float, default=curves["uncertainty"].default,
                   help="read measured loss changes as mean + this many standard errors")
    p.add_argument("--fragile-threshold", type=float, default=None,
                   help="cap each component where its damage exceeds this loss increase")
    p.add_argument("--max-sparsity", type=float, default=solve["max_sparsity"].default, help="no component above this")
    p.add_argument("--max-extrapolation", type=float, default=solve["max_extrapolation"].default,
                   help="how far beyond its largest measured sparsity a component may go")
    p.add_argument("--grid-step", type=float, default=solve["grid_step"].default, help="sparsity grid step")
    p.add_argument("--model", default=None,
                   help="also check counts and the measured sparsity by pruning this model (restored after)")
    p.add_argument("--no-baselines", action="store_true", help="do not write the uniform/global plans")
    p.add_argument("--rule", choices=("additive", "measured", "owl", "authors"), default="additive",
                   help="additive: the least summed single-component damage; measured: that plan checked "
                   "and moved on whole-plan calibration losses (needs --model, --calibration); owl: "
                   "outlier-weighted layer sparsities (needs --model, --calibration); authors: the "
                   "paper's sigmoid rule on gradient importance (needs --model)")
    p.add_argument("--budget", type=_positive_int, default=8, help="measured: whole-plan checks")
    p.add_argument("--calibration", default=None, metavar="SOURCE[::ID_PATTERN]",
                   help="measured/owl: calibration set (never test data)")
    p.add_argument("--calibration-limit", type=_positive_int, default=None, help="first N calibration utterances")
    p.add_argument("--score", choices=("magnitude", "wanda", "sparsegpt"), default=None,
                   help="the method the plan prunes with (default: the sensitivity run's; owl: wanda)")
    p.add_argument("--owl-m", type=float, default=OWL_M, help="owl: outlier threshold M (times the layer mean)")
    p.add_argument("--owl-lambda", type=float, default=OWL_LAMBDA, help="owl: sparsity range +-lambda around the target")
    p.add_argument("--labels", choices=("reference", "greedy"), default="reference",
                   help="measured/owl: decoder tokens of the calibration set")
    _add_statistics_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, required=True, help="plan YAML to write")
    _add_trust_pickle(p)
    p.set_defaults(func=_run_allocate)


def _run_allocate(args) -> int:
    from .allocate import (
        allocate_plan, format_table, load_sensitivity, parse_caps, uniform_damage, verify_allocation,
        write_allocation,
    )

    if args.rule != "additive":
        return _run_rule_allocation(args)
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
        from .models import load_model

        model, _ = load_model(args.model, trust_pickle=args.trust_pickle)
        m = verify_allocation(alloc, model)
        print(
            f"checked on {args.model}: newly pruned {m['pruned_linear']:.4f} of {m['linear_weights']} "
            f"linear weights, {m['pruned_all']:.4f} of {m['all_parameters']} parameters"
        )
    for what, path in write_allocation(alloc, args.out, baselines=not args.no_baselines).items():
        print(f"wrote {what}: {path}")
    return 0


def _run_rule_allocation(args) -> int:
    """``allocate --rule measured|owl|authors``."""
    import json

    from .allocate import load_sensitivity, parse_caps
    from .allocation_rules import authors_allocation, measured_allocation, owl_allocation, write_rule_allocation
    from .calibration import build_examples
    from .models import load_model
    from .prune import PruningMethod

    if not args.model:
        _parser(args).error(f"--rule {args.rule} needs --model (the dense model the plan is for)")
    if args.rule in ("measured", "owl") and not args.calibration:
        _parser(args).error(f"--rule {args.rule} needs --calibration SOURCE[::ID_PATTERN] (never test data)")
    model, processor = load_model(args.model, trust_pickle=args.trust_pickle)
    examples = None
    if args.calibration:
        calib = _read_set(args.calibration, limit=args.calibration_limit)
        if not calib.utterances:
            raise ValueError(f"--calibration {args.calibration}: no utterances selected")
        examples = build_examples(model, processor, calib.utterances, spec=_calibration_options(args).labels,
                                  progress=not args.no_progress)
    if args.rule == "owl":
        alloc = owl_allocation(model, examples, args.target, m=args.owl_m, lam=args.owl_lambda,
                               score=args.score or "wanda", options=_calibration_options(args),
                               progress=not args.no_progress)
    elif args.rule == "authors":
        path = args.sensitivity / "sensitivity.json" if args.sensitivity.is_dir() else args.sensitivity
        alloc = authors_allocation(json.loads(path.read_text(encoding="utf-8")), model, args.target,
                                   score=args.score or "magnitude")
    else:
        curves = load_sensitivity(args.sensitivity, source=args.source, diagnostic=args.diagnostic,
                                  metric=args.metric, uncertainty=args.uncertainty)
        score = args.score or curves.score
        if score != curves.score:
            log.warning("the sensitivity was measured under %s, the plan prunes with %s", curves.score, score)
        method = PruningMethod(score, calibration=examples if score != "magnitude" else None,
                               options=_calibration_options(args) if score != "magnitude" else None)
        alloc = measured_allocation(
            model, examples, curves, args.target, budget=args.budget, method=method,
            allocate_kwargs=dict(caps=parse_caps(args.cap), grid_step=args.grid_step, max_sparsity=args.max_sparsity,
                                 max_extrapolation=args.max_extrapolation, fragile_threshold=args.fragile_threshold),
            on_check=lambda r: print(f"check {r['check']} ({r['move']}): loss delta {r['loss_delta']:+.4f}, "
                                     f"encoder {r['encoder_sparsity']:.3f}, decoder {r['decoder_sparsity']:.3f}",
                                     flush=True),
        )
        print(f"chosen: {alloc.info['chosen']} (loss delta {alloc.info['chosen_loss_delta']:+.4f})")
    for row in alloc.rows:
        print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    print(f"{args.rule}: {alloc.achieved:.4f} of linear weights (target {args.target:.4f})")
    for what, path in write_rule_allocation(alloc, args.out).items():
        print(f"wrote {what}: {path}")
    return 0


# ----------------------------------------------------------------------------------------------
# sweep
# ----------------------------------------------------------------------------------------------


def _add_sweep(sub) -> None:
    p = _subparser(
        sub, "sweep",
        description="Run models x plans (or selectors x sparsities) x data sets x protocols from "
        "SPEC.yaml into --out: one row per finished run in runs.jsonl (appended atomically), "
        "evaluation outputs in runs/<run_id>/. A rerun skips finished runs; failed runs are "
        "recorded with their error and retried only with --retry-failed.",
    )
    p.add_argument("spec", type=Path, help="sweep spec YAML (see asrprune.sweep.SweepSpec)")
    p.add_argument("--out", type=Path, required=True, help="sweep directory (created; resumed if it exists)")
    p.add_argument("--retry-failed", action="store_true", help="also rerun runs that failed before")
    _add_early_stop_flags(p)
    _add_executor_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args) -> int:
    from .sweep import SweepSpec, run_sweep

    prepare_out_dir(args.out, create=False)  # a file there is refused before any slow step

    spec = SweepSpec.from_yaml(args.spec)
    spec = dataclasses.replace(spec, early_stop=_early_stop(args, spec.early_stop))
    summary = run_sweep(spec, args.out, retry_failed=args.retry_failed, progress=not args.no_progress,
                        executor=_executor(args))
    d = summary.to_dict()
    print(
        f"sweep {spec.name}: {d['total']} runs; ran {d['ran']}, already finished {d['skipped_finished']}, "
        f"failed {d['failed']}, failed earlier and not retried {d['skipped_failed']}, "
        f"collapsed (stopped early) {d['collapsed']} ({d['wall_s']:.0f} s); results in {args.out / 'runs.jsonl'}"
    )
    for run_id in d["failed_run_ids"]:
        print(f"  failed: {run_id} (see its row in runs.jsonl; rerun with --retry-failed)")
    return 1 if summary.failed else 0


# ----------------------------------------------------------------------------------------------
# reproduce
# ----------------------------------------------------------------------------------------------


def _add_decode_flags(p: argparse.ArgumentParser, *, study: bool) -> None:
    """The decoding flags, defaults from ``DecodeOptions`` (one home)."""
    from .decoding import DecodeOptions

    d = _field_defaults(DecodeOptions)
    p.add_argument("--batch-size", type=_positive_int, default=d["batch_size"],
                   help="sequences per generate call (beam search: batch-size / beam-size utterances)")
    if not study:
        p.add_argument("--beam-size", type=_positive_int, default=d["beam_size"], help="beams (1 = greedy)")
    p.add_argument("--dtype", default=d["dtype"], help=f"{', '.join(DTYPES)} (or fp32, fp16, bf16)")
    p.add_argument("--device", default=d["device"], help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--max-new-tokens", type=_positive_int, default=d["max_new_tokens"],
                   help="cap on generated tokens per 30 s window; bounds the time a collapsed, "
                   "hallucinating variant takes" + ("; every stage of the study uses it" if study else ""))
    p.add_argument("--stop-repetitions", type=_positive_int, default=d["stop_repetitions"], metavar="K",
                   help="end a hypothesis once one n-gram (n <= 8) repeats K times in a row (off by default; "
                   "it lowers the WER of looping hypotheses and is recorded with the result)")


def _decode_options(args, protocol: str = "standard", **more):
    """``DecodeOptions`` of the decoding flags (:func:`_add_decode_flags`) plus ``more`` fields."""
    from .decoding import DecodeOptions

    fields = {"batch_size": args.batch_size, "dtype": args.dtype, "device": args.device,
              "max_new_tokens": args.max_new_tokens, "stop_repetitions": args.stop_repetitions, **more}
    return DecodeOptions(protocol=protocol, **fields)


def _add_reproduce(sub) -> None:
    from .study import PRESETS, StudySpec
    from .sweep import ENCODER_CACHE_MODES

    d = _field_defaults(StudySpec)
    p = _subparser(
        sub, "reproduce",
        description="Baselines under both protocols; under --protocols: decoder self-attention, "
        "late encoder, decoder FFN and cross-attention sweeps, fragility probes, global magnitude "
        "and uniform 40%, the paper's own plans; sensitivity on the calibration set (kept "
        "disjoint from every data set) and the sensitivity-aware 40% plan; each pruned run "
        "compared with its baseline by the paired test; report.md/report.html in --out. "
        "DATA and --calibration take SOURCE or SOURCE::ID_PATTERN (e.g. "
        "ljspeech/manifest.jsonl::'LJ002-*'). Resumable: rerun the same command to continue.",
    )
    p.add_argument("model", help="model spec (tiny.en, base, a directory)")
    p.add_argument("data", nargs="+", help="evaluation set(s): manifest, folder or SOURCE::ID_PATTERN")
    p.add_argument("--calibration", required=True, help="calibration set (SOURCE or SOURCE::ID_PATTERN)")
    p.add_argument("--out", type=Path, required=True, help="study directory")
    p.add_argument("--limit", type=_positive_int, default=d["limit"], help="first N utterances of each evaluation set")
    p.add_argument("--sample", type=_positive_int, default=d["sample"], help="seeded random N utterances of each set")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed of --sample")
    p.add_argument("--calibration-limit", type=_positive_int, default=d["calibration_limit"],
                   help="calibration utterances (when not given: the preset's; quick 20, main and full all)")
    p.add_argument("--preset", choices=PRESETS, default=d["preset"],
                   help="quick: 30/50%% sweeps, 5 probes and SparseGPT 40%%; main: the paper's headline "
                   "configurations (decoder self-attn 50%%, late encoder 50%%, decoder FFN 30%%, global/uniform "
                   "40%%, the paper's plans, sensitivity-aware 40%%) and every method at 40%%; methods: "
                   "magnitude (global, uniform), Wanda (uniform, OWL), SparseGPT (uniform, measured "
                   "allocation) and the authors' rule at 30/40/50%%, and 2:4; full: all of it with the "
                   "paper's 10-50%% grids")
    p.add_argument("--sparsities", type=_fractions, default=d["sparsities"],
                   help="levels of the component sweeps, e.g. 0.3,0.5 (replaces the preset's; for "
                   "--preset methods, the method levels)")
    p.add_argument("--measured-budget", type=_positive_int, default=d["measured_budget"],
                   help="whole-plan checks of SparseGPT's measured allocation (at least 2)")
    _add_statistics_flags(p)
    _add_early_stop_flags(p)
    _add_executor_flags(p)
    p.add_argument("--protocols", type=_protocol_list, default=d["protocols"],
                   help="protocols of the pruned runs (baselines run under both)")
    p.add_argument("--target", type=_fraction, default=d["target"],
                   help="sparsity of all linear weights for global, uniform and sensitivity-aware plans")
    _add_decode_flags(p, study=True)
    p.add_argument("--encoder-cache", choices=ENCODER_CACHE_MODES, default=d["encoder_cache"],
                   help="reuse the unpruned encoder's outputs for variants that leave it untouched")
    p.add_argument("--ablation-sparsities", type=_sparsity_list, default=d["sensitivity"].ablation_sparsities,
                   help="sparsities of the sensitivity stage's measured ablation (0.5 alone halves "
                   "that stage on a large model)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="let calibration overlap evaluation data (recorded; not recommended)")
    _add_scoring_flags(p)
    _add_encoding(p)
    _add_trust_pickle(p)
    p.add_argument("--retry-failed", action="store_true", help="rerun runs that failed before")
    p.add_argument("--no-report", action="store_true", help="do not build the report at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_reproduce)


def _study_spec(args):
    """The :class:`~asrprune.study.StudySpec` of ``reproduce``'s flags."""
    from .calibration import CalibrationOptions
    from .sensitivity import SensitivityOptions
    from .study import StudySpec
    from .sweep import DataSpec

    def data(text: str) -> DataSpec:
        spec = DataSpec.parse(text)
        return dataclasses.replace(spec, encoding=args.encoding) if args.encoding != "utf-8" else spec

    return StudySpec(
        model=args.model, data=tuple(data(d) for d in args.data), calibration=data(args.calibration),
        limit=args.limit, sample=args.sample, seed=args.seed, protocols=args.protocols,
        preset=args.preset, sparsities=args.sparsities, calibration_limit=args.calibration_limit,
        decode=_decode_options(args), target=args.target, allow_overlap=args.allow_overlap,
        retry_failed=args.retry_failed, encoder_cache=args.encoder_cache,
        sensitivity=SensitivityOptions(ablation_sparsities=tuple(args.ablation_sparsities)),
        empty_reference=args.empty_reference, max_failed_fraction=args.max_failed_fraction,
        trust_pickle=args.trust_pickle, measured_budget=args.measured_budget, early_stop=_early_stop(args),
        calibration_options=CalibrationOptions(frames=args.frames, damp=args.damp, block_size=args.block_size),
    )


def _add_executor_flags(p: argparse.ArgumentParser, *, shards: bool = False) -> None:
    """Where the runs run: here (default) or on a Ray cluster (``asrprune[ray]``)."""
    from .executor import EXECUTORS

    p.add_argument("--executor", choices=EXECUTORS, default=EXECUTORS[0],
                   help="local: one run after another here; ray: Ray workers (pip install 'asrprune[ray]')")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (ray start --head prints it; 'auto' joins a local one); "
                   "when not given: a Ray started on this machine")
    p.add_argument("--ray-workers", type=_positive_int, default=None, help="Ray workers (default: as resources allow)")
    p.add_argument("--ray-worker-cpus", type=float, default=1.0, help="CPUs per Ray worker (its torch threads)")
    p.add_argument("--ray-worker-gpus", type=float, default=0.0, help="GPUs per Ray worker (1 on a GPU cluster)")
    if shards:
        p.add_argument("--shards", type=_positive_int, default=None,
                       help="with --executor ray: split the utterances over this many workers at batch "
                       "boundaries (the result equals a single-process run)")


def _executor(args):
    if getattr(args, "executor", "local") != "ray":
        return None
    from .executor import RayExecutor

    return RayExecutor(address=args.address, workers=args.ray_workers, num_cpus=args.ray_worker_cpus,
                       num_gpus=args.ray_worker_gpus)


def _add_early_stop_flags(p: argparse.ArgumentParser) -> None:
    """Early stop of collapsed variants (``asrprune.early_stop``; on by default)."""
    from .early_stop import EarlyStopOptions

    d = _field_defaults(EarlyStopOptions)
    p.add_argument("--no-early-stop", action="store_true",
                   help="decode every utterance of every variant (a rerun with it completes collapsed runs)")
    p.add_argument("--early-stop-threshold", type=_fraction, default=None,
                   help=f"stop a variant once the paired {100 * d['confidence']:g}%% interval of its ΔWER lies above "
                   f"this (fraction; default {d['threshold']:g} = +{100 * d['threshold']:g} points)")
    p.add_argument("--early-stop-min", type=_positive_int, default=None,
                   help=f"utterances scored before the first decision (default {d['min_utterances']})")


def _early_stop(args, spec_value=True):
    """The early-stop setting of the flags (``spec_value``: a sweep file's own)."""
    if args.no_early_stop:
        return False
    fields = {k: v for k, v in (("threshold", args.early_stop_threshold), ("min_utterances", args.early_stop_min))
              if v is not None}
    if not fields:
        return spec_value
    base = spec_value if isinstance(spec_value, dict) else {}
    return {**base, **fields}


def _run_reproduce(args) -> int:
    from .files import latest_rows, read_jsonl
    from .study import reproduce

    prepare_out_dir(args.out, create=False)  # a file there is refused before any slow step

    result = reproduce(_study_spec(args), args.out, progress=not args.no_progress, report=not args.no_report,
                       executor=_executor(args))
    d = result.to_dict()
    for name, info in d["stages"].items():
        line = f"{name}: {info.get('status')}" + (f" ({info['wall_s']:.0f} s)" if info.get("wall_s") is not None else "")
        if info.get("error"):
            line += f": {info['error']}"
        print(line)
    rows = latest_rows(read_jsonl(args.out / "runs.jsonl")).values()
    failed = sum(r.get("status") != "ok" for r in rows)
    if d["report"]:
        print(f"wrote {d['report']['markdown']}")
        print(f"wrote {d['report']['html']}")
    print(f"this session {d['wall_s'] / 60:.1f} min; {len(rows)} runs recorded, {failed} failed; results in {args.out}")
    return 1 if failed or any(i.get("status") == "failed" for i in d["stages"].values()) else 0


# ----------------------------------------------------------------------------------------------
# prune
# ----------------------------------------------------------------------------------------------

_EXPORT_FORMATS = ("hf", "compressed", "ctranslate2")


def _add_prune(sub) -> None:
    from .export import CT2_QUANTIZATIONS

    p = _subparser(
        sub, "prune",
        description="Prune MODEL in one shot by a plan of component selectors and sparsities, print "
        "the measured sparsity, and write --out: a directory that transformers' from_pretrained "
        "and 'asrprune evaluate' load, with pruning.json (plan, measured sparsity, source model "
        "and its fingerprint). --format compressed adds OUT/compressed/ (asrprune-bitmask "
        "safetensors, docs/sparse_format.md); --format ctranslate2 adds OUT/ctranslate2/ "
        "(faster-whisper). Plan syntax: SELECTOR=SPARSITY[@matrix] or SELECTOR=N:M, "
        "comma-separated, e.g. 'decoder.self_attn=0.5,late_encoder=0.5'; "
        "see 'asrprune components MODEL' for the selectors.",
    )
    p.add_argument("model", help="built-in name (tiny.en, base), CTranslate2 or save_pretrained directory")
    plan = p.add_mutually_exclusive_group(required=True)
    plan.add_argument("--plan", metavar="TEXT", help="plan text, e.g. 'decoder.self_attn=0.5,late_encoder=0.5'")
    plan.add_argument("--plan-file", type=Path, metavar="YAML", help="plan YAML (see asrprune.config)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="global: one magnitude threshold pooled over all entries (all entries must "
                   "share one sparsity); when not given: the plan file's mode, else per_entry")
    _add_method_flags(p)
    p.add_argument("--out", type=Path, required=True, help="pruned model directory to write")
    p.add_argument("--format", dest="formats", action="append", choices=_EXPORT_FORMATS, default=None,
                   help="forms to write (repeatable); hf (OUT itself) is always written, "
                   "compressed goes to OUT/compressed, ctranslate2 to OUT/ctranslate2")
    p.add_argument("--quantization", default=None, metavar="TYPE", choices=CT2_QUANTIZATIONS,
                   help="CTranslate2 weight type (int8, float16, ...); when not given: keep float32")
    p.add_argument("--dtype", default=DTYPES[0], choices=DTYPES, help="dtype the model is loaded, pruned and saved in")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    p.add_argument("--json", action="store_true", help="print the pruning result as JSON")
    _add_trust_pickle(p)
    p.set_defaults(func=_run_prune)


def _run_prune(args) -> int:
    import shutil

    from .config import CALIBRATED_SCORES, PrunePlan
    from .export import PRUNING_FILENAME, export_compressed, export_ctranslate2, save_pruned
    from .models import load_model, model_fingerprint
    from .prune import prune_model, untie_output_projection
    from .structured import prune_structured

    formats = list(dict.fromkeys(args.formats or ["hf"]))
    if args.quantization is not None and "ctranslate2" not in formats:
        _parser(args).error("--quantization applies to --format ctranslate2 only; add --format ctranslate2")
    if args.plan is not None:
        plan = PrunePlan.parse(args.plan, mode=args.mode or MODES[0], score=args.score or "magnitude")
    else:
        plan = PrunePlan.from_yaml(args.plan_file)
        if args.mode is not None or args.score is not None:
            plan = PrunePlan.from_dict({**plan.to_dict(), **({"mode": args.mode} if args.mode else {}),
                                        **({"score": args.score} if args.score else {})})
    if args.repair is not None:
        if not plan.structured:
            _parser(args).error("--repair applies to structured entries (@neurons, @heads); the plan has none")
        plan = dataclasses.replace(plan, repair=args.repair)
    calibrated = plan.score in CALIBRATED_SCORES or (plan.structured and (plan.score != "magnitude" or plan.repair == "bias"))
    if calibrated and not args.calibration:
        what = f"--score {plan.score}" if plan.score != "magnitude" else "repair bias"
        _parser(args).error(f"{what} needs --calibration SOURCE[::ID_PATTERN] (never test data)")
    if args.calibration and not calibrated:
        _parser(args).error(f"--calibration is for --score {' or '.join(CALIBRATED_SCORES)} (and the structured "
                            f"scores, --repair bias); the plan's score is {plan.score}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} is not empty; choose another directory or pass --overwrite")

    model, processor = load_model(args.model, dtype=args.dtype, trust_pickle=args.trust_pickle)
    source_fp = model_fingerprint(model)
    examples, record = _calibration(args, model, processor, plan)
    if args.untie_proj_out:
        untie_output_projection(model)
    if plan.structured:
        result = prune_structured(model, plan, calibration=examples, options=_calibration_options(args),
                                  progress=not args.no_progress)
    else:
        result = prune_model(model, plan, calibration=examples, options=_calibration_options(args),
                             progress=not args.no_progress)
    pruning = result.to_dict()
    if record is not None:
        pruning.setdefault("calibration", {})["data"] = record
    save_pruned(model, processor, out, pruning=pruning, source=str(args.model),
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
    st = result.structure
    if st is not None:
        for r in st["removed"]:
            print(f"{r['entry']:<40} {r['where']:<32} removed {len(r['removed'])} of {r['of']} {r['unit']}")
        print(f"parameters: {st['params_before']:,} -> {st['params_after']:,} ({st['size_reduction']:.2%} fewer); "
              f"{'the config describes the shapes' if st['config_expresses'] else 'per-layer shapes in config.json (load with asrprune)'}")
        if not result.entries:
            for note in result.notes:
                print(f"note: {note}")
            return
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


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    """The pruning method and its calibration (defaults: ``CalibrationOptions``)."""
    from .calibration import LABEL_MODES, CalibrationOptions
    from .config import SCORES

    d = _field_defaults(CalibrationOptions)
    p.add_argument("--score", choices=[s for s in SCORES if s not in ("custom",)], default=None,
                   help="pruning method: magnitude, wanda (|W| * ||X||, per row) or sparsegpt (OBS "
                   "reconstruction); when not given: the plan file's, else magnitude")
    p.add_argument("--calibration", default=None, metavar="SOURCE[::ID_PATTERN]",
                   help="calibration set of wanda and sparsegpt (kept disjoint from every evaluation)")
    p.add_argument("--calibration-limit", type=_positive_int, default=None, help="first N calibration utterances")
    p.add_argument("--labels", choices=LABEL_MODES, default=d["labels"].labels,
                   help="decoder tokens: reference transcripts or the dense model's greedy ones")
    _add_statistics_flags(p)
    p.add_argument("--repair", choices=("none", "bias"), default=None,
                   help="structured entries: bias adds the removed units' mean contribution to the next bias "
                   "(FLAP's compensation; needs --calibration)")
    p.add_argument("--untie-proj-out", action="store_true",
                   help="give proj_out its own copy of the token embedding so that it can be pruned apart")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_statistics_flags(p: argparse.ArgumentParser) -> None:
    """How calibration data enters Wanda's and SparseGPT's statistics (``CalibrationOptions``)."""
    from .calibration import FRAMES, CalibrationOptions

    d = _field_defaults(CalibrationOptions)
    p.add_argument("--frames", choices=FRAMES, default=d["frames"],
                   help="encoder positions in the statistics: speech only, or the whole 30 s window")
    p.add_argument("--damp", type=float, default=d["damp"], help="SparseGPT dampening (fraction of mean diag H)")
    p.add_argument("--block-size", type=_positive_int, default=d["block_size"], help="SparseGPT column block")


def _calibration_options(args):
    from .calibration import CalibrationOptions, LabelSpec

    labels = LabelSpec(labels=args.labels, **({"text_form": args.text_form} if hasattr(args, "text_form") else {}),
                       **({"language": args.language or None} if hasattr(args, "language") else {}))
    return CalibrationOptions(labels=labels, frames=args.frames, damp=args.damp, block_size=args.block_size)


def _calibration(args, model, processor, plan):
    """The calibration examples and record of a calibrated method (``None, None`` otherwise)."""
    from .calibration import build_examples
    from .overlap import calibration_record

    if not args.calibration:
        return None, None
    calib = _read_set(args.calibration, limit=args.calibration_limit, encoding=getattr(args, "encoding", "utf-8"))
    if not calib.utterances:
        raise ValueError(f"--calibration {args.calibration}: no utterances selected")
    options = _calibration_options(args)
    examples = build_examples(model, processor, calib.utterances, spec=options.labels, progress=not args.no_progress)
    return examples, {**calibration_record(calib.utterances), "source": args.calibration}


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------


def _add_export(sub) -> None:
    from .export import CT2_QUANTIZATIONS

    p = _subparser(
        sub, "export",
        description="Write another form of a pruned model directory: compressed (asrprune-bitmask "
        "safetensors whose size shrinks with sparsity, docs/sparse_format.md), ctranslate2 "
        "(faster-whisper), or hf (a compressed directory decompressed to a plain save_pretrained "
        "directory).",
    )
    p.add_argument("pruned_dir", type=Path, help="directory written by 'asrprune prune' (or a compressed export)")
    p.add_argument("--format", required=True, choices=_EXPORT_FORMATS, help="form to write")
    p.add_argument("--out", type=Path, required=True, help="directory to write")
    p.add_argument("--quantization", default=None, metavar="TYPE", choices=CT2_QUANTIZATIONS,
                   help="CTranslate2 weight type (int8, float16, ...); when not given: keep the saved dtype")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    import tempfile

    from .export import decompress_to_pretrained, export_compressed, export_ctranslate2, is_compressed_dir

    if args.quantization is not None and args.format != "ctranslate2":
        _parser(args).error("--quantization applies to --format ctranslate2 only")
    src = Path(args.pruned_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"PRUNED_DIR {src} is not a directory")
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


# ----------------------------------------------------------------------------------------------
# sensitivity
# ----------------------------------------------------------------------------------------------


def _add_sensitivity(sub) -> None:
    from .calibration import LABEL_MODES, LOSS_REDUCTIONS, TEXT_FORMS, LabelSpec
    from .sensitivity import SensitivityOptions

    d = _field_defaults(SensitivityOptions)
    labels = _field_defaults(LabelSpec)
    p = _subparser(
        sub, "sensitivity",
        description="Teacher-forced cross-entropy gradients, one calibration utterance per backward "
        "pass: mean |g|, Taylor |w g|, empirical Fisher, OBD; predicted loss change of "
        "magnitude-pruning each component (kind x layer) and group; the measured loss change "
        "when it is pruned alone; Spearman correlations with bootstrap intervals. CALIBRATION_DATA "
        "is a manifest/folder, optionally SOURCE::ID_PATTERN (e.g. ljspeech/manifest.jsonl::'LJ001-*'). "
        "Writes sensitivity.json, CSV tables and heatmaps to --out; rerun the same command to resume.",
    )
    p.add_argument("model", help="model spec (tiny.en, base, a directory)")
    p.add_argument("calibration", metavar="CALIBRATION_DATA", help="calibration set: SOURCE or SOURCE::ID_PATTERN")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--include", action="append", default=None, help="id pattern(s) to keep, e.g. 'LJ001-*'")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N calibration utterances")
    p.add_argument("--sample", type=_positive_int, default=None, help="seeded random N calibration utterances")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed of --sample and of the bootstrap")
    p.add_argument("--labels", choices=LABEL_MODES, default=labels["labels"],
                   help="teacher-force the reference transcripts or the model's own greedy ones")
    p.add_argument("--text-form", choices=TEXT_FORMS, default=labels["text_form"],
                   help="reference text as Whisper writes it (sentence case, leading space) or as given")
    p.add_argument("--language", default=labels["language"], help="language token for multilingual models")
    p.add_argument("--ablation-sparsities", type=_sparsity_list, default=d["ablation_sparsities"],
                   help="sparsities of the measured ablation ('none': no ablation)")
    p.add_argument("--prediction-sparsities", type=_sparsity_list, default=d["prediction_sparsities"],
                   help="sparsities at which predicted loss changes are tabulated")
    p.add_argument("--targets", type=_csv_list, default=None,
                   help="comma-separated selectors to analyse instead of every component kind x layer")
    p.add_argument("--groups", type=_csv_list, default=d["groups"],
                   help="comma-separated named groups ablated as well ('none': no group)")
    p.add_argument("--ablation-wer", action="store_true", help="also measure calibration WER per ablation (decoding; slow)")
    p.add_argument("--eval-data", action="append", default=[],
                   help="evaluation set(s) the calibration must be disjoint from (SOURCE or SOURCE::ID_PATTERN)")
    p.add_argument("--allow-overlap", action="store_true", help="warn instead of failing when calibration overlaps --eval-data")
    p.add_argument("--checkpoint-every", type=_positive_int, default=d["checkpoint_every"],
                   help="accumulator checkpoint every N utterances")
    p.add_argument("--bootstrap", type=_positive_int, default=d["n_bootstrap"],
                   help="bootstrap resamples of the correlation intervals")
    p.add_argument("--cache-mb", type=float, default=d["cache_mb"], help="memory for cached encoder states in the ablation")
    _add_decode_flags(p, study=True)
    p.add_argument("--loss-reduction", choices=LOSS_REDUCTIONS, default=d["loss_reduction"],
                   help="per-utterance loss: sequence NLL (sum over tokens) or per-token mean")
    p.add_argument("--restart", action="store_true", help="discard checkpoints in --out instead of resuming")
    p.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"), default=d["method"],
                   help="how the ablation prunes: measure the sensitivity under the method that will prune "
                   "(wanda/sparsegpt: from one dense pass of input statistics; linear weights only)")
    _add_statistics_flags(p)
    _add_encoding(p)
    _add_trust_pickle(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_sensitivity)


def _read_set(text: str, *, include=None, limit=None, sample=None, seed=0, encoding="utf-8"):
    from .manifests import read_speech_set

    source, _, pattern = str(text).partition("::")
    patterns = list(include or []) + ([pattern] if pattern else [])
    return read_speech_set(source, include=patterns or None, limit=limit, sample=sample, seed=seed, encoding=encoding)


def _run_sensitivity(args) -> int:
    from .calibration import LabelSpec
    from .models import load_model
    from .figures import draw_heatmaps
    from .sensitivity import SensitivityOptions, score_sensitivity

    prepare_out_dir(args.out, create=False)  # a file there is refused before any slow step

    options = SensitivityOptions(
        labels=LabelSpec(labels=args.labels, text_form=args.text_form, language=args.language or None),
        ablation_sparsities=args.ablation_sparsities,
        prediction_sparsities=args.prediction_sparsities or args.ablation_sparsities or (0.5,),
        groups=args.groups, targets=args.targets or None, ablation_wer=args.ablation_wer,
        checkpoint_every=args.checkpoint_every, n_bootstrap=args.bootstrap, seed=args.seed,
        cache_mb=args.cache_mb, loss_reduction=args.loss_reduction, method=args.method,
        calibration=_calibration_options(args),
    )
    decode = _decode_options(args)
    calib = _read_set(args.calibration, include=args.include, limit=args.limit, sample=args.sample, seed=args.seed,
                      encoding=args.encoding)
    if not calib.utterances:
        raise ValueError(f"{args.calibration}: no calibration utterances selected (check --include/--limit)")
    evaluation = None
    if args.eval_data:
        evaluation = [u for d in args.eval_data for u in _read_set(d, encoding=args.encoding).utterances]
    model, processor = load_model(args.model, device=decode.resolved_device(), dtype=decode.dtype,
                                  trust_pickle=args.trust_pickle)
    result = score_sensitivity(
        model, processor, calib.utterances, options=options, out_dir=args.out,
        evaluation=evaluation, allow_overlap=args.allow_overlap, decode=decode,
        data_info={"name": getattr(calib, "name", ""), "source": args.calibration, "include": args.include},
        restart=args.restart, progress=not args.no_progress,
    )
    heatmaps = draw_heatmaps(args.out)
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
    print(f"wrote {args.out / 'sensitivity.json'} (+ CSV tables and {len(heatmaps)} heatmaps)")
    return 0


# ----------------------------------------------------------------------------------------------
# evaluate, compare
# ----------------------------------------------------------------------------------------------


def _add_evaluate(sub) -> None:
    from .decoding import DecodeOptions

    d = _field_defaults(DecodeOptions)
    p = _subparser(
        sub, "evaluate",
        description="Transcribe DATA with MODEL and score it. Writes OUT/summary.json (wer, cer, "
        "wer_ci, counts, options, environment) and OUT/utterances.jsonl (one row per utterance, "
        "written as it goes); rerunning with the same OUT resumes an interrupted run.",
    )
    p.add_argument("model", help="built-in name (tiny.en, base), model directory, CTranslate2 directory or hub id")
    p.add_argument("data", help="manifest (.jsonl), CSV/TSV, corpus folder (LibriSpeech, Common Voice, "
                   "TED-LIUM) or Hugging Face dataset id")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--protocol", choices=PROTOCOLS, default=d["protocol"],
                   help="standard: English forced, no timestamps, greedy; paper: generate() defaults "
                   "with language detection")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N utterances (after other selections)")
    p.add_argument("--sample", type=_positive_int, default=None, help="seeded random subset of N utterances")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    p.add_argument("--include", action="append", default=None, metavar="PATTERN",
                   help="keep utterance ids matching this fnmatch pattern (repeatable), e.g. 'LJ001-*'")
    p.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                   help="drop utterance ids matching this pattern (repeatable)")
    _add_decode_flags(p, study=False)
    p.add_argument("--language", default=d["language"],
                   help="language of multilingual models (when not given: standard en, paper detected)")
    p.add_argument("--workers", type=_nonnegative_int, default=d["num_workers"], help="audio loading threads (0 = inline)")
    p.add_argument("--bootstrap-speakers", action="store_true",
                   help="bootstrap intervals resample whole speakers instead of utterances")
    p.add_argument("--bootstrap-n", type=_positive_int, default=1000, help="bootstrap resamples")
    p.add_argument("--hf-config", default=None, help="Hugging Face dataset config")
    p.add_argument("--hf-split", default="test", help="Hugging Face dataset split (also Common Voice / TED-LIUM split)")
    p.add_argument("--audio-column", default="audio", help="audio column of a Hugging Face dataset")
    p.add_argument("--text-column", default="text", help="text column of a Hugging Face dataset")
    p.add_argument("--streaming", action="store_true", help="stream a Hugging Face dataset")
    p.add_argument("--overwrite", action="store_true", help="discard results already in --out instead of resuming")
    p.add_argument("--allow-overlap", action="store_true",
                   help="evaluate a pruned model on data that overlaps its calibration set (recorded)")
    _add_scoring_flags(p)
    _add_encoding(p)
    _add_trust_pickle(p)
    _add_executor_flags(p, shards=True)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from .evaluation import evaluate
    from .export import calibration_of
    from .manifests import read_speech_set
    from .models import load_model

    prepare_out_dir(args.out, create=False)  # a file there is refused before any slow step

    options = _decode_options(args, protocol=args.protocol, beam_size=args.beam_size, language=args.language,
                              num_workers=args.workers)
    speech_set = read_speech_set(
        args.data, limit=args.limit, sample=args.sample, seed=args.seed, include=args.include,
        exclude=args.exclude, hf_config=args.hf_config, hf_split=args.hf_split,
        audio_column=args.audio_column, text_column=args.text_column, streaming=args.streaming,
        encoding=args.encoding,
    )
    if not speech_set.utterances:
        raise ValueError(f"{args.data}: no utterances selected (check --include/--exclude/--limit)")
    model, processor = load_model(args.model, device=options.resolved_device(), dtype=options.dtype,
                                  trust_pickle=args.trust_pickle)
    decode_batches = None
    executor = _executor(args)
    if args.shards and executor is None:
        _parser(args).error("--shards splits an evaluation over Ray workers; add --executor ray")
    if executor is not None:
        decode_batches = executor.batch_runner(str(args.model), options, args.shards,
                                               empty_reference=args.empty_reference)
    result = evaluate(
        model, processor, speech_set, options, out_dir=args.out, progress=not args.no_progress,
        decode_batches=decode_batches,
        model_spec=str(args.model), overwrite=args.overwrite, bootstrap_n=args.bootstrap_n,
        bootstrap_speakers=args.bootstrap_speakers, empty_reference=args.empty_reference,
        max_failed_fraction=args.max_failed_fraction,
        selection={k: getattr(args, k) for k in ("limit", "sample", "seed", "include", "exclude")},
        calibration=calibration_of(args.model), allow_overlap=args.allow_overlap,
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


def _add_compare(sub) -> None:
    p = _subparser(
        sub, "compare",
        description="Compare evaluation B against A on the same utterances: delta WER = B - A with a "
        "paired bootstrap interval, a paired permutation p-value, and the share of the delta that "
        "comes from its top utterances.",
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
    p.add_argument("--show", action="store_true",
                   help="print the --top utterances word-aligned: reference, A and B, errors marked S/D/I")
    p.set_defaults(func=_run_compare)


def _run_compare(args) -> int:
    from .evaluation import compare
    from .evidence import align_words, aligned_text
    from .files import atomic_write_json, prepare_out_dir, read_jsonl

    comp = compare(args.a, args.b, n_resamples=args.n_resamples, n_permutations=args.n_permutations,
                   seed=args.seed, by_speaker=args.by_speaker, top_k=args.top)
    d = comp.to_dict()
    lo, hi = d["delta_ci"]
    pp = lambda x: "n/a" if x is None else f"{100 * x:+.2f}"  # noqa: E731
    print(f"A {args.a}: WER {_fmt_pct(d['wer_a'])}   B {args.b}: WER {_fmt_pct(d['wer_b'])}   "
          f"({d['n_utterances']} utterances, {d['n_excluded_failed']} excluded as failed)")
    print(f"delta WER (B - A): {pp(d['delta_wer'])} points, 95% CI [{pp(lo)}, {pp(hi)}], p = {d['p_value']:.4g}; "
          f"{d['n_improved']} utterances better, {d['n_worsened']} worse")
    clo, chi = d["delta_cer_ci"]
    print(f"delta CER (B - A): {pp(d['delta_cer'])} points, 95% CI [{pp(clo)}, {pp(chi)}], p = {d['p_value_cer']:.4g}")
    if d["top"]:
        share = d["top_share"]
        print(f"top {len(d['top'])} utterances carry {100 * share:.0f}% of the delta; without them the delta is "
              f"{pp(d['delta_wer_without_top'])} points")
        rows_a = {r["id"]: r for r in read_jsonl(args.a / "utterances.jsonl")} if args.show else {}
        rows_b = {r["id"]: r for r in read_jsonl(args.b / "utterances.jsonl")} if args.show else {}
        for t in d["top"]:
            flags = "".join(f" [hallucination in {k}]" for k, v in (("A", t["hallucination_a"]), ("B", t["hallucination_b"])) if v)
            print(f"  {t['id']}: errors {t['errors_a']} -> {t['errors_b']} of {t['ref_words']} words{flags}")
            if args.show and t["id"] in rows_a and t["id"] in rows_b:
                ref = rows_a[t["id"]].get("reference_norm") or ""
                for label, row in (("A", rows_a[t["id"]]), ("B", rows_b[t["id"]])):
                    text = aligned_text(align_words(ref, row.get("hypothesis_norm") or ""), labels=("REF", label))
                    print("\n".join("    " + line for line in text.splitlines()))
    if args.out is not None:
        path = args.out if args.out.suffix == ".json" else prepare_out_dir(args.out) / "comparison.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, d)
        print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------------------------
# command registry and entry point
# ----------------------------------------------------------------------------------------------

_COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "models": _add_models,
    "components": _add_components,
    "evaluate": _add_evaluate,
    "compare": _add_compare,
    "prune": _add_prune,
    "export": _add_export,
    "sensitivity": _add_sensitivity,
    "allocate": _add_allocate,
    "sweep": _add_sweep,
    "reproduce": _add_reproduce,
    "report": _add_report,
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser: every command in full (``only=None``), or ``only`` in full and the
    others by name and help alone (``only=""``: none in full, for ``asrprune --help``)."""
    parser = argparse.ArgumentParser(
        prog="asrprune",
        description="Sensitivity-aware one-shot pruning of Whisper ASR models.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, add in _COMMANDS.items():
        if only is None or name == only:
            add(sub)
        else:
            sub.add_parser(name, help=_HELP[name])
    return parser


def _command_of(argv: Sequence[str]) -> str:
    return next((a for a in argv if a in _COMMANDS), "")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=_command_of(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "command", None) or not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SystemExit as exc:  # parser.error on a flag combination: usage and error printed
        return int(exc.code or 0)
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
