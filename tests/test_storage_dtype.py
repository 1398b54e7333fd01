"""Activation storage dtype (``activations.dtype``): float32 / float16 / bfloat16 through every reader."""

import numpy as np
import pandas as pd
import pydantic
import pytest
import torch

from flows.pipeline import pipeline
from saeflow.config import ActivationsConfig, TrainConfig
from saeflow.saes import SAEConfig
from saeflow.store import ActivationStore, ShuffledLoader, StoreError
from saeflow.training import train_sae
from tests.helpers import tiny_config

#: Unit roundoff of each format (round to nearest): |x - cast(x)| <= u |x| for x in the normal range.
UNIT_ROUNDOFF = {"float32": 0.0, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
#: Bytes per stored activation.
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def _write(root, data, dtype, chunk=128, batch=100):
    store = ActivationStore.open_for_write(root, data.shape[1], chunk, dtype, {})
    n = data.shape[0]
    for s in range(0, n, batch):
        e = min(n, s + batch)
        store.append(data[s:e], np.arange(s, e), np.arange(s, e) % 7, np.arange(s, e) // 10, contexts_done=e // 10)
    store.finish(train_rows=n)
    return ActivationStore.open(root)


def _data(n=1000, d=16, seed=0):
    # magnitudes spread over 2^-6 .. 2^8 (all inside float16's normal range), both signs
    rng = np.random.default_rng(seed)
    return (rng.choice([-1.0, 1.0], size=(n, d)) * 2.0 ** rng.uniform(-6, 8, size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_roundtrip_error_is_within_the_format_rounding(tmp_path, dtype):
    data = _data()
    store = _write(tmp_path, data, dtype)
    assert store.dtype == dtype
    back = store.read(0, store.n_rows)
    assert back.dtype == np.float32 and back.shape == data.shape
    rel = np.abs(back - data) / np.abs(data)
    assert rel.max() <= UNIT_ROUNDOFF[dtype]
    if dtype != "float32":
        assert rel.max() > UNIT_ROUNDOFF[dtype] / 4  # really rounded to that format, not stored wider
    # iter_rows gives the same float32 rows
    np.testing.assert_array_equal(torch.cat(list(store.iter_rows(0, store.n_rows, 300))).numpy(), back)
    # and the bytes on disk are the format's (plus each chunk's 4-byte CRC32C checksum, store.CHECKSUM)
    chunks = [p for p in (tmp_path / "acts.zarr" / "acts" / "c").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in chunks) == (ITEMSIZE[dtype] * 128 * 16 + 4) * len(chunks)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_loader_and_training_steps_on_each_dtype(tmp_path, dtype):
    data = _data(n=2048, d=16, seed=1)
    store = _write(tmp_path / "store", data, dtype)
    f32 = _write(tmp_path / "f32", data, "float32")
    batches = {name: next(iter(ShuffledLoader(s, 256, seed=4, buffer_chunks=2))) for name, s in (("low", store), ("f32", f32))}
    assert batches["low"].dtype == torch.float32
    # same seed -> same rows in the same order, each within the format's rounding of the float32 value
    rel = (batches["low"] - batches["f32"]).abs() / batches["f32"].abs()
    assert rel.max() <= UNIT_ROUNDOFF[dtype]
    summary = train_sae(SAEConfig(architecture="topk", width=32, k=4, b_dec_init="zeros"),
                        TrainConfig(training_tokens=256 * 4, batch_size=256, checkpoint_every=2, log_every=2),
                        ShuffledLoader(store, 256, seed=0, buffer_chunks=2), 16, tmp_path / "sae", torch.device("cpu"))
    assert summary["steps"] == 4 and np.isfinite(summary["final"]["loss"]) and summary["final"]["l0"] > 0
    assert (tmp_path / "sae" / "sae_weights.safetensors").is_file()


def test_float16_overflow_is_refused_with_the_fix(tmp_path):
    store = ActivationStore.open_for_write(tmp_path, 4, 64, "float16", {})
    x = np.ones((3, 4), np.float32)
    x[2, 1] = 70_000.0  # beyond float16's 65504: would be stored as inf
    with pytest.raises(StoreError, match="float16.*bfloat16 or float32"):
        store.append(x, np.zeros(3), np.zeros(3), np.zeros(3), contexts_done=1)
    assert store.n_rows == 0 and store.progress()["rows"] == 0


def test_unknown_dtype_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="unsupported storage dtype 'int8'.*float32, float16, bfloat16"):
        ActivationStore.open_for_write(tmp_path, 4, 64, "int8", {})
    assert not (tmp_path / "acts.zarr").exists()
    with pytest.raises(pydantic.ValidationError, match="dtype"):
        ActivationsConfig(dtype="int8")


def test_recorded_dtype_must_match_the_array(tmp_path):
    store = _write(tmp_path, _data(n=200, d=4), "float16")
    store = ActivationStore.open_for_write(tmp_path, 4, 128, "float16", {})  # reopen r+ (progress is final)
    store.group.attrs["dtype"] = "float32"  # a hand-edited attrs would reinterpret the bytes
    with pytest.raises(StoreError, match="records dtype 'float32' but holds float16"):
        ActivationStore.open(tmp_path)


def test_float16_pipeline_end_to_end(tmp_path):
    """dtype is part of the activations fingerprint: float16 re-extracts, reuses model/corpus, and its metrics track float32's."""
    f32 = pipeline(tiny_config(), str(tmp_path))
    f16 = pipeline(tiny_config(activations__dtype="float16"), str(tmp_path))
    assert f16.refs.activations.fingerprint != f32.refs.activations.fingerprint
    assert f16.cached["model"] and f16.cached["corpus"] and not f16.cached["activations"] and not f16.cached["train"]
    store = ActivationStore.open(f16.refs.activations.path)
    assert store.dtype == "float16" and np.dtype(store.acts.dtype) == np.float16
    ref = ActivationStore.open(f32.refs.activations.path)
    x, y = ref.read(0, ref.n_rows), store.read(0, store.n_rows)
    assert np.linalg.norm(x - y) / np.linalg.norm(x) <= UNIT_ROUNDOFF["float16"]
    tables = [pd.read_parquet(f"{r.refs.results.path}/core_metrics.parquet").iloc[0] for r in (f32, f16)]
    for col in ("explained_variance", "l0", "frac_dead", "ce_loss_score"):
        assert np.isfinite(tables[1][col]), col
    assert abs(tables[1]["explained_variance"] - tables[0]["explained_variance"]) < 0.02
