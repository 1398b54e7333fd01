"""saeflow.sae_init and its use in training: data-dependent b_dec, dead-latent resampling, fraction schedules.

The headline test (``test_zero_b_dec_init_collapses_on_offset_data`` / ``test_geometric_median_init_
recovers_offset_dictionary``) reproduces the failure the new init exists for: a planted dictionary
plus a large shared offset (as on a real residual stream) leaves all but k latents dead with
``b_dec = 0`` and is recovered almost perfectly with the geometric-median ``b_dec``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from saeflow import checkpoint, training
from saeflow.artifacts import artifact_ref, mark_complete
from saeflow.config import TrainConfig
from saeflow.saes import SAE_WEIGHTS_FILENAME, SAEConfig, build_sae, load_sae
from saeflow.sae_init import (
    MIN_INIT_ROWS,
    InitDataError,
    b_dec_from_sample,
    b_enc_for_target_l0,
    geometric_median,
    resample_dead_latents,
    sample_rows,
)
from saeflow.store import ActivationStore
from saeflow.training import CHECKPOINT_DIR, DONE_FILE, TRAINING_LOG, lr_at_step, train_sae, train_saes
from tests.test_training import CPU, InMemoryLoader, planted_data

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def _objective(x: torch.Tensor, m: torch.Tensor) -> float:
    """Sum of Euclidean distances from the rows of ``x`` to ``m`` (what the geometric median minimises)."""
    return float((x.double() - m.double()).norm(dim=1).sum())


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True)


# =============================================================================================
# 1. planted dictionary + a large shared offset: zeros init collapses, geometric median recovers
# =============================================================================================
@pytest.fixture(scope="module")
def offset_data() -> dict[str, torch.Tensor]:
    """60k rows: positive combinations of 3 of 64 unit features in R^32 (as test_recovers_planted_dictionary)
    PLUS one constant offset of norm 10x the mean row norm of the planted part. 50k train, 10k held out."""
    clean, dictionary = planted_data(60_000, 32, 64, 3, seed=0)
    g = torch.Generator().manual_seed(1000)
    offset = torch.randn(32, generator=g)
    offset = offset / offset.norm() * 10 * clean.norm(dim=1).mean()
    data = clean + offset
    return {"train": data[:50_000], "held": data[50_000:], "dictionary": dictionary, "offset": offset}


def _train_planted(out: Path, data: dict[str, torch.Tensor], b_dec_init: str, **sae_kw: Any) -> dict[str, Any]:
    # same SAE / training settings as tests/test_training.py::test_recovers_planted_dictionary
    # (390 steps, lr 1e-2, dead window 50 so the TopK aux loss is live); the other new options are off
    sae_cfg = SAEConfig(width=128, k=3, dead_feature_window=50, b_dec_init=b_dec_init, **sae_kw)
    train_cfg = TrainConfig(training_tokens=100_000, batch_size=256, lr=1e-2, seed=0, checkpoint_every=10**6, log_every=50)
    return train_sae(sae_cfg, train_cfg, InMemoryLoader(data["train"], 256, seed=0), 32, out, CPU)


@torch.no_grad()
def _quality(out: Path, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    sae = load_sae(out)
    held = data["held"]
    alive = int(((sae.encode(held) > 0).sum(dim=0) > 0).sum())  # latents firing on some held-out row
    best = (data["dictionary"] @ _unit(sae.W_dec).T).max(dim=1).values  # per true feature: best decoder row
    fvu = float((sae(held) - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
    return {"alive": alive, "best": best, "fvu": fvu, "b_dec": sae.b_dec.detach().clone()}


# Measured (this exact setup, data seed 0; and for data/training seeds 1, 2, 3 in a side study):
#                      alive latents (of 128)   mean max-cos   min max-cos   features >= 0.9   held-out FVU
#   zeros              3  (3, 3, 3)             0.485 (0.47-0.48) 0.32       0 / 64            0.85
#   geometric_median   64 (64, 67, 64)          0.998 (0.995-0.998) 0.996    64 / 64           0.057
# Without the offset zeros init recovers the dictionary as well (mean 0.9975, 64 alive): the collapse is the
# offset's doing. With the default dead_feature_window=1000 (aux loss never live) zeros also collapses (3 alive,
# mean 0.43). Exactly k=3 latents survive with zeros: the offset dominates every pre-activation, so the same
# k latents win the top-k for every row at step 0 and the others never get a gradient.
def test_zero_b_dec_init_collapses_on_offset_data(tmp_path, offset_data):
    summary = _train_planted(tmp_path, offset_data, "zeros")
    assert summary["b_dec_init"] is None
    q = _quality(tmp_path, offset_data)
    assert q["alive"] <= 16, f"{q['alive']} latents alive: the zero init did not collapse"
    assert q["best"].mean() < 0.7, f"mean max cosine {q['best'].mean():.4f}"
    assert (q["best"] >= 0.9).float().mean() < 0.2
    assert q["fvu"] > 0.5
    assert summary["n_dead"] >= 100  # the trainer's own count agrees (measured 125)


def test_geometric_median_init_recovers_offset_dictionary(tmp_path, offset_data):
    summary = _train_planted(tmp_path, offset_data, "geometric_median")
    # default: computed from the first loader batches (no init_sample), min(init_sample_rows, drawn rows)
    assert summary["b_dec_init"]["method"] == "geometric_median" and summary["b_dec_init"]["source"] == "loader"
    assert summary["b_dec_init"]["rows"] == 16_384  # train.init_sample_rows: 64 batches of 256 drawn first
    q = _quality(tmp_path, offset_data)
    assert q["best"].mean() >= 0.95, f"mean max cosine {q['best'].mean():.4f}"
    assert (q["best"] >= 0.9).float().mean() >= 0.9, f"only {(q['best'] >= 0.9).float().mean():.3f} of features found"
    assert q["alive"] >= 58, f"only {q['alive']} latents alive; every one of the 64 features needs one"
    assert q["fvu"] < 0.15
    # the learned b_dec (raw units, normalisation folded back) sits near the offset, not at 0
    assert float((q["b_dec"] - offset_data["offset"]).norm()) < 0.2 * float(offset_data["offset"].norm())


# =============================================================================================
# 2. geometric_median
# =============================================================================================
def test_geometric_median_minimises_sum_of_distances():
    from scipy.optimize import minimize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0]) + 4.0
    x[:30] += torch.randn(30, 5, generator=g) * 20  # skewed: the mean is not the median
    m = geometric_median(x)
    assert m.dtype == torch.float32 and m.shape == (5,)
    f_m = _objective(x, m)
    xd = x.double().numpy()
    res = minimize(lambda v: np.linalg.norm(xd - v, axis=1).sum(), xd.mean(0), method="Nelder-Mead",
                   options={"xatol": 1e-9, "fatol": 1e-9, "maxiter": 20_000, "maxfev": 20_000})
    assert f_m <= res.fun * (1 + 1e-6), (f_m, res.fun)
    assert np.linalg.norm(m.double().numpy() - res.x) < 1e-2 * np.linalg.norm(res.x)
    assert f_m < _objective(x, x.mean(0)) * (1 - 1e-3)  # strictly better than the mean here
    for _ in range(20):  # a local minimum: no small random step improves it (float32 rounding aside)
        step = torch.randn(5, generator=g) * 1e-2
        assert f_m <= _objective(x, m + step) * (1 + 1e-7)
    assert torch.equal(geometric_median(x), m)  # deterministic


def test_geometric_median_is_robust_to_outliers():
    g = torch.Generator().manual_seed(1)
    inliers = torch.randn(200, 8, generator=g)
    x = torch.cat([inliers, torch.full((5, 8), 1e4)])  # 2.4% huge outliers
    shift_mean = float((x.mean(0) - inliers.mean(0)).norm())
    shift_median = float((geometric_median(x) - geometric_median(inliers)).norm())
    assert shift_mean > 500  # measured ~690
    assert shift_median < 0.2, shift_median  # measured ~0.07


@pytest.mark.parametrize("n", [11, 101, 1001])
def test_geometric_median_1d_is_the_median(n):
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(n)) * 3 + 1
    # measured |difference| <= 1.3e-6 for odd n (Weiszfeld with tol 1e-5); spacing near the median >= ~0.008
    assert float(geometric_median(x)[0]) == pytest.approx(float(x.median()), abs=1e-4)


def test_geometric_median_rejects_empty_or_1d_input():
    with pytest.raises(InitDataError, match="non-empty"):
        geometric_median(torch.zeros(0, 4))
    with pytest.raises(InitDataError, match="non-empty"):
        geometric_median(torch.zeros(10))


# =============================================================================================
# 3. b_dec_from_sample
# =============================================================================================
def _sample(n: int = 512, d: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2 + 5


def test_b_dec_from_sample_methods():
    x = _sample()
    mean = b_dec_from_sample(x, "mean")
    assert mean is not None and mean.dtype == torch.float32
    torch.testing.assert_close(mean, x.mean(0), rtol=0, atol=1e-5)
    gm = b_dec_from_sample(x, "geometric_median")
    assert gm is not None and torch.equal(gm, geometric_median(x))
    assert not torch.allclose(gm, mean, atol=1e-4)  # the two methods are not the same estimate
    assert b_dec_from_sample(x, "zeros") is None
    # zeros never reads the data: it works on samples the data-dependent methods refuse
    assert b_dec_from_sample(torch.full((3, 6), float("nan")), "zeros") is None
    assert b_dec_from_sample(x[:MIN_INIT_ROWS], "mean") is not None  # exactly the minimum is enough
    with pytest.raises(ValueError, match="unknown b_dec_init"):
        b_dec_from_sample(x, "median")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["mean", "geometric_median"])
def test_b_dec_from_sample_refuses_bad_samples(method):
    x = _sample()
    too_few = rf"only {MIN_INIT_ROWS - 1} activation rows.*need >= {MIN_INIT_ROWS}.*b_dec_init: zeros"
    with pytest.raises(InitDataError, match=too_few):
        b_dec_from_sample(x[: MIN_INIT_ROWS - 1], method)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[17, 3] = bad
        with pytest.raises(InitDataError, match="NaN/inf.*re-extract"):
            b_dec_from_sample(y, method)
    const = torch.full((400, 6), 3.25)
    with pytest.raises(InitDataError, match=r"constant activations.*re-extract"):
        b_dec_from_sample(const, method)
    with pytest.raises(InitDataError, match=r"expected a \[rows, d_in\] sample"):
        b_dec_from_sample(x[0], method)
    assert issubclass(InitDataError, ValueError)


# =============================================================================================
# 4. sample_rows, and refusing a too-small store before any result is written
# =============================================================================================
def _make_store(root: Path, n: int, train_rows: int, d: int = 8, chunk: int = 64) -> np.ndarray:
    """A finished store whose row i has column 0 == i (rows identifiable), the rest random."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(n, d)).astype(np.float32)
    data[:, 0] = np.arange(n)
    attrs = {"hook": "blocks.0.hook_resid_post", "model": "planted"}
    store = ActivationStore.open_for_write(root, d, chunk, "float32", attrs)
    for s in range(0, n, 100):
        e = min(n, s + 100)
        store.append(data[s:e], np.arange(s, e), np.arange(s, e) % 7, np.arange(s, e) // 10, contexts_done=e // 10)
    store.finish(train_rows=train_rows)
    return data


def test_sample_rows_seeded_whole_training_chunks(tmp_path):
    data = _make_store(tmp_path, n=1000, train_rows=800, chunk=64)
    store = ActivationStore.open(tmp_path)
    a = sample_rows(store, 300, seed=3)
    assert a.dtype == torch.float32 and a.shape == (300, 8)
    assert torch.equal(a, sample_rows(store, 300, seed=3))  # deterministic for a seed
    b = sample_rows(store, 300, seed=4)
    assert not torch.equal(a, b)
    for s in (a, b):
        ids = s[:, 0].long()
        assert int(ids.max()) < 800  # never a held-out row
        assert torch.equal(s, torch.from_numpy(data[ids.numpy()]))  # the stored rows, unchanged
        assert len(set(ids.tolist())) == 300  # no row twice
        # whole chunks (the last one cut to n): every run of consecutive row ids starts at a chunk start
        starts = [int(ids[i]) for i in range(300) if i == 0 or int(ids[i]) != int(ids[i - 1]) + 1]
        assert all(st % 64 == 0 for st in starts), starts
    # spread over the store: the chunks drawn are not simply the first ones
    assert set((a[:, 0].long() // 64).tolist()) != set(range(5))
    # more than there is: every training row exactly once (the last, partial chunk 768..799 included)
    everything = sample_rows(store, 10_000, seed=3)
    assert sorted(everything[:, 0].long().tolist()) == list(range(800))


def test_sample_rows_refuses_a_small_store(tmp_path):
    _make_store(tmp_path, n=400, train_rows=MIN_INIT_ROWS - 1)
    with pytest.raises(InitDataError, match=rf"has {MIN_INIT_ROWS - 1} training rows.*b_dec_init: zeros"):
        sample_rows(ActivationStore.open(tmp_path), 1000, seed=0)


def _small_acts_artifact(root: Path, n: int, train_rows: int):
    acts = artifact_ref(root, "activations", "fp-small")
    _make_store(acts.dir, n=n, train_rows=train_rows, d=8, chunk=64)
    mark_complete(acts)
    return acts


def test_train_members_refuses_a_too_small_store_before_writing(tmp_path):
    from tasks.train import family_refs, train_members

    acts = _small_acts_artifact(tmp_path, n=300, train_rows=200)
    members = [SAEConfig(width=16, k=2), SAEConfig(width=32, k=2, b_dec_init="mean")]
    train_cfg = TrainConfig(training_tokens=64 * 4, batch_size=64, checkpoint_every=10**6, log_every=2)
    with pytest.raises(InitDataError, match="has 200 training rows.*b_dec_init: zeros"):
        train_members(acts, members, train_cfg, str(tmp_path))
    train_dir = tmp_path / "train"
    assert not list(train_dir.rglob(SAE_WEIGHTS_FILENAME)) and not list(train_dir.rglob(DONE_FILE))
    assert not any(r.is_complete() for r in family_refs(acts, members, train_cfg, str(tmp_path)))
    # the same store trains with the old init (nothing to estimate): the refusal is the init's alone
    zeros = [m.model_copy(update={"b_dec_init": "zeros"}) for m in members]
    refs = train_members(acts, zeros, train_cfg, str(tmp_path))
    assert all(r.is_complete() and (r.dir / SAE_WEIGHTS_FILENAME).is_file() for r in refs)


@pytest.mark.parametrize("bad", ["constant", "tiny"])
def test_train_saes_refuses_a_bad_init_sample_before_training(tmp_path, bad):
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0))
    sample = torch.full((1000, 16), 0.5) if bad == "constant" else x[:20]
    cfgs = [SAEConfig(width=32, k=4, b_dec_init="geometric_median"), SAEConfig(width=32, k=2, b_dec_init="zeros")]
    members = [(c, tmp_path / f"m{i}", None) for i, c in enumerate(cfgs)]
    train_cfg = TrainConfig(training_tokens=64 * 10, batch_size=64, checkpoint_every=2, log_every=2)
    with pytest.raises(InitDataError, match="constant activations" if bad == "constant" else "only 20 activation rows"):
        train_saes(members, train_cfg, InMemoryLoader(x, 64), 16, CPU, scaling_factor=1.0, init_sample=sample)
    for _, out, _ in members:  # refused before step 0: no weights, no summary, no checkpoint
        assert not (out / SAE_WEIGHTS_FILENAME).exists() and not (out / DONE_FILE).exists()
        assert not (out / CHECKPOINT_DIR).exists()


def test_train_saes_uses_the_init_sample_in_raw_units(tmp_path):
    """b_dec = geometric_median(init_sample) scaled into the normalised space, folded back at the end: after
    one step at a negligible lr the saved (raw-unit) b_dec is that median."""
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0)) + 3.0
    sample = x[:1000] * 1.5 + 2.0  # deliberately not the training data: the b_dec must come from the sample
    cfg = SAEConfig(width=32, k=4, b_dec_init="geometric_median")
    train_cfg = TrainConfig(training_tokens=64, batch_size=64, lr=1e-12, checkpoint_every=10**6, log_every=1)
    [summary] = train_saes([(cfg, tmp_path, None)], train_cfg, InMemoryLoader(x, 64), 16, CPU,
                           scaling_factor=0.37, init_sample=sample)
    gm = geometric_median(sample)
    assert summary["b_dec_init"] == {"method": "geometric_median", "rows": 1000,
                                     "norm": pytest.approx(float(gm.double().norm())), "source": "sample"}
    torch.testing.assert_close(load_file(str(tmp_path / SAE_WEIGHTS_FILENAME))["b_dec"], gm, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,kw", [("jumprelu", {"jumprelu_sparsity_loss_mode": "quadratic"}), ("relu", {})])
def test_b_enc_for_target_l0_makes_every_latent_fire_equally_often(arch, kw):
    """Every latent fires on round(n * target / width) sample rows, so the L0 on the sample is the target
    (JumpReLU thresholds included), whatever the data's offset; rows it was not fitted on land near it."""
    x = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0)) * 2 + 5.0  # a shared offset
    sae = build_sae(SAEConfig(architecture=arch, width=64, target_l0=8, b_enc_init="target_l0", **kw), 16, seed=1)
    with torch.no_grad():
        sae.b_dec.copy_(torch.full((16,), 1.0))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(64, generator=torch.Generator().manual_seed(2)))
        sae.b_enc.copy_(b_enc_for_target_l0(sae, x[:2000], 8, block_elements=2000 * 7))  # 7-column blocks
        fired = sae.encode(x[:2000]) > 0
        held_out = (sae.encode(x[2000:]) > 0).float().sum(-1).mean()
    assert (fired.sum(0) == 250).all()  # 2000 * 8 / 64 rows per latent
    assert fired.float().sum(-1).mean() == pytest.approx(8.0)
    assert abs(float(held_out) / 8 - 1) < 0.15
    # without a target it has no effect (a family base may set it for every member): fingerprint unchanged
    assert not SAEConfig(architecture=arch, b_enc_init="target_l0").b_enc_from_sample
    assert SAEConfig(architecture=arch, b_enc_init="target_l0").fingerprint_payload() == \
        SAEConfig(architecture=arch).fingerprint_payload()


