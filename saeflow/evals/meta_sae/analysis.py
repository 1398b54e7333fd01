"""What a trained meta-SAE says about its base SAE: decoder variance explained (measured by
:func:`~saeflow.evals.meta_sae.training.decoder_variance_explained`, which the training's
convergence check also uses), decompositions, cluster sizes, max cosines, and the cross-size sparse
coding (:mod:`saeflow.evals.meta_sae`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from saeflow.cosine import max_cosine, sample_rows, unit_rows
from saeflow.evals.meta_sae.config import MetaSAEConfig
from saeflow.evals.meta_sae.training import MetaSAEInputError, decoder_variance_explained
from saeflow.saes import BatchTopKSAE
from saeflow.saes.base import encode_block_rows

__all__ = ["decompose", "cluster_sizes", "max_cosines", "sparse_code",
           "evaluate_meta_sae", "cross_size", "CONVERGENCE_FIELDS"]

#: The convergence check's fields in ``metrics.json`` (from :func:`~saeflow.evals.meta_sae.train_meta_sae`).
CONVERGENCE_FIELDS = ("final_loss", "loss_at_90pct", "rel_change_last10", "converged")


@torch.no_grad()
def decompose(meta: BatchTopKSAE, decoder: torch.Tensor, top: int = 8, batch: int = 4096) -> dict[str, np.ndarray]:
    """Each latent's meta-latent decomposition, with the meta-SAE's per-row (JumpReLU) inference.

    Returns numpy arrays: ``meta_idx`` / ``weight`` ``[n, top]`` (the ``top`` largest activations,
    largest first; ``-1`` / 0 where fewer are active), ``n_active`` ``[n]`` (all active
    meta-latents), ``recon_cos`` ``[n]`` (cosine between the row and its reconstruction
    ``f @ W_dec + b_dec``) and ``pairs`` ``[m, 2]``: every active ``(latent, meta_latent)``.
    """
    dev = meta.device
    D = decoder.to(dev, torch.float32)
    n, width = D.shape[0], meta.d_sae
    t = min(top, width)
    idx_out = np.full((n, top), -1, dtype=np.int64)
    w_out = np.zeros((n, top), dtype=np.float32)
    n_active = np.zeros(n, dtype=np.int64)
    cos = np.zeros(n, dtype=np.float32)
    pairs: list[np.ndarray] = []
    batch = encode_block_rows(width, batch)  # per-row inference: fewer rows per block for a wide meta-SAE
    for s in range(0, n, batch):
        b = D[s:s + batch]
        f = meta.encode(b)
        rec = meta.decode(f)
        cos[s:s + len(b)] = torch.nn.functional.cosine_similarity(rec, b, dim=1).cpu().numpy()
        vals, idx = f.topk(t, dim=1)
        act = vals > 0
        idx_np, vals_np, act_np = idx.cpu().numpy(), vals.cpu().numpy(), act.cpu().numpy()
        idx_out[s:s + len(b), :t] = np.where(act_np, idx_np, -1)
        w_out[s:s + len(b), :t] = np.where(act_np, vals_np, 0.0)
        nz = (f > 0).nonzero().cpu().numpy()
        nz[:, 0] += s
        pairs.append(nz)
        n_active[s:s + len(b)] = (f > 0).sum(dim=1).cpu().numpy()
    return {"meta_idx": idx_out, "weight": w_out, "n_active": n_active, "recon_cos": cos,
            "pairs": np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)}


def cluster_sizes(pairs: np.ndarray, width: int) -> np.ndarray:
    """How many latents use each meta-latent (``pairs`` from :func:`decompose`)."""
    return np.bincount(pairs[:, 1], minlength=width).astype(np.int64) if len(pairs) else np.zeros(width, np.int64)


def max_cosines(base_unit: torch.Tensor, meta_unit: torch.Tensor, chunk_rows: int | None = None,
                max_rows: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Max cosine similarity of each row to the other set (2x2: base/meta -> base/meta).

    ``base->base`` and ``meta->meta`` exclude the row itself. Inputs are unit rows
    (:func:`saeflow.cosine.max_cosine` with ``normalize=False``, ``chunk_rows`` rows at a time; the
    default sizes chunks by element count, ~64 MB, so a 262k-latent base SAE does not build
    ``[4096, 262144]`` similarity blocks; bitwise the same values as 4,096-row chunks on this project's CPU).
    ``max_rows``: a set with more rows contributes a seeded sample of that many (sorted row order),
    each still against every row of the other set (``None``: every row).
    """
    def mc(a: torch.Tensor, b: torch.Tensor | None) -> np.ndarray:
        subset = None
        if max_rows is not None and a.shape[0] > max_rows:
            subset = sample_rows(a.shape[0], max_rows, seed)
        if subset is not None and b is not None:
            a = a[subset.to(a.device)]
            subset = None
        return max_cosine(a, b, chunk_rows=chunk_rows, normalize=False,
                          subset=None if subset is None else subset.to(a.device))[0].cpu().numpy()

    return {"base->base": mc(base_unit, None), "base->meta": mc(base_unit, meta_unit),
            "meta->base": mc(meta_unit, base_unit), "meta->meta": mc(meta_unit, None)}


