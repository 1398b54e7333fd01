"""What every stage task shares: Prefect settings, the cache policy, logging and progress.

Caching: a task's key is ``INPUTS + TASK_SOURCE`` (its config, the upstream artifact references,
which carry content fingerprints, and the artifacts root; never the device), stored as files under
``<root>/.prefect/cache`` so a fresh ``PREFECT_HOME`` still hits. Because a cache record outlives a
deleted artifact, :func:`run_stage` checks the expected artifact first and refreshes the cache when
it is missing or partial. Task bodies are idempotent on their own: a complete artifact folder is
returned as is, a partial one is resumed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

# Offline-safe Prefect settings, set before prefect is imported (ENVIRONMENT.md).
for _k, _v in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "saeflow",
}.items():
    os.environ.setdefault(_k, _v)

import psutil  # noqa: E402
from prefect import task  # noqa: E402
from prefect.cache_policies import INPUTS, TASK_SOURCE  # noqa: E402
from prefect.context import TaskRunContext  # noqa: E402
from prefect.exceptions import MissingContextError  # noqa: E402
from prefect.filesystems import LocalFileSystem  # noqa: E402
from prefect.locking.filesystem import FileSystemLockManager  # noqa: E402
from prefect.logging import get_run_logger  # noqa: E402

from saeflow import remote  # noqa: E402
from saeflow.artifacts import ArtifactRef  # noqa: E402

log = logging.getLogger("saeflow")


@functools.lru_cache(maxsize=None)
def _source(part: str | Callable) -> str:
    if isinstance(part, str):
        module = importlib.import_module(part)
        return Path(inspect.getfile(module)).read_text(encoding="utf-8").replace("\r\n", "\n")
    return inspect.getsource(getattr(part, "fn", part))  # a Prefect task or a plain function


def code_version(*parts: str | Callable) -> str:
    """``"code=<hash>"``: an upstream token for :func:`saeflow.artifacts.fingerprint` naming the
    source code behind a stage's results.

    ``parts`` are module names (their whole file is hashed) or functions / Prefect tasks (their
    source). Evaluation stages pass it, so a change of an evaluation's code gives its artifacts new
    fingerprints: a re-run (and the scheduled ``reevaluate``) recomputes exactly the results that
    code produced, and keeps the old folders untouched. Core stages (vocab, corpus, activations,
    training) do not: a code edit there must not silently retrain a family; bump their config.
    """
    digest = hashlib.sha256()
    for part in parts:
        digest.update(_source(part).encode())
        digest.update(b"\0")
    return "code=" + digest.hexdigest()[:12]


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a run, the ``saeflow`` logger otherwise (e.g. ``task.fn``)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return log


class ProcessLockManager(FileSystemLockManager):
    """A file lock manager whose locks die with the process that took them.

    Prefect's file locks have no owner process: a run killed while it holds one (SIGKILL, OOM,
    power loss) would make every later run of that stage wait forever. Each lock here gets an
    ``.owner`` file (host, pid, process start time); a lock whose owner process on this host is gone
    is broken. A lock without an owner file older than ``orphan_after_s`` (the owner died between
    the two writes) is broken too.
    """

    orphan_after_s = 60.0

    def _owner_path(self, key: str) -> Path:
        return self._lock_path_for_key(key).with_suffix(".owner")

    def _write_owner(self, key: str) -> None:
        me = psutil.Process()
        self._owner_path(key).write_text(json.dumps({"host": socket.gethostname(), "pid": me.pid, "started": me.create_time()}))

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None) -> bool:
        ok = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if ok:
            self._write_owner(key)
        return ok

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None) -> bool:
        ok = await super().aacquire_lock(key, holder, acquire_timeout, hold_timeout)
        if ok:
            self._write_owner(key)
        return ok

    def release_lock(self, key: str, holder: str) -> None:
        super().release_lock(key, holder)
        self._owner_path(key).unlink(missing_ok=True)

    def _stale(self, key: str) -> bool:
        lock, owner = self._lock_path_for_key(key), self._owner_path(key)
        try:
            info = json.loads(owner.read_text())
        except (OSError, ValueError):
            try:
                return time.time() - lock.stat().st_mtime > self.orphan_after_s
            except OSError:
                return False
        if info.get("host") != socket.gethostname():
            return False  # another machine's process: cannot tell, trust it
        try:
            return abs(psutil.Process(int(info["pid"])).create_time() - float(info["started"])) > 1e-3
        except psutil.NoSuchProcess:
            return True

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        if not super().is_locked(key, use_cache=use_cache):
            return False
        if self._stale(key):
            log.warning("breaking a stale lock for cache key %s (its run was killed)", key)
            self._lock_path_for_key(key).unlink(missing_ok=True)
            self._owner_path(key).unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return True


def stage_task(ref: Callable[..., ArtifactRef], **task_options: Any) -> Callable[[Callable[..., Any]], Any]:
    """Decorator: the Prefect task of a stage that writes one artifact folder.

    ``ref(**arguments)`` names that folder from the task's arguments (the same function the flows
    hand :func:`run_stage`). The decorated ``body(out, *args, **kwargs)`` runs only while ``out`` is
    not complete, and writes it (``begin`` ... ``mark_complete``; a partial folder is resumed). The
    task's parameters are the body's without ``out``, and it returns ``out``. ``task_options`` go to
    :func:`prefect.task` (``name``, ``task_run_name``, ...). The cache key's source is the body's.
    """

    def decorate(body: Callable[..., Any]):
        signature = inspect.signature(body)
        params = list(signature.parameters.values())
        if not params or params[0].name != "out":
            raise TypeError(f"stage_task: {body.__qualname__} must take the artifact reference `out` first")
        task_signature = signature.replace(parameters=params[1:], return_annotation="ArtifactRef")

        @functools.wraps(body)
        def run(*args: Any, **kwargs: Any) -> ArtifactRef:
            bound = task_signature.bind(*args, **kwargs)
            bound.apply_defaults()
            out = ref(**bound.arguments)
            if not out.is_complete():
                body(out, *args, **kwargs)
            return out

        run.__signature__ = task_signature  # type: ignore[attr-defined]
        return task(**task_options)(run)

    return decorate


def cache_policy(root: str | Path):
    root = Path(root).resolve()
    return (INPUTS + TASK_SOURCE - "device").configure(
        key_storage=LocalFileSystem(basepath=str(root / ".prefect" / "cache")),
        lock_manager=ProcessLockManager(lock_files_directory=root / ".prefect" / "locks"),
        isolation_level="SERIALIZABLE",
    )


def artifacts_complete(ref_fn: Callable[..., ArtifactRef | list[ArtifactRef]], kwargs: dict[str, Any]) -> bool:
    """Whether every artifact a stage makes (``ref_fn(**kwargs)``: one or a list) is complete: then
    the stage computes nothing, whatever Prefect's cache key says."""
    expected = ref_fn(**kwargs)
    return all(e.is_complete() for e in (expected if isinstance(expected, list) else [expected]))