def test_train_saes_sets_b_enc_for_the_target_l0(tmp_path):
    """In training, b_enc is set after b_dec on the normalised sample: the first step's L0 is the target."""
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0)) + 3.0
    cfg = SAEConfig(architecture="jumprelu", width=32, target_l0=4, jumprelu_sparsity_loss_mode="quadratic",
                    b_enc_init="target_l0")
    train_cfg = TrainConfig(training_tokens=64, batch_size=64, lr=1e-12, checkpoint_every=10**6, log_every=1)
    [summary] = train_saes([(cfg, tmp_path, None)], train_cfg, InMemoryLoader(x, 64), 16, CPU,
                           scaling_factor=0.37, init_sample=x[:1000])
    assert summary["b_dec_init"]["b_enc"] == {"method": "target_l0", "target_l0": 4.0, "rows": 1000}
    assert summary["final"]["l0"] == pytest.approx(4.0, rel=0.3)
    untouched = SAEConfig(architecture="jumprelu", width=32, target_l0=4, jumprelu_sparsity_loss_mode="quadratic")
    [plain] = train_saes([(untouched, tmp_path / "plain", None)], train_cfg, InMemoryLoader(x, 64), 16, CPU,
                         scaling_factor=0.37, init_sample=x[:1000])
    assert "b_enc" not in plain["b_dec_init"] and plain["final"]["l0"] > 8


