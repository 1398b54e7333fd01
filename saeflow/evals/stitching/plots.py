"""The stitching evaluation's plots: max-cosine histograms per class and the interpolation curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from saeflow.evals.stitching.latents import INACTIVE, NOVEL, RECONSTRUCTION
from saeflow.plots import plt, save_figure

__all__ = ["plot_max_cos_histograms", "plot_interpolation"]


def plot_max_cos_histograms(pairs: Sequence[dict[str, Any]], path: str | Path, bins: int = 40) -> Path:
    """One panel per pair: histogram of each L latent's max cosine to S, novel vs reconstruction."""
    n = max(len(pairs), 1)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=110, squeeze=False)
    edges = np.linspace(-0.1, 1.0, bins + 1)
    for ax, p in zip(axes.flat, pairs):
        s, c = np.asarray(p["max_cos"]), np.asarray(p["classes"])
        lo = min(float(s.min()) if s.size else 0.0, -0.1)
        e = np.linspace(lo, 1.0, bins + 1) if lo < -0.1 else edges
        for cls, color in ((RECONSTRUCTION, "tab:blue"), (NOVEL, "tab:orange"), (INACTIVE, "tab:gray")):
            sel = s[c == cls]
            if sel.size:
                ax.hist(sel, bins=e, alpha=0.6, color=color, label=f"{cls} ({sel.size})")
        ax.set_title(p["title"], fontsize=8)
        ax.set_xlabel("max cosine to smaller SAE's decoder")
        ax.set_ylabel("L latents")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_interpolation(curves: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Per pair: exact MSE after every event (line) and the fully evaluated points (markers), and CE
    loss at those points, against the fraction of the path from S (0) to L (1)."""
    has_ce = any(c.get("ce") is not None and np.isfinite(np.asarray(c["ce"], dtype=float)).any() for c in curves)
    fig, axes = plt.subplots(1, 2 if has_ce else 1, figsize=(11 if has_ce else 6, 4), dpi=110, squeeze=False)
    cmap = plt.get_cmap("tab10")
    for k, c in enumerate(curves):
        fine = np.asarray(c["fine_mse"])
        t = np.linspace(0, 1, fine.size)
        axes[0, 0].plot(t, fine, color=cmap(k % 10), lw=1.0, label=c["title"])
        pts = np.asarray(c["points"]) / max(fine.size - 1, 1)
        axes[0, 0].plot(pts, c["mse"], "o", color=cmap(k % 10), ms=3)
        if has_ce:
            axes[0, 1].plot(pts, c["ce"], "o-", color=cmap(k % 10), ms=3, label=c["title"])
    axes[0, 0].set_xlabel("fraction of stitching events (S -> L)")
    axes[0, 0].set_ylabel("MSE (held-out)")
    axes[0, 0].set_title("reconstruction error along the interpolation")
    axes[0, 0].legend(fontsize=6)
    axes[0, 0].grid(alpha=0.3)
    if has_ce:
        axes[0, 1].set_xlabel("fraction of stitching events (S -> L)")
        axes[0, 1].set_ylabel("CE loss with stitched SAE spliced in")
        axes[0, 1].grid(alpha=0.3)
        axes[0, 1].set_title("CE loss along the interpolation")
    fig.tight_layout()
    return save_figure(fig, path)
