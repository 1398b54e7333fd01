"""The absorption evaluation's stage graph (SPEC 1) as a Prefect subflow: data -> probe (refused
when too few letters pass its F1 gate) -> one stage per SAE -> the family's results. The stages are
in :mod:`tasks.absorption`, the computations in :mod:`saeflow.evals.absorption`."""

from __future__ import annotations

from tasks import absorption as stages  # first: tasks.common sets Prefect's offline settings
from prefect import flow as prefect_flow

from saeflow.config import PipelineConfig
from saeflow.evals.absorption.config import AbsorptionConfig
from tasks.common import EvalContext, EvalOutput


@prefect_flow(name="absorption", validate_parameters=False)
def flow(ctx: EvalContext) -> EvalOutput:
    """Evaluate every SAE in ``ctx.saes`` (see :class:`tasks.common.EvalContext`)."""
    config: PipelineConfig = ctx.config
    cfg: AbsorptionConfig = config.absorption
    hook = config.activations.hook
    data = ctx.stage("absorption-data", stages.data_ref, stages.data_task, model=ctx.model, model_cfg=config.model,
                     vocab=ctx.vocab, hook=hook, cfg=cfg, device=ctx.device)
    probe = ctx.stage("absorption-probe", stages.probe_ref, stages.probe_task, data=data, cfg=cfg, device=ctx.device)
    stages.check_probe(probe, cfg)
    per_sae = [ctx.stage(f"absorption-{i}", stages.sae_ref, stages.sae_task, model=ctx.model, model_cfg=config.model,
                         data=data, probe=probe, sae=s, hook=hook, cfg=cfg, device=ctx.device)
               for i, s in enumerate(ctx.saes)]
    results = ctx.stage("absorption-results", stages.results_ref, stages.results_task, per_sae=per_sae, saes=ctx.saes)
    return EvalOutput(per_sae=list(per_sae), results=results, refs=[data, probe])
