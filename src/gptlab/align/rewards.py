"""Verifiable rewards for ``gptlab align grpo``: built-in checks of an answer, and any Python function named
``module:function`` (or ``path/to/file.py:function``), several of them weighted.

A reward function has TRL's signature (``GRPOTrainer``'s ``reward_funcs``): ``f(prompts, completions, **columns)
-> list[float | None]``, one value per completion, where ``columns`` are the data file's other fields, one value
per completion (``answer=[...]``). ``None`` means "does not apply" and counts as 0. So a reward function written for
TRL runs here unchanged, and the built-ins are such functions:

- ``number``: 1 when the last number in the completion equals the record's ``answer`` (GSM8K's convention of
  reading the final number; commas in ``1,234`` allowed), else 0.
- ``match``: 1 when the stripped completion equals the stripped ``answer``, else 0.
- ``regex``: 1 when the record's ``answer``, a regular expression, matches the whole stripped completion.
- ``format``: 1 when the completion ended by itself (end-of-text, not cut off by ``max_new_tokens``) and, when
  ``reward_format`` is set, the whole stripped completion matches that regular expression.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import GptlabError

RewardFn = Callable[..., Sequence[float | None]]
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> float | None:
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _answers(columns: dict[str, Any], n: int, name: str) -> list[Any]:
    if "answer" not in columns:
        raise GptlabError(f'the {name} reward needs an "answer" field in every data record')
    return list(columns["answer"])[:n]


def number(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
    out = []
    for c, a in zip(completions, _answers(columns, len(completions), "number")):
        got, want = last_number(c), last_number(str(a))
        out.append(float(got is not None and want is not None and math.isclose(got, want, abs_tol=1e-9)))
    return out


def match(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
    return [
        float(c.strip() == str(a).strip()) for c, a in zip(completions, _answers(columns, len(completions), "match"))
    ]


def regex(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
    answers = _answers(columns, len(completions), "regex")
    return [float(re.fullmatch(str(a), c.strip(), re.S) is not None) for c, a in zip(completions, answers)]


def format_reward(pattern: str) -> RewardFn:
    compiled = re.compile(pattern, re.S) if pattern else None

    def format(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        ended = columns.get("ended", [True] * len(completions))
        return [
            float(bool(e) and (compiled is None or compiled.fullmatch(c.strip()) is not None))
            for c, e in zip(completions, ended)
        ]

    return format


BUILTIN = ("number", "match", "regex", "format")


@dataclass
class Reward:
    name: str
    weight: float
    fn: RewardFn


def load_function(spec: str) -> RewardFn:
    """``module:function`` or ``path/to/file.py:function``."""
    where, _, attr = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where)
            loader_spec = importlib.util.spec_from_file_location(f"gptlab_reward_{path.stem}", path)
            if loader_spec is None or loader_spec.loader is None or not path.is_file():
                raise ImportError(f"no file {path}")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        fn = getattr(module, attr)
    except (ImportError, AttributeError, SyntaxError) as e:
        raise GptlabError(f"reward {spec!r} cannot be loaded ({e}); give module:function or file.py:function") from None
    if not callable(fn):
        raise GptlabError(f"reward {spec!r} is not a function")
    return fn


def parse_rewards(text: str, format_pattern: str = "") -> list[Reward]:
    """``"number,format=0.2"`` -> the reward functions with their weights (default 1)."""
    out = []
    for item in [x.strip() for x in text.split(",") if x.strip()]:
        name, _, w = item.partition("=")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise GptlabError(f"--rewards {item!r}: the weight {w!r} is not a number (NAME=WEIGHT)") from None
        if name == "format":
            fn = format_reward(format_pattern)
        elif name in BUILTIN:
            fn = globals()[name]
        elif ":" in name:
            fn = load_function(name)
        else:
            raise GptlabError(
                f"--rewards: unknown reward {name!r}; built-ins: {', '.join(BUILTIN)}, or module:function"
            )
        out.append(Reward(name, weight, fn))
    if not out:
        raise GptlabError("--rewards is empty; name at least one reward (e.g. --rewards number)")
    return out


def score(
    rewards: Sequence[Reward], prompts: Sequence[str], completions: Sequence[str], columns: dict[str, list[Any]]
) -> dict[str, list[float]]:
    """Every reward function's values (None as 0), each checked to give one finite number per completion."""
    out = {}
    for r in rewards:
        values = list(r.fn(list(prompts), list(completions), **columns))
        if len(values) != len(completions):
            raise GptlabError(f"reward {r.name} returned {len(values)} values for {len(completions)} completions")
        clean = [0.0 if v is None else float(v) for v in values]
        if not all(math.isfinite(v) for v in clean):
            raise GptlabError(f"reward {r.name} returned a value that is not a finite number")
        out[r.name] = clean
    return out
