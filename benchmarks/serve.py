"""Serving under load: a vLLM-style load generator for any OpenAI-compatible server, and the suite that compares
`gptlab serve` with llama.cpp's own `llama-server` on the same GPT-2 weights.

``load``: streaming completions from ``--num-prompts`` clients, arriving all at once (``--request-rate inf``) or as
a Poisson process, at most ``--max-concurrency`` in flight. Per request: TTFT (request sent -> first text), TPOT
((end - first text) / (tokens - 1)), ITL (gaps between text chunks) and end-to-end latency; p50/p90/p99 of each,
request and output-token throughput. Ends with one JSON line.

    python benchmarks/serve.py load --url http://127.0.0.1:8000 --model NAME --max-concurrency 8

``suite``: GPT-2 124M (random weights: speed does not depend on them) served by ``gptlab serve`` with its default
settings and by llama.cpp's own ``llama-server`` (32 parallel slots, continuous batching, the model's whole context
per slot) on the same weights, exported to Hugging Face format (``gptlab convert``) and converted to an f32 GGUF
with llama.cpp's ``convert_hf_to_gguf.py``; both at 1, 8 and 32 concurrent streams, the same threads, in
interleaved rounds. ``--int8`` adds ``gptlab serve --quantize int8`` against ``llama-server`` on a q8_0 GGUF of
the same weights. ``--baby`` adds ``baby`` (GPT-2's tokenizer) at 32 streams, batched and one request at a time
(``--max-batch 1``), for TTFT under load. Ends with one JSON line of every figure.

    python benchmarks/serve.py suite --llama-server BUILD/bin/llama-server --llama-convert LCPP/convert_hf_to_gguf.py

``llama-server`` is never a dependency of gptlab. To build it, take the llama.cpp source vendored in
llama-cpp-python's source distribution (the version the other benchmarks use)::

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \\
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
    cmake --build build --target llama-server -j 2      # about 8 minutes on 2 cores

``prefix``: the prefix cache on two workloads, GPT-2 124M (random weights) served three ways in interleaved rounds:
with the cache (the default), ``--no-prefix-cache``, and ``--no-prefix-cache --prefix-block 512`` (prefill in
512-token passes, what the block grid costs on a miss). *few-shot*: requests sharing a long header, then a question
of their own; *chat*: conversations whose every turn resends the earlier turns and the answers. Per workload and
server: TTFT p50/p90, output tokens/s, and the cache's hit tokens and blocks held (from /metrics). One JSON line.

    python benchmarks/serve.py prefix --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from common import cpu_name

REPO = Path(__file__).resolve().parents[1]
WORDS = "the king queen of love and war my lord good night sweet prince what say you thou art noble fair".split()


def percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"p50": math.nan, "p90": math.nan, "p99": math.nan, "mean": math.nan}
    s = sorted(xs)

    def q(p: float) -> float:  # nearest-rank
        return s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))]

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": sum(s) / len(s)}


async def one_request(ac: httpx.AsyncClient, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    if not body["stream"]:  # one response at the end: no TTFT, TPOT or ITL to measure
        r = await ac.post(url + "/v1/completions", json=body)
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code, "error": r.text[:200]}
        out = r.json()["usage"]["completion_tokens"]
        return {"ok": True, "ttft": None, "e2e": time.perf_counter() - t0, "tokens": out, "tpot": None, "itl": []}
    first, times, tokens, usage, done = None, [], 0, None, False
    async with ac.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code, "error": (await r.aread()).decode()[:200]}
        async for line in r.aiter_lines():
            done = done or line == "data: [DONE]"
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices") or []:
                if c.get("text"):
                    now = time.perf_counter()
                    first = first or now
                    times.append(now)
                    tokens += 1
    end = time.perf_counter()
    out = usage["completion_tokens"] if usage else tokens  # a text chunk per token where usage is not streamed
    # a stream that ended with [DONE] and counted tokens but sent no text (a server may hold back tokens that are
    # not yet whole UTF-8 characters) completed: its tokens count, it has no TTFT
    return {
        "ok": first is not None or (done and out > 0),
        "ttft": None if first is None else first - t0,
        "e2e": end - t0,
        "tokens": out,
        "tpot": (end - first) / (out - 1) if first and out > 1 else None,
        "itl": [b - a for a, b in itertools.pairwise(times)],
    }


async def run_load(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(args.prompt_tokens)) for _ in range(args.num_prompts)]
    sem = asyncio.Semaphore(args.max_concurrency)
    results: list[dict] = []

    async def client(ac: httpx.AsyncClient, i: int, delay: float) -> None:
        await asyncio.sleep(delay)
        async with sem:
            body = {
                "model": args.model,
                "prompt": prompts[i],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "stream": args.stream,
                **({"stream_options": {"include_usage": True}} if args.stream else {}),
            }
            try:
                results.append(await one_request(ac, args.url, body))
            except httpx.HTTPError as e:
                results.append({"ok": False, "error": repr(e)})

    arrivals, t = [], 0.0
    for _ in range(args.num_prompts):
        arrivals.append(t)
        if args.request_rate != math.inf:
            t += rng.expovariate(args.request_rate)
    # a fresh connection per request: a kept-alive one that the server closes while idle fails the next request
    # sent on it ("Server disconnected without sending a response"), which llama-server's did at one stream
    limits = httpx.Limits(max_connections=args.max_concurrency + 8, max_keepalive_connections=0)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=limits) as ac:
        await asyncio.gather(*[client(ac, i, d) for i, d in enumerate(arrivals)])
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "url": args.url,
        "model": args.model,
        "max_concurrency": args.max_concurrency,
        "request_rate": str(args.request_rate),
        "num_prompts": args.num_prompts,
        "prompt_words": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "completed_without_text": sum(r["ttft"] is None for r in ok) if args.stream else 0,
        "errors": sorted({str(r.get("error") or r.get("status")) for r in results if not r["ok"]})[:3],
        "seconds": round(wall, 3),
        "request_throughput": round(len(ok) / wall, 3),
        "output_tok_s": round(tokens / wall, 2),
        "stream": args.stream,
        "ttft_s": {k: round(v, 4) for k, v in percentiles([r["ttft"] for r in ok if r["ttft"] is not None]).items()},
        "tpot_s": {k: round(v, 4) for k, v in percentiles([r["tpot"] for r in ok if r["tpot"]]).items()},
        "itl_s": {k: round(v, 4) for k, v in percentiles([x for r in ok for x in r["itl"]]).items()},
        "e2e_s": {k: round(v, 4) for k, v in percentiles([r["e2e"] for r in ok]).items()},
    }


def cmd_load(args: argparse.Namespace) -> None:
    result = asyncio.run(run_load(args))
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------------- the suite
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A server subprocess, ready when ``url``/health (or /v1/models) answers 200."""

    def __init__(self, cmd: list[str], url: str, env: dict, health: str) -> None:
        self.url = url
        # the log goes to a file: a pipe nobody reads fills up and blocks a chatty server (llama.cpp logs each request)
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"server exited: {' '.join(cmd)}\n{self.log.read()[-2000:]}")
            try:
                if httpx.get(url + health, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"server did not become ready: {' '.join(cmd)}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def serve_gptlab(model: Path, name: str, env: dict, *flags: str) -> Process:
    """``gptlab serve MODEL`` on a free port of 127.0.0.1, on the CPU, as ``name``."""
    port = free_port()
    cmd = [sys.executable, "-m", "gptlab", "serve", str(model), "--port", str(port), "--device", "cpu",
           "--served-model-name", name, *flags]  # fmt: skip
    return Process(cmd, f"http://127.0.0.1:{port}", env, "/health")


def make_models(root: Path) -> dict[str, Path]:
    sys.path.insert(0, str(REPO / "src"))
    import torch

    from gptlab.checkpoint import save_model_checkpoint
    from gptlab.config import preset
    from gptlab.model import GPT

    out = {}
    for name, cfg in (("gpt2", preset("gpt2")), ("baby", preset("baby", vocab_size=50257, block_size=256))):
        torch.manual_seed(0)
        path = root / name
        save_model_checkpoint(path, GPT(cfg).state_dict(), cfg, {"kind": "gpt2"})
        out[name] = path
    return out


def load(url: str, model: str, concurrency: int, num: int, max_tokens: int, prompt_words: int, seed: int) -> dict:
    """One level of load; ``seed`` draws its prompts. Each level of a server's life draws its own, so that no
    server answers from a prompt cache what an earlier level sent it (llama-server keeps each slot's last prompt
    and reuses any prefix of it; gptlab's prefix cache keeps whole blocks of 128 tokens only)."""
    ns = argparse.Namespace(
        stream=True,
        url=url,
        model=model,
        max_concurrency=concurrency,
        num_prompts=num,
        max_tokens=max_tokens,
        prompt_tokens=prompt_words,
        request_rate=math.inf,
        seed=seed,
    )
    r = asyncio.run(run_load(ns))
    print(
        f"  {model} c={concurrency}: {r['output_tok_s']} tok/s, TTFT p50 {r['ttft_s']['p50']} s, "
        f"p99 {r['ttft_s']['p99']} s, TPOT p50 {r['tpot_s']['p50']} s, failed {r['failed']}",
        file=sys.stderr,
    )
    return r


def gguf_of(model: Path, root: Path, convert: str, env: dict, outtype: str = "f32") -> Path:
    """``model`` exported to Hugging Face format (``gptlab convert``) and converted to an ``outtype`` (f32, q8_0)
    GGUF by llama.cpp's own ``convert_hf_to_gguf.py`` (its ``gguf-py`` beside it), so that both servers compute on the
    same weights: in fp32, or (q8_0) per block of 32 int8 codes where gptlab's int8 keeps one scale per row."""
    hf, gguf = root / f"{model.name}-hf", root / f"{model.name}-{outtype}.gguf"
    if not hf.exists():
        subprocess.run([sys.executable, "-m", "gptlab", "convert", str(model), "--to", "hf", "--out-dir", str(hf)],
                       env=env, check=True, capture_output=True)  # fmt: skip
    lcpp = Path(convert).parent
    conv_env = {**env, "PYTHONPATH": f"{lcpp / 'gguf-py'}:{lcpp}:{env['PYTHONPATH']}"}
    subprocess.run([sys.executable, convert, str(hf), "--outtype", outtype, "--outfile", str(gguf)],
                   env=conv_env, check=True, capture_output=True)  # fmt: skip
    return gguf


def serve_llama(binary: str, gguf: Path, name: str, threads: int, slots: int, env: dict) -> Process:
    """llama.cpp's own ``llama-server`` with ``slots`` parallel sequences decoded together (continuous batching),
    each with the model's whole context of 1,024 tokens (``-c`` is shared among the slots)."""
    port = free_port()
    cmd = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--alias", name,
           "-np", str(slots), "-c", str(1024 * slots), "-cb", "-t", str(threads), "-tb", str(threads)]  # fmt: skip
    return Process(cmd, f"http://127.0.0.1:{port}", env, "/health")


