"""ParallelContext: data parallel, FSDP2 and expert parallel on a DeviceMesh, for the training loop.

Launch with torchrun (`mogelm train --nproc N --ep E [--fsdp F]` does it for you):

    torchrun --standalone --nproc-per-node 4 -m mogelm train --preset debug --ep 2 --fsdp 4

and inside each process:

    ctx = init_parallel(ep_size=2, fsdp_size=4, device="cpu")   # gloo on CPU, NCCL on CUDA
    model = ctx.parallelize(model)                       # before building the optimizer
    loss(model(batch[ctx.rank::...])).backward()         # each rank: its slice of the global batch
    ctx.sync_gradients(model); ctx.clip_grad_norm(model, 1.0); opt.step()

Two layouts of a world of W ranks, both with EP groups of E consecutive ranks (EP rank r holds
expert groups [r*M/E, (r+1)*M/E)) and every rank reading its own slice of the global batch:

  --fsdp 1 (DP x EP)  mesh ("dp", "ep") = (W/E, E). Dense parameters replicated on every rank and
                      averaged over all W ranks after backward (sync_gradients); expert shards
                      replicated over the W/E ranks holding the same shard.
  --fsdp F > 1        torchtitan's layout (mogelm.parallel.fsdp): dense parameters sharded by FSDP2
                      over F ranks (HSDP: replicated over W/F such groups); experts sharded over
                      EP and by FSDP2 over the F/E ranks left in the FSDP group. E must divide F
                      (EP borrows its ranks from the FSDP dimension). FSDP2 reduces gradients
                      during backward; sync_gradients has nothing left to do.

In both, gradients are divided by W, because each rank's loss is the mean over its own 1/W of the
global batch, so the result equals the gradient of the global-batch mean loss in one process
(tests/test_parallel.py and tests/test_fsdp.py check this).

Failures: every collective has the timeout given here (default 300 s, env MOGELM_DIST_TIMEOUT);
a dead peer or disagreeing ranks end each rank with a CollectiveError naming the cause; a layout
that does not divide the world or the expert groups is refused before any collective
(validate_layout, validate_ep).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os

import torch
import torch.distributed as dist
from torch import nn

from mogelm.moe.routing import batch_aux_loss_from_counts
from mogelm.parallel.dispatchers import CollectiveError, _run, all_gather_tensor
from mogelm.parallel.expert_parallel import apply_expert_parallel, is_expert_sharded, validate_ep

DEFAULT_TIMEOUT_S = 300.0


def validate_layout(world_size: int, ep_size: int, fsdp_size: int = 1) -> None:
    """Refuse a parallel layout that cannot be built, before any collective (pure, so every rank
    raises alike). The model-dependent checks (EP vs expert groups) are validate_ep's."""
    if ep_size < 1 or fsdp_size < 1:
        raise ValueError(f"--ep ({ep_size}) and --fsdp ({fsdp_size}) must be >= 1")
    if world_size % ep_size:
        raise ValueError(f"EP size {ep_size} must divide the world size {world_size} (DP = world / EP)")
    if world_size % fsdp_size:
        raise ValueError(f"FSDP size {fsdp_size} must divide the world size {world_size} "
                         f"(the rest, world / FSDP, replicates: HSDP)")
    if fsdp_size > 1 and fsdp_size % ep_size:
        raise ValueError(f"EP size {ep_size} must divide the FSDP size {fsdp_size}: expert parallel borrows "
                         f"its ranks from the FSDP dimension (e.g. --fsdp {world_size}, or --fsdp 1 for "
                         "replicated dense weights)")


