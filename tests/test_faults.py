"""Faults (issue #15): a SIGKILL at a random moment inside every kind of stage, disk full, a corrupted
activation chunk, a truncated SAE weights file, a results table removed by hand.

The kill walk (``test_sigkill_inside_every_stage_kind_then_resume``, slow) runs on the profile
:func:`faults_config`: the smoke profile's stage graph (every evaluation on, a family of two TopK
SAEs and the latent browser on, so every kind of stage exists: model, vocab, corpus, activations,
train, metrics-i, browser-i, each evaluation's stages, results, the browser's site, report) on the tiny random model with each evaluation section sized
tiny (as tests/test_{absorption,stitching,meta_sae,probing}.py size them), NOT configs/smoke.yaml on
SmolLM2: that profile alone takes ~9 min and the CI budget left for these tests is ~6 min.

One uninterrupted reference run (root A, a subprocess) gives every stage's start time from the
``stage <name>: start`` log line :class:`flows.runner.StageRunner` writes, hence each stage's
duration (to the next stage's start). Then ONE walk on root B: for each chosen stage in pipeline
order the flow subprocess is started and, once it logs that stage's start, SIGKILLed (process
group) at a seeded random moment of the stage: activations and train from their own progress
counters (``progress.json`` contexts, the checkpoint's step: a seeded fraction 0.05-0.95 of the
total), every other stage after that fraction of its reference duration. After each kill every
artifact folder that was complete before is byte-identical (sha256 of every file). Finally a run to
completion: every folder of A exists complete in B, the results tables equal A's (every column but
the timing ones, exactly), no lock file is left (and the run did not wait on one), extraction and
training resumed where they were killed (``resumed_from_context`` / ``resumed_from_step``) and
the activation store and every SAE's weights equal A's exactly.

Seeded subset (CI budget): the stage kinds of the core pipeline (:data:`CORE_KINDS`) are always
killed; of each evaluation's four stage kinds (:data:`EVAL_KINDS`) ONE is killed, chosen by
``random.Random(SEED)`` (``SAEFLOW_FAULTS_ALL=1`` kills all 26 kinds). A kind with several
instances (metrics-0/1, absorption-0/1, stitching-form-0/1, stitching-summary-0/1,
meta_sae-train-0/1, meta_sae-sae-0/1, probing-sae-0/1) is killed in one instance, chosen by the same
seed. Stages shorter than the time a kill needs to land (vocab, stitching-form/summary,
meta_sae-sae, probing-acts: tens of ms here) may be passed before the kill lands; the test records
which kills landed inside their stage (the next stage's start not yet logged) and which left a
partial folder, prints both lists, and requires at least 60% of the kills to land inside their stage
and activations and train to be caught mid-write.

The other faults are fast in-process tests on the tiny profile of tests/helpers.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from saeflow.saes.saelens_format import SAE_WEIGHTS_FILENAME as SAE_WEIGHTS
from saeflow.store import ROW_ARRAYS, ActivationStore
from tasks.browser import SITE, SITE_JSON
from tests.helpers import tiny_config, write_config

REPO = Path(__file__).resolve().parent.parent
SEED = 15
START = re.compile(r"stage (\S+): start")
#: Columns that hold wall times (differ between any two runs).
TIME_COLUMN = re.compile(r"seconds|time")
#: Files the report stage rewrites in the (complete) results folder on every run.
REPORT_FILES = {"report.html", "report.md", "run.json"}
#: Stage kinds the walk always kills.
CORE_KINDS = ("model", "vocab", "corpus", "activations", "train", "metrics", "browser", "results", "site", "report")
#: Each evaluation's stage kinds: the walk kills EVAL_KINDS_PER_EVAL of them per evaluation, chosen
#: by the seed (every one with ``SAEFLOW_FAULTS_ALL=1``).
EVAL_KINDS = {
    "absorption": ("absorption-data", "absorption-probe", "absorption", "absorption-results"),
    "stitching": ("stitching-form", "stitching-pair", "stitching-summary", "stitching-results"),
    "meta_sae": ("meta_sae-train", "meta_sae-sae", "meta_sae-examples", "meta_sae-results"),
    "probing": ("probing-acts", "probing-baselines", "probing-sae", "probing-results"),
}
EVAL_KINDS_PER_EVAL = 1


def faults_config(**overrides):
    """The smoke profile's stage graph on the tiny random model (see the module docstring)."""
    sections = dict(
        name="faults",
        corpus={"context_size": 32, "n_contexts": 160, "eval_contexts": 16},  # extraction and training long
        activations={"hook": "blocks.1.hook_resid_post", "batch_size": 4, "chunk_rows": 256},  # enough for a kill
        train={"training_tokens": 256 * 80, "batch_size": 256, "checkpoint_every": 10, "log_every": 20},  # mid-way
        family={"architectures": ["topk"], "widths": [64, 128], "ks": [8]},
        absorption={"min_letters": 1, "min_probe_f1": 0.0, "probe_steps": 50, "sparse_probe_steps": 50,
                    "max_ablation_prompts": 2, "max_k": 3},
        stitching={"n_tokens": 512, "calibration_tokens": 1024, "n_steps": 3, "ce_batches": 1, "ce_batch_size": 4},
        meta_sae={"train_steps": 30, "batch_size": 64, "n_examples": 2, "example_rows": 1024, "checkpoint_every": 10,
                  "log_every": 10},
        probing={"datasets": ["5_hist_fig_ismale"], "max_rows": 240, "regimes": ["normal", "scarcity"],
                 "scarcity_sizes": [20], "methods": ["logreg"], "ks_normal": [16], "ks_other": [16],
                 "quiver_ks": [16], "n_jobs": 1},
        browser={"n_top": 5, "n_random": 2, "window": 4},  # the latent browser: a stage per SAE and its site
    )
    return tiny_config(**{**sections, **overrides})


