"""Hardware profiles as data: one dataclass per device, loaded from JSON with a source per number.

    from mogelm.sim.hardware import load_profile, profile_names
    hw = load_profile("ascend-800i-a2")        # a built-in name, or a path to a profile JSON
    hw.peak_flops("int8"), hw.bandwidth, hw.link_for(4)

Built-in profiles live in `src/mogelm/sim/profiles/<name>.json`. Every number in a profile has an
entry in its `sources` dict: where it comes from, or, where it is not public, that it is an
estimate and why. `mogelm sim calibrate` writes the same format from our benchmark JSON.

Units. A *device* is one accelerator chip (an NPU module, a GPU, one of the two chips on a 300I
Duo card); a *card* is what the paper counts throughput per (`devices_per_card` chips). Rates are
per device: `peak_tflops` in dense TFLOP/s (TOPS for int8), memory in GB (1e9 bytes), bandwidth
in GB/s. Interconnect levels are listed inner to outer; a level with `group_size` g serves every
collective whose devices fit inside g consecutive devices.

Efficiency parameters (a small, fixed set per profile, documented in `sources`):
    mem_efficiency          achievable fraction of the memory bandwidth (streaming reads)
    gemm_efficiency         achievable fraction of peak for large dense GEMMs
    grouped_gemm_factor     grouped (MoE) GEMM rate as a fraction of the dense GEMM rate
    attention_efficiency    fraction of peak for attention math (prefill; decode is bandwidth-bound)
    decode_attention_kv_share  share of decode-attention time spent streaming the KV cache; the rest
                            (softmax, dequantisation, pipeline bubbles) is not hidden under it
    decode_attention_fp8_kv_efficiency  KV byte rate of the decode-attention kernel over an 8-bit
                            KV cache (e4m3 on the GPUs) relative to the same kernel over a bf16 one:
                            the 8-bit kernel dequantises every key and value before its dots, so it
                            need not stream half the bytes in half the time. 1 = as efficient (the
                            default; the Ascend profiles' int8 KV). Measured, not guessed, where set
    op_overhead_us          fixed time per kernel (launch, pipeline fill, synchronisation)
    eager_layer_overhead_us host time per layer of an eager (not graph-captured) step of mogelm's
                            engine that the device waits for (Python, launches of many small
                            kernels: the prefill chunks' attention); 0 unless calibrated
                            (sim/engine.py fits it per measurement file, on its own fit row)
    grouped_gemm_curve      optional [[rows_per_expert, efficiency], ...] from `calibrate`: the expert
                            block's efficiency against the roofline ideal, interpolated in log(rows)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

PROFILE_DIR = Path(__file__).with_name("profiles")
TOPOLOGIES = ("mesh", "switch", "shared")


@dataclass(kw_only=True)
class LinkLevel:
    """One level of the interconnect, e.g. HCCS inside a server, or PCIe behind one CPU.

    topology:
      mesh    every device has a direct link to each peer (Ascend HCCS); a collective over p
              devices uses p-1 links at once and finishes in one step.
      switch  devices hang off a switch (NVSwitch, a RoCE/IB fabric); the per-device bandwidth is
              fixed and collectives run as a ring of p-1 steps.
      shared  devices share a bus through a host bridge (PCIe through a CPU); modelled like switch.
    """

    name: str
    group_size: int  # devices reachable within this level
    topology: str
    bandwidth_GBps: float  # per link (mesh) or per device (switch/shared), one direction, achievable
    latency_us: float  # alpha: fixed cost of one algorithm step
    call_overhead_us: float = 0.0  # fixed cost of one collective call (host launch, setup), any p

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"link {self.name!r}: topology must be one of {TOPOLOGIES}, "
                             f"got {self.topology!r}")
        if (self.group_size < 1 or self.bandwidth_GBps <= 0 or self.latency_us < 0
                or self.call_overhead_us < 0):
            raise ValueError(f"link {self.name!r}: group_size, bandwidth_GBps must be positive, "
                             "latency_us and call_overhead_us >= 0")

    def bus_bandwidth(self, p: int) -> float:
        """Bytes/s one device can move into a p-way collective."""
        if self.topology == "mesh":
            return (p - 1) * self.bandwidth_GBps * 1e9
        return self.bandwidth_GBps * 1e9

    def steps(self, p: int) -> int:
        """Algorithm steps (each costs one alpha) of an all-gather / reduce-scatter."""
        return 1 if self.topology == "mesh" else p - 1


@dataclass(kw_only=True)
class HardwareProfile:
    name: str
    description: str
    devices_per_card: int = 1
    peak_tflops: dict[str, float]  # dtype -> dense TFLOP/s (TOPS) per device; absent = unsupported
    memory_GB: float
    memory_bandwidth_GBps: float
    usable_memory_fraction: float = 0.9  # runtime, workspace and fragmentation take the rest
    mem_efficiency: float
    gemm_efficiency: float
    grouped_gemm_factor: float = 1.0
    attention_efficiency: float = 0.5
    decode_attention_kv_share: float = 1.0
    decode_attention_fp8_kv_efficiency: float = 1.0
    op_overhead_us: float = 5.0
    eager_layer_overhead_us: float = 0.0  # host time per layer of an eager (ungraphed) engine step
    grouped_gemm_curve: list[list[float]] = field(default_factory=list)
    links: list[LinkLevel]
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.links = [lk if isinstance(lk, LinkLevel) else LinkLevel(**lk) for lk in self.links]
        for name in ("memory_GB", "memory_bandwidth_GBps", "devices_per_card"):
            if getattr(self, name) <= 0:
                raise ValueError(f"profile {self.name!r}: {name} must be positive")
        for name in ("mem_efficiency", "gemm_efficiency", "grouped_gemm_factor", "attention_efficiency",
                     "decode_attention_kv_share", "decode_attention_fp8_kv_efficiency",
                     "usable_memory_fraction"):
            if not 0 < getattr(self, name) <= 1.0:
                raise ValueError(f"profile {self.name!r}: {name} must be in (0, 1], "
                                 f"got {getattr(self, name)}")
        if self.op_overhead_us < 0 or self.eager_layer_overhead_us < 0:
            raise ValueError(f"profile {self.name!r}: op_overhead_us and eager_layer_overhead_us must be "
                             ">= 0")
        if not self.peak_tflops:
            raise ValueError(f"profile {self.name!r}: peak_tflops is empty")
        sizes = [lk.group_size for lk in self.links]
        if sizes != sorted(sizes):
            raise ValueError(f"profile {self.name!r}: links must be listed inner to outer "
                             "(growing group_size)")
        self.grouped_gemm_curve = sorted([float(r), float(e)] for r, e in self.grouped_gemm_curve)
        if any(e <= 0 for _, e in self.grouped_gemm_curve):
            raise ValueError(f"profile {self.name!r}: grouped_gemm_curve efficiencies must be positive")

    # Derived rates ------------------------------------------------------------------------------
    @property
    def bandwidth(self) -> float:
        """Achievable memory bandwidth in bytes/s."""
        return self.memory_bandwidth_GBps * 1e9 * self.mem_efficiency

    @property
    def memory_bytes(self) -> float:
        """Bytes a model may use on one device."""
        return self.memory_GB * 1e9 * self.usable_memory_fraction

    @property
    def op_overhead(self) -> float:
        return self.op_overhead_us * 1e-6

    def supports(self, dtype: str) -> bool:
        return dtype in self.peak_tflops or (dtype == "bf16" and "fp16" in self.peak_tflops)

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s for a compute dtype. bf16 falls back to fp16 on chips without bf16 (310P)."""
        if dtype == "bf16" and dtype not in self.peak_tflops and "fp16" in self.peak_tflops:
            dtype = "fp16"
        if dtype not in self.peak_tflops:
            raise ValueError(f"{self.name} has no {dtype} compute "
                             f"(has: {', '.join(sorted(self.peak_tflops))})")
        return self.peak_tflops[dtype] * 1e12

    def grouped_efficiency(self, rows_per_expert: float) -> float | None:
        """Calibrated expert-block efficiency at this many rows per expert, or None if uncalibrated.

        Linear interpolation in log(rows); clamped to the end points outside the measured range.
        """
        curve = self.grouped_gemm_curve
        if not curve:
            return None
        x = math.log(max(rows_per_expert, 1e-6))
        xs = [math.log(max(r, 1e-6)) for r, _ in curve]
        if x <= xs[0]:
            return curve[0][1]
        if x >= xs[-1]:
            return curve[-1][1]
        for i in range(1, len(xs)):
            if x <= xs[i]:
                w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
                return curve[i - 1][1] * (1 - w) + curve[i][1] * w
        raise AssertionError("unreachable")

    def link_for(self, p: int) -> LinkLevel:
        """The innermost level that holds p consecutive devices (the outermost if none does)."""
        if not self.links:
            raise ValueError(f"profile {self.name!r} has no interconnect levels")
        for lk in self.links:
            if lk.group_size >= p:
                return lk
        return self.links[-1]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the profile JSON atomically (a temporary file renamed into place)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def profile_from_dict(d: dict) -> HardwareProfile:
    if not isinstance(d, dict):
        raise ValueError(f"a hardware profile is a JSON object, not a {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(HardwareProfile)}
    # Keys starting with "_" are comments; other unknown keys are errors so typos do not pass silently.
    unknown = sorted(k for k in d if k not in known and not k.startswith("_"))
    if unknown:
        raise ValueError(f"unknown hardware profile fields: {', '.join(unknown)}")
    missing = [f.name for f in dataclasses.fields(HardwareProfile)
               if f.name not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing hardware profile fields: {', '.join(missing)}")
    return HardwareProfile(**{k: v for k, v in d.items() if k in known})


def load_profile(name_or_path: str) -> HardwareProfile:
    """A built-in profile by name, or a profile JSON file (as written by `mogelm sim calibrate`)."""
    path = Path(name_or_path)
    if not (name_or_path.endswith(".json") or path.is_file()):
        path = PROFILE_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise ValueError(f"unknown hardware {name_or_path!r}; "
                             f"choose one of: {', '.join(profile_names())} "
                             "or pass a profile JSON path")
    if not path.is_file():
        raise ValueError(f"hardware profile file not found: {name_or_path}")
    try:
        d = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read hardware profile {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"hardware profile {path} is not valid JSON: {e}") from None
    try:
        return profile_from_dict(d)
    except (TypeError, ValueError, AttributeError) as e:  # a missing field, a wrong type
        raise ValueError(f"hardware profile {path}: {e}") from None
