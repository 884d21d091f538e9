"""Fused inference kernels (kernels/triton_infer.py) against their twins (torch_impl), the op surface
that picks them (kernels/ops.py), and the load-time fusions (inference/fuse.py) on a whole model.

CPU: Triton through TRITON_INTERPRET=1 (conftest.py) in fp32. GPU (marked `gpu`):
TRITON_INTERPRET=0 pytest -m gpu tests/test_infer_kernels.py (bf16 against fp64 at Pangu widths,
the fused fp8 model through the engine's CUDA graphs against eager).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_close

import mogelm
from mogelm.inference import Engine, SamplingParams
from mogelm.inference.fuse import FusedQKV, FusedSwiGLU, fuse_for_inference, is_fused
from mogelm.kernels import ops, torch_impl
from mogelm.model import rope_inv_freq
from mogelm.quant import Fp8Linear, Fp8Options, quantize_model

infer = pytest.importorskip("mogelm.kernels.triton_infer")


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _rope_tables(B, T, hd, theta=1e4):
    pos = torch.randint(0, 500, (B, T)).float()
    angles = pos[..., None] * rope_inv_freq(hd, theta)
    angles = torch.cat([angles, angles], -1)
    return angles.cos(), angles.sin()


# --- kernels against twins (interpreter, fp32) ---------------------------------------------------
@pytest.mark.parametrize("rows,D", [(5, 48), (1, 64), (0, 16)])
def test_add_rms_norm_kernel_matches_twin(rows, D):
    x, r = torch.randn(rows, D) * 2, torch.randn(rows, D)
    w = torch.rand(D) + 0.5
    h, y = infer.add_rms_norm(x, r, w, 1e-5)
    h_ref, y_ref = torch_impl.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(h, h_ref)  # one fp32 add: exact
    assert_close(y, y_ref)


def test_add_rms_norm_kernel_rounds_bf16_like_the_twin():
    x, r = (torch.randn(6, 64) * 3).bfloat16(), torch.randn(6, 64).bfloat16()
    w = (torch.rand(64) + 0.5).bfloat16()
    h, y = infer.add_rms_norm(x, r, w, 1e-5)
    h_ref, y_ref = torch_impl.add_rms_norm(x, r, w, 1e-5)
    assert h.dtype == y.dtype == torch.bfloat16
    # the interpreter's f32 -> bf16 rounding can differ by one ulp (ECOSYSTEM.md); the GPU test checks
    # against fp64
    assert_close(h, h_ref, torch.bfloat16)
    assert_close(y, y_ref, torch.bfloat16)


@pytest.mark.parametrize("bias", [True, False])
def test_qkv_bias_rope_kernel_matches_twin(bias):
    B, T, H, Hkv, hd = 2, 3, 4, 2, 16
    qkv = torch.randn(B, T, (H + 2 * Hkv) * hd)
    b = torch.randn((H + 2 * Hkv) * hd) if bias else None
    cos, sin = _rope_tables(B, T, hd)
    out = infer.qkv_bias_rope(qkv, b, cos, sin, H, Hkv)
    ref = torch_impl.qkv_bias_rope(qkv, b, cos, sin, H, Hkv)
    for o, r in zip(out, ref):
        assert o.shape == r.shape
        assert_close(o, r)


def _fp8_weight(N, K):
    return ops.quantize_rows_fp8(torch.randn(N, K) / K**0.5)


@pytest.mark.parametrize("M,N,K", [(1, 24, 40), (5, 64, 32), (33, 40, 48)])
def test_fp8_weight_only_linear_kernel_matches_twin(M, N, K):
    x = torch.randn(M, K)
    q, s = _fp8_weight(N, K)
    b = torch.randn(N)
    assert_close(infer.linear_fp8_wo(x, q, s, b), torch_impl.linear_fp8(x, q, s, b, "bf16"))
    assert_close(infer.linear_fp8_wo(x, q, s), torch_impl.linear_fp8(x, q, s, None, "bf16"))


def test_fp8_swiglu_kernel_matches_twin():
    x = torch.randn(3, 2, 32)  # leading dims are flattened and restored
    q, s = _fp8_weight(2 * 24, 32)
    out = infer.linear_fp8_wo(x, q, s, swiglu=True)
    assert out.shape == (3, 2, 24)
    assert_close(out, torch_impl.linear_fp8_swiglu(x, q, s))


def test_swiglu_halves_kernel_matches_twin():
    x = torch.randn(3, 5, 2 * 70)
    out = infer.swiglu_halves(x)
    assert out.shape == (3, 5, 70)
    assert_close(out, torch_impl.swiglu_halves(x))


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float8_e4m3fn])
def test_paged_kv_write_kernel_matches_twin(kv_dtype):
    P, bs, Hkv, hd, N = 5, 4, 3, 16, 6
    pools = [torch.zeros(P, bs, Hkv, hd, dtype=kv_dtype) for _ in range(4)]
    slots = torch.tensor([4, 5, 9, 19, 0, 12])
    k = torch.randn(N, 2 * Hkv, hd)[:, ::2]  # a strided head dim, unit stride along hd
    v = torch.randn(N, Hkv, hd)
    scales = (torch.rand(Hkv) + 0.5, torch.rand(Hkv) + 0.5) if kv_dtype != torch.float32 else (None, None)
    infer.paged_kv_write(pools[0], pools[1], slots, k, v, *scales)
    torch_impl.paged_kv_write(pools[2], pools[3], slots, k, v, *scales)
    assert torch.equal(pools[0].float(), pools[2].float()) and torch.equal(pools[1].float(), pools[3].float())
    flat = pools[0].view(-1, Hkv, hd).float()
    assert flat[19].abs().sum() > 0 and flat[1].abs().sum() == 0  # written slots only


def test_dequantize_rows_kernel_is_exact():
    q, s = _fp8_weight(40, 300)
    out = infer.dequantize_rows(q, s, torch.float32)
    assert torch.equal(out, torch_impl.dequantize_rows(q, s, torch.float32))


# --- the op surface ------------------------------------------------------------------------------
def test_add_rms_norm_op_is_the_plain_code_on_cpu_and_in_training():
    x, r = torch.randn(4, 32), torch.randn(4, 32)
    w = torch.rand(32, requires_grad=True)
    h, y = ops.add_rms_norm(x, r, w, 1e-6)  # CPU default: the two ops, bit for bit
    assert torch.equal(h, x + r) and torch.equal(y, ops.rms_norm(x + r, w, 1e-6))
    with ops.use_options(fused="triton"):
        h2, y2 = ops.add_rms_norm(x, r, w, 1e-6)  # the weight needs a gradient: unfused, differentiable
        assert y2.requires_grad and torch.equal(h2, h)
        with torch.no_grad():
            _, y3 = ops.add_rms_norm(x, r, w, 1e-6)  # inference: the kernel
        assert_close(y3, y.detach())


def test_block_and_model_unchanged_on_cpu():
    """The block's add + norm through ops.add_rms_norm: CPU training numerics stay bit-identical."""
    torch.manual_seed(0)
    model = mogelm.Transformer(mogelm.from_name("debug"))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    block = model.layers[0]
    x = model.embed_tokens(ids)
    cos, sin = model.rotary(torch.arange(9).expand(2, 9))
    h = x + block.self_attn(block.input_layernorm(x), cos, sin)
    y, _ = block.mlp(block.post_attention_layernorm(h))
    out, _ = block(x, cos, sin)
    assert torch.equal(out, h + y)