#: Largest atoms' Gram matrix :func:`sparse_code` builds whole (n x n float32: 2^28 = 1 GiB, 16,384 atoms).
GRAM_ELEMENTS = 1 << 28


@torch.no_grad()
def sparse_code(Y: torch.Tensor, D: torch.Tensor, k: int, chunk: int = 1024, ridge: float = 1e-6) -> dict[str, np.ndarray]:
    """Greedy orthogonal matching pursuit of each row of ``Y`` on the rows (atoms) of ``D``.

    At each of ``k`` steps the atom with the largest ``|<residual, atom>|`` joins the support and
    the coefficients are the least-squares fit on the support (signed; normal equations with a tiny
    ``ridge``). Returns ``idx`` / ``coef`` ``[n, k]`` and ``cos`` ``[n, k]``: the cosine between each
    row and its reconstruction after 1..k atoms (the first column is ``max_i |cos(y, d_i)|``).
    Rows of ``D`` should be unit norm.
    """
    if Y.ndim != 2 or D.ndim != 2 or Y.shape[1] != D.shape[1]:
        raise MetaSAEInputError(f"sparse_code: shapes {tuple(Y.shape)} and {tuple(D.shape)} do not share a width")
    k = int(min(k, D.shape[0]))
    # the atoms' Gram matrix when it fits GRAM_ELEMENTS (the quick family's 16k: 1 GiB), else its rows
    # for the selected atoms only, computed as they are selected (65k atoms: 16 GiB avoided; issue #27)
    G = D @ D.T if D.shape[0] ** 2 <= GRAM_ELEMENTS else None
    eye = torch.eye(k, device=D.device, dtype=D.dtype)
    idx_all, coef_all, cos_all = [], [], []
    for s in range(0, Y.shape[0], chunk):
        y = Y[s:s + chunk]
        ynorm = y.norm(dim=1).clamp(min=1e-12)
        C = y @ D.T
        corr = C.clone()
        idx = torch.zeros(y.shape[0], k, dtype=torch.long, device=D.device)
        cos = torch.zeros(y.shape[0], k, device=D.device)
        c = C.new_zeros(y.shape[0], 0)
        rows = torch.arange(y.shape[0], device=D.device)
        g_rows: list[torch.Tensor] = []
        for t in range(k):
            score = corr.abs()
            if t:
                score[rows[:, None], idx[:, :t]] = -1.0
            idx[:, t] = score.argmax(dim=1)
            S = idx[:, :t + 1]
            if G is None:
                g_rows.append(D[idx[:, t]] @ D.T)  # [b, n]: the new atom's Gram row
                G_S = torch.stack(g_rows, dim=1)  # [b, t + 1, n]
            else:
                G_S = G[S]
            G_SS = G_S.gather(2, S[:, None, :].expand(-1, t + 1, -1)) + ridge * eye[:t + 1, :t + 1]
            b_S = C.gather(1, S)
            c = torch.linalg.solve(G_SS, b_S.unsqueeze(-1)).squeeze(-1)
            corr = C - torch.einsum("bt,btm->bm", c, G_S)
            cos[:, t] = (c * b_S).sum(dim=1).clamp(min=0).sqrt() / ynorm
        idx_all.append(idx.cpu())
        coef_all.append(c.cpu())
        cos_all.append(cos.clamp(max=1.0).cpu())
    return {"idx": torch.cat(idx_all).numpy(), "coef": torch.cat(coef_all).numpy(), "cos": torch.cat(cos_all).numpy()}


