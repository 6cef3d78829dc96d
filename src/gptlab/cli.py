"""``gptlab <verb>``: prepare, train, sample, exposure, presets. Every verb takes ``--json``.

User mistakes surface as one line, ``gptlab: error: <what is wrong and how to fix it>``, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .errors import GptlabError


def _emit(args: argparse.Namespace, result: dict[str, Any], human: str) -> None:
    print(json.dumps(result) if args.json else human, flush=True)


def cmd_prepare(args: argparse.Namespace) -> None:
    from .data.prepare import prepare

    meta = prepare(args.sources, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, field=args.field, progress=not args.json)
    _emit(args, meta, f"prepared {meta['documents']} document(s), {meta['text_chars']:,} characters -> "
                      f"{meta['tokens']['train']:,} train + {meta['tokens']['val']:,} val tokens "
                      f"(vocab {meta['vocab_size']:,}, {meta['dtype']}) in {meta['out_dir']} [{meta['seconds']}s]")


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from .train.config import TrainConfig

    overrides = {f.name: getattr(args, f.name) for f in TrainConfig.fields() if f.name != "model_overrides"}
    if args.set:
        model_overrides = {}
        for item in args.set:
            key, sep, raw = item.partition("=")
            if not sep:
                raise GptlabError(f"--set {item!r}: expected key=value, e.g. --set n_layer=6")
            try:
                model_overrides[key] = json.loads(raw)
            except json.JSONDecodeError:
                model_overrides[key] = raw
        overrides["model_overrides"] = model_overrides
    return overrides


def cmd_train(args: argparse.Namespace) -> None:
    from .train.config import TrainConfig
    from .train.trainer import train

    cfg = TrainConfig.from_sources(args.recipe, **_train_overrides(args))
    summary = train(cfg, resume=args.resume, progress=not args.json)
    if summary.get("loss_plot"):
        _emit(args, summary, f"final val loss {summary['final_val_loss']:.4f} (best periodic {summary['best_val_loss']:.4f})"
                             f" after {summary['steps']} steps, {summary['tokens']:,} tokens, "
                             f"{summary['tokens_per_second'] or 0:,} tok/s, {summary['train_seconds']}s\n"
                             f"checkpoints: {summary['out_dir']}/checkpoints  loss curve: {summary['loss_plot']}")


def cmd_sample(args: argparse.Namespace) -> None:
    import torch

    from .generate import generate
    from .tokenizer import from_spec
    from .train.checkpoint import load_model

    model, meta = load_model(args.checkpoint, args.device)
    tok = from_spec(meta["tokenizer"])
    prompt = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else args.prompt
    ids = tok.encode(prompt) if prompt else [tok.eot_id]
    if not ids:
        ids = [tok.eot_id]
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    x = torch.tensor([ids] * args.num_samples, device=args.device)
    t0 = time.perf_counter()
    out = generate(model, x, args.max_new_tokens, args.temperature, args.top_k, g)
    dt = time.perf_counter() - t0
    texts = [tok.decode(row[len(ids):].tolist()) for row in out]
    rate = args.max_new_tokens * args.num_samples / dt
    result = {"checkpoint": str(args.checkpoint), "prompt": prompt, "samples": texts,
              "new_tokens": args.max_new_tokens, "tokens_per_second": round(rate, 1)}
    sep = "\n" + "-" * 40 + "\n"
    _emit(args, result, sep.join(prompt + t for t in texts) + f"\n[{rate:,.1f} tok/s]")


def cmd_exposure(args: argparse.Namespace) -> None:
    from .tokenizer import from_spec
    from .train.checkpoint import load_model
    from .train.scheduled_sampling import exposure_report

    model, meta = load_model(args.checkpoint)
    text = Path(args.text_file).read_text(encoding="utf-8") if args.text_file else args.text
    if not text:
        raise GptlabError("give a text with --text or --text-file")
    tokens = from_spec(meta["tokenizer"]).encode(text)
    if len(tokens) < 2:
        raise GptlabError("the text is shorter than two tokens; give a longer one")
    r = exposure_report(model, tokens, args.p, args.seed)
    _emit(args, r, f"{r['tokens']} tokens in {r['windows']} window(s): teacher forcing "
                   f"{r['teacher_forcing_loss']:.4f} nats/token, "
                   f"scheduled sampling (p={r['p']}, {r['replaced_fraction']:.0%} of inputs replaced by the model's "
                   f"own predictions) {r['scheduled_sampling_loss']:.4f}")


def cmd_presets(args: argparse.Namespace) -> None:
    import torch

    from .config import PRESETS
    from .model import GPT

    rows = []
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            n = GPT(cfg).num_params(breakdown=True)
        rows.append({"name": name, **{k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size",
                                                                   "vocab_size", "norm")},
                     "params": n["total"], "non_embedding": n["non_embedding"]})
    lines = [f"{'preset':<12}{'layers':>7}{'heads':>6}{'d_model':>8}{'context':>8}{'vocab':>7}{'norm':>6}"
             f"{'params':>16}{'non-embedding':>16}"]
    lines += [f"{r['name']:<12}{r['n_layer']:>7}{r['n_head']:>6}{r['n_embd']:>8}{r['block_size']:>8}"
              f"{r['vocab_size']:>7}{r['norm']:>6}{r['params']:>16,}{r['non_embedding']:>16,}" for r in rows]
    _emit(args, {"presets": rows}, "\n".join(lines))


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from .train.config import HELP, TrainConfig

    for f in TrainConfig.fields():
        if f.name == "model_overrides":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        text = f"{HELP[f.name]} (default {default})"
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag, type=type(default), default=None, metavar=type(default).__name__.upper(), help=text)


def build_parser() -> argparse.ArgumentParser:
    from .tokenizer import TOKENIZER_KINDS

    parser = argparse.ArgumentParser(prog="gptlab", description="Build, pre-train and sample GPT-style models.")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("prepare", help="tokenize text into train/val token shards")
    p.add_argument("sources", nargs="+", help="files, folders, .jsonl/.parquet, http(s) URLs, or a named corpus "
                                              "(shakespeare, tinyshakespeare)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", default="gpt2", choices=TOKENIZER_KINDS)
    p.add_argument("--vocab-size", type=int, help="vocabulary size of a trained bpe tokenizer")
    p.add_argument("--val-fraction", type=float, default=0.1, help="tail of the token stream held out (0.1)")
    p.add_argument("--field", default="text", help="JSONL field / parquet column holding the text")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="pre-train a model (torchrun for several processes)",
                       description="Train from a TOML recipe and/or flags. Flags override the recipe.")
    p.add_argument("--recipe", help="TOML recipe (top-level keys = the flags below, [model_overrides] = model config fields)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="model config override, e.g. n_layer=6")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last checkpoint")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="run folder (its latest checkpoint), RUN/best, or a checkpoint folder")
    p.add_argument("--prompt", default="")
    p.add_argument("--prompt-file")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("exposure", help="teacher-forcing vs scheduled-sampling loss of a checkpoint on a text")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--text")
    p.add_argument("--text-file")
    p.add_argument("--p", type=float, default=0.5, help="probability of feeding the model's own prediction")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_exposure)

    p = sub.add_parser("presets", help="list the model presets with exact parameter counts")
    p.set_defaults(func=cmd_presets)

    for sp in sub.choices.values():
        sp.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GptlabError as e:
        print(f"gptlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptlab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
