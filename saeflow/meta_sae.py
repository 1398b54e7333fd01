"""Meta-SAEs: BatchTopK SAEs trained on another SAE's decoder rows (SPEC 2.4), and the cross-size check.

A meta-SAE is an ordinary ``batchtopk`` SAE from the one registry (:mod:`saeflow.saes`), trained by
the one trainer (:func:`saeflow.training.train_sae`) on the unit-normalised rows of a base SAE's
``W_dec`` (``n_latents x d_model``); no LM activations are involved. The settings default to
SAEBench's ``meta_structure`` eval (SAEBench 0.6.0): width ``max(ceil(0.25 n), k)``, ``k = 4``,
1500 Adam steps (lr 5e-4 constant, betas 0.9/0.999, gradient clip 1.0) on batches of 1024 rows drawn
WITH replacement, decoder-norm rescaling, no activation normalisation, float32.

What this module computes (pure torch / numpy, no Prefect):

- :class:`RowSampler`: a resumable :class:`~saeflow.training.BatchLoader` over an in-memory matrix
  (uniform draws with replacement, ``torch.randint`` from a seeded generator). Generic: any
  evaluation can train an SAE on a matrix it holds in memory with it.
- :func:`unit_rows` (input checks), :func:`meta_width`, :func:`train_meta_sae`.
- :func:`decoder_variance_explained`: ``1 - sum ||d - d_hat||^2 / sum ||d - mean(d)||^2`` with the
  batch-level top-k forward in consecutive batches of ``eval_batch_size`` rows (SAEBench's metric,
  which depends on the batching), or with the saved JumpReLU threshold (per row).
- :func:`decompose`: each latent's meta-latents (threshold inference, as the original meta-SAE code
  does at inference), their weights and the reconstruction cosine; :func:`cluster_sizes`.
- :func:`max_cosines`: the 2x2 max-cosine distributions (base->base, base->meta, meta->base,
  meta->meta).
- :func:`sparse_code`: batched orthogonal matching pursuit of one decoder on another's unit rows
  (the cross-size check: is a larger SAE's latent a sparse combination of a smaller SAE's?).
- :func:`sample_store_rows`, :func:`top_rows`, :func:`snippet`: top-activating context snippets
  for the example page.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from saeflow.config import MetaSAEConfig, TrainConfig
from saeflow.saes import BatchTopKSAE, SAEConfig, load_sae
from saeflow.training import train_sae

__all__ = [
    "MetaSAEInputError",
    "RowSampler",
    "unit_rows",
    "meta_width",
    "meta_sae_config",
    "meta_train_config",
    "train_meta_sae",
    "decoder_variance_explained",
    "decompose",
    "cluster_sizes",
    "max_cosines",
    "sparse_code",
    "sample_store_rows",
    "top_rows",
    "snippet",
]


class MetaSAEInputError(ValueError):
    """A decoder matrix (or setting) the meta-SAE evaluation cannot work with."""


# ------------------------------------------------------------------------------------ batches
class RowSampler:
    """Endless batches of rows of an in-memory matrix, drawn uniformly WITH replacement.

    Each batch is ``matrix[torch.randint(0, n, (batch_size,), generator=g)]`` with ``g`` a CPU
    ``torch.Generator`` seeded with ``seed`` (the global RNG is not touched). Implements the
    :class:`saeflow.training.BatchLoader` protocol: ``state_dict()`` is the number of batches drawn
    so far, and ``load_state_dict`` replays the generator to that point, so a resumed training run
    sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, matrix: torch.Tensor, batch_size: int, seed: int) -> None:
        if matrix.ndim != 2 or matrix.shape[0] < 1:
            raise MetaSAEInputError(f"RowSampler needs a non-empty 2-D matrix, got shape {tuple(matrix.shape)}")
        if batch_size < 1:
            raise MetaSAEInputError(f"batch_size must be >= 1, got {batch_size}")
        self.matrix = matrix.detach().to("cpu", torch.float32).contiguous()
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drawn = 0

    def _generator(self) -> torch.Generator:
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        n = self.matrix.shape[0]
        for _ in range(self.drawn):  # replay: cheap (batch_size ints per batch)
            torch.randint(0, n, (self.batch_size,), generator=g)
        return g

    def __iter__(self) -> Iterator[torch.Tensor]:
        g = self._generator()
        n = self.matrix.shape[0]
        while True:
            idx = torch.randint(0, n, (self.batch_size,), generator=g)
            self.drawn += 1
            yield self.matrix[idx]

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self.drawn, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("seed", self.seed)) != self.seed or int(state.get("batch_size", self.batch_size)) != self.batch_size:
            raise MetaSAEInputError(f"RowSampler state {state} was written with another seed / batch size")
        self.drawn = int(state["drawn"])


