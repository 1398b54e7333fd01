"""Stages of the meta-SAE evaluation (SPEC 2.4). Entry point for the flow: :func:`run`.

Per SAE of the family (plus imported ones):

- ``meta_sae`` (:func:`meta_train_task`): a BatchTopK meta-SAE trained on the SAE's unit decoder
  rows (:func:`saeflow.meta_sae.train_meta_sae`, resumable), its decoder variance explained and MSE
  (SAEBench's batch-level top-k forward), each latent's meta-latent decomposition
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
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import task

from saeflow.artifacts import ArtifactRef, artifact_ref, begin, fingerprint, mark_complete, require_complete
from saeflow.config import MetaSAEConfig
from saeflow.saes import K_ARCHITECTURES, describe_sae
from saeflow.device import pick_device
from saeflow.meta_sae import (
    MetaSAEInputError,
    cluster_sizes,
    decompose,
    decoder_variance_explained,
    max_cosines,
    sample_store_rows,
    snippet,
    sparse_code,
    top_rows,
    train_meta_sae,
    unit_rows,
)
from saeflow.models import load_tokenizer
from saeflow.saes import BaseSAE, load_sae
from saeflow.store import ActivationStore
from saeflow.tables import write_table
from tasks.common import (EvalContext, EvalOutput, Progress, code_version, publish_markdown, publish_table, stage_logger,
                          timed)
from tasks.corpus import load_tokens

STAGE = "meta_sae"
SAE_STAGE = "meta_sae-sae"
EXAMPLES_STAGE = "meta_sae-examples"
RESULTS_STAGE = "meta_sae-results"
META_DIR = "meta_sae"  # the trained meta-SAE (SAELens layout) inside the meta_sae artifact
PREFIX = "meta_sae_"

#: Config fields the trained meta-SAE and its per-SAE outputs depend on (the others only change the
#: cross-size check, the example page or logging, so changing them does not retrain).
TRAIN_FIELDS = ("seed", "width_ratio", "k", "train_steps", "batch_size", "lr", "dead_feature_window",
                "eval_batch_size", "decomposition_top")
CROSS_FIELDS = ("cross_size_k", "cross_size_threshold")
#: Bumped when the example page's content changes (it is part of the page's fingerprint).
PAGE_VERSION = 2
EXAMPLE_FIELDS = ("seed", "example_sae", "n_examples", "example_rows", "example_snippets", "snippet_window")


def _code() -> str:
    """This evaluation's code version (its two modules): a code change gives its stages new fingerprints."""
    return code_version("saeflow.meta_sae", "tasks.meta_sae")


def _subset(cfg: MetaSAEConfig, fields: tuple[str, ...]) -> dict[str, Any]:
    payload = cfg.fingerprint_payload()
    return {f: payload[f] for f in fields}


# ------------------------------------------------------------------------------------ helpers
def sae_info(sae: ArtifactRef) -> dict[str, Any]:
    """Label, architecture, width, sparsity and hook of an SAE artifact (from its ``cfg.json``)."""
    d = require_complete(sae)
    raw = json.loads((d / "cfg.json").read_text())
    block = raw.get("saeflow") or {}
    cfg = block.get("sae_config")
    if cfg is None:  # a foreign (SAELens-written) SAE: the loader knows its config
        cfg = load_sae(d).cfg.model_dump(mode="json")
    from saeflow.saes import SAEConfig

    sc = SAEConfig.model_validate(cfg)
    arch = sc.architecture
    sparsity = sc.k if arch in K_ARCHITECTURES else (sc.l1_coefficient if arch == "relu" else sc.l0_coefficient)
    return {"label": describe_sae(sc), "architecture": arch, "width": int(raw["d_sae"]), "d_in": int(raw["d_in"]),
            "sparsity": sparsity, "hook": (raw.get("metadata") or {}).get("hook_name"),
            "model": (raw.get("metadata") or {}).get("model_name")}


