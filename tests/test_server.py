"""The OpenAI-compatible server, driven on loopback by the official `openai` client.

One server (uvicorn in a thread, on a socket bound to 127.0.0.1:0) serves the module; one test
starts `python -m mogelm serve` as a process and checks that SIGTERM drains a running stream.
"""

import asyncio
import contextlib
import json
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
from test_inference import argmax_reference, build_checkpoint

from mogelm.cli import main as cli_main
from mogelm.inference import Engine, SamplingParams
from mogelm.inference.loadgen import load_test
from mogelm.inference.server import create_app

MODEL = "tiny"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_inference._one_thread
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("inference"))


@pytest.fixture(scope="module")
def solo(ckpt):
    """A separate engine with one slot: the reference for everything the server returns."""
    return Engine.from_pretrained(ckpt, max_batch=1)


@contextlib.contextmanager
def serving_in_thread(app):
    """Run an ASGI app with uvicorn on a free loopback port in a thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive(), "server did not stop"


@pytest.fixture(scope="module")
def server(ckpt, _one_thread):
    engine = Engine.from_pretrained(ckpt, max_batch=8, chunk_size=32)
    with serving_in_thread(create_app(engine, MODEL)) as url:
        yield SimpleNamespace(url=url, engine=engine, client=openai.OpenAI(base_url=url + "/v1", api_key="x",
                                                                            max_retries=0, timeout=60))


def greedy_text(solo, prompt: str, max_tokens: int, **kw) -> tuple[str, int]:
    out = solo.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, **kw))[0]
    return out.text, out.completion_tokens


def test_health_and_models(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
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
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_full_queue_answers_503(solo):
    from fastapi.testclient import TestClient

    with TestClient(create_app(solo, MODEL, max_waiting=0)) as client:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert client.get("/health").status_code == 200
