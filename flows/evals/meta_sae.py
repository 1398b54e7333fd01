"""The meta-SAE evaluation's stage graph (SPEC 2.4) as a Prefect subflow; the stages are in
:mod:`tasks.meta_sae`, the computations in :mod:`saeflow.evals.meta_sae`."""

from __future__ import annotations

from tasks import common  # noqa: F401  (sets Prefect's offline settings before prefect loads)
import prefect

from flows.evals import stage_all
from saeflow.evals.meta_sae import MetaSAEConfig, MetaSAEInputError
from tasks import meta_sae as stages
from tasks.common import EvalContext, EvalOutput


@prefect.flow(name="meta_sae", validate_parameters=False)
def flow(ctx: EvalContext) -> EvalOutput:
    """Meta-SAE of every SAE in ``ctx.saes``, the cross-size check, the example page and the tables."""
    cfg: MetaSAEConfig = ctx.config.meta_sae
    infos = [stages.sae_info(s) for s in ctx.saes]
    if cfg.example_sae is not None and cfg.example_sae >= len(ctx.saes):
        raise MetaSAEInputError(f"meta_sae.example_sae={cfg.example_sae} but only {len(ctx.saes)} SAEs are evaluated "
                                f"(indices 0..{len(ctx.saes) - 1}); pick one of them or leave it null (the widest)")
    trains = stage_all(ctx, [(f"meta_sae-train-{i}", stages.train_ref, stages.meta_train_task,
                              {"sae": s, "cfg": cfg, "device": ctx.device}) for i, s in enumerate(ctx.saes)])
    jobs = []
    for i, (s, info) in enumerate(zip(ctx.saes, infos)):
        seen: set[str] = set()
        smaller = []  # the smaller SAEs of its group, each once, narrowest first: its cross-size partners
        for t, ti in sorted(zip(ctx.saes, infos), key=lambda p: p[1].width):
            same_group = stages.group_key(ti) == stages.group_key(info)
            if same_group and ti.width < info.width and t.fingerprint not in seen:
                seen.add(t.fingerprint)
                smaller.append(t)
        jobs.append((f"meta_sae-sae-{i}", stages.summary_ref, stages.meta_sae_summary_task,
                     {"sae": s, "meta": trains[i], "smaller": smaller, "cfg": cfg, "device": ctx.device}))
    per_sae = stage_all(ctx, jobs)
    show = cfg.example_sae if cfg.example_sae is not None else max(range(len(infos)), key=lambda i: (infos[i].width, -i))
    examples = None
    if cfg.n_examples > 0:
        examples = ctx.stage("meta_sae-examples", stages.examples_ref, stages.examples_task, model=ctx.model,
                             corpus=ctx.corpus, acts=ctx.acts, sae=ctx.saes[show], meta=trains[show], cfg=cfg,
                             device=ctx.device)
    res = ctx.stage("meta_sae-results", stages.results_ref, stages.results_task, saes=ctx.saes, trains=trains,
                    per_sae=per_sae, examples=examples, cfg=cfg, show=show)
    return EvalOutput(per_sae=per_sae, results=res, refs=trains + ([examples] if examples is not None else []))
