"""Trainer throughput: saeflow's trainer vs SAELens' ``SAETrainer`` on the same cached activations.

Both train the same architecture at the quick profile's width, batch size and dtype (float32), from
the same in-memory batches read from the quick profile's activation store (built through the
pipeline's own cached stages if absent), no activation normalisation, no checkpoints. Tokens/s is
wall time over the whole ``fit`` / ``train_sae`` call (warm-up included), median of repeats run
alternately. Prints a line per architecture and ``ratio: <min over architectures>`` last.

Run: ``.venv/bin/python benchmarks/training.py [--steps 40] [--repeats 3] [--arch topk batchtopk]``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._common import REPO, machine, write_section  # noqa: E402
from saeflow.artifacts import default_root  # noqa: E402
from saeflow.config import TrainConfig, load_config  # noqa: E402
from saeflow.device import pick_device  # noqa: E402
from saeflow.saes import REGISTRY  # noqa: E402
from saeflow.store import ActivationStore, ShuffledLoader  # noqa: E402
from saeflow.training import train_sae  # noqa: E402


class ListLoader:
    """The BatchLoader protocol over a fixed list of batches (cycled)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches
        self.i = 0
        self.d_in = batches[0].shape[1]

    def __iter__(self):
        while True:
            b = self.batches[self.i % len(self.batches)]
            self.i += 1
            yield b.clone()

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, s: dict) -> None:
        self.i = int(s["i"])


def quick_store(profile: Path, root: str) -> ActivationStore:
    from tasks import activations, corpus, model

    cfg = load_config(profile)
    m = model.model_task.fn(cfg.model, root)
    c = corpus.corpus_task.fn(m, cfg.corpus, cfg.model.prepend_bos, root)
    a = activations.activations_task.fn(m, cfg.model, c, cfg.activations, root)
    return ActivationStore.open(a.dir)


def run_ours(arch_cfg, batches, steps: int, batch: int, device) -> float:
    out = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        tcfg = TrainConfig(training_tokens=steps * batch, batch_size=batch, checkpoint_every=10**9, log_every=10**9)
        t0 = time.perf_counter()
        train_sae(arch_cfg, tcfg, ListLoader(batches), batches[0].shape[1], out, device)
        return steps * batch / (time.perf_counter() - t0)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_sae_lens(arch: str, width: int, k: int, batches, steps: int, batch: int, device) -> float:
    from sae_lens.config import LoggingConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer, SAETrainerConfig

    d_in = batches[0].shape[1]
    common = dict(d_in=d_in, d_sae=width, k=k, dtype="float32", device=str(device), normalize_activations="none")
    sae = (TopKTrainingSAE(TopKTrainingSAEConfig(**common)) if arch == "topk"
           else BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common)))
    cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=3e-4, lr_end=3e-4,
                           device=str(device), logger=LoggingConfig(log_to_wandb=False))
    provider = iter(ListLoader(batches))
    t0 = time.perf_counter()
    SAETrainer(cfg=cfg, sae=sae, data_provider=provider).fit()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=str(REPO / "configs" / "quick.yaml"))
    ap.add_argument("--artifacts", default=str(default_root()))
    ap.add_argument("--arch", nargs="+", default=[a for a in ("topk", "batchtopk") if a in REGISTRY])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--width", type=int, default=None, help="default: the profile's SAE width")
    ap.add_argument("--scaling-widths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384],
                    help="widths for the cost-vs-width table (ours, topk; empty to skip)")
    args = ap.parse_args()

    cfg = load_config(args.profile)
    base = max(cfg.sae_configs(), key=lambda c: (c.width, c.k))  # the profile's largest member
    width = args.width or base.width
    batch, k = cfg.train.batch_size, base.k
    device = pick_device("auto")
    store = quick_store(Path(args.profile), args.artifacts)
    it = iter(ShuffledLoader(store, batch, seed=0))
    batches = [next(it) for _ in range(min(args.steps, 16))]
    rows, ratios = [], {}
    for arch in args.arch:
        arch_cfg = base.model_copy(update={"architecture": arch, "width": width, "normalize_activations": "none",
                                         "dead_feature_window": 1000, "dead_window_fraction": None})
        # ^ SAELens' dead window on both sides (aux-k off in so short a run): the same work per step
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(run_ours(arch_cfg, batches, args.steps, batch, device))
            theirs.append(run_sae_lens(arch, width, k, batches, args.steps, batch, device))
            print(f"{arch}: ours {ours[-1]:,.0f} tok/s   sae_lens {theirs[-1]:,.0f} tok/s", flush=True)
        mo, mt = statistics.median(ours), statistics.median(theirs)
        ratios[arch] = mo / mt
        rows.append(f"| {arch} | {mo:,.0f} | {mt:,.0f} | **{mo / mt:.2f}** |")
        print(f"{arch} ratio: {mo / mt:.3f}", flush=True)
    scaling_rows = []
    for w in args.scaling_widths:
        wcfg = base.model_copy(update={"architecture": "topk", "width": w, "normalize_activations": "none"})
        tps = statistics.median(run_ours(wcfg, batches, max(5, args.steps // 2), batch, device) for _ in range(2))
        scaling_rows.append(f"| {w} | {tps:,.0f} | {batch / tps * 1000:,.0f} |")
        print(f"scaling: width {w}: {tps:,.0f} tok/s", flush=True)
    scaling = ""
    if scaling_rows:
        scaling = ("\n### Training cost vs width (ours, topk)\n\n| width | tokens/s | ms per step |\n|---|---|---|\n"
                   + "\n".join(scaling_rows) + "\n")
    write_section("training", f"""
## Trainer throughput vs SAELens (`benchmarks/training.py`)

Command: `.venv/bin/python {' '.join(['benchmarks/training.py', *sys.argv[1:]])}` (d_in {store.d_model} from the quick profile's store, width
{width}, k {k}, batch {batch}, float32, {args.steps} steps per run, {args.repeats} alternating repeats, median;
SAELens {__import__('sae_lens').__version__} `SAETrainer` with its default TopK settings). Machine: {machine()}.

| architecture | saeflow tokens/s | SAELens tokens/s | ratio |
|---|---|---|---|
{chr(10).join(rows)}

Goal: ratio >= 2.0.
{scaling}""")
    print(f"ratio: {min(ratios.values()):.3f}")


if __name__ == "__main__":
    main()
