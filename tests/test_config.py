import pytest
import torch

from mogelm.config import PRESETS, ModelConfig, count_parameters, from_name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    """A preset builds the config it lists, survives the config.json round trip, and its analytic
    parameter count is the built model's."""
    from mogelm.model import Transformer

    cfg = from_name(name)
    assert {k: getattr(cfg, k) for k in PRESETS[name]} == PRESETS[name]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with torch.device("meta"):
        model = Transformer(cfg)
    assert count_parameters(cfg)[0] == model.num_parameters()


def test_pangu_72b_matches_paper_table_1():
    cfg = from_name("pangu-pro-moe-72b")
    total, active = count_parameters(cfg)
    assert round(total / 1e9, 2) == 71.99
    assert round(active / 1e9, 2) == 16.50
    trunk = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    assert trunk == (48, 5120, 40, 8, 128)
    assert (cfg.num_experts, cfg.num_groups, cfg.experts_per_group_per_tok) == (64, 8, 1)
    widths = (cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size, cfg.vocab_size)
    assert widths == (1344, 5376, 153376)
    assert cfg.rope_theta == 1.6e7 and cfg.norm_eps == 1e-5 and not cfg.tie_embeddings


def test_debug_is_tiny_and_small_is_demo_sized():
    assert count_parameters(from_name("debug"))[0] < 1_000_000
    assert 10e6 <= count_parameters(from_name("small"))[0] <= 30e6


@pytest.mark.parametrize(
    "changes, fields",
    [
        (dict(num_experts=10, num_groups=4), ["num_experts", "num_groups"]),
        (dict(num_experts_per_tok=6), ["num_experts_per_tok", "num_groups"]),  # 6 not a multiple of 4 groups
        (dict(num_experts=8, num_groups=8, num_experts_per_tok=16), ["num_experts_per_tok", "num_experts"]),
        (dict(num_heads=4, num_kv_heads=3), ["num_heads", "num_kv_heads"]),
        (dict(routing="bogus"), ["routing"]),
        (dict(routing="group_limited", topk_groups=9), ["topk_groups"]),
        (dict(hidden_size=0), ["hidden_size"]),
        (dict(ffn_type="dense", dense_intermediate_size=0), ["dense_intermediate_size"]),
    ],
)
def test_invalid_combinations_name_the_fields(changes, fields):
    with pytest.raises(ValueError) as info:
        from_name("debug", **changes)
    for f in fields:
        assert f in str(info.value)


def test_topk_routing_does_not_need_k_multiple_of_groups():
    cfg = from_name("debug", routing="topk", num_experts_per_tok=3)
    assert cfg.num_experts_per_tok == 3


def test_unknown_preset_and_round_trip_dict():
    with pytest.raises(ValueError, match="unknown preset"):
        from_name("nope")
    cfg = from_name("small", routing="topk")
    d = {k: v for k, v in cfg.to_dict().items()}
    assert ModelConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown config fields: bogus"):
        ModelConfig.from_dict({**d, "bogus": 1})