def _group_key(info: dict[str, Any]) -> tuple:
    return (info["hook"], info["model"], info["d_in"], info["architecture"], info["sparsity"])


def _unit_decoder(sae_model: BaseSAE, sae_dir: Path) -> torch.Tensor:
    return unit_rows(sae_model.W_dec.detach(), what=f"decoder of the SAE at {sae_dir}")


# ------------------------------------------------------------------------------ meta_sae (train)
def train_ref(sae: ArtifactRef, cfg: MetaSAEConfig, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, STAGE, fingerprint(STAGE, _subset(cfg, TRAIN_FIELDS), sae, _code()))


@task(name="meta-sae-train")
def meta_train_task(sae: ArtifactRef, cfg: MetaSAEConfig, root: str, device: str = "auto") -> ArtifactRef:
    """Train the meta-SAE of one SAE; its metrics, decomposition, cluster sizes and max cosines."""
    out = train_ref(sae, cfg, root)
    if out.is_complete():
        return out
    logger = stage_logger()
    dev = pick_device(device)
    sae_dir = require_complete(sae)
    info = sae_info(sae)
    D = _unit_decoder(load_sae(sae_dir), sae_dir)
    begin(out, cfg, [sae])
    steps = cfg.train_steps
    progress = Progress(f"meta-SAE of {info['label']}", every_s=0.0)

    def on_log(rec: dict) -> None:
        progress.update(rec["step"], steps, f"mse={rec['mse']:.4g} l0={rec['l0']:.3g} frac_dead={rec['frac_dead']:.3g}")

    meta, summary = train_meta_sae(D, cfg, out.dir / META_DIR, dev, on_log=on_log)
    Dd = D.to(dev)
    with timed(f"meta-SAE metrics of {info['label']}"):
        bt = decoder_variance_explained(meta, Dd, cfg.eval_batch_size, "batch_topk")
        th = decoder_variance_explained(meta, Dd, cfg.eval_batch_size, "threshold")
        dec = decompose(meta, Dd, cfg.decomposition_top)
        sizes = cluster_sizes(dec["pairs"], meta.d_sae)
        meta_unit = meta.W_dec.detach() / meta.W_dec.detach().norm(dim=1, keepdim=True).clamp(min=1e-12)
        mc = max_cosines(Dd, meta_unit)
    t = cfg.decomposition_top
    table = pd.DataFrame({"latent": np.arange(D.shape[0]), "n_meta": dec["n_active"], "recon_cos": dec["recon_cos"]})
    for j in range(t):
        table[f"meta_{j}"] = dec["meta_idx"][:, j]
        table[f"weight_{j}"] = dec["weight"][:, j]
    table.to_parquet(out.dir / "decomposition.parquet", index=False)
    np.save(out.dir / "cluster_sizes.npy", sizes)
    np.savez(out.dir / "max_cosines.npz", **{k.replace("->", "_to_"): v for k, v in mc.items()})
    used = sizes[sizes > 0]
    metrics = {
        "fve": bt["fve"], "mse": bt["mse"], "l0": bt["l0"],
        "fve_threshold": th["fve"], "mse_threshold": th["mse"], "l0_threshold": th["l0"],
        "width": meta.d_sae, "n_latents": int(D.shape[0]),
        "mean_latents_per_meta": float(used.mean()) if len(used) else 0.0,
        "max_latents_per_meta": int(sizes.max()) if len(sizes) else 0,
        "frac_meta_unused": float((sizes == 0).mean()),
        "mean_recon_cos": float(np.mean(dec["recon_cos"])),
        "train_time_s": float(summary["train_time_seconds"]),
        "n_dead_meta": int(summary.get("n_dead", 0)),
        "mean_max_cos_base_to_base": float(mc["base->base"].mean()),
        "mean_max_cos_base_to_meta": float(mc["base->meta"].mean()),
    }
    (out.dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    mark_complete(out, sae=info["label"], **{k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    logger.info("meta-SAE of %s: FVE %.4f (threshold %.4f), MSE %.3g, width %d, %.1f s", info["label"], bt["fve"],
                th["fve"], bt["mse"], meta.d_sae, metrics["train_time_s"])
    return out


# ------------------------------------------------------------------------- meta_sae-sae (summary)
def summary_ref(sae: ArtifactRef, meta: ArtifactRef, smaller: list[ArtifactRef], cfg: MetaSAEConfig, root: str,
                **_) -> ArtifactRef:
    return artifact_ref(root, SAE_STAGE, fingerprint(SAE_STAGE, _subset(cfg, CROSS_FIELDS), sae, meta, *smaller, _code()))


@task(name="meta-sae-summary")
def meta_sae_summary_task(sae: ArtifactRef, meta: ArtifactRef, smaller: list[ArtifactRef], cfg: MetaSAEConfig,
                          root: str, device: str = "auto") -> ArtifactRef:
    """Cross-size check against each smaller SAE of the same group; the per-SAE ``summary.json``."""
    out = summary_ref(sae, meta, smaller, cfg, root)
    if out.is_complete():
        return out
    dev = pick_device(device)
    info = sae_info(sae)
    metrics = json.loads((require_complete(meta) / "metrics.json").read_text())
    summary: dict[str, float] = {PREFIX + k: float(metrics[k]) for k in (
        "fve", "mse", "width", "mean_latents_per_meta", "l0", "fve_threshold", "frac_meta_unused", "train_time_s")}
    rows, cos_by_pair = [], {}
    if smaller:
        Y = _unit_decoder(load_sae(require_complete(sae)), sae.dir).to(dev)
        for s in smaller:
            s_info = sae_info(s)
            if _group_key(s_info) != _group_key(info) or s_info["width"] >= info["width"]:
                raise MetaSAEInputError(
                    f"cross-size check: {s_info['label']} ({s_info['hook']}) is not a smaller SAE of the same hook, "
                    f"model, architecture and sparsity as {info['label']} ({info['hook']})")
            Ds = _unit_decoder(load_sae(require_complete(s)), s.dir).to(dev)
            with timed(f"cross-size {s_info['label']} -> {info['label']}"):
                sc = sparse_code(Y, Ds, cfg.cross_size_k)
            cos_k, cos_1 = sc["cos"][:, -1], sc["cos"][:, 0]
            cos_by_pair[s.fingerprint] = cos_k
            rows.append({"smaller": s_info["label"], "larger": info["label"], "smaller_width": s_info["width"],
                         "larger_width": info["width"], "smaller_fingerprint": s.fingerprint,
                         "larger_fingerprint": sae.fingerprint, "k": cfg.cross_size_k,
                         "threshold": cfg.cross_size_threshold,
                         "frac_well_explained": float((cos_k >= cfg.cross_size_threshold).mean()),
                         "frac_well_explained_1atom": float((cos_1 >= cfg.cross_size_threshold).mean()),
                         "mean_cos": float(cos_k.mean()), "median_cos": float(np.median(cos_k)),
                         "mean_cos_1atom": float(cos_1.mean())})
        nearest = max(rows, key=lambda r: r["smaller_width"])
        summary[PREFIX + "cross_size_fraction"] = nearest["frac_well_explained"]
        summary[PREFIX + "cross_size_fraction_1atom"] = nearest["frac_well_explained_1atom"]
        summary[PREFIX + "cross_size_smaller_width"] = float(nearest["smaller_width"])
    begin(out, cfg, [sae, meta, *smaller])
    pd.DataFrame(rows, columns=["smaller", "larger", "smaller_width", "larger_width", "smaller_fingerprint",
                                "larger_fingerprint", "k", "threshold", "frac_well_explained",
                                "frac_well_explained_1atom", "mean_cos", "median_cos", "mean_cos_1atom"]
                 ).to_parquet(out.dir / "cross_size.parquet", index=False)
    np.savez(out.dir / "cross_size_cos.npz", **cos_by_pair)
    (out.dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    mark_complete(out, sae=info["label"], **summary)
    stage_logger().info("meta-SAE summary of %s: %s", info["label"], {k: round(v, 4) for k, v in summary.items()})
    return out


# -------------------------------------------------------------------------- meta_sae-examples
def examples_ref(model: ArtifactRef, corpus: ArtifactRef, acts: ArtifactRef, sae: ArtifactRef, meta: ArtifactRef,
                 cfg: MetaSAEConfig, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, EXAMPLES_STAGE,
                        fingerprint(EXAMPLES_STAGE, {"page": PAGE_VERSION, **_subset(cfg, EXAMPLE_FIELDS)}, model, corpus,
                                    acts, sae, meta, _code()))


def _read_blocks(store: ActivationStore, blocks: list[tuple[int, int]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    xs = [store.read(a, b) for a, b in blocks]
    meta = {name: np.concatenate([store.read_rows(name, a, b) for a, b in blocks]) for name in
            ("token_ids", "positions", "context")}
    return np.concatenate(xs), meta


def _batches(x: torch.Tensor, size: int = 2048):
    for s in range(0, x.shape[0], size):
        yield x[s:s + size]


@task(name="meta-sae-examples")
def examples_task(model: ArtifactRef, corpus: ArtifactRef, acts: ArtifactRef, sae: ArtifactRef, meta: ArtifactRef,
                  cfg: MetaSAEConfig, root: str, device: str = "auto") -> ArtifactRef:
    """``examples.md``: a few latents, their meta-latents, each shown by top-activating snippets."""
    out = examples_ref(model, corpus, acts, sae, meta, cfg, root)
    if out.is_complete():
        return out
    dev = pick_device(device)
    info = sae_info(sae)
    store = ActivationStore.open(require_complete(acts))
    if store.d_model != info["d_in"] or (info["hook"] and store.attrs.get("hook") and info["hook"] != store.attrs["hook"]):
        raise MetaSAEInputError(f"example page: {info['label']} reads {info['hook']} (width {info['d_in']}) but the "
                                f"activations are {store.attrs.get('hook')} (width {store.d_model})")
    tokens = load_tokens(corpus)
    tok = load_tokenizer(require_complete(model))
    base = load_sae(require_complete(sae), device=dev).eval()
    meta_sae = load_sae(require_complete(meta) / META_DIR, device=dev).eval()
    dec = pd.read_parquet(meta.dir / "decomposition.parquet")
    sizes = np.load(meta.dir / "cluster_sizes.npy")
    metrics = json.loads((meta.dir / "metrics.json").read_text())

    blocks = sample_store_rows(store.n_rows, cfg.example_rows, cfg.seed)
    X_np, rowmeta = _read_blocks(store, blocks)
    X = torch.from_numpy(X_np).to(dev)
    m = cfg.example_snippets
    with torch.no_grad():  # encode once; keep the (sparse) latent activations for the meta-latent scores
        F = [base.encode(b).to_sparse() for b in _batches(X)]
        top_v, top_r = top_rows((f.to_dense() for f in F), m)

    def decode(ids: list[int]) -> str:
        return tok.decode(ids)

    def snip(row: int) -> str:
        c, p = int(rowmeta["context"][row]), int(rowmeta["positions"][row])
        return snippet(tokens[c], p, decode, cfg.snippet_window)

    def top_token(latent: int) -> str:
        r = int(top_r[0, latent])
        return decode([int(rowmeta["token_ids"][r])]).strip() or "·" if r >= 0 and top_v[0, latent] > 0 else "(silent)"

    # choose latents: seeded, among the best-explained multi-meta-latent ones that fire in the sample
    # (2..2k meta-latents: a latent spread over many weak meta-latents is rarely readable)
    fired = top_v[0] > 0 if top_v.size else np.zeros(len(dec), bool)
    fired_rows = fired[dec["latent"].to_numpy()]
    cand = dec[(dec["n_meta"] >= 2) & (dec["n_meta"] <= 2 * cfg.k) & fired_rows]
    if len(cand) == 0:
        cand = dec[fired_rows & (dec["n_meta"] >= 1)]
    cand = cand.sort_values(["recon_cos", "n_meta"], ascending=[False, False])
    pool = cand.head(max(5 * cfg.n_examples, 20))
    rng = np.random.default_rng(cfg.seed)
    chosen = sorted(rng.choice(pool["latent"].to_numpy(), size=min(cfg.n_examples, len(pool)), replace=False).tolist()) \
        if len(pool) else []

    with torch.no_grad():
        meta_acts = meta_sae.encode(unit_rows(base.W_dec.detach()).to(dev))  # [n, M] threshold inference
    lines = [f"# Meta-SAE example decompositions: {info['label']}", "",
             f"Meta-SAE: BatchTopK, width {metrics['width']}, k={cfg.k}; decoder variance explained "
             f"{metrics['fve']:.4f} (batch top-k), {metrics['fve_threshold']:.4f} (threshold inference). "
             f"Each latent ≈ sum of weight × meta-latent decoder direction (threshold inference). Snippets: the "
             f"top-activating tokens (**bold**) among {X.shape[0]:,} activation rows sampled with seed {cfg.seed}. "
             "A meta-latent is shown by the tokens where the *other* latents it covers fire (their activations "
             "weighted by how strongly each uses the meta-latent, each relative to its own maximum in the sample), "
             "and by its strongest member latents.", ""]
    records = []
    for j in chosen:
        row = dec[dec["latent"] == j].iloc[0]
        metas = [(int(row[f"meta_{t}"]), float(row[f"weight_{t}"])) for t in range(cfg.decomposition_top)
                 if int(row[f"meta_{t}"]) >= 0]
        lines += [f"## Latent {j}", "",
                  f"{int(row['n_meta'])} meta-latents, reconstruction cosine {float(row['recon_cos']):.3f}: "
                  f"latent {j} ≈ " + " + ".join(f"{w:.2f}·M{mi}" for mi, w in metas), "",
                  "Top activations:", ""]
        for t in range(m):
            r = int(top_r[t, j])
            if r >= 0 and top_v[t, j] > 0:
                lines.append(f"{t + 1}. {snip(r)} ({top_v[t, j]:.2f})")
        lines.append("")
        rec: dict[str, Any] = {"latent": j, "n_meta": int(row["n_meta"]), "recon_cos": float(row["recon_cos"]),
                               "top_tokens": [top_token(j)], "meta": []}
        if metas:
            ids = torch.tensor([mi for mi, _ in metas], device=dev)
            W = meta_acts[:, ids].clone()  # [n, P]: how strongly each latent uses each meta-latent
            W[j] = 0.0
            # each member's activation relative to its own sampled maximum, so no high-norm latent dominates
            Ws = W * torch.from_numpy(np.where(fired, 1.0 / np.where(fired, top_v[0], 1.0), 0.0)).to(W)[:, None]
            with torch.no_grad():
                sc_v, sc_r = top_rows((torch.sparse.mm(f, Ws) for f in F), m)
            for p, (mi, w) in enumerate(metas):
                order = torch.argsort(W[:, p], descending=True).cpu().numpy()
                users = [int(x) for x in order if float(W[x, p]) > 0]
                members = [x for x in users if fired[x]][:6]
                silent = sum(1 for x in users if not fired[x])
                lines += [f"### M{mi} (weight {w:.2f}; used by {int(sizes[mi])} latents)", "",
                          "Strongest other members (latent: its top token): "
                          + (", ".join(f"{x}: “{top_token(x)}”" for x in members) or "none")
                          + (f" ({silent} members do not fire in the sample)" if silent else ""), ""]
                shown = 0
                for t in range(m):
                    r = int(sc_r[t, p])
                    if r >= 0 and sc_v[t, p] > 0:
                        lines.append(f"{t + 1}. {snip(r)} ({sc_v[t, p]:.2f})")
                        shown += 1
                if not shown:
                    lines.append("(its other members do not fire in the sampled rows)")
                lines.append("")
                rec["meta"].append({"meta_latent": mi, "weight": w, "cluster_size": int(sizes[mi]),
                                    "members": members, "member_top_tokens": [top_token(x) for x in members]})
        records.append(rec)
    if not chosen:
        lines.append("No latent has an active meta-latent and fires in the sampled rows; nothing to show.")
    begin(out, cfg, [model, corpus, acts, sae, meta])
    text = "\n".join(lines) + "\n"
    (out.dir / "examples.md").write_text(text)
    (out.dir / "examples.json").write_text(json.dumps({"sae": info["label"], "examples": records}, indent=2))
    mark_complete(out, sae=info["label"], latents=chosen, rows=int(X.shape[0]))
    publish_markdown("meta-sae-examples", text[:50_000], f"Meta-SAE example decompositions of {info['label']}")
    return out


# ------------------------------------------------------------------------------ meta_sae-results
def results_ref(saes: list[ArtifactRef], trains: list[ArtifactRef], per_sae: list[ArtifactRef],
                examples: ArtifactRef | None, cfg: MetaSAEConfig, show: int, root: str, **_) -> ArtifactRef:
    ups = [*saes, *trains, *per_sae] + ([examples] if examples is not None else [])
    return artifact_ref(root, RESULTS_STAGE, fingerprint(RESULTS_STAGE, {"show": show, **_subset(cfg, CROSS_FIELDS)}, *ups, _code()))


def _plots(out_dir: Path, infos: list[dict], trains: list[ArtifactRef], per_sae: list[ArtifactRef],
           show: int, threshold: float) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for info, tr in zip(infos, trains):
        sizes = np.load(tr.dir / "cluster_sizes.npy")
        used = sizes[sizes > 0]
        if len(used):
            bins = np.unique(np.logspace(0, math.log10(max(used.max(), 2)) + 0.01, 30).astype(int))
            ax.hist(used, bins=bins, histtype="step", label=info["label"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("latents using the meta-latent (cluster size)")
    ax.set_ylabel("meta-latents")
    ax.set_title("Meta-latent cluster sizes")
    ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(out_dir / "cluster_sizes.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    pairs = []
    for info, ps in zip(infos, per_sae):
        z = np.load(ps.dir / "cross_size_cos.npz")
        df = pd.read_parquet(ps.dir / "cross_size.parquet")
        for _, r in df.iterrows():
            pairs.append((f"{r['smaller_width']}→{info['label']}", z[r["smaller_fingerprint"]]))
    if pairs:
        fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
        for label, cos in pairs:
            ax.hist(cos, bins=np.linspace(0, 1, 51), histtype="step", label=label, density=True)
        ax.axvline(threshold, color="k", linestyle="--", linewidth=0.8)
        ax.set_xlabel("cosine(larger latent, sparse code on the smaller decoder)")
        ax.set_ylabel("density")
        ax.set_title("Cross-size check: larger latents as sparse combinations of smaller ones")
        ax.legend(fontsize=6)
        fig.tight_layout()
        paths.append(out_dir / "cross_size_cosines.png")
        fig.savefig(paths[-1])
        plt.close(fig)

    mc = np.load(trains[show].dir / "max_cosines.npz")
    fig, axes = plt.subplots(2, 2, figsize=(7, 5.5), dpi=120, sharex=True)
    for ax, key in zip(axes.flat, ("base_to_base", "base_to_meta", "meta_to_base", "meta_to_meta")):
        ax.hist(mc[key], bins=np.linspace(-0.2, 1, 61))
        ax.set_title(key.replace("_to_", " → "), fontsize=9)
    for ax in axes[1]:
        ax.set_xlabel("max cosine similarity")
    fig.suptitle(f"Max decoder cosine: {infos[show]['label']} and its meta-SAE", fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "max_cosines.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


@task(name="meta-sae-results")
def results_task(saes: list[ArtifactRef], trains: list[ArtifactRef], per_sae: list[ArtifactRef],
                 examples: ArtifactRef | None, cfg: MetaSAEConfig, show: int, root: str) -> ArtifactRef:
    """Tables ``meta_sae`` / ``cross_size``, the plots and ``examples.md``, in one folder."""
    out = results_ref(saes, trains, per_sae, examples, cfg, show, root)
    if out.is_complete():
        return out
    infos = [sae_info(s) for s in saes]
    rows = []
    for s, info, tr, ps in zip(saes, infos, trains, per_sae):
        m = json.loads((require_complete(tr) / "metrics.json").read_text())
        summ = json.loads((require_complete(ps) / "summary.json").read_text())
        rows.append({"sae": info["label"], "sae_fingerprint": s.fingerprint, "architecture": info["architecture"],
                     "width": info["width"], "meta_width": m["width"],
                     **{k: m[k] for k in ("fve", "mse", "l0", "fve_threshold", "mean_latents_per_meta",
                                          "max_latents_per_meta", "frac_meta_unused", "mean_recon_cos",
                                          "mean_max_cos_base_to_base", "mean_max_cos_base_to_meta", "train_time_s")},
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
    return out


# ------------------------------------------------------------------------------------------ run
def run(ctx: EvalContext) -> EvalOutput:
    """Meta-SAE of every SAE in ``ctx.saes``, the cross-size check, the example page and the tables."""
    cfg: MetaSAEConfig = ctx.config.meta_sae
    infos = [sae_info(s) for s in ctx.saes]
    if cfg.example_sae is not None and cfg.example_sae >= len(ctx.saes):
        raise MetaSAEInputError(f"meta_sae.example_sae={cfg.example_sae} but only {len(ctx.saes)} SAEs are evaluated "
                                f"(indices 0..{len(ctx.saes) - 1}); pick one of them or leave it null (the widest)")

    def stage_all(jobs: list[tuple]) -> list:
        """Independent stages: in parallel when the flow's runner can (``ctx.stage_all``)."""
        if ctx.stage_all is not None:
            return ctx.stage_all(jobs)
        return [ctx.stage(name, ref_fn, task_fn, **kw) for name, ref_fn, task_fn, kw in jobs]

    trains = stage_all([(f"meta_sae-train-{i}", train_ref, meta_train_task, {"sae": s, "cfg": cfg, "device": ctx.device})
                        for i, s in enumerate(ctx.saes)])
    jobs = []
    for i, (s, info) in enumerate(zip(ctx.saes, infos)):
        seen: set[str] = set()
        smaller = []
        for t, ti in sorted(zip(ctx.saes, infos), key=lambda p: p[1]["width"]):
            if _group_key(ti) == _group_key(info) and ti["width"] < info["width"] and t.fingerprint not in seen:
                seen.add(t.fingerprint)
                smaller.append(t)
        jobs.append((f"meta_sae-sae-{i}", summary_ref, meta_sae_summary_task,
                     {"sae": s, "meta": trains[i], "smaller": smaller, "cfg": cfg, "device": ctx.device}))
    per_sae = stage_all(jobs)
    show = cfg.example_sae if cfg.example_sae is not None else max(range(len(infos)), key=lambda i: (infos[i]["width"], -i))
    examples = None
    if cfg.n_examples > 0:
        examples = ctx.stage("meta_sae-examples", examples_ref, examples_task, model=ctx.model, corpus=ctx.corpus,
                             acts=ctx.acts, sae=ctx.saes[show], meta=trains[show], cfg=cfg, device=ctx.device)
    res = ctx.stage("meta_sae-results", results_ref, results_task, saes=ctx.saes, trains=trains, per_sae=per_sae,
                    examples=examples, cfg=cfg, show=show)
    return EvalOutput(per_sae=per_sae, results=res, refs=trains + ([examples] if examples is not None else []))
