"""SIGKILL the flow process during extraction and during training of an SAE family, re-run, and
compare with an uninterrupted run: the activation store and every SAE's weights must be identical."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import tiny_config, write_config

REPO = Path(__file__).resolve().parent.parent


def _config():
    # enough batches/steps that a kill lands mid-stage
    return tiny_config(
        corpus={"context_size": 32, "n_contexts": 600, "eval_contexts": 40},
        activations={"hook": "blocks.1.hook_resid_post", "batch_size": 2, "chunk_rows": 256},
        train={"training_tokens": 256 * 400, "batch_size": 256, "checkpoint_every": 10, "log_every": 50},
        family={"widths": [64, 128], "ks": [8]},  # two SAEs, one pass: a kill may land between their checkpoints
    )


def _start(cfg_path: Path, root: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--config", str(cfg_path), "--artifacts", str(root)],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen, timeout: float = 600) -> None:
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"flow exited {rc}"


def _kill_when(proc: subprocess.Popen, cond, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail("the flow finished before the kill point was reached; make the stage longer")
        time.sleep(0.02)
    pytest.fail("kill point not reached in time")


def _one(root: Path, stage: str) -> Path:
    dirs = [d for d in (root / stage).iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _all(root: Path, stage: str) -> list[Path]:
    return sorted(d for d in (root / stage).iterdir() if d.is_dir())


def _extraction_midway(root: Path):
    def cond():
        p = root / "activations"
        if not p.exists():
            return False
        for d in p.iterdir():
            f = d / "progress.json"
            if f.exists():
                try:
                    return 100 <= json.loads(f.read_text())["contexts"] <= 400
                except ValueError:
                    return False
        return False
    return cond


def _training_midway(root: Path):
    def cond():
        p = root / "train"
        return p.exists() and any((d / "checkpoint").exists() for d in p.iterdir())
    return cond


@pytest.mark.slow
def test_sigkill_during_extraction_and_training_then_resume(tmp_path):
    cfg = write_config(_config(), tmp_path / "kill.yaml")
    clean, killed = tmp_path / "clean", tmp_path / "killed"

    _wait(_start(cfg, clean, tmp_path / "clean.log"))

    proc = _start(cfg, killed, tmp_path / "kill1.log")
    _kill_when(proc, _extraction_midway(killed))
    acts_dir = _one(killed, "activations")
    assert not (acts_dir / "_COMPLETE.json").exists()
    done_before = json.loads((acts_dir / "progress.json").read_text())["contexts"]
    assert 0 < done_before < 560

    proc = _start(cfg, killed, tmp_path / "kill2.log")
    _kill_when(proc, _training_midway(killed))
    assert (acts_dir / "_COMPLETE.json").exists()
    meta = json.loads((acts_dir / "_COMPLETE.json").read_text())
    assert meta["resumed_from_context"] >= done_before  # it continued, it did not start over
    assert not any((d / "_COMPLETE.json").exists() for d in _all(killed, "train"))

    _wait(_start(cfg, killed, tmp_path / "final.log"))
    train_dirs = _all(killed, "train")
    assert [d.name for d in train_dirs] == [d.name for d in _all(clean, "train")] and len(train_dirs) == 2
    resumed = [json.loads((d / "_COMPLETE.json").read_text()).get("resumed_from_step") or 0 for d in train_dirs]
    assert max(resumed) > 0, resumed  # training continued from its checkpoints

    import zarr

    a = zarr.open_group(str(_one(clean, "activations") / "acts.zarr"), mode="r")
    b = zarr.open_group(str(acts_dir / "acts.zarr"), mode="r")
    for name in ["acts", "token_ids", "positions", "context"]:
        np.testing.assert_array_equal(np.asarray(a[name][:]), np.asarray(b[name][:]), err_msg=name)
    for d in train_dirs:
        wa = load_file(str(clean / "train" / d.name / "sae_weights.safetensors"))
        wb = load_file(str(d / "sae_weights.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (d.name, k)
        assert not (d / "checkpoint").exists()
