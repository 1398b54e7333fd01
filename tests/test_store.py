import json

import numpy as np
import pytest
import torch

from saeflow.store import ActivationStore, ShuffledLoader, StoreError, aligned_empty


def _fill(root, n=1000, d=8, chunk=128, batch=100, dtype="float32", finish=True):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(n, d)).astype(np.float32)
    store = ActivationStore.open_for_write(root, d, chunk, dtype, {"hook": "blocks.0.hook_resid_post"})
    for s in range(0, n, batch):
        e = min(n, s + batch)
        store.append(data[s:e], np.arange(s, e), np.arange(s, e) % 7, np.arange(s, e) // 10, contexts_done=e // 10)
    if finish:
        store.finish(train_rows=800)
    return data, store


def test_roundtrip_and_attrs(tmp_path):
    data, _ = _fill(tmp_path)
    store = ActivationStore.open(tmp_path)
    assert store.n_rows == 1000 and store.d_model == 8 and store.train_rows == 800
    np.testing.assert_array_equal(store.read(0, 1000), data)
    np.testing.assert_array_equal(store.read_rows("token_ids", 10, 20), np.arange(10, 20))
    assert store.attrs["hook"] == "blocks.0.hook_resid_post"


def test_bfloat16_storage_roundtrips_bf16_values(tmp_path):
    data, _ = _fill(tmp_path, dtype="bfloat16")
    store = ActivationStore.open(tmp_path)
    expect = torch.from_numpy(data).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(store.read(0, 1000), expect)


def test_partial_store_refuses_to_open_and_resumes(tmp_path):
    data, store = _fill(tmp_path, n=500, finish=False)
    with pytest.raises(StoreError, match="partial"):
        ActivationStore.open(tmp_path)
    # simulate a kill after resize+write but before the progress file was updated
    store.acts.resize((650, 8))
    store.acts[500:650] = np.ones((150, 8), np.float32)
    reopened = ActivationStore.open_for_write(tmp_path, 8, 128, "float32", {})
    assert reopened.n_rows == 500 and reopened.progress() == {"rows": 500, "contexts": 50}
    np.testing.assert_array_equal(reopened.read(0, 500), data)


def test_truncated_or_modified_store_is_detected(tmp_path):
    _fill(tmp_path)
    chunk_files = sorted((tmp_path / "acts.zarr" / "acts" / "c").rglob("*"))
    chunk_files = [p for p in chunk_files if p.is_file()]
    chunk_files[-1].unlink()
    with pytest.raises(StoreError, match="missing 1 of 8 chunks"):
        ActivationStore.open(tmp_path)


def test_wrong_row_count_is_detected(tmp_path):
    _, store = _fill(tmp_path)
    store.acts.resize((900, 8))
    with pytest.raises(StoreError, match="truncated or modified"):
        ActivationStore.open(tmp_path)


def test_nan_rows_are_refused(tmp_path):
    store = ActivationStore.open_for_write(tmp_path, 4, 64, "float32", {})
    bad = np.zeros((3, 4), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(StoreError, match="NaN/inf"):
        store.append(bad, np.zeros(3), np.zeros(3), np.zeros(3), contexts_done=1)
    assert store.n_rows == 0


def test_loader_is_a_permutation_per_epoch_and_excludes_heldout(tmp_path):
    data, _ = _fill(tmp_path)
    store = ActivationStore.open(tmp_path)
    loader = ShuffledLoader(store, batch_size=100, seed=1, buffer_chunks=2)
    it = iter(loader)
    epoch = torch.cat([next(it) for _ in range(8)]).numpy()  # 800 training rows
    assert sorted(map(tuple, epoch)) == sorted(map(tuple, data[:800]))
    assert not np.array_equal(epoch, data[:800])  # actually shuffled


def test_loader_resume_is_exact(tmp_path):
    _fill(tmp_path)
    store = ActivationStore.open(tmp_path)
    ref = ShuffledLoader(store, batch_size=96, seed=3, buffer_chunks=3)
    it = iter(ref)
    full = [next(it) for _ in range(30)]  # crosses epoch boundaries (800 rows / 96)
    a = ShuffledLoader(store, batch_size=96, seed=3, buffer_chunks=3)
    it_a = iter(a)
    for _ in range(13):
        next(it_a)
    state = json.loads(json.dumps(a.state_dict()))
    b = ShuffledLoader(store, batch_size=96, seed=3, buffer_chunks=3)
    b.load_state_dict(state)
    it_b = iter(b)
    for i in range(13, 30):
        assert torch.equal(next(it_b), full[i])


def test_loader_batches_are_copies(tmp_path):
    _fill(tmp_path)
    store = ActivationStore.open(tmp_path)
    loader = ShuffledLoader(store, batch_size=50, seed=0)
    start = loader.state_dict()
    first = next(iter(loader))
    kept = first.clone()
    first.mul_(0)  # a caller scaling its batch in place must not corrupt the loader's buffer
    loader.load_state_dict(start)
    assert torch.equal(next(iter(loader)), kept)


def test_prefetching_loader_yields_the_same_batches_as_a_plain_one(tmp_path):
    _fill(tmp_path)
    store = ActivationStore.open(tmp_path)
    plain = ShuffledLoader(store, batch_size=70, seed=5, buffer_chunks=2, prefetch=False)
    ahead = ShuffledLoader(store, batch_size=70, seed=5, buffer_chunks=2)
    it_p, it_a = iter(plain), iter(ahead)
    for _ in range(40):  # 800 training rows: 3.5 epochs, every buffer boundary and two epoch wraps
        assert torch.equal(next(it_p), next(it_a))
    assert ahead._ahead is not None  # the next buffer was being read ahead
    ahead.close()
    assert ahead._pool is None
    # after close it still works (reads in the caller), and a restored state continues exactly
    state = ahead.state_dict()
    resumed = ShuffledLoader(store, batch_size=70, seed=5, buffer_chunks=2)
    resumed.load_state_dict(state)
    it_r = iter(resumed)
    for _ in range(5):
        assert torch.equal(next(it_a), next(it_r))
        next(it_p)


def test_a_damaged_chunk_read_ahead_raises_in_the_caller(tmp_path):
    _fill(tmp_path)
    store = ActivationStore.open(tmp_path)
    loader = ShuffledLoader(store, batch_size=100, seed=0, buffer_chunks=1)
    it = iter(loader)
    next(it)  # buffer 0 read; buffer 1 is being read ahead
    blocks = loader._plan(0)[0]
    damaged = blocks[2][0]  # a chunk neither of them holds, read two buffers later
    chunk = tmp_path / "acts.zarr" / "acts" / "c" / str(damaged) / "0"
    raw = bytearray(chunk.read_bytes())
    raw[10] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="is corrupt"):
        for _ in range(10):
            next(it)


@pytest.mark.parametrize("direct", [False, True])
def test_whole_chunks_read_from_their_files_match_zarr(tmp_path, direct):
    data, _ = _fill(tmp_path)  # 1000 rows, chunks of 128 rows x 8 floats: one 4 KiB page each
    store = ActivationStore.open(tmp_path)
    assert store.plain_chunk_files()
    for out in (aligned_empty(128, 8), np.empty((128, 8), np.float32)):  # O_DIRECT needs the aligned one
        for i in range(1000 // 128):
            out[:] = np.nan
            assert store.read_chunk_into(i, out, direct=direct) is out
            np.testing.assert_array_equal(out, data[i * 128:(i + 1) * 128])
    with pytest.raises(StoreError, match="not a whole chunk"):  # the last chunk holds 1000 - 896 rows
        store.read_chunk_into(7, aligned_empty(128, 8), direct=direct)
    with pytest.raises(StoreError, match="contiguous float32 array of shape"):
        store.read_chunk_into(0, np.empty((128, 8), np.float64), direct=direct)


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("damage, message", [
    (lambda f: f.write_bytes(bytes([f.read_bytes()[0] ^ 1]) + f.read_bytes()[1:]), "checksum mismatch"),
    (lambda f: f.write_bytes(f.read_bytes()[:-1]), "holds 4099 bytes, not 4100"),
    (lambda f: f.write_bytes(f.read_bytes() + b"\0" * 4096), "holds 8196 bytes, not 4100"),
    (lambda f: f.unlink(), "is missing"),
])
def test_a_damaged_chunk_file_is_a_store_error(tmp_path, direct, damage, message):
    _fill(tmp_path)
    store = ActivationStore.open(tmp_path)
    damage(tmp_path / "acts.zarr" / "acts" / "c" / "3" / "0")
    out = aligned_empty(128, 8)
    with pytest.raises(StoreError, match=rf"is corrupt: rows \[384, 512\) of acts .*{message}.*Delete .* re-run the pipeline"):
        store.read_chunk_into(3, out, direct=direct)
    store.read_chunk_into(2, out, direct=direct)  # the others still read


def test_a_filesystem_without_o_direct_is_read_through_the_cache(tmp_path, monkeypatch):
    import errno
    import os

    data, _ = _fill(tmp_path)
    store = ActivationStore.open(tmp_path)
    real_open, flags = os.open, []

    def refuse_direct(path, flag, *a, **k):  # what tmpfs (before Linux 6.6) answers to O_DIRECT
        flags.append(flag)
        if flag & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flag, *a, **k)

    monkeypatch.setattr(os, "open", refuse_direct)
    out = aligned_empty(128, 8)
    store.read_chunk_into(1, out, direct=True)
    np.testing.assert_array_equal(out, data[128:256])
    store.read_chunk_into(2, out, direct=True)  # remembered: no second O_DIRECT attempt
    np.testing.assert_array_equal(out, data[256:384])
    assert [bool(f & os.O_DIRECT) for f in flags] == [True, False, False]


def test_stores_with_other_layouts_are_read_through_zarr(tmp_path):
    data, _ = _fill(tmp_path, dtype="bfloat16")
    store = ActivationStore.open(tmp_path)
    assert not store.plain_chunk_files()
    out = aligned_empty(128, 8)
    store.read_chunk_into(2, out, direct=True)
    np.testing.assert_array_equal(out, store.read(256, 384))


def test_direct_and_cached_loaders_yield_the_same_batches(tmp_path, monkeypatch):
    import saeflow.store as store_mod

    _fill(tmp_path, n=1100)  # 800 training rows: 6 whole chunks and a part of one
    store = ActivationStore.open(tmp_path)
    loaders = [ShuffledLoader(store, batch_size=70, seed=5, buffer_chunks=2, direct_io=True),
               ShuffledLoader(store, batch_size=70, seed=5, buffer_chunks=2, direct_io=False, prefetch=False, read_threads=1),
               ShuffledLoader(store, batch_size=70, seed=5, buffer_chunks=2, direct_io=True, read_threads=3)]
    its = [iter(ld) for ld in loaders]
    for _ in range(40):  # 3.5 epochs
        a, *others = (next(it) for it in its)
        for b in others:
            assert torch.equal(a, b)
    # the default: past the page cache only for a store larger than half the memory
    monkeypatch.setattr(store_mod, "physical_memory", lambda: 2 * 1100 * 8 * 4)
    assert not ShuffledLoader(store, 70, 0).direct_io
    monkeypatch.setattr(store_mod, "physical_memory", lambda: 2 * 1100 * 8 * 4 - 1)
    assert ShuffledLoader(store, 70, 0).direct_io