def _configured(task, ref_fn: Callable[..., ArtifactRef | list[ArtifactRef]], kwargs: dict[str, Any]):
    opts: dict[str, Any] = {
        "cache_policy": cache_policy(kwargs["root"]),
        "persist_result": True,
    }
    if not artifacts_complete(ref_fn, kwargs):
        opts["refresh_cache"] = True
    configured = task.with_options(**opts)
    if remote.url_of(kwargs["root"]) is not None:
        configured.fn = _synced(task.fn, ref_fn)
    return configured


def refs_in(obj: Any) -> list[ArtifactRef]:
    """Every :class:`ArtifactRef` inside ``obj`` (dicts, lists, tuples, dataclasses such as
    :class:`EvalOutput`); other pydantic models (configs) hold none."""
    if isinstance(obj, ArtifactRef):
        return [obj]
    if isinstance(obj, dict):
        return [r for v in obj.values() for r in refs_in(v)]
    if isinstance(obj, (list, tuple)):
        return [r for v in obj for r in refs_in(v)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [r for f in dataclasses.fields(obj) for r in refs_in(getattr(obj, f.name))]
    return []


def _synced(fn: Callable, ref_fn: Callable[..., ArtifactRef | list[ArtifactRef]]) -> Callable:
    """``fn`` for an artifacts root that mirrors an fsspec URL (:mod:`saeflow.remote`): on the
    machine that runs the task, pull its input artifacts and its own (when the URL has them
    complete), run it, push what it made. Source and signature stay ``fn``'s (the cache key)."""

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        named = dict(signature.bind(*args, **kwargs).arguments)  # Prefect passes some positionally
        expected = ref_fn(**named)
        expected = expected if isinstance(expected, list) else [expected]
        for ref in refs_in(named) + expected:
            remote.pull(ref.path)
        result = fn(*args, **kwargs)
        for ref in expected + refs_in(result):
            remote.push(ref.path)
        return result

    return run


def run_stage(task, ref_fn: Callable[..., ArtifactRef | list[ArtifactRef]], *, submit: bool = False,
              gpu: bool = False, **kwargs: Any):
    """Run a stage task with the project cache policy; returns its Prefect state.

    ``ref_fn(**kwargs)`` names the artifact the task returns, or a list of them (a family of
    SAEs). A cached result is only trusted while the artifact(s) it points at are all complete;
    otherwise the task runs (its body reuses whatever is complete and rebuilds the rest).

    ``submit=True`` hands the task to the flow's task runner instead (``task.submit``) and returns
    its ``PrefectFuture`` at once (``future.wait(); future.state`` gives the state): independent
    tasks submitted together run in parallel on a Dask cluster. ``gpu=True`` (with ``submit``)
    annotates the task ``resources={"GPU": 1}`` so Dask places it on a worker with a free GPU slot.
    """
    configured = _configured(task, ref_fn, kwargs)
    if not submit:
        return configured(return_state=True, **kwargs)
    if gpu:
        import dask

        with dask.annotate(resources={"GPU": 1}):
            return configured.submit(**kwargs)
    return configured.submit(**kwargs)


def in_task_run() -> bool:
    return TaskRunContext.get() is not None


class Progress:
    """A Prefect progress artifact (inside a run) plus log lines every ``every`` updates."""

    def __init__(self, name: str, every_s: float = 10.0) -> None:
        self.name = name
        self.every_s = every_s
        self.logger = stage_logger()
        self._last = 0.0
        self._id = None
        if in_task_run():
            try:
                from prefect.artifacts import create_progress_artifact

                self._id = create_progress_artifact(0.0, description=name)
            except Exception as exc:  # progress is cosmetic; never fail a stage on it
                self.logger.debug("no progress artifact: %s", exc)

    def update(self, done: float, total: float, message: str = "", force: bool = False) -> None:
        pct = 100.0 * done / max(total, 1e-9)
        now = time.monotonic()
        if not force and now - self._last < self.every_s and done < total:
            return
        self._last = now
        self.logger.info("%s: %.1f%% %s", self.name, pct, message)
        if self._id is not None:
            try:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self._id, min(pct, 100.0))
            except Exception:
                pass


