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
import sys
from typing import Any, Callable, NoReturn

from .errors import GptlabError
from .recipe import Range

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


def add_config_flags(p: argparse.ArgumentParser, fields: list[dataclasses.Field], skip: tuple[str, ...]) -> None:
    """One ``--flag`` per config field (default None, so a recipe's value stands unless the flag is given), with
    the help text, range and choices declared on the field (:func:`gptlab.recipe.opt`)."""
    for f in fields:
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default, meta = f.default, f.metadata
        valid, choices = meta.get("range"), meta.get("choices")
        text = meta.get("help", f.name.replace("_", " "))
        text += f" (valid: {valid}; default {default!r})" if valid else f" (default {default!r})"
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(default, (int, float)):
            p.add_argument(flag, type=number(valid, integer=isinstance(default, int)), default=None,
                           metavar=type(default).__name__.upper(), help=text)
        else:
            p.add_argument(flag, default=None, choices=choices, metavar=type(default).__name__.upper() if not choices
                           else None, help=text)
