"""Runs started at once on one artifacts root (separate processes, one Prefect server): two runs of
the same profile; two profiles sharing stages (the same model, corpus, activations and one family
member); a ``reevaluate`` firing while a pipeline runs. Each
stage is computed once (the other run waits on the stage's cache lock, or on a family member's
build lock, then reuses the artifact), every run finishes, with the results of a run alone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import tiny_config, write_config

REPO = Path(__file__).resolve().parent.parent
RUN = """
import json, sys, time
from flows.pipeline import pipeline
from saeflow.config import load_config
t0 = time.time()
out = pipeline(load_config(sys.argv[1]), sys.argv[2])
print("RESULT " + json.dumps({"refs": out.refs.model_dump(mode="json"), "cached": out.cached, "start": t0,
                             "end": time.time()}), flush=True)
"""
#: Log lines each stage writes only when it computes its artifact (not when it finds it complete).
COMPUTED = {
    "model": r"model tiny-random: \{",
    "vocab": r"vocab: \d+ alphabetic tokens",
    "corpus": r"corpus: \d+ contexts x",
    "activations": r"activations: \d+ rows x",
    "train": r"train: \d+ of \d+ SAEs to train",
    "metrics": r"- metrics: \{",
    "results": r"results: \d+ rows ->",
}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_runs_at_once_compute_each_stage_once_and_agree(tmp_path):
    from prefect.settings import PREFECT_API_URL

    profile = write_config(tiny_config(), tmp_path / "tiny.yaml")
    root = tmp_path / "artifacts"
    env = dict(os.environ, PYTHONPATH=str(REPO), PREFECT_API_URL=PREFECT_API_URL.value())  # the session's server
    procs = [subprocess.Popen([sys.executable, "-c", RUN, str(profile), str(root)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=500)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-4000:]
    results = [json.loads(next(line for line in o.splitlines() if line.startswith("RESULT "))[7:]) for o in outs]
    a, b = results
    assert max(a["start"], b["start"]) < min(a["end"], b["end"])  # the runs overlapped
    assert a["refs"] == b["refs"]  # same artifacts
    logs = outs[0] + outs[1]
    counts = {stage: len(re.findall(pattern, logs)) for stage, pattern in COMPUTED.items()}
    assert counts == {stage: 1 for stage in COMPUTED}, counts  # each stage computed by exactly one run
    for stage in ("model", "vocab", "corpus", "activations", "train", "metrics"):
        assert len([d for d in (root / stage).iterdir() if not d.name.startswith(".")]) == 1, stage
    table = Path(a["refs"]["results"]["path"]) / "core_metrics.parquet"
    assert table.is_file() and (Path(a["refs"]["results"]["path"]) / "report.html").is_file()


def _env() -> dict:
    from prefect.settings import PREFECT_API_URL

    return dict(os.environ, PYTHONPATH=str(REPO), PREFECT_API_URL=PREFECT_API_URL.value())  # the session's server


def _results(out: str) -> dict:
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def _table(path: Path) -> pd.DataFrame:
    df = pd.read_parquet(path / "core_metrics.parquet")
    return df[[c for c in df.columns if not re.search("seconds|time", c)]]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_profiles_sharing_stages_at_once_compute_each_stage_once(tmp_path):
    """``p1``: a family of topk (w64, k8) and (w128, k8); ``p2``: (w128, k4) and (w128, k8). Shared:
    model, vocab, corpus, activations, the member (w128, k8) and its metrics. The two families have
    different cache keys, so only the member's build lock (:func:`saeflow.artifacts.build_lock`)
    keeps the shared member from being trained twice. (No evaluation here, for the CI budget: the
    reevaluate test below shares an evaluation's stages between two runs.)"""
    from flows.pipeline import pipeline

    configs = {"p1": tiny_config(name="p1", family={"widths": [64, 128], "ks": [8]}),
               "p2": tiny_config(name="p2", family={"widths": [128], "ks": [4, 8]})}
    root = tmp_path / "artifacts"
    procs = [subprocess.Popen([sys.executable, "-c", RUN, str(write_config(cfg, tmp_path / f"{name}.yaml")), str(root)],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cfg in configs.items()]
    outs = [p.communicate(timeout=500)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-4000:]
    a, b = (_results(o) for o in outs)
    assert max(a["start"], b["start"]) < min(a["end"], b["end"])  # the runs overlapped
    logs = outs[0] + outs[1]
    shared = {stage: len(re.findall(COMPUTED[stage], logs)) for stage in ("model", "vocab", "corpus", "activations")}
    assert shared == dict.fromkeys(shared, 1), shared
    trained = re.findall(r"train: (topk width=\d+ k=\d+) done", logs)
    assert sorted(trained) == ["topk width=128 k=4", "topk width=128 k=8", "topk width=64 k=8"], trained
    assert len(re.findall(COMPUTED["metrics"], logs)) == 3  # one per distinct SAE
    for stage, n in (("activations", 1), ("train", 3), ("metrics", 3)):
        assert len([d for d in (root / stage).iterdir() if d.is_dir()]) == n, stage
    for name, cfg in configs.items():  # the same tables as each profile run alone
        alone = tmp_path / f"alone-{name}"
        pipeline(cfg, str(alone))
        pd.testing.assert_frame_equal(_table(root / "results" / name), _table(alone / "results" / name),
                                      check_exact=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reevaluate_firing_while_a_pipeline_runs(tmp_path):
    """The scheduled ``reevaluate`` of the profile (a family of two SAEs with the meta-SAE evaluation)
    starts while the profile's pipeline is training: it waits on the stages the pipeline holds,
    reuses them, and both finish; each stage once."""
    meta_sae = {"train_steps": 30, "batch_size": 64, "n_examples": 2, "example_rows": 1024, "checkpoint_every": 10,
                "log_every": 10}
    profile = write_config(tiny_config(family={"widths": [64, 128], "ks": [8]}, meta_sae=meta_sae),
                           tmp_path / "tiny.yaml")
    root = tmp_path / "artifacts"
    run = subprocess.Popen([sys.executable, "-c", RUN, str(profile), str(root)], cwd=REPO, env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in run.stdout:  # until the pipeline's train stage starts
        lines.append(line)
        if "stage train: start" in line:
            break
    t_fire = time.time()
    reeval = subprocess.Popen([sys.executable, "-m", "flows.reevaluate", "--config", str(profile), "--artifacts",
                               str(root)], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    out_run = "".join(lines) + run.communicate(timeout=500)[0]
    out_reeval = reeval.communicate(timeout=500)[0]
    assert run.returncode == 0, out_run[-4000:]
    assert reeval.returncode == 0, out_reeval[-4000:]
    assert t_fire < _results(out_run)["end"]  # it fired while the pipeline ran
    logs = out_run + out_reeval
    counts = {stage: len(re.findall(pattern, logs)) for stage, pattern in COMPUTED.items()}
    assert counts == {**dict.fromkeys(COMPUTED, 1), "metrics": 2}, counts  # two SAEs: two metrics stages
    assert len(re.findall(r"train: topk width=\d+ k=8 done", logs)) == 2
    assert len(re.findall(r"meta-SAE of .*: FVE", logs)) == 2  # the evaluation's per-SAE stages, once each
    assert len(re.findall(r"meta-SAE summary of ", logs)) == 2
    for stage in ("model", "vocab", "corpus", "activations", "train", "metrics", "meta_sae", "meta_sae-sae"):
        n = 1 if stage in ("model", "vocab", "corpus", "activations") else 2
        assert len([d for d in (root / stage).iterdir() if d.is_dir()]) == n, stage
