"""Agreement with sae-probes on real activations: normal-regime test AUCs of logistic regression and
of the SAE top-k probe, and the split indices, saeflow vs the package's own functions.

The same numpy arrays go to both sides: the quick profile's cached probing activations (Gemma 3
270M, the profile's hook, a balanced 1500-row prefix per dataset) and, for the SAE probe, those
activations encoded once by one SAE of the quick family. sae-probes side: ``get_train_test_indices``
(split), ``find_best_reg`` (L2, the logreg baseline), ``get_sorted_indices`` with
``mean_act_normalization`` then ``find_best_reg`` (L1) on the top-k latents (what ``run_sae_eval``
does after encoding). saeflow side: :func:`saeflow.evals.probing.make_split`, :func:`fit_logreg`,
:func:`sae_probe`.

Run: ``.venv/bin/python -m benchmarks.probing_agreement [--sae 0] [--ks 1 16 128]``; prints one
line per dataset and ``max_abs_diff: <x>`` last (acceptance: < 0.01, identical splits).

``--end-to-end`` (issue #25): no shared arrays; each side starts from the model, the dataset, the SAE
folder and the profile, for one dataset (default ``5_hist_fig_ismale``) and one SAE (default the
quick family's ``99f898965cec8dda``, topk width 4096 k 32). sae-probes (its venv, subprocess): the model
as ``HookedTransformer.from_pretrained_no_processing`` on the profile's fp32 copy, its own
``generate_single_dataset_activations`` (last-token activations), ``run_sae_eval`` (normal regime, L1,
the profile's ``ks_normal``; ``sae_lens.SAE.load_from_disk`` + its ``sae.encode``) and
``run_baseline_dataset_layer`` (logreg). Its dataset reader is given the profile's ``max_rows`` rows
(the first ``max_rows // 2`` of each class, our documented deviation; sae-probes itself keeps the first
1500 rows) and its dataset size table that row count; nothing else is patched. saeflow: the profile's
``probing-acts``, ``probing-baselines`` and ``probing-sae`` stage bodies (:mod:`tasks.probing`) into a
temporary root, normal regime and logreg only. Prints the AUCs, the activations' max |difference| and
``e2e max |AUC difference|: ...`` last; writes the ``probing_e2e`` section.
Run: ``.venv/bin/python -m benchmarks.probing_agreement --end-to-end [--dataset 5_hist_fig_ismale]
[--sae-fp 99f898965cec8dda] [--artifacts /work/main/artifacts]``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks._common import machine, write_section  # noqa: E402
from benchmarks.probing import quick_inputs  # noqa: E402
from saeflow.artifacts import default_root  # noqa: E402
from saeflow.evals import probing as P  # noqa: E402
from saeflow.evals.common import encode_rows  # noqa: E402

DATASETS = ["5_hist_fig_ismale", "6_hist_fig_isamerican", "7_hist_fig_ispolitician", "87_glue_cola", "66_living-room",
            "22_headline_isobama", "105_click_bait", "92_glue_sst2", "114_nyc_borough_Manhattan",
            "155_athlete_sport_basketball"]


SBVENV_PYTHON = "/work/sbvenv/bin/python"

#: The sae-probes half of ``--end-to-end`` (run in its venv): argv[1] is a JSON spec.
SAE_PROBES_E2E_SCRIPT = r"""
import glob, importlib, json, sys, time
from pathlib import Path
import numpy as np, torch
from sklearn.preprocessing import LabelEncoder
spec = json.loads(Path(sys.argv[1]).read_text())
work, ds, hook, name = Path(spec["work"]), spec["dataset"], spec["hook"], spec["model_name"]
import sae_probes.utils_data as ud
import sae_probes.generate_model_activations as gma
import sae_probes.generate_sae_activations as gsa
import sae_probes.run_baselines as rb
rse = importlib.import_module("sae_probes.run_sae_evals")
full = ud.read_numbered_dataset_df(ds)  # its own reader; then the profile's row cap (first max_rows // 2 per class)
y = LabelEncoder().fit_transform(full["target"].values)
keep = np.sort(np.concatenate([np.flatnonzero(y == c)[: spec["max_rows"] // 2] for c in (0, 1)]))
sub = full.iloc[keep].reset_index(drop=True)
ud.read_dataset_df = lambda tag: sub
gsa.DATASET_SIZES[ds] = rb.DATASET_SIZES[ds] = len(sub)
csv = work / "cleaned_data" / f"{ds}.csv.zst"
csv.parent.mkdir(parents=True, exist_ok=True)
sub.to_csv(csv, index=False, compression="zstd")
from transformer_lens import HookedTransformer
from transformers import AutoModelForCausalLM, AutoTokenizer
hf = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(spec["model_dir"])
model = HookedTransformer.from_pretrained_no_processing("google/gemma-3-270m", hf_model=hf, tokenizer=tok, device="cpu",
                                                        dtype=torch.float32)
t0 = time.time()
gma.generate_single_dataset_activations(model, name, csv, [hook], work, device="cpu", max_seq_len=spec["max_seq_len"])
acts_s = time.time() - t0
from sae_lens import SAE
sae = SAE.load_from_disk(spec["sae"], device="cpu")
t0 = time.time()
rse.run_sae_eval(sae, ds, hook, "l1", "normal", name, work, ks=spec["ks"], device="cpu", results_path=work / "results",
                 seed=spec["seed"])
rb.run_baseline_dataset_layer(hook, ds, "logreg", name, work, results_path=work / "results", seed=spec["seed"])
probe_s = time.time() - t0
res = {"acts_s": acts_s, "probe_s": probe_s, "acts": str(work / f"model_activations_{name}" / f"{ds}_{hook}.pt"),
       "labels": [int(v) for v in LabelEncoder().fit_transform(sub["target"].values)], "sae": {}, "logreg": None}
for f in glob.glob(str(work / "results" / "**" / "*.json"), recursive=True):
    for m in json.load(open(f)):
        if "k" in m:
            res["sae"][str(m["k"])] = m["test_auc"]
        else:
            res["logreg"] = m["test_auc"]
print("RESULT " + json.dumps(res))
"""


def end_to_end(args: argparse.Namespace) -> None:
    """Both sides from the model, the dataset, the SAE folder and the profile (see the module docstring)."""
    import pandas as pd
    import torch
    from prefect.logging import disable_run_logger

    from saeflow.artifacts import artifact_ref, require_complete
    from saeflow.config import load_config
    from tasks import model as tmodel
    from tasks import probing as TP

    cfg = load_config(args.profile)
    pc, ds, hook = cfg.probing, args.dataset, cfg.activations.hook
    m = tmodel.ref(cfg.model, args.artifacts)
    sae_ref = artifact_ref(args.artifacts, "train", args.sae_fp)
    label = TP.sae_label(sae_ref)
    pcn = pc.model_copy(update={"regimes": ("normal",), "methods": ("logreg",), "n_jobs": 1})
    with tempfile.TemporaryDirectory(prefix="e2e-probing-", dir="/tmp") as tmp:
        spec = {"work": str(Path(tmp) / "sae_probes"), "dataset": ds, "hook": hook, "model_name": cfg.model.name,
                "model_dir": str(require_complete(m)), "sae": str(require_complete(sae_ref)), "max_rows": pc.max_rows,
                "max_seq_len": pc.max_seq_len, "ks": list(pc.ks_normal), "seed": pc.seed}
        Path(spec["work"]).mkdir()
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        print(f"SAE {label} ({args.sae_fp}), dataset {ds}, max_rows {pc.max_rows}, max_seq_len {pc.max_seq_len}, hook {hook}",
              flush=True)
        proc = subprocess.Popen([SBVENV_PYTHON, "-c", SAE_PROBES_E2E_SCRIPT, str(spec_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        torch.set_num_threads(1)
        root = str(Path(tmp) / "artifacts")
        t0 = time.perf_counter()
        with disable_run_logger(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            acts = TP.acts_task.fn(model=m, model_cfg=cfg.model, hook=hook, dataset=ds, ood=False, max_rows=pc.max_rows,
                                   max_seq_len=pc.max_seq_len, root=root, device="cpu")
            acts_s = time.perf_counter() - t0
            base = TP.baselines_task.fn(acts={ds: acts}, ood={}, cfg=pcn, root=root)
            per = TP.sae_task.fn(sae=sae_ref, acts={ds: acts}, ood={}, cfg=pcn, root=root)
        ours_s = time.perf_counter() - t0
        X, y = P.load_acts(acts.path)
        rows = pd.concat([pd.read_parquet(Path(base.path) / "rows.parquet"), pd.read_parquet(Path(per.path) / "rows.parquet")])
        rows = rows[rows["regime"] == "normal"]
        ours = {"logreg": float(rows.loc[rows["method"] == "logreg", "test_auc"].iloc[0])}
        for k in pc.ks_normal:
            ours[f"k{k}"] = float(rows.loc[(rows["method"] == P.SAE_METHOD) & (rows["k"] == k), "test_auc"].iloc[0])
        print(f"saeflow stages: {ours} ({acts_s:.1f} s activations, {ours_s:.1f} s total)", flush=True)
        out, err = proc.communicate()
        line = [x for x in out.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            raise SystemExit(f"sae-probes half failed (rc {proc.returncode}):\n{err[-4000:]}")
        sb = json.loads(line[-1][len("RESULT "):])
        X_ref = torch.load(sb["acts"], weights_only=True).float().numpy()
    theirs = {"logreg": sb["logreg"], **{f"k{k}": sb["sae"][str(k)] for k in pc.ks_normal}}
    same_labels = bool(np.array_equal(np.asarray(sb["labels"]), y))
    adiff = np.abs(X - X_ref)
    rel = float(np.linalg.norm(X - X_ref) / np.linalg.norm(X_ref))
    row_rel = np.linalg.norm(X - X_ref, axis=1) / np.linalg.norm(X_ref, axis=1)
    diffs = {k: abs(ours[k] - theirs[k]) for k in ours}
    worst = max(diffs.values())
    print(f"sae-probes: {theirs} ({sb['acts_s']:.1f} s activations, {sb['probe_s']:.1f} s probes)")
    print(f"activations {X.shape} vs {X_ref.shape}, labels identical: {same_labels}; max |diff| {adiff.max():.3g} "
          f"(max |act| {np.abs(X_ref).max():.3g}), relative Frobenius error {rel:.3g}, worst row {row_rel.max():.3g}")
    cells = " | ".join(f"{theirs[k]:.4f} / {ours[k]:.4f}" for k in ours)
    write_section("probing_e2e", f"""
## Sparse probing end to end vs sae-probes (`benchmarks/probing_agreement.py --end-to-end`)

Command: `.venv/bin/python -m benchmarks.probing_agreement {' '.join(sys.argv[1:])}`. No shared arrays: dataset
`{ds}` ({len(y)} rows: the profile's `max_rows` {pc.max_rows}, first {pc.max_rows // 2} per class), SAE `{label}`
(`{args.sae_fp}`), model Gemma 3 270M from the profile's fp32 copy, hook `{hook}`, max_seq_len {pc.max_seq_len}, normal
regime, seed {pc.seed}. sae-probes (its venv, subprocess, 1 thread): `HookedTransformer.from_pretrained_no_processing`
on that copy, `generate_single_dataset_activations`, `run_sae_eval` (L1, mean normalisation, `SAE.load_from_disk` +
`sae.encode`), `run_baseline_dataset_layer` (logreg); its dataset reader and size table were given the profile's rows,
nothing else patched. saeflow: `tasks.probing` `acts_task`, `baselines_task`, `sae_task` bodies with `{args.profile}`'s
`probing:` config (normal regime, logreg only) into a temporary root, in parallel (1 thread). Machine: {machine()}.

| test AUC (sae-probes / saeflow) | {' | '.join(ours)} |
|---|{'---|' * len(ours)}
| {ds} | {cells} |

Activations ({X.shape[0]} x {X.shape[1]}, labels identical: {'yes' if same_labels else '**no**'}): max |difference|
{adiff.max():.3g} (largest |activation| {np.abs(X_ref).max():.3g}), relative Frobenius error {rel:.3g}, worst row
{row_rel.max():.3g}. Times: saeflow {acts_s:.0f} s activations / {ours_s:.0f} s in all; sae-probes {sb['acts_s']:.0f} s
activations / {sb['probe_s']:.0f} s probes (other jobs were running). Largest AUC difference: **{worst:.2e}**.
""")
    print(f"e2e max |AUC difference|: {worst:.3e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="configs/quick-evals.yaml")
    ap.add_argument("--artifacts", default=str(default_root()))
    ap.add_argument("--datasets", nargs="+", default=DATASETS)
    ap.add_argument("--sae", type=int, default=0, help="index of the family member used for the SAE probe")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 16, 128])
    ap.add_argument("--end-to-end", action="store_true",
                    help="each side from the model, dataset, SAE folder and profile (one dataset, one SAE)")
    ap.add_argument("--dataset", default="5_hist_fig_ismale", help="dataset for --end-to-end")
    ap.add_argument("--sae-fp", default="99f898965cec8dda", help="train fingerprint of the SAE for --end-to-end")
    args = ap.parse_args()
    if args.end_to_end:
        end_to_end(args)
        return

    import torch
    from threadpoolctl import threadpool_limits

    rse = importlib.import_module("sae_probes.run_sae_evals")  # the package __init__ shadows the name with a function
    import sae_probes.utils_data as ud
    import sae_probes.utils_training as ut
    from saeflow.saes import load_sae
    from tasks.probing import sae_label

    cfg, acts, family = quick_inputs(args.profile, args.artifacts, args.datasets)
    sae_ref = family[args.sae]
    sae = load_sae(Path(sae_ref.path), device="cpu")
    rows, worst = [], 0.0
    t0 = time.perf_counter()
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")
        for name, ref in acts.items():
            X, y = P.load_acts(ref.path)
            sp = P.make_split("normal", None, y, seed=42)
            n_train = P.normal_num_train(len(y))
            tr, te = ud.get_train_test_indices(y, n_train, len(y) - n_train - 1, 0.5, 42)
            same = bool(np.array_equal(tr, sp.train) and np.array_equal(te, sp.test))
            theirs = ut.find_best_reg(X[tr], y[tr], X[te], y[te], penalty="l2", seed=42).metrics.test_auc
            ours = P.fit_logreg(X[sp.train], sp.y_train, X[sp.test], sp.y_test, "l2", 42)["test_auc"]
            F = encode_rows(sae, X, P.ENCODE_BATCH).numpy()
            Ftr, Fte = torch.from_numpy(F[tr]), torch.from_numpy(F[te])
            order = rse.get_sorted_indices(Ftr, torch.from_numpy(y[tr]), rse.mean_act_normalization)
            ours_sae = dict(P.sae_probe(F[sp.train], sp.y_train, F[sp.test], sp.y_test, args.ks, "l1", 42))
            diffs = {"logreg": abs(theirs - ours)}
            cells = [f"{theirs:.4f} / {ours:.4f}"]
            for k in args.ks:
                t = ut.find_best_reg(Ftr[:, order[:k]], torch.from_numpy(y[tr]), Fte[:, order[:k]], torch.from_numpy(y[te]),
                                     penalty="l1", seed=42).metrics.test_auc
                o = ours_sae[k]["test_auc"]  # type: ignore[index]
                diffs[f"k{k}"] = abs(t - o)
                cells.append(f"{t:.4f} / {o:.4f}")
            worst = max(worst, *diffs.values())
            rows.append(f"| {name} | {'yes' if same else '**no**'} | " + " | ".join(cells) + f" | {max(diffs.values()):.2e} |")
            print(name, "splits identical" if same else "SPLITS DIFFER", {k: f"{v:.2e}" for k, v in diffs.items()}, flush=True)
    seconds = time.perf_counter() - t0
    head = "| dataset | same split | logreg (sae-probes / saeflow) | " + " | ".join(f"SAE k={k}" for k in args.ks) + " | max abs diff |"
    write_section("probing_agreement", f"""
## Sparse probing agreement with sae-probes (`benchmarks/probing_agreement.py`)

Command: `.venv/bin/python -m benchmarks.probing_agreement {' '.join(sys.argv[1:])}` ({seconds:.0f} s). Normal
regime, seed 42, test AUC; identical arrays into both (Gemma 3 270M {cfg.activations.hook}, balanced
1500-row prefix per dataset; SAE {sae_label(sae_ref)} of the quick family, L1 probes on the top-k latents
ranked with the package-default mean normalisation). Machine: {machine()}.

{head}
|{'---|' * (4 + len(args.ks))}
{chr(10).join(rows)}

Largest difference: **{worst:.2e}** (acceptance: < 0.01 on every dataset, identical split indices).
""")
    print(f"max_abs_diff: {worst:.3e}")


if __name__ == "__main__":
    main()
