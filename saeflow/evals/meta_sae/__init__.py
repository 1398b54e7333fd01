"""Meta-SAEs: BatchTopK SAEs trained on another SAE's decoder rows (SPEC 2.4), and the cross-size check.

A meta-SAE is an ordinary ``batchtopk`` SAE from the one registry (:mod:`saeflow.saes`), trained by
the one trainer (:func:`saeflow.training.train_sae`) on the unit-normalised rows of a base SAE's
``W_dec`` (``n_latents x d_model``); no LM activations are involved. The settings default to
SAEBench's ``meta_structure`` eval (SAEBench 0.6.0): width ``max(ceil(0.25 n), k)``, ``k = 4``,
1500 Adam steps (lr 5e-4 constant, betas 0.9/0.999, gradient clip 1.0) on batches of 1024 rows drawn
WITH replacement, decoder-norm rescaling, no activation normalisation, float32.

What this package computes (pure torch / numpy, no Prefect):

- :class:`RowSampler`: a resumable :class:`~saeflow.training.BatchLoader` over an in-memory matrix
  (uniform draws with replacement, ``torch.randint`` from a seeded generator). Generic: any
  evaluation can train an SAE on a matrix it holds in memory with it.
- :func:`unit_rows` (input checks), :func:`meta_width`, :func:`train_meta_sae` (with its
  convergence check: the full-decoder reconstruction MSE at 90% of the steps against the end).
- :func:`decoder_variance_explained`: ``1 - sum ||d - d_hat||^2 / sum ||d - mean(d)||^2`` with the
  batch-level top-k forward in consecutive batches of ``eval_batch_size`` rows (SAEBench's metric,
  which depends on the batching), or with the saved JumpReLU threshold (per row).
- :func:`decompose`: each latent's meta-latents (threshold inference, as the original meta-SAE code
  does at inference), their weights and the reconstruction cosine; :func:`cluster_sizes`.
- :func:`max_cosines`: the 2x2 max-cosine distributions (base->base, base->meta, meta->base,
  meta->meta).
- :func:`sparse_code`: batched orthogonal matching pursuit of one decoder on another's unit rows
  (the cross-size check: is a larger SAE's latent a sparse combination of a smaller SAE's?).
- :func:`evaluate_meta_sae` (all of the above for one meta-SAE), :func:`cross_size`.
- :func:`example_page` / :func:`render_examples_page`: the example page, each latent and meta-latent
  shown by top-activating context snippets (:func:`top_rows`, :func:`snippet`) from activation rows
  sampled by :func:`saeflow.evals.common.sample_store_rows`; rendered from a Jinja2 template.
- ``plots``: cluster sizes, cross-size cosines, max cosines.

Modules: ``config`` (:class:`MetaSAEConfig`), ``training`` (with :func:`decoder_variance_explained`,
the loss the training's convergence check reads), ``analysis``, ``examples``, ``plots``.
The public names below are importable from this package; they are imported on first use, so
:mod:`saeflow.config` can import the config module without the torch-side code.
"""

from __future__ import annotations

from saeflow.evals import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "config": ("MetaSAEConfig",),
    "training": ("MetaSAEInputError", "RowSampler", "unit_rows", "meta_width", "meta_sae_config",
                 "meta_train_config", "decoder_variance_explained", "TRAJECTORY_FILE", "trajectory_steps",
                 "train_meta_sae"),
    "analysis": ("decompose", "cluster_sizes", "max_cosines", "sparse_code",
                 "evaluate_meta_sae", "cross_size", "CONVERGENCE_FIELDS"),
    "examples": ("EXAMPLES_TEMPLATE", "Snippet", "Member", "MetaExample", "LatentExample", "ExamplesPage",
                 "top_rows", "snippet", "choose_latents", "example_page", "render_examples_page",
                 "examples_json"),
    "plots": ("plot_cluster_sizes", "plot_cross_size", "plot_max_cosines",),
})
