"""Task-runner configuration (``runner:``): local, a Dask LocalCluster, a scheduler address, GPU
slots. The smoke profile's run on a 2-worker Dask LocalCluster, compared with the default runner's
results table, is in tests/test_smoke_e2e.py (it shares that test's default-runner run)."""

from __future__ import annotations

import pytest

from flows.pipeline import run_pipeline
from flows.runner import UnsupportedRootError, make_task_runner
from saeflow.config import RunnerConfig
from tests.helpers import tiny_config


def test_runner_config_and_roots():
    assert make_task_runner(RunnerConfig()) is None
    runner = make_task_runner(RunnerConfig(kind="dask", n_workers=3), device="cpu")
    from prefect_dask import DaskTaskRunner

    assert isinstance(runner, DaskTaskRunner)
    assert runner.cluster_kwargs["n_workers"] == 3 and "resources" not in runner.cluster_kwargs
    gpu = make_task_runner(RunnerConfig(kind="dask"), device="cuda")
    assert gpu.cluster_kwargs["resources"] == {"GPU": 1}
    remote = make_task_runner(RunnerConfig(kind="dask", address="tcp://127.0.0.1:8786"))
    assert remote.address == "tcp://127.0.0.1:8786"
    with pytest.raises(ValueError, match="only used with runner.kind: dask"):
        RunnerConfig(address="tcp://h:1")
    with pytest.raises(ValueError, match="not a scheduler address"):
        RunnerConfig(kind="dask", address="h:1")
    # operational: no fingerprint changes
    assert tiny_config().fingerprint_payload() == tiny_config(runner={"kind": "dask"}).fingerprint_payload()
    with pytest.raises(UnsupportedRootError, match="cannot open protocol 'nosuchfs'"):
        run_pipeline(tiny_config(), "nosuchfs://bucket/saeflow")


def _pid() -> int:
    import os

    return os.getpid()


def test_evaluation_subflows_run_on_the_parents_cluster():
    """An evaluation subflow (flows.runner.as_subflow) submits its stages to the parent flow's Dask
    cluster, not to a thread pool of its own in the flow's process; with the local runner it is unchanged."""
    import os

    from prefect import flow, task

    from flows.runner import as_subflow
    from saeflow.config import RunnerConfig

    where = task(_pid)

    @flow
    def sub() -> int:
        return where.submit().result()

    @flow
    def parent() -> tuple[int, int]:
        return os.getpid(), as_subflow(sub)()

    runner = make_task_runner(RunnerConfig(kind="dask", n_workers=1), device="cpu")
    flow_pid, task_pid = parent.with_options(task_runner=runner)()
    assert task_pid != flow_pid  # ran on the cluster's worker process
    assert parent() == (os.getpid(), os.getpid())
