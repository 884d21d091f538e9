"""`mogelm info`: a preset's or checkpoint's shapes and parameter counts (a thin layer over mogelm.info).

    mogelm info pangu-pro-moe-72b        # 71.99 B total, 16.50 B active
    mogelm info runs/demo/moge/final     # a checkpoint directory
"""

from __future__ import annotations

import argparse
import json

from mogelm.config import PRESETS
from mogelm.info import describe, load_config, model_info


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=f"preset name ({', '.join(sorted(PRESETS))}) or checkpoint directory")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.model)
    print(json.dumps(model_info(cfg), indent=2) if args.json else describe(cfg))
    return 0
