"""The distillation demonstration (docs/distillation.md), one command on a CPU:

1. tiny shakespeare tokenized with GPT-2's BPE (``gptlab prepare``; 304k training and 34k held-out tokens);
2. a teacher of 11.5M parameters (4 layers, width 192) trained with ``gptlab train``; its best checkpoint teaches;
3. a student 4.6x smaller (2 layers, width 48: 2.5M parameters, most of them its embedding) distilled from it with
   ``gptlab distill`` (forward KL at T = 2 mixed half and half with the next-token loss);
4. the same student trained from scratch on the same tokens (same steps, batches, schedule), and once more for the
   wall-clock the distillation took (more steps: the teacher's forward pass is not free).

Reports the held-out perplexity (the whole validation split) of each, the student-to-teacher perplexity ratio
(DistilGPT2's, on WikiText-103: 21.1 / 16.3 = 1.29) and the fraction of the teacher-vs-scratch gap the distillation
closes; plots the validation curves (``--plot``). Ends with one JSON line.

    python benchmarks/distill.py --corpus ../shared/data/tinyshakespeare.txt --work /tmp/distill \\
        --plot docs/distillation_curves.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEACHER = ["--model", "mini", "--set", "n_layer=4", "--set", "n_head=4", "--set", "n_embd=192"]
STUDENT = ["--model", "mini", "--set", "n_layer=2", "--set", "n_head=2", "--set", "n_embd=48"]


def gptlab(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, "-m", "gptlab", *args, "--json"], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"gptlab {args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def n_params(model_config: dict) -> int:
    sys.path.insert(0, str(REPO / "src"))
    import torch

    from gptlab.config import GPTConfig
    from gptlab.model import GPT

    with torch.device("meta"):
        return int(GPT(GPTConfig.from_dict(model_config)).num_params())


def finished(run: Path) -> dict | None:
    """The summary of a run this script finished earlier (rerunning the script reuses it), or None."""
    if not (run / "metrics.jsonl").exists():
        return None
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = [r["final_val_loss"] for r in rows if "final_val_loss" in r]
    if not final:
        return None
    state = json.loads(
        (run / "checkpoints" / sorted(p.name for p in (run / "checkpoints").iterdir())[-1] / "state.json").read_text()
    )
    tps = [r["tok_per_s"] for r in rows if r.get("tok_per_s") is not None]
    return {"final_val_loss": final[-1], "params": n_params(state["model_config"]), "tokens_per_second": tps[-1]}


def teacher_val_loss(teacher: Path, data: Path) -> float:
    """The teacher's cross-entropy over the whole validation split (what ``gptlab distill`` reports)."""
    import torch

    from gptlab.data.loader import TokenWindows
    from gptlab.loader import load_model

    model = load_model(teacher, "cpu").model
    total = count = 0.0
    with torch.no_grad():
        for x, y in TokenWindows(data, "val", model.config.block_size).sequential(64):
            total += float(model(x, y)[1]) * y.numel()
            count += y.numel()
    return total / count


def val_curve(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--work", default="/tmp/gptlab-distill", help="a new folder for the data and the four runs")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--student-steps", type=int, default=600)
    ap.add_argument("--plot", help="write the validation curves here (PNG)")
    ap.add_argument(
        "--clock-cap", type=int, default=3, help="the same wall-clock run: at most this many times the steps (0: none)"
    )
    args = ap.parse_args()
    work = Path(args.work)
    data = work / "data"
    common = ["--data", str(data), "--block-size", "128", "--batch-size", "16", "--eval-iters", "8"]
    common += ["--final-eval-tokens", "0", "--warmup-iters", "30", "--log-interval", "10"]
    if not (data / "meta.json").exists():
        gptlab("prepare", args.corpus, "--tokenizer", "gpt2", "--out-dir", str(data))
    runs = {}
    if not (work / "teacher" / "loss.png").exists():
        gptlab(
            "train", *common, *TEACHER, "--out-dir", str(work / "teacher"), "--max-iters", str(args.teacher_steps),
            "--eval-interval", "50", "--checkpoint-interval", "50", "--dropout", "0.1", "--lr", "1e-3",
            "--min-lr", "1e-4",
        )  # fmt: skip
    student = [*common, *STUDENT, "--max-iters", str(args.student_steps), "--eval-interval", "50"]
    student += ["--checkpoint-interval", "0", "--lr", "3e-3", "--min-lr", "3e-4"]
    runs["distilled"] = finished(work / "distilled") or gptlab(
        "distill", *student, "--teacher", str(work / "teacher" / "best"), "--out-dir", str(work / "distilled"),
        "--kd-loss", "forward_kl", "--temperature", "1", "--kd-weight", "0.8",
    )  # fmt: skip
    runs["scratch"] = finished(work / "scratch") or gptlab("train", *student, "--out-dir", str(work / "scratch"))
    # the same wall-clock: the scratch student's steady throughput over the distilled one's (both leave out
    # evaluation and the first step), capped at --clock-cap times the steps
    ratio = runs["scratch"]["tokens_per_second"] / runs["distilled"]["tokens_per_second"]
    same_clock = min(round(args.student_steps * ratio), args.clock_cap * args.student_steps)
    clock = [a if a != str(args.student_steps) else str(same_clock) for a in student]
    if same_clock > 0:
        runs["scratch_same_wallclock"] = finished(work / "scratch_clock") or gptlab(
            "train", *clock, "--out-dir", str(work / "scratch_clock")
        )
    if "teacher_val_loss" not in runs["distilled"]:
        runs["distilled"]["teacher_val_loss"] = teacher_val_loss(work / "teacher" / "best", data)

    teacher_loss = runs["distilled"]["teacher_val_loss"]
    ppl = {k: math.exp(v["final_val_loss"]) for k, v in runs.items()}
    ppl["teacher"] = math.exp(teacher_loss)
    params = {k: v["params"] for k, v in runs.items()}
    from gptlab.checkpoint import read_state, resolve

    teacher_state = read_state(resolve(work / "teacher" / "best"))
    report = {
        "benchmark": "distill",
        "teacher_params": n_params(teacher_state["model_config"]),
        "student_params": params["distilled"],
        "perplexity": {k: round(v, 2) for k, v in ppl.items()},
        "student_over_teacher_ppl": {k: round(ppl[k] / ppl["teacher"], 3) for k in runs},
        "gap_closed": round((ppl["scratch"] - ppl["distilled"]) / (ppl["scratch"] - ppl["teacher"]), 3),
        "distilled_beats_scratch": ppl["distilled"] < ppl["scratch"],
        "tokens_per_second": {k: v["tokens_per_second"] for k, v in runs.items()},
        "scratch_same_wallclock_steps": same_clock,
        "teacher_best_step": teacher_state.get("step"),
    }
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        curves = (
            ("distilled", "distilled", "distilled"),
            ("scratch, same tokens", "scratch", "scratch"),
            ("scratch, same wall-clock", "scratch_same_wallclock", "scratch_clock"),
        )
        for name, key, folder in curves:
            if key not in runs:
                continue
            steps, vals = zip(*val_curve(work / folder))
            ax.plot(steps, vals, marker=".", label=f"student {name}")
        ax.axhline(teacher_loss, color="k", ls="--", lw=1, label=f"teacher (best, {teacher_state.get('step')} steps)")
        ax.set_xlabel("student step (2,048 tokens each)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("tiny shakespeare, GPT-2 BPE: 2.5M student, 11.5M teacher")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        report["plot"] = args.plot
    print(json.dumps(report))


if __name__ == "__main__":
    main()
