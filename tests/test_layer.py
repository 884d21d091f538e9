"""The MoE layer: backends agree, the shared expert is added, the router comes from the config
and leaves the checkpoint names alone, and the aux loss is Eq. 8 of the layer's own routing,
alone and under the expert-parallel statistics hook."""

import pytest
import torch
import torch.distributed as dist
from conftest import assert_close

from mogelm.config import ROUTINGS, from_name
from mogelm.kernels import ops
from mogelm.moe import routing as R
from mogelm.moe.layer import MoGELayer


def test_layer_with_backends_agree_and_shared_expert_added():
    cfg = from_name("debug")
    layer = MoGELayer(cfg)
    layer.reset_parameters()
    x = torch.randn(2, 9, cfg.hidden_size)
    with ops.use_backend("torch"):
        y_torch, stats = layer(x)
    with ops.use_backend("loop"):
        y_loop, _ = layer(x)
    assert_close(y_torch, y_loop)
    # MoGE: every group receives exactly T*K' rows
    per_group = stats.counts_E.view(cfg.num_groups, -1).sum(-1)
    assert per_group.tolist() == [18 * cfg.experts_per_group_per_tok] * cfg.num_groups
    layer_no_shared = MoGELayer(cfg.replace(shared_expert_intermediate_size=0))
    layer_no_shared.load_state_dict({k: v for k, v in layer.state_dict().items() if "shared" not in k})
    y_routed, _ = layer_no_shared(x)
    assert_close(y_torch - y_routed, layer.shared_expert(x))


@pytest.mark.parametrize("routing", ROUTINGS)
def test_router_from_config_keeps_checkpoint_names(routing):
    """The router is built from cfg.routing and holds no tensors: router_scale [1, E] and the
    aux-free bias stay on the layer, at the keys checkpoints name (`mlp.router_scale`, ...)."""
    cfg = from_name("debug", routing=routing, aux_free_bias=True)
    layer = MoGELayer(cfg)
    assert type(layer.router) is R.ROUTERS[routing]
    keys = set(layer.state_dict())
    assert {"gate.weight", "router_scale", "expert_bias_E"} <= keys
    assert not any(k.startswith("router.") for k in keys)
    assert layer.router_scale.shape == (1, cfg.num_experts)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_layer_routes_with_its_router_scale_and_bias(routing):
    cfg = from_name("debug", routing=routing, aux_free_bias=True)
    layer = MoGELayer(cfg)
    layer.reset_parameters()
    with torch.no_grad():
        layer.router_scale.uniform_(0.5, 1.5)
        layer.expert_bias_E.normal_(0, 0.05)
    x = torch.randn(13, cfg.hidden_size)
    logits = layer.gate(x)
    want = layer.router(logits, layer.router_scale, layer.expert_bias_E)
    captured = {}
    layer.experts.register_forward_pre_hook(lambda m, a: captured.update(weights=a[1], ids=a[2]))
    _, stats = layer(x)
    assert torch.equal(stats.expert_ids_TK, want.expert_ids_TK)
    assert torch.equal(captured["ids"], want.expert_ids_TK)
    assert torch.equal(captured["weights"], want.weights_TK)
    counts_E = torch.bincount(want.expert_ids_TK.flatten(), minlength=cfg.num_experts)
    assert torch.equal(stats.counts_E, counts_E)


def _aux_case(routing="moge"):
    cfg = from_name("debug", routing=routing, aux_loss_alpha=0.01)
    layer = MoGELayer(cfg).train()
    layer.reset_parameters()
    x = torch.randn(2, 7, cfg.hidden_size)
    with torch.no_grad():
        r = layer.router(layer.gate(x.reshape(-1, cfg.hidden_size)), layer.router_scale)
    return cfg, layer, x, r


@pytest.mark.parametrize("routing", ["moge", "topk"])
def test_layer_aux_loss_is_eq8_of_its_routing(routing):
    cfg, layer, x, r = _aux_case(routing)
    _, stats = layer(x)
    T, K = r.expert_ids_TK.shape
    counts_E = torch.bincount(r.expert_ids_TK.flatten(), minlength=cfg.num_experts)
    f_E = counts_E.float() * cfg.num_experts / (K * T)
    assert_close(stats.aux_loss, cfg.aux_loss_alpha * (f_E * r.probs_TE.mean(0)).sum())
    assert_close(stats.probs_mean_E, r.probs_TE.mean(0))


def test_ep_statistics_hook_uses_the_one_aux_loss_function(monkeypatch):
    """The EP hook rebuilds the aux loss from all-reduced counts with batch_aux_loss_from_counts.
    Here the 'other rank' holds the same tokens (all_reduce doubles the counts, world size 2), so
    the hook's loss must equal the one-process loss of the batch taken twice."""
    from mogelm.parallel import context

    cfg, layer, x, _ = _aux_case()
    calls = []
    real = context.batch_aux_loss_from_counts
    monkeypatch.setattr(context, "batch_aux_loss_from_counts", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: t.mul_(2))
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    layer.register_forward_hook(context._global_batch_stats)
    _, stats = layer(x)
    assert len(calls) == 1 and calls[0][2] == 2 * 14  # global token count
    twice = torch.cat([x, x])
    monkeypatch.undo()
    _, one_process = MoGELayer.forward(layer, twice)  # same weights, no hook
    assert torch.equal(stats.counts_E, one_process.counts_E)
    assert_close(stats.aux_loss, one_process.aux_loss)
