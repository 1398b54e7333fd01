"""One SAE's absorption (SPEC 1.4-1.6) on the shared probe data: :func:`evaluate_sae`, its summary
and example absorptions."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from saeflow.evals.absorption.probes import CONVERGENCE_TOL, Convergence, feature_splits, k_sparse_probing, train_linear_probe
from saeflow.evals.absorption.projection import EPS, ProjectionThresholds, projection_absorption
from saeflow.evals.absorption.prompts import LETTERS
from saeflow.evals.common import encode_latents, latent_columns, latent_rows

#: Rows per SAE encoding batch.
ENCODE_BATCH = 4096

def summarize(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``statistics.stdev``; NaN below two values)."""
    v = [float(x) for x in values if x == x]
    if not v:
        return float("nan"), float("nan")
    mean = float(np.mean(v))
    std = float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
    return mean, std


@dataclass
class SAEEval:
    """What :func:`evaluate_sae` returns: tables and the flat summary."""

    letters: pd.DataFrame
    k_sparse: pd.DataFrame
    prompts: pd.DataFrame
    ablation: pd.DataFrame
    summary: dict[str, float]
    l1_probe: Convergence


def evaluate_sae(sae: Any, probe_w: Tensor, probe_b: Tensor, passing: Sequence[int], train_acts: Tensor,
                 train_y: np.ndarray, test_acts: Tensor, test_y: np.ndarray, absorb_acts: Tensor,
                 absorb_test_index: np.ndarray, absorb_words: Sequence[str], test_words: Sequence[str], *,
                 max_k: int = 10, l1_decay: float = 0.01, sparse_steps: int = 3000, sparse_solver: str = "fista",
                 sparse_batch_size: int = 4096, tol: float = CONVERGENCE_TOL,
                 jump: float = 0.03, seed: int = 42, device: torch.device | str = "cpu",
                 th: ProjectionThresholds = ProjectionThresholds(),
                 ablation: Callable[[pd.DataFrame, Tensor], pd.DataFrame] | None = None,
                 max_ablation_prompts: int = 200, log: Callable[[str], None] | None = None) -> SAEEval:
    """Feature splitting and absorption of one SAE (SPEC 1.4-1.6) on the shared probe data.

    ``absorb_test_index[j]`` is the row of ``test_acts`` whose word the absorption prompt ``j``
    holds. ``ablation(candidates, f)`` runs the paper's IG test on the sampled candidate absorption
    prompts (rows of ``prompts``, with their latents ``f``) and returns per-prompt
    ``is_absorption`` / ``top_latents`` / ``top_attr``; ``None`` skips the ablation rate.
    """
    say = log or (lambda _m: None)
    passing = list(passing)
    # dense while the rows fit one encode block, else sparse (a wide SAE, issue #27; common.encode_latents)
    f_train = encode_latents(sae, train_acts, ENCODE_BATCH)
    f_test = encode_latents(sae, test_acts, ENCODE_BATCH)
    f_abs = encode_latents(sae, absorb_acts, ENCODE_BATCH)
    say(f"L1 probe on {f_train.shape[1]} latents ({f_train.shape[0]} train words, {sparse_solver}, "
        f"{sparse_steps} steps at most)")
    fit = train_linear_probe(f_train, torch.as_tensor(train_y), steps=sparse_steps, solver=sparse_solver,
                             batch_size=sparse_batch_size, lr=1e-2, end_lr=1e-5, weight_decay=1e-6, l1=l1_decay,
                             seed=seed, tol=tol, device=device)
    l1_w, conv = fit.weight, fit.convergence
    ks = k_sparse_probing(f_train, train_y, f_test, test_y, l1_w, max_k, passing)
    splits = feature_splits(ks, jump).set_index("label")
    probe_scores_test = (test_acts.float() @ probe_w.T + probe_b).numpy()
    W_dec = sae.W_dec.detach().float().cpu()
    unit_dec = F.normalize(W_dec, dim=-1)  # the decoder directions, once for every letter
    letter_rows, prompt_frames, abl_frames = [], [], []
    rng = random.Random(seed)
    for li in passing:
        split = splits.loc[li]
        feats = list(split["split_feats"])
        tp = np.flatnonzero((test_y == li) & (probe_scores_test[:, li] > 0))
        js = np.flatnonzero(np.isin(absorb_test_index, tp))  # absorption prompts of the true positives
        n_tp = len(js)
        fa = latent_rows(f_abs, js)  # the letter's absorption prompts, dense
        res = projection_absorption(absorb_acts[js], fa, probe_w[li], W_dec, feats, th, unit_dec)
        res.insert(0, "letter", LETTERS[li])
        res.insert(1, "word", [absorb_words[j] for j in js])
        res.insert(2, "absorb_row", js)
        res["main_latents"] = [feats] * len(res)
        res["main_acts"] = [[float(fa[r, i]) for i in feats] for r in range(len(js))]
        prompt_frames.append(res)
        row = {"letter": LETTERS[li], "num_probe_true_positives": n_tp, "split_feats": feats,
               "num_split_feats": len(feats), "split_f1": float(split["split_f1"]),
               "mean_absorption_fraction": float(res["absorption_fraction"].sum() / n_tp) if n_tp else float("nan"),
               "full_absorption_rate": float(res["is_full_absorption"].sum() / n_tp) if n_tp else float("nan"),
               "absorption_rate": float("nan"), "ablation_candidates": 0, "ablation_sampled": 0, "ablation_absorbed": 0}
        if ablation is not None and n_tp:
            coef = np.asarray(split["k_coef"], dtype=np.float64)
            k_score = latent_columns(f_test, feats) @ coef + float(split["k_bias"])
            fn = set(np.flatnonzero((test_y == li) & (probe_scores_test[:, li] > 0) & (k_score <= 0)).tolist())
            cand = [j for j in js if int(absorb_test_index[j]) in fn]
            at = {int(j): r for r, j in enumerate(js)}
            cand = [j for j in cand if float(fa[at[int(j)], feats].sum()) < EPS]  # main latents already firing: no absorption
            portion = 1.0
            if len(cand) > max_ablation_prompts:
                portion = max_ablation_prompts / len(cand)
                cand = sorted(rng.sample(cand, max_ablation_prompts))
            row["ablation_candidates"] = len(cand)
            row["_portion"] = portion
            row["absorption_rate"] = 0.0
            if cand:
                sub = pd.DataFrame({"letter": LETTERS[li], "label": li, "absorb_row": cand,
                                    "word": [absorb_words[j] for j in cand]})
                sub["main_latents"] = [feats] * len(sub)
                abl_frames.append(sub)
        letter_rows.append(row)
        say(f"letter {LETTERS[li]}: split latents {feats}, fraction {row['mean_absorption_fraction']:.3f}, "
            f"full {row['full_absorption_rate']:.3f}, IG candidates {row['ablation_candidates']}")
    abl = pd.DataFrame()
    if ablation is not None and abl_frames:
        # one IG pass over every letter's sampled candidates (few large batches, not one per letter)
        allc = pd.concat(abl_frames, ignore_index=True)
        abl = ablation(allc, latent_rows(f_abs, allc["absorb_row"].to_numpy()))
        for row in letter_rows:
            hits = abl[abl["letter"] == row["letter"]]
            if len(hits):
                n_abs = int(hits["is_absorption"].sum())
                row.update(ablation_sampled=len(hits), ablation_absorbed=n_abs,
                           absorption_rate=(n_abs / row["_portion"]) / row["num_probe_true_positives"])
    for row in letter_rows:
        row.pop("_portion", None)
    letters = pd.DataFrame(letter_rows)
    summary: dict[str, float] = {}
    for col, name in (("mean_absorption_fraction", "fraction"), ("full_absorption_rate", "full"),
                      ("num_split_feats", "split_features"), ("absorption_rate", "rate")):
        mean, std = summarize(letters[col].tolist()) if len(letters) else (float("nan"), float("nan"))
        summary[f"absorption_mean_{name}"] = mean
        summary[f"absorption_std_{name}"] = std
    summary["absorption_rate"] = summary.pop("absorption_mean_rate")
    summary["absorption_letters"] = float(len(letters))
    summary["absorption_l1_probe_converged"] = float(conv.converged)
    summary["absorption_l1_probe_steps"] = float(conv.steps)
    summary["absorption_refits_not_converged"] = float((~ks["refit_converged"]).sum()) if len(ks) else 0.0
    prompts = pd.concat(prompt_frames, ignore_index=True) if prompt_frames else pd.DataFrame()
    return SAEEval(letters=letters, k_sparse=ks, prompts=prompts, ablation=abl, summary=summary, l1_probe=conv)


