"""Imbalance Score (paper Eq. 3-4) and load metrics, and the `mogelm imbalance` command."""

import json
import subprocess
import sys

import pytest
import torch

from mogelm.analysis.metrics import (
    coactivation,
    device_loads,
    imbalance_score,
    max_over_mean,
    simulate_imbalance,
    summarize,
)
from mogelm.cli import main


def test_imbalance_score_hand_computed():
    # 4 tokens, 8 experts on 2 devices (experts 0-3 on device 0), top-2
    ids = torch.tensor([[0, 1], [2, 4], [3, 0], [1, 2]])
    loads = device_loads(ids, num_experts=8, num_devices=2)
    assert loads.tolist() == [7, 1]
    assert imbalance_score(loads, num_tokens=4) == pytest.approx(6 / 4)
    assert max_over_mean(loads) == pytest.approx(7 / 4)
    # the same selection counted on 4 devices (experts 0-1, 2-3, 4-5, 6-7)
    assert device_loads(ids, 8, 4).tolist() == [4, 3, 1, 0]


def test_coactivation():
    ids = torch.tensor([[0, 1], [0, 2]])
    c = coactivation(ids, 3)
    assert c[0, 0] == 1.0 and c[0, 1] == 0.5 and c[1, 2] == 0.0 and torch.equal(c, c.t())


def test_sample_expert_counts_takes_the_largest_keys_in_each_group():
    from mogelm.analysis.metrics import sample_expert_counts

    keys = torch.tensor([[[[0.1, 0.9, 0.5, 0.2], [0.3, 0.8, 0.7, 0.0]]]])  # 1 trial, 1 token, 2 groups of 4
    assert sample_expert_counts(keys, 2).tolist() == [[0, 1, 1, 0, 0, 1, 1, 0]]
    assert sample_expert_counts(keys.view(1, 1, 1, 8), 3).tolist() == [[0, 1, 0, 0, 0, 1, 1, 0]]  # top-3 of 8
    counts = sample_expert_counts(torch.rand(50, 16, 8, 8), 1)  # MoGE: 16 tokens, 8 groups, K' = 1
    assert (counts.view(50, 8, 8).sum(-1) == 16).all()
    counts = sample_expert_counts(torch.rand(50, 16, 1, 64), 8)  # top-8 of 64: spread unevenly
    assert (counts.sum(-1) == 16 * 8).all() and counts.max() <= 16
    assert (counts.view(50, 8, 8).sum(-1) != 16).any()


def test_monte_carlo_matches_paper_setup():
    # Fig. 2b: 64 experts, 8 devices, top-8, 16 tokens. PAPER.md's reproduction: mean 0.668.
    topk = summarize("topk", simulate_imbalance(64, 8, 8, 16, trials=4000, routing="topk"))
    moge = summarize("moge", simulate_imbalance(64, 8, 8, 16, trials=4000, routing="moge"))
    assert abs(topk.mean - 0.668) < 0.02
    assert topk.p_positive > 0.99
    assert moge.mean == 0 and moge.p_positive == 0 and moge.max == 0


def test_imbalance_shrinks_with_batch_size():
    small = simulate_imbalance(64, 8, 8, 16, trials=1000).mean()
    large = simulate_imbalance(64, 8, 8, 256, trials=1000).mean()
    assert large < small / 2


def test_imbalance_cli_json(capsys):
    assert main(["imbalance", "--tokens", "16", "--trials", "2000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    by = {r["routing"]: r for r in out["results"]}
    assert by["moge"]["mean"] == 0 and by["topk"]["mean"] > 0.5


def test_imbalance_cli_bad_input_is_one_line_error():
    r = subprocess.run([sys.executable, "-m", "mogelm", "imbalance", "--experts", "10", "--groups", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_load_summary():
    from mogelm.analysis.metrics import load_summary

    s = load_summary(torch.tensor([4, 4, 4, 4]), num_devices=2)
    assert s["jain_fairness"] == pytest.approx(1.0) and s["dead_experts"] == 0 and s["expert_cv"] == 0
    assert s["device_max_over_mean"] == pytest.approx(1.0)
    s = load_summary(torch.tensor([8, 0, 0, 0]), num_devices=2)
    assert s["jain_fairness"] == pytest.approx(0.25) and s["dead_experts"] == 3
    assert s["expert_max_over_mean"] == pytest.approx(4.0) and s["device_max_over_mean"] == pytest.approx(2.0)


# Routing statistics of model forwards (RoutingStats, step_balance) -----------------------------------
def _layer_stats(ids_TK, num_experts=4):
    """What a MoE layer reports, reduced to the fields the statistics read."""
    from collections import namedtuple

    Stats = namedtuple("Stats", "counts_E expert_ids_TK")
    ids_TK = torch.tensor(ids_TK)
    return Stats(torch.bincount(ids_TK.reshape(-1), minlength=num_experts), ids_TK)


def test_routing_stats_hand_computed():
    from mogelm.analysis.metrics import RoutingStats

    # 4 experts, top-2, on 2 devices (experts 0-1 on device 0); 3 devices do not divide 4: skipped.
    stats = RoutingStats(num_layers=1, num_experts=4, devices=(2, 3))
    stats.add([_layer_stats([[0, 1], [0, 2], [1, 3]])])  # device loads [4, 2]: IS 2/3, busiest/mean 4/3
    stats.add([_layer_stats([[2, 3], [2, 3]])])  # device loads [0, 4]: IS 2, busiest/mean 2
    s = stats.summary()
    assert (s["tokens"], s["batches"]) == (5, 2) and list(s["imbalance"]) == ["2"]
    assert s["expert_share"] == [[2 / 5, 2 / 5, 3 / 5, 3 / 5]]
    imb = s["imbalance"]["2"]
    assert imb["mean_per_layer"] == [pytest.approx((2 / 3 + 2) / 2)] and imb["max_per_layer"] == [2.0]
    assert imb["max_over_mean_per_layer"] == [pytest.approx((4 / 3 + 2) / 2)]
    tokens_together = [[2, 1, 1, 0], [1, 2, 0, 1], [1, 0, 3, 2], [0, 1, 2, 3]]  # diagonal: tokens per expert
    assert s["coactivation"] == [[[v / 5 for v in row] for row in tokens_together]]
    assert "coactivation" not in RoutingStats(1, 4, coactivation=False).summary()


def test_step_balance_per_layer():
    from mogelm.analysis.metrics import step_balance

    layers = [_layer_stats([[0, 1], [0, 2], [1, 3]]), _layer_stats([[0, 2], [1, 3], [0, 3]])]
    out = step_balance(layers, num_experts=4, devices=(2, 4, 3))
    assert list(out) == ["is2", "mom2", "is4", "mom4"]
    assert out["is2"] == [pytest.approx(2 / 3), 0.0] and out["mom2"] == [pytest.approx(4 / 3), 1.0]
    assert out["is4"] == [pytest.approx(1 / 3), pytest.approx(1 / 3)]
    assert out["mom4"] == [pytest.approx(4 / 3), pytest.approx(4 / 3)]
