"""Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen
et al. 2023): a cheap draft proposes k tokens, the target scores all of them in one forward pass, and a
rejection rule keeps a prefix so that the output is distributed *exactly* as the target's own samples.

The rule, per proposed token x_i drawn from the draft's q_i: accept with probability min(1, p_i(x) / q_i(x)); at the
first rejection draw the replacement from norm(max(0, p_i - q_i)); if all k are accepted draw one more token from
p_k. Greedy decoding (temperature 0) accepts while the proposal is the target's argmax and then takes the argmax, so
its tokens equal plain greedy decoding's. p is the distribution the plain sampler draws from (temperature, top-k,
top-p, min-p applied), so sampled output keeps those filters.

Drafts (:class:`ModelDraft`: any smaller gptlab model with the same tokenizer, e.g. a distilled student or the model's
own int4 copy; :class:`NgramDraft`: prompt lookup, free) propose per row; rows of a batch accept different counts and
continue from their own cache slots. :class:`SpeculativeStats` reports per-position acceptance, the mean accepted
length and the speedup Leviathan's formula predicts from the measured acceptance rate α and cost ratio c,
(1 − α^(k+1)) / ((1 − α)(k c + 1)), next to the measured one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from ..errors import GptlabError
from ..kv_cache import KVCache
from ..model import GPT
from .sampling import Sampling, argmax, draw, next_tokens, row_generators, target_probs


def verify(
    p: torch.Tensor,
    q: torch.Tensor | None,
    proposals: torch.Tensor,
    counts: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leviathan et al.'s acceptance rule for a batch of rows, without a Python loop.

    ``p`` [B, K+1, V]: the target's distributions at the K proposed positions and one after; ``q`` [B, K, V] the
    draft's (None: a deterministic draft, q one-hot at its proposal); ``proposals`` [B, K] (row r's first
    ``counts[r]`` are real); ``uniforms`` [B, K+1] independent U[0, 1) draws (the row's own random stream). Returns
    (accepted counts n [B], the token after them [B]): proposal i is accepted if u_i q_i(x) < p_i(x) (probability
    min(1, p/q)) and all before it were; the next token is drawn, by inverse CDF with u_K, from norm(max(0, p_n -
    q_n)) after a rejection and from p_n otherwise. For greedy decoding p is one-hot at the target's argmax (and so
    is a deterministic draft's q): the rule then accepts exactly the proposals that are the argmax, then takes it.
    """
    B, K = proposals.shape
    rows = torch.arange(B, device=p.device)
    x = proposals.long()
    px = p[:, :K].gather(-1, x[..., None])[..., 0]
    qx = torch.ones_like(px) if q is None else q.gather(-1, x[..., None])[..., 0]
    ok = uniforms[:, :K] * qx < px
    ok &= torch.arange(K, device=p.device) < counts[:, None]
    n = ok.long().cumprod(-1).sum(-1)
    pn = p[rows, n]
    at = n.clamp(max=max(K - 1, 0))
    if K == 0:
        qn = torch.zeros_like(pn)
    elif q is None:
        qn = F.one_hot(x[rows, at], pn.size(-1)).to(pn.dtype)
    else:
        qn = q[rows, at]
    rejected = (n < counts)[:, None]
    residual = torch.where(rejected, (pn - qn).clamp(min=0), pn)
    total = residual.sum(-1, keepdim=True)
    residual = torch.where(total > 0, residual, pn)  # rounding left no mass: p itself (p = q there)
    cdf = residual.cumsum(-1)
    u = uniforms[:, K : K + 1] * cdf[:, -1:]
    nxt = (cdf <= u).sum(-1).clamp(max=pn.size(-1) - 1)
    return n, nxt


class Draft(Protocol):
    def start(self, prompts: Sequence[Sequence[int]], pad: torch.Tensor, length: int) -> None:
        """The Engine: a batch of ``prompts``, left-padded by ``pad``, in caches of ``length`` slots."""

    def attach(self, rows: int, length: int) -> None:
        """The serving scheduler: its pool of ``rows`` rows of ``length`` slots."""

    def propose(
        self,
        histories: Sequence[Sequence[int] | None],
        k: int,
        sampling: Sampling,
        generators: Sequence[torch.Generator],
    ) -> tuple[list[list[int]], torch.Tensor | None]:
        """Up to ``k`` tokens per row (none for a ``None`` row), drawn under ``sampling`` from each row's stream, and
        their distributions [B, k, V] (None for a deterministic draft)."""
        ...

    def accepted(self, lengths: Sequence[int | None]) -> None:
        """Each row's history now has this many valid tokens (the draft's cache beyond is stale; None: unchanged)."""

    def reset(self, row: int) -> None:
        """The serving scheduler gave row ``row`` to a new request."""


