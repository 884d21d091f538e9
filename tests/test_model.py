"""The transformer: KV-cache decode equals the full forward; blocks run the FFN they are given;
every routing selects by its rule and the aux loss is Eq. 8 of it."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import nn

from mogelm.config import from_name
from mogelm.model import Block, KVCache, RotaryEmbedding, Transformer, build_ffn
from mogelm.moe import routing as R
from mogelm.moe.experts import SwiGLU
from mogelm.moe.layer import MoGELayer


def test_kv_cache_decode_equals_full_forward():
    cfg = from_name("debug")
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 24))
    full = model(ids)
    cache = KVCache(cfg, batch_size=3, max_len=32)
    pieces = [model(ids[:, :10], positions_BT=torch.arange(10).expand(3, 10), kv_cache=cache)]
    for t in range(10, 24):
        pieces.append(model(ids[:, t:t + 1], positions_BT=torch.full((3, 1), t), kv_cache=cache))
    assert_close(torch.cat(pieces, 1), full, scale=10)
    last = model(ids, last_token_only=True)
    assert last.shape == (3, 1, cfg.vocab_size)
    assert_close(last[:, 0], full[:, -1], scale=10)


def test_rows_at_different_positions_are_independent():
    cfg = from_name("debug")
    model = Transformer(cfg).eval()
    a = torch.randint(0, cfg.vocab_size, (1, 7))
    b = torch.randint(0, cfg.vocab_size, (1, 12))
    cache = KVCache(cfg, batch_size=2, max_len=16)
    # prefill the rows separately into their slots, then decode one token for both at once
    model(a[:, :6], positions_BT=torch.arange(6)[None], kv_cache=_row(cache, 0))
    model(b[:, :11], positions_BT=torch.arange(11)[None], kv_cache=_row(cache, 1))
    step = model(torch.cat([a[:, 6:7], b[:, 11:12]]), positions_BT=torch.tensor([[6], [11]]), kv_cache=cache)
    assert_close(step[0, -1], model(a)[0, -1], scale=10)
    assert_close(step[1, -1], model(b)[0, -1], scale=10)


def _row(cache, i):
    view = KVCache.__new__(KVCache)
    view.k = [k[i:i + 1] for k in cache.k]
    view.v = [v[i:i + 1] for v in cache.v]
    view.max_len = cache.max_len
    return view


def test_training_forward_returns_aux_loss_and_gradients_reach_router():
    cfg = from_name("debug", z_loss_coef=1e-3)
    model = Transformer(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model(ids, return_stats=True)
    assert out.logits.shape == (2, 16, cfg.vocab_size)
    assert len(out.layer_stats) == cfg.num_layers and out.aux_loss.item() > 0
    for s in out.layer_stats:
        assert int(s.counts_E.sum()) == 2 * 16 * cfg.num_experts_per_tok
    loss = F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + out.aux_loss
    loss.backward()
    mlp = model.layers[0].mlp
    for p in (mlp.gate.weight, mlp.router_scale, mlp.experts.gate_up_EFD, mlp.shared_expert.down_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.eval()
    assert model(ids, return_stats=True).aux_loss.item() == 0  # no balancing loss at eval


ROUTE = {  # each routing written as its function, independent of the layer's router module
    "moge": lambda lg, c: R.moge_route(lg, c.num_groups, c.experts_per_group_per_tok),
    "topk": lambda lg, c: R.topk_route(lg, c.num_experts_per_tok),
    "softmax_topk": lambda lg, c: R.softmax_topk_route(lg, c.num_experts_per_tok),
    "group_limited": lambda lg, c: R.group_limited_route(
        lg, c.num_groups, c.topk_groups, c.num_experts_per_tok
    ),
}


@pytest.mark.parametrize("overrides", [
    dict(routing="topk"), dict(routing="softmax_topk"), dict(routing="group_limited"),
    dict(aux_free_bias=True), dict(aux_loss_type="sequence"), dict(routing="topk", aux_loss_type="sequence"),
])
def test_routing_variants_select_by_their_rule_and_aux_loss_is_eq8(overrides):
    """Every layer's selection equals its routing function on the logits its gate produced, and
    the model's aux loss is alpha * Eq. 8 (batch, or per sequence and averaged), summed over layers."""
    cfg = from_name("debug", **overrides)
    model = Transformer(cfg).train()
    logits = []
    for layer in model.moe_layers():
        layer.gate.register_forward_hook(lambda m, i, o: logits.append(o.detach()))
    B, S = 2, 8
    out = model(torch.randint(0, cfg.vocab_size, (B, S)), return_stats=True)
    assert len(out.layer_stats) == len(logits) == cfg.num_layers
    want_aux = torch.zeros(())
    for lg, stats in zip(logits, out.layer_stats):
        r = ROUTE[cfg.routing](lg, cfg)  # the aux-free bias starts at zero: it changes nothing yet
        assert torch.equal(stats.expert_ids_TK, r.expert_ids_TK)
        # batch: one part, all B*S tokens; sequence: B parts of S tokens, averaged
        parts = B if cfg.aux_loss_type == "sequence" else 1
        per_part = []
        for ids_TK, probs_TE in zip(r.expert_ids_TK.chunk(parts), r.probs_TE.chunk(parts)):
            T, K = ids_TK.shape
            counts_E = torch.bincount(ids_TK.flatten(), minlength=cfg.num_experts)
            f_E = counts_E.float() * cfg.num_experts / (K * T)
            per_part.append((f_E * probs_TE.mean(0)).sum())
        want_aux = want_aux + cfg.aux_loss_alpha * torch.stack(per_part).mean()
    assert_close(out.aux_loss, want_aux)


def test_dense_baseline_has_no_moe_layers_stats_or_aux_loss():
    cfg = from_name("debug", ffn_type="dense", dense_intermediate_size=128)
    model = Transformer(cfg).train()
    out = model(torch.randint(0, cfg.vocab_size, (2, 8)), return_stats=True)
    assert model.moe_layers() == [] and out.layer_stats == [] and out.aux_loss.item() == 0
    assert all(isinstance(b.mlp, SwiGLU) for b in model.layers)


def test_block_runs_the_ffn_it_is_given():
    """Block takes its feed-forward module and returns what that module reports, whatever it is."""
    cfg = from_name("debug")

    class Probe(nn.Module):
        def forward(self, x):
            return torch.zeros_like(x), "probe stats"

    block = Block(cfg, Probe())
    x = torch.randn(2, 5, cfg.hidden_size)
    cos, sin = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)(torch.arange(5).expand(2, 5))
    y, stats = block(x, cos, sin)
    assert stats == "probe stats"
    # a zero FFN leaves the attention residual only
    assert_close(y, x + block.self_attn(block.input_layernorm(x), cos, sin))
    moe_block = Block(cfg, build_ffn(cfg))
    assert isinstance(moe_block.mlp, MoGELayer)


def test_pangu_72b_builds_on_meta_with_paper_parameter_count():
    cfg = from_name("pangu-pro-moe-72b")
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_parameters() == 71_988_781_056
