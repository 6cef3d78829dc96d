"""The generation engine: KV-cached, batched, streaming sampling from a GPT.

A call prefills every prompt in one forward pass (rows left-padded to the longest prompt; each row's positions start
at 0 on its own first token, so a row decodes exactly as it would alone), then decodes one token per row per step,
each step reading the keys and values of earlier tokens from a preallocated :class:`~gptlab.kv_cache.KVCache`
instead of recomputing them. Rows finish independently (stop token, stop string, or ``max_new_tokens``); the batch
stops when every row has. Tokens are chosen by :mod:`.sampling` (row ``r`` draws from its own stream seeded with
``seed + r``); with a draft, by :mod:`.speculative`.

``compile=True`` compiles the decode step with static shapes (the cache length is rounded up to a multiple of 256,
so one compiled graph serves many calls). On CPU that is where the speed is: see docs/generation.md.
"""

from __future__ import annotations

import time
import types
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .. import hugepages
from ..errors import GptlabError
from ..kv_cache import KVCache
from ..model import GPT
from ..tokenizer import prompt_ids
from .sampling import Sampling, chosen_logprobs, next_tokens, row_generators
from .speculative import SPEC_K, SPEC_K_RANGE, Draft, SpeculativeStats, as_steps, speculative_rounds

CACHE_BUCKET = 256  # compiled decode: cache lengths are rounded up to a multiple of this (fewer recompiles)
# Materialize every intermediate instead of fusing LayerNorm/GELU into the matrix-vector reductions that read
# them: fused, inductor recomputes the producer once per output row (3x slower decode on CPU).
# And no size asserts: inductor otherwise checks the sizes and strides of every input (273 for GPT-2: the weights
# are inputs) and of every op's output at each call; Dynamo's guards on the step's inputs, and for the weights
# CompiledStep.refresh once per generation, already pin the shapes it was compiled for. GPT-2 124M's compiled
# one-row step, with and without them alternating in one process, AMD EPYC Zen 4, 2 threads: int4 3.32 -> 3.18 ms
# median, int8 5.28 -> 5.14; 0.47 -> 0.37 ms with int4_mm returning zeros at once (the step's cost besides products).
COMPILE_OPTIONS: dict[str, Any] = {"realize_opcount_threshold": 0, "size_asserts": False}
# On a CPU the step's wrapper is C++ (inductor's cpp_wrapper) instead of Python: its ~100 calls (each layer's
# products, attention, fused kernels) cost less to launch. GPT-2 124M's compiled one-row decode step, both wrappers
# alternating in one process on an AMX Xeon, 2 threads: int4 3.38 -> 3.17 ms, int8 5.52 -> 5.01, fp32 18.1 -> 17.6.
# The price is the first compile on a machine (~10 s more; inductor's cache keeps the result).
CPU_COMPILE_OPTIONS: dict[str, Any] = {"cpp_wrapper": True}


