"""The decoder-only transformer of Pangu Pro MoE (PAPER.md §3.2), with a preallocated KV cache.

    h = x + o_proj(Attn(RoPE(q(RMSNorm(x))), RoPE(k(.)), v(.)))    GQA, causal, q/k/v/o biases
    y = h + FFN(RMSNorm'(h))                                       FFN = MoGELayer (or dense SwiGLU)
    logits = lm_head(RMSNorm_final(y_L))                           untied

    model = Transformer(cfg)
    logits = model(input_ids)                    # [B, T, vocab]
    out = model(input_ids, return_stats=True)    # ModelOutput(logits, aux_loss, layer_stats, hidden)
    out = model(input_ids, return_stats=True, head=False)  # no logits: the loss applies the head
    model.set_activation_checkpointing("moe")    # recompute each FFN in the backward ("full": blocks)

With cfg.mtp_depth > 0 the model also owns multi-token prediction modules (`model.mtp`,
mogelm.mtp): `model.mtp_forward(model(ids, return_hidden=True).trunk_hidden, ids)`.

Incremental decoding: pass a KV cache and explicit positions; logits equal the full forward.
A KV cache is any object with `layer(i, positions_BT, kv_len)` returning layer i's view, whose
`attend(q, k, v)` stores this call's keys and values and attends over what is cached: KVCache below
(contiguous rows) or the inference engine's paged pool (mogelm.inference.paged). The model holds no
cache logic beyond that call.

A Block is handed its FFN (`build_ffn(cfg)` picks it per layer); every FFN returns
(y, MoEStats | None), so the block never asks which kind it holds. `model.moe_layers()` lists the
MoE layers for the code that works on them from outside (parallel, training, evaluation).

Legend: B batch, T positions in this call, D hidden, H query heads, Hkv KV heads, hd head dim,
L cache length, V vocab. Attribute names follow the HF/Pangu checkpoint (mogelm.checkpoint adds
the `model.` prefix), so state_dict keys map one to one except the stacked routed experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mogelm.config import ModelConfig
from mogelm.kernels import ops, torch_impl
from mogelm.moe.experts import SwiGLU, output_std
from mogelm.moe.layer import MoEStats, MoGELayer


class ModelOutput(NamedTuple):
    logits: Tensor | None  # [B, T, V] (None with head=False)
    aux_loss: Tensor  # scalar: sum over layers of balancing + z losses (already weighted)
    layer_stats: list[MoEStats]  # one per MoE layer (empty for a dense model)
    hidden: Tensor | None = None  # [B, T, D] RMSNorm_final(y_L): the LM head's input
    trunk_hidden: Tensor | None = None  # [B, T, D] y_L before the final norm (return_hidden: MTP's input)


CHECKPOINTING = ("none", "moe", "full")  # activation checkpointing: nothing, each FFN, whole blocks


class KVCache:
    """Preallocated keys and values for every layer.

    Layout: k[l], v[l] are [B, Hkv, L_max, hd] (batch row = a sequence slot). Positions are
    explicit: writing token at position p of row b fills k[l][b, :, p]. A query at position p
    attends to keys at positions 0..p of its own row, so a slot can be reused by a new sequence
    without clearing: stale keys beyond p are masked out.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def layer(self, i: int, positions_BT: Tensor, kv_len: int | None = None) -> CachedLayer:
        """Layer i's view for a call whose tokens sit at `positions_BT` of their rows; `kv_len`
        bounds the keys attended to (default: max position + 1)."""
        return CachedLayer(self.k[i], self.v[i], positions_BT, kv_len)


class CachedLayer:
    """One layer of a KVCache (or of rows of one) for one call: attend() writes, then attends."""

    def __init__(self, k_cache: Tensor, v_cache: Tensor, positions_BT: Tensor, kv_len: int | None):
        self.k_cache, self.v_cache, self.positions_BT, self.kv_len = k_cache, v_cache, positions_BT, kv_len

    def attend(self, q_BHTd: Tensor, k_BHkvTd: Tensor, v_BHkvTd: Tensor) -> Tensor:
        B, _, T, _ = q_BHTd.shape
        pos_BT, k_cache, v_cache = self.positions_BT, self.k_cache, self.v_cache
        rows_BT = torch.arange(B, device=q_BHTd.device).unsqueeze(1).expand(B, T)
        k_cache[rows_BT, :, pos_BT] = k_BHkvTd.transpose(1, 2).to(k_cache.dtype)  # (B, T, Hkv, hd) slots
        v_cache[rows_BT, :, pos_BT] = v_BHkvTd.transpose(1, 2).to(v_cache.dtype)
        L = self.kv_len if self.kv_len is not None else int(pos_BT.max()) + 1
        keys_pos_L = torch.arange(L, device=q_BHTd.device)
        visible_B1TL = (keys_pos_L <= pos_BT.unsqueeze(-1)).unsqueeze(1)
        return F.scaled_dot_product_attention(
            q_BHTd, k_cache[:, :, :L].to(q_BHTd.dtype), v_cache[:, :, :L].to(q_BHTd.dtype),
            attn_mask=visible_B1TL, enable_gqa=True,
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.weight, self.eps)  # fused on CUDA; the plain expression on CPU


