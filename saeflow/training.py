"""Resumable SAE training loop (SAELens trainer semantics, SPEC 3.3).

:func:`train_sae` trains one SAE from an endless, resumable :class:`BatchLoader` and leaves in
``out_dir``:

- ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout, see :func:`saeflow.saes.save_sae`),
  working on raw activations (the normalisation factor is folded into the weights);
- ``training_log.json``: the list of logged dicts (``step, loss, mse, aux, l0, frac_dead, lr,
  tokens_per_s``).

While it runs, ``out_dir/checkpoint/`` holds the full trainer state every
``train_cfg.checkpoint_every`` steps (:mod:`saeflow.checkpoint`: renamed into place, so a kill
at any moment leaves the previous or the new checkpoint, never a partial one; checksummed, a
damaged one raises :class:`CheckpointError`). A run started again resumes from it and ends with
weights *bit-identical* to an uninterrupted run (same machine, same torch thread count). After the
final save ``training_summary.json`` (:data:`DONE_FILE`) marks the folder finished: it is never
trained again.

:func:`train_saes` trains a *family* of SAEs from one pass over the loader: every batch is drawn
once and fed to each member in turn; each member keeps everything above in its own ``out_dir`` and
ends bit-identical to training it alone (see its docstring for the resume rule when members'
checkpoints are at different steps). :func:`train_sae` is the one-member case.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

import torch

from saeflow import checkpoint
from saeflow.artifacts import write_json_atomic
from saeflow.checkpoint import CHECKPOINT_DIR, DONE_FILE, CheckpointError
from saeflow.config import TrainConfig
from saeflow.hostmem import reuse_freed_memory
from saeflow.precision import matmul_dtype, resolve_field
from saeflow.saes import BaseSAE, SAEConfig, build_sae, save_sae
from saeflow.sae_init import init_biases, resample_dead_latents

__all__ = [
    "BatchLoader",
    "train_sae",
    "train_saes",
    "lr_at_step",
    "estimate_scaling_factor",
    "CheckpointError",
    "NonFiniteError",
    "CHECKPOINT_DIR",
    "TRAINING_LOG",
    "DONE_FILE",
    "NORM_ESTIMATE_BATCHES",
]

TRAINING_LOG = "training_log.json"
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
    w, d = schedule_lengths(total_steps, train_cfg)
    if w > 0 and step < w:
        factor = min(factor, (step + 1) / w)
    if d > 0 and step >= total_steps - d:
        factor = min(factor, (total_steps - step) / d)
    return lr * factor


def schedule_lengths(total_steps: int, train_cfg: TrainConfig) -> tuple[int, int]:
    """(warm-up, decay) steps: the larger of the step counts and the run fractions of ``train_cfg``."""
    w = max(train_cfg.lr_warm_up_steps, round(train_cfg.lr_warm_up_fraction * total_steps))
    d = max(train_cfg.lr_decay_steps, round(train_cfg.lr_decay_fraction * total_steps))
    return int(w), int(d)


def dead_window(sae_cfg: SAEConfig, total_steps: int) -> int:
    """Steps without firing after which a latent counts as dead (``dead_window_fraction`` wins when set)."""
    if sae_cfg.dead_window_fraction is not None:
        return max(1, round(sae_cfg.dead_window_fraction * total_steps))
    return int(sae_cfg.dead_feature_window)


def k_anneal_steps(sae_cfg: SAEConfig, total_steps: int) -> int:
    """Steps over which a k-based SAE's training ``k`` anneals down to ``k`` (0 = no annealing)."""
    if sae_cfg.k_anneal_from <= 1.0 or sae_cfg.k_anneal_fraction <= 0.0:
        return 0
    return int(round(sae_cfg.k_anneal_fraction * total_steps))


def resample_steps(sae_cfg: SAEConfig, total_steps: int) -> frozenset[int]:
    """1-based steps after which dead latents are resampled (``resample_dead_at`` fractions; never the last)."""
    return frozenset(s for s in (round(f * total_steps) for f in sae_cfg.resample_dead_at) if 1 <= s < total_steps)


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


