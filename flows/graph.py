"""The pipeline's stage graph, stated once: each stage, what kind it is and the stages it reads.

:func:`flows.pipeline.pipeline` runs these stages (its ``cached`` report names them, in this
order); tests/test_pipeline.py checks the list against a run and against the ``ref`` functions of
``tasks/`` (which name the artifacts a stage reads), so the picture cannot drift from the code.

Draw it (docs/architecture.png)::

    python -m flows.graph --png docs/architecture.png
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str
    """``core`` (cached once per profile), ``per-sae`` (one artifact per SAE), ``evaluation`` (a
    group of stages run when the profile enables it), ``output``."""
    upstream: tuple[str, ...]
    what: str


#: Every stage in the order the pipeline runs (and reports) them.
STAGES: tuple[Stage, ...] = (
    Stage("model", "core", (), "packaged LM, saved once"),
    Stage("vocab", "core", ("model",), "alphabetic tokens"),
    Stage("corpus", "core", ("model",), "tokenized contexts"),
    Stage("activations", "core", ("model", "corpus"), "Zarr store at the hook"),
    Stage("train", "core", ("activations",), "the SAE family, one pass"),
    Stage("imported", "per-sae", ("activations",), "SAELens folders copied in"),
    Stage("metrics", "per-sae", ("model", "corpus", "activations", "train", "imported"), "L0, EV, CE loss, density"),
    Stage("browser", "per-sae", ("model", "activations", "train", "imported"), "contexts per latent"),
    Stage("absorption", "evaluation", ("model", "vocab", "train", "imported"), "feature absorption"),
    Stage("stitching", "evaluation", ("model", "corpus", "activations", "train", "imported"), "SAE stitching"),
    Stage("meta_sae", "evaluation", ("model", "corpus", "activations", "train", "imported"), "meta-SAEs"),
    Stage("probing", "evaluation", ("model", "train", "imported"), "sparse probing"),
    Stage("results", "output", ("train", "imported", "metrics", "absorption", "stitching", "meta_sae", "probing"),
          "tables + plots"),
    Stage("site", "output", ("browser", "absorption", "stitching", "meta_sae", "results"), "latent browser pages"),
    Stage("report", "output", ("results", "site"), "one HTML file"),
)

BY_NAME = {s.name: s for s in STAGES}
EVALUATION_STAGES = tuple(s.name for s in STAGES if s.kind == "evaluation")
COLORS = {"core": "#cfe3f7", "per-sae": "#d9f0d3", "evaluation": "#fde0c5", "output": "#e6e0f2"}


def depths() -> dict[str, int]:
    """Column of each stage: the longest path from a stage without inputs."""
    out: dict[str, int] = {}
    for s in STAGES:  # upstream stages come first in STAGES
        out[s.name] = 1 + max((out[u] for u in s.upstream), default=-1)
    return out


def draw(path: str | Path) -> Path:
    """Draw :data:`STAGES` as a left-to-right graph into a PNG."""
    from saeflow.plots import save_figure  # first: sets matplotlib's headless backend

    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch, Patch

    col = depths()
    rows: dict[int, list[str]] = {}
    for s in STAGES:
        rows.setdefault(col[s.name], []).append(s.name)
    height = max(len(v) for v in rows.values())
    dx, dy, w, h = 3.0, 1.0, 2.15, 0.62
    pos = {name: (c * dx, ((len(names) - 1) / 2 - i) * dy) for c, names in rows.items() for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(dx * len(rows) * 0.62, dy * height * 0.62 + 1.1))
    for s in STAGES:
        x, y = pos[s.name]
        for u in s.upstream:
            ux, uy = pos[u]
            ax.annotate("", xy=(x - w / 2, y), xytext=(ux + w / 2, uy), zorder=1,
                        arrowprops={"arrowstyle": "-|>", "color": "#8a8a8a", "lw": 0.8, "shrinkA": 0, "shrinkB": 1,
                                    "connectionstyle": "arc3,rad=-0.08"})
    for s in STAGES:
        x, y = pos[s.name]
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    fc=COLORS[s.kind], ec="#555555", lw=1.0, zorder=2))
        ax.text(x, y + 0.11, s.name, ha="center", va="center", fontsize=10, fontweight="bold", zorder=3)
        ax.text(x, y - 0.14, s.what, ha="center", va="center", fontsize=7, color="#333333", zorder=3)
    ax.legend(handles=[Patch(fc=c, ec="#555555", label=k) for k, c in COLORS.items()], loc="upper center",
              bbox_to_anchor=(0.5, -0.01), ncol=len(COLORS), frameon=False, fontsize=8)
    ax.set_title("saeflow pipeline stages (flows/graph.py STAGES; arrows: artifacts read)", fontsize=10)
    ax.set_xlim(-w / 2 - 0.1, max(x for x, _ in pos.values()) + w / 2 + 0.1)
    ax.set_ylim(-(height - 1) / 2 * dy - h, (height - 1) / 2 * dy + h)
    ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.graph", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--png", metavar="PATH", help="draw the stage graph into this PNG (e.g. docs/architecture.png)")
    args = ap.parse_args(argv)
    if args.png:
        print(f"wrote {draw(args.png)}")
    else:
        for s in STAGES:
            print(f"{s.name:12s} {s.kind:10s} <- {', '.join(s.upstream) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
