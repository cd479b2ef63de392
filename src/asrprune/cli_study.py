"""The study commands of the CLI: ``sensitivity``, ``allocate``, ``sweep``, ``reproduce``."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .cli_flags import (
    _add_decode_flags,
    _add_early_stop_flags,
    _add_encoding,
    _add_executor_flags,
    _add_scoring_flags,
    _add_statistics_flags,
    _add_trust_pickle,
    _calibration_options,
    _csv_list,
    _decode_options,
    _early_stop,
    _executor,
    _field_defaults,
    _fraction,
    _fractions,
    _parser,
    _positive_int,
    _protocol_list,
    _read_set,
    _sparsity_list,
    _subparser,
)
from .files import prepare_out_dir

log = logging.getLogger("asrprune")


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
    p.add_argument("--sensitivity", type=Path, default=None,
                   help="sensitivity.json or its directory (every rule but owl needs it)")
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

    if args.sensitivity is None and args.rule != "owl":
        _parser(args).error(f"--rule {args.rule} needs --sensitivity (sensitivity.json or its directory); "
                            "only --rule owl works without one")
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


def _add_reproduce(sub) -> None:
    from .study import PRESETS, StudySpec
    from .sweep_spec import ENCODER_CACHE_MODES

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
    from .sweep_spec import DataSpec

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
    rows = list(latest_rows(read_jsonl(args.out / "runs.jsonl")).values())
    counts = run_counts(rows)
    if d["report"]:
        print(f"wrote {d['report']['markdown']}")
        print(f"wrote {d['report']['html']}")
    print(f"this session {d['wall_s'] / 60:.1f} min; {len(rows)} runs recorded: {counts['ok']} finished, "
          f"{counts['collapsed']} stopped early as collapsed, {counts['failed']} failed; results in {args.out}")
    return 1 if counts["failed"] or any(i.get("status") == "failed" for i in d["stages"].values()) else 0


def run_counts(rows) -> dict[str, int]:
    """Runs by outcome: ``ok``, ``collapsed`` (stopped early: a recorded decision, not a
    failure) and ``failed`` (every other status)."""
    out = {"ok": 0, "collapsed": 0, "failed": 0}
    for r in rows:
        s = r.get("status")
        out[s if s in ("ok", "collapsed") else "failed"] += 1
    return out
