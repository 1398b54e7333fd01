"""Artifact folders: ``<root>/<stage>/<fingerprint>/`` with ``config.json`` beside the data.

A folder is *complete* once ``_COMPLETE.json`` exists; it is written last, atomically. Stages never
delete or overwrite a complete folder; resumable stages (activations, training) keep their partial
state inside the folder and continue from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
from pydantic import BaseModel, ConfigDict

from saeflow.frozen import Frozen

from saeflow.remote import COMPLETE_MARKER, has_complete, pull  # noqa: F401  (re-exported)
ENV_ROOT = "SAEFLOW_ARTIFACTS"


class ArtifactError(RuntimeError):
    """An artifact that is missing, partial, corrupt or of the wrong shape."""


class ArtifactRef(BaseModel):
    """Small reference a task returns: which stage, its fingerprint and where it lives."""

    model_config = ConfigDict(frozen=True)

    stage: str
    fingerprint: str
    path: str

    @property
    def dir(self) -> Path:
        return Path(self.path)

    def is_complete(self) -> bool:
        return is_complete(self.dir, self.fingerprint)

    def is_available(self) -> bool:
        """Complete here, or (artifacts root on an fsspec URL) complete at the URL."""
        return self.is_complete() or has_complete(self.dir, self.fingerprint)


def default_root() -> Path:
    return Path(os.environ.get(ENV_ROOT, "artifacts"))


def fingerprint(stage: str, config: Frozen | dict[str, Any] | None, *upstream: ArtifactRef | str) -> str:
    """Hash of the stage name, its config (operational fields excluded) and upstream fingerprints."""
    payload = {
        "stage": stage,
        "config": config.fingerprint_payload() if isinstance(config, Frozen) else config,
        "upstream": [u.fingerprint if isinstance(u, ArtifactRef) else str(u) for u in upstream],
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def artifact_ref(root: str | Path, stage: str, fp: str) -> ArtifactRef:
    return ArtifactRef(stage=stage, fingerprint=fp, path=str(Path(root) / stage / fp))


def ensure_writable_root(root: str | Path) -> Path:
    """Create the artifacts root if needed and check it can be written to."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ArtifactError(
            f"artifacts root {root} is not writable ({exc.strerror}); pass --artifacts DIR or set "
            f"{ENV_ROOT} to a folder you can write to"
        ) from exc
    return root


#: Who writes a temporary file: this machine (a hash of its host name) and process, so that
#: :func:`remove_stale_temporaries` can tell a dead writer's leftover from a live writer's file.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP = re.compile(r"^\..+\.w(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[^.]+\.tmp$")


def write_atomic(path: str | Path, content: str | bytes | Callable[[Path], None], mode: int = 0o644) -> Path:
    """Write ``path`` so that readers see the old file or the whole new one, never a part.

    ``content`` is text, bytes, or a function writing a temporary path it is given (for writers
    such as ``safetensors.save_file`` or ``DataFrame.to_parquet``). The temporary file sits beside
    ``path`` (``.<name>.w<host>-<pid>.<random>.tmp``); it is fsynced, given ``mode``, then renamed
    over ``path`` (``os.replace``); on any error it is removed and ``path`` is untouched. A process
    killed mid-write leaves its temporary file; :func:`begin` and :func:`mark_complete` remove it.
    The one atomic-write helper of the project.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.w{_HOST}-{os.getpid()}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        if callable(content):
            os.close(fd)
            content(tmp)
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(content.encode() if isinstance(content, str) else content)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files of :func:`write_atomic` under ``folder`` whose writer was killed
    (a process of this machine that no longer exists); a live writer's file, another machine's
    (a shared artifacts root) and any other file are left alone. Returns the removed paths."""
    removed = []
    for p in Path(folder).rglob(".*.tmp"):
        m = _TEMP.match(p.name)
        if m and m["host"] == _HOST and not psutil.pid_exists(int(m["pid"])) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def begin(ref: ArtifactRef, config: Frozen | dict[str, Any] | None, upstream: list[ArtifactRef] | None = None) -> Path:
    """Create the artifact folder and write ``config.json`` (idempotent); a killed earlier attempt's
    temporary files are removed (:func:`remove_stale_temporaries`)."""
    d = ref.dir
    d.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(d)
    cfg = config.model_dump(mode="json") if isinstance(config, Frozen) else config
    write_json_atomic(
        d / "config.json",
        {"stage": ref.stage, "fingerprint": ref.fingerprint, "config": cfg,
         "upstream": {u.stage: u.fingerprint for u in (upstream or [])}},
    )
    return d


def mark_complete(ref: ArtifactRef, **meta: Any) -> None:
    """Mark the folder complete, after removing the temporary files killed writers left in it."""
    remove_stale_temporaries(ref.dir)
    write_json_atomic(ref.dir / COMPLETE_MARKER, {"fingerprint": ref.fingerprint, **meta})


def is_complete(path: str | Path, fp: str | None = None) -> bool:
    """True when the folder's completion marker exists (and names ``fp``, when given), and every
    file the marker lists under ``files`` (the tables of a results stage) still exists: a table
    removed by hand makes its stage incomplete, so the next run rebuilds it."""
    marker = Path(path) / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return fp is None
    if fp is not None and meta.get("fingerprint") != fp:
        return False
    return all((p := listed_file(Path(path), f)) is not None and p.is_file() for f in meta.get("files") or [])


def listed_file(folder: Path, listed: str | Path) -> Path | None:
    """A file a completion marker lists (``files``, by absolute path) found under ``folder``, even
    if the artifacts root moved since (``.../<stage>/<name>/<rel>`` -> ``folder/<rel>``); ``None``
    when it is not under a folder of that stage and name."""
    listed = Path(listed)
    if not listed.is_absolute():
        return folder / listed
    try:
        return folder / listed.relative_to(folder)
    except ValueError:
        pass
    parts = listed.parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] == folder.name and parts[i - 1] == folder.parent.name:
            return folder.joinpath(*parts[i + 1:])
    return None


def completion_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path) / COMPLETE_MARKER
    if not p.is_file():
        raise ArtifactError(f"{path} is not a complete artifact (no {COMPLETE_MARKER}); re-run the pipeline to rebuild it")
    return json.loads(p.read_text())


@contextmanager
def build_lock(ref: ArtifactRef, wait: bool = True) -> Iterator[bool]:
    """The exclusive right to build ``ref`` on this machine: ``fcntl.flock`` on
    ``<root>/<stage>/.<fingerprint>.lock``, which the kernel releases when the holder exits or is
    killed (SIGKILL included), so a dead run never blocks a later one. Yields ``True`` once held;
    with ``wait=False`` yields ``False`` at once when another process (or thread) holds it. For
    artifacts that runs with different cache keys may build at once (a family member shared by two
    families); the lock file stays (removing it would race with a waiting run)."""
    import fcntl

    path = ref.dir.parent / f".{ref.fingerprint}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def require_complete(ref: ArtifactRef) -> Path:
    """The folder of a complete artifact, for reading it; under an fsspec URL root
    (:mod:`saeflow.remote`) a complete copy is downloaded into this machine's mirror first."""
    if not ref.is_complete():
        pull(ref.dir)
    if not ref.is_complete():
        raise ArtifactError(
            f"{ref.stage} artifact {ref.path} is missing or partial; re-run the pipeline, which rebuilds it"
        )
    return ref.dir
