"""What every stage task shares: Prefect settings, the cache policy, logging and progress.

Caching: a task's key is ``INPUTS + TASK_SOURCE`` (its config, the upstream artifact references,
which carry content fingerprints, and the artifacts root; never the device), stored as files under
``<root>/.prefect/cache`` so a fresh ``PREFECT_HOME`` still hits. Because a cache record outlives a
deleted artifact, :func:`run_stage` checks the expected artifact first and refreshes the cache when
it is missing or partial. Task bodies are idempotent on their own: a complete artifact folder is
returned as is, a partial one is resumed.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
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

from prefect.cache_policies import INPUTS, TASK_SOURCE  # noqa: E402
from prefect.context import TaskRunContext  # noqa: E402
from prefect.exceptions import MissingContextError  # noqa: E402
from prefect.filesystems import LocalFileSystem  # noqa: E402
from prefect.locking.filesystem import FileSystemLockManager  # noqa: E402
from prefect.logging import get_run_logger  # noqa: E402

from saeflow.artifacts import ArtifactRef  # noqa: E402

log = logging.getLogger("saeflow")


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a run, the ``saeflow`` logger otherwise (e.g. ``task.fn``)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return log


def cache_policy(root: str | Path):
    root = Path(root).resolve()
    return (INPUTS + TASK_SOURCE - "device").configure(
        key_storage=LocalFileSystem(basepath=str(root / ".prefect" / "cache")),
        lock_manager=FileSystemLockManager(lock_files_directory=root / ".prefect" / "locks"),
        isolation_level="SERIALIZABLE",
    )


def run_stage(task, ref_fn: Callable[..., ArtifactRef], **kwargs: Any):
    """Run a stage task with the project cache policy; returns its Prefect state.

    A cached result is only trusted while the artifact it points at is complete.
    """
    root = kwargs["root"]
    expected = ref_fn(**kwargs)
    opts: dict[str, Any] = {
        "cache_policy": cache_policy(root),
        "persist_result": True,
    }
    if not expected.is_complete():
        opts["refresh_cache"] = True
    return task.with_options(**opts)(return_state=True, **kwargs)


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


def publish_table(key: str, rows: list[dict[str, Any]], description: str = "") -> None:
    if not in_task_run():
        return
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(key=key, table=rows, description=description)
    except Exception as exc:
        stage_logger().debug("no table artifact: %s", exc)


def publish_markdown(key: str, markdown: str, description: str = "") -> None:
    if not in_task_run():
        return
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key=key, markdown=markdown, description=description)
    except Exception as exc:
        stage_logger().debug("no markdown artifact: %s", exc)


@contextmanager
def timed(name: str) -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - t0
        stage_logger().info("%s took %.1f s", name, out["seconds"])
