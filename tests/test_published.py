"""Published SAEs (issue #27): SAELens releases fetched through SAELens' own loaders from a hub-shaped
server on 127.0.0.1 (tests/hub_server.py: real HTTP, real huggingface_hub downloads and range
requests), checked, cached, and evaluated beside the trained SAEs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hub_server import HubServer, using_hub, write_gemma_scope_folder
from saeflow.published import PublishedSAEError, fetch_saelens_release
from saeflow.saes import load_sae

sae_lens = pytest.importorskip("sae_lens")

GS_RELEASE, GS_ID = "gemma-scope-2-270m-pt-res-all", "layer_6_width_16k_l0_small"
GS_REPO, GS_FOLDER = "google/gemma-scope-2-270m-pt", "resid_post_all/layer_6_width_16k_l0_small"


@pytest.fixture(scope="module")
def gemma_scope_hub(tmp_path_factory):
    """A hub serving a Gemma Scope 2-layout repo: layer 6, 16k latents, d_in 640, random weights."""
    root = tmp_path_factory.mktemp("hub")
    tensors = write_gemma_scope_folder(root / GS_REPO / GS_FOLDER, d_in=640, d_sae=16384, seed=0)
    server = HubServer(root).start()
    yield server, root, tensors
    server.stop()


def test_gemma_scope_release_imports_as_saelens_loads_it(gemma_scope_hub, tmp_path):
    """SAELens' registry and gemma_3 converter fetch the SAE over HTTP; the saved folder loads as a
    saeflow JumpReLU SAE whose encode / decode equal SAELens' own on the same inputs."""
    server, root, tensors = gemma_scope_hub
    with using_hub(server.endpoint, tmp_path / "hf-cache"):
        prov = fetch_saelens_release(GS_RELEASE, GS_ID, tmp_path / "sae")
        reference = sae_lens.SAE.from_pretrained(GS_RELEASE, GS_ID, device="cpu")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["apply_b_dec_to_input"] is False and cfg["architecture"] == "jumprelu"  # kept as SAELens loaded it
    assert cfg["metadata"]["hook_name"] == "blocks.6.hook_resid_post"
    params = (root / GS_REPO / GS_FOLDER / "params.safetensors").read_bytes()
    assert prov["repo_id"] == GS_REPO and prov["folder"] == GS_FOLDER
    assert prov["hub_commit"] == server.commit(root / GS_REPO)
    assert prov["files"] == {f"{GS_FOLDER}/params.safetensors": hashlib.sha256(params).hexdigest()}

    ours = load_sae(tmp_path / "sae")
    assert ours.architecture == "jumprelu" and (ours.d_in, ours.d_sae) == (640, 16384)
    torch.testing.assert_close(ours.threshold.detach(), tensors["threshold"], rtol=0, atol=0)  # thresholds exact
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 640, generator=g) * 2.0
    with torch.no_grad():
        f_ours, f_ref = ours.encode(x), reference.encode(x)
        assert (f_ref > 0).float().mean() > 0.01  # the check is not vacuous: latents fire
        # b_dec folded into b_enc (apply_b_dec_to_input=false): float32 rounding only, stated bound 1e-4.
        # A latent may fire on one side only where its exact (float64) pre-activation lies within that
        # rounding of its threshold (173 of the 4.2M entries here; which of them flip depends on the
        # CPU's float32 kernels: 1 on an Intel Xeon here, none on an AMD EPYC)
        exact = x.double() @ tensors["w_enc"].double() + tensors["b_enc"].double()
        near = (exact - tensors["threshold"].double()).abs() < 1e-4
        differ = (f_ours > 0) != (f_ref > 0)
        assert not (differ & ~near).any() and near.float().mean() < 1e-4, (int(differ.sum()), int(near.sum()))
        both = (f_ours > 0) & (f_ref > 0)
        assert float((f_ours - f_ref)[both].abs().max()) < 1e-4
        torch.testing.assert_close(ours.decode(f_ref), reference.decode(f_ref), rtol=0, atol=1e-5)


def test_offline_with_an_empty_cache_names_the_release_and_the_ways_out(gemma_scope_hub, tmp_path):
    server, _, _ = gemma_scope_hub
    with using_hub(server.endpoint, tmp_path / "empty-cache", offline=True):
        with pytest.raises(PublishedSAEError) as err:
            fetch_saelens_release(GS_RELEASE, GS_ID, tmp_path / "sae")
    msg = str(err.value)
    assert GS_RELEASE in msg and GS_ID in msg and "HF_HUB_OFFLINE" in msg
    assert "run once with internet" in msg and "{path: FOLDER}" in msg
    assert not (tmp_path / "sae").exists()


def test_unreachable_hub_is_the_same_clear_error(tmp_path):
    with using_hub("http://127.0.0.1:9", tmp_path / "cache"):  # port 9 (discard): nothing listens
        with pytest.raises(PublishedSAEError, match="no connection to http://127.0.0.1:9.*run once with internet"):
            fetch_saelens_release(GS_RELEASE, GS_ID, tmp_path / "sae")


def test_unknown_id_is_refused_with_saelens_reason(tmp_path):
    with pytest.raises(PublishedSAEError, match="layer_99_width_16k_l0_small"):
        fetch_saelens_release(GS_RELEASE, "layer_99_width_16k_l0_small", tmp_path / "sae")


