"""Sparse autoencoder architectures (one registry, SAELens-style) and the SAELens disk format.

Every architecture subclasses :class:`BaseSAE` and registers itself under a name with
:func:`register`; :func:`build_sae` instantiates one from a :class:`~saeflow.config.SAEConfig`.
The parameters are named and shaped as in SAELens 6.x (SPEC 3.1): ``W_enc`` (d_in, d_sae),
``b_enc`` (d_sae), ``W_dec`` (d_sae, d_in), ``b_dec`` (d_in).

Registered architectures (training semantics of the SAELens 6.54.12 training class named; SPEC 3.2):

========== ==================================== ===================== ===========================
name       SAELens training class               extra state           saved as (``cfg.json``)
========== ==================================== ===================== ===========================
topk       ``TopKTrainingSAE``                  -                     ``topk``
batchtopk  ``BatchTopKTrainingSAE``             ``topk_threshold``    ``jumprelu`` (θ everywhere)
matryoshka ``MatryoshkaBatchTopKTrainingSAE``   ``topk_threshold``    ``jumprelu`` (θ everywhere)
relu       ``StandardTrainingSAE``              -                     ``standard``
jumprelu   ``JumpReLUTrainingSAE``              ``threshold`` (param) ``jumprelu``
========== ==================================== ===================== ===========================

Training interface used by :func:`saeflow.training.train_sae`: per optimiser step
``out = sae.training_forward(x, dead_mask, step=step)``, ``out["loss"].backward()``, the optimiser
step, then ``sae.after_step(out)`` (BatchTopK's moving threshold, JumpReLU's threshold projection
onto >= 0). Step-dependent coefficients (L1 / L0 warm-ups) are pure functions of ``step``, and all
state lives in the module's ``state_dict`` (parameters and buffers), so a checkpointed run resumes
exactly.

A :class:`BaseSAE` never normalises its input itself: activation normalisation
(``normalize_activations``) is applied by the trainer and folded into the weights at the end of
training (:meth:`BaseSAE.fold_activation_norm_scaling_factor`), so a trained / saved / loaded SAE
always works on raw activations.

:func:`save_sae` writes the SAELens layout (``cfg.json`` + ``sae_weights.safetensors``) that
``sae_lens.SAE.load_from_disk`` reads; :func:`load_sae` reads it back (also SAELens-written TopK
SAEs).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from saeflow.artifacts import ArtifactError, write_json_atomic
from saeflow.config import SAEConfig

__all__ = [
    "REGISTRY",
    "register",
    "build_sae",
    "BaseSAE",
    "TopKSAE",
    "BatchTopKSAE",
    "MatryoshkaSAE",
    "StandardSAE",
    "JumpReLUSAE",
    "warm_up_coefficient",
    "save_sae",
    "load_sae",
    "SAEFormatError",
    "SAE_CFG_FILENAME",
    "SAE_WEIGHTS_FILENAME",
]

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
#: SAELens version whose on-disk format :func:`save_sae` writes (recorded as ``metadata.sae_lens_version``
#: so SAELens >= 6 skips its pre-6.0 config conversion).
SAELENS_FORMAT_VERSION = "6.54.12"
#: Version of the ``saeflow`` block inside ``cfg.json``.
SAEFLOW_FORMAT_VERSION = 1
TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


class SAEFormatError(ArtifactError):
    """An SAE folder that is missing, unreadable, corrupt or of the wrong shape."""


# --------------------------------------------------------------------------------------- registry
REGISTRY: dict[str, type["BaseSAE"]] = {}


def register(name: str) -> Callable[[type["BaseSAE"]], type["BaseSAE"]]:
    """Class decorator: register an SAE architecture under ``name`` (its ``cfg.json`` architecture)."""

    def deco(cls: type[BaseSAE]) -> type[BaseSAE]:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"SAE architecture {name!r} is already registered by {REGISTRY[name].__name__}")
        cls.architecture = name
        REGISTRY[name] = cls
        return cls

    return deco


def warm_up_coefficient(value: float, warm_up_steps: int, step: int) -> float:
    """Coefficient used at 0-based optimiser step ``step``: ``value * min(step / W, 1)``.

    This is the value SAELens' ``CoefficientScheduler`` hands to the training forward of step
    ``step`` (0 on the first step when ``W > 0``, then rising linearly, ``value`` from step ``W`` on).
    """
    if warm_up_steps > 0 and step < warm_up_steps:
        return value * (step / warm_up_steps)
    return value


def build_sae(cfg: SAEConfig, d_in: int, seed: int) -> "BaseSAE":
    """Instantiate the architecture named by ``cfg.architecture`` with seeded initial weights."""
    cls = REGISTRY.get(cfg.architecture)
    if cls is None:
        raise ValueError(
            f"unknown SAE architecture {cfg.architecture!r}; registered architectures: "
            f"{', '.join(sorted(REGISTRY)) or '(none)'} (set sae.architecture to one of them)"
        )
    return cls(cfg, d_in, seed)


# ------------------------------------------------------------------------------------------- base
class BaseSAE(nn.Module):
    """Common parameters, SAELens initialisation (SPEC 3.1) and weight folding.

    Initialisation: ``W_dec`` (d_sae, d_in) is kaiming-uniform, each row is rescaled to norm
    ``cfg.effective_decoder_init_norm()``, ``W_enc = W_dec.T`` and both biases are zero (a
    data-dependent ``b_dec``, ``cfg.b_dec_init``, is set by the trainer). The random draw uses a
    local ``torch.Generator`` seeded with ``seed``; the global RNG is neither read nor advanced.
    """

    architecture: ClassVar[str] = ""
    #: Architecture written to ``cfg.json`` (the SAELens inference class that loads the saved SAE).
    saved_architecture: ClassVar[str] = ""
    #: SAELens' name of the training architecture (recorded as ``metadata.training_architecture``).
    sae_lens_training_architecture: ClassVar[str] = ""

    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter

    def __init__(self, cfg: SAEConfig, d_in: int, seed: int = 0) -> None:
        super().__init__()
        if d_in < 1:
            raise ValueError(f"d_in must be >= 1, got {d_in}")
        self.cfg = cfg
        d_sae = cfg.width
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        w_dec = torch.empty(d_sae, d_in, dtype=torch.float32)
        nn.init.kaiming_uniform_(w_dec, generator=gen)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * cfg.effective_decoder_init_norm()
        self.W_enc = nn.Parameter(w_dec.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(w_dec.contiguous())
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    # ------------------------------------------------------------------ shape helpers
    @property
    def d_in(self) -> int:
        return int(self.W_dec.shape[1])

    @property
    def d_sae(self) -> int:
        return int(self.W_dec.shape[0])

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    # ------------------------------------------------------------------ interface
    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Latent activations ``[..., d_sae]`` of raw inputs ``x`` ``[..., d_in]``."""
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Reconstruction ``[..., d_in]`` from latent activations ``[..., d_sae]``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction x̂ of ``x``."""
        return self.decode(self.encode(x))

    def training_forward(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None, return_feature_acts: bool = True, *, step: int = 0
    ) -> dict[str, Any]:  # pragma: no cover - abstract
        """One training forward pass on a (pre-scaled) batch ``x`` ``[batch, d_in]``.

        ``dead_mask`` (bool ``[d_sae]``) marks latents counted as dead for auxiliary losses;
        ``step`` is the 0-based optimiser step (coefficient warm-ups depend on it). The pass has
        no side effects: state updates wait for :meth:`after_step`.

        Returns ``loss`` (= ``mse`` + ``aux``, differentiable), ``mse`` (full reconstruction),
        ``aux`` (every other loss term summed), ``feature_acts`` (dense ``[batch, d_sae]``, or
        ``None`` when ``return_feature_acts`` is false), ``fired`` (bool ``[d_sae]``: latents
        active on any row) and ``l0`` (mean active latents per row). The new architectures also
        return ``losses``: the terms by their SAELens names (``mse_loss``, ``l1_loss``, ``l0_loss``,
        ``pre_act_loss``, ``auxiliary_reconstruction_loss``, ``inner_mse_loss_{width}``).
        """
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, out: dict[str, Any]) -> None:
        """Update non-gradient state after the optimiser step that followed ``training_forward``.

        ``out`` is that forward's result. The default does nothing.
        """

    def _check_batch(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"training batch must be [batch, {self.d_in}], got {tuple(x.shape)}")

    # ------------------------------------------------------------------ folding
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Make an SAE trained on ``x * s`` work on raw ``x`` (SAELens semantics).

        ``W_enc *= s``, ``W_dec /= s``, ``b_dec /= s``: the encoder sees the same pre-activations
        and the reconstruction comes out in raw units.
        """
        s = float(scaling_factor)
        if not math.isfinite(s) or s <= 0:
            raise ValueError(f"scaling factor must be a positive finite number, got {scaling_factor!r}")
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)

    @torch.no_grad()
    def W_dec_norm(self) -> torch.Tensor:
        """Decoder row norms, clamped at 1e-8 as in SAELens."""
        return self.W_dec.norm(dim=-1).clamp(min=1e-8)

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Rescale so decoder rows have unit norm: ``W_dec /= n``, ``W_enc *= n``, ``b_enc *= n``."""
        n = self.W_dec_norm()
        self.W_dec.div_(n[:, None])
        self.W_enc.mul_(n[None, :])
        self.b_enc.mul_(n)

    # ------------------------------------------------------------------ saving hooks
    def inference_tensors(self) -> dict[str, torch.Tensor]:
        """Contiguous CPU float32 copies of the weights as they should be saved."""
        return {name: getattr(self, name).detach().to("cpu", torch.float32).clone().contiguous() for name in TENSOR_NAMES}

    @classmethod
    def inference_tensor_shapes(cls, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor in a saved ``sae_weights.safetensors``."""
        return {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}

    @torch.no_grad()
    def load_inference_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors (already checked against :meth:`inference_tensor_shapes`) into the SAE."""
        for name in TENSOR_NAMES:
            getattr(self, name).copy_(state[name].to(torch.float32))

    def sae_lens_cfg_fields(self) -> dict[str, Any]:
        """Architecture-specific ``cfg.json`` fields for SAELens (besides d_in, d_sae, ...)."""
        return {}

    @classmethod
    def config_from_sae_lens(cls, cfg: dict[str, Any]) -> SAEConfig:
        """An :class:`SAEConfig` for a ``cfg.json`` that has no ``saeflow`` block."""
        raise SAEFormatError(f"cannot rebuild a {cls.architecture!r} SAE config from a foreign cfg.json")


# ------------------------------------------------------------------- sparse kernels (TopK path)
# Notation: a row-sparse matrix S [B, d_sae] given by indices idx [B, m] (distinct within a row)
# and values v [B, m]. The kernels below never materialise S densely.


def _rows_times_dense(idx: torch.Tensor, v: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``S @ W`` -> [B, d]: out[b] = sum_j v[b, j] * W[idx[b, j]] (embedding-bag, no gather copy)."""
    return F.embedding_bag(idx, W, per_sample_weights=v, mode="sum")


