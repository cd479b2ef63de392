"""Whisper's parts by name: the component taxonomy and the selector language (imports torch only).

Components
==========
A *component* is one leaf module that owns parameters; its ``id`` is its ``named_modules()``
path (e.g. ``model.decoder.layers.3.encoder_attn.q_proj``). Every component has a
:class:`ComponentKind`:

============================  ===========================================================
kind                          modules
============================  ===========================================================
``encoder_conv``              ``encoder.conv1``, ``encoder.conv2``
``encoder_pos_embed``         ``encoder.embed_positions`` (sinusoidal table)
``encoder_self_attn``         ``encoder.layers.i.self_attn.{q,k,v,out}_proj``
``encoder_ffn``               ``encoder.layers.i.fc1``, ``fc2``
``encoder_layer_norm``        ``encoder.layers.i.{self_attn,final}_layer_norm``, ``encoder.layer_norm``
``decoder_token_embed``       ``decoder.embed_tokens`` (tied to ``proj_out``, see below)
``decoder_pos_embed``         ``decoder.embed_positions``
``decoder_self_attn``         ``decoder.layers.i.self_attn.{q,k,v,out}_proj``
``decoder_cross_attn``        ``decoder.layers.i.encoder_attn.{q,k,v,out}_proj``
``decoder_ffn``               ``decoder.layers.i.fc1``, ``fc2``
``decoder_layer_norm``        ``decoder.layers.i.{self_attn,encoder_attn,final}_layer_norm``,
                              ``decoder.layer_norm``
``output_proj``               ``proj_out`` only when it is *not* tied to ``embed_tokens``
``other``                     anything else that owns parameters (adapters, ...)
============================  ===========================================================

Cross-attention (``encoder_attn``) lives in the decoder and is always a decoder component,
never an encoder one: the paper's code matched "encoder" before "decoder" in module names and
so counted it as encoder (PAPER.md, weak point 3). Here the side comes from the module tree.

Whisper ties the output projection ``proj_out.weight`` to ``decoder.embed_tokens.weight``: both
names refer to one tensor, so pruning one prunes the other. The token-embedding component
records the alias in ``Component.tied_with`` and selecting ``proj_out`` selects it.

Weights and biases are separate parameters (``.weight`` / ``.bias``); the tables count both.

Selectors
=========
A selector is a string that names a set of parameters. Forms:

- **paths**: ``encoder`` / ``decoder``, optionally ``.layers``, ``.layers[i]``, ``.layers[a:b]``
  (Python slices, negative indices allowed), ``.layers[i,j,...]`` or ``.layers.i``; then parts
  that narrow the selection, in order:
  ``self_attn``, ``encoder_attn`` (alias ``cross_attn``), ``attn`` (both attentions),
  ``ffn`` (alias ``mlp``: fc1 + fc2), ``fc1``, ``fc2``, ``q_proj``/``q``, ``k_proj``/``k``,
  ``v_proj``/``v``, ``out_proj``/``out``, ``layer_norms``, ``self_attn_layer_norm``,
  ``encoder_attn_layer_norm``, ``final_layer_norm``, ``layer_norm`` (the side's final norm),
  ``conv`` (conv1 + conv2), ``conv1``, ``conv2``, ``embed_positions``, ``embed_tokens``,
  ``embeddings``, and at the end ``weight``, ``bias`` or ``biases``. Examples:
  ``decoder.self_attn``, ``encoder.layers[-4:]``, ``encoder.layers[8:12].ffn``,
  ``decoder.layers[0].ffn.fc1``, ``decoder.layers[1].encoder_attn``, ``encoder.conv``,
  ``decoder.layers.2.self_attn.q_proj.weight``. A leading ``model.`` is ignored, so component
  ids and parameter names are selectors too. ``proj_out`` names the output projection.
- **named groups** (paper wording): ``late_encoder`` (last ceil(n/3) encoder layers: 2 of 4 in
  tiny, 2 of 6 in base, 4 of 12 in small), ``early_encoder``, ``middle_encoder`` (the layers in
  between), ``early_decoder``, ``middle_decoder``, ``late_decoder``, ``encoder_self_attn``,
  ``encoder_ffn``, ``decoder_self_attn``, ``decoder_ffn``, ``cross_attn`` (alias
  ``decoder_cross_attn``), ``all_linear`` (every attention projection and FFN matrix of encoder
  and decoder: the "global magnitude" population), ``biases`` (every bias of the model),
  ``layer_norms``, ``conv``, ``embeddings`` (token + both positional tables),
  ``token_embeddings``, ``positional_embeddings``. A group may be followed by parts:
  ``late_encoder.ffn``, ``all_linear.bias``.
- **regular expressions**: ``re:<regex>`` is matched with ``re.search`` against every parameter
  name (aliases such as ``proj_out.weight`` included) and selects exactly the parameters it
  matches, weights or biases, of any kind.
- **unions**: ``A+B`` selects the union (not available inside ``re:`` selectors).

The explicit-selection rule
---------------------------
A path or group selects the **weights of linear layers** (attention projections and FFN
matrices) only. Biases, layer norms, embeddings and convolutions are selected only when named
explicitly: ``bias``/``biases`` selects biases (``.bias`` keeps the linear-only rule, e.g.
``decoder.self_attn.bias``; ``biases`` takes every bias in scope, norms and convolutions
included, as the paper's bias probe did); naming ``layer_norms``/``*_layer_norm``,
``conv``/``conv1``/``conv2``, ``embed_*``/``embeddings`` or ``proj_out`` admits those modules
(their weights, or biases with ``.bias``). So ``decoder.layers[0]`` is the ten linear weight
matrices of decoder layer 0, never its layer norms or biases.

A selector that matches nothing raises :class:`SelectorError` (a ``ValueError``) that says why
and lists what exists in the model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Iterable

import torch
from torch import nn

from .config import split_top_level

__all__ = [
    "ComponentKind",
    "Component",
    "SelectorError",
    "GROUPS",
    "list_components",
    "select_parameters",
    "select_components",
    "component_table",
    "group_table",
    "linear_weight_names",
    "tied_parameters",
    "layer_thirds",
]


class ComponentKind(str, Enum):
    """What a component is; the value is the string used in tables and result files."""

    ENCODER_CONV = "encoder_conv"
    ENCODER_POS_EMBED = "encoder_pos_embed"
    ENCODER_SELF_ATTN = "encoder_self_attn"
    ENCODER_FFN = "encoder_ffn"
    ENCODER_LAYER_NORM = "encoder_layer_norm"
    DECODER_TOKEN_EMBED = "decoder_token_embed"
    DECODER_POS_EMBED = "decoder_pos_embed"
    DECODER_SELF_ATTN = "decoder_self_attn"
    DECODER_CROSS_ATTN = "decoder_cross_attn"
    DECODER_FFN = "decoder_ffn"
    DECODER_LAYER_NORM = "decoder_layer_norm"
    OUTPUT_PROJ = "output_proj"
    OTHER = "other"

    def __str__(self) -> str:  # so f-strings print "decoder_ffn", not "ComponentKind.DECODER_FFN"
        return self.value


# category of a component: drives the explicit-selection rule
LINEAR, CONV, NORM, EMBEDDING, OTHER = "linear", "conv", "norm", "embedding", "other"


@dataclass(frozen=True)
class Component:
    """One leaf module that owns parameters.

    Attributes:
        id: the ``named_modules()`` path, e.g. ``model.decoder.layers.3.self_attn.q_proj``.
        kind: its :class:`ComponentKind`.
        side: ``"encoder"``, ``"decoder"`` or ``"model"`` (``proj_out`` and unknown modules).
        layer: layer index for per-layer modules, else ``None``.
        params: canonical parameter names it owns (as in ``model.named_parameters()``).
        part: path inside the layer (or side), e.g. ``("encoder_attn", "q_proj")``, ``("fc1",)``,
            ``("conv1",)``.
        category: ``"linear"`` (attention/FFN matrices), ``"conv"``, ``"norm"``, ``"embedding"``
            (token/positional tables and an untied ``proj_out``) or ``"other"``.
        tied_with: other names of the same tensors (``("proj_out.weight",)`` for tied embeddings).
    """

    id: str
    kind: ComponentKind
    side: str
    layer: int | None
    params: tuple[str, ...]
    part: tuple[str, ...] = ()
    category: str = LINEAR
    tied_with: tuple[str, ...] = field(default=())

    def describe(self) -> dict:
        """``id``, ``kind``, ``side``, ``layer``: how tables and result files name a component."""
        return {"id": self.id, "kind": self.kind.value, "side": self.side, "layer": self.layer}


class SelectorError(ValueError):
    """A selector is malformed or matches nothing; the message lists what exists."""


# --------------------------------------------------------------------------------------------
# taxonomy
# --------------------------------------------------------------------------------------------

_ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class _Sides:
    encoder: tuple[str, nn.Module] | None
    decoder: tuple[str, nn.Module] | None


def _find_sides(model: nn.Module) -> _Sides:
    enc = dec = None
    for name, mod in model.named_modules():
        layers = getattr(mod, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            continue
        if enc is None and hasattr(mod, "conv1") and hasattr(mod, "conv2"):
            enc = (name, mod)
        elif dec is None and hasattr(mod, "embed_tokens"):
            dec = (name, mod)
    if enc is None and dec is None:
        raise ValueError(
            f"{type(model).__name__} does not look like a Whisper model: no encoder (conv1, "
            "conv2, layers) and no decoder (embed_tokens, layers) module found"
        )
    return _Sides(enc, dec)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _classify(side: str, part: tuple[str, ...]) -> tuple[ComponentKind, str]:
    """Kind and category of a per-layer or side-level module from its local path."""
    head, last = part[0], part[-1]
    enc = side == "encoder"
    if head == "self_attn" and last in _ATTN_PROJ:
        return (ComponentKind.ENCODER_SELF_ATTN if enc else ComponentKind.DECODER_SELF_ATTN), LINEAR
    if head == "encoder_attn" and last in _ATTN_PROJ and not enc:
        return ComponentKind.DECODER_CROSS_ATTN, LINEAR
    if len(part) == 1 and head in ("fc1", "fc2"):
        return (ComponentKind.ENCODER_FFN if enc else ComponentKind.DECODER_FFN), LINEAR
    if len(part) == 1 and head.endswith("layer_norm"):
        return (ComponentKind.ENCODER_LAYER_NORM if enc else ComponentKind.DECODER_LAYER_NORM), NORM
    if len(part) == 1 and head in ("conv1", "conv2") and enc:
        return ComponentKind.ENCODER_CONV, CONV
    if len(part) == 1 and head == "embed_positions":
        return (ComponentKind.ENCODER_POS_EMBED if enc else ComponentKind.DECODER_POS_EMBED), EMBEDDING
    if len(part) == 1 and head == "embed_tokens" and not enc:
        return ComponentKind.DECODER_TOKEN_EMBED, EMBEDDING
    return ComponentKind.OTHER, OTHER


def tied_parameters(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Map each canonical parameter name to the other names of the same tensor.

    ``named_parameters()`` yields a shared tensor once, under its first name
    (``model.decoder.embed_tokens.weight``); the aliases (``proj_out.weight``) are listed here.

    Returns:
        ``{canonical_name: (alias, ...)}`` for tensors with more than one name only.
    """
    first: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in first:
            aliases.setdefault(first[key], []).append(name)
        else:
            first[key] = name
    return {k: tuple(v) for k, v in aliases.items()}


