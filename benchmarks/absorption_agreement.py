"""Agreement of saeflow's absorption metrics with SAEBench 0.6.0's functions on the same inputs.

Two halves, because SAEBench lives in its own venv (/work/sbvenv, no zarr there):

1. ``export`` (project venv): read one finished per-SAE ``absorption`` artifact and its upstream
   ``absorption_data`` / ``absorption_probe`` artifacts, write the probe-dataset activations,
   labels, absorption prompts + activations, our probe and our per-letter results into one folder.
2. ``compare`` (SAEBench venv): load the SAE with ``sae_lens.SAE.load_from_disk``, then run
   SAEBench's own functions on exactly those activations and that probe:
   ``train_k_sparse_probes`` -> ``eval_probe_and_sae_k_sparse_raw_scores`` -> ``build_metrics_df``
   -> ``add_feature_splits_to_metrics_df`` (split latents), and
   ``FeatureAbsorptionCalculator.calculate_absorption`` (absorption fraction, full absorption) with
   a stand-in model whose ``run_with_cache`` returns our stored word activations at position -6 for
   our prompts, aggregated as SAEBench's ``main._aggregate_results_df``. Three variants:
   ``sb_end_to_end`` (SAEBench trains its own L1 probe on the latents), ``sb_given_our_l1_probe``
   (SAEBench's k-sparse step, refits, F1 and split rule given our L1 probe: the same probes) and
   ``sb_projection_our_splits`` (SAEBench's projection code on our split latents).

Command (project venv; it runs the second half in /work/sbvenv itself)::

    .venv/bin/python -m benchmarks.absorption_agreement --sae-eval artifacts/absorption/<fp> [--out /tmp/agree]

It prints a per-letter table and the maximum absolute differences, and writes ``agreement.md``
into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SBPY = "/work/sbvenv/bin/python"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


# ----------------------------------------------------------------------------------- export (ours)
def export(sae_eval: Path, out: Path) -> None:
    import numpy as np
    import pandas as pd

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from saeflow.store import ActivationStore

    root = sae_eval.parent.parent
    cfg = json.loads((sae_eval / "config.json").read_text())
    up = cfg["upstream"]
    data = root / "absorption_data" / up["absorption_data"]
    probe = root / "absorption_probe" / up["absorption_probe"]
    sae_dir = Path(json.loads((sae_eval / "info.json").read_text())["sae"])
    df = pd.read_parquet(data / "prompts.parquet")
    acts = {k: ActivationStore.open(data / k) for k in ("probe", "absorb")}
    acts = {k: s.read(0, s.n_rows) for k, s in acts.items()}
    out.mkdir(parents=True, exist_ok=True)
    ok = df[df["skip"] == ""]
    tr = ok[(ok["kind"] == "probe") & (ok["split"] == "train")]
    te = ok[(ok["kind"] == "probe") & (ok["split"] == "test")]
    absb = ok[(ok["kind"] == "absorb") & ok["token_id"].isin(te["token_id"])]
    np.savez(out / "data.npz", x_train=acts["probe"][tr["row"].to_numpy()], y_train=tr["label"].to_numpy(),
             x_test=acts["probe"][te["row"].to_numpy()], y_test=te["label"].to_numpy(),
             x_absorb=acts["absorb"][absb["row"].to_numpy()])
    pd.DataFrame({"word": tr["word"]}).to_parquet(out / "train_words.parquet")
    pd.DataFrame({"word": te["word"]}).to_parquet(out / "test_words.parquet")
    absb[["word", "prompt", "label"]].to_parquet(out / "absorb.parquet")
    z = np.load(probe / "probe.npz")
    np.savez(out / "probe.npz", weight=z["weight"], bias=z["bias"])
    pd.read_parquet(probe / "probe_metrics.parquet").to_parquet(out / "probe_metrics.parquet")
    pd.read_parquet(sae_eval / "letters.parquet").to_parquet(out / "ours_letters.parquet")
    pd.read_parquet(sae_eval / "k_sparse.parquet").to_parquet(out / "ours_k_sparse.parquet")
    (out / "meta.json").write_text(json.dumps({"sae_dir": str(sae_dir), "sae_eval": str(sae_eval),
                                               "max_k": cfg["config"]["max_k"]}))


# -------------------------------------------------------------------------------- compare (SAEBench)
def compare(out: Path) -> None:
    import numpy as np
    import pandas as pd
    import torch
    import sae_bench.evals.absorption.k_sparse_probing as ksp
    from sae_bench.evals.absorption.feature_absorption_calculator import FeatureAbsorptionCalculator
    from sae_bench.evals.absorption.k_sparse_probing import (
        add_feature_splits_to_metrics_df, build_metrics_df, eval_probe_and_sae_k_sparse_raw_scores,
        sae_k_sparse_metadata, train_k_sparse_probes)
    from sae_bench.evals.absorption.main import _aggregate_results_df
    from sae_bench.evals.absorption.probing import LinearProbe
    from sae_bench.evals.absorption.prompting import SpellingPrompt, first_letter_formatter
    from sae_lens import SAE

    torch.manual_seed(42)
    meta = json.loads((out / "meta.json").read_text())
    d = np.load(out / "data.npz")
    sae = SAE.load_from_disk(meta["sae_dir"], device="cpu")
    z = np.load(out / "probe.npz")
    probe = LinearProbe(z["weight"].shape[1], 26)
    with torch.no_grad():
        probe.fc.weight.copy_(torch.from_numpy(z["weight"]))
        probe.fc.bias.copy_(torch.from_numpy(z["bias"]))
    train_words = pd.read_parquet(out / "train_words.parquet")["word"].tolist()
    test_words = pd.read_parquet(out / "test_words.parquet")["word"].tolist()
    train_labels = list(zip(train_words, d["y_train"].tolist()))
    test_labels = list(zip(test_words, d["y_test"].tolist()))
    max_k = int(meta["max_k"])

    def sb_split_latents() -> tuple[dict[str, list[int]], pd.DataFrame]:
        """SAEBench's k-sparse probing (top-k of the L1 probe, sklearn refits, test F1, split rule)."""
        kp = train_k_sparse_probes(sae, train_labels, torch.from_numpy(d["x_train"]), ks=list(range(1, max_k + 1)),
                                   precalc_sae_acts=True)
        raw = eval_probe_and_sae_k_sparse_raw_scores(sae, probe, kp, test_labels, torch.from_numpy(d["x_test"]))
        md = sae_k_sparse_metadata(sae, probe, kp, sae_name="sae", layer=0)
        metrics = build_metrics_df(raw, md, max_k_value=max_k)
        add_feature_splits_to_metrics_df(metrics, max_k_value=max_k)
        return {r.letter: [int(x) for x in r.split_feats] for r in metrics.itertuples()}, raw

    # 1. end to end: SAEBench trains its own L1 probe on the latents; and once more with another
    #    torch seed (SAEBench against itself: how determined are its split latents on this SAE?)
    sb_splits, raw = sb_split_latents()
    torch.manual_seed(1)
    sb_splits_seed1, _ = sb_split_latents()
    # 2. the same probes: SAEBench's k-sparse step given our L1 probe. That step reads the L1 probe
    #    only through ``weights[letter].topk(k)``, k <= max_k; our k = max_k row lists those latents
    #    in topk order, so a probe with descending weights on them selects exactly the same latents.
    ours_ks = pd.read_parquet(out / "ours_k_sparse.parquet")
    l1_ours = torch.zeros(26, sae.cfg.d_sae)
    for r in ours_ks[ours_ks["k"] == max_k].itertuples():
        l1_ours[LETTERS.index(r.letter), list(r.feats)] = torch.arange(max_k, 0, -1, dtype=torch.float32)
    given = LinearProbe(sae.cfg.d_sae, 26)
    with torch.no_grad():
        given.fc.weight.copy_(l1_ours)
        given.fc.bias.zero_()
    real_train = ksp.train_sparse_multi_probe
    ksp.train_sparse_multi_probe = lambda *a, **k: given
    try:
        sb_splits_given, _ = sb_split_latents()
    finally:
        ksp.train_sparse_multi_probe = real_train

    absorb = pd.read_parquet(out / "absorb.parquet").reset_index(drop=True)
    x_abs = torch.from_numpy(d["x_absorb"])
    by_prompt = {p: i for i, p in enumerate(absorb["prompt"])}
    by_word = {w: p for w, p in zip(absorb["word"], absorb["prompt"])}

    class StandIn:  # what calculate_absorption uses of a HookedTransformer
        tokenizer = None

        def run_with_cache(self, prompts, names_filter):
            rows = x_abs[[by_prompt[p] for p in prompts]]
            t = torch.zeros(len(prompts), 6, rows.shape[1])
            t[:, 0] = rows  # position -6
            return None, {names_filter[0]: t}

        def to_tokens(self, prompt):
            return torch.zeros(1, 8, dtype=torch.long)

    calc = FeatureAbsorptionCalculator(model=StandIn(), icl_word_list=["x"], max_icl_examples=0,
                                       base_template="{word} has the first letter:",
                                       answer_formatter=first_letter_formatter(), word_token_pos=-6,
                                       batch_size=10)
    calc._build_prompts = lambda words: [SpellingPrompt(base=by_word[w], answer="", word=w) for w in words]
    pm = pd.read_parquet(out / "probe_metrics.parquet").set_index("letter")
    ours = pd.read_parquet(out / "ours_letters.parquet").set_index("letter")
    rows = []
    our_splits = {k: [int(x) for x in v] for k, v in ours["split_feats"].items()}
    for variant, splits in (("sb_end_to_end", sb_splits), ("sb_given_our_l1_probe", sb_splits_given),
                            ("sb_projection_our_splits", our_splits)):
        recs = []
        for letter in ours.index:
            li = LETTERS.index(letter)
            tp = raw[(raw["answer_letter"] == letter) & (raw[f"score_probe_{letter}"] > 0)]["token"].tolist()
            tp = [w for w in tp if w in by_word]
            res = calc.calculate_absorption(sae, tp, probe.weights[li].detach(), splits[letter], layer=0,
                                            show_progress=False)
            for r in res.word_results:
                recs.append({"letter": letter, "absorption_fraction": r.absorption_fraction,
                             "is_full_absorption": r.is_full_absorption, "num_probe_true_positives": len(tp),
                             "split_feats": splits[letter]})
        agg = _aggregate_results_df(pd.DataFrame(recs)).set_index("letter")
        for letter in ours.index:
            rows.append({"variant": variant, "letter": letter, "probe_f1": float(pm.loc[letter, "f1"]),
                         "ours_fraction": float(ours.loc[letter, "mean_absorption_fraction"]),
                         "sb_fraction": float(agg.loc[letter, "mean_absorption_fraction"]),
                         "ours_full": float(ours.loc[letter, "full_absorption_rate"]),
                         "sb_full": float(agg.loc[letter, "full_absorption_rate"]),
                         "ours_split": int(ours.loc[letter, "num_split_feats"]),
                         "sb_split": int(agg.loc[letter, "num_split_feats"]),
                         "ours_latents": ",".join(str(int(x)) for x in ours.loc[letter, "split_feats"]),
                         "sb_latents": ",".join(str(int(x)) for x in splits[letter]),
                         "same_split_latents": our_splits[letter] == [int(x) for x in splits[letter]]})
    table = pd.DataFrame(rows)
    lines = []
    for variant, g in table.groupby("variant"):
        lines.append(f"{variant}: max |d fraction| {abs(g.ours_fraction - g.sb_fraction).max():.2e}, "
                     f"max |d full| {abs(g.ours_full - g.sb_full).max():.2e}, split counts equal on "
                     f"{int((g.ours_split == g.sb_split).sum())}/{len(g)} letters, identical split latents on "
                     f"{int(g.same_split_latents.sum())}/{len(g)}; mean fraction ours {g.ours_fraction.mean():.4f} "
                     f"vs SAEBench {g.sb_fraction.mean():.4f}, mean full ours {g.ours_full.mean():.4f} vs "
                     f"{g.sb_full.mean():.4f}, mean split ours {g.ours_split.mean():.3f} vs {g.sb_split.mean():.3f}")
    same = [x for x in ours.index if sb_splits[x] == sb_splits_seed1[x]]
    lines.append(f"SAEBench end to end, torch seed 42 vs seed 1 (its own L1 probe twice): identical split latents on "
                 f"{len(same)}/{len(ours.index)} letters, equal counts on "
                 f"{sum(len(sb_splits[x]) == len(sb_splits_seed1[x]) for x in ours.index)}/{len(ours.index)}")
    md = "\n".join(lines) + "\n\n" + table.to_markdown(index=False, floatfmt=".4f") + "\n"
    (out / "agreement.md").write_text(md)
    table.to_csv(out / "agreement.csv", index=False)
    print(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae-eval", type=Path, help="a finished artifacts/absorption/<fp> folder")
    ap.add_argument("--out", type=Path, default=Path("/tmp/absorption_agreement"))
    ap.add_argument("--compare-only", action="store_true", help="(internal) run the SAEBench half")
    args = ap.parse_args(argv)
    if args.compare_only:
        compare(args.out)
        return 0
    if args.sae_eval is None:
        ap.error("--sae-eval is required")
    export(args.sae_eval.resolve(), args.out)
    return subprocess.call([SBPY, str(Path(__file__).resolve()), "--compare-only", "--out", str(args.out)])


if __name__ == "__main__":
    sys.exit(main())
