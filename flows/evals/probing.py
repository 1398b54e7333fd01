"""The sparse-probing evaluation's stage graph (SPEC 5) as a Prefect subflow: activations per
dataset (and OOD file) -> baselines -> one stage per SAE -> results. The stages are in
:mod:`tasks.probing`, the computations in :mod:`saeflow.evals.probing`."""

from __future__ import annotations

from tasks import probing as stages  # first: tasks.common sets Prefect's offline settings
from prefect import flow as prefect_flow

from saeflow.evals import probing as P
from saeflow.evals.probing.config import ProbingConfig
from tasks.common import EvalContext, EvalOutput, stage_logger


@prefect_flow(name="probing", validate_parameters=False)
def flow(ctx: EvalContext) -> EvalOutput:
    """Probe every SAE in ``ctx.saes`` on the configured datasets and regimes (SPEC 5)."""
    cfg: ProbingConfig = ctx.config.probing
    names, unknown = P.resolve_datasets(cfg.datasets)
    if unknown:
        stage_logger().warning("probing: skipping %d unknown dataset(s): %s", len(unknown), "; ".join(unknown.values()))
    hook, mcfg = ctx.config.activations.hook, ctx.config.model
    common = dict(model=ctx.model, model_cfg=mcfg, hook=hook, max_rows=cfg.max_rows, max_seq_len=cfg.max_seq_len,
                  device=ctx.device, batch_tokens=cfg.batch_tokens)
    acts = {n: ctx.stage(f"probing-acts-{n}", stages.acts_ref, stages.acts_task, dataset=n, ood=False, **common)
            for n in names}
    ood = {}
    if "ood" in cfg.regimes:
        ood = {n: ctx.stage(f"probing-acts-{n}-ood", stages.acts_ref, stages.acts_task, dataset=n, ood=True, **common)
               for n in names if n in P.ood_dataset_names()}
    base = ctx.stage("probing-baselines", stages.baselines_ref, stages.baselines_task, acts=acts, ood=ood, cfg=cfg)
    per_sae = [ctx.stage(f"probing-sae-{i}", stages.sae_ref, stages.sae_task, sae=s, acts=acts, ood=ood, cfg=cfg)
               for i, s in enumerate(ctx.saes)]
    res = ctx.stage("probing-results", stages.results_ref, stages.results_task, baselines=base, saes=per_sae, cfg=cfg,
                    unknown=unknown)
    return EvalOutput(per_sae=list(per_sae), results=res, refs=[*acts.values(), *ood.values(), base])
