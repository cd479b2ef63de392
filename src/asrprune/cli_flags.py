"""The CLI's shared parts: the help formatter, value types, and the flags several commands share
(decoding, scoring, encoding, pickles, the pruning method and its calibration, early stopping,
the executor), each with its defaults read from the spec dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from typing import Any

from .config import DTYPES, PROTOCOLS, REPAIRS, check_sparsity

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


def _int_at_least(minimum: int, name: str):
    """An argparse type: an integer >= ``minimum`` (the message says what was expected)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {name}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


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
    p.add_argument("--temperature-fallback", action="store_true", default=d["temperature_fallback"],
                   help="Whisper's temperature fallback with its compression rule: a hypothesis whose text "
                   "compresses by more than 2.4 (a loop) is sampled again at 0.2, 0.4, ..., 1.0, seeded "
                   "(off by default; greedy only; recorded with the result)")


def _decode_options(args, protocol: str = "standard", **more):
    """``DecodeOptions`` of the decoding flags (:func:`_add_decode_flags`) plus ``more`` fields."""
    from .decoding import DecodeOptions

    fields = {"batch_size": args.batch_size, "dtype": args.dtype, "device": args.device,
              "max_new_tokens": args.max_new_tokens, "stop_repetitions": args.stop_repetitions,
              "temperature_fallback": args.temperature_fallback, **more}
    return DecodeOptions(protocol=protocol, **fields)


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
    p.add_argument("--repair", choices=REPAIRS, default=None,
                   help="structured entries: bias adds the removed units' mean contribution to the next bias "
                   "(FLAP's compensation); refit also refits the kept columns of fc2/out_proj by ridge least "
                   "squares on the calibration activations (both need --calibration)")
    p.add_argument("--untie-proj-out", action="store_true",
                   help="give proj_out its own copy of the token embedding so that it can be pruned apart")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_statistics_flags(p: argparse.ArgumentParser) -> None:
    """How calibration data enters Wanda's and SparseGPT's statistics (``CalibrationOptions``)."""
    from .calibration import FRAMES, CalibrationOptions

    d = _field_defaults(CalibrationOptions)
    p.add_argument("--frames", choices=FRAMES, default=d["frames"],
                   help="encoder positions in the statistics: speech only, or the whole 30 s window")
    p.add_argument("--damp", type=float, default=d["damp"],
                   help="SparseGPT dampening and the ridge of --repair refit (fraction of the mean diagonal of H or C)")
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


def _read_set(text: str, *, include=None, limit=None, sample=None, seed=0, encoding="utf-8"):
    from .manifests import read_speech_set

    source, _, pattern = str(text).partition("::")
    patterns = list(include or []) + ([pattern] if pattern else [])
    return read_speech_set(source, include=patterns or None, limit=limit, sample=sample, seed=seed, encoding=encoding)
