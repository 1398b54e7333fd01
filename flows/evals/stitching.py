"""The stitching evaluation's stage graph (SPEC 2.3) as a Prefect subflow; the stages are in
:mod:`tasks.stitching`, the maths in :mod:`saeflow.evals.stitching`."""

from __future__ import annotations

from tasks import common  # noqa: F401  (sets Prefect's offline settings before prefect loads)
import prefect

from flows.evals import stage_all
from saeflow.artifacts import ArtifactRef
from saeflow.evals.stitching import StitchingConfig, StitchingError, adjacent_pair_for, find_pairs
from tasks import stitching as stages
from tasks.common import EvalContext, EvalOutput, stage_logger


@prefect.flow(name="stitching", validate_parameters=False)
def flow(ctx: EvalContext) -> EvalOutput:
    """Stitch every configured (smaller, larger) pair of ``ctx.saes`` (see :class:`StitchingConfig`):
    a JumpReLU form per SAE in a pair, one ``stitching-pair`` stage per pair, a per-SAE summary and
    the results tables."""
    cfg: StitchingConfig = ctx.config.stitching
    infos = stages.read_infos(ctx.saes)
    pairs = find_pairs(infos, cfg)
    if not pairs:
        raise StitchingError(
            "stitching found no (smaller, larger) pair among the evaluated SAEs: it needs SAEs on the same hook with "
            "the same architecture and sparsity setting and different widths (e.g. family.widths: [1024, 2048, 4096]); "
            "set stitching.pair_across_sparsity, list stitching.pairs, or set stitching: null")
    stage_logger().info("stitching %d pairs: %s", len(pairs),
                        "; ".join(f"{infos[s].label} -> {infos[l].label}" for s, l in pairs))
    involved = sorted({i for p in pairs for i in p})
    form_list = stage_all(ctx, [(f"stitching-form-{i}", stages.form_ref, stages.form_task,
                                 {"sae": ctx.saes[i], "index": i, "acts": ctx.acts, "cfg": cfg, "device": ctx.device})
                                for i in involved])
    forms = dict(zip(involved, form_list))
    pair_list = stage_all(ctx, [(f"stitching-pair-{s}-{l}", stages.pair_ref, stages.pair_task,
                                 {"small": ctx.saes[s], "large": ctx.saes[l], "small_form": forms[s],
                                  "large_form": forms[l], "model": ctx.model, "model_cfg": ctx.config.model,
                                  "corpus": ctx.corpus, "acts": ctx.acts, "cfg": cfg, "device": ctx.device})
                                for s, l in pairs])
    pair_refs = dict(zip(pairs, pair_list))
    per_sae: list[ArtifactRef | None] = [None] * len(ctx.saes)
    adjacent = {i: adjacent_pair_for(i, pairs, infos) for i in involved}
    summaries = stage_all(ctx, [(f"stitching-summary-{i}", stages.summary_ref, stages.summary_task,
                                 {"form": forms[i], "pair": pair_refs[adjacent[i]] if adjacent[i] else None})
                                for i in involved])
    for i, ref_ in zip(involved, summaries):
        per_sae[i] = ref_
    res = ctx.stage("stitching-results", stages.results_ref, stages.results_task,
                    pairs=[pair_refs[p] for p in pairs], forms=[forms[i] for i in involved], hist_bins=cfg.hist_bins)
    return EvalOutput(per_sae=per_sae, results=res, refs=[*forms.values(), *pair_refs.values()])
