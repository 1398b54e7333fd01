"""Stage ``vocab``: alphabetic tokens, first-letter labels, 80/20 split by token (parquet)."""

from __future__ import annotations

from prefect import task

from saeflow.artifacts import ArtifactRef, artifact_ref, begin, fingerprint, mark_complete, require_complete
from saeflow.config import VocabConfig
from saeflow.models import load_tokenizer
from saeflow.vocab import build_vocab
from tasks.common import stage_logger

STAGE = "vocab"


def ref(model: ArtifactRef, cfg: VocabConfig, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, STAGE, fingerprint(STAGE, cfg, model))


@task(name="vocab")
def vocab_task(model: ArtifactRef, cfg: VocabConfig, root: str) -> ArtifactRef:
    out = ref(model, cfg, root)
    if out.is_complete():
        return out
    tok = load_tokenizer(require_complete(model))
    df = build_vocab(tok, cfg)
    begin(out, cfg, [model])
    df.to_parquet(out.dir / "vocab.parquet", index=False)
    counts = df.groupby("split").size().to_dict()
    mark_complete(out, n_tokens=len(df), splits=counts, missing_letters=df.attrs.get("missing_letters", []))
    stage_logger().info("vocab: %d alphabetic tokens (%s)", len(df), counts)
    return out
