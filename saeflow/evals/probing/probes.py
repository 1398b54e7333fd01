"""The probes (SPEC 5.4): the five baselines on raw activations and the SAE top-k probe.

:func:`fit_logreg` (C grid, :func:`cv_splits`), :func:`fit_pca`, :func:`fit_knn`,
:func:`fit_xgboost`, :func:`fit_mlp`; :func:`sae_probe` ranks latents by the (normalised)
class-mean difference and runs :func:`fit_logreg` on the top-k. Each returns validation AUC and
test AUC / accuracy / weighted F1 (scikit-learn's metrics), and the convergence of its iterative
solver fits (:class:`FitLog`: logistic regression's lbfgs / saga and the MLP's Adam, each capped at
:data:`MAX_ITER` iterations). KNN has no optimisation and XGBoost runs a fixed number of boosting
rounds (a searched hyperparameter, not a solver run to convergence): their ``converged`` is ``None``.
"""

from __future__ import annotations

import math
import random
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from saeflow.evals.common import CONVERGENCE_COLUMNS, FitLog  # noqa: F401 (re-exported)

from saeflow.evals.probing.datasets import ProbingError
from saeflow.evals.probing.splits import SkipSetting, skip_reason

BASELINE_METHODS: tuple[str, ...] = ("logreg", "pca", "knn", "xgboost", "mlp")
#: The reference's C grid (``np.logspace(5, -5, 10)``).
C_GRID = np.logspace(5, -5, 10)
#: ``max_iter`` of every logistic regression and MLP (the reference's); a fit that reaches it, or
#: that scikit-learn warns about (``ConvergenceWarning``), has not converged.
MAX_ITER = 1000


def cv_splits(y: np.ndarray, seed: int = 42) -> list[tuple[np.ndarray, np.ndarray]]:
    """The reference's validation scheme: leave-2-out (n <= 12), stratified 6-fold (n < 128), else the
    last ``min(20%, 100)`` rows held out. K-fold splits whose validation side lacks a class are
    dropped (the holdout is kept as is)."""
    from sklearn.model_selection import LeavePOut, StratifiedKFold

    n = len(y)
    if n <= 12:
        gen = LeavePOut(2).split(np.zeros(n))
    elif n < 128:
        gen = StratifiedKFold(n_splits=6, shuffle=True, random_state=seed).split(np.zeros(n), y)
    else:
        val = min(int(0.2 * n), 100)
        return [(np.arange(n - val), np.arange(n - val, n))]
    return [(a, b) for a, b in gen if len(np.unique(y[b])) == 2]


def _metrics(model, X_test: np.ndarray, y_test: np.ndarray, val_auc: float) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    pred = model.predict(X_test)
    proba = model.predict_proba(X_test)[:, 1]
    return {"val_auc": float(val_auc), "test_auc": float(roc_auc_score(y_test, proba)),
            "test_acc": float(accuracy_score(y_test, pred)), "test_f1": float(f1_score(y_test, pred, average="weighted"))}


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))


def logreg(C: float = 1.0, penalty: str = "l2", seed: int = 42):
    """The reference's estimator: L2 with lbfgs, or L1 with saga; ``max_iter`` = :data:`MAX_ITER`."""
    from sklearn.linear_model import LogisticRegression

    if penalty == "l1":
        return LogisticRegression(C=C, l1_ratio=1.0, solver="saga", random_state=seed, max_iter=MAX_ITER)
    if penalty == "l2":
        return LogisticRegression(C=C, random_state=seed, max_iter=MAX_ITER)
    raise ProbingError(f"unknown penalty {penalty!r}: use l1 or l2")