# ------------------------------------------------------------------------------------ training
def unit_rows(W_dec: torch.Tensor | np.ndarray, what: str = "decoder") -> torch.Tensor:
    """``W_dec`` (n_latents x d_model) as float32 rows of unit L2 norm; refuses bad input.

    Raises :class:`MetaSAEInputError` for a matrix that is not 2-D, has fewer than 2 rows, holds
    NaN/inf, or has an all-zero row (its direction is undefined).
    """
    W = torch.as_tensor(W_dec).detach().to("cpu", torch.float32)
    if W.ndim != 2:
        raise MetaSAEInputError(f"{what} must be a 2-D matrix (n_latents x d_model), got shape {tuple(W.shape)}")
    if W.shape[0] < 2 or W.shape[1] < 1:
        raise MetaSAEInputError(
            f"{what} has shape {tuple(W.shape)}: a meta-SAE needs at least 2 decoder rows of width >= 1"
        )
    bad = ~torch.isfinite(W).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)[:5].tolist()
        raise MetaSAEInputError(
            f"{what} holds NaN/inf in {int(bad.sum())} rows (first: {rows}); the SAE's weights are corrupt: "
            "retrain it (delete its train/<fingerprint> folder) or drop it from the evaluation"
        )
    norms = W.norm(dim=1)
    zero = norms <= 1e-12
    if bool(zero.any()):
        rows = zero.nonzero().squeeze(1)[:5].tolist()
        raise MetaSAEInputError(
            f"{what} has {int(zero.sum())} all-zero rows (first: {rows}); their direction is undefined, so they "
            "cannot be unit-normalised: drop those latents or retrain the SAE"
        )
    return W / norms[:, None]


def meta_width(n_latents: int, width_ratio: float, k: int) -> int:
    """``max(ceil(n_latents * width_ratio), k)`` (SAEBench); refuses a width ratio giving no latents."""
    if not (width_ratio > 0 and math.isfinite(width_ratio)):
        raise MetaSAEInputError(f"meta_sae.width_ratio={width_ratio} must be a positive finite number (default 0.25)")
    raw = math.ceil(n_latents * width_ratio)
    if raw < 1:
        raise MetaSAEInputError(
            f"meta_sae.width_ratio={width_ratio} x {n_latents} latents gives {raw} meta-latents; raise width_ratio"
        )
    return max(raw, int(k))


def meta_sae_config(n_latents: int, cfg: MetaSAEConfig) -> SAEConfig:
    """The registry config of the meta-SAE (``batchtopk``, SAELens ``BatchTopKTrainingSAEConfig`` defaults)."""
    return SAEConfig(architecture="batchtopk", width=meta_width(n_latents, cfg.width_ratio, cfg.k), k=cfg.k,
                     rescale_acts_by_decoder_norm=True, normalize_activations="none",
                     dead_feature_window=cfg.dead_feature_window)


def meta_train_config(cfg: MetaSAEConfig) -> TrainConfig:
    """Trainer settings: ``train_steps`` steps of ``batch_size`` rows, constant lr, clip 1.0."""
    return TrainConfig(training_tokens=cfg.train_steps * cfg.batch_size, batch_size=cfg.batch_size, lr=cfg.lr,
                       lr_warm_up_steps=0, lr_decay_steps=0, grad_clip=1.0, seed=cfg.seed,
                       checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every)


