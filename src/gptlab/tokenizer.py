"""Tokenizers: GPT-2 byte-level BPE (tiktoken), character-level, and a byte-level BPE trained on your corpus.

Every tokenizer has a JSON-able ``spec()`` that is saved beside prepared data and inside every checkpoint, so later
commands rebuild the same tokenizer with :func:`from_spec` and need no tokenizer flag.

GPT-2's ranks are tiktoken's ``r50k_base`` (identical to GPT-2's ``encoder.json``/``vocab.bpe``). They are found in
this order: gptlab's cache; tiktoken itself (its cache, ``TIKTOKEN_CACHE_DIR``, or its download from
openaipublic); the sdist of ``openai-whisper`` on the package index, which carries them as
``whisper/assets/gpt2.tiktoken``. Every copy is checked against the sha256 below.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any, Protocol

import numpy as np

from . import assets, files
from .errors import GptlabError

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_EOT = 50256
# GPT-2's pre-tokenization regex (openai/gpt-2 encoder.py; tiktoken's r50k_base pattern).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT_TEXT = "<|endoftext|>"
WHISPER = ("openai-whisper", "20250625", "whisper/assets/gpt2.tiktoken")


class Tokenizer(Protocol):
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def spec(self) -> dict[str, Any]: ...


@lru_cache(maxsize=1)
def _gpt2_encoding():
    import tiktoken  # here, not at the top: loading its ranks is the slow part, and char/bpe never need it
    from tiktoken.load import load_tiktoken_bpe

    cached = assets.cache_dir() / "gpt2.tiktoken"
    if not assets.verified(cached, GPT2_RANKS_SHA256):
        try:  # tiktoken's own cache or download; r50k_base is GPT-2's ranks, pattern and <|endoftext|>
            return tiktoken.get_encoding("r50k_base")
        except Exception:
            package, version, member = WHISPER
            try:
                data = assets.sdist_files(package, version, lambda p: p == member)[member]
            except GptlabError as e:
                raise GptlabError(
                    f"GPT-2 BPE ranks unavailable: tiktoken could not download r50k_base and {e}; "
                    f"or copy a gpt2.tiktoken file (sha256 {GPT2_RANKS_SHA256[:12]}...) to "
                    f"{cached}"
                ) from None
            files.atomic_write_bytes(cached, assets.check_sha256(data, GPT2_RANKS_SHA256, f"{package} {member}"))
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(str(cached)),
        special_tokens={EOT_TEXT: GPT2_EOT},
    )


class GPT2Tokenizer:
    """GPT-2's byte-level BPE: exactly GPT-2's ids, 50,257 tokens, ``<|endoftext|>`` = 50256.

    Every gptlab tokenizer reads the literal text ``<|endoftext|>`` as the end-of-text token, as the Hugging Face
    tokenizers gptlab exports do, and as OpenAI's completions API and vLLM do with prompts; corpora that separate
    documents with it (TinyStories, many web dumps) are split there."""

    vocab_size = 50257
    eot_id = GPT2_EOT

    def __init__(self) -> None:
        self.enc = _gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special={EOT_TEXT})

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_batch(texts, allowed_special={EOT_TEXT})

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def spec(self) -> dict[str, Any]:
        return {"kind": "gpt2"}


class CharTokenizer:
    """One id per character of the corpus' alphabet (sorted), plus an end-of-text id after them."""

    def __init__(self, chars: str) -> None:
        self.chars = "".join(sorted(set(chars)))
        self.vocab_size = len(self.chars) + 1
        self.eot_id = len(self.chars)
        self._lut = np.full(max(map(ord, self.chars), default=0) + 1, -1, dtype=np.int64)
        self._lut[[ord(c) for c in self.chars]] = np.arange(len(self.chars))

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        alphabet: set[str] = set()
        for t in texts:
            alphabet.update(t)
        return cls("".join(alphabet))

    def encode(self, text: str) -> list[int]:
        if EOT_TEXT in text:  # the literal end-of-text text is the end-of-text id (see GPT2Tokenizer)
            parts = [self.encode(t) for t in text.split(EOT_TEXT)]
            return [i for k, part in enumerate(parts) for i in ([self.eot_id] if k else []) + part]
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.where(codes < len(self._lut), self._lut[np.minimum(codes, len(self._lut) - 1)], -1)
        if (ids < 0).any():
            bad = sorted({text[i] for i in np.flatnonzero(ids < 0)[:20]})
            raise GptlabError(
                f"characters {bad!r} are not in this character-level vocabulary; remove them, or "
                f"prepare the data with a corpus that contains them"
            )
        return ids.tolist()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] if i < self.eot_id else EOT_TEXT for i in ids)

    def spec(self) -> dict[str, Any]:
        return {"kind": "char", "chars": self.chars}


