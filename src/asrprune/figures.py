"""Figures that need nothing but their data (torch-free): sensitivity heatmaps, Pareto panels."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import SymLogNorm
from matplotlib.figure import Figure

from .config import DIAGNOSTICS
from .files import read_json

__all__ = ["draw_heatmaps", "pareto_figure"]


def pareto_figure(points: Sequence[Mapping], path: Path, *, title: str, size_label: str) -> Path:
    """Two panels, WER (log scale) against throughput and against size, one colour per series.

    Args:
        points: ``{"series", "label", "throughput" (audio s/s), "size", "wer" (fraction)}``.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for series in dict.fromkeys(p["series"] for p in points):
        pts = [p for p in points if p["series"] == series]
        ys = [100 * float(p["wer"]) for p in pts]
        for ax, key in zip(axes, ("throughput", "size")):
            xs = [float(p[key]) for p in pts]
            ax.scatter(xs, ys, label=series)
            for x, y, p in zip(xs, ys, pts):
                ax.annotate(str(p["label"]), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    axes[0].set_xlabel("throughput (audio seconds per second)")
    axes[1].set_xlabel(size_label)
    for ax in axes:
        ax.set_ylabel("WER (%), log scale")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path



def draw_heatmaps(sensitivity: Mapping | str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """The sensitivity heatmaps (layers x component kinds) drawn from ``sensitivity.json``.

    One PNG per diagnostic (``heatmap_<diagnostic>.png``: log10 of the per-parameter mean) and,
    per ablation sparsity ``s``, the measured (``heatmap_loss_delta_<s>.png``) and predicted
    (``heatmap_predicted_total_<s>.png``) loss change of pruning each component alone.

    Args:
        sensitivity: the parsed ``sensitivity.json``, the file, or its folder.
        out_dir: where the PNGs go (default: the folder of the file; required for a mapping).

    Returns:
        The paths written.
    """
    if isinstance(sensitivity, Mapping):
        data = sensitivity
        if out_dir is None:
            raise ValueError("draw_heatmaps: give out_dir with a parsed sensitivity.json")
    else:
        path = Path(sensitivity)
        path = path / "sensitivity.json" if path.is_dir() else path
        data = read_json(path)
        if data is None:
            raise FileNotFoundError(f"{path}: no readable sensitivity.json")
        out_dir = out_dir if out_dir is not None else path.parent
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
