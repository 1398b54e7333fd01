"""Meta-SAE agreement: saeflow's decoder variance explained vs SAEBench's ``meta_structure`` eval.

Both sides get the SAME matrix: the unit-normalised decoder rows of one SAE of the quick family
(``artifacts/train/<fp>/``, default: the widest member with the smallest k), saved to a ``.npy``.
SAEBench 0.6.0 runs in its own venv (``/work/sbvenv``) in a subprocess: seed 42
(``random.seed`` + ``torch.manual_seed``, as its ``main``), then its own
``_train_meta_structure_on_decoder`` and ``_decoder_variance_metrics`` with
``MetaStructureEvalConfig()`` defaults (width 0.25 x n, k 4, 1500 steps, batch 1024 drawn with
replacement, Adam 5e-4 constant, eval batches of 4096, bf16 autocast ON by default; ``--no-autocast``
adds a float32 run). Ours runs here: :func:`saeflow.evals.meta_sae.train_meta_sae` with the default
:class:`~saeflow.evals.meta_sae.MetaSAEConfig` (the same settings, float32) and
:func:`saeflow.evals.meta_sae.decoder_variance_explained`. Goal: |FVE difference| <= 0.02.

Prints both FVEs, MSEs, train times, the difference, and ``ratio: <ours / SAEBench FVE>`` last;
writes the ``meta_sae_agreement`` section of docs/benchmarks.md.

Run: ``.venv/bin/python -m benchmarks.meta_sae_agreement [--sae <train fp>] [--seeds 42 43] [--no-autocast]``;
``--control N D`` only trains ours on a random Gaussian ``N x D`` decoder (the no-structure baseline).

``--end-to-end`` (issue #25): no shared matrix; each side starts from the SAE folder and the profile.
SAEBench loads the SAE itself (``sae_lens.SAE.load_from_disk``) and runs its ``meta_structure``
``run_eval`` on the SAE object (``load_and_format_sae``: a custom SAE is used as loaded, its decoder rows
only checked for unit norm, not folded; seeded as its ``main``; it saves the decoder it trained on);
saeflow runs its ``meta_sae`` stage body (:func:`tasks.meta_sae.meta_train_task`) with the profile's
``meta_sae:`` config into a temporary artifacts root. Prints both FVEs, the decoders' row norms and
max |difference|, and ``e2e |FVE difference|: ...`` last; writes the ``meta_sae_e2e`` section.
Run: ``.venv/bin/python -m benchmarks.meta_sae_agreement --end-to-end [--sae 99f898965cec8dda]
[--config configs/quick-evals.yaml] [--artifacts /work/main/artifacts]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import machine, write_section  # noqa: E402
from saeflow.artifacts import default_root  # noqa: E402
from saeflow.evals.meta_sae import MetaSAEConfig, decoder_variance_explained, train_meta_sae, unit_rows  # noqa: E402
from saeflow.saes import describe_sae, load_sae  # noqa: E402

SBVENV_PYTHON = "/work/sbvenv/bin/python"

SAEBENCH_SCRIPT = r"""
import json, math, random, sys, time
import numpy as np, torch
from sae_bench.evals.meta_structure.eval_config import MetaStructureEvalConfig
from sae_bench.evals.meta_structure import main as ms
path, seed, autocast = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
random.seed(seed); torch.manual_seed(seed)
config = MetaStructureEvalConfig(random_seed=seed, autocast=autocast)
decoder = torch.from_numpy(np.load(path)).to(torch.float32).contiguous()
width = max(math.ceil(decoder.shape[0] * config.width_ratio), config.k)
t0 = time.time()
meta, train_time = ms._train_meta_structure_on_decoder(decoder=decoder, meta_width=width, config=config, device="cpu")
fve, mse = ms._decoder_variance_metrics(meta_structure=meta, decoder=decoder, eval_batch_size=config.eval_batch_size)
import sae_bench
print("RESULT " + json.dumps({"fve": fve, "mse": mse, "train_time_s": train_time, "width": width,
      "sae_bench": getattr(sae_bench, "__version__", "?"), "config": {k: getattr(config, k) for k in
      ("width_ratio", "k", "train_steps", "train_batch_size", "learning_rate", "eval_batch_size", "autocast", "dtype")}}))
