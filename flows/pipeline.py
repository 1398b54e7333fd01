"""The main job: model -> vocab -> corpus -> activations -> train (the SAE family, one pass) -> core
metrics (one task per SAE) -> the evaluations the profile enables (absorption, stitching, meta-SAE,
probing; each a Prefect subflow ``flows/evals/<eval>.py`` ``flow(ctx)``) -> results tables + plots -> the run report
(``results/<profile>/report.html``: saeflow/report.py, the task in tasks/report.py); with ``browser:``
set, a ``browser`` stage per SAE and the latent browser's site (``results/<profile>/browser/``,
written after the results stage, linked from the report; tasks/browser.py). The stages are
listed once in flows/graph.py (drawn into docs/architecture.png).

Run a profile: ``python -m flows.pipeline --config configs/quick.yaml [--artifacts DIR]`` (the
options of ``saeflow run``). The artifacts root comes from ``--artifacts``, else
``$SAEFLOW_ARTIFACTS``, else ``artifacts/``. The task runner is the profile's ``runner:`` (local,
or Dask: docs/operations.md). The flow returns a :class:`flows.summary.PipelineSummary`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tasks import common  # noqa: F401  (sets Prefect's offline settings before prefect loads)
from prefect import flow

from flows.options import main_of, overrides
from flows.runner import STAGE_START, StageRunner, as_subflow, load_profile, resolve_root, with_runner
from flows.summary import EvalRefs, MemberSummary, PipelineRefs, PipelineSummary, StageTiming
from saeflow import remote
from saeflow.artifacts import ArtifactRef
from saeflow.config import PipelineConfig, resolve_precision
from saeflow.saes import describe_sae
from flows.evals import absorption, meta_sae, probing, stitching
from tasks import activations, browser, corpus, imported, metrics, model, report, tables, train, vocab
from tasks.common import EvalContext, stage_logger

#: Evaluations in the order they run: (PipelineConfig field, module of flows/evals/ with a subflow
#: ``flow(ctx) -> EvalOutput``).
EVALUATIONS = (("absorption", absorption), ("stitching", stitching), ("meta_sae", meta_sae), ("probing", probing))


@flow(name="saeflow-pipeline", log_prints=True)
def pipeline(config: PipelineConfig, artifacts: str | None = None,
             extra_saes: list[ArtifactRef] | None = None) -> PipelineSummary:
    """Run every stage of one profile; returns a :class:`PipelineSummary`: the artifact references
    (``refs``), which stages were cached (``cached``), one line per family member (``members``),
    stage timings (``timings``) and the report's path (``report``); see :mod:`flows.summary`.

    The task runner is the flow's: Prefect's default here; :func:`run_pipeline` applies the
    profile's ``runner:`` (e.g. Dask). With ``runner.kind: dask`` every stage is submitted to the
    cluster (GPU stages annotated when the device is CUDA) and the per-SAE metrics tasks are
    submitted together, so they run in parallel.

    ``extra_saes``: complete SAE artifacts of this profile's activations (e.g. ``train/`` folders
    of an earlier family, found by ``flows.reevaluate``) evaluated after the imported ones.
    """
    root = resolve_root(artifacts)
    config, notes = resolve_precision(config)  # "auto" -> this machine's dtype, before any fingerprint
    dev = config.train.device
    stage = StageRunner(root, config)
    if notes:
        from tasks.common import stage_logger as precision_log

        for note in notes:
            precision_log().info("precision: %s", note)
    states, timings = stage.states, stage.timings
    t_flow = time.perf_counter()
    stage_all = stage.all

    saes = config.sae_configs()
    m = stage("model", model.ref, model.model_task, cfg=config.model)
    activations.check_hook(m, config.activations.hook)
    for sae_cfg in saes:
        train.check_sae_config(sae_cfg)
    v = stage("vocab", vocab.ref, vocab.vocab_task, model=m, cfg=config.vocab)
    c = stage("corpus", corpus.ref, corpus.corpus_task, model=m, cfg=config.corpus, prepend_bos=config.model.prepend_bos)
    a = stage("activations", activations.ref, activations.activations_task, model=m, model_cfg=config.model, corpus=c,
              cfg=config.activations, device=dev)
    complete_before = [r.is_available() for r in train.family_refs(a, saes, config.train, root)]
    s = stage("train", train.family_refs, train.train_family_task, acts=a, members=saes, train_cfg=config.train,
              device=dev)
    ext = stage_all([(f"imported-{i}", imported.ref, imported.import_sae_task, {"entry": p, "acts": a, "model": m})
                     for i, p in enumerate(config.import_saes)])
    n_imported = len(ext)
    ext = ext + list(extra_saes or [])
    mt = stage_all([(f"metrics-{i}", metrics.ref, metrics.metrics_task,
                     {"model": m, "model_cfg": config.model, "corpus": c, "acts": a, "sae": ref, "cfg": config.metrics,
                      "device": dev}) for i, ref in enumerate(s + ext)])
    br = []
    if config.browser is not None:
        br = stage_all([(f"browser-{i}", browser.ref, browser.browser_task,
                         {"model": m, "model_cfg": config.model, "acts": a, "sae": ref, "cfg": config.browser,
                          "device": dev}) for i, ref in enumerate(s + ext)])
    evals = {}
    for name, module in EVALUATIONS:
        if getattr(config, name) is None:
            continue
        before = set(states)
        ctx = EvalContext(config=config, root=root, model=m, vocab=v, corpus=c, acts=a, saes=s + ext,
                          stage=stage, device=dev, stage_all=stage.all)
        evals[name] = (as_subflow(module.flow)(ctx), sorted(set(states) - before))
    r = stage("results", tables.ref, tables.tables_task, config=config, saes=s + ext, metrics=mt,
              evals={name: out for name, (out, _) in evals.items()})
    if config.browser is not None:
        stage_logger().info(STAGE_START, "site")
        outs = {name: out for name, (out, _) in evals.items()}
        stage.step("site", browser.site_task, reused=browser.site_current(config.name, br, outs, root),
                   profile=config.name, saes=s + ext, browsers=br, evals=outs, root=root)
    hit = {name: stage.cached(name) for name in states}
    cached = {name: hit[name] for name in ("model", "vocab", "corpus", "activations", "train")}
    cached["metrics"] = all(hit[f"metrics-{i}"] for i in range(len(mt)))
    if n_imported:
        cached["imported"] = all(hit[f"imported-{i}"] for i in range(n_imported))
    if br:
        cached["browser"] = all(hit[f"browser-{i}"] for i in range(len(br)))
    for name, (_, names) in evals.items():
        cached[name] = all(hit[n] for n in names)
    cached["results"] = hit["results"]
    stage_logger().info("stages cached: %s", cached)
    timings["total"] = {"seconds": round(time.perf_counter() - t_flow, 3), "cached": all(cached.values())}
    stage_logger().info(STAGE_START, "report")
    html = report.report_task(config=config, results=r, timings=timings, root=root)
    if remote.url_of(root) is not None:  # the report and the profile's results folder, to the URL root
        remote.push_tree(r.dir)
        remote.push_tree(Path(root) / "results" / config.name)
    members = [MemberSummary(sae=describe_sae(cfg), train_fingerprint=ref.fingerprint, trained=not before,
                             metrics_cached=hit[f"metrics-{i}"])
               for i, (cfg, ref, before) in enumerate(zip(saes, s, complete_before))]
    refs = PipelineRefs(model=m, vocab=v, corpus=c, activations=a, train=s, imported=ext[:n_imported],
                        extra_saes=ext[n_imported:], metrics=mt, browser=br, results=r,
                        evals={name: EvalRefs(per_sae=out.per_sae, results=out.results, refs=out.refs)
                               for name, (out, _) in evals.items()})
    return PipelineSummary(refs=refs, cached=cached, members=members, report=Path(html),
                           timings={name: StageTiming(**t) for name, t in timings.items()})


def run_pipeline(config: PipelineConfig, artifacts: str | None = None,
                 extra_saes: list[ArtifactRef] | None = None) -> PipelineSummary:
    """:func:`pipeline` on the profile's task runner (``runner:``: local or Dask)."""
    return with_runner(pipeline, config)(config, artifacts, extra_saes)


def run_command(args: argparse.Namespace) -> int:
    """``saeflow run`` / ``python -m flows.pipeline``: run the profile, print what was cached, the
    core results table and where the results and the report are."""
    out = run_pipeline(load_profile(args.config, overrides(args)), args.artifacts)
    print(json.dumps(out.cached))
    results = out.refs.results.dir
    print(f"results: {results / 'core_metrics.md'} (frontier plot: {results / tables.FRONTIER_PNG})")
    print((results / "core_metrics.md").read_text())
    print(f"report: {out.report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_of("pipeline", run_command, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
