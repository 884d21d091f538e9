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


# Any model size from the command line: --config FILE and --set FIELD=VALUE ---------------------------------
def test_set_overrides_are_typed_by_the_dataclass_and_errors_name_the_field():
    from mogelm.config import parse_overrides

    assert parse_overrides(["hidden_size=128", "routing=topk", "qkv_bias=false", "rope_theta=1e4",
                            "num_layers=3", "num_layers=4"]) == dict(
        hidden_size=128, routing="topk", qkv_bias=False, rope_theta=1e4, num_layers=4)  # the last wins
    for text, message in (("hiden_size=3", "did you mean hidden_size"), ("hidden_size=x", "takes an integer"),
                          ("qkv_bias=maybe", "takes true or false"), ("norm_eps=small", "takes a number"),
                          ("num_layers", "expected FIELD=VALUE")):
        with pytest.raises(ValueError, match=message):
            parse_overrides([text])


def test_model_from_a_config_file_with_overrides(tmp_path):
    """--config reads a ModelConfig JSON or a checkpoint's config.json; --set changes fields and
    derived fields (head_dim) follow their inputs unless they were set explicitly."""
    from mogelm import save_pretrained
    from mogelm.errors import UserError
    from mogelm.hf_config import read_model_file
    from mogelm.model import Transformer
    from mogelm.train import TrainConfig, build_model_config

    base = from_name("small", routing="topk")
    (tmp_path / "model.json").write_text(__import__("json").dumps(base.to_dict()))
    assert read_model_file(tmp_path / "model.json") == base
    save_pretrained(Transformer(from_name("debug")), tmp_path / "ckpt")
    assert read_model_file(tmp_path / "ckpt" / "config.json") == from_name("debug")
    assert read_model_file(tmp_path / "ckpt") == from_name("debug")
    tc = TrainConfig(model_config=base.to_dict(), model_overrides=dict(hidden_size=512, num_layers=2),
                     seq_len=64)
    cfg = build_model_config(tc)
    assert (cfg.hidden_size, cfg.num_layers, cfg.head_dim, cfg.routing) == (512, 2, 128, "topk")
    pinned = TrainConfig(model_config=base.replace(head_dim=32).to_dict(),
                         model_overrides=dict(hidden_size=512))
    assert build_model_config(pinned).head_dim == 32
    with pytest.raises(UserError, match="num_groups"):
        build_model_config(TrainConfig(model_config=base.to_dict(), model_overrides=dict(num_groups=3)))
    (tmp_path / "bad.json").write_text('{"hidden_size": 64}')
    with pytest.raises(UserError, match="vocab_size"):
        read_model_file(tmp_path / "bad.json")


def test_train_cli_model_flags(tmp_path, capsys):
    """`mogelm train --config` trains the file's model with --set on top; --config with --preset,
    an unknown field or a bad value end with one line and exit status 2 before anything runs."""
    import json
    from pathlib import Path

    from mogelm.checkpoint import read_config
    from mogelm.cli import main

    (tmp_path / "model.json").write_text(json.dumps(from_name("debug").to_dict()))
    data = str(Path(__file__).parent / "data")
    common = ["train", "--data", data, "--cache-dir", str(tmp_path / "cache"), "--seq-len", "32",
              "--batch-size", "2", "--max-steps", "2", "--eval-every", "2", "--eval-batches", "1",
              "--threads", "1", "--progress", "none"]
    assert main([*common, "--config", str(tmp_path / "model.json"), "--set", "num_layers=1",
                 "--set", "moe_intermediate_size=16", "--out", str(tmp_path / "run")]) == 0
    cfg = read_config(tmp_path / "run" / "final")
    assert (cfg.num_layers, cfg.moe_intermediate_size, cfg.hidden_size) == (1, 16, 64)
    capsys.readouterr()
    for extra, message in (
        (["--config", str(tmp_path / "model.json"), "--preset", "small"], "--config and --preset"),
        (["--set", "num_layerz=2"], "did you mean num_layers"),
        (["--set", "num_layers=two"], "num_layers takes an integer"),
        (["--set", "num_groups=3"], "num_experts (8) must be divisible by num_groups (3)"),
        (["--config", str(tmp_path / "missing.json")], "--config"),
    ):
        assert main([*common, *extra, "--out", str(tmp_path / "bad")]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()
