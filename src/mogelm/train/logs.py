"""What a training run reports: a progress line on stderr and log.jsonl (plus TensorBoard if installed).

    log = JsonlLog(out / "log.jsonl", keep_until_step=None, enabled=True)
    log.write({"kind": "train", "step": 1, "loss": 6.2, ...}); log.close()
    records = read_log(out / "log.jsonl")        # skips a last line cut by a kill

log.jsonl holds one JSON object per line: "kind": "train" records (loss, aux, lr, grad_norm,
tok_s, per-layer Imbalance Score "is<P>" and busiest/mean "mom<P>"; with MTP modules also
"mtp_loss", the mean over depths of their cross-entropy, and "mtp_loss_<d>" per depth d, while
"loss" stays the main next-token loss) and "kind": "val" records (val_loss, val_ppl, routing
statistics of the validation batches).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


class Progress:
    """One status line on stderr: '\\r'-updated on a terminal, a plain line every N steps otherwise.

    The line shows the Imbalance Score at `devices` simulated devices (the model's own group
    count: one group per device, where MoGE's IS is 0 by construction) when the record has it,
    labelled `IS@P`; log.jsonl keeps every device count. The rate and ETA count only the steps of
    this process (from `start`, the resumed step), not those done before a resume."""

    def __init__(self, total: int, start: int, every: int, label: str = "", enabled: bool = True,
                 mode: str = "auto", devices: int | None = None):
        self.total, self.start, self.label, self.devices = total, start, label, devices
        self.enabled = enabled and mode != "none"
        self.tty = sys.stderr.isatty() and mode == "auto"
        self.every = every or max(1, total // 20)
        self.t0 = time.time()

    def update(self, step: int, rec: dict) -> None:
        if not self.enabled:
            return
        done = step + 1
        if not self.tty and done % self.every and done != self.total:
            return
        elapsed = time.time() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        mtp = f" mtp {rec['mtp_loss']:.3f}" if "mtp_loss" in rec else ""
        line = (f"{self.label}step {done}/{self.total} loss {rec['loss']:.3f}{mtp} {self._imbalance(rec)}"
                f"{rec['tok_s']:,.0f} tok/s ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        if self.tty:
            print("\r" + line.ljust(90), end="" if done != self.total else "\n", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def _imbalance(self, rec: dict) -> str:
        """'IS@P x.xxx ' (mean over layers) at the model's group count, else the largest P logged."""
        logged = sorted((int(k[2:]) for k in rec if k.startswith("is") and k[2:].isdigit()), reverse=True)
        if not logged:
            return ""
        P = self.devices if self.devices in logged else logged[0]
        v = rec[f"is{P}"]
        return f"IS@{P} {sum(v) / max(len(v), 1):.3f} "

    def message(self, text: str) -> None:
        if self.enabled:
            print(("\n" if self.tty else "") + text, file=sys.stderr, flush=True)


class JsonlLog:
    """Append-only JSONL; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path, keep_until_step: int | None, enabled: bool):
        self.path, self.enabled = path, enabled
        self.tb = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if keep_until_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("step", -1) <= keep_until_step:
                    kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))
        self.f = path.open("a")
        try:  # TensorBoard when installed
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard missing or broken: JSONL is enough
            self.tb = None

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{rec['kind']}/{k}", v, rec["step"])

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def read_log(path: str | os.PathLike) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
