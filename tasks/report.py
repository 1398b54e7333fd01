"""The report stage: builds the run's report (:mod:`saeflow.report`: one self-contained HTML file
plus a markdown twin in ``results/<profile>/``) and publishes it to the Prefect UI: the tables and
the markdown become Prefect artifacts (``report-<profile>``, ``<profile>-<folder>-<table>``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from prefect import task

from saeflow.artifacts import ArtifactRef, remove_stale_temporaries, require_complete
from saeflow.config import PipelineConfig
from saeflow.report import CORE_TABLE, MAX_ROWS, build_report, named_tables
from tasks.common import publish_markdown, publish_table, stage_logger


def _key(*parts: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")[:100]


@task(name="report")
def report_task(config: PipelineConfig, results: ArtifactRef, timings: dict[str, Any], root: str) -> str:
    """Build the run's report in the results folder and publish it to the Prefect UI."""
    results_dir = require_complete(results)
    remove_stale_temporaries(results_dir)  # of a report (or site stamp) write killed in an earlier run
    run_info: dict[str, Any] = {"artifacts_root": root}
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            run_info["flow_run"] = f"{flow_run.name} ({flow_run.id})"
    except Exception:  # noqa: BLE001
        pass
    tables = named_tables(results_dir)  # SAEs named as in the report, never indexed; read once
    html_path, md_path = build_report(results_dir, config.model_dump(mode="json"), timings, run_info, tables=tables)
    for key, df in tables.items():
        if key == CORE_TABLE:
            continue  # published by the results stage
        publish_table(_key(config.name, *key.split("/")), json.loads(df.head(MAX_ROWS).to_json(orient="records")),
                      f"{key}.parquet ({config.name})")
    body = md_path.read_text()
    body = re.sub(r"!\[([^\]]*)\]\(([^)]*)\)", lambda m: f"plot `{m.group(2)}` (embedded in {html_path})", body)
    publish_markdown(_key("report", config.name), body, f"saeflow report of profile {config.name}")
    stage_logger().info("report: %s", html_path)
    return str(html_path)
