"""The latent browser's data: one streaming pass over an activation store with an SAE.

:func:`scan` encodes the store's rows batch by batch and keeps, per latent, the firing count, sum,
max, a log-spaced activation histogram, the ``n_top`` largest activations (value and row) and a
seeded reservoir of random firing rows. Every buffer is ``[width, n]``: memory is bounded by the
SAE's width times ``n``, never by the number of rows. :func:`context_windows` then reads the token
window around each chosen row and re-encodes only those rows for the latent's per-token activations;
:func:`logit_effects` gives the tokens each latent's decoder direction promotes and suppresses
(``W_dec @ W_U``, in blocks of latents).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saeflow.saes.base import encode_block_rows
from saeflow.store import ActivationStore


#: The ``browser`` artifact's files (:func:`save_browser_data`).
DATA_FILE = "latents.npz"
TOKENS_FILE = "tokens.json"


class BrowserInputError(ValueError):
    """Input the latent browser cannot use (a bad setting, an SAE that does not fit the store)."""


class RunningTop:
    """Per group (latent), the ``n`` entries with the largest keys seen so far, each with payload
    values. Ties keep the entry offered first (earlier rows win), so the result does not depend on
    how the stream is batched."""

    def __init__(self, n_groups: int, n: int, payload: dict[str, torch.dtype]) -> None:
        if n < 1:
            raise BrowserInputError(f"n={n}: keep at least one entry per latent (n_top >= 1)")
        self.n_groups, self.n = n_groups, n
        self.keys = torch.full((n_groups, n), -torch.inf)
        self.payload = {name: torch.zeros((n_groups, n), dtype=dt) for name, dt in payload.items()}

    def add(self, group: torch.Tensor, key: torch.Tensor, **payload: torch.Tensor) -> None:
        """Offer entries ``(group[i], key[i], payload[name][i])`` in stream order."""
        better = key > self.keys[group, -1]  # only entries that beat the group's current n-th
        group, key = group[better], key[better]
        if group.numel() == 0:
            return
        held = self.keys > -torch.inf
        held_group = held.nonzero()[:, 0]
        g = torch.cat([held_group, group])
        k = torch.cat([self.keys[held], key])
        p = {name: torch.cat([buf[held], payload[name][better].to(buf.dtype)]) for name, buf in self.payload.items()}
        order = torch.argsort(k, descending=True, stable=True)
        order = order[torch.argsort(g[order], stable=True)]
        g, k = g[order], k[order]
        counts = torch.bincount(g, minlength=self.n_groups)
        rank = torch.arange(g.numel()) - (torch.cumsum(counts, 0) - counts)[g]
        keep = rank < self.n
        g, rank = g[keep], rank[keep]
        self.keys.fill_(-torch.inf)
        self.keys[g, rank] = k[keep]
        for name, buf in self.payload.items():
            buf[g, rank] = p[name][order][keep]


@dataclass
class LatentStats:
    """What :func:`scan` found, per latent (arrays of length / first dimension ``width``)."""

    rows_scanned: int
    count: np.ndarray
    """Rows on which the latent fired (activation > 0)."""
    sum: np.ndarray
    max: np.ndarray
    hist: np.ndarray
    """``[width, bins]`` counts of firing activations per log-spaced bin (:attr:`hist_edges`)."""
    hist_edges: np.ndarray
    top_act: np.ndarray
    """``[width, n_top]`` largest activations, descending; NaN where the latent fired fewer times."""
    top_row: np.ndarray
    """``[width, n_top]`` their store rows (-1 where none)."""
    sample_act: np.ndarray
    """``[width, m]`` activations of random firing rows (reservoir; NaN where empty)."""
    sample_row: np.ndarray

    @property
    def frequency(self) -> np.ndarray:
        return self.count / max(self.rows_scanned, 1)

    @property
    def mean(self) -> np.ndarray:
        """Mean activation over the rows the latent fired on (0 for a latent that never fired)."""
        return np.where(self.count > 0, self.sum / np.maximum(self.count, 1), 0.0)


def hist_edges(bins: int, lo: float, hi: float) -> np.ndarray:
    return np.logspace(np.log10(lo), np.log10(hi), bins + 1)


def _encode(sae, x: torch.Tensor, device) -> torch.Tensor:
    with torch.no_grad():
        return sae.encode(x.to(device, torch.float32)).float().cpu()


def _encode_nonzero(sae, x: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, cols, vals)`` of the positive latent activations of ``x``, row-major (stream order),
    encoding row blocks (:func:`saeflow.saes.base.encode_block_rows`)."""
    step = encode_block_rows(int(sae.W_dec.shape[0]))
    parts = []
    for s in range(0, x.shape[0], step):
        f = _encode(sae, x[s:s + step], device)
        r, c = (f > 0).nonzero(as_tuple=True)
        parts.append((r + s, c, f[r, c]))
    if not parts:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


