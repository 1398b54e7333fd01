"""Published SAEs as inputs (issue #27): a SAELens release fetched once through SAELens' own loaders.

:func:`fetch_saelens_release` calls ``sae_lens.SAE.from_pretrained(release, id)`` (its registry,
``pretrained_saes.yaml``, and its converters: no hand-written converter here) and writes the SAE
with SAELens' own ``save_model`` (``cfg.json`` + ``sae_weights.safetensors``): the folder
:func:`saeflow.saes.load_sae` reads, with ``apply_b_dec_to_input``, the JumpReLU thresholds and
``normalize_activations`` exactly as SAELens loaded them. It returns the provenance (hub repo,
folder, commit, SHA-256 of each downloaded file) that the ``imported`` stage records.

The hub is only needed once: the pipeline caches the imported SAE as an artifact keyed by
``(release, id)``, so a re-run reads the artifact and touches no network. Without a hub and without
that artifact, :class:`PublishedSAEError` names the release, the id and the two ways out. SAELens
reads tensor shapes over HTTP before it downloads (ENVIRONMENT.md), so a populated Hugging Face
cache alone is not enough offline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from saeflow.artifacts import ArtifactError, sha256_file

__all__ = ["PublishedSAEError", "fetch_saelens_release", "model_matches", "hub_location"]


class PublishedSAEError(ArtifactError):
    """A published SAE that cannot be fetched (no hub, unknown release or id, a download that failed)."""


def _ways_out(release: str, sae_id: str) -> str:
    return (f"two ways out: run once with internet access (the SAE is then cached as an artifact and later runs need "
            f"no network), or save it on a machine that has it (python -c \"from sae_lens import SAE; "
            f"SAE.from_pretrained('{release}', '{sae_id}').save_model('FOLDER')\"), copy FOLDER here and list it in "
            f"import_saes as {{path: FOLDER}}")


def _offline_cause(exc: BaseException) -> str | None:
    """Why the hub was not reachable, when the offline flag or the exception chain says so."""
    if _hub_offline():
        return "HF_HUB_OFFLINE is set and the files are not all in the local Hugging Face cache"
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        name = type(e).__name__
        if name == "OfflineModeIsEnabled":
            return "HF_HUB_OFFLINE is set"
        if name == "LocalEntryNotFoundError":
            return "the file is not in the local Hugging Face cache and the hub cannot be asked"
        if name in ("ConnectError", "ConnectTimeout", "ConnectionError", "NewConnectionError", "MaxRetryError",
                    "ConnectionRefusedError", "gaierror"):
            return f"no connection to {hub_endpoint()} ({name})"
        e = e.__cause__ or e.__context__
    return None


def _hub_offline() -> bool:
    """Whether huggingface_hub itself runs offline (its ``HF_HUB_OFFLINE`` constant, which governs its
    requests; not saeflow.model_sources' check, which also reads ``TRANSFORMERS_OFFLINE`` from the
    environment for loading models through transformers)."""
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub is a dependency
        return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_endpoint() -> str:
    """The hub endpoint huggingface_hub uses in this process (``HF_ENDPOINT``, default huggingface.co)."""
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except Exception:  # pragma: no cover - huggingface_hub is a dependency
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_location(release: str, sae_id: str) -> tuple[str, str]:
    """``(repo_id, folder in the repo)`` of a SAELens release's SAE (a hub repo id is its own release)."""
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    return get_repo_id_and_folder_name(release, sae_id)


def _snapshot_files(repo_id: str, folder: str) -> tuple[str | None, dict[str, str]]:
    """Commit and ``{path in repo: sha256}`` of the files the hub cache holds under ``folder``."""
    from huggingface_hub import constants

    repo_dir = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    if not ref.is_file():
        return None, {}
    commit = ref.read_text().strip()
    base = repo_dir / "snapshots" / commit
    files = {}
    for f in sorted((base / folder).rglob("*")) if (base / folder).is_dir() else []:
        if f.is_file():
            files[str(f.relative_to(base))] = sha256_file(f)
    return commit, files


