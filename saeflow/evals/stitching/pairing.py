"""Which SAEs are stitched: the (smaller, larger) pairs of the evaluated SAEs, validated."""

from __future__ import annotations

from collections.abc import Sequence

from saeflow.evals.common import EvalInputError, SAEInfo
from saeflow.evals.stitching.config import StitchingConfig

__all__ = ["StitchingError", "check_pair", "find_pairs", "adjacent_pair_for"]


class StitchingError(EvalInputError):
    """SAEs that cannot be stitched (other hook / model / width, not larger, ...)."""


def check_pair(s: SAEInfo, l: SAEInfo) -> None:
    """Raise :class:`StitchingError` unless ``l`` can be stitched onto ``s`` (``s`` strictly smaller)."""
    where = f"stitching pair (smaller {s.label} at {s.path or '?'}, larger {l.label} at {l.path or '?'})"
    if s.hook and l.hook and s.hook != l.hook:
        raise StitchingError(f"{where}: the SAEs read different hooks ({s.hook} vs {l.hook}); stitch only SAEs "
                             "trained on the same hook")
    if s.model and l.model and s.model != l.model:
        raise StitchingError(f"{where}: the SAEs belong to different models ({s.model} vs {l.model}); stitch only "
                             "SAEs of the same model")
    if s.d_in != l.d_in:
        raise StitchingError(f"{where}: d_in differs ({s.d_in} vs {l.d_in}); the SAEs cannot read the same activations")
    if l.width <= s.width:
        raise StitchingError(f"{where}: the 'larger' SAE has {l.width} latents, not more than the smaller one's "
                             f"{s.width}; list pairs as [smaller, larger]")


def find_pairs(infos: Sequence[SAEInfo], cfg: StitchingConfig) -> list[tuple[int, int]]:
    """The (smaller, larger) index pairs to stitch, validated (see :class:`StitchingConfig`).

    Explicit ``cfg.pairs`` are checked (index range, same hook / model / d_in, larger really
    larger) and returned as given. Otherwise every pair of SAEs on the same hook and model with the
    same architecture (and sparsity setting, unless ``pair_across_sparsity``) and width_S < width_L,
    ordered by (architecture, sparsity, widths); ``adjacent_only`` keeps for each L only the S of
    the largest smaller width.
    """
    by_index = {i.index: i for i in infos}
    if cfg.pairs is not None:
        out = []
        for s, l in cfg.pairs:
            for x in (s, l):
                if x not in by_index:
                    raise StitchingError(f"stitching.pairs names SAE #{x}, but only {len(infos)} SAEs are evaluated "
                                         f"(indices 0..{len(infos) - 1}: the family's members, then import_saes)")
            check_pair(by_index[s], by_index[l])
            out.append((int(s), int(l)))
        return out
    pairs: list[tuple[int, int]] = []
    for l in infos:
        cands = [s for s in infos if s.index != l.index and s.architecture == l.architecture and s.width < l.width
                 and s.d_in == l.d_in and s.hook == l.hook and s.model == l.model
                 and (cfg.pair_across_sparsity or s.sparsity == l.sparsity)]
        if cfg.adjacent_only and cands:
            w = max(s.width for s in cands)
            cands = [s for s in cands if s.width == w]
            same = [s for s in cands if s.sparsity == l.sparsity]
            cands = same[:1] if same else cands[:1]
        pairs += [(s.index, l.index) for s in cands]
    key = {i.index: (i.architecture, i.sparsity if i.sparsity is not None else -1.0, i.width, i.index) for i in infos}
    return sorted(pairs, key=lambda p: (key[p[1]][:2], key[p[0]][2], key[p[1]][2], p))


def adjacent_pair_for(large: int, pairs: Sequence[tuple[int, int]], infos: Sequence[SAEInfo]) -> tuple[int, int] | None:
    """The pair whose larger SAE is ``large`` and whose smaller one is the widest (same sparsity first)."""
    by_index = {i.index: i for i in infos}
    cands = [p for p in pairs if p[1] == large]
    if not cands:
        return None
    lw = by_index[large]
    return max(cands, key=lambda p: (by_index[p[0]].width, by_index[p[0]].sparsity == lw.sparsity, -p[0]))
