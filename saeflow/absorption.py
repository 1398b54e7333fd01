"""Feature absorption on the first-letter task (SPEC 1; Chanin et al. 2409.14507, SAEBench 0.6.0).

Pure functions (torch / numpy / pandas), in pipeline order:

1. **Prompts** (SPEC 1.2): :func:`sample_words` caps the vocabulary (stratified by letter, seeded),
   :func:`icl_prompt` builds ``"\\n" + 10 ICL examples + "{word} has the first letter:"`` with
   Python ``random`` exactly as SAEBench draws them, :func:`locate_words` finds the word token in
   the tokenized prompt (no fixed ``-6``: a word that does not come out as its own single vocab
   token is skipped with a recorded reason), :func:`word_activations` runs the model only up to
   the hook (same-length buckets, no padding).
2. **Ground-truth probe** (SPEC 1.3): :func:`train_linear_probe` (one-vs-rest BCE with
   ``pos_weight``, Adam, exponential lr decay) and :func:`letter_metrics`.
3. **k-sparse probing** (SPEC 1.4): :func:`k_sparse_probing` (L1 probe on SAE latents, signed
   top-k, sklearn refit) and :func:`feature_splits` (F1-jump rule).
4. **Absorption** (SPEC 1.5): :func:`projection_absorption` (absorption fraction, full absorption,
   absorbing latents) and (SPEC 1.6) :func:`ig_latent_attribution` + :func:`is_ablation_absorption`
   (integrated-gradients attribution patching on ``logit(" L") - mean(other 25)``).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = "{word} has the first letter:"
SEPARATOR = "\n"
EPS = 1e-8

#: Reasons a word is skipped by :func:`locate_words`.
SKIP_MULTI_TOKEN = "multi_token"
SKIP_RETOKENIZED = "retokenized"


class AbsorptionError(ValueError):
    """Input the absorption evaluation cannot use; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------- prompts
def answer(word: str) -> str:
    """The first-letter answer of a word: a space and its first letter, upper-cased (``" C"``)."""
    letters = [c for c in word.strip() if c.isalpha()]
    if not letters:
        raise AbsorptionError(f"word {word!r} has no letter")
    return " " + letters[0].upper()


def sample_words(vocab: pd.DataFrame, max_words: int | None, seed: int) -> pd.DataFrame:
    """At most ``max_words`` rows of ``vocab``, stratified by first letter, in vocab order.

    Each letter keeps ``round(max_words * share)`` rows (at least 2 when it has them, so both
    splits can hold it), drawn with ``random.Random(seed)``; ``None`` keeps everything.
    """
    if max_words is None or max_words >= len(vocab):
        return vocab.reset_index(drop=True)
    rng = random.Random(seed)
    keep: list[int] = []
    counts = vocab["first_letter"].value_counts()
    for letter in sorted(counts.index):
        idx = vocab.index[vocab["first_letter"] == letter].tolist()
        n = min(len(idx), max(2, round(max_words * len(idx) / len(vocab))))
        keep += rng.sample(idx, n)
    return vocab.loc[sorted(keep)].reset_index(drop=True)


def icl_prompt(word: str, examples: Sequence[str], rng: random.Random, n_examples: int = 10,
               template: str = TEMPLATE, separator: str = SEPARATOR, max_attempts: int = 1000) -> tuple[str, int]:
    """An ICL prompt for ``word`` and the character offset where ``word`` starts in it.

    SAEBench's draw (SPEC 1.2): ``rng.sample(examples, n_examples)`` redrawn while it contains
    ``word``; each example is ``template.format(word=ex) + answer(ex)``; examples are joined by
    ``separator``, followed by ``separator + template.format(word=word)``, and the separator is
    also prepended to the first example.
    """
    if len(examples) < n_examples:
        raise AbsorptionError(f"only {len(examples)} words to draw {n_examples} ICL examples from; lower "
                              "absorption.icl_examples or use a larger vocabulary")
    for _ in range(max_attempts):
        chosen = rng.sample(list(examples) if not isinstance(examples, list) else examples, n_examples)
        if word not in chosen:
            break
    else:
        raise AbsorptionError(f"could not draw ICL examples without {word!r} in {max_attempts} attempts")
    body = separator.join(template.format(word=ex) + answer(ex) for ex in chosen)
    head = separator + body + separator
    i = template.index("{word}")
    return head + template.format(word=word), len(head) + i


