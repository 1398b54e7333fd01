"""Stage ``train``: a family of SAEs trained from ONE pass over the activation store; resumable.

Each member is its own artifact ``train/<fp>/`` with ``fp`` computed by :func:`ref` from that
member's :class:`~saeflow.config.SAEConfig`, the :class:`~saeflow.config.TrainConfig` and the
activations, exactly as for a single SAE: a member's folder does not depend on which family it was
trained in. :func:`train_family_task` trains the incomplete members together
(:func:`saeflow.training.train_saes`: one batch drawn per step, fed to each member), marks each
complete, and returns the members' references in order. Members already complete are not
retrained, so adding an SAE to a family trains only that SAE.

Caching (see :func:`tasks.common.run_stage`): :func:`family_refs` is the stage's reference
function; a cached result is trusted only while *every* member's folder is complete.
"""

from __future__ import annotations


from contextlib import ExitStack

from prefect import task

from saeflow.artifacts import ArtifactRef, artifact_ref, begin, build_lock, fingerprint, mark_complete, require_complete
from saeflow.config import TrainConfig
from saeflow.saes import REGISTRY, SAEConfig, describe_sae
from saeflow.device import pick_device
from saeflow.sae_init import sample_rows
from saeflow.store import ActivationStore, ShuffledLoader
from saeflow.training import train_saes
from tasks.common import Progress, stage_logger

STAGE = "train"


def ref(acts: ArtifactRef, sae_cfg: SAEConfig, train_cfg: TrainConfig, root: str, **_) -> ArtifactRef:
    """The artifact of one SAE (a family member or a single SAE: the same folder)."""
    return artifact_ref(root, STAGE, fingerprint(STAGE, {"sae": sae_cfg.fingerprint_payload(),
                                                         "train": train_cfg.fingerprint_payload()}, acts))


def family_refs(acts: ArtifactRef, members: list[SAEConfig], train_cfg: TrainConfig, root: str, **_) -> list[ArtifactRef]:
    """The artifacts of a family, in member order (the stage's ``ref_fn`` for :func:`run_stage`)."""
    return [ref(acts, m, train_cfg, root) for m in members]


def check_sae_config(sae_cfg: SAEConfig) -> None:
    if sae_cfg.architecture not in REGISTRY:
        raise ValueError(f"unknown SAE architecture {sae_cfg.architecture!r}; registered: {sorted(REGISTRY)}")


def train_members(acts: ArtifactRef, members: list[SAEConfig], train_cfg: TrainConfig, root: str,
                  device: str = "auto") -> list[ArtifactRef]:
    """Train the incomplete members together; return every member's reference (in order).

    Each member is trained under its :func:`~saeflow.artifacts.build_lock`: a member that another
    run is training right now (a family sharing it, started at the same time) is left to that run;
    once this run's own members are done it waits for that lock and trains whatever the other run
    did not finish (nothing, unless it died)."""
    outs = family_refs(acts, members, train_cfg, root)
    for m in members:
        check_sae_config(m)
    todo: dict[str, int] = {}  # fingerprint -> member index (a member listed twice is trained once)
    for i, out in enumerate(outs):
        if not out.is_complete():
            todo.setdefault(out.fingerprint, i)
    others = _train_locked(acts, members, outs, list(todo.values()), train_cfg, device, wait=False)
    if others:
        stage_logger().info("train: %s being trained by another run; waiting for it",
                            ", ".join(describe_sae(members[i]) for i in others))
        _train_locked(acts, members, outs, others, train_cfg, device, wait=True)
    return outs


def _train_locked(acts: ArtifactRef, members: list[SAEConfig], outs: list[ArtifactRef], idx: list[int],
                  train_cfg: TrainConfig, device: str, wait: bool) -> list[int]:
    """Take the build locks of members ``idx`` (waiting for them, or only the free ones), train
    those still incomplete together; the members whose lock another run holds."""
    with ExitStack() as locks:
        held = [i for i in idx if locks.enter_context(build_lock(outs[i], wait=wait))]
        _train_together(acts, members, outs, [i for i in held if not outs[i].is_complete()], train_cfg, device)
    return [i for i in idx if i not in held]


def _train_together(acts: ArtifactRef, members: list[SAEConfig], outs: list[ArtifactRef], idx: list[int],
                    train_cfg: TrainConfig, device: str) -> None:
    """Train members ``idx`` in one pass over the store and mark each complete."""
    if not idx:
        return
    logger = stage_logger()
    logger.info("train: %d of %d SAEs to train in one pass (%s); %d already complete", len(idx), len(members),
                ", ".join(describe_sae(members[i]) for i in idx), len(members) - len(idx))
    store = ActivationStore.open(require_complete(acts))
    loader = ShuffledLoader(store, train_cfg.batch_size, train_cfg.seed, train_cfg.buffer_chunks, 0, store.train_rows)
    scaling = None
    if any(members[i].normalize_activations == "expected_average_only_in" for i in idx):
        scaling = store.normalization_factor()
    init_sample = None
    # once per family, from a seeded store sample
    if any(members[i].needs_init_sample for i in idx):
        init_sample = sample_rows(store, train_cfg.init_sample_rows, train_cfg.seed)
    for i in idx:
        begin(outs[i], {"sae": members[i].model_dump(mode="json"), "train": train_cfg.model_dump(mode="json")}, [acts])
    steps = max(1, train_cfg.training_tokens // train_cfg.batch_size)
    progress = [Progress(f"training {describe_sae(members[i])}", every_s=0.0) for i in idx]

    def on_log(j: int, rec: dict) -> None:
        progress[j].update(rec["step"], steps,
                           " ".join(f"{k}={v:.4g}" for k, v in rec.items() if k != "step" and isinstance(v, (int, float))))

    extra = {"hook_name": store.attrs.get("hook"), "model_name": store.attrs.get("model"),
             "activations_fingerprint": acts.fingerprint}
    summaries = train_saes([(members[i], outs[i].dir, extra) for i in idx], train_cfg, loader, store.d_model,
                           pick_device(device), scaling_factor=scaling, on_log=on_log, init_sample=init_sample)
    together = [outs[i].fingerprint for i in idx]
    for i, summary in zip(idx, summaries):
        meta = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
        meta.update(hook=store.attrs.get("hook"), model=store.attrs.get("model"), d_in=store.d_model,
                    train_rows=store.train_rows, sae=describe_sae(members[i]), trained_together=together)
        mark_complete(outs[i], **meta)
        logger.info("train: %s done (%s)", describe_sae(members[i]),
                    {k: summary.get(k) for k in ("steps", "resumed_from_step", "n_dead", "wall_time_s")})


@task(name="train-family")
def train_family_task(acts: ArtifactRef, members: list[SAEConfig], train_cfg: TrainConfig, root: str,
                      device: str = "auto") -> list[ArtifactRef]:
    """Train a family's incomplete members in one pass; the members' references, in order."""
    return train_members(acts, list(members), train_cfg, root, device)


@task(name="train", task_run_name="train-{sae_cfg.architecture}-{sae_cfg.width}")
def train_task(acts: ArtifactRef, sae_cfg: SAEConfig, train_cfg: TrainConfig, root: str, device: str = "auto") -> ArtifactRef:
    """One SAE: a one-member family (cache it with :func:`ref`)."""
    return train_members(acts, [sae_cfg], train_cfg, root, device)[0]
