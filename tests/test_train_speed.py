"""The training step's speed-ups keep its results: device-side step statistics (train/stats.py)
give the records of before, and activation checkpointing (model.set_activation_checkpointing,
`--activation-checkpointing`) gives the same gradients and losses."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from mogelm.analysis.metrics import step_balance
from mogelm.config import from_name
from mogelm.errors import UserError
from mogelm.model import Transformer
from mogelm.train import TrainConfig, read_log, train
from mogelm.train.context import LocalContext
from mogelm.train.stats import StepStats

FIXTURES = Path(__file__).parent / "data"


class _Stats:  # what a MoE layer reports, as far as the statistics read it
    def __init__(self, ids_TK: torch.Tensor, E: int):
        self.expert_ids_TK = ids_TK
        ones = torch.ones(ids_TK.numel(), dtype=torch.int64)
        self.counts_E = torch.zeros(E, dtype=torch.int64).scatter_add_(0, ids_TK.flatten(), ones)


def _old_record(step, lr, grad_norm, ces, auxes, last, E, devices, tokens_per_step):
    """The loop's record as it was computed before (Python floats, step_balance on the CPU)."""
    ce_sum = aux_sum = 0.0
    for ce, aux in zip(ces, auxes):
        ce_sum += float(ce) / len(ces)
        aux_sum += float(aux) / len(ces)
    rec = {"kind": "train", "step": step, "tokens": step * tokens_per_step, "loss": ce_sum, "aux": aux_sum,
           "lr": lr, "grad_norm": grad_norm}
    rec.update(step_balance(last, E, devices))
    return rec


@pytest.mark.parametrize("E,devices", [(64, (8, 4)), (24, (8, 4, 3, 5))])  # 5 does not divide 24: skipped
def test_device_statistics_equal_the_previous_records(E, devices):
    T, K, L, accum = 50, 4, 3, 2
    stats = StepStats(E, devices, accum, 1234, torch.device("cpu"))
    want = []
    for step in (1, 2, 3):  # three steps flushed at once, as on a GPU between two logs
        ces, auxes = torch.rand(accum) * 5, torch.rand(accum) * 1e-3
        for micro in range(accum):
            skew = torch.rand(E) ** (4 * micro + 1)  # uneven loads, different in every micro-batch
            last = [_Stats(torch.multinomial(skew, K * T, replacement=True).view(T, K), E) for _ in range(L)]
            stats.add_micro(ces[micro], auxes[micro], last)
        stats.end_step(step, 1e-3 * step, 0.5 + step)
        want.append(_old_record(step, 1e-3 * step, 0.5 + step, ces, auxes, last, E, devices, 1234))
    records, bad = stats.flush(LocalContext())
    assert bad is None and len(records) == 3
    for got, exp in zip(records, want):
        assert got.pop("tok_s") > 0
        assert got == exp  # same keys, same order of keys, same values bit for bit
        assert list(got) == list(exp)


def test_a_non_finite_loss_is_reported_with_its_step_and_later_steps_are_dropped():
    stats = StepStats(8, (4,), 1, 10, torch.device("cpu"), is_moe=False)
    for step, ce in ((1, 2.0), (2, float("nan")), (3, 1.0)):
        stats.add_micro(torch.tensor(ce), torch.tensor(0.0), [])
        stats.end_step(step, 0.1, 1.0)
    records, bad = stats.flush(LocalContext())
    assert [r["step"] for r in records] == [1] and "is4" not in records[0]
    assert bad[0] == 1 and math.isnan(bad[1])  # 0-based step index, as the loop's message says
    assert stats.flush(LocalContext()) == ([], None)


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = from_name("debug")
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    grads = {}
    for mode in ("none", "moe", "full"):
        model.zero_grad()
        model.set_activation_checkpointing(mode)
        out = model(ids, return_stats=True)
        (out.logits.float().square().mean() + out.aux_loss).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for mode in ("moe", "full"):
        for n, g in grads["none"].items():
            assert torch.equal(grads[mode][n], g), (mode, n)
    with pytest.raises(ValueError, match="activation checkpointing"):
        model.set_activation_checkpointing("all")


def test_training_with_checkpointing_logs_the_same_losses(tmp_path):
    common = dict(preset="debug", seq_len=32, batch_size=2, max_steps=3, eval_every=100, save_every=100,
                  threads=1, data=[str(FIXTURES)], cache_dir=str(tmp_path / "cache"))
    logs = {}
    for mode in ("none", "moe"):
        tc = TrainConfig(**common, out=str(tmp_path / mode), activation_checkpointing=mode)
        train(tc, log=lambda msg: None)
        logs[mode] = [(r["step"], r["loss"], r["grad_norm"]) for r in read_log(Path(tc.out) / "log.jsonl")
                      if r["kind"] == "train"]
    assert logs["moe"] == logs["none"] and len(logs["none"]) == 3
    with pytest.raises(UserError, match="--activation-checkpointing must be one of"):
        train(TrainConfig(**common, out=str(tmp_path / "bad"), activation_checkpointing="yes"),
              log=lambda m: None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU with TRITON_INTERPRET unset")
def test_gpu_training_loop_on_the_fast_path_logs_what_the_cpu_logs(tmp_path):
    """mogelm.train on CUDA (Triton experts forward+backward, fused ops, chunked loss, statistics read
    every 10 steps) writes the same records as on the CPU, with a bf16-close first loss."""
    common = dict(preset="debug", seq_len=64, batch_size=4, max_steps=12, eval_every=100, save_every=100,
                  threads=1, data=[str(FIXTURES)], cache_dir=str(tmp_path / "cache"))
    recs = {}
    for device in ("cpu", "cuda"):
        tc = TrainConfig(**common, out=str(tmp_path / device), device=device)
        train(tc, log=lambda msg: None)
        recs[device] = [r for r in read_log(Path(tc.out) / "log.jsonl") if r["kind"] == "train"]
    cpu, gpu = recs["cpu"], recs["cuda"]
    assert [r["step"] for r in gpu] == list(range(1, 13)) and [list(r) for r in gpu] == [list(r) for r in cpu]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in gpu)
    assert abs(gpu[0]["loss"] - cpu[0]["loss"]) < 2e-2 * cpu[0]["loss"], (gpu[0]["loss"], cpu[0]["loss"])
    assert gpu[-1]["loss"] < gpu[0]["loss"]
