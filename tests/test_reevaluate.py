"""``reevaluate`` evaluates exactly the SAEs lacking current results (tiny random model, real
Prefect flows, no mocks): adding one SAE (a ``train-family`` run, or a SAELens folder dropped in)
triggers one evaluation; a changed evaluation config or evaluation code re-evaluates every SAE; bad
drops are skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from flows.extract import extract
from flows.pipeline import pipeline
from flows.reevaluate import reevaluate
from flows.train_family import train_family
from saeflow.saes import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from tasks import common
from tests.helpers import tiny_config, write_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _fps(items: list[dict]) -> list[str]:
    return sorted(i["fingerprint"] for i in items)


def test_reevaluate_evaluates_only_saes_lacking_results(tmp_path):
    root = str(tmp_path / "artifacts")
    profile = str(write_config(tiny_config(), tmp_path / "tiny.yaml"))
    first = pipeline(tiny_config(), root)
    family_fp = first.refs.train[0].fingerprint

    # nothing new: nothing evaluated
    out = reevaluate(profile, root)
    assert out["evaluated"] == [] and _fps(out["up_to_date"]) == [family_fp]

    # a new SAE of ours (trained, never evaluated) -> exactly that one is evaluated
    tf = train_family(profile, root, overrides={"sae": {"k": 4}})
    new_fp = tf["refs"]["train"][0]["fingerprint"]
    assert tf["members"][0]["trained"] and new_fp != family_fp
    out = reevaluate(profile, root)
    assert _fps(out["evaluated"]) == [new_fp] and out["evaluated"][0]["source"] == "trained"
    assert _fps(out["up_to_date"]) == [family_fp]

    # a SAELens-format SAE dropped into the watched folder -> exactly that one is evaluated;
    # a folder for another hook and a half-copied one are skipped with their reason
    incoming = tmp_path / "incoming"
    src = Path(first.refs.train[0].path)
    good, other_hook, half = incoming / "good", incoming / "other_hook", incoming / "half"
    for d in (good, other_hook, half):
        d.mkdir(parents=True)
    weights = load_file(src / SAE_WEIGHTS_FILENAME)
    save_file({k: (v * 1.05 if k == "W_dec" else v).contiguous() for k, v in weights.items()}, good / SAE_WEIGHTS_FILENAME)
    shutil.copy2(src / SAE_CFG_FILENAME, good / SAE_CFG_FILENAME)
    shutil.copy2(src / SAE_WEIGHTS_FILENAME, other_hook / SAE_WEIGHTS_FILENAME)
    cfg = json.loads((src / SAE_CFG_FILENAME).read_text())
    cfg.setdefault("metadata", {})["hook_name"] = "blocks.0.hook_resid_post"
    (other_hook / SAE_CFG_FILENAME).write_text(json.dumps(cfg))
    shutil.copy2(src / SAE_CFG_FILENAME, half / SAE_CFG_FILENAME)
    out = reevaluate(profile, root, sae_folder=str(incoming))
    assert len(out["evaluated"]) == 1 and out["evaluated"][0]["source"] == f"dropped: {good.resolve()}"
    assert _fps(out["up_to_date"]) == sorted([family_fp, new_fp])
    reasons = {Path(s["sae"]).name: s["reason"] for s in out["skipped"]}
    assert "blocks.0.hook_resid_post" in reasons["other_hook"] and "SAELens layout" in reasons["half"]
    dropped_fp = out["evaluated"][0]["fingerprint"]

    # run again: everything current, nothing evaluated; the table holds all three SAEs
    out = reevaluate(profile, root, sae_folder=str(incoming))
    assert out["evaluated"] == [] and len(out["up_to_date"]) == 3
    table = pd.read_parquet(Path(out["results"]) / "core_metrics.parquet")
    assert sorted(table["sae_fingerprint"]) == sorted([family_fp, new_fp, dropped_fp])
    assert sorted(table["k"]) == [4, 8, 8] and Path(out["report"]).is_file()

    # a changed evaluation config (core metrics) is not current for any SAE: all re-evaluated
    out = reevaluate(profile, root, sae_folder=str(incoming), overrides={"metrics": {"n_variance_tokens": 256}})
    assert len(out["evaluated"]) == 3 and out["up_to_date"] == []
    assert torch.isfinite(torch.tensor(pd.read_parquet(Path(out["results"]) / "core_metrics.parquet")["l0"].to_numpy())).all()


def test_changed_evaluation_code_reevaluates_every_sae_and_keeps_old_results(tmp_path, monkeypatch):
    root = str(tmp_path / "artifacts")
    profile = str(write_config(tiny_config(), tmp_path / "tiny.yaml"))
    first = pipeline(tiny_config(), root)
    train_family(profile, root, overrides={"sae": {"k": 4}})
    assert len(reevaluate(profile, root)["evaluated"]) == 1
    old_metrics = sorted(p.name for p in (Path(root) / "metrics").iterdir())
    before = pd.read_parquet(Path(first.refs.results.path) / "core_metrics.parquet")

    # a new version of the core-metrics code (its module's text changes; simulated by reading it
    # with one appended line, as after an upgrade) -> both SAEs are no longer current
    source, version = common._source, common.code_version("saeflow.metrics", "tasks.metrics")
    other = common.code_version("saeflow.evals.probing")
    monkeypatch.setattr(common, "_source",
                        lambda part: source(part) + "\n# edited\n" if part == "saeflow.metrics" else source(part))
    assert common.code_version("saeflow.metrics", "tasks.metrics") != version
    assert common.code_version("saeflow.evals.probing") == other
    out = reevaluate(profile, root)
    assert len(out["evaluated"]) == 2 and out["up_to_date"] == []
    new_metrics = sorted(p.name for p in (Path(root) / "metrics").iterdir())
    assert set(old_metrics) < set(new_metrics) and len(new_metrics) == 2 * len(old_metrics)  # old folders kept
    after = pd.read_parquet(Path(out["results"]) / "core_metrics.parquet")
    row = after[after["sae_fingerprint"] == before["sae_fingerprint"].iloc[0]]
    assert row["explained_variance"].iloc[0] == pytest.approx(before["explained_variance"].iloc[0], rel=1e-6)  # same maths
    assert reevaluate(profile, root)["evaluated"] == []  # and now current again


def test_sae_of_other_activations_is_skipped_not_evaluated(tmp_path):
    root = str(tmp_path / "artifacts")
    profile = str(write_config(tiny_config(), tmp_path / "tiny.yaml"))
    over = {"activations": {"hook": "blocks.0.hook_resid_post"}}
    ex = extract(profile, root, overrides=over)  # the extract deployment's flow, then train-family reuses it
    assert set(ex["refs"]) == {"model", "corpus", "activations"} and not any(ex["cached"].values())
    other = train_family(profile, root, overrides=over)
    assert other["cached"] == {"model": True, "corpus": True, "activations": True, "train": False}
    assert other["refs"]["activations"] == ex["refs"]["activations"]
    out = reevaluate(profile, root)
    skipped = {Path(s["sae"]).name: s["reason"] for s in out["skipped"]}
    assert other["refs"]["train"][0]["fingerprint"] in skipped
    assert "other activations" in skipped[other["refs"]["train"][0]["fingerprint"]]
    assert [i["source"] for i in out["evaluated"]] == ["family"]  # the profile's own SAE: new, so evaluated
