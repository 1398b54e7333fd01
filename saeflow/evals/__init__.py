"""The evaluations (absorption, stitching, meta-SAE, probing): pure code, no Prefect.

Each evaluation is a subpackage holding its config class (``config.py``, composed into the
profile by :mod:`saeflow.config`) and its computations; what they share (the probe trainer,
held-out row selection, SAE info) is in :mod:`saeflow.evals.common`.
"""
