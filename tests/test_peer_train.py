"""benchmarks/peer_train.py and benchmarks/_peers.py (issue #28): the stream the peers train on, the
CLI's validation, and (when the peer venvs exist) a toy training + conversion round trip per architecture."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import _peers, peer_train
from saeflow.saes import load_sae
from saeflow.store import ActivationStore, ShuffledLoader

D, BS, STEPS, SEED, BUFFER = 16, 32, 12, 3, 2


def _store(root: Path, n: int = 400, train_rows: int = 300) -> ActivationStore:
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(n, D)) * 2 + 1).astype(np.float32)
    store = ActivationStore.open_for_write(root, D, 64, "float32", {"hook": "blocks.2.hook_resid_post", "model": "toy"})
    for s in range(0, n, 50):
        e = min(n, s + 50)
        store.append(data[s:e], np.arange(s, e), np.arange(s, e) % 7, np.arange(s, e) // 10, contexts_done=e // 10)
    store.finish(train_rows=train_rows)
    return ActivationStore.open(root)


def test_export_stream_is_what_the_sae_lens_side_consumes(tmp_path):
    """Same ShuffledLoader (seed, batch size, buffer chunks, training rows), same batches in the same
    order (past one epoch: 12 x 32 rows > 300), each scaled as SAELens' ActivationScaler scales it."""
    from sae_lens.training.activation_scaler import ActivationScaler

    store = _store(tmp_path / "store")
    factor = store.normalization_factor()
    path = _peers.export_stream(store, BS, SEED, BUFFER, STEPS, factor, tmp_path / "stream.npy")
    got = np.load(path, mmap_mode="r")
    assert got.dtype == np.float32 and got.shape == (STEPS * BS, D)

    loader = ShuffledLoader(store, BS, SEED, BUFFER, 0, store.train_rows)  # as quality.train_sae_lens builds it
    scaler = ActivationScaler(scaling_factor=factor)
    it = iter(loader)
    for s in range(STEPS):
        np.testing.assert_array_equal(got[s * BS:(s + 1) * BS], scaler(next(it)).numpy())
    loader.close()
    # the normalisation is the pipeline's: mean norm of the exported rows ~ sqrt(d_in); raw rows / factor
    assert abs(np.linalg.norm(got, axis=1).mean() - np.sqrt(D)) < 0.1 * np.sqrt(D)
    train = store.read(0, store.train_rows)
    assert np.abs(train[None] - (got[:BS] / factor)[:, None]).max(-1).min(-1).max() < 1e-5  # training rows only
    # a different seed is a different stream
    other = _peers.export_stream(store, BS, SEED + 1, BUFFER, 1, factor, tmp_path / "other.npy")
    assert not np.array_equal(np.load(other), got[:BS])


def _args(tmp_path: Path, rows: int = STEPS * BS, dtype=np.float32, d: int = D, **over) -> list[str]:
    path = tmp_path / f"b-{rows}-{np.dtype(dtype).name}-{d}.npy"
    np.save(path, np.zeros((rows, d), dtype=dtype))
    base = {"--peer": "dictionary_learning", "--arch": "topk", "--batches": str(path), "--d-in": str(D),
            "--width": "64", "--k": "4", "--lr": "2e-3", "--batch-size": str(BS), "--steps": str(STEPS),
            "--out": str(tmp_path / "out")}
    base.update({k: v for k, v in over.items() if v is not None})
    out: list[str] = []
    for k, v in base.items():
        if v is not False:
            out += [k, v]
    return out


