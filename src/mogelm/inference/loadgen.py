"""An HTTP load generator for an OpenAI-compatible server (what `mogelm bench serve` runs).

    import asyncio
    from mogelm.inference.loadgen import load_test, format_summary
    res = asyncio.run(load_test("http://127.0.0.1:8000", concurrency=8, num_requests=64, max_tokens=32))
    print(format_summary(res))

Each request streams a completion (`ignore_eos`, so it generates exactly max_tokens tokens) of a
synthetic prompt (words, or with `prompt_tokens` that many random token ids in [0, prompt_vocab),
1000 by default, which any real vocabulary holds); at most `concurrency` are in flight. Reported:
errors, wall time, requests/s, output tokens/s, and per request TTFT (time to the first text
chunk), TPOT (time per output token after the first: (latency - TTFT) / (tokens - 1)) and
end-to-end latency, as mean / p50 / p90 / p99 in milliseconds; when the server speculates
(its /metrics has the spec_decode_* counters, read before and after the load), the run's draft
tokens, accepted tokens, verify rows, acceptance rate and mean accepted length ("speculative",
None otherwise). The load is bounded: num_requests
in total, each with `timeout`, all within `deadline`. Needs httpx (the `serve` extra).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time

WORDS = ("the model reads tokens and every group of experts gets the same share of work while the "
         "server streams text back to many clients at once").split()


def describe_error(e: BaseException) -> str:
    """An exception as a reason a person can read: its message, or its type when the message is
    empty (httpx's timeouts have none), e.g. 'ConnectTimeout (no connection within the timeout)'."""
    text = str(e).strip()
    if text:
        return text
    name = type(e).__name__
    hint = {"ConnectTimeout": "no connection within the timeout",
            "ReadTimeout": "no answer within the timeout",
            "WriteTimeout": "could not send within the timeout", "PoolTimeout": "no free connection in time"}
    return f"{name} ({hint[name]})" if name in hint else name


def _summary(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    v = sorted(values)

    def q(f):
        return v[min(len(v) - 1, int(round(f * (len(v) - 1))))]

    return {"mean": statistics.fmean(v), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


async def _one(client, model: str, prompt: str | list[int], max_tokens: int, timeout: float) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    state = {"ttft": None, "tokens": 0, "prompt_tokens": 0, "error": None}

    async def consume():
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                state["error"] = f"HTTP {resp.status_code}: {resp.text[:200]}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    return
                d = json.loads(data)
                if "error" in d:
                    state["error"] = d["error"].get("message", "error")
                    return
                if state["ttft"] is None and d.get("choices") and d["choices"][0].get("text"):
                    state["ttft"] = time.perf_counter() - t0
                if d.get("usage"):
                    state["tokens"] = d["usage"]["completion_tokens"]
                    state["prompt_tokens"] = d["usage"]["prompt_tokens"]

    try:
        await asyncio.wait_for(consume(), timeout)
    except asyncio.TimeoutError:
        state["error"] = f"timed out after {timeout} s"
    except Exception as e:  # connection refused or reset, bad JSON, ...: counted, never fatal
        state["error"] = f"{type(e).__name__}: {describe_error(e)}"
    ttft, tokens, error = state["ttft"], state["tokens"], state["error"]
    latency = time.perf_counter() - t0
    if error is None and (ttft is None or tokens == 0):
        error = "no tokens received"
    return {"error": error, "ttft": ttft, "latency": latency, "tokens": tokens,
            "prompt_tokens": state["prompt_tokens"]}


async def load_test(url: str, concurrency: int, num_requests: int, max_tokens: int, prompt_words: int = 32,
                    model: str | None = None, timeout: float = 120.0, deadline: float = 600.0,
                    seed: int = 0, prompt_tokens: int | None = None, prompt_vocab: int = 1000) -> dict:
    """Run the load and return the measurements (a JSON-ready dict). `model` None: the first one
    /v1/models lists. Failed requests are counted in "errors", never raised."""
    import httpx

    base = url.rstrip("/").removesuffix("/v1")
    rng = random.Random(seed)
    if prompt_tokens:
        prompts = [[rng.randrange(prompt_vocab) for _ in range(prompt_tokens)] for _ in range(num_requests)]
    else:
        prompts = [" ".join(rng.choice(WORDS) for _ in range(prompt_words)) for _ in range(num_requests)]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:
        if model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        spec_before = await _spec_counters(client)
        sem = asyncio.Semaphore(concurrency)

        async def bounded(prompt):
            async with sem:
                return await _one(client, model, prompt, max_tokens, timeout)

        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(bounded(p)) for p in prompts]
        done, pending = await asyncio.wait(tasks, timeout=deadline)
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - t0
        spec_after = await _spec_counters(client)
    results = [t.result() for t in done] + [{"error": "deadline exceeded"}] * len(pending)
    ok = [r for r in results if r["error"] is None]
    errors = [r["error"] for r in results if r["error"] is not None]
    total_tokens = sum(r["tokens"] for r in ok)
    ms = lambda xs: {k: (None if v is None else round(v * 1e3, 2)) for k, v in _summary(xs).items()}
    return {
        "url": base, "model": model, "concurrency": concurrency, "requests": num_requests,
        "max_tokens": max_tokens, "prompt_words": None if prompt_tokens else prompt_words,
        "prompt_tokens": prompt_tokens, "completed": len(ok), "errors": len(errors),
        "error_examples": errors[:3],
        "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 3),
        "mean_prompt_tokens": round(statistics.fmean([r["prompt_tokens"] for r in ok]), 1) if ok else None,
        "output_tokens": total_tokens, "output_tokens_per_s": round(total_tokens / wall, 2),
        "ttft_ms": ms([r["ttft"] for r in ok]),
        "tpot_ms": ms([(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]),
        "latency_ms": ms([r["latency"] for r in ok]),
        "speculative": _spec_summary(spec_before, spec_after),
    }


SPEC_COUNTERS = ("spec_decode_draft_tokens_total", "spec_decode_accepted_tokens_total",
                 "spec_decode_num_drafts_total")


async def _spec_counters(client) -> dict[str, float] | None:
    """The server's speculative-decoding counters from /metrics (None if it has none or no /metrics)."""
    try:
        r = await client.get("/metrics")
        if r.status_code != 200:
            return None
    except Exception:  # an OpenAI-compatible server without /metrics: nothing to report
        return None
    found = {}
    for line in r.text.splitlines():
        name, _, value = line.partition(" ")
        key = name.removeprefix("mogelm:")
        if key in SPEC_COUNTERS:
            found[key] = float(value)
    return found if len(found) == len(SPEC_COUNTERS) else None


def _spec_summary(before: dict | None, after: dict | None) -> dict | None:
    """Drafts proposed and accepted during the run (differences of the counters), the acceptance
    rate and the mean accepted length (tokens per verify row, the target's own token included);
    None when the server did not speculate."""
    if before is None or after is None:
        return None
    d = {k.removeprefix("spec_decode_").removesuffix("_total"): after[k] - before[k] for k in SPEC_COUNTERS}
    if d["num_drafts"] <= 0:
        return None
    return {"draft_tokens": int(d["draft_tokens"]), "accepted_tokens": int(d["accepted_tokens"]),
            "verify_rows": int(d["num_drafts"]),
            "acceptance_rate": round(d["accepted_tokens"] / max(d["draft_tokens"], 1), 4),
            "mean_accepted_length": round(1 + d["accepted_tokens"] / d["num_drafts"], 4)}


def format_summary(res: dict) -> str:
    """The measurements of load_test as a few lines of text."""
    lines = [
        f"{res['completed']}/{res['requests']} requests ok, {res['errors']} errors, concurrency "
        f"{res['concurrency']}, {res['mean_prompt_tokens']} prompt + {res['max_tokens']} output tokens each, "
        f"{res['wall_s']:.2f} s",
        f"throughput: {res['requests_per_s']:.2f} req/s, {res['output_tokens_per_s']:.1f} output tokens/s",
    ]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("latency_ms", "latency")):
        s = res[key]
        if s["mean"] is not None:
            lines.append(f"{name:8s} ms: mean {s['mean']:.1f}  p50 {s['p50']:.1f}  p90 {s['p90']:.1f}  "
                         f"p99 {s['p99']:.1f}")
    spec = res.get("speculative")
    if spec:
        lines.append(f"speculative: acceptance rate {spec['acceptance_rate']:.3f}, mean accepted length "
                     f"{spec['mean_accepted_length']:.2f} ({spec['accepted_tokens']}/{spec['draft_tokens']} "
                     f"drafts over {spec['verify_rows']} verify rows)")
    lines += [f"error: {e}" for e in res["error_examples"]]
    return "\n".join(lines)
