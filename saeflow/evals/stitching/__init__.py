"""SAE stitching (Leask, Bussmann et al. 2025; SPEC 2.1 and 2.3), as a pure library.

Pipeline for a pair (smaller S, larger L) of SAEs trained on the same hook. Every latent is used
with unit-norm decoder row and its activation scaled accordingly (``f_j ||d_j||``), which changes
no reconstruction. All SAEs of saeflow work on raw activations (activation normalisation is folded
into the weights at the end of training, and :func:`~saeflow.saes.load_sae` refuses anything else),
so latents of different SAEs can be mixed without rescaling.

1. **Form** (``StitchingConfig.form``). ``native``: each latent keeps the activation it has in its
   own SAE (TopK's per-token selection included); a stitched SAE is a :class:`StitchedSAE`.
   ``jumprelu``: each SAE is first replaced by its JumpReLU inference form (:func:`to_jumprelu`,
   ``f = relu(h) * 1[h > θ]``): ReLU θ = 0, JumpReLU its θ, BatchTopK / Matryoshka their saved
   global θ (all exact), TopK thresholds fitted on calibration rows (:func:`topk_thresholds`,
   INFERRED, an approximation whose fidelity is reported); a stitched SAE is then a registry
   :class:`~saeflow.saes.JumpReLUSAE` with concatenated weights. For ReLU / JumpReLU / BatchTopK /
   Matryoshka both forms give the same numbers.
2. **Decoder cosines** (:func:`decoder_cosines`): ``C = Ŵ_L Ŵ_Sᵀ`` (unit rows), ``s_j = max_i C_ji``,
   ``match_j = argmax_i C_ji``; computed in row chunks (:func:`saeflow.cosine.max_cosine`).
3. **Ground truth** (:func:`insertion_delta_mse`): the change of MSE when L's latent j alone is
   added to S (S's ``b_dec`` kept; with ``adjust_encoder_bias`` the latent fires exactly as in L).
   With ``r = x - x̂_S`` and ``f_j`` the latent's activation, ``ΔSE_j = Σ_t (-2 f_tj (r_t·d_j) +
   f_tj²)`` (unit ``d_j``): one L encode and one ``r @ D_Lᵀ`` matmul per row block, for all latents
   at once. ``ΔMSE < 0`` -> **novel**, ``>= 0`` -> **reconstruction**; a latent that never fires on
   the rows is **inactive** (ΔMSE exactly 0; reported apart, left out of fractions and AUC).
4. **Interpolation** (:func:`interpolation_events`, :func:`event_mse_curve`, :func:`stitched_sae`):
   insert the novel latents one by one, then swap each S latent for the reconstruction (and
   inactive) latents of L that match it (``swap_rule``: ``argmax`` = the L latents whose best match
   it is; ``threshold`` = groups of S and L latents connected by cosines ``>= swap_tau``, each
   swapped as one), then a last event removes the S latents no swap removed
   and switches ``b_dec`` to L's, which gives exactly L. The MSE is tracked exactly after every
   event by sparse rank-1 updates of the residual; selected states are built as SAE modules so the
   core metrics code (and the CE splice) evaluates them unchanged.

Modules: :mod:`~saeflow.evals.stitching.config` (:class:`StitchingConfig`), ``pairing`` (which
pairs), ``forms`` (JumpReLU forms, stitched SAEs), ``latents`` (steps 2 and 3, the proxy),
``interpolation`` (step 4), ``pair`` (one pair end to end, the result tables), ``plots``. The
public names below are importable from this package (``from saeflow.evals import stitching as st;
st.find_pairs(...)``); they are imported on first use, so :mod:`saeflow.config` can import the
config module without the torch-side code.
"""

from __future__ import annotations

from saeflow.evals import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "config": ("StitchingConfig",),
    "saeflow.evals.common": ("SAEInfo", "sae_info",),
    "pairing": ("StitchingError", "check_pair", "find_pairs", "adjacent_pair_for",),
    "forms": ("NEVER", "make_jumprelu", "jumprelu_parts", "topk_thresholds", "to_jumprelu", "unit_decoder",
              "unit_acts", "inserted_acts", "StitchedSAE", "stitched_sae"),
    "latents": ("NOVEL", "RECONSTRUCTION", "INACTIVE", "decoder_cosines", "cosine_edges", "insertion_delta_mse",
                "classify", "proxy_auc", "tau_sweep"),
    "interpolation": ("Event", "interpolation_events", "event_states", "event_mse_curve", "curve_points",
                      "changing_events", "count_violations", "evaluate_curve"),
    "pair": ("ROW_BATCH", "CESetup", "PairResult", "stitch_pair", "jumprelu_form", "pairs_table",
             "form_table_row"),
    "plots": ("plot_max_cos_histograms", "plot_interpolation",),
})
