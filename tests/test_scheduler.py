"""Continuous batching (gptlab.serve.scheduler): a request's tokens do not depend on when it joins or what runs
beside it (checked against the static-batch Engine), cancellation frees rows at once, and a newcomer's prefill is
chunked so that running streams are never stalled for more than one chunk."""

import asyncio
import os
import time

import pytest
import torch

from gptlab import kernels
from gptlab.config import GPTConfig
from gptlab.generate import Engine, Sampling
from gptlab.kv_cache import KVCache, PackedCache
from gptlab.model import GPT
from gptlab.quant.quantize import quantize_model
from gptlab.serve.scheduler import Cancelled, InvalidRequest, QueueFull, Request, Scheduler, packs_prompts
from gptlab.tokenizer import CharTokenizer

GREEDY = Sampling(temperature=0)
SAMPLED = Sampling(temperature=1.0, top_k=40, top_p=0.95)
TEXTS = ["the king", "a", "sweet prince of the night", "and", "my lord speaks of war and love", "thou", "xy z", "good"]


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,!?")
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=tok.vocab_size, init_std=0.2))
    return model.eval(), tok


def run(coro):
    return asyncio.run(coro)


async def collect(sched, request, delay=0.0):
    await asyncio.sleep(delay)
    out: dict[int, list[int]] = {}
    async for c in sched.submit(request):
        out.setdefault(c.index, []).extend(c.tokens)
    return [out[i] for i in sorted(out)]


def engine_tokens(lm, prompts, n_new, sampling, seed=0):
    model, tok = lm
    s = Sampling(**{**sampling.__dict__, "seed": seed})
    return [c.tokens for c in Engine(model, tok).generate_tokens(prompts, n_new, s, stop_ids=())]


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_tokens_do_not_depend_on_joining_a_running_batch(lm, sampling):
    model, tok = lm
    prompts = [tok.encode(t) for t in TEXTS]
    alone = [engine_tokens(lm, [p], 40, sampling, seed=7)[0] for p in prompts]
    if sampling is GREEDY:  # the static batch of the Engine gives the same (it left-pads the rows)
        assert engine_tokens(lm, prompts, 40, sampling) == alone
    sched = Scheduler(model, tok, max_batch=8, prefill_chunk=5, prefix_block=5)  # long prompts prefill in pieces

    async def main():
        # staggered arrivals: each request joins while the earlier ones are mid-decode
        return await asyncio.gather(
            *[
                collect(sched, Request(p, 40, sampling, seed=7, stop_ids=frozenset()), delay=0.004 * i)
                for i, p in enumerate(prompts)
            ]
        )

    try:
        joined = [r[0] for r in run(main())]
    finally:
        sched.close()
    assert joined == alone
    assert sched.steps < 8 * 40  # they really were decoded together


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_batch_invariance_alone_against_busy_batches_of_two_sizes(lm, sampling):
    """Each request alone, then all of them at once in pools of 3 and 8 rows (other requests around them, of other
    settings, joining and leaving): the same tokens, the first token's logprobs bit for bit (its prefill runs alone,
    one block per pass), the later ones to float32 rounding (decode steps batch rows: docs/serving.md)."""
    model, tok = lm
    reqs = [
        Request(
            tok.encode(t), 24, sampling if i % 2 else SAMPLED, seed=i, n=1 + i % 2, logprobs=2, stop_ids=frozenset()
        )
        for i, t in enumerate(TEXTS)
    ]

    async def each(sched, r):
        out: dict[int, list] = {}
        async for c in sched.submit(r):
            out.setdefault(c.index, []).extend((lp.token, lp.logprob, lp.top) for lp in c.logprobs or [])
        return [out[i] for i in sorted(out)]

    def results(max_batch, together):
        sched = Scheduler(model, tok, max_batch=max_batch, prefill_chunk=8, prefix_block=8, prefix_cache_mb=0)
        try:
            if together:

                async def everyone():
                    return await asyncio.gather(*(each(sched, r) for r in reqs))

                return run(everyone())
            return [run(each(sched, r)) for r in reqs]
        finally:
            sched.close()

    alone = results(8, together=False)
    for max_batch in (3, 8):
        busy = results(max_batch, together=True)
        for a, b in zip(alone, busy):
            assert [[t for t, _, _ in ch] for ch in a] == [[t for t, _, _ in ch] for ch in b]
            assert [ch[0] for ch in a] == [ch[0] for ch in b]  # the prefill's token: same bits
            la = torch.tensor([[lp for _, lp, top in ch for lp in (lp, *dict(top).values())] for ch in a])
            lb = torch.tensor([[lp for _, lp, top in ch for lp in (lp, *dict(top).values())] for ch in b])
            torch.testing.assert_close(la, lb, rtol=0, atol=1e-5)


