"""The page of ``gptlab serve`` (playground, chat, runs) in a real headless Chromium driven by Playwright, against a
live server on 127.0.0.1 and with mocked responses; and the runs endpoints' refusal of paths outside DIR.

Chromium is Debian's ``chromium`` package (``playwright install`` downloads browsers and cannot here); without it,
or without the ``playwright`` package, the browser tests skip with the reason. Screenshots of every view go to
``.artifacts/screenshots/`` (not committed)."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from gptlab.metrics import read_rows
from gptlab.train.trainer import train

from .conftest import REPO, Served, random_gpt2_checkpoint, tiny_cfg

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

SHOTS = Path(os.environ.get("GPTLAB_SCREENSHOTS", REPO / ".artifacts" / "screenshots"))


def chromium_path():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, char_data):
    root = tmp_path_factory.mktemp("runs")
    train(tiny_cfg(char_data, root / "small", max_iters=30, eval_interval=10, checkpoint_interval=30), progress=False)
    train(
        tiny_cfg(
            char_data,
            root / "group" / "wide",
            max_iters=20,
            eval_interval=10,
            checkpoint_interval=20,
            model_overrides={"n_embd": 96},
        ),
        progress=False,
    )
    (root / "not-a-run").mkdir()
    (root / "not-a-run" / "notes.txt").write_text("secret")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, runs_dir):
    # a context of 1024 so that a long stream lasts long enough to be stopped by hand
    ckpt = random_gpt2_checkpoint(tmp_path_factory.mktemp("page") / "tiny", 1024)
    s = Served(ckpt, "--runs", str(runs_dir), "--served-model-name", "tiny")
    yield s
    s.stop()


def test_runs_endpoints_list_runs_and_refuse_other_paths(server, runs_dir, tmp_path):
    r = httpx.get(server.url + "/api/runs").json()
    assert [x["name"] for x in r["runs"]] == ["group/wide", "small"]
    one = httpx.get(server.url + "/api/runs/small").json()
    rows = read_rows(runs_dir / "small" / "metrics.jsonl")
    assert len(one["train"]) == sum("loss" in x for x in rows) == 30
    assert len(one["val"]) == sum("val_loss" in x for x in rows)
    assert one["train_config"]["max_iters"] == 30 and one["model_config"]["n_embd"] == 64
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (runs_dir / "link").symlink_to(outside)
    for bad, status in [
        ("../outside", 400),
        ("small/../../outside", 400),
        ("%2e%2e/outside", 400),
        (str(outside), 400),
        ("link", 400),
        ("not-a-run", 404),
        ("nothing", 404),
        ("small/checkpoints", 404),
        ("small%00", 400),
        ("x" * 5000, 400),  # longer than any name a filesystem takes: still a 400, never a 500 naming a path
        ("a/" * 300 + "b", 400),
        ("y" * 300, 400),
    ]:
        resp = httpx.get(server.url + "/api/runs/" + bad)  # (httpx removes a literal ../ itself: then a 404)
        assert resp.status_code in (status, 404), (bad, resp.status_code, resp.text)
        if "%" in bad:
            assert resp.status_code == status, (bad, resp.text)
        assert "secret" not in resp.text and "loss" not in resp.text.replace("metrics", "")
        assert str(runs_dir) not in resp.text and str(tmp_path) not in resp.text
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    (runs_dir / "link").unlink()


def test_the_page_is_one_offline_file(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert len(r.content) <= 150_000
    # no network fetch but this server's own endpoints: no absolute URLs in src/href/fetch
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    assert "<script src" not in page and "<link" not in page


# ---------------------------------------------------------------------------------------------- in the browser
@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra has it)")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no Chromium: apt-get install chromium (playwright install cannot download here)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"], headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, errors


def shot(page, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def running(server):
    return server.metrics().get("gptlab_requests_running", 0.0)


def set_field(page, field, value):
    page.fill(f"#{field}", str(value))


def test_playground_streams_in_order_and_tokens_show_their_alternatives(server, page):
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
    page.fill("#prompt", "Hello, my name is")
    for field, value in {"temperature": 0, "max_tokens": 24, "logprobs": 4, "top_k": 0, "n": 1}.items():
        set_field(page, field, value)
    page.evaluate("""() => { window.snapshots = [];
        new MutationObserver(() => window.snapshots.push(document.querySelector('#outputs .out')?.textContent || ''))
          .observe(document.getElementById('outputs'), {childList: true, subtree: true, characterData: true}); }""")
    page.click("#generate")
    page.wait_for_selector("#outputs .finish")
    api = httpx.post(
        server.url + "/v1/completions",
        json={"model": "tiny", "prompt": "Hello, my name is", "max_tokens": 24, "temperature": 0, "logprobs": 4},
        timeout=60,
    ).json()["choices"][0]
    text = page.eval_on_selector_all("#outputs .out .tok", "els => els.map(e => e.textContent).join('')")
    assert text == api["text"]
    snaps = [s for s in page.evaluate("window.snapshots") if s]
    final = "Hello, my name is" + api["text"]
    assert len(set(snaps)) >= 3  # it streamed: the text grew in several steps...
    assert all(final.startswith(s.split("finish_reason")[0]) for s in snaps)  # ...and always in order
    # hover a token: its alternatives are the API's top logprobs for that position
    spans = page.query_selector_all("#outputs .tok")
    index = {}  # span -> its first token's position
    pos = 0
    for s in spans:
        n = int(s.get_attribute("data-count"))
        index[s] = (pos, n)
        pos += n
    target = next(s for s in spans[2:] if index[s][1] == 1)
    target.hover()
    page.wait_for_selector("#tip tr.alt")
    alts = page.eval_on_selector_all("#tip tr.alt", "rs => rs.map(r => [r.dataset.token, Number(r.dataset.logprob)])")
    want = api["logprobs"]["top_logprobs"][index[target][0]]
    assert len(alts) == len(want) and dict(alts) == pytest.approx(want, abs=1e-6)
    shown = page.eval_on_selector("#tip tr.chosen", "e => Number(e.dataset.logprob)")
    assert shown == pytest.approx(api["logprobs"]["token_logprobs"][index[target][0]], abs=1e-6)
    assert "TTFT" in page.text_content("#play-stats") and "tok/s" in page.text_content("#play-stats")
    shot(page, "playground")


def test_stop_aborts_and_the_server_frees_the_row(server, page):
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
    page.fill("#prompt", "x")
    set_field(page, "max_tokens", 1000)
    set_field(page, "temperature", 1)
    set_field(page, "n", 2)
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#outputs .tok').length > 5")
    assert running(server) == 1
    page.click("#stop-btn")
    t0 = time.time()
    while running(server) and time.time() - t0 < 1.0:
        time.sleep(0.02)
    assert running(server) == 0, "the row was not freed within 1 s of Stop"
    page.wait_for_function("document.getElementById('play-stats').textContent.includes('stopped')")
    assert not page.query_selector("#outputs .finish")


def test_chat_completes_a_turn(server, page):
    page.goto(server.url + "/#chat")
    page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
    set_field(page, "chat-temperature", 0)
    set_field(page, "chat-max-tokens", 12)
    page.fill("#chat-input", "Hello there")
    page.press("#chat-input", "Enter")
    page.wait_for_function("!document.getElementById('send').disabled && document.querySelectorAll('.msg').length == 2")
    api = httpx.post(
        server.url + "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hello there"}],
            "max_tokens": 12,
            "temperature": 0,
        },
        timeout=60,
    ).json()
    assert page.text_content(".msg.assistant .text") == api["choices"][0]["message"]["content"]
    assert page.text_content(".msg.user .text") == "Hello there"
    shot(page, "chat")


def test_runs_view_draws_every_point(server, page, runs_dir):
    page.goto(server.url + "/#runs")
    page.wait_for_selector("#chart polyline.train")
    rows = read_rows(runs_dir / "group" / "wide" / "metrics.jsonl")  # the first run listed is selected
    line = page.query_selector("#chart polyline.train")
    assert int(line.get_attribute("data-points")) == sum("loss" in r for r in rows) == 20
    assert len(line.get_attribute("points").split()) == 20
    assert len(page.query_selector_all("#chart circle.val")) == sum("val_loss" in r for r in rows)
    page.check("#runlist input[value='small']")  # compare two runs on one chart
    page.wait_for_function("document.querySelectorAll('#chart polyline.train').length == 2")
    page.hover("#chart", position={"x": 400, "y": 200})
    assert "train" in page.text_content("#chart-hover")
    assert '"max_iters": 30' in page.text_content("#run-details")
    shot(page, "runs")


# ---------------------------------------------------------------------------------------------- mocked responses
def api_error(route, status, message, type, param=None, code=None):
    """Answer a routed request with OpenAI's error object, as the server would."""
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    route.fulfill(status=status, content_type="application/json", body=json.dumps(body))


def test_loading_banner_api_errors_and_an_unreachable_server(server, page):
    loading = "the model is still loading; retry shortly"
    page.route("**/health", lambda r: api_error(r, 503, loading, "service_unavailable", code="loading"))
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('banner').textContent.includes('loading')")
    shot(page, "loading")
    page.unroute("**/health")
    page.wait_for_function("document.getElementById('banner').style.display == 'none'", timeout=10_000)
    too_hot = "temperature: Input should be less than or equal to 2"
    page.route("**/v1/completions", lambda r: api_error(r, 400, too_hot, "invalid_request_error", "temperature"))
    page.click("#generate")
    page.wait_for_function("document.getElementById('play-error').textContent.includes('less than or equal to 2')")
    assert "param: temperature" in page.text_content("#play-error")
    page.route("**/health", lambda r: r.abort())
    page.wait_for_function("document.getElementById('banner').textContent.includes('unreachable')", timeout=10_000)
    shot(page, "unreachable")
