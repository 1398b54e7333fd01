"""Record the fingerprints of the core stages (model, vocab, corpus, activations, train) of some
profiles, as ``flows/pipeline.py`` computes them, into ``tests/data/fingerprints.json``.

Run it from the repository root at the commit the JSON should pin (the JSON names it):

    python -m tests.data.record_fingerprints            # writes tests/data/fingerprints.json
    python -m tests.data.record_fingerprints --print    # prints, writes nothing

``tests/test_fingerprints.py`` compares the current code's fingerprints with the file, so a
restructure that would retrain a family (or re-extract activations) fails there. Only the public
``ref`` functions of ``tasks/`` are called; nothing is loaded or run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from unittest import mock
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).with_name("fingerprints.json")
PROFILES = ("configs/smoke.yaml", "configs/quick.yaml")
#: A fixed artifacts root: fingerprints do not depend on it, paths do (only fingerprints are kept).
ROOT = "/fingerprint-root"


#: ``auto`` precision fields resolve per machine (bf16 on a CPU with avx512_bf16, float32 on an
#: AVX2-only one); the recorded fingerprints are those of a bf16-capable machine on every machine.
AUTO_AS = "bfloat16"


def fingerprints(profile: str, root: str = ROOT) -> dict[str, str | list[str]]:
    """The core stages' fingerprints of ``profile``, with the arguments the pipeline passes
    (``auto`` precision resolved as :data:`AUTO_AS`, whatever this machine has)."""
    from saeflow.config import load_config, resolve_precision
    from tasks import activations, corpus, model, train, vocab

    with mock.patch.dict(os.environ, {"SAEFLOW_PRECISION": AUTO_AS}):
        config, _ = resolve_precision(load_config(REPO / profile))
    m = model.ref(cfg=config.model, root=root)
    v = vocab.ref(model=m, cfg=config.vocab, root=root)
    c = corpus.ref(model=m, cfg=config.corpus, prepend_bos=config.model.prepend_bos, root=root)
    a = activations.ref(model=m, model_cfg=config.model, corpus=c, cfg=config.activations, root=root)
    s = train.family_refs(acts=a, members=config.sae_configs(), train_cfg=config.train, root=root)
    return {"model": m.fingerprint, "vocab": v.fingerprint, "corpus": c.fingerprint, "activations": a.fingerprint,
            "train": [r.fingerprint for r in s]}


def all_fingerprints() -> dict[str, dict]:
    return {profile: fingerprints(profile) for profile in PROFILES}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--print", action="store_true", help="print the JSON instead of writing it")
    args = ap.parse_args(argv)
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "saeflow", "tasks", "flows", "configs"],
                                cwd=REPO, capture_output=True, text=True, check=True).stdout.strip())
    data = {"recorded_at": rev, "recorded_with_local_changes": dirty,
            "note": "core-stage fingerprints computed by tests/data/record_fingerprints.py at recorded_at",
            "profiles": all_fingerprints()}
    text = json.dumps(data, indent=2) + "\n"
    if args.print:
        print(text, end="")
    else:
        OUT.write_text(text)
        print(f"wrote {OUT} (commit {rev[:12]}{', with local changes' if dirty else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
