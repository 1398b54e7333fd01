"""End-to-end behaviour of the flow on the tiny random model: outputs, caching, bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.pipeline import main, pipeline
from saeflow.artifacts import ArtifactError, COMPLETE_MARKER
from saeflow.config import ConfigError, load_config
from tests.helpers import tiny_config, write_config

STAGES = ["model", "vocab", "corpus", "activations", "train", "metrics", "results"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    out = pipeline(tiny_config(), str(root))
    return root, out


def test_every_stage_writes_its_artifact(first_run):
    root, out = first_run
    refs = out["refs"]
    for stage in STAGES:
        d = Path(refs[stage]["path"])
        assert (d / COMPLETE_MARKER).is_file(), stage
        assert (d / "config.json").is_file(), stage
    assert Path(refs["model"]["path"]).parent.parent == root
    sae_dir = Path(refs["train"]["path"])
    assert (sae_dir / "cfg.json").is_file() and (sae_dir / "sae_weights.safetensors").is_file()
    vocab = pd.read_parquet(Path(refs["vocab"]["path"]) / "vocab.parquet")
    assert set(vocab["split"]) == {"train", "test"}
    table = pd.read_parquet(Path(refs["results"]["path"]) / "core_metrics.parquet")
    assert len(table) == 1
    for col in ["l0", "explained_variance", "explained_variance_legacy", "mse", "cossim", "ce_loss_score",
                "kl_with_sae", "frac_dead", "frac_dense", "ce_clean", "ce_with_sae", "ce_with_ablation"]:
        assert col in table.columns and np.isfinite(table[col].iloc[0]), col
    assert 0 < table["l0"].iloc[0] <= 8
    assert (Path(refs["results"]["path"]) / "core_metrics.md").read_text().count("|") > 10
    metrics_dir = Path(refs["metrics"]["path"])
    assert np.load(metrics_dir / "density.npy").shape == (128,)


def test_second_run_reuses_every_stage(first_run):
    root, out = first_run
    again = pipeline(tiny_config(), str(root))
    assert again["cached"] == {s: True for s in STAGES}
    assert again["refs"] == out["refs"]


def test_changing_sae_config_reruns_only_training_onward(first_run):
    root, out = first_run
    again = pipeline(tiny_config(sae__k=4), str(root))
    assert again["cached"] == {"model": True, "vocab": True, "corpus": True, "activations": True,
                               "train": False, "metrics": False, "results": False}
    assert again["refs"]["activations"] == out["refs"]["activations"]


def test_changing_layer_reruns_extraction_onward(first_run):
    root, out = first_run
    again = pipeline(tiny_config(activations__hook="blocks.0.hook_resid_post"), str(root))
    assert again["cached"]["corpus"] and again["cached"]["vocab"]
    assert not again["cached"]["activations"] and not again["cached"]["train"]
    assert again["refs"]["activations"] != out["refs"]["activations"]


def test_deleted_artifact_is_rebuilt_not_returned_as_a_dangling_path(first_run):
    root, out = first_run
    sae_dir = Path(out["refs"]["train"]["path"])
    shutil.rmtree(sae_dir)
    again = pipeline(tiny_config(), str(root))
    assert not again["cached"]["train"] and again["cached"]["activations"]
    assert (sae_dir / COMPLETE_MARKER).is_file()
    assert again["refs"] == out["refs"]


# ------------------------------------------------------------------ bad input
def test_unknown_model_is_a_clear_error(tmp_path):
    from saeflow.models import ModelError

    with pytest.raises(ModelError, match="smollm2-135m-instruct"):
        pipeline(tiny_config(model={"name": "no-such-model-xyz"}), str(tmp_path))


def test_layer_out_of_range_fails_before_extraction(first_run, tmp_path):
    root, _ = first_run
    with pytest.raises(ValueError, match="out of range"):
        pipeline(tiny_config(activations__hook="blocks.7.hook_resid_post"), str(root))
    with pytest.raises(ValueError, match="hook"):
        pipeline(tiny_config(activations__hook="blocks.1.hook_nonsense"), str(root))


def test_wrong_config_type_names_the_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nsae:\n  width: lots\n")
    with pytest.raises(ConfigError, match=r"sae\.width"):
        load_config(p)
    assert main(["--config", str(p)]) == 2
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_k_larger_than_width_is_refused():
    with pytest.raises(ValueError, match="k=300 exceeds width=128"):
        tiny_config(sae__k=300)


def test_unwritable_artifacts_root(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ArtifactError, match="not writable"):
        pipeline(tiny_config(), str(blocker / "artifacts"))


def test_failed_run_leaves_finished_artifacts_untouched(first_run):
    root, out = first_run
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and ".prefect" not in p.parts}
    with pytest.raises(ValueError):
        pipeline(tiny_config(activations__hook="blocks.9.hook_resid_post"), str(root))
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and ".prefect" not in p.parts}
    assert {p: t for p, t in after.items() if p in before} == before


def test_sae_from_another_width_is_refused(first_run, tmp_path):
    from saeflow.sae import load_sae
    from saeflow.store import ActivationStore
    from tasks.metrics import SAEMismatchError, check_sae_fits

    root, out = first_run
    other = pipeline(tiny_config(model={"name": "tiny-random", "tiny_layers": 2, "tiny_d_model": 32, "seed": 0}), str(root))
    sae_dir = Path(other["refs"]["train"]["path"])
    store = ActivationStore.open(out["refs"]["activations"]["path"])
    with pytest.raises(SAEMismatchError, match="d_in=32"):
        check_sae_fits(load_sae(sae_dir), sae_dir, store)
