"""Paged attention: the split-KV Triton decode kernel equals its PyTorch twin (CPU, Triton interpreter,
fp32) and both equal plain attention over the contiguous keys; the prefill path equals causal SDPA.
GPU tests (marked `gpu`) compare bf16 and fp8 pools against an fp64 reference and replay the kernel
from a CUDA graph with new lengths and tables.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from mogelm.kernels import attention as twin
from mogelm.kernels import ops

triton_attention = pytest.importorskip("mogelm.kernels.triton_attention")


def make_pool(num_blocks, bs, Hkv, hd, dtype=torch.float32, device="cpu", gen=None):
    k = torch.randn(num_blocks, bs, Hkv, hd, generator=gen, device=device).to(dtype)
    v = torch.randn(num_blocks, bs, Hkv, hd, generator=gen, device=device).to(dtype)
    return k, v


def random_tables(lens, bs, num_blocks, width, gen, device="cpu"):
    """Each row gets distinct random blocks (never block 0, the null block); unused entries are 0."""
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    for i, L in enumerate(lens):
        n = -(-L // bs)
        tables[i, :n] = (torch.randperm(num_blocks - 1, generator=gen)[:n] + 1).to(torch.int32)
    return tables.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def reference(q_NHd, k_pool, v_pool, tables, lens, scale, k_scale=None, v_scale=None, dtype=torch.float64):
    """Attention row by row over the gathered contiguous keys (softmax in `dtype`)."""
    N, H, hd = q_NHd.shape
    out = torch.zeros(N, H, hd, dtype=dtype, device=q_NHd.device)
    for n in range(N):
        L = int(lens[n])
        if L == 0:
            continue
        k = twin.dequantize(twin.gather_blocks(k_pool, tables[n], L), k_scale, dtype)  # [L, Hkv, hd]
        v = twin.dequantize(twin.gather_blocks(v_pool, tables[n], L), v_scale, dtype)
        G = H // k.shape[1]
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # [L, H, hd]
        p = torch.softmax(torch.einsum("hd,lhd->hl", q_NHd[n].to(dtype), k) * scale, dim=-1)
        out[n] = torch.einsum("hl,lhd->hd", p, v)
    return out


LENS = [1, 5, 16, 17, 40, 0, 70]  # 1, non-multiples of the block size, an empty row


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (10, 2)])  # GQA ratios 1, 2, 5
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_decode_kernel_equals_twin_and_reference(H, Hkv, num_splits):
    gen = torch.Generator().manual_seed(0)
    bs, hd, P = 16, 16, 64
    k_pool, v_pool = make_pool(P, bs, Hkv, hd, gen=gen)
    tables, lens = random_tables(LENS, bs, P, 8, gen)
    q = torch.randn(len(LENS), H, hd, generator=gen)
    scale = 1 / math.sqrt(hd)
    ref = reference(q, k_pool, v_pool, tables, lens, scale)
    torch_out = twin.paged_decode_attention(q, k_pool, v_pool, tables, lens, scale)
    cfg = triton_attention.DecodeAttentionConfig(block_n=16)  # several steps per row under the interpreter
    tri = triton_attention.paged_decode_attention(q, k_pool, v_pool, tables, lens, scale,
                                                  num_splits=num_splits, cfg=cfg)
    assert_close(torch_out, ref.float())
    assert_close(tri, torch_out)
    assert tri[LENS.index(0)].abs().max() == 0  # the empty row is zeros
    if num_splits == 1 and H == 4 and Hkv == 2:
        with ops.use_backend("triton"):  # the op surface reaches the kernel
            out = ops.paged_decode_attention(q, k_pool, v_pool, tables, lens, scale, num_splits=2)
        assert_close(out, ref.float())


def test_triton_decode_kernel_block_larger_than_page_and_fp8_pool():
    """BLOCK_N spans several pool blocks (keys gathered token by token); fp8 e4m3 pool with per-head
    scales equals the twin's dequantised computation."""
    gen = torch.Generator().manual_seed(1)
    bs, hd, H, Hkv, P = 4, 16, 6, 2, 80
    k32, v32 = make_pool(P, bs, Hkv, hd, gen=gen)
    k_scale, v_scale = torch.tensor([0.02, 0.05]), torch.tensor([0.03, 0.01])
    k8 = (k32 / k_scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    v8 = (v32 / v_scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    lens_list = [3, 4, 9, 33, 1]
    tables, lens = random_tables(lens_list, bs, P, 10, gen)
    q = torch.randn(len(lens_list), H, hd, generator=gen)
    cfg = triton_attention.DecodeAttentionConfig(block_n=16)
    for splits in (1, 2, 3):
        plain = triton_attention.paged_decode_attention(q, k32, v32, tables, lens, 0.25, num_splits=splits,
                                                        cfg=cfg)
        assert_close(plain, reference(q, k32, v32, tables, lens, 0.25).float())
        fp8 = triton_attention.paged_decode_attention(q, k8, v8, tables, lens, 0.25, k_scale, v_scale,
                                                      num_splits=splits, cfg=cfg)
        assert_close(fp8, twin.paged_decode_attention(q, k8, v8, tables, lens, 0.25, k_scale, v_scale))
        assert_close(fp8, reference(q, k8, v8, tables, lens, 0.25, k_scale, v_scale).float())


@pytest.mark.parametrize("start", [0, 5, 16, 21])
def test_prefill_chunk_equals_causal_attention_over_the_whole_sequence(start):
    """A chunk at positions start..start+T-1 over the paged prefix equals the same rows of causal SDPA
    over the contiguous sequence (GQA 2)."""
    gen = torch.Generator().manual_seed(2)
    bs, hd, H, Hkv, P, T = 8, 16, 4, 2, 20, 7
    L = start + T
    q_all = torch.randn(L, H, hd, generator=gen)
    k_all, v_all = torch.randn(L, Hkv, hd, generator=gen), torch.randn(L, Hkv, hd, generator=gen)
    k_pool, v_pool = torch.zeros(P, bs, Hkv, hd), torch.zeros(P, bs, Hkv, hd)
    table = (torch.randperm(P - 1, generator=gen)[:4] + 1).to(torch.int32)
    for t in range(L):
        k_pool[table[t // bs], t % bs], v_pool[table[t // bs], t % bs] = k_all[t], v_all[t]
    full = F.scaled_dot_product_attention(q_all.transpose(0, 1), k_all.transpose(0, 1), v_all.transpose(0, 1),
                                          is_causal=True, enable_gqa=True).transpose(0, 1)
    out = ops.paged_prefill_attention(q_all[start:], k_pool, v_pool, table, start, 1 / math.sqrt(hd))
    assert_close(out, full[start:])


def test_num_splits_is_static_and_bounded():
    cpu, h200 = torch.device("cpu"), triton_attention.DecodeAttentionConfig(target_programs=2 * 132)
    assert triton_attention.num_splits_for(256, 8, 2048, cpu, h200) == 1  # 2048 programs already
    assert triton_attention.num_splits_for(1, 8, 2048, cpu, h200) == 2048 // 64  # one step of keys each
    assert triton_attention.num_splits_for(4, 8, 2048, cpu, h200) == 9  # 4 * 8 * 9 >= 264
    assert triton_attention.num_splits_for(1, 8, 10, cpu, h200) == 1  # no more splits than key steps


# --- GPU -----------------------------------------------------------------------------------------
def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
def test_gpu_decode_kernel_against_fp64(kv_dtype):
    """Pangu heads (40 over 8, hd 128), bs 16, lengths 1..2049, bf16 queries; rel. error vs fp64."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    bs, hd, H, Hkv, P = 16, 128, 40, 8, 4096
    k32, v32 = make_pool(P, bs, Hkv, hd, torch.float32, "cuda", gen)
    lens_list = [1, 15, 16, 17, 100, 513, 1024, 2049, 0, 777]
    tables, lens = random_tables(lens_list, bs, P, 160, torch.Generator().manual_seed(0), "cuda")
    q = torch.randn(len(lens_list), H, hd, device="cuda", generator=gen).bfloat16()
    scale = 1 / math.sqrt(hd)
    if kv_dtype == "bf16":
        k, v, ks, vs = k32.bfloat16(), v32.bfloat16(), None, None
    else:
        ks = k32.abs().amax(dim=(0, 1, 3)) / 448
        vs = v32.abs().amax(dim=(0, 1, 3)) / 448
        k = (k32 / ks[:, None]).to(torch.float8_e4m3fn)
        v = (v32 / vs[:, None]).to(torch.float8_e4m3fn)
    ref = reference(q, k, v, tables, lens, scale, ks, vs)
    for splits in (1, 4, None):
        out = triton_attention.paged_decode_attention(q, k, v, tables, lens, scale, ks, vs, num_splits=splits)
        err = rel_err(out, ref)
        assert err < 1e-2, (splits, err)
        assert out[lens_list.index(0)].abs().max() == 0


@pytest.mark.gpu
def test_gpu_decode_kernel_replays_in_a_cuda_graph_with_new_lengths():
    gen = torch.Generator(device="cuda").manual_seed(0)
    bs, hd, H, Hkv, P, N, M = 16, 128, 40, 8, 1024, 8, 64
    k, v = make_pool(P, bs, Hkv, hd, torch.bfloat16, "cuda", gen)
    q = torch.randn(N, H, hd, device="cuda", generator=gen).bfloat16()
    tables = torch.zeros(N, M, dtype=torch.int32, device="cuda")
    lens = torch.zeros(N, dtype=torch.int32, device="cuda")
    splits = triton_attention.num_splits_for(N, Hkv, M * bs, q.device)
    fn = lambda: triton_attention.paged_decode_attention(q, k, v, tables, lens, 0.09, num_splits=splits)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    cpu_gen = torch.Generator().manual_seed(3)
    for lens_list in ([1, 2, 3, 4, 5, 6, 7, 8], [1000, 0, 17, 512, 64, 1, 999, 333]):
        t, lens_new = random_tables(lens_list, bs, P, M, cpu_gen, "cuda")
        tables.copy_(t)
        lens.copy_(lens_new)
        graph.replay()
        assert rel_err(out, reference(q, k, v, tables, lens, 0.09)) < 1e-2
