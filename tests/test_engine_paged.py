"""The paged engine end to end on the trained fixture model (CPU, fp32): greedy output equals the
slotted engine's (the previous method) and the uncached forward, token for token, under continuous
batching, chunked prefill, mixed steps, prefix-cache hits, preemption and abort; the block accounting
is checked after every step and every block is free after a drain.

What requests ask for beyond tokens, against an uncached forward: logprobs of generated tokens and of
every prompt position (across chunk boundaries, past a warm prefix cache, through preemption), the
presence / frequency / repetition penalties, and n choices forked from one prefill.
"""

from dataclasses import replace

import pytest
import torch
from test_inference import argmax_reference, cpu_engine

from mogelm.inference import Engine, SamplingParams
from mogelm.inference.cache import slotted_greedy
from mogelm.inference.engine import RequestError
from mogelm.inference.sampling import MAX_LOGPROBS, sample

TEXTS = [
    "The quick brown fox jumps over the lazy dog. A small model",
    "def add(a",
    "Mixture of grouped experts splits the experts into groups and picks the same number in every group,",
    "so",
    "Servers answer requests; clients send prompts and read tokens as they stream back.",
    "for i in range(10):",
]
MAX_TOKENS = 12


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return cpu_engine(tmp_path_factory)


@pytest.fixture(scope="module")
def prompts(base):
    return [base.tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def reference(base, prompts):
    """Greedy tokens of every prompt by the uncached forward, checked equal to the slotted method."""
    eos = base.tokenizer.eos_token_id
    ref = [argmax_reference(base.model, p, MAX_TOKENS, eos) for p in prompts]
    assert slotted_greedy(base.model, prompts, MAX_TOKENS, eos) == ref
    return ref


def engine(base, **kw) -> Engine:
    return Engine(base.model, base.tokenizer, **kw)


def run(eng: Engine, prompts, params=None, add_at=None, check_each_step=True) -> tuple[list, list[dict]]:
    """Add the prompts (all at once, or prompt i before step add_at[i]), step to the end checking the
    block accounting after every step (or only at the end: a check walks every block of the pool);
    returns (requests, per-step schedules: decode rows, chunks, preemptions)."""
    params = params or SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    add_at = add_at or [0] * len(prompts)
    reqs, steps, streamed = [None] * len(prompts), [], {}
    real_schedule = eng.scheduler.schedule

    def schedule():
        batch = real_schedule()
        steps.append(dict(decodes=sum(n == 1 for _, n in batch.rows),
                          chunks=sum(n > 1 for _, n in batch.rows), preempted=len(batch.preempted)))
        return batch

    eng.scheduler.schedule = schedule
    try:
        step = 0
        while step == 0 or eng.has_unfinished() or any(r is None for r in reqs):
            for i, p in enumerate(prompts):
                if reqs[i] is None and add_at[i] <= step:
                    reqs[i] = eng.add_request(p, params, on_output=lambda o: streamed.setdefault(
                        o.request_id, []).append(o))
            eng.step()
            if check_each_step:
                eng.blocks.check()
            step += 1
            assert step < 2000
    finally:
        eng.scheduler.schedule = real_schedule
    for r in reqs:  # every token streamed exactly once, one final output
        outs = streamed[r.id]
        assert [t for o in outs for t in o.token_ids] == r.output_ids
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    eng.blocks.check()
    assert not eng.blocks.tables and eng.blocks.num_used == 0  # drained: every block free (or cached)
    return reqs, steps


def test_continuous_batching_chunked_mixed_steps_equal_uncached_and_slotted(base, prompts, reference):
    """Six prompts through three sequences at a time, 7 prompt tokens per step, 4-token blocks, two
    prompts arriving mid-flight: steps mix decodes with several prompt chunks."""
    eng = engine(base, max_batch=3, chunk_size=7, block_size=4)
    reqs, steps = run(eng, prompts, add_at=[0, 0, 0, 0, 5, 9])
    assert [r.output_ids for r in reqs] == reference
    assert any(s["decodes"] and s["chunks"] for s in steps)  # decode rows and prompt chunks together
    assert any(s["chunks"] >= 2 for s in steps)  # several prompts' chunks in one forward
    assert max(s["decodes"] + s["chunks"] for s in steps) == 3


def test_prefix_cache_hits_skip_computation_and_change_nothing(base, prompts, reference):
    eng = engine(base, max_batch=2, chunk_size=64, block_size=4)
    system = base.tokenizer.encode(TEXTS[2] + " " + TEXTS[4])  # a long shared prefix
    shared = [system + p for p in prompts]
    want = [argmax_reference(base.model, p, MAX_TOKENS, base.tokenizer.eos_token_id) for p in shared[:3]]
    (first,), _ = run(eng, shared[:1])
    computed = eng.stats()["prompt_tokens_computed_total"]
    assert first.output_ids == want[0] and computed == len(shared[0])
    reqs, _ = run(eng, shared[1:3])
    st = eng.stats()
    assert [r.output_ids for r in reqs] == want[1:]
    hit = st["prefix_cache_hits_total"]
    assert hit >= 2 * (len(system) // 4) * 4  # both found the system prompt's full blocks
    assert st["prompt_tokens_computed_total"] - computed == len(shared[1]) + len(shared[2]) - hit
    assert st["prefix_cache_queries_total"] == sum(map(len, shared[:3]))
    # a prompt identical to a finished one: everything but the block holding its last token is reused
    again, _ = run(eng, shared[:1])
    assert again[0].output_ids == want[0]
    assert eng.stats()["prefix_cache_hits_total"] - hit == (len(shared[0]) - 1) // 4 * 4
    nocache = engine(base, max_batch=2, chunk_size=64, block_size=4, prefix_caching=False)
    reqs, _ = run(nocache, shared[1:3])
    assert [r.output_ids for r in reqs] == want[1:] and nocache.stats()["prefix_cache_hits_total"] == 0


def test_preemption_under_memory_pressure_loses_and_repeats_nothing(base, prompts, reference):
    """A pool of 48 tokens for four sequences that grow to ~30 tokens each: decodes run out of blocks,
    the newest sequences are preempted and recomputed; greedy and seeded outputs are unchanged."""
    eng = engine(base, max_batch=4, chunk_size=32, block_size=4, kv_cache_tokens=48)
    assert eng.max_len == 48
    reqs, steps = run(eng, prompts[:4])
    assert sum(s["preempted"] for s in steps) > 0 and eng.stats()["num_preemptions_total"] > 0
    assert [r.output_ids for r in reqs] == reference[:4]
    assert any(r.num_preemptions for r in reqs)
    hot = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_k=0, top_p=1.0, seed=5, ignore_eos=True)
    roomy = engine(base, max_batch=4, chunk_size=32, block_size=4)
    want = [r.output_ids for r in run(roomy, prompts[:4], hot)[0]]
    tight = engine(base, max_batch=4, chunk_size=32, block_size=4, kv_cache_tokens=48, prefix_caching=False)
    reqs, steps = run(tight, prompts[:4], hot)
    assert sum(s["preempted"] for s in steps) > 0
    assert [r.output_ids for r in reqs] == want  # sampling draws once per token, preempted or not


def test_request_that_can_never_fit_is_refused_at_admission(base, prompts):
    eng = engine(base, max_batch=2, block_size=4, kv_cache_tokens=32)
    assert eng.max_len == 32
    with pytest.raises(RequestError) as e:
        eng.add_request(prompts[2], SamplingParams(max_tokens=20))
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    assert "KV cache holds 32 tokens" in e.value.message
    assert not eng.has_unfinished()
    cut = eng.add_request(prompts[2], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
                          truncate_to_context=True)
    while eng.has_unfinished():
        eng.step()
    assert cut.finish_reason == "length" and len(cut.prompt_ids) + cut.num_generated == 32


def test_abort_running_prefilling_and_waiting_frees_their_blocks(base, prompts, reference):
    eng = engine(base, max_batch=2, chunk_size=5, block_size=4)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    a, b, c, d = (eng.add_request(p, params) for p in (prompts[1], prompts[2], prompts[4], prompts[0]))
    for _ in range(4):  # a decoding, b still prefilling (chunks of 5), c and d waiting
        eng.step()
    assert a.num_generated and 0 < b.num_computed < len(b.prompt_ids) and c in eng.waiting
    eng.abort(b.id)
    eng.abort(c.id)
    eng.step()
    assert b.finish_reason == c.finish_reason == "abort" and b.id not in eng.blocks.tables
    while eng.has_unfinished():
        eng.step()
        eng.blocks.check()
    assert a.output_ids == reference[1] and d.output_ids == reference[0]
    assert not eng.blocks.tables and eng.blocks.num_used == 0


def test_fp8_kv_cache_keeps_greedy_output(base, prompts, reference):
    """fp8 (e4m3) pool with per-head scales calibrated at start-up: the fixture model's wide greedy
    margins survive the KV rounding (all 72 tokens equal in the run that set this test)."""
    eng = engine(base, max_batch=3, block_size=4, chunk_size=16, kv_cache_dtype="fp8")
    assert eng.cache.k[0].dtype == torch.float8_e4m3fn
    assert all((s > 0).all() and (s < 1).all() for s in eng.cache.k_scale + eng.cache.v_scale)
    reqs, _ = run(eng, prompts)
    same = sum(a == b for r, ref in zip(reqs, reference) for a, b in zip(r.output_ids, ref))
    assert same >= 0.9 * sum(map(len, reference)), [(r.output_ids, ref) for r, ref in zip(reqs, reference)]


# --- logprobs, penalties, n ------------------------------------------------------------------------
@torch.no_grad()
def uncached_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] float64 log_softmax of one uncached forward (on the CPU): row p predicts token p + 1."""
    device = next(model.parameters()).device
    return torch.log_softmax(model(torch.tensor([ids], device=device))[0].double(), dim=-1).cpu()


def assert_logprobs_match(entries, ids: list[int], logp_TV: torch.Tensor, num_top: int, first: int,
                          tol: float = 1e-4):
    """entries[k] is the logprob of ids[first + k] given the tokens before it (row first + k - 1)."""
    for k, e in enumerate(entries):
        row, tok = logp_TV[first + k - 1], ids[first + k]
        assert e.token_id == tok
        assert e.logprob == pytest.approx(float(row[tok]), abs=tol)
        assert float(row.sort(descending=True).values[e.rank - 1]) == pytest.approx(float(row[tok]), abs=tol)
        want = row.topk(num_top)
        assert [lp for _, lp in e.top] == pytest.approx(want.values.tolist(), abs=tol)
        assert len(e.top) == num_top


def drain(eng: Engine) -> int:
    """Step to the end, checking the block accounting every step; returns the number of steps."""
    steps = 0
    while eng.has_unfinished():
        eng.step()
        eng.blocks.check()
        steps += 1
        assert steps < 2000
    assert not eng.blocks.tables and eng.blocks.num_used == 0
    return steps


def test_logprobs_of_prompt_and_output_equal_the_uncached_forward(base, prompts):
    """Prompt logprobs (echo) across 7-token chunks beside other requests, after the same prompt
    warmed the prefix cache (the request computes every position anyway), and output logprobs of
    greedy and sampled requests: all equal log_softmax of an uncached forward, top-k included."""
    long = base.tokenizer.encode(TEXTS[2] + " " + TEXTS[4])
    eng = engine(base, max_batch=3, chunk_size=7, block_size=4)
    eng.generate([long], SamplingParams(max_tokens=2, temperature=0))  # the prefix cache holds it now
    hits = eng.stats()["prefix_cache_hits_total"]
    computed = eng.stats()["prompt_tokens_computed_total"]
    echo = SamplingParams(max_tokens=4, temperature=0, logprobs=3, prompt_logprobs=5)
    hot = SamplingParams(max_tokens=6, temperature=1.0, top_k=0, top_p=1.0, seed=3, logprobs=MAX_LOGPROBS)
    outs = eng.generate([long, prompts[0], prompts[1]],
                        [echo, hot, SamplingParams(max_tokens=6, temperature=0, logprobs=0)])
    st = eng.stats()
    # every position computed again: the echo request did not read the cache (the others share nothing)
    assert st["prompt_tokens_computed_total"] - computed == len(long) + len(prompts[0]) + len(prompts[1])
    assert st["prefix_cache_hits_total"] == hits
    a = outs[0]
    assert a.token_ids == argmax_reference(base.model, long, 4, base.tokenizer.eos_token_id)
    whole = long + a.token_ids
    logp = uncached_logprobs(base.model, whole)
    assert a.prompt_logprobs[0] is None and len(a.prompt_logprobs) == len(long)
    assert_logprobs_match(a.prompt_logprobs[1:], whole, logp, 5, first=1)
    assert_logprobs_match(a.logprobs, whole, logp, 3, first=len(long))
    assert all(e.rank == 1 for e in a.logprobs)  # greedy
    for out, prompt, k in ((outs[1], prompts[0], MAX_LOGPROBS), (outs[2], prompts[1], 0)):
        ids = prompt + out.token_ids
        assert out.prompt_logprobs is None and len(out.logprobs) == len(out.token_ids) > 0
        assert_logprobs_match(out.logprobs, ids, uncached_logprobs(base.model, ids), k, first=len(prompt))


def test_prompt_logprobs_survive_preemption(base, prompts):
    """A 48-token pool for four growing sequences: preempted ones recompute their prompt without
    duplicating or losing a prompt logprob."""
    eng = engine(base, max_batch=4, chunk_size=32, block_size=4, kv_cache_tokens=48)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=1, prompt_logprobs=2)
    reqs = [eng.add_request(p, params) for p in prompts[:4]]
    drain(eng)
    assert eng.stats()["num_preemptions_total"] > 0
    for r, p in zip(reqs, prompts):
        ids = p + r.output_ids
        logp = uncached_logprobs(base.model, ids)
        assert len(r.prompt_logprobs) == len(p) and r.prompt_logprobs[0] is None
        assert_logprobs_match(r.prompt_logprobs[1:], ids, logp, 2, first=1)
        assert_logprobs_match(r.logprobs, ids, logp, 1, first=len(p))


def penalized_reference(model, prompt: list[int], params: SamplingParams) -> list[int]:
    """Decoding through an uncached forward with the penalties applied as defined (float64, token by
    token; repetition on prompt and output tokens, frequency and presence on output tokens only),
    then argmax, or one draw with a generator seeded as the request (sample() without penalties)."""
    rep, freq, pres = params.repetition_penalty, params.frequency_penalty, params.presence_penalty
    plain = replace(params, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0)
    gen = torch.Generator().manual_seed(params.seed or 0)
    device = next(model.parameters()).device
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(params.max_tokens):
            x = model(torch.tensor([ids], device=device))[0, -1].double().tolist()
            for t in range(len(x)):
                if t in prompt or t in out:
                    x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
                c = out.count(t)
                x[t] -= freq * c + pres * (c > 0)
            t = int(sample(torch.tensor([x], dtype=torch.float32), [plain], [gen])[0])
            out.append(t)
            ids.append(t)
    return out


PENALIZED = [  # (prompt index, sampling): each changes the tokens of this fixture model (checked)
    (3, dict(temperature=0, repetition_penalty=1.8)),
    (1, dict(temperature=0, frequency_penalty=2.0)),
    (3, dict(temperature=1.5, top_k=0, top_p=1.0, seed=4, presence_penalty=2.0)),
    (2, dict(temperature=0)),  # no penalty beside them
]


def test_penalties_follow_their_definitions_in_a_mixed_batch(base, prompts):
    params = [SamplingParams(max_tokens=24, ignore_eos=True, **kw) for _, kw in PENALIZED]
    want = [penalized_reference(base.model, prompts[i], p) for (i, _), p in zip(PENALIZED, params)]
    for (i, kw), w in zip(PENALIZED[:3], want):  # without the penalty the tokens differ
        plain = SamplingParams(max_tokens=24, ignore_eos=True,
                               **{k: v for k, v in kw.items() if "penalty" not in k})
        assert penalized_reference(base.model, prompts[i], plain) != w, kw
    eng = engine(base, max_batch=4, chunk_size=16, block_size=4)
    assert [o.token_ids for o in eng.generate([prompts[i] for i, _ in PENALIZED], params)] == want


def test_n_choices_share_one_prefill_and_every_block_comes_back(base, prompts, reference):
    prompt = prompts[2]  # 20-odd tokens: the last block is partial, so the first decodes copy it
    assert len(prompt) % 4
    eng = engine(base, max_batch=4, chunk_size=8, block_size=4, prefix_caching=False)
    copies = []
    real_schedule = eng.scheduler.schedule

    def schedule():
        batch = real_schedule()
        copies.extend(batch.copies)
        return batch

    eng.scheduler.schedule = schedule
    greedy = eng.add_choices(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), n=4)
    drain(eng)
    assert eng.stats()["prompt_tokens_computed_total"] == len(prompt)  # one prefill for four choices
    assert [r.output_ids for r in greedy] == [reference[2]] * 4
    assert [r.id for r in greedy[1:]] == [f"{greedy[0].id}-{j}" for j in (1, 2, 3)]
    assert len(copies) == 3  # copy-on-write of the shared partial block, by all but the last writer
    # seeded sampling: choice j draws as a lone request with seed 7 + j would (n = 5 > max_batch:
    # two groups, each one prefill)
    hot = dict(max_tokens=MAX_TOKENS, temperature=1.2, top_k=0, top_p=1.0, ignore_eos=True)
    before = eng.stats()["prompt_tokens_computed_total"]
    streamed = {}
    choices = eng.add_choices(prompt, SamplingParams(seed=7, **hot), n=5,
                              on_output=lambda j, o: streamed.setdefault(j, []).extend(o.token_ids))
    drain(eng)
    assert eng.stats()["prompt_tokens_computed_total"] - before == 2 * len(prompt)
    solo = [engine(base, max_batch=1).generate([prompt], SamplingParams(seed=7 + j, **hot))[0].token_ids
            for j in range(5)]
    assert [r.output_ids for r in choices] == solo == [streamed[j] for j in range(5)]
    assert len({tuple(s) for s in solo}) > 1


def test_aborting_a_parent_before_the_fork_hands_its_choices_on(base, prompts):
    eng = engine(base, max_batch=4, chunk_size=4, block_size=4)
    hot = dict(max_tokens=6, temperature=1.0, top_k=0, top_p=1.0, ignore_eos=True)
    reqs = eng.add_choices(prompts[2], SamplingParams(seed=1, **hot), n=4)
    eng.step()  # the parent is prefilling (4 of 20-odd tokens); the children wait
    assert 0 < reqs[0].num_computed < len(prompts[2]) and eng.num_waiting == 3
    eng.abort(reqs[0].id)
    eng.abort(reqs[2].id)
    drain(eng)
    assert [r.finish_reason for r in reqs] == ["abort", "length", "abort", "length"]
    assert eng.num_waiting == 0
    solo = engine(base, max_batch=1)
    for j in (1, 3):
        [want] = solo.generate([prompts[2]], SamplingParams(seed=1 + j, **hot))
        assert reqs[j].output_ids == want.token_ids


# --- GPU -----------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_uncached(model, prompt_ids, max_tokens, eos_id):
    """argmax_reference on the model's device."""
    device = next(model.parameters()).device
    ids, out = list(prompt_ids), []
    for _ in range(max_tokens):
        t = int(model(torch.tensor([ids], device=device))[0, -1].argmax())
        if t == eos_id:
            break
        out.append(t)
        ids.append(t)
    return out


