"""``gptlab eval <task> MODEL ...``: perplexity, lambada, mc, fewshot, generate, exposure, vision. Each prints a
summary, or with ``--json`` one JSON object with the model, the task and its version, the data's sha256, the
settings and the scores. Each task's flags are the fields of its config (:mod:`gptlab.eval.config`), whose defaults
the library's task functions share."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import GptlabError
from ..files import read_input, refuse_existing
from ..options import add_config_flags, add_json, add_model, config_from_flags, emit
from . import tasks
from .config import (
    BLIND,
    GENERATION_KINDS,
    EvalConfig,
    ExposureConfig,
    FewshotConfig,
    GenerationConfig,
    LambadaConfig,
    MultipleChoiceConfig,
    PerplexityConfig,
    VisionConfig,
)
from .exposure import exposure_report


def _run(args: argparse.Namespace) -> None:
    import torch

    from ..loader import load_model  # here, not at the top: loading pulls in torch and the interop formats

    positional = {k: getattr(args, k) for k in args.positional}
    cfg = config_from_flags(args, args.config, ("model", *positional), model=args.model, **positional)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if getattr(cfg, "plot", None):
        refuse_existing(cfg.plot, "--plot")
    loaded = load_model(cfg.model, cfg.device, quantize=cfg.quantize)
    t0 = time.perf_counter()
    result: dict[str, Any] = args.task(loaded.model, loaded.tokenizer, cfg)
    result.update(
        model=str(cfg.model),
        params=loaded.model.num_params(),
        seconds=round(time.perf_counter() - t0, 2),
        batch_size=cfg.batch_size,
        limit=cfg.limit,
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
    from ..generate import Engine
    from .vision import evaluate_split

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
            text = read_input(args.text_file, "--text-file").decode("utf-8")
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


def add_task(
    what: argparse._SubParsersAction,
    name: str,
    config: type[EvalConfig],
    task: Any,
    summary: Any,
    help: str,
    positional: dict[str, dict[str, Any]] | None = None,
    parser: argparse._SubParsersAction | None = None,
) -> argparse.ArgumentParser:
    """One eval task's parser: MODEL, the task's positional arguments, then its config's fields as flags."""
    q = (parser or what).add_parser(name, help=help)
    add_model(q, "eval " + name.removeprefix("eval "))
    for arg, kwargs in (positional or {}).items():
        q.add_argument(arg, **kwargs)
    add_config_flags(q, config, ("model", *(positional or {})))
    add_json(q)
    q.set_defaults(task=task, summary=summary, config=config, positional=tuple(positional or {}), func=_run)
    return q


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, LAMBADA, multiple choice, few-shot, generation, exposure bias, vision",
        description="Evaluate a gptlab run/checkpoint or a Hugging Face GPT-2 folder / Hub name.",
    )
    what = p.add_subparsers(dest="what", required=True)
    q = add_task(
        what,
        "perplexity",
        PerplexityConfig,
        _perplexity,
        lambda r: (
            f"{r['tokens']:,} tokens: loss {r['loss']:.4f} nats/token, perplexity {r['token_perplexity']:.3f}; "
            f"word perplexity {r['word_perplexity']:.3f}; {r['bits_per_byte']:.4f} bits/byte"
        ),
        "sliding-window perplexity per token, word and byte of text files (lm-eval's rolling log-likelihood at "
        "--stride = context)",
        {"paths": {"nargs": "+", "help": "text files, folders of .txt files, or prepared .bin token shards"}},
    )
    q.set_defaults(_shift="paths")
    add_task(
        what,
        "lambada",
        LambadaConfig,
        _lambada,
        lambda r: f"LAMBADA ({r['n']:,} passages): acc {r['acc']:.4f}, perplexity {r['perplexity']:.3f}",
        "OpenAI's LAMBADA: last-word accuracy and perplexity (lambada_openai)",
    )
    add_task(
        what,
        "mc",
        MultipleChoiceConfig,
        _mc,
        lambda r: (
            f"{r['task']} ({r['n']:,}): acc {r['acc']:.4f}, acc_norm {r['acc_norm']:.4f} (chars), "
            f"{r['acc_norm_tokens']:.4f} (tokens)"
        ),
        "multiple choice: HellaSwag jsonl or {context, choices, label} jsonl",
        {"path": {"help": "HellaSwag jsonl or {context, choices, label} jsonl"}},
    )
    add_task(
        what,
        "fewshot",
        FewshotConfig,
        _fewshot,
        lambda r: "\n".join(
            [f"labels {r['labels']}, template {r['template']!r}"]
            + [
                f"{x['shots']:>3}-shot: acc {x['acc']:.3f} (95% CI {x['ci95'][0]:.3f}-{x['ci95'][1]:.3f}, n={x['n']})"
                + (
                    f"; {x['fewer_shots']} of {x['n']} prompts too long for the context kept fewer examples (mean "
                    f"{x['shots_used']['mean']:g} used)"
                    if x["fewer_shots"]
                    else ""
                )
                + (f"; {x['truncated']} queries cut to fit" if x["truncated"] else "")
                for x in r["results"]
            ]
            + ([f"plot: {r['plot']}"] if "plot" in r else [])
        ),
        "zero/one/few-shot classification: accuracy vs number of examples",
    )
    add_task(
        what,
        "generate",
        GenerationConfig,
        _generate,
        lambda r: (
            f"{r['task']} ({r['n']}, {r['shots']}-shot): "
            + ", ".join(
                f"{k} {r[k]:.4f}" for k in ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match", "f1") if k in r
            )
        ),
        "prompted generation: TL;DR summaries (ROUGE), translation (BLEU, chrF), closed-book QA (exact match, F1)",
        {
            "kind": {"choices": list(GENERATION_KINDS)},
            "path": {
                "help": "jsonl: summarize {document, summary}; translate {source, target}; qa {question, answers}"
            },
        },
    )
    add_task(
        what,
        "exposure",
        ExposureConfig,
        _exposure,
        _exposure_summary,
        "exposure bias: teacher-forcing vs scheduled-sampling loss on a text",
    )
    add_task(
        what,
        "vision",
        VisionConfig,
        _vision,
        _vision_summary,
        "image datasets: per-attribute answer accuracy, with the image and blind (docs/vision.md)",
    )
    # `gptlab exposure` (before `eval exposure`): kept for one release
    q = add_task(
        what,
        "exposure",
        ExposureConfig,
        _exposure,
        _exposure_summary,
        "deprecated: use `gptlab eval exposure MODEL`",
        parser=sub,
    )
    q.set_defaults(func=_deprecated_exposure)


def _deprecated_exposure(args: argparse.Namespace) -> None:
    print(
        "gptlab: warning: `gptlab exposure` is deprecated and will be removed in the next release; use "
        "`gptlab eval exposure MODEL`",
        file=sys.stderr,
    )
    _run(args)
