"""SAE families beyond TopK: batchtopk, matryoshka, relu (standard L1), jumprelu.

Each is checked against the SAELens 6.54.12 training class with the same weights and inputs
(losses by name, latents, reconstruction, gradients, threshold updates, warm-up coefficients),
against SAELens' disk format and weight folding, on planted-dictionary recovery through
``train_sae``, and on config validation.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from saeflow.config import ConfigError, TrainConfig, load_config
from saeflow.saes import (
    REGISTRY,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    BaseSAE,
    BatchTopKSAE,
    JumpReLUSAE,
    MatryoshkaSAE,
    SAEConfig,
    SAEFormatError,
    StandardSAE,
    build_sae,
    load_sae,
    save_sae,
    warm_up_coefficient,
)
from saeflow.saes.kernels import _batch_topk_select
from saeflow.training import CHECKPOINT_DIR, train_sae
from tests.test_training import InMemoryLoader, planted_data

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import SAE as SLSAE  # noqa: E402
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig  # noqa: E402
from sae_lens.saes.jumprelu_sae import JumpReLUSAE as SLJumpReLUSAE  # noqa: E402
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig  # noqa: E402
from sae_lens.saes.matryoshka_batchtopk_sae import (  # noqa: E402
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainStepInput  # noqa: E402
from sae_lens.saes.standard_sae import StandardSAE as SLStandardSAE  # noqa: E402
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig  # noqa: E402
from sae_lens.training.optim import CoefficientScheduler  # noqa: E402

CPU = torch.device("cpu")
NEW = ("batchtopk", "matryoshka", "relu", "jumprelu")


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread, kernels: conftest.py


# ------------------------------------------------------------------------------------ helpers
def make(arch: str, d_in: int = 48, d_sae: int = 256, seed: int = 1, **kw: Any) -> BaseSAE:
    """An SAE with non-trivial biases, unequal decoder norms and (JumpReLU) varied thresholds."""
    if arch == "matryoshka":
        kw.setdefault("matryoshka_widths", (16, 64))
    if arch in ("batchtopk", "matryoshka"):
        kw.setdefault("k", 8)
    sae = build_sae(SAEConfig(architecture=arch, width=d_sae, **kw), d_in, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
        sae.W_dec.mul_(torch.rand(d_sae, 1, generator=g) * 3 + 0.2)
        sae.W_enc.add_(torch.randn(d_in, d_sae, generator=g) * 0.05)
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.copy_(torch.rand(d_sae, generator=g) * 0.3)
    return sae


def twin_of(sae: BaseSAE):
    """The SAELens training SAE with the same configuration and weights (state dicts match by name)."""
    c, d_in, d_sae = sae.cfg, sae.d_in, sae.d_sae
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SAELens warns when it appends the outer matryoshka width
        if c.architecture == "relu":
            twin = StandardTrainingSAE(StandardTrainingSAEConfig(
                d_in=d_in, d_sae=d_sae, l1_coefficient=c.l1_coefficient, lp_norm=c.lp_norm,
                l1_warm_up_steps=c.l1_warm_up_steps))
        elif c.architecture == "jumprelu":
            twin = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
                d_in=d_in, d_sae=d_sae, jumprelu_init_threshold=c.jumprelu_init_threshold,
                jumprelu_bandwidth=c.jumprelu_bandwidth, jumprelu_sparsity_loss_mode=c.jumprelu_sparsity_loss_mode,
                target_l0=c.target_l0, l0_coefficient=c.l0_coefficient, l0_warm_up_steps=c.l0_warm_up_steps,
                pre_act_loss_coefficient=c.pre_act_loss_coefficient, jumprelu_tanh_scale=c.jumprelu_tanh_scale,
                jumprelu_ste_to_input=c.jumprelu_ste_to_input))
        elif c.architecture == "batchtopk":
            twin = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
                d_in=d_in, d_sae=d_sae, k=c.k, rescale_acts_by_decoder_norm=c.rescale_acts_by_decoder_norm,
                aux_loss_coefficient=c.aux_coefficient, topk_threshold_lr=c.topk_threshold_lr))
        elif c.architecture == "matryoshka":
            twin = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=d_in, d_sae=d_sae, k=c.k, rescale_acts_by_decoder_norm=c.rescale_acts_by_decoder_norm,
                aux_loss_coefficient=c.aux_coefficient, topk_threshold_lr=c.topk_threshold_lr,
                matryoshka_widths=list(c.matryoshka_widths or ()), use_matryoshka_aux_loss=c.use_matryoshka_aux_loss))
        else:  # pragma: no cover
            raise AssertionError(c.architecture)
    # saeflow-only state (the relu L1 controller's coefficient) has no SAELens counterpart
    twin.load_state_dict({k: v.detach().clone() for k, v in sae.state_dict().items() if k != "l1_log_coefficient"})
    return twin


def sae_lens_coefficients(twin, step: int) -> dict[str, float]:
    """The coefficients SAELens' trainer passes to the training forward of 0-based step ``step``."""
    out = {}
    for name, spec in twin.get_coefficients().items():
        sched = CoefficientScheduler(spec.warm_up_steps, spec.value)
        for _ in range(step):
            sched.step()
        out[name] = sched.value
    return out