"""


SAEBENCH_E2E_SCRIPT = r"""
import glob, json, sys, time
import numpy as np, torch
from sae_lens import SAE
from sae_bench.evals.meta_structure.eval_config import MetaStructureEvalConfig
from sae_bench.evals.meta_structure import main as ms
folder, seed, autocast, out = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
sae = SAE.load_from_disk(folder, device="cpu")
used = {}
real = ms._train_meta_structure_on_decoder
def spy(decoder, **kw):  # record the decoder run_eval_single_sae hands its trainer
    used["decoder"] = decoder.detach().float().cpu().numpy()
    return real(decoder=decoder, **kw)
ms._train_meta_structure_on_decoder = spy
ms._set_random_seed(seed)
config = MetaStructureEvalConfig(random_seed=seed, autocast=autocast)
t0 = time.time()
ms.run_eval(config=config, selected_saes=[("saeflow", sae)], device="cpu", output_path=out, force_rerun=True)
np.save(out + "/decoder_used.npy", used["decoder"])
res = json.load(open(glob.glob(out + "/*_eval_results.json")[0]))
m = res["eval_result_metrics"]["meta_structure"]
print("RESULT " + json.dumps({"fve": m["decoder_fraction_variance_explained"], "mse": m["final_reconstruction_mse"],
      "train_time_s": m["train_time_seconds"], "wall_s": time.time() - t0, "sae_class": type(sae).__name__}))
"""


def _sb_result(proc: subprocess.CompletedProcess) -> dict:
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"SAEBench run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def pick_sae(root: Path, fp: str | None) -> Path:
    if fp:
        return root / "train" / fp
    best = None
    for d in sorted((root / "train").iterdir()):
        cfg = d / "cfg.json"
        if not (d / "_COMPLETE.json").is_file() or not cfg.is_file():
            continue
        raw = json.loads(cfg.read_text())
        key = (raw["d_sae"], -raw.get("saeflow", {}).get("sae_config", {}).get("k", 0))
        if best is None or key > best[0]:
            best = (key, d)
    if best is None:
        raise SystemExit(f"no trained SAE under {root / 'train'}: run `python -m flows.pipeline --config configs/quick.yaml` first")
    return best[1]


def run_saebench(npy: Path, seed: int, autocast: bool) -> dict:
    proc = subprocess.run([SBVENV_PYTHON, "-c", SAEBENCH_SCRIPT, str(npy), str(seed), "1" if autocast else "0"],
                          capture_output=True, text=True)
    return _sb_result(proc)


def run_ours(decoder: np.ndarray, seed: int) -> dict:
    cfg = MetaSAEConfig(seed=seed, checkpoint_every=10**9, log_every=10**9)
    with tempfile.TemporaryDirectory(prefix="bench-meta-") as tmp:
        t0 = time.perf_counter()
        meta, summary = train_meta_sae(torch.from_numpy(decoder), cfg, Path(tmp) / "meta", "cpu")
        train_time = time.perf_counter() - t0
        ev = decoder_variance_explained(meta, torch.from_numpy(decoder), cfg.eval_batch_size)
    return {"fve": ev["fve"], "mse": ev["mse"], "train_time_s": train_time, "width": meta.d_sae}


def _norms(m: np.ndarray) -> str:
    n = np.linalg.norm(m.astype(np.float64), axis=1)
    return f"[{n.min():.7f}, {n.max():.7f}]"


def end_to_end(args: argparse.Namespace) -> None:
    """Both sides from the SAE folder and the profile (see the module docstring)."""
    from prefect.logging import disable_run_logger

    from saeflow.artifacts import artifact_ref
    from saeflow.config import load_config
    from tasks import meta_sae as tms

    cfg = load_config(args.config).meta_sae
    sae_dir = pick_sae(Path(args.artifacts), args.sae)
    sae_ref = artifact_ref(args.artifacts, "train", sae_dir.name)
    label = tms.sae_info(sae_ref).description
    print(f"SAE: {label} at {sae_dir}; profile {args.config} meta_sae: seed {cfg.seed}, width_ratio {cfg.width_ratio}, "
          f"k {cfg.k}, {cfg.train_steps} steps, batch {cfg.batch_size}", flush=True)
    with tempfile.TemporaryDirectory(prefix="e2e-meta-", dir="/tmp") as tmp:
        sb_out = Path(tmp) / "saebench"
        env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([SBVENV_PYTHON, "-c", SAEBENCH_E2E_SCRIPT, str(sae_dir), str(cfg.seed), "1",
                                 str(sb_out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        with disable_run_logger():
            meta = tms.meta_train_task.fn(sae=sae_ref, cfg=cfg, root=str(Path(tmp) / "artifacts"), device="cpu")
        ours_wall = time.perf_counter() - t0
        ours = json.loads((meta.dir / "metrics.json").read_text())
        print(f"saeflow meta_sae stage: FVE {ours['fve']:.4f} MSE {ours['mse']:.3g} width {ours['width']} "
              f"({ours_wall:.1f} s)", flush=True)
        out, err = proc.communicate()
        sb = _sb_result(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        sb_dec = np.load(sb_out / "decoder_used.npy")
    our_dec = tms._unit_decoder(load_sae(sae_dir), sae_dir).numpy()
    dec_diff = float(np.abs(our_dec - sb_dec).max())
    diff = ours["fve"] - sb["fve"]
    print(f"SAEBench run_eval ({sb['sae_class']}, bf16 autocast): FVE {sb['fve']:.4f} MSE {sb['mse']:.3g} "
          f"({sb['train_time_s']:.1f} s train, {sb['wall_s']:.1f} s wall)")
    print(f"decoder row norms: saeflow {_norms(our_dec)}, SAEBench {_norms(sb_dec)}; max |difference| {dec_diff:.3g}")
    same = ("the same matrix up to float rounding: the SAE's decoder rows are unit norm, so SAEBench's unfolded W_dec "
            "and our re-normalised rows agree" if dec_diff < 1e-5 else "NOT the same matrix: the row norms differ")
    write_section("meta_sae_e2e", f"""
