"""`mogelm serve`: the OpenAI-compatible HTTP server on loopback (mogelm.inference.server).

    mogelm serve --model runs/demo/moge/final --port 8000
    mogelm serve --model DIR --host 127.0.0.1 --port 8000 --max-batch 16 --threads 1
    MOGELM_API_KEY=... mogelm serve --model DIR --host 0.0.0.0      # /v1/* then needs the key
    mogelm serve --model DIR --nproc 4 --ep 4                        # 4 GPUs, one front end

Loads the checkpoint into an Engine, builds the app (create_app), binds the port first (a busy
port is a one-line error) and runs uvicorn until SIGINT/SIGTERM, which drain running requests
(then the process exits with status 0). Binding a non-loopback address without an API key prints
a warning. Needs the `serve` extra (fastapi, uvicorn, prometheus-client).

--nproc N (commands/_lockstep.py): the command re-runs itself under torchrun; every process loads
its 1/N of the model and runs a LockstepEngine; rank 0 binds the port and serves, the others follow
its steps. SIGTERM/SIGINT then drain for at most the launcher's grace (20 s) before every process
is stopped; a process that dies ends the server with an `error:` line (docs/serving.md).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from mogelm.commands import _lockstep, engine_flags
from mogelm.errors import UserError
from mogelm.inference.server import DEFAULT_MAX_REQUEST_BYTES, create_app, listen_socket, serve


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--served-model-name", default=None,
                   help="model id in the API (default: the directory name)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-len", type=int, default=None,
                   help="context length per sequence (default: the model's)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="prompt tokens per engine step, beside the decodes (default: 256 on CPU, 2048 "
                        "on CUDA)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weights and cache dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--quantize", choices=("fp8", "fp8-attention"), default=None,
                   help="quantise a bf16 checkpoint's experts (and attention) to fp8 while loading")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often fastest on a busy "
                        "small CPU)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")
    p.add_argument("--max-waiting", type=int, default=1024, help="queued requests before answering 503")
    p.add_argument("--shutdown-timeout", type=float, default=60.0,
                   help="seconds running requests may take to finish after SIGTERM/SIGINT; the rest are cut "
                        "(their streams end with an error event)")
    p.add_argument("--api-key", default=os.environ.get("MOGELM_API_KEY") or None,
                   help="require `Authorization: Bearer KEY` on /v1/*, /tokenize, /detokenize (/health and "
                        "/metrics stay open); default: $MOGELM_API_KEY, which keeps the key out of `ps`")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="larger request bodies get 413 before they are parsed (default 2 MiB)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted, in tokens (default: the context length)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    engine_flags.add_arguments(p)
    _lockstep.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from mogelm.commands._checks import check_device, check_range
    from mogelm.hf_config import read_config
    from mogelm.inference.engine import Engine

    check_range(args, "max_batch", "chunk_size", "max_waiting", "max_len", "threads", "max_request_bytes",
                "max_prompt_tokens", low=1)
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    check_device(args.device)
    if args.max_len is not None:  # refused, not clamped: the user asked for a context the model lacks
        context = read_config(args.model).max_seq_len
        if args.max_len > context:
            raise UserError(f"--max-len {args.max_len} exceeds the model's context of {context} tokens; "
                            f"use --max-len {context} or less (or leave it out)")
    if args.shutdown_timeout < 0:
        raise UserError("--shutdown-timeout must be >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    engine_kwargs = dict(max_batch=args.max_batch, max_len=args.max_len, chunk_size=args.chunk_size,
                         cuda_graphs=False if args.no_cuda_graphs else None,
                         **engine_flags.engine_kwargs(args))
    nproc = _lockstep.check(args, args.model, args.device)
    if nproc > 1 and not _lockstep.under_torchrun():
        _check_port(args.host, args.port)
        return _lockstep.relaunch(nproc)
    if nproc > 1:
        engine = _lockstep.build_engine(args, args.model, args.device, dtype, engine_kwargs)
        if engine.rank != 0:
            engine.follow()
            _lockstep.finish(engine)
            return 0
    else:
        engine = Engine.from_pretrained(args.model, device=args.device, dtype=dtype, quantize=args.quantize,
                                        **engine_kwargs)
    try:
        return _serve(args, engine)
    finally:
        if nproc > 1:
            _lockstep.finish(engine)


def _check_port(host: str, port: int) -> None:
    """Before torchrun starts: the port can be bound (else the one-line error, before any model loads)."""
    try:
        listen_socket(host, port).close()
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _serve(args: argparse.Namespace, engine) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(engine, name, args.max_waiting, args.shutdown_timeout, api_key=args.api_key,
                     max_request_bytes=args.max_request_bytes, max_prompt_tokens=args.max_prompt_tokens)
    try:
        sock = listen_socket(args.host, args.port)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    warning = exposure_warning(args.host, args.api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    nproc = getattr(engine, "world", 1)
    where = f"{nproc} processes, {engine.device.type}" if nproc > 1 else f"{engine.device}"
    print(f"serving {name} ({engine.max_len}-token context, {engine.max_batch} sequences, "
          f"{engine.stats()['kv_cache_tokens']}-token KV cache, {where}) "
          f"on http://{args.host}:{sock.getsockname()[1]}/v1", flush=True)
    serve(app, sock, args.log_level, args.shutdown_timeout, host=args.host)
    return 0


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server would answer anyone on the network: a non-loopback address, no key."""
    if api_key:
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if loopback:
        return None
    return (f"warning: serving on {host} without an API key: anyone who can reach this port can use the "
            "model; set MOGELM_API_KEY (or --api-key) to require `Authorization: Bearer <key>`")
