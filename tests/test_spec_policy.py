"""The speculation policies (inference/spec_policy.py): the cost-aware rule picks the draft length
with the most tokens per second at each batch size, keeps re-measuring, and inside the engine
switches speculation off when drafting costs more than it earns (and keeps it when it pays)."""

from __future__ import annotations

import random
import time

import pytest
import test_spec_engine
from test_spec_engine import reference, run

from mogelm.inference import Engine, SamplingParams
from mogelm.inference.spec_policy import AdaptiveSpecPolicy, FixedSpecPolicy, batch_bucket, make_policy

# the same module fixtures as tests/test_spec_engine.py
base, prompts, mtp_model = test_spec_engine.base, test_spec_engine.prompts, test_spec_engine.mtp_model


def drive(policy, batch: int, cost, tokens, steps: int) -> list[int]:
    """Run `steps` decode steps of `batch` sequences through the policy with a known world: a step
    with j drafts takes cost(j) seconds per sequence and yields tokens(j) tokens per sequence."""
    chosen = []
    for _ in range(steps):
        j = policy.choose(batch)
        # what 1..j drafts accepted in this step (drafts are prefixes of each other)
        accepted = [round((tokens(i) - 1) * batch) for i in range(1, j + 1)]
        policy.record(batch, j, cost(j) * batch, batch, accepted)
        chosen.append(j)
    return chosen


def test_buckets_are_powers_of_two():
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 16, 17, 256)] == [1, 2, 4, 4, 8, 16, 32, 256]


def test_fixed_policy_is_the_threshold_rule():
    p = make_policy("fixed", 3, 64)
    assert isinstance(p, FixedSpecPolicy) and [p.choose(n) for n in (1, 64, 65)] == [3, 3, 0]
    with pytest.raises(ValueError, match="policy"):
        make_policy("sometimes", 3, 64)


