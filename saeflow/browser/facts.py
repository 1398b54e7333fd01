"""What the evaluations found about each latent, read from their artifact folders.

Every reader returns ``{latent: [Fact, ...]}`` for one SAE; :func:`join` merges them. A fact is a
short text with optional links to latents of this or another SAE in the browser (``(sae_key,
latent)``), plus a short tag for the latent table (e.g. ``absorbs:b``, ``novel``, ``split:a``).

- absorption (``absorption/<fp>/``): ``letters.parquet`` ``split_feats`` (the letter's main /
  split latents), ``prompts.parquet`` ``absorbing`` (latents absorbing the letter on a word, by
  projection) and ``ablation.parquet`` (the paper's ablation absorptions: ``top_latents[0]``).
- stitching (``stitching-pair/<fp>/``): ``latents.parquet`` classifies each latent of the larger SAE
  (``novel`` / ``reconstruction`` / ``inactive``) with its best match in the smaller one;
  ``summary.json`` names the two SAEs by index.
- meta-SAE (``meta_sae/<fp>/decomposition.parquet``): each latent's meta-latents and weights; the
  other members of a meta-latent are the latents whose decomposition uses it.
- probing (``probing-sae/<fp>/rows.parquet``): the latents each top-k SAE probe of the normal
  regime used (``latents``, best first) with the probe's test AUC, per dataset.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class Fact:
    evaluation: str
    text: str
    tag: str = ""
    links: tuple[tuple[int, int], ...] = ()
    """``(sae index, latent)`` of related latents (shown after the text)."""


Facts = dict[int, list[Fact]]


@dataclass
class FactSources:
    """Where one SAE's evaluation outputs are (``None``: the evaluation did not run on it)."""

    absorption: Path | None = None
    stitching_pairs: list[Path] = field(default_factory=list)
    """``stitching-pair`` folders this SAE is part of (as the smaller or the larger SAE)."""
    meta_sae: Path | None = None
    probing: Path | None = None


def _words(words: list[str], n: int = 6) -> str:
    shown = ", ".join(repr(w) for w in words[:n])
    return shown + (f" (+{len(words) - n} more)" if len(words) > n else "")


def absorption_facts(folder: Path) -> Facts:
    out: Facts = defaultdict(list)
    letters = pd.read_parquet(folder / "letters.parquet")
    for row in letters.itertuples():
        for j in row.split_feats:
            out[int(j)].append(Fact("absorption", f"main latent of letter '{row.letter}' (k-sparse probe, "
                                                  f"{row.num_split_feats} split latent(s))", f"letter:{row.letter}"))
    absorbed: dict[tuple[int, str], list[str]] = defaultdict(list)
    prompts = folder / "prompts.parquet"
    if prompts.is_file():
        for row in pd.read_parquet(prompts, columns=["letter", "word", "absorbing"]).itertuples():
            for j in row.absorbing:
                absorbed[(int(j), row.letter)].append(str(row.word))
    for (j, letter), words in sorted(absorbed.items()):
        out[j].append(Fact("absorption", f"absorbs letter '{letter}' (projection) on {len(words)} word(s): "
                                         f"{_words(words)}", f"absorbs:{letter}"))
    ablation = folder / "ablation.parquet"
    if ablation.is_file():
        abl = pd.read_parquet(ablation)
        for row in abl[abl["is_absorption"]].itertuples():
            out[int(row.top_latents[0])].append(Fact("absorption", f"absorbs letter '{row.letter}' on {row.word!r} "
                                                                   "(ablation: largest attribution)", f"absorbs:{row.letter}"))
    return dict(out)


