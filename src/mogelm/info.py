"""A model's shapes and parameter counts, from a preset name or a checkpoint directory, as a dict
and as text (what `mogelm info` prints; no weights are loaded, but a checkpoint's weight files
are checked against their safetensors headers, so a truncated copy is reported).

    from mogelm.info import describe, load_config
    cfg = load_config("pangu-pro-moe-72b")      # or a checkpoint directory
    print(describe(cfg))                         # pangu-pro-moe-72b: 71.989 B parameters, 16.498 B active ...
"""

from __future__ import annotations

from pathlib import Path

from mogelm.config import PRESETS, ModelConfig, count_parameters, from_name
from mogelm.errors import UserError


def load_config(model: str) -> ModelConfig:
    """The config of a preset name or of a checkpoint directory (its config.json; weight files,
    where there are any, must be complete). A checkpoint's model is named after its directory."""
    if model in PRESETS:
        return from_name(model)
    if Path(model).is_dir():
        from mogelm.checkpoint import check_weight_files
        from mogelm.hf_config import read_config

        cfg = read_config(model)
        check_weight_files(model, missing_ok=True)  # a config.json alone still describes a model
        if cfg.name == "custom":
            cfg.name = Path(model).resolve().name
        return cfg
    raise UserError(f"{model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory")


def format_count(n: int) -> str:
    """A parameter count with a unit that shows its digits: 71.989 B, 18.4 M, 226.5 K."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f} B" if unit == "B" else f"{n / scale:.1f} {unit}"
    return str(n)


def model_info(cfg: ModelConfig) -> dict:
    """The config and its total and per-token active parameter counts (JSON-ready)."""
    total, active = count_parameters(cfg)
    return {"config": cfg.to_dict(), "parameters_total": total, "parameters_active": active}


def describe(cfg: ModelConfig) -> str:
    """Parameter counts, then (for MoE models) the shapes: layers, heads, experts and groups."""
    total, active = count_parameters(cfg)
    lines = [f"{cfg.name}: {format_count(total)} parameters, {format_count(active)} active per token"]
    if cfg.is_moe:
        lines.append(f"  {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
                     f"{cfg.num_heads}/{cfg.num_kv_heads} heads of {cfg.head_dim}")
        lines.append(f"  {cfg.num_experts} experts of width {cfg.moe_intermediate_size} in {cfg.num_groups} "
                     f"groups, {cfg.num_experts_per_tok} per token ({cfg.routing}), shared expert "
                     f"{cfg.shared_expert_intermediate_size}")
    return "\n".join(lines)
