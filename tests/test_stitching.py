"""SAE stitching (SPEC 2.3): planted ground truth, batched ΔMSE vs brute force, JumpReLU forms,
interpolation endpoints, pair validation and the pipeline stage on the tiny random model."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from saeflow.evals.stitching import (
    INACTIVE,
    NOVEL,
    RECONSTRUCTION,
    SAEInfo,
    StitchedSAE,
    StitchingConfig,
    StitchingError,
    adjacent_pair_for,
    check_pair,
    changing_events,
    classify,
    cosine_edges,
    count_violations,
    curve_points,
    decoder_cosines,
    evaluate_curve,
    event_mse_curve,
    event_states,
    find_pairs,
    insertion_delta_mse,
    interpolation_events,
    make_jumprelu,
    proxy_auc,
    stitched_sae,
    tau_sweep,
    to_jumprelu,
)
from saeflow.metrics import reconstruction_metrics
from saeflow.saes import SAEConfig, build_sae

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- planted ground truth
def _planted(n_rows: int = 4000, noise: float = 0.01, seed: int = 0, b_dec_shift: float = 0.0):
    """Data from 16 known atoms in d=32 (plus an offset mu when ``b_dec_shift``) and two SAEs built
    on them (all ReLU-style, θ = 0).

    S (8 latents) = e_0..e_7. The data's atoms (and L's 16 latents, encoder = pinv of the decoder):
    - split latents 0..7: for a in 0..3, v_a / w_a = normalise(e_a ± 0.5 e_{12+a}) (never together)
      -> S's latent a is their parent: inserting one alone over-counts (reconstruction);
    - duplicates 8..11: e_4..e_7, exactly S's latents 4..7 (reconstruction);
    - novel 12..15: e_8..e_11, directions S has nothing for (novel).
    """
    g = torch.Generator().manual_seed(seed)
    d = 32
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    e = Q.T  # orthonormal rows e_0..e_31
    atoms = []
    for a in range(4):
        atoms += [e[a] + 0.5 * e[12 + a], e[a] - 0.5 * e[12 + a]]
    atoms += [e[a] for a in range(4, 8)] + [e[b] for b in range(8, 12)]
    G = torch.stack([x / x.norm() for x in atoms])  # [16, d]
    coef = torch.rand(n_rows, 16, generator=g) * 1.0 + 0.5
    on = torch.rand(n_rows, 16, generator=g) < 0.15
    pick = torch.rand(n_rows, 4, generator=g) < 0.5  # split pairs are mutually exclusive
    on[:, 0:8:2] &= pick
    on[:, 1:8:2] &= ~pick
    mu = 0.5 * torch.randn(d, generator=g) * (b_dec_shift > 0)
    x = mu + (coef * on) @ G + noise * torch.randn(n_rows, d, generator=g)
    # S decodes with b_dec = mu + delta (delta partly along the novel atom e_8), L with b_dec = mu
    delta = b_dec_shift * (e[31] + 0.3 * e[8])
    DS = e[:8].clone()
    S = make_jumprelu(DS.T.clone(), torch.zeros(8), DS, mu + delta, torch.zeros(8))
    W = torch.linalg.pinv(G)  # [d, 16]
    L = make_jumprelu(W, torch.zeros(16), G, mu.clone(), torch.zeros(16))
    truth = np.array([RECONSTRUCTION] * 12 + [NOVEL] * 4, dtype=object)
    return x, S, L, truth


def test_planted_classes_recovered_exactly():
    x, S, L, truth = _planted()
    ins = insertion_delta_mse(S, L, [x[:1500], x[1500:]])
    classes = classify(ins["delta_mse"], ins["fires"])
    assert list(classes) == list(truth)
    s, match = decoder_cosines(S, L)
    s, match = s.numpy(), match.numpy()
    # splits match their parent with cosine 1/sqrt(1.25), duplicates with 1, novel with ~0
    np.testing.assert_allclose(s[:8], 1 / np.sqrt(1.25), atol=1e-5)
    np.testing.assert_allclose(s[8:12], 1.0, atol=1e-5)
    assert np.all(s[12:] < 1e-4)
    assert list(match[:12]) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7]
    assert proxy_auc(s, classes) == 1.0
    sweep = tau_sweep(s, classes, [0.5, 0.95])
    assert sweep["accuracy"].tolist() == [1.0, 0.5]  # at 0.95 the 8 splits (cos 0.894) count as novel too
    assert ins["mse_small"] > 0


def test_planted_classes_recovered_with_different_b_dec():
    """S and L centre differently; the re-centred encoder bias makes L's latents fire as in L."""
    x, S, L, truth = _planted(b_dec_shift=0.3, seed=1)
    ins = insertion_delta_mse(S, L, [x])
    assert list(classify(ins["delta_mse"], ins["fires"])) == list(truth)
    fine = event_mse_curve(S, L, x, interpolation_events(
        classify(ins["delta_mse"], ins["fires"]), ins["delta_mse"], *[a.numpy() for a in decoder_cosines(S, L)], S.d_sae))
    assert count_violations(fine) == 0
    assert fine[-1] < 0.05 * fine[0]  # L reconstructs the planted data up to noise


