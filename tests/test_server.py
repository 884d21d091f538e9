"""The OpenAI-compatible server, driven on loopback by the official `openai` client.

One server (uvicorn in a thread, on a socket bound to 127.0.0.1:0) serves most of the module; a
second one has an API key and a small body limit; the shutdown test runs DrainingServer in a thread
over a deliberately slow engine, and one test starts `python -m mogelm serve` as a process and
checks that SIGTERM drains a running stream and exits with status 0.
"""

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
import uvicorn
from test_engine_paged import PENALIZED, TEXTS, penalized_reference
from test_inference import argmax_reference, build_checkpoint

from mogelm.cli import main as cli_main
from mogelm.commands.serve import exposure_warning
from mogelm.inference import Engine, SamplingParams
from mogelm.inference.loadgen import load_test
from mogelm.inference.metrics import ServerMetrics
from mogelm.inference.protocol import chat_logprobs, completion_logprobs
from mogelm.inference.sampling import SamplingParams as SP
from mogelm.inference.sampling import TokenLogprob
from mogelm.inference.server import DrainingServer, create_app, encode_texts, listen_socket

MODEL = "tiny"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("inference"))


@pytest.fixture(scope="module")
def solo(ckpt):
    """A separate engine with one slot: the reference for everything the server returns."""
    return Engine.from_pretrained(ckpt, max_batch=1)


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(url + "/health", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.02)


@contextlib.contextmanager
def serving_in_thread(app):
    """Run an ASGI app with uvicorn on a free loopback port in a thread; yields its base URL once the
    server answers (a mogelm app: once /health says ready, i.e. after its warm-up request)."""
    sock = listen_socket("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        if hasattr(app.state, "server"):
            wait_ready(url)
        yield url
    finally:
        srv.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive(), "server did not stop"


@pytest.fixture(scope="module")
def server(ckpt, one_thread):
    engine = Engine.from_pretrained(ckpt, max_batch=8, chunk_size=32)
    app = create_app(engine, MODEL)
    with serving_in_thread(app) as url:
        yield SimpleNamespace(url=url, engine=engine, state=app.state.server,
                              client=openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                                                   timeout=60))


def greedy_text(solo, prompt: str, max_tokens: int, **kw) -> tuple[str, int]:
    out = solo.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, **kw))[0]
    return out.text, out.completion_tokens


def test_health_and_models(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ready"}
    models = server.client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == server.engine.max_len


def test_greedy_completion_equals_generate_and_uncached_argmax(server, ckpt, capsys):
    prompts = ["The quick", "def add(a"]
    argv = ["generate", "--model", str(ckpt), "--temperature", "0", "--max-tokens", "20", "--json"]
    assert cli_main(argv + [a for p in prompts for a in ("--prompt", p)]) == 0
    generated = json.loads(capsys.readouterr().out)
    tok = server.engine.tokenizer
    for p, g in zip(prompts, generated):
        r = server.client.completions.create(model=MODEL, prompt=p, max_tokens=20, temperature=0)
        ref = argmax_reference(server.engine.model, tok.encode(p), 20, tok.eos_token_id)
        assert r.choices[0].text == g["text"] == tok.decode(ref)
        assert g["token_ids"] == ref
        assert r.usage.prompt_tokens == len(tok.encode(p))
        assert r.usage.completion_tokens == g["completion_tokens"]
        assert r.choices[0].finish_reason == g["finish_reason"]


def test_streaming_completion_matches_non_streaming(server):
    kw = dict(model=MODEL, prompt="Servers answer", max_tokens=24, temperature=0)
    whole = server.client.completions.create(**kw)
    chunks = list(server.client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and len([c for c in chunks if c.choices]) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_and_chat_streaming(server, solo):
    msgs = [{"role": "system", "content": "You repeat text."}, {"role": "user", "content": "The quick"}]
    r = server.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0)
    prompt = solo.tokenizer.apply_chat_template(msgs)
    want, n = greedy_text(solo, prompt, 16, stop_token_ids=solo.tokenizer.chat_stop_token_ids())
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(solo.tokenizer.encode(prompt)) and r.usage.completion_tokens == n
    stream = list(server.client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=16,
                                                        temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want
    assert stream[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_16_concurrent_requests_equal_solo_runs(server, solo):
    prompts = [f"{w} {i}" for i, w in enumerate(["The quick", "def add", "for i", "so every"] * 4)]
    want = [greedy_text(solo, p, 12)[0] for p in prompts]

    def ask(i):
        if i % 2:
            return server.client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=12,
                                                    temperature=0).choices[0].text
        stream = server.client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=12,
                                                  temperature=0, stream=True)
        return "".join(c.choices[0].text for c in stream)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16)))
    assert got == want


