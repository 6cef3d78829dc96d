"""``gptlab serve`` against the official ``openai`` client and raw HTTP, on a real uvicorn at 127.0.0.1: the
OpenAI schemas, usage counts, streaming, logprobs (against log_softmax of the model's own logits), every
parameter's bounds, the server's output against the Engine's, disconnects, limits, and a bounded load test."""

import asyncio
import json
import subprocess
import sys
import threading
import time

import pytest
import torch

from .conftest import ENV, REPO, Served, prometheus, random_gpt2_checkpoint

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from gptlab.chat import chat_prompt  # noqa: E402
from gptlab.generate import Engine, Sampling  # noqa: E402
from gptlab.loader import load_model  # noqa: E402

BLOCK = 128
PROMPTS = ["Hello, my name is", "The capital of France", "naïve café 日本語", "1 2 3", "Once upon a time", "x"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return random_gpt2_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-gpt2", BLOCK)


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_model(ckpt, "cpu")


@pytest.fixture(scope="module")
def server(ckpt):
    s = Served(ckpt, "--max-batch", "8", "--served-model-name", "tiny")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def engine_text(loaded, prompt, max_tokens, sampling):
    e = Engine(loaded.model, loaded.tokenizer)
    return e.generate([prompt], max_tokens, sampling)[0]


def test_models_health_and_tokenize(server, client, loaded):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].object == "model"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    tok = loaded.tokenizer
    r = httpx.post(server.url + "/tokenize", json={"prompt": PROMPTS[2]}).json()
    assert r == {"tokens": tok.encode(PROMPTS[2]), "count": len(tok.encode(PROMPTS[2])), "max_model_len": BLOCK}
    r = httpx.post(server.url + "/detokenize", json={"tokens": tok.encode(PROMPTS[2])}).json()
    assert r == {"prompt": PROMPTS[2]}
    msgs = [{"role": "user", "content": "hi"}]
    assert httpx.post(server.url + "/tokenize", json={"messages": msgs}).json()["tokens"] == tok.encode(
        chat_prompt(msgs)
    )


def test_completion_schema_and_exact_usage(client, loaded):
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=7, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny"
    assert abs(r.created - time.time()) < 60
    assert len(r.choices) == 1 and r.choices[0].index == 0 and r.choices[0].finish_reason == "length"
    prompt_tokens = len(loaded.tokenizer.encode(PROMPTS[0]))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        prompt_tokens,
        7,
        prompt_tokens + 7,
    )
    # several prompts: prompt i's choice j has index i * n + j; prompt tokens are counted once per prompt
    r = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=3, n=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text != r.choices[2].text == r.choices[3].text
    assert r.usage.prompt_tokens == sum(len(loaded.tokenizer.encode(p)) for p in PROMPTS[:2])
    assert r.usage.completion_tokens == 12


def test_token_id_prompts_and_echo(client, loaded):
    ids = loaded.tokenizer.encode(PROMPTS[4])
    a = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    b = client.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=5, temperature=0, echo=True)
    assert b.choices[0].text == PROMPTS[4] + a.choices[0].text


@pytest.mark.parametrize("prompt", PROMPTS)
def test_server_equals_engine_and_stream_equals_whole(client, loaded, prompt):
    want = engine_text(loaded, prompt, 20, Sampling(temperature=0))
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    assert whole.choices[0].text == want.text
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].text for c in chunks if c.choices]
    # UTF-8 whole: a piece never ends inside a character (it would show as U+FFFD where the whole text has the
    # character); a random model may also emit byte tokens that never complete, which the whole text shows too
    assert "".join(pieces) == want.text
    assert sum(p.count("\ufffd") for p in pieces) == want.text.count("\ufffd")
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_seeded_sampling_equals_engine_and_n_gives_indices(client, loaded):
    def sample():
        return client.completions.create(
            model="tiny",
            prompt=PROMPTS[1],
            max_tokens=15,
            n=3,
            seed=5,
            temperature=0.9,
            top_p=0.9,
            extra_body={"top_k": 50},
        )

    r = sample()
    assert [c.index for c in r.choices] == [0, 1, 2]
    s = Sampling(temperature=0.9, top_k=50, top_p=0.9, seed=5)
    e = Engine(loaded.model, loaded.tokenizer).generate([PROMPTS[1]] * 3, 15, s)
    assert [c.text for c in r.choices] == [c.text for c in e]
    assert [c.text for c in sample().choices] == [c.text for c in r.choices]  # a seed reproduces


