"""Triton MoE kernels against the torch twins and the loop-over-experts oracle.

CPU: the kernels run through TRITON_INTERPRET=1 (set in conftest.py) in fp32 with small, odd
shapes.  GPU (marked `gpu`, run on the device machine with the interpreter off):
    TRITON_INTERPRET=0 pytest -m gpu tests/test_triton_kernels.py
bf16 and fp8 against fp32 references, forward and backward, and CUDA-graph capture.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_close

triton_moe = pytest.importorskip("mogelm.kernels.triton_moe")

from mogelm.kernels import ops, torch_impl  # noqa: E402
from mogelm.kernels.triton_align import align_torch  # noqa: E402
from mogelm.moe.reference import reference_routed_experts  # noqa: E402


def _routing(T: int, E: int, K: int, skew: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token; skew=True sends every token to experts 0..K-1 (others empty)."""
    if skew:
        ids = torch.arange(K).repeat(T, 1)
    else:
        ids = (torch.stack([torch.randperm(E)[:K] for _ in range(T)]) if T
               else torch.zeros(0, K, dtype=torch.int64))
    return torch.rand(T, K) + 0.1, ids


def _experts(E: int, D: int, F: int, dtype=torch.float32, device="cpu"):
    gate_up = torch.randn(E, 2 * F, D, device=device) / D**0.5
    down = torch.randn(E, D, F, device=device) / F**0.5
    return gate_up.to(dtype), down.to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------
# CPU, interpreter, fp32
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "T,E,G,kp,scale,bias,renorm",
    [(1, 8, 4, 1, False, False, False), (37, 16, 4, 1, True, False, False), (9, 12, 3, 2, True, True, True)],
)
def test_moge_route_matches_torch(T, E, G, kp, scale, bias, renorm):
    logits = torch.randn(T, E)
    logits[0, :2] = 5.0  # a tie inside group 0: the lower id must win
    scale_E = torch.rand(E) + 0.5 if scale else None
    bias_E = torch.randn(E) * 0.05 if bias else None
    w, ids, probs, counts = triton_moe.moge_route_with_counts(logits, G, kp, scale_E, renorm, bias_E)
    w_ref, ids_ref, probs_ref = torch_impl.moge_route(logits, G, kp, scale_E, renorm, bias_E)
    assert torch.equal(ids, ids_ref), (ids, ids_ref)
    assert_close(w, w_ref)
    assert_close(probs, probs_ref)
    assert torch.equal(counts.long(), torch.bincount(ids_ref.flatten(), minlength=E))
    with ops.use_backend("triton"):  # the op surface reaches the same kernel
        w2, ids2, _ = ops.moge_route(logits, G, kp, scale_E, renorm, bias_E)
    assert torch.equal(ids2, ids_ref) and torch.equal(w2, w)


