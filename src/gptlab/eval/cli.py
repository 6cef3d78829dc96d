"""``gptlab eval <task> MODEL ...``: perplexity, lambada, mc, fewshot, generate, exposure. Each prints a summary, or
with ``--json`` one JSON object with the model, the task and its version, the data's sha256, the settings and the
scores. Option defaults are the task functions' own (:mod:`gptlab.eval.tasks`)."""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import GptlabError
from ..options import add_device, add_json, add_model, add_quantize, count, emit, number, number_list
from ..recipe import NON_NEGATIVE, SEED, UNIT
from ..train.scheduled_sampling import exposure_report
from . import tasks


def default(fn: Any, name: str) -> Any:
    """The default of parameter ``name`` of ``fn``: the CLI's defaults are the library's."""
    return inspect.signature(fn).parameters[name].default


def _run(args: argparse.Namespace) -> None:
    from ..loader import load_model  # here, not at the top: loading pulls in torch and the interop formats

    loaded = load_model(args.model, args.device, quantize=args.quantize)
    t0 = time.perf_counter()
    result: dict[str, Any] = args.task(loaded.model, loaded.tokenizer, args)
    result.update(
        model=str(args.model),
        params=loaded.model.num_params(),
        seconds=round(time.perf_counter() - t0, 2),
        batch_size=args.batch_size,
        limit=args.limit,
    )
    emit(args, result, args.summary(result))


def _perplexity(model, tok, args):
    return tasks.perplexity(
        model, tok, paths=args.paths, stride=args.stride, batch_size=args.batch_size, limit=args.limit
    )


def _lambada(model, tok, args):
    return tasks.lambada(
        model, tok, path=args.path, limit=args.limit, batch_size=args.batch_size, stopword_filter=args.stopword_filter
    )


def _mc(model, tok, args):
    return tasks.multiple_choice(model, tok, path=args.path, limit=args.limit, batch_size=args.batch_size)


def _fewshot(model, tok, args):
    r = tasks.fewshot(
        model,
        tok,
        path=args.path,
        train_path=args.train,
        shots=args.shots,
        template=args.template,
        seed=args.seed,
        calibrate=args.calibrate,
        limit=args.limit,
        batch_size=args.batch_size,
    )
    if args.plot:
        r["plot"] = str(tasks.fewshot_plot(r, Path(args.plot), f"{Path(str(args.model)).name}: accuracy vs shots"))
    return r


def _generate(model, tok, args):
    return tasks.generation_task(
        model,
        tok,
        task=args.kind,
        path=args.path,
        shots=args.shots,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        source_lang=args.source_lang,
        target_lang=args.target_lang,
        limit=args.limit,
        batch_size=args.batch_size,
    )


def _vision(model, tok, args):
    from ..data.loader import read_meta
    from ..generate.engine import Engine
    from ..vision.evaluate import BLIND, evaluate_split

    engine = Engine(model, tok)
    names = args.split or [s for s in ("val", "holdout") if s in read_meta(args.data).get("files", {})]
    blind = args.blind or BLIND
    splits = [evaluate_split(engine, args.data, s, blind, args.limit, args.batch_size) for s in names]
    return {"task": "vision", "data": args.data, "splits": splits}


def _vision_summary(r: dict[str, Any]) -> str:
    lines = []
    for s in r["splits"]:
        for attribute, row in s.items():
            if isinstance(row, dict):
                blind = "  ".join(f"{k} {row[k]:.3f}" for k in ("zero", "shuffle") if k in row)
                lines.append(
                    f"{s['split']:>8} {attribute:<9} accuracy {row['image']:.3f}   blind: {blind}   chance: "
                    f"uniform {row['uniform']:.3f}, majority {row['majority']:.3f}"
                )
    return "\n".join(lines)