def test_stop_strings_are_excluded(client, loaded):
    full = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=30, temperature=0).choices[0].text
    stop = full[12:15]
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=stop, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_logprobs_equal_log_softmax_of_the_model(client, loaded):
    tok, model = loaded.tokenizer, loaded.model
    r = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=8, temperature=0, logprobs=5)
    lp = r.choices[0].logprobs
    ids = tok.encode(PROMPTS[3]) + tok.encode(r.choices[0].text)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0][0].log_softmax(-1)
    n = len(tok.encode(PROMPTS[3]))
    assert len(lp.token_logprobs) == 8
    for j, got in enumerate(lp.token_logprobs):
        row = ref[n - 1 + j]
        assert abs(got - float(row.max())) < 1e-4  # greedy: the chosen token is the most likely
        top = row.topk(5)
        want = {tok.decode([int(i)]): float(v) for i, v in zip(top.indices, top.values)}
        assert lp.top_logprobs[j].keys() == want.keys()
        assert all(abs(lp.top_logprobs[j][k] - want[k]) < 1e-4 for k in want)
    # echo with logprobs scores the prompt too (its first token has none)
    e = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=1, temperature=0, logprobs=1, echo=True)
    scored = e.choices[0].logprobs.token_logprobs
    assert scored[0] is None and len(scored) == n + 1
    for j in range(1, n):
        assert abs(scored[j] - float(ref[j - 1, ids[j]])) < 1e-4


def test_chat_completions(client, loaded):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    c = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and c.message.role == "assistant"
    assert r.usage.prompt_tokens == len(loaded.tokenizer.encode(chat_prompt(msgs)))
    want = engine_text(loaded, chat_prompt(msgs), 6, Sampling(temperature=0))
    assert c.message.content == want.text.split("\nUser:")[0].split("\nSystem:")[0]
    assert len(c.logprobs.content) == r.usage.completion_tokens and len(c.logprobs.content[0].top_logprobs) == 2
    assert (
        bytes(b for t in c.logprobs.content for b in t.bytes).decode("utf-8", "replace").startswith(c.message.content)
    )
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == c.message.content
    assert [ch.choices[0].finish_reason for ch in chunks].count(c.finish_reason) == 1


def test_context_limit(client, loaded):
    long = "word " * 120  # 120 tokens
    n = len(loaded.tokenizer.encode(long))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=long, max_tokens=20)
    body = e.value.body
    assert body["param"] == "max_tokens"
    assert f"{n} tokens" in body["message"] and "max_tokens is 20" in body["message"] and str(BLOCK) in body["message"]
    r = client.completions.create(model="tiny", prompt=long, temperature=0)  # no max_tokens: to the end
    assert r.choices[0].finish_reason == "stop" or r.usage.completion_tokens == BLOCK - n


BAD = [
    ("temperature", -0.1),
    ("temperature", 2.5),
    ("top_p", 0),
    ("top_p", 1.5),
    ("top_k", -2),
    ("min_p", 1.5),
    ("n", 0),
    ("n", 999),
    ("max_tokens", -1),
    ("logprobs", -1),
    ("logprobs", 21),
    ("seed", "x"),
    ("repetition_penalty", 0),
    ("stop", ["s"] * 17),
    ("presence_penalty", 0.5),
    ("logit_bias", {"1": 5}),
    ("prompt", []),
    ("prompt", [[-1]]),
    ("prompt", [99_999_999]),
    ("stream", "maybe"),
]


@pytest.mark.parametrize(("param", "value"), BAD, ids=[f"{p}={v!r}"[:40] for p, v in BAD])
def test_every_bound_is_a_400_naming_the_param(server, param, value):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, param: value}
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_logprobs_21_then_the_next_request_succeeds(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, logprobs=21)
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].text is not None


