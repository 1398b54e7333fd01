"""saeflow.saes: registry, SAELens parity of the TopK training forward, folding, disk format."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from saeflow.saes import (
    REGISTRY,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    BaseSAE,
    SAEConfig,
    SAEFormatError,
    TopKSAE,
    build_sae,
    load_sae,
    save_sae,
)

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import SAE as SLSAE  # noqa: E402
from sae_lens.saes.sae import TrainStepInput  # noqa: E402
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402

NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread, kernels: conftest.py


def _perturbed_sae(d_in=48, d_sae=256, k=8, seed=1, rescale=True) -> TopKSAE:
    """An SAE with non-trivial biases and unequal decoder norms (so rescaling matters)."""
    sae = build_sae(SAEConfig(width=d_sae, k=k, rescale_acts_by_decoder_norm=rescale), d_in, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
        sae.W_dec.mul_(torch.rand(d_sae, 1, generator=g) * 3 + 0.2)
        sae.W_enc.add_(torch.randn(d_in, d_sae, generator=g) * 0.05)
    assert isinstance(sae, TopKSAE)
    return sae


def _sae_lens_twin(sae: TopKSAE) -> TopKTrainingSAE:
    cfg = TopKTrainingSAEConfig(d_in=sae.d_in, d_sae=sae.d_sae, k=sae.k,
                                rescale_acts_by_decoder_norm=sae.rescale, aux_loss_coefficient=sae.cfg.aux_coefficient)
    twin = TopKTrainingSAE(cfg)
    twin.load_state_dict({n: getattr(sae, n).detach().clone() for n in NAMES})
    return twin


# ------------------------------------------------------------------------------------- registry
def test_registry_and_unknown_architecture():
    assert REGISTRY["topk"] is TopKSAE
    with pytest.raises(ValueError, match=r"unknown SAE architecture 'nope'.*registered architectures: .*topk"):
        build_sae(SAEConfig(architecture="nope", width=8, k=2), 4, seed=0)


def test_k_greater_than_width_is_rejected():
    with pytest.raises(ValidationError, match=r"k=10 exceeds width=5: choose k <= width"):
        SAEConfig(width=5, k=10)
    # a config that bypassed validation is still refused by the SAE itself
    with pytest.raises(ValueError, match=r"k=10 exceeds width=5"):
        build_sae(SAEConfig.model_construct(architecture="topk", width=5, k=10), 4, seed=0)


def test_registry_names_classes_and_imports():
    """Each entry's class carries its registry name; registry.py imports nothing from saeflow (no circle)."""
    import ast

    from saeflow.saes import K_ARCHITECTURES, registry

    assert list(REGISTRY) == ["topk", "batchtopk", "matryoshka", "relu", "jumprelu"]
    assert all(REGISTRY[name].architecture == name for name in REGISTRY)
    assert K_ARCHITECTURES <= set(REGISTRY) and "nope" not in REGISTRY
    tree = ast.parse(Path(registry.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.split(".")[0] == "saeflow"]


def test_configs_import_without_the_architectures():
    """saeflow.config (and the SAE configs it composes) load neither torch nor an architecture module:
    the package's names are imported on first access."""
    import subprocess
    import sys

    code = ("import sys, saeflow.config, saeflow.tables; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('saeflow.saes.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "['saeflow.saes.config', 'saeflow.saes.registry']"


def test_readme_architecture_example(tmp_path, monkeypatch):
    """The README's "Adding an SAE architecture" example: one file + one registry line, then it trains,
    saves in the SAELens layout and loads back as itself."""
    import re
    import sys

    from saeflow.config import TrainConfig
    from saeflow.training import train_sae
    from tests.test_training import InMemoryLoader, planted_data

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    module = re.search(r"```python\n# saeflow/saes/plainrelu.py\n(.*?)```", readme, re.S).group(1)
    line = re.search(r'^\s*"plainrelu": "saeflow.saes.plainrelu:PlainReLUSAE",$', readme, re.M)
    assert line is not None
    (tmp_path / "readme_plainrelu.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(REGISTRY._entries, "plainrelu", "readme_plainrelu:PlainReLUSAE")
    try:
        cfg = SAEConfig(architecture="plainrelu", width=32, l1_coefficient=0.01)
        data, _ = planted_data(512, 8, 16, 2)
        train_cfg = TrainConfig(training_tokens=64 * 20, batch_size=64, lr=1e-2, log_every=10, checkpoint_every=10)
        summary = train_sae(cfg, train_cfg, InMemoryLoader(data, 64), 8, tmp_path / "sae", torch.device("cpu"))
        assert summary["completed"] and summary["steps"] == 20
        sae = load_sae(tmp_path / "sae")
        assert type(sae) is REGISTRY["plainrelu"] and sae.cfg == cfg
        assert json.loads((tmp_path / "sae" / SAE_CFG_FILENAME).read_text())["architecture"] == "standard"
    finally:
        REGISTRY._classes.pop("plainrelu", None)
        sys.modules.pop("readme_plainrelu", None)


# ----------------------------------------------------------------------------------------- init
def test_init_matches_sae_lens_and_leaves_global_rng_alone():
    d_in, d_sae, seed = 24, 96, 7
    torch.manual_seed(123)
    before = torch.get_rng_state()
    sl_cfg = SAEConfig(width=d_sae, k=4, decoder_init_norm=0.1)  # SAELens' setting, pinned (our TopK default: 1.0)
    ours = build_sae(sl_cfg, d_in, seed=seed)
    assert torch.equal(torch.get_rng_state(), before), "init must not touch the global RNG"
    # SAELens draws kaiming-uniform from the global RNG; with the same seed the draw is the same
    torch.manual_seed(seed)
    twin = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=4))
    for n in NAMES:
        torch.testing.assert_close(getattr(ours, n), getattr(twin, n), rtol=0, atol=1e-7)
    torch.testing.assert_close(ours.W_dec.norm(dim=-1), torch.full((d_sae,), 0.1), rtol=1e-5, atol=0)
    assert torch.equal(ours.W_enc, ours.W_dec.T)
    assert not ours.b_enc.any() and not ours.b_dec.any()
    again = build_sae(sl_cfg, d_in, seed=seed)
    assert all(torch.equal(getattr(ours, n), getattr(again, n)) for n in NAMES)
    # our default for TopK: the same directions with unit-norm rows (dictionary_learning's TopK init)
    unit = build_sae(SAEConfig(width=d_sae, k=4), d_in, seed=seed)
    torch.testing.assert_close(unit.W_dec, ours.W_dec * 10, rtol=1e-6, atol=1e-7)
    assert torch.equal(unit.W_enc, unit.W_dec.T)


# --------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("n_dead", [0, 10, 90], ids=["no-dead", "few-dead", "many-dead"])
def test_training_forward_matches_sae_lens(kernels, n_dead):
    """Loss terms, latents and gradients equal SAELens' TopKTrainingSAE for the same weights/inputs.

    d_in=48 gives k_aux=24, so 10 dead latents exercise scale=10/24 and 90 the capped case.
    """
    sae = _perturbed_sae()
    twin = _sae_lens_twin(sae)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, sae.d_in, generator=g) * 2
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[torch.randperm(sae.d_sae, generator=g)[:n_dead]] = True

    ref = twin.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                    n_training_steps=0, is_logging_step=False))
    ref.loss.backward()
    out = sae.training_forward(x, dead)
    out["loss"].backward()

    torch.testing.assert_close(out["mse"], ref.losses["mse_loss"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["aux"], ref.losses["auxiliary_reconstruction_loss"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], ref.loss, rtol=1e-5, atol=1e-5)
    if n_dead == 0:
        assert out["aux"].item() == 0.0
    else:
        assert out["aux"].detach().item() > 0.0
    torch.testing.assert_close(out["feature_acts"], ref.feature_acts, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["fired"], (ref.feature_acts > 0).any(0))
    torch.testing.assert_close(out["l0"], (ref.feature_acts > 0).sum(-1).float().mean())
    for n in NAMES:
        torch.testing.assert_close(getattr(sae, n).grad, getattr(twin, n).grad, rtol=1e-4, atol=1e-5, msg=n)
    # inference forward == SAELens forward; encode == the training latents
    with torch.no_grad():
        torch.testing.assert_close(sae(x), twin(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.encode(x), out["feature_acts"], rtol=0, atol=0)


def test_aux_k_overrides_d_in_half(kernels):
    sae = _perturbed_sae()
    x = torch.randn(64, sae.d_in, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[:100] = True
    default = sae.training_forward(x, dead)["aux"].detach().item()
    sae.cfg = sae.cfg.model_copy(update={"aux_k": 100})  # all 100 dead used, scale 1
    wide = sae.training_forward(x, dead)["aux"].detach().item()
    assert default != wide


def test_sparse_and_dense_kernels_agree(monkeypatch):
    sae = _perturbed_sae(d_in=32, d_sae=512, k=16)
    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(1))
    dead = torch.arange(512) % 3 == 0
    results = {}
    for sparse in (True, False):
        monkeypatch.setattr(TopKSAE, "sparse_kernels", sparse)
        sae.zero_grad()
        out = sae.training_forward(x, dead)
        out["loss"].backward()
        results[sparse] = (out, {n: getattr(sae, n).grad.clone() for n in NAMES})
    (a, ga), (b, gb) = results[True], results[False]
    for key in ("loss", "mse", "aux", "feature_acts", "l0"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
    for n in NAMES:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-5)


def test_sparse_encode_decode_match_dense():
    sae = _perturbed_sae()
    x = torch.randn(50, sae.d_in, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        vals, idx = sae.encode_sparse(x)
        dense = torch.zeros(50, sae.d_sae).scatter_(1, idx, vals)
        torch.testing.assert_close(dense, sae.encode(x))
        torch.testing.assert_close(sae.decode_sparse(vals, idx), sae(x), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------- folding
def test_fold_activation_norm_scaling_factor():
    sae = _perturbed_sae()
    x = torch.randn(40, sae.d_in, generator=torch.Generator().manual_seed(4)) * 7
    s = 0.37
    with torch.no_grad():
        scaled_out = sae(x * s) / s
        scaled_latents = sae.encode(x * s)
        sae.fold_activation_norm_scaling_factor(s)
        torch.testing.assert_close(sae(x), scaled_out, rtol=1e-5, atol=1e-5)
        # same latents up to the factor (the top-k selection is unchanged)
        torch.testing.assert_close(sae.encode(x) * s, scaled_latents, rtol=1e-5, atol=1e-5)


def test_fold_W_dec_norm_preserves_outputs():
    sae = _perturbed_sae()
    x = torch.randn(40, sae.d_in, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before, latents = sae(x), sae.encode(x)
        sae.fold_W_dec_norm()
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(sae.d_sae))
        torch.testing.assert_close(sae(x), before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.encode(x), latents, rtol=1e-5, atol=1e-5)
    no_rescale = _perturbed_sae(rescale=False)
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm"):
        no_rescale.fold_W_dec_norm()


# --------------------------------------------------------------------------------- disk format
@pytest.mark.parametrize("rescale", [True, False])
def test_save_loads_in_sae_lens_and_round_trips(tmp_path, rescale):
    sae = _perturbed_sae(rescale=rescale)
    save_sae(sae, tmp_path, {"model_name": "tiny-random", "hook_name": "blocks.1.hook_resid_post", "context_size": 16})
    cfg = json.loads((tmp_path / SAE_CFG_FILENAME).read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == sae.k and cfg["d_sae"] == sae.d_sae
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert set(load_file(str(tmp_path / SAE_WEIGHTS_FILENAME))) == set(NAMES)

    x = torch.randn(64, sae.d_in, generator=torch.Generator().manual_seed(6)) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sl = SLSAE.load_from_disk(str(tmp_path))
    assert sl.cfg.metadata.model_name == "tiny-random" and sl.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert sl.cfg.k == sae.k
    with torch.no_grad():
        ours_out, ours_lat = sae(x), sae.encode(x)
        torch.testing.assert_close(sl(x), ours_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sl.encode(x), ours_lat, rtol=1e-5, atol=1e-5)
        loaded = load_sae(tmp_path)
        assert isinstance(loaded, TopKSAE) and loaded.cfg == sae.cfg
        torch.testing.assert_close(loaded(x), ours_out, rtol=1e-5, atol=1e-5)
        for n, t in sae.inference_tensors().items():
            assert torch.equal(getattr(loaded, n), t)
        if rescale:
            torch.testing.assert_close(loaded.W_dec.norm(dim=-1), torch.ones(sae.d_sae))
    assert torch.equal(sae.W_dec, _perturbed_sae(rescale=rescale).W_dec), "save must not modify the SAE"


def test_load_sae_reads_sae_lens_written_topk(tmp_path):
    twin = _sae_lens_twin(_perturbed_sae())
    twin.save_inference_model(str(tmp_path))
    loaded = load_sae(tmp_path)
    x = torch.randn(32, twin.cfg.d_in, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), twin(x), rtol=1e-5, atol=1e-5)


def test_load_sae_errors(tmp_path):
    with pytest.raises(SAEFormatError, match="does not exist"):
        load_sae(tmp_path / "missing")
    sae = _perturbed_sae()
    d = tmp_path / "sae"
    save_sae(sae, d, {})
    w = d / SAE_WEIGHTS_FILENAME
    good = w.read_bytes()

    w.unlink()
    with pytest.raises(SAEFormatError, match="no sae_weights.safetensors"):
        load_sae(d)
    w.write_bytes(good[: len(good) // 2])
    with pytest.raises(SAEFormatError, match="unreadable or corrupt"):
        load_sae(d)
    w.write_bytes(good)

    state = load_file(str(w))
    save_file({**state, "W_dec": state["W_dec"][:, :-1].contiguous()}, str(w))
    with pytest.raises(SAEFormatError, match=r"W_dec has shape \(256, 47\)"):
        load_sae(d)
    save_file({k: v for k, v in state.items() if k != "b_enc"}, str(w))
    with pytest.raises(SAEFormatError, match="missing"):
        load_sae(d)
    w.write_bytes(good)

    c = d / SAE_CFG_FILENAME
    cfg_text = c.read_text()
    c.write_text(cfg_text[:40])
    with pytest.raises(SAEFormatError, match="not valid JSON"):
        load_sae(d)
    c.write_text(json.dumps({**json.loads(cfg_text), "architecture": "gated"}))
    with pytest.raises(SAEFormatError, match="architecture 'gated' is not supported"):
        load_sae(d)
    c.write_text(cfg_text)
    assert isinstance(load_sae(d), BaseSAE)


def test_save_rejects_non_json_extra(tmp_path):
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_sae(_perturbed_sae(), tmp_path, {"bad": object()})
