"""The report card of a run: one row per SAE (named, never indexed), one headline number per
evaluation, each cell coloured on its column's scale with the best SAE of the column marked, and
the rank correlations between the headline numbers across the SAEs (exploratory).

Everything here is computed from the results folder's tables (``core_metrics.parquet`` and the
evaluations' tables); :mod:`saeflow.report` puts it on the page. The SAE names are those of the
results table (``sae`` column, e.g. ``topk-w4096-k32``; built the same way from the identity
columns of a table written before it had one), and :func:`named_table` puts them in place of the
indices and labels the evaluations' tables carry (``sae_index``, ``#2 topk w=128 k=8``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from saeflow.tables import sae_name

#: Fewest SAEs a run needs for the cross-evaluation rank correlations.
MIN_CORRELATION_SAES = 4


@dataclass(frozen=True)
class Headline:
    """One headline number of the card: the core-table column it comes from and which way is better."""

    key: str
    label: str
    evaluation: str
    column: str
    higher_is_better: bool
    meaning: str


#: The headline numbers, in card order. The probing column is found per run (its regime).
HEADLINES: tuple[Headline, ...] = (
    Headline("ev", "EV", "core", "explained_variance", True, "explained variance of the reconstruction"),
    Headline("ce", "CE loss score", "core", "ce_loss_score", True, "share of the CE loss recovered with the SAE spliced in"),
    Headline("full_absorption", "full absorption", "absorption", "absorption_mean_full", False,
             "mean full-absorption rate over the first-letter tasks"),
    Headline("split_latents", "split latents", "absorption", "absorption_mean_split_features", False,
             "mean number of latents a first-letter feature is split over"),
    Headline("novel_fraction", "novel fraction", "stitching", "stitching_novel_fraction", True,
             "share of this SAE's active latents that are novel relative to the next smaller size"),
    Headline("meta_fve", "meta-SAE FVE", "meta_sae", "meta_sae_fve", False,
             "decoder variance a meta-SAE explains (lower: latents are less compositions of meta-latents)"),
    Headline("probing_auc", "probing AUC", "probing", "probing_normal_auc", True,
             "mean test AUC of the top-k SAE probe (k picked on validation), against the baseline quiver"),
)
_PROBING_AUC = re.compile(r"^probing_([a-z]+)_auc$")
_LABEL = re.compile(r"^#\d+ (?P<arch>\S+) w=(?P<width>\d+)(?: k=(?P<k>\d+))?(?: c=(?P<c>\S+))?(?: l0t=(?P<t>\S+))?$")
_NAMED_LABEL = re.compile(r"^#\d+ (?P<name>.+)$")


def sae_names(core: pd.DataFrame) -> list[str]:
    """One name per row of the core table, in its order: its ``sae`` column, or :func:`sae_name` of
    the identity columns; names that would repeat get their fingerprint's first 8 characters."""
    if "sae" in core and core["sae"].notna().all():
        names = [str(x) for x in core["sae"]]
    else:
        names = [sae_name(r.get("architecture"), r.get("width"), r.get("k"), r.get("coefficient"), r.get("target_l0"))
                 for r in core.to_dict("records")]
    counts = pd.Series(names).value_counts()
    if (counts > 1).any() and "sae_fingerprint" in core:
        names = [n + f"-{str(fp)[:8]}" if counts[n] > 1 else n for n, fp in zip(names, core["sae_fingerprint"])]
    return names


def label_name(label: Any) -> Any:
    """The SAE name in an evaluation's SAE label (``#2 topk w=128 k=8`` -> ``topk-w128-k8``); other
    values unchanged."""
    m = _LABEL.match(str(label).strip())
    if not m:
        named = _NAMED_LABEL.match(str(label).strip())  # an imported SAE with a name: ``#3 <name>``
        return named["name"] if named else label
    return sae_name(m["arch"], m["width"], m["k"], m["c"], m["t"])


def named_table(df: pd.DataFrame, core_names: dict[str, str], family_order: list[str],
                index_table: pd.DataFrame | None = None) -> pd.DataFrame:
    """``df`` with SAEs named, never indexed.

    ``sae_index`` becomes ``sae`` (through ``index_table``'s ``sae_index`` -> ``sae_fingerprint``
    -> ``core_names``, else the position in ``family_order``); a ``sae_fingerprint`` column sets
    ``sae`` from ``core_names``; stitching labels (``pair``, ``small``, ``large``, ``sae``) become
    names and its ``small_index`` / ``large_index`` columns are dropped.
    """
    df = df.copy()
    if "sae_index" in df:
        by_index: dict[int, str] = dict(enumerate(family_order))
        if index_table is not None and {"sae_index", "sae_fingerprint"} <= set(index_table):
            for i, fp in zip(index_table["sae_index"], index_table["sae_fingerprint"]):
                if str(fp) in core_names:
                    by_index[int(i)] = core_names[str(fp)]
        names = [by_index.get(int(i), f"sae {i}") for i in df["sae_index"]]
        pos = df.columns.get_loc("sae_index")
        df = df.drop(columns="sae_index")
        if "sae" in df:
            df = df.drop(columns="sae")
        df.insert(min(pos, len(df.columns)), "sae", names)
    if "sae_fingerprint" in df:
        named = [core_names.get(str(fp)) for fp in df["sae_fingerprint"]]
        if any(n is not None for n in named):
            old = df["sae"] if "sae" in df else pd.Series([None] * len(df), index=df.index)
            new = [n if n is not None else o for n, o in zip(named, old)]
            if "sae" in df:
                df["sae"] = new
            else:
                df.insert(0, "sae", new)
    for col in ("small", "large", "sae"):
        if col in df and df[col].dtype == object:
            df[col] = df[col].map(label_name)
    if "pair" in df and df["pair"].dtype == object:
        df["pair"] = df["pair"].map(lambda p: " -> ".join(str(label_name(x)) for x in str(p).split(" -> ")))
    return df.drop(columns=[c for c in ("small_index", "large_index") if c in df])