@dataclass
class Located:
    """Tokenized prompts: ``tokens[i]`` (ids, BOS included when prepended), ``position[i]`` of the
    word token (``-1`` when skipped) and ``skip[i]`` (``""`` or a reason)."""

    tokens: list[list[int]]
    position: np.ndarray
    skip: list[str]


def locate_words(tokenizer: Any, prompts: Sequence[str], word_starts: Sequence[int], words: Sequence[str],
                 token_ids: Sequence[int], prepend_bos: bool = True) -> Located:
    """Tokenize each prompt and find the single token holding its target word.

    The word's letters span ``[start + leading spaces, start + len(word))``. Accepted when exactly
    one token overlaps that span and it is the word's vocab token ``token_ids[i]``; otherwise the
    prompt is skipped as :data:`SKIP_MULTI_TOKEN` (the letters fall into several tokens) or
    :data:`SKIP_RETOKENIZED` (one token, but a different one, e.g. merged with the separator).
    """
    enc = tokenizer(list(prompts), add_special_tokens=prepend_bos, return_offsets_mapping=True)
    tokens, pos, skip = [], np.full(len(prompts), -1, dtype=np.int64), []
    for i, (ids, offs) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        w = words[i]
        lo = word_starts[i] + (len(w) - len(w.lstrip(" ")))
        hi = word_starts[i] + len(w)
        over = [j for j, (s, e) in enumerate(offs) if e > s and s < hi and e > lo]
        tokens.append(list(ids))
        if len(over) != 1:
            skip.append(SKIP_MULTI_TOKEN)
        elif ids[over[0]] != token_ids[i]:
            skip.append(SKIP_RETOKENIZED)
        else:
            skip.append("")
            pos[i] = over[0]
    return Located(tokens, pos, skip)


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Index batches of equal-length sequences (no padding needed), in a deterministic order."""
    lengths = np.asarray(lengths)
    out: list[np.ndarray] = []
    for n in np.unique(lengths):
        idx = np.flatnonzero(lengths == n)
        out += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return out


@torch.inference_mode()
def word_activations(model: Any, hook: str, tokens: Sequence[Sequence[int]], positions: np.ndarray,
                     batch_size: int, on_batch: Callable[[int, int], None] | None = None) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(indices, acts [n, d_model] float32)``: the hook activation at each prompt's word token.

    The forward stops right after the hook (``saeflow.extract.forward_acts``); prompts run in
    equal-length batches. ``on_batch(done, total)`` after each batch.
    """
    from saeflow.extract import forward_acts

    dev = next(model.parameters()).device
    batches = length_buckets([len(t) for t in tokens], batch_size)
    done = 0
    for idx in batches:
        toks = torch.tensor([tokens[i] for i in idx], dtype=torch.long, device=dev)
        acts = forward_acts(model, toks, hook)
        rows = acts[torch.arange(len(idx), device=dev), torch.as_tensor(positions[idx], device=dev)]
        done += len(idx)
        if on_batch is not None:
            on_batch(done, len(tokens))
        yield idx, rows.float().cpu().numpy()


# ---------------------------------------------------------------------------------- linear probes
def _exp_decay_gamma(lr: float, end_lr: float, epochs: int) -> float:
    return math.exp(math.log(end_lr / lr) / epochs)


