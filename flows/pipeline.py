"""The main job: model -> vocab -> corpus -> activations -> train -> core metrics -> results table.

Run a profile: ``python -m flows.pipeline --config configs/quick.yaml [--artifacts DIR]``.
The artifacts root comes from ``--artifacts``, else ``$SAEFLOW_ARTIFACTS``, else ``artifacts/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tasks import common  # noqa: F401  (sets Prefect's offline settings before prefect loads)
from prefect import flow

from saeflow.artifacts import ArtifactError, ArtifactRef, default_root, ensure_writable_root
from saeflow.config import ConfigError, PipelineConfig, load_config
from tasks import activations, corpus, metrics, model, tables, train, vocab
from tasks.common import run_stage, stage_logger


@flow(name="saeflow-pipeline", log_prints=True)
def pipeline(config: PipelineConfig, artifacts: str | None = None) -> dict:
    """Run every stage of one profile; returns artifact references and which stages were cached."""
    root = str(ensure_writable_root(artifacts or default_root()).resolve())
    dev = config.train.device
    states = {}

    def stage(name: str, mod, task, **kw) -> ArtifactRef:
        state = run_stage(task, mod.ref, root=root, **kw)
        states[name] = state
        return state.result()

    m = stage("model", model, model.model_task, cfg=config.model)
    activations.check_hook(m, config.activations.hook)
    train.check_sae_config(config.sae)
    v = stage("vocab", vocab, vocab.vocab_task, model=m, cfg=config.vocab)
    c = stage("corpus", corpus, corpus.corpus_task, model=m, cfg=config.corpus, prepend_bos=config.model.prepend_bos)
    a = stage("activations", activations, activations.activations_task, model=m, model_cfg=config.model, corpus=c,
              cfg=config.activations, device=dev)
    s = stage("train", train, train.train_task, acts=a, sae_cfg=config.sae, train_cfg=config.train, device=dev)
    mt = stage("metrics", metrics, metrics.metrics_task, model=m, model_cfg=config.model, corpus=c, acts=a, sae=s,
               cfg=config.metrics, device=dev)
    r = stage("results", tables, tables.tables_task, config=config, saes=[s], metrics=[mt])
    cached = {name: st.name == "Cached" for name, st in states.items()}
    stage_logger().info("stages cached: %s", cached)
    refs = {"model": m, "vocab": v, "corpus": c, "activations": a, "train": s, "metrics": mt, "results": r}
    return {"refs": {k: x.model_dump() for k, x in refs.items()}, "cached": cached}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quick.yaml", help="profile YAML (configs/quick.yaml, smoke.yaml, ...)")
    ap.add_argument("--artifacts", default=None, help="artifacts root (default: $SAEFLOW_ARTIFACTS or artifacts/)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        out = pipeline(cfg, args.artifacts)
    except (ValueError, ArtifactError) as exc:  # every saeflow user-facing error is one of these
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out["cached"]))
    results = Path(out["refs"]["results"]["path"])
    print(f"results: {results / 'core_metrics.md'}")
    print((results / "core_metrics.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
