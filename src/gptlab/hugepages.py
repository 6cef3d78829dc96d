"""The weights of a model being served or sampled, on transparent huge pages (Linux, CPU).

A decode step streams every weight once. On 4 KiB pages each page costs a TLB entry and the CPU's stream
prefetchers stop at every page boundary (Intel's optimization reference manual, "hardware prefetching"); on 2 MiB
pages neither happens. With its weights copied into memory advised ``MADV_HUGEPAGE`` (the kernel's
Documentation/admin-guide/mm/transhuge.rst), GPT-2 124M's eager fp32 decode step took 21 ms instead of 24.5 ms on
2 vCPUs of a Xeon with AMX (docs/benchmarks.md).

PyTorch can put every large CPU allocation on huge pages (``THP_MEM_ALLOC_ENABLE=1``), but only for a whole process;
gptlab does it only for the weights of a model it generates with or serves (:func:`place_weights`, called by the
:class:`~gptlab.generate.Engine` and the serving scheduler), once per model. Not for KV caches: a huge page is zeroed,
and where free memory is fragmented first compacted, when it is first written (measured here: 1.4 s per GiB in a
fresh process), which a serving pool filling its rows would pay in the middle of requests (in one benchmark run, TTFT
p99 at 32 streams was 5.3 s, against 1.0 s with the pool committed at start). Where the kernel has no transparent
huge pages (``never``), or off Linux, or off the CPU, nothing changes.

Freed memory, too, stays with the process (:func:`keep_freed_memory_in_heap`) in training, serving and sampling.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import mmap
from pathlib import Path
from typing import TypeVar

import torch

HUGE_PAGE = 2 << 20  # x86-64's and most arm64 kernels' transparent huge page
MIN_WEIGHT_BYTES = 64 << 10  # smaller tensors (norms, biases) stay where they are
M = TypeVar("M", bound=torch.nn.Module)
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@functools.cache
def thp_mode() -> str:
    """The kernel's transparent huge page mode: ``always``, ``madvise`` or ``never`` (``never`` where unknown)."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return "never"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "never"


def available() -> bool:
    """Whether CPU memory can be advised onto huge pages here (Linux, the kernel's mode not ``never``)."""
    return hasattr(mmap, "MADV_HUGEPAGE") and thp_mode() != "never"


def region(nbytes: int) -> torch.Tensor:
    """``nbytes`` of zeroed memory (uint8) starting on a huge-page boundary: an anonymous mapping advised
    ``MADV_HUGEPAGE``, unmapped when the last tensor viewing it is freed."""
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE)
    buf = torch.frombuffer(mm, dtype=torch.uint8)  # holds a reference to the mapping
    start = -buf.data_ptr() % HUGE_PAGE
    return buf[start : start + nbytes]


def place_weights(model: M) -> M:
    """Move ``model``'s CPU parameters and buffers of at least ``MIN_WEIGHT_BYTES`` into one huge-page region (same
    values, same Parameter objects, so tied weights stay tied); the old memory is freed where nothing else holds it.
    For inference: a model that is served or sampled. Returns ``model``. A second call moves only what is not yet
    placed (weights replaced since, e.g. by quantization): placed tensors are parts of a region's storage."""
    if not available():
        return model
    groups: dict[int, list[torch.Tensor]] = {}  # storage address -> the tensors viewing it
    for t in [*model.parameters(), *model.buffers()]:
        if type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.nbytes >= MIN_WEIGHT_BYTES:
            groups.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    # a tensor that is part of a larger storage stays: moving it alone would part it from what shares the storage
    whole = [ts for ts in groups.values() if all(t.is_contiguous() and t.nbytes == t.untyped_storage().nbytes()
                                                  for t in ts)]  # fmt: skip
    sizes = [-(-ts[0].nbytes // 4096) * 4096 for ts in whole]
    if whole:
        buf = region(sum(sizes))
        for ts, at in zip(whole, itertools.accumulate([0, *sizes]), strict=False):
            new = buf[at : at + ts[0].nbytes]
            new.copy_(ts[0].detach().reshape(-1).view(torch.uint8))
            for t in ts:
                t.data = new.view(t.dtype).view(t.shape)
    return model


@functools.cache  # (a setting of the process: once is enough)
def keep_freed_memory_in_heap(device_type: str = "cpu") -> None:
    """On glibc, allocations past the mmap threshold (128 KB at first, rising as such blocks are freed, up to 32 MB)
    are mapped for themselves and handed back to the OS when freed, so the next one page-faults its memory in again:
    GPT-2 124M's 200 MB logits in every CPU training step (2 cores: 8.8 -> 7.4 s a step), a prompt's activations in
    every prefill (GPT-2, 32 tokens, 2 threads of an Intel Xeon: 45.2 -> 41.7 ms; GELU's 393 KB output 158 -> 52 us).
    Serving them from the heap, and not trimming it, removes that cost; the process keeps its peak memory. For the
    whole process (``mallopt``): called by training, the serving scheduler and the generation engine with their
    device's type; for any device but the CPU, or off glibc (macOS, musl), nothing changes."""
    if device_type != "cpu":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX = 0
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD = 2 GiB
