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
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers.modeling_outputs import BaseModelOutput

from .audio import load_audio
from .decoding import DecodeOptions, Decoder
from .files import append_jsonl, atomic_write_text, read_jsonl
from .manifests import Utterance
from .models import is_multilingual

log = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "LABEL_MODES",
    "LOSS_REDUCTIONS",
    "TEXT_FORMS",
    "CalibrationExample",
    "LabelSpec",
    "build_examples",
    "prefix_token_ids",
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
    audio = load_audio(utt, 16000)
    if len(audio) > 30 * 16000:
        # Whisper's features cover 30 s; the rest of the audio is cut, its transcript is not.
        log.warning("%s: %.1f s of audio, only the first 30 s are used; the label may run past it",
                    utt.id, len(audio) / 16000)
    feats = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    return feats.to(device=device, dtype=dtype)  # (1, n_mels, 3000)


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
        feats = _features(processor, utt, param.dtype, param.device)
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
