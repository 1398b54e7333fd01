"""The ``saeflow`` command line: help texts, list-artifacts, report, and a ``clean`` that never
deletes other stages, asks (or needs --yes) and refuses paths outside the artifacts root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import CleanRefused, build_parser, clean_targets, main
from saeflow.artifacts import COMPLETE_MARKER

REPO = Path(__file__).resolve().parent.parent


def _artifact(root: Path, stage: str, fp: str, complete: bool = True, size: int = 10) -> Path:
    d = root / stage / fp
    d.mkdir(parents=True)
    (d / "data.bin").write_bytes(b"x" * size)
    if complete:
        (d / COMPLETE_MARKER).write_text(json.dumps({"fingerprint": fp}))
    return d


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "artifacts"
    _artifact(r, "activations", "aaaa1111")
    _artifact(r, "activations", "bbbb2222", complete=False)
    _artifact(r, "train", "cccc3333")
    _artifact(r, "metrics", "dddd4444")
    (r / ".prefect" / "cache").mkdir(parents=True)
    return r


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_every_command_and_option_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"run", "report", "list-artifacts", "clean", "browse"}
    for name, p in sub.choices.items():
        assert p.description, name
        for action in p._actions:
            if action.dest != "help":
                assert action.help and len(action.help) > 15, (name, action.dest)
    out = subprocess.run([Path(sys.executable).parent / "saeflow", "clean", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--partial-only" in out.stdout and "--yes" in out.stdout  # the console script


def test_list_artifacts(root, capsys):
    assert main(["list-artifacts", "--artifacts", str(root), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(r["stage"], r["fingerprint"], r["status"]) for r in rows} == {
        ("activations", "aaaa1111", "complete"), ("activations", "bbbb2222", "partial"),
        ("train", "cccc3333", "complete"), ("metrics", "dddd4444", "complete")}
    assert main(["list-artifacts", "--artifacts", str(root), "--stage", "train"]) == 0
    out = capsys.readouterr().out
    assert "cccc3333" in out and "aaaa1111" not in out


def test_clean_deletes_only_the_named_stage_and_needs_yes(root, monkeypatch, capsys):
    before = _tree(root)
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # no terminal: must refuse without --yes
    assert main(["clean", "--stage", "activations", "--artifacts", str(root)]) == 2
    assert "--yes" in capsys.readouterr().err and _tree(root) == before
    assert main(["clean", "--stage", "activations", "--artifacts", str(root), "--dry-run"]) == 0
    assert _tree(root) == before
    # --partial-only keeps complete artifacts
    assert main(["clean", "--stage", "activations", "--partial-only", "--yes", "--artifacts", str(root)]) == 0
    assert not (root / "activations" / "bbbb2222").exists() and (root / "activations" / "aaaa1111" / COMPLETE_MARKER).is_file()
    assert main(["clean", "--stage", "activations", "--yes", "--artifacts", str(root)]) == 0
    assert not any((root / "activations").iterdir())
    # other stages untouched
    for stage, fp in (("train", "cccc3333"), ("metrics", "dddd4444")):
        assert (root / stage / fp / COMPLETE_MARKER).is_file()
    assert (root / ".prefect" / "cache").is_dir()


def test_clean_asks_on_a_terminal(root, monkeypatch):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["clean", "--stage", "train", "--artifacts", str(root)]) == 1
    assert (root / "train" / "cccc3333").is_dir()
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert main(["clean", "--stage", "train", "--artifacts", str(root)]) == 0
    assert not (root / "train" / "cccc3333").exists() and (root / "metrics" / "dddd4444").is_dir()


def test_clean_refuses_paths_outside_the_root(root, tmp_path):
    outside = tmp_path / "precious"
    _artifact(outside, "x", "keep")
    for bad in ("../precious", "/etc", "..", ".prefect", "train/../metrics"):
        with pytest.raises(CleanRefused):
            clean_targets(root, bad)
    with pytest.raises(CleanRefused):
        clean_targets(root, "train", ["../../precious/x/keep"])
    with pytest.raises(CleanRefused, match="no stage"):
        clean_targets(root, "nosuchstage")
    (root / "train" / "evil").symlink_to(outside / "x" / "keep")  # a symlinked artifact pointing out
    with pytest.raises(CleanRefused, match="outside"):
        clean_targets(root, "train")
    (root / "linked").symlink_to(outside)  # a symlinked stage folder pointing out
    assert main(["clean", "--stage", "linked", "--yes", "--artifacts", str(root)]) == 2
    assert (outside / "x" / "keep" / COMPLETE_MARKER).is_file() and (root / "train" / "cccc3333").is_dir()



def test_list_and_clean_on_a_url_root_act_on_this_machines_mirror(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAEFLOW_MIRROR", str(tmp_path / "mirror"))
    mirror = tmp_path / "mirror" / "s3" / "bucket" / "x"
    _artifact(mirror, "train", "eeee5555", complete=False)
    keep = _artifact(mirror, "train", "ffff6666")
    assert main(["list-artifacts", "--artifacts", "s3://bucket/x"]) == 0
    assert "eeee5555" in capsys.readouterr().out
    assert main(["clean", "--stage", "train", "--partial-only", "--yes", "--artifacts", "s3://bucket/x"]) == 0
    assert not (mirror / "train" / "eeee5555").exists() and (keep / COMPLETE_MARKER).is_file()


def test_report_command_rebuilds_from_the_results_folder(tmp_path, capsys):
    from tests.test_report import _results_folder

    d = _results_folder(tmp_path)
    assert main(["report", "--profile", "demo", "--artifacts", str(tmp_path)]) == 0
    assert (d / "report.html").is_file() and "report:" in capsys.readouterr().out
    assert main(["report", "--profile", "../etc", "--artifacts", str(tmp_path)]) == 2


def test_run_rejects_a_bad_profile(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sae: {width: -3}\n")
    assert main(["run", "--config", str(bad), "--artifacts", str(tmp_path / "a")]) == 2
    assert "width" in capsys.readouterr().err