class Flow:
    """``python -m flows.pipeline`` in its own process group; its output lines with arrival times."""

    def __init__(self, cfg: Path, root: Path, log: Path) -> None:
        from prefect.settings import PREFECT_API_URL

        env = dict(os.environ, PYTHONPATH=str(REPO), PREFECT_API_URL=PREFECT_API_URL.value())  # the session's server
        self.log = log
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--config", str(cfg), "--artifacts",
                                      str(root)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with self.log.open("w") as out:
            for line in self.proc.stdout:
                self.lines.append((time.monotonic(), line))
                out.write(line)
                out.flush()

    def starts(self) -> list[tuple[float, str]]:
        return [(t, m.group(1)) for t, line in list(self.lines) for m in [START.search(line)] if m]

    def wait(self, timeout: float = 600) -> float:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        assert rc == 0, f"flow exited {rc}; log {self.log}:\n" + "".join(line for _, line in self.lines[-60:])
        return time.monotonic()

    def wait_for_start(self, stage: str, timeout: float = 300) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for t, name in self.starts():
                if name == stage:
                    return t
            if self.proc.poll() is not None:
                self._reader.join(timeout=10)
                pytest.fail(f"the flow ended ({self.proc.returncode}) before stage {stage} started; log {self.log}")
            time.sleep(0.002)
        pytest.fail(f"stage {stage} did not start within {timeout} s; log {self.log}")

    def wait_until(self, cond, stage: str, timeout: float = 300) -> None:
        t0 = time.monotonic()
        while not cond():
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                pytest.fail(f"the kill point inside {stage} was not reached; log {self.log}")
            time.sleep(0.002)

    def kill(self) -> float:
        os.killpg(self.proc.pid, signal.SIGKILL)
        t = time.monotonic()
        self.proc.wait()
        self._reader.join(timeout=10)
        return t


def artifact_folders(root: Path) -> list[Path]:
    """Every ``<stage>/<name>/`` folder of the root (hidden ones, e.g. ``.prefect``, excluded)."""
    return sorted(d for s in root.iterdir() if s.is_dir() and not s.name.startswith(".")
                  for d in s.iterdir() if d.is_dir() and not d.name.startswith("."))


def _hashes(d: Path, skip) -> dict[str, str]:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(d.rglob("*")) if f.is_file() and not skip(f.relative_to(d))}


