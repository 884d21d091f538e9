"""An OpenAI-compatible HTTP API over the engine (FastAPI + uvicorn, loopback by default).

    app = create_app(engine, "final", api_key=None)     # an ASGI app; its lifespan runs the engine thread
    serve(app, listen_socket("127.0.0.1", 8000))        # what `mogelm serve` does (mogelm/commands/serve.py)
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "final", "prompt": "def main(", "max_tokens": 32, "temperature": 0}'

Endpoints: GET /health, GET /metrics (Prometheus, mogelm/inference/metrics.py), GET /v1/models,
POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent events,
`stream_options.include_usage`, and usage counts), and vLLM's POST /tokenize, POST /detokenize,
GET /tokenizer_info (what lm-evaluation-harness' `tokenizer_backend=remote` calls). Extensions as in
vLLM: `top_k`, `stop_token_ids`, `ignore_eos`, `repetition_penalty`. Omitted temperature / top_p /
top_k take the checkpoint's generation_config.json values, else the Pangu docs' 0.6 / 0.95 / 50.

The model runs on one background thread (EngineThread) that steps the engine whenever requests
are in flight; handlers only queue requests and await per-request asyncio queues, and tokenisation
(HF tokenizers' encode_batch, which releases the GIL) runs in a worker thread, so the event loop
stays responsive whatever one request carries. Handlers are module-level functions; what they share
is a ServerState on `app.state.server`.

Before any handler, one ASGI middleware (ServerGate) gives each request an id (the client's
`X-Request-Id`, else a new one; echoed in the response and in the log lines), checks
`Authorization: Bearer <api key>` on /v1/*, /tokenize, /detokenize and /tokenizer_info when the
server has a key (constant-time comparison; 401 otherwise; /health and /metrics stay open), and
answers 413 to a body over the size limit before anything parses it.

Invalid requests get a 4xx with an OpenAI-style body {"error": {"message", "type", "param", "code"}}:
unknown fields and fields the server does not implement (`tools`, `response_format`, ...) are a 400
naming the field (these shapes and checks live in mogelm/inference/protocol.py). Prompt and
context limits are the engine's (Engine.check_request raises RequestError), sampling values
SamplingParams' own (InvalidSampling); both become a 400. A full queue is a 503 with Retry-After
(counted in mogelm:requests_rejected_total), never a silent drop.

Life cycle, as /health reports it: "starting" (503) while a two-token warm-up request runs (the
first kernel launches, compilation), "ready" (200), then on SIGTERM/SIGINT "draining" (503): new
requests get 503 + Retry-After, running ones finish; after --shutdown-timeout the rest are cut:
their streams end with an error event and `data: [DONE]`, their non-streamed replies are a 503.
Then uvicorn closes the connections and the process exits with status 0. A second signal stops at
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mogelm.inference.engine import Engine, EngineThread, RequestError, RequestOutput
from mogelm.inference.metrics import ServerMetrics, engine_stats
from mogelm.inference.protocol import (
    MAX_N,
    APIError,
    ChatMessage,
    ChatRequest,
    ChoiceLogprobs,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
    api_error_handler,
    check_fields,
    error_body,
    error_response,
    http_error_handler,
    validation_error_handler,
)
from mogelm.inference.sampling import MAX_LOGPROBS, InvalidSampling, SamplingParams

log = logging.getLogger("mogelm.inference.server")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # as OpenAI; chat defaults to the rest of the context
# 2 MiB: ~500 k tokens of text, ~300 k as token ids. Parsing holds the event loop (json.loads is C code
# under the GIL): 3.5 MB of token ids took 100 ms to parse and 25-50 ms to validate on the dev machine.
DEFAULT_MAX_REQUEST_BYTES = 2 << 20
RETRY_AFTER_S = 1  # what 503 answers tell clients to wait
CUT_GRACE_S = 5.0  # after cutting requests at the shutdown timeout, time to send their error events

_AUTH_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")


def _unavailable(s: ServerState, message: str, reason: str) -> APIError:
    """A 503 the client should retry (overload, shutdown), counted in mogelm:requests_rejected_total."""
    s.metrics.requests_rejected.labels(reason).inc()
    return APIError(503, message, None, reason, "server_error", {"Retry-After": str(RETRY_AFTER_S)})


async def _internal_error(request: Request, e: Exception):
    log.exception("%s: unhandled error", _request_id(request))
    return error_response(500, f"internal error: {type(e).__name__}", code="internal_error")


# --- the gate in front of every route ----------------------------------------------------------
class ServerGate:
    """Pure ASGI middleware, in this order: request id (X-Request-Id in, out, and in the access log
    line), API key (401), body size (413 before the body is parsed; a body without Content-Length
    is read up to the limit and then handed on)."""

    def __init__(self, app, state: ServerState):
        self.app, self.s = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get("x-request-id", "")
        if not (0 < len(rid) <= 128 and rid.isprintable() and rid.isascii()):
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        t0, status = time.perf_counter(), [0]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                   (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            response = self._refuse(scope["path"], headers)
            if response is None and scope["method"] in ("POST", "PUT", "PATCH"):
                response, receive = await self._limit_body(headers, receive)
            await (response or self.app)(scope, receive, send_with_id)
        finally:
            log.info('%s "%s %s" %d %.1f ms', rid, scope["method"], scope["path"], status[0],
                     (time.perf_counter() - t0) * 1e3)

    def _refuse(self, path: str, headers: dict[str, str]) -> JSONResponse | None:
        key = self.s.api_key
        if not key or not (path == "/v1" or path.startswith(_AUTH_PREFIXES)):
            return None
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode()):
            return None
        return error_response(401, "Invalid or missing API key: send `Authorization: Bearer <key>` with "
                                    "the key the server was started with (--api-key / MOGELM_API_KEY).",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _limit_body(self, headers, receive):
        limit = self.s.max_request_bytes
        too_big = error_response(413, f"The request body is larger than this server's limit of {limit} "
                                       "bytes (--max-request-bytes).", code="request_too_large")
        length = headers.get("content-length")
        if length is not None:
            return (too_big if not length.isdigit() or int(length) > limit else None), receive
        messages, size = [], 0  # no Content-Length (chunked): read up to the limit, then replay
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > limit:
                return too_big, receive
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        replay = iter(messages)

        async def replayed():
            return next(replay, None) or await receive()

        return None, replayed


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "-")


# --- what the handlers share -------------------------------------------------------------------
@dataclass
class ServerState:
    engine: Engine
    model_name: str
    max_waiting: int = 1024  # queued requests before answering 503
    shutdown_timeout: float = 60.0  # seconds running requests may take to finish once shutdown starts
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_prompt_tokens: int | None = None  # None: the context length
    warmup: bool = True
    runner: EngineThread = field(init=False)
    metrics: ServerMetrics = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))
    phase: Literal["starting", "ready", "draining", "failed"] = "starting"
    admitting: int = 0  # generation requests between arrival and their engine requests being queued
    streams: int = 0  # streams still sending
    drain_deadline: float = 0.0
    cut: bool = False  # requests were cut at the shutdown timeout

    def __post_init__(self):
        self.runner = EngineThread(self.engine)
        self.metrics = ServerMetrics(lambda: engine_stats(self.engine))
        self.prompt_token_cap = min(self.max_prompt_tokens or self.engine.max_len, self.engine.max_len)
        # A prompt of more characters than the cap times the longest vocabulary entry cannot fit, so
        # it is refused without spending seconds tokenising it (vocabulary entries hold at least as
        # many characters as the text they stand for: byte-level BPE stores one per byte).
        tok = self.engine.tokenizer
        longest = max((len(t) for t in tok.tok.get_vocab()), default=1) if tok is not None else 1
        self.max_prompt_chars = self.prompt_token_cap * max(longest, 1)

    def start(self) -> None:
        self.runner.start()
        if not self.warmup:
            self.phase = "ready"
            return
        t0 = time.perf_counter()

        def warmed(out: RequestOutput):
            if out.finished and self.phase == "starting":
                self.phase = "failed" if out.finish_reason == "error" else "ready"
                log.info("warm-up finished in %.2f s: %s", time.perf_counter() - t0, self.phase)

        tok = self.engine.tokenizer
        first = tok.bos_token_id if tok is not None and tok.bos_token_id is not None else 0
        self.engine.add_request([first], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                                on_output=warmed, request_id="warmup")
        self.runner.wake()

    def begin_drain(self) -> None:
        self.phase = "draining"
        self.drain_deadline = time.monotonic() + self.shutdown_timeout
        log.info("shutting down: running requests have %.0f s to finish; new requests get 503",
                 self.shutdown_timeout)

    def drain_done(self, now: float) -> bool:
        """Polled while draining: True once nothing runs (or the cut requests had their grace)."""
        if self.admitting == 0 and self.streams == 0 and not self.engine.has_unfinished():
            return True
        if not self.cut and now >= self.drain_deadline:
            self.cut = True
            log.warning("shutdown timeout (%.0f s): cutting the requests still running",
                        self.shutdown_timeout)
            self.engine.abort_all()
        return self.cut and now >= self.drain_deadline + CUT_GRACE_S


def _state(request: Request) -> ServerState:
    return request.app.state.server


@asynccontextmanager
async def _lifespan(app: FastAPI):
    state: ServerState = app.state.server
    state.start()
    try:
        yield
    finally:  # the connections have closed; let the engine finish what is left (normally nothing)
        await asyncio.to_thread(state.runner.stop, True, CUT_GRACE_S + state.shutdown_timeout)


# --- handlers: operations ----------------------------------------------------------------------
async def health(request: Request):
    s = _state(request)
    return JSONResponse({"status": s.phase}, status_code=200 if s.phase == "ready" else 503)


async def metrics(request: Request):
    body, content_type = _state(request).metrics.render()
    return Response(body, media_type=content_type)


async def models(request: Request):
    s = _state(request)
    return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": s.created,
                                        "owned_by": "mogelm", "max_model_len": s.engine.max_len}]}


# --- handlers: tokenizer (vLLM's shapes) -------------------------------------------------------
def encode_texts(tokenizer, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each text, as `tokenizer.encode` (mogelm.inference.chat.Tokenizer) gives them
    (BOS prepended when the checkpoint asks for it and add_special_tokens), through encode_batch:
    unlike encode it releases the GIL while it works, so a worker thread running it leaves the event
    loop free. One text per call: a batch would be spread over every core by the tokenizer's thread
    pool, and one request must not take the whole machine from the others."""
    ids = [tokenizer.tok.encode_batch([t], add_special_tokens=False)[0].ids for t in texts]
    bos = tokenizer.bos_token_id
    if add_special_tokens and tokenizer.add_bos_token:
        ids = [x if x and x[0] == bos else [bos] + x for x in ids]
    return ids


