"""The meta-SAE evaluation's config (composed into the profile by :mod:`saeflow.config`)."""

from __future__ import annotations

from pydantic import Field

from saeflow.frozen import Frozen, operational

__all__ = ["MetaSAEConfig"]


class MetaSAEConfig(Frozen):
    """Meta-SAEs trained on each SAE's unit-normalised decoder rows (SPEC 2.4). Owned by
    :mod:`saeflow.evals.meta_sae`."""

    seed: int = 42
    """Seed of the meta-SAE initialisation and batch draws (SAEBench ``random_seed``), and of the
    choice of example latents / activation rows for the example page."""

    width_ratio: float = Field(0.25, gt=0.0)
    """Meta-SAE width = ``max(ceil(width_ratio * n_latents), k)`` (SAEBench ``width_ratio``)."""

    k: int = Field(4, ge=1)
    """BatchTopK ``k`` of the meta-SAE: average active meta-latents per decoder row."""

    train_steps: int = Field(1500, ge=1)
    """Optimiser steps (SAEBench ``train_steps``)."""

    batch_size: int = Field(1024, ge=1)
    """Decoder rows per step, drawn uniformly WITH replacement (``torch.randint``)."""

    lr: float = Field(5e-4, gt=0.0)
    """Adam learning rate, constant (betas 0.9, 0.999; gradient-norm clip 1.0 as SAELens)."""

    dead_feature_window: int = Field(2000, ge=1)
    """A meta-latent is dead (feeds the TopK aux loss) after this many steps without firing."""

    convergence_tol: float = Field(0.01, gt=0.0)
    """Convergence check of the meta-SAE training: converged when the full-decoder reconstruction
    MSE (the ``mse`` metric, deterministic) changes by less than this fraction between 90% of
    ``train_steps`` and the end (``rel_change_last10``; a run that is not converged is reported,
    not retrained)."""

    trajectory_points: int = Field(11, ge=2)
    """Loss-trajectory points: the convergence loss (every decoder row through the meta-SAE) is
    measured at this many evenly spaced steps from 0 to the end (11: every 10%) plus the 90% step
    of the convergence check. Each point costs the whole decoder through the meta-SAE: ~4 minutes
    for a 262,144-latent SAE's 65,536-wide meta-SAE on a 2-core CPU, so 2 (start, 90% and end)
    saves over half an hour there; the convergence check is the same."""

    eval_batch_size: int = Field(4096, ge=1)
    """Rows per batch when measuring decoder variance explained with the batch-level top-k forward
    (SAEBench ``eval_batch_size``; the metric depends on it)."""

    decomposition_top: int = Field(8, ge=1)
    """Meta-latents kept per latent in the decomposition table (largest weights first)."""

    cosine_rows: int | None = Field(16_384, ge=2)
    """Rows of each max-cosine distribution (base -> base, base -> meta, meta -> base, meta -> meta):
    every row of a set up to this many, else a seeded sample of this many rows, each against every
    row of the other set (``None`` = all: a 262,144-latent base SAE's base -> base alone is ~44
    TFLOP). The histograms and the mean max cosines are then estimates from the sample."""

    cross_size_k: int = Field(4, ge=1)
    """Cross-size check: atoms of the smaller SAE's decoder per larger-SAE latent (greedy
    orthogonal matching pursuit)."""

    cross_size_threshold: float = Field(0.9, gt=0.0, le=1.0)
    """Cross-size check: a larger-SAE latent is *well explained* when the cosine between its unit
    decoder row and the sparse reconstruction is at least this."""

    example_sae: int | None = Field(None, ge=0)
    """Index (in the results-table order) of the SAE shown on the example page; ``None`` = the
    widest SAE (the first one of that width)."""

    n_examples: int = Field(4, ge=0)
    """Latents shown on the example page (seeded choice among the most-decomposed); 0 = no page."""

    example_rows: int = Field(16_384, ge=1)
    """Activation rows sampled (in seeded random blocks) from the store to find top-activating
    tokens for the example page."""

    example_snippets: int = Field(4, ge=1)
    """Top-activating context snippets shown per latent / meta-latent."""

    snippet_window: int = Field(8, ge=0)
    """Tokens of context shown on each side of the activating token."""

    checkpoint_every: int = operational(500, "Steps between meta-SAE training checkpoints.")
    """Steps between resumable meta-SAE training checkpoints."""

    log_every: int = operational(250, "Steps between meta-SAE training log lines.")
    """Steps between meta-SAE training log lines."""