# --- load-time fusions on a whole model ----------------------------------------------------------
def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("fused_backend", ["torch", "triton"])
def test_fused_model_matches_unfused(fused_backend):
    torch.manual_seed(0)
    model = mogelm.Transformer(mogelm.from_name("debug")).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 7))
    ref = _logits(model, ids)
    fuse_for_inference(model)
    assert is_fused(model) and isinstance(model.layers[0].self_attn.qkv_proj, FusedQKV)
    assert isinstance(model.layers[0].mlp.shared_expert, FusedSwiGLU)
    assert not hasattr(model.layers[0].self_attn, "q_proj")
    fuse_for_inference(model)  # idempotent
    with ops.use_options(fused=fused_backend):
        assert_close(_logits(model, ids), ref)


def test_fused_fp8_model_keeps_fp8_weights_and_matches():
    torch.manual_seed(0)
    model = mogelm.Transformer(mogelm.from_name("debug")).eval()
    quantize_model(model, Fp8Options(attention=True, dense_activations="bf16"))
    ids = torch.randint(0, model.cfg.vocab_size, (1, 6))
    ref = _logits(model, ids)
    fuse_for_inference(model)
    proj = model.layers[1].self_attn.qkv_proj.proj
    assert isinstance(proj, Fp8Linear) and proj.weight.dtype == torch.float8_e4m3fn
    assert isinstance(model.layers[1].mlp.shared_expert.gate_up, Fp8Linear)
    assert_close(_logits(model, ids), ref)


