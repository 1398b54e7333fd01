"""The meta-SAE evaluation's plots: cluster sizes, cross-size cosines and max decoder cosines."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from saeflow.plots import plt, save_figure

__all__ = ["plot_cluster_sizes", "plot_cross_size", "plot_max_cosines"]


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: str | Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_cluster_sizes(sizes: Sequence[tuple[str, np.ndarray]], path: str | Path) -> Path:
    """Per SAE (``(label, cluster sizes)``): histogram of how many latents use each used meta-latent."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for label, s in sizes:
        used = s[s > 0]
        if len(used):
            bins = np.unique(np.logspace(0, math.log10(max(used.max(), 2)) + 0.01, 30).astype(int))
            ax.hist(used, bins=bins, histtype="step", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    return _finish(fig, ax, "latents using the meta-latent (cluster size)", "meta-latents", "Meta-latent cluster sizes",
                   path)


def plot_cross_size(pairs: Sequence[tuple[str, np.ndarray]], threshold: float, path: str | Path) -> Path:
    """Per (smaller, larger) pair (``(label, cosines)``): density of the cross-size cosines, with the
    well-explained ``threshold``."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for label, cos in pairs:
        ax.hist(cos, bins=np.linspace(0, 1, 51), histtype="step", label=label, density=True)
    ax.axvline(threshold, color="k", linestyle="--", linewidth=0.8)
    return _finish(fig, ax, "cosine(larger latent, sparse code on the smaller decoder)", "density",
                   "Cross-size check: larger latents as sparse combinations of smaller ones", path)


def plot_max_cosines(mc: Mapping[str, np.ndarray], label: str, path: str | Path) -> Path:
    """The 2x2 max-cosine histograms (``base_to_base``, ``base_to_meta``, ``meta_to_base``,
    ``meta_to_meta``) of the SAE ``label`` and its meta-SAE."""
    fig, axes = plt.subplots(2, 2, figsize=(7, 5.5), dpi=120, sharex=True)
    for ax, key in zip(axes.flat, ("base_to_base", "base_to_meta", "meta_to_base", "meta_to_meta")):
        ax.hist(mc[key], bins=np.linspace(-0.2, 1, 61))
        ax.set_title(key.replace("_to_", " → "), fontsize=9)
    for ax in axes[1]:
        ax.set_xlabel("max cosine similarity")
    fig.suptitle(f"Max decoder cosine: {label} and its meta-SAE", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
