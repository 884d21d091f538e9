"""Expert parallel + data parallel, applied to a model from outside (the model never imports
torch.distributed). See DESIGN.md §4.

    mogelm train --preset small --nproc 2 --ep 2            # torchrun under the hood (launch.py)

    from mogelm.parallel.context import init_parallel       # inside a torchrun worker
    ctx = init_parallel(ep_size=2)                          # NCCL on CUDA, gloo on CPU
    model = ctx.parallelize(model)                          # broadcast, shard experts, swap dispatcher
    ...backward...; ctx.sync_gradients(model); ctx.clip_grad_norm(model, 1.0); opt.step()
    ctx.save_checkpoint(path, model, opt, state)            # DCP shards + one-process files

Modules:
    dispatchers.py      MoGEAllToAll (equal-split all_to_all), MoGEAllGather (all-gather ->
                        experts -> reduce-scatter), TopKAllToAll (count exchange + variable
                        all_to_all); all behind mogelm.moe.dispatch.Dispatcher
    expert_parallel.py  apply_expert_parallel(model, ep_process_group, dispatcher)
    context.py          ParallelContext: DP x EP process groups, gradient sync, global clipping,
                        global-batch load statistics, failure messages
    local.py            LocalContext: the same methods for one process (world size 1), so the
                        training loop has one path
    checkpoint.py       torch.distributed.checkpoint save/load at any layout, one process included
    launch.py           relaunch(nproc): re-run the current `mogelm` command under torchrun
                        (workers: `python -m mogelm`, arguments in $MOGELM_ARGV)
"""