@pytest.mark.gpu
def test_gpu_engine_graphs_eager_fp8_and_memory_sizing(base, prompts):
    """bf16 on the GPU (Triton decode kernel, CUDA graphs): graphed equals eager equals the uncached
    bf16 forward; the pool is sized from the memory fraction; an fp8 pool keeps most tokens."""
    model = type(base.model)(base.model.cfg)
    model.load_state_dict(base.model.state_dict())
    model = model.to("cuda", torch.bfloat16)
    eos = base.tokenizer.eos_token_id
    ref = [greedy_uncached(model, p, MAX_TOKENS, eos) for p in prompts]
    kw = dict(max_batch=4, block_size=16, gpu_memory_fraction=0.05)
    graphed = Engine(model, base.tokenizer, **kw)
    assert graphed.graphs is not None and sorted(graphed.graphs.graphs) == [1, 2, 4]
    total = torch.cuda.mem_get_info()[1]
    per_token = graphed.cache.nbytes() / (graphed.blocks.num_blocks * graphed.block_size)
    assert 0 < graphed.cache.nbytes() <= 0.05 * total and graphed.stats()["kv_cache_tokens"] > 10_000
    eager = Engine(model, base.tokenizer, cuda_graphs=False, **kw)
    a, _ = run(graphed, prompts, check_each_step=False)  # ~1 M blocks: check once, at the end
    b, _ = run(eager, prompts, check_each_step=False)
    assert [r.output_ids for r in a] == [r.output_ids for r in b] == ref
    fp8 = Engine(model, base.tokenizer, kv_cache_dtype="fp8", **kw)
    assert fp8.cache.nbytes() / (fp8.blocks.num_blocks * fp8.block_size) == per_token / 2
    c, _ = run(fp8, prompts, check_each_step=False)
    same = sum(x == y for r, want in zip(c, ref) for x, y in zip(r.output_ids, want))
    assert same >= 0.9 * sum(map(len, ref))


