"""End-to-end: the CI smoke profile on a real packaged model (SmolLM2-135M-Instruct), with every
evaluation, fully cached on a re-run; then the same profile on prefect-dask's ``DaskTaskRunner``
(2-worker ``LocalCluster``, upstream stages seeded from the first run) gives the same results table.

Beside the trained family, one published-layout SAE is imported from a hub-shaped server on
127.0.0.1 (tests/hub_server.py): Gemma Scope 2's file layout (``params.safetensors``, JumpReLU,
``apply_b_dec_to_input=false``) read by SAELens' own ``gemma_3`` converter, random weights at the
model's layer 3 (issue #27), and every evaluation runs on it."""

import base64
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.pipeline import pipeline, run_pipeline
from hub_server import HubServer, using_hub, write_gemma_scope_folder
from saeflow.config import ImportSAE, RunnerConfig, load_config
from saeflow.report import PNG_MAGIC

REPO = Path(__file__).resolve().parent.parent
HUB_REPO, HUB_FOLDER = "saeflow-test/gemma-scope-2-smollm2-135m", "resid_post_all/layer_3_width_1k_l0_small"
PUBLISHED = ImportSAE(release=HUB_REPO, id=HUB_FOLDER, loader="gemma_3", name="gemma-scope-2-layout L3 1k (random)")


