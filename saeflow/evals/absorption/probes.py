"""The probes of the absorption evaluation: the 26-way ground-truth probe on the model's
activations (SPEC 1.3) and k-sparse probing on SAE latents (SPEC 1.4).

Both probes minimise SAEBench's objective, one-vs-rest ``BCEWithLogits`` with ``pos_weight =
n_neg / n_pos`` per class + ``l1 * mean_class(sum |w|)`` + the L2 term of Adam's coupled weight
decay (``weight_decay / 2 * ||w||^2``), but are sized by what the optimiser does, not by epochs:
SAEBench's "50 epochs of batch 4096" are 50 optimiser steps at the quick profile's 3,200 training
words, after which the L1 probe's top latents are noise (issue #25). Two solvers, one objective:

- ``"adam"``: SAEBench's mini-batch Adam with the exponential lr decay spread over ``steps``
  optimiser steps (the SPEC's schedule, lr -> ``end_lr``);
- ``"fista"``: deterministic full-batch proximal gradient (FISTA with backtracking and adaptive
  restart, features scaled by their RMS, the L1 term handled exactly by soft-thresholding), run
  until the objective changes by less than ``tol`` over the last 10% of its iterations or
  ``steps`` iterations have run.

Each fit returns a :class:`ProbeFit` with its :class:`Convergence` record: the full-data objective at
90% of the steps and at the end, their relative change, and ``converged``
(:func:`saeflow.evals.common.convergence_record`). Under Adam's decaying
lr the objective stops moving at the end of the schedule whether or not it reached its minimum, so
an Adam fit also runs a short *continuation check* (``steps // 10`` more full-batch Adam steps at
``lr / 10`` from the final weights, which are then discarded): if the objective still falls by more
than ``tol`` relative, the fit had not converged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from saeflow.evals.absorption.prompts import LETTERS, AbsorptionError
from saeflow.evals.common import FitLog, convergence_record, latent_columns, step_at_90pct

#: Default relative tolerance of the convergence check (objective change over the last 10% of steps).
CONVERGENCE_TOL = 1e-4
SOLVERS = ("adam", "fista")
#: ``max_iter`` of the k-sparse refits (SAEBench).
REFIT_MAX_ITER = 500


@dataclass(frozen=True)
class Convergence:
    """How an optimisation ended (:func:`saeflow.evals.common.convergence_record`): ``final_loss``
    (the full objective on all its data), ``loss_at_90pct`` (the same after 90% of its steps),
    ``rel_change_last10 = |loss_at_90pct - final_loss| / |final_loss|``, ``continuation_drop``
    (Adam only: the relative objective decrease of the continuation check, NaN for other solvers)
    and ``converged``: ``rel_change_last10 < convergence_tol`` (and for Adam ``continuation_drop <
    convergence_tol``)."""

    solver: str
    steps: int
    final_loss: float
    loss_at_90pct: float
    rel_change_last10: float
    continuation_drop: float
    convergence_tol: float
    converged: bool

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProbeFit:
    """A trained one-vs-rest probe ``weight [n_classes, dim]``, ``bias [n_classes]`` and how its
    optimisation ended."""

    weight: Tensor
    bias: Tensor
    convergence: Convergence


class _Objective:
    """SAEBench's probe objective on full data ``z [n, dim]`` (features divided by ``scale``; the
    weights ``u`` live in that scaled space, ``w = u / scale``)."""

    def __init__(self, z: Tensor, y: Tensor, pos_weight: Tensor, scale: Tensor, l1: float, weight_decay: float) -> None:
        self.z, self.y, self.scale, self.l1, self.wd = z, y, scale, l1, weight_decay
        self.loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def smooth(self, u: Tensor, b: Tensor) -> Tensor:
        w = u / self.scale
        return self.loss_fn(self.z @ u.T + b, self.y) + 0.5 * self.wd * (w * w).sum()

    def penalty(self, u: Tensor) -> Tensor:
        return self.l1 * (u.abs() / self.scale).sum(-1).mean() if self.l1 else u.new_zeros(())

    def __call__(self, u: Tensor, b: Tensor) -> float:
        with torch.no_grad():
            return float(self.smooth(u, b) + self.penalty(u))


def _convergence(solver: str, steps: int, loss_at_90pct: float, final: float, tol: float,
                 continuation_drop: float = float("nan")) -> Convergence:
    """The record of a run of ``steps`` steps whose objective was ``loss_at_90pct`` after
    :func:`~saeflow.evals.common.step_at_90pct` of them and ``final`` at the end."""
    rec = convergence_record(loss_at_90pct, final, tol)
    ok = rec["converged"] and (solver != "adam" or continuation_drop < tol)
    return Convergence(solver=solver, steps=int(steps), final_loss=rec["final_loss"],
                       loss_at_90pct=rec["loss_at_90pct"], rel_change_last10=rec["rel_change_last10"],
                       continuation_drop=float(continuation_drop), convergence_tol=rec["convergence_tol"],
                       converged=bool(ok))


def _list_convergence(solver: str, losses: list[float], tol: float) -> Convergence:
    """:func:`_convergence` of a run whose objective after iteration ``t`` is ``losses[t]``."""
    steps = len(losses) - 1
    return _convergence(solver, steps, losses[step_at_90pct(steps)], losses[-1], tol)


def _targets(x: Tensor, y: Tensor) -> Tensor:
    if y.ndim == 1:
        y = F.one_hot(y.long(), num_classes=int(y.max()) + 1)
    y = y.float()
    if x.shape[0] != y.shape[0]:
        raise AbsorptionError(f"probe data has {x.shape[0]} rows but {y.shape[0]} labels")
    if not torch.isfinite(x.values() if x.is_sparse else x).all():
        raise AbsorptionError("probe data holds NaN or infinite values: check the activations / SAE encodings "
                              "it was built from (re-run the stage that wrote them)")
    return y


def _probe_input(x: Any) -> Tensor:
    """``x`` as a tensor: a ``scipy.sparse`` matrix (a wide SAE's latents,
    :func:`saeflow.evals.common.encode_latents`) becomes a coalesced float32 sparse COO tensor."""
    if not hasattr(x, "tocoo"):
        return x
    c = x.tocoo()
    idx = torch.from_numpy(np.vstack([c.row, c.col]).astype(np.int64))
    return torch.sparse_coo_tensor(idx, torch.from_numpy(np.asarray(c.data, dtype=np.float32)), c.shape, check_invariants=False).coalesce()


def _scaled_by_rms(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x / scale, scale)``: each feature divided by its RMS over the rows (1 where it is 0);
    a sparse ``x`` stays sparse."""
    if not x.is_sparse:
        scale = x.pow(2).mean(0).sqrt()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return x / scale, scale
    col, v = x.indices()[1], x.values()
    scale = torch.zeros(x.shape[1], device=v.device).index_add_(0, col, v * v).div_(x.shape[0]).sqrt_()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.sparse_coo_tensor(x.indices(), v / scale[col], x.shape, check_invariants=False).coalesce(), scale


