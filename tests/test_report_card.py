"""The report's first screen (saeflow/report_card.py, saeflow/report_figures.py): a synthetic run of
four SAEs whose headline numbers are planted; the card's values, the best-per-column marks, the
captions computed from the data, the rank correlations (against scipy.stats.spearmanr), SAEs named
and never indexed, and what headless Chromium shows at 1280x800."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from saeflow.artifacts import COMPLETE_MARKER
from saeflow.evals.common import sae_info
from saeflow.plots import plt, save_figure
from saeflow.report import PNG_MAGIC, build_report, named_tables, report_page
from saeflow.report_card import label_name, rank_correlations, sae_name, sae_names
from saeflow.saes import SAEConfig
from saeflow.tables import core_table, write_table

NAMES = ["topk-w1024-k16", "topk-w1024-k64", "topk-w4096-k16", "topk-w4096-k64"]
FPS = ["fp0aaaaaaaa", "fp1bbbbbbbb", "fp2cccccccc", "fp3dddddddd"]
#: The planted headline numbers, one per SAE in NAMES order.
PLANTED = {
    "ev": [0.70, 0.80, 0.75, 0.90],                      # best (highest): topk-w4096-k64
    "ce": [0.85, 0.95, 0.90, 0.93],                      # best: topk-w1024-k64
    "full_absorption": [0.05, 0.02, 0.10, 0.04],         # best (lowest): topk-w1024-k64
    "split_latents": [1.5, 1.2, 2.0, 1.2],               # tie: topk-w1024-k64 and topk-w4096-k64
    "novel_fraction": [np.nan, np.nan, 0.40, 0.30],      # only the larger size has a pair
    "meta_fve": [0.30, 0.20, 0.40, 0.35],                # best (lowest): topk-w1024-k64
    "probing_auc": [0.80, 0.82, 0.85, 0.83],             # best: topk-w4096-k16
}
BEST = {"ev": [NAMES[3]], "ce": [NAMES[1]], "full_absorption": [NAMES[1]], "split_latents": [NAMES[1], NAMES[3]],
        "novel_fraction": [NAMES[2]], "meta_fve": [NAMES[1]], "probing_auc": [NAMES[2]]}
CORE_OF = {"ev": "explained_variance", "ce": "ce_loss_score", "full_absorption": "absorption_mean_full",
           "split_latents": "absorption_mean_split_features", "novel_fraction": "stitching_novel_fraction",
           "meta_fve": "meta_sae_fve", "probing_auc": "probing_normal_auc"}
BASELINE = 0.84
CONFIG = {"name": "synth", "model": {"name": "tiny-random"}, "activations": {"hook": "blocks.1.hook_resid_post"}}


def _png(path: Path, seed: int) -> Path:
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot(np.random.default_rng(seed).random(10))
    return save_figure(fig, path)


def synthetic_run(tmp_path: Path, n: int = 4) -> Path:
    """A results folder as the results stage leaves it for a run of ``n`` (<= 4) SAEs with every
    evaluation: the core table (no ``sae`` column, as written before it had one) and each
    evaluation's tables (absorption's with ``sae_index`` in an order other than the core table's,
    stitching's with ``#i`` labels) and a plot."""
    d = tmp_path / "results" / "synth"
    d.mkdir(parents=True)
    widths, ks = [1024, 1024, 4096, 4096], [16, 64, 16, 64]
    core = pd.DataFrame({"profile": "synth", "model": "tiny-random", "hook": "h", "architecture": "topk",
                         "width": widths[:n], "k": pd.array(ks[:n], dtype="Int64"), "sae_fingerprint": FPS[:n],
                         "l0": [16.0, 64.0, 16.0, 64.0][:n], "frac_dead": [0.01, 0.0, 0.05, 0.02][:n],
                         **{f"extra_metric_{i}": np.arange(n, dtype=float) for i in range(30)}})
    for key, col in CORE_OF.items():
        core[col] = PLANTED[key][:n]
    core["absorption_mean_fraction"] = [0.1, 0.05, 0.2, 0.08][:n]
    core["meta_sae_mean_latents_per_meta"] = [2.0, 2.5, 3.0, 3.5][:n]
    files = [*write_table(core, d, "core_metrics"), _png(d / "frontier.png", 0)]

    ab = d / "absorption"
    order = list(reversed(range(n)))  # absorption's sae_index i is the core table's SAE order[i]
    summ = pd.DataFrame({"sae_index": range(n), "sae_fingerprint": [FPS[j] for j in order], "architecture": "topk",
                         "width": [widths[j] for j in order], "k": [ks[j] for j in order],
                         "absorption_mean_full": [PLANTED["full_absorption"][j] for j in order]})
    letters = pd.DataFrame({"sae_index": np.repeat(range(n), 2), "letter": ["a", "b"] * n, "split_feats": "1,2",
                            "mean_absorption_fraction": 0.1, "full_absorption_rate": 0.05})
    examples = pd.DataFrame({"sae_index": np.repeat(range(n), 15), "word": "apple", "letter": "a"})
    files += [*write_table(summ, ab, "absorption_summary"), *write_table(letters, ab, "absorption_letters"),
              *write_table(examples, ab, "absorption_examples"), _png(ab / "absorption_vs_l0.png", 1)]

    st = d / "stitching"
    labels = [f"#{i} topk w={widths[i]} k={ks[i]}" for i in range(n)]
    pairs = [(0, 2), (1, 3)][: max(n - 2, 0)]
    ptab = pd.DataFrame([{"pair": f"{labels[a]} -> {labels[b]}", "small_width": widths[a], "large_width": widths[b],
                          "small": labels[a], "large": labels[b], "small_index": a, "large_index": b,
                          "n_novel": int(PLANTED["novel_fraction"][b] * 1000), "n_inactive": 96,
                          "n_reconstruction": 1000 - int(PLANTED["novel_fraction"][b] * 1000),
                          "novel_fraction": PLANTED["novel_fraction"][b]} for a, b in pairs])
    curves = pd.concat([pd.DataFrame({"pair": p, "events_done": [0, 10, 20, 30], "mse": [4.0, 3.0, 2.5, 2.0],
                                      "ce_with_sae": [3.5, 3.4, 3.3, 3.2]}) for p in ptab["pair"]]) if len(ptab) else None
    if len(ptab):
        files += [*write_table(ptab, st, "stitching_pairs"), *write_table(curves, st, "stitching_curves"),
                  *write_table(pd.DataFrame({"sae": labels, "jumprelu_l0": 10.0}), st, "stitching_jumprelu_form"),
                  _png(st / "interpolation.png", 2)]

    ms = d / "meta_sae"
    files += [*write_table(pd.DataFrame({"sae": [f"topk width={widths[i]} k={ks[i]}" for i in range(n)],
                                         "sae_fingerprint": FPS[:n], "width": widths[:n],
                                         "fve": PLANTED["meta_fve"][:n]}), ms, "meta_sae"),
              _png(ms / "cluster_sizes.png", 3)]

    pr = d / "probing"
    summary = pd.DataFrame({"regime": ["normal", "scarcity"], "n_pairs": [10, 20], "n_datasets": [5, 5],
                            "baseline_quiver": [BASELINE, 0.75], "quiver_with_saes": [0.85, 0.76],
                            "quiver_gain": [0.01, 0.01], "frac_sae_picked": [0.3, 0.2], "logreg": [0.83, 0.74],
                            "pca": [0.80, 0.70], **{f"{NAMES[i]}_k16": [PLANTED["probing_auc"][i], 0.70] for i in range(n)}})
    rows = pd.DataFrame({"dataset": "d1", "regime": "normal", "method": "sae", "k": 16, "sae": NAMES[:n],
                         "test_auc": PLANTED["probing_auc"][:n]})
    files += [*write_table(summary, pr, "probing_summary"), *write_table(rows, pr, "probing_results"),
              _png(pr / "auc_vs_train_size.png", 4)]
    (d / COMPLETE_MARKER).write_text(json.dumps({"fingerprint": "f", "files": [str(f) for f in files]}))
    return d


