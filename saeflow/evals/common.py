"""What the evaluations share."""

from __future__ import annotations

import json
import math
import pkgutil
import warnings
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saeflow.saes import K_ARCHITECTURES, REGISTRY, SAE_CFG_FILENAME, SAEConfig, describe_sae
from saeflow.saes.base import encode_block_rows, fits_dense
from saeflow.saes.saelens_format import FOREIGN_ARCHITECTURES
from saeflow.store import ActivationStore


class EvalInputError(ValueError):
    """Input an evaluation cannot work with (an activation store without held-out rows, ...); the
    evaluations' own error classes derive from it."""


# ------------------------------------------------------------------------ SAE info (cfg.json)
@dataclass(frozen=True)
class SAEInfo:
    """What an evaluation needs to know about one evaluated SAE, read from its ``cfg.json`` (no weights).

    ``sparsity`` is the sparsity setting the file states (``k``, or the L1 / L0 coefficient of a
    saeflow-trained SAE; ``None`` when a foreign file does not say). ``description`` is
    :func:`~saeflow.config.describe_sae` of the config the SAE loads with.
    """

    index: int
    architecture: str
    width: int
    d_in: int
    sparsity: float | None
    hook: str | None
    model: str | None
    path: str = ""
    description: str = ""
    target_l0: float | None = None
    """The L0 a ``relu`` / ``jumprelu`` SAE was trained to (``target_l0``), else ``None``."""
    name: str | None = None
    """The name an imported SAE was given (``import_saes``: its ``name``, or ``<release>/<id>`` for a
    published one; ``metadata.saeflow_source.label`` of its ``cfg.json``); ``None`` for the rest."""

    @property
    def label(self) -> str:
        """Short label with the SAE's position among the evaluated ones: ``#2 topk w=128 k=8``
        (``#3 gemma-scope-2-270m-pt-res-all/layer_6_width_16k_l0_small`` for a named import)."""
        if self.name:
            return f"#{self.index} {self.name}"
        s = "" if self.sparsity is None else (f" k={int(self.sparsity)}" if self.architecture in K_ARCHITECTURES
                                               else f" c={self.sparsity:g}")
        if self.target_l0 is not None:
            s += f" l0t={self.target_l0:g}"
        return f"#{self.index} {self.architecture} w={self.width}{s}"


def sae_info(index: int, cfg_json: dict[str, Any], path: str = "") -> SAEInfo:
    """:class:`SAEInfo` of an SAE folder's parsed ``cfg.json`` (saeflow-written or SAELens)."""
    ours = (cfg_json.get("saeflow") or {}).get("sae_config")
    meta = cfg_json.get("metadata") or {}
    cfg: SAEConfig | None
    target: float | None = None
    if ours:
        cfg = SAEConfig.model_validate(ours)
        arch = cfg.architecture
        sparsity: float | None = (float(cfg.k) if arch in K_ARCHITECTURES else
                                  cfg.l1_coefficient if arch == "relu" else cfg.l0_coefficient if arch == "jumprelu" else None)
        target = cfg.target_l0
    else:  # foreign: the architecture the loader maps it to, the config it loads with
        arch = FOREIGN_ARCHITECTURES.get(str(cfg_json.get("architecture")), str(cfg_json.get("architecture")))
        sparsity = float(cfg_json["k"]) if cfg_json.get("k") is not None else None
        cfg = REGISTRY[arch].config_from_sae_lens(cfg_json) if arch in REGISTRY else None
    return SAEInfo(index=index, architecture=arch, width=int(cfg_json["d_sae"]), d_in=int(cfg_json["d_in"]),
                   sparsity=sparsity, hook=meta.get("hook_name"), model=meta.get("model_name"), path=path,
                   description=describe_sae(cfg) if cfg is not None else arch, target_l0=target,
                   name=(meta.get("saeflow_source") or {}).get("label"))


def read_sae_info(folder: str | Path, index: int = 0) -> SAEInfo:
    """:func:`sae_info` of the SAE folder ``folder`` (its ``cfg.json``)."""
    return sae_info(index, json.loads((Path(folder) / SAE_CFG_FILENAME).read_text()), str(folder))


