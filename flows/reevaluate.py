"""Deployable flow ``reevaluate`` (scheduled in prefect.yaml): evaluate every SAE that lacks
current results, then refresh the profile's tables and report.

SAEs it finds:

- ours: every complete ``<root>/train/<fp>/`` folder trained on this profile's activations (its
  ``config.json`` names the activation fingerprint), e.g. members of earlier families or of a
  ``train-family`` run; folders of other activations (another model / hook / corpus) are listed as
  skipped;
- dropped in: every SAE folder in SAELens layout (``cfg.json`` + ``sae_weights.safetensors``) in
  ``sae_folder`` or one level below it; one whose ``cfg.json`` names another hook or another input
  width is skipped with the reason (a bad file never stops the scheduled run).

They are evaluated by the pipeline itself (the profile's family + dropped SAEs as ``import_saes``
+ the other ``train/`` SAEs as ``extra_saes``): every evaluation stage's artifact is fingerprinted
by its config, its inputs and its code version (:func:`tasks.common.code_version`: a hash of the
evaluation's ``saeflow/<eval>.py`` and ``tasks/<eval>.py``), so what is complete is reused and only
what is missing is computed: a new SAE, an SAE whose evaluation config changed, or every SAE of an
evaluation whose code changed (a new saeflow version). Old result folders stay untouched (``saeflow
clean`` removes them). The flow reports, per SAE, whether this run computed any of its per-SAE
results (``evaluated``) or found them all present.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tasks import common  # noqa: F401  (sets Prefect's offline settings before prefect loads)
from prefect import flow

from flows.extract import expected_activations, prepare_root
from flows.options import main_of, overrides
from flows.pipeline import run_pipeline
from flows.runner import load_profile
from flows.summary import PipelineSummary
from saeflow.artifacts import COMPLETE_MARKER, ArtifactRef, is_complete
from saeflow.config import PipelineConfig
from saeflow.saes import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from tasks import train
from tasks.common import stage_logger


def find_trained(root: str, acts: ArtifactRef, exclude: set[str]) -> tuple[list[ArtifactRef], list[dict]]:
    """Complete ``train/`` SAEs of these activations (minus ``exclude`` fingerprints) and the
    skipped ones with their reason."""
    found: list[ArtifactRef] = []
    skipped: list[dict] = []
    base = Path(root) / train.STAGE
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        if not d.is_dir() or d.name in exclude:
            continue
        if not is_complete(d, d.name):
            skipped.append({"sae": str(d), "reason": "incomplete (training running or interrupted)"})
            continue
        try:
            upstream = json.loads((d / "config.json").read_text()).get("upstream", {})
        except (OSError, ValueError):
            skipped.append({"sae": str(d), "reason": "unreadable config.json"})
            continue
        if upstream.get("activations") != acts.fingerprint:
            skipped.append({"sae": str(d), "reason": f"trained on other activations ({upstream.get('activations')}), "
                                                     f"not this profile's ({acts.fingerprint})"})
            continue
        found.append(ArtifactRef(stage=train.STAGE, fingerprint=d.name, path=str(d)))
    return found, skipped


def find_dropped(folder: str | None, hook: str, d_model: int | None) -> tuple[list[str], list[dict]]:
    """SAELens-layout SAE folders in ``folder`` (itself or one level below) that fit this hook and
    model width, and the skipped ones with their reason."""
    if not folder:
        return [], []
    base = Path(folder)
    if not base.is_dir():
        return [], [{"sae": str(base), "reason": "sae_folder does not exist"}]
    candidates = [base] + sorted(p for p in base.iterdir() if p.is_dir())
    found: list[str] = []
    skipped: list[dict] = []
    for d in candidates:
        has_cfg, has_w = (d / SAE_CFG_FILENAME).is_file(), (d / SAE_WEIGHTS_FILENAME).is_file()
        if not (has_cfg or has_w):
            continue
        if not (has_cfg and has_w):
            skipped.append({"sae": str(d), "reason": f"not SAELens layout (needs {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME})"})
            continue
        try:
            cfg = json.loads((d / SAE_CFG_FILENAME).read_text())
        except (OSError, ValueError) as exc:
            skipped.append({"sae": str(d), "reason": f"unreadable {SAE_CFG_FILENAME}: {exc}"})
            continue
        their_hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
        if their_hook and their_hook != hook:
            skipped.append({"sae": str(d), "reason": f"reads hook {their_hook}, this profile reads {hook}"})
            continue
        if d_model is not None and cfg.get("d_in") is not None and int(cfg["d_in"]) != d_model:
            skipped.append({"sae": str(d), "reason": f"d_in={cfg['d_in']} but the model width is {d_model}"})
            continue
        found.append(str(d.resolve()))
    return found, skipped


def _new_since(path: str | None, t0: float) -> bool:
    """The artifact's completion marker was written after ``t0`` (by this run)."""
    if path is None:
        return False
    marker = Path(path) / COMPLETE_MARKER
    return marker.is_file() and marker.stat().st_mtime >= t0


