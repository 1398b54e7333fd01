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
"""

from __future__ import annotations

import argparse
import importlib
import sys
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="configs/quick-evals.yaml")
    ap.add_argument("--artifacts", default=str(default_root()))
    ap.add_argument("--datasets", nargs="+", default=DATASETS)
    ap.add_argument("--sae", type=int, default=0, help="index of the family member used for the SAE probe")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 16, 128])
    args = ap.parse_args()

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
