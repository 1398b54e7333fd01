"""Stages of the meta-SAE evaluation (SPEC 2.4; the computations are in :mod:`saeflow.evals.meta_sae`,
the stage graph in :mod:`flows.evals.meta_sae`).

Per SAE of the family (plus imported ones):

- ``meta_sae`` (:func:`meta_train_task`): a BatchTopK meta-SAE trained on the SAE's unit decoder
  rows (:func:`saeflow.evals.meta_sae.train_meta_sae`, resumable; its convergence check in
  ``convergence.json`` and ``metrics.json``, a warning when it did not converge), its decoder variance explained
  and MSE (SAEBench's batch-level top-k forward), each latent's meta-latent decomposition
  (``decomposition.parquet``), meta-latent cluster sizes and the 2x2 max-cosine distributions.
  Depends only on that SAE, so adding an SAE to the family trains one more meta-SAE.
- ``meta_sae-sae`` (:func:`meta_sae_summary_task`): the cross-size check against every smaller SAE
  of the same hook / architecture / sparsity (sparse coding of this SAE's unit decoder rows on the
  smaller one's) and the ``summary.json`` columns merged into the results table.

Once per run:

- ``meta_sae-examples`` (:func:`examples_task`): the markdown page of example decompositions, each
  latent and meta-latent shown by top-activating context snippets from sampled activation rows.
- ``meta_sae-results`` (:func:`results_task`): tables (``meta_sae``, ``cross_size``) and plots
  (cluster sizes, cross-size cosines, max cosines), plus ``examples.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from saeflow.artifacts import ArtifactRef, artifact_ref, begin, fingerprint, mark_complete, require_complete
from saeflow.device import pick_device
from saeflow.evals.common import SAEInfo, package_modules, read_row_blocks, read_sae_info, sample_store_rows
from saeflow.evals.meta_sae import (
    CONVERGENCE_FIELDS,
    EXAMPLES_TEMPLATE,
    MetaSAEConfig,
    MetaSAEInputError,
    cross_size,
    evaluate_meta_sae,
    example_page,
    examples_json,
    plot_cluster_sizes,
    plot_cross_size,
    plot_max_cosines,
    render_examples_page,
    train_meta_sae,
    unit_rows,
)
from saeflow.models import load_tokenizer
from saeflow.pages import template_version
from saeflow.saes import BaseSAE, load_sae
from saeflow.store import ActivationStore
from saeflow.tables import write_table
from tasks.common import Progress, code_version, publish_markdown, publish_table, stage_logger, stage_task, timed
from tasks.corpus import load_tokens

STAGE = "meta_sae"
SAE_STAGE = "meta_sae-sae"
EXAMPLES_STAGE = "meta_sae-examples"
RESULTS_STAGE = "meta_sae-results"
META_DIR = "meta_sae"  # the trained meta-SAE (SAELens layout) inside the meta_sae artifact
CONVERGENCE_FILE = "convergence.json"  # the training's convergence check and loss trajectory, beside it
PREFIX = "meta_sae_"

#: Config fields the trained meta-SAE and its per-SAE outputs depend on (the others only change the
#: cross-size check, the example page or logging, so changing them does not retrain).
TRAIN_FIELDS = ("seed", "width_ratio", "k", "train_steps", "batch_size", "lr", "dead_feature_window",
                "convergence_tol", "trajectory_points", "eval_batch_size", "decomposition_top", "cosine_rows")
CROSS_FIELDS = ("cross_size_k", "cross_size_threshold")
#: Bumped when the example page's content changes (it is part of the page's fingerprint; 3: rendered
#: from a Jinja2 template, autoescaped).
PAGE_VERSION = 3
EXAMPLE_FIELDS = ("seed", "example_sae", "n_examples", "example_rows", "example_snippets", "snippet_window")
#: Columns of ``cross_size.parquet``.
CROSS_COLUMNS = ["smaller", "larger", "smaller_width", "larger_width", "smaller_fingerprint", "larger_fingerprint",
                 "k", "threshold", "frac_well_explained", "frac_well_explained_1atom", "mean_cos", "median_cos",
                 "mean_cos_1atom"]
#: The code behind this evaluation's results (every module of :mod:`saeflow.evals.meta_sae`, the
#: shared evaluation helpers, this module).
CODE_MODULES = (*package_modules("saeflow.evals.meta_sae"), "saeflow.evals.common", "tasks.meta_sae")


def _code() -> str:
    """This evaluation's code version: a code change gives its stages new fingerprints."""
    return code_version(*CODE_MODULES)


