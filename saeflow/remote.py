"""Artifacts roots on object stores and other fsspec URLs (``s3://bucket/prefix``, ``gs://...``).

Every stage reads and writes POSIX folders (Zarr chunk files, safetensors, completion markers
renamed atomically, the cache's lock files). With a URL root, each machine works in a local
*mirror* of it and the URL is the shared copy:

- the mirror of ``s3://bucket/prefix`` is ``$SAEFLOW_MIRROR/s3/bucket/prefix`` (default
  ``SAEFLOW_MIRROR=/tmp/saeflow-mirror``): the same path on every machine, so an artifact reference
  made on one machine names the same folder on another, and the URL is read back from the path;
- before a stage runs, its inputs and its own artifact are *pulled* when the mirror lacks a complete
  copy and the URL has one (downloaded beside the folder, then renamed into place);
- after it ran, its artifacts are *pushed*: every file, then the completion marker last, so a reader
  of the URL never sees a folder as complete before all of its files are there.

Only complete folders travel: a partial folder (a killed run) resumes on the machine that has it.
Storage options come from fsspec's configuration, e.g. ``FSSPEC_S3_ENDPOINT_URL`` or
``AWS_PROFILE``; the protocol's package (``s3fs``, ``gcsfs``, ``adlfs``) must be installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

COMPLETE_MARKER = "_COMPLETE.json"  # == saeflow.artifacts.COMPLETE_MARKER (that module imports this one)
ENV_MIRROR = "SAEFLOW_MIRROR"
DEFAULT_MIRROR = "/tmp/saeflow-mirror"
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")


class RemoteRootError(ValueError):
    """An artifacts root URL that cannot be used (unknown protocol, missing package, bad path)."""


def is_url(root: str | os.PathLike | None) -> bool:
    """True for an fsspec URL other than ``file://`` (a ``file://`` URL is a local path)."""
    m = _URL.match(str(root)) if root is not None else None
    return bool(m) and m.group(1).lower() not in ("file", "local")


def local_path(root: str | os.PathLike) -> str:
    """``file:///x`` -> ``/x``; any other root unchanged."""
    m = _URL.match(str(root))
    return m.group(2) if m and m.group(1).lower() in ("file", "local") else str(root)


def mirror_base() -> Path:
    return Path(os.environ.get(ENV_MIRROR) or DEFAULT_MIRROR)


