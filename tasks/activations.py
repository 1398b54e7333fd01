"""Stage ``activations``: residual-stream activations at one hook into a chunked Zarr store.

Resumable: the store records its durable rows after every batch; a re-run after a kill reopens
the partial folder and continues from the last completed batch.
"""

from __future__ import annotations

import time

from saeflow.artifacts import ArtifactRef, artifact_ref, begin, completion_meta, fingerprint, mark_complete, require_complete
from saeflow.config import ActivationsConfig, ModelConfig
from saeflow.corpus import special_token_ids
from saeflow.device import pick_device
from saeflow.extract import extract_activations
from saeflow.models import load_model, validate_hook
from saeflow.store import ActivationStore
from tasks.common import Progress, stage_logger, stage_task
from tasks.corpus import load_tokens

STAGE = "activations"


def ref(model: ArtifactRef, model_cfg: ModelConfig, corpus: ArtifactRef, cfg: ActivationsConfig, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, STAGE, fingerprint(STAGE, cfg, model, corpus, f"dtype={model_cfg.resolved_dtype()}"))


def check_hook(model: ArtifactRef, hook: str) -> int:
    """Fail fast (before any model load) on an unknown hook or a layer out of range."""
    return validate_hook(completion_meta(require_complete(model)), hook)


@stage_task(ref, name="activations", task_run_name="activations-{cfg.hook}")
def activations_task(out: ArtifactRef, model: ArtifactRef, model_cfg: ModelConfig, corpus: ArtifactRef, cfg: ActivationsConfig,
                     root: str, device: str = "auto") -> None:
    logger = stage_logger()
    check_hook(model, cfg.hook)
    tokens = load_tokens(corpus)
    cmeta = completion_meta(corpus.dir)
    dev = pick_device(device)
    lm = load_model(model_cfg, model.dir, dev)
    begin(out, {**cfg.model_dump(mode="json"), "model_dtype": model_cfg.resolved_dtype(device)}, [model, corpus])
    store = ActivationStore.open_for_write(
        out.dir, lm.cfg.d_model, cfg.chunk_rows, cfg.dtype,
        attrs={"model": model_cfg.name, "hook": cfg.hook, "model_dtype": model_cfg.resolved_dtype(device),
               "fingerprint": out.fingerprint, "model_fingerprint": model.fingerprint,
               "corpus_fingerprint": corpus.fingerprint},
    )
    resumed = store.progress()["contexts"]
    if resumed:
        logger.info("activations: resuming a partial store at context %d of %d", resumed, tokens.shape[0])
    progress = Progress(f"extracting {cfg.hook}")
    exclude = special_token_ids(lm.tokenizer)
    t0 = time.perf_counter()
    extract_activations(lm, tokens, cfg.hook, store, cfg.batch_size, exclude,
                        on_progress=lambda d, n, tps: progress.update(d, n, f"{d}/{n} contexts, {tps:,.0f} tok/s"))
    seconds = time.perf_counter() - t0
    # rows of the held-out contexts start where the training contexts end
    train_contexts = int(cmeta["train_contexts"])
    ctx = store.read_rows("context", 0, store.n_rows)
    train_rows = int((ctx < train_contexts).sum())
    store.finish(train_rows=train_rows, train_contexts=train_contexts, n_contexts=int(tokens.shape[0]))
    mark_complete(out, n_rows=store.n_rows, d_model=store.d_model, train_rows=train_rows, hook=cfg.hook,
                  seconds=seconds, resumed_from_context=int(resumed))
    logger.info("activations: %d rows x %d at %s in %.1f s", store.n_rows, store.d_model, cfg.hook, seconds)