def _rows_t_times_dense(idx: torch.Tensor, v: torch.Tensor, Y: torch.Tensor, d_sae: int) -> torch.Tensor:
    """``S.T @ Y`` -> [d_sae, d]: out[i] = sum_{(b, j): idx[b, j] = i} v[b, j] * Y[b]."""
    B, m = idx.shape
    rows = torch.arange(B, device=idx.device).repeat_interleave(m)
    st = torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), rows]), v.reshape(-1), (d_sae, B),
                                 check_invariants=False)
    return torch.sparse.mm(st, Y)


def _sampled_dot(idx: torch.Tensor, G: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``(G @ W.T)[b, idx[b, j]]`` -> [B, m] without computing the dense product (SDDMM)."""
    B, m = idx.shape
    crow = torch.arange(0, B * m + 1, m, device=idx.device, dtype=torch.int64)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow, idx.reshape(-1), torch.zeros(B * m, dtype=G.dtype, device=G.device), (B, W.shape[0]),
            check_invariants=False,
        )
        return torch.sparse.sampled_addmm(pattern, G, W.T, beta=0.0).values().view(B, m)


class _GatherPreActs(torch.autograd.Function):
    """Selected encoder pre-activations ``((x - b_dec) @ W_enc + b_enc)[b, idx[b, j]]``.

    The forward returns values already computed by the dense no-grad encoder matmul (so they are
    bit-identical to it); the backward only touches the selected entries: the gradient of the
    dense pre-activation matrix is zero elsewhere, so the two dense backward matmuls reduce to
    sparse products of cost O(B * m * d_in).
    """

    @staticmethod
    def forward(ctx: Any, selected: torch.Tensor, sae_in: torch.Tensor, W_enc: torch.Tensor,
                b_enc: torch.Tensor, b_dec: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(sae_in, W_enc, idx)
        return selected.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        sae_in, W_enc, idx = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        g = g.contiguous()
        grad_b_enc = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
        grad_W_enc = _rows_t_times_dense(idx, g, sae_in, d_sae).T
        # sae_in = x - b_dec and x needs no gradient: d/d b_dec = -sum_b g_b @ W_enc.T = -W_enc @ grad_b_enc
        grad_b_dec = -(W_enc @ grad_b_enc)
        return None, None, grad_W_enc, grad_b_enc, grad_b_dec, None


class _SparseDecode(torch.autograd.Function):
    """``out[b] = sum_j v[b, j] * W_dec[idx[b, j]]`` with sparse forward and backward."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(v, idx, W_dec)
        return _rows_times_dense(idx, v, W_dec)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        v, idx, W_dec = ctx.saved_tensors
        g = g.contiguous()
        grad_v = _sampled_dot(idx, g, W_dec) if ctx.needs_input_grad[0] else None
        grad_W = _rows_t_times_dense(idx, v, g, W_dec.shape[0]) if ctx.needs_input_grad[2] else None
        return grad_v, None, grad_W


def _take(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``v[idx]`` for a 1-D ``v`` (index_select: its backward is a deterministic index_add)."""
    return v.index_select(0, idx.reshape(-1)).view(idx.shape)


def _sorted_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k values and indices of each row, with the indices ascending within a row."""
    vals, idx = torch.topk(x, k, dim=-1, sorted=False)
    idx, order = idx.sort(dim=-1)
    return vals.gather(-1, order), idx


# ------------------------------------------------------------------------------------------ TopK
@register("topk")
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

    saved_architecture = "topk"
    sae_lens_training_architecture = "topk"

    #: Use the sparse kernels in ``training_forward``: same maths as the dense SAELens path (the
    #: latents are bit-identical, losses/gradients equal up to float summation order), 3-4x
    #: faster per optimiser step on CPU at d_in=640, d_sae=4096, batch 4096, k=32 because only the
    #: encoder forward stays a dense matmul; the decoder and every backward product touch only the
    #: k (or k_aux) selected latents per row. The input ``x`` gets no gradient on this path.
    #: ``False`` selects the dense reference implementation.
    sparse_kernels: bool = True

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
        n = self.W_dec.norm(dim=-1)  # differentiable (it scales the selection and the decoder)
        inv_n = 1 / n
        sae_in = x - self.b_dec.detach()
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, sae_in, self.W_enc)  # dense [B, d_sae], no graph
            hidden_pre = pre * n if self.rescale else pre
        _, idx = _sorted_topk(hidden_pre, self.k if k is None else k)
        sel = _GatherPreActs.apply(pre.gather(1, idx), sae_in, self.W_enc, self.b_enc, self.b_dec, idx)
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
            a_idx = dead_ids[local]  # dead_ids ascending, so a_idx stays sorted per row
            a = _GatherPreActs.apply(pre.gather(1, a_idx), sae_in, self.W_enc, self.b_enc, self.b_dec, a_idx)
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


# ----------------------------------------------------- sparse kernels (BatchTopK path, COO / CSR)
# Notation: a sparse matrix S [B, d_sae] with nnz entries at (rows[j], cols[j]), ordered row-major
# (rows non-decreasing, cols ascending within a row), and values v [nnz]. The number of entries per
# row varies (BatchTopK keeps k * B activations of the whole batch).


class _COO:
    """Row-major sparsity pattern of a ``[n_rows, n_cols]`` matrix (CSR row pointer included)."""

    __slots__ = ("rows", "cols", "n_rows", "n_cols", "crow", "keep")

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int,
                 keep: torch.Tensor | None = None) -> None:
        self.rows, self.cols, self.n_rows, self.n_cols, self.keep = rows, cols, n_rows, n_cols, keep
        counts = torch.bincount(rows, minlength=n_rows) if rows.numel() else rows.new_zeros(n_rows)
        self.crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    def column_range(self, lo: int, hi: int) -> "_COO":
        """The entries with ``lo <= col < hi`` (same coordinates); ``keep`` selects their values."""
        keep = ((self.cols >= lo) & (self.cols < hi)).nonzero().squeeze(1)
        return _COO(self.rows[keep], self.cols[keep], self.n_rows, self.n_cols, keep)

    def times_dense(self, v: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """``S @ W`` -> [n_rows, d] (one embedding bag per row; empty rows give 0)."""
        return F.embedding_bag(self.cols, W, self.crow[:-1], mode="sum", per_sample_weights=v)

    def t_times_dense(self, v: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """``S.T @ Y`` -> [n_cols, d]."""
        st = torch.sparse_coo_tensor(torch.stack([self.cols, self.rows]), v, (self.n_cols, self.n_rows),
                                     check_invariants=False)
        return torch.sparse.mm(st, Y)

    def sampled_dot(self, G: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """``(G @ W.T)[rows[j], cols[j]]`` -> [nnz] without the dense product (SDDMM)."""
        if self.cols.numel() == 0:
            return G.new_zeros(0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(self.crow, self.cols, G.new_zeros(self.cols.numel()),
                                              (self.n_rows, W.shape[0]), check_invariants=False)
            return torch.sparse.sampled_addmm(pattern, G, W.T, beta=0.0).values()


class _GatherPreActsCOO(torch.autograd.Function):
    """Selected pre-activations ``((x - b_dec) @ W_enc + b_enc)[rows, cols]`` (COO analogue of
    :class:`_GatherPreActs`): the forward returns the values of the dense no-grad matmul, the
    backward touches only the selected entries."""

    @staticmethod
    def forward(ctx: Any, selected: torch.Tensor, sae_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                b_dec: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(sae_in, W_enc, rows, cols)
        return selected.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        sae_in, W_enc, rows, cols = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        g = g.contiguous()
        grad_b_enc = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        st = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, (d_sae, sae_in.shape[0]), check_invariants=False)
        grad_W_enc = torch.sparse.mm(st, sae_in).T
        grad_b_dec = -(W_enc @ grad_b_enc)  # sae_in = x - b_dec, x needs no gradient
        return None, None, grad_W_enc, grad_b_enc, grad_b_dec, None, None


class _COODecode(torch.autograd.Function):
    """``S @ W_dec`` for a :class:`_COO` pattern with values ``v``; sparse forward and backward."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, sp: _COO, W_dec: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(v, W_dec)
        ctx.sp = sp
        return sp.times_dense(v, W_dec)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        v, W_dec = ctx.saved_tensors
        sp: _COO = ctx.sp
        g = g.contiguous()
        grad_v = sp.sampled_dot(g, W_dec) if ctx.needs_input_grad[0] else None
        grad_W = sp.t_times_dense(v, g) if ctx.needs_input_grad[2] else None
        return grad_v, None, grad_W


def _batch_topk_select(h: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols), row-major, of the positive entries among the ``m`` largest of ``h`` [B, d].

    These are exactly the nonzero entries of BatchTopK's ``relu`` + flattened top-``m`` (selected
    zeros carry no value and no gradient, so they are left out). Instead of a top-``m`` over all
    ``B * d`` entries it first keeps the entries above a positive cut taken from a strided sample
    (about 1.3 ``m`` survive) and takes the top ``m`` of those; when the cut is not positive or keeps
    fewer than ``m`` entries it falls back to the positive entries. Either way the set is the exact
    top ``m`` (ties aside).
    """
    B, d = h.shape
    flat = h.reshape(-1)
    total = flat.numel()
    fidx: torch.Tensor | None = None
    stride = max(1, int(m / 2048))  # ~2048 expected sample entries above the cut
    while stride > 1 and math.gcd(stride, d) != 1:  # a stride sharing a factor with d would sample few columns
        stride -= 1
    if stride > 1:
        sample = flat[::stride]
        rank = min(sample.numel(), int(1.3 * m / total * sample.numel()) + 16)
        cut = sample.topk(rank, sorted=False).values.min()
        if float(cut) > 0:
            cand = (flat > cut).nonzero().squeeze(1)
            if cand.numel() >= m:
                fidx = cand[flat[cand].topk(m, sorted=False).indices]
    if fidx is None:
        cand = (flat > 0).nonzero().squeeze(1)
        fidx = cand if cand.numel() <= m else cand[flat[cand].topk(m, sorted=False).indices]
    fidx = fidx.sort().values
    return fidx // d, fidx % d


# ------------------------------------------------------------------------------------- BatchTopK
@register("batchtopk")
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
                        dense_hidden_pre=hidden_pre, sparse=None, pre=None, sae_in=None)

    def _forward_sparse(self, x: torch.Tensor, k: int | None = None) -> "_BTParts":
        """Same maths as :meth:`_forward_dense`; only the selected activations enter the backward."""
        n = self.W_dec.norm(dim=-1)
        inv_n = 1 / n
        sae_in = x - self.b_dec.detach()
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, sae_in, self.W_enc)  # dense [B, d_sae], no graph
            hidden_pre = pre * n if self.rescale else pre
            rows, cols = _batch_topk_select(hidden_pre, self._n_keep(x.shape[0], k))
        sel = _GatherPreActsCOO.apply(pre[rows, cols], sae_in, self.W_enc, self.b_enc, self.b_dec, rows, cols)
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
                        dense_hidden_pre=None, sparse=(sp, vals), pre=pre, sae_in=sae_in)

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
            assert parts.pre is not None and parts.sae_in is not None
            dead_ids = sub_dead.nonzero().squeeze(1) + lo
            with torch.no_grad():
                hp = parts.pre.index_select(1, dead_ids)
                if self.rescale:
                    hp = hp * n.detach().index_select(0, dead_ids)
            _, local = _sorted_topk(hp, k_aux)
            a_idx = dead_ids[local]
            a = _GatherPreActs.apply(parts.pre.gather(1, a_idx), parts.sae_in, self.W_enc, self.b_enc, self.b_dec, a_idx)
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

    def inference_tensors(self) -> dict[str, torch.Tensor]:
        t = super().inference_tensors()
        t["threshold"] = torch.full((self.d_sae,), float(self.topk_threshold), dtype=torch.float32)
        return t

    @classmethod
    def inference_tensor_shapes(cls, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
        return {**super().inference_tensor_shapes(d_in, d_sae), "threshold": (d_sae,)}

    @torch.no_grad()
    def load_inference_tensors(self, state: dict[str, torch.Tensor]) -> None:
        super().load_inference_tensors(state)
        th = state["threshold"]
        if th.numel() and not bool((th == th[0]).all()):
            raise ValueError(
                f"threshold differs across latents (min {float(th.min())}, max {float(th.max())}), but a "
                f"{self.architecture} SAE has one threshold for every latent"
            )
        self.topk_threshold.fill_(float(th[0]) if th.numel() else 0.0)

    def sae_lens_cfg_fields(self) -> dict[str, Any]:
        return {}


# ------------------------------------------------------------------------------------ Matryoshka
@register("matryoshka")
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


class _BTParts:
    """What the BatchTopK training forward hands to the loss terms (dense or sparse path)."""

    __slots__ = ("n", "x_hat", "decode_block", "feature_acts", "dense_hidden_pre", "sparse", "pre", "sae_in")

    def __init__(self, **kw: Any) -> None:
        for k, v in kw.items():
            setattr(self, k, v)


# -------------------------------------------------------------------------------- standard (ReLU)
class _DenseEncode(torch.autograd.Function):
    """``(x - b_dec) @ W_enc + b_enc`` whose backward skips the ``[batch, d_in]`` input gradient.

    Autograd would compute ``g @ W_enc.T`` (a full batch x d_sae x d_in matmul) only to sum it into
    ``b_dec``'s gradient; since the batch needs no gradient, ``-W_enc @ g.sum(0)`` is the same value
    at the cost of a matrix-vector product (one of the six big matmuls of a dense step saved).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
        sae_in = x - b_dec
        ctx.save_for_backward(sae_in, W_enc)
        return torch.addmm(b_enc, sae_in, W_enc)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        sae_in, W_enc = ctx.saved_tensors
        grad_b_enc = g.sum(dim=0)
        grad_x = g @ W_enc.T if ctx.needs_input_grad[0] else None
        return grad_x, sae_in.T @ g, grad_b_enc, -(W_enc @ grad_b_enc)


def _encode_pre(sae: BaseSAE, x: torch.Tensor) -> torch.Tensor:
    """Encoder pre-activations for a 2-D training batch (see :class:`_DenseEncode`)."""
    return _DenseEncode.apply(x, sae.W_enc, sae.b_enc, sae.b_dec)


@register("relu")
class StandardSAE(BaseSAE):
    """Standard ReLU SAE with an L1 penalty, training semantics of SAELens' ``StandardTrainingSAE``.

    ``f = relu((x - b_dec) @ W_enc + b_enc)``, ``x̂ = f @ W_dec + b_dec``. Loss: ``mse`` (sum over
    d, mean over batch) + ``c_t * mean_batch ||f * ||W_dec_i|| ||_p`` with ``p = lp_norm`` and
    ``c_t = l1_coefficient * min(t / l1_warm_up_steps, 1)`` at step ``t``
    (:func:`warm_up_coefficient`). Saved as SAELens ``standard``.
    """

    saved_architecture = "standard"
    sae_lens_training_architecture = "standard"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.b_dec) @ self.W_enc + self.b_enc).relu()

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def l1_coefficient_at(self, step: int) -> float:
        return warm_up_coefficient(self.cfg.l1_coefficient, self.cfg.l1_warm_up_steps, step)

    def training_forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None,
                         return_feature_acts: bool = True, *, step: int = 0) -> dict[str, Any]:
        self._check_batch(x)
        f = _encode_pre(self, x).relu()
        x_hat = self.decode(f)
        mse = (x_hat - x).pow(2).sum(dim=-1).mean()
        sparsity = (f * self.W_dec.norm(dim=1)).norm(p=self.cfg.lp_norm, dim=-1)
        l1 = (self.l1_coefficient_at(step) * sparsity).mean()
        return _dense_result(mse, {"mse_loss": mse, "l1_loss": l1}, f, return_feature_acts)

    @classmethod
    def config_from_sae_lens(cls, cfg: dict[str, Any]) -> SAEConfig:
        return SAEConfig(architecture="relu", width=int(cfg["d_sae"]), normalize_activations="none")


def _dense_result(mse: torch.Tensor, losses: dict[str, torch.Tensor], f: torch.Tensor,
                  return_feature_acts: bool) -> dict[str, Any]:
    aux = mse.new_zeros(())
    for name, value in losses.items():
        if name != "mse_loss":
            aux = aux + value
    with torch.no_grad():
        active = f > 0
        fired = active.any(dim=0)
        l0 = active.sum(dim=-1).float().mean()
    return {"loss": mse + aux, "mse": mse, "aux": aux, "losses": losses,
            "feature_acts": f.detach() if return_feature_acts else None, "fired": fired, "l0": l0}


# -------------------------------------------------------------------------------------- JumpReLU
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


@register("jumprelu")
class JumpReLUSAE(BaseSAE):
    """JumpReLU SAE, training semantics of SAELens' ``JumpReLUTrainingSAE`` (SPEC 3.2).

    ``h = (x - b_dec) @ W_enc + b_enc``, ``f = h * 1[h > θ]`` with a learnt per-latent threshold θ
    (a float32 parameter stored as the raw threshold, not its log, initialised to
    ``jumprelu_init_threshold``; SAELens 6.54.12 does the same, and :func:`load_sae` converts an
    older ``log_threshold`` by ``exp``). Gradients reach θ through straight-through estimators with
    a rectangle kernel of width ``ε = jumprelu_bandwidth`` (to the pre-activations too when
    ``jumprelu_ste_to_input``). Loss: ``mse`` + ``c_t * mean_batch(sparsity)`` with
    ``c_t = l0_coefficient * min(t / l0_warm_up_steps, 1)`` and sparsity ``sum_i 1[h_i > θ_i]``
    (``step``) or ``sum_i tanh(jumprelu_tanh_scale * f_i * ||W_dec_i||)`` (``tanh``); optionally
    + ``pre_act_loss_coefficient * mean_batch sum_i relu(θ_i - h_i) * dead_i * ||W_dec_i||``.

    :meth:`after_step` projects θ onto ``>= 0`` (SAELens does it before each training forward;
    the values the forwards see are the same). Inference: ``f = relu(h) * 1[h > θ]`` (SAELens'
    ``JumpReLUSAE``; equal to the training activation for θ >= 0). Saved as SAELens ``jumprelu``.
    """

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

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

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
        x_hat = self.decode(f)
        mse = (x_hat - x).pow(2).sum(dim=-1).mean()
        w_norm = self.W_dec.norm(dim=1)
        coef = self.l0_coefficient_at(step)
        if cfg.jumprelu_sparsity_loss_mode == "step":
            per_row = _StepFn.apply(h, theta, eps, ste_in).sum(dim=-1)
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
        return _dense_result(mse, losses, f, return_feature_acts)

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

    def inference_tensors(self) -> dict[str, torch.Tensor]:
        t = super().inference_tensors()
        t["threshold"] = self.threshold.detach().to("cpu", torch.float32).clone().contiguous()
        return t

    @classmethod
    def inference_tensor_shapes(cls, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
        return {**super().inference_tensor_shapes(d_in, d_sae), "threshold": (d_sae,)}

    @torch.no_grad()
    def load_inference_tensors(self, state: dict[str, torch.Tensor]) -> None:
        super().load_inference_tensors(state)
        self.threshold.copy_(state["threshold"].to(torch.float32))

    @classmethod
    def config_from_sae_lens(cls, cfg: dict[str, Any]) -> SAEConfig:
        return SAEConfig(architecture="jumprelu", width=int(cfg["d_sae"]), normalize_activations="none")


# ------------------------------------------------------------------------------------ disk format
def _check_jsonable(name: str, value: Any) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be JSON-serialisable (plain str/int/float/bool/list/dict): {exc}") from exc


def save_sae(sae: BaseSAE, out_dir: str | Path, cfg_extra: dict[str, Any] | None = None,
             training_info: dict[str, Any] | None = None) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout) into ``out_dir``.

    ``cfg_extra`` goes into ``cfg.json``'s ``metadata`` (SAELens reads e.g. ``model_name``,
    ``hook_name``, ``context_size``, ``prepend_bos`` from there). ``training_info`` is stored in
    our own ``saeflow`` block next to the full :class:`SAEConfig`. The SAE must already work on raw
    activations (activation scaling folded in); decoder norms are folded on save (TopK with
    rescaling), without modifying ``sae``. Each file is written atomically.

    ``cfg.json``'s ``architecture`` is the SAELens inference architecture
    (:attr:`BaseSAE.saved_architecture`: ``relu`` -> ``standard``, ``batchtopk`` / ``matryoshka``
    -> ``jumprelu``); ``metadata.training_architecture`` names the SAELens training architecture.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    cfg_extra = dict(cfg_extra or {})
    _check_jsonable("cfg_extra", cfg_extra)
    _check_jsonable("training_info", training_info or {})
    tensors = sae.inference_tensors()
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"refusing to save an SAE whose {name} holds NaN/inf values")
    cfg: dict[str, Any] = {
        "architecture": sae.saved_architecture or sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **sae.sae_lens_cfg_fields(),
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": SAELENS_FORMAT_VERSION,
            "training_architecture": sae.sae_lens_training_architecture or sae.architecture,
            **cfg_extra,
        },
        "saeflow": {
            "format_version": SAEFLOW_FORMAT_VERSION,
            "sae_config": sae.cfg.model_dump(mode="json"),
            "training_info": training_info or {},
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{SAE_WEIGHTS_FILENAME}.")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out_dir / SAE_WEIGHTS_FILENAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_json_atomic(out_dir / SAE_CFG_FILENAME, cfg)
    return out_dir


#: SAELens inference architecture -> registered architecture that loads a foreign (SAELens-written,
#: no ``saeflow`` block) SAE of that kind.
FOREIGN_ARCHITECTURES = {"topk": "topk", "standard": "relu", "jumprelu": "jumprelu"}


def saved_hook(path: str | Path) -> str | None:
    """The hook an SAE folder says it reads (``metadata.hook_name`` of its ``cfg.json``), if recorded."""
    cfg_file = Path(path) / SAE_CFG_FILENAME
    if not cfg_file.exists():
        return None
    return (json.loads(cfg_file.read_text()).get("metadata") or {}).get("hook_name")


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> BaseSAE:
    """Load an SAE folder written by :func:`save_sae` (or a SAELens standard / TopK / JumpReLU SAE).

    A folder with a ``saeflow`` block comes back as the architecture that was trained (e.g. a
    ``batchtopk`` SAE, saved as SAELens ``jumprelu``, loads as :class:`BatchTopKSAE` with its
    threshold); a foreign folder as :data:`FOREIGN_ARCHITECTURES` says. Raises
    :class:`SAEFormatError` naming the file when the folder, ``cfg.json`` or the weights are
    missing, unreadable, corrupt or of the wrong shape.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, w_path = path / SAE_CFG_FILENAME, path / SAE_WEIGHTS_FILENAME
    hint = "re-run the training stage to rebuild it"
    if not path.is_dir():
        raise SAEFormatError(f"SAE folder {path} does not exist; {hint}")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise SAEFormatError(f"SAE folder {path} has no {p.name}: it is partial; {hint}")
    try:
        raw = json.loads(cfg_path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("top level is not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise SAEFormatError(f"{cfg_path} is not valid JSON ({exc}): the file is corrupt; {hint}") from exc

    arch = raw.get("architecture")
    saved_kinds = {c.saved_architecture for c in REGISTRY.values()} | set(FOREIGN_ARCHITECTURES)
    if arch not in saved_kinds:
        raise SAEFormatError(
            f"{cfg_path}: architecture {arch!r} is not supported; registered: {', '.join(sorted(REGISTRY))} "
            f"(loadable cfg.json architectures: {', '.join(sorted(saved_kinds))})"
        )
    try:
        d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
        block = raw.get("saeflow")
        if isinstance(block, dict) and "sae_config" in block:
            sae_cfg = SAEConfig.model_validate(block["sae_config"])
            cls = REGISTRY[sae_cfg.architecture]
        else:
            cls = REGISTRY[FOREIGN_ARCHITECTURES[str(arch)]]
            sae_cfg = cls.config_from_sae_lens(raw)
    except SAEFormatError:
        raise
    except Exception as exc:
        raise SAEFormatError(f"{cfg_path} lacks or has invalid fields ({exc}); {hint}") from exc
    if cls.saved_architecture != arch or sae_cfg.width != d_sae:
        raise SAEFormatError(
            f"{cfg_path} is inconsistent: architecture={arch!r}, d_sae={d_sae} but the saeflow block says "
            f"architecture={sae_cfg.architecture!r} (saved as {cls.saved_architecture!r}), width={sae_cfg.width}; {hint}"
        )
    if raw.get("normalize_activations", "none") != "none":
        raise SAEFormatError(
            f"{cfg_path} has normalize_activations={raw['normalize_activations']!r}; only SAEs that work on raw "
            "activations (normalize_activations='none', the scaling folded into the weights) can be loaded"
        )
    if not raw.get("apply_b_dec_to_input", True):
        raise SAEFormatError(f"{cfg_path} has apply_b_dec_to_input=false, which saeflow SAEs do not support")
    if raw.get("reshape_activations", "none") != "none":
        raise SAEFormatError(f"{cfg_path} has reshape_activations={raw['reshape_activations']!r}; only 'none' is supported")

    try:
        state = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SAEFormatError(f"{w_path} is unreadable or corrupt ({exc}); {hint}") from exc
    if "log_threshold" in state and "threshold" not in state:  # older SAELens JumpReLU checkpoints
        state["threshold"] = state.pop("log_threshold").float().exp()
    expected = cls.inference_tensor_shapes(d_in, d_sae)
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise SAEFormatError(
            f"{w_path} holds tensors {sorted(state)}; expected exactly {list(expected)} "
            f"(missing {missing}, unexpected {extra}); {hint}"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise SAEFormatError(
                f"{w_path}: {name} has shape {tuple(state[name].shape)} but cfg.json (d_in={d_in}, "
                f"d_sae={d_sae}) needs {shape}; the folder is inconsistent; {hint}"
            )
    sae = cls(sae_cfg, d_in, seed=0)
    try:
        sae.load_inference_tensors(state)
    except ValueError as exc:
        raise SAEFormatError(f"{w_path}: {exc}; {hint}") from exc
    return sae.to(device)
