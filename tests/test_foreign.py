"""Checkpoints of other SAE libraries (issue #27): converted once into the SAELens layout and checked
against the library's own loader on files the library itself saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saeflow.saes import SAEFormatError, load_sae
from saeflow.saes.foreign import convert_sparsify, hook_from_module_name

sparsify = pytest.importorskip("sparsify")


def _sparsify_sae(d_in: int = 32, n: int = 96, k: int = 6, seed: int = 0):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=n, k=k), device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.randn(n, d_in, generator=g) * 0.3)
        sae.encoder.bias.copy_(torch.randn(n, generator=g) * 0.1)
        sae.W_dec.copy_(torch.randn(n, d_in, generator=g) * 0.2)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
    return sae


def _dense(top_acts: torch.Tensor, top_idx: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(top_acts.shape[0], n).scatter_(-1, top_idx, top_acts)


def test_sparsify_checkpoint_converts_to_the_same_latents_and_reconstruction(tmp_path):
    """A folder written by sparsify's own ``save_to_disk`` (and its run's config.json one folder up)
    converts into a SAELens topk folder whose encode / decode equal sparsify's ``load_from_disk``
    model, and which SAELens' own loader reads to the same numbers."""
    from sparsify import SparseCoder

    run = tmp_path / "run"
    _sparsify_sae().save_to_disk(run / "layers.3")
    (run / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    cfg = convert_sparsify(run / "layers.3", tmp_path / "converted")
    assert cfg["architecture"] == "topk" and cfg["k"] == 6 and (cfg["d_in"], cfg["d_sae"]) == (32, 96)
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

    theirs = SparseCoder.load_from_disk(run / "layers.3")
    ours = load_sae(tmp_path / "converted")
    x = torch.randn(200, 32, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        out = theirs.encode(x)
        f_theirs = _dense(out.top_acts, out.top_indices, 96)
        f_ours = ours.encode(x)
        assert (f_theirs > 0).float().mean() > 0.03
        torch.testing.assert_close(f_ours, f_theirs, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.decode(f_ours), theirs.decode(out.top_acts, out.top_indices), rtol=0, atol=1e-5)
        sae_lens = pytest.importorskip("sae_lens")
        sl = sae_lens.SAE.load_from_disk(str(tmp_path / "converted"))
        torch.testing.assert_close(sl.encode(x), f_theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, hook", [("layers.6", "blocks.6.hook_resid_post"), ("model.layers.12", "blocks.12.hook_resid_post"),
                                        ("gpt_neox.layers.0", "blocks.0.hook_resid_post"), ("transformer.h.3", "blocks.3.hook_resid_post"),
                                        ("layers.6.mlp", None), ("embed_tokens", None)])
def test_hook_from_module_name(name, hook):
    assert hook_from_module_name(name) == hook


def test_sparsify_without_a_readable_hook_or_with_bad_shapes_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _sparsify_sae().save_to_disk(tmp_path / "my_sae")
    with pytest.raises(SAEFormatError, match="cannot tell which hook.*hook: blocks.N.hook_resid_post"):
        convert_sparsify(tmp_path / "my_sae", tmp_path / "out")
    assert convert_sparsify(tmp_path / "my_sae", tmp_path / "out", hook="blocks.1.hook_resid_post")["d_sae"] == 96

    cfg = json.loads((tmp_path / "my_sae" / "cfg.json").read_text())
    (tmp_path / "my_sae" / "cfg.json").write_text(json.dumps({**cfg, "num_latents": 1 << 30}))
    with pytest.raises(SAEFormatError, match="declares 1073741824 latents"):
        convert_sparsify(tmp_path / "my_sae", tmp_path / "out2", hook="blocks.1.hook_resid_post")
    (tmp_path / "my_sae" / "cfg.json").write_text(json.dumps({**cfg, "num_latents": 128}))
    with pytest.raises(SAEFormatError, match=r"encoder.weight has shape \(96, 32\), the config says \(128, 32\)"):
        convert_sparsify(tmp_path / "my_sae", tmp_path / "out3", hook="blocks.1.hook_resid_post")
    (tmp_path / "my_sae" / "cfg.json").write_text(json.dumps({**cfg, "transcode": True}))
    with pytest.raises(SAEFormatError, match="transcoder"):
        convert_sparsify(tmp_path / "my_sae", tmp_path / "out4", hook="blocks.1.hook_resid_post")
    (tmp_path / "my_sae" / "cfg.json").write_text(json.dumps(cfg))
    t = load_file(str(tmp_path / "my_sae" / "sae.safetensors"))
    t["b_dec"][0] = float("nan")
    save_file(t, str(tmp_path / "my_sae" / "sae.safetensors"))
    with pytest.raises(SAEFormatError, match="b_dec holds NaN"):
        convert_sparsify(tmp_path / "my_sae", tmp_path / "out5", hook="blocks.1.hook_resid_post")
    assert not any((tmp_path / n).exists() for n in ("out2", "out3", "out4", "out5"))


def test_a_sparsify_checkpoint_is_evaluated_beside_the_family(tmp_path):
    """The pipeline imports a sparsify folder (format: sparsify), keyed by its content."""
    import pandas as pd

    from flows.pipeline import pipeline
    from helpers import tiny_config

    _sparsify_sae(d_in=64, n=96, k=8).save_to_disk(tmp_path / "run" / "layers.1")
    entry = {"path": str(tmp_path / "run" / "layers.1"), "format": "sparsify", "name": "sparsify-topk-96"}
    res = pipeline(tiny_config(import_saes=[entry]), str(tmp_path / "artifacts"))
    table = pd.read_parquet(Path(res.refs.results.path) / "core_metrics.parquet").set_index("sae")
    row = table.loc["sparsify-topk-96"]
    assert row["architecture"] == "topk" and row["k"] == 8 and row["l0"] <= 8 and not row["published"]
    saved = json.loads((Path(res.refs.imported[0].path) / "cfg.json").read_text())
    assert saved["metadata"]["converted_from"]["format"] == "sparsify"
    assert set(saved["metadata"]["saeflow_source"]["sha256"]) == {"cfg.json", "sae.safetensors"}


# ------------------------------------------------------------------ dictionary_learning (fixtures the package saved)
DL_DATA = Path(__file__).resolve().parent / "data" / "dictionary_learning"
DL_CLASSES = {"AutoEncoder": "standard", "AutoEncoderTopK": "topk", "BatchTopKSAE": "jumprelu",
              "MatryoshkaBatchTopKSAE": "jumprelu", "JumpReluAutoEncoder": "jumprelu"}


@pytest.mark.parametrize("cls", sorted(DL_CLASSES))
def test_dictionary_learning_checkpoints_convert_to_what_the_package_computes(cls, tmp_path):
    """tests/data/dictionary_learning/<class>: ae.pt + config.json written by dictionary_learning's
    own trainSAE, and what its own load_dictionary / encode / decode returned (README there). The
    converted SAELens folder gives the same latents and reconstruction, in saeflow and in SAELens."""
    from safetensors.torch import load_file

    from saeflow.saes.foreign import convert_dictionary_learning

    cfg = convert_dictionary_learning(DL_DATA / cls, tmp_path / "sae")
    assert cfg["architecture"] == DL_CLASSES[cls] and (cfg["d_in"], cfg["d_sae"]) == (16, 48)
    assert cfg["metadata"]["hook_name"] == "blocks.6.hook_resid_post" and cfg["metadata"]["model_name"] == "google/gemma-3-270m"
    expected = load_file(str(DL_DATA / cls / "expected.safetensors"))
    x, f, x_hat = expected["x"], expected["f"], expected["x_hat"]
    assert 0 < (f > 0).float().mean() < 1
    ours = load_sae(tmp_path / "sae")
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), f, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.decode(f), x_hat, rtol=0, atol=1e-5)
        sl = pytest.importorskip("sae_lens").SAE.load_from_disk(str(tmp_path / "sae"))
        torch.testing.assert_close(sl.encode(x), f, rtol=0, atol=1e-5)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    """ae.pt is untrusted: a pickle whose loading would call a function is refused (weights_only)
    and the function never runs."""
    import os
    import pickle
    import shutil

    from saeflow.saes.foreign import convert_dictionary_learning

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "crafted"
    folder.mkdir()
    shutil.copy(DL_DATA / "AutoEncoderTopK" / "config.json", folder / "config.json")
    (folder / "ae.pt").write_bytes(pickle.dumps({"b_dec": Payload()}))
    with pytest.raises(SAEFormatError, match="refused: it is not a plain tensor checkpoint"):
        convert_dictionary_learning(folder, tmp_path / "out")
    torch.save({"b_dec": torch.zeros(16), "obj": Payload()}, folder / "ae.pt")  # a zip checkpoint with an object
    with pytest.raises(SAEFormatError, match="refused"):
        convert_dictionary_learning(folder, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_dictionary_learning_shape_and_size_checks(tmp_path):
    import shutil

    from saeflow.saes.foreign import convert_dictionary_learning

    folder = tmp_path / "dl"
    shutil.copytree(DL_DATA / "AutoEncoderTopK", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["trainer"]["dict_size"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match=r"has shape \(16, 48\).*dict_size 64"):
        convert_dictionary_learning(folder, tmp_path / "out")
    cfg["trainer"]["dict_size"] = 48
    (folder / "config.json").write_text(json.dumps(cfg))
    good = (folder / "ae.pt").read_bytes()
    (folder / "ae.pt").write_bytes(good + bytes(3 << 20))  # 3 MB where the config declares ~13 kB
    with pytest.raises(SAEFormatError, match="bytes, far more than"):
        convert_dictionary_learning(folder, tmp_path / "out")
    (folder / "ae.pt").write_bytes(good)
    cfg["trainer"]["submodule_name"] = "some.module"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="cannot tell which hook"):
        convert_dictionary_learning(folder, tmp_path / "out")
    assert convert_dictionary_learning(folder, tmp_path / "out", hook="blocks.6.hook_resid_post")["d_sae"] == 48