# =============================================================================================
# 5. resample_dead_latents
# =============================================================================================
D5 = 16


def _sae_with_adam_state(seed: int = 0, width: int = 32) -> tuple[Any, torch.optim.Optimizer, torch.Tensor]:
    sae = build_sae(SAEConfig(width=width, k=4), D5, seed=seed)
    with torch.no_grad():
        sae.b_dec.copy_(torch.linspace(-0.5, 0.5, D5))
        sae.b_enc.copy_(torch.linspace(0.1, 0.2, width))
    opt = training._make_adam(sae, 1e-3)
    x = torch.randn(128, D5, generator=torch.Generator().manual_seed(10 + seed))
    out = sae.training_forward(x, None, return_feature_acts=False)
    out["loss"].backward()
    opt.step()
    for p in sae.parameters():  # make every moment nonzero so "zeroed" is a real change
        st = opt.state[p]
        st["exp_avg"].add_(0.01)
        st["exp_avg_sq"].add_(0.01)
    return sae, opt, x


def _snapshot(sae, opt) -> dict[str, torch.Tensor]:
    snap = {n: p.detach().clone() for n, p in sae.named_parameters()}
    for n, p in sae.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            snap[f"{n}.{key}"] = opt.state[p][key].clone()
    return snap


def test_resample_dead_latents_reinitialises_only_the_dead():
    sae, opt, x = _sae_with_adam_state()
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 5, 6, 20, 31]] = True
    alive = ~dead
    before = _snapshot(sae, opt)
    dec_n = float(before["W_dec"][alive].norm(dim=-1).mean())
    enc_n = float(before["W_enc"][:, alive].norm(dim=0).mean())
    n = resample_dead_latents(sae, dead, x, opt, torch.Generator().manual_seed(0), encoder_scale=0.2)
    assert n == 5
    W_dec, W_enc, b_enc = sae.W_dec.detach(), sae.W_enc.detach(), sae.b_enc.detach()
    # dead latents: decoder row = unit direction * mean alive decoder norm, encoder column parallel to it
    # with 0.2 * mean alive encoder norm, bias 0
    assert not torch.allclose(W_dec[dead], before["W_dec"][dead])
    torch.testing.assert_close(W_dec[dead].norm(dim=-1), torch.full((5,), dec_n), rtol=1e-5, atol=0)
    torch.testing.assert_close(W_enc[:, dead].norm(dim=0), torch.full((5,), 0.2 * enc_n), rtol=1e-5, atol=0)
    cos = (_unit(W_dec[dead]) * _unit(W_enc[:, dead].T)).sum(-1)
    torch.testing.assert_close(cos, torch.ones(5), rtol=0, atol=1e-5)
    assert torch.equal(b_enc[dead], torch.zeros(5))
    # each new direction is the centred direction (x - b_dec) of some row of the batch
    centred = _unit(x - before["b_dec"])
    assert ((_unit(W_dec[dead]) @ centred.T).max(dim=1).values > 1 - 1e-5).all()
    # alive latents and b_dec untouched, bit for bit
    assert torch.equal(W_dec[alive], before["W_dec"][alive])
    assert torch.equal(W_enc[:, alive], before["W_enc"][:, alive])
    assert torch.equal(b_enc[alive], before["b_enc"][alive])
    assert torch.equal(sae.b_dec.detach(), before["b_dec"])
    # Adam moments: zero on the touched entries, unchanged elsewhere (b_dec: everywhere)
    for key in ("exp_avg", "exp_avg_sq"):
        s_dec, s_enc, s_benc = (opt.state[p][key] for p in (sae.W_dec, sae.W_enc, sae.b_enc))
        assert (s_dec[dead] == 0).all() and (s_enc[:, dead] == 0).all() and (s_benc[dead] == 0).all()
        assert torch.equal(s_dec[alive], before[f"W_dec.{key}"][alive])
        assert torch.equal(s_enc[:, alive], before[f"W_enc.{key}"][:, alive])
        assert torch.equal(s_benc[alive], before[f"b_enc.{key}"][alive])
        assert torch.equal(opt.state[sae.b_dec][key], before[f"b_dec.{key}"])
        assert (before[f"W_dec.{key}"][dead] != 0).all()  # so the zeros above are the resampler's doing


