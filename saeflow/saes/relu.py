"""Standard ReLU SAE with an L1 penalty (``relu``): SAELens' ``StandardTrainingSAE`` semantics."""

from __future__ import annotations

import math
from typing import Any

import torch

from saeflow.saes.base import BaseSAE, dense_training_result, warm_up_coefficient
from saeflow.saes.config import SAEConfig
from saeflow.saes.kernels import _decode_dense, _encode_pre

__all__ = ["StandardSAE"]


class StandardSAE(BaseSAE):
    """Standard ReLU SAE with an L1 penalty, training semantics of SAELens' ``StandardTrainingSAE``.

    ``f = relu((x - b_dec) @ W_enc + b_enc)``, ``x̂ = f @ W_dec + b_dec``. Loss: ``mse`` (sum over
    d, mean over batch) + ``c_t * mean_batch ||f * ||W_dec_i|| ||_p`` with ``p = lp_norm`` and
    ``c_t = l1_coefficient * min(t / l1_warm_up_steps, 1)`` at step ``t``
    (:func:`warm_up_coefficient`). Saved as SAELens ``standard``.

    With ``target_l0`` the coefficient is a buffer (``l1_log_coefficient``, the natural log of the
    coefficient before warm-up, so a checkpoint resumes it exactly) that :meth:`after_step` moves
    by ``l1_controller_gain * clip(log(L0_batch / target_l0), -1, 1)`` after every step from
    ``l1_warm_up_steps`` on: the coefficient settles where the training batches' L0 equals the
    target. L0 of a ReLU SAE is the same function at training and at inference, so the held-out L0
    follows. SAELens and dictionary_learning have no L0 target for the L1 SAE: this controller is
    saeflow's (docs/training.md).
    """

    architecture = "relu"
    saved_architecture = "standard"
    sae_lens_training_architecture = "standard"

    l1_log_coefficient: torch.Tensor

    def __init__(self, cfg: SAEConfig, d_in: int, seed: int = 0) -> None:
        super().__init__(cfg, d_in, seed)
        if cfg.target_l0 is not None:
            start = math.log(max(float(cfg.l1_coefficient), 1e-8))
            self.register_buffer("l1_log_coefficient", torch.tensor(start, dtype=torch.float64))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.b_dec) @ self.W_enc + self.b_enc).relu()

    def l1_coefficient_at(self, step: int) -> float | torch.Tensor:
        """The coefficient of step ``step``: a float, or with ``target_l0`` a 0-dim tensor on the
        SAE's device (the controller's current value; read without a host synchronisation)."""
        if self.cfg.target_l0 is None:
            return warm_up_coefficient(self.cfg.l1_coefficient, self.cfg.l1_warm_up_steps, step)
        return warm_up_coefficient(1.0, self.cfg.l1_warm_up_steps, step) * self.l1_log_coefficient.exp().float()

    def training_forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None,
                         return_feature_acts: bool = True, *, step: int = 0) -> dict[str, Any]:
        self._check_batch(x)
        f = _encode_pre(self, x).relu()
        x_hat = _decode_dense(self, f)
        mse = (x_hat - x).pow(2).sum(dim=-1).mean()
        sparsity = (f * self.W_dec.norm(dim=1)).norm(p=self.cfg.lp_norm, dim=-1)
        coef = self.l1_coefficient_at(step)
        l1 = (coef * sparsity).mean()
        out = dense_training_result(mse, {"mse_loss": mse, "l1_loss": l1}, f, return_feature_acts)
        out["step"], out["l1_coefficient"] = step, coef
        return out

    @torch.no_grad()
    def after_step(self, out: dict[str, Any]) -> None:
        """With ``target_l0``: move the log L1 coefficient toward the batch L0 = target (past the warm-up)."""
        cfg = self.cfg
        if cfg.target_l0 is None or int(out.get("step", 0)) < cfg.l1_warm_up_steps:
            return
        log_ratio = (out["l0"].double().clamp_min(1e-3) / float(cfg.target_l0)).log().clamp(-1.0, 1.0)
        self.l1_log_coefficient.add_(cfg.l1_controller_gain * log_ratio)

    @classmethod
    def config_from_sae_lens(cls, cfg: dict[str, Any]) -> SAEConfig:
        return SAEConfig(architecture="relu", width=int(cfg["d_sae"]), normalize_activations="none")
