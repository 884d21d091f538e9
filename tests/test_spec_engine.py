"""Speculative decoding in the paged engine (CPU, fp32, the trained fixture model of test_inference).

Greedy output with n-gram or MTP drafts (k = 1..4) equals decoding without drafts token for token,
under continuous batching with mixed prefill + verify steps, with preemption (a tiny KV pool) and
with aborts; the block accounting is checked after every step (no sequence holds a block past
ceil(computed / block size), every block is free after a drain; blocks committed while verifying
serve later prompts from the prefix cache); n > 1 choices draft on their own; drafts never carry
a request past max_tokens, a stop token or a stop string; penalised requests fall back to ordinary decoding;
logprobs equal the non-speculative ones; MTP drafts equal the reference MTPDrafter's (draft 1) and
full causal forwards of the chaining rule (drafts 2..k); sampled
speculative decoding keeps the target distribution (chi-square over a tiny vocabulary, and a wrong
accept rule fails the same bound); the CLI refuses --speculative mtp without MTP modules; MTP
drafting through the graph runner (graphs.PagedGraphs, its eager stand-in on the CPU) gives the
same outputs and drafts as the eager MTP path, padded buckets and calls beyond the largest bucket
(eager fallback) included; on a GPU (marked gpu) the engine captures MTP graphs and its fp32 greedy
output equals decoding without drafts.
"""

import math

import pytest
import torch
from test_inference import build_checkpoint, cpu_engine

import mogelm
from mogelm.errors import UserError
from mogelm.inference import Engine, SamplingParams, spec_decode
from mogelm.inference.drafters import MTPDrafter
from mogelm.mtp import mtp_losses

TEXTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a",
    "Mixture of grouped experts splits the experts into groups and picks the same number in every group,",
    "so",
    "Servers answer requests; clients send prompts and read tokens as they stream back. Servers answer",
    "for i in range(10):",
]
MAX_TOKENS = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return cpu_engine(tmp_path_factory)


@pytest.fixture(scope="module")
def prompts(base):
    return [base.tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def mtp_model(base, prompts):
    """The fixture's trunk with one MTP module trained briefly on the model's own greedy text (trunk
    frozen), so MTP drafts are accepted often enough to exercise every path."""
    torch.manual_seed(0)
    model = mogelm.Transformer(mogelm.from_name("debug", mtp_depth=1))
    missing, unexpected = model.load_state_dict(base.model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("mtp.") for k in missing)
    outs = Engine(base.model, None, max_batch=8).generate(
        prompts, SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))
    seqs = [o.prompt_ids + o.token_ids for o in outs]
    xs = [torch.tensor([s]) for s in seqs]
    with torch.no_grad():
        hiddens = [model(x[:, :-1], return_hidden=True).trunk_hidden for x in xs]
    opt = torch.optim.AdamW(model.mtp.parameters(), lr=3e-3)
    for _ in range(40):
        for x, hidden in zip(xs, hiddens):
            loss = mtp_losses(model.mtp_forward(hidden, x[:, :-1]), x[:, 1:]).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def reference(model, tokenizer, prompts, params, **kw):
    return Engine(model, tokenizer, max_batch=8, **kw).generate(prompts, params)


