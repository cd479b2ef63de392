"""Calibration data: teacher-forced examples, their loss, and the hooks that capture activations.

Everything that is measured on *calibration* data (sensitivity diagnostics, measured damage,
pruning criteria such as Wanda and SparseGPT) starts from :class:`CalibrationExample`: the log-mel
features of one utterance and its teacher-forcing labels.

Labels (:class:`LabelSpec`): ``"reference"`` (default) teacher-forces the reference transcript;
``"greedy"`` teacher-forces the model's own greedy transcript (decoded by
:class:`asrprune.decoding.Decoder` under the ``standard`` protocol, so no transcripts are needed).

Reference text form (``text_form``): Whisper was trained on cased, punctuated text whose first
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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.modeling_outputs import BaseModelOutput

from .audio import load_audio
from .decoding import DecodeOptions, Decoder
from .files import append_jsonl, atomic_write_text, read_jsonl
from .manifests import Utterance
from .models import is_multilingual
from .shapes import layer_stack

log = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "LABEL_MODES",
    "LOSS_REDUCTIONS",
    "TEXT_FORMS",
    "CalibrationExample",
    "CalibrationOptions",
    "InputStats",
    "LabelSpec",
    "build_examples",
    "collect_input_stats",
    "prefix_token_ids",
    "sequential_pass",
    "speech_positions",
    "teacher_forced_loss",
    "teacher_forcing",
    "text_token_ids",
    "whisper_text_form",
]

LABEL_MODES = ("reference", "greedy")
TEXT_FORMS = ("whisper", "raw")
LOSS_REDUCTIONS = ("sum", "mean")
TASKS = ("transcribe", "translate")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class LabelSpec:
    """How calibration utterances are labelled for teacher forcing (checked once, here).

    Attributes:
        labels: ``"reference"`` or ``"greedy"`` (see the module docstring).
        text_form: ``"whisper"`` or ``"raw"``: how reference text is written.
        language: language token for multilingual models (``"en"``); ignored by ``.en`` models.
        task: ``"transcribe"`` or ``"translate"`` (multilingual models only).
    """

    labels: str = "reference"
    text_form: str = "whisper"
    language: str | None = "en"
    task: str = "transcribe"

    def __post_init__(self) -> None:
        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {list(LABEL_MODES)}, got {self.labels!r}")
        if self.text_form not in TEXT_FORMS:
            raise ValueError(f"text_form must be one of {list(TEXT_FORMS)}, got {self.text_form!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be 'transcribe' or 'translate', got {self.task!r}")


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
    if is_multilingual(model):
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
        audio_s: seconds of audio in the 30 s window (the rest of the features is padding).
    """

    id: str
    input_features: Tensor
    decoder_input_ids: Tensor
    labels: Tensor
    text: str = ""
    audio_s: float | None = None

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def _features(processor, utt, dtype: torch.dtype, device) -> tuple[Tensor, float]:
    audio = load_audio(utt, 16000)
    if len(audio) > 30 * 16000:
        # Whisper's features cover 30 s; the rest of the audio is cut, its transcript is not.
        log.warning("%s: %.1f s of audio, only the first 30 s are used; the label may run past it",
                    utt.id, len(audio) / 16000)
    feats = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    return feats.to(device=device, dtype=dtype), min(30.0, len(audio) / 16000)  # (1, n_mels, 3000), s


