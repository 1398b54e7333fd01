"""Stages of the stitching evaluation (SPEC 2.3; the maths is in :mod:`saeflow.stitching`).

Entry point for the flow: :func:`run`. Stages (all cached artifacts):

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
from prefect import task

from saeflow.artifacts import ArtifactRef, artifact_ref, begin, completion_meta, fingerprint, mark_complete, require_complete
from saeflow.config import ModelConfig, StitchingConfig
from saeflow.corpus import special_token_ids
from saeflow.device import pick_device
from saeflow.metrics import ce_metrics, reconstruction_metrics
from saeflow.models import load_model
from saeflow.saes import SAE_CFG_FILENAME, TopKSAE, load_sae, save_sae
from saeflow.stitching import (
    INACTIVE,
    NOVEL,
    RECONSTRUCTION,
    SAEInfo,
    StitchingError,
    adjacent_pair_for,
    check_pair,
    changing_events,
    classify,
    count_violations,
    curve_points,
    decoder_cosines,
    evaluate_curve,
    event_mse_curve,
    find_pairs,
    insertion_delta_mse,
    interpolation_events,
    plot_interpolation,
    plot_max_cos_histograms,
    proxy_auc,
    sae_info,
    tau_sweep,
    to_jumprelu,
)
from saeflow.store import ActivationStore
from saeflow.tables import write_table
from tasks.common import EvalContext, EvalOutput, Progress, code_version, publish_markdown, stage_logger, timed
from tasks.corpus import load_tokens
from tasks.metrics import check_sae_fits, shared_ce_reference

#: Bumped when the pair computation changes (2: curve points spaced over the events that change the MSE).
PAIR_VERSION = 2
FORM_STAGE, PAIR_STAGE, SUMMARY_STAGE, RESULTS_STAGE = ("stitching-form", "stitching-pair", "stitching-summary",
                                                        "stitching-results")
ROW_BATCH = 4096


def _code() -> str:
    """This evaluation's code version (its two modules): a code change gives its stages new fingerprints."""
    return code_version("saeflow.stitching", "tasks.stitching")


#: Bumped when the form computation changes (2: dead TopK latents stay dead in the JumpReLU form).
FORM_VERSION = 2


def _form_cfg(cfg: StitchingConfig) -> dict:
    return {"topk_threshold": cfg.topk_threshold, "calibration_tokens": cfg.calibration_tokens, "n_tokens": cfg.n_tokens,
            "version": FORM_VERSION}


def _pair_cfg(cfg: StitchingConfig) -> dict:
    skip = {"pairs", "adjacent_only", "pair_across_sparsity", "hist_bins"}
    return {**{k: v for k, v in cfg.fingerprint_payload().items() if k not in skip}, "version": PAIR_VERSION}


def heldout_rows(store: ActivationStore, n_tokens: int) -> tuple[int, int]:
    start, end = store.train_rows, min(store.n_rows, store.train_rows + n_tokens)
    if end <= start:
        raise StitchingError(f"activation store at {store.root} has no held-out rows; raise corpus.eval_contexts")
    return start, end


def _info_json(info: SAEInfo) -> dict:
    return {"index": info.index, "architecture": info.architecture, "width": info.width, "d_in": info.d_in,
            "sparsity": info.sparsity, "hook": info.hook, "model": info.model, "path": info.path, "label": info.label}


def _info_from_json(d: dict) -> SAEInfo:
    return SAEInfo(**{k: d[k] for k in ("index", "architecture", "width", "d_in", "sparsity", "hook", "model", "path")})


def read_infos(saes: list[ArtifactRef]) -> list[SAEInfo]:
    return [sae_info(i, json.loads((require_complete(s) / SAE_CFG_FILENAME).read_text()), str(s.dir))
            for i, s in enumerate(saes)]


# ------------------------------------------------------------------------------------ form
def form_ref(sae: ArtifactRef, index: int, acts: ArtifactRef, cfg: StitchingConfig, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, FORM_STAGE, fingerprint(FORM_STAGE, {**_form_cfg(cfg), "index": index}, sae, acts, _code()))


