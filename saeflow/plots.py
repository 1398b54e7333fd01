"""Plots of result tables (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from saeflow.artifacts import write_atomic  # noqa: E402



def save_figure(fig, path: str | Path, dpi: int | None = None) -> Path:
    """Save ``fig`` to ``path`` (parents created, written atomically) and close it: the one plot-save helper."""
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return path


MARKERS = {"topk": "o", "batchtopk": "s", "relu": "^", "jumprelu": "D", "matryoshka": "P"}


def frontier_plot(df: pd.DataFrame, path: str | Path, y: str = "explained_variance", x: str = "l0") -> Path:
    """Sparsity-fidelity frontier: ``y`` vs ``x`` per SAE, coloured by width, marker by architecture."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    widths = sorted(df["width"].unique())
    cmap = plt.get_cmap("viridis", max(len(widths), 2))
    for i, w in enumerate(widths):
        for arch, sub in df[df["width"] == w].groupby("architecture"):
            sub = sub.sort_values(x)
            ax.plot(sub[x], sub[y], marker=MARKERS.get(arch, "o"), color=cmap(i), linestyle="-", alpha=0.9,
                    label=f"{arch} w={w}")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(y.replace("_", " "))
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"{y.replace('_', ' ')} vs L0")
    fig.tight_layout()
    return save_figure(fig, path)