def word_l0(sae: Any, acts: Tensor) -> float:
    """Mean number of active latents on the rows of ``acts`` (the probe words' L0); above
    one encode block (:func:`saeflow.saes.base.fits_dense`) the latents are kept sparse (issue #27)."""
    f = encode_latents(sae, acts, ENCODE_BATCH)
    if hasattr(f, "indptr"):
        return float(torch.from_numpy(np.diff(f.indptr)).float().mean()) if f.shape[0] else float("nan")
    return float((f > 0).float().sum(-1).mean())


def example_absorptions(prompts: pd.DataFrame, ablation: pd.DataFrame, n: int = 30) -> pd.DataFrame:
    """A table of example absorptions: full absorptions (projection) first, then the paper's
    (ablation) ones: word, letter, main latent(s), absorbing latent, its probe cosine and its share
    of the probe projection (projection) or attribution (ablation)."""
    rows = []
    if len(prompts):
        full = prompts[prompts["is_full_absorption"]].sort_values("top_proj", ascending=False)
        for r in full.head(n).itertuples():
            rows.append({"method": "projection", "word": r.word, "letter": r.letter, "main_latents": list(r.main_latents),
                         "absorbing_latent": int(r.top_latent), "cosine": float(r.top_cos),
                         "share": float(r.top_proj / r.probe_projection) if r.probe_projection else float("nan")})
    if len(ablation):
        hits = ablation[ablation["is_absorption"]]
        for r in hits.head(n).itertuples():
            tot = sum(abs(v) for v in r.top_attr) or float("nan")
            rows.append({"method": "ablation", "word": r.word, "letter": r.letter, "main_latents": list(r.main_latents),
                         "absorbing_latent": int(r.top_latents[0]), "cosine": float(r.top_cos[0]),
                         "share": abs(float(r.top_attr[0])) / tot})
    return pd.DataFrame(rows, columns=["method", "word", "letter", "main_latents", "absorbing_latent", "cosine", "share"])