def _alias_map(model: nn.Module) -> dict[str, str]:
    """Every parameter name (aliases included) -> canonical name."""
    out: dict[str, str] = {}
    for canon, aliases in tied_parameters(model).items():
        for a in aliases:
            out[a] = canon
    for name, _ in model.named_parameters():
        out[name] = name
    return out


def list_components(model: nn.Module) -> list[Component]:
    """All components of a Whisper model, in ``named_modules()`` order.

    Args:
        model: ``WhisperForConditionalGeneration``, ``WhisperModel`` or a module containing a
            Whisper encoder and/or decoder.

    Returns:
        One :class:`Component` per leaf module with parameters of its own. A tied output
        projection does not get its own component: the token-embedding component carries the
        alias in ``tied_with``.

    Raises:
        ValueError: when no Whisper encoder or decoder is found.
    """
    sides = _find_sides(model)
    canonical = dict(model.named_parameters())
    ties = tied_parameters(model)
    side_of: list[tuple[str, str]] = []  # (prefix, side) longest first
    for side_name, found in (("encoder", sides.encoder), ("decoder", sides.decoder)):
        if found is not None:
            side_of.append((found[0], side_name))

    comps: list[Component] = []
    for mod_name, mod in model.named_modules():
        own = [(_join(mod_name, pn), p) for pn, p in mod.named_parameters(recurse=False)]
        own_canon = tuple(n for n, _ in own if n in canonical)
        if not own_canon:
            continue  # no parameters, or only aliases of a tensor owned elsewhere
        side, layer, part = "model", None, tuple(mod_name.split(".")) if mod_name else ()
        for prefix, side_name in side_of:
            if mod_name == prefix or not mod_name.startswith(prefix + "." if prefix else ""):
                continue
            rest = mod_name[len(prefix) + 1 :] if prefix else mod_name
            bits = rest.split(".")
            side = side_name
            if len(bits) >= 3 and bits[0] == "layers" and bits[1].isdigit():
                layer, part = int(bits[1]), tuple(bits[2:])
            else:
                part = tuple(bits)
            break
        if side == "model":
            is_proj_out = mod_name.split(".")[-1] == "proj_out"
            kind = ComponentKind.OUTPUT_PROJ if is_proj_out else ComponentKind.OTHER
            category = EMBEDDING if is_proj_out else OTHER
        else:
            kind, category = _classify(side, part)
        tied = tuple(a for n in own_canon for a in ties.get(n, ()))
        comps.append(Component(mod_name, kind, side, layer, own_canon, part, category, tied))
    return comps


