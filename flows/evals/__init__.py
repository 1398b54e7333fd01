"""Each evaluation's stage graph as a Prefect subflow (a nested flow run under the pipeline's).

One module per evaluation; each exposes ``flow(ctx: tasks.common.EvalContext) -> EvalOutput``.
"""
