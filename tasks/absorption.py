"""Stages of the absorption evaluation (SPEC 1), wired by the subflow :mod:`flows.evals.absorption`;
the computations are in :mod:`saeflow.evals.absorption`.

- ``absorption_data`` (once per model, hook and vocabulary): the prompt table
  (``prompts.parquet``) and the word-token activations of the probe prompts (``probe/acts.zarr``)
  and of the absorption prompts (``absorb/acts.zarr``), both :class:`saeflow.store.ActivationStore`
  groups whose rows follow ``prompts.parquet``'s ``row`` column.
- ``absorption_probe`` (once per model, hook): the 26-way ground-truth probe (``probe.npz``) and
  its per-letter test metrics (``probe_metrics.parquet``). The evaluation refuses, after this
  stage, when fewer than ``min_letters`` letters pass the F1 gate.
- ``absorption`` (per SAE): ``letters.parquet`` (per-letter table), ``k_sparse.parquet``,
  ``prompts.parquet`` (per-prompt projection results), ``ablation.parquet`` (per-prompt IG
  results), ``examples.parquet`` and ``summary.json``.
- ``absorption_results`` (the family): ``absorption_summary`` / ``absorption_letters`` /
  ``absorption_examples`` tables, ``absorption_vs_l0.png`` and ``absorption_by_letter.png``.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from saeflow.artifacts import ArtifactRef, artifact_ref, begin, completion_meta, fingerprint, mark_complete, require_complete
from saeflow.config import ModelConfig
from saeflow.device import pick_device
from saeflow.evals import absorption as ab
from saeflow.evals.absorption.config import AbsorptionConfig
from saeflow.evals.common import package_modules, sae_identity
from saeflow.models import load_model, load_tokenizer
from saeflow.saes import load_sae, saved_hook
from saeflow.store import ActivationStore
from saeflow.tables import write_table
from tasks.common import Progress, code_version, publish_table, stage_logger, stage_task, timed

DATA, PROBE, PER_SAE, RESULTS = "absorption_data", "absorption_probe", "absorption", "absorption_results"
DATA_FIELDS = ("seed", "max_words", "icl_examples")
PROBE_FIELDS = ("seed", "probe_solver", "probe_steps", "probe_batch_size", "probe_lr", "probe_weight_decay",
                "min_probe_f1", "convergence_tol")


def _code() -> str:
    """This evaluation's code version (every module of :mod:`saeflow.evals.absorption`, the shared
    :mod:`saeflow.evals.common` and this one): a code change gives its stages new fingerprints."""
    return code_version(*package_modules("saeflow.evals.absorption"), "saeflow.evals.common", "tasks.absorption")


def _data_code() -> str:
    """The code version of the data stage alone (the prompt module, the shared store helpers and
    the stage's body): a change of the probes or the metrics keeps its prompts and activations."""
    return code_version("saeflow.evals.absorption.prompts", "saeflow.evals.common", "saeflow.store", _write_store,
                        data_task)


class SAEHookMismatchError(ab.AbsorptionError):
    """An SAE that was not trained on the hook / model width the evaluation reads."""


def _sub(cfg: AbsorptionConfig, fields: tuple[str, ...]) -> dict:
    return {f: getattr(cfg, f) for f in fields}


# ------------------------------------------------------------------------------------------ data
def data_ref(model: ArtifactRef, model_cfg: ModelConfig, vocab: ArtifactRef, hook: str, cfg: AbsorptionConfig,
             root: str, **_) -> ArtifactRef:
    payload = {**_sub(cfg, DATA_FIELDS), "hook": hook, "dtype": model_cfg.resolved_dtype(), "prepend_bos": model_cfg.prepend_bos}
    return artifact_ref(root, DATA, fingerprint(DATA, payload, model, vocab, _data_code()))


def _write_store(path, d_model: int, rows: np.ndarray, tok: np.ndarray, pos: np.ndarray, attrs: dict) -> None:
    store = ActivationStore.open_for_write(path, d_model, 4096, "float32", attrs)
    store.append(rows, tok, pos, np.arange(len(rows)), len(rows))
    store.finish()


@stage_task(data_ref, name="absorption-data")
def data_task(out: ArtifactRef, model: ArtifactRef, model_cfg: ModelConfig, vocab: ArtifactRef, hook: str, cfg: AbsorptionConfig,
              root: str, device: str = "auto") -> None:
    logger = stage_logger()
    vdf = pd.read_parquet(require_complete(vocab) / "vocab.parquet")
    tok = load_tokenizer(require_complete(model))
    with timed("absorption prompts"):
        df = ab.build_prompts(vdf, tok, cfg.max_words, cfg.icl_examples, cfg.seed, model_cfg.prepend_bos)
    ab.check_prompts(df, cfg.min_letters)
    skipped = df[df["skip"] != ""]
    logger.info("absorption data: %d prompts (%d words sampled of %d), %d skipped (%s)", len(df),
                int((df["kind"] == ab.PROBE).sum()), len(vdf), len(skipped), skipped["skip"].value_counts().to_dict())
    lm = load_model(model_cfg, model.dir, pick_device(device))
    df = ab.store_rows(df)
    begin(out, {"config": _sub(cfg, DATA_FIELDS), "hook": hook}, [model, vocab])
    progress = Progress(f"absorption prompts at {hook}")
    for kind in (ab.PROBE, ab.ABSORB):
        sel = ab.usable(df, kind)
        acts = ab.prompt_activations(lm, hook, sel, cfg.batch_size,
                                     lambda d, t: progress.update(d, t, f"{kind} prompts"))
        _write_store(out.dir / kind, lm.cfg.d_model, acts, sel["token_id"].to_numpy(), sel["position"].to_numpy(),
                     {"model": model_cfg.name, "hook": hook, "kind": kind})
    df.drop(columns=["tokens"]).to_parquet(out.dir / "prompts.parquet", index=False)
    counts = df.groupby(["kind", "skip"]).size().reset_index(name="n")
    mark_complete(out, n_prompts=len(df), skipped={f"{r.kind}:{r.skip or 'kept'}": int(r.n) for r in counts.itertuples()})


def load_data(data: ArtifactRef) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    d = require_complete(data)
    df = pd.read_parquet(d / "prompts.parquet")
    acts = {k: torch.from_numpy(ActivationStore.open(d / k).read(0, ActivationStore.open(d / k).n_rows)) for k in (ab.PROBE, ab.ABSORB)}
    return df, acts


# ----------------------------------------------------------------------------------------- probe
def probe_ref(data: ArtifactRef, cfg: AbsorptionConfig, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, PROBE, fingerprint(PROBE, _sub(cfg, PROBE_FIELDS), data, _code()))


@stage_task(probe_ref, name="absorption-probe")
def probe_task(out: ArtifactRef, data: ArtifactRef, cfg: AbsorptionConfig, root: str, device: str = "auto") -> None:
    df, acts = load_data(data)
    tr, x_tr = ab.probe_split(df, acts, "train")
    te, x_te = ab.probe_split(df, acts, "test")
    with timed(f"ground-truth probe ({len(tr)} train words)"):
        fit = ab.ground_truth_probe(x_tr, tr["label"].to_numpy(), steps=cfg.probe_steps, solver=cfg.probe_solver,
                                    batch_size=cfg.probe_batch_size, lr=cfg.probe_lr,
                                    weight_decay=cfg.probe_weight_decay, seed=cfg.seed, tol=cfg.convergence_tol,
                                    device=pick_device(device))
    w, b, conv = fit.weight, fit.bias, fit.convergence
    warn_unconverged("ground-truth probe", conv)
    metrics = ab.probe_metrics(w, b, x_te, te["label"].to_numpy(), cfg.min_probe_f1)
    begin(out, _sub(cfg, PROBE_FIELDS), [data])
    np.savez(out.dir / "probe.npz", weight=w.numpy(), bias=b.numpy())
    (out.dir / "probe_convergence.json").write_text(json.dumps(conv.as_dict(), indent=2))
    metrics.to_parquet(out.dir / "probe_metrics.parquet", index=False)
    (out.dir / "probe_metrics.md").write_text(metrics.to_markdown(index=False, floatfmt=".3f") + "\n")
    passing = metrics.loc[metrics["passes"], "letter"].tolist()
    mark_complete(out, letters_passing=len(passing), passing="".join(passing), mean_f1=float(metrics["f1"].mean()),
                  train_words=len(tr), test_words=len(te), converged=conv.converged)
    stage_logger().info("absorption probe: %d/26 letters pass F1 > %.2f (mean F1 %.3f)", len(passing),
                        cfg.min_probe_f1, float(metrics["f1"].mean()))


def load_probe(probe: ArtifactRef) -> tuple[torch.Tensor, torch.Tensor, pd.DataFrame]:
    d = require_complete(probe)
    z = np.load(d / "probe.npz")
    return torch.from_numpy(z["weight"]), torch.from_numpy(z["bias"]), pd.read_parquet(d / "probe_metrics.parquet")


def check_probe(probe: ArtifactRef, cfg: AbsorptionConfig) -> list[int]:
    """The letters that pass the probe-F1 gate; refuses when fewer than ``min_letters`` do."""
    metrics = pd.read_parquet(require_complete(probe) / "probe_metrics.parquet")
    passing = [ab.LETTERS.index(x) for x in metrics.loc[metrics["passes"], "letter"]]
    if len(passing) < cfg.min_letters:
        meta = completion_meta(probe.dir)
        raise ab.AbsorptionError(
            f"only {len(passing)}/26 letters pass the ground-truth probe gate (test F1 > {cfg.min_probe_f1}; "
            f"passing: {''.join(ab.LETTERS[i] for i in passing) or 'none'}; {meta.get('train_words')} train words); "
            f"the absorption evaluation needs absorption.min_letters={cfg.min_letters}. Raise absorption.max_words "
            f"(more probe words), pick another hook/layer, or lower absorption.min_letters / min_probe_f1. "
            f"Per-letter probe metrics: {probe.dir / 'probe_metrics.md'}"
        )
    return passing


def warn_unconverged(what: str, conv: "ab.Convergence") -> None:
    """Log ``what``'s convergence record; a warning when it did not converge."""
    logger = stage_logger()
    msg = (f"absorption {what}: {conv.solver}, {conv.steps} steps, objective {conv.final_loss:.6g}, change over the "
           f"last 10% of steps {conv.rel_change_last10:.2e}")
    if conv.solver == "adam":
        msg += f", continuation drop {conv.continuation_drop:.2e}"
    if conv.converged:
        logger.info("%s: converged (tol %.0e)", msg, conv.convergence_tol)
    else:
        logger.warning("%s: NOT converged (tol %.0e): its results measure an unfinished optimisation; raise its "
                       "steps (absorption.probe_steps / sparse_probe_steps)", msg, conv.convergence_tol)


# --------------------------------------------------------------------------------------- per SAE
def sae_ref(model: ArtifactRef, model_cfg: ModelConfig, data: ArtifactRef, probe: ArtifactRef, sae: ArtifactRef,
            cfg: AbsorptionConfig, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, PER_SAE, fingerprint(PER_SAE, cfg, model, data, probe, sae, f"dtype={model_cfg.resolved_dtype()}", _code()))


def check_sae(sae_model, sae_dir, hook: str, d_model: int) -> None:
    if sae_model.d_in != d_model:
        raise SAEHookMismatchError(f"SAE at {sae_dir} has d_in={sae_model.d_in} but the model's width at {hook} is "
                                   f"{d_model}: evaluate it with the model and hook it was trained on")
    saved = saved_hook(sae_dir)
    if saved and saved != hook:
        raise SAEHookMismatchError(f"SAE at {sae_dir} was trained on hook {saved} but the absorption "
                                   f"evaluation reads {hook}: set activations.hook to {saved} or drop the SAE")


@stage_task(sae_ref, name="absorption-sae")
def sae_task(out: ArtifactRef, model: ArtifactRef, model_cfg: ModelConfig, data: ArtifactRef, probe: ArtifactRef, sae: ArtifactRef,
             hook: str, cfg: AbsorptionConfig, root: str, device: str = "auto") -> None:
    logger = stage_logger()
    dev = pick_device(device)
    sae_dir = require_complete(sae)
    sae_model = load_sae(sae_dir, device=dev).eval()
    df, acts = load_data(data)
    check_sae(sae_model, sae_dir, hook, acts[ab.PROBE].shape[1])
    w, b, _ = load_probe(probe)
    passing = check_probe(probe, cfg)
    tr, x_tr = ab.probe_split(df, acts, "train")
    te, x_te = ab.probe_split(df, acts, "test")
    absorb, x_abs, absorb_test_index = ab.absorb_split(df, acts, te)
    runner = None
    if cfg.ablation:
        lm = load_model(model_cfg, model.dir, dev)
        toks = ab.absorb_tokens(lm.tokenizer, absorb, model_cfg.prepend_bos, data.dir)
        runner = ab.ablation_runner(lm, hook, sae_model, toks, absorb["position"].to_numpy(), w,
                                    ab.letter_token_ids(lm.tokenizer), cfg.ig_steps, cfg.ig_batch_size)
    with timed(f"absorption of {sae_dir.name}"):
        res = ab.evaluate_sae(
            sae_model, w, b, passing, x_tr, tr["label"].to_numpy(), x_te, te["label"].to_numpy(), x_abs,
            absorb_test_index, absorb["word"].tolist(), te["word"].tolist(), max_k=cfg.max_k, l1_decay=cfg.l1_decay,
            sparse_steps=cfg.sparse_probe_steps, sparse_solver=cfg.sparse_probe_solver,
            sparse_batch_size=cfg.sparse_probe_batch_size, tol=cfg.convergence_tol,
            jump=cfg.f1_jump_threshold, seed=cfg.seed, device=dev,
            ablation=runner, max_ablation_prompts=cfg.max_ablation_prompts, log=logger.info)
    warn_unconverged(f"L1 probe of {sae_dir.name}", res.l1_probe)
    n_bad = int(res.summary["absorption_refits_not_converged"])
    if n_bad:
        logger.warning("absorption %s: %d of %d k-sparse refits (sklearn LogisticRegression, max_iter %d) did not "
                       "converge", sae_dir.name, n_bad, len(res.k_sparse), ab.REFIT_MAX_ITER)
    l0 = ab.word_l0(sae_model, x_te)
    begin(out, cfg, [model, data, probe, sae])
    gt = json.loads((probe.dir / "probe_convergence.json").read_text())
    (out.dir / "convergence.json").write_text(json.dumps(
        {"ground_truth_probe": gt, "l1_probe": res.l1_probe.as_dict(), "refits": len(res.k_sparse),
         "refits_not_converged": n_bad}, indent=2))
    res.letters.to_parquet(out.dir / "letters.parquet", index=False)
    res.k_sparse.to_parquet(out.dir / "k_sparse.parquet", index=False)
    res.prompts.to_parquet(out.dir / "prompts.parquet", index=False)
    res.ablation.to_parquet(out.dir / "ablation.parquet", index=False)
    ab.example_absorptions(res.prompts, res.ablation).to_parquet(out.dir / "examples.parquet", index=False)
    (out.dir / "summary.json").write_text(json.dumps(res.summary, indent=2, sort_keys=True))
    (out.dir / "info.json").write_text(json.dumps({"word_l0": l0, "sae": str(sae_dir)}))
    mark_complete(out, **{k: v for k, v in res.summary.items() if v == v})
    logger.info("absorption %s: %s", sae_dir.name, json.dumps({k: round(v, 4) for k, v in res.summary.items()}))


# ---------------------------------------------------------------------------------------- results
def convergence_table(records: list[dict], saes: list[ArtifactRef]) -> pd.DataFrame:
    """One row per optimisation of the evaluation (the shared ground-truth probe once, then per SAE
    its L1 probe and its k-sparse refits) with ``converged``: the report warns on a false one."""
    rows = []
    if records:
        gt = records[0]["ground_truth_probe"]
        rows.append({"sae_fingerprint": None, "method": "ground-truth probe", "steps": gt["steps"],
                     "final_loss": gt["final_loss"], "rel_change_last10": gt["rel_change_last10"],
                     "converged": bool(gt["converged"])})
    for rec, s in zip(records, saes):
        l1 = rec["l1_probe"]
        rows.append({"sae_fingerprint": s.fingerprint, "method": "L1 probe", "steps": l1["steps"],
                     "final_loss": l1["final_loss"], "rel_change_last10": l1["rel_change_last10"],
                     "converged": bool(l1["converged"])})
        rows.append({"sae_fingerprint": s.fingerprint, "method": f"k-sparse refits ({rec['refits_not_converged']} of "
                     f"{rec['refits']} at max_iter)", "steps": None, "final_loss": None, "rel_change_last10": None,
                     "converged": rec["refits_not_converged"] == 0})
    return pd.DataFrame(rows)


def results_ref(per_sae: list[ArtifactRef], saes: list[ArtifactRef], root: str, **_) -> ArtifactRef:
    return artifact_ref(root, RESULTS, fingerprint(RESULTS, None, *per_sae, *saes, _code()))


@stage_task(results_ref, name="absorption-results")
def results_task(out: ArtifactRef, per_sae: list[ArtifactRef], saes: list[ArtifactRef], root: str) -> None:
    summ, letters, examples, conv = [], [], [], []
    for i, (r, s) in enumerate(zip(per_sae, saes)):
        d = require_complete(r)
        ident = {"sae_index": i, "sae_fingerprint": s.fingerprint, **sae_identity(require_complete(s)),
                 "word_l0": json.loads((d / "info.json").read_text())["word_l0"]}
        summ.append({**ident, **json.loads((d / "summary.json").read_text())})
        letters.append(pd.read_parquet(d / "letters.parquet"))
        examples.append(pd.read_parquet(d / "examples.parquet"))
        conv.append(json.loads((d / "convergence.json").read_text()))
    sdf, ldf, edf = ab.family_tables(summ, letters, examples)
    begin(out, None, [*per_sae, *saes])
    write_table(convergence_table(conv, saes), out.dir, "absorption_convergence")
    write_table(sdf, out.dir, "absorption_summary")
    write_table(ldf, out.dir, "absorption_letters")
    write_table(edf, out.dir, "absorption_examples")
    ab.plot_family(sdf, ldf, out.dir)
    mark_complete(out, saes=len(sdf))
    publish_table("absorption-summary", json.loads(sdf.to_json(orient="records")), "Absorption per SAE")