def linear_weight_names(model: nn.Module) -> list[str]:
    """Names of every attention-projection and FFN weight matrix (encoder and decoder).

    This is the population of "global magnitude pruning of all linear weights".
    """
    return [
        p for c in list_components(model) if c.category == LINEAR for p in c.params if p.endswith(".weight")
    ]


def _n_layers(model: nn.Module) -> dict[str, int]:
    sides = _find_sides(model)
    return {
        s: len(found[1].layers)  # type: ignore[union-attr]
        for s, found in (("encoder", sides.encoder), ("decoder", sides.decoder))
        if found is not None
    }


def layer_thirds(n_layers: int) -> tuple[range, range, range]:
    """Split ``n_layers`` into (early, middle, late): early and late have ceil(n/3) layers each.

    ``late`` of 4 layers is 2 (layers 2, 3), of 6 is 2, of 12 is 4 (layers 8-11, the paper's
    "encoder layers 9-12"); ``middle`` is what remains (empty for 4 layers).
    """
    k = math.ceil(n_layers / 3)
    return range(0, k), range(k, max(k, n_layers - k)), range(max(0, n_layers - k), n_layers)


# --------------------------------------------------------------------------------------------
# selector language
# --------------------------------------------------------------------------------------------

_Pred = Callable[[Component], bool]

