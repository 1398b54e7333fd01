"""Resumable SAE training loop (SAELens trainer semantics, SPEC 3.3).

:func:`train_sae` trains one SAE from an endless, resumable :class:`BatchLoader` and leaves in
``out_dir``:

- ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout, see :func:`saeflow.sae.save_sae`),
  working on raw activations (the normalisation factor is folded into the weights);
- ``training_log.json``: the list of logged dicts (``step, loss, mse, aux, l0, frac_dead, lr,
  tokens_per_s``).

While it runs, ``out_dir/checkpoint/`` holds the full trainer state every
``train_cfg.checkpoint_every`` steps. A checkpoint is built in a temporary folder and renamed into
place, so a kill at any moment leaves either the previous or the new checkpoint (never a partial
one); a run started again resumes from it and ends with weights *bit-identical* to an
uninterrupted run (same machine, same torch thread count). A checkpoint whose files fail their
checksum was damaged after it was written: :class:`CheckpointError` says so and how to recover
(delete the folder); it is never silently used or discarded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

import torch

from saeflow.artifacts import ArtifactError, write_json_atomic
from saeflow.config import SAEConfig, TrainConfig
from saeflow.sae import BaseSAE, build_sae, save_sae

__all__ = [
    "BatchLoader",
    "train_sae",
    "lr_at_step",
    "estimate_scaling_factor",
    "CheckpointError",
    "NonFiniteError",
    "CHECKPOINT_DIR",
    "TRAINING_LOG",
    "NORM_ESTIMATE_BATCHES",
]

CHECKPOINT_DIR = "checkpoint"
TRAINING_LOG = "training_log.json"
_STATE_FILE = "state.pt"
_META_FILE = "meta.json"
_OLD_SUFFIX = ".old"
_TMP_PREFIX = ".checkpoint.tmp-"
_CKPT_FORMAT = 1
#: Batches used to estimate the normalisation factor when ``train_sae`` is not given one.
NORM_ESTIMATE_BATCHES = 32


@runtime_checkable
class BatchLoader(Protocol):
    """What :func:`train_sae` needs from an activation loader.

    ``iter(loader)`` yields float32 CPU tensors ``[batch_size, d_in]`` forever. ``state_dict()``
    (JSON-able) describes the position *after the last batch yielded*; after
    ``load_state_dict(state)`` a new ``iter(loader)`` yields exactly the batches an uninterrupted
    iteration would have yielded next.
    """

    def __iter__(self) -> Iterator[torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointError(ArtifactError):
    """A training checkpoint that is damaged or belongs to another configuration."""


class NonFiniteError(RuntimeError):
    """NaN/inf in a training batch or in the loss."""


# ------------------------------------------------------------------------------------ schedules
def lr_at_step(step: int, total_steps: int, train_cfg: TrainConfig) -> float:
    """Learning rate of the 0-based optimiser step ``step`` (SAELens "constant" schedule).

    Linear warm-up ``lr * (step + 1) / W`` over the first ``W = lr_warm_up_steps`` steps, constant,
    then linear decay ``lr * (T - step) / D`` over the last ``D = lr_decay_steps`` steps (reaching
    ``lr / D`` on the final step, as SAELens' LinearLR to 0). Where the two ramps overlap the
    smaller factor wins.
    """
    lr = train_cfg.lr
    factor = 1.0
    w, d = train_cfg.lr_warm_up_steps, train_cfg.lr_decay_steps
    if w > 0 and step < w:
        factor = min(factor, (step + 1) / w)
    if d > 0 and step >= total_steps - d:
        factor = min(factor, (total_steps - step) / d)
    return lr * factor


@torch.no_grad()
def estimate_scaling_factor(batches: Iterable[torch.Tensor], d_in: int, n_batches: int = NORM_ESTIMATE_BATCHES) -> float:
    """``sqrt(d_in) / mean ||x||`` over ``n_batches`` batches (SAELens ``expected_average_only_in``)."""
    total, count = 0.0, 0
    it = iter(batches)
    for _ in range(n_batches):
        b = next(it)
        norms = b.float().norm(dim=-1)
        if not torch.isfinite(norms).all():
            raise NonFiniteError(
                "NaN/inf in the activations used to estimate the normalisation factor; the activation "
                "store is corrupt: check it (or delete and re-extract it)"
            )
        total += float(norms.double().sum())
        count += norms.numel()
    mean = total / max(count, 1)
    if not mean > 0:
        raise ValueError("activations have zero mean norm; cannot normalise them (is the activation store empty?)")
    return math.sqrt(d_in) / mean


# ----------------------------------------------------------------------------------- checkpoints
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_state_file(tmp_dir: Path, payload: dict[str, Any]) -> None:
    """Write ``state.pt`` + ``meta.json`` (checksum) into a fresh temporary folder."""
    state_path = tmp_dir / _STATE_FILE
    with open(state_path, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    meta = {"format": _CKPT_FORMAT, "step": payload["step"], "fingerprint": payload["fingerprint"],
            "bytes": state_path.stat().st_size, "sha256": _sha256(state_path)}
    with open(tmp_dir / _META_FILE, "w") as fh:
        json.dump(meta, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp_dir)


def _remove_dir(path: Path) -> None:
    """Delete a folder so that no partially deleted copy is ever visible under its name."""
    if not path.exists():
        return
    doomed = path.parent / f"{_TMP_PREFIX}del-{uuid.uuid4().hex[:8]}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _swap_checkpoint(tmp_dir: Path, out_dir: Path) -> None:
    """Make ``tmp_dir`` the checkpoint. At every instant ``checkpoint/`` or ``checkpoint.old/`` is whole."""
    final = out_dir / CHECKPOINT_DIR
    old = out_dir / (CHECKPOINT_DIR + _OLD_SUFFIX)
    if final.exists():
        _remove_dir(old)
        os.rename(final, old)
    os.rename(tmp_dir, final)
    _fsync_dir(out_dir)
    _remove_dir(old)


def _save_checkpoint(out_dir: Path, payload: dict[str, Any]) -> None:
    tmp_dir = out_dir / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir(parents=True)
    try:
        _write_state_file(tmp_dir, payload)
        _swap_checkpoint(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _discard_temporaries(out_dir: Path) -> None:
    for p in out_dir.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


def _find_checkpoint(out_dir: Path) -> Path | None:
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


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any]:
    fix = (f"delete {path} to restart this training run from step 0 (the result is the same, it only "
           "costs the time of the lost steps)")
    meta_path, state_path = path / _META_FILE, path / _STATE_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: {meta_path.name} is missing or unreadable ({exc}); {fix}") from exc
    if meta.get("format") != _CKPT_FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}, expected {_CKPT_FORMAT}; {fix}")
    if meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} was written by a run with a different SAE/training config or d_in "
            f"(fingerprint {meta.get('fingerprint')} != {fingerprint}); {fix}"
        )
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {path} is damaged: {_STATE_FILE} is missing; {fix}")
    size = state_path.stat().st_size
    if size != meta.get("bytes") or _sha256(state_path) != meta.get("sha256"):
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


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda" and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _make_adam(sae: BaseSAE, lr: float) -> torch.optim.Adam:
    """Adam(0.9, 0.999); the fused kernel where torch has one (same update, ~10% faster steps on CPU)."""
    try:
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))


def _loader_state_json(loader: BatchLoader) -> str:
    state = loader.state_dict()
    try:
        return json.dumps(state, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"loader.state_dict() must be JSON-able (plain int/float/str/list/dict), got {state!r}: {exc}") from exc


def _fingerprint(sae_cfg: SAEConfig, train_cfg: TrainConfig, d_in: int) -> str:
    payload = {"sae": sae_cfg.fingerprint_payload(), "train": train_cfg.fingerprint_payload(), "d_in": d_in}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ training
def _nonfinite_message(step: int, kind: str, out_dir: Path) -> str:
    what = "the activation batch" if kind == "batch" else "the loss"
    return (
        f"NaN/inf in {what} at training step {step}: check the activation store (re-run activation extraction "
        f"with model dtype float32, or delete the store and re-extract it). The last good checkpoint in "
        f"{out_dir / CHECKPOINT_DIR} was left intact" + (
            "; a non-finite loss from finite inputs means training diverged: lower train.lr"
            if kind == "loss" else "")
    )


def train_sae(
    sae_cfg: SAEConfig,
    train_cfg: TrainConfig,
    loader: BatchLoader,
    d_in: int,
    out_dir: Path,
    device: torch.device,
    scaling_factor: float | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    stop_after_steps: int | None = None,
    cfg_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train an SAE, resuming from ``out_dir/checkpoint`` when present; return a JSON-able summary.

    - steps = ``training_tokens // batch_size``; Adam(0.9, 0.999), :func:`lr_at_step` schedule,
      gradient-norm clip ``grad_clip``; dead latents = no activation for more than
      ``dead_feature_window`` steps (they feed the TopK auxiliary loss / JumpReLU pre-act loss).
    - each step runs ``sae.training_forward(x, dead, step=step)`` (0-based ``step``: L1 / L0
      coefficient warm-ups), the backward pass, the optimiser step, then ``sae.after_step(out)``
      (BatchTopK / Matryoshka moving threshold, JumpReLU threshold projection). That state is part
      of ``sae.state_dict()``, so checkpoints carry it and a resumed run stays bit-identical.
    - ``normalize_activations="expected_average_only_in"``: batches are multiplied by
      ``scaling_factor`` (when ``None`` it is estimated as ``sqrt(d_in)/mean||x||`` from the first
      :data:`NORM_ESTIMATE_BATCHES` batches of ``loader``, which training then continues after)
      and the factor is folded into the weights at the end. With ``"none"`` passing a factor is
      an error.
    - ``on_log(d)`` every ``log_every`` steps and after the last step; ``d`` is also appended to
      ``training_log.json``.
    - ``stop_after_steps``: return right after global step ``stop_after_steps`` as if the process
      had been killed there (no extra checkpoint, no final save); the summary has
      ``completed=False``.
    - ``cfg_extra`` goes into the saved ``cfg.json`` metadata (e.g. ``model_name``, ``hook_name``).

    Raises :class:`NonFiniteError` (naming the step) on NaN/inf in a batch or the loss,
    :class:`CheckpointError` for a damaged or foreign checkpoint, ``ValueError`` for bad arguments.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    device = torch.device(device)
    total_steps = train_cfg.training_tokens // train_cfg.batch_size
    if total_steps < 1:
        raise ValueError(
            f"training_tokens={train_cfg.training_tokens} < batch_size={train_cfg.batch_size}: no full step to "
            "train; raise train.training_tokens or lower train.batch_size"
        )
    normalize = sae_cfg.normalize_activations
    if normalize == "none" and scaling_factor is not None:
        raise ValueError("scaling_factor was given but sae.normalize_activations is 'none'; pass scaling_factor=None")
    if scaling_factor is not None and not (math.isfinite(scaling_factor) and scaling_factor > 0):
        raise ValueError(f"scaling_factor must be a positive finite number, got {scaling_factor!r}")
    out_dir.mkdir(parents=True, exist_ok=True)

    fingerprint = _fingerprint(sae_cfg, train_cfg, d_in)
    sae: BaseSAE = build_sae(sae_cfg, d_in, seed=train_cfg.seed).to(device)
    optimizer = _make_adam(sae, lr_at_step(0, total_steps, train_cfg))
    since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    logs: list[dict[str, Any]] = []
    step = 0
    resumed_from: int | None = None

    ckpt_path = _find_checkpoint(out_dir)
    if ckpt_path is not None:
        ck = _load_checkpoint(ckpt_path, fingerprint)
        sae.load_state_dict(ck["sae"])
        optimizer.load_state_dict(ck["optimizer"])
        since_fired.copy_(ck["since_fired"].to(device))
        loader.load_state_dict(json.loads(ck["loader"]))
        _set_rng_state(ck["rng"], device)
        logs = json.loads(ck["logs"])
        step = resumed_from = int(ck["step"])
        saved_factor = ck["scaling_factor"]
        if scaling_factor is not None and (saved_factor is None or not math.isclose(saved_factor, scaling_factor, rel_tol=1e-6)):
            raise CheckpointError(
                f"checkpoint {ckpt_path} was trained with scaling_factor={saved_factor} but {scaling_factor} was passed; "
                f"pass the same factor, or delete {ckpt_path} to restart from step 0"
            )
        scaling_factor = saved_factor
        batches = iter(loader)
    else:
        batches = iter(loader)
        if normalize == "expected_average_only_in" and scaling_factor is None:
            scaling_factor = estimate_scaling_factor(batches, d_in, NORM_ESTIMATE_BATCHES)
    scale = float(scaling_factor) if scaling_factor is not None else None

    check_every_step = device.type == "cpu"  # a host sync is free on CPU; elsewhere check on log/checkpoint steps
    bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite step (1-based), -1 if none
    bad_kind = torch.zeros((), dtype=torch.long, device=device)  # 0 batch, 1 loss
    window = sae_cfg.dead_feature_window
    batch_size = train_cfg.batch_size
    params = list(sae.parameters())
    last_log_time, last_log_step = time.perf_counter(), step

    def raise_if_nonfinite() -> None:
        b = int(bad_step)
        if b >= 0:
            raise NonFiniteError(_nonfinite_message(b, "batch" if int(bad_kind) == 0 else "loss", out_dir))

    sae.train()
    while step < total_steps:
        if stop_after_steps is not None and step >= stop_after_steps:
            return {"completed": False, "steps": step, "total_steps": total_steps, "resumed_from_step": resumed_from,
                    "out_dir": str(out_dir)}
        batch = next(batches)
        if batch.ndim != 2 or batch.shape[1] != d_in or batch.shape[0] != batch_size:
            raise ValueError(
                f"loader yielded a batch of shape {tuple(batch.shape)} at step {step + 1}; expected "
                f"[{batch_size}, {d_in}] (train.batch_size, d_in)"
            )
        x = batch.to(device, non_blocking=True)
        if x.dtype != torch.float32:
            x = x.float()
        if scale is not None:
            x = x * scale
        lr = lr_at_step(step, total_steps, train_cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        dead = since_fired > window
        out = sae.training_forward(x, dead, return_feature_acts=False, step=step)
        loss = out["loss"]
        assert isinstance(loss, torch.Tensor)

        with torch.no_grad():
            batch_ok = torch.isfinite(x).all()
            loss_ok = torch.isfinite(loss)
            first = (bad_step < 0) & ~(batch_ok & loss_ok)
            bad_kind.copy_(torch.where(first, torch.where(batch_ok, 1, 0), bad_kind))
            bad_step.copy_(torch.where(first, step + 1, bad_step))
        if check_every_step:
            raise_if_nonfinite()

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
        optimizer.step()
        sae.after_step(out)  # BatchTopK moving threshold, JumpReLU threshold >= 0
        with torch.no_grad():
            since_fired.add_(1)
            since_fired.masked_fill_(out["fired"], 0)  # type: ignore[arg-type]
        step += 1

        is_last = step == total_steps
        is_log = step % train_cfg.log_every == 0 or is_last
        is_ckpt = step % train_cfg.checkpoint_every == 0 and not is_last
        if is_log or is_ckpt or is_last:
            raise_if_nonfinite()
        if is_log:
            now = time.perf_counter()
            entry = {
                "step": step,
                "loss": float(loss.detach()),
                "mse": float(out["mse"].detach()),  # type: ignore[union-attr]
                "aux": float(out["aux"].detach()),  # type: ignore[union-attr]
                "l0": float(out["l0"]),  # type: ignore[arg-type]
                "frac_dead": float((since_fired > window).float().mean()),
                "lr": lr,
                "tokens_per_s": (step - last_log_step) * batch_size / max(now - last_log_time, 1e-9),
            }
            last_log_time, last_log_step = now, step
            logs.append(entry)
            if on_log is not None:
                on_log(dict(entry))
        if is_ckpt:
            _save_checkpoint(out_dir, {
                "format": _CKPT_FORMAT,
                "fingerprint": fingerprint,
                "step": step,
                "sae": {k: v.detach().cpu() for k, v in sae.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "since_fired": since_fired.cpu(),
                "loader": _loader_state_json(loader),
                "rng": _rng_state(device),
                "scaling_factor": scale,
                "logs": json.dumps(logs),
            })

    # ---------------------------------------------------------------- finish
    if scale is not None:
        sae.fold_activation_norm_scaling_factor(scale)
    final = logs[-1] if logs else {}
    training_info = {
        "steps": total_steps,
        "training_tokens": total_steps * batch_size,
        "batch_size": batch_size,
        "seed": train_cfg.seed,
        "scaling_factor_folded": scale,
        "final": final,
        "n_dead": int((since_fired > window).sum()),
    }
    save_sae(sae, out_dir, cfg_extra=cfg_extra, training_info=training_info)
    write_json_atomic(out_dir / TRAINING_LOG, logs)
    _remove_dir(out_dir / CHECKPOINT_DIR)
    _remove_dir(out_dir / (CHECKPOINT_DIR + _OLD_SUFFIX))
    _discard_temporaries(out_dir)
    return {
        "completed": True,
        **training_info,
        "total_steps": total_steps,
        "resumed_from_step": resumed_from,
        "d_in": d_in,
        "d_sae": sae.d_sae,
        "wall_time_s": time.perf_counter() - t_start,
        "out_dir": str(out_dir),
    }
