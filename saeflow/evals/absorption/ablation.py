"""The paper's ablation absorption (SPEC 1.6): integrated-gradients attribution patching of the SAE
latents at the word position on ``logit(" L") - mean(other 25)``, and the per-prompt decision."""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from saeflow.evals.absorption.projection import EPS
from saeflow.evals.absorption.prompts import LETTERS, AbsorptionError, length_buckets


def letter_token_ids(tokenizer: Any) -> list[int]:
    """Token ids of the 26 answers ``" A"`` ... ``" Z"``; each must be a single token."""
    out = []
    for c in LETTERS.upper():
        ids = tokenizer(" " + c, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise AbsorptionError(f"the answer {' ' + c!r} is {len(ids)} tokens in this tokenizer; the ablation "
                                  "metric needs single-token letters (set absorption.ablation: false)")
        out.append(int(ids[0]))
    return out


def _hook_split(model: Any, hook: str) -> tuple[str, int] | None:
    m = re.fullmatch(r"blocks\.(\d+)\.(hook_resid_post|hook_resid_pre)", hook)
    if not m:
        return None
    layer = int(m.group(1))
    return ("post", layer + 1) if m.group(2) == "hook_resid_post" else ("pre", layer)


def letter_logits(model: Any, resid_final: Tensor, letter_ids: Sequence[int]) -> Tensor:
    """The 26 answer logits from the last block's residual at the last position: final norm and
    the unembedding restricted to those columns (plus the logit soft-cap when the model has one)."""
    x = model.ln_final(resid_final[:, -1:, :])[:, 0]
    ids = torch.as_tensor(list(letter_ids), device=x.device)
    logits = x @ model.W_U[:, ids] + model.b_U[ids]
    cap = float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0)
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def first_letter_metric(logits26: Tensor, labels: Tensor) -> Tensor:
    """``logit(correct letter) - mean(logit of the other 25)`` per row."""
    correct = logits26.gather(1, labels[:, None])[:, 0]
    return correct - (logits26.sum(1) - correct) / (logits26.shape[1] - 1)