def _converter(loader: str | None) -> Any:
    """SAELens' converter named ``loader`` (``None``: let SAELens pick)."""
    if loader is None:
        return None
    from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_LOADERS

    if loader not in NAMED_PRETRAINED_SAE_LOADERS:
        raise PublishedSAEError(f"import_saes: loader {loader!r} is not a SAELens converter; known: "
                                f"{', '.join(sorted(NAMED_PRETRAINED_SAE_LOADERS))}")
    return NAMED_PRETRAINED_SAE_LOADERS[loader]


def fetch_saelens_release(release: str, sae_id: str, out_dir: str | Path, loader: str | None = None) -> dict[str, Any]:
    """Load ``release`` / ``sae_id`` with ``sae_lens.SAE.from_pretrained`` and save it into ``out_dir``
    in the SAELens layout (SAELens' ``save_model``). Returns the provenance: ``release``, ``id``,
    ``repo_id``, ``folder``, ``hub_commit``, ``files`` (path in repo -> SHA-256), ``endpoint``,
    ``sae_lens_version``, ``loader``. ``loader`` names a SAELens converter for a repo outside its
    registry (e.g. ``gemma_3``). Raises :class:`PublishedSAEError` with the release, the id and the
    way out when the hub cannot be reached or SAELens refuses the name."""
    try:
        import sae_lens
        from sae_lens import SAE
    except ImportError as exc:  # pragma: no cover - a runtime dependency
        raise PublishedSAEError(f"importing SAELens release {release!r} needs the sae-lens package ({exc}); "
                                "pip install sae-lens") from exc
    try:
        repo_id, folder = hub_location(release, sae_id)
    except ValueError as exc:
        raise PublishedSAEError(f"import_saes: {exc} (release {release!r}, id {sae_id!r})") from exc
    try:
        converter = _converter(loader)
        sae = SAE.from_pretrained(release, sae_id, device="cpu", converter=converter)
    except PublishedSAEError:
        raise
    except Exception as exc:
        cause = _offline_cause(exc)
        if cause is not None:
            raise PublishedSAEError(
                f"cannot fetch SAELens release {release!r} id {sae_id!r} (hub repo {repo_id}, folder {folder}): "
                f"{cause}. SAELens needs the hub even when the files are cached (it reads tensor shapes over HTTP); "
                + _ways_out(release, sae_id)) from None
        if type(exc).__name__ == "RepositoryNotFoundError":
            raise PublishedSAEError(f"SAELens release {release!r} id {sae_id!r}: hub repo {repo_id} not found at "
                                    f"{hub_endpoint()} (private, renamed, or a wrong repo id)") from None
        if isinstance(exc, ValueError):
            raise PublishedSAEError(f"import_saes: SAELens refused release {release!r} id {sae_id!r}: {exc}") from None
        raise PublishedSAEError(f"SAELens failed to load release {release!r} id {sae_id!r} (hub repo {repo_id}, "
                                f"folder {folder}): {type(exc).__name__}: {exc}") from exc
    out = Path(out_dir)
    sae.save_model(out)
    commit, files = _snapshot_files(repo_id, folder)
    return {"kind": "saelens_release", "release": release, "id": sae_id, "repo_id": repo_id, "folder": folder,
            "hub_commit": commit, "files": files, "endpoint": hub_endpoint(),
            "sae_lens_version": getattr(sae_lens, "__version__", None), "loader": loader}


def model_matches(sae_model_name: str | None, model_name: str, tl_name: str | None = None) -> bool:
    """Whether an SAE's ``metadata.model_name`` (a hub id such as ``google/gemma-3-270m``) names the
    profile's model (``gemma-3-270m``, or its TransformerLens / hub name ``tl_name``). Compared on the
    last path component, case-insensitively; an SAE that does not say matches (nothing to check)."""
    if not sae_model_name:
        return True

    def last(s: str) -> str:
        return s.rstrip("/").split("/")[-1].lower()

    return last(sae_model_name) in {last(n) for n in (model_name, tl_name) if n}

