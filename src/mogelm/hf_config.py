"""config.json <-> ModelConfig, without model code (the simulator and `mogelm info` use it too).

Our checkpoints carry the HF fields plus the full mogelm config under "mogelm"; a published
PanguProMoE config.json has HF fields only and no group count (groups = num_experts_per_tok).
MTP depth: `mtp_depth` in the mogelm section and `num_nextn_predict_layers` in the HF fields
(DeepSeek-V3's name), both written only when it is > 0, so a config without MTP is unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mogelm.config import ModelConfig
from mogelm.errors import UserError

CONFIG_NAME = "config.json"
# A published PanguProMoE config.json names no routing; it is MoGE (paper Eq. 5-6). Writing and
# reading that format use this one constant, so a config is labelled PanguProMoE only when reading
# the label back gives its routing.
PANGU_ROUTING = "moge"


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    pangu_style = (
        cfg.is_moe and cfg.routing == PANGU_ROUTING and cfg.num_groups == cfg.num_experts_per_tok
        and not cfg.renormalize
    )
    hf = {
        "architectures": ["PanguProMoEForCausalLM" if pangu_style else "MogelmForCausalLM"],
        "model_type": "PanguProMoE" if pangu_style else "mogelm",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "hidden_act": "silu",
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.is_moe:
        hf.update(
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
            router_aux_loss_coef=cfg.aux_loss_alpha,
        )
    if cfg.mtp_depth > 0:
        hf["num_nextn_predict_layers"] = cfg.mtp_depth
    hf["mogelm"] = {k: v for k, v in cfg.to_dict().items()
                    if k != "name" and not (k == "mtp_depth" and v == 0)}
    return hf


def config_from_hf(hf: dict) -> ModelConfig:
    if "mogelm" in hf:
        return ModelConfig.from_dict(hf["mogelm"])
    if hf.get("model_type") != "PanguProMoE":
        raise UserError(
            f"config.json has model_type {hf.get('model_type')!r}; mogelm reads 'PanguProMoE' checkpoints "
            "and its own (with a 'mogelm' section)"
        )
    need = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "num_experts", "num_experts_per_tok", "moe_intermediate_size"]
    missing = [k for k in need if k not in hf]
    if missing:
        raise UserError(f"config.json lacks fields {', '.join(missing)}")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        rope_theta=float(hf.get("rope_theta", 1.6e7)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        max_seq_len=hf.get("max_position_embeddings", 131072),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        num_experts=hf["num_experts"],
        # PanguProMoE carries no group count: one expert per group, groups = experts per token.
        num_groups=hf["num_experts_per_tok"],
        num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 0),
        aux_loss_alpha=hf.get("router_aux_loss_coef", 1e-3),
        mtp_depth=hf.get("num_nextn_predict_layers", 0),
        routing=PANGU_ROUTING,
        name="PanguProMoE",
    )


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint directory or of a config.json file."""
    path = Path(path)
    cfg_path = path if path.is_file() else path / CONFIG_NAME
    if not cfg_path.is_file():
        raise UserError(f"{path} is not a checkpoint directory: {CONFIG_NAME} not found")
    try:
        hf = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e}); the checkpoint is corrupt") from None
    try:
        return config_from_hf(hf)
    except ValueError as e:
        raise UserError(f"{cfg_path}: invalid model config: {e}") from None
