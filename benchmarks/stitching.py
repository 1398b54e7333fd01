"""Cost of the stitching ground truth: batched single-insertion ΔMSE vs one forward per latent.

For a smaller SAE S (1024 latents) and larger SAEs L of 1k..16k latents (JumpReLU, d_in = 640 as
Gemma 3 270M's residual stream), on N activation rows (Gaussian, 8192 rows by default; the cost
does not depend on the values), it times :func:`saeflow.evals.stitching.insertion_delta_mse` (all
latents of L at once: per block of latents one encoder and one decoder-projection matmul) and the
naive method: build S + latent j as an SAE and run a full forward over the rows, for a subset of
latents, extrapolated to all of L. Both give the same ΔMSE (checked on the subset). Prints one
line per width and ``ratio: <naive / batched at the largest width>`` last; writes the
``stitching`` section of docs/benchmarks.md.

Run: ``.venv/bin/python -m benchmarks.stitching [--rows 8192] [--widths 1024 2048 4096 8192 16384] [--naive 24]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import machine, write_section  # noqa: E402
from saeflow.evals.stitching import insertion_delta_mse, make_jumprelu, stitched_sae  # noqa: E402

D_IN = 640


def random_jumprelu(n: int, d: int, g: torch.Generator):
    W_dec = torch.randn(n, d, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    return make_jumprelu(W_dec.T.clone(), torch.zeros(n), W_dec, torch.zeros(d), torch.full((n,), 2.0))


def naive_delta(S, L, x: torch.Tensor, latents: list[int], batch: int = 4096) -> tuple[np.ndarray, float]:
    """ΔMSE of each listed latent by building S + latent j and running it over every row."""
    def mse(sae) -> float:
        se = 0.0
        for i in range(0, x.shape[0], batch):
            xb = x[i:i + batch]
            se += float((xb - sae(xb)).double().pow(2).sum())
        return se / x.shape[0]

    keep = np.ones(S.d_sae, bool)
    t0 = time.perf_counter()
    base = mse(S)
    out = []
    for j in latents:
        incl = np.zeros(L.d_sae, bool)
        incl[j] = True
        out.append(mse(stitched_sae(S, L, keep, incl)) - base)
    return np.asarray(out), (time.perf_counter() - t0) / len(latents)


@torch.no_grad()
def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--small", type=int, default=1024)
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--naive", type=int, default=24, help="latents timed with the naive loop per width")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, D_IN, generator=g)
    S = random_jumprelu(args.small, D_IN, g)
    rows, ratio = [], float("nan")
    for w in args.widths:
        L = random_jumprelu(w, D_IN, g)
        insertion_delta_mse(S, L, [x[:256]])  # warm-up
        t0 = time.perf_counter()
        res = insertion_delta_mse(S, L, [x[i:i + 4096] for i in range(0, x.shape[0], 4096)])
        t_batched = time.perf_counter() - t0
        subset = list(range(0, w, max(1, w // args.naive)))[:args.naive]
        naive, per_latent = naive_delta(S, L, x, subset)
        err = float(np.max(np.abs(naive - res["delta_mse"][subset])) / max(np.abs(naive).max(), 1e-12))
        t_naive = per_latent * w
        ratio = t_naive / t_batched
        rows.append((w, t_batched, per_latent, t_naive, ratio, err))
        print(f"L width {w:6d}: batched {t_batched:7.2f} s ({1e3 * t_batched / w:.3f} ms/latent), naive "
              f"{per_latent * 1e3:.1f} ms/latent -> {t_naive:8.1f} s extrapolated, x{ratio:.0f}, max rel. diff {err:.1e}")
    md = [f"Measured {machine()}; `python -m benchmarks.stitching` (S = {args.small} latents, d_in = {D_IN}, "
          f"{args.rows} rows, JumpReLU SAEs with random unit decoders; naive = one full forward of S + latent j per "
          f"latent, timed on {args.naive} latents and extrapolated).", "",
          "| L latents | batched ΔMSE, all latents (s) | ms / latent | naive (ms / latent) | naive, all latents (s, extrapolated) | naive / batched | max rel. diff |",
          "|---|---|---|---|---|---|---|"]
    for w, tb, pl, tn, r, e in rows:
        md.append(f"| {w} | {tb:.2f} | {1e3 * tb / w:.3f} | {1e3 * pl:.1f} | {tn:.1f} | {r:.0f}x | {e:.1e} |")
    if not args.no_write:
        write_section("stitching", "## Stitching: batched single-insertion ΔMSE\n\n" + "\n".join(md))
    print(f"ratio: {ratio:.1f}")
    return ratio


if __name__ == "__main__":
    main()