def complete_hashes(root: Path) -> dict[str, dict[str, str]]:
    """sha256 of every file of every complete folder (the report's own files in results/ excepted);
    the latent browser's site (``results/<profile>/browser/``, rewritten by the site stage, which
    builds it in ``browser.tmp/`` beside it: a killed site write leaves that folder, which the next
    one replaces) counts as its own folder, complete once its ``site.json`` is written."""
    out = {}
    for d in artifact_folders(root):
        if (d / "_COMPLETE.json").is_file():
            in_results = d.parent.name == "results"
            out[str(d.relative_to(root))] = _hashes(
                d, lambda rel: in_results and (rel.name in REPORT_FILES or rel.parts[0] in (SITE, SITE + ".tmp")))
        if d.parent.name == "results" and (d / SITE / SITE_JSON).is_file():
            out[str((d / SITE).relative_to(root))] = _hashes(d / SITE, lambda rel: False)
    return out


def kind(stage: str) -> str:
    """The kind of a stage: ``metrics-1`` -> ``metrics``, ``probing-acts-<dataset>`` -> ``probing-acts``."""
    if stage.startswith("probing-acts-"):
        return "probing-acts"
    return re.sub(r"(-\d+)+$", "", stage)


def tables(results: Path) -> dict[str, pd.DataFrame]:
    """Every parquet table of a results folder, timing columns dropped."""
    out = {}
    for f in sorted(results.rglob("*.parquet")):
        df = pd.read_parquet(f)
        out[str(f.relative_to(results))] = df[[c for c in df.columns if not TIME_COLUMN.search(c)]]
    return out


