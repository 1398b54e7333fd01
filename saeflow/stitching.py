"""SAE stitching (Leask, Bussmann et al. 2025; SPEC 2.1 and 2.3), as a pure library.

Pipeline for a pair (smaller S, larger L) of SAEs trained on the same hook. Every latent is used
with unit-norm decoder row and its activation scaled accordingly (``f_j ||d_j||``), which changes
no reconstruction. All SAEs of saeflow work on raw activations (activation normalisation is folded
into the weights at the end of training, and :func:`~saeflow.saes.load_sae` refuses anything else),
so latents of different SAEs can be mixed without rescaling.

1. **Form** (``StitchingConfig.form``). ``native``: each latent keeps the activation it has in its
   own SAE (TopK's per-token selection included); a stitched SAE is a :class:`StitchedSAE`.
   ``jumprelu``: each SAE is first replaced by its JumpReLU inference form (:func:`to_jumprelu`,
   ``f = relu(h) * 1[h > θ]``): ReLU θ = 0, JumpReLU its θ, BatchTopK / Matryoshka their saved
   global θ (all exact), TopK thresholds fitted on calibration rows (:func:`topk_thresholds`,
   INFERRED, an approximation whose fidelity is reported); a stitched SAE is then a registry
   :class:`~saeflow.saes.JumpReLUSAE` with concatenated weights. For ReLU / JumpReLU / BatchTopK /
   Matryoshka both forms give the same numbers.
2. **Decoder cosines** (:func:`decoder_cosines`): ``C = Ŵ_L Ŵ_Sᵀ`` (unit rows), ``s_j = max_i C_ji``,
   ``match_j = argmax_i C_ji``; computed in row chunks.
3. **Ground truth** (:func:`insertion_delta_mse`): the change of MSE when L's latent j alone is
   added to S (S's ``b_dec`` kept; with ``adjust_encoder_bias`` the latent fires exactly as in L).
   With ``r = x - x̂_S`` and ``f_j`` the latent's activation, ``ΔSE_j = Σ_t (-2 f_tj (r_t·d_j) +
   f_tj²)`` (unit ``d_j``): one L encode and one ``r @ D_Lᵀ`` matmul per row block, for all latents
   at once. ``ΔMSE < 0`` -> **novel**, ``>= 0`` -> **reconstruction**; a latent that never fires on
   the rows is **inactive** (ΔMSE exactly 0; reported apart, left out of fractions and AUC).
4. **Interpolation** (:func:`interpolation_events`, :func:`event_mse_curve`, :func:`stitched_sae`):
   insert the novel latents one by one, then swap each S latent for the reconstruction (and
   inactive) latents of L that match it, then a last event removes the S latents nothing matched
   and switches ``b_dec`` to L's, which gives exactly L. The MSE is tracked exactly after every
   event by sparse rank-1 updates of the residual; selected states are built as SAE modules so the
   core metrics code (and the CE splice) evaluates them unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from saeflow.config import StitchingConfig
from saeflow.saes import (K_ARCHITECTURES, BaseSAE, BatchTopKSAE, JumpReLUSAE, SAEConfig, SAEShape, StandardSAE,
                          TopKSAE)

__all__ = [
    "StitchingError",
    "SAEInfo",
    "sae_info",
    "find_pairs",
    "adjacent_pair_for",
    "make_jumprelu",
    "jumprelu_parts",
    "topk_thresholds",
    "to_jumprelu",
    "decoder_cosines",
    "insertion_delta_mse",
    "classify",
    "proxy_auc",
    "tau_sweep",
    "Event",
    "interpolation_events",
    "event_states",
    "stitched_sae",
    "StitchedSAE",
    "unit_decoder",
    "unit_acts",
    "inserted_acts",
    "event_mse_curve",
    "curve_points",
    "changing_events",
    "count_violations",
    "plot_max_cos_histograms",
    "plot_interpolation",
]

NOVEL, RECONSTRUCTION, INACTIVE = "novel", "reconstruction", "inactive"
#: Threshold of a latent that must never fire (finite, so the SAE can be saved).
NEVER = 1e30


class StitchingError(ValueError):
    """SAEs that cannot be stitched (other hook / model / width, not larger, ...)."""


# ------------------------------------------------------------------------------------- pairing
@dataclass(frozen=True)
class SAEInfo:
    """What pairing needs to know about one evaluated SAE (read from its ``cfg.json``)."""

    index: int
    architecture: str
    width: int
    d_in: int
    sparsity: float | None
    hook: str | None
    model: str | None
    path: str = ""

    @property
    def label(self) -> str:
        s = "" if self.sparsity is None else (f" k={int(self.sparsity)}" if self.architecture in K_ARCHITECTURES
                                               else f" c={self.sparsity:g}")
        return f"#{self.index} {self.architecture} w={self.width}{s}"


_FOREIGN = {"topk": "topk", "standard": "relu", "jumprelu": "jumprelu"}


def sae_info(index: int, cfg_json: dict[str, Any], path: str = "") -> SAEInfo:
    """:class:`SAEInfo` of an SAE folder's parsed ``cfg.json`` (saeflow-written or SAELens)."""
    ours = (cfg_json.get("saeflow") or {}).get("sae_config")
    meta = cfg_json.get("metadata") or {}
    if ours:
        cfg = SAEConfig.model_validate(ours)
        arch = cfg.architecture
        sparsity: float | None = (float(cfg.k) if arch in K_ARCHITECTURES else
                                  cfg.l1_coefficient if arch == "relu" else cfg.l0_coefficient if arch == "jumprelu" else None)
    else:
        arch = _FOREIGN.get(str(cfg_json.get("architecture")), str(cfg_json.get("architecture")))
        sparsity = float(cfg_json["k"]) if cfg_json.get("k") is not None else None
    return SAEInfo(index=index, architecture=arch, width=int(cfg_json["d_sae"]), d_in=int(cfg_json["d_in"]),
                   sparsity=sparsity, hook=meta.get("hook_name"), model=meta.get("model_name"), path=path)


