"""The inference engine: continuous batching over a paged KV cache, with mixed prefill + decode
steps, chunked prefill, prefix caching, preemption under memory pressure and CUDA-graph decode.

    engine = Engine.from_pretrained("ckpt/", max_batch=8)           # or Engine(model, tokenizer, ...)
    outs = engine.generate(["def main(", "import os"], SamplingParams(max_tokens=32, temperature=0))
    print(outs[0].text, outs[0].finish_reason, engine.stats())

Pieces (one concept per module):
  block_manager.py  blocks of the KV pool: free list, refcounts, block tables, prefix cache (LRU)
  scheduler.py      which sequences run this step and with how many tokens; preemption
  paged.py          the pool tensors and the step's attention state the model's Attention calls
  kernels/ops.py    paged decode attention (split-KV Triton kernel on CUDA) and prefill (SDPA)

A request is a sequence of token ids (prompt, then generated tokens) and `num_computed`, how many
of them have their KV in the pool. One `step()`:
  1. takes in new requests and aborts (an aborted request's blocks are freed at once);
  2. schedules (Scheduler.schedule): every running sequence with one token left decodes it;
     prompt chunks of prefilling and newly admitted sequences fill a budget of `chunk_size`
     prompt tokens; a prompt's leading blocks found in the prefix cache are not recomputed; when
     blocks run out the newest sequence is preempted and later recomputed;
  3. runs ONE forward over the packed batch [1, N] (decode rows first, then the chunks; no
     padding): copy-on-write block copies first, then the model with a PagedAttention state;
     a decode-only step replays the CUDA graph captured for the smallest bucket >= its rows;
     logits are computed only for the last token of each sequence whose tokens are all in (and
     for the prompt positions of a request that asks for prompt logprobs);
  4. commits full blocks to the prefix cache; computes the prompt logprobs asked for; forks the
     children of parents whose prompt is now in; samples the next token of every sequence whose
     tokens are all in (with their logprobs when asked), or verifies its drafts (speculative
     decoding, below), checks stop conditions (stop token, stop string, max_tokens, context full)
     and frees finished sequences.

Positions are explicit (token i of a sequence sits at position i), so batching changes nothing:
greedy output equals decoding each prompt alone and equals the uncached forward (tests). A
preempted request keeps what it has streamed; it recomputes its prompt and generated tokens
(prefill, mostly prefix-cache hits) and goes on from its next token: nothing is lost or repeated.

Memory: the pool is sized once. On CUDA, after the weights are loaded, a forward of the largest
step is profiled and the pool takes what is left of `gpu_memory_fraction` of the device memory
(`kv_cache_tokens` overrides); on CPU it holds `kv_cache_tokens` or max_batch x max_len tokens, so
no sequence is ever preempted by default. The context limit (max_len) is at most the pool's
capacity, so any accepted request fits alone. `stats()` reports blocks total/used/free, prefix-cache
queries/hits, running/waiting, preemptions and speculative decoding's counters (for metrics).
With MTP drafting the pool holds one more layer (the MTP block's KV).

What a request can ask for beyond its tokens (the request life cycle; all from the RAW logits of
the step, i.e. the model's own distribution before bias, penalties and temperature, vLLM's default):
  - logprobs (params.logprobs = k): each sampled token's logprob, rank and the top k, computed
    from the same logits row it was sampled from (sampling.token_logprobs); RequestOutput.logprobs
    holds one entry per new token id.
  - prompt logprobs (params.prompt_logprobs = k, OpenAI's `echo` with `logprobs`): the logits of
    every prompt position are computed too (_build_batch adds the chunk's positions to the model's
    logits_indices, so chunk boundaries change nothing), turned into logprobs of the next prompt
    token right after the forward (in slices, so the fp32 temporaries stay bounded) and kept;
    the first output carries them, None first (nothing predicts the first token). Such a request
    does not READ the prefix cache until its prompt logprobs are complete (a cached block's
    positions would have no logits); it still commits its blocks for others. The logits of those
    positions (chunk x vocabulary, in the model dtype) are memory beyond the profiled step.
  - penalties (presence / frequency / repetition): a PenaltyState per request (which tokens are in
    the prompt, how often each was generated), made at its first sampling and updated with every
    sampled token, is handed to sample() with the row.
  - n choices of one prompt (add_choices): the first choice is the parent; the others wait on it
    (Request.children) and are forked when its prompt is computed: BlockManager.fork shares every
    prompt block (refcounts), each child samples its own first token from the parent's logits row
    and runs on as an ordinary sequence; the first write into the shared last partial block copies
    it (copy-on-write in prepare_write). So n choices cost one prefill. Seeds seed, seed + 1, ...
    The scheduler admits a parent only when its whole group fits in max_batch (groups hold at most
    max_batch choices; a larger n is split into groups, later groups find the prompt in the prefix
    cache). Aborting a parent whose children still wait hands the group to its first child.

Speculative decoding (speculative="ngram" | "mtp", draft_tokens=k; spec_decode.py has the whole
story): before scheduling, every decoding request that may speculate gets up to k drafts appended
to its token_ids (Request.num_draft); the scheduler runs it as a verify row of k + 1 tokens, which
_build_batch lays out as k + 1 decode rows of the paged kernel (one block table, lengths
position + 1), so a decode+verify step replays a CUDA graph like a decode step (buckets up to
max_batch x (k + 1) rows); after the forward _verify applies the accept rule, emits the accepted
drafts and the target's token through _advance one by one (every stop check as without drafts),
and truncates the request's blocks to the positions whose tokens stand. With MTP the forward also
returns the trunk's hidden states and _mtp_rows runs the MTP module over them for the next drafts.
Speculation pauses while more than spec_max_batch sequences run; penalised requests never draft.
The engine works on token ids; the tokenizer (optional) is used only for text prompts, stop strings
and the text it returns. fp32 on CPU, bf16 on CUDA by default.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mogelm.errors import UserError
from mogelm.inference.block_manager import NULL_BLOCK, BlockManager
from mogelm.inference.chat import Tokenizer
from mogelm.inference.drafters import Drafter, NgramDrafter, for_sequence
from mogelm.inference.fuse import fuse_for_inference
from mogelm.inference.graphs import PagedGraphs, StaticRows, decode_buckets
from mogelm.inference.paged import FP8, PagedAttention, PagedKVCache, PrefillChunk, calibrate_kv_scales
from mogelm.inference.sampling import (
    PANGU_DEFAULTS,
    PenaltyState,
    SamplingParams,
    TokenLogprob,
    sample,
    token_logprobs,
)
from mogelm.inference.scheduler import ScheduledBatch, Scheduler
from mogelm.inference.spec_decode import DEFAULT_SPEC_MAX_BATCH, MTPRunner, SpecConfig, may_speculate, verify
from mogelm.inference.spec_policy import POLICIES, make_policy
from mogelm.model import Transformer

log = logging.getLogger("mogelm.inference")


class RequestError(ValueError):
    """A request the engine cannot serve as given: the prompt is empty, holds a token id outside the
    vocabulary, or does not fit the context (or the KV cache) with its max_tokens. `param` names the
    offending field ("prompt" or "max_tokens") and `code` the reason ("invalid_value",
    "context_length_exceeded"); the server answers 400 with them. Messages follow OpenAI's wording."""

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
    logprobs: list[TokenLogprob] | None = None  # one per new token id (params.logprobs set), else None
    # the prompt's (params.prompt_logprobs set; on the first output after sampling only): one per
    # prompt token, None for the first
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator
    on_output: Callable[[RequestOutput], None] | None = None
    token_ids: list[int] = field(default_factory=list)  # prompt, then generated tokens (fed or to feed)
    num_computed: int = 0  # tokens of token_ids whose KV is in the pool
    num_preemptions: int = 0
    output_ids: list[int] = field(default_factory=list)
    num_generated: int = 0  # sampled tokens, a final stop token included
    text: str = ""  # text released so far
    finish_reason: str | None = None
    error: str | None = None
    penalty: PenaltyState | None = None  # made at the first sampling when params.has_penalties
    logprobs: list[TokenLogprob] | None = None  # of output_ids, when params.logprobs is set
    # entry k: prompt token k given the ones before (None for k = 0); grows chunk by chunk
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False
    children: list[Request] = field(default_factory=list)  # choices to fork once the prompt is in
    # speculative decoding (spec_decode.py): drafts at the end of token_ids this step; MTP's next
    # draft and the module's output hidden state it came from (for chaining), made after a step
    num_draft: int = 0
    mtp_draft: int | None = None
    mtp_hidden: Tensor | None = None
    drafter: Drafter | None = None  # n-gram drafts: this sequence's drafter (drafters.for_sequence)

    def __post_init__(self):
        self.token_ids = list(self.prompt_ids)
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def group_size(self) -> int:
        """Running slots this request takes once its children are forked (the scheduler's admission)."""
        return 1 + len(self.children)

    @property
    def reads_prefix_cache(self) -> bool:
        """False while prompt logprobs are missing: every prompt position must be computed."""
        return self.prompt_logprobs is None or len(self.prompt_logprobs) >= len(self.prompt_ids)

    def completion(self) -> Completion:
        return Completion(self.id, self.prompt_ids, list(self.output_ids), self.text,
                          self.finish_reason or "", len(self.prompt_ids), self.num_generated,
                          None if self.logprobs is None else list(self.logprobs),
                          None if self.prompt_logprobs is None else list(self.prompt_logprobs))


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class StepInputs:
    """One step's packed batch on the host (built by Engine._build_batch)."""

    ids: list[int]  # [N] token ids, decode rows first
    positions: list[int]  # [N]
    slots: list[int]  # [N] pool slots
    decode_tables: list[list[int]]  # [R] block tables of the decode rows
    decode_lens: list[int]  # [R] their position + 1
    chunks: list[tuple[int, int, int, list[int]]]  # (lo, hi, start position, block table)
    logits_indices: list[int]  # tokens whose logits are needed
    samplers: list[Request]  # requests whose tokens are all in: they sample a token
    sample_rows: list[int]  # the row of each sampler in the logits
    # prompt logprobs: (request, first logits row, first position, count): logits rows
    # r0 .. r0 + count - 1 are positions p0 .. p0 + count - 1 and predict prompt token p + 1
    prompt_spans: list[tuple[Request, int, int, int]] = field(default_factory=list)
    # speculative verify rows: (request, first logits row, number of drafts)
    verifiers: list[tuple[Request, int, int]] = field(default_factory=list)
    # every scheduled row: (request, first packed token, first position) (MTP rows after the step)
    row_starts: list[tuple[Request, int, int]] = field(default_factory=list)


