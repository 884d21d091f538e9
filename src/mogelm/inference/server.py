"""An OpenAI-compatible HTTP API over the engine (FastAPI + uvicorn, loopback by default).

    app = create_app(engine, "final")                   # an ASGI app; its lifespan runs the engine thread
    serve(app, listen_socket("127.0.0.1", 8000))        # what `mogelm serve` does (mogelm/commands/serve.py)
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "final", "prompt": "def main(", "max_tokens": 32, "temperature": 0}'

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
`stream: true` as server-sent events, `stream_options.include_usage`, and usage counts). Extensions
as in vLLM: `top_k`, `stop_token_ids`, `ignore_eos`. Omitted temperature / top_p / top_k take the
checkpoint's generation_config.json values, else the Pangu docs' 0.6 / 0.95 / 50 (PAPER.md §3.4).

The model runs on one background thread (EngineThread) that steps the engine whenever requests
are in flight; handlers only queue requests and await per-request asyncio queues, so the event
loop stays responsive. Handlers are module-level functions; what they share (engine, runner,
model name, queue limit) is a ServerState on `app.state.server`. Invalid requests get a 4xx with
an OpenAI-style body {"error": {"message", "type", "param", "code"}}: the server checks only the
API's own fields (model, n, unsupported options, queue length); the prompt and context limits are
the engine's (Engine.check_request raises RequestError), sampling values SamplingParams' own
(InvalidSampling), and the server maps both to a 400. On SIGINT/SIGTERM uvicorn stops accepting
connections and waits for running requests (streams included) to finish, then the engine stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from mogelm.inference.engine import Engine, EngineThread, RequestError, RequestOutput
from mogelm.inference.sampling import InvalidSampling, SamplingParams

log = logging.getLogger("mogelm.inference.server")
MAX_N = 16  # choices per request
COMPLETION_DEFAULT_MAX_TOKENS = 16  # as OpenAI; chat defaults to the rest of the context


# --- request bodies ----------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension (vLLM)
    ignore_eos: bool = False  # extension (vLLM)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict] | None = None


class ChatRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


# --- errors ------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _is_union_tag(x) -> bool:
    return isinstance(x, str) and ("[" in x or x in ("str", "int", "float", "bool", "list", "dict", "none"))


def _error_response(status: int, message: str, param=None, code=None, type=None) -> JSONResponse:
    type = type or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(error_body(message, type, param, code), status_code=status)


async def _api_error(request: Request, e: APIError):
    return _error_response(e.status, e.message, e.param, e.code, e.type)


async def _validation_error(request: Request, e: RequestValidationError):
    err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request", "type": ""}
    # drop "body" and pydantic's union-member tags ("str", "list[int]", ...) from the location
    loc = [str(x) for x in err.get("loc", ()) if x != "body" and not _is_union_tag(x)]
    if err.get("type") == "json_invalid":
        reason = err.get("ctx", {}).get("error", err["msg"])
        return _error_response(400, f"Invalid JSON in the request body: {reason}", code="invalid_json")
    param = ".".join(loc) or None
    return _error_response(400, f"{param or 'body'}: {err['msg']}", param, code="invalid_value")


async def _http_error(request: Request, e: StarletteHTTPException):
    return _error_response(e.status_code, str(e.detail), code=str(e.status_code))


async def _internal_error(request: Request, e: Exception):
    log.exception("unhandled error")
    return _error_response(500, f"internal error: {type(e).__name__}", code="internal_error")


# --- what the handlers share -------------------------------------------------------------------
@dataclass
class ServerState:
    engine: Engine
    model_name: str
    max_waiting: int = 1024  # queued requests before answering 503
    shutdown_timeout: float = 60.0  # seconds the engine may take to finish what is left at shutdown
    runner: EngineThread = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.runner = EngineThread(self.engine)


def _state(request: Request) -> ServerState:
    return request.app.state.server


@asynccontextmanager
async def _lifespan(app: FastAPI):
    state: ServerState = app.state.server
    state.runner.start()
    try:
        yield
    finally:  # uvicorn has already drained the connections; let the engine finish what is left
        await asyncio.to_thread(state.runner.stop, True, state.shutdown_timeout)


# --- handlers ----------------------------------------------------------------------------------
async def health():
    return {"status": "ok"}


async def models(request: Request):
    s = _state(request)
    return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": s.created,
                                        "owned_by": "mogelm", "max_model_len": s.engine.max_len}]}


async def completions(body: CompletionRequest, request: Request):
    s = _state(request)
    _check_common(s, body)
    for name, bad in (("echo", body.echo), ("logprobs", body.logprobs is not None), ("suffix", body.suffix)):
        if bad:
            raise APIError(400, f"{name} is not supported by this server", name, "unsupported")
    p = body.prompt
    if isinstance(p, str):
        prompts = [p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [p]
    else:
        prompts = list(p)
    if not prompts:
        raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
    prompt_ids = [s.engine.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in prompts]
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
    return await _run_request(s, body, prompt_ids, max_tokens, body.max_tokens is None, "text_completion")


async def chat_completions(body: ChatRequest, request: Request):
    s = _state(request)
    _check_common(s, body)
    if body.logprobs or body.top_logprobs:
        raise APIError(400, "logprobs is not supported by this server", "logprobs", "unsupported")
    try:
        text = s.engine.tokenizer.apply_chat_template([m.model_dump() for m in body.messages])
    except ValueError as e:
        raise APIError(400, str(e), "messages", "invalid_value") from None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    # omitted: the rest of the context (the engine stops there: truncate_to_context)
    return await _run_request(s, body, [s.engine.tokenizer.encode(text)],
                              max_tokens if max_tokens is not None else s.engine.max_len, max_tokens is None,
                              "chat.completion", s.engine.tokenizer.chat_stop_token_ids())


def _check_common(s: ServerState, body: _SamplingFields) -> None:
    """The API's own checks; prompt and context limits are the engine's (see _submit)."""
    if body.model != s.model_name:
        raise APIError(404, f"The model `{body.model}` does not exist; this server serves `{s.model_name}`.",
                       "model", "model_not_found")
    if not 1 <= body.n <= MAX_N:
        raise APIError(400, f"n must be in [1, {MAX_N}], got {body.n}", "n", "invalid_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported by this server", name, "unsupported")
    if s.engine.num_waiting >= s.max_waiting:
        raise APIError(503, "the server is overloaded; retry later", None, "overloaded", "server_error")


def _sampling_params(s: ServerState, body: _SamplingFields, max_tokens: int,
                     extra_stop_ids=()) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        return s.engine.sampling_params(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                        top_k=body.top_k, seed=body.seed, stop=stop,
                                        ignore_eos=body.ignore_eos,
                                        stop_token_ids=list(body.stop_token_ids or []) + list(extra_stop_ids))
    except InvalidSampling as e:
        raise APIError(400, str(e), e.param, "invalid_value") from None


def _submit(s: ServerState, prompt_ids: list[list[int]], base: SamplingParams, n: int, truncate: bool,
            prompt_param: str) -> tuple[asyncio.Queue, list[str]]:
    """Queue one engine request per choice: every prompt n times (seeds seed, seed+1, ... when given).
    Returns (queue of (choice, output), request ids). The engine refuses what it cannot serve
    (RequestError); that becomes a 400 naming `prompt_param` for the prompt."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()

    def deliver(item):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    ids: list[str] = []
    for i, (prompt, j) in enumerate((p, j) for p in prompt_ids for j in range(n)):
        sp = base if j == 0 or base.seed is None else \
            SamplingParams(**{**base.__dict__, "seed": base.seed + j})
        try:
            req = s.engine.add_request(prompt, sp, on_output=lambda out, i=i: deliver((i, out)),
                                       truncate_to_context=truncate)
        except RequestError as e:
            for rid in ids:
                s.engine.abort(rid)
            raise APIError(400, e.message, prompt_param if e.param == "prompt" else e.param, e.code) from None
        ids.append(req.id)
    s.runner.wake()
    return queue, ids