def _check_model(s: ServerState, model: str | None) -> None:
    if model is not None and model != s.model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{s.model_name}`.",
                       "model", "model_not_found")


def _render_chat(s: ServerState, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
    try:
        return s.engine.tokenizer.apply_chat_template([m.model_dump() for m in messages],
                                                      add_generation_prompt)
    except ValueError as e:
        raise APIError(400, str(e), "messages", "invalid_value") from None


def _tokenize(s: ServerState, texts: list[str], param: str, add_special_tokens: bool = True
              ) -> list[list[int]]:
    """Runs in a worker thread: the character bound (see ServerState), then encode_texts."""
    for t in texts:
        if len(t) > s.max_prompt_chars:
            raise APIError(400, f"The prompt has {len(t)} characters, more than fit in this server's "
                                f"{s.prompt_token_cap} prompt tokens.", param, "context_length_exceeded")
    return encode_texts(s.engine.tokenizer, texts, add_special_tokens)


def _check_prompt_tokens(s: ServerState, prompt_ids: list[list[int]], param: str) -> None:
    """--max-prompt-tokens (the context itself is the engine's check)."""
    cap = s.max_prompt_tokens
    for p in prompt_ids:
        if cap is not None and len(p) > cap:
            raise APIError(400, f"The prompt has {len(p)} tokens; this server accepts at most {cap} "
                                "(--max-prompt-tokens).", param, "context_length_exceeded")


async def tokenize(body: TokenizeRequest, request: Request):
    s = _state(request)
    _check_model(s, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of `prompt` and `messages`", "prompt", "invalid_value")
    if body.messages is not None:
        check_fields(None, body.messages)

        def work():
            text = _render_chat(s, body.messages, body.add_generation_prompt)
            return _tokenize(s, [text], "messages", bool(body.add_special_tokens))[0]
    else:
        add = True if body.add_special_tokens is None else body.add_special_tokens

        def work():
            return _tokenize(s, [body.prompt], "prompt", add)[0]

    ids = await asyncio.to_thread(work)
    out = {"count": len(ids), "max_model_len": s.engine.max_len, "tokens": ids}
    if body.return_token_strs:
        tok = s.engine.tokenizer.tok
        out["token_strs"] = [tok.id_to_token(i) for i in ids]
    return out


async def detokenize(body: DetokenizeRequest, request: Request):
    s = _state(request)
    _check_model(s, body.model)
    vocab = s.engine.model.cfg.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", "tokens", "invalid_value")
    text = await asyncio.to_thread(s.engine.tokenizer.decode, body.tokens)
    return {"prompt": text}


async def tokenizer_info(request: Request):
    tok = _state(request).engine.tokenizer
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token,
            "eos_token": tok.eos_token, "pad_token": None, "add_bos_token": tok.add_bos_token,
            "chat_template": tok.chat_template, "model_max_length": _state(request).engine.max_len}


# --- handlers: generation ----------------------------------------------------------------------
def _check_common(s: ServerState, body: SamplingFields, messages: list[ChatMessage] = ()) -> None:
    """The API's own checks; prompt and context limits are the engine's (see _submit)."""
    check_fields(body.model_extra, messages)
    _check_model(s, body.model)
    if not 1 <= body.n <= MAX_N:
        raise APIError(400, f"n must be in [1, {MAX_N}], got {body.n}", "n", "invalid_value")
    if s.phase == "draining":
        raise _unavailable(s, "the server is shutting down; retry on another replica or later",
                           "shutting_down")


def _check_queue(s: ServerState, num_requests: int, param: str) -> None:
    if num_requests > max(s.max_waiting, 1):
        raise APIError(400, f"this request asks for {num_requests} completions (prompts x n); the server "
                            f"queues at most {s.max_waiting}", param, "too_many_choices")
    if s.engine.num_waiting + num_requests > s.max_waiting:
        raise _unavailable(s, "the server is overloaded; retry later", "overloaded")


def _logit_bias(s: ServerState, body: SamplingFields) -> dict[int, float] | None:
    if not body.logit_bias:
        return None
    vocab, out = s.engine.model.cfg.vocab_size, {}
    for key, bias in body.logit_bias.items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab:
            raise APIError(400, f"logit_bias keys must be token ids in [0, {vocab}), got {key!r}",
                           "logit_bias", "invalid_value")
        out[int(key)] = bias
    return out


def _sampling_params(s: ServerState, body: SamplingFields, max_tokens: int, logprobs: int | None,
                     prompt_logprobs: int | None, extra_stop_ids=()) -> SamplingParams:
    """Every sampling field validated by SamplingParams (400 invalid_value naming the field)."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        params = s.engine.sampling_params(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
            seed=body.seed, stop=stop, ignore_eos=body.ignore_eos,
            stop_token_ids=list(body.stop_token_ids or []) + list(extra_stop_ids),
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, logit_bias=_logit_bias(s, body),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    except InvalidSampling as e:
        raise APIError(400, str(e), e.param, "invalid_value") from None
    return params


def _prompt_list(p) -> list[str | list[int]]:
    if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)):
        return [p]
    return list(p)


async def completions(body: CompletionRequest, request: Request):
    s = _state(request)
    arrival = time.perf_counter()
    _check_common(s, body)
    prompts = _prompt_list(body.prompt)
    if not prompts:
        raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
    params = _sampling_params(s, body, max_tokens, body.logprobs,
                              body.logprobs if body.echo else None)
    _check_queue(s, len(prompts) * body.n, "prompt")
    with _admitting(s):
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(await asyncio.to_thread(_tokenize, s, texts, "prompt") if texts else [])
        prompt_ids = [next(encoded) if isinstance(p, str) else list(p) for p in prompts]
        _check_prompt_tokens(s, prompt_ids, "prompt")
        _log_request(request, "completions", body, prompt_ids)
        echo = None
        if body.echo:
            echo = [p if isinstance(p, str) else s.engine.tokenizer.decode(p) for p in prompts]
        return await _run_request(s, request, body, params, prompt_ids, body.max_tokens is None,
                                  "text_completion", arrival, echo)


async def chat_completions(body: ChatRequest, request: Request):
    s = _state(request)
    arrival = time.perf_counter()
    _check_common(s, body, body.messages)
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {body.top_logprobs}",
                       "top_logprobs", "invalid_value")
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    # omitted: the rest of the context (the engine stops there: truncate_to_context)
    params = _sampling_params(s, body, max_tokens if max_tokens is not None else s.engine.max_len,
                              (body.top_logprobs or 0) if body.logprobs else None, None,
                              s.engine.tokenizer.chat_stop_token_ids())
    _check_queue(s, body.n, "n")
    with _admitting(s):
        prompt_ids = await asyncio.to_thread(
            lambda: _tokenize(s, [_render_chat(s, body.messages)], "messages"))
        _check_prompt_tokens(s, prompt_ids, "messages")
        _log_request(request, "chat", body, prompt_ids)
        return await _run_request(s, request, body, params, prompt_ids, max_tokens is None,
                                  "chat.completion", arrival)


@contextlib.contextmanager
def _admitting(s: ServerState):
    """Counts a request between its checks and its engine requests being queued (drain waits for it)."""
    s.admitting += 1
    try:
        yield
    finally:
        s.admitting -= 1


def _log_request(request: Request, kind: str, body: SamplingFields, prompt_ids: list[list[int]]) -> None:
    log.info("%s %s: %d prompt(s) of %s tokens, n=%d, max_tokens=%s, stream=%s, user=%s",
             _request_id(request), kind, len(prompt_ids), "/".join(str(len(p)) for p in prompt_ids[:4]),
             body.n, body.max_tokens, body.stream, json.dumps(body.user))


def _submit(s: ServerState, prompt_ids: list[list[int]], base: SamplingParams, n: int, truncate: bool,
            prompt_param: str, arrival: float) -> tuple[asyncio.Queue, list[str]]:
    """Queue every prompt's n choices (Engine.add_choices: one prefill, the choices forked from it;
    seeds seed, seed+1, ... when given). Choice i = prompt * n + j. Returns (queue of (choice,
    output), request ids). The engine refuses what it cannot serve (RequestError); that becomes a
    400 naming `prompt_param` for the prompt."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()

    def deliver(item, timer):  # on the engine thread
        timer.observe(item[1])
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    ids: list[str] = []
    for k, prompt in enumerate(prompt_ids):
        timers = [s.metrics.request_timer(arrival) for _ in range(n)]

        def on_output(j, out, k=k, timers=timers):
            deliver((k * n + j, out), timers[j])

        try:
            reqs = s.engine.add_choices(prompt, base, n, on_output, truncate_to_context=truncate)
        except RequestError as e:
            for rid in ids:
                s.engine.abort(rid)
            raise APIError(400, e.message, prompt_param if e.param == "prompt" else e.param, e.code) from None
        ids += [r.id for r in reqs]
    s.runner.wake()
    return queue, ids


SHUTDOWN_CUT_MESSAGE = "the server shut down before this request finished (--shutdown-timeout); retry"


async def _run_request(s: ServerState, request: Request, body: SamplingFields, base: SamplingParams,
                       prompt_ids: list[list[int]], truncate: bool,
                       kind: Literal["text_completion", "chat.completion"], arrival: float,
                       echo: list[str] | None = None):
    rid = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
    now = int(time.time())
    prompt_tokens = sum(len(p) for p in prompt_ids)
    queue, req_ids = _submit(s, prompt_ids, base, body.n, truncate,
                             "prompt" if kind == "text_completion" else "messages", arrival)
    num = len(req_ids)
    prefixes = [echo[i // body.n] if echo else "" for i in range(num)]
    # logprobs: one TokenLogprob per token id; under echo the prompt's come first (None for its
    # first token), as OpenAI's `logprobs` shows them
    lps = [ChoiceLogprobs(prompt_ids[i // body.n]) for i in range(num)] if base.logprobs is not None else None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(s, kind, rid, now, queue, req_ids, prompt_tokens, include_usage,
                                         prefixes, lps), media_type="text/event-stream")
    texts, reasons, completion = list(prefixes), [None] * num, [0] * num
    try:
        while any(r is None for r in reasons):
            i, out = await queue.get()
            texts[i] += out.text
            completion[i] = out.completion_tokens
            if lps is not None:
                lps[i].add(out)
            if out.finished:
                if out.finish_reason == "error":
                    raise APIError(500, out.error or "generation failed", None, "internal_error",
                                   "server_error")
                if out.finish_reason == "abort":  # only the server aborts a request someone awaits
                    raise _unavailable(s, SHUTDOWN_CUT_MESSAGE, "shutting_down")
                reasons[i] = out.finish_reason
    finally:
        for i, r in enumerate(reasons):
            if r is None:
                s.engine.abort(req_ids[i])
    tok = s.engine.tokenizer
    if kind == "text_completion":
        choices = [{"index": i, "text": t, "logprobs": lps[i].completion(tok) if lps else None,
                    "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
    else:
        choices = [{"index": i, "message": {"role": "assistant", "content": t},
                    "logprobs": lps[i].chat(tok) if lps else None,
                    "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(completion),
             "total_tokens": prompt_tokens + sum(completion)}
    return {"id": rid, "object": kind, "created": now, "model": s.model_name, "choices": choices,
            "usage": usage}


async def _stream(s: ServerState, kind, rid, now, queue, req_ids, prompt_tokens, include_usage, prefixes,
                  lps: list[ChoiceLogprobs] | None):
    """Server-sent events of one request's choices. A chunk goes out when a choice has new text (or
    finishes); logprobs ride with the chunk whose text their tokens produced (held-back text holds
    them back too)."""
    obj = "text_completion" if kind == "text_completion" else "chat.completion.chunk"
    tok = s.engine.tokenizer
    pending = set(range(len(req_ids)))
    completion = [0] * len(req_ids)
    unsent = list(prefixes)  # echoed prompts go out with each choice's first chunk

    def chunk(choices, usage=None):
        d = {"id": rid, "object": obj, "created": now, "model": s.model_name, "choices": choices}
        if include_usage:
            d["usage"] = usage
        return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

    def error_event(message: str, type: str, code: str) -> str:
        return f"data: {json.dumps(error_body(message, type, None, code), ensure_ascii=False)}\n\n"

    s.streams += 1  # counted from its first chunk on (drain waits for it); a stream never started is not
    try:
        if kind == "chat.completion":
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(req_ids))])
        while pending:
            i, out = await queue.get()
            completion[i] = out.completion_tokens
            if out.finished:
                pending.discard(i)
            if out.finish_reason == "error":
                yield error_event(out.error or "generation failed", "server_error", "internal_error")
                break
            if out.finish_reason == "abort":  # cut at the shutdown timeout: say so, do not just close
                yield error_event(SHUTDOWN_CUT_MESSAGE, "server_error", "shutting_down")
                break
            if lps is not None:
                lps[i].add(out)
            text, unsent[i] = unsent[i] + out.text, ""
            if not text and not out.finished:
                continue
            reason = out.finish_reason if out.finished else None
            if kind == "text_completion":
                logprobs = lps[i].completion(tok) if lps else None
                yield chunk([{"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}])
            else:
                logprobs = lps[i].chat(tok) if lps else None
                delta = {"content": text} if text else {}
                if text and out.finished:  # the last text, then a separate finish chunk
                    yield chunk([{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": None}])
                    delta, logprobs = {}, None
                yield chunk([{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}])
        if include_usage:
            total = sum(completion)
            yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": total,
                             "total_tokens": prompt_tokens + total})
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or an error): free the slots
        s.streams -= 1
        for i in pending:
            s.engine.abort(req_ids[i])


# --- the app -----------------------------------------------------------------------------------
def create_app(engine: Engine, model_name: str, max_waiting: int = 1024, shutdown_timeout: float = 60.0, *,
               api_key: str | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_prompt_tokens: int | None = None, warmup: bool = True) -> FastAPI:
    """The ASGI app; its lifespan starts the engine thread (and the warm-up) and stops it."""
    app = FastAPI(title="mogelm", summary="OpenAI-compatible API for MoGE models", lifespan=_lifespan)
    state = ServerState(engine, model_name, max_waiting, shutdown_timeout, api_key or None, max_request_bytes,
                        max_prompt_tokens, warmup)
    app.state.server = state
    app.add_middleware(ServerGate, state=state)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, _internal_error)
    app.get("/health")(health)
    app.get("/metrics")(metrics)
    app.get("/v1/models")(models)
    app.post("/v1/completions")(completions)
    app.post("/v1/chat/completions")(chat_completions)
    app.post("/tokenize")(tokenize)
    app.post("/detokenize")(detokenize)
    app.get("/tokenizer_info")(tokenizer_info)
    return app


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), for serve(); OSError if the port is busy.
    Binding before uvicorn starts makes a busy port an error the caller can report in one line."""
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on connections of such sockets, and
    # without it Nagle's algorithm plus the client's delayed ACK add ~40 ms to a response sent in
    # several writes (every SSE chunk after the first).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn.Server with the shutdown of the module docstring: the first SIGTERM/SIGINT starts
    draining (ServerState.begin_drain) while the socket stays open, so clients get a 503 rather than
    a refused connection; the main loop ends once ServerState.drain_done; a second signal stops at
    once. The signal is not re-raised afterwards: a drained shutdown exits with status 0."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        if self.state.phase != "draining" and not self.should_exit:
            self.state.begin_drain()
            return
        self.should_exit = True
        self.force_exit = sig == signal.SIGINT  # a second Ctrl-C does not wait for connections either

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        return self.state.phase == "draining" and self.state.drain_done(time.monotonic())


def serve(app: FastAPI, sock: socket.socket, log_level: str = "info", shutdown_timeout: float = 60.0,
          host: str | None = None) -> None:
    """Run the app on the bound socket until SIGINT/SIGTERM; running requests drain first.
    `host` only names the address in uvicorn's "running on" log line (default: the socket's).
    uvicorn's access log is off: ServerGate logs each request with its id instead."""
    bound_host, port = sock.getsockname()[:2]
    app.state.server.shutdown_timeout = shutdown_timeout
    config = uvicorn.Config(app, host=host or bound_host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=int(CUT_GRACE_S))
    DrainingServer(config, app.state.server).run(sockets=[sock])
