"""Multi-token prediction (MTP) modules in the DeepSeek-V3 style (arXiv 2412.19437, §2.2).

A model with `cfg.mtp_depth = D > 0` owns D modules after its trunk (`model.mtp`). Module d
(d = 1..D) sees, at every position t, the hidden state of depth d-1 at t and the embedding of
token t+d, and predicts token t+d+1:

    h^0_t   = the trunk's last hidden state at t, BEFORE the final norm (see "Choices")
    e_t     = embed_tokens(x_{t+d})                                    shared embedding
    u^d_t   = eh_proj([enorm(e_t) ; hnorm(h^{d-1}_t)])                 2D -> D, no bias
    h^d     = Block(u^d)                                               causal attention over the
                                                                       depth-d rows, MoGE FFN
    logits^d_t = lm_head(norm_d(h^d_t))   -> token x_{t+d+1}           shared LM head, own norm

Depth d has T-d rows (positions 0..T-d-1 of a T-token input): the others have no token t+d.
In training (mogelm.train) the loss is  CE(main) + lambda * mean_d CE(depth d)  (mtp_losses
below); at inference module 1 drafts the token after next for speculative decoding
(mogelm.inference.spec_decode runs it over the engine's paged cache; drafters.MTPDrafter is the
uncached reference).

    model = Transformer(cfg.replace(mtp_depth=1))
    out = model(ids_BT, return_stats=True, return_hidden=True)     # out.trunk_hidden [B, T, D]
    mtp = model.mtp_forward(out.trunk_hidden, ids_BT)              # MTPOutput
    ce_D = mtp_losses(mtp, targets_BT)                             # [D] one CE per depth

Choices (and why):
- Depth 0 is the trunk's residual stream before `model.norm`. Every later depth hands on its
  block's output, which is pre-norm too, so hnorm sees the same kind of tensor at every depth
  and plays the role the final norm plays for the main head. (vLLM's DeepSeek MTP code is fed
  the trunk's final-normed states; a checkpoint trained that way would need the other choice.)
- Each module has its own output norm before the shared head, as DeepSeek-V3's released
  weights do (`shared_head.norm`); the final norm of the trunk is tuned for depth 0 only.
- The concatenation puts the embedding first ([enorm(e); hnorm(h)]), the layout of DeepSeek-V3's
  released `eh_proj` (the paper's formula writes h first; only the column order differs).
- The block is a model.Block with its own FFN from build_ffn(cfg): the same MoGE layer type
  (routing, experts, shared expert) as the trunk. Its balancing/z losses are returned in
  MTPOutput.aux_loss. It is not in model.moe_layers(): expert parallelism keeps its experts
  whole on every rank, and the training loop does not update an aux-free bias for it.
- Rows use the trunk's positions (row t at position t) for RoPE; attention only sees
  differences of positions, so this equals DeepSeek/Megatron's shifted positions.

Checkpoint names (mogelm.checkpoint), as DeepSeek-V3 names its MTP layer: module d-1 (0-based
in `model.mtp`) is stored as layer L + d - 1 after the L trunk layers, `model.layers.{L+i}.`
+ `enorm.weight`, `hnorm.weight`, `eh_proj.weight`, `shared_head.norm.weight` and the block's
own `input_layernorm`, `self_attn.*`, `post_attention_layernorm`, `mlp.*` names; config.json
carries `num_nextn_predict_layers`. The shared embedding and head are not stored again.

Legend: B batch, T positions, D hidden, V vocab, n = T - d rows at depth d.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mogelm.config import ModelConfig
from mogelm.moe.layer import MoEStats


class MTPOutput(NamedTuple):
    logits: list[Tensor]  # depth d (index d-1): [B, T-d, V]; row t predicts token t+d+1
    hidden: list[Tensor]  # depth d: [B, T-d, D], the block's output (pre-norm)
    aux_loss: Tensor  # scalar: balancing + z losses of the MTP blocks (already weighted)
    layer_stats: list[MoEStats]  # one per MTP block with a MoE FFN


class MTPModule(nn.Module):
    """One prediction depth: norms + projection of (embedding, previous hidden), a Block, a norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from mogelm.model import Block, RMSNorm, build_ffn  # model.py builds us: import late

        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.norm_eps)  # on the embedding of token t+d
        self.hnorm = RMSNorm(D, cfg.norm_eps)  # on the previous depth's hidden state at t
        self.eh_proj = nn.Linear(2 * D, D, bias=False)  # columns [:D] embedding, [D:] hidden
        self.block = Block(cfg, build_ffn(cfg))
        self.norm = RMSNorm(D, cfg.norm_eps)  # this depth's output norm (`shared_head.norm`)

    def forward(self, h_prev_BnD: Tensor, emb_BnD: Tensor, cos: Tensor, sin: Tensor
                ) -> tuple[Tensor, MoEStats | None]:
        u = self.eh_proj(torch.cat([self.enorm(emb_BnD), self.hnorm(h_prev_BnD)], dim=-1))
        return self.block(u, cos, sin)