# part name -> (predicate, categories it admits explicitly)
_PARTS: dict[str, tuple[_Pred, frozenset[str]]] = {}


def _part(names: Iterable[str], pred: _Pred, admits: Iterable[str] = ()) -> None:
    for n in names:
        _PARTS[n] = (pred, frozenset(admits))


_part(["self_attn"], lambda c: c.part[:1] == ("self_attn",))
_part(["encoder_attn", "cross_attn"], lambda c: c.part[:1] == ("encoder_attn",))
_part(["attn"], lambda c: c.part[:1] in (("self_attn",), ("encoder_attn",)))
_part(["ffn", "mlp"], lambda c: c.part[:1] in (("fc1",), ("fc2",)))
_part(["fc1"], lambda c: c.part[:1] == ("fc1",))
_part(["fc2"], lambda c: c.part[:1] == ("fc2",))
for _short in ("q", "k", "v", "out"):
    _part(
        [f"{_short}_proj", _short],
        (lambda proj: lambda c: len(c.part) == 2 and c.part[1] == proj)(f"{_short}_proj"),
    )
_part(["layer_norms"], lambda c: c.category == NORM, [NORM])
for _ln in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm", "layer_norm"):
    _part([_ln], (lambda ln: lambda c: c.part == (ln,))(_ln), [NORM])
