"""Quality at nanoGPT's documented CPU budget: the `baby` model on tiny shakespeare, character level.

Budget (nanoGPT README, "I only have a macbook"): block 64, batch 12, 2000 iterations, lr 1e-3, no dropout, 4 layers,
4 heads, 128 wide. nanoGPT reports val loss 1.88 there (20 random val batches); gptlab's target is <= 1.90, measured
over the whole val split (non-overlapping windows). The recipe is recipes/tinyshakespeare.toml. Uses
../shared/data/tinyshakespeare.txt when present, else the `tinyshakespeare` corpus (downloaded, checksummed).
Ends with one JSON line.

    python benchmarks/demo_quality.py [--seeds 1337,1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import REPO, gptlab_train

from gptlab.data.prepare import prepare

NANOGPT_VAL = 1.88
TARGET = 1.90


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="1337")
    args = ap.parse_args()
    local = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
    source = str(local) if local.exists() else "tinyshakespeare"
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tinyshakespeare-char"
        prepare([source], data, tokenizer="char", progress=False)
        for seed in map(int, args.seeds.split(",")):
            s = gptlab_train(
                [
                    "--recipe",
                    str(REPO / "recipes" / "tinyshakespeare.toml"),
                    "--data",
                    str(data),
                    "--out-dir",
                    str(Path(tmp) / f"run{seed}"),
                    "--seed",
                    str(seed),
                ]
            )
            runs.append(
                {
                    "seed": seed,
                    "final_val_loss": s["final_val_loss"],
                    "train_seconds": s["train_seconds"],
                    "tokens_per_second": s["tokens_per_second"],
                }
            )
            print(
                f"seed {seed}: val loss {s['final_val_loss']:.4f} (nanoGPT {NANOGPT_VAL}, target <= {TARGET}) "
                f"in {s['train_seconds']}s",
                flush=True,
            )
    worst = max(r["final_val_loss"] for r in runs)
    print(
        json.dumps(
            {
                "benchmark": "demo_quality",
                "data": source,
                "nanogpt_val_loss": NANOGPT_VAL,
                "target": TARGET,
                "runs": runs,
                "worst_val_loss": worst,
                "meets_target": worst <= TARGET,
            }
        )
    )


if __name__ == "__main__":
    main()
