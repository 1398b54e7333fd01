"""The run report (saeflow/report.py, rendered from saeflow/templates/): every table and plot of
the results folder (the evaluations' subfolders included) in one self-contained HTML file +
markdown, with config, versions and timings."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from saeflow.artifacts import COMPLETE_MARKER  # noqa: E402
from saeflow.tables import write_table  # noqa: E402
from saeflow.report import PNG_MAGIC, REPORT_HTML, REPORT_MD, RUN_JSON, ReportError, build_report, result_files  # noqa: E402

CORE_COLUMNS = ["profile", "model", "hook", "architecture", "width", "k", "sae_fingerprint", "l0", "explained_variance",
                "mse", "cossim", "ce_loss_score", "kl_with_sae", "frac_dead", "frac_dense"]


class _Doc(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.tables: list[list[str]] = []
        self._in_th = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        elif tag == "table":
            self.tables.append([])
        elif tag == "th":
            self._in_th = True

    def handle_endtag(self, tag):
        if tag == "th":
            self._in_th = False

    def handle_data(self, data):
        if self._in_th and self.tables and data.strip():
            self.tables[-1].append(data.strip())


def _plot(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot(rng.random(10))
    fig.savefig(path)
    plt.close(fig)
    return path


def _results_folder(tmp_path: Path) -> Path:
    """A results folder as tasks/tables.py leaves it: the core table + frontier plot, and two
    evaluations' subfolders with their own tables and plots."""
    d = tmp_path / "results" / "demo"
    d.mkdir(parents=True)
    core = pd.DataFrame([{c: (1.5 if c not in ("profile", "model", "hook", "architecture", "sae_fingerprint") else "x")
                          for c in CORE_COLUMNS} for _ in range(3)])
    files = [*write_table(core, d, "core_metrics"), _plot(d / "frontier.png", 0)]
    for ev, cols in (("absorption", ["sae", "letter", "absorption_fraction"]), ("probing", ["sae", "dataset", "auc"])):
        (d / ev).mkdir()
        df = pd.DataFrame({cols[0]: ["a", "b"], cols[1]: ["p", "q"], cols[2]: [0.25, 0.5]})
        files += [*write_table(df, d / ev, f"{ev}_table"), _plot(d / ev / f"{ev}.png", 1)]
    (d / COMPLETE_MARKER).write_text(json.dumps({"fingerprint": "f", "files": [str(f) for f in files]}))
    return d


def test_report_holds_every_table_and_plot_with_expected_columns(tmp_path):
    d = _results_folder(tmp_path)
    (d / "stale_eval").mkdir()  # left by an earlier run with another evaluation: not in this run's files
    _plot(d / "stale_eval" / "old.png", 2)
    config = {"name": "demo", "model": {"name": "tiny-random"}, "activations": {"hook": "blocks.1.hook_resid_post"}}
    timings = {"model": {"seconds": 1.25, "cached": True}, "train": {"seconds": 12.5, "cached": False}}
    html_path, md_path = build_report(d, config, timings, {"flow_run": "test"})
    assert html_path == d / REPORT_HTML and md_path == d / REPORT_MD

    tables, plots = result_files(d)
    assert [p.relative_to(d).as_posix() for p in plots] == ["frontier.png", "absorption/absorption.png", "probing/probing.png"]
    assert [p.relative_to(d).as_posix() for p in tables] == ["core_metrics.parquet", "absorption/absorption_table.parquet",
                                                             "probing/probing_table.parquet"]
    for p in plots:  # every figure file is a valid PNG
        assert p.read_bytes().startswith(PNG_MAGIC)
    assert set(pd.read_parquet(tables[0]).columns) >= set(CORE_COLUMNS)  # every table has its expected columns
    assert list(pd.read_parquet(tables[1]).columns) == ["sae", "letter", "absorption_fraction"]

    doc = _Doc()
    text = html_path.read_text()
    doc.feed(text)
    assert "src='http" not in text and "<link" not in text and "<script" not in text  # self-contained
    assert len(doc.imgs) == 3  # the stale plot is not reported
    for src in doc.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    headers = [set(t) for t in doc.tables]
    assert any(set(CORE_COLUMNS) <= h for h in headers)
    assert any({"sae", "letter", "absorption_fraction"} <= h for h in headers)
    assert any({"sae", "dataset", "auc"} <= h for h in headers)
    assert any({"stage", "seconds", "cached"} <= h for h in headers)  # timings
    for needle in ("tiny-random", "blocks.1.hook_resid_post", "torch", "prefect", "python", "12.50"):
        assert needle in text, needle

    md = md_path.read_text()
    assert re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md) == ["frontier.png", "absorption/absorption.png", "probing/probing.png"]
    assert md.count("| sae ") >= 2 and "```yaml" in md
    saved = json.loads((d / RUN_JSON).read_text())
    assert saved["timings"] == timings and saved["versions"]["torch"]

    # rebuilt later without a run (saeflow report): the recorded timings are kept
    build_report(d, config)
    assert "12.50" in html_path.read_text()


