"""End-to-end behaviour of the flow on the tiny random model: outputs, caching, bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from flows.pipeline import main, pipeline
from saeflow.artifacts import ArtifactError, ArtifactRef, COMPLETE_MARKER
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
    refs = out.refs
    for stage in STAGES:
        refs_of_stage = getattr(refs, stage)
        for ref in refs_of_stage if isinstance(refs_of_stage, list) else [refs_of_stage]:
            d = Path(ref.path)
            assert (d / COMPLETE_MARKER).is_file(), stage
            assert (d / "config.json").is_file(), stage
    assert len(refs.train) == len(refs.metrics) == 1  # a plain sae: profile is a one-member family
    assert Path(refs.model.path).parent.parent == root
    sae_dir = Path(refs.train[0].path)
    assert (sae_dir / "cfg.json").is_file() and (sae_dir / "sae_weights.safetensors").is_file()
    vocab = pd.read_parquet(Path(refs.vocab.path) / "vocab.parquet")
    assert set(vocab["split"]) == {"train", "test"}
    table = pd.read_parquet(Path(refs.results.path) / "core_metrics.parquet")
    assert len(table) == 1
    for col in ["l0", "explained_variance", "explained_variance_legacy", "mse", "cossim", "ce_loss_score",
                "kl_with_sae", "frac_dead", "frac_dense", "ce_clean", "ce_with_sae", "ce_with_ablation"]:
        assert col in table.columns and np.isfinite(table[col].iloc[0]), col
    assert 0 < table["l0"].iloc[0] <= 8
    assert (Path(refs.results.path) / "core_metrics.md").read_text().count("|") > 10
    metrics_dir = Path(refs.metrics[0].path)
    assert np.load(metrics_dir / "density.npy").shape == (128,)


def test_second_run_reuses_every_stage(first_run):
    root, out = first_run
    again = pipeline(tiny_config(), str(root))
    assert again.cached == {s: True for s in STAGES}
    assert again.refs == out.refs


def test_changing_sae_config_reruns_only_training_onward(first_run):
    root, out = first_run
    again = pipeline(tiny_config(sae__k=4), str(root))
    assert again.cached == {"model": True, "vocab": True, "corpus": True, "activations": True,
                               "train": False, "metrics": False, "results": False}
    assert again.refs.activations == out.refs.activations


def test_changing_layer_reruns_extraction_onward(first_run):
    root, out = first_run
    again = pipeline(tiny_config(activations__hook="blocks.0.hook_resid_post"), str(root))
    assert again.cached["corpus"] and again.cached["vocab"]
    assert not again.cached["activations"] and not again.cached["train"]
    assert again.refs.activations != out.refs.activations


def test_deleted_artifact_is_rebuilt_not_returned_as_a_dangling_path(first_run):
    root, out = first_run
    sae_dir = Path(out.refs.train[0].path)
    shutil.rmtree(sae_dir)
    again = pipeline(tiny_config(), str(root))
    assert not again.cached["train"] and again.cached["activations"]
    assert (sae_dir / COMPLETE_MARKER).is_file()
    assert again.refs == out.refs


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
    from saeflow.saes import load_sae
    from saeflow.store import ActivationStore
    from tasks.metrics import SAEMismatchError, check_sae_fits

    root, out = first_run
    other = pipeline(tiny_config(model={"name": "tiny-random", "tiny_layers": 2, "tiny_d_model": 32, "seed": 0}), str(root))
    sae_dir = Path(other.refs.train[0].path)
    store = ActivationStore.open(out.refs.activations.path)
    with pytest.raises(SAEMismatchError, match="d_in=32"):
        check_sae_fits(load_sae(sae_dir), sae_dir, store)


# ------------------------------------------------------------------ SAE families
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _complete_meta(ref: ArtifactRef) -> tuple[dict, int]:
    p = Path(ref.path) / COMPLETE_MARKER
    return json.loads(p.read_text()), p.stat().st_mtime_ns


def test_family_table_frontier_and_adding_one_member_trains_only_it(first_run):
    import matplotlib.image

    root, single = first_run
    grid = {"widths": [64, 128], "ks": [4, 8]}
    out = pipeline(tiny_config(family=grid), str(root))
    assert all(out.cached[s] for s in ("model", "vocab", "corpus", "activations"))
    assert [m.sae for m in out.members] == ["topk width=64 k=4", "topk width=64 k=8", "topk width=128 k=4",
                                                  "topk width=128 k=8"]
    # the plain `sae: {width: 128, k: 8}` run of first_run is this family's last member: same folder, not retrained
    assert out.refs.train[3] == single.refs.train[0] and not out.members[3].trained
    assert out.members[0].trained and out.members[1].trained
    results = Path(out.refs.results.path)
    table = pd.read_parquet(results / "core_metrics.parquet")
    assert len(table) == 4
    assert list(zip(table["architecture"], table["width"], table["k"])) == [("topk", 64, 4), ("topk", 64, 8),
                                                                           ("topk", 128, 4), ("topk", 128, 8)]
    assert table["coefficient"].isna().all()
    for col in ["l0", "explained_variance", "mse", "cossim", "ce_loss_score", "kl_with_sae", "frac_dead"]:
        assert np.isfinite(table[col]).all(), col
    assert (table["l0"] <= table["k"]).all()
    png = results / "frontier.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    # both members of the family were trained together, in one pass
    meta0, _ = _complete_meta(out.refs.train[0])
    assert meta0["trained_together"] == [out.refs.train[0].fingerprint, out.refs.train[1].fingerprint]

    before = [_complete_meta(r) for r in out.refs.train]
    grown = {"members": [{"width": 64, "k": 4}, {"width": 64, "k": 8}, {"width": 128, "k": 4}, {"width": 128, "k": 8},
                         {"width": 64, "k": 2}]}
    again = pipeline(tiny_config(family=grown), str(root))
    assert again.refs.train[:4] == out.refs.train  # an explicit list names the same SAEs as the grid
    assert [m.trained for m in again.members] == [False, False, False, False, True]
    assert [m.metrics_cached for m in again.members] == [True, True, True, True, False]
    assert [_complete_meta(r) for r in again.refs.train[:4]] == before  # untouched, not retrained
    new_meta, _ = _complete_meta(again.refs.train[4])
    assert new_meta["trained_together"] == [again.refs.train[4].fingerprint]
    assert not again.cached["train"] and not again.cached["results"]
    assert len(pd.read_parquet(Path(again.refs.results.path) / "core_metrics.parquet")) == 5
    # the same family once more: every stage cached
    third = pipeline(tiny_config(family=grown), str(root))
    assert all(third.cached.values()) and not any(m.trained for m in third.members)


def test_mixed_family_table_has_a_coefficient_column(first_run):
    root, _ = first_run
    fam = {"architectures": ["relu", "batchtopk"], "widths": [64], "ks": [4], "l1_coefficients": [0.5]}
    out = pipeline(tiny_config(family=fam), str(root))
    table = pd.read_parquet(Path(out.refs.results.path) / "core_metrics.parquet")
    assert list(table["architecture"]) == ["relu", "batchtopk"]
    assert pd.isna(table["k"].iloc[0]) and table["k"].iloc[1] == 4
    assert table["coefficient"].iloc[0] == 0.5 and pd.isna(table["coefficient"].iloc[1])


@pytest.mark.parametrize("family,message", [
    ({"architectures": ["gated"]}, r"unknown SAE architecture 'gated'"),
    ({"widths": [64, 128], "ks": [100]}, r"family member 'topk width=64 k=100' is invalid: k=100 exceeds width=64"),
    ({"architectures": ["relu"], "l1_coefficients": [0.1, -0.5]}, r"family.l1_coefficients: -0.5 is not a non-negative"),
    ({"architectures": ["jumprelu"], "l0_coefficients": [-1.0]}, r"family.l0_coefficients: -1.0 is not a non-negative"),
    ({"widths": [64, 64], "ks": [4]}, r"duplicate members: #1 and #2 are both 'topk width=64 k=4'"),
    ({"members": [{"width": 64, "k": 4}, {"width": 64, "k": 4}]}, r"duplicate members: #1 and #2"),
    ({"members": [{"width": 64, "k": 400}]}, r"k=400 exceeds width=64"),
])
def test_bad_family_is_refused_before_anything_runs(tmp_path, family, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(family=family)
    data = tiny_config().model_dump(mode="json")
    del data["sae"]
    data["family"] = family
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_config(p)
    assert main(["--config", str(p), "--artifacts", str(tmp_path / "artifacts")]) == 2
    assert not (tmp_path / "artifacts").exists()


def test_sae_and_family_together_is_refused(tmp_path):
    data = tiny_config().model_dump(mode="json")
    data["family"] = {"widths": [64], "ks": [4]}
    p = tmp_path / "both.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="set either sae .* or family .*, not both"):
        load_config(p)


def test_saelens_format_saes_are_imported_into_the_evaluations(first_run, tmp_path):
    """A folder written by SAELens' own save code is evaluated beside the family (one more row)."""
    sae_lens = pytest.importorskip("sae_lens")
    import torch
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    root, out = first_run
    sl = StandardSAE(StandardSAEConfig(d_in=64, d_sae=96, dtype="float32", device="cpu"))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in sl.parameters():
            p.normal_(0, 0.1)
    folder = tmp_path / "external-sae"
    sl.save_model(str(folder))
    cfg = tiny_config(import_saes=[str(folder)])
    res = pipeline(cfg, str(root))
    assert len(res.refs.imported) == 1 and len(res.refs.metrics) == 2
    table = pd.read_parquet(Path(res.refs.results.path) / "core_metrics.parquet")
    assert len(table) == 2
    row = table[table["width"] == 96].iloc[0]
    assert row["architecture"] == "standard" and np.isfinite(row["explained_variance"])
    again = pipeline(cfg, str(root))
    assert again.cached["imported"] and again.cached["metrics"]


