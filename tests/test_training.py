"""saeflow.training: schedule, planted-dictionary recovery, exact resume, corrupt checkpoints, NaN."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from safetensors.torch import load_file

from saeflow import checkpoint, training
from saeflow.config import TrainConfig
from saeflow.saes import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SAEConfig, build_sae, load_sae
from saeflow.training import (
    CHECKPOINT_DIR,
    TRAINING_LOG,
    CheckpointError,
    NonFiniteError,
    lr_at_step,
    train_sae,
)

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


class InMemoryLoader:
    """Deterministic endless shuffled batches over an in-memory tensor (the BatchLoader protocol).

    Each epoch is a seeded permutation of the rows; a batch running past the end of an epoch
    continues into the next. ``nan_at``: 0-based index of a served batch to poison with NaN.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int = 0, nan_at: int | None = None) -> None:
        self.data, self.batch_size, self.seed, self.nan_at = data, batch_size, seed, nan_at
        self.epoch = self.pos = self.served = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "served": self.served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos, self.served = state["epoch"], state["pos"], state["served"]

    def _perm(self, epoch: int) -> torch.Tensor:
        if getattr(self, "_cached", (None,))[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._cached = (epoch, torch.randperm(len(self.data), generator=g))
        return self._cached[1]

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            parts, need = [], self.batch_size
            while need:
                take = min(need, len(self.data) - self.pos)
                parts.append(self.data[self._perm(self.epoch)[self.pos:self.pos + take]])
                self.pos += take
                need -= take
                if self.pos == len(self.data):
                    self.epoch, self.pos = self.epoch + 1, 0
            batch = torch.cat(parts)
            if self.served == self.nan_at:
                batch[3, 1] = float("nan")
            self.served += 1
            yield batch


def planted_data(n: int, d: int, n_features: int, active: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows = sparse non-negative combinations of ``active`` of ``n_features`` random unit directions."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_features, d, generator=g)
    dictionary /= dictionary.norm(dim=-1, keepdim=True)
    idx = torch.rand(n, n_features, generator=g).argsort(dim=1)[:, :active]
    mags = torch.rand(n, active, generator=g) * 2 + 0.5
    codes = torch.zeros(n, n_features).scatter_(1, idx, mags)
    return codes @ dictionary, dictionary


# small resumable setup: 41 steps, checkpoints every 7, a short dead window so the aux loss is live
D_IN = 16
DATA, _ = planted_data(3000, D_IN, 32, 3, seed=1)
SAE_CFG = SAEConfig(width=64, k=4, dead_feature_window=3, dead_window_fraction=None, decoder_init_norm=0.1)
TRAIN_CFG = TrainConfig(training_tokens=64 * 41 + 10, batch_size=64, lr=3e-3, lr_warm_up_steps=4,
                        lr_decay_steps=8, seed=5, checkpoint_every=7, log_every=5)


def run(out: Path, *, loader: InMemoryLoader | None = None, sae_cfg: SAEConfig = SAE_CFG,
        train_cfg: TrainConfig = TRAIN_CFG, **kw: Any) -> dict[str, Any]:
    loader = loader or InMemoryLoader(DATA, train_cfg.batch_size, seed=2)
    return train_sae(sae_cfg, train_cfg, loader, D_IN, out, CPU, **kw)


def final_state(out: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    logs = json.loads((out / TRAINING_LOG).read_text())
    return load_file(str(out / SAE_WEIGHTS_FILENAME)), [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in logs]


def assert_same_result(a: Path, b: Path, names: set[str] = frozenset({"W_enc", "b_enc", "W_dec", "b_dec"})) -> None:
    (wa, la), (wb, lb) = final_state(a), final_state(b)
    assert set(wa) == set(wb) == set(names)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs after resume"
    assert la == lb


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run every resume test compares against."""
    out = tmp_path_factory.mktemp("uninterrupted")
    summary = run(out)
    assert summary["completed"] and summary["steps"] == 41 and summary["resumed_from_step"] is None
    return out


# ------------------------------------------------------------------------------------- schedule
def test_lr_schedule_matches_sae_lens():
    from sae_lens.training.optim import get_lr_scheduler

    cfg = TrainConfig(lr=1e-3, lr_warm_up_steps=5, lr_decay_steps=6)
    total = 20
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = get_lr_scheduler("constant", optimizer=opt, training_steps=total, lr=cfg.lr, warm_up_steps=5,
                                 decay_steps=6, lr_end=cfg.lr, num_cycles=1)
        expected = []
        for _ in range(total):
            expected.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    ours = [lr_at_step(s, total, cfg) for s in range(total)]
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert lr_at_step(7, total, TrainConfig(lr=2e-4)) == 2e-4


# ----------------------------------------------------------------------------- ground truth
def test_recovers_planted_dictionary(tmp_path):
    # 50k samples, each a positive combination of 3 of 64 random unit directions in R^32.
    data, dictionary = planted_data(50_000, 32, 64, 3, seed=0)
    sae_cfg = SAEConfig(width=128, k=3, dead_feature_window=50, dead_window_fraction=None)
    train_cfg = TrainConfig(training_tokens=100_000, batch_size=256, lr=1e-2, seed=0, checkpoint_every=10**6, log_every=50)
    summary = train_sae(sae_cfg, train_cfg, InMemoryLoader(data, 256, seed=0), 32, tmp_path, CPU)
    sae = load_sae(tmp_path)
    W = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
    best = (dictionary @ W.T).max(dim=1).values  # per true feature: best-matching decoder row
    # Measured on this setup: mean 0.9975, min 0.9943, all 64 features >= 0.9, FVU 0.055 (390
    # steps, ~1.5 s). The untrained SAE scores a mean of 0.43, so the thresholds below leave a
    # wide margin both ways.
    assert best.mean() >= 0.98, f"mean max cosine {best.mean():.4f}"
    assert (best >= 0.9).float().mean() >= 0.95, f"only {(best >= 0.9).float().mean():.3f} of features found"
    untrained = build_sae(sae_cfg, 32, seed=0).W_dec.detach()
    untrained = untrained / untrained.norm(dim=-1, keepdim=True)
    assert (dictionary @ untrained.T).max(dim=1).values.mean() < 0.75
    assert summary["final"]["l0"] == pytest.approx(3.0)
    # the saved SAE works on raw activations (the normalisation factor was folded in)
    x = data[:2048]
    with torch.no_grad():
        fvu = (sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert fvu < 0.15, f"fraction of variance unexplained {fvu:.3f}"


# ------------------------------------------------------------------------------------- outputs
def test_outputs_logs_and_sae_lens_load(reference):
    assert not (reference / CHECKPOINT_DIR).exists()
    assert not list(reference.glob(".checkpoint*"))
    logs = json.loads((reference / TRAINING_LOG).read_text())
    assert [e["step"] for e in logs] == [5, 10, 15, 20, 25, 30, 35, 40, 41]
    assert set(logs[0]) == {"step", "loss", "mse", "aux", "l0", "frac_dead", "lr", "tokens_per_s", "resampled"}
    assert all(math.isfinite(e["loss"]) and e["l0"] <= 4 for e in logs)
    assert any(e["aux"] > 0 for e in logs), "dead latents should have fed the aux loss"
    cfg = json.loads((reference / SAE_CFG_FILENAME).read_text())
    info = cfg["saeflow"]["training_info"]
    assert info["steps"] == 41 and info["scaling_factor_folded"] > 0
    from sae_lens import SAE as SLSAE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sl = SLSAE.load_from_disk(str(reference))
    ours = load_sae(reference)
    with torch.no_grad():
        torch.testing.assert_close(sl(DATA[:100]), ours(DATA[:100]), rtol=1e-5, atol=1e-5)


def test_on_log_and_explicit_scaling_factor(tmp_path):
    seen: list[dict[str, Any]] = []
    summary = run(tmp_path, scaling_factor=2.5, on_log=seen.append, cfg_extra={"hook_name": "blocks.0.hook_resid_post"})
    assert [d["step"] for d in seen] == [5, 10, 15, 20, 25, 30, 35, 40, 41]
    assert seen == json.loads((tmp_path / TRAINING_LOG).read_text())
    assert seen[-1] == summary["final"]
    cfg = json.loads((tmp_path / SAE_CFG_FILENAME).read_text())
    assert cfg["saeflow"]["training_info"]["scaling_factor_folded"] == 2.5
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    assert seen[0]["lr"] == pytest.approx(3e-3) and seen[-1]["lr"] == pytest.approx(3e-3 / 8)


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="normalize_activations is 'none'"):
        run(tmp_path, sae_cfg=SAE_CFG.model_copy(update={"normalize_activations": "none"}), scaling_factor=2.0)
    with pytest.raises(ValueError, match="no full step"):
        run(tmp_path, train_cfg=TRAIN_CFG.model_copy(update={"training_tokens": 10}))
    bad = InMemoryLoader(DATA[:, :8].contiguous(), 64)
    with pytest.raises(ValueError, match=r"batch of shape \(64, 8\).*expected \[64, 16\]"):
        run(tmp_path, loader=bad, scaling_factor=1.0)


# --------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("stops", [[3], [7], [18], [10, 25, 40]], ids=["before-first-ckpt", "at-ckpt", "mid", "three-kills"])
def test_resume_is_bit_exact(tmp_path, reference, stops):
    for stop in stops:
        partial = run(tmp_path, stop_after_steps=stop)
        assert partial["completed"] is False and partial["steps"] == stop
        assert not (tmp_path / SAE_WEIGHTS_FILENAME).exists()
        ckpt_step = (stop // 7) * 7
        if ckpt_step:
            assert json.loads((tmp_path / CHECKPOINT_DIR / "meta.json").read_text())["step"] == ckpt_step
    summary = run(tmp_path)
    assert summary["completed"] and summary["resumed_from_step"] == ((stops[-1] // 7) * 7 or None)
    assert_same_result(tmp_path, reference)


# the other architectures: their extra state (BatchTopK / Matryoshka moving threshold buffer, JumpReLU
# threshold parameter, warm-up coefficients that depend on the step) must survive a resume too
OTHER_ARCHITECTURES = {
    # SAELens' decoder norm 0.1 and a 3-step window: latents die, so the aux losses are exercised
    "batchtopk": SAEConfig(architecture="batchtopk", width=64, k=4, dead_feature_window=3, dead_window_fraction=None,
                           decoder_init_norm=0.1),
    "matryoshka": SAEConfig(architecture="matryoshka", width=64, k=4, dead_feature_window=3, dead_window_fraction=None,
                            decoder_init_norm=0.1,
                            matryoshka_widths=(8, 32), use_matryoshka_aux_loss=True),
    "jumprelu": SAEConfig(architecture="jumprelu", width=64, dead_feature_window=3, dead_window_fraction=None, l0_coefficient=0.5,
                          l0_warm_up_steps=20, pre_act_loss_coefficient=1e-3),
    "relu": SAEConfig(architecture="relu", width=64, dead_feature_window=3, dead_window_fraction=None, l1_coefficient=0.5, l1_warm_up_steps=20),
    # the L1 controller's coefficient (a buffer) must resume exactly; warm-up 5 so it moves before both stops
    "relu-target-l0": SAEConfig(architecture="relu", width=64, dead_feature_window=3, dead_window_fraction=None,
                                l1_coefficient=0.5, l1_warm_up_steps=5, target_l0=4.0, l1_controller_gain=0.1),
    "jumprelu-quadratic": SAEConfig(architecture="jumprelu", width=64, dead_feature_window=3, dead_window_fraction=None,
                                    l0_coefficient=0.5, jumprelu_sparsity_loss_mode="quadratic", target_l0=4.0),
}


@pytest.mark.parametrize("arch", list(OTHER_ARCHITECTURES))
def test_resume_is_bit_exact_other_architectures(tmp_path, arch):
    sae_cfg = OTHER_ARCHITECTURES[arch]
    reference = tmp_path / "uninterrupted"
    run(reference, sae_cfg=sae_cfg)
    resumed = tmp_path / "resumed"
    for stop in (10, 25):  # checkpoints at 7 and 21: both resumes replay steps
        assert run(resumed, sae_cfg=sae_cfg, stop_after_steps=stop)["completed"] is False
    assert run(resumed, sae_cfg=sae_cfg)["resumed_from_step"] == 21
    names = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if not arch.startswith("relu") else set())
    assert_same_result(resumed, reference, names)
    weights, logs = final_state(reference)
    if arch in ("batchtopk", "matryoshka"):  # the moving threshold moved and is saved for every latent
        assert (weights["threshold"] > 0).all() and (weights["threshold"] == weights["threshold"][0]).all()
    if arch.startswith("jumprelu"):
        assert (weights["threshold"] >= 0).all() and not torch.allclose(weights["threshold"], torch.tensor(0.01))
    if arch == "relu-target-l0":  # the steered coefficient moved (and assert_same_result compared its logs)
        assert logs[-1]["l1_coefficient"] != pytest.approx(0.5, rel=1e-3)
    assert any(e["aux"] > 0 for e in logs)


class Killed(BaseException):
    """Stands in for SIGKILL inside a checkpoint write."""


def test_kill_while_writing_checkpoint_state(tmp_path, reference, monkeypatch):
    real = checkpoint.write_state_file
    calls = {"n": 0}

    def dying_write(tmp_dir: Path, payload: dict[str, Any]) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # the step-21 checkpoint: half a file, then death
            (tmp_dir / "state.pt").write_bytes(b"PK\x03\x04 truncated")
            raise Killed
        real(tmp_dir, payload)

    monkeypatch.setattr(checkpoint, "write_state_file", dying_write)
    with pytest.raises(Killed):
        run(tmp_path)
    monkeypatch.setattr(checkpoint, "write_state_file", real)
    assert json.loads((tmp_path / CHECKPOINT_DIR / "meta.json").read_text())["step"] == 14
    stray = tmp_path / ".checkpoint.tmp-99999-deadbeef"  # what a real kill leaves behind
    stray.mkdir()
    (stray / "state.pt").write_bytes(b"garbage")
    assert run(tmp_path)["resumed_from_step"] == 14
    assert not stray.exists()
    assert_same_result(tmp_path, reference)


def test_kill_between_checkpoint_renames(tmp_path, reference, monkeypatch):
    real = checkpoint.swap_checkpoint
    calls = {"n": 0}

    def dying_swap(tmp_dir: Path, out_dir: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # step 14: old checkpoint moved aside, new one not yet in place
            os.rename(out_dir / CHECKPOINT_DIR, out_dir / (CHECKPOINT_DIR + ".old"))
            raise Killed
        real(tmp_dir, out_dir)

    monkeypatch.setattr(checkpoint, "swap_checkpoint", dying_swap)
    with pytest.raises(Killed):
        run(tmp_path)
    monkeypatch.setattr(checkpoint, "swap_checkpoint", real)
    assert not (tmp_path / CHECKPOINT_DIR).exists() and (tmp_path / "checkpoint.old").exists()
    assert run(tmp_path)["resumed_from_step"] == 7
    assert_same_result(tmp_path, reference)


def test_damaged_checkpoint_is_refused(tmp_path):
    run(tmp_path, stop_after_steps=10)
    state = tmp_path / CHECKPOINT_DIR / "state.pt"
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"damaged.*truncated or modified.*delete .*checkpoint"):
        run(tmp_path)
    state.write_bytes(good)
    meta = tmp_path / CHECKPOINT_DIR / "meta.json"
    meta_text = meta.read_text()
    meta.write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json is missing or unreadable"):
        run(tmp_path)
    meta.write_text(meta_text)
    with pytest.raises(CheckpointError, match="different SAE/training config"):
        run(tmp_path, train_cfg=TRAIN_CFG.model_copy(update={"lr": 1e-3}))
    # operational fields (checkpoint/log frequency, device) may change between attempts
    assert run(tmp_path, train_cfg=TRAIN_CFG.model_copy(update={"log_every": 3}))["resumed_from_step"] == 7


# ------------------------------------------------------------------------------------------ NaN
def test_nan_batch_names_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    # batch i is step i + 1 (no batches drawn for normalisation or the b_dec estimate)
    sae_cfg = SAE_CFG.model_copy(update={"normalize_activations": "none", "b_dec_init": "zeros"})
    with pytest.raises(NonFiniteError, match=r"NaN/inf in the activation batch at training step 12: check the activation store"):
        run(tmp_path, sae_cfg=sae_cfg, loader=InMemoryLoader(DATA, 64, seed=2, nan_at=11))
    ckpt = checkpoint.load_checkpoint(tmp_path / CHECKPOINT_DIR, training._fingerprint(sae_cfg, TRAIN_CFG, D_IN))
    assert ckpt["step"] == 7
    assert all(torch.isfinite(t).all() for t in ckpt["sae"].values())
    assert not (tmp_path / SAE_WEIGHTS_FILENAME).exists()
    # once the data is fixed the run resumes from that checkpoint and matches a clean run
    assert run(tmp_path, sae_cfg=sae_cfg)["resumed_from_step"] == 7
    clean = tmp_path / "clean"
    run(clean, sae_cfg=sae_cfg)
    assert_same_result(tmp_path, clean)


def test_nonfinite_loss_from_finite_batch(tmp_path):
    huge = torch.full((256, D_IN), 1e30)
    sae_cfg = SAE_CFG.model_copy(update={"normalize_activations": "none", "b_dec_init": "zeros"})
    with pytest.raises(NonFiniteError, match=r"NaN/inf in the loss at training step 1.*lower train.lr"):
        run(tmp_path, sae_cfg=sae_cfg, loader=InMemoryLoader(huge, 64))


# ------------------------------------------------------------------------------------- families
# three SAEs of different architectures and widths fed from one pass over the same loader
FAMILY = [
    SAE_CFG,
    SAEConfig(architecture="batchtopk", width=32, k=2, dead_feature_window=3, dead_window_fraction=None),
    SAEConfig(architecture="jumprelu", width=48, dead_feature_window=3, dead_window_fraction=None, l0_coefficient=0.5, l0_warm_up_steps=20),
]
FAMILY_NAMES = [{"W_enc", "b_enc", "W_dec", "b_dec"}, {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
                {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}]


def run_family(root: Path, cfgs: list[SAEConfig] = FAMILY, **kw: Any) -> list[dict[str, Any]]:
    members = [(cfg, root / f"m{i}", None) for i, cfg in enumerate(cfgs)]
    return training.train_saes(members, TRAIN_CFG, InMemoryLoader(DATA, TRAIN_CFG.batch_size, seed=2), D_IN, CPU, **kw)


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> list[Path]:
    """Each family member trained on its own with train_sae (same seed, same loader)."""
    root = tmp_path_factory.mktemp("alone")
    for i, cfg in enumerate(FAMILY):
        assert run(root / f"m{i}", sae_cfg=cfg)["completed"]
    return [root / f"m{i}" for i in range(len(FAMILY))]


def assert_family_equals(root: Path, alone: list[Path]) -> None:
    for i, ref in enumerate(alone):
        assert_same_result(root / f"m{i}", ref, FAMILY_NAMES[i])
        assert not (root / f"m{i}" / CHECKPOINT_DIR).exists()


def test_family_equals_members_trained_alone(tmp_path, alone):
    seen: list[tuple[int, int]] = []
    summaries = run_family(tmp_path, on_log=lambda i, d: seen.append((i, d["step"])))
    assert [s["completed"] for s in summaries] == [True] * 3
    assert [s["d_sae"] for s in summaries] == [64, 32, 48]
    assert seen[:3] == [(0, 5), (1, 5), (2, 5)] and len(seen) == 3 * 9
    assert_family_equals(tmp_path, alone)


def test_family_with_an_unnormalised_member_needs_the_factor(tmp_path):
    cfgs = [SAE_CFG, SAE_CFG.model_copy(update={"normalize_activations": "none", "width": 32})]
    with pytest.raises(ValueError, match="mix normalize_activations 'none' and 'expected_average_only_in': pass scaling_factor"):
        run_family(tmp_path, cfgs)
    # with the factor, the normalising member is scaled and the other is not, each as if alone
    run_family(tmp_path / "fam", cfgs, scaling_factor=2.5)
    run(tmp_path / "a0", sae_cfg=cfgs[0], scaling_factor=2.5)
    run(tmp_path / "a1", sae_cfg=cfgs[1])
    assert_same_result(tmp_path / "fam" / "m0", tmp_path / "a0")
    assert_same_result(tmp_path / "fam" / "m1", tmp_path / "a1")


def test_family_members_need_their_own_folders(tmp_path):
    with pytest.raises(ValueError, match="share an out_dir"):
        training.train_saes([(SAE_CFG, tmp_path / "x", None), (FAMILY[1], tmp_path / "x", None)], TRAIN_CFG,
                            InMemoryLoader(DATA, 64), D_IN, CPU)


def test_family_kill_and_resume_equals_uninterrupted(tmp_path, alone):
    for stop in (10, 25):  # checkpoints at 7 and 21: each resume replays steps
        summaries = run_family(tmp_path, stop_after_steps=stop)
        assert [(s["completed"], s["steps"]) for s in summaries] == [(False, stop)] * 3
    summaries = run_family(tmp_path)
    assert [s["resumed_from_step"] for s in summaries] == [21, 21, 21]
    assert_family_equals(tmp_path, alone)


@pytest.mark.parametrize("dying_member", [0, 1, 2])
def test_family_kill_between_members_checkpoint_writes(tmp_path, alone, monkeypatch, dying_member):
    """A kill lands after some members wrote their step-14 checkpoint and before the others did."""
    real = checkpoint.save_checkpoint
    writes: list[Path] = []

    def dying_save(out_dir: Path, payload: dict[str, Any]) -> None:
        if payload["step"] == 14 and out_dir.name == f"m{dying_member}":
            raise Killed
        writes.append(out_dir)
        real(out_dir, payload)

    monkeypatch.setattr(checkpoint, "save_checkpoint", dying_save)
    with pytest.raises(Killed):
        run_family(tmp_path)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real)
    steps = [json.loads((tmp_path / f"m{i}" / CHECKPOINT_DIR / "meta.json").read_text())["step"] for i in range(3)]
    assert steps == [14 if i < dying_member else 7 for i in range(3)]
    summaries = run_family(tmp_path)
    assert [s["resumed_from_step"] for s in summaries] == steps
    assert_family_equals(tmp_path, alone)


def test_family_kill_between_members_final_saves(tmp_path, alone, monkeypatch):
    real = training.save_sae
    calls = {"n": 0}

    def dying_save_sae(*a: Any, **kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # member 0 is finished, members 1 and 2 are not
            raise Killed
        real(*a, **kw)

    monkeypatch.setattr(training, "save_sae", dying_save_sae)
    with pytest.raises(Killed):
        run_family(tmp_path)
    monkeypatch.setattr(training, "save_sae", real)
    assert (tmp_path / "m0" / training.DONE_FILE).is_file() and not (tmp_path / "m0" / CHECKPOINT_DIR).exists()
    summaries = run_family(tmp_path)
    assert summaries[0]["already_complete"] is True
    assert [s["resumed_from_step"] for s in summaries[1:]] == [35, 35]
    assert_family_equals(tmp_path, alone)


def test_member_checkpointed_alone_joins_a_fresh_family(tmp_path, alone):
    """Member 0 stopped at step 18 (checkpoint 14); the family restarts from a fresh loader for the
    others (estimating the factor again) and member 0 skips the 14 batches it already trained on."""
    run(tmp_path / "m0", sae_cfg=FAMILY[0], stop_after_steps=18)
    summaries = run_family(tmp_path)
    assert [s["resumed_from_step"] for s in summaries] == [14, None, None]
    assert_family_equals(tmp_path, alone)


def test_complete_members_are_not_retrained(tmp_path, alone):
    run_family(tmp_path, FAMILY[:2])
    before = {p: p.stat().st_mtime_ns for i in range(2) for p in (tmp_path / f"m{i}").iterdir()}
    summaries = run_family(tmp_path, FAMILY)
    assert [s.get("already_complete", False) for s in summaries] == [True, True, False]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert_family_equals(tmp_path, alone)
    # a finished folder is also skipped by train_sae; a damaged one is trained again
    assert run(tmp_path / "m0")["already_complete"] is True
    weights = tmp_path / "m0" / SAE_WEIGHTS_FILENAME
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    assert "already_complete" not in run(tmp_path / "m0")
    assert_same_result(tmp_path / "m0", alone[0])
