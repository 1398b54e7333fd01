"""TopK SAE (``topk``): SAELens' ``TopKTrainingSAE`` semantics, with sparse training kernels."""

from __future__ import annotations

from typing import Any

import torch

from saeflow.saes.base import BaseSAE
from saeflow.saes.config import SAEConfig
from saeflow.saes.kernels import (
    _GatherPreActs,
    _rows_times_dense,
    _sorted_topk,
    _SparseDecode,
    _take,
    aux_recons_cols,
    row_norms,
    selected_pre,
    selection_pre,
)

__all__ = ["TopKSAE"]


class TopKSAE(BaseSAE):
    """TopK SAE, training semantics of SAELens' ``TopKTrainingSAE`` (SPEC 3.2).

    Forward: ``sae_in = x - b_dec``, ``h = sae_in @ W_enc + b_enc``; if
    ``rescale_acts_by_decoder_norm``, ``h *= ||W_dec_i||``; keep the top ``k`` of each row,
    ReLU them, zero the rest (``feature_acts``). Decode: ``x̂ = (f / ||W_dec_i||) @ W_dec + b_dec``
    (the division only when rescaling), i.e. the decoder is used as if its rows had unit norm.

    Loss: ``mse = sum_d (x̂ - x)^2`` averaged over the batch, plus the TopK auxiliary loss on dead
    latents (``k_aux = aux_k or d_in // 2``, ``scale = min(n_dead / k_aux, 1)``, the top
    ``min(k_aux, n_dead)`` pre-activations among dead latents, reconstruction without ``b_dec``
    of the detached residual ``x - x̂``, times ``aux_coefficient``).

    Inference (``encode``/``decode``) computes exactly the training ``feature_acts`` and
    reconstruction, rescaling included. As in SAELens' ``save_inference_model``, :func:`save_sae`
    folds the decoder norms into the encoder (``W_enc *= n``, ``b_enc *= n``, ``W_dec /= n``) so
    saved decoder rows have unit norm; the rescaling then multiplies and divides by 1, and the saved
    SAE (whose ``cfg.json`` keeps ``rescale_acts_by_decoder_norm=true``, as SAELens' inference
    config does) gives the same latents and reconstruction up to float rounding. Without
    rescaling nothing is folded (folding would change the top-k selection).

    Host syncs per training step: one ``int(dead_mask.sum())`` (``k_aux`` depends on it, as in
    SAELens) and, when latents are dead, one ``nonzero`` to list them.
    """

    architecture = "topk"
    saved_architecture = "topk"
    sae_lens_training_architecture = "topk"

    #: Use the sparse kernels in ``training_forward``: same maths as the dense SAELens path (the
    #: latents are bit-identical, losses/gradients equal up to float summation order), 3-4x
    #: faster per optimiser step on CPU at d_in=640, d_sae=4096, batch 4096, k=32 because only the
    #: encoder forward stays a dense matmul; the decoder and every backward product touch only the
    #: k (or k_aux) selected latents per row. The input ``x`` gets no gradient on this path.
    #: ``False`` selects the dense reference implementation.
    sparse_kernels: bool = True
    #: bf16 path: the aux-k loss is computed densely over the dead latents
    #: (:func:`~saeflow.saes.kernels.aux_recons_cols`) while there are at most this many times
    #: ``k_aux`` of them, through the sparse kernels otherwise.
    aux_dense_factor: int = 16

    def __init__(self, cfg: SAEConfig, d_in: int, seed: int = 0) -> None:
        if cfg.k > cfg.width:
            raise ValueError(f"k={cfg.k} exceeds width={cfg.width}: choose k <= width")
        if cfg.aux_k is not None and cfg.aux_k < 1:
            raise ValueError(f"aux_k={cfg.aux_k} must be >= 1 (or null for d_in // 2)")
        super().__init__(cfg, d_in, seed)
        self.k = int(cfg.k)
        self.rescale = bool(cfg.rescale_acts_by_decoder_norm)
        #: Steps over which the training ``k`` anneals down to ``k`` (set by the trainer from
        #: ``k_anneal_fraction``; 0 = train with ``k`` throughout).
        self.k_anneal_steps = 0

    # ------------------------------------------------------------------ inference
    def _pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        h = (x - self.b_dec) @ self.W_enc + self.b_enc
        if self.rescale:
            h = h * self.W_dec.norm(dim=-1)
        return h

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self._pre_acts(x)
        vals, idx = torch.topk(h, self.k, dim=-1, sorted=False)
        return torch.zeros_like(h).scatter_(-1, idx, vals.relu())

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` ``[..., k]`` of the top-k latents (values after ReLU, may be 0)."""
        vals, idx = _sorted_topk(self._pre_acts(x), self.k)
        return vals.relu(), idx

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        if self.rescale:
            f = f * (1 / self.W_dec.norm(dim=-1))
        return f @ self.W_dec + self.b_dec

    def decode_sparse(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Reconstruction from ``encode_sparse`` output (2-D batches)."""
        if self.rescale:
            vals = vals * _take(1 / self.W_dec.norm(dim=-1), idx)
        return _rows_times_dense(idx, vals, self.W_dec) + self.b_dec

    # ------------------------------------------------------------------ training
    def train_k(self, step: int) -> int:
        """``k`` used by the training forward of 0-based ``step``: linear from
        ``min(width, round(k_anneal_from * k))`` at step 0 to ``k`` at ``k_anneal_steps`` (K-annealing)."""
        n = self.k_anneal_steps
        if n <= 0 or step >= n:
            return self.k
        k0 = min(self.d_sae, max(self.k, round(self.cfg.k_anneal_from * self.k)))
        return int(round(k0 + (self.k - k0) * step / n))

    def _k_aux(self) -> int:
        return int(self.cfg.aux_k) if self.cfg.aux_k is not None else max(1, self.d_in // 2)

    def training_forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None,
                         return_feature_acts: bool = True, *, step: int = 0) -> dict[str, Any]:
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"training batch must be [batch, {self.d_in}], got {tuple(x.shape)}")
        k = self.train_k(step)
        if self.sparse_kernels:
            return self._training_forward_sparse(x, dead_mask, return_feature_acts, k)
        return self._training_forward_dense(x, dead_mask, return_feature_acts, k)

    def _aux_setup(self, dead_mask: torch.Tensor | None) -> tuple[int, int, float]:
        """(n_dead, k_aux, scale); n_dead needs one host sync, as in SAELens."""
        if dead_mask is None or self.cfg.aux_coefficient == 0.0:
            return 0, 0, 0.0
        n_dead = int(dead_mask.sum())
        if n_dead == 0:
            return 0, 0, 0.0
        k_aux = self._k_aux()
        scale = min(n_dead / k_aux, 1.0)
        return n_dead, min(k_aux, n_dead), scale

    def _training_forward_dense(self, x: torch.Tensor, dead_mask: torch.Tensor | None,
                                return_feature_acts: bool, k: int | None = None) -> dict[str, torch.Tensor | None]:
        """Reference implementation: the SAELens computation with dense tensors."""
        n = self.W_dec.norm(dim=-1)
        hidden_pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        if self.rescale:
            hidden_pre = hidden_pre * n
        vals, idx = torch.topk(hidden_pre, self.k if k is None else k, dim=-1, sorted=False)
        feature_acts = torch.zeros_like(hidden_pre).scatter(-1, idx, vals.relu())
        acts = feature_acts * (1 / n) if self.rescale else feature_acts
        x_hat = acts @ self.W_dec + self.b_dec
        mse = (x_hat - x).pow(2).sum(dim=-1).mean()

        n_dead, k_aux, scale = self._aux_setup(dead_mask)
        if n_dead:
            assert dead_mask is not None
            residual = (x - x_hat).detach()
            masked = torch.where(dead_mask[None], hidden_pre, -torch.inf)
            a_vals, a_idx = masked.topk(k_aux, dim=-1, sorted=False)
            aux_acts = torch.zeros_like(hidden_pre).scatter(-1, a_idx, a_vals)
            if self.rescale:
                aux_acts = aux_acts * (1 / n)
            recons = aux_acts @ self.W_dec
            aux = self.cfg.aux_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()
        else:
            aux = mse.new_zeros(())
        with torch.no_grad():
            active = feature_acts > 0
            fired = active.any(dim=0)
            l0 = active.sum(dim=-1).float().mean()
        return {"loss": mse + aux, "mse": mse, "aux": aux,
                "feature_acts": feature_acts if return_feature_acts else None, "fired": fired, "l0": l0}

    def _training_forward_sparse(self, x: torch.Tensor, dead_mask: torch.Tensor | None,
                                 return_feature_acts: bool, k: int | None = None) -> dict[str, torch.Tensor | None]:
        """Same maths as the dense path; only the selected latents enter the backward pass."""
        d_sae = self.d_sae
        n = row_norms(self.W_dec)  # differentiable (it scales the selection and the decoder)
        inv_n = 1 / n
        sae_in = x - self.b_dec.detach()
        pre, hidden_pre = selection_pre(sae_in, self.W_enc, self.b_enc, n if self.rescale else None)  # dense, no graph
        _, idx = _sorted_topk(hidden_pre, self.k if k is None else k)
        sel = _GatherPreActs.apply(selected_pre(pre, sae_in, self.W_enc, self.b_enc, idx), sae_in, self.W_enc, self.b_enc, self.b_dec, idx)
        if self.rescale:
            sel = sel * _take(n, idx)
        vals = sel.relu()  # == SAELens' feature_acts at idx
        w = vals * _take(inv_n, idx) if self.rescale else vals
        x_hat = _SparseDecode.apply(w, idx, self.W_dec) + self.b_dec
        mse = (x_hat - x).pow(2).sum(dim=-1).mean()

        n_dead, k_aux, scale = self._aux_setup(dead_mask)
        if n_dead:
            assert dead_mask is not None
            residual = (x - x_hat).detach()
            dead_ids = dead_mask.nonzero().squeeze(1)
            _, local = _sorted_topk(hidden_pre.index_select(1, dead_ids), k_aux)
            if pre is None and dead_ids.numel() <= self.aux_dense_factor * k_aux:  # bf16 path, few dead: dense over them
                recons = aux_recons_cols(x, self.b_dec, self.W_enc, self.b_enc, self.W_dec, dead_ids, local,
                                         n if self.rescale else None)
            else:
                a_idx = dead_ids[local]  # dead_ids ascending, so a_idx stays sorted per row
                a = _GatherPreActs.apply(selected_pre(pre, sae_in, self.W_enc, self.b_enc, a_idx), sae_in, self.W_enc, self.b_enc, self.b_dec, a_idx)
                if self.rescale:
                    a = a * _take(n, a_idx) * _take(inv_n, a_idx)
                recons = _SparseDecode.apply(a, a_idx, self.W_dec)
            aux = self.cfg.aux_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()
        else:
            aux = mse.new_zeros(())

        with torch.no_grad():
            active = vals > 0
            counts = torch.zeros(d_sae, device=x.device).index_add_(0, idx.reshape(-1), active.reshape(-1).float())
            fired = counts > 0
            l0 = active.sum(dim=-1).float().mean()
            feature_acts = (torch.zeros(x.shape[0], d_sae, dtype=vals.dtype, device=x.device).scatter_(1, idx, vals)
                            if return_feature_acts else None)
        return {"loss": mse + aux, "mse": mse, "aux": aux, "feature_acts": feature_acts, "fired": fired, "l0": l0}

    # ------------------------------------------------------------------ folding / saving
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        if not self.rescale:
            raise ValueError(
                "folding decoder norms into a TopK SAE trained without rescale_acts_by_decoder_norm would "
                "change which latents are in the top k; only fold SAEs with rescale_acts_by_decoder_norm=True"
            )
        super().fold_W_dec_norm()

    def inference_tensors(self) -> dict[str, torch.Tensor]:
        t = super().inference_tensors()
        if self.rescale:  # as SAELens' save_inference_model: unit-norm decoder rows
            n = t["W_dec"].norm(dim=-1).clamp(min=1e-8)
            t["W_dec"] = (t["W_dec"] / n[:, None]).contiguous()
            t["W_enc"] = (t["W_enc"] * n[None, :]).contiguous()
            t["b_enc"] = (t["b_enc"] * n).contiguous()
        return t

    def sae_lens_cfg_fields(self) -> dict[str, Any]:
        return {"k": self.k, "rescale_acts_by_decoder_norm": self.rescale}

    @classmethod
    def config_from_sae_lens(cls, cfg: dict[str, Any]) -> SAEConfig:
        return SAEConfig(architecture="topk", width=int(cfg["d_sae"]), k=int(cfg.get("k", 100)),
                         rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
                         normalize_activations="none")
