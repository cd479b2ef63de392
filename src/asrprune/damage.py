"""Damage of pruning, predicted and measured on the calibration loss.

- *Predicted* (:func:`predict_loss_change`, :func:`predict_loss_curve`): the second-order Taylor
  expansion of the loss around the unpruned weights. With ``R`` the weights magnitude pruning
  removes, ``first_order = sum_R -gbar * w`` (``gbar`` the mean gradient; zeroing ``w`` is a step
  ``-w``) and ``second_order = sum_R 0.5 * F * w^2`` (OBD with the empirical Fisher ``F`` as the
  diagonal Hessian).
- *Measured* (:func:`measure_ablation`): prune one component alone, measure the teacher-forced
  calibration loss, restore the weights bit for bit; unchanged encoder states are reused.
- *Whole plans* (:func:`check_plans`): the same loss for complete pruning plans, to see how far
  the sum of single-component damages is from the damage of the plan.

Losses are means over utterances of the per-utterance loss of
:func:`asrprune.calibration.teacher_forced_loss` (``reduction``: sequence NLL or per-token mean).
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .calibration import CalibrationExample, teacher_forced_loss
from .components import select_parameters
from .config import PlanEntry, PrunePlan
from .files import append_jsonl, read_jsonl
from .masks import n_to_prune, pooled_keep_masks
from .models import model_fingerprint
from .prune import PruningMethod, WeightSnapshot, magnitude_scorer, prune_model

log = logging.getLogger(__name__)

__all__ = [
    "check_plans",
    "magnitude_keep_masks",
    "measure_ablation",
    "predict_loss_change",
    "predict_loss_curve",
    "pruned_keep_masks",
    "target_key",
]


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


def _plan(selector: str, sparsity: float) -> PrunePlan:
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
    names = select_parameters(model, selector)
    with WeightSnapshot(model, names) as snap:
        result = prune_model(model, _plan(selector, sparsity))
        masks = snap.keep_masks()
    return masks, result.to_dict()


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


def target_key(target: str, sparsity: float) -> str:
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
    method: PruningMethod | None = None,
) -> dict:
    """Prune each target alone at each sparsity and measure the calibration loss (magnitude by
    default; ``method``: Wanda or SparseGPT from the dense model's statistics).

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
        method: how each target is pruned (:class:`~asrprune.prune.PruningMethod`; default
            magnitude). Under SparseGPT, which also moves the kept weights, no loss change is
            predicted from the removed weights (``predicted`` is None).

    Returns:
        ``{"baseline_loss", "baseline_losses", "baseline_wer", "rows": [...], "compute_s"}``
        (``compute_s``: wall time of the baseline pass and of every row, over resumed sessions); a row has
        ``target, sparsity, loss, loss_delta, loss_deltas`` (per utterance), ``n_removed,
        measured_sparsity, predicted`` (or None), ``wer, wer_delta, start`` (where the forward
        pass started), ``wall_s``.
    """
    done: dict[str, dict] = {}
    if results_path is not None:
        for row in read_jsonl(results_path):
            if row.get("key") == key:
                done[target_key(row["target"], row["sparsity"])] = row
    todo = [(t, float(s)) for t in targets for s in sparsities if target_key(t, float(s)) not in done]
    fingerprint = model_fingerprint(model)
    evaluator = None
    baseline_losses = None
    baseline_wer = None
    baseline_row = done.get(target_key("__baseline__", 0.0))
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
        if results_path is not None:
            append_jsonl(results_path, baseline_row)
    baseline_losses = baseline_row["losses"]
    baseline = float(np.mean(baseline_losses))
    baseline_wer = baseline_row.get("wer")
    for target, s in tqdm(todo, desc="ablation", disable=not progress, unit="run"):
        t0 = time.perf_counter()
        names = select_parameters(model, target)
        with WeightSnapshot(model, names) as snap:
            result = prune_model(model, _plan(target, s)) if method is None else method.prune(model, method.plan(target, s))
            masks = snap.keep_masks(updates=method is not None and method.score == "sparsegpt")
            saved = {n: snap.saved(n) for n in names}
            predictable = mean_grad is not None and fisher is not None and (method is None or method.score != "sparsegpt")
            pred = predict_loss_change(saved, mean_grad, fisher, masks) if predictable else None
            losses = evaluator.losses(names)
            w = wer(target_key(target, s)) if wer is not None else None
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
        if results_path is not None:
            append_jsonl(results_path, row)
        done[target_key(target, s)] = row
    if model_fingerprint(model) != fingerprint:
        raise RuntimeError("the model's weights changed during the ablation; restore failed")
    rows = [done[target_key(t, float(s))] for t in targets for s in sparsities]
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


def check_plans(
    model,
    examples: Sequence[CalibrationExample],
    plans: Mapping[str, PrunePlan],
    *,
    loss_reduction: str = "sum",
    predicted: Mapping[str, float] | None = None,
    method: PruningMethod | None = None,
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
        method: prune every plan with this method (e.g. SparseGPT, sequentially calibrated);
            default: each plan's own score (magnitude).

    Returns:
        ``{"n_utterances", "loss_reduction", "baseline_loss", "plans": {name: {"plan",
        "loss", "loss_delta", "predicted_damage", "sparsity_linear", "sparsity_all"}}}``; losses
        are means over utterances of the per-utterance loss, in nats.
    """
    def mean_loss() -> float:
        with torch.inference_mode():
            return float(np.mean([float(teacher_forced_loss(model, e, reduction=loss_reduction)) for e in examples]))

    base = mean_loss()
    out = {"n_utterances": len(examples), "loss_reduction": loss_reduction, "baseline_loss": base, "plans": {}}
    names = [n for n, _ in model.named_parameters()]
    for name, plan in plans.items():
        with WeightSnapshot(model, names):
            res = prune_model(model, plan) if method is None else method.prune(model, plan)
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
