"""Precision (issue #26): ``auto`` resolution, bf16 training kernels against float32, bf16 training
on planted ground truth, bit-exact resume under bf16, fingerprints that keep float32 and bf16 apart."""

from __future__ import annotations

import pytest
import torch

from saeflow.config import ModelConfig, PipelineConfig, TrainConfig, resolve_precision
from saeflow.precision import PrecisionError, cpu_bf16_flags, matmul_dtype, resolve
from saeflow.saes import SAEConfig, build_sae, load_sae
from saeflow.training import train_sae
from tests.test_training import InMemoryLoader, planted_data

CPU = torch.device("cpu")
AVX512_BF16 = "processor : 0\nflags : fpu sse2 avx2 avx512f avx512_bf16\n"
AVX2_ONLY = "processor : 0\nflags : fpu sse2 avx2 fma\n"


# ------------------------------------------------------------------------------------ resolution
def test_auto_resolves_by_the_cpu_flags(monkeypatch):
    monkeypatch.delenv("SAEFLOW_PRECISION", raising=False)
    assert cpu_bf16_flags(AVX512_BF16) == ("avx512_bf16",)
    assert cpu_bf16_flags(AVX2_ONLY) == ()
    r = resolve("auto", "cpu", cpuinfo=AVX512_BF16)
    assert r.name == "bfloat16" and "avx512_bf16" in r.reason and r.dtype is torch.bfloat16
    r = resolve("auto", "cpu", cpuinfo=AVX2_ONLY)
    assert r.name == "float32" and "emulated" in r.reason
    assert resolve("bfloat16", "cpu", cpuinfo=AVX2_ONLY).name == "bfloat16"  # an explicit value wins
    assert resolve("float32", "cpu", cpuinfo=AVX512_BF16).name == "float32"
    monkeypatch.setenv("SAEFLOW_PRECISION", "float32")
    assert resolve("auto", "cpu", cpuinfo=AVX512_BF16).name == "float32"
    monkeypatch.setenv("SAEFLOW_PRECISION", "fp8")
    with pytest.raises(PrecisionError, match="SAEFLOW_PRECISION"):
        resolve("auto", "cpu")
    with pytest.raises(PrecisionError, match="unknown precision 'half'"):
        resolve("half", "cpu")


def test_profile_resolution_is_concrete_and_logged(monkeypatch):
    monkeypatch.setenv("SAEFLOW_PRECISION", "bfloat16")
    cfg = PipelineConfig(model=ModelConfig(dtype="auto"), train=TrainConfig(precision="auto"))
    out, notes = resolve_precision(cfg)
    assert out.model.dtype == "bfloat16" and out.train.precision == "bfloat16"
    assert len(notes) == 2 and all("auto -> bfloat16" in n for n in notes)
    same, none = resolve_precision(out)
    assert same is out and none == []
    if not torch.cuda.is_available():  # a GPU profile read on a CPU machine loads; it resolves where it runs
        gpu = PipelineConfig(model=ModelConfig(dtype="auto"), train=TrainConfig(precision="auto", device="cuda"))
        kept, why = resolve_precision(gpu)
        assert kept.model.dtype == "auto" and "unresolved" in why[0] and "CUDA is not available" in why[0]


def test_precision_keys_the_fingerprint(monkeypatch):
    monkeypatch.delenv("SAEFLOW_PRECISION", raising=False)
    f32, bf16 = TrainConfig(), TrainConfig(precision="bfloat16")
    assert "precision" not in f32.fingerprint_payload()  # float32 artifacts keep their old fingerprints
    assert bf16.fingerprint_payload()["precision"] == "bfloat16"
    auto = TrainConfig(precision="auto").fingerprint_payload()
    assert auto.get("precision", "float32") == resolve("auto", "cpu").name  # never the word "auto"
    assert ModelConfig(dtype="bfloat16").resolved_dtype() == "bfloat16"
    assert ModelConfig(dtype="auto").resolved_dtype() in ("float32", "bfloat16")


