"""Training on 1, 2 and 4 processes (FSDP2 over gloo; and 4 as 2 data-parallel groups x 2 tensor-parallel ranks) and
on 2 simulated hosts x 2 processes, on this machine: throughput, and each rank's peak memory against what
``gptlab plan train`` predicts for the same configuration.

The model is GPT-2 124M's shape on a character vocabulary (65 tokens, so the blocks dominate), 256-token windows,
4 sequences per process per step, fp32, 6 steps (the summary's steady-state tokens per second leaves the first step
out). Memory: the peak resident set of each rank (``VmHWM``, from the run's summary) minus the resident set of a
process that has only imported gptlab and PyTorch (the runtime the planner does not model), against the planner's
weights + gradients + optimizer + activations per device for ZeRO-3 over the same processes (and TP 2). The simulated
hosts (network namespaces joined by a veth pair) need root; without it that row is left out. Ends with one JSON line.

    python benchmarks/scale_out.py [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import cpu_name

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
BATCH, BLOCK, STEPS = 4, 256, 6


def train_args(data: str, out: Path, parallel: str, tp: int = 1) -> list[str]:
    return ["-m", "gptlab", "train", "--data", data, "--model", "gpt2", "--block-size", str(BLOCK), "--batch-size",
            str(BATCH), "--max-iters", str(STEPS), "--eval-interval", str(STEPS), "--eval-iters", "1",
            "--final-eval-tokens", "2048", "--dtype", "float32", "--parallel", parallel, "--tp", str(tp),
            "--device", "cpu", "--out-dir", str(out), "--json"]  # fmt: skip


def summary(p: subprocess.CompletedProcess) -> dict:
    if p.returncode != 0:
        raise SystemExit(f"benchmark run failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def runtime_mib() -> float:
    code = "import gptlab.train.trainer, torch.distributed; from gptlab.train.distributed import resident_mib; " \
           "print(resident_mib('VmHWM'))"  # fmt: skip
    return float(subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True).stdout)


def planned_mib(ranks: int, tp: int = 1) -> float:
    p = subprocess.run([sys.executable, "-m", "gptlab", "plan", "train", "gpt2", "--tokens", "1M", "--precision",
                        "fp32", "--zero", "3", "--dp", str(ranks // tp), "--tp", str(tp), "--micro-batch",
                        str(BATCH), "--seq-len",
                        str(BLOCK), "--set", "vocab_size=65", "--hardware", "cpu", "--json"], env=ENV,
                       capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(p.stdout)["memory_per_device"]["total"] / 2**20


def on_hosts(data: str, out: Path) -> dict | None:
    """2 network namespaces x 2 processes (as tests/test_scale_out.py builds them); None without root."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return None
    hosts = {"gptlab-bench-a": ("glb-a", "10.214.0.1"), "gptlab-bench-b": ("glb-b", "10.214.0.2")}
    sh = lambda *a: subprocess.run(a, check=True, capture_output=True)
    try:
        for ns in hosts:
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", "glb-a", "netns", "gptlab-bench-a", "type", "veth", "peer", "name", "glb-b", "netns",
           "gptlab-bench-b")  # fmt: skip
        for ns, (dev, ip) in hosts.items():
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        jobs = [subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
             "--nproc_per_node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "10.214.0.1:29651", "--rdzv-id",
             "bench", "--rdzv-conf", f"is_host={int(ns.endswith('a'))}", "--local-addr", ip,
             *train_args(data, out, "fsdp")],
            env={**ENV, "GLOO_SOCKET_IFNAME": dev}, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True) for ns, (dev, ip) in hosts.items()]  # fmt: skip
        done = [j.communicate() for j in jobs]
        if any(j.returncode for j in jobs):
            print("simulated hosts failed:\n" + "\n".join(err[-2000:] for _, err in done), file=sys.stderr)
            return None
        return json.loads(next(out for out, _ in done if out.strip()).strip().splitlines()[-1])
    except subprocess.CalledProcessError:
        return None
    finally:
        for ns in hosts:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="a char-level `gptlab prepare` folder (default: prepared here from Shakespeare)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if not data:
            data = str(Path(tmp) / "data")
            subprocess.run([sys.executable, "-m", "gptlab", "prepare", "shakespeare", "--tokenizer", "char",
                            "--out-dir", data], env=ENV, check=True, capture_output=True)  # fmt: skip
        base = runtime_mib()
        for ranks, tp in ((1, 1), (2, 1), (4, 1), (4, 2)):
            out = Path(tmp) / f"r{ranks}-tp{tp}"
            launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                              str(ranks)]  # fmt: skip
            cmd = [sys.executable, *launcher, *train_args(data, out, "fsdp+tp" if tp > 1 else "fsdp", tp)]
            env = {**ENV, "OMP_NUM_THREADS": str(max(1, 2 // ranks))}  # the machine's 2 cores, shared
            name = "1 process" if ranks == 1 else f"{ranks} processes, FSDP" + (f" x TP {tp}" if tp > 1 else "")
            rows.append((name, ranks, tp, summary(subprocess.run(cmd, env=env, cwd=REPO, capture_output=True,
                                                                 text=True))))  # fmt: skip
        hosts = on_hosts(data, Path(tmp) / "hosts")
        if hosts is not None:
            rows.append(("2 simulated hosts x 2, FSDP", 4, 1, hosts))
    results = []
    for name, ranks, tp, s in rows:
        peaks = s["peak_memory_mib"]
        plan = planned_mib(ranks, tp)
        results.append({
            "setup": name, "ranks": ranks, "tp": tp, "tokens_per_second": s["tokens_per_second"],
            "peak_rss_mib_per_rank": peaks, "runtime_mib": round(base), "measured_mib": round(max(peaks) - base),
            "planned_mib": round(plan), "measured_over_planned": round((max(peaks) - base) / plan, 2),
        })  # fmt: skip
        r = results[-1]
        print(f"{name:30s} {r['tokens_per_second']:>7} tok/s  peak/rank {max(peaks):7.0f} MiB - runtime {base:.0f} = "
              f"{r['measured_mib']:5d} MiB; planner {r['planned_mib']:5d} MiB ({r['measured_over_planned']:.2f}x)",
              file=sys.stderr)  # fmt: skip
    print(json.dumps({"benchmark": "scale_out", "cpu": cpu_name(), "model": "gpt2 shape, vocab 65", "batch": BATCH,
                      "block": BLOCK, "steps": STEPS, "results": results}))  # fmt: skip


if __name__ == "__main__":
    main()
