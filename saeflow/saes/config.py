"""Configs of the SAEs: one SAE (:class:`SAEConfig`) and a family trained together (:class:`FamilyConfig`).

:mod:`saeflow.config` composes them into the profile (``sae:`` / ``family:``). The architecture
names are checked against :data:`saeflow.saes.registry.REGISTRY`, which imports nothing from
saeflow, so this module and the architectures (which import it) form no import circle.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from saeflow.frozen import Frozen
from saeflow.saes.registry import K_ARCHITECTURES, REGISTRY

__all__ = ["SAEConfig", "FamilyConfig", "SPARSITY_FIELDS", "K_ARCHITECTURES", "TARGET_L0_ARCHITECTURES",
           "default_matryoshka_widths", "describe_sae"]


class SAEConfig(Frozen):
    architecture: str = "topk"
    """Registered SAE architecture (see ``saeflow.saes.registry.REGISTRY``): ``topk``, ``batchtopk``,
    ``matryoshka`` (Matryoshka BatchTopK), ``relu`` (standard ReLU + L1) or ``jumprelu``."""

    width: int = Field(4096, ge=1)
    """Number of latents (d_sae)."""

    k: int = Field(32, ge=1)
    """TopK: active latents per token. BatchTopK / Matryoshka: average active latents per token
    (the batch keeps its ``k * batch`` largest activations). Unused by ``relu`` and ``jumprelu``."""

    aux_k: int | None = None
    """TopK / BatchTopK / Matryoshka aux loss: number of dead latents used (default d_in // 2)."""

    k_anneal_from: float = Field(1.0, ge=1.0)
    """TopK / BatchTopK / Matryoshka: training starts with ``round(k_anneal_from * k)`` active latents
    (capped at ``width``) and lowers it linearly to ``k`` over the first ``k_anneal_fraction`` of the
    run (Llama Scope's K-annealing, He et al. 2024), so fewer latents lose every slot early on.
    1.0 = off (SAELens, dictionary_learning); inference always uses ``k``."""

    k_anneal_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of the run's steps over which ``k`` anneals from ``k_anneal_from * k`` (0 = off)."""

    aux_coefficient: float = Field(1.0, ge=0.0)
    """TopK / BatchTopK / Matryoshka aux loss coefficient."""

    dead_feature_window: int = Field(1000, ge=1)
    """A latent is dead after this many steps without firing (SAELens default 1000). Overridden by
    ``dead_window_fraction`` when that is set."""

    dead_window_fraction: float | None = Field(0.05, gt=0.0, le=1.0)
    """Dead-latent window as a fraction of the run's steps (``max(1, round(f * steps))``), so the
    aux-k loss (and resampling) wake up on short runs too (dictionary_learning counts the window in
    tokens, 10M; SAELens in steps, 1000, longer than the quick run's 366). Default 0.05 (measured,
    docs/training.md). ``None`` uses ``dead_feature_window`` (SAELens)."""

    resample_dead_at: tuple[float, ...] = ()
    """Fractions of the run (each in (0, 1)) after which latents dead by the window above are
    re-initialised toward badly reconstructed inputs of the current batch (Anthropic's resampling,
    as dictionary_learning's ``StandardTrainer``; Anthropic resamples at 25/50/75/100k of 200k+
    steps). Empty = never."""

    resample_encoder_scale: float = Field(0.2, gt=0.0)
    """Resampling: a resampled encoder column is its direction times this times the mean alive
    encoder norm (Anthropic, dictionary_learning: 0.2)."""

    b_dec_init: Literal["zeros", "mean", "geometric_median"] = "geometric_median"
    """Initial decoder bias: ``geometric_median`` of a sample of training activations
    (dictionary_learning's TopK / BatchTopK trainers; computed once per family by the train stage,
    ``train.init_sample_rows`` rows), their ``mean``, or ``zeros`` (SAELens 6.x). On a residual
    stream with a large shared offset ``zeros`` leaves most latents dead (docs/training.md)."""

    b_enc_init: Literal["zeros", "target_l0"] = "zeros"
    """Initial encoder bias of ``relu`` / ``jumprelu`` SAEs with a ``target_l0``: ``zeros``
    (SAELens) or ``target_l0``: set from the train stage's activation sample (the one ``b_dec``
    comes from) so that every latent fires on ``target_l0 / width`` of it, i.e. an initial L0 of
    ~``target_l0`` with no silent latent [Anthropic, Circuits Updates January 2025: JumpReLU
    ``b_enc`` set so each feature is active 10,000 / m of the time]
    (:func:`saeflow.sae_init.b_enc_for_target_l0`). No effect on SAEs without a ``target_l0``
    (so a family ``base`` can set it for its relu / jumprelu members)."""

    decoder_init_norm: float | None = Field(None, gt=0.0)
    """Decoder rows initialised to this norm, encoder = decoder transpose. ``None`` = per
    architecture (:meth:`effective_decoder_init_norm`): 1.0 (unit rows) for ``topk`` /
    ``batchtopk`` / ``matryoshka`` (dictionary_learning's TopK / BatchTopK, OpenAI; measured better
    here, docs/training.md), 0.1 for ``relu`` / ``jumprelu`` (SAELens' default for every
    architecture, Anthropic's April 2024 update)."""

    rescale_acts_by_decoder_norm: bool = True
    """TopK / BatchTopK / Matryoshka: multiply pre-activations by decoder row norms (SAELens
    training default). ``relu`` and ``jumprelu`` never rescale (as in SAELens)."""

    normalize_activations: Literal["none", "expected_average_only_in"] = "expected_average_only_in"
    """Scale inputs to mean norm sqrt(d_in) during training; folded into the weights at the end."""

    l1_coefficient: float = Field(1.0, ge=0.0)
    """``relu``: weight of the sparsity penalty ``mean_batch ||f * ||W_dec_i|| ||_p`` (SAELens
    ``l1_coefficient``)."""

    l1_warm_up_steps: int = Field(0, ge=0)
    """``relu``: the L1 coefficient rises linearly from 0 over this many steps (step ``t`` uses
    ``l1_coefficient * min(t / l1_warm_up_steps, 1)``, as SAELens' ``CoefficientScheduler``)."""

    lp_norm: float = Field(1.0, gt=0.0)
    """``relu``: p of the sparsity penalty's norm (1 = L1)."""

    l0_coefficient: float = Field(1.0, ge=0.0)
    """``jumprelu``: weight of the sparsity loss (SAELens ``l0_coefficient``)."""

    l0_warm_up_steps: int = Field(0, ge=0)
    """``jumprelu``: linear warm-up of ``l0_coefficient`` from 0 over this many steps."""

    jumprelu_bandwidth: float = Field(0.05, gt=0.0)
    """``jumprelu``: width ε of the rectangle kernel of the straight-through estimator."""

    jumprelu_init_threshold: float = Field(0.01, ge=0.0)
    """``jumprelu``: initial threshold of every latent."""

    jumprelu_sparsity_loss_mode: Literal["step", "tanh", "quadratic"] = "step"
    """``jumprelu``: ``step`` = L0 through the step function's STE (DeepMind), ``tanh`` =
    ``sum_i tanh(jumprelu_tanh_scale * f_i * ||W_dec_i||)`` (Anthropic), ``quadratic`` =
    ``2 / target_l0 * (L0_row - target_l0)^2`` per row with the step function's L0 (Gemma Scope 2;
    SAELens' ``quadratic`` mode; needs ``target_l0``)."""

    jumprelu_tanh_scale: float = Field(4.0, gt=0.0)
    """``jumprelu`` with ``tanh`` sparsity loss: scale inside the tanh."""

    jumprelu_ste_to_input: bool = False
    """``jumprelu``: also pass the STE gradient to the pre-activations (Anthropic); ``False``
    sends it to the threshold only (DeepMind, SAELens default)."""

    pre_act_loss_coefficient: float | None = Field(None, ge=0.0)
    """``jumprelu``: coefficient of Anthropic's pre-activation loss on dead latents
    (``mean_batch sum_i relu(θ_i - h_i) * dead_i * ||W_dec_i||``); ``None`` disables it
    (Anthropic uses 3e-6)."""

    topk_threshold_lr: float = Field(0.01, ge=0.0, le=1.0)
    """``batchtopk`` / ``matryoshka``: rate of the moving inference threshold
    ``θ <- (1 - lr) θ + lr * min(positive batch activations)``, updated after every step."""

    matryoshka_widths: tuple[int, ...] | None = None
    """``matryoshka``: strictly increasing nested prefix widths, each <= ``width``; ``width`` is
    appended when the last one is smaller. Required for ``matryoshka``."""

    target_l0: float | None = Field(None, gt=0.0)
    """``relu`` / ``jumprelu``: the L0 (active latents per token) to train to, instead of choosing a
    coefficient. ``jumprelu``: the quadratic L0 loss around it (``jumprelu_sparsity_loss_mode:
    quadratic``, Gemma Scope 2), weighted by ``l0_coefficient``. ``relu``: the L1 coefficient is
    steered during the run (:attr:`l1_controller_gain`), starting from ``l1_coefficient``.
    ``None`` = the coefficient alone sets the sparsity. Not for the k-based architectures (use ``k``)."""

    l1_controller_gain: float = Field(0.02, gt=0.0, le=1.0)
    """``relu`` with ``target_l0``: after every step past ``l1_warm_up_steps``, the L1 coefficient is
    multiplied by ``(L0_batch / target_l0) ** gain`` (the log ratio clipped to ``[-1, 1]``): an
    integral controller on the log coefficient, so the coefficient settles where the batch L0
    equals the target. 0.02 doubles it in ~50 steps when L0 is twice the target."""

    use_matryoshka_aux_loss: bool = True
    """``matryoshka``: a separate TopK aux loss per nested level, each reconstructing the residual of
    its own prefix (SAELens ``use_matryoshka_aux_loss``); ``False`` (SAELens' default) uses the plain
    TopK aux loss. Default ``True`` (measured: width 4096, k 32 on the quick store and budget, 8.3%
    of latents dead on held-out rows with ``False``, 2.2% with ``True``, EV 0.970 both;
    docs/training.md)."""

    @model_validator(mode="after")
    def _check(self) -> "SAEConfig":
        if self.architecture not in REGISTRY:
            raise ValueError(
                f"unknown SAE architecture {self.architecture!r}; registered architectures: "
                f"{', '.join(sorted(REGISTRY))} (set sae.architecture to one of them)"
            )
        if self.architecture in K_ARCHITECTURES and self.k > self.width:
            raise ValueError(f"k={self.k} exceeds width={self.width}: choose k <= width")
        r = list(self.resample_dead_at)
        if any(not 0.0 < f < 1.0 for f in r) or any(a >= b for a, b in zip(r, r[1:])):
            raise ValueError(f"resample_dead_at={r} must be strictly increasing fractions of the run in (0, 1)")
        if self.matryoshka_widths is not None:
            w = list(self.matryoshka_widths)
            if not w:
                raise ValueError("matryoshka_widths must not be empty (or null when unused)")
            if any(v < 1 for v in w):
                raise ValueError(f"matryoshka_widths={w} must hold positive widths")
            if any(a >= b for a, b in zip(w, w[1:])):
                raise ValueError(f"matryoshka_widths={w} must be strictly increasing")
            if w[-1] > self.width:
                raise ValueError(f"matryoshka_widths={w} ends at {w[-1]}, beyond width={self.width}")
        elif self.architecture == "matryoshka":
            raise ValueError(
                "architecture 'matryoshka' needs sae.matryoshka_widths (strictly increasing prefix widths, "
                f"e.g. [{max(1, self.width // 8)}, {max(1, self.width // 2)}, {self.width}])"
            )
        if self.target_l0 is not None:
            if self.architecture not in TARGET_L0_ARCHITECTURES:
                raise ValueError(f"target_l0 applies to {', '.join(TARGET_L0_ARCHITECTURES)}, not {self.architecture!r} "
                                 f"(its sparsity is k: set k={self.target_l0:g} instead)")
            if self.target_l0 > self.width:
                raise ValueError(f"target_l0={self.target_l0:g} exceeds width={self.width}: choose target_l0 <= width")
        quadratic = self.jumprelu_sparsity_loss_mode == "quadratic"
        if self.architecture == "jumprelu" and quadratic and self.target_l0 is None:
            raise ValueError("jumprelu_sparsity_loss_mode 'quadratic' needs target_l0 (the L0 its loss pulls toward)")
        if self.architecture == "jumprelu" and self.target_l0 is not None and not quadratic:
            raise ValueError(f"jumprelu with target_l0 needs jumprelu_sparsity_loss_mode: quadratic (the loss that "
                             f"pulls L0 toward the target), not {self.jumprelu_sparsity_loss_mode!r}")
        return self

    def fingerprint_payload(self) -> dict[str, Any]:
        """As every config's, without the target-L0 fields while ``target_l0`` is unset (and
        ``b_enc_init`` while it has no effect): SAEs trained before those fields existed keep their
        fingerprints. ``use_matryoshka_aux_loss`` only acts on ``matryoshka``: every other
        architecture records ``False``, its default before it became ``True`` (issue #28), so their
        fingerprints did not change with it."""
        out = super().fingerprint_payload()
        if out.get("target_l0") is None:
            out.pop("target_l0", None)
            out.pop("l1_controller_gain", None)
        if not self.b_enc_from_sample:
            out.pop("b_enc_init", None)
        if self.architecture != "matryoshka":
            out["use_matryoshka_aux_loss"] = False
        return out

    @property
    def b_enc_from_sample(self) -> bool:
        """Whether training sets ``b_enc`` from the activation sample (``b_enc_init: target_l0`` on an
        SAE with a ``target_l0``)."""
        return self.b_enc_init == "target_l0" and self.target_l0 is not None

    @property
    def needs_init_sample(self) -> bool:
        """Whether training initialises a bias from an activation sample (a data-dependent
        ``b_dec_init``, or :attr:`b_enc_from_sample`)."""
        return self.b_dec_init != "zeros" or self.b_enc_from_sample

    def effective_decoder_init_norm(self) -> float:
        """``decoder_init_norm``, or its per-architecture default when ``None``."""
        if self.decoder_init_norm is not None:
            return float(self.decoder_init_norm)
        return 1.0 if self.architecture in K_ARCHITECTURES else 0.1

    def effective_matryoshka_widths(self) -> tuple[int, ...]:
        """``matryoshka_widths`` with ``width`` appended when missing (SAELens semantics)."""
        w = tuple(self.matryoshka_widths or ())
        return w if w and w[-1] == self.width else (*w, self.width)


#: Architectures whose sparsity is a penalty, so they can train to a ``target_l0``.
TARGET_L0_ARCHITECTURES: tuple[str, ...] = ("relu", "jumprelu")

#: Sparsity grid field of :class:`FamilyConfig` used by each architecture, and the SAEConfig field it sets.
SPARSITY_FIELDS: dict[str, tuple[str, str]] = {
    **{name: ("ks", "k") for name in sorted(K_ARCHITECTURES)},
    "relu": ("l1_coefficients", "l1_coefficient"),
    "jumprelu": ("l0_coefficients", "l0_coefficient"),
}


def default_matryoshka_widths(width: int) -> tuple[int, ...]:
    """Nested prefix widths derived from ``width``: ``width/8, width/4, width/2, width``.

    Integer division; prefixes of 0 latents and repeats are dropped, so a width below 8 gets fewer
    levels (``width=4`` -> ``(1, 2, 4)``, ``width=1`` -> ``(1,)``).
    """
    out: list[int] = []
    for w in (width // 8, width // 4, width // 2, width):
        if w >= 1 and (not out or w > out[-1]):
            out.append(w)
    return tuple(out)


def describe_sae(cfg: SAEConfig) -> str:
    """Short human label of an SAE config: ``topk width=1024 k=32``, ``relu width=64 l1=0.5``."""
    label = f"{cfg.architecture} width={cfg.width}"
    if cfg.architecture in K_ARCHITECTURES:
        label += f" k={cfg.k}"
    elif cfg.target_l0 is not None:
        label += f" target_l0={cfg.target_l0:g}"
    elif cfg.architecture == "relu":
        label += f" l1={cfg.l1_coefficient:g}"
    elif cfg.architecture == "jumprelu":
        label += f" l0={cfg.l0_coefficient:g}"
    if cfg.architecture == "matryoshka":
        label += f" levels={list(cfg.effective_matryoshka_widths())}"
    return label


class FamilyConfig(Frozen):
    """A family of SAEs trained together from one pass over the cached activations.

    The members are either the grid ``architectures x widths x (sparsity setting)`` laid over
    ``base``, or the explicit ``members`` list. Every member is a full :class:`SAEConfig`, validated
    when the profile is loaded (``k > width``, unknown architecture, duplicates, ... are refused
    before anything trains). Each member is trained, cached and fingerprinted exactly as a single
    SAE with that config would be (``train/<fp>/`` with the same ``fp``): adding a member to a family
    trains only that member, and a one-member family is the plain ``sae:`` run.

    Grid order (the order of :meth:`expand`, of the training logs and of the results table):
    architecture, then width, then sparsity value, each in the order given.
    """

    base: SAEConfig = SAEConfig()
    """Fields shared by every member (aux loss, dead window, normalisation, warm-ups, ...). The
    grid overrides ``architecture``, ``width`` and the sparsity field of each member; every other
    field comes from here. For explicit ``members`` given as YAML mappings, fields a member does
    not set come from here too."""

    architectures: tuple[str, ...] = ()
    """Grid: architectures to train (``topk``, ``batchtopk``, ``matryoshka``, ``relu``,
    ``jumprelu``). Empty = ``(base.architecture,)``."""

    widths: tuple[int, ...] = ()
    """Grid: numbers of latents. Empty = ``(base.width,)``."""

    ks: tuple[int, ...] = ()
    """Grid, ``topk`` / ``batchtopk`` / ``matryoshka`` members: values of ``k``. Empty =
    ``(base.k,)``. Each must be <= every width it is combined with."""

    l1_coefficients: tuple[float, ...] = ()
    """Grid, ``relu`` members: values of ``l1_coefficient`` (>= 0). Empty = ``(base.l1_coefficient,)``."""

    l0_coefficients: tuple[float, ...] = ()
    """Grid, ``jumprelu`` members: values of ``l0_coefficient`` (>= 0). Empty = ``(base.l0_coefficient,)``."""

    target_l0s: tuple[float, ...] = ()
    """Grid, ``relu`` and ``jumprelu`` members: values of ``target_l0`` (> 0), instead of
    ``l1_coefficients`` / ``l0_coefficients`` (a sparsity sweep at the L0s asked for; the
    coefficients stay ``base``'s). ``jumprelu`` members get ``jumprelu_sparsity_loss_mode:
    quadratic``. Empty = the coefficient grids."""

    members: tuple[SAEConfig, ...] | None = None
    """Explicit member list instead of the grid (then leave ``architectures``, ``widths``, ``ks``,
    ``l1_coefficients`` and ``l0_coefficients`` empty). In YAML each entry is a mapping merged over
    ``base`` (e.g. ``{width: 2048, k: 16}``).

    ``matryoshka`` members (grid or explicit mapping) with no ``matryoshka_widths`` of their own
    (nor in ``base``) get :func:`default_matryoshka_widths` of their width
    (``width/8, width/4, width/2, width``); a ``base.matryoshka_widths`` is used as given and must
    fit every matryoshka width."""

    @model_validator(mode="before")
    @classmethod
    def _merge_members(cls, data: Any) -> Any:
        """Explicit members given as mappings: merged over ``base``; matryoshka widths derived."""
        if not isinstance(data, dict) or not data.get("members"):
            return data
        base = data.get("base")
        if isinstance(base, SAEConfig):
            base_data: dict[str, Any] = base.model_dump()
        elif isinstance(base, dict):
            base_data = dict(base)
        else:
            base_data = {}
        merged: list[Any] = []
        for m in data["members"]:
            if isinstance(m, dict):
                m = {**base_data, **m}
                if m.get("architecture") == "matryoshka" and m.get("matryoshka_widths") is None:
                    m["matryoshka_widths"] = default_matryoshka_widths(int(m.get("width", SAEConfig.model_fields["width"].default)))
            merged.append(m)
        return {**data, "members": merged}

    @model_validator(mode="after")
    def _check(self) -> "FamilyConfig":
        grid_fields = ("architectures", "widths", "ks", "l1_coefficients", "l0_coefficients", "target_l0s")
        if self.members is not None:
            given = [f for f in grid_fields if getattr(self, f)]
            if given:
                raise ValueError(f"family: give either an explicit members list or the grid, not both "
                                 f"(members is set, and so is {', '.join(given)})")
            if not self.members:
                raise ValueError("family.members is empty: list at least one SAE (or use the grid fields)")
        else:
            for a in self.architectures:
                if a not in REGISTRY:
                    raise ValueError(f"family.architectures: unknown SAE architecture {a!r}; registered architectures: "
                                     f"{', '.join(sorted(REGISTRY))}")
            for w in self.widths:
                if w < 1:
                    raise ValueError(f"family.widths: width {w} must be >= 1")
            for k in self.ks:
                if k < 1:
                    raise ValueError(f"family.ks: k={k} must be >= 1")
            for name in ("l1_coefficients", "l0_coefficients"):
                for c in getattr(self, name):
                    if not (c >= 0 and c != float("inf")):
                        raise ValueError(f"family.{name}: {c} is not a non-negative finite coefficient")
            for t in self.target_l0s:
                if not (t > 0 and t != float("inf")):
                    raise ValueError(f"family.target_l0s: {t} is not a positive finite L0")
            archs = self.architectures or (self.base.architecture,)
            if self.target_l0s:
                if not any(a in TARGET_L0_ARCHITECTURES for a in archs):
                    raise ValueError(f"family.target_l0s is set but no architecture in {list(archs)} uses it (it applies "
                                     f"to {', '.join(TARGET_L0_ARCHITECTURES)}): remove it or add such an architecture")
                both = [f for f in ("l1_coefficients", "l0_coefficients") if getattr(self, f)]
                if both:
                    raise ValueError(f"family: give target_l0s or {' / '.join(both)}, not both (target_l0s sweeps "
                                     f"relu / jumprelu members by L0; their coefficients then come from base)")
            for field_name in ("ks", "l1_coefficients", "l0_coefficients"):
                if getattr(self, field_name) and not any(SPARSITY_FIELDS.get(a, ("",))[0] == field_name for a in archs):
                    users = sorted(a for a, (f, _) in SPARSITY_FIELDS.items() if f == field_name)
                    raise ValueError(f"family.{field_name} is set but no architecture in {list(archs)} uses it "
                                     f"(it applies to {', '.join(users)}): remove it or add such an architecture")
        members = self.expand()  # validates every member
        seen: dict[str, int] = {}
        for i, m in enumerate(members):
            key = json.dumps(m.fingerprint_payload(), sort_keys=True)
            if key in seen:
                raise ValueError(f"family has duplicate members: #{seen[key] + 1} and #{i + 1} are both "
                                 f"'{describe_sae(m)}' with identical settings; remove one")
            seen[key] = i
        return self

    def expand(self) -> list[SAEConfig]:
        """The members as validated :class:`SAEConfig` s, in grid order (or the ``members`` order)."""
        if self.members is not None:
            return list(self.members)
        base = self.base.model_dump()
        out: list[SAEConfig] = []
        for arch in self.architectures or (self.base.architecture,):
            grid_field, sae_field = SPARSITY_FIELDS.get(arch, ("", ""))
            if self.target_l0s and arch in TARGET_L0_ARCHITECTURES:
                grid_field, sae_field = "target_l0s", "target_l0"
            values = getattr(self, grid_field, ()) if grid_field else ()
            values = values or ((base[sae_field],) if sae_field else (None,))
            for width in self.widths or (self.base.width,):
                for v in values:
                    update: dict[str, Any] = {"architecture": arch, "width": width}
                    if sae_field:
                        update[sae_field] = v
                    if arch == "matryoshka" and base.get("matryoshka_widths") is None:
                        update["matryoshka_widths"] = default_matryoshka_widths(width)
                    if arch == "jumprelu" and sae_field == "target_l0":
                        update["jumprelu_sparsity_loss_mode"] = "quadratic"
                    label = f"{arch} width={width}" + (f" {sae_field}={v}" if sae_field else "")
                    try:
                        out.append(SAEConfig.model_validate({**base, **update}))
                    except ValidationError as exc:
                        msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                        raise ValueError(f"family member '{label}' is invalid: {msgs}") from None
        return out
