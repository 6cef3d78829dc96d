"""Structured output: a grammar that every sampled token must keep the text inside of, applied as a mask on the
logits of each row, step by step (Willard & Louf 2023, "Efficient Guided Generation for LLMs", is the idea; the
masks come from llguidance, Microsoft's Earley-parser library behind guidance, which vLLM, SGLang and llama.cpp
also use).

A constraint is one of: any JSON object, a JSON Schema, a regular expression, a choice among strings, or a
context-free grammar in Lark syntax or llama.cpp's GBNF. :func:`compile_constraint` turns it into llguidance's
grammar and **fails closed**: a schema, regex or grammar that does not compile, or a JSON Schema keyword llguidance
does not enforce (``not``, ``if``/``then``, ``contains``, ``uniqueItems``, ``dependentRequired``, ...), raises a
:class:`GptlabError` naming the part instead of generating unconstrained text. Which keywords are enforced is
llguidance's list: https://github.com/guidance-ai/llguidance/blob/main/docs/json_schema.md.

Why llguidance rather than xgrammar: measured per-token mask cost, JSON Schema keywords refused rather than ignored,
and GBNF and Lark both accepted (``benchmarks/structured.py``, docs/serving.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ..errors import GptlabError

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
# JSON as json.dumps writes it by default (", " and ": ", no other whitespace): a model cannot pad its output with
# whitespace until max_tokens (llguidance's default allows any amount), and unknown JSON Schema keywords are errors
JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint: llguidance's grammar text."""

    text: str


def compile_constraint(kind: str, spec: Any, tokenizer: Any, vocab_size: int) -> Grammar:
    """The grammar for constraint ``kind`` (one of :data:`KINDS`) given by ``spec`` (a schema dict, a regex, a list
    of strings, a grammar's text; None for ``json_object``), checked against the tokenizer. Raises
    :class:`GptlabError` for anything llguidance cannot enforce."""
    try:
        import llguidance
    except ImportError:
        raise GptlabError("structured output needs llguidance: pip install 'gptlab[serve]'") from None

    try:
        text = _grammar_text(llguidance, kind, spec)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            text, ll_tokenizer(tokenizer, vocab_size)
        )
    except GptlabError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a ValueError, or a Rust panic (pyo3's PanicException is a BaseException)
        failed, messages = True, [str(e).splitlines()[0] if str(e) else type(e).__name__]
    if failed or messages:  # a warning is something not enforced: refused too
        what = " ".join(" ".join(messages).split())[:500]
        raise GptlabError(f"the {kind.replace('_', ' ')} cannot be enforced: {what}")
    return Grammar(text)


def _grammar_text(llguidance: Any, kind: str, spec: Any) -> str:
    if kind in ("json_object", "json_schema"):
        if kind == "json_schema" and not isinstance(spec, dict):
            raise GptlabError("the JSON schema must be an object")
        schema = spec if kind == "json_schema" else {"type": "object"}
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    if kind == "regex":
        if not isinstance(spec, str):
            raise GptlabError("the regex must be a string")
        return llguidance.grammar_from("regex", spec)
    if kind == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(s, str) and s for s in spec):
            raise GptlabError("choice must be a non-empty list of non-empty strings")
        return llguidance.grammar_from("choice", json.dumps(spec))
    if kind == "grammar":
        if not isinstance(spec, str) or not spec.strip():
            raise GptlabError("the grammar must be a non-empty string (Lark, or llama.cpp's GBNF)")
        return llguidance.grammar_from("grammar", spec)
    raise GptlabError(f"unknown constraint {kind!r}; one of {', '.join(KINDS)}")


def ll_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """llguidance's view of a gptlab tokenizer (built once per tokenizer: about 0.2 s for GPT-2's)."""
    return _ll_tokenizer(_Key(tokenizer), vocab_size)


class _Key:
    """Hashes a tokenizer by identity, for the cache."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __hash__(self) -> int:
        return id(self.tokenizer)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key) and other.tokenizer is self.tokenizer


@lru_cache(maxsize=8)
def _ll_tokenizer(key: _Key, vocab_size: int) -> Any:
    import llguidance

    tok = key.tokenizer
    kind = tok.spec()["kind"]
    if kind == "gpt2":
        from llguidance.tiktoken import lltokenizer_from_encoding

        return lltokenizer_from_encoding(tok.enc, n_vocab=vocab_size)
    if kind == "bpe":
        eos = tok.eot_id if tok.eot_id is not None else []
        return llguidance.LLTokenizer(tok.tok.to_str(), n_vocab=vocab_size, eos_token=eos)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes(tok, vocab_size)), n_vocab=vocab_size)


class _Bytes:
    """A tokenizer as llguidance's TokenizerWrapper wants it: each token's bytes (special tokens: 0xFF and a
    name), the end-of-text id, and encoding from bytes."""

    def __init__(self, tok: Any, vocab_size: int) -> None:
        self.tok = tok
        self.eos_token_id, self.bos_token_id = tok.eot_id, None
        self.tokens = [
            b"\xff<|endoftext|>" if i == tok.eot_id else tok.decode([i]).encode() if i < tok.vocab_size else b"\xff"
            for i in range(vocab_size)
        ]
        self.special_token_ids = [tok.eot_id]

    def __call__(self, data: bytes) -> list[int]:
        text = data.decode("utf-8", errors="ignore")
        try:
            return self.tok.encode(text)
        except GptlabError:  # characters outside a character-level vocabulary: no token can produce them
            return [i for c in text for i in self.tok.encode(c) if c in self.tok.chars]


class Matcher:
    """One row's place in its grammar: :meth:`allowed` masks the next token's logits, :meth:`advance` takes the
    token chosen."""

    def __init__(self, grammar: Grammar, tokenizer: Any, vocab_size: int) -> None:
        import llguidance

        self.m = llguidance.LLMatcher(ll_tokenizer(tokenizer, vocab_size), grammar.text)
        self.vocab_size = vocab_size
        if self.m.is_error():  # compile_constraint validated it: a library error, reported as such
            raise GptlabError(f"the constraint failed to start: {self.m.get_error()}")

    def allowed(self) -> torch.Tensor:
        """[vocab] bool: the tokens that keep the text inside the grammar (the end-of-text token only where the
        text is complete)."""
        bits = np.unpackbits(np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return torch.from_numpy(bits[: self.vocab_size].view(np.bool_))

    def advance(self, token: int) -> None:
        if not self.m.consume_token(token):
            raise GptlabError(f"token {token} broke the constraint: {self.m.get_error()}")

    @property
    def complete(self) -> bool:
        """The text so far is a whole sentence of the grammar."""
        return self.m.is_accepting()

    @property
    def finished(self) -> bool:
        """Nothing more may follow (the grammar allows no longer text)."""
        return self.m.is_stopped()
