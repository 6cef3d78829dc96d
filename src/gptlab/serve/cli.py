"""``gptlab serve MODEL``: an OpenAI-compatible HTTP server with continuous batching (docs/serving.md)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import GptlabError
from ..options import add_config_flags, add_model, config_from_flags
from .config import ServeConfig


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise GptlabError(
            f"gptlab serve needs the serve extra ({e.name} is missing): pip install 'gptlab[serve]'"
        ) from None
    cfg = config_from_flags(
        args, ServeConfig, ("model",), model=args.model, api_key=args.api_key or os.environ.get("GPTLAB_API_KEY")
    )
    if cfg.runs is not None and not Path(cfg.runs).is_dir():
        raise GptlabError(f"--runs {cfg.runs} is not a folder; give the folder that holds your run folders")
    app = create_app(cfg)
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        raise GptlabError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}; pick another --port") from None
    host, port = sock.getsockname()[:2]
    state = app.state.server

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # SIGTERM or Ctrl-C: drain, then stop
            state.drain(cfg.shutdown_grace)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            """uvicorn's, less re-raising the signal once it has shut down (which makes the exit status -15): a
            server that drained cleanly exits 0."""
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    # uvicorn waits for the open connections up to its own timeout: past the grace period, by which they have ended
    server = Server(uvicorn.Config(app, log_level=cfg.log_level, timeout_graceful_shutdown=cfg.shutdown_grace + 5))

    def loaded(error: str | None) -> None:
        if error:
            server.should_exit = True
        else:
            # What is alive now (the model, the compiled step: ~420,000 objects for GPT-2) lives as long as the
            # server: moved to Python's permanent generation (gc.freeze, as vLLM does after its warm-up), no full
            # collection walks it again. A full collection of them took 220-270 ms (GPT-2 int4, compiled, AMD
            # EPYC Zen 4), a stall for every stream in flight.
            gc.freeze()
            pool = state.scheduler.pool.nbytes / 2**30
            print(
                f"gptlab: serving {cfg.name} at http://{host}:{port}/v1 (OpenAI-compatible; the page at "
                f"http://{host}:{port}/; {state.scheduler.max_batch} cache rows, {pool:.2f} GiB; Ctrl-C stops)",
                file=sys.stderr,
                flush=True,
            )

    state.on_loaded = loaded
    server.run(sockets=[sock])
    if state.load_error:
        raise GptlabError(state.load_error)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (continuous batching)",
        description="Serve MODEL at /v1/completions and /v1/chat/completions, with /v1/models, /health, /metrics, "
        "/tokenize and /detokenize. Requests are batched continuously: a new request joins the running ones "
        "between decode steps. Needs the serve extra: pip install 'gptlab[serve]'.",
    )
    add_model(p, "serve", old=())
    add_config_flags(p, ServeConfig, ("model",))
    p.set_defaults(func=cmd_serve)
