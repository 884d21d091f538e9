"""The MoE block: routing (moge / topk / group_limited), stacked experts, dispatch, the layer."""

from mogelm.moe.layer import MoEStats, MoGELayer
from mogelm.moe.routing import Routing

__all__ = ["MoGELayer", "MoEStats", "Routing"]