def train_linear_probe(x: Tensor, y: Tensor, *, epochs: int = 50, batch_size: int = 64, lr: float = 1e-2,
                       end_lr: float = 1e-5, weight_decay: float = 1e-4, l1: float = 0.0, seed: int = 0,
                       device: torch.device | str = "cpu", map_x: Callable[[Tensor], Tensor] | None = None,
                       dim: int | None = None) -> tuple[Tensor, Tensor]:
    """One-vs-rest logistic probes ``[n_classes, dim]`` + bias, trained jointly (SPEC 1.3 / 1.4).

    ``y`` is ``[n]`` class ids or ``[n, n_classes]`` multi-hot. Loss ``BCEWithLogits`` with
    ``pos_weight = n_neg / n_pos`` per class, plus ``l1 * mean_class(sum |w|)``; Adam(lr,
    weight_decay), lr multiplied by ``(end_lr / lr) ** (1 / epochs)`` after each epoch; shuffled
    mini-batches from a ``torch.Generator`` seeded with ``seed``. ``map_x`` maps a batch before the
    probe (e.g. SAE encoding) and ``dim`` is then the probe's input width.
    """
    dev = torch.device(device)
    if y.ndim == 1:
        y = F.one_hot(y.long(), num_classes=int(y.max()) + 1)
    y = y.float()
    n, n_cls = y.shape
    if x.shape[0] != n:
        raise AbsorptionError(f"probe data has {x.shape[0]} rows but {n} labels")
    dim = int(dim or x.shape[1])
    pos = y.sum(0)
    pos_weight = ((n - pos) / pos.clamp(min=1)).to(dev)
    gen = torch.Generator().manual_seed(int(seed))
    w = (torch.rand(n_cls, dim, generator=gen) * 2 - 1) / math.sqrt(dim)
    b = (torch.rand(n_cls, generator=gen) * 2 - 1) / math.sqrt(dim)
    w, b = w.to(dev).requires_grad_(True), b.to(dev).requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=_exp_decay_gamma(lr, end_lr, epochs))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            xb = x[idx].to(dev, torch.float32)
            if map_x is not None:
                with torch.no_grad():
                    xb = map_x(xb)
            loss = loss_fn(xb @ w.T + b, y[idx].to(dev))
            if l1:
                loss = loss + l1 * w.abs().sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return w.detach().cpu(), b.detach().cpu()


def binary_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of boolean predictions (0 when undefined, as sklearn)."""
    tp = float(np.sum(pred & truth))
    fp = float(np.sum(pred & ~truth))
    fn = float(np.sum(~pred & truth))
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f1}


def letter_metrics(scores: np.ndarray, labels: np.ndarray, min_f1: float) -> pd.DataFrame:
    """Per-letter P / R / F1 of ``scores [n, 26] > 0`` against ``labels``; ``passes`` = F1 > ``min_f1``."""
    rows = []
    for li, letter in enumerate(LETTERS):
        truth = labels == li
        m = binary_scores(scores[:, li] > 0, truth)
        rows.append({"letter": letter, **m, "n_pos": int(truth.sum()), "passes": bool(m["f1"] > min_f1)})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------- k-sparse probes
@torch.no_grad()
def encode_batched(sae: Any, x: Tensor, batch_size: int = 4096) -> Tensor:
    """``sae.encode`` over rows of ``x`` in batches, on the SAE's device; float32 CPU result."""
    dev = sae.W_dec.device
    return torch.cat([sae.encode(x[s:s + batch_size].to(dev, torch.float32)).float().cpu()
                      for s in range(0, x.shape[0], batch_size)]) if x.shape[0] else torch.zeros(0, sae.W_dec.shape[0])


def k_sparse_probing(f_train: Tensor, y_train: np.ndarray, f_test: Tensor, y_test: np.ndarray, l1_weights: Tensor,
                     max_k: int, letters: Iterable[int]) -> pd.DataFrame:
    """SPEC 1.4 steps 2-4: per letter and k, the signed top-k latents of the L1 probe, an sklearn
    ``LogisticRegression(max_iter=500, class_weight="balanced")`` refit on them, and its test
    precision / recall / F1 (positive when ``f[ids] @ coef + intercept > 0``)."""
    from sklearn.linear_model import LogisticRegression

    rows = []
    for li in letters:
        yt = (y_train == li).astype(np.int64)
        truth = y_test == li
        for k in range(1, max_k + 1):
            ids = torch.topk(l1_weights[li], k).indices.numpy()
            xtr = f_train[:, ids].numpy().astype(np.float64)
            if yt.min() == yt.max():
                coef, icpt = np.zeros(k), -1.0
            else:
                lr = LogisticRegression(max_iter=500, class_weight="balanced").fit(xtr, yt)
                coef, icpt = lr.coef_[0], float(lr.intercept_[0])
            score = f_test[:, ids].numpy().astype(np.float64) @ coef + icpt
            rows.append({"letter": LETTERS[li], "label": li, "k": k, "feats": ids.tolist(), "coef": coef.tolist(),
                         "bias": icpt, **binary_scores(score > 0, truth)})
    return pd.DataFrame(rows)