class CUDAGraphRunner(PagedGraphs):
    """Decode-only steps of the model replayed from CUDA graphs, one per bucketed batch size
    (graphs.PagedGraphs: the static buffers, buckets and padding rows; with the decode kernel's split
    factor fixed per bucket). A call returns logits [R, V] (views of the static outputs); with_hidden
    (MTP drafting) also the trunk's pre-norm hidden states [R, D]. On a CPU (tests only; the engine
    captures graphs on CUDA alone) the "graphs" replay eagerly on the same static buffers."""

    def __init__(self, model: Transformer, cache: PagedKVCache, buckets: list[int], max_blocks: int,
                 with_hidden: bool = False):
        """with_hidden: the graphs also return the trunk's pre-norm hidden states (MTP drafting)."""
        self.with_hidden = with_hidden

        def build(rows: StaticRows):
            def fwd():
                if not with_hidden:
                    return model(rows.ids_1b, positions_BT=rows.pos_1b, kv_cache=rows.state)[0]  # [b, V]
                out = model(rows.ids_1b, positions_BT=rows.pos_1b, kv_cache=rows.state, return_hidden=True)
                return out.logits[0], out.trunk_hidden[0]  # [b, V], [b, D] (the final norm once)
            return fwd

        super().__init__(cache, buckets, max_blocks, build)


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        max_batch: int = 8,
        max_len: int | None = None,
        chunk_size: int | None = None,
        cuda_graphs: bool | None = None,
        default_sampling: dict | None = None,
        block_size: int = 16,
        kv_cache_tokens: int | None = None,
        gpu_memory_fraction: float = 0.9,
        kv_cache_dtype: str | torch.dtype | None = None,
        prefix_caching: bool = True,
        fuse: bool | None = None,
        speculative: str | None = None,
        draft_tokens: int = 3,
        spec_max_batch: int | None = None,
        spec_policy: str | None = None,
    ):
        """max_batch: sequences running at once (the largest decode batch); max_len: context per
        sequence (default the model's); chunk_size: prompt tokens per step (default 256 on CPU, 2048 on
        CUDA); block_size: tokens per KV block; kv_cache_tokens: pool size in tokens (default: CPU
        max_batch x max_len, CUDA what gpu_memory_fraction leaves after weights and activations);
        kv_cache_dtype: None/"auto" (the model's dtype) or "fp8" (e4m3, per-head scales calibrated at
        start-up); prefix_caching: reuse cached blocks of identical prompt prefixes; fuse: apply the
        load-time fusions of inference/fuse.py to the model, in place (default: on CUDA);
        speculative: None, "ngram" or "mtp" (spec_decode.py), with up to draft_tokens drafts per
        step, never while more than spec_max_batch sequences run; spec_policy (spec_policy.py):
        "auto" measures what speculation earns and picks 0..draft_tokens drafts per batch size
        (default on CUDA; spec_max_batch then defaults to max_batch), "fixed" always drafts
        draft_tokens up to spec_max_batch (default on CPU, with DEFAULT_SPEC_MAX_BATCH)."""
        cfg = model.cfg
        p = next(model.parameters())
        self.model, self.tokenizer, self.device = model.eval(), tokenizer, p.device
        on_cuda = p.device.type == "cuda"
        if on_cuda if fuse is None else fuse:
            fuse_for_inference(model)  # fused q/k/v + RoPE and gate/up GEMMs (fewer launches per step)
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if max_batch <= 0 or block_size <= 0:
            raise ValueError(f"max_batch ({max_batch}) and block_size ({block_size}) must be positive")
        if kv_cache_tokens is not None and kv_cache_tokens <= 0:
            raise ValueError(f"kv_cache_tokens must be positive, got {kv_cache_tokens}")
        if not 0 < gpu_memory_fraction <= 1:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {gpu_memory_fraction}")
        self.max_batch, self.block_size = max_batch, block_size
        self.spec: SpecConfig | None = None
        if speculative is not None:
            if speculative == "mtp" and getattr(model, "mtp", None) is None:
                raise UserError("--speculative mtp needs a checkpoint with MTP modules (mtp_depth > 0 in its "
                                "config): train one with `mogelm train --mtp-depth 1`, or use "
                                "--speculative ngram")
            policy = spec_policy or ("auto" if on_cuda else "fixed")
            if policy not in POLICIES:
                raise ValueError(f"spec_policy must be one of {POLICIES}, got {spec_policy!r}")
            if spec_max_batch is None:
                spec_max_batch = max_batch if policy == "auto" else DEFAULT_SPEC_MAX_BATCH
            self.spec = SpecConfig(speculative, draft_tokens, spec_max_batch)
            self.spec_policy = make_policy(policy, draft_tokens, spec_max_batch)
        use_mtp = self.spec is not None and self.spec.method == "mtp"
        pool_layers = cfg.num_layers + int(use_mtp)  # MTP module 1 keeps its KV in one more layer
        self.chunk_size = chunk_size or (2048 if on_cuda else 256)
        max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        kv_dtype = {None: p.dtype, "auto": p.dtype, "fp8": FP8}.get(kv_cache_dtype, kv_cache_dtype)
        if not isinstance(kv_dtype, torch.dtype):
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8', got {kv_cache_dtype!r}")

        if kv_cache_tokens is not None:
            num_blocks = -(-kv_cache_tokens // block_size) + 1
        elif on_cuda:
            num_blocks = self._blocks_for_memory(gpu_memory_fraction, kv_dtype, pool_layers)
        else:
            num_blocks = max_batch * -(-max_len // block_size) + 1
        self.max_len = min(max_len, (num_blocks - 1) * block_size)
        if self.max_len < max_len:
            log.warning("the KV cache holds %d tokens: context limited to that (from %d)", self.max_len,
                        max_len)
        self.max_len_model = max_len
        self.cache = PagedKVCache(cfg, num_blocks, block_size, device=p.device, dtype=p.dtype,
                                  kv_dtype=kv_dtype, num_layers=pool_layers)
        if kv_dtype == FP8:
            with torch.inference_mode():
                calibrate_kv_scales(model, self.cache)
                if use_mtp:  # the MTP layer (drafts only): the widest of the trunk's per-head scales
                    L = cfg.num_layers
                    for scales in (self.cache.k_scale, self.cache.v_scale):
                        scales[L].copy_(torch.stack(scales[:L]).amax(0))
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_batch, self.chunk_size)
        self.max_blocks_per_seq = -(-self.max_len // block_size)
        self.default_sampling = dict(default_sampling or {})
        self.eos_ids = frozenset([tokenizer.eos_token_id]
                                 if tokenizer and tokenizer.eos_token_id is not None else [])
        self._incoming: deque[Request] = deque()  # filled by any thread, drained by step()
        self._aborts: deque[str | None] = deque()  # None: every request
        self._ids = itertools.count()
        # children waiting for their parent's prompt (num_waiting): each counter has one writer thread
        self._unforked_added = self._unforked_done = 0
        self.num_steps = self.num_prompt_tokens = self.num_generated_tokens = 0
        self.spec_drafts = self.spec_accepted = self.spec_verifies = 0  # counters (stats())
        self.spec_draft_length = 0  # the policy's choice for the last step
        self._step_accepts: list[int] = []  # drafts accepted per verify row of the current step
        self.mtp = MTPRunner(model, self.cache, block_size) if use_mtp else None
        if self.spec is not None and self.spec.method == "ngram":
            self.ngram = NgramDrafter()  # each request drafts through its own index (for_sequence)
        use_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        self.graphs: CUDAGraphRunner | None = None
        if use_graphs:
            if not torch.cuda.is_available() or not on_cuda:
                raise ValueError("cuda_graphs=True needs the model on a CUDA device")
            try:
                with torch.inference_mode():
                    # verify rows are decode rows: up to (k + 1) per sequence while speculating
                    rows = max_batch if self.spec is None else max(
                        max_batch, min(max_batch, self.spec.max_batch) * (self.spec.k + 1))
                    self.graphs = CUDAGraphRunner(model, self.cache, decode_buckets(rows),
                                                  self.max_blocks_per_seq, with_hidden=use_mtp)
            except Exception as e:  # a model op that cannot be captured: fall back to eager decode
                log.warning("CUDA graph capture failed (%s); decoding eagerly", e)
        if self.graphs is not None and self.mtp is not None:  # MTP drafting rows: the same buckets
            try:
                with torch.inference_mode():
                    self.mtp.capture(self.graphs.buckets, self.max_blocks_per_seq)
            except Exception as e:
                log.warning("CUDA graph capture of the MTP module failed (%s); drafting eagerly", e)
                self.mtp.graphs = None

    MAX_BLOCKS = 1 << 20  # 16 M tokens at block size 16: plenty; keeps the host-side lists small

    def _blocks_for_memory(self, fraction: float, kv_dtype: torch.dtype, num_layers: int) -> int:
        """Pool blocks that fit in this engine's share of the device memory (`fraction` of the total,
        as vLLM's gpu_memory_utilization: per instance) after its weights, the activation peak of its
        largest step (profiled: a forward of chunk_size + max_batch tokens), the logits of max_batch
        rows and a margin for CUDA graphs and workspaces, and never more than is free now."""
        cfg, dev = self.model.cfg, self.device
        weights = sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *self.model.buffers()])
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        T = min(self.chunk_size + self.max_batch, cfg.max_seq_len)
        ids = torch.randint(0, cfg.vocab_size, (1, T), device=dev)
        with torch.inference_mode():
            self.model(ids, last_token_only=True)
        torch.cuda.synchronize(dev)
        activations = torch.cuda.max_memory_allocated(dev) - before
        del ids
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        reserve = activations + 4 * self.max_batch * cfg.vocab_size * 4 + (512 << 20)  # + fp32 logits, margin
        share = fraction * total - weights - reserve  # this engine's share, after weights and a step
        budget = min(share, free - reserve)
        per_block = PagedKVCache.bytes_per_block(cfg, self.block_size, kv_dtype, num_layers)
        blocks = min(int(budget // per_block), self.MAX_BLOCKS)
        gib = 2**30
        if blocks < 2:
            why = (f"--gpu-memory-fraction {fraction} of {total / gib:.1f} GiB leaves nothing after the "
                   f"weights ({weights / gib:.1f} GiB) and a step's activations ({reserve / gib:.1f} GiB)"
                   if share <= free - reserve else f"only {free / gib:.1f} GiB of the GPU is free")
            raise UserError(f"no room for the KV cache: {why}; raise --gpu-memory-fraction, free the GPU or "
                            "lower --chunk-size / --max-batch")
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB); GPU %.1f GiB, fraction %.2f, weights "
                 "%.2f GiB, activations %.2f GiB, free before the cache %.1f GiB", blocks, self.block_size,
                 blocks * per_block / gib, total / gib, fraction, weights / gib, activations / gib,
                 free / gib)
        return blocks  # the null block included

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
        callback = None if on_output is None else lambda j, out: on_output(out)
        return self.add_choices(prompt, params, 1, callback, request_id, truncate_to_context)[0]

    def add_choices(self, prompt: str | list[int], params: SamplingParams | None = None, n: int = 1,
                    on_output: Callable[[int, RequestOutput], None] | None = None,
                    request_id: str | None = None, truncate_to_context: bool = False) -> list[Request]:
        """Queue n choices of one prompt (thread-safe; OpenAI's `n`) sharing one prefill: the first is
        computed, the others are forked from it when its prompt is in (module docstring). Choice j
        draws with seed params.seed + j when a seed is given. on_output(j, out) gets choice j's
        outputs. Request ids: request_id (or a new one), then "<id>-1", "<id>-2", ..."""
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        params = params or self.sampling_params()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids")
            prompt = self.tokenizer.encode(prompt)
        prompt = list(prompt)
        self.check_request(prompt, None if truncate_to_context else params.max_tokens)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        base_id = request_id or f"req-{next(self._ids)}"
        reqs = []
        for j in range(n):
            sp = params if j == 0 or params.seed is None else replace(params, seed=(params.seed + j) % 2**63)
            gen = torch.Generator(device=self.device)
            gen.manual_seed(sp.seed if sp.seed is not None else random.getrandbits(63))
            callback = None if on_output is None else functools.partial(on_output, j)
            reqs.append(Request(base_id if j == 0 else f"{base_id}-{j}", prompt, sp, stop_ids, gen, callback))
        for lo in range(0, n, self.max_batch):  # groups that fit the batch: a parent and its children
            reqs[lo].children = reqs[lo + 1:lo + self.max_batch]
            self._unforked_added += len(reqs[lo].children)
            self._incoming.append(reqs[lo])
        return reqs

    def check_request(self, prompt_ids: list[int], max_tokens: int | None) -> None:
        """The engine's request limits, in one place: a non-empty prompt of token ids in the
        vocabulary, shorter than the context, with room for max_tokens more (None: any room)."""
        vocab, n, limit = self.model.cfg.vocab_size, len(prompt_ids), self.max_len
        if not prompt_ids:
            raise RequestError("prompt must not be empty", "prompt")
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        # a context cut by the KV pool's size says so: such a request could never fit in the cache
        why = "" if limit == self.max_len_model else (
            f" (the KV cache holds {limit} tokens; raise --gpu-memory-fraction or --kv-cache-tokens)")
        if n >= limit:
            raise RequestError(f"This model's maximum context length is {limit} tokens; the prompt has {n} "
                               f"tokens.{why}", "prompt", "context_length_exceeded")
        if max_tokens is not None and n + max_tokens > limit:
            raise RequestError(f"This model's maximum context length is {limit} tokens. However, you "
                               f"requested {n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the "
                               f"completion).{why}", "max_tokens", "context_length_exceeded")

    def abort(self, request_id: str) -> None:
        """Finish a request early (thread-safe); its callback gets finish_reason "abort"."""
        self._aborts.append(request_id)

    def abort_all(self) -> None:
        """Abort every queued and running request (thread-safe)."""
        self._aborts.append(None)

    @property
    def running(self) -> list[Request]:
        """Requests being computed (admitted, holding KV blocks), the oldest first."""
        return self.scheduler.running

    @property
    def waiting(self) -> deque[Request]:
        """Requests queued for admission (preempted ones first)."""
        return self.scheduler.waiting

    @property
    def num_waiting(self) -> int:
        """Requests not yet running (queued, preempted, or choices waiting to be forked)."""
        return len(self._incoming) + len(self.waiting) + self._unforked_added - self._unforked_done

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

    def stats(self) -> dict[str, int | float]:
        """Counters and gauges for /metrics (mogelm.inference.metrics exports every field as
        `mogelm:<key>`; keys ending in `_total` are counters): requests running/waiting; KV blocks
        total/used/free/cached, block size, cache tokens and usage; prefix-cache queries/hits (in
        tokens), evictions and hit rate; preemptions, steps, prompt tokens computed (recomputes
        after preemption included, prefix-cache hits not) and tokens generated. Plain numbers,
        safe to read from another thread."""
        blocks = self.blocks.stats()
        queries = blocks["prefix_cache_queries_total"]
        return dict(
            num_requests_running=len(self.running), num_requests_waiting=self.num_waiting, **blocks,
            kv_cache_tokens=self.blocks.num_usable * self.block_size,
            kv_cache_usage=blocks["kv_blocks_used"] / max(blocks["kv_blocks_total"], 1),
            prefix_cache_hit_rate=blocks["prefix_cache_hits_total"] / queries if queries else 0.0,
            num_preemptions_total=self.scheduler.num_preemptions, engine_steps_total=self.num_steps,
            prompt_tokens_computed_total=self.num_prompt_tokens,
            generated_tokens_total=self.num_generated_tokens, **self.spec_stats())

    def spec_stats(self) -> dict[str, int | float]:
        """Speculative decoding's counters (zero without it): draft tokens proposed and accepted,
        verify rows run (one per sequence and step), the acceptance rate (accepted / drafts) and the
        mean accepted length (tokens emitted per verify row, the corrected or bonus token included:
        1 + accepted / verify rows), and the draft length the policy chose for the last step (0: off)."""
        d, a, v = self.spec_drafts, self.spec_accepted, self.spec_verifies
        return dict(spec_decode_draft_tokens_total=d, spec_decode_accepted_tokens_total=a,
                    spec_decode_num_drafts_total=v, spec_decode_acceptance_rate=a / d if d else 0.0,
                    spec_decode_mean_accepted_length=1 + a / v if v else 0.0,
                    spec_decode_draft_length=self.spec_draft_length)

    # --- the step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        outputs: list[tuple[Request, RequestOutput]] = []
        arrived, aborts = self._arrivals()  # 1. new requests and aborts
        for req in arrived:
            self.scheduler.add(req)
        for request_id in aborts:
            outputs += self._abort(request_id)

        t0 = time.perf_counter()
        num_running = len(self.running)
        k_now = self.spec_policy.choose(num_running) if self.spec is not None else 0
        self.spec_draft_length = k_now
        speculating = self._propose_drafts(k_now)
        if self.mtp is not None and not speculating:
            for req in self.running:  # MTP rows pause with speculation: their drafts go stale
                req.mtp_draft = req.mtp_hidden = None
        batch = self.scheduler.schedule()  # 2. who runs, how many tokens
        if batch.rows:
            self.cache.copy_blocks(batch.copies)  # 3. copy-on-write, then one forward
            if self.mtp is not None and speculating:
                self._mtp_chain(batch)
            inputs = self._build_batch(batch)
            self._step_accepts = []  # drafts accepted per verify row (_verify)
            decode_only = batch.is_decode_only  # now: _verify resets the rows' num_draft it looks at
            logits, hidden = self._forward(inputs, decode_only, self.mtp is not None and speculating)
            verifying = {id(r) for r, _, _ in inputs.verifiers}
            for req, n in batch.rows:  # 4. bookkeeping, prompt logprobs, forks, sampling
                if id(req) in verifying:
                    continue  # after the accept rule (_verify)
                p, a = len(req.prompt_ids), req.num_computed
                self.num_prompt_tokens += min(a + n, p) - min(a, p)  # prompt positions computed (again)
                req.num_computed += n
                self.blocks.commit(req.id, req.token_ids, req.num_computed)
            if inputs.prompt_spans:
                self._prompt_logprobs(logits, inputs.prompt_spans)
            if inputs.samplers:
                outputs += self._sample(logits, inputs)
            if inputs.verifiers:
                outputs += self._verify(logits, inputs)
            if hidden is not None:
                self._mtp_rows(hidden, inputs)
            self.num_steps += 1
            # what this draft length cost and earned (MTP's first step after a pause drafts nothing yet)
            if self.spec is not None and decode_only and (self.mtp is None or inputs.verifiers or not k_now):
                accepted = [sum(min(n, j) for n in self._step_accepts) for j in range(1, k_now + 1)]
                seconds = time.perf_counter() - t0
                self.spec_policy.record(num_running, k_now, seconds, len(batch.rows), accepted)
        for req in [r for r in self.running if r.finish_reason is not None]:
            self.scheduler.finish(req)
        self._deliver(outputs)
        return [out for _, out in outputs]

    def _arrivals(self) -> tuple[list[Request], list[str | None]]:
        """The requests and aborts queued since the last step, taken off their queues (thread-safe).
        The seam of the lockstep engine (mogelm.inference.distributed): there rank 0 broadcasts
        exactly these and every other rank steps with what it received."""
        arrived: list[Request] = []
        while self._incoming:
            arrived.append(self._incoming.popleft())
        aborts: list[str | None] = []
        while self._aborts:
            aborts.append(self._aborts.popleft())
        return arrived, aborts

    def _build_batch(self, batch: ScheduledBatch) -> StepInputs:
        """The packed batch of a schedule: token ids, positions and pool slots of every row, block
        tables and lengths of the decode rows, the chunks' ranges, and which logits to compute: the
        last token of each sequence whose tokens are all in this step, and for a request asking for
        prompt logprobs, every prompt position of the row whose logprob it still lacks (all but the
        prompt's last position, which is the sampling row)."""
        bs = self.block_size
        inp = StepInputs([], [], [], [], [], [], [], [], [])
        for req, n in batch.rows:
            a, table = req.num_computed, self.blocks.tables[req.id]
            lo = len(inp.ids)
            inp.row_starts.append((req, lo, a))
            inp.ids += req.token_ids[a:a + n]
            inp.positions += range(a, a + n)
            inp.slots += [table[p // bs] * bs + p % bs for p in range(a, a + n)]
            if req.num_draft and n == 1 + req.num_draft:  # verify: n decode rows, all with logits
                inp.decode_tables += [table] * n
                inp.decode_lens += range(a + 1, a + n + 1)
                inp.verifiers.append((req, len(inp.logits_indices), req.num_draft))
                inp.logits_indices += range(lo, lo + n)
                continue
            if n == 1:
                inp.decode_tables.append(table)
                inp.decode_lens.append(a + 1)
            else:
                inp.chunks.append((lo, lo + n, a, table))
            if req.prompt_logprobs is not None:  # positions p predict prompt token p + 1
                first = max(a, len(req.prompt_logprobs) - 1)  # a recompute skips what is done
                last = min(a + n, len(req.prompt_ids) - 1)
                if first < last:
                    inp.prompt_spans.append((req, len(inp.logits_indices), first, last - first))
                    inp.logits_indices += range(lo + first - a, lo + last - a)
            if a + n == len(req.token_ids):
                inp.sample_rows.append(len(inp.logits_indices))
                inp.logits_indices.append(len(inp.ids) - 1)
                inp.samplers.append(req)
        return inp

    def _forward(self, inp: StepInputs, decode_only: bool, want_hidden: bool = False
                 ) -> tuple[Tensor, Tensor | None]:
        """Logits [len(inp.logits_indices), V] of one step, and with want_hidden the trunk's
        pre-norm hidden state of every packed token [N, D] (MTP drafting), else None."""
        dev = self.device
        width = max((len(t) for t in inp.decode_tables), default=1)
        padded = [t + [NULL_BLOCK] * (width - len(t)) for t in inp.decode_tables]  # numpy: 3x faster here
        tables = torch.from_numpy(np.array(padded, dtype=np.int32).reshape(len(padded), width))
        lens = torch.tensor(inp.decode_lens, dtype=torch.int32)
        ids, pos = torch.tensor(inp.ids), torch.tensor(inp.positions)
        slots = torch.tensor(inp.slots)
        idx = torch.tensor(inp.logits_indices, dtype=torch.long, device=dev)
        if decode_only and self.graphs is not None:
            out = self.graphs(ids, pos, slots, tables, lens)
            logits, hidden = out if self.graphs.with_hidden else (out, None)
            return logits[idx], hidden if want_hidden else None
        chunks = [PrefillChunk(lo, hi, start, torch.tensor(table, dtype=torch.int32, device=dev))
                  for lo, hi, start, table in inp.chunks]
        state = PagedAttention(self.cache, slots.to(dev), tables.to(dev), lens.to(dev), chunks)
        if not want_hidden:
            return self.model(ids.to(dev)[None], positions_BT=pos.to(dev)[None], kv_cache=state,
                              logits_indices=idx), None
        x = self.model(ids.to(dev)[None], positions_BT=pos.to(dev)[None], kv_cache=state, head=False,
                       return_hidden=True).trunk_hidden.flatten(0, 1)  # [N, D]
        return self.model.lm_head(self.model.norm(x[idx])), x  # as the model's logits_indices path

    PROMPT_LOGPROBS_ROWS = 512  # rows per log_softmax: bounds its fp32 temporaries (2 x rows x vocab)

    def _prompt_logprobs(self, logits: Tensor, spans: list[tuple[Request, int, int, int]]) -> None:
        """Logprobs of the prompt tokens predicted by the spans' logits rows, appended to each request."""
        rows, targets, tops = [], [], []
        for req, r0, p0, count in spans:
            assert len(req.prompt_logprobs) == p0 + 1, "prompt logprobs are computed in order"
            rows += range(r0, r0 + count)
            targets += req.prompt_ids[p0 + 1:p0 + 1 + count]
            tops += [req.params.prompt_logprobs] * count
        step, entries = self.PROMPT_LOGPROBS_ROWS, []
        idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
        for i in range(0, len(rows), step):
            entries += token_logprobs(logits[idx[i:i + step]], targets[i:i + step], tops[i:i + step])
        k = 0
        for req, _, _, count in spans:
            req.prompt_logprobs += entries[k:k + count]
            k += count

    def _sample(self, logits: Tensor, inp: StepInputs) -> list[tuple[Request, RequestOutput]]:
        """Fork the children of samplers whose prompt is now in, then sample one token for every
        sequence (a child from its parent's row), with logprobs and penalty state as asked."""
        reqs, rows = [], []
        for req, row in zip(inp.samplers, inp.sample_rows):
            reqs.append(req)
            rows.append(row)
            for child in req.children:  # n > 1: the children share the parent's blocks from here on
                self.scheduler.fork(req, child)
                child.prompt_logprobs = req.prompt_logprobs
                reqs.append(child)
                rows.append(row)
            self._unforked_done += len(req.children)
            req.children = []
        logits_RV = logits if rows == list(range(logits.shape[0])) else \
            logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]
        params = [r.params for r in reqs]
        states = None
        if any(p.has_penalties for p in params):
            vocab = logits_RV.shape[-1]
            for r in reqs:
                if r.params.has_penalties and r.penalty is None:
                    r.penalty = PenaltyState(r.prompt_ids, vocab, device=logits_RV.device)
            states = [r.penalty for r in reqs]
        tokens_R = sample(logits_RV, params, [r.generator for r in reqs], states)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        entries: list[TokenLogprob | None] = [None] * len(reqs)
        if want:  # from the raw logits (vLLM's default): the model's own distribution
            at = torch.tensor(want, dtype=torch.long, device=logits_RV.device)
            got = token_logprobs(logits_RV[at], tokens_R[at], [params[i].logprobs for i in want])
            for i, e in zip(want, got):
                entries[i] = e
        outputs = []
        for r, t, e in zip(reqs, tokens_R.tolist(), entries):
            if r.penalty is not None:
                r.penalty.update(t)
            outputs.append((r, self._advance(r, t, e)))
        return outputs

    # --- speculative decoding (spec_decode.py) ----------------------------------------------------
    def _propose_drafts(self, k_now: int) -> bool:
        """Append up to k_now drafts (the policy's choice) to every decoding request that may
        speculate; False when speculation is off this step (none configured, or k_now 0). Drafts stop
        short of max_tokens and of the context: a draft that cannot be emitted is never computed."""
        spec = self.spec
        if spec is None or k_now <= 0:
            return False
        for req in self.running:
            if req.num_draft or len(req.token_ids) - req.num_computed != 1 or not may_speculate(req):
                continue
            k = min(k_now, req.params.max_tokens - req.num_generated - 1, self.max_len - len(req.token_ids))
            if k <= 0:
                continue
            if self.mtp is not None:  # draft 1 from the last step; the rest chained after scheduling
                drafts = [] if req.mtp_draft is None else [req.mtp_draft] * k
            else:
                if req.drafter is None:
                    req.drafter = for_sequence(self.ngram)
                drafts = req.drafter.propose(req.token_ids, k)
            req.token_ids += drafts
            req.num_draft = len(drafts)
        return True

    def _mtp_chain(self, batch: ScheduledBatch) -> None:
        """Drafts 2..k of MTP verify rows: module 1 chained on its own output (spec_decode.py), one
        batched forward (a graph replay) per extra draft, at positions the scheduler just allocated."""
        reqs = [r for r, n in batch.rows
                if r.num_draft > 1 and n == 1 + r.num_draft and r.mtp_hidden is not None]
        if not reqs:
            return
        hidden = torch.stack([r.mtp_hidden for r in reqs])  # [U, D]
        tables = [self.blocks.tables[r.id] for r in reqs]
        for i in range(1, max(r.num_draft for r in reqs)):
            keep = [j for j, r in enumerate(reqs) if r.num_draft > i]
            if len(keep) < len(reqs):  # fewer drafts for some (capped at max_tokens / the context)
                hidden = hidden[torch.tensor(keep, device=hidden.device)]
                reqs, tables = [reqs[j] for j in keep], [tables[j] for j in keep]
            a = [r.num_computed for r in reqs]  # the pending token's position; its drafts follow
            hidden, drafts = self.mtp.run(hidden, [r.token_ids[p + i] for r, p in zip(reqs, a)],
                                          [p + i - 1 for p in a], tables, range(len(reqs)))
            for r, p, t in zip(reqs, a, drafts):
                r.token_ids[p + i + 1] = t

    def _verify(self, logits: Tensor, inp: StepInputs) -> list[tuple[Request, RequestOutput]]:
        """The accept rule on every verify row, then per request: emit the accepted drafts and the
        target's token one by one through the usual stop checks, keep the KV of the positions whose
        tokens stand and free the blocks past them (BlockManager.truncate)."""
        results = verify(logits, inp.verifiers)
        outputs = []
        for (req, r0, k), (num_acc, nxt) in zip(inp.verifiers, results):
            a = req.num_computed
            drafts = req.token_ids[len(req.token_ids) - k:]
            del req.token_ids[len(req.token_ids) - k:]
            req.num_draft = 0
            self.spec_drafts += k
            self.spec_accepted += num_acc
            self._step_accepts.append(num_acc)
            self.spec_verifies += 1
            emitted = drafts[:num_acc] + [nxt]
            entries: list[TokenLogprob | None] = [None] * len(emitted)
            if req.logprobs is not None:  # each token from its own position's raw logits
                rows = torch.arange(r0, r0 + len(emitted), device=logits.device)
                entries = token_logprobs(logits[rows], emitted, req.params.logprobs)
            outs = []
            for t, e in zip(emitted, entries):
                outs.append(self._advance(req, t, e))
                if req.finish_reason is not None:
                    break
            # positions a .. a + num_acc hold the fed token and the accepted drafts; a stop token
            # among them is not in token_ids, so keep only the positions whose tokens stand
            req.num_computed = min(a + 1 + num_acc, len(req.token_ids))
            self.blocks.truncate(req.id, req.num_computed)
            self.blocks.commit(req.id, req.token_ids, req.num_computed)
            outputs.append((req, self._merge(outs)))
        return outputs

    @staticmethod
    def _merge(outs: list[RequestOutput]) -> RequestOutput:
        """One output for several tokens emitted in one step (the last one's status)."""
        if len(outs) == 1:
            return outs[0]
        last = outs[-1]
        lps = None if last.logprobs is None else [e for o in outs for e in o.logprobs]
        return replace(last, token_ids=[t for o in outs for t in o.token_ids],
                       text="".join(o.text for o in outs), logprobs=lps,
                       prompt_logprobs=outs[0].prompt_logprobs)

    def _mtp_rows(self, hidden_ND: Tensor, inp: StepInputs) -> None:
        """MTP module 1 over every position this step computed whose next token is now known (its KV
        in the MTP layer), and the next draft of every request that goes on decoding. One replay of
        the MTP graph (eager beyond its largest bucket) and one host copy for all drafts."""
        ids, tables, starts, los, counts, last = [], [], [], [], [], []
        for req, lo, a in inp.row_starts:
            n = req.num_computed - a
            if req.finish_reason is not None or n <= 0 or not may_speculate(req):
                continue
            ids += req.token_ids[a + 1:a + 1 + n]  # row p: the token after position p
            tables.append(self.blocks.tables[req.id])
            starts.append(a)
            los.append(lo)
            counts.append(n)
            if len(req.token_ids) == req.num_computed + 1:  # decoding next: it needs a draft
                last.append((req, len(ids) - 1))
            else:
                req.mtp_draft = req.mtp_hidden = None
        if not ids:
            return
        counts_U = np.array(counts)
        seq_M = np.repeat(np.arange(len(counts)), counts_U)  # the sequence of every MTP row
        off_M = np.arange(len(ids)) - np.repeat(np.cumsum(counts_U) - counts_U, counts_U)
        pos_M = np.array(starts)[seq_M] + off_M
        packed = torch.from_numpy(np.array(los)[seq_M] + off_M).to(hidden_ND.device)  # rows of hidden_ND
        out, drafts = self.mtp.run(hidden_ND[packed], ids, pos_M, tables, seq_M, [i for _, i in last])
        for (req, _), t, h in zip(last, drafts, out.unbind(0)):
            req.mtp_draft, req.mtp_hidden = t, h

    def _advance(self, req: Request, token: int, logprob: TokenLogprob | None = None) -> RequestOutput:
        """Account for one sampled token: stop token, max_tokens, context, stop strings, new text."""
        req.num_generated += 1
        new_ids = []
        new_logprobs = None if req.logprobs is None else []
        if token in req.stop_ids:
            req.finish_reason = "stop"
        else:
            req.output_ids.append(token)
            req.token_ids.append(token)
            new_ids.append(token)
            if req.logprobs is not None:
                req.logprobs.append(logprob)
                new_logprobs.append(logprob)
            self.num_generated_tokens += 1
            if req.num_generated >= req.params.max_tokens or len(req.token_ids) >= self.max_len:
                req.finish_reason = "length"  # the context is full: the last token is never fed
        new_text = self._release_text(req)
        prompt_lps = None
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent:
            prompt_lps, req.prompt_logprobs_sent = list(req.prompt_logprobs), True
        return RequestOutput(req.id, new_ids, new_text, req.finish_reason is not None, req.finish_reason,
                             len(req.prompt_ids), req.num_generated, logprobs=new_logprobs,
                             prompt_logprobs=prompt_lps)

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
        """Finish matching requests (all when request_id is None) as aborted and free their blocks.
        A choice still waiting to be forked just leaves its parent; an aborted parent whose children
        still wait hands them to the first one, which takes its place at the head of the queue (and
        recomputes the prompt, mostly from the prefix cache)."""
        def match(r: Request) -> bool:
            return (request_id is None or r.id == request_id) and r.finish_reason is None

        hits = []
        for parent in list(self.waiting) + self.running:
            hits += [c for c in parent.children if match(c)]
            parent.children = [c for c in parent.children if not match(c)]
        self._unforked_done += len(hits)
        for req in hits:
            req.finish_reason = "abort"
        for req in [r for r in list(self.waiting) + self.running if match(r)]:
            req.finish_reason = "abort"
            hits.append(req)
            self.scheduler.finish(req)
            if req.children:
                heir, heir.children, req.children = req.children[0], req.children[1:], []
                self._unforked_done += 1
                self.scheduler.waiting.appendleft(heir)
        return [(r, RequestOutput(r.id, [], "", True, "abort", len(r.prompt_ids), r.num_generated))
                for r in hits]

    def fail_all(self, message: str) -> None:
        """Finish every request with finish_reason "error" (after an exception in step)."""
        parents = list(self._incoming) + list(self.waiting) + self.running
        outputs = []
        for req in parents + [c for r in parents for c in r.children]:
            req.finish_reason, req.error = "error", message
            outputs.append((req, RequestOutput(req.id, [], "", True, "error", len(req.prompt_ids),
                                               req.num_generated, error=message)))
        for req in parents:
            self._unforked_done += len(req.children)
            req.children = []
        self._incoming.clear()
        for req in list(self.waiting) + list(self.running):
            self.scheduler.finish(req)
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