# ------------------------------------------------------------------------ activation-store rows
def heldout_rows(store: ActivationStore, n_tokens: int) -> tuple[int, int]:
    """``(start, end)``: the first ``n_tokens`` held-out rows of the store (from ``train_rows`` on;
    fewer when the store holds fewer). Raises :class:`EvalInputError` when it holds none."""
    start, end = store.train_rows, min(store.n_rows, store.train_rows + n_tokens)
    if end <= start:
        raise EvalInputError(f"activation store at {store.root} has no held-out rows; raise corpus.eval_contexts")
    return start, end


def sample_store_rows(n_rows: int, n_sample: int, seed: int, block: int = 512) -> list[tuple[int, int]]:
    """Seeded random, disjoint, sorted ``[start, end)`` blocks of store rows totalling <= ``n_sample`` rows.

    Blocks of contiguous rows keep Zarr reads cheap (each touches at most two chunks).
    """
    if n_rows <= n_sample:
        return [(0, n_rows)] if n_rows else []
    n_blocks_total = n_rows // block
    want = max(1, n_sample // block)
    if n_blocks_total <= want:
        return [(0, min(n_rows, n_sample))]
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n_blocks_total, size=want, replace=False))
    return [(int(b) * block, int(b) * block + block) for b in chosen]


#: Per-row metadata of an activation store read by :func:`read_row_blocks`.
ROW_META = ("token_ids", "positions", "context")