def feature_splits(ks: pd.DataFrame, jump: float = 0.03) -> pd.DataFrame:
    """Split latents per letter by the F1-jump rule (SPEC 1.4 step 5): walk k = 1, 2, ...; keep
    ``feats_k`` while ``F1_k > previous kept F1 + jump``; stop at the first k that does not."""
    rows = []
    for letter, g in ks.sort_values("k").groupby("letter", sort=True):
        prev, feats, k_sel, coef, bias = -100.0, [], 0, [], 0.0
        for r in g.itertuples():
            if r.f1 > prev + jump:
                prev, feats, k_sel, coef, bias = r.f1, list(r.feats), r.k, list(r.coef), r.bias
            else:
                break
        rows.append({"letter": letter, "label": LETTERS.index(letter), "split_feats": feats,
                     "num_split_feats": len(feats), "split_f1": prev, "k_coef": coef, "k_bias": bias})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- projection absorption
@dataclass(frozen=True)
class ProjectionThresholds:
    """SAEBench's constants (SPEC 1.5)."""

    full_cos: float = 0.025
    fraction_cos: float = 0.1
    share: float = 0.4
    max_absorbing: int = 3
    top_k: int = 10


@torch.no_grad()
def projection_absorption(acts: Tensor, f: Tensor, probe_w: Tensor, W_dec: Tensor, split_feats: Sequence[int],
                          th: ProjectionThresholds = ProjectionThresholds()) -> pd.DataFrame:
    """Absorption fraction and full absorption per prompt of one letter (SPEC 1.5).

    ``acts [n, d]`` raw activations, ``f [n, d_sae]`` their SAE latents, ``probe_w [d]`` the
    letter's probe, ``W_dec [d_sae, d]``. Returns one row per prompt: ``absorption_fraction``,
    ``is_full_absorption``, ``probe_projection`` (A), ``main_projection`` (M), ``absorbing``
    (the up-to-3 candidate latents of T, by projection), ``absorbing_proj`` / ``absorbing_cos``,
    ``top_latent`` / ``top_proj`` / ``top_cos`` (the largest projection over all latents).
    """
    p = probe_w.float() / probe_w.float().norm().clamp(min=EPS)
    cos = F.normalize(W_dec.float(), dim=-1) @ p  # [d_sae]
    proj = f.float() * cos  # [n, d_sae]
    A = acts.float() @ p
    split = torch.as_tensor(list(split_feats), dtype=torch.long)
    M = proj[:, split].sum(-1) if len(split) else torch.zeros(len(A))
    cand_mask = (cos >= th.fraction_cos)[None, :] & (proj > 0)
    if len(split):
        cand_mask[:, split] = False
    cand_proj = torch.where(cand_mask, proj, torch.full_like(proj, -torch.inf))
    m = min(th.max_absorbing, proj.shape[1])
    tv, ti = cand_proj.topk(m, dim=-1)
    valid = torch.isfinite(tv)
    T = torch.where(valid, tv, torch.zeros_like(tv)).sum(-1)
    top_v, top_i = proj.topk(min(th.top_k, proj.shape[1]), dim=-1)
    main_off = (f[:, split] < EPS).all(-1) if len(split) else torch.ones(len(A), dtype=torch.bool)
    rows = []
    for j in range(len(A)):
        a, mm, t = float(A[j]), float(M[j]), float(T[j])
        if mm >= a or a == 0 or t / a < th.share:
            frac = 0.0
        elif mm <= 0:
            frac = 1.0
        else:
            x = min(t, a - mm)
            frac = float(np.clip(x / (x + mm), 0.0, 1.0))
        t1 = int(top_i[j, 0])
        full = bool(main_off[j]) and float(cos[t1]) >= th.full_cos and a >= 0 and a != 0 and float(top_v[j, 0]) / a >= th.share
        ab = [int(i) for i, ok in zip(ti[j].tolist(), valid[j].tolist()) if ok]
        rows.append({"probe_projection": a, "main_projection": mm, "absorbing_projection": t,
                     "absorption_fraction": frac, "is_full_absorption": full,
                     "absorbing": ab, "absorbing_proj": [float(proj[j, i]) for i in ab],
                     "absorbing_cos": [float(cos[i]) for i in ab],
                     "top_latent": t1, "top_proj": float(top_v[j, 0]), "top_cos": float(cos[t1])})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------- ablation (IG) absorption
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


