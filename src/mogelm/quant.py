"""FP8 (e4m3) inference weights, applied to a Transformer from outside the model (as parallel/ is).

    from mogelm.quant import Fp8Options, quantize_model
    quantize_model(model)                                     # routed + shared experts -> e4m3
    quantize_model(model, Fp8Options(attention=True))         # + q/k/v/o projections
    model = mogelm.from_pretrained("ckpt/", device="cuda", quantize="fp8")   # quantise while loading
    mogelm quantize IN OUT --weights fp8 [--attention]        # write an fp8 checkpoint (docs/quantization.md)

What changes: each MoE layer's `experts` (RoutedExperts) becomes an Fp8RoutedExperts
(moe/experts.py), and the shared expert's gate/up/down projections (optionally the attention
projections too) become Fp8Linear. Both hold e4m3 weights with one fp32 scale per output channel
(w ~= q * scale, scale = row amax / 448) and run through kernels/ops.py (`routed_experts_fp8`,
`linear_fp8`); model.py keeps its math and the engine and server need no change. Everything else
(embeddings, norms, router, LM head) keeps its dtype.

Activations, chosen per module kind (`Fp8Options`): "bf16" = weight-only (activations keep x's
dtype), "fp8" = W8A8 (activations rounded to e4m3 per token), "auto" = weight-only for decode-sized
inputs and W8A8 for large ones (ops.resolve_activations). Defaults: routed experts weight-only
(measured 1.5-1.7x bf16 at decode on the H200; W8A8 is faster from ~512 routed rows), dense
projections W8A8. Dense weight-only runs a Triton small-M kernel on CUDA (1 byte a weight read
once; triton_infer.linear_fp8_wo) and dequantise-then-GEMM for large M. The CPU twins round
exactly where the GPU paths round (the small-M kernel applies scales after its fp32 sums instead).

Recipes by name (`--quantize`, RECIPES): "fp8" routed + shared experts (the default above);
"fp8-attention" + attention; "fp8-experts" routed experts only ("auto"), shared expert and
attention stay bf16; "fp8-all" routed experts, shared expert and attention, all "auto" (the 72B
decode recipe of issue 14: benchmarks/notes_72b.md).

Checkpoint names (TARGET_RE): the modules a quantised checkpoint stores as fp8, in the Pangu
layout, e.g. `model.layers.3.mlp.experts.17.down_proj` -> `.weight` (e4m3) and `.weight_scale`
([out, 1] fp32, the compressed-tensors per-channel convention).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mogelm.kernels import ops
from mogelm.model import Transformer
from mogelm.moe.experts import Fp8RoutedExperts, RoutedExperts, keep_fp8_storage

# Checkpoint module names (without ".weight") that an fp8 checkpoint may hold in e4m3.
EXPERT_TARGETS = (r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$",
                  r"re:.*mlp\.shared_expert\.(gate|up|down)_proj$")
ATTENTION_TARGETS = (r"re:.*self_attn\.(q|k|v|o)_proj$",)


def target_patterns(attention: bool) -> tuple[str, ...]:
    """compressed-tensors `targets` (regexes over module names, "re:" prefixed) for these options."""
    return EXPERT_TARGETS + (ATTENTION_TARGETS if attention else ())


def is_target(module_name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.fullmatch(p.removeprefix("re:"), module_name) for p in patterns)


@dataclass(frozen=True)
class Fp8Options:
    """What to quantise and how the quantised modules compute (see the module docstring)."""

    attention: bool = False  # also the attention q/k/v/o projections
    expert_activations: str = "bf16"  # routed experts: "bf16" weight-only | "fp8" W8A8
    dense_activations: str = "fp8"  # shared expert (and attention) projections: "fp8" W8A8 | "bf16"
    shared: bool = True  # the shared expert too (False: routed experts only, "fp8-experts")

    def __post_init__(self):
        for name in ("expert_activations", "dense_activations"):
            if getattr(self, name) not in ops.FP8_ACTIVATIONS:
                raise ValueError(f"{name} must be one of {ops.FP8_ACTIVATIONS}, got {getattr(self, name)!r}")

    @classmethod
    def parse(cls, quantize: str | Fp8Options | None) -> Fp8Options | None:
        """None, "fp8" (routed + shared experts), "fp8-attention" (+ attention), "fp8-experts"
        (routed experts only), "fp8-all" (routed experts; shared expert and attention weight-only,
        the decode recipe of issue 14) or an Fp8Options."""
        if quantize is None or isinstance(quantize, Fp8Options):
            return quantize
        if quantize in RECIPES:
            return cls(**RECIPES[quantize])
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {', '.join(RECIPES)}")


RECIPES = {  # the names `--quantize` takes
    "fp8": {},
    "fp8-attention": dict(attention=True),
    "fp8-experts": dict(shared=False, expert_activations="auto"),
    "fp8-all": dict(attention=True, expert_activations="auto", dense_activations="auto"),
}


class Fp8Linear(nn.Module):
    """nn.Linear for inference with an e4m3 weight [out, in] and fp32 per-output-channel scales
    `weight_scale` [out]; the optional bias keeps the model's dtype. forward: ops.linear_fp8."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activations: str = "fp8",
                 device=None, bias_dtype: torch.dtype | None = None):
        super().__init__()
        if activations not in ops.FP8_ACTIVATIONS:
            raise ValueError(f"activations must be one of {ops.FP8_ACTIVATIONS}, got {activations!r}")
        self.in_features, self.out_features, self.activations = in_features, out_features, activations
        def frozen(*shape, dtype):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.weight = frozen(out_features, in_features, dtype=torch.float8_e4m3fn)
        self.weight_scale = frozen(out_features, dtype=torch.float32)
        self.bias = frozen(out_features, dtype=bias_dtype) if bias else None

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, activations: str = "fp8") -> Fp8Linear:
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, activations, "meta")
        q, scale = ops.quantize_rows_fp8(linear.weight)
        out.weight = nn.Parameter(q, requires_grad=False)
        out.weight_scale = nn.Parameter(scale, requires_grad=False)
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear_fp8(x, self.weight, self.weight_scale, self.bias, self.activations)

    def _apply(self, fn, recurse=True):
        return keep_fp8_storage(self, fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fp8 e4m3, activations={self.activations}")


def fp8_module_names(model: Transformer, attention: bool, shared: bool = True) -> list[str]:
    """Names (as in model.named_modules()) of the modules quantize_model replaces."""
    names = []
    for i, block in enumerate(model.layers):
        mlp = block.mlp
        if isinstance(getattr(mlp, "experts", None), (RoutedExperts, Fp8RoutedExperts)):
            names.append(f"layers.{i}.mlp.experts")
        if shared and getattr(mlp, "shared_expert", None) is not None:
            names += [f"layers.{i}.mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        if attention:
            names += [f"layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    return names


def quantize_model(model: Transformer, options: Fp8Options | str = "fp8",
                   names: list[str] | None = None) -> Transformer:
    """Replace the target modules of `model` with fp8 ones, in place, layer by layer (each layer's
    bf16 weights are freed as soon as its fp8 copy exists, so peak memory stays near the fp8 size).
    `names` overrides the targets (default: fp8_module_names). On a meta-device model it builds the
    fp8 skeleton that checkpoint loading fills. Modules already in fp8 are left as they are."""
    options = Fp8Options.parse(options)
    if not model.cfg.is_moe:
        raise ValueError("fp8 quantisation covers the routed and shared experts; this model is dense")
    for name in names if names is not None else fp8_module_names(model, options.attention, options.shared):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, attr)
        if isinstance(module, RoutedExperts):
            setattr(parent, attr, Fp8RoutedExperts.from_float(module, options.expert_activations))
        elif isinstance(module, nn.Linear):
            setattr(parent, attr, Fp8Linear.from_float(module, options.dense_activations))
        elif not isinstance(module, (Fp8RoutedExperts, Fp8Linear)):
            raise ValueError(f"cannot quantise {name} ({type(module).__name__})")
    return model


def set_activations(model: nn.Module, experts: str | None = None, dense: str | None = None) -> None:
    """Switch the activation mode of a quantised model's fp8 modules ("bf16" or "fp8")."""
    for m in model.modules():
        value = experts if isinstance(m, Fp8RoutedExperts) else dense if isinstance(m, Fp8Linear) else None
        if value is not None:
            if value not in ops.FP8_ACTIVATIONS:
                raise ValueError(f"activations must be one of {ops.FP8_ACTIVATIONS}, got {value!r}")
            m.activations = value


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Fp8RoutedExperts, Fp8Linear)) for m in model.modules())
