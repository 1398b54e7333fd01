"""The stitching evaluation's config (composed into the profile by :mod:`saeflow.config`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from saeflow.frozen import Frozen

__all__ = ["StitchingConfig"]


class StitchingConfig(Frozen):
    """SAE stitching across the family's width chain (SPEC 2.3). Owned by :mod:`saeflow.evals.stitching`.

    Pairs (smaller S, larger L) are compared latent by latent (decoder cosines, single-insertion
    ΔMSE on held-out rows) and interpolated from S to L; every SAE also gets its JumpReLU inference
    form (``f = relu(h) * 1[h > θ]``), used when ``form: jumprelu`` and reported either way. The
    fields marked INFERRED are design decisions (SPEC 2.3: no public code); docs/stitching.md."""

    seed: int = 42
    """Seed of every random draw in the stitching evaluation (none at present: everything is
    deterministic given the stored activations)."""

    pairs: tuple[tuple[int, int], ...] | None = None
    """Explicit pairs ``[[s, l], ...]``: indices into the evaluated SAEs (the family's members in
    grid order, then ``import_saes``), ``s`` the smaller, ``l`` the larger. ``None`` = every
    (smaller, larger) pair on the same hook and model with the same architecture and sparsity
    setting (``k``, or the L1 / L0 coefficient)."""

    adjacent_only: bool = False
    """Automatic pairs only: keep, for each larger SAE, just the pair with the next smaller width
    of its chain (1x->2x, 2x->4x) instead of every smaller one."""

    pair_across_sparsity: bool = False
    """Automatic pairs only: also pair SAEs of the same architecture whose ``k`` / coefficient
    differ (e.g. a k=16 SAE with a wider k=32 one)."""

    n_tokens: int = Field(16_384, ge=16)
    """Held-out activation rows (store rows from ``train_rows`` on; fewer when the store holds
    fewer) on which ΔMSE, the classes and the interpolation curve are measured."""

    form: Literal["native", "jumprelu"] = "native"
    """INFERRED. How latents of different SAEs are combined. ``native``: every latent keeps the
    activation it has in its own SAE (TopK's per-token selection included); the stitched SAE is a
    composite module. ``jumprelu``: every SAE is first replaced by its JumpReLU inference form and
    the stitched SAE is a registry JumpReLU SAE with concatenated weights. Identical for ReLU /
    JumpReLU / BatchTopK / Matryoshka (their JumpReLU form is exact); for TopK the JumpReLU form is
    an approximation (``topk_threshold``) whose fidelity is reported in ``stitching_jumprelu_form``
    (on the quick profile's TopK family it loses most of the explained variance, hence the default)."""

    topk_threshold: Literal["per_latent", "global"] = "per_latent"
    """INFERRED. How a TopK SAE gets its JumpReLU inference form. ``per_latent``: θ_j is chosen so
    latent j fires on exactly as many calibration rows as it does under TopK (so the form's L0
    equals k on those rows, and each latent keeps its density). ``global``: one θ for all latents
    so the total number of firings (hence L0) matches TopK's, as BatchTopK's saved form.
    BatchTopK / Matryoshka SAEs use their own saved threshold, ReLU SAEs θ = 0, JumpReLU their θ."""

    calibration_tokens: int = Field(16_384, ge=16)
    """Rows of the activation store used to fit TopK thresholds: the last this-many *training*
    rows (just before ``train_rows``), so thresholds never see the held-out rows they are scored on."""

    adjust_encoder_bias: bool = True
    """INFERRED. An L latent inserted into S is encoded with S's ``b_dec`` (SPEC 2.3); ``True`` adds
    ``(b_dec_S - b_dec_L) @ W_enc_L`` to its encoder bias so it fires exactly as it does in L.
    ``False`` keeps L's raw ``b_enc`` (the latent then sees the input centred by S's ``b_dec``)."""

    novel_order: Literal["delta_mse", "cosine"] = "delta_mse"
    """INFERRED. Order in which novel latents are inserted along the interpolation: ``delta_mse``
    (most helpful single insertion first) or ``cosine`` (lowest max cosine to S first)."""

    swap_order: Literal["cosine", "delta_mse"] = "cosine"
    """INFERRED. Order of the swaps (a group of S latents replaced by the non-novel L latents that
    match them, ``swap_rule``): ``cosine`` (group with the highest max cosine first) or
    ``delta_mse`` (lowest summed single-insertion ΔMSE of the group first)."""

    swap_rule: Literal["argmax", "threshold"] = "threshold"
    """INFERRED (SPEC 2.3 step 3 names both). Which S latents a non-novel L latent j removes when it
    swaps in: ``argmax``: only its best match ``match_j = argmax_i C_ji`` (a swap = one S latent and
    the L latents whose argmax it is); ``threshold``: also every S latent i with ``C_ji >= swap_tau``
    (a swap = a connected component of that bipartite graph: all its L latents in, all its S
    latents out, each S latent removed once). S latents that no swap removes leave at ``finish``.
    Default ``threshold``: the paper swaps a reconstruction latent for the S latents it stands for,
    not only the nearest one, and on the quick family it keeps the curve closer to the paper's
    (worst point and rising events lower than ``argmax``'s on every pair; docs/stitching.md)."""

    swap_tau: float = Field(0.5, ge=-1.0, le=1.0)
    """INFERRED. The cosine τ of ``swap_rule: threshold``. 0.5 (the lowest τ of the proxy sweep
    ``taus``; unrelated directions in d_in = 640 have cosines of ~0.04 standard deviation, so an
    edge at 0.5 is a real overlap). Measured on the quick family (docs/stitching.md): τ = 0.3
    chains almost all of S into one swap (up to 1,959 S latents at once: a jump from S to nearly L,
    not an interpolation), τ = 0.4 still up to 1,352; τ = 0.7 is almost the argmax rule (at most 9
    S latents per swap); 0.5 keeps swaps to at most 173 S latents and gives a lower worst point than
    0.7 on every pair."""

    taus: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    """INFERRED. Max-cosine thresholds τ of the proxy (``novel if s_j < τ``) swept in the report."""

    n_steps: int = Field(8, ge=1)
    """Points of the interpolation curve, besides S itself, at which the stitched SAE is evaluated in
    full (metrics code + CE loss), evenly spaced over the insert/swap events; the last is L. The MSE
    is also tracked exactly after *every* event (for the monotonicity count)."""

    ce_batches: int = Field(1, ge=0)
    """Batches of held-out contexts for the CE loss of the stitched SAE at each curve point (the
    clean / ablated reference is shared with the core metrics when the sizes match); 0 skips CE."""

    ce_batch_size: int = Field(8, ge=1)
    """Contexts per CE batch."""

    hist_bins: int = Field(40, ge=2)
    """Bins of the max-cosine histograms."""

    @model_validator(mode="after")
    def _check(self) -> "StitchingConfig":
        if not self.taus or any(not (-1.0 <= t <= 1.0) for t in self.taus):
            raise ValueError(f"stitching.taus={list(self.taus)} must be a non-empty list of cosines in [-1, 1]")
        for p in self.pairs or ():
            if len(p) != 2 or min(p) < 0 or p[0] == p[1]:
                raise ValueError(f"stitching.pairs entry {list(p)} must be two different SAE indices >= 0 "
                                 "([smaller, larger], indices into the family's members then import_saes)")
        return self
