"""Stage(s) of the probing evaluation. Entry point for the flow: :func:`run`."""

from __future__ import annotations

from tasks.common import EvalContext, EvalOutput


def run(ctx: EvalContext) -> EvalOutput:
    """Evaluate every SAE in ``ctx.saes`` (see :class:`tasks.common.EvalContext`)."""
    raise NotImplementedError("the probing evaluation is not implemented yet")
