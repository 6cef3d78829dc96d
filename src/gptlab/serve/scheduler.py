"""Continuous batching: one pool of KV-cache rows, every running request decoded together, newcomers joining
between decode steps (Yu et al. 2022, Orca: iteration-level scheduling; vLLM and TGI serve this way).

The pool is a :class:`~gptlab.model.KVCache` of ``max_batch`` rows, each as long as the model's context. A request
with ``n`` choices takes ``n`` rows. Its prompt is prefilled into the first one, one block of ``prefix_block`` slots
per forward pass (at most ``prefill_chunk`` prompt tokens per scheduler iteration across all newcomers, so a long
prompt never stalls the running streams for more than that; several newcomers' blocks share a pass where that keeps
their bits, :func:`packs_prompts`), then copied into the other rows (the prompt is read once). Blocks that earlier
prompts computed are taken from the prefix cache instead (:mod:`gptlab.serve.prefix_cache`), bit for bit what the
skipped passes would compute. Each row keeps its own length: a decode step writes row ``r``'s new key and value at
that row's own slot, and the positions and masks follow from those slots (:meth:`KVCache.positions_and_mask` with
[B, 1] slots). A row that finishes or is cancelled is free for the next request at once.

A row's tokens do not depend on the other rows: its prompt is prefilled to the bits of its passes alone (the same
passes, the same shapes, or packed passes whose products are row-invariant), its attention sees only its own slots,
and it samples from its own random stream (seeded ``seed + choice``, as :class:`~gptlab.generate.Engine` seeds
``seed + row``), so a completion is the same whether it runs alone or joins a busy batch.

Library use, without HTTP::

    sched = Scheduler(model, tokenizer)
    async for chunk in sched.submit(Request(prompt=tokenizer.encode("Hello"), max_tokens=20)):
        print(chunk.text, end="")

The scheduler runs in one background thread (PyTorch releases the GIL in its kernels); ``submit`` and ``cancel``
may be called from any thread, and chunks are handed to the caller's asyncio loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import hugepages, kernels
from ..config import GPTConfig
from ..errors import GptlabError
from ..generate.constraint import Grammar, Matcher
from ..generate.engine import CompiledStep, TextStream, bucketed, step_options
from ..generate.sampling import GREEDY, Sampling, next_tokens
from ..generate.speculative import SPEC_K, Draft, SpeculativeStats, Throttle, verify_step
from ..kv_cache import KVCache, PackedCache
from ..layers import Linear
from ..lora import LoRABank, use_adapters
from ..model import GPT, MLP, Block, CausalSelfAttention
from .config import ServeConfig
from .prefix_cache import PrefixCache

MAX_LOGPROBS = 20
POOL_GIB_CPU = 4.0  # the most a CPU server's default pool takes (vLLM's CPU backend reserves 4 GiB by default too)
POOL_ROWS = {"cpu": 64, "other": 256}  # the most rows a default pool has, on a CPU and on an accelerator
PLAIN_MODULES = (GPT, Block, CausalSelfAttention, MLP, Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.Dropout,
                 nn.Identity, nn.ModuleList)  # fmt: skip


def available_memory(device: torch.device) -> int:
    """Bytes free for a KV pool on ``device``: CUDA's free memory; on a CPU, the kernel's MemAvailable, less if the
    process's cgroup (a container's memory limit) leaves less."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:  # cgroup v2
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free


