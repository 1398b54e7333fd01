"""K-annealing for k-based SAEs (``sae.k_anneal_from`` / ``sae.k_anneal_fraction``, Llama Scope).

Training starts with ``round(k_anneal_from * k)`` latents per row and lowers it linearly to ``k``; inference
always uses ``k``; the schedule is a pure function of the step, so a resumed run stays bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from saeflow import training
from saeflow.config import TrainConfig
from saeflow.saes import SAE_WEIGHTS_FILENAME, SAEConfig, build_sae
from saeflow.training import TRAINING_LOG, train_sae
from tests.test_training import CPU, InMemoryLoader, planted_data

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py

K_ARCHS = ["topk", "batchtopk", "matryoshka"]


def _cfg(arch: str, **kw: Any) -> SAEConfig:
    extra = {"matryoshka_widths": (16, 64)} if arch == "matryoshka" else {}
    return SAEConfig(architecture=arch, width=64, k=4, **extra, **kw)


@pytest.mark.parametrize("arch", K_ARCHS)
def test_train_k_is_linear_from_the_start_value_to_k(arch):
    sae = build_sae(_cfg(arch, k_anneal_from=4.0, k_anneal_fraction=0.5), 16, seed=0)
    assert sae.train_k(0) == 4  # trainer has not set the schedule: plain k
    sae.k_anneal_steps = 10
    ks = [sae.train_k(t) for t in range(14)]
    assert ks[0] == 16 and ks[10:] == [4, 4, 4, 4]
    assert ks == [round(16 + (4 - 16) * t / 10) if t < 10 else 4 for t in range(14)]
    assert all(a >= b for a, b in zip(ks, ks[1:]))


def test_train_k_start_is_capped_at_the_width():
    sae = build_sae(SAEConfig(width=64, k=32, k_anneal_from=8.0, k_anneal_fraction=0.5), 16, seed=0)
    sae.k_anneal_steps = 4
    assert sae.train_k(0) == 64 and sae.train_k(4) == 32


@pytest.mark.parametrize("fraction,from_,expected", [(0.25, 4.0, 10), (0.0, 4.0, 0), (0.5, 1.0, 0), (0.5, 2.0, 20)])
def test_k_anneal_steps_from_the_fraction(fraction, from_, expected):
    cfg = SAEConfig(width=64, k=4, k_anneal_from=from_, k_anneal_fraction=fraction)
    assert training.k_anneal_steps(cfg, 40) == expected


def test_k_anneal_is_off_by_default():
    assert training.k_anneal_steps(SAEConfig(), 1000) == 0


@pytest.mark.parametrize("arch", K_ARCHS)
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_training_forward_selects_the_annealed_k(arch, sparse):
    sae = build_sae(_cfg(arch, k_anneal_from=4.0, k_anneal_fraction=0.5), 16, seed=0)
    sae.sparse_kernels = sparse
    sae.k_anneal_steps = 10
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive: the number selected is exactly the k used
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    for step in (0, 3, 10, 20):
        out = sae.training_forward(x, None, step=step)
        assert float(out["l0"]) == pytest.approx(sae.train_k(step)), (arch, step)
    if arch == "topk":  # inference is never annealed
        assert torch.equal((sae.encode(x) > 0).sum(dim=-1), torch.full((8,), 4))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_and_dense_paths_agree_under_annealing(arch):
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    outs = []
    for sparse in (True, False):
        sae = build_sae(_cfg(arch, k_anneal_from=3.0, k_anneal_fraction=0.5), 16, seed=3)
        sae.sparse_kernels = sparse
        sae.k_anneal_steps = 8
        outs.append(sae.training_forward(x, None, step=2))
    assert float(outs[0]["mse"].detach()) == pytest.approx(float(outs[1]["mse"].detach()), rel=1e-5)
    assert float(outs[0]["l0"]) == float(outs[1]["l0"])


def test_config_validates_the_anneal_fields():
    with pytest.raises(ValidationError):
        SAEConfig(k_anneal_from=0.5)
    with pytest.raises(ValidationError):
        SAEConfig(k_anneal_fraction=1.0)
    with pytest.raises(ValidationError):
        SAEConfig(k_anneal_fraction=-0.1)


# ---------------------------------------------------------------------------------------------
# training: the logged L0 follows the schedule, and a resume inside the anneal is bit-identical
# ---------------------------------------------------------------------------------------------
D = 16
DATA, _ = planted_data(3000, D, 32, 3, seed=4)
SAE_A = SAEConfig(width=64, k=4, k_anneal_from=4.0, k_anneal_fraction=0.5, dead_window_fraction=0.1)
TRAIN_A = TrainConfig(training_tokens=64 * 40, batch_size=64, lr=3e-3, seed=5, checkpoint_every=7, log_every=1,
                      init_sample_rows=1024)


def _run(out: Path, **kw: Any) -> dict[str, Any]:
    return train_sae(SAE_A, TRAIN_A, InMemoryLoader(DATA, 64, seed=2), D, out, CPU, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("anneal_ref")
    assert _run(out)["completed"]
    return out


def test_logged_l0_follows_the_schedule(reference):
    logs = json.loads((reference / TRAINING_LOG).read_text())
    l0 = {int(e["step"]): float(e["l0"]) for e in logs}
    sae = build_sae(SAE_A, D, seed=0)
    sae.k_anneal_steps = training.k_anneal_steps(SAE_A, 40)
    assert sae.k_anneal_steps == 20
    # early steps use ~16 latents per row, the last ones 4 (L0 counts positive activations, so <= the k used)
    early = [v for s, v in l0.items() if s <= 2]
    late = [v for s, v in l0.items() if s > 25]
    assert early and late
    assert min(early) > 8 and max(late) <= 4


@pytest.mark.parametrize("stop", [9, 30], ids=["inside-anneal", "after-anneal"])
def test_resume_inside_the_anneal_is_bit_exact(tmp_path, reference, stop):
    partial = _run(tmp_path, stop_after_steps=stop)
    assert partial["completed"] is False
    summary = _run(tmp_path)
    assert summary["completed"] and summary["resumed_from_step"] == (stop // 7) * 7
    wa, wb = load_file(str(tmp_path / SAE_WEIGHTS_FILENAME)), load_file(str(reference / SAE_WEIGHTS_FILENAME))
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs after resume"