class NgramDraft:
    """Prompt lookup (Saxena 2023; HF's ``prompt_lookup_num_tokens``): find the latest earlier occurrence of the
    row's last n tokens (n from ``max_n`` down to 1) and propose the tokens that followed it. Free to run, exact
    under the rejection rule (q is one-hot), and useful when the output copies the prompt (summaries, code edits,
    extraction)."""

    def __init__(self, max_n: int = 3) -> None:
        self.max_n = max_n

    def start(self, prompts, pad, length) -> None:
        pass

    def attach(self, rows: int, length: int) -> None:
        pass

    def propose(self, histories, k, sampling, generators):
        out = []
        for h in histories:
            found: list[int] = []
            if h is not None:
                for n in range(min(self.max_n, len(h) - 1), 0, -1):
                    tail = list(h[-n:])
                    for s in range(len(h) - n - 1, -1, -1):
                        if list(h[s : s + n]) == tail:
                            # copy what followed, LZ77-style: a match close to the end runs on into the tokens
                            # being proposed, so a period shorter than k still yields k proposals
                            seq = list(h)
                            for j in range(s + n, s + n + k):
                                seq.append(seq[j])
                            found = seq[len(h) :]
                            break
                    if found:
                        break
            out.append(found)
        return out, None

    def accepted(self, lengths) -> None:
        pass

    def reset(self, row: int) -> None:
        pass


class ModelDraft:
    """A smaller GPT with the same tokenizer, with its own KV cache laid out like the target's (the Engine's left
    padding, or the serving scheduler's rows), so that each row feeds the draft only the tokens it has not seen (one
    or two per round; a row far behind, a new request's prompt, catches up alone first)."""

    def __init__(self, model: GPT) -> None:
        self.model = model.eval()
        self.cache: KVCache | None = None
        self.seen: list[int] = []
        self.pad: list[int] = []

    def _open(self, rows: int, length: int, pad: torch.Tensor) -> None:
        m = self.model
        self.cache = KVCache(m.config, rows, length, m.device, m.dtype, pad=pad)
        self.pad, self.seen = pad.tolist(), [0] * rows

    def start(self, prompts, pad, length) -> None:
        """The Engine's batch: rows left-padded by ``pad``, prefilled together."""
        self._open(len(prompts), length, pad)
        longest = max(len(p) for p in prompts)
        dev = self.model.device
        idx = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=dev)
        assert self.cache is not None
        self.model.decode(idx, self.cache, torch.arange(longest, device=dev))
        self.seen = [len(p) for p in prompts]

    def attach(self, rows: int, length: int) -> None:
        """The serving scheduler's ``rows`` (no padding), each filled as its row first proposes."""
        self._open(rows, length, torch.zeros(rows, dtype=torch.long, device=self.model.device))

    def reset(self, row: int) -> None:
        """Row ``row`` holds a new request now."""
        self.seen[row] = 0

    def _feed(self, histories: Sequence[Sequence[int] | None]) -> torch.Tensor:
        """Feed every row the tokens it has not seen (a row needing fewer re-feeds its last ones, which writes the
        same keys and values again; a ``None`` row, one the scheduler does not decode now, writes a dummy token after
        its real ones); the logits [B, V] after each row's last token."""
        assert self.cache is not None
        dev, end = self.model.device, self.cache.length - 1
        for r, h in enumerate(histories):
            if h is not None and len(h) - self.seen[r] > 2:  # far behind: all but its last token, alone
                lo, hi, at = self.seen[r], len(h) - 1, self.pad[r]
                view = self.cache.view(slice(r, r + 1), at + hi)
                ahead = torch.arange(at + lo, at + hi, device=dev)
                self.model.decode(torch.tensor([list(h[lo:hi])], device=dev), view, ahead)
                self.seen[r] = hi
        T = max([1] + [len(h) - s for h, s in zip(histories, self.seen) if h is not None])
        idx: list[list[int]] = []
        slots: list[list[int]] = []
        for r, h in enumerate(histories):
            first = self.pad[r] + (self.seen[r] if h is None else len(h) - T)
            idx.append([0] * T if h is None else list(h[-T:]))
            slots.append([min(first + j, end) for j in range(T)])
        B = len(histories)  # the first B rows of the cache
        view = self.cache.view(slice(0, B), self.cache.length)
        logits = self.model.decode(torch.tensor(idx, device=dev), view, torch.tensor(slots, device=dev))
        self.seen[:B] = [s if h is None else len(h) for h, s in zip(histories, self.seen)]
        return logits[:, -1]

    def propose(self, histories, k, sampling, generators):
        assert self.cache is not None
        hist = [None if h is None else list(h) for h in histories]
        k = min(k, self.cache.length - max(p + len(h) for h, p in zip(hist, self.pad) if h is not None))
        if k <= 0:
            return [[] for _ in hist], None
        tokens: list[list[int]] = [[] for _ in hist]
        dists = []
        for _ in range(k):
            logits = self._feed(hist)
            probs = target_probs(logits, sampling)
            dists.append(probs)
            new = (argmax(probs) if sampling.greedy else draw(probs, generators)).tolist()
            for h, t, n in zip(hist, tokens, new):
                if h is not None:
                    h.append(n)
                    t.append(n)
        self.seen[: len(hist)] = [s if h is None else len(h) - 1 for h, s in zip(hist, self.seen)]  # last: never fed
        return tokens, torch.stack(dists, dim=1)

    def accepted(self, lengths) -> None:
        self.seen[: len(lengths)] = [s if n is None else min(s, n) for s, n in zip(self.seen, lengths)]


