"""`mogelm serve`: an OpenAI-compatible HTTP API over the engine (FastAPI + uvicorn, loopback by default).

    mogelm serve --model runs/demo/moge/final --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "final", "prompt": "def main(", "max_tokens": 32, "temperature": 0}'

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
`stream: true` as server-sent events, `stream_options.include_usage`, and usage counts). Extensions
as in vLLM: `top_k`, `stop_token_ids`, `ignore_eos`. Omitted temperature / top_p / top_k take the
checkpoint's generation_config.json values, else the Pangu docs' 0.6 / 0.95 / 50 (PAPER.md §3.4).

The model runs on one background thread (EngineThread) that steps the engine whenever requests
are in flight; handlers only queue requests and await per-request asyncio queues, so the event
loop stays responsive. Invalid requests get a 4xx with an OpenAI-style body
{"error": {"message", "type", "param", "code"}}. On SIGINT/SIGTERM uvicorn stops accepting
connections and waits for running requests (streams included) to finish, then the engine stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from mogelm.errors import UserError
from mogelm.inference.engine import Engine, EngineThread, RequestOutput
from mogelm.inference.sampling import InvalidSampling, SamplingParams

log = logging.getLogger("mogelm.inference.server")
MAX_N = 16  # choices per request


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


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _is_union_tag(x) -> bool:
    return isinstance(x, str) and ("[" in x or x in ("str", "int", "float", "bool", "list", "dict", "none"))


def _error_response(status: int, message: str, param=None, code=None, type=None) -> JSONResponse:
    type = type or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(error_body(message, type, param, code), status_code=status)


# --- the app -----------------------------------------------------------------------------------
def create_app(engine: Engine, model_name: str, max_waiting: int = 1024, shutdown_timeout: float = 60.0) -> FastAPI:
    """The ASGI app; its lifespan starts and stops the engine thread."""
    runner = EngineThread(engine)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        try:
            yield
        finally:  # uvicorn has already drained the connections; let the engine finish what is left
            await asyncio.to_thread(runner.stop, True, shutdown_timeout)

    app = FastAPI(title="mogelm", summary="OpenAI-compatible API for MoGE models", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(e.status, e.message, e.param, e.code, e.type)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request", "type": ""}
        # drop "body" and pydantic's union-member tags ("str", "list[int]", ...) from the location
        loc = [str(x) for x in err.get("loc", ()) if x != "body" and not _is_union_tag(x)]
        if err.get("type") == "json_invalid":
            return _error_response(400, f"Invalid JSON in the request body: {err.get('ctx', {}).get('error', err['msg'])}",
                                   code="invalid_json")
        param = ".".join(loc) or None
        return _error_response(400, f"{param or 'body'}: {err['msg']}", param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return _error_response(e.status_code, str(e.detail), code=str(e.status_code))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("unhandled error")
        return _error_response(500, f"internal error: {type(e).__name__}", code="internal_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mogelm", "max_model_len": engine.max_len}]}

    def check_common(body: _SamplingFields) -> None:
        if body.model != model_name:
            raise APIError(404, f"The model `{body.model}` does not exist; this server serves `{model_name}`.",
                           "model", "model_not_found")
        if not 1 <= body.n <= MAX_N:
            raise APIError(400, f"n must be in [1, {MAX_N}], got {body.n}", "n", "invalid_value")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported by this server", name, "unsupported")
        if engine.num_waiting >= max_waiting:
            raise APIError(503, "the server is overloaded; retry later", None, "overloaded", "server_error")

    def build_params(body: _SamplingFields, prompt_len: int, max_tokens: int | None, default_max: int | None,
                     extra_stop_ids: list[int] = ()) -> SamplingParams:
        room = engine.max_len - prompt_len
        if room <= 0:
            raise APIError(400, f"This model's maximum context length is {engine.max_len} tokens; the prompt has "
                                f"{prompt_len} tokens.", "messages" if isinstance(body, ChatRequest) else "prompt",
                           "context_length_exceeded")
        if max_tokens is None:
            max_tokens = room if default_max is None else min(default_max, room)
        elif max_tokens > 0 and prompt_len + max_tokens > engine.max_len:
            raise APIError(400, f"This model's maximum context length is {engine.max_len} tokens. However, you "
                                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                                f"{max_tokens} for the completion).", "max_tokens", "context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            return engine.sampling_params(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                          top_k=body.top_k, seed=body.seed, stop=stop, ignore_eos=body.ignore_eos,
                                          stop_token_ids=list(body.stop_token_ids or []) + list(extra_stop_ids))
        except InvalidSampling as e:
            raise APIError(400, str(e), e.param, "invalid_value") from None

    def submit(prompts: list[list[int]], params: list[SamplingParams]):
        """Queue one engine request per choice; returns (queue of (choice, output), request ids)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()

        def deliver(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        ids = []
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            try:
                req = engine.add_request(prompt, sp, on_output=lambda out, i=i: deliver((i, out)))
            except ValueError as e:
                for rid in ids:
                    engine.abort(rid)
                raise APIError(400, str(e), "prompt", "invalid_value") from None
            ids.append(req.id)
        runner.wake()
        return queue, ids

    def choices_for(body: _SamplingFields, prompt_ids: list[list[int]], max_tokens, default_max, extra_stop=()):
        """Per-choice prompts and params: every prompt n times (seeds seed, seed+1, ... when given)."""
        prompts, params = [], []
        for ids in prompt_ids:
            base = build_params(body, len(ids), max_tokens, default_max, extra_stop)
            for j in range(body.n):
                sp = base if j == 0 or base.seed is None else SamplingParams(**{**base.__dict__, "seed": base.seed + j})
                prompts.append(ids)
                params.append(sp)
        return prompts, params

    async def run_request(body: _SamplingFields, prompt_ids: list[list[int]], max_tokens, default_max,
                          kind: Literal["text_completion", "chat.completion"], extra_stop=()):
        prompts, params = choices_for(body, prompt_ids, max_tokens, default_max, extra_stop)
        rid = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
        now = int(time.time())
        prompt_tokens = sum(len(p) for p in prompt_ids)
        queue, req_ids = submit(prompts, params)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(kind, rid, now, queue, req_ids, prompt_tokens, include_usage),
                                     media_type="text/event-stream")
        texts, reasons, completion = [""] * len(prompts), [None] * len(prompts), [0] * len(prompts)
        try:
            while any(r is None for r in reasons):
                i, out = await queue.get()
                texts[i] += out.text
                completion[i] = out.completion_tokens
                if out.finished:
                    if out.finish_reason == "error":
                        raise APIError(500, out.error or "generation failed", None, "internal_error", "server_error")
                    reasons[i] = out.finish_reason
        finally:
            for i, r in enumerate(reasons):
                if r is None:
                    engine.abort(req_ids[i])
        if kind == "text_completion":
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(completion),
                 "total_tokens": prompt_tokens + sum(completion)}
        return {"id": rid, "object": kind, "created": now, "model": model_name, "choices": choices, "usage": usage}

    async def stream(kind, rid, now, queue, req_ids, prompt_tokens, include_usage):
        obj = "text_completion" if kind == "text_completion" else "chat.completion.chunk"
        pending = set(range(len(req_ids)))
        completion = [0] * len(req_ids)

        def chunk(choices, usage=None):
            d = {"id": rid, "object": obj, "created": now, "model": model_name, "choices": choices}
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
                engine.abort(req_ids[i])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_common(body)
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
        prompt_ids = [engine.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in prompts]
        if any(not ids for ids in prompt_ids):
            raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
        if body.max_tokens is not None and body.max_tokens <= 0:
            raise APIError(400, f"max_tokens must be positive, got {body.max_tokens}", "max_tokens", "invalid_value")
        return await run_request(body, prompt_ids, body.max_tokens, 16, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        check_common(body)
        if body.logprobs or body.top_logprobs:
            raise APIError(400, "logprobs is not supported by this server", "logprobs", "unsupported")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is not None and max_tokens <= 0:
            raise APIError(400, f"max_tokens must be positive, got {max_tokens}", "max_tokens", "invalid_value")
        try:
            text = engine.tokenizer.apply_chat_template([m.model_dump() for m in body.messages])
        except ValueError as e:
            raise APIError(400, str(e), "messages", "invalid_value") from None
        prompt_ids = [engine.tokenizer.encode(text)]
        return await run_request(body, prompt_ids, max_tokens, None, "chat.completion",
                                 engine.tokenizer.chat_stop_token_ids())

    app.state.engine, app.state.runner = engine, runner
    return app


# --- CLI ---------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the directory name)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max-len", type=int, default=None, help="context length per sequence (default: the model's)")
    p.add_argument("--chunk-size", type=int, default=256, help="prompt tokens prefilled per engine step")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weights and cache dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often fastest on a busy small CPU)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")
    p.add_argument("--max-waiting", type=int, default=1024, help="queued requests before answering 503")
    p.add_argument("--shutdown-timeout", type=float, default=60.0, help="seconds to drain requests on shutdown")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def run(args: argparse.Namespace) -> int:
    import torch

    for name in ("max_batch", "chunk_size", "max_waiting", "max_len"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    if args.threads is not None:
        if args.threads <= 0:
            raise UserError("--threads must be positive")
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=dtype, max_batch=args.max_batch,
                                    max_len=args.max_len, chunk_size=args.chunk_size,
                                    cuda_graphs=False if args.no_cuda_graphs else None)
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(engine, name, args.max_waiting, args.shutdown_timeout)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=int(args.shutdown_timeout))
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # bind here, so a busy port is a one-line error rather than uvicorn's exit
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    print(f"serving {name} ({engine.max_len}-token context, {engine.max_batch} slots, {engine.device}) "
          f"on http://{args.host}:{sock.getsockname()[1]}/v1", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
