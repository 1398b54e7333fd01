"""Sparse autoencoder architectures (one registry, SAELens-style) and the SAELens disk format.

Every architecture subclasses :class:`~saeflow.saes.base.BaseSAE` in its own module and is listed
by name in :mod:`saeflow.saes.registry`; :func:`build_sae` instantiates one from a
:class:`~saeflow.saes.config.SAEConfig`. The parameters are named and shaped as in SAELens 6.x
(SPEC 3.1): ``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae), ``W_dec`` (d_sae, d_in), ``b_dec`` (d_in).

Registered architectures (training semantics of the SAELens 6.54.12 training class named; SPEC 3.2):

========== ==================================== ===================== ===========================
name       SAELens training class               extra state           saved as (``cfg.json``)
========== ==================================== ===================== ===========================
topk       ``TopKTrainingSAE``                  -                     ``topk``
batchtopk  ``BatchTopKTrainingSAE``             ``topk_threshold``    ``jumprelu`` (θ everywhere)
matryoshka ``MatryoshkaBatchTopKTrainingSAE``   ``topk_threshold``    ``jumprelu`` (θ everywhere)
relu       ``StandardTrainingSAE``              -                     ``standard``
jumprelu   ``JumpReLUTrainingSAE``              ``threshold`` (param) ``jumprelu``
========== ==================================== ===================== ===========================

Users import from the package (``from saeflow.saes import load_sae``); its names are imported on
first access. Modules: ``base`` (the shared contract), ``kernels`` (sparse autograd functions),
one module per architecture (``topk``, ``batchtopk``, ``matryoshka``, ``relu``, ``jumprelu``),
``registry`` (name -> class), ``errors`` (:class:`SAEFormatError`), ``config`` (:class:`SAEConfig`, :class:`FamilyConfig`) and
``saelens_format`` (:func:`save_sae` / :func:`load_sae`: ``cfg.json`` +
``sae_weights.safetensors``, which ``sae_lens.SAE.load_from_disk`` reads).
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module defining it. Imported on first access (PEP 562), so importing the light
#: parts (``saeflow.saes.config``, ``saeflow.saes.registry``; :mod:`saeflow.config` does) never
#: loads torch and the architectures.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("REGISTRY", "K_ARCHITECTURES"), "saeflow.saes.registry"),
    **dict.fromkeys(("SAEConfig", "FamilyConfig", "default_matryoshka_widths", "describe_sae"), "saeflow.saes.config"),
    **dict.fromkeys(("BaseSAE", "SAEShape", "build_sae", "warm_up_coefficient"), "saeflow.saes.base"),
    "TopKSAE": "saeflow.saes.topk",
    "BatchTopKSAE": "saeflow.saes.batchtopk",
    "MatryoshkaSAE": "saeflow.saes.matryoshka",
    "StandardSAE": "saeflow.saes.relu",
    "JumpReLUSAE": "saeflow.saes.jumprelu",
    **dict.fromkeys(("save_sae", "load_sae", "saved_hook", "SAE_CFG_FILENAME", "SAE_WEIGHTS_FILENAME"),
                    "saeflow.saes.saelens_format"),
    "SAEFormatError": "saeflow.saes.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
