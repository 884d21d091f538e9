"""`mogelm bench`: benchmarks.

    mogelm bench decode --out DIR        # 72B layout, random weights on the GPU, fp8: batch 1..max at 2,048
    mogelm bench prefill --out DIR       # one 2,048-token prompt and 64 x 512 prompts through the engine
    mogelm bench serve --url http://127.0.0.1:8000 --concurrency 8 --requests 64 --max-tokens 32
    mogelm bench serve --requests 256 --concurrency 256 --prompt-tokens 1024 --max-tokens 256 --json

`decode` / `prefill`: a thin layer over mogelm.inference.bench_model (what is measured and how is
described there; `--quick` runs 4 layers at two batch sizes for a smoke run; on a machine without
a GPU, `--device cpu --preset debug` runs the same code at toy size). `serve` load-tests a running
`mogelm serve` on loopback through mogelm.inference.loadgen (only loopback URLs unless
--allow-remote; exit status 1 when any request failed); `--prompt-tokens N` sends prompts of N
random token ids instead of text (for `mogelm serve --random-weights`).
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
    _add_decode(sub)
    _add_prefill(sub)
    s = sub.add_parser("serve", help="load-test a running OpenAI-compatible server",
                       description="load-test a running OpenAI-compatible server (streamed completions)")
    s.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (with or without /v1)")
    s.add_argument("--model", default=None, help="model id (default: the first one /v1/models lists)")
    s.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    s.add_argument("--requests", type=int, default=64, help="requests in total")
    s.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    s.add_argument("--prompt-words", type=int, default=32, help="words in each synthetic prompt")
    s.add_argument("--prompt-tokens", type=int, default=None,
                   help="send prompts of this many random token ids instead of text (e.g. for a server "
                        "started with --random-weights)")
    s.add_argument("--prompt-vocab", type=int, default=1000,
                   help="token ids of --prompt-tokens prompts are drawn from [0, N) (default 1000)")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per request")
    s.add_argument("--deadline", type=float, default=600.0, help="seconds allowed for the whole run")
    s.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    s.add_argument("--allow-remote", action="store_true", help="allow a non-loopback URL")
    s.add_argument("--json", action="store_true", help="print the results as JSON")


def _common_model_flags(p: argparse.ArgumentParser, recipe_flag: str, recipe_help: str) -> None:
    p.add_argument("--preset", default="pangu-pro-moe-72b",
                   help="model layout (default pangu-pro-moe-72b)")
    p.add_argument("--layers", type=int, default=None, help="layers to build (default: all of the preset's)")
    p.add_argument("--device", default=None, help="cuda (default) or cpu (a smoke run at toy size)")
    p.add_argument("--tuning", default=None,
                   help="tile table from `bench decode --sections tune` to use (JSON)")
    p.add_argument("--out", default=None, help="folder for the JSON of every number")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.add_argument("--quick", action="store_true", help="4 layers, fewer sizes: a smoke run")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument(recipe_flag, default=None, help=recipe_help)


def _add_decode(sub) -> None:
    d = sub.add_parser("decode", help="decode steps of a model in the 72B layout with random weights",
                       description="decode steps of a preset's exact layout with random weights built on "
                                   "the GPU: step time, TPOT, tokens/s, breakdown, bytes floor, memory, and "
                                   "the transformers baseline (mogelm.inference.bench_model)")
    _common_model_flags(d, "--recipes", "comma-separated quantisation recipes measured in turn on one "
                        "model: bf16, fp8, fp8-experts, fp8-all, fp8-attention (default fp8-all)")
    d.add_argument("--kv-dtypes", default="fp8,bf16", help="KV pools measured in turn (default fp8,bf16)")
    d.add_argument("--batches", default="1,16,64,128,256",
                   help="decode batch sizes (default 1,16,64,128,256)")
    d.add_argument("--no-largest", action="store_true", help="skip the largest batch that fits")
    d.add_argument("--context", type=int, default=2048, help="tokens in each row's context (default 2048)")
    d.add_argument("--sections", default="hf,decode",
                   help="comma-separated: tune (tile sweeps, installed for the rest of the run), hf "
                        "(transformers baseline), decode (default hf,decode)")
    d.add_argument("--hf-batches", default="1,64", help="batches of the transformers baseline")
    d.add_argument("--no-breakdown", action="store_true", help="skip the per-part graphs")
    d.add_argument("--reserve-gib", type=float, default=6.0,
                   help="GPU memory left free beside the KV pool (default 6)")


def _add_prefill(sub) -> None:
    p = sub.add_parser("prefill", help="prefill tokens/s of a model in the 72B layout through the engine",
                       description="prefill through the engine of a preset's exact layout with random "
                                   "weights: one long prompt, then many prompts "
                                   "(mogelm.inference.bench_model)")
    _common_model_flags(p, "--recipe", "quantisation recipe: bf16, fp8, fp8-experts, fp8-all "
                        "(default fp8-all)")
    p.add_argument("--long-prompt", type=int, default=2048,
                   help="tokens of the single prompt (default 2048)")
    p.add_argument("--prompts", type=int, default=64, help="prompts of the batch case (default 64)")
    p.add_argument("--prompt-len", type=int, default=512, help="tokens per prompt of the batch case (512)")
    p.add_argument("--chunk-size", type=int, default=8192, help="prompt tokens per engine step (8192)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs, median (default 3)")


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} takes comma-separated whole numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UserError(f"{flag} takes positive numbers, got {text!r}")
    return values


def _model_checks(args: argparse.Namespace):
    """Device, preset, recipe(s), tuning file and output folder: checked before any work."""
    import torch

    from mogelm.commands._checks import check_device, check_range
    from mogelm.config import preset_names
    from mogelm.fsutil import check_output_dir
    from mogelm.quant import RECIPES

    check_device(args.device)
    device = args.device or "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"`mogelm bench {args.bench}` needs a CUDA GPU and this machine has none; for a "
                        "smoke run at toy size pass --device cpu --preset debug")
    if args.preset not in preset_names():
        raise UserError(f"--preset {args.preset!r} is not a preset; choose one of "
                        f"{', '.join(preset_names())}")
    check_range(args, "layers", low=1)
    recipes = getattr(args, "recipes", None) or getattr(args, "recipe", None) or "fp8-all"
    for r in recipes.split(","):
        if r != "bf16" and r not in RECIPES:
            raise UserError(f"unknown recipe {r!r}; choose bf16 or one of {', '.join(RECIPES)}")
    tuning = None
    if args.tuning:
        try:
            tuning = json.loads(open(args.tuning).read())
        except OSError as e:
            raise UserError(f"--tuning {args.tuning}: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise UserError(f"--tuning {args.tuning} is not valid JSON ({e})") from None
        tuning = tuning.get("tuning", tuning)  # a whole decode JSON or just its tuning section
        if not isinstance(tuning, dict) or not ({"moe", "linear"} & set(tuning)):
            raise UserError(f"--tuning {args.tuning} holds no tile table (expected the `tuning` section of "
                            "`mogelm bench decode --sections tune`)")
    out = check_output_dir(args.out, "--out") if args.out else None
    from mogelm.inference.bench_model import device_bytes, random_weight_bytes

    first = recipes.split(",")[0]  # the model is built in the first recipe (later ones only shrink it)
    need, have = random_weight_bytes(args.preset, first, torch.bfloat16, args.layers), device_bytes(device)
    if need > 0.85 * have:
        raise UserError(f"{args.preset} with {first} weights needs about {need / 1e9:.0f} GB and {device} "
                        f"has {have / 1e9:.0f} GB; choose an fp8 recipe, fewer --layers or a smaller "
                        "--preset")
    return device, recipes, tuning, out


def _finish(args: argparse.Namespace, res: dict, out, name: str) -> int:
    from mogelm.inference.bench_model import summary_table, write_json

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / name, res)
    print(json.dumps(res, indent=1, default=str) if args.json else summary_table(res))
    return 0


def run_decode_command(args: argparse.Namespace) -> int:
    from mogelm.inference.bench_model import DecodeSettings, run_decode

    device, recipes, tuning, out = _model_checks(args)
    sections = tuple(x.strip() for x in args.sections.split(",") if x.strip())
    bad = sorted(set(sections) - {"tune", "hf", "decode"})
    if bad or not sections:
        raise UserError(f"--sections takes tune, hf, decode (comma-separated), got {args.sections!r}")
    kv = tuple(x.strip() for x in args.kv_dtypes.split(",") if x.strip())
    if not kv or any(x not in ("fp8", "bf16", "auto") for x in kv):
        raise UserError(f"--kv-dtypes takes fp8, bf16 (comma-separated), got {args.kv_dtypes!r}")
    if args.context < 2:
        raise UserError(f"--context must be at least 2, got {args.context}")
    s = DecodeSettings(preset=args.preset, layers=args.layers, recipes=tuple(recipes.split(",")),
                       kv_dtypes=kv,
                       batches=_int_list(args.batches, "--batches"), largest=not args.no_largest,
                       context=args.context, hf_batches=_int_list(args.hf_batches, "--hf-batches"),
                       breakdown=not args.no_breakdown, reserve_gib=args.reserve_gib, seed=args.seed,
                       device=device)
    if args.quick:
        s.layers = s.layers or 4
        s.batches, s.kv_dtypes, s.hf_batches, s.hf_layers = (1, 64), kv[:1], s.hf_batches[:1], (1, 2)
    from mogelm.inference.bench_model import write_json

    def progress(res: dict) -> None:  # the numbers so far, so that a run cut short keeps them
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            if set(sections) != {"tune"}:  # a sweep alone writes only its table
                write_json(out / "bench_decode.json", res)
            if "tuning" in res:
                write_json(out / "tuning.json", dict(device=res["device"], date=res["date"],
                                                     tuning=res["tuning"]))

    res = run_decode(s, tuning, sections, progress)
    return _finish(args, res, None if set(sections) == {"tune"} else out, "bench_decode.json")


def run_prefill_command(args: argparse.Namespace) -> int:
    from mogelm.commands._checks import check_range
    from mogelm.inference.bench_model import PrefillSettings, run_prefill

    device, recipe, tuning, out = _model_checks(args)
    check_range(args, "long_prompt", "prompts", "prompt_len", "chunk_size", "repeats", low=1)
    s = PrefillSettings(preset=args.preset, layers=args.layers, recipe=recipe, long_prompt=args.long_prompt,
                        num_prompts=args.prompts, prompt_len=args.prompt_len, chunk_size=args.chunk_size,
                        repeats=args.repeats, seed=args.seed, device=device)
    if args.quick:
        s.layers, s.num_prompts, s.repeats = s.layers or 4, min(s.num_prompts, 16), 1
    return _finish(args, run_prefill(s, tuning=tuning), out, "bench_prefill.json")


def run(args: argparse.Namespace) -> int:
    if args.bench == "decode":
        return run_decode_command(args)
    if args.bench == "prefill":
        return run_prefill_command(args)
    host = urlparse(args.url).hostname
    if urlparse(args.url).scheme not in ("http", "https") or not host:
        raise UserError(f"--url must look like http://127.0.0.1:8000, got {args.url!r}")
    if host not in LOOPBACK and not args.allow_remote:
        raise UserError(f"--url points at {host}, not loopback; pass --allow-remote to load-test another "
                        "machine")
    for name in ("concurrency", "requests", "max_tokens", "prompt_words", "prompt_tokens", "prompt_vocab"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("timeout", "deadline"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name} must be a positive number of seconds, got {getattr(args, name)}")
    try:
        res = asyncio.run(load_test(args.url, args.concurrency, args.requests, args.max_tokens,
                                    args.prompt_words, args.model, args.timeout, args.deadline, args.seed,
                                    prompt_tokens=args.prompt_tokens, prompt_vocab=args.prompt_vocab))
    except OSError as e:
        raise UserError(f"cannot reach {args.url}: {describe_error(e)}") from None
    except Exception as e:
        if type(e).__module__.startswith("httpx"):
            raise UserError(f"cannot reach {args.url}: {describe_error(e)}") from None
        raise
    print(json.dumps(res, indent=2) if args.json else format_summary(res))
    return 0 if res["errors"] == 0 else 1