def _random_pair(seed: int = 0, d: int = 16, n_s: int = 12, n_l: int = 40):
    g = torch.Generator().manual_seed(seed)

    def one(n):
        W_dec = torch.randn(n, d, generator=g)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        return make_jumprelu(W_dec.T + 0.3 * torch.randn(d, n, generator=g), 0.1 * torch.randn(n, generator=g), W_dec,
                             0.2 * torch.randn(d, generator=g), 0.5 * torch.rand(n, generator=g))

    x = torch.randn(600, d, generator=g) * 1.5
    return x, one(n_s), one(n_l)


def _mse(sae, x) -> float:
    return reconstruction_metrics(sae, [x], "cpu")["mse"]


@pytest.mark.parametrize("adjust", [True, False])
def test_batched_delta_mse_equals_brute_force(adjust):
    x, S, L = _random_pair()
    ins = insertion_delta_mse(S, L, [x[:250], x[250:]], adjust_encoder_bias=adjust, latent_chunk=7)
    base = _mse(S, x)
    assert ins["mse_small"] == pytest.approx(base, rel=1e-6)
    keep = np.ones(S.d_sae, bool)
    brute = []
    for j in range(L.d_sae):
        incl = np.zeros(L.d_sae, bool)
        incl[j] = True
        brute.append(_mse(stitched_sae(S, L, keep, incl, adjust_encoder_bias=adjust), x) - base)
    np.testing.assert_allclose(ins["delta_mse"], brute, rtol=1e-4, atol=1e-5 * base)
    assert (ins["delta_mse"] < 0).any() and (ins["delta_mse"] > 0).any()  # both classes occur: a real check


def test_curve_points_skip_no_op_events():
    assert curve_points(10, 4) == [0, 2, 5, 8, 10]
    # only events 6..9 change anything: the points go there, not to the no-op swaps
    changes = np.array([False] * 6 + [True] * 4)
    assert curve_points(10, 3, changes) == [0, 8, 9, 10]
    assert curve_points(10, 4, np.zeros(10, bool)) == [0, 10]
    np.testing.assert_array_equal(changing_events(np.array([3.0, 3.0, 2.0, 2.0, 1.0])), [False, True, False, True])


def test_inactive_latents_and_auc_edge_cases():
    assert list(classify(np.array([-1.0, 0.0, 2.0, 0.0]), np.array([3, 0, 1, 5]))) == [NOVEL, INACTIVE, RECONSTRUCTION,
                                                                                       RECONSTRUCTION]
    assert np.isnan(proxy_auc(np.array([0.1, 0.2]), np.array([NOVEL, NOVEL])))
    # ties count one half
    assert proxy_auc(np.array([0.5, 0.5]), np.array([NOVEL, RECONSTRUCTION])) == 0.5
    assert count_violations([3.0, 2.0, 2.5, 1.0, 1.0]) == 1


def _rank_sum_auc(max_cos: np.ndarray, classes: np.ndarray) -> float:
    """The rank-sum (Mann-Whitney) AUC ``proxy_auc`` computed before it used scikit-learn (reference only)."""
    s, c = np.asarray(max_cos, dtype=np.float64), np.asarray(classes)
    active = c != INACTIVE
    s, y = -s[active], c[active] == NOVEL
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(s).rank(method="average").to_numpy()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_proxy_auc_agrees_with_the_rank_sum_formula():
    """``proxy_auc`` (sklearn's ``roc_auc_score``) = the former rank-sum AUC on random inputs, ties
    (cosines rounded to few values) and inactive latents included; NaN where one class is empty."""
    rng = np.random.default_rng(0)
    classes_all = np.array([NOVEL, RECONSTRUCTION, INACTIVE], dtype=object)
    for trial in range(300):
        n = int(rng.integers(1, 60))
        s = rng.uniform(-0.2, 1.0, n)
        if trial % 2:
            s = np.round(s, 1)  # many ties
        c = classes_all[rng.choice(3, size=n, p=rng.dirichlet(np.ones(3)))]
        new, old = proxy_auc(s, c), _rank_sum_auc(s, c)
        if np.isnan(old):
            assert np.isnan(new)
        else:
            assert new == pytest.approx(old, rel=1e-12, abs=1e-12)
    assert np.isnan(proxy_auc(np.array([0.3]), np.array([INACTIVE])))  # no active latent at all