def scan(sae, store: ActivationStore, n_top: int, n_sample: int = 0, max_rows: int | None = None,
         batch_size: int = 4096, hist_bins: int = 48, hist_range: tuple[float, float] = (1e-3, 1e5),
         seed: int = 0, device: str | torch.device = "cpu", progress=None) -> LatentStats:
    """One pass over rows ``[0, max_rows)`` of ``store`` (all rows when ``None``), encoding each
    batch with ``sae.encode``; see :class:`LatentStats`. ``progress(done, total)`` is called per batch."""
    if n_top < 1:
        raise BrowserInputError(f"n_top={n_top}: the browser needs at least one top context per latent (n_top >= 1)")
    if batch_size < 1:
        raise BrowserInputError(f"batch_size={batch_size} must be >= 1")
    if sae.d_in != store.d_model:
        raise BrowserInputError(f"the SAE reads width {sae.d_in} but the store at {store.root} has width {store.d_model}")
    width = int(sae.W_dec.shape[0])
    end = store.n_rows if max_rows is None else min(store.n_rows, int(max_rows))
    lo, hi = float(np.log10(hist_range[0])), float(np.log10(hist_range[1]))
    count = torch.zeros(width, dtype=torch.int64)
    total = torch.zeros(width, dtype=torch.float64)
    peak = torch.zeros(width)
    hist = torch.zeros(width * hist_bins, dtype=torch.int64)
    top = RunningTop(width, n_top, {"row": torch.int64})
    sample = RunningTop(width, max(n_sample, 1), {"row": torch.int64, "act": torch.float32})
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, end, batch_size):
        rows, cols, vals = _encode_nonzero(sae, torch.from_numpy(store.read(start, min(end, start + batch_size))), device)
        rows = rows + start
        count += torch.bincount(cols, minlength=width)
        total.index_add_(0, cols, vals.double())
        peak.scatter_reduce_(0, cols, vals, reduce="amax")
        b = ((torch.log10(vals) - lo) / (hi - lo) * hist_bins).floor().clamp(0, hist_bins - 1).long()
        hist += torch.bincount(cols * hist_bins + b, minlength=width * hist_bins)
        top.add(cols, vals, row=rows)
        if n_sample > 0:
            sample.add(cols, torch.rand(vals.numel(), generator=gen), row=rows, act=vals)
        if progress is not None:
            progress(min(end, start + batch_size), end)
    held = top.keys > -torch.inf
    s_held = sample.keys > -torch.inf
    return LatentStats(
        rows_scanned=end, count=count.numpy(), sum=total.numpy(), max=peak.numpy(),
        hist=hist.view(width, hist_bins).numpy(), hist_edges=hist_edges(hist_bins, *hist_range),
        top_act=torch.where(held, top.keys, torch.nan).numpy(),
        top_row=torch.where(held, top.payload["row"], -1).numpy(),
        sample_act=torch.where(s_held, sample.payload["act"], torch.nan).numpy()[:, :n_sample],
        sample_row=torch.where(s_held, sample.payload["row"], -1).numpy()[:, :n_sample],
    )


