"""GPU micro-benchmarks the simulator (mogelm.sim) is checked against: decode attention and NCCL
collectives. Lives here, not in the package, because it needs CUDA and torch.distributed (NCCL).

    python benchmarks/bench_sim_microbench.py --out h200_microbench.json   # on a machine with >= 1 GPU

Measures, in bf16 on the current CUDA device(s):
  - decode attention as mogelm's model runs it (model.py: F.scaled_dot_product_attention with
    enable_gqa, one query per sequence) at Pangu shapes (40 query / 8 KV heads of 128), for a few
    batch sizes at a 2,048-token KV length;
  - all-gather and reduce-scatter (torch.distributed, NCCL) over every GPU of the machine, for the
    buffer sizes a Pangu decode / prefill step moves (T tokens x 5120 x 2 bytes);
  - the device copy bandwidth and a dense bf16 GEMM, so the run carries its own ceilings.
Writes one JSON object. `mogelm sim validate` compares the simulator's predictions with the copy
stored in the package (src/mogelm/sim/data/h200_microbench.json); `mogelm sim calibrate` reads
its "collectives" and "decode_attention" sections.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _time_cuda(fn, iters: int = 50, warmup: int = 10) -> float:
    """Median milliseconds of fn() over `iters` runs, each bracketed by CUDA events (fixed counts:
    the collectives timed here must run as often on every rank)."""
    import torch

    from mogelm.inference.bench_model import fixed_count_ms

    return fixed_count_ms(fn, torch.device("cuda"), iters, warmup)


def ceilings() -> dict:
    import torch

    n = 1 << 30  # 1 GiB copy: read + write
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_cuda(lambda: dst.copy_(src), iters=20)
    copy_gbps = 2 * n / (ms * 1e-3) / 1e9
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    ms = _time_cuda(lambda: a @ b, iters=20)
    return {"copy_bandwidth_GBps": round(copy_gbps, 1),
            "dense_bf16_tflops": round(2 * m**3 / (ms * 1e-3) / 1e12, 1)}


def decode_attention(batches=(8, 32, 128), context: int = 2048) -> list[dict]:
    import torch
    import torch.nn.functional as F

    rows = []
    for b in batches:
        q = torch.randn(b, 40, 1, 128, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(b, 8, context, 128, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        mask = torch.ones(b, 1, 1, context, dtype=torch.bool, device="cuda")  # as model.py passes one
        plain = _time_cuda(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        masked = _time_cuda(lambda q=q, k=k, v=v, mask=mask: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True))
        rows.append({"batch": b, "context": context, "heads": 40, "kv_heads": 8, "head_dim": 128,
                     "kv_bytes": 2 * b * context * 8 * 128 * 2, "ms": round(plain, 4),
                     "ms_masked": round(masked, 4)})
    return rows


def _collective_worker(rank: int, world: int, port: int, sizes, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    rows = []
    for n in sizes:  # n = bytes of the full (gathered) buffer per device
        full = torch.empty(n // 2, dtype=torch.bfloat16, device="cuda")
        shard = torch.empty(n // 2 // world, dtype=torch.bfloat16, device="cuda")
        ag = _time_cuda(lambda full=full, shard=shard: dist.all_gather_into_tensor(full, shard), iters=30)
        rs = _time_cuda(lambda full=full, shard=shard: dist.reduce_scatter_tensor(shard, full), iters=30)
        rows.append({"world": world, "bytes": n, "allgather_ms": round(ag, 4),
                     "reducescatter_ms": round(rs, 4)})
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def collectives(sizes=(65536, 1 << 20, 4_669_440, 41_943_040)) -> list[dict]:
    import torch
    import torch.multiprocessing as mp

    world = torch.cuda.device_count()
    if world < 2:
        return []
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_collective_worker, args=(r, world, 29511, sizes, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    return rows


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: needs a CUDA GPU")
    result = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    result.update(ceilings())
    result["decode_attention"] = decode_attention()
    result["collectives"] = collectives()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