def check_browser(out) -> None:
    """The latent browser: pages for every SAE, linked from the report, and a latent's top contexts
    are the true top activations of a brute-force encode of the whole store."""
    import torch

    from saeflow.browser import DATA_FILE
    from saeflow.saes import load_sae
    from saeflow.store import ActivationStore
    from tasks.browser import site_key

    site = out.refs.results.dir / "browser"
    assert (site / "index.html").is_file() and len(out.refs.browser) == len(out.refs.saes) == 5
    for i, sae_ref in enumerate(out.refs.saes):
        pages = site / site_key(i, sae_ref)
        assert (pages / "index.html").is_file() and (pages / "latent.html").is_file() and (pages / "data" / "0.js").is_file()
    assert "href='browser/index.html'" in Path(out.report).read_text()
    assert f">{PUBLISHED.name} (jumprelu, 1,024 latents)<" in (site / "index.html").read_text()  # named by its source
    store = ActivationStore.open(out.refs.activations.dir)
    sae = load_sae(out.refs.saes[3].dir)
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(store.read(0, store.n_rows))).numpy()
    data = np.load(out.refs.browser[3].dir / DATA_FILE)
    assert int(data["rows_scanned"]) == store.n_rows
    np.testing.assert_array_equal(data["count"], (f > 0).sum(0))
    n = data["top_row"].shape[1]
    for j in range(f.shape[1]):  # the chosen rows hold the true top activations, in order (rows may differ on exact ties)
        order = np.lexsort((np.arange(f.shape[0]), -f[:, j]))[:n]
        order = order[f[order, j] > 0]
        rows = data["top_row"][j]
        assert (rows[order.size:] == -1).all() and len(set(rows[:order.size].tolist())) == order.size, j
        np.testing.assert_allclose(f[rows[:order.size], j], f[order, j], rtol=1e-5)
        np.testing.assert_allclose(data["top_act"][j][:order.size], f[order, j], rtol=1e-4)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The loopback hub: a Gemma Scope 2-layout repo for SmolLM2's layer 3 (d_in 576, 1,024 latents;
    thresholds sized for its activations, norm ~86, so a few percent of latents fire)."""
    root = tmp_path_factory.mktemp("hub")
    write_gemma_scope_folder(root / HUB_REPO / HUB_FOLDER, d_in=576, d_sae=1024, seed=0, threshold_range=(4.0, 8.0),
                             config={"architecture": "jump_relu", "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    server = HubServer(root).start()
    with using_hub(server.endpoint, tmp_path_factory.mktemp("hf-cache")):
        yield server
    server.stop()


@pytest.mark.slow
def test_smoke_profile_end_to_end_then_fully_cached(tmp_path, hub):
    cfg = load_config(REPO / "configs" / "smoke.yaml").model_copy(update={"import_saes": (PUBLISHED,)})
    out = pipeline(cfg, str(tmp_path))
    results = Path(out.refs.results.path)
    full = pd.read_parquet(results / "core_metrics.parquet")
    print(out.timings)
    # the published SAE: imported through SAELens from the loopback hub, evaluated by every evaluation
    assert len(full) == 5 and full["published"].tolist() == [False] * 4 + [True] and len(out.refs.imported) == 1
    pub = full.iloc[4]
    assert pub["sae"] == PUBLISHED.name and pub["architecture"] == "jumprelu" and pub["width"] == 1024
    assert 0 < pub["l0"] < 1024 and np.isfinite(pub["explained_variance"]) and np.isfinite(pub["ce_loss_score"])
    assert 0 <= pub["absorption_mean_fraction"] <= 1 and 0 < pub["meta_sae_fve"] <= 1
    assert np.isfinite(pub["probing_normal_auc"])
    for name in ("absorption", "meta_sae", "probing"):
        assert out.refs.evals[name].per_sae[4] is not None, name
    table = full.iloc[:4]
    assert len(table) == 4 and len(out.refs.train) == 4 and all(m.trained for m in out.members)
    assert list(zip(table["width"], table["k"])) == [(576, 8), (576, 16), (1152, 8), (1152, 16)]
    assert (table["model"] == "smollm2-135m-instruct").all() and (table["hook"] == "blocks.3.hook_resid_post").all()
    assert ((table["l0"] > 0) & (table["l0"] <= table["k"])).all()
    # trained SAEs on real activations: better than nothing, worse than perfect
    assert ((table["explained_variance"] > 0.0) & (table["explained_variance"] < 1.0)).all()
    assert ((table["cossim"] > 0.0) & (table["cossim"] <= 1.0)).all()
    assert (table["ce_clean"] < table["ce_with_ablation"]).all()
    assert np.isfinite(table["ce_loss_score"]).all() and np.isfinite(table["kl_with_sae"]).all()
    # more latents or a larger k reconstruct better (same data, same budget)
    ev = {(w, k): e for w, k, e in zip(table["width"], table["k"], table["explained_variance"])}
    assert ev[(1152, 16)] > ev[(576, 8)]
    assert (results / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every evaluation the smoke profile enables ran on the family and reached the results
    for name in ("absorption", "stitching", "meta_sae", "probing"):
        if getattr(cfg, name) is None:
            continue
        assert out.refs.evals[name].results is not None, name
        files = sorted(p.name for p in (results / name).iterdir())
        assert any(f.endswith(".parquet") for f in files) and any(f.endswith(".png") for f in files), (name, files)
    assert table["absorption_mean_fraction"].between(0, 1).all()
    assert ((table["meta_sae_fve"] > 0) & (table["meta_sae_fve"] <= 1)).all()
    larger = table[table["width"] == 1152]
    assert larger["stitching_novel_fraction"].between(0, 1).all() and larger["stitching_proxy_auc"].notna().all()
    check_browser(out)
    again = pipeline(cfg, str(tmp_path))
    assert all(again.cached.values()), again.cached
    assert not any(m.trained for m in again.members)

    # the same profile on a 2-worker Dask LocalCluster, in a fresh root seeded with this run's model,
    # vocabulary, corpus and activation store (extraction is one task on the cluster like training;
    # redoing it would cost CI minutes): the family, metrics, every evaluation and the browser computed
    # on the cluster (family members and per-SAE evaluations submitted together), same fingerprints, same table
    upstream = ("model", "vocab", "corpus", "activations")
    for name in upstream:
        shutil.copytree(tmp_path / name, tmp_path / "dask" / name)
    dask = run_pipeline(cfg.model_copy(update={"runner": RunnerConfig(kind="dask", n_workers=2)}), str(tmp_path / "dask"))
    assert all(dask.cached[n] for n in upstream), dask.cached
    assert not any(hit for n, hit in dask.cached.items() if n not in upstream), dask.cached

    def fps(ref):
        # every reference reduced to its fingerprint: the two runs write under different roots
        if isinstance(ref, dict):
            return ref["fingerprint"] if "fingerprint" in ref else {k: fps(v) for k, v in ref.items()}
        if isinstance(ref, (list, tuple)):
            return [fps(r) for r in ref]
        return ref

    assert fps(dask.refs.model_dump()) == fps(out.refs.model_dump())

    other = pd.read_parquet(Path(dask.refs.results.path) / "core_metrics.parquet")
    assert list(other.columns) == list(full.columns) and len(other) == len(full)
    # wall times (``*_time_s``) are measurements of the run, not results: positive on both runners
    timing = [c for c in full.columns if c.endswith("_time_s")]
    assert all((full[c] > 0).all() and (other[c] > 0).all() for c in timing), timing
    num = [c for c in full.columns if pd.api.types.is_numeric_dtype(full[c])]
    pd.testing.assert_frame_equal(full.drop(columns=num), other.drop(columns=num))
    for c in (c for c in num if c not in timing):
        x, y = full[c].astype(float).to_numpy(), other[c].astype(float).to_numpy()
        assert np.allclose(x, y, rtol=1e-4, atol=1e-6, equal_nan=True), (c, x, y)
    for name in ("absorption", "stitching", "meta_sae", "probing"):
        assert sorted(p.name for p in (Path(dask.refs.results.path) / name).iterdir()) == \
            sorted(p.name for p in (results / name).iterdir()), name
    html = Path(dask.report).read_text()
    src = html.split("src='data:image/png;base64,", 1)[1].split("'", 1)[0]
    assert base64.b64decode(src).startswith(PNG_MAGIC)
