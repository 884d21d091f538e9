"""The transformer: KV-cache decode equals the full forward; losses and stats flow."""

import torch
import torch.nn.functional as F
from conftest import assert_close

from mogelm.config import from_name
from mogelm.model import KVCache, Transformer


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


def test_routing_variants_and_dense_baseline_run():
    ids = torch.randint(0, 512, (2, 8))
    for overrides in (dict(routing="topk"), dict(routing="softmax_topk"), dict(routing="group_limited"),
                      dict(aux_free_bias=True), dict(aux_loss_type="sequence"),
                      dict(ffn_type="dense", dense_intermediate_size=128)):
        model = Transformer(from_name("debug", **overrides)).train()
        out = model(ids, return_stats=True)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.aux_loss)


def test_pangu_72b_builds_on_meta_with_paper_parameter_count():
    cfg = from_name("pangu-pro-moe-72b")
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_parameters() == 71_988_781_056
