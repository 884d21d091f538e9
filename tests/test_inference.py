"""Inference engine: cached decode equals the uncached forward, batching and chunking change nothing,
sampling obeys its parameters, stop conditions, chat templates, `mogelm generate`. (The paged
engine's own machinery: test_engine_blocks.py, test_engine_paged.py, test_paged_attention.py.)

The test subject is a `debug`-preset model trained for a few steps on a tiny text (so its greedy
choices are clear-cut, not near-ties) with a byte-level BPE tokenizer trained on the same text.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_close

import mogelm
from mogelm.cli import main as cli_main
from mogelm.inference import Engine, EngineThread, SamplingParams, SlotKVCache, Tokenizer, sample
from mogelm.inference.chat import pangu_chat_prompt
from mogelm.inference.engine import RequestError
from mogelm.inference.sampling import filter_logits

TEXT = """The quick brown fox jumps over the lazy dog. A small model learns to repeat what it reads.
Mixture of grouped experts splits the experts into groups and picks the same number in every group,
so every device gets the same work. def add(a, b):
    return a + b

for i in range(10):
    print(i * i)

Servers answer requests; clients send prompts and read tokens as they stream back. 你好，世界。
"""
SPECIAL = ["<s>", "</s>", "[unused9]", "[unused10]"]
_BUILT: dict[str, Path] = {}


def build_checkpoint(root: Path) -> Path:
    """Tokenizer + debug model trained 60 steps on TEXT, saved as a checkpoint directory
    (once per process)."""
    if "ckpt" in _BUILT:
        return _BUILT["ckpt"]
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    d = Path(root) / "ckpt"
    d.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))

    model, loss = train_on_text(mogelm.from_name("debug"), tok.encode(TEXT * 4).ids, seed=0)
    assert loss < 1.0, f"the fixture model did not learn its text (loss {loss:.2f})"
    mogelm.save_pretrained(model, d)
    _BUILT["ckpt"] = d
    return d


def train_on_text(cfg, ids: list[int], seed: int, steps: int = 60) -> tuple[mogelm.Transformer, float]:
    """A model of `cfg` trained `steps` AdamW steps on random 64-token windows of `ids`, on one
    intra-op thread (see conftest.one_thread); returns it and its last loss."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = mogelm.Transformer(cfg)
        data = torch.tensor(ids)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(steps):
            starts = torch.randint(0, len(data) - 65, (8,), generator=gen)
            x = torch.stack([data[s:s + 65] for s in starts])
            loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model, loss.item()


def cpu_engine(tmp_path_factory) -> Engine:
    """An engine over the trained debug checkpoint on the CPU, even where CUDA exists: gpu tests copy
    its fp32, unfused model to the GPU (from_pretrained on CUDA would fuse q|k|v and gate|up, and a
    copy into an unfused model then fails: it did on the H200 on 2026-12-02)."""
    return Engine.from_pretrained(build_checkpoint(tmp_path_factory.mktemp("inference")), max_batch=1,
                                  device="cpu")


@torch.no_grad()
def argmax_reference(model, prompt_ids: list[int], max_tokens: int, eos_id: int | None) -> list[int]:
    """Greedy decoding with the full uncached forward at every step (the oracle)."""
    ids, out = list(prompt_ids), []
    for _ in range(max_tokens):
        t = int(model(torch.tensor([ids]))[0, -1].argmax())
        if t == eos_id:
            break
        out.append(t)
        ids.append(t)
    return out


def drained(engine) -> bool:
    """No request holds KV blocks and the block accounting is consistent (cached blocks may stay)."""
    engine.blocks.check()
    return not engine.blocks.tables and engine.blocks.num_used == 0 and not engine.has_unfinished()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("inference"))


@pytest.fixture(scope="module")
def engine(ckpt) -> Engine:
    return Engine.from_pretrained(ckpt, max_batch=4, chunk_size=64)


PROMPTS = ["The quick", "def add(a", "Servers answer requests; clients send prompts and read", "so"]
GREEDY = SamplingParams(max_tokens=24, temperature=0)


def test_greedy_equals_uncached_argmax(engine):
    outs = engine.generate(PROMPTS, GREEDY)
    for p, o in zip(PROMPTS, outs):
        ref = argmax_reference(engine.model, engine.tokenizer.encode(p), GREEDY.max_tokens,
                               engine.tokenizer.eos_token_id)
        assert o.token_ids == ref, p
        assert o.text == engine.tokenizer.decode(ref)
        assert o.finish_reason == ("length" if len(ref) == GREEDY.max_tokens else "stop")
    again = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]  # deterministic
    assert drained(engine)  # every block freed