def stitching_facts(pair: Path, me: int) -> Facts:
    """Facts for SAE number ``me`` from one pair folder (it is that pair's smaller or larger SAE)."""
    info = json.loads((pair / "summary.json").read_text())
    small, large = int(info["small_index"]), int(info["large_index"])
    lat = pd.read_parquet(pair / "latents.parquet")
    out: Facts = defaultdict(list)
    rows = lat.to_dict("records")
    if me == large:
        for row in rows:
            out[int(row["latent"])].append(Fact(
                "stitching", f"{row['class']} against {info['small']} (best decoder match: latent {row['match']}, "
                             f"cosine {row['max_cos']:.2f}; fired {row['fires']} times)",
                str(row["class"]), ((small, int(row["match"])),)))
    elif me == small:
        by_match: dict[int, list[int]] = defaultdict(list)
        for row in rows:
            if row["class"] == "reconstruction":
                by_match[int(row["match"])].append(int(row["latent"]))
        for j, members in by_match.items():
            out[j].append(Fact("stitching", f"best match of {len(members)} reconstruction latent(s) of {info['large']}",
                               "", tuple((large, m) for m in members[:8])))
    return dict(out)


def meta_sae_facts(folder: Path, me: int, n_members: int = 8) -> Facts:
    dec = pd.read_parquet(folder / "decomposition.parquet")
    metas = sorted(c for c in dec.columns if c.startswith("meta_"))
    meta = dec[metas].to_numpy()
    weight = dec[[c.replace("meta_", "weight_") for c in metas]].to_numpy()
    latents = dec["latent"].to_numpy()
    members: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for j, ms, ws in zip(latents, meta, weight):
        for m, w in zip(ms, ws):
            if m >= 0:
                members[int(m)].append((float(w), int(j)))
    ranked = {m: [o for _, o in sorted(v, reverse=True)] for m, v in members.items()}  # once per meta-latent
    out: Facts = {}
    for j, ms, ws, cos in zip(latents, meta, weight, dec["recon_cos"].to_numpy()):
        facts = []
        for m, w in sorted(((int(m), float(w)) for m, w in zip(ms, ws) if m >= 0), key=lambda p: -p[1]):
            first = [o for o in ranked[m][:n_members + 1] if o != j][:n_members]  # j is a member once
            n_others = len(ranked[m]) - 1
            facts.append(Fact("meta_sae", f"meta-latent M{m} (weight {w:.2f}; {n_others} other member(s))",
                              f"M{m}", tuple((me, o) for o in first)))
        if facts:
            facts.insert(0, Fact("meta_sae", f"decomposed into {len(facts)} meta-latent(s), "
                                             f"reconstruction cosine {cos:.2f}", f"meta:{len(facts)}"))
        out[int(j)] = facts
    return out


def probing_facts(folder: Path, regime: str = "normal") -> Facts:
    """The datasets whose top-k SAE probe (``regime``) used each latent, smallest k first. A
    ``rows.parquet`` written before probes recorded their latents gives no facts."""
    rows = pd.read_parquet(folder / "rows.parquet")
    if "latents" not in rows.columns:
        return {}
    rows = rows[(rows["regime"] == regime) & rows["latents"].notna()].sort_values(["dataset", "k"])
    out: Facts = defaultdict(list)
    seen: set[tuple[int, str]] = set()
    for row in rows.itertuples():
        for rank, j in enumerate(int(x) for x in str(row.latents).split()):
            if (j, row.dataset) in seen:
                continue  # reported at its smallest k
            seen.add((j, row.dataset))
            out[j].append(Fact("probing", f"picked by the top-{int(row.k)} probe of {row.dataset} ({regime} regime; "
                                          f"rank {rank + 1}, probe test AUC {row.test_auc:.3f})", "probe"))
    return dict(out)


def join(sources: FactSources, me: int) -> Facts:
    """Every fact about SAE number ``me`` (its index among the browsed SAEs)."""
    parts: list[Facts] = []
    if sources.absorption is not None:
        parts.append(absorption_facts(sources.absorption))
    for pair in sources.stitching_pairs:
        parts.append(stitching_facts(pair, me))
    if sources.meta_sae is not None:
        parts.append(meta_sae_facts(sources.meta_sae, me))
    if sources.probing is not None:
        parts.append(probing_facts(sources.probing))
    out: Facts = defaultdict(list)
    for part in parts:
        for j, facts in part.items():
            out[j].extend(facts)
    return dict(out)


def tags(facts: list[Fact]) -> list[str]:
    """The facts' distinct table tags, in order."""
    return list(dict.fromkeys(f.tag for f in facts if f.tag))