def fit_logreg(X: np.ndarray, y: np.ndarray, X_test: np.ndarray, y_test: np.ndarray, penalty: str = "l2",
               seed: int = 42) -> dict[str, float]:
    """Logistic regression with C chosen on validation AUC over :data:`C_GRID` (``find_best_reg``).

    n <= 3: no search (C = 1, val AUC = train AUC). The final model is fitted on the train rows
    shuffled by ``RandomState(seed)``.
    """
    best_C, val_auc = None, None
    log = FitLog()
    if len(X) > 3:
        splits = cv_splits(y, seed)
        scores = []
        for C in C_GRID:
            fold = []
            for a, b in splits:
                if len(np.unique(y[a])) < 2:
                    fold.append(0.5)
                    continue
                m = log.fit(logreg(C, penalty, seed), X[a], y[a])
                fold.append(_auc(y[b], m.predict_proba(X[b])[:, 1]))
            scores.append(np.mean(fold))
        best = int(np.argmax(scores))
        best_C, val_auc = C_GRID[best], float(scores[best])
    perm = np.random.RandomState(seed).permutation(len(X))
    model = log.fit(logreg(1.0 if best_C is None else best_C, penalty, seed), X[perm], y[perm])
    if val_auc is None:
        val_auc = _auc(y[perm], model.predict_proba(X[perm])[:, 1])
    return {**_metrics(model, X_test, y_test, val_auc), **log.columns()}


def fit_pca(X: np.ndarray, y: np.ndarray, X_test: np.ndarray, y_test: np.ndarray, seed: int = 42,
            max_components: int = 100) -> dict[str, float]:
    """StandardScaler -> PCA (fitted on all train rows) -> default logistic regression; the number of
    components is searched over ``unique(int(logspace(0, log2 max_c, 10, base 2)))``."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X)
    Xs, Xt = scaler.transform(X), scaler.transform(X_test)
    max_c = min(X.shape[0], X.shape[1], max_components)
    dims = np.unique(np.logspace(0, np.log2(max_c), num=10, base=2, dtype=int))
    pca = PCA(n_components=max_c, random_state=seed)
    Z = pca.fit_transform(Xs)
    log = FitLog()
    if len(Z) > 3:
        splits = cv_splits(y, seed)
        best, best_n, model = -math.inf, None, None
        for d in dims:
            fold = [_auc(y[b], log.fit(logreg(seed=seed), Z[a, :d], y[a]).predict_proba(Z[b, :d])[:, 1]) for a, b in splits]
            s = float(np.mean(fold))
            if s > best:
                best, best_n = s, int(d)
        model = log.fit(logreg(seed=seed), Z[:, :best_n], y)
        val_auc = best
    else:
        best_n = Z.shape[1]
        model = log.fit(logreg(seed=seed), Z, y)
        val_auc = _auc(y, model.predict_proba(Z)[:, 1])
    return {**_metrics(model, pca.transform(Xt)[:, :best_n], y_test, val_auc), **log.columns()}


def fit_knn(X: np.ndarray, y: np.ndarray, X_test: np.ndarray, y_test: np.ndarray, seed: int = 42) -> dict[str, float]:
    """StandardScaler -> k-nearest neighbours with k searched on a log grid up to
    ``min(n - 1, 100, smallest fold-train size)``."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X)
    Xs, Xt = scaler.transform(X), scaler.transform(X_test)
    if len(X) > 3:
        splits = cv_splits(y, seed)
        max_k = min(len(X) - 1, 100, min((len(a) for a, _ in splits), default=math.inf))
        ks = np.unique(np.logspace(0, np.log2(max_k), num=10, base=2, dtype=int))
        best, best_k = -math.inf, None
        for k in ks:
            s = float(np.mean([_auc(y[b], KNeighborsClassifier(n_neighbors=int(k)).fit(Xs[a], y[a]).predict_proba(Xs[b])[:, 1])
                               for a, b in splits]))
            if s > best:
                best, best_k = s, int(k)
        model, val_auc = KNeighborsClassifier(n_neighbors=best_k).fit(Xs, y), best
    else:
        model = KNeighborsClassifier(n_neighbors=1).fit(Xs, y)
        val_auc = _auc(y, model.predict_proba(Xs)[:, 1])
    return _metrics(model, Xt, y_test, val_auc)


XGB_SPACE: dict[str, np.ndarray] = {
    "n_estimators": np.arange(50, 300, step=50),
    "max_depth": np.arange(2, 6),
    "learning_rate": np.logspace(-3, -1, num=10),
    "subsample": np.linspace(0.7, 1.0, num=5),
    "colsample_bytree": np.linspace(0.7, 1.0, num=5),
    "reg_alpha": np.logspace(-3, 1, num=10),
    "reg_lambda": np.logspace(-3, 1, num=10),
    "min_child_weight": np.arange(1, 10),
}


