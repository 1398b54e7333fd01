"""Task runners (``runner:`` in a profile) and the checks on where artifacts may live.

``local`` is Prefect's default runner. ``dask`` is prefect-dask's ``DaskTaskRunner``, either on a
``LocalCluster`` started for the run (``n_workers`` processes, one thread each) or on a running
scheduler (``address: tcp://host:8786``). GPU tasks are annotated ``resources={"GPU": 1}`` when the
device is CUDA (see :func:`tasks.common.run_stage`), so a LocalCluster on a CUDA machine gives each
worker GPU slots (``gpus_per_worker``, default one per worker).
"""

from __future__ import annotations

import argparse
import errno
import os
from typing import Any, Callable

from flows import options
from saeflow.config import PipelineConfig, RunnerConfig


class DiskFullError(OSError):
    """A stage ran out of space on the artifacts root (``errno.ENOSPC``), with the fix."""


class UnsupportedRootError(ValueError):
    """An artifacts root that cannot be used (see :class:`saeflow.remote.RemoteRootError`)."""


def resolve_root(artifacts: str | None) -> str:
    """The artifacts root this machine works in: ``artifacts`` (or ``$SAEFLOW_ARTIFACTS``, or
    ``artifacts/``) as an absolute local path, created and checked writable.

    An fsspec URL (``s3://bucket/prefix``, ``gs://...``) is checked writable and mapped to its local
    mirror (:func:`saeflow.remote.mirror_of`, the same path on every machine); the stages then pull
    what they read from the URL and push what they make (:func:`tasks.common.run_stage`).
    ``file:///x`` is the local path ``/x``.
    """
    from saeflow import remote
    from saeflow.artifacts import ENV_ROOT, ensure_writable_root

    arg = str(artifacts or os.environ.get(ENV_ROOT) or "artifacts")
    if remote.is_url(arg):
        try:
            mirror = remote.check_url_root(arg)
        except remote.RemoteRootError as exc:
            raise UnsupportedRootError(str(exc)) from exc
        return str(ensure_writable_root(mirror).resolve())
    return str(ensure_writable_root(remote.local_path(arg)).resolve())


def local_root(artifacts: str | None) -> str:
    """Where this machine keeps the artifacts of ``artifacts`` (a URL's mirror), without checks."""
    from saeflow import remote
    from saeflow.artifacts import ENV_ROOT

    arg = str(artifacts or os.environ.get(ENV_ROOT) or "artifacts")
    return str(remote.mirror_of(arg)) if remote.is_url(arg) else remote.local_path(arg)


def uses_gpu(device: str) -> bool:
    """True when this device setting resolves to CUDA on this machine."""
    if device.startswith("cuda"):
        return True
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return False


def make_task_runner(runner: RunnerConfig, device: str = "auto"):
    """The Prefect task runner for ``runner`` (``None`` = Prefect's default)."""
    if runner.kind == "local":
        return None
    from flows.dask_runner import SharedApiDaskTaskRunner as DaskTaskRunner

    if runner.address is not None:
        return DaskTaskRunner(address=runner.address)
    kwargs: dict = {"n_workers": runner.n_workers, "threads_per_worker": 1, "processes": True,
                    "dashboard_address": ":0"}
    gpus = runner.gpus_per_worker or (1 if uses_gpu(device) else 0)
    if gpus:
        kwargs["resources"] = {"GPU": gpus}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def as_subflow(flow_fn):
    """``flow_fn`` to call as a subflow of the running flow, on the parent's Dask cluster when the
    parent runs on one. A subflow gets a task runner of its own (Prefect's thread pool by default),
    so without this an evaluation's stages would leave the cluster; with it the subflow connects a
    second client to the same scheduler (GPU annotations come from :class:`StageRunner` as before)."""
    import sys

    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    parent = getattr(ctx, "task_runner", None)
    if parent is None or "prefect_dask" not in sys.modules:
        return flow_fn
    from prefect_dask import DaskTaskRunner

    if not isinstance(parent, DaskTaskRunner):
        return flow_fn
    from flows.dask_runner import SharedApiDaskTaskRunner

    return flow_fn.with_options(task_runner=SharedApiDaskTaskRunner(address=parent.client.scheduler.address))


