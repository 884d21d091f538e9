"""Speculative decoding pieces that need no engine: the n-gram drafter on hand-made sequences and
against a brute-force search, and the accept rule (greedy exactly; sampled statistically, with a
chi-square bound that wrong rules exceed by far)."""

import random

import pytest
import torch

from mogelm.inference.drafters import NgramDrafter, NgramIndex, ngram_propose
from mogelm.inference.speculative import accept_greedy, accept_sampled


# n-gram drafter -------------------------------------------------------------------------------
@pytest.mark.parametrize("seq, k, want", [
    ([1, 2, 3, 4, 1, 2, 3], 2, [4, 1]),          # trigram seen before: copy what followed
    ([1, 9, 1, 8, 1], 2, [8, 1]),                # unigram: the MOST RECENT earlier 1 wins
    ([1, 2, 3, 7, 2, 3, 9, 1, 2, 3], 2, [7, 2]),  # the longer match beats a more recent shorter one
    ([4, 5, 4], 3, [5, 4]),                      # continuation cut at the end of the sequence
    ([7, 7, 7], 3, [7]),                         # overlapping match (s + n = len - 1)
    ([1, 2, 3, 4], 3, []),                       # nothing repeats
    ([5], 3, []),
    ([], 3, []),
    ([1, 2, 1], 0, []),                          # k = 0
])
def test_ngram_hand_made(seq, k, want):
    assert ngram_propose(seq, k) == want
    assert NgramDrafter().propose(seq, k) == want
    assert NgramIndex().propose(seq, k) == want


def test_ngram_bounds():
    seq = [3, 1, 2, 9, 2]  # only a unigram match ("2" at index 2)
    assert ngram_propose(seq, 2, max_ngram=3, min_ngram=1) == [9, 2]
    assert ngram_propose(seq, 2, max_ngram=3, min_ngram=2) == []
    with pytest.raises(ValueError, match="min_ngram"):
        NgramDrafter(max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match="min_ngram"):
        NgramDrafter(max_ngram=2, min_ngram=0)


def _brute_force(seq, k, max_ngram, min_ngram):
    N = len(seq)
    for n in range(max_ngram, min_ngram - 1, -1):
        if n > N - 1 or k <= 0:
            continue
        for s in range(N - n - 1, -1, -1):  # latest start first
            if seq[s:s + n] == seq[N - n:]:
                return seq[s + n:s + n + k]
    return []


def test_ngram_matches_brute_force_search():
    rng = random.Random(0)
    for _ in range(400):
        seq = [rng.randrange(4) for _ in range(rng.randrange(0, 30))]
        k, hi = rng.randrange(0, 6), rng.randrange(1, 5)
        lo = rng.randrange(1, hi + 1)
        assert ngram_propose(seq, k, hi, lo) == _brute_force(seq, k, hi, lo), (seq, k, hi, lo)


def test_ngram_index_follows_a_growing_sequence_like_the_scan():
    """The engine's incremental index (one per sequence, updated with the tokens added since the
    last call) proposes exactly what ngram_propose's full scan does, as the sequence grows by one
    token or several, and after it is cut (the index then rebuilds)."""
    rng = random.Random(1)
    for _ in range(200):
        hi = rng.randrange(1, 5)
        lo = rng.randrange(1, hi + 1)
        index, seq, vocab = NgramIndex(hi, lo), [], rng.choice([2, 3, 6, 30])
        for _ in range(40):
            seq.extend(rng.randrange(vocab) for _ in range(rng.choice([1, 1, 1, 3, 7])))
            if rng.random() < 0.05:
                seq = seq[:rng.randrange(len(seq) + 1)]
            k = rng.randrange(0, 5)
            assert index.propose(seq, k) == ngram_propose(seq, k, hi, lo), (seq, k, hi, lo)
    with pytest.raises(ValueError, match="min_ngram"):
        NgramIndex(max_ngram=1, min_ngram=2)


# greedy accept rule ---------------------------------------------------------------------------
def test_accept_greedy():
    target = torch.tensor([[5, 6, 7, 8],
                           [5, 6, 7, 8],
                           [5, 0, 7, 8],
                           [1, 6, 7, 8],
                           [5, 6, 7, 8]])
    drafts = torch.tensor([[5, 6, 7],    # all accepted: bonus token 8
                           [5, 6, 0],    # two accepted, then the target's 7
                           [5, 6, 7],    # second rejected: a later match does not count
                           [5, 6, 7],    # first rejected: the target's own token 1
                           [5, 6, 7]])   # only 2 drafts in this row (num_draft): bonus at index 2
    num_acc, nxt = accept_greedy(target, drafts, torch.tensor([3, 3, 3, 3, 2]))
    assert num_acc.tolist() == [3, 2, 1, 0, 2]
    assert nxt.tolist() == [8, 7, 0, 1, 7]
    num_acc, nxt = accept_greedy(target[:, :1], drafts[:, :0])  # k = 0: plain decoding
    assert num_acc.tolist() == [0] * 5 and nxt.tolist() == target[:, 0].tolist()


