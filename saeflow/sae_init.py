"""Data-dependent initialisation and dead-latent resampling for SAE training.

Why this module exists (measured in ``docs/training.md``): on Gemma 3 270M's residual stream most
of ``E||x||^2`` is one shared offset (the mean vector). With SAELens' init (``b_dec = 0``, encoder =
decoder transpose) every token's pre-activations are dominated by that offset, so nearly the same
latents win the top-k for every token at step 0; the others never receive a gradient and stay dead.

- :func:`geometric_median` (Weiszfeld, as dictionary_learning's TopK / BatchTopK trainers use for
  ``b_dec``) and :func:`b_dec_from_sample` turn a sample of activations into the initial ``b_dec``.
- :func:`sample_rows` draws that sample from an activation store (seeded, spread over the training
  rows), refusing a store too small for it.
- :func:`resample_dead_latents` re-initialises dead latents toward badly reconstructed inputs
  (Anthropic's "Towards Monosemanticity" recipe as dictionary_learning's ``StandardTrainer``
  implements it) and clears their Adam state.

Everything here is pure torch/numpy and deterministic for a given input and seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from saeflow.saes import BaseSAE, SAEConfig
    from saeflow.store import ActivationStore

__all__ = [
    "BDecInit",
    "InitDataError",
    "geometric_median",
    "b_dec_from_sample",
    "sample_rows",
    "resample_dead_latents",
    "b_enc_for_target_l0",
    "init_biases",
    "MIN_INIT_ROWS",
]

BDecInit = Literal["zeros", "mean", "geometric_median"]

#: Fewest rows a ``b_dec`` estimate may come from: below that the estimate is noise.
MIN_INIT_ROWS = 256


class InitDataError(ValueError):
    """The activations offered for a data-dependent initialisation cannot give one."""


@torch.no_grad()
def geometric_median(x: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """The geometric median of the rows of ``x`` ``[n, d]`` (Weiszfeld's algorithm, float64).

    Starts from the mean; each iteration re-weights the rows by ``1 / ||x_i - m||`` (distances
    floored at 1e-8 relative to the data scale) and stops after ``max_iter`` iterations or when
    the update moves less than ``tol`` relative to the data scale (dictionary_learning: 100
    iterations, tol 1e-5).
    """
    if x.ndim != 2 or x.shape[0] < 1:
        raise InitDataError(f"geometric_median needs a non-empty [n, d] tensor, got shape {tuple(x.shape)}")
    xd = x.detach().to("cpu", torch.float64)
    m = xd.mean(dim=0)
    scale = float(xd.norm(dim=1).mean()) or 1.0
    floor = 1e-8 * scale
    for _ in range(max_iter):
        dist = (xd - m).norm(dim=1).clamp_min(floor)
        w = 1.0 / dist
        new = (w[:, None] * xd).sum(dim=0) / w.sum()
        moved = float((new - m).norm())
        m = new
        if moved <= tol * scale:
            break
    return m.to(torch.float32)


def _check_sample(x: torch.Tensor, what: str) -> None:
    if x.ndim != 2:
        raise InitDataError(f"{what}: expected a [rows, d_in] sample, got shape {tuple(x.shape)}")
    if x.shape[0] < MIN_INIT_ROWS:
        raise InitDataError(
            f"{what}: only {x.shape[0]} activation rows to estimate b_dec from (need >= {MIN_INIT_ROWS}); "
            "extract more contexts (corpus.n_contexts) or set sae.b_dec_init: zeros"
        )
    if not torch.isfinite(x).all():
        raise InitDataError(f"{what}: NaN/inf in the activation sample; the store is corrupt: delete it and re-extract")
    xd = x.detach().to("cpu", torch.float64)
    spread = float((xd - xd.mean(dim=0)).abs().max())
    scale = float(xd.abs().max())
    if not spread > 1e-6 * scale:
        raise InitDataError(
            f"{what}: every sampled activation row is identical (constant activations): an SAE cannot learn "
            "anything from them; check the hook (activations.hook) and the model, then re-extract"
        )


def b_dec_from_sample(x: torch.Tensor, method: BDecInit) -> torch.Tensor | None:
    """Initial ``b_dec`` ``[d_in]`` from a sample ``x`` ``[n, d_in]`` (``None`` for ``zeros``).

    ``mean`` is the row mean; ``geometric_median`` the Weiszfeld median. Raises
    :class:`InitDataError` for too few rows, non-finite or constant activations.
    """
    if method == "zeros":
        return None
    _check_sample(x, f"b_dec_init={method!r}")
    xd = x.detach().to("cpu", torch.float32)
    if method == "mean":
        return xd.double().mean(dim=0).float()
    if method == "geometric_median":
        return geometric_median(xd)
    raise ValueError(f"unknown b_dec_init {method!r}; choose zeros, mean or geometric_median")


@torch.no_grad()
def b_enc_for_target_l0(sae: "BaseSAE", x: torch.Tensor, target_l0: float, block_elements: int = 1 << 26) -> torch.Tensor:
    """``b_enc`` ``[d_sae]`` that makes every latent of ``sae`` fire on the same share of the rows ``x``
    (``[n, d_in]``, already in the SAE's input space: normalised as training feeds it), ``target_l0 /
    d_sae`` of them, so the initial L0 on ``x`` is ~``target_l0`` and no latent starts silent
    [Anthropic, Circuits Updates January 2025, JumpReLU training: ``b_enc`` initialised so that each
    feature is active ``10,000 / m`` of the time, ``m`` features].

    Latent ``i`` fires where ``(x - b_dec) @ W_enc[:, i] + b_enc_i`` exceeds its threshold (θ_i for
    JumpReLU, 0 for ReLU): ``b_enc_i = θ_i - (v_m + v_{m+1}) / 2`` with ``v_j`` the j-th largest
    of ``(x - b_dec) @ W_enc[:, i]`` and ``m = round(n * target_l0 / d_sae)`` (clipped to
    ``[1, n - 1]``), so exactly ``m`` rows fire barring ties. Computed in column blocks of at most
    ``block_elements`` values.
    """
    n = int(x.shape[0])
    if n < 2:
        raise InitDataError(f"b_enc_init 'target_l0' needs >= 2 sample rows, got {n}")
    width = int(sae.W_dec.shape[0])
    m = min(max(int(round(n * float(target_l0) / width)), 1), n - 1)
    theta = getattr(sae, "threshold", None)
    xc = x.to(sae.W_enc.device, torch.float32) - sae.b_dec.detach().float()
    out = torch.empty(width, dtype=torch.float32, device=sae.W_enc.device)
    cols = max(1, block_elements // n)
    for lo in range(0, width, cols):
        h = xc @ sae.W_enc.detach()[:, lo:lo + cols].float()
        top = h.topk(m + 1, dim=0).values  # [m + 1, cols], descending
        cut = (top[m - 1] + top[m]) / 2
        base = theta.detach()[lo:lo + cols].float() if theta is not None else torch.zeros_like(cut)
        out[lo:lo + cols] = base - cut
    return out


@torch.no_grad()
def init_biases(sae: "BaseSAE", cfg: "SAEConfig", sample: torch.Tensor, scale: float | None,
                b_dec_cache: dict[str, torch.Tensor | None], source: str) -> dict | None:
    """Write the data-dependent biases of a new SAE from ``sample`` (raw rows ``[n, d_in]``): ``b_dec``
    by ``cfg.b_dec_init`` (computed once per method into ``b_dec_cache``, scaled by the member's
    normalisation ``scale``), then ``b_enc`` by ``cfg.b_enc_init`` on the normalised rows (after
    ``b_dec``: the bias is set on the pre-activations the SAE will train on). Returns the record
    kept in ``cfg.json`` (``training_info.b_dec_init``, with ``b_enc`` inside), ``None`` when
    neither applies."""
    factor = scale if scale is not None else 1.0
    info: dict | None = None
    if cfg.b_dec_init != "zeros":
        if cfg.b_dec_init not in b_dec_cache:
            b_dec_cache[cfg.b_dec_init] = b_dec_from_sample(sample.float(), cfg.b_dec_init)
        b = b_dec_cache[cfg.b_dec_init]
        assert b is not None
        sae.b_dec.copy_((b * factor).to(sae.b_dec.device))
        info = {"method": cfg.b_dec_init, "rows": int(sample.shape[0]), "norm": float(b.double().norm()), "source": source}
    if cfg.b_enc_from_sample:
        target = float(cfg.target_l0)  # type: ignore[arg-type]  # b_enc_from_sample implies it
        sae.b_enc.copy_(b_enc_for_target_l0(sae, sample.float().to(sae.W_enc.device) * factor, target))
        info = {**(info or {}), "b_enc": {"method": "target_l0", "target_l0": target, "rows": int(sample.shape[0])}}
    return info


def sample_rows(store: "ActivationStore", n_rows: int, seed: int) -> torch.Tensor:
    """``n_rows`` training rows of ``store`` as float32 ``[n, d]``: whole chunks, seeded, spread over the store.

    Chunks are drawn without replacement (seeded) until ``n_rows`` rows are collected, then cut to
    ``n_rows``; reading whole chunks keeps it one sequential read per chunk. Raises
    :class:`InitDataError` when the store's training rows are fewer than :data:`MIN_INIT_ROWS`.
    """
    total = int(store.train_rows)
    if total < MIN_INIT_ROWS:
        raise InitDataError(
            f"activation store {store.root} has {total} training rows; the b_dec initialisation needs >= "
            f"{MIN_INIT_ROWS}: extract more contexts (corpus.n_contexts) or set sae.b_dec_init: zeros"
        )
    n = min(int(n_rows), total)
    c = int(store.chunk_rows)
    starts = list(range(0, total, c))
    order = np.random.default_rng([int(seed), 7]).permutation(len(starts))
    parts, got = [], 0
    for i in order:
        s = starts[i]
        part = store.read(s, min(s + c, total))
        parts.append(part)
        got += part.shape[0]
        if got >= n:
            break
    return torch.from_numpy(np.concatenate(parts)[:n].astype(np.float32, copy=False))


@torch.no_grad()
def resample_dead_latents(sae: "BaseSAE", dead: torch.Tensor, x: torch.Tensor, optimizer: torch.optim.Optimizer,
                          generator: torch.Generator, encoder_scale: float = 0.2) -> int:
    """Re-initialise the latents marked ``dead`` (bool ``[d_sae]``) toward badly reconstructed rows of ``x``.

    After Anthropic's "Towards Monosemanticity" resampling (also in dictionary_learning's
    ``StandardTrainer``, which weights rows by ``||x - x̂||``): rows are drawn with probability
    proportional to the square of their loss ``||x - x̂||^2`` (Anthropic's wording), without
    replacement unless there are more dead latents than rows. Each dead latent gets the unit
    direction of its row's centred input ``x - b_dec``: the decoder row becomes that direction
    times the mean alive decoder norm, the encoder column the direction times ``encoder_scale``
    times the mean alive encoder norm, the encoder bias 0 (JumpReLU keeps its threshold). The Adam
    moments of every touched entry are zeroed. ``x`` is the (normalised) training batch. Returns
    the number of latents resampled.
    """
    idx = dead.nonzero().squeeze(1)
    n = int(idx.numel())
    if n == 0:
        return 0
    x = x.to(sae.W_dec.device, torch.float32)
    err = (sae(x) - x).pow(2).sum(dim=-1)
    weights = err.pow(2).double().cpu()
    if not torch.isfinite(weights).all() or float(weights.sum()) <= 0:
        weights = torch.ones_like(weights)
    rows = torch.multinomial(weights, n, replacement=n > x.shape[0], generator=generator).to(x.device)
    d = x[rows] - sae.b_dec
    d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    alive = ~dead
    dec_norm = sae.W_dec.norm(dim=-1)
    enc_norm = sae.W_enc.norm(dim=0)
    if bool(alive.any()):
        dec_n, enc_n = float(dec_norm[alive].mean()), float(enc_norm[alive].mean())
    else:
        dec_n, enc_n = float(dec_norm.mean()), float(enc_norm.mean())
    sae.W_dec[idx] = d * dec_n
    sae.W_enc[:, idx] = (d * (enc_n * encoder_scale)).T
    sae.b_enc[idx] = 0.0
    for p, sl in ((sae.W_dec, (idx,)), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))):
        state = optimizer.state.get(p)
        if not state:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][sl] = 0.0
    return n
