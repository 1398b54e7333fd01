"""The latent browser (saeflow/browser, tasks/browser.py): the streaming pass equals a brute-force
encode of the whole store, its memory does not grow with the store, the site's pages work in
headless Chromium, and bad input is refused with a clear error."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from saeflow.artifacts import artifact_ref, mark_complete
from saeflow.browser import BrowserInputError, FactSources, SiteSAE, RunningTop, context_windows, join, logit_effects
from saeflow.browser import lower_quantile_rows, save_browser_data, scan, write_site
from saeflow.browser.facts import meta_sae_facts, stitching_facts
from saeflow.config import BrowserConfig
from saeflow.saes import build_sae
from saeflow.saes.config import SAEConfig
from saeflow.store import ActivationStore

REPO = Path(__file__).resolve().parent.parent
CTX = 16  # rows per context of the synthetic stores


def synthetic_store(root: Path, n_rows: int, d: int, chunk: int = 256, seed: int = 0, hook: str = "blocks.0.hook_resid_post",
                    planted: dict[int, tuple[np.ndarray, list[int]]] | None = None) -> ActivationStore:
    """Gaussian rows in contexts of ``CTX`` rows; ``planted[latent] = (direction, rows)`` adds a large
    multiple of ``direction`` to those rows (so they are that latent's top activations)."""
    rng = np.random.default_rng(seed)
    store = ActivationStore.open_for_write(root, d, chunk, "float32", {"hook": hook})
    for s in range(0, n_rows, chunk):
        e = min(n_rows, s + chunk)
        x = rng.normal(size=(e - s, d)).astype(np.float32)
        for direction, rows in (planted or {}).values():
            for k, r in enumerate(rows):
                if s <= r < e:
                    x[r - s] += (20.0 + 15.0 * k) * direction
        idx = np.arange(s, e)
        store.append(x, rng.integers(0, 50, size=e - s), idx % CTX, idx // CTX, contexts_done=e // CTX)
    store.finish(train_rows=n_rows)
    return ActivationStore.open(root)


def make_sae(d: int, width: int, k: int = 8, seed: int = 0):
    sae = build_sae(SAEConfig(architecture="topk", width=width, k=k), d, seed)
    sae.eval()
    return sae


def brute_force(sae, store: ActivationStore, n_top: int):
    """Full encode of the store, then per latent the top-n by (value desc, row asc)."""
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(store.read(0, store.n_rows))).numpy()
    vals, rows = [], []
    for j in range(f.shape[1]):
        col = f[:, j]
        order = np.lexsort((np.arange(col.size), -col))
        order = order[col[order] > 0][:n_top]
        vals.append(np.pad(col[order], (0, n_top - order.size), constant_values=np.nan))
        rows.append(np.pad(order, (0, n_top - order.size), constant_values=-1))
    return f, np.array(vals), np.array(rows)


def test_running_top_keeps_the_n_largest_per_group_earliest_on_ties():
    top = RunningTop(3, 2, {"row": torch.int64})
    top.add(torch.tensor([0, 0, 1, 2]), torch.tensor([1.0, 5.0, 2.0, 3.0]), row=torch.tensor([0, 1, 2, 3]))
    top.add(torch.tensor([0, 0, 2, 2]), torch.tensor([5.0, 4.0, 3.0, 9.0]), row=torch.tensor([4, 5, 6, 7]))
    assert top.keys.tolist() == [[5.0, 5.0], [2.0, -float("inf")], [9.0, 3.0]]
    assert top.payload["row"][:, :].tolist()[0] == [1, 4] and top.payload["row"][2].tolist() == [7, 3]
    with pytest.raises(BrowserInputError, match="n_top >= 1"):
        RunningTop(3, 0, {})


def test_scan_equals_brute_force_and_does_not_depend_on_the_batch_size(tmp_path):
    d, width, n_top = 24, 96, 5
    sae = make_sae(d, width)
    w = sae.W_enc.detach().numpy()
    planted = {j: (w[:, j] / np.linalg.norm(w[:, j]), rows) for j, rows in
               {3: [7, 300, 901], 40: [5, 6, 1100], 77: list(range(600, 610))}.items()}
    store = synthetic_store(tmp_path / "s", 1200, d, planted=planted)
    f, vals, rows = brute_force(sae, store, n_top)
    a = scan(sae, store, n_top, n_sample=6, batch_size=97, hist_bins=16)
    b = scan(sae, store, n_top, n_sample=6, batch_size=1000, hist_bins=16)
    for s in (a, b):
        np.testing.assert_array_equal(s.top_row, rows)
        np.testing.assert_allclose(s.top_act, vals, rtol=1e-5)
        np.testing.assert_array_equal(s.count, (f > 0).sum(0))
        np.testing.assert_allclose(s.max, f.max(0), rtol=1e-5)
        np.testing.assert_allclose(s.mean, np.where((f > 0).sum(0) > 0, f.sum(0) / np.maximum((f > 0).sum(0), 1), 0),
                                   rtol=1e-4)
        assert (s.hist.sum(1) == s.count).all()
    np.testing.assert_array_equal(a.sample_row, b.sample_row)  # the reservoir is seeded per entry, not per batch
    # the planted rows are their latents' top contexts, strongest plant first
    assert rows[3][:3].tolist() == [901, 300, 7] and rows[40][:3].tolist() == [1100, 6, 5]
    assert set(rows[77][:5].tolist()) <= set(range(600, 610))
    # the lower-quantile samples are firing rows of that latent, not among its top rows
    q_rows, q_acts = lower_quantile_rows(a, 3)
    for j in range(width):
        for r, v in zip(q_rows[j], q_acts[j]):
            if r >= 0:
                assert f[r, j] > 0 and r not in rows[j] and v == pytest.approx(f[r, j], rel=1e-5)
    assert ((q_rows >= 0).sum(1) > 0).sum() > width // 2
    # max_rows limits the scan to the first rows
    part = scan(sae, store, n_top, max_rows=500, batch_size=128)
    assert part.rows_scanned == 500 and part.top_row.max() < 500
    np.testing.assert_array_equal(part.count, (f[:500] > 0).sum(0))


def test_windows_are_the_context_tokens_with_the_latents_activations(tmp_path):
    d, width = 16, 32
    sae = make_sae(d, width, k=4)
    store = synthetic_store(tmp_path / "s", 640, d, chunk=128)
    f, _, top_rows = brute_force(sae, store, 3)
    tokens, context = store.read_rows("token_ids", 0, 640), store.read_rows("context", 0, 640)
    win = context_windows(sae, store, top_rows, left=5, right=2, batch_size=50)
    assert win.token.shape == (width, 3, 8) and win.center == 5
    for j in range(width):
        for s, r in enumerate(top_rows[j]):
            if r < 0:
                assert (win.token[j, s] == -1).all()
                continue
            for o in range(-5, 3):
                rr = r + o
                inside = 0 <= rr < 640 and context[rr] == context[r]
                assert win.token[j, s, 5 + o] == (tokens[rr] if inside else -1)
                assert win.act[j, s, 5 + o] == pytest.approx(f[rr, j] if inside else 0.0, rel=1e-5, abs=1e-6)


def test_logit_effects_in_blocks_equal_the_full_product():
    g = torch.Generator().manual_seed(0)
    W_dec, W_U = torch.randn(70, 12, generator=g), torch.randn(12, 300, generator=g)
    top_ids, top_vals, bot_ids, bot_vals = logit_effects(W_dec, W_U, 4, block=16)
    full = (W_dec @ W_U).numpy()
    # the bfloat16 shortlist + float32 re-rank gives the float32 top / bottom sets; within a set the order
    # may differ only where two values tie to float32 summation-order noise
    for ids, vals, order in ((top_ids, top_vals, np.argsort(-full, axis=1)[:, :4]),
                             (bot_ids, bot_vals, np.argsort(full, axis=1)[:, :4])):
        assert [set(r) for r in ids] == [set(r) for r in order]
        np.testing.assert_allclose(vals, np.take_along_axis(full, order, 1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(vals, np.take_along_axis(full, ids, 1), rtol=1e-5, atol=1e-6)


def test_bad_input_is_a_clear_error(tmp_path):
    from pydantic import ValidationError

    from saeflow.config import ConfigError, validate_profile
    from saeflow.saes.saelens_format import save_sae
    from tasks.browser import check_sae_on_store

    with pytest.raises(ValidationError, match="n_top"):
        BrowserConfig(n_top=0)
    with pytest.raises(ConfigError, match=r"browser.n_top: Input should be greater than or equal to 1"):
        validate_profile({"browser": {"n_top": -3}}, "p.yaml")
    acts = artifact_ref(tmp_path, "activations", "a")
    store = synthetic_store(acts.dir, 256, 16, chunk=64, hook="blocks.1.hook_resid_post")
    mark_complete(acts)
    sae = make_sae(16, 32)
    with pytest.raises(BrowserInputError, match="n_top >= 1"):
        scan(sae, store, 0)
    ref = artifact_ref(tmp_path, "train", "s")
    save_sae(sae, ref.dir, {"hook_name": "blocks.0.hook_resid_post"})
    mark_complete(ref)
    with pytest.raises(BrowserInputError, match="latent browser: .*trained on hook blocks.0.hook_resid_post but the "
                                                "activations are from blocks.1.hook_resid_post"):
        check_sae_on_store(acts, ref, "cpu")
    wide = artifact_ref(tmp_path, "train", "w")
    save_sae(make_sae(24, 32), wide.dir, {"hook_name": "blocks.1.hook_resid_post"})
    mark_complete(wide)
    with pytest.raises(BrowserInputError, match="d_in=24 but the activations .* have width 16"):
        check_sae_on_store(acts, wide, "cpu")


# ------------------------------------------------------------------------------- memory
_MEMORY_CHILD = """
import json, resource, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from tests.test_browser import make_sae, synthetic_store
from saeflow.browser import scan
from saeflow.store import ActivationStore
store = ActivationStore.open(sys.argv[2])
stats = scan(make_sae(576, 1152, k=16), store, 20, n_sample=20, batch_size=1024)
print(json.dumps({"rows": stats.rows_scanned, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.mark.slow
def test_memory_of_the_scan_does_not_grow_with_the_store(tmp_path):
    """The smoke profile's store is ~6k rows of width 576 (SAE width 1152): the pass over a store
    10x that size peaks within 1.2x of the pass over the 1x store (each in its own process)."""
    rss = {}
    for scale in (1, 10):
        synthetic_store(tmp_path / f"x{scale}", 6_000 * scale, 576, chunk=1024, seed=scale)
        proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(REPO), str(tmp_path / f"x{scale}")],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["rows"] == 6_000 * scale
        rss[scale] = out["maxrss_kb"]
    print("peak RSS (kB):", rss, "ratio", rss[10] / rss[1])
    assert rss[10] <= 1.2 * rss[1], rss


# ------------------------------------------------------------------------------- facts and site
def test_facts_join_stitching_and_meta_sae(tmp_path):
    import pandas as pd

    pair = tmp_path / "pair"
    pair.mkdir()
    (pair / "summary.json").write_text(json.dumps({"small_index": 0, "large_index": 1, "small": "#0 small", "large": "#1 large"}))
    pd.DataFrame({"latent": [0, 1, 2], "max_cos": [0.9, 0.2, 0.8], "match": [4, 5, 4], "delta_mse": [1.0, 2.0, 3.0],
                  "fires": [3, 4, 0], "class": ["reconstruction", "novel", "reconstruction"]}).to_parquet(pair / "latents.parquet")
    large = stitching_facts(pair, 1)
    assert large[1][0].tag == "novel" and large[1][0].links == ((0, 5),) and "cosine 0.20" in large[1][0].text
    small = stitching_facts(pair, 0)
    assert small[4][0].links == ((1, 0), (1, 2)) and "2 reconstruction latent(s) of #1 large" in small[4][0].text
    meta = tmp_path / "meta"
    meta.mkdir()
    pd.DataFrame({"latent": [0, 1, 2], "n_meta": [2, 1, 0], "recon_cos": [0.9, 0.8, 0.0], "meta_0": [3, 3, -1],
                  "weight_0": [0.7, 0.9, 0.0], "meta_1": [1, -1, -1], "weight_1": [0.2, 0.0, 0.0]}).to_parquet(meta / "decomposition.parquet")
    facts = meta_sae_facts(meta, 1)
    assert [f.tag for f in facts[0]] == ["meta:2", "M3", "M1"] and facts[0][1].links == ((1, 1),)
    assert facts[2] == []
    both = join(FactSources(stitching_pairs=[pair], meta_sae=meta), 1)
    assert [f.evaluation for f in both[0]] == ["stitching", "meta_sae", "meta_sae", "meta_sae"]


def test_probing_facts_are_the_latents_the_top_k_probe_used(tmp_path):
    """The SAE probe records the k latents it used (the top of the class-mean-difference ranking);
    the browser turns the normal regime's rows into one fact per (latent, dataset) at its smallest k."""
    import pandas as pd

    from saeflow.evals.probing import rank_latents
    from saeflow.evals.probing.probes import sae_probe

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 40)
    F = rng.exponential(1.0, (80, 30)) * (rng.random((80, 30)) < 0.3)
    F[:, 7] += 3.0 * y  # planted: latent 7 separates the classes, so it ranks first
    F_test, y_test = F[:40], y[:40]
    (k2, m2), (k4, m4) = sae_probe(F, y, F_test, y_test, [2, 4])
    order = rank_latents(F, y)
    assert order[0] == 7
    assert m2["latents"] == " ".join(map(str, order[:2])) and m4["latents"] == " ".join(map(str, order[:4]))
    folder = tmp_path / "probing-sae"
    folder.mkdir()
    rows = [{"dataset": "d1", "regime": "normal", "method": "sae", "k": k, "test_auc": m["test_auc"], "latents": m["latents"]}
            for k, m in ((k2, m2), (k4, m4))]
    rows.append({"dataset": "d1", "regime": "scarcity", "method": "sae", "k": 2, "test_auc": 0.5, "latents": "29 28"})
    rows.append({"dataset": "d2", "regime": "normal", "method": "sae", "k": 2, "test_auc": 0.6, "latents": None})
    pd.DataFrame(rows).to_parquet(folder / "rows.parquet")
    facts = join(FactSources(probing=folder), 0)
    assert [f.text.split(" (")[0] for f in facts[7]] == ["picked by the top-2 probe of d1"]  # once, at its smallest k
    assert "rank 1" in facts[7][0].text and facts[7][0].tag == "probe"
    assert set(facts) == {int(j) for j in m4["latents"].split()}  # the scarcity row and the skipped row add nothing
    assert "top-4 probe" in facts[int(order[2])][0].text


def _site(tmp_path: Path) -> tuple[Path, np.ndarray]:
    d, width = 16, 40
    sae = make_sae(d, width, k=4)
    store = synthetic_store(tmp_path / "s", 512, d, chunk=128)
    stats = scan(sae, store, 4, n_sample=8, batch_size=100)
    q_rows, q_acts = lower_quantile_rows(stats, 2)
    win = context_windows(sae, store, np.concatenate([stats.top_row, q_rows], 1), 4, 2)
    logits = logit_effects(sae.W_dec.detach(), torch.randn(d, 50, generator=torch.Generator().manual_seed(1)), 3)
    data = tmp_path / "data"
    data.mkdir()
    save_browser_data(data, stats, q_rows, q_acts, win, logits, {i: f"<t{i}>" for i in range(50)})
    from saeflow.browser import Fact

    facts = {7: [Fact("absorption", "absorbs letter 'q' on 'quick'", "absorbs:q", ((0, 3),))]}
    index = write_site(tmp_path / "browser", [SiteSAE("sae0-topk-w40-k4", "TopK 40", data, facts)], "test", ["absorption"])
    return index, stats.count


def test_site_files_and_table(tmp_path):
    index, count = _site(tmp_path)
    site = index.parent
    assert {p.name for p in site.iterdir()} == {"index.html", "browser.css", "browser.js", "sae0-topk-w40-k4"}
    page = (site / "sae0-topk-w40-k4" / "index.html").read_text()
    assert page.count("<tr data-id=") == 40 and "absorbs:q" in page
    assert "&lt;t" in page  # token text is escaped
    shard = (site / "sae0-topk-w40-k4" / "data" / "0.js").read_text()
    data = json.loads(shard[shard.index("(0, ") + 4:shard.rindex(");")])
    assert data["latents"]["7"]["facts"][0]["l"] == [[0, 3]] and data["keys"] == ["sae0-topk-w40-k4"] and data["me"] == 0
    assert [data["latents"][str(j)]["count"] for j in range(40)] == count.tolist()


def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def chromium_dom(url: str, profile: Path) -> str:
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                           "--allow-file-access-from-files", "--virtual-time-budget=5000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def screenshot(url: str, path: Path, profile: Path) -> Path:
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
                    "--window-size=1280,800", "--virtual-time-budget=5000", f"--screenshot={path}", url],
                   capture_output=True, text=True, timeout=120)
    return path


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium (Debian: apt-get install chromium)")
def test_pipeline_browser_in_headless_chromium(tmp_path):
    """A tiny family with the browser and the meta-SAE and stitching evaluations: open the index
    from file://, search a latent (``?q=``), follow its link; the latent page shows highlighted
    tokens and the evaluations' facts; the report links the browser."""
    from flows.pipeline import pipeline
    from tests.helpers import tiny_config

    cfg = tiny_config(family={"architectures": ["topk"], "widths": [64, 128], "ks": [8]}, browser={"n_top": 5, "n_random": 2},
                      meta_sae={"train_steps": 30, "batch_size": 64, "n_examples": 0, "checkpoint_every": 10, "log_every": 10},
                      stitching={"n_tokens": 256, "calibration_tokens": 512, "n_steps": 2, "ce_batches": 0})
    out = pipeline(cfg, str(tmp_path))
    results = out.refs.results.dir
    index = results / "browser" / "index.html"
    assert index.is_file() and len(out.refs.browser) == 2 and out.cached["browser"] is False
    assert "href='browser/index.html'" in out.report.read_text()
    top = index.read_text()
    sae_links = re.findall(r'href="([^"]+/index.html)"', top)
    assert len(sae_links) == 2
    large = results / "browser" / sae_links[1]
    table = large.read_text()
    assert table.count("<tr data-id=") == 128 and ("novel" in table or "reconstruction" in table)
    # search for one latent that fired: the table shows that row only, and it links the latent page
    latent = int(re.search(r'<tr data-id="(\d+)" data-freq="(0\.0*[1-9][^"]*)"', table).group(1))
    dom = chromium_dom(large.resolve().as_uri() + f"?q={latent}", tmp_path / "chromium")
    visible = [m for m in re.findall(r'<tr data-id="(\d+)"([^>]*)>', dom) if "hidden" not in m[1]]
    assert [int(v[0]) for v in visible] == [latent], visible[:5]
    link = re.search(rf'<a href="(latent\.html#{latent})">', dom).group(1)
    page = chromium_dom((large.parent / link.split("#")[0]).resolve().as_uri() + f"#{latent}", tmp_path / "chromium")
    assert f"Latent {latent}" in page
    tokens = re.findall(r"<span class=\"tok( center)?\" style=\"background: rgba\(230,97,0,([0-9.]+)\)\"", page)
    assert tokens and any(c for c, _ in tokens) and max(float(a) for _, a in tokens) > 0
    assert "meta_sae</span>: decomposed into" in page and "stitching</span>:" in page
    small_key = sae_links[0].split("/")[0]  # the stitching fact links the best match in the smaller SAE
    assert re.search(rf'stitching</span>: [^<]*<a href="\.\./{small_key}/latent\.html#\d+">{small_key} #\d+</a>', page)
    site = out.timings["site"]  # the site is timed (and its peak memory recorded) like a stage
    assert site.cached is False and site.seconds > 0 and site.peak_rss_mib > 0
    again = pipeline(cfg, str(tmp_path))
    assert again.cached["browser"] is True and again.timings["site"].cached is True


