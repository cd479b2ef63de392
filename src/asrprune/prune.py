"""One-shot pruning of a Whisper model by plan: select -> score -> mask -> apply -> measure.

:func:`prune_model` assembles four small roles, each kept apart so it can be swapped or tested
on its own:

1. *selection* (:func:`asrprune.components.select_parameters`): which parameters each plan
   entry names; two entries reaching the same parameter is an error (there is no precedence
   rule: name disjoint parts, e.g. ``decoder.layers[0].ffn`` and ``decoder.layers[1:].ffn``);
2. *scoring* (a :data:`Scorer`): one importance score per weight, ``|w|`` by default, or any
   per-weight score such as Taylor ``|w * dL/dw|`` or OBD ``w^2 * F / 2`` via :func:`dict_scorer`;
3. *masking* (:mod:`asrprune.masks`): exact-count keep-masks per matrix (scope ``matrix``),
   pooled over an entry (scope ``component``), pooled over the whole plan (mode ``global``),
   or N:M;
4. *application*: weights outside the keep-mask are set to zero in place (no
   ``torch.nn.utils.prune`` re-parametrisation remains, so the model saves like any other).

Afterwards the model is *measured*, not trusted: :class:`PruneResult` holds the measured
sparsity of every entry, component and kind, overall over all parameters and over the linear
weights (both, always), and the non-zero counts. Unstructured zeros do not make inference faster
without sparse kernels; N:M 2:4 can, on GPUs that support it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .components import (
    LINEAR,
    list_components,
    select_parameters,
    tied_parameters,
)
from .calibration import CalibrationExample, CalibrationOptions, InputStats, sequential_pass
from .config import CALIBRATED_SCORES, PlanEntry, PlanError, PrunePlan
from .criteria import sparsegpt_prune_, wanda_keep_mask
from .masks import (
    apply_keep_mask_,
    keep_mask,
    nm_keep_mask,
    pooled_keep_masks,
    row_keep_mask,
)

__all__ = [
    "PruningMethod",
    "WeightSnapshot",
    "untie_output_projection",
    "Scorer",
    "magnitude_scorer",
    "dict_scorer",
    "resolve_plan",
    "prune_model",
    "measure_model",
    "SparsityStats",
    "EntryResult",
    "ModelSparsity",
    "PruneResult",
]

log = logging.getLogger(__name__)

Scorer = Callable[[str, Tensor], Tensor]
"""``scorer(parameter_name, parameter) -> scores`` of the parameter's shape; low = pruned first."""


def magnitude_scorer(name: str, param: Tensor) -> Tensor:
    """``|w|``: magnitude pruning (``l1_unstructured`` / ``global_unstructured``)."""
    return param.detach().abs()


magnitude_scorer.score_name = "magnitude"  # type: ignore[attr-defined]


def dict_scorer(scores: Mapping[str, Tensor], *, name: str = "custom") -> Scorer:
    """A scorer that looks up precomputed per-weight scores, e.g. from a sensitivity analysis.

    Args:
        scores: parameter name -> score tensor of that parameter's shape (Taylor ``|w g|``, OBD
            ``w^2 F / 2``, ...). Only the selected parameters need an entry.
        name: the score's name, recorded in the result (``"taylor"``, ``"obd"``, ...).

    Returns:
        A :data:`Scorer`; it raises ``ValueError`` for a selected parameter without a score.
    """

    def scorer(param_name: str, param: Tensor) -> Tensor:
        if param_name not in scores:
            raise ValueError(
                f"the {name} scores have no entry for parameter {param_name}; "
                f"they cover {len(scores)} parameters"
            )
        return scores[param_name]

    scorer.score_name = name  # type: ignore[attr-defined]
    return scorer


# --------------------------------------------------------------------------------------------
# snapshot and restore
# --------------------------------------------------------------------------------------------


