"""What the evaluations share."""

from __future__ import annotations

import json
import pkgutil
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saeflow.config import K_ARCHITECTURES


# ------------------------------------------------------------------------ absorption and probing
def package_modules(package: str) -> tuple[str, ...]:
    """``package`` and every module in it (sorted): what an evaluation's code version hashes, so an
    edit in any module of its subpackage gives its stages new fingerprints."""
    path = import_module(package).__path__
    return (package, *sorted(f"{package}.{m.name}" for m in pkgutil.iter_modules(path)))


@torch.no_grad()
def encode_rows(sae: Any, x: Tensor | np.ndarray, batch_size: int) -> Tensor:
    """``sae.encode`` over the rows of ``x`` in batches of ``batch_size``, on the SAE's device:
    ``[n, d_sae]`` float32 on the CPU."""
    dev = sae.W_dec.device
    x = torch.as_tensor(x)
    parts = [sae.encode(x[s:s + batch_size].to(dev, torch.float32)).float().cpu()
             for s in range(0, x.shape[0], batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, sae.W_dec.shape[0])


def sae_info(sae_dir: str | Path) -> dict[str, Any]:
    """``{"architecture", "width", "k"}`` of an SAE folder, from its ``cfg.json``: the saeflow block's
    architecture (else the file's, for a SAELens-written SAE), ``d_sae``, and ``k`` for a k-based
    architecture trained here (else ``None``)."""
    raw = json.loads((Path(sae_dir) / "cfg.json").read_text())
    cfg = (raw.get("saeflow") or {}).get("sae_config") or {}
    return {"architecture": cfg.get("architecture", raw.get("architecture")), "width": int(raw["d_sae"]),
            "k": cfg.get("k") if cfg.get("architecture") in K_ARCHITECTURES else None}