class ParallelContext:
    """Device meshes, process groups and the gradient/metric collectives the training loop needs."""

    def __init__(self, ep_size: int, device: torch.device, dispatcher: str = "auto", fsdp_size: int = 1,
                 mp_policy="default", comm_timer=None, init_draws_on: str = "cpu"):
        world = dist.get_world_size()
        validate_layout(world, ep_size, fsdp_size)
        self.rank = dist.get_rank()
        self.world_size = world
        self.is_main = self.rank == 0
        self.ep_size, self.fsdp_size = ep_size, fsdp_size
        self.dp_size = world // ep_size  # ranks holding the same expert shard
        self.ep_rank = self.rank % ep_size
        self.device = torch.device(device)
        self.dispatcher = dispatcher
        self.comm_timer = comm_timer  # begin(what)/end(what) around the dispatchers' collectives
        # Where a meta-built model's initial weights are drawn: "cpu" (a one-process build's
        # weights, exactly) or "device" (fast; benchmarks).
        self.init_draws_on = init_draws_on
        self._mp_policy = mp_policy
        self._check_agreement()  # before creating subgroups: disagreeing ranks would create different ones
        # Every rank creates every mesh (and so every group), in the same order.
        from torch.distributed.device_mesh import init_device_mesh

        if fsdp_size == 1:
            self.mesh = init_device_mesh(self.device.type, (world // ep_size, ep_size),
                                         mesh_dim_names=("dp", "ep"))
            self.ep_group = self.mesh.get_group("ep")
            self.expert_dp_group = self.mesh.get_group("dp")
            self.dense_mesh = self.expert_mesh = None
        else:
            from mogelm.parallel.fsdp import mesh_layout

            layout = mesh_layout(world, ep_size, fsdp_size)
            names, shape = layout["dense"]
            self.dense_mesh = init_device_mesh(self.device.type, shape, mesh_dim_names=names)
            names, shape = layout["experts"]
            self.expert_mesh = init_device_mesh(self.device.type, shape, mesh_dim_names=names)
            self.mesh = self.expert_mesh
            self.ep_group = self.expert_mesh.get_group("ep")
            self.expert_dp_group = None  # FSDP2 reduces expert gradients itself
            self.fsdp_group = self.dense_mesh.get_group("fsdp")

    @property
    def layout(self) -> str:
        """E.g. 'FSDP 4 x EP 2 (DP 1)' or 'DP 2 x EP 2'."""
        if self.fsdp_size == 1:
            return f"DP {self.dp_size} x EP {self.ep_size}"
        replicas = self.world_size // self.fsdp_size
        hsdp = f" x {replicas} HSDP replicas" if replicas > 1 else ""
        return f"FSDP {self.fsdp_size} x EP {self.ep_size}{hsdp}"

    def _check_agreement(self, fingerprint: str = "") -> None:
        """All ranks must agree on world size, EP and FSDP sizes and (optionally) a config fingerprint."""
        digest = int(hashlib.sha1(fingerprint.encode()).hexdigest()[:12], 16) if fingerprint else 0
        mine = torch.tensor([self.world_size, self.ep_size, self.fsdp_size, digest], dtype=torch.int64,
                            device=self.device)
        every = torch.empty(self.world_size * 4, dtype=torch.int64, device=self.device)
        _run(lambda: all_gather_tensor(every, mine), "agreement check", None)
        rows = every.view(self.world_size, 4).tolist()
        if any(r != rows[0] for r in rows):
            raise CollectiveError(
                "ranks disagree on the parallel setup (world size, EP size, FSDP size, model config "
                f"fingerprint) per rank: {rows}; launch every rank with the same --nproc, --ep, --fsdp and "
                "model config"
            )

    # --- model -----------------------------------------------------------------------------------
    @property
    def builds_on_meta(self) -> bool:
        """Should the model be built on the meta device (FSDP layout: it may not fit whole)?"""
        return self.fsdp_size > 1

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Move to the device, make every rank hold rank 0's weights, shard the experts over EP,
        then (FSDP layout) wrap the model in FSDP2 units. A model on the meta device (FSDP layout
        only) is sharded first and then materialised with one process's initial weights
        (mogelm.parallel.fsdp.materialize_sharded): build it with the seed set and call this next."""
        cfg = getattr(model, "cfg", None)
        if cfg is not None:
            validate_ep(cfg, self.ep_size)
            self._check_agreement(json.dumps(cfg.to_dict(), sort_keys=True, default=str))
        on_meta = any(p.is_meta for p in model.parameters())
        if on_meta and self.fsdp_size == 1:
            raise ValueError("a model on the meta device needs the FSDP layout (fsdp_size > 1)")
        if not on_meta:
            model.to(self.device)
            with torch.no_grad():
                for t in list(model.parameters()) + list(model.buffers()):
                    _run(lambda t=t: dist.broadcast(t.data, src=0), "weight broadcast", None)
        if self.world_size > 1:
            for layer in getattr(model, "moe_layers", list)():
                layer.register_forward_hook(_global_batch_stats)
        model = apply_expert_parallel(model, self.ep_group, self.dispatcher, self.comm_timer)
        if self.fsdp_size > 1:
            from mogelm.parallel.fsdp import apply_fsdp, default_mp_policy

            mp = default_mp_policy(self.device) if self._mp_policy == "default" else self._mp_policy
            dense = self.dense_mesh if self.dense_mesh.size(0) > 1 else self.dense_mesh["fsdp"]
            experts = (self.expert_mesh["dp", "efsdp"] if self.expert_mesh.size(0) > 1
                       else self.expert_mesh["efsdp"])
            model = apply_fsdp(model, dense, experts, self.ep_size, mp)
            if on_meta:
                from mogelm.parallel.fsdp import materialize_sharded

                draw = self.device if self.init_draws_on == "device" else "cpu"
                model = materialize_sharded(model, self.device, draw)
        return model

    def _grads(self, model: nn.Module, expert: bool) -> list[torch.Tensor]:
        out = []
        for p in model.parameters():
            if p.requires_grad and is_expert_sharded(p) == expert:
                if p.grad is None:  # unused on this rank this step: contribute zeros
                    p.grad = torch.zeros_like(p)
                out.append(p.grad)
        return out

    @torch.no_grad()
    def sync_gradients(self, model: nn.Module) -> None:
        """Average gradients (see the module docstring): call after backward, before clipping.
        Under FSDP2 the gradients were reduce-scattered during backward: nothing to do."""
        if self.fsdp_size > 1:
            return
        for grads, group, size in (
            (self._grads(model, expert=False), None, self.world_size),
            (self._grads(model, expert=True), self.expert_dp_group, self.dp_size),
        ):
            if not grads:
                continue
            flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for all of them
            if size > 1:
                _run(lambda flat=flat, group=group: dist.all_reduce(flat, group=group), "gradient all_reduce",
                     group)
            flat.div_(self.world_size)
            for g, synced in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(synced.view_as(g))

    @torch.no_grad()
    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip to a global L2 norm over the whole (sharded) model; returns the norm before clipping."""
        if self.fsdp_size > 1:
            return self._clip_sharded(model, max_norm)
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        expert_sq = torch.zeros((), dtype=torch.float32, device=self.device)
        params = [p for p in model.parameters() if p.grad is not None]
        for p in params:
            s = p.grad.float().pow(2).sum()
            if is_expert_sharded(p):
                expert_sq += s
            else:
                sq += s
        if self.ep_size > 1:  # replicated grads are equal everywhere; expert shards add up over EP
            _run(lambda: dist.all_reduce(expert_sq, group=self.ep_group), "grad-norm all_reduce",
                 self.ep_group)
        total = math.sqrt((sq + expert_sq).item())
        if max_norm > 0 and total > max_norm:
            coef = max_norm / (total + 1e-6)
            for p in params:
                p.grad.mul_(coef)
        return total

    def _clip_sharded(self, model: nn.Module, max_norm: float) -> float:
        """FSDP layout: the F ranks of one FSDP group hold one whole copy of every gradient (dense
        in F slices, experts in E x F/E), so the squared norm is one sum over that group."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for g in local:
            sq += g.float().pow(2).sum()
        _run(lambda: dist.all_reduce(sq, group=self.fsdp_group), "grad-norm all_reduce", self.fsdp_group)
        total = math.sqrt(sq.item())
        if max_norm > 0 and total > max_norm:
            coef = max_norm / (total + 1e-6)
            for g in local:
                g.mul_(coef)
        return total

    # --- metrics and control ---------------------------------------------------------------------
    def all_reduce_mean(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        _run(lambda: dist.all_reduce(t), "metric all_reduce", None)
        return t.item() / self.world_size

    def barrier(self) -> None:
        _run(lambda: dist.barrier(), "barrier", None)

    def destroy(self) -> None:
        """Leave the process group (at the end of a run, on every rank)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def _global_batch_stats(layer, args, output):
    """Forward hook (training only) that makes a MoGELayer's load statistics global-batch ones:
    counts_E all-reduced over every rank, and the batch-level aux loss (paper Eq. 8) rebuilt by
    the layer's own function, batch_aux_loss_from_counts, as alpha * sum_i f_i(global counts, global
    T) * p_i(this rank's tokens). Averaged over ranks (as gradients
    are) that is exactly the one-process aux loss of the global batch, and the aux-loss-free bias
    update sees the same counts on every rank. Costs one [E] all-reduce."""
    if not layer.training:
        return None
    y, stats = output
    counts_E = stats.counts_E.clone()
    _run(lambda: dist.all_reduce(counts_E), "load-count all_reduce", None)
    cfg, aux = layer.cfg, stats.aux_loss
    if cfg.aux_loss_type == "batch" and cfg.aux_loss_alpha > 0:
        T, K = stats.expert_ids_TK.shape
        global_tokens = T * dist.get_world_size()
        aux = cfg.aux_loss_alpha * batch_aux_loss_from_counts(counts_E, stats.probs_mean_E, global_tokens, K)
    return y, stats._replace(counts_E=counts_E, aux_loss=aux)


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> cuda:LOCAL_RANK when CUDA is available, else cpu; "cuda" -> cuda:LOCAL_RANK."""
    local_rank = _env_int("LOCAL_RANK") or 0
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _check_world_size(rank: int, world: int, timeout_s: float):
    """Outside torchrun (which sets WORLD_SIZE itself), ranks started by hand may disagree on
    WORLD_SIZE; the process-group rendezvous would then stall in transport timeouts. Each rank
    publishes its WORLD_SIZE in the TCP store first and compares with the others, so every rank
    ends at once (or, for a missing rank, within the timeout) with a message. Returns the store
    to build the process group on, or None under torchrun."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or "MASTER_ADDR" not in os.environ:
        return None
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=rank == 0,
                          timeout=timeout, wait_for_workers=False)
    store.set(f"mogelm/world_size/{rank}", str(world))
    problem = None
    for other in range(world):
        try:
            theirs = int(store.get(f"mogelm/world_size/{other}"))  # waits up to the timeout
        except Exception as e:
            problem = CollectiveError(
                f"rank {rank}: rank {other} of {world} did not join within {timeout_s:.0f} s (did it start, "
                f"with the same MASTER_ADDR/PORT?): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            )
            break
        if theirs != world:
            problem = CollectiveError(
                f"rank {rank}: WORLD_SIZE mismatch: this rank has {world}, rank {other} has {theirs}; "
                "start every rank with the same world size"
            )
            break
    store.set(f"mogelm/checked/{rank}", "1")
    if rank == 0 and problem is not None:
        # Rank 0 hosts the store: leaving now would cut off peers still reading it, and they would
        # report a dropped connection instead of the mismatch. Give them a moment to finish.
        others = [f"mogelm/checked/{r}" for r in range(1, world)]
        try:
            store.wait(others, datetime.timedelta(seconds=min(10.0, timeout_s)))
        except Exception:
            pass
    if problem is not None:
        raise problem
    return store


def init_parallel(
    ep_size: int = 1,
    device: str | torch.device | None = None,
    dispatcher: str = "auto",
    timeout_s: float | None = None,
    backend: str | None = None,
    fsdp_size: int = 1,
) -> ParallelContext:
    """Join the torchrun job (env RANK/WORLD_SIZE/MASTER_ADDR) and build the ParallelContext."""
    world = _env_int("WORLD_SIZE")
    if world is None or _env_int("RANK") is None:
        raise RuntimeError("init_parallel needs the torchrun environment (RANK, WORLD_SIZE); "
                           "launch with torchrun")
    validate_layout(world, ep_size, fsdp_size)
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    timeout_s = timeout_s or float(os.environ.get("MOGELM_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not dist.is_initialized():
        rank = _env_int("RANK")
        store = _check_world_size(rank, world, timeout_s)
        try:
            if store is None:
                dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
            else:
                dist.init_process_group(
                    backend, store=store, rank=rank, world_size=world,
                    timeout=datetime.timedelta(seconds=timeout_s)
                )
        except Exception as e:
            raise CollectiveError(
                f"could not join the process group as rank {os.environ.get('RANK')} of {world} within "
                f"{timeout_s:.0f} s: a rank is missing or ranks disagree on WORLD_SIZE ({e})"
            ) from e
    return ParallelContext(ep_size, dev, dispatcher, fsdp_size)
