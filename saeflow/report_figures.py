"""The papers' figures of the report, one per evaluation, made from the results folder's tables,
each with a caption: what the paper found (fixed text) and what this family shows (computed from
the same tables). An evaluation that did not run gets a note instead of a figure.

Figures are embedded in the page as base64 PNG data URIs (:func:`png_data_uri`); they are drawn
with :mod:`saeflow.plots`.
"""

from __future__ import annotations

import base64
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from saeflow.plots import MARKERS, plt, save_figure

#: The papers behind the evaluations, as the captions cite them.
ABSORPTION_PAPER = "Chanin et al. 2024 (A is for Absorption)"
STITCHING_PAPER = "Leask et al. 2025 (SAEs do not find canonical units)"
PROBING_PAPER = "Kantamneni et al. 2025 (Are SAEs useful? sparse probing)"
#: Columns of the probing summary table that are neither a baseline method nor an SAE probe.
_PROBING_META = {"regime", "n_pairs", "n_datasets", "quiver_gain", "frac_sae_picked", "baseline_quiver", "quiver_with_saes"}
_SAE_K = re.compile(r"^(?P<sae>.+)_k(?P<k>\d+)$")


@dataclass(frozen=True)
class ReportFigure:
    """One figure of the report: the image (``None``: skipped, see ``note``) and its caption."""

    evaluation: str
    title: str
    paper: str
    """What the paper found."""
    family: str
    """What this family shows (computed from the tables)."""
    data_uri: str | None
    note: str = ""


def png_data_uri(fig: Any, dpi: int = 100) -> str:
    """``fig`` as a ``data:image/png;base64,`` URI (saved through :func:`saeflow.plots.save_figure`)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = save_figure(fig, Path(tmp) / "figure.png", dpi=dpi).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _values(pairs: Sequence[tuple[Any, float]]) -> str:
    return ", ".join(f"{k}: {v:.3g}" for k, v in pairs)


def rises(pairs: Sequence[tuple[Any, float]]) -> str:
    """``yes`` when the values (in the given order, e.g. by width) rise at every step, ``no``
    otherwise, ``n/a`` with fewer than two finite values."""
    v = [x for _, x in pairs if np.isfinite(x)]
    if len(v) < 2:
        return "n/a (fewer than two values)"
    return "yes" if all(b > a for a, b in zip(v, v[1:])) else "no"


def by_width(df: pd.DataFrame, column: str, width: str = "width") -> list[tuple[int, float]]:
    """Mean of ``column`` per width (finite values only), by increasing width."""
    d = df[[width, column]].copy()
    d[column] = pd.to_numeric(d[column], errors="coerce")
    m = d.dropna().groupby(width)[column].mean().sort_index()
    return [(int(w), float(x)) for w, x in m.items()]


def _width_colors(widths: Sequence[int]) -> dict[int, Any]:
    ws = sorted(set(int(w) for w in widths if pd.notna(w)))
    cmap = plt.get_cmap("viridis", max(len(ws), 2))
    return {w: cmap(i) for i, w in enumerate(ws)}


def _core_panels(core: pd.DataFrame, panels: Sequence[tuple[str, str]], draw: Any, xlabel: str, log_base: int) -> Any:
    """A figure with one panel per ``(column, label)`` of the core table (a missing column: an empty
    panel), each drawn by ``draw(ax, column, colours by width)`` on a log x axis."""
    colors = _width_colors(core["width"])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.4), squeeze=False)
    for ax, (col, label) in zip(axes[0], panels):
        if col not in core:
            ax.axis("off")
            continue
        draw(ax, col, colors)
        ax.set_xscale("log", base=log_base)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _skipped(evaluation: str, title: str, paper: str, why: str) -> ReportFigure:
    return ReportFigure(evaluation, title, paper, "", None, note=why)


# ------------------------------------------------------------------------------- absorption
def absorption_figure(core: pd.DataFrame) -> ReportFigure:
    """Full-absorption rate and mean absorption fraction against L0, coloured by width."""
    title, paper = "Absorption vs L0", (f"{ABSORPTION_PAPER}: absorption is common in Gemma Scope SAEs "
                                        "of every size and sparsity; varying either does not remove it")
    need = {"absorption_mean_full", "l0", "width", "architecture"}
    if not need <= set(core) or not pd.to_numeric(core["absorption_mean_full"], errors="coerce").notna().any():
        return _skipped("absorption", title, paper, "absorption did not run in this run")

    def draw(ax: Any, col: str, colors: dict[int, Any]) -> None:
        for (w, arch), g in core.groupby(["width", "architecture"]):  # one line per width across L0
            g = g.sort_values("l0")
            ax.plot(g["l0"], pd.to_numeric(g[col], errors="coerce"), marker=MARKERS.get(arch, "o"),
                    color=colors[int(w)], label=f"{arch} w={w}")

    fig = _core_panels(core, (("absorption_mean_full", "full-absorption rate"),
                              ("absorption_mean_fraction", "mean absorption fraction")), draw, "L0", 10)
    per_width = by_width(core, "absorption_mean_full")
    family = f"full absorption rises with width: {rises(per_width)} (mean per width: {_values(per_width)})"
    return ReportFigure("absorption", title, paper, family, png_data_uri(fig))


# -------------------------------------------------------------------------------- stitching
def stitching_fractions(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per stitching pair (by larger width): the larger SAE's latents that are novel,
    reconstruction and inactive, as fractions of its width."""
    total = pairs["n_novel"] + pairs["n_reconstruction"] + pairs["n_inactive"]
    return pd.DataFrame({"pair": pairs["pair"], "large_width": pairs["large_width"].astype(int),
                         "novel": pairs["n_novel"] / total, "reconstruction": pairs["n_reconstruction"] / total,
                         "inactive": pairs["n_inactive"] / total}).sort_values("large_width")


