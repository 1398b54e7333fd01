"""Deployable flow ``saeflow-profile``: the full pipeline of a profile YAML on the profile's task
runner. The ``pipeline-<profile>`` deployments in prefect.yaml run it; ``saeflow run`` too.
"""

from __future__ import annotations

from tasks import common  # noqa: F401  (sets Prefect's offline settings before prefect loads)
from prefect import flow

from flows.pipeline import run_pipeline
from flows.runner import load_profile


@flow(name="saeflow-profile", log_prints=True)
def run_profile(profile: str = "configs/quick.yaml", artifacts: str | None = None, overrides: dict | None = None) -> dict:
    """Every stage of a profile: model, vocab, corpus, activations, the SAE family, metrics, the
    enabled evaluations, results tables and the report.

    Args:
        profile: profile YAML, relative to the repository (the deployment's working directory).
        artifacts: artifacts root (default ``$SAEFLOW_ARTIFACTS`` or ``artifacts/``).
        overrides: sections merged over the profile, e.g. ``{"runner": {"kind": "dask", "n_workers": 4}}``.

    Returns which stages were cached, the stage timings and where the results and report are.
    """
    config = load_profile(profile, overrides)
    out = run_pipeline(config, artifacts)
    return {"profile": config.name, **out.model_dump(mode="json", include={"cached", "timings", "members", "report"}),
            "results": out.refs.results.path}
