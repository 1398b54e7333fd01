"""Artifacts roots given as fsspec URLs (saeflow.remote): a local mirror per machine, pulled and
pushed per stage. Uses fsspec's in-memory filesystem (``memory://``) as the object store; a second
mirror folder stands in for a second machine."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pandas as pd
import pytest

from flows.pipeline import pipeline
from flows.runner import UnsupportedRootError, resolve_root
from saeflow import remote
from saeflow.artifacts import COMPLETE_MARKER, ArtifactRef, require_complete
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty ``memory://`` object store and a fresh mirror folder (machine A)."""
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")
    monkeypatch.setenv(remote.ENV_MIRROR, str(tmp_path / "machine-a"))
    yield fs
    fs.store.clear()


def _folder(path: Path, complete: bool = True) -> Path:
    (path / "data.zarr" / "c").mkdir(parents=True)
    (path / "data.zarr" / "zarr.json").write_text("{}")
    (path / "data.zarr" / "c" / "0.0").write_bytes(b"\x00\x01\x02")
    (path / "config.json").write_text(json.dumps({"stage": "x"}))
    if complete:
        (path / COMPLETE_MARKER).write_text(json.dumps({"fingerprint": path.name}))
    return path


def test_mirror_paths_round_trip_and_bad_urls(tmp_path, monkeypatch):
    monkeypatch.setenv(remote.ENV_MIRROR, str(tmp_path / "m"))
    assert remote.is_url("s3://b/p") and remote.is_url("memory://x") and not remote.is_url("/data/a")
    assert not remote.is_url("file:///data/a") and remote.local_path("file:///data/a") == "/data/a"
    mirror = remote.mirror_of("s3://bucket/saeflow/run1/")
    assert mirror == tmp_path / "m" / "s3" / "bucket" / "saeflow" / "run1"
    assert remote.url_of(mirror / "train" / "abc") == "s3://bucket/saeflow/run1/train/abc"
    assert remote.url_of(tmp_path / "elsewhere") is None
    with pytest.raises(remote.RemoteRootError, match="bucket/path"):
        remote.mirror_of("s3://bucket/../etc")
    with pytest.raises(UnsupportedRootError, match="cannot open protocol 'nosuchfs'"):
        resolve_root("nosuchfs://bucket/x")


def test_push_then_pull_on_another_machine(store, tmp_path, monkeypatch):
    root = resolve_root("memory://bucket/run")
    a = _folder(Path(root) / "train" / "fp1")
    partial = _folder(Path(root) / "train" / "fp2", complete=False)
    assert remote.push(a) and not remote.push(a)  # second push: the URL already has it complete
    assert not remote.push(partial)  # partial folders never travel
    assert store.exists("/bucket/run/train/fp1/_COMPLETE.json") and store.exists("/bucket/run/train/fp1/data.zarr/c/0.0")
    assert not store.exists("/bucket/run/train/fp2")

    monkeypatch.setenv(remote.ENV_MIRROR, str(tmp_path / "machine-b"))
    root_b = Path(resolve_root("memory://bucket/run"))
    assert root_b != Path(root)
    b = root_b / "train" / "fp1"
    _folder(b, complete=False)  # an interrupted local run of the same stage
    (b / "stale.tmp").write_text("x")
    ref = ArtifactRef(stage="train", fingerprint="fp1", path=str(b))
    assert require_complete(ref) == b  # pulled on demand
    assert sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()) == sorted(
        p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert (b / "data.zarr" / "c" / "0.0").read_bytes() == b"\x00\x01\x02"
    assert not remote.pull(b)  # complete here: nothing to do
    missing = ArtifactRef(stage="train", fingerprint="fp2", path=str(root_b / "train" / "fp2"))
    with pytest.raises(RuntimeError, match="missing or partial"):
        require_complete(missing)  # the URL has no complete copy either


def test_pipeline_on_a_url_root_reuses_everything_from_another_machine(store, tmp_path, monkeypatch):
    url = "memory://bucket/saeflow"
    first = pipeline(tiny_config(), url)
    assert first.members[0].trained
    mirror = remote.mirror_of(url)
    for stage in ("model", "vocab", "corpus", "activations", "results"):
        rel = Path(getattr(first.refs, stage).path).relative_to(mirror).as_posix()
        assert store.exists(f"/bucket/saeflow/{rel}/{COMPLETE_MARKER}"), stage
    train_fp = first.refs.train[0].fingerprint
    assert store.exists(f"/bucket/saeflow/train/{train_fp}/sae_weights.safetensors")
    assert store.exists("/bucket/saeflow/results/tiny/report.html")

    monkeypatch.setenv(remote.ENV_MIRROR, str(tmp_path / "machine-b"))  # another machine: empty mirror
    second = pipeline(tiny_config(), url)
    assert not second.members[0].trained  # the SAE came from the URL, not from training
    singles = ("model", "vocab", "corpus", "activations", "results")  # every stage with one artifact
    assert {k: getattr(second.refs, k).fingerprint for k in singles} == \
        {k: getattr(first.refs, k).fingerprint for k in singles}
    assert second.refs.evals == first.refs.evals == {}
    a = pd.read_parquet(Path(first.refs.results.path) / "core_metrics.parquet")
    b = pd.read_parquet(Path(second.refs.results.path) / "core_metrics.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert str(tmp_path / "machine-b") in second.refs.train[0].path
    for stage in ("activations", "metrics", "train"):  # downloaded, not recomputed: the same marker bytes
        a_ref, b_ref = getattr(first.refs, stage), getattr(second.refs, stage)
        a_ref, b_ref = (a_ref[0], b_ref[0]) if isinstance(a_ref, list) else (a_ref, b_ref)
        assert (Path(b_ref.path) / COMPLETE_MARKER).read_bytes() == (Path(a_ref.path) / COMPLETE_MARKER).read_bytes()
