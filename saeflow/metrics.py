"""Core SAE quality metrics (SPEC section 4), as a pure library.

Two entry points:

* :func:`reconstruction_metrics` streams over batches of stored activation rows and returns
  sparsity, reconstruction, shrinkage, density and decoder/encoder-geometry statistics.
* :func:`ce_metrics` splices the SAE into a ``HookedTransformer`` and returns the CE-loss and
  KL "recovered" scores.

Formulas (x = activation row, x_hat = sae(x), f = sae.encode(x), means over tokens t):

* ``l0 = mean_t sum_i 1[f_i != 0]``; ``l1 = mean_t sum_i f_i`` (SAEBench form; no abs, which is the
  same as SAELens' ``|f_i|`` for the non-negative architectures used here).
* ``mse = mean_t ||x_t - x_hat_t||^2`` (SAELens form: sum over dims, mean over tokens).
* ``explained_variance = 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)`` with numerator and
  denominator each accumulated over *all* tokens of *all* batches (SAELens 6.54
  ``ExplainedVarianceCalculator``). Independent of how rows are split into batches.
* ``explained_variance_legacy = mean_t [1 - ||x_t - x_hat_t||^2 / ||x_t - mean_batch(x)||^2]``:
  the per-token form SAEBench's paper numbers use. The mean is the mean of the batch the token was
  in, so this value depends on the batching: pass equal, reasonably large batches (a 1-row batch
  makes the denominator 0). Averaged over the tokens of all batches.
* ``cossim = mean_t cos(x_t, x_hat_t)``; a zero vector has cosine 0 with anything (torch's
  ``cosine_similarity`` eps convention) instead of SAELens' NaN.
* ``l2_norm_in = mean ||x||``, ``l2_norm_out = mean ||x_hat||``,
  ``l2_ratio = mean ||x_hat|| / ||x||`` with ``||x|| < 1e-4`` replaced by 1,
  ``relative_reconstruction_bias = mean ||x_hat||^2 / mean (x . x_hat)`` over all tokens (SAELens
  averages this ratio per batch; a global ratio keeps streaming == one big batch).
* ``density_i = #tokens(f_i > 0) / #tokens``; ``frac_alive = mean_i 1[density_i > 0]``,
  ``frac_dead = 1 - frac_alive``, ``frac_dense = mean_i 1[density_i > dense_threshold]``,
  ``freq_over_{1,10}_percent = mean_i 1[density_i > 0.01 / 0.1]``,
  ``normalized_freq_over_X = sum(density_i > X) / sum(density)`` (NaN when nothing fires).
* ``average_max_{decoder,encoder}_cosine_sim``: for each latent, the max cosine between its
  decoder row (encoder column) and any *other* latent's, averaged over latents; computed in row
  chunks so a wide SAE never needs a ``d_sae x d_sae`` matrix.
* ``density_hist_counts / density_hist_edges = np.histogram(log10(density + 1e-10), edges)`` with
  fixed edges (:data:`DENSITY_HIST_EDGES`, 0.25-decade bins from -10 to 0.25) so histograms of
  different SAEs are comparable; dead latents land in the first bin.

CE / KL (see :func:`ce_metrics` for the token mask): ``ce_loss_score = (ce_abl - ce_sae) /
(ce_abl - ce_clean)``, ``ce_delta = ce_sae - ce_clean``, ``kl = mean_t KL(p_clean || p_new)``,
``kl_div_score = (kl_abl - kl_sae) / kl_abl``. A zero denominator gives NaN.
"""

from __future__ import annotations

import math

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from saeflow.cosine import max_cosine, sample_rows
from saeflow.saes.base import encode_block_rows, reconstruct_in_blocks

if TYPE_CHECKING:  # transformer_lens is slow to import; only needed for the type
    from transformer_lens import HookedTransformer

__all__ = [
    "DENSITY_HIST_EDGES",
    "reconstruction_metrics",
    "max_cosine_similarity",
    "density_statistics",
    "ce_metrics",
]

