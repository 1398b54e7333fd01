"""Absorption evaluation (SPEC 1): planted ground truth, the paper's toy finding, bad input, the pipeline."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from saeflow.evals import absorption as ab
from saeflow.evals.absorption.config import AbsorptionConfig

pytestmark = pytest.mark.usefixtures("one_thread")

D = 64
S = ab.LETTERS.index("s")


class PlantedSAE(torch.nn.Module):
    """A ReLU SAE whose weights are set by hand (``encode`` / ``decode`` / ``W_dec`` / ``b_dec``)."""

    def __init__(self, W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor | None = None) -> None:
        super().__init__()
        self.W_enc = torch.nn.Parameter(W_enc.clone())
        self.W_dec = torch.nn.Parameter(W_dec.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(W_dec.shape[0]) if b_enc is None else b_enc.clone())
        self.b_dec = torch.nn.Parameter(torch.zeros(W_dec.shape[1]))

    @property
    def d_in(self) -> int:
        return self.W_dec.shape[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec


def _planted(absorbed: set[int], n_children: int = 10, words_per_child: int = 4, plain_s: int = 160,
             per_other: int = 40, seed: int = 0):
    """Hierarchical toy data: 26 orthonormal parent directions ("starts with L"); the S words are
    plain S words (parent only) or belong to one of ``n_children`` children ("short", "snake", ...)
    whose own direction is added to the parent. The SAE has one main latent per letter and one
    latent per child; for children in ``absorbed`` the child latent's decoder holds the parent too
    and the main S latent's encoder is switched off on them (the paper's absorption)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen))
    parents, kids = q[:26], q[26:26 + n_children]
    rows, labels, child = [], [], []
    for li in range(26):
        n = plain_s if li == S else per_other
        for _ in range(n):
            rows.append(parents[li] * (1 + 0.2 * torch.rand((), generator=gen)))
            labels.append(li)
            child.append(-1)
    for c in range(n_children):
        for _ in range(words_per_child):
            rows.append(parents[S] + kids[c] * (1 + 0.2 * torch.rand((), generator=gen)))
            labels.append(S)
            child.append(c)
    x = torch.stack(rows)
    W_dec = torch.cat([parents, torch.stack([kids[c] + (parents[S] if c in absorbed else 0) for c in range(n_children)])])
    W_dec = F.normalize(W_dec, dim=-1)
    W_enc = torch.cat([parents, kids]).T.clone()  # [D, 26 + n_children]
    for c in absorbed:
        W_enc[:, S] -= 3 * kids[c]  # main S latent is silent on the absorbed children
    # plain words also have a tiny child component in no direction: keep encoder exact
    sae = PlantedSAE(W_enc, W_dec)
    return x, np.array(labels), np.array(child), sae, parents


def _evaluate(x, labels, sae, parents, **kw):
    # same synthetic words for train and test (the metrics are deterministic functions of them)
    probe_w, probe_b = parents.clone(), torch.full((26,), -0.5)
    return ab.evaluate_sae(sae, probe_w, probe_b, list(range(26)), x, labels, x, labels, x,
                           np.arange(len(x)), [f"w{i}" for i in range(len(x))], [f"w{i}" for i in range(len(x))],
                           sparse_steps=2000, **kw)


def test_planted_absorption_is_recovered_exactly():
    absorbed = {0, 3, 4, 7}
    x, labels, child, sae, parents = _planted(absorbed)
    res = _evaluate(x, labels, sae, parents)
    letters = res.letters.set_index("letter")
    # the main S latent is the only split latent (each child is too rare to raise F1 by 0.03)
    assert letters.loc["s", "split_feats"] == [S]
    p = res.prompts[res.prompts["letter"] == "s"].reset_index(drop=True)
    words = np.flatnonzero(labels == S)
    is_abs = np.isin(child[words], list(absorbed))
    assert np.array_equal(p["is_full_absorption"].to_numpy(), is_abs)
    assert np.allclose(p["absorption_fraction"].to_numpy(), is_abs.astype(float))
    # the absorbing latent is the planted child latent, with cosine 1/sqrt(2) to the probe
    got = {int(r.top_latent) - 26 for r in p[p["is_full_absorption"]].itertuples()}
    assert got == absorbed
    assert np.allclose(p.loc[p["is_full_absorption"], "top_cos"], 2 ** -0.5, atol=1e-5)
    n_abs = len(absorbed) * 4
    assert letters.loc["s", "mean_absorption_fraction"] == pytest.approx(n_abs / len(words))
    assert letters.loc["s", "full_absorption_rate"] == pytest.approx(n_abs / len(words))
    # every other letter: no absorption
    others = letters.drop(index="s")
    assert (others["mean_absorption_fraction"] == 0).all() and (others["full_absorption_rate"] == 0).all()
    assert res.summary["absorption_mean_fraction"] == pytest.approx(n_abs / len(words) / 26)
    ex = ab.example_absorptions(res.prompts, res.ablation)
    assert set(ex["absorbing_latent"] - 26) == absorbed and (ex["letter"] == "s").all()


