"""From S to L: the interpolation events, the exact per-event MSE curve and the fully evaluated
curve points (:mod:`saeflow.evals.stitching`, step 4)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import Tensor

from saeflow.evals.stitching.forms import inserted_acts, stitched_sae, unit_acts, unit_decoder
from saeflow.evals.stitching.latents import NOVEL
from saeflow.evals.stitching.pairing import StitchingError
from saeflow.saes import BaseSAE
from saeflow.saes.base import encode_block_rows

__all__ = ["Event", "interpolation_events", "event_states", "event_mse_curve", "curve_points", "changing_events",
           "count_violations", "evaluate_curve"]


@dataclass
class Event:
    """One step from S towards L: add these L latents, remove these S latents (``finish``: also
    switch to L's ``b_dec`` and biases, which yields L itself)."""

    kind: str  # "insert" | "swap" | "finish"
    add: list[int] = field(default_factory=list)
    remove: list[int] = field(default_factory=list)


def interpolation_events(classes: np.ndarray, delta_mse: np.ndarray, max_cos: np.ndarray, match: np.ndarray,
                         n_small: int, novel_order: str = "delta_mse", swap_order: str = "cosine",
                         swap_rule: str = "argmax",
                         edges: tuple[np.ndarray, np.ndarray] | None = None) -> list[Event]:
    """Novel inserts, then swaps, then ``finish`` (the S latents no swap removed leave, ``b_dec``
    becomes L's).

    A swap adds a group of non-novel L latents and removes the S latents they match: the connected
    components of the bipartite graph with an edge ``(j, match_j)`` for every non-novel L latent j
    (``swap_rule="argmax"``: each component is one S latent and the L latents whose argmax it is),
    plus, with ``swap_rule="threshold"``, every edge ``(j, i)`` of ``edges`` (``(j, i)`` arrays of
    the pairs with ``C_ji >= tau``, :func:`~saeflow.evals.stitching.latents.cosine_edges`; edges of
    novel L latents are ignored). Each S latent is removed once, by the one swap of its component;
    ``swap_order`` orders the components (highest max cosine of their L latents first, or lowest
    summed ΔMSE), ties by their smallest S latent."""
    c, d, s, m = (np.asarray(a) for a in (classes, delta_mse, max_cos, match))
    novel = np.flatnonzero(c == NOVEL)
    if novel_order == "delta_mse":
        novel = novel[np.lexsort((novel, d[novel]))]
    elif novel_order == "cosine":
        novel = novel[np.lexsort((novel, s[novel]))]
    else:
        raise StitchingError(f"unknown novel_order {novel_order!r}: use 'delta_mse' or 'cosine'")
    if swap_order not in ("cosine", "delta_mse"):
        raise StitchingError(f"unknown swap_order {swap_order!r}: use 'cosine' or 'delta_mse'")
    events = [Event("insert", add=[int(j)]) for j in novel]
    rest = c != NOVEL
    ej, ei = np.flatnonzero(rest), m[rest].astype(np.int64)
    if swap_rule == "threshold":
        if edges is None:
            raise StitchingError("swap_rule 'threshold' needs the cosine edges (j, i) with C_ji >= tau")
        tj, ti = (np.asarray(a, dtype=np.int64) for a in edges)
        keep = rest[tj]
        ej, ei = np.concatenate([ej, tj[keep]]), np.concatenate([ei, ti[keep]])
    elif swap_rule != "argmax":
        raise StitchingError(f"unknown swap_rule {swap_rule!r}: use 'argmax' or 'threshold'")
    # nodes: S latents 0..n_small-1, L latent j is node n_small + j
    n = n_small + c.size
    graph = coo_matrix((np.ones(ej.size), (ei, ej + n_small)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    groups: dict[int, tuple[list[int], list[int]]] = {}
    for i in np.unique(ei):
        groups.setdefault(int(comp[i]), ([], []))[1].append(int(i))
    for j in np.flatnonzero(rest):
        groups[int(comp[n_small + j])][0].append(int(j))
    if swap_order == "cosine":
        key = {g: (-float(s[a].max()), r[0]) for g, (a, r) in groups.items()}
    else:
        key = {g: (float(d[a].sum()), r[0]) for g, (a, r) in groups.items()}
    for g in sorted(groups, key=key.__getitem__):
        events.append(Event("swap", add=groups[g][0], remove=groups[g][1]))
    removed = {i for _, r in groups.values() for i in r}
    events.append(Event("finish", remove=[i for i in range(n_small) if i not in removed]))
    return events


def event_states(events: Sequence[Event], n_small: int, n_large: int) -> Iterable[tuple[np.ndarray, np.ndarray, bool]]:
    """``(keep_S, incl_L, finished)`` boolean masks before any event, then after each."""
    keep, incl, done = np.ones(n_small, bool), np.zeros(n_large, bool), False
    yield keep.copy(), incl.copy(), done
    for e in events:
        keep[e.remove] = False
        incl[e.add] = True
        done = done or e.kind == "finish"
        yield keep.copy(), incl.copy(), done


class _Columns:
    """Activations ``[N, n]`` stored by column (CSC-like) for cheap per-latent access."""

    def __init__(self, n_latents: int, device: torch.device) -> None:
        self.n, self.device = n_latents, device
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []

    def add(self, f: Tensor, row0: int) -> None:
        col, row = f.T.nonzero(as_tuple=True)
        self.parts.append((col, row + row0, f.T[col, row]))

    def finish(self) -> None:
        col = torch.cat([p[0] for p in self.parts])
        row = torch.cat([p[1] for p in self.parts])
        val = torch.cat([p[2] for p in self.parts])
        order = torch.argsort(col, stable=True)
        self.row, self.val = row[order], val[order].double()
        self.ptr = torch.searchsorted(col[order], torch.arange(self.n + 1, device=col.device)).tolist()
        self.parts = []

    def column(self, j: int) -> tuple[Tensor, Tensor]:
        a, b = self.ptr[j], self.ptr[j + 1]
        return self.row[a:b], self.val[a:b]


@torch.no_grad()
def event_mse_curve(small: BaseSAE, large: BaseSAE, x: Tensor, events: Sequence[Event],
                    adjust_encoder_bias: bool = True, row_chunk: int = 4096) -> np.ndarray:
    """Exact MSE (``mean_t ||x_t - x̂_t||²``) of the stitched SAE before any event and after each,
    by sparse rank-1 updates of a float64 residual (cost ~ the number of firings moved). The rows
    are encoded ``row_chunk`` at a time, fewer for SAEs above 32k latents
    (:func:`saeflow.saes.base.encode_block_rows`); the latents are kept by column, sparse."""
    S, L = small, large
    dev = S.W_dec.device
    x = x.to(dev, torch.float32)
    N = x.shape[0]
    L.to(dev)
    US, ms = unit_decoder(S)
    UL, ml = unit_decoder(L)
    cs, cl = _Columns(S.d_sae, dev), _Columns(L.d_sae, dev)
    resid = torch.empty(N, S.d_in, dtype=torch.float64, device=dev)
    step = encode_block_rows(max(S.d_sae, L.d_sae), row_chunk)  # row_chunk rows up to 32k latents
    for lo in range(0, N, step):
        xb = x[lo:lo + step]
        cs.add(unit_acts(S, xb, ms), lo)
        cl.add(inserted_acts(S, L, xb, adjust_encoder_bias, ml), lo)
        resid[lo:lo + step] = (xb - S(xb)).double()
    cs.finish()
    cl.finish()
    # decoder rows in float64 as each event needs them (a float64 copy of a 262k decoder is 1.3 GB)
    se = float(resid.pow(2).sum())
    out = [se / N]
    for e in events:
        if e.kind == "finish":
            se = 0.0
            for lo in range(0, N, step):
                xb = x[lo:lo + step]
                se += float((xb - L(xb)).double().pow(2).sum())
            out.append(se / N)
            continue
        touched = [cl.column(j)[0] for j in e.add] + [cs.column(i)[0] for i in e.remove]
        touched = [t for t in touched if t.numel()]
        if not touched:
            out.append(se / N)
            continue
        rows_all = torch.unique(torch.cat(touched))
        before = float(resid[rows_all].pow(2).sum())
        for j in e.add:
            rows, vals = cl.column(j)
            resid.index_add_(0, rows, -vals[:, None] * UL[j].double()[None, :])
        for i in e.remove:
            rows, vals = cs.column(i)
            resid.index_add_(0, rows, vals[:, None] * US[i].double()[None, :])
        se += float(resid[rows_all].pow(2).sum()) - before
        out.append(se / N)
    return np.asarray(out)


def curve_points(n_events: int, n_steps: int, changes: Sequence[bool] | None = None) -> list[int]:
    """Event counts (0 = S, ``n_events`` = L) of the fully evaluated curve points, evenly spaced.

    With ``changes`` (per event: does it change the reconstruction at all?), the points are spaced
    evenly over the events that do, so swaps of latents dead on the rows (no-ops) do not use up the
    budget."""
    if changes is None:
        return sorted({int(round(p * n_events / n_steps)) for p in range(n_steps + 1)})
    after = [e + 1 for e, c in enumerate(changes) if c]
    if not after:
        return sorted({0, n_events})
    picks = {after[int(round(p * (len(after) - 1) / n_steps))] for p in range(1, n_steps + 1)}
    return sorted({0, n_events} | picks)


def changing_events(fine_mse: np.ndarray) -> np.ndarray:
    """Per event: does the exact MSE change (bitwise) across it? (No-op swaps of dead latents do not.)"""
    f = np.asarray(fine_mse)
    return f[1:] != f[:-1]


def count_violations(values: Sequence[float], rel_tol: float = 1e-6) -> int:
    """Steps at which ``values`` rises by more than ``rel_tol`` of the previous value (the default
    ignores float32 rounding, e.g. a swap of two identical latents)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return 0
    return int(np.sum(v[1:] > v[:-1] + rel_tol * np.abs(v[:-1])))


def evaluate_curve(small: BaseSAE, large: BaseSAE, events: Sequence[Event], points: Sequence[int],
                   evaluate: Callable[[BaseSAE], dict[str, Any]], adjust_encoder_bias: bool = True) -> pd.DataFrame:
    """Build the stitched SAE after ``p`` events for each ``p`` in ``points`` and ``evaluate`` it;
    one row per point with ``events_done``, ``n_latents``, ``n_small_kept``, ``n_large_included``
    and whatever ``evaluate`` returns (scalars only)."""
    want = set(points)
    rows = []
    for p, (keep, incl, done) in enumerate(event_states(events, small.d_sae, large.d_sae)):
        if p not in want:
            continue
        sae = stitched_sae(small, large, keep, incl, done, adjust_encoder_bias)
        res = evaluate(sae)
        rows.append({"events_done": p, "n_latents": int(sae.d_sae), "n_small_kept": 0 if done else int(keep.sum()),
                     "n_large_included": int(large.d_sae) if done else int(incl.sum()),
                     **{k: v for k, v in res.items() if isinstance(v, (int, float))}})
    return pd.DataFrame(rows)
