"""The command-line options of ``saeflow run``, defined once.

``saeflow run`` (:mod:`flows.cli`) adds them to its ``run`` subcommand; ``python -m flows.pipeline``
(``make run``), ``python -m flows.extract``, ``python -m flows.train_family`` and
``python -m flows.reevaluate`` parse the same options with the flow fixed (:func:`main_of`).
Each flow module runs its own flow through its ``run_command(args)``, so the flows never
import the CLI (the CLI imports them).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

#: The flows ``saeflow run --flow`` runs: flow name -> the module holding its ``run_command``.
FLOWS = {"pipeline": "flows.pipeline", "extract": "flows.extract", "train-family": "flows.train_family",
         "reevaluate": "flows.reevaluate"}


def add_root_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", metavar="DIR", default=None,
                   help="artifacts root (default: $SAEFLOW_ARTIFACTS, else ./artifacts). A filesystem path or an "
                        "fsspec URL such as s3://bucket/prefix (see docs/operations.md)")


def add_run_arguments(p: argparse.ArgumentParser, with_flow: bool = True) -> None:
    """The options of ``saeflow run``; ``with_flow=False`` leaves out ``--flow`` (a flow module's
    own command line, whose flow is fixed)."""
    p.add_argument("--config", metavar="YAML", default="configs/quick.yaml",
                   help="profile YAML: configs/quick.yaml (default, CPU), configs/smoke.yaml (CI), "
                        "configs/paper-gemma-2-2b.yaml (GPU + internet) or your own copy")
    add_root_argument(p)
    if with_flow:
        p.add_argument("--flow", choices=tuple(FLOWS), default="pipeline",
                       help="pipeline: every stage + results + report (default); extract: activations only; "
                            "train-family: activations + the SAE family, no evaluation; reevaluate: evaluate every "
                            "SAE lacking current results, refresh tables")
    p.add_argument("--runner", choices=("local", "dask"), default=None,
                   help="task runner, overriding the profile's runner.kind: local (in this process) or dask "
                        "(DaskTaskRunner; per-SAE tasks in parallel)")
    p.add_argument("--address", metavar="tcp://HOST:PORT", default=None,
                   help="with --runner dask: a running Dask scheduler; without it a LocalCluster is started")
    p.add_argument("--workers", metavar="N", type=int, default=None,
                   help="with --runner dask and no --address: LocalCluster worker processes (default 2)")
    p.add_argument("--device", metavar="DEV", default=None,
                   help="auto | cpu | cuda | cuda:N, overriding train.device (operational: recomputes nothing)")
    p.add_argument("--sae-folder", metavar="DIR", default=None,
                   help="with --flow reevaluate: folder of SAELens-layout SAEs (cfg.json + "
                        "sae_weights.safetensors) to evaluate too")


def flow_parser(flow: str, description: str | None = None) -> argparse.ArgumentParser:
    """``saeflow run --flow <flow>``'s parser for ``python -m <that flow's module>``."""
    ap = argparse.ArgumentParser(prog=f"python -m {FLOWS[flow]}", description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"The same as `saeflow run --flow {flow} ...`.")
    add_run_arguments(ap, with_flow=False)
    ap.set_defaults(flow=flow)
    return ap


def overrides(args: argparse.Namespace) -> dict:
    """The profile sections the run options override (``--runner``, ``--address``, ``--workers``,
    ``--device``)."""
    over: dict = {}
    if args.runner or args.address or args.workers:
        over["runner"] = {k: v for k, v in {"kind": args.runner or ("dask" if args.address or args.workers else None),
                                            "address": args.address, "n_workers": args.workers}.items() if v}
    if args.device:
        over["train"] = {"device": args.device}
    return over


def guarded(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; a user-facing error (bad profile, bad input, broken artifact) becomes a
    message on stderr and exit code 2 (config) or 1 (anything else), not a traceback."""
    from saeflow.artifacts import ArtifactError
    from saeflow.config import ConfigError

    try:
        return command(args)
    except (ConfigError, ValueError, ArtifactError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


def main_of(flow: str, command: Callable[[argparse.Namespace], int], argv: list[str] | None = None,
            description: str | None = None) -> int:
    """A flow module's ``main``: parse ``saeflow run``'s options (flow fixed), run ``command``."""
    return guarded(command, flow_parser(flow, description).parse_args(argv))