def test_no_planted_absorption_reports_zero():
    x, labels, _child, sae, parents = _planted(set())
    res = _evaluate(x, labels, sae, parents)
    assert res.summary["absorption_mean_fraction"] == 0.0
    assert res.summary["absorption_mean_full"] == 0.0
    assert res.summary["absorption_mean_split_features"] == pytest.approx(1.0)


def test_partial_absorption_fraction_matches_formula():
    # main latent fires weakly (0.3 of the parent) and one child latent carries the rest
    p = torch.zeros(D); p[0] = 1
    u = torch.zeros(D); u[1] = 1
    a = (p + u)[None]
    W_dec = F.normalize(torch.stack([p, p * 0.7 + u]), dim=-1)
    f = torch.tensor([[0.3, (0.7 ** 2 + 1) ** 0.5]])
    res = ab.projection_absorption(a, f, p, W_dec, [0]).iloc[0]
    cos1 = 0.7 / (0.7 ** 2 + 1) ** 0.5
    T, A, M = float(f[0, 1]) * cos1, 1.0, 0.3
    x = min(T, A - M)
    assert res["absorption_fraction"] == pytest.approx(x / (x + M))
    assert not res["is_full_absorption"]  # the main latent fires
    assert res["absorbing"] == [1]


def test_linear_probe_separates_planted_letters():
    x, labels, _c, _sae, _p = _planted(set())
    fit = ab.train_linear_probe(x, torch.as_tensor(labels), steps=2500, seed=0)  # SPEC 1.3 (at 3,200 words)
    w, b = fit.weight, fit.bias
    m = ab.letter_metrics((x @ w.T + b).numpy(), labels, 0.6)
    assert m["passes"].all() and m["f1"].min() > 0.95


def test_feature_splits_jump_rule():
    ks = pd.DataFrame({"letter": ["a"] * 4, "k": [1, 2, 3, 4], "feats": [[5], [5, 6], [5, 6, 7], [5, 6, 7, 8]],
                       "coef": [[1.0], [1.0] * 2, [1.0] * 3, [1.0] * 4], "bias": [0.0] * 4,
                       "f1": [0.5, 0.6, 0.62, 0.9]})
    s = ab.feature_splits(ks, 0.03).iloc[0]
    assert s["split_feats"] == [5, 6] and s["num_split_feats"] == 2  # k=3 gains only 0.02: stop there


def _hand_binary_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """The hand-written precision / recall / F1 that ``binary_scores`` used before sklearn (reference)."""
    tp = float(np.sum(pred & truth))
    fp = float(np.sum(pred & ~truth))
    fn = float(np.sum(~pred & truth))
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f1}


def test_binary_scores_match_the_hand_written_formulas():
    rng = np.random.default_rng(0)
    cases = [(np.zeros(7, bool), rng.random(7) < 0.5), (np.zeros(7, bool), np.zeros(7, bool)),  # no positive prediction
             (np.ones(5, bool), np.ones(5, bool)), (rng.random(6) < 0.5, np.zeros(6, bool)),  # one class only
             (np.ones(4, bool), np.zeros(4, bool)), (np.array([True]), np.array([False])),
             (np.zeros(0, bool), np.zeros(0, bool))]  # no rows
    for _ in range(2000):
        n = int(rng.integers(1, 60))
        pred, truth = rng.random(n) < rng.random(), rng.random(n) < rng.random()
        cases.append((pred, truth))
    for pred, truth in cases:
        ours, ref = ab.binary_scores(pred, truth), _hand_binary_scores(pred, truth)
        assert ours["precision"] == ref["precision"] and ours["recall"] == ref["recall"], (pred, truth)
        assert ours["f1"] == pytest.approx(ref["f1"], rel=1e-12, abs=0), (pred, truth)  # 2tp/(2tp+fp+fn): last bit