def _per_sae_paths(out: PipelineSummary, i: int) -> list[str | None]:
    refs = out.refs
    paths: list[str | None] = [refs.metrics[i].path]
    for ev in refs.evals.values():
        paths.append(ev.per_sae[i].path if i < len(ev.per_sae) and ev.per_sae[i] is not None else None)
    return paths


@flow(name="saeflow-reevaluate", log_prints=True)
def reevaluate(profile: str = "configs/quick.yaml", artifacts: str | None = None, sae_folder: str | None = None,
               overrides: dict | None = None) -> dict:
    """Evaluate every SAE of the profile's activations that lacks current results; refresh the
    tables (``results/<profile>/``, one row per SAE found) and the report.

    Args:
        profile: profile YAML (model, hook and the evaluations to run), relative to the repository.
        artifacts: artifacts root (default ``$SAEFLOW_ARTIFACTS`` or ``artifacts/``).
        sae_folder: folder watched for SAEs in SAELens layout (``cfg.json`` +
            ``sae_weights.safetensors``), itself or one subfolder per SAE; ``None`` = only ours.
        overrides: sections merged over the profile, e.g. ``{"runner": {"kind": "dask"}}``.

    Returns ``{"evaluated", "up_to_date", "skipped", "new_artifacts", "results", "report"}``:
    ``evaluated`` / ``up_to_date`` list the SAEs (``{"sae", "fingerprint", "source"}``) for which
    this run computed results / found every result present.
    """
    config: PipelineConfig = load_profile(profile, overrides)
    root = prepare_root(artifacts)
    logger = stage_logger()
    acts = expected_activations(config, root)
    members = {r.fingerprint for r in train.family_refs(acts, config.sae_configs(), config.train, root)}
    trained, skipped = find_trained(root, acts, members)
    d_model = None
    if acts.is_complete():
        d_model = json.loads((acts.dir / COMPLETE_MARKER).read_text()).get("d_model")
    dropped, skipped_dropped = find_dropped(sae_folder, config.activations.hook, d_model)
    skipped += skipped_dropped
    imports = tuple(dict.fromkeys([*config.import_saes, *dropped]))
    run_config = config.model_copy(update={"import_saes": imports})
    logger.info("reevaluate: %d family members, %d other trained SAEs, %d dropped-in SAEs; %d skipped",
                len(members), len(trained), len(dropped), len(skipped))
    t0 = time.time() - 1e-3
    out = run_pipeline(run_config, root, extra_saes=trained)
    refs = out.refs
    saes = ([(r, "family") for r in refs.train] + [(r, f"dropped: {p}") for r, p in zip(refs.imported, imports)]
            + [(r, "trained") for r in refs.extra_saes])
    evaluated, up_to_date = [], []
    for i, (r, source) in enumerate(saes):
        item = {"sae": r.path, "fingerprint": r.fingerprint, "source": source}
        (evaluated if any(_new_since(p, t0) for p in _per_sae_paths(out, i)) else up_to_date).append(item)
    new = []
    for ev in refs.evals.values():
        new += [x.path for x in ev.refs + [ev.results] if x is not None and _new_since(x.path, t0)]
    for item in evaluated:
        logger.info("reevaluate: evaluated %s (%s)", item["sae"], item["source"])
    for item in skipped:
        logger.warning("reevaluate: skipped %s: %s", item["sae"], item["reason"])
    logger.info("reevaluate: %d SAEs evaluated, %d already up to date", len(evaluated), len(up_to_date))
    return {"evaluated": evaluated, "up_to_date": up_to_date, "skipped": skipped, "new_artifacts": new,
            "results": refs.results.path, "report": str(out.report)}


def run_command(args: argparse.Namespace) -> int:
    """``saeflow run --flow reevaluate`` / ``python -m flows.reevaluate``."""
    out = reevaluate(args.config, args.artifacts, args.sae_folder, overrides(args) or None)
    for item in out["evaluated"]:
        print(f"evaluated: {item['sae']} ({item['source']})")
    for item in out["skipped"]:
        print(f"skipped: {item['sae']}: {item['reason']}")
    print(f"{len(out['evaluated'])} evaluated, {len(out['up_to_date'])} up to date\nreport: {out['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main_of("reevaluate", run_command, description=__doc__))
