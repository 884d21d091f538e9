"""A model's shapes and parameter counts (mogelm/info.py) and the `mogelm info` command."""

import functools
import json

import pytest
import torch

from mogelm import save_pretrained
from mogelm.cli import main
from mogelm.config import count_parameters, from_name
from mogelm.errors import UserError
from mogelm.info import describe, load_config, model_info
from mogelm.model import Transformer


def test_pangu_counts_and_shapes():
    cfg = load_config("pangu-pro-moe-72b")
    assert model_info(cfg)["parameters_total"] == 71_988_781_056  # PAPER.md: 71.99 B total, 16.50 B active
    assert model_info(cfg)["parameters_active"] == 16_498_139_136
    assert describe(cfg).splitlines() == [
        "pangu-pro-moe-72b: 71.989 B parameters, 16.498 B active per token",
        "  48 layers, hidden 5120, 40/8 heads of 128",
        "  64 experts of width 1344 in 8 groups, 8 per token (moge), shared expert 5376",
    ]


def test_checkpoint_directory_and_json(tmp_path, capsys):
    cfg = from_name("debug")
    save_pretrained(Transformer(cfg), tmp_path / "ckpt")
    assert main(["info", str(tmp_path / "ckpt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"] == load_config(str(tmp_path / "ckpt")).to_dict()
    assert (out["parameters_total"], out["parameters_active"]) == count_parameters(cfg)


def test_unknown_model_is_a_user_error(capsys):
    with pytest.raises(UserError, match="neither a preset"):
        load_config("no-such-preset")
    assert main(["info", "no-such-preset"]) == 2
    assert capsys.readouterr().err.startswith("error: 'no-such-preset' is neither a preset")


# FLOPs and the memory of a training step ----------------------------------------------------------------
def _from_weight(fn) -> bool:
    """Is this autograd node a (cast, transposed, viewed) copy of a parameter? Under autocast the
    bf16 copies of the weights are saved too; they are weights, not activations."""
    while fn is not None:
        if type(fn).__name__ == "AccumulateGrad":
            return True
        if fn.name() not in ("TBackward0", "TransposeBackward0", "ToCopyBackward0", "ViewBackward0"):
            return False
        nxt = [f for f, _ in fn.next_functions if f is not None]
        if len(nxt) != 1:
            return False
        fn = nxt[0]
    return False


def _saved_activation_bytes(model, ids, bf16: bool, checkpoint: bool = False) -> int:
    """Bytes of the tensors autograd saves for backward in one training forward (the loop's loss),
    each storage once, parameters and their copies left out."""
    import torch.nn.functional as F
    import torch.utils.checkpoint

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and not _from_weight(t.grad_fn):
            seen[(st.data_ptr(), st.nbytes())] = True
        return t

    if checkpoint:  # torch.utils.checkpoint around each block (reentrant: its inputs are saved tensors)
        for block in model.layers:
            plain = type(block).forward.__get__(block)
            block.forward = functools.partial(torch.utils.checkpoint.checkpoint, plain, use_reentrant=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(ids[:, :-1], return_stats=True)
            vocab = out.logits.shape[-1]
            loss = F.cross_entropy(out.logits.float().view(-1, vocab), ids[:, 1:].reshape(-1)) + out.aux_loss
    loss.backward()
    return sum(nbytes for _, nbytes in seen)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("changes", [
    {}, dict(hidden_size=128, num_heads=8, num_kv_heads=2, num_layers=3),
    dict(num_experts=16, num_groups=8, num_experts_per_tok=8, moe_intermediate_size=48,
         shared_expert_intermediate_size=0),
])
def test_activation_estimate_matches_the_saved_tensors_of_a_cpu_run(precision, changes):
    """The per-layer activation model (torch expert kernels, the CPU path) against the bytes
    autograd actually keeps in a forward of the debug model, fp32 and bf16 autocast; within 1 %
    (measured 2026-12-02: within 0.2 %, the rest is the storage accounting of views)."""
    from mogelm.info import activation_bytes_per_token

    cfg = from_name("debug", **changes)
    torch.manual_seed(0)
    model = Transformer(cfg)
    B, T = 4, 64
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1))
    measured = _saved_activation_bytes(model, ids, bf16=precision == "bf16")
    est = activation_bytes_per_token(cfg, precision, experts="torch")
    estimate = B * T * (cfg.num_layers * est["per_layer"] + est["outside_total"])
    assert abs(estimate - measured) <= 0.01 * measured, (estimate, measured)


def test_checkpointed_activations_and_state_bytes_of_a_cpu_run():
    """With torch.utils.checkpoint around every block only the block inputs stay (4 bytes x hidden
    per token per layer, fp32 residual stream), within 1 % in all; weights, gradients and AdamW
    moments (fp32 and bf16) are the estimate's bytes exactly."""
    from mogelm.info import activation_bytes_per_token, training_memory
    from mogelm.train.optim import AdamWBF16State

    cfg = from_name("debug", num_layers=3)
    torch.manual_seed(0)
    model = Transformer(cfg)
    B, T = 4, 64
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1))
    measured = _saved_activation_bytes(model, ids, bf16=False, checkpoint=True)
    est = activation_bytes_per_token(cfg, "fp32", experts="torch")
    estimate = B * T * (cfg.num_layers * 4 * cfg.hidden_size + est["outside_total"])
    assert abs(estimate - measured) <= 0.01 * measured, (estimate, measured)
    ckpt = training_memory(cfg, batch_size=B, seq_len=T, precision="fp32", experts="torch",
                           checkpointing=True)
    assert ckpt["activations"] == estimate + B * T * est["per_layer"]  # + one layer while it recomputes

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    for kind, opt in (("fp32", torch.optim.AdamW(model.parameters())),
                      ("bf16", AdamWBF16State(model.parameters()))):
        opt.step()
        mem = training_memory(cfg, batch_size=B, seq_len=T, optim_state=kind, precision="fp32",
                              experts="torch")
        assert mem["weights"] == nbytes(model.parameters())
        assert mem["gradients"] == nbytes(p.grad for p in model.parameters())
        moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
        assert mem["optimizer"] == nbytes(moments), kind