def _progress_reached(root: Path, stage: str, frac: float, total: int):
    """For the stages with a progress counter: true once ``frac`` of it is done (activations:
    ``progress.json`` contexts of ``total``; train: the latest checkpoint's step of ``total``)."""
    def reached() -> bool:
        files = (root / stage).glob("*/progress.json" if stage == "activations" else "*/checkpoint/meta.json")
        for f in files:
            try:
                done = json.loads(f.read_text())["contexts" if stage == "activations" else "step"]
            except (OSError, ValueError, KeyError):
                continue
            if done >= frac * total:
                return True
        return False
    return reached


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_inside_every_stage_kind_then_resume(tmp_path):
    config = faults_config()
    cfg = write_config(config, tmp_path / "faults.yaml")
    a_root, b_root = tmp_path / "A", tmp_path / "B"
    t_test = time.monotonic()

    ref = Flow(cfg, a_root, tmp_path / "reference.log")
    end = ref.wait()
    starts = ref.starts()
    names = [name for _, name in starts]
    assert names[0] == "model" and names[-1] == "report" and len(set(names)) == len(names), names
    duration = {name: (starts[i + 1][0] if i + 1 < len(starts) else end) - t for i, (t, name) in enumerate(starts)}
    kinds: dict[str, list[str]] = {}
    for name in names:
        kinds.setdefault(kind(name), []).append(name)
    assert set(kinds) == set(CORE_KINDS) | {k for group in EVAL_KINDS.values() for k in group}, sorted(kinds)

    rng = random.Random(SEED)
    chosen = list(CORE_KINDS)
    for group in EVAL_KINDS.values():
        chosen += group if os.environ.get("SAEFLOW_FAULTS_ALL") else rng.sample(group, EVAL_KINDS_PER_EVAL)
    targets = sorted((rng.choice(kinds[k]) for k in chosen), key=names.index)
    totals = {"activations": config.corpus.n_contexts - config.corpus.eval_contexts,
              "train": config.train.training_tokens // config.train.batch_size}
    inside, partial, passed = [], [], []
    for i, stage in enumerate(targets):
        before = complete_hashes(b_root) if b_root.exists() else {}
        frac = rng.uniform(0.05, 0.95)
        run = Flow(cfg, b_root, tmp_path / f"kill-{i:02d}-{stage}.log")
        t_start = run.wait_for_start(stage)
        if stage in totals:  # the moment from the stage's own progress counter
            run.wait_until(_progress_reached(b_root, stage, frac, totals[stage]), stage)
        else:  # a fraction of the stage's duration in the reference run
            time.sleep(max(0.0, t_start + frac * duration[stage] - time.monotonic()))
        run.kill()
        later = [n for _, n in run.starts() if names.index(n) > names.index(stage)]  # logged before the kill
        (passed if later else inside).append(stage)
        after = complete_hashes(b_root)
        for folder, files in before.items():
            now = after.get(folder) or {}
            changed = sorted(f for f in set(files) | set(now) if files.get(f) != now.get(f))
            assert not changed, f"kill in {stage} changed the complete artifact {folder}: {changed}"
        if any(not (d / "_COMPLETE.json").exists() for d in artifact_folders(b_root)):
            partial.append(stage)
    print(f"kill walk: {len(inside)}/{len(targets)} kills landed inside their stage: {inside}; "
          f"passed the stage before the kill: {passed}; left a partial folder: {partial}")
    assert len(inside) >= 0.6 * len(targets), (inside, passed)
    assert {"activations", "train"} <= set(partial), partial  # caught mid-write from their progress

    final = Flow(cfg, b_root, tmp_path / "final.log")
    final.wait(timeout=300)  # a lock left by a killed run would block this run forever
    assert not list((b_root / ".prefect" / "locks").glob("*.lock")), "a lock file is left"
    assert [str(d.relative_to(a_root)) for d in artifact_folders(a_root)] == \
        [str(d.relative_to(b_root)) for d in artifact_folders(b_root)]
    assert all((d / "_COMPLETE.json").is_file() for d in artifact_folders(b_root))
    stale = [str(f.relative_to(b_root)) for d in artifact_folders(b_root) for f in d.rglob(".*.tmp")]
    assert not stale, f"temporary files of killed writes left in finished folders: {stale}"
    ta, tb = tables(a_root / "results" / "faults"), tables(b_root / "results" / "faults")
    assert ta.keys() == tb.keys() and "core_metrics.parquet" in ta
    for key in ta:
        pd.testing.assert_frame_equal(ta[key], tb[key], check_exact=True, obj=key)
    # extraction and training continued where they were killed (not started over) and their outputs
    # equal the uninterrupted run's: the activation store row for row, every SAE's weights exactly
    acts_a, acts_b = _only(a_root, "activations"), _only(b_root, "activations")
    assert json.loads((acts_b / "_COMPLETE.json").read_text()).get("resumed_from_context", 0) > 0
    resumed = [json.loads((d / "_COMPLETE.json").read_text()).get("resumed_from_step") or 0
               for d in artifact_folders(b_root) if d.parent.name == "train"]
    assert len(resumed) == 2 and max(resumed) > 0, resumed
    sa, sb = ActivationStore.open(acts_a), ActivationStore.open(acts_b)
    np.testing.assert_array_equal(sa.read(0, sa.n_rows), sb.read(0, sb.n_rows))
    for name in ROW_ARRAYS:
        np.testing.assert_array_equal(sa.read_rows(name, 0, sa.n_rows), sb.read_rows(name, 0, sb.n_rows), err_msg=name)
    for d in (d for d in artifact_folders(a_root) if d.parent.name == "train"):
        wa, wb = load_file(str(d / SAE_WEIGHTS)), load_file(str(b_root / "train" / d.name / SAE_WEIGHTS))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), d.name
        assert not (b_root / "train" / d.name / "checkpoint").exists()
    print(f"kill walk test: {len(targets)} kills, {time.monotonic() - t_test:.0f} s")


