"""JumpReLU inference forms of SAEs, and stitched SAEs (:mod:`saeflow.evals.stitching`, steps 1 and 4).

Every latent is used with a unit-norm decoder row and its activation scaled accordingly
(``f_j ||d_j||``, :func:`unit_decoder` / :func:`unit_acts`), which changes no reconstruction.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from saeflow.evals.stitching.pairing import StitchingError
from saeflow.saes import BaseSAE, BatchTopKSAE, JumpReLUSAE, SAEConfig, StandardSAE, TopKSAE
from saeflow.saes.base import encode_block_rows, without_init

__all__ = ["NEVER", "make_jumprelu", "jumprelu_parts", "topk_thresholds", "to_jumprelu", "unit_decoder", "unit_acts",
           "inserted_acts", "StitchedSAE", "stitched_sae"]

#: Threshold of a latent that must never fire (finite, so the SAE can be saved).
NEVER = 1e30


def make_jumprelu(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, threshold: Tensor) -> JumpReLUSAE:
    """A :class:`JumpReLUSAE` (from the one registry) holding exactly these tensors: ``W_enc`` and
    ``W_dec`` become its parameters without a copy (a 262k-latent form is held once), so pass
    tensors nothing else changes."""
    d_in, n = W_enc.shape
    if W_dec.shape != (n, d_in) or b_enc.shape != (n,) or b_dec.shape != (d_in,) or threshold.shape != (n,):
        raise StitchingError(f"inconsistent JumpReLU tensors: W_enc {tuple(W_enc.shape)}, b_enc {tuple(b_enc.shape)}, "
                             f"W_dec {tuple(W_dec.shape)}, b_dec {tuple(b_dec.shape)}, threshold {tuple(threshold.shape)}")
    if n == 0:
        raise StitchingError("a stitched SAE needs at least one latent")
    cfg = SAEConfig(architecture="jumprelu", width=int(n), normalize_activations="none")
    with without_init():
        sae = JumpReLUSAE(cfg, int(d_in), seed=0).to(W_enc.device)
    sae.load_inference_tensors({"W_enc": W_enc, "b_enc": b_enc.clone(), "W_dec": W_dec, "b_dec": b_dec.clone(),
                                "threshold": threshold}, take=True)
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
                    row_chunk: int = 2048, parts: dict[str, Tensor] | None = None) -> Tensor:
    """Thresholds (in :func:`jumprelu_parts` units) under which the JumpReLU form of a TopK SAE
    fires like the TopK SAE on the ``calibration`` rows [N, d_in].

    ``per_latent``: latent j fires on c_j rows under TopK; θ_j lies midway between its c_j-th and
    (c_j + 1)-th largest pre-activation (clamped >= 0), so ``h > θ_j`` holds on exactly c_j rows
    (ties aside): each latent keeps its density and the mean L0 equals TopK's. A latent that never
    fires under TopK (dead) gets θ = :data:`NEVER`, so it stays dead (its pre-activation on an
    outlier row could exceed any finite calibration value). ``global``: one θ, the (T + 1)-th largest positive pre-activation over all
    (row, latent) entries, T = total TopK firings: the mean L0 matches, densities may shift.
    ``parts``: :func:`jumprelu_parts` of ``sae`` when the caller has them (not built twice).
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
    step = encode_block_rows(sae.d_sae, row_chunk)
    for s in range(0, N, step):
        counts += (sae.encode(x[s:s + step]) > 0).sum(dim=0)
    p = jumprelu_parts(sae) if parts is None else parts
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
    """The JumpReLU inference form of ``sae`` with unit-norm decoder rows (:mod:`saeflow.evals.stitching`, step 1).

    ``calibration`` rows are needed for TopK SAEs only. Folding ``||W_dec_j||`` into W_enc, b_enc
    and θ changes no latent's on/off decision and no reconstruction.
    """
    p = jumprelu_parts(sae)
    if "threshold" not in p:
        if calibration is None:
            raise StitchingError("a TopK SAE needs calibration activations to get JumpReLU thresholds")
        p["threshold"] = topk_thresholds(sae, calibration, topk_mode, parts=p)  # type: ignore[arg-type]
    m = p["W_dec"].norm(dim=-1).clamp_min(1e-8)
    W_enc = p.pop("W_enc") * m  # popped: a rescaled copy is freed before the next one is made
    W_dec = p.pop("W_dec") / m[:, None]
    return make_jumprelu(W_enc, p["b_enc"] * m, W_dec, p["b_dec"], p["threshold"] * m)


@torch.no_grad()
def unit_decoder(sae: BaseSAE) -> tuple[Tensor, Tensor]:
    """``(U, m)``: the SAE's effective decoder rows at unit norm and their norms, so that its
    reconstruction is ``sum_j (f_j m_j) U_j + b_dec`` (TopK rescaling included)."""
    if isinstance(sae, TopKSAE):  # jumprelu_parts' decoder alone (no rescaled encoder copy of a wide SAE)
        D = sae.W_dec.detach().float()
        if sae.rescale:
            D = D / D.norm(dim=-1).clamp_min(1e-8)[:, None]
    else:
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


class StitchedSAE(torch.nn.Module):
    """S's kept latents and L's included latents, each with the activation it has in its own SAE
    (TopK selection and all), decoded with unit-norm rows and S's ``b_dec``: the stitched SAE of the
    ``native`` form. Offers what the metrics code needs (``encode``, ``decode``, ``W_enc`` (built on
    request), ``W_dec``, ``d_in``, ``d_sae``)."""

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
        self.register_buffer("keep_idx", ks)
        self.register_buffer("incl_idx", il)
        self.register_buffer("m_small", ms[ks])
        self.register_buffer("m_large", ml[il])
        self.register_buffer("W_dec", torch.cat([us[ks], ul[il]]))
        del us, ul
        self.register_buffer("b_dec", small.b_dec.detach().float().clone())
        shift = torch.zeros_like(self.b_dec) if adjust_encoder_bias else large.b_dec.detach().float() - self.b_dec
        self.register_buffer("shift", shift)
        self.d_sae, self.d_in = (int(n) for n in self.W_dec.shape)  # fixed: the buffers are never replaced

    @property
    def W_enc(self) -> Tensor:
        """The latents' encoder columns in unit-decoder units, built on request (not held: the
        encoding is S's and L's own)."""
        ps, pl = jumprelu_parts(self.small), jumprelu_parts(self.large)
        return torch.cat([ps["W_enc"][:, self.keep_idx] * self.m_small, pl["W_enc"][:, self.incl_idx] * self.m_large], dim=1)

    def encode(self, x: Tensor) -> Tensor:
        step = encode_block_rows(max(self.small.d_sae, self.large.d_sae), x.shape[0])  # S and L encode all their latents
        if x.ndim == 2 and step < x.shape[0]:
            return torch.cat([self.encode(x[s:s + step]) for s in range(0, x.shape[0], step)])
        fs = self.small.encode(x).index_select(-1, self.keep_idx) * self.m_small
        fl = self.large.encode(x + self.shift.to(x.dtype)).index_select(-1, self.incl_idx) * self.m_large
        return torch.cat([fs, fl], dim=-1)

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec.to(f.dtype) + self.b_dec.to(f.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def _inserted_bias(small: JumpReLUSAE, large: JumpReLUSAE, adjust: bool) -> Tensor:
    """L's encoder bias as used inside S (S's b_dec): re-centred when ``adjust``."""
    b = large.b_enc.detach().float()
    if adjust:
        b = b + (small.b_dec.detach().float() - large.b_dec.detach().float()) @ large.W_enc.detach().float()
    return b


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
