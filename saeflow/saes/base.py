"""The shared SAE contract: :class:`BaseSAE` (parameters, SAELens initialisation, folding, saving
hooks), :func:`build_sae` and the small helpers every architecture uses.

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
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from saeflow.saes.config import SAEConfig
from saeflow.saes.registry import REGISTRY
from saeflow.saes.errors import SAEFormatError

__all__ = ["BaseSAE", "SAEShape", "build_sae", "warm_up_coefficient", "dense_training_result", "TENSOR_NAMES",
           "ENCODE_BLOCK_ELEMENTS", "encode_block_rows", "fits_dense", "reconstruct_in_blocks", "without_init"]

TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")

#: Latent activations (rows x latents) materialised at once wherever rows are streamed through an
#: SAE's ``encode`` (core metrics, the browser, the evaluations): 2^27 float32 = 512 MiB, so a
#: 4,096-row batch is one block up to 32k latents and a 262k-latent SAE is encoded 512 rows at a
#: time (issue #27). Above it, the evaluations keep encodings sparse (:func:`fits_dense`).
ENCODE_BLOCK_ELEMENTS = 1 << 27


_INIT = threading.local()


@contextmanager
def without_init() -> Iterator[None]:
    """SAEs built inside the block skip the random initialisation of ``W_enc`` / ``W_dec`` (left
    uninitialised, so their memory is never touched): for SAEs whose weights are loaded right after
    (:meth:`BaseSAE.load_inference_tensors` with ``take=True``). Per thread."""
    before = getattr(_INIT, "skip", False)
    _INIT.skip = True
    try:
        yield
    finally:
        _INIT.skip = before


def encode_block_rows(width: int, cap: int | None = None) -> int:
    """Rows per encode block for an SAE of ``width`` latents (:data:`ENCODE_BLOCK_ELEMENTS`), at
    least 1 and at most ``cap``."""
    rows = max(1, ENCODE_BLOCK_ELEMENTS // max(1, int(width)))
    return rows if cap is None else max(1, min(int(cap), rows))


@torch.no_grad()
def reconstruct_in_blocks(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """``sae.decode(sae.encode(x))`` for rows ``x`` [N, d_in], encoded in row blocks of
    :func:`encode_block_rows` (one block up to 32k latents at 4,096 rows)."""
    step = encode_block_rows(int(sae.W_dec.shape[0]), x.shape[0])
    if step >= x.shape[0]:
        return sae.decode(sae.encode(x))
    return torch.cat([sae.decode(sae.encode(x[s:s + step])) for s in range(0, x.shape[0], step)])


def fits_dense(rows: int, width: int) -> bool:
    """Whether ``rows`` x ``width`` latent activations fit one encode block (else keep them sparse)."""
    return int(rows) * int(width) <= ENCODE_BLOCK_ELEMENTS


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


class SAEShape:
    """``d_in`` and ``d_sae`` of a module with a decoder ``W_dec`` ``[d_sae, d_in]``: every
    :class:`BaseSAE`, and SAE-like modules such as the stitching evaluation's composite SAE."""

    W_dec: torch.Tensor

    @property
    def d_in(self) -> int:
        return int(self.W_dec.shape[1])

    @property
    def d_sae(self) -> int:
        return int(self.W_dec.shape[0])


