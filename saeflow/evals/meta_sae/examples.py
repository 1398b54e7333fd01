"""The meta-SAE example page: a few latents of one SAE, their meta-latents, each shown by
top-activating context snippets from sampled activation rows (:mod:`saeflow.evals.meta_sae`).

:func:`example_page` computes the page's data (:class:`ExamplesPage`); :func:`render_examples_page`
renders it with the template ``saeflow/templates/meta_sae_examples.md.j2`` (markdown, autoescaped:
decoded tokens are HTML-escaped there, markdown syntax in them by :func:`snippet`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from saeflow.cosine import COSINE_CHUNK_ELEMENTS
from saeflow.evals.meta_sae.config import MetaSAEConfig
from saeflow.evals.meta_sae.training import unit_rows
from saeflow.pages import render
from saeflow.saes import BaseSAE

__all__ = ["EXAMPLES_TEMPLATE", "Snippet", "Member", "MetaExample", "LatentExample", "ExamplesPage", "top_rows",
           "snippet", "choose_latents", "meta_columns", "example_page", "render_examples_page", "examples_json"]

#: The page's template (in ``saeflow/templates/``).
EXAMPLES_TEMPLATE = "meta_sae_examples.md.j2"


@dataclass
class Snippet:
    """A top-activating context: its rank (1 = strongest), the snippet text and the score."""

    rank: int
    text: str
    value: float


@dataclass
class Member:
    """Another latent using a meta-latent, with its top-activating token in the sample."""

    latent: int
    token: str


@dataclass
class MetaExample:
    """One meta-latent of a shown latent."""

    meta_latent: int
    weight: float
    cluster_size: int  # latents that use it
    members: list[Member]  # its strongest other members that fire in the sample
    silent: int  # its other members that do not fire in the sample
    snippets: list[Snippet]  # where its other members fire


@dataclass
class LatentExample:
    """One shown latent: its decomposition and top-activating snippets."""

    latent: int
    n_meta: int
    recon_cos: float
    top_token: str
    snippets: list[Snippet]
    meta: list[MetaExample] = field(default_factory=list)


@dataclass
class ExamplesPage:
    """The data of the example page of one SAE's meta-SAE."""

    sae: str  # the SAE's label
    meta_width: int
    k: int
    fve: float
    fve_threshold: float
    rows: int  # activation rows sampled
    seed: int
    examples: list[LatentExample]


@torch.no_grad()
def top_rows(scores: Iterator[torch.Tensor], m: int) -> tuple[np.ndarray, np.ndarray]:
    """Running top-``m`` rows per column over batches of scores ``[b, n_cols]``.

    Returns ``(values, rows)`` ``[m, n_cols]`` (global row numbers in batch order, best first;
    ``-1`` rows / ``-inf`` values when fewer rows were seen).
    """
    best_v: torch.Tensor | None = None
    best_r: torch.Tensor | None = None
    offset = 0
    for sc in scores:
        sc = sc.float().cpu()
        r = torch.arange(offset, offset + sc.shape[0])[:, None].expand_as(sc)
        offset += sc.shape[0]
        if best_v is None:
            v, rr = sc, r
        else:
            v, rr = torch.cat([best_v, sc]), torch.cat([best_r, r])
        kk = min(m, v.shape[0])
        top_v, top_i = v.topk(kk, dim=0)
        best_v, best_r = top_v, rr.gather(0, top_i)
    if best_v is None:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64)
    if best_v.shape[0] < m:
        pad = m - best_v.shape[0]
        best_v = torch.cat([best_v, torch.full((pad, best_v.shape[1]), -torch.inf)])
        best_r = torch.cat([best_r, torch.full((pad, best_r.shape[1]), -1, dtype=torch.long)])
    return best_v.numpy(), best_r.numpy()


def _clean(piece: str) -> str:
    """Markdown-escaped text, newlines as ⏎ (HTML escaping is the page template's)."""
    return piece.replace("\n", "⏎").replace("|", "\\|").replace("*", "\\*").replace("`", "'")