def batch(d_in: int, n: int = 300, seed: int = 3, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed)) * scale


def dead_mask(d_sae: int, n_dead: int, seed: int = 4) -> torch.Tensor:
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[torch.randperm(d_sae, generator=torch.Generator().manual_seed(seed))[:n_dead]] = True
    return dead


def assert_matches_sae_lens(sae: BaseSAE, x: torch.Tensor, dead: torch.Tensor, step: int = 0) -> tuple[dict, Any]:
    """Training forward, losses by name, latents, reconstruction and gradients equal SAELens'."""
    twin = twin_of(sae)
    coefs = sae_lens_coefficients(twin, step)
    ref = twin.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefs, dead_neuron_mask=dead,
                                                    n_training_steps=step, is_logging_step=False))
    ref.loss.backward()
    out = sae.training_forward(x, dead, step=step)
    out["loss"].backward()

    assert set(out["losses"]) == set(ref.losses)
    for name, value in ref.losses.items():
        torch.testing.assert_close(out["losses"][name], value, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(out["loss"], ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["mse"], ref.losses["mse_loss"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["aux"], out["loss"] - out["mse"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out["feature_acts"], ref.feature_acts.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["fired"], (ref.feature_acts > 0).any(0))
    torch.testing.assert_close(out["l0"], (ref.feature_acts > 0).sum(-1).float().mean())
    with torch.no_grad():
        torch.testing.assert_close(sae.decode(out["feature_acts"]), ref.sae_out, rtol=1e-5, atol=1e-5)
    ref_params = dict(twin.named_parameters())
    assert set(ref_params) == {n for n, _ in sae.named_parameters()}
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    return out, twin


# ------------------------------------------------------------------------------------- registry
def test_registry_holds_every_architecture():
    assert {"topk", *NEW} <= set(REGISTRY)
    assert REGISTRY["batchtopk"] is BatchTopKSAE and REGISTRY["matryoshka"] is MatryoshkaSAE
    assert REGISTRY["relu"] is StandardSAE and REGISTRY["jumprelu"] is JumpReLUSAE


@pytest.mark.parametrize("arch", NEW)
def test_init_matches_sae_lens(arch):
    """Same seed -> the same initial weights as SAELens (which draws from the global RNG)."""
    cfg = SAEConfig(architecture=arch, width=96, k=4, matryoshka_widths=(8, 96) if arch == "matryoshka" else None,
                    decoder_init_norm=0.1)  # SAELens' setting, pinned (saeflow's k-architecture default is 1.0)
    ours = build_sae(cfg, 24, seed=7)
    template = twin_of(build_sae(cfg, 24, seed=0))  # for its SAELens config
    torch.manual_seed(7)
    fresh = type(template)(template.cfg)
    for name, t in fresh.state_dict().items():
        torch.testing.assert_close(getattr(ours, name).detach().to(t.dtype), t, rtol=0, atol=1e-7, msg=name)


def test_decoder_init_norm_defaults_per_architecture():
    for arch in ("topk", "batchtopk", "matryoshka", "relu", "jumprelu"):
        cfg = SAEConfig(architecture=arch, width=32, k=4, matryoshka_widths=(8, 32) if arch == "matryoshka" else None)
        norms = build_sae(cfg, 16, seed=0).W_dec.norm(dim=-1)
        want = 1.0 if arch in ("topk", "batchtopk", "matryoshka") else 0.1
        torch.testing.assert_close(norms, torch.full((32,), want), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("kw,step,n_dead", [
    ({"l1_coefficient": 0.7}, 0, 0),
    ({"l1_coefficient": 0.7, "l1_warm_up_steps": 10}, 0, 0),
    ({"l1_coefficient": 0.7, "l1_warm_up_steps": 10}, 4, 0),
    ({"l1_coefficient": 0.7, "l1_warm_up_steps": 10}, 25, 0),
    ({"l1_coefficient": 0.3, "lp_norm": 2.0}, 0, 30),
    ({"l1_coefficient": 0.7, "target_l0": 20.0}, 0, 0),  # the controller starts at l1_coefficient
], ids=["l1", "warm-up-step0", "warm-up-step4", "warm-up-done", "l2", "target-l0-start"])
def test_relu_matches_sae_lens(kw, step, n_dead):
    sae = make("relu", **kw)
    out, twin = assert_matches_sae_lens(sae, batch(sae.d_in), dead_mask(sae.d_sae, n_dead), step)
    assert out["losses"]["l1_loss"].item() > 0 or (step == 0 and kw.get("l1_warm_up_steps"))
    x = batch(sae.d_in, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), twin(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.encode(x), twin.encode(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw,step,n_dead", [
    ({"l0_coefficient": 0.3}, 0, 0),
    ({"l0_coefficient": 0.3, "jumprelu_bandwidth": 0.2}, 0, 0),
    ({"l0_coefficient": 0.3, "l0_warm_up_steps": 8, "jumprelu_bandwidth": 0.2, "pre_act_loss_coefficient": 0.01}, 3, 40),
    ({"l0_coefficient": 0.3, "jumprelu_bandwidth": 0.2, "pre_act_loss_coefficient": 0.01}, 0, 0),
    ({"l0_coefficient": 0.3, "jumprelu_sparsity_loss_mode": "tanh", "jumprelu_tanh_scale": 2.0}, 0, 0),
    ({"l0_coefficient": 0.3, "jumprelu_bandwidth": 0.2, "jumprelu_ste_to_input": True}, 0, 0),
    ({"l0_coefficient": 0.3, "jumprelu_bandwidth": 0.2, "jumprelu_ste_to_input": True,
      "jumprelu_sparsity_loss_mode": "tanh", "pre_act_loss_coefficient": 0.1}, 0, 100),
    ({"l0_coefficient": 0.3, "jumprelu_bandwidth": 0.2, "jumprelu_sparsity_loss_mode": "quadratic", "target_l0": 20.0}, 0, 0),
    ({"l0_coefficient": 0.3, "jumprelu_bandwidth": 0.2, "jumprelu_sparsity_loss_mode": "quadratic", "target_l0": 200.0,
      "l0_warm_up_steps": 8}, 5, 0),
], ids=["step", "step-wide-band", "warm-up-pre-act-dead", "pre-act-none-dead", "tanh", "ste-to-input",
        "tanh-ste-pre-act", "quadratic-below-target", "quadratic-above-target-warm-up"])
def test_jumprelu_matches_sae_lens(kw, step, n_dead):
    sae = make("jumprelu", **kw)
    out, twin = assert_matches_sae_lens(sae, batch(sae.d_in), dead_mask(sae.d_sae, n_dead), step)
    # the straight-through estimator really reached the threshold
    assert sae.threshold.grad is not None and sae.threshold.grad.abs().sum() > 0
    if kw.get("pre_act_loss_coefficient") is not None:
        assert (out["losses"]["pre_act_loss"].item() > 0) == (n_dead > 0)
    x = batch(sae.d_in, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), twin(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.encode(x), twin.encode(x), rtol=1e-6, atol=1e-6)


def test_jumprelu_threshold_is_projected_like_sae_lens():
    """after_step keeps θ >= 0; SAELens projects at the start of the next forward: same values."""
    sae = make("jumprelu", l0_coefficient=0.3)
    with torch.no_grad():
        sae.threshold[:5] = -0.2
    twin = twin_of(sae)
    x = batch(sae.d_in)
    twin.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"l0": 0.3}, dead_neuron_mask=None,
                                              n_training_steps=0, is_logging_step=False))
    sae.after_step({})
    assert torch.equal(sae.threshold.detach(), twin.threshold.detach())
    assert (sae.threshold[:5] == 0).all() and (sae.threshold >= 0).all()


@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "no-rescale"])
@pytest.mark.parametrize("n_dead", [0, 10, 90], ids=["no-dead", "few-dead", "many-dead"])
def test_batchtopk_matches_sae_lens(kernels, rescale, n_dead):
    """d_in=48 gives k_aux=24: 10 dead latents exercise scale=10/24, 90 the capped case."""
    sae = make("batchtopk", rescale_acts_by_decoder_norm=rescale)
    with torch.no_grad():
        sae.topk_threshold.fill_(0.25)
    x = batch(sae.d_in)
    out, twin = assert_matches_sae_lens(sae, x, dead_mask(sae.d_sae, n_dead))
    assert out["l0"].item() == pytest.approx(8.0)  # k per row on average
    assert (out["losses"]["auxiliary_reconstruction_loss"].item() > 0) == (n_dead > 0)
    # the moving threshold: SAELens updates it inside its forward, we in after_step: same float64 value
    assert not torch.equal(twin.topk_threshold, torch.tensor(0.25, dtype=torch.float64))
    sae.after_step(out)
    assert torch.equal(sae.topk_threshold, twin.topk_threshold)
    expected = 0.99 * 0.25 + 0.01 * float(out["feature_acts"][out["feature_acts"] > 0].min())
    assert float(sae.topk_threshold) == pytest.approx(expected, rel=1e-12)
    # the training activation (batch top-k) equals SAELens' training-SAE forward
    x2 = batch(sae.d_in, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode_batch_topk(x2), twin.encode(x2), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sae.decode(sae.encode_batch_topk(x2)), twin(x2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("widths", [(16, 64), (16, 64, 256), (200, 256)], ids=["append-outer", "outer-given", "two-levels"])
@pytest.mark.parametrize("level_aux", [False, True], ids=["topk-aux", "matryoshka-aux"])
@pytest.mark.parametrize("n_dead", [0, 90], ids=["no-dead", "dead"])
def test_matryoshka_matches_sae_lens(kernels, widths, level_aux, n_dead):
    sae = make("matryoshka", matryoshka_widths=widths, use_matryoshka_aux_loss=level_aux)
    assert sae.widths[-1] == 256 and sae.widths[: len(widths)] == widths
    out, twin = assert_matches_sae_lens(sae, batch(sae.d_in), dead_mask(sae.d_sae, n_dead))
    assert {f"inner_mse_loss_{w}" for w in sae.widths[:-1]} <= set(out["losses"])
    sae.after_step(out)
    assert torch.equal(sae.topk_threshold, twin.topk_threshold)


def test_batchtopk_parity_on_a_large_batch(kernels):
    """A batch big enough for the sparse selection's sampled cut (k * B = 8192 of 512 x 1024)."""
    sae = make("batchtopk", d_in=32, d_sae=1024, k=16)
    x = batch(32, n=512, seed=5)
    out, _ = assert_matches_sae_lens(sae, x, dead_mask(1024, 50))
    assert out["l0"].item() == pytest.approx(16.0)


def test_batch_topk_selection_is_exact():
    g = torch.Generator().manual_seed(0)

    def reference(h: torch.Tensor, m: int) -> torch.Tensor:
        flat = h.relu().flatten()
        idx = flat.topk(m).indices
        return idx[flat[idx] > 0].sort().values

    for h, m in [
        (torch.randn(512, 1024, generator=g), 16 * 512),  # sampled-cut path
        (torch.randn(300, 256, generator=g), 8 * 300),  # small: no sampling
        (torch.randn(512, 1024, generator=g) - 3.0, 16 * 512),  # fewer positives than m
        (-torch.rand(64, 64, generator=g), 4 * 64),  # no positives at all
        (torch.randn(8, 5, generator=g), 40),  # m = every entry
    ]:
        rows, cols = _batch_topk_select(h, m)
        assert torch.equal(rows * h.shape[1] + cols, reference(h, m))


def test_batchtopk_without_positive_activations(kernels):
    """No positive pre-activation: empty selection, finite loss, θ left unchanged."""
    sae = make("batchtopk", d_in=16, d_sae=64, k=4)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
        sae.topk_threshold.fill_(0.5)
    out = sae.training_forward(batch(16, n=32), torch.ones(64, dtype=torch.bool))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["l0"].item() == 0 and not out["fired"].any()
    assert out["losses"]["auxiliary_reconstruction_loss"].item() > 0  # the dead latents still learn
    sae.after_step(out)
    assert float(sae.topk_threshold) == 0.5


def test_warm_up_coefficient_matches_sae_lens_scheduler():
    for warm, final in [(0, 2.0), (1, 2.0), (7, 0.3)]:
        sched = CoefficientScheduler(warm, final)
        for step in range(12):
            assert warm_up_coefficient(final, warm, step) == pytest.approx(sched.value, rel=1e-12, abs=0)
            sched.step()


SAVE_CASES = [("relu", {}), ("jumprelu", {}), ("batchtopk", {}),
              ("batchtopk", {"rescale_acts_by_decoder_norm": False}), ("matryoshka", {})]
SAVE_CASE_IDS = ["relu", "jumprelu", "batchtopk", "batchtopk-no-rescale", "matryoshka"]


# -------------------------------------------------------------------------------------- folding
@pytest.mark.parametrize("arch,kw", SAVE_CASES, ids=SAVE_CASE_IDS)
def test_fold_activation_norm_scaling_factor(arch, kw):
    """Same folded weights as SAELens, and the folded SAE on raw x == the SAE on x * s, over s."""
    sae = make(arch, **kw)
    if isinstance(sae, BatchTopKSAE):
        with torch.no_grad():
            sae.topk_threshold.fill_(0.4)
    twin = twin_of(sae)
    x = batch(sae.d_in, seed=6) * 7
    s = 0.37
    with torch.no_grad():
        scaled_out, scaled_l0 = sae(x * s) / s, (sae.encode(x * s) > 0).sum()
        sae.fold_activation_norm_scaling_factor(s)
        twin.fold_activation_norm_scaling_factor(s)
        for name, t in twin.state_dict().items():
            torch.testing.assert_close(getattr(sae, name).to(t.dtype), t, rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(sae(x), scaled_out, rtol=1e-4, atol=1e-4)
        assert (sae.encode(x) > 0).sum() == scaled_l0  # same latents fire (threshold folded right)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk", "matryoshka"])
def test_fold_W_dec_norm(arch):
    sae = make(arch)
    if isinstance(sae, BatchTopKSAE):
        with torch.no_grad():
            sae.topk_threshold.fill_(0.4)
    twin = twin_of(sae)
    x = batch(sae.d_in, seed=5)
    with torch.no_grad():
        before, active = sae(x), sae.encode(x) > 0
        sae.fold_W_dec_norm()
        twin.fold_W_dec_norm()
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(sae.d_sae))
        for name, t in twin.state_dict().items():
            torch.testing.assert_close(getattr(sae, name).to(t.dtype), t, rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(sae(x), before, rtol=1e-4, atol=1e-4)
        assert torch.equal(sae.encode(x) > 0, active)
    if arch == "batchtopk":
        with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm"):
            make(arch, rescale_acts_by_decoder_norm=False).fold_W_dec_norm()


# --------------------------------------------------------------------------------- disk format
SAVED_AS = {"relu": ("standard", SLStandardSAE), "jumprelu": ("jumprelu", SLJumpReLUSAE),
            "batchtopk": ("jumprelu", SLJumpReLUSAE), "matryoshka": ("jumprelu", SLJumpReLUSAE)}
TRAINING_ARCH = {"relu": "standard", "jumprelu": "jumprelu", "batchtopk": "batchtopk",
                 "matryoshka": "matryoshka_batchtopk"}


def _with_threshold(arch: str, **kw: Any) -> BaseSAE:
    sae = make(arch, **kw)
    if isinstance(sae, BatchTopKSAE):
        with torch.no_grad():  # about the median positive pre-activation: the threshold matters
            sae.topk_threshold.fill_(0.6)
    return sae


@pytest.mark.parametrize("arch,kw", SAVE_CASES, ids=SAVE_CASE_IDS)
def test_save_loads_in_sae_lens_and_round_trips(tmp_path, arch, kw):
    sae = _with_threshold(arch, **kw)
    reference = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    save_sae(sae, tmp_path, {"model_name": "tiny-random", "hook_name": "blocks.1.hook_resid_post"})
    cfg = json.loads((tmp_path / SAE_CFG_FILENAME).read_text())
    saved_arch, sl_cls = SAVED_AS[arch]
    assert cfg["architecture"] == saved_arch and cfg["d_sae"] == sae.d_sae
    assert cfg["metadata"]["training_architecture"] == TRAINING_ARCH[arch]
    names = set(load_file(str(tmp_path / SAE_WEIGHTS_FILENAME)))
    assert names == {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if saved_arch == "jumprelu" else set())

    x = batch(sae.d_in, n=200, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sl = SLSAE.load_from_disk(str(tmp_path))
    assert type(sl) is sl_cls and sl.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    with torch.no_grad():
        ours_out, ours_lat = sae(x), sae.encode(x)
        assert 0 < (ours_lat > 0).float().mean() < 0.9  # a non-trivial sparsity pattern
        torch.testing.assert_close(sl(x), ours_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sl.encode(x), ours_lat, rtol=1e-5, atol=1e-5)
        loaded = load_sae(tmp_path)
        assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
        torch.testing.assert_close(loaded(x), ours_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.encode(x), ours_lat, rtol=1e-5, atol=1e-5)
        if isinstance(sae, BatchTopKSAE):
            assert float(loaded.topk_threshold) == pytest.approx(float(sae.topk_threshold), rel=1e-7)
    for name, t in sae.state_dict().items():
        assert torch.equal(t, reference[name]), "save must not modify the SAE"


@pytest.mark.parametrize("arch,kw", SAVE_CASES, ids=SAVE_CASE_IDS)
def test_saved_tensors_equal_sae_lens_conversion(tmp_path, arch, kw):
    """Our saved weights == what SAELens' save_inference_model writes (BatchTopK -> JumpReLU folding)."""
    sae = _with_threshold(arch, **kw)
    save_sae(sae, tmp_path / "ours", {})
    twin_of(sae).save_inference_model(str(tmp_path / "sae_lens"))
    ours = load_file(str(tmp_path / "ours" / SAE_WEIGHTS_FILENAME))
    theirs = load_file(str(tmp_path / "sae_lens" / SAE_WEIGHTS_FILENAME))
    assert set(ours) == set(theirs)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7, msg=name)
    assert json.loads((tmp_path / "sae_lens" / SAE_CFG_FILENAME).read_text())["architecture"] == SAVED_AS[arch][0]


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk"])
def test_load_sae_reads_sae_lens_written(tmp_path, arch):
    """SAELens-written standard and JumpReLU SAEs (BatchTopK converted by SAELens) load as ours."""
    twin = twin_of(_with_threshold(arch))
    twin.save_inference_model(str(tmp_path))
    loaded = load_sae(tmp_path)
    assert loaded.architecture == {"relu": "relu", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sl = SLSAE.load_from_disk(str(tmp_path))
    x = batch(twin.cfg.d_in, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sl(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.encode(x), sl.encode(x), rtol=1e-5, atol=1e-5)


def test_load_sae_converts_log_threshold_and_refuses_uneven_batchtopk_threshold(tmp_path):
    sae = _with_threshold("jumprelu")
    save_sae(sae, tmp_path / "j", {})
    w = tmp_path / "j" / SAE_WEIGHTS_FILENAME
    state = load_file(str(w))
    state["log_threshold"] = state.pop("threshold").clamp(min=1e-6).log()
    save_file(state, str(w))
    torch.testing.assert_close(load_sae(tmp_path / "j").threshold.detach(), sae.threshold.detach().clamp(min=1e-6),
                               rtol=1e-5, atol=1e-7)

    save_sae(_with_threshold("batchtopk"), tmp_path / "b", {})
    w = tmp_path / "b" / SAE_WEIGHTS_FILENAME
    state = load_file(str(w))
    state["threshold"][3] += 1.0
    save_file(state, str(w))
    with pytest.raises(SAEFormatError, match="threshold differs across latents"):
        load_sae(tmp_path / "b")
    save_file({k: v for k, v in state.items() if k != "threshold"}, str(w))
    with pytest.raises(SAEFormatError, match=r"missing \['threshold'\]"):
        load_sae(tmp_path / "b")


# ----------------------------------------------------------------------------- ground truth
# 50k rows, each a positive combination of 3 of 64 random unit directions in R^32 (the TopK test's
# data); width 128, batch 256, lr 1e-2, 390 steps (~1 s each). Measured (mean / min max-cosine over
# the 64 true features, fraction >= 0.9, FVU of the saved SAE): batchtopk 0.9954 / 0.9918 / 1.0 /
# 0.074; matryoshka [32, 128] 0.9732 / 0.7886 / 0.906 / 0.095 (the 32-latent inner level must
# explain all 64 features alone, which pulls a few outer latents off the true directions);
# relu (l1 1.0) 0.9930 / 0.9816 / 1.0 / 0.093; jumprelu step (l0 1.0) 0.9957 / 0.9920 / 1.0 / 0.083;
# jumprelu tanh (l0 0.3) 0.9949 / 0.9792 / 1.0 / 0.082. The untrained SAE scores ~0.43.
RECOVERY = [
    ("batchtopk", {"k": 3}, 0.98, 0.95),
    ("matryoshka", {"k": 3, "matryoshka_widths": (32, 128)}, 0.94, 0.80),
    ("relu", {"l1_coefficient": 1.0}, 0.97, 0.95),
    ("jumprelu", {"l0_coefficient": 1.0}, 0.98, 0.95),
    ("jumprelu", {"l0_coefficient": 0.3, "jumprelu_sparsity_loss_mode": "tanh"}, 0.97, 0.95),
    # trained to the L0 of the l1 = 1 run (8) from a coefficient 20x too small (relu); the planted L0 (3) by the quadratic loss (jumprelu)
    ("relu", {"l1_coefficient": 0.05, "target_l0": 8.0}, 0.97, 0.95),
    ("jumprelu", {"l0_coefficient": 1.0, "jumprelu_sparsity_loss_mode": "quadratic", "target_l0": 3.0}, 0.97, 0.95),
    ("jumprelu", {"l0_coefficient": 1.0, "jumprelu_sparsity_loss_mode": "quadratic", "target_l0": 3.0,
                  "b_enc_init": "target_l0"}, 0.97, 0.95),
]


@pytest.mark.parametrize("arch,kw,min_mean,min_found", RECOVERY,
                         ids=["batchtopk", "matryoshka", "relu", "jumprelu-step", "jumprelu-tanh", "relu-target-l0",
                              "jumprelu-quadratic", "jumprelu-quadratic-b-enc-init"])
def test_recovers_planted_dictionary(tmp_path, arch, kw, min_mean, min_found):
    data, dictionary = planted_data(50_000, 32, 64, 3, seed=0)
    sae_cfg = SAEConfig(architecture=arch, width=128, dead_feature_window=50, **kw)
    train_cfg = TrainConfig(training_tokens=100_000, batch_size=256, lr=1e-2, seed=0, checkpoint_every=10**6,
                            log_every=50)
    summary = train_sae(sae_cfg, train_cfg, InMemoryLoader(data, 256, seed=0), 32, tmp_path, CPU)
    sae = load_sae(tmp_path)
    assert type(sae) is REGISTRY[arch] and sae.cfg == sae_cfg
    W = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
    best = (dictionary @ W.T).max(dim=1).values
    assert best.mean() >= min_mean, f"mean max cosine {best.mean():.4f}"
    assert (best >= 0.9).float().mean() >= min_found, f"only {(best >= 0.9).float().mean():.3f} of features found"
    x = data[:2048]
    with torch.no_grad():
        f = sae.encode(x)
        fvu = (sae.decode(f) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        l0 = (f > 0).float().sum(-1).mean()
    assert fvu < 0.15, f"fraction of variance unexplained {fvu:.3f}"
    assert 1.5 <= l0 <= 10, f"inference L0 {l0:.2f}"
    if sae_cfg.target_l0 is not None:  # held out from the training batches' view: within 20% of the target
        assert abs(float(l0) / sae_cfg.target_l0 - 1) <= 0.2, f"inference L0 {l0:.2f} vs target {sae_cfg.target_l0}"
    if isinstance(sae, BatchTopKSAE):
        # the saved JumpReLU threshold reproduces the trained sparsity on raw activations
        assert float(sae.topk_threshold) > 0 and summary["final"]["l0"] == pytest.approx(3.0)
        assert abs(float(l0) - 3.0) < 0.5


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("field,value", [
    ("l1_coefficient", -0.1), ("l0_coefficient", -1.0), ("pre_act_loss_coefficient", -1e-6),
    ("aux_coefficient", -1.0), ("topk_threshold_lr", -0.01), ("jumprelu_init_threshold", -0.01),
])
def test_negative_coefficients_are_refused(field, value):
    with pytest.raises(ValidationError, match=rf"{field}\n.*greater than or equal to 0"):
        SAEConfig(**{field: value})


@pytest.mark.parametrize("field,value,message", [
    ("topk_threshold_lr", 1.5, "less than or equal to 1"), ("jumprelu_bandwidth", 0.0, "greater than 0"),
    ("lp_norm", 0.0, "greater than 0"), ("l1_warm_up_steps", -1, "greater than or equal to 0"),
    ("l0_warm_up_steps", -1, "greater than or equal to 0"), ("jumprelu_sparsity_loss_mode", "cubic", "'step', 'tanh' or 'quadratic'"),
])
def test_other_out_of_range_fields_are_refused(field, value, message):
    with pytest.raises(ValidationError, match=message):
        SAEConfig(**{field: value})


@pytest.mark.parametrize("widths,message", [
    ((64, 32), r"matryoshka_widths=\[64, 32\] must be strictly increasing"),
    ((16, 16, 64), "must be strictly increasing"),
    ((16, 300), r"ends at 300, beyond width=256"),
    ((), "must not be empty"),
    ((0, 16), "must hold positive widths"),
    (None, "architecture 'matryoshka' needs sae.matryoshka_widths"),
])
def test_bad_matryoshka_widths_are_refused(widths, message):
    with pytest.raises(ValidationError, match=message):
        SAEConfig(architecture="matryoshka", width=256, matryoshka_widths=widths)
    if widths is not None and widths:
        # a config that bypassed validation is still refused by the SAE itself
        with pytest.raises(ValueError, match="strictly increasing list of positive widths"):
            build_sae(SAEConfig.model_construct(architecture="matryoshka", width=256, k=4, matryoshka_widths=widths), 8, 0)


def test_matryoshka_appends_the_outer_width():
    cfg = SAEConfig(architecture="matryoshka", width=256, matryoshka_widths=(16, 64))
    assert cfg.matryoshka_widths == (16, 64) and cfg.effective_matryoshka_widths() == (16, 64, 256)
    assert SAEConfig(architecture="matryoshka", width=256, matryoshka_widths=(16, 256)).effective_matryoshka_widths() == (16, 256)


def test_k_is_checked_only_for_k_architectures():
    for arch in ("topk", "batchtopk", "matryoshka"):
        with pytest.raises(ValidationError, match=r"k=40 exceeds width=32"):
            SAEConfig(architecture=arch, width=32, k=40, matryoshka_widths=(8,) if arch == "matryoshka" else None)
    for arch in ("relu", "jumprelu"):  # k is unused: the default k=32 must not block a narrow SAE
        build_sae(SAEConfig(architecture=arch, width=16), 8, 0)


def test_unknown_architecture_is_refused_before_training(tmp_path):
    with pytest.raises(ValidationError, match=r"unknown SAE architecture 'gated'; registered architectures: "
                                              r"batchtopk, jumprelu, matryoshka, relu, topk"):
        SAEConfig(architecture="gated")
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"sae": {"architecture": "gated"}}))
    with pytest.raises(ConfigError, match=r"sae: Value error, unknown SAE architecture 'gated'"):
        load_config(profile)
    bypass = SAEConfig.model_construct(**{**SAEConfig().model_dump(), "architecture": "gated"})
    data, _ = planted_data(512, 8, 8, 2)
    with pytest.raises(ValueError, match=r"unknown SAE architecture 'gated'.*relu"):
        train_sae(bypass, TrainConfig(training_tokens=1024, batch_size=64), InMemoryLoader(data, 64), 8,
                  tmp_path / "run", CPU)
    assert not (tmp_path / "run" / CHECKPOINT_DIR).exists()


def test_training_forward_rejects_bad_batch():
    for arch in NEW:
        kw: dict[str, Any] = {"k": 2} if arch in ("batchtopk", "matryoshka") else {}
        if arch == "matryoshka":
            kw["matryoshka_widths"] = (8,)
        sae = make(arch, d_in=8, d_sae=32, **kw)
        with pytest.raises(ValueError, match=r"training batch must be \[batch, 8\]"):
            sae.training_forward(torch.zeros(4, 9), None)
