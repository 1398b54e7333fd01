"""Sparse probing on the sae-probes datasets in five regimes (SPEC 5; Kantamneni, Engels et al.).

Pure library code (numpy / torch / scikit-learn / xgboost; no Prefect). The pieces, in the order a
run uses them:

- **Datasets** (SPEC 5.1): the 113 binary-classification sets and the 8 covariate-shift test files
  shipped in the ``sae-probes`` package (read as data files; the package itself is never imported).
  Labels are ``LabelEncoder(target)`` over the whole file; ``max_rows`` keeps the first rows (the
  reference's ``MAX_AMT``).
- **Activations** (SPEC 5.2): :func:`last_token_activations`: one vector per prompt, the hook's
  activation at the last real token; BOS as the model's tokenizer adds it, prompts longer than
  ``max_seq_len`` cut from the left (BOS kept), the forward stops after the hook's block.
- **Splits** (SPEC 5.3): :func:`train_test_indices` draws exactly the reference's indices
  (``RandomState(seed)``: positives, negatives, then the test draw, then two permutations);
  :func:`make_split` builds the split of one (regime, setting) or raises :class:`SkipSetting` with
  the reason (too few rows, a class too small, ...).
- **Probes** (SPEC 5.4): :func:`fit_logreg` (C grid, :func:`cv_splits`), :func:`fit_pca`,
  :func:`fit_knn`, :func:`fit_xgboost`, :func:`fit_mlp`; :func:`sae_probe` ranks latents by the
  (normalised) class-mean difference and runs :func:`fit_logreg` on the top-k.
- **Quiver of arrows**: :func:`quiver_pick` picks, per (dataset, regime, setting), the candidate
  with the highest validation AUC (ties go to SAE probes) and reports its test metrics.
- **Runners**: :func:`baseline_rows` / :func:`sae_rows` evaluate one dataset (all regimes and
  settings) from its activation folder; :func:`run_parallel` spreads datasets over processes.

Every result is one row of the long table (:data:`ROW_COLUMNS`); a setting that cannot run is a row
whose ``skipped`` column says why and whose metrics are NaN (never averaged, see
:func:`regime_summary`).
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from saeflow.corpus import probing_dataset_names, sae_probes_data_dir

REGIMES: tuple[str, ...] = ("normal", "scarcity", "imbalance", "noise", "ood")
BASELINE_METHODS: tuple[str, ...] = ("logreg", "pca", "knn", "xgboost", "mlp")
#: Value of ``method`` on SAE-probe rows and on the two quiver rows.
SAE_METHOD, QUIVER, QUIVER_SAE = "sae", "quiver", "quiver_sae"
#: Columns of the long results table, in order.
ROW_COLUMNS: tuple[str, ...] = (
    "dataset", "regime", "setting", "method", "k", "sae", "n_train", "n_test",
    "val_auc", "test_auc", "test_acc", "test_f1", "picked", "skipped",
)
#: The reference's C grid (``np.logspace(5, -5, 10)``).
C_GRID = np.logspace(5, -5, 10)
OOD_SUFFIX = "_OOD"


class ProbingError(ValueError):
    """Probing input that cannot be used (unknown dataset, wrong shapes, NaN activations, ...)."""


class SkipSetting(Exception):
    """A (dataset, regime, setting) that cannot run; ``str(exc)`` is the reason recorded in the table."""


# ----------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def ood_dataset_names() -> tuple[str, ...]:
    """In-distribution names of the datasets that have an ``<name>_OOD`` covariate-shift test file (8)."""
    folder = sae_probes_data_dir() / "OOD data"
    return tuple(sorted(p.name.removesuffix(f"{OOD_SUFFIX}.csv.zst") for p in folder.glob(f"*{OOD_SUFFIX}.csv.zst")))


def dataset_file(name: str, ood: bool = False) -> Path:
    data = sae_probes_data_dir()
    return data / "OOD data" / f"{name}{OOD_SUFFIX}.csv.zst" if ood else data / "cleaned_data" / f"{name}.csv.zst"


def resolve_datasets(requested: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """``(names to run, {unknown name: reason})``; ``None`` = all 113 binary datasets."""
    known = probing_dataset_names()
    if requested is None:
        return list(known), {}
    names, skipped = [], {}
    for n in requested:
        if n in known:
            if n not in names:
                names.append(n)
        else:
            close = [k for k in known if n.lower() in k.lower()][:3]
            skipped[n] = (f"unknown dataset {n!r}: not one of the {len(known)} sae-probes binary datasets"
                          + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return names, skipped


def load_dataset(name: str, ood: bool = False, max_rows: int | None = None) -> tuple[list[str], np.ndarray]:
    """Prompts and ``LabelEncoder(target)`` labels (over the whole file).

    ``max_rows`` (a cap below the file's size) keeps the first ``max_rows // 2`` rows of each class,
    in file order: a class-balanced prefix, so every regime's split can still be drawn (a plain
    prefix of a shuffled balanced file is off balance by ~sqrt(n) rows, enough to make the normal
    split impossible)."""
    path = dataset_file(name, ood)
    if not path.is_file():
        raise ProbingError(f"no {'OOD ' if ood else ''}file for dataset {name!r} at {path}")
    df = pd.read_csv(path)
    if "prompt" not in df.columns or "target" not in df.columns:
        raise ProbingError(f"{path} has no prompt/target columns (columns: {list(df.columns)})")
    classes, y = np.unique(df["target"].values, return_inverse=True)  # = LabelEncoder().fit_transform
    if len(classes) != 2:
        raise ProbingError(f"dataset {name!r} has {len(classes)} classes, a binary dataset needs 2")
    prompts = df["prompt"].astype(str).tolist()
    if max_rows is not None and max_rows < len(y):
        keep = np.sort(np.concatenate([np.flatnonzero(y == c)[: max_rows // 2] for c in (0, 1)]))
        prompts, y = [prompts[i] for i in keep], y[keep]
    return prompts, y.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# activations
# ----------------------------------------------------------------------------------------------


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_seq_len: int) -> list[list[int]]:
    """Token ids per prompt with the tokenizer's own special tokens (BOS for Gemma), cut from the
    left to ``max_seq_len`` tokens (special tokens kept), as the reference tokenises."""
    side = getattr(tokenizer, "truncation_side", "right")
    tokenizer.truncation_side = "left"
    try:
        ids = tokenizer(list(prompts), truncation=True, max_length=max_seq_len)["input_ids"]
    finally:
        tokenizer.truncation_side = side
    if any(len(x) == 0 for x in ids):
        raise ProbingError("a prompt tokenised to zero tokens; the tokenizer adds no BOS and the prompt is empty")
    return [list(x) for x in ids]


@torch.inference_mode()
def last_token_activations(model, token_ids: Sequence[Sequence[int]], hook: str, batch_tokens: int = 4096,
                           pad_id: int = 0) -> np.ndarray:
    """``[n, d_model]`` float32: the hook's activation at each prompt's last token.

    Prompts are batched by length (sorted, right-padded, at most ``batch_tokens`` padded tokens per
    forward); causal attention means the padding after a prompt never changes its activations.
    """
    from saeflow.extract import forward_acts

    n = len(token_ids)
    lengths = np.array([len(t) for t in token_ids])
    order = np.argsort(lengths, kind="stable")
    device = next(model.parameters()).device
    out = np.zeros((n, model.cfg.d_model), dtype=np.float32)
    i = 0
    while i < n:
        j = i + 1
        while j < n and (j - i + 1) * lengths[order[j]] <= batch_tokens:
            j += 1
        idx = order[i:j]
        width = int(lengths[idx].max())
        toks = torch.full((len(idx), width), int(pad_id), dtype=torch.long)
        for r, p in enumerate(idx):
            toks[r, : lengths[p]] = torch.as_tensor(token_ids[p], dtype=torch.long)
        acts = forward_acts(model, toks.to(device), hook).float()
        last = torch.as_tensor(lengths[idx] - 1, device=acts.device)
        out[idx] = acts[torch.arange(len(idx), device=acts.device), last].cpu().numpy()
        i = j
    if not np.isfinite(out).all():
        raise ProbingError(f"non-finite activations at {hook}: run the model in float32 (model.dtype)")
    return out


# ----------------------------------------------------------------------------------------------
# splits (SPEC 5.3)
# ----------------------------------------------------------------------------------------------


def scarcity_sizes() -> list[int]:
    """The 20 data-scarcity train sizes: ``unique(round(logspace(1, 10, 20, base=2)))``."""
    return np.unique(np.round(np.logspace(1, 10, num=20, base=2)).astype(int)).tolist()


def imbalance_fracs() -> list[float]:
    """The 19 positive fractions 0.05 ... 0.95 (rounded to the 0.05 grid)."""
    return [round(f * 20) / 20 for f in np.linspace(0.05, 0.95, num=19)]


def noise_fracs() -> list[float]:
    """The 11 label-noise fractions 0 ... 0.5 (rounded to the 0.05 grid)."""
    return [round(f * 20) / 20 for f in np.linspace(0.0, 0.5, num=11)]


def train_test_indices(y: np.ndarray, num_train: int, num_test: int, pos_ratio: float = 0.5,
                       seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """The reference's seeded draw: ``ceil(pos_ratio * n)`` positives per side, the rest negatives."""
    rng = np.random.RandomState(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    n_pos_train = int(np.ceil(pos_ratio * num_train))
    n_pos_test = int(np.ceil(pos_ratio * num_test))
    need_pos, need_neg = n_pos_train + n_pos_test, (num_train - n_pos_train) + (num_test - n_pos_test)
    if need_pos > len(pos) or need_neg > len(neg):
        raise SkipSetting(f"needs {need_pos} positives and {need_neg} negatives, the data has {len(pos)} and {len(neg)}")
    tr_pos = rng.choice(pos, size=n_pos_train, replace=False)
    tr_neg = rng.choice(neg, size=num_train - n_pos_train, replace=False)
    te_pos = rng.choice(np.setdiff1d(pos, tr_pos), size=n_pos_test, replace=False)
    te_neg = rng.choice(np.setdiff1d(neg, tr_neg), size=num_test - n_pos_test, replace=False)
    train = rng.permutation(np.concatenate([tr_pos, tr_neg]))
    test = rng.permutation(np.concatenate([te_pos, te_neg]))
    return train, test


def specify_split(y: np.ndarray, num_train: int, pos_ratio: float = 0.5, num_test: int | None = None,
                  seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """``get_xy_traintest_specify``'s indices over ``y`` (already cut to ``MAX_AMT`` rows)."""
    n = len(y)
    if num_test is None:
        num_test = n - num_train - 1
    if num_train < 1:
        raise SkipSetting(f"{num_train} train rows requested: the dataset ({n} rows) is too small")
    if num_train + min(100, num_test) > n:
        raise SkipSetting(f"{num_train} train + {min(100, num_test)} test rows requested but only {n} rows exist")
    return train_test_indices(y, num_train, num_test, pos_ratio, seed)


def normal_num_train(n: int) -> int:
    return min(n - 100, 1024)


def imbalance_sizes(y: np.ndarray, min_test: int = 100) -> tuple[int, int]:
    """``(num_train, num_test)`` of the class-imbalance regime (same for every fraction)."""
    lo, hi = 0.05, 0.95
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    max_total = int(min(n_neg / (1 - lo), n_pos / hi))
    num_train = min(max_total - min_test, 1024)
    return num_train, max(100, max_total - num_train - 1)


def corrupt_labels(y: np.ndarray, frac: float, seed: int = 42) -> np.ndarray:
    """Flip ``int(len(y) * frac)`` labels chosen by ``RandomState(seed)`` (the train side only)."""
    if not 0 <= frac <= 0.5:
        raise SkipSetting(f"label-noise fraction {frac} is outside [0, 0.5]")
    rng = np.random.RandomState(seed)
    flip = rng.choice(len(y), size=int(len(y) * frac), replace=False)
    out = y.copy()
    out[flip] = 1 - out[flip]
    return out


@dataclass
class Split:
    train: np.ndarray
    test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    test_is_ood: bool = False


def make_split(regime: str, setting: float | None, y: np.ndarray, seed: int = 42,
               y_ood: np.ndarray | None = None) -> Split:
    """The split of one (regime, setting); raises :class:`SkipSetting` when it cannot be drawn.

    ``y`` holds the labels of the dataset's first ``max_rows`` rows; ``setting`` is the train size
    (scarcity), the positive fraction (imbalance) or the flipped fraction (noise); ``None`` for
    normal and OOD. OOD draws 1024 balanced train rows from the first 1500 rows and tests on every
    row of the OOD file (``y_ood``).
    """
    n = len(y)
    if regime == "normal":
        tr, te = specify_split(y, normal_num_train(n), seed=seed)
    elif regime == "scarcity":
        num_train = int(setting)  # type: ignore[arg-type]
        if num_train > n - 100:
            raise SkipSetting(f"train size {num_train} > {n} rows - 100 test rows")
        tr, te = specify_split(y, num_train, seed=seed)
    elif regime == "imbalance":
        num_train, num_test = imbalance_sizes(y)
        tr, te = specify_split(y, num_train, pos_ratio=float(setting), num_test=num_test, seed=seed)  # type: ignore[arg-type]
    elif regime == "noise":
        tr, te = specify_split(y, normal_num_train(n), seed=seed)
        return Split(tr, te, corrupt_labels(y[tr], float(setting), seed), y[te])  # type: ignore[arg-type]
    elif regime == "ood":
        if y_ood is None:
            raise SkipSetting("no OOD test file for this dataset")
        tr, _ = specify_split(y[:1500], 1024, num_test=0, seed=seed)
        return Split(tr, np.arange(len(y_ood)), y[tr], y_ood, test_is_ood=True)
    else:
        raise ProbingError(f"unknown regime {regime!r}; use one of {', '.join(REGIMES)}")
    return Split(tr, te, y[tr], y[te])


# ----------------------------------------------------------------------------------------------
# probes (SPEC 5.4)
# ----------------------------------------------------------------------------------------------


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
    """The reference's estimator: L2 with lbfgs, or L1 with saga; ``max_iter=1000``."""
    from sklearn.linear_model import LogisticRegression

    if penalty == "l1":
        return LogisticRegression(C=C, l1_ratio=1.0, solver="saga", random_state=seed, max_iter=1000)
    if penalty == "l2":
        return LogisticRegression(C=C, random_state=seed, max_iter=1000)
    raise ProbingError(f"unknown penalty {penalty!r}: use l1 or l2")


def fit_logreg(X: np.ndarray, y: np.ndarray, X_test: np.ndarray, y_test: np.ndarray, penalty: str = "l2",
               seed: int = 42) -> dict[str, float]:
    """Logistic regression with C chosen on validation AUC over :data:`C_GRID` (``find_best_reg``).

    n <= 3: no search (C = 1, val AUC = train AUC). The final model is fitted on the train rows
    shuffled by ``RandomState(seed)``.
    """
    best_C, val_auc = None, None
    if len(X) > 3:
        splits = cv_splits(y, seed)
        scores = []
        for C in C_GRID:
            fold = []
            for a, b in splits:
                if len(np.unique(y[a])) < 2:
                    fold.append(0.5)
                    continue
                m = logreg(C, penalty, seed).fit(X[a], y[a])
                fold.append(_auc(y[b], m.predict_proba(X[b])[:, 1]))
            scores.append(np.mean(fold))
        best = int(np.argmax(scores))
        best_C, val_auc = C_GRID[best], float(scores[best])
    perm = np.random.RandomState(seed).permutation(len(X))
    model = logreg(1.0 if best_C is None else best_C, penalty, seed).fit(X[perm], y[perm])
    if val_auc is None:
        val_auc = _auc(y[perm], model.predict_proba(X[perm])[:, 1])
    return _metrics(model, X_test, y_test, val_auc)


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
    if len(Z) > 3:
        splits = cv_splits(y, seed)
        best, best_n, model = -math.inf, None, None
        for d in dims:
            fold = [_auc(y[b], logreg(seed=seed).fit(Z[a, :d], y[a]).predict_proba(Z[b, :d])[:, 1]) for a, b in splits]
            s = float(np.mean(fold))
            if s > best:
                best, best_n = s, int(d)
        model = logreg(seed=seed).fit(Z[:, :best_n], y)
        val_auc = best
    else:
        best_n = Z.shape[1]
        model = logreg(seed=seed).fit(Z, y)
        val_auc = _auc(y, model.predict_proba(Z)[:, 1])
    return _metrics(model, pca.transform(Xt)[:, :best_n], y_test, val_auc)


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
    """StandardScaler -> MLP (ReLU, Adam, ``max_iter=1000``); ``n_iter`` random configurations
    drawn with ``RandomState(seed)`` (hidden sizes, initial learning rate, alpha), scored by
    validation AUC, the best refitted on all train rows. n <= 3: one hidden layer of 32."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X)
    Xs, Xt = scaler.transform(X), scaler.transform(X_test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(X) <= 3:
            model = MLPClassifier(hidden_layer_sizes=(32,), max_iter=1000, random_state=seed).fit(Xs, y)
            return _metrics(model, Xt, y_test, _auc(y, model.predict_proba(Xs)[:, 1]))
        lrs, alphas = np.logspace(-4, -2, num=5), np.logspace(-5, -2, num=5)
        splits = cv_splits(y, seed)
        rng = np.random.RandomState(seed)
        best, best_params = -math.inf, None
        for _ in range(n_iter):
            params = {"hidden_layer_sizes": MLP_HIDDEN[rng.randint(len(MLP_HIDDEN))],
                      "learning_rate_init": lrs[rng.randint(len(lrs))], "alpha": rng.choice(alphas),
                      "activation": "relu", "solver": "adam"}
            s = float(np.mean([_auc(y[b], MLPClassifier(max_iter=1000, random_state=seed, **params)
                                    .fit(Xs[a], y[a]).predict_proba(Xs[b])[:, 1]) for a, b in splits]))
            if s > best:
                best, best_params = s, params
        model = MLPClassifier(max_iter=1000, random_state=seed, **best_params).fit(Xs, y)  # type: ignore[arg-type]
    return _metrics(model, Xt, y_test, best)


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


# ----------------------------------------------------------------------------------------------
# SAE probes
# ----------------------------------------------------------------------------------------------


def mean_act_normalize(F: torch.Tensor) -> torch.Tensor:
    """Divide each latent by its mean non-zero |activation| (the package default ``"mean"``)."""
    scale = F.abs().sum(dim=0) / ((F != 0).sum(dim=0) + 1e-6)
    return F / (scale + 1e-6)


def rank_latents(F_train: np.ndarray | torch.Tensor, y_train: np.ndarray, normalization: str = "mean") -> np.ndarray:
    """Latent indices by decreasing ``|mean(f | y=1) - mean(f | y=0)|`` on the train rows."""
    F = torch.as_tensor(F_train, dtype=torch.float32)
    if normalization == "mean":
        F = mean_act_normalize(F)
    elif normalization != "none":
        raise ProbingError(f"unknown mean-difference normalisation {normalization!r}: use mean or none")
    yt = torch.as_tensor(np.asarray(y_train))
    diff = F[yt == 1].mean(dim=0) - F[yt == 0].mean(dim=0)
    return torch.argsort(diff.abs(), descending=True).numpy()


def sae_probe(F_train: np.ndarray, y_train: np.ndarray, F_test: np.ndarray, y_test: np.ndarray, ks: Sequence[int],
              penalty: str = "l1", seed: int = 42, normalization: str = "mean",
              binarize: bool = False) -> list[tuple[int, dict[str, float] | str]]:
    """``[(k, metrics or skip reason)]``: logistic regression (:func:`fit_logreg`) on the top-k latents."""
    order = rank_latents(F_train, y_train, normalization)
    out: list[tuple[int, dict[str, float] | str]] = []
    for k in ks:
        if k > F_train.shape[1]:
            out.append((k, f"k={k} exceeds the SAE width {F_train.shape[1]}"))
            continue
        cols = order[:k]
        a, b = F_train[:, cols], F_test[:, cols]
        if binarize:
            a, b = (a != 0).astype(np.float64), (b != 0).astype(np.float64)
        try:
            out.append((k, fit_logreg(a, y_train, b, y_test, penalty, seed)))
        except (ValueError, SkipSetting) as exc:
            out.append((k, _reason(exc)))
    return out


def encode_all(sae, X: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """``sae.encode`` over rows of ``X`` in batches, float32 on CPU."""
    dev = sae.W_dec.device
    parts = []
    with torch.inference_mode():
        for s in range(0, len(X), batch_size):
            parts.append(sae.encode(torch.from_numpy(X[s:s + batch_size]).to(dev)).float().cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, sae.d_sae), np.float32)


# ----------------------------------------------------------------------------------------------
# quiver of arrows
# ----------------------------------------------------------------------------------------------


def quiver_pick(candidates: pd.DataFrame) -> pd.Series | None:
    """The candidate row with the highest ``val_auc`` (SAE rows first, so ties go to an SAE probe);
    ``None`` when no candidate has a validation AUC."""
    c = candidates[candidates["val_auc"].notna()]
    if c.empty:
        return None
    is_sae = (c["method"] == SAE_METHOD).to_numpy()
    c = pd.concat([c[is_sae], c[~is_sae]])
    return c.iloc[int(np.argmax(c["val_auc"].to_numpy()))]


def add_quivers(df: pd.DataFrame, quiver_ks: Sequence[int], baselines: Sequence[str]) -> pd.DataFrame:
    """Append the two quiver rows per (dataset, regime, setting): ``quiver`` (baselines only) and
    ``quiver_sae`` (baselines + every SAE's probes at ``quiver_ks``); ``picked`` names the choice."""
    rows = []
    ok = df[df["skipped"].isna()]
    for (ds, regime, setting), g in ok.groupby(["dataset", "regime", "setting"], sort=False, dropna=False):
        base = g[g["method"].isin(list(baselines))]
        sae = g[(g["method"] == SAE_METHOD) & g["k"].isin(list(quiver_ks))]
        for name, cand in ((QUIVER, base), (QUIVER_SAE, pd.concat([base, sae]))):
            row = {c: None for c in ROW_COLUMNS}
            row.update(dataset=ds, regime=regime, setting=setting, method=name)
            pick = quiver_pick(cand) if len(cand) else None
            if pick is None or (name == QUIVER_SAE and base.empty):
                row["skipped"] = "no candidate probe ran" if pick is None else "no baseline ran"
            else:
                for col in ("n_train", "n_test", "val_auc", "test_auc", "test_acc", "test_f1"):
                    row[col] = pick[col]
                label = pick["method"]
                if label == SAE_METHOD:
                    label = f"sae:{pick['sae']}:k{int(pick['k'])}"
                row["picked"] = label
            rows.append(row)
    return pd.concat([df, pd.DataFrame(rows, columns=list(ROW_COLUMNS))], ignore_index=True) if rows else df


# ----------------------------------------------------------------------------------------------
# per-dataset runners
# ----------------------------------------------------------------------------------------------


def regime_settings(regime: str, scarcity: Sequence[int] | None = None, imbalance: Sequence[float] | None = None,
                    noise: Sequence[float] | None = None) -> list[float | None]:
    if regime in ("normal", "ood"):
        return [None]
    if regime == "scarcity":
        return list(scarcity if scarcity is not None else scarcity_sizes())
    if regime == "imbalance":
        return list(imbalance if imbalance is not None else imbalance_fracs())
    if regime == "noise":
        return list(noise if noise is not None else noise_fracs())
    raise ProbingError(f"unknown regime {regime!r}; use one of {', '.join(REGIMES)}")


def _reason(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, SkipSetting):
        return msg
    return f"{type(exc).__name__}: {msg}"


def _row(dataset: str, regime: str, setting: float | None, method: str, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {c: None for c in ROW_COLUMNS}
    row.update(dataset=dataset, regime=regime, setting=np.nan if setting is None else float(setting), method=method)
    row.update(kw)
    return row


def _check_split(sp: Split) -> None:
    if len(np.unique(sp.y_train)) < 2:
        raise SkipSetting("single-class train split")
    if len(np.unique(sp.y_test)) < 2:
        raise SkipSetting("single-class test split")


def iter_splits(dataset: str, y: np.ndarray, y_ood: np.ndarray | None, regimes: Sequence[str],
                settings: dict[str, list[float | None]], seed: int) -> Iterator[tuple[str, float | None, Split | str]]:
    """``(regime, setting, split or skip reason)`` for every configured setting of one dataset."""
    for regime in regimes:
        for setting in settings[regime]:
            try:
                sp = make_split(regime, setting, y, seed, y_ood)
                _check_split(sp)
                yield regime, setting, sp
            except SkipSetting as exc:
                yield regime, setting, _reason(exc)


@dataclass(frozen=True)
class RunSpec:
    """What one dataset's evaluation needs (picklable: sent to worker processes)."""

    dataset: str
    acts_dir: str
    ood_dir: str | None
    regimes: tuple[str, ...]
    settings: dict[str, list[float | None]]
    seed: int = 42
    methods: tuple[str, ...] = ("logreg",)
    logreg_penalty: str = "l2"
    sae_dir: str | None = None
    sae_name: str | None = None
    ks: dict[str, tuple[int, ...]] | None = None
    sae_penalty: str = "l1"
    normalization: str = "mean"
    binarize: bool = False
    threads: int | None = None


def load_acts(acts_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(X [n, d] float32, y [n] int64)`` from a probing activation folder (``acts.zarr`` + ``labels.npy``)."""
    from saeflow.store import ActivationStore

    store = ActivationStore.open(acts_dir)
    X = store.read(0, store.n_rows)
    y = np.load(Path(acts_dir) / "labels.npy")
    if len(y) != len(X):
        raise ProbingError(f"{acts_dir}: {len(X)} activation rows but {len(y)} labels; delete the folder to rebuild it")
    return X, y


def _limit_threads(n: int | None):
    from contextlib import nullcontext

    if n is None:
        return nullcontext()
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    return threadpool_limits(n)


def baseline_rows(spec: RunSpec) -> pd.DataFrame:
    """Every baseline method on every configured (regime, setting) of one dataset."""
    with _limit_threads(spec.threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        X, y = load_acts(spec.acts_dir)
        X_ood, y_ood = load_acts(spec.ood_dir) if spec.ood_dir else (None, None)
        rows = []
        for regime, setting, sp in iter_splits(spec.dataset, y, y_ood, spec.regimes, spec.settings, spec.seed):
            for method in spec.methods:
                if isinstance(sp, str):
                    rows.append(_row(spec.dataset, regime, setting, method, skipped=sp))
                    continue
                X_test = X_ood[sp.test] if sp.test_is_ood else X[sp.test]  # type: ignore[index]
                try:
                    m = fit_baseline(method, X[sp.train], sp.y_train, X_test, sp.y_test, spec.seed,
                                     spec.logreg_penalty, spec.threads)
                    rows.append(_row(spec.dataset, regime, setting, method, n_train=len(sp.train), n_test=len(sp.test), **m))
                except (ValueError, SkipSetting) as exc:
                    rows.append(_row(spec.dataset, regime, setting, method, n_train=len(sp.train), n_test=len(sp.test),
                                     skipped=_reason(exc)))
    return pd.DataFrame(rows, columns=list(ROW_COLUMNS))


def sae_rows(spec: RunSpec) -> pd.DataFrame:
    """The SAE's top-k probes on every configured (regime, setting) of one dataset; the dataset (and
    its OOD file) is encoded once and every split indexes the encoded rows."""
    from saeflow.saes import load_sae

    if spec.sae_dir is None or spec.ks is None:
        raise ProbingError("sae_rows needs sae_dir and ks")
    with _limit_threads(spec.threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = load_sae(Path(spec.sae_dir), device="cpu")
        X, y = load_acts(spec.acts_dir)
        if X.shape[1] != sae.d_in:
            raise ProbingError(f"SAE {spec.sae_dir} has d_in={sae.d_in} but the activations of {spec.dataset} are {X.shape[1]} wide")
        F = encode_all(sae, X)
        F_ood, y_ood = None, None
        if spec.ood_dir:
            X_ood, y_ood = load_acts(spec.ood_dir)
            F_ood = encode_all(sae, X_ood)
        rows = []
        for regime, setting, sp in iter_splits(spec.dataset, y, y_ood, spec.regimes, spec.settings, spec.seed):
            ks = spec.ks[regime]
            if isinstance(sp, str):
                rows += [_row(spec.dataset, regime, setting, SAE_METHOD, k=k, sae=spec.sae_name, skipped=sp) for k in ks]
                continue
            F_test = F_ood[sp.test] if sp.test_is_ood else F[sp.test]  # type: ignore[index]
            binarize = spec.binarize and regime == "normal"
            for k, m in sae_probe(F[sp.train], sp.y_train, F_test, sp.y_test, ks, spec.sae_penalty, spec.seed,
                                  spec.normalization, binarize):
                extra = {"skipped": m} if isinstance(m, str) else m
                rows.append(_row(spec.dataset, regime, setting, SAE_METHOD, k=k, sae=spec.sae_name,
                                 n_train=len(sp.train), n_test=len(sp.test), **extra))
    return pd.DataFrame(rows, columns=list(ROW_COLUMNS))


def run_parallel(fn: Callable[[Any], Any], items: Sequence[Any], n_jobs: int) -> Iterable[tuple[int, Any]]:
    """``(index, fn(item))`` as each finishes; ``n_jobs`` worker processes (1 = in this process)."""
    if n_jobs <= 1 or len(items) <= 1:
        for i, it in enumerate(items):
            yield i, fn(it)
        return
    from joblib import Parallel, delayed

    def call(i: int, it: Any) -> tuple[int, Any]:
        return i, fn(it)

    yield from Parallel(n_jobs=min(n_jobs, len(items)), return_as="generator_unordered")(
        delayed(call)(i, it) for i, it in enumerate(items))


# ----------------------------------------------------------------------------------------------
# summaries
# ----------------------------------------------------------------------------------------------


def clean_mean(values: pd.Series) -> float:
    """Mean of the finite values (NaN when there are none); skipped rows never enter an average."""
    v = pd.to_numeric(values, errors="coerce")
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def regime_summary(df: pd.DataFrame, sae_names: Sequence[str], quiver_ks: Sequence[int]) -> pd.DataFrame:
    """One row per regime (the paper's Fig. 1): mean test AUC of the baseline quiver, the quiver with
    SAEs, logistic regression and each SAE at each ``quiver_ks``, over the (dataset, setting) pairs
    where the two quivers both ran; plus how often the quiver with SAEs picked an SAE probe."""
    out = []
    ok = df[df["skipped"].isna()]
    for regime in [r for r in REGIMES if r in set(ok["regime"])]:
        g = ok[ok["regime"] == regime]
        g = g.assign(_s=g["setting"].fillna(-1.0))
        q = g[g["method"] == QUIVER].set_index(["dataset", "_s"])
        qs = g[g["method"] == QUIVER_SAE].set_index(["dataset", "_s"])
        common = q.index.intersection(qs.index)
        rec: dict[str, Any] = {"regime": regime, "n_pairs": len(common), "n_datasets": len({d for d, _ in common})}
        rec["baseline_quiver"] = clean_mean(q.loc[common, "test_auc"]) if len(common) else float("nan")
        rec["quiver_with_saes"] = clean_mean(qs.loc[common, "test_auc"]) if len(common) else float("nan")
        rec["quiver_gain"] = rec["quiver_with_saes"] - rec["baseline_quiver"]
        picks = qs.loc[common, "picked"].astype(str) if len(common) else pd.Series([], dtype=str)
        rec["frac_sae_picked"] = float(picks.str.startswith("sae:").mean()) if len(picks) else float("nan")
        for method in BASELINE_METHODS:
            m = g[g["method"] == method]
            if len(m):
                rec[method] = clean_mean(m["test_auc"])
        for name in sae_names:
            for k in quiver_ks:
                m = g[(g["method"] == SAE_METHOD) & (g["sae"] == name) & (g["k"] == k)]
                if len(m):
                    rec[f"{name}_k{k}"] = clean_mean(m["test_auc"])
        out.append(rec)
    return pd.DataFrame(out)


def sae_summary(df: pd.DataFrame, prefix: str = "probing") -> dict[str, float]:
    """Flat per-SAE numbers from its rows: ``<prefix>_<regime>_k<k>_auc`` (mean test AUC over the
    runs that did not skip) and ``<prefix>_<regime>_auc`` (per run, the k with the best validation
    AUC). NaN values are left out of the dict."""
    out: dict[str, float] = {}
    ok = df[df["skipped"].isna() & (df["method"] == SAE_METHOD)]
    for regime, g in ok.groupby("regime"):
        for k, gk in g.groupby("k"):
            out[f"{prefix}_{regime}_k{int(k)}_auc"] = clean_mean(gk["test_auc"])
        best = g.sort_values(["val_auc", "k"], ascending=[False, True]).groupby(["dataset", "setting"], dropna=False).head(1)
        out[f"{prefix}_{regime}_auc"] = clean_mean(best["test_auc"])
    return {k: v for k, v in out.items() if np.isfinite(v)}
