"""Feature absorption on the first-letter task (SPEC 1; Chanin et al. 2409.14507, SAEBench 0.6.0).

Pure code (torch / numpy / pandas, no Prefect), in pipeline order:

1. **Prompts** (SPEC 1.2, :mod:`.prompts`): :func:`sample_words` caps the vocabulary (stratified by
   letter, seeded), :func:`icl_prompt` builds ``"\\n" + 10 ICL examples + "{word} has the first
   letter:"`` with Python ``random`` exactly as SAEBench draws them, :func:`locate_words` finds the
   word token in the tokenized prompt (no fixed ``-6``: a word that does not come out as its own
   single vocab token is skipped with a recorded reason), :func:`word_activations` runs the model
   only up to the hook (same-length buckets, no padding); :func:`build_prompts` /
   :func:`prompt_activations` do it for every prompt of a run.
2. **Ground-truth probe** (SPEC 1.3, :mod:`.probes`): :func:`train_linear_probe` (one-vs-rest BCE
   with ``pos_weight``; Adam with exponential lr decay sized by steps, or deterministic FISTA; each
   fit returns its :class:`Convergence` record), :func:`ground_truth_probe` and
   :func:`letter_metrics`.
3. **k-sparse probing** (SPEC 1.4, :mod:`.probes`): :func:`k_sparse_probing` (L1 probe on SAE
   latents, signed top-k, sklearn refit) and :func:`feature_splits` (F1-jump rule).
4. **Absorption** (SPEC 1.5, :mod:`.projection`): :func:`projection_absorption` (absorption
   fraction, full absorption, absorbing latents) and (SPEC 1.6, :mod:`.ablation`)
   :func:`ig_latent_attribution` + :func:`is_ablation_absorption` (integrated-gradients attribution
   patching on ``logit(" L") - mean(other 25)``).
5. **One SAE** (:mod:`.evaluate`): :func:`evaluate_sae`; **the family** (:mod:`.results`):
   :func:`family_tables`, :func:`plot_family`.

The config is :class:`~saeflow.evals.absorption.config.AbsorptionConfig`; the names below are
imported on first use (:func:`saeflow.evals.lazy_exports`).
"""

from saeflow.evals import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "config": ("AbsorptionConfig",),
    "prompts": ("ABSORB", "LETTERS", "PROBE", "SEPARATOR", "SKIP_MULTI_TOKEN", "SKIP_RETOKENIZED", "TEMPLATE",
                "AbsorptionError", "Located", "absorb_split", "answer", "build_prompts", "check_prompts", "icl_prompt",
                "length_buckets", "locate_words", "probe_split", "prompt_activations", "sample_words", "store_rows",
                "usable", "word_activations"),
    "probes": ("CONVERGENCE_TOL", "Convergence", "ProbeFit", "REFIT_MAX_ITER", "SOLVERS", "binary_scores",
               "feature_splits", "ground_truth_probe", "k_sparse_probing", "letter_metrics", "probe_metrics", "probe_objective",
               "train_linear_probe"),
    "projection": ("EPS", "ProjectionThresholds", "projection_absorption"),
    "ablation": ("ablation_runner", "absorb_tokens", "first_letter_metric", "ig_latent_attribution",
                 "is_ablation_absorption", "letter_logits", "letter_token_ids", "prefix_cache", "run_from_hook"),
    "evaluate": ("ENCODE_BATCH", "SAEEval", "evaluate_sae", "example_absorptions", "summarize", "word_l0"),
    "results": ("EXAMPLES_PER_SAE", "family_tables", "plot_family"),
})
