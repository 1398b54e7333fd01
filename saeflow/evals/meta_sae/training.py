"""Training a meta-SAE on another SAE's unit decoder rows (:mod:`saeflow.evals.meta_sae`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saeflow.config import TrainConfig
from saeflow.evals.common import EvalInputError
from saeflow.evals.meta_sae.config import MetaSAEConfig
from saeflow.saes import BatchTopKSAE, SAEConfig, load_sae
from saeflow.training import train_sae

__all__ = ["MetaSAEInputError", "RowSampler", "unit_rows", "meta_width", "meta_sae_config", "meta_train_config",
           "train_meta_sae"]


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
