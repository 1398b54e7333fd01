"""The absorption evaluation's config (composed into the profile by :mod:`saeflow.config`).

Imports only pydantic and :mod:`saeflow.frozen`, so :mod:`saeflow.config` stays light.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from saeflow.frozen import Frozen, operational

__all__ = ["AbsorptionConfig"]


class AbsorptionConfig(Frozen):
    """Feature absorption on the first-letter task (SPEC 1). Owned by :mod:`saeflow.evals.absorption`."""

    seed: int = 42
    """Seed of prompt sampling (Python ``random``) and probe training."""

    max_words: int | None = Field(None, ge=52)
    """Cap on the vocabulary words turned into probe prompts, drawn stratified by first letter
    (seeded); ``None`` uses every alphabetic token (SPEC; ~140k on Gemma 3, hours on a CPU)."""

    icl_examples: int = Field(10, ge=0)
    """In-context examples per prompt, drawn from the same split (SPEC 1.2: 10)."""

    batch_size: int = operational(32, "Prompts per model forward.")
    """Prompts per model forward (equal-length batches)."""

    probe_solver: Literal["adam", "fista"] = "adam"
    """Ground-truth probe solver: ``adam`` (SPEC 1.3: mini-batch Adam, lr decaying exponentially to
    1e-5 over ``probe_steps``) or ``fista`` (deterministic full-batch proximal gradient to
    convergence); both minimise the same objective (:mod:`saeflow.evals.absorption.probes`)."""

    probe_steps: int = Field(2500, ge=1)
    """Ground-truth probe: optimiser steps (``adam``) or the iteration cap (``fista``). 2,500 is
    SAEBench's 50 epochs of batch 64 at the quick profile's 3,200 train words; the stage records
    whether the probe converged (``probe_convergence.json``) and warns when it did not."""

    probe_batch_size: int = Field(64, ge=1)
    """Ground-truth probe: ``adam`` mini-batch size (SPEC 1.3: 64; capped at the train words)."""

    probe_lr: float = Field(1e-2, gt=0.0)
    """Ground-truth probe: Adam learning rate at the start (decays exponentially to 1e-5)."""

    probe_weight_decay: float = Field(1e-4, ge=0.0)
    """Ground-truth probe: Adam weight decay (SPEC 1.3: 1e-4)."""

    min_probe_f1: float = Field(0.6, ge=0.0, le=1.0)
    """Letters whose probe test F1 is <= this are excluded (SPEC 1.3: 0.6)."""

    min_letters: int = Field(20, ge=1, le=26)
    """Refuse to evaluate when fewer letters pass the probe-F1 gate (SAEBench: 20)."""

    max_k: int = Field(10, ge=1)
    """k-sparse probing: largest k (SAEBench: 10; the paper: 15)."""

    l1_decay: float = Field(0.01, ge=0.0)
    """k-sparse probing: L1 weight of the probe on SAE latents (SPEC 1.4: 0.01)."""

    sparse_probe_solver: Literal["adam", "fista"] = "fista"
    """k-sparse probing: solver of the L1 probe on SAE latents. ``fista`` (default): deterministic
    full-batch proximal gradient on SAEBench's objective, run to convergence; ``adam``: SAEBench's
    mini-batch Adam (lr 1e-2 decaying to 1e-5, weight decay 1e-6) for ``sparse_probe_steps`` steps.
    SAEBench's own sizing (50 epochs of batch 4096) is 50 steps at 3,200 words: far from converged."""

    sparse_probe_steps: int = Field(3000, ge=1)
    """k-sparse probing: the L1 probe's iteration cap (``fista``) or optimiser steps (``adam``)."""

    sparse_probe_batch_size: int = Field(4096, ge=1)
    """k-sparse probing: ``adam`` mini-batch size of the L1 probe (SPEC 1.4: 4096; capped at the train words)."""

    convergence_tol: float = Field(1e-4, gt=0.0)
    """Both probes: converged when the objective changes by less than this (relative) over the last
    10% of the steps (and, for ``adam``, a short continuation lowers it by less than this)."""

    f1_jump_threshold: float = Field(0.03, ge=0.0)
    """Feature splitting: k+1 latents count as a split while F1 rises by more than this (0.03)."""

    ablation: bool = True
    """Also compute the paper's ablation-based absorption rate (SPEC 1.6; integrated gradients
    through the model above the hook)."""

    max_ablation_prompts: int = Field(200, ge=1)
    """Ablation rate: prompts sampled per letter (SPEC 1.6: 200); the rate is rescaled by the
    sampled share."""

    ig_steps: int = Field(6, ge=1)
    """Ablation rate: integrated-gradients interpolation steps (SPEC 1.6: 6)."""

    ig_batch_size: int = operational(32, "Prompts per integrated-gradients forward/backward.")
    """Prompts per integrated-gradients batch (each runs ``ig_steps`` forwards and backwards)."""
