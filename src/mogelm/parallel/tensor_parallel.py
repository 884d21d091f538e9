"""Serving across GPUs: tensor-parallel attention and expert-parallel MoE over one process group,
applied to a built model from outside (the model never imports torch.distributed).

    from mogelm.parallel.tensor_parallel import apply_tensor_parallel, sharder
    model = apply_tensor_parallel(model, process_group)   # every rank holding the same full weights
    # or read only this rank's slices of a checkpoint, with mogelm.inference.shards.load_sharded:
    model = load_sharded("ckpt/", sharder(process_group), "cuda:1")
    # `mogelm serve --nproc 4 --ep 4` does the second (mogelm.commands._lockstep)

Layout over N ranks, rank r (the paper's inference layout with its all-gather already done):
  attention  q/k/v column-parallel: query heads [r*H/N, (r+1)*H/N) and the KV heads they read,
             [r*Hkv/N, (r+1)*Hkv/N) (GQA keeps its grouping, H/N = (H/Hkv) * (Hkv/N)); o_proj
             row-parallel (RowParallelLinear: the input columns of those heads, an all-reduce,
             then the bias once). The paged KV cache of rank r holds its KV heads of every sequence.
  MoE        the router runs on every rank: after the attention's all-reduce every rank holds
             every token's hidden state, so every rank routes every token identically. Routed
             experts are sharded by expert group as in expert parallel (rank r holds groups
             [r*M/N, (r+1)*M/N)); the shared expert is column/row parallel (gate/up output rows,
             down input columns). Each rank computes its experts and its slice of the shared
             expert on all tokens, and the layer ends with ONE all-reduce of [T, D]: the paper's
             "all-gather -> local experts -> reduce-scatter", where the all-gather is the
             replicated hidden state and the reduce-scatter + next all-gather is the all-reduce.
  the rest   embedding, norms, router and LM head replicated (the LM head reads 1.6 GB per step
             at Pangu widths; sharding it would need the logits gathered).
So each layer costs two all-reduces of [T, D], equal-shaped on every rank, with no count exchange
and no host synchronisation: a decode step stays one fixed-shape computation that a CUDA graph
captures whole (NCCL collectives are captured like kernels). The sharded model's `cfg` describes
this rank's attention (num_heads / N, num_kv_heads / N, head_dim explicit), which is what the
inference engine sizes its KV cache from; `model.tp_full_cfg` keeps the checkpoint's.

Fusions and MTP: shard the unfused model (check_shardable refuses a fused or fp8 one), then fuse:
inference/fuse.py's FusedQKV and FusedSwiGLU concatenate this rank's q/k/v heads and gate/up
columns like any other model's (the Engine fuses on CUDA, after load_sharded). A model's MTP
modules (mogelm.mtp) are dropped (model.mtp = None, cfg.mtp_depth = 0): the engine serves the
trunk only, and speculative decoding from MTP under this layout is not built.

Routing under this layout (`dispatch`):
  "moge"      MoGE (balanced groups): rank r's selections are the router's column block r (MoGE
              emits ids group by group): exactly T*K/N rows on every rank, fixed shapes.
  "topk"      any router: the (token, slot) pairs that land on rank r's experts, gathered with
              nonzero(): their number varies per rank and step (a host sync, so the decode step
              cannot be captured) and the busiest rank sets the pace. Every rank routes every
              token, so no count exchange is needed.
  "topk_a2a"  the issue's expert-parallel baseline: each rank takes a 1/N slice of the tokens and
              sends it through TopKAllToAll (count exchange + variable all-to-all); rank r's slice
              of the output, zeros elsewhere, is summed back by the layer's all-reduce.
  "moge_a2a"  the same slicing through the fixed-shape MoGEAllToAll (capturable).
  "auto"      "moge" for a balanced router, else "topk".
`comm_timer` (begin(what) / end(what), as in mogelm.parallel.dispatchers) wraps every collective
here; benchmarks pass one to split communication from compute in eager steps.

Legend: T tokens of the step, D hidden, H / Hkv query / KV heads, hd head dim, E experts, K experts
per token, N ranks, E_loc = E / N, Kr = K / N, S shared-expert width, A (token, slot) assignments.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mogelm.config import ModelConfig
from mogelm.model import Transformer
from mogelm.moe.layer import MoGELayer
from mogelm.moe.routing import ROUTERS
from mogelm.parallel.dispatchers import CollectiveError, CommTimer, MoGEAllToAll, TopKAllToAll

DISPATCHES = ("auto", "moge", "topk", "topk_a2a", "moge_a2a")
CAPTURABLE = {"moge": True, "moge_a2a": True, "topk": False, "topk_a2a": False}


def resolve_dispatch(cfg: ModelConfig, dispatch: str) -> str:
    """The dispatch name `auto` stands for with this model's router; ValueError for a bad pair."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"unknown dispatch {dispatch!r}; choose one of {DISPATCHES}")
    balanced = cfg.is_moe and ROUTERS[cfg.routing].balanced_groups
    if dispatch == "auto":
        return "moge" if balanced else "topk"
    if dispatch in ("moge", "moge_a2a") and not balanced:
        raise ValueError(f"dispatch {dispatch!r} needs MoGE routing (every expert group receiving exactly "
                         f"T*K' rows); this model routes with {cfg.routing!r}: use topk or topk_a2a")
    return dispatch