@pytest.mark.parametrize("over, message", [
    ({"--peer": "sparsify", "--arch": "batchtopk"}, "has no batchtopk trainer"),
    ({"--k": False}, "needs --k"),
    ({"--k": "65"}, "--k must be between 1 and --width"),
    ({"--steps": "0"}, "--steps must be >= 1"),
    ({"--lr": "0"}, "--lr must be > 0"),
    ({"--fold-factor": "-1"}, "--fold-factor must be > 0"),
    ({"--arch": "jumprelu", "--k": False}, "needs --target-l0"),
    ({"--l1-penalty": "0.1"}, "--l1-penalty is for --arch relu only"),
    ({"--arch": "matryoshka", "--matryoshka-widths": "16,8,64"}, "strictly increasing"),
    ({"--arch": "matryoshka", "--matryoshka-widths": "8,128"}, "strictly increasing"),
    ({"--arch": "topk", "--matryoshka-widths": "8,64"}, "for --arch matryoshka only"),
    ({"--d-in": "17"}, "float32 (rows, 17) expected"),
    ({"--steps": str(STEPS + 1)}, "needs 416"),
    ({"--batches": "/nonexistent/x.npy"}, "does not exist"),
])
def test_cli_rejects_bad_arguments(tmp_path, capsys, over, message):
    with pytest.raises(SystemExit) as exc:
        peer_train.parse_args(_args(tmp_path, **over))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_a_float64_stream(tmp_path, capsys):
    with pytest.raises(SystemExit):
        peer_train.parse_args(_args(tmp_path, dtype=np.float64))
    assert "float32 (rows, 16) expected" in capsys.readouterr().err


def test_cli_defaults(tmp_path):
    a = peer_train.parse_args(_args(tmp_path, **{"--arch": "jumprelu", "--k": "5"}))
    assert a.target_l0 == 5.0 and a.fold_factor == 1.0 and a.seed == 0
    a = peer_train.parse_args(_args(tmp_path, **{"--arch": "matryoshka"}))
    assert a.matryoshka_widths == [8, 16, 32, 64]
    assert peer_train.group_fractions([8, 16, 32, 64], 64) == [0.125, 0.125, 0.25, 0.5]
    assert peer_train.group_fractions([16, 32], 64) == [0.25, 0.25, 0.5]
    assert peer_train.scaled_steps(1000, 1000) == 100 and peer_train.scaled_steps(1000, 50_000) == 1000


def test_peer_train_imports_no_project_code():
    """It runs inside a peer venv: only the standard library, numpy, torch and the peer library."""
    tree = ast.parse(Path(peer_train.__file__).read_text())
    mods = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not mods & {"saeflow", "benchmarks", "tasks", "flows", "sae_lens"}, mods
    assert mods <= {"__future__", "argparse", "json", "sys", "time", "pathlib", "numpy", "torch", "importlib",
                    "dictionary_learning", "sparsify"}, mods


def test_missing_venv_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SAEFLOW_SPARSIFY_PYTHON", "/nonexistent/bin/python")
    with pytest.raises(_peers.PeerUnavailable, match="pip install torch==2.13.0 eai-sparsify"):
        _peers.peer_python("sparsify")
    assert _peers.parse_peers("saelens, dictionary_learning,sparsify") == ["saelens", "dictionary_learning", "sparsify"]
    with pytest.raises(ValueError, match="unknown"):
        _peers.parse_peers("saelens,openai")


def _round_trip(tmp_path: Path, peer: str, archs: tuple[str, ...]) -> None:
    store = _store(tmp_path / "store")
    factor = store.normalization_factor()
    stream = _peers.export_stream(store, BS, SEED, BUFFER, STEPS, factor, tmp_path / "stream.npy")
    probe = tmp_path / "probe.npy"
    np.save(probe, store.read(store.train_rows, store.n_rows))
    for arch in archs:
        res = _peers.train_peer(peer, arch, stream, D, 64, 4, 2e-3, BS, STEPS, SEED, factor, store.attrs["hook"],
                                tmp_path / f"{peer}-{arch}", model_name="toy", probe=probe)
        assert res.info["load_deviation"] < _peers.LOAD_CHECK_TOL, (arch, res.info)
        assert res.rows == STEPS * BS and res.seconds > 0
        sae = load_sae(res.sae_dir).eval()
        x = torch.from_numpy(np.load(probe))
        with torch.no_grad():
            l0 = float((sae.encode(x) != 0).float().sum(1).mean())
        assert 0 < l0 <= 64, (arch, l0)
        if arch == "topk":
            assert l0 == 4


