"""JSON-lines files: records with their line numbers, every bad line one clear error."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import GptlabError
from ..files import read_input


def decode_text(data: bytes, origin: str) -> str:
    if b"\x00" in data[:8192]:
        raise GptlabError(f"{origin} looks binary (contains NUL bytes); pass text, .jsonl or .parquet files")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise GptlabError(
            f"{origin} is not valid UTF-8 (byte {e.start}: {data[e.start : e.start + 4]!r}); "
            f"convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def jsonl_records(data: bytes, origin: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSON-lines file; a bad line is one clear error."""
    for n, line in enumerate(decode_text(data, origin).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise GptlabError(f"{origin} line {n} is not valid JSON ({e.msg}); fix or remove that line") from None


# the JSON type of each field gptlab reads from JSON lines (a list: a non-empty list of strings); every other field
# is a string
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "label": (int, str, bool), "answers": (list,), "options": (list,), "choices": (list,), "endings": (list,),
}  # fmt: skip
_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", bool: "a boolean"}


def read_jsonl(path: str | Path, fields: Sequence[str], limit: int | None = None) -> list[dict[str, Any]]:
    """Records of a JSON-lines file, each required to hold ``fields`` of their JSON types (:data:`FIELD_TYPES`,
    else a string); a bad line is one error naming it."""
    path = Path(path)
    data = read_input(path)
    out = []
    for n, rec in jsonl_records(data, str(path)):
        if not isinstance(rec, dict):
            raise GptlabError(
                f"{path} line {n} is {type(rec).__name__}, not a JSON object; each line needs an "
                f"object" + (f" with {list(fields)}" if fields else "")
            )
        missing = [f for f in fields if f not in rec]
        if missing:
            raise GptlabError(f"{path} line {n}: missing field(s) {missing}; each line needs {list(fields)}")
        for f in fields:
            kinds = FIELD_TYPES.get(f, (str,))
            if not isinstance(rec[f], kinds) or (isinstance(rec[f], bool) and bool not in kinds):
                want = " or ".join(_TYPE_NAMES[k] for k in kinds)
                raise GptlabError(
                    f"{path} line {n}: field {f!r} is {type(rec[f]).__name__}, not {want}; fix or remove that line"
                )
            if list in kinds and not (rec[f] and all(isinstance(x, str) for x in rec[f])):
                raise GptlabError(f"{path} line {n}: field {f!r} must be a non-empty list of strings")
        out.append(rec)
        if limit and len(out) >= limit:
            break
    if not out:
        raise GptlabError(f"{path} holds no records")
    return out
