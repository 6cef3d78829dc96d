"""The five stages :func:`gptlab.align.trainer.train_stage` runs. Each builds its ``module`` (``gpt`` plus heads or
a value model), draws the examples of a step as a pure function of (seed, step), and reports held-out metrics.

- ``finetune``: GPT-1 task fine-tuning (Radford et al. 2018, section 3.2): new start/delimiter/extract tokens,
  a linear head on the extract token's final hidden state, loss = task loss + λ·LM loss.
- ``sft``: supervised fine-tuning on (prompt, response) or chat data, loss on response tokens only, optional packing.
- ``reward``: a scalar head on the last token, Bradley-Terry loss over every ranked pair of a prompt.
- ``dpo``: direct preference optimisation against a frozen reference.
- ``ppo``: InstructGPT's RL stage (Ouyang et al. 2022, eq. 2): rollouts through the KV-cache engine, per-token
  reward −β·KL(π ‖ π_ref) plus the reward model's score at the last token, GAE, clipped policy and value losses over
  several epochs, an optional adaptive β and PPO-ptx.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint, lora
from ..errors import GptlabError
from ..files import atomic_write_bytes
from ..generate import Engine, Sampling
from ..loader import load_model
from ..model import GPT
from ..recipe import derive_seed
from ..train.adapters import for_training
from ..train.distributed import Dist, mean_across_ranks
from .config import AlignConfig
from .data import (
    Example,
    Preference,
    TaskItem,
    batch_examples,
    pack_examples,
    pad,
    preferences,
    prompts,
    sft_examples,
    task_items,
)
from .losses import AdaptiveKL, bradley_terry_loss, dpo_loss, gae, masked_mean, ppo_losses

Update = Callable[[torch.Tensor], None]
# A step's metric row: values may stay on the device (detached tensors) until the row is logged, so that a step
# needs no host sync; StageJob converts them at log steps.
Row = Mapping[str, "torch.Tensor | float"]


def load_init(spec: str, device: torch.device) -> tuple[GPT, Any]:
    """(trainable model, tokenizer) from a gptlab run/checkpoint or a Hugging Face folder."""
    loaded = load_model(spec, device)
    return loaded.model.train(), loaded.tokenizer


M = TypeVar("M", bound=nn.Module)


def frozen(model: M) -> M:
    """A copy of ``model`` in eval mode whose parameters take no gradient (a reference or reward model)."""
    model = copy.deepcopy(model).eval()
    return model.requires_grad_(False)


def load_scalar_model(spec: str, device: torch.device) -> tuple[GPT, nn.Linear]:
    """A reward model written by ``gptlab align reward``: its GPT and its scalar head."""
    ckpt = checkpoint.resolve(spec)
    meta = checkpoint.read_state(ckpt)
    if meta.get("train_config", {}).get("stage") != "reward":
        raise GptlabError(f"{spec} is not a reward model; train one with `gptlab align reward`")
    gpt, _ = load_init(str(ckpt), device)
    head = nn.Linear(gpt.config.n_embd, 1).to(device)
    heads = checkpoint.load_extra(ckpt, meta)
    head.load_state_dict({k.split(".", 1)[1]: v for k, v in heads.items() if k.startswith("head.")})
    return gpt, head


def token_logprobs(
    gpt: GPT | nn.Module, x: torch.Tensor, y: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(y_t | x_≤t), entropy of p(· | x_≤t)) per position, [B, T] each, of the distribution at
    ``temperature`` (the one a sampler at that temperature draws from)."""
    logp_all = F.log_softmax(gpt(x)[0].float() / temperature, dim=-1)
    logp = logp_all.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def last_token_scalar(gpt: GPT, head: nn.Linear, seqs: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """The head's scalar on the final hidden state of each sequence's last token, [len(seqs)]."""
    x = pad(seqs).to(device)
    h = gpt.hidden_states(x)
    last = torch.tensor([len(s) - 1 for s in seqs], device=device)
    return head(h[torch.arange(len(seqs), device=device), last]).squeeze(-1)


def response_batch(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts and their sampled responses as next-token inputs ``x`` and targets ``y`` [N, T] (right-padded), the
    mask of the response's positions, and each response's first position [N, 1]."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    full = pad(seqs).to(device)
    x, y = full[:, :-1], full[:, 1:]
    t = torch.arange(y.size(1), device=device)[None]
    start = torch.tensor([len(p) - 1 for p in prompts], device=device)[:, None]
    end = torch.tensor([len(s) - 1 for s in seqs], device=device)[:, None]
    return x, y, ((t >= start) & (t < end)).float(), start


def split(cfg: AlignConfig, load: Callable[[str], list]) -> tuple[list, list]:
    """(train, held-out): ``val_data`` when given, else the last ``val_frac`` of ``data``."""
    items = load(cfg.data)
    if cfg.val_data:
        return items, load(cfg.val_data)
    n_val = max(1, int(len(items) * cfg.val_frac)) if cfg.val_frac > 0 and len(items) > 1 else 0
    return (items[:-n_val], items[-n_val:]) if n_val else (items, [])


def chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Stage:
    """The shared parts: config, device, tokenizer, the step's examples, and empty stage state."""

    module: nn.ModuleDict

    def __init__(self, cfg: AlignConfig, d: Dist) -> None:
        self.cfg, self.dist, self.device = cfg, d, d.device
        gpt, self.tok = load_init(cfg.model, self.device)
        self.gpt = for_training(gpt, cfg.lora)
        self.block = self.gpt.config.block_size

    def reference(self) -> nn.Module:
        """The frozen reference (DPO, PPO, GRPO): ``reference`` if given; else the model as it starts, which for a
        LoRA run is the model itself with its adapters off (no copy)."""
        if self.cfg.reference:
            return frozen(load_init(self.cfg.reference, self.device)[0])
        return lora.BaseModel(self.gpt) if lora.adapters(self.gpt) else frozen(self.gpt)

    def pick(self, step: int, items: Sequence) -> list:
        """This rank's share of the step's global batch (``batch_size`` per rank, drawn without replacement)."""
        n = self.cfg.batch_size * self.dist.world_size
        if len(items) < n:
            raise GptlabError(
                f"{self.cfg.data} has {len(items)} training examples after holding out val_frac "
                f"{self.cfg.val_frac}, fewer than one batch of {n}; add data or lower --batch-size"
            )
        idx = np.random.default_rng([self.cfg.seed, step]).choice(len(items), n, replace=False)
        r = self.dist.rank * self.cfg.batch_size
        return [items[i] for i in idx[r : r + self.cfg.batch_size]]

    def step(self, step: int, update: Update) -> Row:
        """Draw this step's data, compute the loss, call ``update(loss)`` (PPO: once per minibatch and epoch);
        return the metrics row."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics."""
        raise NotImplementedError

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameter sets whose gradient norms are clipped separately (default: all together)."""
        return [list(self.module.parameters())]

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {}


class SFT(Stage):
    def __init__(self, cfg: AlignConfig, d: Dist) -> None:
        super().__init__(cfg, d)
        self.train, self.val = split(cfg, lambda p: sft_examples(p, self.tok, self.block))
        self.module = nn.ModuleDict({"gpt": self.gpt})

    def loss(self, examples: Sequence[Example]) -> torch.Tensor:
        b = pack_examples(examples, self.block) if self.cfg.pack else batch_examples(examples)
        b = {k: v.to(self.device) for k, v in b.items()}
        return self.gpt(b["x"], b["y"], doc_ids=b.get("doc_ids"))[1]

    def step(self, step: int, update: Update) -> Row:
        loss = self.loss(self.pick(step, self.train))
        update(loss)
        return {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.val:
            return {}
        total = count = 0.0
        for part in chunks(self.val, self.cfg.batch_size):
            n = sum(sum(e.loss_mask[1:]) for e in part)
            total += self.loss(part).item() * n
            count += n
        return {"loss": total / max(count, 1)}

    def summary(self) -> dict[str, Any]:
        """Greedy responses to the first held-out prompts, beside the references (``samples.jsonl``)."""
        rows = []
        engine = Engine(self.gpt, self.tok)
        for e in self.val[:8]:
            cut = e.loss_mask.index(1) if 1 in e.loss_mask else len(e.ids)
            prompt, ref = e.ids[:cut], e.ids[cut:]
            room = self.block - len(prompt)
            if room < 1:
                continue
            out = engine.generate_tokens(
                [prompt], min(room, len(ref) + 16), Sampling(temperature=0), stop_ids=[self.tok.eot_id]
            )[0]
            rows.append(
                {
                    "prompt": self.tok.decode(prompt),
                    "reference": self.tok.decode(ref[:-1]),
                    "generated": self.tok.decode(out.tokens),
                }
            )
        path = Path(self.cfg.out_dir) / "samples.jsonl"
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
        return {"samples": str(path)}


class Finetune(Stage):
    def __init__(self, cfg: AlignConfig, d: Dist) -> None:
        if cfg.lora.lora_rank:
            raise GptlabError("finetune adds tokens and a head to every weight it trains; drop --lora-rank")
        super().__init__(cfg, d)
        self.base_vocab = self.gpt.config.vocab_size
        start, delim, extract = self.gpt.extend_vocab(3)
        self.special = {"start": start, "delim": delim, "extract": extract}
        self.train, labels = task_items(cfg.data, cfg.task, self.tok, self.special, self.block)
        self.labels = labels
        if cfg.val_data:
            self.val, _ = task_items(cfg.val_data, cfg.task, self.tok, self.special, self.block, labels)
        else:
            self.train, self.val = split(cfg, lambda _: self.train)
        n_out = 1 if cfg.task == "multiple_choice" else len(labels)
        if n_out < 2 and cfg.task != "multiple_choice":
            raise GptlabError(f"{cfg.data} has a single label {labels}; a classifier needs 2 or more")
        head = nn.Linear(self.gpt.config.n_embd, n_out).to(self.device)
        self.module = nn.ModuleDict({"gpt": self.gpt, "head": head})

    def forward(self, items: Sequence[TaskItem]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(per-item logits over its classes or options, the auxiliary LM loss on the items' text)."""
        seqs = [s for it in items for s in it.sequences]
        x = pad(seqs).to(self.device)
        h = self.gpt.hidden_states(x)
        ends = torch.tensor([len(s) - 1 for s in seqs], device=self.device)
        last = h[torch.arange(len(seqs), device=self.device), ends]
        y = x[:, 1:].masked_fill(x[:, 1:] >= self.base_vocab, -1)  # no LM targets on special tokens or padding
        y = y.masked_fill(torch.arange(y.size(1), device=self.device)[None] >= ends[:, None], -1)
        logits_lm = self.gpt.logits(h[:, :-1])
        lm = F.cross_entropy(logits_lm.flatten(0, 1).float(), y.flatten(), ignore_index=-1)
        head = self.module["head"]
        out, i = [], 0
        for it in items:
            k = len(it.sequences)
            if self.cfg.task == "multiple_choice":
                out.append(head(last[i : i + k]).squeeze(-1))  # one score per option
            else:  # similarity: both orders' representations added (GPT-1 section 3.3)
                out.append(head(last[i : i + k].sum(0)))
            i += k
        return out, lm

    def loss(self, items: Sequence[TaskItem]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        logits, lm = self.forward(items)
        task = torch.stack(
            [
                F.cross_entropy(lg[None].float(), torch.tensor([it.label], device=self.device))
                for lg, it in zip(logits, items)
            ]
        ).mean()
        return task + self.cfg.lm_weight * lm, task, logits

    def step(self, step: int, update: Update) -> Row:
        loss, task, _ = self.loss(self.pick(step, self.train))
        update(loss)
        return {"loss": loss.detach(), "task_loss": task.detach()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.val:
            return {}
        right, total = 0, 0.0
        for part in chunks(self.val, self.cfg.batch_size):
            _, task, logits = self.loss(part)
            right += sum(int(lg.argmax().item() == it.label) for lg, it in zip(logits, part))
            total += task.item() * len(part)
        return {"accuracy": right / len(self.val), "task_loss": total / len(self.val)}

    def state(self) -> dict[str, Any]:
        return {"task": self.cfg.task, "labels": self.labels, "special_tokens": self.special}


class Reward(Stage):
    def __init__(self, cfg: AlignConfig, d: Dist) -> None:
        super().__init__(cfg, d)
        self.train, self.val = split(cfg, lambda p: preferences(p, self.tok, self.block))
        self.module = nn.ModuleDict({"gpt": self.gpt, "head": nn.Linear(self.gpt.config.n_embd, 1).to(self.device)})

    def rewards(self, prefs: Sequence[Preference]) -> list[torch.Tensor]:
        seqs = [p.prompt + r for p in prefs for r in p.responses]  # each response scored once (InstructGPT)
        flat = last_token_scalar(self.gpt, cast(nn.Linear, self.module["head"]), seqs, self.device)
        return list(flat.split([len(p.responses) for p in prefs]))

    def loss(self, prefs: Sequence[Preference]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        rewards = self.rewards(prefs)
        per_prompt = [
            bradley_terry_loss(r[[i for i, _ in p.pairs]], r[[j for _, j in p.pairs]]) for r, p in zip(rewards, prefs)
        ]
        loss = torch.stack(per_prompt).mean()
        if self.cfg.center_rewards:
            loss = loss + self.cfg.center_rewards * torch.cat(rewards).mean() ** 2
        return loss, rewards

    def step(self, step: int, update: Update) -> Row:
        loss, rewards = self.loss(self.pick(step, self.train))
        update(loss)
        return {"loss": loss.detach(), "reward_mean": torch.cat(rewards).mean().detach()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.val:
            return {}
        right = pairs = 0
        total = 0.0
        for part in chunks(self.val, self.cfg.batch_size):
            loss, rewards = self.loss(part)
            total += loss.item() * len(part)
            for r, p in zip(rewards, part):
                right += sum(int(r[i] > r[j]) for i, j in p.pairs)
                pairs += len(p.pairs)
        return {"pair_accuracy": right / pairs, "loss": total / len(self.val)}


def response_logprob(gpt: GPT | nn.Module, prefs: Sequence[Preference], device: torch.device) -> list[torch.Tensor]:
    """Per preference, the summed log-probability of each response given the prompt."""
    seqs = [p.prompt + r for p in prefs for r in p.responses]
    full = pad(seqs).to(device)
    logp, _ = token_logprobs(gpt, full[:, :-1], full[:, 1:])
    t = torch.arange(full.size(1) - 1, device=device)[None]
    starts = torch.tensor([len(p.prompt) - 1 for p in prefs for _ in p.responses], device=device)[:, None]
    ends = torch.tensor([len(s) - 1 for s in seqs], device=device)[:, None]
    sums = (logp * ((t >= starts) & (t < ends))).sum(1)
    return list(sums.split([len(p.responses) for p in prefs]))


class DPO(Stage):
    def __init__(self, cfg: AlignConfig, d: Dist) -> None:
        super().__init__(cfg, d)
        self.ref = self.reference()
        self.train, self.val = split(cfg, lambda p: preferences(p, self.tok, self.block))
        self.module = nn.ModuleDict({"gpt": self.gpt})

    def loss(self, prefs: Sequence[Preference]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pol = response_logprob(self.gpt, prefs, self.device)
        with torch.no_grad():
            ref = response_logprob(self.ref, prefs, self.device)
        w = [(k, i) for k, p in enumerate(prefs) for i, _ in p.pairs]
        lo = [(k, j) for k, p in enumerate(prefs) for _, j in p.pairs]
        pick = lambda src, idx: torch.stack([src[k][i] for k, i in idx])
        return dpo_loss(pick(pol, w), pick(pol, lo), pick(ref, w), pick(ref, lo), self.cfg.beta)

    def step(self, step: int, update: Update) -> Row:
        loss, chosen, rejected = self.loss(self.pick(step, self.train))
        update(loss)
        return {
            "loss": loss.detach(),
            "reward_margin": (chosen - rejected).mean().detach(),
            "pair_accuracy": (chosen > rejected).float().mean(),
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.val:
            return {}
        out = [self.loss(part) for part in chunks(self.val, self.cfg.batch_size)]
        margin = torch.cat([c - r for _, c, r in out])
        return {
            "pair_accuracy": (margin > 0).float().mean().item(),
            "reward_margin": margin.mean().item(),
            "loss": float(np.mean([loss.item() for loss, _, _ in out])),
        }


class PPO(Stage):
    def __init__(self, cfg: AlignConfig, d: Dist) -> None:
        super().__init__(cfg, d)
        self.ref = self.reference()
        rm_gpt, rm_head = load_scalar_model(cfg.reward_model, self.device)
        self.rm_gpt, self.rm_head = frozen(rm_gpt), frozen(rm_head)
        # the value model starts as a copy of the reward model (InstructGPT section 3.5)
        value = for_training(rm_gpt, cfg.lora)  # a LoRA run adapts the value model too
        self.module = nn.ModuleDict({"gpt": self.gpt, "value": value, "value_head": rm_head})
        self.train, self.val = split(cfg, lambda p: [self.tok.encode(t) for t in prompts(p)])
        self.kl = AdaptiveKL(cfg.kl_coef, cfg.kl_target or None, cfg.kl_horizon)
        self.ptx = None
        if cfg.ptx_coef:
            from ..data.loader import TokenWindows  # here: only PPO-ptx reads pre-training shards

            self.ptx = TokenWindows(cfg.ptx_data, "train", self.block, cfg.seed)

    def rollout(self, prompt_ids: Sequence[list[int]], seed: int) -> dict[str, torch.Tensor]:
        """Sample responses, then score them: the tensors PPO needs, aligned on next-token positions."""
        room = min(self.cfg.max_new_tokens, self.block - max(map(len, prompt_ids)))
        if room < 1:
            raise GptlabError(f"a prompt fills the model's context of {self.block}; shorten the prompts")
        eot = self.tok.eot_id
        mode = self.gpt.training
        done = Engine(self.gpt).generate_tokens(
            prompt_ids, room, Sampling(self.cfg.temperature, seed=seed), stop_ids=[eot]
        )
        self.gpt.train(mode)
        responses = [c.tokens + ([eot] if c.finish_reason == "stop_token" else []) for c in done]
        seqs = [p + r for p, r in zip(prompt_ids, responses)]
        x, y, mask, _ = response_batch(prompt_ids, responses, self.device)
        end = torch.tensor([len(s) - 1 for s in seqs], device=self.device)[:, None]
        with torch.no_grad():
            old_logp, _ = token_logprobs(self.gpt, x, y)
            ref_logp, _ = token_logprobs(self.ref, x, y)
            values = self.values(x)
            score = last_token_scalar(self.rm_gpt, self.rm_head, seqs, self.device)
        return {
            "x": x,
            "y": y,
            "mask": mask,
            "old_logp": old_logp,
            "ref_logp": ref_logp,
            "values": values,
            "score": score,
            "last": end.squeeze(1) - 1,
            "lengths": torch.tensor([len(r) for r in responses], dtype=torch.float),
        }

    def values(self, x: torch.Tensor) -> torch.Tensor:
        value = cast(GPT, self.module["value"])
        return self.module["value_head"](value.hidden_states(x)).squeeze(-1)

    def step(self, step: int, update: Update) -> Row:
        cfg = self.cfg
        ro = self.rollout(self.pick(step, self.train), seed=derive_seed(cfg.seed, "rollout", step, self.dist.rank))
        mask = ro["mask"]
        kl_tok = (ro["old_logp"] - ro["ref_logp"]) * mask  # k1, the estimator in InstructGPT's reward
        rewards = -self.kl.coef * kl_tok
        rows = torch.arange(mask.size(0), device=self.device)
        rewards[rows, ro["last"]] += ro["score"]
        adv, returns = gae(rewards, ro["values"], mask, cfg.gamma, cfg.lam)
        mean, std = masked_mean(adv, mask), masked_mean((adv - masked_mean(adv, mask)) ** 2, mask).sqrt()
        adv = (adv - mean) / (std + 1e-8) * mask
        stats: dict[str, list[float]] = {}
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "minibatches", step))
        B = mask.size(0)
        for _ in range(cfg.ppo_epochs):
            for mb in torch.randperm(B, generator=gen).chunk(cfg.minibatches):
                logp, entropy = token_logprobs(self.gpt, ro["x"][mb], ro["y"][mb])
                out = ppo_losses(
                    logp,
                    ro["old_logp"][mb],
                    adv[mb],
                    self.values(ro["x"][mb]),
                    ro["values"][mb],
                    returns[mb],
                    mask[mb],
                    cfg.clip,
                    cfg.value_clip,
                )
                loss = out["policy_loss"] + cfg.vf_coef * out["value_loss"]
                if self.ptx is not None:  # PPO-ptx: keep the pre-training distribution's likelihood
                    px, py = self.ptx.batch(
                        len(mb), step, len(stats.get("loss", [])), self.dist.rank, self.dist.world_size
                    )
                    out["ptx_loss"] = self.gpt(px.to(self.device), py.to(self.device))[1]
                    loss = loss + cfg.ptx_coef * out["ptx_loss"]
                out["entropy"] = masked_mean(entropy.detach(), mask[mb])
                update(loss)
                for k, v in {"loss": loss, **out}.items():
                    stats.setdefault(k, []).append(float(v.detach()))
        seq_kl = kl_tok.sum(1)
        row = {
            "score": ro["score"].mean().item(),
            "kl": seq_kl.mean().item(),
            "kl_coef": self.kl.coef,
            "response_length": ro["lengths"].mean().item(),
            **{k: float(np.mean(v)) for k, v in stats.items()},
        }
        kl_all = mean_across_ranks(seq_kl.mean()[None], self.dist).item()  # one β on every rank
        self.kl.update(kl_all, B * self.dist.world_size)
        return row

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Reward-model score and KL to the reference of responses to the held-out prompts (fixed seed)."""
        prompts_ = self.val or self.train[: self.cfg.batch_size]
        scores, kls = [], []
        for k, part in enumerate(chunks(prompts_, self.cfg.batch_size)):
            ro = self.rollout(part, seed=derive_seed(self.cfg.seed, "evaluation", k))
            scores.append(ro["score"])
            kls.append(((ro["old_logp"] - ro["ref_logp"]) * ro["mask"]).sum(1))
        return {"score": torch.cat(scores).mean().item(), "kl": torch.cat(kls).mean().item()}

    def clip_groups(self) -> list[list[nn.Parameter]]:
        value = [*self.module["value"].parameters(), *self.module["value_head"].parameters()]
        return [list(self.gpt.parameters()), value]

    def state(self) -> dict[str, Any]:
        return {"kl_coef": self.kl.coef}

    def load_state(self, state: dict[str, Any]) -> None:
        self.kl.coef = state["kl_coef"]


STAGES: dict[str, type[Stage]] = {"finetune": Finetune, "sft": SFT, "reward": Reward, "dpo": DPO, "ppo": PPO}
