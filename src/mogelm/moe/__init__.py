"""The MoE block: routers (MoGE / top-k / softmax-top-k / group-limited), stacked experts,
dispatch, the layer."""

from mogelm.moe.layer import MoEStats, MoGELayer
from mogelm.moe.routing import Router, Routing, build_router

__all__ = ["MoGELayer", "MoEStats", "Router", "Routing", "build_router"]
