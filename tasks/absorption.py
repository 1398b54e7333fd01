"""Stage(s) of the absorption evaluation. Entry point for the flow: :func:`run`."""

from __future__ import annotations

from tasks.common import EvalContext, EvalOutput


def run(ctx: EvalContext) -> EvalOutput:
    """Evaluate every SAE in ``ctx.saes`` (see :class:`tasks.common.EvalContext`)."""
    raise NotImplementedError("the absorption evaluation is not implemented yet")
