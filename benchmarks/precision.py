"""Precision: the same profile run in float32 and in bfloat16, figure by figure (issue #26).

Runs the pipeline on ``--config`` (default ``configs/quick.yaml``) three times into the same
artifacts root (cached stages reused, so the float32 run is free when ``make run`` has run):

- ``float32``: ``model.dtype: float32``, ``train.precision: float32``;
- ``bf16-train``: the float32 activation store, SAE training in bfloat16 (isolates training);
- ``bf16``: model (extraction, CE-loss forwards) and training in bfloat16 (what ``auto`` picks on
  a CPU with native bf16);
- ``bf16-seed1``: ``bf16`` with training seed 1 (its store is bf16's): what a change of training
  trajectory alone moves. Each headline's float32-vs-bf16 difference is printed beside the
  bf16-vs-bf16-seed1 difference, so a reader sees whether precision moves a figure more than a seed
  does. The stated tolerances stay the verdict; the seed spread is information beside it.

With an evaluation profile (``--config configs/quick-evals.yaml``) every evaluation's headline in
the core-metrics table is compared too, against tolerances stated here before any measurement
(``HEADLINES``): absorption mean fraction and full-absorption rate 0.05 (issue #25's agreement
tolerance with SAEBench), meta-SAE FVE 0.02, probing mean AUCs 0.01 (the probing agreement
tolerance), stitching novel fraction 0.05. A bf16-trained SAE is another training trajectory, not
the float32 SAE rounded, so these differences include what any change of trajectory (a seed) moves.

Each variant gets its own profile name (``<name>-<variant>``) so its results table does not
replace another's. Per family member: L0, explained variance, CE loss score, dead and dense
fractions, and the differences against float32; stage wall times from the run summary. Tolerance
(issue #26): EV and CE loss score within 0.003 absolute. Writes the ``precision`` section of
docs/benchmarks.md and ends with ``max |EV diff| X, max |CE loss score diff| Y (tolerance 0.003)``.

Run: ``.venv/bin/python -m benchmarks.precision [--config configs/quick.yaml]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

VARIANTS = {
    "float32": {"model": {"dtype": "float32"}, "train": {"precision": "float32"}},
    "bf16-train": {"model": {"dtype": "float32"}, "train": {"precision": "bfloat16"}},
    "bf16": {"model": {"dtype": "bfloat16"}, "train": {"precision": "bfloat16"}},
    # the bf16 profile with another training seed: the spread of one trajectory change with the
    # precision held fixed, against which the float32-vs-bf16 differences are read
    "bf16-seed1": {"model": {"dtype": "bfloat16"}, "train": {"precision": "bfloat16", "seed": 1}},
}
COLS = ["l0", "explained_variance", "ce_loss_score", "frac_dead", "frac_dense"]
TOL = 0.003
# every evaluation's headline column in core_metrics.parquet -> its stated tolerance (docstring)
HEADLINES = {
    "absorption_mean_fraction": 0.05, "absorption_mean_full": 0.05,
    "meta_sae_fve": 0.02,
    "probing_normal_auc": 0.01, "probing_scarcity_auc": 0.01, "probing_imbalance_auc": 0.01,
    "probing_noise_auc": 0.01, "probing_ood_auc": 0.01,
    "stitching_novel_fraction": 0.05,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quick.yaml")
    ap.add_argument("--artifacts", default=None)
    ap.add_argument("--variants", nargs="+", default=["float32", "bf16-train", "bf16"], choices=list(VARIANTS))
    ap.add_argument("--from-tables", action="store_true",
                    help="compare the variants' existing results tables (results/<profile>-<variant>/core_metrics.parquet) "
                         "without running the pipeline, e.g. after a run whose tables were written but whose report failed")
    args = ap.parse_args(argv)
    from benchmarks._common import machine, write_section
    from flows.pipeline import pipeline
    from flows.runner import load_profile, resolve_root

    root = str(resolve_root(args.artifacts))
    base = load_profile(args.config)
    tables, walls, stage_times = {}, {}, {}
    for v in args.variants:
        name = base.name if v == "float32" else f"{base.name}-{v}"
        cfg = load_profile(args.config, {**VARIANTS[v], "name": name})
        table = Path(root) / "results" / name / "core_metrics.parquet"
        if args.from_tables:
            if not table.is_file():
                print(f"error: --from-tables: {table} does not exist; run without --from-tables", file=sys.stderr)
                return 1
            walls[v], stage_times[v] = float("nan"), "not run (existing table)"
        else:
            t0 = time.perf_counter()
            summary = pipeline(cfg, root)
            walls[v] = time.perf_counter() - t0
            stage_times[v] = {k: (round(t.seconds), t.cached) for k, t in summary.timings.items()
                              if k in ("activations", "train")}
        tables[v] = pd.read_parquet(table).set_index("sae")
        print(f"{v}: {walls[v]:.0f} s, stages {stage_times[v]}", flush=True)

    ref = tables["float32"] if "float32" in tables else None
    rows = []
    for v, t in tables.items():
        for sae, r in t.iterrows():
            row = {"variant": v, "sae": sae, **{c: float(r[c]) for c in COLS}}
            if ref is not None and v != "float32":
                row["d_ev"] = float(r["explained_variance"] - ref.loc[sae, "explained_variance"])
                row["d_ce"] = float(r["ce_loss_score"] - ref.loc[sae, "ce_loss_score"])
                row["d_dead"] = float(r["frac_dead"] - ref.loc[sae, "frac_dead"])
            rows.append(row)
    df = pd.DataFrame(rows)
    # evaluation headlines (present only when the profile runs the evaluations)
    heads = [c for c in HEADLINES if ref is not None and c in ref.columns and ref[c].notna().any()]
    hrows = []
    for v, t in tables.items():
        if v == "float32":
            continue
        for sae, r in t.iterrows():
            for c in heads:
                a, b = float(ref.loc[sae, c]), float(r[c])
                if a != a and b != b:  # not computed for this SAE (e.g. stitching on the largest width)
                    continue
                hrows.append({"variant": v, "sae": sae, "headline": c, "float32": a, "value": b, "diff": b - a,
                              "tolerance": HEADLINES[c], "within": abs(b - a) <= HEADLINES[c]})
    hdf = pd.DataFrame(hrows)
    if len(hdf) and {"bf16", "bf16-seed1"} <= set(tables):
        # the seed spread beside each precision difference: |bf16 - bf16-seed1| for the same SAE and headline
        seed = tables["bf16-seed1"]
        hdf["seed_spread"] = [abs(float(seed.loc[s_, c]) - float(tables["bf16"].loc[s_, c]))
                              for s_, c in zip(hdf["sae"], hdf["headline"])]
        prec = hdf[hdf["variant"] == "bf16"]
        n_seed = int((prec["diff"].abs() <= prec["seed_spread"]).sum())
        seed_line = (f"bf16 vs float32 differences no larger than the seed spread (bf16 vs bf16-seed1, same headline "
                     f"and SAE): {n_seed}/{len(prec)}")
    else:
        seed_line = ""
    n_within = int(hdf["within"].sum()) if len(hdf) else 0
    others = df[df["variant"] != "float32"]
    max_ev = float(others["d_ev"].abs().max()) if "d_ev" in others else float("nan")
    max_ce = float(others["d_ce"].abs().max()) if "d_ce" in others else float("nan")
    per = {v: (float(df.loc[df.variant == v, "d_ev"].abs().max()), float(df.loc[df.variant == v, "d_ce"].abs().max()))
           for v in tables if v != "float32" and "d_ev" in df}
    if args.from_tables:
        runs = ("Tables read from earlier runs' results (`--from-tables`, nothing run): "
                + ", ".join(f"`results/{base.name if v == 'float32' else base.name + '-' + v}`" for v in tables) + ".")
    else:
        runs = ("Pipeline wall time per variant (cached stages reused; float32 was cached when `make run` had run): "
                + ", ".join(f"{v} {walls[v]:.0f} s (activations, train: {stage_times[v]})" for v in tables) + ".")
    body = f"""
