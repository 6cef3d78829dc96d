"""``gptlab <verb>``: a thin dispatcher. Each subsystem owns its verb, its options and its command:

=========  ======================  =========================================================================
verb       module                  what
=========  ======================  =========================================================================
prepare    ``data/cli.py``         text -> token shards
train      ``train/cli.py``        pre-training (torchrun for several processes)
distill    ``distill/cli.py``      knowledge distillation, teacher -> student, on the training loop
sample     ``generate/cli.py``     KV-cached, batched, streaming generation
serve      ``serve/cli.py``        OpenAI-compatible HTTP server with continuous batching
quantize   ``quant/cli.py``        weight-only int8 / int4 quantization, saved as a checkpoint
convert    ``interop/cli.py``      gptlab <-> Hugging Face, OpenAI release -> gptlab
eval       ``eval/cli.py``         perplexity, LAMBADA, multiple choice, few-shot, generation, exposure
scale      ``scale/cli.py``        scaling-law sweeps and fits
align      ``align/cli.py``        finetune, sft, reward, dpo, ppo
plan       ``plan/cli.py``         sizes, FLOPs, memory, time, cost, scaling laws (and ``presets``)
=========  ======================  =========================================================================

One vocabulary across verbs: the model is the first argument of every verb that reads one, output folders are
``--out-dir``, ``--device`` defaults to ``auto``, and option defaults come from the library. Every verb takes
``--json``. A user mistake is one line, ``gptlab: error: <what is wrong and how to fix it>``, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from .errors import GptlabError
from .files import describe_os_error
from .options import ArgumentParser, apply_aliases

SUBSYSTEMS = ("data", "train", "distill", "generate", "serve", "quant", "interop", "eval", "scale", "align", "plan")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="gptlab",
        description="Build, pre-train, sample, evaluate, scale, align and plan GPT-style language models.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name in SUBSYSTEMS:
        importlib.import_module(f"gptlab.{name}.cli").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_aliases(args, parser)
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
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
