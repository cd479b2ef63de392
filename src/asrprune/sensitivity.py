"""Sensitivity diagnostics of Whisper components, and a check of whether they predict pruning damage.

Everything is measured on *calibration* data with the teacher-forced cross-entropy of the
decoder (no decoding in the loop), one utterance per backward pass so that every per-utterance
gradient ``g_i`` is exact. The per-utterance loss ``L_i`` is the sequence negative
log-likelihood ``-log p(y_i | x_i)`` = the *sum* of the token cross-entropies over the text and
end-of-text targets (``loss_reduction="sum"``, default). Why the sum and not the per-token mean
(HF's ``labels=`` loss): the Fisher identity ``E[g g^T] ~ E[Hessian]`` that OBD relies on holds
for a log-likelihood. For the mean over ``T`` tokens the squared gradient scales like ``1/T^2``
but the Hessian like ``1/T``, so the OBD term would come out about ``T`` times too small
(``T`` ~ 25 tokens on LJ Speech) against the measured loss change. The objective of the
predictions and of the measured ablation is therefore the mean over utterances of ``L_i``
(nats per utterance); ``loss_reduction="mean"`` is available for comparison with the paper.
Per parameter ``w`` (all in fp32, over ``n`` utterances):

- ``gradient``  = mean_i |g_i|                 (the authors' "gradient sensitivity"; they
                                                  min-max normalise it across weight matrices)
- ``taylor``    = mean_i |w * g_i| = |w| * mean_i |g_i|
                  (first-order Taylor importance, *per-utterance* absolute values averaged, not
                  ``|w * mean_i g_i|``: near a trained optimum the mean gradient largely cancels
                  across utterances and what is left mostly reflects which utterances happened to
                  be drawn; the per-utterance form measures how strongly each weight drives each
                  utterance's loss. The signed data-set term enters the predicted loss below.)
- ``fisher``    = mean_i g_i^2                 (empirical Fisher diagonal from per-utterance
                                                  gradients, never the square of a batch-mean gradient)
- ``obd``       = 1/2 * fisher * w^2           (Optimal Brain Damage saliency with the Fisher as
                                                  the diagonal Hessian)

Predicted loss increase of pruning a component at sparsity ``s`` (the weights ``R`` that
magnitude pruning removes, found by running :func:`asrprune.prune.prune_model` and restoring):
``first_order = sum_{j in R} -gbar_j * w_j`` (``gbar`` = mean gradient; setting ``w`` to 0 is a
step ``-w``), ``second_order = sum_{j in R} obd_j``, ``total = first_order + second_order``.
Both the loss and these terms are in units of the mean over utterances of ``L_i``.

Labels (``labels=``): ``"reference"`` (default) teacher-forces the reference transcript;
``"greedy"`` teacher-forces the model's own greedy transcript. The default is the reference
because the point of the measured ablation is to see what pruning does to *recognition*: only
reference labels can register a component whose pruning makes the output more correct (the
paper's "pruning as regularisation" claim), while the model's own transcript is by construction
close to its most likely output, so nearly every perturbation looks harmful against it. Greedy
labels are the better choice for data without trustworthy transcripts, or to measure fidelity
to the unpruned model.

Reference text form (``text_form=``): Whisper was trained on cased, punctuated text whose first
token carries a leading space (`` Hello``), and its loss is sharply higher for text in another
convention: an all-upper-case LibriSpeech reference splits into rare subword tokens, and the
loss and gradients then mostly measure "how to write in capitals". ``"whisper"`` (default)
therefore (1) collapses whitespace, (2) lower-cases references that contain no lower-case
letter and restores the pronoun ``I``, (3) upper-cases the first letter, and (4) prepends one
space. Punctuation is not invented (LibriSpeech and Earnings-22 references have none, LJ Speech
keeps its own). ``"raw"`` uses the text exactly as given (what the paper's code does).

Teacher forcing: decoder input = prefix tokens (``<|startoftranscript|>`` + ``<|lang|>`` +
``<|transcribe|>`` for multilingual models + ``<|notimestamps|>``) + text tokens; targets are
the same sequence shifted by one, ending with ``<|endoftext|>``; the loss covers only the text
and end-of-text targets (prefix targets are ignored).

Output directory (see :func:`write_outputs`): ``sensitivity.json``, CSV tables, one heatmap
PNG per diagnostic (layers x component kinds), ``labels.jsonl``, the accumulator checkpoint
``accumulators.safetensors`` (+ ``.json``) and ``ablation.jsonl``; every step resumes from these.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = [
    "LABEL_MODES",
    "TEXT_FORMS",
    "LOSS_REDUCTIONS",
    "DIAGNOSTICS",
    "PREDICTION_TERMS",
    "DEFAULT_GROUPS",
    "SensitivityOptions",
    "CalibrationExample",
    "GradientStats",
    "SensitivityResult",
    "ResumeMismatchError",
    "whisper_text_form",
    "prefix_token_ids",
    "teacher_forcing",
    "build_examples",
    "teacher_forced_loss",
    "accumulate_gradients",
    "predict_loss_change",
    "predict_loss_curve",
    "magnitude_keep_masks",
    "pruned_keep_masks",
    "Unit",
    "analysis_units",
    "unit_for_selector",
    "aggregate",
    "measure_ablation",
    "spearman_with_ci",
    "correlate",
    "prediction_check",
    "score_sensitivity",
    "write_outputs",
    "load_sensitivity_json",
]

LABEL_MODES = ("reference", "greedy")
LOSS_REDUCTIONS = ("sum", "mean")
TEXT_FORMS = ("whisper", "raw")
DIAGNOSTICS = ("gradient", "taylor", "fisher", "obd")
PREDICTION_TERMS = ("first_order", "second_order", "total")
# Groups ablated besides the per-layer components (names of components.py's named groups);
# a name the model lacks is skipped with a log line.
DEFAULT_GROUPS = (
    "encoder_self_attn",
    "encoder_ffn",
    "late_encoder",
    "decoder_self_attn",
    "cross_attn",
    "decoder_ffn",
    "early_decoder",
    "biases",
)
IGNORE_INDEX = -100
SCHEMA = "asrprune.sensitivity/1"
DEFAULT_PREDICTION_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

DEFINITIONS = {
    "gradient": "mean over utterances of |dL_i/dw|, L_i the teacher-forced loss of utterance i "
    "(batch 1; see loss_units)",
    "taylor": "mean over utterances of |w * dL_i/dw| = |w| * gradient (per-utterance absolute "
    "values averaged, not |w * mean gradient|)",
    "fisher": "empirical Fisher diagonal: mean over utterances of (dL_i/dw)^2",
    "obd": "Optimal Brain Damage saliency 0.5 * fisher * w^2",
    "first_order": "predicted loss change, first-order term: sum over the weights magnitude "
    "pruning removes of -mean_gradient * w",
    "second_order": "predicted loss change, second-order term: sum over the removed weights of "
    "0.5 * fisher * w^2 (= OBD)",
    "total": "first_order + second_order",
    "loss_delta": "measured change of the mean of L_i over the calibration "
    "utterances when only this component is magnitude-pruned at s (weights restored after)",
    "wer_delta": "measured change of calibration WER (fraction) when only this component is "
    "pruned at s (evaluation.evaluate, greedy)",
    "sum": "sum of the per-parameter diagnostic over the unit's parameters",
    "mean": "per-parameter mean over the unit's parameters (sum / n_params)",
    "minmax": "(mean - min) / (max - min) of the per-parameter means across the units of the "
    "same level (matrix level: across all parameter tensors, the authors' normalisation)",
    "loss_units": "mean over utterances of L_i; with loss_reduction 'sum' (default) L_i is the "
    "sequence NLL (sum of token cross-entropies over text + end-of-text targets, nats per "
    "utterance), with 'mean' the per-token mean (nats per token)",
}


class ResumeMismatchError(ValueError):
    """Files in the output directory were written for different inputs or options."""


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SensitivityOptions:
    """Options of a sensitivity run (checked once, here).

    Attributes:
        labels: ``"reference"`` or ``"greedy"`` (see the module docstring for the default).
        text_form: ``"whisper"`` or ``"raw"``: how reference text is written for teacher forcing.
        language: language token for multilingual models (``"en"``); ignored by ``.en`` models.
        task: ``"transcribe"`` or ``"translate"`` (multilingual models only).
        ablation_sparsities: sparsities of the measured ablation (empty: no ablation).
        prediction_sparsities: sparsities at which the predicted loss change is tabulated
            (the ablation sparsities are always added).
        groups: named component groups ablated besides the per-layer components.
        ablation_wer: also measure calibration WER per ablation (decoding; slow).
        checkpoint_every: write the accumulator checkpoint every this many utterances.
        n_bootstrap: bootstrap resamples (over components) for the Spearman intervals.
        seed: seed of the bootstrap.
        max_new_tokens: decoding limit for greedy labels and the WER ablation.
        cache_mb: memory budget for cached encoder states in the ablation.
        targets: selectors to analyse instead of the default units (one per component kind
            per layer, see :func:`analysis_units`).
        loss_reduction: per-utterance loss: ``"sum"`` (sequence NLL; default, see the module
            docstring) or ``"mean"`` (per-token mean, as HF's ``labels=`` loss).
    """

    labels: str = "reference"
    text_form: str = "whisper"
    language: str | None = "en"
    task: str = "transcribe"
    ablation_sparsities: tuple[float, ...] = (0.3, 0.5)
    prediction_sparsities: tuple[float, ...] = DEFAULT_PREDICTION_SPARSITIES
    groups: tuple[str, ...] = DEFAULT_GROUPS
    ablation_wer: bool = False
    checkpoint_every: int = 10
    n_bootstrap: int = 2000
    seed: int = 0
    max_new_tokens: int = 440
    cache_mb: float = 2048.0
    targets: tuple[str, ...] | None = None
    loss_reduction: str = "sum"

    def __post_init__(self) -> None:
        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {list(LABEL_MODES)}, got {self.labels!r}")
        if self.text_form not in TEXT_FORMS:
            raise ValueError(f"text_form must be one of {list(TEXT_FORMS)}, got {self.text_form!r}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {list(LOSS_REDUCTIONS)}, got {self.loss_reduction!r}")
        if self.task not in ("transcribe", "translate"):
            raise ValueError(f"task must be 'transcribe' or 'translate', got {self.task!r}")
        for what in ("ablation_sparsities", "prediction_sparsities"):
            values = tuple(getattr(self, what))
            for s in values:
                if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < float(s) <= 1.0:
                    raise ValueError(f"{what}: every sparsity must be a fraction in (0, 1], got {s!r}")
            object.__setattr__(self, what, tuple(sorted({float(s) for s in values})))
        object.__setattr__(self, "groups", tuple(self.groups))
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
            if not self.targets:
                raise ValueError("targets, when given, must name at least one selector")
        for what in ("checkpoint_every", "n_bootstrap", "max_new_tokens"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be a positive integer, got {value!r}")
        if not self.cache_mb >= 0:
            raise ValueError(f"cache_mb must be >= 0, got {self.cache_mb!r}")

    @property
    def all_prediction_sparsities(self) -> tuple[float, ...]:
        return tuple(sorted(set(self.prediction_sparsities) | set(self.ablation_sparsities)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# labels and teacher forcing
# ----------------------------------------------------------------------------------------------

_PRONOUN_I = re.compile(r"\bi\b")


def whisper_text_form(text: str) -> str:
    """Write a reference transcript the way Whisper's training targets look.

    Collapses whitespace; lower-cases a text with no lower-case letter (LibriSpeech's upper-case
    references) and restores the pronoun ``I`` (also in ``I'm``, ``I'll``); upper-cases the first
    letter; prepends one space (Whisper's first text token carries a leading space). Does not add
    punctuation.

    Args:
        text: reference transcript.

    Returns:
        The text in Whisper's form, ``""`` for an empty reference.
    """
    t = " ".join(text.split())
    if not t:
        return ""
    if not any(c.islower() for c in t) and any(c.isupper() for c in t):
        t = _PRONOUN_I.sub("I", t.lower())
    if t[0].islower():
        t = t[0].upper() + t[1:]
    return " " + t


def _is_multilingual(model) -> bool:
    flag = getattr(getattr(model, "generation_config", None), "is_multilingual", None)
    if flag is not None:
        return bool(flag)
    return int(model.config.vocab_size) >= 51865


def prefix_token_ids(model, tokenizer, *, language: str | None = "en", task: str = "transcribe") -> list[int]:
    """Whisper's decoder prompt for transcription without timestamps.

    Args:
        model: the Whisper model (multilingual or English-only decides the prompt).
        tokenizer: its tokenizer.
        language: language code for multilingual models (``"en"``).
        task: ``"transcribe"`` or ``"translate"``.

    Returns:
        ``[<|startoftranscript|>, (<|lang|>, <|task|>,) <|notimestamps|>]`` as ids.

    Raises:
        ValueError: a multilingual model without a language, or an unknown language token.
    """
    tokens = ["<|startoftranscript|>"]
    if _is_multilingual(model):
        if not language:
            raise ValueError("a multilingual model needs a language for teacher forcing (option language / --language)")
        tokens += [f"<|{language}|>", f"<|{task}|>"]
    tokens.append("<|notimestamps|>")
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
    unk = getattr(tokenizer, "unk_token_id", None)
    for tok, i in zip(tokens, ids):
        if i is None or (unk is not None and i == unk and tok != getattr(tokenizer, "unk_token", None)):
            raise ValueError(f"the tokenizer has no token {tok} (language {language!r}?)")
    return ids


def teacher_forcing(prefix: Sequence[int], text: Sequence[int], eot: int, *, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Decoder inputs and labels for teacher forcing one transcript.

    The full sequence is ``prefix + text + [eot]``; inputs are all but its last token, targets
    all but its first; targets that are prompt tokens (the first ``len(prefix) - 1``) are
    ``IGNORE_INDEX`` so that the loss covers the text and end-of-text only.

    Args:
        prefix: prompt ids (at least ``<|startoftranscript|>``).
        text: text token ids.
        eot: ``<|endoftext|>`` id.
        max_length: the decoder's maximum positions; longer text is truncated (eot kept).

    Returns:
        ``(decoder_input_ids, labels)``, two lists of equal length ``len(prefix) + len(text)``.
    """
    if not prefix:
        raise ValueError("teacher forcing needs at least the <|startoftranscript|> prompt token")
    text = list(text)
    if max_length is not None and len(prefix) + len(text) > max_length:
        text = text[: max(0, max_length - len(prefix))]
    seq = list(prefix) + text + [int(eot)]
    inputs = seq[:-1]
    labels = seq[1:]
    for i in range(len(prefix) - 1):
        labels[i] = IGNORE_INDEX
    return inputs, labels


@dataclass
class CalibrationExample:
    """One teacher-forced calibration utterance.

    Attributes:
        id: utterance id.
        input_features: log-mel features, shape ``(1, n_mels, frames)``.
        decoder_input_ids: shape ``(1, L)``, long.
        labels: shape ``(1, L)``, long; ``IGNORE_INDEX`` at prompt targets.
        text: the label text (reference in its text form, or the greedy transcript).
    """

    id: str
    input_features: Tensor
    decoder_input_ids: Tensor
    labels: Tensor
    text: str = ""

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def _features(processor, utt, dtype: torch.dtype, device) -> Tensor:
    from asrprune.manifests import load_audio

    audio = load_audio(utt, 16000)
    if len(audio) > 30 * 16000:
        # Whisper's features cover 30 s; the rest of the audio is cut, its transcript is not.
        log.warning("%s: %.1f s of audio, only the first 30 s are used; the label may run past it",
                    utt.id, len(audio) / 16000)
    feats = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    return feats.to(device=device, dtype=dtype)  # (1, n_mels, 3000)


def _greedy_text_ids(model, feats: Tensor, eot: int, *, language, task, max_new_tokens: int) -> list[int]:
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if _is_multilingual(model):
        kwargs.update(language=language, task=task)
    with torch.no_grad():
        out = model.generate(input_features=feats, **kwargs)
    seq = out.sequences if hasattr(out, "sequences") else out
    seq = [int(t) for t in seq[0].tolist()]
    # Prompt tokens (<|startoftranscript|>, language, task, <|notimestamps|>) have ids above
    # <|endoftext|>; the transcript runs from the first token below eot to the next eot.
    i = 0
    while i < len(seq) and seq[i] > eot:
        i += 1
    text = []
    for t in seq[i:]:
        if t == eot:
            break
        if t < eot:
            text.append(t)
    return text


def build_examples(
    model,
    processor,
    utterances: Sequence,
    *,
    options: SensitivityOptions | None = None,
    labels_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[CalibrationExample]:
    """Load audio, compute features and build teacher-forcing labels for each utterance.

    Args:
        model: Whisper model (its device and dtype are used for the features).
        processor: its ``WhisperProcessor``.
        utterances: ``manifests.Utterance`` objects.
        options: labels / text form / language (defaults when None).
        labels_path: ``labels.jsonl`` written as labels are made; greedy transcripts found there
            (same id and prompt) are reused, so they are decoded once per output directory.
        progress: tqdm bar.

    Returns:
        One :class:`CalibrationExample` per utterance, in order.

    Raises:
        manifests.AudioError: an unreadable audio file.
    """
    from tqdm.auto import tqdm

    options = options or SensitivityOptions()
    tok = processor.tokenizer
    param = next(model.parameters())
    prefix = prefix_token_ids(model, tok, language=options.language, task=options.task)
    eot = int(tok.convert_tokens_to_ids("<|endoftext|>"))
    max_len = int(model.config.max_target_positions)
    cached: dict[str, dict] = {}
    if labels_path is not None and Path(labels_path).is_file():
        for line in Path(labels_path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                if options.labels == "greedy" and row.get("labels") == "greedy" and row.get("prefix") == prefix:
                    cached[row["id"]] = row
    examples = []
    new_rows: list[dict] = []
    used_rows: list[dict] = []
    for utt in tqdm(utterances, desc="labels", disable=not progress, unit="utt"):
        feats = _features(processor, utt, param.dtype, param.device)
        row = cached.get(utt.id)
        if row is None:
            if options.labels == "reference":
                text = whisper_text_form(utt.text) if options.text_form == "whisper" else utt.text.strip()
                ids = [int(i) for i in tok.encode(text, add_special_tokens=False)]
            else:
                ids = _greedy_text_ids(model, feats, eot, language=options.language, task=options.task,
                                       max_new_tokens=options.max_new_tokens)
                text = tok.decode(ids)
            row = {"id": utt.id, "labels": options.labels, "text_form": options.text_form,
                   "prefix": prefix, "text": text, "text_ids": ids}
            new_rows.append(row)
        inputs, labels = teacher_forcing(prefix, row["text_ids"], eot, max_length=max_len)
        if len(inputs) < len(prefix) + len(row["text_ids"]):
            log.warning("%s: label truncated to the decoder's %d positions", utt.id, max_len)
        examples.append(CalibrationExample(
            id=utt.id,
            input_features=feats,
            decoder_input_ids=torch.tensor([inputs], dtype=torch.long, device=param.device),
            labels=torch.tensor([labels], dtype=torch.long, device=param.device),
            text=row["text"],
        ))
        used_rows.append(row)
        if labels_path is not None and new_rows and options.labels == "greedy":
            with open(labels_path, "a", encoding="utf-8") as f:  # decoding is slow: keep each one
                for r in new_rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        new_rows = []
    if labels_path is not None:  # exactly the labels of this run
        tmp = Path(str(labels_path) + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in used_rows), encoding="utf-8")
        os.replace(tmp, labels_path)
    return examples


# ----------------------------------------------------------------------------------------------
# loss and gradient accumulation
# ----------------------------------------------------------------------------------------------


def teacher_forced_loss(
    model,
    example: CalibrationExample,
    *,
    encoder_hidden_states: Tensor | None = None,
    reduction: str = "sum",
) -> Tensor:
    """Teacher-forced negative log-likelihood of one utterance (fp32 scalar).

    Args:
        model: ``WhisperForConditionalGeneration``.
        example: the utterance.
        encoder_hidden_states: precomputed encoder output ``(1, frames/2, d_model)``; when given
            the encoder is not run.
        reduction: ``"sum"`` over the labelled targets (text + eot): the sequence NLL
            ``-log p(y | x)``; ``"mean"``: divided by the number of targets.

    Returns:
        Scalar tensor.
    """
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(LOSS_REDUCTIONS)}, got {reduction!r}")
    kwargs: dict[str, Any] = {"decoder_input_ids": example.decoder_input_ids, "use_cache": False}
    if encoder_hidden_states is not None:
        from transformers.modeling_outputs import BaseModelOutput

        kwargs["encoder_outputs"] = BaseModelOutput(last_hidden_state=encoder_hidden_states)
    else:
        kwargs["input_features"] = example.input_features
    logits = model(**kwargs).logits  # (1, L, V)
    return F.cross_entropy(logits[0].float(), example.labels[0], ignore_index=IGNORE_INDEX, reduction=reduction)


@dataclass
class GradientStats:
    """Running fp32 sums of per-utterance gradients, per parameter name.

    Attributes:
        sum_abs: name -> sum_i |g_i| (parameter's shape, fp32).
        sum: name -> sum_i g_i.
        sum_sq: name -> sum_i g_i^2.
        n: utterances accumulated.
        ids: their ids, in order.
        losses: their teacher-forced losses (with gradients enabled).
        wall_s: wall time spent accumulating, summed over resumed sessions.
    """

    sum_abs: dict[str, Tensor]
    sum: dict[str, Tensor]
    sum_sq: dict[str, Tensor]
    n: int = 0
    ids: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @classmethod
    def zeros(cls, model) -> "GradientStats":
        def z():
            return {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in model.named_parameters()}

        return cls(z(), z(), z())

    def add(self, grads: Mapping[str, Tensor | None]) -> None:
        """Add one utterance's gradients (None = zero gradient)."""
        for name, g in grads.items():
            if g is None:
                continue
            g = g.detach().to(torch.float32)
            self.sum_abs[name].add_(g.abs())
            self.sum[name].add_(g)
            self.sum_sq[name].addcmul_(g, g)

    def _mean(self, d: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.n == 0:
            raise ValueError("no utterance has been accumulated")
        return {k: v / self.n for k, v in d.items()}

    def mean_abs_grad(self) -> dict[str, Tensor]:
        return self._mean(self.sum_abs)

    def mean_grad(self) -> dict[str, Tensor]:
        return self._mean(self.sum)

    def fisher(self) -> dict[str, Tensor]:
        return self._mean(self.sum_sq)

    def diagnostics(self, weights: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        """Per-parameter diagnostics (fp32, parameter shapes) given the weights they were taken at.

        Returns:
            ``{"gradient"|"taylor"|"fisher"|"obd": {name: Tensor}}`` (see the module docstring).
        """
        g = self.mean_abs_grad()
        fisher = self.fisher()
        w = {k: weights[k].detach().to(torch.float32) for k in g}
        return {
            "gradient": g,
            "taylor": {k: w[k].abs() * g[k] for k in g},
            "fisher": fisher,
            "obd": {k: 0.5 * fisher[k] * w[k] * w[k] for k in g},
        }

    # checkpoint -------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, meta: Mapping | None = None) -> None:
        """Write ``path`` (safetensors) and ``path.json`` atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {}
        for prefix, d in (("sum_abs", self.sum_abs), ("sum", self.sum), ("sum_sq", self.sum_sq)):
            for k, v in d.items():
                tensors[f"{prefix}/{k}"] = v.detach().contiguous().cpu()
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        info = {"n": self.n, "ids": self.ids, "losses": self.losses, "wall_s": self.wall_s, **(dict(meta or {}))}
        tmpj = Path(str(path) + ".json.tmp")
        tmpj.write_text(json.dumps(info), encoding="utf-8")
        os.replace(tmpj, Path(str(path) + ".json"))

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> tuple["GradientStats", dict]:
        from safetensors.torch import load_file

        path = Path(path)
        tensors = load_file(str(path), device=str(device))
        info = json.loads(Path(str(path) + ".json").read_text(encoding="utf-8"))
        parts: dict[str, dict[str, Tensor]] = {"sum_abs": {}, "sum": {}, "sum_sq": {}}
        for key, v in tensors.items():
            prefix, name = key.split("/", 1)
            parts[prefix][name] = v
        stats = cls(parts["sum_abs"], parts["sum"], parts["sum_sq"], int(info["n"]), list(info["ids"]), list(info["losses"]),
                    float(info.get("wall_s") or 0.0))
        return stats, info


def accumulate_gradients(
    model,
    examples: Sequence[CalibrationExample],
    *,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    key: str = "",
    reduction: str = "sum",
    progress: bool = True,
) -> GradientStats:
    """Accumulate per-utterance gradient statistics, one utterance per backward pass.

    Memory: three fp32 copies of the parameters (sums of |g|, g, g^2) plus one gradient; no
    per-utterance gradient is stored. Parameters that were frozen (``requires_grad=False``) get
    gradients too, for the duration of the call.

    Args:
        model: Whisper model (eval mode is kept: no dropout).
        examples: calibration examples (indexed in order; a resumed run skips the first ``n``).
        checkpoint: file for the resumable checkpoint (``accumulators.safetensors``); when it
            exists with the same ``key`` and ids, accumulation continues after its last utterance.
        checkpoint_every: checkpoint after this many utterances (and at the end).
        key: identifies model + labels + options; a checkpoint with another key is an error.
        reduction: per-utterance loss, ``"sum"`` (sequence NLL) or ``"mean"`` (per token).
        progress: tqdm bar.

    Returns:
        :class:`GradientStats` over all examples.

    Raises:
        ResumeMismatchError: the checkpoint was written for another key or other utterances.
    """
    from tqdm.auto import tqdm

    ids = [ex.id for ex in examples]
    stats = None
    if checkpoint is not None and Path(checkpoint).is_file() and Path(str(checkpoint) + ".json").is_file():
        stats, info = GradientStats.load(checkpoint, device=next(model.parameters()).device)
        if info.get("key") != key:
            raise ResumeMismatchError(
                f"{checkpoint} was written for other inputs or options (key {info.get('key')!r}, "
                f"now {key!r}); use another output directory or restart"
            )
        if stats.ids != ids[: stats.n]:
            raise ResumeMismatchError(f"{checkpoint} holds other utterances than the calibration set given now")
        log.info("resuming gradient accumulation after %d of %d utterances", stats.n, len(examples))
    if stats is None:
        stats = GradientStats.zeros(model)
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    model.eval()
    try:
        for p in params.values():
            p.requires_grad_(True)
        bar = tqdm(total=len(examples), initial=stats.n, desc="gradients", disable=not progress, unit="utt")
        for i in range(stats.n, len(examples)):
            t0 = time.perf_counter()
            ex = examples[i]
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = teacher_forced_loss(model, ex, reduction=reduction)
                loss.backward()
            stats.add({n: p.grad for n, p in params.items()})
            stats.n += 1
            stats.ids.append(ex.id)
            stats.losses.append(float(loss.detach()))
            stats.wall_s += time.perf_counter() - t0
            bar.update(1)
            if checkpoint is not None and (stats.n % checkpoint_every == 0 or stats.n == len(examples)):
                stats.save(checkpoint, {"key": key})
        bar.close()
        if checkpoint is not None and not Path(checkpoint).is_file():
            stats.save(checkpoint, {"key": key})
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    return stats


# ----------------------------------------------------------------------------------------------
# predicted loss change of magnitude pruning
# ----------------------------------------------------------------------------------------------


def predict_loss_change(
    weights: Mapping[str, Tensor],
    mean_grad: Mapping[str, Tensor],
    fisher: Mapping[str, Tensor],
    keep_masks: Mapping[str, Tensor],
) -> dict[str, float]:
    """Taylor prediction of the loss change when the weights outside ``keep_masks`` are zeroed.

    With ``R`` the removed entries (keep mask False): ``first_order = sum_R -gbar * w``,
    ``second_order = sum_R 0.5 * F * w^2``, ``total = first_order + second_order``.

    Args:
        weights: name -> weights before pruning (shape ``S_name``).
        mean_grad: name -> mean gradient over utterances (``S_name``).
        fisher: name -> empirical Fisher diagonal (``S_name``).
        keep_masks: name -> bool keep-mask (``S_name``; True = kept) for the pruned tensors.

    Returns:
        ``{"first_order", "second_order", "total", "n_removed"}`` (sums in float64).
    """
    first = 0.0
    second = 0.0
    n_removed = 0
    for name, keep in keep_masks.items():
        removed = ~keep.to(torch.bool)
        w = weights[name].detach().to(torch.float64)[removed]
        first += float(-(mean_grad[name].to(torch.float64)[removed] * w).sum())
        second += float((0.5 * fisher[name].to(torch.float64)[removed] * w * w).sum())
        n_removed += int(removed.sum())
    return {"first_order": first, "second_order": second, "total": first + second, "n_removed": n_removed}


def predict_loss_curve(
    weights: Mapping[str, Tensor],
    mean_grad: Mapping[str, Tensor],
    fisher: Mapping[str, Tensor],
    names: Sequence[str],
    sparsities: Sequence[float],
) -> dict[str, dict[str, float]]:
    """:func:`predict_loss_change` of magnitude pruning ``names`` (pooled) at several sparsities.

    One stable sort of ``|w|`` over the concatenated tensors (ties: lower flat index first, the
    rule of ``masks.pooled_keep_masks``) and cumulative sums of the per-weight terms give every
    sparsity at once.

    Args:
        weights, mean_grad, fisher: name -> tensor (parameter shapes).
        names: parameters pruned together (one threshold), e.g. a unit's ``params``.
        sparsities: fractions in [0, 1].

    Returns:
        ``{f"{s:g}": {"first_order", "second_order", "total", "n_removed"}}``.
    """
    from asrprune.masks import n_to_prune

    w = torch.cat([weights[n].detach().reshape(-1).to(torch.float64) for n in names])
    g = torch.cat([mean_grad[n].reshape(-1).to(torch.float64) for n in names])
    f = torch.cat([fisher[n].reshape(-1).to(torch.float64) for n in names])
    order = torch.sort(w.abs().to(torch.float32) if weights[names[0]].dtype != torch.float64 else w.abs(), stable=True).indices
    first = torch.cumsum((-g * w)[order], 0)
    second = torch.cumsum((0.5 * f * w * w)[order], 0)
    del g, f, order
    out = {}
    for sp in sparsities:
        k = n_to_prune(w.numel(), sp)
        a = float(first[k - 1]) if k else 0.0
        b = float(second[k - 1]) if k else 0.0
        out[f"{sp:g}"] = {"first_order": a, "second_order": b, "total": a + b, "n_removed": k}
    return out


class _Restore:
    """Context manager: snapshot some parameters, restore them bit-exactly on exit."""

    def __init__(self, model, names: Iterable[str]):
        self.params = dict(model.named_parameters())
        self.saved = {n: self.params[n].detach().clone() for n in names}

    def __enter__(self) -> "_Restore":
        return self

    def changed_keep_masks(self) -> dict[str, Tensor]:
        """Keep-masks of what pruning did: False where a weight was zeroed (or already zero)."""
        masks = {}
        for n, old in self.saved.items():
            new = self.params[n].detach()
            diff = new != old
            if bool((diff & (new != 0)).any()):
                raise RuntimeError(f"pruning changed {n} to non-zero values; expected zeros only")
            masks[n] = ~((new == 0) & (diff | (old == 0)))
        return masks

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for n, old in self.saved.items():
                self.params[n].copy_(old)


def _plan(selector: str, sparsity: float):
    from asrprune.config import PlanEntry, PrunePlan

    return PrunePlan(entries=(PlanEntry(selector=selector, sparsity=float(sparsity)),))


def magnitude_keep_masks(model, names: Sequence[str], sparsity: float) -> dict[str, Tensor]:
    """Keep-masks of magnitude pruning pooled over ``names`` (what ``prune_model`` does for a
    plan entry of scope ``component``), without touching the model.

    Args:
        model: the model (weights are read only).
        names: parameter names of one unit.
        sparsity: fraction in [0, 1].

    Returns:
        name -> bool keep-mask (parameter shape).
    """
    from asrprune.masks import pooled_keep_masks
    from asrprune.prune import magnitude_scorer

    params = dict(model.named_parameters())
    scores = [magnitude_scorer(n, params[n]) for n in names]
    return dict(zip(names, pooled_keep_masks(scores, sparsity)))


def pruned_keep_masks(model, selector: str, sparsity: float) -> tuple[dict[str, Tensor], dict]:
    """Run ``prune_model`` for one selector, record what it removed, restore the weights.

    Args:
        model: Whisper model (unchanged on return, bit-exactly).
        selector: unit id or group (anything ``components.select_parameters`` accepts).
        sparsity: fraction in [0, 1].

    Returns:
        ``(keep_masks, prune_result_dict)``; keep-masks per selected parameter, False where the
        weight is zero after pruning (weights that were already zero count as removed: their
        contribution to every predicted term is 0).
    """
    from asrprune.components import select_parameters
    from asrprune.prune import prune_model

    names = select_parameters(model, selector)
    with _Restore(model, names) as snap:
        result = prune_model(model, _plan(selector, sparsity))
        masks = snap.changed_keep_masks()
    return masks, result.to_dict()


# ----------------------------------------------------------------------------------------------
# analysis units: one per component kind per layer (+ the layer-less parts)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """A set of parameters analysed and ablated together.

    Attributes:
        id: a selector (``encoder.layers.3.self_attn``, ``decoder.embed_tokens``, a group name).
        kind: ``components.ComponentKind`` value shared by its components (or ``"mixed"``).
        side: ``"encoder"``, ``"decoder"``, ``"model"`` or ``"mixed"``.
        layer: layer index when all its components are in one layer, else None.
        category: ``"linear"``, ``"norm"``, ``"conv"``, ``"embedding"``, ``"other"`` or ``"mixed"``.
        params: the parameter names the selector picks (what pruning it touches).
    """

    id: str
    kind: str
    side: str
    layer: int | None
    category: str
    params: tuple[str, ...]


def _unit_part(c) -> str:
    head = c.part[0] if c.part else c.id.rsplit(".", 1)[-1]
    if c.layer is not None:
        if head in ("fc1", "fc2"):
            return "ffn"
        if head.endswith("layer_norm"):
            return "layer_norms"
        return head
    if head in ("conv1", "conv2"):
        return "conv"
    return head


def unit_for_selector(model, selector: str) -> Unit:
    """Describe a selector as a :class:`Unit` (kind, side, layer from its components).

    Raises:
        components.SelectorError: the selector matches nothing.
    """
    from asrprune.components import select_components, select_parameters

    names = tuple(select_parameters(model, selector))
    comps = select_components(model, selector)

    def one(values, default):
        values = set(values)
        return values.pop() if len(values) == 1 else default

    return Unit(
        id=selector,
        kind=one((_kind_str(c.kind) for c in comps), "mixed"),
        side=one((c.side for c in comps), "mixed"),
        layer=one((c.layer for c in comps), None),
        category=one((c.category for c in comps), "mixed"),
        params=names,
    )


def analysis_units(model) -> list[Unit]:
    """The default units: each component kind in each layer, plus the layer-less parts.

    E.g. ``encoder.layers.0.self_attn`` (q, k, v, out weights), ``encoder.layers.0.ffn`` (fc1,
    fc2), ``encoder.layers.0.layer_norms``, ``decoder.layers.0.encoder_attn``, ``encoder.conv``,
    ``encoder.embed_positions``, ``decoder.embed_tokens``, ``decoder.layer_norm``. The units
    are disjoint and cover every weight; biases are selected by none of them (the ``biases``
    group covers them), following the selector rule of ``components``.

    Returns:
        Units in model order.
    """
    from asrprune.components import SelectorError, list_components

    seen: dict[str, list] = {}
    for c in list_components(model):
        p = _unit_part(c)
        if c.side not in ("encoder", "decoder"):
            uid = p if p == "proj_out" else c.id
        elif c.layer is not None:
            uid = f"{c.side}.layers.{c.layer}.{p}"
        else:
            uid = f"{c.side}.{p}"
        seen.setdefault(uid, []).append(c)
    units = []
    for uid, comps in seen.items():
        try:
            unit = unit_for_selector(model, uid)
        except SelectorError:
            unit = unit_for_selector(model, "+".join(c.id for c in comps))
        if unit.params:
            units.append(unit)
    return units


# ----------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------


def aggregate(
    param_sums: Mapping[str, Mapping[str, float]],
    numels: Mapping[str, int],
    units: Mapping[str, Sequence[str]],
) -> dict[str, dict[str, dict[str, float]]]:
    """Aggregate per-parameter diagnostics to units (matrices, components, layers, kinds).

    Args:
        param_sums: diagnostic -> parameter name -> sum of the diagnostic over that tensor.
        numels: parameter name -> number of elements.
        units: unit id -> parameter names (a parameter may be in several units).

    Returns:
        unit id -> diagnostic -> ``{"sum", "mean", "minmax"}`` where ``mean`` is per parameter
        and ``minmax`` normalises ``mean`` to [0, 1] across the given units (0.0 when all equal).
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for unit, names in units.items():
        n = sum(int(numels[p]) for p in names)
        out[unit] = {}
        for diag, sums in param_sums.items():
            total = float(sum(sums[p] for p in names))
            out[unit][diag] = {"sum": total, "mean": total / n if n else float("nan")}
    for diag in param_sums:
        means = [v[diag]["mean"] for v in out.values() if math.isfinite(v[diag]["mean"])]
        lo, hi = (min(means), max(means)) if means else (0.0, 0.0)
        for v in out.values():
            m = v[diag]["mean"]
            v[diag]["minmax"] = (m - lo) / (hi - lo) if hi > lo and math.isfinite(m) else 0.0
    return out


# ----------------------------------------------------------------------------------------------
# measured ablation
# ----------------------------------------------------------------------------------------------


def _module_prefix(model, module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name + "." if name else ""
    raise RuntimeError("module not found in model")


class _LossEvaluator:
    """Mean teacher-forced loss over the examples, reusing unpruned encoder states.

    A component inside the decoder leaves the encoder output unchanged; one inside encoder layer
    ``k`` leaves the inputs of layers ``0..k`` unchanged. Those states are computed once (within
    ``cache_mb``) and the forward pass starts from them.
    """

    def __init__(self, model, examples: Sequence[CalibrationExample], *, cache_mb: float, progress: bool,
                 reduction: str = "sum"):
        from tqdm.auto import tqdm

        self.model = model
        self.reduction = reduction
        self.examples = list(examples)
        self.encoder = model.get_encoder()
        self.enc_prefix = _module_prefix(model, self.encoder)
        self.dec_prefix = _module_prefix(model, model.get_decoder())
        layers_prefix = self.enc_prefix + "layers."
        self._layer_re = re.compile(re.escape(layers_prefix) + r"(\d+)\.")
        self._final_norm = self.enc_prefix + "layer_norm."
        n_layers = len(self.encoder.layers)
        per_state = None
        self.layer_inputs: list[list[Tensor]] | None = None
        self.outputs: list[Tensor] | None = None
        budget = cache_mb * 2**20
        inputs: list[list[Tensor]] = []
        outputs: list[Tensor] = []
        losses = []
        captured: list[Tensor] = []
        # inputs of every encoder layer and of the final layer norm (index n_layers)
        hooks = [mod.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
                 for mod in [*self.encoder.layers, self.encoder.layer_norm]]
        keep_layers = keep_out = True
        try:
            with torch.no_grad():
                for ex in tqdm(self.examples, desc="baseline loss", disable=not progress, unit="utt"):
                    captured.clear()
                    h = self.encoder(ex.input_features).last_hidden_state
                    if per_state is None:
                        per_state = h.numel() * h.element_size()
                        n = len(self.examples)
                        keep_out = n * per_state <= budget
                        keep_layers = n * per_state * (n_layers + 2) <= budget
                    if keep_layers:
                        inputs.append(list(captured))
                    if keep_out:
                        outputs.append(h)
                    losses.append(float(teacher_forced_loss(self.model, ex, encoder_hidden_states=h, reduction=reduction)))
        finally:
            for hk in hooks:
                hk.remove()
        if keep_layers and inputs and n_layers:
            # The resumed pass must equal the full encoder bit for bit, else do not use it.
            with torch.no_grad():
                ok = len(inputs[0]) == n_layers + 1 and all(
                    torch.equal(self._encoder_from(k, inputs[0][k]), outputs[0]) for k in (0, n_layers))
            if ok:
                self.layer_inputs = inputs
            else:
                log.warning("encoder layer-resume does not reproduce the encoder; layer states not cached")
        if keep_out:
            self.outputs = outputs
        self.baseline_losses = losses
        self.baseline = float(np.mean(losses)) if losses else float("nan")
        log.info("loss cache: encoder outputs %s, layer inputs %s", self.outputs is not None, self.layer_inputs is not None)

    def _encoder_from(self, k: int, h: Tensor) -> Tensor:
        for layer in self.encoder.layers[k:]:
            out = layer(h, None)
            h = out[0] if isinstance(out, tuple) else out
        return self.encoder.layer_norm(h)

    def start_point(self, names: Iterable[str]) -> str | int | None:
        """Where the forward pass must start for a set of changed parameters.

        Returns:
            ``"decoder"`` (encoder output unchanged), an encoder layer index ``k`` (the inputs of
            layers ``0..k`` unchanged; ``k = n_layers`` means only the final layer norm), or None
            (full forward pass).
        """
        names = list(names)
        enc_layers = []
        for n in names:
            if n.startswith(self.enc_prefix):
                m = self._layer_re.match(n)
                if m is not None:
                    enc_layers.append(int(m.group(1)))
                elif n.startswith(self._final_norm):
                    enc_layers.append(len(self.encoder.layers))
                else:
                    return None
            elif not (n.startswith(self.dec_prefix) or n.startswith("proj_out.")):
                return None
        return min(enc_layers) if enc_layers else "decoder"

    def losses(self, names: Iterable[str]) -> list[float]:
        start = self.start_point(names)
        out = []
        with torch.no_grad():
            for i, ex in enumerate(self.examples):
                h = None
                if start == "decoder" and self.outputs is not None:
                    h = self.outputs[i]
                elif isinstance(start, int) and self.layer_inputs is not None:
                    h = self._encoder_from(start, self.layer_inputs[i][start])
                out.append(float(teacher_forced_loss(self.model, ex, encoder_hidden_states=h, reduction=self.reduction)))
        return out


def _target_key(target: str, sparsity: float) -> str:
    return f"{target}@{sparsity:g}"


def measure_ablation(
    model,
    examples: Sequence[CalibrationExample],
    targets: Sequence[str],
    sparsities: Sequence[float],
    *,
    mean_grad: Mapping[str, Tensor] | None = None,
    fisher: Mapping[str, Tensor] | None = None,
    results_path: str | os.PathLike | None = None,
    key: str = "",
    cache_mb: float = 2048.0,
    wer: Callable[[str], float] | None = None,
    reduction: str = "sum",
    progress: bool = True,
) -> dict:
    """Magnitude-prune each target alone at each sparsity and measure the calibration loss.

    The weights are restored bit-exactly after each ablation (a snapshot of the selected
    parameters), and the model's fingerprint is checked at the end.

    Args:
        model: Whisper model.
        examples: calibration examples (never test data).
        targets: selectors (component ids, groups).
        sparsities: fractions in (0, 1].
        mean_grad, fisher: per-parameter statistics; when given, each row also holds the
            predicted loss change computed from the weights this very pruning removed.
        results_path: ``ablation.jsonl``; rows are appended as they finish and rows with the same
            ``key`` are reused on a rerun.
        key: identifies model + labels; rows with another key are ignored.
        cache_mb: memory budget for cached encoder states.
        wer: optional callable ``run_name -> WER fraction`` evaluated on the current (pruned)
            model; ``run_name`` is ``"baseline"`` or ``"<target>@<s>"``.
        reduction: per-utterance loss (``"sum"``: sequence NLL, ``"mean"``: per token).
        progress: tqdm bars.

    Returns:
        ``{"baseline_loss", "baseline_losses", "baseline_wer", "rows": [...], "compute_s"}``
        (``compute_s``: wall time of the baseline pass and of every row, over resumed sessions); a row has
        ``target, sparsity, loss, loss_delta, loss_deltas`` (per utterance), ``n_removed,
        measured_sparsity, predicted`` (or None), ``wer, wer_delta, start`` (where the forward
        pass started), ``wall_s``.
    """
    from tqdm.auto import tqdm

    from asrprune.components import select_parameters
    from asrprune.prune import prune_model

    done: dict[str, dict] = {}
    if results_path is not None and Path(results_path).is_file():
        for line in Path(results_path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("key") == key:
                    done[_target_key(row["target"], row["sparsity"])] = row
    todo = [(t, float(s)) for t in targets for s in sparsities if _target_key(t, float(s)) not in done]
    fingerprint = _fingerprint(model)
    evaluator = None
    baseline_losses = None
    baseline_wer = None
    baseline_row = done.get(_target_key("__baseline__", 0.0))
    if todo or baseline_row is None:
        t0 = time.perf_counter()
        evaluator = _LossEvaluator(model, examples, cache_mb=cache_mb, progress=progress, reduction=reduction)
        baseline_losses = evaluator.baseline_losses
    if baseline_row is not None and baseline_losses is not None:
        if not np.allclose(baseline_row["losses"], baseline_losses, rtol=1e-5, atol=1e-6):
            log.warning("the recomputed baseline loss differs from %s; earlier rows were measured against another baseline", results_path)
    if baseline_row is None:
        if wer is not None:
            baseline_wer = wer("baseline")
        baseline_row = {"key": key, "target": "__baseline__", "sparsity": 0.0, "losses": baseline_losses,
                        "loss": float(np.mean(baseline_losses)), "wer": baseline_wer,
                        "wall_s": time.perf_counter() - t0}
        _append_jsonl(results_path, baseline_row)
    baseline_losses = baseline_row["losses"]
    baseline = float(np.mean(baseline_losses))
    baseline_wer = baseline_row.get("wer")
    for target, s in tqdm(todo, desc="ablation", disable=not progress, unit="run"):
        t0 = time.perf_counter()
        names = select_parameters(model, target)
        with _Restore(model, names) as snap:
            result = prune_model(model, _plan(target, s))
            masks = snap.changed_keep_masks()
            pred = predict_loss_change(snap.saved, mean_grad, fisher, masks) if mean_grad is not None and fisher is not None else None
            losses = evaluator.losses(names)
            w = wer(_target_key(target, s)) if wer is not None else None
        row = {
            "key": key,
            "target": target,
            "sparsity": s,
            "loss": float(np.mean(losses)),
            "loss_delta": float(np.mean(losses)) - baseline,
            "loss_deltas": [a - b for a, b in zip(losses, baseline_losses)],
            "n_removed": int(sum(int((~m).sum()) for m in masks.values())),
            "measured_sparsity": _measured(result),
            "predicted": pred,
            "wer": w,
            "wer_delta": (w - baseline_wer) if (w is not None and baseline_wer is not None) else None,
            "start": str(evaluator.start_point(names)),
            "wall_s": time.perf_counter() - t0,
        }
        _append_jsonl(results_path, row)
        done[_target_key(target, s)] = row
    if _fingerprint(model) != fingerprint:
        raise RuntimeError("the model's weights changed during the ablation; restore failed")
    rows = [done[_target_key(t, float(s))] for t in targets for s in sparsities]
    compute = float(baseline_row.get("wall_s") or 0.0) + sum(float(r.get("wall_s") or 0.0) for r in rows)
    return {"baseline_loss": baseline, "baseline_losses": baseline_losses, "baseline_wer": baseline_wer,
            "rows": rows, "compute_s": compute}


def _measured(result) -> float | None:
    d = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    for k in ("entries",):
        entries = d.get(k)
        if isinstance(entries, list) and entries and isinstance(entries[0], dict):
            for kk in ("measured_sparsity", "sparsity_measured", "sparsity"):
                if kk in entries[0]:
                    return float(entries[0][kk])
    return None


def _append_jsonl(path, row: Mapping) -> None:
    if path is None:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _fingerprint(model) -> str:
    try:
        from asrprune.models import model_fingerprint

        return model_fingerprint(model)
    except ImportError:  # pragma: no cover - models.py is part of the package
        h = hashlib.sha256()
        for n, p in model.named_parameters():
            h.update(n.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# correlations
# ----------------------------------------------------------------------------------------------


def check_plans(
    model,
    examples: Sequence[CalibrationExample],
    plans: Mapping[str, Any],
    *,
    loss_reduction: str = "sum",
    predicted: Mapping[str, float] | None = None,
) -> dict:
    """Teacher-forced calibration loss of whole pruning plans: is damage additive?

    The allocator adds single-component damages. This measures what a whole plan does to the
    same loss on the same calibration data, so a study can say how far the sum is from the truth
    (on whisper base at 40% of the linear weights it was 3.2 predicted against 9.3 measured
    nats per utterance).

    Args:
        model: the unpruned model (restored bit-exactly before returning).
        examples: calibration examples (:func:`build_examples`; never evaluation data).
        plans: name -> :class:`asrprune.config.PrunePlan`.
        loss_reduction: per-utterance loss, as the sensitivity run used (``sum`` or ``mean``).
        predicted: name -> the allocator's predicted damage, copied into the result.

    Returns:
        ``{"n_utterances", "loss_reduction", "baseline_loss", "plans": {name: {"plan",
        "loss", "loss_delta", "predicted_damage", "sparsity_linear", "sparsity_all"}}}``; losses
        are means over utterances of the per-utterance loss, in nats.
    """
    from asrprune.prune import prune_model

    def mean_loss() -> float:
        with torch.inference_mode():
            return float(np.mean([float(teacher_forced_loss(model, e, reduction=loss_reduction)) for e in examples]))

    base = mean_loss()
    out = {"n_utterances": len(examples), "loss_reduction": loss_reduction, "baseline_loss": base, "plans": {}}
    names = [n for n, _ in model.named_parameters()]
    for name, plan in plans.items():
        with _Restore(model, names):
            res = prune_model(model, plan)
            loss = mean_loss()
        out["plans"][name] = {
            "plan": plan.to_text(),
            "loss": loss,
            "loss_delta": loss - base,
            "predicted_damage": None if not predicted or predicted.get(name) is None else float(predicted[name]),
            "sparsity_linear": res.model.linear_weights.sparsity,
            "sparsity_all": res.model.all_parameters.sparsity,
        }
    return out


def spearman_with_ci(
    x: Sequence[float],
    y: Sequence[float],
    *,
    n_bootstrap: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Spearman rank correlation with a percentile bootstrap interval over the pairs.

    Args:
        x, y: paired values (non-finite pairs are dropped).
        n_bootstrap: resamples of the pairs (with replacement).
        seed: numpy seed.
        confidence: interval coverage.

    Returns:
        ``{"rho", "p", "ci": [low, high], "n"}``; NaN where fewer than 3 pairs or a constant
        side make the correlation undefined.
    """
    from scipy import stats as sps

    xa = np.asarray(x, dtype=float)
    ya = np.asarray(y, dtype=float)
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    n = int(len(xa))
    nan = float("nan")
    if n < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return {"rho": nan, "p": nan, "ci": [nan, nan], "n": n}
    res = sps.spearmanr(xa, ya)
    rho, p = float(res.statistic), float(res.pvalue)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_bootstrap, n))
    rx = sps.rankdata(xa[idx], axis=1)
    ry = sps.rankdata(ya[idx], axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = (rx * ry).sum(axis=1) / den
    boots = boots[np.isfinite(boots)]
    alpha = (1.0 - confidence) / 2
    ci = [float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))] if len(boots) else [nan, nan]
    return {"rho": rho, "p": p, "ci": ci, "n": n}


def correlate(components: Sequence[Mapping], sparsities: Sequence[float], *, n_bootstrap: int, seed: int) -> list[dict]:
    """Spearman correlations of every diagnostic / prediction with the measured ablation changes.

    Computed over two populations: ``"all"`` units, and ``"linear"`` units only (attention and
    FFN matrices, what pruning plans mostly touch; layer norms and embeddings dominate the
    ranks of ``"all"``).

    Args:
        components: component rows of ``sensitivity.json`` (with ``diagnostics``, ``predicted``,
            ``ablation``); components that pruning leaves untouched at ``s`` are left out.
        sparsities: ablation sparsities.
        n_bootstrap, seed: bootstrap settings.

    Returns:
        Rows ``{"population", "predictor", "target", "sparsity", "rho", "p", "ci", "n"}``.
    """
    rows = []
    populations = {"all": list(components), "linear": [c for c in components if c.get("linear")]}
    for population, members in populations.items():
        for s in sparsities:
            key = f"{s:g}"
            use = [c for c in members if key in c.get("ablation", {}) and c["ablation"][key].get("n_removed", 1) > 0]
            if not use:
                continue
            predictors: dict[str, list[float]] = {}
            for diag in DIAGNOSTICS:
                for agg in ("mean", "sum"):
                    predictors[f"{diag}.{agg}"] = [c["diagnostics"][diag][agg] for c in use]
            for term in PREDICTION_TERMS:
                predictors[f"predicted.{term}"] = [c["predicted"].get(key, {}).get(term, float("nan")) for c in use]
            for target in ("loss_delta", "wer_delta"):
                ys = [c["ablation"][key].get(target) for c in use]
                if all(y is None for y in ys):
                    continue
                ys = [float("nan") if y is None else float(y) for y in ys]
                for name, xs in predictors.items():
                    r = spearman_with_ci(xs, ys, n_bootstrap=n_bootstrap, seed=seed)
                    rows.append({"population": population, "predictor": name, "target": target, "sparsity": s, **r})
    return rows


def prediction_check(components: Sequence[Mapping], sparsities: Sequence[float]) -> list[dict]:
    """How well the predicted loss changes hold in absolute terms (not only in rank).

    Args:
        components: component rows with ``predicted`` and ``ablation``.
        sparsities: ablation sparsities.

    Returns:
        One row per sparsity and predicted term: ``n``, ``median_ratio`` (median over components
        of measured / predicted), ``sign_agreement`` (fraction where both have the same sign),
        ``within_2x`` (fraction with 0.5 <= measured / predicted <= 2) and ``pearson_log``
        (correlation of log10|measured| with log10|predicted|).
    """
    rows = []
    for sp in sparsities:
        k = f"{sp:g}"
        use = [c for c in components if k in c.get("ablation", {}) and c["ablation"][k].get("n_removed", 1) > 0
               and c["ablation"][k].get("loss_delta") is not None]
        for term in PREDICTION_TERMS:
            m = np.array([float(c["ablation"][k]["loss_delta"]) for c in use])
            pr = np.array([float(c["predicted"].get(k, {}).get(term, float("nan"))) for c in use])
            ok = np.isfinite(m) & np.isfinite(pr) & (pr != 0)
            m, pr = m[ok], pr[ok]
            n = int(len(m))
            if n == 0:
                rows.append({"sparsity": sp, "predicted": term, "n": 0})
                continue
            ratio = m / pr
            nz = (m != 0)
            pearson = float("nan")
            if nz.sum() >= 3:
                lm, lp = np.log10(np.abs(m[nz])), np.log10(np.abs(pr[nz]))
                if np.ptp(lm) > 0 and np.ptp(lp) > 0:
                    pearson = float(np.corrcoef(lm, lp)[0, 1])
            rows.append({
                "sparsity": sp, "predicted": term, "n": n,
                "median_ratio": float(np.median(ratio)),
                "sign_agreement": float(np.mean(np.sign(m) == np.sign(pr))),
                "within_2x": float(np.mean((ratio >= 0.5) & (ratio <= 2.0))),
                "pearson_log": pearson,
            })
    return rows


# ----------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------


@dataclass
class SensitivityResult:
    """Everything ``sensitivity.json`` holds (``data`` is that JSON object)."""

    data: dict

    @property
    def components(self) -> list[dict]:
        return self.data["components"]

    def ranking(self, by: str) -> list[str]:
        return list(self.data["ranking"][by])

    def to_dict(self) -> dict:
        return self.data


def _env() -> dict:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _kind_str(kind) -> str:
    return str(getattr(kind, "value", kind))


def score_sensitivity(
    model,
    processor,
    utterances: Sequence,
    *,
    labels: str | None = None,
    options: SensitivityOptions | None = None,
    out_dir: str | os.PathLike | None = None,
    evaluation: Sequence | None = None,
    allow_overlap: bool = False,
    wer_options=None,
    data_info: Mapping | None = None,
    restart: bool = False,
    progress: bool = True,
) -> SensitivityResult:
    """Diagnostics, predicted and measured ablation, correlations: the whole sensitivity study.

    Steps (wall time of each in ``timings_s``): ``labels`` (audio, features, teacher-forcing
    labels; greedy decoding for ``labels="greedy"``), ``gradients`` (accumulation),
    ``aggregate``, ``predict`` (magnitude keep-masks -> predicted loss change), ``ablation``
    (measured loss, optional WER), ``correlate``, ``write``.

    Args:
        model: Whisper model (restored bit-exactly; checked by fingerprint).
        processor: its processor.
        utterances: calibration utterances (``manifests.Utterance``).
        labels: shortcut for ``options.labels``.
        options: :class:`SensitivityOptions`.
        out_dir: output directory (written as results come, resumed from on a rerun).
        evaluation: evaluation utterances; when given, calibration must be disjoint from them.
        allow_overlap: turn that check's error into a warning (the overlap is still recorded).
        wer_options: ``evaluation.DecodeOptions`` for the WER ablation.
        data_info: extra description of the calibration data for the JSON (name, source).
        restart: delete the checkpoints in ``out_dir`` instead of resuming from them.
        progress: tqdm bars.

    Returns:
        :class:`SensitivityResult` (the content of ``sensitivity.json``).

    Raises:
        manifests.OverlapError: calibration and evaluation share utterances.
        ResumeMismatchError: ``out_dir`` holds results for other inputs (and not ``restart``).
        components.SelectorError: an option's target or group selects nothing.
        ValueError: empty calibration set, bad options.
    """
    from tqdm.auto import tqdm

    from asrprune.components import SelectorError, linear_weight_names

    options = options or SensitivityOptions()
    if labels is not None and labels != options.labels:
        options = dataclasses.replace(options, labels=labels)
    utterances = list(utterances)
    if not utterances:
        raise ValueError("the calibration set is empty")
    timings: dict[str, float] = {}
    overlap = None
    if evaluation is not None:
        from asrprune.manifests import check_disjoint

        overlap = check_disjoint(utterances, evaluation, allow_overlap=allow_overlap)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if restart:
            for name in ("labels.jsonl", "accumulators.safetensors", "accumulators.safetensors.json", "ablation.jsonl"):
                (out / name).unlink(missing_ok=True)
    t_all = time.perf_counter()
    fp = _fingerprint(model)

    # units first: a bad --targets selector fails before any slow step
    units = [unit_for_selector(model, t) for t in options.targets] if options.targets else analysis_units(model)
    groups = []
    for g in options.groups:
        try:
            groups.append(unit_for_selector(model, g))
        except SelectorError as exc:
            log.info("group %r skipped: %s", g, exc)

    # labels
    t0 = time.perf_counter()
    examples = build_examples(model, processor, utterances, options=options,
                              labels_path=(out / "labels.jsonl") if out else None, progress=progress)
    timings["labels"] = time.perf_counter() - t0
    label_digest = hashlib.sha256(
        json.dumps([[e.id, e.decoder_input_ids[0].tolist(), e.labels[0].tolist()] for e in examples]).encode()
    ).hexdigest()[:16]
    key = hashlib.sha256(json.dumps([fp, label_digest, options.loss_reduction]).encode()).hexdigest()[:16]

    # gradients
    t0 = time.perf_counter()
    stats = accumulate_gradients(model, examples, checkpoint=(out / "accumulators.safetensors") if out else None,
                                 checkpoint_every=options.checkpoint_every, key=key,
                                 reduction=options.loss_reduction, progress=progress)
    timings["gradients"] = time.perf_counter() - t0

    # aggregate: matrix (every parameter tensor), unit, layer, kind, group
    t0 = time.perf_counter()
    params = dict(model.named_parameters())
    weights = {n: p.detach() for n, p in params.items()}
    diags = stats.diagnostics(weights)
    mean_grad = stats.mean_grad()
    fisher = stats.fisher()
    numels = {n: int(p.numel()) for n, p in params.items()}
    param_sums = {d: {n: float(t.double().sum()) for n, t in diags[d].items()} for d in DIAGNOSTICS}
    del diags
    unit_params = {u.id: list(u.params) for u in units}
    layer_units: dict[str, list[str]] = defaultdict(list)
    kind_units: dict[str, list[str]] = defaultdict(list)
    for u in units:
        if u.layer is not None and u.side in ("encoder", "decoder"):
            layer_units[f"{u.side}.layers.{u.layer}"] += list(u.params)
        kind_units[u.kind] += list(u.params)
    group_params = {g.id: list(g.params) for g in groups}
    levels = {
        "matrix": aggregate(param_sums, numels, {n: [n] for n in params}),
        "component": aggregate(param_sums, numels, unit_params),
        "layer": aggregate(param_sums, numels, layer_units),
        "kind": aggregate(param_sums, numels, kind_units),
        "group": aggregate(param_sums, numels, group_params) if group_params else {},
    }
    timings["aggregate"] = time.perf_counter() - t0

    # predicted loss change at each sparsity, from magnitude keep-masks
    t0 = time.perf_counter()
    predicted: dict[str, dict[str, dict]] = {}
    for u in tqdm(units + groups, desc="predict", disable=not progress, unit="unit"):
        predicted[u.id] = predict_loss_curve(weights, mean_grad, fisher, u.params, options.all_prediction_sparsities)
        for pred in predicted[u.id].values():
            pred["obd"] = pred["second_order"]  # the key allocate.py reads by default
    timings["predict"] = time.perf_counter() - t0

    # measured ablation
    ablation = None
    if options.ablation_sparsities:
        t0 = time.perf_counter()
        wer_fn = None
        if options.ablation_wer:
            wer_fn = _wer_function(model, processor, utterances, wer_options, out / "wer" if out else None, progress)
        ablation = measure_ablation(
            model, examples, [u.id for u in units + groups], options.ablation_sparsities,
            mean_grad=mean_grad, fisher=fisher,
            results_path=(out / "ablation.jsonl") if out else None,
            key=key + ("+wer" if options.ablation_wer else ""),
            cache_mb=options.cache_mb, wer=wer_fn, reduction=options.loss_reduction, progress=progress,
        )
        timings["ablation"] = time.perf_counter() - t0
        for row in ablation["rows"]:
            expect = predicted[row["target"]][f"{row['sparsity']:g}"]
            if row.get("predicted") and (row["predicted"]["n_removed"] != expect["n_removed"]
                                         or not math.isclose(row["predicted"]["total"], expect["total"], rel_tol=1e-6, abs_tol=1e-12)):
                log.warning("%s@%g: the weights prune_model removed differ from the magnitude masks of the prediction",
                            row["target"], row["sparsity"])
    if _fingerprint(model) != fp:
        raise RuntimeError("the model's weights changed during the sensitivity run")

    # rows, correlations, ranking
    t0 = time.perf_counter()
    abl_by: dict[str, dict] = defaultdict(dict)
    if ablation is not None:
        for row in ablation["rows"]:
            abl_by[row["target"]][f"{row['sparsity']:g}"] = {
                k: row.get(k) for k in ("loss", "loss_delta", "wer", "wer_delta", "n_removed", "measured_sparsity", "start", "wall_s")
            }
    comp_rows = [_unit_row(u, numels, levels["component"][u.id], predicted, abl_by) for u in units]
    group_rows = [_unit_row(g, numels, levels["group"][g.id], predicted, abl_by) for g in groups]
    correlations = (correlate(comp_rows, options.ablation_sparsities, n_bootstrap=options.n_bootstrap, seed=options.seed)
                    if ablation else [])
    ranking = _rankings(comp_rows, options)
    timings["correlate"] = time.perf_counter() - t0
    linear = linear_weight_names(model)
    data = {
        "schema": SCHEMA,
        "model": str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")),
        "model_fingerprint": fp,
        "options": options.to_dict(),
        "data": {
            **dict(data_info or {}),
            "n_utterances": len(utterances),
            "ids": [u.id for u in utterances],
            "overlap_checked": evaluation is not None,
            "overlap": _jsonable(overlap),
        },
        "labels": [{"id": e.id, "text": e.text, "n_targets": e.n_targets} for e in examples],
        "definitions": DEFINITIONS,
        "scope": "component",
        "param_counts": {"linear": sum(numels[n] for n in linear if n in numels), "all": sum(numels.values())},
        "baseline_loss": ablation["baseline_loss"] if ablation else float(np.mean(stats.losses)),
        "baseline_wer": ablation["baseline_wer"] if ablation else None,
        "gradient_pass_loss": float(np.mean(stats.losses)),
        "loss_units": "nats per utterance (sequence NLL)" if options.loss_reduction == "sum" else "nats per token",
        "mean_targets_per_utterance": float(np.mean([e.n_targets for e in examples])),
        "components": comp_rows,
        "groups": group_rows,
        "layers": [{"id": k, "n_params": sum(numels[p] for p in v), "diagnostics": levels["layer"][k]} for k, v in layer_units.items()],
        "kinds": [{"id": k, "n_params": sum(numels[p] for p in v), "diagnostics": levels["kind"][k]} for k, v in kind_units.items()],
        "matrices": [{"id": n, "n_params": numels[n], "diagnostics": levels["matrix"][n]} for n in params],
        "correlations": correlations,
        "prediction_check": prediction_check(comp_rows, options.ablation_sparsities) if ablation else [],
        "ranking": ranking,
        "timings_s": timings,
        # what each step cost, summed over the sessions that did it (timings_s: this session only)
        "compute_s": {"labels": timings["labels"], "gradients": stats.wall_s,
                      "ablation": ablation["compute_s"] if ablation else None},
        "env": _env(),
    }
    if ablation is not None:
        data["ablation_per_utterance"] = {
            "baseline": ablation["baseline_losses"],
            "rows": {_target_key(r["target"], r["sparsity"]): r["loss_deltas"] for r in ablation["rows"]},
        }
    result = SensitivityResult(data)
    if out is not None:
        t0 = time.perf_counter()
        write_outputs(result, out)
        timings["write"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    if out is not None:
        tmp = out / "sensitivity.json.tmp"
        tmp.write_text(json.dumps(_jsonable(data), indent=1), encoding="utf-8")
        os.replace(tmp, out / "sensitivity.json")
    return result


def _jsonable(obj):
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj):
        return _jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "to_dict"):
        return _jsonable(obj.to_dict())
    if isinstance(obj, (np.floating, np.integer)):
        return _jsonable(obj.item())
    return str(obj)


def _unit_row(u: Unit, numels, diag, predicted, abl_by) -> dict:
    return {
        "id": u.id,
        "kind": u.kind,
        "side": u.side,
        "layer": u.layer,
        "category": u.category,
        "linear": u.category == "linear",
        "n_params": sum(numels[p] for p in u.params),
        "n_weights": sum(numels[p] for p in u.params),
        "params": list(u.params),
        "diagnostics": diag,
        "predicted": predicted.get(u.id, {}),
        "ablation": abl_by.get(u.id, {}),
    }


def _rankings(rows: Sequence[Mapping], options: SensitivityOptions) -> dict[str, list[str]]:
    """Component ids, most sensitive first, per diagnostic (per-parameter mean), prediction, ablation."""
    out = {}
    for d in DIAGNOSTICS:
        out[d] = [r["id"] for r in sorted(rows, key=lambda r: -r["diagnostics"][d]["mean"])]
    for s in options.ablation_sparsities:
        k = f"{s:g}"
        out[f"predicted.total@{k}"] = [r["id"] for r in sorted(rows, key=lambda r: -r["predicted"].get(k, {}).get("total", -math.inf))]
        if any(k in r["ablation"] for r in rows):
            out[f"loss_delta@{k}"] = [r["id"] for r in sorted(rows, key=lambda r: -_num(r["ablation"].get(k, {}).get("loss_delta")))]
            if any(r["ablation"].get(k, {}).get("wer_delta") is not None for r in rows):
                out[f"wer_delta@{k}"] = [r["id"] for r in sorted(rows, key=lambda r: -_num(r["ablation"].get(k, {}).get("wer_delta")))]
    return out


def _num(x) -> float:
    return -math.inf if x is None or not math.isfinite(float(x)) else float(x)


def _wer_function(model, processor, utterances, wer_options, wer_dir, progress) -> Callable[[str], float]:
    """``run_name -> calibration WER`` of the model as it is when called (greedy decoding).

    One encoder cache is shared by all calls, so decoder-only ablations reuse encoder outputs
    (the cache is keyed by the encoder's fingerprint).
    """
    from asrprune.evaluation import DecodeOptions, EncoderCache, evaluate

    opts = wer_options or DecodeOptions()
    cache = EncoderCache()

    def run(name: str) -> float:
        d = None
        if wer_dir is not None:
            d = Path(wer_dir) / re.sub(r"[^A-Za-z0-9_.@-]+", "_", name)
        res = evaluate(model, processor, utterances, opts, out_dir=d, progress=False, encoder_cache=cache)
        return float(res.wer)

    return run


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in r])


def write_outputs(result: SensitivityResult | Mapping, out_dir: str | os.PathLike) -> list[Path]:
    """Write the CSV tables, the ranking and the heatmaps of a result (not ``sensitivity.json``).

    Files: ``components.csv``, ``groups.csv``, ``layers.csv``, ``kinds.csv``, ``matrices.csv``
    (diagnostics: sum, per-parameter mean, min-max), ``predicted.csv``, ``ablation.csv``,
    ``correlations.csv``, ``ranking.csv``, ``heatmap_<diagnostic>.png`` (log10 per-parameter
    mean; layers x component kinds) and ``heatmap_loss_delta_<s>.png``.

    Returns:
        The paths written.
    """
    data = result.data if isinstance(result, SensitivityResult) else dict(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    diag_cols = [f"{d}_{a}" for d in DIAGNOSTICS for a in ("sum", "mean", "minmax")]

    def diag_vals(row):
        return [row["diagnostics"][d][a] for d in DIAGNOSTICS for a in ("sum", "mean", "minmax")]

    for level, rows, extra in (
        ("components", data["components"], ("kind", "side", "layer")),
        ("groups", data.get("groups", []), ()),
        ("layers", data["layers"], ()),
        ("kinds", data["kinds"], ()),
        ("matrices", data["matrices"], ()),
    ):
        p = out / f"{level}.csv"
        _write_csv(p, ["id", *extra, "n_params", *diag_cols], ([r["id"], *[r.get(e) for e in extra], r["n_params"], *diag_vals(r)] for r in rows))
        written.append(p)
    units = list(data["components"]) + list(data.get("groups", []))
    p = out / "predicted.csv"
    _write_csv(p, ["id", "sparsity", "n_removed", *PREDICTION_TERMS],
               ([u["id"], float(s), v["n_removed"], *[v[t] for t in PREDICTION_TERMS]] for u in units for s, v in u["predicted"].items()))
    written.append(p)
    p = out / "ablation.csv"
    _write_csv(p, ["id", "sparsity", "n_removed", "loss", "loss_delta", "predicted_total", "predicted_first_order", "predicted_second_order", "wer", "wer_delta", "wall_s"],
               ([u["id"], float(s), a.get("n_removed"), a.get("loss"), a.get("loss_delta"),
                 u["predicted"].get(s, {}).get("total"), u["predicted"].get(s, {}).get("first_order"), u["predicted"].get(s, {}).get("second_order"),
                 a.get("wer"), a.get("wer_delta"), a.get("wall_s")] for u in units for s, a in u["ablation"].items()))
    written.append(p)
    p = out / "correlations.csv"
    _write_csv(p, ["population", "predictor", "target", "sparsity", "rho", "ci_low", "ci_high", "p", "n"],
               ([c.get("population", "all"), c["predictor"], c["target"], c["sparsity"], c["rho"], c["ci"][0], c["ci"][1], c["p"], c["n"]]
                for c in data["correlations"]))
    written.append(p)
    p = out / "prediction_check.csv"
    cols = ["sparsity", "predicted", "n", "median_ratio", "sign_agreement", "within_2x", "pearson_log"]
    _write_csv(p, cols, ([r.get(c) for c in cols] for r in data.get("prediction_check", [])))
    written.append(p)
    p = out / "ranking.csv"
    rk = data["ranking"]
    n = max((len(v) for v in rk.values()), default=0)
    _write_csv(p, ["rank", *rk.keys()], ([i + 1, *[v[i] if i < len(v) else "" for v in rk.values()]] for i in range(n)))
    written.append(p)
    written += _heatmaps(data, out)
    return written


def _heatmaps(data: Mapping, out: Path) -> list[Path]:
    from matplotlib import patheffects
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import SymLogNorm
    from matplotlib.figure import Figure

    rows = [c for c in data["components"] if c.get("layer") is not None]
    if not rows:
        return []
    kinds = list(dict.fromkeys(c["kind"] for c in rows))
    present = {int(c["layer"]) for c in rows}
    layers = list(range(min(present), max(present) + 1))
    written = []
    panels = [(d, f"{d}: log10 per-parameter mean", lambda c, d=d: c["diagnostics"][d]["mean"], True) for d in DIAGNOSTICS]
    for s in data["options"].get("ablation_sparsities", []):
        k = f"{s:g}"
        panels.append((f"loss_delta_{k}", f"measured loss change, pruned alone at s={k} ({data.get('loss_units', 'nats')})",
                       lambda c, k=k: c["ablation"].get(k, {}).get("loss_delta"), False))
        panels.append((f"predicted_total_{k}", f"predicted loss change (first + second order) at s={k}",
                       lambda c, k=k: c["predicted"].get(k, {}).get("total"), False))
    for name, title, get, log10 in panels:
        grid = np.full((len(layers), len(kinds)), np.nan)
        for c in rows:
            v = get(c)
            if v is None:
                continue
            v = float(v)
            if log10:
                v = math.log10(v) if v > 0 else np.nan
            grid[layers.index(int(c["layer"])), kinds.index(c["kind"])] = v
        if np.isnan(grid).all():
            continue
        fig = Figure(figsize=(1.2 + 1.1 * len(kinds), 1.2 + 0.45 * len(layers)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        norm = None
        finite = np.abs(grid[np.isfinite(grid) & (grid != 0)])
        if not log10 and finite.size and finite.max() / max(finite.min(), 1e-12) > 100:
            # loss changes span orders of magnitude (layer norms vs matrices): symmetric log scale
            norm = SymLogNorm(linthresh=float(np.percentile(finite, 20)), base=10)
            title += " (symlog colour scale)"
        im = ax.imshow(grid, aspect="auto", cmap="viridis", norm=norm)
        ax.set_xticks(range(len(kinds)), kinds, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=8)
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=9)
        for i in range(len(layers)):
            for j in range(len(kinds)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2g}", ha="center", va="center", fontsize=6, color="w",
                            path_effects=[patheffects.withStroke(linewidth=1.5, foreground="black")])
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        p = out / f"heatmap_{name}.png"
        fig.savefig(p, dpi=110)
        written.append(p)
    return written


def load_sensitivity_json(path: str | os.PathLike) -> dict:
    """Read ``sensitivity.json`` (a file or the directory holding it).

    Raises:
        FileNotFoundError: naming the missing file.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "sensitivity.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no sensitivity.json (run `asrprune sensitivity` first)")
    return json.loads(p.read_text(encoding="utf-8"))
