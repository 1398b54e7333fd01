"""Device selection shared by every stage."""

from __future__ import annotations

import re

import torch

_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_device(pref: str = "auto") -> torch.device:
    """Resolve a device preference to a :class:`torch.device`.

    ``auto`` picks ``cuda`` when a GPU is visible, else ``cpu``. ``cpu``, ``cuda``, ``cuda:N`` and
    ``mps`` are accepted; asking for a device that is not available raises :class:`ValueError`
    saying what to use instead.
    """
    p = (pref or "auto").strip().lower()
    if p == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if p == "cpu":
        return torch.device("cpu")
    m = _CUDA_RE.match(p)
    if m:
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {pref!r} requested but CUDA is not available on this machine "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                "use device 'cpu' or 'auto'"
            )
        if m.group(1) is not None:
            idx = int(m.group(1))
            n = torch.cuda.device_count()
            if idx >= n:
                raise ValueError(
                    f"device {pref!r} requested but only {n} CUDA device(s) exist (cuda:0..cuda:{n - 1}); "
                    "pick an existing index or use 'cuda' / 'auto'"
                )
            return torch.device("cuda", idx)
        return torch.device("cuda")
    if p == "mps":
        if not _mps_available():
            raise ValueError("device 'mps' requested but Apple MPS is not available here; use 'cpu' or 'auto'")
        return torch.device("mps")
    raise ValueError(f"unknown device {pref!r}: use one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
