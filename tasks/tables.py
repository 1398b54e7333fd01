"""Stage ``results``: the pandas results table (parquet + markdown), one row per SAE, and the
sparsity-fidelity frontier plot (``frontier.png``: explained variance vs L0, one line per
architecture and width)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from prefect import task

from saeflow.artifacts import COMPLETE_MARKER, ArtifactRef, begin, fingerprint, mark_complete, require_complete
from saeflow.config import PipelineConfig
from saeflow.plots import frontier_plot
from saeflow.tables import core_table, write_table
from tasks.common import publish_markdown, publish_table, stage_logger

STAGE = "results"
FRONTIER_PNG = "frontier.png"


def ref(config: PipelineConfig, saes: list[ArtifactRef], metrics: list[ArtifactRef], root: str, **_) -> ArtifactRef:
    fp = fingerprint(STAGE, {"profile": config.name}, *saes, *metrics)
    return ArtifactRef(stage=STAGE, fingerprint=fp, path=str(Path(root) / STAGE / config.name))


@task(name="results")
def tables_task(config: PipelineConfig, saes: list[ArtifactRef], metrics: list[ArtifactRef], root: str) -> ArtifactRef:
    out = ref(config, saes, metrics, root)
    if out.is_complete():
        return out
    rows = []
    for sae, met in zip(saes, metrics):
        sae_dir = require_complete(sae)
        train = json.loads((sae_dir / "config.json").read_text())["config"]
        rows.append({"profile": config.name, "model": config.model.name, "hook": config.activations.hook,
                     "sae_fingerprint": sae.fingerprint, "sae": train["sae"],
                     "metrics": json.loads((require_complete(met) / "metrics.json").read_text())})
    df = core_table(rows)
    (out.dir / COMPLETE_MARKER).unlink(missing_ok=True)  # these tables replace the previous run's
    begin(out, {"profile": config.name, "config": config.model_dump(mode="json")}, [*saes, *metrics])
    paths = write_table(df, out.dir, "core_metrics")
    paths.append(frontier_plot(df, out.dir / FRONTIER_PNG))
    mark_complete(out, rows=len(df), files=[str(p) for p in paths])
    publish_table("core-metrics", json.loads(df.to_json(orient="records")), "Core SAE metrics, one row per SAE")
    publish_markdown("core-metrics-md", df.to_markdown(index=False, floatfmt=".4g"))
    stage_logger().info("results: %d rows -> %s", len(df), out.dir)
    return out


def load_table(ref_: ArtifactRef) -> pd.DataFrame:
    return pd.read_parquet(require_complete(ref_) / "core_metrics.parquet")