def train_linear_probe(x: Any, y: Tensor, *, steps: int, solver: str = "adam", batch_size: int = 64,
                       lr: float = 1e-2, end_lr: float = 1e-5, weight_decay: float = 1e-4, l1: float = 0.0,
                       seed: int = 0, tol: float = CONVERGENCE_TOL,
                       device: torch.device | str = "cpu") -> ProbeFit:
    """One-vs-rest logistic probes ``[n_classes, dim]`` + bias on SAEBench's objective (module
    docstring), trained by ``solver`` for ``steps`` optimiser steps (``"adam"``: mini-batches of
    ``min(batch_size, n)`` rows drawn from a ``torch.Generator`` seeded with ``seed``, lr decaying
    exponentially from ``lr`` to ``end_lr`` over the steps) or at most ``steps`` iterations
    (``"fista"``, deterministic; ``batch_size`` / ``lr`` / ``seed`` unused but the initial weights).

    ``y`` is ``[n]`` class ids or ``[n, n_classes]`` multi-hot. ``x`` is a dense ``[n, dim]``
    tensor or a ``scipy.sparse`` matrix (kept sparse throughout: a wide SAE's latents, issue #27).
    """
    if solver not in SOLVERS:
        raise AbsorptionError(f"unknown probe solver {solver!r}: use one of {', '.join(SOLVERS)}")
    if steps < 1:
        raise AbsorptionError(f"probe steps must be >= 1, got {steps}")
    dev = torch.device(device)
    x = _probe_input(x)
    y = _targets(x, y).to(dev)
    x = x.to(dev, torch.float32)
    n, n_cls = y.shape
    dim = x.shape[1]
    pos = y.sum(0)
    pos_weight = (n - pos) / pos.clamp(min=1)
    gen = torch.Generator().manual_seed(int(seed))
    w0 = ((torch.rand(n_cls, dim, generator=gen) * 2 - 1) / math.sqrt(dim)).to(dev)
    b0 = ((torch.rand(n_cls, generator=gen) * 2 - 1) / math.sqrt(dim)).to(dev)
    if solver == "adam":
        ones = torch.ones(dim, device=dev)
        obj = _Objective(x, y, pos_weight, ones, l1, weight_decay)
        w, b, conv = _adam(obj, w0, b0, steps=steps, batch_size=min(batch_size, n), lr=lr, end_lr=end_lr, gen=gen,
                           tol=tol)
    else:
        z, scale = _scaled_by_rms(x)
        obj = _Objective(z, y, pos_weight, scale, l1, weight_decay)
        u, b, conv = _fista(obj, w0 * scale, b0, max_steps=steps, tol=tol)
        w = u / scale
    return ProbeFit(weight=w.detach().cpu(), bias=b.detach().cpu(), convergence=conv)


