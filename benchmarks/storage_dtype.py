"""What the activation storage dtype costs, on real activations (the quick profile's float32 store).

Copies the store's rows into a float32, a float16 and a bfloat16 store (the real writer,
``ActivationStore.append``) in a temporary folder, then per dtype:

- the rounding error of the stored activations themselves: ``||x - cast(x)|| / ||x||`` over all rows
  (Frobenius), and the largest elementwise relative error over elements with ``|x| >= 2^-14`` (float16's
  normal range; the count of smaller elements, stored by float16 with fewer bits, is printed);
  ``max |x|`` against float16's 65504 and the count of elements beyond it (a float16 store refuses
  such rows: the copy is then reported as refused);
- disk bytes of the store, and write time (appends + fsync);
- read throughput: a sequential cold pass (files evicted from the page cache first) in chunk-sized
  reads, rows/s;
- SAE quality cost: a TopK SAE (the quick profile's smallest member by default, the profile's training
  settings, ``--train-tokens``) trained on each copy with the same seed, evaluated by
  ``reconstruction_metrics`` on the *float32* held-out rows (what the user's SAE meets).

Every ratio is against float32 measured in the same run. Run:
``nice -n 19 .venv/bin/python benchmarks/storage_dtype.py [--store <artifacts>/activations/<fp>] [--no-doc]``
(without ``--store``: the quick profile's store through the pipeline's cached stages).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import REPO, machine, write_section  # noqa: E402
from benchmarks.scaling import disk_bytes, sync_and_evict, train_on_store  # noqa: E402
from saeflow.artifacts import default_root  # noqa: E402
from saeflow.config import load_config  # noqa: E402
from saeflow.metrics import reconstruction_metrics  # noqa: E402
from saeflow.saes import load_sae  # noqa: E402
from saeflow.store import FLOAT16_MAX, ROW_ARRAYS, ActivationStore, StoreError  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16")
FLOAT16_TINY = float(np.finfo(np.float16).tiny)  # 2^-14, the smallest normal float16


def copy_store(x: np.ndarray, meta: dict[str, np.ndarray], train_rows: int, dtype: str, root: Path,
               chunk_rows: int, append_rows: int = 2048) -> float:
    """Write ``x`` (+ its row arrays) as a ``dtype`` store at ``root``; seconds incl. fsync."""
    t0 = time.perf_counter()
    store = ActivationStore.open_for_write(root, x.shape[1], chunk_rows, dtype, {"hook": "copy"})
    for s in range(0, x.shape[0], append_rows):
        e = min(x.shape[0], s + append_rows)
        store.append(x[s:e], *(meta[k][s:e] for k in ROW_ARRAYS), contexts_done=int(meta["context"][e - 1]) + 1)
    store.finish(train_rows=train_rows)
    sync_and_evict(root)
    return time.perf_counter() - t0


def cold_read(store: ActivationStore) -> float:
    """Rows/s of one sequential pass in chunk-sized reads, page cache evicted first."""
    sync_and_evict(store.root)
    t0 = time.perf_counter()
    for _ in store.iter_rows(0, store.n_rows, store.chunk_rows):
        pass
    return store.n_rows / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="a float32 activation store folder (default: the quick profile's)")
    ap.add_argument("--profile", default=str(REPO / "configs" / "quick.yaml"), help="SAE + training settings")
    ap.add_argument("--artifacts", default=str(default_root()))
    ap.add_argument("--dir", default=str(REPO.parent / "tmp-storage-dtype"), help="parent of the temporary copies")
    ap.add_argument("--train-tokens", type=int, default=None, help="default: the profile's train.training_tokens")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()

    cfg = load_config(args.profile)
    if args.store is None:
        from benchmarks.training import quick_store

        src = quick_store(Path(args.profile), args.artifacts)
    else:
        src = ActivationStore.open(args.store)
    x = src.read(0, src.n_rows)
    meta = {k: src.read_rows(k, 0, src.n_rows) for k in ROW_ARRAYS}
    held_out = torch.from_numpy(x[src.train_rows:])
    sae_cfg = min(cfg.sae_configs(), key=lambda c: (c.width, c.k))
    train_cfg = cfg.train if args.train_tokens is None else cfg.train.model_copy(update={"training_tokens": args.train_tokens})
    train_cfg = train_cfg.model_copy(update={"checkpoint_every": 10**9})
    big = int((np.abs(x) > FLOAT16_MAX).sum())
    tiny = int(((np.abs(x) < FLOAT16_TINY) & (x != 0)).sum())
    print(f"source: {src.root} ({src.n_rows:,} rows x {src.d_model}, {src.dtype}); max |x| {float(np.abs(x).max()):,.1f}, "
          f"{big} elements beyond float16's {FLOAT16_MAX:g}, {tiny} nonzero elements below 2^-14 (of {x.size:,})", flush=True)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="storage-dtype-", dir=args.dir))
    res: dict[str, dict] = {}
    try:
        for dtype in DTYPES:
            root = work / dtype
            try:
                write_s = copy_store(x, meta, src.train_rows, dtype, root, src.chunk_rows)
            except StoreError as exc:
                res[dtype] = {"refused": str(exc)}
                print(f"{dtype}: refused ({exc})", flush=True)
                shutil.rmtree(root, ignore_errors=True)
                continue
            store = ActivationStore.open(root)
            y = store.read(0, store.n_rows)
            normal = np.abs(x) >= FLOAT16_TINY  # float16's normal range (below it float16 keeps fewer bits)
            r = {"write_s": write_s, "disk": disk_bytes(root), "read_rows_s": cold_read(store),
                 "rel_err": float(np.linalg.norm((x - y).astype(np.float64)) / np.linalg.norm(x.astype(np.float64))),
                 "max_elem_rel_err": float((np.abs(x - y)[normal] / np.abs(x)[normal]).max()),
                 "n_inf": int((~np.isfinite(y)).sum())}
            del y
            t0 = time.perf_counter()
            train_on_store(store, sae_cfg, train_cfg, root / "sae")
            r["train_s"] = time.perf_counter() - t0
            m = reconstruction_metrics(load_sae(root / "sae"), held_out.split(4096), "cpu")
            r.update({k: m[k] for k in ("explained_variance", "frac_dead", "l0", "mse")})
            res[dtype] = r
            print(f"{dtype}: rel err {r['rel_err']:.3g} (max elementwise {r['max_elem_rel_err']:.3g}), inf {r['n_inf']}, "
                  f"disk {r['disk'] / 1e9:.3f} GB, write {write_s:.1f} s, cold read {r['read_rows_s']:,.0f} rows/s; "
                  f"SAE EV {r['explained_variance']:.4f}, frac_dead {r['frac_dead']:.4f}, L0 {r['l0']:.2f}", flush=True)
            shutil.rmtree(root / "sae", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = res["float32"]
    lines = []
    for dtype in DTYPES:
        r = res[dtype]
        if "refused" in r:
            lines.append(f"| {dtype} | refused: {r['refused']} | | | | | | | |")
            continue
        lines.append(
            f"| {dtype} | {r['rel_err']:.3g} | {r['max_elem_rel_err']:.3g} | {r['n_inf']} | {r['disk'] / 1e9:.3f} "
            f"({r['disk'] / base['disk']:.2f}x) | {r['write_s']:.1f} ({r['write_s'] / base['write_s']:.2f}x) | "
            f"{r['read_rows_s']:,.0f} ({r['read_rows_s'] / base['read_rows_s']:.2f}x) | "
            f"{r['explained_variance']:.4f} ({r['explained_variance'] - base['explained_variance']:+.4f}) | "
            f"{r['frac_dead']:.4f} ({r['frac_dead'] - base['frac_dead']:+.4f}) |")
        print(f"{dtype} vs float32: disk {r['disk'] / base['disk']:.3f}x, write {r['write_s'] / base['write_s']:.3f}x, "
              f"read {r['read_rows_s'] / base['read_rows_s']:.3f}x, EV {r['explained_variance'] - base['explained_variance']:+.4f}, "
              f"frac_dead {r['frac_dead'] - base['frac_dead']:+.4f}")
    if args.no_doc:
        return
    write_section("storage_dtype", f"""
