"""`mogelm sim`: parallel layout, batch and throughput of a MoGE model on given hardware (a thin
layer over mogelm.sim: deploy, search, validate, calibrate, which also format what it prints).

    mogelm sim --model pangu-pro-moe-72b --hardware ascend-800i-a2 --cards 4 --tpot-ms 100 \\
               --context 2048 --quant w8a8 [--json]
    mogelm sim search [--targets ascend-300i-duo:4:100,ascend-800i-a2:4:50] [--plot fig3.png] [--json]
    mogelm sim validate [--json]
    mogelm sim calibrate tests/data/sim_bench_h200.json --out h200-measured.json
    mogelm sim --hardware h200-measured.json ...           # a calibrated profile is a --hardware

The first form searches every parallel layout for the largest decode batch within the TPOT limit
and prints the best (layout, batch, TPOT, tokens/s per card, time and memory breakdown), plus the
prefill time of --prefill-batch prompts of --context tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from mogelm.config import ModelConfig, from_name, preset_names
from mogelm.errors import UserError
from mogelm.hf_config import read_config
from mogelm.sim.cost import QUANTS, Quant
from mogelm.sim.deploy import format_deployment, plan_deployment
from mogelm.sim.hardware import HardwareProfile, load_profile, profile_names
from mogelm.sim.layout import Layout, enumerate_layouts, world_size

ACTIONS = ("run", "search", "validate", "calibrate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("action", nargs="?", default="run", choices=ACTIONS,
                        help="run (default): plan one model; search: configuration search (paper Fig. 3); "
                             "validate: predictions vs the paper's Tables 5-7 and our H200 measurements; "
                             "calibrate: build a hardware profile from a benchmark JSON")
    parser.add_argument("bench_json", nargs="?", help="calibrate: the benchmark results JSON to read")
    parser.add_argument("--model", default="pangu-pro-moe-72b",
                        help=f"preset ({', '.join(preset_names())}), a checkpoint directory or its "
                             "config.json")
    parser.add_argument("--hardware", default="ascend-800i-a2",
                        help=f"built-in profile ({', '.join(profile_names())}) or a profile JSON path")
    parser.add_argument("--cards", type=int, default=4,
                        help="cards to deploy on (a 300I Duo card holds 2 chips)")
    parser.add_argument("--tpot-ms", type=float, default=100.0,
                        help="time-per-output-token limit for decode (ms)")
    parser.add_argument("--context", type=int, default=2048,
                        help="tokens per sequence (KV length; prompt length)")
    parser.add_argument("--quant", default="w8a8", choices=sorted(QUANTS),
                        help="weights/activations: bf16, w8a8 (int8 KV), w4a8 (int8 KV), fp8 (fp8 KV)")
    parser.add_argument("--kv-bytes", type=float, default=None,
                        help="override bytes per KV-cache element (e.g. 2 for a bf16 cache under w8a8)")
    parser.add_argument("--routing", choices=["moge", "topk"], default=None,
                        help="override the model's routing (top-k: busiest EP rank from the multinomial "
                             "load)")
    parser.add_argument("--topk-skew", type=float, default=1.0,
                        help="top-k only: busiest expert's load over the mean (1 = uniform router; the "
                             "paper's Fig. 10 shows about 3.2 for DeepSeek-V2-Lite's first MoE layer)")
    parser.add_argument("--batch", type=int, default=None,
                        help="evaluate this decode batch instead of searching the largest one")
    parser.add_argument("--layout", default=None,
                        help="fix the layout as ATTN_DPxATTN_TP,EPxETP,SHARED_TP (the paper's H2P: "
                             "2x4,4x2,8)")
    parser.add_argument("--prefill-batch", type=int, default=2,
                        help="also report prefill TTFT for this many prompts of --context tokens (0: skip)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    g = parser.add_argument_group("search")
    g.add_argument("--targets", default="ascend-300i-duo:4:100,ascend-800i-a2:4:50",
                   help="comma-separated HARDWARE:CARDS:TPOT_MS targets (default: the paper's objective)")
    g.add_argument("--top", type=int, default=15, help="rows of the ranked table to print")
    g.add_argument("--plot", default=None, help="write a Figure-3-style plot to this PNG path")
    g.add_argument("--no-topk", action="store_true", help="skip planning each shape with top-k routing")
    g.add_argument("--quick", action="store_true",
                   help="a small search space (a few seconds), for smoke tests")
    g = parser.add_argument_group("calibrate")
    g.add_argument("--out", default=None, help="calibrate: where to write the profile JSON")
    g.add_argument("--base", default=None,
                   help="calibrate: profile supplying what a benchmark cannot measure (peak rates, memory, "
                        "links); default: guessed from the benchmark's device name")
    g.add_argument("--backend", default=None,
                   help="calibrate: benchmark backend to take the grouped-GEMM curve from (default: the "
                        "fastest)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "validate":
            return _validate(args)
        if args.action == "calibrate":
            return _calibrate(args)
        if args.action == "search":
            return _search(args)
        return _run(args)
    except ValueError as e:  # boundary checks in the library raise ValueError; show them as user errors
        raise UserError(str(e)) from None


# Inputs ----------------------------------------------------------------------------------------


def load_model(spec: str) -> ModelConfig:
    """A preset name, a checkpoint directory, or a config.json (mogelm's or a PanguProMoE one)."""
    if spec in preset_names():
        return from_name(spec)
    if not Path(spec).exists():
        raise UserError(f"--model {spec!r} is neither a preset ({', '.join(preset_names())}) nor a "
                        "config.json")
    return read_config(spec)


def parse_layout(text: str, world: int) -> Layout:
    try:
        attn, ffn, shared = text.split(",")
        dp, tp = (int(x) for x in attn.lower().split("x"))
        ep, etp = (int(x) for x in ffn.lower().split("x"))
        lo = Layout(attn_dp=dp, attn_tp=tp, ep=ep, etp=etp, shared_tp=int(shared))
    except ValueError:
        raise UserError(f"--layout {text!r} must look like 2x4,4x2,8 (attention DPxTP, experts EPxTP, "
                        "shared TP)") from None
    if lo.world != world or ep * etp != world or world % lo.shared_tp:
        raise UserError(f"--layout {text} does not cover the {world} devices: DPxTP and EPxTP must equal "
                        f"{world} and the shared TP must divide it")
    return lo


def _quant(args, hw: HardwareProfile) -> Quant:
    q = QUANTS[args.quant]
    if not hw.supports(q.compute):
        raise UserError(f"{hw.name} has no {q.compute} compute for --quant {q.name} "
                        f"(it has {', '.join(sorted(hw.peak_tflops))})")
    if args.kv_bytes is not None:
        if args.kv_bytes <= 0:
            raise UserError("--kv-bytes must be positive")
        q = dataclasses.replace(q, kv_bytes=args.kv_bytes)
    return q


def _check_common(args) -> None:
    if args.topk_skew < 1:
        raise UserError(f"--topk-skew must be at least 1 (1 = uniform router), got {args.topk_skew}")
    if args.cards < 1:
        raise UserError(f"--cards must be at least 1, got {args.cards}")
    if args.context < 1:
        raise UserError(f"--context must be at least 1, got {args.context}")
    if not args.tpot_ms > 0:
        raise UserError(f"--tpot-ms must be positive, got {args.tpot_ms}")


# Actions ---------------------------------------------------------------------------------------


def _run(args) -> int:
    _check_common(args)
    cfg = load_model(args.model)
    hw = load_profile(args.hardware)
    q = _quant(args, hw)
    world = world_size(hw, args.cards)
    if cfg.is_moe and args.routing:
        cfg = cfg.replace(routing=args.routing)
    layouts = [parse_layout(args.layout, world)] if args.layout else enumerate_layouts(cfg, world)
    if not layouts:
        raise UserError(f"--cards {args.cards} gives {world} devices, and no parallel layout of {cfg.name} "
                        f"fits them: TP and EP degrees must be powers of two dividing the heads "
                        f"({cfg.num_heads}), KV heads ({cfg.num_kv_heads}), expert width and experts; try a "
                        "power-of-two card count")
    if args.batch is not None and args.batch < 1:
        raise UserError("--batch must be at least 1")
    out = plan_deployment(cfg, hw, q, cards=args.cards, layouts=layouts, tpot_ms=args.tpot_ms,
                          context=args.context, topk_skew=args.topk_skew, batch=args.batch,
                          prefill_batch=args.prefill_batch)
    print(json.dumps(out, indent=2) if args.json else format_deployment(out, args.prefill_batch))
    return 0


def parse_targets(text: str):
    from mogelm.sim.search import Target

    targets = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3:
            raise UserError(f"--targets item {item!r} must be HARDWARE:CARDS:TPOT_MS")
        try:
            cards, tpot = int(parts[1]), float(parts[2])
        except ValueError:
            raise UserError(f"--targets item {item!r}: CARDS must be an integer and TPOT_MS a number") \
                from None
        if cards < 1 or not tpot > 0 or math.isinf(tpot):
            raise UserError(f"--targets item {item!r}: CARDS and TPOT_MS must be positive")
        load_profile(parts[0])  # fail early on an unknown name
        targets.append(Target(hardware=parts[0], cards=cards, tpot_ms=tpot))
    return targets


def plot_path(text: str) -> Path:
    """Where `--plot TEXT` writes: TEXT, with .png added when it has no suffix (as matplotlib would,
    so the path printed is the one written); its folder must exist."""
    from mogelm.fsutil import check_output_file

    path = Path(text)
    if path.is_dir():
        raise UserError(f"--plot {text} is a folder; give a file name such as {path / 'search.png'}")
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    return check_output_file(path, "--plot")


def _search(args) -> int:
    from mogelm.sim.search import SearchSpace, format_ranking, plot_search, run_search

    plot = plot_path(args.plot) if args.plot else None  # before the search, which takes a while
    if args.top < 1:
        raise UserError(f"--top must be positive, got {args.top}")
    _check_common(args)
    targets = parse_targets(args.targets)
    space = SearchSpace()
    if args.quick:
        space = SearchSpace(hidden_sizes=(4096, 5120), kv_heads=(8,), layers=(40, 48), experts=(64,),
                            expert_widths=(1344, 2048))
    results = run_search(space, targets, quant=args.quant, context=args.context,
                         compare_topk=not args.no_topk, topk_skew=args.topk_skew)
    if plot:
        plot_search(results, targets, str(plot))
    if args.json:
        print(json.dumps({"targets": [t.label for t in targets], "quant": args.quant, "context": args.context,
                          "candidates": [c.to_dict() for c in results]}, indent=2))
        return 0
    print(f"{len(results)} candidates, {args.quant}, context {args.context}; decode tokens/s per card at the "
          f"TPOT limit, normalised to a random candidate; top-k/MoGE = same shape routed top-k "
          f"(expert skew {args.topk_skew:g})")
    print(format_ranking(results, targets, args.top))
    if plot:
        print(f"plot written to {plot}")
    return 0


def _validate(args) -> int:
    from mogelm.sim.validate import format_forecasts, format_table, h200_forecasts, run_checks

    checks = run_checks()
    forecast, forecast_eager = h200_forecasts()
    if args.json:
        print(json.dumps({"date": "2026-11-28", "checks": [c.to_dict() for c in checks],
                          "h200_forecast": forecast, "h200_forecast_eager_collectives": forecast_eager},
                         indent=2))
        return 0
    print(format_table(checks))
    print()
    print(format_forecasts(forecast, forecast_eager))
    return 0


def _calibrate(args) -> int:
    from mogelm.sim.calibrate import calibrate_file, describe_calibration

    if not args.bench_json:
        raise UserError("calibrate needs the benchmark JSON: mogelm sim calibrate BENCH_JSON --out "
                        "PROFILE_JSON")
    if not args.out:
        raise UserError("calibrate needs --out PROFILE_JSON")
    from mogelm.fsutil import check_output_file

    check_output_file(args.out, "--out")
    hw = calibrate_file(args.bench_json, base=args.base, backend=args.backend)
    hw.save(args.out)
    print(f"wrote {args.out}: {hw.description}")
    print(describe_calibration(hw))
    return 0
