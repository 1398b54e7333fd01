"""The probes of the absorption evaluation: the 26-way ground-truth probe on the model's
activations (SPEC 1.3) and k-sparse probing on SAE latents (SPEC 1.4)."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from saeflow.evals.absorption.prompts import LETTERS, AbsorptionError


def _exp_decay_gamma(lr: float, end_lr: float, epochs: int) -> float:
    return math.exp(math.log(end_lr / lr) / epochs)


def train_linear_probe(x: Tensor, y: Tensor, *, epochs: int = 50, batch_size: int = 64, lr: float = 1e-2,
                       end_lr: float = 1e-5, weight_decay: float = 1e-4, l1: float = 0.0, seed: int = 0,
                       device: torch.device | str = "cpu", map_x: Callable[[Tensor], Tensor] | None = None,
                       dim: int | None = None) -> tuple[Tensor, Tensor]:
    """One-vs-rest logistic probes ``[n_classes, dim]`` + bias, trained jointly (SPEC 1.3 / 1.4).

    ``y`` is ``[n]`` class ids or ``[n, n_classes]`` multi-hot. Loss ``BCEWithLogits`` with
    ``pos_weight = n_neg / n_pos`` per class, plus ``l1 * mean_class(sum |w|)``; Adam(lr,
    weight_decay), lr multiplied by ``(end_lr / lr) ** (1 / epochs)`` after each epoch; shuffled
    mini-batches from a ``torch.Generator`` seeded with ``seed``. ``map_x`` maps a batch before the
    probe (e.g. SAE encoding) and ``dim`` is then the probe's input width.
    """
    dev = torch.device(device)
    if y.ndim == 1:
        y = F.one_hot(y.long(), num_classes=int(y.max()) + 1)
    y = y.float()
    n, n_cls = y.shape
    if x.shape[0] != n:
        raise AbsorptionError(f"probe data has {x.shape[0]} rows but {n} labels")
    dim = int(dim or x.shape[1])
    pos = y.sum(0)
    pos_weight = ((n - pos) / pos.clamp(min=1)).to(dev)
    gen = torch.Generator().manual_seed(int(seed))
    w = (torch.rand(n_cls, dim, generator=gen) * 2 - 1) / math.sqrt(dim)
    b = (torch.rand(n_cls, generator=gen) * 2 - 1) / math.sqrt(dim)
    w, b = w.to(dev).requires_grad_(True), b.to(dev).requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=_exp_decay_gamma(lr, end_lr, epochs))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            xb = x[idx].to(dev, torch.float32)
            if map_x is not None:
                with torch.no_grad():
                    xb = map_x(xb)
            loss = loss_fn(xb @ w.T + b, y[idx].to(dev))
            if l1:
                loss = loss + l1 * w.abs().sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return w.detach().cpu(), b.detach().cpu()


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


def ground_truth_probe(x: Tensor, labels: np.ndarray, *, epochs: int, batch_size: int, lr: float,
                       weight_decay: float, seed: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """The 26-way first-letter probe (SPEC 1.3: :func:`train_linear_probe`, lr decaying to 1e-5),
    always 26 rows: a letter absent from the train words gets a zero row and bias -1e4."""
    w, b = train_linear_probe(x, torch.as_tensor(labels), epochs=epochs, batch_size=batch_size, lr=lr, end_lr=1e-5,
                              weight_decay=weight_decay, seed=seed, device=device)
    if w.shape[0] < len(LETTERS):
        w = torch.cat([w, torch.zeros(len(LETTERS) - w.shape[0], w.shape[1])])
        b = torch.cat([b, torch.full((len(LETTERS) - b.shape[0],), -1e4)])
    return w, b


def probe_metrics(w: Tensor, b: Tensor, x: Tensor, labels: np.ndarray, min_f1: float) -> pd.DataFrame:
    """:func:`letter_metrics` of the probe ``(w, b)`` on the activations ``x``."""
    return letter_metrics((x @ w.T + b).numpy(), labels, min_f1)


def k_sparse_probing(f_train: Tensor, y_train: np.ndarray, f_test: Tensor, y_test: np.ndarray, l1_weights: Tensor,
                     max_k: int, letters: Iterable[int]) -> pd.DataFrame:
    """SPEC 1.4 steps 2-4: per letter and k, the signed top-k latents of the L1 probe, an sklearn
    ``LogisticRegression(max_iter=500, class_weight="balanced")`` refit on them, and its test
    precision / recall / F1 (positive when ``f[ids] @ coef + intercept > 0``)."""
    from sklearn.linear_model import LogisticRegression

    rows = []
    for li in letters:
        yt = (y_train == li).astype(np.int64)
        truth = y_test == li
        for k in range(1, max_k + 1):
            ids = torch.topk(l1_weights[li], k).indices.numpy()
            xtr = f_train[:, ids].numpy().astype(np.float64)
            if yt.min() == yt.max():
                coef, icpt = np.zeros(k), -1.0
            else:
                lr = LogisticRegression(max_iter=500, class_weight="balanced").fit(xtr, yt)
                coef, icpt = lr.coef_[0], float(lr.intercept_[0])
            score = f_test[:, ids].numpy().astype(np.float64) @ coef + icpt
            rows.append({"letter": LETTERS[li], "label": li, "k": k, "feats": ids.tolist(), "coef": coef.tolist(),
                         "bias": icpt, **binary_scores(score > 0, truth)})
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
