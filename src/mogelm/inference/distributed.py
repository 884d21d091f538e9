"""Lockstep serving across processes: every rank runs the same Engine on the same request stream.

    # on every rank of a torchrun job, with a model sharded by mogelm.parallel.tensor_parallel:
    engine = LockstepEngine(model, tokenizer, control_group, max_batch=64)
    if engine.rank == 0:
        serve(create_app(engine, "name"), sock)    # or engine.generate(prompts); as with Engine
        engine.close()                             # the other ranks' follow() returns
    else:
        engine.follow()
    # `mogelm serve --nproc 4 --ep 4 --model DIR` does this (mogelm.commands._lockstep)

Why lockstep. A tensor-parallel model needs every rank to run the same step (same tokens, same
shapes) at the same time. Rather than exchange the batch every step, every rank holds a whole
Engine (scheduler, block manager, sampler) and feeds it the same events: before each step rank 0
broadcasts what arrived since the last one (new requests with their token ids, sampling params
and generator state; aborts), every rank then calls Engine.step(). The scheduler and the block
manager are deterministic and the logits are identical on every rank (the hidden state after
each all-reduce is the same bits everywhere, the LM head is replicated), so every rank schedules
and samples identically and only rank 0 delivers outputs. Nothing else crosses the ranks, and
the decode step stays the fixed-shape computation the CUDA graphs capture.

Control plane. Messages go over their own gloo process group (CPU, so the NCCL streams of the
model never wait for the host, and gloo notices a dead peer's closed socket at once), as pickled
objects (broadcast_object_list):
  ("step", requests, aborts, digest)   before every step of rank 0 (the Engine._arrivals seam)
  ("noop", digest)                     every `heartbeat_s` while rank 0 is idle: a follower's
                                       wait is bounded, so a dead or hung rank 0 is noticed
                                       within the group's timeout
  ("stop",)                            close(): the followers' follow() returns
`digest` is a hash of the previous step's outputs (request id, tokens, finish reason) on rank 0;
each follower compares it with its own, so ranks that ever diverge stop with an error instead of
running mismatched collectives.

Failures. Any exception inside a step or a control message (a collective failing because a peer
died or timed out, ranks diverging) is fatal for the whole job: the rank prints one line,
`error: ...`, and exits with status 1 (torchrun then stops the others). The Engine's usual
"fail the batch and keep serving" cannot hold in lockstep: the other ranks would not know.
On CUDA each rank measures its free memory for the KV cache and the smallest block count wins;
ranks that disagree on the pool, the context or the CUDA graphs refuse to start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist

from mogelm.inference.engine import Engine, Request, RequestOutput

log = logging.getLogger("mogelm.inference.distributed")
HEARTBEAT_S = 2.0


class DivergedError(RuntimeError):
    """A follower's outputs differ from rank 0's: the ranks no longer agree on the batch."""


def describe_failure(e: BaseException, rank: int, world: int) -> str:
    """One line for an exception that ends a lockstep rank."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, DivergedError) or type(e).__name__ == "CollectiveError":
        return first
    if isinstance(e, (RuntimeError, dist.DistError)):
        return (f"a collective failed on rank {rank}/{world}: a peer rank probably died, timed out or ran a "
                f"different step. Backend said: {first}")
    return f"rank {rank}/{world}: {type(e).__name__}: {first}"


