"""Stages of the stitching evaluation (SPEC 2.3; the maths is in :mod:`saeflow.evals.stitching`, the
stage graph in :mod:`flows.evals.stitching`). Stages (all cached artifacts):

- ``stitching-form`` (one per SAE that is in a pair): the SAE's JumpReLU inference form, saved as
  an SAE folder, with ``form.json`` comparing it with the original on the held-out rows.
- ``stitching-pair`` (one per pair): decoder cosines, batched single-insertion ΔMSE, classes,
  proxy AUC, τ sweep, the exact per-event MSE curve and the fully evaluated curve points
  (core reconstruction metrics + CE loss with the stitched SAE spliced in).
- ``stitching-summary`` (one per SAE in a pair): ``summary.json`` columns for the results table.
- ``stitching-results``: the tables and plots copied to ``results/<profile>/stitching/``.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import torch

from saeflow.artifacts import ArtifactRef, artifact_ref, begin, completion_meta, fingerprint, mark_complete, require_complete
from saeflow.config import ModelConfig
from saeflow.corpus import special_token_ids
from saeflow.device import pick_device
from saeflow.evals.common import SAEInfo, heldout_rows, package_modules, read_sae_info
from saeflow.evals.stitching import (
    CESetup,
    StitchingConfig,
    check_pair,
    form_table_row,
    jumprelu_form,
    pairs_table,
    plot_interpolation,
    plot_max_cos_histograms,
    stitch_pair,
)
from saeflow.models import load_model
from saeflow.saes import BaseSAE, load_sae, save_sae
from saeflow.store import ActivationStore
from saeflow.tables import write_table
from tasks.common import Progress, code_version, publish_markdown, stage_logger, stage_task, timed
from tasks.corpus import load_tokens
from tasks.metrics import sae_on_store, shared_ce_reference

#: Bumped when the pair computation changes (2: curve points spaced over the events that change the MSE).
PAIR_VERSION = 2
FORM_STAGE, PAIR_STAGE, SUMMARY_STAGE, RESULTS_STAGE = ("stitching-form", "stitching-pair", "stitching-summary",
                                                        "stitching-results")
#: The code behind this evaluation's results (every module of :mod:`saeflow.evals.stitching`, the
#: shared evaluation helpers, this module).
CODE_MODULES = (*package_modules("saeflow.evals.stitching"), "saeflow.evals.common", "tasks.stitching")


def _code() -> str:
    """This evaluation's code version: a code change gives its stages new fingerprints."""
    return code_version(*CODE_MODULES)


#: Bumped when the form computation changes (2: dead TopK latents stay dead in the JumpReLU form).
FORM_VERSION = 2


def _form_cfg(cfg: StitchingConfig) -> dict:
    return {"topk_threshold": cfg.topk_threshold, "calibration_tokens": cfg.calibration_tokens, "n_tokens": cfg.n_tokens,
            "version": FORM_VERSION}


def _pair_cfg(cfg: StitchingConfig) -> dict:
    skip = {"pairs", "adjacent_only", "pair_across_sparsity", "hist_bins"}
    return {**{k: v for k, v in cfg.fingerprint_payload().items() if k not in skip}, "version": PAIR_VERSION}


def _info_json(info: SAEInfo) -> dict:
    return {"index": info.index, "architecture": info.architecture, "width": info.width, "d_in": info.d_in,
            "sparsity": info.sparsity, "hook": info.hook, "model": info.model, "path": info.path, "label": info.label}


def _info_from_json(d: dict) -> SAEInfo:
    return SAEInfo(**{k: d[k] for k in ("index", "architecture", "width", "d_in", "sparsity", "hook", "model", "path")})


def read_infos(saes: list[ArtifactRef]) -> list[SAEInfo]:
    """The :class:`SAEInfo` of each SAE artifact (``index`` = its position in ``saes``)."""
    return [read_sae_info(require_complete(s), i) for i, s in enumerate(saes)]


# ------------------------------------------------------------------------------------ form
def form_ref(sae: ArtifactRef, index: int, acts: ArtifactRef, cfg: StitchingConfig, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, FORM_STAGE, fingerprint(FORM_STAGE, {**_form_cfg(cfg), "index": index}, sae, acts, _code()))


@stage_task(form_ref, name="stitching-form")
def form_task(out: ArtifactRef, sae: ArtifactRef, index: int, acts: ArtifactRef, cfg: StitchingConfig, root: str,
              device: str = "auto") -> None:
    """The JumpReLU inference form of one SAE (TopK thresholds fitted on training rows)."""
    logger = stage_logger()
    dev, store, sae_dir, model = sae_on_store(acts, sae, device)
    info = read_sae_info(sae_dir, index)
    with timed(f"JumpReLU form of {info.label}"):
        form, fidelity = jumprelu_form(model, store, cfg, dev)
    result = {"sae": _info_json(info), **fidelity}
    begin(out, {**_form_cfg(cfg), "index": index}, [sae, acts])
    save_sae(form, out.dir, cfg_extra={"hook_name": info.hook, "model_name": info.model,
                                       "stitching_source_fingerprint": sae.fingerprint,
                                       "stitching_source_architecture": info.architecture})
    (out.dir / "form.json").write_text(json.dumps(result, indent=2))
    mark_complete(out, label=info.label)
    new, orig = fidelity["jumprelu"], fidelity["original"]
    logger.info("stitching form %s: EV %.4f (original %.4f), L0 %.2f (original %.2f)", info.label,
                new["explained_variance"], orig["explained_variance"], new["l0"], orig["l0"])


