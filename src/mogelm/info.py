"""`mogelm info`: a preset's or checkpoint's shapes and parameter counts.

    mogelm info pangu-pro-moe-72b        # 71.99 B total, 16.50 B active
    mogelm info runs/demo/moge/final     # a checkpoint directory
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mogelm.config import PRESETS, count_parameters, from_name
from mogelm.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=f"preset name ({', '.join(sorted(PRESETS))}) or checkpoint directory")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    if args.model in PRESETS:
        cfg = from_name(args.model)
    elif Path(args.model).is_dir():
        from mogelm.hf_config import read_config

        cfg = read_config(args.model)
    else:
        raise UserError(f"{args.model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory")
    total, active = count_parameters(cfg)
    d = {"config": cfg.to_dict(), "parameters_total": total, "parameters_active": active}
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{cfg.name}: {total / 1e9:.3f} B parameters, {active / 1e9:.3f} B active per token")
    if cfg.is_moe:
        print(f"  {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads}/{cfg.num_kv_heads} heads of {cfg.head_dim}")
        print(f"  {cfg.num_experts} experts of width {cfg.moe_intermediate_size} in {cfg.num_groups} groups, "
              f"{cfg.num_experts_per_tok} per token ({cfg.routing}), shared expert {cfg.shared_expert_intermediate_size}")
    return 0
