"""Decoding speed: gptlab's engine against Hugging Face `generate` in the same process, same weights, fp32.

GPT-2 124M (random weights: speed does not depend on them), a 32-token prompt, 128 new tokens, greedy:
- batch 1: HF `generate(use_cache=True)`, gptlab eager, gptlab with the compiled decode step (compile time reported
  apart, as a one-off);
- the same without a KV cache (every step re-runs the whole sequence): the cache's speedup;
- batch 8: total new tokens per second.
Each figure is the best of ``--repeats`` runs. Ends with one JSON line of every figure.

    .venv/bin/python benchmarks/decode.py [--threads N] [--repeats 2] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from gptlab.generate import Engine, Sampling
    from gptlab.interop.hf import config_from_hf, from_hf_state_dict
    from gptlab.model import GPT

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    cfg = config_from_hf(hf.config.to_dict())
    ours = GPT(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    P, N, B = args.prompt_tokens, args.new_tokens, args.batch
    greedy = Sampling(temperature=0)

    def hf_run(batch: int, cache: bool = True):
        x = torch.randint(0, 50257, (batch, P), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=N,
                min_new_tokens=N,
                do_sample=False,
                use_cache=cache,
                pad_token_id=50256,
            )[:, P:].tolist()

    def ours_run(engine: Engine, batch: int):
        x = torch.randint(0, 50257, (batch, P), generator=torch.Generator().manual_seed(1))
        return [c.tokens for c in engine.generate_tokens(x.tolist(), N, greedy)]

    @torch.no_grad()
    def ours_no_cache():  # the loop without a cache: each step runs the whole sequence again
        idx = torch.randint(0, 50257, (1, P), generator=torch.Generator().manual_seed(1))
        for _ in range(N):
            logits, _ = ours(idx)
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], 1)
        return idx[:, P:].tolist()

    eager, compiled = Engine(ours), Engine(ours, compile=True)
    r: dict[str, float | str | bool] = {
        "model": "gpt2 (124M, random weights)",
        "dtype": "float32",
        "threads": args.threads,
        "prompt_tokens": P,
        "new_tokens": N,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    same = hf_run(1) == ours_run(eager, 1)
    t0 = time.perf_counter()
    same &= ours_run(compiled, 1) == ours_run(eager, 1)
    r["compile_seconds"] = round(time.perf_counter() - t0, 1)
    r["greedy_tokens_identical"] = same
    for name, fn in [
        ("hf_b1", lambda: hf_run(1)),
        ("gptlab_eager_b1", lambda: ours_run(eager, 1)),
        ("gptlab_compiled_b1", lambda: ours_run(compiled, 1)),
    ]:
        r[f"{name}_tok_s"] = round(N / timed(fn, args.repeats), 2)
        print(f"{name:<22} {r[f'{name}_tok_s']:>8.2f} tok/s", flush=True)
    r["hf_no_cache_b1_tok_s"] = round(N / timed(lambda: hf_run(1, cache=False), 1), 2)
    r["gptlab_no_cache_b1_tok_s"] = round(N / timed(ours_no_cache, 1), 2)
    print(f"no cache: hf {r['hf_no_cache_b1_tok_s']:.2f}, gptlab {r['gptlab_no_cache_b1_tok_s']:.2f} tok/s", flush=True)
    ours_run(compiled, B)  # compile the batch shape
    for name, fn in [
        (f"hf_b{B}", lambda: hf_run(B)),
        (f"gptlab_eager_b{B}", lambda: ours_run(eager, B)),
        (f"gptlab_compiled_b{B}", lambda: ours_run(compiled, B)),
    ]:
        r[f"{name}_tok_s"] = round(B * N / timed(fn, args.repeats), 2)
        print(f"{name:<22} {r[f'{name}_tok_s']:>8.2f} tok/s (all rows)", flush=True)
    r["speedup_compiled_vs_hf_b1"] = round(r["gptlab_compiled_b1_tok_s"] / r["hf_b1_tok_s"], 2)
    r["speedup_eager_vs_hf_b1"] = round(r["gptlab_eager_b1_tok_s"] / r["hf_b1_tok_s"], 2)
    r["kv_cache_speedup_eager"] = round(r["gptlab_eager_b1_tok_s"] / r["gptlab_no_cache_b1_tok_s"], 2)
    r["kv_cache_speedup_compiled"] = round(r["gptlab_compiled_b1_tok_s"] / r["gptlab_no_cache_b1_tok_s"], 2)
    r[f"speedup_best_vs_hf_b{B}"] = round(
        max(r[f"gptlab_eager_b{B}_tok_s"], r[f"gptlab_compiled_b{B}_tok_s"]) / r[f"hf_b{B}_tok_s"], 2
    )
    print(
        f"batch 1: compiled {r['speedup_compiled_vs_hf_b1']}x HF, eager {r['speedup_eager_vs_hf_b1']}x HF; "
        f"KV cache {r['kv_cache_speedup_eager']}x (eager) / {r['kv_cache_speedup_compiled']}x (compiled) over "
        f"no cache; batch {B}: {r[f'speedup_best_vs_hf_b{B}']}x HF; greedy tokens identical: {same}"
    )
    print(json.dumps(r))


if __name__ == "__main__":
    main()
