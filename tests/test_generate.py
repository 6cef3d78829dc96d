"""The generation engine against independent references: transformers' generate and logits processors, the
no-cache full forward, a hand-computed filter case, and the sampling distribution itself."""

import pytest
import torch

from gptlab.config import GPTConfig
from gptlab.errors import GptlabError
from gptlab.generate import Engine, Sampling, filter_logits, next_tokens
from gptlab.generate.engine import TextStream
from gptlab.generate.sampling import argmax
from gptlab.model import GPT, KVCache
from gptlab.tokenizer import CharTokenizer

from .conftest import hf_pair

transformers = pytest.importorskip("transformers")

GREEDY = Sampling(temperature=0)


def small_model(norm="pre", block_size=64, vocab_size=97, seed=0):
    torch.manual_seed(seed)
    model = GPT(
        GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size, norm=norm, init_std=0.2)
    ).eval()
    return model


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_kv_cache_logits_equal_full_forward_at_every_step(norm):
    model = small_model(norm)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [1, 2, 3], [40]]
    new = [torch.randint(0, 97, (20,)).tolist() for _ in prompts]
    T = max(map(len, prompts))
    cache = KVCache(model.config, len(prompts), T + 20, pad=torch.tensor([T - len(p) for p in prompts]))
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    with torch.no_grad():
        logits = model.decode(idx, cache, torch.arange(T))
        for step in range(21):
            for r, p in enumerate(prompts):  # row r alone, no cache, all positions
                full, _ = model(torch.tensor([p + new[r][:step]]))
                torch.testing.assert_close(logits[r, -1], full[0, -1], atol=1e-5, rtol=1e-5)
            if step < 20:
                tok = torch.tensor([[n[step]] for n in new])
                logits = model.decode(tok, cache, torch.tensor([T + step]))
    assert cache.nbytes == 2 * 2 * 3 * 2 * 16 * (T + 20) * 4  # 2 (k, v) x layers x batch x heads x hd x len x 4 B


def hf_generate(hf, prompts, n, pad_id=0):
    T = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=None,
        )
    return out[:, T:].tolist()


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_greedy_equals_transformers_generate_single_and_left_padded_batch(norm):
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=160, vocab_size=300, norm=norm)
    hf, ours = hf_pair(cfg)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (12, 5, 30)]
    engine = Engine(ours)
    alone = [engine.generate_tokens([p], 120, GREEDY)[0].tokens for p in prompts]
    assert alone[0] == hf_generate(hf, prompts[:1], 120)[0]
    assert len(alone[0]) == 120
    batched = [c.tokens for c in engine.generate_tokens(prompts, 120, GREEDY)]
    assert batched == hf_generate(hf, prompts, 120) == alone


def test_filters_equal_transformers_logits_processors():
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 1000) * 3
    ids = torch.randint(0, 1000, (4, 30))
    for k in (1, 5, 50):
        torch.testing.assert_close(filter_logits(logits, top_k=k), TopKLogitsWarper(k)(ids, logits.clone()))
    for p in (0.1, 0.5, 0.9):
        torch.testing.assert_close(filter_logits(logits, top_p=p), TopPLogitsWarper(p)(ids, logits.clone()))
    for m in (0.05, 0.3):
        torch.testing.assert_close(filter_logits(logits, min_p=m), MinPLogitsWarper(m)(ids, logits.clone()))
    # the whole chain, in transformers' order: penalty, temperature, top-k, top-p, min-p
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    for proc in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.8), MinPLogitsWarper(0.1)):
        ref = proc(ids, ref)
    seen = torch.zeros(4, 1000, dtype=torch.bool).scatter_(1, ids, True)
    from gptlab.generate import apply_repetition_penalty

    ours = filter_logits(apply_repetition_penalty(logits, seen, 1.3) / 0.7, 40, 0.8, 0.1)
    torch.testing.assert_close(ours, ref)


def test_argmax_picks_what_torch_argmax_picks():
    """The greedy choice by max's reduction: the same index as torch.argmax with ties (the first), NaN (counted as the
    maximum), infinities and rows of -inf, in fp32 and bf16."""
    g = torch.Generator().manual_seed(0)
    for rows, vocab in ((1, 50257), (5, 97), (32, 4096)):
        x = torch.randint(-3, 3, (rows, vocab), generator=g).float()  # many ties
        x[0, 7] = float("inf")
        x[-1] = float("-inf")
        if rows > 2:
            x[1, torch.randint(0, vocab, (3,), generator=g)] = float("nan")
        for t in (x, x.bfloat16()):
            assert torch.equal(argmax(t), t.argmax(-1))


def test_filters_on_a_hand_computed_case():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].tolist()
    assert kept(top_k=3) == [True, True, True, False]
    assert kept(top_p=0.75) == [True, True, False, False]  # 0.5 < 0.75, 0.5 + 0.3 >= 0.75
    assert kept(top_p=0.4) == [True, False, False, False]
    assert kept(min_p=0.4) == [True, True, False, False]  # p >= 0.4 x 0.5
    assert kept(top_k=2, min_p=0.7) == [True, False, False, False]


def test_samples_follow_the_filtered_distribution():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    g = [torch.Generator().manual_seed(0)]
    n = 6000
    counts = torch.bincount(torch.cat([next_tokens(logits, Sampling(), None, g) for _ in range(n)]), minlength=4)
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05]) * n
    assert ((counts - expected).abs() < 4 * (expected * (1 - expected / n)).sqrt()).all(), counts
    counts = torch.bincount(
        torch.cat([next_tokens(logits, Sampling(top_p=0.75), None, g) for _ in range(n)]), minlength=4
    )
    assert counts[2:].sum() == 0 and abs(counts[0] / n - 0.5 / 0.8) < 0.03


