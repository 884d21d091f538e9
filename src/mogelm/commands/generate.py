"""`mogelm generate`: sample text from a checkpoint through the KV cache (a thin layer over
mogelm.inference.Engine: from_pretrained, sampling_params, generate).

    mogelm generate --model runs/demo/moge/final --prompt "def main(" --max-tokens 64
    mogelm generate --model DIR --prompt "import os" --prompt "class A" --temperature 0 --json
    mogelm generate --model DIR --chat --prompt "Write a haiku about experts"
    mogelm generate --model DIR --nproc 2 --ep 2 --prompt "def main("     # the model over 2 processes

--temperature 0 is greedy: deterministic, and equal to taking the argmax of the full (uncached)
forward at every step. Omitted temperature / top-p / top-k come from the checkpoint's
generation_config.json, else the Pangu docs' 0.6 / 0.95 / 50. Several --prompt flags are
generated together in one batch (Engine.generate). --nproc N shards the model over N processes
(torchrun; commands/_lockstep.py): rank 0 generates and prints, the others follow its steps.
"""

from __future__ import annotations

import argparse
import json

from mogelm.commands import _lockstep, engine_flags
from mogelm.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user message in the chat template")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: checkpoint / 0.6)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling mass (default: checkpoint / 0.95)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens; 0 = off (default 50)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed of the sampler (per prompt: seed + index)")
    p.add_argument("--stop", action="append", default=[],
                   help="stop string (repeatable); not included in the output")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's EOS token")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--quantize", choices=("fp8", "fp8-attention"), default=None,
                   help="quantise a bf16 checkpoint's experts (and attention) to fp8 while loading")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often fastest on a busy "
                        "small CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON list with text, token ids and counts")
    engine_flags.add_arguments(p)
    _lockstep.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from mogelm.commands._checks import check_device, check_range
    from mogelm.inference.engine import Engine

    check_range(args, "max_batch", "threads", low=1)
    check_range(args, "top_k", low=0, note=" (0: off)")
    check_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    engine_flags.check_speculative(args, args.model)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    engine_kwargs = dict(max_batch=args.max_batch, **engine_flags.engine_kwargs(args))
    nproc = _lockstep.check(args, args.model, args.device)
    if nproc == 1:
        engine = Engine.from_pretrained(args.model, device=args.device, dtype=dtype, quantize=args.quantize,
                                        **engine_kwargs)
        return _generate(args, engine)
    if not _lockstep.under_torchrun():
        return _lockstep.relaunch(nproc)
    engine = _lockstep.build_engine(args, args.model, args.device, dtype, engine_kwargs)
    try:
        if engine.rank != 0:
            engine.follow()
            return 0
        return _generate(args, engine)
    finally:
        _lockstep.finish(engine)


def _generate(args: argparse.Namespace, engine) -> int:
    prompts = args.prompt
    if args.chat:
        chat_stop = engine.tokenizer.chat_stop_token_ids()
        try:
            prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}])
                       for p in prompts]
        except ValueError as e:
            raise UserError(str(e)) from None
    try:
        params = [
            engine.sampling_params(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                   top_k=args.top_k, seed=None if args.seed is None else args.seed + i,
                                   stop=list(args.stop), ignore_eos=args.ignore_eos,
                                   stop_token_ids=chat_stop if args.chat else [])
            for i in range(len(prompts))
        ]
        outs = engine.generate(prompts, params)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps([{"prompt": p, "text": o.text, "token_ids": o.token_ids,
                           "finish_reason": o.finish_reason, "prompt_tokens": o.prompt_tokens,
                           "completion_tokens": o.completion_tokens}
                          for p, o in zip(args.prompt, outs)], ensure_ascii=False, indent=2))
        return 0
    for i, (p, o) in enumerate(zip(args.prompt, outs)):
        if len(outs) > 1:
            print(f"--- [{i}] {p!r} ({o.completion_tokens} tokens, {o.finish_reason})")
        print(o.text if args.chat else p + o.text)
    return 0
