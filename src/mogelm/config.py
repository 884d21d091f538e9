"""Model configuration: one typed dataclass, presets by name, and an analytic parameter counter.

    from mogelm.config import ModelConfig, from_name, count_parameters
    cfg = from_name("pangu-pro-moe-72b")
    total, active = count_parameters(cfg)      # 71.99 B, 16.50 B (PAPER.md §3.1)
    cfg = from_name("debug", **parse_overrides(["hidden_size=128", "routing=topk"]))  # `--set` strings
    count_mtp_parameters(cfg.replace(mtp_depth=1))   # what one MTP module (mogelm.mtp) adds

Vocabulary of the MoE fields (MoGE overloads "group"; here it always means an *expert group*):
    num_experts (N)          routed experts per layer
    num_groups (M)           contiguous expert groups; group j = experts [j*N/M, (j+1)*N/M)
    num_experts_per_tok (K)  experts each token activates; MoGE needs K = M * K'
    experts_per_group_per_tok (K')  derived: K / M
Invalid combinations raise ValueError naming the fields involved.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field

ROUTINGS = ("moge", "topk", "softmax_topk", "group_limited")
AUX_LOSS_TYPES = ("batch", "sequence", "none")
FFN_TYPES = ("moe", "dense")


@dataclass(kw_only=True)
class ModelConfig:
    # --- transformer trunk ---
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0 -> hidden_size // num_heads
    qkv_bias: bool = True  # Pangu Pro MoE: q, k, v *and* o projections carry biases
    o_bias: bool = True
    rope_theta: float = 1.6e7
    norm_eps: float = 1e-5
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    init_std: float = 0.02

    # --- feed-forward ---
    ffn_type: str = "moe"  # "moe" (routed + shared experts) or "dense" (one SwiGLU, a baseline)
    dense_intermediate_size: int = 0  # width of the dense SwiGLU when ffn_type == "dense"
    num_experts: int = 8
    num_groups: int = 4
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 64
    shared_expert_intermediate_size: int = 0  # 0 -> no shared expert

    # --- routing ---
    routing: str = "moge"  # moge | topk (paper Eq. 2) | softmax_topk | group_limited (DeepSeek-V3)
    renormalize: bool = False  # renormalise the kept gate weights to sum to 1 (MoGE/Pangu: False)
    router_scale: bool = True  # learned per-expert multiplier on gate weights (Pangu `mlp.router_scale`)
    topk_groups: int = 0  # group_limited: groups each token may use (0 -> num_groups // 2, at least 1)

    # --- load balancing ---
    aux_loss_type: str = "batch"  # paper Eq. 8 is batch level
    aux_loss_alpha: float = 1e-3
    z_loss_coef: float = 0.0
    aux_free_bias: bool = False  # DeepSeek-V3 aux-loss-free expert bias (selection only)
    aux_free_update_rate: float = 1e-3

    # --- multi-token prediction (DeepSeek-V3 style; mogelm.mtp) ---
    mtp_depth: int = 0  # MTP modules after the trunk; module d predicts token t+d+1 (0: none)

    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}) "
                    "or head_dim must be set explicitly"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.topk_groups == 0:
            self.topk_groups = max(1, self.num_groups // 2)
        self.validate()

    # Derived sizes ---------------------------------------------------------------------------
    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_groups

    @property
    def experts_per_group_per_tok(self) -> int:
        """K' = K / M, the experts each token picks inside every group (MoGE)."""
        return self.num_experts_per_tok // self.num_groups

    @property
    def is_moe(self) -> bool:
        return self.ffn_type == "moe"

    def validate(self) -> None:
        def positive(*names: str) -> None:
            for n in names:
                if getattr(self, n) <= 0:
                    raise ValueError(f"{n} must be positive, got {getattr(self, n)}")

        positive("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "max_seq_len")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.mtp_depth < 0:
            raise ValueError(f"mtp_depth must be >= 0, got {self.mtp_depth}")
        if self.ffn_type not in FFN_TYPES:
            raise ValueError(f"ffn_type must be one of {FFN_TYPES}, got {self.ffn_type!r}")
        if self.ffn_type == "dense":
            positive("dense_intermediate_size")
            return
        positive("num_experts", "num_groups", "num_experts_per_tok", "moe_intermediate_size")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.aux_loss_type not in AUX_LOSS_TYPES:
            raise ValueError(f"aux_loss_type must be one of {AUX_LOSS_TYPES}, got {self.aux_loss_type!r}")
        if self.shared_expert_intermediate_size < 0:
            raise ValueError("shared_expert_intermediate_size must be >= 0")
        if self.num_experts % self.num_groups:
            raise ValueError(
                f"num_experts ({self.num_experts}) must be divisible by num_groups ({self.num_groups})"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})"
            )
        if self.routing == "moge":
            if self.num_experts_per_tok % self.num_groups:
                raise ValueError(
                    f"MoGE needs num_experts_per_tok ({self.num_experts_per_tok}) to be a multiple of "
                    f"num_groups ({self.num_groups}): every token picks K' = K/M experts in every group"
                )
        if self.routing == "group_limited":
            if not 1 <= self.topk_groups <= self.num_groups:
                raise ValueError(f"topk_groups ({self.topk_groups}) must be in "
                                 f"[1, num_groups={self.num_groups}]")
            if self.num_experts_per_tok > self.topk_groups * self.experts_per_group:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in the "
                    f"topk_groups ({self.topk_groups}) groups a token may use"
                )

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        return cls(**d)