## Activation storage dtype (`benchmarks/storage_dtype.py`)

Command: `nice -n 19 .venv/bin/python {' '.join(['benchmarks/storage_dtype.py', *sys.argv[1:]])}`. Source: the quick
profile's store ({src.attrs.get('model', '?')} `{src.attrs.get('hook', '?')}`, {src.n_rows:,} rows x {src.d_model}, float32;
max |x| = {float(np.abs(x).max()):,.1f}, {big} elements beyond float16's {FLOAT16_MAX:g}, {tiny:,} of {x.size:,} nonzero
elements below float16's normal range 2^-14), copied into a store of each
dtype by the real writer. SAE: {sae_cfg.architecture} width {sae_cfg.width} k {sae_cfg.k}, {train_cfg.training_tokens:,} training
tokens, seed {train_cfg.seed}, the profile's training settings, same seed for every dtype; evaluated on the float32
held-out rows ({held_out.shape[0]:,}). Ratios / differences against float32 in the same run. Machine: {machine()}.

| dtype | rel. error ‖x−cast(x)‖/‖x‖ | max elementwise rel. error (\|x\| >= 2^-14) | inf | disk GB | write s (fsync) | cold read rows/s | SAE EV | SAE frac_dead |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}
""")


if __name__ == "__main__":
    main()
