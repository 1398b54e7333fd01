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
from flows.options import main_of
from flows.runner import StageRunner, deployable_flow, local_root, profile_command
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


train_family = deployable_flow("saeflow-train-family", train_family_flow, "Train a profile's SAE family (activations first, when missing).")


def report(out: dict, args: argparse.Namespace) -> None:
    """What ``python -m flows.train_family`` prints: each member, trained now or already complete, and its folder."""
    root = Path(local_root(args.artifacts))
    for m in out["members"]:
        print(f"{m['sae']}: {'trained' if m['trained'] else 'already complete'} -> {root / 'train' / m['train_fingerprint']}")


run_command = profile_command(train_family_flow, report)


if __name__ == "__main__":
    sys.exit(main_of("train-family", run_command, description=__doc__))
