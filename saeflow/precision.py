"""Numeric precision: which dtype a stage computes in, resolved per machine.

Two fields use it: ``model.dtype`` (the language model's weights and forward passes: extraction and
every evaluation's forward) and ``train.precision`` (the SAE training matmuls). Each takes
``float32``, ``bfloat16`` or ``auto``:

- ``auto`` resolves to ``bfloat16`` where the hardware computes it natively (a CUDA GPU that
  supports bf16; a CPU with the ``avx512_bf16`` or ``amx_bf16`` instructions), else ``float32``.
  On a CPU without them bf16 is emulated and slower than float32 (about 20x measured on an AVX2
  machine of this workplace), so ``auto`` never picks it there.
- The pipeline resolves ``auto`` once, before any fingerprint is taken (:func:`saeflow.config.resolve_precision`,
  called by the pipeline)): the concrete dtype is what keys every artifact and what its
  ``config.json`` records, so a float32 run's artifacts are never reused for a bf16 run.

SAE training in ``bfloat16`` (:func:`matmul_dtype`) is mixed precision, not a bf16 model: weights,
optimiser state, gradients and the loss stay float32; only the big matmuls take bf16 inputs (the
dense encoder of every architecture; for ReLU / JumpReLU also their dense decoder and the weight
gradients). TopK-family SAEs use bf16 only to *select* their latents: the selected latents' values
are recomputed in float32 (``2 * k * d_in`` FLOPs per row), so what enters the loss is float32.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PRECISIONS = ("auto", "float32", "bfloat16")
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

_MATMUL_DTYPE: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("saeflow_matmul_dtype",
                                                                                   default=None)


class PrecisionError(ValueError):
    """A precision that is unknown or cannot run on this machine."""


@dataclass(frozen=True)
class Resolved:
    """A resolved precision: the dtype name and why it was chosen (for the run log)."""

    name: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]


def cpu_bf16_flags(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The native-bf16 instruction flags this CPU reports (Linux ``/proc/cpuinfo``; empty where
    it cannot be read: other systems are treated as having none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags") or line.startswith("Features"):
            flags.update(line.split(":", 1)[-1].split())
    return tuple(f for f in NATIVE_BF16_CPU_FLAGS if f in flags)


def resolve(pref: str, device: torch.device | str, *, cpuinfo: str | None = None) -> Resolved:
    """Resolve ``pref`` (``auto`` / ``float32`` / ``bfloat16``) for ``device``.

    ``SAEFLOW_PRECISION`` (``float32`` / ``bfloat16``), when set, replaces ``auto`` (e.g. to
    measure what a CPU without native bf16 would run); an explicit field value always wins.
    """
    p = (pref or "auto").strip().lower()
    if p not in PRECISIONS:
        raise PrecisionError(f"unknown precision {pref!r}: use one of {', '.join(PRECISIONS)}")
    if p != "auto":
        return Resolved(p, "set in the config")
    env = os.environ.get("SAEFLOW_PRECISION", "").strip().lower()
    if env:
        if env not in ("float32", "bfloat16"):
            raise PrecisionError(f"SAEFLOW_PRECISION={env!r}: use float32 or bfloat16 (or unset it)")
        return Resolved(env, "auto, overridden by SAEFLOW_PRECISION")
    dev = torch.device(device)
    if dev.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            return Resolved("bfloat16", f"auto: {torch.cuda.get_device_name(dev)} computes bf16 natively")
        return Resolved("float32", "auto: this CUDA device has no native bf16")
    if dev.type == "cpu":
        flags = cpu_bf16_flags(cpuinfo)
        if flags:
            return Resolved("bfloat16", f"auto: the CPU has {' and '.join(flags)}")
        return Resolved("float32", f"auto: the CPU ({platform.machine()}) has none of "
                                   f"{', '.join(NATIVE_BF16_CPU_FLAGS)} (bf16 would be emulated, slower than float32)")
    return Resolved("float32", f"auto: float32 on {dev.type}")


def resolve_on(pref: str, device: str | torch.device) -> Resolved | None:
    """:func:`resolve` on the device a ``device`` preference (``auto`` / ``cpu`` / ``cuda:N``) picks;
    ``None`` when that device is not on this machine (a GPU profile read on a CPU machine: it is
    resolved where it runs)."""
    from saeflow.device import pick_device

    try:
        dev = pick_device(device) if isinstance(device, str) else torch.device(device)
    except ValueError:
        return None
    return resolve(pref, dev)


def resolve_field(cfg: Any, field: str, device: torch.device | str) -> Any:
    """``cfg`` (a frozen config) with ``cfg.<field>`` resolved when it is ``auto`` (logged on the
    ``saeflow.precision`` logger); unchanged otherwise."""
    if getattr(cfg, field) != "auto":
        return cfg
    r = resolve("auto", device)
    logging.getLogger(__name__).info("%s auto -> %s (%s)", field, r.name, r.reason)
    return cfg.model_copy(update={field: r.name})


@contextlib.contextmanager
def matmul_dtype(dtype: torch.dtype | str | None) -> Iterator[None]:
    """Within the block, SAE training kernels feed their big matmuls ``dtype`` inputs
    (``None`` / float32: plain float32)."""
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    token = _MATMUL_DTYPE.set(None if dtype in (None, torch.float32) else dtype)
    try:
        yield
    finally:
        _MATMUL_DTYPE.reset(token)


def current_matmul_dtype() -> torch.dtype | None:
    """The dtype set by the innermost :func:`matmul_dtype` (``None``: float32)."""
    return _MATMUL_DTYPE.get()
