"""Helpers shared by the benchmarks: a synthetic prepared dataset and running `gptlab train` for its summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from gptlab.data.shards import token_dtype, write_shard

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU's model name, for the figures' provenance."""
    from gptlab.device import cpu_info

    return cpu_info()[0]


def synthetic_dataset(path: Path, vocab_size: int, tokens: int = 2_000_000, seed: int = 0) -> Path:
    """Random tokens in gptlab's shard format: throughput does not depend on what the tokens say."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = token_dtype(vocab_size)
    files = {}
    for split, n in (("train", tokens), ("val", tokens // 10)):
        write_shard(path / f"{split}_000.bin", rng.integers(0, vocab_size, n).astype(dtype))
        files[split] = [f"{split}_000.bin"]
    spec = (
        {"kind": "gpt2"}
        if vocab_size == 50257
        else {"kind": "char", "chars": "".join(map(chr, range(33, 32 + vocab_size)))}
    )
    meta = {"format": "gptlab-tokens", "version": 1, "tokenizer": spec, "vocab_size": vocab_size,
            "eot_id": vocab_size - 1, "dtype": np.dtype(dtype).name, "files": files}  # fmt: skip
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def llama_model(path: str, n_ctx: int, threads: int, **kw):
    """llama-cpp-python's ``Llama`` for ``path``, safe on AMX CPUs (:func:`gptlab.interop.llama_peer.open_llama`)."""
    from gptlab.interop.llama_peer import open_llama

    return open_llama(path, n_ctx=n_ctx, n_threads=threads, **kw)


def llama_decode_seconds(llm, prompt: list[int], new: int, repeats: int = 3) -> float:
    """llama.cpp's best time per token, over ``repeats``, decoding ``new`` greedy tokens after ``prompt``."""
    import math
    import time

    best = math.inf
    for _ in range(repeats):
        llm.reset()
        llm.eval(prompt)
        t0 = time.perf_counter()
        for _, _tok in zip(range(new), llm.generate(prompt, temp=0.0, top_k=1, reset=False)):
            pass
        best = min(best, (time.perf_counter() - t0) / new)
    return best


def gptlab_train(args: list[str], nproc: int = 1, threads: int | None = None) -> dict:
    """Run `gptlab train --json` (under torchrun when nproc > 1) and return its summary."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    r = subprocess.run([*launcher, "-m", "gptlab", "train", "--json", *args], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"gptlab train failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def batched_bench_tok_s(binary: str, gguf: str, batch: int, prompt: int, new: int, threads: int) -> float:
    """llama.cpp's own ``llama-batched-bench``: ``batch`` sequences of ``prompt`` tokens, then ``new`` tokens each
    decoded together; its generation rate (S_TG, tokens/s over all sequences). ``--no-repack``: llama.cpp 0.3.36's
    repacked quantized kernels segfault on batches on AMX CPUs."""
    cmd = [binary, "-m", gguf, "-c", str(batch * (prompt + new) + 64), "-npp", str(prompt), "-ntg", str(new),
           "-npl", str(batch), "-t", str(threads), "-tb", str(threads), "--no-repack"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise SystemExit(f"llama-batched-bench exited {out.returncode}: {out.stderr[-400:]}")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines() if line.startswith("|")]
    return [float(r[7]) for r in rows if r[0].isdigit()][-1]  # columns: PP TG B N_KV T_PP S_PP T_TG S_TG T S
