"""Stage ``browser`` (one per SAE) and the latent browser's site (``results/<profile>/browser/``).

- ``browser`` (:func:`browser_task`): one streaming pass over the activation store with the SAE
  (:func:`saeflow.browser.scan`: frequency, mean / max, histogram, top and random contexts), the
  token windows around the chosen rows with per-token activations, and the logit effects
  ``W_dec @ W_U`` from the model; written as ``latents.npz`` + ``tokens.json``.
- the site (:func:`site_task`): after the evaluations and the results stage, joins each SAE's
  browser data with what the evaluations found per latent (:mod:`saeflow.browser.facts`) and
  writes the static site (:func:`saeflow.browser.write_site`) into the profile's results folder,
  where the report links it. It rewrites the site only when its inputs changed (``site.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from prefect import task

from saeflow.artifacts import (ArtifactRef, artifact_ref, begin, fingerprint, mark_complete, require_complete,
                               write_json_atomic)
from saeflow.browser import (
    BrowserInputError,
    FactSources,
    SiteSAE,
    context_windows,
    gc_paused,
    join,
    logit_effects,
    lower_quantile_rows,
    save_browser_data,
    scan,
    site_size,
    write_site,
)
from saeflow.config import BrowserConfig, ModelConfig
from saeflow.evals.common import read_sae_info
from saeflow.models import load_model
from saeflow.pages import template_version
from tasks.common import EvalOutput, Progress, code_version, stage_logger, stage_task, timed
from tasks.metrics import SAEMismatchError, sae_on_store

STAGE = "browser"
SITE = "browser"
SITE_JSON = "site.json"


def _code() -> str:
    """The browser stage's code version (the streaming pass and this module); the site's own code
    and templates only stamp the site (:func:`site_task`), so a page edit recomputes no stage."""
    return code_version("saeflow.browser.stream", "tasks.browser")


def ref(model: ArtifactRef, model_cfg: ModelConfig, acts: ArtifactRef, sae: ArtifactRef, cfg: BrowserConfig, root: str,
        **_) -> ArtifactRef:
    return artifact_ref(root, STAGE, fingerprint(STAGE, cfg, model, acts, sae, f"dtype={model_cfg.resolved_dtype()}", _code()))


def check_sae_on_store(acts: ArtifactRef, sae: ArtifactRef, device: str):
    """:func:`tasks.metrics.sae_on_store`, with the error saying it is the browser that refused."""
    try:
        return sae_on_store(acts, sae, device)
    except SAEMismatchError as exc:
        raise BrowserInputError(f"latent browser: {exc}") from exc


@stage_task(ref, name="browser")
def browser_task(out: ArtifactRef, model: ArtifactRef, model_cfg: ModelConfig, acts: ArtifactRef, sae: ArtifactRef,
                 cfg: BrowserConfig, root: str, device: str = "auto") -> None:
    logger = stage_logger()
    dev, store, sae_dir, sae_model = check_sae_on_store(acts, sae, device)
    progress = Progress(f"browser {sae_dir.name}")
    with timed("browser scan") as t_scan:
        stats = scan(sae_model, store, cfg.n_top, 4 * cfg.n_random, cfg.max_rows, cfg.batch_size, cfg.hist_bins,
                     cfg.hist_range, cfg.seed, dev, progress=lambda d, n: progress.update(d, n))
    q_rows, q_acts = lower_quantile_rows(stats, cfg.n_random)
    with timed("browser windows") as t_win:
        windows = context_windows(sae_model, store, np.concatenate([stats.top_row, q_rows], axis=1), cfg.window,
                                  cfg.window // 2, cfg.batch_size, dev)
    with timed("browser logit effects") as t_logit:
        lm = load_model(model_cfg, require_complete(model), dev)
        logits = logit_effects(sae_model.W_dec.detach(), lm.W_U.detach(), cfg.n_logit_tokens)
        used = np.unique(np.concatenate([windows.token.reshape(-1), logits[0].reshape(-1), logits[2].reshape(-1)]))
        text = {int(t): lm.tokenizer.decode([int(t)]) for t in used if t >= 0}
        del lm
    begin(out, cfg, [model, acts, sae])
    save_browser_data(out.dir, stats, q_rows, q_acts, windows, logits, text)
    seconds = {"scan": t_scan["seconds"], "windows": t_win["seconds"], "logits": t_logit["seconds"]}
    mark_complete(out, rows_scanned=stats.rows_scanned, alive=int((stats.count > 0).sum()), seconds=seconds)
    logger.info("browser %s: %d rows scanned, %d of %d latents fired", sae_dir.name, stats.rows_scanned,
                int((stats.count > 0).sum()), stats.count.shape[0])


def fact_sources(saes: list[ArtifactRef], evals: dict[str, EvalOutput]) -> list[FactSources]:
    """Where each SAE's per-latent evaluation outputs are (``saes`` in the evaluations' order)."""
    out = [FactSources() for _ in saes]
    if "absorption" in evals:
        for src, r in zip(out, evals["absorption"].per_sae):
            src.absorption = require_complete(r) if r is not None else None
    if "stitching" in evals:
        for r in evals["stitching"].refs:
            if r.stage == "stitching-pair":
                info = json.loads((require_complete(r) / "summary.json").read_text())
                for i in (int(info["small_index"]), int(info["large_index"])):
                    out[i].stitching_pairs.append(r.dir)
    if "probing" in evals:
        for src, r in zip(out, evals["probing"].per_sae):
            src.probing = require_complete(r) if r is not None else None
    if "meta_sae" in evals:
        trains = [r for r in evals["meta_sae"].refs if r.stage == "meta_sae"]
        for src, r in zip(out, trains):
            src.meta_sae = require_complete(r)
    return out


def site_key(index: int, sae: ArtifactRef) -> str:
    info = read_sae_info(require_complete(sae), index)
    k = f"-k{int(info.sparsity)}" if info.sparsity is not None and float(info.sparsity).is_integer() else ""
    return f"sae{index}-{info.architecture}-w{info.width}{k}"


def site_dir(root: str, profile: str) -> Path:
    """``<root>/results/<profile>/browser``: where the site goes."""
    return Path(root) / "results" / profile / SITE


def _site_stamp(browsers: list[ArtifactRef], evals: dict[str, EvalOutput]) -> dict:
    """What the site is made from: the browser artifacts, the evaluations' outputs, code and templates."""
    return {"browsers": [b.fingerprint for b in browsers],
            "evals": {n: [r.fingerprint for r in (o.per_sae + o.refs) if r is not None] for n, o in sorted(evals.items())},
            "code": code_version("saeflow.browser.site", "saeflow.browser.facts"), "templates": [template_version(f"browser/{n}") for n in
                                           ("browser.css", "browser.js", "index.html.j2", "sae.html.j2", "latent.html.j2")]}


