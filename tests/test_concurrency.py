"""Two flow runs started at once on the same config and artifacts root (two processes, one Prefect
server): each stage is computed once (the other run waits on the stage's cache lock, then reuses
the artifact) and both finish with the same results."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

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
