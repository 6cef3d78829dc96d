"""The GPT: a decoder-only transformer, readable top to bottom.

One class covers GPT-1, GPT-2 and GPT-3 and the modern block of Llama, Qwen, SmolLM2 and nanochat; what differs
between them is configuration (docs/model.md has the table):

- ``norm="pre"`` (GPT-2/3, Llama): ``x = x + f(N(x))`` for attention and MLP, then a final norm before the head;
  ``norm="post"`` (GPT-1): ``x = N(x + f(x))``, and no final norm. ``norm_type``: LayerNorm or RMSNorm.
- Positions: a learned table added to the embeddings (GPT) or rotary (``positions="rope"``: queries and keys
  rotated by their position, so attention scores depend on distance; Su et al. 2021).
- Attention: ``n_kv_head`` key/value heads shared by groups of query heads (grouped-query attention, Ainslie et al.
  2023; 1 = multi-query, Shazeer 2019), optional per-head RMSNorm of queries and keys (``qk_norm``), biases on
  q/k/v only (``qkv_bias``, Qwen2), a head size of its own (``head_size``).
- MLP: GELU (``activation``: ``"gelu_new"``, the tanh approximation of GPT-1/2/3, or exact ``"gelu"``), SwiGLU
  (Shazeer 2020: ``down(silu(gate(x)) * up(x))``) or ReLU² (So et al. 2021), ``mlp_hidden`` wide.
- Head: tied to the embedding or not; optional soft-capping of the logits (``logit_softcap``).

The interface is gpt-fast's: ``forward(idx, targets=None)`` for training and scoring, and named methods for the
rest: :meth:`GPT.hidden_states` (final hidden states, for task, reward and value heads), :meth:`GPT.logits` (the
head over hidden states), :meth:`GPT.decode` (cached decoding: fill cache slots, return the last positions'
logits). Attention takes its mask and its layer's cache (:class:`~gptlab.kv_cache.LayerCache`, written with
``update(slots, k, v)``) as arguments. The mixture-of-experts layer, the fused head-and-loss and the image prefix
live in modules of their own (:mod:`gptlab.moe`, :mod:`gptlab.layers`, :mod:`gptlab.image_prefix`).

Weights use ``nn.Linear``'s [out, in] layout; :mod:`gptlab.interop.hf` transposes Hugging Face's Conv1D [in, out].
Attention goes through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU); training under
CPU bf16 autocast on a CPU with AMX takes gptlab's kernel where it applies (:func:`gptlab.layers.causal_attention`).

With ``pad_vocab_multiple > 1`` the embedding and head carry extra rows up to a multiple of that number (faster
matmuls); their logits are set to -inf inside the loss, so they never enter the softmax and never get gradient, and
the logits returned to callers are cut back to ``vocab_size`` columns, so they are never sampled.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import kernels
from .config import GPTConfig
from .errors import GptlabError
from .image_prefix import ImagePrefix
from .kv_cache import KVCache, LayerCache, PackedCache, PackedLayerCache
from .layers import (
    Linear,
    LinearCrossEntropy,
    TiedEmbedding,
    apply_rotary,
    causal_attention,
    gelu,
    loss_chunk_rows,
    make_norm,
    rope_cos_sin,
    softcap,
)
from .moe import MoE

__all__ = ["GPT", "MLP", "Block", "CausalSelfAttention", "KVCache", "LinearCrossEntropy", "MoE"]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.sizes = (q, kv, kv)
        self.c_attn = Linear(cfg.n_embd, q + 2 * kv, bias=cfg.bias or cfg.qkv_bias)  # q, k, v of every head at once
        self.c_proj = Linear(q, cfg.n_embd, bias=cfg.bias)
        self.q_norm = make_norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        cache: LayerCache | PackedLayerCache | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``rotary``: (cos, sin) of the positions' angles, or None for learned positions. ``mask`` [B, 1, T, S]
        (True: may attend), or None for plain causal attention over ``x``. With a ``cache``, the new keys and values
        are written at ``slots`` and the queries attend over the whole cache."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.sizes, dim=2)
        # [B, T, heads * head_dim] -> [B, heads, T, head_dim]
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if isinstance(cache, PackedLayerCache):  # several prompts' prefill passes in one, each over its own row
            y = cache.attend(q, k, v, self._cached_attention)
        elif cache is not None:
            assert slots is not None, "a cache needs the slots to fill"
            k, v = cache.update(slots, k, v)
            y = self._cached_attention(q, k, v, mask)
        else:
            y = self._sdpa(q, k, v, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))

    def _cached_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        # a decode step on a CPU: gptlab's kernel reads only the cache slots the mask admits (None: SDPA)
        y = kernels.decode_attention(q, k, v, mask)
        return self._sdpa(q, k, v, mask) if y is None else y

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None and not (self.training and self.dropout):  # training under CPU bf16 autocast: gptlab's
            y = causal_attention(q, k, v)
            if y is not None:
                return y
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden = cfg.ffn_hidden
        self.kind = cfg.mlp
        # SwiGLU's gate and up projections are one matrix, [gate; up]
        self.c_fc = Linear(cfg.n_embd, 2 * hidden if cfg.mlp == "swiglu" else hidden, bias=cfg.bias)
        self.c_proj = Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.approximate = "tanh" if cfg.activation == "gelu_new" else "none"
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = gelu(h, self.approximate)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, index: int = 0) -> None:
        super().__init__()
        self.prenorm = cfg.norm == "pre"
        self.ln_1 = make_norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg, cfg.n_embd)
        if cfg.is_moe_layer(index):
            self.mlp: nn.Module = MoE(cfg, shared=MLP(cfg) if cfg.shared_expert else None)
        else:
            self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        cache: LayerCache | PackedLayerCache | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.prenorm:  # GPT-2/3, Llama
            x = x + self.attn(self.ln_1(x), rotary, mask, cache, slots)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, rotary, mask, cache, slots))  # GPT-1
        return self.ln_2(x + self.mlp(x))


def init_(p: torch.Tensor, fill: Callable[..., object], *args: float) -> None:
    """``fill(p, *args)`` in place (an ``nn.init`` function). A sharded parameter (a DTensor: FSDP2, tensor
    parallelism) is filled as its whole tensor would be, one parameter at a time, and keeps its own shard, so a
    model built sharded (:meth:`GPT.reset_parameters` after ``fully_shard`` and ``to_empty``) starts from the
    weights one process draws from the same seed."""
    if p.is_meta:
        return  # (a skeleton's: nothing to fill, see embedding)
    dtensor = sys.modules.get("torch.distributed.tensor")  # (no DTensor exists before that module is imported)
    if dtensor is None or not isinstance(p, dtensor.DTensor):
        fill(p, *args)
        return
    whole = torch.empty(p.shape, dtype=p.dtype)  # drawn on the CPU, as GPT(cfg) draws before moving to a GPU
    fill(whole, *args)
    whole = whole.to(p.to_local().device)
    with torch.no_grad():
        p.to_local().copy_(dtensor.distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local())


def replay_construction_draws(model: nn.Module) -> None:
    """Draw from the random stream what building ``model`` on the CPU draws before :meth:`GPT.reset_parameters`
    (PyTorch's ``nn.Linear`` and ``nn.Embedding`` initialise themselves when built), building a throwaway copy of
    one such module at a time. For a model built on the meta device, which draws nothing: its ``reset_parameters``
    then draws the weights a model built on the CPU from the same seed has."""
    for m in model.modules():  # (registration order, which is the order the modules are built in)
        if isinstance(m, nn.Linear):
            nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        elif isinstance(m, nn.Embedding):
            nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx)


def embedding(rows: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(rows, dim)``. Built on the meta device (a skeleton that a checkpoint's tensors fill), without
    PyTorch's N(0, 1) fill, which draws nothing there but goes through a Python decomposition that imports
    ``torch._dynamo``: 1.0 s of every command that loads a model (Intel Xeon; the fill on the CPU is unchanged)."""
    if torch.get_default_device().type == "meta":  # (under ``torch.device("meta")``)
        return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))
    return nn.Embedding(rows, dim)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        # training: recompute each block's activations in backward instead of keeping them (Chen et al. 2016)
        self.activation_checkpointing = False
        V = cfg.padded_vocab_size
        self.wte = embedding(V, cfg.n_embd)
        # learned positions (GPT); rotary ones have no parameters and are applied inside attention
        self.wpe = embedding(cfg.block_size, cfg.n_embd) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        # GPT-1 (post-norm) ends on the last block's norm; pre-norm models need a final one.
        self.ln_f = make_norm(cfg, cfg.n_embd) if cfg.norm == "pre" else nn.Identity()
        self.lm_head = Linear(cfg.n_embd, V, bias=False)
        # Image input (cfg.image_size > 0): a prefix of patch embeddings before the text (gptlab.image_prefix).
        self.vision = ImagePrefix(cfg) if cfg.image_size else None
        self.tie_()
        self.reset_parameters()

    @property
    def device(self) -> torch.device:
        return self._float_tensor().device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's float weights (activations and the KV cache use it)."""
        return self._float_tensor().dtype

    def _float_tensor(self) -> torch.Tensor:
        """A float parameter or buffer (a quantized model keeps some: norms, scales)."""
        return next(t for t in (*self.parameters(), *self.buffers()) if t.is_floating_point())

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
        norm_gains = {
            id(m.weight) for m in self.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.weight is not None
        }
        for name, p in self.named_parameters():
            if name.startswith("vision."):
                continue  # the image prefix initializes itself (ImagePrefix.reset_parameters)
            if name.endswith(("c_proj.weight", "mlp.proj_weight")):
                init_(p, nn.init.normal_, 0.0, std / math.sqrt(2 * self.config.n_layer))
            elif p.dim() >= 2:
                init_(p, nn.init.normal_, 0.0, std)
            else:
                init_(p, nn.init.ones_ if id(p) in norm_gains else nn.init.zeros_)
        if self.vision is not None:
            self.vision.reset_parameters(std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        images: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Training and scoring. ``idx`` [B, T] token ids -> ``(logits [B, T, vocab_size], None)``, or with
        ``targets`` [B, T] ``(None, mean cross-entropy)`` computed by :class:`LinearCrossEntropy` without
        materialising the logits. Targets equal to -1 are ignored (masked tokens); in training the MoE routers'
        auxiliary losses are added.

        ``images`` [B, channels, size, size] (a model with ``image_size > 0``) go first, as a prefix of
        ``config.image_tokens`` positions (:mod:`gptlab.image_prefix`); logits and loss are the text positions'.
        ``doc_ids`` [B, T] marks packed sequences: positions restart at each new id and a token attends only to
        earlier tokens with its own id, so packed examples never see each other."""
        shared: list[torch.Tensor] | None = [] if targets is not None and self._tied_gradient_in_place() else None
        h = self.ln_f(self._trunk(idx, images, doc_ids, None, None, shared))
        if targets is None:
            return self.logits(h), None
        return None, self.loss(h, targets, shared)

    def _tied_gradient_in_place(self) -> bool:
        """Whether the tied embedding adds its gradient into the fused loss's head gradient (:class:`TiedEmbedding`):
        eager training of a plain (not sharded, not quantized) tied weight."""
        if not (self.config.tie_weights and type(self.wte) is nn.Embedding and isinstance(self.lm_head, nn.Linear)):
            return False  # (a quantized model's embedding and head have no weight matrix)
        w = self.wte.weight
        return (
            self.lm_head.weight is w
            and type(w) is nn.Parameter
            and w.requires_grad
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
        )

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        images: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | PackedCache | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final hidden states [B, T, n_embd] (after the last norm), for task, reward and value heads and for
        :meth:`logits`. Without a cache, those of the text positions; with a ``cache`` (see :meth:`decode`), of
        every position fed, the image prefix included."""
        return self.ln_f(self._trunk(idx, images, doc_ids, cache, slots))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The head over hidden states ``h`` [..., n_embd] -> logits [..., vocab_size] (padding rows cut off)."""
        logits = self.lm_head(h)
        V = self.config.vocab_size
        return softcap(logits[..., :V] if logits.size(-1) != V else logits, self.config.logit_softcap)

    def loss(self, h: torch.Tensor, targets: torch.Tensor, shared: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Mean cross-entropy of the head over ``h`` [B, T, n_embd] against ``targets`` [B, T] (-1 ignored), plus
        the routers' auxiliary losses in training. ``shared``: see :class:`TiedEmbedding`."""
        x = h.reshape(-1, h.size(-1))
        if isinstance(self.lm_head, nn.Linear):
            chunk_rows = loss_chunk_rows(self.lm_head.weight.size(0))
            cfg = self.config
            loss = LinearCrossEntropy.apply(
                x, self.lm_head.weight, targets.reshape(-1), cfg.vocab_size, chunk_rows, cfg.logit_softcap, shared
            )
        else:  # a quantized head (gptlab.quant): no weight matrix to fuse with, plain logits
            loss = F.cross_entropy(self.logits(x).float(), targets.reshape(-1), ignore_index=-1)
        moe = self.moe_layers()
        if moe and self.training:  # the routers' auxiliary losses, averaged over the MoE layers
            loss = loss + sum(m.aux_loss for m in moe if m.aux_loss is not None) / len(moe)
        return loss

    def decode(
        self,
        idx: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
        *,
        images: torch.Tensor | None = None,
        last: int = 1,
    ) -> torch.Tensor:
        """Cached decoding: ``idx`` [B, T] fills cache ``slots`` ([T] for every row, or [B, T] per row;
        consecutive, after those already filled; with ``images``, the slots cover the prefix and the text) and the
        logits of the last ``last`` positions come back, [B, last, vocab_size]: one is all that sampling needs;
        speculative decoding scores its proposals with more."""
        return self.logits(self.ln_f(self._trunk(idx, images, None, cache, slots)[:, -last:]))

    def _trunk(
        self,
        idx: torch.Tensor,
        images: torch.Tensor | None,
        doc_ids: torch.Tensor | None,
        cache: KVCache | PackedCache | None,
        slots: torch.Tensor | None,
        shared: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Embeddings through every block, before the last norm (``shared``: see :class:`TiedEmbedding`)."""
        x = self.wte(idx) if shared is None else TiedEmbedding.apply(idx, self.wte.weight, shared)
        if images is not None:
            if self.vision is None:
                raise GptlabError("this model takes no images (its config has image_size = 0); drop the image")
            if doc_ids is not None:
                raise GptlabError("packed sequences (doc_ids) cannot carry an image prefix")
            x = ImagePrefix.prepend(self.vision(images), x, None if cache is None else cache.pad)
        T = x.size(1)
        mask: torch.Tensor | None = None
        if cache is not None:
            assert slots is not None, "a cache needs the slots to fill"
            pos, mask = cache.positions_and_mask(slots)
        else:
            if self.config.block_size < T:
                raise GptlabError(
                    f"sequence of {T} tokens exceeds the model's context of {self.config.block_size}; "
                    f"crop the input to the last {self.config.block_size} tokens"
                )
            pos = torch.arange(T, device=idx.device)
            if doc_ids is not None:
                pos, mask = packed_positions_and_mask(doc_ids)
        rotary = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            rotary = rope_cos_sin(self.config, pos, x.dtype)
        x = self.drop(x)
        recompute = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.h):
            if recompute:  # keep only each block's input; its activations are recomputed in backward
                x = checkpoint(block, x, rotary, mask, use_reentrant=False)
            else:
                x = block(x, rotary, mask, None if cache is None else cache.layers[i], slots)
        if images is not None and cache is None:
            x = x[:, -idx.size(1) :]  # the text positions: the image prefix has no loss and no logits
        return x

    def extend_vocab(self, n: int) -> list[int]:
        """Append ``n`` new token ids (new embedding rows, N(0, init_std); an untied head gets zero rows);
        returns their ids. Used for task-specific delimiter tokens (Radford et al. 2018, section 3.3)."""
        cfg = self.config
        new = cfg.replace(vocab_size=cfg.vocab_size + n)
        old_rows = self.wte.weight.size(0)
        if new.padded_vocab_size > old_rows:
            wte = nn.Embedding(new.padded_vocab_size, cfg.n_embd, device=self.wte.weight.device)
            with torch.no_grad():
                wte.weight[:old_rows] = self.wte.weight
            self.wte = wte
            if cfg.tie_weights:
                self.tie_()
            else:
                head = nn.Linear(cfg.n_embd, new.padded_vocab_size, bias=False, device=wte.weight.device)
                with torch.no_grad():
                    head.weight.zero_()
                    head.weight[:old_rows] = self.lm_head.weight
                self.lm_head.weight = head.weight
        with torch.no_grad():
            self.wte.weight[cfg.vocab_size : new.vocab_size].normal_(0.0, cfg.init_std)
        self.config = new
        return list(range(cfg.vocab_size, new.vocab_size))

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


def packed_positions_and_mask(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed sequences ``doc_ids`` [B, T]: positions that restart at each new id, and the mask [B, 1, T, T]
    that lets a token attend only to earlier tokens of its own document."""
    t = torch.arange(doc_ids.size(1), device=doc_ids.device)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    pos = t - torch.where(starts, t, 0).cummax(1).values
    mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (t[:, None] >= t[None, :])
    return pos, mask[:, None]
