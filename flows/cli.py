"""saeflow: the command line for people who do not want to write Python.

    saeflow run --config configs/quick.yaml              # the whole pipeline (or --flow extract|train-family|reevaluate)
    saeflow report --profile quick                       # rebuild results/quick/report.html from what is there
    saeflow list-artifacts --stage train                 # what the artifacts root holds
    saeflow clean --stage activations --partial-only     # delete (partial) artifacts of ONE stage
    saeflow browse --profile quick-evals [--serve]       # the latent browser: its path (or serve it on localhost)

Every command takes --artifacts DIR (default: $SAEFLOW_ARTIFACTS, else artifacts/).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

from flows.options import FLOWS, add_root_argument, add_run_arguments, guarded

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CleanRefused(ValueError):
    """A ``clean`` request that would touch something it must not."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="saeflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a profile (the whole pipeline, or one of the partial flows)",
                         description="Run a profile. Stages already complete in the artifacts root are reused; a "
                                     "killed run continues where it stopped.")
    add_run_arguments(run)

    rep = sub.add_parser("report", help="rebuild the HTML/markdown report of a profile's results",
                         description="Rebuild results/<profile>/report.html and report.md from the tables and plots "
                                     "in that folder (no stage runs; timings are those of the last run).")
    g = rep.add_mutually_exclusive_group()
    g.add_argument("--profile", metavar="NAME", default=None,
                   help="profile name (the folder under results/); default: the name in --config")
    g.add_argument("--config", metavar="YAML", default=None,
                   help="profile YAML whose results to report (default configs/quick.yaml when --profile is not given)")
    add_root_argument(rep)

    ls = sub.add_parser("list-artifacts", help="list the artifacts under the root (stage, fingerprint, status, size)",
                        description="List artifact folders: <root>/<stage>/<fingerprint>/ with their status "
                                    "(complete / partial), size and completion time.")
    ls.add_argument("--stage", metavar="X", default=None,
                    help="only this stage (model, vocab, corpus, activations, train, metrics, results, imported, "
                         "or an evaluation's stage)")
    ls.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    add_root_argument(ls)

    cl = sub.add_parser("clean", help="delete the artifacts of ONE stage (asks first)",
                        description="Delete artifact folders of one stage. Never touches other stages, the Prefect "
                                    "cache records (a deleted artifact is simply rebuilt on the next run) or anything "
                                    "outside the artifacts root. Asks before deleting unless --yes is given; refuses "
                                    "without --yes when there is no terminal to ask on.")
    cl.add_argument("--stage", metavar="X", required=True, help="the stage whose folders to delete (e.g. activations)")
    cl.add_argument("--fingerprint", metavar="FP", action="append", default=None,
                    help="only this artifact (repeatable); default: every artifact of the stage")
    cl.add_argument("--partial-only", action="store_true",
                    help="only folders without a completion marker (interrupted runs); complete ones are kept")
    cl.add_argument("--yes", "-y", action="store_true", help="do not ask; delete")
    cl.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    add_root_argument(cl)

    br = sub.add_parser("browse", help="the latent browser of a profile: print its path, or serve it on localhost",
                        description="Print the path of results/<profile>/browser/index.html (open it in a browser; "
                                    "it works from file://), or serve that folder on localhost with --serve.")
    br.add_argument("--profile", metavar="NAME", default="quick", help="profile name (the folder under results/)")
    br.add_argument("--serve", action="store_true", help="serve the site with Python's http.server until Ctrl-C")
    br.add_argument("--port", type=int, default=8000, help="--serve: the port on 127.0.0.1 (default 8000; 0 = any free)")
    add_root_argument(br)
    return ap


def _root(arg: str | None) -> Path:
    """The local folder listed / cleaned (for a URL root: this machine's mirror of it)."""
    from flows.runner import local_root

    return Path(local_root(arg))


def cmd_run(args: argparse.Namespace) -> int:
    """``saeflow run --flow X``: the flow module's own command (the same as ``python -m <module>``)."""
    return importlib.import_module(FLOWS[args.flow]).run_command(args)


def cmd_report(args: argparse.Namespace) -> int:
    from saeflow.config import load_config
    from saeflow.report import build_report

    root = _root(args.artifacts)
    name = args.profile
    config = None
    if name is None:
        config = load_config(args.config or "configs/quick.yaml")
        name = config.name
    if not _NAME.match(name):
        print(f"error: {name!r} is not a profile name", file=sys.stderr)
        return 2
    results = root / "results" / name
    if config is not None:
        cfg = config.model_dump(mode="json")
    else:
        meta = results / "config.json"
        cfg = json.loads(meta.read_text())["config"].get("config", {}) if meta.is_file() else {"name": name}
    html, md = build_report(results, cfg)
    print(f"report: {html}\nmarkdown: {md}")
    return 0


def browser_index(root: Path, profile: str) -> Path:
    """``<root>/results/<profile>/browser/index.html``; a clear error when it is not there."""
    if not _NAME.match(profile):
        raise FileNotFoundError(f"{profile!r} is not a profile name")
    index = root / "results" / profile / "browser" / "index.html"
    if not index.is_file():
        raise FileNotFoundError(
            f"no latent browser at {index}: the profile's run has not built one. Set `browser: {{}}` in its YAML "
            f"(configs/quick-evals.yaml has it) and run `saeflow run --config configs/{profile}.yaml`")
    return index