def summarize(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``statistics.stdev``; NaN below two values)."""
    v = [float(x) for x in values if x == x]
    if not v:
        return float("nan"), float("nan")
    mean = float(np.mean(v))
    std = float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
    return mean, std


# ------------------------------------------------------------------------------- whole-stage steps
PROBE = "probe"
ABSORB = "absorb"


def build_prompts(vocab: pd.DataFrame, tokenizer: Any, max_words: int | None, n_examples: int, seed: int,
                  prepend_bos: bool = True, template: str = TEMPLATE) -> pd.DataFrame:
    """Every prompt the evaluation runs, one row each (the probe dataset and the absorption prompts).

    ``vocab`` is the vocab stage's table (``token_id, text, first_letter, label, split``).
    ``kind == "probe"``: one prompt per sampled word, ICL examples from the same split of the whole
    vocabulary, drawn with ``random.Random(seed)`` (train words first, then test words).
    ``kind == "absorb"``: one fresh prompt per sampled test word, examples from the whole vocabulary
    (SAEBench's absorption prompts), drawn with ``random.Random(seed + 1)``.
    Columns: ``kind, split, token_id, word, label, prompt, position, n_tokens, skip`` (``skip`` is
    ``""`` or :data:`SKIP_MULTI_TOKEN` / :data:`SKIP_RETOKENIZED`; ``position`` is -1 then) and
    ``tokens`` (the token ids).
    """
    words = sample_words(vocab, max_words, seed)
    pools = {s: vocab.loc[vocab["split"] == s, "text"].tolist() for s in ("train", "test")}
    everything = vocab["text"].tolist()
    rows: list[dict[str, Any]] = []
    rng = random.Random(seed)
    for split in ("train", "test"):
        for r in words[words["split"] == split].itertuples():
            text, start = icl_prompt(r.text, pools[split], rng, n_examples, template)
            rows.append({"kind": PROBE, "split": split, "token_id": int(r.token_id), "word": r.text,
                         "label": int(r.label), "prompt": text, "start": start})
    rng = random.Random(seed + 1)
    for r in words[words["split"] == "test"].itertuples():
        text, start = icl_prompt(r.text, everything, rng, n_examples, template)
        rows.append({"kind": ABSORB, "split": "test", "token_id": int(r.token_id), "word": r.text,
                     "label": int(r.label), "prompt": text, "start": start})
    df = pd.DataFrame(rows)
    loc = locate_words(tokenizer, df["prompt"].tolist(), df["start"].tolist(), df["word"].tolist(),
                       df["token_id"].tolist(), prepend_bos)
    df["position"] = loc.position
    df["skip"] = loc.skip
    df["tokens"] = loc.tokens
    df["n_tokens"] = [len(t) for t in loc.tokens]
    return df.drop(columns=["start"])


def check_prompts(df: pd.DataFrame, min_letters: int) -> None:
    """Refuse a prompt table that cannot train a 26-way probe: too few usable words per split."""
    ok = df[(df["skip"] == "") & (df["kind"] == PROBE)]
    for split in ("train", "test"):
        letters = ok.loc[ok["split"] == split, "label"].nunique()
        if letters < min_letters:
            n_skip = int((df["skip"] != "").sum())
            raise AbsorptionError(
                f"only {letters} letters have usable {split} words ({len(ok[ok['split'] == split])} words; "
                f"{n_skip} prompts skipped as multi-token or retokenized words); the first-letter probe needs "
                f"at least absorption.min_letters={min_letters}: raise absorption.max_words or use a model "
                "whose tokenizer has more alphabetic tokens"
            )


@dataclass
class SAEEval:
    """What :func:`evaluate_sae` returns: tables and the flat summary."""

    letters: pd.DataFrame
    k_sparse: pd.DataFrame
    prompts: pd.DataFrame
    ablation: pd.DataFrame
    summary: dict[str, float]


def evaluate_sae(sae: Any, probe_w: Tensor, probe_b: Tensor, passing: Sequence[int], train_acts: Tensor,
                 train_y: np.ndarray, test_acts: Tensor, test_y: np.ndarray, absorb_acts: Tensor,
                 absorb_test_index: np.ndarray, absorb_words: Sequence[str], test_words: Sequence[str], *,
                 max_k: int = 10, l1_decay: float = 0.01, sparse_epochs: int = 50, sparse_batch_size: int = 4096,
                 jump: float = 0.03, seed: int = 42, device: torch.device | str = "cpu",
                 th: ProjectionThresholds = ProjectionThresholds(),
                 ablation: Callable[[pd.DataFrame, Tensor], pd.DataFrame] | None = None,
                 max_ablation_prompts: int = 200, log: Callable[[str], None] | None = None) -> SAEEval:
    """Feature splitting and absorption of one SAE (SPEC 1.4-1.6) on the shared probe data.

    ``absorb_test_index[j]`` is the row of ``test_acts`` whose word the absorption prompt ``j``
    holds. ``ablation(candidates, f)`` runs the paper's IG test on the sampled candidate absorption
    prompts (rows of ``prompts``, with their latents ``f``) and returns per-prompt
    ``is_absorption`` / ``top_latents`` / ``top_attr``; ``None`` skips the ablation rate.
    """
    say = log or (lambda _m: None)
    passing = list(passing)
    f_train = encode_batched(sae, train_acts)
    f_test = encode_batched(sae, test_acts)
    f_abs = encode_batched(sae, absorb_acts)
    say(f"L1 probe on {f_train.shape[1]} latents ({f_train.shape[0]} train words)")
    l1_w, _ = train_linear_probe(f_train, torch.as_tensor(train_y), epochs=sparse_epochs, batch_size=sparse_batch_size,
                                 lr=1e-2, end_lr=1e-5, weight_decay=1e-6, l1=l1_decay, seed=seed, device=device)
    ks = k_sparse_probing(f_train, train_y, f_test, test_y, l1_w, max_k, passing)
    splits = feature_splits(ks, jump).set_index("label")
    probe_scores_test = (test_acts.float() @ probe_w.T + probe_b).numpy()
    W_dec = sae.W_dec.detach().float().cpu()
    cos_all = F.normalize(W_dec, dim=-1) @ F.normalize(probe_w.float(), dim=-1).T  # [d_sae, 26]
    letter_rows, prompt_frames, abl_frames = [], [], []
    rng = random.Random(seed)
    for li in passing:
        split = splits.loc[li]
        feats = list(split["split_feats"])
        tp = np.flatnonzero((test_y == li) & (probe_scores_test[:, li] > 0))
        js = np.flatnonzero(np.isin(absorb_test_index, tp))  # absorption prompts of the true positives
        n_tp = len(js)
        res = projection_absorption(absorb_acts[js], f_abs[js], probe_w[li], W_dec, feats, th)
        res.insert(0, "letter", LETTERS[li])
        res.insert(1, "word", [absorb_words[j] for j in js])
        res.insert(2, "absorb_row", js)
        res["main_latents"] = [feats] * len(res)
        res["main_acts"] = [[float(f_abs[j, i]) for i in feats] for j in js]
        prompt_frames.append(res)
        row = {"letter": LETTERS[li], "num_probe_true_positives": n_tp, "split_feats": feats,
               "num_split_feats": len(feats), "split_f1": float(split["split_f1"]),
               "mean_absorption_fraction": float(res["absorption_fraction"].sum() / n_tp) if n_tp else float("nan"),
               "full_absorption_rate": float(res["is_full_absorption"].sum() / n_tp) if n_tp else float("nan"),
               "absorption_rate": float("nan"), "ablation_candidates": 0, "ablation_sampled": 0, "ablation_absorbed": 0}
        if ablation is not None and n_tp:
            coef = np.asarray(split["k_coef"], dtype=np.float64)
            k_score = f_test[:, feats].numpy().astype(np.float64) @ coef + float(split["k_bias"])
            fn = set(np.flatnonzero((test_y == li) & (probe_scores_test[:, li] > 0) & (k_score <= 0)).tolist())
            cand = [j for j in js if int(absorb_test_index[j]) in fn]
            cand = [j for j in cand if float(f_abs[j, feats].sum()) < EPS]  # main latents already firing: no absorption
            portion = 1.0
            if len(cand) > max_ablation_prompts:
                portion = max_ablation_prompts / len(cand)
                cand = sorted(rng.sample(cand, max_ablation_prompts))
            row["ablation_candidates"] = len(cand)
            row["_portion"] = portion
            row["absorption_rate"] = 0.0
            if cand:
                sub = pd.DataFrame({"letter": LETTERS[li], "label": li, "absorb_row": cand,
                                    "word": [absorb_words[j] for j in cand]})
                sub["main_latents"] = [feats] * len(sub)
                abl_frames.append(sub)
        letter_rows.append(row)
        say(f"letter {LETTERS[li]}: split latents {feats}, fraction {row['mean_absorption_fraction']:.3f}, "
            f"full {row['full_absorption_rate']:.3f}, IG candidates {row['ablation_candidates']}")
    abl = pd.DataFrame()
    if ablation is not None and abl_frames:
        # one IG pass over every letter's sampled candidates (few large batches, not one per letter)
        allc = pd.concat(abl_frames, ignore_index=True)
        abl = ablation(allc, f_abs[allc["absorb_row"].tolist()])
        for row in letter_rows:
            hits = abl[abl["letter"] == row["letter"]]
            if len(hits):
                n_abs = int(hits["is_absorption"].sum())
                row.update(ablation_sampled=len(hits), ablation_absorbed=n_abs,
                           absorption_rate=(n_abs / row["_portion"]) / row["num_probe_true_positives"])
    for row in letter_rows:
        row.pop("_portion", None)
    letters = pd.DataFrame(letter_rows)
    summary: dict[str, float] = {}
    for col, name in (("mean_absorption_fraction", "fraction"), ("full_absorption_rate", "full"),
                      ("num_split_feats", "split_features"), ("absorption_rate", "rate")):
        mean, std = summarize(letters[col].tolist()) if len(letters) else (float("nan"), float("nan"))
        summary[f"absorption_mean_{name}"] = mean
        summary[f"absorption_std_{name}"] = std
    summary["absorption_rate"] = summary.pop("absorption_mean_rate")
    summary["absorption_letters"] = float(len(letters))
    prompts = pd.concat(prompt_frames, ignore_index=True) if prompt_frames else pd.DataFrame()
    return SAEEval(letters=letters, k_sparse=ks, prompts=prompts, ablation=abl, summary=summary)


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


def example_absorptions(prompts: pd.DataFrame, ablation: pd.DataFrame, n: int = 30) -> pd.DataFrame:
    """A table of example absorptions: full absorptions (projection) first, then the paper's
    (ablation) ones: word, letter, main latent(s), absorbing latent, its probe cosine and its share
    of the probe projection (projection) or attribution (ablation)."""
    rows = []
    if len(prompts):
        full = prompts[prompts["is_full_absorption"]].sort_values("top_proj", ascending=False)
        for r in full.head(n).itertuples():
            rows.append({"method": "projection", "word": r.word, "letter": r.letter, "main_latents": list(r.main_latents),
                         "absorbing_latent": int(r.top_latent), "cosine": float(r.top_cos),
                         "share": float(r.top_proj / r.probe_projection) if r.probe_projection else float("nan")})
    if len(ablation):
        hits = ablation[ablation["is_absorption"]]
        for r in hits.head(n).itertuples():
            tot = sum(abs(v) for v in r.top_attr) or float("nan")
            rows.append({"method": "ablation", "word": r.word, "letter": r.letter, "main_latents": list(r.main_latents),
                         "absorbing_latent": int(r.top_latents[0]), "cosine": float(r.top_cos[0]),
                         "share": abs(float(r.top_attr[0])) / tot})
    return pd.DataFrame(rows, columns=["method", "word", "letter", "main_latents", "absorbing_latent", "cosine", "share"])
