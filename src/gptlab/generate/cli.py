"""``gptlab sample MODEL``: KV-cached, batched, streaming text generation, or a continue-the-text loop."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Iterator

from ..errors import GptlabError
from ..files import read_input
from ..options import (
    add_config_flags,
    add_device,
    add_draft,
    add_json,
    add_model,
    add_quantize,
    config_from_flags,
    count,
    emit,
)
from .engine import Engine
from .sampling import Sampling


def sampling(args: argparse.Namespace, offset: int = 0) -> Sampling:
    """The sampling settings of the flags (the library's defaults where none is given), the seed moved by
    ``offset`` (sample i of a streamed run, turn i of the loop: seed + i, as row i of a batch)."""
    s = config_from_flags(args, Sampling)
    return dataclasses.replace(s, seed=s.seed + offset) if offset else s


def _engine(args: argparse.Namespace):
    from ..loader import load_draft, load_model  # here, not at the top: loading pulls in the interop formats

    loaded = load_model(args.model, args.device, quantize=args.quantize)
    draft = load_draft(args.draft, loaded) if args.draft else None
    engine = Engine(loaded.model, loaded.tokenizer, compile=args.compile, draft=draft, spec_k=args.spec_k)
    return engine, loaded


def read_image(path: str, cfg):
    """``--image``: a file as the model's image input [1, channels, size, size]."""
    from ..data.image_files import as_images

    return as_images(path, cfg)


def cmd_sample(args: argparse.Namespace) -> None:
    if args.chat:
        if args.image or args.interactive:
            raise GptlabError("--chat is a conversation in text; drop --image and --interactive")
        return _chat(args)
    if args.interactive:
        if args.image:
            raise GptlabError("--interactive continues text only; drop --image or --interactive")
        return _repl(args)
    if args.prompt_file and args.prompt:
        raise GptlabError("give --prompt or --prompt-file, not both")
    if args.stream and args.json:
        raise GptlabError("--stream prints text as it comes; --json prints one object at the end: pick one")
    try:
        prompt = read_input(args.prompt_file, "--prompt-file").decode("utf-8") if args.prompt_file else args.prompt
    except UnicodeDecodeError as e:
        raise GptlabError(
            f"cannot read --prompt-file {args.prompt_file}: {getattr(e, 'strerror', None) or e}"
        ) from None
    engine, loaded = _engine(args)
    image = read_image(args.image, loaded.config) if args.image else None
    t0 = time.perf_counter()
    if args.stream:
        decode_seconds, steps = 0.0, 0
        for i in range(args.num_samples):
            if i:
                print("\n" + "-" * 40)
            print(prompt, end="", flush=True)
            for piece in engine.stream(
                prompt,
                args.max_new_tokens,
                sampling(args, i),
                args.stop,
                sliding_window=args.sliding_window,
                image=image,
            ):
                print(piece, end="", flush=True)
            decode_seconds += engine.stats["decode_seconds"]
            steps += engine.stats["decode_steps"]
        print(f"\n[{steps / max(decode_seconds, 1e-9):,.1f} tok/s decoding]", file=sys.stderr)
        return
    s = sampling(args)
    images = None if image is None else image.expand(args.num_samples, -1, -1, -1)
    out = engine.generate(
        [prompt] * args.num_samples,
        args.max_new_tokens,
        s,
        args.stop,
        sliding_window=args.sliding_window,
        images=images,
    )
    seconds = time.perf_counter() - t0
    st = engine.stats
    new = sum(len(c.tokens) for c in out)
    result = {
        "model": str(args.model),
        "prompt": prompt,
        "samples": [c.text for c in out],
        "finish_reasons": [c.finish_reason for c in out],
        "new_tokens": [len(c.tokens) for c in out],
        "tokens_per_second": round(new / seconds, 2),
        "decode_tokens_per_second": round(st["decode_steps"] * args.num_samples / max(st["decode_seconds"], 1e-9), 2),
        "prefill_seconds": round(st["prefill_seconds"], 4),
        "kv_cache_bytes": st["cache_bytes"],
        "sampling": dataclasses.asdict(s),
        "compile": args.compile,
    }
    if "speculative" in st:
        result["speculative"] = st["speculative"]
    sep = "\n" + "-" * 40 + "\n"
    emit(
        args,
        result,
        sep.join(prompt + c.text for c in out)
        + f"\n[{new} tokens in {seconds:.2f}s: {result['tokens_per_second']:,.1f} tok/s; decoding "
        f"{result['decode_tokens_per_second']:,.1f} tok/s; KV cache {st['cache_bytes'] / 2**20:,.1f} MiB]",
    )


def _lines(prompt: str) -> Iterator[str | None]:
    """The lines typed at ``prompt`` (None for /reset), until /quit or Ctrl-D."""
    while True:
        try:
            line = input(prompt)
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() == "/quit":
            return
        yield None if line.strip() == "/reset" else line


def _repl(args: argparse.Namespace) -> None:
    """Continue-the-text loop: each line typed is appended to the running text and the model continues it."""
    engine, loaded = _engine(args)
    print(
        f"gptlab: {loaded.source} ({engine.model.num_params():,} parameters). Type text and press Enter; the "
        f"model continues it. /reset clears the text, /quit (or Ctrl-D) leaves.",
        file=sys.stderr,
    )
    text, turn = "", 0
    for line in _lines("> "):
        if line is None:
            text = ""
            continue
        text += line if not text else "\n" + line
        for piece in engine.stream(text, args.max_new_tokens, sampling(args, turn), args.stop, sliding_window=True):
            print(piece, end="", flush=True)
            text += piece
        print(flush=True)
        turn += 1


def _chat(args: argparse.Namespace) -> None:
    """A conversation on the terminal: every turn is rendered with the model's chat template (or --chat-template,
    or gptlab's own) and the reply streams until the model's end-of-turn token; the oldest turns are dropped when
    the conversation outgrows the context."""
    from ..chat import ChatTemplate
    from ..tokenizer import prompt_ids

    engine, loaded = _engine(args)
    template = ChatTemplate.of(loaded.tokenizer, args.chat_template)
    block = loaded.config.block_size
    print(
        f"gptlab: chatting with {loaded.source} ({engine.model.num_params():,} parameters, template "
        f"{template.source or 'gptlab'}). /reset starts over, /quit (or Ctrl-D) leaves.",
        file=sys.stderr,
    )
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[dict[str, str]] = []
    turn = 0
    for line in _lines("you> "):
        if line is None:
            messages = []
            continue
        messages.append({"role": "user", "content": line})
        prompt = template.render(system + messages)
        while len(prompt_ids(loaded.tokenizer, prompt)) + args.max_new_tokens > block and len(messages) > 1:
            messages = messages[2:] if len(messages) > 2 else messages[1:]  # the oldest exchange goes
            prompt = template.render(system + messages)
        reply = ""
        print("model> ", end="", flush=True)
        for piece in engine.stream(prompt, args.max_new_tokens, sampling(args, turn), args.stop + template.stop):
            print(piece, end="", flush=True)
            reply += piece
        print(flush=True)
        messages.append({"role": "assistant", "content": reply})
        turn += 1


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling options: the fields of :class:`gptlab.generate.Sampling`, with its defaults and ranges."""
    add_config_flags(p, Sampling, ())


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="generate text (KV-cached, batched, streaming)",
        description="Sample continuations of a prompt. The empty prompt samples unconditionally.",
    )
    add_model(p, "sample")
    p.add_argument("--prompt", default="")
    p.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument(
        "--image",
        help="an image file (PNG, JPEG, ...) placed before the prompt, for a model trained on images; resized to "
        "the model's size (docs/vision.md)",
    )
    p.add_argument("--max-new-tokens", type=count(1), default=200, help="tokens to generate (>= 1; default 200)")
    add_sampling_args(p)
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="end a sample before this text (repeatable); the end-of-text token always ends it",
    )
    p.add_argument(
        "--num-samples",
        type=count(1, 1024),
        default=1,
        help="samples decoded together as one batch (valid: [1, 1024]; default 1)",
    )
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--interactive", action="store_true", help="a continue-the-text loop on the terminal")
    p.add_argument(
        "--chat",
        action="store_true",
        help="a conversation on the terminal, in the model's chat template (its own, --chat-template, or gptlab's)",
    )
    p.add_argument("--chat-template", metavar="FILE", help="--chat: a Jinja chat template (default: the model's own)")
    p.add_argument("--system", help="--chat: a system message first")
    p.add_argument(
        "--sliding-window",
        action="store_true",
        help="allow prompt + new tokens beyond the context: the oldest tokens are dropped",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step (one-off compile; then ~2x faster on CPU)"
    )
    add_draft(p)
    add_device(p)
    add_quantize(p)
    add_json(p)
    p.set_defaults(func=cmd_sample)