PACKS = pytest.mark.skipif(
    not kernels.has_f32_kernel(), reason="prompts pack where gptlab's fp32 kernel runs (an AVX-512 CPU)"
)
LLAMA_LIKE = dict(norm_type="rmsnorm", positions="rope", mlp="swiglu", n_kv_head=2, bias=False)


@PACKS
@pytest.mark.parametrize("kind", [{}, LLAMA_LIKE], ids=["gpt2", "llama"])
def test_packed_prefill_gives_each_prompt_the_bits_of_its_pass_alone(kind):
    """Five blocks of four prompts in one forward pass (PackedCache, 166 rows: past the 64 that f32_linear takes
    outside row_invariant; two consecutive blocks of one prompt) against each block's pass alone: the same hidden
    states and keys and values, bit for bit, the later blocks attending over the earlier ones in the row."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=96, vocab_size=300, **kind)
    model = GPT(cfg).eval()
    spans = [(0, 0, 40), (0, 40, 80), (1, 0, 1), (2, 32, 90), (3, 0, 27)]  # (row, a, b): row 2's first 32 came before
    prompts = [torch.randint(0, 300, (96,)) for _ in range(4)]
    alone, packed = KVCache(cfg, 4, 96), KVCache(cfg, 4, 96)
    with torch.no_grad():
        for cache in (alone, packed):  # row 2's earlier block, computed the same way in both
            model.hidden_states(prompts[2][None, :32], cache=cache.view(slice(2, 3), 32), slots=torch.arange(32))
        each = [
            model.hidden_states(prompts[r][None, a:b], cache=alone.view(slice(r, r + 1), b), slots=torch.arange(a, b))
            for r, a, b in spans
        ]
        pack = PackedCache(packed, spans)
        assert pack.slots.numel() > kernels.F32_MAX_ROWS
        with kernels.row_invariant():
            together = model.hidden_states(torch.cat([prompts[r][a:b] for r, a, b in spans])[None],
                                           cache=pack, slots=pack.slots)  # fmt: skip
    assert torch.equal(torch.cat(each, dim=1), together)
    for la, lp in zip(alone.layers, packed.layers):
        assert torch.equal(la.k, lp.k) and torch.equal(la.v, lp.v)


@PACKS
def test_a_burst_of_prompts_is_prefilled_in_packed_passes(lm):
    """Prompts submitted together share prefill passes (fewer passes than prompts, none over the chunk) and give
    the tokens each gives alone; a quantized model does not pack (its products are not row-invariant)."""
    model, tok = lm
    assert packs_prompts(model) and not packs_prompts(quantize_model(GPT(model.config), "int8"))
    prompts = [tok.encode(t) for t in TEXTS]
    alone = [engine_tokens(lm, [p], 12, GREEDY)[0] for p in prompts]
    sched = Scheduler(model, tok, max_batch=8, prefill_chunk=24, prefix_block=8)
    passes, run_passes = [], sched._run_passes
    sched._run_passes = lambda blocks: (passes.append([b - a for _, a, b in blocks]), run_passes(blocks))

    async def main():
        return await asyncio.gather(*(collect(sched, Request(p, 12, GREEDY, stop_ids=frozenset())) for p in prompts))

    try:
        got = [r[0] for r in run(main())]
    finally:
        sched.close()
    assert got == alone
    assert sum(map(sum, passes)) == sum(map(len, prompts)) and max(map(sum, passes)) <= 24
    assert max(map(len, passes)) > 1 and len(passes) < len(prompts)


def test_n_choices_share_the_prompt_and_match_engine_rows(lm):
    model, tok = lm
    p = tok.encode("the queen doth speak")
    sched = Scheduler(model, tok, max_batch=4)
    try:
        choices = run(collect(sched, Request(p, 30, SAMPLED, seed=11, n=3, stop_ids=frozenset())))
    finally:
        sched.close()
    # Engine row r uses seed + r; choice j uses seed + j
    assert choices == engine_tokens(lm, [p] * 3, 30, SAMPLED, seed=11)
    assert len({tuple(c) for c in choices}) == 3


def test_stop_token_and_stop_string_end_a_choice(lm):
    model, tok = lm
    p = tok.encode("the king")
    ref = engine_tokens(lm, [p], 60, GREEDY)[0]
    text = tok.decode(ref)
    stop_id = ref[10]
    sched = Scheduler(model, tok)

    async def chunks(request):
        return [c async for c in sched.submit(request)]

    try:
        by_id = run(chunks(Request(p, 60, GREEDY, stop_ids=frozenset({stop_id}))))
        stop = text[15:18]
        by_text = run(chunks(Request(p, 60, GREEDY, stop=[stop], stop_ids=frozenset())))
    finally:
        sched.close()
    toks = [t for c in by_id for t in c.tokens]
    assert toks == ref[: ref.index(stop_id) + 1] and by_id[-1].finish_reason == "stop"
    assert "".join(c.text for c in by_text) == text[: text.index(stop)]
    assert by_text[-1].finish_reason == "stop" and sum(c.finish_reason is not None for c in by_text) == 1


def test_cancel_frees_the_row_before_the_next_step_and_others_continue(lm):
    model, tok = lm
    prompts = [tok.encode(t) for t in TEXTS[:4]]
    alone = [engine_tokens(lm, [p], 100, GREEDY)[0] for p in prompts]
    sched = Scheduler(model, tok, max_batch=4)
    seen = []
    sched.metrics = type("M", (), {"event": lambda self, name, job, **kw: seen.append((name, sched.steps, kw))})()

    async def quit_early(p):
        stream = sched.submit(Request(p, 100, GREEDY, stop_ids=frozenset()))
        got = []
        async for c in stream:
            got += c.tokens
            if len(got) >= 3:
                break  # leaving the loop closes the stream: the request is cancelled
        await stream.aclose()
        return sched.steps

    async def main():
        return await asyncio.gather(
            quit_early(prompts[0]),
            *[collect(sched, Request(p, 100, GREEDY, stop_ids=frozenset())) for p in prompts[1:]],
        )

    try:
        at_cancel, *rest = run(main())
    finally:
        sched.close()
    assert [r[0] for r in rest] == alone[1:]
    dropped = [(s, kw["steps"]) for name, s, kw in seen if name == "cancelled"]
    assert len(dropped) == 1 and dropped[0][0] - at_cancel <= 2 and dropped[0][1] <= 2


def test_cancel_during_prefill(lm):
    model, tok = lm
    sched = Scheduler(model, tok, max_batch=2, prefill_chunk=2, prefix_block=2)  # a 100-token prompt: 50 steps
    seen = []
    sched.metrics = type("M", (), {"event": lambda self, name, job, **kw: seen.append(name)})()

    async def main():
        running = asyncio.ensure_future(collect(sched, Request(tok.encode("a"), 100, GREEDY, stop_ids=frozenset())))
        await asyncio.sleep(0.01)
        stream = sched.submit(Request([1] * 100, 5, GREEDY))
        task = asyncio.ensure_future(stream.__anext__())
        while seen.count("admitted") < 2:
            await asyncio.sleep(0.001)
        task.cancel()  # the client leaves while its prompt is being prefilled
        await asyncio.sleep(0)
        await stream.aclose()
        return await running

    try:
        out = run(main())
    finally:
        sched.close()
    assert "cancelled" in seen and len(out[0]) == 100  # the other request went on to the end
    assert sched.counts() == {"waiting": 0, "running": 0, "rows": 0}


def test_newcomer_prefill_is_chunked_so_running_streams_keep_going(lm):
    model, tok = lm
    calls = []  # (tokens per row, rows) of every forward pass
    # every pass embeds its tokens first: the embedding sees (rows, tokens per row) of every forward pass
    hook = model.wte.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    sched = Scheduler(model, tok, max_batch=4, prefill_chunk=8, prefix_block=8)

    async def main():
        short = asyncio.ensure_future(collect(sched, Request(tok.encode("a"), 60, GREEDY, stop_ids=frozenset())))
        await asyncio.sleep(0.01)
        long = tok.encode("the king and the queen doth speak of love and war, my lord " * 2)[:100]
        await collect(sched, Request(long, 5, GREEDY, stop_ids=frozenset()))
        return await short

    try:
        run(main())
    finally:
        hook.remove()
        sched.close()
    between, worst = 0, 0  # prompt tokens prefilled between two decode steps (one token per row)
    for _, tokens in calls:
        if tokens == 1:
            worst, between = max(worst, between), 0
        else:
            between += tokens
    assert sum(t for _, t in calls if t > 1) >= 99  # the long prompt went through, in chunks of at most 8
    assert max(t for _, t in calls) <= 8 and worst <= 8


def test_a_request_past_its_time_limit_ends_with_length(lm):
    model, tok = lm

    class Slow:  # each token takes 10 ms more: 100 tokens would take a second
        def event(self, name, job, **kw):
            if name == "token":
                time.sleep(0.01)
            seen.append(name)

    seen: list[str] = []
    sched = Scheduler(model, tok, max_batch=2, metrics=Slow(), max_request_seconds=0.3)
    try:
        t0 = time.perf_counter()
        out, finish = [], []

        async def main():
            async for c in sched.submit(Request(tok.encode("the king"), 100, GREEDY, n=2, stop_ids=frozenset())):
                out.extend(c.tokens)
                finish.append(c.finish_reason)

        run(main())
        assert time.perf_counter() - t0 < 1.0
        assert [f for f in finish if f] == ["length", "length"] and 2 <= len(out) < 2 * 60
        assert "expired" in seen and sched.counts() == {"waiting": 0, "running": 0, "rows": 0}
    finally:
        sched.close()


def test_bad_requests_and_a_full_queue(lm):
    model, tok = lm
    sched = Scheduler(model, tok, max_batch=1, max_queue=1)
    try:
        with pytest.raises(InvalidRequest, match="100 tokens and max_tokens is 29: 129 in all.*context of 128"):
            sched.check(Request([1] * 100, 29))
        with pytest.raises(InvalidRequest, match="vocabulary"):
            sched.check(Request([10_000]))
        assert sched.check(Request([1] * 100)) == 28  # no max_tokens: to the end of the context

        async def main():
            first = sched.submit(Request([1], 120, GREEDY, stop_ids=frozenset()))
            await first.__anext__()  # running
            second = sched.submit(Request([1], 5, GREEDY))  # waiting
            with pytest.raises(QueueFull):
                sched.submit(Request([1], 5, GREEDY))
            await first.aclose()
            return [c async for c in second]

        assert run(main())[-1].finish_reason == "length"
    finally:
        sched.close()
    with pytest.raises(Cancelled):

        async def after_close():
            s = Scheduler(model, tok)
            stream = s.submit(Request([1], 120, GREEDY, stop_ids=frozenset()))
            await stream.__anext__()
            s.close()
            async for _ in stream:
                pass

        run(after_close())


@pytest.mark.slow
def test_compiled_single_stream_step_gives_the_same_tokens():
    """``compile=True`` (the server's default) runs a lone stream through a compiled step (a dynamic cache length,
    bucketed: a context of 512 gives views of 256 and 512 slots, two graphs); its greedy and seeded tokens equal the
    eager Engine's, alone and on a later row, and with two streams the ordinary batched step takes over."""
    torch.manual_seed(0)
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,!?")
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=512, vocab_size=tok.vocab_size, init_std=0.2))
    lm = (model.eval(), tok)
    prompts = [tok.encode(t) for t in TEXTS[:2]]
    sched = Scheduler(model, tok, max_batch=4, compile=True)
    assert sched._single is not None  # compiled, not left eager
    try:
        for sampling in (GREEDY, SAMPLED):
            alone = [engine_tokens(lm, [p], 100, sampling, seed=3)[0] for p in prompts]
            one = run(collect(sched, Request(prompts[0], 100, sampling, seed=3, stop_ids=frozenset())))[0]

            async def both(sampling=sampling):  # the second runs alone on row 1 once the first ends
                return await asyncio.gather(
                    *[
                        collect(sched, Request(p, 100 + 20 * i, sampling, seed=3, stop_ids=frozenset()), 0.01 * i)
                        for i, p in enumerate(prompts)
                    ]
                )

            two = [r[0] for r in run(both())]
            assert one == alone[0] and two[0] == alone[0] and two[1][:100] == alone[1], sampling
    finally:
        sched.close()


