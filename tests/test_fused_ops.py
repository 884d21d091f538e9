"""Fused training ops (kernels/triton_fused.py, chunked_loss.py) against their twins (torch_impl),
forward and gradients, and the op surface that chooses between them (kernels/ops.py).

CPU: Triton through TRITON_INTERPRET=1 (conftest.py), fp32 (bf16 where only elementwise math is
involved). GPU (marked `gpu`): TRITON_INTERPRET=0 pytest -m gpu tests/test_fused_ops.py
(bf16 against fp64 for the Triton and torch.compile backends, the chunked loss at 0.91B shapes).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_close

from mogelm.kernels import ops, torch_impl
from mogelm.kernels.chunked_loss import ChunkedLinearCE, ce_chunk_torch

fused = pytest.importorskip("mogelm.kernels.triton_fused")


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _check_fwd_bwd(fn, ref, inputs, dtype=None, scale=1.0):
    a, b = _leaves(*inputs), _leaves(*inputs)
    out, out_ref = fn(*a), ref(*b)
    outs = out if isinstance(out, tuple) else (out,)
    outs_ref = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    grads_out = [torch.randn_like(o, dtype=torch.float32).to(o.dtype) for o in outs_ref]
    for o, r in zip(outs, outs_ref):
        assert o.shape == r.shape and o.dtype == r.dtype
        assert_close(o, r, dtype, scale)
    ga = torch.autograd.grad(outs, a, grads_out)
    gb = torch.autograd.grad(outs_ref, b, grads_out)
    for g, r in zip(ga, gb):
        assert g.dtype == r.dtype
        assert_close(g, r, dtype, scale)


# ---------------------------------------------------------------------------------------------
# CPU, interpreter
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,N,dtype",
                         [(7, 40, torch.float32), (5, 64, torch.bfloat16), (0, 16, torch.float32)])
def test_rms_norm_matches_twin(rows, N, dtype):
    x = (torch.randn(rows, N) * 3).to(dtype)
    w = torch.rand(N) + 0.5
    out_dtype = torch.promote_types(dtype, w.dtype)
    # bf16 input: x * rstd is rounded to bf16 (as the twin does); a last-bit difference in rstd or
    # the interpreter's f32 -> bf16 rounding (ECOSYSTEM.md) moves some elements by one bf16 ulp
    _check_fwd_bwd(lambda x, w: fused.rms_norm(x, w, 1e-5, out_dtype),
                   lambda x, w: torch_impl.rms_norm(x, w, 1e-5), [x, w], dtype)


def test_rms_norm_under_autocast_returns_the_autocast_dtype():
    x, w = torch.randn(2, 3, 32), torch.ones(32)
    with ops.use_options(fused="triton"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.rms_norm(x, w, 1e-5)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert_close(y, torch_impl.rms_norm(x, w, 1e-5).bfloat16())
    with ops.use_options(fused="torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.rms_norm(x, w, 1e-5).dtype == torch.float32  # the twin: as before


@pytest.mark.parametrize("hd", [8, 12])  # 12: half of the head dim is not a power of two
def test_rope_qk_matches_twin_on_transposed_views(hd):
    B, T, HQ, HK = 2, 5, 3, 2
    from mogelm.model import RotaryEmbedding

    cos, sin = RotaryEmbedding(hd, 1e4)(torch.arange(T).unsqueeze(0).expand(B, T))
    q = torch.randn(B, T, HQ, hd)  # the layout Attention hands over: (B, T, H, hd).transpose(1, 2)
    k = torch.randn(B, T, HK, hd)

    def fn(q, k):
        return fused.rope_qk(q.transpose(1, 2), k.transpose(1, 2), cos, sin)

    def ref(q, k):
        return torch_impl.rope_qk(q.transpose(1, 2), k.transpose(1, 2), cos, sin)

    _check_fwd_bwd(fn, ref, [q, k])


def test_swiglu_matches_twin():
    g, u = torch.randn(3, 7, 33) * 3, torch.randn(3, 7, 33)
    _check_fwd_bwd(fused.swiglu, torch_impl.swiglu, [g, u])


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_chunked_linear_cross_entropy_matches_twin(kernel):
    N, D, V = 37, 24, 50
    h, w = torch.randn(N, D), torch.randn(V, D) / D**0.5
    y = torch.randint(0, V, (N,))
    y[[3, 20]] = -100  # ignored rows count neither in the loss nor in its mean
    ce_chunk = ce_chunk_torch if kernel == "torch" else fused.ce_chunk

    def fn(h, w):  # 3 chunks of 16 rows; the loss scaled afterwards, as grad accumulation does
        return 0.5 * ChunkedLinearCE.apply(h, w, y, -100, 16, ce_chunk, True)

    def ref(h, w):
        return 0.5 * torch_impl.linear_cross_entropy(h, w, y)

    _check_fwd_bwd(fn, ref, [h, w])
    with torch.no_grad():  # no gradient wanted: the loss alone, nothing kept
        assert_close(ChunkedLinearCE.apply(h, w, y, -100, 16, ce_chunk, False), ref(h, w) * 2)


def test_ops_linear_cross_entropy_takes_model_shapes_and_picks_the_twin_on_cpu():
    B, T, D, V = 2, 6, 16, 40
    h, w, y = torch.randn(B, T, D), torch.randn(V, D), torch.randint(0, V, (B, T))
    twin = torch_impl.linear_cross_entropy(h, w, y)
    assert torch.equal(ops.linear_cross_entropy(h, w, y), twin)  # CPU default: bit-identical
    with ops.use_options(loss="chunked", loss_chunk_rows=5):
        assert_close(ops.linear_cross_entropy(h, w, y), twin)


def test_fused_backend_choice_and_override(monkeypatch):
    x = torch.zeros(1)
    assert ops.fused_backend(x) == "torch"  # CPU default: the twins
    monkeypatch.setenv("MOGELM_FUSED_BACKEND", "triton")
    assert ops.fused_backend(x) == "triton"
    with ops.use_options(fused="compile"):  # the option wins over the environment
        assert ops.fused_backend(x) == "compile"
    monkeypatch.setenv("MOGELM_FUSED_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MOGELM_FUSED_BACKEND"):
        ops.fused_backend(x)
    with pytest.raises(ValueError, match="fused must be one of"):
        ops.set_options(fused="fast")


def test_model_with_fused_ops_matches_the_plain_model():
    """The call sites (RMSNorm, RoPE of q and k, the shared expert's SwiGLU) give the same model."""
    from mogelm.config import from_name
    from mogelm.model import Transformer

    model = Transformer(from_name("debug"))
    ids = torch.randint(0, 512, (2, 9))
    with ops.use_options(fused="torch"):
        ref = model(ids)
        ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with ops.use_options(fused="triton"):
        out = model(ids)
        out.sum().backward()
    assert_close(out, ref)
    for n, p in model.named_parameters():
        assert_close(p.grad, ref_grads[n], scale=10.0), n


@pytest.mark.slow
def test_compile_backend_matches_twins():
    x, w = torch.randn(4, 32), torch.rand(32) + 0.5
    with ops.use_options(fused="compile"):
        _check_fwd_bwd(lambda x, w: ops.rms_norm(x, w, 1e-5), lambda x, w: torch_impl.rms_norm(x, w, 1e-5),
                       [x, w])
        _check_fwd_bwd(ops.swiglu, torch_impl.swiglu, [torch.randn(3, 16), torch.randn(3, 16)])


# ---------------------------------------------------------------------------------------------
# GPU: bf16 against fp64, Triton and torch.compile backends
# ---------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU with TRITON_INTERPRET unset",
)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _gpu_check(op, ref64, inputs, tol=1e-2):
    """op on bf16 copies (fp32 params stay fp32) against ref64 on float64 copies: outputs and grads."""
    lo = [t.detach().clone().to(torch.bfloat16 if t.dim() > 1 else t.dtype).requires_grad_() for t in inputs]
    hi = [t.detach().double().requires_grad_() for t in inputs]
    out, out64 = op(*lo), ref64(*hi)
    outs = out if isinstance(out, tuple) else (out,)
    outs64 = out64 if isinstance(out64, tuple) else (out64,)
    gouts = [torch.randn_like(o, dtype=torch.float64) for o in outs64]
    for o, r in zip(outs, outs64):
        assert torch.isfinite(o).all() and _rel(o, r) < tol, _rel(o, r)
    g = torch.autograd.grad(outs, lo, [go.to(o.dtype) for go, o in zip(gouts, outs)])
    g64 = torch.autograd.grad(outs64, hi, gouts)
    for a, b in zip(g, g64):
        assert torch.isfinite(a).all() and _rel(a, b) < 2 * tol, _rel(a, b)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["triton", "compile"])  # compile: ~1 min of Inductor (-k "not compile")
