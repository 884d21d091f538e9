"""Multi-token prediction (mogelm.mtp): loss and gradients against a plain re-computation, rows
that see only their own past, the model without MTP unchanged, checkpoints (names, config fields,
bit-exact round trips), parameter counts and `mogelm info`, training flags and the training loop,
and the reference MTP drafter."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from safetensors import safe_open

import mogelm
from mogelm.checkpoint import from_pretrained, save_pretrained
from mogelm.cli import main
from mogelm.config import count_mtp_parameters, count_parameters, from_name
from mogelm.errors import UserError
from mogelm.hf_config import config_from_hf
from mogelm.inference.drafters import MTPDrafter
from mogelm.model import Transformer
from mogelm.mtp import mtp_losses

FIXTURES = Path(__file__).parent / "data"


def mtp_model(depth=2, **overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(from_name("debug", mtp_depth=depth, **overrides))


# the model ------------------------------------------------------------------------------------
def test_without_mtp_the_model_is_unchanged():
    """mtp_depth 0: no new parameters or names; with MTP the trunk starts from the same weights."""
    torch.manual_seed(0)
    plain = Transformer(from_name("debug"))
    assert plain.mtp is None
    assert not [n for n in plain.state_dict() if "mtp" in n]
    ids = torch.randint(0, 512, (2, 10))
    out = plain(ids, return_stats=True)
    assert out.trunk_hidden is None
    assert torch.equal(plain(ids, return_hidden=True).logits, out.logits)
    with pytest.raises(ValueError, match="no MTP modules"):
        plain.mtp_forward(out.logits, ids)
    with_mtp = mtp_model(depth=1)
    for name, t in plain.state_dict().items():
        assert torch.equal(with_mtp.state_dict()[name], t), name
    assert torch.equal(with_mtp(ids), plain(ids))


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _reference_loss(model, window_BT1, lam):
    """Main CE + lam * mean_d CE_d, written out: trunk blocks in a loop, the MTP math by hand
    (norms, [embedding; hidden] concatenation, projection, shifts, shared head, log-softmax)."""
    cfg = model.cfg
    ids = window_BT1[:, :-1]
    B, T = ids.shape
    pos = torch.arange(T).expand(B, T)
    cos, sin = model.rotary(pos)
    x = model.embed_tokens.weight[ids]
    for block in model.layers:
        x, _ = block(x, cos, sin)
    logits = _rms(x, model.norm.weight, cfg.norm_eps) @ model.lm_head.weight.T
    main = -logits.log_softmax(-1).gather(-1, window_BT1[:, 1:, None]).mean()
    h, per_depth = x, []
    for d in range(1, cfg.mtp_depth + 1):
        m = model.mtp[d - 1]
        n = T - d
        e = model.embed_tokens.weight[ids[:, d:]]  # token t+d for row t
        u = torch.cat([_rms(e, m.enorm.weight, cfg.norm_eps),  # embedding first, as DeepSeek-V3's eh_proj
                       _rms(h[:, :n], m.hnorm.weight, cfg.norm_eps)], -1)
        h, _ = m.block(u @ m.eh_proj.weight.T, cos[:, :n], sin[:, :n])
        lg = _rms(h, m.norm.weight, cfg.norm_eps) @ model.lm_head.weight.T
        target = window_BT1[:, d + 1 : d + 1 + n]  # token t+d+1
        per_depth.append(-lg.log_softmax(-1).gather(-1, target[..., None]).mean())
    return main + lam * torch.stack(per_depth).mean(), torch.stack(per_depth)


@pytest.mark.parametrize("depth", [1, 3])
def test_mtp_loss_and_gradients_match_a_plain_recomputation(depth):
    model = mtp_model(depth).eval()
    window = torch.randint(0, model.cfg.vocab_size, (2, 13))
    x, y = window[:, :-1], window[:, 1:]
    lam = 0.3
    out = model(x, return_hidden=True)
    mtp = model.mtp_forward(out.trunk_hidden, x)
    assert [tuple(lg.shape) for lg in mtp.logits] == [(2, 12 - d, 512) for d in range(1, depth + 1)]
    ce_D = mtp_losses(mtp, y)
    loss = F.cross_entropy(out.logits.reshape(-1, 512), y.reshape(-1)) + lam * ce_D.mean()
    ref, ref_D = _reference_loss(model, window, lam)
    assert_close(ce_D, ref_D)
    assert_close(loss, ref)
    params = [p for p in model.parameters()]
    got = torch.autograd.grad(loss, params)
    want = torch.autograd.grad(ref, params)
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        assert_close(g, w)
        if name.startswith("mtp.") and "router_scale" not in name and ".experts." not in name:
            assert g.abs().sum() > 0, f"{name} gets no gradient"


def test_mtp_rows_see_only_their_past():
    """Depth d, row t reads tokens 0..t+d only: changing token p changes rows t >= p - d alone."""
    model = mtp_model(depth=2).eval()
    ids = torch.randint(0, 512, (1, 16))
    p = 9
    other = ids.clone()
    other[0, p] = (ids[0, p] + 1) % 512
    with torch.no_grad():
        a = model.mtp_forward(model(ids, return_hidden=True).trunk_hidden, ids).logits
        b = model.mtp_forward(model(other, return_hidden=True).trunk_hidden, other).logits
    for d, (la, lb) in enumerate(zip(a, b), start=1):
        # (not bit-equal: the expert GEMMs group the tokens differently when one token's routing moves)
        assert_close(la[:, : p - d], lb[:, : p - d])
        assert (la[:, p - d] - lb[:, p - d]).abs().max() > 1e-2, f"depth {d} row {p - d} missed token {p}"


# checkpoints ----------------------------------------------------------------------------------
def test_checkpoint_with_mtp_round_trips_bit_exact(tmp_path):
    model = mtp_model(depth=2, aux_free_bias=True).eval()
    model.mtp[1].block.mlp.expert_bias_E.uniform_()
    save_pretrained(model, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["num_nextn_predict_layers"] == 2 and hf["mogelm"]["mtp_depth"] == 2
    L = model.cfg.num_layers
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for i in range(2):  # DeepSeek-V3's layout: MTP module i is layer L + i
        for n in ["enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                  "input_layernorm.weight", "self_attn.q_proj.weight", "post_attention_layernorm.weight",
                  "mlp.gate.weight", "mlp.router_scale", "mlp.expert_bias", "mlp.experts.7.down_proj.weight",
                  "mlp.shared_expert.up_proj.weight"]:
            assert f"model.layers.{L + i}.{n}" in names, n
    assert not [n for n in names if "mtp" in n or f"layers.{L + 2}." in n]
    assert not [n for n in names if n.endswith(("embed_tokens.weight", "head.weight"))
                and n not in ("model.embed_tokens.weight", "lm_head.weight")]  # shared: stored once
    again = from_pretrained(tmp_path)
    sa, sb = model.state_dict(), again.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        ha, hb = model(ids, return_hidden=True), again.eval()(ids, return_hidden=True)
        assert torch.equal(ha.logits, hb.logits)
        mine = model.mtp_forward(ha.trunk_hidden, ids).logits
        for la, lb in zip(mine, again.mtp_forward(hb.trunk_hidden, ids).logits):
            assert torch.equal(la, lb)


def test_checkpoint_without_mtp_keeps_its_format(tmp_path):
    model = mtp_model(depth=0)
    save_pretrained(model, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert "num_nextn_predict_layers" not in hf and "mtp_depth" not in hf["mogelm"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not [n for n in f.keys() if f"layers.{model.cfg.num_layers}." in n]
    assert from_pretrained(tmp_path).mtp is None
    # a config.json written before MTP existed (no field at all) reads as depth 0
    assert config_from_hf(hf).mtp_depth == 0


def test_checkpoint_mtp_mismatch_is_reported(tmp_path):
    save_pretrained(mtp_model(depth=0), tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["mogelm"]["mtp_depth"] = 1  # claims an MTP module the weights do not have
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UserError, match=r"missing model\.layers\.2\.eh_proj\.weight"):
        from_pretrained(tmp_path)


def test_hf_field_sets_the_depth_of_a_pangu_config():
    hf = {"model_type": "PanguProMoE", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 8, "num_experts_per_tok": 4,
          "moe_intermediate_size": 32, "num_nextn_predict_layers": 1}
    assert config_from_hf(hf).mtp_depth == 1


def test_negative_depth_is_refused():
    with pytest.raises(ValueError, match="mtp_depth"):
        from_name("debug", mtp_depth=-1)


# counting -------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, {"ffn_type": "dense", "dense_intermediate_size": 96},
                                       {"tie_embeddings": True, "qkv_bias": False, "o_bias": False}])
def test_counts_match_the_modules(overrides):
    model = mtp_model(depth=2, **overrides)
    cfg = model.cfg
    own = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    trunk = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert count_mtp_parameters(cfg)[0] == own
    assert count_parameters(cfg)[0] == trunk
    assert count_mtp_parameters(cfg.replace(mtp_depth=0)) == (0, 0)
    if cfg.is_moe:  # active: K of the E experts per token, in each MTP block as in the trunk
        expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        per_module = (cfg.num_experts - cfg.num_experts_per_tok) * expert
        assert count_mtp_parameters(cfg)[0] - count_mtp_parameters(cfg)[1] == 2 * per_module


def test_info_counts_mtp_separately(tmp_path, capsys):
    save_pretrained(mtp_model(depth=1), tmp_path / "ckpt")
    assert main(["info", str(tmp_path / "ckpt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = from_name("debug", mtp_depth=1)
    (total, active), (mtp_total, mtp_active) = count_parameters(cfg), count_mtp_parameters(cfg)
    assert (out["parameters_total"], out["parameters_active"]) == (total, active)
    assert (out["parameters_mtp_total"], out["parameters_mtp_active"]) == (mtp_total, mtp_active)
    assert out["parameters_total_with_mtp"] == total + mtp_total
    assert main(["info", "pangu-pro-moe-72b", "--mtp-depth", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "pangu-pro-moe-72b: 71.989 B parameters, 16.498 B active per token"
    # one 72B layer (71.989 B - 2 x 153376 x 5120 embedding/head) / 48 = 1.467 B, + eh_proj 2 x 5120^2
    assert any(line.startswith("  + 1 MTP module(s): 1.519 B parameters, 0.363 B active") for line in lines)
    assert "  with MTP: 73.508 B parameters, 16.862 B active per token" in lines
    assert main(["info", "debug"]) == 0
    assert "MTP" not in capsys.readouterr().out
    assert main(["info", "debug", "--mtp-depth", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error: --mtp-depth must be >= 0")


# training -------------------------------------------------------------------------------------
def test_train_flags(capsys):
    import argparse

    from mogelm.commands.train import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    tc = config_from_args(p.parse_args(["--mtp-depth", "2", "--mtp-weight", "0.1"]))
    assert tc.model_overrides["mtp_depth"] == 2 and tc.mtp_weight == 0.1
    tc = config_from_args(p.parse_args(["--mtp-depth", "1"]))
    assert tc.mtp_weight == 0.3
    assert "mtp_depth" not in config_from_args(p.parse_args([])).model_overrides
    assert main(["train", "--mtp-weight", "0.5", "--max-steps", "1"]) == 2
    assert "--mtp-weight needs --mtp-depth" in capsys.readouterr().err
    assert main(["train", "--mtp-depth", "1", "--mtp-weight", "-1", "--max-steps", "1"]) == 2
    assert "--mtp-weight must be" in capsys.readouterr().err
    assert main(["train", "--mtp-depth", "8", "--seq-len", "8", "--max-steps", "1",
                 "--data", str(FIXTURES), "--out", "/nonexistent/never-written"]) == 2
    assert "--mtp-depth 8 leaves no positions" in capsys.readouterr().err


def test_training_loop_with_mtp_equals_a_plain_loop(tmp_path):
    """train() with --mtp-depth 1 computes exactly CE + aux + lambda * MTP CE (+ the MTP block's
    aux loss): the same logged losses, MTP losses and gradient norms bit for bit, and the same
    final weights, which the checkpoint holds under the MTP names."""
    from mogelm.train import (
        TrainConfig,
        build_model,
        build_model_config,
        build_optimizer,
        lr_at,
        prepare_data,
        read_log,
        train,
        train_batch,
    )
    from mogelm.train.context import LocalContext

    tc = TrainConfig(preset="debug", seq_len=32, batch_size=2, eval_batches=1, threads=1,
                     data=[str(FIXTURES)], out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                     max_steps=2, grad_accum=2, eval_every=100, model_overrides={"mtp_depth": 1},
                     mtp_weight=0.5)
    train(tc, log=lambda msg: None)
    recs = [r for r in read_log(Path(tc.out) / "log.jsonl") if r["kind"] == "train"]
    got = [(r["step"], r["loss"], r["mtp_loss"], r["mtp_loss_1"], r["grad_norm"]) for r in recs]

    vocab = build_model_config(tc).vocab_size
    td = prepare_data(tc, vocab, LocalContext(), log=lambda msg: None)
    model = build_model(build_model_config(tc, vocab), tc.seed)
    opt = build_optimizer(model, tc)
    want = []
    for step in range(tc.max_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc, tc.max_steps)
        ce_sum = mtp_sum = 0.0
        for micro in range(tc.grad_accum):
            x_BT, y_BT = train_batch(td, tc, step, micro)
            out = model(x_BT, return_stats=True, return_hidden=True)
            ce = F.cross_entropy(out.logits.float().view(-1, out.logits.shape[-1]), y_BT.reshape(-1))
            mtp = model.mtp_forward(out.trunk_hidden, x_BT)
            mtp_ce = mtp_losses(mtp, y_BT)
            ((ce + out.aux_loss + mtp.aux_loss + tc.mtp_weight * mtp_ce.mean()) / tc.grad_accum).backward()
            ce_sum += float(ce.detach()) / tc.grad_accum
            mtp_sum += float(mtp_ce[0].detach()) / tc.grad_accum
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        want.append((step + 1, ce_sum, mtp_sum, mtp_sum, norm))
    assert got == want
    final = from_pretrained(Path(tc.out) / "final")
    assert final.cfg.mtp_depth == 1
    trained = final.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(trained[name], t), name


# the reference MTP drafter --------------------------------------------------------------------
def test_mtp_drafter_proposes_the_teacher_forced_argmax():
    model = mtp_model(depth=2).eval()
    seq = torch.randint(0, 512, (11,)).tolist()
    t = len(seq) - 1
    drafts = MTPDrafter(model).propose(seq, k=4)
    assert len(drafts) == 2  # at most mtp_depth
    with torch.no_grad():  # one full forward over the sequence and the drafts (trunk included)
        ids = torch.tensor([seq + drafts[:1]])
        out = model.mtp_forward(model(ids, return_hidden=True).trunk_hidden, ids)
    assert drafts[0] == int(out.logits[0][0, t - 1].argmax())  # depth 1 at row t-1 -> token t+1
    assert drafts[1] == int(out.logits[1][0, t - 1].argmax())  # depth 2 at row t-1 -> token t+2
    assert MTPDrafter(model).propose(seq, k=1) == drafts[:1]
    assert MTPDrafter(model).propose(seq[:1], k=2) == []
    with pytest.raises(ValueError, match="MTP modules"):
        MTPDrafter(mogelm.Transformer(from_name("debug")))


def test_engine_serves_an_mtp_checkpoint_like_its_trunk(tmp_path):
    """Until the engine drafts with MTP (issue 16 stage 2) it ignores the modules: greedy output of
    a loaded MTP checkpoint equals that of the same trunk without them."""
    from mogelm.inference.engine import Engine
    from mogelm.inference.sampling import SamplingParams

    save_pretrained(mtp_model(depth=1), tmp_path)
    torch.manual_seed(0)
    plain = Transformer(from_name("debug"))  # the same trunk weights (same seed)
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    params = SamplingParams(max_tokens=6, temperature=0)
    got = Engine(from_pretrained(tmp_path), max_batch=2).generate(prompts, params)
    want = Engine(plain, max_batch=2).generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert all(len(c.token_ids) == 6 for c in got)