def _subset(cfg: MetaSAEConfig, fields: tuple[str, ...]) -> dict[str, Any]:
    payload = cfg.fingerprint_payload()
    return {f: payload[f] for f in fields}


# ------------------------------------------------------------------------------------ helpers
def sae_info(sae: ArtifactRef) -> SAEInfo:
    """Architecture, width, sparsity, hook and label (``description``) of an SAE artifact (its ``cfg.json``)."""
    return read_sae_info(require_complete(sae))


def group_key(info: SAEInfo) -> tuple:
    """SAEs of one group (same hook, model, width of the activations, architecture and sparsity) are
    checked against each other by the cross-size check."""
    return (info.hook, info.model, info.d_in, info.architecture, info.sparsity)


def _unit_decoder(sae_model: BaseSAE, sae_dir: Path) -> torch.Tensor:
    return unit_rows(sae_model.W_dec.detach(), what=f"decoder of the SAE at {sae_dir}")


# ------------------------------------------------------------------------------ meta_sae (train)
def train_ref(sae: ArtifactRef, cfg: MetaSAEConfig, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, STAGE, fingerprint(STAGE, _subset(cfg, TRAIN_FIELDS), sae, _code()))


@stage_task(train_ref, name="meta-sae-train")
def meta_train_task(out: ArtifactRef, sae: ArtifactRef, cfg: MetaSAEConfig, root: str, device: str = "auto") -> None:
    """Train the meta-SAE of one SAE; its metrics, decomposition, cluster sizes and max cosines."""
    logger = stage_logger()
    dev = pick_device(device)
    sae_dir = require_complete(sae)
    label = sae_info(sae).description
    D = _unit_decoder(load_sae(sae_dir), sae_dir)
    begin(out, cfg, [sae])
    steps = cfg.train_steps
    progress = Progress(f"meta-SAE of {label}", every_s=0.0)

    def on_log(rec: dict) -> None:
        progress.update(rec["step"], steps, f"mse={rec['mse']:.4g} l0={rec['l0']:.3g} frac_dead={rec['frac_dead']:.3g}")

    meta, summary = train_meta_sae(D, cfg, out.dir / META_DIR, dev, on_log=on_log)
    with timed(f"meta-SAE metrics of {label}"):
        metrics, table, sizes, mc = evaluate_meta_sae(meta, D.to(dev), cfg, summary)
    table.to_parquet(out.dir / "decomposition.parquet", index=False)
    np.save(out.dir / "cluster_sizes.npy", sizes)
    np.savez(out.dir / "max_cosines.npz", **{k.replace("->", "_to_"): v for k, v in mc.items()})
    (out.dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (out.dir / CONVERGENCE_FILE).write_text(json.dumps(summary["convergence"], indent=2, sort_keys=True))
    mark_complete(out, sae=label, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    logger.info("meta-SAE of %s: FVE %.4f (threshold %.4f), MSE %.3g, width %d, %.1f s", label, metrics["fve"],
                metrics["fve_threshold"], metrics["mse"], meta.d_sae, metrics["train_time_s"])
    if not metrics["converged"]:
        logger.warning("meta-SAE of %s did not converge: its full-decoder MSE changed by %.3g (relative) over the last "
                       "10%% of its %d steps (%.4g -> %.4g; tolerance %g): raise meta_sae.train_steps", label,
                       metrics["rel_change_last10"], steps, metrics["loss_at_90pct"], metrics["final_loss"],
                       cfg.convergence_tol)


# ------------------------------------------------------------------------- meta_sae-sae (summary)
def summary_ref(sae: ArtifactRef, meta: ArtifactRef, smaller: list[ArtifactRef], cfg: MetaSAEConfig, root: str,
                **_) -> ArtifactRef:
    return artifact_ref(root, SAE_STAGE, fingerprint(SAE_STAGE, _subset(cfg, CROSS_FIELDS), sae, meta, *smaller, _code()))


@stage_task(summary_ref, name="meta-sae-summary")
def meta_sae_summary_task(out: ArtifactRef, sae: ArtifactRef, meta: ArtifactRef, smaller: list[ArtifactRef], cfg: MetaSAEConfig,
                          root: str, device: str = "auto") -> None:
    """Cross-size check against each smaller SAE of the same group; the per-SAE ``summary.json``."""
    dev = pick_device(device)
    info = sae_info(sae)
    metrics = json.loads((require_complete(meta) / "metrics.json").read_text())
    summary: dict[str, float | bool] = {PREFIX + k: float(metrics[k]) for k in (
        "fve", "mse", "width", "mean_latents_per_meta", "l0", "fve_threshold", "frac_meta_unused", "train_time_s",
        "rel_change_last10")}
    summary[PREFIX + "converged"] = bool(metrics["converged"])
    rows, cos_by_pair = [], {}
    if smaller:
        Y = _unit_decoder(load_sae(require_complete(sae)), sae.dir).to(dev)
        for s in smaller:
            s_info = sae_info(s)
            if group_key(s_info) != group_key(info) or s_info.width >= info.width:
                raise MetaSAEInputError(
                    f"cross-size check: {s_info.description} ({s_info.hook}) is not a smaller SAE of the same hook, "
                    f"model, architecture and sparsity as {info.description} ({info.hook})")
            Ds = _unit_decoder(load_sae(require_complete(s)), s.dir).to(dev)
            with timed(f"cross-size {s_info.description} -> {info.description}"):
                cos_k, stats = cross_size(Y, Ds, cfg.cross_size_k, cfg.cross_size_threshold)
            cos_by_pair[s.fingerprint] = cos_k
            rows.append({"smaller": s_info.description, "larger": info.description, "smaller_width": s_info.width,
                         "larger_width": info.width, "smaller_fingerprint": s.fingerprint,
                         "larger_fingerprint": sae.fingerprint, "k": cfg.cross_size_k,
                         "threshold": cfg.cross_size_threshold, **stats})
        nearest = max(rows, key=lambda r: r["smaller_width"])
        summary[PREFIX + "cross_size_fraction"] = nearest["frac_well_explained"]
        summary[PREFIX + "cross_size_fraction_1atom"] = nearest["frac_well_explained_1atom"]
        summary[PREFIX + "cross_size_smaller_width"] = float(nearest["smaller_width"])
    begin(out, cfg, [sae, meta, *smaller])
    pd.DataFrame(rows, columns=CROSS_COLUMNS).to_parquet(out.dir / "cross_size.parquet", index=False)
    np.savez(out.dir / "cross_size_cos.npz", **cos_by_pair)
    (out.dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    mark_complete(out, sae=info.description, **summary)
    stage_logger().info("meta-SAE summary of %s: %s", info.description, {k: round(v, 4) for k, v in summary.items()})


# -------------------------------------------------------------------------- meta_sae-examples
def examples_ref(model: ArtifactRef, corpus: ArtifactRef, acts: ArtifactRef, sae: ArtifactRef, meta: ArtifactRef,
                 cfg: MetaSAEConfig, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, EXAMPLES_STAGE,
                        fingerprint(EXAMPLES_STAGE, {"page": PAGE_VERSION, **_subset(cfg, EXAMPLE_FIELDS)}, model, corpus,
                                    acts, sae, meta, _code(), template_version(EXAMPLES_TEMPLATE)))


@stage_task(examples_ref, name="meta-sae-examples")
def examples_task(out: ArtifactRef, model: ArtifactRef, corpus: ArtifactRef, acts: ArtifactRef, sae: ArtifactRef, meta: ArtifactRef,
                  cfg: MetaSAEConfig, root: str, device: str = "auto") -> None:
    """``examples.md``: a few latents, their meta-latents, each shown by top-activating snippets."""
    dev = pick_device(device)
    info = sae_info(sae)
    store = ActivationStore.open(require_complete(acts))
    if store.d_model != info.d_in or (info.hook and store.attrs.get("hook") and info.hook != store.attrs["hook"]):
        raise MetaSAEInputError(f"example page: {info.description} reads {info.hook} (width {info.d_in}) but the "
                                f"activations are {store.attrs.get('hook')} (width {store.d_model})")
    tokens = load_tokens(corpus)
    tok = load_tokenizer(require_complete(model))
    base = load_sae(require_complete(sae), device=dev).eval()
    meta_sae = load_sae(require_complete(meta) / META_DIR, device=dev).eval()
    dec = pd.read_parquet(meta.dir / "decomposition.parquet")
    sizes = np.load(meta.dir / "cluster_sizes.npy")
    metrics = json.loads((meta.dir / "metrics.json").read_text())
    x, row_meta = read_row_blocks(store, sample_store_rows(store.n_rows, cfg.example_rows, cfg.seed))
    page = example_page(base, meta_sae, torch.from_numpy(x).to(dev), row_meta, tokens, tok.decode, dec, sizes,
                        metrics, cfg, info.description)
    text = render_examples_page(page)
    begin(out, cfg, [model, corpus, acts, sae, meta])
    (out.dir / "examples.md").write_text(text)
    (out.dir / "examples.json").write_text(json.dumps(examples_json(page), indent=2))
    mark_complete(out, sae=info.description, latents=[ex.latent for ex in page.examples], rows=page.rows)
    publish_markdown("meta-sae-examples", text[:50_000], f"Meta-SAE example decompositions of {info.description}")


# ------------------------------------------------------------------------------ meta_sae-results
def results_ref(saes: list[ArtifactRef], trains: list[ArtifactRef], per_sae: list[ArtifactRef],
                examples: ArtifactRef | None, cfg: MetaSAEConfig, show: int, root: str, **_) -> ArtifactRef:
    ups = [*saes, *trains, *per_sae] + ([examples] if examples is not None else [])
    return artifact_ref(root, RESULTS_STAGE, fingerprint(RESULTS_STAGE, {"show": show, **_subset(cfg, CROSS_FIELDS)}, *ups, _code()))


def _plots(out_dir: Path, infos: list[SAEInfo], trains: list[ArtifactRef], per_sae: list[ArtifactRef],
           show: int, threshold: float) -> list[Path]:
    """The plots, from the stages' saved arrays."""
    paths = [plot_cluster_sizes([(info.description, np.load(tr.dir / "cluster_sizes.npy"))
                                 for info, tr in zip(infos, trains)], out_dir / "cluster_sizes.png")]
    pairs = []
    for info, ps in zip(infos, per_sae):
        z = np.load(ps.dir / "cross_size_cos.npz")
        df = pd.read_parquet(ps.dir / "cross_size.parquet")
        for _, r in df.iterrows():
            pairs.append((f"{r['smaller_width']}→{info.description}", z[r["smaller_fingerprint"]]))
    if pairs:
        paths.append(plot_cross_size(pairs, threshold, out_dir / "cross_size_cosines.png"))
    paths.append(plot_max_cosines(np.load(trains[show].dir / "max_cosines.npz"), infos[show].description,
                                  out_dir / "max_cosines.png"))
    return paths


@stage_task(results_ref, name="meta-sae-results")
def results_task(out: ArtifactRef, saes: list[ArtifactRef], trains: list[ArtifactRef], per_sae: list[ArtifactRef],
                 examples: ArtifactRef | None, cfg: MetaSAEConfig, show: int, root: str) -> None:
    """Tables ``meta_sae`` / ``cross_size``, the plots and ``examples.md``, in one folder."""
    infos = [sae_info(s) for s in saes]
    rows = []
    for s, info, tr, ps in zip(saes, infos, trains, per_sae):
        m = json.loads((require_complete(tr) / "metrics.json").read_text())
        summ = json.loads((require_complete(ps) / "summary.json").read_text())
        rows.append({"sae": info.description, "sae_fingerprint": s.fingerprint, "architecture": info.architecture,
                     "width": info.width, "meta_width": m["width"],
                     **{k: m[k] for k in ("fve", "mse", "l0", "fve_threshold", "mean_latents_per_meta",
                                          "max_latents_per_meta", "frac_meta_unused", "mean_recon_cos",
                                          "mean_max_cos_base_to_base", "mean_max_cos_base_to_meta", "train_time_s",
                                          *CONVERGENCE_FIELDS)},
                     "cross_size_fraction": summ.get(PREFIX + "cross_size_fraction")})
    table = pd.DataFrame(rows)
    frames = [f for f in (pd.read_parquet(ps.dir / "cross_size.parquet") for ps in per_sae) if len(f)]
    cross = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    begin(out, cfg, [*saes, *trains, *per_sae] + ([examples] if examples is not None else []))
    paths = write_table(table, out.dir, "meta_sae")
    if len(cross):
        paths += write_table(cross, out.dir, "cross_size")
    paths += _plots(out.dir, infos, trains, per_sae, show, cfg.cross_size_threshold)
    if examples is not None:
        (out.dir / "examples.md").write_text((require_complete(examples) / "examples.md").read_text())
        paths.append(out.dir / "examples.md")
    mark_complete(out, files=[str(p) for p in paths])
    publish_table("meta-sae", json.loads(table.to_json(orient="records")), "Meta-SAE per SAE")
