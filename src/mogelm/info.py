"""A model's shapes, parameter counts, FLOPs per token and the memory of a training step, from a
preset name, a checkpoint directory or a config file, as a dict and as text (what `mogelm info`
prints; no weights are loaded, but a checkpoint's weight files are checked against their
safetensors headers, so a truncated copy is reported).

    from mogelm.info import describe, load_config, training_plan, describe_plan
    cfg = load_config("pangu-pro-moe-72b")      # or a checkpoint directory, or a JSON file
    print(describe(cfg))                         # pangu-pro-moe-72b: 71.989 B parameters, 16.498 B active ...
    plan = training_plan(cfg, nproc=8, ep=8, fsdp=8, batch_size=1, seq_len=4096)
    print(describe_plan(cfg, plan))              # FLOPs per token; GiB per rank, with and without
                                                 # activation checkpointing

The memory model (terms and assumptions: docs/training.md, "Memory plan") counts weights, gradients
and AdamW moments per rank for the layout, FSDP's unsharded working buffers, the activations
autograd keeps (per layer, checked against a CPU run's saved tensors in tests/test_info.py) and
the logits.

Counts are of the main model; a model with MTP modules (cfg.mtp_depth > 0, mogelm.mtp) also
gets their own parameters (the embedding and LM head they share are counted once, in the main
model) and the totals with them.
"""

from __future__ import annotations

from pathlib import Path

from mogelm.config import PRESETS, ModelConfig, count_mtp_parameters, count_parameters, from_name
from mogelm.errors import UserError


def load_config(model: str) -> ModelConfig:
    """The config of a preset name, of a checkpoint directory (its config.json; weight files, where
    there are any, must be complete; the model is named after its directory) or of a JSON file (a
    ModelConfig JSON or a config.json; mogelm.hf_config.read_model_file)."""
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
    if Path(model).is_file():
        from mogelm.hf_config import read_model_file

        return read_model_file(model)
    raise UserError(f"{model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory "
                    "or JSON file")