def pool_rows(cfg: GPTConfig, device: torch.device, dtype: torch.dtype) -> int:
    """The default number of KV-cache rows (``--max-batch``): what a quarter of the memory available now holds (at
    most 4 GiB on a CPU, half of the free memory on an accelerator), one row being the keys and values of a whole
    context, capped at 64 rows on a CPU (past that the batched step is bound by its matrix products, so more rows
    add waiting, not throughput) and 256 elsewhere; at least one. GPT-2 124M in fp32 (72 MiB a row): 56 rows."""
    row = KVCache.row_bytes(cfg, cfg.block_size, dtype)
    free = available_memory(device)
    if device.type == "cpu":
        budget, cap = min(free / 4, POOL_GIB_CPU * 2**30), POOL_ROWS["cpu"]
    else:
        budget, cap = free / 2, POOL_ROWS["other"]
    return max(1, min(cap, int(budget // row)))


def packs_prompts(model: GPT) -> bool:
    """Whether several prompts' prefill passes may share one forward pass, each keeping the bits of its pass alone
    (:class:`~gptlab.kv_cache.PackedCache`): an fp32 model on a CPU where gptlab's fp32 kernel computes every
    product whatever its rows (:func:`gptlab.kernels.row_invariant`), built of plain layers only (no quantized
    layers, LoRA adapters, experts or image encoder, whose products a BLAS computes)."""
    return (
        model.device.type == "cpu"
        and model.dtype == torch.float32
        and kernels.has_f32_kernel()
        and all(type(m) in PLAIN_MODULES for m in model.modules())
    )


@dataclass
class Request:
    """One completion request: ``n`` choices of at most ``max_tokens`` new tokens after ``prompt`` (token ids).

    ``max_tokens=None`` generates to the end of the context. ``seed`` seeds choice ``j``'s random stream with
    ``seed + j`` (``None``: a fresh random seed; ``sampling.seed`` is not used). ``logprobs=k`` reports, per new
    token, its log-probability under the model (before temperature and filters, as OpenAI and vLLM report it) and
    the ``k`` most likely tokens' (0: the chosen token's only); ``echo_logprobs`` also scores the prompt's tokens."""

    prompt: list[int]
    max_tokens: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    seed: int | None = None
    n: int = 1
    stop: Sequence[str] = ()
    stop_ids: frozenset[int] | None = None  # None: the tokenizer's end-of-text token
    logprobs: int | None = None
    echo_logprobs: bool = False
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    image: torch.Tensor | None = None  # [1, channels, size, size]: an image prefix before the prompt
    client: str | None = None  # who asked (one HTTP request's prompts share it); rows are shared fairly among them
    grammar: Grammar | None = None  # structured output: every choice's text stays inside it (generate.constraint)
    adapter: int = 0  # the LoRA adapter its rows use (gptlab.lora.LoRABank; 0: the base model)


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this position, best first


@dataclass
class Chunk:
    """What one choice produced since its last chunk: whole-character ``text`` (held back while it could still
    become a stop string or is an incomplete UTF-8 sequence), the new ``tokens`` and, if asked, their logprobs.
    ``finish_reason`` is set on a choice's last chunk: ``"stop"`` (end-of-text token or stop string) or
    ``"length"``. The first chunk of a request with ``echo_logprobs`` has index -1 and the prompt's logprobs (the
    first token's is None)."""

    index: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


class Cancelled(Exception):
    """The stream of a request that was cancelled (or whose server is stopping)."""


@dataclass
class _Choice:
    index: int
    row: int
    stream: TextStream
    generator: torch.Generator
    seen: torch.Tensor | None  # tokens seen so far, for the repetition penalty
    filled: int = 0  # slots of this row holding keys and values
    last: int | None = None  # the newest token, not yet in the cache
    produced: int = 0
    last_time: float = 0.0
    done: bool = False
    history: list[int] = field(default_factory=list)  # prompt and tokens so far (speculative proposals read it)
    matcher: Matcher | None = None  # the choice's place in its request's grammar
    adapter: int = 0  # its request's LoRA adapter


@dataclass
class _Job:
    request: Request
    emit: Callable[[Any], None]  # thread-safe: hands a Chunk, an exception or None (the end) to the consumer
    arrived: float
    max_tokens: int
    stop_ids: frozenset[int]
    group: Sampling  # the request's sampling without its seed: rows with the same one sample together
    choices: list[_Choice] = field(default_factory=list)
    first_token_time: float | None = None
    offset: int = 0  # cache slots before the prompt's: the image prefix, if any
    admitted: float = 0.0  # when it got its rows (perf_counter)
    names: list[bytes] | None = None  # the prefix cache's names of the prompt's whole blocks
    looked_up: bool = False  # its blocks were looked up in the prefix cache
    reused: int = 0  # of its whole blocks, how many the prefix cache gave


class Scheduler:
    """Continuous batching over one model. ``metrics`` (optional) receives the events of :class:`ServeMetrics`."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Any,
        max_batch: int | None = None,
        max_queue: int = ServeConfig.max_queue,
        prefill_chunk: int = ServeConfig.prefill_chunk,
        metrics: Any = None,
        compile: bool = False,
        draft: Draft | None = None,
        spec_k: int = SPEC_K,
        spec_min_speedup: float = 1.0,
        prefix_block: int = ServeConfig.prefix_block,
        prefix_cache_mb: float = ServeConfig.prefix_cache_mb,
        max_request_seconds: float = ServeConfig.max_request_seconds,
    ) -> None:
        """``draft`` (prompt lookup, or a smaller model with its own cache of these rows) turns on speculative
        decoding: up to ``spec_k`` proposals per row and step, verified in one forward pass
        (:mod:`gptlab.generate.speculative`), paused while speculative steps produce less than ``spec_min_speedup``
        times the tokens per second of plain ones (:class:`~gptlab.generate.speculative.Throttle`; 0: never). A
        model draft proposes its argmax whatever a request's sampling: a deterministic draft, exact under the same
        rejection rule.

        Prompts are prefilled in blocks of ``prefix_block`` slots; ``prefix_cache_mb`` MiB keep the blocks of
        earlier prompts for reuse (0: no prefix cache). A request still generating ``max_request_seconds`` after
        its admission ends, each unfinished choice with ``finish_reason`` ``"length"`` (llama.cpp's
        ``t_max_predict_ms`` does the same; 0: no limit). ``max_batch`` None: :func:`pool_rows`."""
        if max_batch is None:
            max_batch = pool_rows(model.config, model.device, model.dtype)
        if min(max_batch, prefill_chunk, prefix_block) < 1 or min(max_queue, prefix_cache_mb) < 0:
            raise GptlabError(
                "max_batch, prefill_chunk and prefix_block must be >= 1, max_queue and prefix_cache_mb >= 0"
            )
        if prefill_chunk < prefix_block:
            raise GptlabError(
                f"prefill_chunk {prefill_chunk} is less than prefix_block {prefix_block}: a newcomer's prompt is "
                "prefilled one block per pass; raise prefill_chunk or lower prefix_block"
            )
        self.model = hugepages.place_weights(model.eval())
        hugepages.keep_freed_memory_in_heap(model.device.type)  # (activations, logits: not faulted in anew)
        self.banked = any(isinstance(m, LoRABank) for m in model.modules())  # --lora: adapters chosen per row
        if self.banked and (compile or draft is not None):
            raise GptlabError("served LoRA adapters cannot be combined with compile or a draft")
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.metrics = metrics
        cfg = model.config
        self.block, self.vocab = cfg.block_size, cfg.vocab_size
        self.device, self.dtype = model.device, model.dtype
        self.pool = KVCache(cfg, max_batch, cfg.block_size, self.device, self.dtype)
        self.packs = packs_prompts(model)  # newcomers' prefill passes share forward passes
        self.prefix_block = prefix_block
        self.max_request_seconds = max_request_seconds
        blocks = int(prefix_cache_mb * 2**20) // PrefixCache.block_bytes(cfg, prefix_block, self.dtype)
        self.prefix = PrefixCache(cfg, prefix_block, blocks, self.device, self.dtype) if blocks else None
        self.rows: list[_Choice | None] = [None] * max_batch
        self.waiting: deque[_Job] = deque()  # accepted, not yet given rows
        self.prefilling: deque[_Job] = deque()  # given rows, prompt not yet fully in the cache
        self.running: list[_Job] = []
        self._cancel: dict[str, int] = {}  # request id -> decode steps done when it was cancelled
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self.steps = 0  # decode steps so far (tests count steps with it)
        self.draft, self.spec_k, self.spec_min_speedup = draft, spec_k, spec_min_speedup
        self.spec = SpeculativeStats(spec_k)
        if draft is not None:
            draft.attach(max_batch, cfg.block_size)
        self.throttle = Throttle(self.spec, spec_min_speedup)
        self._spare = torch.Generator(
            self.device
        )  # the random stream of rows fed but not decoded in a speculative step
        self._single: Callable[..., Any] | None = None  # compile=True: the compiled single-row step
        if compile:
            self._compile_single()
        self._thread = threading.Thread(target=self._loop, name="gptlab-scheduler", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- the caller's side
    def check(self, request: Request) -> int:
        """Validate a request; return its max_tokens (a missing one: to the end of the context)."""
        p = request.prompt
        if not p:
            raise InvalidRequest(
                "the prompt is empty; send at least one token (the end-of-text token for none)", "prompt"
            )
        if any(not 0 <= t < self.vocab for t in p):
            raise InvalidRequest(
                f"the prompt holds a token id outside the model's vocabulary of {self.vocab}", "prompt"
            )
        prefix = 0
        if request.image is not None:
            if self.model.vision is None:
                raise InvalidRequest("this model takes no images (its config has image_size = 0)", "messages")
            try:
                self.model.vision.check(request.image)
            except GptlabError as e:
                raise InvalidRequest(str(e), "messages") from None
            if len(request.image) != 1:
                raise InvalidRequest("one image per request", "messages")
            if request.echo_logprobs:
                raise InvalidRequest("prompt logprobs (echo) are for text prompts", "echo")
            prefix = self.model.config.image_tokens
        if prefix + len(p) > self.block:
            raise InvalidRequest(
                f"the prompt has {len(p)} tokens{f' after {prefix} image tokens' if prefix else ''}, more than "
                f"the model's context of {self.block}",
                "prompt",
            )
        if not 1 <= request.n <= self.max_batch:
            raise InvalidRequest(f"n must be in [1, {self.max_batch}] (the server's --max-batch), got {request.n}", "n")
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"logprobs must be in [0, {MAX_LOGPROBS}], got {request.logprobs}", "logprobs")
        used = prefix + len(p)
        max_tokens = self.block - used if request.max_tokens is None else request.max_tokens
        if max_tokens < 0 or used + max_tokens > self.block:
            raise InvalidRequest(
                f"the prompt has {used} tokens and max_tokens is {max_tokens}: {used + max_tokens} in all, "
                f"more than the model's context of {self.block}; shorten the prompt or lower max_tokens",
                "max_tokens",
            )
        return max_tokens

    def submit(self, request: Request) -> AsyncIterator[Chunk]:
        """The chunks of ``request`` as they are produced (call from a running asyncio loop). Raises
        :class:`GptlabError` for an invalid request and :class:`QueueFull` when the queue is full. Closing the
        iterator early (``break``, a dropped client) cancels the request."""
        max_tokens = self.check(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the caller's loop has closed: nobody is listening any more
                self.cancel(request.id)

        job = _Job(
            request,
            emit,
            time.perf_counter(),
            max_tokens,
            request.stop_ids if request.stop_ids is not None else frozenset({self.tokenizer.eot_id}),
            dataclasses.replace(request.sampling, seed=0),
            offset=0 if request.image is None else self.model.config.image_tokens,
        )
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting for a row); retry later")
            self.waiting.append(job)
        self._wake.set()
        self._event("queued", job)
        return self._stream(request.id, queue)

    async def _stream(self, rid: str, queue: asyncio.Queue[Any]) -> AsyncIterator[Chunk]:
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is None:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                self.cancel(rid)

    def cancel(self, request_id: str) -> None:
        """Stop a request: its rows are freed before the next decode step."""
        with self._lock:
            self._cancel.setdefault(request_id, self.steps)
        self._wake.set()

    def close(self) -> None:
        """Stop the scheduler thread; requests still running end with :class:`Cancelled`."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    def counts(self) -> dict[str, int]:
        """Requests waiting for rows and running (prefilling or decoding), and rows in use."""
        with self._lock:
            return {
                "waiting": len(self.waiting),
                "running": len(self.prefilling) + len(self.running),
                "rows": sum(r is not None for r in self.rows),
            }

    # ---------------------------------------------------------------- the scheduler thread
    def _event(self, name: str, job: _Job, **kw: Any) -> None:
        if self.metrics is not None:
            self.metrics.event(name, job, **kw)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                stopping, cancel, self._cancel = self._stopping, self._cancel, {}
            if stopping:
                for job in [*self.waiting, *self.prefilling, *self.running]:
                    job.emit(Cancelled("the server is shutting down"))
                return
            if cancel:
                self._drop(cancel)
            try:
                self._admit()
                self._prefill()
                self._decode()
                self._expire()
            except Exception as e:  # a failed step fails the requests in it, not the server
                jobs = [*self.prefilling, *self.running]
                for job in jobs:
                    job.emit(e)
                self._drop({j.request.id: self.steps for j in jobs}, "failed")
            with self._lock:
                idle = not (self.waiting or self.prefilling or self.running or self._cancel or self._stopping)
                if idle:
                    self._wake.clear()
            if idle:
                self._wake.wait()

    def _drop(self, ids: dict[str, int], why: str = "cancelled") -> None:
        """Free the rows of requests ``ids`` (id -> decode steps done when they were cancelled)."""
        with self._lock:
            gone = [j for j in self.waiting if j.request.id in ids]
            for j in gone:
                self.waiting.remove(j)
        for j in [j for j in self.prefilling if j.request.id in ids]:
            self.prefilling.remove(j)
            gone.append(j)
        for j in [j for j in self.running if j.request.id in ids]:
            self.running.remove(j)
            gone.append(j)
        for j in gone:
            for c in j.choices:
                self._free(c)
            if why == "cancelled":  # end the stream of a caller that may still be listening
                j.emit(Cancelled("the request was cancelled"))
            self._event(why, j, steps=self.steps - ids[j.request.id])

    def _free(self, c: _Choice) -> None:
        if self.rows[c.row] is c:
            self.rows[c.row] = None

    def _admit(self) -> None:
        """Give rows to waiting requests, fairly: the next one is the oldest waiting request of the client holding
        the fewest rows (ties: the earliest), so one client's many prompts cannot starve the others; a request waits
        until all its n rows are free."""
        while True:
            with self._lock:
                free = [i for i, r in enumerate(self.rows) if r is None]
                if not self.waiting or not free:  # (the common case in a busy decode loop: no fairness to compute)
                    return
                job = self._next_fair()
                if len(free) < job.request.n:
                    return
                self.waiting.remove(job)
            r = job.request
            seed = r.seed if r.seed is not None else secrets.randbits(62)
            for j, row in zip(range(r.n), free):
                seen = None
                if r.sampling.repetition_penalty != 1.0:
                    seen = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
                    seen[r.prompt] = True
                c = _Choice(
                    j,
                    row,
                    TextStream(self.tokenizer, r.stop),
                    torch.Generator(self.device).manual_seed((seed + j) % 2**64),
                    seen,
                    history=list(r.prompt),
                    matcher=None if r.grammar is None else Matcher(r.grammar, self.tokenizer, self.vocab),
                    adapter=r.adapter,
                )
                job.choices.append(c)
                self.rows[row] = c
                if self.draft is not None:
                    self.draft.reset(row)
            job.admitted = time.perf_counter()
            self.prefilling.append(job)
            self._event("admitted", job)

    def _reuse(self, job: _Job) -> None:
        """Copy the prompt's blocks that the prefix cache holds into the first choice's row, when the prompt's
        prefill starts (so that requests admitted together find what the ones before them stored). At least one
        prompt token is left to prefill (its logits give the first token), and an image prefix is reused whole or
        not at all (its pass runs the image encoder)."""
        r, B = job.request, self.prefix_block
        if self.prefix is None or job.looked_up:
            return
        job.looked_up = True
        names = self._names(job)
        usable = (job.offset + len(r.prompt) - 1) // B
        found = self.prefix.match(names[:usable])
        if r.image is not None and len(found) * B < self._first_end(job):
            found = []
        self.prefix.load(found, self.pool, job.choices[0].row)
        job.reused = len(found)
        job.choices[0].filled = len(found) * B
        self._event("prefix", job, hit=len(found) * B, asked=job.offset + len(r.prompt))

    def _names(self, job: _Job) -> list[bytes]:
        """The prefix cache's names of the prompt's whole blocks."""
        assert self.prefix is not None
        if job.names is None:
            r = job.request
            job.names = self.prefix.names(PrefixCache.root(r.image, r.adapter), [-1] * job.offset + r.prompt)
        return job.names

    def _next_fair(self) -> _Job:
        held: dict[str, int] = {}
        for j in [*self.prefilling, *self.running]:
            held[_client(j)] = held.get(_client(j), 0) + len(j.choices)
        first: dict[str, _Job] = {}
        for j in self.waiting:  # in arrival order: each client's oldest
            first.setdefault(_client(j), j)
        return min(first.values(), key=lambda j: (held.get(_client(j), 0), j.arrived))

    def _first_end(self, job: _Job) -> int:
        """The end of an image request's first pass: the image and the prompt up to the next block boundary."""
        return min(job.offset + len(job.request.prompt), (job.offset // self.prefix_block + 1) * self.prefix_block)

    def _prefill(self) -> None:
        """Prompt tokens into the cache, oldest newcomer first, until ``prefill_chunk`` tokens went in this
        iteration; prompts completed here sample their first tokens.

        A forward pass fills one block of a prompt's row: slots ``[a, b)`` with ``a`` on the grid of
        ``prefix_block`` and ``b`` the next boundary or the prompt's end (an image request's first pass: the image
        and the prompt up to the next boundary). A prompt is thus always cut at the same slots, and each of its
        passes has the same inputs and shapes whether the prompt runs alone, among newcomers, or after a
        prefix-cache hit: the keys, values and logits are the same bits (:mod:`gptlab.serve.prefix_cache`). Where
        the model's products give a row the same bits whatever the other rows are (:func:`packs_prompts`), one
        forward pass takes blocks of several newcomers at once (:meth:`_next_passes`,
        :class:`~gptlab.kv_cache.PackedCache`): the products see all their tokens, each attends over its own row,
        and each gets the bits of its pass alone; their first tokens come from one pass of the head."""
        budget = self.prefill_chunk
        while self.prefilling:
            passes = self._next_passes(budget)
            if not passes:
                return
            budget -= sum(b - a for _, a, b in passes)
            self._run_passes(passes)

    def _next_passes(self, budget: int) -> list[tuple[_Job, int, int]]:
        """The blocks of the next forward pass, (job, a, b) each: the oldest newcomer's next block (not when it
        exceeds what is left of ``budget``, unless nothing ran yet in this iteration) and, where prompts pack, its
        blocks after that and those of the newcomers after it, in order, while the budget lasts (the oldest prompt
        still completes first). Only blocks of up to ``F32_MAX_ROWS`` slots pack: gptlab's fp32 kernel computes
        their products alone too, where a longer block alone gets MKL's, faster there (docs/serving.md); such a
        block, like an image request's first one, runs alone. Packing also stops at a newcomer whose first block
        one ahead of it will store, not found in the prefix cache (it waits, to find that block there)."""
        out: list[tuple[_Job, int, int]] = []
        ahead: set[bytes] = set()  # the blocks that the newcomers before this one will store, not in the cache yet
        B = self.prefix_block
        for job in self.prefilling:
            r = job.request
            if self.prefix is not None:
                names = self._names(job)
                if not job.looked_up and names and names[0] in ahead:
                    break
                self._reuse(job)
                ahead.update(names[job.reused :])
            a, total = job.choices[0].filled, job.offset + len(r.prompt)
            while a < total:
                b = self._first_end(job) if a == 0 and r.image is not None else min(total, a - a % B + B)
                packs = self.packs and r.image is None and b - a <= kernels.F32_MAX_ROWS
                if (out and not packs) or (b - a > budget and (out or budget < self.prefill_chunk)):
                    return out
                budget -= b - a
                out.append((job, a, b))
                if not packs:
                    return out
                a = b
        return out

    def _run_passes(self, passes: list[tuple[_Job, int, int]]) -> None:
        """One forward pass over ``passes`` (several only where prompts pack; consecutive blocks of one prompt
        attend over the ones before them, written earlier in the same layer); the prompts it completes join the
        running requests with their first tokens."""
        if len(passes) > 1:
            tokens = [t for job, a, b in passes for t in job.request.prompt[a:b]]  # (no image: offset 0)
            cache = PackedCache(self.pool, [(job.choices[0].row, a, b) for job, a, b in passes])
            idx = torch.tensor([tokens], device=self.device)
            with kernels.row_invariant():
                hidden = self.model.hidden_states(idx, cache=cache, slots=cache.slots)
            ends = [e - 1 for _, e in cache.spans]
        else:
            [(job, a, b)] = passes
            r, row = job.request, job.choices[0].row
            image = r.image.to(self.device) if a == 0 and r.image is not None else None
            idx = torch.tensor([r.prompt[max(a - job.offset, 0) : b - job.offset]], device=self.device)
            slots = torch.arange(a, b, device=self.device)
            self._use_adapters([r.adapter])
            view = self.pool.view(slice(row, row + 1), b)
            hidden = self.model.hidden_states(idx, images=image, cache=view, slots=slots)
            ends = [b - a - 1]
        started: list[tuple[_Job, int]] = []  # prompts completed here that generate, and their last position
        for (job, _, b), end in zip(passes, ends):
            first = job.choices[0]
            first.filled = b
            total = job.offset + len(job.request.prompt)
            if b < total:
                continue
            self.prefilling.remove(job)
            for c in job.choices[1:]:  # every choice shares the prompt's keys and values
                self.pool.copy_rows(self.pool, first.row, c.row, 0, total)
                c.filled = total
            if self.prefix is not None and job.looked_up:
                self._event("prefix_stored", job, evicted=self.prefix.store(self._names(job), self.pool, first.row))
            if job.request.echo_logprobs:
                job.emit(Chunk(-1, logprobs=self._prompt_logprobs(job.request)))
            if job.max_tokens == 0:
                for c in job.choices:
                    self._finish(job, c, "length", [], None)
                self._retire(job)
                continue
            self.running.append(job)
            started.append((job, end))
        if not started:
            return
        with kernels.row_invariant():  # (rows = prompts started, packed or not: the bits of each alone)
            logits = self.model.logits(hidden[0, [end for _, end in started]])
        live = [(job, c) for job, _ in started for c in job.choices]
        rows = [i for i, (job, _) in enumerate(started) for _ in job.choices]
        self._sample(live, logits[rows])

    def _compile_single(self) -> None:
        """``compile=True``: the decode step of a single live row, compiled here, before the first request, with a
        dynamic cache length, on views rounded up to ``CACHE_BUCKET`` slots (:func:`bucketed`): two graphs, one for
        the lengths short of the whole context and one for the whole (torch 2.13 specializes a view that spans its
        tensor). Where compiling fails (a model Dynamo cannot capture whole), the step stays eager, with a warning. The
        served model does not change while the scheduler serves it: the step needs no :meth:`CompiledStep.refresh`."""
        step = CompiledStep(self.model, step_options(self.device), dynamic=True)
        try:
            with torch.no_grad():
                for length in sorted({bucketed(n, self.block) for n in range(1, self.block + 1)}):
                    step(
                        torch.zeros(1, 1, dtype=torch.long, device=self.device),
                        self.pool.view(slice(0, 1), length),
                        torch.zeros(1, dtype=torch.long, device=self.device),
                    )
        except Exception as e:  # any compiler failure: serve eagerly rather than not at all
            print(f"gptlab: warning: the one-stream decode step did not compile, it stays eager: {e}", file=sys.stderr)
            return
        self._single = step

    def _decode(self) -> None:
        """One decode step for every row with a token to feed: speculative when the draft proposes, else plain."""
        live = [(job, c) for job in self.running for c in job.choices if not c.done]
        if not live:
            return
        t0 = time.perf_counter()
        made = self._speculate(live)
        if made is not None:
            self.throttle.speculative(made, len(live), time.perf_counter() - t0)
            return
        self._plain_decode(live)
        if self.draft is not None:
            self.throttle.plain(time.perf_counter() - t0)

    def _speculate(self, live: list[tuple[_Job, _Choice]]) -> int | None:
        """One speculative step (the draft's proposals, verified together by
        :func:`~gptlab.generate.speculative.verify_step`): the tokens it produced, or None when this step should be
        a plain one (no draft, throttled, nothing proposed, or a row that wants logprobs or a repetition penalty)."""
        if self.draft is None or not self.throttle.drafting():
            return None
        if any(
            job.request.logprobs is not None or job.group.repetition_penalty != 1.0 or c.matcher is not None
            for job, c in live
        ):
            return None
        hi = 1 + max(c.row for _, c in live)
        filled = [row.filled if row is not None else 0 for row in self.rows[:hi]]
        room = min(self.spec_k, self.block - 1 - max(filled), *(job.max_tokens - c.produced - 1 for job, c in live))
        if room <= 0:
            return None
        histories: list[list[int] | None] = [None] * hi
        for _, c in live:
            histories[c.row] = c.history
        by_row, _ = self.draft.propose(histories, room, GREEDY, [])
        proposals = [by_row[c.row] for _, c in live]
        if not any(proposals):
            return None
        # every row of the pool up to the last live one is fed (rows that are not decoding write a dummy token at
        # their first unfilled slot, overwritten later; their outcome is ignored)
        pending, props = [0] * hi, [list[int]() for _ in range(hi)]
        samplings, generators = [GREEDY] * hi, [self._spare] * hi
        for (job, c), prop in zip(live, proposals):
            pending[c.row], props[c.row] = c.last or 0, prop
            samplings[c.row], generators[c.row] = job.group, c.generator
        view = self.pool.view(slice(0, hi), max(filled) + max(len(p) for p in proposals) + 1)
        accepted, after = verify_step(self.model, view, pending, props, filled, samplings, generators)
        n_acc, nxt = [accepted[c.row] for _, c in live], [after[c.row] for _, c in live]
        self.steps += 1
        now = time.perf_counter()
        produced = 0
        for i, (job, c) in enumerate(live):
            n = n_acc[i]
            self.spec.record(len(proposals[i]), n)
            self._event("speculative", job, proposed=len(proposals[i]), accepted=n)
            c.filled += 1 + n  # the fed token and the accepted proposals are in the cache now
            for t in proposals[i][:n] + [nxt[i]]:
                produced += 1
                if self._take(job, c, t, None, now) or c.done:
                    break
        self.draft.accepted([None if h is None else len(h) for h in histories])
        for job in [j for j in self.running if all(x.done for x in j.choices)]:
            self.running.remove(job)
            self._retire(job)
        return produced

    def _plain_decode(self, live: list[tuple[_Job, _Choice]]) -> None:
        if self._single is not None and len(live) == 1:  # one stream: the compiled step on that row alone
            c = live[0][1]
            view = self.pool.view(slice(c.row, c.row + 1), bucketed(c.filled + 1, self.block))
            idx = torch.tensor([[c.last or 0]], device=self.device)
            logits = self._single(idx, view, torch.tensor([c.filled], device=self.device))
            self.steps += 1
            c.filled += 1
            self._sample(live, logits[:, -1])
            return
        hi = 1 + max(c.row for _, c in live)
        tokens = [0] * hi
        slots = [0] * hi  # idle and prefilling rows write at their first unfilled slot, overwritten later
        for i in range(hi):
            row = self.rows[i]
            if row is not None:
                slots[i] = row.filled
        for _, c in live:
            tokens[c.row] = c.last or 0  # every live choice has a last token
        view = self.pool.view(slice(0, hi), max(slots) + 1)
        idx = torch.tensor(tokens, device=self.device)[:, None]
        self._use_adapters([row.adapter if row is not None else 0 for row in self.rows[:hi]])
        logits = self.model.decode(idx, view, torch.tensor(slots, device=self.device)[:, None])
        self.steps += 1
        for _, c in live:
            c.filled += 1
        rows = torch.tensor([c.row for _, c in live], device=self.device)
        self._sample(live, logits[rows, -1])

    def _sample(self, live: list[tuple[_Job, _Choice]], logits: torch.Tensor) -> None:
        """Choose each row's next token (rows with the same settings sampled together; a row with a grammar from
        the tokens it allows), report it (logprobs: the model's own, before the grammar's mask), retire rows."""
        now = time.perf_counter()
        chosen: list[int] = [0] * len(live)
        constrained = [i for i, (_, c) in enumerate(live) if c.matcher is not None]
        masked = logits
        if constrained:
            masked = logits.clone()
            for i in constrained:
                allowed = live[i][1].matcher.allowed().to(logits.device)  # type: ignore[union-attr]
                masked[i, : len(allowed)].masked_fill_(~allowed, float("-inf"))
                masked[i, len(allowed) :] = float("-inf")
        groups: dict[Sampling, list[int]] = {}
        for i, (job, _) in enumerate(live):
            groups.setdefault(job.group, []).append(i)
        for s, members in groups.items():
            at = torch.tensor(members, device=logits.device)
            seen = None
            if s.repetition_penalty != 1.0:
                seen = torch.stack([live[i][1].seen for i in members])  # type: ignore[misc]
            toks = next_tokens(masked[at], s, seen, [live[i][1].generator for i in members])
            for i, t in zip(members, toks.tolist()):
                chosen[i] = t
        want = [i for i, (job, _) in enumerate(live) if job.request.logprobs is not None]
        reports: dict[int, TokenLogprob] = {}
        if want:
            lp = logits[torch.tensor(want, device=logits.device)].float().log_softmax(-1)
            k = max(live[i][0].request.logprobs or 0 for i in want)
            top_v, top_i = lp.topk(max(k, 1), dim=-1)
            for j, i in enumerate(want):
                kk = live[i][0].request.logprobs or 0
                reports[i] = TokenLogprob(
                    chosen[i],
                    float(lp[j, chosen[i]]),
                    list(zip(top_i[j, :kk].tolist(), top_v[j, :kk].tolist())),
                )
        jobs_done: list[_Job] = []
        for i, (job, c) in enumerate(live):
            self._take(job, c, chosen[i], [reports[i]] if i in reports else None, now)
            if all(x.done for x in job.choices):
                jobs_done.append(job)
        for job in jobs_done:
            self.running.remove(job)
            self._retire(job)

    def _take(self, job: _Job, c: _Choice, t: int, lps: list[TokenLogprob] | None, now: float) -> bool:
        """Record choice ``c``'s next token ``t``: metrics, stop checks, the chunk to hand out. True when it ended
        the choice."""
        c.produced += 1
        self._event("token", job, gap=None if c.last is None else now - c.last_time)
        if job.first_token_time is None:
            job.first_token_time = now
            self._event("first_token", job, ttft=now - job.arrived)
        c.last, c.last_time = t, now
        c.history.append(t)
        if c.seen is not None:
            c.seen[t] = True
        if c.matcher is not None:
            c.matcher.advance(t)
        if t in job.stop_ids:
            self._finish(job, c, "stop", [t], lps)  # the stop token adds no text
        else:
            c.stream.push(t)
            if c.stream.stopped or (c.matcher is not None and c.matcher.finished):
                self._finish(job, c, "stop", [t], lps)
            elif c.produced >= job.max_tokens:
                self._finish(job, c, "length", [t], lps)
            else:
                job.emit(Chunk(c.index, c.stream.take(), [t], lps))
        return c.done

    def _finish(
        self, job: _Job, c: _Choice, reason: str, tokens: list[int], logprobs: list[TokenLogprob] | None
    ) -> None:
        """End a choice: free its row and hand out its last chunk, with any text held back so far."""
        c.done = True
        self._free(c)
        job.emit(Chunk(c.index, c.stream.take(final=True), tokens, logprobs, reason))

    def _expire(self) -> None:
        """End the requests that have generated for ``max_request_seconds``: their unfinished choices stop here."""
        if not self.max_request_seconds:
            return
        late = time.perf_counter() - self.max_request_seconds
        for job in [j for j in [*self.prefilling, *self.running] if j.admitted < late]:
            (self.prefilling if job in self.prefilling else self.running).remove(job)
            self._event("expired", job)  # (before the stream ends: a caller that saw the end sees the count)
            for c in job.choices:
                if not c.done:
                    self._finish(job, c, "length", [], None)
            self._retire(job)

    def _use_adapters(self, ids: list[int]) -> None:
        """With LoRA adapters served (``--lora``), the adapter of each row of the next forward pass."""
        if self.banked:
            use_adapters(self.model, torch.tensor(ids, device=self.device))

    def _retire(self, job: _Job) -> None:
        job.emit(None)
        self._event("finished", job, seconds=time.perf_counter() - job.arrived)

    @torch.no_grad()
    def _prompt_logprobs(self, request: Request) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the tokens before it (one forward pass without the cache)."""
        p = request.prompt
        self._use_adapters([request.adapter])
        logits, _ = self.model(torch.tensor([p], device=self.device))
        lp = logits[0, :-1].float().log_softmax(-1)
        k = request.logprobs or 0
        top_v, top_i = lp.topk(max(k, 1), dim=-1)
        out = [TokenLogprob(p[0], float("nan"), [])]
        for j, t in enumerate(p[1:]):
            out.append(TokenLogprob(t, float(lp[j, t]), list(zip(top_i[j, :k].tolist(), top_v[j, :k].tolist()))))
        return out


def _client(job: _Job) -> str:
    return job.request.client or job.request.id


class InvalidRequest(GptlabError):
    """A request the scheduler cannot run (HTTP 400); ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFull(GptlabError):
    """No room in the queue (HTTP 429), or the server is stopping."""