@task(name="stitching-form")
def form_task(sae: ArtifactRef, index: int, acts: ArtifactRef, cfg: StitchingConfig, root: str,
              device: str = "auto") -> ArtifactRef:
    """The JumpReLU inference form of one SAE (TopK thresholds fitted on training rows)."""
    out = form_ref(sae, index, acts, cfg, root)
    if out.is_complete():
        return out
    logger = stage_logger()
    dev = pick_device(device)
    store = ActivationStore.open(require_complete(acts))
    sae_dir = require_complete(sae)
    info = sae_info(index, json.loads((sae_dir / SAE_CFG_FILENAME).read_text()), str(sae_dir))
    model = load_sae(sae_dir, device=dev)
    check_sae_fits(model, sae_dir, store)
    start, end = heldout_rows(store, cfg.n_tokens)
    calib, c0 = None, store.train_rows
    if type(model) is TopKSAE:
        c0 = max(0, store.train_rows - cfg.calibration_tokens)
        if c0 >= store.train_rows:
            raise StitchingError(f"activation store at {store.root} has no training rows to fit TopK thresholds on")
        calib = torch.from_numpy(store.read(c0, store.train_rows))
    with timed(f"JumpReLU form of {info.label}"):
        form = to_jumprelu(model, calib, cfg.topk_threshold)
    orig = reconstruction_metrics(model, store.iter_rows(start, end, ROW_BATCH), dev)
    new = reconstruction_metrics(form, store.iter_rows(start, end, ROW_BATCH), dev)
    keys = ("l0", "mse", "explained_variance", "frac_dead")
    result = {"sae": _info_json(info), "threshold_mode": cfg.topk_threshold if calib is not None else "native",
              "calibration_rows": int(store.train_rows - c0), "heldout_rows": int(end - start),
              "original": {k: float(orig[k]) for k in keys}, "jumprelu": {k: float(new[k]) for k in keys}}
    begin(out, {**_form_cfg(cfg), "index": index}, [sae, acts])
    save_sae(form, out.dir, cfg_extra={"hook_name": info.hook, "model_name": info.model,
                                       "stitching_source_fingerprint": sae.fingerprint,
                                       "stitching_source_architecture": info.architecture})
    (out.dir / "form.json").write_text(json.dumps(result, indent=2))
    mark_complete(out, label=info.label)
    logger.info("stitching form %s: EV %.4f (original %.4f), L0 %.2f (original %.2f)", info.label,
                new["explained_variance"], orig["explained_variance"], new["l0"], orig["l0"])
    return out


def _form_info(form: ArtifactRef) -> SAEInfo:
    return _info_from_json(json.loads((require_complete(form) / "form.json").read_text())["sae"])


# ------------------------------------------------------------------------------------ pair
def pair_ref(small: ArtifactRef, large: ArtifactRef, small_form: ArtifactRef, large_form: ArtifactRef,
             model: ArtifactRef, model_cfg: ModelConfig, corpus: ArtifactRef, acts: ArtifactRef, cfg: StitchingConfig,
             root: str, **_) -> ArtifactRef:
    return artifact_ref(root, PAIR_STAGE, fingerprint(PAIR_STAGE, _pair_cfg(cfg), small, large, small_form, large_form,
                                                      model, corpus, acts, f"dtype={model_cfg.dtype}", _code()))


