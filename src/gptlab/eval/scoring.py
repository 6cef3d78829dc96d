"""Log-likelihood scoring, the primitive every evaluation is built on, with lm-evaluation-harness's definitions.

A request is (context ids, continuation ids). Its score is the summed log-probability of the continuation given the
context, and whether every continuation token is the argmax (greedy). When context + continuation exceed the model's
context, the oldest context tokens are dropped (the input is the last ``block_size + 1`` tokens minus the final one,
as lm-eval does). Requests are batched longest first and right-padded: with causal attention, padding after a row's
tokens cannot change them, so scores do not depend on the batch size beyond float rounding.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Collection, Sequence

import torch
from tqdm import tqdm

from ..errors import GptlabError
from ..model import GPT


@torch.no_grad()
def loglikelihoods(
    model: GPT,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    not_first: Collection[int] = (),
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), greedy?) per request, in the order given. ``not_first``: token ids
    left out of the argmax at the first continuation position (the GPT-2 paper's LAMBADA stop-word filter). A
    progress bar goes to stderr on a terminal."""
    if batch_size < 1:
        raise GptlabError(f"--batch-size must be >= 1, got {batch_size}")
    block = model.config.block_size
    device = model.device
    rows = []
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise GptlabError(f"request {i} has an empty continuation; nothing to score")
        if not ctx:
            raise GptlabError(f"request {i} has an empty context; start it with the end-of-text token")
        if len(cont) > block:
            raise GptlabError(
                f"request {i}'s continuation has {len(cont)} tokens, more than the model's context of {block}"
            )
        whole = (list(ctx) + list(cont))[-(block + 1) :]
        rows.append((i, whole[:-1], list(cont)))
    order = sorted(rows, key=lambda r: -len(r[1]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    model.eval()
    bar = tqdm(total=len(order), desc="scoring", unit="req", disable=None, leave=False, file=sys.stderr)
    banned = torch.tensor(sorted(not_first), dtype=torch.long, device=device)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        T = max(len(r[1]) for r in chunk)
        idx = torch.zeros(len(chunk), T, dtype=torch.long)
        for j, (_, inp, _) in enumerate(chunk):
            idx[j, : len(inp)] = torch.tensor(inp)
        logits, _ = model(idx.to(device))
        for j, (i, inp, cont) in enumerate(chunk):
            n = len(cont)
            logp = logits[j, len(inp) - n : len(inp)].float().log_softmax(-1)
            target = torch.tensor(cont, device=logp.device)
            choice = logp.argmax(-1)
            if len(banned):
                choice[0] = logp[0].index_fill(0, banned, float("-inf")).argmax()
            out[i] = (logp.gather(1, target[:, None]).sum().item(), bool((choice == target).all()))
        bar.update(len(chunk))
    bar.close()
    return out


@torch.no_grad()
def rolling_nll(model: GPT, tokens: Sequence[int], stride: int | None = None, batch_size: int = 8) -> tuple[float, int]:
    """(total negative log-likelihood in nats, tokens scored) of ``tokens`` with a sliding window. The first window
    scores tokens 1..context; each later one scores the next ``stride`` tokens (default half the context) and sees
    the ``context`` tokens before each of them it can, its window ending where its span ends. So every token after
    the first is scored exactly once, with at least ``context - stride`` tokens of left context, and the last span
    with a full window. With stride = context this is lm-evaluation-harness's ``loglikelihood_rolling`` (disjoint
    chunks, the last one with full context); smaller strides give each token more context (Hugging Face's
    "perplexity of fixed-length models")."""
    block = model.config.block_size
    stride = stride or max(1, block // 2)
    if not 0 < stride <= block:
        raise GptlabError(f"--stride must be in 1..{block} (the model's context), got {stride}")
    if len(tokens) < 2:
        raise GptlabError("the text has fewer than two tokens; nothing to score")
    requests, done, end = [], 1, min(block + 1, len(tokens))  # tokens[:done] are scored (the first needs none)
    while done < len(tokens):
        begin = max(0, end - block - 1)  # the window tokens[begin:end]: its inputs fill the context
        requests.append((tokens[begin:done], tokens[done:end]))
        done, end = end, min(end + stride, len(tokens))
    total = sum(lp for lp, _ in loglikelihoods(model, requests, batch_size))
    return -total, len(tokens) - 1


def perplexity_report(
    nll: float, tokens: int, words: int | None = None, n_bytes: int | None = None
) -> dict[str, float]:
    """Per-token loss and perplexity, and (given the text's word and byte counts) word perplexity and bits per
    byte, as lm-eval's ``wikitext`` task reports them."""
    r = {"nll": nll, "tokens": tokens, "loss": nll / tokens, "token_perplexity": math.exp(nll / tokens)}
    if words:
        r["words"], r["word_perplexity"] = words, math.exp(nll / words)
    if n_bytes:
        r["bytes"], r["bits_per_byte"] = n_bytes, nll / (n_bytes * math.log(2))
    return r