def read_row_blocks(store: ActivationStore, blocks: list[tuple[int, int]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The activations of the row ``blocks`` (``[start, end)`` pairs, e.g. from :func:`sample_store_rows`),
    concatenated, and their :data:`ROW_META` columns (token id, position, context index)."""
    xs = [store.read(a, b) for a, b in blocks]
    meta = {name: np.concatenate([store.read_rows(name, a, b) for a, b in blocks]) for name in ROW_META}
    return np.concatenate(xs), meta


# ------------------------------------------------------------------------ convergence records
def step_at_90pct(total_steps: int) -> int:
    """The step after which 90% of ``total_steps`` optimiser steps are done: ``floor(0.9 * total)``
    (0 for a single step: the convergence check then compares the initial and the final loss)."""
    return (9 * int(total_steps)) // 10


def convergence_record(loss_at_90pct: float, final_loss: float, tol: float, eps: float = 1e-12) -> dict[str, Any]:
    """The convergence check of an optimisation inside an evaluation (issue #25).

    ``rel_change_last10 = |L(90%) - L(end)| / max(|L(end)|, eps)``: the relative change of the loss
    over the last 10% of the steps; ``converged`` when it is below ``tol`` (``False`` when either
    loss is not finite). Returns ``final_loss``, ``loss_at_90pct``, ``rel_change_last10``,
    ``converged`` and ``convergence_tol``, the fields an evaluation stores in its artifact.
    """
    a, b = float(loss_at_90pct), float(final_loss)
    rel = abs(a - b) / max(abs(b), eps) if math.isfinite(a) and math.isfinite(b) else float("nan")
    return {"final_loss": b, "loss_at_90pct": a, "rel_change_last10": rel,
            "converged": bool(math.isfinite(rel) and rel < tol), "convergence_tol": float(tol)}


#: The convergence columns a probe's metrics carry (:meth:`FitLog.columns`).
CONVERGENCE_COLUMNS: tuple[str, ...] = ("converged", "n_iter", "n_fits", "n_fits_not_converged")


class FitLog:
    """The convergence of the iterative solver fits behind one probe result (issue #25).

    :meth:`fit` fits an estimator with ``max_iter`` / ``n_iter_`` (logistic regression, MLP),
    catching scikit-learn's ``ConvergenceWarning`` (recorded, not shown; other warnings are shown as
    usual); a fit is not converged when it warned or reached ``max_iter``. Every fit counts (the
    validation search's and the final one).
    """

    def __init__(self) -> None:
        self.n_fits = self.n_not_converged = 0
        self.n_iter: int | None = None

    def fit(self, estimator, X: np.ndarray, y: np.ndarray):
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            estimator.fit(X, y)
        warned = False
        for w in caught:
            if issubclass(w.category, ConvergenceWarning):
                warned = True
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        self.n_iter = int(np.max(estimator.n_iter_))
        self.n_fits += 1
        self.n_not_converged += int(warned or self.n_iter >= estimator.max_iter)
        return estimator

    def columns(self) -> dict[str, bool | int | None]:
        """``converged`` (every fit converged), ``n_iter`` (iterations of the last fit: the final
        model's), ``n_fits``, ``n_fits_not_converged``; ``None`` values when nothing was fitted."""
        if not self.n_fits:
            return dict.fromkeys(CONVERGENCE_COLUMNS)
        return {"converged": self.n_not_converged == 0, "n_iter": self.n_iter, "n_fits": self.n_fits,
                "n_fits_not_converged": self.n_not_converged}


# ------------------------------------------------------------------------ absorption and probing
def package_modules(package: str) -> tuple[str, ...]:
    """``package`` and every module in it (sorted): what an evaluation's code version hashes, so an
    edit in any module of its subpackage gives its stages new fingerprints."""
    path = import_module(package).__path__
    return (package, *sorted(f"{package}.{m.name}" for m in pkgutil.iter_modules(path)))


@torch.no_grad()
def encode_rows(sae: Any, x: Tensor | np.ndarray, batch_size: int) -> Tensor:
    """``sae.encode`` over the rows of ``x`` in batches of ``batch_size``, on the SAE's device:
    ``[n, d_sae]`` float32 on the CPU."""
    dev = sae.W_dec.device
    x = torch.as_tensor(x)
    parts = [sae.encode(x[s:s + batch_size].to(dev, torch.float32)).float().cpu()
             for s in range(0, x.shape[0], batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, sae.W_dec.shape[0])


@torch.no_grad()
def encode_rows_csr(sae: Any, x: Tensor | np.ndarray, batch_size: int) -> "scipy.sparse.csr_matrix":
    """:func:`encode_rows` kept sparse: a ``scipy.sparse`` CSR matrix ``[n, d_sae]`` (float32) of the
    same values, encoding row blocks of at most ``batch_size`` rows
    (:func:`saeflow.saes.base.encode_block_rows`), so memory grows with the active latents, not
    with rows x width."""
    import scipy.sparse as sp

    width = int(sae.W_dec.shape[0])
    step = encode_block_rows(width, batch_size)
    dev = sae.W_dec.device
    x = torch.as_tensor(x)
    parts = []
    for s in range(0, x.shape[0], step):
        f = sae.encode(x[s:s + step].to(dev, torch.float32)).float().cpu().numpy()
        parts.append(sp.csr_matrix(f))
    return sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, width), dtype=np.float32)


def encode_latents(sae: Any, x: Tensor | np.ndarray, batch_size: int) -> Any:
    """The latents of the rows ``x``: :func:`encode_rows` (a dense float32 tensor) while they fit one
    encode block (:func:`saeflow.saes.base.fits_dense`), else :func:`encode_rows_csr` (a
    ``scipy.sparse`` CSR matrix: a wide SAE's encodings, issue #27). Read them with
    :func:`latent_rows` / :func:`latent_columns`, which take either."""
    if fits_dense(int(x.shape[0]), int(sae.W_dec.shape[0])):
        return encode_rows(sae, x, batch_size)
    return encode_rows_csr(sae, x, batch_size)


def latent_rows(f: Any, rows: Any) -> Tensor:
    """Rows ``rows`` of latents from :func:`encode_latents` as a dense float32 tensor ``[len(rows), width]``."""
    idx = np.asarray(rows, dtype=np.int64).reshape(-1)
    if hasattr(f, "tocsr"):
        return torch.from_numpy(np.asarray(f[idx].toarray(), dtype=np.float32))
    return f[torch.from_numpy(idx)]


def latent_columns(f: Any, cols: Any) -> np.ndarray:
    """Columns ``cols`` (latents) of latents from :func:`encode_latents` as a dense float64 array ``[rows, len(cols)]``."""
    idx = np.asarray(cols, dtype=np.int64).reshape(-1)
    if hasattr(f, "tocsr"):
        return np.asarray(f[:, idx].toarray(), dtype=np.float64)
    return f[:, torch.from_numpy(idx)].numpy().astype(np.float64)


def sae_identity(sae_dir: str | Path) -> dict[str, Any]:
    """``{"architecture", "width", "k"}`` of an SAE folder (a results-table identity) from its
    :func:`read_sae_info`: ``k`` for a k-based architecture, else ``None``; plus ``name`` for an
    imported SAE that has one."""
    info = read_sae_info(sae_dir)
    k = int(info.sparsity) if info.architecture in K_ARCHITECTURES and info.sparsity is not None else None
    ident: dict[str, Any] = {"architecture": info.architecture, "width": info.width, "k": k}
    if info.name:
        ident["name"] = info.name
    return ident