def with_runner(flow_fn, config: PipelineConfig):
    """``flow_fn`` with the profile's task runner (unchanged for the local runner)."""
    runner = make_task_runner(config.runner, config.train.device)
    return flow_fn if runner is None else flow_fn.with_options(task_runner=runner)


#: The log line :class:`StageRunner` writes when a stage starts (before its cache check), e.g.
#: ``stage train: start``; the pipeline writes it for the report too. Tests and operators see from
#: it which stage a run is in (tests/test_faults.py kills a run inside a chosen stage).
STAGE_START = "stage %s: start"

#: Stages that never need a GPU (not annotated ``resources={"GPU": 1}`` on a Dask cluster).
CPU_STAGES = ("model", "vocab", "corpus", "imported", "results")


class StageRunner:
    """Runs a flow's stages through :func:`tasks.common.run_stage` and records their states, wall
    times and, with the local runner, peak resident memory (the ``stage`` callable handed to the
    evaluations as ``EvalContext.stage``).

    With the local runner each stage runs in the flow's process, one after another (Prefect's
    default). With Dask every stage is submitted to the cluster (GPU stages annotated when the
    device is CUDA; :data:`CPU_STAGES` never are), and :meth:`all` submits independent stages
    together so they run in parallel.
    """

    def __init__(self, root: str, config: PipelineConfig) -> None:
        self.root = root
        self.parallel = config.runner.kind != "local"
        self.gpu = self.parallel and uses_gpu(config.train.device)
        self.states: dict = {}
        self.timings: dict[str, dict] = {}

    def _complete(self, name: str, ref_fn, kw: dict) -> bool:
        """Log the stage's start (:data:`STAGE_START`); whether its artifacts are complete before it
        runs (:func:`tasks.common.artifacts_complete`)."""
        from tasks.common import artifacts_complete, stage_logger

        stage_logger().info(STAGE_START, name)
        return artifacts_complete(ref_fn, {"root": self.root, **kw})

    def _record(self, name: str, state, t0: float, reused: bool = False, peak_exact: bool = False):
        import time

        from saeflow.hostmem import peak_rss_bytes

        self.states[name] = state
        cached = state.name == "Cached" or (reused and state.is_completed())
        peak = peak_rss_bytes() if peak_exact else None
        self.timings[name] = {"seconds": round(time.perf_counter() - t0, 3), "cached": cached,
                              "peak_rss_mib": None if peak is None else round(peak / 2**20, 1)}
        try:
            return state.result()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise DiskFullError(
                f"stage {name} failed: no space left on the device of the artifacts root {self.root} ({exc}). Free "
                "space there (or pass --artifacts DIR on a larger disk) and re-run: finished stages are kept and "
                "reused, this one resumes or starts over"
            ) from exc

    def _submit(self, name: str, ref_fn, task, kw: dict):
        from tasks.common import run_stage

        return run_stage(task, ref_fn, root=self.root, submit=True,
                         gpu=self.gpu and name.split("-")[0] not in CPU_STAGES, **kw)

    def __call__(self, name: str, ref_fn, task, **kw):
        import time

        from tasks.common import run_stage

        t0 = time.perf_counter()
        reused = self._complete(name, ref_fn, kw)
        if not self.parallel:  # one stage at a time in this process: its own peak RSS
            from saeflow.hostmem import reset_peak_rss

            exact = reset_peak_rss()
            return self._record(name, run_stage(task, ref_fn, root=self.root, **kw), t0, reused, exact)
        fut = self._submit(name, ref_fn, task, kw)
        fut.wait()
        return self._record(name, fut.state, t0, reused)

    def all(self, calls: list[tuple]) -> list:
        """Independent stages ``(name, ref_fn, task, kwargs)``: one after another with the local
        runner, all submitted at once with Dask; results in the order given."""
        import time

        if not self.parallel:
            return [self(name, ref_fn, task, **kw) for name, ref_fn, task, kw in calls]
        t0 = time.perf_counter()
        futs = [(name, self._complete(name, ref_fn, kw), self._submit(name, ref_fn, task, kw))
                for name, ref_fn, task, kw in calls]
        out = []
        for name, reused, fut in futs:
            fut.wait()
            out.append(self._record(name, fut.state, t0, reused))
        return out

    def step(self, name: str, fn, *, reused: bool, **kw):
        """``fn(**kw)``, a flow step that is not a cached stage (the latent browser's site, written
        into the results folder), in this process: its wall time and peak RSS recorded as a stage's
        (``reused``: it found its output current and wrote nothing)."""
        import time

        from saeflow.hostmem import peak_rss_bytes, reset_peak_rss

        t0 = time.perf_counter()
        exact = reset_peak_rss()
        out = fn(**kw)
        peak = peak_rss_bytes() if exact else None
        self.timings[name] = {"seconds": round(time.perf_counter() - t0, 3), "cached": reused,
                              "peak_rss_mib": None if peak is None else round(peak / 2**20, 1)}
        return out

    def cached(self, name: str) -> bool:
        """The stage computed nothing: a Prefect cache hit, or its artifacts were complete already."""
        return self.timings[name]["cached"]


