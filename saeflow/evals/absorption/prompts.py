"""Prompts of the absorption evaluation (SPEC 1.2): the word sample, the ICL prompts, the word
token in each tokenized prompt and the model's activation there.

:func:`build_prompts` makes every prompt the evaluation runs (the probe dataset and the absorption
prompts), :func:`check_prompts` refuses a table too small for a 26-way probe,
:func:`store_rows` / :func:`prompt_activations` give the usable prompts of each kind their rows
in that kind's activation store and run the model on them, and :func:`probe_split` /
:func:`absorb_split` select the rows each later step reads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor


class AbsorptionError(ValueError):
    """Input the absorption evaluation cannot use; the message names the problem and the fix."""


LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = "{word} has the first letter:"
SEPARATOR = "\n"

#: Reasons a word is skipped by :func:`locate_words`.
SKIP_MULTI_TOKEN = "multi_token"
SKIP_RETOKENIZED = "retokenized"
#: Kinds of prompt (``kind`` column of :func:`build_prompts`).
PROBE = "probe"
ABSORB = "absorb"


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
    ok = usable(df, PROBE)
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


def usable(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The prompts of ``kind`` (:data:`PROBE` / :data:`ABSORB`) whose word token was found, in table order."""
    return df[(df["kind"] == kind) & (df["skip"] == "")]


def store_rows(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a ``row`` column: each usable prompt's row in its kind's activation store
    (0, 1, ... in table order), -1 for a skipped prompt."""
    df = df.assign(row=-1)
    for kind in (PROBE, ABSORB):
        keep = usable(df, kind).index
        df.loc[keep, "row"] = np.arange(len(keep))
    return df


def prompt_activations(model: Any, hook: str, prompts: pd.DataFrame, batch_size: int,
                       on_batch: Callable[[int, int], None] | None = None) -> np.ndarray:
    """``[len(prompts), d_model]`` float32: the hook activation at each prompt's word token
    (:func:`word_activations` over the ``tokens`` / ``position`` columns), refusing NaN / inf."""
    acts = np.zeros((len(prompts), model.cfg.d_model), dtype=np.float32)
    for idx, rows in word_activations(model, hook, prompts["tokens"].tolist(), prompts["position"].to_numpy(),
                                      batch_size, on_batch):
        acts[idx] = rows
    if not np.isfinite(acts).all():
        raise AbsorptionError(f"the model produced NaN/inf activations at {hook}; run it in float32")
    return acts


def probe_split(df: pd.DataFrame, acts: dict[str, Tensor], split: str) -> tuple[pd.DataFrame, Tensor]:
    """The usable probe prompts of one split (``train`` / ``test``) and their activations."""
    sel = usable(df, PROBE)
    sel = sel[sel["split"] == split]
    return sel, acts[PROBE][torch.as_tensor(sel["row"].to_numpy())]


def absorb_split(df: pd.DataFrame, acts: dict[str, Tensor],
                 test: pd.DataFrame) -> tuple[pd.DataFrame, Tensor, np.ndarray]:
    """The usable absorption prompts whose word is one of the test probe words ``test``, their
    activations, and per prompt the row of ``test`` holding its word."""
    test_row = {int(t): i for i, t in enumerate(test["token_id"])}
    sel = usable(df, ABSORB)
    sel = sel[sel["token_id"].isin(list(test_row))]
    index = np.array([test_row[int(t)] for t in sel["token_id"]], dtype=np.int64)
    return sel, acts[ABSORB][torch.as_tensor(sel["row"].to_numpy())], index
