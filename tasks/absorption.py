"""Stages of the absorption evaluation (SPEC 1). Entry point for the flow: :func:`run`.

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
from prefect import task

from saeflow import absorption as ab
from saeflow.artifacts import ArtifactRef, artifact_ref, begin, completion_meta, fingerprint, mark_complete, require_complete
from saeflow.config import AbsorptionConfig, ModelConfig, PipelineConfig
from saeflow.device import pick_device
from saeflow.models import load_model, load_tokenizer
from saeflow.plots import MARKERS
from saeflow.saes import K_ARCHITECTURES, load_sae, saved_hook
from saeflow.store import ActivationStore
from saeflow.tables import write_table
from tasks.common import EvalContext, EvalOutput, Progress, code_version, publish_table, stage_logger, timed

DATA, PROBE, PER_SAE, RESULTS = "absorption_data", "absorption_probe", "absorption", "absorption_results"
DATA_FIELDS = ("seed", "max_words", "icl_examples")
PROBE_FIELDS = ("seed", "probe_epochs", "probe_batch_size", "probe_lr", "probe_weight_decay", "min_probe_f1")


def _code() -> str:
    """This evaluation's code version (its two modules): a code change gives its stages new fingerprints."""
    return code_version("saeflow.absorption", "tasks.absorption")


class SAEHookMismatchError(ab.AbsorptionError):
    """An SAE that was not trained on the hook / model width the evaluation reads."""


def _sub(cfg: AbsorptionConfig, fields: tuple[str, ...]) -> dict:
    return {f: getattr(cfg, f) for f in fields}


# ------------------------------------------------------------------------------------------ data
def data_ref(model: ArtifactRef, model_cfg: ModelConfig, vocab: ArtifactRef, hook: str, cfg: AbsorptionConfig,
             root: str, **_) -> ArtifactRef:
    payload = {**_sub(cfg, DATA_FIELDS), "hook": hook, "dtype": model_cfg.dtype, "prepend_bos": model_cfg.prepend_bos}
    return artifact_ref(root, DATA, fingerprint(DATA, payload, model, vocab, _code()))


def _write_store(path, d_model: int, rows: np.ndarray, tok: np.ndarray, pos: np.ndarray, attrs: dict) -> None:
    store = ActivationStore.open_for_write(path, d_model, 4096, "float32", attrs)
    store.append(rows, tok, pos, np.arange(len(rows)), len(rows))
    store.finish()


@task(name="absorption-data")
def data_task(model: ArtifactRef, model_cfg: ModelConfig, vocab: ArtifactRef, hook: str, cfg: AbsorptionConfig,
              root: str, device: str = "auto") -> ArtifactRef:
    out = data_ref(model, model_cfg, vocab, hook, cfg, root)
    if out.is_complete():
        return out
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
    df["row"] = -1
    begin(out, {"config": _sub(cfg, DATA_FIELDS), "hook": hook}, [model, vocab])
    progress = Progress(f"absorption prompts at {hook}")
    for kind in (ab.PROBE, ab.ABSORB):
        keep = df.index[(df["kind"] == kind) & (df["skip"] == "")].to_numpy()
        df.loc[keep, "row"] = np.arange(len(keep))
        toks = df.loc[keep, "tokens"].tolist()
        pos = df.loc[keep, "position"].to_numpy()
        acts = np.zeros((len(keep), lm.cfg.d_model), dtype=np.float32)
        for idx, rows in ab.word_activations(lm, hook, toks, pos, cfg.batch_size,
                                             lambda d, t: progress.update(d, t, f"{kind} prompts")):
            acts[idx] = rows
        if not np.isfinite(acts).all():
            raise ab.AbsorptionError(f"the model produced NaN/inf activations at {hook}; run it in float32")
        _write_store(out.dir / kind, lm.cfg.d_model, acts, df.loc[keep, "token_id"].to_numpy(), pos,
                     {"model": model_cfg.name, "hook": hook, "kind": kind})
    df.drop(columns=["tokens"]).to_parquet(out.dir / "prompts.parquet", index=False)
    counts = df.groupby(["kind", "skip"]).size().reset_index(name="n")
    mark_complete(out, n_prompts=len(df), skipped={f"{r.kind}:{r.skip or 'kept'}": int(r.n) for r in counts.itertuples()})
    return out


