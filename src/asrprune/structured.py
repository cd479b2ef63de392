"""Structured pruning: remove FFN neurons, attention heads and whole layers (smaller matrices).

Plan entries with ``unit: neurons | heads | layers`` (:mod:`asrprune.config`) are removed
physically:

- **neurons** of a layer's FFN: rows of ``fc1`` (and its bias) with the matching columns of
  ``fc2``; ``round(s * n)`` per selected layer;
- **heads** of an attention (encoder self-attention, decoder self-attention, cross-attention):
  the head's rows of q, k, v (and biases) and columns of ``out_proj``; ``round(s * n_heads)`` per
  selected attention, half rounded up (0.25 of 6 heads removes 2: ``round(1.5)``... see
  :func:`asrprune.masks.n_to_prune`, which rounds 1.5 to 2);
- **layers**: ``SEL=drop`` removes every layer the selector reaches (``decoder.layers[1:-1]=drop``
  keeps the first and last decoder layers, as distil-whisper does); ``SEL=0.5@layers`` removes
  ``round(s * n)`` of them, the least important first. A side keeps at least one layer.

Importance, one-shot, from calibration data kept apart from evaluation (the plan's ``score``):

- ``magnitude``: the L2 norm of the unit's weights (a neuron: its ``fc1`` row and ``fc2``
  column; a head: its q/k/v rows and ``out_proj`` columns; a layer: its linear weights, RMS);
- ``wanda`` (activation-aware): the energy of the unit's output on the calibration tokens:
  a neuron ``||fc2[:, j]||^2 * E[a_j^2]``, a head ``E||W_o[:, h] x_h||^2`` (exact, from the Gram
  matrix of ``out_proj``'s inputs), a layer the sum over its heads and neurons;
- ``fluctuation`` (FLAP, An et al. 2024): the same with the variance in place of the second
  moment, ``||fc2[:, j]||^2 * Var(a_j)``; what such a unit carries is mostly its mean, which
  ``repair="bias"`` puts back;
- ``loss`` (measured): the teacher-forced calibration loss with the unit removed, per head and
  per layer (tiny.en has 72 heads and 8 layers); per neuron it would take thousands of passes,
  so neurons are measured in groups: each layer's neurons ordered by their ``wanda`` energy and
  cut into :data:`NEURON_GROUPS` equal groups; a neuron's score is its group's loss change, ties
  broken by its energy.

Repair, in the layer that reads the removed units (``fc2`` for neurons, ``out_proj`` for heads),
from the same calibration statistics (taken on the dense model, like the importances):

- ``repair="bias"`` (FLAP's bias compensation): the mean contribution of what is removed is added
  to the next bias, ``fc2.bias += W2[:, removed] @ mean(a_removed)`` for neurons and
  ``out_proj.bias += W_o[:, removed] @ mean(x_removed)`` for heads;
- ``repair="refit"``: the kept columns and the bias are refitted by ridge least squares so that
  the layer's output on the calibration tokens is as close as it can be to the dense one:
  ``W'_K = W_K + W_R C_RK (C_KK + lambda I)^-1`` with the input covariance ``C``, the bias
  taking the rest of the mean (``lambda``: ``CalibrationOptions.damp`` times the mean of
  ``diag C_KK``). Without correlation between removed and kept inputs it is ``bias``.

Order: every importance is computed on the dense model first; then heads and neurons are removed,
then layers; weight entries of the same plan (unstructured) prune the model that results. The
shapes are written into the config (:func:`asrprune.shapes.record_structure`): uniform FFN widths
and dropped layers load with plain transformers; per-layer widths and removed heads load through
:func:`asrprune.models.load_model`. ``generation_config.alignment_heads`` is remapped to the
layers and heads that remain (or dropped with a note when none remain).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .calibration import CalibrationExample, CalibrationOptions, collect_input_stats
from .components import select_parameters
from .config import REPAIRS, PlanError, PrunePlan
from .damage import _LossEvaluator
from .masks import n_to_prune
from .prune import PruneResult, measure_model, prune_model
from .shapes import layer_stack, record_structure, shrink_linear, structure_of

log = logging.getLogger(__name__)

__all__ = ["NEURON_GROUPS", "REPAIRS", "prune_structured", "remap_alignment_heads", "structured_targets"]

NEURON_GROUPS = 8  # neuron groups per layer of the measured (loss) importance
_LAYER = re.compile(r"(?:^|\.)(encoder|decoder)\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class _Target:
    """One unit population of an entry: a layer's FFN, an attention, or a side's layer list."""

    entry: int
    unit: str
    side: str
    layer: int | None  # None for layer populations
    attn: str | None = None  # "self_attn" | "encoder_attn"
    layers: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        if self.unit == "layers":
            return f"{self.side}.layers"
        return f"{self.side}.layers.{self.layer}." + (self.attn if self.unit == "heads" else "ffn")


def _prefix(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def structured_targets(model, plan: PrunePlan) -> list[_Target]:
    """What each structured entry reaches, checked: FFNs for neurons, attentions for heads,
    layers for layers.

    Raises:
        PlanError: an entry selects the wrong kind of weights, two entries reach the same units,
            or layer removal would leave a side without layers.
    """
    out: list[_Target] = []
    seen: dict[str, str] = {}
    for i, e in enumerate(plan.entries):
        if not e.structured:
            continue
        names = select_parameters(model, e.selector)
        where: dict[tuple[str, int], set[str]] = {}
        for n in names:
            m = _LAYER.search(n)
            if m is None:
                raise PlanError(f"{e.to_text()}: {n} is not inside an encoder or decoder layer; "
                                f"{e.unit} are removed from layers")
            where.setdefault((m.group(1), int(m.group(2))), set()).add(m.group(3))
        if e.unit == "neurons":
            for (side, layer), parts in sorted(where.items()):
                bad = sorted(p for p in parts if not p.startswith(("fc1.", "fc2.")))
                if bad:
                    raise PlanError(f"{e.to_text()}: @neurons removes FFN neurons, but the selector reaches {bad[0]} "
                                    f"of {side} layer {layer}; select FFNs (e.g. {side}.ffn)")
                out.append(_Target(i, "neurons", side, layer))
        elif e.unit == "heads":
            for (side, layer), parts in sorted(where.items()):
                attns = set()
                for p in parts:
                    head = p.split(".")[0]
                    if head not in ("self_attn", "encoder_attn"):
                        raise PlanError(f"{e.to_text()}: @heads removes attention heads, but the selector reaches "
                                        f"{p} of {side} layer {layer}; select attentions (e.g. {side}.self_attn)")
                    attns.add(head)
                out += [_Target(i, "heads", side, layer, attn=a) for a in sorted(attns)]
        else:
            for side in ("encoder", "decoder"):
                layers = tuple(sorted(layer for s, layer in where if s == side))
                if layers:
                    out.append(_Target(i, "layers", side, None, layers=layers))
    for t in out:
        for k in ([f"{t.side}.layers.{j}" for j in t.layers] if t.unit == "layers" else [t.key]):
            prev = seen.get(k)
            if prev is not None:
                raise PlanError(f"{k} is reached by two structured entries ({prev} and "
                                f"{plan.entries[t.entry].to_text()}); give each unit one entry")
            seen[k] = plan.entries[t.entry].to_text()
    for side in ("encoder", "decoder"):
        n = len(layer_stack(model, side).layers)
        drop = sum(n_to_prune(len(t.layers), plan.entries[t.entry].sparsity) for t in out
                   if t.unit == "layers" and t.side == side)
        if drop >= n:
            raise PlanError(f"the plan removes all {n} {side} layers; a side keeps at least one")
    return out


# ----------------------------------------------------------------------------------------------
# importance
# ----------------------------------------------------------------------------------------------


def _ffn(model, side: str, layer: int):
    return layer_stack(model, side).layers[layer]


def _head_rows(attn, h: int) -> slice:
    hd = attn.q_proj.out_features // attn.num_heads
    return slice(h * hd, (h + 1) * hd)


def _neuron_magnitude(layer) -> Tensor:
    w1, w2 = layer.fc1.weight.detach().double(), layer.fc2.weight.detach().double()
    return (w1.pow(2).sum(1) + w2.pow(2).sum(0)).sqrt()


def _head_magnitude(attn) -> Tensor:
    out = []
    for h in range(attn.num_heads):
        r = _head_rows(attn, h)
        sq = sum(float(p.weight.detach()[r].double().pow(2).sum()) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        sq += float(attn.out_proj.weight.detach()[:, r].double().pow(2).sum())
        out.append(sq ** 0.5)
    return torch.tensor(out, dtype=torch.float64)


def _neuron_energy(layer, st, *, fluctuation: bool) -> Tensor:
    w2 = layer.fc2.weight.detach().double().pow(2).sum(0).cpu()
    moment = st.variance if fluctuation else st.sq / max(st.n_tokens, 1)
    return w2 * moment.cpu()


def _head_energy(attn, st, *, fluctuation: bool) -> Tensor:
    wo = attn.out_proj.weight.detach().double().cpu()
    out = []
    for h in range(attn.num_heads):
        r = _head_rows(attn, h)
        if fluctuation:
            out.append(float((wo[:, r].pow(2).sum(0) * st.variance.cpu()[r]).sum()))
        else:  # E||W_h x_h||^2 = tr(W_h^T W_h G_hh) / n
            g = st.gram.cpu()[r, r] / max(st.n_tokens, 1)
            out.append(float(((wo[:, r].T @ wo[:, r]) * g).sum()))
    return torch.tensor(out, dtype=torch.float64)


class _Zeroed:
    """Temporarily remove units (zero a neuron's fc1 row + bias, a head's v rows + bias, or skip a
    layer with a forward hook) for the measured importance; restored exactly on exit."""

    def __init__(self, model, target: _Target, index):
        self.model, self.t, self.index = model, target, index
        self.saved: list[tuple[Tensor, Any, Tensor]] = []
        self.hook = None

    def _zero(self, tensor: Tensor, idx) -> None:
        self.saved.append((tensor, idx, tensor.detach()[idx].clone()))
        with torch.no_grad():
            tensor[idx] = 0

    def __enter__(self) -> "_Zeroed":
        t = self.t
        if t.unit == "neurons":
            layer = _ffn(self.model, t.side, t.layer)
            self._zero(layer.fc1.weight, self.index)
            if layer.fc1.bias is not None:
                self._zero(layer.fc1.bias, self.index)
        elif t.unit == "heads":
            attn = getattr(_ffn(self.model, t.side, t.layer), t.attn)
            r = _head_rows(attn, int(self.index))
            self._zero(attn.v_proj.weight, r)
            if attn.v_proj.bias is not None:
                self._zero(attn.v_proj.bias, r)
        else:
            layer = layer_stack(self.model, t.side).layers[int(self.index)]

            def skip(module, args, output):
                x = args[0]
                return (x, *output[1:]) if isinstance(output, tuple) else x

            self.hook = layer.register_forward_hook(skip)
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for tensor, idx, values in reversed(self.saved):
                tensor[idx] = values
        if self.hook is not None:
            self.hook.remove()

    def names(self) -> list[str]:
        """Parameter names of what changed (where the loss pass may start)."""
        t = self.t
        layer = layer_stack(self.model, t.side).layers[t.layer if t.layer is not None else int(self.index)]
        prefix = _prefix(self.model, layer)
        return [f"{prefix}.{n}" for n, _ in layer.named_parameters()]


def _measured(model, targets: Sequence[_Target], examples, progress: bool, energy: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The calibration loss change of removing each unit (neurons: in groups), on the dense model."""
    ev = _LossEvaluator(model, examples, cache_mb=2048.0, progress=False)
    base = float(sum(ev.baseline_losses) / len(ev.baseline_losses))
    out: dict[str, Tensor] = {}
    jobs = []
    for t in targets:
        if t.unit == "heads":
            n = getattr(_ffn(model, t.side, t.layer), t.attn).num_heads
            jobs += [(t, h, h) for h in range(n)]
        elif t.unit == "layers":
            jobs += [(t, j, j) for j in t.layers]
        else:
            order = torch.argsort(energy[t.key], stable=True)
            for g, idx in enumerate(torch.tensor_split(order, NEURON_GROUPS)):
                if len(idx):
                    jobs.append((t, g, idx))
    deltas: dict[str, dict[int, float]] = {}
    for t, k, idx in tqdm(jobs, desc="unit loss", unit="unit", disable=not progress):
        with _Zeroed(model, t, idx) as z:
            losses = ev.losses(z.names())
        deltas.setdefault(t.key, {})[k] = float(sum(losses) / len(losses)) - base
    for t in targets:
        d = deltas.get(t.key, {})
        if t.unit == "neurons":
            e = energy[t.key]
            order = torch.argsort(e, stable=True)
            score = torch.zeros_like(e)
            rank = e.argsort().argsort().double() / max(len(e), 1)  # tie-break inside a group
            for g, idx in enumerate(torch.tensor_split(order, NEURON_GROUPS)):
                score[idx] = d.get(g, 0.0) + 1e-9 * rank[idx]
            out[t.key] = score
        elif t.unit == "heads":
            out[t.key] = torch.tensor([d[h] for h in sorted(d)], dtype=torch.float64)
        else:
            out[t.key] = torch.tensor([d[j] for j in t.layers], dtype=torch.float64)
    return out


