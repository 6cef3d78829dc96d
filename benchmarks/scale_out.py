"""Training on 1, 2 and 4 processes (FSDP2 over gloo; and 4 as 2 data-parallel groups x 2 tensor-parallel ranks) and
on 2 simulated hosts x 2 processes, on this machine: throughput, and each rank's memory against what
``gptlab plan train`` predicts for the same configuration.

The model is GPT-2 124M's shape on a character vocabulary (65 tokens, so the blocks dominate), 256-token windows,
4 sequences per process per step, fp32, 6 steps (the summary's steady-state tokens per second leaves the first step
out). Memory, two ways per rank: the tensors by kind at the step's high-water mark (``--track-memory``: PyTorch's
MemTracker / FSDPMemTracker over the second step of a separate 2-step run) against the planner's ``peak`` for
ZeRO-3 over the same processes (and TP 2), part by part; and the peak resident set (``VmHWM``), which also holds
the Python and PyTorch runtime, gloo's buffers and what the allocator keeps. The simulated hosts (network
namespaces joined by a veth pair) need root; without it that row is left out. Ends with one JSON line.

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


def train_args(data: str, out: Path, parallel: str, tp: int = 1, track: bool = False) -> list[str]:
    """A run of STEPS steps (throughput, peak RSS), or with ``track`` one of 2 that measures its second step's tensors
    (the trackers' own bookkeeping costs resident memory, so the two are separate runs)."""
    steps = 2 if track else STEPS
    return ["-m", "gptlab", "train", "--data", data, "--model", "gpt2", "--block-size", str(BLOCK), "--batch-size",
            str(BATCH), "--max-iters", str(steps), "--eval-interval", str(steps), "--eval-iters", "1",
            "--final-eval-tokens", "2048", "--dtype", "float32", "--parallel", parallel, "--tp", str(tp),
            "--device", "cpu", "--out-dir", str(out), "--json", *(["--track-memory"] if track else [])]  # fmt: skip


def summary(p: subprocess.CompletedProcess) -> dict:
    if p.returncode != 0:
        raise SystemExit(f"benchmark run failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def runtime_mib() -> float:
    code = "import gptlab.train.trainer, torch.distributed; from gptlab.train.distributed import resident_mib; " \
           "print(resident_mib('VmHWM'))"  # fmt: skip
    return float(subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True).stdout)


def planned_mib(ranks: int, tp: int = 1) -> dict[str, float]:
    p = subprocess.run([sys.executable, "-m", "gptlab", "plan", "train", "gpt2", "--tokens", "1M", "--precision",
                        "fp32", "--zero", "3", "--dp", str(ranks // tp), "--tp", str(tp), "--micro-batch",
                        str(BATCH), "--seq-len", str(BLOCK), "--set", "vocab_size=65", "--set", f"n_ctx={BLOCK}",
                        "--hardware", "cpu", "--json"], env=ENV, capture_output=True, text=True,
                       check=True)  # fmt: skip
    return {k: v / 2**20 for k, v in json.loads(p.stdout)["memory_per_device"].items()}


def on_hosts(data: str, out: Path, track: bool = False) -> dict | None:
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
             *train_args(data, out, "fsdp", track=track)],
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
            env = {**ENV, "OMP_NUM_THREADS": str(max(1, 2 // ranks))}  # the machine's 2 cores, shared
            name = "1 process" if ranks == 1 else f"{ranks} processes, FSDP" + (f" x TP {tp}" if tp > 1 else "")
            runs = {}
            for kind, track in (("run", False), ("tracked", True)):
                parallel = "fsdp+tp" if tp > 1 else "fsdp"
                cmd = [sys.executable, *launcher, *train_args(data, out / kind, parallel, tp, track)]
                runs[kind] = summary(subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True))
            run, tracked = runs["run"], runs["tracked"]
            rows.append((name, ranks, tp, {**run, "tensor_memory_mib": tracked["tensor_memory_mib"]}))
        hosts, tracked = (on_hosts(data, Path(tmp) / f"hosts-{track}", track) for track in (False, True))
        if hosts is not None and tracked is not None:
            rows.append(
                ("2 simulated hosts x 2, FSDP", 4, 1, {**hosts, "tensor_memory_mib": tracked["tensor_memory_mib"]})
            )
    results = []
    for name, ranks, tp, s in rows:
        peaks, tensors = s["peak_memory_mib"], s["tensor_memory_mib"]
        plan = planned_mib(ranks, tp)
        worst = max(tensors, key=lambda t: t["peak"])
        results.append({
            "setup": name, "ranks": ranks, "tp": tp, "tokens_per_second": s["tokens_per_second"],
            "tensor_mib_worst_rank": worst, "planned_mib": {k: round(v, 1) for k, v in plan.items()},
            "tensor_peak_over_planned": round(worst["peak"] / plan["peak"], 3),
            "peak_rss_mib_per_rank": peaks, "runtime_mib": round(base),
            "rss_over_planned": round(max(peaks) / plan["peak"], 2),
        })  # fmt: skip
        r = results[-1]
        print(f"{name:30s} {r['tokens_per_second']:>7} tok/s  tensors {worst['peak']:6.0f} MiB / planner "
              f"{plan['peak']:6.0f} MiB = {r['tensor_peak_over_planned']:.3f}; peak RSS {max(peaks):6.0f} MiB "
              f"({r['rss_over_planned']:.2f}x the planner)", file=sys.stderr)  # fmt: skip
    print(json.dumps({"benchmark": "scale_out", "cpu": cpu_name(), "model": "gpt2 shape, vocab 65", "batch": BATCH,
                      "block": BLOCK, "steps": STEPS, "results": results}))  # fmt: skip


if __name__ == "__main__":
    main()
