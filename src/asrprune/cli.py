"""Command-line interface: ``asrprune <command> ...``.

The CLI is thin: it parses flags, builds the library's spec objects, calls the public API and
writes files. Only the CLI's modules see ``argparse.Namespace`` and only they print: this one
(the model, evaluation and export commands, the registry and ``main``), :mod:`asrprune.cli_study`
(``sensitivity``, ``allocate``, ``sweep``, ``reproduce``) and :mod:`asrprune.cli_flags` (the
shared flags and value types). Each command has one section: ``_add_<command>(sub)`` declares
its flags and ``_run_<command>(args) -> int`` runs it; ``_COMMANDS`` names them in help order.

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
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from .cli_study import _add_allocate, _add_reproduce, _add_sensitivity, _add_sweep
from .cli_flags import (
    _HELP,
    _HelpFormatter,
    _add_decode_flags,
    _add_encoding,
    _add_executor_flags,
    _add_method_flags,
    _add_scoring_flags,
    _add_trust_pickle,
    _calibration,
    _calibration_options,
    _decode_options,
    _executor,
    _field_defaults,
    _fmt_pct,
    _nonnegative_int,
    _parser,
    _positive_int,
    _print_json,
    _subparser,
)
from .config import DTYPES, MODES, PROTOCOLS
from .files import prepare_out_dir

log = logging.getLogger("asrprune")


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
    from .sweep_spec import needs_calibration

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
    calibrated = needs_calibration(plan)
    if calibrated and not args.calibration:
        what = f"--score {plan.score}" if plan.score != "magnitude" else f"--repair {plan.repair}"
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