# --------------------------------------------------------------------------------- the toy finding
class _MemLoader:
    def __init__(self, x: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x, self.batch_size, self.seed, self.pos = x, batch_size, seed, 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            idx = torch.randint(0, self.x.shape[0], (self.batch_size,), generator=gen)
            self.pos += 1
            yield self.x[idx]


def _toy_hierarchy(n: int, seed: int = 0):
    """The paper's toy: a parent feature ("starts with S") that fires on 30% of rows and, within
    it, one of 4 children ("short", "snake", ...) on 80% of those rows; 8 independent features."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    parent, kids, other = q[0], q[1:5], q[5:13]
    on = torch.rand(n, generator=g) < 0.3
    which = torch.randint(0, 4, (n,), generator=g)
    has_kid = on & (torch.rand(n, generator=g) < 0.8)
    x = on[:, None].float() * parent
    x = x + has_kid[:, None].float() * kids[which]
    x = x + (torch.rand(n, 8, generator=g) < 0.15).float() @ other
    return x, parent, on, has_kid


@pytest.mark.parametrize("unused", [0])
def test_trained_sae_absorbs_more_under_more_sparsity(tmp_path, unused):
    from saeflow.config import TrainConfig
    from saeflow.saes import SAEConfig
    from saeflow.training import train_sae

    x, parent, on, has_kid = _toy_hierarchy(20_000)
    fracs = {}
    for l1 in (0.02, 0.3):
        cfg = SAEConfig(architecture="relu", width=16, l1_coefficient=l1, normalize_activations="none",
                        decoder_init_norm=0.1)
        tcfg = TrainConfig(training_tokens=512 * 600, batch_size=512, lr=3e-3, seed=0, checkpoint_every=10_000,
                           log_every=10_000)
        out = tmp_path / f"l1_{l1}"
        train_sae(cfg, tcfg, _MemLoader(x, 512, 0), 32, out, torch.device("cpu"))
        from saeflow.saes import load_sae

        sae = load_sae(out)
        rows = x[on][:2000]
        f = sae.encode(rows).detach()
        cos = F.normalize(sae.W_dec.detach(), dim=-1) @ parent
        main = int(cos.argmax())
        res = ab.projection_absorption(rows, f, parent, sae.W_dec.detach(), [main])
        fracs[l1] = float(res["absorption_fraction"].mean())
    assert fracs[0.3] > fracs[0.02] + 0.2, fracs


# -------------------------------------------------------------------------------------- bad input
class _CharTokenizer:
    """Tokens are 3-letter chunks of each word; offsets as a fast tokenizer gives them."""

    def __call__(self, texts, add_special_tokens=True, return_offsets_mapping=False):
        ids, offs = [], []
        for t in texts:
            i, o = ([0], [(0, 0)]) if add_special_tokens else ([], [])
            for m in __import__("re").finditer(r"\S+|\s", t):
                for s in range(m.start(), m.end(), 3):
                    e = min(s + 3, m.end())
                    i.append(hash(t[s:e]) % 1000 + 1)
                    o.append((s, e))
            ids.append(i)
            offs.append(o)
        return {"input_ids": ids, "offset_mapping": offs}


def test_multi_token_words_are_skipped_and_recorded():
    tok = _CharTokenizer()
    words = ["cat", " horse", "dog"]
    ids = [tok([w.strip()], add_special_tokens=False)["input_ids"][0][0] for w in words]
    rng = random.Random(0)
    prompts = [ab.icl_prompt(w, ["ant", "bee", "cow", "elk"], rng, 2) for w in words]
    loc = ab.locate_words(tok, [p for p, _ in prompts], [s for _, s in prompts], words, ids)
    assert loc.skip == ["", ab.SKIP_MULTI_TOKEN, ""]
    assert loc.position[1] == -1
    for i in (0, 2):
        assert prompts[i][0][prompts[i][1]:].startswith(words[i])
    wrong = ab.locate_words(tok, [prompts[0][0]], [prompts[0][1]], ["cat"], [ids[0] + 1])
    assert wrong.skip == [ab.SKIP_RETOKENIZED]


def test_icl_prompt_matches_spec_layout():
    rng = random.Random(1)
    text, start = ab.icl_prompt(" cat", [" ant", "Bee", " cat", " dog"], rng, 3)
    lines = text.split("\n")
    assert lines[0] == "" and len(lines) == 5
    assert lines[-1] == " cat has the first letter:" and text[start:start + 4] == " cat"
    assert all(ln.endswith(ab.answer(ln.split(" has")[0])) for ln in lines[1:-1])
    assert " cat has" not in "\n".join(lines[1:-1])  # the word is never its own example


def test_too_few_alphabetic_tokens_are_refused():
    df = pd.DataFrame({"kind": "probe", "split": ["train"] * 5 + ["test"] * 5, "label": [0, 1, 2, 3, 4] * 2,
                       "skip": ""})
    with pytest.raises(ab.AbsorptionError, match="min_letters"):
        ab.check_prompts(df, 20)


def test_sae_from_another_hook_is_refused(tmp_path):
    from saeflow.saes import SAEConfig, build_sae, save_sae
    from tasks.absorption import SAEHookMismatchError, check_sae

    sae = build_sae(SAEConfig(width=32, k=4), 16, 0)
    save_sae(sae, tmp_path, {"hook_name": "blocks.0.hook_resid_post"})
    with pytest.raises(SAEHookMismatchError, match="blocks.0.hook_resid_post"):
        check_sae(sae, tmp_path, "blocks.1.hook_resid_post", 16)
    with pytest.raises(SAEHookMismatchError, match="d_in"):
        check_sae(sae, tmp_path, "blocks.0.hook_resid_post", 32)


# ------------------------------------------------------------------------------ IG on a real model
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from saeflow.config import ModelConfig
    from saeflow.model_sources import materialize_model
    from saeflow.models import load_model

    d = tmp_path_factory.mktemp("tiny-model")
    cfg = ModelConfig(name="tiny-random", tiny_layers=2, tiny_d_model=64)
    materialize_model(cfg, d)
    return load_model(cfg, d, "cpu")


def test_letter_logits_and_split_forward_are_exact(tiny_model):
    lm = tiny_model
    ids = ab.letter_token_ids(lm.tokenizer)
    toks = lm.to_tokens(["\nant has the first letter: A\nbee has the first letter:"] * 2)
    full = lm(toks)[:, -1, ids]
    hook = "blocks.0.hook_resid_post"
    from saeflow.extract import forward_acts

    clean = forward_acts(lm, toks, hook).clone()
    pos = torch.tensor([3, 5])
    resid = ab.run_from_hook(lm, hook, toks, clean[torch.arange(2), pos], pos, clean)
    assert torch.allclose(ab.letter_logits(lm, resid, ids), full, atol=1e-4)
    resid2 = ab.run_from_hook(lm, "blocks.0.hook_mlp_out", toks, forward_acts(lm, toks, "blocks.0.hook_mlp_out").clone()[torch.arange(2), pos], pos, None)
    assert torch.allclose(ab.letter_logits(lm, resid2, ids), full, atol=1e-4)


def test_ig_attribution_matches_spliced_sae_gradient(tiny_model):
    """With one step, IG is attribution patching: -f * d metric / d f through a spliced SAE."""
    from saeflow.saes import SAEConfig, build_sae

    lm = tiny_model
    hook = "blocks.0.hook_resid_post"
    sae = build_sae(SAEConfig(architecture="relu", width=96), 64, 3)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
    ids = ab.letter_token_ids(lm.tokenizer)
    toks = lm.to_tokens(["\nant has the first letter: A\nbee has the first letter:"])
    pos, labels = torch.tensor([5]), torch.tensor([1])
    attr, f, metric = ab.ig_latent_attribution(lm, hook, sae, toks, pos, labels, ids, steps=1)
    # reference: splice sae.decode(f) + error with f a leaf tensor, backprop the metric to f
    from saeflow.extract import forward_acts

    x = forward_acts(lm, toks, hook).clone()[0, 5]
    f_leaf = sae.encode(x[None]).detach().requires_grad_(True)
    err = (x[None] - sae.decode(sae.encode(x[None]))).detach()

    def splice(act, hook):  # noqa: ARG001
        act = act.clone()
        act[0, 5] = (sae.decode(f_leaf) + err)[0]
        return act

    with lm.hooks(fwd_hooks=[(hook, splice)]):
        logits = lm(toks)[:, -1, ids]
    m = ab.first_letter_metric(logits, labels)
    m.sum().backward()
    assert torch.allclose(metric, m.detach(), atol=1e-4)
    assert torch.allclose(attr, -(f_leaf * f_leaf.grad).detach(), atol=1e-4)
    assert (f > 0).sum() > 0


# -------------------------------------------------------------------------------------- pipeline
def _abs_cfg(**kw):
    base = {"min_letters": 1, "min_probe_f1": 0.0, "probe_steps": 50, "sparse_probe_steps": 50,
            "max_ablation_prompts": 2, "max_k": 3}
    return {**base, **kw}


def test_pipeline_tiny_runs_absorption_and_caches(tmp_path):
    from flows.pipeline import pipeline
    from tests.helpers import tiny_config

    cfg = tiny_config(absorption=_abs_cfg())
    out = pipeline(cfg, str(tmp_path))
    refs = out.refs.evals["absorption"]
    summary = json.loads((tmp_path / "absorption" / refs.per_sae[0].fingerprint / "summary.json").read_text())
    for col in ("absorption_mean_fraction", "absorption_mean_full", "absorption_mean_split_features",
                "absorption_rate", "absorption_std_fraction", "absorption_letters"):
        assert col in summary
    results = tmp_path / "results" / "tiny"
    core = pd.read_parquet(results / "core_metrics.parquet")
    assert "absorption_mean_fraction" in core.columns
    for f in ("absorption_summary.parquet", "absorption_letters.md", "absorption_examples.md",
              "absorption_vs_l0.png", "absorption_by_letter.png", "absorption_convergence.parquet"):
        assert (results / "absorption" / f).is_file(), f
    conv = json.loads((tmp_path / "absorption" / refs.per_sae[0].fingerprint / "convergence.json").read_text())
    assert {"ground_truth_probe", "l1_probe", "refits", "refits_not_converged"} <= set(conv)
    for rec in (conv["ground_truth_probe"], conv["l1_probe"]):
        assert {"final_loss", "loss_at_90pct", "rel_change_last10", "converged", "steps"} <= set(rec)
    assert conv["ground_truth_probe"]["steps"] == 50 and conv["ground_truth_probe"]["solver"] == "adam"
    table = pd.read_parquet(results / "absorption" / "absorption_convergence.parquet")
    assert table["converged"].notna().all() and len(table) == 1 + 2 * len(refs.per_sae)
    assert summary["absorption_l1_probe_converged"] in (0.0, 1.0)
    data = pd.read_parquet(tmp_path / "absorption_data" / refs.refs[0].fingerprint / "prompts.parquet")
    kept = data[data["skip"] == ""]
    assert len(kept) and (kept["position"] > 0).all()
    again = pipeline(cfg, str(tmp_path))
    assert again.cached["absorption"]


def test_pipeline_refuses_when_too_few_letters_pass(tmp_path):
    from flows.pipeline import pipeline
    from tests.helpers import tiny_config

    cfg = tiny_config(absorption=_abs_cfg(min_letters=22, min_probe_f1=0.6))
    with pytest.raises(ab.AbsorptionError, match="letters pass the ground-truth probe gate"):
        pipeline(cfg, str(tmp_path))


def test_prefix_cache_forward_is_exact(tiny_model):
    lm = tiny_model
    ids = ab.letter_token_ids(lm.tokenizer)
    toks = lm.to_tokens(["\nant has the first letter: A\nbee has the first letter:"] * 3)
    full = lm(toks)[:, -1, ids]
    hook = "blocks.0.hook_resid_post"
    from saeflow.extract import forward_acts

    clean = forward_acts(lm, toks, hook).clone()
    pos = torch.tensor([5, 5, 5])
    cache = ab.prefix_cache(lm, clean, 1, 5)
    patched = clean[:, 5] + 0.5
    resid = ab.run_from_hook(lm, hook, toks, patched, pos, clean, cache)
    ref = ab.run_from_hook(lm, hook, toks, patched, pos, clean, None)
    assert torch.allclose(ab.letter_logits(lm, resid, ids), ab.letter_logits(lm, ref, ids), atol=1e-4)
    same = ab.run_from_hook(lm, hook, toks, clean[:, 5], pos, clean, cache)
    assert torch.allclose(ab.letter_logits(lm, same, ids), full, atol=1e-4)


# ------------------------------------------------------------------------ probes sized by steps
def _planted_latents(n_words: int = 3200, n_latents: int = 1024, seed: int = 0):
    """SAE-latent-like probe data with planted ground truth: latent ``li`` (one per letter) fires
    on 60% of the words starting with that letter (and on 1% of the others), every latent fires at
    random on 2% of all words; magnitudes like a real SAE's (tens). Letters are imbalanced."""
    rng = np.random.default_rng(seed)
    freq = rng.dirichlet(np.full(26, 3.0))
    labels = rng.choice(26, size=n_words, p=freq)
    f = np.where(rng.random((n_words, n_latents)) < 0.02, rng.uniform(0, 60, (n_words, n_latents)), 0.0)
    for li in range(26):
        on = (labels == li) & (rng.random(n_words) < 0.6) | (labels != li) & (rng.random(n_words) < 0.01)
        f[on, li] = rng.uniform(10, 60, int(on.sum()))
    perm = rng.permutation(n_latents)  # planted latents at random ids
    return torch.from_numpy(f[:, np.argsort(perm)].astype(np.float32)), labels, perm[:26]


def test_l1_probe_recovers_every_planted_latent_at_the_quick_word_count():
    torch.manual_seed(0)
    f, labels, planted = _planted_latents()  # 3,200 train words: the quick profile's 80% of 4,000
    cfg = AbsorptionConfig()
    fit = ab.train_linear_probe(f, torch.as_tensor(labels), steps=cfg.sparse_probe_steps,
                                solver=cfg.sparse_probe_solver, batch_size=cfg.sparse_probe_batch_size, lr=1e-2,
                                weight_decay=1e-6, l1=cfg.l1_decay, seed=cfg.seed)
    assert fit.convergence.converged, fit.convergence
    assert fit.convergence.steps < cfg.sparse_probe_steps and abs(fit.convergence.rel_change_last10) < cfg.convergence_tol
    assert fit.weight.argmax(1).tolist() == planted.tolist()  # k = 1 latent of every letter is its planted latent
    ks = ab.k_sparse_probing(f, labels, f, labels, fit.weight, 1, range(26))
    assert ks["refit_converged"].all()


def test_probe_stopped_early_is_reported_not_converged():
    f, labels, planted = _planted_latents(n_latents=256)
    y = torch.as_tensor(labels)
    # SAEBench's sizing at 3,200 words: 50 epochs of batch 4096 = 50 Adam steps, lr decayed to 1e-5
    sb = ab.train_linear_probe(f, y, steps=50, solver="adam", batch_size=4096, lr=1e-2, weight_decay=1e-6, l1=0.01)
    assert not sb.convergence.converged
    assert sb.convergence.continuation_drop > sb.convergence.convergence_tol  # the schedule froze it, not the optimum
    early = ab.train_linear_probe(f, y, steps=10, solver="fista", weight_decay=1e-6, l1=0.01)
    assert early.convergence.steps == 10 and not early.convergence.converged
    full = ab.train_linear_probe(f, y, steps=3000, solver="fista", weight_decay=1e-6, l1=0.01)
    assert full.convergence.converged and full.convergence.final_loss < min(sb.convergence.final_loss,
                                                                             early.convergence.final_loss)


def test_probe_refuses_bad_input():
    f, labels, _ = _planted_latents(n_words=200, n_latents=32)
    with pytest.raises(ab.AbsorptionError, match="unknown probe solver"):
        ab.train_linear_probe(f, torch.as_tensor(labels), steps=10, solver="sgd")
    bad = f.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ab.AbsorptionError, match="NaN"):
        ab.train_linear_probe(bad, torch.as_tensor(labels), steps=10)
    with pytest.raises(ab.AbsorptionError, match="rows but"):
        ab.train_linear_probe(f[:-1], torch.as_tensor(labels), steps=10)