class BPETokenizer:
    """A byte-level BPE trained on the user's corpus with Hugging Face ``tokenizers`` (GPT-2's scheme), or any
    ``tokenizer.json`` that came with an imported model, with that model's special tokens: ``eos_token`` (the
    end-of-text token generation stops at; default ``<|endoftext|>``, ``eot_id`` None when absent), ``bos_token``
    and whether prompts start with it (``add_bos``), and its ``chat_template`` (Jinja, as in
    ``tokenizer_config.json``)."""

    def __init__(
        self,
        tok,
        eos_token: str | None = None,
        bos_token: str | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eos_token, self.bos_token, self.add_bos, self.chat_template = eos_token, bos_token, add_bos, chat_template
        self.eot_id = tok.token_to_id(eos_token or EOT_TEXT)
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 257 + 1:
            raise GptlabError(
                f"--vocab-size {vocab_size} is too small for a byte-level BPE; use at least 258 "
                f"(256 bytes + end-of-text + merges)"
            )
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT_TEXT],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]
        except Exception as e:  # the tokenizers library raises a plain Exception (e.g. a word-level vocabulary
            # without an unknown token meeting a character it lacks)
            raise GptlabError(f"this model's tokenizer cannot encode the text ({e}); use characters it knows") from None

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def spec(self) -> dict[str, Any]:
        extra = {"eos_token": self.eos_token, "bos_token": self.bos_token, "add_bos": self.add_bos or None}
        extra["chat_template"] = self.chat_template
        return {"kind": "bpe", "tokenizer_json": self.tok.to_str(), **{k: v for k, v in extra.items() if v}}


TOKENIZER_KINDS = ("gpt2", "char", "bpe")


