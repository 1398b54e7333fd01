"""Sparse probing, normal regime: wall time of saeflow vs the sae-probes package's own runner on the
same cached activations.

Inputs: the quick profile's probing activations (``probing-acts`` artifacts, built through the
pipeline's own stage if absent) for a fixed subset of datasets, and SAEs of the quick family.
Both sides get identical inputs: the activations are written into sae-probes' cache layout
(``model_activations_<model>/<dataset>_<hook>.pt``) and its label / size look-ups are pointed at the
same rows (the quick profile caps each dataset to a balanced 1500-row prefix). Timed:

- sae-probes: ``run_all_baseline_normal(methods=...)`` then ``run_sae_evals(sae, setting="normal",
  reg_type="l1", ks=...)`` per SAE (SAELens ``SAE.load_from_disk``), device cpu;
- saeflow: :func:`saeflow.evals.probing.baseline_rows` and :func:`saeflow.evals.probing.sae_rows` per
  dataset (and per SAE), spread over ``--n-jobs`` processes (one BLAS thread each), each dataset encoded
  once per SAE.

Run: ``.venv/bin/python -m benchmarks.probing [--datasets ...] [--saes 0 5] [--methods logreg pca]``.
Prints ``ratio: <saeflow seconds / sae-probes seconds>`` last (goal <= 0.5).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from benchmarks._common import machine, write_section  # noqa: E402
from saeflow.artifacts import ArtifactRef, default_root  # noqa: E402
from saeflow.config import load_config  # noqa: E402
from saeflow.evals import probing as P  # noqa: E402

DEFAULT_DATASETS = ["5_hist_fig_ismale", "6_hist_fig_isamerican", "7_hist_fig_ispolitician", "87_glue_cola"]


def quick_inputs(profile: str, root: str, datasets: list[str], build: bool = True):
    """``(config, {dataset: probing-acts ref}, [SAE refs of the family])`` for the profile."""
    from tasks import activations, corpus, model, train
    from tasks import probing as TP

    cfg = load_config(profile)
    pc = cfg.probing
    if pc is None:
        raise SystemExit(f"{profile} has no probing: section")
    m = model.ref(cfg.model, root)
    c = corpus.ref(m, cfg.corpus, cfg.model.prepend_bos, root)
    a = activations.ref(m, cfg.model, c, cfg.activations, root)
    saes = train.family_refs(a, cfg.sae_configs(), cfg.train, root)
    missing = [s.path for s in saes if not s.is_complete()]
    if missing:
        raise SystemExit(f"SAEs not trained yet ({missing[:2]}...): run python -m flows.pipeline --config {profile} first")
    acts: dict[str, ArtifactRef] = {}
    for n in datasets:
        kw = dict(model=m, model_cfg=cfg.model, hook=cfg.activations.hook, dataset=n, ood=False,
                  max_rows=pc.max_rows, max_seq_len=pc.max_seq_len, root=root)
        r = TP.acts_ref(**kw)
        if not r.is_complete():
            if not build:
                raise SystemExit(f"no probing activations for {n} at {r.path}")
            r = TP.acts_task.fn(**kw)
        acts[n] = r
    return cfg, acts, saes


def run_ours(acts: dict[str, ArtifactRef], saes: list[ArtifactRef], methods: list[str], ks: list[int], n_jobs: int,
             seed: int = 42):
    from tasks.probing import sae_label

    threads = 1 if n_jobs > 1 else None
    common = dict(ood_dir=None, regimes=("normal",), settings={"normal": [None]}, seed=seed, threads=threads)
    specs = [P.RunSpec(n, r.path, methods=tuple(methods), **common) for n, r in acts.items()]
    specs += [P.RunSpec(n, r.path, sae_dir=s.path, sae_name=sae_label(s), ks={"normal": tuple(ks)}, sae_penalty="l1", **common)
              for s in saes for n, r in acts.items()]

    t0 = time.perf_counter()
    frames = [df for _, df in P.run_parallel(_dispatch, specs, n_jobs)]
    return time.perf_counter() - t0, frames


def _dispatch(spec: P.RunSpec):
    return P.sae_rows(spec) if spec.sae_dir else P.baseline_rows(spec)


def run_reference(acts: dict[str, ArtifactRef], saes: list[ArtifactRef], methods: list[str], ks: list[int], model_name: str,
                  hook: str, seed: int = 42):
    import torch

    import sae_probes.generate_sae_activations as gsa
    import sae_probes.run_baselines as rb
    rse = importlib.import_module("sae_probes.run_sae_evals")  # the package __init__ shadows the name with a function
    import sae_probes.utils_data as ud
    from sae_lens import SAE

    tmp = Path(tempfile.mkdtemp(prefix="bench-probing-"))
    try:
        cache, results = tmp / "cache", tmp / "results"
        labels = {}
        (cache / f"model_activations_{model_name}").mkdir(parents=True)
        for n, r in acts.items():
            X, y = P.load_acts(r.path)
            torch.save(torch.from_numpy(X), cache / f"model_activations_{model_name}" / f"{n}_{hook}.pt")
            labels[n] = y
        # point the package's label / size look-ups at the same (capped) rows
        orig_yvals = ud.get_yvals
        ud.get_yvals = lambda name: labels[name] if name in labels else orig_yvals(name)
        for mod in (rb, rse, gsa):
            for n, y in labels.items():
                mod.DATASET_SIZES[n] = len(y)
        sae_objs = [SAE.load_from_disk(s.path, device="cpu") for s in saes]
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rb.run_all_baseline_normal(model_name=model_name, hook_name=hook, results_path=results, model_cache_path=cache,
                                       methods=methods, datasets=list(acts), device="cpu", seed=seed)
            for i, sae in enumerate(sae_objs):
                rse.run_sae_evals(sae, model_name=model_name, hook_name=hook, reg_type="l1", setting="normal", ks=ks,
                                  results_path=results / f"sae{i}", model_cache_path=cache, datasets=list(acts),
                                  device="cpu", seed=seed)
        seconds = time.perf_counter() - t0
        ud.get_yvals = orig_yvals
        return seconds, results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="configs/quick-evals.yaml", help="a profile with a probing: section")
    ap.add_argument("--artifacts", default=str(default_root()))
    ap.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS)
    ap.add_argument("--saes", type=int, nargs="*", default=[0, 5], help="indices into the family")
    ap.add_argument("--methods", nargs="+", default=["logreg", "pca", "knn", "mlp"])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64, 128])
    ap.add_argument("--n-jobs", type=int, default=2)
    args = ap.parse_args()

    cfg, acts, family = quick_inputs(args.profile, args.artifacts, args.datasets)
    saes = [family[i] for i in args.saes]
    theirs, _ = run_reference(acts, saes, args.methods, args.ks, cfg.model.name, cfg.activations.hook)
    print(f"sae-probes runner: {theirs:.1f} s", flush=True)
    ours, frames = run_ours(acts, saes, args.methods, args.ks, args.n_jobs)
    print(f"saeflow: {ours:.1f} s (n_jobs={args.n_jobs})", flush=True)
    ratio = ours / theirs
    import pandas as pd

    rows = pd.concat(frames)
    write_section("probing", f"""
## Sparse probing, normal regime: saeflow vs the sae-probes runner (`benchmarks/probing.py`)

Command: `.venv/bin/python -m benchmarks.probing {' '.join(sys.argv[1:])}`. Same cached activations
(Gemma 3 270M, {cfg.activations.hook}, the quick profile's balanced 1500-row prefix per dataset)
into both. Datasets: {', '.join(args.datasets)}. Baselines: {', '.join(args.methods)}; SAE probes
(L1, ks {args.ks}) for {len(saes)} SAE(s) of the quick family. sae-probes
{__import__('sae_probes').__version__}: `run_all_baseline_normal` + `run_sae_evals` per SAE. saeflow:
`baseline_rows` / `sae_rows` per dataset (and SAE) over {args.n_jobs} processes.
{len(rows)} result rows. Machine: {machine()}.

| | wall time |
|---|---|
| sae-probes runner | {theirs:.1f} s |
| saeflow | {ours:.1f} s |
| ratio (saeflow / sae-probes) | **{ratio:.2f}** |

Goal: ratio <= 0.5.
""")
    print(f"ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