def text_token_ids(sequence: Sequence[int], eot: int) -> list[int]:
    """The transcript tokens of a generated sequence: after the prompt, up to end-of-text.

    Prompt tokens (``<|startoftranscript|>``, language, task, ``<|notimestamps|>``) have ids above
    ``<|endoftext|>``; the transcript runs from the first token below it to the next ``eot``.
    """
    seq = [int(t) for t in sequence]
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
    utterances: Sequence[Utterance],
    *,
    spec: LabelSpec | None = None,
    decode: DecodeOptions | None = None,
    labels_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[CalibrationExample]:
    """Load audio, compute features and build teacher-forcing labels for each utterance.

    Args:
        model: Whisper model (its device and dtype are used for the features).
        processor: its ``WhisperProcessor``.
        utterances: calibration utterances.
        spec: labels / text form / language / task (:class:`LabelSpec`; defaults when None).
        decode: how greedy labels are decoded (the ``standard`` protocol with ``spec.language``;
            its ``max_new_tokens`` caps them). Unused for reference labels.
        labels_path: ``labels.jsonl`` written as labels are made; greedy transcripts found there
            (same id and prompt) are reused, so they are decoded once per output directory.
        progress: tqdm bar.

    Returns:
        One :class:`CalibrationExample` per utterance, in order.

    Raises:
        AudioError: an unreadable audio file.
    """
    spec = spec or LabelSpec()
    tok = processor.tokenizer
    param = next(model.parameters())
    prefix = prefix_token_ids(model, tok, language=spec.language, task=spec.task)
    eot = int(tok.convert_tokens_to_ids("<|endoftext|>"))
    max_len = int(model.config.max_target_positions)
    cached: dict[str, dict] = {}
    if labels_path is not None and spec.labels == "greedy":
        for row in read_jsonl(labels_path):
            if row.get("labels") == "greedy" and row.get("prefix") == prefix:
                cached[row["id"]] = row
    decoder = None
    if spec.labels == "greedy":
        if spec.task != "transcribe":
            raise ValueError(f"greedy labels are decoded with task transcribe, not {spec.task!r}")
        base = decode or DecodeOptions()
        options = dataclasses.replace(base, protocol="standard", beam_size=1,
                                      language=spec.language if is_multilingual(model) else None)
        decoder = Decoder(model, processor, options, None)
    examples = []
    used_rows: list[dict] = []
    for utt in tqdm(utterances, desc="labels", disable=not progress, unit="utt"):
        feats, audio_s = _features(processor, utt, param.dtype, param.device)
        row = cached.get(utt.id)
        if row is None:
            if spec.labels == "reference":
                text = whisper_text_form(utt.text) if spec.text_form == "whisper" else utt.text.strip()
                ids = [int(i) for i in tok.encode(text, add_special_tokens=False)]
            else:
                with torch.inference_mode():
                    sequence = decoder.generate_from_features(feats)[0]
                ids = text_token_ids(sequence.tolist(), eot)
                text = tok.decode(ids)
            row = {"id": utt.id, "labels": spec.labels, "text_form": spec.text_form,
                   "prefix": prefix, "text": text, "text_ids": ids}
            if labels_path is not None and spec.labels == "greedy":
                append_jsonl(labels_path, row)  # decoding is slow: keep each one
        inputs, labels = teacher_forcing(prefix, row["text_ids"], eot, max_length=max_len)
        if len(inputs) < len(prefix) + len(row["text_ids"]):
            log.warning("%s: label truncated to the decoder's %d positions", utt.id, max_len)
        examples.append(CalibrationExample(
            id=utt.id,
            input_features=feats,
            decoder_input_ids=torch.tensor([inputs], dtype=torch.long, device=param.device),
            labels=torch.tensor([labels], dtype=torch.long, device=param.device),
            text=row["text"],
            audio_s=audio_s,
        ))
        used_rows.append(row)
    if labels_path is not None:  # exactly the labels of this run
        atomic_write_text(labels_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in used_rows))
    return examples


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
        kwargs["encoder_outputs"] = BaseModelOutput(last_hidden_state=encoder_hidden_states)
    else:
        kwargs["input_features"] = example.input_features
    logits = model(**kwargs).logits  # (1, L, V)
    return F.cross_entropy(logits[0].float(), example.labels[0], ignore_index=IGNORE_INDEX, reduction=reduction)


# ----------------------------------------------------------------------------------------------
# calibration passes: what enters each linear module, layer after layer
# ----------------------------------------------------------------------------------------------