def test_code_version_names_every_module_of_the_evaluation():
    import pkgutil

    import saeflow.evals.stitching as pkg
    from tasks import stitching as stages

    modules = {pkg.__name__} | {f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)}
    assert modules <= set(stages.CODE_MODULES)


def _assert_each_small_latent_removed_once(events, n_small: int) -> None:
    removed = [i for e in events for i in e.remove]
    assert sorted(removed) == list(range(n_small))
    assert events[-1].kind == "finish" and all(e.kind != "finish" for e in events[:-1])


@pytest.mark.parametrize("adjust, rule", [(True, "argmax"), (False, "argmax"), (True, "threshold"),
                                          (False, "threshold")])
def test_interpolation_endpoints_and_event_curve(adjust, rule):
    x, S, L = _random_pair(seed=3)
    ins = insertion_delta_mse(S, L, [x], adjust_encoder_bias=adjust)
    classes = classify(ins["delta_mse"], ins["fires"])
    s, m = (a.numpy() for a in decoder_cosines(S, L))
    events = interpolation_events(classes, ins["delta_mse"], s, m, S.d_sae, "cosine", "delta_mse", rule,
                                  cosine_edges(S, L, 0.5))
    _assert_each_small_latent_removed_once(events, S.d_sae)
    largest = max(len(e.remove) for e in events if e.kind == "swap")
    assert largest > 1 if rule == "threshold" else largest == 1
    states = list(event_states(events, S.d_sae, L.d_sae))
    assert states[-1][1].all() and states[-1][2]  # every L latent in, finished
    fine = event_mse_curve(S, L, x, events, adjust)
    assert len(fine) == len(events) + 1
    points = curve_points(len(events), 5)
    assert points[0] == 0 and points[-1] == len(events)
    curve = evaluate_curve(S, L, events, points, lambda sae: reconstruction_metrics(sae, [x], "cpu"), adjust)
    # endpoints are S and L themselves
    rs, rl = reconstruction_metrics(S, [x], "cpu"), reconstruction_metrics(L, [x], "cpu")
    for key in ("mse", "explained_variance", "l0"):
        assert curve[key].iloc[0] == pytest.approx(rs[key], rel=1e-6)
        assert curve[key].iloc[-1] == pytest.approx(rl[key], rel=1e-6)
    assert curve["n_latents"].iloc[0] == S.d_sae and curve["n_latents"].iloc[-1] == L.d_sae
    # the exact per-event MSE agrees with the metrics code on the stitched SAEs at every point
    np.testing.assert_allclose(fine[points], curve["mse"], rtol=1e-5)
    # the first inserts are exactly the single-insertion ΔMSEs
    first = events[0]
    assert first.kind == "insert"
    assert fine[1] - fine[0] == pytest.approx(ins["delta_mse"][first.add[0]], rel=1e-4, abs=1e-7)


def _topk_pair(seed: int = 0, d: int = 64):
    """TopK S (24 latents, encoder = decoder transposed) and L (60: 10 copies of S's latents, 50
    random); data = sparse sums of S's atoms and of L's random atoms, so both classes occur."""
    g = torch.Generator().manual_seed(seed)
    S = build_sae(SAEConfig(architecture="topk", width=24, k=6, normalize_activations="none"), d, seed)
    L = build_sae(SAEConfig(architecture="topk", width=60, k=6, normalize_activations="none"), d, seed + 1)
    with torch.no_grad():
        for sae in (S, L):
            u = torch.randn(sae.d_sae, d, generator=g)
            sae.W_dec.copy_(u / u.norm(dim=1, keepdim=True) * (1 + torch.rand(sae.d_sae, 1, generator=g)))
            sae.W_enc.copy_(sae.W_dec.T / sae.W_dec.norm(dim=1) ** 2)
        L.W_enc[:, :10] = S.W_enc[:, :10]
        L.W_dec[:10] = S.W_dec[:10]
    atoms = torch.cat([S.W_dec, L.W_dec[10:]])
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    on = torch.rand(700, atoms.shape[0], generator=g) < 0.05
    x = (on * (1 + torch.rand(700, atoms.shape[0], generator=g))) @ atoms + 0.05 * torch.randn(700, d, generator=g)
    return x, S, L


