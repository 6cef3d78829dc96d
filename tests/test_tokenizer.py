"""Tokenizers against independent references: tiktoken's r50k_base (GPT-2's ranks) and round trips."""

import pytest

from gptlab import assets
from gptlab.errors import GptlabError
from gptlab.tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer, _gpt2_encoding, from_spec

TEXTS = [
    "Hello world",
    " leading space and  double  spaces\n\n\nnewlines",
    "It's 2026; they'll've 3.14159 → ünïcödé 😀",
    "<|endoftext|> is the end-of-text token here",
    "two<|endoftext|>documents",
    "\t tabs\r\nand CRLF",
    "",
]
EOT = {"<|endoftext|>"}


def _reference():
    tiktoken = pytest.importorskip("tiktoken")
    try:
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:
        pytest.skip(
            f"tiktoken's r50k_base is not obtainable offline here ({type(e).__name__}); "
            f"set TIKTOKEN_CACHE_DIR=../shared/tiktoken-cache"
        )


def test_gpt2_ids_equal_tiktoken_r50k():
    ref = _reference()
    tok = GPT2Tokenizer()
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's ids (shared/README, HF gpt2 tokenizer)
    for t in TEXTS:  # the literal <|endoftext|> is the end-of-text id, as in Hugging Face's GPT-2 tokenizer
        assert tok.encode(t) == ref.encode(t, allowed_special=EOT)
        assert tok.decode(tok.encode(t)) == t
    assert tok.encode("a<|endoftext|>b").count(50256) == 1
    assert tok.eot_id == 50256 == ref.eot_token and tok.vocab_size == ref.n_vocab == 50257
    assert tok.encode_batch(TEXTS) == [ref.encode(t, allowed_special=EOT) for t in TEXTS]


def test_gpt2_ranks_fallback_from_the_package_index(tmp_path, monkeypatch):
    """With tiktoken unable to download, the ranks come from openai-whisper's sdist via pip, checksum-verified."""
    import tiktoken

    ref = _reference()
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: (_ for _ in ()).throw(ConnectionError("offline")))
    _gpt2_encoding.cache_clear()
    try:
        enc = _gpt2_encoding()
    except GptlabError as e:
        pytest.skip(f"the package index is unreachable from this machine: {e}")
    finally:
        _gpt2_encoding.cache_clear()
    assert (
        assets.sha256_of(tmp_path / "gpt2.tiktoken")
        == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
    )
    for t in TEXTS:
        assert enc.encode_ordinary(t) == ref.encode_ordinary(t)


def test_corrupt_cached_ranks_are_replaced(tmp_path, monkeypatch):
    _reference()
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    (tmp_path / "gpt2.tiktoken").write_text("garbage")
    _gpt2_encoding.cache_clear()
    try:
        assert GPT2Tokenizer().encode("Hello world") == [15496, 995]
    finally:
        _gpt2_encoding.cache_clear()
    assert not (tmp_path / "gpt2.tiktoken").exists() or assets.sha256_of(tmp_path / "gpt2.tiktoken").startswith(
        "306cd27f"
    )


def test_char_tokenizer_round_trip_and_unknown_chars():
    tok = CharTokenizer.train(["hello", "world!"])
    assert tok.chars == "!dehlorw" and tok.vocab_size == 9 and tok.eot_id == 8
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.decode(tok.encode("world!")) == "world!"
    assert from_spec(tok.spec()).encode("low") == tok.encode("low")
    with pytest.raises(GptlabError, match="not in this character-level vocabulary"):
        tok.encode("help")


def test_trained_bpe_round_trips_and_respects_vocab_size():
    corpus = [
        "the quick brown fox jumps over the lazy dog. " * 20,
        "Zwölf Boxkämpfer jagen Viktor quer über den Sylter Deich",
    ]
    tok = BPETokenizer.train(corpus, vocab_size=300)
    assert tok.vocab_size <= 300 and tok.eot_id is not None
    for t in corpus + ["unseen text: 日本語 and emoji 😀"]:  # byte-level: any text round-trips
        assert tok.decode(tok.encode(t)) == t
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # merges were learned
    again = from_spec(tok.spec())
    assert again.encode(corpus[1]) == tok.encode(corpus[1])
    with pytest.raises(GptlabError, match="too small"):
        BPETokenizer.train(corpus, vocab_size=100)
