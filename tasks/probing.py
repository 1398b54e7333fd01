"""Stages of the sparse-probing evaluation (SPEC 5), wired by the subflow :mod:`flows.evals.probing`;
the computations are in :mod:`saeflow.evals.probing`.

- ``probing-acts`` (one per dataset, and one per OOD test file): last-token activations of every
  prompt at the profile's hook, a Zarr :class:`~saeflow.store.ActivationStore` plus ``labels.npy``;
  keyed by (model, hook, dataset, row cap, max_seq_len) only, so every regime, SAE and profile with
  the same model and hook shares it.
- ``probing-baselines``: the baseline probes (logreg, PCA, KNN, XGBoost, MLP) on every configured
  (dataset, regime, setting); datasets spread over ``probing.n_jobs`` processes, one parquet per
  dataset as it finishes (a killed run resumes from the finished datasets).
- ``probing-sae`` (one per SAE): the SAE's top-k probes; each dataset is encoded once and every
  regime indexes the encoded rows; ``summary.json`` holds the SAE's ``probing_*`` columns.
- ``probing-results``: the long table with both quivers, the per-regime summary (the paper's Fig. 1),
  the quiver's picks, the solver fits that did not converge per method and SAE (``probing_convergence``)
  and the AUC plots.

The baseline and SAE stages log a warning naming how many solver fits did not converge (logistic
regression or MLP at ``max_iter`` or with a ``ConvergenceWarning``); the ``converged`` column of the
long table marks each result.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pandas as pd

from saeflow.artifacts import (ArtifactRef, artifact_ref, begin, completion_meta, fingerprint, mark_complete,
                               require_complete, write_atomic)
from saeflow.config import ModelConfig
from saeflow.device import pick_device
from saeflow.evals import probing as P
from saeflow.evals.common import package_modules, sae_identity
from saeflow.evals.probing.config import ProbingConfig
from saeflow.models import load_model
from saeflow.saes import saved_hook
from saeflow.store import ActivationStore
from saeflow.tables import write_table
from tasks.common import Progress, code_version, publish_markdown, stage_logger, stage_task

STAGE_ACTS, STAGE_BASE, STAGE_SAE, STAGE_RESULTS = "probing-acts", "probing-baselines", "probing-sae", "probing-results"
TABLE, SUMMARY, PICKS, CONVERGENCE = "probing_results", "probing_summary", "probing_quiver_picks", "probing_convergence"


def _code() -> str:
    """This evaluation's code version (every module of :mod:`saeflow.evals.probing`, the shared
    :mod:`saeflow.evals.common` and this one): a code change gives its stages new fingerprints."""
    return code_version(*package_modules("saeflow.evals.probing"), "saeflow.evals.common", "tasks.probing")


def _acts_code() -> str:
    """The activation cache's code version: only the functions that produce it (an edit elsewhere in
    the probing modules, e.g. a probe or a plot, must not re-extract 113 datasets)."""
    return code_version(acts_task, P.load_dataset, P.tokenize_prompts, P.last_token_activations)


# ---------------------------------------------------------------------------------- activations
def acts_ref(model: ArtifactRef, model_cfg: ModelConfig, hook: str, dataset: str, ood: bool, max_rows: int | None,
             max_seq_len: int, root: str, **_) -> ArtifactRef:
    key = {"dataset": dataset, "ood": ood, "hook": hook, "max_rows": None if ood else max_rows, "max_seq_len": max_seq_len}
    return artifact_ref(root, STAGE_ACTS, fingerprint(STAGE_ACTS, key, model, f"dtype={model_cfg.resolved_dtype()}", _acts_code()))


@stage_task(acts_ref, name="probing-acts", task_run_name="probing-acts-{dataset}")
def acts_task(out: ArtifactRef, model: ArtifactRef, model_cfg: ModelConfig, hook: str, dataset: str, ood: bool, max_rows: int | None,
              max_seq_len: int, root: str, device: str = "auto", batch_tokens: int = 4096) -> None:
    logger = stage_logger()
    prompts, y = P.load_dataset(dataset, ood, None if ood else max_rows)
    lm = load_model(model_cfg, require_complete(model), pick_device(device))
    ids = P.tokenize_prompts(lm.tokenizer, prompts, max_seq_len)
    n_tokens = sum(len(t) for t in ids)
    begin(out, {"dataset": dataset, "ood": ood, "hook": hook, "max_rows": max_rows, "max_seq_len": max_seq_len,
                "model": model_cfg.name}, [model])
    store = ActivationStore.open_for_write(out.dir, lm.cfg.d_model, min(4096, max(64, len(ids))), "float32",
                                           attrs={"model": model_cfg.name, "hook": hook, "dataset": dataset, "ood": ood,
                                                  "fingerprint": out.fingerprint})
    t0 = time.perf_counter()
    if store.n_rows != len(ids):  # a run killed after the append has its rows already
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        X = P.last_token_activations(lm, ids, hook, batch_tokens, pad)
        last = np.array([t[-1] for t in ids]), np.array([len(t) - 1 for t in ids])
        store.append(X, last[0], last[1], np.arange(len(ids)), contexts_done=len(ids))
    seconds = time.perf_counter() - t0
    np.save(out.dir / "labels.npy", y)
    store.finish(n_prompts=len(ids), n_tokens=n_tokens)
    mark_complete(out, n_rows=len(ids), d_model=store.d_model, n_tokens=n_tokens, seconds=seconds, hook=hook)
    logger.info("probing-acts %s%s: %d prompts, %d tokens in %.1f s (%.0f tok/s)", dataset, " (OOD)" if ood else "",
                len(ids), n_tokens, seconds, n_tokens / max(seconds, 1e-9))


# ---------------------------------------------------------------------------------- shared helpers
def _settings(cfg: ProbingConfig) -> dict[str, list[float | None]]:
    return {r: P.regime_settings(r, cfg.scarcity_sizes, cfg.imbalance_fracs, cfg.noise_fracs) for r in cfg.regimes}


def _split_key(cfg: ProbingConfig) -> dict[str, Any]:
    return {"seed": cfg.seed, "regimes": list(cfg.regimes), "settings": _settings(cfg)}


def _threads(cfg: ProbingConfig) -> int | None:
    return 1 if cfg.n_jobs > 1 else None


def _run_datasets(out: ArtifactRef, fn, specs: list[P.RunSpec], n_jobs: int, label: str) -> pd.DataFrame:
    """Run ``fn(spec)`` per dataset (parallel), saving each finished dataset's rows as a part."""
    parts = out.dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    todo = [s for s in specs if not (parts / f"{s.dataset}.parquet").is_file()]
    progress = Progress(label)
    done = len(specs) - len(todo)
    if done:
        stage_logger().info("%s: resuming, %d of %d datasets already done", label, done, len(specs))
    for i, df in P.run_parallel(fn, todo, n_jobs):
        write_atomic(parts / f"{todo[i].dataset}.parquet", lambda tmp: df.to_parquet(tmp, index=False))
        done += 1
        progress.update(done, len(specs), f"{done}/{len(specs)} datasets ({todo[i].dataset})", force=True)
    frames = [pd.read_parquet(parts / f"{s.dataset}.parquet") for s in specs]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(P.ROW_COLUMNS))