@pytest.mark.parametrize("adjust", [True, False])
def test_native_topk_delta_mse_equals_brute_force(adjust):
    x, S, L = _topk_pair()
    ins = insertion_delta_mse(S, L, [x[:300], x[300:]], adjust_encoder_bias=adjust, latent_chunk=13)
    base = _mse(S, x)
    keep = np.ones(S.d_sae, bool)
    brute = []
    for j in range(L.d_sae):
        incl = np.zeros(L.d_sae, bool)
        incl[j] = True
        stitched = stitched_sae(S, L, keep, incl, adjust_encoder_bias=adjust)
        assert isinstance(stitched, StitchedSAE)
        brute.append(_mse(stitched, x) - base)
    np.testing.assert_allclose(ins["delta_mse"], brute, rtol=1e-4, atol=1e-5 * base)
    assert (ins["delta_mse"] < 0).any() and (ins["delta_mse"] > 0).any()


@pytest.mark.parametrize("rule", ["argmax", "threshold"])
def test_native_topk_interpolation_endpoints_are_the_topk_saes(rule):
    x, S, L = _topk_pair(seed=4)
    ins = insertion_delta_mse(S, L, [x])
    classes = classify(ins["delta_mse"], ins["fires"])
    s, m = (a.numpy() for a in decoder_cosines(S, L))
    events = interpolation_events(classes, ins["delta_mse"], s, m, S.d_sae, swap_rule=rule,
                                  edges=cosine_edges(S, L, 0.3))
    _assert_each_small_latent_removed_once(events, S.d_sae)
    fine = event_mse_curve(S, L, x, events)
    points = curve_points(len(events), 4)
    curve = evaluate_curve(S, L, events, points, lambda sae: reconstruction_metrics(sae, [x], "cpu"))
    rs, rl = reconstruction_metrics(S, [x], "cpu"), reconstruction_metrics(L, [x], "cpu")
    for key in ("mse", "explained_variance", "l0"):
        assert curve[key].iloc[0] == pytest.approx(rs[key], rel=1e-6)
        assert curve[key].iloc[-1] == pytest.approx(rl[key], rel=1e-6)
    assert rs["l0"] == pytest.approx(6.0, abs=0.5)
    np.testing.assert_allclose(fine[points], curve["mse"], rtol=1e-5)
    # a stitched TopK state: S's kept latents fire with S's top-k, L's with L's
    keep, incl = np.ones(S.d_sae, bool), np.zeros(L.d_sae, bool)
    keep[:5] = False
    incl[[1, 7]] = True
    st = stitched_sae(S, L, keep, incl)
    f = st.encode(x)
    torch.testing.assert_close(f[:, :S.d_sae - 5], S.encode(x)[:, 5:] * S.W_dec.norm(dim=1)[5:] / S.W_dec.norm(dim=1)[5:])


# ----------------------------------------------------------------------------- swap rules
def _shared_parent_pair():
    """S = e_0..e_3 (d = 8); L: j0 = normalise(e_0 + 0.8 e_1) (cos 0.78 / 0.62 with S's 0 / 1),
    j1 = e_2, j2 = normalise(e_1 + 0.9 e_3) (cos 0.74 / 0.67 with S's 1 / 3), j3 = e_5 (novel).
    ReLU-style (θ = 0), encoder = decoder transposed; L's decoder is not orthogonal, so L's encoder
    is its pseudo-inverse (θ = 1e-6: round-off of the pseudo-inverse does not fire)."""
    e = torch.eye(8)
    S = make_jumprelu(e[:4].T.clone(), torch.zeros(4), e[:4].clone(), torch.zeros(8), torch.zeros(4))
    G = torch.stack([e[0] + 0.8 * e[1], e[2], e[1] + 0.9 * e[3], e[5]])
    G = G / G.norm(dim=1, keepdim=True)
    L = make_jumprelu(torch.linalg.pinv(G), torch.zeros(4), G, torch.zeros(8), torch.full((4,), 1e-6))
    return S, L, G


