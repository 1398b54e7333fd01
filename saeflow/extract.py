"""Residual-stream extraction into an :class:`~saeflow.store.ActivationStore`, resumable by batch."""

from __future__ import annotations

import re
import time
from typing import Callable

import numpy as np
import torch

from saeflow.hostmem import reuse_freed_memory
from saeflow.store import ActivationStore

_LAYER = re.compile(r"^blocks\.(\d+)\.")


def hook_layer(hook: str) -> int | None:
    m = _LAYER.match(hook)
    return int(m.group(1)) if m else None


def stop_layer(hook: str, n_layers: int) -> int | None:
    """``stop_at_layer`` that still runs the hook: the block after it (None for the final hooks)."""
    layer = hook_layer(hook)
    if layer is None or layer + 1 >= n_layers:
        return None
    return layer + 1


@torch.inference_mode()
def forward_acts(model, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    """Activations ``[batch, seq, d]`` at ``hook``, stopping the forward right after it."""
    _, cache = model.run_with_cache(
        tokens, names_filter=hook, stop_at_layer=stop_layer(hook, model.cfg.n_layers), return_type=None
    )
    return cache[hook]


@reuse_freed_memory()  # the forward's freed buffers are reused without page faults (saeflow.hostmem)
def extract_activations(
    model,
    contexts: np.ndarray,
    hook: str,
    store: ActivationStore,
    batch_size: int,
    exclude_ids: set[int],
    on_progress: Callable[[int, int, float], None] | None = None,
) -> int:
    """Write activations of every non-special position of ``contexts``, continuing a partial store.

    Returns the number of contexts processed in this call. ``on_progress(done, total, tokens_per_s)``
    is called after each batch.
    """
    if hook not in model.hook_dict:
        raise ValueError(f"hook {hook!r} does not exist on this model; e.g. blocks.0.hook_resid_post")
    n = contexts.shape[0]
    done = int(store.progress()["contexts"])
    device = next(model.parameters()).device
    exclude = torch.tensor(sorted(exclude_ids), dtype=torch.long)
    start_done = done
    t0 = time.perf_counter()
    tokens_seen = 0
    positions = np.arange(contexts.shape[1], dtype=np.int32)
    while done < n:
        end = min(n, done + batch_size)
        toks = torch.from_numpy(contexts[done:end].astype(np.int64))
        acts = forward_acts(model, toks.to(device), hook).float().cpu()
        keep = ~torch.isin(toks, exclude)
        rows = acts[keep].numpy()
        keep_np = keep.numpy()
        ctx_idx = np.broadcast_to(np.arange(done, end, dtype=np.int32)[:, None], toks.shape)[keep_np]
        pos = np.broadcast_to(positions[None, :], toks.shape)[keep_np]
        store.append(rows, toks.numpy()[keep_np], pos, ctx_idx, contexts_done=end)
        tokens_seen += toks.numel()
        done = end
        if on_progress is not None:
            on_progress(done, n, tokens_seen / max(time.perf_counter() - t0, 1e-9))
    return done - start_done
