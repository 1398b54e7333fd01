"""Training a meta-SAE on another SAE's unit decoder rows (:mod:`saeflow.evals.meta_sae`)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saeflow.artifacts import write_json_atomic
from saeflow.config import TrainConfig
from saeflow.evals.common import EvalInputError, convergence_record, step_at_90pct
from saeflow.evals.meta_sae.config import MetaSAEConfig
from saeflow.saes import BatchTopKSAE, SAEConfig, load_sae
from saeflow.saes.base import encode_block_rows, fits_dense
from saeflow.training import train_sae

__all__ = ["MetaSAEInputError", "RowSampler", "unit_rows", "meta_width", "meta_sae_config", "meta_train_config",
           "decoder_variance_explained", "TRAJECTORY_FILE", "trajectory_steps", "train_meta_sae"]

#: The loss trajectory of a meta-SAE training run, in its folder (:func:`train_meta_sae`).
TRAJECTORY_FILE = "loss_trajectory.json"


class MetaSAEInputError(EvalInputError):
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
        if not fits_dense(b.shape[0], meta.d_sae):  # a wide meta-SAE (issue #27): no dense [rows, width]
            rec, n_on = _reconstruct_blocked(meta, b, mode)
        else:
            f = meta.encode_batch_topk(b) if mode == "batch_topk" else meta.encode(b)
            rec, n_on = meta.decode(f), int((f > 0).sum())
        resid += float((b - rec).double().pow(2).sum())
        total += float((b - mean).double().pow(2).sum())
        active += n_on
    mse = resid / D.numel()
    fve = 0.0 if total == 0 else 1.0 - resid / total
    return {"fve": fve, "mse": mse, "l0": active / D.shape[0]}


def _largest(h: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, flat indices)`` of the ``n`` largest entries of the 2-D ``h`` (unordered): the
    selection of ``h.flatten().topk(n)``, ties aside, ~3x faster on a CPU for a [2048, 65536] block.
    Each row's ``ceil(2n / rows)`` largest values hold at least ``n`` values, so the ``n``-th largest
    of those is a lower bound of the ``n``-th largest of ``h``: only the entries at or above it are ranked."""
    flat = h.flatten()
    n = min(n, flat.numel())
    m = min(h.shape[1], -(-2 * n // h.shape[0]))
    bound = h.topk(m, dim=1, sorted=False).values.flatten().topk(n, sorted=False).values.min()
    if not bound > 0:  # ReLU'd zeros among the n largest: no filtering to gain
        return flat.topk(n, sorted=False)
    idx = (flat >= bound).nonzero().squeeze(1)
    keep = flat[idx].topk(n, sorted=False).indices
    return flat[idx[keep]], idx[keep]


@torch.no_grad()
def _reconstruct_blocked(meta: BatchTopKSAE, b: torch.Tensor, mode: str) -> tuple[torch.Tensor, int]:
    """``(reconstruction, active count)`` of the rows ``b`` as :func:`decoder_variance_explained`
    computes them densely, with the pre-activations in row blocks
    (:func:`saeflow.saes.base.encode_block_rows`) and the activations kept as (value, row, latent)
    triples. ``batch_topk``: each block's ``k * rows`` largest candidates, merged, are the batch's
    ``k * rows`` largest (the same selection as :meth:`BatchTopKSAE.encode_batch_topk`, ties aside)."""
    width = meta.d_sae
    step = encode_block_rows(width, b.shape[0])
    vals, flat = torch.zeros(0, device=b.device), torch.zeros(0, dtype=torch.long, device=b.device)
    n_keep = meta._n_keep(b.shape[0])
    for s in range(0, b.shape[0], step):
        if mode == "batch_topk":
            v, i = _largest(meta._pre_acts(b[s:s + step]).relu(), n_keep)
            v, i = torch.cat([vals, v]), torch.cat([flat, i + s * width])
            keep = v.topk(min(n_keep, v.numel()), sorted=False).indices
            vals, flat = v[keep], i[keep]
        else:
            f = meta.encode(b[s:s + step])
            r, c = f.nonzero(as_tuple=True)
            vals, flat = torch.cat([vals, f[r, c]]), torch.cat([flat, (r + s) * width + c])
    rows, cols = flat // width, flat % width
    coef = vals / meta.W_dec[cols].norm(dim=-1) if getattr(meta, "rescale", False) else vals
    rec = meta.b_dec.detach().expand(b.shape[0], -1).clone()
    rec.index_add_(0, rows, coef[:, None] * meta.W_dec.detach()[cols])
    return rec, int((vals > 0).sum())


def trajectory_steps(total_steps: int, points: int = 11) -> list[int]:
    """Steps at which the loss trajectory is measured: ``points`` evenly spaced steps from 0 to
    ``total_steps`` (the default 11: every 10%) and :func:`~saeflow.evals.common.step_at_90pct`."""
    if points < 2:
        raise ValueError(f"a loss trajectory needs at least 2 points (start and end), got {points}")
    return sorted({(j * total_steps) // (points - 1) for j in range(points)} | {step_at_90pct(total_steps)})


def train_meta_sae(decoder: torch.Tensor | np.ndarray, cfg: MetaSAEConfig, out_dir: str | Path,
                   device: str | torch.device = "cpu",
                   on_log: Callable[[dict[str, Any]], None] | None = None) -> tuple[BatchTopKSAE, dict[str, Any]]:
    """Train a meta-SAE on the unit rows of ``decoder``; save it in ``out_dir`` (SAELens layout).

    Resumable (``out_dir/checkpoint``) and idempotent (a finished ``out_dir`` is loaded, not
    retrained). Returns the trained SAE (loaded back from ``out_dir``, decoder rows of unit norm,
    JumpReLU threshold = the moving BatchTopK threshold) and the trainer's summary with
    ``train_time_seconds`` (the wall time of this call's training, 0 when it was already done) and
    ``convergence`` (:func:`~saeflow.evals.common.convergence_record` with ``cfg.convergence_tol``,
    plus ``step_90pct``, ``steps`` and the ``trajectory``).

    The convergence check uses the loss the stage reports, not the per-step batch loss (noisy: each
    batch is a random draw): the reconstruction MSE of ALL decoder rows with the batch-level top-k
    forward in batches of ``cfg.eval_batch_size`` rows (:func:`decoder_variance_explained`),
    which is deterministic. It is measured on the training model at :func:`trajectory_steps`
    (``cfg.trajectory_points`` steps, by default every 10%) and kept in
    ``out_dir/loss_trajectory.json``, written before the next checkpoint, so a resumed run keeps
    the points measured before the kill.
    """
    D = unit_rows(decoder)
    sae_cfg = meta_sae_config(D.shape[0], cfg)
    loader = RowSampler(D, cfg.batch_size, cfg.seed)
    out_dir = Path(out_dir)
    path = out_dir / TRAJECTORY_FILE
    at = set(trajectory_steps(cfg.train_steps, cfg.trajectory_points))
    points = {int(p["step"]): float(p["mse"]) for p in json.loads(path.read_text())} if path.is_file() else {}
    D_dev = D.to(device)

    def on_step(step: int, sae: Any) -> None:
        if step == 0:  # a run from scratch: points of an earlier (stale) run do not count
            points.clear()
        if step in at:
            points[step] = decoder_variance_explained(sae, D_dev, cfg.eval_batch_size)["mse"]
            write_json_atomic(path, [{"step": s, "mse": points[s]} for s in sorted(points)])

    t0 = time.perf_counter()
    summary = train_sae(sae_cfg, meta_train_config(cfg), loader, D.shape[1], out_dir, torch.device(device),
                        scaling_factor=None, on_log=on_log,
                        cfg_extra={"meta_sae_of_n_latents": int(D.shape[0])}, on_step=on_step)
    s90, end = step_at_90pct(cfg.train_steps), cfg.train_steps
    nan = float("nan")
    convergence = {**convergence_record(points.get(s90, nan), points.get(end, nan), cfg.convergence_tol),
                   "step_90pct": s90, "steps": end, "trajectory": [{"step": s, "mse": points[s]} for s in sorted(points)]}
    summary = {**summary, "train_time_seconds": 0.0 if summary.get("already_complete") else time.perf_counter() - t0,
               "convergence": convergence}
    meta = load_sae(out_dir, device=device)
    assert isinstance(meta, BatchTopKSAE)
    meta.eval()
    return meta, summary
