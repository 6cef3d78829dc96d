"""Does the modern block pay on the demo? The GPT-2 block with AdamW against the modern block (rotary positions,
parameter-free RMSNorm, ReLU², QK-norm, untied head soft-capped at 15: the `baby-modern` preset) with AdamW and with
Muon, trained from scratch by the demo recipe (Shakespeare's complete works, character level, 2,000 steps of 12 x 64
tokens, WSD schedule), first at equal steps, then each modern run again at the GPT-2 block's wall-clock (its step
count scaled by the measured throughputs). Every run is its own `gptlab train` process, one after another on the same
machine; val loss is over the whole val split. Ends with one JSON line.

    python benchmarks/modern_block.py [--data data/shakespeare-char] [--steps 2000] [--muon-lr 1e-3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import REPO, gptlab_train

from gptlab.config import preset
from gptlab.data.prepare import prepare
from gptlab.model import GPT

CONTESTANTS = {  # name: (preset, extra flags)
    "gpt2-adamw": ("baby", []),
    "modern-adamw": ("baby-modern", []),
    "modern-muon": ("baby-modern", ["--optimizer", "muon"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="a char-level dataset of the complete works (default: prepared here)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--muon-lr", type=float, default=1e-3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "shakespeare-char"
        if not args.data:
            prepare(["shakespeare"], data, tokenizer="char", progress=False)
        vocab = json.loads((data / "meta.json").read_text())["vocab_size"]

        def run(name: str, steps: int) -> dict:
            model, extra = CONTESTANTS[name]
            lr = ["--lr", str(args.muon_lr)] if "muon" in name else []
            s = gptlab_train(
                ["--recipe", str(REPO / "recipes" / "demo.toml"), "--data", str(data), "--model", model,
                 "--out-dir", str(Path(tmp) / f"{name}-{steps}"), "--max-iters", str(steps),
                 "--checkpoint-interval", "0", "--eval-interval", str(steps), *extra, *lr]
            )  # fmt: skip
            params = GPT(preset(model, vocab_size=vocab)).num_params()
            row = {
                "name": name,
                "params": params,
                "steps": steps,
                "val_loss": s["final_val_loss"],
                "tokens_per_second": s["tokens_per_second"],
                "train_seconds": s["train_seconds"],
            }
            print(json.dumps(row), flush=True)
            return row

        equal_steps = [run(name, args.steps) for name in CONTESTANTS]
        base = equal_steps[0]["tokens_per_second"]
        equal_time = [
            run(r["name"], round(args.steps * r["tokens_per_second"] / base)) for r in equal_steps[1:]
        ]  # the same seconds of work as the GPT-2 block's run
    print(
        json.dumps(
            {
                "benchmark": "modern_block",
                "recipe": "recipes/demo.toml",
                "muon_lr": args.muon_lr,
                "equal_steps": equal_steps,
                "equal_wall_clock": equal_time,
            }
        )
    )


if __name__ == "__main__":
    main()