_part(["conv"], lambda c: c.part in (("conv1",), ("conv2",)), [CONV])
_part(["conv1"], lambda c: c.part == ("conv1",), [CONV])
_part(["conv2"], lambda c: c.part == ("conv2",), [CONV])
_part(["embed_positions"], lambda c: c.part == ("embed_positions",), [EMBEDDING])
_part(["embed_tokens"], lambda c: c.part == ("embed_tokens",), [EMBEDDING])
_part(["embeddings"], lambda c: c.category == EMBEDDING, [EMBEDDING])

_SUFFIXES = ("weight", "bias", "biases")

GROUPS: dict[str, str] = {
    "all_linear": "all attention projections and FFN matrices (encoder + decoder)",
    "encoder_self_attn": "encoder self-attention q/k/v/out of every layer",
    "encoder_ffn": "encoder fc1/fc2 of every layer",
    "decoder_self_attn": "decoder self-attention q/k/v/out of every layer",
    "decoder_ffn": "decoder fc1/fc2 of every layer",
    "cross_attn": "decoder cross-attention (encoder_attn) q/k/v/out of every layer",
    "decoder_cross_attn": "alias of cross_attn",
    "early_encoder": "all linear weights of the first ceil(n/3) encoder layers",
    "middle_encoder": "all linear weights of the encoder layers between early and late",
    "late_encoder": "all linear weights of the last ceil(n/3) encoder layers",
    "early_decoder": "all linear weights of the first ceil(n/3) decoder layers",
    "middle_decoder": "all linear weights of the decoder layers between early and late",
    "late_decoder": "all linear weights of the last ceil(n/3) decoder layers",
    "biases": "every bias of the model (linear, conv and layer norm)",
    "layer_norms": "every layer-norm weight (gamma) of encoder and decoder",
    "conv": "encoder conv1 and conv2 weights",
    "embeddings": "token embeddings (= tied output projection) and both positional tables",
    "token_embeddings": "decoder token embeddings (= tied output projection)",
    "positional_embeddings": "encoder and decoder positional tables",
}
"""Named groups of the selector language -> what they mean (for help texts and errors)."""


def _group_paths(name: str, n_layers: dict[str, int]) -> list[str] | None:
    """Expand a named group into path selectors (``None`` when ``name`` is no group)."""
    simple = {
        "all_linear": ["encoder", "decoder"],
        "encoder_self_attn": ["encoder.self_attn"],
        "encoder_ffn": ["encoder.ffn"],
        "decoder_self_attn": ["decoder.self_attn"],
        "decoder_ffn": ["decoder.ffn"],
        "cross_attn": ["decoder.encoder_attn"],
        "decoder_cross_attn": ["decoder.encoder_attn"],
        "biases": ["encoder.biases", "decoder.biases", "proj_out.biases"],  # + any other bias
        "layer_norms": ["encoder.layer_norms", "decoder.layer_norms"],
        "conv": ["encoder.conv"],
        "embeddings": ["encoder.embeddings", "decoder.embeddings"],
        "token_embeddings": ["decoder.embed_tokens"],
        "positional_embeddings": ["encoder.embed_positions", "decoder.embed_positions"],
    }
    if name in simple:
        return simple[name]
    m = re.fullmatch(r"(early|middle|late)_(encoder|decoder)", name)
    if m:
        which, side = m.groups()
        n = n_layers.get(side, 0)
        early, middle, late = layer_thirds(n)
        rng = {"early": early, "middle": middle, "late": late}[which]
        return [f"{side}.layers[{rng.start}:{rng.stop}]"]
    return None


_SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*|\d+)(\[[^\]]*\])?$")


