"""Dense vs mixture-of-experts at the demo's budget: does MoE pay off at our scale?

Shakespeare's complete works, character level, the demo recipe (recipes/demo.toml: block 64, batch 12, 2,000
iterations, WSD schedule), one process, in one run:
- `dense`: the `baby` model (4 layers, 128 wide);
- `moe`: the same with 8 experts, top-2, experts 2·d wide in every layer: the same *active* parameters and FLOPs
  per token as `dense` (plus the router), 3x the total;
- `dense-deep`: 12 dense layers: the same *total* parameters as `moe`;
- `dense-same-time`: `dense` trained for as many more steps as its higher throughput buys in `moe`'s training
  time (the wall-clock comparison).
Reports final val loss (whole val split), steady tokens/s, and the MoE run's per-layer expert utilization over
training (a PNG). Ends with one JSON line.

    python benchmarks/moe.py [--out DIR] [--max-iters 2000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import REPO, gptlab_train

from gptlab.config import preset
from gptlab.data.prepare import prepare
from gptlab.plan import Shape, forward_flops_per_token, params

RUNS = {
    "dense": [],
    "moe": ["--set", "n_experts=8", "--set", "experts_per_token=2", "--set", "expert_ff=256"],
    "dense-deep": ["--set", "n_layer=12"],
}


def utilization_plot(metrics: Path, out: Path) -> None:
    from gptlab.plotting import pyplot, save_png

    plt = pyplot()
    rows = [json.loads(r) for r in metrics.read_text().splitlines()]
    rows = [r for r in rows if "moe_expert_fraction" in r]
    layers = len(rows[0]["moe_expert_fraction"])
    fig, axes = plt.subplots(1, layers, figsize=(4 * layers, 3.4), sharey=True)
    for i, ax in enumerate(axes):
        steps = [r["step"] for r in rows]
        frac = [r["moe_expert_fraction"][i] for r in rows]
        for e in range(len(frac[0])):
            ax.plot(steps, [f[e] for f in frac], lw=0.8)
        ax.axhline(1 / len(frac[0]), color="k", ls="--", lw=0.8)
        ax.set(title=f"layer {i}", xlabel="step")
    axes[0].set_ylabel("fraction of assignments per expert")
    fig.suptitle("MoE expert utilization (8 experts, top-2; dashed = uniform)")
    fig.tight_layout()
    save_png(fig, out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/moe-bench")
    ap.add_argument("--max-iters", type=int, default=2000)
    args = ap.parse_args()
    out = Path(args.out)
    data = out / "shakespeare-char"
    if not (data / "meta.json").exists():
        prepare(["shakespeare"], data, tokenizer="char", progress=False)
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    results = {}
    runs = {name: (flags, args.max_iters) for name, flags in RUNS.items()}
    runs["dense-same-time"] = ([], None)
    for name, (flags, iters) in runs.items():
        run = out / name
        if iters is None:  # as many steps as dense's throughput buys in moe's training time
            iters = round(args.max_iters * results["moe"]["train_seconds"] / results["dense"]["train_seconds"])
        s = gptlab_train(
            [
                "--recipe",
                str(REPO / "recipes" / "demo.toml"),
                "--data",
                str(data),
                "--out-dir",
                str(run),
                "--max-iters",
                str(iters),
                "--checkpoint-interval",
                "0",
                *flags,
            ]
        )
        overrides = {flags[i + 1].split("=")[0]: int(flags[i + 1].split("=")[1]) for i in range(0, len(flags), 2)}
        shape = Shape.from_config(preset("baby", vocab_size=vocab, **overrides))
        p = params(shape)
        results[name] = {
            "max_iters": iters,
            "final_val_loss": s["final_val_loss"],
            "tokens_per_second": s["tokens_per_second"],
            "train_seconds": s["train_seconds"],
            "params_total": p["total"],
            "params_active": p["active"],
            "forward_flops_per_token": forward_flops_per_token(shape)["total"],
        }
        print(
            f"{name:<11} val {s['final_val_loss']:.4f}  {s['tokens_per_second']:,} tok/s  total {p['total']:,}  "
            f"active {p['active']:,}",
            flush=True,
        )
    utilization_plot(out / "moe" / "metrics.jsonl", out / "moe_utilization.png")
    last = [json.loads(r) for r in (out / "moe" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in last if "moe_expert_fraction" in r][-1]
    print(
        json.dumps(
            {
                "benchmark": "moe",
                "max_iters": args.max_iters,
                "runs": results,
                "final_expert_fraction": last["moe_expert_fraction"],
                "utilization_plot": str(out / "moe_utilization.png"),
            }
        )
    )


if __name__ == "__main__":
    main()
