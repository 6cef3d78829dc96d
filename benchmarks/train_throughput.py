"""Training throughput: gptlab against Hugging Face transformers on the same architecture, batch and optimizer.

For each case, in one run on this machine:
- ``hf``: ``GPT2LMHeadModel`` (same config, dropout 0), AdamW with the same hyperparameters and weight-decay groups,
  forward with ``labels=``, backward, clip 1.0, step: the loop a transformers user writes.
- ``gptlab``: the real ``gptlab train`` command on a synthetic dataset of the same shape, one process.
- ``gptlab_compile``: the same with ``--compile`` (baby only: at 124M compilation buys nothing here).
- ``gptlab_ddp2``: the same under torchrun, two single-threaded processes, each with half the batch (same global
  batch, so the same optimization).
- ``nanogpt`` (with ``--nanogpt DIR``, a nanoGPT checkout's ``model.py``): nanoGPT's ``GPT`` with the same config
  (bias, dropout 0), its own ``configure_optimizers`` (weight-decay groups; its fused AdamW is CUDA-only), forward
  with targets, backward, clip, step. nanoGPT's ``train.py`` runs CPU steps without autocast; here bf16 runs it
  under CPU autocast, as its ``train.py`` does on a GPU.
Throughput excludes the first step (warm-up, compilation), evaluation and checkpoint writes for every contestant.
``--dtype bfloat16`` runs every contestant under bf16 autocast instead (HF too), for CPUs with AVX512-BF16/AMX.
Ends with one JSON line of all figures.

    python benchmarks/train_throughput.py [--cases baby,gpt2] [--steps-baby 300] [--steps-gpt2 6] [--dtype float32]
        [--nanogpt .artifacts/nanoGPT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import gptlab_train, synthetic_dataset

CASES = {  # preset, vocab, batch, context, also try torch.compile
    "baby": ("baby", 65, 12, 64, True),
    "gpt2": ("gpt2", 50257, 4, 256, False),
}


def hf_tokens_per_second(preset_name: str, vocab: int, B: int, T: int, steps: int, threads: int, dtype: str) -> float:
    import transformers

    from gptlab.config import preset

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    c = preset(preset_name)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_embd=c.n_embd,
            n_positions=T,
            vocab_size=vocab,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-3,
        betas=(0.9, 0.99),
    )
    data = torch.randint(0, vocab, (steps + 1, B, T))
    return timed_steps(lambda i: model(data[i], labels=data[i]).loss, params, opt, steps, B * T, dtype)


def timed_steps(loss_of, params, opt, steps: int, tokens: int, dtype: str) -> float:
    """Tokens/s over ``steps`` training steps after one warm-up step: ``loss_of(i)`` (under bf16 autocast for
    ``dtype`` bfloat16), backward, clip at 1.0, optimizer step."""
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    t = 0.0
    for i in range(steps + 1):
        if i == 1:
            t = time.perf_counter()
        with amp:
            loss = loss_of(i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * tokens / (time.perf_counter() - t)


def nanogpt_tokens_per_second(
    src: str, preset_name: str, vocab: int, B: int, T: int, steps: int, threads: int, dtype: str
) -> float:
    import importlib.util

    from gptlab.config import preset

    spec = importlib.util.spec_from_file_location("nanogpt_model", Path(src) / "model.py")
    assert spec is not None and spec.loader is not None
    nano = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nano)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    c = preset(preset_name)
    cfg = nano.GPTConfig(block_size=T, vocab_size=vocab, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                         dropout=0.0, bias=True)  # fmt: skip
    model = nano.GPT(cfg).train()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    data = torch.randint(0, vocab, (steps + 1, B, T + 1))
    params = list(model.parameters())
    return timed_steps(lambda i: model(data[i, :, :-1].contiguous(), data[i, :, 1:].contiguous())[1], params, opt,
                       steps, B * T, dtype)  # fmt: skip


def gptlab_tokens_per_second(
    preset_name: str,
    vocab: int,
    B: int,
    T: int,
    steps: int,
    data: Path,
    out: Path,
    nproc: int,
    threads: int,
    extra: list[str],
) -> float:
    args = [
        "--data",
        str(data),
        "--out-dir",
        str(out),
        "--model",
        preset_name,
        "--block-size",
        str(T),
        "--batch-size",
        str(B // nproc),
        "--max-iters",
        str(steps + 1),
        "--eval-interval",
        str(10**9),
        "--eval-iters",
        "1",
        "--final-eval-tokens",
        str(T * 4),
        "--checkpoint-interval",
        "0",
        "--log-interval",
        str(10**9),
        "--lr",
        "1e-3",
        "--beta2",
        "0.99",
        "--weight-decay",
        "0.1",
        "--grad-clip",
        "1.0",
        "--warmup-iters",
        "0",
        "--threads",
        str(threads),
        "--device",
        "cpu",
        *extra,
    ]
    return gptlab_train(args, nproc=nproc, threads=threads)["tokens_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="baby,gpt2")
    ap.add_argument("--steps-baby", type=int, default=300)
    ap.add_argument("--steps-gpt2", type=int, default=6)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--nanogpt", help="a nanoGPT checkout (its model.py): the second peer")
    args = ap.parse_args()
    cores = torch.get_num_threads()
    half = max(1, cores // 2)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            preset_name, vocab, B, T, try_compile = CASES[case]
            steps = getattr(args, f"steps_{case}")
            data = synthetic_dataset(Path(tmp) / case, vocab)
            extra = ["--dtype", args.dtype]

            def ours(name: str, nproc: int, threads: int, flags: list[str]) -> float:
                return gptlab_tokens_per_second(
                    preset_name, vocab, B, T, steps, data, Path(tmp) / f"{case}-{name}", nproc, threads, extra + flags
                )

            r = {
                "batch": B,
                "context": T,
                "steps": steps,
                "dtype": args.dtype,
                "hf": hf_tokens_per_second(preset_name, vocab, B, T, steps, cores, args.dtype),
                "gptlab": ours("one", 1, cores, []),
            }
            if args.nanogpt:
                r["nanogpt"] = nanogpt_tokens_per_second(
                    args.nanogpt, preset_name, vocab, B, T, steps, cores, args.dtype
                )
            if try_compile:
                r["gptlab_compile"] = ours("compile", 1, cores, ["--compile"])
            r["gptlab_ddp2"] = ours("ddp2", 2, half, [])
            contestants = [k for k in r if k.startswith("gptlab")]
            r["best"] = max(contestants, key=r.get)
            r["ratio_vs_hf"] = r[r["best"]] / r["hf"]
            if args.nanogpt:
                r["ratio_vs_nanogpt"] = r[r["best"]] / r["nanogpt"]
            results[case] = r
            print(
                f"{case:5s} B={B} T={T} {args.dtype}: hf {r['hf']:,.0f} tok/s | nanogpt {r.get('nanogpt', 0):,.0f} | "
                + " | ".join(f"{k} {r[k]:,.0f} ({r[k] / r['hf']:.2f}x)" for k in contestants),
                flush=True,
            )
    print(
        json.dumps(
            {
                "benchmark": "train_throughput",
                "torch": torch.__version__,
                "threads": cores,
                **{
                    c: {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for c, r in results.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
