"""Extraction throughput: the pipeline's extraction (Zarr writes included) vs a bare
``run_with_cache(..., stop_at_layer=L+1)`` forward on the same model, batch and tokens.

Run: ``.venv/bin/python benchmarks/extraction.py`` (defaults: Gemma 3 270M, blocks.6.hook_resid_post,
256 contexts x 128 tokens, batch 16, 3 alternating repeats, median). Prints ``ratio: <ours/bare>`` last.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import machine, write_section  # noqa: E402
from saeflow.artifacts import default_root  # noqa: E402
from saeflow.config import CorpusConfig, ModelConfig  # noqa: E402
from saeflow.corpus import corpus_contexts, special_token_ids  # noqa: E402
from saeflow.device import pick_device  # noqa: E402
from saeflow.extract import extract_activations, forward_acts  # noqa: E402
from saeflow.models import load_model  # noqa: E402
from saeflow.store import ActivationStore  # noqa: E402
from tasks.model import model_task  # noqa: E402


def bare(model, tokens: np.ndarray, hook: str, batch: int) -> float:
    t0 = time.perf_counter()
    for s in range(0, len(tokens), batch):
        acts = forward_acts(model, torch.from_numpy(tokens[s:s + batch].astype(np.int64)), hook)
        acts.float().cpu()
    return tokens.size / (time.perf_counter() - t0)


def ours(model, tokens: np.ndarray, hook: str, batch: int, exclude: set[int], chunk_rows: int) -> float:
    d = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        t0 = time.perf_counter()
        store = ActivationStore.open_for_write(d, model.cfg.d_model, chunk_rows, "float32", {"hook": hook})
        extract_activations(model, tokens, hook, store, batch, exclude)
        store.finish()
        return tokens.size / (time.perf_counter() - t0)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--hook", default="blocks.6.hook_resid_post")
    ap.add_argument("--contexts", type=int, default=256)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--artifacts", default=str(default_root()))
    args = ap.parse_args()

    mcfg = ModelConfig(name=args.model)
    ref = model_task.fn(mcfg, args.artifacts)
    model = load_model(mcfg, ref.dir, pick_device("auto"))
    tokens = corpus_contexts(CorpusConfig(context_size=args.context_size, n_contexts=args.contexts, eval_contexts=1),
                             model.tokenizer)
    exclude = special_token_ids(model.tokenizer)
    bare(model, tokens[: args.batch], args.hook, args.batch)  # warm-up
    b, o = [], []
    for _ in range(args.repeats):
        b.append(bare(model, tokens, args.hook, args.batch))
        o.append(ours(model, tokens, args.hook, args.batch, exclude, 4096))
        print(f"bare {b[-1]:,.0f} tok/s   ours {o[-1]:,.0f} tok/s", flush=True)
    mb, mo = statistics.median(b), statistics.median(o)
    ratio = mo / mb
    write_section("extraction", f"""
## Extraction throughput (`benchmarks/extraction.py`)

Command: `.venv/bin/python {' '.join(['benchmarks/extraction.py', *sys.argv[1:]])}` ({args.model}, `{args.hook}`, {args.contexts} contexts x
{args.context_size} tokens, batch {args.batch}, {args.repeats} alternating repeats, median). Machine: {machine()}.

| method | tokens/s (median) | runs |
|---|---|---|
| bare `run_with_cache(stop_at_layer=L+1)` | {mb:,.0f} | {", ".join(f"{x:,.0f}" for x in b)} |
| pipeline extraction (Zarr writes included) | {mo:,.0f} | {", ".join(f"{x:,.0f}" for x in o)} |

Ratio ours / bare: **{ratio:.3f}** (goal >= 0.9).
""")
    print(f"ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
