"""End-to-end agreement of saeflow's absorption evaluation with SAEBench 0.6.0 on a live SAE.

Both sides start from the same trained SAE (a member of the profile's family, ``--sae``, default
``topk-w4096-k32``) and the same word list, and nothing else is shared:

- **saeflow**, from the profile alone: the absorption stages (prompts + activations, ground-truth
  probe, the per-SAE stage) as the pipeline runs them, into the profile's artifacts root (cached
  stages are reused), with the paper's ablation rate off (SAEBench does not compute it).
- **SAEBench**, in its own venv (``/work/sbvenv``, see docs/absorption.md): its
  ``absorption.main.run_eval`` on the SAE loaded with ``sae_lens.SAE.load_from_disk`` and the
  model from the profile's fp32 copy (its ``run_with_cache`` stops after the hook it reads: same
  values, no 262k-way unembedding); ``get_alpha_tokens`` returns our sampled word list, so it
  builds its own prompts, activations, 80/20 split, ground-truth probe, L1 probe, k-sparse
  probes, split latents and absorption from those words. Its L1 probe is trained to convergence:
  ``k_sparse_probe_num_epochs`` (``--sb-epochs``; at <= 4096 training words one epoch is one Adam
  step). How close it got is measured: its objective against the optimum that saeflow's
  deterministic solver reaches on SAEBench's own training latents.

Per letter passing both ground-truth gates: the main split latent (the k = 1 latent, first of the
split set), the split set, absorption fraction and full-absorption rate. Then saeflow's stability:
the profile's word count against ``--factor`` (4) times as many words, main latents compared.

Command (project venv; it runs the SAEBench half in /work/sbvenv itself)::

    .venv/bin/python -m benchmarks.absorption_e2e --config configs/quick-evals.yaml [--sae topk-w4096-k32]

Prints the tables, writes the ``absorption_e2e`` section of docs/benchmarks.md, and ends with
``split latents agree: X/Y; mean full absorption diff: Z``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

SBPY = "/work/sbvenv/bin/python"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


# ------------------------------------------------------------------------------ SAEBench half
def _sb_run(spec_path: Path) -> None:
    """(SAEBench venv) ``run_eval`` on one SAE and our word list; writes ``sb_letters.json`` and
    ``sb_l1_probe.npz`` (its L1 probe and the latents it was trained on) into the work folder."""
    import random

    import numpy as np
    import pandas as pd
    import torch

    spec = json.loads(spec_path.read_text())
    work = Path(spec["workdir"])
    os.chdir(work)
    random.seed(42)
    torch.manual_seed(42)
    import shutil

    import sae_bench.evals.absorption.common as sbcommon
    import sae_bench.evals.absorption.k_sparse_probing as ksp
    import sae_bench.evals.absorption.main as sbmain

    shutil.rmtree(sbcommon.RESULTS_DIR, ignore_errors=True)  # its caches (probes, per-SAE tables) of earlier runs
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig

    from benchmarks.absorption import patch_sb_model_and_words

    patch_sb_model_and_words(spec["model_dir"], spec["words"], stop_at_hook=True)
    if spec.get("same_split"):
        # its vocabulary shuffle (probing.create_dataset_probe_training: ``random.sample(vocab,
        # len(vocab))`` then the first 80% train) keeps our order, train words first: both sides
        # train and test on the same words; every other draw (ICL examples, ...) stays its own
        import random as _random

        import sae_bench.evals.absorption.probing as sbprobing

        class _KeepOrder:
            def __getattr__(self, name):
                return getattr(_random, name)

            @staticmethod
            def sample(population, k):
                if list(population) == spec["words"] and k == len(population):
                    return list(population)
                return _random.sample(population, k)

        sbprobing.random = _KeepOrder()
    from sae_lens import SAE

    real = ksp.train_sparse_multi_probe

    def capture(x_train, y_train, **kw):
        probe = real(x_train, y_train, **kw)
        np.savez(work / "sb_l1_probe.npz", x=x_train.float().cpu().numpy(), y=y_train.float().cpu().numpy(),
                 w=probe.fc.weight.detach().float().cpu().numpy(), b=probe.fc.bias.detach().float().cpu().numpy())
        return probe

    ksp.train_sparse_multi_probe = capture
    sae = SAE.load_from_disk(spec["sae"], device="cpu")
    cfg = AbsorptionEvalConfig(model_name="gemma-3-270m", llm_dtype="float32", llm_batch_size=32,
                               k_sparse_probe_num_epochs=spec["sb_epochs"], precalc_k_sparse_probe_sae_acts=True)
    (work / "out").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = sbmain.run_eval(cfg, [("sae", sae)], "cpu", str(work / "out"), force_rerun=True)
    seconds = time.perf_counter() - t0
    raw = pd.concat([pd.read_parquet(p) for p in (sbcommon.RESULTS_DIR / "feature_absorption").rglob("layer_*.parquet")],
                    ignore_index=True)
    agg = sbmain._aggregate_results_df(raw).set_index("letter")
    splits = raw.groupby("letter")["split_feats"].first()
    ks_json = next(work.glob("artifacts/absorption/*k_sparse_probing.json"))
    ks = pd.read_json(ks_json).set_index("letter")
    out = {}
    for letter in LETTERS:
        row = {"f1_probe": float(ks.loc[letter, "f1_probe"]) if letter in ks.index else float("nan"),
               "f1_k1": float(ks.loc[letter, "f1_sparse_sae_1"]) if letter in ks.index else float("nan")}
        if letter in agg.index:
            row.update(split_feats=[int(i) for i in splits[letter]],
                       mean_absorption_fraction=float(agg.loc[letter, "mean_absorption_fraction"]),
                       full_absorption_rate=float(agg.loc[letter, "full_absorption_rate"]),
                       num_probe_true_positives=int(agg.loc[letter, "num_probe_true_positives"]))
        out[letter] = row
    train_df = next(sbcommon.PROBES_DIR.rglob("train_df.csv"))
    sb_train = pd.read_csv(train_df, keep_default_na=False)["token"].tolist()
    n_train = len(sb_train)
    same_train = sb_train == spec["words"][:n_train]
    (work / "sb_letters.json").write_text(json.dumps({"seconds": seconds, "letters": out, "n_train": n_train,
                                                      "train_words_ours": same_train,
                                                      "saes": list(res) if isinstance(res, dict) else []}))
    print(json.dumps({"seconds": seconds}))


# -------------------------------------------------------------------------------- saeflow half
def _ours(cfg, acfg, sae_ref, root: str):
    """Our absorption stages for one SAE as the pipeline runs them; returns (data, probe, per-SAE) refs."""
    from tasks import absorption as tab
    from tasks import model as tmodel
    from tasks import vocab as tvocab

    m = tmodel.ref(cfg=cfg.model, root=root)
    v = tvocab.ref(model=m, cfg=cfg.vocab, root=root)
    hook = cfg.activations.hook
    data = tab.data_task.fn(model=m, model_cfg=cfg.model, vocab=v, hook=hook, cfg=acfg, root=root)
    probe = tab.probe_task.fn(data=data, cfg=acfg, root=root)
    tab.check_probe(probe, acfg)
    per = tab.sae_task.fn(model=m, model_cfg=cfg.model, data=data, probe=probe, sae=sae_ref, hook=hook, cfg=acfg,
                          root=root)
    return m, data, probe, per


def _letters(per_dir: Path, probe_dir: Path):
    import pandas as pd

    letters = pd.read_parquet(per_dir / "letters.parquet").set_index("letter")
    pm = pd.read_parquet(probe_dir / "probe_metrics.parquet").set_index("letter")
    letters["probe_f1"] = pm.loc[letters.index, "f1"]
    ks = pd.read_parquet(per_dir / "k_sparse.parquet")
    k1 = ks[ks["k"] == 1].set_index("letter")["f1"]
    letters["k1_f1"] = k1.reindex(letters.index)
    return letters


def _main_latent(feats) -> int | None:
    feats = list(feats)
    return int(feats[0]) if feats else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quick-evals.yaml")
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--sae", default="topk-w4096-k32", help="family member as <arch>-w<width>-k<k>, or an imported "
                    "SAE by its name (e.g. 'gemma-scope-2 L12 16k small' with configs/gemma-scope-2.yaml)")
    ap.add_argument("--sb-epochs", type=int, default=3000, help="SAEBench L1 probe epochs (= Adam steps at <= 4096 words)")
    ap.add_argument("--same-split", action=argparse.BooleanOptionalAction, default=True,
                    help="SAEBench trains/tests on our train/test words (its own 80/20 shuffle otherwise)")
    ap.add_argument("--factor", type=int, default=4, help="stability: this many times the profile's words")
    ap.add_argument("--out", type=Path, default=Path("/tmp/absorption_e2e"))
    ap.add_argument("--skip-sb", action="store_true", help="reuse the SAEBench results already in --out")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override an absorption config field on our side (e.g. probe_solver=fista)")
    ap.add_argument("--sb-spec", type=Path, help="(internal) run the SAEBench half")
    args = ap.parse_args(argv)
    if args.sb_spec:
        _sb_run(args.sb_spec)
        return 0
    from benchmarks.absorption import profile_family

    cfg, root, m, saes = profile_family(args.config, args.artifacts)
    import numpy as np
    import pandas as pd
    import torch
    import yaml
    from prefect.logging import disable_run_logger

    from benchmarks._common import machine, write_section
    from saeflow.evals import absorption as ab
    from saeflow.evals.common import sae_identity

    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    acfg = type(cfg.absorption).model_validate({**cfg.absorption.model_dump(), "ablation": False, **overrides})
    names = {}
    for s in saes:
        if s.is_complete():
            i = sae_identity(s.path)
            names[i.get("name") or f"{i['architecture']}-w{i['width']}" + (f"-k{i['k']}" if i["k"] is not None else "")] = s
    if args.sae not in names:
        print(f"error: no complete family member {args.sae!r} under {root} (have: {sorted(names)}); run the "
              f"pipeline with {args.config} first", file=sys.stderr)
        return 1
    sae = names[args.sae]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with disable_run_logger():
        _m, data, probe, per = _ours(cfg, acfg, sae, root)
    ours_s = time.perf_counter() - t0
    prompts = pd.read_parquet(Path(data.path) / "prompts.parquet")
    words = prompts.loc[prompts["kind"] == "probe", "word"].tolist()
    work = args.out / "sb"
    proc = None
    if not args.skip_sb:  # SAEBench end to end on the same SAE and word list, beside our 4x run (one thread each)
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        spec = {"workdir": str(work), "model_dir": m.path, "sae": sae.path, "words": words, "sb_epochs": args.sb_epochs,
                "same_split": args.same_split}
        (work / "spec.json").write_text(json.dumps(spec))
        repo = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
        log = open(work / "sb.log", "w")
        proc = subprocess.Popen([SBPY, "-m", "benchmarks.absorption_e2e", "--sb-spec", str(work / "spec.json")],
                                cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        torch.set_num_threads(1)
    t1 = time.perf_counter()
    with disable_run_logger():
        big = acfg.model_copy(update={"max_words": acfg.max_words * args.factor})
        _m, data4, probe4, per4 = _ours(cfg, big, sae, root)
    ours4_s = time.perf_counter() - t1
    ours = _letters(Path(per.path), Path(probe.path))
    ours4 = _letters(Path(per4.path), Path(probe4.path))
    conv = json.loads((Path(per.path) / "convergence.json").read_text())["l1_probe"]
    conv_gt = json.loads((Path(probe.path) / "probe_convergence.json").read_text())
    if proc is not None and proc.wait() != 0:
        print((work / "sb.log").read_text()[-4000:], file=sys.stderr)
        return 1
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    sb = json.loads((work / "sb_letters.json").read_text())
    sbl = sb["letters"]

    # how converged is SAEBench's L1 probe? its objective vs the optimum on its own training latents
    z = np.load(work / "sb_l1_probe.npz")
    x_sb, y_sb = torch.from_numpy(z["x"]), torch.from_numpy(z["y"])
    opt = ab.train_linear_probe(x_sb, y_sb, steps=acfg.sparse_probe_steps, solver="fista", weight_decay=1e-6,
                                l1=acfg.l1_decay, tol=acfg.convergence_tol)
    f_sb = ab.probe_objective(x_sb, y_sb, torch.from_numpy(z["w"]), torch.from_numpy(z["b"]), l1=acfg.l1_decay,
                              weight_decay=1e-6)
    gap = (f_sb - opt.convergence.final_loss) / abs(opt.convergence.final_loss)
    sb_top1_opt = [int(i) for i in torch.from_numpy(z["w"]).argmax(1)]
    opt_top1 = [int(i) for i in opt.weight.argmax(1)]
    same_top1_opt = sum(p == q for p, q in zip(sb_top1_opt, opt_top1))

    rows = []
    for letter in ours.index:
        s = sbl.get(letter, {})
        if "split_feats" not in s:
            continue
        o = ours.loc[letter]
        rows.append({"letter": letter, "probe_f1_ours": float(o["probe_f1"]), "probe_f1_sb": s["f1_probe"],
                     "main_ours": _main_latent(o["split_feats"]), "main_sb": _main_latent(s["split_feats"]),
                     "split_ours": "+".join(str(int(i)) for i in o["split_feats"]),
                     "split_sb": "+".join(str(int(i)) for i in s["split_feats"]),
                     "k1_f1_ours": float(o["k1_f1"]), "k1_f1_sb": s.get("f1_k1", float("nan")),
                     "fraction_ours": float(o["mean_absorption_fraction"]), "fraction_sb": s["mean_absorption_fraction"],
                     "full_ours": float(o["full_absorption_rate"]), "full_sb": s["full_absorption_rate"]})
    t = pd.DataFrame(rows)
    t["same_main"] = t["main_ours"] == t["main_sb"]
    n_agree, n = int(t["same_main"].sum()), len(t)
    # converged on both sides: SAEBench's L1 objective solved to convergence on SAEBench's own
    # training latents (its prompts and activations) against our converged k = 1 latent
    t["main_sb_converged"] = [opt_top1[LETTERS.index(letter)] for letter in t["letter"]]
    t["same_main_converged"] = t["main_ours"] == t["main_sb_converged"]
    n_conv = int(t["same_main_converged"].sum())
    # diagnostic (not the goal): agreement where a letter latent exists (either side's k = 1 F1 > 0.5) vs not
    sel = (t["k1_f1_ours"] > 0.5) | (t["k1_f1_sb"] > 0.5)
    n_sel, n_sel_agree = int(sel.sum()), int(t.loc[sel, "same_main"].sum())
    n_rest, n_rest_agree = int((~sel).sum()), int(t.loc[~sel, "same_main"].sum())
    d_frac = float(t["fraction_ours"].mean() - t["fraction_sb"].mean())
    d_full = float(t["full_ours"].mean() - t["full_sb"].mean())

    st = []
    for letter in ours.index.intersection(ours4.index):
        st.append({"letter": letter, "main_quick": _main_latent(ours.loc[letter, "split_feats"]),
                   "main_4x": _main_latent(ours4.loc[letter, "split_feats"]),
                   "split_quick": "+".join(str(int(i)) for i in ours.loc[letter, "split_feats"]),
                   "split_4x": "+".join(str(int(i)) for i in ours4.loc[letter, "split_feats"]),
                   "fraction_quick": float(ours.loc[letter, "mean_absorption_fraction"]),
                   "fraction_4x": float(ours4.loc[letter, "mean_absorption_fraction"]),
                   "full_quick": float(ours.loc[letter, "full_absorption_rate"]),
                   "full_4x": float(ours4.loc[letter, "full_absorption_rate"])})
    s4 = pd.DataFrame(st)
    s4["same_main"] = s4["main_quick"] == s4["main_4x"]
    n4, n4_agree = len(s4), int(s4["same_main"].sum())

    from saeflow.config import resolve_precision

    resolved, _ = resolve_precision(cfg)
    prec_env = f"SAEFLOW_PRECISION={os.environ['SAEFLOW_PRECISION']} " if os.environ.get("SAEFLOW_PRECISION") else ""
    words4 = int((pd.read_parquet(Path(data4.path) / "prompts.parquet")["kind"] == "probe").sum())
    md = f"""## Absorption end to end vs SAEBench on a live SAE (`benchmarks/absorption_e2e.py`)

