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
import itertools
import json
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import default_buffer_prototype

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

    def read_into(self, start: int, end: int, out: np.ndarray) -> np.ndarray:
        """Rows [start, end) as float32 into ``out`` (float32, ``end - start`` rows; no new array for
        a float32 store: Zarr decodes into it). Returns ``out``."""
        if out.dtype != np.float32 or out.shape != (end - start, self.d_model):
            raise StoreError(f"read_into needs a float32 array of shape {(end - start, self.d_model)}, got {out.dtype} {out.shape}")
        if self.dtype != "float32":
            out[...] = self.read(start, end)
            return out
        return self.read_rows("acts", start, end, out=out)

    def read_rows(self, name: str, start: int, end: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, end) of array ``name`` as stored (decoded into ``out`` when given); a damaged
        chunk raises :class:`StoreError`."""
        try:
            if out is not None:
                self.group[name].get_basic_selection(slice(start, end), out=default_buffer_prototype().nd_buffer.from_numpy_array(out))
                return out
            return np.asarray(self.group[name][start:end])
        except Exception as exc:  # zarr raises ValueError on a checksum mismatch, others on garbage
            raise StoreError(
                f"activation store at {self.root} is corrupt: rows [{start}, {end}) of {name} do not read back ({exc}); "
                f"a chunk file under {self.root / GROUP / name} was damaged after it was written. Delete {self.root} "
                "and re-run the pipeline: the activations stage rebuilds it"
            ) from exc

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

    With ``prefetch`` (the default) the next buffer is read, decoded and permuted on a background
    thread while the current one is consumed, so disk reads overlap the caller's work (training, or
    the permutation and batching here); the batches are the same with or without it.
    """

    def __init__(self, store: ActivationStore, batch_size: int, seed: int, buffer_chunks: int = 8,
                 start: int = 0, end: int | None = None, prefetch: bool = True) -> None:
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
        self._cache: tuple[int, int, np.ndarray] | None = None  # (epoch, buffer index, rows)
        self._plan_cache: tuple[int, list[list[int]], list[int]] | None = None  # (epoch, buffers, cumulative ends)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saeflow-loader") if prefetch else None
        self._ahead: tuple[int, int, Future[np.ndarray]] | None = None  # (epoch, buffer index, rows being read)
        self._raw = np.empty((0, self.d_in), np.float32)  # see _load: allocated once, on the first read
        self._slots: list[np.ndarray] = []
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

    def _load(self, epoch: int, b: int, blocks: list[int], slot: int) -> np.ndarray:
        """Buffer ``b`` of ``epoch`` (made of ``blocks``): its rows read and permuted into buffer slot
        ``slot``. A pure function of its arguments but for the slot it fills; one runs at a time.

        The loader reuses its three arrays (the rows as read, and two slots of permuted rows: the
        current buffer and the one read ahead) instead of allocating ~100 MB per buffer: fresh large
        allocations are page-faulted again each time and, with the page cache full of a store larger
        than RAM, each fault made the kernel compact memory (system time that grew with the store)."""
        if not self._slots:
            size = min(self.buffer_chunks, len(self._blocks)) * self.store.chunk_rows
            self._raw = np.empty((size, self.d_in), np.float32)
            self._slots = [np.empty((size, self.d_in), np.float32) for _ in range(2)]
        n = 0
        for i in blocks:
            s, e = self._blocks[i]
            self.store.read_into(s, e, self._raw[n:n + e - s])
            n += e - s
        perm = np.random.default_rng([self.seed, epoch, b + 1]).permutation(n)
        return np.take(self._raw[:n], perm, axis=0, out=self._slots[slot][:n])

    def _buffer(self, epoch: int, b: int, plan: list[list[int]]) -> np.ndarray:
        if self._cache is not None and self._cache[:2] == (epoch, b):
            return self._cache[2]
        ahead, self._ahead = self._ahead, None
        slot = 1 - self._slot  # the current buffer's slot stays intact until this one replaces it
        if ahead is not None and ahead[:2] == (epoch, b):
            rows = ahead[2].result()  # re-raises a read error (a damaged chunk) here, in the caller
        else:
            _settle(ahead)  # (a read ahead of another buffer, after load_state_dict) its arrays are free again
            rows = self._load(epoch, b, plan[b], slot)
        self._slot, self._cache = slot, (epoch, b, rows)
        if self._pool is not None:
            nxt = (epoch, b + 1, plan[b + 1]) if b + 1 < len(plan) else (epoch + 1, 0, self._order(epoch + 1)[0])
            self._ahead = (nxt[0], nxt[1], self._pool.submit(self._load, *nxt, 1 - slot))
        return rows

    def close(self) -> None:
        """Stop the prefetch thread (it also ends when the loader is garbage-collected)."""
        if self._pool is not None:
            _settle(self._ahead)
            self._pool.shutdown(wait=True)
            self._pool, self._ahead = None, None

    def _take(self, n: int) -> np.ndarray:
        """The next ``n`` rows, copied out of the buffers into a new array."""
        out = np.empty((n, self.d_in), np.float32)
        done = 0
        while done < n:
            plan, ends = self._plan(self.epoch)
            b = bisect.bisect_right(ends, self.position)
            pos = self.position - (ends[b - 1] if b else 0)
            rows = self._buffer(self.epoch, b, plan)
            take = min(n - done, ends[b] - self.position)
            out[done:done + take] = rows[pos:pos + take]
            done += take
            self.position += take
            if self.position >= self.rows_per_epoch:
                self.epoch += 1
                self.position = 0
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield torch.from_numpy(self._take(self.batch_size))  # a new array: callers may modify it in place
