"""Result tables: pandas frames written as parquet + markdown."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from saeflow.saes import K_ARCHITECTURES

CORE_COLUMNS = [
    "l0", "explained_variance", "explained_variance_legacy", "mse", "cossim", "l1", "l2_ratio",
    "relative_reconstruction_bias", "ce_clean", "ce_with_sae", "ce_with_ablation", "ce_loss_score", "ce_delta",
    "kl_with_sae", "kl_with_ablation", "kl_div_score", "frac_alive", "frac_dead", "frac_dense",
    "freq_over_1_percent", "freq_over_10_percent", "average_max_decoder_cosine_sim",
    "average_max_encoder_cosine_sim", "n_tokens",
]


_COEFFICIENT = {"relu": "l1_coefficient", "jumprelu": "l0_coefficient"}


def _finite(x: Any) -> bool:
    try:
        return x is not None and x is not pd.NA and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def sae_name(architecture: Any, width: Any, k: Any = None, coefficient: Any = None, target_l0: Any = None) -> str:
    """The results table's name of an SAE: ``topk-w4096-k32`` (architecture, width, ``k`` when it has
    one, else ``-l0t<target>`` when it trained to a target L0, else ``-c<coefficient>`` when it has a
    sparsity coefficient)."""
    name = f"{architecture or 'sae'}" + (f"-w{int(width)}" if _finite(width) else "")
    if _finite(k):
        return name + f"-k{int(k)}"
    if _finite(target_l0):
        return name + f"-l0t{float(target_l0):g}"
    return name + (f"-c{float(coefficient):g}" if _finite(coefficient) else "")


def core_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per SAE: identity columns, then every scalar core metric.

    Identity: ``sae`` (its name, :func:`sae_name`), ``architecture``, ``width``, ``k`` (TopK /
    BatchTopK / Matryoshka, else empty), ``coefficient`` (the sparsity coefficient:
    ``l1_coefficient`` for ``relu``, ``l0_coefficient`` for ``jumprelu``, else empty; with a target
    L0, the L1 coefficient the controller started from), ``target_l0`` (relu / jumprelu trained to
    an L0, else empty), ``sae_fingerprint`` and ``published`` (imported from a SAELens release). An imported SAE with
    a name (``import_saes``: ``name``, or ``<release>/<id>``) is listed under it.
    """
    records = []
    for r in rows:
        sae = r["sae"]
        arch = sae.get("architecture")
        coef = _COEFFICIENT.get(arch)
        k, c = sae.get("k") if arch in K_ARCHITECTURES else None, sae.get(coef) if coef else None
        t = sae.get("target_l0") if coef else None
        name = sae.get("label") or sae_name(arch, sae.get("width"), k, c, t)
        rec = {"profile": r["profile"], "model": r["model"], "hook": r["hook"], "sae": name,
               "architecture": arch, "width": sae.get("width"), "k": k, "coefficient": c, "target_l0": t,
               "sae_fingerprint": r["sae_fingerprint"], "published": bool(sae.get("published"))}
        metrics = r["metrics"]
        rec.update({c: metrics.get(c) for c in CORE_COLUMNS})
        rec.update({k: v for k, v in metrics.items() if k not in rec and isinstance(v, (int, float))})
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    if len(df):
        df["k"] = df["k"].astype("Int64")
        df["coefficient"] = df["coefficient"].astype("Float64")
        df["target_l0"] = df["target_l0"].astype("Float64")
    return df


def write_table(df: pd.DataFrame, folder: str | Path, name: str) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pq, md = folder / f"{name}.parquet", folder / f"{name}.md"
    df.to_parquet(pq, index=False)
    md.write_text(df.to_markdown(index=False, floatfmt=".4g") + "\n")
    return [pq, md]