class WeightSnapshot:
    """An exact copy of a model's tensors, to undo pruning in place (bit for bit).

    One copy is kept per distinct storage, so tied tensors (token embedding / output projection)
    are copied once and restored through every name that points at them. As a context manager it
    restores on exit.

    Args:
        model: the model.
        names: parameter names to keep (default: every tensor of the state dict, buffers too).
        device: where the copies live (``None``: beside each tensor; ``"cpu"`` spares GPU memory).
    """

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None, *, device: str | None = None):
        self.model = model
        with torch.no_grad():
            if names is None:
                tensors = dict(model.state_dict(keep_vars=False))
            else:
                params = dict(model.named_parameters())
                tensors = {n: params[n].detach() for n in names}
            copies: dict[int, Tensor] = {}
            self.storage_of: dict[str, int] = {}
            for name, t in tensors.items():
                ptr = t.data_ptr()
                if ptr not in copies:
                    copies[ptr] = t.detach().to(device or t.device, copy=True)
                self.storage_of[name] = ptr
        self._copies = copies

    def saved(self, name: str) -> Tensor:
        """The saved copy of ``name``."""
        return self._copies[self.storage_of[name]]

    def _current(self) -> dict[str, Tensor]:
        if set(self.storage_of) <= {n for n, _ in self.model.named_parameters()}:
            params = dict(self.model.named_parameters())
            return {n: params[n] for n in self.storage_of}
        return dict(self.model.state_dict(keep_vars=False))

    def restore(self) -> None:
        """Copy the saved values back into the model's tensors, in place.

        Raises:
            RuntimeError: a tensor changed shape since the snapshot (structured pruning cannot
                be undone in place: reload the model).
        """
        current = self._current()
        with torch.no_grad():
            for name in self.storage_of:
                t, src = current[name], self.saved(name)
                if t.shape != src.shape:
                    raise RuntimeError(f"cannot restore {name}: its shape changed to {tuple(t.shape)}")
                t.copy_(src.to(t.device))

    def changed(self, prefix: str = "") -> bool:
        """Whether any saved tensor whose name contains ``prefix`` differs from its copy now."""
        current = self._current()
        return any(
            prefix in f".{name}" and not torch.equal(current[name].detach().to(self.saved(name).device), self.saved(name))
            for name in self.storage_of
        )

    def keep_masks(self, *, updates: bool = False) -> dict[str, Tensor]:
        """Keep-masks of what pruning did since the snapshot: False where a weight is zero now.

        Weights that were already zero count as removed (their contribution to every predicted
        loss term is 0). ``updates=True`` admits kept weights that changed (SparseGPT moves them).

        Raises:
            RuntimeError: a weight changed to another non-zero value (pruning only zeroes),
                unless ``updates``.
        """
        current = self._current()
        masks = {}
        for n in self.storage_of:
            old, new = self.saved(n), current[n].detach().to(self.saved(n).device)
            diff = new != old
            if not updates and bool((diff & (new != 0)).any()):
                raise RuntimeError(f"pruning changed {n} to non-zero values; expected zeros only")
            masks[n] = ~((new == 0) & (diff | (old == 0)))
        return masks

    def __enter__(self) -> "WeightSnapshot":
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparsityStats:
    """Counts over a set of tensors: ``numel`` entries, ``nonzero`` of them non-zero."""

    numel: int
    nonzero: int

    @property
    def zeros(self) -> int:
        return self.numel - self.nonzero

    @property
    def sparsity(self) -> float:
        """Measured fraction of zeros (0.0 for an empty set)."""
        return self.zeros / self.numel if self.numel else 0.0

    def __add__(self, other: "SparsityStats") -> "SparsityStats":
        return SparsityStats(self.numel + other.numel, self.nonzero + other.nonzero)

    def to_dict(self) -> dict[str, Any]:
        return {"numel": self.numel, "nonzero": self.nonzero, "sparsity": self.sparsity}


_EMPTY = SparsityStats(0, 0)