## Meta-SAE end to end vs SAEBench `meta_structure` (`benchmarks/meta_sae_agreement.py --end-to-end`)

Command: `.venv/bin/python -m benchmarks.meta_sae_agreement {' '.join(sys.argv[1:])}`. SAE: the quick family's
`{label}` (`{sae_dir.name}`); no shared intermediate. SAEBench 0.6.0 (its venv, subprocess, 1 thread):
`sae_lens.SAE.load_from_disk(<SAE folder>)` ({sb['sae_class']}), then `meta_structure.main.run_eval` on the object
(`load_and_format_sae`: custom SAE used as loaded, rows checked not folded; `MetaStructureEvalConfig(random_seed={cfg.seed})`,
bf16 autocast as its default, seeded as its `main`). saeflow: the `meta_sae` stage body `tasks.meta_sae.meta_train_task`
with `{args.config}`'s `meta_sae:` config (float32) into a temporary artifacts root, in parallel (1 thread).
Machine: {machine()} (other jobs were running: times are indicative only).

| side | FVE | MSE | train s | decoder row norms |
|---|---|---|---|---|
| saeflow stage | {ours['fve']:.4f} | {ours['mse']:.3g} | {ours['train_time_s']:.1f} | {_norms(our_dec)} (unit_rows of W_dec) |
| SAEBench run_eval | {sb['fve']:.4f} | {sb['mse']:.3g} | {sb['train_time_s']:.1f} | {_norms(sb_dec)} (W_dec as loaded) |

