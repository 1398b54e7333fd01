"""JumpReLU SAE (``jumprelu``): SAELens' ``JumpReLUTrainingSAE`` semantics (straight-through estimators)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from saeflow.saes.base import BaseSAE, dense_training_result, warm_up_coefficient
from saeflow.saes.config import SAEConfig
from saeflow.saes.kernels import _decode_dense, _encode_pre

__all__ = ["JumpReLUSAE"]


def _in_band(h: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Rectangle kernel ``1[|(h - θ) / ε| < 1/2]`` of the straight-through estimator, as ``h``'s dtype."""
    return (((h - theta) / bandwidth).abs() < 0.5).to(h.dtype)


class _JumpReLUFn(torch.autograd.Function):
    """``h * 1[h > θ]``; STE pseudo-gradient ``∂/∂θ = -(θ/ε) K((h-θ)/ε)`` (K the rectangle)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, theta: torch.Tensor, bandwidth: float, ste_to_input: bool) -> torch.Tensor:
        ctx.save_for_backward(h, theta)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return h * (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        h, theta = ctx.saved_tensors
        ste = (theta / ctx.bandwidth) * _in_band(h, theta, ctx.bandwidth) * g
        grad_h = (h > theta).to(g.dtype) * g
        if ctx.ste_to_input:
            grad_h = grad_h + ste
        return grad_h, -ste.sum(dim=0), None, None


class _StepFn(torch.autograd.Function):
    """Heaviside ``1[h > θ]``; STE pseudo-gradient ``∂/∂θ = -(1/ε) K((h-θ)/ε)``."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, theta: torch.Tensor, bandwidth: float, ste_to_input: bool) -> torch.Tensor:
        ctx.save_for_backward(h, theta)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        h, theta = ctx.saved_tensors
        ste = (1.0 / ctx.bandwidth) * _in_band(h, theta, ctx.bandwidth) * g
        return (ste if ctx.ste_to_input else None), -ste.sum(dim=0), None, None


class JumpReLUSAE(BaseSAE):
    """JumpReLU SAE, training semantics of SAELens' ``JumpReLUTrainingSAE`` (SPEC 3.2).

    ``h = (x - b_dec) @ W_enc + b_enc``, ``f = h * 1[h > θ]`` with a learnt per-latent threshold θ
    (a float32 parameter stored as the raw threshold, not its log, initialised to
    ``jumprelu_init_threshold``; SAELens 6.54.12 does the same, and :func:`load_sae` converts an
    older ``log_threshold`` by ``exp``). Gradients reach θ through straight-through estimators with
    a rectangle kernel of width ``ε = jumprelu_bandwidth`` (to the pre-activations too when
    ``jumprelu_ste_to_input``). Loss: ``mse`` + ``c_t * mean_batch(sparsity)`` with
    ``c_t = l0_coefficient * min(t / l0_warm_up_steps, 1)`` and sparsity ``sum_i 1[h_i > θ_i]``
    (``step``), ``2 / T * (sum_i 1[h_i > θ_i] - T)^2`` with ``T = target_l0`` (``quadratic``, Gemma
    Scope 2) or ``sum_i tanh(jumprelu_tanh_scale * f_i * ||W_dec_i||)`` (``tanh``); optionally
    + ``pre_act_loss_coefficient * mean_batch sum_i relu(θ_i - h_i) * dead_i * ||W_dec_i||``.

    :meth:`after_step` projects θ onto ``>= 0`` (SAELens does it before each training forward;
    the values the forwards see are the same). Inference: ``f = relu(h) * 1[h > θ]`` (SAELens'
    ``JumpReLUSAE``; equal to the training activation for θ >= 0). Saved as SAELens ``jumprelu``.
    """

    architecture = "jumprelu"
    saved_architecture = "jumprelu"
    sae_lens_training_architecture = "jumprelu"

    threshold: nn.Parameter

    def __init__(self, cfg: SAEConfig, d_in: int, seed: int = 0) -> None:
        super().__init__(cfg, d_in, seed)
        self.threshold = nn.Parameter(torch.full((cfg.width,), float(cfg.jumprelu_init_threshold), dtype=torch.float32))

    def _hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self._hidden_pre(x)
        return h.relu() * (h > self.threshold.to(h.dtype)).to(h.dtype)

    def l0_coefficient_at(self, step: int) -> float:
        return warm_up_coefficient(self.cfg.l0_coefficient, self.cfg.l0_warm_up_steps, step)

    def training_forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None,
                         return_feature_acts: bool = True, *, step: int = 0) -> dict[str, Any]:
        self._check_batch(x)
        cfg = self.cfg
        eps, ste_in = float(cfg.jumprelu_bandwidth), bool(cfg.jumprelu_ste_to_input)
        h = _encode_pre(self, x)
        theta = self.threshold.to(h.dtype)
        f = _JumpReLUFn.apply(h, theta, eps, ste_in)
        x_hat = _decode_dense(self, f)
        mse = (x_hat - x).pow(2).sum(dim=-1).mean()
        w_norm = self.W_dec.norm(dim=1)
        coef = self.l0_coefficient_at(step)
        if cfg.jumprelu_sparsity_loss_mode in ("step", "quadratic"):
            per_row = _StepFn.apply(h, theta, eps, ste_in).sum(dim=-1)
            if cfg.jumprelu_sparsity_loss_mode == "quadratic":  # Gemma Scope 2: pulled toward target_l0
                target = float(cfg.target_l0)  # type: ignore[arg-type]  # the config requires it
                per_row = 2.0 / target * (per_row - target).pow(2)
        elif cfg.jumprelu_sparsity_loss_mode == "tanh":
            per_row = torch.tanh(cfg.jumprelu_tanh_scale * f * w_norm).sum(dim=-1)
        else:  # pragma: no cover - the config refuses other modes
            raise ValueError(f"unknown jumprelu_sparsity_loss_mode {cfg.jumprelu_sparsity_loss_mode!r}")
        losses = {"mse_loss": mse, "l0_loss": (coef * per_row).mean()}
        if cfg.pre_act_loss_coefficient is not None:
            if dead_mask is None or not bool(dead_mask.any()):
                losses["pre_act_loss"] = h.new_zeros(())
            else:
                below = ((theta - h).relu() * dead_mask * w_norm).sum(dim=-1)
                losses["pre_act_loss"] = cfg.pre_act_loss_coefficient * below.mean()
        return dense_training_result(mse, losses, f, return_feature_acts)

    @torch.no_grad()
    def after_step(self, out: dict[str, Any]) -> None:
        """Keep θ >= 0 (projected on the data, so latents at 0 keep their gradient)."""
        self.threshold.clamp_(min=0.0)

    # ------------------------------------------------------------------ folding / saving
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """As the base class, and ``θ *= ||W_dec_i||`` (the pre-activations scale by the same factor)."""
        n = self.W_dec_norm()
        super().fold_W_dec_norm()
        self.threshold.mul_(n)

    def jumprelu_threshold(self) -> torch.Tensor:
        return self.threshold

    @torch.no_grad()
    def load_jumprelu_threshold(self, threshold: torch.Tensor) -> None:
        self.threshold.copy_(threshold.to(torch.float32))

    @classmethod
    def config_from_sae_lens(cls, cfg: dict[str, Any]) -> SAEConfig:
        return SAEConfig(architecture="jumprelu", width=int(cfg["d_sae"]), normalize_activations="none")