def _check_batch_shape(batch: torch.Tensor, step: int, batch_size: int, d_in: int) -> None:
    if batch.ndim != 2 or batch.shape[1] != d_in or batch.shape[0] != batch_size:
        raise ValueError(
            f"loader yielded a batch of shape {tuple(batch.shape)} at step {step}; expected "
            f"[{batch_size}, {d_in}] (train.batch_size, d_in)"
        )


class _Member:
    """One SAE of a family: its model, optimiser, dead-latent counters, logs and position."""

    def __init__(self, index: int, sae_cfg: SAEConfig, out_dir: Path, cfg_extra: dict[str, Any] | None,
                 train_cfg: TrainConfig, d_in: int, device: torch.device, total_steps: int) -> None:
        self.index, self.cfg, self.out_dir, self.cfg_extra = index, sae_cfg, Path(out_dir), cfg_extra
        self.fingerprint = _fingerprint(sae_cfg, train_cfg, d_in)
        self.normalizes = sae_cfg.normalize_activations == "expected_average_only_in"
        self.window = dead_window(sae_cfg, total_steps)
        self.resample_at = resample_steps(sae_cfg, total_steps)
        self.n_resampled = 0
        self.b_dec_init: dict[str, Any] | None = None
        self.done: dict[str, Any] | None = None
        self.step = 0
        self.resumed_from: int | None = None
        self.ckpt: dict[str, Any] | None = None
        self.scale: float | None = None
        self.logs: list[dict[str, Any]] = []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.done = checkpoint.read_done(self.out_dir, self.fingerprint)
        if self.done is not None:  # finished earlier: a kill may have left its checkpoint behind
            checkpoint.clear_checkpoints(self.out_dir)
            return
        (self.out_dir / DONE_FILE).unlink(missing_ok=True)  # stale: another config's, or damaged weights
        self.sae: BaseSAE = build_sae(sae_cfg, d_in, seed=train_cfg.seed).to(device)
        if hasattr(self.sae, "k_anneal_steps"):
            self.sae.k_anneal_steps = k_anneal_steps(sae_cfg, total_steps)
        self.optimizer = _make_adam(self.sae, lr_at_step(0, total_steps, train_cfg))
        self.params = list(self.sae.parameters())
        self.since_fired = torch.zeros(self.sae.d_sae, dtype=torch.long, device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite step (1-based)
        self.bad_kind = torch.zeros((), dtype=torch.long, device=device)  # 0 batch, 1 loss
        ckpt_path = checkpoint.find_checkpoint(self.out_dir)
        if ckpt_path is not None:
            ck = checkpoint.load_checkpoint(ckpt_path, self.fingerprint)
            self.sae.load_state_dict(ck["sae"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.since_fired.copy_(ck["since_fired"].to(device))
            self.logs = json.loads(ck["logs"])
            self.step = self.resumed_from = int(ck["step"])
            self.scale = ck["scaling_factor"]
            self.n_resampled = int(ck.get("n_resampled", 0))
            self.b_dec_init = json.loads(ck["b_dec_init"]) if ck.get("b_dec_init") else None
            self.ckpt = {"loader": ck["loader"], "rng": ck["rng"], "path": ckpt_path}
        self.last_log_time, self.last_log_step = time.perf_counter(), self.step

    def check_factor(self, factor: float | None) -> None:
        """A resumed member must keep the factor it was trained with."""
        if self.ckpt is None or not self.normalizes:
            return
        saved = self.scale
        if factor is not None and (saved is None or not math.isclose(saved, factor, rel_tol=1e-6)):
            raise CheckpointError(
                f"checkpoint {self.ckpt['path']} was trained with scaling_factor={saved} but {factor} was passed; "
                f"pass the same factor, or delete {self.ckpt['path']} to restart from step 0"
            )

    def raise_if_nonfinite(self) -> None:
        b = int(self.bad_step)
        if b >= 0:
            raise NonFiniteError(_nonfinite_message(b, "batch" if int(self.bad_kind) == 0 else "loss", self.out_dir))

    def train_step(self, x: torch.Tensor, step: int, lr: float, train_cfg: TrainConfig, check_every_step: bool) -> dict[str, Any]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        dead = self.since_fired > self.window
        with matmul_dtype(train_cfg.precision):  # "float32" / "bfloat16" (train_saes resolved "auto")
            out = self.sae.training_forward(x, dead, return_feature_acts=False, step=step)
        loss = out["loss"]
        assert isinstance(loss, torch.Tensor)
        with torch.no_grad():
            batch_ok = torch.isfinite(x).all()
            loss_ok = torch.isfinite(loss)
            first = (self.bad_step < 0) & ~(batch_ok & loss_ok)
            self.bad_kind.copy_(torch.where(first, torch.where(batch_ok, 1, 0), self.bad_kind))
            self.bad_step.copy_(torch.where(first, step + 1, self.bad_step))
        if check_every_step:
            self.raise_if_nonfinite()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, train_cfg.grad_clip)
        self.optimizer.step()
        self.sae.after_step(out)  # BatchTopK moving threshold, JumpReLU threshold >= 0
        with torch.no_grad():
            self.since_fired.add_(1)
            self.since_fired.masked_fill_(out["fired"], 0)  # type: ignore[arg-type]
        self.step = step + 1
        if self.step in self.resample_at:
            dead = self.since_fired > self.window
            gen = torch.Generator(device="cpu").manual_seed(int(train_cfg.seed) * 1_000_003 + self.step)
            n = resample_dead_latents(self.sae, dead, x, self.optimizer, gen, self.cfg.resample_encoder_scale)
            with torch.no_grad():
                self.since_fired.masked_fill_(dead, 0)
            self.n_resampled += n
            out["resampled"] = n
        return out

    def log_entry(self, out: dict[str, Any], lr: float, batch_size: int) -> dict[str, Any]:
        now = time.perf_counter()
        entry = {
            "step": self.step,
            "loss": float(out["loss"].detach()),
            "mse": float(out["mse"].detach()),
            "aux": float(out["aux"].detach()),
            "l0": float(out["l0"]),
            "frac_dead": float((self.since_fired > self.window).float().mean()),
            "lr": lr,
            "tokens_per_s": (self.step - self.last_log_step) * batch_size / max(now - self.last_log_time, 1e-9),
            "resampled": self.n_resampled,
        }
        if "l1_coefficient" in out:  # relu: the (steered, with target_l0) L1 coefficient of this step
            entry["l1_coefficient"] = float(out["l1_coefficient"])
        self.last_log_time, self.last_log_step = now, self.step
        self.logs.append(entry)
        return entry

    def save_checkpoint(self, loader_json: str, device: torch.device) -> None:
        checkpoint.save_checkpoint(self.out_dir, {
            "format": checkpoint.FORMAT,
            "fingerprint": self.fingerprint,
            "step": self.step,
            "sae": {k: v.detach().cpu() for k, v in self.sae.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "since_fired": self.since_fired.cpu(),
            "loader": loader_json,
            "rng": checkpoint.rng_state(device),
            "scaling_factor": self.scale,
            "logs": json.dumps(self.logs),
            "n_resampled": self.n_resampled,
            "b_dec_init": json.dumps(self.b_dec_init) if self.b_dec_init is not None else "",
        })

    def finish(self, total_steps: int, train_cfg: TrainConfig, d_in: int, t_start: float) -> dict[str, Any]:
        if self.scale is not None:
            self.sae.fold_activation_norm_scaling_factor(self.scale)
        batch_size = train_cfg.batch_size
        training_info = {
            "steps": total_steps,
            "training_tokens": total_steps * batch_size,
            "batch_size": batch_size,
            "seed": train_cfg.seed,
            "scaling_factor_folded": self.scale,
            "final": self.logs[-1] if self.logs else {},
            "n_dead": int((self.since_fired > self.window).sum()),
            "dead_window_steps": self.window,
            "n_resampled": self.n_resampled,
            "b_dec_init": self.b_dec_init,
        }
        save_sae(self.sae, self.out_dir, cfg_extra=self.cfg_extra, training_info=training_info)
        write_json_atomic(self.out_dir / TRAINING_LOG, self.logs)
        summary = {
            "completed": True,
            **training_info,
            "total_steps": total_steps,
            "resumed_from_step": self.resumed_from,
            "d_in": d_in,
            "d_sae": self.sae.d_sae,
            "wall_time_s": time.perf_counter() - t_start,
            "out_dir": str(self.out_dir),
        }
        checkpoint.write_done(self.out_dir, self.fingerprint, summary)
        checkpoint.clear_checkpoints(self.out_dir)
        self.done = summary
        return summary

    def partial_summary(self, total_steps: int) -> dict[str, Any]:
        return {"completed": False, "steps": self.step, "total_steps": total_steps,
                "resumed_from_step": self.resumed_from, "out_dir": str(self.out_dir)}


@reuse_freed_memory()  # no page faults on the step's freed and reallocated buffers (saeflow.hostmem)
def train_saes(
    members: list[tuple[SAEConfig, Path, dict[str, Any] | None]],
    train_cfg: TrainConfig,
    loader: BatchLoader,
    d_in: int,
    device: torch.device,
    scaling_factor: float | None = None,
    on_log: Callable[[int, dict[str, Any]], None] | None = None,
    stop_after_steps: int | None = None,
    init_sample: torch.Tensor | None = None,
    on_step: Callable[[int, int, BaseSAE], None] | None = None,
) -> list[dict[str, Any]]:
    """Train a family of SAEs from ONE pass over ``loader``; return one JSON-able summary per member.

    ``members`` holds ``(sae_cfg, out_dir, cfg_extra)`` per SAE (distinct ``out_dir`` s). Every
    member sees exactly the batches it would see trained alone by :func:`train_sae` with the same
    ``train_cfg`` and loader, and keeps its own optimiser, dead-latent counters, training log,
    checkpoint and final save in its own ``out_dir``, so its weights are bit-identical to training
    it alone. Each step draws one batch, then trains the members on it in list order.

    - **Finished members** (``out_dir`` holds the ``training_summary.json`` written after the final
      save, with this member's fingerprint and a matching weights checksum) are not trained again:
      their stored summary is returned with ``already_complete=True``.
    - **Resume rule.** Each unfinished member resumes from its own checkpoint (step ``s_i``, 0
      without one). A kill can land between two members' checkpoint (or final) writes, so the
      ``s_i`` may differ. The loader (and RNG) are restored from the member with the smallest
      ``s_i`` (from a fresh loader when that is 0); the pass restarts at that step, and a member
      ahead of it draws the batches of steps ``< s_i`` without training on them. From step
      ``max(s_i)`` on all members train in lock-step again. Each member therefore continues exactly
      where it stopped, on the batches an uninterrupted run would have given it.
    - **Normalisation** (``normalize_activations="expected_average_only_in"``): ``scaling_factor``
      multiplies the batches of the members that normalise; members with ``"none"`` ignore it.
      When it is ``None`` it is estimated once from the first :data:`NORM_ESTIMATE_BATCHES`
      batches (as ``train_sae`` does, training continues after them); this needs every member to
      normalise (a family mixing ``"none"`` members would start on different batches), otherwise
      pass the factor (the pipeline always does). A resumed member keeps the factor of its
      checkpoint (:class:`CheckpointError` when a different one is passed).
    - **Data-dependent b_dec** (``sae.b_dec_init`` ``mean`` / ``geometric_median``): computed once
      per method from ``init_sample`` (raw activation rows ``[n, d_in]``; the pipeline passes a
      seeded sample of the store, :func:`saeflow.sae_init.sample_rows`), or, when it is ``None``,
      from the first ``ceil(train.init_sample_rows / batch_size)`` batches of a fresh loader (the
      same batches the normalisation estimate reads; training continues after them), then scaled by
      the member's normalisation factor and written into ``b_dec`` before step 0. Resumed members
      keep theirs (it is in the checkpoint's weights). Members with ``b_enc_init: target_l0`` (and
      a ``target_l0``) then get ``b_enc`` from the same rows, normalised, after their ``b_dec``
      (:func:`saeflow.sae_init.b_enc_for_target_l0`; recorded as ``b_dec_init["b_enc"]``).
    - **Dead latents**: a latent is dead after :func:`dead_window` steps without firing (feeds the
      aux losses); at :func:`resample_steps` dead latents are resampled
      (:func:`saeflow.sae_init.resample_dead_latents`, on the step's batch, seeded by the step).
    - ``on_log(i, d)`` for member ``i`` every ``log_every`` steps and after its last step (``d`` is
      also appended to its ``training_log.json``; ``tokens_per_s`` is the rate of the whole pass).
    - ``stop_after_steps``: return right after global step ``stop_after_steps`` as if killed there
      (no extra checkpoint, no final save); unfinished members' summaries have ``completed=False``.
    - ``on_step(i, steps_done, sae)`` for member ``i`` after each of its optimiser steps, and with
      ``steps_done=0`` before the first step of a member that starts from scratch (after its
      ``b_dec`` initialisation): e.g. to evaluate the SAE at chosen steps. It must not change the
      SAE (use ``torch.no_grad()``); the weights are in the normalised space of a member that
      normalises. A resumed member's steps before its checkpoint are not replayed.

    Raises :class:`NonFiniteError` (naming the step and the member's folder),
    :class:`CheckpointError`, ``ValueError`` for bad arguments, all before any member's finished
    result is touched.
    """
    t_start = time.perf_counter()
    device = torch.device(device)
    train_cfg = resolve_field(train_cfg, "precision", device)  # "auto" -> concrete: it keys the checkpoints
    total_steps = train_cfg.training_tokens // train_cfg.batch_size
    if total_steps < 1:
        raise ValueError(
            f"training_tokens={train_cfg.training_tokens} < batch_size={train_cfg.batch_size}: no full step to "
            "train; raise train.training_tokens or lower train.batch_size"
        )
    if not members:
        raise ValueError("train_saes needs at least one member")
    dirs = [Path(m[1]).resolve() for m in members]
    if len(set(dirs)) != len(dirs):
        dup = sorted({str(d) for d in dirs if dirs.count(d) > 1})
        raise ValueError(f"members share an out_dir ({', '.join(dup)}): give each SAE its own folder")
    if scaling_factor is not None and not (math.isfinite(scaling_factor) and scaling_factor > 0):
        raise ValueError(f"scaling_factor must be a positive finite number, got {scaling_factor!r}")
    normalizing = [m[0].normalize_activations == "expected_average_only_in" for m in members]
    estimate = scaling_factor is None and any(normalizing)
    if estimate and not all(normalizing):
        raise ValueError(
            "these SAEs mix normalize_activations 'none' and 'expected_average_only_in': pass scaling_factor "
            "(e.g. sqrt(d_in) / mean activation norm), or train them separately"
        )

    data_init = [m[0].needs_init_sample for m in members]
    if init_sample is None and any(data_init) and not all(data_init):
        raise ValueError(
            "these SAEs mix b_dec_init 'zeros' with a data-dependent b_dec_init: pass init_sample (e.g. "
            "saeflow.sae_init.sample_rows(store, ...)), or train them separately (b_enc_init: target_l0 on an SAE "
            "with a target_l0 counts as data-dependent too)"
        )
    state = [_Member(i, cfg, out_dir, extra, train_cfg, d_in, device, total_steps) for i, (cfg, out_dir, extra) in enumerate(members)]
    active = [m for m in state if m.done is None]
    if not active:
        return [{**m.done, "already_complete": True} for m in state if m.done is not None]
    for m in active:
        m.check_factor(scaling_factor if m.normalizes else None)

    lead = min(active, key=lambda m: m.step)
    if lead.ckpt is not None:
        loader.load_state_dict(json.loads(lead.ckpt["loader"]))
        checkpoint.set_rng_state(lead.ckpt["rng"], device)
    batches = iter(loader)
    need_init = [m for m in active if m.ckpt is None and m.cfg.needs_init_sample]
    # decided from the configs (not from which members have checkpoints), so a resume draws the same batches
    from_loader = init_sample is None and any(data_init)
    drawn: list[torch.Tensor] = []
    if lead.ckpt is None and (estimate or from_loader):
        n_drawn = max(NORM_ESTIMATE_BATCHES if estimate else 0,
                      math.ceil(train_cfg.init_sample_rows / train_cfg.batch_size) if from_loader else 0)
        drawn = [next(batches) for _ in range(n_drawn)]
        for b in drawn:
            _check_batch_shape(b, 1, train_cfg.batch_size, d_in)
    if lead.ckpt is None and estimate:
        estimated = estimate_scaling_factor(drawn, d_in, NORM_ESTIMATE_BATCHES)
        for m in active:
            m.check_factor(estimated)
        scaling_factor = estimated
    for m in active:
        if m.ckpt is None:
            m.scale = float(scaling_factor) if (m.normalizes and scaling_factor is not None) else None
    if need_init:
        sample = torch.cat(drawn)[: train_cfg.init_sample_rows] if from_loader else init_sample
        assert sample is not None
        if sample.ndim != 2 or sample.shape[1] != d_in:
            raise ValueError(f"init_sample must be [rows, {d_in}], got {tuple(sample.shape)}")
        medians: dict[str, torch.Tensor | None] = {}  # one b_dec per method for the whole family
        for m in need_init:
            m.b_dec_init = init_biases(m.sae, m.cfg, sample, m.scale, medians, "loader" if from_loader else "sample")

    check_every_step = device.type == "cpu"  # a host sync is free on CPU; elsewhere check on log/checkpoint steps
    batch_size = train_cfg.batch_size
    step = lead.step
    for m in active:
        m.sae.train()
        m.last_log_time, m.last_log_step = time.perf_counter(), m.step
        if on_step is not None and m.ckpt is None:
            on_step(m.index, 0, m.sae)

    while step < total_steps:
        if stop_after_steps is not None and step >= stop_after_steps:
            return [{**m.done, "already_complete": True} if m.done is not None else m.partial_summary(total_steps)
                    for m in state]
        batch = next(batches)
        _check_batch_shape(batch, step + 1, batch_size, d_in)
        raw = batch.to(device, non_blocking=True)
        if raw.dtype != torch.float32:
            raw = raw.float()
        scaled: dict[float | None, torch.Tensor] = {}
        lr = lr_at_step(step, total_steps, train_cfg)
        is_last = step + 1 == total_steps
        is_log = (step + 1) % train_cfg.log_every == 0 or is_last
        is_ckpt = (step + 1) % train_cfg.checkpoint_every == 0 and not is_last
        loader_json: str | None = None
        for m in active:
            if m.step > step:  # resumed ahead of the lead: this batch is already in its weights
                continue
            if m.scale not in scaled:
                scaled[m.scale] = raw * m.scale if m.scale is not None else raw
            out = m.train_step(scaled[m.scale], step, lr, train_cfg, check_every_step)
            if on_step is not None:
                on_step(m.index, m.step, m.sae)
            if is_log or is_ckpt or is_last:
                m.raise_if_nonfinite()
            if is_log:
                entry = m.log_entry(out, lr, batch_size)
                if on_log is not None:
                    on_log(m.index, dict(entry))
            if is_ckpt:
                if loader_json is None:
                    loader_json = _loader_state_json(loader)
                m.save_checkpoint(loader_json, device)
        step += 1

    # ---------------------------------------------------------------- finish, member by member
    for m in active:
        m.finish(total_steps, train_cfg, d_in, t_start)
    return [m.done if m in active else {**m.done, "already_complete": True} for m in state]  # type: ignore[misc]


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
    init_sample: torch.Tensor | None = None,
    on_step: Callable[[int, BaseSAE], None] | None = None,
) -> dict[str, Any]:
    """Train one SAE (a one-member :func:`train_saes`), resuming from ``out_dir/checkpoint``; return a summary.

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
    - ``init_sample``: raw activation rows for a data-dependent ``b_dec`` (see :func:`train_saes`).
    - ``on_step(steps_done, sae)`` after each optimiser step and before the first (see :func:`train_saes`).
    - ``cfg_extra`` goes into the saved ``cfg.json`` metadata (e.g. ``model_name``, ``hook_name``).
    - a finished ``out_dir`` (see :data:`DONE_FILE`) is not trained again: its stored summary is
      returned with ``already_complete=True``.

    Raises :class:`NonFiniteError` (naming the step) on NaN/inf in a batch or the loss,
    :class:`CheckpointError` for a damaged or foreign checkpoint, ``ValueError`` for bad arguments.
    """
    if sae_cfg.normalize_activations == "none" and scaling_factor is not None:
        raise ValueError("scaling_factor was given but sae.normalize_activations is 'none'; pass scaling_factor=None")
    return train_saes([(sae_cfg, Path(out_dir), cfg_extra)], train_cfg, loader, d_in, device,
                      scaling_factor=scaling_factor, on_log=(lambda _i, d: on_log(d)) if on_log is not None else None,
                      stop_after_steps=stop_after_steps, init_sample=init_sample,
                      on_step=(lambda _i, n, sae: on_step(n, sae)) if on_step is not None else None)[0]
