"""SFT with LoRA, then GRPO with LoRA, on a real pretrained model, on a CPU: SmolLM2-135M-Instruct learning small
arithmetic word problems whose answers a program can check.

    python examples/grpo_arithmetic.py [--out runs/grpo-arithmetic] [--smoke]

1. Problems, generated here (no download): one- and two-step word problems with numbers up to 50 ("Ana has 23
   coins and finds 9 more. A friend gives Ana another 4. How many coins does Ana have?"). Train, RL and held-out
   problems are disjoint.
2. pass@1 (greedy, the last number of the answer against the true one) of SmolLM2-135M-Instruct on the held-out
   problems, through its own chat template.
3. SFT with LoRA on worked answers ("23 + 9 + 4 = 36. The answer is 36.").
4. GRPO with LoRA from the SFT model (its adapters merged, fresh ones trained), rewarded 1 for a right final
   number (``--rewards number``), evaluated on held-out problems every few steps.
5. pass@1 after each stage; ``summary.json``, ``grpo_arithmetic.png`` (reward and held-out accuracy against steps)
   and ``samples.md`` under ``--out``.

The same stages from the command line: ``gptlab align sft smollm2-135m-instruct --data sft.jsonl --lora-rank 16
...`` then ``gptlab align grpo RUN --data rl.jsonl --val-data heldout.jsonl --rewards number --lora-rank 16 ...``.
Figures from one run: docs/alignment.md.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from gptlab.align.config import AlignConfig
from gptlab.align.rewards import number
from gptlab.align.trainer import train_stage
from gptlab.chat import ChatTemplate
from gptlab.generate import Engine, Sampling
from gptlab.loader import load_model
from gptlab.metrics import read_rows
from gptlab.plotting import pyplot, save_png

MODEL = "smollm2-135m-instruct"
NAMES = ["Tom", "Ana", "Liam", "Mia", "Omar", "Sara", "Ken", "Lena", "Ravi", "Zoe", "Ivan", "Noor"]
THINGS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells", "stamps", "beads"]


def problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, worked answer, answer)."""
    n, t = rng.choice(NAMES), rng.choice(THINGS)
    a, b, c = rng.randint(2, 50), rng.randint(2, 30), rng.randint(1, 20)
    kind = rng.randrange(5)
    if kind == 0:
        q, e, r = f"{n} has {a} {t} and buys {b} more. How many {t} does {n} have now?", f"{a} + {b}", a + b
    elif kind == 1:
        x = a + b
        q, e, r = f"{n} has {x} {t} and gives {b} away. How many {t} does {n} have left?", f"{x} - {b}", a
    elif kind == 2:
        q = f"{n} has {a} {t} and finds {b} more. A friend gives {n} another {c}. How many {t} does {n} have?"
        e, r = f"{a} + {b} + {c}", a + b + c
    elif kind == 3:
        x = a + b
        q = f"{n} had {x} {t}, lost {b} of them, then got {c} new ones. How many {t} does {n} have now?"
        e, r = f"{x} - {b} + {c}", a + c
    else:
        q = f"{n} has {a} {t}. {n}'s sister has {b} more {t} than {n}. How many {t} do they have together?"
        e, r = f"{a} + {a} + {b}", 2 * a + b
    return q, f"{e} = {r}. The answer is {r}.", r


def write_data(out: Path, n_sft: int, n_rl: int, n_val: int, seed: int = 0) -> dict[str, Path]:
    """Disjoint problem sets (no question appears twice), as JSON lines with the chat template applied."""
    tok = load_model(MODEL, "cpu").tokenizer
    chat = ChatTemplate.of(tok)
    rng, seen = random.Random(seed), set()
    sets: dict[str, list[dict]] = {"sft": [], "rl": [], "heldout": []}
    for name, n in (("heldout", n_val), ("sft", n_sft), ("rl", n_rl)):
        while len(sets[name]) < n:
            q, worked, r = problem(rng)
            if q in seen:
                continue
            seen.add(q)
            prompt = chat.render([{"role": "user", "content": q}])
            sets[name].append({"prompt": prompt, "response": worked, "answer": str(r), "question": q})
    paths = {}
    for name, rows in sets.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def pass_at_1(source: str, heldout: Path, max_new_tokens: int) -> tuple[float, list[dict]]:
    """Greedy pass@1 of a model on the held-out problems, and its answers."""
    loaded = load_model(source, "cpu")
    rows = [json.loads(line) for line in heldout.read_text().splitlines()]
    engine = Engine(loaded.model, loaded.tokenizer)
    texts = []
    for i in range(0, len(rows), 32):
        part = rows[i : i + 32]
        texts += [c.text or "" for c in engine.generate([r["prompt"] for r in part], max_new_tokens, Sampling(0))]
    right = number([], texts, answer=[r["answer"] for r in rows])
    samples = [{"question": r["question"], "answer": r["answer"], "model": t, "right": bool(ok)}
               for r, t, ok in zip(rows, texts, right)]  # fmt: skip
    return sum(right) / len(right), samples


