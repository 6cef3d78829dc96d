"""InstructGPT's pipeline in miniature, on a laptop CPU in about ten minutes, with a preference we state as a rule.

    python examples/alignment_demo.py [--base runs/demo] [--out runs/align-demo]

1. Base model: a character-level Shakespeare model (``make demo`` makes one in ~2 minutes; trained here if absent).
2. SFT: prompts are 32-character openings of lines from the plays, responses the 31 characters that follow.
3. Preferences: the SFT model samples 8 responses per prompt; the "human" prefers responses with more of the words in
   ``PLEASANT`` (a stated, programmatic rule). Rankings with ties collapsed become K-way preference records.
4. Reward model on those rankings; its held-out pair accuracy.
5. PPO from the SFT model for several KL coefficients β (β = 0: no penalty), and DPO on the same preferences.
   Each final policy is scored on held-out prompts by the rule itself (the "true" reward), by the reward model, and
   by its KL to the SFT model. Without the penalty the policy hacks the reward model.

Writes ``summary.json``, ``reward_vs_kl.png`` and ``samples.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from gptlab.align.config import AlignConfig
from gptlab.align.stages import last_token_scalar, load_init, load_scalar_model, token_logprobs
from gptlab.align.trainer import train_stage
from gptlab.data.loader import TokenWindows, read_meta
from gptlab.data.prepare import prepare
from gptlab.generate import Engine, Sampling
from gptlab.plotting import pyplot, save_png

PLEASANT = ("love", "good", "sweet", "fair", "gentle", "noble", "kind", "dear", "joy", "grace", "happy", "heaven")
PROMPT, RESPONSE = 32, 31  # prompt + response + <eot> fill the demo model's 64 characters


def rule(text: str) -> int:
    """The stated preference: how many pleasant words a response holds."""
    return sum(w in PLEASANT for w in re.findall(r"[a-z]+", text.lower()))


def openings(data: Path, split: str, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (prompt, continuation) pairs of 32 + 31 characters starting at line starts of a prepared split."""
    from gptlab.tokenizer import from_spec

    tok = from_spec(read_meta(data)["tokenizer"])
    ids = TokenWindows(data, split, 8).shards[0]
    text = tok.decode(ids[ids != tok.eot_id].tolist())  # documents joined, without end-of-text markers
    starts = [m.end() for m in re.finditer(r"\n", text) if m.end() + PROMPT + RESPONSE < len(text)]
    pick = np.random.default_rng(seed).choice(len(starts), n, replace=False)
    return [(text[s : s + PROMPT], text[s + PROMPT : s + PROMPT + RESPONSE]) for s in (starts[i] for i in pick)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def stage(**kw) -> dict:
    """Train one stage, or reuse it when an earlier run of this script finished it."""
    done = Path(kw["out_dir"]) / "summary.json"
    if done.exists():
        return json.loads(done.read_text())
    summary = train_stage(AlignConfig.from_sources(None, **kw), progress=False)
    done.write_text(json.dumps(summary))
    return summary


def samples(model, tok, prompts: list[str], k: int, seed: int) -> list[list[str]]:
    engine = Engine(model, tok)
    out = []
    for i in range(0, len(prompts), 64):
        part = prompts[i : i + 64]
        ids = [tok.encode(p) for p in part for _ in range(k)]
        done = engine.generate_tokens(ids, RESPONSE, Sampling(temperature=1.0, seed=seed + i), stop_ids=[tok.eot_id])
        texts = [tok.decode(c.tokens) for c in done]
        out += [texts[j * k : (j + 1) * k] for j in range(len(part))]
    return out


@torch.no_grad()
def judge(policy_dir: str, ref, rm, tok, prompts: list[str]) -> dict:
    """Sample one response per held-out prompt; the rule's score, the reward model's, the KL to the reference."""
    policy, _ = load_init(policy_dir, "cpu")
    policy.eval()
    texts = [s[0] for s in samples(policy, tok, prompts, 1, seed=99)]
    seqs = [tok.encode(p) + tok.encode(t) for p, t in zip(prompts, texts)]
    kl = []
    for p, s in zip(prompts, seqs):
        x, y = torch.tensor([s[:-1]]), torch.tensor([s[1:]])
        n = len(tok.encode(p)) - 1
        kl.append((token_logprobs(policy, x, y)[0][0, n:] - token_logprobs(ref, x, y)[0][0, n:]).sum().item())
    rm_scores = torch.cat([last_token_scalar(*rm, seqs[i : i + 64], "cpu") for i in range(0, len(seqs), 64)])
    return {
        "rule": float(np.mean([rule(t) for t in texts])),
        "reward_model": rm_scores.mean().item(),
        "kl": float(np.mean(kl)),
        "examples": [p + " | " + t for p, t in zip(prompts[:4], texts[:4])],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="runs/demo", help="pre-trained char-level model (trained here if absent)")
    ap.add_argument("--data", default="data/shakespeare-char")
    ap.add_argument("--out", default="runs/align-demo")
    ap.add_argument("--betas", default="0,0.02,0.1,0.5")
    ap.add_argument("--ppo-steps", type=int, default=40)
    args = ap.parse_args()
    out, data = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    if not (data / "meta.json").exists():
        prepare(["shakespeare"], data, tokenizer="char", progress=False)
    if not Path(args.base).exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "gptlab",
                "train",
                "--recipe",
                "recipes/demo.toml",
                "--data",
                str(data),
                "--out-dir",
                args.base,
            ],
            check=True,
        )
    common = dict(
        model=args.base, device="cpu", threads=2, eval_interval=1000, log_interval=5, checkpoint_interval=1000
    )

    # 2. SFT
    pairs = openings(data, "train", 1200, seed=0)
    sft_data = write_jsonl(out / "sft.jsonl", [{"prompt": p, "response": r} for p, r in pairs])
    sft = stage(stage="sft", data=sft_data, out_dir=str(out / "sft"), max_iters=150, batch_size=32, lr=3e-4, **common)
    # 3. preferences from the SFT model's own samples, ranked by the rule
    model, tok = load_init(sft["out_dir"], "cpu")
    model.eval()
    prompts = [p for p, _ in openings(data, "train", 1200, seed=1)]
    prefs = []
    for p, group in zip(prompts, samples(model, tok, prompts, 8, seed=0)):
        by_score: dict[int, str] = {}
        for t in group:
            by_score.setdefault(rule(t), t)
        if len(by_score) >= 2:
            prefs.append({"prompt": p, "ranked": [by_score[s] for s in sorted(by_score, reverse=True)]})
    pref_data = write_jsonl(out / "prefs.jsonl", prefs)
    # 4. reward model
    rm_run = stage(
        stage="reward",
        data=pref_data,
        out_dir=str(out / "reward"),
        max_iters=400,
        batch_size=16,
        lr=1e-4,
        val_frac=0.2,
        center_rewards=0.01,
        **{**common, "model": sft["out_dir"]},
    )
    # 5. PPO for several betas, DPO
    heldout = [p for p, _ in openings(data, "val", 128, seed=2)]
    prompt_data = write_jsonl(out / "prompts.jsonl", [{"prompt": p} for p in prompts])
    ref, _ = load_init(sft["out_dir"], "cpu")
    ref.eval()
    rm = load_scalar_model(rm_run["out_dir"], "cpu")
    results = {
        "sft": judge(sft["out_dir"], ref, rm, tok, heldout),
        "reward_model": rm_run["eval"],
        "preference_records": len(prefs),
    }
    curves = {}
    for beta in map(float, args.betas.split(",")):
        run = stage(
            stage="ppo",
            data=prompt_data,
            out_dir=str(out / f"ppo-beta{beta:g}"),
            reward_model=rm_run["out_dir"],
            kl_coef=beta,
            max_iters=args.ppo_steps,
            batch_size=32,
            max_new_tokens=RESPONSE,
            lr=1e-4,
            warmup_iters=3,
            val_frac=0.0,
            **{**common, "model": sft["out_dir"], "log_interval": 1},
        )
        rows = [json.loads(r) for r in Path(run["metrics"]).read_text().splitlines()]
        curves[beta] = [(r["kl"], r["score"]) for r in rows if "score" in r]
        results[f"ppo beta={beta:g}"] = judge(run["out_dir"], ref, rm, tok, heldout)
    dpo = stage(
        stage="dpo",
        data=pref_data,
        out_dir=str(out / "dpo"),
        max_iters=150,
        batch_size=16,
        lr=3e-5,
        beta=0.1,
        val_frac=0.2,
        **{**common, "model": sft["out_dir"]},
    )
    results["dpo beta=0.1"] = {**judge(dpo["out_dir"], ref, rm, tok, heldout), "heldout_pairs": dpo["eval"]}
    (out / "summary.json").write_text(json.dumps(results, indent=1))

    fig, (ax, bx) = pyplot().subplots(1, 2, figsize=(12, 4.6))
    for beta, pts in curves.items():
        k, s = zip(*pts)
        ax.plot(k, s, ".-", lw=0.8, label=f"PPO β = {beta:g}")
    ax.set(
        xlabel="KL(policy ‖ SFT) per response (nats, rollout estimate)",
        ylabel="reward-model score",
        title="PPO training: reward vs KL",
    )
    for name, r in results.items():
        if isinstance(r, dict) and "rule" in r:
            bx.plot(r["kl"], r["rule"], "o")
            bx.annotate(name, (r["kl"], r["rule"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    bx.set(
        xlabel="KL(policy ‖ SFT) per response, held-out prompts",
        ylabel="true reward (pleasant words per response)",
        title="Final policies on held-out prompts",
    )
    for a in (ax, bx):
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, out / "reward_vs_kl.png")
    lines = ["| policy | rule score | reward model | KL | sample |", "|---|---|---|---|---|"]
    for name, r in results.items():
        if isinstance(r, dict) and "rule" in r:
            lines.append(
                f"| {name} | {r['rule']:.2f} | {r['reward_model']:.2f} | {r['kl']:.1f} | `{r['examples'][0]!r}` |"
            )
    (out / "samples.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"reward model held-out: {rm_run['eval']}; preference records: {len(prefs)}")


if __name__ == "__main__":
    main()