def format_count(n: int) -> str:
    """A parameter count with a unit that shows its digits: 71.989 B, 18.4 M, 226.5 K."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f} B" if unit == "B" else f"{n / scale:.1f} {unit}"
    return str(n)


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
    lines = [f"{cfg.name}: {format_count(total)} parameters, {format_count(active)} active per token"]
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


# FLOPs and the memory of a training step --------------------------------------------------------------
GIB = 2**30
H200_GIB = 140.4  # what nvidia-smi reports for an H200 (143,771 MiB)


def parameter_split(cfg: ModelConfig) -> dict:
    """Parameters by where they live under expert parallel: routed experts (sharded over EP) and
    the rest ("dense": embeddings, attention, norms, routers, shared experts, LM head)."""
    total, active = count_parameters(cfg)
    experts = 0
    if cfg.is_moe:
        experts = cfg.num_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return {"total": total, "active": active, "routed_experts": experts, "dense": total - experts}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict:
    """Model FLOPs per token (a multiply-add is 2 FLOPs):

        matmul     2 x the weights each token multiplies: q/k/v/o projections, router, its K routed
                   experts, the shared expert (or the dense FFN), the LM head (not the embedding
                   lookup, norms, biases or router_scale; tests/test_info.py checks this against
                   torch's FlopCounterMode)
        attention  per layer 2 x 2 x heads x head_dim x the keys a query sees; causal, so a
                   sequence of S tokens averages (S + 1) / 2 keys (PaLM's convention counts S:
                   twice this)
        forward = matmul + attention; training = 3 x forward (backward: 2 x forward)
        six_n      6 x active parameters, the convention of the issue's measured "model TFLOP/s"

    Activation checkpointing adds one forward of recomputation; that is not counted (model FLOPs,
    not hardware FLOPs)."""
    _, active = count_parameters(cfg)
    D, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = D * (q + 2 * kv) + q * D
    if cfg.is_moe:
        layer += D * cfg.num_experts + cfg.num_experts_per_tok * 3 * D * cfg.moe_intermediate_size
        layer += 3 * D * cfg.shared_expert_intermediate_size
    else:
        layer += 3 * D * cfg.dense_intermediate_size
    matmul = 2 * (cfg.num_layers * layer + cfg.vocab_size * D)
    keys = (seq_len + 1) / 2
    attention = cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * keys
    forward = matmul + attention
    return {"seq_len": seq_len, "matmul_forward": matmul, "attention_forward": attention,
            "forward": forward, "training": 3 * forward, "six_n": 6 * active}


def activation_bytes_per_token(cfg: ModelConfig, precision: str = "bf16", experts: str = "triton",
                               ep_size: int = 1) -> dict:
    """Bytes autograd keeps per token for the backward pass, per transformer layer and outside
    the layers, as the code stands (tests/test_info.py checks the torch path against the saved
    tensors of a CPU run, fp32 and bf16 autocast).

    precision "fp32" (CPU) or "bf16" (CUDA autocast: the matmuls and most activations in bf16, the
    residual stream, norm statistics, router softmax and expert combine in fp32). `experts`:
    "torch" (kernels/torch_impl: keeps the permuted rows and the SwiGLU intermediates) or
    "triton" (kernels/triton_moe: keeps its inputs only and recomputes in backward). Under
    expert parallel with MoGE every token's row goes to each of the EP ranks, so each rank's
    experts keep ep_size rows per local token."""
    a = 4 if precision == "fp32" else 2
    D, hd, H = cfg.hidden_size, cfg.head_dim, cfg.num_heads
    q, kv = H * hd, cfg.num_kv_heads * hd
    norm = 8 * D + 4  # input (fp32 residual), normalised input (fp32), 1/rms
    # The projections' input: one fp32 tensor, or under autocast a bf16 cast for each of q, k, v
    # (plus bf16 copies of cos and sin for q and k).
    attn = 4 * D if a == 4 else 3 * 2 * D + 8 * hd
    attn += a * (2 * q + 2 * kv) + 4 * H  # roped q and k, v, attention output; log-sum-exp (fp32)
    layer = {"norms": 2 * norm, "attention": attn}
    if cfg.is_moe:
        K, E, F, S = cfg.num_experts_per_tok, cfg.num_experts, cfg.moe_intermediate_size, \
            cfg.shared_expert_intermediate_size
        # fp32: one tensor for router, experts and shared expert; bf16: a cast shared by router and
        # routed experts, and one for each of the shared expert's gate and up projections
        inputs = 4 * D if a == 4 else (3 if S else 1) * 2 * D
        router = 4 * E + 44 * K  # fp32 probabilities; ids, weights and permutation bookkeeping
        if experts == "torch":
            routed = K * (a * D + 4 * a * F + 4 * D)  # permuted rows, SwiGLU pieces, fp32 combine
            rows = 0
        else:
            routed = 0  # the kernel keeps x (counted in inputs), weights and ids (in router) ...
            rows = (ep_size - 1) * a * D  # ... and under EP x is the ep_size rows it received
        layer.update({"moe_inputs": inputs + rows, "router": router, "routed_experts": routed,
                      "shared_expert": 4 * a * S})
    else:
        layer.update({"moe_inputs": 4 * D if a == 4 else 2 * 2 * D, "router": 0, "routed_experts": 0,
                      "shared_expert": 4 * a * cfg.dense_intermediate_size})
    outside = {
        "final_norm_and_head_input": norm + (4 * D if a == 4 else 2 * D),
        "rope_and_ids": (8 * hd if a == 4 else 0) + 16,
        "log_probs": 4 * cfg.vocab_size,  # log_softmax keeps its fp32 output
    }
    return {"layer": layer, "per_layer": sum(layer.values()), "outside": outside,
            "outside_total": sum(outside.values())}


def training_memory(cfg: ModelConfig, *, nproc: int = 1, ep: int = 1, fsdp: int = 1, batch_size: int = 1,
                    seq_len: int = 2048, optim_state: str = "fp32", precision: str = "bf16",
                    experts: str = "triton", checkpointing: bool = False) -> dict:
    """Bytes one rank needs for a training step of `batch_size` x `seq_len` tokens (a micro-batch)
    at layout nproc = world, --ep, --fsdp (mogelm.parallel.context), with AdamW moments in fp32
    or bf16. An estimate: terms and assumptions in docs/training.md ("Memory plan")."""
    split = parameter_split(cfg)
    if fsdp > 1:  # FSDP2: everything sharded over the F ranks of a group (experts E x F/E)
        local = (split["dense"] + split["routed_experts"]) / fsdp
        local_dense, local_experts = split["dense"] / fsdp, split["routed_experts"] / fsdp
    else:  # DP x EP: dense replicated, experts split over EP
        local_dense, local_experts = split["dense"], split["routed_experts"] / ep
        local = local_dense + local_experts
    moment_bytes = 8 if optim_state == "fp32" else 4
    lp = 2 if precision == "bf16" else 4
    out = {"parameters_local": local, "weights": 4 * local, "gradients": 4 * local,
           "optimizer": moment_bytes * local}
    layer_dense = (split["dense"] - 2 * cfg.vocab_size * cfg.hidden_size) / cfg.num_layers
    layer_experts = split["routed_experts"] / cfg.num_layers / ep
    if fsdp > 1:
        # Unsharded working set: one unit (a block + its EP rank's experts) all-gathered in the
        # compute dtype plus the prefetched next one; one unit's unsharded fp32 gradients and the
        # reduce-scatter input before they are sharded.
        unit = max(layer_dense + layer_experts, cfg.vocab_size * cfg.hidden_size)
        out["fsdp_buffers"] = 2 * lp * unit + 2 * 4 * unit
    else:
        # Several processes: gradient sync flattens the dense gradients into one buffer. Under
        # bf16 autocast the bf16 copies of the weights stay alive until backward.
        if nproc > 1:
            out["grad_sync_buffer"] = 4 * local_dense
        if precision == "bf16":
            out["autocast_weight_copies"] = 2 * local
    tokens = batch_size * seq_len
    act = activation_bytes_per_token(cfg, precision, experts, ep if fsdp > 1 or ep > 1 else 1)
    per_layer = tokens * act["per_layer"]
    if checkpointing:  # each block keeps its input; one block's activations exist while it recomputes
        activations = cfg.num_layers * tokens * 4 * cfg.hidden_size + per_layer
    else:
        activations = cfg.num_layers * per_layer
    out["activations"] = activations + tokens * act["outside_total"]
    # Logits in the compute dtype, their fp32 copy and the gradient at the loss (chunked CE: less).
    out["logits"] = tokens * cfg.vocab_size * (lp + 4 + (4 if lp == 2 else 0))
    out["total"] = sum(v for k, v in out.items() if k != "parameters_local")
    out["activations_per_layer"] = per_layer
    out["activations_per_layer_checkpointed"] = tokens * 4 * cfg.hidden_size
    return out


def training_plan(cfg: ModelConfig, *, nproc: int = 1, ep: int = 1, fsdp: int = 1, batch_size: int = 1,
                  seq_len: int = 2048, optim_state: str = "fp32", precision: str = "bf16",
                  experts: str = "triton") -> dict:
    """What `mogelm info --seq-len ...` prints: parameters, FLOPs per token, and the memory of a
    training step per rank with and without activation checkpointing (JSON-ready)."""
    total, active = count_parameters(cfg)
    kw = dict(nproc=nproc, ep=ep, fsdp=fsdp, batch_size=batch_size, seq_len=seq_len, optim_state=optim_state,
              precision=precision, experts=experts)
    return {
        "layout": {"nproc": nproc, "ep": ep, "fsdp": fsdp, "batch_size": batch_size, "seq_len": seq_len,
                   "optim_state": optim_state, "precision": precision, "experts": experts},
        "parameters": parameter_split(cfg),
        "flops_per_token": flops_per_token(cfg, seq_len),
        "memory_bytes": training_memory(cfg, **kw),
        "memory_bytes_checkpointed": training_memory(cfg, **kw, checkpointing=True),
    }


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def describe_plan(cfg: ModelConfig, plan: dict, device_gib: float = H200_GIB) -> str:
    """The plan as text: FLOPs per token, then a table of bytes per rank (GiB, or MiB for small
    models), without and with activation checkpointing."""
    lay, par, fl = plan["layout"], plan["parameters"], plan["flops_per_token"]
    mem, ac = plan["memory_bytes"], plan["memory_bytes_checkpointed"]
    unit, scale = ("GiB", GIB) if mem["total"] >= GIB else ("MiB", 2**20)
    lines = [
        f"parameters: {_si(par['routed_experts'])} in routed experts, {_si(par['dense'])} in the rest",
        f"FLOPs per token at sequence length {fl['seq_len']}: forward {_si(fl['forward'])} (matmul "
        f"{_si(fl['matmul_forward'])} + causal attention {_si(fl['attention_forward'])}), training "
        f"{_si(fl['training'])} (6N: {_si(fl['six_n'])})",
        f"training step, per rank: {lay['nproc']} process{'es' if lay['nproc'] > 1 else ''}, EP {lay['ep']}, "
        f"FSDP {lay['fsdp']}, micro-batch {lay['batch_size']} x {lay['seq_len']}, {lay['precision']}, AdamW "
        f"moments {lay['optim_state']}, {lay['experts']} experts",
        f"  {unit:26s}{'':>2s}{'no AC':>10s}{'AC':>10s}",
    ]
    hidden = ("total", "activations_per_layer", "activations_per_layer_checkpointed", "parameters_local")
    for key in [k for k in mem if k not in hidden]:
        lines.append(f"  {key.replace('_', ' '):28s}{mem[key] / scale:10.2f}{ac[key] / scale:10.2f}")
    lines.append(f"  {'total':28s}{mem['total'] / scale:10.2f}{ac['total'] / scale:10.2f}")
    per_layer, per_layer_ac = mem["activations_per_layer"], mem["activations_per_layer_checkpointed"]
    lines.append(f"  activations per layer: {per_layer / scale:.3f} {unit}; with activation checkpointing "
                 f"{per_layer_ac / scale:.3f} {unit} (+ one layer's while it recomputes)")
    fits = [("without", mem["total"]), ("with", ac["total"])]
    verdict = "; ".join(f"{'fits' if t <= device_gib * GIB else 'does not fit'} {how} activation "
                        f"checkpointing" for how, t in fits)
    lines.append(f"  on a {device_gib:.1f} GiB device: {verdict}")
    return "\n".join(lines)