def rope_inv_freq(head_dim: int, theta: float, device=None) -> Tensor:
    """Rotary frequencies theta^(-2i/hd), computed in float64 for accuracy at theta = 1.6e7."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return (1.0 / (theta**exponents)).float().to(device)


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) RoPE over the full head dim, angles computed for any positions."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta), persistent=False)

    def forward(self, positions_BT: Tensor) -> tuple[Tensor, Tensor]:
        freqs_BTh = positions_BT.float().unsqueeze(-1) * self.inv_freq
        angles = torch.cat([freqs_BTh, freqs_BTh], dim=-1)  # [B, T, hd]
        return angles.cos(), angles.sin()


apply_rope = torch_impl.apply_rope  # rotate-half RoPE of one tensor; Attention uses ops.rope_qk


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_out, cfg.hidden_size, bias=cfg.o_bias)
        # Inference may replace q/k/v_proj by one module (mogelm.inference.fuse.fuse_qkv): one GEMM
        # over the concatenated weights, then bias + RoPE in one kernel; x -> (q, k, v) with RoPE.
        self.qkv_proj = None

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor, kv=None) -> Tensor:
        """`kv`: None (causal attention within this call) or a cache layer view (see the module
        docstring) that stores this call's keys/values and attends over the cache."""
        B, T, _ = x_BTD.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x_BTD, cos, sin)  # (B, H, T, hd), (B, Hkv, T, hd) x 2, RoPE applied
        else:
            q = self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
            k = self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv,.)
            v = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q, k = ops.rope_qk(q, k, cos, sin)  # apply_rope to both, fused on CUDA
        if kv is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = kv.attend(q, k, v)  # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class DenseFFN(SwiGLU):
    """The dense baseline's feed-forward: one SwiGLU, with the FFN contract x -> (y, None)."""

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return super().forward(x), None