class BaseSAE(SAEShape, nn.Module):
    """Common parameters, SAELens initialisation (SPEC 3.1) and weight folding.

    Initialisation: ``W_dec`` (d_sae, d_in) is kaiming-uniform, each row is rescaled to norm
    ``cfg.effective_decoder_init_norm()``, ``W_enc = W_dec.T`` and both biases are zero (a
    data-dependent ``b_dec``, ``cfg.b_dec_init``, is set by the trainer). The random draw uses a
    local ``torch.Generator`` seeded with ``seed``; the global RNG is neither read nor advanced.
    """

    #: Registry name (``sae.architecture`` in a profile); equal to its key in :mod:`saeflow.saes.registry`.
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
        if getattr(_INIT, "skip", False):  # weights about to be replaced (without_init): allocate, never touch
            self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
            self.b_enc = nn.Parameter(torch.zeros(d_sae))
            self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
            self.b_dec = nn.Parameter(torch.zeros(d_in))
            return
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        w_dec = torch.empty(d_sae, d_in, dtype=torch.float32)
        nn.init.kaiming_uniform_(w_dec, generator=gen)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * cfg.effective_decoder_init_norm()
        self.W_enc = nn.Parameter(w_dec.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(w_dec.contiguous())
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    # ------------------------------------------------------------------ interface
    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Latent activations ``[..., d_sae]`` of raw inputs ``x`` ``[..., d_in]``."""
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., d_in]`` from latent activations ``[..., d_sae]``: ``f @ W_dec + b_dec``."""
        return f @ self.W_dec + self.b_dec

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
        """Contiguous CPU float32 copies of the weights as they should be saved (with the per-latent
        ``threshold`` when saved as SAELens ``jumprelu``)."""
        t = {name: _saved_copy(getattr(self, name)) for name in TENSOR_NAMES}
        if self.saved_architecture == "jumprelu":
            t["threshold"] = _saved_copy(self.jumprelu_threshold())
        return t

    @classmethod
    def inference_tensor_shapes(cls, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor in a saved ``sae_weights.safetensors``."""
        shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        if cls.saved_architecture == "jumprelu":
            shapes["threshold"] = (d_sae,)
        return shapes

    @torch.no_grad()
    def load_inference_tensors(self, state: dict[str, torch.Tensor], take: bool = False) -> None:
        """Copy saved tensors (already checked against :meth:`inference_tensor_shapes`) into the SAE.
        ``take``: the float32 weight tensors become the SAE's parameters without a copy (the caller
        hands them over; with :func:`without_init`, loading a 262k-latent SAE holds its weights once)."""
        for name in TENSOR_NAMES:
            if take:
                old = getattr(self, name)
                setattr(self, name, nn.Parameter(state[name].to(torch.float32).contiguous(), requires_grad=old.requires_grad))
            else:
                getattr(self, name).copy_(state[name].to(torch.float32))
        if self.saved_architecture == "jumprelu":
            self.load_jumprelu_threshold(state["threshold"])

    def jumprelu_threshold(self) -> torch.Tensor:  # pragma: no cover - abstract
        """Per-latent threshold θ ``[d_sae]`` of the SAELens ``jumprelu`` form this SAE is saved as."""
        raise NotImplementedError

    def load_jumprelu_threshold(self, threshold: torch.Tensor) -> None:  # pragma: no cover - abstract
        """Set the state that :meth:`jumprelu_threshold` saves from a loaded ``threshold`` ``[d_sae]``."""
        raise NotImplementedError

    def sae_lens_cfg_fields(self) -> dict[str, Any]:
        """Architecture-specific ``cfg.json`` fields for SAELens (besides d_in, d_sae, ...)."""
        return {}

    @classmethod
    def config_from_sae_lens(cls, cfg: dict[str, Any]) -> SAEConfig:
        """An :class:`SAEConfig` for a ``cfg.json`` that has no ``saeflow`` block."""
        raise SAEFormatError(f"cannot rebuild a {cls.architecture!r} SAE config from a foreign cfg.json")


def _saved_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).clone().contiguous()


def dense_training_result(mse: torch.Tensor, losses: dict[str, torch.Tensor], f: torch.Tensor,
                          return_feature_acts: bool) -> dict[str, Any]:
    """The :meth:`BaseSAE.training_forward` result of an SAE with dense latents ``f`` ``[batch, d_sae]``.

    ``losses`` holds every loss term by its SAELens name, the full reconstruction ``mse_loss``
    among them; ``aux`` is the sum of the others and ``loss = mse + aux``.
    """
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