def test_browse_command_prints_the_site_or_a_clear_error(tmp_path, capsys):
    from flows.cli import main

    assert main(["browse", "--profile", "p", "--artifacts", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no latent browser at" in err and "browser: {}" in err and "saeflow run --config configs/p.yaml" in err
    site = tmp_path / "results" / "p" / "browser"
    site.mkdir(parents=True)
    (site / "index.html").write_text("<html>browser</html>")
    assert main(["browse", "--profile", "p", "--artifacts", str(tmp_path)]) == 0
    assert str(site / "index.html") in capsys.readouterr().out
    # --serve: the folder on localhost (a child process, stopped by its pid)
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "browse", "--profile", "p", "--artifacts", str(tmp_path),
                             "--serve", "--port", "0"], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        url = None
        for line in proc.stdout:
            if line.startswith("serving on "):
                url = line.split()[2]
                break
        assert url, "the server did not start"
        assert urllib.request.urlopen(url + "index.html", timeout=10).read() == b"<html>browser</html>"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_scan_and_windows_in_row_blocks_equal_one_block(tmp_path, monkeypatch):
    """Batches whose latents would exceed saeflow.saes.base.ENCODE_BLOCK_ELEMENTS are encoded in row blocks (a
    262k-latent SAE never holds [4096, 262144]): the same statistics, reservoir draws and windows."""
    d, width = 24, 96
    sae = make_sae(d, width)
    store = synthetic_store(tmp_path / "s", 700, d)
    one = scan(sae, store, 4, n_sample=5, batch_size=300, hist_bins=16)
    rows = one.top_row[:, :2]
    win_one = context_windows(sae, store, rows, left=3, right=1, batch_size=300)
    monkeypatch.setattr("saeflow.saes.base.ENCODE_BLOCK_ELEMENTS", 64 * width)  # 64-row blocks
    blocked = scan(sae, store, 4, n_sample=5, batch_size=300, hist_bins=16)
    win_blocked = context_windows(sae, store, rows, left=3, right=1, batch_size=300)
    for name in ("count", "sum", "max", "hist", "top_act", "top_row", "sample_act", "sample_row"):
        np.testing.assert_array_equal(getattr(blocked, name), getattr(one, name), err_msg=name)
    np.testing.assert_array_equal(win_blocked.token, win_one.token)
    np.testing.assert_array_equal(win_blocked.act, win_one.act)
    assert one.count.sum() > 0
