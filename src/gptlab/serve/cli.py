"""``gptlab serve MODEL``: an OpenAI-compatible HTTP server with continuous batching (docs/serving.md)."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from ..errors import GptlabError
from ..options import add_device, add_draft, add_model, add_quantize, count


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from .app import ServeConfig, create_app
    except ImportError as e:
        raise GptlabError(
            f"gptlab serve needs the serve extra ({e.name} is missing): pip install 'gptlab[serve]'"
        ) from None
    if args.runs is not None and not Path(args.runs).is_dir():
        raise GptlabError(f"--runs {args.runs} is not a folder; give the folder that holds your run folders")
    max_n = min(16, args.max_batch) if args.max_n is None else args.max_n
    if max_n > args.max_batch:
        raise GptlabError(f"--max-n {max_n} is more than --max-batch {args.max_batch}; n choices need n rows")
    cfg = ServeConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        device=args.device,
        quantize=args.quantize,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_n=max_n,
        prefill_chunk=args.prefill_chunk,
        max_body_bytes=args.max_body_bytes,
        api_key=args.api_key or os.environ.get("GPTLAB_API_KEY") or None,
        chat_template=args.chat_template,
        clamp_max_tokens=args.clamp_max_tokens,
        runs=args.runs,
        compile=args.compile,
        draft=args.draft,
        spec_k=args.spec_k,
    )
    app = create_app(cfg)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise GptlabError(f"cannot listen on {args.host}:{args.port}: {e.strerror}; pick another --port") from None
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=3))
    state = app.state.server

    def loaded(error: str | None) -> None:
        if error:
            server.should_exit = True
        else:
            pool = state.scheduler.pool.nbytes / 2**30
            print(
                f"gptlab: serving {cfg.name} at http://{host}:{port}/v1 (OpenAI-compatible; the page at "
                f"http://{host}:{port}/; {cfg.max_batch} cache rows, {pool:.2f} GiB; Ctrl-C stops)",
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
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument(
        "--port", type=count(0, 65535), default=8000, help="TCP port; 0 picks a free one ([0, 65535]; default 8000)"
    )
    p.add_argument("--served-model-name", help="the model id clients send and /v1/models lists (default: MODEL's name)")
    p.add_argument(
        "--max-batch",
        type=count(1, 1024),
        default=16,
        help="KV-cache rows: sequences decoded together ([1, 1024]; default 16)",
    )
    p.add_argument(
        "--max-queue",
        type=count(0, 100_000),
        default=256,
        help="requests that may wait for a row; more get 429 ([0, 100000]; default 256)",
    )
    p.add_argument(
        "--max-n",
        type=count(1, 128),
        help="largest n (choices) per request ([1, 128], at most --max-batch; default: 16 or --max-batch if less)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=count(1, 1 << 20),
        default=512,
        help="prompt tokens prefilled per scheduling step: the most a newcomer stalls the others ([1, 1048576]; "
        "default 512)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=count(1024, 1 << 30),
        default=1 << 20,
        help="largest request body; larger get 413 ([1024, 1073741824]; default 1048576)",
    )
    p.add_argument("--api-key", help="require Authorization: Bearer KEY (default: $GPTLAB_API_KEY, else none)")
    p.add_argument(
        "--chat-template", metavar="FILE", help="a Jinja chat template (default: the one gptlab align sft trains with)"
    )
    p.add_argument(
        "--clamp-max-tokens",
        action="store_true",
        help="cut max_tokens to the room left in the context instead of answering 400",
    )
    p.add_argument("--runs", metavar="DIR", help="show the training runs under DIR in the page's Runs view (read-only)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step used when one stream runs alone (~1.7x faster on CPU); compiled at "
        "start-up, one graph per 256 slots of context (GPT-2: ~2 min), while /health answers 503",
    )
    add_draft(p)
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    add_device(p)
    add_quantize(p)
    p.set_defaults(func=cmd_serve)
