"""Fine-tuning and preference data: JSON-lines files, tokenized into (ids, loss mask) examples.

Formats (one JSON object per line):

- SFT, plain: ``{"prompt": ..., "response": ...}`` -> ``prompt + response + <eot>``; the loss covers the response
  and the end-of-text token only.
- SFT, chat: ``{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}`` -> each message as
  ``"<Role>: <content>\\n"`` (``User: hi\\n``), then ``<eot>``; the loss covers the assistant messages (their text
  after ``Assistant: `` and the newline) and ``<eot>``. Generation prompts end with ``"Assistant: "``.
- Preferences: ``{"prompt", "chosen", "rejected"}``, or a K-way ranking ``{"prompt", "ranked": [best, ..., worst]}``
  (all K·(K−1)/2 pairs are used, scored in one batch as InstructGPT does). Without ``prompt``, ``chosen`` and
  ``rejected`` are whole conversations (Anthropic HH-RLHF's layout) and the prompt is their shared beginning up to
  the last ``Assistant:``.
- Prompts (PPO rollouts): ``{"prompt"}``; any of the files above also works.
- GPT-1 tasks: ``{"text", "label"}`` (classification), ``{"premise", "hypothesis", "label"}`` (entailment),
  ``{"a", "b", "label"}`` (similarity; a numeric or class label), ``{"context", "options", "label"}`` (multiple
  choice; label = index of the right option).

An example longer than the model's context is an error naming it, never silently cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..chat import ROLES, chat_prompt
from ..data.jsonl import read_jsonl
from ..errors import GptlabError
from .losses import ranking_pairs


@dataclass
class Example:
    ids: list[int]
    loss_mask: list[int]  # 1 where the token is a training target


def _fits(ids: list[int], block: int, where: str) -> None:
    if len(ids) > block:
        raise GptlabError(
            f"{where} is {len(ids)} tokens, longer than the model's context of {block}; shorten it "
            f"or start from a model with a longer context"
        )


def sft_examples(path: str | Path, tok: Any, block: int) -> list[Example]:
    """(ids, loss mask) per record: the prompt masked, the response (and <eot>) trained on."""
    out = []
    for i, rec in enumerate(read_jsonl(path, ())):
        if "messages" in rec:
            ids, mask = [], []
            for m in messages(rec, f"{path} record {i + 1}"):
                head = tok.encode(f"{ROLES[m['role']]}: ")
                body = tok.encode(m["content"] + "\n")
                train = m["role"] == "assistant"
                ids += head + body
                mask += [0] * len(head) + [int(train)] * len(body)
            ids.append(tok.eot_id)
            mask.append(1)
        elif isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
            p, r = tok.encode(rec["prompt"]), tok.encode(rec["response"]) + [tok.eot_id]
            ids, mask = p + r, [0] * len(p) + [1] * len(r)
        else:
            raise GptlabError(f"{path} record {i + 1}: expected {{prompt, response}} or {{messages: [...]}}")
        _fits(ids[:-1], block, f"{path} record {i + 1}")  # the model reads all but the last token
        out.append(Example(ids, mask))
    return out


def messages(rec: dict[str, Any], where: str) -> list[dict[str, str]]:
    """A record's ``messages``, checked: a non-empty list of {role, content} objects."""
    msgs = rec["messages"]
    if not (
        isinstance(msgs, list)
        and msgs
        and all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs)
    ):
        raise GptlabError(
            f"{where}: messages must be a list of {{role, content}} objects, each with a role in {sorted(ROLES)} "
            f"and a string content"
        )
    return msgs


def prompt_text(rec: dict[str, Any], where: str) -> str:
    if "messages" in rec:
        return chat_prompt(messages(rec, where))
    if not isinstance(rec.get("prompt"), str):
        raise GptlabError(f'{where}: "prompt" must be a string (or give "messages")')
    return rec["prompt"]


def prompts(path: str | Path) -> list[str]:
    recs = read_jsonl(path, ())
    bad = [i + 1 for i, r in enumerate(recs) if not ("messages" in r or isinstance(r.get("prompt"), str))]
    if bad:
        raise GptlabError(f'{path} record {bad[0]} has no prompt; each line needs "prompt" (or "messages")')
    return [prompt_text(r, f"{path} record {i + 1}") for i, r in enumerate(recs)]


@dataclass
class Preference:
    prompt: list[int]
    responses: list[list[int]]  # best first
    pairs: list[tuple[int, int]]  # (better, worse) indices into responses


def preferences(path: str | Path, tok: Any, block: int) -> list[Preference]:
    out = []
    for i, rec in enumerate(read_jsonl(path, ())):
        ranked = rec.get("ranked") or (
            [rec["chosen"], rec["rejected"]] if "chosen" in rec and "rejected" in rec else None
        )
        if not ranked or len(ranked) < 2 or not all(isinstance(r, str) for r in ranked):
            raise GptlabError(
                f'{path} record {i + 1}: needs "chosen" and "rejected", or "ranked": a list of 2+ responses, best first'
            )
        if len(set(ranked)) < len(ranked):  # identical responses carry no preference (the loss is stuck at ln 2)
            raise GptlabError(
                f"{path} record {i + 1}: two of its responses are identical; a preference needs "
                f"different responses (fix or remove that record)"
            )
        if "prompt" in rec or "messages" in rec:
            prompt = prompt_text(rec, f"{path} record {i + 1}")
        else:  # whole conversations (Anthropic HH-RLHF): the prompt is the shared part up to the last turn
            prompt = shared_prompt(ranked)
            ranked = [r[len(prompt) :] for r in ranked]
        p = tok.encode(prompt)
        resp = [tok.encode(r) + [tok.eot_id] for r in ranked]
        for r in resp:
            _fits(p + r, block, f"{path} record {i + 1}")
        out.append(Preference(p, resp, ranking_pairs(len(resp))))
    return out