@pytest.mark.parametrize("draft", ["ngram", "self", "other"])
def test_speculative_serving_gives_the_same_greedy_tokens_batched_and_staggered(lm, draft):
    """With speculation (prompt lookup; a model draft that is the target itself, accepting everything; another
    model, accepting some) the scheduler's greedy tokens equal plain decoding's, for rows that join at different
    times, accept different numbers of proposals, and reuse rows freed by earlier requests (6 requests, 4 rows);
    the draft is used (accepted tokens counted)."""
    from gptlab.generate.speculative import ModelDraft, NgramDraft

    model, tok = lm
    texts = ["the king the king the king the", "a b a b a b a", "sweet prince", "and and and and and", "xy", "b"]
    prompts = [tok.encode(t) for t in texts]
    alone = [engine_tokens(lm, [p], 40, GREEDY, seed=7)[0] for p in prompts]
    if draft == "ngram":
        d = NgramDraft()
    elif draft == "self":
        d = ModelDraft(model)
    else:
        torch.manual_seed(1)
        cfg = model.config
        d = ModelDraft(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=128, vocab_size=cfg.vocab_size)))
    sched = Scheduler(model, tok, max_batch=4, draft=d, spec_k=4, spec_min_speedup=0.0)  # never paused

    async def main():
        return await asyncio.gather(
            *[
                collect(sched, Request(p, 40, GREEDY, seed=7, stop_ids=frozenset()), delay=0.003 * i)
                for i, p in enumerate(prompts)
            ]
        )

    try:
        got = run(main())
    finally:
        sched.close()
    assert [g[0] for g in got] == alone
    assert sched.spec.rounds > 0 and sum(sched.spec.accepted_at) > 0
    if draft == "self":
        assert sched.spec.acceptance_rate == 1.0