def _form_info(form: ArtifactRef) -> SAEInfo:
    return _info_from_json(json.loads((require_complete(form) / "form.json").read_text())["sae"])


# ------------------------------------------------------------------------------------ pair
def pair_ref(small: ArtifactRef, large: ArtifactRef, small_form: ArtifactRef, large_form: ArtifactRef,
             model: ArtifactRef, model_cfg: ModelConfig, corpus: ArtifactRef, acts: ArtifactRef, cfg: StitchingConfig,
             root: str, **_) -> ArtifactRef:
    return artifact_ref(root, PAIR_STAGE, fingerprint(PAIR_STAGE, _pair_cfg(cfg), small, large, small_form, large_form,
                                                      model, corpus, acts, f"dtype={model_cfg.resolved_dtype()}", _code()))


def pair_inputs(small: ArtifactRef, large: ArtifactRef, acts: ArtifactRef, cfg: StitchingConfig,
                dev: torch.device) -> tuple[BaseSAE, BaseSAE, torch.Tensor, ActivationStore]:
    """``(S, L, x, store)`` of a pair: the two SAEs (as stored: pass the forms for ``form: jumprelu``)
    on ``dev`` and the held-out rows ``x`` of the activation store (``cfg.n_tokens``)."""
    S, L = (load_sae(require_complete(r), device=dev) for r in (small, large))
    store = ActivationStore.open(require_complete(acts))
    start, end = heldout_rows(store, cfg.n_tokens)
    return S, L, torch.from_numpy(store.read(start, end)).to(dev), store


@stage_task(pair_ref, name="stitching-pair")
def pair_task(out: ArtifactRef, small: ArtifactRef, large: ArtifactRef, small_form: ArtifactRef, large_form: ArtifactRef,
              model: ArtifactRef, model_cfg: ModelConfig, corpus: ArtifactRef, acts: ArtifactRef, cfg: StitchingConfig,
              root: str, device: str = "auto") -> None:
    """Classification, proxy and interpolation curve of one (smaller, larger) pair: the SAEs
    themselves (``form: native``) or their JumpReLU forms (``form: jumprelu``)."""
    logger = stage_logger()
    t_start = time.perf_counter()
    dev = pick_device(device)
    s_info, l_info = _form_info(small_form), _form_info(large_form)
    check_pair(s_info, l_info)
    title = f"{s_info.label} -> {l_info.label}"
    use = (small, large) if cfg.form == "native" else (small_form, large_form)
    S, L, x, store = pair_inputs(*use, acts, cfg, dev)

    ce = None
    if cfg.ce_batches > 0:
        hook = s_info.hook or store.attrs.get("hook")
        tokens = load_tokens(corpus)
        train_contexts = int(completion_meta(corpus.dir)["train_contexts"])
        eval_tokens = torch.from_numpy(
            tokens[train_contexts:train_contexts + cfg.ce_batches * cfg.ce_batch_size].astype(np.int64))
        lm = load_model(model_cfg, require_complete(model), dev)
        ignore = special_token_ids(lm.tokenizer)
        key = (model.fingerprint, model_cfg.resolved_dtype(), corpus.fingerprint, hook, cfg.ce_batches, cfg.ce_batch_size, str(dev))
        ce = CESetup(lm, hook, eval_tokens, cfg.ce_batch_size, ignore,
                     shared_ce_reference(lm, key, hook, eval_tokens, cfg.ce_batch_size, ignore))
    progress = Progress(f"stitching {title}", every_s=10.0)
    res = stitch_pair(S, L, x, cfg, s_info, l_info, dev, ce,
                      on_point=lambda done, total: progress.update(done, total, f"{done}/{total} curve points"))
    summary = {**res.summary, "seconds_total": time.perf_counter() - t_start}
    gap = summary["max_relative_gap_event_vs_metrics"]
    if gap > 1e-3:
        logger.warning("stitching %s: exact per-event MSE and the metrics code differ by %.2e (relative)", title, gap)

    begin(out, _pair_cfg(cfg), [small, large, small_form, large_form, model, corpus, acts])
    res.latents.to_parquet(out.dir / "latents.parquet", index=False)
    res.taus.to_parquet(out.dir / "tau_sweep.parquet", index=False)
    res.curve.to_parquet(out.dir / "curve.parquet", index=False)
    np.save(out.dir / "event_mse.npy", res.event_mse)
    (out.dir / "events.json").write_text(json.dumps([{"kind": e.kind, "add": e.add, "remove": e.remove}
                                                     for e in res.events]))
    (out.dir / "summary.json").write_text(json.dumps(summary, indent=2))
    mark_complete(out, title=title)
    logger.info("stitching %s: novel %.3f (%d/%d active, %d inactive), AUC %.3f, violations %d of %d events, "
                "ΔMSE for %d latents in %.2f s", title, summary["novel_fraction"], summary["n_novel"],
                summary["n_novel"] + summary["n_reconstruction"], summary["n_inactive"], summary["proxy_auc"],
                summary["violations"], summary["n_events"], L.d_sae, summary["seconds_delta_mse"])