def load_data(data: ArtifactRef) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    d = require_complete(data)
    df = pd.read_parquet(d / "prompts.parquet")
    acts = {k: torch.from_numpy(ActivationStore.open(d / k).read(0, ActivationStore.open(d / k).n_rows)) for k in (ab.PROBE, ab.ABSORB)}
    return df, acts


def _probe_split(df: pd.DataFrame, acts: dict[str, torch.Tensor], split: str) -> tuple[pd.DataFrame, torch.Tensor]:
    sel = df[(df["kind"] == ab.PROBE) & (df["split"] == split) & (df["skip"] == "")]
    return sel, acts[ab.PROBE][torch.as_tensor(sel["row"].to_numpy())]


# ----------------------------------------------------------------------------------------- probe
def probe_ref(data: ArtifactRef, cfg: AbsorptionConfig, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, PROBE, fingerprint(PROBE, _sub(cfg, PROBE_FIELDS), data, _code()))


@task(name="absorption-probe")
def probe_task(data: ArtifactRef, cfg: AbsorptionConfig, root: str, device: str = "auto") -> ArtifactRef:
    out = probe_ref(data, cfg, root)
    if out.is_complete():
        return out
    df, acts = load_data(data)
    tr, x_tr = _probe_split(df, acts, "train")
    te, x_te = _probe_split(df, acts, "test")
    with timed(f"ground-truth probe ({len(tr)} train words)"):
        w, b = ab.train_linear_probe(x_tr, torch.as_tensor(tr["label"].to_numpy()), epochs=cfg.probe_epochs,
                                     batch_size=cfg.probe_batch_size, lr=cfg.probe_lr, end_lr=1e-5,
                                     weight_decay=cfg.probe_weight_decay, seed=cfg.seed, device=pick_device(device))
        # a label absent from train leaves fewer than 26 rows: pad so the probe is always 26-way
        if w.shape[0] < 26:
            w = torch.cat([w, torch.zeros(26 - w.shape[0], w.shape[1])])
            b = torch.cat([b, torch.full((26 - b.shape[0],), -1e4)])
    scores = (x_te @ w.T + b).numpy()
    metrics = ab.letter_metrics(scores, te["label"].to_numpy(), cfg.min_probe_f1)
    begin(out, _sub(cfg, PROBE_FIELDS), [data])
    np.savez(out.dir / "probe.npz", weight=w.numpy(), bias=b.numpy())
    metrics.to_parquet(out.dir / "probe_metrics.parquet", index=False)
    (out.dir / "probe_metrics.md").write_text(metrics.to_markdown(index=False, floatfmt=".3f") + "\n")
    passing = metrics.loc[metrics["passes"], "letter"].tolist()
    mark_complete(out, letters_passing=len(passing), passing="".join(passing), mean_f1=float(metrics["f1"].mean()),
                  train_words=len(tr), test_words=len(te))
    stage_logger().info("absorption probe: %d/26 letters pass F1 > %.2f (mean F1 %.3f)", len(passing),
                        cfg.min_probe_f1, float(metrics["f1"].mean()))
    return out


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


# --------------------------------------------------------------------------------------- per SAE
def sae_ref(model: ArtifactRef, model_cfg: ModelConfig, data: ArtifactRef, probe: ArtifactRef, sae: ArtifactRef,
            cfg: AbsorptionConfig, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, PER_SAE, fingerprint(PER_SAE, cfg, model, data, probe, sae, f"dtype={model_cfg.dtype}", _code()))


def check_sae(sae_model, sae_dir, hook: str, d_model: int) -> None:
    if sae_model.d_in != d_model:
        raise SAEHookMismatchError(f"SAE at {sae_dir} has d_in={sae_model.d_in} but the model's width at {hook} is "
                                   f"{d_model}: evaluate it with the model and hook it was trained on")
    saved = saved_hook(sae_dir)
    if saved and saved != hook:
        raise SAEHookMismatchError(f"SAE at {sae_dir} was trained on hook {saved} but the absorption "
                                   f"evaluation reads {hook}: set activations.hook to {saved} or drop the SAE")


