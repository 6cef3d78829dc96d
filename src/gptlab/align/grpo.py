"""``gptlab align grpo``: reinforcement learning with verifiable rewards on gptlab's own engine.

Each step takes ``batch_size`` prompts, samples ``group_size`` completions of each in one batched, KV-cached pass
of :class:`~gptlab.generate.Engine` (recording each drawn token's log-probability), scores them with the reward
functions (:mod:`.rewards`), turns rewards into advantages within each group and takes ``minibatches`` optimizer
steps per pass, ``grpo_epochs`` passes, on the clipped objective of :func:`~.losses.grpo_loss` (GRPO, Dr. GRPO,
DAPO or RLOO). No value model and no reward model.

Failures that look like training but are not (TRL's issue #5312: the sampler's weights never updated) stop the
run or warn, loudly:

- every group's rewards equal (``frac_reward_zero_std`` = 1: all advantages 0, no gradient) for ``stall_steps``
  steps in a row: stop;
- the policy's weights unchanged over ``stall_steps`` steps in a row: stop;
- no completion ending by itself (all cut by ``max_new_tokens``) for ``stall_steps`` steps in a row: a warning;
- and each step logs ``logprob_diff``, the largest gap between the sampler's log-probabilities and the trainer's
  for the same tokens (tested to be ≤ 1e-5 in fp32): a sampler that is not the trained model shows there.

Logged per step, after TRL: ``reward``, ``reward_std``, ``reward_<name>_mean`` / ``_std`` per function,
``frac_reward_zero_std``, ``clip_ratio_low`` / ``_high`` / ``clip_ratio``, ``completion_length`` (mean, min,
max), ``clipped_completions`` (fraction cut by the length limit), ``entropy``, ``kl`` (with ``kl_beta``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import GptlabError
from ..generate import Engine, Sampling
from ..recipe import derive_seed
from ..train.distributed import Dist
from .config import AlignConfig
from .data import prompt_text, read_jsonl
from .losses import group_advantages, grpo_loss, masked_mean
from .rewards import Reward, parse_rewards, score
from .stages import Row, Stage, Update, chunks, response_batch, split, token_logprobs


@dataclass
class Task:
    """A prompt and its record's other fields (the reward functions' columns, e.g. ``answer``)."""

    text: str
    ids: list[int]
    columns: dict[str, Any]


def tasks(path: str, tok: Any) -> list[Task]:
    out = []
    for i, rec in enumerate(read_jsonl(path, ())):
        if not ("messages" in rec or isinstance(rec.get("prompt"), str)):
            raise GptlabError(f'{path} record {i + 1} has no prompt; each line needs "prompt" (or "messages")')
        text = prompt_text(rec, f"{path} record {i + 1}")
        columns = {k: v for k, v in rec.items() if k not in ("prompt", "messages")}
        out.append(Task(text, tok.encode(text), columns))
    return out


class GRPO(Stage):
    def __init__(self, cfg: AlignConfig, d: Dist) -> None:
        super().__init__(cfg, d)
        self.module = nn.ModuleDict({"gpt": self.gpt})
        self.rewards: list[Reward] = parse_rewards(cfg.rewards, cfg.reward_format)
        self.train, self.val = split(cfg, lambda p: tasks(p, self.tok))
        self.ref = self.reference() if cfg.kl_beta > 0 else None
        self.guard: dict[str, Any] = {"zero_std": 0, "unchanged": 0, "unended": 0, "fingerprint": None}

    # ------------------------------------------------------------------ rollouts
    def rollout(self, items: Sequence[Task], group: int, sampling: Sampling) -> dict[str, Any]:
        """``group`` completions of each item (rows ``i * group`` .. ``(i + 1) * group - 1``), their rewards and
        the tensors the loss needs, aligned on next-token positions."""
        cfg, eot = self.cfg, self.tok.eot_id
        prompts = [it.ids for it in items for _ in range(group)]
        room = min(cfg.max_new_tokens, self.block - max(map(len, prompts)))
        if room < 1:
            raise GptlabError(f"a prompt fills the model's context of {self.block}; shorten the prompts")
        mode = self.gpt.training
        done = Engine(self.gpt).generate_tokens(prompts, room, sampling, stop_ids=[eot], logprobs=True)
        self.gpt.train(mode)
        ended = [c.finish_reason == "stop_token" for c in done]
        responses = [c.tokens + ([eot] if e else []) for c, e in zip(done, ended)]
        texts = [self.tok.decode(c.tokens) for c in done]
        columns = {k: [it.columns.get(k) for it in items for _ in range(group)] for k in items[0].columns}
        values = score(self.rewards, [it.text for it in items for _ in range(group)], texts, {**columns,
                       "ended": ended})  # fmt: skip
        total = torch.zeros(len(prompts))
        for r in self.rewards:
            total += r.weight * torch.tensor(values[r.name])
        x, y, mask, start = response_batch(prompts, responses, self.device)
        sampled = torch.zeros_like(mask)
        for i, c in enumerate(done):
            sampled[i, start[i, 0] : start[i, 0] + len(c.logprobs)] = torch.tensor(c.logprobs)
        return {
            "x": x, "y": y, "mask": mask, "sampled_logp": sampled, "values": values, "reward": total,
            "lengths": torch.tensor([len(r) for r in responses], dtype=torch.float), "ended": torch.tensor(ended),
        }  # fmt: skip

    # ------------------------------------------------------------------ one step
    def step(self, step: int, update: Update) -> Row:
        cfg, G = self.cfg, self.cfg.group_size
        fingerprint = self.fingerprint()
        sampling = Sampling(cfg.temperature, seed=derive_seed(cfg.seed, "rollout", step, self.dist.rank) % 2**62)
        ro = self.rollout(self.pick(step, self.train), G, sampling)
        mask, N = ro["mask"], ro["mask"].size(0)
        adv = group_advantages(ro["reward"], G, cfg.loss_type).to(self.device)
        with torch.no_grad():
            old_logp, _ = token_logprobs(self.gpt, ro["x"], ro["y"], cfg.temperature)
            ref_logp = token_logprobs(self.ref, ro["x"], ro["y"], cfg.temperature)[0] if self.ref else None
        logprob_diff = ((old_logp - ro["sampled_logp"]).abs() * mask).max()
        stats: dict[str, list[float]] = {}
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "minibatches", step))
        clip_high = cfg.clip_high or cfg.clip
        for _ in range(cfg.grpo_epochs):
            for mb in torch.randperm(N, generator=gen).chunk(cfg.minibatches):
                logp, entropy = token_logprobs(self.gpt, ro["x"][mb], ro["y"][mb], cfg.temperature)
                out = grpo_loss(
                    logp, old_logp[mb], adv[mb], mask[mb], cfg.loss_type, cfg.clip, clip_high, cfg.max_new_tokens,
                    None if ref_logp is None else ref_logp[mb], cfg.kl_beta,
                )  # fmt: skip
                out["entropy"] = masked_mean(entropy.detach(), mask[mb])
                update(out["loss"])
                for k, v in out.items():
                    stats.setdefault(k, []).append(float(v.detach()))
        groups = ro["reward"].view(-1, G)
        zero_std = (groups.std(1) < 1e-6).float().mean().item()
        lengths = ro["lengths"]
        row: dict[str, float] = {
            "reward": ro["reward"].mean().item(),
            "reward_std": ro["reward"].std().item(),
            "frac_reward_zero_std": zero_std,
            "completion_length": lengths.mean().item(),
            "completion_length_min": lengths.min().item(),
            "completion_length_max": lengths.max().item(),
            "clipped_completions": 1.0 - ro["ended"].float().mean().item(),
            "logprob_diff": logprob_diff.item(),
            **{k: sum(v) / len(v) for k, v in stats.items()},
        }
        for r in self.rewards:
            vals = torch.tensor(ro["values"][r.name])
            row[f"reward_{r.name}_mean"], row[f"reward_{r.name}_std"] = vals.mean().item(), vals.std().item()
        self.check_progress(step, zero_std, row["clipped_completions"], fingerprint)
        return row

    def fingerprint(self) -> float:
        """A number that changes when any trained weight changes (the sum of every trainable parameter, float64)."""
        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.module.parameters() if p.requires_grad))

    def check_progress(self, step: int, zero_std: float, clipped: float, fingerprint: float) -> None:
        """The guards against a run that trains nothing (see the module docstring)."""
        g, n = self.guard, self.cfg.stall_steps
        g["zero_std"] = g["zero_std"] + 1 if zero_std == 1.0 else 0
        g["unchanged"] = g["unchanged"] + 1 if g["fingerprint"] == fingerprint else 0
        g["unended"] = g["unended"] + 1 if clipped == 1.0 else 0
        g["fingerprint"] = fingerprint
        if g["unended"] and g["unended"] % n == 0:
            print(
                f"gptlab: warning: grpo: for {g['unended']} steps in a row no completion ended by itself; every one "
                f"was cut at --max-new-tokens {self.cfg.max_new_tokens}. Raise it, or reward ending (--rewards "
                f"...,format)",
                file=sys.stderr,
                flush=True,
            )
        if g["zero_std"] >= n:
            raise GptlabError(
                f"grpo: for {n} steps in a row (to step {step + 1}) every group's completions got equal rewards, so "
                f"every advantage is 0 and nothing is learned; make the task easier (or the model better: SFT first), "
                f"raise --group-size or --temperature, or check the reward function ({self.cfg.rewards})"
            )
        if g["unchanged"] >= n:
            raise GptlabError(
                f"grpo: the policy's weights did not change for {n} steps in a row (to step {step + 1}); the sampler "
                f"would keep drawing from the same model. Check --lr and the trainable parameters"
            )

    # ------------------------------------------------------------------ held-out
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy completions of the held-out prompts (pass@1 for a 0/1 reward): each reward's mean and the
        weighted total."""
        items = self.val or self.train[: self.cfg.batch_size]
        sums: dict[str, float] = {}
        for part in chunks(items, self.cfg.batch_size * self.cfg.group_size):
            ro = self.rollout(part, 1, Sampling(temperature=0))
            sums["reward"] = sums.get("reward", 0.0) + ro["reward"].sum().item()
            for r in self.rewards:
                sums[f"reward_{r.name}"] = sums.get(f"reward_{r.name}", 0.0) + sum(ro["values"][r.name])
        return {k: v / len(items) for k, v in sums.items()}

    def state(self) -> dict[str, Any]:
        return {"guard": dict(self.guard)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.guard = dict(state["guard"])
