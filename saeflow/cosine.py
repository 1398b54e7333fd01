"""The one chunked max-cosine helper (decoder geometry in metrics, stitching and meta-SAEs)."""

from __future__ import annotations

import torch
from torch import Tensor

#: Similarity entries per chunk when ``chunk_rows`` is not given (~64 MB of float32).
COSINE_CHUNK_ELEMENTS = 16 * 1024 * 1024


def sample_rows(n: int, max_rows: int, seed: int) -> Tensor:
    """A seeded uniform sample of ``max_rows`` of ``n`` row indices (without replacement), sorted: the
    rows a max-cosine average or distribution of a wide SAE is estimated from."""
    return torch.randperm(int(n), generator=torch.Generator().manual_seed(int(seed)))[:max_rows].sort().values


def unit_rows(x: Tensor) -> Tensor:
    """Rows of ``x`` (float32) scaled to unit norm; zero rows stay zero (cosine 0 with everything)."""
    v = x.detach().float()
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def max_cosine(rows: Tensor, others: Tensor | None = None, *, chunk_rows: int | None = None,
               normalize: bool = True, subset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """For each row of ``rows`` [n, d]: its largest cosine similarity to a row of ``others`` [m, d]
    and that row's index, as float32 / int64 tensors [n] on ``rows.device``.

    ``others=None`` compares ``rows`` with themselves, excluding each row itself (n == 1 gives NaN
    and index -1); there, ``subset`` (row indices) computes the values of those rows only (each
    against every other row), in that order. ``normalize=False`` takes the inputs as unit rows
    already (plain dot products). Memory is ``O(chunk_rows * m)``: the similarity matrix is built
    ``chunk_rows`` rows at a time (default about 16M entries per chunk).
    """
    a = unit_rows(rows) if normalize else rows.detach().float()
    self_compare = others is None
    if subset is not None and not self_compare:
        raise ValueError("max_cosine: subset is for comparing rows with themselves (others=None)")
    if self_compare:
        b = a
    else:
        b = (unit_rows(others) if normalize else others.detach().float()).to(a.device)
    which = torch.arange(a.shape[0], device=a.device) if subset is None else torch.as_tensor(subset, device=a.device).long()
    n, m = which.shape[0], b.shape[0]
    values = torch.full((n,), float("nan"), device=a.device)
    index = torch.full((n,), -1, dtype=torch.int64, device=a.device)
    if n == 0 or m == 0 or (self_compare and m < 2):
        return values, index
    step = chunk_rows if chunk_rows is not None else max(1, COSINE_CHUNK_ELEMENTS // m)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        sims = (a[lo:hi] if subset is None else a[which[lo:hi]]) @ b.T
        if self_compare:
            r = torch.arange(hi - lo, device=a.device)
            sims[r, which[lo:hi]] = -float("inf")
        values[lo:hi], index[lo:hi] = sims.max(dim=1)
    return values, index
