"""Shared builders for pipeline tests: tiny configs on the seeded random HookedTransformer."""

from __future__ import annotations

from pathlib import Path

import yaml

from saeflow.config import PipelineConfig


def tiny_config(**overrides) -> PipelineConfig:
    data = {
        "name": "tiny",
        "model": {"name": "tiny-random", "tiny_layers": 2, "tiny_d_model": 64, "seed": 0},
        "vocab": {"min_tokens": 52},
        "corpus": {"context_size": 32, "n_contexts": 96, "eval_contexts": 16},
        "activations": {"hook": "blocks.1.hook_resid_post", "batch_size": 8, "chunk_rows": 256},
        "sae": {"architecture": "topk", "width": 128, "k": 8},
        "train": {"training_tokens": 256 * 30, "batch_size": 256, "checkpoint_every": 5, "log_every": 5},
        "metrics": {"n_variance_tokens": 512, "ce_batches": 1, "ce_batch_size": 8},
    }
    if "family" in overrides:  # a family replaces the single sae section
        del data["sae"]
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    return PipelineConfig.model_validate(data)


def write_config(cfg: PipelineConfig, path: Path) -> Path:
    data = cfg.model_dump(mode="json")
    if cfg.family is not None:
        del data["sae"]  # a profile sets either sae or family
    else:
        del data["family"]
    path.write_text(yaml.safe_dump(data))
    return path
