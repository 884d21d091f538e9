"""Prometheus metrics of the OpenAI-compatible server (`GET /metrics`, text exposition format 0.0.4).

    metrics = ServerMetrics(lambda: engine_stats(engine))
    timer = metrics.request_timer(arrival=time.perf_counter())   # one per engine request (choice)
    timer.observe(out)                                           # every RequestOutput it receives
    body, content_type = metrics.render()

    curl -s http://127.0.0.1:8000/metrics | grep '^mogelm:'

Names follow vLLM's (`vllm:num_requests_running` ... -> `mogelm:...`), so dashboards carry over.
Measured in the server, from the outputs each request receives (one "request" here is one engine
request, i.e. one choice: a completion with n=2 or two prompts counts twice):

  mogelm:prompt_tokens_total, mogelm:generation_tokens_total           counters
  mogelm:request_success_total{finished_reason="stop"|"length"|"abort"|"error"}
  mogelm:requests_rejected_total{reason="overloaded"|"shutting_down"|...}   answered 429/503, not run
  mogelm:time_to_first_token_seconds        arrival at the server -> first generated token
  mogelm:time_per_output_token_seconds      (last token - first token) / (tokens - 1), per request
  mogelm:e2e_request_latency_seconds        arrival -> finished

The engine's own numbers come through one hook, `stats_fn() -> dict[str, number]`, read at every
scrape. The server passes `engine_stats(engine)`, i.e. `Engine.stats()`. Every numeric field
`key` is exported as `mogelm:key`; keys ending in `_total` are counters, the others gauges. Keys
the dashboards expect (an engine returns those it has):

  num_requests_running, num_requests_waiting            requests in a cache slot / queued for one
  kv_blocks_used, kv_blocks_free, kv_cache_usage        paged cache (usage in [0, 1])
  kv_blocks_total, kv_blocks_cached, kv_cache_tokens     pool size, blocks kept for prefix reuse
  num_preemptions_total, generated_tokens_total         scheduler and engine counters
  prefix_cache_queries_total, prefix_cache_hits_total   tokens looked up / found in the prefix cache
  prefix_cache_hit_rate                                 hits / queries since start, in [0, 1]
  spec_decode_draft_tokens_total, spec_decode_accepted_tokens_total   drafts proposed / accepted
  spec_decode_num_drafts_total                          verify rows (one per sequence and step)
  spec_decode_acceptance_rate, spec_decode_mean_accepted_length   accepted / drafts; tokens per
                                                        verify row (1 + accepted / verify rows)
  spec_decode_draft_length                              drafts per sequence the policy chose for the
                                                        last step (0: speculation off; spec_policy.py)

Each ServerMetrics has its own CollectorRegistry, so several apps in one process (tests) never share
counters. prometheus_client is thread-safe: timers are fed from the engine thread.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("mogelm.inference.metrics")
PREFIX = "mogelm:"
# The classic text format, which every Prometheus version reads; our names need none of 1.0.0's escaping.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Bucket upper bounds in seconds: TTFT spans a cached short prompt on a GPU to a long prompt queued
# behind others on a CPU; TPOT spans one fast decode step to a loaded CPU's.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.75, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def engine_stats(engine) -> dict[str, float]:
    """The engine's numbers for /metrics (Engine.stats(): gauges, and counters named `*_total`)."""
    return dict(engine.stats())


class _EngineCollector:
    """Exports stats_fn()'s numeric fields at scrape time (see the module docstring for the names)."""

    def __init__(self, stats_fn: Callable[[], dict]):
        self.stats_fn = stats_fn

    def collect(self):
        try:
            stats = self.stats_fn()
        except Exception as e:  # a scrape must not fail because the engine is mid-change
            log.warning("engine stats unavailable: %s: %s", type(e).__name__, e)
            return
        for key, value in sorted(stats.items()):
            if isinstance(value, bool):
                value = int(value)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            name = PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", key)
            if name.endswith("_total"):
                yield CounterMetricFamily(name[:-len("_total")], f"engine stat {key}", value=value)
            else:
                yield GaugeMetricFamily(name, f"engine stat {key}", value=value)


class ServerMetrics:
    def __init__(self, stats_fn: Callable[[], dict] | None = None):
        self.registry = r = CollectorRegistry()
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Finished requests by finish reason",
                                       ["finished_reason"], registry=r)
        self.requests_rejected = Counter(PREFIX + "requests_rejected",
                                         "Requests answered 429/503 without running (overload, shutdown)",
                                         ["reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Arrival at the server to the first generated token", buckets=TTFT_BUCKETS,
                              registry=r)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds",
                              "Mean time between generated tokens of one request", buckets=TPOT_BUCKETS,
                              registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival at the server to finished",
                             buckets=E2E_BUCKETS, registry=r)
        if stats_fn is not None:
            r.register(_EngineCollector(stats_fn))

    def request_timer(self, arrival: float) -> RequestTimer:
        """A timer for one engine request that arrived at `arrival` (time.perf_counter())."""
        return RequestTimer(self, arrival)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE


class RequestTimer:
    """Turns one request's RequestOutputs into the counters and histograms above."""

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self.m, self.arrival = metrics, arrival
        self.first: float | None = None  # time of the first generated token
        self.completion_tokens = 0

    def observe(self, out) -> None:
        now = time.perf_counter()
        if self.first is None and out.completion_tokens > 0:  # the prompt has been prefilled
            self.first = now
            self.m.ttft.observe(now - self.arrival)
            self.m.prompt_tokens.inc(out.prompt_tokens)
        if out.completion_tokens > self.completion_tokens:
            self.m.generation_tokens.inc(out.completion_tokens - self.completion_tokens)
            self.completion_tokens = out.completion_tokens
        if out.finished:
            self.m.request_success.labels(out.finish_reason or "unknown").inc()
            self.m.e2e.observe(now - self.arrival)
            if self.first is not None and self.completion_tokens > 1:
                self.m.tpot.observe((now - self.first) / (self.completion_tokens - 1))
