"""Matryoshka BatchTopK SAE (``matryoshka``): SAELens' ``MatryoshkaBatchTopKTrainingSAE`` semantics."""

from __future__ import annotations

import torch

from saeflow.saes.batchtopk import BatchTopKSAE, _BTParts
from saeflow.saes.config import SAEConfig

__all__ = ["MatryoshkaSAE"]


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE, training semantics of SAELens' ``MatryoshkaBatchTopKTrainingSAE``.

    Everything of :class:`BatchTopKSAE` (activation, threshold, inference, saving as JumpReLU),
    plus nested reconstruction losses: with ``widths = matryoshka_widths`` (strictly increasing,
    ``width`` appended when missing), the loss is the full MSE + the TopK aux loss +
    ``sum over inner widths w`` of ``mean_batch ||b_dec + f[:, :w] W_dec[:w] - x||^2`` (decoder
    rows used at unit norm when rescaling). With ``use_matryoshka_aux_loss`` the aux loss is
    instead ``aux_coefficient * sum over levels`` of the TopK aux loss of that level's dead latents
    reconstructing the residual of the prefix reconstruction up to that level.
    """

    architecture = "matryoshka"
    sae_lens_training_architecture = "matryoshka_batchtopk"

    def __init__(self, cfg: SAEConfig, d_in: int, seed: int = 0) -> None:
        widths = cfg.effective_matryoshka_widths() if cfg.matryoshka_widths is not None else ()
        if not widths or widths[0] < 1 or any(a >= b for a, b in zip(widths, widths[1:])) or widths[-1] != cfg.width:
            raise ValueError(
                f"matryoshka_widths={cfg.matryoshka_widths} must be a non-empty, strictly increasing list of "
                f"positive widths <= width={cfg.width}"
            )
        super().__init__(cfg, d_in, seed)
        self.widths: tuple[int, ...] = widths

    def _prefix_reconstructions(self, parts: "_BTParts", include_outer: bool) -> list[tuple[int, int, torch.Tensor]]:
        """``(lo, hi, b_dec + f[:, :hi] W_dec[:hi])`` for every level (the outer one if asked)."""
        widths = self.widths if include_outer else self.widths[:-1]
        out, lo, dec = [], 0, self.b_dec
        for hi in widths:
            dec = parts.decode_block(lo, hi) + dec
            out.append((lo, hi, dec))
            lo = hi
        return out

    def _extra_losses(self, x: torch.Tensor, parts: "_BTParts", dead_mask: torch.Tensor | None,
                      losses: dict[str, torch.Tensor]) -> None:
        use_levels = self.cfg.use_matryoshka_aux_loss
        levels = self._prefix_reconstructions(parts, include_outer=use_levels)
        if self.cfg.aux_coefficient == 0.0:
            losses["auxiliary_reconstruction_loss"] = x.new_zeros(())
        elif not use_levels:
            losses["auxiliary_reconstruction_loss"] = self.cfg.aux_coefficient * self._topk_aux(x, parts.x_hat, parts, dead_mask)
        else:
            total = x.new_zeros(())
            if dead_mask is not None and bool(dead_mask.any()):
                for lo, hi, recon in levels:
                    total = total + self._topk_aux(x, recon, parts, dead_mask, lo, hi)
            losses["auxiliary_reconstruction_loss"] = self.cfg.aux_coefficient * total
        for lo, hi, recon in levels:
            if hi == self.d_sae:
                continue  # the outer level is the full MSE
            losses[f"inner_mse_loss_{hi}"] = (recon - x).pow(2).sum(dim=-1).mean()