def test_gpu_fused_ops_vs_fp64(backend):
    dev = "cuda"
    from mogelm.model import RotaryEmbedding

    with ops.use_options(fused=backend):
        x, w = torch.randn(4096, 2048, device=dev) * 2, torch.rand(2048, device=dev) + 0.5
        _gpu_check(lambda x, w: ops.rms_norm(x.float(), w, 1e-5),
                   lambda x, w: torch_impl.rms_norm(x, w, 1e-5), [x, w])
        B, T, H, HK, hd = 2, 1024, 16, 4, 128
        cos, sin = RotaryEmbedding(hd, 1.6e7).to(dev)(torch.arange(T, device=dev).expand(B, T))
        q, k = torch.randn(B, T, H, hd, device=dev), torch.randn(B, T, HK, hd, device=dev)
        _gpu_check(lambda q, k: ops.rope_qk(q.transpose(1, 2), k.transpose(1, 2), cos, sin),
                   lambda q, k: torch_impl.rope_qk(q.transpose(1, 2), k.transpose(1, 2), cos.double(),
                                                   sin.double()), [q, k])
        g, u = torch.randn(8192, 2048, device=dev) * 2, torch.randn(8192, 2048, device=dev)
        _gpu_check(ops.swiglu, torch_impl.swiglu, [g, u])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("V", [32768, 153376])
def test_gpu_chunked_loss_vs_fp64(V):
    N, D = 4096, 2048
    h = torch.randn(N, D, device="cuda")
    w = torch.randn(V, D, device="cuda") / D**0.5
    y = torch.randint(0, V, (N,), device="cuda")
    with ops.use_options(loss="chunked", loss_chunk_rows=1024):
        _gpu_check(lambda h, w: ops.linear_cross_entropy(h, w, y),
                   lambda h, w: torch_impl.linear_cross_entropy(h, w, y), [h, w])