def test_resample_dead_latents_is_seeded_and_no_op_without_dead():
    results = []
    for gen_seed in (7, 7, 8):
        sae, opt, x = _sae_with_adam_state()
        dead = torch.zeros(32, dtype=torch.bool)
        dead[::3] = True
        resample_dead_latents(sae, dead, x, opt, torch.Generator().manual_seed(gen_seed))
        results.append(sae.W_dec.detach().clone())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])
    sae, opt, x = _sae_with_adam_state()
    before = _snapshot(sae, opt)
    assert resample_dead_latents(sae, torch.zeros(32, dtype=torch.bool), x, opt, torch.Generator().manual_seed(0)) == 0
    after = _snapshot(sae, opt)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resample_targets_badly_reconstructed_rows():
    sae, opt, _ = _sae_with_adam_state()
    g = torch.Generator().manual_seed(3)
    b_dec = sae.b_dec.detach()
    # 128 rows reconstructed badly (norm ~10 along u, far from anything the SAE makes) and 128 rows at b_dec
    # (tiny error): 16 dead latents drawn without replacement must all come from the bad rows
    u = _unit(torch.randn(D5, generator=g))
    bad = b_dec + 10 * u + 0.3 * torch.randn(128, D5, generator=g)
    good = b_dec + 0.01 * torch.randn(128, D5, generator=g)
    x = torch.cat([good, bad])
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:16] = True
    assert resample_dead_latents(sae, dead, x, opt, torch.Generator().manual_seed(0)) == 16
    dirs = _unit(sae.W_dec.detach()[dead])
    assert (dirs @ u > 0.9).all(), dirs @ u
    assert len({tuple(r.tolist()) for r in dirs}) == 16  # distinct rows (no replacement)
    # more dead latents than rows (sampling with replacement): one row with a huge error among 4 gets most
    sae, opt, _ = _sae_with_adam_state()
    y = b_dec + 0.01 * torch.randn(4, D5, generator=g)
    y[2] = b_dec - 30 * u
    dead = torch.ones(32, dtype=torch.bool)
    dead[-4:] = False
    assert resample_dead_latents(sae, dead, y, opt, torch.Generator().manual_seed(0)) == 28
    aligned = (_unit(sae.W_dec.detach()[dead]) @ -u > 0.99).sum()
    assert aligned >= 26, f"only {aligned} of 28 resampled directions point at the high-error row"