def test_load_64_concurrent_requests(server, capsys):
    res = asyncio.run(load_test(server.url, concurrency=64, num_requests=64, max_tokens=8, prompt_words=12,
                                  timeout=120, deadline=170))
    assert res["errors"] == 0, res["error_examples"]
    assert res["completed"] == 64 and res["output_tokens"] == 64 * 8
    assert res["ttft_ms"]["p50"] > 0 and res["tpot_ms"]["mean"] > 0
    argv = ["bench", "serve", "--url", server.url + "/v1", "--concurrency", "4", "--requests", "8",
            "--max-tokens", "4", "--json"]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["completed"] == 8 and out["errors"] == 0 and out["model"] == MODEL


LONG = "word " * 400
INVALID = [  # (path, raw body or dict, status, param)
    ("/v1/completions", '{"model": "tiny", "prompt": ', 400, None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_k": -7}, 400, "top_k"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [99999]}, 400, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": LONG}]}, 400,
     "messages"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    # OpenAI / vLLM ranges, checked before anything runs
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 17}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, 400, "top_logprobs"),
    # unknown and unimplemented fields are named, never ignored
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temprature": 0}, 400, "temprature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "functions": [{"name": "f"}]}, 400, "functions"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x", "mood": "sad"}]},
     400, "messages.0.mood"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": True, "stream_options": {"x": 1}}, 400,
     "stream_options.x"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "logprobs": True, "top_logprobs": -1}, 400, "top_logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": -1, "echo": True}, 400, "logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "echo": True}, 400, "echo"),  # a completions field: unknown to chat
    ("/tokenize", {"prompt": "hi", "model": "nope"}, 404, "model"),
    ("/tokenize", {"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}, 400, "prompt"),
    ("/detokenize", {"tokens": [1, 99999]}, 400, "tokens"),
]


@pytest.mark.parametrize("path,body,status,param", INVALID,
                         ids=[f"{i}-{c[3]}" for i, c in enumerate(INVALID)])
def test_invalid_request_gets_4xx_and_server_keeps_serving(server, path, body, status, param):
    kw = ({"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str)
          else {"json": body})
    r = httpx.post(server.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    ok = server.client.completions.create(model=MODEL, prompt="The quick", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2


def test_openai_client_raises_typed_errors(server):
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                              temperature=-2)
    assert e.value.body["param"] == "temperature"
    assert httpx.get(server.url + "/v1/nope").status_code == 404
    assert httpx.get(server.url + "/v1/completions").json()["error"]["type"] == "invalid_request_error"


def test_stop_strings_n_and_seed(server, solo):
    full, _ = greedy_text(solo, "The quick", 30)
    r = server.client.completions.create(model=MODEL, prompt="The quick", max_tokens=30, temperature=0,
                                         stop=["lazy"])
    assert r.choices[0].text == full[:full.index("lazy")] and r.choices[0].finish_reason == "stop"
    kw = dict(model=MODEL, prompt="The quick", max_tokens=12, temperature=1.5, seed=11, n=3)
    a = server.client.completions.create(**kw)
    b = server.client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and len({c.text for c in a.choices}) > 1
    assert a.usage.prompt_tokens == len(solo.tokenizer.encode("The quick"))


def test_prompt_forms_token_ids_and_batches(server, solo):
    ids = solo.tokenizer.encode("def add(a")
    as_text = server.client.completions.create(model=MODEL, prompt="def add(a", max_tokens=10, temperature=0)
    as_ids = server.client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert as_ids.choices[0].text == as_text.choices[0].text == greedy_text(solo, "def add(a", 10)[0]
    for prompts in (["The quick", "def add(a"], [solo.tokenizer.encode("The quick"), ids]):
        batch = server.client.completions.create(model=MODEL, prompt=prompts, max_tokens=10, temperature=0)
        assert [c.index for c in batch.choices] == [0, 1]
        assert [c.text for c in batch.choices] == [greedy_text(solo, "The quick", 10)[0],
                                                   as_text.choices[0].text]
        assert batch.usage.prompt_tokens == len(ids) + len(solo.tokenizer.encode("The quick"))
    with pytest.raises(openai.BadRequestError) as e:  # mixed lists are not an OpenAI prompt form
        server.client.completions.create(model=MODEL, prompt=["The quick", ids], max_tokens=2)
    assert e.value.body["param"].startswith("prompt")


def test_client_disconnect_frees_the_slot(server):
    body = {"model": MODEL, "prompt": "The quick", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 20
    while server.engine.running or server.engine.num_waiting:
        assert time.monotonic() < deadline, "the abandoned request still holds its slot"
        time.sleep(0.05)


def test_serve_busy_port_is_one_line_error(ckpt, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert cli_main(["serve", "--model", str(ckpt), "--port", str(s.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot listen on 127.0.0.1:") and err.count("\n") == 1


def test_serve_bad_model_is_one_line_error(tmp_path, capsys):
    assert cli_main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert cli_main(["serve", "--model", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_serve_process_drains_running_stream_on_sigterm(ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mogelm", "serve", "--model", str(ckpt),
                             "--port", str(port),
                             "--served-model-name", MODEL, "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        stream = client.completions.create(model=MODEL, prompt="The quick", max_tokens=180, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        chunks = [next(stream)]
        proc.send_signal(signal.SIGTERM)  # mid-stream
        chunks += list(stream)
        assert chunks[-1].usage.completion_tokens == 180
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        # uvicorn re-raises the signal once it has drained, so the process ends by SIGTERM's default action
        assert proc.wait(timeout=60) == 0  # drained, then a clean exit (the signal is not re-raised)
        assert "Traceback" not in proc.stderr.read()
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_max_prompt_tokens_caps_prompts(solo):
    from fastapi.testclient import TestClient

    ids = solo.tokenizer.encode("The quick brown fox jumps")
    assert len(ids) > 3
    with TestClient(create_app(solo, MODEL, max_prompt_tokens=3)) as client:
        for body in ({"prompt": ids}, {"prompt": "The quick brown fox jumps"}, {"prompt": [ids[:2], ids]}):
            r = client.post("/v1/completions", json={"model": MODEL, "max_tokens": 1, **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
            assert r.json()["error"]["code"] == "context_length_exceeded"
        r = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 1,
                                                       "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": ids[:3], "max_tokens": 1})
        assert r.status_code == 200


def test_full_queue_answers_503(solo):
    from fastapi.testclient import TestClient

    app = create_app(solo, MODEL, max_waiting=0)
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:  # the warm-up request runs first
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert r.headers["retry-after"] == "1"  # a client knows when to come back: nothing dropped silently
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["x", "y"], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_choices"  # retrying can't help
        assert client.get("/health").status_code == 200
        scraped = metric_samples(client.get("/metrics").text)
        assert scraped[("mogelm:requests_rejected_total", (("reason", "overloaded"),))] == 1


def metric_samples(text: str) -> dict:
    """{(sample name, sorted labels): value} from a Prometheus text scrape, via prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for fam in text_string_to_metric_families(text) for smp in fam.samples}


def test_metrics_count_what_the_requests_report(server):
    before = metric_samples(httpx.get(server.url + "/metrics").text)
    kw = dict(model=MODEL, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    a = server.client.completions.create(prompt="The quick", **kw)
    chunks = list(server.client.completions.create(prompt="def add(a", stream=True,
                                                   stream_options={"include_usage": True}, **kw))
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    after = metric_samples(r.text)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    usage = [a.usage, chunks[-1].usage]
    assert delta("mogelm:prompt_tokens_total") == sum(u.prompt_tokens for u in usage)
    assert delta("mogelm:generation_tokens_total") == sum(u.completion_tokens for u in usage) == 12
    assert delta("mogelm:request_success_total", finished_reason="length") == 2
    for h in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert delta(f"mogelm:{h}_count") == 2
        assert delta(f"mogelm:{h}_sum") > 0
        assert after[(f"mogelm:{h}_bucket", (("le", "+Inf"),))] == after[(f"mogelm:{h}_count", ())]
    assert delta("mogelm:e2e_request_latency_seconds_sum") >= delta("mogelm:time_to_first_token_seconds_sum")
    # the engine's gauges and counters (Engine.stats through engine_stats): all done, every block free
    assert after[("mogelm:num_requests_running", ())] == 0 and after[("mogelm:num_requests_waiting", ())] == 0
    st = server.engine.stats()
    blocks = after[("mogelm:kv_blocks_free", ())] + after[("mogelm:kv_blocks_used", ())]
    assert blocks == st["kv_blocks_total"]
    assert after[("mogelm:kv_blocks_used", ())] == 0 and after[("mogelm:kv_cache_usage", ())] == 0
    assert delta("mogelm:generated_tokens_total") == 12
    # every engine stat is exported under its own name with its value (idle engine: nothing moves)
    for key in ("num_requests_running", "num_requests_waiting", "kv_blocks_used", "kv_blocks_free",
                "kv_cache_usage", "prefix_cache_queries_total", "prefix_cache_hits_total",
                "prefix_cache_hit_rate", "num_preemptions_total", "prompt_tokens_computed_total"):
        assert after[(f"mogelm:{key}", ())] == pytest.approx(st[key]), key
    assert {f"mogelm:{k}" for k in st} <= {name for name, _ in after}
    assert delta("mogelm:prefix_cache_queries_total") == usage[0].prompt_tokens + usage[1].prompt_tokens
    # a prompt no other test sends, two blocks and more: the second request reuses them
    long = server.engine.tokenizer.encode("Prometheus scrapes /metrics every fifteen seconds. " * 2)
    for _ in range(2):
        server.client.completions.create(model=MODEL, prompt=long, max_tokens=1)
    again = metric_samples(httpx.get(server.url + "/metrics").text)
    hits = again[("mogelm:prefix_cache_hits_total", ())] - after[("mogelm:prefix_cache_hits_total", ())]
    assert hits == (len(long) - 1) // 16 * 16 > 0
    assert 0 < again[("mogelm:prefix_cache_hit_rate", ())] == pytest.approx(server.engine.stats()[
        "prefix_cache_hit_rate"])


def test_engine_stats_hook_exports_numeric_fields():
    stats = {"kv_blocks_used": 3, "kv_blocks_free": 61, "prefix_cache_hits_total": 7,
             "prefix_cache_hit_rate": 0.25, "spec_decode_acceptance_rate": 0.5, "draining": True,
             "note": "not a number", "nan": float("nan")}
    scraped = metric_samples(ServerMetrics(lambda: stats).render()[0].decode())
    assert scraped[("mogelm:kv_blocks_used", ())] == 3 and scraped[("mogelm:kv_blocks_free", ())] == 61
    assert scraped[("mogelm:prefix_cache_hits_total", ())] == 7  # `_total` keys are counters
    assert scraped[("mogelm:prefix_cache_hit_rate", ())] == 0.25
    assert scraped[("mogelm:spec_decode_acceptance_rate", ())] == 0.5
    assert scraped[("mogelm:draining", ())] == 1
    assert not any(name in ("mogelm:note", "mogelm:nan") for name, _ in scraped)

    def broken():
        raise RuntimeError("engine is restarting")

    assert b"mogelm:prompt_tokens_total" in ServerMetrics(broken).render()[0]  # a scrape still answers


def test_request_id_echoed_generated_and_logged_with_user(server, caplog):
    caplog.set_level(logging.INFO, logger="mogelm.inference.server")
    body = {"model": MODEL, "prompt": "The quick", "max_tokens": 2, "user": "alice@example.org"}
    r = httpx.post(server.url + "/v1/completions", json=body, headers={"X-Request-Id": "trace-42"},
                   timeout=30)
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    r2 = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    generated = r2.headers["x-request-id"]
    assert len(generated) == 32 and generated != "trace-42"
    bad = httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"},
                     headers={"X-Request-Id": "trace-43"}, timeout=30)
    assert bad.status_code == 404 and bad.headers["x-request-id"] == "trace-43"  # errors carry it too
    lines = [rec.getMessage() for rec in caplog.records]
    assert any("trace-42" in m and "alice@example.org" in m for m in lines)  # the request line, with `user`
    assert any(m.startswith('trace-42 "POST /v1/completions" 200') for m in lines)  # the access line
    assert any(m.startswith(f'{generated} "POST /v1/completions" 200') for m in lines)


def test_logit_bias_forces_and_bans_tokens_as_the_logits_say(server):
    tok, model = server.engine.tokenizer, server.engine.model
    prompt = tok.encode("The quick")
    fox = tok.encode(" fox")[0]
    r = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                         logit_bias={str(fox): 100})
    assert r.choices[0].text == tok.decode([fox] * 5)
    # ban the greedy choice at every step: the server's tokens equal argmax(logits + bias) of an
    # uncached forward over the growing sequence
    first = int(model(torch.tensor([prompt]))[0, -1].argmax())
    bias_V = torch.zeros(model.cfg.vocab_size)
    bias_V[first] = -100.0
    ids, want = list(prompt), []
    with torch.no_grad():
        for _ in range(8):
            t = int((model(torch.tensor([ids]))[0, -1] + bias_V).argmax())
            if t == tok.eos_token_id:
                break
            want.append(t)
            ids.append(t)
    assert want[0] != first
    r = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                         logit_bias={str(first): -100})
    assert r.choices[0].text == tok.decode(want)


def test_neutral_penalties_and_off_values_are_accepted(server):
    r = server.client.completions.create(model=MODEL, prompt="The quick", max_tokens=2, temperature=0,
                                         presence_penalty=0, frequency_penalty=0,
                                         extra_body={"repetition_penalty": 1.0, "tools": None})
    assert r.usage.completion_tokens == 2


def test_penalties_with_the_openai_client_follow_the_logits(server):
    """Each penalty (the cases of test_engine_paged.PENALIZED, which change this model's tokens) sent
    with the official client, several requests at once: the text equals decoding the uncached
    forward's logits with the penalty applied as defined."""
    tok, model = server.engine.tokenizer, server.engine.model
    prompts = [tok.encode(t) for t in TEXTS]

    def ask(case):
        i, kw = case
        extra = {"ignore_eos": True, "repetition_penalty": kw.get("repetition_penalty"),
                 "top_k": kw.get("top_k")}
        r = server.client.completions.create(
            model=MODEL, prompt=prompts[i], max_tokens=24, temperature=kw["temperature"],
            top_p=kw.get("top_p"), seed=kw.get("seed"), presence_penalty=kw.get("presence_penalty"),
            frequency_penalty=kw.get("frequency_penalty"),
            extra_body={k: v for k, v in extra.items() if v is not None})
        return r.choices[0].text

    with ThreadPoolExecutor(len(PENALIZED)) as pool:
        got = list(pool.map(ask, PENALIZED))
    for (i, kw), text in zip(PENALIZED, got):
        want = penalized_reference(model, prompts[i], SP(max_tokens=24, ignore_eos=True, **kw))
        assert text == tok.decode(want), kw


@torch.no_grad()
def uncached_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] float64 log_softmax of one uncached forward: row p predicts token p + 1."""
    return torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)


def check_completion_logprobs(lp: dict, tok, ids: list[int], logp_TV, num_top: int, first: int) -> None:
    """The legacy `logprobs` object of ids[first:] against the uncached forward: each token's string,
    logprob, and its top-k (token string -> logprob, the chosen token included; strings shared by
    several ids, e.g. partial UTF-8 bytes, are matched against any of them)."""
    strings = [tok.decode([t]) for t in range(logp_TV.shape[1])]
    assert len(lp["tokens"]) == len(ids) - first
    for k, (s, lp_k, top) in enumerate(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])):
        t = ids[first + k]
        assert s == strings[t]
        if first + k == 0:  # echo: nothing predicts the first prompt token
            assert lp_k is None and top is None
            continue
        row = logp_TV[first + k - 1]
        assert lp_k == pytest.approx(float(row[t]), abs=1e-4)
        want_top = row.topk(num_top).indices.tolist()
        assert {strings[x] for x in want_top + [t]} == set(top)
        for key, v in top.items():
            assert min(abs(float(row[x]) - v) for x in range(len(strings)) if strings[x] == key) < 1e-4
    start = lp["text_offset"][0]  # each token's offset: where the strings before it end
    assert lp["text_offset"] == list(itertools.accumulate([start] + [len(s) for s in lp["tokens"][:-1]]))


def assert_same_logprobs(a: dict, b: dict) -> None:
    """Two legacy `logprobs` objects agree: tokens and offsets exactly, numbers to fp32 rounding (a
    request batched or chunked differently sums in another order)."""
    assert (a["tokens"], a["text_offset"]) == (b["tokens"], b["text_offset"])
    close = [None if x is None else pytest.approx(x, abs=1e-5) for x in a["token_logprobs"]]
    assert close == b["token_logprobs"]
    assert [None if x is None else set(x) for x in a["top_logprobs"]] == \
        [None if x is None else set(x) for x in b["top_logprobs"]]


def test_completion_logprobs_equal_the_uncached_forward(server, solo):
    tok, model = server.engine.tokenizer, server.engine.model
    prompt = tok.encode("def add(a")
    r = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, logprobs=5)
    ids = prompt + argmax_reference(model, prompt, 10, tok.eos_token_id)
    assert r.choices[0].text == tok.decode(ids[len(prompt):])
    logp = uncached_logprobs(model, ids)
    lp = r.choices[0].logprobs.model_dump()
    check_completion_logprobs(lp, tok, ids, logp, 5, first=len(prompt))
    assert lp["text_offset"][0] == 0
    # sampled, streamed: each chunk carries its own tokens' logprobs; together they are the whole
    kw = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=1.3, seed=5, logprobs=2,
              extra_body={"ignore_eos": True})
    whole = server.client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in server.client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    joined = {k: [x for c in chunks for x in c.logprobs.model_dump()[k]] for k in
              ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert_same_logprobs(joined, whole.logprobs.model_dump())
    assert sum(bool(c.logprobs.tokens) for c in chunks) > 3  # spread over the chunks, not all at the end
    same = solo.sampling_params(max_tokens=12, temperature=1.3, seed=5, ignore_eos=True)  # server defaults
    [out] = solo.generate([prompt], same)
    ids = prompt + out.token_ids
    check_completion_logprobs(joined, tok, ids, uncached_logprobs(model, ids), 2, first=len(prompt))
    assert joined["text_offset"][0] == 0


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(server):
    """lm-eval's loglikelihood request: token-id prompts, echo, logprobs 1, max_tokens 1. The prompts
    are longer than the server's chunk (32 tokens), so their logits come from several chunks, with a
    cached prefix (the first prompt ran before) and beside each other in one batch."""
    tok, model = server.engine.tokenizer, server.engine.model
    a = tok.encode(TEXTS[2] + " " + TEXTS[4])
    b = tok.encode(TEXTS[4] + " " + TEXTS[0])
    assert len(a) > 32 and len(b) > 32
    server.client.completions.create(model=MODEL, prompt=a, max_tokens=1)  # a is in the prefix cache now
    body = dict(model=MODEL, prompt=[a, b], echo=True, logprobs=1, max_tokens=1, temperature=0)
    r = server.client.completions.create(**body)
    for choice, prompt in zip(r.choices, (a, b)):
        ids = prompt + [argmax_reference(model, prompt, 1, None)[0]]
        assert choice.text == tok.decode(ids)
        lp = choice.logprobs.model_dump()
        check_completion_logprobs(lp, tok, ids, uncached_logprobs(model, ids), 1, first=0)
        # what lm-eval sums: the continuation's positions (all but the generated token)
        assert sum(lp["token_logprobs"][1:-1]) == pytest.approx(
            float(uncached_logprobs(model, prompt)[torch.arange(len(prompt) - 1), prompt[1:]].sum()),
            abs=1e-3)
    stream = server.client.completions.create(stream=True, **body)
    got = {}
    for c in stream:
        for key, v in c.choices[0].logprobs.model_dump().items():
            got.setdefault(c.choices[0].index, {}).setdefault(key, []).extend(v)
    for i, c in enumerate(r.choices):
        assert_same_logprobs(got[i], c.logprobs.model_dump())


def test_chat_logprobs_equal_the_uncached_forward(server, solo):
    tok, model = server.engine.tokenizer, server.engine.model
    msgs = [{"role": "user", "content": "def add(a"}]
    prompt = tok.encode(tok.apply_chat_template(msgs))
    stops = tok.chat_stop_token_ids()
    out = solo.generate([prompt], SP(max_tokens=8, temperature=0, stop_token_ids=stops))[0]
    ids = prompt + out.token_ids
    logp = uncached_logprobs(model, ids)
    kw = dict(model=MODEL, messages=msgs, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    r = server.client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.model_dump()["content"]
    streamed = [x for c in server.client.chat.completions.create(stream=True, **kw)
                if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.model_dump()["content"]]
    assert len(streamed) == len(content) == len(out.token_ids) > 0
    for a, b in zip(streamed, content):  # the second request reads the prefix cache: fp32 rounding differs
        assert (a["token"], [x["token"] for x in a["top_logprobs"]]) == \
            (b["token"], [x["token"] for x in b["top_logprobs"]])
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-5)
    for k, item in enumerate(content):
        t, row = ids[len(prompt) + k], logp[len(prompt) + k - 1]
        assert item["token"] == tok.decode([t]) and item["bytes"] == list(item["token"].encode())
        assert item["logprob"] == pytest.approx(float(row[t]), abs=1e-4)
        assert [x["logprob"] for x in item["top_logprobs"]] == pytest.approx(row.topk(3).values.tolist(),
                                                                             abs=1e-4)
    plain = server.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0,
                                                  logprobs=True)
    assert all(x.top_logprobs == [] for x in plain.choices[0].logprobs.content)


def test_n_choices_share_one_prefill_through_the_server(server, solo):
    tok = server.engine.tokenizer
    prompt = tok.encode("for i in range(10): print(i * i) and so every device gets")  # not cached yet
    before = server.engine.stats()["prompt_tokens_computed_total"]
    r = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, n=4)
    assert server.engine.stats()["prompt_tokens_computed_total"] - before == len(prompt)
    assert [c.text for c in r.choices] == [greedy_text(solo, tok.decode(prompt), 8)[0]] * 4
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 32
    hot = dict(temperature=1.2, top_k=0, top_p=1.0, ignore_eos=True, max_tokens=8)
    r = server.client.completions.create(model=MODEL, prompt=prompt, n=3, seed=21, temperature=1.2,
                                         top_p=1.0, max_tokens=8, extra_body={"top_k": 0, "ignore_eos": True})
    want = [tok.decode(solo.generate([prompt], SP(seed=21 + j, **hot))[0].token_ids) for j in range(3)]
    assert [c.text for c in r.choices] == want and len(set(want)) > 1
    deadline = time.monotonic() + 10
    while server.engine.stats()["kv_blocks_used"]:  # every block back once the choices finish
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_echo_prepends_the_prompt(server, solo):
    want, _ = greedy_text(solo, "def add(a", 6)
    r = server.client.completions.create(model=MODEL, prompt="def add(a", max_tokens=6, temperature=0,
                                         echo=True)
    assert r.choices[0].text == "def add(a" + want
    ids = solo.tokenizer.encode("The quick")
    stream = server.client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=4, temperature=0,
                                              echo=True, stream=True)
    texts = ["", ""]
    for c in stream:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == ["The quick" + greedy_text(solo, "The quick", 4)[0]] * 2


def test_tokenize_detokenize_and_tokenizer_info_in_vllms_shape(server, solo):
    tok = solo.tokenizer
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": "def add(a, b):"}).json()
    assert r["tokens"] == tok.encode("def add(a, b):") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == server.engine.max_len and "token_strs" not in r
    r = httpx.post(server.url + "/tokenize", json={"prompt": "</s>x", "add_special_tokens": False,
                                                   "return_token_strs": True}).json()
    assert r["tokens"][0] == tok.eos_token_id and r["token_strs"][0] == "</s>"
    msgs = [{"role": "user", "content": "The quick"}]
    chat = server.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1, temperature=0)
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": msgs}).json()
    assert r["count"] == chat.usage.prompt_tokens
    assert r["tokens"] == tok.encode(tok.apply_chat_template(msgs))
    d = httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": tok.encode("Servers answer")})
    assert d.json() == {"prompt": "Servers answer"}
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>"
    assert info["model_max_length"] == server.engine.max_len


def test_encode_texts_equals_the_tokenizers_encode(solo):
    tok = solo.tokenizer
    texts = ["The quick brown", "", "你好，世界。 def f():\n    return 1", "<s>x"]
    for add_bos in (False, True):
        saved = tok.add_bos_token
        tok.add_bos_token = add_bos
        try:
            assert encode_texts(tok, texts) == [tok.encode(t) for t in texts]
        finally:
            tok.add_bos_token = saved


def test_logprob_objects_have_openais_shapes(solo):
    tok = solo.tokenizer
    a, b = tok.encode("The")[0], tok.encode(" quick")[0]
    sa, sb = tok.decode([a]), tok.decode([b])
    entries = [None, TokenLogprob(a, -0.5, 1, [(a, -0.5), (b, -1.5)]), TokenLogprob(b, -2.0, 3, [(a, -0.1)])]
    legacy = completion_logprobs(tok, [b, a, b], entries)  # echo: the first prompt token has no logprob
    assert legacy["tokens"] == [sb, sa, sb] and legacy["token_logprobs"] == [None, -0.5, -2.0]
    assert legacy["top_logprobs"] == [None, {sa: -0.5, sb: -1.5}, {sa: -0.1, sb: -2.0}]  # chosen included
    assert legacy["text_offset"] == [0, len(sb), len(sb) + len(sa)]
    chat = chat_logprobs(tok, entries[1:])["content"]
    assert chat[1]["token"] == sb and chat[1]["logprob"] == -2.0
    assert chat[1]["bytes"] == list(sb.encode()) and chat[1]["top_logprobs"][0]["token"] == sa


def test_health_answers_within_100ms_while_a_maximal_request_is_tokenised(server):
    # the largest request that gets tokenised at all: as many prompts as the queue takes, each just
    # under the character bound (a longer one is refused before tokenisation, see below)
    s = server.state
    words = ("def add(a, b): return a + b. The quick brown fox. " * (s.max_prompt_chars // 40 + 1))
    prompt = words[:s.max_prompt_chars]
    num = min(s.max_waiting, (s.max_request_bytes - 1000) // (len(prompt) + 3))
    body = json.dumps({"model": MODEL, "prompt": [prompt] * num, "max_tokens": 1})
    assert len(body) <= s.max_request_bytes and num >= 100
    result = {}

    def big():
        t0 = time.perf_counter()
        result["r"] = httpx.post(server.url + "/v1/completions", content=body, timeout=120,
                                 headers={"content-type": "application/json"})
        result["s"] = time.perf_counter() - t0

    thread = threading.Thread(target=big)
    with httpx.Client(timeout=5) as c:
        c.get(server.url + "/health")  # connection opened before the big request
        thread.start()
        time.sleep(0.05)
        latencies = []
        while thread.is_alive():
            t0 = time.perf_counter()
            assert c.get(server.url + "/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.01)
    thread.join()
    assert result["r"].status_code == 400  # every prompt is longer than the context: the engine refuses
    assert result["r"].json()["error"]["code"] == "context_length_exceeded"
    assert len(latencies) >= 5, f"the big request took only {result['s']:.2f} s: nothing was measured"
    assert max(latencies) < 0.1, f"/health took up to {max(latencies) * 1e3:.0f} ms ({len(latencies)} polls)"
    # one prompt over the character bound is refused at once, without tokenising it
    r = server.client.with_options(max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        r.completions.create(model=MODEL, prompt="x" * (s.max_prompt_chars + 1), max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded"


@pytest.fixture(scope="module")
def secured(ckpt, one_thread):
    engine = Engine.from_pretrained(ckpt, max_batch=2)
    app = create_app(engine, MODEL, api_key="sekrit-key", max_request_bytes=4096)
    with serving_in_thread(app) as url:
        yield url


def test_api_key_with_the_official_client(secured):
    good = openai.OpenAI(base_url=secured + "/v1", api_key="sekrit-key", max_retries=0, timeout=30)
    assert good.completions.create(model=MODEL, prompt="The quick", max_tokens=2).usage.completion_tokens == 2
    assert [m.id for m in good.models.list().data] == [MODEL]
    wrong = openai.OpenAI(base_url=secured + "/v1", api_key="sekrit-kez", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model=MODEL, prompt="The quick", max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):  # no Authorization header at all
        good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                     extra_headers={"Authorization": openai.omit})
    for path in ("/v1/models", "/v1/nope", "/tokenizer_info"):
        assert httpx.get(secured + path).status_code == 401
    assert httpx.post(secured + "/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.post(secured + "/tokenize", json={"prompt": "x"},
                      headers={"Authorization": "Bearer sekrit-key"}).status_code == 200
    assert httpx.get(secured + "/health").status_code == 200  # operations stay open
    assert httpx.get(secured + "/metrics").status_code == 200


def test_bodies_over_the_limit_get_413_before_parsing(secured):
    auth = {"Authorization": "Bearer sekrit-key", "content-type": "application/json"}
    big = json.dumps({"model": MODEL, "prompt": "x" * 5000, "max_tokens": 1})
    r = httpx.post(secured + "/v1/completions", content=big, headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the gate counts what arrives
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000].encode()

    r = httpx.post(secured + "/v1/completions", content=chunked(), headers=auth)
    assert r.status_code == 413
    small = json.dumps({"model": MODEL, "prompt": "The quick", "max_tokens": 1}).encode()
    r = httpx.post(secured + "/v1/completions", content=iter([small[:10], small[10:]]), headers=auth)
    assert r.status_code == 200, r.text  # a chunked body under the limit is replayed intact
    r = httpx.post(secured + "/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 401  # the key is checked first: an anonymous caller learns nothing more


def test_non_loopback_without_key_warns():
    assert "without an API key" in exposure_warning("0.0.0.0", None)
    assert "without an API key" in exposure_warning("myhost.example", None)
    for host, key in (("127.0.0.1", None), ("::1", None), ("localhost", None), ("0.0.0.0", "k")):
        assert exposure_warning(host, key) is None


def test_api_key_flag_defaults_to_the_environment(monkeypatch):
    from mogelm.cli import build_parser

    monkeypatch.setenv("MOGELM_API_KEY", "from-env")
    argv = ["serve", "--model", "x"]
    assert build_parser(argv)[0].parse_args(argv).api_key == "from-env"
    argv += ["--api-key", "flag"]
    assert build_parser(argv)[0].parse_args(argv).api_key == "flag"


def _sse_events(lines) -> list:
    return [json.loads(x[6:]) if x != "data: [DONE]" else "[DONE]" for x in lines if x.startswith("data: ")]


def test_starting_ready_draining_and_the_shutdown_cut(ckpt, caplog):
    """/health through the life cycle; SIGTERM drains; requests past --shutdown-timeout are cut with an
    error event; no traceback. The engine is slowed (10 ms a step) so the timing is not a race."""
    caplog.set_level(logging.INFO)
    engine = Engine.from_pretrained(ckpt, max_batch=2)
    step, gate = engine.step, threading.Event()

    def slow_step():
        gate.wait(30)  # held until the test has seen "starting"
        time.sleep(0.01)
        return step()

    engine.step = slow_step
    app = create_app(engine, MODEL, shutdown_timeout=1.0)
    state = app.state.server
    sock = listen_socket("127.0.0.1", 0)
    srv = DrainingServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10), state)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 30
        while not srv.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.get(url + "/health")
        assert (r.status_code, r.json()) == (503, {"status": "starting"})
        gate.set()
        wait_ready(url)
        assert httpx.get(url + "/health").json() == {"status": "ready"}
        results = {}

        def stream(name, max_tokens):
            body = {"model": MODEL, "prompt": "The quick", "max_tokens": max_tokens, "ignore_eos": True,
                    "stream": True, "temperature": 0}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                results[name] = _sse_events(r.iter_lines())

        short = threading.Thread(target=stream, args=("short", 20))
        long = threading.Thread(target=stream, args=("long", 240))  # ~2.5 s at 10 ms a step: cut at 1 s
        long.start()
        short.start()
        time.sleep(0.2)
        srv.handle_exit(signal.SIGTERM, None)  # what the signal handler does
        r = httpx.get(url + "/health")
        assert (r.status_code, r.json()) == (503, {"status": "draining"})
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "shutting_down"
        short.join(30)
        long.join(30)
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop after draining"
    finally:
        gate.set()
        srv.should_exit = True
        thread.join(30)
        sock.close()
    assert results["short"][-1] == "[DONE]"
    assert results["short"][-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in results["short"][:-1]) != ""
    long_events = results["long"]
    assert long_events[-1] == "[DONE]" and long_events[-2]["error"]["code"] == "shutting_down"
    assert 1 < len(long_events) - 2 < 240  # some text came before the cut
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], \
        [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