def test_default_pool_is_sized_from_kv_bytes(lm, monkeypatch):
    """The default rows against a hand computation: GPT-2 124M keeps 2 x 12 layers x 768 x 1,024 slots x 4 bytes =
    72 MiB a row; a CPU server takes a quarter of the free memory, at most 4 GiB (56 rows) and 64 rows; a GPU half."""
    from gptlab.config import preset
    from gptlab.serve import scheduler as sched_mod

    gpt2 = preset("gpt2")
    row = 2 * 12 * 768 * 1024 * 4
    assert sched_mod.KVCache.row_bytes(gpt2, gpt2.block_size, torch.float32) == row == 72 * 2**20
    cases = [("cpu", 64 * 2**30, 56), ("cpu", 2 * 2**30, 7), ("cpu", 2**20, 1), ("cuda", 8 * 2**30, 56)]
    cases += [("cuda", 80 * 2**30, 256)]
    for kind, free, rows in cases:
        monkeypatch.setattr(sched_mod, "available_memory", lambda device, free=free: free)
        assert sched_mod.pool_rows(gpt2, torch.device(kind), torch.float32) == rows, (kind, free)
    model, tok = lm  # the default Scheduler takes that many rows
    monkeypatch.setattr(sched_mod, "available_memory", lambda device: 2**30)
    sched = Scheduler(model, tok)
    try:
        expect = min(64, 2**28 // sched_mod.KVCache.row_bytes(model.config, model.config.block_size, torch.float32))
        assert sched.max_batch == expect == sched.pool.layers[0].k.size(0) and sched.pool.nbytes <= 2**28
    finally:
        sched.close()


def test_available_memory_reads_this_machine():
    from gptlab.serve.scheduler import available_memory

    free = available_memory(torch.device("cpu"))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < free <= total