def test_training_resamples_dead_latents(tmp_path, offset_data):
    """Zero init on the offset data: 125 of 128 latents die; resampling at half the run re-initialises them."""
    sae_cfg = SAEConfig(width=128, k=3, b_dec_init="zeros", dead_window_fraction=0.05, resample_dead_at=(0.5,))
    train_cfg = TrainConfig(training_tokens=256 * 100, batch_size=256, lr=1e-2, seed=0, checkpoint_every=10**6, log_every=10)
    summary = train_sae(sae_cfg, train_cfg, InMemoryLoader(offset_data["train"], 256, seed=0), 32, tmp_path, CPU)
    assert summary["dead_window_steps"] == 5 and summary["n_resampled"] > 100  # measured 125
    logs = json.loads((tmp_path / TRAINING_LOG).read_text())
    assert [e["resampled"] for e in logs if e["step"] < 50] == [0] * 4
    assert all(e["resampled"] == summary["n_resampled"] for e in logs if e["step"] >= 50)
    at = next(e for e in logs if e["step"] == 50)
    assert logs[3]["frac_dead"] > 0.9 and at["frac_dead"] == 0.0  # dead counters reset by the resample
    # (measured: with b_dec = 0 the resampled latents point along the offset-dominated inputs and die again,
    # frac_dead back to 0.977 by step 60; resampling is no substitute for the b_dec init)