def test_threshold_swap_removes_every_small_latent_above_tau():
    S, L, _ = _shared_parent_pair()
    s, m = (a.numpy() for a in decoder_cosines(S, L))
    assert list(m)[:3] == [0, 2, 1]
    edges = cosine_edges(S, L, 0.5)
    assert sorted(zip(*edges)) == [(0, 0), (0, 1), (1, 2), (2, 1), (2, 3)]
    classes = np.array([RECONSTRUCTION, RECONSTRUCTION, RECONSTRUCTION, NOVEL], dtype=object)
    d = np.array([0.1, 0.2, 0.3, -1.0])
    argmax = interpolation_events(classes, d, s, m, 4)
    assert [(e.kind, e.add, e.remove) for e in argmax] == [
        ("insert", [3], []), ("swap", [1], [2]), ("swap", [0], [0]), ("swap", [2], [1]), ("finish", [], [3])]
    # j0 and j2 share S latent 1 (both cos >= 0.5): one component, swapped together, 1 and 3 leave with them
    thr = interpolation_events(classes, d, s, m, 4, swap_rule="threshold", edges=edges)
    assert [(e.kind, e.add, e.remove) for e in thr] == [
        ("insert", [3], []), ("swap", [1], [2]), ("swap", [0, 2], [0, 1, 3]), ("finish", [], [])]
    # a novel latent's edges are ignored (it is inserted, it removes nothing)
    only0 = interpolation_events(np.array([RECONSTRUCTION, NOVEL, NOVEL, NOVEL], dtype=object), d, s, m, 4,
                                 swap_rule="threshold", edges=edges)
    assert [(e.kind, e.add, e.remove) for e in only0 if e.kind == "swap"] == [("swap", [0], [0, 1])]
    for events in (argmax, thr, only0):
        _assert_each_small_latent_removed_once(events, 4)
    # tau above every cosine: the threshold rule is the argmax rule
    assert [(e.kind, e.add, e.remove) for e in interpolation_events(
        classes, d, s, m, 4, swap_rule="threshold", edges=cosine_edges(S, L, 1.01))] == \
        [(e.kind, e.add, e.remove) for e in argmax]


def test_threshold_swap_keeps_the_curve_flat_where_argmax_double_counts():
    """Data on L's atoms j0 and j1 only: S and L both reconstruct it exactly. Swapping j0 in for
    S's latent 0 alone (argmax) leaves S's latent 1 counting e_1 twice; the threshold rule takes it
    out in the same swap."""
    S, L, G = _shared_parent_pair()
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(500, 2, generator=g) + 0.5) @ G[:2]
    s, m = (a.numpy() for a in decoder_cosines(S, L))
    ins = insertion_delta_mse(S, L, [x])
    classes = classify(ins["delta_mse"], ins["fires"])
    assert list(classes) == [RECONSTRUCTION, RECONSTRUCTION, INACTIVE, INACTIVE]
    fines = {}
    for rule in ("argmax", "threshold"):
        events = interpolation_events(classes, ins["delta_mse"], s, m, 4, swap_rule=rule, edges=cosine_edges(S, L, 0.5))
        fines[rule] = event_mse_curve(S, L, x, events)
        assert fines[rule][0] == pytest.approx(0.0, abs=1e-8) and fines[rule][-1] == pytest.approx(0.0, abs=1e-8)
    assert count_violations(fines["argmax"]) >= 1 and fines["argmax"].max() > 0.1
    assert fines["threshold"].max() < 1e-8  # exact at every event (round-off only)


def test_stitch_pair_uses_the_configured_swap_rule():
    from saeflow.evals.stitching import stitch_pair

    x, S, L = _topk_pair(seed=4)
    infos = [_info(0, S.d_sae, 6, d_in=S.d_in), _info(1, L.d_sae, 6, d_in=S.d_in)]
    mse = {}
    for rule in ("argmax", "threshold"):
        res = stitch_pair(S, L, x, StitchingConfig(swap_rule=rule, swap_tau=0.3, n_steps=2, ce_batches=0), *infos, "cpu")
        assert res.summary["swap_rule"] == rule
        assert (res.summary["largest_swap_removed"] > 1) == (rule == "threshold")
        _assert_each_small_latent_removed_once(res.events, S.d_sae)
        mse[rule] = res.event_mse
    assert mse["argmax"][[0, -1]] == pytest.approx(mse["threshold"][[0, -1]], rel=1e-9)  # same S and L