def _exposure(model, tok, args):

    if args.text_file:
        try:
            text = Path(args.text_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise GptlabError(f"--text-file {args.text_file} is not UTF-8 text (byte {e.start})") from None
    else:
        text = args.text
    if not text:
        raise GptlabError("give a text with --text or --text-file")
    tokens = tok.encode(text)
    if len(tokens) < 2:
        raise GptlabError("the text is shorter than two tokens; give a longer one")
    return exposure_report(model, tokens, args.p, args.seed)


def _exposure_summary(r: dict[str, Any]) -> str:
    return (
        f"{r['tokens']} tokens in {r['windows']} window(s): teacher forcing {r['teacher_forcing_loss']:.4f} "
        f"nats/token, scheduled sampling (p={r['p']}, {r['replaced_fraction']:.0%} of inputs replaced by the "
        f"model's own predictions) {r['scheduled_sampling_loss']:.4f}"
    )


def add_exposure_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--text")
    q.add_argument("--text-file", help="read the text from this UTF-8 file")
    q.add_argument(
        "--p",
        type=number(UNIT),
        default=0.5,
        help="probability of feeding the model's own prediction (valid: [0, 1]; default 0.5)",
    )
    q.add_argument(
        "--seed", type=number(SEED, integer=True), default=default(exposure_report, "seed"), help="seed (>= 0)"
    )
    q.set_defaults(task=_exposure, summary=_exposure_summary)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, LAMBADA, multiple choice, few-shot, generation, exposure bias",
        description="Evaluate a gptlab run/checkpoint or a Hugging Face GPT-2 folder / Hub name.",
    )
    what = p.add_subparsers(dest="what", required=True)

    q = what.add_parser(
        "perplexity",
        help="sliding-window perplexity per token, word and byte of text files "
        "(lm-eval's rolling log-likelihood at --stride = context)",
    )
    add_model(q, "eval perplexity")
    q.add_argument("paths", nargs="+", help="text files, folders of .txt files, or prepared .bin token shards")
    q.add_argument(
        "--stride", type=count(1), help="window step in tokens (>= 1, at most the context; default half the context)"
    )
    q.set_defaults(
        task=_perplexity,
        _shift="paths",
        summary=lambda r: (
            f"{r['tokens']:,} tokens: loss {r['loss']:.4f} nats/token, perplexity {r['token_perplexity']:.3f}; "
            f"word perplexity {r['word_perplexity']:.3f}; {r['bits_per_byte']:.4f} bits/byte"
        ),
    )

    q = what.add_parser("lambada", help="OpenAI's LAMBADA: last-word accuracy and perplexity (lambada_openai)")
    add_model(q, "eval lambada")
    q.add_argument("--path", help="lambada_test.jsonl (default: cached download, sha256-checked)")
    q.add_argument(
        "--stopword-filter",
        action="store_true",
        help="the GPT-2 paper's variant: a stop word may not be the predicted last word",
    )
    q.set_defaults(
        task=_lambada,
        summary=lambda r: f"LAMBADA ({r['n']:,} passages): acc {r['acc']:.4f}, perplexity {r['perplexity']:.3f}",
    )

    q = what.add_parser("mc", help="multiple choice: HellaSwag jsonl or {context, choices, label} jsonl")
    add_model(q, "eval mc")
    q.add_argument("path")
    q.set_defaults(
        task=_mc,
        summary=lambda r: (
            f"{r['task']} ({r['n']:,}): acc {r['acc']:.4f}, acc_norm {r['acc_norm']:.4f} (chars), "
            f"{r['acc_norm_tokens']:.4f} (tokens)"
        ),
    )

    q = what.add_parser("fewshot", help="zero/one/few-shot classification: accuracy vs number of examples")
    add_model(q, "eval fewshot")
    q.add_argument("--path", help="{text, label} jsonl to classify (default: gptlab's sentiment set)")
    q.add_argument("--train", help="{text, label} jsonl to draw examples from (default: --path minus the query)")
    shots = list(default(tasks.fewshot, "shots"))
    q.add_argument(
        "--shots",
        type=number_list(NON_NEGATIVE, integer=True),
        default=shots,
        help=f"comma-separated k, each >= 0 (default {','.join(map(str, shots))})",
    )
    q.add_argument("--template", default=default(tasks.fewshot, "template"))
    q.add_argument(
        "--seed",
        type=number(SEED, integer=True),
        default=default(tasks.fewshot, "seed"),
        help=f"seed for drawing the examples (>= 0; default {default(tasks.fewshot, 'seed')})",
    )
    q.add_argument("--calibrate", action="store_true", help="contextual calibration (Zhao et al. 2021)")
    q.add_argument("--plot", metavar="PNG", help="write accuracy vs shots to this file")
    q.set_defaults(
        task=_fewshot,
        summary=lambda r: "\n".join(
            [f"labels {r['labels']}, template {r['template']!r}"]
            + [
                f"{x['shots']:>3}-shot: acc {x['acc']:.3f} (95% CI {x['ci95'][0]:.3f}-{x['ci95'][1]:.3f}, n={x['n']})"
                for x in r["results"]
            ]
            + ([f"plot: {r['plot']}"] if "plot" in r else [])
        ),
    )

    q = what.add_parser(
        "generate",
        help="prompted generation: TL;DR summaries (ROUGE), translation (BLEU, chrF), closed-book QA (exact match, F1)",
    )
    add_model(q, "eval generate")
    q.add_argument("kind", choices=list(tasks.GENERATION_TASKS))
    q.add_argument(
        "path", help="jsonl: summarize {document, summary}; translate {source, target}; qa {question, answers: [...]}"
    )
    g = tasks.generation_task
    q.add_argument(
        "--shots",
        type=count(0),
        default=default(g, "shots"),
        help="solved examples before each prompt (>= 0; default 0)",
    )
    q.add_argument("--seed", type=number(SEED, integer=True), default=default(g, "seed"), help="seed (>= 0)")
    q.add_argument(
        "--max-new-tokens",
        type=count(1),
        default=default(g, "max_new_tokens"),
        help="tokens generated per prompt (>= 1)",
    )
    q.add_argument("--source-lang", default=default(g, "source_lang"))
    q.add_argument("--target-lang", default=default(g, "target_lang"))
    q.set_defaults(
        task=_generate,
        summary=lambda r: (
            f"{r['task']} ({r['n']}, {r['shots']}-shot): "
            + ", ".join(
                f"{k} {r[k]:.4f}" for k in ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match", "f1") if k in r
            )
        ),
    )

    q = what.add_parser("exposure", help="exposure bias: teacher-forcing vs scheduled-sampling loss on a text")
    add_model(q, "eval exposure")
    add_exposure_args(q)

    q = what.add_parser(
        "vision", help="image datasets: per-attribute answer accuracy, with the image and blind (docs/vision.md)"
    )
    add_model(q, "eval vision")
    q.add_argument("--data", required=True, help="an image dataset folder (`gptlab prepare shapes|digits`)")
    q.add_argument(
        "--split",
        action="append",
        help="split(s) to evaluate, repeatable (default val, and holdout when the dataset has one)",
    )
    q.add_argument(
        "--blind",
        action="append",
        choices=("zero", "shuffle"),
        help="blind baselines to run beside (repeatable; default both)",
    )
    q.set_defaults(task=_vision, summary=_vision_summary)

    for q in what.choices.values():
        q.add_argument(
            "--limit", type=count(1), help="evaluate only the first N records (tokens, for perplexity; >= 1)"
        )
        q.add_argument(
            "--batch-size",
            type=count(1, 4096),
            default=8,
            help="sequences per forward pass (valid: [1, 4096]; default 8)",
        )
        add_device(q)
        add_quantize(q)
        add_json(q)
    p.set_defaults(func=_run)

    # `gptlab exposure` (before `eval exposure`): kept for one release
    q = sub.add_parser("exposure", help="deprecated: use `gptlab eval exposure MODEL`")
    add_model(q, "eval exposure")
    add_exposure_args(q)
    q.set_defaults(func=_deprecated_exposure, limit=None, batch_size=1, device="auto", quantize=None)
    add_json(q)


def _deprecated_exposure(args: argparse.Namespace) -> None:
    print(
        "gptlab: warning: `gptlab exposure` is deprecated and will be removed in the next release; use "
        "`gptlab eval exposure MODEL`",
        file=sys.stderr,
    )
    _run(args)
