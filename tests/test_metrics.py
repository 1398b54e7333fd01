"""Tests of saeflow.metrics against planted ground truth, closed forms and sae-lens 6.54.12."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from saeflow.metrics import DENSITY_HIST_EDGES, ce_metrics, max_cosine_similarity, reconstruction_metrics

# ------------------------------------------------------------------------------------------------
# Stand-in SAE (the real one lives in saeflow.saes; these tests must not depend on it)
# ------------------------------------------------------------------------------------------------


class TinySAE(nn.Module):
    """ReLU SAE: f = relu(x @ W_enc + b_enc), x_hat = f @ W_dec + b_dec (no b_dec pre-subtraction,
    so b_dec can plant a constant reconstruction error)."""

    def __init__(self, W_enc, b_enc, W_dec, b_dec):
        super().__init__()
        t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        self.W_enc = nn.Parameter(t(W_enc))
        self.b_enc = nn.Parameter(t(b_enc))
        self.W_dec = nn.Parameter(t(W_dec))
        self.b_dec = nn.Parameter(t(b_dec))
        self.d_in, self.d_sae = self.W_enc.shape

    def encode(self, x):
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec

    def forward(self, x):
        return self.decode(self.encode(x))


def identity_sae(d: int, shift=None) -> TinySAE:
    """Exact reconstruction with 2d ReLU latents: relu(x) - relu(-x) == x (bit-exact in float32),
    plus an optional constant decoder shift."""
    eye = np.eye(d)
    return TinySAE(
        np.concatenate([eye, -eye], axis=1), np.zeros(2 * d), np.concatenate([eye, -eye], axis=0),
        np.zeros(d) if shift is None else shift,
    )


def zero_sae(d: int, d_sae: int = 8) -> TinySAE:
    return TinySAE(np.zeros((d, d_sae)), np.zeros(d_sae), np.zeros((d_sae, d)), np.zeros(d))


def random_sae(d: int, d_sae: int, seed: int) -> TinySAE:
    g = np.random.default_rng(seed)
    return TinySAE(g.normal(size=(d, d_sae)) / math.sqrt(d), g.normal(size=d_sae) * 0.1,
                   g.normal(size=(d_sae, d)) / math.sqrt(d_sae), g.normal(size=d) * 0.1)


def batches_of(x: np.ndarray, sizes: list[int]) -> list[torch.Tensor]:
    assert sum(sizes) == len(x)
    out, start = [], 0
    for s in sizes:
        out.append(torch.as_tensor(x[start : start + s], dtype=torch.float32))
        start += s
    return out


def data(n: int, d: int, seed: int, offset: float = 0.0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return (g.normal(size=(n, d)) + offset * g.normal(size=d)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# reconstruction_metrics
# ------------------------------------------------------------------------------------------------


def test_perfect_reconstruction():
    x = data(300, 5, seed=0, offset=3.0)
    m = reconstruction_metrics(identity_sae(5), batches_of(x, [100, 200]), "cpu")
    assert m["n_tokens"] == 300
    assert m["mse"] == 0.0
    assert m["explained_variance"] == 1.0
    assert m["explained_variance_legacy"] == 1.0
    assert m["cossim"] == pytest.approx(1.0, abs=1e-12)
    assert m["l2_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert m["relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-12)
    assert m["l2_norm_in"] == pytest.approx(np.linalg.norm(x.astype(np.float64), axis=1).mean(), rel=1e-12)
    # latent i fires where x_i > 0, latent d+i where x_i < 0: one active latent per dimension
    assert m["l0"] == pytest.approx(5.0)
    assert m["l1"] == pytest.approx(np.abs(x.astype(np.float64)).sum(1).mean(), rel=1e-6)
    np.testing.assert_allclose(m["density"], np.concatenate([(x > 0).mean(0), (x < 0).mean(0)]))


def test_zero_sae_closed_form():
    """x_hat = 0: every number has a closed form computed here in numpy, independently."""
    x = data(200, 6, seed=1, offset=2.0)
    sizes = [50, 70, 80]
    m = reconstruction_metrics(zero_sae(6), batches_of(x, sizes), "cpu")
    x64 = x.astype(np.float64)
    sq = (x64**2).sum(1)
    total_var = sq.mean() - (x64.mean(0) ** 2).sum()
    legacy, start = [], 0
    for s in sizes:
        xb = x64[start : start + s]
        legacy.append(1 - (xb**2).sum(1) / ((xb - xb.mean(0)) ** 2).sum(1))
        start += s
    assert m["mse"] == pytest.approx(sq.mean(), rel=1e-12)
    assert m["explained_variance"] == pytest.approx(1 - sq.mean() / total_var, rel=1e-12)
    assert m["explained_variance"] < -1  # large offset: predicting 0 is much worse than the mean
    assert m["explained_variance_legacy"] == pytest.approx(np.concatenate(legacy).mean(), rel=1e-10)
    assert m["cossim"] == 0.0 and m["l2_norm_out"] == 0.0 and m["l2_ratio"] == 0.0
    assert math.isnan(m["relative_reconstruction_bias"])  # 0 / 0
    assert m["l0"] == 0.0 and m["l1"] == 0.0
    assert m["frac_alive"] == 0.0 and m["frac_dead"] == 1.0
    assert math.isnan(m["normalized_freq_over_1_percent"])  # nothing fires: undefined
    assert m["density_hist_counts"][0] == 8 and m["density_hist_counts"].sum() == 8


def test_explained_variance_forms_differ_with_mean_offset():
    """Documented example. x = mu + N(0, I_6) with |mu_d| ~ 100, reconstruction x_hat = x + delta
    with |delta|^2 = 0.6 for every token.

    * correct EV = 1 - 0.6 / E|x - Ex|^2 ~= 1 - 0.6/6 = 0.90 (expected value);
    * legacy EV = 1 - 0.6 * mean_t 1/|x_t - mean|^2 ~= 1 - 0.6 * E[1/chi2_6] = 1 - 0.6/4 = 0.85
      (mean of ratios, Jensen), i.e. it is biased low;
    * the SAEBench-0.6 zero-centred total (E|x|^2, SPEC 4 warning) would give ~= 0.99999.
    """
    n, d = 20_000, 6
    g = np.random.default_rng(2)
    x = (g.normal(size=(n, d)) + 100.0 * g.choice([-1.0, 1.0], size=d)).astype(np.float32)
    delta = np.full(d, math.sqrt(0.1))
    m = reconstruction_metrics(identity_sae(d, shift=delta), batches_of(x, [5000] * 4), "cpu")
    assert m["mse"] == pytest.approx(0.6, rel=1e-4)
    x64 = x.astype(np.float64)
    expected = 1 - 0.6 / ((x64 - x64.mean(0)) ** 2).sum(1).mean()
    assert m["explained_variance"] == pytest.approx(expected, abs=1e-4)
    assert m["explained_variance"] == pytest.approx(0.90, abs=0.005)
    assert m["explained_variance_legacy"] == pytest.approx(0.85, abs=0.01)
    zero_centred = 1 - 0.6 / (x64**2).sum(1).mean()
    assert zero_centred > 0.9999 and m["explained_variance"] < 0.91


def test_density_dead_dense_on_planted_latents():
    """Identity-encoder SAE on data where latent j fires on a chosen fraction of the tokens."""
    n, d = 1000, 5
    fire_frac = np.array([1.0, 0.5, 0.05, 0.005, 0.0])
    x = -np.ones((n, d), dtype=np.float32)
    for j, frac in enumerate(fire_frac):
        x[: int(round(frac * n)), j] = 2.0
    x = x[np.random.default_rng(3).permutation(n)]
    sae = TinySAE(np.eye(d), np.zeros(d), np.eye(d), np.zeros(d))
    m = reconstruction_metrics(sae, batches_of(x, [300, 700]), "cpu")
    np.testing.assert_allclose(m["density"], fire_frac)
    assert m["l0"] == pytest.approx(fire_frac.sum())
    assert m["l1"] == pytest.approx(2.0 * fire_frac.sum())
    assert m["frac_alive"] == pytest.approx(0.8) and m["frac_dead"] == pytest.approx(0.2)
    assert m["frac_dense"] == pytest.approx(0.4)  # density > 0.1: latents 0, 1
    assert m["freq_over_1_percent"] == pytest.approx(0.6)  # 1.0, 0.5, 0.05
    assert m["freq_over_10_percent"] == pytest.approx(0.4)
    assert m["normalized_freq_over_1_percent"] == pytest.approx(1.55 / 1.555)
    assert m["normalized_freq_over_10_percent"] == pytest.approx(1.5 / 1.555)
    counts, edges = m["density_hist_counts"], m["density_hist_edges"]
    np.testing.assert_array_equal(edges, DENSITY_HIST_EDGES)
    expected_bins = np.searchsorted(edges, np.log10(fire_frac + 1e-10), side="right") - 1
    expected_bins[fire_frac == 1.0] = len(counts) - 1  # log10(1 + 1e-10) > 0 lands in the last bin
    np.testing.assert_array_equal(counts, np.bincount(expected_bins, minlength=len(counts)))
    assert counts[0] == 1 and counts[-1] == 1 and counts.sum() == d
    m2 = reconstruction_metrics(sae, batches_of(x, [1000]), "cpu", dense_threshold=0.6)
    assert m2["frac_dense"] == pytest.approx(0.2)


def test_max_cosine_on_constructed_decoder():
    s = 1 / math.sqrt(2)
    W_dec = np.array([[1, 0, 0], [0, 1, 0], [3, 0, 0], [s, s, 0], [0, 0, -2]], dtype=np.float64)
    # rows 0 and 2 are duplicates (up to scale): max cos 1; row 1 and row 3 are best matched at
    # 1/sqrt2 (row 3 is at 45 degrees to rows 0, 1, 2); row 4 is orthogonal to everyone: 0
    expected = np.array([1.0, s, 1.0, s, 0.0])
    got = max_cosine_similarity(torch.tensor(W_dec, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    for chunk in (1, 2, 4):
        np.testing.assert_allclose(max_cosine_similarity(torch.tensor(W_dec), chunk_rows=chunk).numpy(), expected, atol=1e-6)

    g = np.random.default_rng(4)
    W_enc = g.normal(size=(3, 5))
    sae = TinySAE(W_enc, np.zeros(5), W_dec, np.zeros(3))
    m = reconstruction_metrics(sae, [torch.zeros(2, 3)], "cpu")
    assert m["average_max_decoder_cosine_sim"] == pytest.approx(expected.mean(), abs=1e-6)
    cols = W_enc / np.linalg.norm(W_enc, axis=0)
    sims = cols.T @ cols
    np.fill_diagonal(sims, -np.inf)
    assert m["average_max_encoder_cosine_sim"] == pytest.approx(sims.max(1).mean(), abs=1e-6)


def test_max_cosine_chunked_matches_bruteforce():
    v = torch.randn(37, 6, generator=torch.Generator().manual_seed(5))
    unit = v / v.norm(dim=1, keepdim=True)
    sims = unit @ unit.T
    sims.fill_diagonal_(-float("inf"))
    for chunk in (None, 1, 5, 36, 100):
        np.testing.assert_allclose(max_cosine_similarity(v, chunk_rows=chunk).numpy(), sims.max(1).values.numpy(),
                                   rtol=1e-6, atol=1e-6)


def test_streaming_equals_one_big_batch():
    x = data(500, 8, seed=6, offset=1.5)
    sae = random_sae(8, 24, seed=7)
    streamed = reconstruction_metrics(sae, batches_of(x, [1, 64, 200, 235]) + [torch.zeros(0, 8)], "cpu")
    whole = reconstruction_metrics(sae, batches_of(x, [500]), "cpu")
    assert streamed["n_tokens"] == whole["n_tokens"] == 500
    assert 0.0 < whole["frac_alive"] <= 1.0 and whole["l0"] > 0
    for key, value in whole.items():
        if key in ("explained_variance_legacy",):  # batch-dependent by definition (batch mean)
            continue
        np.testing.assert_allclose(streamed[key], value, rtol=1e-6, atol=1e-9, err_msg=key)
    # the 1-row batch makes the legacy denominator 0 (documented): not finite
    assert not math.isfinite(streamed["explained_variance_legacy"])


def test_against_sae_lens_metrics():
    """Run sae-lens 6.54.12's own get_sparsity_and_variance_metrics on the same rows (through a
    duck-typed model / activation store that serve the rows) and its ExplainedVarianceCalculator."""
    from sae_lens.evals import ExplainedVarianceCalculator, get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    hook, ctx, n_batches, prompts = "blocks.0.hook_resid_post", 10, 3, 4
    x = data(n_batches * prompts * ctx, 8, seed=8, offset=2.0)
    sae = random_sae(8, 24, seed=9)
    rows = torch.as_tensor(x)

    class Store:  # serves row indices as "tokens"
        i = 0

        def get_batch_tokens(self, n):
            out = torch.arange(self.i, self.i + n * ctx).reshape(n, ctx)
            self.i += n * ctx
            return out

    class Model:
        def run_with_cache(self, tokens, **kwargs):
            return None, {hook: rows[tokens]}

    sae.cfg = SimpleNamespace(d_sae=sae.d_sae, metadata=SimpleNamespace(hook_name=hook, hook_head_index=None))
    sae.device = torch.device("cpu")
    with torch.no_grad():
        ref, ref_feat = get_sparsity_and_variance_metrics(
            sae, Model(), Store(), ActivationScaler(), n_batches, True, True, True, True, prompts, {})
    ours = reconstruction_metrics(sae, rows.split(prompts * ctx), "cpu")
    for key in ("l0", "l1", "mse", "explained_variance", "explained_variance_legacy", "cossim",
                "l2_norm_in", "l2_norm_out", "l2_ratio"):
        assert ours[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
    np.testing.assert_allclose(ours["density"], ref_feat["feature_density"], rtol=1e-6)

    calc = ExplainedVarianceCalculator()
    with torch.no_grad():
        for b in rows.split(7):
            calc.add_batch(sae(b), b)
    assert ours["explained_variance"] == pytest.approx(calc.compute(), rel=1e-6)  # it squares in float32


# ------------------------------------------------------------------------------------------------
# ce_metrics
# ------------------------------------------------------------------------------------------------

HOOK = "blocks.0.hook_resid_post"
BOS, PAD = 0, 49


@pytest.fixture(scope="module")
def tiny_model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_vocab=50,
                                  act_fn="gelu", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg)
    model.eval()
    return model


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(10)
    toks = torch.randint(1, PAD, (6, 16), generator=g)
    toks[:, 0] = BOS
    toks[5, 12:] = PAD  # a padded context: its tail must drop out of the metric
    toks[3, 7] = PAD  # a special token mid-context: both the prediction of it and from it drop
    return toks


def _reference_ce(model, toks, ignore, hook_fn=None):
    """Independent per-token reference via transformer_lens' own loss_per_token."""
    fwd_hooks = [] if hook_fn is None else [(HOOK, hook_fn)]
    with torch.no_grad():
        logits = model.run_with_hooks(toks, return_type="logits", fwd_hooks=fwd_hooks)
        loss = model.loss_fn(logits, toks, per_token=True)  # [B, T-1]
    special = torch.isin(toks, torch.tensor(sorted(ignore)))
    counted = ~special[:, :-1] & ~special[:, 1:]
    return logits, loss, counted


