"""Sparse autograd kernels of the k-based SAEs, and the dense-encoder kernel of ReLU / JumpReLU.

The TopK / BatchTopK training forwards keep only the encoder forward as a dense matmul; the
decoder and every backward product touch only the selected latents (same maths as the dense
SAELens computation: latents bit-identical, losses and gradients equal up to float summation
order).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from saeflow.precision import current_matmul_dtype

if TYPE_CHECKING:  # pragma: no cover
    from saeflow.saes.base import BaseSAE


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


def _t_times_dense_bags(rows: torch.Tensor, cols: torch.Tensor, v: torch.Tensor, Y: torch.Tensor,
                       n_cols: int) -> torch.Tensor:
    """``S.T @ Y`` -> [n_cols, d] for the entries ``S[rows[j], cols[j]] = v[j]``, as one weighted
    embedding bag per column (entries sorted by column once, stable, so each bag sums its rows in
    ascending order: deterministic). At ``[16384, 4096] x [4096, 640]`` with 131k entries on CPU
    it took 26 ms against 43 ms for a CSR ``torch.sparse.mm`` (whose output is zero-filled and copied)
    and ~48 ms for COO (one-off timings). Summed in another order than the COO product, so only the
    bf16 path uses it (float32 keeps its bit-identical COO product)."""
    order = torch.argsort(cols, stable=True)
    counts = torch.bincount(cols, minlength=n_cols)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
    return F.embedding_bag(rows[order], Y, offsets, mode="sum", per_sample_weights=v[order])


def _rows_t_fast(idx: torch.Tensor, v: torch.Tensor, Y: torch.Tensor, d_sae: int, cd: torch.dtype | None) -> torch.Tensor:
    """:func:`_rows_t_times_dense`, through :func:`_t_times_dense_bags` when the step runs bf16 matmuls (``cd``)."""
    if cd is None:
        return _rows_t_times_dense(idx, v, Y, d_sae)
    B, m = idx.shape
    rows = torch.arange(B, device=idx.device).repeat_interleave(m)
    return _t_times_dense_bags(rows, idx.reshape(-1), v.reshape(-1), Y, d_sae)


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
        ctx.cd = current_matmul_dtype()
        return selected.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        sae_in, W_enc, idx = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        g = g.contiguous()
        grad_b_enc = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
        grad_W_enc = _rows_t_fast(idx, g, sae_in, d_sae, ctx.cd).T
        # sae_in = x - b_dec and x needs no gradient: d/d b_dec = -sum_b g_b @ W_enc.T = -W_enc @ grad_b_enc
        grad_b_dec = -(W_enc @ grad_b_enc)
        return None, None, grad_W_enc, grad_b_enc, grad_b_dec, None


class _SparseDecode(torch.autograd.Function):
    """``out[b] = sum_j v[b, j] * W_dec[idx[b, j]]`` with sparse forward and backward."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(v, idx, W_dec)
        ctx.cd = current_matmul_dtype()
        return _rows_times_dense(idx, v, W_dec)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        v, idx, W_dec = ctx.saved_tensors
        g = g.contiguous()
        grad_v = _sampled_dot(idx, g, W_dec) if ctx.needs_input_grad[0] else None
        grad_W = _rows_t_fast(idx, v, g, W_dec.shape[0], ctx.cd) if ctx.needs_input_grad[2] else None
        return grad_v, None, grad_W


class _RowNorm(torch.autograd.Function):
    """``W.norm(dim=-1)`` whose backward ``W * (g / n)[:, None]`` (0 where ``n == 0``) is one pass
    over ``W`` instead of autograd's three (divide, multiply, mask)."""

    @staticmethod
    def forward(ctx: Any, W: torch.Tensor) -> torch.Tensor:
        n = W.norm(dim=-1)
        ctx.save_for_backward(W, n)
        return n

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        W, n = ctx.saved_tensors
        scale = torch.where(n > 0, g / n, torch.zeros_like(n))
        return W * scale[:, None]


def row_norms(W: torch.Tensor) -> torch.Tensor:
    """Differentiable ``W.norm(dim=-1)`` of a decoder ``[d_sae, d_in]``: autograd's own on the float32
    path (bit-identical to before precision existed), :class:`_RowNorm` under a bf16 matmul dtype
    (same value, its gradient rounded differently)."""
    if current_matmul_dtype() is None or not torch.is_grad_enabled():
        return W.norm(dim=-1)
    return _RowNorm.apply(W)