def test_report_refuses_a_broken_png_and_a_missing_folder(tmp_path):
    d = _results_folder(tmp_path)
    (d / "frontier.png").write_bytes(b"not a png")
    with pytest.raises(ReportError, match="not a PNG"):
        build_report(d, {"name": "demo"})
    with pytest.raises(ReportError, match="does not exist"):
        build_report(tmp_path / "nope", {"name": "demo"})



def test_report_of_a_moved_artifacts_root(tmp_path):
    d = _results_folder(tmp_path / "old")
    new = tmp_path / "new" / "results" / "demo"
    new.parent.mkdir(parents=True)
    d.rename(new)  # _COMPLETE.json still lists the old absolute paths
    tables, plots = result_files(new)
    assert len(tables) == 3 and len(plots) == 3 and all(p.is_relative_to(new) for p in tables + plots)


def _chromium() -> str | None:
    import shutil

    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium (Debian: apt-get install chromium; .ci/run installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    """What a person sees: the HTML report opened in headless Chromium renders its tables and
    embedded plots (a screenshot that is a real, non-blank PNG of the window size)."""
    import subprocess

    import matplotlib.image as mpimg

    d = _results_folder(tmp_path)
    config = {"name": "demo", "model": {"name": "tiny-random"}, "activations": {"hook": "blocks.1.hook_resid_post"}}
    html_path, _ = build_report(d, config, {"model": {"seconds": 1.0, "cached": False}}, {"flow_run": "test"})
    shot = tmp_path / "report.png"
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,2400",
                           f"--screenshot={shot}", html_path.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    assert shot.read_bytes().startswith(PNG_MAGIC)
    img = mpimg.imread(shot)
    assert img.shape[:2] == (2400, 1280)
    rgb = img[..., :3].reshape(-1, 3)
    # not a blank page: dark text pixels and coloured plot lines (matplotlib's default blue) are drawn
    assert (rgb.max(axis=1) < 0.3).mean() > 0.001
    blue = (rgb[:, 2] > 0.6) & (rgb[:, 0] < 0.3)
    assert blue.sum() > 200, blue.sum()


def test_text_from_the_data_is_escaped(tmp_path):
    """Names, config values and table cells are shown as text, never interpreted as markup."""
    d = _results_folder(tmp_path)
    evil = "<script>alert(1)</script>"
    write_table(pd.DataFrame({"sae": [evil], "note": ["a & b <i>"]}), d, "evil_table")
    marker = json.loads((d / COMPLETE_MARKER).read_text())
    marker["files"].append(str(d / "evil_table.parquet"))
    (d / COMPLETE_MARKER).write_text(json.dumps(marker))
    config = {"name": "demo", "model": {"name": "<b>m</b>"}, "activations": {"hook": "h' onmouseover='x"},
              "note": evil}
    html_path, md_path = build_report(d, config, {"<img src=x>": {"seconds": 1.0, "cached": False}}, {"flow_run": evil})
    text = html_path.read_text()
    assert "<script" not in text and "<b>m</b>" not in text and "<img src=x>" not in text and "<i>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&lt;b&gt;m&lt;/b&gt;" in text
    assert "a &amp; b &lt;i&gt;" in text
    assert "h' onmouseover" not in text  # an attribute-breaking quote is escaped too
    doc = _Doc()
    doc.feed(text)
    assert any({"sae", "note"} <= set(t) for t in doc.tables)
    assert evil in md_path.read_text()  # the markdown twin is plain text, shown as written