@pytest.mark.skipif(not (Path(os.environ.get("SAEFLOW_DL_PYTHON", "/work/dlvenv/bin/python"))).is_file(),
                    reason="no dictionary_learning venv (/work/dlvenv; see benchmarks/_peers.PEER_INSTALL)")
def test_dictionary_learning_round_trip(tmp_path):
    _round_trip(tmp_path, "dictionary_learning", _peers.PEER_ARCHS["dictionary_learning"])


@pytest.mark.skipif(not (Path(os.environ.get("SAEFLOW_SPARSIFY_PYTHON", "/work/spvenv/bin/python"))).is_file(),
                    reason="no sparsify venv (/work/spvenv; see benchmarks/_peers.PEER_INSTALL)")
def test_sparsify_round_trip(tmp_path):
    _round_trip(tmp_path, "sparsify", _peers.PEER_ARCHS["sparsify"])


def test_quality_cli_peers_and_archs(monkeypatch, capsys):
    import sys

    from benchmarks import quality

    monkeypatch.setenv("SAEFLOW_SPARSIFY_PYTHON", sys.executable)
    a = quality.parse_args(["--peers", "saelens,sparsify", "--archs", "topk,relu", "jumprelu"])
    assert a.peers == ["saelens", "sparsify"] and a.architectures == ["topk", "relu", "jumprelu"]
    assert quality.parse_args([]).peers == ["saelens"] and quality.parse_args([]).architectures == ["topk", "batchtopk"]
    assert quality.parse_args(["--architectures", "topk", "batchtopk"]).architectures == ["topk", "batchtopk"]
    assert [quality.implements(p, "relu") for p in ("saelens", "dictionary_learning", "sparsify")] == [False, True, False]
    assert quality.implements("saelens", "jumprelu") and not quality.implements("sparsify", "batchtopk")
    monkeypatch.setenv("SAEFLOW_DL_PYTHON", "/nonexistent/python")
    with pytest.raises(SystemExit):
        quality.parse_args(["--peers", "dictionary_learning"])
    err = capsys.readouterr().err
    assert "SAEFLOW_DL_PYTHON=/nonexistent/python" in err and "dictionary-learning" in err
    with pytest.raises(SystemExit):
        quality.parse_args(["--archs", "topk,gated"])
    assert "unknown ['gated']" in capsys.readouterr().err


def test_acceptance_lines_match_l0_and_end_with_the_issue_line():
    from benchmarks import quality

    def run(arch, side, ev, dead, l0):
        return quality.Run(arch, side, Path("."), 1.0, 1, {"explained_variance": ev, "frac_dead": dead, "l0": l0})

    runs = [run("topk", "saeflow", 0.97, 0.01, 32.0), run("topk", "SAELens", 0.96, 0.02, 32.0),
            run("topk", "sparsify", 0.99, 0.00, 40.0),          # 25% off saeflow's L0: left out
            run("relu", "saeflow", 0.55, 0.30, 30.0), run("relu", "dictionary_learning", 0.60, 0.10, 31.0),
            run("jumprelu", "saeflow", 0.96, 0.04, 32.0)]       # no peer at all
    lines = quality.acceptance_lines(runs)
    assert lines[-1] == "worst dead fraction: 0.3000 (relu); min EV margin over best peer: -0.0500"
    topk = next(line for line in lines if line.startswith("topk:"))
    assert "best peer SAELens 0.9600" in topk and "+0.0100" in topk and "(<=)" in topk
    assert "left out: sparsify (L0 40.0)" in topk
    relu = next(line for line in lines if line.startswith("relu:"))
    assert "-0.0500" in relu and "(>)" in relu
    assert any(line.startswith("jumprelu:") and "no peer at matched L0" in line for line in lines)
    assert quality.summary_lines(runs)[-1] == lines[-1]
    only_ours = quality.acceptance_lines([run("topk", "saeflow", 0.97, 0.0, 32.0)])
    assert only_ours[-1] == "worst dead fraction: 0.0000 (topk); min EV margin over best peer: n/a"