DENSITY_HIST_EDGES: np.ndarray = np.linspace(-10.0, 0.25, 42)
"""Edges of the log10-density histogram: 41 bins of 0.25 decades covering [-10, 0.25]."""

_LOG_DENSITY_EPS = 1e-10
_L2_RATIO_MIN_NORM = 1e-4
_LOGIT_CHUNK_ELEMENTS = 1 << 25  # ~128 MB of float32 logits per log-softmax chunk


def _nan_div(num: float, den: float) -> float:
    return float(num / den) if den != 0 else float("nan")


def _sae_dtype(sae: torch.nn.Module) -> torch.dtype:
    return sae.W_dec.dtype


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def max_cosine_similarity(vectors: Tensor, chunk_rows: int | None = None, subset: Tensor | None = None) -> Tensor:
    """For each row of ``vectors`` [n, d] (of the rows ``subset`` when given), the max cosine
    similarity to any *other* row.

    :func:`saeflow.cosine.max_cosine` of the rows against themselves: memory ``O(chunk_rows * n)``,
    zero rows have cosine 0 with everything; float32 on ``vectors.device``; NaN when n == 1.
    """
    return max_cosine(vectors, chunk_rows=chunk_rows, subset=subset)[0]


def average_max_cosine(vectors: Tensor, max_rows: int | None = None, seed: int = 0) -> dict[str, float]:
    """Mean over the rows of ``vectors`` [n, d] of each row's max cosine to any other row
    (:func:`max_cosine_similarity`), with ``rows`` (how many rows it averages) and ``se``.

    ``max_rows=None`` or ``n <= max_rows``: every row, exact, ``se`` 0. Else a seeded uniform sample
    of ``max_rows`` rows (without replacement), each still compared with all ``n`` rows: an unbiased
    estimate of the mean whose standard error ``se`` is the sample's standard deviation / sqrt(rows)
    times the finite-population factor sqrt(1 - rows / n). Cost ~ ``rows x n x d``: all rows of a
    262,144 x 640 matrix is 44 TFLOP, 16,384 sampled rows 2.7 TFLOP."""
    n = int(vectors.shape[0])
    if max_rows is None or n <= max_rows:
        v = max_cosine_similarity(vectors).double()
        return {"mean": float(v.mean()), "rows": n, "se": 0.0}
    subset = sample_rows(n, max_rows, seed)
    v = max_cosine_similarity(vectors, subset=subset.to(vectors.device)).double()
    se = float(v.std() / math.sqrt(max_rows) * math.sqrt(1.0 - max_rows / n))
    return {"mean": float(v.mean()), "rows": int(max_rows), "se": se}


# --------------------------------------------------------------------------------------------
# Density
# --------------------------------------------------------------------------------------------


def density_statistics(density: np.ndarray, dense_threshold: float = 0.1) -> dict[str, Any]:
    """Dead / dense / frequency statistics of a per-latent firing-density array (SPEC 4)."""
    density = np.asarray(density, dtype=np.float64)
    total = float(density.sum())
    frac_alive = float(np.mean(density > 0))
    counts, edges = np.histogram(np.log10(density + _LOG_DENSITY_EPS), bins=DENSITY_HIST_EDGES)
    return {
        "frac_alive": frac_alive,
        "frac_dead": 1.0 - frac_alive,
        "frac_dense": float(np.mean(density > dense_threshold)),
        "freq_over_1_percent": float(np.mean(density > 0.01)),
        "freq_over_10_percent": float(np.mean(density > 0.1)),
        "normalized_freq_over_1_percent": _nan_div(float(density[density > 0.01].sum()), total),
        "normalized_freq_over_10_percent": _nan_div(float(density[density > 0.1].sum()), total),
        "density_hist_counts": counts,
        "density_hist_edges": edges,
    }