def _written_from(folder: Path, stamp: dict) -> bool:
    marker = folder / SITE_JSON
    return marker.is_file() and json.loads(marker.read_text()).get("inputs") == stamp


def site_current(profile: str, browsers: list[ArtifactRef], evals: dict[str, EvalOutput], root: str) -> bool:
    """The profile's site exists and was written from these inputs (:func:`site_task` keeps it)."""
    return _written_from(site_dir(root, profile), _site_stamp(browsers, evals))


@task(name="browser-site")
def site_task(profile: str, saes: list[ArtifactRef], browsers: list[ArtifactRef], evals: dict[str, EvalOutput],
              root: str) -> str:
    """Write (or keep, when its inputs did not change) the profile's latent browser; returns its index path."""
    if len(saes) != len(browsers):
        raise BrowserInputError(f"{len(saes)} SAEs but {len(browsers)} browser artifacts")
    folder = site_dir(root, profile)
    stamp = _site_stamp(browsers, evals)
    if _written_from(folder, stamp):
        return str(folder / "index.html")
    sources = fact_sources(saes, evals)
    with timed("browser site"), gc_paused():
        site = [SiteSAE(key=site_key(i, s), title=_title(read_sae_info(require_complete(s), i)) or site_key(i, s),
                        data_dir=require_complete(b), facts=join(src, i))
                for i, (s, b, src) in enumerate(zip(saes, browsers, sources))]
        index = write_site(folder, site, f"saeflow latent browser: {profile}", sorted(evals))
    files, size = site_size(folder)
    write_json_atomic(folder / SITE_JSON, {"inputs": stamp, "files": files, "bytes": size})
    stage_logger().info("latent browser: %s (%d files, %.1f MB)", index, files, size / 1e6)
    return str(index)


def _title(info) -> str:
    """A site page's SAE title: an imported SAE's name with its architecture and width
    (``gemma-scope-2 L12 16k small (jumprelu, 16,384 latents)``), else the description
    (``topk width=4096 k=32``)."""
    return f"{info.name} ({info.architecture}, {info.width:,} latents)" if info.name else info.description
