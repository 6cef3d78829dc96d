"""Quantization and speculative decoding, measured (docs/benchmarks.md, "Past the fp32 roofline").

``accuracy``: held-out perplexity (the first ``--eval-tokens`` of a prepared dataset's validation split, in
non-overlapping windows) of trained
models in fp32, int8, int4 with groups of 32/64/128, and int4 g64 with the tied head kept in float; the minimum and
mean SQNR over the quantized layers.

``speed``: GPT-2 124M (random weights: speed does not depend on them), batch 1 and 8, a 16-token prompt and 64 new
tokens greedy, 2 threads, each configuration in its own process (weight bytes, peak resident memory, tok/s): gptlab
fp32 / int8 / int4 g64, eager and compiled; llama.cpp (llama-cpp-python, same threads) on the same weights exported by
``gptlab convert`` as f32 / q8_0 / q4_0, batch 1; with ``--llama-batched-bench PATH``, also llama.cpp's own
``llama-batched-bench`` on those files at batch 1 and 8 (8 sequences decoded together, its tokens/s of generation;
``--no-repack``: llama.cpp 0.3.36's repacked q8_0/q4_0 kernels segfault on batches on AMX CPUs). Build it from the
llama.cpp source vendored in llama-cpp-python's sdist, as ``llama-server`` (``benchmarks/serve.py``), with
``cmake --build build --target llama-batched-bench``. Also the memory bandwidth measured here (in every round, in its
own process: the best of each probe; also the read rate of the fp32 decode steps at batch 1, which read every weight
once a token) and the bound it sets, bytes read per token / the fastest of those reads.

``speculative``: a trained model decoding a copy-heavy prompt and prose (greedy, and sampled at temperature 1),
plain vs each draft (``--drafts``: the n-gram lookup, the model's own int8 copy; ``--draft-model``: another model),
tok/s end to end (prefill included), acceptance, and Leviathan's predicted speedup.

    python benchmarks/quant.py accuracy --model runs/demo --data data/shakespeare-char ...
    python benchmarks/quant.py speed
    python benchmarks/quant.py speculative --model RUN --draft-model RUN2 --prompt-file F
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from common import batched_bench_tok_s, llama_decode_seconds, llama_model  # noqa: E402

from gptlab import hugepages  # noqa: E402
from gptlab.checkpoint import save_model_checkpoint  # noqa: E402
from gptlab.config import preset  # noqa: E402
from gptlab.data.loader import TokenWindows  # noqa: E402
from gptlab.generate.engine import Engine, Sampling  # noqa: E402
from gptlab.loader import load_model  # noqa: E402
from gptlab.model import GPT  # noqa: E402
from gptlab.plan.hardware import measure_cpu  # noqa: E402
from gptlab.quant.quantize import QuantLinear, quantize_model, sqnr_db, weight_bytes  # noqa: E402

VARIANTS = {  # name: (mode, group size, excluded layers)
    "fp32": (None, 0, ()),
    "int8": ("int8", 0, ()),
    "int4-g32": ("int4", 32, ()),
    "int4-g64": ("int4", 64, ()),
    "int4-g128": ("int4", 128, ()),
    "int4-g64-float-head": ("int4", 64, ("lm_head",)),
}


@torch.no_grad()
def perplexity(model: GPT, data: str, max_tokens: int) -> float:
    windows = TokenWindows(data, "val", model.config.block_size)
    total = count = 0.0
    for x, y in windows.sequential(16, max_tokens):
        _, loss = model(x, y)
        total += float(loss) * y.numel()
        count += y.numel()
    return math.exp(total / count)


def round_inputs_as_the_kernels(model: GPT, names, mode: str, group: int) -> None:
    """Round the inputs of layers ``names`` as gptlab's AVX2 kernels do when they decode (up to 16 rows per call;
    gptlab/kernels.py): int8 weights, to int16 per row (scale max|x_row| / 32767); int4, to int8 per group of
    ``group`` columns (scale max|x_group| / 127; the zero points' share uses x itself, which this rounding of the
    whole input overstates slightly)."""
    levels, width = (32767, None) if mode == "int8" else (127, group)

    def hook(_module, inputs):
        (x,) = inputs
        g = x.unflatten(-1, (-1, width or x.size(-1)))
        xs = g.abs().amax(-1, keepdim=True).clamp(min=1e-30) / levels
        return ((torch.round(g * (1 / xs)) * xs).flatten(-2),)

    for n in names:
        model.get_submodule(n).register_forward_pre_hook(hook)


def accuracy(args) -> dict:
    out = {}
    for source, data in zip(args.model, args.data):
        rows = {}
        for name, (mode, group, exclude) in VARIANTS.items():
            model = load_model(source, "cpu").model
            floats = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
            row: dict = {}
            evaluated = model
            if mode and group and any(m.in_features % group for m in model.modules() if isinstance(m, torch.nn.Linear)):
                rows[name] = {"skipped": f"a layer's width is not a multiple of {group}"}
                continue
            if mode:
                quantize_model(model, mode, group or 64, exclude)
                layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
                sq = [sqnr_db(floats[n], m.dequantized()) for n, m in layers]
                row["sqnr_db_min"], row["sqnr_db_mean"] = round(min(sq), 2), round(sum(sq) / len(sq), 2)
                # The float model holding the dequantized weights computes what the kernels compute (tested in
                # tests/test_quant.py) at the speed of BLAS; a second copy also rounds the layers' inputs as
                # gptlab's AVX2 kernels do when decoding. One 16-token window through the real kernels checks it.
                evaluated, emulated = load_model(source, "cpu").model, load_model(source, "cpu").model
                with torch.no_grad():
                    for n, m in layers:
                        evaluated.get_submodule(n).weight.copy_(m.dequantized())
                        emulated.get_submodule(n).weight.copy_(m.dequantized())
                    round_inputs_as_the_kernels(emulated, [n for n, _ in layers], mode, group or 64)
                    x, y = next(TokenWindows(data, "val", 16).sequential(1))
                    row["kernel_vs_emulation_loss"] = abs(float(model(x, y)[1]) - float(emulated(x, y)[1]))
                row["perplexity_rounded_activations"] = round(perplexity(emulated, data, args.eval_tokens), 4)
            row["perplexity"] = round(perplexity(evaluated, data, args.eval_tokens), 4)
            row["weight_bytes"] = weight_bytes(model)
            rows[name] = row
        base = rows["fp32"]["perplexity"]
        for row in rows.values():
            if "perplexity" in row:
                row["delta_ppl_percent"] = round(100 * (row["perplexity"] / base - 1), 3)
            if "perplexity_rounded_activations" in row:
                row["delta_ppl_percent_rounded_activations"] = round(
                    100 * (row["perplexity_rounded_activations"] / base - 1), 3
                )
        out[str(source)] = {"params": load_model(source, "cpu").model.num_params(), "data": data, "variants": rows}
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (VmHWM: ru_maxrss would carry over the parent's peak
    through fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def _one(args) -> None:
    """A child process: decode with one configuration, print one JSON line."""
    torch.set_num_threads(args.threads)
    cfg = preset("gpt2")
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    if args.mode != "fp32":
        mode, _, group = args.mode.partition("-g")
        quantize_model(model, mode, int(group or 64))
    engine = Engine(model, compile=args.compile)
    prompts = [[int(t) for t in torch.randint(0, 50257, (16,))] for _ in range(args.batch)]
    engine.generate_tokens(prompts, 8, Sampling(temperature=0))  # warm-up (and compilation)
    best = math.inf
    for _ in range(2):
        engine.generate_tokens(prompts, args.new, Sampling(temperature=0))
        best = min(best, engine.stats["decode_seconds"] / max(1, engine.stats["decode_steps"]))
    print(json.dumps({
        "tok_s": args.batch / best,
        "weight_bytes": weight_bytes(model),
        "peak_rss_mb": peak_rss_mb(),
    }))  # fmt: skip


def _llama_one(args) -> None:
    llm = llama_model(args.gguf, 256, args.threads, n_batch=64)
    prompt = [int(t) for t in torch.randint(0, 50256, (16,), generator=torch.Generator().manual_seed(0))]
    best = llama_decode_seconds(llm, prompt, args.new)
    print(json.dumps({"tok_s": 1 / best, "peak_rss_mb": peak_rss_mb(),
                      "file_bytes": os.path.getsize(args.gguf)}))  # fmt: skip


def _batched_bench(args) -> None:
    """A child process: llama.cpp's ``llama-batched-bench`` on ``--gguf`` at ``--batch`` (16-token prompts)."""
    tok_s = batched_bench_tok_s(args.llama_batched_bench, args.gguf, args.batch, 16, args.new, args.threads)
    print(json.dumps({"tok_s": tok_s, "file_bytes": os.path.getsize(args.gguf)}))