def test_error_statuses(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert e.value.body["param"] == "model"
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x" * 2_000_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.post(
        server.url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}
    )
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")


def metric(server, name):
    return server.metrics().get(name, 0.0)


def wait_idle(server, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metric(server, "gptlab_requests_running") == 0 and metric(server, "gptlab_requests_waiting") == 0:
            return True
        time.sleep(0.01)
    return False


def test_a_dropped_stream_is_cancelled(server):
    assert wait_idle(server)
    before = metric(server, 'gptlab_requests_total{outcome="cancelled"}')
    tokens_before = metric(server, "gptlab_generation_tokens_total")
    body = {"model": "tiny", "prompt": "x", "max_tokens": 120, "stream": True, "temperature": 1}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    assert wait_idle(server, 5)
    assert metric(server, 'gptlab_requests_total{outcome="cancelled"}') == before + 1
    assert metric(server, "gptlab_generation_tokens_total") - tokens_before < 120
    assert_freed_within_two_steps(server)


def assert_freed_within_two_steps(server):
    """Every cancelled request so far had its rows freed within 2 decode steps of the cancel."""
    m = server.metrics()
    assert m["gptlab_cancel_delay_steps_count"] >= 1
    assert m['gptlab_cancel_delay_steps_bucket{le="2.0"}'] == m["gptlab_cancel_delay_steps_count"]


def test_a_dropped_non_streaming_request_is_cancelled(server):
    assert wait_idle(server)
    before = metric(server, 'gptlab_requests_total{outcome="cancelled"}')
    body = {"model": "tiny", "prompt": "x", "max_tokens": 120, "n": 8}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.05)
    assert wait_idle(server, 5)
    assert metric(server, 'gptlab_requests_total{outcome="cancelled"}') == before + 1
    assert_freed_within_two_steps(server)


