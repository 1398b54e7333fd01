"""BatchTopK SAE (``batchtopk``): SAELens' ``BatchTopKTrainingSAE`` semantics, saved as JumpReLU."""

from __future__ import annotations

from typing import Any

import torch

from saeflow.saes.config import SAEConfig
from saeflow.saes.kernels import (
    _COO,
    _batch_topk_select,
    _COODecode,
    _GatherPreActs,
    _GatherPreActsCOO,
    _sorted_topk,
    _SparseDecode,
    _take,
    row_norms,
    selected_pre_cols,
    selected_pre_coo,
    selection_pre,
)
from saeflow.saes.topk import TopKSAE

__all__ = ["BatchTopKSAE"]


class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE, training semantics of SAELens' ``BatchTopKTrainingSAE`` (SPEC 2.5).

    Pre-activations as TopK (``h = (x - b_dec) @ W_enc + b_enc``, times ``||W_dec_i||`` when
    ``rescale_acts_by_decoder_norm``). Training activation: ReLU, then keep the ``k * batch``
    largest values of the whole flattened ``[batch, d_sae]`` batch (``k`` latents per row on
    average). Decode, MSE and TopK aux loss exactly as :class:`TopKSAE`.

    ``topk_threshold`` (float64 buffer, starts at 0) follows the moving average
    ``θ <- (1 - topk_threshold_lr) θ + topk_threshold_lr * min(positive training activations)``,
    updated in :meth:`after_step` (SAELens updates it inside its training forward; the value is the
    same because θ does not enter the loss). Inference (:meth:`encode`) is the JumpReLU that
    SAELens saves: ``f = relu(h) * 1[h > θ]`` with the same θ for every latent, so the result does
    not depend on the rest of the batch. :meth:`encode_batch_topk` gives the training activation.
    Saved as SAELens ``jumprelu`` with ``threshold = θ`` everywhere (decoder norms folded into the
    encoder as for TopK, which leaves ``h * ||W_dec_i||`` and hence θ's units unchanged).
    """

    architecture = "batchtopk"
    saved_architecture = "jumprelu"
    sae_lens_training_architecture = "batchtopk"
    #: Sparse kernels in ``training_forward`` (dense encoder matmul, everything else touches only
    #: the ``k * batch`` selected activations); ``False`` selects the dense reference.
    sparse_kernels: bool = True

    topk_threshold: torch.Tensor

    def __init__(self, cfg: SAEConfig, d_in: int, seed: int = 0) -> None:
        super().__init__(cfg, d_in, seed)
        self.register_buffer("topk_threshold", torch.zeros((), dtype=torch.float64))

    # ------------------------------------------------------------------ inference
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self._pre_acts(x)
        return h.relu() * (h > self.topk_threshold.to(h.dtype)).to(h.dtype)

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no fixed number of latents per token; use encode()")

    def encode_batch_topk(self, x: torch.Tensor) -> torch.Tensor:
        """The training activation: the ``k * n_rows`` largest ReLU'd pre-activations of ``x``."""
        h = self._pre_acts(x)
        flat = h.relu().flatten()
        vals, idx = flat.topk(self._n_keep(h.shape[:-1].numel()), sorted=False)
        return torch.zeros_like(flat).scatter(0, idx, vals).view(h.shape)

    def _n_keep(self, n_rows: int, k: int | None = None) -> int:
        return int((self.k if k is None else k) * n_rows)

    # ------------------------------------------------------------------ training
    def training_forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None,
                         return_feature_acts: bool = True, *, step: int = 0) -> dict[str, Any]:
        self._check_batch(x)
        k = self.train_k(step)
        if self.sparse_kernels:
            parts = self._forward_sparse(x, k)
        else:
            parts = self._forward_dense(x, k)
        return self._finish(x, parts, dead_mask, return_feature_acts)

    def _forward_dense(self, x: torch.Tensor, k: int | None = None) -> "_BTParts":
        """Reference: the SAELens computation with dense tensors."""
        n = self.W_dec.norm(dim=-1)
        hidden_pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        if self.rescale:
            hidden_pre = hidden_pre * n
        flat = hidden_pre.relu().flatten()
        vals, fidx = flat.topk(self._n_keep(x.shape[0], k), sorted=False)
        feature_acts = torch.zeros_like(flat).scatter(0, fidx, vals).view_as(hidden_pre)
        acts = feature_acts * (1 / n) if self.rescale else feature_acts
        x_hat = acts @ self.W_dec + self.b_dec

        def decode_prefix(lo: int, hi: int) -> torch.Tensor:
            return acts[:, lo:hi] @ self.W_dec[lo:hi]

        return _BTParts(n=n, x_hat=x_hat, decode_block=decode_prefix, feature_acts=feature_acts,
                        dense_hidden_pre=hidden_pre, sparse=None, pre=None, sae_in=None, hidden_pre=None)

    def _forward_sparse(self, x: torch.Tensor, k: int | None = None) -> "_BTParts":
        """Same maths as :meth:`_forward_dense`; only the selected activations enter the backward."""
        n = row_norms(self.W_dec)
        inv_n = 1 / n
        sae_in = x - self.b_dec.detach()
        pre, hidden_pre = selection_pre(sae_in, self.W_enc, self.b_enc, n if self.rescale else None)  # dense, no graph
        with torch.no_grad():
            rows, cols = _batch_topk_select(hidden_pre, self._n_keep(x.shape[0], k))
        sel = _GatherPreActsCOO.apply(selected_pre_coo(pre, sae_in, self.W_enc, self.b_enc, rows, cols), sae_in, self.W_enc, self.b_enc, self.b_dec, rows, cols)
        if self.rescale:
            sel = sel * n.index_select(0, cols)
        vals = sel.relu()  # == SAELens' feature_acts at (rows, cols)
        w = vals * inv_n.index_select(0, cols) if self.rescale else vals
        sp = _COO(rows, cols, x.shape[0], self.d_sae)
        x_hat = _COODecode.apply(w, sp, self.W_dec) + self.b_dec

        def decode_block(lo: int, hi: int) -> torch.Tensor:
            sub = sp.column_range(lo, hi)
            return _COODecode.apply(w[sub.keep], sub, self.W_dec)

        return _BTParts(n=n, x_hat=x_hat, decode_block=decode_block, feature_acts=None,
                        dense_hidden_pre=None, sparse=(sp, vals), pre=pre, sae_in=sae_in, hidden_pre=hidden_pre)

    def _topk_aux(self, x: torch.Tensor, residual_of: torch.Tensor, parts: "_BTParts",
                  dead_mask: torch.Tensor | None, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """TopK aux loss of latents ``lo:hi`` reconstructing ``x - residual_of`` (unscaled by the coefficient).

        Returns ``scale * mean ||auxk @ W_dec - residual||^2`` (0 when no latent in range is dead).
        """
        hi = self.d_sae if hi is None else hi
        if dead_mask is None:
            return x.new_zeros(())
        sub_dead = dead_mask[lo:hi]
        n_dead = int(sub_dead.sum())
        if n_dead == 0:
            return x.new_zeros(())
        k_aux_full = self._k_aux()
        scale = min(n_dead / k_aux_full, 1.0)
        k_aux = min(k_aux_full, n_dead)
        residual = (x - residual_of).detach()
        n = parts.n
        if parts.dense_hidden_pre is not None:
            hp = parts.dense_hidden_pre[:, lo:hi]
            masked = torch.where(sub_dead[None], hp, -torch.inf)
            a_vals, a_idx = masked.topk(k_aux, dim=-1, sorted=False)
            aux_acts = torch.zeros_like(hp).scatter(-1, a_idx, a_vals)
            if self.rescale:
                aux_acts = aux_acts * (1 / n[lo:hi])
            recons = aux_acts @ self.W_dec[lo:hi]
        else:
            assert parts.sae_in is not None and parts.hidden_pre is not None
            dead_ids = sub_dead.nonzero().squeeze(1) + lo
            with torch.no_grad():
                if parts.pre is not None:  # float32: as before (bit-identical)
                    hp = parts.pre.index_select(1, dead_ids)
                    if self.rescale:
                        hp = hp * n.detach().index_select(0, dead_ids)
                else:  # bf16 selection pass: hidden_pre already holds pre * n
                    hp = parts.hidden_pre.index_select(1, dead_ids)
            _, local = _sorted_topk(hp, k_aux)
            a_idx = dead_ids[local]
            a = _GatherPreActs.apply(selected_pre_cols(parts.pre, parts.sae_in, self.W_enc, self.b_enc, dead_ids, local), parts.sae_in, self.W_enc, self.b_enc, self.b_dec, a_idx)
            if self.rescale:
                a = a * _take(n, a_idx) * _take(1 / n, a_idx)
            recons = _SparseDecode.apply(a, a_idx, self.W_dec)
        return scale * (recons - residual).pow(2).sum(dim=-1).mean()

    def _extra_losses(self, x: torch.Tensor, parts: "_BTParts", dead_mask: torch.Tensor | None,
                      losses: dict[str, torch.Tensor]) -> None:
        """Loss terms besides the full MSE, added to ``losses`` (SAELens names)."""
        if self.cfg.aux_coefficient == 0.0:
            losses["auxiliary_reconstruction_loss"] = x.new_zeros(())
        else:
            losses["auxiliary_reconstruction_loss"] = self.cfg.aux_coefficient * self._topk_aux(x, parts.x_hat, parts, dead_mask)

    def _finish(self, x: torch.Tensor, parts: "_BTParts", dead_mask: torch.Tensor | None,
                return_feature_acts: bool) -> dict[str, Any]:
        mse = (parts.x_hat - x).pow(2).sum(dim=-1).mean()
        losses: dict[str, torch.Tensor] = {"mse_loss": mse}
        self._extra_losses(x, parts, dead_mask, losses)
        aux = x.new_zeros(())
        for name, value in losses.items():
            if name != "mse_loss":
                aux = aux + value
        with torch.no_grad():
            if parts.sparse is not None:
                sp, vals = parts.sparse
                v = vals.detach()
                active = v > 0
                fired = torch.zeros(self.d_sae, dtype=torch.bool, device=x.device).index_fill_(0, sp.cols[active], True)
                l0 = active.sum().float() / x.shape[0]
                min_pos = torch.where(active, v, torch.inf).min() if v.numel() else v.new_full((), torch.inf)
                any_pos = active.any()
                feature_acts = None
                if return_feature_acts:
                    feature_acts = torch.zeros(x.shape[0], self.d_sae, dtype=v.dtype, device=x.device)
                    feature_acts[sp.rows, sp.cols] = v
            else:
                feature_acts = parts.feature_acts.detach()  # type: ignore[union-attr]
                active = feature_acts > 0
                fired = active.any(dim=0)
                l0 = active.sum(dim=-1).float().mean()
                min_pos = torch.where(active, feature_acts, torch.inf).min()
                any_pos = active.any()
                if not return_feature_acts:
                    feature_acts = None
        return {"loss": mse + aux, "mse": mse, "aux": aux, "losses": losses, "feature_acts": feature_acts,
                "fired": fired, "l0": l0, "topk_min_positive": min_pos, "topk_any_positive": any_pos}

    @torch.no_grad()
    def after_step(self, out: dict[str, Any]) -> None:
        """Moving threshold update from the batch's smallest positive training activation."""
        m, any_pos = out.get("topk_min_positive"), out.get("topk_any_positive")
        if m is None or any_pos is None:
            return
        lr = self.cfg.topk_threshold_lr
        theta = self.topk_threshold
        updated = (1 - lr) * theta + lr * m.to(device=theta.device, dtype=torch.float64)
        theta.copy_(torch.where(any_pos.to(theta.device), updated, theta))

    # ------------------------------------------------------------------ folding / saving
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """As the base class; with rescaling, ``h * ||W_dec_i||`` shrinks by ``s`` and so does θ."""
        super().fold_activation_norm_scaling_factor(scaling_factor)
        if self.rescale:
            self.topk_threshold.div_(float(scaling_factor))

    def jumprelu_threshold(self) -> torch.Tensor:
        return torch.full((self.d_sae,), float(self.topk_threshold), dtype=torch.float32)

    @torch.no_grad()
    def load_jumprelu_threshold(self, threshold: torch.Tensor) -> None:
        if threshold.numel() and not bool((threshold == threshold[0]).all()):
            raise ValueError(
                f"threshold differs across latents (min {float(threshold.min())}, max {float(threshold.max())}), but a "
                f"{self.architecture} SAE has one threshold for every latent"
            )
        self.topk_threshold.fill_(float(threshold[0]) if threshold.numel() else 0.0)

    def sae_lens_cfg_fields(self) -> dict[str, Any]:
        return {}


class _BTParts:
    """What the BatchTopK training forward hands to the loss terms (dense or sparse path)."""

    __slots__ = ("n", "x_hat", "decode_block", "feature_acts", "dense_hidden_pre", "sparse", "pre", "sae_in", "hidden_pre")

    def __init__(self, **kw: Any) -> None:
        for k, v in kw.items():
            setattr(self, k, v)
