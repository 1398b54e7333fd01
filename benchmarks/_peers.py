"""Peer trainers for ``benchmarks/quality.py``: dictionary_learning and EleutherAI sparsify (issue #28).

Each peer library pins packages that clash with ours, so it runs in its own virtual environment
(:data:`PEER_VENVS`) through ``benchmarks/peer_train.py`` (standalone: torch, numpy and the peer
only). This module, on our side:

1. exports the batch stream the SAELens side consumes (:func:`export_stream`): the same
   ``ShuffledLoader`` (store, batch size, seed, buffer chunks, training rows), its first
   ``steps`` batches, each multiplied by the pipeline's normalisation factor exactly as SAELens'
   ``ActivationScaler`` does (``batch * factor``, float32), into a float32 ``.npy`` of
   ``steps * batch_size`` rows (10.5 GB at the quick profile's 1000 x 4096 x 640; written once per
   run and shared by every peer and architecture);
2. runs ``peer_train.py`` with the peer venv's python and ``--fold-factor factor``: the peer
   trains on the normalised rows, then folds the factor into its biases / thresholds (its own
   ``scale_biases`` for dictionary_learning, as its ``trainSAE(normalize_activations=True)`` does;
   ``b_dec`` and the encoder bias for sparsify), so its saved SAE reads raw activations, as the
   SAELens SAE does after ``fit()`` and saeflow's after training;
3. converts the native checkpoint with :func:`saeflow.saes.foreign.convert` into a SAELens-layout
   folder that :func:`saeflow.saes.load_sae` reads; ``quality.py`` evaluates it with the same code
   as every other side, on raw activations.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saeflow.extract import hook_layer
from saeflow.saes import load_sae
from saeflow.saes.foreign import convert
from saeflow.store import ActivationStore, ShuffledLoader

PEER_TRAIN = Path(__file__).resolve().with_name("peer_train.py")
#: ``--peers`` name -> Run.side label.
SIDE_NAMES = {"saelens": "SAELens", "dictionary_learning": "dictionary_learning", "sparsify": "sparsify"}
#: Architectures each peer trains (``peer_train.py``); SAELens' are in ``quality.py``.
PEER_ARCHS: dict[str, tuple[str, ...]] = {
    "dictionary_learning": ("topk", "batchtopk", "matryoshka", "relu", "jumprelu"),
    "sparsify": ("topk",),
}
PEER_VENVS = {"dictionary_learning": Path("/work/dlvenv"), "sparsify": Path("/work/spvenv")}
#: Max |saeflow's reading - the peer's own forward| / mean ||x|| tolerated for a converted checkpoint.
LOAD_CHECK_TOL = 1e-4
#: Environment variables that override a peer's python (e.g. a venv elsewhere).
PEER_PYTHON_ENV = {"dictionary_learning": "SAEFLOW_DL_PYTHON", "sparsify": "SAEFLOW_SPARSIFY_PYTHON"}
PEER_INSTALL = {
    "dictionary_learning": "python3 -m venv /work/dlvenv && /work/dlvenv/bin/pip install torch==2.13.0 "
                           "dictionary-learning && /work/dlvenv/bin/pip uninstall -y torchvision  (torch pinned in the "
                           "same command, else the newest torchvision pulls a CUDA torch; the torchvision that nnsight "
                           "pulls breaks `import transformers` beside a CPU torch and nothing here needs it)",
    "sparsify": "python3 -m venv /work/spvenv && /work/spvenv/bin/pip install torch==2.13.0 eai-sparsify",
}


class PeerUnavailable(RuntimeError):
    """A peer's virtual environment is missing."""


def peer_python(peer: str) -> Path:
    """The python of ``peer``'s venv (``$SAEFLOW_DL_PYTHON`` / ``$SAEFLOW_SPARSIFY_PYTHON`` override);
    :class:`PeerUnavailable` names the venv and the install command when it is missing."""
    override = os.environ.get(PEER_PYTHON_ENV[peer])
    python = Path(override) if override else PEER_VENVS[peer] / "bin" / "python"
    if not python.is_file():
        where = f"${PEER_PYTHON_ENV[peer]}={override}" if override else f"the venv {PEER_VENVS[peer]}"
        raise PeerUnavailable(f"--peers {peer} needs {where} (no {python}); create it with: {PEER_INSTALL[peer]}")
    return python


def parse_peers(text: str) -> list[str]:
    peers = [p.strip().lower() for p in text.split(",") if p.strip()]
    unknown = [p for p in peers if p not in SIDE_NAMES]
    if unknown or not peers:
        raise ValueError(f"--peers {text!r}: unknown {unknown}; known: {', '.join(SIDE_NAMES)}")
    return list(dict.fromkeys(peers))


def export_stream(store: ActivationStore, batch_size: int, seed: int, buffer_chunks: int, steps: int, factor: float,
                  path: Path) -> Path:
    """The first ``steps`` batches of the SAELens side's stream, normalised as SAELens scales them,
    into a float32 ``.npy`` at ``path`` (memory-mapped while written)."""
    loader = ShuffledLoader(store, batch_size, seed, buffer_chunks, 0, store.train_rows)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(steps * batch_size, store.d_model))
    try:
        it = iter(loader)
        for s in range(steps):
            batch = next(it)
            out[s * batch_size:(s + 1) * batch_size] = (batch * factor).to(torch.float32).numpy()
        out.flush()
    finally:
        loader.close()
        del out
    return path


