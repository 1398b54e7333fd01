"""SAE quality: saeflow's trainer vs SAELens' ``SAETrainer`` (and, with ``--peers``, dictionary_learning
and EleutherAI sparsify) on the same activations and token budget.

For each architecture (TopK and BatchTopK by default, width 4096, k 32) one SAE is trained by each
side, once, on the quick profile's activation store (``configs/quick.yaml``; extract it first with
``python -m flows.extract --config configs/quick.yaml``):

* **saeflow** runs exactly the pipeline's training path with the profile's defaults
  (:func:`tasks.train.train_members`, ``config.family.base`` with ``architecture`` / ``width`` /
  ``k`` replaced, ``config.train``), into a temporary artifacts root, one SAE per call.
* **SAELens** trains its own ``TopKTrainingSAE`` / ``BatchTopKTrainingSAE`` with its defaults
  (``b_dec`` = 0, decoder init norm 0.1, aux-loss coefficient 1, dead window 1000 steps,
  ``rescale_acts_by_decoder_norm``) and ``normalize_activations="expected_average_only_in"`` with
  ``SAETrainer``, at the same lr, batch size and number of steps, on the same shuffled batch stream
  (a ``ShuffledLoader`` over the store's training rows, seeded from ``config.train.seed``). Its
  normalisation factor is set to the one the pipeline uses (``sqrt(d_in) / mean ||x||``) instead of
  being estimated from the first 1000 batches of the stream (which would consume ~8 passes over
  the store and shift the stream); ``fit()`` folds it into the weights. The SAE is saved with
  SAELens' ``save_inference_model`` (TopK as ``topk``, BatchTopK as ``jumprelu`` with its moving
  threshold) and read back with :func:`saeflow.saes.load_sae`, checked against SAELens' own loader.

Both SAEs are then evaluated by the same code on raw activations: :func:`saeflow.metrics.
reconstruction_metrics` on every held-out row of the store (``store.train_rows`` to the end; at
least ``--eval-rows``) gives frac_dead (never fires there), explained variance (SAELens' formula)
and L0; :func:`saeflow.metrics.ce_metrics` the CE loss score on the corpus' held-out contexts (as
``tasks/metrics.py``). Wall time covers the whole training call of each side (saeflow: store
statistics, b_dec init, checkpoints and final save included). Prints a table, per peer the EV difference
and ``ratio: ours/<peer> frac_dead = <topk> (topk), ...``, per architecture the best peer at matched
L0 (held-out L0 within 10% of saeflow's), and last issue #28's acceptance figures
``worst dead fraction: X; min EV margin over best peer: Y``; writes the table into
docs/benchmarks.md (section ``quality``) unless ``--no-write``.

Peers (``--peers saelens,dictionary_learning,sparsify``; default ``saelens``, as before) and
architectures (``--archs topk,batchtopk,matryoshka,relu,jumprelu``; default ``topk,batchtopk``):
the saeflow side trains every architecture (``relu`` / ``jumprelu`` with ``target_l0`` = k,
jumprelu's quadratic target loss; ``matryoshka`` with ``matryoshka_widths`` width/8, /4, /2, width
unless the profile sets them). SAELens trains topk, batchtopk, matryoshka
(``MatryoshkaBatchTopKTrainingSAE``, same widths) and jumprelu (``jumprelu_sparsity_loss_mode``
quadratic with ``target_l0`` = k); its standard ReLU SAE has no L0 target, so relu is not compared
on its side. dictionary_learning trains all five in its own venv, sparsify TopK only (see
``benchmarks/_peers.py`` and ``benchmarks/peer_train.py``: both train on the stream above,
exported to a float32 ``.npy`` after normalisation, fold the factor back into the saved SAE, which
is converted with ``saeflow.saes.foreign.convert`` and evaluated like the others; a peer's wall
time is its training loop). An architecture a side does not implement is skipped with a printed
line. dictionary_learning's relu uses its ``l1_penalty`` (``--dl-l1-penalty``, default the
package's 0.1): its L0 is not matched.

Run (about 25 minutes on 2 CPU cores, mostly SAELens)::

    .venv/bin/python benchmarks/quality.py
    .venv/bin/python benchmarks/quality.py --tokens 40960 --width 512 --k 16 --no-write   # quick try
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import _peers  # noqa: E402
from benchmarks._common import machine, write_section  # noqa: E402
from flows.extract import expected_activations  # noqa: E402
from flows.runner import load_profile, resolve_root  # noqa: E402
from saeflow.artifacts import ArtifactRef, completion_meta, require_complete  # noqa: E402
from saeflow.config import PipelineConfig, TrainConfig  # noqa: E402
from saeflow.saes import SAEConfig  # noqa: E402
from saeflow.saes.config import default_matryoshka_widths  # noqa: E402
from saeflow.corpus import special_token_ids  # noqa: E402
from saeflow.device import pick_device  # noqa: E402
from saeflow.metrics import CEReference, ce_metrics, ce_reference, reconstruction_metrics  # noqa: E402
from saeflow.models import load_model  # noqa: E402
from saeflow.saes import BaseSAE, load_sae  # noqa: E402
from saeflow.store import ActivationStore, ShuffledLoader  # noqa: E402
from tasks import corpus, model  # noqa: E402
from tasks.corpus import load_tokens  # noqa: E402
from tasks.train import train_members  # noqa: E402

ARCHITECTURES = ("topk", "batchtopk", "matryoshka", "relu", "jumprelu")
DEFAULT_ARCHITECTURES = ("topk", "batchtopk")
SAE_LENS_ARCHITECTURES = ("topk", "batchtopk", "matryoshka", "jumprelu")  # relu: SAELens has no L0 target
SIDES = ("saeflow", "SAELens", "dictionary_learning", "sparsify")
#: Max |x_hat(saeflow's reader) - x_hat(SAELens' reader)| / mean ||x|| tolerated for a saved SAELens SAE.
LOAD_CHECK_TOL = 1e-4


@dataclass
class Run:
    """One trained SAE (one side, one architecture) and what was measured on it."""

    arch: str
    side: str
    sae_dir: Path
    seconds: float
    tokens: int
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


# ---------------------------------------------------------------------------------------- setup
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def open_store(config: PipelineConfig, root: str, config_path: str) -> tuple[ArtifactRef, ActivationStore]:
    acts = expected_activations(config, root)
    if not acts.is_complete():
        sys.exit(f"the activations of {config_path} are not extracted (or not complete) under {root}: run "
                 f"`python -m flows.extract --config {config_path}` first")
    return acts, ActivationStore.open(acts.dir)


def held_out_range(store: ActivationStore, min_rows: int) -> tuple[int, int]:
    start, end = store.train_rows, store.n_rows
    if end - start < min_rows:
        sys.exit(f"the activation store at {store.root} holds {end - start:,} held-out rows (from row "
                 f"{start:,}); frac_dead needs >= {min_rows:,}: raise corpus.eval_contexts and re-extract, "
                 "or lower --eval-rows")
    return start, end


def bench_train_config(config: PipelineConfig, tokens: int | None) -> TrainConfig:
    return config.train if tokens is None else config.train.model_copy(update={"training_tokens": tokens})


def n_steps(train_cfg: TrainConfig) -> int:
    return train_cfg.training_tokens // train_cfg.batch_size


def our_sae_config(config: PipelineConfig, arch: str, width: int, k: int) -> SAEConfig:
    """The profile's SAE defaults (``family.base``, or ``sae`` without a family) at this architecture/size,
    validated; relu / jumprelu train to ``target_l0`` = k (jumprelu with the quadratic target loss),
    matryoshka gets the default nested widths unless the profile sets them (and they fit)."""
    base = config.family.base if config.family is not None else config.sae
    fields: dict[str, Any] = {**base.model_dump(), "architecture": arch, "width": width, "k": k}
    if arch in ("relu", "jumprelu"):
        fields["target_l0"] = float(k)
    if arch == "jumprelu":
        fields["jumprelu_sparsity_loss_mode"] = "quadratic"
    widths = fields.get("matryoshka_widths")
    if arch == "matryoshka" and (not widths or widths[-1] > width):
        fields["matryoshka_widths"] = default_matryoshka_widths(width)
    return SAEConfig.model_validate(fields)


def scaling_factor(store: ActivationStore) -> float:
    """The pipeline's normalisation factor (``tasks/train.py``)."""
    return store.normalization_factor()


