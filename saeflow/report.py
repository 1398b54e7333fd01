"""The run report: one self-contained HTML file (tables inlined, PNG plots base64-embedded) plus a
markdown twin, written to ``results/<profile>/report.html`` and ``report.md``.

The page answers first: a warning listing every optimisation an evaluation recorded as not
converged (a ``converged`` column that is false in one of its tables), the report card
(:mod:`saeflow.report_card`: one row per SAE, one headline number per evaluation, best per column
marked), then the papers' figures with captions computed
from the data (:mod:`saeflow.report_figures`), the rank correlations between the headline numbers
across the SAEs (exploratory, with at least four SAEs), and below, collapsed, every table
(``*.parquet``) and plot (``*.png``) of the results folder with SAEs named, never indexed, links to
each evaluation's files and to the latent browser (``browser/index.html``, :mod:`saeflow.browser`) when it exists; then the
profile's config, the model, package versions and the stage timings of the run. ``run.json``
beside them keeps the timings and versions, so ``saeflow report`` can rebuild the report later
without re-running anything.

:func:`report_page` computes what goes on the page (:class:`ReportPage`); the Jinja2 templates
``saeflow/templates/report.html.j2`` (autoescaped) and ``report.md.j2`` lay it out;
:func:`build_report` does both and writes the files. No Prefect here: ``tasks/report.py`` is the
stage task that also publishes the report to the Prefect UI.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from saeflow.artifacts import COMPLETE_MARKER, listed_file, write_atomic
from saeflow.pages import render
from saeflow.report_card import (
    HEADLINES,
    MIN_CORRELATION_SAES,
    ReportCard,
    card_markdown,
    convergence_warnings,
    named_table,
    rank_correlations,
    report_card,
    sae_names,
)
from saeflow.report_figures import ReportFigure, correlation_heatmap, paper_figures

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
RUN_JSON = "run.json"
CORE_TABLE = "core_metrics"
#: The latent browser, linked from the report when the results folder holds it.
LATENTS_INDEX = "browser/index.html"
#: Rows of one table shown in the report (the full table stays in its parquet file).
MAX_ROWS = 200
PACKAGES = ("saeflow", "torch", "transformer-lens", "transformers", "prefect", "prefect-dask", "dask", "distributed",
            "zarr", "numpy", "pandas", "pyarrow", "scikit-learn", "sae-lens", "sae-probes")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OWN_FILES = {REPORT_HTML, REPORT_MD, RUN_JSON, COMPLETE_MARKER, "config.json"}


class ReportError(ValueError):
    """A results folder the report cannot be built from."""


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        import torch

        out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    return out


def _run_files(results_dir: Path) -> list[Path]:
    """Every file of the results folder's run (see :func:`result_files`), the report's own left out."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ReportError(f"results folder {results_dir} does not exist; run the pipeline for this profile first")
    files: list[Path] | None = None
    marker = results_dir / COMPLETE_MARKER
    if marker.is_file():
        listed = json.loads(marker.read_text()).get("files")
        if isinstance(listed, list) and listed:
            files = [p for p in (listed_file(results_dir, f) for f in listed) if p is not None and p.is_file()]
    if files is None:
        files = [f for f in results_dir.rglob("*") if f.is_file()]

    def order(f: Path) -> tuple:
        rel = f.relative_to(results_dir)
        return (len(rel.parts) > 1, str(rel.parent), f.name)

    return sorted((f for f in files if f.name not in OWN_FILES), key=order)


def result_files(results_dir: Path) -> tuple[list[Path], list[Path]]:
    """The tables (``*.parquet``) and plots (``*.png``) of a results folder, top level first,
    then each subfolder (an evaluation) in name order.

    When the folder's ``_COMPLETE.json`` lists the files its run wrote, only those count (files
    left by an earlier run with other evaluations are not reported); otherwise every file does.
    """
    files = _run_files(results_dir)
    return [f for f in files if f.suffix == ".parquet"], [f for f in files if f.suffix == ".png"]


def _key(rel: Path) -> str:
    """``core_metrics`` or ``<eval>/<table>``: a table's key in :func:`named_tables`."""
    return rel.with_suffix("").as_posix()