def _importance(model, targets: Sequence[_Target], score: str, stats, examples, progress: bool) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    energy: dict[str, Tensor] = {}
    flu = score == "fluctuation"
    for t in targets:
        if t.unit == "neurons":
            layer = _ffn(model, t.side, t.layer)
            if score == "magnitude":
                out[t.key] = _neuron_magnitude(layer)
            else:
                energy[t.key] = _neuron_energy(layer, stats[_prefix(model, layer.fc2)], fluctuation=flu)
        elif t.unit == "heads":
            attn = getattr(_ffn(model, t.side, t.layer), t.attn)
            if score == "magnitude":
                out[t.key] = _head_magnitude(attn)
            elif score != "loss":
                energy[t.key] = _head_energy(attn, stats[_prefix(model, attn.out_proj)], fluctuation=flu)
        else:
            vals = []
            for j in t.layers:
                layer = layer_stack(model, t.side).layers[j]
                if score == "magnitude":
                    ws = [m.weight.detach().double() for m in layer.modules() if isinstance(m, nn.Linear)]
                    vals.append(float((sum(w.pow(2).sum() for w in ws) / sum(w.numel() for w in ws)).sqrt()))
                elif score != "loss":
                    v = float(_neuron_energy(layer, stats[_prefix(model, layer.fc2)], fluctuation=flu).sum())
                    for a in ("self_attn", "encoder_attn"):
                        attn = getattr(layer, a, None)
                        if attn is not None:
                            v += float(_head_energy(attn, stats[_prefix(model, attn.out_proj)], fluctuation=flu).sum())
                    vals.append(v)
            if vals:
                out[t.key] = torch.tensor(vals, dtype=torch.float64)
    if score == "loss":
        out.update(_measured(model, targets, examples, progress, energy))
    else:
        out.update(energy)
    return out