def prefix_cache(model: Any, clean_resid: Tensor, start: int, prefix_len: int) -> Any:
    """A frozen key/value cache of the layers ``start..`` for the first ``prefix_len`` positions,
    built from the clean residual entering block ``start``. Positions before the patched one never
    change (causal attention), so the patched forward only has to run the positions after it."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    cache = TransformerLensKeyValueCache.init_cache(model.cfg, clean_resid.device, clean_resid.shape[0])
    if prefix_len > 0:
        with torch.no_grad():
            model(clean_resid[:, :prefix_len], start_at_layer=start, stop_at_layer=model.cfg.n_layers,
                  past_kv_cache=cache)
    cache.freeze()
    return cache


def run_from_hook(model: Any, hook: str, tokens: Tensor, patched: Tensor, position: Tensor,
                  clean_resid: Tensor | None, cache: Any = None) -> Tensor:
    """Final-block residual ``[b, seq', d]`` with the hook activation at ``position`` replaced by
    ``patched [b, d]``. Residual hooks restart from the cached clean residual (``start_at_layer``);
    with ``cache`` (:func:`prefix_cache`, all rows sharing ``position``) only the positions from
    ``position`` on are run (``seq' = seq - position``). Other hooks run the whole model with a
    replacing hook."""
    n_layers = model.cfg.n_layers
    split = _hook_split(model, hook)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    if split is not None and clean_resid is not None:
        start = split[1]
        if cache is not None:
            p0 = int(position[0])
            resid = clean_resid[:, p0:].clone()
            resid[:, 0] = patched
            if start >= n_layers:
                return resid
            return model(resid, start_at_layer=start, stop_at_layer=n_layers, past_kv_cache=cache)
        resid = clean_resid.clone()
        resid[rows, position] = patched
        if start >= n_layers:
            return resid
        return model(resid, start_at_layer=start, stop_at_layer=n_layers, tokens=tokens)

    def replace(act: Tensor, hook: Any) -> Tensor:  # noqa: ARG001
        act = act.clone()
        act[rows, position] = patched
        return act

    with model.hooks(fwd_hooks=[(hook, replace)]):
        return model(tokens, stop_at_layer=n_layers)


def ig_latent_attribution(model: Any, hook: str, sae: Any, tokens: Tensor, position: Tensor, labels: Tensor,
                          letter_ids: Sequence[int], steps: int = 6) -> tuple[Tensor, Tensor, Tensor]:
    """Integrated-gradients attribution patching of the SAE latents at the word position (SPEC 1.6).

    The SAE is spliced in at ``hook`` with its error term, so the forward is exact. The word
    position's latents ``f`` and error ``e`` are interpolated towards zero, ``alpha = i / steps``
    for ``i < steps`` (the hook input there is ``decode((1-alpha) f) + (1-alpha) e``, i.e.
    ``b_dec + (1-alpha)(x - b_dec)``), the gradient of the first-letter metric with respect to
    the latents is averaged over the steps, and ``attribution = (0 - f) * mean_grad``.

    ``tokens [b, seq]`` (equal lengths), ``position [b]``, ``labels [b]``. Returns
    ``(attribution [b, d_sae], f [b, d_sae], clean metric [b])``.
    """
    from saeflow.extract import forward_acts

    dev = tokens.device
    b = tokens.shape[0]
    rows = torch.arange(b, device=dev)
    with torch.no_grad():
        acts = forward_acts(model, tokens, hook).clone()  # a normal tensor (forward_acts runs in inference mode)
        clean = acts if _hook_split(model, hook) is not None else None
        x = acts[rows, position].float().clone()
        f = sae.encode(x.to(sae.W_dec.device)).float().to(dev)
        b_dec = sae.b_dec.detach().float().to(dev)
    alphas = torch.arange(steps, device=dev, dtype=torch.float32) / steps
    grads = torch.zeros(b, x.shape[1], device=dev)
    metric0 = torch.zeros(b, device=dev)
    dtype = next(model.parameters()).dtype
    split = _hook_split(model, hook)
    cache = None
    if split is not None and split[1] < model.cfg.n_layers and bool((position == position[0]).all()):
        cache = prefix_cache(model, clean, split[1], int(position[0]))
    for ai, alpha in enumerate(alphas.tolist()):
        patched = (b_dec + (1 - alpha) * (x - b_dec)).to(dtype).detach().requires_grad_(True)
        with torch.enable_grad():
            resid = run_from_hook(model, hook, tokens, patched, position, clean, cache)
            m = first_letter_metric(letter_logits(model, resid, letter_ids).float(), labels)
            (g,) = torch.autograd.grad(m.sum(), patched)
        grads += g.float()
        if ai == 0:
            metric0 = m.detach()
    grads /= steps
    W_dec = sae.W_dec.detach().float().to(dev)
    grad_f = grads @ W_dec.T  # d metric / d f = W_dec @ d metric / d x
    return (-f * grad_f).cpu(), f.cpu(), metric0.cpu()


def is_ablation_absorption(attr: Tensor, f: Tensor, cos: Tensor, split_feats: Sequence[int], top_k: int = 10,
                           delta: float = 1.0, cos_threshold: float = 0.025) -> tuple[bool, list[int], list[float]]:
    """The paper's absorption test for one prompt (SPEC 1.6): every split latent is off, the
    latent with the largest ``|attribution|`` has attribution <= 0, beats the second by >= ``delta``
    in ``|attribution|`` and has probe cosine >= ``cos_threshold``. Returns (decision, top ids, their
    attributions)."""
    top = attr.abs().topk(min(top_k, attr.shape[0])).indices.tolist()
    vals = [float(attr[i]) for i in top]
    if len(split_feats) and not all(float(f[i]) < EPS for i in split_feats):
        return False, top, vals
    if vals[0] > 0:
        return False, top, vals
    if len(vals) > 1 and abs(vals[0]) - abs(vals[1]) < delta:
        return False, top, vals
    if float(cos[top[0]]) < cos_threshold:
        return False, top, vals
    return True, top, vals


def absorb_tokens(tokenizer: Any, prompts: pd.DataFrame, prepend_bos: bool, data_dir: Any) -> list[list[int]]:
    """The token ids of the absorption prompts (``prompt`` column), checked against the ``n_tokens``
    recorded when the data stage (folder ``data_dir``) ran."""
    toks = [tokenizer(p, add_special_tokens=prepend_bos)["input_ids"] for p in prompts["prompt"]]
    bad = [i for i, (t, n) in enumerate(zip(toks, prompts["n_tokens"])) if len(t) != n]
    if bad:
        raise AbsorptionError(f"{len(bad)} absorption prompts tokenize differently than when the data stage "
                              f"ran (tokenizer changed?); delete {data_dir} and re-run")
    return toks


def ablation_runner(model: Any, hook: str, sae: Any, tokens: Sequence[Sequence[int]], positions: np.ndarray,
                    probe_w: Tensor, letter_ids: Sequence[int], steps: int, batch_size: int, top_k: int = 10,
                    delta: float = 1.0, cos_threshold: float = 0.025) -> Callable[[pd.DataFrame, Tensor], pd.DataFrame]:
    """The ``ablation`` callback of :func:`evaluate_sae`: IG attribution (:func:`ig_latent_attribution`)
    in equal-length batches and :func:`is_ablation_absorption` per prompt. ``tokens`` /
    ``positions`` are indexed by ``absorb_row``."""
    dev = next(model.parameters()).device
    cos = (F.normalize(sae.W_dec.detach().float().cpu(), dim=-1) @ F.normalize(probe_w.float(), dim=-1).T)

    def run(sub: pd.DataFrame, _f: Tensor) -> pd.DataFrame:
        rows = sub["absorb_row"].to_numpy()
        out: dict[int, dict[str, Any]] = {}
        keys = [len(tokens[r]) * 100_000 + int(positions[r]) for r in rows]
        for idx in length_buckets(keys, batch_size):
            rr = rows[idx]
            toks = torch.tensor([list(tokens[r]) for r in rr], dtype=torch.long, device=dev)
            pos = torch.as_tensor(positions[rr], device=dev)
            labels = torch.as_tensor(sub["label"].to_numpy()[idx], device=dev)
            attr, f, metric = ig_latent_attribution(model, hook, sae, toks, pos, labels, letter_ids, steps)
            for n, i in enumerate(idx):
                li = int(labels[n])
                ok, top, vals = is_ablation_absorption(attr[n], f[n], cos[:, li], sub["main_latents"].iloc[i], top_k,
                                                       delta, cos_threshold)
                out[int(i)] = {"is_absorption": ok, "top_latents": top, "top_attr": vals,
                               "top_cos": [float(cos[t, li]) for t in top], "top_acts": [float(f[n, t]) for t in top],
                               "metric": float(metric[n])}
        extra = pd.DataFrame([out[i] for i in range(len(sub))])
        return pd.concat([sub.reset_index(drop=True), extra], axis=1)

    return run
