"""The resume state of an SAE training folder: checkpoints and the finished-run marker.

``out_dir/checkpoint/`` holds ``state.pt`` (the full trainer state) and ``meta.json`` (format,
step, fingerprint, size and SHA-256 of ``state.pt``). A checkpoint is built in a temporary folder
``.checkpoint.tmp-*`` and renamed into place (:func:`swap_checkpoint`), so a kill at any moment
leaves either the previous or the new checkpoint, never a partial one; :func:`find_checkpoint`
recovers from a kill between the two renames. A checkpoint whose files fail their checksum was
damaged after it was written: :func:`load_checkpoint` raises :class:`CheckpointError` saying so and
how to recover (delete the folder); it is never silently used or discarded.

``out_dir/training_summary.json`` (:data:`DONE_FILE`), written after the final save with the
weights' size and checksum, marks the folder finished (:func:`write_done`, :func:`read_done`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from saeflow.artifacts import ArtifactError, sha256_file, write_atomic, write_json_atomic
from saeflow.saes.saelens_format import DONE_FILE, SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

__all__ = [
    "CHECKPOINT_DIR",
    "DONE_FILE",
    "FORMAT",
    "CheckpointError",
    "save_checkpoint",
    "write_state_file",
    "swap_checkpoint",
    "find_checkpoint",
    "load_checkpoint",
    "clear_checkpoints",
    "read_done",
    "write_done",
    "rng_state",
    "set_rng_state",
    "sha256_file",
]

CHECKPOINT_DIR = "checkpoint"
# DONE_FILE (``training_summary.json``, defined beside the SAE file names because
# saeflow.saes.load_sae checks the weights against it) is written into ``out_dir`` after the final
# save (before the checkpoint is removed): fingerprint, weights checksum and the run's summary. A
# folder holding a valid one is finished: never trained again.
#: Format of ``meta.json`` and of :data:`DONE_FILE`.
FORMAT = 1
_STATE_FILE = "state.pt"
_META_FILE = "meta.json"
_OLD_SUFFIX = ".old"
_TMP_PREFIX = ".checkpoint.tmp-"


class CheckpointError(ArtifactError):
    """A training checkpoint that is damaged or belongs to another configuration."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------- writing
def write_state_file(tmp_dir: Path, payload: dict[str, Any]) -> None:
    """Write ``state.pt`` + ``meta.json`` (checksum) into a fresh temporary folder."""
    state_path = tmp_dir / _STATE_FILE
    write_atomic(state_path, lambda tmp: torch.save(payload, tmp))
    meta = {"format": FORMAT, "step": payload["step"], "fingerprint": payload["fingerprint"],
            "bytes": state_path.stat().st_size, "sha256": sha256_file(state_path)}
    write_atomic(tmp_dir / _META_FILE, json.dumps(meta, indent=2))
    _fsync_dir(tmp_dir)


def _remove_dir(path: Path) -> None:
    """Delete a folder so that no partially deleted copy is ever visible under its name."""
    if not path.exists():
        return
    doomed = path.parent / f"{_TMP_PREFIX}del-{uuid.uuid4().hex[:8]}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def swap_checkpoint(tmp_dir: Path, out_dir: Path) -> None:
    """Make ``tmp_dir`` the checkpoint. At every instant ``checkpoint/`` or ``checkpoint.old/`` is whole."""
    final = out_dir / CHECKPOINT_DIR
    old = out_dir / (CHECKPOINT_DIR + _OLD_SUFFIX)
    if final.exists():
        _remove_dir(old)
        os.rename(final, old)
    os.rename(tmp_dir, final)
    _fsync_dir(out_dir)
    _remove_dir(old)


def save_checkpoint(out_dir: Path, payload: dict[str, Any]) -> None:
    """Replace ``out_dir``'s checkpoint by ``payload`` (needs ``step`` and ``fingerprint`` keys)."""
    tmp_dir = out_dir / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir(parents=True)
    try:
        write_state_file(tmp_dir, payload)
        swap_checkpoint(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _discard_temporaries(out_dir: Path) -> None:
    for p in out_dir.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


def clear_checkpoints(out_dir: Path) -> None:
    """Remove the checkpoint, its ``.old`` copy and any temporary folder (the run is finished)."""
    _remove_dir(out_dir / CHECKPOINT_DIR)
    _remove_dir(out_dir / (CHECKPOINT_DIR + _OLD_SUFFIX))
    _discard_temporaries(out_dir)


# ------------------------------------------------------------------------------------- reading
def find_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint to resume from, recovering from a kill between the two renames."""
    _discard_temporaries(out_dir)
    final = out_dir / CHECKPOINT_DIR
    old = out_dir / (CHECKPOINT_DIR + _OLD_SUFFIX)
    if final.exists():
        _remove_dir(old)
        return final
    if old.exists():  # killed after checkpoint -> checkpoint.old, before tmp -> checkpoint
        os.rename(old, final)
        return final
    return None


def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any]:
    """The payload of the checkpoint folder ``path``, checked against its ``meta.json`` and ``fingerprint``."""
    fix = (f"delete {path} to restart this training run from step 0 (the result is the same, it only "
           "costs the time of the lost steps)")
    meta_path, state_path = path / _META_FILE, path / _STATE_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: {meta_path.name} is missing or unreadable ({exc}); {fix}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT}; {fix}")
    if meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} was written by a run with a different SAE/training config or d_in "
            f"(fingerprint {meta.get('fingerprint')} != {fingerprint}); {fix}"
        )
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {path} is damaged: {_STATE_FILE} is missing; {fix}")
    size = state_path.stat().st_size
    if size != meta.get("bytes") or sha256_file(state_path) != meta.get("sha256"):
        raise CheckpointError(
            f"checkpoint {path} is damaged: {_STATE_FILE} has {size} bytes / a checksum that does not match "
            f"{_META_FILE} (expected {meta.get('bytes')} bytes); it was truncated or modified after being written; {fix}"
        )
    try:
        payload = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors
        raise CheckpointError(f"checkpoint {path} is damaged: {_STATE_FILE} cannot be read ({exc}); {fix}") from exc
    if payload.get("step") != meta.get("step"):
        raise CheckpointError(f"checkpoint {path} is inconsistent (step {payload.get('step')} vs {meta.get('step')}); {fix}")
    return payload


# ---------------------------------------------------------------------------- finished marker
def write_done(out_dir: Path, fingerprint: str, summary: dict[str, Any]) -> None:
    """Mark ``out_dir`` finished: :data:`DONE_FILE` with the saved weights' size and checksum."""
    weights = out_dir / SAE_WEIGHTS_FILENAME
    write_json_atomic(out_dir / DONE_FILE, {
        "format": FORMAT, "fingerprint": fingerprint, "weights_bytes": weights.stat().st_size,
        "weights_sha256": sha256_file(weights), "summary": summary})


def read_done(out_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The stored summary of a finished run in ``out_dir``, or ``None`` when it is not (validly) finished."""
    path = out_dir / DONE_FILE
    if not path.is_file():
        return None
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    weights = out_dir / SAE_WEIGHTS_FILENAME
    if (done.get("format") != FORMAT or done.get("fingerprint") != fingerprint or not weights.is_file()
            or not (out_dir / SAE_CFG_FILENAME).is_file() or weights.stat().st_size != done.get("weights_bytes")
            or sha256_file(weights) != done.get("weights_sha256")):
        return None
    return dict(done["summary"])


# ------------------------------------------------------------------------------------ RNG state
def rng_state(device: torch.device) -> dict[str, Any]:
    """The global RNG state(s) a resumed run must restore (CPU, and CUDA when training there)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda" and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
