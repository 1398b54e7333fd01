"""Sparse probing on the sae-probes datasets in five regimes (SPEC 5; Kantamneni, Engels et al.).

Pure library code (numpy / torch / scikit-learn / xgboost; no Prefect). The pieces, in the order a
run uses them:

- **Datasets** (SPEC 5.1, :mod:`.datasets`): the 113 binary-classification sets and the 8
  covariate-shift test files shipped in the ``sae-probes`` package (read as data files; the package
  itself is never imported). Labels are ``LabelEncoder(target)`` over the whole file; ``max_rows``
  keeps the first rows (the reference's ``MAX_AMT``).
- **Activations** (SPEC 5.2, :mod:`.datasets`): :func:`last_token_activations`: one vector per
  prompt, the hook's activation at the last real token; BOS as the model's tokenizer adds it,
  prompts longer than ``max_seq_len`` cut from the left (BOS kept), the forward stops after the
  hook's block.
- **Splits** (SPEC 5.3, :mod:`.splits`): :func:`train_test_indices` draws exactly the reference's
  indices (``RandomState(seed)``: positives, negatives, then the test draw, then two
  permutations); :func:`make_split` builds the split of one (regime, setting) or raises
  :class:`SkipSetting` with the reason (too few rows, a class too small, ...).
- **Probes** (SPEC 5.4, :mod:`.probes`): :func:`fit_logreg` (C grid, :func:`cv_splits`),
  :func:`fit_pca`, :func:`fit_knn`, :func:`fit_xgboost`, :func:`fit_mlp`; :func:`sae_probe` ranks
  latents by the (normalised) class-mean difference and runs :func:`fit_logreg` on the top-k.
  :class:`FitLog` records whether their solver fits converged (``n_iter_`` below ``max_iter``, no
  ``ConvergenceWarning``): the ``converged`` / ``n_iter`` / ``n_fits`` / ``n_fits_not_converged`` columns.
- **Runners** (:mod:`.runners`): :func:`baseline_rows` / :func:`sae_rows` evaluate one dataset (all
  regimes and settings) from its activation folder; :func:`run_parallel` spreads datasets over
  processes.
- **Quiver of arrows and summaries** (:mod:`.results`): :func:`quiver_pick` picks, per (dataset,
  regime, setting), the candidate with the highest validation AUC (ties go to SAE probes) and
  reports its test metrics; :func:`results_table`, :func:`regime_summary`, :func:`sae_summary`,
  :func:`picks_table`, :func:`convergence_table`, :func:`plot_regimes`.

Every result is one row of the long table (:data:`ROW_COLUMNS`); a setting that cannot run is a row
whose ``skipped`` column says why and whose metrics are NaN (never averaged, see
:func:`regime_summary`). The config is :class:`~saeflow.evals.probing.config.ProbingConfig`; the
names below are imported on first use (:func:`saeflow.evals.lazy_exports`).
"""

from saeflow.evals import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "config": ("ProbingConfig",),
    "datasets": ("OOD_SUFFIX", "ProbingError", "dataset_file", "last_token_activations", "load_acts", "load_dataset",
                 "ood_dataset_names", "resolve_datasets", "tokenize_prompts"),
    "splits": ("REGIMES", "SkipSetting", "Split", "corrupt_labels", "imbalance_fracs", "imbalance_sizes", "iter_splits",
               "make_split", "noise_fracs", "normal_num_train", "regime_settings", "scarcity_sizes", "skip_reason",
               "specify_split", "train_test_indices"),
    "probes": ("BASELINE_METHODS", "C_GRID", "CONVERGENCE_COLUMNS", "FitLog", "MAX_ITER", "MLP_HIDDEN", "XGB_SPACE",
               "cv_splits", "fit_baseline", "fit_knn",
               "fit_logreg", "fit_mlp", "fit_pca", "fit_xgboost", "logreg", "mean_act_normalize", "rank_latents",
               "sae_probe"),
    "runners": ("ENCODE_BATCH", "QUIVER", "QUIVER_SAE", "ROW_COLUMNS", "SAE_METHOD", "RunSpec", "baseline_rows",
                "run_parallel", "sae_rows"),
    "results": ("PLOTS", "add_quivers", "clean_mean", "convergence_table", "not_converged_note", "picks_table",
                "plot_regime", "plot_regimes", "quiver_pick", "regime_summary", "results_table", "sae_label",
                "sae_summary"),
})
