"""Where a training step's time goes: one step of GPT-2 124M (B=4, T=256 by default) as ``gptlab train`` takes it
(the model's forward with the fused head and loss, backward, clip at 1.0 and fused AdamW as the trainer does),
under bf16 autocast or in fp32, profiled with ``torch.profiler``; and the GEMM limits of this CPU, ``torch.mm`` on
the step's own shapes in fp32 and bf16, as tokens/s (matmul FLOPs per token: 6 x the matmul weights, tied head
once, plus attention's 12 L T d). Prints the profiler's table, then one JSON line.

    python benchmarks/train_profile.py [--dtype bfloat16] [--batch 4] [--context 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptlab.config import preset
from gptlab.hugepages import keep_freed_memory_in_heap
from gptlab.model import GPT
from gptlab.train.optim import clip_and_step


def gemm_flops(dtype: torch.dtype, m: int, k: int, n: int, reps: int = 20) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * m * k * n / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory_in_heap()  # as the trainer does
    cfg = preset("gpt2")
    torch.manual_seed(0)
    model = GPT(cfg)
    B, T, d = args.batch, args.context, cfg.n_embd
    weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "wpe" not in n)
    per_token = 6 * weights + 12 * cfg.n_layer * d * T
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    idx, targets = torch.randint(0, cfg.vocab_size, (B, T)), torch.randint(0, cfg.vocab_size, (B, T))
    autocast = args.dtype == "bfloat16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            _, loss = model(idx, targets)
        loss.backward()
        clip_and_step(opt, list(model.parameters()), 1.0)
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
    ffn = 4 * d
    shapes = [(B * T, d, 3 * d), (B * T, d, ffn), (B * T, ffn, d), (B * T, d, d), (d, B * T, ffn)]
    limits = {}
    for dtype in (torch.float32, torch.bfloat16):
        rates = [gemm_flops(dtype, *s) for s in shapes]
        mean = sum(rates) / len(rates)
        limits[str(dtype).removeprefix("torch.")] = {
            "gemm_flops": round(mean),
            "by_shape": [round(r) for r in rates],
            "limit_tok_s": round(mean / per_token, 1),
        }
    tok_s = B * T / min(times)
    ops = {e.key: round(e.self_cpu_time_total / 1e3, 1) for e in prof.key_averages()}
    top = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:20])
    print(json.dumps({
        "dtype": args.dtype, "batch": B, "context": T, "threads": args.threads,
        "step_s": round(min(times), 4), "tok_s": round(tok_s, 1), "flops_per_token": per_token,
        "limits": limits, "of_limit": round(tok_s / limits[args.dtype]["limit_tok_s"], 3),
        "self_ms_by_operator": top,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