def test_sampled_rule_with_one_hot_target_is_the_greedy_rule():
    g = torch.Generator().manual_seed(0)
    B, K, V = 64, 3, 6
    target_ids = torch.randint(0, V, (B, K + 1), generator=g)
    drafts = torch.where(torch.rand(B, K, generator=g) < 0.7, target_ids[:, :K],
                         torch.randint(0, V, (B, K), generator=g))
    p = torch.nn.functional.one_hot(target_ids, V).float()
    q = torch.softmax(torch.randn(B, K, V, generator=g), -1)
    want = accept_greedy(target_ids, drafts)
    for draft_probs in (None, q):
        got = accept_sampled(p, drafts, draft_probs, generator=g)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# sampled accept rule: the emitted tokens follow the target distribution -------------------------
V, K, LENGTH, TRIALS = 4, 2, 3, 30_000
# chi-square with V**LENGTH - 1 = 63 degrees of freedom exceeds 132 with probability ~1e-6
# (Wilson-Hilferty); the fixed seed makes the test deterministic, the bound makes it meaningful.
CHI2_BOUND = 132.0


def _chains():
    g = torch.Generator().manual_seed(1234)
    target = torch.softmax(1.5 * torch.randn(V, V, generator=g), -1)  # T[prev, next]
    draft = torch.softmax(1.5 * torch.randn(V, V, generator=g), -1)   # a different chain
    return target, draft


def _accept_all(p, drafts, q, generator):  # wrong: never rejects
    B = drafts.shape[0]
    return (torch.full((B,), drafts.shape[1]),
            torch.multinomial(p[:, -1], 1, generator=generator).squeeze(1))


def _resample_from_target(p, drafts, q, generator):  # wrong: ignores q after a rejection
    num_acc, _ = accept_sampled(p, drafts, q, generator=generator)
    return num_acc, torch.multinomial(p[torch.arange(len(p)), num_acc], 1, generator=generator).squeeze(1)


def _speculative_samples(rule, draft_mode: str) -> torch.Tensor:
    """First LENGTH tokens after token 0, TRIALS sequences at once, by draft-k-then-verify steps."""
    target, draft = _chains()
    g = torch.Generator().manual_seed(7)
    N = TRIALS
    out = torch.full((N, LENGTH + K + 1), -1)
    count = torch.zeros(N, dtype=torch.long)
    last = torch.zeros(N, dtype=torch.long)
    rows = torch.arange(N)
    while bool((count < LENGTH).any()):
        drafts, q_rows, prev = [], [], last
        for _ in range(K):
            q_rows.append(draft[prev])
            prev = (torch.multinomial(draft[prev], 1, generator=g).squeeze(1) if draft_mode == "sampled"
                    else draft[prev].argmax(-1))
            drafts.append(prev)
        drafts_BK = torch.stack(drafts, 1)
        p = torch.stack([target[last]] + [target[d] for d in drafts], 1)  # p_i given the drafts before
        q = torch.stack(q_rows, 1)
        num_acc, nxt = rule(p, drafts_BK, q if draft_mode == "sampled" else None, g)
        for j in range(K + 1):
            tok = torch.where(j < num_acc, drafts_BK[:, min(j, K - 1)], nxt)
            write = (j <= num_acc) & (count + j < out.shape[1])
            out[rows[write], (count + j)[write]] = tok[write]
        count += num_acc + 1
        last = nxt
    return out[:, :LENGTH]


def _chi2_and_tv(samples: torch.Tensor) -> tuple[float, float]:
    target, _ = _chains()
    cell = (samples * torch.tensor([V * V, V, 1])).sum(1)
    observed = torch.bincount(cell, minlength=V**LENGTH).double()
    a, b, c = torch.meshgrid(torch.arange(V), torch.arange(V), torch.arange(V), indexing="ij")
    expected = (target[0, a] * target[a, b] * target[b, c]).reshape(-1).double() * len(samples)
    assert expected.min() >= 5, "too few expected counts in a cell for a chi-square test"
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    tv = float((observed - expected).abs().sum() / 2 / len(samples))
    return chi2, tv


def _rule(p, drafts, q, generator):
    return accept_sampled(p, drafts, q, generator=generator)