@pytest.mark.parametrize(
    "T,E,K,block_m,skew",
    [(1, 8, 2, 16, False), (13, 8, 3, 16, False), (20, 6, 2, 16, True), (300, 8, 2, 16, True),
     (150, 128, 4, 32, False)],  # S > 256: 3 kernels
)
def test_align_kernel_and_torch_plan_agree(T, E, K, block_m, skew):
    _, ids = _routing(T, E, K, skew)
    plan = triton_moe.align(ids, E, block_m)
    ref = align_torch(ids.reshape(-1), E, block_m)
    used = int(plan.num_post_pad)
    if T > 1:  # one token takes a layout of its own (one block per slot, no sort); invariants below
        assert used == int(ref.num_post_pad)
        assert torch.equal(plan.sorted_ids_P[:used], ref.sorted_ids_P[:used])
        assert torch.equal(plan.block_expert_NB[: used // block_m], ref.block_expert_NB[: used // block_m])
        assert torch.equal(plan.counts_E, ref.counts_E)
    # every routed row appears exactly once, inside a block of its own expert
    S = ids.numel()
    rows = plan.sorted_ids_P[:used].long()
    real = rows[rows < S]
    assert torch.equal(real.sort().values, torch.arange(S))
    block_of_row = torch.arange(used)[rows < S] // block_m
    assert torch.equal(plan.block_expert_NB[block_of_row].long(), ids.reshape(-1)[real])


@pytest.mark.parametrize(
    "T,D,F,E,K,skew",
    [(1, 32, 16, 4, 2, False), (7, 40, 24, 8, 3, False), (19, 24, 20, 6, 2, True), (70, 24, 16, 8, 4, False)],
)
def test_routed_experts_forward_matches_oracle(T, D, F, E, K, skew):
    w, ids = _routing(T, E, K, skew)
    x = torch.randn(T, D)
    gate_up, down = _experts(E, D, F)
    with ops.use_backend("triton"):
        y = ops.routed_experts(x, w, ids, gate_up, down)
    assert y.shape == (T, D) and y.dtype == x.dtype
    assert_close(y, reference_routed_experts(x, w, ids, gate_up, down))


@pytest.mark.parametrize("path", ["decode", "sorted"])
@pytest.mark.parametrize("T,skew", [(1, False), (4, True), (6, False)])
def test_decode_and_sorted_paths_match_oracle(path, T, skew):
    D, F, E, K = 40, 24, 8, 3  # F = 1.5 slices of 16 and D = 2.5 steps of 16: masked tails
    w, ids = _routing(T, E, K, skew)
    x = torch.randn(T, D)
    gate_up, down = _experts(E, D, F)
    gemm = triton_moe.GemmConfig()
    cfg = triton_moe.MoEConfig(gemm, gemm, triton_moe.DecodeConfig() if path == "decode" else None)
    y = triton_moe.routed_experts_forward(x, w, ids, gate_up, down, cfg)
    assert_close(y, reference_routed_experts(x, w, ids, gate_up, down))


def test_tuned_config_table_is_read_and_bounded():
    import json
    from pathlib import Path

    table = json.loads((Path(triton_moe.__file__).with_name("configs") / "h200.json").read_text())
    entry = table["bf16"]["E=64,F=1344,D=5120"]["8"]
    cfg = triton_moe.get_config(8, 5120, 1344, 64, "NVIDIA H200")
    assert cfg.gate_up == triton_moe.GemmConfig(**entry["gate_up"])
    assert cfg.down == triton_moe.GemmConfig(**entry["down"])
    far = triton_moe.get_config(10**8, 5120, 1344, 64, "NVIDIA H200")  # past 4x the largest bucket
    assert far == triton_moe._heuristic_config(10**8, 5120, 1344, 64)
    assert triton_moe.get_config(8, 5120, 1344, 64, "cpu") == triton_moe._heuristic_config(8, 5120, 1344, 64)
    w8a8_small = triton_moe.get_config(8, 5120, 1344, 64, "NVIDIA H200", "w8a8")  # table holds prefill only
    assert w8a8_small == triton_moe._heuristic_config(8, 5120, 1344, 64, "w8a8")


def test_routed_experts_empty_batch_matches_torch_twin():
    """No tokens: the output equals the PyTorch twin's (empty, x's dtype) and backward still runs,
    giving the twin's all-zero weight gradients rather than failing on zero routed rows."""
    gate_up, down = _experts(4, 16, 8)
    ids = torch.zeros(0, 2, dtype=torch.int64)
    leaves = [t.requires_grad_() for t in (torch.randn(0, 16), torch.rand(0, 2), gate_up.clone(),
                                           down.clone())]
    leaves_ref = [t.detach().clone().requires_grad_() for t in leaves]
    y = triton_moe.routed_experts(leaves[0], leaves[1], ids, leaves[2], leaves[3])
    y_ref = torch_impl.routed_experts(leaves_ref[0], leaves_ref[1], ids, leaves_ref[2], leaves_ref[3])
    assert torch.equal(y, y_ref) and y.dtype == y_ref.dtype
    grads = torch.autograd.grad(y.sum(), leaves)
    grads_ref = torch.autograd.grad(y_ref.sum(), leaves_ref)
    for name, g, g_ref in zip(("x", "weights", "gate_up", "down"), grads, grads_ref):
        assert torch.equal(g, g_ref), name
    assert not grads[2].any() and not grads[3].any()  # no row reached an expert


@pytest.mark.parametrize("T,D,F,E,K,skew", [(1, 16, 12, 4, 2, False), (9, 20, 12, 6, 3, True)])
def test_routed_experts_backward_matches_oracle(T, D, F, E, K, skew):
    w, ids = _routing(T, E, K, skew)
    x = torch.randn(T, D)
    gate_up, down = _experts(E, D, F)
    leaves = [t.clone().requires_grad_() for t in (x, w, gate_up, down)]
    leaves_ref = [t.clone().requires_grad_() for t in (x, w, gate_up, down)]
    with ops.use_backend("triton"):
        y = ops.routed_experts(leaves[0], leaves[1], ids, leaves[2], leaves[3])
    y_ref = reference_routed_experts(leaves_ref[0], leaves_ref[1], ids, leaves_ref[2], leaves_ref[3])
    dy = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, leaves, dy)
    grads_ref = torch.autograd.grad(y_ref, leaves_ref, dy)
    for name, g, g_ref in zip(("x", "weights", "gate_up", "down"), grads, grads_ref):
        assert g.shape == g_ref.shape, name
        assert_close(g, g_ref)


def _fake_quant_rows(x: torch.Tensor) -> torch.Tensor:
    q, s = triton_moe.quantize_rows_fp8(x)
    return q.float() * s.unsqueeze(-1)


def _w8a8_reference(x, w, ids, gate_up, down):
    """Loop oracle with the kernel's activation rounding: x and h quantised per row to e4m3."""
    F = gate_up.shape[1] // 2
    xq = _fake_quant_rows(x)
    y = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gu = gate_up[e].double() @ xq[t].double()
            h = torch.nn.functional.silu(gu[:F]) * gu[F:]
            y[t] += float(w[t, k]) * (down[e].double() @ _fake_quant_rows(h.float()[None])[0].double())
    return y


@pytest.mark.parametrize("T", [5, 11])  # 10 routed rows take the decode kernel, 22 the sorted path
@pytest.mark.parametrize("activations", ["bf16", "fp8"])
def test_fp8_experts_match_dequantized_reference(activations, T):
    D, F, E, K = 32, 24, 6, 2
    w, ids = _routing(T, E, K)
    x = torch.randn(T, D)
    gate_up, down = _experts(E, D, F)
    guq, gus, dnq, dns = ops.quantize_experts_fp8(gate_up, down)
    gate_up_dq = guq.float() * gus.unsqueeze(-1)
    down_dq = dnq.float() * dns.unsqueeze(-1)
    assert _rel(gate_up_dq, gate_up) < 0.05  # e4m3 keeps 3 mantissa bits
    with ops.use_backend("triton"):
        y = ops.routed_experts_fp8(x, w, ids, guq, gus, dnq, dns, activations)
    if activations == "bf16":  # weight-only: exact up to fp32 rounding against dequantised weights
        assert_close(y, reference_routed_experts(x, w, ids, gate_up_dq, down_dq))
    else:  # a rounding boundary may fall differently for a few h elements
        assert _rel(y, _w8a8_reference(x, w, ids, gate_up_dq, down_dq)) < 1e-2
        assert _rel(y, reference_routed_experts(x, w, ids, gate_up, down)) < 0.1


def test_import_fails_with_import_error_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "try:\n    import mogelm.kernels.triton_moe\nexcept ImportError:\n    print('ImportError')\n"
        "from mogelm.kernels import ops; print(ops.triton_available())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["ImportError", "False"], out.stderr


# ---------------------------------------------------------------------------------------------
# GPU (H100/H200), compiled kernels
# ---------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU with TRITON_INTERPRET unset",
)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T", [1, 33, 700, 5000])
def test_gpu_bf16_forward_backward_vs_fp32(T):
    D, F, E, G = 1024, 384, 64, 8
    dev = "cuda"
    logits = torch.randn(T, E, device=dev)
    w, ids, _ = triton_moe.moge_route(logits, G, 1, torch.rand(E, device=dev) + 0.5)
    w_ref, ids_ref, _ = torch_impl.moge_route(logits, G, 1, None, False, None)
    assert torch.equal(ids, ids_ref)
    x = torch.randn(T, D, device=dev)
    gate_up, down = _experts(E, D, F, device=dev)
    y32 = reference_routed_experts(x.double(), w.double(), ids, gate_up.double(), down.double())
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in (x, gate_up, down)]
    wl = w.clone().requires_grad_()
    y = triton_moe.routed_experts(leaves[0], wl, ids, leaves[1], leaves[2])
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert _rel(y, y32) < 1e-2, _rel(y, y32)
    leaves64 = [t.double().requires_grad_() for t in (x, gate_up, down)]
    w64 = w.double().requires_grad_()
    y64 = reference_routed_experts(leaves64[0], w64, ids, leaves64[1], leaves64[2])
    dy = torch.randn_like(y64)
    grads = torch.autograd.grad(y, [leaves[0], wl, leaves[1], leaves[2]], dy.to(torch.bfloat16))
    grads64 = torch.autograd.grad(y64, [leaves64[0], w64, leaves64[1], leaves64[2]], dy)
    for name, g, g64 in zip(("x", "weights", "gate_up", "down"), grads, grads64):
        assert _rel(g, g64) < 2e-2, (name, _rel(g, g64))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T", [1, 64, 3000])
