"""The OpenAI-compatible request bodies and their ranges (OpenAI's API reference, "Completions" and "Chat"; the
extra ``top_k``, ``min_p`` and ``repetition_penalty`` are vLLM's names for them).

Every numeric field's range is declared here, once; a value outside it is a 400 whose ``param`` names the field.
Fields OpenAI defines that gptlab does not implement (``logit_bias``, ``presence_penalty``, ``frequency_penalty``,
``best_of``, ``suffix``, ``tools``) are refused when set rather than silently ignored. ``structured_outputs`` is
vLLM's extra field for a regex, a choice, a grammar or a JSON Schema.
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


UNSUPPORTED = ("logit_bias", "presence_penalty", "frequency_penalty", "best_of", "suffix", "tools", "functions")


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


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart | ImagePart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def image_urls(self) -> list[str]:
        return (
            [] if isinstance(self.content, str) else [p.image_url.url for p in self.content if isinstance(p, ImagePart)]
        )


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=0)

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
