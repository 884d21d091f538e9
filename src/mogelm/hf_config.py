"""config.json <-> ModelConfig, without model code (the simulator and `mogelm info` use it too).

Our checkpoints carry the HF fields plus the full mogelm config under "mogelm"; a published
PanguProMoE config.json has HF fields only and no group count (groups = num_experts_per_tok).
openPangu-R (`PanguProMoEV2ForCausalLM`, same model_type) is refused by name. An fp8 checkpoint
adds a compressed-tensors `quantization_config` block (fp8_quantization_config, read back and
checked by read_quantization_config; docs/quantization.md).
Reading checks what a hand-edited file can get wrong, each as a one-line UserError: not a JSON
object, a field of the wrong type ("64" where a number belongs), and HF fields that contradict
the "mogelm" section (which would otherwise win silently).
MTP depth: `mtp_depth` in the mogelm section and `num_nextn_predict_layers` in the HF fields
(DeepSeek-V3's name), both written only when it is > 0, so a config without MTP is unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
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


# HF field -> ModelConfig field, for the fields both a checkpoint's HF part and its "mogelm"
# section state (a conflict between them is refused).
HF_TO_MOGELM = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim",
    "num_experts": "num_experts", "num_experts_per_tok": "num_experts_per_tok",
    "moe_intermediate_size": "moe_intermediate_size",
    "shared_expert_intermediate_size": "shared_expert_intermediate_size",
    "max_position_embeddings": "max_seq_len", "tie_word_embeddings": "tie_embeddings",
}
_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def check_field_types(d: dict, where: str) -> None:
    """UserError for a ModelConfig field of the wrong JSON type (e.g. "64" for an int)."""
    for f in dataclasses.fields(ModelConfig):
        if f.name not in d or f.type not in _TYPES:
            continue
        v = d[f.name]
        ok = isinstance(v, _TYPES[f.type]) and (f.type == "bool" or not isinstance(v, bool))
        if ok and f.type == "float" and not math.isfinite(v):
            ok = False
        if not ok:
            want = {"int": "an integer", "float": "a number", "bool": "true or false",
                    "str": "a string"}[f.type]
            raise UserError(f"{where}: {f.name} must be {want}, got {json.dumps(v)}; fix the file")


def config_from_hf(hf: dict, where: str = CONFIG_NAME) -> ModelConfig:
    if not isinstance(hf, dict):
        raise UserError(f"{where} holds a JSON {type(hf).__name__}, not an object; the checkpoint is corrupt")
    refuse_other_architectures(hf)
    if "mogelm" in hf:
        section = hf["mogelm"]
        if not isinstance(section, dict):
            raise UserError(f"{where}: its \"mogelm\" section is not a JSON object; fix the file")
        check_field_types(section, f"{where} (\"mogelm\" section)")
        for hf_key, key in HF_TO_MOGELM.items():
            if hf_key in hf and key in section and hf[hf_key] != section[key]:
                raise UserError(
                    f"{where}: {hf_key} is {json.dumps(hf[hf_key])} but the \"mogelm\" section says {key} "
                    f"{json.dumps(section[key])}; mogelm reads the section, so make the two agree")
        return ModelConfig.from_dict(section)
    if hf.get("model_type") != "PanguProMoE":
        raise UserError(
            f"config.json has model_type {hf.get('model_type')!r}; mogelm reads 'PanguProMoE' checkpoints "
            "and its own (with a 'mogelm' section)"
        )
    need = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "num_experts", "num_experts_per_tok", "moe_intermediate_size"]
    missing = [k for k in need if k not in hf]
    if missing:
        raise UserError(f"{where} lacks fields {', '.join(missing)}")
    for k in ("rope_theta", "rms_norm_eps"):
        if k in hf and (isinstance(hf[k], bool) or not isinstance(hf[k], (int, float))):
            raise UserError(f"{where}: {k} must be a number, got {json.dumps(hf[k])}; fix the file")
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim") or 0,  # 0: hidden_size // num_heads
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
    )
    check_field_types(fields, where)
    return ModelConfig(**fields, name="PanguProMoE")


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
        return config_from_hf(hf, str(cfg_path))
    except (ValueError, TypeError) as e:
        raise UserError(f"{cfg_path}: invalid model config: {e}") from None


# Architectures that share model_type "PanguProMoE" but not its layout: refused by name, before
# a tensor-by-tensor mismatch list could hide the reason.
OTHER_ARCHITECTURES = {
    "PanguProMoEV2ForCausalLM": "openPangu-R (sigmoid router with expert bias, k-layernorm, partial RoPE, "
                                "'param sink' attention) is a different architecture from Pangu Pro MoE",
}


def refuse_other_architectures(hf: dict) -> None:
    archs = hf.get("architectures")
    for arch in archs if isinstance(archs, list) else [archs]:
        if isinstance(arch, str) and arch in OTHER_ARCHITECTURES:
            raise UserError(f"config.json declares {arch}: {OTHER_ARCHITECTURES[arch]}; mogelm reads "
                            "PanguProMoEForCausalLM (Pangu Pro MoE) checkpoints only")


# FP8 checkpoints: the compressed-tensors "float-quantized" convention (what vLLM and HF read
# for per-channel fp8): e4m3 `weight` + fp32 `weight_scale` [out, 1] per target module, activations
# quantised per token at run time. docs/quantization.md documents the layout.
FP8_WEIGHTS = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
FP8_INPUT_ACTIVATIONS = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                         "dynamic": True}


def fp8_quantization_config(targets: list[str] | tuple[str, ...]) -> dict:
    """The config.json `quantization_config` block of an fp8 checkpoint whose modules matching
    `targets` (compressed-tensors regexes, "re:" prefixed) are e4m3 with per-channel scales."""
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"format": "float-quantized", "targets": list(targets),
                                      "weights": dict(FP8_WEIGHTS),
                                      "input_activations": dict(FP8_INPUT_ACTIVATIONS),
                                      "output_activations": None}},
        "ignore": ["lm_head", r"re:.*mlp\.gate$"],
        "kv_cache_scheme": None,
    }


def read_quantization_config(path: str | os.PathLike) -> dict | None:
    """The checkpoint's quantization_config, or None; UserError (one line) unless it is the fp8
    per-channel compressed-tensors block mogelm writes and reads."""
    path = Path(path)
    cfg_path = path if path.is_file() else path / CONFIG_NAME
    try:
        q = json.loads(cfg_path.read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # read_config reports an unreadable config.json
    if q is None:
        return None
    supported = "mogelm reads fp8 e4m3 weights with per-channel scales in the compressed-tensors layout " \
                "(docs/quantization.md); use the bf16 checkpoint instead"
    if not isinstance(q, dict) or q.get("quant_method") != "compressed-tensors":
        what = q.get("quant_method") if isinstance(q, dict) else type(q).__name__
        raise UserError(f"{cfg_path}: quantization_config quant_method {what!r} is not supported: "
                        f"{supported}")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise UserError(f"{cfg_path}: quantization_config has no config_groups: {supported}")
    for name, group in groups.items():
        w = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(w, dict) or any(w.get(k) != v for k, v in FP8_WEIGHTS.items() if k != "dynamic"):
            raise UserError(f"{cfg_path}: quantization_config group {name!r} has weights {w}: {supported}")
    return q


def read_model_file(path: str | Path) -> ModelConfig:
    """The model in a file (`mogelm train --config PATH`, `mogelm info PATH`): a ModelConfig JSON
    (the fields of ModelConfig.to_dict(), any subset holding the required ones), a checkpoint's
    config.json (ours or a PanguProMoE one, told apart by its HF keys), or a checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        return read_config(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object of model config fields")
    if "model_type" in d or "mogelm" in d or "architectures" in d:  # an HF-layout config.json
        return read_config(path)
    try:
        return ModelConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: invalid model configuration: {e}") from None
