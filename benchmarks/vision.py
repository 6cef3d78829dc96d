"""Image input on a CPU: does the model look? One command, about 15 minutes on 2 cores.

    python benchmarks/vision.py --work /tmp/gptlab-vision [--steps 2000] [--plot docs/vision_curves.png]

1. ``gptlab prepare shapes`` (32x32 RGB, 4 colour-shape pairs held out) and ``gptlab prepare digits``
   (scikit-learn's 8x8 digits).
2. Trains the same decoder (``baby``: 4 layers, 128 wide) on shapes twice, with 8x8 patches: with the linear patch
   prefix (Fuyu) and with the small residual cnn encoder at equal parameters (its width equals the image's
   channels, see docs/vision.md); and once on digits (2x2 patches).
3. ``gptlab eval vision``: per-attribute exact-match accuracy on the seen combinations (val), the held-out
   combinations (holdout) and held-out digits, each beside the blind baselines (black image; another example's
   image) and the chance levels.

Runs that finished are reused when the script is run again on the same ``--work`` folder. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}


def gptlab(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "gptlab", *args, "--json"], env=ENV, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"gptlab {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def trained(run: Path, data: Path, steps: int, *flags: str) -> dict:
    """Train (unless a finished run is there) and return the run's summary: final val loss and parameters."""
    summary = run / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    s = gptlab(
        "train", "--data", str(data), "--out-dir", str(run), "--model", "baby", "--max-iters", str(steps),
        "--batch-size", "32", "--lr", "2e-3", "--min-lr", "2e-4", "--warmup-iters", "50", "--eval-interval",
        str(max(steps // 10, 1)), "--eval-iters", "4", "--log-interval", "25", "--checkpoint-interval", "0",
        "--dropout", "0", *flags,
    )  # fmt: skip
    summary.write_text(json.dumps(s))
    return s


def val_curve(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/gptlab-vision", help="a new folder for the datasets and the runs")
    ap.add_argument("--steps", type=int, default=2000, help="training steps per shapes model (batch 32)")
    ap.add_argument("--digit-steps", type=int, default=600, help="training steps of the digits model")
    ap.add_argument("--images", type=int, default=6000, help="training images of the shapes dataset")
    ap.add_argument("--patch", type=int, default=8, help="patch side for shapes (8: one patch per cell of the grid)")
    ap.add_argument("--plot", help="write the validation curves here (PNG)")
    args = ap.parse_args()
    work = Path(args.work)
    shapes, digits = work / "shapes", work / "digits"
    if not (shapes / "meta.json").exists():
        gptlab("prepare", "shapes", "--images", str(args.images), "--out-dir", str(shapes))
    if not (digits / "meta.json").exists():
        gptlab("prepare", "digits", "--out-dir", str(digits))
    runs = {
        "linear": trained(work / "linear", shapes, args.steps, "--set", f"patch_size={args.patch}"),
        "cnn": trained(
            work / "cnn", shapes, args.steps, "--set", f"patch_size={args.patch}", "--set", "image_encoder=cnn"
        ),
        "digits": trained(work / "digits-run", digits, args.digit_steps, "--set", "patch_size=2"),
    }
    folders = {"linear": work / "linear", "cnn": work / "cnn", "digits": work / "digits-run"}
    evals = {}
    for name, run in folders.items():
        data = digits if name == "digits" else shapes
        out = work / f"eval-{name}.json"
        if not out.exists():
            out.write_text(json.dumps(gptlab("eval", "vision", str(run), "--data", str(data), "--batch-size", "200")))
        evals[name] = json.loads(out.read_text())

    def table(name: str) -> dict:
        return {
            s["split"]: {k: v for k, v in s.items() if isinstance(v, dict)} for s in evals[name]["splits"]
        }  # split -> attribute -> {image, zero, shuffle, uniform, majority}

    report = {
        "benchmark": "vision",
        "params": {k: v["params"] for k, v in runs.items()},
        "final_val_loss": {k: v["final_val_loss"] for k, v in runs.items()},
        "train_seconds": {k: v["train_seconds"] for k, v in runs.items()},
        "accuracy": {k: table(k) for k in folders},
    }
    seen = report["accuracy"]["linear"]["val"]
    report["seen_min_accuracy"] = {k: min(r["image"] for r in report["accuracy"][k]["val"].values()) for k in folders}
    report["blind_max_over_majority"] = max(
        max(r["zero"], r["shuffle"]) - r["majority"] for k in folders for s in report["accuracy"][k].values()
        for r in s.values()
    )  # fmt: skip
    report["target_seen_95"] = all(r["image"] >= 0.95 for r in seen.values())
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, label in (
            ("linear", "shapes, linear patches (Fuyu)"),
            ("cnn", "shapes, cnn encoder"),
            ("digits", "digits"),
        ):
            steps, vals = zip(*val_curve(folders[name]))
            ax.plot(steps, vals, marker=".", label=f"{label}: {runs[name]['params']:,} parameters")
        ax.set_xlabel("step (32 image-text examples each)")
        ax.set_ylabel("validation loss on the text (nats/token)")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        report["plot"] = args.plot
    print(json.dumps(report))


if __name__ == "__main__":
    main()