def _stats_needed(model, targets: Sequence[_Target], score: str) -> tuple[set[str], set[str]]:
    """(modules whose input statistics are needed, those needing the Gram matrix)."""
    wanted, gram = set(), set()
    for t in targets:
        layers = [_ffn(model, t.side, t.layer)] if t.layer is not None else [layer_stack(model, t.side).layers[j] for j in t.layers]
        for layer in layers:
            if t.unit in ("neurons", "layers"):
                wanted.add(_prefix(model, layer.fc2))
            if t.unit in ("heads", "layers"):
                for a in ([t.attn] if t.unit == "heads" else ["self_attn", "encoder_attn"]):
                    attn = getattr(layer, a, None)
                    if attn is not None:
                        name = _prefix(model, attn.out_proj)
                        wanted.add(name)
                        if score == "wanda":
                            gram.add(name)
    if score == "loss":  # the neuron groups are ordered by energy
        gram = set()
    return wanted, gram


# ----------------------------------------------------------------------------------------------
# removal
# ----------------------------------------------------------------------------------------------


def _repair_next(linear: nn.Linear, remove: Tensor, keep: Tensor, st, repair: str, damp: float) -> None:
    """Compensate, in the layer that reads the removed units (``fc2``, ``out_proj``), for its
    input columns ``remove`` before they are cut (module docstring, "Repair").

    ``bias``: ``b += W_R mu_R``. ``refit``: the least-squares optimum over the calibration tokens
    of ``W' a_K + b'`` for the dense ``W a + b``: with the input covariance ``C``,
    ``W'_K = W_K + W_R C_RK (C_KK + lambda I)^-1`` and ``b' = b + W_R mu_R - (W'_K - W_K) mu_K``,
    ``lambda = damp * mean(diag C_KK)`` (ridge; fp64). ``bias`` is ``refit`` with ``C_RK = 0``.
    """
    if repair == "none" or not len(remove):
        return
    w = linear.weight.detach().double()
    dev = w.device
    mu = st.mean.to(dev)
    rm, kp = remove.to(dev), keep.to(dev)
    comp = w[:, rm] @ mu[rm]
    new_w = None
    if repair == "refit":
        n = max(st.n_tokens, 1)
        cov = st.gram.to(dev) / n - torch.outer(mu, mu)
        ckk = cov[kp][:, kp]
        lam = damp * float(ckk.diagonal().mean()) if damp > 0 else 0.0
        ckk = ckk + (lam if lam > 0 else 1e-10) * torch.eye(len(kp), dtype=ckk.dtype, device=dev)
        # delta = W_R C_RK C_KK^-1, solved as C_KK delta^T = C_KR W_R^T
        delta = torch.linalg.solve(ckk, cov[kp][:, rm] @ w[:, rm].T).T
        new_w = w[:, kp] + delta
        comp = comp - delta @ mu[kp]
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=dev))
    with torch.no_grad():
        linear.bias += comp.to(linear.bias.dtype)
        if new_w is not None:
            linear.weight[:, kp] = new_w.to(linear.weight.dtype)


