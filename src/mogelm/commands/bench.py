"""`mogelm bench`: benchmarks. `bench serve` load-tests a running `mogelm serve` on loopback.

    mogelm serve --model DIR --port 8000 &
    mogelm bench serve --url http://127.0.0.1:8000 --concurrency 8 --requests 64 --max-tokens 32
    mogelm bench serve --url http://127.0.0.1:8000 --concurrency 16 --requests 128 --max-tokens 64 --json

A thin layer over mogelm.inference.loadgen (load_test, format_summary; what is measured is
described there). Only loopback URLs unless --allow-remote. Exit status 1 when any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from urllib.parse import urlparse

from mogelm.errors import UserError
from mogelm.inference.loadgen import describe_error, format_summary, load_test

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    s = sub.add_parser("serve", help="load-test a running OpenAI-compatible server",
                       description="load-test a running OpenAI-compatible server (streamed completions)")
    s.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (with or without /v1)")
    s.add_argument("--model", default=None, help="model id (default: the first one /v1/models lists)")
    s.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    s.add_argument("--requests", type=int, default=64, help="requests in total")
    s.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    s.add_argument("--prompt-words", type=int, default=32, help="words in each synthetic prompt")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per request")
    s.add_argument("--deadline", type=float, default=600.0, help="seconds allowed for the whole run")
    s.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    s.add_argument("--allow-remote", action="store_true", help="allow a non-loopback URL")
    s.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args: argparse.Namespace) -> int:
    host = urlparse(args.url).hostname
    if urlparse(args.url).scheme not in ("http", "https") or not host:
        raise UserError(f"--url must look like http://127.0.0.1:8000, got {args.url!r}")
    if host not in LOOPBACK and not args.allow_remote:
        raise UserError(f"--url points at {host}, not loopback; pass --allow-remote to load-test another "
                        "machine")
    for name in ("concurrency", "requests", "max_tokens", "prompt_words"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("timeout", "deadline"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name} must be a positive number of seconds, got {getattr(args, name)}")
    try:
        res = asyncio.run(load_test(args.url, args.concurrency, args.requests, args.max_tokens,
                                    args.prompt_words, args.model, args.timeout, args.deadline, args.seed))
    except OSError as e:
        raise UserError(f"cannot reach {args.url}: {describe_error(e)}") from None
    except Exception as e:
        if type(e).__module__.startswith("httpx"):
            raise UserError(f"cannot reach {args.url}: {describe_error(e)}") from None
        raise
    print(json.dumps(res, indent=2) if args.json else format_summary(res))
    return 0 if res["errors"] == 0 else 1