@task(name="absorption-sae")
def sae_task(model: ArtifactRef, model_cfg: ModelConfig, data: ArtifactRef, probe: ArtifactRef, sae: ArtifactRef,
             hook: str, cfg: AbsorptionConfig, root: str, device: str = "auto") -> ArtifactRef:
    out = sae_ref(model, model_cfg, data, probe, sae, cfg, root)
    if out.is_complete():
        return out
    logger = stage_logger()
    dev = pick_device(device)
    sae_dir = require_complete(sae)
    sae_model = load_sae(sae_dir, device=dev).eval()
    df, acts = load_data(data)
    check_sae(sae_model, sae_dir, hook, acts[ab.PROBE].shape[1])
    w, b, _ = load_probe(probe)
    passing = check_probe(probe, cfg)
    tr, x_tr = _probe_split(df, acts, "train")
    te, x_te = _probe_split(df, acts, "test")
    absorb = df[(df["kind"] == ab.ABSORB) & (df["skip"] == "")]
    test_row = {int(t): i for i, t in enumerate(te["token_id"])}
    absorb = absorb[absorb["token_id"].isin(list(test_row))]
    x_abs = acts[ab.ABSORB][torch.as_tensor(absorb["row"].to_numpy())]
    runner = None
    if cfg.ablation:
        lm = load_model(model_cfg, model.dir, dev)
        toks = [lm.tokenizer(p, add_special_tokens=model_cfg.prepend_bos)["input_ids"] for p in absorb["prompt"]]
        bad = [i for i, (t, n) in enumerate(zip(toks, absorb["n_tokens"])) if len(t) != n]
        if bad:
            raise ab.AbsorptionError(f"{len(bad)} absorption prompts tokenize differently than when the data stage "
                                     f"ran (tokenizer changed?); delete {data.dir} and re-run")
        runner = ab.ablation_runner(lm, hook, sae_model, toks, absorb["position"].to_numpy(), w,
                                    ab.letter_token_ids(lm.tokenizer), cfg.ig_steps, cfg.ig_batch_size)
    with timed(f"absorption of {sae_dir.name}"):
        res = ab.evaluate_sae(
            sae_model, w, b, passing, x_tr, tr["label"].to_numpy(), x_te, te["label"].to_numpy(), x_abs,
            np.array([test_row[int(t)] for t in absorb["token_id"]], dtype=np.int64), absorb["word"].tolist(),
            te["word"].tolist(), max_k=cfg.max_k, l1_decay=cfg.l1_decay, sparse_epochs=cfg.sparse_probe_epochs,
            sparse_batch_size=cfg.sparse_probe_batch_size, jump=cfg.f1_jump_threshold, seed=cfg.seed, device=dev,
            ablation=runner, max_ablation_prompts=cfg.max_ablation_prompts, log=logger.info)
    with torch.no_grad():
        l0 = float((ab.encode_batched(sae_model, x_te) > 0).float().sum(-1).mean())
    begin(out, cfg, [model, data, probe, sae])
    res.letters.to_parquet(out.dir / "letters.parquet", index=False)
    res.k_sparse.to_parquet(out.dir / "k_sparse.parquet", index=False)
    res.prompts.to_parquet(out.dir / "prompts.parquet", index=False)
    res.ablation.to_parquet(out.dir / "ablation.parquet", index=False)
    ab.example_absorptions(res.prompts, res.ablation).to_parquet(out.dir / "examples.parquet", index=False)
    (out.dir / "summary.json").write_text(json.dumps(res.summary, indent=2, sort_keys=True))
    (out.dir / "info.json").write_text(json.dumps({"word_l0": l0, "sae": str(sae_dir)}))
    mark_complete(out, **{k: v for k, v in res.summary.items() if v == v})
    logger.info("absorption %s: %s", sae_dir.name, json.dumps({k: round(v, 4) for k, v in res.summary.items()}))
    return out


# ---------------------------------------------------------------------------------------- results
def results_ref(per_sae: list[ArtifactRef], saes: list[ArtifactRef], root: str, **_) -> ArtifactRef:
    return artifact_ref(root, RESULTS, fingerprint(RESULTS, None, *per_sae, *saes, _code()))


def _sae_identity(sae_dir) -> dict:
    raw = json.loads((sae_dir / "cfg.json").read_text())
    cfg = (raw.get("saeflow") or {}).get("sae_config") or {}
    return {"architecture": cfg.get("architecture", raw.get("architecture")), "width": int(raw["d_sae"]),
            "k": cfg.get("k") if cfg.get("architecture") in K_ARCHITECTURES else None}