@task(name="stitching-pair")
def pair_task(small: ArtifactRef, large: ArtifactRef, small_form: ArtifactRef, large_form: ArtifactRef,
              model: ArtifactRef, model_cfg: ModelConfig, corpus: ArtifactRef, acts: ArtifactRef, cfg: StitchingConfig,
              root: str, device: str = "auto") -> ArtifactRef:
    """Classification, proxy and interpolation curve of one (smaller, larger) pair: the SAEs
    themselves (``form: native``) or their JumpReLU forms (``form: jumprelu``)."""
    out = pair_ref(small, large, small_form, large_form, model, model_cfg, corpus, acts, cfg, root)
    if out.is_complete():
        return out
    logger = stage_logger()
    t_start = time.perf_counter()
    dev = pick_device(device)
    s_info, l_info = _form_info(small_form), _form_info(large_form)
    check_pair(s_info, l_info)
    title = f"{s_info.label} -> {l_info.label}"
    use = (small, large) if cfg.form == "native" else (small_form, large_form)
    S, L = (load_sae(require_complete(r), device=dev) for r in use)
    store = ActivationStore.open(require_complete(acts))
    start, end = heldout_rows(store, cfg.n_tokens)
    x = torch.from_numpy(store.read(start, end)).to(dev)
    chunks = lambda: (x[i:i + ROW_BATCH] for i in range(0, x.shape[0], ROW_BATCH))  # noqa: E731

    max_cos, match = decoder_cosines(S, L)
    t0 = time.perf_counter()
    ins = insertion_delta_mse(S, L, chunks(), cfg.adjust_encoder_bias)
    t_delta = time.perf_counter() - t0
    max_cos, match = max_cos.cpu().numpy(), match.cpu().numpy()
    classes = classify(ins["delta_mse"], ins["fires"])
    auc = proxy_auc(max_cos, classes)
    taus = tau_sweep(max_cos, classes, cfg.taus)
    events = interpolation_events(classes, ins["delta_mse"], max_cos, match, S.d_sae, cfg.novel_order, cfg.swap_order)
    t0 = time.perf_counter()
    fine = event_mse_curve(S, L, x, events, cfg.adjust_encoder_bias)
    t_fine = time.perf_counter() - t0
    changes = changing_events(fine)
    points = curve_points(len(events), cfg.n_steps, changes)

    lm = reference = eval_tokens = ignore = None
    hook = s_info.hook or store.attrs.get("hook")
    if cfg.ce_batches > 0:
        tokens = load_tokens(corpus)
        train_contexts = int(completion_meta(corpus.dir)["train_contexts"])
        eval_tokens = torch.from_numpy(
            tokens[train_contexts:train_contexts + cfg.ce_batches * cfg.ce_batch_size].astype(np.int64))
        lm = load_model(model_cfg, require_complete(model), dev)
        ignore = special_token_ids(lm.tokenizer)
        key = (model.fingerprint, model_cfg.dtype, corpus.fingerprint, hook, cfg.ce_batches, cfg.ce_batch_size, str(dev))
        reference = shared_ce_reference(lm, key, hook, eval_tokens, cfg.ce_batch_size, ignore)
    progress = Progress(f"stitching {title}", every_s=10.0)
    done = [0]

    def evaluate(sae) -> dict:
        rec = reconstruction_metrics(sae, chunks(), dev)
        res = {k: rec[k] for k in ("mse", "explained_variance", "l0", "cossim", "frac_dead")}
        res["fvu"] = 1.0 - rec["explained_variance"]
        if lm is not None:
            ce = ce_metrics(lm, sae, hook, eval_tokens, cfg.ce_batch_size, ignore, reference=reference)
            res.update({k: ce[k] for k in ("ce_with_sae", "ce_loss_score", "ce_delta", "kl_with_sae")})
        done[0] += 1
        progress.update(done[0], len(points), f"{done[0]}/{len(points)} curve points")
        return res

    t0 = time.perf_counter()
    curve = evaluate_curve(S, L, events, points, evaluate, cfg.adjust_encoder_bias)
    t_curve = time.perf_counter() - t0
    curve.insert(1, "fraction_of_path", curve["events_done"] / len(events))
    curve["event_mse"] = fine[curve["events_done"].to_numpy()]
    gap = float(np.max(np.abs(curve["mse"] - curve["event_mse"]) / np.maximum(curve["mse"].abs(), 1e-30)))
    if gap > 1e-3:
        logger.warning("stitching %s: exact per-event MSE and the metrics code differ by %.2e (relative)", title, gap)

    n_novel, n_rec, n_inact = (int(np.sum(classes == c)) for c in (NOVEL, RECONSTRUCTION, INACTIVE))
    active = n_novel + n_rec
    first_swap = next((i for i, e in enumerate(events) if e.kind != "insert"), len(events))
    summary = {
        "form": cfg.form, "small": s_info.label, "large": l_info.label, "small_index": s_info.index, "large_index": l_info.index,
        "small_width": s_info.width, "large_width": l_info.width, "n_tokens": int(ins["n_tokens"]),
        "n_novel": n_novel, "n_reconstruction": n_rec, "n_inactive": n_inact,
        "novel_fraction": n_novel / active if active else float("nan"),
        "proxy_auc": auc, "mean_max_cos_novel": float(max_cos[classes == NOVEL].mean()) if n_novel else float("nan"),
        "mean_max_cos_reconstruction": float(max_cos[classes == RECONSTRUCTION].mean()) if n_rec else float("nan"),
        "n_events": len(events), "n_events_changing": int(changes.sum()),
        "n_swaps": sum(e.kind == "swap" for e in events),
        "violations": count_violations(fine), "violations_at_points": count_violations(curve["mse"].to_numpy()),
        "mse_small": float(fine[0]), "mse_after_novel": float(fine[first_swap]), "mse_large": float(fine[-1]),
        "ev_small": float(curve["explained_variance"].iloc[0]), "ev_large": float(curve["explained_variance"].iloc[-1]),
        "max_relative_gap_event_vs_metrics": gap,
        "seconds_delta_mse": t_delta, "seconds_event_curve": t_fine, "seconds_curve_points": t_curve,
    }
    if "ce_with_sae" in curve:
        summary.update(ce_small=float(curve["ce_with_sae"].iloc[0]), ce_large=float(curve["ce_with_sae"].iloc[-1]),
                       ce_violations_at_points=count_violations(curve["ce_with_sae"].to_numpy()))
    for _, r in taus.iterrows():
        summary[f"proxy_novel_fraction_tau{r['tau']:g}"] = float(r["proxy_novel_fraction"])
    summary["seconds_total"] = time.perf_counter() - t_start

    begin(out, _pair_cfg(cfg), [small, large, small_form, large_form, model, corpus, acts])
    latents = pd.DataFrame({"latent": np.arange(L.d_sae), "max_cos": max_cos, "match": match,
                            "delta_mse": ins["delta_mse"], "fires": ins["fires"], "class": classes.astype(str)})
    latents.to_parquet(out.dir / "latents.parquet", index=False)
    taus.to_parquet(out.dir / "tau_sweep.parquet", index=False)
    curve.to_parquet(out.dir / "curve.parquet", index=False)
    np.save(out.dir / "event_mse.npy", fine)
    (out.dir / "events.json").write_text(json.dumps([{"kind": e.kind, "add": e.add, "remove": e.remove} for e in events]))
    (out.dir / "summary.json").write_text(json.dumps(summary, indent=2))
    mark_complete(out, title=title)
    logger.info("stitching %s: novel %.3f (%d/%d active, %d inactive), AUC %.3f, violations %d of %d events, "
                "ΔMSE for %d latents in %.2f s", title, summary["novel_fraction"], n_novel, active, n_inact, auc,
                summary["violations"], len(events), L.d_sae, t_delta)
    return out