def run(eng: Engine, prompts, params, abort_at: dict | None = None) -> list:
    """Add every prompt, step to the end checking the block accounting after every step; abort
    request i before step abort_at[i]. Returns the requests."""
    reqs = [eng.add_request(p, params) for p in prompts]
    step = 0
    bs = eng.block_size
    while eng.has_unfinished():
        for i, at in (abort_at or {}).items():
            if at == step:
                eng.abort(reqs[i].id)
        eng.step()
        step += 1
        eng.blocks.check()
        for r in eng.running:  # rollback keeps exactly the blocks of the computed positions
            assert len(eng.blocks.tables.get(r.id, [])) == -(-r.num_computed // bs), r.id
            assert r.num_draft == 0
    assert eng.blocks.num_used == 0, "every block is free after a drain"
    return reqs


@pytest.mark.parametrize("method", ["ngram", "mtp"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_equal_under_continuous_batching(base, mtp_model, prompts, method, k):
    model = mtp_model if method == "mtp" else base.model
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    first = reference(model, base.tokenizer, prompts[:1], params)[0]
    # a last prompt that continues the first one's output: it runs after the first has finished and
    # reads the blocks that request committed while verifying drafts (prefix cache)
    prompts = prompts + [prompts[0] + first.token_ids[:12]]
    ref = reference(model, base.tokenizer, prompts, params)
    # 3 slots for 7 prompts, 8-token chunks: prefill chunks and verify rows share steps
    eng = Engine(model, base.tokenizer, max_batch=3, chunk_size=8, speculative=method, draft_tokens=k)
    reqs = run(eng, prompts, params)
    assert eng.blocks.prefix_hits >= 32  # block 1 (positions 16-31) holds tokens decoded with drafts
    assert [r.output_ids for r in reqs] == [c.token_ids for c in ref]
    assert [r.text for r in reqs] == [c.text for c in ref]
    assert [r.finish_reason for r in reqs] == [c.finish_reason for c in ref]
    st = eng.stats()
    assert st["spec_decode_num_drafts_total"] > 0 and st["spec_decode_accepted_tokens_total"] > 0
    assert st["spec_decode_draft_tokens_total"] >= st["spec_decode_accepted_tokens_total"]
    assert 1 < st["spec_decode_mean_accepted_length"] <= k + 1


@pytest.mark.parametrize("method", ["ngram", "mtp"])
def test_preemption_and_abort_keep_output_and_leak_no_block(base, mtp_model, prompts, method):
    model = mtp_model if method == "mtp" else base.model
    params = SamplingParams(max_tokens=24, temperature=0)
    ref = reference(model, base.tokenizer, prompts, params)
    # a pool of 12 blocks of 8 tokens for 4 running sequences: decodes run out and preempt
    eng = Engine(model, base.tokenizer, max_batch=4, chunk_size=16, block_size=8, kv_cache_tokens=96,
                 speculative=method, draft_tokens=3)
    reqs = run(eng, prompts, params)
    assert eng.scheduler.num_preemptions > 0
    assert [r.output_ids for r in reqs] == [c.token_ids for c in ref]
    assert eng.stats()["spec_decode_accepted_tokens_total"] > 0
    # abort one running (mid-verify) and one still waiting
    eng = Engine(model, base.tokenizer, max_batch=2, chunk_size=16, speculative=method, draft_tokens=3)
    reqs = run(eng, prompts, params, abort_at={0: 4, 5: 2})
    assert reqs[0].finish_reason == reqs[5].finish_reason == "abort"
    for i in (1, 2, 3, 4):
        assert reqs[i].output_ids == ref[i].token_ids


def test_drafts_end_exactly_at_max_tokens_stop_tokens_and_stop_strings(base, prompts):
    tok = base.tokenizer
    greedy = reference(base.model, tok, prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    cases = [SamplingParams(max_tokens=m, temperature=0) for m in (1, 2, 3, 5, 7)]
    for c in greedy:  # a stop token and a stop string from the middle of each greedy output
        if len(c.token_ids) > 6:
            cases.append(SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                        stop_token_ids=[c.token_ids[4]]))
        if len(c.text) > 8:
            cases.append(SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop=[c.text[5:8]]))
    assert len(cases) > 10
    eng = Engine(base.model, tok, max_batch=4, speculative="ngram", draft_tokens=4)
    # without the cap at max_tokens, so drafts do run past the end and must be cut
    eng_nocap = Engine(base.model, tok, max_batch=4, speculative="ngram", draft_tokens=4)
    eng_nocap._propose_drafts = lambda k_now: _propose_uncapped(eng_nocap)
    for params in cases:
        want = reference(base.model, tok, prompts, params)
        for e in (eng, eng_nocap):
            got = run(e, prompts, params)
            assert [(r.output_ids, r.text, r.finish_reason, r.num_generated) for r in got] == \
                [(c.token_ids, c.text, c.finish_reason, c.completion_tokens) for c in want], params
    assert eng_nocap.stats()["spec_decode_accepted_tokens_total"] > 0


def _propose_uncapped(eng: Engine) -> bool:
    """Engine._propose_drafts without the max_tokens cap (only the context's)."""
    for req in eng.running:
        if len(req.token_ids) - req.num_computed == 1 and not req.num_draft:
            k = min(eng.spec.k, eng.max_len - len(req.token_ids))
            drafts = eng.ngram.propose(req.token_ids, k) if k > 0 else []
            req.token_ids += drafts
            req.num_draft = len(drafts)
    return True


def test_penalties_fall_back_and_logprobs_match(base, prompts):
    tok = base.tokenizer
    pen = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, presence_penalty=1.5, repetition_penalty=1.3)
    eng = Engine(base.model, tok, max_batch=4, speculative="ngram", draft_tokens=3)
    got = run(eng, prompts, pen)
    assert [r.output_ids for r in got] == [c.token_ids for c in reference(base.model, tok, prompts, pen)]
    assert eng.stats()["spec_decode_num_drafts_total"] == 0, "penalised requests never speculate"
    lp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=3)
    want = reference(base.model, tok, prompts, lp)
    got = run(eng, prompts, lp)
    assert eng.stats()["spec_decode_accepted_tokens_total"] > 0
    for r, c in zip(got, want):
        assert r.output_ids == c.token_ids and len(r.logprobs) == len(c.logprobs)
        for a, b in zip(r.logprobs, c.logprobs):
            assert a.token_id == b.token_id and a.rank == b.rank
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_n_choices_speculate_independently(base, prompts):
    """n > 1: the forked choices draft and verify on their own; greedy choices all equal the
    reference, seeded sampled choices are reproducible, every block comes back."""
    tok = base.tokenizer
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    want = reference(base.model, tok, prompts[:2], greedy)
    eng = Engine(base.model, tok, max_batch=6, speculative="ngram", draft_tokens=3)
    groups = [eng.add_choices(p, greedy, n=3) for p in prompts[:2]]
    while eng.has_unfinished():
        eng.step()
        eng.blocks.check()
    for g, w in zip(groups, want):
        assert [c.output_ids for c in g] == [w.token_ids] * 3
    assert eng.stats()["spec_decode_accepted_tokens_total"] > 0 and eng.blocks.num_used == 0

    def sampled():
        e = Engine(base.model, tok, max_batch=6, speculative="ngram", draft_tokens=3)
        cs = e.add_choices(prompts[0], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=5), n=3)
        while e.has_unfinished():
            e.step()
        return [c.output_ids for c in cs], e.stats()["spec_decode_num_drafts_total"]

    first, drafts = sampled()
    assert drafts > 0 and sampled() == (first, drafts)
    assert len({tuple(c) for c in first}) > 1, "the choices draw with their own seeds"


