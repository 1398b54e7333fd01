"""The quiver of arrows and the summaries of the long table.

:func:`quiver_pick` picks, per (dataset, regime, setting), the candidate with the highest
validation AUC (ties go to SAE probes) and :func:`add_quivers` reports its test metrics;
:func:`results_table` assembles the evaluation's table, :func:`regime_summary` (the paper's Fig. 1),
:func:`sae_summary`, :func:`picks_table`, :func:`convergence_table` and :func:`plot_regime`
summarise it. Skipped rows never enter an average.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from saeflow.evals.probing.probes import BASELINE_METHODS, CONVERGENCE_COLUMNS
from saeflow.evals.probing.runners import QUIVER, QUIVER_SAE, ROW_COLUMNS, SAE_METHOD
from saeflow.evals.probing.splits import REGIMES

def quiver_pick(candidates: pd.DataFrame) -> pd.Series | None:
    """The candidate row with the highest ``val_auc`` (SAE rows first, so ties go to an SAE probe);
    ``None`` when no candidate has a validation AUC."""
    c = candidates[candidates["val_auc"].notna()]
    if c.empty:
        return None
    is_sae = (c["method"] == SAE_METHOD).to_numpy()
    c = pd.concat([c[is_sae], c[~is_sae]])
    return c.iloc[int(np.argmax(c["val_auc"].to_numpy()))]


def add_quivers(df: pd.DataFrame, quiver_ks: Sequence[int], baselines: Sequence[str]) -> pd.DataFrame:
    """Append the two quiver rows per (dataset, regime, setting): ``quiver`` (baselines only) and
    ``quiver_sae`` (baselines + every SAE's probes at ``quiver_ks``); ``picked`` names the choice."""
    rows = []
    ok = df[df["skipped"].isna()]
    for (ds, regime, setting), g in ok.groupby(["dataset", "regime", "setting"], sort=False, dropna=False):
        base = g[g["method"].isin(list(baselines))]
        sae = g[(g["method"] == SAE_METHOD) & g["k"].isin(list(quiver_ks))]
        for name, cand in ((QUIVER, base), (QUIVER_SAE, pd.concat([base, sae]))):
            row = {c: None for c in ROW_COLUMNS}
            row.update(dataset=ds, regime=regime, setting=setting, method=name)
            pick = quiver_pick(cand) if len(cand) else None
            if pick is None or (name == QUIVER_SAE and base.empty):
                row["skipped"] = "no candidate probe ran" if pick is None else "no baseline ran"
            else:
                for col in ("n_train", "n_test", "val_auc", "test_auc", "test_acc", "test_f1"):
                    row[col] = pick[col]
                label = pick["method"]
                if label == SAE_METHOD:
                    label = f"sae:{pick['sae']}:k{int(pick['k'])}"
                row["picked"] = label
            rows.append(row)
    # a quiver row is no fit: its convergence columns stay empty (left out here, so concat does not
    # meet all-NA columns)
    cols = [c for c in ROW_COLUMNS if c not in CONVERGENCE_COLUMNS]
    return pd.concat([df, pd.DataFrame(rows, columns=cols)], ignore_index=True) if rows else df


def clean_mean(values: pd.Series) -> float:
    """Mean of the finite values (NaN when there are none); skipped rows never enter an average."""
    v = pd.to_numeric(values, errors="coerce")
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def regime_summary(df: pd.DataFrame, sae_names: Sequence[str], quiver_ks: Sequence[int]) -> pd.DataFrame:
    """One row per regime (the paper's Fig. 1): mean test AUC of the baseline quiver, the quiver with
    SAEs, logistic regression and each SAE at each ``quiver_ks``, over the (dataset, setting) pairs
    where the two quivers both ran; plus how often the quiver with SAEs picked an SAE probe."""
    out = []
    ok = df[df["skipped"].isna()]
    for regime in [r for r in REGIMES if r in set(ok["regime"])]:
        g = ok[ok["regime"] == regime]
        g = g.assign(_s=g["setting"].fillna(-1.0))
        q = g[g["method"] == QUIVER].set_index(["dataset", "_s"])
        qs = g[g["method"] == QUIVER_SAE].set_index(["dataset", "_s"])
        common = q.index.intersection(qs.index)
        rec: dict[str, Any] = {"regime": regime, "n_pairs": len(common), "n_datasets": len({d for d, _ in common})}
        rec["baseline_quiver"] = clean_mean(q.loc[common, "test_auc"]) if len(common) else float("nan")
        rec["quiver_with_saes"] = clean_mean(qs.loc[common, "test_auc"]) if len(common) else float("nan")
        rec["quiver_gain"] = rec["quiver_with_saes"] - rec["baseline_quiver"]
        picks = qs.loc[common, "picked"].astype(str) if len(common) else pd.Series([], dtype=str)
        rec["frac_sae_picked"] = float(picks.str.startswith("sae:").mean()) if len(picks) else float("nan")
        for method in BASELINE_METHODS:
            m = g[g["method"] == method]
            if len(m):
                rec[method] = clean_mean(m["test_auc"])
        for name in sae_names:
            for k in quiver_ks:
                m = g[(g["method"] == SAE_METHOD) & (g["sae"] == name) & (g["k"] == k)]
                if len(m):
                    rec[f"{name}_k{k}"] = clean_mean(m["test_auc"])
        out.append(rec)
    return pd.DataFrame(out)


def sae_summary(df: pd.DataFrame, prefix: str = "probing") -> dict[str, float]:
    """Flat per-SAE numbers from its rows: ``<prefix>_<regime>_k<k>_auc`` (mean test AUC over the
    runs that did not skip), ``<prefix>_<regime>_auc`` (per run, the k with the best validation
    AUC), and ``<prefix>_n_fits`` / ``<prefix>_n_fits_not_converged`` (solver fits of all its probes,
    :class:`~saeflow.evals.probing.probes.FitLog`). NaN values are left out of the dict."""
    out: dict[str, float] = {}
    ok = df[df["skipped"].isna() & (df["method"] == SAE_METHOD)]
    for col in ("n_fits", "n_fits_not_converged"):
        out[f"{prefix}_{col}"] = float(pd.to_numeric(ok[col], errors="coerce").sum())
    for regime, g in ok.groupby("regime"):
        for k, gk in g.groupby("k"):
            out[f"{prefix}_{regime}_k{int(k)}_auc"] = clean_mean(gk["test_auc"])
        best = g.sort_values(["val_auc", "k"], ascending=[False, True]).groupby(["dataset", "setting"], dropna=False).head(1)
        out[f"{prefix}_{regime}_auc"] = clean_mean(best["test_auc"])
    return {k: v for k, v in out.items() if np.isfinite(v)}


def results_table(frames: Sequence[pd.DataFrame], unknown: dict[str, str], quiver_ks: Sequence[int],
                  baselines: Sequence[str]) -> pd.DataFrame:
    """The long table of a run: the baseline and SAE rows (``frames``), one skipped row per unknown
    dataset (``{name: reason}``) and both quivers (:func:`add_quivers`), with typed columns."""
    frames = [*frames, pd.DataFrame([{**{c: None for c in ROW_COLUMNS}, "dataset": n, "skipped": why}
                                     for n, why in unknown.items()], columns=list(ROW_COLUMNS))]
    df = pd.concat([f for f in frames if len(f)], ignore_index=True)
    df = add_quivers(df, quiver_ks, baselines)
    df["k"] = df["k"].astype("Int64")
    for c in ("n_train", "n_test", "n_iter", "n_fits", "n_fits_not_converged"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    df["converged"] = df["converged"].astype("boolean")
    for c in ("setting", "val_auc", "test_auc", "test_acc", "test_f1"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df


def convergence_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per (method, SAE) with solver fits (logistic regression, PCA's, MLP, SAE probes): results,
    results not converged, fits, fits not converged (every fit of the validation searches counts)
    and the most iterations a final fit took."""
    fitted = df[pd.to_numeric(df["n_fits"], errors="coerce").notna()]
    rows = []
    for (method, sae), g in fitted.groupby([fitted["method"], fitted["sae"].fillna("")], sort=False):
        bad = pd.to_numeric(g["n_fits_not_converged"], errors="coerce")
        rows.append({"method": method, "sae": sae or None, "results": len(g), "results_not_converged": int((bad > 0).sum()),
                     "fits": int(pd.to_numeric(g["n_fits"], errors="coerce").sum()), "fits_not_converged": int(bad.sum()),
                     "max_n_iter": int(pd.to_numeric(g["n_iter"], errors="coerce").max())})
    return pd.DataFrame(rows, columns=["method", "sae", "results", "results_not_converged", "fits", "fits_not_converged",
                                       "max_n_iter"])


def not_converged_note(df: pd.DataFrame) -> str | None:
    """One line naming how many solver fits of ``df``'s rows did not converge, per method (``None``
    when all did)."""
    t = convergence_table(df)
    t = t.groupby("method", sort=False)[["fits", "fits_not_converged"]].sum()
    if not int(t["fits_not_converged"].sum()):
        return None
    per = ", ".join(f"{m} {int(r.fits_not_converged)} of {int(r.fits)}" for m, r in t.iterrows() if r.fits_not_converged)
    return (f"{int(t['fits_not_converged'].sum())} of {int(t['fits'].sum())} solver fits did not converge "
            f"(reached max_iter or ConvergenceWarning): {per}")


def picks_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per regime: how often the quiver with SAEs picked each method (SAE probes pooled)."""
    q = df[(df["method"] == QUIVER_SAE) & df["skipped"].isna()]
    rows = []
    for regime, g in q.groupby("regime", sort=False):
        picked = g["picked"].astype(str)
        kind = picked.where(~picked.str.startswith("sae:"), "sae")
        rec: dict[str, Any] = {"regime": regime, "n": len(g), "frac_sae": float((kind == "sae").mean())}
        rec["frac_datasets_with_sae_pick"] = float(g.assign(s=kind == "sae").groupby("dataset")["s"].any().mean())
        for m, c in kind.value_counts().items():
            rec[f"picked_{m}"] = int(c)
        rows.append(rec)
    return pd.DataFrame(rows)


#: The plot of each regime that has a setting axis, by file name.
PLOTS = {"scarcity": "auc_vs_train_size.png", "imbalance": "auc_vs_imbalance.png", "noise": "auc_vs_noise.png"}


def plot_regime(df: pd.DataFrame, regime: str, series: Sequence[tuple[str, pd.Series]], path: str | Path) -> Path:
    """Mean test AUC against the regime's setting, one line per ``(label, row mask)`` of ``series``."""
    from saeflow.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, mask in series:
        g = df[mask & (df["regime"] == regime) & df["skipped"].isna()]
        if g.empty:
            continue
        m = g.groupby("setting")["test_auc"].apply(clean_mean).dropna()
        ax.plot(m.index, m.values, marker="o", ms=3, label=label, lw=2 if label.startswith("quiver") else 1)
    xlabel = {"scarcity": "train size", "imbalance": "positive fraction", "noise": "flipped train labels"}[regime]
    if regime == "scarcity":
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean test AUC")
    ax.set_title(f"sparse probing: {regime}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_regimes(df: pd.DataFrame, regimes: Sequence[str], sae_names: Sequence[str], quiver_ks: Sequence[int],
                 folder: str | Path) -> list[Path]:
    """:func:`plot_regime` of every configured regime in :data:`PLOTS`, into ``folder``: both
    quivers, logistic regression and each SAE at each ``quiver_ks``."""
    series = [("quiver (baselines)", df["method"] == QUIVER), ("quiver + SAEs", df["method"] == QUIVER_SAE),
              ("logreg", df["method"] == "logreg")]
    series += [(f"{n} k{k}", (df["method"] == SAE_METHOD) & (df["sae"] == n) & (df["k"] == k).fillna(False))
               for n in sae_names for k in quiver_ks]
    return [plot_regime(df, regime, series, Path(folder) / fname)
            for regime, fname in PLOTS.items() if regime in regimes]


def sae_label(info: dict[str, Any]) -> str:
    """Short name of an SAE for the tables: ``topk-w1024-k16`` (architecture, width, k when it has
    one) from its :func:`saeflow.evals.common.sae_identity`; an imported SAE's ``name`` when it has one."""
    if info.get("name"):
        return str(info["name"])
    return f"{info['architecture'] or 'sae'}-w{info['width']}" + (f"-k{info['k']}" if info["k"] else "")
