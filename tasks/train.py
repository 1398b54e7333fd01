"""Stage ``train``: one SAE trained from the activation store; resumable from checkpoints."""

from __future__ import annotations

import math

from prefect import task

from saeflow.artifacts import ArtifactRef, artifact_ref, begin, fingerprint, mark_complete, require_complete
from saeflow.config import SAEConfig, TrainConfig
from saeflow.device import pick_device
from saeflow.sae import REGISTRY
from saeflow.store import ActivationStore, ShuffledLoader
from saeflow.training import train_sae
from tasks.common import Progress, stage_logger

STAGE = "train"


def ref(acts: ArtifactRef, sae_cfg: SAEConfig, train_cfg: TrainConfig, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, STAGE, fingerprint(STAGE, {"sae": sae_cfg.fingerprint_payload(),
                                                         "train": train_cfg.fingerprint_payload()}, acts))


def check_sae_config(sae_cfg: SAEConfig) -> None:
    if sae_cfg.architecture not in REGISTRY:
        raise ValueError(f"unknown SAE architecture {sae_cfg.architecture!r}; registered: {sorted(REGISTRY)}")


@task(name="train", task_run_name="train-{sae_cfg.architecture}-{sae_cfg.width}")
def train_task(acts: ArtifactRef, sae_cfg: SAEConfig, train_cfg: TrainConfig, root: str, device: str = "auto") -> ArtifactRef:
    out = ref(acts, sae_cfg, train_cfg, root)
    if out.is_complete():
        return out
    check_sae_config(sae_cfg)
    logger = stage_logger()
    store = ActivationStore.open(require_complete(acts))
    loader = ShuffledLoader(store, train_cfg.batch_size, train_cfg.seed, train_cfg.buffer_chunks, 0, store.train_rows)
    scaling = None
    if sae_cfg.normalize_activations == "expected_average_only_in":
        scaling = math.sqrt(store.d_model) / store.mean_norm()
    begin(out, {"sae": sae_cfg.model_dump(mode="json"), "train": train_cfg.model_dump(mode="json")}, [acts])
    steps = max(1, train_cfg.training_tokens // train_cfg.batch_size)
    progress = Progress(f"training {sae_cfg.architecture} width {sae_cfg.width}", every_s=0.0)

    def on_log(rec: dict) -> None:
        progress.update(rec["step"], steps,
                        " ".join(f"{k}={v:.4g}" for k, v in rec.items() if k != "step" and isinstance(v, (int, float))))

    summary = train_sae(sae_cfg, train_cfg, loader, store.d_model, out.dir, pick_device(device),
                        scaling_factor=scaling, on_log=on_log,
                        cfg_extra={"hook_name": store.attrs.get("hook"), "model_name": store.attrs.get("model"),
                                   "activations_fingerprint": acts.fingerprint})
    meta = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
    meta.update(hook=store.attrs.get("hook"), model=store.attrs.get("model"), d_in=store.d_model, train_rows=store.train_rows)
    mark_complete(out, **meta)
    logger.info("train: done (%s)", summary)
    return out