def _stats(tensors) -> SparsityStats:
    numel = nonzero = 0
    for t in tensors:
        numel += t.numel()
        nonzero += int(torch.count_nonzero(t.detach()))
    return SparsityStats(numel, nonzero)


@dataclass(frozen=True)
class ModelSparsity:
    """Measured zeros of a whole model.

    Attributes:
        components: one dict per component (``id``, ``kind``, ``side``, ``layer``, ``weights``
            and ``biases`` as :meth:`SparsityStats.to_dict`).
        kinds: component kind -> {"weights": stats, "biases": stats}.
        all_parameters: every distinct parameter tensor (a tied embedding counted once).
        linear_weights: every attention-projection and FFN weight matrix.
        weights / biases: all ``.weight`` / ``.bias`` tensors.
    """

    components: list[dict[str, Any]]
    kinds: dict[str, dict[str, SparsityStats]]
    all_parameters: SparsityStats
    linear_weights: SparsityStats
    weights: SparsityStats
    biases: SparsityStats

    def to_dict(self) -> dict[str, Any]:
        return {
            "all_parameters": self.all_parameters.to_dict(),
            "linear_weights": self.linear_weights.to_dict(),
            "weights": self.weights.to_dict(),
            "biases": self.biases.to_dict(),
            "kinds": {k: {w: s.to_dict() for w, s in v.items()} for k, v in self.kinds.items()},
            "components": self.components,
        }


def measure_model(model: nn.Module) -> ModelSparsity:
    """Measure zeros per component, per kind and overall.

    Args:
        model: any Whisper model (pruned or not).

    Returns:
        :class:`ModelSparsity`.
    """
    params = dict(model.named_parameters())
    per_param = {n: _stats([p]) for n, p in params.items()}
    components = []
    kinds: dict[str, dict[str, SparsityStats]] = {}
    linear = _EMPTY
    for c in list_components(model):
        w = sum((per_param[p] for p in c.params if p.endswith(".weight")), _EMPTY)
        b = sum((per_param[p] for p in c.params if p.endswith(".bias")), _EMPTY)
        if c.category == LINEAR:
            linear = linear + w
        k = kinds.setdefault(c.kind.value, {"weights": _EMPTY, "biases": _EMPTY})
        k["weights"] = k["weights"] + w
        k["biases"] = k["biases"] + b
        components.append(
            {
                **c.describe(),
                "weights": w.to_dict(),
                "biases": b.to_dict(),
                "tied_with": list(c.tied_with),
            }
        )
    return ModelSparsity(
        components=components,
        kinds=kinds,
        all_parameters=sum(per_param.values(), _EMPTY),
        linear_weights=linear,
        weights=sum((s for n, s in per_param.items() if n.endswith(".weight")), _EMPTY),
        biases=sum((s for n, s in per_param.items() if n.endswith(".bias")), _EMPTY),
    )


@dataclass(frozen=True)
class EntryResult:
    """What one plan entry did: its parameters and their measured sparsity afterwards."""

    selector: str
    scope: str
    pattern: str | None
    requested_sparsity: float
    parameters: tuple[str, ...]
    stats: SparsityStats
    stats_before: SparsityStats = _EMPTY

    @property
    def measured_sparsity(self) -> float:
        return self.stats.sparsity

    def to_dict(self) -> dict[str, Any]:
        return {
            "selector": self.selector,
            "scope": self.scope,
            "pattern": self.pattern,
            "requested_sparsity": self.requested_sparsity,
            "measured_sparsity": self.measured_sparsity,
            "numel": self.stats.numel,
            "nonzero": self.stats.nonzero,
            "zeros_before": self.stats_before.zeros,
            "n_parameters": len(self.parameters),
            "parameters": list(self.parameters),
        }