def test_swap_rule_options_are_checked():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="swap_rule"):
        StitchingConfig(swap_rule="all")
    with pytest.raises(ValidationError, match="swap_tau"):
        StitchingConfig(swap_tau=1.5)
    c = np.array([RECONSTRUCTION], dtype=object)
    one = (c, np.zeros(1), np.ones(1), np.zeros(1, np.int64), 1)
    with pytest.raises(StitchingError, match="unknown swap_rule 'all'"):
        interpolation_events(*one, swap_rule="all")
    with pytest.raises(StitchingError, match="needs the cosine edges"):
        interpolation_events(*one, swap_rule="threshold")


def test_swap_rule_and_tau_are_in_the_pair_cache_key():
    from tasks.stitching import _pair_cfg

    base = _pair_cfg(StitchingConfig())
    assert base["swap_rule"] == StitchingConfig().swap_rule
    assert _pair_cfg(StitchingConfig(swap_rule="argmax")) != _pair_cfg(StitchingConfig(swap_rule="threshold"))
    assert _pair_cfg(StitchingConfig(swap_tau=0.7)) != base


# ----------------------------------------------------------------------------- JumpReLU forms
def _trained_like(arch: str, seed: int = 0, width: int = 48, d: int = 16, **kw):
    kw.setdefault("decoder_init_norm", 0.1)  # the scale these synthetic weights were chosen for
    sae = build_sae(SAEConfig(architecture=arch, width=width, k=6, normalize_activations="none", **kw), d, seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        sae.W_dec.mul_(torch.rand(width, 1, generator=g) * 20 + 1)  # non-unit decoder norms
        sae.b_enc.copy_(0.05 * torch.randn(width, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d, generator=g))
    return sae


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk"])
def test_jumprelu_form_is_exact_for_threshold_architectures(arch):
    sae = _trained_like(arch)
    if arch == "jumprelu":
        sae.threshold.data = torch.rand(sae.d_sae) * 0.2
    if arch == "batchtopk":
        sae.topk_threshold.fill_(0.05)
    x = torch.randn(300, sae.d_in) * 2
    form = to_jumprelu(sae)
    torch.testing.assert_close(form(x), sae(x), rtol=1e-4, atol=1e-5)
    assert ((form.encode(x) > 0) == (sae.encode(x) > 0)).all()
    torch.testing.assert_close(form.W_dec.norm(dim=1), torch.ones(sae.d_sae))
    assert (sae.encode(x) > 0).any() and not (sae.encode(x) > 0).all()


@pytest.mark.parametrize("rescale", [True, False])
def test_topk_per_latent_thresholds_keep_each_latents_density(rescale):
    sae = _trained_like("topk", rescale_acts_by_decoder_norm=rescale)
    calib = torch.randn(2000, sae.d_in) * 2
    form = to_jumprelu(sae, calib, "per_latent")
    np.testing.assert_array_equal((form.encode(calib) > 0).sum(0).numpy(), (sae.encode(calib) > 0).sum(0).numpy())
    l0 = float((form.encode(calib) > 0).sum(1).float().mean())
    assert l0 == pytest.approx(float((sae.encode(calib) > 0).sum(1).float().mean()))
    # where the form fires it gives TopK's activation (the decoders agree after folding)
    held = torch.randn(500, sae.d_in) * 2
    with torch.no_grad():
        ev = 1 - (held - form(held)).pow(2).sum() / (held - held.mean(0)).pow(2).sum()
        ev_topk = 1 - (held - sae(held)).pow(2).sum() / (held - held.mean(0)).pow(2).sum()
    assert abs(float(ev - ev_topk)) < 0.15


def test_topk_global_threshold_keeps_total_l0():
    sae = _trained_like("topk", seed=2)
    calib = torch.randn(1500, sae.d_in) * 2
    form = to_jumprelu(sae, calib, "global")
    assert int((form.encode(calib) > 0).sum()) == int((sae.encode(calib) > 0).sum())
    th = form.threshold / 1.0
    assert th.unique().numel() > 1  # one θ in TopK units, scaled per latent by the folded decoder norms
    with pytest.raises(StitchingError, match="calibration"):
        to_jumprelu(sae)


# ----------------------------------------------------------------------------- pairing
def _info(i, width, k=16, hook="blocks.6.hook_resid_post", model="m", d_in=64, arch="topk"):
    return SAEInfo(index=i, architecture=arch, width=width, d_in=d_in, sparsity=float(k), hook=hook, model=model)


def test_automatic_pairs_of_the_quick_family():
    infos = [_info(0, 1024, 16), _info(1, 1024, 32), _info(2, 2048, 16), _info(3, 2048, 32), _info(4, 4096, 16),
             _info(5, 4096, 32)]
    assert find_pairs(infos, StitchingConfig()) == [(0, 2), (0, 4), (2, 4), (1, 3), (1, 5), (3, 5)]
    assert find_pairs(infos, StitchingConfig(adjacent_only=True)) == [(0, 2), (2, 4), (1, 3), (3, 5)]
    across = find_pairs(infos, StitchingConfig(pair_across_sparsity=True))
    assert (1, 2) in across and (0, 3) in across and len(across) == 12
    pairs = find_pairs(infos, StitchingConfig())
    assert adjacent_pair_for(4, pairs, infos) == (2, 4) and adjacent_pair_for(0, pairs, infos) is None
    other = infos + [_info(6, 8192, 16, hook="blocks.3.hook_resid_post")]
    assert all(6 not in p for p in find_pairs(other, StitchingConfig()))


@pytest.mark.parametrize("bad, msg", [
    (dict(hook="blocks.3.hook_resid_post"), "different hooks"),
    (dict(model="other"), "different models"),
    (dict(d_in=32), "d_in differs"),
    (dict(width=512), "not more than"),
    (dict(width=1024), "not more than"),
])
def test_pair_validation_errors(bad, msg):
    small = _info(0, 1024)
    large = _info(1, **{"width": 2048, **bad})
    with pytest.raises(StitchingError, match=msg):
        check_pair(small, large)
    with pytest.raises(StitchingError, match=msg):
        find_pairs([small, large], StitchingConfig(pairs=[[0, 1]]))


def test_explicit_pairs():
    infos = [_info(0, 1024), _info(1, 2048)]
    assert find_pairs(infos, StitchingConfig(pairs=[[0, 1]])) == [(0, 1)]
    with pytest.raises(StitchingError, match="not more than"):
        find_pairs(infos, StitchingConfig(pairs=[[1, 0]]))
    with pytest.raises(StitchingError, match="names SAE #5"):
        find_pairs(infos, StitchingConfig(pairs=[[0, 5]]))
    with pytest.raises(ValueError, match="two different SAE indices"):
        StitchingConfig(pairs=[[1, 1]])
    with pytest.raises(StitchingError, match="needs at least one latent"):
        make_jumprelu(torch.zeros(4, 0), torch.zeros(0), torch.zeros(0, 4), torch.zeros(4), torch.zeros(0))


def test_nan_rows_refused():
    x, S, L = _random_pair()
    x[3, 2] = float("nan")
    with pytest.raises(StitchingError, match="NaN"):
        insertion_delta_mse(S, L, [x])


# ----------------------------------------------------------------------------- pipeline
def test_pipeline_stitching_on_tiny_random(tmp_path):
    import flows.pipeline as fp
    from tests.helpers import tiny_config

    cfg = tiny_config(family={"architectures": ["topk"], "widths": [64, 128], "ks": [8]},
                      stitching={"n_tokens": 512, "calibration_tokens": 1024, "n_steps": 3, "ce_batches": 1,
                                 "ce_batch_size": 4})
    out = fp.pipeline(cfg, str(tmp_path))
    st = out.refs.evals["stitching"]
    assert st.per_sae[0] is not None and st.per_sae[1] is not None
    results = Path(out.refs.results.path)
    folder = results / "stitching"
    for name in ("stitching_pairs", "stitching_tau_sweep", "stitching_curves", "stitching_jumprelu_form"):
        assert (folder / f"{name}.parquet").is_file() and (folder / f"{name}.md").is_file()
    assert (folder / "max_cos_hist.png").stat().st_size > 1000 and (folder / "interpolation.png").is_file()
    pairs = pd.read_parquet(folder / "stitching_pairs.parquet")
    assert len(pairs) == 1 and pairs["small_width"].iloc[0] == 64 and pairs["large_width"].iloc[0] == 128
    row = pairs.iloc[0]
    assert row["n_novel"] + row["n_reconstruction"] + row["n_inactive"] == 128
    assert 0.0 <= row["novel_fraction"] <= 1.0
    curves = pd.read_parquet(folder / "stitching_curves.parquet")
    assert curves["events_done"].iloc[0] == 0 and curves["fraction_of_path"].iloc[-1] == 1.0
    assert curves["ce_with_sae"].notna().all()
    np.testing.assert_allclose(curves["mse"], curves["event_mse"], rtol=1e-4)
    # endpoints (form: native) = the TopK SAEs' own metrics on the same held-out rows
    forms = pd.read_parquet(folder / "stitching_jumprelu_form.parquet")
    assert curves["mse"].iloc[0] == pytest.approx(forms["original_mse"].iloc[0], rel=1e-5)
    assert curves["mse"].iloc[-1] == pytest.approx(forms["original_mse"].iloc[1], rel=1e-5)
    assert curves["l0"].iloc[0] == pytest.approx(8.0) and curves["l0"].iloc[-1] == pytest.approx(8.0)
    table = pd.read_parquet(results / "core_metrics.parquet")
    assert table["stitching_novel_fraction"].isna().tolist() == [True, False]
    assert table["stitching_jumprelu_explained_variance"].notna().all()
    again = fp.pipeline(cfg, str(tmp_path))
    assert again.cached["stitching"] is True


def test_run_refuses_saes_without_pairs(tmp_path):
    """The stitching subflow on SAEs of one width (only k differs): a clear error before any stage runs."""
    from types import SimpleNamespace

    from saeflow.artifacts import artifact_ref, begin, mark_complete
    from saeflow.config import PipelineConfig
    from flows.evals import stitching as evaluation

    saes = []
    for i, k in enumerate((4, 8)):
        ref = artifact_ref(tmp_path, "train", f"fp{i}")
        begin(ref, None)
        cfg = SAEConfig(width=64, k=k)
        (ref.dir / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 16, "d_sae": 64, "k": k,
                                                      "metadata": {"hook_name": "h", "model_name": "m"},
                                                      "saeflow": {"sae_config": cfg.model_dump(mode="json")}}))
        mark_complete(ref)
        saes.append(ref)

    def no_stage(*a, **k):
        raise AssertionError("no stage may run")

    ctx = SimpleNamespace(config=PipelineConfig(stitching=StitchingConfig()), saes=saes, stage=no_stage, stage_all=None)
    with pytest.raises(StitchingError, match="no \\(smaller, larger\\) pair"):
        evaluation.flow(ctx)
    ctx.config = PipelineConfig(stitching=StitchingConfig(pairs=[[0, 1]]))
    with pytest.raises(StitchingError, match="not more than"):
        evaluation.flow(ctx)


