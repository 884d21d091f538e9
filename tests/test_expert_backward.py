"""The routed experts' training path (kernels/triton_grouped.py through triton_moe._RoutedExperts):
forward and gradients against the loop-over-experts oracle (moe/reference.py).

CPU: the Triton kernels run through TRITON_INTERPRET=1 (conftest.py) in fp32 at small odd shapes:
masked tails, experts with no rows, one token, every GEMM variant (persistent, TMA descriptors,
warp specialisation), with and without the saved activations. GPU (marked `gpu`):
    TRITON_INTERPRET=0 pytest -m gpu tests/test_expert_backward.py
bf16 against fp64 at 0.91B-model and Pangu widths, every variant, and the previous backward.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from conftest import assert_close

triton_moe = pytest.importorskip("mogelm.kernels.triton_moe")

from mogelm.kernels import ops  # noqa: E402
from mogelm.kernels import triton_grouped as tg  # noqa: E402
from mogelm.moe.reference import reference_routed_experts  # noqa: E402

NAMES = ("x", "weights", "gate_up", "down")


def _problem(T, D, F, E, K, skew=False, device="cpu"):
    """Distinct experts per token; skew=True sends every token to experts 0..K-1 (others empty)."""
    ids = (torch.arange(K).repeat(T, 1) if skew
           else torch.stack([torch.randperm(E)[:K] for _ in range(T)]))
    w = torch.rand(T, K) + 0.1
    x = torch.randn(T, D)
    gate_up = torch.randn(E, 2 * F, D) / D**0.5
    down = torch.randn(E, D, F) / F**0.5
    return [t.to(device) for t in (x, w, ids, gate_up, down)]


def _grads(fn, x, w, ids, gate_up, down, dy=None):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, gate_up, down)]
    y = fn(leaves[0], leaves[1], ids, leaves[2], leaves[3])
    dy = torch.randn_like(y) if dy is None else dy
    return y, dy, torch.autograd.grad(y, leaves, dy)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------
# CPU, interpreter, fp32
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "T,D,F,E,K,skew,variant,save",
    [
        (9, 40, 24, 6, 3, True, "default", True),  # empty experts; D and F tails
        (13, 32, 40, 8, 2, False, "persistent", False),  # two F tiles (dw partial sums); recompute g|u
        (13, 40, 24, 8, 2, False, "tma", True),  # descriptors: zero-filled tails, rows past an expert
        (7, 32, 16, 4, 2, False, "persistent+tma+ws", True),
        (1, 32, 16, 4, 2, False, "default", True),  # one token
    ],
)
def test_training_path_matches_oracle(T, D, F, E, K, skew, variant, save):
    x, w, ids, gate_up, down = _problem(T, D, F, E, K, skew)

    def fn(*args):
        return triton_moe.routed_experts(*args, backward="triton", variant=variant, save_activations=save)

    y, dy, grads = _grads(fn, x, w, ids, gate_up, down)
    y_ref, _, grads_ref = _grads(reference_routed_experts, x, w, ids, gate_up, down, dy)
    assert_close(y, y_ref)
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, name
        assert_close(g, g_ref)
    if skew:  # experts no token chose get exactly zero gradient
        assert not grads[2][K:].any() and not grads[3][K:].any()


def test_options_select_the_previous_backward_and_both_agree():
    x, w, ids, gate_up, down = _problem(11, 24, 16, 6, 2)
    dy = torch.randn(11, 24)
    got = {}
    for backward in ("triton", "torch"):
        with ops.use_backend("triton"), ops.use_options(expert_backward=backward):
            got[backward] = _grads(ops.routed_experts, x, w, ids, gate_up, down, dy)
    (y_new, _, g_new), (y_old, _, g_old) = got["triton"], got["torch"]
    assert_close(y_new, y_old)
    for name, a, b in zip(NAMES, g_new, g_old):
        assert_close(a, b), name


def test_variant_names_parse_and_reject_typos():
    assert tg.GemmVariant.parse("default") == tg.GemmVariant()
    assert tg.GemmVariant.parse("tma+persistent") == tg.GemmVariant(persistent=True, tma=True)
    assert str(tg.GemmVariant(persistent=True, ws=True)) == "persistent+ws"
    with pytest.raises(ValueError, match="unknown GEMM variant"):
        tg.GemmVariant.parse("tmaa")
    with pytest.raises(ValueError, match="gemm_variant"):
        ops.set_options(gemm_variant="persistant")
    with pytest.raises(ValueError, match="expert_backward"):
        ops.set_options(expert_backward="cuda")
    assert ops.options().gemm_variant == "default"  # a rejected change leaves the options alone


def test_a_tuned_train_table_is_read(monkeypatch, tmp_path):
    """bench_train.py --sections tune writes a "train" section; train_configs reads it (GPU only:
    the interpreter always runs its small tiles)."""
    import json

    entry = {name: {"block_m": 64, "block_n": 32 * (i + 1), "block_k": 32, "group_m": 4, "num_warps": 4,
                    "num_stages": 3} for i, name in enumerate(("gate_up", "down", "down_dgrad", "dx"))}
    entry.update({name: {"block_m": 128, "block_n": 64, "block_k": 64, "group_m": 1, "num_warps": 8,
                         "num_stages": 3} for name in ("wgrad_down", "wgrad_gate_up")}, ms={"dx": 1.0})
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"train": {"E=64,F=512,D=2048": {"131072": entry}}}))
    monkeypatch.setenv("MOGELM_MOE_CONFIGS", str(table))
    monkeypatch.setattr(triton_moe, "INTERPRET", False)
    triton_moe._config_table.cache_clear()
    try:
        cfg = triton_moe.train_configs(131072, 2048, 512, 64, "NVIDIA H200")
        assert cfg.dx == tg.GemmConfig(64, 128, 32, 4, 4, 3) and cfg.wgrad_down.block_k == 64
        far = triton_moe.train_configs(64, 2048, 512, 64, "NVIDIA H200")  # outside the tuned range
        assert far == tg.heuristic_train_configs(triton_moe.get_config(64, 2048, 512, 64, "x").gate_up,
                                                 triton_moe.get_config(64, 2048, 512, 64, "x").down)
    finally:
        triton_moe._config_table.cache_clear()


def test_a_variant_that_fails_to_compile_falls_back_to_the_default(monkeypatch):
    """A lever the GPU or triton version lacks must not stop training: one warning, default kernels."""
    x, w, ids, gate_up, down = _problem(6, 32, 16, 4, 2)
    real = tg.launch_down

    def flaky(h, dn, w_S, plan, S, cfg, variant):
        if variant.persistent:
            raise RuntimeError("PassManager::run failed (simulated)")
        return real(h, dn, w_S, plan, S, cfg, variant)

    monkeypatch.setattr(tg, "launch_down", flaky)
    monkeypatch.setattr(tg, "_BROKEN", {})
    cfg = tg.heuristic_train_configs(None, None)
    with pytest.warns(UserWarning, match="'persistent' failed here"):
        y, _ = tg.forward(x, w, ids, gate_up, down, cfg, tg.GemmVariant(persistent=True))
    assert "persistent" in tg.broken_variants()
    assert_close(y, reference_routed_experts(x, w, ids, gate_up, down))
    with warnings.catch_warnings():  # known broken: no second warning
        warnings.simplefilter("error")
        tg.forward(x, w, ids, gate_up, down, cfg, tg.GemmVariant(persistent=True))


# ---------------------------------------------------------------------------------------------
# GPU (H100/H200), compiled kernels, bf16 against fp64
# ---------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU with TRITON_INTERPRET unset",
)
VARIANTS = ["default", "persistent", "tma", "persistent+tma"]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(  # every variant at the benchmark's tiles (T=4096: 128-row blocks, compiled once
    "T,D,F,E,K,variant",  # for both); the default also at one token and at Pangu widths
    [(4096, 2048, 512, 64, 8, v) for v in VARIANTS] + [(1, 2048, 512, 64, 8, "default"),
                                                       (700, 5120, 1344, 64, 8, "default")])
def test_gpu_bf16_training_path_vs_fp64(T, D, F, E, K, variant):
    x, w, ids, gate_up, down = _problem(T, D, F, E, K, device="cuda")
    y64, dy, g64 = _grads(reference_routed_experts, x.double(), w.double(), ids, gate_up.double(),
                          down.double())

    def fn(*args):
        return triton_moe.routed_experts(*args, backward="triton", variant=variant)

    tg._BROKEN.clear()
    y, _, grads = _grads(fn, x.bfloat16(), w, ids, gate_up.bfloat16(), down.bfloat16(), dy.bfloat16())
    assert variant == "default" or variant not in tg.broken_variants(), tg.broken_variants()
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert _rel(y, y64) < 1e-2, _rel(y, y64)
    for name, g, gr in zip(NAMES, grads, g64):
        assert torch.isfinite(g).all(), name
        assert _rel(g, gr) < 2e-2, (name, _rel(g, gr))


@pytest.mark.gpu
@gpu
def test_gpu_new_backward_matches_the_previous_one_in_bf16():
    x, w, ids, gate_up, down = _problem(4096, 2048, 512, 64, 8, device="cuda")
    args = (x.bfloat16(), w, ids, gate_up.bfloat16(), down.bfloat16())
    dy = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    out = {}
    for backward in ("triton", "torch"):
        out[backward] = _grads(lambda *a, b=backward: triton_moe.routed_experts(*a, backward=b), *args, dy)
    for name, a, b in zip(NAMES, out["triton"][2], out["torch"][2]):
        assert _rel(a, b) < 1e-2, (name, _rel(a, b))