def _rule_without_q(p, drafts, q, generator):
    return accept_sampled(p, drafts, None, generator=generator)


@pytest.mark.parametrize("rule, draft_mode", [
    (_rule, "sampled"),            # drafts sampled from another chain, with its q
    (_rule, "greedy"),             # that chain's argmax: deterministic drafts, no q
    (_rule_without_q, "sampled"),  # sampled drafts but no q: exact too (module docstring)
])
def test_sampled_rule_keeps_the_target_distribution(rule, draft_mode):
    """The first 3 emitted tokens follow the target chain: chi-square under the 1e-6 bound (and a
    total-variation distance at sampling-noise level, ~0.015 for 30,000 trials)."""
    chi2, tv = _chi2_and_tv(_speculative_samples(rule, draft_mode))
    assert chi2 < CHI2_BOUND and tv < 0.03, (chi2, tv)


@pytest.mark.parametrize("wrong_rule", [_accept_all, _resample_from_target])
def test_wrong_rules_exceed_the_bound(wrong_rule):
    chi2, tv = _chi2_and_tv(_speculative_samples(wrong_rule, "sampled"))
    assert chi2 > 10 * CHI2_BOUND and tv > 0.1, (chi2, tv)


def test_sampled_rule_respects_num_draft():
    g = torch.Generator().manual_seed(0)
    B, Kb, Vb = 2000, 3, 5
    p = torch.softmax(torch.randn(B, Kb + 1, Vb, generator=g), -1)
    drafts = torch.randint(0, Vb, (B, Kb), generator=g)
    num_draft = torch.randint(0, Kb + 1, (B,), generator=g)
    num_acc, nxt = accept_sampled(p, drafts, num_draft_B=num_draft, generator=g)
    assert bool((num_acc <= num_draft).all())
    full = num_acc == num_draft
    assert full.any() and (~full).any()
    # no q: a rejected draft is removed from the residual, so it is never the corrected token
    rejected = ~full
    assert not bool((nxt[rejected] == drafts[rejected, num_acc[rejected]]).any())
    # a row that used all its drafts samples p at index num_draft: never a token with p = 0 there
    p0 = p.clone()
    p0[torch.arange(B), num_draft, 0] = 0.0
    num_acc0, nxt0 = accept_sampled(p0, drafts, num_draft_B=num_draft, generator=g)
    assert not bool(((num_acc0 == num_draft) & (nxt0 == 0)).any())


# the acceptance benchmark's decoding walk (benchmarks/bench_spec_acceptance.py) ------------------
def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "bench_spec_acceptance.py"
    spec = importlib.util.spec_from_file_location("bench_spec_acceptance", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_acceptance_walk():
    bench = _bench()
    seq = list(range(20))
    oracle = bench.walk(seq, 5, 3, lambda t, k: seq[t + 1:t + 1 + k])  # states 5, 9, 13 (17 + 3 > 19)
    assert (oracle["steps"], oracle["drafted"], oracle["accepted"]) == (3, 9, 9)
    assert oracle["accepted_hist"] == [0, 0, 0, 3]
    wrong = bench.walk(seq, 5, 3, lambda t, k: [-1] * k)  # one token per step: states 5..16
    assert (wrong["steps"], wrong["drafted"], wrong["accepted"]) == (12, 36, 0)
    half = bench.walk(seq, 5, 2, lambda t, k: [seq[t + 1], -1])  # 2 tokens per step: 5, 7, .., 17
    assert (half["steps"], half["accepted"]) == (7, 7)
    none = bench.summarise("x", 2, [bench.walk(seq, 5, 2, lambda t, k: [])])
    assert none["draft_share"] == 0 and none["tokens_per_verify"] == 1


def test_acceptance_benchmark_quick_run(tmp_path, capsys):
    bench = _bench()
    report = bench.run(bench.parse_args(["--quick", "--out", str(tmp_path)]))
    assert report["greedy_mismatches"] == 0
    assert [(r["drafter"], r["k"]) for r in report["results"]] == [
        ("ngram1-3", 1), ("ngram1-3", 2), ("ngram1-3", 3), ("ngram1-3", 4),
        ("ngram1-3/text", 1), ("ngram1-3/text", 2), ("ngram1-3/text", 3), ("ngram1-3/text", 4), ("mtp1", 1)]
    on_text = report["first_draft_acceptance_on_text"]
    assert set(on_text) == {"positions", "ngram", "ngram_draft_share", "mtp_1"} and on_text["positions"] > 0
    assert (tmp_path / "acceptance.json").is_file()
    assert "tok/verify" in capsys.readouterr().out