def _split_segments(path: str) -> list[str]:
    """Split on dots outside brackets."""
    return split_top_level(path, ".", opening="[", closing="]")


def _layer_index(spec: str, n: int, selector: str, side: str) -> list[int]:
    """Resolve ``"3"``, ``"-4:"``, ``"8:12"``, ``"0,2"`` against ``n`` layers."""
    spec = spec.strip()
    try:
        if ":" in spec:
            bits = [b.strip() for b in spec.split(":")]
            if len(bits) > 3:
                raise ValueError
            ints = [int(b) if b else None for b in bits]
            idx = list(range(n))[slice(*ints)]
        else:
            idx = []
            for b in spec.split(","):
                i = int(b.strip())
                if not -n <= i < n:
                    raise SelectorError(
                        f"selector {selector!r}: layer index {i} is out of range, the {side} has "
                        f"{n} layers (0..{n - 1}, or negative from the end)"
                    )
                idx.append(i % n)
    except SelectorError:
        raise
    except ValueError:
        raise SelectorError(
            f"selector {selector!r}: bad layer index [{spec}]; use [i], [a:b], [-k:] or [i,j]"
        ) from None
    if not idx:
        raise SelectorError(
            f"selector {selector!r}: layers[{spec}] is empty, the {side} has {n} layers"
        )
    return sorted(set(idx))


@dataclass
class _Resolved:
    comps: list[Component]
    admits: set[str]
    want: str  # "weight", "bias", "all_bias"


def _resolve_path(
    path: str, selector: str, comps: list[Component], n_layers: dict[str, int]
) -> list[_Resolved]:
    segs = _split_segments(path.strip())
    if any(not s for s in segs):
        raise SelectorError(f"selector {selector!r} has an empty part (two dots or a trailing dot)")
    parsed = []
    for s in segs:
        m = _SEGMENT.match(s)
        if not m:
            raise SelectorError(f"selector {selector!r}: cannot read part {s!r}")
        parsed.append((m.group(1), m.group(2)[1:-1] if m.group(2) else None))

    if parsed and parsed[0] == ("model", None) and len(parsed) > 1:
        parsed = parsed[1:]
    head, bracket = parsed[0]

    # named group, possibly followed by parts: resolve each expansion on its own
    group = _group_paths(head, n_layers) if bracket is None else None
    if group is not None:
        rest = ".".join(segs[len(segs) - len(parsed) + 1 :])
        if head == "biases" and rest:
            raise SelectorError(f"selector {selector!r}: nothing can follow the 'biases' group")
        results: list[_Resolved] = []
        first_error: SelectorError | None = None
        for g in group:
            try:
                results.extend(_resolve_path(g + ("." + rest if rest else ""), selector, comps, n_layers))
            except SelectorError as exc:
                # e.g. the middle third of a 4-layer encoder is empty; the group as a whole
                # fails only when every expansion does
                first_error = first_error or exc
        if not results:
            assert first_error is not None
            raise SelectorError(
                f"{first_error} (while expanding group {head!r} = {' + '.join(group)})"
            ) from None
        return results

    if head == "proj_out":
        scope = [
            c
            for c in comps
            if c.part[-1:] == ("proj_out",) or any(t.split(".")[-2:-1] == ["proj_out"] for t in c.tied_with)
        ]
        if not scope:
            raise SelectorError(f"selector {selector!r}: this model has no proj_out")
        admits: set[str] = {LINEAR, EMBEDDING}
        parsed = parsed[1:]
    elif head in ("encoder", "decoder"):
        if head not in n_layers:
            raise SelectorError(f"selector {selector!r}: this model has no {head}")
        if bracket is not None:
            raise SelectorError(f"selector {selector!r}: brackets go after 'layers', not {head!r}")
        scope = [c for c in comps if c.side == head]
        admits = {LINEAR}
        parsed = parsed[1:]
        if parsed and parsed[0][0] == "layers":
            _, br = parsed[0]
            parsed = parsed[1:]
            scope = [c for c in scope if c.layer is not None]
            spec = br
            if spec is None and parsed and parsed[0][0].isdigit():
                spec = parsed[0][0]
                parsed = parsed[1:]
            if spec is not None:
                keep = set(_layer_index(spec, n_layers[head], selector, head))
                scope = [c for c in scope if c.layer in keep]
    else:
        raise SelectorError(
            f"selector {selector!r}: {head!r} is not a group, and paths start with encoder, "
            "decoder or proj_out"
        )

    want = "weight"
    for i, (name, br) in enumerate(parsed):
        if br is not None:
            raise SelectorError(f"selector {selector!r}: only 'layers' takes brackets, not {name!r}")
        if name in _SUFFIXES:
            if i != len(parsed) - 1:
                raise SelectorError(f"selector {selector!r}: {name!r} must be the last part")
            if name == "biases":
                want, admits = "all_bias", {LINEAR, CONV, NORM, EMBEDDING, OTHER}
            else:
                want = name
            break
        if name not in _PARTS:
            raise SelectorError(
                f"selector {selector!r}: unknown part {name!r}; known parts: "
                + ", ".join(sorted(_PARTS)) + ", and weight/bias/biases at the end"
            )
        pred, adm = _PARTS[name]
        narrowed = [c for c in scope if pred(c)]
        if scope and not narrowed:
            prefix = ".".join(segs[: len(segs) - len(parsed) + i])
            raise SelectorError(
                f"selector {selector!r}: there is no {name!r} in {prefix!r}"
                + (" (cross-attention, encoder_attn, belongs to the decoder)" if name in ("cross_attn", "encoder_attn") else "")
            )
        scope = narrowed
        admits |= adm
    return [_Resolved(scope, admits, want)]