def evaluate_meta_sae(meta: BatchTopKSAE, decoder: torch.Tensor, cfg: MetaSAEConfig, train_summary: dict[str, Any]
                      ) -> tuple[dict[str, Any], pd.DataFrame, np.ndarray, dict[str, np.ndarray]]:
    """Everything the ``meta_sae`` stage reports about a trained meta-SAE of the unit rows ``decoder``.

    Returns ``(metrics, decomposition, cluster_sizes, max_cosines)``: the ``metrics.json`` numbers
    (FVE / MSE / L0 with the batch-level top-k forward and with threshold inference, widths,
    cluster-size statistics, mean reconstruction cosine, training time, dead meta-latents and the
    convergence check (``final_loss``, ``loss_at_90pct``, ``rel_change_last10``, ``converged``) from
    ``train_summary``, mean max cosines), the decomposition table (one row per latent: ``n_meta``,
    ``recon_cos``, ``meta_j`` / ``weight_j`` for the ``decomposition_top`` largest weights), the
    cluster sizes per meta-latent and the 2x2 max-cosine distributions.
    """
    bt = decoder_variance_explained(meta, decoder, cfg.eval_batch_size, "batch_topk")
    th = decoder_variance_explained(meta, decoder, cfg.eval_batch_size, "threshold")
    dec = decompose(meta, decoder, cfg.decomposition_top)
    sizes = cluster_sizes(dec["pairs"], meta.d_sae)
    mc = max_cosines(decoder, unit_rows(meta.W_dec), max_rows=cfg.cosine_rows, seed=cfg.seed)
    table = pd.DataFrame({"latent": np.arange(decoder.shape[0]), "n_meta": dec["n_active"],
                          "recon_cos": dec["recon_cos"]})
    for j in range(cfg.decomposition_top):
        table[f"meta_{j}"] = dec["meta_idx"][:, j]
        table[f"weight_{j}"] = dec["weight"][:, j]
    used = sizes[sizes > 0]
    metrics = {
        "fve": bt["fve"], "mse": bt["mse"], "l0": bt["l0"],
        "fve_threshold": th["fve"], "mse_threshold": th["mse"], "l0_threshold": th["l0"],
        "width": meta.d_sae, "n_latents": int(decoder.shape[0]),
        "mean_latents_per_meta": float(used.mean()) if len(used) else 0.0,
        "max_latents_per_meta": int(sizes.max()) if len(sizes) else 0,
        "frac_meta_unused": float((sizes == 0).mean()),
        "mean_recon_cos": float(np.mean(dec["recon_cos"])),
        "train_time_s": float(train_summary["train_time_seconds"]),
        "n_dead_meta": int(train_summary.get("n_dead", 0)),
        **{k: train_summary["convergence"][k] for k in CONVERGENCE_FIELDS},
        "mean_max_cos_base_to_base": float(mc["base->base"].mean()),
        "mean_max_cos_base_to_meta": float(mc["base->meta"].mean()),
    }
    return metrics, table, sizes, mc


def cross_size(larger_unit: torch.Tensor, smaller_unit: torch.Tensor, k: int, threshold: float
               ) -> tuple[np.ndarray, dict[str, float]]:
    """The cross-size check of one (smaller, larger) pair: each larger-SAE unit decoder row coded
    on ``k`` atoms of the smaller SAE's (:func:`sparse_code`). Returns the cosines after ``k``
    atoms and ``frac_well_explained`` (cosine >= ``threshold``, after ``k`` atoms and after one),
    ``mean_cos``, ``median_cos`` and ``mean_cos_1atom``."""
    sc = sparse_code(larger_unit, smaller_unit, k)
    cos_k, cos_1 = sc["cos"][:, -1], sc["cos"][:, 0]
    return cos_k, {"frac_well_explained": float((cos_k >= threshold).mean()),
                   "frac_well_explained_1atom": float((cos_1 >= threshold).mean()),
                   "mean_cos": float(cos_k.mean()), "median_cos": float(np.median(cos_k)),
                   "mean_cos_1atom": float(cos_1.mean())}
