"""`mogelm quantize`: write an fp8 (e4m3, per-output-channel scales) copy of a checkpoint.

    mogelm quantize runs/demo/moge/final runs/demo/moge/final-fp8 --weights fp8
    mogelm quantize IN OUT --weights fp8 --attention            # also q/k/v/o projections
    mogelm quantize IN OUT --weights fp8 --device cuda          # quantise on the GPU (faster)

A thin layer over mogelm.checkpoint.quantize_checkpoint: routed and shared experts (and, with
--attention, the attention projections) become e4m3 with fp32 per-channel scales in the
compressed-tensors layout (docs/quantization.md); everything else is copied. OUT must not exist;
it appears only when complete. Load the result like any checkpoint (from_pretrained, `mogelm
generate`, `mogelm serve`, `mogelm eval`).
"""

from __future__ import annotations

import argparse
import time

from mogelm.errors import UserError

WEIGHTS = ("fp8",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN", help="checkpoint directory to quantise (bf16/fp32)")
    p.add_argument("output", metavar="OUT",
                   help="new directory for the quantised checkpoint (must not exist)")
    p.add_argument("--weights", required=True,
                   help="weight format: fp8 (e4m3, one fp32 scale per output channel)")
    p.add_argument("--attention", action="store_true",
                   help="also quantise the attention q/k/v/o projections (default: experts only)")
    p.add_argument("--device", default="cpu", help="where to quantise: cpu (default) or cuda")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mogelm.checkpoint import quantize_checkpoint

    if args.weights not in WEIGHTS:
        raise UserError(f"--weights {args.weights!r} is not supported; choose one of: {', '.join(WEIGHTS)}")
    src = Path(args.input)
    if not src.is_dir():
        raise UserError(f"{src} is not a checkpoint directory")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    start = time.perf_counter()
    stats = quantize_checkpoint(src, args.output, attention=args.attention, device=args.device,
                                max_shard_size=args.max_shard_size)
    print(f"wrote {args.output}: {stats['quantized']} of {stats['tensors']} tensors in fp8, "
          f"{stats['bytes_in'] / 1e6:,.1f} MB -> {stats['bytes_out'] / 1e6:,.1f} MB "
          f"in {stats['files']} file(s), {time.perf_counter() - start:.1f} s")
    return 0
