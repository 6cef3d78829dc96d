"""``gptlab eval <task>``: perplexity, lambada, mc, fewshot, generate. Each prints a summary, or with ``--json``
one JSON object with the model, the task and its version, the data's sha256, the settings and the scores."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..options import count, number, number_list
from ..recipe import NON_NEGATIVE, SEED
from . import tasks


def _run(args: argparse.Namespace) -> None:
    from ..interop import load_any
    from ..tokenizer import from_spec

    model, meta = load_any(args.checkpoint, args.device)
    tok = from_spec(meta["tokenizer"])
    t0 = time.perf_counter()
    result: dict[str, Any] = args.task(model, tok, args)
    result.update(model=str(args.checkpoint), params=model.num_params(), seconds=round(time.perf_counter() - t0, 2),
                  batch_size=args.batch_size, limit=args.limit)
    print(json.dumps(result) if args.json else args.summary(result), flush=True)


def _perplexity(model, tok, args):
    return tasks.perplexity(model, tok, args.paths, args.stride, args.batch_size, args.limit)


def _lambada(model, tok, args):
    return tasks.lambada(model, tok, args.path, args.limit, args.batch_size, args.stopword_filter)


def _mc(model, tok, args):
    return tasks.multiple_choice(model, tok, args.path, args.limit, args.batch_size)


def _fewshot(model, tok, args):
    r = tasks.fewshot(model, tok, args.path, args.train, args.shots, args.template, args.seed, args.calibrate,
                      args.limit, args.batch_size)
    if args.plot:
        r["plot"] = str(tasks.fewshot_plot(r, Path(args.plot), f"{Path(str(args.checkpoint)).name}: "
                                                              f"accuracy vs shots"))
    return r


def _generate(model, tok, args):
    return tasks.generation_task(model, tok, args.kind, args.path, args.shots, args.seed, args.max_new_tokens,
                                 args.source_lang, args.target_lang, args.limit, args.batch_size)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity, LAMBADA, multiple choice, few-shot in-context learning",
                       description="Evaluate a gptlab run/checkpoint or a Hugging Face GPT-2 folder / Hub name.")
    what = p.add_subparsers(dest="what", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--checkpoint", required=True, help="gptlab run or checkpoint, HF folder or Hub name")
        q.add_argument("--limit", type=count(1), help="evaluate only the first N records (tokens, for perplexity; "
                                                      ">= 1)")
        q.add_argument("--batch-size", type=count(1, 4096), default=8, help="sequences per forward pass "
                                                                            "(valid: [1, 4096]; default 8)")
        q.add_argument("--device", default="cpu")
        q.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    q = what.add_parser("perplexity", help="sliding-window perplexity per token, word and byte of text files")
    q.add_argument("paths", nargs="+", help="text files, folders of .txt files, or prepared .bin token shards")
    q.add_argument("--stride", type=count(1), help="window step in tokens (>= 1, at most the context; default "
                                                   "half the context)")
    q.set_defaults(task=_perplexity, summary=lambda r: (
        f"{r['tokens']:,} tokens: loss {r['loss']:.4f} nats/token, perplexity {r['token_perplexity']:.3f}; "
        f"word perplexity {r['word_perplexity']:.3f}; {r['bits_per_byte']:.4f} bits/byte"))

    q = what.add_parser("lambada", help="OpenAI's LAMBADA: last-word accuracy and perplexity (lambada_openai)")
    q.add_argument("--path", help="lambada_test.jsonl (default: cached download, sha256-checked)")
    q.add_argument("--stopword-filter", action="store_true",
                   help="the GPT-2 paper's variant: a stop word may not be the predicted last word")
    q.set_defaults(task=_lambada, summary=lambda r: (
        f"LAMBADA ({r['n']:,} passages): acc {r['acc']:.4f}, perplexity {r['perplexity']:.3f}"))

    q = what.add_parser("mc", help="multiple choice: HellaSwag jsonl or {context, choices, label} jsonl")
    q.add_argument("path")
    q.set_defaults(task=_mc, summary=lambda r: (
        f"{r['task']} ({r['n']:,}): acc {r['acc']:.4f}, acc_norm {r['acc_norm']:.4f} (chars), "
        f"{r['acc_norm_tokens']:.4f} (tokens)"))

    q = what.add_parser("fewshot", help="zero/one/few-shot classification: accuracy vs number of examples")
    q.add_argument("--path", help="{text, label} jsonl to classify (default: gptlab's sentiment set)")
    q.add_argument("--train", help="{text, label} jsonl to draw examples from (default: --path minus the query)")
    q.add_argument("--shots", type=number_list(NON_NEGATIVE, integer=True), default=[0, 1, 5, 10],
                   help="comma-separated k, each >= 0 (default 0,1,5,10)")
    q.add_argument("--template", default="Input: {text}\nLabel: {label}")
    q.add_argument("--seed", type=number(SEED, integer=True), default=0, help="seed (>= 0)")
    q.add_argument("--calibrate", action="store_true", help="contextual calibration (Zhao et al. 2021)")
    q.add_argument("--plot", metavar="PNG", help="write accuracy vs shots to this file")
    q.set_defaults(task=_fewshot, summary=lambda r: "\n".join(
        [f"labels {r['labels']}, template {r['template']!r}"] +
        [f"{x['shots']:>3}-shot: acc {x['acc']:.3f} (95% CI {x['ci95'][0]:.3f}-{x['ci95'][1]:.3f}, n={x['n']})"
         for x in r["results"]] + ([f"plot: {r['plot']}"] if "plot" in r else [])))
    q = what.add_parser("generate", help="prompted generation: TL;DR summaries (ROUGE), translation (BLEU, chrF), "
                                         "closed-book QA (exact match, F1)")
    q.add_argument("kind", choices=list(tasks.GENERATION_TASKS))
    q.add_argument("path", help="jsonl: summarize {document, summary}; translate {source, target}; "
                                "qa {question, answers: [...]}")
    q.add_argument("--shots", type=count(0), default=0, help="solved examples before each prompt (>= 0; default 0)")
    q.add_argument("--seed", type=number(SEED, integer=True), default=0, help="seed (>= 0)")
    q.add_argument("--max-new-tokens", type=count(1), default=64, help="tokens generated per prompt (>= 1)")
    q.add_argument("--source-lang", default="English")
    q.add_argument("--target-lang", default="French")
    q.set_defaults(task=_generate, summary=lambda r: f"{r['task']} ({r['n']}, {r['shots']}-shot): " + ", ".join(
        f"{k} {r[k]:.4f}" for k in ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match", "f1") if k in r))

    for q in what.choices.values():
        common(q)
    p.set_defaults(func=_run)