def _pair_summary(p: ArtifactRef) -> dict:
    return json.loads((require_complete(p) / "summary.json").read_text())


# ------------------------------------------------------------------------------------ per-SAE summary
def summary_ref(form: ArtifactRef, pair: ArtifactRef | None, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, SUMMARY_STAGE, fingerprint(SUMMARY_STAGE, None, form, *([pair] if pair else []), _code()))


@task(name="stitching-summary")
def summary_task(form: ArtifactRef, pair: ArtifactRef | None, root: str) -> ArtifactRef:
    """``summary.json``: the JumpReLU form's fidelity and, when this SAE is the larger one of a pair,
    that (adjacent) pair's novel fraction, proxy AUC and monotonicity violations."""
    out = summary_ref(form, pair, root)
    if out.is_complete():
        return out
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
    return out


# ------------------------------------------------------------------------------------ results
def results_ref(pairs: list[ArtifactRef], forms: list[ArtifactRef], hist_bins: int, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, RESULTS_STAGE, fingerprint(RESULTS_STAGE, {"hist_bins": hist_bins}, *pairs, *forms, _code()))


@task(name="stitching-results")
def results_task(pairs: list[ArtifactRef], forms: list[ArtifactRef], hist_bins: int, root: str) -> ArtifactRef:
    """Tables (pairs, τ sweep, curves, per-latent classes, JumpReLU forms) and plots."""
    out = results_ref(pairs, forms, hist_bins, root)
    if out.is_complete():
        return out
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
    cols = ["pair", "small_width", "large_width", "n_novel", "n_reconstruction", "n_inactive", "novel_fraction",
            "proxy_auc", "mean_max_cos_novel", "mean_max_cos_reconstruction", "n_events", "n_events_changing",
            "violations",
            "violations_at_points", "mse_small", "mse_after_novel", "mse_large", "ev_small", "ev_large", "ce_small",
            "ce_large", "seconds_delta_mse", "seconds_event_curve", "seconds_curve_points"]
    table = pd.DataFrame(summaries)
    table = table[[c for c in cols if c in table] + [c for c in table if c not in cols]]
    files = write_table(table, out.dir, "stitching_pairs")
    files += write_table(pd.concat(taus, ignore_index=True), out.dir, "stitching_tau_sweep")
    files += write_table(pd.concat(curves, ignore_index=True), out.dir, "stitching_curves")
    lat_path = out.dir / "stitching_latents.parquet"
    pd.concat(latents, ignore_index=True).to_parquet(lat_path, index=False)
    form_rows = []
    for f in forms:
        j = json.loads((require_complete(f) / "form.json").read_text())
        form_rows.append({"sae": j["sae"]["label"], "threshold_mode": j["threshold_mode"],
                          "calibration_rows": j["calibration_rows"],
                          **{f"original_{k}": v for k, v in j["original"].items()},
                          **{f"jumprelu_{k}": v for k, v in j["jumprelu"].items()}})
    files += write_table(pd.DataFrame(form_rows), out.dir, "stitching_jumprelu_form")
    files.append(plot_max_cos_histograms(hist, out.dir / "max_cos_hist.png", hist_bins))
    files.append(plot_interpolation(plots, out.dir / "interpolation.png"))
    mark_complete(out, pairs=len(pairs), files=[str(x) for x in [*files, lat_path]])
    publish_markdown("stitching-pairs", table.to_markdown(index=False, floatfmt=".4g"), "Stitching, one row per pair")
    return out


