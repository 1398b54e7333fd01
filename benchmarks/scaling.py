"""Cost vs store size: write, loader pass, training, peak RSS and disk of a synthetic activation store.

For each size (rows x ``--d``, default 1M / 4M / 16M x 640) a fresh subprocess (so its peak RSS is
its own) builds a store in a temporary folder under ``--dir`` through the real writer
(``ActivationStore.open_for_write`` / ``append`` / ``finish``, appends of ``--append-rows`` rows as
extraction does), then measures:

- write: wall time of the appends, ``finish`` and an fsync of every file of the store (the data is
  on disk, so page-cache absorption does not flatter the small sizes). The synthetic rows are drawn
  before the clock starts from a pool of 16 random batches, cycled (no compression: their content
  does not change the cost);
- loader: after evicting the store's files from the page cache (``posix_fadvise(DONTNEED)``: every
  size is read cold, as a store larger than RAM is), rows/s of a full epoch (every training row
  once) of ``ShuffledLoader`` in batches of ``--batch``, as the trainer builds it (its default
  ``direct_io``: O_DIRECT for a store larger than half the RAM, the page cache otherwise; the table
  says which). Where that pass went through the page cache, a second cold pass with
  ``direct_io=True`` gives the like-for-like O_DIRECT figure at every size;
- training: tokens/s of the real trainer (``saeflow.training.train_sae``; TopK ``--width`` / ``--k``,
  the pipeline's normalisation factor and b_dec sample taken from the store like ``tasks/train.py``)
  for ``--train-steps`` steps drawn by a fresh ``ShuffledLoader``, whose chunks are spread over the
  whole store (cold cache again);
- peak RSS: the subprocess's own ``ru_maxrss``; disk: allocated bytes of the store folder;
- diagnostics: drift (time of the last tenth of the appends / loader batches over the first tenth:
  ~1 unless one operation's cost grows with the store); the raw disk rate (plain cold reads of a
  random ``--raw-fraction`` of the chunk files) just before and just after the loader pass, the
  loader's baseline; the loader pass's own CPU seconds (user, system) and, from ``/proc/diskstats``,
  how much of the pass the store's disk was busy and at what rate it delivered. The loader's wall
  time follows the disk when the disk is the bottleneck; its CPU time is the code's own cost.

The folder is deleted before the next size starts (never two stores at once). Prints one line per
size, then the log-log least-squares slope of time vs rows (write, loader pass) and the RSS ratio
largest / smallest size last. Goals (issue #15): time exponents <= 1.05, RSS ratio <= 1.2.

Run: ``nice -n 19 .venv/bin/python benchmarks/scaling.py [--sizes 1000000,4000000,16000000]
[--dtype float32] [--dir /work/tmp] [--no-doc]``; the full default run writes 16M x 640 float32 =
41 GB at its largest size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks._common import REPO, machine, write_section  # noqa: E402

GOAL_EXPONENT = 1.05
GOAL_RSS_RATIO = 1.2
CONTEXT = 128  # rows per synthetic context (the quick profile's context size)


def store_files(root: Path) -> list[Path]:
    return [Path(d) / f for d, _, fs in os.walk(root) for f in fs]


def sync_and_evict(root: Path) -> None:
    """fsync every file of ``root`` (and its folders), then drop them from the page cache."""
    for p in store_files(root):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    for d, _, _ in os.walk(root):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def diskstats() -> Iterator[list[str]]:
    """The fields of each ``/proc/diskstats`` line (major, minor, name, reads, ..., io_ticks, ...)."""
    for line in Path("/proc/diskstats").read_text().splitlines():
        yield line.split()


def block_device(path: Path) -> str | None:
    """The ``/proc/diskstats`` name of the block device holding ``path`` (``None`` when not found)."""
    dev = os.stat(path).st_dev
    return next((f[2] for f in diskstats() if (int(f[0]), int(f[1])) == (os.major(dev), os.minor(dev))), None)


def io_snapshot(device: str | None) -> dict[str, float]:
    """This process's CPU seconds (user, system) and the device's bytes read and busy seconds so far
    (``/proc/diskstats``: sectors read x 512, io_ticks)."""
    t = os.times()
    out = {"user_s": t.user, "sys_s": t.system, "disk_read_bytes": 0.0, "disk_busy_s": 0.0}
    for f in diskstats() if device else []:
        if f[2] == device:
            out.update(disk_read_bytes=int(f[5]) * 512.0, disk_busy_s=int(f[12]) / 1000)
    return out


def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a[k] for k in a}


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in store_files(root))


def train_on_store(store, sae_cfg, train_cfg, out_dir: Path) -> dict:
    """``train_sae`` over the store's training rows as ``tasks/train.py`` feeds it (normalisation factor,
    b_dec sample, ``ShuffledLoader``), on CPU; its summary."""
    import torch

    from saeflow.sae_init import sample_rows
    from saeflow.store import ShuffledLoader
    from saeflow.training import train_sae

    scaling = store.normalization_factor() if sae_cfg.normalize_activations == "expected_average_only_in" else None
    init = sample_rows(store, train_cfg.init_sample_rows, train_cfg.seed) if sae_cfg.b_dec_init != "zeros" else None
    loader = ShuffledLoader(store, train_cfg.batch_size, train_cfg.seed, train_cfg.buffer_chunks, 0, store.train_rows)
    return train_sae(sae_cfg, train_cfg, loader, store.d_model, out_dir, torch.device("cpu"), scaling_factor=scaling,
                     init_sample=init)


def measure(rows: int, args: argparse.Namespace) -> dict:
    """One size, in this process: build, read, train, delete; the figures as a dict."""
    import torch

    from saeflow.config import TrainConfig
    from saeflow.saes import SAEConfig
    from saeflow.store import ActivationStore, ShuffledLoader

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pool = [rng.standard_normal((args.append_rows, args.d), dtype=np.float32) for _ in range(16)]
    work = Path(tempfile.mkdtemp(prefix="scaling-", dir=args.dir))
    try:
        root = work / "store"
        t0 = time.perf_counter()
        store = ActivationStore.open_for_write(root, args.d, args.chunk_rows, args.dtype, {"hook": "synthetic"})
        append_t = []
        for i, s in enumerate(range(0, rows, args.append_rows)):
            e = min(rows, s + args.append_rows)
            idx = np.arange(s, e, dtype=np.int64)
            t1 = time.perf_counter()
            store.append(pool[i % len(pool)][: e - s], idx % 50_000, idx % CONTEXT, idx // CONTEXT,
                         contexts_done=math.ceil(e / CONTEXT))
            append_t.append(time.perf_counter() - t1)
        store.finish(train_rows=rows)
        sync_and_evict(root)
        write_s = time.perf_counter() - t0
        disk = disk_bytes(root)

        store = ActivationStore.open(root)
        device = block_device(root)
        raw_before = raw_read(store, args.raw_fraction, seed=1)
        sync_and_evict(root)
        loader = ShuffledLoader(store, args.batch, seed=0)
        n_batches = loader.rows_per_epoch // args.batch
        loader_direct = loader.direct_io
        loader_s, batch_t, io = loader_pass(loader, n_batches, device)
        unit = max(1, loader.buffer_chunks * store.chunk_rows // args.batch)  # batches per buffer read
        del loader
        raw_after = raw_read(store, args.raw_fraction, seed=2)
        direct_s, direct_io = loader_s, io
        if not loader_direct:  # the same pass past the page cache, for the like-for-like O_DIRECT exponent
            sync_and_evict(root)
            direct_s, _, direct_io = loader_pass(ShuffledLoader(store, args.batch, seed=0, direct_io=True), n_batches, device)

        sync_and_evict(root)
        sae_cfg = SAEConfig(architecture="topk", width=args.width, k=args.k)
        train_cfg = TrainConfig(training_tokens=args.train_steps * args.batch, batch_size=args.batch,
                                checkpoint_every=10**9, log_every=10**9)
        t0 = time.perf_counter()
        train_on_store(store, sae_cfg, train_cfg, work / "sae")
        train_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "write_s": write_s, "loader_s": loader_s, "loader_rows": n_batches * args.batch,
            "train_s": train_s, "train_tokens": args.train_steps * args.batch, "disk_bytes": disk,
            "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "append_drift": drift(append_t), "batch_drift": drift(batch_t, unit), "raw_before_rows_s": raw_before,
            "raw_after_rows_s": raw_after, "loader_user_s": io["user_s"], "loader_sys_s": io["sys_s"],
            "loader_disk_read_bytes": io["disk_read_bytes"], "loader_disk_busy_s": io["disk_busy_s"], "device": device,
            "loader_direct": loader_direct, "direct_s": direct_s, "direct_user_s": direct_io["user_s"],
            "direct_sys_s": direct_io["sys_s"]}


def loader_pass(loader, n_batches: int, device: str | None) -> tuple[float, list[float], dict[str, float]]:
    """Wall time of ``n_batches`` batches of ``loader`` (then closed), each batch's time, and the
    CPU / disk counters over the pass."""
    it = iter(loader)
    batch_t = []
    io0 = io_snapshot(device)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        t1 = time.perf_counter()
        next(it)
        batch_t.append(time.perf_counter() - t1)
    wall = time.perf_counter() - t0
    io = delta(io0, io_snapshot(device))
    loader.close()
    return wall, batch_t, io


def raw_read(store, fraction: float, seed: int) -> float:
    """Rows/s of plain file reads of a seeded random ``fraction`` of the ``acts`` chunk files, page cache
    evicted first: what the disk gives with no Zarr / loader code on top (the loader's baseline; taken
    just before and just after the loader pass, as this VM's disk rate changes over minutes)."""
    sync_and_evict(store.root)
    files = sorted(store_files(store.root / "acts.zarr" / "acts" / "c"))
    n = max(1, round(fraction * len(files)))
    pick = np.random.default_rng(seed).permutation(len(files))[:n]
    t0 = time.perf_counter()
    nbytes = sum(len(files[i].read_bytes()) for i in pick)
    return nbytes / (time.perf_counter() - t0) / (store.d_model * np.dtype(store.acts.dtype).itemsize)


def drift(times: list[float], unit: int = 1) -> float:
    """Time of the last tenth of the operations / time of the first tenth (a multiple of ``unit``
    operations: the loader reads a buffer every ``unit`` batches): ~1 when an operation's cost does not
    grow with the rows already written / read (an O(rows) per-operation cost shows as >> 1)."""
    n = max(unit, len(times) // 10 // unit * unit)
    return sum(times[-n:]) / sum(times[:n])


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) on log(x); nan when a y is 0 (a CPU time below the clock's tick)."""
    if min(ys) <= 0:
        return float("nan")
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def child_argv(rows: int, argv: list[str]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *argv, "--child", str(rows)]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,4000000,16000000", help="comma-separated row counts")
    ap.add_argument("--d", type=int, default=640, help="activation width (Gemma 3 270M: 640)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--dir", default=str(REPO.parent / "tmp-scaling"), help="parent of the temporary store folders")
    ap.add_argument("--chunk-rows", type=int, default=4096)
    ap.add_argument("--append-rows", type=int, default=2048, help="rows per append (extraction: 16 contexts x 128)")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--raw-fraction", type=float, default=0.1, help="chunk files read raw for the disk baseline")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.child, args)), flush=True)
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    if len(sizes) < 2:
        ap.error("--sizes needs at least two sizes to fit an exponent")
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    results = []
    for rows in sizes:
        out = subprocess.run(child_argv(rows, list(argv)), capture_output=True, text=True, cwd=REPO)
        if out.returncode != 0:
            sys.exit(f"size {rows}: the measuring subprocess failed:\n{out.stderr}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"rows {rows:,}: write {r['write_s']:.1f} s ({rows / r['write_s']:,.0f} rows/s), loader pass "
              f"{r['loader_rows'] / r['loader_s']:,.0f} rows/s ({path(r)}; O_DIRECT pass {r['loader_rows'] / r['direct_s']:,.0f} "
              f"rows/s, CPU {r['direct_user_s']:.1f} / {r['direct_sys_s']:.1f} s) (raw file reads before/after {r['raw_before_rows_s']:,.0f}/"
              f"{r['raw_after_rows_s']:,.0f} rows/s; loader CPU user {r['loader_user_s']:.1f} s sys {r['loader_sys_s']:.1f} s; "
              f"disk busy {busy_share(r):.0%} of the pass at {disk_rate(r) / 1e6:,.0f} MB/s), training "
              f"{r['train_tokens'] / r['train_s']:,.0f} tok/s, peak RSS {r['peak_rss_kib'] / 1024:,.0f} MiB, disk "
              f"{r['disk_bytes'] / 1e6:,.1f} MB, drift (last/first tenth) append {r['append_drift']:.2f} loader batch "
              f"{r['batch_drift']:.2f}", flush=True)
    rows = [r["rows"] for r in results]
    per_epoch = [r["rows"] / r["loader_rows"] for r in results]  # a pass covers the training rows (all of them here)
    e = {"write": slope(rows, [r["write_s"] for r in results]),
         "loader": slope(rows, [r["loader_s"] * f for r, f in zip(results, per_epoch)]),
         "direct": slope(rows, [r["direct_s"] * f for r, f in zip(results, per_epoch)]),
         "loader_user": slope(rows, [r["loader_user_s"] * f for r, f in zip(results, per_epoch)]),
         "loader_cpu": slope(rows, [(r["loader_user_s"] + r["loader_sys_s"]) * f for r, f in zip(results, per_epoch)])}
    rss_ratio = results[-1]["peak_rss_kib"] / results[0]["peak_rss_kib"]
    if not args.no_doc:
        write_doc(args, argv, results, e, rss_ratio)
    print(f"time exponent: write {e['write']:.3f}, loader pass {e['loader']:.3f} (goal <= {GOAL_EXPONENT}), O_DIRECT at "
          f"every size {e['direct']:.3f}; loader CPU "
          f"time (user + sys) {e['loader_cpu']:.3f}, user only {e['loader_user']:.3f}")
    print(f"RSS ratio largest/smallest: {rss_ratio:.3f} (goal <= {GOAL_RSS_RATIO})")


def path(r: dict) -> str:
    """How the default loader read the store."""
    return "O_DIRECT" if r["loader_direct"] else "page cache"


def busy_share(r: dict) -> float:
    """Share of the loader pass during which the store's disk had reads in flight (``io_ticks``)."""
    return r["loader_disk_busy_s"] / r["loader_s"] if r["device"] else float("nan")


def disk_rate(r: dict) -> float:
    """Bytes/s the store's disk delivered during the loader pass."""
    return r["loader_disk_read_bytes"] / r["loader_s"]


def write_doc(args, argv, results, e: dict[str, float], rss_ratio: float) -> None:
    table = "\n".join(
        f"| {r['rows']:,} | {r['write_s']:.1f} | {r['rows'] / r['write_s']:,.0f} | {r['loader_s']:.1f} | "
        f"{r['loader_rows'] / r['loader_s']:,.0f} | {path(r)} | {r['loader_rows'] / r['direct_s']:,.0f} | "
        f"{r['direct_user_s']:.1f} / {r['direct_sys_s']:.1f} | {r['raw_before_rows_s']:,.0f} / {r['raw_after_rows_s']:,.0f} | "
        f"{r['loader_user_s']:.1f} / {r['loader_sys_s']:.1f} | {busy_share(r):.0%} | {disk_rate(r) / 1e6:,.0f} | "
        f"{r['train_tokens'] / r['train_s']:,.0f} | "
        f"{r['peak_rss_kib'] / 1024:,.0f} | {r['disk_bytes'] / 1e9:.2f} | {r['append_drift']:.2f} | {r['batch_drift']:.2f} |"
        for r in results)
    write_section("scaling", f"""
## Cost vs store size (`benchmarks/scaling.py`)

Command: `nice -n 19 .venv/bin/python {' '.join(['benchmarks/scaling.py', *argv])}` (synthetic store of
d {args.d}, storage dtype **{args.dtype}**, chunks of {args.chunk_rows} rows, appends of {args.append_rows} rows; loader
and training batches of {args.batch}; training: TopK width {args.width}, k {args.k}, {args.train_steps} steps; each size
in its own subprocess). Machine: {machine()}.

Write = appends + `finish` + fsync of every file. Loader = one full epoch of `ShuffledLoader` (every row once),
read cold (the store's files evicted from the page cache first), with the loader's default `direct_io` (O_DIRECT
for a store larger than half the RAM, else the page cache: "read via"); "O_DIRECT" columns = the same pass with
`direct_io=True` at every size (the same pass where the default already was O_DIRECT), CPU = its user / system s. Training = `train_sae` incl. the normalisation
factor and the b_dec sample, cold cache. Peak RSS = the measuring subprocess's `ru_maxrss`. Drift = time of the
last tenth of the appends (loader batches) / time of the first tenth within one size: ~1 when the cost of one
operation does not grow with the store. Raw read = plain file reads of a random {args.raw_fraction:.0%} of the chunk files,
cold, just before / just after the loader pass: the disk's rate with no Zarr / loader code on top. Loader CPU =
the process's user / system seconds during the pass; disk busy = share of the pass during which the store's block
device had reads in flight (`/proc/diskstats` io_ticks), disk MB/s = bytes it read during the pass / pass time.

| rows | write s | write rows/s | loader pass s | loader rows/s | read via | O_DIRECT rows/s | O_DIRECT CPU s | raw read rows/s before / after | loader CPU s user / sys | disk busy | disk MB/s | training tok/s | peak RSS MiB | disk GB | drift: append | drift: loader batch |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
{table}

Growth exponent of time vs rows (log-log least-squares slope over the sizes): write **{e['write']:.3f}**, loader pass
**{e['loader']:.3f}** (goal <= {GOAL_EXPONENT}), the O_DIRECT pass at every size **{e['direct']:.3f}**; the loader's CPU time (user + system) **{e['loader_cpu']:.3f}**, user
time alone {e['loader_user']:.3f}. Peak RSS ratio largest / smallest: **{rss_ratio:.3f}** (goal <= {GOAL_RSS_RATIO}).
""")


if __name__ == "__main__":
    main()
