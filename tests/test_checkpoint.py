"""Checkpoints: bit-exact round trips (single file and sharded), the Pangu config, clear errors."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mogelm
from mogelm.checkpoint import INDEX_FILE, from_pretrained, save_pretrained, to_checkpoint_tensors
from mogelm.errors import UserError


@pytest.fixture
def model():
    return mogelm.Transformer(mogelm.from_name("debug", aux_free_bias=True)).eval()


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ids = torch.randint(0, a.cfg.vocab_size, (2, 12))
    assert torch.equal(a(ids), b.eval()(ids))


def test_round_trip_single_file_is_bit_exact(model, tmp_path):
    model.layers[0].mlp.expert_bias_E.uniform_()  # non-trivial buffer
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_model(model, from_pretrained(tmp_path))


def test_round_trip_sharded_and_stale_files_removed(model, tmp_path):
    save_pretrained(model, tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((tmp_path / s).is_file() for s in shards)
    assert_same_model(model, from_pretrained(tmp_path))
    save_pretrained(model, tmp_path)  # back to one file: old shards and index must go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_model(model, from_pretrained(tmp_path))


def test_pangu_tensor_names(model, tmp_path):
    save_pretrained(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        F, D = model.cfg.moe_intermediate_size, model.cfg.hidden_size
        assert f.get_tensor("model.layers.1.mlp.experts.7.gate_proj.weight").shape == (F, D)
        assert f.get_tensor("model.layers.1.mlp.experts.7.down_proj.weight").shape == (D, F)
        assert f.get_tensor("model.layers.0.mlp.router_scale").shape == (1, model.cfg.num_experts)
    for n in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
              "model.layers.0.mlp.gate.weight",
              "model.layers.0.self_attn.o_proj.bias", "model.layers.0.self_attn.q_proj.bias",
              "model.layers.0.mlp.shared_expert.up_proj.weight",
              "model.layers.0.post_attention_layernorm.weight"]:
        assert n in names
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "PanguProMoE"  # debug: 4 groups, K=4, so K'=1 as in Pangu Pro MoE


def test_published_pangu_config_without_groups_loads(tmp_path):
    # A PanguProMoE directory: HF fields only, groups = num_experts_per_tok.
    cfg = mogelm.from_name("debug", num_groups=4, num_experts_per_tok=4)
    model = mogelm.Transformer(cfg).eval()
    save_pretrained(model, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    del hf["mogelm"]
    hf["model_type"] = "PanguProMoE"
    (tmp_path / "config.json").write_text(json.dumps(hf))
    loaded = from_pretrained(tmp_path)
    assert (loaded.cfg.num_groups == 4 and loaded.cfg.routing == "moge"
            and loaded.cfg.experts_per_group_per_tok == 1)
    assert_same_model(model, loaded)


@pytest.mark.parametrize("overrides", [dict(routing="topk"), dict(num_groups=2),
                                       dict(ffn_type="dense", dense_intermediate_size=64)])
def test_non_pangu_models_save_as_mogelm_and_round_trip(overrides, tmp_path):
    model = mogelm.Transformer(mogelm.from_name("debug", **overrides)).eval()
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mogelm"
    loaded = from_pretrained(tmp_path)
    assert loaded.cfg == model.cfg
    assert_same_model(model, loaded)


def test_mismatched_checkpoint_lists_every_problem(model, tmp_path):
    save_pretrained(model, tmp_path)
    tensors = to_checkpoint_tensors(model)
    del tensors["model.layers.0.mlp.gate.weight"]
    tensors["model.layers.1.self_attn.q_proj.bias"] = torch.zeros(3)
    tensors["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError) as info:
        from_pretrained(tmp_path)
    msg = str(info.value)
    assert "missing model.layers.0.mlp.gate.weight" in msg
    assert "model.layers.1.self_attn.q_proj.bias has shape [3]" in msg
    assert "unexpected model.layers.9.extra.weight" in msg


def test_corrupt_and_missing_files_give_user_errors(model, tmp_path):
    with pytest.raises(UserError, match="config.json not found"):
        from_pretrained(tmp_path)
    save_pretrained(model, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(UserError, match="not a readable safetensors file"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        from_pretrained(tmp_path)
