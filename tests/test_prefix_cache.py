"""Automatic prefix caching (gptlab.serve.prefix_cache): a request whose prompt shares blocks with earlier ones gets,
bit for bit, the tokens and logprobs it gets from a scheduler that never saw them (fp32, CPU): after a hit, in the
three-conversation case llama.cpp's server tests use, under eviction pressure, and after a cancelled request. With
concurrent hits on one block the rows decode in one batch, so the comparison there is tokens, and logprobs to float32
rounding. The counters the server exports come from the same events."""

import asyncio

import pytest
import torch

from gptlab.config import GPTConfig
from gptlab.generate import Sampling
from gptlab.model import GPT
from gptlab.serve.prefix_cache import PrefixCache
from gptlab.serve.scheduler import Cancelled, Request, Scheduler
from gptlab.tokenizer import CharTokenizer

GREEDY = Sampling(temperature=0)
SAMPLED = Sampling(temperature=1.0, top_k=40)
BLOCK = 8
SYSTEM = "you are a helpful assistant. answer in few words. "  # 50 characters: six whole blocks


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,!?")
    model = GPT(
        GPTConfig(
            n_layer=2,
            n_head=4,
            n_kv_head=2,
            n_embd=64,
            block_size=160,
            vocab_size=tok.vocab_size,
            positions="rope",
            norm_type="rmsnorm",
        )
    )
    return model.eval(), tok


class Events:
    """The scheduler's events (what /metrics counts), kept for the assertions."""

    def __init__(self):
        self.hits, self.asked, self.evicted = [], [], 0
        self.scheduler, self.cancel = None, None

    def event(self, name, job, **kw):
        if name == "prefix":
            self.hits.append(kw["hit"])
            self.asked.append(kw["asked"])
            if job.request.id == self.cancel:
                self.scheduler.cancel(self.cancel)
        elif name == "prefix_stored":
            self.evicted += kw["evicted"]


def scheduler(lm, mb=1.0, **kw):
    model, tok = lm
    events = Events()
    sched = Scheduler(model, tok, prefix_block=BLOCK, prefill_chunk=4 * BLOCK, prefix_cache_mb=mb, metrics=events, **kw)
    events.scheduler = sched
    return sched


def request(lm, text, sampling=GREEDY, n=1, max_tokens=12):
    return Request(lm[1].encode(text), max_tokens, sampling, seed=5, n=n, logprobs=3, stop_ids=frozenset())


async def collect(sched, req):
    """Each choice's tokens, logprobs and top logprobs (floats, compared exactly)."""
    out: dict[int, list] = {}
    async for c in sched.submit(req):
        for lp in c.logprobs or []:
            out.setdefault(c.index, []).append((lp.token, lp.logprob, tuple(lp.top)))
    return [out[i] for i in sorted(out)]


def alone(lm, reqs):
    """What each request gets from a scheduler without a prefix cache, one at a time."""
    sched = scheduler(lm, mb=0)
    try:
        assert sched.prefix is None
        return [asyncio.run(collect(sched, r)) for r in reqs]
    finally:
        sched.close()


def tokens(results):
    return [[[t for t, _, _ in choice] for choice in r] for r in results]


def logprobs(results):
    return torch.tensor(
        [lp for r in results for choice in r for _, lp, top in choice for lp in (lp, *dict(top).values())]
    )


def in_turn(sched, reqs):
    return [asyncio.run(collect(sched, r)) for r in reqs]


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_a_hit_gives_the_same_bits_as_a_miss(lm, sampling):
    texts = [SYSTEM + "what is the sea?", SYSTEM + "what is the sea?", SYSTEM + "why is the sky blue?"]
    reqs = [request(lm, t, sampling, n=2) for t in texts]
    want = alone(lm, reqs)
    sched = scheduler(lm)
    try:
        got = in_turn(sched, reqs)
        hits = sched.metrics.hits
    finally:
        sched.close()
    assert got == want
    assert hits[0] == 0  # a cold cache
    assert hits[1] == (len(texts[1]) - 1) // BLOCK * BLOCK  # every whole block but the one holding the last token
    assert hits[2] == len(SYSTEM) // BLOCK * BLOCK  # the shared system prompt


