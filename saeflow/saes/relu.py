"""Standard ReLU SAE with an L1 penalty (``relu``): SAELens' ``StandardTrainingSAE`` semantics."""

from __future__ import annotations

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
    """

    architecture = "relu"
    saved_architecture = "standard"
    sae_lens_training_architecture = "standard"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.b_dec) @ self.W_enc + self.b_enc).relu()

    def l1_coefficient_at(self, step: int) -> float:
        return warm_up_coefficient(self.cfg.l1_coefficient, self.cfg.l1_warm_up_steps, step)

    def training_forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None,
                         return_feature_acts: bool = True, *, step: int = 0) -> dict[str, Any]:
        self._check_batch(x)
        f = _encode_pre(self, x).relu()
        x_hat = _decode_dense(self, f)
        mse = (x_hat - x).pow(2).sum(dim=-1).mean()
        sparsity = (f * self.W_dec.norm(dim=1)).norm(p=self.cfg.lp_norm, dim=-1)
        l1 = (self.l1_coefficient_at(step) * sparsity).mean()
        return dense_training_result(mse, {"mse_loss": mse, "l1_loss": l1}, f, return_feature_acts)

    @classmethod
    def config_from_sae_lens(cls, cfg: dict[str, Any]) -> SAEConfig:
        return SAEConfig(architecture="relu", width=int(cfg["d_sae"]), normalize_activations="none")