def fit_xgboost(X: np.ndarray, y: np.ndarray, X_test: np.ndarray, y_test: np.ndarray, seed: int = 42,
                n_iter: int = 10, n_threads: int | None = None) -> dict[str, float]:
    """StandardScaler -> XGBoost, ``n_iter`` random configurations (Python ``random.Random(seed)``)
    of :data:`XGB_SPACE` scored by validation AUC. n <= 3: default settings, val AUC = train AUC."""
    import xgboost
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X)
    Xs, Xt = scaler.transform(X), scaler.transform(X_test)
    if len(X) <= 3:
        model = xgboost.XGBClassifier(random_state=seed, n_jobs=n_threads).fit(Xs, y)
        return _metrics(model, Xt, y_test, _auc(y, model.predict_proba(Xs)[:, 1]))
    splits = cv_splits(y, seed)
    rng = random.Random(seed)
    best, best_params = 0.0, None
    for _ in range(n_iter):
        params = {k: rng.choice(list(v)) for k, v in XGB_SPACE.items()}
        scores = []
        for a, b in splits:
            m = xgboost.XGBClassifier(**params, eval_metric="logloss", random_state=seed, n_jobs=n_threads).fit(Xs[a], y[a])
            scores.append(_auc(y[b], m.predict_proba(Xs[b])[:, 1]))
        s = float(np.mean(scores))
        if s > best:
            best, best_params = s, params
    if best_params is None:
        raise SkipSetting("xgboost: no configuration reached a validation AUC above 0")
    model = xgboost.XGBClassifier(**best_params, eval_metric="logloss", random_state=seed, n_jobs=n_threads).fit(Xs, y)
    return _metrics(model, Xt, y_test, best)


MLP_HIDDEN: tuple[tuple[int, ...], ...] = ((16,), (32,), (64,), (16, 16), (32, 32), (64, 64), (16, 16, 16), (32, 32, 32), (64, 64, 64))