def test_mtp_drafts_equal_the_reference_drafter(base, mtp_model, prompts):
    """Draft 1 of every verify row equals MTPDrafter (full forwards) on the same tokens."""
    eng = Engine(mtp_model, base.tokenizer, max_batch=3, chunk_size=8, speculative="mtp", draft_tokens=1)
    seen = []
    real = eng._propose_drafts

    def propose(k_now):
        ok = real(k_now)
        seen.extend((list(r.token_ids[:-1]), r.token_ids[-1]) for r in eng.running if r.num_draft)
        return ok

    eng._propose_drafts = propose
    run(eng, prompts[:4], SamplingParams(max_tokens=10, temperature=0))
    ref = MTPDrafter(mtp_model)
    assert len(seen) > 10
    agree = sum(ref.propose(ids, 1) == [d] for ids, d in seen)
    assert agree == len(seen)


def test_fp8_kv_cache_with_mtp_drafts(base, mtp_model, prompts):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    want = reference(mtp_model, base.tokenizer, prompts, params, kv_cache_dtype="fp8")
    eng = Engine(mtp_model, base.tokenizer, max_batch=3, kv_cache_dtype="fp8", speculative="mtp",
                 draft_tokens=2)
    L = mtp_model.cfg.num_layers
    assert torch.equal(eng.cache.k_scale[L], torch.stack(eng.cache.k_scale[:L]).amax(0))
    assert [r.output_ids for r in run(eng, prompts, params)] == [c.token_ids for c in want]
    assert eng.stats()["spec_decode_accepted_tokens_total"] > 0


