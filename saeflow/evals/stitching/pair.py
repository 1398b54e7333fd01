"""One stitching pair end to end, one SAE's JumpReLU form and its fidelity, and the result tables.

The stage tasks (:mod:`tasks.stitching`) load the artifacts, call these and write what they return.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from saeflow.evals.common import SAEInfo, heldout_rows
from saeflow.evals.stitching.config import StitchingConfig
from saeflow.evals.stitching.forms import to_jumprelu
from saeflow.evals.stitching.interpolation import (
    Event,
    changing_events,
    count_violations,
    curve_points,
    evaluate_curve,
    event_mse_curve,
    interpolation_events,
)
from saeflow.evals.stitching.latents import (
    INACTIVE,
    NOVEL,
    RECONSTRUCTION,
    classify,
    cosine_edges,
    decoder_cosines,
    insertion_delta_mse,
    proxy_auc,
    tau_sweep,
)
from saeflow.evals.stitching.pairing import StitchingError
from saeflow.metrics import CEReference, ce_metrics, reconstruction_metrics
from saeflow.saes import BaseSAE, JumpReLUSAE, TopKSAE
from saeflow.store import ActivationStore

__all__ = ["ROW_BATCH", "CESetup", "PairResult", "stitch_pair", "jumprelu_form", "pairs_table", "form_table_row"]

#: Activation rows per batch of every pass over the held-out rows.
ROW_BATCH = 4096
#: Reconstruction metrics kept at each fully evaluated curve point (``fvu`` is added).
POINT_METRICS = ("mse", "explained_variance", "l0", "cossim", "frac_dead")
#: CE metrics kept at each curve point when the CE loss is measured.
POINT_CE = ("ce_with_sae", "ce_loss_score", "ce_delta", "kl_with_sae")
#: JumpReLU-form fidelity metrics (original SAE vs its form, on the held-out rows).
FORM_METRICS = ("l0", "mse", "explained_variance", "frac_dead")
#: Leading columns of the pairs table (the others follow in their order).
PAIR_COLUMNS = ["pair", "small_width", "large_width", "n_novel", "n_reconstruction", "n_inactive", "novel_fraction",
                "proxy_auc", "mean_max_cos_novel", "mean_max_cos_reconstruction", "n_events", "n_events_changing",
                "violations", "violations_at_points", "mse_small", "mse_after_novel", "mse_large", "ev_small",
                "ev_large", "ce_small", "ce_large", "seconds_delta_mse", "seconds_event_curve", "seconds_curve_points"]


@dataclass
class CESetup:
    """What the CE loss of a stitched SAE needs: the LM, the hook to splice at, held-out token
    contexts, contexts per forward, ignored token ids and the shared clean / ablated reference."""

    lm: Any  # a HookedTransformer
    hook: str
    tokens: Tensor
    batch_size: int
    ignore: set[int]
    reference: CEReference | None = None


@dataclass
class PairResult:
    """What :func:`stitch_pair` computes for one (S, L) pair."""

    summary: dict[str, Any]  # the pair's ``summary.json`` (without ``seconds_total``)
    latents: pd.DataFrame  # one row per L latent: max_cos, match, delta_mse, fires, class
    taus: pd.DataFrame  # the τ sweep of the max-cosine proxy
    curve: pd.DataFrame  # the fully evaluated curve points
    event_mse: np.ndarray  # exact MSE before any event and after each
    events: list[Event]


def _point_metrics(sae: torch.nn.Module, rows: Callable[[], Any], device: Any, ce: CESetup | None) -> dict[str, float]:
    rec = reconstruction_metrics(sae, rows(), device, geometry=False)  # no decoder cosines: not kept
    res = {k: rec[k] for k in POINT_METRICS}
    res["fvu"] = 1.0 - rec["explained_variance"]
    if ce is not None:
        out = ce_metrics(ce.lm, sae, ce.hook, ce.tokens, ce.batch_size, ce.ignore, reference=ce.reference)
        res.update({k: out[k] for k in POINT_CE})
    return res


def stitch_pair(S: BaseSAE, L: BaseSAE, x: Tensor, cfg: StitchingConfig, small: SAEInfo, large: SAEInfo,
                device: Any, ce: CESetup | None = None, on_point: Callable[[int, int], None] | None = None,
                row_batch: int = ROW_BATCH) -> PairResult:
    """Classification, proxy and interpolation curve of the pair ``S`` -> ``L`` on the held-out rows ``x``.

    Decoder cosines, batched single-insertion ΔMSE, classes, proxy AUC, τ sweep, the exact
    per-event MSE curve and the fully evaluated curve points (core reconstruction metrics, plus the
    CE loss with the stitched SAE spliced in when ``ce`` is given); ``on_point(done, total)`` after
    each curve point.
    """
    def chunks():
        return (x[i:i + row_batch] for i in range(0, x.shape[0], row_batch))

    max_cos, match = decoder_cosines(S, L)
    t0 = time.perf_counter()
    ins = insertion_delta_mse(S, L, chunks(), cfg.adjust_encoder_bias)
    t_delta = time.perf_counter() - t0
    max_cos, match = max_cos.cpu().numpy(), match.cpu().numpy()
    classes = classify(ins["delta_mse"], ins["fires"])
    auc = proxy_auc(max_cos, classes)
    taus = tau_sweep(max_cos, classes, cfg.taus)
    edges = cosine_edges(S, L, cfg.swap_tau) if cfg.swap_rule == "threshold" else None
    events = interpolation_events(classes, ins["delta_mse"], max_cos, match, S.d_sae, cfg.novel_order, cfg.swap_order,
                                  cfg.swap_rule, edges)
    t0 = time.perf_counter()
    fine = event_mse_curve(S, L, x, events, cfg.adjust_encoder_bias)
    t_fine = time.perf_counter() - t0
    changes = changing_events(fine)
    points = curve_points(len(events), cfg.n_steps, changes)
    done = [0]

    def evaluate(sae: torch.nn.Module) -> dict[str, float]:
        res = _point_metrics(sae, chunks, device, ce)
        done[0] += 1
        if on_point is not None:
            on_point(done[0], len(points))
        return res

    t0 = time.perf_counter()
    curve = evaluate_curve(S, L, events, points, evaluate, cfg.adjust_encoder_bias)
    t_curve = time.perf_counter() - t0
    curve.insert(1, "fraction_of_path", curve["events_done"] / len(events))
    curve["event_mse"] = fine[curve["events_done"].to_numpy()]
    gap = float(np.max(np.abs(curve["mse"] - curve["event_mse"]) / np.maximum(curve["mse"].abs(), 1e-30)))

    n_novel, n_rec, n_inact = (int(np.sum(classes == c)) for c in (NOVEL, RECONSTRUCTION, INACTIVE))
    active = n_novel + n_rec
    first_swap = next((i for i, e in enumerate(events) if e.kind != "insert"), len(events))
    summary = {
        "form": cfg.form, "small": small.label, "large": large.label, "small_index": small.index,
        "large_index": large.index, "small_width": small.width, "large_width": large.width,
        "n_tokens": int(ins["n_tokens"]), "n_novel": n_novel, "n_reconstruction": n_rec, "n_inactive": n_inact,
        "novel_fraction": n_novel / active if active else float("nan"),
        "proxy_auc": auc, "mean_max_cos_novel": float(max_cos[classes == NOVEL].mean()) if n_novel else float("nan"),
        "mean_max_cos_reconstruction": float(max_cos[classes == RECONSTRUCTION].mean()) if n_rec else float("nan"),
        "n_events": len(events), "n_events_changing": int(changes.sum()),
        "swap_rule": cfg.swap_rule, "n_swaps": sum(e.kind == "swap" for e in events),
        "largest_swap_added": max((len(e.add) for e in events if e.kind == "swap"), default=0),
        "largest_swap_removed": max((len(e.remove) for e in events if e.kind == "swap"), default=0),
        "violations": count_violations(fine), "violations_at_points": count_violations(curve["mse"].to_numpy()),
        "mse_small": float(fine[0]), "mse_after_novel": float(fine[first_swap]), "mse_large": float(fine[-1]),
        "ev_small": float(curve["explained_variance"].iloc[0]), "ev_large": float(curve["explained_variance"].iloc[-1]),
        "max_relative_gap_event_vs_metrics": gap,
        "seconds_delta_mse": t_delta, "seconds_event_curve": t_fine, "seconds_curve_points": t_curve,
    }
    if "ce_with_sae" in curve:
        summary.update(ce_small=float(curve["ce_with_sae"].iloc[0]), ce_large=float(curve["ce_with_sae"].iloc[-1]),
                       ce_violations_at_points=count_violations(curve["ce_with_sae"].to_numpy()))
    for _, r in taus.iterrows():
        summary[f"proxy_novel_fraction_tau{r['tau']:g}"] = float(r["proxy_novel_fraction"])
    latents = pd.DataFrame({"latent": np.arange(L.d_sae), "max_cos": max_cos, "match": match,
                            "delta_mse": ins["delta_mse"], "fires": ins["fires"], "class": classes.astype(str)})
    return PairResult(summary=summary, latents=latents, taus=taus, curve=curve, event_mse=fine, events=events)


def jumprelu_form(sae: BaseSAE, store: ActivationStore, cfg: StitchingConfig, device: Any,
                  row_batch: int = ROW_BATCH) -> tuple[JumpReLUSAE, dict[str, Any]]:
    """The JumpReLU inference form of ``sae`` and its fidelity on the held-out rows.

    A TopK SAE's thresholds are fitted on the last ``cfg.calibration_tokens`` training rows of the
    store (never the held-out rows they are scored on). Returns the form and ``{"threshold_mode",
    "calibration_rows", "heldout_rows", "original", "jumprelu"}`` (the last two: :data:`FORM_METRICS`).
    """
    start, end = heldout_rows(store, cfg.n_tokens)
    calib, c0 = None, store.train_rows
    if type(sae) is TopKSAE:
        c0 = max(0, store.train_rows - cfg.calibration_tokens)
        if c0 >= store.train_rows:
            raise StitchingError(f"activation store at {store.root} has no training rows to fit TopK thresholds on")
        calib = torch.from_numpy(store.read(c0, store.train_rows))
    form = to_jumprelu(sae, calib, cfg.topk_threshold)
    orig = reconstruction_metrics(sae, store.iter_rows(start, end, row_batch), device, geometry=False)
    new = reconstruction_metrics(form, store.iter_rows(start, end, row_batch), device, geometry=False)
    return form, {"threshold_mode": cfg.topk_threshold if calib is not None else "native",
                  "calibration_rows": int(store.train_rows - c0), "heldout_rows": int(end - start),
                  "original": {k: float(orig[k]) for k in FORM_METRICS},
                  "jumprelu": {k: float(new[k]) for k in FORM_METRICS}}


def pairs_table(summaries: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per pair (``summary.json`` of each, with a ``pair`` title), :data:`PAIR_COLUMNS` first."""
    table = pd.DataFrame(list(summaries))
    return table[[c for c in PAIR_COLUMNS if c in table] + [c for c in table if c not in PAIR_COLUMNS]]


def form_table_row(form: dict[str, Any]) -> dict[str, Any]:
    """The ``stitching_jumprelu_form`` table row of one SAE's ``form.json``."""
    return {"sae": form["sae"]["label"], "threshold_mode": form["threshold_mode"],
            "calibration_rows": form["calibration_rows"],
            **{f"original_{k}": v for k, v in form["original"].items()},
            **{f"jumprelu_{k}": v for k, v in form["jumprelu"].items()}}