def stitching_figure(pairs: pd.DataFrame | None) -> ReportFigure:
    """Novel and reconstruction fractions of the larger SAE of each pair against its width."""
    title = "Novel / reconstruction latents vs width"
    paper = (f"{STITCHING_PAPER}: a larger SAE holds novel latents (information the smaller one lacks; "
             "about 35% in the authors' blog) beside reconstruction latents (finer versions of the smaller one's)")
    if pairs is None or not len(pairs) or not {"n_novel", "n_reconstruction", "n_inactive", "large_width"} <= set(pairs):
        return _skipped("stitching", title, paper, "stitching did not run in this run (no stitching_pairs table)")
    fr = stitching_fractions(pairs)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for col, color in (("novel", "tab:orange"), ("reconstruction", "tab:blue"), ("inactive", "tab:gray")):
        ax.scatter(fr["large_width"], fr[col], color=color, s=18, label=col)
        mean = fr.groupby("large_width")[col].mean()
        ax.plot(mean.index, mean.to_numpy(), color=color, lw=1)  # mean per width
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width of the larger SAE of the pair")
    ax.set_ylabel("fraction of its latents")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    novel = [(f"{p}", float(x)) for p, x in zip(fr["pair"], fr["novel"])]
    every = "yes" if all(x > 0 for _, x in novel) else "no"
    family = f"every size step adds novel latents: {every} (novel fraction per pair: {_values(novel)})"
    return ReportFigure("stitching", title, paper, family, png_data_uri(fig))