async def _run_request(s: ServerState, body: _SamplingFields, prompt_ids: list[list[int]], max_tokens: int,
                       truncate: bool, kind: Literal["text_completion", "chat.completion"], extra_stop=()):
    base = _sampling_params(s, body, max_tokens, extra_stop)
    rid = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
    now = int(time.time())
    prompt_tokens = sum(len(p) for p in prompt_ids)
    queue, req_ids = _submit(s, prompt_ids, base, body.n, truncate,
                             "prompt" if kind == "text_completion" else "messages")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(s, kind, rid, now, queue, req_ids, prompt_tokens, include_usage),
                                 media_type="text/event-stream")
    num = len(req_ids)
    texts, reasons, completion = [""] * num, [None] * num, [0] * num
    try:
        while any(r is None for r in reasons):
            i, out = await queue.get()
            texts[i] += out.text
            completion[i] = out.completion_tokens
            if out.finished:
                if out.finish_reason == "error":
                    raise APIError(500, out.error or "generation failed", None, "internal_error",
                                   "server_error")
                reasons[i] = out.finish_reason
    finally:
        for i, r in enumerate(reasons):
            if r is None:
                s.engine.abort(req_ids[i])
    if kind == "text_completion":
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    else:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(completion),
             "total_tokens": prompt_tokens + sum(completion)}
    return {"id": rid, "object": kind, "created": now, "model": s.model_name, "choices": choices,
            "usage": usage}