def test_engine_runs_a_fused_model_like_the_unfused_one():
    torch.manual_seed(0)
    model = mogelm.Transformer(mogelm.from_name("debug")).eval()
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[1, 2, 3, 4], [5, 6]]
    before = [o.token_ids for o in Engine(model, None, max_batch=2).generate(prompts, params)]
    fuse_for_inference(model)
    assert [o.token_ids for o in Engine(model, None, max_batch=2).generate(prompts, params)] == before


# --- GPU -----------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                         reason="needs a CUDA GPU with TRITON_INTERPRET unset")


@pytest.mark.gpu
@gpu
def test_gpu_fused_kernels_bf16_against_fp64():
    dev, bf = "cuda", torch.bfloat16
    x, r = torch.randn(64, 5120, device=dev), torch.randn(64, 5120, device=dev)
    w = torch.rand(5120, device=dev) + 0.5
    h, y = infer.add_rms_norm(x.to(bf), r.to(bf), w.to(bf), 1e-5)
    hd = (x.to(bf).double() + r.to(bf).double())
    ref = hd * torch.rsqrt(hd.square().mean(-1, keepdim=True) + 1e-5) * w.to(bf).double()
    assert 1e-4 < _rel(y, ref) < 1e-2 and _rel(h, hd) < 1e-2
    B, T, H, Hkv, hd_ = 1, 40, 40, 8, 128
    qkv = torch.randn(B, T, (H + 2 * Hkv) * hd_, device=dev)
    b = torch.randn((H + 2 * Hkv) * hd_, device=dev)
    cos, sin = (t.to(dev) for t in _rope_tables(B, T, hd_, 1.6e7))
    out = infer.qkv_bias_rope(qkv.to(bf), b.to(bf), cos, sin, H, Hkv)
    ref = torch_impl.qkv_bias_rope(qkv.to(bf).double(), b.to(bf).double(), cos.double(), sin.double(), H, Hkv)
    for o, rr in zip(out, ref):
        assert _rel(o, rr) < 1e-2
    gu = torch.randn(37, 2 * 5376, device=dev)
    g, u = gu.to(bf).double().chunk(2, -1)
    assert _rel(infer.swiglu_halves(gu.to(bf)), torch.nn.functional.silu(g) * u) < 1e-2
    pools = [torch.zeros(64, 16, 8, 128, device=dev, dtype=torch.float8_e4m3fn) for _ in range(2)]
    kv = torch.randn(2, 33, 8, 128, device=dev).to(bf)
    slots = torch.randperm(64 * 16, device=dev)[:33]
    sc = torch.rand(8, device=dev) + 0.5
    infer.paged_kv_write(*pools, slots, kv[0], kv[1], sc, sc)
    for pool, x in zip(pools, kv):
        rows = pool.view(-1, 8, 128).view(torch.uint8)[slots].view(torch.float8_e4m3fn)  # no fp8 indexing
        back = rows.double() * sc.double()[:, None]
        assert _rel(back, x) < 0.05  # e4m3 rounding
    for M in (1, 7, 64, 256):
        xm = torch.randn(M, 5120, device=dev).to(bf)
        q, s = ops.quantize_rows_fp8(torch.randn(2 * 5376, 5120, device=dev) / 70)
        wd = q.double() * s.double()[:, None]
        assert _rel(infer.linear_fp8_wo(xm, q[:5120], s[:5120]), xm.double() @ wd[:5120].t()) < 1e-2
        g, u = (xm.double() @ wd.t()).chunk(2, -1)
        assert _rel(infer.linear_fp8_wo(xm, q, s, swiglu=True), torch.nn.functional.silu(g) * u) < 1e-2


@pytest.mark.gpu
@gpu
def test_gpu_engine_graphs_of_a_fused_fp8_model_match_eager():
    model = mogelm.Transformer(mogelm.from_name("debug")).eval().cuda().bfloat16()
    model.rotary.inv_freq = rope_inv_freq(model.cfg.head_dim, model.cfg.rope_theta, "cuda")
    quantize_model(model, Fp8Options(attention=True, dense_activations="bf16"))
    fuse_for_inference(model)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8]]
    graphed = Engine(model, None, max_batch=4, cuda_graphs=True)
    assert graphed.graphs is not None
    eager = Engine(model, None, max_batch=4, cuda_graphs=False)
    assert [o.token_ids for o in graphed.generate(prompts, params)] == \
        [o.token_ids for o in eager.generate(prompts, params)]
