"""Why the quick family's SAEs die, and which training change keeps them alive (issue #12).

Two parts, both on the quick profile's activation store (``configs/quick.yaml``; run the
``extract`` flow or ``make run`` first):

1. **Diagnosis** of the activations: mean token norm, the norm of the mean vector and the share of
   ``E||x||^2`` it carries, the centred norm, the dimensions with the largest variance share; and
   the encoder pre-activations of a freshly initialised TopK SAE (width/k below) at step 0 with
   ``b_dec = 0`` (SAELens) vs ``b_dec`` = geometric median (dictionary_learning): how many distinct
   latents win a top-k slot on the sample, and the share of all slots the 32 most frequent winners take.
2. **Ablation**: TopK SAEs (same width/k, the quick profile's token budget, batch and lr) trained
   from one pass per training config, one change at a time, each judged on the held-out rows:
   frac_dead (never fires on them), explained variance, L0, wall time.

``python -m benchmarks.sae_init_study [--config configs/quick.yaml] [--variants a b ...]`` prints
both tables and writes them between markers into docs/training.md.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._common import machine, write_section
from flows.extract import expected_activations
from flows.runner import load_profile, resolve_root
from saeflow.config import TrainConfig
from saeflow.saes import SAEConfig, build_sae, load_sae
from saeflow.metrics import reconstruction_metrics
from saeflow.sae_init import b_dec_from_sample, sample_rows
from saeflow.store import ActivationStore, ShuffledLoader
from saeflow.training import train_saes

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"

#: name -> (SAEConfig overrides, TrainConfig overrides), each relative to SAELens' settings pinned in
#: ``main`` (b_dec = 0, decoder norm 0.1, dead window 1000 steps, constant lr): the state before issue #12.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "before (b_dec=0, SAELens)": ({"b_dec_init": "zeros"}, {}),
    "b_dec=mean": ({"b_dec_init": "mean"}, {}),
    "b_dec=geometric median": ({"b_dec_init": "geometric_median"}, {}),
    "gm + lr warm-up 5% / decay 20%": ({"b_dec_init": "geometric_median"},
                                       {"lr_warm_up_fraction": 0.05, "lr_decay_fraction": 0.2}),
    "gm + aux-k window 5% of run": ({"b_dec_init": "geometric_median", "dead_window_fraction": 0.05}, {}),
    "gm + resample at 25/50%": ({"b_dec_init": "geometric_median", "dead_window_fraction": 0.05,
                                 "aux_coefficient": 0.0, "resample_dead_at": (0.25, 0.5)}, {}),
    "zeros + aux-k window 5%": ({"b_dec_init": "zeros", "dead_window_fraction": 0.05}, {}),
    "gm + resample at 50%, encoder scale 1": ({"b_dec_init": "geometric_median", "dead_window_fraction": 0.05,
                                               "aux_coefficient": 0.0, "resample_dead_at": (0.5,),
                                               "resample_encoder_scale": 1.0}, {}),
    "gm + aux-k + resample at 50%, encoder scale 1": ({"b_dec_init": "geometric_median", "dead_window_fraction": 0.05,
                                                       "resample_dead_at": (0.5,), "resample_encoder_scale": 1.0}, {}),
    "gm + aux-k window 2%": ({"b_dec_init": "geometric_median", "dead_window_fraction": 0.02}, {}),
    "gm + decoder init norm 1": ({"b_dec_init": "geometric_median", "decoder_init_norm": 1.0}, {}),
    "gm + decoder init norm 1 + aux-k window 5%": ({"b_dec_init": "geometric_median", "decoder_init_norm": 1.0,
                                                    "dead_window_fraction": 0.05}, {}),
    "gm + aux-k window 10%": ({"b_dec_init": "geometric_median", "dead_window_fraction": 0.1}, {}),
    "gm + unit decoder + aux-k window 10%": ({"b_dec_init": "geometric_median", "decoder_init_norm": 1.0,
                                             "dead_window_fraction": 0.1}, {}),
    "gm + unit decoder + aux-k window 20%": ({"b_dec_init": "geometric_median", "decoder_init_norm": 1.0,
                                             "dead_window_fraction": 0.2}, {}),
    "gm + unit decoder + aux-k 5% + k-anneal 2k over 25%": (
        {"b_dec_init": "geometric_median", "decoder_init_norm": 1.0, "dead_window_fraction": 0.05,
         "k_anneal_from": 2.0, "k_anneal_fraction": 0.25}, {}),
    "gm + unit decoder + aux-k 5% + k-anneal 4k over 25%": (
        {"b_dec_init": "geometric_median", "decoder_init_norm": 1.0, "dead_window_fraction": 0.05,
         "k_anneal_from": 4.0, "k_anneal_fraction": 0.25}, {}),
    "gm + unit decoder + aux-k 5% + k-anneal 4k over 50%": (
        {"b_dec_init": "geometric_median", "decoder_init_norm": 1.0, "dead_window_fraction": 0.05,
         "k_anneal_from": 4.0, "k_anneal_fraction": 0.5}, {}),
    "gm + unit decoder + aux-k 5%, aux coefficient 4": (
        {"b_dec_init": "geometric_median", "decoder_init_norm": 1.0, "dead_window_fraction": 0.05,
         "aux_coefficient": 4.0}, {}),
    "gm + unit decoder + aux-k 5%, lr 5e-4": (
        {"b_dec_init": "geometric_median", "decoder_init_norm": 1.0, "dead_window_fraction": 0.05}, {"lr": 5e-4}),
    "gm + unit decoder + aux-k 5%, aux coefficient 1/32": (
        {"b_dec_init": "geometric_median", "decoder_init_norm": 1.0, "dead_window_fraction": 0.05,
         "aux_coefficient": 1 / 32}, {}),
    "gm + unit decoder + aux-k 5%, lr 2e-3": (
        {"b_dec_init": "geometric_median", "decoder_init_norm": 1.0, "dead_window_fraction": 0.05}, {"lr": 2e-3}),
}


def diagnose(store: ActivationStore, width: int, k: int, n_rows: int, seed: int) -> list[tuple[str, str]]:
    x = sample_rows(store, n_rows, seed).double()
    norms = x.norm(dim=1)
    mean = x.mean(dim=0)
    ex2 = float(x.pow(2).sum(dim=1).mean())
    centred = x - mean
    var = centred.pow(2).mean(dim=0)
    share = var / var.sum()
    top = torch.argsort(share, descending=True)[:10]
    rows = [
        ("rows sampled (training rows, seeded chunks)", f"{x.shape[0]:,}"),
        ("mean token norm E||x||", f"{float(norms.mean()):,.1f}"),
        ("norm of the mean vector ||E x||", f"{float(mean.norm()):,.1f}"),
        ("share of E||x||^2 in the mean vector", f"{float(mean.pow(2).sum()) / ex2:.3f}"),
        ("mean centred norm E||x - E x||", f"{float(centred.norm(dim=1).mean()):,.1f}"),
        ("top-3 dims by variance (share of total variance)",
         ", ".join(f"{int(d)} ({float(share[d]):.2f})" for d in top[:3])),
        ("top-10 dims' variance share", f"{float(share[top].sum()):.3f}"),
        ("dim with the largest mean |E x_d| (mean, std)",
         (lambda d: f"{d} ({float(mean[d]):,.0f}, {float(var[d].sqrt()):,.0f})")(int(mean.abs().argmax()))),
    ]
    scale = math.sqrt(store.d_model) / float(norms.mean())
    xs = (x * scale).float()
    for label, method in (("b_dec = 0", "zeros"), ("b_dec = geometric median", "geometric_median")):
        sae = build_sae(SAEConfig(width=width, k=k, b_dec_init=method), store.d_model, seed=seed)
        b = b_dec_from_sample(xs, method)
        if b is not None:
            sae.b_dec.data.copy_(b)
        with torch.no_grad():
            _, idx = sae.encode_sparse(xs)
        counts = torch.bincount(idx.reshape(-1), minlength=width).double()
        distinct = int((counts > 0).sum())
        top_share = float(counts.sort(descending=True).values[:32].sum() / counts.sum())
        rows.append((f"step 0, {label}: distinct latents winning a top-{k} slot", f"{distinct:,} of {width:,}"))
        rows.append((f"step 0, {label}: share of slots taken by the 32 most frequent", f"{top_share:.3f}"))
    return rows


def held_out(store: ActivationStore, n: int):
    start = store.train_rows
    end = min(store.n_rows, start + n)
    return lambda: store.iter_rows(start, end, 4096), end - start


def run_variants(store: ActivationStore, base_sae: SAEConfig, base_train: TrainConfig, names: list[str],
                 workdir: Path, eval_rows: int) -> list[dict[str, Any]]:
    scaling = store.normalization_factor()
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(repr(sorted(VARIANTS[name][1].items())), []).append(name)
    batches, n_eval = held_out(store, eval_rows)
    results = []
    for _, members in groups.items():
        train_cfg = base_train.model_copy(update=VARIANTS[members[0]][1])
        cfgs = [base_sae.model_copy(update=VARIANTS[m][0]) for m in members]
        loader = ShuffledLoader(store, train_cfg.batch_size, train_cfg.seed, train_cfg.buffer_chunks, 0, store.train_rows)
        sample = (sample_rows(store, train_cfg.init_sample_rows, train_cfg.seed)
                  if any(c.b_dec_init != "zeros" for c in cfgs) else None)
        dirs = [workdir / f"v{abs(hash(m)) % 10**8}" for m in members]
        t0 = time.perf_counter()
        summaries = train_saes([(c, d, None) for c, d in zip(cfgs, dirs)], train_cfg, loader, store.d_model,
                               torch.device("cpu"), scaling_factor=scaling, init_sample=sample)
        wall = time.perf_counter() - t0
        for name, d, s in zip(members, dirs, summaries):
            rec = reconstruction_metrics(load_sae(d), batches(), "cpu")
            results.append({"variant": name, "frac_dead": rec["frac_dead"], "explained_variance": rec["explained_variance"],
                            "l0": rec["l0"], "mse": rec["mse"], "train_dead_at_end": s["n_dead"] / cfgs[0].width,
                            "resampled": s.get("n_resampled", 0), "family_wall_s": wall, "n_eval_rows": n_eval})
            print(results[-1], flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quick.yaml")
    ap.add_argument("--artifacts", default=None)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--architecture", default="topk", choices=["topk", "batchtopk", "matryoshka"])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--diagnose-rows", type=int, default=50_000)
    ap.add_argument("--eval-rows", type=int, default=50_000)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    config = load_profile(args.config)
    root = resolve_root(args.artifacts)
    acts = expected_activations(config, root)
    if not acts.is_complete():
        raise SystemExit(f"no complete activation store for {args.config} at {acts.dir}: run "
                         f"`python -m flows.extract --config {args.config}` first")
    store = ActivationStore.open(acts.dir)
    diag = diagnose(store, args.width, args.k, args.diagnose_rows, config.train.seed)
    for k, v in diag:
        print(f"{k}: {v}", flush=True)
    # the variants are relative to SAELens' settings (as measured in docs/training.md), not to today's defaults
    base_sae = SAEConfig(architecture=args.architecture, width=args.width, k=args.k, b_dec_init="zeros",
                         decoder_init_norm=0.1, dead_window_fraction=None)
    base_train = config.train.model_copy(update={"lr_warm_up_steps": 0, "lr_decay_steps": 0,
                                                 "lr_warm_up_fraction": 0.0, "lr_decay_fraction": 0.0})
    workdir = Path(tempfile.mkdtemp(prefix="sae_init_study-"))
    try:
        results = run_variants(store, base_sae, base_train, args.variants, workdir, args.eval_rows)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    steps = base_train.training_tokens // base_train.batch_size
    lines = [f"Command: `python -m benchmarks.sae_init_study --config {args.config}`. Machine: {machine()}.", "",
             f"Store: `{store.attrs.get('model')}` `{store.attrs.get('hook')}`, {store.train_rows:,} training rows.", "",
             "| quantity | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in diag], "",
             f"Ablation: {args.architecture} width {args.width}, k {args.k}, {base_train.training_tokens:,} tokens ({steps} steps of "
             f"{base_train.batch_size}), lr {base_train.lr}, seed {base_train.seed}; members sharing a training config "
             f"were trained together from one pass (one batch stream). Judged on {results[0]['n_eval_rows']:,} held-out rows.", "",
             "| variant | frac_dead (held-out) | explained variance | L0 | dead at end of training (window) | resampled | family wall s |",
             "|---|---|---|---|---|---|---|",
             *[f"| {r['variant']} | {r['frac_dead']:.4f} | {r['explained_variance']:.4f} | {r['l0']:.1f} | "
               f"{r['train_dead_at_end']:.4f} | {r['resampled']} | {r['family_wall_s']:.0f} |" for r in results]]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("sae_init_study", text, DOC)


if __name__ == "__main__":
    main()