def test_wide_sae_row_blocks_give_the_one_block_numbers(monkeypatch):
    """A pair whose latents exceed ENCODE_BLOCK_ELEMENTS per batch is encoded in row blocks (a
    262k-latent L never holds [4096, 262144], issue #27): ΔMSE, firings, the event curve and the
    stitched SAE's latents equal the one-block computation."""
    x, S, L = _topk_pair(seed=5)
    ins = insertion_delta_mse(S, L, [x[:300], x[300:]])
    classes = classify(ins["delta_mse"], ins["fires"])
    s, m = (a.numpy() for a in decoder_cosines(S, L))
    events = interpolation_events(classes, ins["delta_mse"], s, m, S.d_sae)
    fine = event_mse_curve(S, L, x, events)
    keep, incl = np.ones(S.d_sae, bool), np.zeros(L.d_sae, bool)
    keep[:3], incl[[2, 5]] = False, True
    f = stitched_sae(S, L, keep, incl).encode(x)
    monkeypatch.setattr("saeflow.saes.base.ENCODE_BLOCK_ELEMENTS", 37 * L.d_sae)  # 37-row blocks
    blocked = insertion_delta_mse(S, L, [x[:300], x[300:]])
    np.testing.assert_array_equal(blocked["fires"], ins["fires"])
    np.testing.assert_allclose(blocked["delta_mse"], ins["delta_mse"], rtol=1e-5, atol=1e-7 * ins["mse_small"])
    assert blocked["mse_small"] == pytest.approx(ins["mse_small"], rel=1e-9)
    np.testing.assert_allclose(event_mse_curve(S, L, x, events), fine, rtol=1e-9)
    torch.testing.assert_close(stitched_sae(S, L, keep, incl).encode(x), f)