def test_ce_identity_sae_is_exact(tiny_model, tokens):
    m = ce_metrics(tiny_model, identity_sae(32), HOOK, tokens, batch_size=4, ignore_token_ids={BOS, PAD})
    assert m["ce_with_sae"] == pytest.approx(m["ce_clean"], abs=1e-6)
    assert abs(m["kl_with_sae"]) < 1e-6
    assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert m["kl_div_score"] == pytest.approx(1.0, abs=1e-5)
    assert m["ce_delta"] == pytest.approx(0.0, abs=1e-6)
    # (a random model: ablation changes the loss, in either direction) so the scores are well defined
    assert abs(m["ce_with_ablation"] - m["ce_clean"]) > 0.01 and m["kl_with_ablation"] > 0.01
    # counted predictions: 6*15, minus the 6 made from BOS, minus context 5's from 11..14 (4),
    # minus context 3's 6->7 and 7->8 (2)
    assert m["n_tokens"] == 6 * 15 - 6 - 4 - 2


def test_ce_zero_sae_equals_ablation(tiny_model, tokens):
    m = ce_metrics(tiny_model, zero_sae(32), HOOK, tokens, batch_size=4, ignore_token_ids={BOS, PAD})
    assert m["ce_with_sae"] == pytest.approx(m["ce_with_ablation"], abs=1e-6)
    assert m["kl_with_sae"] == pytest.approx(m["kl_with_ablation"], rel=1e-6)
    assert m["ce_loss_score"] == pytest.approx(0.0, abs=1e-5)
    assert m["kl_div_score"] == pytest.approx(0.0, abs=1e-5)