def _publish(create: str, **payload: Any) -> None:
    """``prefect.artifacts.<create>(**payload)`` inside a run; nothing outside one. Artifacts are
    cosmetic: a failure is logged at debug level, never raised."""
    if not in_task_run():
        return
    try:
        import prefect.artifacts

        getattr(prefect.artifacts, create)(**payload)
    except Exception as exc:
        stage_logger().debug("no %s: %s", create, exc)


def publish_table(key: str, rows: list[dict[str, Any]], description: str = "") -> None:
    """A Prefect table artifact (inside a run)."""
    _publish("create_table_artifact", key=key, table=rows, description=description)


def publish_markdown(key: str, markdown: str, description: str = "") -> None:
    """A Prefect markdown artifact (inside a run)."""
    _publish("create_markdown_artifact", key=key, markdown=markdown, description=description)


@contextmanager
def timed(name: str) -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - t0
        stage_logger().info("%s took %.1f s", name, out["seconds"])


@dataclass
class EvalContext:
    """What the pipeline flow hands an evaluation's subflow ``flow(ctx)`` (``flows/evals/<eval>.py``).

    ``stage(name, ref_fn, task, **kw)`` runs one cached stage task through :func:`run_stage`
    (``root`` is added) and records its state in the flow's ``cached`` report under ``name``; give
    every call a unique name (e.g. ``f"absorption-{i}"``). ``saes`` are the SAE artifacts to
    evaluate (the family's members in :meth:`PipelineConfig.sae_configs` order, then the
    imported ones); every ``cfg.json`` in them records ``metadata.hook_name``.

    ``flow(ctx)`` returns an :class:`EvalOutput`.
    """

    config: Any  # saeflow.config.PipelineConfig
    root: str
    model: ArtifactRef
    vocab: ArtifactRef
    corpus: ArtifactRef
    acts: ArtifactRef
    saes: list[ArtifactRef]
    stage: Callable[..., Any]
    device: str = "auto"
    stage_all: Callable[[list[tuple]], list] | None = None
    """Optional: ``stage_all([(name, ref_fn, task, kwargs), ...])`` runs independent stages (e.g. one
    per SAE or per dataset) and returns their results in order: one after another with the local
    runner, submitted together (in parallel on the workers) with ``runner.kind: dask``. ``None`` when
    the caller gives none; then call ``stage`` in a loop."""


@dataclass
class EvalOutput:
    """An evaluation's results, as small references.

    - ``per_sae``: one artifact per entry of ``ctx.saes`` (same order), or ``None`` for an SAE the
      evaluation does not score; each folder holds ``summary.json``, a flat ``{column: number}``
      dict merged into that SAE's row of the core results table (prefix the columns with the
      evaluation's name, e.g. ``absorption_mean_fraction``).
    - ``results``: one artifact folder with the evaluation's tables (``*.parquet`` + ``*.md``) and
      plots (``*.png``); the results stage copies them to ``results/<profile>/<eval>/``.
    - ``refs``: every other artifact it made (shown in the flow's return value).
    """

    per_sae: list[ArtifactRef | None] = field(default_factory=list)
    results: ArtifactRef | None = None
    refs: list[ArtifactRef] = field(default_factory=list)
