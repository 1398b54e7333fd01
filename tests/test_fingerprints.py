"""A restructure must not change what the core stages compute: the fingerprints of the model,
vocab, corpus, activations and train artifacts stay those of :data:`BASE_REV`, so an artifacts root
made by that commit is reused as it is (nothing re-extracted, no family retrained).

- fast: the fingerprints of configs/smoke.yaml and configs/quick.yaml, computed by the ``ref``
  functions the pipeline calls, equal ``tests/data/fingerprints.json`` (recorded at
  :data:`RECORDED_REV` by ``python -m tests.data.record_fingerprints``);
- slow: :data:`BASE_REV`'s own code (``git archive``) runs the smoke profile without its
  evaluations (they do not feed the core stages; with them the base run took 28 min under load)
  into a fresh root, then the current code runs the same profile on that root and reuses those five
  stages' artifacts untouched (nothing re-extracted, no member retrained).

After an intended change of a fingerprint (a new config field that changes results, ...), record
the file again at the new commit and move :data:`RECORDED_REV` to it (and :data:`BASE_REV` when the
smoke profile's fingerprints change).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from tests.data.record_fingerprints import OUT, REPO, all_fingerprints, fingerprints

#: The commit whose artifacts root the slow test reuses: the last one before the issue #13 restructure
#: (saeflow/sae.py, flat evaluation modules). The smoke profile's core fingerprints have not changed since.
BASE_REV = "38ea71348e216dd642d019d481a82185b0176b9f"
#: The commit tests/data/fingerprints.json was recorded at (after the quick profile was re-sized and
#: switched to ``auto`` precision, issue #26: an intended change of its corpus, activations and train
#: fingerprints; its smoke fingerprints equal BASE_REV's).
RECORDED_REV = "b75935b92866c92711721af7166af9b8430bc543"
CORE_STAGES = ("model", "vocab", "corpus", "activations", "train")
#: configs/smoke.yaml without its evaluations (``extends`` resolves relative to the file's folder).
_CORE_PROFILE = "extends: {smoke}\nabsorption: null\nstitching: null\nmeta_sae: null\nprobing: null\n"


def _recorded() -> dict:
    return json.loads(OUT.read_text())


def test_recorded_file_is_of_the_base_commit():
    data = _recorded()
    assert data["recorded_at"] == RECORDED_REV and not data["recorded_with_local_changes"]


def test_core_fingerprints_are_those_of_the_base_commit():
    recorded = _recorded()["profiles"]
    now = all_fingerprints()
    assert set(now) == set(recorded)
    for profile, fps in recorded.items():
        for stage in CORE_STAGES:
            assert now[profile][stage] == fps[stage], (
                f"{profile}: the {stage} fingerprint changed since {RECORDED_REV[:12]} (recorded {fps[stage]}, now "
                f"{now[profile][stage]}): an artifacts root of that commit would be recomputed from {stage} on")


def _files(root) -> dict[str, tuple[int, int]]:
    """``{path: (size, mtime_ns)}`` of every file in the core stages' artifact folders under ``root``."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for stage in CORE_STAGES for p in sorted((root / stage).rglob("*")) if p.is_file()}


def _git(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, **kw)


def _base_tree(dest) -> None:
    """:data:`BASE_REV`'s files in ``dest`` (skips the test where the history is not at hand)."""
    if not (REPO / ".git").exists():
        pytest.skip("no git checkout (.git missing): the base commit's code cannot be taken")
    if _git("cat-file", "-e", f"{BASE_REV}^{{commit}}").returncode != 0:
        pytest.skip(f"commit {BASE_REV[:12]} is not in this clone's history (a shallow clone?)")
    archive = dest.parent / "base.tar"
    _git("archive", "--format=tar", "-o", str(archive), BASE_REV, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_an_artifacts_root_of_the_base_commit_is_reused(tmp_path):
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import pipeline
    from saeflow.config import load_config

    base = tmp_path / "base"
    _base_tree(base)
    root = tmp_path / "artifacts"
    base_profile = base / "configs" / "smoke-core.yaml"
    base_profile.write_text(_CORE_PROFILE.format(smoke="smoke.yaml"))
    profile = tmp_path / "smoke-core.yaml"
    profile.write_text(_CORE_PROFILE.format(smoke=REPO / "configs" / "smoke.yaml"))
    env = dict(os.environ, PYTHONPATH=str(base), PREFECT_API_URL=PREFECT_API_URL.value())  # the session's server
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline", "--config", str(base_profile),
                           "--artifacts", str(root)], cwd=base, env=env, capture_output=True, text=True, timeout=3000)
    t_base = time.perf_counter() - t0
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])

    before = _files(root)
    t0 = time.perf_counter()
    out = pipeline(load_config(profile), str(root))
    print(f"base commit's smoke run: {t_base:.0f} s; current code on its root: {time.perf_counter() - t0:.0f} s")
    # Reused, not recomputed: every file of the five stages' artifacts is untouched (same bytes, same
    # mtime) and no member was trained, and each stage reports cached (its artifacts were complete).
    # Prefect's own cache may still miss for a stage whose task
    # inputs include a config class that moved module (its key hashes the class path: train's
    # ``members``); the task then finds its artifacts complete and returns them as they are.
    assert _files(root) == before
    assert not any(m.trained for m in out.members)
    assert all(out.cached[s] for s in ("model", "vocab", "corpus", "activations")), out.cached
    now = fingerprints("configs/smoke.yaml", str(root))
    assert [r.fingerprint for r in out.refs.train] == now["train"] == _recorded()["profiles"]["configs/smoke.yaml"]["train"]
