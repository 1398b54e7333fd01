"""End-to-end: the CI smoke profile on a real packaged model (SmolLM2-135M-Instruct)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.pipeline import pipeline
from saeflow.config import load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_smoke_profile_end_to_end_then_fully_cached(tmp_path):
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    out = pipeline(cfg, str(tmp_path))
    table = pd.read_parquet(Path(out["refs"]["results"]["path"]) / "core_metrics.parquet")
    row = table.iloc[0]
    assert row["model"] == "smollm2-135m-instruct" and row["hook"] == "blocks.3.hook_resid_post"
    assert row["width"] == 1152 and 0 < row["l0"] <= 16
    # a trained SAE on real activations: better than nothing, worse than perfect
    assert 0.0 < row["explained_variance"] < 1.0
    assert 0.0 < row["cossim"] <= 1.0
    assert row["ce_clean"] < row["ce_with_ablation"]
    assert np.isfinite(row["ce_loss_score"]) and np.isfinite(row["kl_with_sae"])
    again = pipeline(cfg, str(tmp_path))
    assert all(again["cached"].values()), again["cached"]
