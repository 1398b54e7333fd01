"""Meta-SAEs (SPEC 2.4): planted atoms are recovered, the trainer is the shared one and resumes,
the metrics follow SAEBench's formula, the cross-size sparse coding finds planted combinations, and
the evaluation runs end to end through the pipeline on the tiny random model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from saeflow.evals.common import sample_store_rows
from saeflow.evals.meta_sae import (
    MetaSAEConfig,
    MetaSAEInputError,
    RowSampler,
    cluster_sizes,
    decompose,
    decoder_variance_explained,
    max_cosines,
    meta_width,
    snippet,
    sparse_code,
    top_rows,
    train_meta_sae,
    unit_rows,
)
from saeflow.saes import BatchTopKSAE


@pytest.fixture
def one_thread():
    """Tiny models are dominated by thread hand-offs on a loaded 2-core machine: run them on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def planted_decoder(d: int = 32, n_atoms: int = 16, n: int = 512, seed: int = 0, noise: float = 0.01):
    """Rows = sums of 1..4 random unit atoms (weights 0.5..1.5) plus small noise."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    rows, support = [], []
    for _ in range(n):
        m = int(torch.randint(1, 5, (1,), generator=g))
        sel = torch.randperm(n_atoms, generator=g)[:m]
        w = torch.rand(m, generator=g) + 0.5
        rows.append((w[:, None] * atoms[sel]).sum(0) + noise * torch.randn(d, generator=g))
        support.append(sel)
    return torch.stack(rows), atoms, support


PLANTED_CFG = dict(width_ratio=32 / 512, k=4, train_steps=500, batch_size=256, lr=5e-3)


def test_meta_sae_recovers_planted_atoms(tmp_path, one_thread):
    D, atoms, _ = planted_decoder()
    meta, summary = train_meta_sae(D, MetaSAEConfig(**PLANTED_CFG), tmp_path / "meta")
    assert isinstance(meta, BatchTopKSAE) and meta.d_sae == 32 and summary["steps"] == 500
    W = meta.W_dec.detach()
    W = W / W.norm(dim=1, keepdim=True)
    best = (atoms @ W.T).max(dim=1).values
    assert float(best.min()) >= 0.9, best
    U = unit_rows(D)
    ev = decoder_variance_explained(meta, U, 4096)
    assert ev["fve"] > 0.95 and ev["l0"] == pytest.approx(4.0)
    # a decoder with no shared structure (random directions) is explained far worse by the same budget
    rand = torch.randn(512, 32, generator=torch.Generator().manual_seed(1))
    meta_r, _ = train_meta_sae(rand, MetaSAEConfig(**PLANTED_CFG), tmp_path / "rand")
    assert decoder_variance_explained(meta_r, unit_rows(rand), 4096)["fve"] < ev["fve"] - 0.2
    # decomposition: rows are reconstructed from few meta-latents; sizes count every (latent, meta) pair
    dec = decompose(meta, U, top=6)
    assert dec["meta_idx"].shape == (512, 6) and float(np.median(dec["recon_cos"])) > 0.95
    sizes = cluster_sizes(dec["pairs"], meta.d_sae)
    assert sizes.sum() == dec["n_active"].sum() == len(dec["pairs"])


def test_convergence_check_of_the_meta_sae_training(tmp_path, one_thread):
    """The full-decoder MSE at 90% of the steps against the end: 5 steps on planted data have not
    converged, 1000 have (the MSE still falls, by ~0.3% over the last 100 steps, under the 1% tolerance)."""
    D, _, _ = planted_decoder(noise=0.1)
    U = unit_rows(D)
    for steps, expected in ((5, False), (1000, True)):
        cfg = MetaSAEConfig(**{**PLANTED_CFG, "train_steps": steps})
        meta, summary = train_meta_sae(D, cfg, tmp_path / str(steps))
        c = summary["convergence"]
        assert c["converged"] is expected, c
        assert c["step_90pct"] == (9 * steps) // 10 and [p["step"] for p in c["trajectory"]][-2:] == [c["step_90pct"], steps]
        assert c["final_loss"] == pytest.approx(decoder_variance_explained(meta, U, cfg.eval_batch_size)["mse"], rel=1e-5)
        assert c["rel_change_last10"] == pytest.approx(abs(c["loss_at_90pct"] - c["final_loss"]) / c["final_loss"])
        assert (c["rel_change_last10"] < cfg.convergence_tol) is expected
    # the tolerance is the config's: the same 1000 steps fail a tolerance below their relative change
    strict = MetaSAEConfig(**{**PLANTED_CFG, "train_steps": 1000, "convergence_tol": c["rel_change_last10"] / 2})
    assert train_meta_sae(D, strict, tmp_path / "strict")[1]["convergence"]["converged"] is False


def test_fewer_trajectory_points_give_the_same_convergence_check(tmp_path, one_thread):
    """``trajectory_points: 2`` measures the loss at the start, at 90% and at the end only (a wide
    meta-SAE's cost): the same check and the same points as the default's at those steps."""
    from saeflow.evals.meta_sae import trajectory_steps

    assert trajectory_steps(100) == list(range(0, 101, 10)) and trajectory_steps(100, 2) == [0, 90, 100]
    assert trajectory_steps(100, 5) == [0, 25, 50, 75, 90, 100]
    with pytest.raises(ValueError, match="at least 2 points"):
        trajectory_steps(100, 1)
    D, _, _ = planted_decoder(n=256)
    cfg = MetaSAEConfig(width_ratio=0.125, k=4, train_steps=40, batch_size=64, lr=1e-3)
    _, every = train_meta_sae(D, cfg, tmp_path / "every")
    _, few = train_meta_sae(D, cfg.model_copy(update={"trajectory_points": 2}), tmp_path / "few")
    assert [p["step"] for p in few["convergence"]["trajectory"]] == [0, 36, 40]
    assert few["convergence"]["trajectory"] == [p for p in every["convergence"]["trajectory"] if p["step"] in (0, 36, 40)]
    assert {k: v for k, v in few["convergence"].items() if k != "trajectory"} == \
        {k: v for k, v in every["convergence"].items() if k != "trajectory"}


def test_largest_entries_by_a_row_wise_bound_equal_a_full_topk():
    from saeflow.evals.meta_sae.training import _largest

    g = torch.Generator().manual_seed(0)
    for h, n in ((torch.randn(64, 500, generator=g).relu(), 256),   # a bound > 0: filtered
                 (torch.randn(8, 40, generator=g).relu(), 300),      # zeros among the n largest: plain topk
                 (torch.rand(3, 7, generator=g), 50)):               # n above the entries: all of them
        v, i = _largest(h, n)
        ref = h.flatten().topk(min(n, h.numel()))
        assert torch.equal(v.sort().values, ref.values.sort().values)
        assert torch.equal(h.flatten()[i], v) and len(set(i.tolist())) == len(i)
        if (ref.values > 0).all():
            assert set(i.tolist()) == set(ref.indices.tolist())


def test_finished_meta_sae_is_not_retrained_and_resume_is_exact(tmp_path, one_thread):
    D, _, _ = planted_decoder(n=256)
    cfg = MetaSAEConfig(width_ratio=0.125, k=4, train_steps=40, batch_size=64, lr=1e-3, checkpoint_every=10)
    full, s1 = train_meta_sae(D, cfg, tmp_path / "a")
    again, s2 = train_meta_sae(D, cfg, tmp_path / "a")
    assert s2.get("already_complete") and s2["train_time_seconds"] == 0.0
    assert torch.equal(full.W_dec, again.W_dec)
    # killed after 25 steps (checkpoint at 20), then resumed: bit-identical to the uninterrupted run
    from saeflow.evals.meta_sae import meta_sae_config, meta_train_config
    from saeflow.training import train_sae

    U = unit_rows(D)
    part = train_sae(meta_sae_config(256, cfg), meta_train_config(cfg), RowSampler(U, 64, cfg.seed), 32,
                     tmp_path / "b", torch.device("cpu"), stop_after_steps=25)
    assert part["completed"] is False
    resumed, s3 = train_meta_sae(D, cfg, tmp_path / "b")
    assert s3["resumed_from_step"] == 20
    assert torch.equal(full.W_dec, resumed.W_dec) and torch.equal(full.W_enc, resumed.W_enc)
    # the convergence check survives: read back when finished, the same when resumed
    check = {k: v for k, v in s1["convergence"].items() if k != "trajectory"}
    assert s2["convergence"] == s1["convergence"]
    assert {k: v for k, v in s3["convergence"].items() if k != "trajectory"} == check
    assert s3["convergence"]["trajectory"] == [p for p in s1["convergence"]["trajectory"] if p["step"] > 20]


def test_row_sampler_draws_with_replacement_and_replays():
    M = torch.arange(10, dtype=torch.float32)[:, None].repeat(1, 3)
    s = RowSampler(M, 8, seed=3)
    it = iter(s)
    first = [next(it) for _ in range(5)]
    g = torch.Generator().manual_seed(3)
    expected = [M[torch.randint(0, 10, (8,), generator=g)] for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(first, expected))
    assert any(len(set(b[:, 0].tolist())) < 8 for b in first)  # repeats: drawn with replacement
    t = RowSampler(M, 8, seed=3)
    t.load_state_dict({"drawn": 3, "seed": 3, "batch_size": 8})
    assert torch.equal(next(iter(t)), first[3])


def _random_meta_of_planted_decoder() -> tuple[torch.Tensor, BatchTopKSAE]:
    """Unit rows of a 300-row planted decoder and a random 30-latent meta-SAE centred on them."""
    from saeflow.evals.meta_sae import meta_sae_config

    U = unit_rows(planted_decoder(n=300)[0])
    meta = BatchTopKSAE(meta_sae_config(300, MetaSAEConfig(width_ratio=0.1)), 32, seed=0)
    with torch.no_grad():
        meta.W_enc.normal_(generator=torch.Generator().manual_seed(0))
        meta.b_dec.copy_(U.mean(0))
    return U, meta


def test_variance_explained_matches_the_formula():
    U, meta = _random_meta_of_planted_decoder()
    got = decoder_variance_explained(meta, U, eval_batch_size=128)
    with torch.no_grad():
        recon = torch.cat([meta.decode(meta.encode_batch_topk(U[s:s + 128])) for s in range(0, 300, 128)])
    resid = float(((U - recon) ** 2).sum())
    assert got["fve"] == pytest.approx(1 - resid / float(((U - U.mean(0)) ** 2).sum()), rel=1e-5)
    assert got["mse"] == pytest.approx(resid / U.numel(), rel=1e-5)
    assert got["l0"] == pytest.approx(4.0)  # k * rows kept per batch (when that many are positive)


@pytest.mark.parametrize("mode", ["batch_topk", "threshold"])
def test_variance_explained_of_a_wide_meta_sae_in_row_blocks(monkeypatch, mode):
    """Above one encode block (a 262k-latent SAE's 65k-latent meta-SAE, issue #27) the batch-top-k
    selection and the reconstruction run in row blocks: the same FVE, MSE and L0."""
    U, meta = _random_meta_of_planted_decoder()
    with torch.no_grad():
        meta.topk_threshold.fill_(0.5)
    whole = decoder_variance_explained(meta, U, eval_batch_size=128, mode=mode)
    monkeypatch.setattr("saeflow.saes.base.ENCODE_BLOCK_ELEMENTS", 9 * meta.d_sae)  # 9-row blocks
    blocked = decoder_variance_explained(meta, U, eval_batch_size=128, mode=mode)
    assert blocked == pytest.approx(whole, rel=1e-5)
    assert whole["l0"] > 0


def test_sparse_code_finds_planted_combinations():
    g = torch.Generator().manual_seed(0)
    small = unit_rows(torch.randn(64, 48, generator=g))
    combos = []
    for i in range(40):  # 40 rows that ARE combinations of 3 small atoms
        idx = torch.randperm(64, generator=g)[:3]
        combos.append((torch.rand(3, generator=g) + 0.5) @ small[idx])
    novel = torch.randn(40, 48, generator=g)  # 40 new directions
    Y = unit_rows(torch.cat([torch.stack(combos), novel]))
    sc = sparse_code(Y, small, k=4)
    cos = sc["cos"][:, -1]
    assert (cos[:40] > 0.99).all()
    assert (cos[40:] < 0.9).mean() > 0.9
    assert np.all(np.diff(sc["cos"], axis=1) >= -1e-5)  # more atoms never explain less
    # the first step is the max |cosine|
    np.testing.assert_allclose(sc["cos"][:, 0], (Y @ small.T).abs().max(dim=1).values.numpy(), atol=1e-5)


def test_sparse_code_without_the_whole_gram_matrix_gives_the_same_code(monkeypatch):
    """Above GRAM_ELEMENTS the atoms' Gram rows are computed only for the selected atoms (a 65k-atom
    smaller SAE would need 16 GiB): the same atoms, coefficients and cosines."""
    from saeflow.evals.meta_sae import analysis

    g = torch.Generator().manual_seed(3)
    small = unit_rows(torch.randn(96, 32, generator=g))
    Y = unit_rows(torch.randn(150, 32, generator=g))
    whole = sparse_code(Y, small, k=4, chunk=64)
    monkeypatch.setattr(analysis, "GRAM_ELEMENTS", 0)
    rows = sparse_code(Y, small, k=4, chunk=64)
    np.testing.assert_array_equal(rows["idx"], whole["idx"])
    np.testing.assert_allclose(rows["coef"], whole["coef"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["cos"], whole["cos"], rtol=1e-5, atol=1e-6)


def test_max_cosines_exclude_self():
    U = unit_rows(torch.eye(4) + 0.01)
    mc = max_cosines(U, U)
    assert mc["base->meta"] == pytest.approx(np.ones(4), abs=1e-6)
    assert (mc["base->base"] < 0.99).all()


def test_max_cosines_of_a_wide_sae_sample_rows():
    """Above ``cosine_rows`` each distribution is a seeded sample of rows (issue #27): those rows'
    exact values, against every row of the other set."""
    g = torch.Generator().manual_seed(4)
    base, meta = unit_rows(torch.randn(300, 16, generator=g)), unit_rows(torch.randn(40, 16, generator=g))
    full = max_cosines(base, meta)
    part = max_cosines(base, meta, max_rows=50, seed=7)
    rows = torch.randperm(300, generator=torch.Generator().manual_seed(7))[:50].sort().values.numpy()
    np.testing.assert_allclose(part["base->base"], full["base->base"][rows], rtol=1e-6)
    np.testing.assert_allclose(part["base->meta"], full["base->meta"][rows], rtol=1e-6)
    np.testing.assert_array_equal(part["meta->meta"], full["meta->meta"])  # 40 rows: all of them
    np.testing.assert_array_equal(part["meta->base"], full["meta->base"])


def test_bad_decoders_are_refused():
    with pytest.raises(MetaSAEInputError, match="NaN"):
        unit_rows(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(MetaSAEInputError, match="all-zero"):
        unit_rows(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(MetaSAEInputError, match="2-D"):
        unit_rows(torch.ones(3))
    with pytest.raises(MetaSAEInputError, match="at least 2"):
        unit_rows(torch.ones(1, 4))
    with pytest.raises(MetaSAEInputError, match="width_ratio"):
        meta_width(100, 0.0, 4)
    with pytest.raises(MetaSAEInputError, match="share a width"):
        sparse_code(torch.ones(2, 3), torch.ones(2, 4), 1)
    assert meta_width(1000, 0.25, 4) == 250 and meta_width(10, 0.01, 4) == 4 and meta_width(1001, 0.25, 4) == 251
    with pytest.raises(ValueError):
        MetaSAEConfig(width_ratio=0.0)
    with pytest.raises(ValueError):
        MetaSAEConfig(cross_size_threshold=1.5)


def test_example_helpers():
    blocks = sample_store_rows(100_000, 2048, seed=0, block=512)
    assert len(blocks) == 4 and all(b - a == 512 and a % 512 == 0 for a, b in blocks)
    assert blocks == sorted(blocks) and blocks == sample_store_rows(100_000, 2048, seed=0, block=512)
    assert sample_store_rows(100, 2048, seed=0) == [(0, 100)]
    scores = [torch.tensor([[1.0, 5.0], [3.0, 0.0]]), torch.tensor([[2.0, 4.0]])]
    v, r = top_rows(iter(scores), 2)
    assert r[:, 0].tolist() == [1, 2] and r[:, 1].tolist() == [0, 2] and v[0, 1] == 5.0
    words = {1: " the", 2: " cat", 3: " sat", 4: " on", 5: "\n"}
    s = snippet(np.array([1, 2, 3, 4, 5]), 2, lambda ids: "".join(words[i] for i in ids), window=1)
    assert s == "… cat **sat** on…"


_PLAIN_WORDS = {1: " the", 2: " cat", 3: " sat", 4: " on", 5: "\n", 6: " mat", 7: " and", 8: " dog", 9: " ran"}


def _page(words: dict[int, str], member_token: str = "cat"):
    from saeflow.evals.meta_sae import ExamplesPage, LatentExample, Member, MetaExample, Snippet

    ctx = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2])

    def s(rank: int, pos: int, v: float) -> Snippet:
        return Snippet(rank, snippet(ctx, pos, lambda ids: "".join(words[i] for i in ids), 2), v)

    latent_7 = LatentExample(7, 2, 0.98765, "sat", [s(1, 2, 3.5), s(2, 6, 1.25)], [
        MetaExample(3, 0.75, 12, [Member(11, member_token), Member(40, "on")], 2, [s(1, 7, 0.5)]),
        MetaExample(19, 0.125, 1, [], 0, [])])
    latent_90 = LatentExample(90, 0, 0.5, "(silent)", [s(1, 8, 2.0)], [])
    return ExamplesPage(sae="topk width=128 k=8", meta_width=32, k=4, fve=0.91234, fve_threshold=0.9, rows=16384,
                        seed=42, examples=[latent_7, latent_90])


#: examples.md as the string-concatenating page code (before the Jinja2 template) wrote it for ``_page(_PLAIN_WORDS)``.
_PLAIN_PAGE = (
    "# Meta-SAE example decompositions: topk width=128 k=8\n\nMeta-SAE: BatchTopK, width 32, k=4; decoder variance "
    "explained 0.9123 (batch top-k), 0.9000 (threshold inference). Each latent ≈ sum of weight × meta-latent decoder "
    "direction (threshold inference). Snippets: the top-activating tokens (**bold**) among 16,384 activation rows "
    "sampled with seed 42. A meta-latent is shown by the tokens where the *other* latents it covers fire (their "
    "activations weighted by how strongly each uses the meta-latent, each relative to its own maximum in the sample), "
    "and by its strongest member latents.\n\n## Latent 7\n\n2 meta-latents, reconstruction cosine 0.988: latent 7 ≈ "
    "0.75·M3 + 0.12·M19\n\nTop activations:\n\n1.  the cat **sat** on⏎… (3.50)\n2. …⏎ mat **and** dog ran… (1.25)\n\n"
    "### M3 (weight 0.75; used by 12 latents)\n\nStrongest other members (latent: its top token): 11: “cat”, 40: “on” "
    "(2 members do not fire in the sample)\n\n1. … mat and **dog** ran the… (0.50)\n\n### M19 (weight 0.12; used by 1 "
    "latents)\n\nStrongest other members (latent: its top token): none\n\n(its other members do not fire in the sampled "
    "rows)\n\n## Latent 90\n\n0 meta-latents, reconstruction cosine 0.500: latent 90 ≈ \n\nTop activations:\n\n1. … and "
    "dog **ran** the cat (2.00)\n\n")


def test_examples_page_renders_as_before_and_escapes_tokens():
    """The templated page has the bytes the string-building code wrote; decoded text is HTML-escaped
    (markdown syntax in it escaped by ``snippet``) and reads as before."""
    import html

    from saeflow.evals.meta_sae import ExamplesPage, render_examples_page

    assert render_examples_page(_page(_PLAIN_WORDS)) == _PLAIN_PAGE
    empty = render_examples_page(ExamplesPage("relu width=64 l1=1", 16, 4, 0.5, 0.25, 1000, 1, []))
    assert empty.startswith("# Meta-SAE example decompositions: relu width=64 l1=1\n\nMeta-SAE: BatchTopK, width 16")
    assert empty.endswith("seed 1. A meta-latent is shown by the tokens where the *other* latents it covers fire (their "
                          "activations weighted by how strongly each uses the meta-latent, each relative to its own "
                          "maximum in the sample), and by its strongest member latents.\n\nNo latent has an active "
                          "meta-latent and fires in the sampled rows; nothing to show.\n")

    special = {**_PLAIN_WORDS, 6: " <b>x</b>", 7: " a|b*`c`", 8: " Tom's", 9: ' "q" & co'}
    page = render_examples_page(_page(special, member_token="<i>&"))
    heads = [line for line in page.splitlines() if line.startswith("#")]
    assert heads == ["# Meta-SAE example decompositions: topk width=128 k=8", "## Latent 7",
                     "### M3 (weight 0.75; used by 12 latents)", "### M19 (weight 0.12; used by 1 latents)",
                     "## Latent 90"]
    assert "<" not in page and ">" not in page  # no markup from the data
    assert "2. …⏎ &lt;b&gt;x&lt;/b&gt; **a\\|b\\*&#39;c&#39;** Tom&#39;s &#34;q&#34; &amp; co… (1.25)" in page
    assert "11: “&lt;i&gt;&amp;”, 40: “on”" in page
    read = html.unescape(page)  # what a markdown viewer shows: the same words as the plain-text page had
    assert "1. … a\\|b\\*'c' Tom's **\"q\" & co** the cat (2.00)" in read
    assert "1. … <b>x</b> a\\|b\\*'c' **Tom's** \"q\" & co the… (0.50)" in read


def test_code_version_names_every_module_of_the_evaluation():
    import pkgutil

    import saeflow.evals.meta_sae as pkg
    from tasks import meta_sae as stages

    modules = {pkg.__name__} | {f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)}
    assert modules <= set(stages.CODE_MODULES)


def test_meta_sae_through_the_pipeline(tmp_path, one_thread):
    import flows.pipeline as fp
    from tests.helpers import tiny_config

    cfg = tiny_config(family={"architectures": ["topk"], "widths": [64, 128], "ks": [8]},
                      meta_sae={"train_steps": 30, "batch_size": 64, "n_examples": 2, "example_rows": 1024,
                                "checkpoint_every": 10, "log_every": 10})
    out = fp.pipeline(cfg, str(tmp_path))
    results = Path(out.refs.results.path)
    table = pd.read_parquet(results / "core_metrics.parquet")
    for col in ("meta_sae_fve", "meta_sae_mse", "meta_sae_width", "meta_sae_mean_latents_per_meta"):
        assert table[col].notna().all(), col
    assert table["meta_sae_width"].tolist() == [16, 32]  # ceil(0.25 * width)
    assert math.isnan(table["meta_sae_cross_size_fraction"][0])  # the smallest SAE has no smaller partner
    assert 0.0 <= table["meta_sae_cross_size_fraction"][1] <= 1.0
    files = {p.name for p in (results / "meta_sae").iterdir()}
    assert {"meta_sae.parquet", "meta_sae.md", "cross_size.parquet", "cluster_sizes.png", "cross_size_cosines.png",
            "max_cosines.png", "examples.md"} <= files
    cross = pd.read_parquet(results / "meta_sae" / "cross_size.parquet")
    assert cross[["smaller_width", "larger_width"]].values.tolist() == [[64, 128]]
    page = (results / "meta_sae" / "examples.md").read_text()
    assert page.count("## Latent ") == 2 and "**" in page and "M" in page
    per = out.refs.evals["meta_sae"].per_sae
    dec = pd.read_parquet(Path(out.refs.evals["meta_sae"].refs[1].path) / "decomposition.parquet")
    assert len(dec) == 128 and len(per) == 2
    summary = json.loads((Path(per[1].path) / "summary.json").read_text())
    assert all(k.startswith("meta_sae_") for k in summary)
    # the convergence check: in the artifact, the per-SAE columns and the meta_sae table
    conv = json.loads((Path(out.refs.evals["meta_sae"].refs[1].path) / "convergence.json").read_text())
    assert conv["steps"] == 30 and conv["step_90pct"] == 27 and isinstance(conv["converged"], bool)
    assert table["meta_sae_converged"].dtype == bool and table["meta_sae_rel_change_last10"].notna().all()
    meta_table = pd.read_parquet(results / "meta_sae" / "meta_sae.parquet")
    assert {"final_loss", "loss_at_90pct", "rel_change_last10", "converged"} <= set(meta_table)
    # a re-run is fully cached
    again = fp.pipeline(cfg, str(tmp_path))
    assert again.cached["meta_sae"] is True


def test_meta_columns_equal_the_full_encoding_in_row_blocks(monkeypatch):
    """The example page encodes every decoder row with the meta-SAE but keeps only the meta-latents it
    shows: ``meta_columns`` (row blocks) equals ``meta.encode(rows)[:, cols]`` of the whole matrix."""
    from saeflow.evals.meta_sae import examples
    from saeflow.saes import SAEConfig

    meta = BatchTopKSAE(SAEConfig(architecture="batchtopk", width=48, k=4), d_in=32, seed=0)
    with torch.no_grad():
        meta.topk_threshold.fill_(0.05)
    rows = unit_rows(torch.randn(300, 32, generator=torch.Generator().manual_seed(0)))
    monkeypatch.setattr(examples, "COSINE_CHUNK_ELEMENTS", 64 * 48)  # blocks of 64 rows: 5 blocks
    cols = [3, 0, 47, 11]
    got = examples.meta_columns(meta, rows, cols)
    want = meta.encode(rows)[:, cols]
    assert got.shape == (300, 4) and (want > 0).any()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