# ----------------------------------------------------------------------------------- the card
@dataclass(frozen=True)
class CardCell:
    value: float
    text: str
    color: str
    """Background colour on the column's scale (``""``: no value)."""
    best: bool


@dataclass(frozen=True)
class CardColumn:
    headline: Headline
    label: str
    best: list[str]
    """Names of the SAEs marked best in this column."""


@dataclass(frozen=True)
class CardRow:
    sae: str
    frac_dead: float
    dead_text: str
    cells: list[CardCell]
    published: bool = False
    """Imported from a SAELens release (``import_saes``: ``release`` + ``id``), not trained here."""


@dataclass(frozen=True)
class ReportCard:
    """The card: ``values`` is the headline numbers (one row per SAE, index = name, columns =
    the headline keys present), ``columns`` / ``rows`` their laid-out form."""

    values: pd.DataFrame
    columns: list[CardColumn]
    rows: list[CardRow]
    missing: list[str]
    """Evaluations with no headline number in this run."""
    baseline: float | None
    """The probing baseline (baseline quiver's mean test AUC in the probing regime), if known."""


def probing_column(core: pd.DataFrame) -> str | None:
    """The core-table column of the probing headline: ``probing_normal_auc``, else the first
    ``probing_<regime>_auc`` present."""
    cols = [c for c in core.columns if _PROBING_AUC.match(c)]
    return "probing_normal_auc" if "probing_normal_auc" in cols else (cols[0] if cols else None)


def probing_baseline(summary: pd.DataFrame | None, column: str | None) -> float | None:
    """The baseline quiver's mean test AUC in the regime of ``column`` (``probing_summary`` table)."""
    if summary is None or column is None or "baseline_quiver" not in summary or "regime" not in summary:
        return None
    regime = _PROBING_AUC.match(column)[1]
    row = summary[summary["regime"] == regime]
    v = float(pd.to_numeric(row["baseline_quiver"], errors="coerce").iloc[0]) if len(row) else float("nan")
    return v if np.isfinite(v) else None


