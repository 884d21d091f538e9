"""Sampling pieces against a recomputation: logit bias, the three penalties, logprobs, and the
guarantees around them (penalties never dropped silently, seeds still decide draws, ranges checked).

The oracle is a plain Python loop over the vocabulary in float64, written from the definitions in
mogelm/inference/sampling.py's docstring (vLLM / OpenAI semantics), not from the implementation.
"""

import math

import pytest
import torch

from mogelm.inference.sampling import (
    MAX_LOGPROBS,
    InvalidSampling,
    PenaltyState,
    SamplingParams,
    processed_logits,
    prompt_logprobs,
    sample,
    token_logprobs,
)

V = 23


def oracle_processed(logits: list[float], p: SamplingParams, prompt: list[int],
                     output: list[int]) -> list[float]:
    out = list(logits)
    for t, b in p.logit_bias.items():
        out[t] += b
    for t in range(len(out)):
        if t in prompt or t in output:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
        count = output.count(t)
        out[t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return out


def oracle_logprobs(logits: list[float]) -> list[float]:
    m = max(logits)
    z = math.log(sum(math.exp(x - m) for x in logits)) + m
    return [x - z for x in logits]


def test_processed_logits_equal_the_definitions():
    gen = torch.Generator().manual_seed(0)
    logits_BV = torch.randn(4, V, generator=gen) * 3
    params = [
        SamplingParams(repetition_penalty=1.7),
        SamplingParams(frequency_penalty=0.8, presence_penalty=-0.5, logit_bias={3: 5.0, 7: -100.0}),
        SamplingParams(),  # untouched row in a batch with processed ones
        SamplingParams(repetition_penalty=0.6, frequency_penalty=-1.2, presence_penalty=2.0,
                       logit_bias={0: 1.5}),
    ]
    prompts = [[1, 2, 2, 5], [4, 9], [1], [0, 3, 22]]
    outputs = [[5, 6, 6], [3, 3, 3, 11], [2], [22, 7, 7, 8]]
    states = []
    for p, prompt, output in zip(params, prompts, outputs):
        s = PenaltyState(prompt, V)
        for t in output:
            s.update(t)
        states.append(s if p.has_penalties else None)
    got = processed_logits(logits_BV, params, states)
    for b in range(4):
        want = oracle_processed(logits_BV[b].double().tolist(), params[b], prompts[b], outputs[b])
        assert got[b].tolist() == pytest.approx(want, abs=1e-5), f"row {b}"
    assert torch.equal(got[2], logits_BV[2])
    assert not torch.equal(got[0], logits_BV[0])  # the test data does exercise the penalty


def test_repetition_penalty_semantics_on_signs():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    s = PenaltyState([0, 1], 4)  # tokens 0 and 1 seen in the prompt, 2 and 3 not
    got = processed_logits(logits, [SamplingParams(repetition_penalty=2.0)], [s])
    assert got.tolist() == [[1.0, -4.0, 2.0, -2.0]]  # positive divided, negative multiplied


def test_penalties_without_history_are_an_error_not_a_silent_noop():
    with pytest.raises(ValueError, match="PenaltyState"):
        sample(torch.zeros(1, V), [SamplingParams(presence_penalty=1.0)], [None])


def test_greedy_uses_processed_logits_and_bias_can_force_or_ban():
    logits_BV = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    top = logits_BV.argmax(dim=-1)
    forced = SamplingParams(temperature=0, logit_bias={4: 100.0})
    banned = [SamplingParams(temperature=0, logit_bias={int(top[b]): -100.0}) for b in range(3)]
    assert sample(logits_BV, [forced] * 3, [None] * 3).tolist() == [4, 4, 4]
    second = logits_BV.topk(2, dim=-1).indices[:, 1]
    assert sample(logits_BV, banned, [None] * 3).tolist() == second.tolist()
    # a token with a large output count is pushed below the runner-up by frequency_penalty
    s = PenaltyState([], V)
    for _ in range(20):
        s.update(int(top[0]))
    p = SamplingParams(temperature=0, frequency_penalty=2.0)
    assert int(sample(logits_BV[:1], [p], [None], [s])[0]) == int(second[0])


def test_seeded_draws_are_unchanged_by_the_new_stages_when_off():
    logits_BV = torch.randn(2, V, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(temperature=0.9, top_k=10, top_p=0.9, seed=5)
    p_off = SamplingParams(temperature=0.9, top_k=10, top_p=0.9, seed=5, repetition_penalty=1.0,
                           presence_penalty=0.0, frequency_penalty=0.0, logit_bias={})
    draws = []
    for params in (p, p_off):
        gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
        draws.append([sample(logits_BV, [params] * 2, gens).tolist() for _ in range(5)])
    assert draws[0] == draws[1]


def test_token_logprobs_equal_log_softmax_recomputation():
    logits_BV = torch.randn(3, V, generator=torch.Generator().manual_seed(3)) * 4
    chosen = [5, int(logits_BV[1].argmax()), 0]
    got = token_logprobs(logits_BV, chosen, num_top=[0, 3, MAX_LOGPROBS])
    for b in range(3):
        ref = oracle_logprobs(logits_BV[b].double().tolist())
        order = sorted(range(V), key=lambda t: -ref[t])
        assert got[b].token_id == chosen[b]
        assert got[b].logprob == pytest.approx(ref[chosen[b]], abs=1e-5)
        assert got[b].rank == order.index(chosen[b]) + 1
        k = [0, 3, MAX_LOGPROBS][b]
        assert [t for t, _ in got[b].top] == order[:k]
        assert [lp for _, lp in got[b].top] == pytest.approx([ref[t] for t in order[:k]], abs=1e-5)
    assert got[1].rank == 1


def test_prompt_logprobs_shift_by_one_and_start_with_none():
    logits_TV = torch.randn(5, V, generator=torch.Generator().manual_seed(4))
    prompt = [3, 1, 4, 1, 5]
    got = prompt_logprobs(logits_TV, prompt, num_top=2)
    assert got[0] is None and len(got) == 5
    for t in range(1, 5):
        ref = oracle_logprobs(logits_TV[t - 1].double().tolist())
        assert got[t].token_id == prompt[t]
        assert got[t].logprob == pytest.approx(ref[prompt[t]], abs=1e-5)
    assert prompt_logprobs(logits_TV, [7], 2) == [None]


@pytest.mark.parametrize("kw,param", [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(presence_penalty=float("nan")), "presence_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(logit_bias={3: 100.5}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logprobs=21), "logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
])
def test_out_of_range_values_name_the_field(kw, param):
    with pytest.raises(InvalidSampling) as e:
        SamplingParams(**kw)
    assert e.value.param == param
    SamplingParams(presence_penalty=-2, frequency_penalty=2, repetition_penalty=1e-3,
                   logit_bias={0: -100, 1: 100}, logprobs=0, prompt_logprobs=MAX_LOGPROBS)  # the edges pass


@pytest.mark.gpu
def test_cuda_matches_cpu():
    """The same pipeline on a CUDA device: processed logits and logprobs equal the CPU's."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    logits_BV = torch.randn(3, 1000, generator=torch.Generator().manual_seed(5)) * 3
    params = [SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.4,
                             logit_bias={7: 3.0}),
              SamplingParams(temperature=0, presence_penalty=-1.0), SamplingParams(temperature=0)]
    out = {}
    for dev in ("cpu", "cuda"):
        states = []
        for b, p in enumerate(params):
            s = PenaltyState([1, 2, 3 + b], 1000, device=dev)
            for t in (5, 5, 9 + b):
                s.update(t)
            states.append(s if p.has_penalties else None)
        x = logits_BV.to(dev)
        processed = processed_logits(x, params, states)
        out[dev] = (processed.cpu(), token_logprobs(x, processed.argmax(dim=-1), num_top=5),
                    sample(x, params, [None] * 3, states).cpu())
    assert torch.allclose(out["cpu"][0], out["cuda"][0], atol=1e-5)
    for a, b in zip(out["cpu"][1], out["cuda"][1]):
        assert a.token_id == b.token_id and a.rank == b.rank and abs(a.logprob - b.logprob) < 1e-4
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert torch.equal(out["cpu"][2], out["cuda"][2])  # all greedy here: no draws