def test_unconverged_probe_is_a_logged_warning():
    from tasks.absorption import warn_unconverged

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    f, labels, _ = _planted_latents(n_words=400, n_latents=64)
    short = ab.train_linear_probe(f, torch.as_tensor(labels), steps=5, solver="fista", l1=0.01)
    done = ab.train_linear_probe(f, torch.as_tensor(labels), steps=3000, solver="fista", l1=0.01)
    keep, logger = Keep(), logging.getLogger("saeflow")
    level_before = logger.level
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    try:
        warn_unconverged("L1 probe A", short.convergence)
        warn_unconverged("L1 probe B", done.convergence)
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level_before)
    level = {r.getMessage().split(":")[0]: r.levelno for r in keep.records}
    assert level == {"absorption L1 probe A": logging.WARNING, "absorption L1 probe B": logging.INFO}


def test_word_l0_with_sparse_encodings_equals_the_dense_count(monkeypatch):
    """Above one encode block (ENCODE_BLOCK_ELEMENTS) the probe words' L0 is counted from sparse encodings (issue #27): same value."""
    import torch

    from saeflow.evals.absorption import evaluate as ev
    from saeflow.saes import SAEConfig, build_sae

    sae = build_sae(SAEConfig(architecture="relu", width=80), d_in=12, seed=0)
    acts = torch.randn(150, 12, generator=torch.Generator().manual_seed(1))
    dense = ev.word_l0(sae, acts)
    monkeypatch.setattr("saeflow.saes.base.ENCODE_BLOCK_ELEMENTS", 0)
    assert 0 < dense < 80 and ev.word_l0(sae, acts) == pytest.approx(dense, rel=1e-6)