Decoders: max |saeflow - SAEBench| = {dec_diff:.3g} ({same}). FVE difference **{diff:+.4f}** (goal |diff| <= 0.02).
""")
    print(f"e2e |FVE difference|: {abs(diff):.4f} (goal <= 0.02)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default=str(default_root()))
    ap.add_argument("--sae", default=None, help="train fingerprint (default: widest quick-family SAE, smallest k)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--no-autocast", action="store_true", help="also run SAEBench with autocast off (float32)")
    ap.add_argument("--control", type=int, nargs=2, metavar=("N", "D"), default=None,
                    help="only print our FVE on a random Gaussian N x D decoder (a no-structure control) and exit")
    ap.add_argument("--end-to-end", action="store_true",
                    help="each side starts from the SAE folder and the profile (SAEBench run_eval vs our meta_sae stage)")
    ap.add_argument("--config", default="configs/quick-evals.yaml", help="profile for --end-to-end")
    args = ap.parse_args()
    if args.end_to_end:
        end_to_end(args)
        return
    if args.control:
        n, d = args.control
        rand = unit_rows(torch.randn(n, d, generator=torch.Generator().manual_seed(0))).numpy()
        ours = run_ours(rand, 42)
        print(f"random {n} x {d} decoder: saeflow FVE {ours['fve']:.4f} MSE {ours['mse']:.3g} ({ours['train_time_s']:.1f} s)")
        return

    sae_dir = pick_sae(Path(args.artifacts), args.sae)
    sae = load_sae(sae_dir)
    label = describe_sae(sae.cfg)
    decoder = unit_rows(sae.W_dec.detach()).numpy()
    rows, diffs, ratios = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-meta-npy-") as tmp:
        npy = Path(tmp) / "decoder.npy"
        np.save(npy, decoder)
        print(f"decoder: {label} at {sae_dir} -> {decoder.shape}, saved to {npy}", flush=True)
        for seed in args.seeds:
            ours = run_ours(decoder, seed)
            print(f"seed {seed}: saeflow FVE {ours['fve']:.4f} MSE {ours['mse']:.3g} ({ours['train_time_s']:.1f} s)", flush=True)
            for autocast in ([True, False] if args.no_autocast else [True]):
                sb = run_saebench(npy, seed, autocast)
                diff = ours["fve"] - sb["fve"]
                diffs.append(diff)
                ratios.append(ours["fve"] / sb["fve"])
                print(f"seed {seed}: SAEBench (autocast {autocast}) FVE {sb['fve']:.4f} MSE {sb['mse']:.3g} "
                      f"({sb['train_time_s']:.1f} s); difference {diff:+.4f}", flush=True)
                rows.append(f"| {seed} | {'bf16 autocast' if autocast else 'float32'} | {ours['fve']:.4f} | {sb['fve']:.4f} | "
                            f"{diff:+.4f} | {ours['mse']:.3g} | {sb['mse']:.3g} | {ours['train_time_s']:.1f} | "
                            f"{sb['train_time_s']:.1f} |")
    worst = max(abs(d) for d in diffs)
    write_section("meta_sae_agreement", f"""
## Meta-SAE agreement with SAEBench `meta_structure` (`benchmarks/meta_sae_agreement.py`)

Command: `.venv/bin/python -m benchmarks.meta_sae_agreement {' '.join(sys.argv[1:])}`. Decoder: unit rows of the quick
family's `{label}` (`{sae_dir.name}`, {decoder.shape[0]} x {decoder.shape[1]}), saved to one `.npy` read by both sides.
SAEBench 0.6.0 (its venv, subprocess): `_train_meta_structure_on_decoder` + `_decoder_variance_metrics` with
`MetaStructureEvalConfig()` defaults (seeded as its `main`). saeflow: `train_meta_sae` + `decoder_variance_explained`
with `MetaSAEConfig()` defaults (float32; SAEBench's default trains under bf16 autocast). Both: meta width
{max(-(-decoder.shape[0] // 4), 4)}, k 4, 1500 steps, batch 1024 with replacement, Adam 5e-4, eval batches 4096. Machine: {machine()}
(other jobs were running: times are indicative only).

| seed | SAEBench precision | saeflow FVE | SAEBench FVE | difference | saeflow MSE | SAEBench MSE | saeflow train s | SAEBench train s |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Goal: |difference| <= 0.02; worst measured: **{worst:.4f}**.
""")
    print(f"worst |FVE difference|: {worst:.4f} (goal <= 0.02)")
    print(f"ratio: {float(np.mean(ratios)):.4f}")


if __name__ == "__main__":
    main()