def test_generate_cli_equals_engine(ckpt, engine, capsys):
    argv = ["generate", "--model", str(ckpt), "--temperature", "0", "--max-tokens", "24", "--json"]
    for p in PROMPTS[:2]:
        argv += ["--prompt", p]
    assert cli_main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    want = engine.generate(PROMPTS[:2], GREEDY)
    assert [g["token_ids"] for g in got] == [w.token_ids for w in want]
    assert [g["text"] for g in got] == [w.text for w in want]


def test_generate_cli_errors(ckpt, tmp_path, capsys):
    assert cli_main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert cli_main(["generate", "--model", str(ckpt), "--prompt", "x", "--max-tokens", "100000"]) == 2
    assert "context length" in capsys.readouterr().err
    assert cli_main(["generate", "--model", str(ckpt), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
    for flag, value in (("--gpu-memory-fraction", "0"), ("--kv-cache-tokens", "0"), ("--block-size", "-1")):
        assert cli_main(["generate", "--model", str(ckpt), "--prompt", "x", flag, value]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} must be") and err.count("\n") == 1
    # a pool of 32 tokens caps the context: the error says so
    assert cli_main(["generate", "--model", str(ckpt), "--prompt", "x", "--kv-cache-tokens", "32",
                     "--max-tokens", "40"]) == 2
    assert "KV cache holds 32 tokens" in capsys.readouterr().err


def test_generate_cli_kv_cache_flags(ckpt, engine, capsys):
    """A small fp8 pool of 8-token blocks without prefix caching: same greedy text as the engine."""
    argv = ["generate", "--model", str(ckpt), "--temperature", "0", "--max-tokens", "8", "--json",
            "--prompt", PROMPTS[0], "--kv-cache-tokens", "64", "--block-size", "8", "--no-prefix-caching",
            "--kv-cache-dtype", "fp8"]
    assert cli_main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    want = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=8, temperature=0))
    assert got[0]["token_ids"] == want[0].token_ids


@torch.no_grad()
def test_batched_decode_logits_equal_decoding_alone(engine):
    """Different-length prompts in slots 0, 2, 3 (slot 1 idle, fed at the scratch column) decode exactly
    as each does alone in a one-slot cache."""
    model, cfg = engine.model, engine.model.cfg
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS[:3]]
    slots = [0, 2, 3]
    cache = SlotKVCache(cfg, 4, 64)
    for s, ids in zip(slots, prompts):
        model(torch.tensor([ids]), positions_BT=torch.arange(len(ids))[None], kv_cache=cache.rows(s, s + 1))
    nxt = [7, 11, 13]
    ids_B = torch.tensor([nxt[0], 0, nxt[1], nxt[2]])[:, None]
    pos_B = torch.tensor([len(prompts[0]), cache.scratch_pos, len(prompts[1]), len(prompts[2])])[:, None]
    batched = model(ids_B, positions_BT=pos_B, kv_cache=cache.rows(0, 4),
                    kv_len=max(map(len, prompts)) + 1)[:, 0]
    for j, (s, ids) in enumerate(zip(slots, prompts)):
        full = model(torch.tensor([ids + [nxt[j]]]))[0, -1]  # uncached
        assert_close(batched[s], full)


def test_batched_equals_alone_with_continuous_batching(ckpt, engine):
    """Five requests through two slots, two of them added mid-flight: each equals its solo run."""
    prompts = PROMPTS + ["Mixture of"]
    budgets = [5, 20, 9, 14, 11]
    alone = Engine(engine.model, engine.tokenizer, max_batch=1)
    solo = [alone.generate([p], SamplingParams(max_tokens=m, temperature=0))[0].token_ids
            for p, m in zip(prompts, budgets)]
    eng = Engine(engine.model, engine.tokenizer, max_batch=2, chunk_size=64)
    reqs = [eng.add_request(p, SamplingParams(max_tokens=m, temperature=0))
            for p, m in zip(prompts[:3], budgets[:3])]
    saw_full_with_queue = False
    for step in range(200):
        if step == 3:
            reqs += [eng.add_request(p, SamplingParams(max_tokens=m, temperature=0))
                     for p, m in zip(prompts[3:], budgets[3:])]
        if not eng.has_unfinished():
            break
        eng.step()
        saw_full_with_queue |= len(eng.running) == 2 and eng.num_waiting > 0
    assert not eng.has_unfinished()
    assert saw_full_with_queue
    assert [r.output_ids for r in reqs] == solo
    assert drained(eng)