def headline_values(core: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """The headline numbers of each SAE (index: its name), one column per :data:`HEADLINES` key
    whose core-table column holds at least one finite value."""
    out = pd.DataFrame(index=pd.Index(names, name="sae"))
    for h in HEADLINES:
        col = probing_column(core) if h.key == "probing_auc" else h.column
        if col in core:
            v = pd.to_numeric(core[col], errors="coerce").astype(float).to_numpy()
            if np.isfinite(v).any():
                out[h.key] = v
    return out


def _blend(t: float) -> str:
    """Colour of a cell at ``t`` on its column's scale (0 worst: light red, 1 best: green)."""
    lo, mid, hi = np.array([244, 199, 195]), np.array([250, 250, 245]), np.array([163, 217, 164])
    c = lo + (mid - lo) * (t / 0.5) if t < 0.5 else mid + (hi - mid) * ((t - 0.5) / 0.5)
    return "#" + "".join(f"{int(round(x)):02x}" for x in c)


def _fmt(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.4g}"


def report_card(core: pd.DataFrame, probing_summary: pd.DataFrame | None = None) -> ReportCard:
    """The card of a run from its core table (and the probing summary table, for the baseline).

    Each column's colour runs from its worst to its best value (direction: :data:`HEADLINES`); the
    best value of a column is marked on every SAE that has it (ties); a column whose values are all
    equal, or with fewer than two values, marks none."""
    names = sae_names(core)
    values = headline_values(core, names)
    baseline = probing_baseline(probing_summary, probing_column(core))
    present = {h.key: h for h in HEADLINES if h.key in values}
    columns, marks, colors = [], {}, {}
    for key, h in present.items():
        v = values[key].to_numpy()
        ok = np.isfinite(v)
        lo, hi = (float(v[ok].min()), float(v[ok].max())) if ok.any() else (0.0, 0.0)
        best_val = hi if h.higher_is_better else lo
        marks[key] = ok & (v == best_val) if ok.sum() >= 2 and hi > lo else np.zeros(len(v), bool)
        span = hi - lo
        colors[key] = ["" if not f else _blend(0.5 if span == 0 else
                                                ((x - lo) / span if h.higher_is_better else (hi - x) / span))
                       for x, f in zip(v, ok)]
        label = h.label + (f" (baseline {baseline:.3f})" if key == "probing_auc" and baseline is not None else "")
        columns.append(CardColumn(headline=h, label=label, best=[n for n, m in zip(names, marks[key]) if m]))
    dead = (pd.to_numeric(core["frac_dead"], errors="coerce").to_numpy(float) if "frac_dead" in core
            else np.full(len(core), np.nan))
    published = (core["published"].fillna(False).astype(bool).to_numpy() if "published" in core
                 else np.zeros(len(core), bool))
    rows = []
    for i, name in enumerate(names):
        cells = []
        for key in present:
            x = float(values[key].iloc[i])
            text = "–" if not np.isfinite(x) else _fmt(x)
            if key == "probing_auc" and baseline is not None and np.isfinite(x):
                text += f" ({x - baseline:+.3f})"
            cells.append(CardCell(value=x, text=text, color=colors[key][i], best=bool(marks[key][i])))
        d = float(dead[i])
        rows.append(CardRow(sae=name, frac_dead=d, dead_text="–" if not np.isfinite(d) else f"{d:.1%}", cells=cells,
                            published=bool(published[i])))
    missing = sorted({h.evaluation for h in HEADLINES} - {h.evaluation for h in present.values()})
    return ReportCard(values=values, columns=columns, rows=rows, missing=missing, baseline=baseline)


def card_markdown(card: ReportCard) -> str:
    """The card as a markdown table (best values marked ``**…** ★``; published SAEs marked ``(published)``)."""
    head = ["SAE", "dead", *[c.label for c in card.columns]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in card.rows:
        cells = [f"**{c.text}** ★" if c.best else c.text for c in r.cells]
        lines.append("| " + " | ".join([r.sae + (" (published)" if r.published else ""), r.dead_text, *cells]) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ convergence
def convergence_warnings(tables: dict[str, pd.DataFrame]) -> list[tuple[str, str, str]]:
    """``(evaluation, SAE, what)`` for each optimisation an evaluation recorded as not converged.

    Generic: every table (key ``<evaluation>/<table>``, as :func:`saeflow.report.named_tables`)
    with a ``converged`` column counts; its rows whose ``converged`` is false are counted per SAE
    (the ``sae`` column; ``baselines`` where it is empty), naming the ``method`` values of those rows
    and the largest ``rel_change_last10`` when the table has these columns. Empty ``converged``
    values (no optimisation behind the row) are not counted.
    """
    out = []
    for key, df in tables.items():
        if "converged" not in df or not len(df):
            continue
        evaluation, name = key.rsplit("/", 1) if "/" in key else ("core", key)
        conv = df["converged"].astype("boolean")
        bad = conv.eq(False).fillna(False).astype(bool)
        sae = df["sae"].astype(object).where(df["sae"].notna(), "baselines") if "sae" in df else pd.Series("", index=df.index)
        for s in dict.fromkeys(sae[bad]):
            rows = df[bad & (sae == s)]
            what = f"{len(rows)} of {int((conv.notna() & (sae == s)).sum())} results in {name} not converged"
            if "method" in df:
                what += f" ({', '.join(sorted(rows['method'].astype(str).unique()))})"
            if "rel_change_last10" in df:
                what += f"; relative loss change over the last 10% of steps {pd.to_numeric(rows['rel_change_last10']).max():.3g}"
            out.append((evaluation, str(s), what))
    return out


# ------------------------------------------------------------------------- rank correlations
@dataclass(frozen=True)
class Correlations:
    """Spearman rank correlations between the headline numbers across the SAEs of a run."""

    rho: pd.DataFrame
    """Square matrix over the headline keys (NaN: fewer than :data:`MIN_CORRELATION_SAES` SAEs
    with both numbers, or a constant column)."""
    n: pd.DataFrame
    """SAEs with both numbers, per pair of keys."""
    pairs: pd.DataFrame
    """One row per pair of keys: ``a``, ``b``, ``rho``, ``n``."""


def rank_correlations(values: pd.DataFrame, min_n: int = MIN_CORRELATION_SAES) -> Correlations | None:
    """Spearman's rho between every two columns of ``values`` over the SAEs that have both
    (pairwise complete), or ``None`` when fewer than ``min_n`` SAEs or fewer than two columns."""
    if len(values) < min_n or values.shape[1] < 2:
        return None
    rho = values.corr(method="spearman", min_periods=min_n)
    ok = values.notna().astype(int)
    n = ok.T @ ok
    labels = {h.key: h.label for h in HEADLINES}
    cols = list(values.columns)
    pairs = pd.DataFrame([{"a": labels.get(a, a), "b": labels.get(b, b), "rho": float(rho.loc[a, b]), "n": int(n.loc[a, b])}
                          for i, a in enumerate(cols) for b in cols[i + 1:]])
    return Correlations(rho=rho, n=n, pairs=pairs)