@dataclass(frozen=True)
class PruneResult:
    """The outcome of :func:`prune_model`, measured on the pruned model.

    Attributes:
        plan: the plan that was applied.
        score: the name of the per-weight score used.
        entries: one :class:`EntryResult` per plan entry, in plan order.
        model: measured sparsity of the whole model after pruning.
        before: the same, measured before pruning.
        notes: plain-language remarks (tied embeddings, pre-existing zeros).
        elapsed_s: wall time of selection, scoring, masking and application.
    """

    plan: PrunePlan
    score: str
    entries: tuple[EntryResult, ...]
    model: ModelSparsity
    before: ModelSparsity
    notes: tuple[str, ...] = field(default=())
    elapsed_s: float = 0.0
    calibration: dict | None = None
    structure: dict | None = None  # what structured pruning removed (asrprune.structured)

    @property
    def overall_sparsity(self) -> float:
        """Measured sparsity over all parameters (denominator: every distinct tensor)."""
        return self.model.all_parameters.sparsity

    @property
    def linear_sparsity(self) -> float:
        """Measured sparsity over the attention and FFN weight matrices."""
        return self.model.linear_weights.sparsity

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what ``pruning.json`` stores under ``result``)."""
        return {
            "plan": self.plan.to_dict(),
            "plan_text": self.plan.to_text(),
            "score": self.score,
            "overall": {
                "all_parameters": self.model.all_parameters.to_dict(),
                "linear_weights": self.model.linear_weights.to_dict(),
                "weights": self.model.weights.to_dict(),
                "biases": self.model.biases.to_dict(),
            },
            "before": {
                "all_parameters": self.before.all_parameters.to_dict(),
                "linear_weights": self.before.linear_weights.to_dict(),
            },
            "entries": [e.to_dict() for e in self.entries],
            "kinds": {k: {w: s.to_dict() for w, s in v.items()} for k, v in self.model.kinds.items()},
            "components": self.model.components,
            "notes": list(self.notes),
            "elapsed_s": self.elapsed_s,
            **({"calibration": self.calibration} if self.calibration is not None else {}),
            **({"structure": self.structure} if self.structure is not None else {}),
        }


# --------------------------------------------------------------------------------------------
# the orchestrator
# --------------------------------------------------------------------------------------------


def resolve_plan(model: nn.Module, plan: PrunePlan) -> list[list[str]]:
    """Parameter names selected by each plan entry, checked for overlaps.

    Args:
        model: a Whisper model.
        plan: the plan.

    Returns:
        One list of canonical parameter names per entry, in plan order.

    Raises:
        SelectorError: an entry matches nothing (lists what exists).
        PlanError: two entries select the same parameter (names the parameters and entries).
    """
    selected = [select_parameters(model, e.selector) for e in plan.entries]
    owner: dict[str, int] = {}
    clashes: dict[tuple[int, int], list[str]] = {}
    for i, names in enumerate(selected):
        for n in names:
            if n in owner:
                clashes.setdefault((owner[n], i), []).append(n)
            else:
                owner[n] = i
    if clashes:
        parts = []
        for (a, b), names in clashes.items():
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            parts.append(
                f"{plan.entries[a].selector!r} and {plan.entries[b].selector!r} both select {shown}"
            )
        raise PlanError(
            "overlapping plan entries (each parameter may be named by one entry only; split the "
            "selectors so they are disjoint): " + "; ".join(parts)
        )
    return selected


def _score(scorer: Scorer, name: str, param: Tensor) -> Tensor:
    s = scorer(name, param)
    if not isinstance(s, Tensor) or tuple(s.shape) != tuple(param.shape):
        shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
        raise ValueError(f"scorer returned {shape} for parameter {name} of shape {tuple(param.shape)}")
    return s.detach().to(param.device)


def _row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Per output row: a matrix's rows (a convolution's output channels; a vector is one row)."""
    flat = scores.reshape(scores.shape[0], -1) if scores.dim() > 1 else scores.reshape(1, -1)
    return row_keep_mask(flat, sparsity).reshape(scores.shape)


