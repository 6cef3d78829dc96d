"""The OpenAI-compatible request bodies and their ranges (OpenAI's API reference, "Completions" and "Chat"; the
extra ``top_k``, ``min_p`` and ``repetition_penalty`` are vLLM's names for them).

Every numeric field's range is declared here, once; a value outside it is a 400 whose ``param`` names the field.
Fields OpenAI defines that gptlab does not implement (``logit_bias``, ``presence_penalty``, ``frequency_penalty``,
``best_of``, ``suffix``, the legacy ``functions``) are refused when set rather than silently ignored.
``structured_outputs`` is vLLM's extra field for a regex, a choice, a grammar or a JSON Schema.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .scheduler import MAX_LOGPROBS

MAX_STOP = 16  # stop strings per request (OpenAI allows 4)
MAX_N = 128  # hard ceiling; a server allows at most its --max-n


class StreamOptions(BaseModel):
    include_usage: bool = False


UNSUPPORTED = ("logit_bias", "presence_penalty", "frequency_penalty", "best_of", "suffix", "functions")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` extra field: exactly one of a JSON Schema, a regex, a choice among strings, or
    a grammar (Lark or llama.cpp's GBNF)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0, description="new tokens per choice; omitted: to the end of the context")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="-1 or 0: off")
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=100)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    def constraint(self) -> tuple[str, Any, str] | None:
        """The structured-output constraint asked for: (kind of :data:`gptlab.generate.constraint.KINDS`, its
        spec, the parameter it came from), or None. Raises ValueError when it is ambiguous or malformed."""
        asked: list[tuple[str, Any, str]] = []
        f = self.response_format
        if f is not None and f.type == "json_object":
            asked.append(("json_object", None, "response_format"))
        elif f is not None and f.type == "json_schema":
            if f.json_schema is None or f.json_schema.schema_ is None:
                raise ValueError("response_format json_schema needs json_schema.schema")
            asked.append(("json_schema", f.json_schema.schema_, "response_format"))
        so = self.structured_outputs
        if so is not None:
            given = [(k, v) for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                         ("grammar", so.grammar)) if v is not None]  # fmt: skip
            if len(given) != 1:
                raise ValueError("structured_outputs takes exactly one of json, regex, choice, grammar")
            kind, spec = given[0]
            if kind == "json":
                kind, spec = "json_schema", json.loads(spec) if isinstance(spec, str) else spec
            asked.append((kind, spec, "structured_outputs"))
        if len(asked) > 1:
            raise ValueError("give response_format or structured_outputs, not both")
        return asked[0] if asked else None

    def refused(self) -> tuple[str, str] | None:
        """(param, message) for the first field set that gptlab does not support or allow, else None."""
        extra = self.model_extra or {}
        for name in UNSUPPORTED:
            value = extra.get(name)
            if value not in (None, 0, {}, [], "") and not (name == "best_of" and value == 1):
                return name, f"{name} is not supported by gptlab serve; leave it unset"
        if len(self.stop_list()) > MAX_STOP:
            return "stop", f"at most {MAX_STOP} stop strings, got {len(self.stop_list())}"
        return None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None  # OpenAI's resolution hint; a gptlab model has one input size


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None

    @model_validator(mode="after")
    def _some_content(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def image_urls(self) -> list[str]:
        if not isinstance(self.content, list):
            return []
        return [p.image_url.url for p in self.content if isinstance(p, ImagePart)]

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (Hugging Face's convention: a call's arguments as an object)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _arguments(c)}}
                for c in self.tool_calls
            ]
        out.update({k: v for k, v in (("tool_call_id", self.tool_call_id), ("name", self.name)) if v is not None})
        return out


def _arguments(call: ToolCall) -> Any:
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments


class FunctionDef(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=0)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; a forced call is one call, auto may give several

    def tool_mode(self) -> tuple[str, str | None]:
        """("none" | "auto" | "forced", the forced function's name or None for any), checked against ``tools``."""
        choice = self.tool_choice or ("auto" if self.tools else "none")
        if choice != "none" and not self.tools:
            raise ValueError(f"tool_choice {choice!r} needs tools")
        if isinstance(choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if choice.function.name not in names:
                raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools {names}")
            return "forced", choice.function.name
        return ("forced", None) if choice == "required" else (choice, None)

    @model_validator(mode="after")
    def _one_max(self) -> ChatRequest:
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens differ; give one")
            self.max_tokens = self.max_completion_tokens
        return self


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = False  # (vLLM's field) the tokenizer's beginning-of-text token first, if it has one

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
