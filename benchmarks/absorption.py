"""Wall time of saeflow's absorption evaluation over a family vs SAEBench 0.6.0's absorption eval.

Same model (Gemma 3 270M from the quick profile's fp32 copy), same hook, same SAEs (the quick
family, loaded by SAEBench with ``sae_lens.SAE.load_from_disk``) and the same word list (the
``absorption_data`` stage's sampled words; SAEBench's ``get_alpha_tokens`` is replaced by that
list, so both sides build probe prompts for the same words and split them 80/20). Ours runs the
absorption stages (data, probe, one task per SAE, results) into a fresh artifacts root with the
paper's ablation rate switched off (SAEBench does not compute it); SAEBench runs
``sae_bench.evals.absorption.main.run_eval`` in its own venv (/work/sbvenv), one run each.

Command::

    .venv/bin/python -m benchmarks.absorption --config configs/quick-evals.yaml [--saes 6]

Prints both wall times and ``ratio: ours / SAEBench`` as the last line; writes a section to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SBPY = "/work/sbvenv/bin/python"


def patch_sb_model_and_words(model_dir: str, words: list[str], stop_at_hook: bool = False) -> None:
    """(SAEBench venv) make SAEBench's absorption eval use ``words`` as its vocabulary and load the
    model from the profile's fp32 copy ``model_dir`` (no hub) as ``HookedTransformer`` without weight
    processing, float32 on the CPU. ``stop_at_hook``: its ``run_with_cache`` calls stop after the one
    residual hook they read (same values; for agreement runs, not for timing SAEBench as it is)."""
    import torch
    import sae_bench.evals.absorption.common as common
    import sae_bench.evals.absorption.feature_absorption as fa
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common.get_alpha_tokens = lambda tokenizer: list(words)
    fa.get_alpha_tokens = lambda tokenizer: list(words)
    orig = HookedTransformer.from_pretrained_no_processing

    def load(name, **kw):
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = orig("google/gemma-3-270m", hf_model=hf, tokenizer=tok, device="cpu", dtype=torch.float32)
        if not stop_at_hook:
            return model
        full = model.run_with_cache

        def run_with_cache(*args, **kwargs):
            # SAEBench reads one hook's cache and never the logits: stop right after that layer (the
            # values at the hook are the same; the 262k-way unembedding is most of a full forward)
            hooks = kwargs.get("names_filter")
            if isinstance(hooks, (list, tuple)) and len(hooks) == 1 and "stop_at_layer" not in kwargs:
                m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hooks[0])
                if m:
                    kwargs["stop_at_layer"] = int(m.group(1)) + 1
            return full(*args, **kwargs)

        model.run_with_cache = run_with_cache
        return model

    HookedTransformer.from_pretrained_no_processing = staticmethod(load)


def _sb_run(spec_path: Path) -> None:
    """(SAEBench venv) run_eval on the SAEs and words in ``spec_path``; print the wall time."""
    import os

    from sae_lens import SAE

    spec = json.loads(spec_path.read_text())
    os.chdir(spec["workdir"])
    import sae_bench.evals.absorption.main as sbmain
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig

    patch_sb_model_and_words(spec["model_dir"], spec["words"])
    saes = [(f"sae{i}", SAE.load_from_disk(p, device="cpu")) for i, p in enumerate(spec["saes"])]
    cfg = AbsorptionEvalConfig(model_name="gemma-3-270m", llm_dtype="float32", llm_batch_size=32)
    t0 = time.perf_counter()
    res = sbmain.run_eval(cfg, saes, "cpu", spec["workdir"] + "/out", force_rerun=True)
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "saes": len(res)}))


def profile_family(config: str, artifacts: str):
    """``(config, artifacts root, model ref, SAE refs)`` of a profile (project venv): the family's
    members, then its ``import_saes`` (published SAEs among them, issue #27), as the pipeline orders them."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from saeflow.config import load_config
    from tasks import activations as tacts
    from tasks import corpus as tcorpus
    from tasks import model as tmodel
    from tasks import train as ttrain

    cfg = load_config(config)
    root = str(Path(artifacts).resolve())
    m = tmodel.ref(cfg=cfg.model, root=root)
    c = tcorpus.ref(model=m, cfg=cfg.corpus, root=root, prepend_bos=cfg.model.prepend_bos)
    a = tacts.ref(model=m, model_cfg=cfg.model, corpus=c, cfg=cfg.activations, root=root)
    from tasks import imported as timported

    return cfg, root, m, [*ttrain.family_refs(a, cfg.sae_configs(), cfg.train, root),
                          *(timported.ref(e, acts=a, root=root) for e in cfg.import_saes)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quick-evals.yaml")
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--saes", type=int, default=None, help="only the first N SAEs of the family")
    ap.add_argument("--sb-spec", type=Path, help="(internal) run the SAEBench half")
    args = ap.parse_args(argv)
    if args.sb_spec:
        _sb_run(args.sb_spec)
        return 0
    cfg, root, m, saes = profile_family(args.config, args.artifacts)
    saes = saes[: args.saes]
    import pandas as pd
    from prefect.logging import disable_run_logger

    from benchmarks._common import machine, write_section
    from tasks import absorption as tab
    from tasks import vocab as tvocab

    acfg = cfg.absorption.model_copy(update={"ablation": False})
    v = tvocab.ref(model=m, cfg=cfg.vocab, root=root)
    for r in (m, v, *saes):
        if not r.is_complete():
            print(f"error: {r.path} is not complete; run the pipeline with {args.config} first", file=sys.stderr)
            return 1
    hook = cfg.activations.hook
    with tempfile.TemporaryDirectory(prefix="absbench-") as tmp, disable_run_logger():
        t0 = time.perf_counter()
        data = tab.data_task.fn(model=m, model_cfg=cfg.model, vocab=v, hook=hook, cfg=acfg, root=tmp)
        probe = tab.probe_task.fn(data=data, cfg=acfg, root=tmp)
        tab.check_probe(probe, acfg)
        per = [tab.sae_task.fn(model=m, model_cfg=cfg.model, data=data, probe=probe, sae=s, hook=hook, cfg=acfg, root=tmp)
               for s in saes]
        tab.results_task.fn(per_sae=per, saes=saes, root=tmp)
        ours = time.perf_counter() - t0
        prompts = pd.read_parquet(Path(data.path) / "prompts.parquet")
        words = prompts.loc[prompts["kind"] == "probe", "word"].tolist()
        spec = {"workdir": tmp, "model_dir": m.path, "saes": [s.path for s in saes], "words": words}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        t1 = time.perf_counter()
        repo = Path(__file__).resolve().parent.parent
        proc = subprocess.run([SBPY, "-m", "benchmarks.absorption", "--sb-spec", str(spec_path)], capture_output=True,
                              text=True, cwd=repo, env={**__import__("os").environ, "PYTHONPATH": str(repo)})
        sb_wall = time.perf_counter() - t1
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        sb = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = ours / sb["seconds"]
    md = (f"## Absorption eval wall time vs SAEBench (`benchmarks/absorption.py`)\n\n"
          f"Command: `.venv/bin/python -m benchmarks.absorption --config {args.config}"
          f"{f' --saes {args.saes}' if args.saes else ''}` (gemma-3-270m, `{hook}`, {len(saes)} SAEs, "
          f"{len(words)} words, float32, ablation rate off on our side). Machine: {machine()}.\n\n"
          f"| | wall time (s) |\n|---|---|\n| saeflow (data + probe + per-SAE + results stages) | {ours:.1f} |\n"
          f"| SAEBench `run_eval` (model load excluded: {sb_wall - sb['seconds']:.1f} s) | {sb['seconds']:.1f} |\n\n"
          f"Ratio ours / SAEBench: **{ratio:.3f}** (goal <= 0.33).\n")
    write_section("absorption", md)
    print(md)
    print(f"ratio: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
