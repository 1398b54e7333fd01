"""Stage ``imported``: SAEs from outside the pipeline, checked and copied in so the evaluations
treat them like trained family members.

Two kinds of ``import_saes`` entries (:class:`saeflow.config.ImportSAE`): a local folder in
SAELens layout (keyed by the SHA-256 of its files: a changed SAE is a new artifact) and a SAELens
release + id (keyed by release and id; fetched once with SAELens' own loaders,
:func:`saeflow.published.fetch_saelens_release`, so a re-run downloads nothing). Either is checked
against the profile's activations (``d_in``, hook) and model (``metadata.model_name``) before it
is marked complete; the artifact's ``cfg.json`` records where it came from
(``metadata.saeflow_source``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from saeflow.artifacts import (ArtifactError, ArtifactRef, artifact_ref, begin, fingerprint, mark_complete, require_complete,
                               sha256_file, write_json_atomic)
from saeflow.config import ImportSAE, import_spec
from saeflow.models import read_meta
from saeflow.published import fetch_saelens_release, model_matches
from saeflow.saes import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, load_sae
from saeflow.saes.errors import SAEFormatError
from saeflow.saes.foreign import checkpoint_files, convert
from saeflow.store import ActivationStore
from tasks.common import stage_logger, stage_task
from tasks.metrics import SAEMismatchError, check_sae_fits

STAGE = "imported"


def content_fingerprint(path: str | Path, fmt: str = "saelens") -> str:
    """Hash of the checkpoint's config and weights files: a changed SAE is a new artifact."""
    folder = Path(path)
    try:
        files = checkpoint_files(folder, fmt)
    except SAEFormatError as exc:
        raise ArtifactError(f"import_saes: {exc}") from None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def source_key(entry: str | ImportSAE) -> dict[str, Any]:
    """What keys an entry's artifact: a folder's content hash, or a release's name and id."""
    spec = import_spec(entry)
    if spec.release is not None:
        return {"release": spec.release, "id": spec.id, **({"loader": spec.loader} if spec.loader else {})}
    if spec.format == "saelens":
        return {"content": content_fingerprint(str(spec.path))}
    return {"content": content_fingerprint(str(spec.path), spec.format), "format": spec.format, "hook": spec.hook}


def ref(entry: str | ImportSAE, acts: ArtifactRef, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, STAGE, fingerprint(STAGE, source_key(entry), acts))


def check_model(cfg: dict[str, Any], where: str, model: ArtifactRef | None) -> None:
    """Refuse an SAE whose ``metadata.model_name`` names another model than the profile's."""
    if model is None:
        return
    sae_model = (cfg.get("metadata") or {}).get("model_name")
    meta = read_meta(Path(require_complete(model)))
    if not model_matches(sae_model, str(meta.get("name")), meta.get("tl_name")):
        raise SAEMismatchError(
            f"SAE {where} was trained on model {sae_model!r} but this profile's model is {meta.get('name')!r}: "
            "import it into a profile of that model (model.name), or import an SAE of this model")


@stage_task(ref, name="import-sae", task_run_name="import-{entry}")
def import_sae_task(out: ArtifactRef, entry: str | ImportSAE, acts: ArtifactRef, root: str,
                    model: ArtifactRef | None = None) -> None:
    spec = import_spec(entry)
    store = ActivationStore.open(require_complete(acts))
    with tempfile.TemporaryDirectory(prefix="saeflow-import-") as tmp:
        if spec.release is not None:
            src = Path(tmp)
            source = fetch_saelens_release(spec.release, str(spec.id), src, loader=spec.loader)
            where = f"{spec.release}/{spec.id}"
        else:
            folder = Path(str(spec.path))
            files = checkpoint_files(folder, spec.format)
            source = {"kind": "folder", "format": spec.format, "path": str(folder.resolve()),
                      "sha256": {f.name: sha256_file(f) for f in files}}
            where = f"at {folder}"
            src = folder
            if spec.format != "saelens":  # converted once into the SAELens layout
                src = Path(tmp)
                convert(spec.format, folder, src, hook=spec.hook)
        sae = load_sae(src)  # SAEFormatError names the file and the problem
        check_sae_fits(sae, src, store)
        cfg = json.loads((src / SAE_CFG_FILENAME).read_text())
        check_model(cfg, where, model)
        ours = cfg.get("saeflow", {}).get("sae_config", {})
        meta = {"architecture": ours.get("architecture") or cfg.get("architecture"), "width": int(sae.d_sae),
                "k": ours.get("k", cfg.get("k")), "source": source.get("path") or where,
                "published": spec.release is not None}
        label = spec.name or (spec.label if spec.release is not None else None)
        if label:
            meta["label"] = label
        begin(out, {"sae": meta, "source": source}, [acts])
        shutil.copy2(src / SAE_WEIGHTS_FILENAME, out.dir / SAE_WEIGHTS_FILENAME)
        cfg.setdefault("metadata", {})["saeflow_source"] = {**source, "label": label}
        write_json_atomic(out.dir / SAE_CFG_FILENAME, cfg)
    mark_complete(out, **meta)
    stage_logger().info("imported SAE %s (%s, width %d)", where, meta["architecture"], meta["width"])

