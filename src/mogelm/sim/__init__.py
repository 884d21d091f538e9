"""System simulator: choose a MoGE configuration and parallel layout for given hardware.

The paper chose Pangu Pro MoE's shape with an operator-level simulator (PAPER.md section 4);
this is ours. Pieces, each a module:

    hardware   device profiles as data (profiles/*.json), every number with a source
    cost       roofline operators, alpha-beta collectives, one transformer step (prefill / decode)
    layout     parallel layouts (attention DPxTP, experts EPxTP, shared TP), memory, batch search
    search     configuration search over the paper's space (Figure 3), MoGE vs top-k
    validate   predictions vs the paper's Tables 5-7 and our H200 measurements
    calibrate  a profile from our benchmark JSON
    deploy     one deployment's plan (layout, batch, TPOT, prefill) as a dict and as text

The command `mogelm sim [run|search|validate|calibrate]` is mogelm/commands/sim.py.

It depends only on mogelm.config, numpy and analysis.metrics (the Monte-Carlo routing sampler
it shares with `mogelm imbalance`): no GPU, no model code. README.md here holds the validation
table.
"""

from mogelm.sim.cost import QUANTS, step_cost
from mogelm.sim.hardware import HardwareProfile, load_profile, profile_names
from mogelm.sim.layout import Layout, Plan, enumerate_layouts, plan_decode, plan_prefill

__all__ = ["QUANTS", "HardwareProfile", "Layout", "Plan", "enumerate_layouts", "load_profile", "plan_decode",
           "plan_prefill", "profile_names", "step_cost"]