def _remove_neurons(layer, remove: Tensor, st, repair: str, damp: float) -> None:
    keep = torch.tensor(sorted(set(range(layer.fc1.out_features)) - set(remove.tolist())), dtype=torch.long)
    _repair_next(layer.fc2, remove.to(torch.long), keep, st, repair, damp)
    layer.fc1 = shrink_linear(layer.fc1, rows=keep.to(layer.fc1.weight.device))
    layer.fc2 = shrink_linear(layer.fc2, cols=keep.to(layer.fc2.weight.device))


def _remove_heads(attn, remove: Sequence[int], st, repair: str, damp: float) -> None:
    keep_heads = [h for h in range(attn.num_heads) if h not in set(remove)]
    rows = torch.cat([torch.arange(_head_rows(attn, h).start, _head_rows(attn, h).stop) for h in keep_heads])
    if remove:
        gone = torch.cat([torch.arange(_head_rows(attn, h).start, _head_rows(attn, h).stop) for h in remove])
        _repair_next(attn.out_proj, gone, rows, st, repair, damp)
    dev = attn.q_proj.weight.device
    attn.q_proj = shrink_linear(attn.q_proj, rows=rows.to(dev))
    attn.k_proj = shrink_linear(attn.k_proj, rows=rows.to(dev))
    attn.v_proj = shrink_linear(attn.v_proj, rows=rows.to(dev))
    attn.out_proj = shrink_linear(attn.out_proj, cols=rows.to(dev))
    attn.num_heads = len(keep_heads)


