"""Prefect tasks, one module per pipeline stage, over the pure code in :mod:`saeflow`."""
