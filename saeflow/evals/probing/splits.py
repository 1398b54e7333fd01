"""The train / test splits of the five regimes (SPEC 5.3), drawn exactly as the reference does.

:func:`train_test_indices` draws the reference's indices (``RandomState(seed)``: positives,
negatives, then the test draw, then two permutations); :func:`make_split` builds the split of one
(regime, setting) or raises :class:`SkipSetting` with the reason (too few rows, a class too small,
...); :func:`iter_splits` walks every configured setting of one dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from saeflow.evals.probing.datasets import ProbingError

REGIMES: tuple[str, ...] = ("normal", "scarcity", "imbalance", "noise", "ood")


class SkipSetting(Exception):
    """A (dataset, regime, setting) that cannot run; ``str(exc)`` is the reason recorded in the table."""


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


def skip_reason(exc: BaseException) -> str:
    """The ``skipped`` text of a setting that raised ``exc``: a :class:`SkipSetting`'s message, else
    the exception's type and first line."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, SkipSetting):
        return msg
    return f"{type(exc).__name__}: {msg}"


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
                yield regime, setting, skip_reason(exc)