def train_meta_sae(decoder: torch.Tensor | np.ndarray, cfg: MetaSAEConfig, out_dir: str | Path,
                   device: str | torch.device = "cpu",
                   on_log: Callable[[dict[str, Any]], None] | None = None) -> tuple[BatchTopKSAE, dict[str, Any]]:
    """Train a meta-SAE on the unit rows of ``decoder``; save it in ``out_dir`` (SAELens layout).

    Resumable (``out_dir/checkpoint``) and idempotent (a finished ``out_dir`` is loaded, not
    retrained). Returns the trained SAE (loaded back from ``out_dir``, decoder rows of unit norm,
    JumpReLU threshold = the moving BatchTopK threshold) and the trainer's summary with
    ``train_time_seconds`` (the wall time of this call's training, 0 when it was already done).
    """
    D = unit_rows(decoder)
    sae_cfg = meta_sae_config(D.shape[0], cfg)
    loader = RowSampler(D, cfg.batch_size, cfg.seed)
    t0 = time.perf_counter()
    summary = train_sae(sae_cfg, meta_train_config(cfg), loader, D.shape[1], Path(out_dir), torch.device(device),
                        scaling_factor=None, on_log=on_log,
                        cfg_extra={"meta_sae_of_n_latents": int(D.shape[0])})
    summary = {**summary, "train_time_seconds": 0.0 if summary.get("already_complete") else time.perf_counter() - t0}
    meta = load_sae(out_dir, device=device)
    assert isinstance(meta, BatchTopKSAE)
    meta.eval()
    return meta, summary


# ------------------------------------------------------------------------------------ metrics
@torch.no_grad()
def decoder_variance_explained(meta: BatchTopKSAE, decoder: torch.Tensor, eval_batch_size: int = 4096,
                               mode: str = "batch_topk") -> dict[str, float]:
    """Fraction of decoder variance explained and MSE (SAEBench ``meta_structure`` metrics).

    ``fve = 1 - sum ||d - d_hat||^2 / sum ||d - mean(d)||^2`` over all rows (``mean`` over all
    rows), ``mse = sum ||d - d_hat||^2 / numel``. ``mode="batch_topk"``: ``d_hat`` from the
    training activation (keep the ``k * rows`` largest activations of each consecutive batch of
    ``eval_batch_size`` rows, as SAEBench); ``"threshold"``: the saved JumpReLU form (per row).
    Also returns ``l0`` (mean active meta-latents per row).
    """
    if mode not in ("batch_topk", "threshold"):
        raise ValueError(f"mode must be 'batch_topk' or 'threshold', got {mode!r}")
    dev = meta.device
    D = decoder.to(dev, torch.float32)
    mean = D.mean(dim=0, keepdim=True)
    resid = total = 0.0
    active = 0
    for s in range(0, D.shape[0], eval_batch_size):
        b = D[s:s + eval_batch_size]
        f = meta.encode_batch_topk(b) if mode == "batch_topk" else meta.encode(b)
        rec = meta.decode(f)
        resid += float((b - rec).double().pow(2).sum())
        total += float((b - mean).double().pow(2).sum())
        active += int((f > 0).sum())
    mse = resid / D.numel()
    fve = 0.0 if total == 0 else 1.0 - resid / total
    return {"fve": fve, "mse": mse, "l0": active / D.shape[0]}


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


@torch.no_grad()
def _max_cos(A: torch.Tensor, B: torch.Tensor, exclude_self: bool, chunk: int = 4096) -> np.ndarray:
    out = []
    for s in range(0, A.shape[0], chunk):
        c = A[s:s + chunk] @ B.T
        if exclude_self:
            r = torch.arange(c.shape[0], device=c.device)
            c[r, r + s] = -torch.inf
        out.append(c.max(dim=1).values.cpu())
    return torch.cat(out).numpy()