def _drop_layers(model, side: str, drop: Sequence[int]) -> list[int]:
    """Remove layers; returns the old indices of the layers that remain (in order)."""
    stack = layer_stack(model, side)
    kept = [i for i in range(len(stack.layers)) if i not in set(drop)]
    stack.layers = nn.ModuleList([stack.layers[i] for i in kept])
    for new, layer in enumerate(stack.layers):  # the cache is indexed by these
        for attr in ("self_attn", "encoder_attn"):
            attn = getattr(layer, attr, None)
            if attn is not None and hasattr(attn, "layer_idx"):
                attn.layer_idx = new
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new
    return kept


def remap_alignment_heads(generation_config, kept_layers: Sequence[int] | None,
                          kept_heads: Mapping[int, Sequence[int]]) -> tuple[list | None, str | None]:
    """``alignment_heads`` ([decoder layer, cross-attention head] pairs) after removal.

    Args:
        kept_layers: old indices of the decoder layers that remain (None: all).
        kept_heads: old decoder layer -> old indices of its cross-attention heads that remain.

    Returns:
        (new pairs or None, a note when pairs were lost).
    """
    pairs = getattr(generation_config, "alignment_heads", None)
    if not pairs:
        return pairs, None
    layer_map = {old: new for new, old in enumerate(kept_layers)} if kept_layers is not None else None
    out = []
    for layer, head in pairs:
        if layer_map is not None and layer not in layer_map:
            continue
        heads = kept_heads.get(layer)
        if heads is not None and head not in heads:
            continue
        new_head = list(heads).index(head) if heads is not None else head
        out.append([layer_map[layer] if layer_map is not None else layer, new_head])
    note = None
    if len(out) < len(pairs):
        note = (f"alignment_heads: {len(pairs) - len(out)} of {len(pairs)} (layer, head) pairs were removed with "
                "their layers or heads" + ("; none remain, so word-level timestamps are unavailable" if not out else ""))
    return (out or None), note


