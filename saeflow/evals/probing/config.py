"""The sparse-probing evaluation's config (composed into the profile by :mod:`saeflow.config`).

Imports only pydantic and :mod:`saeflow.frozen`, so :mod:`saeflow.config` stays light.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from saeflow.frozen import Frozen, operational

__all__ = ["ProbingConfig"]


class ProbingConfig(Frozen):
    """Sparse probing on the sae-probes datasets in four regimes (SPEC 5). Owned by
    :mod:`saeflow.evals.probing`."""

    seed: int = 42
    """Seed of the splits (the reference's ``RandomState(seed)``) and the probe searches."""

    datasets: tuple[str, ...] | None = None
    """sae-probes binary datasets to probe (file stems such as ``5_hist_fig_ismale``); ``None`` =
    all 113. An unknown name is recorded as a skipped row with the reason, not an error."""

    max_rows: int | None = Field(None, ge=2)
    """Row cap per dataset (a deviation for small budgets): keep the first ``max_rows // 2`` rows of
    each class, in file order. The reference keeps every row (``MAX_AMT`` = 5000 >= every dataset);
    a cap shrinks the test side of the splits. ``None`` = every row. OOD test files are never capped."""

    max_seq_len: int = Field(1024, ge=2)
    """Prompts longer than this many tokens (BOS included) are cut from the left (SPEC 5.2)."""

    regimes: tuple[Literal["normal", "scarcity", "imbalance", "noise", "ood"], ...] = (
        "normal", "scarcity", "imbalance", "noise", "ood")
    """Regimes to run (SPEC 5.3): ``normal``, ``scarcity`` (train sizes), ``imbalance`` (positive
    fraction), ``noise`` (flipped train labels), ``ood`` (covariate shift: datasets with an OOD file)."""

    scarcity_sizes: tuple[int, ...] | None = None
    """Train sizes of the scarcity regime; ``None`` = the reference's 20 (2 ... 1024)."""

    imbalance_fracs: tuple[float, ...] | None = None
    """Positive fractions of the imbalance regime; ``None`` = the reference's 19 (0.05 ... 0.95)."""

    noise_fracs: tuple[float, ...] | None = None
    """Flipped-label fractions of the noise regime; ``None`` = the reference's 11 (0 ... 0.5)."""

    methods: tuple[Literal["logreg", "pca", "knn", "xgboost", "mlp"], ...] = ("logreg", "pca", "knn", "xgboost", "mlp")
    """Baseline probes on the raw activations (SPEC 5.4); together they form the baseline quiver."""

    logreg_penalty: Literal["l1", "l2"] = "l2"
    """Penalty of the ``logreg`` baseline (reference: l2, lbfgs)."""

    sae_penalty: Literal["l1", "l2"] = "l1"
    """Penalty of the SAE top-k probes' logistic regression (package / SAEBench default: l1, saga)."""

    ks_normal: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    """Top-k latent counts of the SAE probes in the normal regime."""

    ks_other: tuple[int, ...] = (16, 128)
    """Top-k latent counts of the SAE probes in the other regimes."""

    quiver_ks: tuple[int, ...] = (16, 128)
    """k values whose SAE probes join the quiver (and the summary columns); each must be in
    ``ks_normal`` and ``ks_other`` to appear in every regime."""

    mean_diff_normalization: Literal["mean", "none"] = "mean"
    """Latent ranking: ``mean`` divides each latent by its mean non-zero |activation| before the
    class-mean difference (package default); ``none`` uses raw activations (paper code)."""

    binarize: bool = False
    """Normal regime only: probe ``f != 0`` instead of the latent values."""

    n_jobs: int = operational(2, "Worker processes (datasets run in parallel).")
    """Worker processes; datasets are spread over them. 1 runs in the calling process."""

    batch_tokens: int = operational(4096, "Padded tokens per forward pass when extracting.")
    """Padded tokens per model forward when extracting last-token activations."""

    @model_validator(mode="after")
    def _check(self) -> "ProbingConfig":
        if not self.regimes:
            raise ValueError("probing.regimes is empty: list at least one of normal, scarcity, imbalance, noise, ood")
        if self.scarcity_sizes is not None and any(s < 1 for s in self.scarcity_sizes):
            raise ValueError(f"probing.scarcity_sizes={list(self.scarcity_sizes)}: train sizes must be >= 1")
        for name in ("imbalance_fracs", "noise_fracs"):
            v = getattr(self, name)
            hi = 0.5 if name == "noise_fracs" else 1.0
            if v is not None and any(not (0 <= f <= hi) or (name == "imbalance_fracs" and f in (0, 1)) for f in v):
                raise ValueError(f"probing.{name}={list(v)}: fractions must lie in "
                                 f"{'[0, 0.5]' if hi == 0.5 else '(0, 1)'}")
        for name in ("ks_normal", "ks_other", "quiver_ks"):
            if any(k < 1 for k in getattr(self, name)):
                raise ValueError(f"probing.{name}: every k must be >= 1")
        if self.n_jobs < 1:
            raise ValueError("probing.n_jobs must be >= 1")
        return self