def sae_label(sae: ArtifactRef) -> str:
    """Short name of an SAE artifact for tables: ``topk-w1024-k16`` (:func:`saeflow.evals.probing.sae_label`)."""
    return P.sae_label(sae_identity(require_complete(sae)))


def _specs(cfg: ProbingConfig, acts: dict[str, ArtifactRef], ood: dict[str, ArtifactRef], **kw: Any) -> list[P.RunSpec]:
    return [P.RunSpec(dataset=name, acts_dir=str(require_complete(ref_)),
                      ood_dir=str(require_complete(ood[name])) if name in ood else None,
                      regimes=tuple(cfg.regimes), settings=_settings(cfg), seed=cfg.seed, threads=_threads(cfg), **kw)
            for name, ref_ in acts.items()]


# ---------------------------------------------------------------------------------- baselines
def baselines_ref(acts: dict[str, ArtifactRef], ood: dict[str, ArtifactRef], cfg: ProbingConfig, root: str, **_) -> ArtifactRef:
    key = {**_split_key(cfg), "methods": list(cfg.methods), "logreg_penalty": cfg.logreg_penalty,
           "datasets": sorted(acts), "ood": sorted(ood)}
    return artifact_ref(root, STAGE_BASE, fingerprint(STAGE_BASE, key, *acts.values(), *ood.values(), _code()))


@stage_task(baselines_ref, name="probing-baselines")
def baselines_task(out: ArtifactRef, acts: dict[str, ArtifactRef], ood: dict[str, ArtifactRef], cfg: ProbingConfig, root: str) -> None:
    begin(out, cfg, [*acts.values(), *ood.values()])
    t0 = time.perf_counter()
    specs = _specs(cfg, acts, ood, methods=tuple(cfg.methods), logreg_penalty=cfg.logreg_penalty)
    df = _run_datasets(out, P.baseline_rows, specs, cfg.n_jobs, "probing baselines")
    df.to_parquet(out.dir / "rows.parquet", index=False)
    mark_complete(out, rows=len(df), skipped=int(df["skipped"].notna().sum()), seconds=time.perf_counter() - t0)
    _warn_not_converged(df, "probing baselines")