def _nm_mask(name: str, scores: Tensor, n: int, m: int) -> Tensor:
    # convolutions (out, in, k): groups run along the flattened input (in * k)
    flat = scores.reshape(scores.shape[0], -1) if scores.dim() > 2 else scores
    try:
        return nm_keep_mask(flat, n, m).reshape(scores.shape)
    except ValueError as exc:
        raise ValueError(f"parameter {name}: {exc}") from None


def _measured_result(model: nn.Module, plan: PrunePlan, score_name: str, selected: list[list[str]],
                     pre: list[SparsityStats], before: ModelSparsity, elapsed: float,
                     calibration: dict | None = None, extra_notes: Sequence[str] = ()) -> PruneResult:
    """What a plan did, measured on the model: per entry, per component, overall."""
    params = dict(model.named_parameters())
    # measurement: what is actually zero now
    after = measure_model(model)
    entries = tuple(
        EntryResult(
            selector=e.selector,
            scope="global" if plan.mode == "global" else e.scope,
            pattern=e.pattern,
            requested_sparsity=float(e.sparsity),
            parameters=tuple(names),
            stats=_stats(params[n] for n in names),
            stats_before=before_stats,
        )
        for e, names, before_stats in zip(plan.entries, selected, pre)
    )
    notes = list(extra_notes)
    ties = tied_parameters(model)
    for e, names in zip(plan.entries, selected):
        for n in names:
            if n in ties:
                notes.append(
                    f"{e.selector!r} prunes {n}, which is the same tensor as "
                    f"{', '.join(ties[n])} (tied word embeddings): pruning the token embeddings "
                    "also prunes the output projection, and vice versa"
                )
    for er in entries:
        if er.stats_before.zeros:
            notes.append(
                f"{er.selector!r}: the selection held {er.stats_before.zeros} zeros before pruning "
                f"(sparsity {er.stats_before.sparsity:.4f}); they rank lowest and count in the "
                f"measured {er.measured_sparsity:.4f}"
            )
    if plan.mode == "global":
        notes.append(
            "mode global: one threshold pooled over all entries; per-entry sparsities differ"
        )
    for note in notes:
        log.info(note)
    return PruneResult(
        plan=plan,
        score=score_name,
        entries=entries,
        model=after,
        before=before,
        notes=tuple(notes),
        elapsed_s=elapsed,
        calibration=calibration,
    )