def plot(grpo_metrics: Path, base: float, sft: float, out: Path) -> None:
    rows = read_rows(grpo_metrics)
    train = [(r["step"], r["reward"]) for r in rows if "reward" in r and "loss" in r]
    val = [(r["step"], r["val_reward_number"]) for r in rows if "val_reward_number" in r]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="GRPO: mean reward of the sampled groups (train)", alpha=0.6)
    ax.plot(*zip(*val), "o-", label="held-out pass@1 (greedy)")
    ax.axhline(base, color="gray", ls=":", label=f"SmolLM2-135M-Instruct: {base:.0%}")
    ax.axhline(sft, color="black", ls="--", label=f"after LoRA SFT: {sft:.0%}")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("fraction right")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("SmolLM2-135M on arithmetic word problems: LoRA SFT, then GRPO with LoRA")
    save_png(fig, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/grpo-arithmetic")
    ap.add_argument("--smoke", action="store_true", help="a few steps on a few problems: checks that it runs")
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--grpo-steps", type=int, default=60)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    small = args.smoke
    sizes = (16, 16, 8) if small else (960, 960, 200)
    sft_steps, grpo_steps = (2, 2) if small else (args.sft_steps, args.grpo_steps)
    paths = write_data(out, *sizes)
    t0 = time.perf_counter()
    clock = {}
    base, _ = pass_at_1(MODEL, paths["heldout"], 48)
    clock["base_eval"] = time.perf_counter() - t0
    lora = dict(lora_rank=16, lora_alpha=32.0, lora_targets="all", device="cpu", seed=0, log_interval=1)
    sft_cfg = AlignConfig.from_sources(
        None, stage="sft", model=MODEL, data=str(paths["sft"]), val_data=str(paths["heldout"]),
        out_dir=str(out / "sft"), batch_size=8, max_iters=sft_steps, lr=1e-3, min_lr=1e-4, warmup_iters=5,
        eval_interval=sft_steps, checkpoint_interval=sft_steps, **lora,
    )  # fmt: skip
    t = time.perf_counter()
    sft_run = train_stage(sft_cfg, progress=not small)
    clock["sft"] = time.perf_counter() - t
    sft, _ = pass_at_1(sft_run["out_dir"], paths["heldout"], 48)
    val_rl = out / "heldout-64.jsonl"  # evaluated during GRPO (the full set at the end)
    val_rl.write_text("".join(paths["heldout"].read_text().splitlines(keepends=True)[:64]))
    every = max(1, grpo_steps // 6)
    grpo_cfg = AlignConfig.from_sources(
        None, stage="grpo", model=sft_run["out_dir"], data=str(paths["rl"]), val_data=str(val_rl),
        out_dir=str(out / "grpo"), rewards="number", batch_size=4, group_size=8, max_new_tokens=32,
        temperature=1.0, loss_type="dapo", clip=0.2, clip_high=0.28, minibatches=2, max_iters=grpo_steps, lr=1e-4,
        min_lr=1e-5, warmup_iters=3, eval_interval=every, checkpoint_interval=grpo_steps, **lora,
    )  # fmt: skip
    t = time.perf_counter()
    grpo_run = train_stage(grpo_cfg, progress=not small)
    clock["grpo"] = time.perf_counter() - t
    final, samples = pass_at_1(grpo_run["out_dir"], paths["heldout"], 48)
    clock["total"] = time.perf_counter() - t0
    summary = {
        "model": MODEL,
        "heldout_problems": sizes[2],
        "pass_at_1": {"base": base, "lora_sft": sft, "lora_sft_then_grpo": final},
        "sft_steps": sft_steps,
        "grpo_steps": grpo_steps,
        "trainable_params": grpo_run["trainable_params"],
        "params": grpo_run["params"],
        "seconds": {k: round(v, 1) for k, v in clock.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(Path(grpo_run["metrics"]), base, sft, out / "grpo_arithmetic.png")
    md = ["| question | answer | model | right |", "|---|---|---|---|"]
    md += [f"| {s['question']} | {s['answer']} | {s['model'].replace('|', '/').replace(chr(10), ' ')} | "
           f"{'yes' if s['right'] else 'no'} |" for s in samples[:12]]  # fmt: skip
    (out / "samples.md").write_text("\n".join(md) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
