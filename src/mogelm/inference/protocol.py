"""The HTTP API's shapes: OpenAI's (and vLLM's) request bodies, error bodies, the checks that name
unknown or unimplemented fields, and logprobs in OpenAI's response shapes. No serving logic here:
mogelm/inference/server.py uses these.

    body = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "tools": [...]})
    check_fields(body.model_extra)            # APIError(400, "`tools` is not supported ...", "tools")
    completion_logprobs(tokenizer, ids, [TokenLogprob(...), ...])   # {"tokens", "token_logprobs", ...}
    lp = ChoiceLogprobs(prompt_ids); lp.add(out); lp.completion(tokenizer)   # what is new since last time

Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}; `param` names the field.
Request models allow extra keys so that check_fields can name them (pydantic would only say
"extra inputs are not permitted"); nested objects without such a check forbid them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from mogelm.inference.sampling import TokenLogprob

if TYPE_CHECKING:
    from mogelm.inference.engine import RequestOutput

MAX_N = 16  # choices per request

# Known OpenAI fields this server does not implement: a 400 naming the field when given a value
# other than null / false / empty (clients may send those defaults explicitly).
UNSUPPORTED_FIELDS = frozenset({
    "suffix", "best_of", "tools", "tool_choice", "functions", "function_call", "response_format",
    "parallel_tool_calls", "audio", "modalities", "prediction", "reasoning_effort", "web_search_options",
    "service_tier", "store", "metadata", "verbosity",
})


# --- request bodies ----------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown keys are checked by check_fields, with names
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
    repetition_penalty: float | None = None  # extension (vLLM)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # logged with the request id


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None
    name: str | None = None  # accepted; the templates do not use it


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class TokenizeRequest(BaseModel):
    """vLLM's TokenizeCompletionRequest and TokenizeChatRequest in one body: `prompt` or `messages`."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default True for prompt, False for messages (as vLLM)
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


# --- errors ------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _is_union_tag(x) -> bool:
    return isinstance(x, str) and ("[" in x or x in ("str", "int", "float", "bool", "list", "dict", "none"))


def error_response(status: int, message: str, param=None, code=None, type=None,
                   headers=None) -> JSONResponse:
    type = type or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


async def api_error_handler(request: Request, e: APIError):
    return error_response(e.status, e.message, e.param, e.code, e.type, e.headers)


async def validation_error_handler(request: Request, e: RequestValidationError):
    err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request", "type": ""}
    # drop "body" and pydantic's union-member tags ("str", "list[int]", ...) from the location
    loc = [str(x) for x in err.get("loc", ()) if x != "body" and not _is_union_tag(x)]
    if err.get("type") == "json_invalid":
        reason = err.get("ctx", {}).get("error", err["msg"])
        return error_response(400, f"Invalid JSON in the request body: {reason}", code="invalid_json")
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        return error_response(400, f"Unrecognized request argument supplied: {param}", param,
                               code="unknown_parameter")
    return error_response(400, f"{param or 'body'}: {err['msg']}", param, code="invalid_value")


async def http_error_handler(request: Request, e: StarletteHTTPException):
    return error_response(e.status_code, str(e.detail), code=str(e.status_code))


def check_fields(extra: dict | None, messages: list[ChatMessage] = ()) -> None:
    """Unknown keys and unimplemented OpenAI fields are a 400 naming the field (never ignored)."""
    fields = list((extra or {}).items())
    fields += [(f"messages.{i}.{k}", v) for i, m in enumerate(messages)
               for k, v in (m.model_extra or {}).items()]
    for name, value in fields:
        base = name.rsplit(".", 1)[-1]
        if base not in UNSUPPORTED_FIELDS and base not in ("tool_calls", "tool_call_id"):
            raise APIError(400, f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")
        if value in (None, False, [], {}) or (base == "best_of" and value == 1):
            continue  # the field's "off" value, as some clients send it
        raise APIError(400, f"`{name}` is not supported by this server", name, "unsupported")


# --- logprobs in the OpenAI shapes (from RequestOutput.logprobs / prompt_logprobs) ---------------
def _token_str(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer, token_ids: list[int], entries: list[TokenLogprob | None],
                        text_offset: int = 0) -> dict:
    """The legacy completions `logprobs` object, one position per token id: tokens, token_logprobs,
    top_logprobs (token string -> logprob; the chosen token included, as vLLM does) and text_offset
    (characters before each token's string, counted from `text_offset`: a stream's later chunks
    continue where the previous ended).
    A None entry (the first prompt token under echo: nothing precedes it) has null logprob and top,
    and still takes its position: lm-eval reads `token_logprobs[ctxlen:-1]` by position."""
    assert len(token_ids) == len(entries)
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, e in zip(token_ids, entries):
        token = _token_str(tokenizer, token_id)
        out["tokens"].append(token)
        out["text_offset"].append(text_offset)
        text_offset += len(token)
        if e is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        assert e.token_id == token_id
        out["token_logprobs"].append(e.logprob)
        top = {_token_str(tokenizer, t): lp for t, lp in e.top}
        top.setdefault(token, e.logprob)
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    """The chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    def item(token_id: int, logprob: float) -> dict:
        token = _token_str(tokenizer, token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


class ChoiceLogprobs:
    """One choice's logprobs as its RequestOutputs arrive: token ids and their TokenLogprobs (under
    echo the prompt's first, from the first output's prompt_logprobs). `completion` / `chat` format
    what was added since the previous call: the whole choice at the end of a request, or each
    streamed chunk's tokens (text_offset continues across chunks)."""

    def __init__(self, prompt_ids: list[int]):
        self.prompt_ids = prompt_ids
        self.ids: list[int] = []
        self.entries: list[TokenLogprob | None] = []
        self.sent = 0  # entries formatted so far
        self.text_offset = 0

    def add(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self.ids += self.prompt_ids
            self.entries += out.prompt_logprobs
        if out.logprobs is not None:
            self.ids += out.token_ids
            self.entries += out.logprobs

    def _take(self) -> tuple[list[int], list[TokenLogprob | None]]:
        lo, self.sent = self.sent, len(self.entries)
        return self.ids[lo:], self.entries[lo:]

    def completion(self, tokenizer) -> dict:
        ids, entries = self._take()
        out = completion_logprobs(tokenizer, ids, entries, self.text_offset)
        self.text_offset += sum(len(t) for t in out["tokens"])
        return out

    def chat(self, tokenizer) -> dict:
        return chat_logprobs(tokenizer, self._take()[1])