@pytest.mark.parametrize("name,cost,tokens,best,tried", [
    # weights-bound (small batch): extra positions cost 10 % each, drafts accepted 80 %: k = 3 wins
    ("small batch", lambda j: 1.0 + 0.1 * j, lambda j: 1 + sum(0.8 ** i for i in range(1, j + 1)), 3,
     {0, 1, 2, 3}),
    # compute-bound (large batch): extra positions cost 90 % each, 50 % accepted: no drafts wins, and
    # after one draft lost by 21 % longer drafts are not tried at all
    ("large batch", lambda j: 1.0 + 0.9 * j, lambda j: 1 + sum(0.5 ** i for i in range(1, j + 1)), 0, {0, 1}),
    # in between: one draft pays, more do not (1.7/1.3 = 1.31 > 1.97/1.6, 2.2/1.9)
    ("middle", lambda j: 1.0 + 0.3 * j, lambda j: 1 + [0, 0.7, 0.97, 1.2][j], 1, {0, 1, 2, 3}),
])
def test_adaptive_policy_finds_the_best_draft_length_and_explores_little(name, cost, tokens, best, tried):
    p = AdaptiveSpecPolicy(k=3, max_batch=256, explore_every=32, explore_steps=2)
    chosen = drive(p, 16, cost, tokens, 2048)
    assert set(chosen[:8]) == tried, "lengths are measured in order until one stops paying"
    assert chosen[-1] == best and p.table()[16]["best"] == best
    # after the first exploration only the best's neighbours are measured again: 2 steps every 32
    # for one within 20 % of the best, less and less often for one clearly worse (down to 1 in 512)
    off_best = sum(j != best for j in chosen[8:])
    assert off_best <= 2 * 2 * (len(chosen) // 32 + 1), (name, off_best)
    assert set(chosen[8:]) <= {best - 1, best, best + 1}
    if name == "large batch":  # one draft is 21 % worse there: backed off
        assert off_best <= 2 * (1 + 1 + 2 + 4 + 8 + 3), off_best


def test_adaptive_policy_follows_a_change_in_acceptance():
    """Drafts stop being accepted: within a few re-measurements the policy turns them off, and
    turns them on again when acceptance comes back."""
    p = AdaptiveSpecPolicy(k=2, max_batch=64, explore_every=16)
    cost = lambda j: 1.0 + 0.2 * j  # noqa: E731
    good = lambda j: 1 + 0.9 * j  # noqa: E731
    bad = lambda j: 1.0  # noqa: E731
    assert drive(p, 4, cost, good, 100)[-1] == 2
    assert drive(p, 4, cost, bad, 300)[-20:].count(0) >= 17
    assert drive(p, 4, cost, good, 600)[-20:].count(2) >= 17


def test_adaptive_policy_compares_lengths_measured_at_different_times():
    """Step costs grow during a generation (longer contexts). One draft costs 1.25x a plain step
    and earns 1.2 tokens (a 4 % loss) at every moment; measured early, while steps were cheap,
    and compared with plain steps measured later it would look like a gain without the drift
    correction. The policy must stay at 0 drafts."""
    p = AdaptiveSpecPolicy(k=1, max_batch=8, explore_every=32)
    step = [0]

    def cost(j):
        step[0] += 1
        return (1 + step[0] / 50) * (1.25 if j else 1.0)
    chosen = drive(p, 4, cost, lambda j: 1.2 if j else 1.0, 1000)
    assert chosen[-100:].count(0) >= 90 and p.table()[4]["best"] == 0  # 1 is close: re-measured 2 in 32


def test_adaptive_policy_respects_the_cap_and_buckets_separately():
    p = AdaptiveSpecPolicy(k=2, max_batch=8)
    assert p.choose(9) == 0 and p.choose(0) == 0
    drive(p, 1, lambda j: 1 + 0.05 * j, lambda j: 1 + 0.9 * j, 60)
    drive(p, 8, lambda j: 1 + 0.9 * j, lambda j: 1 + 0.3 * j, 60)
    table = p.table()
    assert table[1]["best"] == 2 and table[8]["best"] == 0


def test_policy_table_reports_cost_and_tokens():
    p = AdaptiveSpecPolicy(k=2, max_batch=8)
    p.record(1, 2, 0.002, 1, [1, 1])  # 1 of 2 drafts accepted: one draft alone would have had it too
    p.record(2, 0, 0.002, 2)
    assert p.table()[1]["options"][2] == (2.0, 2.0, 1) and p.tokens[1] == 2.0
    assert p.table()[2]["options"][0] == (1.0, 1.0, 1)
    p.record(1, 2, 0.004, 1, [1, 2])  # the median of the recent costs, a moving average of tokens
    assert p.table()[1]["options"][2] == (3.0, 2.2, 2)


# In the engine (CPU): the policy sees the real step times -----------------------------------------
class OracleDrafter:
    """Drafts the reference continuation (every draft accepted), optionally slowly."""

    def __init__(self, full: list[int], sleep_s: float = 0.0):
        self.full, self.sleep_s = full, sleep_s

    def propose(self, ids, k):
        time.sleep(self.sleep_s)
        return self.full[len(ids):len(ids) + k]


def _engine_with(base, full: list[int], slow_forward_s: float = 0.0, slow_draft_s: float = 0.0) -> Engine:
    eng = Engine(base.model, base.tokenizer, max_batch=4, speculative="ngram", draft_tokens=2,
                 spec_policy="auto")
    eng.spec_policy.explore_every = 16
    eng.ngram = OracleDrafter(full, slow_draft_s)
    if slow_forward_s:  # a target whose step time hardly depends on its rows (weights-bound)
        forward = eng._forward

        def slow(*a, **kw):
            time.sleep(slow_forward_s)
            return forward(*a, **kw)
        eng._forward = slow
    return eng


def test_engine_keeps_drafting_where_it_pays_and_stops_where_it_does_not(base, prompts):
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    ref = reference(base.model, base.tokenizer, prompts[:1], params)
    want = [(c.token_ids, c.finish_reason) for c in ref]
    full = list(prompts[0]) + ref[0].token_ids

    pays = _engine_with(base, full, slow_forward_s=0.02)  # 3 tokens per 20 ms step beat 1
    got = run(pays, prompts[:1], params)
    assert [(r.output_ids, r.finish_reason) for r in got] == want  # greedy output never changes
    assert pays.spec_policy.table()[1]["best"] == 2, pays.spec_policy.table()
    assert pays.stats()["spec_decode_acceptance_rate"] == 1.0

    costly = _engine_with(base, full, slow_draft_s=0.05)  # drafting costs ~10 plain steps
    got = run(costly, prompts[:1], params)
    assert [(r.output_ids, r.finish_reason) for r in got] == want
    assert costly.spec_policy.table()[1]["best"] == 0, (costly.spec_policy.table(), costly.num_steps)
    # drafts only while measuring: 2 steps per draft length first, then 2 every 16 steps
    assert costly.stats()["spec_decode_num_drafts_total"] <= 2 * 2 + 2 * (costly.num_steps // 16 + 1)
    assert costly.stats()["spec_decode_draft_length"] in (0, 1, 2)


def test_engine_policy_defaults():
    """auto on CUDA, fixed on CPU (tests/test_spec_engine.py relies on drafting at every step)."""
    import mogelm
    from mogelm.config import from_name

    model = mogelm.Transformer(from_name("debug"))
    eng = Engine(model, None, max_batch=4, speculative="ngram")
    assert isinstance(eng.spec_policy, FixedSpecPolicy) and eng.spec.max_batch == 64
    eng = Engine(model, None, max_batch=4, speculative="ngram", spec_policy="auto")
    assert isinstance(eng.spec_policy, AdaptiveSpecPolicy) and eng.spec.max_batch == 4
    with pytest.raises(ValueError, match="spec_policy"):
        Engine(model, None, max_batch=4, speculative="ngram", spec_policy="never")


class RandomLengths:
    """A policy that picks a random draft length 0..k every step (seeded): the engine must decode
    exactly the same greedy text however the length changes from step to step (MTP drafting pauses
    at 0 and resumes; chained drafts appear and vanish)."""

    def __init__(self, k: int, seed: int):
        self.k, self.rng, self.chosen = k, random.Random(seed), []

    def choose(self, num_running: int) -> int:
        self.chosen.append(self.rng.randrange(self.k + 1))
        return self.chosen[-1]

    def record(self, *args) -> None:
        pass


@pytest.mark.parametrize("method", ["ngram", "mtp"])
def test_greedy_output_does_not_depend_on_the_draft_length_of_each_step(base, mtp_model, prompts, method):
    model = mtp_model if method == "mtp" else base.model
    params = SamplingParams(max_tokens=24, temperature=0)
    ref = reference(model, base.tokenizer, prompts, params)
    eng = Engine(model, base.tokenizer, max_batch=3, chunk_size=8, speculative=method, draft_tokens=3)
    eng.spec_policy = RandomLengths(3, seed=7)
    reqs = run(eng, prompts, params)  # checks the block accounting after every step
    assert [r.output_ids for r in reqs] == [c.token_ids for c in ref]
    assert [r.finish_reason for r in reqs] == [c.finish_reason for c in ref]
    assert set(eng.spec_policy.chosen) == {0, 1, 2, 3}
    assert eng.stats()["spec_decode_accepted_tokens_total"] > 0
