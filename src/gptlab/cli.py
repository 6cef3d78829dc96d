"""``gptlab <verb>``: prepare, train, sample, convert, exposure, presets, plan, eval. Every verb takes ``--json``.

User mistakes surface as one line, ``gptlab: error: <what is wrong and how to fix it>``, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from .errors import GptlabError
from .files import describe_os_error
from .options import ArgumentParser, add_config_flags, count, number, number_list, parse_set
from .recipe import POSITIVE, PROBABILITY_BELOW_1, SEED, UNIT, Range


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
        overrides["model_overrides"] = parse_set(args.set)
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


def cmd_align(args: argparse.Namespace) -> None:
    from .align.config import AlignConfig
    from .align.trainer import train_stage

    values = {f.name: getattr(args, f.name, None) for f in AlignConfig.fields() if f.name != "stage"}
    cfg = AlignConfig.from_sources(args.recipe, **values, stage=args.stage)
    s = train_stage(cfg, resume=args.resume, progress=not args.json)
    metrics = "  ".join(f"{k} {v:.4g}" for k, v in s["eval"].items())
    _emit(args, s, f"{s['stage']}: {s['steps']} steps in {s['train_seconds']}s; held-out: {metrics or 'none'}\n"
                   f"checkpoints: {s['out_dir']}/checkpoints  metrics: {s['metrics']}")


def _sampling(args: argparse.Namespace, seed: int | None = None):
    from .generate import Sampling

    return Sampling(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, min_p=args.min_p,
                    repetition_penalty=args.repetition_penalty, seed=args.seed if seed is None else seed)


def _engine(args: argparse.Namespace):
    from .generate import Engine
    from .interop import load_any
    from .tokenizer import from_spec

    model, meta = load_any(args.checkpoint, args.device)
    return Engine(model, from_spec(meta["tokenizer"]), compile=args.compile), meta


def cmd_sample(args: argparse.Namespace) -> None:
    if args.interactive:
        return _repl(args)
    if args.prompt_file and args.prompt:
        raise GptlabError("give --prompt or --prompt-file, not both")
    if args.stream and args.json:
        raise GptlabError("--stream prints text as it comes; --json prints one object at the end: pick one")
    try:
        prompt = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else args.prompt
    except OSError as e:
        raise GptlabError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}") from None
    engine, meta = _engine(args)
    sampling = _sampling(args)
    t0 = time.perf_counter()
    if args.stream:
        decode_seconds, steps, texts = 0.0, 0, []
        for i in range(args.num_samples):
            if i:
                print("\n" + "-" * 40)
            print(prompt, end="", flush=True)
            pieces = []
            for piece in engine.stream(prompt, args.max_new_tokens, _sampling(args, args.seed + i), args.stop,
                                       sliding_window=args.sliding_window):
                print(piece, end="", flush=True)
                pieces.append(piece)
            texts.append("".join(pieces))
            decode_seconds += engine.stats["decode_seconds"]
            steps += engine.stats["decode_steps"]
        print(f"\n[{steps / max(decode_seconds, 1e-9):,.1f} tok/s decoding]", file=sys.stderr)
        return
    out = engine.generate([prompt] * args.num_samples, args.max_new_tokens, sampling, args.stop,
                          sliding_window=args.sliding_window)
    seconds = time.perf_counter() - t0
    st = engine.stats
    new = sum(len(c.tokens) for c in out)
    result = {"source": str(args.checkpoint), "prompt": prompt, "samples": [c.text for c in out],
              "finish_reasons": [c.finish_reason for c in out], "new_tokens": [len(c.tokens) for c in out],
              "tokens_per_second": round(new / seconds, 2),
              "decode_tokens_per_second": round(st["decode_steps"] * args.num_samples
                                                / max(st["decode_seconds"], 1e-9), 2),
              "prefill_seconds": round(st["prefill_seconds"], 4), "kv_cache_bytes": st["cache_bytes"],
              "sampling": dataclasses.asdict(sampling), "compile": args.compile}
    sep = "\n" + "-" * 40 + "\n"
    _emit(args, result, sep.join(prompt + c.text for c in out) +
          f"\n[{new} tokens in {seconds:.2f}s: {result['tokens_per_second']:,.1f} tok/s; decoding "
          f"{result['decode_tokens_per_second']:,.1f} tok/s; KV cache {st['cache_bytes'] / 2**20:,.1f} MiB]")


def _repl(args: argparse.Namespace) -> None:
    """Continue-the-text loop: each line typed is appended to the running text and the model continues it."""
    engine, meta = _engine(args)
    print(f"gptlab: {meta['source']} ({engine.model.num_params():,} parameters). Type text and press Enter; the "
          f"model continues it. /reset clears the text, /quit (or Ctrl-D) leaves.", file=sys.stderr)
    text, turn = "", 0
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() == "/quit":
            return
        if line.strip() == "/reset":
            text = ""
            continue
        text += line if not text else "\n" + line
        for piece in engine.stream(text, args.max_new_tokens, _sampling(args, args.seed + turn), args.stop,
                                   sliding_window=True):
            print(piece, end="", flush=True)
            text += piece
        print(flush=True)
        turn += 1


def cmd_convert(args: argparse.Namespace) -> None:
    from .interop import load_any
    from .interop.hf import save_hf
    from .train.checkpoint import save_model_checkpoint

    model, meta = load_any(args.source)
    cfg = model.config
    to = args.to or ("hf" if meta.get("format") == "gptlab-checkpoint" else "gptlab")
    if to == "hf":
        out = save_hf(model.state_dict(), cfg, meta["tokenizer"], Path(args.out), source=str(args.source))
    else:
        out = save_model_checkpoint(Path(args.out), model.state_dict(), cfg, meta["tokenizer"],
                                    source=str(args.source))
    result = {"source": str(args.source), "out": str(out), "to": to, "params": model.num_params(),
              "files": sorted(p.name for p in out.iterdir())}
    _emit(args, result, f"wrote {to} model ({result['params']:,} parameters) to {out}: {', '.join(result['files'])}")


def cmd_exposure(args: argparse.Namespace) -> None:
    from .interop import load_any
    from .tokenizer import from_spec
    from .train.scheduled_sampling import exposure_report

    model, meta = load_any(args.checkpoint)
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


def cmd_scale(args: argparse.Namespace) -> None:
    from .scale.sweep import Sweep, run_sweep

    sw = Sweep.from_sources(args.sweep, **{k: getattr(args, k) for k in (
        "data", "out", "recipe", "depths", "shapes", "tokens", "flops", "width_per_layer", "head_dim", "warmup_frac", "jobs",
        "launcher", "nproc_per_node", "include")})
    r = run_sweep(sw, progress=not args.json)
    fits = r["fits"]
    lines = [f"{'run':<14}{'non-emb N':>12}{'tokens':>12}{'C':>10}{'val loss':>10}"]
    lines += [f"{x['name']:<14}{x['non_embedding']:>12,}{x['tokens']:>12,}{x['compute']:>10.3g}"
              f"{x['final_val_loss']:>10.4f}" for x in r["runs"]]
    if "power_law" in fits:
        f = fits["power_law"]
        lines.append(f"L(N) = {f['params']['a']:.4g}·N^-{f['params']['alpha']:.4f} (alpha 95% CI "
                     f"{f['ci95']['alpha'][0]:.4f}-{f['ci95']['alpha'][1]:.4f}; Kaplan et al.: 0.076)")
    if "isoflop" in fits and "a" in fits["isoflop"]:
        lines.append(f"IsoFLOP: N_opt ∝ C^{fits['isoflop']['a']:.3f}, D_opt ∝ C^{fits['isoflop']['b']:.3f} "
                     f"(Hoffmann et al. Approach 2: 0.49, 0.51)")
    if "chinchilla" in fits:
        p = fits["chinchilla"]["params"]
        lines.append(f"L(N, D) = {p['E']:.3f} + {p['A']:.4g}/N^{p['alpha']:.3f} + {p['B']:.4g}/D^{p['beta']:.3f}")
    if "held_out" in fits:
        h = fits["held_out"]
        lines.append(f"held out: {h['what']}: predicted {h['predicted_loss']:.4f}, actual {h['actual_loss']:.4f} "
                     f"({h['relative_error']:+.2%})" + (f"; with E: {h['predicted_loss_with_E']:.4f} "
                                                        f"({h['relative_error_with_E']:+.2%})"
                                                        if "predicted_loss_with_E" in h else ""))
    lines.append(f"results: {r['out']}/report.md, results.csv, fits.json and plots")
    _emit(args, r, "\n".join(lines))


def _shapes(text: str) -> list[list[int]]:
    """``2x64,4x128``: [[n_layer, n_embd], ...]."""
    try:
        shapes = [[int(v) for v in x.split("x")] for x in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(x) != 2 or min(x) < 1 for x in shapes):
        raise argparse.ArgumentTypeError(f"{text!r}: expected n_layer x n_embd pairs such as 2x64,4x128")
    return shapes


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


def build_parser() -> argparse.ArgumentParser:
    from .eval import cli as eval_cli
    from .plan import cli as plan_cli
    from .tokenizer import TOKENIZER_KINDS

    parser = ArgumentParser(prog="gptlab", description="Build, pre-train, sample, evaluate and plan GPT-style models.")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("prepare", help="tokenize text into train/val token shards")
    p.add_argument("sources", nargs="+", help="files, folders, .jsonl/.parquet, http(s) URLs, or a named corpus "
                                              "(shakespeare, tinyshakespeare)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", default="gpt2", choices=TOKENIZER_KINDS)
    p.add_argument("--vocab-size", type=count(2, 2**32 - 1),
                   help="vocabulary size of a trained bpe tokenizer (valid: [2, 4294967295])")
    p.add_argument("--val-fraction", type=number(Range(0, 1, lo_open=True, hi_open=True)), default=0.1,
                   help="tail of the token stream held out (valid: (0, 1); default 0.1)")
    p.add_argument("--field", default="text", help="JSONL field / parquet column holding the text")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="pre-train a model (torchrun for several processes)",
                       description="Train from a TOML recipe and/or flags. Flags override the recipe.")
    p.add_argument("--recipe", help="TOML recipe (top-level keys = the flags below, [model_overrides] = model config fields)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="model config override, e.g. n_layer=6")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last checkpoint")
    from .train.config import TrainConfig

    add_config_flags(p, TrainConfig.fields(), ("model_overrides",))
    p.set_defaults(func=cmd_train)

    model_help = ("gptlab run folder (its latest checkpoint), RUN/best, a checkpoint folder, a Hugging Face model "
                  "folder or Hub name (gpt2, distilgpt2, ...), or an OpenAI GPT-2 release folder")
    p = sub.add_parser("sample", help="generate text (KV-cached, batched, streaming)",
                       description="Sample continuations of a prompt. The empty prompt samples unconditionally.")
    p.add_argument("--checkpoint", required=True, help=model_help)
    p.add_argument("--prompt", default="")
    p.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=count(1), default=200, help="tokens to generate (>= 1; default 200)")
    p.add_argument("--temperature", type=number(Range(0, 100)), default=0.8, help="0 = greedy (valid: [0, 100]; "
                                                                                 "default 0.8)")
    p.add_argument("--top-k", type=count(0), default=200, help="keep the k most likely tokens; 0 = off (>= 0; "
                                                              "default 200)")
    p.add_argument("--top-p", type=number(Range(0, 1, lo_open=True)),
                   help="nucleus: keep the most likely tokens up to this probability mass (valid: (0, 1])")
    p.add_argument("--min-p", type=number(UNIT), help="keep tokens at least this fraction as likely as the top one "
                                                      "(valid: [0, 1])")
    p.add_argument("--repetition-penalty", type=number(Range(0, 100, lo_open=True)), default=1.0,
                   help="> 1 discourages repeats (CTRL; 1 = off; valid: (0, 100])")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a sample before this text (repeatable); the end-of-text token always ends it")
    p.add_argument("--num-samples", type=count(1, 1024), default=1, help="samples decoded together as one batch "
                                                                         "(valid: [1, 1024])")
    p.add_argument("--seed", type=number(SEED, integer=True), default=1337,
                   help="sample i uses seed + i (reproducible, batch-independent; >= 0)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--interactive", action="store_true", help="a continue-the-text loop on the terminal")
    p.add_argument("--sliding-window", action="store_true",
                   help="allow prompt + new tokens beyond the context: the oldest tokens are dropped")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (one-off compile; then ~2x faster on CPU)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("convert", help="convert between gptlab checkpoints and Hugging Face / OpenAI models")
    p.add_argument("source", help=model_help)
    p.add_argument("out", help="new output folder (never overwritten)")
    p.add_argument("--to", choices=["hf", "gptlab"],
                   help="output format (default: hf for a gptlab checkpoint, gptlab for anything else)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("exposure", help="teacher-forcing vs scheduled-sampling loss of a checkpoint on a text")
    p.add_argument("--checkpoint", required=True, help=model_help)
    p.add_argument("--text")
    p.add_argument("--text-file")
    p.add_argument("--p", type=number(UNIT), default=0.5, help="probability of feeding the model's own prediction "
                                                              "(valid: [0, 1])")
    p.add_argument("--seed", type=number(SEED, integer=True), default=0, help="seed (>= 0)")
    p.set_defaults(func=cmd_exposure)

    p = sub.add_parser("scale", help="scaling-law sweep: runs over sizes and budgets, fits, IsoFLOP, report",
                       description="Train one ordinary run per (size, budget) on the same data: token budgets "
                                   "(L(N), L(D)) or FLOP budgets (--flops, IsoFLOP profiles), then fit, plot and "
                                   "write report.md. Finished runs are skipped on a re-run; unfinished ones resume. "
                                   "Flags override the --sweep file.")
    p.add_argument("--sweep", metavar="TOML", help="sweep file: these options as keys, a [train] table of "
                                                    "training-recipe overrides")
    p.add_argument("--recipe", help="base training recipe (TOML); the sweep sets out_dir, max_iters, lr, model shape")
    p.add_argument("--data", help="a folder made by `gptlab prepare`")
    p.add_argument("--out", help="sweep folder (one run folder per point inside)")
    p.add_argument("--depths", type=number_list(Range(1, 1000), integer=True),
                   help="comma-separated depths, each in [1, 1000] (default 1,2,3,4,6)")
    p.add_argument("--shapes", type=_shapes, metavar="LxW[,LxW]",
                   help="explicit sizes instead of the dial, n_layer x n_embd: 2x64,4x128,6x192")
    p.add_argument("--tokens", type=number_list(POSITIVE), help="training tokens per model (> 0), comma-separated "
                                                                "for several (default 1e6)")
    p.add_argument("--flops", type=number_list(POSITIVE), help="IsoFLOP mode: comma-separated FLOP budgets (> 0); "
                                                               "each depth trains on C/(6N) tokens")
    p.add_argument("--width-per-layer", type=count(1), help="width = this x depth (>= 1; default 64)")
    p.add_argument("--head-dim", type=count(1), help="channels per head (>= 1; default 32)")
    p.add_argument("--warmup-frac", type=number(PROBABILITY_BELOW_1),
                   help="warmup as a fraction of each run, in [0, 1) (default: the recipe's warmup_iters, at most "
                        "half the run)")
    p.add_argument("--jobs", type=count(1, 256), help="runs at once in child processes, threads split between them "
                                                      "(valid: [1, 256]; default 1)")
    p.add_argument("--launcher", choices=["process", "torchrun"], help="torchrun: each run under torchrun "
                                                                       "--standalone --nproc-per-node")
    p.add_argument("--nproc-per-node", type=count(1, 1024), help="processes per torchrun run (valid: [1, 1024]; "
                                                                 "default 1)")
    p.add_argument("--include", type=lambda t: t.split(","), metavar="SWEEP[,SWEEP]",
                   help="also fit the finished runs of these sweep folders (same data; e.g. other sizes)")
    p.set_defaults(func=cmd_scale)

    from .align.config import STAGES, AlignConfig

    p = sub.add_parser("align", help="fine-tune and align: finetune (GPT-1 heads), sft, reward, dpo, ppo",
                       description="Tune a model on JSON-lines data with one shared loop (checkpoints, exact resume, "
                                   "metrics). Formats and recipes: docs/alignment.md.")
    stages = p.add_subparsers(dest="stage", required=True)
    stage_help = {"finetune": "GPT-1 task fine-tuning: special tokens, a linear head, + lambda x LM loss",
                  "sft": "supervised fine-tuning, loss on responses only, optional packing",
                  "reward": "reward model: scalar head, Bradley-Terry loss over ranked pairs",
                  "dpo": "direct preference optimisation against a frozen reference",
                  "ppo": "PPO with a KL penalty to the reference (InstructGPT), adaptive KL, PPO-ptx"}
    for stage in STAGES:
        q = stages.add_parser(stage, help=stage_help[stage])
        q.add_argument("--recipe", help="TOML file of these options (flags override it)")
        q.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last checkpoint")
        add_config_flags(q, AlignConfig.fields(), ("stage",))
        q.add_argument("--json", action="store_true", help="print one JSON object instead of text")
        q.set_defaults(func=cmd_align)

    p = sub.add_parser("presets", help="list the model presets with exact parameter counts")
    p.set_defaults(func=cmd_presets)

    for name, sp in sub.choices.items():
        if name != "align":  # its stages have their own --json
            sp.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    plan_cli.add_parser(sub)  # these two have sub-verbs, each with --json
    eval_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GptlabError as e:
        return _fail(str(e))
    except OSError as e:  # disk full, permissions, a path that is not there: one line naming the path
        if isinstance(e, BrokenPipeError):  # `gptlab plan ... | head`: the reader left; stop quietly
            _silence_stdout()
            return 0
        return _fail(describe_os_error(e))
    except KeyboardInterrupt:
        print("gptlab: interrupted", file=sys.stderr)
        return 130
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    return 0


def _fail(message: str) -> int:
    print(f"gptlab: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return 2


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush does not fail again."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