def named_tables(results_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Every table of the results folder (key: its path without suffix, e.g.
    ``absorption/absorption_letters``) with SAEs named as in the core table, never indexed
    (:func:`saeflow.report_card.named_table`): what the report shows and publishes."""
    results_dir = Path(results_dir)
    tables, _ = result_files(results_dir)
    raw = {_key(f.relative_to(results_dir)): pd.read_parquet(f) for f in tables}
    core = raw.get(CORE_TABLE)
    if core is None:
        return raw
    names = sae_names(core)
    by_fp = dict(zip(core["sae_fingerprint"].astype(str), names)) if "sae_fingerprint" in core else {}
    out = {}
    for key, df in raw.items():
        section = key.rsplit("/", 1)[0] if "/" in key else ""
        index_table = next((t for k, t in raw.items()
                            if k.startswith(section + "/") and {"sae_index", "sae_fingerprint"} <= set(t)), None) if section else None
        out[key] = named_table(df, by_fp, names, index_table)
    return out


def _section(rel: Path) -> str:
    return "core" if len(rel.parts) == 1 else str(rel.parent)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


@dataclass(frozen=True)
class ReportTable:
    """One table of the results folder as shown: its first :data:`MAX_ROWS` rows."""

    section: str
    name: str
    rel: str
    note: str
    html: str
    """The rows as an HTML table (pandas ``to_html``, cell text escaped)."""
    markdown: str


@dataclass(frozen=True)
class ReportPlot:
    section: str
    name: str
    rel: str
    data_uri: str
    """The PNG itself, base64-embedded (the page needs no other file)."""


@dataclass(frozen=True)
class ReportSection:
    """One part of the results folder (``core`` or an evaluation's subfolder): links to its files,
    its tables and its plots."""

    name: str
    files: list[str]
    """Its files, relative to the results folder (links from the report)."""
    tables: list[ReportTable]
    plots: list[ReportPlot]


@dataclass(frozen=True)
class CrossEvaluation:
    """The rank correlations between the headline numbers (``None`` fields: skipped, see ``note``)."""

    note: str
    heatmap: str | None
    html: str | None
    markdown: str | None


@dataclass(frozen=True)
class ReportPage:
    """Everything the report shows, computed; the templates only lay it out."""

    title: str
    info: dict[str, Any]
    card: ReportCard | None
    """``None``: the results folder has no core table."""
    not_converged: list[tuple[str, str, str]]
    """``(evaluation, SAE, what)`` per optimisation recorded as not converged
    (:func:`saeflow.report_card.convergence_warnings`): a warning at the top of the page."""
    card_markdown: str
    legend: list[tuple[str, str, str]]
    """Per card column: label, direction (``higher`` / ``lower`` is better), meaning."""
    figures: list[ReportFigure]
    cross: CrossEvaluation
    sections: list[ReportSection]
    latents_link: str | None
    """``browser/index.html`` when the results folder holds a latent browser."""
    timings_html: str | None
    """``None``: no timings recorded (a report rebuilt without a run)."""
    timings_markdown: str | None
    config_yaml: str
    versions: dict[str, str]

    @property
    def tables(self) -> list[ReportTable]:
        return [t for s in self.sections for t in s.tables]

    @property
    def plots(self) -> list[ReportPlot]:
        return [p for s in self.sections for p in s.plots]


def _table(rel: Path, df: pd.DataFrame) -> ReportTable:
    shown = df.head(MAX_ROWS)
    note = f"{len(df)} rows x {len(df.columns)} columns" + (
        f"; first {MAX_ROWS} shown, the full table is {rel}" if len(df) > MAX_ROWS else "")
    return ReportTable(section=_section(rel), name=rel.stem, rel=rel.as_posix(), note=note,
                       html=shown.to_html(index=False, border=0, float_format=_fmt, na_rep="", escape=True),
                       markdown=shown.to_markdown(index=False, floatfmt=".4g"))


def _plot(f: Path, results_dir: Path) -> ReportPlot:
    rel = f.relative_to(results_dir)
    data = f.read_bytes()
    if not data.startswith(PNG_MAGIC):
        raise ReportError(f"{f} is not a PNG file (bad signature); the stage that wrote it must save PNGs")
    return ReportPlot(section=_section(rel), name=f.stem, rel=rel.as_posix(),
                      data_uri="data:image/png;base64," + base64.b64encode(data).decode())


def _sections(results_dir: Path, tables: dict[str, pd.DataFrame]) -> list[ReportSection]:
    files = _run_files(results_dir)
    plots = [_plot(f, results_dir) for f in files if f.suffix == ".png"]
    shown = [_table(Path(k + ".parquet"), df) for k, df in tables.items()]
    names = list(dict.fromkeys(_section(f.relative_to(results_dir)) for f in files))
    return [ReportSection(name=n, files=[f.relative_to(results_dir).as_posix() for f in files
                                         if _section(f.relative_to(results_dir)) == n],
                          tables=[t for t in shown if t.section == n], plots=[p for p in plots if p.section == n])
            for n in names]


def _cross(card: ReportCard | None) -> CrossEvaluation:
    n = 0 if card is None else len(card.values)
    corr = None if card is None else rank_correlations(card.values.dropna(axis=1, how="all"))
    if corr is None:
        why = (f"this run has {n} SAE(s), fewer than {MIN_CORRELATION_SAES}" if n < MIN_CORRELATION_SAES
               else "fewer than two headline numbers")
        return CrossEvaluation(note=f"Cross-evaluation rank correlations skipped: {why}.", heatmap=None, html=None,
                               markdown=None)
    labels = {h.key: h.label for h in HEADLINES}
    note = (f"Exploratory: Spearman rank correlations between the headline numbers across the {n} SAEs of this "
            f"run (pairwise complete; n = SAEs with both numbers; no correction for multiple comparisons; "
            f"shown only where n >= {MIN_CORRELATION_SAES}).")
    return CrossEvaluation(note=note, heatmap=correlation_heatmap(corr.rho, labels),
                           html=corr.pairs.to_html(index=False, border=0, float_format=lambda x: f"{x:.2f}",
                                                   na_rep="–", escape=True),
                           markdown=corr.pairs.to_markdown(index=False, floatfmt=".2f"))


def report_page(results_dir: str | Path, config: dict[str, Any], timings: dict[str, Any],
                run_info: dict[str, Any] | None = None, vers: dict[str, str] | None = None,
                tables: dict[str, pd.DataFrame] | None = None) -> ReportPage:
    """What the report of ``results_dir`` shows (reads the tables and plots; writes nothing).

    ``config`` is the profile as JSON-able data, ``timings`` stage -> ``{"seconds", "cached",
    "peak_rss_mib"}``,
    ``run_info`` extra facts (flow run id, ...), ``vers`` the package versions (default:
    :func:`versions`). Every ``*.png`` must be a valid PNG (else :class:`ReportError`).
    """
    results_dir = Path(results_dir)
    tables = named_tables(results_dir) if tables is None else tables  # the caller's, when it read them
    info = {"profile": config.get("name"), "model": (config.get("model") or {}).get("name"),
            "hook": (config.get("activations") or {}).get("hook"),
            "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **(run_info or {})}
    timings_html = timings_md = None
    if timings:
        tdf = pd.DataFrame([{"stage": k, "seconds": v.get("seconds"), "cached": v.get("cached"),
                             "peak RSS (MiB)": v.get("peak_rss_mib")} for k, v in timings.items()])
        timings_html = tdf.to_html(index=False, border=0, float_format=lambda x: f"{x:.2f}", escape=True, na_rep="")
        timings_md = tdf.astype(object).where(tdf.notna(), None).to_markdown(index=False, floatfmt=".2f", missingval="")
    core = tables.get(CORE_TABLE)
    card = report_card(core, tables.get("probing/probing_summary")) if core is not None and len(core) else None
    legend = [(c.label, "higher" if c.headline.higher_is_better else "lower", c.headline.meaning)
              for c in (card.columns if card else [])]
    latents = results_dir / LATENTS_INDEX
    return ReportPage(title=f"saeflow report: {info['profile']}", info=info, card=card,
                      not_converged=convergence_warnings(tables),
                      card_markdown=card_markdown(card) if card else "", legend=legend,
                      figures=paper_figures(core, tables) if card else [], cross=_cross(card),
                      sections=_sections(results_dir, tables),
                      latents_link=LATENTS_INDEX if latents.is_file() else None,
                      timings_html=timings_html, timings_markdown=timings_md,
                      config_yaml=yaml.safe_dump(config, sort_keys=False), versions=vers or versions())


def render_report(page: ReportPage) -> tuple[str, str]:
    """The report's HTML and markdown text."""
    return render("report.html.j2", page=page), render("report.md.j2", page=page)


def build_report(results_dir: str | Path, config: dict[str, Any], timings: dict[str, Any] | None = None,
                 run_info: dict[str, Any] | None = None,
                 tables: dict[str, pd.DataFrame] | None = None) -> tuple[Path, Path]:
    """Write ``report.html``, ``report.md`` and ``run.json`` into ``results_dir``; return the
    first two paths.

    ``timings`` ``None``: taken from ``run.json`` of an earlier report, if any. ``tables``: the
    folder's :func:`named_tables`, when the caller has read them already. See :func:`report_page`
    for the arguments.
    """
    results_dir = Path(results_dir)
    saved = json.loads((results_dir / RUN_JSON).read_text()) if (results_dir / RUN_JSON).is_file() else {}
    if timings is None:
        timings = saved.get("timings") or {}
    page = report_page(results_dir, config, timings, run_info, tables=tables)
    html_text, md_text = render_report(page)
    html_path, md_path = results_dir / REPORT_HTML, results_dir / REPORT_MD
    write_atomic(html_path, html_text)
    write_atomic(md_path, md_text)
    write_atomic(results_dir / RUN_JSON, json.dumps({"info": page.info, "timings": timings, "versions": page.versions},
                                                    indent=2, default=str))
    return html_path, md_path