def _child(*argv: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": str(ARGS.threads)}
    r = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True)
    if r.returncode:
        return {"error": r.stderr[-600:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def bandwidth() -> dict[str, float]:
    """Bytes per second of a large copy (read + written, best of 5), of a large read (the planner's probe,
    :func:`gptlab.plan.hardware.measure_cpu`: a sum over 256 MB) and of the same read from huge pages, where an
    Engine keeps its weights (:mod:`gptlab.hugepages`; 4 KiB pages read slower: the prefetchers stop at each)."""

    def best_seconds(fn) -> float:
        best = math.inf
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    a, b = torch.ones(64 * 2**20), torch.ones(64 * 2**20)  # touched: untouched pages would all read the zero page
    out = {"copy": 2 * a.nbytes / best_seconds(lambda: b.copy_(a)), "read": measure_cpu().bandwidth}
    if hugepages.available():
        huge = hugepages.region(a.nbytes).view(torch.float32).fill_(1.0)
        huge.sum()
        out["read_huge_pages"] = huge.nbytes / best_seconds(huge.sum)
    return out


def _bandwidth(args) -> None:
    """A child process: :func:`bandwidth`, one JSON line."""
    torch.set_num_threads(args.threads)
    print(json.dumps(bandwidth()))


def speed(args) -> dict:
    """Every configuration in its own process, the whole list ``--repeats`` times in turn (this VM's speed drifts by
    tens of percent over minutes: interleaving exposes every configuration to the same drift); the best run counts."""
    configs: list[tuple[dict, list[str]]] = []
    for mode in args.modes.split(","):
        for compiled in {"eager": (False,), "compiled": (True,), "both": (False, True)}[args.steps]:
            for batch in (1, 8):
                flags = ["--mode", mode, "--batch", str(batch), "--new", str(args.new), "--threads", str(args.threads)]
                row = {"engine": "gptlab", "mode": mode, "compiled": compiled, "batch": batch}
                configs.append((row, ["one", *flags, *(["--compile"] if compiled else [])]))
    rows = [row for row, _ in configs]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            import llama_cpp  # noqa: F401

            torch.manual_seed(0)
            model = GPT(preset("gpt2")).eval()
            save_model_checkpoint(Path(tmp) / "ck", model.state_dict(), model.config, {"kind": "gpt2"})
            for t in ("f32", "q8_0", "q4_0"):
                f = Path(tmp) / f"m-{t}.gguf"
                env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
                subprocess.run([sys.executable, "-m", "gptlab", "convert", str(Path(tmp) / "ck"), str(f),
                                "--gguf-type", t], env=env, check=True, capture_output=True)  # fmt: skip
                row = {"engine": "llama.cpp", "mode": t, "compiled": None, "batch": 1}
                argv = ["llama", "--gguf", str(f), "--new", str(args.new), "--threads", str(args.threads)]
                configs.append((row, argv))
                rows.append(row)
                for batch in (1, 8) if args.llama_batched_bench else ():
                    row = {"engine": "llama-batched-bench", "mode": t, "compiled": None, "batch": batch}
                    configs.append((row, ["batched", "--gguf", str(f), "--batch", str(batch), *argv[3:],
                                          "--llama-batched-bench", args.llama_batched_bench]))  # fmt: skip
                    rows.append(row)
        except ImportError:
            rows.append({"engine": "llama.cpp", "skipped": "llama-cpp-python is not installed"})
        configs.append(({"bandwidth": True}, ["bandwidth", "--threads", str(args.threads)]))  # every round: drift
        bws: dict[str, float] = {}
        for _ in range(args.repeats):
            for row, argv in configs:
                r = _child(*argv)
                if "bandwidth" in row:
                    bws.update({k: max(v, bws.get(k, 0.0)) for k, v in r.items() if isinstance(v, float)})
                    continue
                if "tok_s" in r:
                    row.setdefault("runs", []).append(round(r["tok_s"], 2))
                    r["tok_s"] = max(r["tok_s"], row.get("tok_s", 0.0))
                row.update(r)
    for r in rows:  # an fp32 decode step at batch 1 reads every weight once: what it reached, memory could too
        if r.get("mode") in ("fp32", "f32") and r.get("batch") == 1 and "tok_s" in r:
            key = f"decode_{r['engine']}_f32"
            bws[key] = max(bws.get(key, 0.0), r["tok_s"] * (r.get("weight_bytes") or r["file_bytes"]))
    bw = max(bws.values())  # the roofline: the fastest of the best reads (decoding only reads the weights)
    for r in rows:
        nbytes = r.get("weight_bytes") or r.get("file_bytes")
        if nbytes and "tok_s" in r:
            r["bound_tok_s"] = round(r["batch"] * bw / nbytes, 1)  # every weight read once per step
            r["of_bound"] = round(r["tok_s"] / r["bound_tok_s"], 3)
    fp32 = {(r["batch"], r["compiled"]): r["tok_s"] for r in rows if r.get("mode") == "fp32" and "tok_s" in r}
    for r in rows:  # against fp32 compiled where it ran (--steps both|compiled), else fp32 eager
        base = fp32.get((r.get("batch"), True)) or fp32.get((r.get("batch"), False))
        if r.get("engine") == "gptlab" and "tok_s" in r and base:
            r["vs_fp32"] = round(r["tok_s"] / base, 3)
    return {"threads": args.threads, "new_tokens": args.new, "bandwidth_bytes_per_s": bws, "rows": rows}


def speculative(args) -> dict:
    from gptlab.loader import load_draft

    loaded = load_model(args.model[0], "cpu")
    tok = loaded.tokenizer
    text = Path(args.prompt_file).read_text(encoding="utf-8")
    block = loaded.config.block_size
    prose = tok.encode(text[: 4 * block])[: block // 2]
    # a passage, a blank line, and the passage's first 8 tokens again: the rest can be copied (a quote, an edit)
    passage = prose[: 3 * block // 8]
    copy = passage + tok.encode("\n\n") + passage[:8]
    drafts = {name: load_draft(name, loaded) for name in args.drafts.split(",")}
    if args.draft_model:
        drafts["model"] = load_draft(args.draft_model, loaded)
    greedy, sampled = Sampling(temperature=0), Sampling(temperature=1.0, seed=0)
    cases = {"copy-heavy, greedy": (copy, greedy), "prose, greedy": (prose, greedy), "prose, sampled": (prose, sampled)}
    out = {}
    for cname, (prompt, sampling) in cases.items():
        new = min(args.new, block - len(prompt) - args.spec_k - 2)
        plain = Engine(loaded.model)
        plain.generate_tokens([prompt], 4, sampling)  # warm-up
        t0 = time.perf_counter()
        ref = plain.generate_tokens([prompt], new, sampling)[0].tokens
        base = len(ref) / (time.perf_counter() - t0)
        row = {"plain_tok_s": round(base, 2)}
        for dname, draft in drafts.items():
            e = Engine(loaded.model, draft=draft, spec_k=args.spec_k)
            t0 = time.perf_counter()
            got = e.generate_tokens([prompt], new, sampling)[0].tokens
            tps = len(got) / (time.perf_counter() - t0)
            row[dname] = {"tok_s": round(tps, 2), "speedup": round(tps / base, 3), **e.stats["speculative"]}
            if sampling.temperature == 0:
                row[dname]["identical"] = got == ref
        out[cname] = row
    return {"model": str(args.model[0]), "spec_k": args.spec_k, "new_tokens": args.new, "cases": out}


ARGS: argparse.Namespace


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=["accuracy", "speed", "speculative", "one", "llama", "batched", "bandwidth"])
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument("--data", action="append", default=[])
    ap.add_argument("--draft-model")
    ap.add_argument("--drafts", default="ngram,int8", help="speculative: drafts that need no other model")
    ap.add_argument("--prompt-file", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--spec-k", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=32768, help="accuracy: held-out tokens per model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--mode", default="fp32")
    ap.add_argument("--modes", default="fp32,int8,int4-g64", help="speed: the gptlab weight formats to measure")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="speed: passes over all configurations, in turn")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", default="both", choices=["eager", "compiled", "both"], help="speed: gptlab's steps")
    ap.add_argument("--gguf")
    ap.add_argument("--llama-batched-bench", help="speed: llama.cpp's llama-batched-bench binary, a batch-8 peer")
    ARGS = args = ap.parse_args()
    if args.part == "one":
        return _one(args)
    if args.part == "llama":
        return _llama_one(args)
    if args.part == "batched":
        return _batched_bench(args)
    if args.part == "bandwidth":
        return _bandwidth(args)
    torch.set_num_threads(args.threads)
    result = {"accuracy": accuracy, "speed": speed, "speculative": speculative}[args.part](args)
    print(json.dumps({"benchmark": f"quant-{args.part}", **result}, default=float))


if __name__ == "__main__":
    main()
