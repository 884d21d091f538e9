"""What a training run is: TrainConfig, and the model, optimizer and learning-rate schedule it builds.

    tc = TrainConfig(preset="debug", max_steps=200, out="runs/debug")
    cfg = build_model_config(tc)                   # the preset (or tc.model_config) with tc's overrides
    model = build_model(cfg, tc.seed, "cpu")       # seeded: the same weights for the same seed
    optimizer = build_optimizer(model, tc)         # AdamW, decay on matrices only; states fp32 or bf16
    lr = lr_at(step, tc, tc.total_steps())         # warm-up, then cosine to lr * min_lr_ratio

Multi-token prediction: model_overrides={"mtp_depth": D} gives the model D MTP modules
(mogelm.mtp) and the loop trains them with loss = CE + mtp_weight * mean over depths of their CE.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from mogelm.config import ModelConfig, base_fields, from_name
from mogelm.errors import UserError

OPTIM_STATE_DTYPES = ("fp32", "bf16")


@dataclass(kw_only=True)
class TrainConfig:
    out: str = "runs/train"
    preset: str = "debug"
    model_config: dict | None = None  # a whole ModelConfig (from --config); replaces the preset
    routing: str | None = None  # None: the preset's (moge)
    model_overrides: dict = field(default_factory=dict)  # any ModelConfig field
    data: list[str] = field(default_factory=list)  # empty: the embedded stdlib corpus
    max_bytes: int | None = None  # cap on the embedded corpus size
    vocab_size: int | None = None  # tokenizer and model vocabulary (default: the preset's)
    val_fraction: float = 0.05
    cache_dir: str | None = None
    seq_len: int = 256
    batch_size: int = 8  # rows per micro-batch per rank
    grad_accum: int = 1
    max_steps: int = 0
    max_tokens: int = 0  # used when max_steps is 0
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = -1  # -1: 5 % of max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optim_state_dtype: str = "fp32"  # AdamW moments: fp32, or bf16 (half the optimizer memory)
    mtp_weight: float = 0.3  # lambda of the MTP loss (model_overrides["mtp_depth"] > 0; DeepSeek-V3: 0.3)
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    keep_checkpoints: int = 1
    log_every: int = 0  # non-tty progress lines (0: about 20 per run)
    progress: str = "auto"  # auto ('\\r' line on a terminal) | lines | none
    sim_devices: tuple[int, ...] = (8, 4)
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    resume: bool = False
    stop_after: int = 0  # stop (as if killed) after this step; for tests of --resume
    activation_checkpointing: str = "none"  # none | moe | full (Transformer.set_activation_checkpointing)

    def __post_init__(self) -> None:
        if not (self.mtp_weight >= 0 and math.isfinite(self.mtp_weight)):
            raise UserError(f"--mtp-weight must be a finite number >= 0, got {self.mtp_weight}")

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.batch_size * self.seq_len * self.grad_accum * world_size

    def total_steps(self, world_size: int = 1) -> int:
        if self.max_steps > 0:
            return self.max_steps
        if self.max_tokens > 0:
            return math.ceil(self.max_tokens / self.tokens_per_step(world_size))
        raise UserError("give --max-steps or --max-tokens")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sim_devices"] = list(self.sim_devices)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of to_dict (e.g. after a JSON round trip)."""
        return cls(**{**d, "sim_devices": tuple(d["sim_devices"])})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (use cpu, cuda or auto)") from None


def build_model_config(tc: TrainConfig, vocab_size: int | None = None) -> ModelConfig:
    """The model: tc.model_config (from --config) or the preset, then tc.routing, vocab_size and
    tc.model_overrides (--set and the routing flags) on top; derived fields (head_dim,
    topk_groups) follow their inputs unless set explicitly."""
    overrides = dict(tc.model_overrides)
    if tc.routing is not None:
        overrides["routing"] = tc.routing
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    overrides.setdefault("max_seq_len", max(tc.seq_len, 1))
    try:
        if tc.model_config is not None:
            base = base_fields(ModelConfig.from_dict(tc.model_config))
            cfg = ModelConfig(**{**base, **overrides})
        else:
            cfg = from_name(tc.preset, **overrides)
    except (ValueError, TypeError) as e:
        raise UserError(f"invalid model configuration: {e}") from None
    if cfg.max_seq_len < tc.seq_len:
        raise UserError(f"--seq-len {tc.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    if cfg.mtp_depth >= tc.seq_len:
        raise UserError(f"--mtp-depth {cfg.mtp_depth} leaves no positions to train in sequences of "
                        f"--seq-len {tc.seq_len}; use a depth below the sequence length")
    return cfg


def build_model(cfg: ModelConfig, seed: int, device: torch.device | str = "cpu"):
    """Transformer(cfg) initialised from `seed` (on the CPU's random stream, then moved). On
    device "meta" nothing is drawn yet: mogelm.parallel's FSDP layout shards it and then draws the
    same weights, slice by slice (mogelm.parallel.fsdp.materialize_sharded)."""
    from mogelm.model import Transformer

    torch.manual_seed(seed)
    if str(device) == "meta":
        with torch.device("meta"):
            return Transformer(cfg)
    return Transformer(cfg).to(device)


def build_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (>= 2 dims) only; biases, norms, router_scale undecayed.
    tc.optim_state_dtype "bf16" keeps the two moments in bfloat16 (AdamWBF16State, same update)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "router_scale" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if tc.optim_state_dtype == "bf16":
        from mogelm.train.optim import AdamWBF16State

        return AdamWBF16State(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8)
    if tc.optim_state_dtype != "fp32":
        raise UserError(f"--optim-state-dtype {tc.optim_state_dtype!r}: choose one of {OPTIM_STATE_DTYPES}")
    # One fused kernel for the whole update on CUDA: measured on one H200 (2026-12-02,
    # benchmarks/bench_train.py) the 0.91B-active step went from 332 to 284 ms against the foreach
    # implementation (42.1 -> 49.2 % of the dense rate). Plain tensors only (DTensors keep foreach).
    fused = all(p.is_cuda and type(p) is torch.nn.Parameter for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8, fused=fused or None)


def lr_at(step: int, tc: TrainConfig, total_steps: int) -> float:
    """Linear warm-up over warmup steps, then cosine from lr to lr * min_lr_ratio at total_steps."""
    warmup = tc.warmup_steps if tc.warmup_steps >= 0 else max(1, total_steps // 20)
    if step < warmup:
        return tc.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = tc.lr * tc.min_lr_ratio
    return floor + 0.5 * (tc.lr - floor) * (1 + math.cos(math.pi * progress))
