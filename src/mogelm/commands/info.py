"""`mogelm info`: a preset's or checkpoint's shapes and parameter counts (a thin layer over mogelm.info).

    mogelm info pangu-pro-moe-72b        # 71.99 B total, 16.50 B active
    mogelm info runs/demo/moge/final     # a checkpoint directory
    mogelm info small --mtp-depth 1      # + one MTP module (counted separately)
"""

from __future__ import annotations

import argparse
import json

from mogelm.config import PRESETS
from mogelm.errors import UserError
from mogelm.info import describe, load_config, model_info


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=f"preset name ({', '.join(sorted(PRESETS))}) or checkpoint directory")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--mtp-depth", type=int, default=None,
                   help="count with this many MTP modules (default: the preset's or checkpoint's)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.model)
    if args.mtp_depth is not None:
        if args.mtp_depth < 0:
            raise UserError(f"--mtp-depth must be >= 0, got {args.mtp_depth}")
        cfg = cfg.replace(mtp_depth=args.mtp_depth)
    print(json.dumps(model_info(cfg), indent=2) if args.json else describe(cfg))
    return 0