def mirror_of(url: str) -> Path:
    """The local mirror folder of an artifacts root URL (same path on every machine)."""
    m = _URL.match(url)
    if not m:
        raise RemoteRootError(f"{url!r} is not a URL")
    protocol, rest = m.group(1).lower(), m.group(2).strip("/")
    parts = [p for p in rest.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise RemoteRootError(f"artifacts root {url!r} needs a bucket/path without '.' or '..' parts, e.g. s3://bucket/saeflow")
    return mirror_base() / protocol / Path(*parts)


def url_of(path: str | os.PathLike) -> str | None:
    """The URL a mirror path stands for (``None`` for a path outside the mirror)."""
    try:
        rel = Path(path).resolve().relative_to(mirror_base().resolve())
    except ValueError:
        return None
    if len(rel.parts) < 2:
        return None
    return f"{rel.parts[0]}://" + "/".join(rel.parts[1:])


def filesystem(url: str) -> Any:
    """The fsspec filesystem of ``url``, with a clear error when its package is missing."""
    import fsspec

    protocol = _URL.match(url).group(1).lower()  # type: ignore[union-attr]
    try:
        return fsspec.filesystem(protocol)
    except (ImportError, ValueError) as exc:
        raise RemoteRootError(
            f"artifacts root {url!r}: fsspec cannot open protocol {protocol!r} ({exc}); install its package "
            f"(s3:// -> pip install s3fs, gs:// -> gcsfs, az:// -> adlfs) or use a local / mounted path"
        ) from exc


def check_url_root(url: str) -> Path:
    """Check that the URL root can be listed and written; return its local mirror (created)."""
    fs = filesystem(url)
    probe = f"{url.rstrip('/')}/.saeflow-write-test-{uuid.uuid4().hex[:8]}"
    try:
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as exc:  # noqa: BLE001 (every backend raises its own errors)
        raise RemoteRootError(
            f"artifacts root {url!r} is not writable ({type(exc).__name__}: {exc}); check the bucket, the credentials "
            f"(fsspec / cloud SDK configuration) and the endpoint (e.g. FSSPEC_S3_ENDPOINT_URL)"
        ) from exc
    mirror = mirror_of(url)
    mirror.mkdir(parents=True, exist_ok=True)
    return mirror


def _fingerprint_of(marker: bytes | None) -> str | None:
    if marker is None:
        return None
    try:
        return str(json.loads(marker).get("fingerprint"))
    except ValueError:
        return None


def _remote_marker(fs: Any, url: str) -> bytes | None:
    try:
        return bytes(fs.cat_file(f"{url}/{COMPLETE_MARKER}"))
    except FileNotFoundError:
        return None


def _local_marker(path: Path) -> bytes | None:
    try:
        return (path / COMPLETE_MARKER).read_bytes()
    except FileNotFoundError:
        return None


def has_complete(path: str | os.PathLike, fp: str) -> bool:
    """True when the URL behind the mirror folder ``path`` holds artifact ``fp`` complete."""
    url = url_of(path)
    return url is not None and _fingerprint_of(_remote_marker(filesystem(url), url)) == fp


def pull(path: str | os.PathLike) -> bool:
    """Make the mirror folder ``path`` a complete copy of its URL when the URL holds a complete one
    and the mirror does not hold that one (same fingerprint in the completion marker). Returns True
    when it downloaded."""
    path = Path(path)
    url = url_of(path)
    if url is None:
        return False
    fs = filesystem(url)
    theirs = _fingerprint_of(_remote_marker(fs, url))
    if theirs is None or _fingerprint_of(_local_marker(path)) == theirs:
        return False  # nothing complete there, or the same artifact here already
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.pull-"))
    try:
        prefix = fs._strip_protocol(url).rstrip("/")
        for f in fs.find(url):
            rel = f[len(prefix) + 1:]
            if rel == COMPLETE_MARKER:
                continue
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f, str(target))
        fs.get_file(f"{prefix}/{COMPLETE_MARKER}", str(tmp / COMPLETE_MARKER))  # last: complete only when all is here
        if _fingerprint_of(_local_marker(path)) == theirs:  # another process of this machine pulled it meanwhile
            shutil.rmtree(tmp)
            return False
        if path.exists():  # partial (an interrupted local run) or an older version of a mutable folder
            # such as results/<profile>/: the URL's complete copy replaces it
            aside = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
            path.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def push(path: str | os.PathLike) -> bool:
    """Upload the complete mirror folder ``path`` to its URL unless the URL holds it complete (same
    fingerprint in the completion marker): every file first, the completion marker last. Returns
    True when it uploaded."""
    path = Path(path)
    url = url_of(path)
    mine = _fingerprint_of(_local_marker(path))
    if url is None or mine is None:
        return False
    fs = filesystem(url)
    if _fingerprint_of(_remote_marker(fs, url)) == mine:
        return False  # the URL has this artifact complete already
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel == COMPLETE_MARKER:
            continue
        fs.put_file(str(f), f"{url}/{rel}")
    fs.put_file(str(path / COMPLETE_MARKER), f"{url}/{COMPLETE_MARKER}")
    return True


def push_tree(path: str | os.PathLike) -> int:
    """Upload a plain mirror folder (no completion marker, e.g. ``results/<profile>/``), overwriting.
    Returns the number of files."""
    path = Path(path)
    url = url_of(path)
    if url is None or not path.is_dir():
        return 0
    fs = filesystem(url)
    n = 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        fs.put_file(str(f), f"{url}/{f.relative_to(path).as_posix()}")
        n += 1
    return n