def test_seeded_sampling_is_reproducible_and_rows_do_not_depend_on_the_batch():
    model = small_model()
    engine = Engine(model)
    s = Sampling(temperature=1.0, top_k=50, top_p=0.95, seed=7)
    a = engine.generate_tokens([[1, 2, 3], [4, 5]], 40, s)
    b = engine.generate_tokens([[1, 2, 3], [4, 5]], 40, s)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    alone = engine.generate_tokens([[4, 5]], 40, Sampling(temperature=1.0, top_k=50, top_p=0.95, seed=8))
    assert a[1].tokens == alone[0].tokens  # row r draws from seed + r
    other = engine.generate_tokens([[1, 2, 3]], 40, Sampling(temperature=1.0, top_k=50, top_p=0.95, seed=9))
    assert other[0].tokens != a[0].tokens


def test_stop_ids_end_rows_independently():
    model = small_model()
    engine = Engine(model)
    prompts = [[1, 2, 3], [9, 8]]
    alone = [engine.generate_tokens([p], 30, GREEDY)[0].tokens for p in prompts]
    stop = alone[0][5]
    out = engine.generate_tokens(prompts, 30, GREEDY, stop_ids=[stop])
    for c, ref in zip(out, alone):
        cut = ref.index(stop) if stop in ref else len(ref)
        assert c.tokens == ref[:cut]
        assert c.finish_reason == ("stop_token" if stop in ref else "length")
    assert out[0].finish_reason == "stop_token" and len(out[0].tokens) <= 5


def test_stop_strings_and_held_back_text():
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz .")
    s = TextStream(tok, ["the end"])
    pieces = []
    for ch in "once upon a time. the end. more":
        s.push(tok.encode(ch)[0])
        pieces.append(s.take())
        if s.stopped:
            break
    pieces.append(s.take(final=True))
    assert "".join(pieces) == s.text() == "once upon a time. "
    assert all("the" not in p for p in pieces)  # "the" was held back as a possible start of "the end"


def test_streaming_is_utf8_safe_across_multibyte_tokens():
    from gptlab.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer()
    text = "naïve café 日本語のテキスト 🙂🚀 ok"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens are partial characters
    s = TextStream(tok, [])
    pieces = []
    for i in ids:
        s.push(i)
        pieces.append(s.take())
    pieces.append(s.take(final=True))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_stream_and_generate_agree():
    model = small_model(vocab_size=29)
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz .")
    engine = Engine(model, tok)
    s = Sampling(temperature=0.9, seed=3)
    full = engine.generate(["the cat"], 40, s, stop=["q"])[0]
    assert "".join(engine.stream("the cat", 40, s, stop=["q"])) == full.text
    assert "q" not in full.text


def test_prompt_longer_than_context_is_an_error_or_a_sliding_window():
    model = small_model(block_size=32)
    engine = Engine(model)
    with pytest.raises(GptlabError, match="more than the model's context of 32"):
        engine.generate_tokens([list(range(20))], 40, GREEDY)
    with pytest.raises(GptlabError, match="longest prompt has 50 tokens"):
        engine.generate_tokens([list(range(50))], 1, GREEDY)
    slid = engine.generate_tokens([list(range(20))], 40, GREEDY, sliding_window=True)[0].tokens
    assert len(slid) == 40
    assert slid[:12] == engine.generate_tokens([list(range(20))], 12, GREEDY)[0].tokens
    assert len(engine.generate_tokens([list(range(50))], 5, GREEDY, sliding_window=True)[0].tokens) == 5


def test_bad_settings_are_clear_errors():
    with pytest.raises(GptlabError, match=r"top_p = 1.5 is out of range \(valid: \(0, 1\]\)"):
        Sampling(top_p=1.5)
    with pytest.raises(GptlabError, match="outside the model's vocabulary"):
        Engine(small_model()).generate_tokens([[500]], 3)


def test_compiled_decode_equals_eager():
    model = small_model(block_size=128)
    prompts = [[1, 2, 3, 4]]
    eager = Engine(model).generate_tokens(prompts, 40, GREEDY)[0].tokens
    compiled = Engine(model, compile=True)
    assert compiled.generate_tokens(prompts, 40, GREEDY)[0].tokens == eager
    assert compiled.stats["cache_bytes"] == 2 * 2 * 1 * 2 * 16 * 128 * 4  # bucketed to 256, capped at context


def test_a_compiled_step_follows_its_model_as_it_changes():
    """A compiled step skips Dynamo's guards on the model's modules and weights (``engine.CompiledStep``); what they
    would catch is checked once per generation instead. Weights changed in place, modules swapped after the engine
    was built (quantized), a weight replaced by a new tensor, and a second model of the same shape compiled in the
    same process: each generation equals an eager engine's on the model as it is then."""
    from gptlab.quant.quantize import quantize_model

    prompts = [[1, 2, 3, 4]]

    def tokens(engine):
        return engine.generate_tokens(prompts, 16, GREEDY)[0].tokens

    model, other = small_model(block_size=128), small_model(block_size=128, seed=1)
    compiled, compiled_other = Engine(model, compile=True), Engine(other, compile=True)
    assert tokens(compiled) == tokens(Engine(model)) != tokens(Engine(other)) == tokens(compiled_other)
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight.mul_(-3)  # values: read at every call
    assert tokens(compiled) == tokens(Engine(model)) and tokens(compiled_other) == tokens(Engine(other))
    quantize_model(model, "int8")  # every linear layer replaced: a new graph
    assert tokens(compiled) == tokens(Engine(model))
    model.h[1].attn.c_attn.bias = torch.randn(96)
    assert tokens(compiled) == tokens(Engine(model))