@pytest.mark.parametrize("activations", ["bf16", "fp8"])
def test_gpu_fp8_vs_fp32(T, activations):
    D, F, E, K = 1024, 384, 64, 8
    w, ids = (t.cuda() for t in _routing(T, E, K))
    x = torch.randn(T, D, device="cuda")
    gate_up, down = _experts(E, D, F, device="cuda")
    guq, gus, dnq, dns = ops.quantize_experts_fp8(gate_up, down)
    y = triton_moe.routed_experts_fp8(x.bfloat16(), w, ids, guq, gus, dnq, dns, activations)
    ref = reference_routed_experts(x.double(), w.double(), ids, (guq.double() * gus[..., None]),
                                   dnq.double() * dns[..., None])
    assert torch.isfinite(y).all()
    assert _rel(y, ref) < (1e-2 if activations == "bf16" else 6e-2), _rel(y, ref)


@pytest.mark.gpu
@gpu
def test_gpu_quant_rows_kernel_matches_torch():
    x = torch.randn(300, 1345, device="cuda") * torch.rand(300, 1, device="cuda") * 10
    x[3] = 0.0  # an all-zero row keeps a finite scale
    q, s = triton_moe.quant_rows(x.bfloat16())
    q_ref, s_ref = triton_moe.quantize_rows_fp8(x.bfloat16())
    assert torch.equal(s, s_ref)
    assert (q.view(torch.uint8) != q_ref.view(torch.uint8)).sum() == 0


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T", [1, 4])
def test_gpu_decode_cuda_graph_replays_match_eager(T):
    D, F, E, G = 1024, 384, 64, 8
    logits = torch.randn(T, E, device="cuda")
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    gate_up, down = _experts(E, D, F, torch.bfloat16, "cuda")

    def step():
        w, ids, _ = triton_moe.moge_route(logits, G, 1)
        return triton_moe.routed_experts_forward(x, w, ids, gate_up, down)

    eager = step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    logits.copy_(torch.randn_like(logits))  # new routing through the same graph
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, step())
    assert not torch.equal(out, eager)