def _param_names(res: _Resolved) -> list[str]:
    out = []
    for c in res.comps:
        if c.category not in res.admits:
            continue
        for p in c.params:
            leaf = p.rsplit(".", 1)[-1]
            if res.want == "weight" and leaf == "weight":
                out.append(p)
            elif res.want in ("bias", "all_bias") and leaf == "bias":
                out.append(p)
    return out


def _summary(model: nn.Module, comps: list[Component], n_layers: dict[str, int]) -> str:
    lines = ["groups: " + ", ".join(GROUPS)]
    for side in ("encoder", "decoder"):
        if side not in n_layers:
            continue
        side_level = sorted({".".join(c.part) for c in comps if c.side == side and c.layer is None})
        per_layer = sorted({".".join(c.part) for c in comps if c.side == side and c.layer is not None})
        lines.append(
            f"{side}: {n_layers[side]} layers (layers[0]..layers[{n_layers[side] - 1}]), "
            f"per layer: {', '.join(per_layer)}; {side}-level: {', '.join(side_level)}"
        )
    other = [c.id for c in comps if c.side == "model"]
    if other:
        lines.append("other modules: " + ", ".join(other))
    if tied_parameters(model):
        lines.append("proj_out is tied to decoder.embed_tokens")
    lines.append("regular expressions over parameter names: re:<regex>")
    return "\n  ".join(lines)


def select_parameters(model: nn.Module, selector: str) -> list[str]:
    """Resolve a selector into canonical parameter names (see the module docstring).

    Args:
        model: a Whisper model.
        selector: e.g. ``"decoder.self_attn"``, ``"late_encoder"``, ``"re:fc1\\.bias$"``.

    Returns:
        Parameter names as in ``model.named_parameters()``, in that order, without duplicates
        (a tied output projection is reported under its canonical token-embedding name).

    Raises:
        SelectorError: malformed selector, or one that matches no parameter; the message lists
            the groups and module paths that exist.
    """
    if not isinstance(selector, str) or not selector.strip():
        raise SelectorError(f"selector must be a non-empty string, got {selector!r}")
    selector = selector.strip()
    comps = list_components(model)
    n_layers = _n_layers(model)
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}

    chosen: set[str] = set()
    try:
        if selector.startswith("re:"):
            alternatives = [selector]
        else:
            alternatives = [a.strip() for a in selector.split("+")]
            if any(not a for a in alternatives):
                raise SelectorError(f"selector {selector!r} has an empty alternative around '+'")
        for alt in alternatives:
            chosen.update(_select_one(model, alt, selector, comps, n_layers))
    except SelectorError as exc:
        raise SelectorError(
            f"{exc}\nWhat exists in this model:\n  {_summary(model, comps, n_layers)}"
        ) from None
    return sorted(chosen, key=order.__getitem__)