def validate_tp(cfg: ModelConfig, num_ranks: int) -> None:
    """Refuse a rank count the layout cannot split (pure, so every rank raises alike)."""
    if num_ranks < 1:
        raise ValueError(f"the number of ranks must be >= 1, got {num_ranks}")
    if num_ranks == 1:
        return
    problems = []
    if cfg.num_kv_heads % num_ranks:
        problems.append(f"num_kv_heads ({cfg.num_kv_heads}): each rank holds whole KV heads")
    if cfg.is_moe:
        if ROUTERS[cfg.routing].balanced_groups and cfg.num_groups % num_ranks:
            problems.append(f"num_groups ({cfg.num_groups}): each rank holds whole expert groups")
        if cfg.num_experts % num_ranks:
            problems.append(f"num_experts ({cfg.num_experts})")
        if cfg.shared_expert_intermediate_size % num_ranks:
            problems.append(f"shared_expert_intermediate_size ({cfg.shared_expert_intermediate_size})")
    elif cfg.dense_intermediate_size % num_ranks:
        problems.append(f"dense_intermediate_size ({cfg.dense_intermediate_size})")
    if problems:
        raise ValueError(f"{num_ranks} ranks do not divide " + "; ".join(problems))


def local_config(cfg: ModelConfig, num_ranks: int) -> ModelConfig:
    """What one rank's attention holds: H/N query heads, Hkv/N KV heads of the same head_dim."""
    return cfg.replace(num_heads=cfg.num_heads // num_ranks, num_kv_heads=cfg.num_kv_heads // num_ranks,
                       head_dim=cfg.head_dim)


# Which slice of each parameter a rank holds ---------------------------------------------------------
def shard_slice(name: str, cfg: ModelConfig, rank: int, num_ranks: int) -> tuple[int, int, int] | None:
    """(dim, start, length) of parameter `name` (model naming, e.g. 'layers.3.self_attn.q_proj.weight')
    that rank `rank` of `num_ranks` holds; None when the parameter is replicated. The one place the
    layout is written down: apply_tensor_parallel slices loaded weights with it, load_sharded reads
    these slices from the checkpoint."""
    if num_ranks == 1 or not name.startswith("layers."):
        return None
    module, _, kind = name.rpartition(".")
    hd = cfg.head_dim
    if ".self_attn." in module:
        proj = module.rpartition(".")[2]
        heads = cfg.num_heads if proj in ("q_proj", "o_proj") else cfg.num_kv_heads
        per = heads // num_ranks * hd
        if proj == "o_proj":
            return (1, rank * per, per) if kind == "weight" else None  # the bias is added once, whole
        return 0, rank * per, per  # q/k/v weight rows and bias entries of this rank's heads
    if ".mlp.shared_expert." in module or (not cfg.is_moe and module.endswith((".gate_proj", ".up_proj",
                                                                                ".down_proj"))):
        width = cfg.shared_expert_intermediate_size if cfg.is_moe else cfg.dense_intermediate_size
        per = width // num_ranks
        return (1, rank * per, per) if module.endswith("down_proj") else (0, rank * per, per)
    if module.endswith(".mlp.experts"):
        per = cfg.num_experts // num_ranks
        return 0, rank * per, per  # gate_up_EFD, down_EDF (and fp8 scales): whole experts
    return None