# =============================================================================================
# 6. resume stays bit-identical with the data-dependent init and resampling
# =============================================================================================
D6 = 16
DATA6, _ = planted_data(3000, D6, 32, 3, seed=1)
SAE6 = SAEConfig(width=64, k=4, b_dec_init="geometric_median", dead_window_fraction=0.1, resample_dead_at=(0.5,),
                 decoder_init_norm=0.1)  # SAELens' norm: some latents die in 20 steps, so the resample acts
# 41 steps, checkpoints every 7 (7, 14, 21, ...), resample after step round(0.5 * 41) = 20, dead window 4
TRAIN6 = TrainConfig(training_tokens=64 * 41 + 10, batch_size=64, lr=3e-3, lr_warm_up_steps=4, lr_decay_steps=8,
                     seed=5, checkpoint_every=7, log_every=5, init_sample_rows=1024)


def _run6(out: Path, **kw: Any) -> dict[str, Any]:
    return train_sae(SAE6, TRAIN6, InMemoryLoader(DATA6, 64, seed=2), D6, out, CPU, **kw)


@pytest.fixture(scope="module")
def reference6(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted6")
    summary = _run6(out)
    assert summary["completed"] and summary["resumed_from_step"] is None
    assert training.resample_steps(SAE6, 41) == {20} and training.dead_window(SAE6, 41) == 4
    assert summary["n_resampled"] > 0  # measured 6: the resample step really changes something
    assert summary["b_dec_init"]["method"] == "geometric_median"
    return out


@pytest.mark.parametrize("stops", [[10], [25], [10, 25]], ids=["before-resample", "after-resample", "both"])
def test_resume_is_bit_exact_with_init_and_resampling(tmp_path, reference6, stops):
    for stop in stops:
        partial = _run6(tmp_path, stop_after_steps=stop)
        assert partial["completed"] is False and partial["steps"] == stop
    summary = _run6(tmp_path)
    assert summary["completed"] and summary["resumed_from_step"] == (stop // 7) * 7
    ref = json.loads((reference6 / DONE_FILE).read_text())["summary"]
    assert summary["n_resampled"] == ref["n_resampled"] and summary["b_dec_init"] == ref["b_dec_init"]
    wa, wb = load_file(str(tmp_path / SAE_WEIGHTS_FILENAME)), load_file(str(reference6 / SAE_WEIGHTS_FILENAME))
    assert set(wa) == set(wb) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs after resume"
    strip = lambda logs: [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in logs]  # noqa: E731
    logs = [strip(json.loads((out / TRAINING_LOG).read_text())) for out in (tmp_path, reference6)]
    assert logs[0] == logs[1]


# A family mixing b_dec_init "zeros" with a data-dependent init: without init_sample the estimate's batches
# would shift the zeros member's stream (so it is refused, like mixed normalisation); with an explicit sample
# (the pipeline's case) every member equals its run alone, and a kill that leaves one member checkpointed and
# the other not resumes bit-exactly.
MIXED = [SAEConfig(width=32, k=4, dead_feature_window=3, b_dec_init="geometric_median"),
         SAEConfig(width=64, k=4, dead_feature_window=3, b_dec_init="zeros")]
TRAIN_MIXED = TrainConfig(training_tokens=64 * 20, batch_size=64, lr=3e-3, seed=5, checkpoint_every=7, log_every=5,
                          init_sample_rows=512)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / SAE_WEIGHTS_FILENAME))


