"""Routing invariants (hypothesis), the router modules against the routing functions, and
balancing losses against hand-computed values."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mogelm.analysis.metrics import device_loads, imbalance_score
from mogelm.config import ROUTINGS, from_name
from mogelm.moe import routing as R
from mogelm.moe.reference import reference_moge_route


@st.composite
def moge_problem(draw):
    num_groups = draw(st.sampled_from([1, 2, 4, 8]))
    per_group = draw(st.sampled_from([1, 2, 3, 8]))
    k_per_group = draw(st.integers(1, per_group))
    tokens = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    ties = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_groups * per_group, generator=g)
    if ties:  # coarse values make exact ties common
        logits = logits.round()
    scale = torch.rand(1, num_groups * per_group, generator=g) + 0.5
    return logits, num_groups, k_per_group, scale


@settings(max_examples=60, deadline=None)
@given(moge_problem())
def test_moge_invariants(problem):
    logits, G, kpg, scale = problem
    T, E = logits.shape
    r = R.moge_route(logits, G, kpg, scale)
    per_group = E // G
    # exactly K' distinct experts inside every group, column block g belongs to group g
    groups = r.expert_ids_TK // per_group
    assert torch.equal(groups, torch.arange(G).repeat_interleave(kpg).expand(T, -1))
    for g in range(G):
        block = r.expert_ids_TK[:, g * kpg:(g + 1) * kpg]
        assert all(len(set(row.tolist())) == kpg for row in block)
    # weights are the global softmax times router_scale, not renormalised
    probs = torch.softmax(logits.float(), -1)
    torch.testing.assert_close(r.probs_TE, probs)
    torch.testing.assert_close(r.weights_TK, probs.gather(1, r.expert_ids_TK) * scale[0, r.expert_ids_TK])
    # same selection and weights as the token-by-token oracle (ties toward lower ids)
    w_ref, ids_ref, _ = reference_moge_route(logits, G, kpg, scale)
    assert torch.equal(r.expert_ids_TK, ids_ref)
    torch.testing.assert_close(r.weights_TK.double(), w_ref, atol=1e-6, rtol=1e-5)
    # the Imbalance Score over the G devices is exactly zero, at any batch size
    loads = device_loads(r.expert_ids_TK, E, G)
    assert imbalance_score(loads, T) == 0.0
    assert torch.all(loads == T * kpg)
    # the module the layer holds routes exactly like the function
    assert R.MoGERouter(G, kpg).balanced_groups
    _assert_same_routing(R.MoGERouter(G, kpg)(logits, scale), r)


def test_ties_break_toward_lower_expert_id():
    logits = torch.zeros(3, 8)
    r = R.moge_route(logits, num_groups=2, experts_per_group_per_tok=2)
    assert r.expert_ids_TK.tolist() == [[0, 1, 4, 5]] * 3
    r = R.softmax_topk_route(logits, k=3)
    assert r.expert_ids_TK.tolist() == [[0, 1, 2]] * 3


def test_moge_renormalize_option():
    logits = torch.randn(5, 16)
    r = R.moge_route(logits, 4, 1, renormalize=True)
    torch.testing.assert_close(r.weights_TK.sum(-1), torch.ones(5))


def test_topk_paper_eq2_is_softmax_over_chosen_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    r = R.topk_route(logits, k=2)
    assert r.expert_ids_TK.tolist() == [[1, 2]]
    e = math.exp(1.0)
    torch.testing.assert_close(r.weights_TK, torch.tensor([[e / (e + 1), 1 / (e + 1)]]))
    torch.testing.assert_close(r.probs_TE, torch.softmax(logits, -1))


def test_softmax_topk_keeps_global_probabilities():
    logits = torch.randn(6, 8)
    r = R.softmax_topk_route(logits, k=2)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(r.weights_TK, probs.topk(2).values)


def test_group_limited_uses_only_top_groups():
    torch.manual_seed(1)
    logits = torch.randn(50, 16)
    r = R.group_limited_route(logits, num_groups=4, topk_groups=2, k=4)
    probs = torch.softmax(logits, -1).view(50, 4, 4)
    group_score = probs.topk(2, -1).values.sum(-1)
    allowed = group_score.topk(2, -1).indices
    for t in range(50):
        used = set((r.expert_ids_TK[t] // 4).tolist())
        assert used <= set(allowed[t].tolist())
        # the K chosen are the K best experts among the allowed groups
        cand = torch.cat([torch.arange(g * 4, g * 4 + 4) for g in allowed[t].tolist()])
        best = cand[probs.view(50, 16)[t, cand].topk(4).indices]
        assert set(best.tolist()) == set(r.expert_ids_TK[t].tolist())


def test_batch_aux_loss_hand_computed():
    # 2 tokens, 4 experts, K=2. f_i = N/(K*T) * count_i = 4/4 * count_i = count_i.
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    ids = torch.tensor([[0, 1], [3, 2]])
    # counts = [1,1,1,1], p = [0.25]*4 -> sum f*p = 1.0
    assert R.batch_aux_loss(probs, ids).item() == pytest.approx(1.0)
    ids = torch.tensor([[0, 1], [0, 1]])
    # counts = [2,2,0,0], p = [0.25, 0.25, 0.25, 0.25] -> 2*0.25 + 2*0.25 = 1.0 ... make p skewed:
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1]])
    # p = [0.6, 0.2, 0.1, 0.1]; f = [2, 2, 0, 0] -> 1.2 + 0.4 = 1.6
    assert R.batch_aux_loss(probs, ids).item() == pytest.approx(1.6)


def test_sequence_aux_loss_is_mean_of_per_sequence_losses():
    probs = torch.softmax(torch.randn(3, 5, 8), -1)
    ids = torch.randint(0, 8, (3, 5, 2))
    per_seq = torch.stack([R.batch_aux_loss(probs[b], ids[b]) for b in range(3)])
    torch.testing.assert_close(R.sequence_aux_loss(probs, ids), per_seq.mean())


def test_aux_loss_from_counts_equals_the_layer_and_ep_derivations():
    """One Eq. 8 function replaced two derivations: the layer's, from its own routing, and the EP
    statistics hook's, from counts all-reduced over W ranks and this rank's mean probabilities.
    Both are written out here as they were; and averaged over ranks, the hook's loss is the
    one-process loss of the global batch."""
    g = torch.Generator().manual_seed(5)
    W, T, E, K = 3, 11, 8, 2
    probs_WTE = torch.softmax(torch.randn(W, T, E, generator=g), -1)
    ids_WTK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(W * T)]).view(W, T, K)
    counts_WE = torch.stack([torch.bincount(ids_WTK[w].flatten(), minlength=E) for w in range(W)])
    # the layer: f = counts * E/(K*T), p = mean over its tokens
    layer_old = ((counts_WE[0].float() * (E / (K * T))) * probs_WTE[0].mean(0)).sum()
    layer_new = R.batch_aux_loss_from_counts(counts_WE[0], probs_WTE[0].mean(0), T, K)
    assert torch.equal(layer_new, layer_old)
    assert torch.equal(R.batch_aux_loss(probs_WTE[0], ids_WTK[0]), layer_old)
    # the EP hook on rank w: global counts, f = counts * E/(K*T*W), p of rank w's tokens
    global_E = counts_WE.sum(0)
    for w in range(W):
        hook_old = ((global_E.float() * (E / (K * T * W))) * probs_WTE[w].mean(0)).sum()
        assert torch.equal(R.batch_aux_loss_from_counts(global_E, probs_WTE[w].mean(0), T * W, K), hook_old)
    per_rank = [R.batch_aux_loss_from_counts(global_E, probs_WTE[w].mean(0), T * W, K) for w in range(W)]
    one_process = R.batch_aux_loss(probs_WTE.reshape(W * T, E), ids_WTK.reshape(W * T, K))
    torch.testing.assert_close(torch.stack(per_rank).mean(), one_process)


def test_z_loss_and_expert_bias():
    logits = torch.zeros(4, 8)
    assert R.router_z_loss(logits).item() == pytest.approx(math.log(8) ** 2)
    bias = torch.zeros(4)
    R.update_expert_bias(bias, torch.tensor([10, 0, 5, 5]), rate=0.1)
    assert bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])


def test_expert_bias_changes_selection_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    r = R.moge_route(logits, num_groups=2, experts_per_group_per_tok=1, expert_bias_E=bias)
    assert r.expert_ids_TK.tolist() == [[0, 3]]
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(r.weights_TK, probs[:, [0, 3]])


# Router modules ------------------------------------------------------------------------------------
def _assert_same_routing(got: R.Routing, want: R.Routing) -> None:
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


def _moge_sizes(c):
    return c.num_groups, c.experts_per_group_per_tok


def _k(c):
    return (c.num_experts_per_tok,)


def _group_limited_sizes(c):
    return c.num_groups, c.topk_groups, c.num_experts_per_tok


# (config overrides, the routing function the router must equal, its sizes, whether it takes renormalize)
ROUTER_CASES = [
    (dict(routing="moge"), R.moge_route, _moge_sizes, True),
    (dict(routing="moge", num_experts_per_tok=8, renormalize=True), R.moge_route, _moge_sizes, True),
    (dict(routing="topk"), R.topk_route, _k, False),
    (dict(routing="softmax_topk"), R.softmax_topk_route, _k, True),
    (dict(routing="softmax_topk", renormalize=True), R.softmax_topk_route, _k, True),
    (dict(routing="group_limited", topk_groups=2), R.group_limited_route, _group_limited_sizes, True),
    (dict(routing="group_limited", topk_groups=3, renormalize=True), R.group_limited_route,
     _group_limited_sizes, True),
]


@pytest.mark.parametrize("overrides, fn, sizes, takes_renormalize", ROUTER_CASES)
@pytest.mark.parametrize("with_scale, with_bias", [(False, False), (True, False), (True, True)])
def test_router_built_from_config_equals_its_routing_function(overrides, fn, sizes, takes_renormalize,
                                                              with_scale, with_bias):
    cfg = from_name("debug", **overrides)
    router = R.build_router(cfg)
    assert isinstance(router, R.ROUTERS[cfg.routing]) and list(router.state_dict()) == []  # holds no tensors
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(37, cfg.num_experts, generator=g).round(decimals=1)  # coarse: ties happen
    scale = torch.rand(1, cfg.num_experts, generator=g) + 0.5 if with_scale else None
    bias = torch.randn(cfg.num_experts, generator=g) * 0.1 if with_bias else None
    extra = (cfg.renormalize,) if takes_renormalize else ()
    want = fn(logits, *sizes(cfg), scale, *extra, bias)
    _assert_same_routing(router(logits, scale, bias), want)


def test_every_config_routing_has_a_router():
    assert set(R.ROUTERS) == set(ROUTINGS)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_balanced_groups_says_whether_every_group_gets_exactly_t_k_rows(routing):
    """The property the dispatchers trust: True only for a router that gives every expert group
    exactly T*K' rows on *any* batch; the others break it on a batch that prefers one group."""
    cfg = from_name("debug", routing=routing)
    router = R.build_router(cfg)
    T, G, E = 64, cfg.num_groups, cfg.num_experts
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(0))
    logits[:, : E // G] += 5.0  # every token prefers group 0
    rows_per_group = device_loads(router(logits).expert_ids_TK, E, G)
    equal = bool(torch.all(rows_per_group == T * cfg.experts_per_group_per_tok))
    assert router.balanced_groups == equal == (routing == "moge")
