"""Inference: an engine with continuous batching over a paged KV cache (mixed prefill + decode
steps, prefix caching, preemption), sampling, chat templates; the slotted cache as reference.

    from mogelm.inference import Engine, SamplingParams
    engine = Engine.from_pretrained("ckpt/", max_batch=8)
    [out] = engine.generate(["def main("], SamplingParams(max_tokens=32, temperature=0))

The OpenAI-compatible server is `mogelm.inference.server` (needs the `serve` extra: fastapi, uvicorn);
it is not imported here. Serving a model sharded over processes: `mogelm.inference.distributed`
(LockstepEngine) and `mogelm.inference.shards` (load_sharded).
"""

from mogelm.inference.cache import SlotKVCache
from mogelm.inference.chat import Tokenizer
from mogelm.inference.engine import Completion, Engine, EngineThread, RequestOutput
from mogelm.inference.sampling import SamplingParams, sample

__all__ = ["Completion", "Engine", "EngineThread", "RequestOutput", "SamplingParams", "SlotKVCache",
           "Tokenizer", "sample"]