def max_cosines(base_unit: torch.Tensor, meta_unit: torch.Tensor) -> dict[str, np.ndarray]:
    """Max cosine similarity of each row to the other set (2x2: base/meta -> base/meta).

    ``base->base`` and ``meta->meta`` exclude the row itself. Inputs are unit rows.
    """
    return {"base->base": _max_cos(base_unit, base_unit, True), "base->meta": _max_cos(base_unit, meta_unit, False),
            "meta->base": _max_cos(meta_unit, base_unit, False), "meta->meta": _max_cos(meta_unit, meta_unit, True)}


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
    G = D @ D.T
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
        for t in range(k):
            score = corr.abs()
            if t:
                score[rows[:, None], idx[:, :t]] = -1.0
            idx[:, t] = score.argmax(dim=1)
            S = idx[:, :t + 1]
            G_SS = G[S[:, :, None], S[:, None, :]] + ridge * eye[:t + 1, :t + 1]
            b_S = C.gather(1, S)
            c = torch.linalg.solve(G_SS, b_S.unsqueeze(-1)).squeeze(-1)
            corr = C - torch.einsum("bt,btm->bm", c, G[S])
            cos[:, t] = (c * b_S).sum(dim=1).clamp(min=0).sqrt() / ynorm
        idx_all.append(idx.cpu())
        coef_all.append(c.cpu())
        cos_all.append(cos.clamp(max=1.0).cpu())
    return {"idx": torch.cat(idx_all).numpy(), "coef": torch.cat(coef_all).numpy(), "cos": torch.cat(cos_all).numpy()}


# ---------------------------------------------------------------------------------- examples
def sample_store_rows(n_rows: int, n_sample: int, seed: int, block: int = 512) -> list[tuple[int, int]]:
    """Seeded random, disjoint, sorted ``[start, end)`` blocks of store rows totalling <= ``n_sample`` rows.

    Blocks of contiguous rows keep Zarr reads cheap (each touches at most two chunks).
    """
    if n_rows <= n_sample:
        return [(0, n_rows)] if n_rows else []
    n_blocks_total = n_rows // block
    want = max(1, n_sample // block)
    if n_blocks_total <= want:
        return [(0, min(n_rows, n_sample))]
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n_blocks_total, size=want, replace=False))
    return [(int(b) * block, int(b) * block + block) for b in chosen]


@torch.no_grad()
def top_rows(scores: Iterator[torch.Tensor], m: int) -> tuple[np.ndarray, np.ndarray]:
    """Running top-``m`` rows per column over batches of scores ``[b, n_cols]``.

    Returns ``(values, rows)`` ``[m, n_cols]`` (global row numbers in batch order, best first;
    ``-1`` rows / ``-inf`` values when fewer rows were seen).
    """
    best_v: torch.Tensor | None = None
    best_r: torch.Tensor | None = None
    offset = 0
    for sc in scores:
        sc = sc.float().cpu()
        r = torch.arange(offset, offset + sc.shape[0])[:, None].expand_as(sc)
        offset += sc.shape[0]
        if best_v is None:
            v, rr = sc, r
        else:
            v, rr = torch.cat([best_v, sc]), torch.cat([best_r, r])
        kk = min(m, v.shape[0])
        top_v, top_i = v.topk(kk, dim=0)
        best_v, best_r = top_v, rr.gather(0, top_i)
    if best_v is None:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64)
    if best_v.shape[0] < m:
        pad = m - best_v.shape[0]
        best_v = torch.cat([best_v, torch.full((pad, best_v.shape[1]), -torch.inf)])
        best_r = torch.cat([best_r, torch.full((pad, best_r.shape[1]), -1, dtype=torch.long)])
    return best_v.numpy(), best_r.numpy()


def _clean(piece: str) -> str:
    return piece.replace("\n", "⏎").replace("|", "\\|").replace("*", "\\*").replace("`", "'").replace("<", "&lt;").replace(">", "&gt;")


def snippet(context_tokens: np.ndarray, pos: int, decode: Callable[[list[int]], str], window: int) -> str:
    """``…left **token** right…`` around ``context_tokens[pos]`` (markdown-escaped, newlines as ⏎)."""
    lo, hi = max(0, pos - window), min(len(context_tokens), pos + window + 1)
    left = decode([int(t) for t in context_tokens[lo:pos]])
    mid = decode([int(context_tokens[pos])])
    right = decode([int(t) for t in context_tokens[pos + 1:hi]])
    core = mid.strip() or repr(mid)
    lead = " " if mid[:1].isspace() else ""
    return (f"{'…' if lo > 0 else ''}{_clean(left)}{lead}**{_clean(core)}**{_clean(right)}"
            f"{'…' if hi < len(context_tokens) else ''}")
