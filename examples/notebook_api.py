"""The notebook API end to end, on a model small enough to train here in a minute:

    python examples/notebook_api.py [--out runs/notebook-api] [--steps 300]

It prepares a little corpus, trains the `tiny` preset on it with ``gptlab.train``, then loads the run with
``gptlab.load`` and uses every method of the returned ``LM``: generate (one prompt, a batch, a stream),
loglikelihood, perplexity and save (gptlab and Hugging Face formats).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import gptlab

LINES = [
    "the king doth speak of love and war.",
    "my lord, the night is sweet and fair.",
    "what say you, noble prince of heaven?",
    "good queen, thou art the blood of kings.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/notebook-api")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out / "run", ignore_errors=True)  # this example's own run folder, so it can be rerun
    (out / "corpus.txt").parent.mkdir(parents=True, exist_ok=True)
    (out / "corpus.txt").write_text("\n".join(LINES * 300))

    gptlab.prepare([str(out / "corpus.txt")], out / "data", tokenizer="char", progress=False)
    cfg = gptlab.TrainConfig(
        data=str(out / "data"),
        out_dir=str(out / "run"),
        model="tiny",
        block_size=64,
        max_iters=args.steps,
        eval_interval=max(args.steps // 2, 1),
        optim=gptlab.OptimConfig(warmup_iters=10),
        final_eval_tokens=2048,
        device="cpu",
    )
    summary = gptlab.train(cfg, progress=False)
    print(f"trained {summary['steps']} steps: val loss {summary['final_val_loss']}")

    lm = gptlab.load(str(out / "run"), device="cpu")
    print(lm)
    print("greedy:  ", repr(lm.generate("the king", max_new_tokens=30, temperature=0)))
    print("batch:   ", lm.generate(["my lord", "good queen"], max_new_tokens=20, temperature=0.8, top_k=10))
    print("stream:  ", "".join(lm.generate("what say", max_new_tokens=20, stream=True, temperature=0.8)))
    print("log p:   ", round(lm.loglikelihood("the king doth", " speak of love"), 3), "nats")
    print("ppl:     ", round(lm.perplexity(LINES[1]), 3))
    print("saved:   ", lm.save(out / "exported-gptlab"), lm.save(out / "exported-hf", format="hf"))


if __name__ == "__main__":
    main()