# Presets ---------------------------------------------------------------------------------------
PRESETS: dict[str, dict] = {
    # Drives every test: < 1 M parameters, every dimension a multiple of 8 (grouped_mm alignment).
    "debug": dict(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, rope_theta=1e4,
        max_seq_len=256, num_experts=8, num_groups=4, num_experts_per_tok=4, moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    ),
    # The CPU demo (README's main job): ~18 M parameters, 32 experts in 8 groups, 8 active.
    "small": dict(
        vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, rope_theta=1e4,
        max_seq_len=1024, num_experts=32, num_groups=8, num_experts_per_tok=8, moe_intermediate_size=128,
        shared_expert_intermediate_size=256,
    ),
    # PAPER.md §3.1, exactly.
    "pangu-pro-moe-72b": dict(
        vocab_size=153376, hidden_size=5120, num_layers=48, num_heads=40, num_kv_heads=8, head_dim=128,
        rope_theta=1.6e7, norm_eps=1e-5, max_seq_len=131072, num_experts=64, num_groups=8,
        num_experts_per_tok=8, moe_intermediate_size=1344, shared_expert_intermediate_size=5376,
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def from_name(name: str, **overrides) -> ModelConfig:
    """Build a preset by name, with optional field overrides (e.g. routing="topk")."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    return ModelConfig(**{**PRESETS[name], **overrides, "name": name})


# Overrides from strings (`mogelm train --set field=value`) --------------------------------------
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def field_types() -> dict[str, type]:
    """ModelConfig field name -> its Python type (int, float, bool or str)."""
    return typing.get_type_hints(ModelConfig)


def parse_override(text: str) -> tuple[str, object]:
    """'hidden_size=2048' -> ("hidden_size", 2048), typed by the ModelConfig field. Raises ValueError
    naming the field (or the closest known one) and the expected type."""
    name, sep, raw = text.partition("=")
    name, raw = name.strip(), raw.strip()
    if not sep or not name:
        raise ValueError(f"--set {text!r}: expected FIELD=VALUE, e.g. --set hidden_size=2048")
    types = field_types()
    if name not in types:
        close = difflib.get_close_matches(name, list(types), n=1)
        hint = f" (did you mean {close[0]}?)" if close else f"; fields: {', '.join(types)}"
        raise ValueError(f"--set {text!r}: {name!r} is not a model config field{hint}")
    kind = types[name]
    try:
        if kind is bool:
            if raw.lower() not in _TRUE + _FALSE:
                raise ValueError
            return name, raw.lower() in _TRUE
        if kind is int:
            return name, int(raw)
        if kind is float:
            return name, float(raw)
        return name, raw
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise ValueError(f"--set {text!r}: {name} takes {expected}, got {raw!r}") from None


def parse_overrides(items: list[str] | None) -> dict:
    """Several `field=value` strings -> {field: typed value}; a later one wins."""
    return dict(parse_override(t) for t in items or [])


def base_fields(cfg: ModelConfig) -> dict:
    """cfg's fields as a base for overrides: the derived fields (head_dim, topk_groups) go back to
    0 ("derive") when they hold their derived value, so overriding hidden_size or num_groups
    re-derives them instead of keeping a stale value."""
    d = cfg.to_dict()
    if d["head_dim"] * d["num_heads"] == d["hidden_size"]:
        d["head_dim"] = 0
    if d["topk_groups"] == max(1, d["num_groups"] // 2):
        d["topk_groups"] = 0
    return d


# Parameter counting ----------------------------------------------------------------------------
def _layer_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active-per-token) parameters of one transformer block: attention, 2 norms, FFN."""
    d, hd = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    attn = d * (q_out + 2 * kv_out) + q_out * d
    if cfg.qkv_bias:
        attn += q_out + 2 * kv_out
    if cfg.o_bias:
        attn += d
    norms = 2 * d
    if cfg.is_moe:
        expert = 3 * d * cfg.moe_intermediate_size
        router = d * cfg.num_experts + (cfg.num_experts if cfg.router_scale else 0)
        shared = 3 * d * cfg.shared_expert_intermediate_size
        ffn_total = cfg.num_experts * expert + router + shared
        ffn_active = cfg.num_experts_per_tok * expert + router + shared
    else:
        ffn_total = ffn_active = 3 * d * cfg.dense_intermediate_size
    return attn + norms + ffn_total, attn + norms + ffn_active


def count_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active-per-token) parameter counts of the main model, computed from the config alone.

    Active counts what one token touches: embedding row table and LM head (as the paper does),
    attention, router, K routed experts, the shared expert and norms. MTP modules are not
    included: count_mtp_parameters gives theirs.
    """
    d = cfg.hidden_size
    layer_total, layer_active = _layer_parameters(cfg)
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    outside = embed + head + d  # + final norm
    return cfg.num_layers * layer_total + outside, cfg.num_layers * layer_active + outside


def count_mtp_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active-per-token) parameters the mtp_depth MTP modules add (0, 0 without MTP).

    Each module owns enorm, hnorm (D each), eh_proj (2D x D), one transformer block and its
    output norm (D); the embedding and the LM head are shared with the main model and counted
    there only, so main + MTP is the size of a checkpoint with MTP."""
    d = cfg.hidden_size
    layer_total, layer_active = _layer_parameters(cfg)
    own = 3 * d + 2 * d * d
    return cfg.mtp_depth * (layer_total + own), cfg.mtp_depth * (layer_active + own)