def _warn_not_converged(df: pd.DataFrame, what: str) -> None:
    """A log warning when some of ``df``'s solver fits did not converge (:func:`saeflow.evals.probing.not_converged_note`)."""
    note = P.not_converged_note(df)
    if note:
        stage_logger().warning("%s: %s; the results are kept as they are (see the converged column of %s)", what, note,
                               TABLE)


# ---------------------------------------------------------------------------------- SAE probes
def sae_ref(sae: ArtifactRef, acts: dict[str, ArtifactRef], ood: dict[str, ArtifactRef], cfg: ProbingConfig, root: str,
            **_) -> ArtifactRef:
    key = {**_split_key(cfg), "ks_normal": list(cfg.ks_normal), "ks_other": list(cfg.ks_other),
           "sae_penalty": cfg.sae_penalty, "normalization": cfg.mean_diff_normalization, "binarize": cfg.binarize,
           "datasets": sorted(acts), "ood": sorted(ood)}
    return artifact_ref(root, STAGE_SAE, fingerprint(STAGE_SAE, key, sae, *acts.values(), *ood.values(), _code()))


@stage_task(sae_ref, name="probing-sae", task_run_name="probing-sae-{sae.fingerprint}")
def sae_task(out: ArtifactRef, sae: ArtifactRef, acts: dict[str, ArtifactRef], ood: dict[str, ArtifactRef], cfg: ProbingConfig,
             root: str) -> None:
    sae_dir = require_complete(sae)
    hook = saved_hook(sae_dir)
    for ref_ in list(acts.values())[:1]:
        acts_hook = ActivationStore.open(require_complete(ref_)).attrs.get("hook")
        if hook and acts_hook and hook != acts_hook:
            raise P.ProbingError(f"SAE at {sae_dir} reads hook {hook} but the probing activations are from {acts_hook}; "
                                 "probe it with a profile whose activations.hook matches")
    begin(out, cfg, [sae, *acts.values(), *ood.values()])
    t0 = time.perf_counter()
    name = sae_label(sae)
    ks = {r: tuple(cfg.ks_normal if r == "normal" else cfg.ks_other) for r in cfg.regimes}
    specs = _specs(cfg, acts, ood, sae_dir=str(sae_dir), sae_name=name, ks=ks, sae_penalty=cfg.sae_penalty,
                   normalization=cfg.mean_diff_normalization, binarize=cfg.binarize)
    df = _run_datasets(out, P.sae_rows, specs, cfg.n_jobs, f"probing SAE {name}")
    df.to_parquet(out.dir / "rows.parquet", index=False)
    summary = P.sae_summary(df)
    (out.dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    mark_complete(out, rows=len(df), sae=name, seconds=time.perf_counter() - t0)
    stage_logger().info("probing SAE %s: %s", name, json.dumps({k: round(v, 4) for k, v in summary.items()}))
    _warn_not_converged(df, f"probing SAE {name}")


# ---------------------------------------------------------------------------------- results
def results_ref(baselines: ArtifactRef, saes: list[ArtifactRef], cfg: ProbingConfig, unknown: dict[str, str], root: str,
                **_) -> ArtifactRef:
    key = {"quiver_ks": list(cfg.quiver_ks), "methods": list(cfg.methods), "unknown": unknown}
    return artifact_ref(root, STAGE_RESULTS, fingerprint(STAGE_RESULTS, key, baselines, *saes, _code()))


@stage_task(results_ref, name="probing-results")
def results_task(out: ArtifactRef, baselines: ArtifactRef, saes: list[ArtifactRef], cfg: ProbingConfig, unknown: dict[str, str],
                 root: str) -> None:
    frames = [pd.read_parquet(require_complete(baselines) / "rows.parquet")]
    frames += [pd.read_parquet(require_complete(s) / "rows.parquet") for s in saes]
    df = P.results_table(frames, unknown, cfg.quiver_ks, cfg.methods)
    names = [str(completion_meta(s.dir)["sae"]) for s in saes]
    summary = P.regime_summary(df, names, cfg.quiver_ks)
    begin(out, cfg, [baselines, *saes])
    paths = write_table(df, out.dir, TABLE)
    paths += write_table(summary, out.dir, SUMMARY)
    paths += write_table(P.picks_table(df), out.dir, PICKS)
    paths += write_table(P.convergence_table(df), out.dir, CONVERGENCE)
    paths += P.plot_regimes(df, cfg.regimes, names, cfg.quiver_ks, out.dir)
    mark_complete(out, rows=len(df), skipped=int(df["skipped"].notna().sum()), files=[str(p) for p in paths])
    publish_markdown("probing-summary", summary.to_markdown(index=False, floatfmt=".4f"), "Sparse probing: mean test AUC per regime")
    stage_logger().info("probing summary:\n%s", summary.to_markdown(index=False, floatfmt=".4f"))
    _warn_not_converged(df, "probing (all probes)")