def test_eight_streams_four_dropped_the_rest_unchanged(server, loaded):
    prompts = PROMPTS[:4] + ["The king", "And so", "Why", "Of"]
    alone = [engine_text(loaded, p, 40, Sampling(temperature=0)).text for p in prompts[:4]]

    async def one(ac, p, drop):
        body = {"model": "tiny", "prompt": p, "max_tokens": 40, "temperature": 0, "stream": True}
        text = ""
        async with ac.stream("POST", server.url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                text += json.loads(line[6:])["choices"][0]["text"]
                if drop:
                    return None
        return text

    async def main():
        async with httpx.AsyncClient(timeout=60) as ac:
            return await asyncio.gather(*[one(ac, p, i >= 4) for i, p in enumerate(prompts)])

    before = metric(server, 'gptlab_requests_total{outcome="cancelled"}')
    out = asyncio.run(main())
    assert out[:4] == alone
    assert wait_idle(server, 5)
    assert metric(server, 'gptlab_requests_total{outcome="cancelled"}') == before + 4
    assert_freed_within_two_steps(server)


def test_api_key_queue_limit_and_loading(tmp_path):
    # a long context, so that the request holding the only row cannot finish while the queue is probed: it would
    # free its row for the waiting one, and the third request would be admitted instead of refused
    long = random_gpt2_checkpoint(tmp_path / "tiny-gpt2", 4096)
    s = Served(long, "--api-key", "sekret", "--max-batch", "1", "--max-queue", "1", "--max-n", "1")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").completions.create(model="tiny-gpt2", prompt="hi", max_tokens=2)
        assert httpx.get(s.url + "/health").status_code == 200  # health is open to probes
        # every route that returns model output or the server's state needs the key, whatever the method
        for method, path in [
            ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/tokenizer_info"), ("POST", "/tokenize"),
            ("POST", "/detokenize"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
            ("GET", "/api/runs"), ("GET", "/api/runs/x"),
        ]:  # fmt: skip
            r = httpx.request(method, s.url + path, json={"prompt": "hi"} if method == "POST" else None)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
        # CORS is closed: a browser on another origin gets no Access-Control-Allow-Origin, preflight or not
        cross = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
        for r in (httpx.options(s.url + "/v1/completions", headers=cross), httpx.get(s.url + "/health", headers=cross)):
            assert "access-control-allow-origin" not in r.headers, r.headers
        c = s.client(api_key="sekret")
        assert c.completions.create(model="tiny-gpt2", prompt="hi", max_tokens=2).usage.completion_tokens == 2
        auth = {"Authorization": "Bearer sekret"}

        async def main():
            async with httpx.AsyncClient(timeout=60, headers=auth) as ac:
                body = {"prompt": "x", "max_tokens": 4000, "stream": True}  # seconds of decoding, closed below
                running = ac.stream("POST", s.url + "/v1/completions", json=body)
                r1 = await running.__aenter__()
                short = {**body, "max_tokens": 2, "stream": False}
                waiting = asyncio.ensure_future(ac.post(s.url + "/v1/completions", json=short))
                while prometheus((await ac.get(s.url + "/metrics")).text).get("gptlab_requests_waiting", 0) < 1:
                    await asyncio.sleep(0.005)
                full = await ac.post(s.url + "/v1/completions", json=short)
                await running.__aexit__(None, None, None)  # disconnecting cancels it: the waiting one gets the row
                assert r1.status_code == 200
                return full, await waiting

        full, waited = asyncio.run(main())
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        assert waited.status_code == 200
    finally:
        s.stop()


def test_health_is_503_while_loading_and_a_bad_model_exits_2(tmp_path, monkeypatch, ckpt):
    from fastapi.testclient import TestClient

    import gptlab.loader
    from gptlab.serve.app import ServeConfig, create_app

    gate = threading.Event()
    real = gptlab.loader.load_model
    monkeypatch.setattr(gptlab.loader, "load_model", lambda *a, **k: (gate.wait(30), real(*a, **k))[1])
    with TestClient(create_app(ServeConfig(model=str(ckpt), device="cpu", compile=False))) as tc:
        r = tc.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        assert tc.post("/v1/completions", json={"prompt": "hi"}).status_code == 503
        gate.set()
        deadline = time.time() + 30
        while tc.get("/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        assert tc.get("/health").status_code == 200
    r = subprocess.run(
        [sys.executable, "-m", "gptlab", "serve", str(tmp_path / "nope"), "--port", "0"],
        env=ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("gptlab: error: ")
    assert "Traceback" not in r.stderr


def test_clamp_max_tokens_and_a_jinja_chat_template(tmp_path, ckpt, loaded):
    from fastapi.testclient import TestClient

    from gptlab.serve.app import ServeConfig, create_app

    template = tmp_path / "chat.jinja"
    template.write_text(
        "{% for m in messages %}{% if m.role == 'system' %}{{ m.no.such.field }}{% endif %}"
        "<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    cfg = ServeConfig(model=str(ckpt), device="cpu", clamp_max_tokens=True, chat_template=str(template), compile=False)
    with TestClient(create_app(cfg)) as tc:
        deadline = time.time() + 60
        while tc.get("/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        long = "word " * 120
        n = len(loaded.tokenizer.encode(long))
        r = tc.post("/v1/completions", json={"prompt": long, "max_tokens": 50, "temperature": 0}).json()
        assert r["usage"]["completion_tokens"] <= BLOCK - n  # cut to the room left instead of a 400
        msgs = [{"role": "user", "content": "hi"}]
        want = "<user>hi<|endoftext|><assistant>"
        assert tc.post("/tokenize", json={"messages": msgs}).json()["tokens"] == loaded.tokenizer.encode(want)
        r = tc.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 3}).json()
        assert r["usage"]["prompt_tokens"] == len(loaded.tokenizer.encode(want))
        bad = tc.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}, *msgs]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"  # the template failed


@pytest.mark.slow
def test_load_32_streams_for_60_seconds(ckpt):
    """32 concurrent streaming clients for 60 s on loopback: no failed request, memory flat."""
    s = Served(ckpt, "--max-batch", "16")
    try:
        stop_at = time.time() + 60
        failures, done, rss = [], [0], []

        async def client_loop(ac, k):
            i = 0
            while time.time() < stop_at:
                body = {
                    "prompt": PROMPTS[(k + i) % len(PROMPTS)],
                    "max_tokens": 8 + (k * 7 + i) % 40,
                    "stream": True,
                    "temperature": 0.8,
                    "seed": k * 1000 + i,
                }
                try:
                    async with ac.stream("POST", s.url + "/v1/completions", json=body) as r:
                        lines = [x async for x in r.aiter_lines() if x.startswith("data: ")]
                    if r.status_code != 200 or lines[-1] != "data: [DONE]":
                        failures.append((r.status_code, lines[-2:]))
                    else:
                        done[0] += 1
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                i += 1

        async def sample_rss():
            while time.time() < stop_at:
                rss.append((time.time(), s.rss_mb()))
                await asyncio.sleep(2)

        async def main():
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(timeout=60, limits=limits) as ac:
                await asyncio.gather(sample_rss(), *[client_loop(ac, k) for k in range(32)])

        asyncio.run(main())
        assert not failures, failures[:3]
        assert done[0] > 100
        start = time.time()
        warm = [m for t, m in rss if t > stop_at - 45]  # after the first 15 s
        assert max(warm) - min(warm) < 40, rss  # MiB: no growth with the number of requests served
        assert time.time() - start < 5
    finally:
        s.stop()


def test_a_model_draft_serves_the_same_greedy_text(ckpt, loaded):
    """``serve --draft int8`` (the model's own int8 copy as the draft, in the scheduler): concurrent greedy
    completions equal the Engine's text without a draft, and /metrics counts the accepted proposals."""
    s = Served(ckpt, "--draft", "int8", "--spec-k", "4", "--served-model-name", "tiny")
    try:
        client = s.client()

        async def main():
            ac = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
            return await asyncio.gather(
                *[ac.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0) for p in PROMPTS]
            )

        got = [r.choices[0].text for r in asyncio.run(main())]
        assert got == [engine_text(loaded, p, 24, Sampling(temperature=0)).text for p in PROMPTS]
        one = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0)
        assert one.choices[0].text == got[0]
        assert metric(s, "gptlab_spec_accepted_tokens_total") > 0
    finally:
        s.stop()


