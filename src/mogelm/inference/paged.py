"""The paged KV pool and the attention state of one engine step (what the model's Attention calls).

    cache = PagedKVCache(cfg, num_blocks=1024, block_size=16, device="cuda", dtype=torch.bfloat16)
    state = PagedAttention(cache, slots_N, tables_RM, lens_R, chunks)   # built by the engine per step
    logits = model(ids_1N, positions_BT=pos_1N, kv_cache=state, logits_indices=rows)

Pool layout (allocated once): per layer l, k[l] and v[l] are [P, bs, Hkv, hd] (P blocks of bs
tokens; block 0 is the null block, see block_manager.py). The token at position p of a sequence
lives at slot table[p // bs] * bs + p % bs, i.e. row `slot` of the flat view [P * bs, Hkv, hd].
Optional fp8 (e4m3) pool: values are stored divided by a per-(layer, KV head) fp32 scale
(k_scale[l], v_scale[l], [Hkv]); `calibrate_kv_scales` measures them once at start-up.

One step's batch is packed into one row of N tokens (B = 1, no padding): first R decode rows (one
token each), then prompt chunks (several tokens of one sequence each). PagedAttention carries
where each token's K/V goes (`slots`), and for attention:
  - decode rows: each row's block table and live length (its position + 1) -> the split-KV decode
    kernel (ops.paged_decode_attention; Triton on CUDA), reading only the live blocks;
  - prompt chunks: (first token, last token + 1, first position, block table) -> SDPA per chunk over
    its gathered blocks, causal within the chunk and over its cached prefix
    (ops.paged_prefill_attention). A varlen paged-prefill kernel would do every chunk in one launch
    without gathering (see benchmarks/notes_engine.md); the GEMMs around it are already batched.
Layer l's view (`layer(l)`) writes the call's K/V into the pool, then attends; so every token sees
itself and everything written before it. Several positions of one decoding sequence (speculative
verification) are several decode rows with the same table and lengths pos + 1, or a chunk.

Decode-only steps are replayed from CUDA graphs (engine.CUDAGraphRunner): there the tensors of a
PagedAttention are static buffers refreshed before each replay, and `num_splits` is fixed per bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mogelm.config import ModelConfig
from mogelm.kernels import ops
from mogelm.kernels.attention import dequantize, gather_blocks

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


class PagedKVCache:
    """Keys and values of every layer in one pool of fixed-size blocks (layout: module docstring)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device=None,
                 dtype: torch.dtype = torch.float32, kv_dtype: torch.dtype | None = None,
                 num_layers: int | None = None):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = cfg.num_kv_heads, cfg.head_dim
        self.dtype = kv_dtype or dtype  # storage dtype
        self.compute_dtype = dtype
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        layers = cfg.num_layers if num_layers is None else num_layers  # e.g. + MTP layers
        self.k = [torch.zeros(shape, device=device, dtype=self.dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, device=device, dtype=self.dtype) for _ in range(layers)]
        self.k_scale: list[Tensor] | None = None
        self.v_scale: list[Tensor] | None = None
        if self.dtype == FP8:
            ones = lambda: torch.ones(cfg.num_kv_heads, device=device, dtype=torch.float32)  # noqa: E731
            self.k_scale = [ones() for _ in range(layers)]
            self.v_scale = [ones() for _ in range(layers)]

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, kv_dtype: torch.dtype,
                        num_layers: int | None = None) -> int:
        layers = cfg.num_layers if num_layers is None else num_layers
        return 2 * layers * block_size * cfg.num_kv_heads * cfg.head_dim * kv_dtype.itemsize

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(self, layer: int, slots_N: Tensor, k_NHd: Tensor, v_NHd: Tensor) -> None:
        """Store keys/values of N tokens at pool slots `slots_N` (int64); an fp8 pool quantises with
        the layer's per-head scales. One launch for both on CUDA (ops.paged_kv_write)."""
        ks = self.k_scale[layer] if self.k_scale is not None else None
        vs = self.v_scale[layer] if self.v_scale is not None else None
        ops.paged_kv_write(self.k[layer], self.v[layer], slots_N, k_NHd, v_NHd, ks, vs)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write of shared blocks)."""
        if not pairs:
            return
        device = self.k[0].device
        src = torch.tensor([s for s, _ in pairs], device=device)
        dst = torch.tensor([d for _, d in pairs], device=device)
        for pool in self.k + self.v:
            raw = pool.view(torch.uint8) if pool.dtype == FP8 else pool
            raw[dst] = raw[src]

    def read(self, layer: int, table: list[int], length: int) -> tuple[Tensor, Tensor]:
        """Keys and values of positions [0, length) of a sequence, dequantised: 2 x [length, Hkv, hd]."""
        t = torch.tensor(table, device=self.k[0].device)
        k, v = gather_blocks(self.k[layer], t, length), gather_blocks(self.v[layer], t, length)
        ks = self.k_scale[layer] if self.k_scale is not None else None
        vs = self.v_scale[layer] if self.v_scale is not None else None
        return dequantize(k, ks, self.compute_dtype), dequantize(v, vs, self.compute_dtype)


@dataclass
class PrefillChunk:
    lo: int  # first token of the chunk in the packed batch
    hi: int  # one past its last token
    start: int  # position of its first token in its sequence
    table: Tensor  # [>= cdiv(start + hi - lo, bs)] int32 block table of the sequence


@dataclass
class PagedAttention:
    """One step's attention state (the model's kv_cache argument); layout in the module docstring."""

    cache: PagedKVCache
    slots_N: Tensor  # [N] int64 pool slot of each token of the call
    tables_RM: Tensor  # [R, M] int32 block tables of the R decode rows (the first R tokens)
    lens_R: Tensor  # [R] int32 keys each decode row sees (its position + 1; 0 = padding row)
    chunks: list[PrefillChunk] = field(default_factory=list)
    num_splits: int | None = None  # split-KV factor of the decode kernel (fixed in CUDA graphs)

    def layer(self, i: int, positions_BT: Tensor | None = None, kv_len: int | None = None) -> PagedLayer:
        return PagedLayer(self, i)  # positions are already in slots / lens / chunks


class PagedLayer:
    def __init__(self, state: PagedAttention, layer: int):
        self.state, self.layer = state, layer

    def attend(self, q_BHTd: Tensor, k_BHkvTd: Tensor, v_BHkvTd: Tensor) -> Tensor:
        st, cache, i = self.state, self.state.cache, self.layer
        assert q_BHTd.shape[0] == 1, "the paged batch is packed into one row"
        q_NHd = q_BHTd[0].transpose(0, 1)
        cache.write(i, st.slots_N, k_BHkvTd[0].transpose(0, 1), v_BHkvTd[0].transpose(0, 1))
        ks = cache.k_scale[i] if cache.k_scale is not None else None
        vs = cache.v_scale[i] if cache.v_scale is not None else None
        R = st.lens_R.shape[0]
        if not st.chunks:
            out_NHd = ops.paged_decode_attention(q_NHd, cache.k[i], cache.v[i], st.tables_RM, st.lens_R,
                                                 cache.scale, ks, vs, st.num_splits)
        else:
            out_NHd = torch.empty_like(q_NHd)
            if R:
                out_NHd[:R] = ops.paged_decode_attention(q_NHd[:R], cache.k[i], cache.v[i], st.tables_RM,
                                                         st.lens_R, cache.scale, ks, vs, st.num_splits)
            for c in st.chunks:
                out_NHd[c.lo:c.hi] = ops.paged_prefill_attention(q_NHd[c.lo:c.hi], cache.k[i], cache.v[i],
                                                                 c.table, c.start, cache.scale, ks, vs)
        return out_NHd.transpose(0, 1).unsqueeze(0)  # [1, H, N, hd]


@torch.no_grad()
def calibrate_kv_scales(model, cache: PagedKVCache, num_tokens: int = 512, headroom: float = 2.0,
                        seed: int = 0) -> None:
    """Per-(layer, KV head) fp8 scales: the largest |key| / |value| over a forward of random tokens
    (a contiguous KVCache), times `headroom`, mapped to the e4m3 maximum. Sets cache.k_scale/v_scale."""
    from mogelm.model import KVCache

    cfg = model.cfg
    device = next(model.parameters()).device
    n = min(num_tokens, cfg.max_seq_len)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (1, n), generator=gen).to(device)
    kv = KVCache(cfg, 1, n, device=device, dtype=cache.compute_dtype)
    model(ids, positions_BT=torch.arange(n, device=device)[None], kv_cache=kv, last_token_only=True)
    for layer in range(len(kv.k)):
        for src, dst in ((kv.k[layer], cache.k_scale), (kv.v[layer], cache.v_scale)):
            amax = src[0].float().abs().amax(dim=(1, 2))  # [Hkv]
            dst[layer].copy_((amax * headroom / FP8_MAX).clamp_min(1e-6))