def exit_on_failure(e: BaseException, rank: int, world: int) -> None:
    """The default fatal handler: a traceback for what looks like a bug, then one `error:` line,
    then exit status 1 at once (threads and collectives left as they are)."""
    if not isinstance(e, (DivergedError, RuntimeError, dist.DistError)):
        traceback.print_exception(e, file=sys.stderr)
    print(f"error: {describe_failure(e, rank, world)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def outputs_digest(outputs: list[RequestOutput]) -> str:
    """What every rank must agree on after a step: which requests got which tokens, which finished."""
    text = repr([(o.request_id, o.token_ids, o.finish_reason) for o in outputs])
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class LockstepEngine(Engine):
    """An Engine whose steps run on every rank of `control_group` together (module docstring).
    Rank 0 is used like any Engine (add_request from any thread, step on one thread, a server or
    generate on top); the other ranks call follow(). `on_failure(exc, rank, world)` ends the
    process on a failed step (default: exit_on_failure)."""

    def __init__(self, model, tokenizer=None, control_group=None, heartbeat_s: float = HEARTBEAT_S,
                 on_failure: Callable[[BaseException, int, int], None] = exit_on_failure, **engine_kwargs):
        self.control = control_group if control_group is not None else dist.group.WORLD
        self.rank, self.world = dist.get_rank(self.control), dist.get_world_size(self.control)
        self._src = dist.get_global_rank(self.control, 0) if self.control is not dist.group.WORLD else 0
        self.heartbeat_s, self.on_failure = heartbeat_s, on_failure
        self._lock = threading.RLock()  # rank 0: messages and steps one at a time
        self._last_send = time.monotonic()
        self._digest = ""  # of the last step's outputs on this rank
        self._received: tuple[list[Request], list] = ([], [])  # a follower's arrivals for its next step
        self._closed = False
        super().__init__(model, tokenizer, **engine_kwargs)
        self._check_same_setup()
        self._heartbeat_thread = None
        if self.rank == 0 and self.world > 1:
            self._heartbeat_thread = threading.Thread(target=self._heartbeat, name="mogelm-heartbeat",
                                                      daemon=True)
            self._heartbeat_thread.start()

    # --- setup ------------------------------------------------------------------------------------
    def _blocks_for_memory(self, fraction: float, kv_dtype: torch.dtype, num_layers: int) -> int:
        """Each rank's measure, then the smallest: the block managers must be the same everywhere."""
        mine = super()._blocks_for_memory(fraction, kv_dtype, num_layers)
        fewest = torch.tensor([mine], dtype=torch.int64)
        dist.all_reduce(fewest, op=dist.ReduceOp.MIN, group=self.control)
        return int(fewest.item())

    def _check_same_setup(self) -> None:
        mine = [self.blocks.num_blocks, self.max_len, self.max_batch, self.chunk_size, self.block_size,
                int(self.graphs is not None), self.model.cfg.vocab_size]
        every: list = [None] * self.world
        dist.all_gather_object(every, mine, group=self.control)
        if any(e != every[0] for e in every):
            names = "KV blocks, context, max batch, chunk, block size, CUDA graphs, vocab"
            hint = (" (a rank could not capture its CUDA graphs: start with --no-cuda-graphs)"
                    if len({e[5] for e in every}) > 1 else "")
            raise RuntimeError(f"ranks disagree on the engine setup ({names}) per rank: {every}{hint}")

    # --- rank 0 -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.rank != 0 or self.world == 1:
            outputs = super().step()
        else:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the lockstep engine is closed")
                try:
                    outputs = super().step()  # its _arrivals() broadcasts this step's events
                except BaseException as e:  # noqa: BLE001 - fatal for every rank, see the docstring
                    self.on_failure(e, self.rank, self.world)
                    raise
        self._digest = outputs_digest(outputs)
        return outputs

    def _arrivals(self):
        if self.rank != 0:
            arrived, aborts = self._received
            self._received = ([], [])
            return arrived, aborts
        arrived, aborts = super()._arrivals()
        if self.world > 1:
            self._send(("step", [self._portable(r) for r in arrived], aborts, self._digest))
        return arrived, aborts

    def close(self) -> None:
        """Rank 0: tell the other ranks to return from follow() (idempotent)."""
        if self.rank != 0 or self.world == 1:
            return
        with self._lock:
            if not self._closed:
                self._closed = True
                try:
                    self._send(("stop",))
                except Exception as e:  # noqa: BLE001 - a follower already gone: nothing to stop
                    log.warning("could not tell the other ranks to stop: %s", describe_failure(
                        e, self.rank, self.world))

    def _heartbeat(self) -> None:
        while not self._closed:
            time.sleep(self.heartbeat_s / 4)
            with self._lock:
                if self._closed or time.monotonic() - self._last_send < self.heartbeat_s:
                    continue
                try:
                    self._send(("noop", self._digest))
                except BaseException as e:  # noqa: BLE001 - a follower died while idle
                    self.on_failure(e, self.rank, self.world)
                    return

    def _send(self, message: tuple) -> None:
        dist.broadcast_object_list([message], src=self._src, group=self.control)
        self._last_send = time.monotonic()

    @classmethod
    def _portable(cls, req: Request) -> dict:
        """A request as it arrived, for another rank: every field but its callback and generator
        (whose state travels instead), tensors on the CPU, the choices waiting on it (n > 1:
        `children`, when the engine has them) alike."""
        state = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(req).items()
                 if k not in ("generator", "on_output", "children")}
        state["generator_state"] = req.generator.get_state()
        state["children"] = [cls._portable(c) for c in getattr(req, "children", [])]
        return state

    def _request_from(self, state: dict) -> Request:
        state = dict(state)
        gen = torch.Generator(device=self.device)
        gen.set_state(state.pop("generator_state"))
        children = [self._request_from(c) for c in state.pop("children")]
        req = Request.__new__(Request)
        req.__dict__.update({k: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
                             for k, v in state.items()})
        req.generator, req.on_output, req.children = gen, None, children
        if children:  # n > 1: choices waiting to be forked from this one, counted as add_choices counts
            self._unforked_added += len(children)
        return req

    # --- the other ranks --------------------------------------------------------------------------
    def follow(self) -> int:
        """Run rank 0's steps until it closes; returns the number of steps. A failure (rank 0 gone,
        a collective error, diverging outputs) goes to on_failure."""
        steps = 0
        try:
            while True:
                message = [None]
                dist.broadcast_object_list(message, src=self._src, group=self.control)
                kind, *rest = message[0]
                if kind == "stop":
                    return steps
                digest = rest[-1]
                if digest != self._digest:
                    raise DivergedError(
                        f"rank {self.rank}/{self.world} diverged from rank 0 after step {self.num_steps}: "
                        f"its outputs differ (digest {self._digest!r} vs rank 0's {digest!r}); the ranks' "
                        "logits must be bit-identical (same kernels, deterministic all-reduce)")
                if kind == "noop":
                    continue
                states, aborts = rest[0], rest[1]
                self._received = ([self._request_from(s) for s in states], aborts)
                self.step()
                steps += 1
        except BaseException as e:  # noqa: BLE001 - fatal, see the module docstring
            self.on_failure(e, self.rank, self.world)
            raise