def test_import_of_a_folder_that_is_not_an_sae_is_a_clear_error(first_run, tmp_path):
    root, _ = first_run
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="not an SAE folder"):
        pipeline(tiny_config(import_saes=[str(tmp_path / "empty")]), str(root))


# ------------------------------------------------------------------ the stage graph of docs/architecture.png
def test_stage_graph_lists_the_stages_the_pipeline_reports(first_run):
    """flows/graph.py STAGES (drawn into docs/architecture.png) names the stages a run reports, in
    the order it runs them, and its evaluations are the pipeline's."""
    from flows.graph import EVALUATION_STAGES, STAGES
    from flows.pipeline import EVALUATIONS

    _, out = first_run
    names = [s.name for s in STAGES]
    assert list(out.cached) == [n for n in names if n in out.cached]  # every reported stage, in graph order
    assert set(names) - set(out.cached) == {"imported", "browser", "site", "report", *EVALUATION_STAGES}  # not run by the tiny profile
    assert out.report.name == "report.html" and out.report.parent == out.refs.results.dir
    assert EVALUATION_STAGES == tuple(name for name, _ in EVALUATIONS)
    stage_of_timing = {t.split("-")[0] for t in out.timings} - {"total"}
    assert stage_of_timing <= set(names)


def test_each_stage_records_its_peak_memory(first_run):
    """With the local runner every stage records the process's peak resident memory while it ran
    (the kernel's high-water mark, reset before the stage; Linux): positive, below the machine's
    memory, and each stage's own (not one lifetime peak repeated)."""
    import sys

    _, out = first_run
    stages = {k: t for k, t in out.timings.items() if k != "total"}
    assert out.timings["total"].peak_rss_mib is None
    if not sys.platform.startswith("linux"):
        pytest.skip("the per-stage high-water mark is read from /proc (Linux)")
    total_mib = int(Path("/proc/meminfo").read_text().split()[1]) / 1024
    for name, t in stages.items():
        assert t.peak_rss_mib is not None and 0 < t.peak_rss_mib < total_mib, (name, t)
    assert len({t.peak_rss_mib for t in stages.values()}) > 1, stages


def test_stage_graph_edges_are_the_artifacts_each_stage_reads():
    """A stage's upstream edges are the artifacts its ``ref`` function takes (its cache inputs)."""
    import inspect

    from flows.graph import BY_NAME, EVALUATION_STAGES
    from tasks import activations, browser, corpus, imported, metrics, model, tables, train, vocab

    saes = {"train", "imported"}
    param_stage = {"model": {"model"}, "vocab": {"vocab"}, "corpus": {"corpus"}, "acts": {"activations"},
                   "sae": saes, "saes": saes, "metrics": {"metrics"}, "evals": set(EVALUATION_STAGES)}
    refs = {"model": model.ref, "vocab": vocab.ref, "corpus": corpus.ref, "activations": activations.ref,
            "train": train.family_refs, "imported": imported.ref, "metrics": metrics.ref, "results": tables.ref,
            "browser": browser.ref}
    for stage, ref_fn in refs.items():
        reads = set().union(*(param_stage.get(p, set()) for p in inspect.signature(ref_fn).parameters))
        assert set(BY_NAME[stage].upstream) == reads, stage