def test_parameter_split_and_flops_per_token():
    """Routed-expert and total parameter counts equal the built model's; matmul FLOPs per token
    equal torch's FlopCounterMode over a forward (per-expert loop kernels, so each routed row is
    one counted matmul); the causal attention term is (S + 1) / 2 keys per query."""
    from torch.utils.flop_counter import FlopCounterMode

    from mogelm.info import flops_per_token, parameter_split
    from mogelm.kernels import ops

    for cfg in (from_name("debug"), from_name("debug", routing="topk", num_experts_per_tok=3, num_layers=3),
                from_name("debug", ffn_type="dense", dense_intermediate_size=96)):
        torch.manual_seed(0)
        model = Transformer(cfg)
        split = parameter_split(cfg)
        experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        assert (split["total"], split["routed_experts"]) == (model.num_parameters(), experts)
        B, T = 2, 32
        with ops.use_backend("loop"), FlopCounterMode(display=False) as counter:
            model(torch.randint(0, cfg.vocab_size, (B, T)))
        flops = flops_per_token(cfg, T)
        assert flops["matmul_forward"] * B * T == counter.get_total_flops()  # SDPA is not counted on CPU
        assert flops["attention_forward"] == cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * (T + 1) / 2
        assert flops["training"] == 3 * flops["forward"]
    pangu = flops_per_token(from_name("pangu-pro-moe-72b"), 4096)
    assert round(pangu["six_n"] / 1e9, 2) == 98.99  # 6 x 16.498 B active


def test_memory_plan_per_rank_follows_the_layout(capsys):
    """FSDP shards weights, gradients and moments over its ranks; DP x EP shards only the experts;
    bf16 moments halve the optimizer; the CLI prints the table and the same numbers as JSON."""
    from mogelm.info import parameter_split, training_memory

    cfg = load_config("pangu-pro-moe-72b")
    split = parameter_split(cfg)
    fsdp8 = training_memory(cfg, nproc=8, ep=8, fsdp=8, seq_len=4096)
    fsdp16 = training_memory(cfg, nproc=16, ep=8, fsdp=16, seq_len=4096, optim_state="bf16")
    dp_ep = training_memory(cfg, nproc=8, ep=8, fsdp=1, seq_len=4096)
    assert fsdp8["parameters_local"] == split["total"] / 8
    assert fsdp16["optimizer"] == 4 * split["total"] / 16 and fsdp8["optimizer"] == 8 * split["total"] / 8
    assert dp_ep["parameters_local"] == split["dense"] + split["routed_experts"] / 8
    with_ac = training_memory(cfg, nproc=8, ep=8, fsdp=8, seq_len=4096, checkpointing=True)
    assert with_ac["activations"] < fsdp8["activations"] / 5
    assert main(["info", "pangu-pro-moe-72b", "--nproc", "8", "--ep", "8", "--fsdp", "8", "--seq-len",
                 "4096", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["training"]["memory_bytes"] == fsdp8 and out["parameters_total"] == split["total"]
    assert main(["info", "pangu-pro-moe-72b", "--nproc", "16", "--ep", "8", "--fsdp", "16"]) == 0
    text = capsys.readouterr().out
    assert "FLOPs per token at sequence length 2048" in text and "optimizer" in text and "total" in text
    for bad, message in ((["--nproc", "8", "--ep", "3"], "must divide"),
                         (["--nproc", "8", "--ep", "4", "--fsdp", "2"], "must divide the FSDP size"),
                         (["--set", "hidden_size=abc"], "hidden_size takes an integer")):
        assert main(["info", "debug", *bad]) == 2
        assert message in capsys.readouterr().err


def test_info_reads_a_config_json_with_overrides(tmp_path, capsys):
    cfg = from_name("debug", num_layers=3)
    (tmp_path / "model.json").write_text(json.dumps(cfg.to_dict()))
    assert main(["info", str(tmp_path / "model.json"), "--set", "num_layers=5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["num_layers"] == 5 and out["config"]["hidden_size"] == 64
