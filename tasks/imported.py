"""Stage ``imported``: SAEs in SAELens layout from outside the pipeline, checked and copied in so
the evaluations treat them like trained family members."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from saeflow.artifacts import ArtifactError, ArtifactRef, artifact_ref, begin, fingerprint, mark_complete, require_complete
from saeflow.saes import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, load_sae
from saeflow.store import ActivationStore
from tasks.common import stage_logger, stage_task
from tasks.metrics import check_sae_fits

STAGE = "imported"


def content_fingerprint(path: str | Path) -> str:
    """Hash of the folder's ``cfg.json`` and weights: a changed SAE is a new artifact."""
    folder = Path(path)
    files = [folder / SAE_CFG_FILENAME, folder / SAE_WEIGHTS_FILENAME]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ArtifactError(
            f"import_saes: {folder} is not an SAE folder in SAELens layout (missing {', '.join(missing)}); "
            "point import_saes at a folder holding cfg.json and sae_weights.safetensors"
        )
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def ref(path: str, acts: ArtifactRef, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, STAGE, fingerprint(STAGE, {"content": content_fingerprint(path)}, acts))


@stage_task(ref, name="import-sae", task_run_name="import-{path}")
def import_sae_task(out: ArtifactRef, path: str, acts: ArtifactRef, root: str) -> None:
    src = Path(path)
    sae = load_sae(src)  # SAEFormatError names the file and the problem
    store = ActivationStore.open(require_complete(acts))
    check_sae_fits(sae, src, store)
    cfg = json.loads((src / SAE_CFG_FILENAME).read_text())
    ours = cfg.get("saeflow", {}).get("sae_config", {})
    meta = {"architecture": ours.get("architecture") or cfg.get("architecture"), "width": int(sae.d_sae),
            "k": ours.get("k", cfg.get("k")), "source": str(src.resolve())}
    begin(out, {"sae": meta}, [acts])
    for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME):
        shutil.copy2(src / name, out.dir / name)
    mark_complete(out, **meta)
    stage_logger().info("imported SAE %s (%s, width %d)", src, meta["architecture"], meta["width"])
