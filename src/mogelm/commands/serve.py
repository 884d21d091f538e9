"""`mogelm serve`: the OpenAI-compatible HTTP server on loopback (mogelm.inference.server).

    mogelm serve --model runs/demo/moge/final --port 8000
    mogelm serve --model DIR --host 127.0.0.1 --port 8000 --max-batch 16 --threads 1
    MOGELM_API_KEY=... mogelm serve --model DIR --host 0.0.0.0      # /v1/* then needs the key
    mogelm serve --model DIR --nproc 4 --ep 4                        # 4 GPUs, one front end
    mogelm serve --random-weights pangu-pro-moe-72b --quantize fp8-all --kv-cache-dtype fp8 \
        --max-batch 256                          # BENCHMARK MODE: random weights, meaningless text

--random-weights PRESET serves the preset's exact layout with random weights drawn on the GPU
(mogelm.inference.bench_model.build_random_model; no checkpoint is written or read) and a synthetic
tokenizer (token id i <-> the word `t<i>`): for load tests with token-id prompts
(`mogelm bench serve --prompt-tokens N`). Its outputs mean nothing; the banner and the model id
(`random-<preset>`) say so.

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
from mogelm.quant import RECIPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--random-weights", default=None, metavar="PRESET",
                   help="BENCHMARK MODE instead of --model: a preset's exact layout (e.g. pangu-pro-moe-72b) "
                        "with random weights built on the GPU and a synthetic tokenizer; outputs are "
                        "meaningless")
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
    p.add_argument("--quantize", choices=tuple(RECIPES), default=None,
                   help="quantise a bf16 checkpoint to fp8 while loading: fp8 (routed + shared experts), "
                        "fp8-attention (+ attention), fp8-experts (routed only), fp8-all (routed, shared "
                        "and attention, weight-only for decode); --random-weights defaults to fp8-all")
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
    if (args.model is None) == (args.random_weights is None):
        raise UserError("give --model DIR (a checkpoint) or --random-weights PRESET (benchmark mode), not "
                        "both" if args.model else "--model DIR is required (or --random-weights PRESET for "
                        "a benchmark with random weights)")
    if args.shutdown_timeout < 0:
        raise UserError("--shutdown-timeout must be >= 0")
    if args.random_weights is not None:
        if (args.nproc or 1) > 1 or (args.ep or 1) > 1 or _lockstep.under_torchrun():
            raise UserError("--random-weights serves one GPU; across GPUs the 72B with random weights is "
                            "benchmarks/bench_serve_multi_gpu.py (or serve a checkpoint with --model DIR "
                            "--nproc N)")
        return _serve_random(args)
    if args.max_len is not None:  # refused, not clamped: the user asked for a context the model lacks
        context = read_config(args.model).max_seq_len
        if args.max_len > context:
            raise UserError(f"--max-len {args.max_len} exceeds the model's context of {context} tokens; "
                            f"use --max-len {context} or less (or leave it out)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    engine_flags.check_speculative(args, args.model)
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
    name = args.served_model_name or Path(args.model).resolve().name
    return _serve_engine(args, engine, name)


def _serve_random(args: argparse.Namespace) -> int:
    """--random-weights: the preset's layout, random weights on the device, a synthetic tokenizer."""
    import torch

    from mogelm.config import from_name, preset_names
    from mogelm.inference.bench_model import build_random_model, random_tokenizer
    from mogelm.inference.engine import Engine

    preset = args.random_weights
    if preset not in preset_names():
        raise UserError(f"--random-weights {preset!r} is not a preset; choose one of "
                        f"{', '.join(preset_names())}")
    context = from_name(preset).max_seq_len
    if args.max_len is not None and args.max_len > context:
        raise UserError(f"--max-len {args.max_len} exceeds {preset}'s context of {context} tokens")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda")
                                                           else torch.float32)
    recipe = args.quantize or ("fp8-all" if device.startswith("cuda") else "bf16")
    _check_room(preset, recipe, dtype, device)
    print(f"BENCHMARK MODE: {preset} with random weights ({recipe}) built on {device}; outputs are "
          "meaningless", file=sys.stderr, flush=True)
    model = build_random_model(preset, recipe=recipe, device=device, dtype=dtype,
                               max_seq_len=args.max_len, fuse=device.startswith("cuda"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    engine = Engine(model, random_tokenizer(model.cfg.vocab_size), max_batch=args.max_batch,
                    max_len=args.max_len, chunk_size=args.chunk_size,
                    cuda_graphs=False if args.no_cuda_graphs else None, **engine_flags.engine_kwargs(args))
    return _serve_engine(args, engine, args.served_model_name or f"random-{preset}")


def _check_room(preset: str, recipe: str, dtype, device: str) -> None:
    """UserError when the random weights would not fit the device (before a single byte is drawn)."""
    from mogelm.inference.bench_model import device_bytes, random_weight_bytes

    need, have = random_weight_bytes(preset, recipe, dtype), device_bytes(device)
    if need > 0.9 * have:
        raise UserError(f"--random-weights {preset} ({recipe}) needs about {need / 1e9:.0f} GB of "
                        f"weights and {device} has {have / 1e9:.0f} GB; use a smaller preset (e.g. debug) or "
                        "a larger device")


def _serve_engine(args: argparse.Namespace, engine, name: str) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
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
