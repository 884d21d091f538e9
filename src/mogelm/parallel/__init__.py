"""Data parallel, FSDP2 and expert parallel on a DeviceMesh, applied to a model from outside (the
model never imports torch.distributed). See DESIGN.md §4 and docs/training.md.

    mogelm train --preset small --nproc 2 --ep 2            # torchrun under the hood (launch.py)
    mogelm train --preset small --nproc 4 --ep 2 --fsdp 4   # FSDP2 x EP (torchtitan's layout)

    from mogelm.parallel.context import init_parallel       # inside a torchrun worker
    ctx = init_parallel(ep_size=2, fsdp_size=4)             # NCCL on CUDA, gloo on CPU
    model = ctx.parallelize(model)                          # broadcast, shard experts, FSDP2 units
    ...backward...; ctx.sync_gradients(model); ctx.clip_grad_norm(model, 1.0); opt.step()
    save_distributed(path, model, opt, extra)               # checkpoint.py: DCP, any layout

Modules:
    dispatchers.py      MoGEAllToAll (equal-split all_to_all), MoGEAllGather (all-gather ->
                        experts -> reduce-scatter), TopKAllToAll (count exchange + variable
                        all_to_all); all behind mogelm.moe.dispatch.Dispatcher
    expert_parallel.py  apply_expert_parallel(model, ep_process_group, dispatcher)
    fsdp.py             apply_fsdp: FSDP2 units over dense weights and over each EP rank's
                        experts; the two DeviceMesh shapes (mesh_layout)
    context.py          ParallelContext: the meshes and process groups of a DP x EP or FSDP x EP
                        layout, gradient sync, global clipping, global-batch load statistics,
                        failure messages; validate_layout
    checkpoint.py       torch.distributed.checkpoint save/load at any layout, one process included;
                        gather_full_state (whole tensors for the one-process files)
    launch.py           relaunch(nproc): re-run the current `mogelm` command under torchrun
                        (workers: `python -m mogelm`, arguments in $MOGELM_ARGV)
    tensor_parallel.py  serving across GPUs: apply_tensor_parallel (attention TP over KV heads,
                        experts by expert group, shared expert TP, one all-reduce after attention
                        and one after the MoE layer), the MoE dispatches of that layout, sharder
                        (what inference.shards.load_sharded reads per rank)

The training loop's contexts (one process, many) and the `mogelm train` checkpoint directory live
in mogelm.train.context: parallel/ imports model and moe, never train.
"""
