"""The activation store: one chunked Zarr group per (model, hook, corpus).

Layout of ``<dir>/acts.zarr`` (a Zarr v3 group):

- ``acts``       ``[n_rows, d_model]`` in the storage dtype ``attrs.dtype`` (``ActivationsConfig.dtype``):
  float32, float16, or bfloat16 stored as uint16. Readers (:meth:`ActivationStore.read` and all
  built on it) always return float32.
- ``token_ids``  ``[n_rows]`` int32, the token at each row
- ``positions``  ``[n_rows]`` int32, the position of that token inside its context
- ``context``    ``[n_rows]`` int32, the index of its context in the corpus

BOS/pad/EOS positions are never stored. Rows are in corpus order; the contexts after
``attrs.train_contexts`` form the held-out evaluation rows (``attrs.train_rows`` onwards).

Every array carries a CRC32C checksum per chunk (Zarr's ``crc32c`` codec, :data:`CHECKSUM`): a
chunk damaged on disk fails to read with a :class:`StoreError` naming the store and the fix, never
gives wrong numbers. (Stores written before the checksum was added read as before, unchecked.)

Writes are resumable: ``progress.json`` beside the group (written atomically after each append)
records how many rows and contexts are durable. Re-opening for writing truncates anything beyond
it, so a killed extraction continues from the last completed append.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import json
import math
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import google_crc32c
import numpy as np
import torch
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

from saeflow.artifacts import ArtifactError, write_json_atomic

GROUP = "acts.zarr"
PROGRESS = "progress.json"
ROW_ARRAYS = ("token_ids", "positions", "context")
#: The bytes-to-bytes codecs of every array: a CRC32C checksum per chunk, no compression.
CHECKSUM = (Crc32cCodec(),)


class StoreError(ArtifactError):
    """A store that is missing, partial, corrupt or of the wrong shape."""


#: Storage dtypes: the name in ``ActivationsConfig.dtype`` -> the Zarr array dtype holding it
#: (Zarr has no bfloat16: its 16 bits are stored as uint16 and ``attrs.dtype`` says so).
STORAGE_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}
#: Largest finite float16 (activations beyond it cannot be stored as float16).
FLOAT16_MAX = float(np.finfo(np.float16).max)
#: Alignment of buffers, lengths and file offsets for O_DIRECT reads: a page suits every Linux
#: filesystem that supports them (they need the device's logical block size, at most a page).
DIRECT_ALIGN = mmap.PAGESIZE


def aligned_empty(rows: int, cols: int) -> np.ndarray:
    """A float32 ``[rows, cols]`` array at a page-aligned address (anonymous memory, zero-filled),
    so whole chunks can be read into it with O_DIRECT."""
    buf = mmap.mmap(-1, max(1, rows * cols * 4))
    return np.frombuffer(buf, np.float32, rows * cols).reshape(rows, cols)


def _read_file(path: Path, buffers: list[Any], direct: bool) -> int:
    """Read the file at ``path`` into ``buffers`` in order (one ``readv``, O_DIRECT if ``direct``);
    the number of bytes read. A regular file gives all its bytes up to the buffers' size at once."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        return os.readv(fd, buffers)
    finally:
        os.close(fd)


def physical_memory() -> int:
    """Bytes of RAM on this machine."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_dtype(dtype: str) -> str:
    if dtype not in STORAGE_DTYPES:
        raise StoreError(f"unsupported storage dtype {dtype!r}: use one of {', '.join(STORAGE_DTYPES)} (activations.dtype)")
    return dtype


def _to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` (float32 rows) in the storage representation of ``dtype`` (round to nearest even)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if _check_dtype(dtype) == "float32":
        return x
    if dtype == "float16":
        big = np.abs(x) > FLOAT16_MAX
        if big.any():
            raise StoreError(
                f"{int(big.any(axis=1).sum())} activation rows have |x| up to {float(np.abs(x).max()):.4g}, beyond "
                f"float16's largest value {FLOAT16_MAX:g}: store them as bfloat16 or float32 (activations.dtype)"
            )
        return x.astype(np.float16)
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _from_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows back as float32 (exact: every stored value is a float32)."""
    if _check_dtype(dtype) == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float32)
    return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).to(torch.float32).numpy()


