"""Stage ``corpus``: fixed-length token contexts for SAE training and evaluation."""

from __future__ import annotations

import numpy as np

from saeflow.artifacts import ArtifactRef, artifact_ref, begin, fingerprint, mark_complete, require_complete
from saeflow.config import CorpusConfig
from saeflow.corpus import corpus_contexts
from saeflow.models import load_tokenizer
from tasks.common import stage_logger, stage_task, timed

STAGE = "corpus"


def ref(model: ArtifactRef, cfg: CorpusConfig, prepend_bos: bool, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, STAGE, fingerprint(STAGE, cfg, model, f"bos={prepend_bos}"))


@stage_task(ref, name="corpus")
def corpus_task(out: ArtifactRef, model: ArtifactRef, cfg: CorpusConfig, prepend_bos: bool, root: str) -> None:
    tok = load_tokenizer(require_complete(model))
    with timed("building corpus contexts"):
        ctx = corpus_contexts(cfg, tok, prepend_bos)
    begin(out, cfg, [model])
    np.save(out.dir / "tokens.npy", ctx)
    mark_complete(out, n_contexts=int(ctx.shape[0]), context_size=int(ctx.shape[1]),
                  train_contexts=int(ctx.shape[0] - cfg.eval_contexts), eval_contexts=cfg.eval_contexts)
    stage_logger().info("corpus: %d contexts x %d tokens", *ctx.shape)


def load_tokens(corpus: ArtifactRef) -> np.ndarray:
    return np.load(require_complete(corpus) / "tokens.npy")
