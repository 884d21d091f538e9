"""Expert parallel x data parallel on CPU with 2 gloo ranks, compared to one process (STYLE.md 7).

Spawning a process group costs seconds, so each spawned function runs many checks on one group.
Ranks write their findings to files; the test asserts in the parent and prints every failure.

    .venv/bin/pytest tests/test_parallel.py -q       # about a minute on 2 idle cores
"""

from __future__ import annotations

import copy
import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

pytestmark = pytest.mark.distributed

TOL = 1e-5


# Harness ---------------------------------------------------------------------------------------------
def _entry(fn, rank, world, tmp, args):
    torch.set_num_threads(1)
    errors: list[str] = []
    try:
        fn(rank, world, tmp, errors, *args)
    except Exception:  # noqa: BLE001 - reported to the parent
        errors.append(f"rank {rank} raised:\n{traceback.format_exc()}")
    torch.save(errors, os.path.join(tmp, f"errors{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


def _spawn(fn, tmp, world=2, timeout=240, args=()):
    """Run fn(rank, world, tmp, errors, *args) in `world` processes; return {rank: errors}."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, r, world, str(tmp), args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(1.0, deadline - time.time()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} still running after {timeout} s"
    out = {}
    for r in range(world):
        f = os.path.join(tmp, f"errors{r}.pt")
        out[r] = (torch.load(f) if os.path.exists(f)
                  else [f"rank {r} wrote no result (exit code {procs[r].exitcode})"])
    return out


def _init(rank, world, tmp, timeout_s=60.0):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _check(errors, what, actual, expected, tol=TOL):
    """Max abs difference within tol * (1 + max |expected|) (relative for large values)."""
    diff = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    if actual.shape != expected.shape or not diff <= tol * (1 + scale):
        errors.append(f"rank {dist.get_rank()}: {what}: shape {tuple(actual.shape)} "
                      f"vs {tuple(expected.shape)}, max abs diff {diff:.3e}")


def _assert_clean(results):
    problems = [e for errs in results.values() for e in errs]
    assert not problems, "\n".join(problems)


# Dispatchers against one process ---------------------------------------------------------------------
def _dispatcher_cases(rank, world, errors):
    from mogelm.kernels import ops
    from mogelm.parallel.dispatchers import make_dispatcher

    E, D, F_, K, M, T = 8, 16, 8, 4, 4, 6  # 8 experts in 4 groups, 4 per token, 6 tokens per rank
    g = torch.Generator().manual_seed(7)
    gate_up = torch.randn(E, 2 * F_, D, generator=g, dtype=torch.float64)
    down = torch.randn(E, D, F_, generator=g, dtype=torch.float64)
    E_loc = E // world

    def moge_ids(n, skew=False):
        # one expert per group (K' = 1); skew: always the first expert of each group
        local = torch.zeros(n, M, dtype=torch.long) if skew else torch.randint(0, E // M, (n, M), generator=g)
        return local + torch.arange(M) * (E // M)

    def topk_ids(n, only_rank0=False):
        pool = E_loc if only_rank0 else E
        return (torch.stack([torch.randperm(pool, generator=g)[:K] for _ in range(n)]) if n
                else torch.zeros(0, K, dtype=torch.long))

    cases = [
        ("moge_a2a", "moge", moge_ids(world * T), T),
        ("moge_agrs", "moge", moge_ids(world * T), T),
        ("moge_a2a", "moge", moge_ids(world * T, skew=True), T),  # most experts get no row
        ("topk_a2a", "moge", moge_ids(world * T), T),  # the general dispatcher on MoGE routing
        ("topk_a2a", "topk", topk_ids(world * T), T),
        ("topk_a2a", "topk", topk_ids(world * T, only_rank0=True), T),  # rank 1's experts: zero rows
    ]
    for kind, routing, ids_all, t in cases:
        x_all = torch.randn(world * t, D, generator=g, dtype=torch.float64)
        w_all = torch.rand(world * t, K, generator=g, dtype=torch.float64)
        dy_all = torch.randn(world * t, D, generator=g, dtype=torch.float64)
        # one process: every token, every expert
        ref = [x_all.clone().requires_grad_(), w_all.clone().requires_grad_(),
               gate_up.clone().requires_grad_(), down.clone().requires_grad_()]
        y_ref = ops.routed_experts(ref[0], ref[1], ids_all, ref[2], ref[3])
        (y_ref * dy_all).sum().backward()
        # EP: this rank's tokens and experts
        rows, exp = slice(rank * t, (rank + 1) * t), slice(rank * E_loc, (rank + 1) * E_loc)
        x, w = x_all[rows].clone().requires_grad_(), w_all[rows].clone().requires_grad_()
        gu, dn = gate_up[exp].clone().requires_grad_(), down[exp].clone().requires_grad_()
        disp = make_dispatcher(kind, dist.group.WORLD, E, K, routing)
        x_R, w_R, ids_R, c = disp.dispatch(x, w, ids_all[rows])
        assert ids_R.numel() == 0 or (ids_R.min() >= 0 and ids_R.max() < E_loc), "local ids out of range"
        y = disp.combine(ops.routed_experts(x_R, w_R, ids_R, gu, dn), c)
        (y * dy_all[rows]).sum().backward()
        name = f"{kind}/{routing}/{'skewed' if ids_all is not None and ids_all.max() < E_loc else 'random'}"
        _check(errors, f"{name} y", y.detach(), y_ref.detach()[rows], 1e-9)
        _check(errors, f"{name} dx", x.grad, ref[0].grad[rows], 1e-9)
        _check(errors, f"{name} dweights", w.grad, ref[1].grad[rows], 1e-9)
        _check(errors, f"{name} dgate_up", gu.grad, ref[2].grad[exp], 1e-9)
        _check(errors, f"{name} ddown", dn.grad, ref[3].grad[exp], 1e-9)

    # Top-k with no tokens at all on one rank (e.g. an empty decode slot).
    t_by_rank = [5, 0]
    ids_all = topk_ids(5)
    x_all = torch.randn(5, D, generator=g, dtype=torch.float64)
    w_all = torch.rand(5, K, generator=g, dtype=torch.float64)
    y_ref = ops.routed_experts(x_all, w_all, ids_all, gate_up, down)
    rows = slice(0, 5) if rank == 0 else slice(5, 5)
    disp = make_dispatcher("topk_a2a", dist.group.WORLD, E, K, "topk")
    exp = slice(rank * E_loc, (rank + 1) * E_loc)
    x_R, w_R, ids_R, c = disp.dispatch(x_all[rows], w_all[rows], ids_all[rows])
    y = disp.combine(ops.routed_experts(x_R, w_R, ids_R, gate_up[exp], down[exp]), c)
    _check(errors, f"topk_a2a empty rank (tokens {t_by_rank}) y", y, y_ref[rows], 1e-9)


def _main_worker(rank, world, tmp, errors, single_ckpt):
    _init(rank, world, tmp)
    _dispatcher_cases(rank, world, errors)
    _training_equality(rank, world, tmp, errors)
    _checkpoint_cases(rank, world, tmp, errors, single_ckpt)
    _mismatch_cases(rank, world, errors)


# Training: EP=2 x 20 steps == one process on the global batch ------------------------------------------
def _debug_cfg(**kw):
    from mogelm.config import from_name

    return from_name("debug", **kw)


def _model(cfg, seed=0):
    from mogelm.model import Transformer

    torch.manual_seed(seed)
    return Transformer(cfg)


def _loss(model, ids_BT):
    out = model(ids_BT[:, :-1], return_stats=True)
    ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), ids_BT[:, 1:].reshape(-1))
    return ce, out.aux_loss


def _grads_match(errors, what, ep_model, ref_model, tol):
    from mogelm.parallel.expert_parallel import shard_info

    ref = dict(ref_model.named_parameters())
    for name, p in ep_model.named_parameters():
        r = ref[name].grad
        info = shard_info(p)
        if info is not None:
            ep_rank, ep_size, E = info
            r = r[ep_rank * (E // ep_size) : (ep_rank + 1) * (E // ep_size)]
        _check(errors, f"{what} grad {name}", p.grad, r, tol)


EQUALITY_CASES = (  # routing, dispatcher, EP size (None: every rank), steps
    ("moge", "moge_a2a", None, 20), ("moge", "moge_agrs", None, 5), ("topk", "topk_a2a", None, 5),
    ("moge", "auto", 1, 5),  # pure data parallel
)


def _training_equality(rank, world, tmp, errors, cases=EQUALITY_CASES, cfg_overrides=None):
    from mogelm.parallel.context import ParallelContext

    _save_state = None
    for routing, dispatcher, ep_size, steps_here in cases:
        # The debug preset as is: batch-level aux loss (alpha 1e-3) included in the loss; the
        # global-batch statistics hook of ParallelContext makes it the one-process value.
        cfg = _debug_cfg(routing=routing, **(cfg_overrides or {}))
        ep_size = ep_size or world
        dispatcher_name = f"{dispatcher} EP={ep_size} DP={world // ep_size}"
        ctx = ParallelContext(ep_size=ep_size, device=torch.device("cpu"), dispatcher=dispatcher)
        ref = _model(cfg, seed=0)  # the one-process model, the same on every rank
        # rank 1 starts from other weights: parallelize must broadcast rank 0's before sharding
        ep = ctx.parallelize(copy.deepcopy(ref) if rank == 0 else _model(cfg, seed=99))
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
        opt_ep = torch.optim.AdamW(ep.parameters(), lr=3e-3, weight_decay=0.1)
        g = torch.Generator().manual_seed(123)
        worst = 0.0
        for step in range(steps_here):
            batch = torch.randint(0, cfg.vocab_size, (2 * world, 17), generator=g)
            ce, aux = _loss(ref, batch)
            (ce + aux).backward()
            norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0).item()
            ce_ep, aux_ep = _loss(ep, batch[2 * rank : 2 * rank + 2])
            (ce_ep + aux_ep).backward()
            ctx.sync_gradients(ep)
            loss_ep = ctx.all_reduce_mean((ce_ep + aux_ep).item())
            norm_ep = ctx.clip_grad_norm(ep, 1.0)
            if step == 0:
                _grads_match(errors, f"{routing}/{dispatcher_name} step 1 (clipped)", ep, ref, 1e-6)
                if abs(norm_ep - norm_ref) > 1e-5 * max(1.0, norm_ref):
                    errors.append(f"{dispatcher_name}: grad norm {norm_ep} vs {norm_ref}")
            worst = max(worst, abs(loss_ep - (ce + aux).item()))
            opt_ref.step()
            opt_ep.step()
            opt_ref.zero_grad()
            opt_ep.zero_grad()
        with open(os.path.join(tmp, "worst.txt"), "a") as f:
            f.write(f"rank {rank} {routing}/{dispatcher_name}: max |loss diff| {worst:.2e} "
                    f"over {steps_here} steps\n")
        if worst > TOL:
            errors.append(f"{routing}/{dispatcher_name}: losses differ by up to {worst:.3e} "
                          f"over {steps_here} steps")
        if dispatcher == "moge_a2a" and _save_state is None:
            _save_state = (ep, opt_ep, ref, opt_ref, ctx)
    _checkpoint_state.clear()
    _checkpoint_state.extend(_save_state or ())


_checkpoint_state: list = []


# Checkpoints: save at EP=2, reload at DP=2/EP=1, in one process, and one-process -> EP=2 ----------------
def _checkpoint_cases(rank, world, tmp, errors, single_ckpt):
    from mogelm.parallel.checkpoint import load_distributed, save_distributed
    from mogelm.parallel.context import ParallelContext
    from mogelm.parallel.expert_parallel import shard_info

    ep, opt_ep, _, _, _ = _checkpoint_state
    path = os.path.join(tmp, "ckpt_ep2")
    save_distributed(path, ep, opt_ep, extra={"step": 20})
    # What any reader must get back: the EP model's state with expert shards gathered.
    names = {id(p): n for n, p in ep.named_parameters()}
    want, want_opt = {}, {}

    def gathered(p, t):
        if shard_info(p) is None:
            return t.detach().clone()
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.detach().contiguous())
        return torch.cat(parts)

    for p in ep.parameters():
        want[names[id(p)]] = gathered(p, p.data)
        want_opt[names[id(p)]] = {k: gathered(p, opt_ep.state[p][k]) for k in ("exp_avg", "exp_avg_sq")}
    if rank == 0:
        torch.save({"model": want, "opt": want_opt}, os.path.join(tmp, "ep_state.pt"))

    # Reload at another layout: DP=2, EP=1 (every rank holds every expert).
    cfg = ep.cfg
    ctx1 = ParallelContext(ep_size=1, device=torch.device("cpu"))
    dp = ctx1.parallelize(_model(cfg, seed=5))
    opt_dp = torch.optim.AdamW(dp.parameters(), lr=3e-3, weight_decay=0.1)
    extra = load_distributed(path, dp, opt_dp)
    if extra != {"step": 20}:
        errors.append(f"extra came back as {extra}")
    for name, p in dp.named_parameters():
        _check(errors, f"reload DP=2/EP=1 {name}", p.data, want[name], 0)
        for k in ("exp_avg", "exp_avg_sq"):
            _check(errors, f"reload DP=2/EP=1 optim {name}.{k}", opt_dp.state[p][k], want_opt[name][k], 0)

    # The `mogelm train` directory: DCP shards + full Pangu-layout model + one-process trainer state.
    from mogelm.train.context import DistributedContext

    ctx2 = DistributedContext(_checkpoint_state[4])
    train_dir = os.path.join(tmp, "train_ckpt")
    ctx2.save_checkpoint(train_dir, ep, opt_ep, {"step": 20, "seed": 0}, None)
    again = ctx2.parallelize(_model(cfg, seed=13))
    opt_again = torch.optim.AdamW(again.parameters(), lr=1e-3)
    if ctx2.load_checkpoint(train_dir, again, opt_again) != {"step": 20, "seed": 0}:
        errors.append("training checkpoint state did not come back")
    for (name, p), q in zip(ep.named_parameters(), again.parameters()):
        _check(errors, f"train checkpoint reload {name}", q.data, p.data, 0)
        _check(errors, f"train checkpoint reload optim {name}", opt_again.state[q]["exp_avg"],
               opt_ep.state[p]["exp_avg"], 0)

    # A single-process checkpoint (written by the parent) into EP=2 shards.
    if single_ckpt:
        from mogelm.parallel.context import ParallelContext as PC

        ctx2 = PC(ep_size=world, device=torch.device("cpu"))
        sharded = ctx2.parallelize(_model(cfg, seed=9))
        opt_s = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
        load_distributed(single_ckpt, sharded, opt_s)
        full = torch.load(single_ckpt + ".ref.pt")
        for name, p in sharded.named_parameters():
            want = full["model"][name]
            info = shard_info(p)
            if info is not None:
                r, P, E = info
                want = want[r * (E // P) : (r + 1) * (E // P)]
            _check(errors, f"single->EP=2 {name}", p.data, want, 0)


# Disagreeing ranks and bad EP sizes: clear errors, no hang ------------------------------------------
def _mismatch_cases(rank, world, errors):
    from mogelm.parallel.context import ParallelContext
    from mogelm.parallel.dispatchers import CollectiveError
    from mogelm.parallel.expert_parallel import apply_expert_parallel

    try:
        ParallelContext(ep_size=world if rank == 0 else 1, device=torch.device("cpu"))
        errors.append(f"rank {rank}: ranks with different EP sizes were accepted")
    except CollectiveError as e:
        if "disagree" not in str(e):
            errors.append(f"rank {rank}: unclear message: {e}")
    try:  # one expert group cannot be split over 2 ranks: refused before any collective
        apply_expert_parallel(_model(_debug_cfg(num_groups=1, num_experts_per_tok=1)), dist.group.WORLD)
        errors.append("EP=2 over one expert group was accepted")
    except ValueError as e:
        if "does not divide num_groups" not in str(e):
            errors.append(f"unclear message: {e}")


@pytest.fixture(scope="module")
def single_process_checkpoint(tmp_path_factory):
    """A checkpoint written by one process (no torch.distributed) after one optimizer step."""
    from mogelm.parallel.checkpoint import save_distributed

    d = tmp_path_factory.mktemp("single")
    torch.manual_seed(3)
    model = _model(_debug_cfg(), seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ce, aux = _loss(model, torch.randint(0, 512, (2, 9)))
    (ce + aux).backward()
    opt.step()
    path = str(d / "ckpt")
    save_distributed(path, model, opt, extra={"step": 1})
    torch.save({"model": {k: v.clone() for k, v in model.state_dict().items()}}, path + ".ref.pt")
    return path


def test_ep2_equals_one_process(tmp_path, single_process_checkpoint):
    """Dispatchers (fwd+grads, zero-row experts and ranks), 20 training steps, checkpoints, errors."""
    results = _spawn(_main_worker, tmp_path, args=(single_process_checkpoint,))
    _assert_clean(results)
    # The EP=2 checkpoint also loads into one process without torch.distributed.
    from mogelm.parallel.checkpoint import load_distributed

    want = torch.load(tmp_path / "ep_state.pt")
    model = _model(_debug_cfg(), seed=11)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    assert load_distributed(str(tmp_path / "ckpt_ep2"), model, opt) == {"step": 20}
    for name, p in model.named_parameters():
        assert torch.equal(p.data, want["model"][name]), name
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k], want["opt"][name][k]), (name, k)
    assert opt.param_groups[0]["lr"] == 3e-3
    # ... and so does the training directory, through the ordinary one-process readers.
    from mogelm.checkpoint import from_pretrained

    full = from_pretrained(tmp_path / "train_ckpt")
    state = torch.load(tmp_path / "train_ckpt" / "trainer_state.pt", weights_only=False)
    opt_full = torch.optim.AdamW(full.parameters(), lr=3e-3, weight_decay=0.1)
    opt_full.load_state_dict(state["optimizer"])
    assert state["step"] == 20
    for name, p in full.named_parameters():
        assert torch.equal(p.data, want["model"][name]), name
        assert torch.equal(opt_full.state[p]["exp_avg"], want["opt"][name]["exp_avg"]), name


# Eight ranks, EP=8: one MoGE group per rank, the paper's layout (issue 8's CPU stand-in) ------------
def _eight_rank_worker(rank, world, tmp, errors):
    _init(rank, world, tmp, timeout_s=120.0)
    cases = (("moge", "moge_a2a", 8, 3), ("moge", "moge_agrs", 8, 2), ("topk", "topk_a2a", 8, 2))
    # 16 experts in 8 groups, one per group per token (K' = 1, K = 8): group g lives on rank g.
    _training_equality(rank, world, tmp, errors, cases=cases,
                       cfg_overrides=dict(num_experts=16, num_groups=8, num_experts_per_tok=8))


def test_ep8_one_group_per_rank_on_eight_gloo_ranks(tmp_path):
    _assert_clean(_spawn(_eight_rank_worker, tmp_path, world=8, timeout=600))


# Four ranks: EP=2 x DP=2 (expert shards replicated over data-parallel pairs) -----------------------
def _four_rank_worker(rank, world, tmp, errors):
    from mogelm.parallel.checkpoint import save_distributed

    _init(rank, world, tmp)
    _training_equality(rank, world, tmp, errors,
                       cases=(("moge", "moge_a2a", 2, 3), ("topk", "topk_a2a", 2, 2)))
    ep, opt_ep, ref, _, _ = _checkpoint_state
    save_distributed(os.path.join(tmp, "ckpt_4"), ep, opt_ep, extra={"step": 3})
    if rank == 0:
        torch.save({k: v.clone() for k, v in ref.state_dict().items()}, os.path.join(tmp, "ref4.pt"))


def test_ep2_x_dp2_on_four_ranks(tmp_path):
    _assert_clean(_spawn(_four_rank_worker, tmp_path, world=4))
    from mogelm.parallel.checkpoint import load_distributed

    model = _model(_debug_cfg(), seed=21)
    assert load_distributed(str(tmp_path / "ckpt_4"), model) == {"step": 3}
    ref = torch.load(tmp_path / "ref4.pt")
    # The 4-rank run and one process after 3 AdamW steps (lr 3e-3): Adam normalises gradients, so
    # a 1e-7 gradient difference on a near-zero entry can move a weight by ~1e-5; 1e-4 is 3 % of a step.
    for name, t in model.state_dict().items():
        assert (t - ref[name]).abs().max() < 1e-4, name


# One process: LocalContext, the world-size-1 context of the training loop ----------------------------
def test_local_context_is_the_plain_one_process_path():
    """No collectives, and clipping is torch's clip_grad_norm_ bit for bit (the loop's numerics in
    one process; tests/test_train.py checks a whole run)."""
    from mogelm.train.context import LocalContext

    ctx = LocalContext("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.device) == (0, 1, True, torch.device("cpu"))
    model = _model(_debug_cfg(), seed=1)
    ref = copy.deepcopy(model)
    assert ctx.parallelize(model) is model
    batch = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(4))
    for m in (model, ref):
        ce, aux = _loss(m, batch)
        (100 * (ce + aux)).backward()  # large gradients: clipping has to scale them
    ctx.sync_gradients(model)
    norm = ctx.clip_grad_norm(model, 1.0)
    assert norm == float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)) and norm > 1.0
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert ctx.all_reduce_mean(0.1234) == 0.1234
    ctx.barrier()
    ctx.destroy()
    assert not dist.is_initialized()


# Failure behaviour -------------------------------------------------------------------------------------
def _dead_peer_worker(rank, world, tmp, errors):
    from mogelm.parallel.dispatchers import CollectiveError, make_dispatcher

    _init(rank, world, tmp, timeout_s=20.0)
    dist.barrier()
    if rank == 1:
        os._exit(3)  # dies without a word
    disp = make_dispatcher("moge_a2a", dist.group.WORLD, 8, 4, "moge")
    t0 = time.time()
    try:
        disp.dispatch(torch.randn(4, 8), torch.rand(4, 4), torch.arange(4).repeat(4, 1) * 2)
        errors.append("dispatch with a dead peer returned")
    except CollectiveError as e:
        took = time.time() - t0
        if took > 25 or "peer rank" not in str(e):
            errors.append(f"took {took:.1f} s; message: {e}")
    torch.save([], os.path.join(tmp, "errors1.pt"))  # on behalf of rank 1, which died on purpose


def test_dead_rank_ends_with_clear_error(tmp_path):
    results = _spawn(_dead_peer_worker, tmp_path, timeout=90)
    _assert_clean(results)


def _world_size_worker(rank, world, tmp, errors, ports):
    from mogelm.parallel.context import init_parallel
    from mogelm.parallel.dispatchers import CollectiveError

    env = dict(RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ.update(env, WORLD_SIZE=str(world + rank), MASTER_PORT=str(ports[0]))  # rank 1 says 3
    t0 = time.time()
    try:
        init_parallel(device="cpu", timeout_s=30)
        errors.append(f"rank {rank}: a WORLD_SIZE mismatch was accepted")
    except CollectiveError as e:
        if "WORLD_SIZE mismatch" not in str(e) or time.time() - t0 > 20:
            errors.append(f"rank {rank}: after {time.time() - t0:.1f} s: {e}")
    os.environ.update(WORLD_SIZE=str(world), MASTER_PORT=str(ports[1]))  # now consistent
    ctx = init_parallel(device="cpu", timeout_s=30)
    if ctx.all_reduce_mean(float(rank)) != 0.5:
        errors.append("all_reduce_mean after a store-based init is wrong")


def test_mismatched_world_size_ends_every_rank_with_a_message(tmp_path):
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    _assert_clean(_spawn(_world_size_worker, tmp_path, timeout=90, args=(ports,)))


def test_bad_ep_sizes_refused_before_any_collective(monkeypatch):
    from mogelm.parallel.context import init_parallel
    from mogelm.parallel.expert_parallel import validate_ep

    validate_ep(_debug_cfg(), 2)
    validate_ep(_debug_cfg(), 4)
    with pytest.raises(ValueError, match="does not divide num_groups"):
        validate_ep(_debug_cfg(), 3)
    with pytest.raises(ValueError, match="does not divide num_experts"):
        validate_ep(_debug_cfg(routing="topk"), 3)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="must divide the world size 3"):
        init_parallel(ep_size=2, device="cpu")  # would hang waiting for peers if it got that far
    assert not dist.is_initialized()


def test_relaunch_runs_the_command_under_torchrun(monkeypatch, capsys):
    """relaunch(2) starts torchrun with 2 workers on this machine, and what torchrun runs in each
    worker, given relaunch's environment plus torchrun's, is `mogelm <argv>` itself."""
    import json
    import subprocess
    import sys

    from mogelm import cli
    from mogelm.parallel import launch

    seen = {}

    def fake_run(cmd, env):
        seen["cmd"], seen["env"] = cmd, env
        return 7

    argv = ["info", "debug", "--json"]
    monkeypatch.setattr(launch, "run_process_group", fake_run)
    assert launch.relaunch(2, argv) == 7  # torchrun's exit status comes back
    cmd, env = seen["cmd"], seen["env"]
    worker_at = cmd.index("-m", 3)  # torchrun's own options end where the worker's module begins
    assert cmd[:3] == [sys.executable, "-m", "mogelm.parallel.launch"]  # torchrun, quiet on failure
    assert {"--standalone", "--nproc-per-node=2"} == set(cmd[3:worker_at])
    assert json.loads(env[launch.ARGV_ENV]) == argv
    torchrun_env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    worker = subprocess.run([sys.executable, *cmd[worker_at:]], env={**env, **torchrun_env},
                            capture_output=True, text=True, timeout=120)
    assert worker.returncode == 0, worker.stderr
    assert cli.main(argv) == 0
    assert worker.stdout == capsys.readouterr().out


def test_mogelm_train_nproc2_ep2_matches_one_process(tmp_path):
    """`mogelm train --nproc 2 --ep 2` end to end (torchrun, gloo, the real training loop and
    checkpoint directory) lands on the same weights and validation loss as one process on the
    same global batches; so does FSDP2 x EP started by torchrun itself, the way a multi-node job
    is (docs/training.md: no --nproc, the world size is torchrun's)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from mogelm.checkpoint import from_pretrained

    data = str(Path(__file__).parent / "data")
    common = ["train", "--preset", "debug", "--data", data, "--cache-dir", str(tmp_path / "cache"),
              "--seq-len", "32", "--max-steps", "4", "--eval-every", "4", "--eval-batches", "2",
              "--threads", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    mogelm = [sys.executable, "-m", "mogelm"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "mogelm"]
    runs = {"one": (mogelm, ["--batch-size", "4"]),
            "ep": (mogelm, ["--nproc", "2", "--ep", "2", "--batch-size", "2"]),
            "fsdp": (torchrun, ["--ep", "2", "--fsdp", "2", "--batch-size", "2"])}
    for name, (launcher, extra) in runs.items():
        proc = subprocess.run([*launcher, *common, *extra, "--out", str(tmp_path / name)],
                              env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    val = {n: [json.loads(x) for x in (tmp_path / n / "log.jsonl").read_text().splitlines()][-1]
           for n in runs}
    one = from_pretrained(tmp_path / "one" / "final")
    for name in ("ep", "fsdp"):
        assert val[name]["kind"] == "val" and abs(val[name]["val_loss"] - val["one"]["val_loss"]) < 1e-5, val
        other = from_pretrained(tmp_path / name / "final")
        for (pname, p), q in zip(other.named_parameters(), one.parameters()):
            assert (p - q).abs().max() < 1e-5, (name, pname)
        assert (tmp_path / name / "final" / "distributed").is_dir()


@pytest.mark.parametrize("flags, message", [
    (["--ep", "2"], "--ep 2 needs --nproc 2 or more"),
    (["--fsdp", "2"], "need several processes"),
    (["--nproc", "4", "--ep", "3"], "--ep 3 must divide --nproc 4"),
    (["--nproc", "4", "--fsdp", "3"], "FSDP size 3 must divide the world size 4"),
    (["--nproc", "4", "--ep", "4", "--fsdp", "2"], "EP size 4 must divide the FSDP size 2"),
    (["--nproc", "8", "--ep", "8", "--set", "num_groups=2", "--set", "num_experts_per_tok=2"],
     "does not divide num_groups"),
    (["--nproc", "0"], "--nproc and --ep must be positive"),
])
def test_train_refuses_a_bad_layout_before_starting_processes(flags, message, tmp_path, capsys):
    from mogelm.cli import main

    assert main(["train", "--max-steps", "1", "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
