"""The shared helpers: one atomic write (saeflow.artifacts.write_atomic), one chunked max-cosine
(saeflow.cosine.max_cosine), one plot save (saeflow.plots.save_figure)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from saeflow.artifacts import (ArtifactRef, begin, mark_complete, remove_stale_temporaries, write_atomic,
                               write_json_atomic)
from saeflow.cosine import max_cosine
from saeflow.plots import plt, save_figure


def _brute(a: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    ua = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ub = ua if b is None else b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sims = ua @ ub.T
    if b is None:
        sims.fill_diagonal_(-float("inf"))
    return sims.max(dim=1)


@pytest.mark.parametrize("chunk", [None, 1, 7, 1000])
@pytest.mark.parametrize("cross", [False, True])
def test_max_cosine_matches_brute_force(chunk, cross):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(53, 12, generator=g)
    b = torch.randn(31, 12, generator=g) if cross else None
    v, i = max_cosine(a, b, chunk_rows=chunk)
    bv, bi = _brute(a, b)
    assert torch.allclose(v, bv, atol=1e-6)
    assert torch.equal(i, bi)
    if not cross:
        assert not torch.any(i == torch.arange(53))  # never the row itself


def test_max_cosine_edge_cases():
    v, i = max_cosine(torch.randn(1, 4))
    assert torch.isnan(v).all() and int(i[0]) == -1
    z = torch.zeros(3, 4)
    z[0, 0] = 1.0
    v, _ = max_cosine(z)
    assert float(v[0]) == 0.0  # zero rows have cosine 0 with everything
    unit = torch.nn.functional.normalize(torch.randn(9, 5), dim=1)
    assert torch.allclose(max_cosine(unit, normalize=False)[0], max_cosine(unit)[0], atol=1e-6)


def test_write_atomic_text_bytes_and_writer(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    write_atomic(p, "hello")
    assert p.read_text() == "hello"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
    write_atomic(p, b"bytes")
    assert p.read_bytes() == b"bytes"
    write_atomic(p, lambda tmp: tmp.write_text("via writer"))
    assert p.read_text() == "via writer"
    assert [f.name for f in p.parent.iterdir()] == ["a.txt"]  # no temporaries left


def test_write_atomic_failure_keeps_the_old_file(tmp_path):
    p = tmp_path / "keep.json"
    write_json_atomic(p, {"a": 1})

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(p, broken)
    assert p.read_text() == '{\n  "a": 1\n}'
    assert [f.name for f in tmp_path.iterdir()] == ["keep.json"]


def test_a_killed_writers_temporary_file_is_removed_when_its_folder_is_built_again(tmp_path):
    folder = tmp_path / "train" / "abc"
    # a real process killed inside write_atomic (its writer never returns)
    code = ("import time, sys; from saeflow.artifacts import write_atomic; "
            "write_atomic(sys.argv[1], lambda tmp: (tmp.write_text('half'), print('writing', flush=True), time.sleep(60)))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder / "sub" / "weights.bin")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (dead,) = (folder / "sub").glob(".weights.bin.*.tmp")
    # a live writer's temporary file (this process) and files that only look alike stay
    host = dead.name.split(".")[3].split("-")[0]  # .weights.bin.w<host>-<pid>.<random>.tmp
    live = folder / f".other.json.{host}-{os.getpid()}.abc123.tmp"
    live.write_text("in progress")
    look_alike = [folder / ".notes.tmp", folder / "data.tmp"]
    for f in look_alike:
        f.write_text("x")
    ref = ArtifactRef(stage="train", fingerprint="abc", path=str(folder))
    begin(ref, {"a": 1})
    assert not dead.exists() and live.exists() and all(f.exists() for f in look_alike)
    assert remove_stale_temporaries(folder) == []
    live.unlink()
    # the same cleanup runs when the folder is marked complete
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder / "x.json")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(folder.glob(".x.json.*.tmp"))) == 1
    mark_complete(ref)
    assert not list(folder.glob(".x.json.*.tmp"))


def test_save_figure_writes_a_png_and_closes(tmp_path):
    fig, ax = plt.subplots()
    ax.plot(np.arange(3))
    out = save_figure(fig, tmp_path / "plots" / "f.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