# ---------------------------------------------------------------- real clients: hostile ids, limits, fairness,
# sockets that close, SIGTERM, and a fuzzer over the OpenAPI document


@pytest.mark.parametrize("bad", [-1, 50257, 2**63, 2**64 + 5])
@pytest.mark.parametrize("shape", ["ids", "lists"])
def test_token_ids_outside_the_vocabulary_are_a_400_even_with_echo(server, bad, shape):
    prompt = [1, bad] if shape == "ids" else [[1, 2], [bad]]
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "echo": True, "logprobs": 1}
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt"


def test_a_request_asking_for_more_choices_than_the_limit_is_a_400(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": ["a"] * 100, "max_tokens": 1})
    assert r.status_code == 400 and "--max-choices" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "prompt"
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": ["a"] * 8, "n": 8, "max_tokens": 1})
    assert r.status_code == 200, r.text  # 64 choices: the default limit, accepted
    assert len(r.json()["choices"]) == 64


def test_a_client_that_closes_its_socket_mid_request_frees_every_row(server):
    """A plain (non-streaming) request for 4 prompts x n=2 from a client that closes its TCP socket (not a
    timeout): every row is freed within 2 decode steps and the 4 requests count as cancelled."""
    import socket

    assert wait_idle(server)
    before = metric(server, 'gptlab_requests_total{outcome="cancelled"}')
    body = json.dumps({"model": "tiny", "prompt": ["a b"] * 4, "n": 2, "max_tokens": 120}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    deadline = time.time() + 10
    while metric(server, "gptlab_requests_running") == 0 and time.time() < deadline:
        time.sleep(0.005)
    assert metric(server, "gptlab_requests_running") > 0
    sock.close()
    assert wait_idle(server, 5)
    assert metric(server, 'gptlab_requests_total{outcome="cancelled"}') == before + 4
    assert_freed_within_two_steps(server)


def test_one_huge_request_does_not_starve_small_ones(ckpt):
    """With 2 rows, one request of 16 prompts and then 6 small requests one after another: rows go to the client
    holding the fewest, so each small request waits for at most one of the huge request's prompts, not all 16."""
    s = Served(ckpt, "--max-batch", "2", "--served-model-name", "tiny")
    try:
        huge = {"model": "tiny", "prompt": [f"story {i}:" for i in range(16)], "max_tokens": 60, "temperature": 0}
        done: dict[str, float] = {}

        def big():
            t0 = time.perf_counter()
            r = httpx.post(s.url + "/v1/completions", json=huge, timeout=120)
            assert r.status_code == 200, r.text
            done["huge"] = time.perf_counter() - t0
            done["huge_end"] = time.perf_counter()

        t = threading.Thread(target=big)
        t.start()
        deadline = time.time() + 10
        while metric(s, "gptlab_requests_running") < 2 and time.time() < deadline:
            time.sleep(0.005)
        small = []
        for i in range(6):
            t0 = time.perf_counter()
            r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": f"hi {i}", "max_tokens": 2})
            assert r.status_code == 200, r.text
            small.append((time.perf_counter() - t0, time.perf_counter()))
        t.join(120)
        assert all(end < done["huge_end"] for _, end in small), (small, done)  # none waited for the whole request
        assert max(lat for lat, _ in small) < 0.35 * done["huge"], (small, done)
    finally:
        s.stop()


def _stream(url, body, events, started):
    """Stream one completion into ``events``; release ``started`` once, when its first chunk arrives (not once per
    chunk: three releases must mean three streams running, not one stream's three chunks)."""
    lines = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                if len(lines) == 1:
                    started.release()
    events.append(lines)


def test_sigterm_lets_running_requests_finish_then_exits_0(ckpt):
    """SIGTERM with a grace period: the streams in flight finish whole (every token, then [DONE]), a plain request
    in flight gets its 200, a new request is refused (503, or no listener at all), and the process exits 0."""
    import signal

    s = Served(ckpt, "--max-batch", "4", "--served-model-name", "tiny", "--shutdown-grace", "30")
    events: list[list[str]] = []
    started = threading.Semaphore(0)
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 100, "temperature": 0, "stream": True}
    threads = [threading.Thread(target=_stream, args=(s.url, body, events, started)) for _ in range(3)]
    plain: list[httpx.Response] = []
    threads.append(
        threading.Thread(
            target=lambda: plain.append(
                httpx.post(s.url + "/v1/completions", json={**body, "stream": False}, timeout=60)
            )
        )
    )
    for t in threads:
        t.start()
    for _ in range(3):
        assert started.acquire(timeout=30)
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    try:
        late = httpx.post(s.url + "/v1/completions", json={**body, "stream": False}, timeout=10).status_code
    except httpx.TransportError:
        late = "refused"
    for t in threads:
        t.join(60)
    assert s.proc.wait(30) == 0
    assert late in (503, "refused"), late
    assert len(events) == 3
    for lines in events:
        assert lines[-1] == "[DONE]"
        chunks = [json.loads(x) for x in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop"), chunks[-1]
        assert not any("error" in c for c in chunks)
    assert plain and plain[0].status_code == 200, plain


def test_sigterm_past_the_grace_period_ends_every_stream_cleanly(ckpt):
    """With no grace, what is still running or waiting ends with an error event (code shutting_down) and
    [DONE], never a cut connection; the process exits 0."""
    import signal

    s = Served(ckpt, "--max-batch", "1", "--served-model-name", "tiny", "--shutdown-grace", "0")
    events: list[list[str]] = []
    started = threading.Semaphore(0)
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 120, "temperature": 0, "stream": True}
    threads = [threading.Thread(target=_stream, args=(s.url, body, events, started)) for _ in range(4)]
    for t in threads:
        t.start()
    assert started.acquire(timeout=30)  # the first stream runs; the other three wait for the one row
    time.sleep(0.05)
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert s.proc.wait(30) == 0
    assert len(events) == 4 and all(lines[-1] == "[DONE]" for lines in events), events
    ended = [json.loads(lines[-2]) for lines in events]
    assert sum(e.get("error", {}).get("code") == "shutting_down" for e in ended) >= 3, ended


def test_fuzzing_the_openapi_document_never_gets_a_500(ckpt, tmp_path):
    """schemathesis generates requests for every operation of the server's own /openapi.json (valid bodies, and
    bodies that break the schema, bounded per operation) against the real server: no answer is a 500, and every
    error is OpenAI's error object."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    s = Served(
        ckpt, "--max-batch", "4", "--max-choices", "8", "--served-model-name", "tiny", "--runs", str(tmp_path / "runs")
    )
    try:
        schema = schemathesis.openapi.from_url(s.url + "/openapi.json")
        seen: dict[str, int] = {}

        def fuzz(operation, mode):
            key = f"{operation.method.upper()} {operation.path} ({mode.value})"

            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=operation.as_strategy(mode))
            def check(case):
                r = case.call(base_url=s.url, timeout=60)
                seen[key] = seen.get(key, 0) + 1
                assert r.status_code < 500, (key, case.body, r.text[:300])
                if r.status_code >= 400 and "application/json" in str(r.headers.get("content-type")):
                    assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text[:300]

            check()

        for op in (r.ok() for r in schema.get_all_operations()):
            negative = op.method.lower() == "post"  # (a GET has no invalid form: any path is a name)
            for mode in schemathesis.GenerationMode if negative else [schemathesis.GenerationMode.POSITIVE]:
                fuzz(op, mode)  # valid requests, and requests that break the schema
        assert {"POST /v1/completions (negative)", "POST /v1/chat/completions (positive)"} <= set(seen), seen
        assert "GET /api/runs/{name} (positive)" in seen, seen
        print("fuzzed:", json.dumps(seen))  # (docs/reliability.md quotes these counts)
    finally:
        s.stop()


EXAMPLES = 40  # generated requests per operation


def test_lm_eval_local_completions_through_the_server_equals_gptlab_eval(server, loaded, tmp_path, monkeypatch):
    """lm-evaluation-harness's own ``local-completions`` model (log-likelihoods from ``echo`` + ``logprobs`` on
    ``/v1/completions``, the tokenizer read through ``/tokenizer_info`` and ``/tokenize``), 4 concurrent requests
    of 3 prompts each, on a LAMBADA-style task and a multiple-choice task: every example's log-likelihood and
    greedy flag equal gptlab's scoring of the same model, and the accuracies equal ``gptlab eval``'s."""
    lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval extra is part of the dev install")
    for module in ("aiohttp", "tenacity"):
        pytest.importorskip(module, reason="lm-eval's API models need lm-eval[api]")
    from gptlab.eval.tasks import multiple_choice

    from .conftest import assert_lambada_equals_lm_eval, lm_eval_tasks, synthetic_text

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    sentences = [s.strip() for s in synthetic_text(200).split(".") if len(s.split()) >= 6][:14]
    passages = [{"text": s} for s in sentences]
    mc = [
        {"context": "The cat sat on the", "choices": ["mat", "quantum chromodynamics", "sofa"], "label": 0},
        {"context": "In the morning I drink", "choices": ["coffee with milk", "tea", "the ocean"], "label": 1},
        {"context": "Water boils at one hundred", "choices": ["degrees", "bananas"], "label": 0},
        {"context": "Once upon a", "choices": ["time", "spreadsheet", "river bank"], "label": 0},
    ]
    tasks = lm_eval_tasks(tmp_path, lambada=passages, mc=mc)
    from lm_eval.models.openai_completions import LocalCompletionsAPI  # what model="local-completions" names

    lm = LocalCompletionsAPI(
        base_url=f"{server.url}/v1/completions", model="tiny", tokenizer_backend="remote", num_concurrent=4,
        batch_size=3,
    )  # fmt: skip
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["gl_lambada", "gl_mc"],
        task_manager=tasks,
        log_samples=True,
    )
    tok = loaded.tokenizer
    assert len(out["samples"]["gl_lambada"]) == len(passages)
    assert_lambada_equals_lm_eval(out, loaded.model, tok, tmp_path / "lambada.jsonl", 1e-4)
    ours_mc = multiple_choice(loaded.model, tok, path=str(tmp_path / "mc.jsonl"))
    assert ours_mc["acc"] == pytest.approx(out["results"]["gl_mc"]["acc,none"])
    assert ours_mc["acc_norm"] == pytest.approx(out["results"]["gl_mc"]["acc_norm,none"])