def load_profile(profile: str, overrides: dict | None = None) -> PipelineConfig:
    """A profile YAML (``configs/smoke.yaml``, ...) with ``overrides`` merged in section by
    section (e.g. ``{"runner": {"kind": "dask"}}``, ``{"train": {"device": "cuda"}}``; ``null``
    turns an evaluation section off)."""
    from saeflow.config import ConfigError, merge_sections, read_profile, validate_profile

    data = read_profile(profile)
    if not overrides:
        return validate_profile(data, profile)
    try:
        return validate_profile(merge_sections(data, overrides), profile)
    except ConfigError as exc:
        raise ConfigError(f"overrides {overrides!r} do not fit profile {profile}: {exc}") from exc


def run_profile(flow_fn, profile: str, artifacts: str | None = None, overrides: dict | None = None):
    """``flow_fn(config, artifacts)`` for a profile YAML (with ``overrides``, see :func:`load_profile`)
    on the profile's task runner: what a deployment entry point and ``saeflow run --flow ...`` do."""
    config = load_profile(profile, overrides)
    return with_runner(flow_fn, config)(config, artifacts)


def profile_command(flow_fn, report: Callable[[Any, argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    """A flow module's ``run_command(args)`` (``saeflow run --flow ...`` / ``python -m flows.<module>``):
    :func:`run_profile` of ``flow_fn`` on ``--config`` with the run options (``--artifacts``,
    ``--runner``, ``--device``, ...), then ``report(out, args)`` prints what the user needs."""

    def run_command(args: argparse.Namespace) -> int:
        report(run_profile(flow_fn, args.config, args.artifacts, options.overrides(args)), args)
        return 0

    run_command.__doc__ = f"``saeflow run`` of {flow_fn.__name__}: :func:`flows.runner.profile_command`."
    return run_command


PROFILE_ARGS = """
    Args:
        profile: profile YAML, relative to the repository (the deployment's working directory).
        artifacts: artifacts root (default ``$SAEFLOW_ARTIFACTS`` or ``artifacts/``).
        overrides: sections merged over the profile, e.g. ``{"runner": {"kind": "dask"}}`` or
            ``{"train": {"device": "cuda"}}``.
"""


def deployable_flow(name: str, flow_fn, summary: str):
    """The deployable Prefect flow ``name`` (a prefect.yaml entry point) running ``flow_fn`` on a
    profile YAML: parameters ``profile``, ``artifacts`` and ``overrides`` (documented in the
    Prefect UI from :data:`PROFILE_ARGS`), the profile's task runner, ``flow_fn``'s return value."""
    from tasks import common  # noqa: F401  (Prefect's offline settings before prefect loads)
    from prefect import flow

    def deployable(profile: str = "configs/quick.yaml", artifacts: str | None = None,
                   overrides: dict | None = None) -> dict:
        return run_profile(flow_fn, profile, artifacts, overrides)

    deployable.__name__ = deployable.__qualname__ = name.removeprefix("saeflow-").replace("-", "_")
    deployable.__module__ = flow_fn.__module__
    deployable.__doc__ = summary + "\n" + PROFILE_ARGS
    return flow(name=name, log_prints=True)(deployable)
