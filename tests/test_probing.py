"""Sparse probing (SPEC 5): splits identical to sae-probes', regime sizes, skips with reasons, the
quiver's choice, SAE probes on a planted latent, agreement with the package's own probe functions,
and the evaluation end to end on the tiny random model."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from saeflow.evals import probing as P
from saeflow.corpus import sae_probes_data_dir

pytestmark = pytest.mark.usefixtures("one_thread", "one_blas_thread")


@pytest.fixture(scope="module")
def one_blas_thread():
    """Small matrices: one BLAS / OpenMP thread (a busy 2-core machine makes threaded BLAS spin)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def _reference_module(name: str):
    """One module file of the installed sae_probes package, loaded without the package ``__init__``
    (which imports sae_lens / transformer_lens and reads all 113 datasets: ~12 s of CPU). Its
    activation-generation import is stubbed (not used by the functions compared here)."""
    pkg_dir = sae_probes_data_dir().parent
    pkg_spec = importlib.util.find_spec("sae_probes") if "sae_probes" not in sys.modules else None
    for mod, attrs in (("sae_probes", {"__spec__": pkg_spec}), ("sae_probes.constants", {"DATA_PATH": pkg_dir / "data"}),
                       ("sae_probes.generate_model_activations", {"ensure_dataset_activations": None})):
        if mod not in sys.modules:
            m = types.ModuleType(mod)
            m.__dict__.update(attrs)
            m.__path__ = [str(pkg_dir)] if mod == "sae_probes" else []  # type: ignore[attr-defined]
            sys.modules[mod] = m
    full = f"sae_probes_ref_{name}"
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(full, pkg_dir / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        sys.modules[full] = mod
    return sys.modules[full]


@pytest.fixture(scope="module")
def ref_data():
    return _reference_module("utils_data")


@pytest.fixture(scope="module")
def ref_train():
    return _reference_module("utils_training")


def _balanced(n: int, seed: int = 0) -> np.ndarray:
    y = np.array([0, 1] * (n // 2) + [0] * (n % 2))
    np.random.default_rng(seed).shuffle(y)
    return y


# --------------------------------------------------------------------------------- splits
@pytest.mark.parametrize("n,num_train,pos_ratio,num_test", [(3200, 1024, 0.5, None), (728, 628, 0.5, None),
                                                            (2000, 10, 0.5, None), (3000, 1024, 0.05, 514),
                                                            (3000, 1024, 0.85, 514), (1500, 1024, 0.5, 0)])
def test_split_indices_identical_to_reference(ref_data, n, num_train, pos_ratio, num_test):
    y = _balanced(n)
    num_test = n - num_train - 1 if num_test is None else num_test
    theirs = ref_data.get_train_test_indices(y, num_train, num_test, pos_ratio, 42)
    ours = P.train_test_indices(y, num_train, num_test, pos_ratio, 42)
    assert all(np.array_equal(a, b) for a, b in zip(theirs, ours))
    other = P.train_test_indices(y, num_train, num_test, pos_ratio, 7)
    assert not np.array_equal(other[0], ours[0])  # the seed matters


def test_regime_grids_and_sizes(ref_data):
    assert P.scarcity_sizes() == ref_data.get_training_sizes() and len(P.scarcity_sizes()) == 20
    assert np.allclose(P.imbalance_fracs(), ref_data.get_class_imbalance()) and len(P.imbalance_fracs()) == 19
    assert np.allclose(P.noise_fracs(), ref_data.get_corrupt_frac()) and len(P.noise_fracs()) == 11
    y = _balanced(3200)
    sp = P.make_split("normal", None, y)
    assert (len(sp.train), len(sp.test)) == (1024, 3200 - 1024 - 1)
    assert sp.y_train.mean() == 0.5 and not set(sp.train) & set(sp.test)
    assert len(P.make_split("normal", None, _balanced(900)).train) == 800
    sp = P.make_split("scarcity", 38, y)
    assert len(sp.train) == 38 and sp.y_train.sum() == 19
    # imbalance: (num_train, num_test) as the reference computes them from the labels
    ref_get_yvals = ref_data.get_yvals
    try:
        ref_data.get_yvals = lambda _: y
        assert P.imbalance_sizes(y) == ref_data.get_classimabalance_num_train("x")
    finally:
        ref_data.get_yvals = ref_get_yvals
    sp = P.make_split("imbalance", 0.1, y)
    nt, nte = P.imbalance_sizes(y)
    assert (len(sp.train), len(sp.test)) == (nt, nte)
    assert sp.y_train.sum() == int(np.ceil(0.1 * nt)) and sp.y_test.sum() == int(np.ceil(0.1 * nte))
    # label noise flips int(n * frac) train labels, the same ones as the reference; test labels stay clean
    clean, noisy = P.make_split("normal", None, y), P.make_split("noise", 0.3, y)
    assert np.array_equal(clean.train, noisy.train) and np.array_equal(clean.y_test, noisy.y_test)
    assert (clean.y_train != noisy.y_train).sum() == int(1024 * 0.3)
    assert np.array_equal(noisy.y_train, ref_data.corrupt_ytrain(clean.y_train, 0.3, 42))
    # OOD: 1024 balanced train rows from the first 1500, every OOD row tested
    y_ood = _balanced(300)
    sp = P.make_split("ood", None, y, y_ood=y_ood)
    assert len(sp.train) == 1024 and sp.train.max() < 1500 and sp.test_is_ood and np.array_equal(sp.y_test, y_ood)


def test_impossible_settings_are_skipped_with_reasons():
    y = _balanced(728)  # the smallest dataset (95_toxic_is)
    with pytest.raises(P.SkipSetting, match="1024 > 728 rows - 100"):
        P.make_split("scarcity", 1024, y)
    with pytest.raises(P.SkipSetting, match="no OOD test file"):
        P.make_split("ood", None, y)
    with pytest.raises(P.SkipSetting, match="only 728 rows"):
        P.make_split("ood", None, y, y_ood=_balanced(10))
    skewed = np.r_[np.ones(600, int), np.zeros(128, int)]
    with pytest.raises(P.SkipSetting, match="positives"):
        P.make_split("normal", None, skewed)
    rows = list(P.iter_splits("d", y, None, ["scarcity", "ood"], {"scarcity": [2, 1024], "ood": [None]}, 42))
    assert [r[1] for r in rows] == [2, 1024, None]
    assert not isinstance(rows[0][2], str) and all(isinstance(r[2], str) for r in rows[1:])


def test_unknown_dataset_names_are_recorded_not_fatal():
    names, skipped = P.resolve_datasets(["5_hist_fig_ismale", "no_such_dataset", "5_hist_fig_ismale"])
    assert names == ["5_hist_fig_ismale"] and "no_such_dataset" in skipped["no_such_dataset"]
    assert len(P.resolve_datasets(None)[0]) == 113
    assert len(P.ood_dataset_names()) == 8


def test_balanced_row_cap():
    prompts, y = P.load_dataset("87_glue_cola", max_rows=400)
    assert len(y) == 400 and y.sum() == 200
    full_prompts, full_y = P.load_dataset("87_glue_cola")
    assert len(full_y) == 5000 and prompts[0] == full_prompts[0]


def _write_acts(d: Path, X: np.ndarray, y: np.ndarray) -> Path:
    from saeflow.store import ActivationStore

    store = ActivationStore.open_for_write(d, X.shape[1], 64, "float32", {})
    store.append(X, np.zeros(len(X)), np.zeros(len(X)), np.arange(len(X)), contexts_done=len(X))
    store.finish()
    np.save(d / "labels.npy", y)
    return d


def test_single_class_and_impossible_splits_are_recorded_skips(tmp_path):
    rng = np.random.default_rng(0)
    y = _balanced(1200)
    X = rng.standard_normal((1200, 6)).astype(np.float32)
    X[:, 0] += y
    acts = _write_acts(tmp_path / "acts", X, y)
    ood = _write_acts(tmp_path / "ood", X[:40], np.ones(40, int))  # an OOD test file with one class only
    spec = P.RunSpec("d", str(acts), str(ood), ("scarcity", "imbalance", "ood"),
                     {"scarcity": [2, 1150], "imbalance": [0.05], "ood": [None]}, methods=("logreg", "knn"))
    df = P.baseline_rows(spec).set_index(["regime", "setting", "method"])
    ood_rows = df.xs("ood", level="regime")
    assert (ood_rows["skipped"] == "single-class test split").all() and ood_rows["test_auc"].isna().all()
    assert df.xs(("scarcity", 1150.0), level=("regime", "setting"))["skipped"].str.contains("rows - 100").all()
    ran = df[df["skipped"].isna()]
    assert len(ran) == 4 and ran["test_auc"].between(0, 1).all()  # scarcity 2 and imbalance 0.05, both methods
    summary = P.regime_summary(P.add_quivers(df.reset_index(), [16], ["logreg", "knn"]), [], [16])
    assert list(summary["regime"]) == ["scarcity", "imbalance"]  # the all-skipped regime is absent, not NaN
    assert np.isfinite(summary[["baseline_quiver", "quiver_with_saes", "logreg", "knn"]].to_numpy(float)).all()


# --------------------------------------------------------------------------------- quiver
def _cand(method, val, test, sae=None, k=None):
    return {**{c: None for c in P.ROW_COLUMNS}, "dataset": "d", "regime": "normal", "setting": np.nan, "method": method,
            "val_auc": val, "test_auc": test, "sae": sae, "k": k, "n_train": 10, "n_test": 5}


def test_quiver_picks_best_validation_and_ties_go_to_sae():
    df = pd.DataFrame([_cand("logreg", 0.90, 0.80), _cand("knn", 0.85, 0.99), _cand(P.SAE_METHOD, 0.90, 0.70, "s", 16),
                       _cand(P.SAE_METHOD, 0.95, 0.60, "s", 128)])
    out = P.add_quivers(df, quiver_ks=[16], baselines=["logreg", "knn"])
    q = out.set_index("method")
    assert q.loc[P.QUIVER, "picked"] == "logreg" and q.loc[P.QUIVER, "test_auc"] == 0.80
    # k=128 (val 0.95) is not a quiver candidate; k=16 ties logreg at 0.90 and wins the tie
    assert q.loc[P.QUIVER_SAE, "picked"] == "sae:s:k16" and q.loc[P.QUIVER_SAE, "test_auc"] == 0.70
    df.loc[2, "val_auc"] = 0.89
    q = P.add_quivers(df, [16], ["logreg", "knn"]).set_index("method")
    assert q.loc[P.QUIVER_SAE, "picked"] == "logreg"
    s = P.regime_summary(P.add_quivers(df, [16], ["logreg", "knn"]), ["s"], [16])
    assert s.loc[0, "frac_sae_picked"] == 0.0 and s.loc[0, "s_k16"] == 0.70


# --------------------------------------------------------------------------------- SAE probes
def _planted_latents(n=600, width=256, signal=37, seed=0):
    rng = np.random.default_rng(seed)
    y = _balanced(n, seed)
    F = np.where(rng.random((n, width)) < 0.05, rng.exponential(1.0, (n, width)), 0.0).astype(np.float32)
    F[:, signal] = np.where(rng.random(n) < 0.9, y, 1 - y) * rng.uniform(1.0, 2.0, n)  # fires on (mostly) positives
    return F, y


def test_sae_probe_finds_the_planted_latent():
    F, y = _planted_latents()
    assert P.rank_latents(F, y)[0] == 37
    assert P.rank_latents(F, y, "none")[0] == 37
    sp = P.make_split("normal", None, y)
    res = dict(P.sae_probe(F[sp.train], sp.y_train, F[sp.test], sp.y_test, [1, 4, 512], penalty="l1"))
    assert res[1]["test_auc"] > 0.85 and res[4]["test_auc"] > 0.85
    assert res[512] == "k=512 exceeds the SAE width 256"


def test_sparse_encodings_give_the_dense_results(monkeypatch):
    """A wide SAE's encodings stay sparse (CSR, issue #27): the latent ranking (column blocks) and
    every probe equal the dense path's on the same values."""
    import scipy.sparse as sps
    import torch

    from saeflow.evals.common import encode_rows, encode_rows_csr
    from saeflow.saes import SAEConfig, build_sae

    F, y = _planted_latents()
    monkeypatch.setattr(P.probes, "RANK_COLUMN_BLOCK", 48)  # 6 column blocks over 256 latents
    Fs = sps.csr_matrix(F)
    np.testing.assert_array_equal(P.rank_latents(Fs, y), P.rank_latents(F, y))
    np.testing.assert_array_equal(P.rank_latents(Fs, y, "none"), P.rank_latents(F, y, "none"))
    sp = P.make_split("normal", None, y)
    for binarize in (False, True):
        dense = P.sae_probe(F[sp.train], sp.y_train, F[sp.test], sp.y_test, [1, 16], binarize=binarize)
        sparse = P.sae_probe(Fs[sp.train], sp.y_train, Fs[sp.test], sp.y_test, [1, 16], binarize=binarize)
        assert dense == sparse
    sae = build_sae(SAEConfig(architecture="topk", width=96, k=6), d_in=16, seed=0)
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr("saeflow.saes.base.ENCODE_BLOCK_ELEMENTS", 64 * 96)  # 64-row blocks
    np.testing.assert_array_equal(encode_rows_csr(sae, x, 100).toarray(), encode_rows(sae, x, 100).numpy())


def test_agreement_with_reference_functions(ref_train):
    """Same arrays into both: logistic regression and the SAE top-k probe give the same test AUC."""
    rng = np.random.default_rng(1)
    y = _balanced(700)
    X = rng.standard_normal((700, 24)).astype(np.float32)
    X[:, 3] += 0.8 * y
    sp = P.make_split("normal", None, y)
    theirs = ref_train.find_best_reg(X[sp.train], sp.y_train, X[sp.test], sp.y_test, penalty="l2", seed=42).metrics
    ours = P.fit_logreg(X[sp.train], sp.y_train, X[sp.test], sp.y_test, "l2", 42)
    assert abs(theirs.test_auc - ours["test_auc"]) < 1e-9 and abs(theirs.val_auc - ours["val_auc"]) < 1e-9
    # scarcity sizes use the other two validation schemes (leave-2-out, stratified 6-fold)
    for n in (6, 30):
        sp = P.make_split("scarcity", n, y)
        t = ref_train.find_best_reg(X[sp.train], sp.y_train, X[sp.test], sp.y_test, penalty="l2", seed=42).metrics
        o = P.fit_logreg(X[sp.train], sp.y_train, X[sp.test], sp.y_test, "l2", 42)
        assert abs(t.test_auc - o["test_auc"]) < 1e-9 and abs(t.val_auc - o["val_auc"]) < 1e-9
    # the SAE probe: the package ranks with its own code (run_sae_evals.get_sorted_indices with
    # mean_act_normalization, re-stated here from that module to avoid importing sae_lens) and fits find_best_reg
    import torch

    F, yf = _planted_latents(n=400, width=64, seed=3)
    sp = P.make_split("normal", None, yf)
    Ft = torch.from_numpy(F[sp.train])
    scale = Ft.abs().sum(0) / ((Ft != 0).sum(0) + 1e-6)
    Fn = Ft / (scale + 1e-6)
    order = torch.argsort(torch.abs(Fn[torch.from_numpy(sp.y_train) == 1].mean(0) - Fn[torch.from_numpy(sp.y_train) == 0].mean(0)),
                          descending=True).numpy()
    assert np.array_equal(order[:8], P.rank_latents(F[sp.train], sp.y_train)[:8])
    ours = dict(P.sae_probe(F[sp.train], sp.y_train, F[sp.test], sp.y_test, [2, 8], penalty="l1"))
    for k in (2, 8):
        t = ref_train.find_best_reg(F[sp.train][:, order[:k]], sp.y_train, F[sp.test][:, order[:k]], sp.y_test,
                                    penalty="l1", seed=42).metrics
        assert abs(t.test_auc - ours[k]["test_auc"]) < 0.01


def test_other_baselines_match_reference(ref_train):
    rng = np.random.default_rng(2)
    y = _balanced(300)
    X = rng.standard_normal((300, 12)).astype(np.float32)
    X[:, 0] += y
    sp = P.make_split("scarcity", 74, y)
    for method, fn in (("pca", ref_train.find_best_pcareg), ("knn", ref_train.find_best_knn), ("mlp", ref_train.find_best_mlp)):
        kw = {"n_jobs": 1} if method == "knn" else {}
        t = fn(X[sp.train], sp.y_train, X[sp.test], sp.y_test, seed=42, **kw).metrics
        o = P.fit_baseline(method, X[sp.train], sp.y_train, X[sp.test], sp.y_test, 42)
        assert abs(t.test_auc - o["test_auc"]) < 1e-6, method


# --------------------------------------------------------------------------------- convergence
def test_solver_convergence_is_recorded(monkeypatch, tmp_path):
    """A logistic regression held to one iteration has not converged (recorded, not shown as a
    warning); at the reference's max_iter the same fits converge; KNN has no solver."""
    import warnings

    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(4)
    y = _balanced(300)
    X = rng.standard_normal((300, 8)).astype(np.float32)
    X[:, 0] += y
    sp = P.make_split("scarcity", 74, y)
    args = (X[sp.train], sp.y_train, X[sp.test], sp.y_test)
    log = P.FitLog()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the ConvergenceWarning is caught by FitLog, not raised
        log.fit(LogisticRegression(max_iter=1), X[sp.train], sp.y_train)
    assert log.columns() == {"converged": False, "n_iter": 1, "n_fits": 1, "n_fits_not_converged": 1}
    ok = P.fit_logreg(*args)
    assert ok["converged"] is True and ok["n_fits"] == 10 * 6 + 1 and 1 <= ok["n_iter"] < P.MAX_ITER
    assert P.fit_baseline("knn", *args).get("converged") is None
    monkeypatch.setattr(P.probes, "MAX_ITER", 1)
    for method in ("logreg", "pca", "mlp"):
        m = P.fit_baseline(method, *args)
        assert m["converged"] is False and m["n_iter"] == 1 and m["n_fits_not_converged"] == m["n_fits"] > 1, method
        assert m["test_auc"] == m["test_auc"]  # still reported (NaN only when skipped)
    # the rows, the per-SAE summary and the convergence table carry it
    acts = _write_acts(tmp_path / "acts", X, y)
    spec = P.RunSpec("d", str(acts), None, ("scarcity",), {"scarcity": [74]}, methods=("logreg", "knn"))
    df = P.results_table([P.baseline_rows(spec)], {}, [16], ["logreg", "knn"])
    row = df.set_index("method")
    assert row.loc["logreg", "converged"] == False and pd.isna(row.loc["knn", "converged"])  # noqa: E712
    assert pd.isna(row.loc[P.QUIVER, "converged"]) and df["converged"].dtype == "boolean"
    table = P.convergence_table(df)
    assert table.to_dict("records") == [{"method": "logreg", "sae": None, "results": 1, "results_not_converged": 1,
                                         "fits": 61, "fits_not_converged": 61, "max_n_iter": 1}]
    assert P.not_converged_note(df).startswith("61 of 61 solver fits did not converge")
    sae_rows = df.assign(method=P.SAE_METHOD, sae="s", k=16)
    assert P.sae_summary(sae_rows)["probing_n_fits_not_converged"] == 61.0
    monkeypatch.setattr(P.probes, "MAX_ITER", 1000)
    assert P.not_converged_note(P.results_table([P.baseline_rows(spec)], {}, [16], ["logreg", "knn"])) is None


# --------------------------------------------------------------------------------- end to end
def test_probing_pipeline_on_tiny_model(tmp_path):
    import flows.pipeline as fp
    from tests.helpers import tiny_config

    probing = {"datasets": ["5_hist_fig_ismale", "87_glue_cola", "not_a_dataset"], "max_rows": 240,
               "regimes": ["normal", "scarcity", "imbalance", "noise", "ood"], "scarcity_sizes": [1024],
               "imbalance_fracs": [0.2], "noise_fracs": [0.1], "methods": ["logreg", "knn"],
               "ks_normal": [1, 16], "ks_other": [16], "quiver_ks": [16], "n_jobs": 1}
    cfg = tiny_config(probing=probing, family={"architectures": ["topk"], "widths": [64, 128], "ks": [8]})
    out = fp.pipeline(cfg, str(tmp_path))
    res = Path(out.refs.results.path)
    df = pd.read_parquet(res / "probing" / "probing_results.parquet")
    assert {"quiver", "quiver_sae", "logreg", "knn", "sae"} <= set(df["method"].dropna())
    assert df.loc[df["dataset"] == "not_a_dataset", "skipped"].str.contains("unknown dataset").all()
    assert df.loc[(df["regime"] == "scarcity") & (df["setting"] == 1024), "skipped"].str.contains("rows - 100").all()
    assert df.loc[df["regime"] == "ood", "skipped"].str.contains("only 240 rows").all()  # 1024 OOD train rows
    assert df.loc[df["skipped"].isna(), "test_auc"].between(0, 1).all()
    summary = pd.read_parquet(res / "probing" / "probing_summary.parquet")
    assert set(summary["regime"]) == {"normal", "imbalance", "noise"}  # scarcity 1024 and OOD (needs 1024) skip
    assert np.isfinite(summary[["baseline_quiver", "quiver_with_saes", "logreg"]].to_numpy(float)).all()
    for f in ("auc_vs_imbalance.png", "auc_vs_noise.png", "probing_quiver_picks.md"):
        assert (res / "probing" / f).is_file()
    table = pd.read_parquet(res / "core_metrics.parquet")
    assert table["probing_normal_k16_auc"].between(0, 1).all() and "probing_normal_auc" in table
    assert len(out.refs.evals["probing"].per_sae) == 2
    # the convergence of every solver fit: per row, per SAE (core table) and per (method, SAE)
    ran = df[df["skipped"].isna()]
    fitted = ran["method"].isin(["logreg", "sae"])
    assert ran.loc[fitted, "n_fits"].gt(0).all() and ran.loc[fitted, "converged"].notna().all()
    assert ran.loc[~fitted, ["converged", "n_fits"]].isna().all().all()  # knn and the quivers: no solver
    conv = pd.read_parquet(res / "probing" / "probing_convergence.parquet")
    assert set(conv["method"]) == {"logreg", "sae"}
    for name, n in zip(table["sae"], table["probing_n_fits_not_converged"]):
        assert n == ran.loc[ran["sae"] == name, "n_fits_not_converged"].sum()
        assert n == conv.loc[conv["sae"] == name, "fits_not_converged"].sum()
    again = fp.pipeline(cfg, str(tmp_path))
    assert again.cached["probing"] is True
