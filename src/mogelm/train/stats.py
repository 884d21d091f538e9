"""A training step's statistics, kept on the device and read by the host only when they are logged.

    stats = StepStats(cfg.num_experts, tc.sim_devices, tc.grad_accum, tokens_per_step, device)
    for step ...:
        stats.start_step()
        for micro ...:
            ...backward...; stats.add_micro(ce, aux_loss, layer_stats)   # device ops only
        ...optimizer...; stats.end_step(step + 1, lr, grad_norm)       # the step's values stay on the device
        if stats.due(step + 1) or <eval/checkpoint/last step>:
            records, bad = stats.flush(ctx)     # one device -> host copy for every pending step

The records are exactly those the loop wrote before (log.jsonl "train" records: loss, aux, lr,
grad_norm, tok_s, per-layer Imbalance Score is<P> and busiest/mean mom<P> of the step's last
micro-batch, analysis.metrics.step_balance), with the same arithmetic: losses summed in float64
as Python floats were, device loads from the layers' own expert counts. Only tok_s is averaged
over the steps of one flush (it is a wall-clock rate). On the CPU the loop flushes every step.

Legend: L MoE layers, E experts, P simulated devices.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor


def balance_on_device(counts_LE: Tensor, devices: list[int]) -> Tensor:
    """float64 [2 * len(devices), L]: for each P, the spread max - min of the device loads (an
    integer) and the busiest device's load over the mean (computed in fp32, as max_over_mean)."""
    L, E = counts_LE.shape
    rows = []
    for p in devices:
        loads_LP = counts_LE.view(L, p, E // p).sum(-1)
        spread = loads_LP.max(-1).values - loads_LP.min(-1).values
        lf = loads_LP.float()
        mean = lf.sum(-1) / p  # torch's CPU mean is this sum and division (metrics.max_over_mean)
        mom = torch.where(mean > 0, lf.max(-1).values / mean, torch.full_like(mean, float("nan")))
        rows += [spread.double(), mom.double()]
    return torch.stack(rows)


class StepStats:
    """Accumulates ce, aux and expert loads of each step on the device; `flush` reads them."""

    def __init__(self, num_experts: int, devices, grad_accum: int, tokens_per_step: int,
                 device: torch.device, is_moe: bool = True):
        self.devices = [p for p in devices if num_experts % p == 0] if is_moe else []
        self.grad_accum, self.tokens_per_step, self.device = grad_accum, tokens_per_step, device
        self.pending: list[tuple] = []
        self.t_last = time.time()
        self.start_step()

    def start_step(self) -> None:
        self.ce = torch.zeros((), dtype=torch.float64, device=self.device)
        self.aux = torch.zeros((), dtype=torch.float64, device=self.device)
        self.counts: list[Tensor] | None = None  # per layer, summed over the step's micro-batches
        self.last_stats: list = []
        self.mtp: Tensor | None = None  # [D] per-depth MTP cross-entropy (mogelm.mtp), when trained

    def add_micro(self, ce: Tensor, aux: Tensor, layer_stats: list, mtp_ce_D: Tensor | None = None) -> None:
        """One micro-batch: its mean CE and aux loss (scalars), its MoE layers' stats and, with MTP
        modules, the per-depth MTP cross-entropies [D]."""
        self.ce += ce.detach().double() / self.grad_accum
        self.aux += aux.detach().double() / self.grad_accum
        if mtp_ce_D is not None:
            mtp = mtp_ce_D.detach().double() / self.grad_accum
            self.mtp = mtp if self.mtp is None else self.mtp + mtp
        c = [s.counts_E.detach() for s in layer_stats]
        self.counts = c if self.counts is None else [a + b for a, b in zip(self.counts, c)]
        self.last_stats = layer_stats

    def end_step(self, step: int, lr: float, grad_norm: float) -> None:
        """Close step `step` (1-based): its values wait on the device for the next flush."""
        balance, tokens = None, 0
        if self.devices and self.last_stats:
            tokens = self.last_stats[0].expert_ids_TK.shape[0]
            counts_LE = torch.stack([s.counts_E.detach() for s in self.last_stats])
            balance = balance_on_device(counts_LE, self.devices)
        self.pending.append((step, lr, grad_norm, self.ce, self.aux, balance, tokens, self.mtp))
        self.start_step()

    def flush(self, ctx) -> tuple[list[dict], tuple[int, float] | None]:
        """(records of the pending steps in order, None) or, when a step's loss (averaged over the
        ranks) is not finite, (the records before it, (its 0-based step, its loss)). Every rank
        must call it at the same steps: the loss average is a collective."""
        if not self.pending:
            return [], None
        parts = [torch.stack([p[3] for p in self.pending]), torch.stack([p[4] for p in self.pending])]
        parts += [p[5].flatten() for p in self.pending if p[5] is not None]
        parts += [p[7] for p in self.pending if p[7] is not None]
        values = torch.cat(parts).tolist()  # the one device -> host copy
        n = len(self.pending)
        now = time.time()
        tok_s = self.tokens_per_step * n / max(now - self.t_last, 1e-9)
        self.t_last = now
        records, bad, offset = [], None, 2 * n
        mtp_offset = offset + sum(p[5].numel() for p in self.pending if p[5] is not None)
        for i, (step, lr, grad_norm, _, _, balance, tokens, mtp) in enumerate(self.pending):
            loss = ctx.all_reduce_mean(values[i])  # the global batch's loss, not this rank's slice
            if bad is None and not math.isfinite(loss):
                bad = (step - 1, loss)
            rec = {"kind": "train", "step": step, "tokens": step * self.tokens_per_step, "loss": loss,
                   "aux": values[n + i], "lr": lr, "grad_norm": grad_norm, "tok_s": tok_s}
            if mtp is not None:  # the MTP modules' losses, global-batch means like the loss
                per_depth = [ctx.all_reduce_mean(v) for v in values[mtp_offset: mtp_offset + mtp.numel()]]
                mtp_offset += mtp.numel()
                rec["mtp_loss"] = sum(per_depth) / len(per_depth)
                rec.update({f"mtp_loss_{d}": v for d, v in enumerate(per_depth, start=1)})
            if balance is not None:
                L = balance.shape[1]
                for j, p in enumerate(self.devices):
                    rows = values[offset + 2 * j * L: offset + (2 * j + 1) * L]
                    rec[f"is{p}"] = [int(v) / tokens for v in rows]
                    rec[f"mom{p}"] = values[offset + (2 * j + 1) * L: offset + (2 * j + 2) * L]
                offset += balance.numel()
            if bad is None:
                records.append(rec)
        self.pending = []
        return records, bad

    def due(self, step: int, every: int) -> bool:
        """Whether to read at step `step` (1-based): every step on the CPU (the host reads each
        value anyway), else every `every` steps."""
        return self.device.type == "cpu" or step % max(1, every) == 0
