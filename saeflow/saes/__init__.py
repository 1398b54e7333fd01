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

Modules: ``base`` (the shared contract), ``kernels`` (sparse autograd functions), one module per
architecture (``topk``, ``batchtopk``, ``matryoshka``, ``relu``, ``jumprelu``), ``registry``
(name -> class), ``config`` (:class:`SAEConfig`, :class:`FamilyConfig`) and ``saelens_format``
(:func:`save_sae` / :func:`load_sae`: ``cfg.json`` + ``sae_weights.safetensors``, which
``sae_lens.SAE.load_from_disk`` reads).
"""

from __future__ import annotations

from saeflow.saes.base import BaseSAE, build_sae, warm_up_coefficient
from saeflow.saes.batchtopk import BatchTopKSAE
from saeflow.saes.config import FamilyConfig, SAEConfig, default_matryoshka_widths, describe_sae
from saeflow.saes.jumprelu import JumpReLUSAE
from saeflow.saes.matryoshka import MatryoshkaSAE
from saeflow.saes.registry import K_ARCHITECTURES, REGISTRY
from saeflow.saes.relu import StandardSAE
from saeflow.saes.saelens_format import (
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SAEFormatError,
    load_sae,
    save_sae,
    saved_hook,
)
from saeflow.saes.topk import TopKSAE

__all__ = [
    "REGISTRY",
    "K_ARCHITECTURES",
    "build_sae",
    "BaseSAE",
    "TopKSAE",
    "BatchTopKSAE",
    "MatryoshkaSAE",
    "StandardSAE",
    "JumpReLUSAE",
    "warm_up_coefficient",
    "save_sae",
    "load_sae",
    "saved_hook",
    "SAEFormatError",
    "SAE_CFG_FILENAME",
    "SAE_WEIGHTS_FILENAME",
    "SAEConfig",
    "FamilyConfig",
    "default_matryoshka_widths",
    "describe_sae",
]
