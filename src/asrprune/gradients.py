"""Per-utterance gradient statistics of a Whisper model on calibration data, resumable.

One utterance per backward pass, so every per-utterance gradient ``g_i`` is exact; the running
fp32 sums of ``|g_i|``, ``g_i`` and ``g_i^2`` give the gradient, Taylor, Fisher and OBD
diagnostics of :mod:`asrprune.sensitivity` (definitions in its module docstring). The sums are
checkpointed to ``accumulators.safetensors`` (+ ``.json``) and a rerun continues after the last
utterance accumulated.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from .calibration import CalibrationExample, teacher_forced_loss
from .files import apply_umask, atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["GradientStats", "ResumeMismatchError", "accumulate_gradients"]


class ResumeMismatchError(ValueError):
    """Files in the output directory were written for different inputs or options."""


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
        path = Path(path)
        tensors = {}
        for prefix, d in (("sum_abs", self.sum_abs), ("sum", self.sum), ("sum_sq", self.sum_sq)):
            for k, v in d.items():
                tensors[f"{prefix}/{k}"] = v.detach().contiguous().cpu()
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(apply_umask(tmp), path)
        info = {"n": self.n, "ids": self.ids, "losses": self.losses, "wall_s": self.wall_s, **(dict(meta or {}))}
        atomic_write_json(Path(str(path) + ".json"), info, indent=None)

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> tuple["GradientStats", dict]:
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
