"""Deployable flow ``train-family``: extraction, then the profile's SAE family (one pass over the
activations), without metrics or evaluations. ``flows.reevaluate`` (or the next pipeline run)
evaluates what it trained.

``saeflow run --flow train-family --config ...`` or the ``train-family`` deployment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks import common  # noqa: F401  (sets Prefect's offline settings before prefect loads)
from prefect import flow

from flows.extract import extract_stages, prepare_root, summary
from flows.options import main_of, overrides
from flows.runner import StageRunner, local_root, run_profile
from saeflow.config import PipelineConfig
from saeflow.saes import describe_sae
from tasks import train


@flow(name="saeflow-train-family-stages", log_prints=True)
def train_family_flow(config: PipelineConfig, artifacts: str | None = None) -> dict:
    """Extraction + training of ``config``'s family on the flow's task runner."""
    root = prepare_root(artifacts)
    stage = StageRunner(root, config)
    saes = config.sae_configs()
    for sae_cfg in saes:
        train.check_sae_config(sae_cfg)
    m, c, a = extract_stages(config, stage)
    before = [r.is_available() for r in train.family_refs(a, saes, config.train, root)]
    s = stage("train", train.family_refs, train.train_family_task, acts=a, members=saes, train_cfg=config.train,
              device=config.train.device)
    out = summary(stage, {"model": m.model_dump(), "corpus": c.model_dump(), "activations": a.model_dump(),
                          "train": [x.model_dump() for x in s]})
    out["members"] = [{"sae": describe_sae(cfg), "train_fingerprint": ref.fingerprint, "trained": not done}
                      for cfg, ref, done in zip(saes, s, before)]
    return out


@flow(name="saeflow-train-family", log_prints=True)
def train_family(profile: str = "configs/quick.yaml", artifacts: str | None = None, overrides: dict | None = None) -> dict:
    """Train a profile's SAE family (activations first, when missing).

    Args:
        profile: profile YAML, relative to the repository (the deployment's working directory).
        artifacts: artifacts root (default ``$SAEFLOW_ARTIFACTS`` or ``artifacts/``).
        overrides: sections merged over the profile, e.g. ``{"train": {"device": "cuda"}}``.
    """
    return run_profile(train_family_flow, profile, artifacts, overrides)


def run_command(args: argparse.Namespace) -> int:
    """``saeflow run --flow train-family`` / ``python -m flows.train_family``."""
    out = run_profile(train_family_flow, args.config, args.artifacts, overrides(args))
    root = Path(local_root(args.artifacts))
    for m in out["members"]:
        print(f"{m['sae']}: {'trained' if m['trained'] else 'already complete'} -> {root / 'train' / m['train_fingerprint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main_of("train-family", run_command, description=__doc__))