def check_pair(s: SAEInfo, l: SAEInfo) -> None:
    """Raise :class:`StitchingError` unless ``l`` can be stitched onto ``s`` (``s`` strictly smaller)."""
    where = f"stitching pair (smaller {s.label} at {s.path or '?'}, larger {l.label} at {l.path or '?'})"
    if s.hook and l.hook and s.hook != l.hook:
        raise StitchingError(f"{where}: the SAEs read different hooks ({s.hook} vs {l.hook}); stitch only SAEs "
                             "trained on the same hook")
    if s.model and l.model and s.model != l.model:
        raise StitchingError(f"{where}: the SAEs belong to different models ({s.model} vs {l.model}); stitch only "
                             "SAEs of the same model")
    if s.d_in != l.d_in:
        raise StitchingError(f"{where}: d_in differs ({s.d_in} vs {l.d_in}); the SAEs cannot read the same activations")
    if l.width <= s.width:
        raise StitchingError(f"{where}: the 'larger' SAE has {l.width} latents, not more than the smaller one's "
                             f"{s.width}; list pairs as [smaller, larger]")


def find_pairs(infos: Sequence[SAEInfo], cfg: StitchingConfig) -> list[tuple[int, int]]:
    """The (smaller, larger) index pairs to stitch, validated (see :class:`StitchingConfig`).

    Explicit ``cfg.pairs`` are checked (index range, same hook / model / d_in, larger really
    larger) and returned as given. Otherwise every pair of SAEs on the same hook and model with the
    same architecture (and sparsity setting, unless ``pair_across_sparsity``) and width_S < width_L,
    ordered by (architecture, sparsity, widths); ``adjacent_only`` keeps for each L only the S of
    the largest smaller width.
    """
    by_index = {i.index: i for i in infos}
    if cfg.pairs is not None:
        out = []
        for s, l in cfg.pairs:
            for x in (s, l):
                if x not in by_index:
                    raise StitchingError(f"stitching.pairs names SAE #{x}, but only {len(infos)} SAEs are evaluated "
                                         f"(indices 0..{len(infos) - 1}: the family's members, then import_saes)")
            check_pair(by_index[s], by_index[l])
            out.append((int(s), int(l)))
        return out
    pairs: list[tuple[int, int]] = []
    for l in infos:
        cands = [s for s in infos if s.index != l.index and s.architecture == l.architecture and s.width < l.width
                 and s.d_in == l.d_in and s.hook == l.hook and s.model == l.model
                 and (cfg.pair_across_sparsity or s.sparsity == l.sparsity)]
        if cfg.adjacent_only and cands:
            w = max(s.width for s in cands)
            cands = [s for s in cands if s.width == w]
            same = [s for s in cands if s.sparsity == l.sparsity]
            cands = same[:1] if same else cands[:1]
        pairs += [(s.index, l.index) for s in cands]
    key = {i.index: (i.architecture, i.sparsity if i.sparsity is not None else -1.0, i.width, i.index) for i in infos}
    return sorted(pairs, key=lambda p: (key[p[1]][:2], key[p[0]][2], key[p[1]][2], p))