def cmd_suite(args: argparse.Namespace) -> None:
    """Each contestant in its own server process, in interleaved rounds (gptlab, llama-server, gptlab, ...): this
    VM's speed drifts over minutes, and interleaving exposes both to the same drift. A level's figure is the round
    with the highest output tok/s; every round's is kept under ``rounds``."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": str(args.threads)}
    root = Path(tempfile.mkdtemp(prefix="gptlab-serve-bench-"))
    models = make_models(root)
    results: dict = {"machine": {"cpu": cpu_name(), "threads": args.threads}}
    levels = [(1, args.num_single), (8, args.num_8), (32, args.num_32)]
    contestants: dict[str, Callable[[], Process]] = {  # gptlab with its default settings (the pool included)
        "gptlab_gpt2": lambda: serve_gptlab(models["gpt2"], "gpt2", env),
    }
    if args.int8:
        contestants["gptlab_gpt2_int8"] = lambda: serve_gptlab(models["gpt2"], "gpt2", env, "--quantize", "int8")
    if args.llama_server and args.llama_convert:
        gguf = gguf_of(models["gpt2"], root, args.llama_convert, env)
        contestants["llama_server_gpt2"] = lambda: serve_llama(args.llama_server, gguf, "gpt2", args.threads, 32, env)
        if args.int8:
            q8 = gguf_of(models["gpt2"], root, args.llama_convert, env, "q8_0")
            contestants["llama_server_gpt2_q8_0"] = lambda: serve_llama(
                args.llama_server, q8, "gpt2", args.threads, 32, env
            )
        version = subprocess.run([args.llama_server, "--version"], capture_output=True, text=True)
        results["llama_server_version"] = (version.stdout + version.stderr).strip().splitlines()[:2]
    for _ in range(args.rounds):
        for name, start in contestants.items():
            srv = start()
            try:
                load(srv.url, "gpt2", 1, 2, 8, args.prompt_words, seed=1000)  # warm-up
                for c, n in levels:
                    r = load(srv.url, "gpt2", c, n, args.max_tokens, args.prompt_words, seed=c)
                    best = results.setdefault(name, {}).get(f"c{c}")
                    r["rounds"] = [*(best or {}).get("rounds", []), r["output_tok_s"]]
                    if best is None or r["output_tok_s"] > best["output_tok_s"]:
                        results[name][f"c{c}"] = r
                    else:
                        best["rounds"] = r["rounds"]
            finally:
                srv.stop()
    if args.baby:  # the small model at 32 streams, batched and one request at a time (TTFT under load)
        for key, flags in (("gptlab_baby", ()), ("gptlab_baby_one_at_a_time", ("--max-batch", "1"))):
            srv = serve_gptlab(models["baby"], "baby", env, *flags)
            try:
                load(srv.url, "baby", 1, 2, 8, args.prompt_words, seed=1000)
                results[key] = {"c32": load(srv.url, "baby", 32, args.num_32, args.max_tokens, args.prompt_words, 32)}
            finally:
                srv.stop()
    g = results["gptlab_gpt2"]
    results["ratios"] = {"gptlab_gpt2_c32_over_c1": round(g["c32"]["output_tok_s"] / g["c1"]["output_tok_s"], 2)}
    for ours, theirs, tag in (
        ("gptlab_gpt2", "llama_server_gpt2", ""),
        ("gptlab_gpt2_int8", "llama_server_gpt2_q8_0", "_int8"),
    ):
        if ours in results and theirs in results:
            g, lc = results[ours], results[theirs]
            for c, _ in levels:
                results["ratios"][f"gptlab_over_llama_server{tag}_c{c}"] = round(
                    g[f"c{c}"]["output_tok_s"] / lc[f"c{c}"]["output_tok_s"], 2
                )
                results["ratios"][f"ttft_p99_gptlab_over_llama_server{tag}_c{c}"] = round(
                    g[f"c{c}"]["ttft_s"]["p99"] / lc[f"c{c}"]["ttft_s"]["p99"], 2
                )
    print(json.dumps(results))


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return math.nan


async def prefix_workload(url: str, kind: str, args: argparse.Namespace) -> dict:
    """``few-shot``: ``--clients`` requests at once, each a shared header of ``--header-words`` and a question.
    ``chat``: ``--clients`` conversations at once, ``--turns`` turns each, every turn the whole conversation so far."""
    rng = random.Random(1)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))
    header = words(args.header_words)
    results: list[dict] = []

    async def conversation(ac: httpx.AsyncClient, i: int) -> None:
        text = header + f" question {i}: " + words(20) if kind == "few-shot" else words(args.header_words // 4)
        for _ in range(1 if kind == "few-shot" else args.turns):
            body = {
                "model": "gpt2",
                "prompt": text,
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with ac.stream("POST", url + "/v1/completions", json=body) as r:
                t0, first, answer, n = time.perf_counter(), None, "", 0
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        d = json.loads(line[6:])
                        if d.get("choices") and d["choices"][0]["text"]:
                            first = first or time.perf_counter()
                            answer += d["choices"][0]["text"]
                        if d.get("usage"):
                            n = d["usage"]["completion_tokens"]
            results.append({"ttft": (first or time.perf_counter()) - t0, "tokens": n})
            text += answer + " next: " + words(args.turn_words)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as ac:
        await asyncio.gather(*(conversation(ac, i) for i in range(args.clients)))
    wall = time.perf_counter() - t0
    ttft = percentiles([r["ttft"] for r in results])
    return {
        "ttft_p50_s": round(ttft["p50"], 4),
        "ttft_p90_s": round(ttft["p90"], 4),
        "output_tok_s": round(sum(r["tokens"] for r in results) / wall, 2),
        "seconds": round(wall, 3),
    }


def cmd_prefix(args: argparse.Namespace) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": str(args.threads)}
    root = Path(tempfile.mkdtemp(prefix="gptlab-prefix-bench-"))
    model = make_models(root)["gpt2"]
    kinds = {
        "cache": [],
        "no_cache": ["--no-prefix-cache"],
        "no_cache_512": ["--no-prefix-cache", "--prefix-block", "512"],
    }
    results: dict = {
        "machine": {"cpu": cpu_name(), "threads": args.threads},
        "header_words": args.header_words,
        "clients": args.clients,
        "turns": args.turns,
    }
    rows: dict = {k: {w: [] for w in ("few-shot", "chat")} for k in kinds}
    for _ in range(args.rounds):
        for name, flags in kinds.items():  # each server in its own process, one at a time, rounds interleaved
            srv = serve_gptlab(model, "gpt2", env, "--max-batch", "16", *flags)
            try:
                for workload in ("few-shot", "chat"):
                    r = asyncio.run(prefix_workload(srv.url, workload, args))
                    r["hit_tokens"] = metric(srv.url, "gptlab_prefix_cache_hits_tokens_total")
                    r["asked_tokens"] = metric(srv.url, "gptlab_prefix_cache_queries_tokens_total")
                    r["blocks_held"] = metric(srv.url, "gptlab_prefix_cache_blocks")
                    rows[name][workload].append(r)
                    print(f"  {name} {workload}: {r}", file=sys.stderr)
            finally:
                srv.stop()
    best = lambda rs: min(rs, key=lambda r: r["ttft_p50_s"])
    results["runs"] = rows
    results["ratios"] = {
        f"{w}_ttft_p50_no_cache_over_cache": round(
            best(rows["no_cache"][w])["ttft_p50_s"] / best(rows["cache"][w])["ttft_p50_s"], 2
        )
        for w in ("few-shot", "chat")
    } | {
        f"{w}_ttft_p50_blocks_over_512": round(
            best(rows["no_cache"][w])["ttft_p50_s"] / best(rows["no_cache_512"][w])["ttft_p50_s"], 2
        )
        for w in ("few-shot", "chat")
    }
    print(json.dumps(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("load", help="load one OpenAI-compatible server")
    p.add_argument("--url", required=True, help="the server's base URL, without /v1")
    p.add_argument("--model", required=True)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=8)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson; inf = all at once")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in words (one GPT-2 token each)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stream", dest="stream", action="store_false", help="plain responses (no TTFT/ITL)")
    p.set_defaults(func=cmd_load)
    p = sub.add_parser("suite", help="gptlab serve and llama.cpp's llama-server (GPT-2 124M) at 1, 8, 32 streams")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--num-single", type=int, default=8, help="requests at concurrency 1")
    p.add_argument("--num-8", type=int, default=32, help="requests at concurrency 8")
    p.add_argument("--num-32", type=int, default=64, help="requests at concurrency 32")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every contestant")
    p.add_argument("--llama-server", help="llama.cpp's llama-server binary (the module docstring says how to build it)")
    p.add_argument("--llama-convert", help="llama.cpp's convert_hf_to_gguf.py (its gguf-py beside it)")
    p.add_argument("--baby", action="store_true", help="also baby at 32 streams, batched and one at a time")
    p.add_argument("--int8", action="store_true", help="also gptlab --quantize int8 (and llama-server on a q8_0 GGUF)")
    p.set_defaults(func=cmd_suite)
    p = sub.add_parser("prefix", help="the prefix cache: shared few-shot header and multi-turn chat, on and off")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients", type=int, default=8, help="requests (few-shot) or conversations (chat) at once")
    p.add_argument("--header-words", type=int, default=400, help="the shared few-shot header (one token each)")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--turn-words", type=int, default=40, help="words a chat turn adds after the answer")
    p.add_argument("--max-tokens", type=int, default=16)
    p.set_defaults(func=cmd_prefix)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