def test_three_conversations_with_and_without_eviction(lm):
    """llama.cpp's case: C shares A's prefix; B (unrelated) runs between them. With room for A and B, C reuses A's
    blocks; with room for B alone, B evicts A and C prefills everything. Either way C's output is C's alone."""
    a = request(lm, SYSTEM + "tell me about the moon.")
    b = request(lm, "the quick brown fox jumps over the lazy dog, and then a second fox follows it.")
    c = request(lm, SYSTEM + "tell me about the sun, please.")
    want = alone(lm, [a, b, c])
    block_mb = PrefixCache.block_bytes(lm[0].config, BLOCK, torch.float32) / 2**20
    for blocks, c_hit in ((40, len(SYSTEM) // BLOCK * BLOCK + BLOCK * 2), (len(b.prompt) // BLOCK, 0)):
        sched = scheduler(lm, mb=blocks * block_mb)
        try:
            assert sched.prefix.max_blocks == blocks
            assert in_turn(sched, [a, b, c]) == want
            assert sched.metrics.hits == [0, 0, c_hit]
            assert (sched.metrics.evicted > 0) == (c_hit == 0)
        finally:
            sched.close()


def test_eviction_under_pressure_keeps_every_output_exact(lm):
    texts = [f"{w} " * 6 + SYSTEM[: 9 * i] for i, w in enumerate(["ab", "cd", "ab", "ef", "cd", "ab", "gh", "ab"])]
    reqs = [request(lm, t, SAMPLED) for t in texts]
    want = alone(lm, reqs)
    block_mb = PrefixCache.block_bytes(lm[0].config, BLOCK, torch.float32) / 2**20
    sched = scheduler(lm, mb=5 * block_mb)  # five blocks: far fewer than the prompts hold
    try:
        assert in_turn(sched, reqs) == want
        assert sched.prefix.used == 5 and sched.metrics.evicted > 0
        assert any(sched.metrics.hits)  # repeated openings were still found
    finally:
        sched.close()


def test_concurrent_hits_on_one_block_and_a_cancelled_request(lm):
    """Six requests with one prefix arrive together after a warm-up (each reads the same blocks while the others
    prefill and decode); then a request that hit is cancelled during its prefill. Nothing changes anyone's output,
    and the cache serves the next request exactly."""
    texts = [SYSTEM + q for q in ("why?", "how so?", "who is it?", "where to?", "when?", "what now, my friend?")]
    reqs = [request(lm, t, SAMPLED, n=2) for t in texts]
    want = alone(lm, reqs)
    sched = scheduler(lm, max_batch=16)
    try:
        in_turn(sched, [request(lm, SYSTEM + "hello")])

        async def together():
            return await asyncio.gather(*(collect(sched, r) for r in reqs))

        got = asyncio.run(together())
        # decode steps batch the rows together, and a product with more rows may round differently (docs/serving.md):
        # the tokens are the same, the logprobs the same to float32 rounding
        assert tokens(got) == tokens(want)
        torch.testing.assert_close(logprobs(got), logprobs(want), rtol=0, atol=1e-5)
        assert all(h >= len(SYSTEM) // BLOCK * BLOCK for h in sched.metrics.hits[1:])

        long = request(lm, SYSTEM + "and a much longer question follows here, ", max_tokens=20)
        sched.metrics.cancel = long.id  # cancelled as it is admitted, after its hit: its prefill takes two steps
        with pytest.raises(Cancelled):
            asyncio.run(collect(sched, long))
        assert sched.metrics.hits[-1] == len(SYSTEM) // BLOCK * BLOCK
        assert in_turn(sched, reqs[:1]) == want[:1]
        for _ in range(100):
            if sched.counts() == {"waiting": 0, "running": 0, "rows": 0}:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert sched.counts() == {"waiting": 0, "running": 0, "rows": 0}
    finally:
        sched.close()


def test_requests_arriving_together_reuse_the_prefix_the_first_computes(lm):
    """Four requests with one six-block prefix arrive together at an empty cache: the first computes the prefix,
    the others wait for it to be stored (where prompts pack, they are not packed beside it), then all three take it
    from the cache, and everyone's output is what it is alone."""
    texts = [SYSTEM + q for q in ("why?", "how so?", "who is it?", "where to?")]
    reqs = [request(lm, t) for t in texts]
    want = alone(lm, reqs)
    sched = scheduler(lm, max_batch=8)
    try:

        async def together():
            return await asyncio.gather(*(collect(sched, r) for r in reqs))

        got = asyncio.run(together())
        assert tokens(got) == tokens(want)
        torch.testing.assert_close(logprobs(got), logprobs(want), rtol=0, atol=1e-5)
        assert sorted(sched.metrics.hits) == [0] + [len(SYSTEM) // BLOCK * BLOCK] * 3
    finally:
        sched.close()


def test_chains_name_whole_prefixes(lm):
    cache = PrefixCache(lm[0].config, 4, 3, "cpu", torch.float32)
    x = cache.names(b"", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    y = cache.names(b"", [9, 2, 3, 4, 5, 6, 7, 8])
    assert len(x) == 2 and len(set(x)) == 2  # two whole blocks; the ninth token is not in one
    assert x[1] != y[1]  # the same second block after a different first one is another prefix
    assert cache.names(PrefixCache.root(torch.zeros(1, 3, 2, 2)), [1, 2, 3, 4]) != x[:1]  # an image is a prefix


def test_the_servers_metrics_count_hits_and_evictions(tmp_path):
    """Through HTTP: twelve distinct 120-token prompts overflow a 1 MiB cache of 16-slot blocks (64 blocks of this
    model), then the last prompt again hits; /metrics counts both, and the hit's logprobs equal its miss's."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from .conftest import Served, random_gpt2_checkpoint

    ckpt = random_gpt2_checkpoint(tmp_path / "tiny", 128)
    server = Served(ckpt, "--prefix-block", "16", "--prefix-cache-mb", "1", "--served-model-name", "tiny")
    try:
        prompts = [[(i * 7919 + j * 104729) % 50000 for j in range(120)] for i in range(12)]

        def ask(p):
            body = {"model": "tiny", "prompt": p, "max_tokens": 4, "temperature": 0, "logprobs": 2}
            r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["logprobs"]

        first = [ask(p) for p in prompts]
        again = ask(prompts[-1])
        m = server.metrics()
    finally:
        server.stop()
    assert again == first[-1]
    assert m["gptlab_prefix_cache_hits_tokens_total"] == 112  # the last prompt's 7 whole blocks before its last token
    assert m["gptlab_prefix_cache_evicted_blocks_total"] == 12 * 7 - 64
    assert m["gptlab_prefix_cache_blocks"] == 64
    assert m["gptlab_prefix_cache_capacity_bytes"] == 2**20
