"""Stage ``metrics``: core SAE quality metrics (SPEC 4) on held-out activations and contexts."""

from __future__ import annotations

import json

import numpy as np
import torch

from saeflow.artifacts import ArtifactRef, artifact_ref, begin, completion_meta, fingerprint, mark_complete, require_complete
from saeflow.config import MetricsConfig, ModelConfig
from saeflow.corpus import special_token_ids
from saeflow.device import pick_device
from saeflow.metrics import CEReference, ce_metrics, ce_reference, reconstruction_metrics
from saeflow.models import load_model
from saeflow.saes import load_sae, saved_hook
from saeflow.store import ActivationStore
from tasks.common import code_version, stage_logger, stage_task, timed
from tasks.corpus import load_tokens

STAGE = "metrics"


def _code() -> str:
    """This evaluation's code version (its two modules): a code change gives its stages new fingerprints."""
    return code_version("saeflow.metrics", "tasks.metrics")


_CE_REFERENCE: dict[tuple, CEReference] = {}  # one per process: the family's SAEs share it


def shared_ce_reference(lm, key: tuple, hook: str, tokens: torch.Tensor, batch_size: int, ignore: set[int]) -> CEReference:
    """The clean / zero-ablation reference for these eval tokens, built once per process."""
    if key not in _CE_REFERENCE:
        _CE_REFERENCE.clear()  # keep at most one (it holds [positions, vocab] log-probs)
        _CE_REFERENCE[key] = ce_reference(lm, hook, tokens, batch_size, ignore)
    return _CE_REFERENCE[key]


class SAEMismatchError(ValueError):
    """An SAE that does not fit the activations it is evaluated on."""


def ref(model: ArtifactRef, model_cfg: ModelConfig, corpus: ArtifactRef, acts: ArtifactRef, sae: ArtifactRef,
        cfg: MetricsConfig, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, STAGE, fingerprint(STAGE, cfg, model, corpus, acts, sae, f"dtype={model_cfg.resolved_dtype()}", _code()))


def check_sae_fits(sae, sae_dir, store: ActivationStore) -> None:
    if sae.d_in != store.d_model:
        raise SAEMismatchError(
            f"SAE at {sae_dir} has d_in={sae.d_in} but the activations at {store.root} have width {store.d_model}: "
            "evaluate it on activations of the model and hook it was trained on"
        )
    hook = saved_hook(sae_dir)
    if hook and store.attrs.get("hook") and hook != store.attrs["hook"]:
        raise SAEMismatchError(f"SAE at {sae_dir} was trained on hook {hook} but the activations are from {store.attrs['hook']}")


def sae_on_store(acts: ArtifactRef, sae: ArtifactRef, device: str):
    """``(device, store, sae_dir, sae)`` for a per-SAE stage: the picked device, the activation store,
    the SAE's folder and the SAE loaded on that device, checked to fit the store (width and hook)."""
    dev = pick_device(device)
    store = ActivationStore.open(require_complete(acts))
    sae_dir = require_complete(sae)
    sae_model = load_sae(sae_dir, device=dev)
    check_sae_fits(sae_model, sae_dir, store)
    return dev, store, sae_dir, sae_model


@stage_task(ref, name="metrics")
def metrics_task(out: ArtifactRef, model: ArtifactRef, model_cfg: ModelConfig, corpus: ArtifactRef, acts: ArtifactRef, sae: ArtifactRef,
                 cfg: MetricsConfig, root: str, device: str = "auto") -> None:
    logger = stage_logger()
    dev, store, sae_dir, sae_model = sae_on_store(acts, sae, device)
    start = store.train_rows
    end = min(store.n_rows, start + cfg.n_variance_tokens)
    if end <= start:
        raise SAEMismatchError(f"activation store at {store.root} has no held-out rows; raise corpus.eval_contexts")
    with timed("reconstruction metrics"):
        rec = reconstruction_metrics(sae_model, store.iter_rows(start, end, 4096), dev, cfg.dense_threshold,
                                     cosine_rows=cfg.cosine_rows)
    result = {k: v for k, v in rec.items() if not isinstance(v, (np.ndarray, list))}
    if cfg.ce_batches > 0:
        tokens = load_tokens(corpus)
        train_contexts = int(completion_meta(corpus.dir)["train_contexts"])
        eval_tokens = torch.from_numpy(tokens[train_contexts:train_contexts + cfg.ce_batches * cfg.ce_batch_size].astype(np.int64))
        lm = load_model(model_cfg, require_complete(model), dev)
        hook, ignore = store.attrs["hook"], special_token_ids(lm.tokenizer)
        key = (model.fingerprint, model_cfg.resolved_dtype(), corpus.fingerprint, hook, cfg.ce_batches, cfg.ce_batch_size, str(dev))
        with timed("CE / KL metrics"):
            reference = shared_ce_reference(lm, key, hook, eval_tokens, cfg.ce_batch_size, ignore)
            ce = ce_metrics(lm, sae_model, hook, eval_tokens, cfg.ce_batch_size, ignore, reference=reference)
        result.update(ce)
    begin(out, cfg, [model, corpus, acts, sae])
    np.save(out.dir / "density.npy", np.asarray(rec["density"]))
    hist = {"counts": np.asarray(rec["density_hist_counts"]).tolist(), "edges": np.asarray(rec["density_hist_edges"]).tolist()}
    (out.dir / "density_hist.json").write_text(json.dumps(hist))
    (out.dir / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    mark_complete(out, **{k: v for k, v in result.items() if isinstance(v, (int, float))})
    logger.info("metrics: %s", json.dumps({k: round(v, 4) for k, v in result.items() if isinstance(v, float)}))


def load_metrics(ref_: ArtifactRef) -> dict:
    return json.loads((require_complete(ref_) / "metrics.json").read_text())
