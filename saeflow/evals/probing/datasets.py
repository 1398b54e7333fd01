"""The probing datasets and their activations (SPEC 5.1-5.2).

The 113 binary-classification sets and the 8 covariate-shift test files shipped in the
``sae-probes`` package (read as data files; the package itself is never imported). Labels are
``LabelEncoder(target)`` over the whole file; ``max_rows`` keeps a class-balanced prefix.
:func:`last_token_activations`: one vector per prompt, the hook's activation at the last real
token; BOS as the model's tokenizer adds it, prompts longer than ``max_seq_len`` cut from the left
(BOS kept), the forward stops after the hook's block. :func:`load_acts` reads a stage's folder.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from saeflow.corpus import probing_dataset_names, sae_probes_data_dir

OOD_SUFFIX = "_OOD"


class ProbingError(ValueError):
    """Probing input that cannot be used (unknown dataset, wrong shapes, NaN activations, ...)."""


@lru_cache(maxsize=1)
def ood_dataset_names() -> tuple[str, ...]:
    """In-distribution names of the datasets that have an ``<name>_OOD`` covariate-shift test file (8)."""
    folder = sae_probes_data_dir() / "OOD data"
    return tuple(sorted(p.name.removesuffix(f"{OOD_SUFFIX}.csv.zst") for p in folder.glob(f"*{OOD_SUFFIX}.csv.zst")))


def dataset_file(name: str, ood: bool = False) -> Path:
    data = sae_probes_data_dir()
    return data / "OOD data" / f"{name}{OOD_SUFFIX}.csv.zst" if ood else data / "cleaned_data" / f"{name}.csv.zst"


def resolve_datasets(requested: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """``(names to run, {unknown name: reason})``; ``None`` = all 113 binary datasets."""
    known = probing_dataset_names()
    if requested is None:
        return list(known), {}
    names, skipped = [], {}
    for n in requested:
        if n in known:
            if n not in names:
                names.append(n)
        else:
            close = [k for k in known if n.lower() in k.lower()][:3]
            skipped[n] = (f"unknown dataset {n!r}: not one of the {len(known)} sae-probes binary datasets"
                          + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return names, skipped


def load_dataset(name: str, ood: bool = False, max_rows: int | None = None) -> tuple[list[str], np.ndarray]:
    """Prompts and ``LabelEncoder(target)`` labels (over the whole file).

    ``max_rows`` (a cap below the file's size) keeps the first ``max_rows // 2`` rows of each class,
    in file order: a class-balanced prefix, so every regime's split can still be drawn (a plain
    prefix of a shuffled balanced file is off balance by ~sqrt(n) rows, enough to make the normal
    split impossible)."""
    path = dataset_file(name, ood)
    if not path.is_file():
        raise ProbingError(f"no {'OOD ' if ood else ''}file for dataset {name!r} at {path}")
    df = pd.read_csv(path)
    if "prompt" not in df.columns or "target" not in df.columns:
        raise ProbingError(f"{path} has no prompt/target columns (columns: {list(df.columns)})")
    classes, y = np.unique(df["target"].values, return_inverse=True)  # = LabelEncoder().fit_transform
    if len(classes) != 2:
        raise ProbingError(f"dataset {name!r} has {len(classes)} classes, a binary dataset needs 2")
    prompts = df["prompt"].astype(str).tolist()
    if max_rows is not None and max_rows < len(y):
        keep = np.sort(np.concatenate([np.flatnonzero(y == c)[: max_rows // 2] for c in (0, 1)]))
        prompts, y = [prompts[i] for i in keep], y[keep]
    return prompts, y.astype(np.int64)


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_seq_len: int) -> list[list[int]]:
    """Token ids per prompt with the tokenizer's own special tokens (BOS for Gemma), cut from the
    left to ``max_seq_len`` tokens (special tokens kept), as the reference tokenises."""
    side = getattr(tokenizer, "truncation_side", "right")
    tokenizer.truncation_side = "left"
    try:
        ids = tokenizer(list(prompts), truncation=True, max_length=max_seq_len)["input_ids"]
    finally:
        tokenizer.truncation_side = side
    if any(len(x) == 0 for x in ids):
        raise ProbingError("a prompt tokenised to zero tokens; the tokenizer adds no BOS and the prompt is empty")
    return [list(x) for x in ids]


@torch.inference_mode()
def last_token_activations(model, token_ids: Sequence[Sequence[int]], hook: str, batch_tokens: int = 4096,
                           pad_id: int = 0) -> np.ndarray:
    """``[n, d_model]`` float32: the hook's activation at each prompt's last token.

    Prompts are batched by length (sorted, right-padded, at most ``batch_tokens`` padded tokens per
    forward); causal attention means the padding after a prompt never changes its activations.
    """
    from saeflow.extract import forward_acts

    n = len(token_ids)
    lengths = np.array([len(t) for t in token_ids])
    order = np.argsort(lengths, kind="stable")
    device = next(model.parameters()).device
    out = np.zeros((n, model.cfg.d_model), dtype=np.float32)
    i = 0
    while i < n:
        j = i + 1
        while j < n and (j - i + 1) * lengths[order[j]] <= batch_tokens:
            j += 1
        idx = order[i:j]
        width = int(lengths[idx].max())
        toks = torch.full((len(idx), width), int(pad_id), dtype=torch.long)
        for r, p in enumerate(idx):
            toks[r, : lengths[p]] = torch.as_tensor(token_ids[p], dtype=torch.long)
        acts = forward_acts(model, toks.to(device), hook).float()
        last = torch.as_tensor(lengths[idx] - 1, device=acts.device)
        out[idx] = acts[torch.arange(len(idx), device=acts.device), last].cpu().numpy()
        i = j
    if not np.isfinite(out).all():
        raise ProbingError(f"non-finite activations at {hook}: run the model in float32 (model.dtype)")
    return out


def load_acts(acts_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(X [n, d] float32, y [n] int64)`` from a probing activation folder (``acts.zarr`` + ``labels.npy``)."""
    from saeflow.store import ActivationStore

    store = ActivationStore.open(acts_dir)
    X = store.read(0, store.n_rows)
    y = np.load(Path(acts_dir) / "labels.npy")
    if len(y) != len(X):
        raise ProbingError(f"{acts_dir}: {len(X)} activation rows but {len(y)} labels; delete the folder to rebuild it")
    return X, y
