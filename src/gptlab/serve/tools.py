"""Tool calls on ``/v1/chat/completions`` (OpenAI's ``tools`` and ``tool_choice``), in the Hermes format that
Qwen2.5, Hermes and many open models are trained on: the chat template renders the tools' JSON schemas into the
prompt (Hugging Face's convention: a ``tools`` variable), and the model answers a call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

:func:`split_calls` turns those blocks into OpenAI ``tool_calls``, and :class:`CallStream` does it while streaming.
With ``tool_choice`` ``required`` or a named function, the output is constrained to one such block whose JSON is
one of the allowed functions with arguments valid against its parameters' schema (:func:`forced_call_grammar`), so
the arguments always parse.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from ..generate.constraint import JSON_OPTIONS

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def call_object(name: str, arguments: Any) -> dict[str, Any]:
    """One OpenAI tool call: a fresh id, the function's name, its arguments as a JSON string."""
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}  # fmt: skip


def parse_block(body: str) -> dict[str, Any] | None:
    """The call in one block's text, or None when it is not ``{"name": str, "arguments": object}``."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return call_object(obj["name"], args) if isinstance(args, dict) else None


def split_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The text outside well-formed call blocks (None if only whitespace) and the calls, in order: what
    :class:`CallStream` gives for the whole text at once. A block whose JSON is not a call stays in the text."""
    stream = CallStream()
    items = stream.feed(text) + stream.close()
    calls = [v for kind, v in items if kind == "call"]
    if not calls:
        return text, []
    content = "".join(v for kind, v in items if kind == "content")
    return (content if content.strip() else None), calls


class CallStream:
    """One streamed choice: text goes out as content until a call block may be starting; a block goes out as one
    tool call once it closes. ``feed`` and ``close`` return what to send: ``("content", text)`` and ``("call",
    call)`` items."""

    def __init__(self) -> None:
        self.pending = ""  # text not sent yet: a possible start of a block, or a block not closed yet
        self.calls = 0

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self.pending += text
        out: list[tuple[str, Any]] = []
        while True:
            start = self.pending.find(OPEN)
            if start < 0:  # keep back a tail that could still become "<tool_call>"
                keep = next((k for k in range(len(OPEN) - 1, 0, -1) if self.pending.endswith(OPEN[:k])), 0)
                cut = len(self.pending) - keep
                if cut:
                    out.append(("content", self.pending[:cut]))
                self.pending = self.pending[cut:]
                return out
            end = self.pending.find(CLOSE, start)
            if end < 0:
                if start:
                    out.append(("content", self.pending[:start]))
                self.pending = self.pending[start:]
                return out
            block = self.pending[start : end + len(CLOSE)]
            call = parse_block(block[len(OPEN) : -len(CLOSE)])  # (json.loads ignores the newlines around it)
            if start:
                out.append(("content", self.pending[:start]))
            out.append(("call", call) if call is not None else ("content", block))
            self.calls += call is not None
            self.pending = self.pending[end + len(CLOSE) :]

    def close(self) -> list[tuple[str, Any]]:
        """The end of the choice: whatever was held back is content (an unclosed block is not a call)."""
        out = [("content", self.pending)] if self.pending else []
        self.pending = ""
        return out


def forced_call_grammar(tools: list[dict[str, Any]], name: str | None) -> str:
    """A Lark grammar (llguidance's dialect, with an inline JSON Schema) for exactly one call block of function
    ``name`` (None: any of ``tools``), its arguments valid against the function's ``parameters``."""
    options = []
    for t in tools:
        f = t["function"]
        if name is not None and f["name"] != name:
            continue
        params = f.get("parameters") or {"type": "object", "properties": {}}
        options.append({"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})  # fmt: skip
    schema = {"anyOf": options, "x-guidance": JSON_OPTIONS}
    return f'start: "{OPEN}\\n" call "\\n{CLOSE}"\ncall: %json {json.dumps(schema)}'
