"""Stage ``vocab``: alphabetic tokens, first-letter labels, 80/20 split by token (parquet)."""

from __future__ import annotations

from saeflow.artifacts import ArtifactRef, artifact_ref, begin, fingerprint, mark_complete, require_complete
from saeflow.config import VocabConfig
from saeflow.models import load_tokenizer
from saeflow.vocab import build_vocab
from tasks.common import stage_logger, stage_task

STAGE = "vocab"


def ref(model: ArtifactRef, cfg: VocabConfig, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, STAGE, fingerprint(STAGE, cfg, model))


@stage_task(ref, name="vocab")
def vocab_task(out: ArtifactRef, model: ArtifactRef, cfg: VocabConfig, root: str) -> None:
    tok = load_tokenizer(require_complete(model))
    df = build_vocab(tok, cfg)
    begin(out, cfg, [model])
    df.to_parquet(out.dir / "vocab.parquet", index=False)
    counts = df.groupby("split").size().to_dict()
    mark_complete(out, n_tokens=len(df), splits=counts, missing_letters=df.attrs.get("missing_letters", []))
    stage_logger().info("vocab: %d alphabetic tokens (%s)", len(df), counts)
