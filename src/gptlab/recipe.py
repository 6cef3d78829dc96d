"""Recipe-loaded configurations: typed fields with their help text and valid range next to them, checked once.

A config is a dataclass whose fields are declared with :func:`opt` (default, help, range or choices). Its values
come from the defaults, then a TOML recipe, then command-line flags (:meth:`RecipeConfig.from_sources`), and are
checked when the object is built, wherever it is built: type, range and choices per field, then the config's own
cross-field rules. The CLI makes one ``--flag`` per field from the same metadata, so ``--help`` states every range.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tomllib
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GptlabError
from .files import read_input


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval of valid numbers; ``None`` ends are unbounded. Values must be finite."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def __str__(self) -> str:
        lo, hi = _num(self.lo), _num(self.hi)
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {lo}" if self.lo is not None else "any finite number"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return f"{'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


def _num(x: float | None) -> str:
    """A bound as people write it: whole numbers in full (1048576), others as %g."""
    if x is not None and float(x).is_integer() and abs(x) < 1e19:
        return str(int(x))
    return f"{x:g}" if x is not None else ""


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
UNIT = Range(0, 1)  # [0, 1]
PROBABILITY_BELOW_1 = Range(0, 1, hi_open=True)  # [0, 1)
COUNT = Range(1)
DEFAULT_SEED = 1337  # every seed option's default, library and CLI alike
SEED = Range(0, 2**63 - 1)  # numpy's and torch's generators take non-negative 64-bit seeds


def derive_seed(seed: int, *keys: int | str) -> int:
    """The one way gptlab derives a seed from a run's ``seed`` and what a stream is for (a name, a step, a rank):
    numpy's SeedSequence over them (strings by their CRC-32), 63 bits, so distinct keys give independent streams and
    the same keys the same stream (numpy.random.SeedSequence; O'Neill 2014 on seeding PRNG families). Where rows
    of a batch must sample as they would alone, their seeds are this plus the row index (row r: ``seed + r``)."""
    entropy = [seed, *(zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def opt(
    default: Any,
    help: str,
    range: Range | None = None,
    choices: Sequence[Any] | None = None,
    kind: type | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
) -> Any:
    """A config field with its help text and its valid range or choices (checked at construction). ``kind``: the
    type of an optional field (default None; None stays allowed). ``parse``: how its command-line flag reads text
    (lists, pairs), with ``metavar`` to show in ``--help``."""
    meta = {
        "help": help,
        "range": range,
        "choices": tuple(choices) if choices else None,
        "kind": kind,
        "parse": parse,
        "metavar": metavar,
    }
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default):  # a nested config: each instance gets its own copy
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default), metadata=meta)  # type: ignore[type-var]
    return dataclasses.field(default=default, metadata=meta)


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh copy of a list or dict)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def field_kind(f: dataclasses.Field) -> type:
    """The type of a field's values: its declared ``kind``, else its default's type."""
    return f.metadata.get("kind") or type(field_default(f))


def check_value(
    name: str, value: Any, want: type, range: Range | None = None, choices: Sequence[Any] | None = None
) -> tuple[Any, str | None]:
    """(value converted to ``want`` where that is lossless, or the problem with it)."""
    ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        return value, f"{name} = {value!r} should be of type {want.__name__}"
    if range is not None and not range.contains(value):
        return value, f"{name} = {value!r} is out of range (valid: {range})"
    if choices and value not in choices:
        return value, f"{name} = {value!r} is not one of {'|'.join(choices)}"
    return value, None


class RecipeConfig:
    """What the flat, recipe-loaded configs share: per-field checks, dict form, fields, loading from sources.
    Subclasses are dataclasses whose fields come from :func:`opt`; they add cross-field rules in ``checks``."""

    help_hint = "`gptlab --help`"
    what = "config"
    renamed: dict[str, str] = {}  # old recipe key -> field, accepted with a warning for one release

    def __post_init__(self) -> None:
        problems = []
        for f in self.fields():
            nested = self.nested_default(f)
            if nested is not None:  # a nested config (``optim``): built from a table, checked by its own type
                value = getattr(self, f.name)
                if isinstance(value, dict):
                    unknown = sorted(set(value) - {g.name for g in nested.fields()})
                    if unknown:
                        raise GptlabError(f"unknown option(s) {unknown} in [{f.name}]; see {self.help_hint}")
                    object.__setattr__(self, f.name, dataclasses.replace(nested, **value))  # type: ignore[type-var]
                elif not isinstance(value, type(nested)):
                    problems.append(f"{f.name} should be a table of {sorted(g.name for g in nested.fields())}")
                continue
            want, value = field_kind(f), getattr(self, f.name)
            if want not in (bool, int, float, str, dict):  # list fields: the subclass checks them
                continue
            if value is None and f.metadata.get("kind") is not None:  # an optional field left unset
                continue
            value, problem = check_value(f.name, value, want, f.metadata.get("range"), f.metadata.get("choices"))
            if problem:
                problems.append(problem)
            else:
                object.__setattr__(self, f.name, value)  # frozen configs (Sampling) too
        if not problems:
            problems = [msg for ok, msg in self.checks() if not ok]
        if problems:
            raise GptlabError(f"invalid {self.what}: " + "; ".join(problems) + f" (see {self.help_hint})")

    def checks(self) -> list[tuple[bool, str]]:
        """Cross-field rules as (holds, message) pairs."""
        return []

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name``: library functions that take the same setting share it."""
        return field_default(next(f for f in cls.fields() if f.name == name))

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))  # type: ignore[arg-type]

    @staticmethod
    def nested_default(f: dataclasses.Field) -> RecipeConfig | None:
        """The default of a field that holds a nested config (``optim``), or None for a plain field."""
        if f.default_factory is dataclasses.MISSING:
            return None
        value = f.default_factory()
        return value if isinstance(value, RecipeConfig) else None

    @classmethod
    def nested_fields(cls) -> dict[str, RecipeConfig]:
        return {f.name: d for f in cls.fields() if (d := cls.nested_default(f)) is not None}

    @classmethod
    def from_sources(cls, recipe: str | Path | None = None, /, **overrides: Any):
        """Defaults <- TOML recipe <- ``overrides`` (CLI flags; ``None`` values are ignored). A nested config's fields
        may be given flat among the flags (``lr=...`` for ``optim.lr``, as ``--lr`` is); in a recipe they belong in
        their table (``[optim]``), and flat keys there are accepted with a warning for one release."""
        file_values = read_recipe(recipe, cls.renamed)
        flags = renamed_keys({k: v for k, v in overrides.items() if v is not None}, cls.renamed, "option")
        for name, default in cls.nested_fields().items():
            sub = {f.name for f in default.fields()}
            table = file_values.pop(name, {})
            if not isinstance(table, dict):
                raise GptlabError(f"recipe key {name!r} should be a table [{name}]; see {cls.help_hint}")
            flat = {k: file_values.pop(k) for k in list(file_values) if k in sub}
            if flat:
                print(
                    f"gptlab: warning: recipe keys {sorted(flat)} at the top level are deprecated and will be refused "
                    f"in the next release; put them in the [{name}] table",
                    file=sys.stderr,
                )
            given = flags.pop(name, None)
            if isinstance(given, RecipeConfig):
                given = given.to_dict()
            merged = {**table, **flat, **(given or {}), **{k: flags.pop(k) for k in list(flags) if k in sub}}
            if merged:
                file_values[name] = merged
        values = {**file_values, **flags}
        unknown = sorted(set(values) - {f.name for f in cls.fields()})
        if unknown:
            raise GptlabError(f"unknown option(s) {unknown}; see {cls.help_hint}")
        return cls(**values)


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict, or one clear error (missing, a folder, not UTF-8, not TOML)."""
    path = Path(path)
    if not path.exists():
        raise GptlabError(f"{what} {path} does not exist")
    if not path.is_file():
        raise GptlabError(f"{what} {path} is not a file; pass a TOML file")
    try:
        return tomllib.loads(read_input(path, what).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise GptlabError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise GptlabError(f"{what} {path} is not valid TOML: {e}") from None


def renamed_keys(values: dict[str, Any], renamed: dict[str, str], what: str) -> dict[str, Any]:
    """``values`` with ``renamed`` old keys moved to their new names, a warning for each."""
    for old, new in renamed.items():
        if old in values:
            print(
                f"gptlab: warning: the {what} {old!r} is deprecated and will be removed in the next release; "
                f"call it {new!r}",
                file=sys.stderr,
            )
            values.setdefault(new, values.pop(old))
    return values


def read_recipe(recipe: str | Path | None, renamed: dict[str, str] | None = None) -> dict[str, Any]:
    """A TOML recipe's keys (none without a recipe), with ``renamed`` old keys moved to their new names (a warning
    each)."""
    return renamed_keys(read_toml(recipe, "recipe") if recipe else {}, renamed or {}, "recipe key")