async def _stream(s: ServerState, kind, rid, now, queue, req_ids, prompt_tokens, include_usage):
    obj = "text_completion" if kind == "text_completion" else "chat.completion.chunk"
    pending = set(range(len(req_ids)))
    completion = [0] * len(req_ids)

    def chunk(choices, usage=None):
        d = {"id": rid, "object": obj, "created": now, "model": s.model_name, "choices": choices}
        if include_usage:
            d["usage"] = usage
        return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

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
                yield f"data: {json.dumps(error_body(out.error or 'generation failed', 'server_error'))}\n\n"
                break
            if not out.text and not out.finished:
                continue
            reason = out.finish_reason if out.finished else None
            if kind == "text_completion":
                yield chunk([{"index": i, "text": out.text, "logprobs": None, "finish_reason": reason}])
            else:
                delta = {"content": out.text} if out.text else {}
                if out.text and out.finished:  # the last text, then a separate finish chunk
                    yield chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
                    delta = {}
                yield chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}])
        if include_usage:
            total = sum(completion)
            yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": total,
                             "total_tokens": prompt_tokens + total})
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or an error): free the slots
        for i in pending:
            s.engine.abort(req_ids[i])


# --- the app -----------------------------------------------------------------------------------
def create_app(engine: Engine, model_name: str, max_waiting: int = 1024,
               shutdown_timeout: float = 60.0) -> FastAPI:
    """The ASGI app; its lifespan starts and stops the engine thread."""
    app = FastAPI(title="mogelm", summary="OpenAI-compatible API for MoGE models", lifespan=_lifespan)
    app.state.server = ServerState(engine, model_name, max_waiting, shutdown_timeout)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.get("/health")(health)
    app.get("/v1/models")(models)
    app.post("/v1/completions")(completions)
    app.post("/v1/chat/completions")(chat_completions)
    return app


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), for serve(); OSError if the port is busy.
    Binding before uvicorn starts makes a busy port an error the caller can report in one line."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def serve(app: FastAPI, sock: socket.socket, log_level: str = "info", shutdown_timeout: float = 60.0,
          host: str | None = None) -> None:
    """Run the app on the bound socket until SIGINT/SIGTERM; running requests drain first.
    `host` only names the address in uvicorn's "running on" log line (default: the socket's)."""
    bound_host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host or bound_host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(shutdown_timeout))
    uvicorn.Server(config).run(sockets=[sock])
