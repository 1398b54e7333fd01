"""The evaluation contract: a subflow ``flow(ctx) -> EvalOutput`` plugs into the flow, its per-SAE
``summary.json`` columns join the core results table and its tables/plots are copied to
``results/<profile>/<eval>/``; a re-run is cached, a changed evaluation output refreshes the table."""

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

import flows.pipeline as fp
from saeflow.artifacts import artifact_ref, begin, fingerprint, mark_complete, require_complete
from saeflow.tables import write_table
from tasks.common import EvalOutput, stage_task
from tests.helpers import tiny_config

CALLS: list[str] = []


def _ref(sae, offset: float, root: str, **_):
    return artifact_ref(root, "fake-eval", fingerprint("fake-eval", {"offset": offset}, sae))


@stage_task(_ref, name="fake-eval")
def _fake_task(out, sae, offset: float, root: str):
    CALLS.append(sae.fingerprint)
    cfg = json.loads((require_complete(sae) / "cfg.json").read_text())
    begin(out, {"offset": offset}, [sae])
    (out.dir / "summary.json").write_text(json.dumps({"fake_width_plus": cfg["d_sae"] + offset}))
    mark_complete(out)


def _results_ref(per_sae, root: str, **_):
    return artifact_ref(root, "fake-eval-results", fingerprint("fake-eval-results", None, *per_sae))


@stage_task(_results_ref, name="fake-eval-results")
def _fake_results(out, per_sae, root: str):
    begin(out, None, per_sae)
    write_table(pd.DataFrame({"sae": [r.fingerprint for r in per_sae]}), out.dir, "fake_table")
    mark_complete(out)


def _module(offset: float):
    def flow(ctx):
        per_sae = [ctx.stage(f"fake-{i}", _ref, _fake_task, sae=s, offset=offset) for i, s in enumerate(ctx.saes)]
        res = ctx.stage("fake-results", _results_ref, _fake_results, per_sae=per_sae)
        return EvalOutput(per_sae=per_sae, results=res)

    return SimpleNamespace(flow=flow)


@pytest.fixture
def fake_eval(monkeypatch):
    def install(offset: float):
        monkeypatch.setattr(fp, "EVALUATIONS", (("absorption", _module(offset)),))

    return install


def test_evaluation_columns_and_tables_reach_the_results(tmp_path, fake_eval):
    from saeflow.evals.absorption.config import AbsorptionConfig

    cfg = tiny_config(family={"architectures": ["topk"], "widths": [64, 128], "ks": [8]})
    cfg = cfg.model_copy(update={"absorption": AbsorptionConfig()})
    CALLS.clear()
    fake_eval(0.5)
    out = fp.pipeline(cfg, str(tmp_path))
    results = Path(out.refs.results.path)
    table = pd.read_parquet(results / "core_metrics.parquet")
    assert sorted(table["fake_width_plus"]) == [64.5, 128.5]
    assert (results / "absorption" / "fake_table.parquet").is_file()
    assert not (results / "absorption" / "config.json").exists()
    assert out.cached["absorption"] is False and len(CALLS) == 2
    assert len(out.refs.evals["absorption"].per_sae) == 2

    again = fp.pipeline(cfg, str(tmp_path))
    assert again.cached["absorption"] is True and again.cached["results"] is True and len(CALLS) == 2

    fake_eval(1.5)  # the evaluation's output changes: its stages and the results table are redone
    third = fp.pipeline(cfg, str(tmp_path))
    assert third.cached["absorption"] is False and third.cached["results"] is False
    table = pd.read_parquet(Path(third.refs.results.path) / "core_metrics.parquet")
    assert sorted(table["fake_width_plus"]) == [65.5, 129.5]


def test_disabled_evaluation_is_not_run(tmp_path, fake_eval):
    CALLS.clear()
    fake_eval(0.0)
    out = fp.pipeline(tiny_config(), str(tmp_path))
    assert "absorption" not in out.cached and CALLS == []
