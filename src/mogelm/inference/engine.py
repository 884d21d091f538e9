"""The inference engine: prefill and decode around a slotted KV cache, with continuous batching.

    engine = Engine.from_pretrained("ckpt/", max_batch=8)           # or Engine(model, tokenizer, ...)
    outs = engine.generate(["def main(", "import os"], SamplingParams(max_tokens=32, temperature=0))
    print(outs[0].text, outs[0].finish_reason)

One `step()` does, in order:
  1. admit waiting requests into free cache slots (lowest slot first);
  2. prefill: feed up to `chunk_size` prompt tokens, oldest request first; a prompt longer than the
     budget is prefilled over several steps (chunked prefill), so running requests keep decoding;
     when a prompt is complete its last logits give the first generated token;
  3. decode: one token for every request that was already decoding, in one batched forward over
     cache rows [0, n) (rows not decoding get a dummy token at the scratch column, see cache.py);
     on CUDA this forward replays a CUDA graph captured for the smallest bucket >= n;
  4. finished requests (stop token, stop string, max_tokens, context full, abort) free their slot.

Positions are explicit: prompt token i sits at position i of its slot and generated token j at
len(prompt) + j, so every batch row is an independent sequence and batched decode equals
decoding each sequence alone. Requests come in through thread-safe queues, so a server thread can
`add_request` while an `EngineThread` runs `step()` in a loop; each request's `on_output` callback
receives a RequestOutput (new tokens and new text) every step it advances.

The model is called only through two free functions, `prefill` (one sequence, a run of prompt
tokens) and `decode_one_token` (one token per cache row); the CUDA graphs capture the latter.
The engine works on token ids; the tokenizer (optional) is used only for text prompts, stop strings
and the text it returns. fp32 on CPU, bf16 on CUDA by default.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mogelm.errors import UserError
from mogelm.inference.cache import CacheRows, SlotKVCache
from mogelm.inference.chat import Tokenizer
from mogelm.inference.sampling import PANGU_DEFAULTS, SamplingParams, sample
from mogelm.model import Transformer

log = logging.getLogger("mogelm.inference")


class RequestError(ValueError):
    """A request the engine cannot serve as given: the prompt is empty, holds a token id outside the
    vocabulary, or does not fit the context with its max_tokens. `param` names the offending field
    ("prompt" or "max_tokens") and `code` the reason ("invalid_value", "context_length_exceeded");
    the server answers 400 with them. Messages follow OpenAI's wording."""

    def __init__(self, message: str, param: str, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass
class RequestOutput:
    """What one step produced for one request (deltas), and whether it finished."""

    request_id: str
    token_ids: list[int]  # new tokens (a stop token is not included)
    text: str  # new text, safe to show (held back while it could be the start of a stop string)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int
    completion_tokens: int  # tokens generated so far, a final stop token included
    error: str | None = None


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator
    on_output: Callable[[RequestOutput], None] | None = None
    slot: int | None = None
    num_cached: int = 0  # prompt tokens written to the cache
    output_ids: list[int] = field(default_factory=list)
    num_generated: int = 0
    text: str = ""  # text released so far
    finish_reason: str | None = None
    error: str | None = None

    @property
    def decoding(self) -> bool:
        return self.num_generated > 0 and self.finish_reason is None

    @property
    def next_pos(self) -> int:  # position of the next token fed to the model
        return len(self.prompt_ids) + self.num_generated - 1

    def completion(self) -> Completion:
        return Completion(self.id, self.prompt_ids, list(self.output_ids), self.text,
                          self.finish_reason or "", len(self.prompt_ids), self.num_generated)


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def prefill(model: Transformer, rows: CacheRows, ids: list[int], start: int) -> Tensor:
    """Write tokens `ids` at positions start.. of a one-row cache view; logits of the last one [V]."""
    device = rows.k[0].device
    ids_1T = torch.tensor([ids], device=device)
    pos_1T = torch.arange(start, start + len(ids), device=device).unsqueeze(0)
    return model(ids_1T, positions_BT=pos_1T, kv_cache=rows, kv_len=start + len(ids),
                 last_token_only=True)[0, -1]


def decode_one_token(model: Transformer, rows: CacheRows, ids_B: Tensor, pos_B: Tensor,
                     kv_len: int) -> Tensor:
    """One token per cache row at its own position (row b of `rows` <- ids_B[b] at pos_B[b]);
    logits [B, V]."""
    return model(ids_B[:, None], positions_BT=pos_B[:, None], kv_cache=rows, kv_len=kv_len)[:, 0]


def decode_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a captured decode graph: powers of two up to max_batch, and max_batch."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class CUDAGraphDecoder:
    """Decode forwards captured as CUDA graphs, one per bucketed batch size.

    Each graph reads static `ids`/`positions` buffers and cache rows [0, bucket), attends to the whole
    cache (kv_len fixed at L + 1; masking hides keys beyond each row's position) and writes static
    logits. Rows past the live batch are padded with a dummy token at the scratch column."""

    def __init__(self, model: Transformer, cache: SlotKVCache, buckets: list[int]):
        self.cache, self.buckets, self.graphs = cache, sorted(buckets), {}
        device = cache.k[0].device
        pool = None
        for b in sorted(buckets, reverse=True):  # largest first, so smaller graphs reuse its memory pool
            ids = torch.zeros(b, dtype=torch.long, device=device)
            pos = torch.full((b,), cache.scratch_pos, dtype=torch.long, device=device)
            rows = cache.rows(0, b)

            def fwd(ids=ids, pos=pos, rows=rows):
                return decode_one_token(model, rows, ids, pos, kv_len=cache.max_len + 1)

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up (allocator, lazy init) off the capture
                for _ in range(2):
                    fwd()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = fwd()
            pool = graph.pool()
            self.graphs[b] = (graph, ids, pos, logits)

    def __call__(self, ids_n: Tensor, pos_n: Tensor) -> Tensor:
        n = ids_n.shape[0]
        b = next(s for s in self.buckets if s >= n)
        graph, ids, pos, logits = self.graphs[b]
        ids.zero_()
        pos.fill_(self.cache.scratch_pos)
        ids[:n].copy_(ids_n)
        pos[:n].copy_(pos_n)
        graph.replay()
        return logits[:n]


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        max_batch: int = 8,
        max_len: int | None = None,
        chunk_size: int = 256,
        cuda_graphs: bool | None = None,
        default_sampling: dict | None = None,
    ):
        cfg = model.cfg
        p = next(model.parameters())
        self.model, self.tokenizer, self.device = model.eval(), tokenizer, p.device
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.max_batch, self.chunk_size = max_batch, chunk_size
        self.cache = SlotKVCache(cfg, max_batch, self.max_len, device=p.device, dtype=p.dtype)
        self.default_sampling = dict(default_sampling or {})
        self.eos_ids = frozenset([tokenizer.eos_token_id]
                                 if tokenizer and tokenizer.eos_token_id is not None else [])
        self._incoming: deque[Request] = deque()  # filled by any thread, drained by step()
        self._aborts: deque[str | None] = deque()  # None: every request
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in a slot, in admission order
        self._ids = itertools.count()
        use_graphs = (p.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        self.graphs = None
        if use_graphs:
            if not torch.cuda.is_available() or p.device.type != "cuda":
                raise ValueError("cuda_graphs=True needs the model on a CUDA device")
            try:
                with torch.inference_mode():
                    self.graphs = CUDAGraphDecoder(model, self.cache, decode_buckets(max_batch))
            except Exception as e:  # a model op that cannot be captured: fall back to eager decode
                log.warning("CUDA graph capture failed (%s); decoding eagerly", e)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None, dtype: torch.dtype | None = None,
                        quantize: str | None = None, **kwargs) -> Engine:
        """Load model, tokenizer and sampling defaults from a checkpoint directory (UserError if unusable).
        quantize="fp8": quantise a bf16 checkpoint's experts while loading (mogelm.checkpoint)."""
        from mogelm.checkpoint import from_pretrained

        path = Path(path)
        if not path.is_dir():
            raise UserError(f"model directory {str(path)!r} does not exist")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        tokenizer = Tokenizer.from_dir(path)
        model = from_pretrained(path, device=device, dtype=dtype, quantize=quantize)
        if tokenizer.tok.get_vocab_size(with_added_tokens=True) > model.cfg.vocab_size:
            raise UserError(f"{path}: the tokenizer has more tokens ({tokenizer.vocab_size}) than the "
                            f"model's vocabulary ({model.cfg.vocab_size})")
        return cls(model, tokenizer, default_sampling=generation_defaults(path), **kwargs)

    # --- requests -------------------------------------------------------------------------------
    def sampling_params(self, **overrides) -> SamplingParams:
        """SamplingParams with the checkpoint's defaults for every field not given (or given as None)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return SamplingParams(**{**self.default_sampling, **given})

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    on_output: Callable[[RequestOutput], None] | None = None, request_id: str | None = None,
                    truncate_to_context: bool = False) -> Request:
        """Queue a request (thread-safe). RequestError (a ValueError) if the engine cannot serve it
        (see check_request). With truncate_to_context, params.max_tokens is only an upper bound: a
        request with more than the room left in the context stops at its end (finish_reason
        "length") instead of being refused."""
        params = params or self.sampling_params()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids")
            prompt = self.tokenizer.encode(prompt)
        prompt = list(prompt)
        self.check_request(prompt, None if truncate_to_context else params.max_tokens)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        req = Request(request_id or f"req-{next(self._ids)}", prompt, params, stop_ids, gen, on_output)
        self._incoming.append(req)
        return req

    def check_request(self, prompt_ids: list[int], max_tokens: int | None) -> None:
        """The engine's request limits, in one place: a non-empty prompt of token ids in the
        vocabulary, shorter than the context, with room for max_tokens more (None: any room)."""
        vocab, n, limit = self.model.cfg.vocab_size, len(prompt_ids), self.max_len
        if not prompt_ids:
            raise RequestError("prompt must not be empty", "prompt")
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        if n >= limit:
            raise RequestError(f"This model's maximum context length is {limit} tokens; the prompt has {n} "
                               "tokens.", "prompt", "context_length_exceeded")
        if max_tokens is not None and n + max_tokens > limit:
            raise RequestError(f"This model's maximum context length is {limit} tokens. However, you "
                               f"requested {n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the "
                               "completion).", "max_tokens", "context_length_exceeded")

    def abort(self, request_id: str) -> None:
        """Finish a request early (thread-safe); its callback gets finish_reason "abort"."""
        self._aborts.append(request_id)

    def abort_all(self) -> None:
        """Abort every queued and running request (thread-safe)."""
        self._aborts.append(None)

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._incoming) + len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self._incoming or self.waiting or self.running)

    def generate(self, prompts: list[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Completion]:
        """Run the given prompts to completion (continuous batching when there are more than max_batch)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        while any(r.finish_reason is None for r in reqs):
            self.step()
        return [r.completion() for r in reqs]

    # --- the step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        outputs: list[tuple[Request, RequestOutput]] = []
        while self._incoming:
            self.waiting.append(self._incoming.popleft())
        while self._aborts:
            outputs += self._abort(self._aborts.popleft())
        while self.waiting and self.cache.num_free:  # 1. admit
            req = self.waiting.popleft()
            req.slot = self.cache.allocate()
            self.running.append(req)

        decoding = [r for r in self.running if r.decoding]
        budget = self.chunk_size  # 2. prefill, chunked
        for req in self.running:
            if budget == 0:
                break
            if req.num_generated or req.finish_reason is not None:
                continue
            n = min(budget, len(req.prompt_ids) - req.num_cached)
            logits_V = self._prefill(req, n)
            budget -= n
            if req.num_cached == len(req.prompt_ids):
                token = sample(logits_V[None], [req.params], [req.generator])
                outputs.append((req, self._advance(req, int(token[0]))))

        if decoding:  # 3. decode
            logits_BV = self._decode(decoding)
            tokens = sample(logits_BV, [r.params for r in decoding], [r.generator for r in decoding]).tolist()
            outputs += [(r, self._advance(r, t)) for r, t in zip(decoding, tokens)]

        for req in [r for r in self.running if r.finish_reason is not None]:  # 4. retire
            self.cache.release(req.slot)
            self.running.remove(req)
        self._deliver(outputs)
        return [out for _, out in outputs]

    def _prefill(self, req: Request, n: int) -> Tensor:
        """Write prompt tokens [num_cached, num_cached + n) into the request's slot; last logits [V]."""
        start = req.num_cached
        logits_V = prefill(self.model, self.cache.rows(req.slot, req.slot + 1),
                           req.prompt_ids[start:start + n], start)
        req.num_cached += n
        return logits_V

    def _decode(self, reqs: list[Request]) -> Tensor:
        """One token for each request, batched over cache rows [0, max slot]; logits [len(reqs), V]."""
        n = max(r.slot for r in reqs) + 1
        ids = [0] * n
        pos = [self.cache.scratch_pos] * n
        for r in reqs:
            ids[r.slot], pos[r.slot] = r.output_ids[-1], r.next_pos
        ids_n = torch.tensor(ids, device=self.device)
        pos_n = torch.tensor(pos, device=self.device)
        if self.graphs is not None:
            logits = self.graphs(ids_n, pos_n)
        else:
            kv_len = max(r.next_pos for r in reqs) + 1
            logits = decode_one_token(self.model, self.cache.rows(0, n), ids_n, pos_n, kv_len)
        return logits[torch.tensor([r.slot for r in reqs], device=self.device)]

    def _advance(self, req: Request, token: int) -> RequestOutput:
        """Account for one sampled token: stop token, max_tokens, context, stop strings, new text."""
        req.num_generated += 1
        new_ids = []
        if token in req.stop_ids:
            req.finish_reason = "stop"
        else:
            req.output_ids.append(token)
            new_ids.append(token)
            if req.num_generated >= req.params.max_tokens or req.next_pos + 1 >= self.max_len:
                req.finish_reason = "length"
        new_text = self._release_text(req)
        return RequestOutput(req.id, new_ids, new_text, req.finish_reason is not None, req.finish_reason,
                             len(req.prompt_ids), req.num_generated)

    def _release_text(self, req: Request) -> str:
        """New text since the last call; finds stop strings and holds back what could start one."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(req.output_ids)
        stops = req.params.stop
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            text = text[:min(hits)]
            req.finish_reason = "stop"
        elif req.finish_reason is None:  # still running: hide an incomplete character or stop prefix
            text = text.rstrip("\ufffd")
            text = text[:len(text) - _held_back(text, stops)]
        new = text[len(req.text):] if text.startswith(req.text) else ""
        if len(text) > len(req.text):
            req.text = text
        return new

    def _abort(self, request_id: str | None) -> list[tuple[Request, RequestOutput]]:
        """Mark matching requests (all when request_id is None) aborted; step() frees their slots."""
        hits = [r for r in list(self.waiting) + self.running
                if (request_id is None or r.id == request_id) and r.finish_reason is None]
        for req in hits:
            req.finish_reason = "abort"
            if req in self.waiting:
                self.waiting.remove(req)
        return [(r, RequestOutput(r.id, [], "", True, "abort", len(r.prompt_ids), r.num_generated))
                for r in hits]

    def fail_all(self, message: str) -> None:
        """Finish every request with finish_reason "error" (after an exception in step)."""
        outputs = []
        for req in list(self._incoming) + list(self.waiting) + self.running:
            req.finish_reason, req.error = "error", message
            outputs.append((req, RequestOutput(req.id, [], "", True, "error", len(req.prompt_ids),
                                               req.num_generated, error=message)))
        for req in self.running:
            self.cache.release(req.slot)
        self._incoming.clear()
        self.waiting.clear()
        self.running.clear()
        self._deliver(outputs)

    @staticmethod
    def _deliver(outputs: list[tuple[Request, RequestOutput]]) -> None:
        for req, out in outputs:
            if req.on_output is not None:
                req.on_output(out)


def generation_defaults(path: str | Path) -> dict:
    """temperature / top_p / top_k from the checkpoint's generation_config.json, else the Pangu docs'
    values."""
    f = Path(path) / "generation_config.json"
    if not f.is_file():
        return dict(PANGU_DEFAULTS)
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{f} is not valid JSON ({e})") from None
    out = {k: d[k] for k in ("temperature", "top_p", "top_k") if d.get(k) is not None}
    if d.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


class EngineThread:
    """Runs `engine.step()` on a background thread whenever there is work, so callers (an asyncio
    server) never block on the model. Requests are added with `engine.add_request(...)` followed by
    `wake()`; outputs reach each request's `on_output` callback on this thread."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mogelm-engine", daemon=True)

    def start(self) -> EngineThread:
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        engine = self.engine
        while True:
            if not engine.has_unfinished():
                if self._stopping:
                    return
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                engine.step()
            except Exception as e:  # keep serving: fail the batch in flight, log the traceback
                log.exception("engine step failed")
                engine.fail_all(f"internal error: {type(e).__name__}: {e}")

    def stop(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop after the requests in flight finish (drain) or abort them first; True if the thread ended."""
        if not drain:
            self.engine.abort_all()
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()
