"""Stitching swap rules on a trained family: ``argmax`` vs ``threshold`` (StitchingConfig.swap_rule).

For every pair the profile's ``stitching:`` section selects (``configs/quick-evals.yaml``: adjacent
widths 1024 -> 2048 and 2048 -> 4096 at k 16 and k 32), this runs the pair evaluation of the
``stitching-pair`` stage (:func:`saeflow.evals.stitching.stitch_pair` on the SAEs and held-out rows
that :func:`tasks.stitching.pair_inputs` loads; CE loss off, since only the MSE curve is compared)
once per rule (``threshold`` at each ``--taus``, default the profile's ``swap_tau``), and reads the
exact per-event MSE curve. Per pair and rule it prints S's and L's MSE, the worst (max) MSE along the
curve, worst / S and worst / L, the number of events after which the MSE rises (``violations``), the
number of swaps and the largest swap, the S latents left to ``finish``, the MSE just before it and
``‖b_dec,S − b_dec,L‖²``; a ``summary:`` line last (per rule: the largest worst / S and
on how many pairs the worst point stays within 10% of S's MSE). Writes the ``stitching-rules``
section of docs/benchmarks.md unless ``--no-write``.

The artifacts root is only read (the family, its activation store): nothing is written there.

Run (about 15 minutes for the quick family and three τ on 2 shared CPU cores)::

    nice -n 10 .venv/bin/python -m benchmarks.stitching_rules --artifacts /path/to/artifacts
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks._common import REPO, machine, write_section  # noqa: E402
from flows.extract import expected_activations  # noqa: E402
from flows.runner import load_profile, local_root  # noqa: E402
from saeflow.device import pick_device  # noqa: E402
from saeflow.evals.stitching import StitchingConfig, find_pairs, stitch_pair  # noqa: E402
from tasks import stitching as stages  # noqa: E402
from tasks import train  # noqa: E402

#: The worst point counts as "close to S" within this factor of S's MSE.
CLOSE = 1.10


def rule_configs(cfg, taus: list[float]) -> list[tuple[str, object]]:
    """``(label, StitchingConfig)`` per rule: argmax, then threshold at each τ; CE off."""
    base = {**cfg.model_dump(), "ce_batches": 0}
    out = [("argmax", StitchingConfig.model_validate({**base, "swap_rule": "argmax"}))]
    out += [(f"threshold τ={t:g}", StitchingConfig.model_validate({**base, "swap_rule": "threshold", "swap_tau": t}))
            for t in taus]
    return out


def measure(res) -> dict:
    fine = np.asarray(res.event_mse)
    s, last, worst = float(fine[0]), float(fine[-1]), float(fine.max())
    swaps = [e for e in res.events if e.kind == "swap"]
    return {"mse_s": s, "mse_l": last, "before_finish": float(fine[-2]), "worst": worst,
            "worst_at": int(fine.argmax()), "worst_s": worst / s,
            "worst_l": worst / last, "rises": res.summary["violations"], "events": len(res.events),
            "swaps": len(swaps), "largest_add": max((len(e.add) for e in swaps), default=0),
            "largest_remove": max((len(e.remove) for e in swaps), default=0),
            "finish_removes": len(res.events[-1].remove)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=str(REPO / "configs" / "quick-evals.yaml"), help="a profile with stitching:")
    ap.add_argument("--artifacts", default=None, help="artifacts root holding the profile's trained family (read only)")
    ap.add_argument("--taus", type=float, nargs="+", default=None, help="swap_tau values of the threshold rule")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    config = load_profile(args.profile)
    cfg = config.stitching
    if cfg is None:
        raise SystemExit(f"{args.profile} has no stitching: section")
    if cfg.form != "native":
        raise SystemExit("this benchmark compares rules on the SAEs themselves (stitching.form: native)")
    root = local_root(args.artifacts)
    acts = expected_activations(config, root)
    saes = train.family_refs(acts, config.sae_configs(), config.train, root)
    missing = [r.path for r in [acts, *saes] if not r.is_complete()]
    if missing:
        raise SystemExit(f"not complete in {root}: {missing}; train the profile's family first")
    infos = stages.read_infos(saes)
    pairs = find_pairs(infos, cfg)
    rules = rule_configs(cfg, args.taus or [cfg.swap_tau])
    dev = pick_device(args.device)
    rows = []
    for s, l in pairs:
        S, L, x, _ = stages.pair_inputs(saes[s], saes[l], acts, cfg, dev)
        title = f"{infos[s].label} -> {infos[l].label}"
        b_gap = float((S.b_dec - L.b_dec).detach().double().pow(2).sum())
        for label, rcfg in rules:
            t0 = time.perf_counter()
            r = measure(stitch_pair(S, L, x, rcfg, infos[s], infos[l], dev))
            r.update(pair=title, rule=label, b_gap=b_gap, seconds=time.perf_counter() - t0)
            rows.append(r)
            print(f"{title} | {label}: S {r['mse_s']:.6g}, L {r['mse_l']:.6g}, worst {r['worst']:.6g} (event "
                  f"{r['worst_at']}/{r['events']}), worst/S {r['worst_s']:.4f}, worst/L {r['worst_l']:.4f}, rising "
                  f"{r['rises']}, swaps {r['swaps']} (largest +{r['largest_add']}/-{r['largest_remove']}), finish "
                  f"removes {r['finish_removes']}, MSE before finish {r['before_finish']:.6g} (|b_dec S - L|^2 "
                  f"{b_gap:.4g}), {r['seconds']:.0f} s", flush=True)
    per_rule = {label: [r for r in rows if r["rule"] == label] for label, _ in rules}
    summary = "; ".join(f"{label}: max worst/S {max(r['worst_s'] for r in rs):.4f}, within {CLOSE - 1:.0%} of S on "
                        f"{sum(r['worst_s'] <= CLOSE for r in rs)}/{len(rs)} pairs, rising events "
                        f"{sum(r['rises'] for r in rs)}" for label, rs in per_rule.items())
    profile = Path(args.profile).resolve()
    shown = profile.relative_to(REPO) if profile.is_relative_to(REPO) else profile
    md = [f"Measured {machine()}; `python -m benchmarks.stitching_rules` on the family of `{shown}` "
          f"({len(pairs)} pairs, {x.shape[0]} held-out rows, `form: {cfg.form}`, `novel_order: {cfg.novel_order}`, "
          f"`swap_order: {cfg.swap_order}`). MSE = the exact per-event curve of `stitch_pair` (mean over rows of "
          "the summed squared error); worst = its maximum over all events; rising = events after which it rises.", "",
          "| pair (S -> L) | rule | S MSE | L MSE | worst MSE | worst / S | worst / L | rising events | events | swaps "
          "(largest: +L / -S) | S latents left to finish | MSE before finish | ‖b_dec S − L‖² |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['pair']} | {r['rule']} | {r['mse_s']:.6g} | {r['mse_l']:.6g} | {r['worst']:.6g} | "
                  f"{r['worst_s']:.4f} | {r['worst_l']:.4f} | {r['rises']} | {r['events']} | {r['swaps']} "
                  f"(+{r['largest_add']} / -{r['largest_remove']}) | {r['finish_removes']} | {r['before_finish']:.6g} | "
                  f"{r['b_gap']:.4g} |")
    md += ["", f"Summary: {summary}."]
    if not args.no_write:
        write_section("stitching-rules", "## Stitching: argmax vs threshold swap rule\n\n" + "\n".join(md))
    print(f"summary: {summary}")
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