@pytest.mark.gpu
def test_gpu_logprobs_penalties_and_n_with_cuda_graphs(base, prompts):
    """The request life cycle on the GPU (bf16, CUDA graphs for decode-only steps, logits gathered
    from the graph's rows): prompt and output logprobs within bf16 rounding of the uncached bf16
    forward's, greedy penalties as defined over that forward's logits, and n greedy choices from one
    prefill equal to the uncached greedy tokens, every block back after the drain."""
    model = type(base.model)(base.model.cfg)
    model.load_state_dict(base.model.state_dict())
    model = model.to("cuda", torch.bfloat16)
    eos = base.tokenizer.eos_token_id
    eng = Engine(model, base.tokenizer, max_batch=4, block_size=16, chunk_size=16, gpu_memory_fraction=0.05)
    assert eng.graphs is not None
    long = base.tokenizer.encode(TEXTS[2] + " " + TEXTS[4])  # > 16 tokens: several chunks
    echo = SamplingParams(max_tokens=8, temperature=0, logprobs=5, prompt_logprobs=5)
    [a] = eng.generate([long], echo)
    ids = long + a.token_ids
    logp = uncached_logprobs(model, ids)
    assert_logprobs_match(a.prompt_logprobs[1:], ids, logp, 5, first=1, tol=0.1)
    assert_logprobs_match(a.logprobs, ids, logp, 5, first=len(long), tol=0.1)
    # a penalty whose choices keep a margin of ~0.5 over the runner-up in bf16 (measured on the CPU),
    # far above the rounding differences between the paged and the uncached forward
    rep = SamplingParams(max_tokens=16, ignore_eos=True, temperature=0, repetition_penalty=3.0)
    want = penalized_reference(model, prompts[5], rep)
    assert want != greedy_uncached(model, prompts[5], 16, None)
    assert eng.generate([prompts[5]], rep)[0].token_ids == want
    before = eng.stats()["prompt_tokens_computed_total"]
    choices = eng.add_choices(prompts[4], SamplingParams(max_tokens=MAX_TOKENS, temperature=0), n=3)
    while eng.has_unfinished():
        eng.step()
    assert eng.stats()["prompt_tokens_computed_total"] - before == len(prompts[4])
    assert [r.output_ids for r in choices] == [greedy_uncached(model, prompts[4], MAX_TOKENS, eos)] * 3
    eng.blocks.check()
    assert not eng.blocks.tables and eng.blocks.num_used == 0
