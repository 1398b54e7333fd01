"""Sparse autoencoder architectures (one registry, SAELens-style) and the SAELens disk format.

Every architecture subclasses :class:`BaseSAE` and registers itself under a name with
:func:`register`; :func:`build_sae` instantiates one from a :class:`~saeflow.config.SAEConfig`.
The parameters are named and shaped as in SAELens 6.x (SPEC 3.1): ``W_enc`` (d_in, d_sae),
``b_enc`` (d_sae), ``W_dec`` (d_sae, d_in), ``b_dec`` (d_in).

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
    ``cfg.decoder_init_norm``, ``W_enc = W_dec.T`` and both biases are zero. The random draw uses a
    local ``torch.Generator`` seeded with ``seed``; the global RNG is neither read nor advanced.
    """

    architecture: ClassVar[str] = ""

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
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * cfg.decoder_init_norm
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
        self, x: torch.Tensor, dead_mask: torch.Tensor | None, return_feature_acts: bool = True
    ) -> dict[str, torch.Tensor | None]:  # pragma: no cover - abstract
        """One training forward pass on a (pre-scaled) batch ``x`` ``[batch, d_in]``.

        ``dead_mask`` (bool ``[d_sae]``) marks latents counted as dead for auxiliary losses.
        Returns ``loss`` (= ``mse`` + ``aux``, differentiable), ``mse``, ``aux``, ``feature_acts``
        (dense ``[batch, d_sae]``, or ``None`` when ``return_feature_acts`` is false), ``fired``
        (bool ``[d_sae]``: latents active on any row) and ``l0`` (mean active latents per row).
        """
        raise NotImplementedError

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
    def _k_aux(self) -> int:
        return int(self.cfg.aux_k) if self.cfg.aux_k is not None else max(1, self.d_in // 2)

    def training_forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None,
                         return_feature_acts: bool = True) -> dict[str, torch.Tensor | None]:
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"training batch must be [batch, {self.d_in}], got {tuple(x.shape)}")
        if self.sparse_kernels:
            return self._training_forward_sparse(x, dead_mask, return_feature_acts)
        return self._training_forward_dense(x, dead_mask, return_feature_acts)

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
                                return_feature_acts: bool) -> dict[str, torch.Tensor | None]:
        """Reference implementation: the SAELens computation with dense tensors."""
        n = self.W_dec.norm(dim=-1)
        hidden_pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        if self.rescale:
            hidden_pre = hidden_pre * n
        vals, idx = torch.topk(hidden_pre, self.k, dim=-1, sorted=False)
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
                                 return_feature_acts: bool) -> dict[str, torch.Tensor | None]:
        """Same maths as the dense path; only the selected latents enter the backward pass."""
        d_sae = self.d_sae
        n = self.W_dec.norm(dim=-1)  # differentiable (it scales the selection and the decoder)
        inv_n = 1 / n
        sae_in = x - self.b_dec.detach()
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, sae_in, self.W_enc)  # dense [B, d_sae], no graph
            hidden_pre = pre * n if self.rescale else pre
        _, idx = _sorted_topk(hidden_pre, self.k)
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
        "architecture": sae.architecture,
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


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> BaseSAE:
    """Load an SAE folder written by :func:`save_sae` (or a SAELens TopK SAE) onto ``device``.

    Raises :class:`SAEFormatError` naming the file when the folder, ``cfg.json`` or the weights
    are missing, unreadable, corrupt or of the wrong shape.
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
    cls = REGISTRY.get(str(arch))
    if cls is None:
        raise SAEFormatError(
            f"{cfg_path}: architecture {arch!r} is not supported; registered: {', '.join(sorted(REGISTRY))}"
        )
    try:
        d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
        block = raw.get("saeflow")
        if isinstance(block, dict) and "sae_config" in block:
            sae_cfg = SAEConfig.model_validate(block["sae_config"])
        else:
            sae_cfg = cls.config_from_sae_lens(raw)
    except SAEFormatError:
        raise
    except Exception as exc:
        raise SAEFormatError(f"{cfg_path} lacks or has invalid fields ({exc}); {hint}") from exc
    if sae_cfg.architecture != arch or sae_cfg.width != d_sae:
        raise SAEFormatError(
            f"{cfg_path} is inconsistent: architecture={arch!r}, d_sae={d_sae} but the saeflow block says "
            f"architecture={sae_cfg.architecture!r}, width={sae_cfg.width}; {hint}"
        )
    if raw.get("normalize_activations", "none") != "none":
        raise SAEFormatError(
            f"{cfg_path} has normalize_activations={raw['normalize_activations']!r}; only SAEs that work on raw "
            "activations (normalize_activations='none', the scaling folded into the weights) can be loaded"
        )
    if not raw.get("apply_b_dec_to_input", True):
        raise SAEFormatError(f"{cfg_path} has apply_b_dec_to_input=false, which saeflow SAEs do not support")

    try:
        state = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SAEFormatError(f"{w_path} is unreadable or corrupt ({exc}); {hint}") from exc
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
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
    with torch.no_grad():
        for name in expected:
            getattr(sae, name).copy_(state[name].to(torch.float32))
    return sae.to(device)