def test_l1_probe_on_sparse_latents_equals_the_dense_fit():
    """A wide SAE's latents reach the probe as a scipy sparse matrix (issue #27): the same objective,
    the same fit as on the dense matrix, with either solver."""
    import scipy.sparse as sp

    f, labels, planted = _planted_latents(n_words=800, n_latents=128)
    y = torch.as_tensor(labels)
    for solver, steps in (("fista", 3000), ("adam", 200)):
        kw = dict(steps=steps, solver=solver, batch_size=256, lr=1e-2, weight_decay=1e-6, l1=0.01, seed=3)
        dense = ab.train_linear_probe(f, y, **kw)
        sparse = ab.train_linear_probe(sp.csr_matrix(f.numpy()), y, **kw)
        assert sparse.convergence.steps == dense.convergence.steps, solver
        assert sparse.convergence.final_loss == pytest.approx(dense.convergence.final_loss, rel=1e-4), solver
        torch.testing.assert_close(sparse.weight, dense.weight, atol=2e-4, rtol=1e-3)
        assert sparse.weight.argmax(1).tolist() == dense.weight.argmax(1).tolist()
    assert dense.weight.argmax(1).tolist() == planted.tolist() or solver == "adam"


def test_absorption_with_sparse_latents_equals_the_dense_evaluation(monkeypatch):
    """Above one encode block the evaluation keeps the latents sparse (CSR; issue #27): every table
    of the planted-absorption case is the same as with dense latents."""
    x, labels, _child, sae, parents = _planted({0, 3, 4, 7})
    monkeypatch.setattr("saeflow.evals.absorption.evaluate.ENCODE_BATCH", 1)  # the sparse path's row blocks:
    dense = _evaluate(x, labels, sae, parents)  # the same float rounding of every latent
    monkeypatch.setattr("saeflow.saes.base.ENCODE_BLOCK_ELEMENTS", 0)
    from saeflow.evals.common import encode_latents

    assert hasattr(encode_latents(sae, x, 64), "tocsr")
    sparse = _evaluate(x, labels, sae, parents)
    for name in ("letters", "k_sparse", "prompts"):
        pd.testing.assert_frame_equal(getattr(sparse, name), getattr(dense, name), check_exact=False, rtol=1e-4, atol=1e-6,
                                      obj=name)
    assert sparse.summary == pytest.approx(dense.summary, rel=1e-4, nan_ok=True)
