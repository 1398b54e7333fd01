"""The run report: one self-contained HTML file (tables inlined, PNG plots base64-embedded) plus a
markdown twin, written to ``results/<profile>/report.html`` and ``report.md`` after every run.

It holds every table (``*.parquet``) and plot (``*.png``) of the results folder, the evaluations'
subfolders included (whatever ``tasks/tables.py`` copied there: the report does not know the
evaluations, it lists what the folder holds), the profile's config, the model, package versions
and the stage timings of the run. Inside a flow run the tables and the markdown are also published
as Prefect artifacts (``report-<profile>``, ``<profile>-<folder>-<table>``).

``run.json`` beside them keeps the timings and versions, so ``saeflow report`` can rebuild the
report later without re-running anything.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import os
import platform
import re
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from prefect import task

from saeflow.artifacts import COMPLETE_MARKER, ArtifactRef, require_complete
from saeflow.config import PipelineConfig
from tasks.common import publish_markdown, publish_table, stage_logger

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


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for reading
    os.replace(tmp, path)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em} h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0 1em} th,td{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left} .wrap{overflow-x:auto}
img{max-width:100%;border:1px solid #eee} pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.8em}
.note{color:#666;font-size:.85em} nav a{margin-right:1em}
"""


def build_report(results_dir: str | Path, config: dict[str, Any], timings: dict[str, Any] | None = None,
                 run_info: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into ``results_dir``; return their paths.

    ``config`` is the profile as JSON-able data, ``timings`` stage -> ``{"seconds", "cached"}``
    (``None``: taken from ``run.json`` of an earlier report, if any), ``run_info`` extra facts
    (flow run id, ...). Every ``*.png`` must be a valid PNG (else :class:`ReportError`).
    """
    results_dir = Path(results_dir)
    tables, plots = result_files(results_dir)
    saved = json.loads((results_dir / RUN_JSON).read_text()) if (results_dir / RUN_JSON).is_file() else {}
    if timings is None:
        timings = saved.get("timings") or {}
    vers = versions()
    info = {"profile": config.get("name"), "model": (config.get("model") or {}).get("name"),
            "hook": (config.get("activations") or {}).get("hook"),
            "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **(run_info or {})}
    title = f"saeflow report: {info['profile']}"

    h: list[str] = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
                    f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
                    "<nav><a href='#tables'>tables</a><a href='#plots'>plots</a><a href='#timings'>timings</a>"
                    "<a href='#config'>config</a><a href='#versions'>versions</a></nav>",
                    "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                                        for k, v in info.items()) + "</table>"]
    md: list[str] = [f"# {title}", "", *(f"- **{k}**: {v}" for k, v in info.items()), ""]

    h.append("<h2 id='tables'>Tables</h2>")
    md += ["## Tables", ""]
    if not tables:
        h.append("<p class='note'>no tables in this results folder</p>")
    for f in tables:
        rel = f.relative_to(results_dir)
        df = pd.read_parquet(f)
        shown = df.head(MAX_ROWS)
        note = f"{len(df)} rows x {len(df.columns)} columns" + (
            f"; first {MAX_ROWS} shown, the full table is {rel}" if len(df) > MAX_ROWS else "")
        h.append(f"<h3>{html.escape(_section(rel))}: {html.escape(f.stem)}</h3><p class='note'>{html.escape(str(rel))}: "
                 f"{html.escape(note)}</p><div class='wrap'>"
                 + shown.to_html(index=False, border=0, float_format=_fmt, na_rep="") + "</div>")
        md += [f"### {_section(rel)}: {f.stem}", "", f"`{rel}`: {note}", "",
               shown.to_markdown(index=False, floatfmt=".4g"), ""]

    h.append("<h2 id='plots'>Plots</h2>")
    md += ["## Plots", ""]
    if not plots:
        h.append("<p class='note'>no plots in this results folder</p>")
    for f in plots:
        rel = f.relative_to(results_dir)
        data = f.read_bytes()
        if not data.startswith(PNG_MAGIC):
            raise ReportError(f"{f} is not a PNG file (bad signature); the stage that wrote it must save PNGs")
        h.append(f"<h3>{html.escape(_section(rel))}: {html.escape(f.stem)}</h3><p class='note'>{html.escape(str(rel))}</p>"
                 f"<img alt='{html.escape(str(rel))}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>")
        md += [f"### {_section(rel)}: {f.stem}", "", f"![{rel}]({rel.as_posix()})", ""]

    h.append("<h2 id='timings'>Stage timings</h2>")
    md += ["## Stage timings", ""]
    if timings:
        tdf = pd.DataFrame([{"stage": k, "seconds": v.get("seconds"), "cached": v.get("cached")}
                            for k, v in timings.items()])
        h.append(tdf.to_html(index=False, border=0, float_format=lambda x: f"{x:.2f}"))
        md += [tdf.to_markdown(index=False, floatfmt=".2f"), ""]
    else:
        h.append("<p class='note'>no timings recorded (report rebuilt without a run)</p>")
        md += ["no timings recorded", ""]

    cfg_yaml = yaml.safe_dump(config, sort_keys=False)
    h.append(f"<h2 id='config'>Config</h2><pre>{html.escape(cfg_yaml)}</pre>")
    md += ["## Config", "", "```yaml", cfg_yaml.rstrip(), "```", ""]
    h.append("<h2 id='versions'>Versions</h2><table>" + "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in vers.items()) + "</table>")
    md += ["## Versions", "", *(f"- {k}: {v}" for k, v in vers.items()), ""]
    h.append("</body></html>")

    html_path, md_path = results_dir / REPORT_HTML, results_dir / REPORT_MD
    _atomic_write(html_path, "\n".join(h))
    _atomic_write(md_path, "\n".join(md))
    _atomic_write(results_dir / RUN_JSON, json.dumps({"info": info, "timings": timings, "versions": vers}, indent=2,
                                                     default=str))
    return html_path, md_path


def _key(*parts: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")[:100]


@task(name="report")
def report_task(config: PipelineConfig, results: ArtifactRef, timings: dict[str, Any], root: str) -> str:
    """Build the run's report in the results folder and publish it to the Prefect UI."""
    results_dir = require_complete(results)
    run_info: dict[str, Any] = {"artifacts_root": root}
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            run_info["flow_run"] = f"{flow_run.name} ({flow_run.id})"
    except Exception:  # noqa: BLE001
        pass
    html_path, md_path = build_report(results_dir, config.model_dump(mode="json"), timings, run_info)
    tables, _ = result_files(results_dir)
    for f in tables:
        rel = f.relative_to(results_dir)
        if len(rel.parts) == 1 and f.stem == "core_metrics":
            continue  # published by the results stage
        df = pd.read_parquet(f).head(MAX_ROWS)
        publish_table(_key(config.name, *rel.parent.parts, f.stem), json.loads(df.to_json(orient="records")),
                      f"{rel} ({config.name})")
    body = md_path.read_text()
    body = re.sub(r"!\[([^\]]*)\]\(([^)]*)\)", lambda m: f"plot `{m.group(2)}` (embedded in {html_path})", body)
    publish_markdown(_key("report", config.name), body, f"saeflow report of profile {config.name}")
    stage_logger().info("report: %s", html_path)
    return str(html_path)
