"""Stage ``results``: the pandas results table (parquet + markdown), one row per SAE, and the
sparsity-fidelity frontier plot (``frontier.png``: explained variance vs L0, one line per
architecture and width)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from saeflow.artifacts import COMPLETE_MARKER, ArtifactRef, begin, fingerprint, mark_complete, require_complete
from saeflow.config import PipelineConfig
from saeflow.plots import frontier_plot
from saeflow.tables import core_table, write_table
from tasks.common import EvalOutput, publish_markdown, publish_table, stage_logger, stage_task

STAGE = "results"
FRONTIER_PNG = "frontier.png"


def _eval_refs(evals: dict[str, EvalOutput] | None) -> list[ArtifactRef]:
    out: list[ArtifactRef] = []
    for name in sorted(evals or {}):
        ev = evals[name]
        out += [x for x in ev.per_sae if x is not None] + ([ev.results] if ev.results is not None else [])
    return out


def ref(config: PipelineConfig, saes: list[ArtifactRef], metrics: list[ArtifactRef], root: str,
        evals: dict[str, EvalOutput] | None = None, **_) -> ArtifactRef:
    fp = fingerprint(STAGE, {"profile": config.name, "evals": sorted(evals or {})}, *saes, *metrics, *_eval_refs(evals))
    return ArtifactRef(stage=STAGE, fingerprint=fp, path=str(Path(root) / STAGE / config.name))


@stage_task(ref, name="results")
def tables_task(out: ArtifactRef, config: PipelineConfig, saes: list[ArtifactRef], metrics: list[ArtifactRef], root: str,
                evals: dict[str, EvalOutput] | None = None) -> None:
    """One row per SAE (core metrics plus each evaluation's ``summary.json`` columns); every
    evaluation's own tables and plots are copied to ``<eval>/`` beside it."""
    evals = evals or {}
    rows = []
    for i, (sae, met) in enumerate(zip(saes, metrics)):
        sae_dir = require_complete(sae)
        train = json.loads((sae_dir / "config.json").read_text())["config"]
        values = json.loads((require_complete(met) / "metrics.json").read_text())
        for name in sorted(evals):
            per_sae = evals[name].per_sae
            if i < len(per_sae) and per_sae[i] is not None:
                values.update(json.loads((require_complete(per_sae[i]) / "summary.json").read_text()))
        rows.append({"profile": config.name, "model": config.model.name, "hook": config.activations.hook,
                     "sae_fingerprint": sae.fingerprint, "sae": train["sae"], "metrics": values})
    df = core_table(rows)
    (out.dir / COMPLETE_MARKER).unlink(missing_ok=True)  # these tables replace the previous run's
    begin(out, {"profile": config.name, "config": config.model_dump(mode="json")},
          [*saes, *metrics, *_eval_refs(evals)])
    paths = write_table(df, out.dir, "core_metrics")
    for name in sorted(evals):
        if evals[name].results is None:
            continue
        src, dst = require_complete(evals[name].results), out.dir / name
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix in (".parquet", ".md", ".png", ".csv", ".json") and f.name not in (COMPLETE_MARKER, "config.json"):
                shutil.copy2(f, dst / f.name)
                paths.append(dst / f.name)
    paths.append(frontier_plot(df, out.dir / FRONTIER_PNG))
    mark_complete(out, rows=len(df), files=[str(p) for p in paths])
    publish_table("core-metrics", json.loads(df.to_json(orient="records")), "Core SAE metrics, one row per SAE")
    publish_markdown("core-metrics-md", df.to_markdown(index=False, floatfmt=".4g"))
    stage_logger().info("results: %d rows -> %s", len(df), out.dir)


def load_table(ref_: ArtifactRef) -> pd.DataFrame:
    return pd.read_parquet(require_complete(ref_) / "core_metrics.parquet")
