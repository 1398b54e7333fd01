"""Projection absorption (SPEC 1.5): absorption fraction and full absorption per prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-8


@dataclass(frozen=True)
class ProjectionThresholds:
    """SAEBench's constants (SPEC 1.5)."""

    full_cos: float = 0.025
    fraction_cos: float = 0.1
    share: float = 0.4
    max_absorbing: int = 3
    top_k: int = 10


@torch.no_grad()
def projection_absorption(acts: Tensor, f: Tensor, probe_w: Tensor, W_dec: Tensor, split_feats: Sequence[int],
                          th: ProjectionThresholds = ProjectionThresholds(), unit_dec: Tensor | None = None) -> pd.DataFrame:
    """Absorption fraction and full absorption per prompt of one letter (SPEC 1.5).

    ``acts [n, d]`` raw activations, ``f [n, d_sae]`` their SAE latents, ``probe_w [d]`` the
    letter's probe, ``W_dec [d_sae, d]``. Returns one row per prompt: ``absorption_fraction``,
    ``is_full_absorption``, ``probe_projection`` (A), ``main_projection`` (M), ``absorbing``
    (the up-to-3 candidate latents of T, by projection), ``absorbing_proj`` / ``absorbing_cos``,
    ``top_latent`` / ``top_proj`` / ``top_cos`` (the largest projection over all latents).
    ``unit_dec``: ``F.normalize(W_dec.float(), dim=-1)`` when the caller has it already (one per SAE,
    not one per letter).
    """
    p = probe_w.float() / probe_w.float().norm().clamp(min=EPS)
    cos = (F.normalize(W_dec.float(), dim=-1) if unit_dec is None else unit_dec) @ p  # [d_sae]
    proj = f.float() * cos  # [n, d_sae]
    A = acts.float() @ p
    split = torch.as_tensor(list(split_feats), dtype=torch.long)
    M = proj[:, split].sum(-1) if len(split) else torch.zeros(len(A))
    cand_mask = (cos >= th.fraction_cos)[None, :] & (proj > 0)
    if len(split):
        cand_mask[:, split] = False
    cand_proj = torch.where(cand_mask, proj, torch.full_like(proj, -torch.inf))
    m = min(th.max_absorbing, proj.shape[1])
    tv, ti = cand_proj.topk(m, dim=-1)
    valid = torch.isfinite(tv)
    T = torch.where(valid, tv, torch.zeros_like(tv)).sum(-1)
    top_v, top_i = proj.topk(min(th.top_k, proj.shape[1]), dim=-1)
    main_off = (f[:, split] < EPS).all(-1) if len(split) else torch.ones(len(A), dtype=torch.bool)
    rows = []
    for j in range(len(A)):
        a, mm, t = float(A[j]), float(M[j]), float(T[j])
        if mm >= a or a == 0 or t / a < th.share:
            frac = 0.0
        elif mm <= 0:
            frac = 1.0
        else:
            x = min(t, a - mm)
            frac = float(np.clip(x / (x + mm), 0.0, 1.0))
        t1 = int(top_i[j, 0])
        full = bool(main_off[j]) and float(cos[t1]) >= th.full_cos and a >= 0 and a != 0 and float(top_v[j, 0]) / a >= th.share
        ab = [int(i) for i, ok in zip(ti[j].tolist(), valid[j].tolist()) if ok]
        rows.append({"probe_projection": a, "main_projection": mm, "absorbing_projection": t,
                     "absorption_fraction": frac, "is_full_absorption": full,
                     "absorbing": ab, "absorbing_proj": [float(proj[j, i]) for i in ab],
                     "absorbing_cos": [float(cos[i]) for i in ab],
                     "top_latent": t1, "top_proj": float(top_v[j, 0]), "top_cos": float(cos[t1])})
    return pd.DataFrame(rows)
