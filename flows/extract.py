"""Deployable flow ``extract``: the activations of a profile only (model -> corpus -> activations),
e.g. to fill the activation store on a big machine before training elsewhere.

``python -m flows.extract --config configs/quick.yaml`` or the ``extract`` deployment
(prefect.yaml). The stages are the pipeline's (same tasks, fingerprints and cache): a later
pipeline run reuses them.
"""

from __future__ import annotations

import argparse
import json
import sys

from tasks import common  # noqa: F401  (sets Prefect's offline settings before prefect loads)
from prefect import flow

from flows.options import main_of
from flows.runner import StageRunner, deployable_flow, profile_command, resolve_root
from saeflow.artifacts import ArtifactRef
from saeflow.config import PipelineConfig
from tasks import activations, corpus, model


def prepare_root(artifacts: str | None) -> str:
    return resolve_root(artifacts)


def extract_stages(config: PipelineConfig, stage: StageRunner) -> tuple[ArtifactRef, ArtifactRef, ArtifactRef]:
    """model -> corpus -> activations (as in :func:`flows.pipeline.pipeline`)."""
    m = stage("model", model.ref, model.model_task, cfg=config.model)
    activations.check_hook(m, config.activations.hook)
    c = stage("corpus", corpus.ref, corpus.corpus_task, model=m, cfg=config.corpus, prepend_bos=config.model.prepend_bos)
    a = stage("activations", activations.ref, activations.activations_task, model=m, model_cfg=config.model, corpus=c,
              cfg=config.activations, device=config.train.device)
    return m, c, a


def expected_activations(config: PipelineConfig, root: str) -> ArtifactRef:
    """The activation artifact this profile reads (computed from fingerprints; nothing runs)."""
    m = model.ref(cfg=config.model, root=root)
    c = corpus.ref(model=m, cfg=config.corpus, prepend_bos=config.model.prepend_bos, root=root)
    return activations.ref(model=m, model_cfg=config.model, corpus=c, cfg=config.activations, root=root)


def summary(stage: StageRunner, refs: dict) -> dict:
    return {"refs": refs, "cached": {k: stage.cached(k) for k in stage.states}, "timings": stage.timings}


@flow(name="saeflow-extract-stages", log_prints=True)
def extract_flow(config: PipelineConfig, artifacts: str | None = None) -> dict:
    """The extraction stages of ``config`` on the flow's task runner."""
    stage = StageRunner(prepare_root(artifacts), config)
    m, c, a = extract_stages(config, stage)
    return summary(stage, {"model": m.model_dump(), "corpus": c.model_dump(), "activations": a.model_dump()})


extract = deployable_flow("saeflow-extract", extract_flow, "Activations of a profile only.")


def report(out: dict, args: argparse.Namespace) -> None:
    """What ``python -m flows.extract`` prints: the cached stages and where the activations are."""
    print(json.dumps(out["cached"]))
    print(f"activations: {out['refs']['activations']['path']}")


run_command = profile_command(extract_flow, report)


if __name__ == "__main__":
    sys.exit(main_of("extract", run_command, description=__doc__))