# ----------------------------------------------------------------------------------------- kernels
ARCHS = {
    "topk": {"k": 16},
    "topk-rescale": {"architecture": "topk", "k": 16, "rescale_acts_by_decoder_norm": True},
    "batchtopk": {"k": 16},
    "matryoshka": {"k": 16, "matryoshka_widths": [64, 256, 512]},
    "relu": {},
    "jumprelu": {},
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_kernels_match_float32(arch):
    """Forward loss and every gradient of one training step, bf16 matmuls vs float32 (dead latents
    feed the aux losses). Measured: loss rel. diff <= 2.6e-3, gradient cosine >= 0.999 (TopK family:
    a few latents at the selection boundary swap; ReLU / JumpReLU >= 0.9999)."""
    kw = dict(ARCHS[arch])
    kw.setdefault("architecture", arch)
    sae = build_sae(SAEConfig(width=512, **kw), 64, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=g) * 3
    dead = torch.zeros(512, dtype=torch.bool)
    dead[::3] = True
    res = {}
    for cd in (None, torch.bfloat16):
        sae.zero_grad()
        with matmul_dtype(cd):
            out = sae.training_forward(x, dead, return_feature_acts=False, step=5)
        out["loss"].backward()  # outside the block: the kernels keep the forward's dtype
        res[cd] = (float(out["loss"].detach()), {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None})
    (l32, g32), (l16, g16) = res[None], res[torch.bfloat16]
    assert abs(l16 - l32) / abs(l32) < 1e-2
    assert set(g32) == set(g16)
    for name in g32:
        cos = torch.nn.functional.cosine_similarity(g32[name].flatten(), g16[name].flatten(), dim=0)
        assert cos > 0.995, f"{arch} {name}: gradient cosine {cos:.5f}"


def test_bf16_selection_values_are_float32_exact():
    """TopK under bf16 selects on bf16 pre-activations but the selected latents' values are the
    float32 ones: where both pick the same latents, the latent activations agree to float32 precision."""
    sae = build_sae(SAEConfig(architecture="topk", width=256, k=8), 32, seed=0)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    outs = {}
    for cd in (None, torch.bfloat16):
        with torch.no_grad(), matmul_dtype(cd):
            outs[cd] = sae.training_forward(x, None, return_feature_acts=True, step=0)["feature_acts"]
    f32, f16 = outs[None], outs[torch.bfloat16]
    same = ((f32 > 0) == (f16 > 0)).all(dim=1)
    assert same.float().mean() > 0.8
    torch.testing.assert_close(f16[same], f32[same], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- training
def test_bf16_training_recovers_planted_dictionary_as_well_as_float32(tmp_path):
    """The planted-dictionary run of tests/test_training.py in both precisions. Tolerance: the bf16
    mean best cosine within 0.005 of float32's and >= 0.98, the same features found (>= 0.9)
    within 2 of 64."""
    data, dictionary = planted_data(50_000, 32, 64, 3, seed=0)
    sae_cfg = SAEConfig(width=128, k=3, dead_feature_window=50, dead_window_fraction=None)
    found = {}
    for prec in ("float32", "bfloat16"):
        train_cfg = TrainConfig(training_tokens=100_000, batch_size=256, lr=1e-2, seed=0, checkpoint_every=10**6,
                                log_every=50, precision=prec)
        train_sae(sae_cfg, train_cfg, InMemoryLoader(data, 256, seed=0), 32, tmp_path / prec, CPU)
        sae = load_sae(tmp_path / prec)
        W = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
        found[prec] = (dictionary @ W.T).max(dim=1).values
    f32, bf16 = found["float32"], found["bfloat16"]
    assert bf16.mean() >= 0.98, f"bf16 mean best cosine {bf16.mean():.4f}"
    assert abs(float(bf16.mean() - f32.mean())) <= 0.005, (float(f32.mean()), float(bf16.mean()))
    assert abs(int((bf16 >= 0.9).sum()) - int((f32 >= 0.9).sum())) <= 2


def test_bf16_resume_is_bit_exact(tmp_path):
    data, _ = planted_data(4_096, 16, 32, 3, seed=3)
    sae_cfg = SAEConfig(width=64, k=4, dead_feature_window=5, dead_window_fraction=None)
    train_cfg = TrainConfig(training_tokens=64 * 30, batch_size=64, lr=3e-3, seed=0, checkpoint_every=7, log_every=5,
                            precision="bfloat16")
    ref = tmp_path / "ref"
    train_sae(sae_cfg, train_cfg, InMemoryLoader(data, 64, seed=0), 16, ref, CPU)
    resumed = tmp_path / "resumed"
    for stop in (10, 22):  # killed after steps 10 and 22 (checkpoints at 7 and 21)
        part = train_sae(sae_cfg, train_cfg, InMemoryLoader(data, 64, seed=0), 16, resumed, CPU, stop_after_steps=stop)
        assert part["completed"] is False
    train_sae(sae_cfg, train_cfg, InMemoryLoader(data, 64, seed=0), 16, resumed, CPU)
    a, b = load_sae(ref), load_sae(resumed)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ----------------------------------------------------------------------------------------- pipeline
def test_pipeline_in_bf16_runs_every_stage_and_records_the_precision(tmp_path):
    """The whole stage graph (every evaluation, the browser) with the model and the training in
    bfloat16 on the tiny random model; the precision is in each artifact's config.json and in the
    fingerprints: the float32 run beside it shares only the model, vocab and corpus stages."""
    import json

    from flows.pipeline import pipeline
    from tests.test_faults import faults_config

    root = tmp_path / "a"
    bf = pipeline(faults_config(model={"name": "tiny-random", "tiny_layers": 2, "tiny_d_model": 64, "seed": 0,
                                       "dtype": "bfloat16"},
                                train={**faults_config().train.model_dump(), "precision": "bfloat16"}),
                  str(root))
    acts = json.loads(next((root / "activations").glob("*/config.json")).read_text())
    assert acts["config"]["model_dtype"] == "bfloat16"
    trains = [json.loads(p.read_text()) for p in (root / "train").glob("*/config.json")]
    assert trains and all(t["config"]["train"]["precision"] == "bfloat16" for t in trains), trains[0]
    assert bf.report is not None
    f32 = pipeline(faults_config(), str(root))
    shared = {k for k in f32.cached if f32.cached[k]}
    assert {"model", "vocab", "corpus"} <= shared and "activations" not in shared and "train" not in shared, f32.cached



def test_roofline_flop_counts():
    """benchmarks/roofline.py's minimal FLOPs: Gemma 3 270M's shape to layer 6 at context 128 is
    the issue's ~81 MFLOP per token; a k-based SAE counts the dense encoder and the sparse rest."""
    from types import SimpleNamespace

    from benchmarks.roofline import model_flops, sae_flops

    gemma = SimpleNamespace(d_model=640, n_heads=4, d_head=256, n_key_value_heads=1, d_mlp=2048, gated_mlp=True)
    per_block = 2 * 640 * 1024 * 2 + 2 * 640 * 256 * 2 + 4 * 128 * 1024 + 2 * 640 * 2048 * 3
    assert model_flops(gemma, 6, 128) == 7 * per_block
    assert 80e6 < model_flops(gemma, 6, 128) < 82e6
    assert sae_flops("topk", 640, 16384, 32) == 2 * 640 * 16384 + 6 * 32 * 640
    assert sae_flops("relu", 640, 1024, None) == 10 * 640 * 1024


def test_bag_weight_gradient_product_matches_coo():
    """The bf16 path's embedding-bag ``S.T @ Y`` equals the float32 path's COO product (summation
    order aside), latents that no row selected (empty bags) included: their rows are zero."""
    from saeflow.saes.kernels import _COO, _rows_t_fast

    g = torch.Generator().manual_seed(4)
    B, m, d_sae, d = 64, 5, 300, 12
    idx = torch.stack([torch.randperm(d_sae, generator=g)[:m].sort().values for _ in range(B)])
    v, Y = torch.randn(B, m, generator=g), torch.randn(B, d, generator=g)
    coo = _rows_t_fast(idx, v, Y, d_sae, None)
    torch.testing.assert_close(_rows_t_fast(idx, v, Y, d_sae, torch.bfloat16), coo, rtol=1e-5, atol=1e-5)
    rows = torch.arange(B).repeat_interleave(m)
    sp = _COO(rows, idx.reshape(-1), B, d_sae)
    torch.testing.assert_close(sp.t_times_dense(v.reshape(-1), Y, torch.bfloat16), sp.t_times_dense(v.reshape(-1), Y),
                               rtol=1e-5, atol=1e-5)


def test_row_norms_gradient_matches_autograd():
    """The bf16 path's fused row-norm backward gives autograd's value and gradient (0 for a zero row)."""
    from saeflow.saes.kernels import row_norms

    W = torch.randn(50, 7, generator=torch.Generator().manual_seed(5))
    W[3] = 0.0
    g = torch.randn(50, generator=torch.Generator().manual_seed(6))
    grads = {}
    for cd in (None, torch.bfloat16):
        w = W.clone().requires_grad_(True)
        with matmul_dtype(cd):
            n = row_norms(w)
        (n * g).sum().backward()
        grads[cd] = (n.detach(), w.grad)
    torch.testing.assert_close(grads[torch.bfloat16][0], grads[None][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[torch.bfloat16][1], grads[None][1], rtol=1e-6, atol=1e-7)
    assert grads[torch.bfloat16][1][3].abs().sum() == 0


def test_reuse_freed_memory_sets_and_restores_glibc_options(monkeypatch):
    """Inside the block glibc keeps freed large blocks (no mmap, no trim); the defaults come back
    when the outermost block exits; ``SAEFLOW_HOST_MALLOC=default`` and non-glibc systems do nothing."""
    from saeflow import hostmem

    calls = []

    class FakeLibc:
        gnu_get_libc_version = object()

        def mallopt(self, opt, value):
            calls.append(("mallopt", opt, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    monkeypatch.setattr(hostmem, "_glibc", lambda: FakeLibc())
    with hostmem.reuse_freed_memory() as on:
        assert on
        with hostmem.reuse_freed_memory():
            pass
        assert calls == [("mallopt", hostmem._M_MMAP_MAX, 0), ("mallopt", hostmem._M_TRIM_THRESHOLD, hostmem._KEEP)]
    assert calls[2:] == [("mallopt", hostmem._M_MMAP_MAX, hostmem._DEFAULT_MMAP_MAX),
                         ("mallopt", hostmem._M_TRIM_THRESHOLD, hostmem._DEFAULT_TRIM), ("trim", 0)]
    monkeypatch.undo()
    monkeypatch.setenv("SAEFLOW_HOST_MALLOC", "default")
    assert hostmem._glibc() is None
    with hostmem.reuse_freed_memory() as on:
        assert not on
    monkeypatch.setattr(hostmem.sys, "platform", "darwin")
    monkeypatch.delenv("SAEFLOW_HOST_MALLOC")
    assert hostmem._glibc() is None


def test_reuse_freed_memory_keeps_results_identical():
    """Where memory comes from never changes a value: a training step inside and outside the block."""
    from saeflow import hostmem

    def one_step():
        sae = build_sae(SAEConfig(architecture="topk", width=256, k=8), 32, seed=0)
        x = torch.randn(128, 32, generator=torch.Generator().manual_seed(7))
        out = sae.training_forward(x, None, return_feature_acts=False, step=0)
        out["loss"].backward()
        return torch.cat([p.grad.flatten() for p in sae.parameters()])

    outside = one_step()
    with hostmem.reuse_freed_memory():
        inside = one_step()
    assert torch.equal(inside, outside)


@pytest.mark.parametrize("n_cols", [20, 300])
def test_aux_selection_values_dense_over_dead_columns(n_cols):
    """The bf16 path's aux-k values over the dead columns (a dense product over those columns when
    they are few, sampled dot products otherwise) equal the float32 pre-activations there."""
    from saeflow.saes.kernels import selected_pre_cols

    g = torch.Generator().manual_seed(8)
    B, d, d_sae, m = 32, 16, 400, 4
    sae_in, W_enc, b_enc = torch.randn(B, d, generator=g), torch.randn(d, d_sae, generator=g), torch.randn(d_sae, generator=g)
    cols = torch.randperm(d_sae, generator=g)[:n_cols].sort().values
    local = torch.stack([torch.randperm(n_cols, generator=g)[:m].sort().values for _ in range(B)])
    full = torch.addmm(b_enc, sae_in, W_enc)
    got = selected_pre_cols(None, sae_in, W_enc, b_enc, cols, local)
    torch.testing.assert_close(got, full.gather(1, cols[local]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(selected_pre_cols(full, sae_in, W_enc, b_enc, cols, local), full.gather(1, cols[local]),
                               rtol=0, atol=0)


def test_dense_aux_over_dead_columns_matches_sparse_kernels():
    """TopK's aux-k loss on the bf16 path computed densely over a few dead latents gives the loss
    and gradients of the sparse kernels (same selection: the selection pass is shared)."""
    sae = build_sae(SAEConfig(architecture="topk", width=512, k=8, aux_k=16), 64, seed=0)
    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(9)) * 3
    dead = torch.zeros(512, dtype=torch.bool)
    dead[::8] = True  # 64 dead <= 16 * k_aux: the dense route by default
    res = {}
    for factor in (16, 0):  # 0: the sparse kernels
        sae.aux_dense_factor = factor
        sae.zero_grad()
        with matmul_dtype(torch.bfloat16):
            out = sae.training_forward(x, dead, return_feature_acts=False, step=0)
        out["loss"].backward()
        res[factor] = (out["aux"].detach(), {k: p.grad.clone() for k, p in sae.named_parameters()})
    assert float(res[16][0]) > 0
    torch.testing.assert_close(res[16][0], res[0][0], rtol=1e-5, atol=1e-6)
    for k in res[16][1]:
        torch.testing.assert_close(res[16][1][k], res[0][1][k], rtol=1e-4, atol=1e-5)