def test_ce_matches_reference_and_batching(tiny_model, tokens):
    """Values equal an independent computation with transformer_lens' loss_fn and torch kl_div,
    where the splice/ablation leave BOS and PAD positions untouched; batch size does not matter."""
    ignore = {BOS, PAD}
    sae = random_sae(32, 64, seed=11)
    keep = ~torch.isin(tokens, torch.tensor(sorted(ignore)))

    def splice(act, hook):
        with torch.no_grad():
            return torch.where(keep[..., None], sae(act), act)

    def ablate(act, hook):
        return act * (~keep)[..., None]  # zero exactly the spliced (non-special) positions

    clean_logits, ce_clean, counted = _reference_ce(tiny_model, tokens, ignore)
    sae_logits, ce_sae, _ = _reference_ce(tiny_model, tokens, ignore, splice)
    abl_logits, ce_abl, _ = _reference_ce(tiny_model, tokens, ignore, ablate)

    def kl(new_logits):
        per = torch.nn.functional.kl_div(new_logits.log_softmax(-1), clean_logits.log_softmax(-1),
                                         log_target=True, reduction="none").sum(-1)[:, :-1]
        return per[counted].mean().item()

    expected = {"ce_clean": ce_clean[counted].mean().item(), "ce_with_sae": ce_sae[counted].mean().item(),
                "ce_with_ablation": ce_abl[counted].mean().item(), "kl_with_sae": kl(sae_logits),
                "kl_with_ablation": kl(abl_logits)}
    for bs in (1, 4, 6):
        m = ce_metrics(tiny_model, sae, HOOK, tokens, batch_size=bs, ignore_token_ids=ignore)
        for key, value in expected.items():
            assert m[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (bs, key)
    e = expected
    assert m["ce_loss_score"] == pytest.approx(
        (e["ce_with_ablation"] - e["ce_with_sae"]) / (e["ce_with_ablation"] - e["ce_clean"]), rel=1e-4)
    assert m["kl_div_score"] == pytest.approx((e["kl_with_ablation"] - e["kl_with_sae"]) / e["kl_with_ablation"], rel=1e-4)
    assert 0 < m["kl_with_sae"] and m["ce_with_sae"] != pytest.approx(m["ce_clean"], abs=1e-4)


def test_ce_agrees_with_sae_lens_get_recons_loss(tiny_model):
    """With BOS only at position 0 (no pads), sae-lens' splice (BOS untouched via ignore_tokens)
    and its CE mask (input token not BOS) coincide with ours; its KL additionally counts the last
    position, which we drop (no target there). Its zero-ablation also zeroes BOS, so
    ce_with_ablation is not compared."""
    from sae_lens.evals import get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler

    g = torch.Generator().manual_seed(12)
    toks = torch.randint(1, PAD, (4, 16), generator=g)
    toks[:, 0] = BOS
    sae = random_sae(32, 64, seed=13)
    sae.cfg = SimpleNamespace(metadata=SimpleNamespace(hook_name=HOOK, hook_head_index=None))
    sae.device = torch.device("cpu")
    ref = get_recons_loss(sae, tiny_model, ActivationScaler(), toks, compute_kl=True, compute_ce_loss=True,
                          ignore_tokens=[BOS])
    ours = ce_metrics(tiny_model, sae, HOOK, toks, batch_size=4, ignore_token_ids=[BOS])
    ce_mask = toks[:, :-1] != BOS
    assert ours["ce_clean"] == pytest.approx(ref["ce_loss_without_sae"][ce_mask].mean().item(), rel=1e-5)
    assert ours["ce_with_sae"] == pytest.approx(ref["ce_loss_with_sae"][ce_mask].mean().item(), rel=1e-5)
    assert ours["kl_with_sae"] == pytest.approx(ref["kl_div_with_sae"][:, :-1][ce_mask].mean().item(), rel=1e-4)


def test_ce_rejects_all_special(tiny_model):
    toks = torch.full((2, 16), PAD)
    with pytest.raises(ValueError, match="no counted positions"):
        ce_metrics(tiny_model, zero_sae(32), HOOK, toks, batch_size=2, ignore_token_ids={PAD})


def test_shared_reference_gives_the_same_numbers_for_every_sae(tiny_model, tokens):
    """A family reuses one clean/ablation reference: each SAE's numbers equal a fresh computation."""
    from saeflow.metrics import ce_reference

    ref = ce_reference(tiny_model, HOOK, tokens, 4, {BOS, PAD})
    for sae in (random_sae(32, 64, seed=1), random_sae(32, 64, seed=2), identity_sae(32)):
        shared = ce_metrics(tiny_model, sae, HOOK, tokens, 4, {BOS, PAD}, reference=ref)
        fresh = ce_metrics(tiny_model, sae, HOOK, tokens, 4, {BOS, PAD})
        assert shared == pytest.approx(fresh, rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="another hook"):
        ce_metrics(tiny_model, identity_sae(32), "blocks.0.hook_resid_pre", tokens, 4, {BOS, PAD}, reference=ref)


def test_latents_in_row_blocks_give_the_one_block_numbers(monkeypatch):
    """A batch whose latents would exceed ENCODE_BLOCK_ELEMENTS is encoded in row blocks (a 262k-latent
    SAE never holds [4096, 262144]); every metric equals the one-block computation, the
    batch-dependent legacy EV included (the batches are unchanged)."""
    x = data(500, 8, seed=6, offset=1.5)
    sae = random_sae(8, 24, seed=7)
    whole = reconstruction_metrics(sae, batches_of(x, [250, 250]), "cpu")
    monkeypatch.setattr("saeflow.saes.base.ENCODE_BLOCK_ELEMENTS", 64 * 24)  # 64-row blocks: 4 per batch
    blocked = reconstruction_metrics(sae, batches_of(x, [250, 250]), "cpu")
    assert whole["l0"] > 0
    for key, value in whole.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(blocked[key], value, err_msg=key)
        else:
            np.testing.assert_allclose(blocked[key], value, rtol=1e-12, atol=0, err_msg=key)


def test_average_max_cosine_samples_rows_of_a_wide_sae():
    """Above ``cosine_rows`` rows the average max cosine is a seeded sample of rows, each against every
    row (issue #27: all rows of a 262k x 640 decoder is 44 TFLOP): the sampled rows' values are the
    exact ones, the estimate lies within 4 standard errors of the exact mean; at or below it, exact."""
    from saeflow.metrics import average_max_cosine

    g = torch.Generator().manual_seed(11)
    v = torch.randn(3000, 16, generator=g)
    v[:300] += 3 * v[300:600]  # some near-duplicates, so the max cosines spread out
    exact = max_cosine_similarity(v).double()
    sub = torch.tensor([0, 5, 299, 2999])
    torch.testing.assert_close(max_cosine_similarity(v, subset=sub), exact[sub].float())
    whole = average_max_cosine(v, None)
    assert whole == {"mean": pytest.approx(float(exact.mean()), rel=1e-12), "rows": 3000, "se": 0.0}
    assert average_max_cosine(v, 3000) == whole
    est = average_max_cosine(v, 500, seed=1)
    assert est["rows"] == 500 and 0 < est["se"] < 0.02
    assert abs(est["mean"] - float(exact.mean())) < 4 * est["se"], (est, float(exact.mean()))
    assert average_max_cosine(v, 500, seed=1) == est  # seeded


def test_reconstruction_metrics_cosine_options(monkeypatch):
    x = data(300, 8, seed=2)
    sae = random_sae(8, 40, seed=3)
    full = reconstruction_metrics(sae, [x], "cpu")
    assert full["cosine_rows"] == 40 and full["average_max_decoder_cosine_sim_se"] == 0.0
    sampled = reconstruction_metrics(sae, [x], "cpu", cosine_rows=10)
    assert sampled["cosine_rows"] == 10 and sampled["average_max_encoder_cosine_sim_se"] > 0
    bare = reconstruction_metrics(sae, [x], "cpu", geometry=False)
    assert "average_max_decoder_cosine_sim" not in bare and bare["mse"] == full["mse"]