Command: `{prec_env}.venv/bin/python -m benchmarks.absorption_e2e --config {args.config} --artifacts {args.artifacts} --sae {shlex.quote(args.sae)} --sb-epochs {args.sb_epochs}{''.join(' --set ' + x for x in args.set)}`
(model `{resolved.model.dtype}`, training `{resolved.train.precision}`)
(SAE `{sae.path}`; {len(words)} words; ablation rate off). Machine: {machine()}.
saeflow from the profile alone (stages as the pipeline runs them, cached ones reused: {ours_s:.0f} s; the {args.factor}x run
{ours4_s:.0f} s, on one thread beside SAEBench); SAEBench 0.6.0 `run_eval` in its own venv on the same SAE and word list
({sb['seconds']:.0f} s, one thread), its L1 probe trained for {args.sb_epochs} Adam steps. Its train words
{'are ours (the same 80/20 split, `--same-split`)' if sb.get('train_words_ours') else 'are its own 80/20 shuffle of the list'}.

Probes: saeflow's L1 probe `{conv['solver']}`, {conv['steps']} iterations, objective {conv['final_loss']:.6g}, change over the
last 10% {conv['rel_change_last10']:.1e}, converged {conv['converged']}; ground-truth probe `{conv_gt['solver']}`,
{conv_gt['steps']} steps, change over the last 10% {conv_gt['rel_change_last10']:.1e}, continuation drop
{conv_gt['continuation_drop']:.1e}, converged {conv_gt['converged']}. SAEBench's L1 probe: objective {f_sb:.6g} on its own
training latents, the optimum there (saeflow's solver) {opt.convergence.final_loss:.6g}: gap {gap:.2%}; its top-1 latent
equals the optimum's on {same_top1_opt}/26 letters.

Letters passing both ground-truth gates: {n}. Same main split latent: **{n_agree}/{n}** (goal >= 80%). With SAEBench's
L1 probe replaced by the converged solution of its own objective on its own training latents (`main_sb_converged`: the
k = 1 latent; both sides converged, same words{' and split' if sb.get('train_words_ours') else ''}, each side's own ICL
prompts and activations): **{n_conv}/{n}**.
By letter latent (a diagnostic, not the goal): letters where either side's k = 1 latent has test F1 > 0.5 agree on
{n_sel_agree}/{n_sel}; the other letters on {n_rest_agree}/{n_rest}.
Mean absorption fraction ours {t['fraction_ours'].mean():.4f} vs SAEBench {t['fraction_sb'].mean():.4f} (diff {d_frac:+.4f});
mean full-absorption rate ours {t['full_ours'].mean():.4f} vs {t['full_sb'].mean():.4f} (diff **{d_full:+.4f}**; goal |diff| <= 0.05).

{t.to_markdown(index=False, floatfmt=".3f")}

Stability of saeflow's answer: {len(words)} vs {words4} words ({args.factor}x), letters passing both: {n4}; same main
latent on **{n4_agree}/{n4}** (goal >= 70%); mean fraction {s4['fraction_quick'].mean():.4f} vs {s4['fraction_4x'].mean():.4f},
mean full {s4['full_quick'].mean():.4f} vs {s4['full_4x'].mean():.4f}.

{s4.to_markdown(index=False, floatfmt=".3f")}
"""
    (args.out / "absorption_e2e.md").write_text(md)
    write_section("absorption_e2e" + "".join("-" + x.replace("=", "-") for x in args.set), md)
    print(md)
    print(f"stability: same main latent {n4_agree}/{n4}")
    print(f"converged on both sides: same k = 1 latent {n_conv}/{n}")
    print(f"letters with a k = 1 latent of F1 > 0.5 on either side: same main latent {n_sel_agree}/{n_sel}; "
          f"the rest {n_rest_agree}/{n_rest}")
    print(f"split latents agree: {n_agree}/{n}; mean full absorption diff: {d_full:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
