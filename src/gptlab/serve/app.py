"""The HTTP API of ``gptlab serve``: OpenAI's completions and chat completions over the continuous-batching
:class:`~gptlab.serve.scheduler.Scheduler`, plus ``/v1/models``, ``/health``, ``/metrics``, ``/tokenize`` and
``/detokenize`` (vLLM's names).

Responses follow OpenAI's schemas (API reference: "Completions", "Chat", "Streaming"): ``id``, ``object``,
``created``, ``model``, ``choices[].index`` (prompt ``i``'s choice ``j`` is ``i * n + j``), ``finish_reason``
``stop`` or ``length``, and ``usage``. Streams are server-sent events ending with ``data: [DONE]``; a streamed
choice's text pieces are whole UTF-8 characters and concatenate to the non-streamed text. ``usage`` counts the
prompt tokens once per prompt and every generated token (the end-of-text token that ends a choice included).

Every error is ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad parameter (FastAPI's own
validation errors too, with ``param`` the field), 401 without the ``--api-key``, 404 for an unknown model or path,
413 for a body over ``--max-body-bytes``, 429 when the queue is full, 503 while the model loads, 500 otherwise.

A request whose client disconnects, streaming or not, is cancelled: its rows are free before the next decode step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import ChatTemplate
from ..errors import GptlabError
from ..files import describe_os_error
from ..generate import Sampling
from ..generate.constraint import Grammar, compile_constraint
from ..tokenizer import prompt_ids
from .config import MAX_N, ServeConfig
from .metrics import ServeMetrics
from .protocol import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, _Common, error_body
from .runs import add_routes as add_runs
from .scheduler import Cancelled, Chunk, InvalidRequest, QueueFull, Scheduler, TokenLogprob
from .scheduler import Request as GenRequest
from .tools import CallStream, forced_call_grammar, split_calls

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}
log = logging.getLogger("gptlab.serve")
DISCONNECT_POLL = 0.02  # seconds between checks that a client is still there
PAGE = Path(__file__).with_name("static") / "index.html"  # the playground and run viewer (docs/serving.md)
OPEN_PATHS = ("/", "/health", "/openapi.json")  # answered without the API key: the page asks for it, probes need
# health, and the API's description holds nothing secret


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, ERROR_TYPES.get(status, "invalid_request_error"), param, code), status)


class Server:
    """The loaded model behind the routes: the scheduler, its tokenizer, the chat template and the metrics."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.metrics = ServeMetrics()
        self.template = ChatTemplate(cfg.chat_template)
        self.scheduler: Scheduler | None = None
        self.load_error: str | None = None
        self.on_loaded: Callable[[str | None], None] | None = None  # called with the error, or None when ready
        self.created = int(time.time())
        self.draining = False
        self.models = [cfg.name]  # the base, then each --lora adapter: a request's `model` picks one

    def drain(self, grace: float) -> None:
        """Shut down gracefully (on SIGTERM): new requests get 503 from now on; the running ones may finish for
        ``grace`` seconds, after which those still running end cleanly (a stream with an error event and
        ``[DONE]``, a plain request with 503)."""
        if self.draining:
            return
        self.draining = True

        def end() -> None:
            time.sleep(grace)
            if self.scheduler is not None:
                self.scheduler.close()

        threading.Thread(target=end, name="gptlab-drain", daemon=True).start()

    def load(self, loaded: Any = None) -> None:
        """Load the model (in the background while ``/health`` answers 503), then start the scheduler."""
        try:
            from ..loader import load_draft, load_model

            if loaded is None:
                loaded = load_model(self.cfg.model, self.cfg.device, quantize=self.cfg.quantize)
            if self.cfg.lora:
                from ..interop.peft import read_adapter
                from ..lora import attach_bank

                names, found = [self.cfg.name], []
                for name, _, source in (x.partition("=") for x in self.cfg.lora):
                    try:
                        found.append(read_adapter(source, loaded.model.config))
                    except GptlabError as e:
                        raise GptlabError(f"--lora {name}={source}: {e}") from None
                    names.append(name)
                attach_bank(loaded.model, found)
                self.models = names
            self.tokenizer = loaded.tokenizer
            self.template = ChatTemplate.of(loaded.tokenizer, self.cfg.chat_template)  # the model's own, if any
            self.block = loaded.model.config.block_size
            if self.cfg.compiles:  # (after the model loaded: bad input still gets its one line alone)
                print(
                    "gptlab: compiling the decode step of a lone stream before serving (--compile in `gptlab serve "
                    "--help` says how long; --no-compile skips it)",
                    file=sys.stderr,
                    flush=True,
                )
            sched = Scheduler(
                loaded.model,
                loaded.tokenizer,
                self.cfg.max_batch,
                self.cfg.max_queue,
                self.cfg.prefill_chunk,
                self.metrics,
                compile=self.cfg.compiles,
                draft=load_draft(self.cfg.draft, loaded) if self.cfg.draft else None,
                spec_k=self.cfg.spec_k,
                prefix_block=self.cfg.prefix_block,
                prefix_cache_mb=self.cfg.prefix_cache_mb if self.cfg.prefix_cache else 0,
                max_request_seconds=self.cfg.max_request_seconds,
            )
            self.metrics.watch(sched)
            self.scheduler = sched
        except GptlabError as e:
            self.load_error = str(e)
        except OSError as e:
            self.load_error = describe_os_error(e)
        except Exception as e:  # reported on /health and by the CLI, not lost in a thread
            self.load_error = f"{type(e).__name__}: {e}"
        if self.on_loaded is not None:
            self.on_loaded(self.load_error)

    def ready(self) -> Scheduler:
        if self.draining:
            raise ApiError(
                503, "the server is shutting down; send the request to another instance", code="shutting_down"
            )
        if self.scheduler is None:
            if self.load_error:  # (the message itself, which may name files, is on the server's console)
                raise ApiError(503, "the model failed to load; the server's log says why", code="load_failed")
            raise ApiError(503, "the model is still loading; retry shortly", code="loading")
        return self.scheduler

    def check_model(self, model: str | None) -> int:
        """The adapter a request's ``model`` names (0: the base model, also when it names none)."""
        if model is None:
            return 0
        if model not in self.models:
            served = ", ".join(repr(m) for m in self.models)
            raise ApiError(
                404, f"model {model!r} is not served here; this server serves {served}", "model", "model_not_found"
            )
        return self.models.index(model)

    def encode(self, text: str, after_image: bool = False) -> list[int]:
        return prompt_ids(self.tokenizer, text, after_image)

    def render(self, messages: Sequence[Any], tools: list[dict[str, Any]] | None = None) -> str:
        """The chat template's text for ``messages`` (and ``tools``); a template that fails on them is the client's
        400."""
        try:
            return self.template.render([m.for_template() for m in messages], tools=tools)
        except GptlabError as e:
            raise ApiError(400, str(e), "messages") from None

    def image(self, messages: Sequence[Any]):
        """The request's image (OpenAI's ``image_url`` content part, as a base64 data URI) as the model's input
        [1, channels, size, size], or None. A gptlab model reads one image, before the whole conversation."""
        urls = [u for m in messages for u in m.image_urls()]
        if not urls:
            return None
        cfg = self.ready().model.config
        if not cfg.image_size:
            raise ApiError(400, "this model takes no images; send text content only", "messages")
        if len(urls) > 1:
            raise ApiError(400, f"{len(urls)} images in one request; a gptlab model reads one", "messages")
        from ..data.image_files import decode_data_uri, to_tensor

        try:
            return to_tensor(decode_data_uri(urls[0], cfg.image_size, cfg.image_channels))
        except GptlabError as e:
            raise ApiError(400, str(e), "messages") from None

    def token_text(self, t: int) -> str:
        return self.tokenizer.decode([t])

    def token_bytes(self, t: int) -> list[int]:
        enc = getattr(self.tokenizer, "enc", None)  # tiktoken knows a token's exact bytes, even a partial character
        return list(enc.decode_single_token_bytes(t) if enc is not None else self.token_text(t).encode())


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is a 413, declared (Content-Length) or streamed."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_response(
            413,
            f"the request body is larger than this server's limit of {self.limit} bytes (--max-body-bytes)",
            code="body_too_large",
        )
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode()
        if declared.isdigit() and int(declared) > self.limit:
            return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_big(scope, receive, send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(cfg: ServeConfig, loaded: Any = None) -> FastAPI:
    """The ASGI app. The model loads in a thread at start-up (``loaded`` skips that: an already loaded model)."""
    server = Server(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        thread = threading.Thread(target=server.load, args=(loaded,), daemon=True)
        thread.start()
        app.state.load_thread = thread
        yield
        if server.scheduler is not None:
            server.scheduler.close()

    app = FastAPI(title="gptlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if err.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", None, "invalid_json")
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        return error_response(400, f"{param}: {msg}" if param else msg, loc[0] if loc else None, "invalid_parameter")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = "no such endpoint" if e.status_code == 404 else str(e.detail)
        return error_response(e.status_code, f"{message}: {request.method} {request.url.path}")

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        # the details (which may name files on this machine) go to the server's log, never to the client
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=e)
        return error_response(500, "internal error; the server's log has the details", code="internal_error")

    if cfg.api_key:
        key = cfg.api_key.encode()

        @app.middleware("http")
        async def _auth(request: Request, call_next: Callable) -> Response:
            if request.url.path not in OPEN_PATHS:
                given = request.headers.get("authorization", "")
                token = given[7:].encode() if given[:7].lower() == "bearer " else b""
                if not hmac.compare_digest(token, key):
                    return error_response(
                        401, "missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key"
                    )
            return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        server.ready()
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> Response:
        server.ready()
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": name,
                        "object": "model",
                        "created": server.created,
                        "owned_by": "gptlab",
                        "max_model_len": server.block,
                        "root": name,  # (vLLM puts an adapter's path here; a client never sees a local path)
                        "parent": None if k == 0 else cfg.name,  # vLLM's field for a LoRA adapter
                    }
                    for k, name in enumerate(server.models)
                ],
            }
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Response:
        server.ready()
        server.check_model(body.model)
        text = body.prompt if body.prompt is not None else server.render(body.messages or [])
        ids = server.tokenizer.encode(text)
        bos = getattr(server.tokenizer, "bos_id", None)
        if body.add_special_tokens and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": server.block})

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> Response:
        """vLLM's endpoint, which lm-eval's ``local-completions`` (``tokenizer_backend=remote``) reads."""
        server.ready()
        tok = server.tokenizer
        bos = getattr(tok, "bos_id", None)
        return JSONResponse(
            {
                "eos_token": tok.decode([tok.eot_id]),
                "bos_token": tok.decode([bos]) if bos is not None else None,
                "pad_token": None,
                "chat_template": server.template.text,
                "model_max_length": server.block,
                "vocab_size": tok.vocab_size,
            }
        )

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Response:
        sched = server.ready()
        server.check_model(body.model)
        if any(not 0 <= t < sched.vocab for t in body.tokens):
            raise ApiError(400, f"a token id is outside the vocabulary of {sched.vocab}", "tokens")
        return JSONResponse({"prompt": server.tokenizer.decode(body.tokens)})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompts = _prompt_ids(server, body.prompt)
        job = _Run(server, body, prompts, stop=body.stop_list(), logprobs=body.logprobs, echo=body.echo)
        echo = [server.tokenizer.decode(p) for p in prompts] if body.echo else None  # ids checked by the _Run
        return await job.respond(request, "cmpl", _CompletionFormat(server, body, echo))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        server.ready()
        try:
            mode, forced = body.tool_mode()
        except ValueError as e:
            raise ApiError(400, str(e), "tool_choice") from None
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []] if mode != "none" else None
        if tools and not server.template.renders_tools:
            raise ApiError(
                400,
                "this model's chat template does not render tools; serve it with --chat-template FILE, a template "
                "that reads `tools` (the Hermes / Qwen2.5 format)",
                "tools",
            )
        image = server.image(body.messages)
        text = server.render(body.messages, tools)
        prompts = [server.encode(text, image is not None)]
        lp = (body.top_logprobs or 0) if body.logprobs else None
        call = ("grammar", forced_call_grammar(tools or [], forced), "tool_choice") if mode == "forced" else None
        stop = body.stop_list() + server.template.stop
        job = _Run(server, body, prompts, stop=stop, logprobs=lp, image=image, constraint=call)
        return await job.respond(request, "chatcmpl", _ChatFormat(server, body, tools=mode != "none"))

    @app.get("/")
    async def page() -> Response:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    if cfg.runs is not None:
        add_runs(app, Path(cfg.runs), error_response)
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    return app