# Modules and dispatchers ----------------------------------------------------------------------------
def all_reduce_(x: Tensor, process_group, timer: CommTimer | None = None, what: str = "all_reduce") -> Tensor:
    """Sum x over the ranks in place (inference: no autograd); a failure is a CollectiveError
    naming the cause."""
    try:
        if timer is not None:
            timer.begin(what)
        dist.all_reduce(x, group=process_group)
        if timer is not None:
            timer.end(what)
    except (RuntimeError, dist.DistError) as e:
        where = f"rank {dist.get_rank()}/{dist.get_world_size()}"
        said = str(e).splitlines()[0] if str(e) else type(e).__name__
        message = (f"the {what} of a tensor-parallel layer failed on {where}: a peer rank probably died, "
                   f"timed out or ran a different step. Backend said: {said}")
        raise CollectiveError(message) from e
    return x


class RowParallelLinear(nn.Module):
    """A row-parallel nn.Linear: this rank's input columns [out, in/N], the partial products summed
    over the ranks, then the bias (whole, added once). Parameter names stay `weight` and `bias`."""

    def __init__(self, weight: Tensor, bias: Tensor | None, process_group, timer: CommTimer | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.process_group, self.timer = process_group, timer

    def forward(self, x: Tensor) -> Tensor:
        y = all_reduce_(F.linear(x, self.weight), self.process_group, self.timer, "attention all_reduce")
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        out, part = self.weight.shape
        return f"in_features={part} (this rank's), out_features={out}, bias={self.bias is not None}"


class LocalGroups:
    """MoGE on replicated tokens: rank r's selections are column block r of the routing (fixed shapes).
    dispatch -> (x_TD, weights_TKr, local ids_TKr); combine -> this rank's partial sum [T, D]."""

    def __init__(self, rank: int, num_ranks: int, num_experts: int, num_experts_per_tok: int):
        self.rank, self.E_loc, self.Kr = rank, num_experts // num_ranks, num_experts_per_tok // num_ranks

    def dispatch(self, x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor):
        cols = slice(self.rank * self.Kr, (self.rank + 1) * self.Kr)
        local_ids_TKr = expert_ids_TK[:, cols] - self.rank * self.E_loc
        return x_TD, weights_TK[:, cols].contiguous(), local_ids_TKr.contiguous(), None

    def combine(self, y_TD: Tensor, ctx: None) -> Tensor:
        return y_TD


class LocalAssignments:
    """Any routing on replicated tokens: the (token, slot) pairs on this rank's experts, one row each
    (K = 1); their number varies (nonzero: a host sync). combine scatters them back to [T, D]."""

    def __init__(self, rank: int, num_ranks: int, num_experts: int):
        self.rank, self.E_loc = rank, num_experts // num_ranks

    def dispatch(self, x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor):
        mine_TK = expert_ids_TK // self.E_loc == self.rank
        token_A, slot_A = mine_TK.nonzero(as_tuple=True)
        x_AD = x_TD.index_select(0, token_A)
        weights_A1 = weights_TK[token_A, slot_A].unsqueeze(-1)
        ids_A1 = (expert_ids_TK[token_A, slot_A] - self.rank * self.E_loc).unsqueeze(-1)
        return x_AD, weights_A1, ids_A1, (x_TD.shape[0], token_A)

    def combine(self, y_AD: Tensor, ctx) -> Tensor:
        T, token_A = ctx
        return y_AD.new_zeros(T, y_AD.shape[1]).index_add_(0, token_A, y_AD)


class TokenSlices:
    """Expert parallel over a 1/N slice of the replicated tokens: rank r sends tokens
    [r*Tp, (r+1)*Tp) (Tp = ceil(T/N), padded with zero-weight rows so every rank sends Tp) through
    an expert-parallel dispatcher; combine returns [T, D] with rank r's slice filled and zeros
    elsewhere, which the layer's all-reduce sums into every token's output."""

    def __init__(self, inner, rank: int, num_ranks: int, num_experts: int, num_groups: int):
        self.inner, self.rank, self.num_ranks = inner, rank, num_ranks
        self.num_groups, self.per_group = num_groups, num_experts // num_groups

    def dispatch(self, x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor):
        T, K = expert_ids_TK.shape
        Tp = -(-T // self.num_ranks)
        lo, hi = min(self.rank * Tp, T), min((self.rank + 1) * Tp, T)
        pad = Tp - (hi - lo)
        x, w, ids = x_TD[lo:hi], weights_TK[lo:hi], expert_ids_TK[lo:hi]
        if pad:  # zero rows with zero weights on a valid MoGE selection (the first expert of each group);
            # made on the device (a host tensor copied in would break a CUDA-graph capture)
            starts = torch.arange(self.num_groups, device=ids.device) * self.per_group
            fill = starts.repeat(-(-K // self.num_groups))[:K]
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
            w = torch.cat([w, w.new_zeros(pad, K)])
            ids = torch.cat([ids, fill.expand(pad, K)])
        out = self.inner.dispatch(x, w, ids)
        return out[0], out[1], out[2], (out[3], T, lo, hi)

    def combine(self, y_RD: Tensor, ctx) -> Tensor:
        inner_ctx, T, lo, hi = ctx
        y_TpD = self.inner.combine(y_RD, inner_ctx)
        y_TD = y_TpD.new_zeros(T, y_TpD.shape[1])
        y_TD[lo:hi] = y_TpD[:hi - lo]
        return y_TD


def _all_reduce_output_hook(process_group, timer):
    """Forward hook on an FFN (MoGELayer or the dense SwiGLU): its output is this rank's partial sum
    (local experts + its shared-expert slice); one all-reduce makes it every token's whole output."""

    def hook(module, inputs, output):
        y, stats = output
        y = y.contiguous()
        all_reduce_(y, process_group, timer, "MoE all_reduce")
        return y, stats

    return hook


@torch.no_grad()
def apply_tensor_parallel(model: Transformer, process_group, dispatch: str = "auto",
                          comm_timer: CommTimer | None = None) -> Transformer:
    """Shard `model` in place over `process_group` (layout: module docstring) and return it.

    Call on every rank of the group, each holding the same full weights (the shards are slices of
    them), or on a model on the meta device (then the shapes shrink and inference.shards.load_sharded,
    or to_empty + reset_parameters, fills them). One rank is the degenerate case of the same code
    (whole tensors, the same modules, all-reduces over one rank). Inference only: the sharded
    parameters do not require grad."""
    cfg = model.cfg
    N, r = dist.get_world_size(process_group), dist.get_rank(process_group)
    validate_tp(cfg, N)
    check_shardable(model)
    dispatch = resolve_dispatch(cfg, dispatch) if cfg.is_moe else "moge"
    if model.mtp is not None:  # the engine serves the trunk; MTP blocks would need this layout too
        model.mtp, cfg = None, cfg.replace(mtp_depth=0)
    model.tp_full_cfg, model.tp_dispatch = cfg, dispatch
    for name, p in list(model.named_parameters()):
        sl = shard_slice(name, cfg, r, N)
        if sl is not None:
            module_name, _, pname = name.rpartition(".")
            module = model.get_submodule(module_name)
            setattr(module, pname, nn.Parameter(p.detach().narrow(*sl).clone(), requires_grad=False))
            if isinstance(module, nn.Linear) and pname == "weight":  # keep the shapes it reports true
                module.out_features, module.in_features = module.weight.shape
    hook = _all_reduce_output_hook(process_group, comm_timer)
    for block in model.layers:
        attn = block.self_attn
        attn.num_heads, attn.num_kv_heads = cfg.num_heads // N, cfg.num_kv_heads // N
        attn.o_proj = RowParallelLinear(attn.o_proj.weight.data, getattr(attn.o_proj.bias, "data", None),
                                        process_group, comm_timer)
        block.mlp.register_forward_hook(hook)
        if isinstance(block.mlp, MoGELayer):
            layer = block.mlp
            layer.experts.num_experts = cfg.num_experts // N
            layer.dispatcher = make_tp_dispatcher(dispatch, process_group, cfg, r, N, comm_timer)
    model.cfg = local_config(cfg, N)
    return model


def check_shardable(model: Transformer) -> None:
    """ValueError unless `model` has the modules shard_slice names: the checkpoint's separate q/k/v
    and gate/up projections as plain nn.Linear. Shard first, then fuse (inference.fuse concatenates
    this rank's slices: the Engine does so on CUDA) and never quantise under this layout (an fp8
    projection's scales and RowParallelLinear's F.linear do not split this way)."""
    for name, module in model.named_modules():
        if not name.startswith("layers."):
            continue
        if name.endswith(("self_attn.qkv_proj", "shared_expert.gate_up")):
            raise ValueError(f"{name} is fused (mogelm.inference.fuse): apply tensor parallelism to the "
                             "unfused model, then fuse_for_inference (the Engine fuses on CUDA)")
        if name.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                       "down_proj") and type(module) is not nn.Linear \
                and not isinstance(module, RowParallelLinear):
            raise ValueError(f"{name} is a {type(module).__name__}: tensor parallelism shards bf16 / fp32 "
                             "nn.Linear projections only (no fp8 under --nproc)")


def make_tp_dispatcher(dispatch: str, process_group, cfg: ModelConfig, rank: int, N: int, timer=None):
    """The MoE dispatcher of one dispatch name (module docstring) for rank `rank` of N; `cfg` is
    the full model config (not the sharded one)."""
    E, K = cfg.num_experts, cfg.num_experts_per_tok
    if dispatch == "moge":
        return LocalGroups(rank, N, E, K)
    if dispatch == "topk":
        return LocalAssignments(rank, N, E)
    inner = (MoGEAllToAll(process_group, E, K, timer) if dispatch == "moge_a2a"
             else TopKAllToAll(process_group, E, timer))
    return TokenSlices(inner, rank, N, E, cfg.num_groups)


# Loading only this rank's slices ---------------------------------------------------------------------
def sharder(process_group, dispatch: str = "auto", comm_timer: CommTimer | None = None):
    """For mogelm.inference.shards.load_sharded: a function that shards a meta-device model in place
    and returns `slice_of(name)`, the (dim, start, length) this rank reads of each parameter.

        model = load_sharded("ckpt/", sharder(process_group), "cuda:1")"""

    def shard(model: Transformer):
        cfg = model.cfg
        apply_tensor_parallel(model, process_group, dispatch, comm_timer)
        N, r = dist.get_world_size(process_group), dist.get_rank(process_group)
        return lambda name: shard_slice(name, cfg, r, N)

    return shard


def describe_layout(model: Transformer) -> str:
    """One line for logs: ranks, what each holds, the dispatch."""
    full, local = getattr(model, "tp_full_cfg", model.cfg), model.cfg
    N = full.num_kv_heads // local.num_kv_heads
    moe = (f", experts {full.num_experts // N} of {full.num_experts} per rank ({model.tp_dispatch})"
           if full.is_moe else "")
    return (f"{N} ranks: attention tensor-parallel ({local.num_heads} of {full.num_heads} query heads, "
            f"{local.num_kv_heads} of {full.num_kv_heads} KV heads per rank){moe}")