def test_chunked_prefill_equals_whole_prompt(engine):
    long_prompt = ("Mixture of grouped experts splits the experts into groups and picks the same number "
                   "in every group")
    n = len(engine.tokenizer.encode(long_prompt))
    assert n > 15
    whole = engine.generate([long_prompt], GREEDY)[0]
    eng = Engine(engine.model, engine.tokenizer, max_batch=2, chunk_size=4)
    short = eng.add_request("The quick", SamplingParams(max_tokens=30, temperature=0))
    for _ in range(3):  # the short request is decoding before the long one arrives
        eng.step()
    long_req = eng.add_request(long_prompt, GREEDY)
    interleaved = 0
    while eng.has_unfinished():
        before = short.num_generated
        eng.step()
        if 0 < long_req.num_computed < n and short.num_generated > before:
            interleaved += 1
    assert long_req.output_ids == whole.token_ids
    assert interleaved >= 2  # the short request kept decoding while the long prompt was prefilled in chunks


def test_seed_fixes_sampled_output_whatever_the_batch(engine):
    hot = dict(max_tokens=20, temperature=1.5, top_p=1.0, top_k=0)
    a = engine.generate(["The quick"], SamplingParams(seed=7, **hot))[0].token_ids
    mixed = engine.generate(["def add(a", "The quick", "so"],
                            [SamplingParams(seed=1, **hot), SamplingParams(seed=7, **hot),
                             SamplingParams(seed=3, **hot)])
    assert mixed[1].token_ids == a
    others = [engine.generate(["The quick"], SamplingParams(seed=s, **hot))[0].token_ids for s in (8, 9, 10)]
    assert any(o != a for o in others)


def test_sampling_filters_and_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gens = [torch.Generator().manual_seed(0)]
    draw = lambda p, n: torch.tensor([int(sample(logits, [p], gens)[0]) for _ in range(n)])
    assert set(draw(SamplingParams(temperature=1.0, top_k=1), 50).tolist()) == {0}
    assert set(draw(SamplingParams(temperature=5.0, top_k=2), 300).tolist()) == {0, 1}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.7), 300).tolist()) == {0, 1}
    assert set(draw(SamplingParams(temperature=0.0), 20).tolist()) == {0}
    # filtered probabilities: top-p 0.85 keeps 3 tokens, renormalised
    probs = filter_logits(logits, torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0.85]))[0]
    assert_close(probs, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    # unfiltered draws follow softmax(logits / T)
    n = 6000
    counts = torch.bincount(draw(SamplingParams(temperature=2.0), n), minlength=4).float() / n
    want = torch.softmax(logits[0] / 2.0, -1)
    assert (counts - want).abs().max() < 0.03, (counts, want)  # ~5 standard deviations


def test_sampling_params_validation():
    SamplingParams(top_k=-1, temperature=0)
    for bad in (dict(max_tokens=0), dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0),
                dict(top_p=1.5), dict(top_k=-2), dict(seed=-1), dict(stop_token_ids=[-3])):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_stop_strings_tokens_and_streamed_text(engine):
    full = engine.generate(["The quick"], SamplingParams(max_tokens=30, temperature=0))[0]
    assert "lazy" in full.text
    deltas = []
    req = engine.add_request("The quick", SamplingParams(max_tokens=30, temperature=0, stop=["lazy", "zzz"]),
                             on_output=lambda o: deltas.append(o.text))
    while engine.has_unfinished():
        engine.step()
    assert req.text == full.text[:full.text.index("lazy")]
    assert req.finish_reason == "stop"
    assert "".join(deltas) == req.text  # streamed pieces never included (a prefix of) the stop string
    stop_tok = full.token_ids[4]
    out = engine.generate(["The quick"],
                          SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop_tok]))[0]
    assert out.token_ids == full.token_ids[:full.token_ids.index(stop_tok)]
    assert out.finish_reason == "stop" and out.completion_tokens == len(out.token_ids) + 1


def test_context_limit_and_abort(engine):
    with pytest.raises(ValueError, match="context length"):
        engine.add_request("The quick", SamplingParams(max_tokens=engine.max_len))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    eng = Engine(engine.model, engine.tokenizer, max_batch=1)
    seen = []
    a = eng.add_request("The quick", SamplingParams(max_tokens=50, temperature=0, ignore_eos=True),
                        on_output=seen.append)
    b = eng.add_request("so", SamplingParams(max_tokens=3, temperature=0))
    eng.step()
    eng.step()
    eng.abort(a.id)
    while eng.has_unfinished():
        eng.step()
    assert a.finish_reason == "abort" and seen[-1].finished and seen[-1].finish_reason == "abort"
    assert b.finish_reason in ("length", "stop") and drained(eng)


