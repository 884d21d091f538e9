"""Does the sharded lockstep engine decode like the plain one on this GPU? (issue 18's one-GPU check)

    PYTHONPATH=src python benchmarks/diagnose_serve_one_gpu.py [--out FILE.json]     # CUDA, ~1 min
    DEV=cpu PYTHONPATH=src python benchmarks/diagnose_serve_one_gpu.py             # gloo, no graphs

Trains the inference tests' debug checkpoint (tests/test_inference.build_checkpoint), then greedy-
decodes four prompts in fp32 through: the CPU engine (the reference), the plain engine on the
device, the one-rank lockstep engine over the tensor-parallel model (NCCL on CUDA, gloo on CPU)
and the plain engine over the same sharded model, each with CUDA graphs on and off and the load-
time fusions on and off; prints SAME / DIFF per variant against the reference, and the largest
difference between the sharded and the plain model's full forward. Written to split the suspects
of a failing gpu test (benchmarks/notes_serve_multi_gpu.md, "Diagnosis").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_inference import build_checkpoint  # noqa: E402 (the tests' fixture checkpoint)

import mogelm  # noqa: E402
from mogelm.inference import Engine, SamplingParams  # noqa: E402
from mogelm.inference.chat import Tokenizer  # noqa: E402
from mogelm.inference.distributed import LockstepEngine  # noqa: E402
from mogelm.inference.shards import load_sharded  # noqa: E402
from mogelm.parallel.tensor_parallel import sharder  # noqa: E402

PROMPTS = ["The quick", "def add(a", "for i in", "Servers answer"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = os.environ.get("DEV", "cuda")
    graphs = (True, False) if dev == "cuda" else (False,)
    tmp = Path(tempfile.mkdtemp())
    ckpt = build_checkpoint(tmp)
    params = SamplingParams(max_tokens=16, temperature=0)
    kw = dict(max_batch=4, gpu_memory_fraction=0.05 if dev == "cuda" else 0.9)
    res: dict = {}

    def gen(engine) -> list[list[int]]:
        return [c.token_ids for c in engine.generate(PROMPTS, params)]

    res["cpu"] = gen(Engine.from_pretrained(ckpt, device="cpu", dtype=torch.float32, max_batch=4))
    for g in graphs:
        for f in (True, False):
            e = Engine.from_pretrained(ckpt, device=dev, dtype=torch.float32, cuda_graphs=g, fuse=f, **kw)
            res[f"plain graphs={g} fuse={f}"] = gen(e)
            del e
    dist.init_process_group("nccl" if dev == "cuda" else "gloo", init_method=f"file://{tmp}/store",
                            rank=0, world_size=1)
    try:
        control = dist.new_group(backend="gloo")
        tok = Tokenizer.from_dir(ckpt)
        for g in graphs:
            for f in (True, False):
                model = load_sharded(ckpt, sharder(dist.group.WORLD), dev, torch.float32)
                e = LockstepEngine(model, tok, control, cuda_graphs=g, fuse=f, **kw)
                res[f"lockstep graphs={g} fuse={f}"] = gen(e)
                if g and f:
                    res["lockstep one prompt at a time"] = [e.generate([q], params)[0].token_ids
                                                            for q in PROMPTS]
                e.close()
                model = load_sharded(ckpt, sharder(dist.group.WORLD), dev, torch.float32)
                e = Engine(model, tok, cuda_graphs=g, fuse=f, **kw)
                res[f"sharded-plain graphs={g} fuse={f}"] = gen(e)
        plain = mogelm.from_pretrained(ckpt, device=dev, dtype=torch.float32)
        sharded = load_sharded(ckpt, sharder(dist.group.WORLD), dev, torch.float32)
        ids = torch.tensor([[5, 17, 33, 2, 9, 11]], device=dev)
        with torch.inference_mode():
            res["full_forward_max_abs_diff"] = float((plain(ids) - sharded(ids)).abs().max())
    finally:
        dist.destroy_process_group()
    ref = res["cpu"]
    for name, v in res.items():
        if isinstance(v, list):
            bad = [i for i in range(len(PROMPTS)) if v[i] != ref[i]]
            print(f"{name:36s} {'SAME' if not bad else 'DIFF in prompts ' + str(bad)}")
    print(f"sharded vs plain model, full forward: max |diff| {res['full_forward_max_abs_diff']:.3g}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