@torch.no_grad()
def chained_mtp_reference(model, seq: list[int], k: int) -> list[int]:
    """k greedy drafts after seq (its last token pending) by MTP module 1 chained on its own output,
    from full causal forwards of the module's block (no cache): the rule spec_decode documents."""
    m, p = model.mtp[0], len(seq) - 1
    x = torch.tensor([seq])
    h0 = model(x[:, :p], return_hidden=True).trunk_hidden  # trunk rows 0..p-1
    u = m.eh_proj(torch.cat([m.enorm(model.embed_tokens(x[:, 1:p + 1])), m.hnorm(h0)], dim=-1))
    drafts = []
    for _ in range(k):
        n = u.shape[1]
        cos, sin = model.rotary(torch.arange(n)[None])
        out, _ = m.block(u, cos, sin)
        h = out[:, -1:]
        drafts.append(int(model.lm_head(m.norm(h))[0, -1].argmax()))
        emb = model.embed_tokens(torch.tensor([[drafts[-1]]]))
        nxt = m.eh_proj(torch.cat([m.enorm(emb), m.hnorm(h)], dim=-1))
        u = torch.cat([u, nxt], dim=1)
    return drafts


def test_chained_mtp_drafts_equal_the_reference(base, mtp_model, prompts):
    """Drafts 2..k (module 1 chained on its own output, over the paged MTP cache) equal full
    causal forwards of the same rule."""
    eng = Engine(mtp_model, base.tokenizer, max_batch=3, chunk_size=8, speculative="mtp", draft_tokens=3)
    seen = []
    real = eng._mtp_chain

    def chain(batch):
        real(batch)
        seen.extend((list(r.token_ids[:-3]), r.token_ids[-3:]) for r, n in batch.rows if r.num_draft == 3)

    eng._mtp_chain = chain
    run(eng, prompts, SamplingParams(max_tokens=12, temperature=0))
    assert len(seen) > 10
    assert all(chained_mtp_reference(mtp_model, ids, 3) == d for ids, d in seen)


def test_speculative_mtp_needs_mtp_modules(base):
    with pytest.raises(UserError, match="--mtp-depth"):
        Engine(base.model, base.tokenizer, speculative="mtp")
    with pytest.raises(ValueError, match="draft_tokens"):
        Engine(base.model, base.tokenizer, speculative="ngram", draft_tokens=0)


def test_switch_off_above_the_batch_threshold(base, prompts):
    params = SamplingParams(max_tokens=8, temperature=0)
    def drafts(threshold):
        eng = Engine(base.model, base.tokenizer, max_batch=6, speculative="ngram", draft_tokens=2,
                     spec_max_batch=threshold)
        run(eng, prompts, params)
        return eng.stats()["spec_decode_num_drafts_total"]

    assert drafts(5) == 0  # 6 running to the end (all reach max_tokens together): never speculates
    assert drafts(6) > 0


# --- sampled speculative decoding keeps the target distribution ----------------------------------
V_SMALL = 6
PROMPT = [1, 2, 3, 1, 2, 3, 1, 2]
DRAFTS = [5, 2]  # t2, t3 drafts: p(5 | ..) ~ 0.4 and p(2 | .., 5) ~ 0.7 for the model below