def _select_one(
    model: nn.Module, alt: str, selector: str, comps: list[Component], n_layers: dict[str, int]
) -> list[str]:
    if alt.startswith("re:"):
        pattern = alt[3:]
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise SelectorError(f"selector {selector!r}: invalid regular expression: {exc}") from None
        names = {canon for name, canon in _alias_map(model).items() if rx.search(name)}
        if not names:
            raise SelectorError(f"selector {selector!r}: the regular expression matches no parameter name")
        return list(names)
    if alt == "biases":
        # every bias of the model, also of modules outside the taxonomy
        return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"]
    resolved = _resolve_path(alt, selector, comps, n_layers)
    names = [n for res in resolved for n in _param_names(res)]
    if not names:
        reached = {str(c.kind) for res in resolved for c in res.comps}
        found = ", ".join(sorted(reached))
        why = (
            f" (it reaches {found}, but those are selected only when named explicitly: add "
            "'.bias'/'biases', or name layer_norms, conv, embeddings)"
            if reached
            else ""
        )
        raise SelectorError(f"selector {selector!r} matches no parameter{why}")
    return names


def select_components(model: nn.Module, selector: str) -> list[Component]:
    """Components owning at least one parameter chosen by ``selector`` (model order).

    Raises:
        SelectorError: as :func:`select_parameters`.
    """
    names = set(select_parameters(model, selector))
    return [c for c in list_components(model) if names.intersection(c.params)]


def component_table(model: nn.Module) -> list[dict]:
    """One row per component with parameter counts (JSON-able).

    Returns:
        Dicts with keys ``id``, ``kind``, ``side``, ``layer``, ``category``, ``weights``
        (number of weight entries), ``biases`` (number of bias entries), ``nonzero`` (non-zero
        entries over both), ``sparsity`` (measured fraction of zeros over both) and ``tied_with``
        (aliases; a note for the tied token embedding / output projection).
    """
    params = dict(model.named_parameters())
    rows = []
    for c in list_components(model):
        w = sum(params[p].numel() for p in c.params if p.endswith(".weight"))
        b = sum(params[p].numel() for p in c.params if p.endswith(".bias"))
        total = sum(params[p].numel() for p in c.params)
        nz = sum(int(torch.count_nonzero(params[p].detach())) for p in c.params)
        rows.append(
            {
                **c.describe(),
                "category": c.category,
                "weights": int(w),
                "biases": int(b),
                "nonzero": nz,
                "sparsity": (1.0 - nz / total) if total else 0.0,
                "tied_with": list(c.tied_with),
                "note": (
                    f"tied to {', '.join(c.tied_with)}: pruning one prunes the other"
                    if c.tied_with
                    else ""
                ),
            }
        )
    return rows


def group_table(model: nn.Module) -> list[dict]:
    """What every named group selects in this model.

    Returns:
        Dicts with ``group``, ``description``, ``parameters`` (tensor count), ``numel`` and
        ``layers`` (for layer-range groups, the layer indices); groups that select nothing in
        this model (e.g. ``middle_encoder`` of a 4-layer encoder) have ``parameters == 0``.
    """
    params = dict(model.named_parameters())
    n_layers = _n_layers(model)
    rows = []
    for g, desc in GROUPS.items():
        try:
            names = select_parameters(model, g)
        except SelectorError:
            names = []
        layers = None
        m = re.fullmatch(r"(early|middle|late)_(encoder|decoder)", g)
        if m and m.group(2) in n_layers:
            third = dict(zip(("early", "middle", "late"), layer_thirds(n_layers[m.group(2)])))
            layers = list(third[m.group(1)])
        rows.append(
            {
                "group": g,
                "description": desc,
                "parameters": len(names),
                "numel": int(sum(params[n].numel() for n in names)),
                "layers": layers,
            }
        )
    return rows
