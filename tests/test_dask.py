"""The Dask task runner (prefect-dask ``DaskTaskRunner`` on a 2-worker ``LocalCluster``) gives the
same results table as Prefect's default runner.

Runs the ``tiny-random`` profile (tests.helpers.tiny_config) with a 4-SAE family rather than the
smoke profile: the smoke profile costs ~2 min per runner on the CI machine, the Dask path and its
per-SAE parallel submission are the same on both."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.pipeline import run_pipeline
from flows.runner import UnsupportedRootError, make_task_runner
from saeflow.config import RunnerConfig
from tasks.report import PNG_MAGIC
from tests.helpers import tiny_config

FAMILY = {"architectures": ["topk"], "widths": [64, 128], "ks": [4, 8]}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dask_local_cluster_gives_the_default_runners_results_table(tmp_path):
    local = run_pipeline(tiny_config(family=FAMILY), str(tmp_path / "local"))
    dask_cfg = tiny_config(family=FAMILY, runner={"kind": "dask", "n_workers": 2})
    dask = run_pipeline(dask_cfg, str(tmp_path / "dask"))
    assert not any(dask["cached"].values())  # everything computed on the cluster

    def fps(out):
        return {k: [r["fingerprint"] for r in v] if isinstance(v, list) else v["fingerprint"]
                for k, v in out["refs"].items()}

    assert fps(dask) == fps(local)  # the runner is operational: same fingerprints
    a = pd.read_parquet(Path(local["refs"]["results"]["path"]) / "core_metrics.parquet")
    b = pd.read_parquet(Path(dask["refs"]["results"]["path"]) / "core_metrics.parquet")
    assert list(a.columns) == list(b.columns) and len(a) == len(b) == 4
    num = [c for c in a.columns if pd.api.types.is_numeric_dtype(a[c])]
    pd.testing.assert_frame_equal(a.drop(columns=num), b.drop(columns=num))
    for c in num:
        x, y = a[c].astype(float).to_numpy(), b[c].astype(float).to_numpy()
        assert np.allclose(x, y, rtol=1e-5, atol=1e-7, equal_nan=True), (c, x, y)
    # both runs wrote their report with the frontier plot embedded
    for out in (local, dask):
        text = Path(out["report"]).read_text()
        src = text.split("src='data:image/png;base64,", 1)[1].split("'", 1)[0]
        assert base64.b64decode(src).startswith(PNG_MAGIC)
        assert "metrics-3" in text  # every per-SAE stage's timing


def test_runner_config_and_roots():
    assert make_task_runner(RunnerConfig()) is None
    runner = make_task_runner(RunnerConfig(kind="dask", n_workers=3), device="cpu")
    from prefect_dask import DaskTaskRunner

    assert isinstance(runner, DaskTaskRunner)
    assert runner.cluster_kwargs["n_workers"] == 3 and "resources" not in runner.cluster_kwargs
    gpu = make_task_runner(RunnerConfig(kind="dask"), device="cuda")
    assert gpu.cluster_kwargs["resources"] == {"GPU": 1}
    remote = make_task_runner(RunnerConfig(kind="dask", address="tcp://10.0.0.1:8786"))
    assert remote.address == "tcp://10.0.0.1:8786"
    with pytest.raises(ValueError, match="only used with runner.kind: dask"):
        RunnerConfig(address="tcp://h:1")
    with pytest.raises(ValueError, match="not a scheduler address"):
        RunnerConfig(kind="dask", address="h:1")
    # operational: no fingerprint changes
    assert tiny_config().fingerprint_payload() == tiny_config(runner={"kind": "dask"}).fingerprint_payload()
    with pytest.raises(UnsupportedRootError, match="mountpoint-s3"):
        run_pipeline(tiny_config(), "s3://bucket/saeflow")