# ---------------------------------------------------------------------------------------- ours
def train_ours(acts: ArtifactRef, sae_cfg: SAEConfig, train_cfg: TrainConfig, root: Path, device: str) -> Run:
    """The pipeline's training stage on one SAE, into the scratch artifacts root ``root``."""
    seed_everything(train_cfg.seed)
    t0 = time.perf_counter()
    [out] = train_members(acts, [sae_cfg], train_cfg, str(root), device=device)
    seconds = time.perf_counter() - t0
    return Run(sae_cfg.architecture, "saeflow", out.dir, seconds, n_steps(train_cfg) * train_cfg.batch_size)


# ---------------------------------------------------------------------------------------- SAELens
def sae_lens_sae(arch: str, d_in: int, width: int, k: int, device: torch.device,
                 matryoshka_widths: tuple[int, ...] | None = None):
    """A SAELens training SAE with SAELens' defaults (only size, k / target L0, matryoshka widths, dtype,
    device and normalisation set; jumprelu: the quadratic sparsity loss, the one that takes a target L0)."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    common: dict[str, Any] = dict(d_in=d_in, d_sae=width, dtype="float32", device=str(device),
                                  normalize_activations="expected_average_only_in")
    if arch == "jumprelu":
        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**common, jumprelu_sparsity_loss_mode="quadratic",
                                                             target_l0=float(k)))
    if arch == "matryoshka":
        return MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            **common, k=k, matryoshka_widths=list(matryoshka_widths or default_matryoshka_widths(width))))
    kinds = {"topk": (TopKTrainingSAE, TopKTrainingSAEConfig), "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig)}
    sae_cls, cfg_cls = kinds[arch]
    return sae_cls(cfg_cls(**common, k=k))


def sae_lens_trainer_config(train_cfg: TrainConfig, device: torch.device):
    from sae_lens.config import LoggingConfig
    from sae_lens.training.sae_trainer import SAETrainerConfig

    return SAETrainerConfig(total_training_samples=n_steps(train_cfg) * train_cfg.batch_size,
                            train_batch_size_samples=train_cfg.batch_size, lr=train_cfg.lr, lr_end=train_cfg.lr / 10,
                            device=str(device), logger=LoggingConfig(log_to_wandb=False))


def train_sae_lens(arch: str, width: int, k: int, store: ActivationStore, train_cfg: TrainConfig, factor: float,
                   device: torch.device, out_dir: Path, matryoshka_widths: tuple[int, ...] | None = None) -> Run:
    """SAELens' trainer on the pipeline's batch stream; the trained SAE saved (inference form) to ``out_dir``."""
    from sae_lens.training.sae_trainer import SAETrainer

    seed_everything(train_cfg.seed)
    loader = ShuffledLoader(store, train_cfg.batch_size, train_cfg.seed, train_cfg.buffer_chunks, 0, store.train_rows)
    t0 = time.perf_counter()
    sae = sae_lens_sae(arch, store.d_model, width, k, device, matryoshka_widths)
    trainer = SAETrainer(cfg=sae_lens_trainer_config(train_cfg, device), sae=sae, data_provider=iter(loader))
    trainer.activation_scaler.scaling_factor = factor  # set, so fit() does not estimate it from the stream
    trainer.fit()  # folds the factor into the weights: the SAE now reads raw activations
    seconds = time.perf_counter() - t0
    sae.save_inference_model(out_dir)
    return Run(arch, "SAELens", out_dir, seconds, trainer.n_training_samples)


@torch.no_grad()
def check_sae_lens_load(run: Run, x: torch.Tensor) -> float:
    """Relative max deviation between saeflow's and SAELens' readings of a SAELens-saved SAE (raises if large)."""
    from sae_lens import SAE

    ours = load_sae(run.sae_dir).eval()
    theirs = SAE.load_from_disk(str(run.sae_dir), device="cpu").eval()
    dev = float((ours.decode(ours.encode(x)) - theirs.decode(theirs.encode(x))).abs().max() / x.norm(dim=1).mean())
    if dev > LOAD_CHECK_TOL:
        raise RuntimeError(f"saeflow reads the SAELens {run.arch} SAE at {run.sae_dir} differently from SAELens "
                           f"(max deviation {dev:.2e} of the mean norm): the comparison would be meaningless")
    return dev


# ---------------------------------------------------------------------------------------- evaluation
@dataclass
class CEEval:
    """The language model, eval tokens and clean/ablated reference shared by every SAE."""

    lm: Any
    hook: str
    tokens: torch.Tensor
    batch_size: int
    ignore: set[int]
    reference: CEReference


def ce_eval(config: PipelineConfig, root: str, store: ActivationStore, batches: int, batch_size: int,
            device: torch.device) -> CEEval:
    """Held-out contexts, hook and ignore ids exactly as ``tasks/metrics.py`` takes them."""
    m = model.ref(cfg=config.model, root=root)
    c = corpus.ref(model=m, cfg=config.corpus, prepend_bos=config.model.prepend_bos, root=root)
    tokens = load_tokens(c)
    train_contexts = int(completion_meta(c.dir)["train_contexts"])
    eval_tokens = torch.from_numpy(tokens[train_contexts:train_contexts + batches * batch_size].astype(np.int64))
    lm = load_model(config.model, require_complete(m), device)
    hook, ignore = store.attrs["hook"], special_token_ids(lm.tokenizer)
    return CEEval(lm, hook, eval_tokens, batch_size, ignore, ce_reference(lm, hook, eval_tokens, batch_size, ignore))


def evaluate(sae: BaseSAE, store: ActivationStore, rows: tuple[int, int], dense_threshold: float,
             ce: CEEval | None, device: torch.device) -> dict[str, Any]:
    rec = reconstruction_metrics(sae, store.iter_rows(*rows, 4096), device, dense_threshold)
    out = {k: v for k, v in rec.items() if isinstance(v, (int, float))}
    if ce is not None:
        out.update(ce_metrics(ce.lm, sae, ce.hook, ce.tokens, ce.batch_size, ce.ignore, reference=ce.reference))
    return out


# ---------------------------------------------------------------------------------------- report
def ratio(ours: float, theirs: float) -> float:
    if theirs == 0:
        return float("nan") if ours == 0 else float("inf")
    return ours / theirs


def fmt(v: float | None, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


def table(runs: list[Run]) -> str:
    lines = ["| architecture | trainer | frac_dead | explained variance | CE loss score | L0 | train wall s | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        m = r.metrics
        lines.append(f"| {r.arch} | {r.side} | {m['frac_dead']:.4f} | {m['explained_variance']:.4f} | "
                     f"{fmt(m.get('ce_loss_score'))} | {m['l0']:.1f} | {r.seconds:,.1f} | {r.tokens_per_s:,.0f} |")
    return "\n".join(lines)


def pairs(runs: list[Run], side: str = "SAELens") -> dict[str, tuple[Run, Run]]:
    """Architecture -> (saeflow's run, ``side``'s run), for the architectures both trained."""
    by = {(r.arch, r.side): r for r in runs}
    return {a: (by[a, "saeflow"], by[a, side]) for a in dict.fromkeys(r.arch for r in runs)
            if (a, "saeflow") in by and (a, side) in by}


def peer_sides(runs: list[Run]) -> list[str]:
    return [s for s in SIDES[1:] if any(r.side == s for r in runs)]


def ev_line(runs: list[Run], side: str = "SAELens") -> str:
    parts = [f"{o.metrics['explained_variance'] - t.metrics['explained_variance']:+.4f} ({a})"
             for a, (o, t) in pairs(runs, side).items()]
    return f"EV difference ours - {side} = " + ", ".join(parts)


def ratio_line(runs: list[Run], side: str = "SAELens") -> str:
    parts = [f"{ratio(o.metrics['frac_dead'], t.metrics['frac_dead']):.3f} ({a})" for a, (o, t) in pairs(runs, side).items()]
    return f"ratio: ours/{side} frac_dead = " + ", ".join(parts)


def summary_lines(runs: list[Run]) -> list[str]:
    """EV difference and frac_dead ratio against every peer side (SAELens' last), then the matched-L0
    comparison and, last, issue #28's acceptance line (:func:`acceptance_lines`)."""
    sides = sorted(peer_sides(runs), key=lambda s: s == "SAELens")
    return [line for s in sides for line in (ev_line(runs, s), ratio_line(runs, s))] + acceptance_lines(runs)


#: Peer runs count as "at matched L0" when their held-out L0 is within this fraction of saeflow's (issue #28).
MATCHED_L0 = 0.10


def acceptance_lines(runs: list[Run]) -> list[str]:
    """Per architecture, the best peer at matched L0 (held-out L0 within :data:`MATCHED_L0` of saeflow's):
    saeflow's EV minus the best peer EV there, and saeflow's dead fraction against the lowest peer dead
    fraction there; peers off the matched L0 are named and left out. Last:
    ``worst dead fraction: X; min EV margin over best peer: Y`` (X over saeflow's runs, Y over the
    architectures with a matched peer; ``n/a`` when none has one)."""
    lines, margins = [], []
    ours = {r.arch: r for r in runs if r.side == "saeflow"}
    for arch, o in ours.items():
        l0 = o.metrics["l0"]
        peers = [r for r in runs if r.arch == arch and r.side != "saeflow"]
        matched = [r for r in peers if l0 > 0 and abs(r.metrics["l0"] / l0 - 1) <= MATCHED_L0]
        off = ", ".join(f"{r.side} (L0 {r.metrics['l0']:.1f})" for r in peers if r not in matched)
        off_text = f"; off the matched L0, left out: {off}" if off else ""
        if not matched:
            lines.append(f"{arch}: saeflow L0 {l0:.1f}, dead {o.metrics['frac_dead']:.4f}; no peer at matched L0{off_text}")
            continue
        best = max(matched, key=lambda r: r.metrics["explained_variance"])
        least_dead = min(r.metrics["frac_dead"] for r in matched)
        margin = o.metrics["explained_variance"] - best.metrics["explained_variance"]
        margins.append(margin)
        lines.append(f"{arch}: saeflow EV {o.metrics['explained_variance']:.4f} (L0 {l0:.1f}) - best peer {best.side} "
                     f"{best.metrics['explained_variance']:.4f} (L0 {best.metrics['l0']:.1f}) = {margin:+.4f}; dead "
                     f"{o.metrics['frac_dead']:.4f} vs lowest peer {least_dead:.4f} "
                     f"({'<=' if o.metrics['frac_dead'] <= least_dead else '>'}){off_text}")
    worst = max(ours.values(), key=lambda r: r.metrics["frac_dead"], default=None)
    worst_text = f"{worst.metrics['frac_dead']:.4f} ({worst.arch})" if worst else "n/a"
    min_margin = f"{min(margins):+.4f}" if margins else "n/a"
    return lines + [f"worst dead fraction: {worst_text}; min EV margin over best peer: {min_margin}"]


def settings(ours_cfg: SAEConfig, train_cfg: TrainConfig, store: ActivationStore, factor: float) -> tuple[str, str]:
    """Human-readable settings of saeflow and SAELens (SAELens' read off its own default config objects)."""
    from sae_lens import __version__
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainerConfig

    o = ours_cfg
    ours = (f"`tasks.train.train_members` with `config.family.base` (b_dec_init {o.b_dec_init}, decoder_init_norm "
            f"{o.decoder_init_norm}, aux_coefficient {o.aux_coefficient}, dead_feature_window {o.dead_feature_window} steps, "
            f"dead_window_fraction {o.dead_window_fraction}, resample_dead_at {list(o.resample_dead_at)}, "
            f"rescale_acts_by_decoder_norm {o.rescale_acts_by_decoder_norm}, normalize_activations "
            f"{o.normalize_activations}) and `config.train` (lr {train_cfg.lr}, warm-up/decay fractions "
            f"{train_cfg.lr_warm_up_fraction}/{train_cfg.lr_decay_fraction}, grad clip {train_cfg.grad_clip}, "
            f"init_sample_rows {train_cfg.init_sample_rows}, checkpoint every {train_cfg.checkpoint_every} steps)")
    d = TopKTrainingSAEConfig(d_in=store.d_model, d_sae=8, k=1)
    t = SAETrainerConfig(total_training_samples=1, train_batch_size_samples=1)
    theirs = (f"SAELens {__version__} `SAETrainer` + `TopKTrainingSAE` / `BatchTopKTrainingSAE` / `MatryoshkaBatchTopK"
              f"TrainingSAE` / `JumpReLUTrainingSAE` (quadratic sparsity loss, target_l0 = k) with SAELens defaults "
              f"(b_dec 0, decoder_init_norm {d.decoder_init_norm}, aux_loss_coefficient {d.aux_loss_coefficient}, "
              f"rescale_acts_by_decoder_norm {d.rescale_acts_by_decoder_norm}, dead_feature_window "
              f"{t.dead_feature_window} steps, lr schedule {t.lr_scheduler_name}, Adam({t.adam_beta1}, {t.adam_beta2}), "
              f"grad clip 1.0), normalize_activations expected_average_only_in with the factor "
              f"{factor:.6g} = sqrt(d_in)/mean||x|| preset (not estimated from 1000 stream batches), folded by "
              f"`fit()`; saved with `save_inference_model` (BatchTopK as jumprelu, threshold = its moving threshold)")
    return ours, theirs


def doc_body(runs: list[Run], command: str, ours: str, theirs: str, train_cfg: TrainConfig, store: ActivationStore,
             rows: tuple[int, int], ce: CEEval | None, width: int, k: int, peers: dict[str, str] | None = None) -> str:
    ce_desc = (f"`ce_metrics` on {ce.tokens.shape[0]} held-out corpus contexts x {ce.tokens.shape[1]} tokens "
               f"({ce.batch_size} per batch), as tasks/metrics.py" if ce is not None else "not measured (`--ce-batches 0`)")
    sides = peer_sides(runs)
    peer_text = "".join(f"\n- {side}: {desc}." for side, desc in (peers or {}).items() if side in sides)
    lens_text = f"\n- SAELens: {theirs}." if "SAELens" in sides else ""
    summary = "\n\n".join(summary_lines(runs))
    return f"""
## SAE quality vs {' / '.join(sides) or 'SAELens'} (`benchmarks/quality.py`)

Command: `{command}`. Machine: {machine()}.

Same activations ({store.attrs.get('model')}, `{store.attrs.get('hook')}`, d_in {store.d_model}), width {width},
k {k}, {n_steps(train_cfg)} steps x batch {train_cfg.batch_size} = {n_steps(train_cfg) * train_cfg.batch_size:,} training
tokens, lr {train_cfg.lr}, the same shuffled batch stream (`ShuffledLoader`, seed {train_cfg.seed}), one run per side
and architecture, float32, {pick_device(train_cfg.device)}.

- saeflow: {ours}.{lens_text}{peer_text}
- Evaluation (identical code for every side, raw activations): `saeflow.metrics.reconstruction_metrics` on the
  {rows[1] - rows[0]:,} held-out rows {rows[0]:,}-{rows[1]:,} of the store (frac_dead = never fires there; EV =
  SAELens' `1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)`; L0 on the same rows; BatchTopK at inference =
  its threshold); CE loss score: {ce_desc}. Wall time = the whole training call per SAE (dictionary_learning /
  sparsify: their training loop in their venv, without imports, export or save).

{table(runs)}

{summary}

Goals: our dead fraction <= 0.25x SAELens', explained variance not lower.
"""


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quick.yaml", help="profile (default configs/quick.yaml)")
    ap.add_argument("--artifacts", default=None, help="artifacts root (default $SAEFLOW_ARTIFACTS or artifacts/)")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=None, help="training tokens (default config.train.training_tokens)")
    ap.add_argument("--eval-rows", type=int, default=50_000, help="minimum held-out rows for frac_dead / EV / L0")
    ap.add_argument("--archs", "--architectures", dest="archs", nargs="+", default=[",".join(DEFAULT_ARCHITECTURES)],
                    help=f"comma- or space-separated, of {', '.join(ARCHITECTURES)} (default topk,batchtopk)")
    ap.add_argument("--peers", default="saelens", help="comma-separated sides to compare with saeflow, of "
                    f"{', '.join(_peers.SIDE_NAMES)} (default saelens)")
    ap.add_argument("--dl-l1-penalty", type=float, default=None,
                    help="dictionary_learning relu: l1_penalty (default the package's, 0.1; its L0 is not matched)")
    ap.add_argument("--ce-batches", type=int, default=None, help="CE batches (default config.metrics.ce_batches; 0 skips CE)")
    ap.add_argument("--ce-batch-size", type=int, default=None, help="contexts per CE batch (default config.metrics.ce_batch_size)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args(argv)
    args.architectures = list(dict.fromkeys(a.strip() for v in args.archs for a in v.split(",") if a.strip()))
    bad = [a for a in args.architectures if a not in ARCHITECTURES]
    if bad or not args.architectures:
        ap.error(f"--archs: unknown {bad}; choose from {', '.join(ARCHITECTURES)}")
    try:
        args.peers = _peers.parse_peers(args.peers)
        for peer in args.peers:
            if peer != "saelens":
                _peers.peer_python(peer)
    except (ValueError, _peers.PeerUnavailable) as exc:
        ap.error(str(exc))
    return args


def implements(side: str, arch: str) -> bool:
    return arch in (SAE_LENS_ARCHITECTURES if side == "saelens" else _peers.PEER_ARCHS[side])


def train_peer(peer: str, arch: str, cfg: SAEConfig, store: ActivationStore, train_cfg: TrainConfig, factor: float,
               stream: Path, out_dir: Path, l1_penalty: float | None, probe: Path) -> tuple[Run, dict[str, Any]]:
    """``peer``'s own trainer (its venv, benchmarks/peer_train.py) on the exported stream, converted to SAELens layout."""
    res = _peers.train_peer(peer, arch, stream, store.d_model, cfg.width, cfg.k, train_cfg.lr, train_cfg.batch_size,
                            n_steps(train_cfg), train_cfg.seed, factor, store.attrs["hook"], out_dir,
                            model_name=store.attrs.get("model"), l1_penalty=l1_penalty,
                            matryoshka_widths=cfg.effective_matryoshka_widths() if arch == "matryoshka" else None,
                            probe=probe)
    return Run(arch, _peers.SIDE_NAMES[peer], res.sae_dir, res.seconds, res.rows), res.info


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_profile(args.config)
    root = resolve_root(args.artifacts)
    acts, store = open_store(config, root, args.config)
    rows = held_out_range(store, args.eval_rows)
    train_cfg = bench_train_config(config, args.tokens)
    if n_steps(train_cfg) < 1:
        sys.exit(f"--tokens {train_cfg.training_tokens} is below one batch ({train_cfg.batch_size})")
    device = pick_device(train_cfg.device)
    factor = scaling_factor(store)
    ce_batches = config.metrics.ce_batches if args.ce_batches is None else args.ce_batches
    ce_batch_size = args.ce_batch_size or config.metrics.ce_batch_size
    scratch = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    runs: list[Run] = []
    peer_infos: dict[str, list[dict[str, Any]]] = {}
    stream: Path | None = None
    try:
        ours_cfgs = {a: our_sae_config(config, a, args.width, args.k) for a in args.architectures}
        for arch in args.architectures:
            print(f"training {arch} width {args.width} k {args.k}: saeflow ...", flush=True)
            runs.append(train_ours(acts, ours_cfgs[arch], train_cfg, scratch / "artifacts", str(device)))
            print(f"  saeflow {runs[-1].seconds:,.1f} s", flush=True)
            for peer in args.peers:
                if not implements(peer, arch):
                    print(f"  {_peers.SIDE_NAMES[peer]} has no {arch} trainer here: not compared", flush=True)
                    continue
                print(f"  {_peers.SIDE_NAMES[peer]} ...", flush=True)
                if peer == "saelens":
                    runs.append(train_sae_lens(arch, args.width, args.k, store, train_cfg, factor, device,
                                               scratch / f"sae_lens-{arch}", ours_cfgs[arch].effective_matryoshka_widths()
                                               if arch == "matryoshka" else None))
                else:
                    if stream is None:
                        print(f"  exporting the stream ({n_steps(train_cfg) * train_cfg.batch_size:,} normalised rows)",
                              flush=True)
                        stream = _peers.export_stream(store, train_cfg.batch_size, train_cfg.seed, train_cfg.buffer_chunks,
                                                      n_steps(train_cfg), factor, scratch / "stream.npy")
                        np.save(scratch / "probe.npy", store.read(rows[0], min(rows[1], rows[0] + 256)).astype(np.float32))
                    run, info = train_peer(peer, arch, ours_cfgs[arch], store, train_cfg, factor, stream,
                                           scratch / f"{peer}-{arch}", args.dl_l1_penalty, scratch / "probe.npy")
                    runs.append(run)
                    peer_infos.setdefault(run.side, []).append(info)
                print(f"  {runs[-1].side} {runs[-1].seconds:,.1f} s", flush=True)
        probe = next(iter(store.iter_rows(rows[0], min(rows[1], rows[0] + 1024), 1024)))
        for r in runs:
            if r.side == "SAELens":
                print(f"{r.arch}: saeflow reads the SAELens-saved SAE like SAELens does (max deviation "
                      f"{check_sae_lens_load(r, probe):.1e} of the mean norm)", flush=True)
        for side, infos in peer_infos.items():
            for info in infos:
                print(f"{info['arch']}: saeflow reads the converted {side} SAE like {side} does (deviation "
                      f"{info['load_deviation']:.1e} of the mean norm, 99% of the rows)", flush=True)
        ce = ce_eval(config, root, store, ce_batches, ce_batch_size, device) if ce_batches > 0 else None
        for r in runs:
            r.metrics = evaluate(load_sae(r.sae_dir, device=device), store, rows, config.metrics.dense_threshold, ce, device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    command = " ".join([".venv/bin/python benchmarks/quality.py", *sys.argv[1:]])
    ours, theirs = settings(ours_cfgs[args.architectures[0]], train_cfg, store, factor)
    print(f"\nheld-out rows {rows[0]:,}-{rows[1]:,} ({rows[1] - rows[0]:,}); {n_steps(train_cfg)} steps x "
          f"{train_cfg.batch_size}; normalisation factor {factor:.6g}\n")
    print(table(runs))
    if not args.no_write:
        peers = {side: _peers.describe(side, infos) for side, infos in peer_infos.items()}
        write_section("quality", doc_body(runs, command, ours, theirs, train_cfg, store, rows, ce, args.width, args.k,
                                          peers))
        print("\nwrote the quality section of docs/benchmarks.md")
    for line in summary_lines(runs):
        print(line)


if __name__ == "__main__":
    main()
