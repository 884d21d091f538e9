"""`mogelm serve`: the OpenAI-compatible HTTP server on loopback (mogelm.inference.server).

    mogelm serve --model runs/demo/moge/final --port 8000
    mogelm serve --model DIR --host 127.0.0.1 --port 8000 --max-batch 16 --threads 1

Loads the checkpoint into an Engine, builds the app (create_app), binds the port first (a busy
port is a one-line error) and runs uvicorn until SIGINT/SIGTERM, which drain running requests.
Needs the `serve` extra (fastapi, uvicorn).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mogelm.errors import UserError
from mogelm.inference.server import create_app, listen_socket, serve


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--served-model-name", default=None,
                   help="model id in the API (default: the directory name)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max-len", type=int, default=None,
                   help="context length per sequence (default: the model's)")
    p.add_argument("--chunk-size", type=int, default=256, help="prompt tokens prefilled per engine step")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weights and cache dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often fastest on a busy "
                        "small CPU)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")
    p.add_argument("--max-waiting", type=int, default=1024, help="queued requests before answering 503")
    p.add_argument("--shutdown-timeout", type=float, default=60.0,
                   help="seconds to drain requests on shutdown")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def run(args: argparse.Namespace) -> int:
    import torch

    from mogelm.commands._checks import check_device, check_range
    from mogelm.hf_config import read_config
    from mogelm.inference.engine import Engine

    check_range(args, "max_batch", "chunk_size", "max_waiting", "max_len", "threads", low=1)
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    check_device(args.device)
    if args.max_len is not None:  # refused, not clamped: the user asked for a context the model lacks
        context = read_config(args.model).max_seq_len
        if args.max_len > context:
            raise UserError(f"--max-len {args.max_len} exceeds the model's context of {context} tokens; "
                            f"use --max-len {context} or less (or leave it out)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=dtype, max_batch=args.max_batch,
                                    max_len=args.max_len, chunk_size=args.chunk_size,
                                    cuda_graphs=False if args.no_cuda_graphs else None)
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(engine, name, args.max_waiting, args.shutdown_timeout)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        sock = listen_socket(args.host, args.port)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    print(f"serving {name} ({engine.max_len}-token context, {engine.max_batch} slots, {engine.device}) "
          f"on http://{args.host}:{sock.getsockname()[1]}/v1", flush=True)
    serve(app, sock, args.log_level, args.shutdown_timeout, host=args.host)
    return 0
