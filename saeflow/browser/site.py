"""The latent browser's static site: plain files that work from ``file://`` (no server, no CDN).

Layout under the site folder (``results/<profile>/browser/``)::

    index.html                 the browsed SAEs
    browser.css, browser.js    shared style and the small vanilla-JS helpers
    <sae key>/index.html       the latent table (search box, sortable columns; ``?q=`` pre-fills the search)
    <sae key>/latent.html      one page for every latent: ``latent.html#<latent>``
    <sae key>/data/<shard>.js  the latents' data, ``SHARD`` latents per file, loaded with ``<script src>``
                               (``fetch`` does not work on ``file://``)

The data of one SAE come from its ``browser`` artifact (:data:`DATA_FILE`, :data:`TOKENS_FILE`,
written by :func:`saeflow.browser.stream.save_browser_data`) and from :mod:`saeflow.browser.facts`.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saeflow.browser.facts import Fact, Facts, tags
from saeflow.browser.stream import DATA_FILE, TOKENS_FILE
from saeflow.pages import TEMPLATES, render

SHARD = 256
ASSETS = ("browser.css", "browser.js")
INDEX = "index.html"


@dataclass
class SiteSAE:
    """One SAE of the site: its folder name, title, browser artifact folder and facts."""

    key: str
    title: str
    data_dir: Path
    facts: Facts


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused (and restored after). A wide SAE's facts and shard
    data are millions of small lists and dicts, which every automatic collection walks again: at
    262,144 latents that doubled the site's time. Nothing built here forms reference cycles."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _r(x: float, digits: int = 3) -> float | int | None:
    """``x`` to ``digits`` significant digits for the JSON data (an integral value as an int: ``0``, not ``0.0``)."""
    if x is None or not math.isfinite(float(x)):
        return None
    v = float(f"{float(x):.{digits}g}")
    return int(v) if v.is_integer() and abs(v) < 1e15 else v


def _fact_json(f: Fact) -> dict[str, Any]:
    """A fact as shard data; its links stay ``[sae index, latent]`` pairs, which the latent page turns
    into hrefs with the shard's ``keys`` and ``me`` (a 262k SAE's meta-SAE facts hold ~10M links:
    as href strings they were most of its 1.1 GB site)."""
    return {"e": f.evaluation, "t": f.text, "l": f.links}


def _latent_rows(d: Any, facts: Facts, text: dict[str, str]) -> list[dict[str, Any]]:
    count, rows = d["count"], int(d["rows_scanned"])
    mean = np.where(count > 0, d["sum"] / np.maximum(count, 1), 0.0)
    out = []
    for j in range(count.shape[0]):
        out.append({"id": j, "freq": count[j] / max(rows, 1), "count": int(count[j]), "mean": float(mean[j]),
                    "max": float(d["max"][j]), "tags": tags(facts.get(j, [])),
                    "logits": [text.get(str(int(t)), "?") for t in d["logit_top_ids"][j][:3]]})
    return out


def _shard(d: Any, facts: Facts, keys: list[str], me: int, lo: int, hi: int, text: dict[str, str]) -> dict[str, Any]:
    """The data of latents ``lo:hi`` of SAE number ``me``: token strings (by index), the latents and
    the site's SAE folder ``keys`` (for the facts' links)."""
    strings: dict[str, int] = {}
    ids: dict[int, int] = {}  # token id -> index into strings

    def sid(token: int) -> int:
        i = ids.get(token)
        if i is None:
            i = ids[token] = strings.setdefault(text.get(str(token), "?"), len(strings))
        return i

    count, rows = d["count"], int(d["rows_scanned"])
    center = int(d["window_center"])
    n_top = d["top_act"].shape[1]
    block = {name: d[name][lo:hi].tolist() for name in ("logit_top_ids", "logit_top_vals", "logit_bottom_ids",
                                                         "logit_bottom_vals", "top_act", "top_row", "quantile_act",
                                                         "quantile_row")}
    latents = {}
    for i, j in enumerate(range(lo, hi)):
        ctx = []
        for kind, acts, rs, slot0 in (("top", block["top_act"][i], block["top_row"][i], 0),
                                       ("sample", block["quantile_act"][i], block["quantile_row"][i], n_top)):
            for s, (a, r) in enumerate(zip(acts, rs)):
                if r < 0:
                    continue
                toks, vals = d["window_token"][j, slot0 + s], d["window_act"][j, slot0 + s]
                keep = toks >= 0
                ctx.append({"k": kind, "a": _r(a), "row": r, "c": int(keep[:center].sum()),
                            "t": [sid(t) for t in toks[keep].tolist()], "v": [_r(v) for v in vals[keep].tolist()]})
        h = d["hist"][j]
        nz = np.flatnonzero(h)
        latents[j] = {
            "count": int(count[j]), "freq": _r(count[j] / max(rows, 1)), "mean": _r(d["sum"][j] / max(count[j], 1)),
            "max": _r(d["max"][j]), "h0": int(nz[0]) if nz.size else 0,
            "h": h[nz[0]:nz[-1] + 1].tolist() if nz.size else [],
            "up": [[sid(t), _r(v)] for t, v in zip(block["logit_top_ids"][i], block["logit_top_vals"][i])],
            "down": [[sid(t), _r(v)] for t, v in zip(block["logit_bottom_ids"][i], block["logit_bottom_vals"][i])],
            "ctx": ctx, "facts": [_fact_json(f) for f in facts.get(j, [])]}
    return {"strings": list(strings), "keys": keys, "me": me, "latents": latents}


def write_site(folder: str | Path, saes: list[SiteSAE], title: str, evaluations: list[str]) -> Path:
    """Write the whole site into ``folder`` (replacing an earlier one); returns its ``index.html``."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for asset in ASSETS:
        shutil.copyfile(TEMPLATES / "browser" / asset, tmp / asset)
    keys = [s.key for s in saes]
    summary = []
    for me, sae in enumerate(saes):
        d = dict(np.load(sae.data_dir / DATA_FILE))
        text = json.loads((sae.data_dir / TOKENS_FILE).read_text())
        out = tmp / sae.key
        (out / "data").mkdir(parents=True)
        rows = _latent_rows(d, sae.facts, text)
        width = len(rows)
        alive = sum(r["count"] > 0 for r in rows)
        edges = [_r(e, 4) for e in d["hist_edges"]]
        (out / INDEX).write_text(render("browser/sae.html.j2", title=title, sae=sae, rows=rows, width=width, alive=alive,
                                        rows_scanned=int(d["rows_scanned"]), evaluations=evaluations))
        (out / "latent.html").write_text(render("browser/latent.html.j2", title=title, sae=sae, width=width,
                                                shard=SHARD, edges=json.dumps(edges)))
        for lo in range(0, width, SHARD):
            data = _shard(d, sae.facts, keys, me, lo, min(width, lo + SHARD), text)
            (out / "data" / f"{lo // SHARD}.js").write_text(
                f"saeflowShard({lo // SHARD}, {json.dumps(data, separators=(',', ':'), allow_nan=False)});\n")
        summary.append({"key": sae.key, "title": sae.title, "width": width, "alive": alive,
                        "rows": int(d["rows_scanned"]), "facts": sum(len(v) for v in sae.facts.values())})
    (tmp / INDEX).write_text(render("browser/index.html.j2", title=title, saes=summary, evaluations=evaluations))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder / INDEX


def site_size(folder: str | Path) -> tuple[int, int]:
    """``(files, bytes)`` of a site folder."""
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)
