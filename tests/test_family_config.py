"""FamilyConfig: grid / explicit expansion, derived Matryoshka levels, fingerprints, bad input."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from saeflow.artifacts import ArtifactRef
from saeflow.config import PipelineConfig, TrainConfig, load_config
from saeflow.saes import FamilyConfig, SAEConfig, default_matryoshka_widths, describe_sae
from tasks import train


def test_grid_order_and_sparsity_fields():
    fam = FamilyConfig(base=SAEConfig(dead_feature_window=7), architectures=("topk", "relu", "jumprelu"),
                       widths=(64, 128), ks=(4, 8), l1_coefficients=(0.5,), l0_coefficients=(0.1, 0.2))
    assert [describe_sae(m) for m in fam.expand()] == [
        "topk width=64 k=4", "topk width=64 k=8", "topk width=128 k=4", "topk width=128 k=8",
        "relu width=64 l1=0.5", "relu width=128 l1=0.5",
        "jumprelu width=64 l0=0.1", "jumprelu width=64 l0=0.2", "jumprelu width=128 l0=0.1", "jumprelu width=128 l0=0.2",
    ]
    assert all(m.dead_feature_window == 7 for m in fam.expand())  # shared fields come from base


def test_target_l0_grid_sweeps_relu_and_jumprelu_by_l0():
    fam = FamilyConfig(base=SAEConfig(l1_coefficient=0.3, l0_coefficient=2.0), architectures=("topk", "relu", "jumprelu"),
                       widths=(64,), ks=(8,), target_l0s=(4, 16))
    members = fam.expand()
    assert [describe_sae(m) for m in members] == [
        "topk width=64 k=8", "relu width=64 target_l0=4", "relu width=64 target_l0=16",
        "jumprelu width=64 target_l0=4", "jumprelu width=64 target_l0=16"]
    relu, jump = members[1], members[3]
    assert relu.l1_coefficient == 0.3 and relu.jumprelu_sparsity_loss_mode == "step"  # start value from base
    assert jump.jumprelu_sparsity_loss_mode == "quadratic" and jump.l0_coefficient == 2.0 and jump.target_l0 == 4
    assert members[0].target_l0 is None


def test_target_l0_fields_leave_existing_fingerprints_alone():
    """An SAE without target_l0 has the payload it had before the target-L0 fields existed."""
    payload = SAEConfig(architecture="relu", width=64).fingerprint_payload()
    assert "target_l0" not in payload and "l1_controller_gain" not in payload
    with_target = SAEConfig(architecture="relu", width=64, target_l0=8).fingerprint_payload()
    assert with_target["target_l0"] == 8 and with_target["l1_controller_gain"] == 0.02
    assert SAEConfig(architecture="relu", width=64, target_l0=8, l1_controller_gain=0.05).fingerprint_payload() != with_target


@pytest.mark.parametrize("kw,message", [
    ({"architecture": "topk", "target_l0": 8}, r"target_l0 applies to relu, jumprelu, not 'topk' \(its sparsity is k: set k=8"),
    ({"architecture": "relu", "width": 64, "target_l0": 65}, "target_l0=65 exceeds width=64"),
    ({"architecture": "jumprelu", "jumprelu_sparsity_loss_mode": "quadratic"}, "'quadratic' needs target_l0"),
    ({"architecture": "jumprelu", "target_l0": 8}, "jumprelu with target_l0 needs jumprelu_sparsity_loss_mode: quadratic"),
    ({"architecture": "relu", "target_l0": 0}, "greater than 0"),
])
def test_bad_target_l0_is_refused(kw, message):
    with pytest.raises(ValidationError, match=message):
        SAEConfig.model_validate(kw)


def test_empty_grid_fields_default_to_base():
    base = SAEConfig(width=256, k=16, aux_k=8)
    assert FamilyConfig(base=base).expand() == [base]
    assert FamilyConfig(base=base, ks=(4, 16)).expand()[1] == base


def test_member_fingerprints_match_the_single_sae_run():
    acts = ArtifactRef(stage="activations", fingerprint="abc", path="/x/activations/abc")
    single = SAEConfig(width=128, k=8)
    fam = FamilyConfig(widths=(64, 128), ks=(8,)).expand()
    tc = TrainConfig()
    assert train.ref(acts, fam[1], tc, "/x") == train.ref(acts, single, tc, "/x")
    assert train.family_refs(acts, fam, tc, "/x")[1] == train.ref(acts, single, tc, "/x")


def test_matryoshka_levels_are_derived_from_each_width():
    fam = FamilyConfig(architectures=("matryoshka",), widths=(1024, 4), ks=(2,))
    assert [m.matryoshka_widths for m in fam.expand()] == [(128, 256, 512, 1024), (1, 2, 4)]
    assert default_matryoshka_widths(1) == (1,)
    # explicit base levels are used as given and must fit every width
    fam = FamilyConfig(base=SAEConfig(architecture="matryoshka", width=256, matryoshka_widths=(16, 64)), widths=(128, 256))
    assert [m.effective_matryoshka_widths() for m in fam.expand()] == [(16, 64, 128), (16, 64, 256)]
    with pytest.raises(ValidationError, match="matryoshka width=32 k=32' is invalid: .*beyond width=32"):
        FamilyConfig(base=SAEConfig(architecture="matryoshka", width=256, matryoshka_widths=(16, 64)), widths=(32,))


def test_explicit_members_are_merged_over_base():
    fam = FamilyConfig.model_validate({"base": {"k": 8, "dead_feature_window": 9},
                                       "members": [{"width": 64}, {"architecture": "matryoshka", "width": 128, "k": 4}]})
    a, b = fam.expand()
    assert (a.width, a.k, a.dead_feature_window) == (64, 8, 9)
    assert (b.architecture, b.k, b.matryoshka_widths, b.dead_feature_window) == ("matryoshka", 4, (16, 32, 64, 128), 9)
    full = SAEConfig(width=32, k=2)
    assert FamilyConfig(members=(full,)).expand() == [full]


@pytest.mark.parametrize("kw,message", [
    ({"members": [{"width": 64}], "widths": [64]}, "either an explicit members list or the grid, not both"),
    ({"members": []}, "family.members is empty"),
    ({"architectures": ["topk"], "l1_coefficients": [0.1]}, r"family.l1_coefficients is set but no architecture .* relu"),
    ({"architectures": ["relu"], "ks": [4]}, r"family.ks is set but no architecture"),
    ({"widths": [0]}, "width 0 must be >= 1"),
    ({"ks": [0]}, "k=0 must be >= 1"),
    ({"architectures": ["relu"], "l1_coefficients": [float("nan")]}, "nan is not a non-negative finite coefficient"),
    ({"architectures": ["topk", "gated"]}, "unknown SAE architecture 'gated'; registered architectures: batchtopk"),
    ({"members": [{"architecture": "gated"}]}, "unknown SAE architecture 'gated'"),
    ({"architectures": ["relu", "relu"]}, r"duplicate members: #1 and #2 are both 'relu width=4096 l1=1'"),
    ({"architectures": ["topk"], "target_l0s": [8]}, r"family.target_l0s is set but no architecture .* relu, jumprelu"),
    ({"architectures": ["relu"], "target_l0s": [8], "l1_coefficients": [1]}, "give target_l0s or l1_coefficients, not both"),
    ({"architectures": ["relu"], "target_l0s": [0]}, "0 is not a positive finite L0"),
])
def test_bad_families_are_refused(kw, message):
    with pytest.raises(ValidationError, match=message):
        FamilyConfig.model_validate(kw)


def test_pipeline_config_family_replaces_sae():
    assert PipelineConfig().sae_configs() == [SAEConfig()]
    cfg = PipelineConfig.model_validate({"family": {"widths": [64, 128], "ks": [8]}})
    assert [m.width for m in cfg.sae_configs()] == [64, 128]
    with pytest.raises(ValidationError, match="set either sae"):
        PipelineConfig.model_validate({"sae": {"width": 64}, "family": {"widths": [64]}})


SHIPPED = sorted(p.name for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_the_shipped_profiles_are_the_documented_ones():
    assert {"quick.yaml", "quick-evals.yaml", "smoke.yaml", "paper-gemma-2-2b.yaml", "gemma-scope-2.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("profile", SHIPPED)
def test_every_shipped_profile_loads(profile):
    """The profiles users run (README, prefect.yaml) parse and validate; quick-evals extends quick
    and shares its model, activations and family, so only the evaluations run after `make run`."""
    configs = Path(__file__).resolve().parent.parent / "configs"
    cfg = load_config(configs / profile)
    assert cfg.sae_configs()
    if profile == "quick-evals.yaml":
        quick = load_config(configs / "quick.yaml")
        assert (cfg.model, cfg.corpus, cfg.activations, cfg.family, cfg.train) == \
               (quick.model, quick.corpus, quick.activations, quick.family, quick.train)
        assert all(getattr(cfg, e) is not None for e in ("absorption", "stitching", "meta_sae", "probing"))


def test_the_matryoshka_aux_flag_keys_only_matryoshka_fingerprints():
    """Its default changed to True (issue #28): matryoshka members get a new fingerprint payload, every
    other architecture (on which the flag does nothing) keeps the one it had with the old default."""
    mat = {"architecture": "matryoshka", "width": 64, "k": 4, "matryoshka_widths": (16, 64)}
    assert SAEConfig(**mat).use_matryoshka_aux_loss is True
    assert SAEConfig(**mat).fingerprint_payload() != SAEConfig(**mat, use_matryoshka_aux_loss=False).fingerprint_payload()
    for arch in ("topk", "batchtopk", "relu", "jumprelu"):
        payload = SAEConfig(architecture=arch, width=64, k=4).fingerprint_payload()
        assert payload == SAEConfig(architecture=arch, width=64, k=4, use_matryoshka_aux_loss=False).fingerprint_payload()
        assert payload["use_matryoshka_aux_loss"] is False