@dataclass
class PeerResult:
    sae_dir: Path  # the converted SAELens-layout folder
    seconds: float  # peer_train.py's train_seconds (its training loop)
    rows: int
    info: dict[str, Any]  # peer_train.py's JSON line


def train_peer(peer: str, arch: str, stream: Path, d_in: int, width: int, k: int, lr: float, batch_size: int,
               steps: int, seed: int, factor: float, hook: str, out_dir: Path, model_name: str | None = None,
               l1_penalty: float | None = None, matryoshka_widths: tuple[int, ...] | None = None,
               probe: Path | None = None, device: str = "cpu") -> PeerResult:
    """``peer_train.py`` in the peer's venv on ``stream``, then its checkpoint converted into
    ``out_dir / "saelens"`` (hook ``hook``); with ``probe`` (a .npy of raw rows) the conversion is
    checked against the peer's own forward (:func:`check_load`)."""
    python = peer_python(peer)
    cmd = [str(python), str(PEER_TRAIN), "--peer", peer, "--arch", arch, "--batches", str(stream), "--d-in", str(d_in),
           "--width", str(width), "--lr", repr(lr), "--batch-size", str(batch_size), "--steps", str(steps),
           "--seed", str(seed), "--fold-factor", repr(float(factor)), "--layer", str(hook_layer(hook or "") or 0),
           "--lm-name", model_name or "unknown", "--device", device, "--out", str(out_dir / "native")]
    if arch in ("topk", "batchtopk", "matryoshka"):
        cmd += ["--k", str(k)]
    if arch == "jumprelu":
        cmd += ["--target-l0", str(k)]
    if arch == "relu" and l1_penalty is not None:
        cmd += ["--l1-penalty", repr(l1_penalty)]
    if arch == "matryoshka" and matryoshka_widths:
        cmd += ["--matryoshka-widths", ",".join(map(str, matryoshka_widths))]
    if probe is not None:
        cmd += ["--probe", str(probe)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{peer} {arch}: {' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"{peer} {arch}: peer_train.py printed no result line:\n{proc.stdout[-2000:]}")
    info = json.loads(lines[-1])
    info["process_seconds"] = time.perf_counter() - t0
    convert(peer, info["sae_dir"], out_dir / "saelens", hook=hook)
    if probe is not None:
        info["load_deviation"] = check_load(out_dir / "saelens", out_dir / "native", np.load(probe))
    return PeerResult(out_dir / "saelens", float(info["train_seconds"]), int(info["rows"]), info)


@torch.no_grad()
def check_load(saelens_dir: Path, native_dir: Path, rows: np.ndarray) -> float:
    """Deviation (of the mean row norm) between saeflow's reading of the converted SAE and the peer's
    own encode / decode of its checkpoint on ``rows`` (``peer_train.py --probe``): the largest over the
    rows but the worst 1%, whose latents may flip where a pre-activation ties the threshold / the k-th
    largest within float rounding of two matmul kernels. Raises above :data:`LOAD_CHECK_TOL` (a wrong
    conversion shows on every row)."""
    sae = load_sae(saelens_dir).eval()
    x = torch.from_numpy(np.asarray(rows, dtype=np.float32))
    f = sae.encode(x)
    x_hat = sae.decode(f)
    norm = float(x.norm(dim=1).mean())
    per_row = torch.maximum((f - torch.from_numpy(np.load(native_dir / "probe_latents.npy"))).abs().amax(dim=1),
                            (x_hat - torch.from_numpy(np.load(native_dir / "probe_recon.npy"))).abs().amax(dim=1)) / norm
    dev = float(torch.quantile(per_row.double(), 0.99, interpolation="lower")) if len(per_row) > 1 else float(per_row.max())
    if dev > LOAD_CHECK_TOL:
        raise RuntimeError(f"saeflow reads the converted checkpoint {saelens_dir} differently from the peer's own forward "
                           f"on {native_dir} (deviation {dev:.2e} of the mean norm on 1% of the rows or more): the "
                           "comparison would be meaningless")
    return dev


def describe(peer: str, infos: list[dict[str, Any]]) -> str:
    """Human-readable settings of a peer side (for docs/benchmarks.md)."""
    if not infos:
        return ""
    version = infos[0].get("version")
    trainers = ", ".join(f"{i['arch']}: `{i['trainer']}` (overrides {i.get('overrides')})" for i in infos)
    common = ("the package's defaults except width, k / target L0, lr, batch size, steps, seed; warm-up / threshold-"
              "start step counts capped at steps // 10 (benchmarks/peer_train.py docstring)")
    archs = {i["arch"] for i in infos}
    notes = {"dictionary_learning": [(archs & {"relu"}, "relu has no L0 target (its l1_penalty; L0 not matched)"),
                                     (archs & {"jumprelu"}, "jumprelu: `target_l0` = k")],
             "sparsify": [(True, "Adam at the matched lr (not its default signum), its linear warm-up + decay "
                                 "schedule, auxk_alpha 0 (its default)")]}[peer]
    extra = "".join(f"; {text}" for cond, text in notes if cond)
    return (f"{peer} {version} (own venv, via benchmarks/peer_train.py), {trainers}; {common}{extra}; "
            "trained on the SAELens side's normalised stream (exported to .npy), the factor folded into the saved "
            "SAE, converted with `saeflow.saes.foreign.convert`, wall time = its training loop only")
