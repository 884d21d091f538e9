"""A model's shapes and parameter counts, from a preset name or a checkpoint directory, as a dict
and as text (what `mogelm info` prints; no weights are loaded).

    from mogelm.info import describe, load_config
    cfg = load_config("pangu-pro-moe-72b")      # or a checkpoint directory
    print(describe(cfg))                         # pangu-pro-moe-72b: 71.989 B parameters, 16.498 B active ...

Counts are of the main model; a model with MTP modules (cfg.mtp_depth > 0, mogelm.mtp) also
gets their own parameters (the embedding and LM head they share are counted once, in the main
model) and the totals with them.
"""

from __future__ import annotations

from pathlib import Path

from mogelm.config import PRESETS, ModelConfig, count_mtp_parameters, count_parameters, from_name
from mogelm.errors import UserError


def load_config(model: str) -> ModelConfig:
    """The config of a preset name or of a checkpoint directory (its config.json)."""
    if model in PRESETS:
        return from_name(model)
    if Path(model).is_dir():
        from mogelm.hf_config import read_config

        return read_config(model)
    raise UserError(f"{model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory")


def model_info(cfg: ModelConfig) -> dict:
    """The config and its total and per-token active parameter counts (JSON-ready)."""
    total, active = count_parameters(cfg)
    out = {"config": cfg.to_dict(), "parameters_total": total, "parameters_active": active}
    if cfg.mtp_depth > 0:
        mtp_total, mtp_active = count_mtp_parameters(cfg)
        out.update(parameters_mtp_total=mtp_total, parameters_mtp_active=mtp_active,
                   parameters_total_with_mtp=total + mtp_total,
                   parameters_active_with_mtp=active + mtp_active)
    return out


def describe(cfg: ModelConfig) -> str:
    """Parameter counts, then (for MoE models) the shapes: layers, heads, experts and groups."""
    total, active = count_parameters(cfg)
    lines = [f"{cfg.name}: {total / 1e9:.3f} B parameters, {active / 1e9:.3f} B active per token"]
    if cfg.is_moe:
        lines.append(f"  {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
                     f"{cfg.num_heads}/{cfg.num_kv_heads} heads of {cfg.head_dim}")
        lines.append(f"  {cfg.num_experts} experts of width {cfg.moe_intermediate_size} in {cfg.num_groups} "
                     f"groups, {cfg.num_experts_per_tok} per token ({cfg.routing}), shared expert "
                     f"{cfg.shared_expert_intermediate_size}")
    if cfg.mtp_depth > 0:
        mtp_total, mtp_active = count_mtp_parameters(cfg)
        lines.append(f"  + {cfg.mtp_depth} MTP module(s): {mtp_total / 1e9:.3f} B parameters, "
                     f"{mtp_active / 1e9:.3f} B active (embedding and LM head shared with the main model)")
        lines.append(f"  with MTP: {(total + mtp_total) / 1e9:.3f} B parameters, "
                     f"{(active + mtp_active) / 1e9:.3f} B active per token")
    return "\n".join(lines)
