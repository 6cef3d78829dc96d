"""The GPT: a decoder-only transformer, readable top to bottom.

One class covers GPT-1, GPT-2 and GPT-3 (dense attention). The differences are config fields, not code paths:

- ``norm="pre"`` (GPT-2/3): ``x = x + f(LN(x))`` for attention and MLP, then a final LayerNorm before the head.
- ``norm="post"`` (GPT-1): ``x = LN(x + f(x))``, and no final LayerNorm.
- ``activation``: ``"gelu_new"`` (GPT-2's tanh approximation) or ``"gelu"`` (exact erf, HF's GPT-1).

Weights use ``nn.Linear``'s [out, in] layout; :mod:`gptlab.interop.hf` transposes Hugging Face's Conv1D [in, out].
Attention goes through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).

Generation passes a :class:`KVCache`: each call writes the new keys and values into preallocated slots and attends
over the whole cache through a mask, so every decode step has the same shapes (what ``torch.compile`` wants). Rows
of a batch may be left-padded; each row's positions start at 0 on its first real token, as if it ran alone.

With ``pad_vocab_multiple > 1`` the embedding and head carry extra rows up to a multiple of that number (faster
matmuls); their logits are set to -inf inside the loss, so they never enter the softmax and never get gradient, and
the logits returned to callers are cut back to ``vocab_size`` columns, so they are never sampled.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .errors import GptlabError


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``x @ weight.T`` against ``targets`` (-1 = ignored), computed chunk by chunk so the
    [N, vocab] logits never exist at once, with both gradients formed in the same pass (softmax minus one-hot) and
    handed to autograd in backward. Exact, not an approximation: tests compare it with ``F.cross_entropy``. It saves
    the memory of the full logits and, on CPU, 30 % of the head-and-loss time of GPT-2 (no log_softmax round trip)."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, chunk_rows: int):
        count = (targets >= 0).sum().clamp(min=1)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(weight)
        dtype = torch.promote_types(x.dtype, torch.float32)  # the softmax in fp32 at least, also under autocast
        total = torch.zeros((), device=x.device, dtype=dtype)
        for s in range(0, x.size(0), chunk_rows):
            xc, t = x[s:s + chunk_rows], targets[s:s + chunk_rows]
            logits = F.linear(xc, weight).to(dtype)
            logits[:, vocab_size:] = float("-inf")  # vocabulary padding, if any
            lse = torch.logsumexp(logits, dim=1)
            valid = t >= 0
            t = t.clamp(min=0)
            total += ((lse - logits.gather(1, t[:, None])[:, 0]) * valid).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            probs[torch.arange(len(t), device=t.device), t] -= 1.0
            probs *= valid[:, None]
            grad_x[s:s + chunk_rows] = probs.to(x.dtype) @ weight
            grad_w.addmm_(probs.t().to(weight.dtype), xc)
        ctx.save_for_backward(grad_x / count, grad_w / count)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None, None


class Linear(nn.Linear):
    """``nn.Linear``, except that inside ``torch.compile`` a product with a single row (decoding one token) is
    written as multiply-and-sum, which inductor fuses into one vectorized, bandwidth-bound loop over the weight.
    On a 2-core AVX-512 CPU that streams GPT-2's matrices at ~34 GB/s where MKL's sgemv reaches ~10 GB/s
    (docs/generation.md). Same weights, same state dict; eager mode and training use the ordinary matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.shape[:-1].numel() == 1:
            y = (x.unsqueeze(-2) * self.weight).sum(-1)
            return y if self.bias is None else y + self.bias
        return super().forward(x)


