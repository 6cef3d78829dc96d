"""Accelerators the planner knows, and the arithmetic of time and money.

Peak figures are the vendors' dense (no structured sparsity) numbers from their data sheets: 16-bit matrix FLOP/s
on tensor cores / MXUs, fp32 without tensor cores, memory size and bandwidth. A V100 is sometimes credited with
"~312 TFLOP/s": that is the A100's bf16 peak; the V100's fp16 tensor-core peak is 125 TFLOP/s (15.7 fp32).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

from ..errors import GptlabError

GIB = 2**30
PF_DAY = 1e15 * 86400  # FLOPs in one petaflop/s-day (Kaplan et al. 2020, Brown et al. 2020)


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # 16-bit matrix FLOP/s (bf16/fp16; the CPU entry: fp32)
    fp32_flops: float
    memory_bytes: float
    bandwidth: float  # bytes/s
    source: str = ""


HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in [
        Hardware("v100-16gb", 125e12, 15.7e12, 16 * GIB, 900e9, "NVIDIA V100 SXM2 data sheet"),
        Hardware("v100", 125e12, 15.7e12, 32 * GIB, 900e9, "NVIDIA V100 SXM2 32 GB data sheet"),
        Hardware("a100-40gb", 312e12, 19.5e12, 40 * GIB, 1555e9, "NVIDIA A100 data sheet (SXM, 40 GB)"),
        Hardware("a100", 312e12, 19.5e12, 80 * GIB, 2039e9, "NVIDIA A100 data sheet (SXM, 80 GB)"),
        Hardware("h100", 989e12, 67e12, 80 * GIB, 3.35e12, "NVIDIA H100 SXM data sheet (dense bf16)"),
        Hardware("h200", 989e12, 67e12, 141e9, 4.8e12, "NVIDIA H200 SXM data sheet (dense bf16)"),
        Hardware("tpu-v3", 123e12, 123e12 / 16, 32 * GIB, 900e9, "Google Cloud TPU v3 chip (2 cores, 16 GiB each)"),
    ]
}


def hardware(
    name: str, peak_tflops: float | None = None, bandwidth_gbs: float | None = None, memory_gib: float | None = None
) -> Hardware:
    """A named preset, optionally with figures replaced; ``custom`` needs all three figures; ``cpu`` measures this
    machine (:func:`measure_cpu`), given figures replacing the measured ones."""
    if name == "cpu":
        base = measure_cpu()
    elif name == "custom":
        if None in (peak_tflops, bandwidth_gbs, memory_gib):
            raise GptlabError("custom hardware needs --peak-tflops, --bandwidth-gbs and --memory-gib")
        base = Hardware("custom", 0, 0, 0, 0, "given")
    elif name in HARDWARE:
        base = HARDWARE[name]
    else:
        raise GptlabError(f"unknown hardware {name!r}; choose one of: {', '.join([*HARDWARE, 'cpu', 'custom'])}")
    peak = peak_tflops * 1e12 if peak_tflops else base.peak_flops
    return dataclasses.replace(
        base,
        peak_flops=peak,
        fp32_flops=base.fp32_flops or peak,
        memory_bytes=memory_gib * GIB if memory_gib else base.memory_bytes,
        bandwidth=bandwidth_gbs * 1e9 if bandwidth_gbs else base.bandwidth,
    )


def measure_cpu(seconds: float = 0.5) -> Hardware:
    """This machine as the planner sees it: fp32 matmul FLOP/s (2048² GEMM), read bandwidth (sum over 256 MB),
    and total RAM. Measured, so it reflects the threads torch uses here."""
    import os

    import torch  # here, not at the top: the planner otherwise runs without torch

    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    big = torch.ones(64 * 2**20)  # 256 MB

    def rate(fn, work: float) -> float:
        fn()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            n += 1
        return work * n / (time.perf_counter() - t0)

    flops = rate(lambda: a @ b, 2.0 * 2048**3)
    bw = rate(lambda: big.sum(), big.numel() * 4.0)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware("cpu", flops, flops, float(ram), bw, f"measured here ({torch.get_num_threads()} threads)")


def training_time(
    flops: float,
    hw: Hardware,
    devices: int,
    mfu: float,
    price_per_device_hour: float = 0.0,
    tokens: float | None = None,
    batch_tokens: float | None = None,
) -> dict[str, float]:
    """Wall-clock and cost of ``flops`` of training on ``devices`` at model FLOPs utilization ``mfu``:
    seconds = flops / (devices · peak · mfu); device-hours = devices · hours; cost = device-hours · price.
    With ``tokens`` and ``batch_tokens`` also the optimizer steps."""
    if not 0 < mfu <= 1:
        raise GptlabError(f"MFU must be in (0, 1], got {mfu}; e.g. 0.4 for a well-tuned large run")
    if devices < 1:
        raise GptlabError(f"the device count must be >= 1, got {devices}")
    seconds = flops / (devices * hw.peak_flops * mfu)
    out = {
        "flops": flops,
        "pf_days": flops / PF_DAY,
        "effective_flops_per_second": devices * hw.peak_flops * mfu,
        "seconds": seconds,
        "days": seconds / 86400,
        "device_hours": devices * seconds / 3600,
        "cost": devices * seconds / 3600 * price_per_device_hour,
    }
    if tokens and batch_tokens:
        out["steps"] = math.ceil(tokens / batch_tokens)
    return out
