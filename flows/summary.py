"""What :func:`flows.pipeline.pipeline` returns: a typed summary of one run (pydantic models).

``summary.refs`` names every artifact the run used or made (:class:`ArtifactRef`: stage,
fingerprint, path), ``summary.cached`` which stages Prefect's cache answered, ``summary.members``
one line per SAE of the family, ``summary.timings`` the wall time of each stage and
``summary.report`` the run's HTML report. ``summary.model_dump(mode="json")`` is plain JSON.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from saeflow.artifacts import ArtifactRef


class _Summary(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EvalRefs(_Summary):
    """The artifacts of one evaluation (its ``EvalOutput``)."""

    per_sae: list[ArtifactRef | None] = Field(default_factory=list)
    """One per SAE evaluated (``PipelineRefs.saes`` order); ``None`` where the evaluation scores none."""
    results: ArtifactRef | None = None
    """The evaluation's tables and plots (copied to ``results/<profile>/<eval>/``)."""
    refs: list[ArtifactRef] = Field(default_factory=list)
    """Every other artifact it made (shared data, probes, ...)."""


class PipelineRefs(_Summary):
    """Every artifact of one pipeline run."""

    model: ArtifactRef
    vocab: ArtifactRef
    corpus: ArtifactRef
    activations: ArtifactRef
    train: list[ArtifactRef]
    """One per member of the family (one for a plain ``sae:`` profile), in ``sae_configs()`` order."""
    imported: list[ArtifactRef] = Field(default_factory=list)
    """The ``import_saes`` entries imported (folders, converted checkpoints, SAELens releases), in profile order."""
    extra_saes: list[ArtifactRef] = Field(default_factory=list)
    """SAE artifacts handed to the flow (``extra_saes=``, e.g. by ``flows.reevaluate``)."""
    metrics: list[ArtifactRef]
    """One per SAE: the family's, then the imported ones, then the extra ones."""
    browser: list[ArtifactRef] = Field(default_factory=list)
    """One per SAE (same order as ``metrics``) when the profile sets ``browser:``, else empty."""
    results: ArtifactRef
    evals: dict[str, EvalRefs] = Field(default_factory=dict)
    """Evaluation name (a ``PipelineConfig`` field, e.g. ``absorption``) -> its artifacts; only
    the evaluations the profile enables."""

    @property
    def saes(self) -> list[ArtifactRef]:
        """Every SAE evaluated, in the order of ``metrics`` and of each evaluation's ``per_sae``."""
        return [*self.train, *self.imported, *self.extra_saes]


class MemberSummary(_Summary):
    """One SAE of the profile's family."""

    sae: str
    """Its description, e.g. ``topk width=128 k=8``."""
    train_fingerprint: str
    trained: bool
    """This run trained it (False: its artifact was already complete)."""
    metrics_cached: bool


class StageTiming(_Summary):
    """Wall time and peak memory of one stage as the flow saw it."""

    seconds: float
    cached: bool
    peak_rss_mib: float | None = None
    """Peak resident memory of the flow's process while the stage ran (MiB; the process's memory
    before the stage included): recorded with the local runner on Linux, ``None`` elsewhere (Dask
    workers, ``total``)."""


class PipelineSummary(_Summary):
    """The return value of one pipeline run."""

    refs: PipelineRefs
    cached: dict[str, bool]
    """Stage -> the Prefect cache was hit: ``model``, ``vocab``, ``corpus``, ``activations``,
    ``train``, ``metrics`` (every member's), ``imported`` (when the profile imports SAEs), each
    enabled evaluation (all of its stages), ``results``."""
    members: list[MemberSummary]
    timings: dict[str, StageTiming]
    """Stage run name (``model``, ``metrics-0``, ``absorption-data``, ...) -> its wall time;
    ``total`` is the whole flow."""
    report: Path
    """The run's self-contained HTML report (``results/<profile>/report.html``)."""