def test_request_limits_are_typed_errors_and_truncation_stops_at_the_context(engine):
    eng = Engine(engine.model, engine.tokenizer, max_batch=1, max_len=20)
    prompt = engine.tokenizer.encode("The quick")  # 3 tokens
    refused = [  # (prompt, max_tokens, truncate_to_context) -> (param, code)
        ([], 1, False, "prompt", "invalid_value"),
        ([engine.model.cfg.vocab_size], 1, False, "prompt", "invalid_value"),
        (list(range(5, 25)), 1, True, "prompt", "context_length_exceeded"),  # 20 tokens fill the context
        (prompt, 18, False, "max_tokens", "context_length_exceeded"),  # 3 + 18 > 20
    ]
    for ids, max_tokens, truncate, param, code in refused:
        with pytest.raises(RequestError) as e:
            eng.add_request(ids, SamplingParams(max_tokens=max_tokens), truncate_to_context=truncate)
        assert (e.value.param, e.value.code) == (param, code) and str(e.value) == e.value.message
    assert not eng.has_unfinished()
    fits = eng.add_request(prompt, SamplingParams(max_tokens=17, temperature=0, ignore_eos=True))
    cut = eng.add_request(prompt, SamplingParams(max_tokens=500, temperature=0, ignore_eos=True),
                          truncate_to_context=True)
    while eng.has_unfinished():
        eng.step()
    assert cut.finish_reason == fits.finish_reason == "length"
    assert cut.output_ids == fits.output_ids and cut.num_generated == 17  # up to the last context position


def test_engine_thread_serves_requests_added_from_another_thread(engine):
    eng = Engine(engine.model, engine.tokenizer, max_batch=2)
    runner = EngineThread(eng).start()
    done = []
    reqs = [eng.add_request(p, GREEDY, on_output=lambda o: done.append(o.request_id) if o.finished else None)
            for p in PROMPTS]
    runner.wake()
    assert runner.stop(drain=True, timeout=60)
    assert sorted(done) == sorted(r.id for r in reqs)
    assert [r.output_ids for r in reqs] == [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]


class _FailOnce(torch.nn.Module):
    """Wraps the model; the first forward raises, as a bug or an out-of-memory would."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.cfg, self.failed = model, model.cfg, False

    def forward(self, *args, **kwargs):
        if not self.failed:
            self.failed = True
            raise RuntimeError("boom")
        return self.inner(*args, **kwargs)


def _wait(pred, seconds=60):
    import time

    deadline = time.monotonic() + seconds
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_engine_thread_survives_a_failing_step_and_stops_without_draining(engine):
    eng = Engine(_FailOnce(engine.model), engine.tokenizer, max_batch=2)
    runner = EngineThread(eng).start()
    seen = []
    bad = eng.add_request("The quick", GREEDY, on_output=seen.append)
    runner.wake()
    _wait(lambda: bad.finish_reason is not None)
    assert bad.finish_reason == "error" and "boom" in seen[-1].error and drained(eng)
    good = eng.add_request("The quick", GREEDY)
    runner.wake()
    _wait(lambda: good.finish_reason is not None)
    assert good.output_ids == engine.generate(["The quick"], GREEDY)[0].token_ids
    long = eng.add_request("so", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    runner.wake()
    _wait(lambda: long.num_generated > 0)
    assert runner.stop(drain=False, timeout=60)
    assert long.finish_reason == "abort" and long.num_generated < 200 and drained(eng)


def test_chat_templates(ckpt, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert pangu_chat_prompt(msgs, "<s>") == ("<s>[unused9]系统：Be brief.[unused10]"
                                              "[unused9]用户：Hi[unused10][unused9]助手：")
    tok = Tokenizer.from_dir(ckpt)
    ids = tok.encode(tok.apply_chat_template(msgs))
    assert ids[0] == tok.bos_token_id and ids.count(tok.tok.token_to_id("[unused9]")) == 3
    assert tok.chat_stop_token_ids() == [tok.tok.token_to_id("[unused10]")]
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])
    d = tmp_path / "tpl"
    d.mkdir()
    (d / "tokenizer.json").write_text((ckpt / "tokenizer.json").read_text())
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": template}))
    assert Tokenizer.from_dir(d).apply_chat_template(msgs) == "<system>Be brief.\n<user>Hi\n<assistant>"


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager(ckpt):
    """bf16 on the GPU (the serving path; default kernel backend). The fixture model's greedy choices have
    wide margins, so bf16 rounding differences between the two attention lengths do not flip tokens."""
    kw = dict(device="cuda", dtype=torch.bfloat16, max_batch=5)
    eager = Engine.from_pretrained(ckpt, cuda_graphs=False, **kw)
    graphed = Engine.from_pretrained(ckpt, cuda_graphs=True, **kw)
    assert graphed.graphs is not None, "capture failed (see the warning in the log)"
    assert sorted(graphed.graphs.graphs) == [1, 2, 4, 5]
    prompts = PROMPTS + ["Mixture of", "for i"]  # 6 prompts through 5 slots: the busy-row count changes
    a = eager.generate(prompts, GREEDY)
    b = graphed.generate(prompts, GREEDY)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
