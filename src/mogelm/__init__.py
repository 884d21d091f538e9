"""mogelm: Mixture of Grouped Experts (MoGE) language models — the Pangu Pro MoE architecture.

    import mogelm
    cfg = mogelm.from_name("small")                   # presets: debug, small, pangu-pro-moe-72b
    model = mogelm.Transformer(cfg)
    logits = model(input_ids)                         # [B, T, vocab]
    mogelm.save_pretrained(model, "ckpt/")            # HF layout, Pangu Pro MoE tensor names
    model = mogelm.from_pretrained("ckpt/")
    layer = mogelm.MoGELayer(cfg)                     # the MoE block alone: y, stats = layer(x)
"""

from mogelm.checkpoint import from_pretrained, save_pretrained
from mogelm.config import PRESETS, ModelConfig, count_parameters, from_name
from mogelm.errors import UserError
from mogelm.model import KVCache, ModelOutput, Transformer
from mogelm.moe.layer import MoEStats, MoGELayer

__version__ = "0.1.0"
__all__ = [
    "PRESETS", "KVCache", "ModelConfig", "ModelOutput", "MoEStats", "MoGELayer", "Transformer", "UserError",
    "count_parameters", "from_name", "from_pretrained", "save_pretrained",
]
