"""The paged engine end to end on the trained fixture model (CPU, fp32): greedy output equals the
slotted engine's (the previous method) and the uncached forward, token for token, under continuous
batching, chunked prefill, mixed steps, prefix-cache hits, preemption and abort; the block accounting
is checked after every step and every block is free after a drain.
"""

import pytest
import torch
from test_inference import argmax_reference, build_checkpoint

from mogelm.inference import Engine, SamplingParams
from mogelm.inference.cache import slotted_greedy
from mogelm.inference.engine import RequestError

TEXTS = [
    "The quick brown fox jumps over the lazy dog. A small model",
    "def add(a",
    "Mixture of grouped experts splits the experts into groups and picks the same number in every group,",
    "so",
    "Servers answer requests; clients send prompts and read tokens as they stream back.",
    "for i in range(10):",
]
MAX_TOKENS = 12


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_inference._one_thread
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return Engine.from_pretrained(build_checkpoint(tmp_path_factory.mktemp("inference")), max_batch=1)


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
