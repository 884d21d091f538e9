"""Decode and prefill benchmarks of a whole model in the exact layout of a preset (default
pangu-pro-moe-72b: 48 layers, fp8 experts) with random weights built on the GPU: what
`mogelm bench decode` and `mogelm bench prefill` run (the commands are a thin layer over this).

    mogelm bench decode --out DIR            # batch 1, 16, 64, 128, 256 and the largest that fits, ctx 2048
    mogelm bench prefill --out DIR           # one 2,048-token prompt; 64 x 512 prompts
    from mogelm.inference.bench_model import DecodeSettings, run_decode, run_prefill

How each number is made (the JSON carries the settings and every raw time):

  model      built on the meta device in the preset's exact layout (tensor shapes of the checkpoint),
             quantised there to an fp8 skeleton (recipe: quant.RECIPES), materialised on the GPU
             (`to_empty`) and drawn there: normal(0, init_std) weights (output projections
             init_std / sqrt(2 L)), zero biases, unit norms; fp8 tensors are drawn in bf16 a few
             experts at a time and quantised at once, so the bf16 model never exists in full and the
             CPU draws nothing. Then the inference fusions (inference/fuse.py).
  KV         one paged pool (inference/paged.py) as large as the memory left allows, filled with
             random keys and values written straight into it (not by prefilling 2,048 tokens per
             sequence: the decode kernels' cost depends on lengths and layout, not on the values);
             each of the B rows owns ctx / 16 random blocks and sits at position ctx - 1 (live
             length ctx). fp8 pools hold e4m3 values with unit scales.
  step       one decode step of exactly B rows: the engine's CUDA graph (engine.CUDAGraphRunner,
             one bucket of B rows: the whole forward with the LM head on the B rows), median of
             replays (triton.testing.do_bench). TPOT adds the host part of an engine step: copying the
             step's ids / positions / slots / tables / lengths in, the replay, greedy sampling and its
             device-to-host sync (median of 10); tokens/s per GPU = B / TPOT.
  breakdown  one layer's parts as their own CUDA graphs on the step's inputs, times the layer count:
             attention (input norm, q/k/v GEMM + bias + RoPE, KV write, paged decode attention, o_proj;
             the decode kernel alone as "attention_core"), routed experts (router GEMM, routing, expert
             kernels: the MoE layer minus its shared expert), shared expert; "other" = the step minus
             these (residual add + norm kernels, embedding, final norm, LM head; negative when the
             parts overlap less alone than in the step). The LM head alone is listed too.
  floor      bytes the step must read (weights of every layer with the routed experts it touches,
             counted in an eager forward of the same step; live KV; the LM head) over the device copy
             bandwidth measured in the same run (2 GiB bf16 copy, read + write).
  memory     weights, KV pool, peak allocated (torch) and the device's total.
  HF         transformers' Qwen2-MoE class at Pangu widths (hidden 5120, 40/8 heads of 128, 64 experts
             of 1344 top-8 unrenormalised, shared 5376, vocab 153376; it routes top-8 of 64, not by
             groups), random bf16 weights on the GPU, StaticCache of the context length, eager, 2 and 4
             layers, per-layer slope scaled to 48 layers (stated as such): the baseline a user would
             otherwise pick. Its static cache attends over the whole cache length at every step, so
             decoding at position ~16 costs what it costs at ~2,048.
  prefill    through the Engine (scheduling, paged KV writes, prefill attention, logits of the last
             token), eager: one 2,048-token prompt (chunk 2,048) and 64 prompts of 512 (chunk 8,192),
             median of 3 after a warm-up at the same size; tokens/s = prompt tokens / wall time.
  tune       (optional) tile sweeps of the routed-expert kernels (bf16 and fp8 weight-only) at the
             decode sizes and of the fp8 small-M dense kernel; the winners are installed for the rest
             of the run and written as a table (kernels/configs schema) for the repository.

On a CPU the same functions run eagerly at toy sizes (tests/test_bench_model.py); times there mean
nothing, the code paths are the point.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from mogelm.config import ModelConfig, from_name
from mogelm.inference.engine import CUDAGraphRunner, Engine
from mogelm.inference.fuse import fuse_for_inference
from mogelm.inference.paged import FP8, PagedAttention, PagedKVCache
from mogelm.inference.sampling import SamplingParams
from mogelm.kernels import ops
from mogelm.kernels.cuda_graphs import capture_cuda_graph
from mogelm.model import RMSNorm, Transformer, rope_inv_freq
from mogelm.moe.experts import Fp8RoutedExperts, RoutedExperts, output_std
from mogelm.moe.layer import MoGELayer
from mogelm.quant import RECIPES, Fp8Linear, Fp8Options, quantize_model

GiB = 2**30


def log(*args) -> None:
    print(*args, flush=True)


@dataclass
class DecodeSettings:
    """What `mogelm bench decode` measures (defaults: the issue's set)."""

    preset: str = "pangu-pro-moe-72b"
    layers: int | None = None  # None: the preset's (48)
    recipes: tuple[str, ...] = ("fp8-all",)  # quant.RECIPES names (or "bf16"), each on the same model in turn
    kv_dtypes: tuple[str, ...] = ("fp8", "bf16")  # KV pools, each in turn
    batches: tuple[int, ...] = (1, 16, 64, 128, 256)
    largest: bool = True  # also the largest batch the pool holds at this context
    context: int = 2048
    block_size: int = 16
    hf: bool = True  # the transformers baseline
    hf_layers: tuple[int, int] = (2, 4)
    hf_batches: tuple[int, ...] = (1, 64)
    breakdown: bool = True
    reserve_gib: float = 6.0  # device memory kept free beside the pool (graphs, activations, logits)
    pool_tokens: int | None = None  # cap on the KV pool (None: what memory allows; CPU: 2 x the rows asked)
    tune_budget_s: float = 40.0  # tile sweeps stop starting new candidates after this (70 % experts)
    seed: int = 0
    device: str = "cuda"


@dataclass
class PrefillSettings:
    preset: str = "pangu-pro-moe-72b"
    layers: int | None = None
    recipe: str = "fp8-all"
    long_prompt: int = 2048
    num_prompts: int = 64
    prompt_len: int = 512
    chunk_size: int = 8192
    repeats: int = 3
    seed: int = 0
    device: str = "cuda"


# --- timing ------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, rep_ms: float = 100.0) -> float:
    """Median ms of fn: CUDA-graph replays on a GPU (warmed up on a side stream first, then
    captured; do_bench of the replay), wall clock of eager calls elsewhere."""
    if device.type != "cuda":
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3
    from triton.testing import do_bench

    graph, _ = capture_cuda_graph(fn)
    ms = do_bench(graph.replay, warmup=10, rep=rep_ms, return_mode="median")
    del graph
    return ms


def fixed_count_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Median ms of `iters` calls after `warmup`, each bracketed by CUDA events on a GPU (wall clock
    elsewhere). Fixed counts, unlike do_bench's: calls holding collectives must be made the same
    number of times on every rank."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def wall_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall-clock ms of fn with the device synchronised around each call."""
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def ceilings(device: torch.device) -> dict:
    """Device copy bandwidth (GB/s, read + write of a 2 GiB bf16 buffer) and dense bf16 GEMM rate
    (TFLOP/s, 8192^3), measured now; small stand-ins on a CPU."""
    n, m = ((1 << 30), 8192) if device.type == "cuda" else ((1 << 22), 256)
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    if device.type == "cuda":  # eager: inside a CUDA graph a D2D copy runs on a copy engine, measured
        from triton.testing import do_bench  # 2.7 TB/s there against 4.25 eager (H200, 2026-12-02)

        ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    else:
        ms = time_fn(lambda: dst.copy_(src), device)
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    ms_mm = time_fn(lambda: a @ b, device)
    return dict(copy_bandwidth_GBps=2 * src.numel() * 2 / ms / 1e6, dense_bf16_tflops=2 * m**3 / ms_mm / 1e9)


# --- the model ---------------------------------------------------------------------------------
def recipe_options(recipe: str) -> Fp8Options | None:
    """None for "bf16", else the quant recipe."""
    if recipe == "bf16":
        return None
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose bf16 or one of {', '.join(RECIPES)}")
    return Fp8Options.parse(recipe)


def model_config(preset: str, layers: int | None, max_seq_len: int | None = None) -> ModelConfig:
    over = {} if layers is None else {"num_layers": layers}
    if max_seq_len is not None:
        over["max_seq_len"] = max_seq_len
    return from_name(preset, **over)


@torch.no_grad()
def _fill_fp8_rows(q: Tensor, scale: Tensor, std: float, gen: torch.Generator, dtype: torch.dtype,
                   chunk: int) -> None:
    """Draw normal(0, std) weights shaped like q in `dtype`, `chunk` leading slices at a time, and
    store them quantised (per-row e4m3 + scales) into q / scale."""
    for lo in range(0, q.shape[0], chunk):
        hi = min(lo + chunk, q.shape[0])
        w = torch.randn(hi - lo, *q.shape[1:], device=q.device, dtype=dtype, generator=gen) * std
        wq, ws = ops.quantize_rows_fp8(w)
        q[lo:hi].copy_(wq)
        scale[lo:hi].copy_(ws)
        del w, wq, ws


@torch.no_grad()
def init_random_(model: Transformer, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> None:
    """Random weights drawn on the model's device, module by module (see the module docstring)."""
    cfg = model.cfg
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    std, out_std = cfg.init_std, output_std(cfg.init_std, cfg.num_layers)
    for name, mod in model.named_modules():
        s = out_std if name.endswith(("o_proj", "down_proj")) else std
        if isinstance(mod, Fp8RoutedExperts):
            _fill_fp8_rows(mod.gate_up_EFD, mod.gate_up_scale_EF, std, gen, dtype, chunk=8)
            _fill_fp8_rows(mod.down_EDF, mod.down_scale_ED, out_std, gen, dtype, chunk=8)
        elif isinstance(mod, RoutedExperts):
            mod.gate_up_EFD.normal_(0.0, std, generator=gen)
            mod.down_EDF.normal_(0.0, out_std, generator=gen)
        elif isinstance(mod, Fp8Linear):
            _fill_fp8_rows(mod.weight, mod.weight_scale, s, gen, dtype, chunk=1 << 14)
            if mod.bias is not None:
                mod.bias.zero_()
        elif isinstance(mod, nn.Linear):
            mod.weight.normal_(0.0, s, generator=gen)
            if mod.bias is not None:
                mod.bias.zero_()
        elif isinstance(mod, nn.Embedding):
            mod.weight.normal_(0.0, std, generator=gen)
        elif isinstance(mod, RMSNorm):
            mod.weight.fill_(1.0)
        elif isinstance(mod, MoGELayer):
            if mod.router_scale is not None:
                mod.router_scale.fill_(1.0)
            if mod.expert_bias_E is not None:
                mod.expert_bias_E.zero_()
    model.rotary.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, dev)


def build_random_model(preset: str = "pangu-pro-moe-72b", *, layers: int | None = None,
                       recipe: str = "fp8-all", device: str | torch.device = "cuda",
                       dtype: torch.dtype = torch.bfloat16, seed: int = 0, max_seq_len: int | None = None,
                       fuse: bool = True) -> Transformer:
    """The preset's exact layout with random weights drawn on `device` (module docstring): meta
    build -> fp8 skeleton -> to_empty -> draws -> fusions. Returns the model in eval mode."""
    cfg = model_config(preset, layers, max_seq_len)
    options = recipe_options(recipe)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in `dtype` (no fp32 copy at any point)
    try:
        with torch.device("meta"):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(previous)
    if options is not None:
        quantize_model(model, options)  # on meta: the fp8 skeleton
    model.to_empty(device=device)
    init_random_(model, seed, dtype)
    model.eval()
    if fuse:
        fuse_for_inference(model)
    return model


def random_weight_bytes(preset: str, recipe: str, dtype: torch.dtype = torch.bfloat16,
                        layers: int | None = None) -> float:
    """Bytes the weights of build_random_model take: e4m3 (1 byte, scales ignored) where the recipe
    quantises, `dtype` elsewhere. For a check before anything is drawn."""
    from mogelm.config import count_parameters

    cfg = model_config(preset, layers)
    total, _ = count_parameters(cfg)
    options = recipe_options(recipe)
    fp8 = 0
    if options is not None and cfg.is_moe:
        D, L = cfg.hidden_size, cfg.num_layers
        fp8 += L * cfg.num_experts * 3 * D * cfg.moe_intermediate_size
        fp8 += L * 3 * D * cfg.shared_expert_intermediate_size if options.shared else 0
        fp8 += L * 2 * D * (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim if options.attention else 0
    return fp8 + (total - fp8) * dtype.itemsize


def device_bytes(device: str | torch.device) -> int:
    """Memory of a CUDA device, or of this machine for the CPU."""
    import os

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def requantize(model: Transformer, recipe: str) -> None:
    """Move a built (and fused) model to another recipe in place: quantise the dense projections
    the recipe adds (attention, shared expert) and set every fp8 module's activation mode."""
    options = recipe_options(recipe)
    if options is None:
        if any(isinstance(m, (Fp8RoutedExperts, Fp8Linear)) for m in model.modules()):
            raise ValueError("cannot go back to bf16 from an fp8 model")
        return
    names = []
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and name.startswith("layers."):
            is_attn = ".self_attn." in name
            is_shared = ".shared_expert." in name
            if (is_attn and options.attention) or (is_shared and options.shared):
                names.append(name)
    if names:
        quantize_model(model, options, names=names)
    for mod in model.modules():
        if isinstance(mod, Fp8RoutedExperts):
            mod.activations = options.expert_activations
        elif isinstance(mod, Fp8Linear):
            mod.activations = options.dense_activations


def weight_bytes(model: Transformer) -> dict[str, float]:
    """Bytes of the weights by part, per layer for the layer parts (from the actual tensors)."""
    def nbytes(mod: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in [*mod.parameters(), *mod.buffers()])

    block = model.layers[0]
    mlp = block.mlp
    out = dict(attention=nbytes(block.self_attn), norms=nbytes(block.input_layernorm) * 2,
               embedding=nbytes(model.embed_tokens), lm_head=nbytes(model.lm_head),
               total=nbytes(model))
    if isinstance(mlp, MoGELayer):
        experts = nbytes(mlp.experts)
        out.update(router=nbytes(mlp.gate) + (mlp.router_scale.numel() * mlp.router_scale.element_size()
                                              if mlp.router_scale is not None else 0),
                   shared=nbytes(mlp.shared_expert) if mlp.shared_expert is not None else 0,
                   expert=experts / mlp.experts.num_experts, experts_all=experts)
    else:
        out.update(router=0, shared=0, expert=0, experts_all=0, dense_ffn=nbytes(mlp))
    return out


def random_tokenizer(vocab_size: int):
    """A tokenizer for random-weight serving (benchmark mode): token id i <-> the word `t<i>`, so
    every id decodes to visible text (streamed output arrives token by token) and token-id prompts
    need no real vocabulary. A tokenizers WordLevel model behind inference.chat.Tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from mogelm.inference.chat import Tokenizer

    tok = HFTokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(tok)


# --- KV pool and decode rows -------------------------------------------------------------------
@torch.no_grad()
def make_pool(model: Transformer, kv_dtype: str, block_size: int, device: torch.device, reserve_gib: float,
              max_tokens: int | None = None) -> PagedKVCache:
    """The largest paged pool that leaves reserve_gib free (at most max_tokens), random contents."""
    cfg = model.cfg
    kv = FP8 if kv_dtype == "fp8" else next(model.parameters()).dtype if kv_dtype == "auto" else \
        getattr(torch, {"bf16": "bfloat16"}.get(kv_dtype, kv_dtype))
    per_block = PagedKVCache.bytes_per_block(cfg, block_size, kv)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        blocks = int((free - reserve_gib * GiB) // per_block)
    else:
        blocks = 1 << 30
    if max_tokens is not None:
        blocks = min(blocks, -(-max_tokens // block_size) + 1)
    if blocks < 2:
        raise RuntimeError(f"no memory left for a KV pool ({kv_dtype}) beside the weights")
    dtype = model.lm_head.weight.dtype
    cache = PagedKVCache(cfg, blocks, block_size, device=device, dtype=dtype, kv_dtype=kv)
    gen = torch.Generator(device=device)
    gen.manual_seed(1)
    for pool in cache.k + cache.v:  # random keys/values, one layer at a time
        if pool.dtype == FP8:
            for lo in range(0, pool.shape[0], 4096):
                chunk = pool[lo:lo + 4096]
                draw = torch.randn(chunk.shape, device=device, dtype=torch.bfloat16, generator=gen)
                chunk.copy_(draw.to(FP8))
        else:
            pool.normal_(generator=gen)
    return cache


def decode_rows(B: int, ctx: int, cache: PagedKVCache, gen: torch.Generator, vocab: int):
    """B rows at position ctx - 1 (live length ctx), each over its own random blocks; host tensors
    (ids, positions, slots, tables, lengths) as the engine hands them to its graph runner."""
    bs = cache.block_size
    per = -(-ctx // bs)
    if B * per > cache.num_blocks - 1:
        raise ValueError(f"{B} rows of {ctx} tokens need {B * per} blocks; the pool has "
                         f"{cache.num_blocks - 1}")
    blocks = (torch.randperm(cache.num_blocks - 1, generator=gen)[:B * per] + 1).view(B, per).to(torch.int32)
    pos = torch.full((B,), ctx - 1, dtype=torch.long)
    slots = blocks[:, (ctx - 1) // bs].long() * bs + (ctx - 1) % bs
    lens = torch.full((B,), ctx, dtype=torch.int32)
    ids = torch.randint(0, vocab, (B,), generator=gen)
    return ids, pos, slots, blocks, lens


def max_rows(cache: PagedKVCache, ctx: int) -> int:
    return (cache.num_blocks - 1) // -(-ctx // cache.block_size)


# --- one decode measurement --------------------------------------------------------------------
@torch.inference_mode()
def experts_touched(model: Transformer, state: PagedAttention, ids: Tensor, pos: Tensor) -> float:
    """Mean over MoE layers of the experts that get >= 1 row in an eager forward of this step."""
    seen: list[int] = []
    layers = [m for m in model.modules() if isinstance(m, MoGELayer)]
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(int((out[1].counts_E > 0).sum())))
             for m in layers]
    recording = [m.record_stats for m in layers]
    try:
        for m in layers:
            m.record_stats = True
        model(ids[None], positions_BT=pos[None], kv_cache=state)
    finally:
        for h in hooks:
            h.remove()
        for m, r in zip(layers, recording):
            m.record_stats = r
    return sum(seen) / len(seen) if seen else 0.0


@torch.inference_mode()
def breakdown(model: Transformer, cache: PagedKVCache, state: PagedAttention, pos: Tensor,
              device: torch.device) -> dict[str, float]:
    """One layer's parts as their own graphs on this step's inputs (ms for one layer)."""
    block = model.layers[0]
    cfg = model.cfg
    B = pos.numel()
    dtype = model.lm_head.weight.dtype
    gen = torch.Generator(device=device)
    gen.manual_seed(2)
    x = torch.randn(1, B, cfg.hidden_size, device=device, dtype=dtype, generator=gen)
    cos, sin = model.rotary(pos[None])
    layer0 = state.layer(0)
    out = dict(attention=time_fn(lambda: block.self_attn(block.input_layernorm(x), cos, sin, layer0), device))
    q = torch.randn(B, cfg.num_heads, cfg.head_dim, device=device, dtype=dtype, generator=gen)
    ks = cache.k_scale[0] if cache.k_scale is not None else None
    vs = cache.v_scale[0] if cache.v_scale is not None else None
    core = partial(ops.paged_decode_attention, q, cache.k[0], cache.v[0], state.tables_RM, state.lens_R,
                   cache.scale, ks, vs, state.num_splits)
    out["attention_core"] = time_fn(core, device)
    mlp = block.mlp
    if isinstance(mlp, MoGELayer):
        moe = time_fn(lambda: mlp(x), device)
        shared = time_fn(lambda: mlp.shared_expert(x[0]), device) if mlp.shared_expert is not None else 0.0
        out.update(routed_experts=moe - shared, shared_expert=shared)
    else:
        out.update(dense_ffn=time_fn(lambda: mlp(x), device))
    out["lm_head"] = time_fn(lambda: model.lm_head(model.norm(x)), device)
    return out


@torch.inference_mode()
def measure_decode(model: Transformer, cache: PagedKVCache, B: int, ctx: int, bw_GBps: float, wb: dict,
                   device: torch.device, want_breakdown: bool = True, seed: int = 0) -> dict:
    """One row of the decode table: batch B at context ctx on this model and pool."""
    cfg = model.cfg
    L = cfg.num_layers
    gen = torch.Generator().manual_seed(seed * 1000 + B)
    ids, pos, slots, tables, lens = decode_rows(B, ctx, cache, gen, cfg.vocab_size)
    max_blocks = tables.shape[1]
    row: dict = dict(batch=B, context=ctx, kv_dtype=str(cache.dtype).removeprefix("torch."),
                     timing="cuda-graph replay" if device.type == "cuda" else "eager (CPU)")
    t0 = time.perf_counter()
    if device.type == "cuda":
        runner = CUDAGraphRunner(model, cache, [B], max_blocks)
        row["capture_s"] = time.perf_counter() - t0
        graph, *_ = runner.graphs[B]
        logits = runner(ids, pos, slots, tables, lens)
        row["step_ms"] = _replay_ms(graph)
        row["logits_finite"] = bool(torch.isfinite(logits.float()).all())

        def host_step():  # what an engine step adds around the replay (no scheduler)
            out = runner(ids, pos, slots, tables, lens)
            return out.argmax(-1).tolist()

        host_step()
        row["tpot_ms"] = wall_ms(host_step, device, 10)
        state = runner.graphs[B][3]
        del runner, graph
    else:
        splits = ops.decode_attention_splits(B, cache.num_kv_heads, max_blocks * cache.block_size, device)
        state = PagedAttention(cache, slots.to(device), tables.to(device), lens.to(device), num_splits=splits)

        def eager_step():
            out = model(ids.to(device)[None], positions_BT=pos.to(device)[None], kv_cache=state)[0]
            return out.argmax(-1).tolist()

        logits = model(ids.to(device)[None], positions_BT=pos.to(device)[None], kv_cache=state)[0]
        row["logits_finite"] = bool(torch.isfinite(logits.float()).all())
        row["capture_s"] = 0.0
        row["step_ms"] = time_fn(lambda: model(ids.to(device)[None], positions_BT=pos.to(device)[None],
                                               kv_cache=state), device)
        row["tpot_ms"] = wall_ms(eager_step, device, 3)
    touched = experts_touched(model, PagedAttention(cache, slots.to(device), tables.to(device),
                                                    lens.to(device)), ids.to(device), pos.to(device))
    kv_item = cache.dtype.itemsize
    kv_bytes = B * ctx * 2 * cfg.num_kv_heads * cfg.head_dim * kv_item  # per layer
    layer_w = wb["attention"] + wb["router"] + wb["shared"] + wb["norms"] + touched * wb["expert"]
    floor_bytes = L * (layer_w + kv_bytes) + wb["lm_head"] + B * cfg.hidden_size * 2
    row.update(experts_touched=touched, layer_weight_bytes=layer_w, layer_kv_bytes=kv_bytes,
               floor_bytes=floor_bytes, floor_ms=floor_bytes / bw_GBps / 1e6)
    row["frac_floor"] = row["floor_ms"] / row["step_ms"]
    row["tokens_per_s"] = B / row["tpot_ms"] * 1e3
    row["tokens_per_s_graph"] = B / row["step_ms"] * 1e3
    if want_breakdown:
        parts = breakdown(model, cache, state, pos.to(device), device)
        scaled = {k: v * L for k, v in parts.items() if k != "lm_head"}
        moe_keys = ("attention", "routed_experts", "shared_expert", "dense_ffn")
        scaled["other"] = row["step_ms"] - sum(scaled.get(k, 0.0) for k in moe_keys)
        row["breakdown_ms"] = scaled
        row["layer_parts_ms"] = parts
    return row


def _replay_ms(graph) -> float:
    from triton.testing import do_bench

    return do_bench(graph.replay, warmup=25, rep=300, return_mode="median")


# --- the transformers baseline -----------------------------------------------------------------
def hf_baseline(cfg: ModelConfig, batches: tuple[int, ...], layers: tuple[int, int], ctx: int,
                device: torch.device, steps: int = 8) -> dict:
    """transformers' Qwen2-MoE at this config's widths (module docstring); per-layer slope of the
    two depths, extrapolated to cfg.num_layers."""
    import transformers
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, StaticCache

    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
              intermediate_size=cfg.shared_expert_intermediate_size, num_hidden_layers=max(layers),
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
              max_position_embeddings=max(ctx + 64, 4096), rms_norm_eps=cfg.norm_eps,
              moe_intermediate_size=cfg.moe_intermediate_size,
              shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
              num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok, norm_topk_prob=False,
              decoder_sparse_step=1, tie_word_embeddings=False)
    try:
        hcfg = Qwen2MoeConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    except TypeError:  # older transformers: rope_theta as its own field
        hcfg = Qwen2MoeConfig(**kw, rope_theta=cfg.rope_theta)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2MoeForCausalLM(hcfg).eval()
    finally:
        torch.set_default_dtype(previous)
    out = dict(transformers=transformers.__version__, layers=list(layers), context=ctx,
               experts_implementation=getattr(hcfg, "_experts_implementation", None),
               attn_implementation=getattr(hcfg, "_attn_implementation", None), rows=[])
    gen = torch.Generator(device=device)
    gen.manual_seed(3)
    with torch.inference_mode():
        for B in batches:
            per_depth = {}
            for L in layers:
                model.config.num_hidden_layers = L
                prompt = torch.randint(0, cfg.vocab_size, (B, 16), device=device, generator=gen)
                step = _HFDecoder(model, StaticCache(config=model.config, max_cache_len=ctx), prompt)
                step()
                step()
                per_depth[L] = wall_ms(step, device, steps)
                step = None  # frees the static cache
            lo, hi = min(layers), max(layers)
            per_layer = (per_depth[hi] - per_depth[lo]) / (hi - lo)
            step_full = per_depth[lo] + (cfg.num_layers - lo) * per_layer
            out["rows"].append(dict(batch=B, step_ms_by_layers={str(k): v for k, v in per_depth.items()},
                                    per_layer_ms=per_layer, step_ms_extrapolated=step_full,
                                    tokens_per_s_extrapolated=B / step_full * 1e3))
            log(f"  HF Qwen2-MoE B={B:4d}: {per_depth[lo]:.2f} ms at {lo} layers, {per_depth[hi]:.2f} at "
                f"{hi}; {cfg.num_layers} layers extrapolated {step_full:.1f} ms = "
                f"{B / step_full * 1e3:.1f} tok/s")
    model.config.num_hidden_layers = max(layers)
    model = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


class _HFDecoder:
    """One greedy decode step of a transformers model per call, on its cache (prefilled with `prompt`)."""

    def __init__(self, model, cache, prompt: Tensor):
        self.model, self.cache = model, cache
        self.token = self._next(prompt)

    def _next(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids, past_key_values=self.cache, use_cache=True).logits[:, -1:].argmax(-1)

    def __call__(self) -> None:
        self.token = self._next(self.token)


# --- tile sweeps (optional) --------------------------------------------------------------------
def _moe_candidates(S: int, kind: str):
    """(block_m, gate_up GemmConfigs, down GemmConfigs) to try at S routed rows."""
    from mogelm.kernels.triton_common import GemmConfig as G

    wide = 2 if kind != "bf16" else 1
    if S <= 256:
        return {16: ([G(16, 128, 64 * wide, 8, 4, 4), G(16, 64, 128 * wide, 8, 4, 4), G(16, 32, 256, 8, 4, 3),
                      G(16, 32, 128 * wide, 8, 4, 4)],
                     [G(16, 64, 128, 8, 4, 4), G(16, 128, 128, 8, 4, 4), G(16, 32, 128 * wide, 8, 4, 4)])}
    return {16: ([G(16, 64, 128 * wide, 8, 4, 4), G(16, 128, 128, 8, 4, 4)],
                 [G(16, 64, 128, 8, 4, 4), G(16, 128, 64 * wide, 8, 4, 4)]),
            32: ([G(32, 64, 128, 8, 4, 4), G(32, 128, 128, 8, 4, 3)],
                 [G(32, 64, 128, 8, 4, 4), G(32, 128, 64, 8, 4, 4)]),
            64: ([G(64, 128, 64, 8, 4, 4), G(64, 64, 128, 8, 4, 4)],
                 [G(64, 128, 64, 8, 4, 4)])}


def _fastest(cands: list[tuple[Callable[[], object], object]], device: torch.device, what: str):
    """(ms, tag) of the fastest callable; a candidate that fails (e.g. out of resources) is skipped."""
    best = None
    for fn, tag in cands:
        try:
            ms = time_fn(fn, device, rep_ms=30)
        except Exception as e:
            log(f"    tune {what} {tag}: {type(e).__name__}: {str(e)[:120]}")
            continue
        if best is None or ms < best[0]:
            best = (ms, tag)
    return best


@torch.inference_mode()
def tune_moe(cfg: ModelConfig, token_counts: list[int], device: torch.device, bw_GBps: float,
             budget_s: float = 60.0) -> dict:
    """Sweep the routed-expert tiles (bf16 and fp8 weight-only) at each T in token_counts (routed rows
    S = T * K) and compare the whole op (shipped table, tuned table, W8A8) with its bytes floor.
    Returns {"table": {...configs schema...}, "rows": [...], "w8a8_from_rows": int}."""
    from mogelm.kernels import triton_moe as tm
    from mogelm.kernels.triton_align import align
    from mogelm.kernels.triton_common import device_limit, fit_gemm

    t_start = time.perf_counter()
    E, D, F, K = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    shape = f"E={E},F={F},D={D}"
    gen = torch.Generator(device=device)
    gen.manual_seed(4)
    gu = torch.randn(E, 2 * F, D, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
    dn = torch.randn(E, D, F, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
    guq, gus, dnq, dns = ops.quantize_experts_fp8(gu, dn)
    table: dict = {}
    rows = []
    dev_name = tm._device_name(gu)
    for T in token_counts:
        S = T * K
        x = torch.randn(T, D, device=device, dtype=torch.bfloat16, generator=gen)
        logits = torch.randn(T, E, device=device, generator=gen)
        w_TK, ids_TK, _ = ops.moge_route(logits, cfg.num_groups, K // cfg.num_groups)
        w_S = w_TK.reshape(-1).float().contiguous()
        touched = int(torch.unique(ids_TK).numel())
        row = dict(tokens=T, routed_rows=S, experts_touched=touched)
        for kind, (wgu, wdn, sgu, sdn, byte) in (("bf16", (gu, dn, None, None, 2)),
                                                  ("fp8", (guq, dnq, gus, dns, 1))):
            row[f"{kind}_floor_ms"] = touched * 3 * D * F * byte / bw_GBps / 1e6
            best = None
            for block_m, (gcands, dcands) in _moe_candidates(S, kind).items():
                if time.perf_counter() - t_start > budget_s:
                    break
                plan = align(ids_TK, E, block_m)
                limit = device_limit(x) if x.is_cuda else 1 << 30
                gcands = {fit_gemm(c, 2, byte, 2, limit) for c in gcands}  # tiles that fit shared memory
                g_best = _fastest([(partial(tm.gate_up, x, wgu, plan, K, c, w_scale_EF=sgu), c)
                                   for c in gcands], device, f"{kind} T={T} gate_up")
                if g_best is None:
                    continue
                h = tm.gate_up(x, wgu, plan, K, g_best[1], w_scale_EF=sgu)
                dcands = {fit_gemm(c, 2, byte, 1, limit) for c in dcands}
                d_best = _fastest([(partial(tm.down, h, wdn, w_S, plan, S, c, x.dtype, w_scale_ED=sdn), c)
                                   for c in dcands], device, f"{kind} T={T} down")
                if d_best is None:
                    continue
                total = g_best[0] + d_best[0]
                if best is None or total < best[0]:
                    best = (total, g_best, d_best)
            if best is not None:
                entry = {"gate_up": dataclasses.asdict(best[1][1]), "down": dataclasses.asdict(best[2][1]),
                         "ms": {"gate_up": best[1][0], "down": best[2][0]}}
                table.setdefault(kind, {}).setdefault(shape, {})[str(S)] = entry
        # the whole op: shipped tiles, then with the tuned entries, and W8A8
        ops_fns = {
            "bf16": partial(tm.routed_experts_forward, x, w_TK, ids_TK, gu, dn),
            "fp8": partial(tm.routed_experts_fp8, x, w_TK, ids_TK, guq, gus, dnq, dns, "bf16"),
            "w8a8": partial(tm.routed_experts_fp8, x, w_TK, ids_TK, guq, gus, dnq, dns, "fp8"),
        }
        tm.use_config_table(None)
        for kind, fn in ops_fns.items():
            row[f"{kind}_shipped_ms"] = time_fn(fn, device, rep_ms=50)
        tm.use_config_table(table)
        for kind in ("bf16", "fp8"):
            row[f"{kind}_tuned_ms"] = time_fn(ops_fns[kind], device, rep_ms=50)
        row["config_bucket"] = tm.get_config(S, D, F, E, dev_name, "fp8").gate_up.block_m
        rows.append(row)
        log(f"  tune T={T:4d} S={S:5d}: bf16 {row['bf16_shipped_ms']:.3f} -> {row['bf16_tuned_ms']:.3f} ms, "
            f"fp8 {row['fp8_shipped_ms']:.3f} -> {row['fp8_tuned_ms']:.3f} ms, "
            f"W8A8 {row['w8a8_shipped_ms']:.3f} ms "
            f"({time.perf_counter() - t_start:.0f} s)")
    tm.use_config_table(None)
    # keep only entries that beat the shipped tiles at their own size (a tie keeps the shipped ones)
    for r in rows:
        for kind in ("bf16", "fp8"):
            if r[f"{kind}_tuned_ms"] >= r[f"{kind}_shipped_ms"]:
                table.get(kind, {}).get(shape, {}).pop(str(r["routed_rows"]), None)
    # "auto" experts: W8A8 from the smallest S at and above which it beats weight-only everywhere
    fastest = [(r["routed_rows"], r["w8a8_shipped_ms"] < min(r["fp8_shipped_ms"], r["fp8_tuned_ms"]))
               for r in rows]
    w8a8_from = next((S for i, (S, _) in enumerate(fastest) if all(ok for _, ok in fastest[i:])), None)
    if w8a8_from is None and rows:  # weight-only won at every measured size: W8A8 only beyond them
        w8a8_from = max(r["routed_rows"] for r in rows) + 1
    return dict(table=table, rows=rows, w8a8_from_rows=w8a8_from, seconds=time.perf_counter() - t_start)


@torch.inference_mode()
def tune_linear(cfg: ModelConfig, row_counts: list[int], device: torch.device,
                budget_s: float = 30.0) -> dict:
    """Sweep the fp8 small-M dense kernel's tiles over the decode projections of this config (fused
    q|k|v, o_proj, shared gate|up with SwiGLU, shared down) and time bf16 (cuBLAS) beside them."""
    from mogelm.kernels import triton_infer as ti

    t_start = time.perf_counter()
    D, hd = cfg.hidden_size, cfg.head_dim
    shapes = {"qkv": ((cfg.num_heads + 2 * cfg.num_kv_heads) * hd, D, False),
              "o_proj": (D, cfg.num_heads * hd, False),
              "shared_gate_up": (2 * cfg.shared_expert_intermediate_size, D, True),
              "shared_down": (D, cfg.shared_expert_intermediate_size, False)}
    gen = torch.Generator(device=device)
    gen.manual_seed(5)
    dense = {k: torch.randn(n, kk, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
             for k, (n, kk, _) in shapes.items()}
    weights = {k: ops.quantize_rows_fp8(w) for k, w in dense.items()}
    C = ti.LinearConfig
    cands = [C(16, 32, 256, 4, 4), C(16, 64, 256, 4, 4), C(16, 32, 512, 4, 3), C(32, 64, 256, 4, 3),
             C(64, 64, 128, 4, 4), C(64, 128, 128, 8, 3)]
    chosen, rows = {}, []
    for M in row_counts:
        xs = {k: torch.randn(M, kk, device=device, dtype=torch.bfloat16, generator=gen)
              for k, (_, kk, _) in shapes.items()}
        row = dict(rows=M)
        row["bf16_ms"] = sum(time_fn(partial(torch.matmul, xs[k], dense[k].t()), device, rep_ms=30)
                             for k in shapes)
        # W8A8 as the "fp8" activations run it (per-token quantisation + torch._scaled_mm)
        row["w8a8_ms"] = sum(time_fn(partial(ops.linear_fp8, xs[k], *weights[k], None, "fp8"), device,
                                     rep_ms=30) for k in shapes)
        best = None
        for c in cands:
            if c.block_m > max(16, 2 * M) or time.perf_counter() - t_start > budget_s:
                continue
            parts = [_fastest([(partial(ti.linear_fp8_wo, xs[k], *weights[k], swiglu=shapes[k][2], cfg=c),
                                c)], device, f"linear M={M} {k}") for k in shapes]
            if any(p is None for p in parts):
                continue
            t = sum(p[0] for p in parts)
            if best is None or t < best[0]:
                best = (t, c)
        if best is not None:
            chosen[M] = best[1]
            row.update(fp8_ms=best[0], config=dataclasses.asdict(best[1]), speedup=row["bf16_ms"] / best[0])
            log(f"  tune linear M={M:4d}: bf16 {row['bf16_ms']:.3f} ms, fp8 weight-only {best[0]:.3f} ms "
                f"(x{row['speedup']:.2f}) with {best[1]}")
        rows.append(row)
    ti.set_linear_configs(chosen)
    # "auto": weight-only up to the largest measured row count below which it beats W8A8 everywhere
    wo_max = 0
    for row in sorted(rows, key=lambda r: r["rows"]):
        if "fp8_ms" not in row or row["fp8_ms"] >= row["w8a8_ms"]:
            break
        wo_max = row["rows"]
    log(f"  tune linear: 'auto' dense projections run weight-only up to {wo_max} rows, W8A8 beyond")
    return dict(rows=rows, table={str(k): dataclasses.asdict(v) for k, v in chosen.items()},
                weight_only_max_rows=wo_max, seconds=time.perf_counter() - t_start)


def install_tuning(tuning: dict) -> None:
    """Use a tuning result (tune_moe / tune_linear output, or a file of them) in this process."""
    from mogelm.kernels import triton_infer as ti
    from mogelm.kernels import triton_moe as tm

    moe = tuning.get("moe") or {}
    tm.use_config_table(moe.get("table"))
    if moe.get("w8a8_from_rows"):
        ops.set_fp8_auto_rows(experts=int(moe["w8a8_from_rows"]))
    linear = tuning.get("linear") or {}
    ti.set_linear_configs({int(k): ti.LinearConfig(**v) for k, v in (linear.get("table") or {}).items()})
    if linear.get("weight_only_max_rows") is not None:
        ops.set_fp8_auto_rows(linear=int(linear["weight_only_max_rows"]))


# --- the runs ----------------------------------------------------------------------------------
def _env(device: torch.device) -> dict:
    out = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, device=str(device))
    if device.type == "cuda":
        out["device"] = torch.cuda.get_device_name(device)
        out["device_memory_GiB"] = torch.cuda.get_device_properties(device).total_memory / GiB
        import triton

        out["triton"] = triton.__version__
    return out


def run_decode(s: DecodeSettings, tuning: dict | None = None, sections: tuple[str, ...] = ("hf", "decode"),
               progress: Callable[[dict], None] | None = None) -> dict:
    """The whole decode benchmark; returns the JSON-ready result (module docstring). `progress`
    is called with the result so far after each section and each decode row (e.g. to write it, so
    a run cut short still leaves its numbers)."""
    progress = progress or (lambda res: None)
    device = torch.device(s.device)
    res: dict = dict(kind="decode", settings=dataclasses.asdict(s), **_env(device))
    res.update(ceilings(device))
    bw = res["copy_bandwidth_GBps"]
    log(f"{res['device']}: copy {bw:.0f} GB/s, dense bf16 {res['dense_bf16_tflops']:.0f} TFLOP/s")
    cfg = model_config(s.preset, s.layers, s.context + 2 * s.block_size)
    if "tune" in sections:
        tokens = sorted(set(s.batches) | ({512} if s.largest else set()))
        res["tuning"] = dict(moe=tune_moe(cfg, tokens, device, bw, budget_s=0.7 * s.tune_budget_s))
        progress(res)  # the experts' table is kept even if the dense sweep is cut short
        res["tuning"]["linear"] = tune_linear(cfg, [t for t in tokens if t <= 256], device,
                                              budget_s=0.3 * s.tune_budget_s)
        install_tuning(res["tuning"])
        progress(res)
    elif tuning:
        res["tuning_installed"] = True
        install_tuning(tuning)
    if "hf" in sections and s.hf:
        try:
            res["hf"] = hf_baseline(cfg, s.hf_batches, s.hf_layers, s.context, device)
            progress(res)
        except Exception as e:  # a transformers API change must not cost the rest of the run
            res["hf"] = dict(error=f"{type(e).__name__}: {e}")
            log(f"  HF baseline failed: {res['hf']['error']}")
    if "decode" not in sections:
        return res
    t0 = time.perf_counter()
    model = build_random_model(s.preset, layers=s.layers, recipe=s.recipes[0], device=device, seed=s.seed,
                               max_seq_len=cfg.max_seq_len)
    sync(device)
    res["build_s"] = time.perf_counter() - t0
    log(f"  built {cfg.name} x {cfg.num_layers} layers ({s.recipes[0]}) in {res['build_s']:.1f} s")
    rows: list[dict] = []
    res["decode"] = rows
    res["models"] = {}
    for recipe in s.recipes:
        requantize(model, recipe)
        wb = weight_bytes(model)
        res["models"][recipe] = wb
        log(f"  recipe {recipe}: weights {wb['total'] / 1e9:.1f} GB")
        for kv in s.kv_dtypes:
            cap = s.pool_tokens
            if cap is None and device.type != "cuda":
                cap = 2 * max(s.batches) * (s.context + s.block_size)
            try:
                cache = make_pool(model, kv, s.block_size, device, s.reserve_gib, cap)
            except RuntimeError as e:
                log(f"  {e}")
                continue
            largest = max_rows(cache, s.context)
            batches = sorted({b for b in s.batches if b <= largest} | ({largest} if s.largest else set()))
            skipped = [b for b in s.batches if b > largest]
            tokens = (cache.num_blocks - 1) * cache.block_size
            log(f"  KV {kv}: pool {cache.nbytes() / 1e9:.1f} GB = {tokens} tokens; largest batch at "
                f"{s.context}: {largest}" + (f"; does not fit: {skipped}" if skipped else ""))
            for B in batches:
                try:
                    row = measure_decode(model, cache, B, s.context, bw, wb, device, s.breakdown, s.seed)
                except torch.cuda.OutOfMemoryError as e:
                    rows.append(dict(recipe=recipe, kv_dtype=kv, batch=B, error=f"out of memory: {e}"[:300]))
                    log(f"  B={B}: out of memory")
                    torch.cuda.empty_cache()
                    continue
                row.update(recipe=recipe, kv_dtype=kv, largest=B == largest, pool_bytes=cache.nbytes(),
                           weights_bytes=wb["total"])
                if device.type == "cuda":
                    row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
                rows.append(row)
                log(format_decode_row(row))
                progress(res)
            for B in skipped:
                rows.append(dict(recipe=recipe, kv_dtype=kv, batch=B, context=s.context,
                                 error=f"does not fit: the {kv} pool holds {largest} rows of {s.context} "
                                       "tokens"))
            del cache
            if device.type == "cuda":
                torch.cuda.empty_cache()
    res["decode_s"] = time.perf_counter() - t0
    return res


def format_decode_row(r: dict) -> str:
    if "error" in r:
        return f"  {r['recipe']:10s} kv={r['kv_dtype']:5s} B={r['batch']:4d}: {r['error']}"
    b = r.get("breakdown_ms") or {}
    parts = " ".join(f"{k} {v:.1f}" for k, v in b.items())
    return (f"  {r['recipe']:10s} kv={r['kv_dtype']:5s} B={r['batch']:4d}: step {r['step_ms']:7.2f} ms, "
            f"TPOT {r['tpot_ms']:7.2f} ms, {r['tokens_per_s']:7.0f} tok/s, floor {r['floor_ms']:6.2f} ms "
            f"({r['frac_floor']:.0%}), experts {r['experts_touched']:.1f} | {parts}")


@torch.inference_mode()
def run_prefill(s: PrefillSettings, model: Transformer | None = None, tuning: dict | None = None) -> dict:
    """Prefill through the engine: one long prompt, then many prompts of prompt_len (docstring)."""
    device = torch.device(s.device)
    res: dict = dict(kind="prefill", settings=dataclasses.asdict(s), **_env(device))
    if tuning:
        install_tuning(tuning)
    if model is None:
        t0 = time.perf_counter()
        model = build_random_model(s.preset, layers=s.layers, recipe=s.recipe, device=device, seed=s.seed,
                                   max_seq_len=max(s.long_prompt, s.prompt_len) + 64)
        sync(device)
        res["build_s"] = time.perf_counter() - t0
    cfg = model.cfg
    gen = torch.Generator().manual_seed(s.seed + 7)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    graphs = False  # prefill steps run eagerly in the engine
    runs = []
    for label, n, length, chunk in (("one_long", 1, s.long_prompt, s.long_prompt),
                                    ("many", s.num_prompts, s.prompt_len, s.chunk_size)):
        prompts = [torch.randint(0, cfg.vocab_size, (length,), generator=gen).tolist() for _ in range(n)]
        eng = Engine(model, None, max_batch=n, max_len=length + 16, chunk_size=chunk,
                     kv_cache_tokens=n * (length + 16), cuda_graphs=graphs, prefix_caching=False)
        eng.generate(prompts, one)  # warm-up at the measured size (kernel compiles, allocator)
        steps = eng.num_steps
        ms = wall_ms(partial(eng.generate, prompts, one), device, s.repeats)
        runs.append(dict(case=label, prompts=n, prompt_len=length, chunk_size=chunk, tokens=n * length, ms=ms,
                         tokens_per_s=n * length / ms * 1e3, steps=(eng.num_steps - steps) // s.repeats))
        log(f"  prefill {label}: {n} x {length} tokens in {ms:.1f} ms = {n * length / ms * 1e3:.0f} tok/s "
            f"({runs[-1]['steps']} engine steps, chunk {chunk})")
        eng = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res["runs"] = runs
    res["layers"] = cfg.num_layers
    return res


def write_json(path, res: dict) -> None:
    """Write the result atomically (a temporary file renamed into place)."""
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def summary_table(res: dict) -> str:
    """The short table printed last."""
    lines = []
    if res.get("kind") == "decode":
        lines.append(f"{res['device']}  copy {res['copy_bandwidth_GBps']:.0f} GB/s  dense "
                     f"{res['dense_bf16_tflops']:.0f} "
                     f"TFLOP/s  ({res['settings']['preset']}, {res['settings']['layers'] or 'all'} layers, "
                     f"ctx {res['settings']['context']})")
        tune = res.get("tuning") or {}
        for r in (tune.get("moe") or {}).get("rows", []):
            bf16 = min(r["bf16_shipped_ms"], r["bf16_tuned_ms"])
            fp8 = min(r["fp8_shipped_ms"], r["fp8_tuned_ms"], r["w8a8_shipped_ms"])
            lines.append(f"tune experts T={r['tokens']:4d}: bf16 {r['bf16_shipped_ms']:.3f} -> "
                         f"{r['bf16_tuned_ms']:.3f} ms ({r['bf16_floor_ms'] / bf16:.0%} of floor), "
                         "fp8 w-only "
                         f"{r['fp8_shipped_ms']:.3f} -> {r['fp8_tuned_ms']:.3f} ms, W8A8 "
                         f"{r['w8a8_shipped_ms']:.3f} ms; best fp8 x{bf16 / fp8:.2f} bf16")
        for r in (tune.get("linear") or {}).get("rows", []):
            if "fp8_ms" in r:
                lines.append(f"tune fp8 small-M dense M={r['rows']:4d}: bf16 {r['bf16_ms']:.3f} ms, fp8 "
                             f"{r['fp8_ms']:.3f} ms (x{r['speedup']:.2f})")
        if not res.get("decode"):
            return "\n".join(lines)
        lines.append("recipe     kv       B     step ms  TPOT ms   tok/s  %floor  attn  routed shared other")
        for r in res.get("decode", []):
            if "error" in r:
                lines.append(f"{r['recipe']:10s} {r['kv_dtype']:8s} {r['batch']:4d}  {r['error'][:60]}")
                continue
            b = r.get("breakdown_ms", {})
            lines.append(f"{r['recipe']:10s} {r['kv_dtype']:8s} {r['batch']:4d} {r['step_ms']:9.2f} "
                         f"{r['tpot_ms']:8.2f} {r['tokens_per_s']:7.0f} {r['frac_floor']:6.0%} "
                         f"{b.get('attention', 0):6.1f} {b.get('routed_experts', 0):6.1f} "
                         f"{b.get('shared_expert', 0):6.1f} {b.get('other', 0):6.1f}")
        hf = res.get("hf") or {}
        for r in hf.get("rows", []):
            lines.append(f"HF Qwen2-MoE (transformers {hf['transformers']}, eager, static cache) "
                         f"B={r['batch']}: "
                         f"{r['step_ms_extrapolated']:.1f} ms = {r['tokens_per_s_extrapolated']:.1f} tok/s "
                         f"(per-layer slope of {hf['layers']} layers, EXTRAPOLATED)")
        if hf.get("error"):
            lines.append(f"HF baseline failed: {hf['error']}")
    else:
        for r in res.get("runs", []):
            lines.append(f"prefill {r['case']:8s} {r['prompts']} x {r['prompt_len']}: {r['ms']:.1f} ms, "
                         f"{r['tokens_per_s']:.0f} tok/s ({res['layers']} layers)")
    return "\n".join(lines)


def largest_fitting_batch(cfg: ModelConfig, free_bytes: float, kv_dtype: torch.dtype, ctx: int,
                          block_size: int = 16) -> int:
    """Rows of ctx tokens a pool of free_bytes holds (the arithmetic behind the largest batch)."""
    per_row = math.ceil(ctx / block_size) * PagedKVCache.bytes_per_block(cfg, block_size, kv_dtype)
    return int(free_bytes // per_row)


__all__ = ["DecodeSettings", "PrefillSettings", "build_random_model", "run_decode", "run_prefill",
           "summary_table", "write_json", "tune_moe", "tune_linear", "install_tuning"]