def probe_objective(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, *, l1: float = 0.0,
                    weight_decay: float = 0.0) -> float:
    """SAEBench's probe objective (module docstring) of the probe ``(weight, bias)`` on all of
    ``x`` / ``y``: how good a probe trained elsewhere (e.g. by SAEBench itself) is on the same problem."""
    y = _targets(x, y)
    n = y.shape[0]
    pos = y.sum(0)
    obj = _Objective(x.float(), y, (n - pos) / pos.clamp(min=1), torch.ones(x.shape[1]), l1, weight_decay)
    return obj(weight.float(), bias.float())


def _adam(obj: _Objective, w: Tensor, b: Tensor, *, steps: int, batch_size: int, lr: float, end_lr: float,
          gen: torch.Generator, tol: float) -> tuple[Tensor, Tensor, Convergence]:
    """SAEBench's training loop (Adam, coupled weight decay, per-step exponential lr decay) on
    mini-batches; the objective on all rows at the start, at 90% of the steps and at the end, then
    the continuation check (module docstring)."""
    n = obj.z.shape[0]
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=obj.wd)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(end_lr / lr) / steps))
    loss_fn = obj.loss_fn
    at = {0: obj(w, b)}  # step 0: the objective at the start
    mark = step_at_90pct(steps)
    perm, cursor = torch.randperm(n, generator=gen), 0
    for step in range(1, steps + 1):
        if cursor + batch_size > n:  # a new pass over the rows (no partial last batch)
            perm, cursor = torch.randperm(n, generator=gen), 0
        idx = perm[cursor:cursor + batch_size].to(obj.z.device)
        cursor += batch_size
        loss = loss_fn(obj.z.index_select(0, idx) @ w.T + b, obj.y[idx])
        if obj.l1:
            loss = loss + obj.l1 * w.abs().sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step == mark:
            at[mark] = obj(w, b)
    final = obj(w, b)
    # continuation check: could the objective still fall? (full batch, lr / 10, weights discarded)
    wc, bc = w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    copt = torch.optim.Adam([wc, bc], lr=lr / 10, weight_decay=obj.wd)
    best = final
    for _ in range(max(10, steps // 10)):
        loss = loss_fn(obj.z @ wc.T + bc, obj.y) + (obj.l1 * wc.abs().sum(-1).mean() if obj.l1 else 0.0)
        copt.zero_grad(set_to_none=True)
        loss.backward()
        copt.step()
        best = min(best, obj(wc, bc))
    drop = (final - best) / max(abs(final), 1e-12)
    return w.detach(), b.detach(), _convergence("adam", steps, at.get(mark, at[0]), final, tol, drop)


def _fista(obj: _Objective, u: Tensor, b: Tensor, *, max_steps: int, tol: float,
           check_every: int = 25, min_steps: int = 50) -> tuple[Tensor, Tensor, Convergence]:
    """Accelerated proximal gradient on ``smooth(u, b) + penalty(u)``: backtracking on the
    Lipschitz estimate (halved again after each accepted step, so the step can grow), momentum reset
    when the objective rises (adaptive restart), the L1 term by soft-thresholding each weight at
    ``step * l1 / (n_classes * scale)``. Stops once the objective changed by less than ``tol``
    (relative) over the last 10% of the iterations run, or after ``max_steps`` iterations."""
    n_cls = u.shape[0]
    thresh = obj.l1 / n_cls / obj.scale  # per-weight L1 weight in the scaled space
    lip = 1.0
    u_prev, b_prev = u.clone(), b.clone()
    yu, yb = u.clone(), b.clone()
    t = 1.0
    losses = [obj(u, b)]
    for it in range(1, max_steps + 1):
        yu_, yb_ = yu.detach().requires_grad_(True), yb.detach().requires_grad_(True)
        fy = obj.smooth(yu_, yb_)
        gu, gb = torch.autograd.grad(fy, (yu_, yb_))
        fy = float(fy.detach())
        with torch.no_grad():
            while True:
                step = 1.0 / lip
                nu = yu - step * gu
                if obj.l1:
                    nu = torch.sign(nu) * (nu.abs() - step * thresh).clamp(min=0)
                nb = yb - step * gb
                du, db = nu - yu, nb - yb
                quad = fy + float((gu * du).sum() + (gb * db).sum()) + 0.5 * lip * float((du * du).sum() + (db * db).sum())
                if float(obj.smooth(nu, nb)) <= quad + 1e-12 * abs(quad) or lip > 1e20:
                    break
                lip *= 2.0
            lip /= 2.0 ** 0.5
            loss = obj(nu, nb)
            if loss > losses[-1]:  # adaptive restart: drop the momentum, step from the last iterate
                t = 1.0
                yu, yb = u_prev.clone(), b_prev.clone()
                u, b = u_prev, b_prev
                losses.append(losses[-1])
            else:
                t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
                mom = (t - 1) / t_next
                yu, yb = nu + mom * (nu - u_prev), nb + mom * (nb - b_prev)
                u_prev, b_prev, u, b, t = nu, nb, nu, nb, t_next
                losses.append(loss)
        if it >= min_steps and it % check_every == 0 and _list_convergence("fista", losses, tol).converged:
            break
    return u.detach(), b.detach(), _list_convergence("fista", losses, tol)


def binary_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of boolean predictions against boolean truth (sklearn; 0 when
    undefined, also with no rows)."""
    from sklearn.metrics import precision_recall_fscore_support

    if not len(truth):
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    p, r, f1, _ = precision_recall_fscore_support(np.asarray(truth, dtype=bool), np.asarray(pred, dtype=bool),
                                                  average="binary", zero_division=0.0)
    return {"precision": float(p), "recall": float(r), "f1": float(f1)}


def letter_metrics(scores: np.ndarray, labels: np.ndarray, min_f1: float) -> pd.DataFrame:
    """Per-letter P / R / F1 of ``scores [n, 26] > 0`` against ``labels``; ``passes`` = F1 > ``min_f1``."""
    rows = []
    for li, letter in enumerate(LETTERS):
        truth = labels == li
        m = binary_scores(scores[:, li] > 0, truth)
        rows.append({"letter": letter, **m, "n_pos": int(truth.sum()), "passes": bool(m["f1"] > min_f1)})
    return pd.DataFrame(rows)


def ground_truth_probe(x: Tensor, labels: np.ndarray, *, steps: int, batch_size: int, lr: float,
                       weight_decay: float, seed: int, solver: str = "adam", tol: float = CONVERGENCE_TOL,
                       device: torch.device | str = "cpu") -> ProbeFit:
    """The 26-way first-letter probe (SPEC 1.3: :func:`train_linear_probe`, lr decaying to 1e-5),
    always 26 rows: a letter absent from the train words gets a zero row and bias -1e4."""
    fit = train_linear_probe(x, torch.as_tensor(labels), steps=steps, solver=solver, batch_size=batch_size, lr=lr,
                             end_lr=1e-5, weight_decay=weight_decay, seed=seed, tol=tol, device=device)
    w, b = fit.weight, fit.bias
    if w.shape[0] < len(LETTERS):
        w = torch.cat([w, torch.zeros(len(LETTERS) - w.shape[0], w.shape[1])])
        b = torch.cat([b, torch.full((len(LETTERS) - b.shape[0],), -1e4)])
    return ProbeFit(weight=w, bias=b, convergence=fit.convergence)


def probe_metrics(w: Tensor, b: Tensor, x: Tensor, labels: np.ndarray, min_f1: float) -> pd.DataFrame:
    """:func:`letter_metrics` of the probe ``(w, b)`` on the activations ``x``."""
    return letter_metrics((x @ w.T + b).numpy(), labels, min_f1)


def k_sparse_probing(f_train: Tensor, y_train: np.ndarray, f_test: Tensor, y_test: np.ndarray, l1_weights: Tensor,
                     max_k: int, letters: Iterable[int]) -> pd.DataFrame:
    """SPEC 1.4 steps 2-4: per letter and k, the signed top-k latents of the L1 probe, an sklearn
    ``LogisticRegression(max_iter=500, class_weight="balanced")`` refit on them, and its test
    precision / recall / F1 (positive when ``f[ids] @ coef + intercept > 0``). Each refit records
    ``refit_n_iter`` and ``refit_converged`` (:class:`~saeflow.evals.common.FitLog`: fewer
    iterations than ``max_iter`` and no sklearn ``ConvergenceWarning``)."""
    from sklearn.linear_model import LogisticRegression

    rows = []
    for li in letters:
        yt = (y_train == li).astype(np.int64)
        truth = y_test == li
        for k in range(1, max_k + 1):
            ids = torch.topk(l1_weights[li], k).indices.numpy()
            xtr = latent_columns(f_train, ids)
            n_iter, converged = 0, True
            if yt.min() == yt.max():
                coef, icpt = np.zeros(k), -1.0
            else:
                fits = FitLog()
                lr = fits.fit(LogisticRegression(max_iter=REFIT_MAX_ITER, class_weight="balanced"), xtr, yt)
                coef, icpt = lr.coef_[0], float(lr.intercept_[0])
                n_iter, converged = int(fits.n_iter), fits.n_not_converged == 0
            score = latent_columns(f_test, ids) @ coef + icpt
            rows.append({"letter": LETTERS[li], "label": li, "k": k, "feats": ids.tolist(), "coef": coef.tolist(),
                         "bias": icpt, "refit_n_iter": n_iter, "refit_converged": converged,
                         **binary_scores(score > 0, truth)})
    return pd.DataFrame(rows)


def feature_splits(ks: pd.DataFrame, jump: float = 0.03) -> pd.DataFrame:
    """Split latents per letter by the F1-jump rule (SPEC 1.4 step 5): walk k = 1, 2, ...; keep
    ``feats_k`` while ``F1_k > previous kept F1 + jump``; stop at the first k that does not."""
    rows = []
    for letter, g in ks.sort_values("k").groupby("letter", sort=True):
        prev, feats, k_sel, coef, bias = -100.0, [], 0, [], 0.0
        for r in g.itertuples():
            if r.f1 > prev + jump:
                prev, feats, k_sel, coef, bias = r.f1, list(r.feats), r.k, list(r.coef), r.bias
            else:
                break
        rows.append({"letter": letter, "label": LETTERS.index(letter), "split_feats": feats,
                     "num_split_feats": len(feats), "split_f1": prev, "k_coef": coef, "k_bias": bias})
    return pd.DataFrame(rows)