def _pair_summary(p: ArtifactRef) -> dict:
    return json.loads((require_complete(p) / "summary.json").read_text())


# ------------------------------------------------------------------------------------ per-SAE summary
def summary_ref(form: ArtifactRef, pair: ArtifactRef | None, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, SUMMARY_STAGE, fingerprint(SUMMARY_STAGE, None, form, *([pair] if pair else []), _code()))


@stage_task(summary_ref, name="stitching-summary")
def summary_task(out: ArtifactRef, form: ArtifactRef, pair: ArtifactRef | None, root: str) -> None:
    """``summary.json``: the JumpReLU form's fidelity and, when this SAE is the larger one of a pair,
    that (adjacent) pair's novel fraction, proxy AUC and monotonicity violations."""
    f = json.loads((require_complete(form) / "form.json").read_text())
    s: dict[str, float | int] = {
        "stitching_jumprelu_explained_variance": f["jumprelu"]["explained_variance"],
        "stitching_jumprelu_l0": f["jumprelu"]["l0"],
        "stitching_jumprelu_ev_change": f["jumprelu"]["explained_variance"] - f["original"]["explained_variance"],
    }
    if pair is not None:
        p = _pair_summary(pair)
        s.update(stitching_smaller_width=p["small_width"], stitching_novel_fraction=p["novel_fraction"],
                 stitching_proxy_auc=p["proxy_auc"], stitching_violations=p["violations"],
                 stitching_n_events=p["n_events"])
    begin(out, None, [form] + ([pair] if pair else []))
    (out.dir / "summary.json").write_text(json.dumps(s, indent=2))
    mark_complete(out)


# ------------------------------------------------------------------------------------ results
def results_ref(pairs: list[ArtifactRef], forms: list[ArtifactRef], hist_bins: int, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, RESULTS_STAGE, fingerprint(RESULTS_STAGE, {"hist_bins": hist_bins}, *pairs, *forms, _code()))


@stage_task(results_ref, name="stitching-results")
def results_task(out: ArtifactRef, pairs: list[ArtifactRef], forms: list[ArtifactRef], hist_bins: int, root: str) -> None:
    """Tables (pairs, τ sweep, curves, per-latent classes, JumpReLU forms) and plots."""
    begin(out, {"hist_bins": hist_bins}, [*pairs, *forms])
    summaries, taus, curves, latents, hist, plots = [], [], [], [], [], []
    for p in pairs:
        d = require_complete(p)
        s = _pair_summary(p)
        title = f"{s['small']} -> {s['large']}"
        summaries.append({"pair": title, **s})
        t = pd.read_parquet(d / "tau_sweep.parquet")
        t.insert(0, "pair", title)
        taus.append(t)
        c = pd.read_parquet(d / "curve.parquet")
        c.insert(0, "pair", title)
        curves.append(c)
        lat = pd.read_parquet(d / "latents.parquet")
        lat.insert(0, "pair", title)
        latents.append(lat)
        hist.append({"title": title, "max_cos": lat["max_cos"].to_numpy(), "classes": lat["class"].to_numpy()})
        plots.append({"title": title, "fine_mse": np.load(d / "event_mse.npy"), "points": c["events_done"].to_numpy(),
                      "mse": c["mse"].to_numpy(), "ce": c["ce_with_sae"].to_numpy() if "ce_with_sae" in c else None})
    table = pairs_table(summaries)
    files = write_table(table, out.dir, "stitching_pairs")
    files += write_table(pd.concat(taus, ignore_index=True), out.dir, "stitching_tau_sweep")
    files += write_table(pd.concat(curves, ignore_index=True), out.dir, "stitching_curves")
    lat_path = out.dir / "stitching_latents.parquet"
    pd.concat(latents, ignore_index=True).to_parquet(lat_path, index=False)
    form_rows = [form_table_row(json.loads((require_complete(f) / "form.json").read_text())) for f in forms]
    files += write_table(pd.DataFrame(form_rows), out.dir, "stitching_jumprelu_form")
    files.append(plot_max_cos_histograms(hist, out.dir / "max_cos_hist.png", hist_bins))
    files.append(plot_interpolation(plots, out.dir / "interpolation.png"))
    mark_complete(out, pairs=len(pairs), files=[str(x) for x in [*files, lat_path]])
    publish_markdown("stitching-pairs", table.to_markdown(index=False, floatfmt=".4g"), "Stitching, one row per pair")
