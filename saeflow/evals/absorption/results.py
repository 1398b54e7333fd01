"""The family's absorption results: one table per kind (summary, letters, examples) over every SAE,
and the two plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

#: Example absorptions per SAE in the family's examples table.
EXAMPLES_PER_SAE = 10


def _joined(ids: Sequence[int]) -> str:
    return ",".join(str(int(x)) for x in ids)


def family_tables(summaries: Sequence[dict[str, Any]], letters: Sequence[pd.DataFrame],
                  examples: Sequence[pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(summary, letters, examples)`` of the family from each SAE's summary row (its identity and
    ``summary.json``), letters table and examples table, in SAE order: a ``sae_index`` column (the
    position in that order), latent lists written ``"12,40"`` and the first
    :data:`EXAMPLES_PER_SAE` examples of each SAE."""
    ldf = pd.concat([lt.assign(sae_index=i)[["sae_index", *lt.columns]] for i, lt in enumerate(letters)],
                    ignore_index=True)
    ldf["split_feats"] = ldf["split_feats"].map(_joined)
    edf = pd.concat([ex.assign(sae_index=i)[["sae_index", *ex.columns]].head(EXAMPLES_PER_SAE)
                     for i, ex in enumerate(examples)], ignore_index=True)
    edf["main_latents"] = edf["main_latents"].map(_joined)
    return pd.DataFrame(list(summaries)), ldf, edf


def plot_family(sdf: pd.DataFrame, ldf: pd.DataFrame, folder: str | Path) -> list[Path]:
    """``absorption_vs_l0.png`` (three metrics against the probe words' L0, per width and
    architecture) and ``absorption_by_letter.png`` (per SAE, fraction and full absorption per
    letter) in ``folder``."""
    from saeflow.plots import MARKERS, plt, save_figure

    folder = Path(folder)
    metrics = [("absorption_mean_fraction", "mean absorption fraction"),
               ("absorption_mean_full", "full absorption rate"), ("absorption_rate", "absorption rate (paper, ablation)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), dpi=110)
    widths = sorted(sdf["width"].unique())
    cmap = plt.get_cmap("viridis", max(len(widths), 2))
    for ax, (col, title) in zip(axes, metrics):
        for i, wdt in enumerate(widths):
            sub = sdf[sdf["width"] == wdt].sort_values("word_l0")
            for arch, g in sub.groupby("architecture"):
                ax.plot(g["word_l0"], g[col], marker=MARKERS.get(arch, "o"), color=cmap(i), label=f"{arch} w={wdt}")
        ax.set_xlabel("L0 on the probe words")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths = [save_figure(fig, folder / "absorption_vs_l0.png")]
    n = sdf.shape[0]
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.2 * n), dpi=100, squeeze=False)
    for ax, (i, row) in zip(axes[:, 0], sdf.iterrows()):
        lt = ldf[ldf["sae_index"] == row["sae_index"]]
        x = np.arange(len(lt))
        ax.bar(x - 0.2, lt["mean_absorption_fraction"], 0.4, label="absorption fraction")
        ax.bar(x + 0.2, lt["full_absorption_rate"], 0.4, label="full absorption")
        ax.set_xticks(x, lt["letter"])
        ax.set_title(f"{row['architecture']} width={row['width']} k={row['k']}", fontsize=9)
        ax.set_ylim(0, 1)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(save_figure(fig, folder / "absorption_by_letter.png"))
    return paths
