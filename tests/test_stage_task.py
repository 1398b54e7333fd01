"""tasks.common.stage_task: the one way a stage task skips a complete artifact folder."""

from __future__ import annotations

import inspect

import pytest

from saeflow.artifacts import ArtifactRef, artifact_ref, begin, fingerprint, mark_complete
from tasks.common import stage_task

RUNS: list[int] = []


def _ref(value: int, root: str, **_) -> ArtifactRef:
    return artifact_ref(root, "toy", fingerprint("toy", {"value": value}))


@stage_task(_ref, name="toy", task_run_name="toy-{value}")
def toy_task(out: ArtifactRef, value: int, root: str, device: str = "auto") -> None:
    """Writes ``value`` into its folder."""
    RUNS.append(value)
    begin(out, {"value": value}, [])
    (out.dir / "value.txt").write_text(str(value))
    mark_complete(out)


@stage_task(_ref, name="toy-other")
def other_task(out: ArtifactRef, value: int, root: str) -> None:
    RUNS.append(-value)


def test_signature_is_the_body_without_out():
    sig = inspect.signature(toy_task.fn)
    assert list(sig.parameters) == ["value", "root", "device"]
    assert sig.parameters["device"].default == "auto"
    assert toy_task.name == "toy"
    assert toy_task.fn.__doc__ == "Writes ``value`` into its folder."


def test_body_runs_once_then_the_complete_folder_is_returned(tmp_path):
    RUNS.clear()
    first = toy_task.fn(3, str(tmp_path))
    assert RUNS == [3] and (first.dir / "value.txt").read_text() == "3"
    again = toy_task.fn(value=3, root=str(tmp_path), device="cpu")  # keywords, another device: same folder
    assert again == first and RUNS == [3]
    other = toy_task.fn(4, str(tmp_path))
    assert other.fingerprint != first.fingerprint and RUNS == [3, 4]


def test_partial_folder_is_rerun(tmp_path):
    RUNS.clear()
    out = _ref(5, str(tmp_path))
    begin(out, {"value": 5}, [])  # started, never marked complete (a killed run)
    toy_task.fn(5, str(tmp_path))
    assert RUNS == [5] and out.is_complete()


def test_runs_as_a_prefect_task(tmp_path):
    RUNS.clear()
    from prefect import flow

    @flow
    def f(root: str):
        return toy_task(7, root), toy_task(7, root)

    a, b = f(str(tmp_path))
    assert a == b and a.is_complete() and RUNS == [7]


def test_cache_source_is_each_body():
    assert "RUNS.append(value)" in inspect.getsource(toy_task.fn)
    assert "RUNS.append(-value)" in inspect.getsource(other_task.fn)


def test_body_must_take_out_first():
    with pytest.raises(TypeError, match="`out` first"):
        @stage_task(_ref, name="bad")
        def bad(value: int, root: str) -> None:
            pass


def test_stage_runner_reports_reused_artifacts_as_cached(tmp_path):
    """A stage whose artifact is complete computes nothing and says so, even when Prefect's own cache
    key no longer matches (here: its cache records deleted, as after an edit of the task's source)."""
    import shutil

    from prefect import flow

    from flows.runner import StageRunner
    from tests.helpers import tiny_config

    RUNS.clear()
    cfg = tiny_config()

    @flow
    def f(root: str) -> bool:
        stage = StageRunner(root, cfg)
        stage("toy", _ref, toy_task, value=9)
        return stage.cached("toy")

    assert f(str(tmp_path)) is False and RUNS == [9]
    shutil.rmtree(tmp_path / ".prefect" / "cache")
    assert f(str(tmp_path)) is True and RUNS == [9]
    (_ref(9, str(tmp_path)).dir / "_COMPLETE.json").unlink()  # partial again: it runs, not cached
    assert f(str(tmp_path)) is False and RUNS == [9, 9]
