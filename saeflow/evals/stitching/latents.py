"""Latent by latent: decoder cosines, the single-insertion ground truth and its max-cosine proxy
(:mod:`saeflow.evals.stitching`, steps 2 and 3)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor

from saeflow.cosine import max_cosine, unit_rows
from saeflow.evals.stitching.forms import inserted_acts, unit_decoder
from saeflow.evals.stitching.pairing import StitchingError
from saeflow.saes import BaseSAE
from saeflow.saes.base import encode_block_rows

__all__ = ["NOVEL", "RECONSTRUCTION", "INACTIVE", "decoder_cosines", "cosine_edges", "insertion_delta_mse", "classify",
           "proxy_auc", "tau_sweep"]

NOVEL, RECONSTRUCTION, INACTIVE = "novel", "reconstruction", "inactive"


@torch.no_grad()
def decoder_cosines(small: BaseSAE, large: BaseSAE, chunk_rows: int = 2048) -> tuple[Tensor, Tensor]:
    """``(s, match)`` [n_L]: max cosine of each L decoder row to any S decoder row, and its argmax
    (on S's device; :func:`saeflow.cosine.max_cosine`, ``chunk_rows`` L rows at a time)."""
    if small.d_in != large.d_in:
        raise StitchingError(f"decoder widths differ: S has d_in={small.d_in}, L has d_in={large.d_in}")
    return max_cosine(large.W_dec.detach().to(small.W_dec.device), small.W_dec, chunk_rows=chunk_rows)


@torch.no_grad()
def cosine_edges(small: BaseSAE, large: BaseSAE, tau: float, chunk_rows: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """``(j, i)`` int64 arrays: every (L latent, S latent) pair with decoder cosine ``C_ji >= tau``
    (the ``threshold`` swap rule's bipartite graph), in row-major order; ``chunk_rows`` L rows at a time."""
    if small.d_in != large.d_in:
        raise StitchingError(f"decoder widths differ: S has d_in={small.d_in}, L has d_in={large.d_in}")
    US = unit_rows(small.W_dec)
    UL = unit_rows(large.W_dec).to(US.device)
    js, is_ = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for lo in range(0, UL.shape[0], chunk_rows):
        j, i = torch.nonzero(UL[lo:lo + chunk_rows] @ US.T >= tau, as_tuple=True)
        js.append(j.cpu().numpy() + lo)
        is_.append(i.cpu().numpy())
    return np.concatenate(js), np.concatenate(is_)


@torch.no_grad()
def insertion_delta_mse(small: BaseSAE, large: BaseSAE, rows: Iterable[Tensor], adjust_encoder_bias: bool = True,
                        latent_chunk: int = 4096) -> dict[str, Any]:
    """Single-insertion ΔMSE of every L latent into S, batched (:mod:`saeflow.evals.stitching`, step 3).

    ``rows`` yields [B, d_in] activation batches, each encoded by L in row blocks
    (:func:`saeflow.saes.base.encode_block_rows`). Works for any pair of registry SAEs: each latent
    keeps the activation it has in its own SAE (:func:`inserted_acts`). Returns ``delta_mse`` [n_L]
    (float64 numpy, in the units of :func:`saeflow.metrics.reconstruction_metrics`' ``mse``: mean
    over tokens of the summed squared error), ``fires`` [n_L] (rows on which the inserted latent is
    active), ``mse_small`` (S's MSE on the same rows) and ``n_tokens``.
    """
    S, L = small, large
    if S.d_in != L.d_in:
        raise StitchingError(f"S has d_in={S.d_in} but L has d_in={L.d_in}")
    dev = S.W_dec.device
    L.to(dev)
    UL, ml = unit_decoder(L)
    dse = torch.zeros(L.d_sae, dtype=torch.float64, device=dev)
    fires = torch.zeros(L.d_sae, dtype=torch.int64, device=dev)
    se_small, n = 0.0, 0
    for x in rows:
        x = torch.as_tensor(x).to(dev, torch.float32)
        if x.ndim != 2 or x.shape[1] != S.d_in:
            raise StitchingError(f"activation rows must be [B, {S.d_in}], got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise StitchingError("activation rows hold NaN/inf values")
        step = encode_block_rows(max(S.d_sae, L.d_sae), x.shape[0])  # the whole batch up to 32k latents
        for s in range(0, x.shape[0], step):
            r = x[s:s + step] - S(x[s:s + step])
            se_small += float(r.double().pow(2).sum())
            f_all = inserted_acts(S, L, x[s:s + step], adjust_encoder_bias, ml)  # [rows, n_L]
            for lo in range(0, L.d_sae, latent_chunk):
                hi = min(lo + latent_chunk, L.d_sae)
                f = f_all[:, lo:hi]
                proj = r @ UL[lo:hi].T  # [rows, c]; ||U_j|| = 1
                dse[lo:hi] += -2.0 * (f * proj).sum(dim=0).double() + f.pow(2).sum(dim=0).double()
                fires[lo:hi] += (f != 0).sum(dim=0)
            del f_all
        n += x.shape[0]
    if n == 0:
        raise StitchingError("insertion_delta_mse got no activation rows")
    return {"delta_mse": (dse / n).cpu().numpy(), "fires": fires.cpu().numpy(), "mse_small": se_small / n,
            "n_tokens": n}


def classify(delta_mse: np.ndarray, fires: np.ndarray) -> np.ndarray:
    """``novel`` (ΔMSE < 0), ``reconstruction`` (ΔMSE >= 0) or ``inactive`` (never fires)."""
    d, f = np.asarray(delta_mse), np.asarray(fires)
    out = np.where(d < 0, NOVEL, RECONSTRUCTION).astype(object)
    out[f == 0] = INACTIVE
    return out


def proxy_auc(max_cos: np.ndarray, classes: np.ndarray) -> float:
    """ROC AUC of ``-max_cos`` as a score for ``novel`` among active latents (ties count 1/2,
    :func:`sklearn.metrics.roc_auc_score`); NaN when one class is empty."""
    s, c = np.asarray(max_cos, dtype=np.float64), np.asarray(classes)
    active = c != INACTIVE
    s, y = -s[active], c[active] == NOVEL
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


def tau_sweep(max_cos: np.ndarray, classes: np.ndarray, taus: Sequence[float]) -> pd.DataFrame:
    """Proxy ``novel if s_j < τ`` against the ground truth, over the active latents, per τ."""
    s, c = np.asarray(max_cos, dtype=np.float64), np.asarray(classes)
    active = c != INACTIVE
    s, y = s[active], c[active] == NOVEL
    rows = []
    for t in taus:
        pred = s < t
        tp, fp_ = int((pred & y).sum()), int((pred & ~y).sum())
        rows.append({"tau": float(t), "proxy_novel_fraction": float(pred.mean()) if pred.size else float("nan"),
                     "proxy_reconstruction_fraction": float((~pred).mean()) if pred.size else float("nan"),
                     "true_novel_fraction": float(y.mean()) if y.size else float("nan"),
                     "accuracy": float((pred == y).mean()) if y.size else float("nan"),
                     "precision": tp / (tp + fp_) if tp + fp_ else float("nan"),
                     "recall": tp / int(y.sum()) if y.sum() else float("nan")})
    return pd.DataFrame(rows)
