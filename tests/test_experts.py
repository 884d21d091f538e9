"""Expert backends against the loop-over-experts oracle, forward and gradients (the layer's own
tests are in test_layer.py)."""

import pytest
import torch
from conftest import assert_close

from mogelm.kernels import ops
from mogelm.moe.reference import reference_routed_experts


def make_problem(T, D, F, E, K, dtype=torch.float32, empty_experts=()):
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    gate_up = (torch.randn(E, 2 * F, D, dtype=dtype) / D**0.5).requires_grad_()
    down = (torch.randn(E, D, F, dtype=dtype) / F**0.5).requires_grad_()
    allowed = torch.tensor([e for e in range(E) if e not in empty_experts])
    ids = allowed[torch.rand(T, len(allowed)).argsort(-1)[:, :K]]
    weights = torch.rand(T, K, requires_grad=True)
    return x, weights, ids, gate_up, down


def grads(fn, x, weights, ids, gate_up, down):
    y = fn(x, weights, ids, gate_up, down)
    # the same output gradient for both sides
    g_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    return (y, *torch.autograd.grad(y, (x, weights, gate_up, down), g_out))


@pytest.mark.parametrize("backend", ["torch", "loop"])
@pytest.mark.parametrize(
    "T, D, F, E, K, empty",
    [
        (1, 16, 8, 4, 2, ()),  # a single token
        (37, 32, 16, 8, 4, (2, 5)),  # odd token count, experts that get no rows
        (64, 24, 40, 6, 1, (0,)),  # top-1, first expert empty
        (20, 10, 6, 4, 3, ()),  # dims not multiples of 4: grouped_mm alignment fallback
    ],
)
def test_backend_matches_oracle_forward_and_grads(backend, T, D, F, E, K, empty):
    problem = make_problem(T, D, F, E, K, empty_experts=empty)
    with ops.use_backend(backend):
        got = grads(ops.routed_experts, *problem)
    want = grads(reference_routed_experts, *problem)
    for name, a, b in zip(["y", "dx", "dweights", "dgate_up", "dDown"], got, want):
        assert_close(a, b, scale=10 if name.startswith("d") else 1)


def test_bf16_grouped_mm_close_to_fp32_oracle():
    x, w, ids, gu, dn = make_problem(16, 32, 16, 4, 2)
    with ops.use_backend("torch"):
        y = ops.routed_experts(x.bfloat16(), w, ids, gu.bfloat16(), dn.bfloat16())
    ref = reference_routed_experts(x.double(), w.double(), ids, gu.double(), dn.double())
    rel = (y.double() - ref).norm() / ref.norm()
    assert y.dtype == torch.bfloat16 and rel < 1e-2, rel


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown kernel backend"):
        ops.set_backend("cuda-magic")


def test_autocast_runs_expert_gemms_in_the_autocast_dtype():
    x, w, ids, gu, dn = make_problem(16, 32, 16, 4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16), ops.use_backend("torch"):
        y = ops.routed_experts(x, w, ids, gu, dn)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert gu.grad.dtype == torch.float32 and gu.grad.abs().sum() > 0  # fp32 master weights get grads
    ref = reference_routed_experts(x.double(), w.double(), ids, gu.double(), dn.double())
    assert (y.double() - ref).norm() / ref.norm() < 1e-2


def test_float64_stays_float64():
    problem = make_problem(9, 16, 8, 4, 2, dtype=torch.float64)
    with ops.use_backend("torch"):
        y = ops.routed_experts(*problem)
    ref = reference_routed_experts(*problem)
    assert y.dtype == torch.float64
    assert_close(y, ref)
