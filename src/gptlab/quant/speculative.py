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
from ..model import GPT, KVCache


def target_probs(logits: torch.Tensor, temperature: float, top_k=None, top_p=None, min_p=None) -> torch.Tensor:
    """The distribution the plain sampler draws from, [N, V] (one-hot at the argmax for temperature 0)."""
    from ..generate.engine import filter_logits

    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.size(-1)).float()
    return filter_logits(logits / temperature, top_k, top_p, min_p).softmax(-1)


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def verify(
    p: torch.Tensor,
    q: torch.Tensor | None,
    proposals: torch.Tensor,
    counts: torch.Tensor,
    uniforms: torch.Tensor,
    greedy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leviathan et al.'s acceptance rule for a batch of rows, without a Python loop.

    ``p`` [B, K+1, V]: the target's distributions at the K proposed positions and one after; ``q`` [B, K, V] the
    draft's (None: a deterministic draft, q one-hot at its proposal); ``proposals`` [B, K] (row r's first
    ``counts[r]`` are real); ``uniforms`` [B, K+1] independent U[0, 1) draws (the row's own random stream). Returns
    (accepted counts n [B], the token after them [B]): proposal i is accepted if u_i q_i(x) < p_i(x) (probability
    min(1, p/q)) and all before it were; the next token is drawn, by inverse CDF with u_K, from norm(max(0, p_n -
    q_n)) after a rejection and from p_n otherwise. Greedy: accept while the proposal is the argmax; then the argmax.
    """
    B, K = proposals.shape
    rows = torch.arange(B, device=p.device)
    x = proposals.long()
    px = p[:, :K].gather(-1, x[..., None])[..., 0]
    if greedy:
        ok = x == p[:, :K].argmax(-1)
    else:
        qx = torch.ones_like(px) if q is None else q.gather(-1, x[..., None])[..., 0]
        ok = uniforms[:, :K] * qx < px
    ok &= torch.arange(K, device=p.device) < counts[:, None]
    n = ok.long().cumprod(-1).sum(-1)
    pn = p[rows, n]
    if greedy:
        return n, pn.argmax(-1)
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
        sampling_args: dict,
        generators: Sequence[torch.Generator],
    ) -> tuple[list[list[int]], torch.Tensor | None]:
        """Up to ``k`` tokens per row (none for a ``None`` row), and their distributions [B, k, V] (None for a
        deterministic draft)."""
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

    def propose(self, histories, k, sampling_args, generators):
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
        self.model(idx, cache=self.cache, slots=torch.arange(longest, device=dev))
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
                self.model(torch.tensor([list(h[lo:hi])], device=dev), cache=view, slots=ahead)
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
        logits, _ = self.model(torch.tensor(idx, device=dev), cache=view, slots=torch.tensor(slots, device=dev))
        self.seen[:B] = [s if h is None else len(h) for h, s in zip(histories, self.seen)]
        return logits[:, -1]

    def propose(self, histories, k, sampling_args, generators):
        assert self.cache is not None
        hist = [None if h is None else list(h) for h in histories]
        k = min(k, self.cache.length - max(p + len(h) for h, p in zip(hist, self.pad) if h is not None))
        if k <= 0:
            return [[] for _ in hist], None
        tokens: list[list[int]] = [[] for _ in hist]
        dists = []
        for _ in range(k):
            logits = self._feed(hist)
            probs = target_probs(logits, **sampling_args)
            dists.append(probs)
            if sampling_args["temperature"] == 0:
                new = probs.argmax(-1).tolist()
            else:
                new = [_draw(pr, g) for pr, g in zip(probs, generators)]
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
    plain_rounds: int = 0  # plain probe rounds before drafting starts
    plain_seconds: float = 0.0
    disabled_at_round: int | None = None
    rows: int = 1

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


PROBE_ROUNDS = 3  # plain rounds that measure a plain step first (the fastest counts: the first one warms up)


def speculative_rounds(
    model: GPT,
    draft: Draft,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    k: int,
    sampling,
    stop_ids: set[int],
    stats: SpeculativeStats,
    min_speedup: float = 1.0,
) -> Iterator[tuple[list[list[int]], list[bool]]]:
    """Yield, per round, each row's new tokens (0 to k + 1 of them; a stop id ends the row and is yielded last)
    and whether the row has ended.
    ``sampling`` is a :class:`gptlab.generate.engine.Sampling` without repetition penalty."""
    from ..generate.engine import next_tokens

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
    generators = [torch.Generator().manual_seed(sampling.seed + r) for r in range(B)]
    args = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p)
    greedy = sampling.temperature == 0
    hist = [list(p) for p in prompts]
    produced = [0] * B
    done = [False] * B
    stats.rows = B
    if longest > 1:  # the target's cache holds every token but each row's last ("pending")
        idx = torch.tensor([[0] * (longest - len(p)) + list(p[:-1]) for p in prompts], device=dev)
        model(idx, cache=cache, slots=torch.arange(longest - 1, device=dev))
    draft.start(prompts, pad, length)
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
        # the first PROBE_ROUNDS rounds are plain steps (they measure one), and so is every round once drafting is
        # disabled
        probing = stats.plain_rounds < PROBE_ROUNDS
        if not probing and stats.disabled_at_round is None and room > 0:
            t_d = time.perf_counter()
            proposals, q = draft.propose(hist, room, args, generators)
            stats.draft_seconds += time.perf_counter() - t_d
        width = max(len(p) for p in proposals)
        feed = [[h[-1]] + p + [0] * (width - len(p)) for h, p in zip(hist, proposals)]
        base = [int(pd) + len(h) - 1 for h, pd in zip(hist, pad.tolist())]
        slots = torch.tensor([[b + j for j in range(width + 1)] for b in base], device=dev)
        logits, _ = model(torch.tensor(feed, device=dev), cache=cache, slots=slots, logits_for=width + 1)
        assert logits is not None
        if width == 0:  # a plain step: the plain sampler, as cheap as the Engine's own step
            n_acc, nxt_all = torch.zeros(B, dtype=torch.long), next_tokens(logits[:, -1], sampling, None, generators)
        else:
            p_all = target_probs(logits.reshape(B * (width + 1), -1), **args).view(B, width + 1, -1).cpu()
            q_all = None if q is None else q.float().cpu()
            counts = torch.tensor([len(p) for p in proposals])
            props = torch.tensor([p + [0] * (width - len(p)) for p in proposals], dtype=torch.long).view(B, width)
            uniforms = torch.stack([torch.rand(width + 1, generator=g, dtype=torch.float64) for g in generators])
            n_acc, nxt_all = verify(
                p_all.double(), None if q_all is None else q_all.double(), props, counts, uniforms, greedy
            )
        out: list[list[int]] = []
        for r in range(B):
            if done[r]:
                out.append([])
                continue
            prop = proposals[r]
            n, nxt = int(n_acc[r]), int(nxt_all[r])
            stats.record(len(prop), n)
            new = prop[:n] + [nxt]
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
        if probing:
            stats.plain_rounds += 1
            stats.plain_seconds += seconds
            stats.plain_step_seconds = min(seconds, stats.plain_step_seconds or seconds)
        else:
            stats.rounds += 1
            stats.tokens += sum(len(o) for o in out)
            stats.round_seconds += seconds
        yield out, list(done)
        rate = stats.tokens / stats.round_seconds if stats.round_seconds > 0 else float("inf")
        slow = rate < min_speedup * len(live) / (stats.plain_step_seconds or float("inf"))
        if stats.disabled_at_round is None and stats.rounds >= 8 and slow:
            stats.disabled_at_round = stats.rounds  # slower than plain steps (by min_speedup): plain from here on


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