## Precision: float32 against bfloat16 on one profile (`benchmarks/precision.py`)

Command: `.venv/bin/python -m benchmarks.precision {' '.join(sys.argv[1:])}`. Machine: {machine()}.
Profile `{args.config}`; variants: float32 (model and training), bf16-train (float32 store, bf16 training), bf16 (model and
training in bf16), bf16-seed1 (bf16 with training seed 1). {runs}

{df.to_markdown(index=False, floatfmt=".4f")}

Largest differences against float32 (tolerance {TOL} absolute on EV and CE loss score):
{'; '.join(f'{v}: |EV| {e:.4f}, |CE loss score| {c:.4f}' for v, (e, c) in per.items())}.
"""
    if len(hdf):
        body += f"""
Evaluation headlines against float32 (tolerances stated in the benchmark before measuring; a bf16-trained SAE is a
different training trajectory, so a difference includes what a seed change would move): **{n_within}/{len(hdf)}**
within tolerance.

{hdf.to_markdown(index=False, floatfmt=".4f")}
"""
        if seed_line:
            body += f"""
`seed_spread`: |bf16 - bf16-seed1| for the same SAE and headline (two bf16 trajectories that differ only in the training
seed). {seed_line}.
"""
    write_section("precision" + ("" if base.name == "quick" else f"-{base.name}"), body)
    print(body)
    if len(hdf):
        print(f"evaluation headlines within tolerance: {n_within}/{len(hdf)}")
        if seed_line:
            print(seed_line)
    print(f"max |EV diff| {max_ev:.4f}, max |CE loss score diff| {max_ce:.4f} (tolerance {TOL})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