@dataclass
class ActivationStore:
    """Read/append access to one store folder (the artifact folder of the activations stage)."""

    root: Path
    group: zarr.Group
    _plain: bool | None = field(default=None, init=False, repr=False, compare=False)  # see plain_chunk_files
    _direct_ok: bool = field(default=True, init=False, repr=False, compare=False)  # False: the filesystem refused O_DIRECT

    # ---------------------------------------------------------------- creation / opening
    @classmethod
    def open_for_write(cls, root: str | Path, d_model: int, chunk_rows: int, dtype: str, attrs: dict[str, Any]) -> "ActivationStore":
        """Create the store, or reopen a partial one truncated to its last durable append."""
        root = Path(root)
        path = root / GROUP
        if path.exists() and (root / PROGRESS).exists():
            group = zarr.open_group(str(path), mode="r+")
            store = cls(root, group)
            if store.d_model != d_model or group.attrs.get("dtype") != dtype:
                raise StoreError(
                    f"partial store at {path} has d_model={store.d_model}, dtype={group.attrs.get('dtype')} "
                    f"but this run writes d_model={d_model}, dtype={dtype}; delete {root} to start over"
                )
            store._truncate_to_progress()
            return store
        _check_dtype(dtype)
        group = zarr.open_group(str(path), mode="w")
        group.create_array("acts", shape=(0, d_model), chunks=(chunk_rows, d_model), dtype=STORAGE_DTYPES[dtype],
                           compressors=CHECKSUM, fill_value=0)
        for name in ROW_ARRAYS:
            group.create_array(name, shape=(0,), chunks=(chunk_rows,), dtype="int32", compressors=CHECKSUM, fill_value=-1)
        group.attrs.update({**attrs, "dtype": dtype, "d_model": d_model, "chunk_rows": chunk_rows, "complete": False})
        write_json_atomic(root / PROGRESS, {"rows": 0, "contexts": 0})
        return cls(root, group)

    @classmethod
    def open(cls, root: str | Path) -> "ActivationStore":
        """Open a finished store for reading, checking it is whole and consistent."""
        root = Path(root)
        path = root / GROUP
        if not path.exists():
            raise StoreError(f"no activation store at {path}; re-run the pipeline's activations stage")
        try:
            group = zarr.open_group(str(path), mode="r")
            store = cls(root, group)
            store.validate()
        except StoreError:
            raise
        except Exception as exc:  # zarr raises many kinds on a damaged store
            raise StoreError(f"activation store at {path} is unreadable ({exc}); delete {root} and re-run extraction") from exc
        return store

    # ---------------------------------------------------------------- properties
    @property
    def acts(self) -> zarr.Array:
        return self.group["acts"]  # type: ignore[return-value]

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_rows, d_model)``: rows stored so far, activation width."""
        n_rows, d_model = self.acts.shape
        return int(n_rows), int(d_model)

    @property
    def d_model(self) -> int:
        return self.shape[1]

    @property
    def n_rows(self) -> int:
        return self.shape[0]

    @property
    def chunk_rows(self) -> int:
        """Rows per Zarr chunk (the unit of reads and of durable progress)."""
        return int(self.acts.chunks[0])

    @property
    def dtype(self) -> str:
        return str(self.group.attrs.get("dtype", "float32"))

    @property
    def train_rows(self) -> int:
        """Rows of the training contexts (the rest are held out for evaluation)."""
        return int(self.group.attrs.get("train_rows", self.n_rows))

    def progress(self) -> dict[str, int]:
        p = self.root / PROGRESS
        return json.loads(p.read_text()) if p.exists() else {"rows": self.n_rows, "contexts": -1}

    # ---------------------------------------------------------------- writing
    def _truncate_to_progress(self) -> None:
        rows = self.progress()["rows"]
        if self.acts.shape[0] != rows:
            self.acts.resize((rows, self.d_model))
        for name in ROW_ARRAYS:
            arr = self.group[name]
            if arr.shape[0] != rows:
                arr.resize((rows,))

    def append(self, acts: np.ndarray, token_ids: np.ndarray, positions: np.ndarray, context: np.ndarray, contexts_done: int) -> None:
        """Append rows; durable (and resumable) once this returns."""
        n = acts.shape[0]
        if acts.ndim != 2 or acts.shape[1] != self.d_model:
            raise StoreError(f"append of shape {acts.shape} to a store of width {self.d_model}")
        if not np.isfinite(acts).all():
            bad = int((~np.isfinite(acts)).any(axis=1).sum())
            raise StoreError(
                f"{bad} activation rows are NaN/inf (contexts before {contexts_done}); the model produced "
                "non-finite values: run it in float32 (model.dtype) or pick another hook"
            )
        stored = _to_storage(acts, self.dtype)  # before any resize: a refused batch leaves the store as it was
        start = self.n_rows
        end = start + n
        self.acts.resize((end, self.d_model))
        self.acts[start:end] = stored
        for name, values in zip(ROW_ARRAYS, (token_ids, positions, context)):
            arr = self.group[name]
            arr.resize((end,))
            arr[start:end] = np.asarray(values, dtype=np.int32)
        write_json_atomic(self.root / PROGRESS, {"rows": end, "contexts": int(contexts_done)})

    def finish(self, **attrs: Any) -> None:
        self.group.attrs.update({**attrs, "n_rows": self.n_rows, "complete": True})

    # ---------------------------------------------------------------- reading
    def validate(self) -> None:
        attrs = self.attrs
        if not attrs.get("complete"):
            raise StoreError(f"activation store at {self.root} is partial (extraction did not finish); re-run the pipeline to resume it")
        n = self.n_rows
        if attrs.get("n_rows") != n:
            raise StoreError(
                f"activation store at {self.root} has {n} rows but recorded {attrs.get('n_rows')}: it was truncated or "
                f"modified; delete {self.root} and re-run extraction"
            )
        if attrs.get("d_model") != self.d_model:
            raise StoreError(f"activation store at {self.root} has width {self.d_model}, recorded {attrs.get('d_model')}")
        dtype = self.dtype
        if dtype not in STORAGE_DTYPES or np.dtype(self.acts.dtype) != np.dtype(STORAGE_DTYPES[dtype]):
            raise StoreError(
                f"activation store at {self.root} records dtype {dtype!r} but holds {self.acts.dtype} values "
                f"(known: {', '.join(STORAGE_DTYPES)}); delete {self.root} and re-run extraction"
            )
        for name in ROW_ARRAYS:
            if self.group[name].shape[0] != n:
                raise StoreError(f"activation store at {self.root}: array {name} has {self.group[name].shape[0]} rows, acts has {n}")
        expected = math.ceil(n / self.chunk_rows) if n else 0
        have = self.acts.nchunks_initialized
        if have != expected:
            raise StoreError(
                f"activation store at {self.root} is missing {expected - have} of {expected} chunks; "
                f"delete {self.root} and re-run extraction"
            )

    def read(self, start: int, end: int) -> np.ndarray:
        """Rows [start, end) as float32."""
        return _from_storage(self.read_rows("acts", start, end), self.dtype)

    def read_rows(self, name: str, start: int, end: int) -> np.ndarray:
        """Rows [start, end) of array ``name`` as stored; a damaged chunk raises :class:`StoreError`."""
        try:
            return np.asarray(self.group[name][start:end])
        except Exception as exc:  # zarr raises ValueError on a checksum mismatch, others on garbage
            raise self._corrupt(name, start, end, str(exc)) from exc

    def _corrupt(self, name: str, start: int, end: int, why: str) -> StoreError:
        return StoreError(
            f"activation store at {self.root} is corrupt: rows [{start}, {end}) of {name} do not read back ({why}); "
            f"a chunk file under {self.root / GROUP / name} was damaged after it was written. Delete {self.root} "
            "and re-run the pipeline: the activations stage rebuilds it"
        )

    def plain_chunk_files(self) -> bool:
        """Whether each chunk of ``acts`` is one local file of little-endian float32 values followed by
        their CRC32C (what :meth:`open_for_write` makes for a float32 store), which
        :meth:`read_chunk_into` can read itself. Stores written by other code, or before the checksum,
        are read through Zarr."""
        if self._plain is None:
            meta = self.acts.metadata
            self._plain = (
                self.dtype == "float32" and np.dtype(self.acts.dtype) == np.float32
                and isinstance(self.group.store, zarr.storage.LocalStore)
                and tuple(meta.codecs) == (BytesCodec(endian="little"), Crc32cCodec())  # type: ignore[union-attr]
                and meta.chunk_key_encoding == DefaultChunkKeyEncoding(separator="/")  # type: ignore[union-attr]
                and not getattr(meta, "storage_transformers", ())
                and len(self.acts.chunks) == 2 and self.acts.chunks[1] == self.d_model
            )
        return self._plain

    def read_chunk_into(self, index: int, out: np.ndarray, direct: bool = False) -> np.ndarray:
        """Whole chunk ``index`` of ``acts`` (``chunk_rows`` rows, all before ``n_rows``) as float32 into
        ``out``; returns ``out``.

        For a store with :meth:`plain_chunk_files` the chunk file is read straight into ``out`` (one
        ``readv``, no intermediate copy; the checksum is verified, a damaged, truncated or missing
        file raises :class:`StoreError`), otherwise it is read through Zarr (:meth:`read`). With ``direct`` the
        read bypasses the page cache (O_DIRECT) when ``out`` is page-aligned (see
        :func:`aligned_empty`) and the filesystem allows it: for a pass over a store larger than
        memory, which would only evict the page cache (and make the kernel reclaim and compact
        memory on every read) without ever reading a cached page."""
        c, d = self.chunk_rows, self.d_model
        start = index * c
        if out.dtype != np.float32 or out.shape != (c, d) or not out.flags.c_contiguous:
            raise StoreError(f"read_chunk_into needs a contiguous float32 array of shape {(c, d)}, got {out.dtype} {out.shape}")
        if index < 0 or start + c > self.n_rows:
            raise StoreError(f"chunk {index} of {self.root} is not a whole chunk of its {self.n_rows} rows")
        if not self.plain_chunk_files():
            out[...] = self.read(start, start + c)
            return out
        path = self.root / GROUP / "acts" / "c" / str(index) / "0"
        data = out.reshape(-1).view(np.uint8)
        direct = (direct and self._direct_ok and out.ctypes.data % DIRECT_ALIGN == 0
                  and data.nbytes % DIRECT_ALIGN == 0)
        trailer = mmap.mmap(-1, DIRECT_ALIGN)  # the checksum; a whole aligned block for O_DIRECT
        try:
            got = _read_file(path, [data, trailer], direct)
        except FileNotFoundError:
            raise self._corrupt("acts", start, start + c, f"chunk file {path} is missing") from None
        except OSError as exc:
            if not (direct and exc.errno == errno.EINVAL):
                raise
            self._direct_ok = False  # no O_DIRECT on this filesystem (tmpfs): read through the cache
            got = _read_file(path, [data, trailer], False)
        if got != data.nbytes + 4:  # (a longer file fills the buffers: its size says by how much)
            size = got if got < data.nbytes + 4 else path.stat().st_size
            raise self._corrupt("acts", start, start + c, f"chunk file {path} holds {size} bytes, not {data.nbytes + 4}")
        if google_crc32c.value(data) != int.from_bytes(trailer[:4], "little"):
            raise self._corrupt("acts", start, start + c, f"checksum mismatch in {path}")
        return out

    def iter_rows(self, start: int, end: int, batch_size: int) -> Iterator[torch.Tensor]:
        """Sequential float32 batches over rows [start, end)."""
        for s in range(start, end, batch_size):
            yield torch.from_numpy(self.read(s, min(end, s + batch_size)))

    def normalization_factor(self) -> float:
        """``sqrt(d_model) / mean ||x||``: the factor ``expected_average_only_in`` multiplies activations by."""
        return math.sqrt(self.d_model) / self.mean_norm()

    def mean_norm(self, n_rows: int = 65_536, end: int | None = None) -> float:
        """Mean L2 norm of the first ``n_rows`` rows (before ``end``), for activation normalisation."""
        end = self.train_rows if end is None else end
        x = self.read(0, min(end, n_rows)).astype(np.float64)
        return float(np.linalg.norm(x, axis=1).mean())


def _settle(ahead: tuple[int, int, Future[Any]] | None) -> None:
    """Cancel a read ahead, or wait for it to end if it is running (its outcome is not needed)."""
    if ahead is not None and not ahead[2].cancel():
        ahead[2].exception()


class ShuffledLoader:
    """Endless, deterministic, resumable shuffled batches over rows [start, end) of a store.

    Each epoch shuffles the order of chunks, concatenates ``buffer_chunks`` of them, and permutes
    the rows of that buffer. The epoch's row order is a pure function of (seed, epoch), so the state
    is just (epoch, position) and a restored loader yields exactly the batches an uninterrupted one
    would. A batch that runs past the end of an epoch continues into the next one.

    With ``prefetch`` (the default) the next buffer is read on a background thread while the current
    one is consumed, so disk reads overlap the caller's work (training, or the batching here); the
    batches are the same with or without it.

    Whole chunks are read from their files straight into the loader's buffer
    (:meth:`ActivationStore.read_chunk_into`), ``read_threads`` of them at once (a disk delivers more
    with several reads in flight: 1 / 2 / 3 / 4 threads gave 272-299k / 326-348k / 372-390k /
    387k rows/s of 640 floats over 8M cold rows here, O_DIRECT; docs/benchmarks.md, scaling notes). ``direct_io`` reads them past the page cache
    (O_DIRECT); ``None`` (the default) does so when the store's activations are larger than half
    this machine's memory: a pass over such a store cannot be served from the cache, only evicts it,
    and the kernel's reclaim and compaction of a full cache cost more system time per row as the
    store grows. A store that fits is read through the cache, so later epochs come from memory.
    The batches are the same either way.
    """

    def __init__(self, store: ActivationStore, batch_size: int, seed: int, buffer_chunks: int = 8,
                 start: int = 0, end: int | None = None, prefetch: bool = True,
                 direct_io: bool | None = None, read_threads: int = 4) -> None:
        self.store = store
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.buffer_chunks = int(buffer_chunks)
        self.start = int(start)
        self.end = store.train_rows if end is None else int(end)
        if self.end - self.start < 1:
            raise StoreError(f"loader over an empty row range [{self.start}, {self.end})")
        self.d_in = store.d_model
        c = store.chunk_rows
        # chunk-aligned blocks covering [start, end)
        first = (self.start // c) * c
        self._blocks = [(max(s, self.start), min(s + c, self.end)) for s in range(first, self.end, c)]
        self.epoch = 0
        self.position = 0
        self._cache: tuple[int, int, np.ndarray, np.ndarray] | None = None  # (epoch, buffer index, rows, order)
        self._plan_cache: tuple[int, list[list[int]], list[int]] | None = None  # (epoch, buffers, cumulative ends)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saeflow-loader") if prefetch else None
        self._ahead: tuple[int, int, Future[tuple[np.ndarray, np.ndarray]]] | None = None  # (epoch, buffer index, read)
        if direct_io is None:
            direct_io = store.acts.nbytes > physical_memory() // 2
        self.direct_io = bool(direct_io)
        self._slots: list[np.ndarray] = []  # see _load: allocated once, on the first read
        self._readers = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="saeflow-read") if read_threads > 1 else None
        self._slot = 0  # the slot of the current buffer

    @property
    def rows_per_epoch(self) -> int:
        return self.end - self.start

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed or state.get("batch_size", self.batch_size) != self.batch_size:
            raise StoreError("loader state was saved with another seed or batch size; delete the checkpoint to start over")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

    def _plan(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """The epoch's buffers (lists of block indices) and the cumulative row count at each buffer's end.

        Memoised for the current epoch: a batch costs O(log n_buffers) here, not O(rows in the store).
        """
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1], self._plan_cache[2]
        plan = self._order(epoch)
        ends = list(itertools.accumulate(sum(self._blocks[i][1] - self._blocks[i][0] for i in buf) for buf in plan))
        self._plan_cache = (epoch, plan, ends)
        return plan, ends

    def _order(self, epoch: int) -> list[list[int]]:
        """The epoch's buffers: its shuffled block indices, ``buffer_chunks`` per buffer."""
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self._blocks)).tolist()
        return [order[i:i + self.buffer_chunks] for i in range(0, len(order), self.buffer_chunks)]

    def _load(self, epoch: int, b: int, blocks: list[int], slot: int) -> tuple[np.ndarray, np.ndarray]:
        """Buffer ``b`` of ``epoch`` (made of ``blocks``): its rows, read into buffer slot ``slot``, and
        their order in the epoch (a permutation). A pure function of its arguments but for the slot
        it fills; one runs at a time.

        The loader keeps two slots (the current buffer and the one read ahead) for its life, page
        aligned for O_DIRECT, instead of allocating ~100 MB per buffer: fresh large allocations are
        page-faulted again each time and, with the page cache full of a store larger than RAM, each
        fault made the kernel compact memory (system time that grew with the store). Batches are
        gathered from a slot in the permuted order (one copy per row, no permuted copy of the buffer)."""
        if not self._slots:
            size = min(self.buffer_chunks, len(self._blocks)) * self.store.chunk_rows
            self._slots = [aligned_empty(size, self.d_in) for _ in range(2)]
        rows = self._slots[slot]
        n, c = 0, self.store.chunk_rows
        whole = []
        for i in blocks:
            s, e = self._blocks[i]
            if e - s == c:  # a whole chunk (blocks are chunk-aligned)
                whole.append((s // c, rows[n:n + c]))
            else:  # the part of a chunk at the loader's start or end
                rows[n:n + e - s] = self.store.read(s, e)
            n += e - s
        for _ in (self._readers.map if self._readers else map)(lambda job: self.store.read_chunk_into(*job, self.direct_io), whole):
            pass  # (map raises a read error here)
        return rows[:n], np.random.default_rng([self.seed, epoch, b + 1]).permutation(n)

    def _buffer(self, epoch: int, b: int, plan: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is not None and self._cache[:2] == (epoch, b):
            return self._cache[2:]
        ahead, self._ahead = self._ahead, None
        slot = 1 - self._slot  # the current buffer's slot stays intact until this one replaces it
        if ahead is not None and ahead[:2] == (epoch, b):
            rows, perm = ahead[2].result()  # re-raises a read error (a damaged chunk) here, in the caller
        else:
            _settle(ahead)  # (a read ahead of another buffer, after load_state_dict) its arrays are free again
            rows, perm = self._load(epoch, b, plan[b], slot)
        self._slot, self._cache = slot, (epoch, b, rows, perm)
        if self._pool is not None:
            nxt = (epoch, b + 1, plan[b + 1]) if b + 1 < len(plan) else (epoch + 1, 0, self._order(epoch + 1)[0])
            self._ahead = (nxt[0], nxt[1], self._pool.submit(self._load, *nxt, 1 - slot))
        return rows, perm

    def close(self) -> None:
        """Stop the prefetch thread and the readers (they also end when the loader is garbage-collected)."""
        if self._pool is not None:
            _settle(self._ahead)
            self._pool.shutdown(wait=True)
            self._pool, self._ahead = None, None
        if self._readers is not None:
            self._readers.shutdown(wait=True)
            self._readers = None

    def _take(self, n: int) -> np.ndarray:
        """The next ``n`` rows, copied out of the buffers into a new array."""
        out = np.empty((n, self.d_in), np.float32)
        done = 0
        while done < n:
            plan, ends = self._plan(self.epoch)
            b = bisect.bisect_right(ends, self.position)
            pos = self.position - (ends[b - 1] if b else 0)
            rows, perm = self._buffer(self.epoch, b, plan)
            take = min(n - done, ends[b] - self.position)
            # indices in range: "clip" writes straight into out ("raise", the default, goes through a temporary copy)
            np.take(rows, perm[pos:pos + take], axis=0, out=out[done:done + take], mode="clip")
            done += take
            self.position += take
            if self.position >= self.rows_per_epoch:
                self.epoch += 1
                self.position = 0
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield torch.from_numpy(self._take(self.batch_size))  # a new array: callers may modify it in place