@task(name="absorption-results")
def results_task(per_sae: list[ArtifactRef], saes: list[ArtifactRef], root: str) -> ArtifactRef:
    out = results_ref(per_sae, saes, root)
    if out.is_complete():
        return out
    summ, letters, examples = [], [], []
    for i, (r, s) in enumerate(zip(per_sae, saes)):
        d = require_complete(r)
        ident = {"sae_index": i, "sae_fingerprint": s.fingerprint, **_sae_identity(require_complete(s)),
                 "word_l0": json.loads((d / "info.json").read_text())["word_l0"]}
        summ.append({**ident, **json.loads((d / "summary.json").read_text())})
        lt = pd.read_parquet(d / "letters.parquet")
        lt.insert(0, "sae_index", i)
        letters.append(lt)
        ex = pd.read_parquet(d / "examples.parquet")
        ex.insert(0, "sae_index", i)
        examples.append(ex.head(10))
    sdf = pd.DataFrame(summ)
    ldf = pd.concat(letters, ignore_index=True)
    ldf["split_feats"] = ldf["split_feats"].map(lambda v: ",".join(str(int(x)) for x in v))
    edf = pd.concat(examples, ignore_index=True)
    edf["main_latents"] = edf["main_latents"].map(lambda v: ",".join(str(int(x)) for x in v))
    begin(out, None, [*per_sae, *saes])
    write_table(sdf, out.dir, "absorption_summary")
    write_table(ldf, out.dir, "absorption_letters")
    write_table(edf, out.dir, "absorption_examples")
    _plots(sdf, ldf, out.dir)
    mark_complete(out, saes=len(sdf))
    publish_table("absorption-summary", json.loads(sdf.to_json(orient="records")), "Absorption per SAE")
    return out


def _plots(sdf: pd.DataFrame, ldf: pd.DataFrame, folder) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("absorption_mean_fraction", "mean absorption fraction"), ("absorption_mean_full", "full absorption rate"),
               ("absorption_rate", "absorption rate (paper, ablation)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), dpi=110)
    widths = sorted(sdf["width"].unique())
    cmap = plt.get_cmap("viridis", max(len(widths), 2))
    for ax, (col, title) in zip(axes, metrics):
        for i, wdt in enumerate(widths):
            sub = sdf[sdf["width"] == wdt].sort_values("word_l0")
            for arch, g in sub.groupby("architecture"):
                ax.plot(g["word_l0"], g[col], marker=MARKERS.get(arch, "o"), color=cmap(i), label=f"{arch} w={wdt}")
        ax.set_xlabel("L0 on the probe words")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "absorption_vs_l0.png")
    plt.close(fig)
    n = sdf.shape[0]
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.2 * n), dpi=100, squeeze=False)
    for ax, (i, row) in zip(axes[:, 0], sdf.iterrows()):
        lt = ldf[ldf["sae_index"] == row["sae_index"]]
        x = np.arange(len(lt))
        ax.bar(x - 0.2, lt["mean_absorption_fraction"], 0.4, label="absorption fraction")
        ax.bar(x + 0.2, lt["full_absorption_rate"], 0.4, label="full absorption")
        ax.set_xticks(x, lt["letter"])
        ax.set_title(f"{row['architecture']} width={row['width']} k={row['k']}", fontsize=9)
        ax.set_ylim(0, 1)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "absorption_by_letter.png")
    plt.close(fig)


# -------------------------------------------------------------------------------------------- run
def run(ctx: EvalContext) -> EvalOutput:
    """Evaluate every SAE in ``ctx.saes`` (see :class:`tasks.common.EvalContext`)."""
    config: PipelineConfig = ctx.config
    cfg: AbsorptionConfig = config.absorption
    hook = config.activations.hook
    data = ctx.stage("absorption-data", data_ref, data_task, model=ctx.model, model_cfg=config.model, vocab=ctx.vocab,
                     hook=hook, cfg=cfg, device=ctx.device)
    probe = ctx.stage("absorption-probe", probe_ref, probe_task, data=data, cfg=cfg, device=ctx.device)
    check_probe(probe, cfg)
    per_sae = [ctx.stage(f"absorption-{i}", sae_ref, sae_task, model=ctx.model, model_cfg=config.model, data=data,
                         probe=probe, sae=s, hook=hook, cfg=cfg, device=ctx.device) for i, s in enumerate(ctx.saes)]
    results = ctx.stage("absorption-results", results_ref, results_task, per_sae=per_sae, saes=ctx.saes)
    return EvalOutput(per_sae=list(per_sae), results=results, refs=[data, probe])