class KVCache:
    """Keys and values of every layer for a batch of sequences, preallocated: per layer, two [B, n_head, length,
    head_dim] tensors (separate tensors, so a compiled step updates each in place). ``pad`` [B] is each row's count
    of left-padding slots, which are never attended to."""

    def __init__(self, cfg: GPTConfig, batch: int, length: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, pad: torch.Tensor | None = None) -> None:
        if length > cfg.block_size:
            raise GptlabError(f"a cache of {length} positions exceeds the model's context of {cfg.block_size}")
        shape = (batch, cfg.n_head, length, cfg.n_embd // cfg.n_head)
        self.layers = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                       for _ in range(cfg.n_layer)]
        self.length = length
        self.pad = torch.zeros(batch, dtype=torch.long, device=device) if pad is None else pad.to(device)

    @property
    def nbytes(self) -> int:
        """2 (keys and values) x layers x batch x heads x head_dim x length x bytes per element."""
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    def positions_and_mask(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For queries in cache ``slots`` [T]: positions [B, T] (counted from each row's first real token) and the
        attention mask [B, 1, T, length]: a query sees the real tokens at or before its slot. A padding query sees
        itself only, so its (unused) output stays finite."""
        key = torch.arange(self.length, device=slots.device)
        causal = key[None, :] <= slots[:, None]  # [T, length]
        real = key[None, None, :] >= self.pad[:, None, None]  # [B, 1, length]
        mask = causal & (real | (key[None, :] == slots[:, None]))
        return (slots[None, :] - self.pad[:, None]).clamp(min=0), mask[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v for all heads at once
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``cache``, when generating: (this layer's keys [B, H, L, hd], values, the slots [T] to write, the
        mask [B, 1, T, L])."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # [B, T, C] -> [B, n_head, T, head_dim]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            k_cache, v_cache, slots, mask = cache
            k_cache.index_copy_(2, slots, k)
            v_cache.index_copy_(2, slots, v)
            y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.approximate = "tanh" if cfg.activation == "gelu_new" else "none"
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.prenorm = cfg.norm == "pre"
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        if self.prenorm:  # GPT-2/3
            x = x + self.attn(self.ln_1(x), cache)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, cache))  # GPT-1
        return self.ln_2(x + self.mlp(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        V = cfg.padded_vocab_size
        self.wte = nn.Embedding(V, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        # GPT-1 (post-norm) ends on the last block's LayerNorm; pre-norm models need a final one.
        self.ln_f = (nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
                     if cfg.norm == "pre" else nn.Identity())
        self.lm_head = Linear(cfg.n_embd, V, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, unit LayerNorms, and the two residual output projections
        of each block scaled by 1/sqrt(2 * n_layer) (Radford et al. 2019, section 2.3)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, std)
            elif ".ln_" in name or name.startswith("ln_f"):
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            else:
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                slots: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``idx`` [B, T] token ids -> ``(logits [B, T, vocab_size], None)``, or with ``targets`` [B, T]
        ``(None, mean cross-entropy)`` computed by :class:`LinearCrossEntropy` without materialising the logits.
        Targets equal to -1 are ignored (masked tokens).

        With a ``cache``, ``idx`` fills cache ``slots`` [T] (consecutive, after those already filled) and only the
        last position's logits are returned, [B, 1, vocab_size]: all that sampling needs."""
        T = idx.size(1)
        if cache is None:
            if T > self.config.block_size:
                raise GptlabError(f"sequence of {T} tokens exceeds the model's context of {self.config.block_size}; "
                                  f"crop the input to the last {self.config.block_size} tokens")
            pos, layers = torch.arange(T, device=idx.device), [None] * len(self.h)
        else:
            pos, mask = cache.positions_and_mask(slots)
            layers = [(k, v, slots, mask) for k, v in cache.layers]
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block, layer_cache in zip(self.h, layers):
            x = block(x, layer_cache)
        x = self.ln_f(x if cache is None else x[:, -1:])
        V = self.config.vocab_size
        if targets is not None:
            x = x.reshape(-1, x.size(-1))
            chunk_rows = max(1, 2**26 // self.lm_head.weight.size(0))  # <= 256 MB of fp32 logits at a time
            return None, LinearCrossEntropy.apply(x, self.lm_head.weight, targets.reshape(-1), V, chunk_rows)
        logits = self.lm_head(x)
        if logits.size(-1) != V:  # padded rows: never sampled
            logits = logits[..., :V]
        return logits, None

    def num_params(self, breakdown: bool = False) -> int | dict[str, int]:
        """Trainable parameters, each shared tensor counted once (tied head = 0) and vocabulary padding rows left
        out. ``breakdown=True`` returns a dict per component plus ``total`` and Kaplan's ``non_embedding`` count
        (total minus token and position embeddings)."""
        cfg = self.config
        pad_rows = cfg.padded_vocab_size - cfg.vocab_size
        parts = {"token_embedding": 0, "position_embedding": 0, "attention": 0, "mlp": 0, "norms": 0, "head": 0}
        seen: set[int] = set()
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if name.startswith("wte."):
                parts["token_embedding"] += p.numel() - pad_rows * cfg.n_embd
            elif name.startswith("wpe."):
                parts["position_embedding"] += p.numel()
            elif ".attn." in name:
                parts["attention"] += p.numel()
            elif ".mlp." in name:
                parts["mlp"] += p.numel()
            elif name.startswith("lm_head."):
                parts["head"] += p.numel() - pad_rows * cfg.n_embd
            else:
                parts["norms"] += p.numel()
        total = sum(parts.values())
        if not breakdown:
            return total
        return {**parts, "total": total,
                "non_embedding": total - parts["token_embedding"] - parts["position_embedding"]}