def prune_model(
    model: nn.Module,
    plan: PrunePlan,
    *,
    scorer: Scorer | None = None,
    calibration: Sequence[CalibrationExample] | None = None,
    options: CalibrationOptions | None = None,
    progress: bool = False,
    input_stats: Mapping[str, InputStats] | None = None,
) -> PruneResult:
    """Prune ``model`` in place according to ``plan`` and measure the result.

    Args:
        model: a Whisper model (any dtype/device; masks are built on the parameters' device).
        plan: a validated :class:`~asrprune.config.PrunePlan`.
        scorer: per-weight scores; ``None`` means ``|w|`` (then ``plan.score`` must be
            ``"magnitude"``). See :func:`dict_scorer` for Taylor/OBD scores.
        calibration: the calibration examples a calibrated method (``wanda``, ``sparsegpt``)
            needs (:func:`asrprune.calibration.build_examples`); never evaluation data.
        options: how a calibrated method sees them (:class:`CalibrationOptions`).
        progress: a progress bar over the calibration pass.
        input_stats: instead of the sequential pass, prune from these statistics of the dense
            model (:func:`asrprune.calibration.collect_input_stats`): one pass shared by many
            prunings of single components (the sensitivity ablation under a calibrated method).

    Returns:
        :class:`PruneResult` with measured sparsities. For a model without zeros beforehand,
        every entry's measured sparsity equals ``round(s * numel) / numel`` exactly (pooled over
        the entry for scope ``component``, per tensor for ``matrix``).

    Raises:
        SelectorError: an entry matches nothing.
        PlanError: overlapping entries; a calibrated method's entry selecting what is not the
            weight of a linear layer (biases, norms, convolutions, the tied output projection).
        ValueError: missing scorer for a non-magnitude plan, no calibration for a calibrated
            method, scores of the wrong shape or with NaN, an N:M pattern that does not divide a
            matrix's input dimension.
    """
    if plan.structured:
        raise PlanError(
            f"{', '.join(e.to_text() for e in plan.entries if e.structured)} removes whole structures: "
            "prune with asrprune.structured.prune_structured (the CLI and sweeps do)"
        )
    if plan.score in CALIBRATED_SCORES:
        return _prune_calibrated(model, plan, calibration, options or CalibrationOptions(), progress, input_stats)
    if scorer is None:
        if plan.score != "magnitude":
            raise ValueError(
                f"the plan's score is {plan.score!r} but no scorer was given; pass "
                f"scorer=dict_scorer(scores, name={plan.score!r}) or use score 'magnitude'"
            )
        scorer = magnitude_scorer
    score_name = getattr(scorer, "score_name", plan.score)
    t0 = time.perf_counter()
    before = measure_model(model)
    params = dict(model.named_parameters())

    # selection: which tensors each entry owns (disjoint by construction)
    selected = resolve_plan(model, plan)
    pre = [_stats(params[n] for n in names) for names in selected]

    # scoring + masking + application, entry by entry so only one entry's scores are alive
    # (mode global needs them all at once: one pooled threshold)
    with torch.no_grad():
        if plan.mode == "global":
            names = [n for group in selected for n in group]
            sparsity = float(plan.entries[0].sparsity)
            masks = pooled_keep_masks([_score(scorer, n, params[n]) for n in names], sparsity)
            for n, mask in zip(names, masks):
                apply_keep_mask_(params[n], mask)
            log.info("global threshold over %d tensors at sparsity %.4f", len(names), sparsity)
        else:
            for entry, names in zip(plan.entries, selected):
                scores = [_score(scorer, n, params[n]) for n in names]
                if entry.nm is not None:
                    n_keep, m = entry.nm
                    masks = [_nm_mask(n, s, n_keep, m) for n, s in zip(names, scores)]
                elif entry.scope == "component":
                    masks = pooled_keep_masks(scores, float(entry.sparsity))
                elif entry.scope == "row":
                    masks = [_row_mask(s, float(entry.sparsity)) for s in scores]
                else:
                    masks = [keep_mask(s, float(entry.sparsity)) for s in scores]
                del scores
                for n, mask in zip(names, masks):
                    apply_keep_mask_(params[n], mask)
                log.info(
                    "%s: %d tensors, scope %s%s, sparsity %.4f",
                    entry.selector, len(names), entry.scope,
                    f", pattern {entry.pattern}" if entry.pattern else "", entry.sparsity,
                )
    return _measured_result(model, plan, score_name, selected, pre, before, time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# calibrated methods: Wanda and SparseGPT, layer after layer
# --------------------------------------------------------------------------------------------


def _calibrated_targets(model: nn.Module, plan: PrunePlan, selected: list[list[str]]) -> dict[str, PlanEntry]:
    """Module name -> its plan entry, for a calibrated method; refuses what it cannot prune."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ties = tied_parameters(model)
    targets: dict[str, PlanEntry] = {}
    for entry, names in zip(plan.entries, selected):
        for name in names:
            module = name.removesuffix(".weight")
            if name in ties and any(a.endswith("proj_out.weight") for a in ties[name]):
                raise PlanError(
                    f"{entry.selector!r} selects {name}, the token embedding that Whisper ties to the "
                    f"output projection: {plan.score} would prune the embedding table with the output "
                    "projection's inputs. Untie them first (asrprune.prune.untie_output_projection(model), "
                    "CLI --untie-proj-out), then select proj_out"
                )
            if not name.endswith(".weight") or module not in linears:
                raise PlanError(
                    f"{entry.selector!r} selects {name}, which is not the weight of a linear layer; "
                    f"{plan.score} needs a layer's inputs (use score magnitude for biases, norms, "
                    "convolutions and embeddings)"
                )
            targets[module] = entry
    return targets


def untie_output_projection(model: nn.Module) -> bool:
    """Give ``proj_out`` a weight of its own (a copy of the token embedding), so that it can be
    pruned apart from the embedding table. Returns whether it was tied."""
    embed = model.get_decoder().embed_tokens.weight
    proj = model.proj_out
    if proj.weight is not embed:
        return False
    proj.weight = nn.Parameter(embed.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []
    return True


def _prune_calibrated(model: nn.Module, plan: PrunePlan, calibration: Sequence[CalibrationExample] | None,
                      options: CalibrationOptions, progress: bool,
                      input_stats: Mapping[str, InputStats] | None = None) -> PruneResult:
    if input_stats is None and not calibration:
        raise ValueError(
            f"score {plan.score!r} needs calibration data (CLI: --calibration SOURCE[::ID_PATTERN]); "
            "give the examples of asrprune.calibration.build_examples"
        )
    t0 = time.perf_counter()
    before = measure_model(model)
    params = dict(model.named_parameters())
    selected = resolve_plan(model, plan)
    pre = [_stats(params[n] for n in names) for names in selected]
    targets = _calibrated_targets(model, plan, selected)
    gram = plan.score == "sparsegpt"
    warnings: list[str] = []
    per_module: dict[str, dict] = {}

    def prune_layer(side: str, index: int, modules: dict, stats: dict) -> None:
        for name, module in modules.items():
            entry = targets.get(name)
            if entry is None:
                continue
            st = stats[name]
            n_in = module.weight.shape[1]
            if st.n_tokens < n_in:
                warnings.append(
                    f"{name}: {st.n_tokens} calibration tokens for {n_in} input features, so its "
                    f"{'Hessian is rank-deficient' if gram else 'input norms rest on few tokens'}; "
                    "more calibration utterances help"
                )
            info: dict[str, Any] = {"n_tokens": st.n_tokens, "in_features": n_in}
            if plan.score == "wanda":
                keep = wanda_keep_mask(module.weight, st.norm, sparsity=float(entry.sparsity), scope=entry.scope,
                                       nm=entry.nm)
                apply_keep_mask_(module.weight, keep)
            else:
                info.update(sparsegpt_prune_(module.weight, st.hessian(),
                                             sparsity=None if entry.nm else float(entry.sparsity), nm=entry.nm,
                                             block_size=options.block_size, damp=options.damp))
            per_module[name] = info
        if input_stats is None:  # free the layer's Hessians (q, k, v share one: freed after all three)
            for name in modules:
                if name in stats:
                    stats[name].gram = None

    if input_stats is None:
        sequential_pass(model, calibration, wanted=set(targets), gram=gram, frames=options.frames,
                        on_layer=prune_layer, progress=progress)
        order = "encoder layers, then decoder layers; each layer fitted to the outputs of the pruned layers below"
    else:
        # one shot from the dense model's statistics: exact for a selection whose layers all see
        # dense inputs (one component alone: the sensitivity ablation), an approximation otherwise
        modules = dict(model.named_modules())
        have = {n: input_stats[n] for n in targets if n in input_stats}
        if gram and any(st.gram is None for st in have.values()):
            raise ValueError("sparsegpt needs input statistics collected with gram=True")
        prune_layer("dense", -1, {n: modules[n] for n in have}, have)
        order = "one shot from the dense model's input statistics (not sequential)"
    missing = sorted(set(targets) - set(per_module))
    if missing:
        raise PlanError(f"{plan.score}: no calibration inputs reached {', '.join(missing[:5])} "
                        "(only encoder and decoder layers are pruned layer by layer)")
    if warnings:  # once per pruning; the many one-component prunings of an ablation only log it
        log.log(logging.WARNING if input_stats is None else logging.INFO,
                "%s: %d matrices got fewer calibration tokens than input features (first: %s)",
                plan.score, len(warnings), warnings[0])
    record = {
        "method": plan.score,
        "options": options.to_dict(),
        "order": order,
        "n_utterances": len(calibration) if calibration else None,
        "ids": [e.id for e in calibration] if calibration else None,
        "n_tokens": {side: sum(v["n_tokens"] for k, v in per_module.items() if f".{side}." in f".{k}.")
                     for side in ("encoder", "decoder")},
        "warnings": warnings,
        "modules": per_module,
    }
    return _measured_result(model, plan, plan.score, selected, pre, before, time.perf_counter() - t0,
                            calibration=record)


@dataclass(frozen=True)
class PruningMethod:
    """How plans are pruned: the score, and for a calibrated one (``wanda``, ``sparsegpt``) its
    calibration examples and options. Stages that prune many plans in a row (the sensitivity
    ablation, the whole-plan checks, the measured allocation) take one of these.

    Attributes:
        score: ``magnitude``, ``wanda`` or ``sparsegpt``.
        calibration: the calibration examples (never evaluation data).
        options: :class:`~asrprune.calibration.CalibrationOptions`.
        input_stats: statistics of the dense model (:func:`asrprune.calibration.collect_input_stats`):
            each plan is then pruned from them in one shot, with no sequential pass; exact for a
            plan that prunes one component alone (the layers below it are dense).
    """

    score: str = "magnitude"
    calibration: Sequence[CalibrationExample] | None = None
    options: CalibrationOptions | None = None
    input_stats: Mapping[str, InputStats] | None = None

    def __post_init__(self) -> None:
        if self.score in CALIBRATED_SCORES and not self.calibration and self.input_stats is None:
            raise ValueError(f"score {self.score!r} needs calibration examples or input statistics")

    @property
    def calibrated(self) -> bool:
        return self.score in CALIBRATED_SCORES

    def plan(self, selector: str, sparsity: float) -> PrunePlan:
        """One selector at one sparsity, in the method's default grouping (magnitude: pooled
        over the component; Wanda: per row; SparseGPT: per matrix)."""
        scope = None if self.calibrated else "component"
        return PrunePlan(entries=(PlanEntry(selector=selector, sparsity=float(sparsity), scope=scope),),
                         score=self.score)

    def with_score(self, plan: PrunePlan) -> PrunePlan:
        """``plan`` pruned by this method (entries without a scope take the method's default)."""
        if plan.score == self.score:
            return plan
        d = plan.to_dict()
        d["score"] = self.score
        for e in d["entries"]:
            if e.get("scope") == "component" and self.calibrated:
                e.pop("scope")
        return PrunePlan.from_dict(d)

    def prune(self, model: nn.Module, plan: PrunePlan, *, progress: bool = False) -> PruneResult:
        return prune_model(model, self.with_score(plan), calibration=self.calibration, options=self.options,
                           input_stats=self.input_stats, progress=progress)

    def can_prune(self, model: nn.Module, selector: str) -> bool:
        """Whether every parameter the selector picks can be pruned by this method."""
        if not self.calibrated:
            return True
        names = select_parameters(model, selector)
        try:
            _calibrated_targets(model, self.plan(selector, 0.5), [names])
        except PlanError:
            return False
        return True

    def describe(self) -> dict:
        return {"score": self.score,
                "options": None if not self.calibrated else (self.options or CalibrationOptions()).to_dict(),
                "n_calibration": None if self.calibration is None else len(self.calibration),
                "statistics": None if not self.calibrated else ("dense, one shot" if self.input_stats is not None
                                                                 else "sequential")}
