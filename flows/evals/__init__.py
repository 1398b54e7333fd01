"""Each evaluation's stage graph as a Prefect subflow (a nested flow run under the pipeline's).

One module per evaluation; each exposes ``flow(ctx: tasks.common.EvalContext) -> EvalOutput``.
"""

from __future__ import annotations

from typing import Any


def stage_all(ctx: Any, jobs: list[tuple]) -> list:
    """Independent stages ``(name, ref_fn, task, kwargs)``: in parallel when the flow's runner can
    (``ctx.stage_all``), else one after another through ``ctx.stage``; results in the order given."""
    if ctx.stage_all is not None:
        return ctx.stage_all(jobs)
    return [ctx.stage(name, ref_fn, task_fn, **kw) for name, ref_fn, task_fn, kw in jobs]
