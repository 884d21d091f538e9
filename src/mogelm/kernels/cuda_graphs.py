"""Capture a function in a CUDA graph the way every caller here does: warm it up on a side stream
(allocator, lazy initialisation, Triton compiles stay out of the capture), then capture one call.

    graph, out = capture_cuda_graph(fn)                  # out: what the captured call returned
    graph, logits = capture_cuda_graph(fn, pool=pool)    # share a memory pool between graphs
    graph.replay()                                       # re-runs fn on the same static buffers

Used by the inference engine's decode graphs, the slotted reference cache and the benchmarks'
graph timings. CUDA only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def capture_cuda_graph(fn: Callable[[], object], pool=None, warmup: int = 2):
    """(graph, output of the captured call) of fn, after `warmup` eager calls on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out