def shared_prompt(texts: Sequence[str], turn: str = "Assistant:") -> str:
    """The common beginning of ``texts``, cut after its last ``turn`` marker when it has one."""
    common = texts[0]
    for t in texts[1:]:
        n = next((k for k, (a, b) in enumerate(zip(common, t)) if a != b), min(len(common), len(t)))
        common = common[:n]
    cut = common.rfind(turn)
    return common[: cut + len(turn)] if cut >= 0 else common


def pad(rows: Sequence[Sequence[int]], value: int = 0) -> torch.Tensor:
    """Right-pad ``rows`` to one tensor [len(rows), longest]."""
    T = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (T - len(r)) for r in rows], dtype=torch.long)


def batch_examples(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Right-padded (inputs, targets) with targets −1 where the loss mask is 0 or on padding."""
    x = pad([e.ids[:-1] for e in examples])
    y = pad([[t if m else -1 for t, m in zip(e.ids[1:], e.loss_mask[1:])] for e in examples], -1)
    return {"x": x, "y": y}


def pack_examples(examples: Sequence[Example], block: int) -> dict[str, torch.Tensor]:
    """Examples packed greedily into rows of ``block`` inputs, none split across rows; ``doc_ids`` keep each
    example's attention and positions its own, and padding is its own document with no loss."""
    rows: list[list[tuple[int, Example]]] = [[]]
    used = 0
    for k, e in enumerate(examples):
        n = len(e.ids) - 1
        if used + n > block and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append((k, e))
        used += n
    xs, ys, docs = [], [], []
    for row in rows:
        x, y, d = [], [], []
        for k, e in row:
            x += e.ids[:-1]
            y += [t if m else -1 for t, m in zip(e.ids[1:], e.loss_mask[1:])]
            d += [k] * (len(e.ids) - 1)
        fill = block - len(x)
        xs.append(x + [0] * fill)
        ys.append(y + [-1] * fill)
        docs.append(d + [-1] * fill)
    return {"x": torch.tensor(xs), "y": torch.tensor(ys), "doc_ids": torch.tensor(docs)}


# ----------------------------------------------------------------------------- GPT-1 task formats
TASKS = {
    "classification": ("text", "label"),
    "entailment": ("premise", "hypothesis", "label"),
    "similarity": ("a", "b", "label"),
    "multiple_choice": ("context", "options", "label"),
}


@dataclass
class TaskItem:
    sequences: list[list[int]]  # classification/entailment: 1; similarity: 2 (both orders); multiple choice: K
    label: int


def task_items(
    path: str | Path, task: str, tok: Any, special: dict[str, int], block: int, labels: list[str] | None = None
) -> tuple[list[TaskItem], list[str]]:
    """GPT-1's input transformations (Radford et al. 2018, Figure 1): ``start text extract``; ``start premise
    delim hypothesis extract``; similarity in both orders; multiple choice as ``start context delim option
    extract`` per option. Class labels are mapped to indices (``labels`` fixes the order, e.g. from training)."""
    if task not in TASKS:
        raise GptlabError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    recs = read_jsonl(path, TASKS[task])
    s, d, e = special["start"], special["delim"], special["extract"]
    if task != "multiple_choice" and labels is None:
        labels = sorted({str(r["label"]) for r in recs})
    items = []
    for i, r in enumerate(recs):
        where = f"{path} record {i + 1}"
        if task == "classification":
            seqs = [[s, *tok.encode(r["text"]), e]]
        elif task == "entailment":
            seqs = [[s, *tok.encode(r["premise"]), d, *tok.encode(r["hypothesis"]), e]]
        elif task == "similarity":
            a, b = tok.encode(r["a"]), tok.encode(r["b"])
            seqs = [[s, *a, d, *b, e], [s, *b, d, *a, e]]
        else:
            if not isinstance(r["options"], list) or not 0 <= int(r["label"]) < len(r["options"]):
                raise GptlabError(f'{where}: "options" must be a list and "label" an index into it')
            ctx = tok.encode(r["context"])
            seqs = [[s, *ctx, d, *tok.encode(o), e] for o in r["options"]]
        for q in seqs:
            _fits(q, block, where)
        if task == "multiple_choice":
            label = int(r["label"])
        elif labels is not None and str(r["label"]) in labels:
            label = labels.index(str(r["label"]))
        else:
            raise GptlabError(f"{where}: label {r['label']!r} was not seen in training (labels: {labels})")
        items.append(TaskItem(seqs, label))
    return items, labels or []