#: which encoder positions enter the statistics: the speech only, or the whole 30 s window
FRAMES = ("speech", "all")


@dataclass(frozen=True)
class CalibrationOptions:
    """How a calibrated pruning method sees its calibration data (checked once, here).

    Attributes:
        labels: the decoder tokens teacher-forced through the decoder (:class:`LabelSpec`:
            reference transcripts by default, or the dense model's greedy ones).
        frames: ``"speech"`` (default): only the encoder positions that hold audio enter the
            statistics of encoder modules and of cross-attention keys/values; ``"all"``: the
            whole 30 s window, padding included (the encoder sees the padding at inference too,
            but for a 6.6 s utterance 78% of the positions are padding, which then dominates
            the Hessian). Measured on tiny.en: docs/methods.md.
        damp: SparseGPT's dampening, a fraction of the mean diagonal of H added to it.
        block_size: SparseGPT's column block (masks are chosen per block of this many columns).
    """

    labels: LabelSpec = field(default_factory=LabelSpec)
    frames: str = "speech"
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        if isinstance(self.labels, str):
            object.__setattr__(self, "labels", LabelSpec(labels=self.labels))
        if self.frames not in FRAMES:
            raise ValueError(f"frames must be one of {list(FRAMES)}, got {self.frames!r}")
        if not (isinstance(self.damp, (int, float)) and 0.0 <= self.damp < 1.0):
            raise ValueError(f"damp must be a fraction in [0, 1), got {self.damp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")

    def to_dict(self) -> dict:
        return {"labels": dataclasses.asdict(self.labels), "frames": self.frames, "damp": self.damp,
                "block_size": self.block_size}