def snippet(context_tokens: np.ndarray, pos: int, decode: Callable[[list[int]], str], window: int) -> str:
    """``…left **token** right…`` around ``context_tokens[pos]`` (markdown-escaped, newlines as ⏎;
    HTML-escaped by the autoescaping page template)."""
    lo, hi = max(0, pos - window), min(len(context_tokens), pos + window + 1)
    left = decode([int(t) for t in context_tokens[lo:pos]])
    mid = decode([int(context_tokens[pos])])
    right = decode([int(t) for t in context_tokens[pos + 1:hi]])
    core = mid.strip() or repr(mid)
    lead = " " if mid[:1].isspace() else ""
    return (f"{'…' if lo > 0 else ''}{_clean(left)}{lead}**{_clean(core)}**{_clean(right)}"
            f"{'…' if hi < len(context_tokens) else ''}")


def _batches(x: torch.Tensor, size: int = 2048) -> Iterator[torch.Tensor]:
    for s in range(0, x.shape[0], size):
        yield x[s:s + size]


@torch.no_grad()
def meta_columns(meta: BaseSAE, rows: torch.Tensor, cols: list[int]) -> torch.Tensor:
    """``meta.encode(rows)[:, cols]`` without the full ``[n, meta width]`` encoding: rows are encoded
    in blocks of about :data:`saeflow.cosine.COSINE_CHUNK_ELEMENTS` activations (at least 64 rows)
    and only the ``cols`` columns are kept (issue #27: a 262k-latent SAE's meta encoding is 64 GiB)."""
    idx = torch.tensor(cols, dtype=torch.long, device=rows.device)
    block = max(64, COSINE_CHUNK_ELEMENTS // max(1, meta.d_sae))
    out = [meta.encode(rows[s:s + block]).index_select(1, idx) for s in range(0, rows.shape[0], block)]
    return torch.cat(out) if out else rows.new_zeros(0, len(cols))


def choose_latents(dec: pd.DataFrame, fired: np.ndarray, cfg: MetaSAEConfig) -> list[int]:
    """The latents shown: seeded, among the best-explained multi-meta-latent ones that fire in the
    sample (2..2k meta-latents: a latent spread over many weak meta-latents is rarely readable;
    else any firing latent with an active meta-latent). ``fired[j]``: latent j fires in the sample."""
    fired_rows = fired[dec["latent"].to_numpy()]
    cand = dec[(dec["n_meta"] >= 2) & (dec["n_meta"] <= 2 * cfg.k) & fired_rows]
    if len(cand) == 0:
        cand = dec[fired_rows & (dec["n_meta"] >= 1)]
    cand = cand.sort_values(["recon_cos", "n_meta"], ascending=[False, False])
    pool = cand.head(max(5 * cfg.n_examples, 20))
    rng = np.random.default_rng(cfg.seed)
    return sorted(rng.choice(pool["latent"].to_numpy(), size=min(cfg.n_examples, len(pool)), replace=False).tolist()) \
        if len(pool) else []


@torch.no_grad()
def example_page(base: BaseSAE, meta: BaseSAE, x: torch.Tensor, row_meta: dict[str, np.ndarray],
                 tokens: np.ndarray, decode: Callable[[list[int]], str], dec: pd.DataFrame, sizes: np.ndarray,
                 metrics: dict[str, Any], cfg: MetaSAEConfig, label: str) -> ExamplesPage:
    """The example page's data for the SAE ``base`` (labelled ``label``) and its meta-SAE ``meta``.

    ``x``: sampled activation rows (on the SAEs' device) with their ``row_meta`` (``context`` /
    ``positions`` / ``token_ids``, :func:`saeflow.evals.common.read_row_blocks`); ``tokens``: the
    corpus contexts; ``decode``: token ids -> text; ``dec`` / ``sizes`` / ``metrics``: the
    ``meta_sae`` stage's decomposition table, cluster sizes and metrics.
    """
    dev = x.device
    m = cfg.example_snippets
    # encode once; keep the (sparse) latent activations for the meta-latent scores
    acts = [base.encode(b).to_sparse() for b in _batches(x)]
    top_v, top_r = top_rows((f.to_dense() for f in acts), m)

    def snip(row: int) -> str:
        c, p = int(row_meta["context"][row]), int(row_meta["positions"][row])
        return snippet(tokens[c], p, decode, cfg.snippet_window)

    def top_token(latent: int) -> str:
        r = int(top_r[0, latent])
        return decode([int(row_meta["token_ids"][r])]).strip() or "·" if r >= 0 and top_v[0, latent] > 0 else "(silent)"

    def snippets(v: np.ndarray, r: np.ndarray, col: int) -> list[Snippet]:
        return [Snippet(t + 1, snip(int(r[t, col])), float(v[t, col])) for t in range(m)
                if int(r[t, col]) >= 0 and v[t, col] > 0]

    fired = top_v[0] > 0 if top_v.size else np.zeros(len(dec), bool)
    chosen = choose_latents(dec, fired, cfg)
    metas_of = {}
    for j in chosen:
        row = dec[dec["latent"] == j].iloc[0]
        metas_of[j] = [(int(row[f"meta_{t}"]), float(row[f"weight_{t}"])) for t in range(cfg.decomposition_top)
                       if int(row[f"meta_{t}"]) >= 0]
    need = sorted({mi for metas in metas_of.values() for mi, _ in metas})
    # threshold-inference meta activations of every latent's decoder row, only in the meta-latents shown
    meta_cols = meta_columns(meta, unit_rows(base.W_dec.detach()).to(dev), need)  # [n, len(need)]
    col_of = {mi: c for c, mi in enumerate(need)}
    examples = []
    for j in chosen:
        row = dec[dec["latent"] == j].iloc[0]
        metas = metas_of[j]
        ex = LatentExample(latent=j, n_meta=int(row["n_meta"]), recon_cos=float(row["recon_cos"]),
                           top_token=top_token(j), snippets=snippets(top_v, top_r, j))
        if metas:
            W = meta_cols[:, [col_of[mi] for mi, _ in metas]].clone()  # [n, P]: how strongly each latent uses each meta-latent
            W[j] = 0.0
            # each member's activation relative to its own sampled maximum, so no high-norm latent dominates
            Ws = W * torch.from_numpy(np.where(fired, 1.0 / np.where(fired, top_v[0], 1.0), 0.0)).to(W)[:, None]
            sc_v, sc_r = top_rows((torch.sparse.mm(f, Ws) for f in acts), m)
            for p, (mi, w) in enumerate(metas):
                order = torch.argsort(W[:, p], descending=True).cpu().numpy()
                users = [int(u) for u in order if float(W[u, p]) > 0]
                members = [u for u in users if fired[u]][:6]
                ex.meta.append(MetaExample(meta_latent=mi, weight=w, cluster_size=int(sizes[mi]),
                                           members=[Member(u, top_token(u)) for u in members],
                                           silent=sum(1 for u in users if not fired[u]),
                                           snippets=snippets(sc_v, sc_r, p)))
        examples.append(ex)
    return ExamplesPage(sae=label, meta_width=int(metrics["width"]), k=cfg.k, fve=float(metrics["fve"]),
                        fve_threshold=float(metrics["fve_threshold"]), rows=int(x.shape[0]), seed=cfg.seed,
                        examples=examples)


def render_examples_page(page: ExamplesPage) -> str:
    """The page as markdown (``examples.md``)."""
    return render(EXAMPLES_TEMPLATE, page=page)


def examples_json(page: ExamplesPage) -> dict[str, Any]:
    """``examples.json``: per shown latent its decomposition, top token and meta-latents' members."""
    return {"sae": page.sae, "examples": [
        {"latent": ex.latent, "n_meta": ex.n_meta, "recon_cos": ex.recon_cos, "top_tokens": [ex.top_token],
         "meta": [{"meta_latent": me.meta_latent, "weight": me.weight, "cluster_size": me.cluster_size,
                   "members": [u.latent for u in me.members], "member_top_tokens": [u.token for u in me.members]}
                  for me in ex.meta]}
        for ex in page.examples]}
