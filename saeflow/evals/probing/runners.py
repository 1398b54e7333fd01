"""The per-dataset runners: every baseline (:func:`baseline_rows`) or one SAE's probes
(:func:`sae_rows`) on every configured (regime, setting) of one dataset, read from its activation
folder; :func:`run_parallel` spreads datasets over processes.

Every result is one row of the long table (:data:`ROW_COLUMNS`); a setting that cannot run is a row
whose ``skipped`` column says why and whose metrics are NaN.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from saeflow.evals.common import encode_latents
from saeflow.evals.probing.datasets import ProbingError, load_acts
from saeflow.evals.probing.probes import CONVERGENCE_COLUMNS, fit_baseline, sae_probe
from saeflow.evals.probing.splits import SkipSetting, iter_splits, skip_reason

#: Value of ``method`` on SAE-probe rows and on the two quiver rows.
SAE_METHOD, QUIVER, QUIVER_SAE = "sae", "quiver", "quiver_sae"
#: Columns of the long results table, in order; the last ones are the convergence of the result's
#: solver fits (:class:`~saeflow.evals.probing.probes.FitLog`; empty for KNN, XGBoost, quiver rows).
ROW_COLUMNS: tuple[str, ...] = (
    "dataset", "regime", "setting", "method", "k", "sae", "n_train", "n_test",
    "val_auc", "test_auc", "test_acc", "test_f1", "picked", "latents", "skipped", *CONVERGENCE_COLUMNS,
)
#: Rows per SAE encoding batch.
ENCODE_BATCH = 1024


def _row(dataset: str, regime: str, setting: float | None, method: str, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {c: None for c in ROW_COLUMNS}
    row.update(dataset=dataset, regime=regime, setting=np.nan if setting is None else float(setting), method=method)
    row.update(kw)
    return row


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
                                     skipped=skip_reason(exc)))
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
        def encode(Z: np.ndarray) -> Any:  # dense while they fit one encode block, else sparse (CSR)
            f = encode_latents(sae, Z, ENCODE_BATCH)
            return f if hasattr(f, "tocsr") else f.numpy()

        F = encode(X)
        F_ood, y_ood = None, None
        if spec.ood_dir:
            X_ood, y_ood = load_acts(spec.ood_dir)
            F_ood = encode(X_ood)
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
