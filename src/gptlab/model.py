"""The GPT: a decoder-only transformer, readable top to bottom.

One class covers GPT-1, GPT-2 and GPT-3 (dense attention). The differences are config fields, not code paths:

- ``norm="pre"`` (GPT-2/3): ``x = x + f(LN(x))`` for attention and MLP, then a final LayerNorm before the head.
- ``norm="post"`` (GPT-1): ``x = LN(x + f(x))``, and no final LayerNorm.
- ``activation``: ``"gelu_new"`` (the tanh approximation of GPT-1, GPT-2 and GPT-3) or ``"gelu"`` (exact erf).

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
from .vision.encoder import ImagePrefix


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``x @ weight.T`` against ``targets`` (-1 = ignored), computed chunk by chunk so the
    [N, vocab] logits never exist at once, with both gradients formed in the same pass (softmax minus one-hot) and
    handed to autograd in backward. Exact, not an approximation: tests compare it with ``F.cross_entropy``. It saves
    the memory of the full logits and, on CPU, 30 % of the head-and-loss time of GPT-2 (no log_softmax round trip)."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, chunk_rows: int):
        # Under autocast the three matmuls run in the autocast dtype (bf16 on GPU: tensor cores), chosen here
        # explicitly: autocast does not apply to in-place ops, so an fp32 `addmm_` into the fp32 weight gradient
        # would silently run the largest matmul of the step at fp32 speed. The softmax and both gradients
        # accumulate in fp32 at least.
        device = x.device.type
        mm = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        acc = torch.promote_types(x.dtype, torch.float32)
        count = (targets >= 0).sum().clamp(min=1)
        grad_x = torch.empty(x.shape, device=x.device, dtype=acc)
        grad_w = torch.zeros(weight.shape, device=x.device, dtype=torch.promote_types(weight.dtype, acc))
        total = torch.zeros((), device=x.device, dtype=acc)
        with torch.autocast(device, enabled=False):
            x_mm, w_mm = x.to(mm), weight.to(mm)
            for s in range(0, x.size(0), chunk_rows):
                xc, t = x_mm[s : s + chunk_rows], targets[s : s + chunk_rows]
                logits = F.linear(xc, w_mm).to(acc)
                logits[:, vocab_size:] = float("-inf")  # vocabulary padding, if any
                lse = torch.logsumexp(logits, dim=1)
                valid = t >= 0
                t = t.clamp(min=0)
                total += ((lse - logits.gather(1, t[:, None])[:, 0]) * valid).sum()
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                probs *= valid[:, None]
                probs_mm = probs.to(mm)
                grad_x[s : s + chunk_rows] = probs_mm @ w_mm
                if mm == grad_w.dtype:
                    grad_w.addmm_(probs_mm.t(), xc)
                else:
                    grad_w += probs_mm.t() @ xc  # a low-precision product, accumulated in fp32
        ctx.save_for_backward((grad_x / count).to(x.dtype), (grad_w / count).to(weight.dtype))
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
    of left-padding slots, which are never attended to.

    A forward pass fills cache ``slots``: [T] when every row writes the same slots (a batch that started together),
    or [B, T] when each row is at its own length (continuous batching: :mod:`gptlab.serve.scheduler`)."""

    def __init__(
        self,
        cfg: GPTConfig,
        batch: int,
        length: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        pad: torch.Tensor | None = None,
    ) -> None:
        if length > cfg.block_size:
            raise GptlabError(f"a cache of {length} positions exceeds the model's context of {cfg.block_size}")
        shape = (batch, cfg.n_head, length, cfg.n_embd // cfg.n_head)
        self.layers = [
            (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(cfg.n_layer)
        ]
        self.length = length
        self.pad = torch.zeros(batch, dtype=torch.long, device=device) if pad is None else pad.to(device)

    @property
    def nbytes(self) -> int:
        """2 (keys and values) x layers x batch x heads x head_dim x length x bytes per element."""
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    def view(self, rows: slice, length: int) -> KVCache:
        """The same storage seen as rows ``rows`` and the first ``length`` slots: writes land in this cache, and
        attention reads only ``length`` slots (a pool's rows are rarely all full)."""
        out = object.__new__(KVCache)
        out.layers = [(k[rows, :, :length], v[rows, :, :length]) for k, v in self.layers]
        out.length, out.pad = length, self.pad[rows]
        return out

    def positions_and_mask(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For queries in cache ``slots`` ([T] or [B, T]): positions [B, T] (counted from each row's first real
        token) and the attention mask [B, 1, T, length]: a query sees the real tokens at or before its slot. A
        padding query sees itself only, so its (unused) output stays finite."""
        slots = slots.expand(self.pad.size(0), -1)  # [B, T]
        key = torch.arange(self.length, device=slots.device)
        at_or_before = key <= slots[..., None]  # [B, T, length]
        real = key >= self.pad[:, None, None]
        mask = at_or_before & (real | (key == slots[..., None]))
        return (slots - self.pad[:, None]).clamp(min=0), mask[:, None]


def write_cache(cache: torch.Tensor, slots: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Write ``new`` [B, H, T, hd] into ``cache`` [B, H, L, hd] at ``slots`` ([T] shared, or [B, T] per row)."""
    if slots.dim() == 1:
        return cache.index_copy_(2, slots, new)
    rows = torch.arange(cache.size(0), device=cache.device)[:, None]
    cache[rows, :, slots] = new.transpose(1, 2)  # advanced indices first: [B, T, H, hd]
    return cache


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
        mask [B, 1, T, L]); for packed training sequences (None, None, None, the mask [B, 1, T, T])."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # [B, T, C] -> [B, n_head, T, head_dim]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            k_cache, v_cache, slots, mask = cache
            if k_cache is not None:
                k, v = write_cache(k_cache, slots, k), write_cache(v_cache, slots, v)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
            )
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


class MoE(nn.Module):
    """Routed feed-forward (Shazeer et al. 2017; Lepikhin et al. 2020, GShard; Fedus et al. 2021, Switch): a linear
    router, softmax over ``n_experts``, each token sent to its top-k experts with the chosen probabilities
    renormalized to sum to 1, and the experts' outputs summed with those weights. The experts are GELU MLPs stored
    stacked ([E, in, out]), so all of them run as one batched matmul over their tokens: assignments are sorted by
    expert (stably, first choices of all tokens before second choices), scattered into an [E, slots, d] buffer and
    gathered back with index_add.

    In training with ``capacity_factor > 0`` an expert keeps at most ceil(factor * tokens * k / E) assignments, in
    that priority order; the rest are dropped (their share is 0, so the token passes through the residual).
    Evaluation and generation are always dropless, so a row never depends on the others in its batch. A compiled
    evaluation graph (the engine's compiled decode step) sizes every expert's buffer for all tokens, keeping shapes
    static; elsewhere the buffer is as long as the busiest expert's list.

    ``aux_loss`` (after each forward): the Switch/GShard load-balancing loss E * sum_i f_i * P_i, with f_i the
    fraction of the token-to-expert assignments routed to expert i (before drops) and P_i the mean router
    probability of expert i, weighted by ``aux_loss_weight``, plus ST-MoE's router z-loss mean(logsumexp(logits)^2)
    weighted by ``z_loss_weight``. ``stats`` holds the detached load-balancing loss, z-loss, per-expert assignment
    fractions and dropped fraction, for logging without a host sync."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        E, C, Fh = cfg.n_experts, cfg.n_embd, cfg.expert_ff or 4 * cfg.n_embd
        self.k, self.capacity_factor = cfg.experts_per_token, cfg.capacity_factor
        self.weights = (cfg.aux_loss_weight, cfg.z_loss_weight)
        self.router = nn.Linear(C, E, bias=False)
        self.fc_weight = nn.Parameter(torch.empty(E, C, Fh))
        self.proj_weight = nn.Parameter(torch.empty(E, Fh, C))
        self.fc_bias = nn.Parameter(torch.zeros(E, Fh)) if cfg.bias else None
        self.proj_bias = nn.Parameter(torch.zeros(E, C)) if cfg.bias else None
        self.approximate = "tanh" if cfg.activation == "gelu_new" else "none"
        self.shared = MLP(cfg) if cfg.shared_expert else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x2 = x.reshape(-1, C)
        N, E = x2.size(0), self.fc_weight.size(0)
        logits = self.router(x2).float()
        probs = logits.softmax(-1)
        weight, expert = probs.topk(self.k, dim=-1)  # [N, k]
        weight = weight / weight.sum(-1, keepdim=True)
        # Assignments, slot-major (every first choice before any second choice), then grouped by expert.
        e, order = torch.sort(expert.t().reshape(-1), stable=True)
        tok = torch.arange(N, device=x.device).repeat(self.k)[order]
        w = weight.t().reshape(-1)[order]
        counts = torch.bincount(e, minlength=E)
        pos = torch.arange(e.numel(), device=x.device) - (counts.cumsum(0) - counts)[e]  # slot within its expert
        keep = torch.ones_like(pos, dtype=torch.bool)
        if self.training and self.capacity_factor > 0:
            # Static shapes, no host sync: a dropped assignment keeps its place in the lists but writes to a spare
            # slot (index `slots`) and carries weight 0, so it adds nothing and gets no gradient.
            slots = math.ceil(self.capacity_factor * N * self.k / E)
            keep = pos < slots
            w, pos = w * keep, torch.where(keep, pos, slots)
        elif not self.training and torch.compiler.is_compiling():  # static shapes (compiled decoding): room for all
            slots = N
        else:  # dropless: as long as the busiest expert's list (on CUDA, one host sync per MoE layer)
            slots = int(counts.max())
        xe = x2.new_zeros(E, slots + 1, C)
        xe[e, pos] = x2[tok]
        h = (
            torch.bmm(xe, self.fc_weight)
            if self.fc_bias is None
            else torch.baddbmm(self.fc_bias[:, None], xe, self.fc_weight)
        )
        h = F.gelu(h, approximate=self.approximate)
        ye = (
            torch.bmm(h, self.proj_weight)
            if self.proj_bias is None
            else torch.baddbmm(self.proj_bias[:, None], h, self.proj_weight)
        )
        out = torch.zeros_like(x2).index_add_(0, tok, (ye[e, pos] * w[:, None]).to(x2.dtype))
        fraction = counts.float() / (N * self.k)
        balance = E * (fraction * probs.mean(0)).sum()
        z = torch.logsumexp(logits, -1).pow(2).mean()
        self.aux_loss = self.weights[0] * balance + self.weights[1] * z
        self.stats = {
            "balance_loss": balance.detach(),
            "z_loss": z.detach(),
            "expert_fraction": fraction.detach(),
            "dropped_fraction": 1.0 - keep.float().mean(),
        }
        out = self.dropout(out.view(B, T, C))
        return out if self.shared is None else out + self.shared(x)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, index: int = 0) -> None:
        super().__init__()
        self.prenorm = cfg.norm == "pre"
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg)

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
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        # GPT-1 (post-norm) ends on the last block's LayerNorm; pre-norm models need a final one.
        self.ln_f = (
            nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias) if cfg.norm == "pre" else nn.Identity()
        )
        self.lm_head = Linear(cfg.n_embd, V, bias=False)
        # Image input (cfg.image_size > 0): a prefix of patch embeddings before the text (gptlab.vision).
        self.vision = ImagePrefix(cfg) if cfg.image_size else None
        self.tie_()
        self.reset_parameters()

    @property
    def device(self) -> torch.device:
        return self.wpe.weight.device  # the position embedding: float in every model, quantized ones included

    @property
    def dtype(self) -> torch.dtype:
        return self.wpe.weight.dtype

    def tie_(self) -> GPT:
        """Share the token embedding with the output head when the config ties them (GPT-2: Press & Wolf 2017).
        Call again after replacing either module."""
        if self.config.tie_weights:
            self.lm_head.weight = self.wte.weight
        return self

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, unit LayerNorms, and the two residual output projections
        of each block scaled by 1/sqrt(2 * n_layer) (Radford et al. 2019, section 2.3)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.startswith("vision."):
                continue  # the image prefix initializes itself (ImagePrefix.reset_parameters)
            if name.endswith(("c_proj.weight", "mlp.proj_weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, std)
            elif ".ln_" in name or name.startswith("ln_f"):
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            else:
                nn.init.zeros_(p)
        if self.vision is not None:
            self.vision.reset_parameters(std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        hidden: bool = False,
        logits_for: int = 1,
        images: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``idx`` [B, T] token ids -> ``(logits [B, T, vocab_size], None)``, or with ``targets`` [B, T]
        ``(None, mean cross-entropy)`` computed by :class:`LinearCrossEntropy` without materialising the logits.
        Targets equal to -1 are ignored (masked tokens). ``hidden=True`` returns the final hidden states
        ``([B, T, n_embd], None)`` instead of logits (for task, reward and value heads).

        ``doc_ids`` [B, T] marks packed sequences: positions restart at each new id and a token attends only to
        earlier tokens with its own id, so packed examples never see each other.

        With a ``cache``, ``idx`` fills cache ``slots`` ([T] for every row, or [B, T] per row; consecutive, after
        those already filled) and only the last ``logits_for`` positions' logits are returned, [B, logits_for,
        vocab_size]: one is all that sampling needs; speculative decoding scores its proposals with more.

        ``images`` [B, channels, size, size] (a model with ``image_size > 0``) go first, as a prefix of
        ``config.image_tokens`` positions (:mod:`gptlab.vision`); logits, loss and hidden states are those of the
        text positions. With a cache, ``slots`` then covers the prefix and the text."""
        x = self.wte(idx)
        if images is not None:
            if self.vision is None:
                raise GptlabError("this model takes no images (its config has image_size = 0); drop the image")
            if doc_ids is not None:
                raise GptlabError("packed sequences (doc_ids) cannot carry an image prefix")
            x = ImagePrefix.prepend(self.vision(images), x, None if cache is None else cache.pad)
        T = x.size(1)
        if cache is None:
            if self.config.block_size < T:
                raise GptlabError(
                    f"sequence of {T} tokens exceeds the model's context of {self.config.block_size}; "
                    f"crop the input to the last {self.config.block_size} tokens"
                )
            pos = torch.arange(T, device=idx.device)
            layers: list[tuple[torch.Tensor | None, ...] | None] = [None] * len(self.h)
            if doc_ids is not None:
                t = torch.arange(T, device=idx.device)
                starts = torch.ones_like(doc_ids, dtype=torch.bool)
                starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
                pos = t - torch.where(starts, t, 0).cummax(1).values
                mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (t[:, None] >= t[None, :])
                layers = [(None, None, None, mask[:, None])] * len(self.h)
        else:
            assert slots is not None, "a cache needs the slots to fill"
            pos, mask = cache.positions_and_mask(slots)
            layers = [(k, v, slots, mask) for k, v in cache.layers]
        x = self.drop(x + self.wpe(pos))
        for block, layer_cache in zip(self.h, layers):
            x = block(x, layer_cache)
        if images is not None and cache is None:
            x = x[:, -idx.size(1) :]  # the text positions: the image prefix has no loss and no logits
        x = self.ln_f(x if cache is None or hidden else x[:, -logits_for:])
        if hidden:
            return x, None
        V = self.config.vocab_size
        if targets is not None:
            x = x.reshape(-1, x.size(-1))
            if isinstance(self.lm_head, nn.Linear):
                chunk_rows = max(1, 2**26 // self.lm_head.weight.size(0))  # <= 256 MB of fp32 logits at a time
                loss = LinearCrossEntropy.apply(x, self.lm_head.weight, targets.reshape(-1), V, chunk_rows)
            else:  # a quantized head (gptlab.quant): no weight matrix to fuse with, plain logits
                logits = self.lm_head(x)[:, :V].float()
                loss = F.cross_entropy(logits, targets.reshape(-1), ignore_index=-1)
            moe = self.moe_layers()
            if moe and self.training:  # the routers' auxiliary losses, averaged over the MoE layers
                loss = loss + sum(m.aux_loss for m in moe if m.aux_loss is not None) / len(moe)
            return None, loss
        logits = self.lm_head(x)
        if logits.size(-1) != V:  # padded rows: never sampled
            logits = logits[..., :V]
        return logits, None

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.h if isinstance(b.mlp, MoE)]

    def num_params(self, breakdown: bool = False) -> int | dict[str, int]:
        """Trainable parameters, each shared tensor counted once (tied head = 0) and vocabulary padding rows left
        out. ``breakdown=True`` returns a dict per component plus ``total``, Kaplan's ``non_embedding`` count
        (total minus token and position embeddings) and ``active`` (what one token passes through: with MoE, only
        ``experts_per_token`` of each MoE layer's experts; the router and a shared expert count in ``mlp``)."""
        cfg = self.config
        pad_rows = cfg.padded_vocab_size - cfg.vocab_size
        parts = {"token_embedding": 0, "position_embedding": 0, "attention": 0, "mlp": 0, "norms": 0, "head": 0}
        if self.vision is not None:
            parts["vision"] = 0
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
            elif name.startswith("vision."):
                parts["vision"] += p.numel()
            else:
                parts["norms"] += p.numel()
        total = sum(parts.values())
        if not breakdown:
            return total
        idle = sum(
            sum(p.numel() for p in (m.fc_weight, m.proj_weight, m.fc_bias, m.proj_bias) if p is not None)
            * (cfg.n_experts - cfg.experts_per_token)
            // cfg.n_experts
            for m in self.moe_layers()
        )
        return {
            **parts,
            "total": total,
            "non_embedding": total - parts["token_embedding"] - parts["position_embedding"],
            "active": total - idle,
        }


def drop_tied(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A state dict without the tied head (it is the token embedding): how checkpoints store it."""
    return {k: v for k, v in state.items() if not (cfg.tie_weights and k == "lm_head.weight")}


def with_tied(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A state dict completed with the tied head, the inverse of :func:`drop_tied`."""
    if cfg.tie_weights and "wte.weight" in state:
        return {**state, "lm_head.weight": state["wte.weight"]}
    return state