def adjacent_pair_for(large: int, pairs: Sequence[tuple[int, int]], infos: Sequence[SAEInfo]) -> tuple[int, int] | None:
    """The pair whose larger SAE is ``large`` and whose smaller one is the widest (same sparsity first)."""
    by_index = {i.index: i for i in infos}
    cands = [p for p in pairs if p[1] == large]
    if not cands:
        return None
    lw = by_index[large]
    return max(cands, key=lambda p: (by_index[p[0]].width, by_index[p[0]].sparsity == lw.sparsity, -p[0]))


# ------------------------------------------------------------------------------ JumpReLU form
def make_jumprelu(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, threshold: Tensor) -> JumpReLUSAE:
    """A :class:`JumpReLUSAE` (from the one registry) holding exactly these tensors."""
    d_in, n = W_enc.shape
    if W_dec.shape != (n, d_in) or b_enc.shape != (n,) or b_dec.shape != (d_in,) or threshold.shape != (n,):
        raise StitchingError(f"inconsistent JumpReLU tensors: W_enc {tuple(W_enc.shape)}, b_enc {tuple(b_enc.shape)}, "
                             f"W_dec {tuple(W_dec.shape)}, b_dec {tuple(b_dec.shape)}, threshold {tuple(threshold.shape)}")
    if n == 0:
        raise StitchingError("a stitched SAE needs at least one latent")
    cfg = SAEConfig(architecture="jumprelu", width=int(n), normalize_activations="none")
    sae = JumpReLUSAE(cfg, int(d_in), seed=0).to(W_enc.device)
    sae.load_inference_tensors({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": threshold})
    return sae


@torch.no_grad()
def jumprelu_parts(sae: BaseSAE) -> dict[str, Tensor]:
    """``W_enc, b_enc, W_dec, b_dec`` (and ``threshold`` unless TopK) of ``sae``'s JumpReLU form in
    its own units: ``h = (x - b_dec) W_enc + b_enc`` equals the SAE's pre-activation that is
    compared (the TopK selection / BatchTopK threshold, decoder-norm rescaling included) and
    ``x̂ = f W_dec + b_dec``. TopK SAEs have no ``threshold`` (see :func:`topk_thresholds`)."""
    W_enc, b_enc = sae.W_enc.detach().float(), sae.b_enc.detach().float()
    W_dec, b_dec = sae.W_dec.detach().float(), sae.b_dec.detach().float()
    if isinstance(sae, TopKSAE):  # TopK, BatchTopK, Matryoshka
        if sae.rescale:
            n = W_dec.norm(dim=-1)
            W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n.clamp_min(1e-8)[:, None]
        out = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        if isinstance(sae, BatchTopKSAE):
            out["threshold"] = torch.full_like(b_enc, float(sae.topk_threshold))
        return out
    if isinstance(sae, JumpReLUSAE):
        return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": sae.threshold.detach().float()}
    if isinstance(sae, StandardSAE):
        return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": torch.zeros_like(b_enc)}
    raise StitchingError(f"no JumpReLU inference form for a {type(sae).__name__} ({sae.architecture!r}) SAE")


@torch.no_grad()
def topk_thresholds(sae: TopKSAE, calibration: Tensor, mode: str = "per_latent", latent_chunk: int = 512,
                    row_chunk: int = 2048) -> Tensor:
    """Thresholds (in :func:`jumprelu_parts` units) under which the JumpReLU form of a TopK SAE
    fires like the TopK SAE on the ``calibration`` rows [N, d_in].

    ``per_latent``: latent j fires on c_j rows under TopK; θ_j lies midway between its c_j-th and
    (c_j + 1)-th largest pre-activation (clamped >= 0), so ``h > θ_j`` holds on exactly c_j rows
    (ties aside): each latent keeps its density and the mean L0 equals TopK's. A latent that never
    fires under TopK (dead) gets θ = :data:`NEVER`, so it stays dead (its pre-activation on an
    outlier row could exceed any finite calibration value). ``global``: one θ, the (T + 1)-th largest positive pre-activation over all
    (row, latent) entries, T = total TopK firings: the mean L0 matches, densities may shift.
    """
    if type(sae) is not TopKSAE:
        raise StitchingError(f"topk_thresholds needs a TopK SAE, got {type(sae).__name__}")
    if mode not in ("per_latent", "global"):
        raise StitchingError(f"unknown topk_threshold mode {mode!r}: use 'per_latent' or 'global'")
    x = calibration.to(sae.device, torch.float32)
    if x.ndim != 2 or x.shape[1] != sae.d_in or x.shape[0] < 1:
        raise StitchingError(f"calibration rows must be [N >= 1, {sae.d_in}], got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise StitchingError("calibration activations hold NaN/inf values")
    N = x.shape[0]
    counts = torch.zeros(sae.d_sae, dtype=torch.int64, device=x.device)
    for s in range(0, N, row_chunk):
        counts += (sae.encode(x[s:s + row_chunk]) > 0).sum(dim=0)
    p = jumprelu_parts(sae)
    xc = x - p["b_dec"]
    if mode == "per_latent":
        theta = torch.empty(sae.d_sae, device=x.device)
        for lo in range(0, sae.d_sae, latent_chunk):
            hi = min(lo + latent_chunk, sae.d_sae)
            h = xc @ p["W_enc"][:, lo:hi] + p["b_enc"][lo:hi]  # [N, chunk]
            srt = h.sort(dim=0, descending=True).values
            c = counts[lo:hi]
            below = srt.gather(0, c.clamp(max=N - 1)[None, :])[0]  # (c+1)-th largest: must not fire
            above = srt.gather(0, (c - 1).clamp(min=0)[None, :])[0]  # c-th largest: must fire
            # midway, so float rounding of the folded form cannot flip the boundary rows
            th = torch.where(c > 0, 0.5 * (below + above), torch.full_like(below, NEVER))
            theta[lo:hi] = torch.where(c >= N, torch.zeros_like(th), th)
        return theta.clamp_min(0.0)
    total = int(counts.sum())
    keep = total + 1
    best = torch.empty(0, device=x.device)
    for s in range(0, N, max(1, row_chunk // 4)):
        h = (xc[s:s + max(1, row_chunk // 4)] @ p["W_enc"] + p["b_enc"]).relu().flatten()
        cand = torch.cat([best, h])
        best = cand.topk(min(keep, cand.numel()), sorted=False).values
    if best.numel() >= keep and keep >= 2:  # midway between the T-th and (T+1)-th largest
        th = float(best.topk(2, largest=False).values.mean())
    else:
        th = 0.0
    return torch.full((sae.d_sae,), max(th, 0.0), device=x.device)


@torch.no_grad()
def to_jumprelu(sae: BaseSAE, calibration: Tensor | None = None, topk_mode: str = "per_latent") -> JumpReLUSAE:
    """The JumpReLU inference form of ``sae`` with unit-norm decoder rows (module docstring).

    ``calibration`` rows are needed for TopK SAEs only. Folding ``||W_dec_j||`` into W_enc, b_enc
    and θ changes no latent's on/off decision and no reconstruction.
    """
    p = jumprelu_parts(sae)
    if "threshold" not in p:
        if calibration is None:
            raise StitchingError("a TopK SAE needs calibration activations to get JumpReLU thresholds")
        p["threshold"] = topk_thresholds(sae, calibration, topk_mode)  # type: ignore[arg-type]
    m = p["W_dec"].norm(dim=-1).clamp_min(1e-8)
    return make_jumprelu(p["W_enc"] * m, p["b_enc"] * m, p["W_dec"] / m[:, None], p["b_dec"], p["threshold"] * m)


def _require_jumprelu(sae: BaseSAE, name: str) -> JumpReLUSAE:
    if not isinstance(sae, JumpReLUSAE):
        raise StitchingError(f"{name} must be an SAE in JumpReLU inference form (see to_jumprelu), got "
                             f"{type(sae).__name__}")
    return sae


@torch.no_grad()
def unit_decoder(sae: BaseSAE) -> tuple[Tensor, Tensor]:
    """``(U, m)``: the SAE's effective decoder rows at unit norm and their norms, so that its
    reconstruction is ``sum_j (f_j m_j) U_j + b_dec`` (TopK rescaling included)."""
    D = jumprelu_parts(sae)["W_dec"]
    m = D.norm(dim=-1).clamp_min(1e-8)
    return D / m[:, None], m


@torch.no_grad()
def unit_acts(sae: BaseSAE, x: Tensor, m: Tensor | None = None) -> Tensor:
    """The SAE's own latent activations of ``x``, in the units of :func:`unit_decoder` (``f * m``)."""
    if m is None:
        m = unit_decoder(sae)[1]
    return sae.encode(x) * m


@torch.no_grad()
def inserted_acts(small: BaseSAE, large: BaseSAE, x: Tensor, adjust_encoder_bias: bool = True,
                  m: Tensor | None = None) -> Tensor:
    """Activations [B, n_L] (unit-decoder units) of L's latents inside S. ``adjust_encoder_bias``:
    exactly their activations in L. Otherwise L's encoder sees S's ``b_dec`` instead of its own
    (it encodes ``x - b_dec_S + b_dec_L``; for a JumpReLU SAE this is keeping L's raw ``b_enc``)."""
    if not adjust_encoder_bias:
        x = x - small.b_dec.detach() + large.b_dec.detach()
    return unit_acts(large, x, m)


class StitchedSAE(SAEShape, torch.nn.Module):
    """S's kept latents and L's included latents, each with the activation it has in its own SAE
    (TopK selection and all), decoded with unit-norm rows and S's ``b_dec``: the stitched SAE of the
    ``native`` form. Offers what the metrics code needs (``encode``, ``decode``, ``W_enc``,
    ``W_dec``, ``d_in``, ``d_sae``)."""

    def __init__(self, small: BaseSAE, large: BaseSAE, keep_small: np.ndarray, include_large: np.ndarray,
                 adjust_encoder_bias: bool = True) -> None:
        super().__init__()
        self.small, self.large = small, large
        dev = small.W_dec.device
        large.to(dev)
        us, ms = unit_decoder(small)
        ul, ml = unit_decoder(large)
        ks = torch.as_tensor(np.flatnonzero(keep_small), device=dev)
        il = torch.as_tensor(np.flatnonzero(include_large), device=dev)
        if ks.numel() + il.numel() == 0:
            raise StitchingError("a stitched SAE needs at least one latent")
        ps, pl = jumprelu_parts(small), jumprelu_parts(large)
        self.register_buffer("keep_idx", ks)
        self.register_buffer("incl_idx", il)
        self.register_buffer("m_small", ms[ks])
        self.register_buffer("m_large", ml[il])
        self.register_buffer("W_dec", torch.cat([us[ks], ul[il]]))
        self.register_buffer("W_enc", torch.cat([ps["W_enc"][:, ks] * ms[ks], pl["W_enc"][:, il] * ml[il]], dim=1))
        self.register_buffer("b_dec", small.b_dec.detach().float().clone())
        shift = torch.zeros_like(self.b_dec) if adjust_encoder_bias else large.b_dec.detach().float() - self.b_dec
        self.register_buffer("shift", shift)

    def encode(self, x: Tensor) -> Tensor:
        fs = self.small.encode(x).index_select(-1, self.keep_idx) * self.m_small
        fl = self.large.encode(x + self.shift.to(x.dtype)).index_select(-1, self.incl_idx) * self.m_large
        return torch.cat([fs, fl], dim=-1)

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec.to(f.dtype) + self.b_dec.to(f.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


# ------------------------------------------------------------------------------ similarity
@torch.no_grad()
def decoder_cosines(small: BaseSAE, large: BaseSAE, chunk_rows: int = 2048) -> tuple[Tensor, Tensor]:
    """``(s, match)`` [n_L]: max cosine of each L decoder row to any S decoder row, and its argmax."""
    if small.d_in != large.d_in:
        raise StitchingError(f"decoder widths differ: S has d_in={small.d_in}, L has d_in={large.d_in}")
    us = small.W_dec.detach().float()
    us = us / us.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    ul = large.W_dec.detach().float().to(us.device)
    ul = ul / ul.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s = torch.empty(ul.shape[0], device=us.device)
    match = torch.empty(ul.shape[0], dtype=torch.int64, device=us.device)
    for lo in range(0, ul.shape[0], chunk_rows):
        c = ul[lo:lo + chunk_rows] @ us.T
        v, i = c.max(dim=1)
        s[lo:lo + chunk_rows], match[lo:lo + chunk_rows] = v, i
    return s, match


# ------------------------------------------------------------------------------ ground truth
def _inserted_bias(small: JumpReLUSAE, large: JumpReLUSAE, adjust: bool) -> Tensor:
    """L's encoder bias as used inside S (S's b_dec): re-centred when ``adjust``."""
    b = large.b_enc.detach().float()
    if adjust:
        b = b + (small.b_dec.detach().float() - large.b_dec.detach().float()) @ large.W_enc.detach().float()
    return b


@torch.no_grad()
def insertion_delta_mse(small: BaseSAE, large: BaseSAE, rows: Iterable[Tensor], adjust_encoder_bias: bool = True,
                        latent_chunk: int = 4096) -> dict[str, Any]:
    """Single-insertion ΔMSE of every L latent into S, batched (module docstring, step 3).

    ``rows`` yields [B, d_in] activation batches. Works for any pair of registry SAEs: each latent
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
        r = x - S(x)
        se_small += float(r.double().pow(2).sum())
        f_all = inserted_acts(S, L, x, adjust_encoder_bias, ml)  # [B, n_L]
        for lo in range(0, L.d_sae, latent_chunk):
            hi = min(lo + latent_chunk, L.d_sae)
            f = f_all[:, lo:hi]
            proj = r @ UL[lo:hi].T  # [B, c]; ||U_j|| = 1
            dse[lo:hi] += -2.0 * (f * proj).sum(dim=0).double() + f.pow(2).sum(dim=0).double()
            fires[lo:hi] += (f != 0).sum(dim=0)
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
    """ROC AUC of ``-max_cos`` as a score for ``novel`` among active latents (ties count 1/2); NaN
    when one class is empty."""
    s, c = np.asarray(max_cos, dtype=np.float64), np.asarray(classes)
    active = c != INACTIVE
    s, y = -s[active], c[active] == NOVEL
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(s).rank(method="average").to_numpy()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


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


# ------------------------------------------------------------------------------ interpolation
@dataclass
class Event:
    """One step from S towards L: add these L latents, remove these S latents (``finish``: also
    switch to L's ``b_dec`` and biases, which yields L itself)."""

    kind: str  # "insert" | "swap" | "finish"
    add: list[int] = field(default_factory=list)
    remove: list[int] = field(default_factory=list)


def interpolation_events(classes: np.ndarray, delta_mse: np.ndarray, max_cos: np.ndarray, match: np.ndarray,
                         n_small: int, novel_order: str = "delta_mse", swap_order: str = "cosine") -> list[Event]:
    """Novel inserts, then swaps (S latent ``i`` -> the non-novel L latents with ``match_j = i``),
    then ``finish`` (the S latents nothing matched leave, ``b_dec`` becomes L's)."""
    c, d, s, m = (np.asarray(a) for a in (classes, delta_mse, max_cos, match))
    novel = np.flatnonzero(c == NOVEL)
    if novel_order == "delta_mse":
        novel = novel[np.lexsort((novel, d[novel]))]
    elif novel_order == "cosine":
        novel = novel[np.lexsort((novel, s[novel]))]
    else:
        raise StitchingError(f"unknown novel_order {novel_order!r}: use 'delta_mse' or 'cosine'")
    events = [Event("insert", add=[int(j)]) for j in novel]
    rest = np.flatnonzero(c != NOVEL)
    groups: dict[int, list[int]] = {}
    for j in rest:
        groups.setdefault(int(m[j]), []).append(int(j))
    if swap_order == "cosine":
        key = {i: (-float(s[g].max()), i) for i, g in groups.items()}
    elif swap_order == "delta_mse":
        key = {i: (float(d[g].sum()), i) for i, g in groups.items()}
    else:
        raise StitchingError(f"unknown swap_order {swap_order!r}: use 'cosine' or 'delta_mse'")
    for i in sorted(groups, key=key.__getitem__):
        events.append(Event("swap", add=groups[i], remove=[i]))
    removed = set(groups)
    events.append(Event("finish", remove=[i for i in range(n_small) if i not in removed]))
    return events


def event_states(events: Sequence[Event], n_small: int, n_large: int) -> Iterable[tuple[np.ndarray, np.ndarray, bool]]:
    """``(keep_S, incl_L, finished)`` boolean masks before any event, then after each."""
    keep, incl, done = np.ones(n_small, bool), np.zeros(n_large, bool), False
    yield keep.copy(), incl.copy(), done
    for e in events:
        keep[e.remove] = False
        incl[e.add] = True
        done = done or e.kind == "finish"
        yield keep.copy(), incl.copy(), done


@torch.no_grad()
def stitched_sae(small: BaseSAE, large: BaseSAE, keep_small: np.ndarray, include_large: np.ndarray,
                 finished: bool = False, adjust_encoder_bias: bool = True) -> torch.nn.Module:
    """The stitched SAE: S's kept latents, then L's included ones (in index order), S's ``b_dec``.

    ``finished`` returns L itself and the untouched start returns S itself. When S and L are both
    JumpReLU SAEs (the ``jumprelu`` form) it is a registry :class:`JumpReLUSAE` with concatenated
    weights (L's encoder bias re-centred for S's ``b_dec`` when ``adjust_encoder_bias``); otherwise
    a :class:`StitchedSAE` in which every latent keeps its own SAE's activation.
    """
    if finished:
        return large
    if keep_small.all() and not include_large.any():
        return small
    if not (isinstance(small, JumpReLUSAE) and isinstance(large, JumpReLUSAE)):
        return StitchedSAE(small, large, keep_small, include_large, adjust_encoder_bias)
    S, L = small, large
    ks = torch.as_tensor(np.flatnonzero(keep_small), device=S.device)
    il = torch.as_tensor(np.flatnonzero(include_large), device=S.device)
    L.to(S.device)
    bL = _inserted_bias(S, L, adjust_encoder_bias)
    return make_jumprelu(
        torch.cat([S.W_enc.detach()[:, ks], L.W_enc.detach()[:, il]], dim=1),
        torch.cat([S.b_enc.detach()[ks], bL[il]]),
        torch.cat([S.W_dec.detach()[ks], L.W_dec.detach()[il]], dim=0),
        S.b_dec.detach().clone(),
        torch.cat([S.threshold.detach()[ks], L.threshold.detach()[il]]),
    )


class _Columns:
    """Activations ``[N, n]`` stored by column (CSC-like) for cheap per-latent access."""

    def __init__(self, n_latents: int, device: torch.device) -> None:
        self.n, self.device = n_latents, device
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []

    def add(self, f: Tensor, row0: int) -> None:
        col, row = f.T.nonzero(as_tuple=True)
        self.parts.append((col, row + row0, f.T[col, row]))

    def finish(self) -> None:
        col = torch.cat([p[0] for p in self.parts])
        row = torch.cat([p[1] for p in self.parts])
        val = torch.cat([p[2] for p in self.parts])
        order = torch.argsort(col, stable=True)
        self.row, self.val = row[order], val[order].double()
        self.ptr = torch.searchsorted(col[order], torch.arange(self.n + 1, device=col.device)).tolist()
        self.parts = []

    def column(self, j: int) -> tuple[Tensor, Tensor]:
        a, b = self.ptr[j], self.ptr[j + 1]
        return self.row[a:b], self.val[a:b]


@torch.no_grad()
def event_mse_curve(small: BaseSAE, large: BaseSAE, x: Tensor, events: Sequence[Event],
                    adjust_encoder_bias: bool = True, row_chunk: int = 4096) -> np.ndarray:
    """Exact MSE (``mean_t ||x_t - x̂_t||²``) of the stitched SAE before any event and after each,
    by sparse rank-1 updates of a float64 residual (cost ~ the number of firings moved)."""
    S, L = small, large
    dev = S.W_dec.device
    x = x.to(dev, torch.float32)
    N = x.shape[0]
    L.to(dev)
    US, ms = unit_decoder(S)
    UL, ml = unit_decoder(L)
    cs, cl = _Columns(S.d_sae, dev), _Columns(L.d_sae, dev)
    resid = torch.empty(N, S.d_in, dtype=torch.float64, device=dev)
    for lo in range(0, N, row_chunk):
        xb = x[lo:lo + row_chunk]
        cs.add(unit_acts(S, xb, ms), lo)
        cl.add(inserted_acts(S, L, xb, adjust_encoder_bias, ml), lo)
        resid[lo:lo + row_chunk] = (xb - S(xb)).double()
    cs.finish()
    cl.finish()
    DS, DL = US.double(), UL.double()
    se = float(resid.pow(2).sum())
    out = [se / N]
    for e in events:
        if e.kind == "finish":
            se = 0.0
            for lo in range(0, N, row_chunk):
                xb = x[lo:lo + row_chunk]
                se += float((xb - L(xb)).double().pow(2).sum())
            out.append(se / N)
            continue
        touched = [cl.column(j)[0] for j in e.add] + [cs.column(i)[0] for i in e.remove]
        touched = [t for t in touched if t.numel()]
        if not touched:
            out.append(se / N)
            continue
        rows_all = torch.unique(torch.cat(touched))
        before = float(resid[rows_all].pow(2).sum())
        for j in e.add:
            rows, vals = cl.column(j)
            resid.index_add_(0, rows, -vals[:, None] * DL[j][None, :])
        for i in e.remove:
            rows, vals = cs.column(i)
            resid.index_add_(0, rows, vals[:, None] * DS[i][None, :])
        se += float(resid[rows_all].pow(2).sum()) - before
        out.append(se / N)
    return np.asarray(out)


def curve_points(n_events: int, n_steps: int, changes: Sequence[bool] | None = None) -> list[int]:
    """Event counts (0 = S, ``n_events`` = L) of the fully evaluated curve points, evenly spaced.

    With ``changes`` (per event: does it change the reconstruction at all?), the points are spaced
    evenly over the events that do, so swaps of latents dead on the rows (no-ops) do not use up the
    budget."""
    if changes is None:
        return sorted({int(round(p * n_events / n_steps)) for p in range(n_steps + 1)})
    after = [e + 1 for e, c in enumerate(changes) if c]
    if not after:
        return sorted({0, n_events})
    picks = {after[int(round(p * (len(after) - 1) / n_steps))] for p in range(1, n_steps + 1)}
    return sorted({0, n_events} | picks)


def changing_events(fine_mse: np.ndarray) -> np.ndarray:
    """Per event: does the exact MSE change (bitwise) across it? (No-op swaps of dead latents do not.)"""
    f = np.asarray(fine_mse)
    return f[1:] != f[:-1]


def count_violations(values: Sequence[float], rel_tol: float = 1e-6) -> int:
    """Steps at which ``values`` rises by more than ``rel_tol`` of the previous value (the default
    ignores float32 rounding, e.g. a swap of two identical latents)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return 0
    return int(np.sum(v[1:] > v[:-1] + rel_tol * np.abs(v[:-1])))


# ------------------------------------------------------------------------------ plots
def plot_max_cos_histograms(pairs: Sequence[dict[str, Any]], path: str | Path, bins: int = 40) -> Path:
    """One panel per pair: histogram of each L latent's max cosine to S, novel vs reconstruction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    n = max(len(pairs), 1)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=110, squeeze=False)
    edges = np.linspace(-0.1, 1.0, bins + 1)
    for ax, p in zip(axes.flat, pairs):
        s, c = np.asarray(p["max_cos"]), np.asarray(p["classes"])
        lo = min(float(s.min()) if s.size else 0.0, -0.1)
        e = np.linspace(lo, 1.0, bins + 1) if lo < -0.1 else edges
        for cls, color in ((RECONSTRUCTION, "tab:blue"), (NOVEL, "tab:orange"), (INACTIVE, "tab:gray")):
            sel = s[c == cls]
            if sel.size:
                ax.hist(sel, bins=e, alpha=0.6, color=color, label=f"{cls} ({sel.size})")
        ax.set_title(p["title"], fontsize=8)
        ax.set_xlabel("max cosine to smaller SAE's decoder")
        ax.set_ylabel("L latents")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_interpolation(curves: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Per pair: exact MSE after every event (line) and the fully evaluated points (markers), and CE
    loss at those points, against the fraction of the path from S (0) to L (1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    has_ce = any(c.get("ce") is not None and np.isfinite(np.asarray(c["ce"], dtype=float)).any() for c in curves)
    fig, axes = plt.subplots(1, 2 if has_ce else 1, figsize=(11 if has_ce else 6, 4), dpi=110, squeeze=False)
    cmap = plt.get_cmap("tab10")
    for k, c in enumerate(curves):
        fine = np.asarray(c["fine_mse"])
        t = np.linspace(0, 1, fine.size)
        axes[0, 0].plot(t, fine, color=cmap(k % 10), lw=1.0, label=c["title"])
        pts = np.asarray(c["points"]) / max(fine.size - 1, 1)
        axes[0, 0].plot(pts, c["mse"], "o", color=cmap(k % 10), ms=3)
        if has_ce:
            axes[0, 1].plot(pts, c["ce"], "o-", color=cmap(k % 10), ms=3, label=c["title"])
    axes[0, 0].set_xlabel("fraction of stitching events (S -> L)")
    axes[0, 0].set_ylabel("MSE (held-out)")
    axes[0, 0].set_title("reconstruction error along the interpolation")
    axes[0, 0].legend(fontsize=6)
    axes[0, 0].grid(alpha=0.3)
    if has_ce:
        axes[0, 1].set_xlabel("fraction of stitching events (S -> L)")
        axes[0, 1].set_ylabel("CE loss with stitched SAE spliced in")
        axes[0, 1].grid(alpha=0.3)
        axes[0, 1].set_title("CE loss along the interpolation")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def evaluate_curve(small: BaseSAE, large: BaseSAE, events: Sequence[Event], points: Sequence[int],
                   evaluate: Callable[[BaseSAE], dict[str, Any]], adjust_encoder_bias: bool = True) -> pd.DataFrame:
    """Build the stitched SAE after ``p`` events for each ``p`` in ``points`` and ``evaluate`` it;
    one row per point with ``events_done``, ``n_latents``, ``n_small_kept``, ``n_large_included``
    and whatever ``evaluate`` returns (scalars only)."""
    want = set(points)
    rows = []
    for p, (keep, incl, done) in enumerate(event_states(events, small.d_sae, large.d_sae)):
        if p not in want:
            continue
        sae = stitched_sae(small, large, keep, incl, done, adjust_encoder_bias)
        res = evaluate(sae)
        rows.append({"events_done": p, "n_latents": int(sae.d_sae), "n_small_kept": 0 if done else int(keep.sum()),
                     "n_large_included": int(large.d_sae) if done else int(incl.sum()),
                     **{k: v for k, v in res.items() if isinstance(v, (int, float))}})
    return pd.DataFrame(rows)
