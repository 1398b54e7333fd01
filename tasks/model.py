"""Stage ``model``: materialise the language model once as a fast-loading copy."""

from __future__ import annotations

import json

from saeflow.artifacts import ArtifactRef, artifact_ref, begin, fingerprint, mark_complete
from saeflow.config import ModelConfig
from saeflow.model_sources import materialize_model
from tasks.common import stage_logger, stage_task, timed

STAGE = "model"


def model_identity(cfg: ModelConfig) -> dict:
    """What determines the saved copy (not the runtime dtype or BOS handling)."""
    ident = {"name": cfg.name}
    if cfg.name == "tiny-random":
        ident.update(layers=cfg.tiny_layers, d_model=cfg.tiny_d_model, seed=cfg.seed)
    return ident


def ref(cfg: ModelConfig, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, STAGE, fingerprint(STAGE, model_identity(cfg)))


@stage_task(ref, name="model", task_run_name="model-{cfg.name}")
def model_task(out: ArtifactRef, cfg: ModelConfig, root: str) -> None:
    logger = stage_logger()
    begin(out, cfg)
    with timed(f"materialising {cfg.name}") as t:
        meta = materialize_model(cfg, out.dir)
    mark_complete(out, seconds=t.get("seconds"), **meta)
    logger.info("model %s: %s", cfg.name, json.dumps(meta))
