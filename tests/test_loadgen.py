"""The load generator (inference/loadgen.py) and `mogelm bench serve`, against a stub server that
streams a fixed number of one-character chunks (no model), so every count is known."""

import asyncio
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from test_server import serving_in_thread

from mogelm.cli import main as cli_main
from mogelm.inference.loadgen import format_summary, load_test


def _stub_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "stub"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if body["model"] != "stub":
            return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
        n = body["max_tokens"]

        async def events():
            for _ in range(n):
                await asyncio.sleep(0.001)
                yield f"data: {json.dumps({'choices': [{'text': 'x'}]})}\n\n"
            usage = {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": n}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def stub_url():
    with serving_in_thread(_stub_app()) as url:
        yield url


def test_load_test_counts_tokens_and_times(stub_url):
    res = asyncio.run(load_test(stub_url + "/v1", concurrency=3, num_requests=7, max_tokens=5,
                                prompt_words=4))
    assert res["model"] == "stub" and res["url"] == stub_url  # first listed model; /v1 stripped
    assert (res["completed"], res["errors"], res["output_tokens"]) == (7, 0, 35)
    assert res["mean_prompt_tokens"] == 4
    for key in ("ttft_ms", "tpot_ms", "latency_ms"):
        s = res[key]
        assert 0 < s["p50"] <= s["p90"] <= s["p99"] and s["mean"] > 0, key
    assert res["ttft_ms"]["mean"] < res["latency_ms"]["mean"]
    # wall_s is rounded to the millisecond: the rate matches any wall time that rounds to it
    lo, hi = res["wall_s"] - 0.0005, res["wall_s"] + 0.0005
    assert 35 / hi - 0.01 <= res["output_tokens_per_s"] <= 35 / lo + 0.01


def test_failed_requests_are_counted_not_raised(stub_url, capsys):
    res = asyncio.run(load_test(stub_url, concurrency=2, num_requests=3, max_tokens=2, model="other"))
    assert (res["completed"], res["errors"]) == (0, 3) and res["error_examples"][0].startswith("HTTP 404")
    assert res["ttft_ms"] == {"mean": None, "p50": None, "p90": None, "p99": None}
    argv = ["bench", "serve", "--url", stub_url, "--model", "other", "--requests", "2", "--concurrency", "1"]
    assert cli_main(argv) == 1  # any failed request: exit status 1
    assert "0/2 requests ok, 2 errors" in capsys.readouterr().out


def test_format_summary():
    ms = {"mean": 2.0, "p50": 1.5, "p90": 3.0, "p99": 4.31}
    res = {"completed": 9, "requests": 10, "errors": 1, "concurrency": 4, "mean_prompt_tokens": 33.0,
           "max_tokens": 8,
           "wall_s": 1.5, "requests_per_s": 6.0, "output_tokens_per_s": 48.0, "ttft_ms": ms,
           "tpot_ms": {"mean": None, "p50": None, "p90": None, "p99": None}, "latency_ms": ms,
           "error_examples": ["HTTP 500: boom"]}
    assert format_summary(res).splitlines() == [
        "9/10 requests ok, 1 errors, concurrency 4, 33.0 prompt + 8 output tokens each, 1.50 s",
        "throughput: 6.00 req/s, 48.0 output tokens/s",
        "TTFT     ms: mean 2.0  p50 1.5  p90 3.0  p99 4.3",
        "latency  ms: mean 2.0  p50 1.5  p90 3.0  p99 4.3",
        "error: HTTP 500: boom",
    ]


@pytest.mark.parametrize("url, message",
                         [("http://10.1.2.3:8000", "loopback"), ("ftp://x", "must look like")])
def test_bench_refuses_remote_or_bad_url(capsys, url, message):
    assert cli_main(["bench", "serve", "--url", url]) == 2
    assert message in capsys.readouterr().err
