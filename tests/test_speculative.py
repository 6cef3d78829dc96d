"""Speculative decoding is exact: greedy tokens identical to plain decoding for every k and any draft quality, and
sampled tokens distributed as the target's (enumerated distributions, 200,000 draws, total variation and a
chi-square test), adversarial draft/target pairs included."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from gptlab.generate.engine import Engine, Sampling
from gptlab.generate.speculative import ModelDraft, NgramDraft, verify

from .conftest import gpt2_shaped

V = 8
DRAWS = 200_000


def dist(values):
    t = torch.tensor(values, dtype=torch.float64)
    return t / t.sum()


PAIRS = {  # (target p, draft q); q None: a deterministic (one-hot) draft proposing token 0
    "ordinary": (dist([8, 4, 2, 1, 1, 3, 5, 7]), dist([1, 2, 3, 4, 5, 6, 7, 8])),
    "equal": (dist([3, 1, 4, 1, 5, 9, 2, 6]), dist([3, 1, 4, 1, 5, 9, 2, 6])),
    "disjoint": (dist([1, 1, 1, 1, 0, 0, 0, 0]), dist([0, 0, 0, 0, 1, 2, 3, 4])),
    "draft zero where target positive": (dist([1, 2, 3, 4, 5, 6, 7, 8]), dist([0, 0, 5, 0, 1, 0, 0, 1])),
    "one-hot draft": (dist([2, 7, 1, 1, 3, 1, 1, 1]), None),
}


def one_round(p, q, k, rows, g):
    """One round of speculative sampling for ``rows`` independent generations from a context-free target p with
    draft q: (tokens [rows, k + 1], how many of them each round produced [rows])."""
    P = p.expand(rows, k + 1, V)
    if q is None:
        Q, props = None, torch.zeros(rows, k, dtype=torch.long)
    else:
        Q, props = q.expand(rows, k, V), torch.multinomial(q, rows * k, True, generator=g).view(rows, k)
    uniforms = torch.rand(rows, k + 1, generator=g, dtype=torch.float64)
    n, nxt = verify(P, Q, props, torch.full((rows,), k), uniforms)
    tokens = torch.cat([props, torch.zeros(rows, 1, dtype=torch.long)], 1)
    tokens[torch.arange(rows), n] = nxt
    return tokens, n + 1


def two_tokens(p, q, k, draws, seed):
    """The first two output tokens of ``draws`` independent generations (a second round where the first produced
    one token), as a [V, V] count table."""
    g = torch.Generator().manual_seed(seed)
    tokens, made = one_round(p, q, k, draws, g)
    second = tokens[:, 1].clone()
    short = made < 2
    if short.any():
        more, _ = one_round(p, q, k, int(short.sum()), g)
        second[short] = more[:, 0]
    counts = np.zeros((V, V))
    np.add.at(counts, (tokens[:, 0].numpy(), second.numpy()), 1)
    return counts


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", list(PAIRS))
def test_sampled_tokens_are_distributed_as_the_targets(name, k):
    p, q = PAIRS[name]
    counts = two_tokens(p, q, k, DRAWS, seed=k)
    joint = np.outer(p.numpy(), p.numpy())  # context-free target: the first two tokens are independent draws of p
    tv = 0.5 * np.abs(counts / DRAWS - joint).sum()
    assert tv <= 0.01, tv
    first = counts.sum(1)
    keep = p.numpy() > 0
    assert counts[~keep].sum() == 0 and counts[:, ~keep].sum() == 0  # never a token the target excludes
    assert chisquare(first[keep], DRAWS * p.numpy()[keep]).pvalue > 1e-3
    cells = joint.reshape(-1) > 0
    assert chisquare(counts.reshape(-1)[cells], DRAWS * joint.reshape(-1)[cells]).pvalue > 1e-3


class Corrupted:
    """A draft that proposes the target's own greedy tokens, each replaced with probability ``rate`` by another
    token: acceptance about 1 - rate at the first position."""

    def __init__(self, target, rate, seed=0):
        self.inner, self.rate = ModelDraft(target), rate
        self.rng = np.random.default_rng(seed)

    def start(self, prompts, pad, length):
        self.inner.start(prompts, pad, length)

    def propose(self, histories, k, args, generators):
        tokens, _ = self.inner.propose(histories, k, args, generators)
        bad = lambda t: (t + 1 + int(self.rng.integers(0, 50))) % 512
        return [[bad(t) if self.rng.random() < self.rate else t for t in row] for row in tokens], None

    def accepted(self, lengths):
        self.inner.accepted(lengths)


@pytest.fixture(scope="module")
def target():
    return gpt2_shaped(vocab_size=512, block_size=160)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("quality", ["nothing", "half", "everything", "ngram"])
def test_greedy_output_is_identical_to_plain_decoding(target, k, quality):
    prompts = [[5, 6, 7, 8, 5, 6, 7], [1], [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 2]]
    plain = Engine(target).generate_tokens(prompts, 48, Sampling(temperature=0), stop_ids={3})
    draft = {
        "nothing": lambda: ModelDraft(gpt2_shaped(vocab_size=512, block_size=160, n_layer=1, n_embd=32, init_std=1.0)),
        "half": lambda: Corrupted(target, 0.5),
        "everything": lambda: ModelDraft(target),
        "ngram": lambda: NgramDraft(),
    }[quality]()
    engine = Engine(target, draft=draft, spec_k=k, spec_min_speedup=0.0)  # never switched off: every round drafts
    out = engine.generate_tokens(prompts, 48, Sampling(temperature=0), stop_ids={3})
    assert [c.tokens for c in out] == [c.tokens for c in plain]
    assert [c.finish_reason for c in out] == [c.finish_reason for c in plain]
    rate = engine.stats["speculative"]["acceptance_by_position"][0]  # the first proposal of a round
    assert rate is not None, "the draft never proposed"  # the prompts repeat, so prompt lookup proposes too
    if quality != "ngram":  # prompt lookup's acceptance depends on what the random target continues with
        expect = {"nothing": (0, 0.1), "half": (0.3, 0.7), "everything": (0.999, 1.0)}[quality]
        assert expect[0] <= rate <= expect[1], rate


def test_sampling_with_a_draft_is_reproducible_and_keeps_the_filters(target):
    prompts = [[5, 6, 7], [1, 2]]
    s = Sampling(temperature=0.8, top_k=5, seed=3)
    runs = [
        Engine(target, draft=ModelDraft(target), spec_k=3, spec_min_speedup=0.0).generate_tokens(prompts, 20, s)
        for _ in range(2)
    ]
    assert [c.tokens for c in runs[0]] == [c.tokens for c in runs[1]]
    logits = target(torch.tensor([prompts[0]]))[0][0, -1]
    allowed = set(logits.topk(5).indices.tolist())
    assert runs[0][0].tokens[0] in allowed


def test_a_slower_draft_is_switched_off(target):
    """A draft that never helps (every proposal wrong) is disabled after a few rounds: decoding goes on plainly.
    (Asking for a 10x speedup makes the outcome independent of this machine's timings.)"""
    slow = Corrupted(target, 1.0)
    engine = Engine(target, draft=slow, spec_k=4, spec_min_speedup=10.0)
    engine.generate_tokens([[1, 2, 3]], 60, Sampling(temperature=0))
    assert engine.stats["speculative"]["disabled_at_round"] is not None


@pytest.mark.parametrize("draft_kind", ["ngram", "model", "int8"])
def test_public_paths_with_a_draft_stop_early_like_plain_decoding(target, draft_kind):
    """The public paths stop reading the token stream as soon as every row is done (end-of-text, a stop string,
    max tokens): with a draft they return what plain decoding returns, with their statistics filled in."""
    import copy

    from gptlab.quant.quantize import quantize_model
    from gptlab.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer()
    model = gpt2_shaped(block_size=160)
    prompt = "the cat sat on the mat and the cat sat"
    greedy = Sampling(temperature=0)
    plain = Engine(model, tok).generate([prompt], 30, greedy, stop_ids=set())[0]
    assert len(plain.tokens) == 30
    stop_token = plain.tokens[5]  # a stop token the output reaches early
    stop_text = tok.decode(plain.tokens[:9])[-3:]  # a stop string it reaches early
    drafts = {
        "ngram": NgramDraft,
        "model": lambda: ModelDraft(gpt2_shaped(block_size=160, n_layer=1)),
        "int8": lambda: ModelDraft(quantize_model(copy.deepcopy(model), "int8")),
    }
    for kw in ({"stop_ids": {stop_token}}, {"stop": [stop_text], "stop_ids": set()}, {"stop_ids": set()}):
        want = Engine(model, tok).generate([prompt], 30, greedy, **kw)[0]
        draft = drafts[draft_kind]()
        engine = Engine(model, tok, draft=draft, spec_min_speedup=0.0)
        got = engine.generate([prompt], 30, greedy, **kw)[0]
        assert (got.tokens, got.finish_reason, got.text) == (want.tokens, want.finish_reason, want.text)
        assert engine.stats["decode_steps"] >= 1 and engine.stats["cache_bytes"] > 0
        assert engine.stats["speculative"]["rounds"] >= 0
        streamed = "".join(Engine(model, tok, draft=draft, spec_min_speedup=0.0).stream(prompt, 30, greedy, **kw))
        assert streamed == want.text


@pytest.mark.parametrize("draft", ["ngram", "int8"])
def test_sample_with_a_draft_ending_early_reports_like_plain_sampling(tmp_path, draft):
    """`gptlab sample --draft` with a stop string that ends generation early: exit 0, the plain run's text, and
    the prefill time and KV-cache size reported (they were 0 with a draft)."""
    import json

    from .conftest import random_gpt2_checkpoint, run_cli

    model = random_gpt2_checkpoint(tmp_path / "m", 96)
    common = [str(model), "--prompt", "one two one two one two", "--temperature", "0", "--max-new-tokens", "24"]
    plain = run_cli("sample", *common, "--json")
    assert plain.returncode == 0, plain.stderr
    text = json.loads(plain.stdout)["samples"][0]
    stop = text[len(text) // 3 : len(text) // 3 + 2]  # reached a third of the way in
    want = json.loads(run_cli("sample", *common, "--stop", stop, "--json").stdout)
    got = run_cli("sample", *common, "--stop", stop, "--draft", draft, "--json")
    assert got.returncode == 0, got.stderr
    out = json.loads(got.stdout)
    assert out["samples"] == want["samples"] and out["finish_reasons"] == want["finish_reasons"] == ["stop_string"]
    assert out["kv_cache_bytes"] > 0 and out["prefill_seconds"] > 0