def mtp_forward(model: nn.Module, hidden_BTD: Tensor, input_ids_BT: Tensor,
                positions_BT: Tensor | None = None) -> MTPOutput:
    """Run every MTP module of `model` over a whole sequence (no KV cache).

    hidden_BTD: the trunk's pre-norm last hidden state (model(..., return_hidden=True).trunk_hidden)
    for the first T_h <= T positions of input_ids_BT [B, T] (T_h = T in training; drafting
    appends draft tokens the trunk has not seen); depth d then has min(T_h, T - d) rows.
    Positions default to 0..T-1."""
    B, T = input_ids_BT.shape
    assert hidden_BTD.shape[1] <= T, "hidden states for positions beyond input_ids"
    if positions_BT is None:
        positions_BT = torch.arange(T, device=input_ids_BT.device).unsqueeze(0).expand(B, T)
    emb_BTD = model.embed_tokens(input_ids_BT)
    h = hidden_BTD
    logits, hiddens, stats = [], [], []
    for d, module in enumerate(model.mtp, start=1):
        n = min(h.shape[1], T - d)  # rows with a hidden state and a token t+d in the input
        if n <= 0:
            break
        cos, sin = model.rotary(positions_BT[:, :n])
        h, layer_stats = module(h[:, :n], emb_BTD[:, d : d + n], cos, sin)  # row t: token t+d
        hiddens.append(h)
        logits.append(model.lm_head(module.norm(h)))
        if layer_stats is not None:
            stats.append(layer_stats)
    zero = hidden_BTD.new_zeros((), dtype=torch.float32)
    aux = sum((s.aux_loss + s.z_loss for s in stats), zero)
    return MTPOutput(logits, hiddens, aux, stats)


def mtp_losses(out: MTPOutput, targets_BT: Tensor) -> Tensor:
    """Cross-entropy of each depth against the next-token targets of the main loss: fp32 [D].

    targets_BT[:, t] is token t+1, so depth d's row t (predicting token t+d+1) is scored against
    targets_BT[:, t+d]; rows past the end have no target and were never computed."""
    losses = []
    for d, logits_BnV in enumerate(out.logits, start=1):
        n, V = logits_BnV.shape[1:]
        target_Bn = targets_BT[:, d : d + n]
        losses.append(F.cross_entropy(logits_BnV.float().reshape(-1, V), target_Bn.reshape(-1)))
    return torch.stack(losses)


def build_mtp(cfg: ModelConfig, device: torch.device) -> nn.ModuleList:
    """The mtp_depth modules (their weights are set by Transformer.reset_parameters).

    Building them leaves the random generator as it was, so a model with MTP starts with the
    same trunk weights as one without for the same seed: reset_parameters initialises the
    trunk first, in the same order, and the MTP modules after it."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return nn.ModuleList(MTPModule(cfg) for _ in range(cfg.mtp_depth))


@torch.no_grad()
def reset_mtp_parameters(modules: nn.ModuleList, std: float) -> None:
    """The parts of the modules outside their blocks (Transformer.reset_parameters initialises
    the blocks like the trunk's): norms at one, eh_proj normal(std) like other input projections."""
    for m in modules:
        nn.init.ones_(m.enorm.weight)
        nn.init.ones_(m.hnorm.weight)
        nn.init.normal_(m.eh_proj.weight, std=std)
        nn.init.ones_(m.norm.weight)