def cmd_browse(args: argparse.Namespace) -> int:
    try:
        index = browser_index(_root(args.artifacts), args.profile)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"latent browser: {index}\nopen: {index.resolve().as_uri()}")
    if args.serve:
        import functools
        import http.server

        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(index.parent))
        with http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler) as server:
            print(f"serving on http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass
    return 0


def _size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def artifacts(root: Path, stage: str | None = None) -> list[dict]:
    """Every ``<root>/<stage>/<name>/`` folder with its status, size and completion metadata."""
    from saeflow.artifacts import COMPLETE_MARKER

    rows = []
    if not root.is_dir():
        return rows
    stages = [stage] if stage else sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for st in stages:
        base = root / st
        if not base.is_dir():
            continue
        for d in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            marker = d / COMPLETE_MARKER
            meta: dict = {}
            if marker.is_file():
                try:
                    meta = json.loads(marker.read_text())
                except (OSError, ValueError):
                    meta = {}
            rows.append({"stage": st, "fingerprint": d.name, "status": "complete" if marker.is_file() else "partial",
                         "size_mb": round(_size(d) / 2**20, 2),
                         "completed": dt.datetime.fromtimestamp(marker.stat().st_mtime).isoformat(timespec="seconds")
                         if marker.is_file() else "",
                         "what": meta.get("sae") or meta.get("hook") or meta.get("architecture") or "",
                         "path": str(d)})
    return rows


def cmd_list(args: argparse.Namespace) -> int:
    root = _root(args.artifacts)
    if args.stage is not None and not _NAME.match(args.stage):
        print(f"error: {args.stage!r} is not a stage name", file=sys.stderr)
        return 2
    rows = artifacts(root, args.stage)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    if not rows:
        print(f"no artifacts under {root}" + (f" for stage {args.stage}" if args.stage else ""))
        return 0
    import pandas as pd

    print(pd.DataFrame(rows).drop(columns=["path"]).to_string(index=False))
    print(f"\n{len(rows)} artifacts, {sum(r['size_mb'] for r in rows):.1f} MB under {root.resolve()}")
    return 0


def clean_targets(root: Path, stage: str, fingerprints: list[str] | None = None, partial_only: bool = False) -> list[Path]:
    """The folders ``clean`` would delete: only ``<root>/<stage>/<fp>/`` folders that really lie
    inside the root (symlinks resolved); raises :class:`CleanRefused` otherwise."""
    from saeflow.artifacts import COMPLETE_MARKER

    if not _NAME.match(stage) or stage.startswith("."):
        raise CleanRefused(f"{stage!r} is not a stage name (letters, digits, '-', '_', '.'; not a path)")
    if not root.is_dir():
        raise CleanRefused(f"artifacts root {root} does not exist")
    real_root = root.resolve()
    base = root / stage
    if not base.is_dir():
        known = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise CleanRefused(f"no stage {stage!r} under {real_root}; stages there: {', '.join(known) or 'none'}")
    real_base = base.resolve()
    if real_base.parent != real_root:
        raise CleanRefused(f"{base} resolves to {real_base}, outside the artifacts root {real_root}: refusing")
    if fingerprints:
        for fp in fingerprints:
            if not _NAME.match(fp) or fp in (".", ".."):
                raise CleanRefused(f"{fp!r} is not a fingerprint (a folder name under {stage}/, not a path)")
        cands = [base / fp for fp in fingerprints]
        missing = [str(c) for c in cands if not c.is_dir()]
        if missing:
            raise CleanRefused(f"no such artifact: {', '.join(missing)}")
    else:
        cands = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    out = []
    for c in cands:
        real = c.resolve()
        if c.is_symlink() or real.parent != real_base:
            raise CleanRefused(f"{c} resolves to {real}, outside {real_base}: refusing (nothing deleted)")
        if partial_only and (c / COMPLETE_MARKER).is_file():
            continue
        out.append(c)
    return out


def cmd_clean(args: argparse.Namespace) -> int:
    root = _root(args.artifacts)
    try:
        targets = clean_targets(root, args.stage, args.fingerprint, args.partial_only)
    except CleanRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not targets:
        print(f"nothing to delete in {root / args.stage}")
        return 0
    from saeflow.artifacts import COMPLETE_MARKER

    n_complete = sum((t / COMPLETE_MARKER).is_file() for t in targets)
    mb = sum(_size(t) for t in targets) / 2**20
    print(f"{len(targets)} {args.stage} artifact(s), {n_complete} complete, {mb:.1f} MB:")
    for t in targets:
        print(f"  {t}  ({'complete' if (t / COMPLETE_MARKER).is_file() else 'partial'})")
    if args.dry_run:
        print("dry run: nothing deleted")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            print("error: refusing to delete without confirmation: pass --yes (no terminal to ask on)", file=sys.stderr)
            return 2
        answer = input(f"delete these {len(targets)} folder(s)? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("nothing deleted")
            return 1
    for t in targets:
        shutil.rmtree(t)
    print(f"deleted {len(targets)} folder(s); the next run rebuilds what it needs")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded({"run": cmd_run, "report": cmd_report, "list-artifacts": cmd_list, "clean": cmd_clean,
                    "browse": cmd_browse}[args.command],
                   args)


if __name__ == "__main__":
    sys.exit(main())
