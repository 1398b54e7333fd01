"""The run report: one self-contained HTML file (tables inlined, PNG plots base64-embedded) plus a
markdown twin, written to ``results/<profile>/report.html`` and ``report.md``.

It holds every table (``*.parquet``) and plot (``*.png``) of the results folder, the evaluations'
subfolders included (whatever the results stage copied there: the report does not know the
evaluations, it lists what the folder holds), the profile's config, the model, package versions
and the stage timings of the run. ``run.json`` beside them keeps the timings and versions, so
``saeflow report`` can rebuild the report later without re-running anything.

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

from saeflow.artifacts import COMPLETE_MARKER, write_atomic
from saeflow.pages import render

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
RUN_JSON = "run.json"
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


def _relocate(listed: Path, results_dir: Path) -> Path | None:
    """A file recorded by absolute path, found under ``results_dir`` even if the root moved."""
    try:
        return results_dir / listed.relative_to(results_dir)
    except ValueError:
        pass
    parts = listed.parts
    for i in range(len(parts) - 1, -1, -1):  # .../results/<profile>/<rel>
        if parts[i] == results_dir.name and i > 0 and parts[i - 1] == results_dir.parent.name:
            return results_dir.joinpath(*parts[i + 1:])
    return None


def result_files(results_dir: Path) -> tuple[list[Path], list[Path]]:
    """The tables (``*.parquet``) and plots (``*.png``) of a results folder, top level first,
    then each subfolder (an evaluation) in name order.

    When the folder's ``_COMPLETE.json`` lists the files its run wrote, only those count (files
    left by an earlier run with other evaluations are not reported); otherwise every file does.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ReportError(f"results folder {results_dir} does not exist; run the pipeline for this profile first")
    files: list[Path] | None = None
    marker = results_dir / COMPLETE_MARKER
    if marker.is_file():
        listed = json.loads(marker.read_text()).get("files")
        if isinstance(listed, list) and listed:
            files = [p for p in (_relocate(Path(f), results_dir) for f in listed) if p is not None and p.is_file()]
    if files is None:
        files = [f for f in results_dir.rglob("*") if f.is_file()]
    files = [f for f in files if f.name not in OWN_FILES]

    def order(f: Path) -> tuple:
        rel = f.relative_to(results_dir)
        return (len(rel.parts) > 1, str(rel.parent), f.name)

    tables = sorted((f for f in files if f.suffix == ".parquet"), key=order)
    plots = sorted((f for f in files if f.suffix == ".png"), key=order)
    return tables, plots


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
class ReportPage:
    """Everything the report shows, computed; the templates only lay it out."""

    title: str
    info: dict[str, Any]
    tables: list[ReportTable]
    plots: list[ReportPlot]
    timings_html: str | None
    """``None``: no timings recorded (a report rebuilt without a run)."""
    timings_markdown: str | None
    config_yaml: str
    versions: dict[str, str]


def _table(f: Path, results_dir: Path) -> ReportTable:
    rel = f.relative_to(results_dir)
    df = pd.read_parquet(f)
    shown = df.head(MAX_ROWS)
    note = f"{len(df)} rows x {len(df.columns)} columns" + (
        f"; first {MAX_ROWS} shown, the full table is {rel}" if len(df) > MAX_ROWS else "")
    return ReportTable(section=_section(rel), name=f.stem, rel=str(rel), note=note,
                       html=shown.to_html(index=False, border=0, float_format=_fmt, na_rep="", escape=True),
                       markdown=shown.to_markdown(index=False, floatfmt=".4g"))


def _plot(f: Path, results_dir: Path) -> ReportPlot:
    rel = f.relative_to(results_dir)
    data = f.read_bytes()
    if not data.startswith(PNG_MAGIC):
        raise ReportError(f"{f} is not a PNG file (bad signature); the stage that wrote it must save PNGs")
    return ReportPlot(section=_section(rel), name=f.stem, rel=rel.as_posix(),
                      data_uri="data:image/png;base64," + base64.b64encode(data).decode())


def report_page(results_dir: str | Path, config: dict[str, Any], timings: dict[str, Any],
                run_info: dict[str, Any] | None = None, vers: dict[str, str] | None = None) -> ReportPage:
    """What the report of ``results_dir`` shows (reads the tables and plots; writes nothing).

    ``config`` is the profile as JSON-able data, ``timings`` stage -> ``{"seconds", "cached"}``,
    ``run_info`` extra facts (flow run id, ...), ``vers`` the package versions (default:
    :func:`versions`). Every ``*.png`` must be a valid PNG (else :class:`ReportError`).
    """
    results_dir = Path(results_dir)
    tables, plots = result_files(results_dir)
    info = {"profile": config.get("name"), "model": (config.get("model") or {}).get("name"),
            "hook": (config.get("activations") or {}).get("hook"),
            "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **(run_info or {})}
    timings_html = timings_md = None
    if timings:
        tdf = pd.DataFrame([{"stage": k, "seconds": v.get("seconds"), "cached": v.get("cached")}
                            for k, v in timings.items()])
        timings_html = tdf.to_html(index=False, border=0, float_format=lambda x: f"{x:.2f}", escape=True)
        timings_md = tdf.to_markdown(index=False, floatfmt=".2f")
    return ReportPage(title=f"saeflow report: {info['profile']}", info=info,
                      tables=[_table(f, results_dir) for f in tables], plots=[_plot(f, results_dir) for f in plots],
                      timings_html=timings_html, timings_markdown=timings_md,
                      config_yaml=yaml.safe_dump(config, sort_keys=False), versions=vers or versions())


def render_report(page: ReportPage) -> tuple[str, str]:
    """The report's HTML and markdown text."""
    return render("report.html.j2", page=page), render("report.md.j2", page=page)


def build_report(results_dir: str | Path, config: dict[str, Any], timings: dict[str, Any] | None = None,
                 run_info: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``report.html``, ``report.md`` and ``run.json`` into ``results_dir``; return the
    first two paths.

    ``timings`` ``None``: taken from ``run.json`` of an earlier report, if any. See
    :func:`report_page` for the arguments.
    """
    results_dir = Path(results_dir)
    saved = json.loads((results_dir / RUN_JSON).read_text()) if (results_dir / RUN_JSON).is_file() else {}
    if timings is None:
        timings = saved.get("timings") or {}
    page = report_page(results_dir, config, timings, run_info)
    html_text, md_text = render_report(page)
    html_path, md_path = results_dir / REPORT_HTML, results_dir / REPORT_MD
    write_atomic(html_path, html_text)
    write_atomic(md_path, md_text)
    write_atomic(results_dir / RUN_JSON, json.dumps({"info": page.info, "timings": timings, "versions": page.versions},
                                                    indent=2, default=str))
    return html_path, md_path