# ------------------------------------------------------------------------------------ entry point
def run(ctx: EvalContext) -> EvalOutput:
    """Stitch every configured (smaller, larger) pair of ``ctx.saes`` (see :class:`StitchingConfig`)."""
    cfg: StitchingConfig = ctx.config.stitching
    infos = read_infos(ctx.saes)
    pairs = find_pairs(infos, cfg)
    if not pairs:
        raise StitchingError(
            "stitching found no (smaller, larger) pair among the evaluated SAEs: it needs SAEs on the same hook with "
            "the same architecture and sparsity setting and different widths (e.g. family.widths: [1024, 2048, 4096]); "
            "set stitching.pair_across_sparsity, list stitching.pairs, or set stitching: null")
    stage_logger().info("stitching %d pairs: %s", len(pairs),
                        "; ".join(f"{infos[s].label} -> {infos[l].label}" for s, l in pairs))
    involved = sorted({i for p in pairs for i in p})

    def stage_all(jobs: list[tuple]) -> list:
        """Independent stages: in parallel when the flow's runner can (``ctx.stage_all``)."""
        if ctx.stage_all is not None:
            return ctx.stage_all(jobs)
        return [ctx.stage(name, ref_fn, fn, **kw) for name, ref_fn, fn, kw in jobs]

    form_list = stage_all([(f"stitching-form-{i}", form_ref, form_task,
                            {"sae": ctx.saes[i], "index": i, "acts": ctx.acts, "cfg": cfg, "device": ctx.device})
                           for i in involved])
    forms = dict(zip(involved, form_list))
    pair_list = stage_all([(f"stitching-pair-{s}-{l}", pair_ref, pair_task,
                            {"small": ctx.saes[s], "large": ctx.saes[l], "small_form": forms[s], "large_form": forms[l],
                             "model": ctx.model, "model_cfg": ctx.config.model, "corpus": ctx.corpus, "acts": ctx.acts,
                             "cfg": cfg, "device": ctx.device}) for s, l in pairs])
    pair_refs = dict(zip(pairs, pair_list))
    per_sae: list[ArtifactRef | None] = [None] * len(ctx.saes)
    adjacent = {i: adjacent_pair_for(i, pairs, infos) for i in involved}
    summaries = stage_all([(f"stitching-summary-{i}", summary_ref, summary_task,
                            {"form": forms[i], "pair": pair_refs[adjacent[i]] if adjacent[i] else None})
                           for i in involved])
    for i, ref_ in zip(involved, summaries):
        per_sae[i] = ref_
    res = ctx.stage("stitching-results", results_ref, results_task, pairs=[pair_refs[p] for p in pairs],
                    forms=[forms[i] for i in involved], hist_bins=cfg.hist_bins)
    return EvalOutput(per_sae=per_sae, results=res, refs=[*forms.values(), *pair_refs.values()])