def _take(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``v[idx]`` for a 1-D ``v`` (index_select: its backward is a deterministic index_add)."""
    return v.index_select(0, idx.reshape(-1)).view(idx.shape)


def _sorted_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k values and indices of each row, with the indices ascending within a row."""
    vals, idx = torch.topk(x, k, dim=-1, sorted=False)
    idx, order = idx.sort(dim=-1)
    return vals.gather(-1, order), idx


# ------------------------------------------------------------- precision (saeflow.precision)
def _mm(a: torch.Tensor, b: torch.Tensor, cd: torch.dtype | None) -> torch.Tensor:
    """``a @ b`` with ``cd`` inputs (``None``: float32), float32 out."""
    return a @ b if cd is None else (a.to(cd) @ b.to(cd)).float()


@torch.no_grad()
def selection_pre(sae_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                  n: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """No-grad dense encoder pass of the k-based SAEs: ``(pre, hidden_pre)`` with
    ``pre = sae_in @ W_enc + b_enc`` and ``hidden_pre = pre * n`` (``n``: decoder norms when the SAE
    rescales, else ``None`` and ``hidden_pre is pre``); the latents are selected on ``hidden_pre``.

    Under a bf16 :func:`saeflow.precision.matmul_dtype` the matmul takes bf16 inputs with ``n``
    folded into them, ``hidden_pre`` stays bf16 (no float32 copy of the ``[B, d_sae]`` matrix) and
    ``pre`` is ``None``: :func:`selected_pre` then recomputes the selected values in float32."""
    cd = current_matmul_dtype()
    if cd is None:
        pre = torch.addmm(b_enc, sae_in, W_enc)
        return pre, (pre * n if n is not None else pre)
    if n is not None:  # one pass: the float32 product is rounded to ``cd`` as it is stored
        w, b = torch.mul(W_enc, n, out=torch.empty_like(W_enc, dtype=cd)), (b_enc * n).to(cd)
    else:
        w, b = W_enc.to(cd), b_enc.to(cd)
    return None, torch.addmm(b, sae_in.to(cd), w)


@torch.no_grad()
def selected_pre(pre: torch.Tensor | None, sae_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                 idx: torch.Tensor) -> torch.Tensor:
    """``(sae_in @ W_enc + b_enc)[b, idx[b, j]]`` in float32: read from ``pre`` (float32), or, when
    ``pre`` is ``None`` (:func:`selection_pre` in bf16), recomputed exactly (a sampled dot product,
    ``2 * m * d_in`` FLOPs per row)."""
    if pre is not None:
        return pre.gather(1, idx)
    return _sampled_dot(idx, sae_in, W_enc.T) + _take(b_enc, idx)


@torch.no_grad()
def selected_pre_cols(pre: torch.Tensor | None, sae_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                      cols: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """:func:`selected_pre` at ``idx = cols[local]`` when the selection was made among the columns
    ``cols`` only (the aux-k loss's dead latents). On the bf16 path, when ``cols`` is short next to
    the ``m = local.shape[1]`` entries per row (``len(cols) <= 16 * m``), the float32 values come
    from one dense product over those columns instead of ``B * m`` sampled dot products: at batch
    4096, 340 dead latents and ``k_aux`` 320, one blocked 1.8 GFLOP matmul instead of 1.3M scattered
    dot products (the sampled kernel runs at a few GFLOP/s on CPU)."""
    if pre is not None or cols.numel() > 16 * local.shape[1]:
        return selected_pre(pre, sae_in, W_enc, b_enc, cols[local])
    return torch.addmm(b_enc.index_select(0, cols), sae_in, W_enc.index_select(1, cols)).gather(1, local)


def aux_recons_cols(x: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                    dead_ids: torch.Tensor, local: torch.Tensor, n: torch.Tensor | None) -> torch.Tensor:
    """The aux-k reconstruction ``sum_j a[b, j] * W_dec[dead_ids[local[b, j]]]`` with ``a`` the float32
    pre-activations ``((x - b_dec) @ W_enc + b_enc)`` at those latents (times ``n / n`` when the SAE
    rescales, as the sparse path), computed densely over the dead columns: the same loss and
    gradients (to ``W_enc``, ``b_enc``, ``b_dec``, ``W_dec`` and ``n``) as the sparse kernels, up to
    summation order. With ``k_aux = d_in / 2`` selections per row among a few hundred dead latents,
    the sparse kernels touch ``B * k_aux`` entries (1.3M at batch 4096), ten times the main
    selection; six float32 matmuls over the dead columns cost less there (used by the bf16 path when
    ``len(dead_ids) <= 16 * k_aux``)."""
    pre_d = torch.addmm(b_enc.index_select(0, dead_ids), x - b_dec, W_enc.index_select(1, dead_ids))
    a = torch.zeros_like(pre_d).scatter(1, local, pre_d.gather(1, local))
    if n is not None:
        n_d = n.index_select(0, dead_ids)
        a = a * (n_d * (1 / n_d))
    return a @ W_dec.index_select(0, dead_ids)


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

    def t_times_dense(self, v: torch.Tensor, Y: torch.Tensor, cd: torch.dtype | None = None) -> torch.Tensor:
        """``S.T @ Y`` -> [n_cols, d] (embedding bags on the bf16 path, :func:`_t_times_dense_bags`)."""
        if cd is not None:
            return _t_times_dense_bags(self.rows, self.cols, v, Y, self.n_cols)
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
        ctx.cd = current_matmul_dtype()
        return selected.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        sae_in, W_enc, rows, cols = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        g = g.contiguous()
        grad_b_enc = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        if ctx.cd is not None:
            grad_W_enc = _t_times_dense_bags(rows, cols, g, sae_in, d_sae).T
        else:
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
        ctx.cd = current_matmul_dtype()
        return sp.times_dense(v, W_dec)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        v, W_dec = ctx.saved_tensors
        sp: _COO = ctx.sp
        g = g.contiguous()
        grad_v = sp.sampled_dot(g, W_dec) if ctx.needs_input_grad[0] else None
        grad_W = sp.t_times_dense(v, g, ctx.cd) if ctx.needs_input_grad[2] else None
        return grad_v, None, grad_W


@torch.no_grad()
def selected_pre_coo(pre: torch.Tensor | None, sae_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                     rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """COO analogue of :func:`selected_pre`: ``pre[rows, cols]`` in float32."""
    if pre is not None:
        return pre[rows, cols]
    sp = _COO(rows, cols, sae_in.shape[0], W_enc.shape[1])
    return sp.sampled_dot(sae_in, W_enc.T) + b_enc.index_select(0, cols)


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


# ----------------------------------------------------------------- dense encoder (ReLU / JumpReLU)
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
        ctx.cd = cd = current_matmul_dtype()  # the backward may run on another thread: keep it
        if cd is None:
            return torch.addmm(b_enc, sae_in, W_enc)
        return _mm(sae_in, W_enc, cd) + b_enc

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        sae_in, W_enc = ctx.saved_tensors
        cd = ctx.cd
        grad_b_enc = g.sum(dim=0)
        grad_x = _mm(g, W_enc.T, cd) if ctx.needs_input_grad[0] else None
        return grad_x, _mm(sae_in.T, g, cd), grad_b_enc, -(W_enc @ grad_b_enc)


class _DenseDecode(torch.autograd.Function):
    """``f @ W_dec`` (the dense decoder of ReLU / JumpReLU) with its two backward matmuls, all in
    the matmul dtype of the forward (float32 in and out)."""

    @staticmethod
    def forward(ctx: Any, f: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(f, W_dec)
        ctx.cd = cd = current_matmul_dtype()
        return _mm(f, W_dec, cd)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        f, W_dec = ctx.saved_tensors
        cd = ctx.cd
        grad_f = _mm(g, W_dec.T, cd) if ctx.needs_input_grad[0] else None
        grad_W = _mm(f.T, g, cd) if ctx.needs_input_grad[1] else None
        return grad_f, grad_W


def _encode_pre(sae: BaseSAE, x: torch.Tensor) -> torch.Tensor:
    """Encoder pre-activations for a 2-D training batch (see :class:`_DenseEncode`)."""
    return _DenseEncode.apply(x, sae.W_enc, sae.b_enc, sae.b_dec)


def _decode_dense(sae: BaseSAE, f: torch.Tensor) -> torch.Tensor:
    """Training decoder ``f @ W_dec + b_dec`` of a dense SAE (see :class:`_DenseDecode`)."""
    if current_matmul_dtype() is None:
        return sae.decode(f)
    return _DenseDecode.apply(f, sae.W_dec) + sae.b_dec