@pytest.fixture(scope="module")
def tiny():
    """A 6-token vocabulary model with context-dependent next-token distributions."""
    torch.manual_seed(3)
    model = mogelm.Transformer(mogelm.from_name("debug", vocab_size=V_SMALL)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    return model


def exact_probs(model) -> torch.Tensor:
    """P(t2, t3) of the 2nd and 3rd sampled tokens after PROMPT (temperature 1), t1 summed: [V, V]."""
    V = V_SMALL
    with torch.no_grad():
        p1 = model(torch.tensor([PROMPT])).float()[0, -1].softmax(-1)
        p2 = model(torch.tensor([PROMPT + [a] for a in range(V)])).float()[:, -1].softmax(-1)
        p3 = model(torch.tensor([PROMPT + [a, b] for a in range(V) for b in range(V)])).float()[:, -1]
        p3 = p3.softmax(-1).view(V, V, V)
    return (p1[:, None, None] * p2[:, :, None] * p3).sum(0)


class FixedDrafter:
    def propose(self, seq_ids, k):
        return DRAFTS[:k]


def chi_square(model, n: int, seed: int) -> tuple[float, int, float]:
    """Chi-square of the (t2, t3) counts of n seeded requests, drafted [5, 2] after t1 (both
    positions of the accept rule: t2 from the first, t3 from the second or a rejection's resample)."""
    eng = Engine(model, None, max_batch=256, chunk_size=4096, speculative="ngram", draft_tokens=2)
    eng.ngram = FixedDrafter()
    eng._propose_drafts = lambda k_now: _propose_uncapped(eng)  # 2 drafts even with 2 tokens to go
    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=seed + i, ignore_eos=True) for i in range(n)]
    outs = eng.generate([PROMPT] * n, params)
    counts = torch.zeros(V_SMALL, V_SMALL)
    for o in outs:
        counts[o.token_ids[1], o.token_ids[2]] += 1
    expected = exact_probs(model) * n
    keep = expected >= 5  # cells with enough mass; the rest pooled into one
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    ok = exp > 0
    stat = float(((obs[ok] - exp[ok]) ** 2 / exp[ok]).sum())
    return stat, int(ok.sum()) - 1, eng.stats()["spec_decode_acceptance_rate"]


def chi2_bound(df: int) -> float:
    """About the 99.99th percentile of chi-square(df) (Wilson-Hilferty)."""
    z = 3.72
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_sampled_speculation_keeps_the_target_distribution(tiny, monkeypatch):
    n = 1500
    stat, df, acc = chi_square(tiny, n, seed=0)
    assert 0.05 < acc < 0.95, f"drafts must be both accepted and rejected (acceptance {acc})"
    assert stat < chi2_bound(df), (stat, df)
    # seeded requests are reproducible with speculation
    assert chi_square(tiny, 200, seed=7)[0] == chi_square(tiny, 200, seed=7)[0]

    def wrong_rule(target_probs, drafts, draft_probs=None, num_draft_B=None, generator=None):
        # a classic mistake: on rejection, sample from p itself (not the residual p without the draft)
        p = target_probs.float()
        pd = p[:, :-1].gather(2, drafts.unsqueeze(2)).squeeze(2)
        u = torch.rand(pd.shape, generator=generator, device=p.device)
        num = (u < pd).long().cumprod(1).sum(1)
        nxt = torch.multinomial(p[torch.arange(p.shape[0]), num], 1, generator=generator).squeeze(1)
        return num, nxt

    monkeypatch.setattr(spec_decode, "accept_sampled", wrong_rule)
    stat_wrong, df, _ = chi_square(tiny, n, seed=0)
    assert stat_wrong > 2 * chi2_bound(df), (stat_wrong, df)