def step_options(device: torch.device, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The inductor options of a compiled decode step on ``device``, then ``extra``."""
    return {**COMPILE_OPTIONS, **(CPU_COMPILE_OPTIONS if device.type == "cpu" else {}), **(extra or {})}


def bucketed(length: int, block: int) -> int:
    """``length`` rounded up to a multiple of ``CACHE_BUCKET``, capped at the context ``block``: the cache lengths
    a compiled decode step is built for."""
    return min(-(-length // CACHE_BUCKET) * CACHE_BUCKET, block)


def model_state(model: nn.Module) -> list[Any]:
    """What a compiled step of ``model`` is traced from, beyond its inputs: its config, every module (itself, its
    train/eval mode) and every parameter and buffer (itself, dtype, shape, device). Values are not in it: a
    compiled step reads the weights at each call."""
    tensors = [*model.parameters(), *model.buffers()]
    return [
        repr(getattr(model, "config", None)),
        *((m, m.training) for m in model.modules()),
        *((t, t.dtype, t.shape, t.device) for t in tensors),
    ]


def same_state(a: list[Any], b: list[Any]) -> bool:
    """Whether two :func:`model_state` lists describe the same model state (modules and tensors by identity)."""
    return len(a) == len(b) and all(
        x == y if isinstance(x, str) else x[0] is y[0] and x[1:] == y[1:] for x, y in zip(a, b)
    )


class CompiledStep:
    """``model.decode(idx, cache, slots)`` compiled, with static shapes (the Engine: one graph per cache length) or
    ``dynamic`` ones (the serving scheduler's single-row step: one graph for every length of a pool row's view short
    of the whole context, and one for the whole).

    Each instance compiles a function of its own (a fresh code object, so a Dynamo cache of its own): its graphs
    serve this model only, whatever else this process compiles (compiled GPT frames of other models cannot make
    Dynamo fail on this one either, seen with torch 2.13). That lets Dynamo skip its guards on the model's modules
    and weights, which it would otherwise check at every call (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``:
    GPT-2 has 1,389 guard nodes, 273 tensor checks among them; the profiler put their lookup at 0.48-0.65 ms a step,
    0.11-0.12 ms without the modules'. Both steps alternating in one process, 15 rounds of 20 steps, AMD EPYC Zen 4:
    int4 median 4.62 -> 4.28 ms (best 4.16 -> 4.03), int8 6.67 -> 6.35 (6.01 -> 5.93)). In their place :meth:`refresh`,
    called once per generation rather than per token, compares the model with the state it was compiled for
    (:func:`model_state`) and compiles anew where it changed. A model carrying LoRA adapters keeps Dynamo's guards:
    their on/off switch and per-row adapter ids are module attributes that change between calls."""

    def __init__(self, model: GPT, options: dict[str, Any], dynamic: bool = False) -> None:
        self.model, self.options, self.dynamic = model, options, dynamic
        self._build()

    def _build(self) -> None:
        from ..lora import LoRA, LoRABank

        model = self.model

        def step(idx: torch.Tensor, cache: KVCache, slots: torch.Tensor) -> torch.Tensor:
            return model.decode(idx, cache, slots)

        own = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__, None, step.__closure__)
        options = dict(self.options)
        if not any(isinstance(m, (LoRA, LoRABank)) for m in model.modules()):
            options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        self._fn = torch.compile(own, dynamic=self.dynamic, fullgraph=True, options=options)
        self._state = model_state(model)

    def refresh(self) -> CompiledStep:
        """Compile anew if the model changed since (modules, weights' dtype/shape/device, config, train mode)."""
        if not same_state(model_state(self.model), self._state):
            self._build()
        return self

    def __call__(self, idx: torch.Tensor, cache: KVCache, slots: torch.Tensor) -> torch.Tensor:
        return self._fn(idx, cache, slots)


@dataclass
class Completion:
    """One row's result: the new token ids, the reason it stopped, and (with a tokenizer) its text."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "length", "stop_token" or "stop_string"
    text: str | None = None
    # with logprobs=True: log p of each token drawn, the stop token included (sampling.chosen_logprobs)
    logprobs: list[float] = field(default_factory=list)


class Engine:
    """KV-cached generation for one model (and optionally its tokenizer, for text in and out, and stop strings)."""

    def __init__(
        self,
        model: GPT,
        tokenizer=None,
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
        draft: Draft | None = None,
        spec_k: int = SPEC_K,
        spec_min_speedup: float = 1.0,
    ) -> None:
        """``compile_options`` add inductor options to the compiled decode step, e.g. ``{"triton.cudagraphs":
        True}`` to replay it as a CUDA graph (one launch per token instead of one per kernel). ``draft`` turns on
        speculative decoding with ``spec_k`` proposals per round (:mod:`.speculative`): same tokens as plain
        greedy decoding, samples distributed as plain sampling's; statistics in ``stats["speculative"]``. Drafting
        pauses while it produces less than ``spec_min_speedup`` times plain decoding's tokens per second
        (:class:`~.speculative.Throttle`; 0: never)."""
        if draft is not None and not SPEC_K_RANGE[0] <= spec_k <= SPEC_K_RANGE[1]:
            raise GptlabError(f"spec_k must be in [{SPEC_K_RANGE[0]}, {SPEC_K_RANGE[1]}], got {spec_k}")
        self.draft, self.spec_k, self.spec_min_speedup = draft, spec_k, spec_min_speedup
        self.model = hugepages.place_weights(model.eval())  # CPU weights on huge pages: faster decode steps
        hugepages.keep_freed_memory_in_heap(self.device.type)  # (activations, logits: not faulted in anew)
        self.tokenizer = tokenizer
        self.compile = compile
        options = step_options(self.device, compile_options)
        self._decode: Any = CompiledStep(model, options) if compile else model.decode
        self.stats: dict[str, Any] = {}
        self.step_logprobs = torch.empty(0)  # stream_tokens(logprobs=True): the last step's, per row

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---------------------------------------------------------------- token level
    def cache_for(self, batch: int, length: int) -> KVCache:
        """The cache a generation of ``length`` total slots uses (rounded up when compiling, capped at context)."""
        block = self.model.config.block_size
        length = bucketed(length, block) if self.compile else min(length, block)
        return KVCache(self.model.config, batch, length, self.device, self.model.dtype)

    @torch.no_grad()
    def stream_tokens(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        stop_ids: Iterable[int] = (),
        sliding_window: bool = False,
        images: torch.Tensor | None = None,
        logprobs: bool = False,
    ) -> Iterator[list[int | None]]:
        """Yield, per decode step, each row's new token (``None`` for rows already finished by a stop id).
        ``images`` [B, channels, size, size], one per prompt, are prefilled once as each row's image prefix. With
        ``logprobs``, ``self.step_logprobs`` holds the step's tokens' log-probabilities [B] at each yield."""
        block = self.model.config.block_size
        if not prompts or any(len(p) == 0 for p in prompts):
            raise GptlabError("every prompt needs at least one token (use the end-of-text id for an empty prompt)")
        if max_new_tokens < 0:
            raise GptlabError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        prefix = 0
        if images is not None:
            if self.model.vision is None:
                raise GptlabError("this model takes no images (its config has image_size = 0); drop the image")
            if len(images) != len(prompts):
                raise GptlabError(f"{len(images)} images for {len(prompts)} prompts; give one image per prompt")
            if sliding_window or self.draft is not None:
                raise GptlabError("an image prompt has no sliding window or speculative decoding; drop those")
            self.model.vision.check(images)
            prefix = self.model.config.image_tokens
        longest = max(len(p) for p in prompts) + prefix
        if not sliding_window and longest + max_new_tokens > block:
            what = (
                f"the longest prompt has {longest} tokens"
                if longest > block
                else f"{longest} prompt tokens + {max_new_tokens} new tokens"
            )
            raise GptlabError(
                f"{what}, more than the model's context of {block}; shorten the prompt or "
                f"max_new_tokens, or allow a sliding window (--sliding-window)"
            )
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise GptlabError(f"a prompt holds a token id outside the model's vocabulary of {vocab}")
        if isinstance(self._decode, CompiledStep):
            self._decode.refresh()
        if self.draft is not None:
            if logprobs:
                raise GptlabError("speculative decoding reports no log-probabilities; drop the draft")
            if sliding_window:
                raise GptlabError("speculative decoding has no sliding window; drop --sliding-window or the draft")
            stats = SpeculativeStats(self.spec_k)
            rounds = speculative_rounds(
                self.model,
                self.draft,
                prompts,
                max_new_tokens,
                self.spec_k,
                sampling,
                set(stop_ids),
                stats,
                self.spec_min_speedup,
            )
            # kept current as the rounds run: a caller may stop reading before the last one
            steps = 0

            def report() -> dict[str, Any]:
                return {
                    "prefill_seconds": stats.prefill_seconds,
                    "prefill_tokens": sum(len(p) for p in prompts),
                    "decode_seconds": stats.round_seconds + stats.plain_seconds,
                    "decode_steps": steps,
                    "cache_bytes": stats.cache_bytes,
                    "speculative": stats.report(),
                }

            self.stats = report()
            for row_tokens in as_steps(rounds, len(prompts)):
                steps += 1
                self.stats = report()
                yield row_tokens
            return
        stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=self.device)
        histories = [list(p) for p in prompts]
        B = len(histories)
        generators = row_generators(sampling.seed, B, self.device)
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros(B, vocab, dtype=torch.bool, device=self.device)
            for r, p in enumerate(histories):
                seen[r, p] = True
        stop_set = set(stop_ids)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)  # on the device, for the step's masking
        finished = [False] * B  # the same on the host: one device-to-host copy per step (the new tokens)
        self.stats = {"prefill_seconds": 0.0, "prefill_tokens": 0, "decode_seconds": 0.0, "decode_steps": 0}
        logits, cache, slot = self._prefill(histories, max_new_tokens, images)
        all_slots = torch.arange(cache.length, device=self.device)  # a step's slot is a view: no host-to-device copy
        for step in range(max_new_tokens):
            tok = next_tokens(logits[:, -1], sampling, seen, generators)
            tok = torch.where(done, tok.new_zeros(()), tok)
            if logprobs:
                self.step_logprobs = chosen_logprobs(logits[:, -1], tok, sampling)
            if seen is not None:
                seen[torch.arange(B), tok] = True
            new = tok.tolist()
            yield [None if f else t for t, f in zip(new, finished)]
            done |= torch.isin(tok, stop)
            for r, (h, t) in enumerate(zip(histories, new)):
                if not finished[r]:
                    h.append(t)
                    finished[r] = t in stop_set
            if all(finished) or step == max_new_tokens - 1:
                return
            if slot == cache.length:  # the context is full (only with a sliding window)
                keep = block - max(1, block // 4)
                logits, cache, slot = self._prefill([h[-keep:] for h in histories], max_new_tokens - step - 1)
                all_slots = torch.arange(cache.length, device=self.device)
                continue
            t0 = time.perf_counter()
            logits = self._decode(tok[:, None], cache, all_slots[slot : slot + 1])
            self.stats["decode_seconds"] += time.perf_counter() - t0
            self.stats["decode_steps"] += 1
            slot += 1

    def _prefill(
        self, histories: list[list[int]], remaining: int, images: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, KVCache, int]:
        """Left-pad the rows, run them (after their image prefix, if any) through the model in one pass, return
        (last logits, cache, next slot)."""
        block = self.model.config.block_size
        rows = [h[-block:] for h in histories]
        T = max(len(r) for r in rows)
        P = 0 if images is None else self.model.config.image_tokens
        pad = torch.tensor([T - len(r) for r in rows], device=self.device)
        idx = torch.tensor([[0] * (T - len(r)) + r for r in rows], device=self.device)
        cache = self.cache_for(len(rows), P + T + remaining)
        cache.pad = pad
        t0 = time.perf_counter()
        images = None if images is None else images.to(self.device)
        logits = self.model.decode(idx, cache, torch.arange(P + T, device=self.device), images=images)
        self.stats["prefill_seconds"] += time.perf_counter() - t0
        self.stats["prefill_tokens"] += (P + T) * len(rows)
        self.stats["cache_bytes"] = cache.nbytes
        return logits, cache, P + T

    def generate_tokens(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        stop_ids: Iterable[int] = (),
        sliding_window: bool = False,
        images: torch.Tensor | None = None,
        logprobs: bool = False,
    ) -> list[Completion]:
        """Every row's new tokens (a stop id ends its row and is not included; with ``logprobs``, its
        log-probability is)."""
        stop = set(stop_ids)
        out = [Completion() for _ in prompts]
        for step in self.stream_tokens(prompts, max_new_tokens, sampling, stop, sliding_window, images, logprobs):
            lps = self.step_logprobs.tolist() if logprobs else None
            for r, (c, t) in enumerate(zip(out, step)):
                if t is None or c.finish_reason != "length":
                    continue
                if lps is not None:
                    c.logprobs.append(lps[r])
                if t in stop:
                    c.finish_reason = "stop_token"
                else:
                    c.tokens.append(t)
        return out

    # ---------------------------------------------------------------- text level
    def _tok(self):
        if self.tokenizer is None:
            raise GptlabError("this engine has no tokenizer; pass one to work with text")
        return self.tokenizer

    def encode_prompt(self, prompt: str, image: bool = False) -> list[int]:
        """Token ids of a prompt (:func:`gptlab.tokenizer.prompt_ids`)."""
        return prompt_ids(self._tok(), prompt, image)

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        stop: Sequence[str] = (),
        stop_ids: Iterable[int] | None = None,
        sliding_window: bool = False,
        images: torch.Tensor | None = None,
    ) -> list[Completion]:
        """Text completions for a batch of prompts, each cut before the first stop string it produces.
        ``stop_ids`` defaults to the tokenizer's end-of-text token; ``images``: one per prompt (see
        :meth:`stream_tokens`)."""
        tok = self._tok()
        stop_ids = {tok.eot_id} if stop_ids is None else set(stop_ids)
        ids = [self.encode_prompt(p, images is not None) for p in prompts]
        streams = [TextStream(tok, stop) for _ in prompts]
        out = [Completion() for _ in prompts]
        live = list(range(len(prompts)))
        for step in self.stream_tokens(ids, max_new_tokens, sampling, stop_ids, sliding_window, images):
            for r in list(live):
                t = step[r]
                if t is None or t in stop_ids:
                    out[r].finish_reason = "stop_token"
                    live.remove(r)
                    continue
                out[r].tokens.append(t)
                streams[r].push(t)
                if streams[r].stopped:
                    out[r].finish_reason = "stop_string"
                    live.remove(r)
            if not live:
                break
        for c, s in zip(out, streams):
            c.text = s.text()
        return out

    def stream(
        self,
        prompt: str,
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        stop: Sequence[str] = (),
        stop_ids: Iterable[int] | None = None,
        sliding_window: bool = False,
        image: torch.Tensor | None = None,
    ) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces, as soon as they are whole characters (a multi-byte
        character split across tokens is held back until complete) and cannot be the start of a stop string.
        ``image`` [1, channels, size, size] goes before the prompt."""
        tok = self._tok()
        stop_ids = {tok.eot_id} if stop_ids is None else set(stop_ids)
        s = TextStream(tok, stop)
        ids = self.encode_prompt(prompt, image is not None)
        for step in self.stream_tokens([ids], max_new_tokens, sampling, stop_ids, sliding_window, image):
            if step[0] is None or step[0] in stop_ids:
                break
            s.push(step[0])
            piece = s.take()
            if piece:
                yield piece
            if s.stopped:
                break
        piece = s.take(final=True)
        if piece:
            yield piece


class TextStream:
    """Incremental detokenization of one row: whole characters only, cut at the first stop string."""

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False
        self._text = ""

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            text, self.stopped = text[: min(hits)], True
        self._text = text

    def text(self) -> str:
        return self._text

    def take(self, final: bool = False) -> str:
        """The text not yet handed out that is safe to hand out now."""
        end = len(self._text)
        if not final and not self.stopped:
            if self._text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                end = len(self._text.rstrip("\ufffd"))
            for s in self.stop:  # hold back a tail that may grow into a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self._text[end - k : end] == s[:k]:
                        end -= k
                        break
        end = max(end, self.sent)
        piece, self.sent = self._text[self.sent : end], end
        return piece