def interpolation_figure(curves: pd.DataFrame | None) -> ReportFigure:
    """MSE (and CE loss, when measured) along each pair's interpolation, against the fraction of
    stitching events done."""
    title = "Interpolation between sizes"
    paper = (f"{STITCHING_PAPER}: swapping the larger SAE's latents in one at a time moves the MSE "
             "monotonically from the smaller SAE's to the larger one's")
    if curves is None or not len(curves) or not {"pair", "events_done", "mse"} <= set(curves):
        return _skipped("stitching", title, paper, "stitching did not run in this run (no stitching_curves table)")
    has_ce = "ce_with_sae" in curves and curves["ce_with_sae"].notna().any()
    fig, axes = plt.subplots(1, 2 if has_ce else 1, figsize=(10 if has_ce else 6, 3.4), squeeze=False)
    rises_at, steps = 0, 0
    for pair, g in curves.groupby("pair", sort=False):
        g = g.sort_values("events_done")
        t = g["events_done"] / max(int(g["events_done"].max()), 1)
        mse = g["mse"].to_numpy(float)
        rises_at += int(np.sum(mse[1:] > mse[:-1] * (1 + 1e-6)))
        steps += max(len(mse) - 1, 0)
        axes[0, 0].plot(t, mse, marker="o", ms=3, label=str(pair))
        if has_ce:
            axes[0, 1].plot(t, g["ce_with_sae"], marker="o", ms=3, label=str(pair))
    for ax, ylabel in zip(axes[0], ("MSE (held-out)", "CE loss with the stitched SAE")):
        ax.set_xlabel("fraction of stitching events (smaller -> larger)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    n_pairs = curves["pair"].nunique()
    family = (f"MSE falls monotonically: {'yes' if rises_at == 0 else 'no'} (rises at {rises_at} of {steps} "
              f"evaluated steps over {n_pairs} pair(s))")
    return ReportFigure("stitching", title, paper, family, png_data_uri(fig))


# --------------------------------------------------------------------------------- meta-SAE
def meta_sae_figure(core: pd.DataFrame) -> ReportFigure:
    """Meta-SAE FVE and latents per meta-latent against width."""
    title = "Meta-SAE vs width"
    paper = (f"{STITCHING_PAPER}: a meta-SAE with few active meta-latents explains much of an SAE's decoder "
             "directions, so SAE latents are compositions rather than atomic units")
    if (not {"meta_sae_fve", "width", "architecture"} <= set(core)
            or not pd.to_numeric(core["meta_sae_fve"], errors="coerce").notna().any()):
        return _skipped("meta_sae", title, paper, "the meta-SAE evaluation did not run in this run")
    series = ["architecture", "k"] if "k" in core and core["k"].notna().any() else ["architecture"]

    def draw(ax: Any, col: str, colors: dict[int, Any]) -> None:
        for key, g in core.groupby(series, dropna=False):  # one line per architecture (and k) across widths
            g = g.sort_values("width")
            arch = key[0] if isinstance(key, tuple) else key
            label = f"{arch} k={key[1]}" if len(series) == 2 and pd.notna(key[1]) else str(arch)
            ax.plot(g["width"], pd.to_numeric(g[col], errors="coerce"), color="0.6", lw=1)
            ax.scatter(g["width"], pd.to_numeric(g[col], errors="coerce"), c=[colors[int(w)] for w in g["width"]],
                       marker=MARKERS.get(arch, "o"), label=label, zorder=3)

    fig = _core_panels(core, (("meta_sae_fve", "decoder FVE by the meta-SAE"),
                              ("meta_sae_mean_latents_per_meta", "latents per meta-latent")), draw, "SAE width", 2)
    fve = by_width(core, "meta_sae_fve")
    family = f"meta-SAE FVE rises with width: {rises(fve)} (mean per width: {_values(fve)})"
    if "meta_sae_mean_latents_per_meta" in core:
        lpm = by_width(core, "meta_sae_mean_latents_per_meta")
        family += f"; latents per meta-latent rises with width: {rises(lpm)}"
    return ReportFigure("meta_sae", title, paper, family, png_data_uri(fig))


# ---------------------------------------------------------------------------------- probing
def probing_columns(summary: pd.DataFrame) -> tuple[list[str], list[str]]:
    """``(baselines, sae_probes)``: the baseline-method and the ``<sae>_k<k>`` columns of the
    probing summary table."""
    numeric = [c for c in summary.columns if c not in _PROBING_META and pd.api.types.is_numeric_dtype(summary[c])]
    saes = [c for c in numeric if _SAE_K.match(c)]
    return [c for c in numeric if c not in saes], saes


def probing_figure(summary: pd.DataFrame | None) -> ReportFigure:
    """Mean test AUC per regime: every SAE probe (coloured dots) against the baselines (grey) and
    the two quivers."""
    title = "Probing AUC by regime"
    paper = (f"{PROBING_PAPER}: SAE probes do not consistently beat the baselines in any regime "
             "(data scarcity, class imbalance, label noise, covariate shift)")
    if summary is None or not len(summary) or "regime" not in summary:
        return _skipped("probing", title, paper, "probing did not run in this run (no probing_summary table)")
    baselines, saes = probing_columns(summary)
    regimes = list(summary["regime"])
    x = np.arange(len(regimes))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(regimes) + 3), 3.6))
    for j, c in enumerate(baselines):
        ax.scatter(x - 0.15, summary[c], marker="x", color="0.45", label="baselines" if j == 0 else None)
    cmap = plt.get_cmap("tab10")
    for j, c in enumerate(saes):
        ax.scatter(x + 0.15, summary[c], color=cmap(j % 10), s=18, label=c)
    for c, style in (("baseline_quiver", "k_"), ("quiver_with_saes", "r_")):
        if c in summary:
            ax.plot(x, summary[c], style, ms=22, mew=2, label=c.replace("_", " "))
    ax.set_xticks(x, regimes)
    ax.set_ylabel("mean test AUC")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    wins = []
    best_of = baselines + [c for c in ("baseline_quiver",) if c in summary]
    for _, r in summary.iterrows():
        b = pd.to_numeric(r[best_of], errors="coerce").max() if best_of else np.nan
        s = pd.to_numeric(r[saes], errors="coerce").max() if saes else np.nan
        if np.isfinite(b) and np.isfinite(s) and s > b:
            wins.append(f"{r['regime']} ({s:.3f} vs {b:.3f})")
    family = (f"an SAE probe beats the best baseline (method or quiver) in: {', '.join(wins) if wins else 'no regime'} "
              f"(of {len(regimes)} regime(s))")
    return ReportFigure("probing", title, paper, family, png_data_uri(fig))


def paper_figures(core: pd.DataFrame, tables: dict[str, pd.DataFrame]) -> list[ReportFigure]:
    """The report's figures in order (absorption, stitching, interpolation, meta-SAE, probing) from
    the core table and the evaluations' tables (``tables``: ``"<eval>/<table>"`` -> frame)."""
    return [absorption_figure(core), stitching_figure(tables.get("stitching/stitching_pairs")),
            interpolation_figure(tables.get("stitching/stitching_curves")), meta_sae_figure(core),
            probing_figure(tables.get("probing/probing_summary"))]


def correlation_heatmap(rho: pd.DataFrame, labels: dict[str, str]) -> str:
    """The rank-correlation matrix as an annotated heatmap (a PNG data URI)."""
    names = [labels.get(c, c) for c in rho.columns]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(names), 0.8 + 0.6 * len(names)))
    m = rho.to_numpy(float)
    im = ax.imshow(np.ma.masked_invalid(m), cmap="RdBu_r", vmin=-1, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, "–" if not np.isfinite(m[i, j]) else f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8, label="Spearman rho")
    fig.tight_layout()
    return png_data_uri(fig)