def _same(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


INIT6 = DATA6[:512].clone()  # the pipeline's case: an explicit sample (sample_rows), no batches drawn for it


def _run_mixed(root: Path) -> list[dict[str, Any]]:
    return train_saes([(c, root / f"m{i}", None) for i, c in enumerate(MIXED)], TRAIN_MIXED,
                      InMemoryLoader(DATA6, 64, seed=2), D6, CPU, scaling_factor=2.5, init_sample=INIT6)


def test_mixed_init_family_without_init_sample_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mix b_dec_init 'zeros' with a data-dependent b_dec_init: pass init_sample"):
        train_saes([(c, tmp_path / f"m{i}", None) for i, c in enumerate(MIXED)], TRAIN_MIXED,
                   InMemoryLoader(DATA6, 64, seed=2), D6, CPU, scaling_factor=2.5)
    assert not list(tmp_path.glob("m*/" + SAE_WEIGHTS_FILENAME))


def test_mixed_init_family_members_equal_training_alone(tmp_path):
    _run_mixed(tmp_path / "fam")
    for i, cfg in enumerate(MIXED):
        train_sae(cfg, TRAIN_MIXED, InMemoryLoader(DATA6, 64, seed=2), D6, tmp_path / f"alone{i}", CPU,
                  scaling_factor=2.5, init_sample=INIT6)
    assert _same(tmp_path / "fam" / "m0", tmp_path / "alone0")
    assert _same(tmp_path / "fam" / "m1", tmp_path / "alone1")


def test_mixed_init_family_resume_is_bit_exact(tmp_path, monkeypatch):
    class Killed(BaseException):
        pass

    _run_mixed(tmp_path / "ref")
    real = checkpoint.save_checkpoint

    def dying(out_dir: Path, payload: dict[str, Any]) -> None:
        if out_dir.name == "m1" and payload["step"] == 7:  # m0 has its step-7 checkpoint, m1 none
            raise Killed
        real(out_dir, payload)

    monkeypatch.setattr(checkpoint, "save_checkpoint", dying)
    with pytest.raises(Killed):
        _run_mixed(tmp_path / "run")
    monkeypatch.setattr(checkpoint, "save_checkpoint", real)
    assert [s["resumed_from_step"] for s in _run_mixed(tmp_path / "run")] == [7, None]
    assert _same(tmp_path / "run" / "m0", tmp_path / "ref" / "m0")
    assert _same(tmp_path / "run" / "m1", tmp_path / "ref" / "m1")


# =============================================================================================
# 7. lr schedule fractions
# =============================================================================================
@pytest.mark.parametrize("total,fw,fd", [(37, 0.1, 0.2), (41, 0.25, 0.5), (200, 0.05, 0.2), (10, 0.0, 1.0), (7, 1.0, 0.0)])
def test_lr_fractions_equal_the_equivalent_step_counts(total, fw, fd):
    w, d = round(fw * total), round(fd * total)
    by_fraction = TrainConfig(lr=2e-3, lr_warm_up_fraction=fw, lr_decay_fraction=fd)
    by_steps = TrainConfig(lr=2e-3, lr_warm_up_steps=w, lr_decay_steps=d)
    assert training.schedule_lengths(total, by_fraction) == (w, d)
    ours = [lr_at_step(s, total, by_fraction) for s in range(total)]
    assert ours == [lr_at_step(s, total, by_steps) for s in range(total)]
    if w:
        assert ours[0] == pytest.approx(2e-3 / w)
    if d:
        assert ours[-1] == pytest.approx(2e-3 / d)


def test_lr_fraction_and_steps_the_longer_wins():
    cfg = TrainConfig(lr=1e-3, lr_warm_up_steps=3, lr_warm_up_fraction=0.1, lr_decay_steps=30, lr_decay_fraction=0.2)
    assert training.schedule_lengths(100, cfg) == (10, 30)  # fraction wins the warm-up, steps the decay
    assert training.schedule_lengths(10, cfg) == (3, 30)
    assert lr_at_step(0, 100, cfg) == pytest.approx(1e-4) and lr_at_step(50, 100, cfg) == 1e-3
    assert lr_at_step(99, 100, cfg) == pytest.approx(1e-3 / 30)


# =============================================================================================
# 8. config validation
# =============================================================================================
@pytest.mark.parametrize("at", [(0.0,), (1.0,), (-0.1,), (1.5,), (0.5, 0.3), (0.5, 0.5), (0.2, 0.8, 0.7)])
def test_resample_dead_at_must_be_increasing_fractions(at):
    with pytest.raises(ValidationError, match="resample_dead_at"):
        SAEConfig(resample_dead_at=at)


def test_new_config_fields_validate():
    ok = SAEConfig(resample_dead_at=(0.25, 0.5, 0.75), dead_window_fraction=0.05)
    assert ok.resample_dead_at == (0.25, 0.5, 0.75)
    assert SAEConfig().b_dec_init == "geometric_median" and SAEConfig().resample_dead_at == ()
    for bad in ({"dead_window_fraction": 0.0}, {"dead_window_fraction": 1.5}, {"resample_encoder_scale": 0.0},
                {"b_dec_init": "median"}):
        with pytest.raises(ValidationError):
            SAEConfig(**bad)
    for bad in ({"lr_warm_up_fraction": -0.1}, {"lr_decay_fraction": 1.1}, {"init_sample_rows": 0}):
        with pytest.raises(ValidationError):
            TrainConfig(**bad)
    # the new fields are part of the fingerprint: changing the init must not reuse an old checkpoint / artifact
    assert SAEConfig().fingerprint_payload() != SAEConfig(b_dec_init="zeros").fingerprint_payload()
    assert TrainConfig().fingerprint_payload() != TrainConfig(lr_decay_fraction=0.2).fingerprint_payload()
    # dead_window: the fraction wins over dead_feature_window, at least 1 step
    assert training.dead_window(SAEConfig(dead_feature_window=7, dead_window_fraction=None), 1000) == 7
    assert training.dead_window(SAEConfig(dead_feature_window=7), 1000) == 50  # default fraction 0.05
    assert training.dead_window(SAEConfig(dead_feature_window=7, dead_window_fraction=0.01), 1000) == 10
    assert training.dead_window(SAEConfig(dead_window_fraction=0.01), 20) == 1
    # resample steps: fractions of the run, never the last step
    assert training.resample_steps(SAEConfig(resample_dead_at=(0.25, 0.5, 0.99)), 100) == {25, 50, 99}
    assert training.resample_steps(SAEConfig(resample_dead_at=(0.99,)), 10) == frozenset()