@dataclass
class SpeculativeStats:
    """Acceptance and speed of one generation (``Engine.stats["speculative"]``, ``--json``, ``/metrics``)."""

    k: int
    rounds: int = 0
    proposed_at: list[int] = field(default_factory=list)  # per position i: proposals made
    accepted_at: list[int] = field(default_factory=list)  # per position i: proposals accepted
    tokens: int = 0
    round_seconds: float = 0.0
    draft_seconds: float = 0.0
    plain_step_seconds: float | None = None  # one ordinary decode step: the fastest of the probe rounds
    plain_rounds: int = 0  # plain steps (probes, pauses, rounds without proposals)
    plain_seconds: float = 0.0
    disabled_at_round: int | None = None
    rows: int = 1
    prefill_seconds: float = 0.0  # the Engine's: the target's and the draft's prompt pass
    cache_bytes: int = 0  # the Engine's: the target's KV cache

    def __post_init__(self) -> None:
        self.proposed_at = [0] * self.k
        self.accepted_at = [0] * self.k

    def record(self, proposed: int, accepted: int) -> None:
        for i in range(proposed):
            self.proposed_at[i] += 1
            self.accepted_at[i] += i < accepted

    @property
    def acceptance_rate(self) -> float:
        return sum(self.accepted_at) / max(1, sum(self.proposed_at))

    def report(self) -> dict:
        alpha, k = self.acceptance_rate, self.k
        out = {
            "k": k,
            "rounds": self.rounds,
            "acceptance_rate": round(alpha, 4),
            "acceptance_by_position": [
                round(a / p, 4) if p else None for a, p in zip(self.accepted_at, self.proposed_at)
            ],
            "mean_accepted_length": round(sum(self.accepted_at) / max(1, self.rounds), 3),
            "tokens_per_round": round(self.tokens / max(1, self.rounds), 3),
            "disabled_at_round": self.disabled_at_round,
        }
        if self.plain_step_seconds and self.rounds:
            verify = (self.round_seconds - self.draft_seconds) / self.rounds
            c = self.draft_seconds / max(1, sum(self.proposed_at)) / self.plain_step_seconds
            expected = (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1
            out["cost_ratio"] = round(c, 4)
            out["verify_over_plain_step"] = round(verify / self.plain_step_seconds, 3)
            out["predicted_speedup"] = round(expected / (k * c + 1), 3)
            out["measured_speedup"] = round(
                self.tokens / self.round_seconds * self.plain_step_seconds / max(1, self.rows), 3
            )
        return out


SPEC_K = 4  # proposals per round, by default (Engine, scheduler, --spec-k)
SPEC_K_RANGE = (1, 16)


class Throttle:
    """When to draft, for the Engine and the serving scheduler alike. With ``min_speedup > 0`` the first
    ``PROBE_STEPS`` steps are plain ones, timed (the fastest counts: the first one warms up); then drafting starts.
    Once ``WINDOW`` speculative rounds since then produce, per row and second, fewer than ``min_speedup`` times a plain
    step's tokens, drafting pauses for ``PAUSE`` steps and is then probed again. ``min_speedup = 0`` never pauses
    (and needs no probe)."""

    PROBE_STEPS = 3
    WINDOW = 8
    PAUSE = 256

    def __init__(self, stats: SpeculativeStats, min_speedup: float = 1.0) -> None:
        self.stats, self.min_speedup = stats, min_speedup
        self.step = 0  # plain steps and speculative rounds so far
        self.paused_until = 0
        self.probed = 0  # plain steps timed since the last (re)start
        self.plain_rate = 0.0  # the fastest plain step's tokens per row and second
        self.spec = [0.0, 0.0]  # speculative rounds since the last (re)start: tokens per row, seconds
        self.rounds = 0

    def drafting(self) -> bool:
        """Whether the next step drafts."""
        if self.min_speedup <= 0:
            return True
        return self.step >= self.paused_until and self.probed >= self.PROBE_STEPS

    def plain(self, seconds: float) -> None:
        """A plain step (one token per live row) took ``seconds``."""
        self.step += 1
        self.stats.plain_rounds += 1
        self.stats.plain_seconds += seconds
        if self.probed < self.PROBE_STEPS:  # a probe: the fastest of them is the plain rate
            self.plain_rate = max(self.plain_rate if self.probed else 0.0, 1.0 / max(seconds, 1e-9))
            self.probed += 1
            self.stats.plain_step_seconds = 1.0 / self.plain_rate

    def speculative(self, tokens: int, rows: int, seconds: float) -> None:
        """A speculative round produced ``tokens`` over ``rows`` live rows in ``seconds``."""
        self.step += 1
        self.stats.rounds += 1
        self.stats.tokens += tokens
        self.stats.round_seconds += seconds
        self.spec[0] += tokens / max(rows, 1)
        self.spec[1] += seconds
        self.rounds += 1
        if self.min_speedup <= 0 or self.rounds < self.WINDOW:
            return
        if self.spec[0] / self.spec[1] < self.min_speedup * self.plain_rate:
            if self.stats.disabled_at_round is None:
                self.stats.disabled_at_round = self.stats.rounds
            self.paused_until = self.step + self.PAUSE
            self.probed, self.rounds, self.spec = 0, 0, [0.0, 0.0]


def verify_step(
    model: GPT,
    cache: KVCache,
    pending: Sequence[int],
    proposals: Sequence[Sequence[int]],
    filled: Sequence[int],
    samplings: Sequence[Sampling],
    generators: Sequence[torch.Generator],
    q: torch.Tensor | None = None,
) -> tuple[list[int], list[int]]:
    """One speculative round's target pass, for the Engine and the scheduler: row ``r`` feeds its pending token (the
    newest, not yet in the cache) and its proposals at cache slots ``filled[r]``, ``filled[r] + 1``, ...; the
    target scores them all in one forward pass, and :func:`verify` keeps each row's accepted prefix under its own
    ``samplings[r]`` and random stream. Returns each row's accepted count and the token after them. Without
    proposals, a plain step: the plain sampler, as cheap as the Engine's own step."""
    B, dev = len(proposals), model.device
    width = max(len(p) for p in proposals)
    feed = torch.tensor([[t] + list(p) + [0] * (width - len(p)) for t, p in zip(pending, proposals)], device=dev)
    slots = torch.tensor([[f + j for j in range(width + 1)] for f in filled], device=dev)
    logits = model.decode(feed, cache, slots, last=width + 1)
    groups: dict[Sampling, list[int]] = {}
    for r, s in enumerate(samplings):
        groups.setdefault(s, []).append(r)
    if width == 0:
        nxt = torch.zeros(B, dtype=torch.long, device=dev)
        for s, rows in groups.items():
            at = torch.tensor(rows, device=dev)
            nxt[at] = next_tokens(logits[at, -1], s, None, [generators[r] for r in rows])
        return [0] * B, nxt.tolist()
    p = torch.empty(B, width + 1, logits.size(-1), dtype=torch.float64)
    for s, rows in groups.items():
        at = torch.tensor(rows, device=dev)
        p[rows] = target_probs(logits[at].flatten(0, 1), s).view(len(rows), width + 1, -1).cpu().double()
    counts = torch.tensor([len(x) for x in proposals])
    props = torch.tensor([list(x) + [0] * (width - len(x)) for x in proposals], dtype=torch.long).view(B, width)
    uniforms = torch.stack(
        [torch.rand(width + 1, generator=g, device=g.device, dtype=torch.float64).cpu() for g in generators]
    )
    n, nxt = verify(p, None if q is None else q.cpu().double(), props, counts, uniforms)
    return n.tolist(), nxt.tolist()


def speculative_rounds(
    model: GPT,
    draft: Draft,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    k: int,
    sampling: Sampling,
    stop_ids: set[int],
    stats: SpeculativeStats,
    min_speedup: float = 1.0,
) -> Iterator[tuple[list[list[int]], list[bool]]]:
    """The Engine's speculative decoding: yield, per round, each row's new tokens (0 to k + 1 of them; a stop id
    ends the row and is yielded last) and whether the row has ended. ``stats`` records the prefill, the cache and
    every round as they happen, so a caller that stops reading early still has them."""
    if sampling.repetition_penalty != 1.0:
        raise GptlabError("speculative decoding does not support --repetition-penalty; drop one of them")
    block = model.config.block_size
    B = len(prompts)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > block:
        raise GptlabError(
            f"{longest} prompt tokens + {max_new_tokens} new tokens exceed the context of {block}; speculative "
            f"decoding has no sliding window"
        )
    if max_new_tokens == 0:
        return
    dev = model.device
    length = min(block, longest + max_new_tokens + k + 1)
    pad = torch.tensor([longest - len(p) for p in prompts], device=dev)
    cache = KVCache(model.config, B, length, dev, model.dtype, pad=pad)
    stats.cache_bytes = cache.nbytes
    generators = row_generators(sampling.seed, B, dev)
    hist = [list(p) for p in prompts]
    produced = [0] * B
    done = [False] * B
    stats.rows = B
    throttle = Throttle(stats, min_speedup)
    t0 = time.perf_counter()
    if longest > 1:  # the target's cache holds every token but each row's last ("pending")
        idx = torch.tensor([[0] * (longest - len(p)) + list(p[:-1]) for p in prompts], device=dev)
        model.decode(idx, cache, torch.arange(longest - 1, device=dev))
    draft.start(prompts, pad, length)
    stats.prefill_seconds = time.perf_counter() - t0
    while not all(done):
        t0 = time.perf_counter()
        live = [r for r in range(B) if not done[r]]
        room = min(
            k,
            length - longest - 1 - max(produced[r] for r in live),  # cache slots (the context, when it binds)
            max(max_new_tokens - produced[r] for r in live) - 1,  # the last token of a row comes from the target
        )
        proposals: list[list[int]] = [[] for _ in range(B)]
        q = None
        if throttle.drafting() and room > 0:
            t_d = time.perf_counter()
            proposals, q = draft.propose(hist, room, sampling, generators)
            stats.draft_seconds += time.perf_counter() - t_d
        base = [int(pd) + len(h) - 1 for h, pd in zip(hist, pad.tolist())]
        n_acc, nxt = verify_step(model, cache, [h[-1] for h in hist], proposals, base, [sampling] * B, generators, q)
        out: list[list[int]] = []
        for r in range(B):
            if done[r]:
                out.append([])
                continue
            prop = proposals[r]
            stats.record(len(prop), n_acc[r])
            new = prop[: n_acc[r]] + [nxt[r]]
            for j, t in enumerate(new):  # a stop id ends the row; so does max_new_tokens
                if t in stop_ids or produced[r] + j + 1 >= max_new_tokens:
                    new = new[: j + 1]
                    done[r] = True
                    break
            hist[r].extend(new)
            produced[r] += len(new)
            out.append(new)
        draft.accepted([len(h) for h in hist])
        seconds = time.perf_counter() - t0
        if any(proposals):
            throttle.speculative(sum(len(o) for o in out), len(live), seconds)
        else:
            throttle.plain(seconds)
        yield out, list(done)


def as_steps(rounds: Iterator[tuple[list[list[int]], list[bool]]], rows: int) -> Iterator[list[int | None]]:
    """Rounds of variable length per row as the engine's steps: one token per live row per step (a row that ran
    ahead waits for the others), ``None`` for rows that have ended."""
    queues: list[list[int]] = [[] for _ in range(rows)]
    ended = [False] * rows
    for tokens, done in rounds:
        for r in range(rows):
            queues[r].extend(tokens[r])
            ended[r] = done[r]
        while any(queues) and all(queues[r] or ended[r] for r in range(rows)):
            yield [queues[r].pop(0) if queues[r] else None for r in range(rows)]
