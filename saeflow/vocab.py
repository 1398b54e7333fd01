"""Vocabulary for the first-letter spelling task (SPEC 1.2).

Alphabetic tokens, with the tokenizer's leading-space marker (``Ġ`` for byte-level BPE, ``▁`` for
SentencePiece) turned into a real leading space; first-letter labels; an 80/20 split *by token*
made by shuffling the tokens (in token-id order) with ``random.Random(seed).sample``, the draw
SAEBench makes after ``random.seed(seed)``; SAEBench shuffles the tokenizer's dict order, which a
fast tokenizer does not keep stable between calls, so we sort by token id first.
"""

from __future__ import annotations

import random
import re

import pandas as pd

from saeflow.config import VocabConfig

LETTERS = "abcdefghijklmnopqrstuvwxyz"
_ALPHA = re.compile(r" ?[A-Za-z]+")
_BAD_START = re.compile(r"[\d<>]")
_RAW = re.compile(r"[Ġ▁ ]?[A-Za-z]+")


class VocabError(ValueError):
    """The tokenizer cannot support the first-letter task."""


def token_to_string(token: str, tokenizer) -> str:
    """The text a vocabulary entry stands for, with a leading ``▁`` always read as a space."""
    text = tokenizer.convert_tokens_to_string([token])
    if token.startswith("▁") and not text.startswith(" "):
        text = " " + text  # SentencePiece tokenizers drop the leading space of a lone token
    if token.startswith("Ġ") and not text.startswith(" "):
        text = " " + text
    return text


def alpha_tokens(tokenizer) -> pd.DataFrame:
    """Every vocabulary entry that is all ASCII letters, allowing one leading space."""
    rows = []
    special = set(tokenizer.all_special_ids)
    for token, token_id in tokenizer.get_vocab().items():
        # cheap pre-filter on the raw entry: a marker then letters (byte-fallback entries such as
        # <0x41> are excluded, as SAEBench's ``[\d<>]`` rule does)
        if token_id in special or not _RAW.fullmatch(token):
            continue
        text = token_to_string(token, tokenizer)
        if not _ALPHA.fullmatch(text) or _BAD_START.match(text):
            continue
        word = text.lstrip(" ")
        rows.append(
            {
                "token_id": int(token_id),
                "token": token,
                "text": text,
                "leading_space": text.startswith(" "),
                "first_letter": word[0].lower(),
                "label": LETTERS.index(word[0].lower()),
            }
        )
    df = pd.DataFrame(rows, columns=["token_id", "token", "text", "leading_space", "first_letter", "label"])
    # a fast tokenizer's vocab dict comes out in a different order on every call: sort by id so
    # the seeded split is reproducible (SAEBench shuffles the raw dict order, which is not)
    return df.sort_values("token_id", kind="stable").reset_index(drop=True)


def build_vocab(tokenizer, cfg: VocabConfig) -> pd.DataFrame:
    """Alphabetic tokens with their first-letter label and a seeded train/test split column."""
    df = alpha_tokens(tokenizer)
    if len(df) < cfg.min_tokens:
        raise VocabError(
            f"the tokenizer has only {len(df)} alphabetic tokens (minimum {cfg.min_tokens}); the first-letter "
            "task needs a real word-level vocabulary: use another model or lower vocab.min_tokens"
        )
    order = random.Random(cfg.seed).sample(range(len(df)), len(df))
    n_train = int(len(df) * cfg.train_fraction)
    split = ["train"] * n_train + ["test"] * (len(df) - n_train)
    df = df.iloc[order].reset_index(drop=True)
    df["split"] = split
    missing = sorted(set(LETTERS) - set(df["first_letter"]))
    df.attrs["missing_letters"] = missing
    return df
