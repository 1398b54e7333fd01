"""Roofline: this machine's matmul peak against what extraction and family training achieve.

All in one run, float32 and bfloat16:

1. **Peak**: best of ``--repeats`` timed ``2048^3`` matmuls (and the SAE encoder's own shape,
   ``batch x d_in x width`` of the family's widest member), all threads.
2. **Extraction**: the pipeline's extraction (:func:`saeflow.extract.extract_activations`, Zarr
   writes included) of ``--contexts`` contexts of the profile's corpus, the model loaded in each
   dtype. Work = the *minimal* model FLOPs per token up to the hooked layer (:func:`model_flops`:
   the q/k/v/o projections, attention scores and values over the full context, the MLP; no
   embedding, no norms), times tokens/s.
3. **Family training**: the profile's family trained together (:func:`saeflow.training.train_saes`)
   on in-memory batches of the profile's activation store when it exists (random normal rows of the
   same width otherwise, said in the output), ``train.precision`` float32 and bfloat16, with the
   profile's schedule (``training_tokens``: warm-up, dead-latent window) stopped after ``--steps``
   steps. Tokens/s from the difference of a ``--steps`` run and a 2-step run (set-up cancels). Work per token and
   member (:func:`sae_flops`): k-based SAEs ``2 * d_in * width`` (the dense encoder) ``+ 6 * k *
   d_in`` (sparse decoder forward and backward, sparse encoder gradient); dense ReLU / JumpReLU
   ``10 * d_in * width`` (encoder, decoder, their weight gradients and the latent gradient). A
   dense backward of a k-based SAE counts as waste, not work.

Prints a table, writes the ``roofline`` section of docs/benchmarks.md and ends with
``fraction of bf16 peak: extraction X, training Y`` (goals: >= 0.5 and >= 0.4, issue #26).

Run: ``.venv/bin/python benchmarks/roofline.py [--config configs/quick.yaml] [--contexts 96] [--steps 8]``
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

from benchmarks._common import machine, write_section  # noqa: E402
from saeflow.artifacts import default_root  # noqa: E402
from saeflow.config import load_config  # noqa: E402
from saeflow.precision import cpu_bf16_flags  # noqa: E402
from benchmarks.extraction import ours as pipeline_extraction_tps  # noqa: E402
from benchmarks.training import ListLoader  # noqa: E402


# ------------------------------------------------------------------------------------------ FLOPs
def model_flops(cfg, layer: int, context: int) -> float:
    """Minimal FLOPs per token of a transformer_lens model up to and including block ``layer``:
    per block ``2 * d_model * (q + 2 kv + o widths)``, ``4 * context * n_heads * d_head`` (scores
    and values over the full context) and the MLP (3 matrices when gated, else 2)."""
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head
    kv = getattr(cfg, "n_key_value_heads", None) or h
    gated = bool(getattr(cfg, "gated_mlp", False))
    proj = 2 * d * (h * dh) * 2 + 2 * d * (kv * dh) * 2
    attn = 4 * context * h * dh
    mlp = 2 * d * cfg.d_mlp * (3 if gated else 2)
    return float((layer + 1) * (proj + attn + mlp))


def sae_flops(architecture: str, d_in: int, width: int, k: int | None) -> float:
    """Minimal training FLOPs per token of one SAE (module docstring)."""
    if architecture in ("relu", "jumprelu") or k is None:
        return 10.0 * d_in * width
    return 2.0 * d_in * width + 6.0 * k * d_in


# ------------------------------------------------------------------------------------------ peak
def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * m * k * n / best / 1e9


# ------------------------------------------------------------------------------------ extraction
def extraction_tps(cfg, root: str, dtype: str, contexts: int) -> tuple[float, float]:
    """(tokens/s, model FLOPs per token) of the pipeline extraction with the model in ``dtype``."""
    from saeflow.corpus import corpus_contexts, special_token_ids
    from saeflow.extract import hook_layer
    from saeflow.models import load_model
    from tasks.model import model_task

    mcfg = cfg.model.model_copy(update={"dtype": dtype})
    ref = model_task.fn(mcfg, root)
    model = load_model(mcfg, ref.dir, "cpu")
    corpus = cfg.corpus.model_copy(update={"n_contexts": contexts, "eval_contexts": 1})
    tokens = corpus_contexts(corpus, model.tokenizer)[:contexts]
    exclude = special_token_ids(model.tokenizer)
    hook, batch = cfg.activations.hook, cfg.activations.batch_size
    chunk = cfg.activations.chunk_rows
    pipeline_extraction_tps(model, tokens[:batch], hook, batch, exclude, chunk)  # warm-up batch
    tps = pipeline_extraction_tps(model, tokens, hook, batch, exclude, chunk)
    layer = hook_layer(hook)
    return tps, model_flops(model.cfg, model.cfg.n_layers - 1 if layer is None else layer, tokens.shape[1])


# -------------------------------------------------------------------------------------- training
def training_batches(cfg, root: str, d_in: int, n: int) -> tuple[list[torch.Tensor], str]:
    from tasks import activations, corpus, model

    bs = cfg.train.batch_size
    try:
        m = model.ref(cfg=cfg.model, root=root)
        c = corpus.ref(model=m, cfg=cfg.corpus, prepend_bos=cfg.model.prepend_bos, root=root)
        a = activations.ref(model=m, model_cfg=cfg.model, corpus=c, cfg=cfg.activations, root=root)
        if a.is_complete():
            from saeflow.store import ActivationStore

            store = ActivationStore.open(a.dir)
            rows = torch.from_numpy(np.asarray(store.read(0, n * bs), dtype=np.float32))
            return list(rows.view(n, bs, -1)), f"the profile's activation store ({a.fingerprint})"
    except Exception as exc:  # noqa: BLE001 - fall back to synthetic rows, said in the output
        note = f" ({type(exc).__name__}: {exc})"
    else:
        note = " (no complete store for this profile)"
    g = torch.Generator().manual_seed(0)
    return [torch.randn(bs, d_in, generator=g) * 20 for _ in range(n)], "random normal rows" + note


def family_tps(cfg, batches: list[torch.Tensor], d_in: int, precision: str, steps: int) -> float:
    from saeflow.training import train_saes

    members = cfg.sae_configs()
    bs = cfg.train.batch_size

    def run(n_steps: int) -> float:
        d = Path(tempfile.mkdtemp(prefix="roofline-train-"))
        try:
            # the profile's own schedule (warm-up, dead-latent window), stopped after n_steps: a run of
            # n_steps in all would count every latent that misses one step as dead (window 5% of 8
            # steps) and time the aux-k path on thousands of latents, which no real run does
            tc = cfg.train.model_copy(update={"precision": precision, "checkpoint_every": 10**9,
                                              "log_every": 10**9, "init_sample_rows": bs})
            t0 = time.perf_counter()
            train_saes([(m, d / str(i), None) for i, m in enumerate(members)], tc, ListLoader(batches), d_in,
                       torch.device("cpu"), scaling_factor=1.0, init_sample=batches[0], stop_after_steps=n_steps)
            return time.perf_counter() - t0
        finally:
            shutil.rmtree(d, ignore_errors=True)

    short, long_ = run(2), run(steps)
    return (steps - 2) * bs / max(long_ - short, 1e-9)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quick.yaml")
    ap.add_argument("--artifacts", default=str(default_root()))
    ap.add_argument("--contexts", type=int, default=96, help="contexts extracted per dtype")
    ap.add_argument("--steps", type=int, default=8, help="family training steps per precision (minus 2 for set-up)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--widths", type=int, nargs="+", help="train this family's widths instead of the profile's")
    ap.add_argument("--ks", type=int, nargs="+", help="... and these k (with --widths)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    if args.widths:
        fam = {"architectures": ["topk"], "widths": args.widths, "ks": args.ks or [32],
               "base": cfg.family.base.model_dump() if cfg.family is not None else cfg.sae.model_dump()}
        cfg = type(cfg).model_validate({**cfg.model_dump(exclude={"sae"}), "family": fam})
    torch.manual_seed(0)
    flags = cpu_bf16_flags()
    members = cfg.sae_configs()
    widest = max(m.width for m in members)

    peak = {dt: matmul_gflops(2048, 2048, 2048, getattr(torch, dt), args.repeats) for dt in ("float32", "bfloat16")}
    print(f"matmul 2048^3: float32 {peak['float32']:.0f} GFLOP/s, bfloat16 {peak['bfloat16']:.0f} GFLOP/s", flush=True)

    ext = {dt: extraction_tps(cfg, args.artifacts, dt, args.contexts) for dt in ("float32", "bfloat16")}
    mflop = ext["float32"][1]
    from saeflow.models import load_model  # d_in of the hook: the model width
    from tasks.model import model_task

    d_in = load_model(cfg.model, model_task.fn(cfg.model, args.artifacts).dir, "cpu").cfg.d_model
    enc = {dt: matmul_gflops(cfg.train.batch_size, d_in, widest, getattr(torch, dt), max(2, args.repeats // 2))
           for dt in ("float32", "bfloat16")}
    for dt, (tps, _) in ext.items():
        print(f"extraction {dt}: {tps:,.0f} tok/s, {tps * mflop / 1e9:.0f} GFLOP/s", flush=True)

    n_batches = max(args.steps, 4)
    batches, source = training_batches(cfg, args.artifacts, d_in, n_batches)
    sflop = sum(sae_flops(m.architecture, d_in, m.width, m.k) for m in members)
    tr = {p: family_tps(cfg, batches, d_in, p, args.steps) for p in ("float32", "bfloat16")}
    for p, tps in tr.items():
        print(f"training {p}: {tps:,.0f} tok/s, {tps * sflop / 1e9:.0f} GFLOP/s", flush=True)

    bf = peak["bfloat16"]
    f_ext = ext["bfloat16"][0] * mflop / 1e9 / bf
    f_tr = tr["bfloat16"] * sflop / 1e9 / bf
    fam = ", ".join(f"{m.architecture}-w{m.width}" + (f"-k{m.k}" if m.k else "") for m in members)
    rows = [
        ("matmul 2048^3", f"{peak['float32']:.0f}", f"{peak['bfloat16']:.0f}", "", "", f"{peak['bfloat16'] / peak['float32']:.2f}x"),
        (f"matmul {cfg.train.batch_size} x {d_in} x {widest} (SAE encoder)", f"{enc['float32']:.0f}", f"{enc['bfloat16']:.0f}",
         "", "", f"{enc['bfloat16'] / enc['float32']:.2f}x"),
        (f"extraction ({mflop / 1e6:.1f} MFLOP/token)", f"{ext['float32'][0] * mflop / 1e9:.0f}",
         f"{ext['bfloat16'][0] * mflop / 1e9:.0f}", f"{ext['float32'][0]:,.0f}", f"{ext['bfloat16'][0]:,.0f}",
         f"{ext['bfloat16'][0] / ext['float32'][0]:.2f}x"),
        (f"family training ({sflop / 1e6:.1f} MFLOP/token)", f"{tr['float32'] * sflop / 1e9:.0f}", f"{tr['bfloat16'] * sflop / 1e9:.0f}",
         f"{tr['float32']:,.0f}", f"{tr['bfloat16']:,.0f}", f"{tr['bfloat16'] / tr['float32']:.2f}x"),
    ]
    table = "| stage | GFLOP/s float32 | GFLOP/s bfloat16 | tokens/s float32 | tokens/s bfloat16 | bf16 / fp32 |\n|---|---|---|---|---|---|\n"
    table += "\n".join("| " + " | ".join(r) + " |" for r in rows)
    body = f"""
## Roofline (`benchmarks/roofline.py`)

Command: `.venv/bin/python benchmarks/roofline.py {' '.join(sys.argv[1:])}`. Machine: {machine()}; CPU native bf16
flags: {', '.join(flags) or 'none'}. Profile `{args.config}`: model {cfg.model.name}, `{cfg.activations.hook}`, context
{cfg.corpus.context_size}, extraction batch {cfg.activations.batch_size} ({args.contexts} contexts per dtype); family {fam}
(batch {cfg.train.batch_size}, {args.steps - 2} timed steps per precision, rows: {source}).

{table}

Fraction of the bf16 matmul peak ({bf:.0f} GFLOP/s), minimal FLOPs: extraction **{f_ext:.2f}** (goal >= 0.5), family
training **{f_tr:.2f}** (goal >= 0.4). In float32, of the float32 peak: extraction
{ext['float32'][0] * mflop / 1e9 / peak['float32']:.2f}, training {tr['float32'] * sflop / 1e9 / peak['float32']:.2f}.
"""
    write_section("roofline" + ("-" + "-".join(map(str, args.widths)) if args.widths else ""), body)
    print(body)
    print(f"fraction of bf16 peak: extraction {f_ext:.2f}, training {f_tr:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