def _prompt_ids(server: Server, prompt: Any) -> list[list[int]]:
    """The token ids of each prompt: a string, a list of strings, a list of ids, or a list of lists of ids."""
    server.ready()
    if isinstance(prompt, str):
        return [server.encode(prompt)]
    if not prompt:
        raise ApiError(400, "prompt is an empty list; send a string or token ids", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [server.encode(p) if isinstance(p, str) else list(p) for p in prompt]


class _Run:
    """One HTTP request's generation: a scheduler request per prompt (each with ``n`` choices), merged."""

    def __init__(
        self,
        server: Server,
        body: _Common,
        prompts: list[list[int]],
        stop: Sequence[str],
        logprobs: int | None,
        echo: bool = False,
        image: Any = None,
        constraint: tuple[str, Any, str] | None = None,
    ) -> None:
        """``constraint``: a structured-output constraint of the server's own (a forced tool call), which the
        request's ``response_format`` and ``structured_outputs`` may not be combined with."""
        sched = server.ready()
        adapter = server.check_model(body.model)
        refused = body.refused()
        if refused:
            raise ApiError(400, refused[1], refused[0], "unsupported_parameter")
        most = min(server.cfg.max_n or MAX_N, sched.max_batch)
        if body.n > most:
            raise ApiError(400, f"n must be at most {most} on this server (--max-n), got {body.n}", "n")
        if len(prompts) * body.n > server.cfg.max_choices:
            raise ApiError(
                400,
                f"{len(prompts)} prompt(s) x n={body.n} ask for {len(prompts) * body.n} choices, more than this "
                f"server's limit of {server.cfg.max_choices} per request (--max-choices); split the request",
                "prompt" if len(prompts) > 1 else "n",
            )
        grammar = self._grammar(server, body, sched.vocab, constraint)
        client = secrets.token_hex(8)  # this request's prompts share rows fairly with other requests
        sampling = Sampling(
            temperature=body.temperature,
            top_k=body.top_k if body.top_k > 0 else None,
            top_p=body.top_p if body.top_p < 1 else None,
            min_p=body.min_p or None,
            repetition_penalty=body.repetition_penalty,
        )
        self.server, self.body, self.prompts, self.sched = server, body, prompts, sched
        self.requests = []
        for p in prompts:
            max_tokens = body.max_tokens
            used = len(p) + (0 if image is None else sched.model.config.image_tokens)
            if server.cfg.clamp_max_tokens and max_tokens is not None and used + max_tokens > server.block:
                max_tokens = max(0, server.block - used)
            r = GenRequest(
                p,
                max_tokens,
                sampling,
                body.seed,
                body.n,
                stop,
                None,
                logprobs,
                echo and logprobs is not None,
                image=image,
                client=client,
                grammar=grammar,
                adapter=adapter,
            )
            try:
                r.max_tokens = sched.check(r)
            except InvalidRequest as e:
                raise ApiError(400, str(e), e.param) from None
            self.requests.append(r)

    @staticmethod
    def _grammar(server: Server, body: _Common, vocab: int, constraint: tuple[str, Any, str] | None) -> Grammar | None:
        """The request's structured-output constraint, compiled; anything that cannot be enforced is a 400."""
        try:
            asked = body.constraint()
        except ValueError as e:  # (a string given as a JSON schema that is not JSON, too)
            raise ApiError(400, str(e).splitlines()[0], "structured_outputs") from None
        if constraint is not None and asked is not None:
            raise ApiError(400, f"{asked[2]} cannot be combined with a forced tool call (tool_choice)", asked[2])
        asked = asked or constraint
        if asked is None:
            return None
        kind, spec, param = asked
        if body.stop_list():
            raise ApiError(
                400, "stop strings would cut a structured output; its grammar ends it, leave stop unset", "stop"
            )
        try:
            return compile_constraint(kind, spec, server.tokenizer, vocab)
        except GptlabError as e:
            raise ApiError(400, str(e), param) from None

    def _start(self) -> list[AsyncIterator[Chunk]]:
        streams: list[AsyncIterator[Chunk]] = []
        try:
            for r in self.requests:
                streams.append(self.sched.submit(r))
        except QueueFull as e:  # (the requests were checked in __init__: nothing else can be refused here)
            self._cancel_all()
            raise ApiError(429, str(e), code="queue_full") from None
        return streams

    async def chunks(self, streams: list[AsyncIterator[Chunk]]) -> AsyncGenerator[tuple[int, int, Chunk], None]:
        """(prompt number, first choice index of that prompt, chunk) in the order they are produced."""
        if len(streams) == 1:
            async for c in streams[0]:
                yield 0, 0, c
            return
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def pump(i: int, it: AsyncIterator[Chunk]) -> None:
            try:
                async for c in it:
                    queue.put_nowait((i, c))
                queue.put_nowait((i, None))
            except Exception as e:
                queue.put_nowait((i, e))

        tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, i * self.body.n, item
        finally:
            for t in tasks:
                t.cancel()

    async def _watch(self, request: Request) -> None:
        """Cancel the generation when the client goes away (uvicorn reports it as ``http.disconnect``)."""
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL)
        self._cancel_all()

    def _cancel_all(self) -> None:
        for r in self.requests:  # a finished request's id is ignored
            self.sched.cancel(r.id)

    async def respond(self, request: Request, prefix: str, fmt: _Format) -> Response:
        rid = f"{prefix}-{secrets.token_hex(12)}"
        created = int(time.time())
        usage = {"prompt_tokens": sum(len(p) for p in self.prompts), "completion_tokens": 0}
        head = {"id": rid, "object": fmt.object, "created": created, "model": self.body.model or self.server.cfg.name}

        def counted(c: Chunk) -> Chunk:
            if c.index >= 0:
                usage["completion_tokens"] += len(c.tokens)
            return c

        def usage_dict() -> dict[str, int]:
            return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}

        gen = self.chunks(self._start())  # submitted now: a full queue is a 429, not a broken stream
        if self.body.stream:

            async def events() -> AsyncIterator[str]:
                watch = asyncio.ensure_future(self._watch(request))
                try:
                    for piece in fmt.opening(len(self.prompts) * self.body.n):
                        yield _sse({**head, "object": fmt.chunk_object, **piece})
                    async for i, base, c in gen:
                        for piece in fmt.stream_pieces(i, base, counted(c), self.body.n):
                            yield _sse(
                                {
                                    **head,
                                    "object": fmt.chunk_object,
                                    **piece,
                                    **({"usage": None} if self.body.include_usage else {}),
                                }
                            )
                    if self.body.include_usage:
                        yield _sse({**head, "object": fmt.chunk_object, "choices": [], "usage": usage_dict()})
                except Cancelled as e:  # the server is shutting down and the grace period is over
                    yield _sse(error_body(str(e), ERROR_TYPES[503], code="shutting_down"))
                except Exception as e:  # the stream has started: report in the stream, as OpenAI does
                    yield _sse(error_body(f"generation failed: {e}", "internal_error"))
                finally:
                    watch.cancel()
                    await gen.aclose()
                yield "data: [DONE]\n\n"

            return _Stream(
                events(),
                self._cancel_all,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        collected: list[tuple[int, int, Chunk]] = []

        async def collect() -> None:
            async for item in gen:
                collected.append((item[0], item[1], counted(item[2])))

        task = asyncio.ensure_future(collect())
        watch = asyncio.ensure_future(self._watch(request))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not task.done():  # the client left
            task.cancel()
            return Response(status_code=499)
        try:
            task.result()  # re-raise a failure (an ApiError from submit becomes its status)
        except Cancelled as e:  # the server is shutting down and the grace period is over
            raise ApiError(503, str(e), code="shutting_down") from None
        return JSONResponse(
            {**head, "choices": fmt.choices(collected, len(self.prompts), self.body.n), "usage": usage_dict()}
        )


class _Stream(StreamingResponse):
    """A streaming response that cancels its generation however it ends, even when the client left before the
    first byte (then the body's generator never starts, so its own cleanup never runs)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kw: Any) -> None:
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Format:
    """How chunks become one API's response objects."""

    object = ""
    chunk_object = ""

    def __init__(self, server: Server) -> None:
        self.server = server

    def opening(self, choices: int) -> list[dict[str, Any]]:
        return []

    def stream_pieces(self, i: int, base: int, c: Chunk, n: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def choices(self, collected: list[tuple[int, int, Chunk]], prompts: int, n: int) -> list[dict[str, Any]]:
        raise NotImplementedError


class _CompletionFormat(_Format):
    """``/v1/completions``: text, legacy logprobs (tokens, token_logprobs, top_logprobs, text_offset), echo."""

    object = chunk_object = "text_completion"

    def __init__(self, server: Server, body: CompletionRequest, echo: list[str] | None) -> None:
        super().__init__(server)
        self.logprobs, self.echo = body.logprobs, echo
        self.offsets: dict[int, int] = {}  # choice -> characters of text so far (for text_offset)

    def _lp(self, index: int, lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if self.logprobs is None or lps is None:
            return None
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in lps:
            text = self.server.token_text(t.token)
            out["tokens"].append(text)
            out["token_logprobs"].append(None if t.logprob != t.logprob else t.logprob)  # NaN: the first prompt token
            out["top_logprobs"].append(
                None if t.logprob != t.logprob else {self.server.token_text(a): v for a, v in t.top}
            )
            out["text_offset"].append(self.offsets.get(index, 0))
            self.offsets[index] = self.offsets.get(index, 0) + len(text)
        return out

    def opening(self, choices: int) -> list[dict[str, Any]]:
        if self.echo is None or self.logprobs is not None:
            return []  # with logprobs the prompt is echoed when its logprobs arrive
        n = choices // len(self.echo)
        return [
            {"choices": [{"index": i, "text": self.echo[i // n], "logprobs": None, "finish_reason": None}]}
            for i in range(choices)
        ]

    def _echo_choices(self, i: int, base: int, c: Chunk, n: int) -> list[dict[str, Any]]:
        assert self.echo is not None
        return [
            {"index": base + j, "text": self.echo[i], "logprobs": self._lp(base + j, c.logprobs), "finish_reason": None}
            for j in range(n)
        ]

    def stream_pieces(self, i: int, base: int, c: Chunk, n: int) -> list[dict[str, Any]]:
        if c.index < 0:
            return [{"choices": self._echo_choices(i, base, c, n)}]
        if not (c.text or c.finish_reason or (self.logprobs is not None and c.tokens)):
            return []
        index = base + c.index
        return [
            {
                "choices": [
                    {
                        "index": index,
                        "text": c.text,
                        "logprobs": self._lp(index, c.logprobs),
                        "finish_reason": c.finish_reason,
                    }
                ]
            }
        ]

    def choices(self, collected: list[tuple[int, int, Chunk]], prompts: int, n: int) -> list[dict[str, Any]]:
        out = [
            {
                "index": k,
                "text": self.echo[k // n] if self.echo and self.logprobs is None else "",
                "logprobs": None,
                "finish_reason": None,
            }
            for k in range(prompts * n)
        ]
        for i, base, c in collected:
            for piece in self.stream_pieces(i, base, c, n):
                for p in piece["choices"]:
                    o = out[p["index"]]
                    o["text"] += p["text"]
                    o["finish_reason"] = p["finish_reason"] or o["finish_reason"]
                    if p["logprobs"] is not None:
                        if o["logprobs"] is None:
                            o["logprobs"] = {k: [] for k in p["logprobs"]}
                        for k, v in p["logprobs"].items():
                            o["logprobs"][k] += v
        return out


class _ChatFormat(_Format):
    """``/v1/chat/completions``: an assistant message (or deltas), logprobs as ``content`` entries with bytes."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, server: Server, body: ChatRequest, tools: bool = False) -> None:
        super().__init__(server)
        self.logprobs = body.logprobs
        self.tools = tools  # parse the Hermes-format calls out of the text (gptlab.serve.tools)
        self.streams: dict[int, CallStream] = {}

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        return {"token": self.server.token_text(token), "logprob": logprob, "bytes": self.server.token_bytes(token)}

    def _lp(self, lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if not self.logprobs or lps is None:
            return None
        return {
            "content": [
                {**self._entry(t.token, t.logprob), "top_logprobs": [self._entry(a, v) for a, v in t.top]} for t in lps
            ]
        }

    def opening(self, choices: int) -> list[dict[str, Any]]:
        return [
            {
                "choices": [
                    {"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                ]
            }
            for k in range(choices)
        ]

    def stream_pieces(self, i: int, base: int, c: Chunk, n: int) -> list[dict[str, Any]]:
        index = base + c.index
        lp = self._lp(c.logprobs)
        deltas: list[dict[str, Any]] = []
        finish = c.finish_reason
        if not self.tools:
            deltas = [{"content": c.text}] if c.text or lp is not None else []
        else:
            calls = self.streams.setdefault(index, CallStream())
            made = calls.calls
            items = calls.feed(c.text) + (calls.close() if finish else [])
            for kind, value in items:
                if kind == "content":
                    deltas.append({"content": value})
                else:
                    deltas.append({"tool_calls": [{"index": made, **value}]})
                    made += 1
            if lp is not None and not deltas:
                deltas = [{"content": ""}]
            if finish == "stop" and calls.calls:
                finish = "tool_calls"
        out: list[dict[str, Any]] = [
            {"choices": [{"index": index, "delta": d, "logprobs": lp if k == 0 else None, "finish_reason": None}]}
            for k, d in enumerate(deltas)
        ]
        if finish:
            out.append({"choices": [{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}]})
        return out

    def choices(self, collected: list[tuple[int, int, Chunk]], prompts: int, n: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [
            {
                "index": k,
                "message": {"role": "assistant", "content": ""},
                "logprobs": {"content": []} if self.logprobs else None,
                "finish_reason": None,
            }
            for k in range(prompts * n)
        ]
        for _, base, c in collected:
            o = out[base + c.index]
            o["message"]["content"] += c.text
            lp = self._lp(c.logprobs)
            if lp is not None:
                o["logprobs"]["content"] += lp["content"]
            o["finish_reason"] = c.finish_reason or o["finish_reason"]
        if self.tools:
            for o in out:
                content, calls = split_calls(o["message"]["content"])
                if calls:
                    o["message"].update(content=content, tool_calls=calls)
                    o["finish_reason"] = "tool_calls" if o["finish_reason"] == "stop" else o["finish_reason"]
        return out
