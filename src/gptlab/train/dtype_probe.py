"""``--dtype auto`` on a CPU: bf16 autocast where a short measurement at the run's own shapes says it is faster.

Whether bf16 pays on a CPU depends on the CPU and on the shapes: with AMX (Intel Sapphire Rapids and later) a bf16
matrix product runs several times faster than fp32, with AVX512-BF16 less so, on AVX2 not at all; and for small
models the casts cost more than the products save. So gptlab measures instead of guessing from a CPU name: a fresh
copy of the run's model does a forward and backward pass on a batch of the run's shape, fp32 and bf16 autocast
interleaved, best of :data:`REPEATS` each, and bf16 is chosen when it is at least :data:`MARGIN` times faster.

The verdict is cached per CPU (its model name and flags), torch version, thread count, model config and batch shape
in ``$GPTLAB_CACHE/dtype-probe/``, so a run measures once; the run records the dtype it chose (its summary says why,
its checkpoints say which), and ``--resume`` keeps it whatever a later probe would say, so a resumed run stays
bit-exact.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import torch

from ..assets import cache_dir
from ..config import GPTConfig
from ..device import cpu_info
from ..files import atomic_write_bytes

REPEATS = 3
MARGIN = 1.15  # bf16 must beat fp32 by this much: a verdict within noise keeps fp32's exact arithmetic


def cpu_bf16_verdict(cfg: GPTConfig, batch: int) -> dict[str, Any]:
    """``{"dtype": "bfloat16" | "float32", "fp32_s", "bf16_s", "cached"}`` for a CPU run of model ``cfg`` at
    ``batch`` sequences of ``cfg.block_size`` tokens (measured once, then read from the cache)."""
    key = json.dumps([*cpu_info(), torch.__version__, torch.get_num_threads(), cfg.to_dict(), batch], sort_keys=True)
    path = cache_dir() / "dtype-probe" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key and cached.get("dtype") in ("float32", "bfloat16"):
            return {**cached["result"], "cached": True}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    result = _measure(cfg, batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({"key": key, "dtype": result["dtype"], "result": result}).encode())
    return {**result, "cached": False}


def _measure(cfg: GPTConfig, batch: int) -> dict[str, Any]:
    from ..model import GPT

    with torch.random.fork_rng(devices=[]):  # the run's own random streams are not touched
        torch.manual_seed(0)
        model = GPT(cfg).train()
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
        best = {"float32": float("inf"), "bfloat16": float("inf")}
        for i in range(REPEATS + 1):  # the first round warms both up
            for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    loss = model(x, x)[1]
                loss.backward()
                model.zero_grad(set_to_none=True)
                if i:
                    best[name] = min(best[name], time.perf_counter() - t0)
    ratio = best["float32"] / best["bfloat16"]
    return {
        "dtype": "bfloat16" if ratio >= MARGIN else "float32",
        "fp32_s": round(best["float32"], 4),
        "bf16_s": round(best["bfloat16"], 4),
        "speedup": round(ratio, 3),
    }
