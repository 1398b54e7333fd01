"""Cost of the latent browser stage against the core-metrics stage, per SAE of a profile's family.

For every SAE of the profile (``configs/quick-evals.yaml`` by default, whose core stages and
evaluations must be complete in the artifacts root) this runs, in one process and one after the
other on the same SAE:

* the ``browser`` stage body (:func:`tasks.browser.browser_task`: scan, token windows, logit
  effects, writing ``latents.npz``) into a temporary root, timed, with its parts;
* the ``metrics`` stage body (:func:`tasks.metrics.metrics_task`: reconstruction metrics on the
  held-out rows and the CE / KL forwards; the clean / ablated reference is shared by the family, as
  in the pipeline's process) into the same temporary root, timed.

The browser artifacts are then copied into the artifacts root (``browser/<fingerprint>/``, only
when missing there) and the site is built into ``results/<profile>/browser/`` from the evaluations'
artifacts (read through the evaluation subflows' own code, every stage already complete: nothing is
recomputed or rewritten). Prints the table and writes it into docs/benchmarks.md (section
``browser``) unless ``--no-write``; ``--screenshot PATH`` saves a 1280x800 headless-Chromium
screenshot of one latent page (``--shot-sae``, ``--shot-latent``).

Run (about 5 minutes for the quick family on 2 CPU cores)::

    .venv/bin/python benchmarks/browser.py --artifacts /path/to/artifacts --screenshot docs/browser_screenshot.png
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import REPO, machine, write_section  # noqa: E402
from flows.evals import absorption, meta_sae, probing, stitching  # noqa: E402
from flows.extract import expected_activations  # noqa: E402
from flows.runner import load_profile, resolve_root  # noqa: E402
from saeflow.artifacts import artifact_ref, completion_meta  # noqa: E402
from saeflow.browser.site import site_size  # noqa: E402
from tasks import browser, corpus, metrics, model, train  # noqa: E402
from tasks.common import EvalContext, EvalOutput  # noqa: E402

EVALS = {"absorption": absorption, "stitching": stitching, "meta_sae": meta_sae, "probing": probing}


def body(stage_task):
    """The undecorated body ``(out, ...)`` of a :func:`tasks.common.stage_task`."""
    return stage_task.fn.__wrapped__


def eval_outputs(config, root: str, m, v, c, a, saes) -> dict[str, EvalOutput]:
    """Each enabled evaluation's :class:`EvalOutput`, by running its subflow's code with every stage
    called directly: the stages are complete, so each returns its reference and computes nothing."""

    def stage(name, ref_fn, task_fn, **kw):
        ref = ref_fn(**kw, root=root)
        if not ref.is_complete():
            raise SystemExit(f"{name} is not complete at {ref.path}: run `saeflow run --config ...` for the profile first")
        return ref

    ctx = EvalContext(config=config, root=root, model=m, vocab=v, corpus=c, acts=a, saes=saes, stage=stage, device="cpu")
    return {name: module.flow.fn(ctx) for name, module in EVALS.items() if getattr(config, name) is not None}


def findings(data_dir: Path, facts: dict, pairs: list[Path], me: int) -> list[str]:
    """What the browser data of one SAE say, as numbers: how token-specific its latents' top
    contexts are (share of the top contexts whose firing token, lowercased and stripped, is the
    latent's most common one), per stitching class, and whether absorbing latents fire on words
    starting with the letter they absorb."""
    from collections import Counter

    import numpy as np
    import pandas as pd

    d = dict(np.load(data_dir / "latents.npz"))
    text = json.loads((data_dir / "tokens.json").read_text())
    c = int(d["window_center"])

    def firing(j: int) -> list[str]:
        return [text.get(str(int(d["window_token"][j, s, c])), "?").strip().lower()
                for s in range(d["top_row"].shape[1]) if d["top_row"][j, s] >= 0]

    tops = [firing(j) for j in range(d["count"].shape[0])]
    spec = np.array([Counter(t).most_common(1)[0][1] / len(t) if t else np.nan for t in tops])
    out = [f"alive latents: median token specificity {np.nanmedian(spec):.2f}, "
           f"{np.nanmean(spec[~np.isnan(spec)] >= 0.5):.0%} have >= half their top contexts on one token"]
    for pair in pairs:
        info = json.loads((pair / "summary.json").read_text())
        if int(info["large_index"]) != me:
            continue
        lat = pd.read_parquet(pair / "latents.parquet")
        for cls, g in lat.groupby("class"):
            j = g["latent"].to_numpy()
            out.append(f"{cls} vs {info['small']}: {len(j)} latents, median specificity {np.nanmedian(spec[j]):.2f}, "
                       f"median frequency {np.median(d['count'][j] / int(d['rows_scanned'])):.2e}")
    share, base = [], []
    absorbs = {j for j, fs in facts.items() if any(f.tag.startswith("absorbs:") for f in fs)}
    others = [t for k, t in enumerate(tops) if t and k not in absorbs]
    first = {}
    for j, fs in facts.items():
        letters = frozenset(f.tag.split(":")[1] for f in fs if f.tag.startswith("absorbs:"))
        if letters and tops[j]:
            share.append(np.mean([t[:1] in letters for t in tops[j]]))
            if letters not in first:
                first[letters] = np.mean([np.mean([x[:1] in letters for x in t]) for t in others])
            base.append(first[letters])
    if share:
        out.append(f"absorbing latents: {len(share)}; on average {np.mean(share):.0%} of their top contexts fire on a "
                   f"token starting with the absorbed letter (latents absorbing no letter, same letters: {np.mean(base):.0%})")
    return out


def screenshot(url: str, path: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", "--window-size=1280,800", "--virtual-time-budget=8000",
                        f"--screenshot={path}", url], capture_output=True, text=True, timeout=300)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "quick-evals.yaml"))
    ap.add_argument("--artifacts", default=None, help="artifacts root holding the profile's complete run")
    ap.add_argument("--max-rows", type=int, default=None, help="override browser.max_rows")
    ap.add_argument("--only", type=int, default=None, help="measure only this SAE (index in the family)")
    ap.add_argument("--profile-cpu", action="store_true", help="cProfile the browser stage; print the top functions")
    ap.add_argument("--screenshot", default=None, help="save a screenshot of one latent page to this PNG")
    ap.add_argument("--shot-sae", type=int, default=-1, help="SAE of the screenshot (index; default the last)")
    ap.add_argument("--shot-latent", type=int, default=None, help="latent of the screenshot (default: the first "
                                                                  "latent with an absorption fact)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--site-only", action="store_true", help="measure nothing: build the site from the complete "
                                                             "browser artifacts, print the findings")
    args = ap.parse_args(argv)
    overrides = {"browser": {"max_rows": args.max_rows}} if args.max_rows else None
    config = load_profile(args.config, overrides)
    if config.browser is None:
        raise SystemExit(f"{args.config} has no browser: section")
    root = resolve_root(args.artifacts)
    a = expected_activations(config, root)
    m = model.ref(cfg=config.model, root=root)
    c = corpus.ref(model=m, cfg=config.corpus, prepend_bos=config.model.prepend_bos, root=root)
    from tasks import vocab

    v = vocab.ref(model=m, cfg=config.vocab, root=root)
    saes = train.family_refs(acts=a, members=config.sae_configs(), train_cfg=config.train, root=root)
    missing = [r.path for r in [m, c, a, *saes] if not r.is_complete()]
    if missing:
        raise SystemExit(f"not complete in {root}: {missing}; run the profile first")
    rows, brs = [], []
    with tempfile.TemporaryDirectory(prefix="browser-bench-") as tmp:
        for i, sae in enumerate(saes):
            kw = dict(model=m, model_cfg=config.model, acts=a, sae=sae, cfg=config.browser, device="cpu")
            target = browser.ref(**kw, root=root)
            brs.append(target)
            if (args.only is not None and i != args.only) or args.site_only:
                continue
            out = browser.ref(**kw, root=tmp)
            prof = cProfile.Profile() if args.profile_cpu else None
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            body(browser.browser_task)(out, **kw, root=tmp)
            if prof:
                prof.disable()
                pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
            t_browser = time.perf_counter() - t0
            mout = metrics.ref(model=m, model_cfg=config.model, corpus=c, acts=a, sae=sae, cfg=config.metrics, root=tmp)
            t0 = time.perf_counter()
            body(metrics.metrics_task)(mout, model=m, model_cfg=config.model, corpus=c, acts=a, sae=sae,
                                       cfg=config.metrics, root=tmp, device="cpu")
            t_metrics = time.perf_counter() - t0
            meta = completion_meta(out.dir)
            info = json.loads((sae.dir / "cfg.json").read_text())
            rows.append({"sae": f"topk w={info['d_sae']} k={info.get('k', '?')}", "rows": meta["rows_scanned"],
                         "alive": meta["alive"], **{k: v for k, v in meta["seconds"].items()},
                         "browser": t_browser, "metrics": t_metrics})
            print(json.dumps(rows[-1]), flush=True)
            if not target.is_complete():
                shutil.copytree(out.dir, target.dir, dirs_exist_ok=True)
    if args.only is None:
        evals = eval_outputs(config, root, m, v, c, a, saes)
        t0 = time.perf_counter()
        index = Path(browser.site_task.fn(config.name, saes, brs, evals, root))
        t_site = time.perf_counter() - t0
        files, size = site_size(index.parent)
        print(f"site: {index} ({files} files, {size / 1e6:.1f} MB, {t_site:.1f} s)")
        if args.screenshot:
            from saeflow.browser import join

            k = args.shot_sae % len(saes)
            facts = join(browser.fact_sources(saes, evals)[k], k)
            latent = args.shot_latent
            if latent is None:
                latent = min(j for j, fs in facts.items() if any(f.evaluation == "absorption" for f in fs))
            key = browser.site_key(k, saes[k])
            screenshot((index.parent / key / "latent.html").resolve().as_uri() + f"#{latent}", Path(args.screenshot))
            print(f"screenshot: {args.screenshot} ({key} latent {latent})")
        k = len(saes) - 1
        sources = browser.fact_sources(saes, evals)[k]
        from saeflow.browser import join as join_facts

        found = findings(brs[k].dir, join_facts(sources, k), sources.stitching_pairs, k)
        print("\n".join([f"findings ({browser.site_key(k, saes[k])}):", *found]))
    if not rows:
        return 0
    tb, tm = sum(r["browser"] for r in rows), sum(r["metrics"] for r in rows)
    lines = ["| SAE | rows scanned | latents fired | scan s | windows s | logits s | browser s | core metrics s | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['sae']} | {r['rows']:,} | {r['alive']:,} | {r['scan']:.1f} | {r['windows']:.1f} | "
                     f"{r['logits']:.1f} | {r['browser']:.1f} | {r['metrics']:.1f} | {r['browser'] / r['metrics']:.2f} |")
    lines.append(f"| **family** | | | | | | {tb:.1f} | {tm:.1f} | {tb / tm:.2f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write and args.only is None and not args.site_only:
        site_line = (f"Site: {files:,} files, {size / 1e6:.1f} MB, written in {t_site:.1f} s. Findings on the widest "
                     "SAE: " + "; ".join(found) + ".\n\n")
        write_section("browser", f"## Latent browser stage vs core metrics ({config.name})\n\n"
                                 f"`benchmarks/browser.py` ({machine()}); browser config: "
                                 f"`{config.browser.model_dump(mode='json')}`. Seconds per SAE, each stage body run "
                                 f"once in the same process (the metrics' clean/ablated CE reference is built "
                                 f"by the first SAE and shared, as in the pipeline; the first SAE's browser loads the model, which "
                                 f"the later stages reuse).\n\n{site_line}{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