# ------------------------------------------------------------------ the pipeline: tiny model, hub repo in SAELens layout
TINY_REPO = "saeflow-test/tiny-saes"


def _tiny_hub_repo(root: Path, folder: str, hook: str, model_name: str, seed: int) -> None:
    """A SAELens-written JumpReLU SAE (apply_b_dec_to_input=false, as Gemma Scope) in a hub repo."""
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=64, d_sae=96, dtype="float32", device="cpu", apply_b_dec_to_input=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(64, 96, generator=g) * 0.3)
        sae.W_dec.copy_(torch.randn(96, 64, generator=g) * 0.1)
        sae.b_enc.copy_(torch.randn(96, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(64, generator=g) * 0.1)
        sae.threshold.copy_(torch.rand(96, generator=g) * 0.2)
    out = root / TINY_REPO / folder
    sae.save_model(out)
    cfg = json.loads((out / "cfg.json").read_text())
    cfg.setdefault("metadata", {}).update({"hook_name": hook, "model_name": model_name})
    (out / "cfg.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-hub")
    _tiny_hub_repo(root, "l1/jumprelu_96", "blocks.1.hook_resid_post", "tiny-random", seed=0)
    _tiny_hub_repo(root, "l0/jumprelu_96", "blocks.0.hook_resid_post", "tiny-random", seed=1)
    _tiny_hub_repo(root, "other-model/jumprelu_96", "blocks.1.hook_resid_post", "google/gemma-3-270m", seed=2)
    server = HubServer(root).start()
    yield server
    server.stop()


def test_a_release_is_imported_once_and_evaluated_beside_the_family(tiny_hub, tmp_path):
    from flows.pipeline import pipeline
    from helpers import tiny_config

    entry = {"release": TINY_REPO, "id": "l1/jumprelu_96"}
    cfg = tiny_config(import_saes=[entry])
    root = tmp_path / "artifacts"
    with using_hub(tiny_hub.endpoint, tmp_path / "hf-cache"):
        res = pipeline(cfg, str(root))
    assert len(res.refs.imported) == 1
    table = pd.read_parquet(Path(res.refs.results.path) / "core_metrics.parquet").set_index("sae")
    name = f"{TINY_REPO}/l1/jumprelu_96"
    assert bool(table.loc[name, "published"]) and not table.drop(index=name)["published"].any()
    assert np.isfinite(table.loc[name, "explained_variance"])
    from saeflow.report_card import card_markdown, label_name, report_card

    card = card_markdown(report_card(table.reset_index()))
    assert f"| {name} (published) |" in card and card.count("(published)") == 1
    assert label_name(f"#1 {name}") == name  # evaluation labels of a named import map to its table name
    saved = json.loads((Path(res.refs.imported[0].path) / "cfg.json").read_text())
    source = saved["metadata"]["saeflow_source"]
    assert source["release"] == TINY_REPO and source["hub_commit"] and source["label"] == name

    tiny_hub_requests = len(tiny_hub.requests)
    # a re-run with the hub unreachable reuses the imported artifact: nothing is downloaded
    with using_hub("http://127.0.0.1:9", tmp_path / "hf-cache", offline=True):
        again = pipeline(cfg, str(root))
    assert again.cached["imported"] and len(tiny_hub.requests) == tiny_hub_requests


@pytest.mark.parametrize("folder, message", [
    ("l0/jumprelu_96", "trained on hook blocks.0.hook_resid_post but the activations are from blocks.1.hook_resid_post"),
    ("other-model/jumprelu_96", "trained on model 'google/gemma-3-270m' but this profile's model is 'tiny-random'"),
])
def test_a_release_of_another_hook_or_model_is_refused_and_writes_nothing(tiny_hub, tmp_path, folder, message):
    from flows.pipeline import pipeline
    from helpers import tiny_config

    root = tmp_path / "artifacts"
    with using_hub(tiny_hub.endpoint, tmp_path / "hf-cache"):
        with pytest.raises(Exception, match=message):
            pipeline(tiny_config(import_saes=[{"release": TINY_REPO, "id": folder}]), str(root))
    assert not (root / "imported").exists() or not any((root / "imported").iterdir())


def test_gemma_scope_2_profile_names_real_releases_at_its_hook():
    """configs/gemma-scope-2.yaml: every import is a SAELens registry entry of layer 12's residual
    stream (the profile's hook), and its stitching pairs join equal-L0 SAEs of growing width."""
    from saeflow.config import load_config
    from saeflow.published import hub_location

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "gemma-scope-2.yaml")
    assert cfg.activations.hook == "blocks.12.hook_resid_post" and len(cfg.import_saes) == 7
    widths = {"16k": 16384, "65k": 65536, "262k": 262144}
    sizes = [w.width for w in cfg.sae_configs()]
    for entry in cfg.import_saes:
        repo, folder = hub_location(entry.release, entry.id)
        assert repo == "google/gemma-scope-2-270m-pt" and folder.startswith("resid_post/layer_12_"), folder
        sizes.append(widths[entry.id.split("_width_")[1].split("_")[0]])
    l0 = [None] * 3 + [e.id.rsplit("_l0_", 1)[1] for e in cfg.import_saes]
    for s, l in cfg.stitching.pairs:
        assert sizes[s] < sizes[l] and l0[s] == l0[l], (s, l)