# --- serving ---------------------------------------------------------------------------------------
def test_server_with_ngram_speculation_same_text_and_metrics(base, tmp_path_factory, capsys):
    import asyncio

    import openai
    from test_server import metric_samples, serving_in_thread

    from mogelm.cli import main as cli_main
    from mogelm.inference.loadgen import format_summary, load_test
    from mogelm.inference.server import create_app

    ckpt = build_checkpoint(tmp_path_factory.mktemp("inference"))
    engine = Engine.from_pretrained(ckpt, max_batch=4, speculative="ngram", draft_tokens=3)
    with serving_in_thread(create_app(engine, "tiny")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        for text in TEXTS[:3]:
            got = client.completions.create(model="tiny", prompt=text, max_tokens=MAX_TOKENS, temperature=0)
            want = base.generate([text], SamplingParams(max_tokens=MAX_TOKENS, temperature=0))[0]
            assert got.choices[0].text == want.text
        import httpx

        scraped = metric_samples(httpx.get(url + "/metrics").text)
        drafts = scraped[("mogelm:spec_decode_draft_tokens_total", ())]
        accepted = scraped[("mogelm:spec_decode_accepted_tokens_total", ())]
        assert drafts > 0 and 0 < accepted <= drafts
        assert scraped[("mogelm:spec_decode_acceptance_rate", ())] == pytest.approx(accepted / drafts)
        assert scraped[("mogelm:spec_decode_mean_accepted_length", ())] > 1
        res = asyncio.run(load_test(url, concurrency=4, num_requests=4, max_tokens=8, prompt_words=8))
        assert res["errors"] == 0 and res["speculative"]["verify_rows"] > 0
        assert "speculative: acceptance rate" in format_summary(res)
    # --speculative mtp on a checkpoint without MTP modules: one line, status 2
    assert cli_main(["serve", "--model", str(ckpt), "--speculative", "mtp", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--mtp-depth" in err and "\n" not in err
    assert cli_main(["generate", "--model", str(ckpt), "--prompt", TEXTS[0], "--max-tokens", "12",
                     "--temperature", "0", "--speculative", "ngram", "--draft-tokens", "2"]) == 0
    spec_out = capsys.readouterr().out
    assert cli_main(["generate", "--model", str(ckpt), "--prompt", TEXTS[0], "--max-tokens", "12",
                     "--temperature", "0"]) == 0
    assert spec_out == capsys.readouterr().out
    for policy in ("auto", "fixed"):  # either policy: the same greedy text
        assert cli_main(["generate", "--model", str(ckpt), "--prompt", TEXTS[0], "--max-tokens", "12",
                         "--temperature", "0", "--speculative", "ngram", "--spec-policy", policy,
                         "--spec-max-batch", "2"]) == 0
        assert capsys.readouterr().out == spec_out


def test_gpu_bench_quick_smoke(tmp_path):
    """benchmarks/bench_spec_decode.py --quick runs every section on the CPU and writes its JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "benchmarks/bench_spec_decode.py"), "--quick", "--device", "cpu",
           "--batches", "1,2", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "bench_spec_decode.json").read_text())
    assert "engine_error" not in res and "verify72b_error" not in res
    assert not [row for row in res["engine"] if "error" in row]
    assert {(row["method"], row["k"]) for row in res["engine"]} >= {("none", 0), ("ngram", 2), ("mtp", 2)}
    assert all(row.get("same_output", 1.0) == 1.0 for row in res["engine"])
    assert len(res["verify72b"]["ms"]) == 6 and res["prediction"]
    assert "predicted 72B speedup" in r.stdout


@pytest.mark.parametrize("method", ["ngram", "mtp"])
def test_verify_steps_through_the_graph_runner_on_cpu(base, mtp_model, prompts, method):
    """The CUDA-graph path on the CPU (CUDAGraphRunner replays eagerly there): decode+verify steps go
    through the bucketed static buffers (padding rows to the null block), MTP graphs also return the
    hidden states, and greedy output stays equal."""
    from mogelm.inference.engine import CUDAGraphRunner, decode_buckets

    model = mtp_model if method == "mtp" else base.model
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    want = [c.token_ids for c in reference(model, base.tokenizer, prompts, params)]
    eng = Engine(model, base.tokenizer, max_batch=3, chunk_size=8, speculative=method, draft_tokens=3)
    runner = CUDAGraphRunner(model, eng.cache, decode_buckets(12), eng.max_blocks_per_seq,
                             with_hidden=method == "mtp")
    rows = []

    def graphs(ids, *args):
        rows.append(len(ids))
        return runner(ids, *args)

    eng.graphs = type("Spy", (), {"__call__": staticmethod(graphs), "with_hidden": runner.with_hidden})()
    assert [r.output_ids for r in run(eng, prompts, params)] == want
    assert max(rows) > 3 and any(r not in runner.buckets for r in rows), "verify rows, padded buckets"
    assert eng.stats()["spec_decode_accepted_tokens_total"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ngram", "mtp"])
def test_gpu_verify_steps_replay_cuda_graphs_with_equal_greedy_output(base, mtp_model, prompts, method):
    """bf16 on the GPU with CUDA graphs: decode+verify steps replay the graphs captured for up to
    max_batch x (k + 1) rows, and greedy output equals the graphed engine without drafts."""
    src = mtp_model if method == "mtp" else base.model
    model = type(src)(src.cfg)
    model.load_state_dict(src.state_dict())
    model = model.to("cuda", torch.bfloat16)
    kw = dict(max_batch=4, block_size=16, chunk_size=16, kv_cache_tokens=8192)  # run() checks every block
    params = SamplingParams(max_tokens=24, temperature=0)
    plain = Engine(model, base.tokenizer, **kw)
    want = [c.token_ids for c in plain.generate(prompts, params)]
    eng = Engine(model, base.tokenizer, speculative=method, draft_tokens=3, **kw)
    assert eng.graphs is not None and max(eng.graphs.graphs) == 4 * 4
    assert eng.graphs.with_hidden == (method == "mtp")
    rows = []
    real = eng.graphs.__call__

    def spy(ids, *args):
        rows.append(len(ids))
        return real(ids, *args)

    eng.graphs = type("Spy", (), {"__call__": staticmethod(spy), "with_hidden": eng.graphs.with_hidden})()
    got = run(eng, prompts, params)
    assert [r.output_ids for r in got] == want
    assert eng.stats()["spec_decode_accepted_tokens_total"] > 0
    assert max(rows) > 4, "verify steps (more rows than sequences) went through the graphs"


# --- MTP drafting through graphs (graphs.PagedGraphs; the eager stand-in on the CPU) --------------
def runner_graph_vs_eager(eng: Engine, sizes: list[int], buckets: list[int]) -> None:
    """MTPRunner.run through the graph path equals the eager path on the same rows: two sequences'
    rows (their own block tables), random hidden states and tokens, M rows for each M in `sizes`
    (padded to a bucket, or beyond the largest bucket: eager); draft rows picked and all rows."""
    mtp, dev = eng.mtp, eng.device
    cfg = mtp.model.cfg
    gen = torch.Generator().manual_seed(1)
    tables = [[1, 2, 3, 4], [5, 6, 7]]
    mtp.capture(buckets, eng.max_blocks_per_seq)
    graphs = mtp.graphs
    for M in sizes:
        half = M // 2
        seq = [0] * half + [1] * (M - half)
        pos = list(range(half)) + list(range(3, 3 + M - half))
        hidden = torch.randn(M, cfg.hidden_size, generator=gen).to(dev, eng.cache.compute_dtype)
        ids = torch.randint(0, cfg.vocab_size, (M,), generator=gen).tolist()
        for want in ([half - 1, M - 1], None):
            mtp.graphs = None
            out_e, tok_e = mtp.run(hidden, ids, pos, tables, seq, want)
            mtp.graphs = graphs
            out_g, tok_g = mtp.run(hidden, ids, pos, tables, seq, want)
            assert tok_g == tok_e and len(tok_g) == (M if want is None else 2), M
            torch.testing.assert_close(out_g, out_e, atol=1e-4, rtol=1e-4)
            if M <= graphs.max_rows:  # replayed the smallest bucket >= M, padded past M
                b = next(s for s in graphs.buckets if s >= M)
                _, _, _, state, (static_out, _) = graphs.graphs[b]
                assert int(state.lens_R[M:].abs().sum()) == 0 and int(state.slots_N[M:].abs().sum()) == 0
                assert not graphs.extras[b]["hidden"][M:].any()
                if want is None:  # a tensor of its own: the next replay leaves it alone
                    torch.testing.assert_close(static_out[:M], out_g, atol=0, rtol=0)
                    assert out_g.data_ptr() != static_out.data_ptr()
    assert max(sizes) > graphs.max_rows and any(s not in graphs.buckets for s in sizes)


def test_mtp_runner_graph_path_equals_eager(base, mtp_model):
    eng = Engine(mtp_model, base.tokenizer, max_batch=3, speculative="mtp", draft_tokens=2)
    runner_graph_vs_eager(eng, [4, 3, 8, 11], [1, 2, 4, 8])  # 3 after 4: stale rows re-padded


def test_mtp_drafting_through_graphs_equals_eager_drafting(base, mtp_model, prompts):
    """The engine with MTP drafting through the graph runner (the eager stand-in on the CPU): the same
    drafts, step for step, as eager MTP drafting, greedy output equal to decoding without drafts;
    MTP calls of padded bucket sizes went through the graphs, larger ones (prefill chunks) eagerly."""
    from mogelm.inference.engine import decode_buckets

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    want = [c.token_ids for c in reference(mtp_model, base.tokenizer, prompts, params)]

    def drafting(graphs: bool):
        eng = Engine(mtp_model, base.tokenizer, max_batch=3, chunk_size=8, speculative="mtp", draft_tokens=3)
        if graphs:
            eng.mtp.capture(decode_buckets(8), eng.max_blocks_per_seq)
        seen, sizes, replayed = [], [], []
        real_run, real_chain, real_graphs = eng.mtp.run, eng._mtp_chain, eng.mtp.graphs

        def run_spy(hidden, ids, pos, *args):
            sizes.append(len(pos))
            return real_run(hidden, ids, pos, *args)

        def chain_spy(batch):
            real_chain(batch)
            seen.append([(r.id, r.token_ids[-r.num_draft:]) for r, _ in batch.rows if r.num_draft])

        class GraphSpy:
            max_rows = real_graphs.max_rows if graphs else 0

            def __call__(self, *args, **kw):
                replayed.append(args[3].shape[0])
                return real_graphs(*args, **kw)

        eng.mtp.run, eng._mtp_chain = run_spy, chain_spy
        if graphs:
            eng.mtp.graphs = GraphSpy()
        reqs = run(eng, prompts, params)
        assert [r.output_ids for r in reqs] == want
        assert eng.stats()["spec_decode_accepted_tokens_total"] > 0
        return seen, sizes, replayed

    seen_e, sizes_e, replayed_e = drafting(False)
    seen_g, sizes_g, replayed_g = drafting(True)
    assert seen_g == seen_e and sum(len(s) for s in seen_g) > 20
    assert not replayed_e and sizes_g == sizes_e
    assert replayed_g == [s for s in sizes_g if s <= 8], "every call that fits a bucket replays"
    assert any(s not in (1, 2, 4, 8) for s in replayed_g), "padded buckets"
    assert any(s > 8 for s in sizes_g), "prefill rows beyond the largest bucket: eager"


@pytest.mark.gpu
def test_gpu_mtp_drafting_replays_cuda_graphs(base, mtp_model, prompts):
    """fp32 on the GPU (so rounding cannot flip a greedy choice): the engine with MTP drafting captures
    MTP graphs for the trunk's buckets, drafts through them (replays counted), and its greedy output
    equals the engine without drafts; the runner's graph path equals its eager path (padded, exact
    and beyond the largest bucket). Prints one MTP call's wall time, graph vs eager."""
    import time

    model = type(mtp_model)(mtp_model.cfg)
    model.load_state_dict(mtp_model.state_dict())
    model = model.to("cuda", torch.float32)
    kw = dict(max_batch=4, block_size=16, chunk_size=16, kv_cache_tokens=8192)
    params = SamplingParams(max_tokens=24, temperature=0)
    want = [c.token_ids for c in Engine(model, base.tokenizer, **kw).generate(prompts, params)]
    eng = Engine(model, base.tokenizer, speculative="mtp", draft_tokens=3, **kw)
    assert eng.graphs is not None and eng.mtp.graphs is not None, "capture failed (see the log)"
    assert eng.mtp.graphs.buckets == eng.graphs.buckets and eng.mtp.graphs.max_rows == 4 * 4
    real, replayed = eng.mtp.graphs, []

    class GraphSpy:
        max_rows = real.max_rows

        def __call__(self, *args, **kw):
            replayed.append(args[3].shape[0])
            return real(*args, **kw)

    eng.mtp.graphs = GraphSpy()
    got = run(eng, prompts, params)
    assert [r.output_ids for r in got] == want
    assert eng.stats()["spec_decode_accepted_tokens_total"] > 0 and len(replayed) > 10
    eng.mtp.graphs = real
    with torch.inference_mode():
        runner_graph_vs_eager(eng, [4, 3, 16, 40], real.buckets)
        mtp, M = eng.mtp, 4
        args = (torch.randn(M, model.cfg.hidden_size, device="cuda"), [5] * M, list(range(M)), [[1]], [0] * M)
        ms = {}
        for name, graphs in (("graph", real), ("eager", None)):
            mtp.graphs = graphs
            for _ in range(3):
                mtp.run(*args)
            t0 = time.perf_counter()
            for _ in range(50):
                mtp.run(*args)  # ends in a host copy of the drafts: synchronised
            ms[name] = (time.perf_counter() - t0) / 50 * 1e3
    print(f"\nMTP drafting call, {M} rows, fp32 debug model: graph {ms['graph']:.3f} ms, "
          f"eager {ms['eager']:.3f} ms")
