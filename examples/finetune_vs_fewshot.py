"""GPT-1 against GPT-3 on one dataset (Radford et al. 2018; Brown et al. 2020): GPT-1-style fine-tuning against
k-shot prompting of the same model.

    python examples/finetune_vs_fewshot.py [--model runs/demo] [--out runs/ft-vs-fewshot]

The data is the sentiment set shipped with gptlab (``gptlab/eval/data/sentiment.jsonl``: 40 train and 40 test
sentences). Fine-tuning (``gptlab align finetune --task classification``) trains on the train split and is scored
on the test split; prompting (``gptlab eval fewshot``) draws its k examples from the same train split and answers
the same test sentences. Prints and writes ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gptlab
from gptlab.align.config import AlignConfig
from gptlab.align.trainer import train_stage
from gptlab.eval.tasks import SENTIMENT, fewshot, read_jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/demo")
    ap.add_argument("--out", default="runs/ft-vs-fewshot")
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_jsonl(SENTIMENT, ["text", "label", "split"])
    for split in ("train", "test"):
        (out / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows if r["split"] == split)
        )
    results = {}
    for lm_weight in (0.5, 0.0):
        run = train_stage(
            AlignConfig.from_sources(
                None,
                stage="finetune",
                task="classification",
                data=str(out / "train.jsonl"),
                val_data=str(out / "test.jsonl"),
                model=args.model,
                lm_weight=lm_weight,
                out_dir=str(out / f"finetune-lm{lm_weight:g}"),
                max_iters=args.steps,
                batch_size=16,
                lr=3e-4,
                eval_interval=50,
                checkpoint_interval=1000,
                device="cpu",
            ),
            progress=False,
        )
        results[f"fine-tuned, lambda={lm_weight:g}"] = run["eval"]["accuracy"]
    lm = gptlab.load(args.model, device="cpu")
    shots = fewshot(
        lm.model,
        lm.tokenizer,
        path=str(out / "test.jsonl"),
        train_path=str(out / "train.jsonl"),
        shots=(0, 1, 5, 10),
        seed=0,
    )
    for r in shots["results"]:
        results[f"{r['shots']}-shot prompting"] = r["acc"]
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    for k, v in results.items():
        print(f"{k:<28}{v:.3f}")


if __name__ == "__main__":
    main()
