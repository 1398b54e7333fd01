"""Train one SAE with a peer library's own trainer on a precomputed activation stream (issue #28).

Standalone: it imports neither saeflow nor anything of this project, only numpy, torch and the peer
library, because it runs inside the peer's own virtual environment (``benchmarks/quality.py
--peers`` calls it there; the peers pin packages that clash with ours):

* ``dictionary_learning`` (PyPI ``dictionary-learning`` 0.1.0): ``/work/dlvenv``, made with
  ``python3 -m venv /work/dlvenv && /work/dlvenv/bin/pip install torch==2.13.0 dictionary-learning
  && /work/dlvenv/bin/pip uninstall -y torchvision`` (torch pinned in the same command, else the
  newest torchvision pulls a CUDA torch; the torchvision nnsight pulls in fails to load beside a
  CPU torch and breaks ``import transformers``; nothing here needs it);
* ``sparsify`` (PyPI ``eai-sparsify`` 1.3.3): ``/work/spvenv``, made with ``python3 -m venv
  /work/spvenv && /work/spvenv/bin/pip install torch==2.13.0 eai-sparsify`` (it also resolves
  beside every pin of the project's own venv).

Input: ``--batches``, a float32 ``.npy`` of ``steps * batch_size`` rows of width ``--d-in``, in
exactly the order to train on (step ``s`` trains on rows ``s*batch_size`` to ``(s+1)*batch_size``);
it is memory-mapped, one batch read per step. ``--fold-factor F`` (default 1): the rows are raw
activations multiplied by ``F`` (the pipeline's normalisation ``sqrt(d_in) / mean ||x||``, as the
SAELens side trains on them); after training the biases (and thresholds) are divided by ``F`` so the
saved SAE reads raw activations, as dictionary_learning's ``trainSAE(normalize_activations=True)``
does with its ``scale_biases``.

Output (``--out``): the trained SAE in the peer's native layout:

* dictionary_learning: ``OUT/ae.pt`` (``state_dict``) + ``OUT/config.json`` (``{"trainer":
  trainer.config, "buffer": ...}``), as ``trainSAE`` writes ``trainer_<i>/``;
* sparsify: ``OUT/run/layers.<layer>/cfg.json`` + ``sae.safetensors`` (plus the optimiser state
  its trainer checkpoints beside them), as its ``Trainer`` saves a run.

The last printed line is JSON: ``{"train_seconds", "steps", "rows", "peer", "arch", "sae_dir",
"version", "trainer", "overrides"}``. ``train_seconds`` is the wall time from building the trainer
to the end of the last step (dictionary_learning: ``update(step, batch)`` for every step, batch
reads from the memory map included, the final save excluded; sparsify: its ``Trainer.fit()``, which
includes its own checkpoint saves).

Trainers (the peer's own classes, driven through their public API; the peer's defaults everywhere
except the fields matched across sides: width, k / target L0 / L1 penalty, lr, batch size, steps,
seed):

* ``topk``: dictionary_learning ``TopKTrainer`` (``AutoEncoderTopK``); sparsify ``Trainer``
  (``SparseCoder``, activation topk);
* ``batchtopk``: dictionary_learning ``BatchTopKTrainer`` (``BatchTopKSAE``);
* ``matryoshka``: dictionary_learning ``MatryoshkaBatchTopKTrainer`` (``MatryoshkaBatchTopKSAE``);
* ``relu``: dictionary_learning ``StandardTrainerAprilUpdate`` (``AutoEncoder``; ``--l1-penalty``,
  default the package's 0.1: it has no L0 target);
* ``jumprelu``: dictionary_learning ``JumpReluTrainer`` (``JumpReluAutoEncoder``; ``--target-l0``,
  default ``--k``).

Defaults overridden, and why:

* step counts meant for runs of 100k+ steps (dictionary_learning: ``warmup_steps`` 1000,
  ``sparsity_warmup_steps`` 2000, ``threshold_start_step`` 1000; sparsify: ``lr_warmup_steps``
  1000) become ``min(default, steps // 10)``: the package asserts that warm-ups are shorter than
  the run, and a BatchTopK / Matryoshka threshold started after the last step would never be set
  (the saved SAE would be a plain ReLU SAE at inference);
* ``seed``: dictionary_learning's ``JumpReluTrainer`` takes no seed, so ``torch.manual_seed(seed)``
  is called before every trainer is built (the other trainers seed the same way themselves);
* ``layer`` / ``lm_name`` / ``submodule_name`` (dictionary_learning asserts they are given; only
  recorded in ``config.json``): ``--layer``, ``--lm-name``, ``resid_post_layer_<layer>``;
* ``device``: ``--device`` (default cpu);
* matryoshka ``group_fractions`` (required, no default in the package): from
  ``--matryoshka-widths`` (nested prefix widths, default ``width/8, width/4, width/2, width`` as
  saeflow's ``default_matryoshka_widths``), group ``i`` = ``(w_i - w_{i-1}) / width``; group
  weights: the package default (uniform);
* sparsify: ``optimizer`` ``adam`` instead of its default ``signum`` (sign-SGD under a
  schedule-free wrapper), because lr is a matched field and means the same only for Adam, which
  every other side uses (``--sparsify-optimizer signum`` keeps its default optimizer, still at
  ``--lr``); with adam, sparsify's own schedule (linear warm-up, linear decay to 0 at the end);
  ``log_to_wandb`` off; ``init_seeds`` ``[seed]``; the model it hooks is a stand-in whose layer
  outputs the rows of ``--batches`` (one row per "sequence" of one token, ``batch_size``
  sequences per step, nothing excluded), so ``Trainer.fit`` runs unchanged on these activations.

Kept at the peer's defaults (among others): dictionary_learning's Adam betas, grad clip 1.0, unit-norm
decoder with the parallel gradient removed, ``b_dec`` = geometric median of the first batch,
``auxk_alpha`` 1/32 with ``dead_feature_threshold`` 10M tokens (so at the quick profile's 4.1M
training tokens their aux-k loss never starts), no lr decay (``decay_start``
None), JumpReLU ``bandwidth`` 0.001 and ``sparsity_penalty`` 1; sparsify's ``auxk_alpha`` 0,
``b_dec`` = mean of the first batch, ``save_every`` 1000.

``--probe ROWS.npy`` (raw activations) reloads the saved checkpoint with the peer's own loader
(``dictionary_learning.utils.load_dictionary``, ``SparseCoder.load_from_disk``) and writes its
``encode`` (dense latents) and ``decode`` of them to ``OUT/probe_latents.npy`` /
``OUT/probe_recon.npy``, to check a conversion against the peer's own forward.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

PEERS: dict[str, tuple[str, ...]] = {
    "dictionary_learning": ("topk", "batchtopk", "matryoshka", "relu", "jumprelu"),
    "sparsify": ("topk",),
}
K_ARCHS = ("topk", "batchtopk", "matryoshka")
#: dictionary_learning's StandardTrainerAprilUpdate default ``l1_penalty``.
DL_DEFAULT_L1 = 0.1


def scaled_steps(default: int, steps: int) -> int:
    """A peer's step-count default (warm-up, threshold start) capped at a tenth of the run."""
    return min(default, steps // 10)


def default_matryoshka_widths(width: int) -> list[int]:
    """``width/8, width/4, width/2, width`` (duplicates and zeros dropped), as saeflow's default."""
    out: list[int] = []
    for w in (width // 8, width // 4, width // 2, width):
        if w >= 1 and (not out or w > out[-1]):
            out.append(w)
    return out


def group_fractions(widths: list[int], width: int) -> list[float]:
    """Nested prefix widths -> dictionary_learning ``group_fractions`` (sizes of successive groups / width)."""
    w = list(widths) + ([width] if widths[-1] < width else [])
    return [(b - a) / width for a, b in zip([0, *w[:-1]], w)]


def parse_widths(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--matryoshka-widths {text!r}: comma-separated integers expected") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", required=True, choices=sorted(PEERS))
    ap.add_argument("--arch", required=True, choices=PEERS["dictionary_learning"])
    ap.add_argument("--batches", required=True, help="float32 .npy, steps * batch-size rows x d-in, in training order")
    ap.add_argument("--d-in", type=int, required=True)
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--k", type=int, default=None, help="topk / batchtopk / matryoshka: active latents per row")
    ap.add_argument("--target-l0", type=float, default=None, help="jumprelu: target L0 (default --k)")
    ap.add_argument("--l1-penalty", type=float, default=None, help=f"relu: L1 penalty (default {DL_DEFAULT_L1}, the package's)")
    ap.add_argument("--matryoshka-widths", type=parse_widths, default=None,
                    help="matryoshka: nested prefix widths, e.g. 512,1024,2048,4096 (default width/8,/4,/2,width)")
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fold-factor", type=float, default=1.0,
                    help="rows = raw activations x this; the saved SAE is folded to read raw activations")
    ap.add_argument("--layer", type=int, default=0, help="recorded in the checkpoint (hook blocks.<layer>.hook_resid_post)")
    ap.add_argument("--lm-name", default="unknown", help="recorded in the checkpoint")
    ap.add_argument("--sparsify-optimizer", default="adam", choices=("adam", "signum"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--probe", default=None, help="raw activation rows (.npy) to run through the reloaded checkpoint")
    ap.add_argument("--out", required=True)
    return ap


def check_args(args: argparse.Namespace) -> list[str]:
    """Every problem with the arguments (the batches file's header included); empty when valid."""
    errs: list[str] = []
    if args.arch not in PEERS[args.peer]:
        errs.append(f"--peer {args.peer} has no {args.arch} trainer (it has: {', '.join(PEERS[args.peer])})")
    for name in ("d_in", "width", "batch_size", "steps"):
        if getattr(args, name) < 1:
            errs.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        errs.append(f"--lr must be > 0, got {args.lr}")
    if not args.fold_factor > 0:
        errs.append(f"--fold-factor must be > 0, got {args.fold_factor}")
    if args.arch in K_ARCHS:
        if args.k is None:
            errs.append(f"--arch {args.arch} needs --k")
        elif not 1 <= args.k <= args.width:
            errs.append(f"--k must be between 1 and --width {args.width}, got {args.k}")
    if args.arch == "jumprelu":
        target = args.target_l0 if args.target_l0 is not None else args.k
        if target is None or not target > 0:
            errs.append("--arch jumprelu needs --target-l0 > 0 (or --k)")
    if args.l1_penalty is not None and (args.arch != "relu" or args.l1_penalty < 0):
        errs.append("--l1-penalty is for --arch relu only and must be >= 0")
    if args.matryoshka_widths is not None:
        w = args.matryoshka_widths
        if args.arch != "matryoshka":
            errs.append("--matryoshka-widths is for --arch matryoshka only")
        elif not w or w[0] < 1 or any(b <= a for a, b in zip(w, w[1:])) or w[-1] > args.width:
            errs.append(f"--matryoshka-widths {w}: strictly increasing positive widths <= --width {args.width} expected")
    if args.peer == "sparsify" and args.device != "cpu" and not args.device.startswith("cuda"):
        errs.append(f"--device {args.device}: cpu or cuda expected")
    path = Path(args.batches)
    if not path.is_file():
        errs.append(f"--batches {path} does not exist")
    elif not errs:
        try:
            mm = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            errs.append(f"--batches {path} is not a readable .npy ({exc})")
        else:
            need = args.steps * args.batch_size
            if mm.dtype != np.float32 or mm.ndim != 2 or mm.shape[1] != args.d_in:
                errs.append(f"--batches {path} holds {mm.dtype} {mm.shape}; float32 (rows, {args.d_in}) expected")
            elif mm.shape[0] < need:
                errs.append(f"--batches {path} holds {mm.shape[0]:,} rows; --steps {args.steps} x --batch-size "
                            f"{args.batch_size} needs {need:,}")
    return errs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    errs = check_args(args)
    if errs:
        ap.error("; ".join(errs))
    if args.arch == "jumprelu" and args.target_l0 is None:
        args.target_l0 = float(args.k)
    if args.arch == "matryoshka" and args.matryoshka_widths is None:
        args.matryoshka_widths = default_matryoshka_widths(args.width)
    return args


# ---------------------------------------------------------------------------------------- dictionary_learning
def dl_trainer(args: argparse.Namespace):
    """The dictionary_learning trainer for ``args.arch`` with its defaults but the matched fields."""
    import torch
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.trainers.jumprelu import JumpReluTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
    from dictionary_learning.trainers.standard import StandardTrainerAprilUpdate
    from dictionary_learning.trainers.top_k import TopKTrainer

    common = dict(steps=args.steps, activation_dim=args.d_in, dict_size=args.width, layer=args.layer,
                  lm_name=args.lm_name, submodule_name=f"resid_post_layer_{args.layer}", lr=args.lr,
                  device=args.device, warmup_steps=scaled_steps(1000, args.steps))
    overrides = {"warmup_steps": common["warmup_steps"]}
    torch.manual_seed(args.seed)
    if args.arch in K_ARCHS:
        cls = {"topk": TopKTrainer, "batchtopk": BatchTopKTrainer, "matryoshka": MatryoshkaBatchTopKTrainer}[args.arch]
        extra = dict(k=args.k, seed=args.seed, threshold_start_step=scaled_steps(1000, args.steps))
        overrides["threshold_start_step"] = extra["threshold_start_step"]
        if args.arch == "matryoshka":
            extra["group_fractions"] = group_fractions(args.matryoshka_widths, args.width)
            overrides["group_fractions"] = extra["group_fractions"]
        trainer = cls(**common, **extra)
        if args.arch == "matryoshka":
            want = [b - a for a, b in zip([0, *args.matryoshka_widths], args.matryoshka_widths)]
            want += [args.width - args.matryoshka_widths[-1]] if args.matryoshka_widths[-1] < args.width else []
            if list(trainer.group_sizes) != want:  # it rounds fraction * width down
                raise SystemExit(f"dictionary_learning made groups {trainer.group_sizes} of --matryoshka-widths "
                                 f"{args.matryoshka_widths}, not {want}: choose widths that are exact fractions")
        return trainer, overrides
    sparsity_warmup = scaled_steps(2000, args.steps)
    overrides["sparsity_warmup_steps"] = sparsity_warmup
    if args.arch == "relu":
        l1 = DL_DEFAULT_L1 if args.l1_penalty is None else args.l1_penalty
        return StandardTrainerAprilUpdate(**common, seed=args.seed, l1_penalty=l1,
                                          sparsity_warmup_steps=sparsity_warmup), overrides
    return JumpReluTrainer(**common, seed=args.seed, target_l0=float(args.target_l0),
                           sparsity_warmup_steps=sparsity_warmup), overrides


def train_dictionary_learning(args: argparse.Namespace, batches: np.ndarray, out: Path) -> dict:
    import dictionary_learning
    import torch

    t0 = time.perf_counter()
    trainer, overrides = dl_trainer(args)
    bs = args.batch_size
    for step in range(args.steps):
        act = torch.from_numpy(np.array(batches[step * bs:(step + 1) * bs], dtype=np.float32))
        trainer.update(step, act.to(args.device))
    seconds = time.perf_counter() - t0
    if args.fold_factor != 1.0:
        trainer.ae.scale_biases(1.0 / args.fold_factor)  # as trainSAE(normalize_activations=True) before saving
    out.mkdir(parents=True, exist_ok=True)
    config = {"trainer": trainer.config,
              "buffer": {"source": "benchmarks/peer_train.py", "batches": str(args.batches),
                         "fold_factor": args.fold_factor, "batch_size": bs}}
    (out / "config.json").write_text(json.dumps(config, indent=4))
    torch.save({k: v.cpu() for k, v in trainer.ae.state_dict().items()}, out / "ae.pt")
    return {"train_seconds": seconds, "sae_dir": str(out), "version": dictionary_learning.__version__,
            "trainer": type(trainer).__name__, "overrides": overrides}


def probe_dictionary_learning(sae_dir: Path, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from dictionary_learning.utils import load_dictionary

    ae, _ = load_dictionary(str(sae_dir), device="cpu")
    with torch.no_grad():
        x = torch.from_numpy(rows)
        f = ae.encode(x)
        return f.numpy(), ae.decode(f).numpy()


# ---------------------------------------------------------------------------------------- sparsify
def _sparsify_parts(batches: np.ndarray, d_in: int, n_rows: int, layer: int, device: str):
    """A dataset of row indices and a stand-in model whose ``layers.<layer>`` outputs those rows."""
    import torch
    from torch import nn

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n_rows

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": torch.tensor([i])}

    class Passthrough(nn.Module):
        def forward(self, h):
            return h

    class StreamModel(nn.Module):
        """What sparsify's Trainer needs of a model: ``base_model``, ``device``, ``dummy_inputs``,
        and a forward whose hooked module outputs the activations of the given "tokens" (row ids)."""

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Passthrough() for _ in range(layer + 1)])

        @property
        def base_model(self):
            return self

        @property
        def device(self):
            return torch.device(device)

        @property
        def dummy_inputs(self):
            return {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

        def forward(self, input_ids):
            idx = input_ids.flatten().cpu().numpy()
            lo = int(idx[0])
            if np.array_equal(idx, np.arange(lo, lo + idx.size)):  # the Trainer's DataLoader does not shuffle
                h = torch.from_numpy(np.array(batches[lo:lo + idx.size], dtype=np.float32))
            else:
                h = torch.from_numpy(np.array(batches[idx], dtype=np.float32))
            h = h.reshape(*input_ids.shape, d_in).to(device)
            for block in self.layers:
                h = block(h)
            return h

    return Rows(), StreamModel()


def train_sparsify(args: argparse.Namespace, batches: np.ndarray, out: Path) -> dict:
    import importlib.metadata

    import torch
    from sparsify import SaeConfig, Trainer, TrainConfig

    hook = f"layers.{args.layer}"
    dataset, model = _sparsify_parts(batches, args.d_in, args.steps * args.batch_size, args.layer,
                                     args.device)
    warmup = scaled_steps(1000, args.steps)
    cfg = TrainConfig(SaeConfig(num_latents=args.width, k=args.k), batch_size=args.batch_size, lr=args.lr,
                      optimizer=args.sparsify_optimizer, lr_warmup_steps=warmup, hookpoints=[hook],
                      init_seeds=[args.seed], log_to_wandb=False, save_dir=str(out), run_name="run")
    t0 = time.perf_counter()
    trainer = Trainer(cfg, dataset, model)
    trainer.fit()
    seconds = time.perf_counter() - t0
    sae = trainer.saes[hook]
    sae_dir = out / "run" / hook
    for opt in trainer.optimizers:  # signum's schedule-free wrapper: the weights it saves are its eval() ones
        if hasattr(opt, "eval"):
            opt.eval()
    if args.fold_factor != 1.0:
        with torch.no_grad():
            sae.b_dec.data /= args.fold_factor
            sae.encoder.bias.data /= args.fold_factor
        sae.save_to_disk(sae_dir)  # sparsify's own writer, over the copy fit() saved
    return {"train_seconds": seconds, "sae_dir": str(sae_dir), "version": importlib.metadata.version("eai-sparsify"),
            "trainer": "sparsify.Trainer", "overrides": {"optimizer": args.sparsify_optimizer,
                                                          "lr_warmup_steps": warmup}}


def probe_sparsify(sae_dir: Path, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from sparsify import SparseCoder

    sae = SparseCoder.load_from_disk(sae_dir, device="cpu")
    with torch.no_grad():
        enc = sae.encode(torch.from_numpy(rows))
        dense = torch.zeros(rows.shape[0], sae.num_latents).scatter_(1, enc.top_indices, enc.top_acts)
        return dense.numpy(), sae.decode(enc.top_acts, enc.top_indices).numpy()


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    batches = np.load(args.batches, mmap_mode="r")
    train = train_dictionary_learning if args.peer == "dictionary_learning" else train_sparsify
    result = train(args, batches, out)
    if args.probe:
        probe = probe_dictionary_learning if args.peer == "dictionary_learning" else probe_sparsify
        latents, recon = probe(Path(result["sae_dir"]), np.load(args.probe).astype(np.float32))
        np.save(out / "probe_latents.npy", latents)
        np.save(out / "probe_recon.npy", recon)
    result = {"train_seconds": result.pop("train_seconds"), "steps": args.steps,
              "rows": args.steps * args.batch_size, "peer": args.peer, "arch": args.arch, **result}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