# ------------------------------------------------------------------ other faults (fast, in process)
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished run of the tiny profile; each test works on a copy of its root."""
    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("base").resolve()
    pipeline(tiny_config(), str(root))
    return root


def _copy(base: Path, tmp_path: Path) -> Path:
    root = (tmp_path / "artifacts").resolve()
    shutil.copytree(base, root, ignore=shutil.ignore_patterns(".prefect"))
    return root


def _only(root: Path, stage: str) -> Path:
    (folder,) = [d for d in artifact_folders(root) if d.parent.name == stage]
    return folder


def test_disk_full_in_a_stage_is_a_clear_error_and_the_rerun_resumes(base, tmp_path, monkeypatch):
    from flows.pipeline import pipeline
    from flows.runner import DiskFullError

    root = _copy(base, tmp_path)
    before = complete_hashes(root)
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):  # the device of train/ is full: every durable write there fails
        if Path(dst).resolve().is_relative_to(root / "train"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    cfg = tiny_config(sae__width=64)  # a new SAE on the same activations: the train stage writes
    with pytest.raises(DiskFullError, match=rf"stage train failed: no space left on the device of the artifacts root "
                                            rf"{re.escape(str(root))} .*Free space there .* and re-run") as exc:
        pipeline(cfg, str(root))
    print(f"user sees: {exc.value}")
    assert complete_hashes(root) == before  # finished artifacts untouched, nothing half-done marked complete
    monkeypatch.setattr(os, "replace", real_replace)  # space is back
    out = pipeline(cfg, str(root))
    assert out.members[0].trained and out.refs.train[0].is_complete()
    assert len(pd.read_parquet(out.refs.results.dir / "core_metrics.parquet")) == 1


def test_corrupted_activation_chunk_is_a_clear_error_never_a_wrong_number(base, tmp_path):
    from flows.pipeline import pipeline
    from saeflow.store import StoreError

    root = _copy(base, tmp_path)
    acts = _only(root, "activations")
    chunk = sorted(f for f in (acts / "acts.zarr" / "acts" / "c").rglob("*") if f.is_file())[1]
    good = chunk.read_bytes()
    chunk.write_bytes(random.Random(SEED).randbytes(len(good)))  # same size: only a checksum can tell
    before = complete_hashes(root)
    cfg = tiny_config(sae__width=64)  # a new SAE: training reads the store
    where = re.escape(str(acts))
    with pytest.raises(StoreError, match=rf"activation store at {where} is corrupt: .*Delete {where} and re-run") as exc:
        pipeline(cfg, str(root))
    print(f"user sees: {exc.value}")
    assert complete_hashes(root) == before  # no SAE trained on damaged rows, no table rewritten
    shutil.rmtree(acts)  # the fix the message names
    out = pipeline(cfg, str(root))
    assert chunk.read_bytes() == good  # extraction rebuilt the same rows
    assert out.members[0].trained and len(pd.read_parquet(out.refs.results.dir / "core_metrics.parquet")) == 1


def test_truncated_sae_weights_are_a_clear_error_and_the_fix_rebuilds_them(base, tmp_path):
    from flows.pipeline import pipeline
    from saeflow.saes import SAEFormatError

    root = _copy(base, tmp_path)
    sae = _only(root, "train")
    weights = sae / "sae_weights.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    cfg = tiny_config(metrics__n_variance_tokens=256)  # new metrics of the same SAE: they load its weights
    file, folder = re.escape(str(weights)), re.escape(str(sae))
    with pytest.raises(SAEFormatError, match=rf"{file} is unreadable or corrupt.*the finished artifact {folder} was "
                                             rf"damaged after it was written: delete {folder} and re-run the pipeline") as exc:
        pipeline(cfg, str(root))
    print(f"user sees: {exc.value}")
    assert (root / "results" / "tiny" / "core_metrics.parquet").read_bytes() == \
        (base / "results" / "tiny" / "core_metrics.parquet").read_bytes()  # the table is not rewritten
    shutil.rmtree(sae)  # the fix the message names
    out = pipeline(cfg, str(root))
    assert out.members[0].trained and weights.read_bytes() == good  # retrained to the same weights


def test_overwritten_sae_weights_fail_their_recorded_checksum(base, tmp_path):
    """Same size, other bytes (a flipped block): safetensors would load it as other numbers; the
    checksum training recorded in ``training_summary.json`` refuses it."""
    from saeflow.saes import SAEFormatError, load_sae

    root = _copy(base, tmp_path)
    sae = _only(root, "train")
    load_sae(sae)  # intact: loads
    weights = sae / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])  # the last values of the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(SAEFormatError, match=rf"{re.escape(str(weights))} is unreadable or corrupt: it is not the "
                                             r"file training wrote \(its SHA-256 differs") as exc:
        load_sae(sae)
    print(f"user sees: {exc.value}")


def test_results_table_removed_by_hand_is_rebuilt(base, tmp_path):
    from flows.pipeline import pipeline

    root = _copy(base, tmp_path)
    results = root / "results" / "tiny"
    table = results / "core_metrics.parquet"
    expected = pd.read_parquet(table)
    table.unlink()
    out = pipeline(tiny_config(), str(root))
    assert not out.cached["results"] and all(out.cached[s] for s in ("model", "corpus", "activations", "train"))
    pd.testing.assert_frame_equal(pd.read_parquet(table), expected)
    assert "core_metrics" in out.report.read_text()