class _Cells(HTMLParser):
    """Card cells (``data-col``, ``data-value``, marked best), image sources and table headers."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict] = []
        self.imgs: list[str] = []
        self.headers: list[str] = []
        self._th = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and "data-col" in a:
            self.cells.append(a)
        elif tag == "img":
            self.imgs.append(a["src"])
        self._th = tag == "th"

    def handle_data(self, data):
        if self._th and data.strip():
            self.headers.append(data.strip())


def test_names():
    assert sae_name("topk", 4096, 32) == "topk-w4096-k32"
    assert sae_name("relu", 64, None, 0.5) == "relu-w64-c0.5"
    assert label_name("#2 topk w=128 k=8") == "topk-w128-k8" and label_name("#0 jumprelu w=64 c=0.01") == "jumprelu-w64-c0.01"
    assert label_name("not a label") == "not a label"
    rows = [{"profile": "p", "model": "m", "hook": "h", "sae_fingerprint": "f", "metrics": {"l0": 1.0},
             "sae": {"architecture": a, "width": 4096, "k": 32, "l1_coefficient": 0.5}} for a in ("topk", "relu")]
    assert list(core_table(rows)["sae"]) == ["topk-w4096-k32", "relu-w4096-c0.5"]  # the results table's names
    # members trained to a target L0 are named by it (their coefficients may all be base's)
    cfg = SAEConfig(architecture="jumprelu", width=64, jumprelu_sparsity_loss_mode="quadratic", target_l0=16)
    info = sae_info(2, {"d_sae": 64, "d_in": 8, "saeflow": {"sae_config": cfg.model_dump(mode="json")}})
    assert info.label == "#2 jumprelu w=64 c=1 l0t=16" and label_name(info.label) == "jumprelu-w64-l0t16"
    rows = [{"profile": "p", "model": "m", "hook": "h", "sae_fingerprint": "f", "metrics": {"l0": 1.0},
             "sae": cfg.model_dump(mode="json")}]
    table = core_table(rows)
    assert list(table["sae"]) == ["jumprelu-w64-l0t16"] and table["target_l0"].iloc[0] == 16
    assert sae_names(table.drop(columns="sae")) == ["jumprelu-w64-l0t16"]


def test_card_values_best_marks_and_correlations(tmp_path):
    d = synthetic_run(tmp_path)
    page = report_page(d, CONFIG, {}, vers={"python": "3"})
    card = page.card
    assert [r.sae for r in card.rows] == NAMES
    assert list(card.values.columns) == list(PLANTED)
    for key, planted in PLANTED.items():
        np.testing.assert_allclose(card.values[key].to_numpy(), planted, equal_nan=True)
    assert {c.headline.key: c.best for c in card.columns} == BEST
    assert card.baseline == pytest.approx(BASELINE)
    assert [r.dead_text for r in card.rows] == ["1.0%", "0.0%", "5.0%", "2.0%"]
    probing = [r.cells[-1].text for r in card.rows]
    assert probing[2] == "0.850 (+0.010)" and probing[0] == "0.800 (-0.040)"

    html_path, md_path = build_report(d, CONFIG, {})
    html = html_path.read_text()
    doc = _Cells()
    doc.feed(html)
    marked: dict[str, list[float]] = {}
    for c in doc.cells:
        if "class" in c and "best" in c["class"]:
            marked.setdefault(c["data-col"], []).append(float(c["data-value"]))
    assert marked == {k: [PLANTED[k][NAMES.index(n)] for n in v] for k, v in BEST.items()}
    assert all(c.get("style", "").startswith("background:#") for c in doc.cells if c["data-value"] != "nan")
    section = md_path.read_text().split("## Report card", 1)[1].split("\n## ", 1)[0]
    card_md = [ln for ln in section.splitlines() if ln.startswith("| topk-")]
    assert [ln.split(" | ")[0][2:] for ln in card_md] == NAMES
    assert sum(ln.count("★") for ln in card_md) == sum(len(v) for v in BEST.values())

    # correlations: pandas' pairwise Spearman matches scipy on the SAEs that have both numbers
    corr = rank_correlations(card.values)
    for a in PLANTED:
        for b in PLANTED:
            both = card.values[[a, b]].dropna()
            assert corr.n.loc[a, b] == len(both)
            if a != b and len(both) >= 4:
                assert corr.rho.loc[a, b] == pytest.approx(spearmanr(both[a], both[b]).statistic)
            elif a != b:
                assert np.isnan(corr.rho.loc[a, b])  # novel fraction: only 2 SAEs have it
    assert corr.rho.loc["ev", "ce"] == pytest.approx(spearmanr(PLANTED["ev"], PLANTED["ce"]).statistic)
    assert "Exploratory" in html and "Spearman" in html
    assert f"{spearmanr(PLANTED['ev'], PLANTED['meta_fve']).statistic:.2f}" in html
    assert {"a", "b", "rho", "n"} <= set(doc.headers)


def test_figures_captions_and_names(tmp_path):
    d = synthetic_run(tmp_path)
    (d / "browser").mkdir()
    html_path, md_path = build_report(d, CONFIG, {"train": {"seconds": 2.0, "cached": False}})
    html, md = html_path.read_text(), md_path.read_text()
    assert "sae_index" not in html and "sae_index" not in md  # named, never indexed
    assert "small_index" not in html and "#0 topk" not in html and "#2 topk" not in md
    tables = named_tables(d)
    assert list(tables["absorption/absorption_summary"]["sae"]) == list(reversed(NAMES))  # by fingerprint
    assert set(tables["absorption/absorption_letters"]["sae"]) == set(NAMES)
    assert list(tables["core_metrics"]["sae"]) == NAMES
    assert list(tables["meta_sae/meta_sae"]["sae"]) == NAMES
    assert list(tables["stitching/stitching_pairs"]["pair"]) == [f"{NAMES[0]} -> {NAMES[2]}", f"{NAMES[1]} -> {NAMES[3]}"]
    assert list(tables["stitching/stitching_jumprelu_form"]["sae"]) == NAMES

    page = report_page(d, CONFIG, {}, vers={"python": "3"})
    figs = {f.title: f for f in page.figures}
    assert all(f.data_uri for f in page.figures) and len(figs) == 5
    # captions computed from the data: full absorption per width 0.035 -> 0.07, FVE 0.25 -> 0.375
    assert "full absorption rises with width: yes (mean per width: 1024: 0.035, 4096: 0.07)" in figs["Absorption vs L0"].family
    assert "meta-SAE FVE rises with width: yes" in figs["Meta-SAE vs width"].family
    assert "every size step adds novel latents: yes" in figs["Novel / reconstruction latents vs width"].family
    assert "MSE falls monotonically: yes (rises at 0 of 6" in figs["Interpolation between sizes"].family
    assert figs["Probing AUC by regime"].family.startswith(
        "an SAE probe beats the best baseline (method or quiver) in: normal (0.850 vs 0.840)")

    doc = _Cells()
    doc.feed(html)
    assert len(doc.imgs) == 5 + 1 + 5  # figures, correlation heatmap, the folder's plots
    for src in doc.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    for f in ("absorption/absorption_summary.parquet", "stitching/stitching_pairs.md", "probing/probing_summary.parquet"):
        assert f"href='{f}'" in html
    assert "browser/index.html" not in html  # the folder exists, the browser does not
    (d / "browser" / "index.html").write_text("<html></html>")
    build_report(d, CONFIG)
    assert "href='browser/index.html'" in html_path.read_text()
    assert "[browser/index.html](browser/index.html)" in md_path.read_text()
    assert re.search(r"<details>.*core_metrics", html, re.S)  # long tables collapsed below


def test_few_saes_and_missing_evaluations(tmp_path):
    d = synthetic_run(tmp_path, n=3)
    shutil.rmtree(d / "stitching")
    page = report_page(d, CONFIG, {}, vers={"python": "3"})
    assert page.cross.heatmap is None and "skipped: this run has 3 SAE(s), fewer than 4" in page.cross.note
    skipped = [f for f in page.figures if f.data_uri is None]
    assert [f.title for f in skipped] == ["Novel / reconstruction latents vs width", "Interpolation between sizes"]
    assert all("did not run" in f.note for f in skipped)
    html, _ = build_report(d, CONFIG)
    assert "Cross-evaluation rank correlations skipped" in html.read_text()


def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


#: Appended to a copy of the report: after load, the layout facts the test checks, as JSON in the DOM.
_MEASURE = """<script>window.addEventListener('load', () => {
  const vw = window.innerWidth, vh = window.innerHeight, card = document.querySelector('table.card').getBoundingClientRect();
  const shown = [...document.querySelectorAll('table')].filter(t => !t.closest('details:not([open])'));
  const tables = shown.map(t => t.getBoundingClientRect()).filter(r => r.width > 0);
  const imgs = [...document.querySelectorAll('img')];
  const out = {vw, vh, card_top: card.top, card_bottom: card.bottom, card_right: card.right,
    widest_visible_table_right: Math.max(...tables.map(r => r.right)), scroll_width: document.documentElement.scrollWidth,
    visible_tables: tables.length, imgs: imgs.length, decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length};
  const pre = document.createElement('pre'); pre.id = 'layout'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});</script>"""


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium (Debian: apt-get install chromium)")
def test_first_screen_in_headless_chromium(tmp_path):
    """At 1280x800 the first screen shows the whole report card, no visible table is wider than
    the viewport, and every image decodes; the screenshot of that screen shows the card's colours."""
    import matplotlib.image as mpimg

    d = synthetic_run(tmp_path)
    html_path, _ = build_report(d, CONFIG, {"train": {"seconds": 2.0, "cached": False}}, {"flow_run": "test"})
    probe = d / "measure.html"
    probe.write_text(html_path.read_text().replace("</body>", _MEASURE + "</body>"))
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,800"]
    proc = subprocess.run([*args, "--virtual-time-budget=5000", "--dump-dom", probe.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    m = re.search(r"<pre id=\"layout\">(.*?)</pre>", proc.stdout)
    assert m, proc.stderr[-2000:]
    lay = json.loads(m.group(1).replace("&quot;", '"'))
    # --dump-dom's viewport is as wide as the window (its height is smaller: the layout of the page
    # does not depend on it); the card must end within the first 800 pixels
    assert lay["vw"] == 1280, lay
    assert 0 <= lay["card_top"] and lay["card_bottom"] <= 800 and lay["card_right"] <= lay["vw"], lay
    assert lay["widest_visible_table_right"] <= lay["vw"] and lay["scroll_width"] <= lay["vw"], lay
    assert lay["visible_tables"] == 2, lay  # the card and the correlation table; the long ones are collapsed
    assert lay["imgs"] == lay["decoded"] == 11, lay

    shot = tmp_path / "first_screen.png"
    proc = subprocess.run([*args, f"--screenshot={shot}", html_path.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    img = mpimg.imread(shot)
    assert img.shape[:2] == (800, 1280)
    rgb = img[..., :3].reshape(-1, 3)
    assert (rgb.max(axis=1) < 0.3).mean() > 0.001  # text
    green = (rgb[:, 1] > rgb[:, 0] + 0.1) & (rgb[:, 1] > rgb[:, 2] + 0.1)  # the card's best cells
    assert green.sum() > 500, green.sum()


def test_optimisations_not_converged_are_a_warning_at_the_top(tmp_path):
    """A ``converged`` column that is false in an evaluation's table puts (evaluation, SAE, what) in a
    warning above the card, in both report files; none when everything converged."""
    d = synthetic_run(tmp_path)
    ms, pr = d / "meta_sae", d / "probing"
    meta = pd.read_parquet(ms / "meta_sae.parquet")
    write_table(meta.assign(converged=True, rel_change_last10=0.001), ms, "meta_sae")
    rows = pd.read_parquet(pr / "probing_results.parquet").assign(converged=True)
    baselines = pd.DataFrame({"dataset": "d1", "regime": "normal", "method": ["logreg", "knn", "quiver"], "sae": None,
                              "converged": pd.array([True, None, None], dtype="boolean")})
    write_table(pd.concat([rows, baselines], ignore_index=True), pr, "probing_results")
    assert report_page(d, CONFIG, {}, vers={"python": "3"}).not_converged == []
    html, md = build_report(d, CONFIG)
    assert "Not converged" not in html.read_text() and "not converged" not in md.read_text()

    write_table(meta.assign(converged=[True, False, True, True], rel_change_last10=[0.001, 0.05, 0.002, 0.003]), ms,
                "meta_sae")
    baselines["converged"] = pd.array([False, None, None], dtype="boolean")
    write_table(pd.concat([rows.assign(converged=[True, False, True, True]), baselines], ignore_index=True), pr,
                "probing_results")
    expected = [("meta_sae", NAMES[1], "1 of 1 results in meta_sae not converged; relative loss change over the last "
                                       "10% of steps 0.05"),
                ("probing", NAMES[1], "1 of 1 results in probing_results not converged (sae)"),
                ("probing", "baselines", "1 of 1 results in probing_results not converged (logreg)")]
    assert report_page(d, CONFIG, {}, vers={"python": "3"}).not_converged == expected
    html, md = build_report(d, CONFIG)
    text, md_text = html.read_text(), md.read_text()
    assert "Not converged" in text and text.index("not-converged") < text.index("id='card'")
    assert all(f"<li>{e}, {s}: {w}</li>" in text for e, s, w in expected)
    assert "**Warning: not converged.**" in md_text and "> - probing, baselines: 1 of 1 results in probing_results" in md_text
