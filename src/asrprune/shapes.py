"""The shapes of a Whisper whose layers differ: FFN widths, head counts, layer counts (torch only).

Structured pruning (:mod:`asrprune.structured`) makes matrices smaller. Some of that
``WhisperConfig`` can express and some it cannot:

- dropped layers: ``encoder_layers`` / ``decoder_layers``;
- one FFN width per side: ``encoder_ffn_dim`` / ``decoder_ffn_dim``;
- FFN widths that differ between the layers of a side, and removed attention heads, cannot:
  ``WhisperAttention`` derives ``head_dim = d_model // num_heads`` with one head count per
  side and square projections.

:func:`record_structure` writes what the config can express into it and, when anything else
differs, the per-layer shapes under ``config.asrprune_structure`` (:data:`STRUCTURE_KEY`).
:func:`apply_structure_` rebuilds those shapes on a freshly built model before its weights
are loaded (``asrprune.models.load_model`` does this), so such a checkpoint round-trips through
asrprune. Its weights are saved as :data:`STRUCTURED_WEIGHTS`, so a plain
``WhisperForConditionalGeneration.from_pretrained`` finds no weights and refuses it (given a
``model.safetensors`` whose shapes do not fit, transformers 5 re-initialises them with only a
warning).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["STRUCTURED_WEIGHTS", "STRUCTURE_KEY", "apply_structure_", "is_standard", "layer_stack", "record_structure", "shrink_linear", "structure_of"]

STRUCTURE_KEY = "asrprune_structure"
#: the weights file of such a checkpoint. Not ``model.safetensors``: transformers would load the
#: config's shapes, find the weights do not fit and re-initialise them with a warning only, so a
#: plain ``from_pretrained`` must find no weights at all and refuse.
STRUCTURED_WEIGHTS = "model.structured.safetensors"
SIDES = ("encoder", "decoder")


def layer_stack(model, side: str):
    """The encoder (``side == "encoder"``) or the decoder of a Whisper model."""
    return model.get_encoder() if side == "encoder" else model.get_decoder()


def structure_of(model) -> dict[str, Any]:
    """Per-layer shapes: ``{"head_dim": int, "encoder": [{"ffn": int, "self_heads": int}, ...],
    "decoder": [{"ffn": int, "self_heads": int, "cross_heads": int}, ...]}``."""
    out: dict[str, Any] = {"head_dim": int(model.config.d_model // model.config.encoder_attention_heads)}
    for side in SIDES:
        rows = []
        for layer in layer_stack(model, side).layers:
            row = {"ffn": int(layer.fc1.out_features), "self_heads": int(layer.self_attn.num_heads)}
            if side == "decoder":
                row["cross_heads"] = int(layer.encoder_attn.num_heads)
            rows.append(row)
        out[side] = rows
    return out


def is_standard(model) -> bool:
    """Whether the config alone describes every layer's shapes (plain transformers loads it)."""
    cfg = model.config
    s = structure_of(model)
    heads = {"encoder": cfg.encoder_attention_heads, "decoder": cfg.decoder_attention_heads}
    ffn = {"encoder": cfg.encoder_ffn_dim, "decoder": cfg.decoder_ffn_dim}
    for side in SIDES:
        for row in s[side]:
            if row["ffn"] != ffn[side] or row["self_heads"] != heads[side] or row.get("cross_heads", heads[side]) != heads[side]:
                return False
    return True


def record_structure(model) -> dict[str, Any] | None:
    """Write the model's shapes into its config (layer counts; one FFN width per side when the
    layers agree) and, when the config cannot express them, ``config.asrprune_structure``.

    Returns:
        The recorded per-layer structure, or None when the config alone describes the model.
    """
    cfg = model.config
    s = structure_of(model)
    for side in SIDES:
        setattr(cfg, f"{side}_layers", len(s[side]))
        widths = {row["ffn"] for row in s[side]}
        if len(widths) == 1:
            setattr(cfg, f"{side}_ffn_dim", widths.pop())
    if is_standard(model):
        if hasattr(cfg, STRUCTURE_KEY):
            delattr(cfg, STRUCTURE_KEY)
        return None
    setattr(cfg, STRUCTURE_KEY, s)
    return s


def shrink_linear(linear: nn.Linear, *, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` holding the kept output rows (and bias entries) and input columns."""
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def _resize_linear(linear: nn.Linear, out_features: int, in_features: int) -> nn.Linear:
    if linear.out_features == out_features and linear.in_features == in_features:
        return linear
    return nn.Linear(in_features, out_features, bias=linear.bias is not None, device=linear.weight.device,
                     dtype=linear.weight.dtype)


def _resize_attention(attn, heads: int, head_dim: int) -> None:
    width = heads * head_dim
    d = attn.q_proj.in_features
    attn.q_proj = _resize_linear(attn.q_proj, width, d)
    attn.k_proj = _resize_linear(attn.k_proj, width, attn.k_proj.in_features)
    attn.v_proj = _resize_linear(attn.v_proj, width, attn.v_proj.in_features)
    attn.out_proj = _resize_linear(attn.out_proj, d, width)
    attn.num_heads = heads


def apply_structure_(model, structure: Mapping[str, Any]) -> None:
    """Give a freshly built model the recorded per-layer shapes (weights are loaded afterwards).

    Raises:
        ValueError: the structure does not fit the model (layer counts differ).
    """
    head_dim = int(structure["head_dim"])
    for side in SIDES:
        layers = layer_stack(model, side).layers
        rows = structure[side]
        if len(rows) != len(layers):
            raise ValueError(f"{STRUCTURE_KEY}: {len(rows)} {side} layers recorded, the config builds {len(layers)}")
        for layer, row in zip(layers, rows):
            d = layer.fc1.in_features
            layer.fc1 = _resize_linear(layer.fc1, int(row["ffn"]), d)
            layer.fc2 = _resize_linear(layer.fc2, d, int(row["ffn"]))
            _resize_attention(layer.self_attn, int(row["self_heads"]), head_dim)
            if side == "decoder":
                _resize_attention(layer.encoder_attn, int(row["cross_heads"]), head_dim)