# ---------------------------------------------------------------- GPT-2's vocab.json / merges.txt files
@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte in ``vocab.json`` / ``merges.txt``: printable Latin-1 bytes stand
    for themselves, the other 68 bytes for chr(256), chr(257), ... in byte order (openai/gpt-2 encoder.py)."""
    keep = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    out, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """``token`` split by byte-pair merging with only the merges ranked below ``max_rank``."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best = min((ranks.get(parts[i] + parts[i + 1], max_rank), i) for i in range(len(parts) - 1))
        if best[0] >= max_rank:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def ranks_to_vocab_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    """tiktoken ranks -> (``vocab.json`` dict, ``merges.txt`` lines). Each multi-byte token's merge is the pair that
    byte-pair merging with the lower-ranked merges leaves, so GPT-2's own files come back exactly."""
    enc = byte_to_unicode()
    show = lambda b: "".join(enc[x] for x in b)
    vocab = {show(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            parts = _bpe_parts(ranks, tok, rank)
            if len(parts) != 2:
                raise GptlabError(
                    f"token {tok!r} (rank {rank}) is not one merge of lower-ranked tokens; these "
                    f"ranks cannot be written as a merges.txt"
                )
            merges.append(f"{show(parts[0])} {show(parts[1])}")
    return vocab, merges


def vocab_to_ranks(vocab: dict[str, int]) -> dict[bytes, int]:
    """A byte-level ``vocab.json`` dict -> {token bytes: id}, ``<|endoftext|>`` left out (for GPT-2's vocabulary
    the ids are the ranks: the inverse of :func:`ranks_to_vocab_merges`)."""
    dec = {c: b for b, c in byte_to_unicode().items()}
    try:
        return {bytes(dec[c] for c in s): i for s, i in vocab.items() if s != EOT_TEXT}
    except KeyError:
        raise GptlabError("vocab.json is not a byte-level BPE vocabulary (GPT-2's scheme)") from None


def gpt2_ranks() -> dict[bytes, int]:
    return _gpt2_encoding()._mergeable_ranks


def start_id(tok: Tokenizer) -> int:
    """The token a document is scored after (perplexity's first window, an empty context): the tokenizer's
    beginning-of-text token when it has one, else its end-of-text token (GPT-2's documents start after
    ``<|endoftext|>``): lm-eval's ``prefix_token_id`` rule."""
    bos = getattr(tok, "bos_id", None)
    return bos if bos is not None else tok.eot_id


def prompt_ids(tok: Tokenizer, text: str, after_image: bool = False) -> list[int]:
    """The token ids of a prompt, one rule for every place that encodes one (the Engine, the server, the lm-eval
    adapter, image-text datasets): the empty prompt is :func:`start_id` (sampling unconditionally, as GPT-2's
    samples start after end-of-text); after an image prefix the text always starts with the end-of-text token, as
    the image-text training examples store it. A tokenizer whose model starts every text with a beginning-of-text token
    (``add_bos``: Llama 3's ``<|begin_of_text|>``) gets it first, the empty prompt included."""
    bos = getattr(tok, "bos_id", None)
    if getattr(tok, "add_bos", False) and bos is not None:
        return [bos, *tok.encode(text)]
    if after_image:
        return [tok.eot_id, *tok.encode(text)]
    return tok.encode(text) if text else [start_id(tok)]


_SPEC_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "gpt2": {},
    "char": {"chars": (str,)},
    "bpe": {"tokenizer_json": (str,), "eos_token": (str, type(None)), "bos_token": (str, type(None)),
            "chat_template": (str, type(None))},
}  # fmt: skip


def from_spec(spec: dict[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer a checkpoint or prepared dataset was made with (its spec checked field by field)."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in _SPEC_FIELDS:
        raise GptlabError(f"unknown tokenizer kind {kind!r} in the saved spec; known: {TOKENIZER_KINDS}")
    required = {"chars", "tokenizer_json"}
    for key, kinds in _SPEC_FIELDS[kind].items():
        if (key in required or key in spec) and not isinstance(spec.get(key), kinds):
            raise GptlabError(
                f"the saved {kind} tokenizer's {key!r} is missing or of the wrong type; the file is damaged"
            )
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        return CharTokenizer(spec["chars"])
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_str(spec["tokenizer_json"])
    except Exception as e:  # the tokenizers library raises a plain Exception
        raise GptlabError(f"the saved bpe tokenizer cannot be read ({str(e)[:120]}); the file is damaged") from None
    return BPETokenizer(
        tok, spec.get("eos_token"), spec.get("bos_token"), bool(spec.get("add_bos")), spec.get("chat_template")
    )


PROBE = "Hello, world! The quick brown fox: naïve café, 1234 → ok\n\tend of text."


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two tokenizer specs tokenize alike: equal specs, or the same vocabulary size and the same ids for a
    probe text (a Hugging Face GPT-2 folder and gptlab's tiktoken GPT-2 are one tokenizer under two specs)."""
    if a == b:
        return True
    ta, tb = from_spec(a), from_spec(b)
    if ta.vocab_size != tb.vocab_size:
        return False
    try:
        return ta.encode(PROBE) == tb.encode(PROBE)
    except GptlabError:  # a small vocabulary (characters) lacks some of the probe's: compare token by token
        return all(ta.decode([i]) == tb.decode([i]) for i in range(ta.vocab_size))