def prune_structured(
    model,
    plan: PrunePlan,
    *,
    calibration: Sequence[CalibrationExample] | None = None,
    options: CalibrationOptions | None = None,
    repair: str | None = None,
    progress: bool = False,
) -> PruneResult:
    """Apply a plan with structured entries (and any weight entries after them), in place.

    Args:
        model: Whisper model (its modules are replaced by smaller ones).
        plan: entries with ``unit`` neurons, heads or layers, optionally also weight entries.
        calibration: calibration examples; needed for the scores ``wanda``, ``fluctuation`` and
            ``loss`` and for a repair (never evaluation data).
        options: how the calibration data enters the statistics (its ``frames``).
        repair: ``none``, ``bias`` (FLAP's bias compensation) or ``refit`` (ridge least squares of
            the next layer; module docstring); default: the plan's ``repair``.
        progress: progress bars of the calibration passes.

    Returns:
        :class:`~asrprune.prune.PruneResult` whose ``structure`` records, per entry and unit
        population, what was removed, the parameter counts before and after and the shapes.

    Raises:
        PlanError: an invalid structured entry (see :func:`structured_targets`).
        ValueError: a score or repair that needs calibration without it; an unknown repair.
    """
    repair = plan.repair if repair is None else repair
    if repair not in REPAIRS:
        raise ValueError(f"repair must be one of {list(REPAIRS)}, got {repair!r}")
    t0 = time.perf_counter()
    options = options or CalibrationOptions()
    before = measure_model(model)
    n_before = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    targets = structured_targets(model, plan)
    score = plan.score
    needs_data = score in ("wanda", "fluctuation", "loss") or repair != "none"
    if needs_data and not calibration:
        raise ValueError(f"structured pruning with score {score!r}" + (f" and repair {repair!r}" if repair != "none" else "")
                         + " needs calibration data (CLI: --calibration SOURCE[::ID_PATTERN])")
    stats = {}
    if needs_data:
        wanted, gram = _stats_needed(model, targets, "wanda" if score == "loss" else score)
        if repair != "none":
            readers = _stats_needed(model, targets, "fluctuation")[0]  # fc2 / out_proj
            wanted |= readers
            if repair == "refit":
                gram |= readers
        stats = collect_input_stats(model, calibration, gram=frozenset(gram), frames=options.frames,
                                    wanted=wanted, progress=progress)
    scores = _importance(model, targets, score, stats, calibration, progress)

    removed: list[dict[str, Any]] = []
    kept_heads: dict[int, list[int]] = {}
    for t in [t for t in targets if t.unit in ("heads", "neurons")]:
        e = plan.entries[t.entry]
        sc = scores[t.key]
        k = n_to_prune(len(sc), e.sparsity)
        drop = torch.argsort(sc, stable=True)[:k].sort().values
        layer = _ffn(model, t.side, t.layer)
        if t.unit == "neurons":
            _remove_neurons(layer, drop, stats.get(_prefix(model, layer.fc2)), repair, options.damp)
            removed.append({"entry": e.to_text(), "unit": "neurons", "where": t.key, "removed": drop.tolist(),
                            "of": len(sc)})
        else:
            attn = getattr(layer, t.attn)
            if t.side == "decoder" and t.attn == "encoder_attn":
                kept_heads[t.layer] = [h for h in range(attn.num_heads) if h not in set(drop.tolist())]
            _remove_heads(attn, drop.tolist(), stats.get(_prefix(model, attn.out_proj)), repair, options.damp)
            removed.append({"entry": e.to_text(), "unit": "heads", "where": t.key, "removed": drop.tolist(),
                            "of": len(sc)})
    kept_layers = {}
    for side in ("encoder", "decoder"):
        drop_here: list[int] = []
        for t in [t for t in targets if t.unit == "layers" and t.side == side]:
            e = plan.entries[t.entry]
            sc = scores.get(t.key)
            k = n_to_prune(len(t.layers), e.sparsity)
            order = torch.argsort(sc, stable=True).tolist() if sc is not None else list(range(len(t.layers)))
            chosen = sorted(t.layers[i] for i in order[:k])
            drop_here += chosen
            removed.append({"entry": e.to_text(), "unit": "layers", "where": f"{side}.layers", "removed": chosen,
                            "of": len(layer_stack(model, side).layers), "selected": len(t.layers)})
        if drop_here:
            kept_layers[side] = _drop_layers(model, side, drop_here)
    notes = []
    if kept_heads or "decoder" in kept_layers:
        pairs, note = remap_alignment_heads(model.generation_config, kept_layers.get("decoder"), kept_heads)
        if getattr(model.generation_config, "alignment_heads", None) is not None:
            model.generation_config.alignment_heads = pairs
        if note:
            notes.append(note)
    recorded = record_structure(model)
    n_after = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    structure = {
        "score": score, "repair": repair, **({"repair_damp": options.damp} if repair == "refit" else {}), "removed": removed,
        "kept_layers": kept_layers, "params_before": int(n_before), "params_after": int(n_after),
        "size_reduction": 1.0 - n_after / n_before, "shapes": structure_of(model),
        "config_expresses": recorded is None,
        "calibration": None if not needs_data else {"n_utterances": len(calibration),
                                                    "ids": [e.id for e in calibration], "frames": options.frames},
        "notes": notes,
    }
    for note in notes:
        log.info(note)
    weight_entries = tuple(e for e in plan.entries if not e.structured)
    if weight_entries:
        rest = PrunePlan(weight_entries, mode=plan.mode, score="magnitude" if score in ("fluctuation", "loss") else score)
        res = prune_model(model, rest, calibration=calibration, options=options)
        return PruneResult(plan=plan, score=score, entries=res.entries, model=res.model, before=before,
                           notes=tuple(notes) + res.notes, elapsed_s=time.perf_counter() - t0,
                           calibration=res.calibration, structure=structure)
    return PruneResult(plan=plan, score=score, entries=(), model=measure_model(model), before=before,
                       notes=tuple(notes), elapsed_s=time.perf_counter() - t0, structure=structure)