def build_ffn(cfg: ModelConfig) -> MoGELayer | DenseFFN:
    """One block's feed-forward: the MoE layer (routed + shared experts) or the dense baseline.
    Contract: ffn(x [..., D]) -> (y [..., D], MoEStats or None); ffn.reset_parameters(std, out_std)."""
    return MoGELayer(cfg) if cfg.is_moe else DenseFFN(cfg.hidden_size, cfg.dense_intermediate_size)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = ffn  # checkpoint name: model.layers.{l}.mlp.*
        self.checkpointing = "none"  # one of CHECKPOINTING (Transformer.set_activation_checkpointing)

    def forward(self, x, *args, **kwargs) -> tuple[Tensor, MoEStats | None]:
        if self.checkpointing == "full" and self._recompute(x):
            return checkpoint(self._forward, x, *args, use_reentrant=False, **kwargs)
        return self._forward(x, *args, **kwargs)

    def _recompute(self, x: Tensor) -> bool:
        # only while training with autograd on (never with a KV cache: inference runs without grad)
        return self.training and torch.is_grad_enabled() and x.requires_grad

    def _forward(self, x, cos, sin, kv=None) -> tuple[Tensor, MoEStats | None]:
        a = self.self_attn(self.input_layernorm(x), cos, sin, kv)
        if self.checkpointing == "moe" and (self._recompute(x) or self._recompute(a)):  # x + a needs grad
            h = x + a
            y, stats = checkpoint(self._ffn, h, use_reentrant=False)  # keeps h, drops the FFN's activations
        else:
            # h = x + a and the FFN's norm of h: one kernel in inference on CUDA, else these two ops
            norm = self.post_attention_layernorm
            h, normed = ops.add_rms_norm(a, x, norm.weight, norm.eps)
            y, stats = self.mlp(normed)
        return h + y, stats

    def _ffn(self, h: Tensor) -> tuple[Tensor, MoEStats | None]:
        return self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, build_ffn(cfg)) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.mtp = None  # multi-token prediction modules (mogelm.mtp), when cfg.mtp_depth > 0
        if cfg.mtp_depth > 0:
            from mogelm.mtp import build_mtp

            self.mtp = build_mtp(cfg, self.embed_tokens.weight.device)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.cfg
        std, out_std = cfg.init_std, output_std(cfg.init_std, cfg.num_layers)
        nn.init.normal_(self.embed_tokens.weight, std=std)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        mtp_blocks = [m.block for m in self.mtp] if self.mtp is not None else []
        for block in [*self.layers, *mtp_blocks]:  # MTP blocks last: trunk init as without MTP
            attn = block.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                nn.init.normal_(proj.weight, std=out_std if proj is attn.o_proj else std)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)
            nn.init.ones_(block.input_layernorm.weight)
            nn.init.ones_(block.post_attention_layernorm.weight)
            block.mlp.reset_parameters(std, out_std)
        nn.init.ones_(self.norm.weight)
        self.rotary.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, self.rotary.inv_freq.device)
        if self.mtp is not None:
            from mogelm.mtp import reset_mtp_parameters

            reset_mtp_parameters(self.mtp, std)

    def forward(
        self,
        input_ids_BT: Tensor,
        positions_BT: Tensor | None = None,
        kv_cache=None,
        kv_len: int | None = None,
        return_stats: bool = False,
        last_token_only: bool = False,
        logits_indices: Tensor | None = None,
        head: bool = True,
        return_hidden: bool = False,
    ) -> Tensor | ModelOutput:
        """input_ids [B, T] -> logits [B, T, V] (or ModelOutput with return_stats=True).

        Without a cache, positions default to 0..T-1 and attention is causal over this call.
        With a cache (KVCache or any object with its `layer` method), `positions_BT` says where
        each token sits in its sequence; `kv_len` (optional, KVCache) bounds the keys attended to
        (default: max position + 1). `last_token_only` computes logits for the last position only
        ([B, 1, V]): prefill needs no more, and the LM head over every prompt token is a large share
        of its cost. `logits_indices` [n] picks rows of the flattened B*T positions instead and
        returns logits [n, V] (a packed batch of several sequences: their last tokens).
        `head=False` (with return_stats) skips the LM head: ModelOutput.logits is None and the
        loss applies the head to ModelOutput.hidden itself (ops.linear_cross_entropy never holds
        the whole batch's logits). `return_hidden` also returns
        ModelOutput.trunk_hidden, the last hidden state before the final norm (what the MTP
        modules take: mtp_forward)."""
        B, T = input_ids_BT.shape
        if kv_cache is not None and positions_BT is None:
            raise ValueError("positions_BT is required when decoding with a KV cache")
        if positions_BT is None:
            positions_BT = torch.arange(T, device=input_ids_BT.device).unsqueeze(0).expand(B, T)
        cos, sin = self.rotary(positions_BT)
        x = self.embed_tokens(input_ids_BT)
        stats: list[MoEStats] = []
        for i, block in enumerate(self.layers):
            kv = kv_cache.layer(i, positions_BT, kv_len) if kv_cache is not None else None
            x, layer_stats = block(x, cos, sin, kv)
            if layer_stats is not None:
                stats.append(layer_stats)
        if last_token_only:
            x = x[:, -1:]
        elif logits_indices is not None:
            x = x.flatten(0, 1)[logits_indices]  # [n, D]
        hidden = self.norm(x)
        full = return_stats or return_hidden
        logits = self.lm_head(hidden) if head or not full else None
        if not full:
            return logits
        aux = sum((s.aux_loss + s.z_loss for s in stats), hidden.new_zeros((), dtype=torch.float32))
        return ModelOutput(logits, aux, stats, hidden, x if return_hidden else None)

    def set_activation_checkpointing(self, mode: str) -> None:
        """Recompute activations in the backward instead of keeping them: "none"; "moe" (each
        block's FFN with its norm: the routed experts hold most of a block's activations); "full"
        (whole blocks). Only while training with grad enabled; numerics unchanged."""
        if mode not in CHECKPOINTING:
            raise ValueError(f"activation checkpointing must be one of {CHECKPOINTING}, got {mode!r}")
        for block in self.layers:
            block.checkpointing = mode

    def mtp_forward(self, hidden_BTD: Tensor, input_ids_BT: Tensor, positions_BT: Tensor | None = None):
        """The MTP modules over a whole sequence: mogelm.mtp.mtp_forward -> MTPOutput (logits of
        depth d: [B, T-d, V], row t predicting token t+d+1). `hidden_BTD` is return_hidden's trunk_hidden."""
        if self.mtp is None:
            raise ValueError("this model has no MTP modules (mtp_depth is 0)")
        from mogelm.mtp import mtp_forward

        return mtp_forward(self, hidden_BTD, input_ids_BT, positions_BT)

    def moe_layers(self) -> list[MoGELayer]:
        """The MoE layers, in depth order (empty for a dense model)."""
        return [b.mlp for b in self.layers if isinstance(b.mlp, MoGELayer)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
