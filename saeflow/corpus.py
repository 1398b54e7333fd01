"""Fixed-length token contexts for SAE training.

Default source: the real texts shipped inside the ``sae-probes`` package. Every prompt of a
dataset the probing evaluation can use (the 113 binary-classification sets and the OOD test files)
is excluded, so the SAE never trains on a probing prompt; what remains are the 42 continuous /
multiclass datasets' unique prompts (~75k texts, ~16M characters). A Hugging Face ``datasets``
source is kept for users with a hub.

Documents are shuffled (seeded), tokenized without special tokens, joined with the tokenizer's EOS
(or BOS) as separator, and cut into ``context_size - 1`` token pieces, each prefixed by BOS.
"""

from __future__ import annotations

import glob
import random
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np

from saeflow.config import CorpusConfig


class CorpusError(ValueError):
    """The corpus cannot be built as configured."""


def sae_probes_data_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("sae_probes")  # locate, do not import (it imports sae_lens)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("package sae-probes is not installed; run `make install`")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@lru_cache(maxsize=1)
def probing_dataset_names() -> tuple[str, ...]:
    """Names (file stems) of the binary-classification datasets the probing evaluation uses."""
    import pandas as pd

    master = pd.read_csv(sae_probes_data_dir() / "probing_datasets_MASTER.csv.zst")
    master = master[master["Dataset save name"].notna()]
    binary = master[master["Data type"] == "Binary Classification"]["Dataset save name"]
    return tuple(sorted(Path(str(s)).name.removesuffix(".csv") for s in binary))


def sae_probes_texts(exclude_probing: bool = True) -> list[str]:
    """Unique prompts of the non-probing sae-probes datasets, in a fixed (sorted) order."""
    import pandas as pd

    data = sae_probes_data_dir()
    probing = set(probing_dataset_names())
    keep: set[str] = set()
    excluded: set[str] = set()
    for f in sorted(glob.glob(str(data / "cleaned_data" / "*.csv.zst"))):
        name = Path(f).name.removesuffix(".csv.zst")
        prompts = pd.read_csv(f, usecols=["prompt"])["prompt"].dropna().astype(str)
        (excluded if (exclude_probing and name in probing) else keep).update(prompts)
    if exclude_probing:
        for f in sorted(glob.glob(str(data / "OOD data" / "*.csv.zst"))):
            ood = pd.read_csv(f)
            cols = ["prompt"] if "prompt" in ood.columns else [c for c in ood.columns if ood[c].dtype == object]
            for c in cols:  # 66_living-room_translations has Language/Translation columns
                excluded.update(ood[c].dropna().astype(str))
    texts = sorted(t for t in keep - excluded if t.strip())
    if not texts:
        raise CorpusError("no corpus texts left after excluding the probing datasets")
    return texts


def hf_texts(cfg: CorpusConfig) -> Iterator[str]:
    """Texts streamed from a Hugging Face dataset (needs internet)."""
    try:
        import datasets

        ds = datasets.load_dataset(cfg.hf_dataset, split=cfg.hf_split, streaming=True)
        for row in ds.shuffle(seed=cfg.seed, buffer_size=10_000):
            yield str(row[cfg.hf_text_column])
    except Exception as exc:
        raise CorpusError(
            f"could not stream {cfg.hf_dataset!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "without internet use corpus.source: sae-probes (the offline default)"
        ) from exc


def build_contexts(texts: Iterator[str] | list[str], tokenizer, context_size: int, n_contexts: int,
                   prepend_bos: bool = True, batch: int = 512) -> np.ndarray:
    """Pack documents into ``[n_contexts, context_size]`` int32 token ids."""
    bos = tokenizer.bos_token_id
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    if prepend_bos and bos is None:
        raise CorpusError("model.prepend_bos is true but the tokenizer has no BOS token; set model.prepend_bos: false")
    body = context_size - 1 if prepend_bos else context_size
    need = body * n_contexts
    stream: list[int] = []
    pending: list[str] = []

    def flush() -> None:
        enc = tokenizer(pending, add_special_tokens=False)["input_ids"]
        for ids in enc:
            stream.extend(ids)
            if sep is not None:
                stream.append(sep)
        pending.clear()

    for text in texts:
        pending.append(text)
        if len(pending) >= batch:
            flush()
            if len(stream) >= need:
                break
    if pending and len(stream) < need:
        flush()
    if len(stream) < need:
        raise CorpusError(
            f"corpus holds {len(stream)} tokens but {need} are needed for {n_contexts} contexts of "
            f"{context_size}; lower corpus.n_contexts or corpus.context_size"
        )
    body_ids = np.asarray(stream[:need], dtype=np.int32).reshape(n_contexts, body)
    if prepend_bos:
        body_ids = np.concatenate([np.full((n_contexts, 1), bos, dtype=np.int32), body_ids], axis=1)
    return body_ids


def corpus_contexts(cfg: CorpusConfig, tokenizer, prepend_bos: bool = True) -> np.ndarray:
    if cfg.source == "sae-probes":
        texts: Iterator[str] | list[str] = sae_probes_texts(cfg.exclude_probing_datasets)
        texts = random.Random(cfg.seed).sample(texts, len(texts))
    else:
        texts = hf_texts(cfg)
    return build_contexts(texts, tokenizer, cfg.context_size, cfg.n_contexts, prepend_bos)


def special_token_ids(tokenizer) -> set[int]:
    """Token ids never used as SAE data (BOS, EOS, pad and other special tokens)."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids.update(tokenizer.all_special_ids)
    return {int(i) for i in ids if i is not None}