class HookSet:
    """The hooks of one calibration pass: registered through one owner, all removed on exit
    (also when the pass raises)."""

    def __init__(self) -> None:
        self._handles: list = []

    def pre(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_pre_hook(fn))

    def post(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class _Stop(Exception):
    """Ends a forward pass early, once the layer that was wanted has run."""


def _stop_after(module, args, output) -> None:
    raise _Stop


@dataclass
class InputStats:
    """Running sums over the calibration tokens that enter one linear module (fp64).

    Attributes:
        n_tokens: rows of X seen.
        sq: ``(in_features,)`` sum over tokens of ``x_j ** 2`` (Wanda's ``||X_j||^2``).
        gram: ``(in_features, in_features)`` sum of ``x x^T`` (SparseGPT's ``H`` = gram / n),
            kept only when asked for.
        total: ``(in_features,)`` sum of ``x_j`` (means and variances of the inputs: structured
            importance and bias compensation).
    """

    n_tokens: int
    sq: Tensor
    gram: Tensor | None = None
    total: Tensor | None = None

    @classmethod
    def empty(cls, n_features: int, *, gram: bool, device) -> "InputStats":
        return cls(0, torch.zeros(n_features, dtype=torch.float64, device=device),
                   torch.zeros(n_features, n_features, dtype=torch.float64, device=device) if gram else None,
                   torch.zeros(n_features, dtype=torch.float64, device=device))

    @property
    def mean(self) -> Tensor:
        """Mean input per feature (fp64)."""
        return self.total / max(self.n_tokens, 1)

    @property
    def variance(self) -> Tensor:
        """Variance of each input feature over the tokens (fp64, population)."""
        return (self.sq / max(self.n_tokens, 1) - self.mean ** 2).clamp_min(0)

    def add(self, x: Tensor) -> None:
        """Add tokens ``x`` of shape ``(T, in_features)``."""
        x = x.detach().to(torch.float32)
        self.n_tokens += int(x.shape[0])
        self.sq += (x * x).sum(0).to(torch.float64)
        if self.total is not None:
            self.total += x.sum(0).to(torch.float64)
        if self.gram is not None:
            self.gram += (x.T @ x).to(torch.float64)

    @property
    def norm(self) -> Tensor:
        """``||X_j||_2`` per input feature (fp32)."""
        return self.sq.sqrt().to(torch.float32)

    def hessian(self) -> Tensor:
        """``H = X^T X / n_tokens`` (fp64), SparseGPT's layer Hessian up to the factor 2."""
        if self.gram is None:
            raise ValueError("these statistics were collected without the Gram matrix")
        return self.gram / max(self.n_tokens, 1)


def speech_positions(example: CalibrationExample, n_positions: int) -> int:
    """Encoder positions that hold audio: ``ceil(audio_s / 30 * n_positions)`` (at least 1)."""
    if example.audio_s is None:
        return n_positions
    return max(1, min(n_positions, math.ceil(example.audio_s / 30.0 * n_positions - 1e-9)))


def _layer_out(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def layer_linears(model, side: str, index: int) -> dict[str, nn.Linear]:
    """The linear modules of one encoder or decoder layer by parameter-name prefix
    (``model.encoder.layers.0.self_attn.q_proj``), in execution order."""
    stack = layer_stack(model, side)
    prefix = next(n for n, m in model.named_modules() if m is stack.layers[index]) + "."
    return {prefix + n: m for n, m in stack.layers[index].named_modules() if isinstance(m, nn.Linear)}


def _from_encoder_positions(name: str, side: str) -> bool:
    # encoder modules, and the cross-attention keys/values (computed from the encoder's output)
    return side == "encoder" or name.endswith(("encoder_attn.k_proj", "encoder_attn.v_proj"))


LayerCallback = Callable[[str, int, "dict[str, nn.Linear]", "dict[str, InputStats]"], None]


def sequential_pass(
    model,
    examples: Sequence[CalibrationExample],
    *,
    wanted: Iterable[str] | None = None,
    gram: bool | frozenset[str] = False,
    frames: str = "speech",
    on_layer: LayerCallback | None = None,
    progress: bool = True,
) -> dict[str, InputStats]:
    """Feed the calibration examples through Whisper layer by layer, in its order.

    Encoder layers come first, one after another: each layer's inputs are the outputs of the
    layers below it *as they are after* ``on_layer`` ran for them (pruned), so every layer is
    fitted to the inputs it will really see. Then the decoder layers, teacher-forced on the
    examples' decoder tokens: self-attention on those tokens, cross-attention on the outputs of
    the encoder as pruned. For each layer the input statistics of its linear modules (those in
    ``wanted``, all by default) are collected, then ``on_layer(side, index, modules, stats)`` is
    called (it may change the layer's weights), then the layer's outputs are computed again.

    Args:
        model: ``WhisperForConditionalGeneration`` (its device and dtype are used).
        examples: calibration examples (never evaluation data).
        wanted: parameter-name prefixes of the modules whose statistics are needed (module names
            such as ``model.encoder.layers.0.fc1``); others are skipped.
        gram: also accumulate the Gram matrix (SparseGPT's Hessian); a set of module names: only
            for those.
        frames: ``"speech"`` or ``"all"`` (:class:`CalibrationOptions`).
        on_layer: called after each layer's statistics are complete; ``None``: a dense pass.
        progress: a tqdm bar over layers.

    Returns:
        ``{module name: InputStats}`` of every wanted module.
    """
    if frames not in FRAMES:
        raise ValueError(f"frames must be one of {list(FRAMES)}, got {frames!r}")
    wanted_set = set(wanted) if wanted is not None else None
    encoder, decoder = model.get_encoder(), model.get_decoder()
    stats: dict[str, InputStats] = {}
    n_layers = (len(encoder.layers), len(decoder.layers))
    bar = tqdm(total=sum(n_layers), desc="calibration pass", unit="layer", disable=not progress)

    def collector(side: str, index: int, limits: list[int]) -> tuple[HookSet, dict[str, nn.Linear], list[int]]:
        modules = {n: m for n, m in layer_linears(model, side, index).items()
                   if wanted_set is None or n in wanted_set}
        hooks = HookSet()
        current = [0]  # which example is running
        # Modules fed the very same tensor (q, k, v; cross-attention k, v) share one InputStats:
        # their Hessians are the same, computed once. The first input of each is held for the
        # example, so that no later tensor can take its address and be mistaken for it.
        seen: dict[int, tuple[str, Tensor]] = {}
        seen_example = [-1]

        def hook_for(name: str):
            def hook(module, args):
                full = args[0]
                if seen_example[0] != current[0]:
                    seen.clear()
                    seen_example[0] = current[0]
                first = seen.get(full.data_ptr())
                if first is not None and first[1] is full and first[0] != name:
                    if stats.get(name) is None:
                        stats[name] = stats[first[0]]
                    if stats[name] is stats[first[0]]:
                        return  # counted once, under the first module
                seen.setdefault(full.data_ptr(), (name, full))
                x = full[0]  # (T, in): batch 1
                if frames == "speech" and _from_encoder_positions(name, side):
                    x = x[: limits[current[0]]]
                st = stats.get(name)
                if st is None:
                    st = stats[name] = InputStats.empty(x.shape[-1], gram=gram if isinstance(gram, bool) else name in gram,
                                                        device=x.device)
                st.add(x)
            return hook

        for name, module in modules.items():
            hooks.pre(module, hook_for(name))
        return hooks, modules, current

    with torch.no_grad():
        # encoder input: the embedded features, captured at the first layer
        hidden: list[Tensor] = []
        with HookSet() as h:
            def grab(module, args):
                hidden.append(args[0].detach())
                raise _Stop
            h.pre(encoder.layers[0], grab)
            for ex in examples:
                try:
                    encoder(ex.input_features)
                except _Stop:
                    pass
        n_positions = int(hidden[0].shape[1])
        limits = [speech_positions(ex, n_positions) for ex in examples]
        for index, layer in enumerate(encoder.layers):
            hooks, modules, current = collector("encoder", index, limits)
            changes = on_layer is not None and bool(modules)  # else the outputs of this run are the layer's
            outputs = []
            with hooks:
                for i, h_i in enumerate(hidden):
                    current[0] = i
                    out = layer(h_i, None)
                    if not changes:
                        outputs.append(_layer_out(out))
            if changes:
                on_layer("encoder", index, modules, {n: stats[n] for n in modules if n in stats})
                outputs = [_layer_out(layer(h_i, None)) for h_i in hidden]
            hidden = outputs
            bar.update(1)
        encoded = [encoder.layer_norm(h_i) for h_i in hidden]  # the pruned encoder's outputs
        hidden = []
        for index, layer in enumerate(decoder.layers):
            hooks, modules, current = collector("decoder", index, limits)
            with hooks:
                hooks.post(layer, _stop_after)
                for i, ex in enumerate(examples):
                    current[0] = i
                    try:
                        decoder(input_ids=ex.decoder_input_ids, encoder_hidden_states=encoded[i], use_cache=False)
                    except _Stop:
                        pass
            if on_layer is not None and modules:
                on_layer("decoder", index, modules, {n: stats[n] for n in modules if n in stats})
            bar.update(1)
    bar.close()
    return stats


def collect_input_stats(model, examples: Sequence[CalibrationExample], *, gram: bool | frozenset[str],
                        frames: str = "speech",
                        wanted: Iterable[str] | None = None, progress: bool = True) -> dict[str, InputStats]:
    """The input statistics of every (wanted) linear module of the *dense* model, in one pass.

    What :func:`sequential_pass` collects when nothing is pruned on the way: pruning one
    component alone from these statistics is what the sequential method would do for it (the
    layers below it are dense), so the sensitivity ablation under Wanda or SparseGPT shares one
    pass (``prune_model(..., input_stats=...)``).
    """
    return sequential_pass(model, examples, wanted=wanted, gram=gram, frames=frames, on_layer=None,
                           progress=progress)