def fit_mlp(X: np.ndarray, y: np.ndarray, X_test: np.ndarray, y_test: np.ndarray, seed: int = 42,
            n_iter: int = 1) -> dict[str, float]:
    """StandardScaler -> MLP (ReLU, Adam, ``max_iter`` = :data:`MAX_ITER`); ``n_iter`` random configurations
    drawn with ``RandomState(seed)`` (hidden sizes, initial learning rate, alpha), scored by
    validation AUC, the best refitted on all train rows. n <= 3: one hidden layer of 32."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X)
    Xs, Xt = scaler.transform(X), scaler.transform(X_test)
    log = FitLog()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(X) <= 3:
            model = log.fit(MLPClassifier(hidden_layer_sizes=(32,), max_iter=MAX_ITER, random_state=seed), Xs, y)
            return {**_metrics(model, Xt, y_test, _auc(y, model.predict_proba(Xs)[:, 1])), **log.columns()}
        lrs, alphas = np.logspace(-4, -2, num=5), np.logspace(-5, -2, num=5)
        splits = cv_splits(y, seed)
        rng = np.random.RandomState(seed)
        best, best_params = -math.inf, None
        for _ in range(n_iter):
            params = {"hidden_layer_sizes": MLP_HIDDEN[rng.randint(len(MLP_HIDDEN))],
                      "learning_rate_init": lrs[rng.randint(len(lrs))], "alpha": rng.choice(alphas),
                      "activation": "relu", "solver": "adam"}
            s = float(np.mean([_auc(y[b], log.fit(MLPClassifier(max_iter=MAX_ITER, random_state=seed, **params),
                                                  Xs[a], y[a]).predict_proba(Xs[b])[:, 1]) for a, b in splits]))
            if s > best:
                best, best_params = s, params
        model = log.fit(MLPClassifier(max_iter=MAX_ITER, random_state=seed, **best_params), Xs, y)  # type: ignore[arg-type]
    return {**_metrics(model, Xt, y_test, best), **log.columns()}


def fit_baseline(method: str, X: np.ndarray, y: np.ndarray, X_test: np.ndarray, y_test: np.ndarray, seed: int = 42,
                 penalty: str = "l2", n_threads: int | None = None) -> dict[str, float]:
    if method == "logreg":
        return fit_logreg(X, y, X_test, y_test, penalty, seed)
    if method == "pca":
        return fit_pca(X, y, X_test, y_test, seed)
    if method == "knn":
        return fit_knn(X, y, X_test, y_test, seed)
    if method == "xgboost":
        return fit_xgboost(X, y, X_test, y_test, seed, n_threads=n_threads)
    if method == "mlp":
        return fit_mlp(X, y, X_test, y_test, seed)
    raise ProbingError(f"unknown probing method {method!r}; use one of {', '.join(BASELINE_METHODS)}")


def mean_act_normalize(F: torch.Tensor) -> torch.Tensor:
    """Divide each latent by its mean non-zero |activation| (the package default ``"mean"``)."""
    scale = F.abs().sum(dim=0) / ((F != 0).sum(dim=0) + 1e-6)
    return F / (scale + 1e-6)


def _mean_difference(F_train: np.ndarray | torch.Tensor, yt: torch.Tensor, normalization: str) -> torch.Tensor:
    F = torch.as_tensor(F_train, dtype=torch.float32)
    if normalization == "mean":
        F = mean_act_normalize(F)
    elif normalization != "none":
        raise ProbingError(f"unknown mean-difference normalisation {normalization!r}: use mean or none")
    return F[yt == 1].mean(dim=0) - F[yt == 0].mean(dim=0)


#: Latents per dense column block when :func:`rank_latents` gets a sparse matrix.
RANK_COLUMN_BLOCK = 8192


def rank_latents(F_train: Any, y_train: np.ndarray, normalization: str = "mean") -> np.ndarray:
    """Latent indices by decreasing ``|mean(f | y=1) - mean(f | y=0)|`` on the train rows.

    ``F_train`` dense, or a ``scipy.sparse`` matrix (a wide SAE's encodings, issue #27): every
    statistic is per latent, so the sparse matrix is densified :data:`RANK_COLUMN_BLOCK` columns
    at a time and each block goes through the same computation."""
    yt = torch.as_tensor(np.asarray(y_train))
    if hasattr(F_train, "tocsc"):
        F = F_train.tocsc()
        diff = torch.cat([_mean_difference(F[:, c:c + RANK_COLUMN_BLOCK].toarray(), yt, normalization)
                          for c in range(0, F.shape[1], RANK_COLUMN_BLOCK)])
    else:
        diff = _mean_difference(F_train, yt, normalization)
    return torch.argsort(diff.abs(), descending=True).numpy()


def sae_probe(F_train: np.ndarray, y_train: np.ndarray, F_test: np.ndarray, y_test: np.ndarray, ks: Sequence[int],
              penalty: str = "l1", seed: int = 42, normalization: str = "mean",
              binarize: bool = False) -> list[tuple[int, dict[str, float] | str]]:
    """``[(k, metrics or skip reason)]``: logistic regression (:func:`fit_logreg`) on the top-k latents;
    the metrics carry ``latents``, the k latents the probe used (space-separated, best first)."""
    order = rank_latents(F_train, y_train, normalization)
    out: list[tuple[int, dict[str, float] | str]] = []
    for k in ks:
        if k > F_train.shape[1]:
            out.append((k, f"k={k} exceeds the SAE width {F_train.shape[1]}"))
            continue
        cols = order[:k]
        a, b = F_train[:, cols], F_test[:, cols]
        if hasattr(a, "toarray"):  # sparse encodings: only the k chosen latents become dense
            a, b = a.toarray(), b.toarray()
        if binarize:
            a, b = (a != 0).astype(np.float64), (b != 0).astype(np.float64)
        try:
            out.append((k, {**fit_logreg(a, y_train, b, y_test, penalty, seed), "latents": " ".join(map(str, cols))}))
        except (ValueError, SkipSetting) as exc:
            out.append((k, skip_reason(exc)))
    return out