# --------------------------------------------------------------------------------------------
# Reconstruction metrics
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruction_metrics(
    sae: torch.nn.Module,
    batches: Iterable[Tensor],
    device: str | torch.device,
    dense_threshold: float = 0.1,
    *,
    geometry: bool = True,
    cosine_rows: int | None = None,
) -> dict[str, Any]:
    """Sparsity / reconstruction / density metrics of ``sae`` over activation rows.

    ``batches`` yields [N, d_in] activation rows (tensors or arrays; special-token positions are
    expected to be excluded already, as the activation store never holds BOS). The SAE is moved
    to ``device`` (in place, ``sae.to(device)``) and each batch is cast to the SAE's dtype. All
    cross-token sums are accumulated in float64. See the module docstring for every formula.

    Returns ``n_tokens`` (int) and python floats for ``l0, l1, mse, explained_variance,
    explained_variance_legacy, cossim, l2_norm_in, l2_norm_out, l2_ratio,
    relative_reconstruction_bias, frac_alive, frac_dead, frac_dense, freq_over_1_percent,
    freq_over_10_percent, normalized_freq_over_1_percent, normalized_freq_over_10_percent,
    average_max_decoder_cosine_sim, average_max_encoder_cosine_sim``, plus numpy arrays
    ``density`` [d_sae], ``density_hist_counts`` and ``density_hist_edges``.

    The two cosine metrics (:func:`average_max_cosine`) come with ``cosine_rows`` (rows averaged)
    and ``*_se`` (their standard error: 0 when every row is averaged); ``cosine_rows=None`` averages
    every row, a number samples that many rows of a wider SAE. ``geometry=False`` leaves the cosine
    metrics out (callers that do not keep them: their cost grows with width squared).
    """
    device = torch.device(device)
    sae.to(device)
    dtype = _sae_dtype(sae)
    d_in, d_sae = int(sae.d_in), int(sae.d_sae)

    n = 0
    keys = ["l0", "l1", "sq_err", "sq_norm", "ev_legacy", "cos", "norm_in", "norm_out", "ratio", "sq_norm_out", "dot"]
    sums = dict.fromkeys(keys, 0.0)
    sum_x = torch.zeros(d_in, dtype=torch.float64, device=device)
    fire_counts = torch.zeros(d_sae, dtype=torch.int64, device=device)

    for batch in batches:
        x = torch.as_tensor(batch).to(device=device, dtype=dtype)
        if x.ndim != 2 or x.shape[1] != d_in:
            raise ValueError(f"expected activation batches of shape [N, {d_in}], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            continue
        # latents in row blocks (saeflow.saes.base.encode_block_rows: one block per 4,096-row batch up to
        # 32k latents; a 262k-latent SAE never holds [4096, 262144]); per-row values as one block
        x_hat = torch.empty_like(x)
        row_l1, l0 = [], 0
        step = encode_block_rows(d_sae, x.shape[0])
        for s in range(0, x.shape[0], step):
            f = sae.encode(x[s:s + step])
            x_hat[s:s + step] = sae.decode(f)
            # sparsity (reductions over d_sae in the SAE dtype, cross-token sums in float64)
            l0 += int((f != 0).sum())
            row_l1.append(f.sum(dim=1))
            fire_counts += (f > 0).sum(dim=0)
            del f
        sums["l0"] += float(l0)
        sums["l1"] += float(torch.cat(row_l1).double().sum())

        x64, xh64 = x.double(), x_hat.double()
        resid_sq = (x64 - xh64).pow(2).sum(dim=1)
        norm_in = x64.norm(dim=1)
        norm_out = xh64.norm(dim=1)

        sums["sq_err"] += float(resid_sq.sum())
        sums["sq_norm"] += float(x64.pow(2).sum())
        sum_x += x64.sum(dim=0)

        centred_sq = (x64 - x64.mean(dim=0)).pow(2).sum(dim=1)
        sums["ev_legacy"] += float((1.0 - resid_sq / centred_sq).sum())

        sums["cos"] += float(torch.nn.functional.cosine_similarity(x64, xh64, dim=1).sum())
        sums["norm_in"] += float(norm_in.sum())
        sums["norm_out"] += float(norm_out.sum())
        safe_in = torch.where(norm_in.abs() < _L2_RATIO_MIN_NORM, torch.ones_like(norm_in), norm_in)
        sums["ratio"] += float((norm_out / safe_in).sum())
        sums["sq_norm_out"] += float(norm_out.pow(2).sum())
        sums["dot"] += float((x64 * xh64).sum())
        n += x.shape[0]

    if n == 0:
        raise ValueError("reconstruction_metrics got no activation rows")

    mse = sums["sq_err"] / n
    mean_x = sum_x / n
    total_variance = sums["sq_norm"] / n - float(mean_x.pow(2).sum())
    if total_variance <= 0:
        # constant data: EV is only defined as 'perfect' when the error is 0 too (as SAELens)
        explained_variance = 1.0 if mse == 0 else float("nan")
    else:
        explained_variance = 1.0 - mse / total_variance

    density = (fire_counts.double() / n).cpu().numpy()
    out: dict[str, Any] = {
        "n_tokens": n,
        "l0": sums["l0"] / n,
        "l1": sums["l1"] / n,
        "mse": mse,
        "explained_variance": float(explained_variance),
        "explained_variance_legacy": sums["ev_legacy"] / n,
        "cossim": sums["cos"] / n,
        "l2_norm_in": sums["norm_in"] / n,
        "l2_norm_out": sums["norm_out"] / n,
        "l2_ratio": sums["ratio"] / n,
        "relative_reconstruction_bias": _nan_div(sums["sq_norm_out"], sums["dot"]),
        "density": density,
    }
    out.update(density_statistics(density, dense_threshold))
    if geometry:
        dec = average_max_cosine(sae.W_dec, cosine_rows)
        enc = average_max_cosine(sae.W_enc.T, cosine_rows)
        out.update(average_max_decoder_cosine_sim=dec["mean"], average_max_encoder_cosine_sim=enc["mean"],
                   cosine_rows=dec["rows"], average_max_decoder_cosine_sim_se=dec["se"],
                   average_max_encoder_cosine_sim_se=enc["se"])
    return out


# --------------------------------------------------------------------------------------------
# CE loss / KL with the SAE spliced in
# --------------------------------------------------------------------------------------------


def _masked_rows(logits: Tensor, rows_b: Tensor, rows_t: Tensor, start: int, stop: int) -> Tensor:
    """float32 log-softmax of logits at positions (rows_b[start:stop], rows_t[start:stop])."""
    return logits[rows_b[start:stop], rows_t[start:stop]].float().log_softmax(dim=-1)


@dataclass
class CEReference:
    """The SAE-independent part of the CE / KL metrics for one (model, hook, eval tokens).

    Per batch it keeps the tokens, the counted positions and the clean log-probs there (float32,
    ``[positions, vocab]``: ~1 GB per 1k positions for a 262k vocabulary), plus the pooled clean
    and zero-ablated sums. Build it once with :func:`ce_reference` and pass it to
    :func:`ce_metrics` for every SAE of a family: each SAE then costs one forward per batch
    instead of three.
    """

    hook: str
    batches: list[dict[str, Tensor]]
    sums: dict[str, float]
    n_counted: int
    token_shape: tuple[int, int]


def _splice_mask(toks: Tensor, ignore: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    special = torch.isin(toks, ignore)
    counted = ~special[:, :-1] & ~special[:, 1:]  # prediction at t of token t+1
    rows_b, rows_t = counted.nonzero(as_tuple=True)
    return (~special).reshape(-1), rows_b, rows_t, toks[rows_b, rows_t + 1]


def _flat(act: Tensor, hook: str, d_in: int | None) -> Tensor:
    # [B, T, d] or [B, T, heads, d_head] (hook_z etc.) -> [B*T, d]
    flat = act.reshape(act.shape[0] * act.shape[1], -1)
    if d_in is not None and flat.shape[1] != d_in:
        raise ValueError(f"hook {hook} activations {tuple(act.shape)} do not flatten to d_in={d_in}")
    return flat


def _accumulate(logits: Tensor, b: dict[str, Tensor], chunk: int) -> tuple[float, float]:
    """(sum of CE, sum of KL(p_clean || p)) over the counted positions of one batch."""
    ce = kl = 0.0
    m = b["targets"].numel()
    for s in range(0, m, chunk):
        logp = _masked_rows(logits, b["rows_b"], b["rows_t"], s, s + chunk)
        ref = b["logp_clean"][s : s + chunk]
        ce += -float(logp.gather(1, b["targets"][s : s + chunk, None]).double().sum())
        p_ref = ref.exp()  # KL(p_clean || p_new) = sum_v p_clean (log p_clean - log p_new)
        kl += float(torch.where(p_ref > 0, p_ref * (ref - logp), 0.0).sum(dim=-1).double().sum())
        del logp
    return ce, kl


@torch.no_grad()
def ce_reference(model: "HookedTransformer", hook: str, tokens: Tensor, batch_size: int,
                 ignore_token_ids: Iterable[int] = ()) -> CEReference:
    """Clean and zero-ablated forwards over ``tokens`` (see :func:`ce_metrics` for the rules)."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n_contexts, ctx], got shape {tuple(tokens.shape)}")
    if tokens.shape[1] < 2:
        raise ValueError("contexts need at least 2 tokens to predict a next token")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    ignore = torch.tensor(sorted({int(i) for i in ignore_token_ids}), dtype=torch.long, device=device)
    batches: list[dict[str, Tensor]] = []
    sums = dict.fromkeys(["ce_clean", "ce_abl", "kl_abl"], 0.0)
    n_counted = 0
    for start in range(0, tokens.shape[0], batch_size):
        toks = tokens[start : start + batch_size].to(device=device, dtype=torch.long)
        splice, rows_b, rows_t, targets = _splice_mask(toks, ignore)
        m = rows_b.numel()
        if m == 0:
            continue
        logits = model(toks, return_type="logits")
        vocab = logits.shape[-1]
        chunk = max(1, _LOGIT_CHUNK_ELEMENTS // vocab)
        logp_clean = torch.empty((m, vocab), dtype=torch.float32, device=device)
        for s in range(0, m, chunk):
            logp_clean[s : s + chunk] = _masked_rows(logits, rows_b, rows_t, s, s + chunk)
        del logits
        b = {"toks": toks, "splice": splice, "rows_b": rows_b, "rows_t": rows_t, "targets": targets,
             "logp_clean": logp_clean}
        sums["ce_clean"] += -float(logp_clean.gather(1, targets[:, None]).double().sum())

        def ablate_hook(act: Tensor, hook: Any, splice: Tensor = splice) -> Tensor:  # noqa: ARG001
            out = _flat(act, str(hook), None).clone()
            out[splice] = 0
            return out.reshape(act.shape)

        logits = model.run_with_hooks(toks, return_type="logits", fwd_hooks=[(hook, ablate_hook)])
        ce, kl = _accumulate(logits, b, chunk)
        del logits
        sums["ce_abl"] += ce
        sums["kl_abl"] += kl
        batches.append(b)
        n_counted += m
    if n_counted == 0:
        raise ValueError("no counted positions: every prediction has a special input or target (ignore_token_ids)")
    return CEReference(hook, batches, sums, n_counted, (int(tokens.shape[0]), int(tokens.shape[1])))


@torch.no_grad()
def ce_metrics(
    model: "HookedTransformer",
    sae: torch.nn.Module,
    hook: str,
    tokens: Tensor,
    batch_size: int,
    ignore_token_ids: Iterable[int] = (),
    reference: CEReference | None = None,
) -> dict[str, float]:
    """Next-token CE loss and KL of ``model`` clean, with ``sae`` spliced at ``hook``, and with
    ``hook`` zero-ablated (SPEC 4, "CE loss recovered" and "KL").

    ``tokens`` is a LongTensor [n_contexts, ctx] (BOS already in place when the model uses one);
    it is fed to the model as-is, ``batch_size`` contexts per forward. The SAE is moved to the
    model's device (in place) and the tokens are moved there too; the SAE runs in its own dtype
    and its output is cast back to the hook's dtype. ``reference`` (from :func:`ce_reference` on
    the same model, hook and tokens) skips the clean and ablated forwards; without it one is built.

    Special tokens (``ignore_token_ids``: BOS / PAD / EOS):

    * Splicing: the SAE reconstruction replaces the hook activation only at positions whose token
      is not special; special positions (e.g. BOS, whose residual norm is huge and which is never
      SAE training data) keep their clean activation. The zero-ablation zeroes exactly the same
      positions, so both interventions touch the same set and a zero SAE scores exactly 0.
    * Metric: the prediction made at position t (of token t+1) is counted only when *both* the
      input token t and the target token t+1 are not special. So BOS-position predictions (which
      the splice cannot change) and predictions of PAD/EOS are left out. CE and both KLs are
      averaged over exactly these positions (pooled over all batches, each position weighted
      equally).

    Returns python floats ``ce_clean, ce_with_sae, ce_with_ablation, ce_loss_score, ce_delta,
    kl_with_sae, kl_with_ablation, kl_div_score`` and the int ``n_tokens`` (positions counted).
    Memory: per batch, one [positions, vocab] float32 block of clean log-probs is kept, and each
    spliced forward's logits are reduced chunk by chunk and freed before the next forward.
    """
    if reference is None:
        reference = ce_reference(model, hook, tokens, batch_size, ignore_token_ids)
    elif reference.hook != hook or reference.token_shape != (int(tokens.shape[0]), int(tokens.shape[1])):
        raise ValueError("the CE reference was built for another hook or other tokens; build it with ce_reference")
    device = next(model.parameters()).device
    sae.to(device)
    sae_dtype = _sae_dtype(sae)
    d_in = int(sae.d_in)
    ce_sum = kl_sum = 0.0
    for b in reference.batches:
        splice = b["splice"]

        def splice_hook(act: Tensor, hook: Any, splice: Tensor = splice) -> Tensor:  # noqa: ARG001
            flat = _flat(act, str(hook), d_in)
            recon = reconstruct_in_blocks(sae, flat[splice].to(sae_dtype)).to(act.dtype)
            out = flat.clone()
            out[splice] = recon
            return out.reshape(act.shape)

        logits = model.run_with_hooks(b["toks"], return_type="logits", fwd_hooks=[(hook, splice_hook)])
        chunk = max(1, _LOGIT_CHUNK_ELEMENTS // logits.shape[-1])
        ce, kl = _accumulate(logits, b, chunk)
        del logits
        ce_sum += ce
        kl_sum += kl

    n = reference.n_counted
    ce_clean = reference.sums["ce_clean"] / n
    ce_sae = ce_sum / n
    ce_abl = reference.sums["ce_abl"] / n
    kl_sae = kl_sum / n
    kl_abl = reference.sums["kl_abl"] / n
    return {
        "ce_clean": ce_clean,
        "ce_with_sae": ce_sae,
        "ce_with_ablation": ce_abl,
        "ce_loss_score": _nan_div(ce_abl - ce_sae, ce_abl - ce_clean),
        "ce_delta": ce_sae - ce_clean,
        "kl_with_sae": kl_sae,
        "kl_with_ablation": kl_abl,
        "kl_div_score": _nan_div(kl_abl - kl_sae, kl_abl),
        "n_tokens": n,
    }