def lower_quantile_rows(stats: LatentStats, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``[width, n]`` rows (and activations) from each latent's random sample of firing rows,
    spread evenly over the sample's activation quantiles (lowest first), skipping rows already among
    its top contexts; -1 / NaN where there are fewer."""
    width = stats.count.shape[0]
    rows = np.full((width, n), -1, dtype=np.int64)
    acts = np.full((width, n), np.nan, dtype=np.float32)
    if n == 0:
        return rows, acts
    for j in range(width):
        ok = stats.sample_row[j] >= 0
        r, a = stats.sample_row[j][ok], stats.sample_act[j][ok]
        fresh = ~np.isin(r, stats.top_row[j])
        r, a = r[fresh], a[fresh]
        if r.size == 0:
            continue
        order = np.argsort(a, kind="stable")
        pick = order[np.unique(np.linspace(0, r.size - 1, min(n, r.size)).round().astype(int))]
        rows[j, :pick.size], acts[j, :pick.size] = r[pick], a[pick]
    return rows, acts


@dataclass
class Windows:
    """Token windows around chosen rows: ``[width, slots, left + 1 + right]``."""

    token: np.ndarray
    """Token id at each window position (-1 outside the row's context or the store), int32."""
    act: np.ndarray
    """The latent's activation on each window token (0 where there is no token)."""
    center: int
    """Index of the chosen row inside each window."""


def context_windows(sae, store: ActivationStore, rows: np.ndarray, left: int, right: int,
                    batch_size: int = 4096, device: str | torch.device = "cpu", latent_block: int = 8192) -> Windows:
    """For ``rows[j, s]`` (a store row chosen for latent ``j``; -1 = none) the tokens from ``left``
    before to ``right`` after it in the same context, with latent ``j``'s activation on each, by
    re-encoding only the rows those windows cover (each once, kept sparse). The windows' bookkeeping
    runs ``latent_block`` latents at a time, so besides the ``[width, slots, span]`` output memory
    grows with the rows re-encoded and their active latents, not with width x slots x span indices
    (issue #27)."""
    import scipy.sparse as sp

    width, slots = rows.shape
    span = left + 1 + right
    offsets = np.arange(-left, right + 1)

    def entries(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Store row of every window position of latents ``lo..hi`` and whether it is one."""
        er = rows[lo:hi, :, None] + offsets[None, None, :]
        return er, (rows[lo:hi, :, None] >= 0) & (er >= 0) & (er < store.n_rows)

    blocks = [(lo, min(lo + latent_block, width)) for lo in range(0, width, latent_block)]
    needed = np.zeros(0, dtype=np.int64)
    for lo, hi in blocks:
        er, used = entries(lo, hi)
        needed = np.union1d(needed, er[used])
    chunk = store.chunk_rows
    step = encode_block_rows(width, batch_size)
    latents, toks, ctxs = [], [], []
    for block in np.unique(needed // chunk):
        s, e = int(block * chunk), int(min(store.n_rows, (block + 1) * chunk))
        here = needed[(needed >= s) & (needed < e)]
        acts = store.read(s, e)[here - s]
        toks.append(store.read_rows("token_ids", s, e)[here - s])
        ctxs.append(store.read_rows("context", s, e)[here - s])
        for b in range(0, here.size, step):
            latents.append(sp.csr_matrix(_encode(sae, torch.from_numpy(acts[b:b + step]), device).numpy()))
    f = sp.vstack(latents, format="csr") if latents else sp.csr_matrix((0, width), dtype=np.float32)
    tok_of = np.concatenate(toks) if toks else np.zeros(0, dtype=np.int64)  # row i of f is store row needed[i]
    ctx_of = np.concatenate(ctxs) if ctxs else np.zeros(0, dtype=np.int64)
    token = np.full((width, slots, span), -1, dtype=np.int32)  # as saved (save_browser_data)
    act = np.zeros((width, slots, span), dtype=np.float32)
    for lo, hi in blocks:
        er, used = entries(lo, hi)
        pos = np.searchsorted(needed, er[used])
        lat = np.broadcast_to(np.arange(lo, hi)[:, None, None], er.shape)[used]
        tk = np.full(er.shape, -1, dtype=np.int64)
        cx = np.full(er.shape, -1, dtype=np.int64)
        a = np.zeros(er.shape, dtype=np.float32)
        tk[used], cx[used] = tok_of[pos], ctx_of[pos]
        a[used] = np.asarray(f[pos, lat]).reshape(-1) if pos.size else 0.0
        same = (cx == cx[:, :, left:left + 1]) & used
        token[lo:hi] = np.where(same, tk, -1)
        act[lo:hi] = np.where(same, a, 0.0)
    return Windows(token=token, act=act, center=left)


def logit_effects(W_dec: torch.Tensor, W_U: torch.Tensor, n: int, block: int = 256,
                  shortlist: int = 4) -> tuple[np.ndarray, ...]:
    """``(top_ids, top_vals, bottom_ids, bottom_vals)``, each ``[width, n]``: the tokens whose
    logits each latent's decoder direction raises (lowers) most, ``W_dec @ W_U``, computed
    ``block`` latents at a time so memory stays ``block x vocab``.

    The full product is taken in bfloat16 (4x faster than float32 on a CPU with bfloat16 units)
    only to shortlist ``shortlist * n + 8`` candidates per side; the candidates' values are then
    computed exactly in float32 and ranked. The result equals the float32 ranking unless bfloat16's
    rounding (relative 2^-8 of the products' terms) moves a true top-n token below the shortlist."""
    n = min(n, int(W_U.shape[1]))
    m = min(int(W_U.shape[1]), shortlist * n + 8)
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    W_U = W_U.float()
    W_U_low = W_U.to(torch.bfloat16)
    W_U_cols = W_U.T.contiguous()  # [vocab, d]: exact values of the shortlisted tokens
    with torch.no_grad():
        for s in range(0, W_dec.shape[0], block):
            dec = W_dec[s:s + block].float().to(W_U.device)
            rough = dec.to(torch.bfloat16) @ W_U_low
            for largest, (ids_out, vals_out) in ((True, (parts[0], parts[1])), (False, (parts[2], parts[3]))):
                cand = rough.topk(m, dim=1, largest=largest).indices  # [b, m]
                exact = torch.einsum("bd,bmd->bm", dec, W_U_cols[cand])
                best = exact.topk(n, dim=1, largest=largest)
                ids_out.append(cand.gather(1, best.indices).cpu())
                vals_out.append(best.values.cpu())
    return tuple(torch.cat(p).numpy() for p in parts)


def save_browser_data(folder: Path, stats: LatentStats, quantile_rows: np.ndarray, quantile_acts: np.ndarray,
                      windows: Windows, logits: tuple[np.ndarray, ...], token_text: dict[int, str]) -> None:
    """One SAE's browser data: ``latents.npz`` (statistics, the chosen rows, their windows and the
    logit effects) and ``tokens.json`` (the text of every token id they use)."""
    top_ids, top_vals, bottom_ids, bottom_vals = logits
    np.savez_compressed(
        folder / DATA_FILE, rows_scanned=stats.rows_scanned, count=stats.count, sum=stats.sum, max=stats.max,
        hist=stats.hist, hist_edges=stats.hist_edges, top_act=stats.top_act, top_row=stats.top_row,
        quantile_act=quantile_acts, quantile_row=quantile_rows, window_token=windows.token.astype(np.int32),
        window_act=windows.act.astype(np.float32), window_center=windows.center, logit_top_ids=top_ids,
        logit_top_vals=top_vals, logit_bottom_ids=bottom_ids, logit_bottom_vals=bottom_vals)
    (folder / TOKENS_FILE).write_text(json.dumps({str(k): v for k, v in sorted(token_text.items())}))
