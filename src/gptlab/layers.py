"""Building blocks the transformer uses: the fused head-and-loss, a compile-aware ``nn.Linear``, the norms,
rotary positions and logit soft-capping."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .config import GPTConfig

VOCAB_SLICE = 4096  # vocabulary rows of :class:`LinearCrossEntropy`'s head per product


def loss_chunk_rows(padded_vocab: int) -> int:
    """Rows of logits :class:`LinearCrossEntropy` makes at a time: at most 2**26 fp32 values (256 MB)."""
    return max(1, 2**26 // padded_vocab)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``x @ weight.T`` against ``targets`` (-1 = ignored), computed chunk by chunk so the
    [N, vocab] logits never exist at once, with both gradients formed in the same pass (softmax minus one-hot) and
    handed to autograd in backward. Exact, not an approximation: tests compare it with ``F.cross_entropy``. It saves
    the memory of the full logits and, on CPU, 30 % of the head-and-loss time of GPT-2 (no log_softmax round trip).
    With ``softcap`` c > 0 the logits are c·tanh(z / c) (:func:`softcap`), and the gradient takes the tanh's
    derivative, 1 - tanh², into account.

    A chunk's logits are kept transposed, [vocab, rows], and made :data:`VOCAB_SLICE` vocabulary rows at a time:
    each slice is then a contiguous block, ``weight[slice] @ x.T``, whose operands stay in cache, and the weight
    gradient is formed in the same row blocks. On an Intel Xeon with AMX (oneDNN's bf16 kernels, 2 threads) this ran
    GPT-2's forward and weight-gradient products at 2.4 TFLOP/s where ``x @ weight.T`` over the whole [768, 50,257]
    matrix ran at 1.0 (docs/benchmarks.md). On a CPU the softmax is gptlab's kernel
    (:func:`gptlab.kernels.softmax_xent_`), elsewhere :func:`softmax_minus_one_hot`."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, chunk_rows: int, softcap: float = 0.0, shared=None):
        # Under autocast the three matmuls run in the autocast dtype (bf16 on GPU: tensor cores), chosen here
        # explicitly: autocast does not apply to in-place ops, so an fp32 `addmm_` into the fp32 weight gradient
        # would silently run the largest matmul of the step at fp32 speed. The softmax and both gradients
        # accumulate in fp32 at least.
        device = x.device.type
        mm = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        acc = torch.promote_types(x.dtype, torch.float32)
        count = (targets >= 0).sum().clamp(min=1)
        grad_x = torch.empty(x.shape, device=x.device, dtype=acc)
        # a frozen head (LoRA, QLoRA) takes no gradient: its product, a third of the head's work, is skipped
        want_w = weight.requires_grad
        grad_w = torch.empty(
            weight.shape if want_w else (0,), device=x.device, dtype=torch.promote_types(weight.dtype, acc)
        )
        total = torch.zeros((), device=x.device, dtype=acc)
        slices = [slice(v, v + VOCAB_SLICE) for v in range(0, weight.size(0), VOCAB_SLICE)]
        with torch.autocast(device, enabled=False):
            x_mm, w_mm = x.to(mm), weight.to(mm)
            for s in range(0, x.size(0), chunk_rows):
                xc, t = x_mm[s : s + chunk_rows], targets[s : s + chunk_rows]
                logits = torch.empty(weight.size(0), len(t), device=x.device, dtype=mm)
                for v in slices:
                    torch.mm(w_mm[v], xc.t(), out=logits[v])
                scale = (t >= 0).to(acc) / count  # each row's weight in the mean: the gradients come out divided
                losses = None if softcap > 0 else kernels.softmax_xent_(logits, t, vocab_size, scale)
                if losses is None:
                    losses, probs_mm = softmax_minus_one_hot(logits.to(acc), t, vocab_size, scale, softcap)
                    probs_mm = probs_mm.to(mm)
                else:  # gptlab's kernel on a CPU: in place, in the logits' own dtype, two passes (kernels.py)
                    probs_mm = logits
                total += losses.sum()
                grad_x[s : s + chunk_rows] = probs_mm.t() @ w_mm
                for v in slices if want_w else ():
                    part = grad_w[v]
                    if mm == part.dtype:
                        torch.mm(probs_mm[v], xc, out=part) if s == 0 else part.addmm_(probs_mm[v], xc)
                    else:  # a low-precision product, accumulated in fp32
                        part.copy_(probs_mm[v] @ xc) if s == 0 else part.add_(probs_mm[v] @ xc)
                del logits, probs_mm  # (the chunk's logits go before the next chunk's are made)
        # kept on ctx, not saved for backward: backward hands them to autograd as they are (the weight gradient
        # becomes the .grad itself, with no copy) after scaling them in place
        ctx.grads = grad_x.to(x.dtype), grad_w.to(weight.dtype)
        if shared is not None and want_w:  # a tied embedding adds its rows' gradients into this one (TiedEmbedding)
            shared.append(ctx.grads[1])
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.grads
        del ctx.grads
        # a pass over GPT-2's 154 MB weight gradient that a loss of its own (d loss / d loss = 1) does not need;
        # read on a CPU only (on a GPU the comparison would wait for the device)
        if grad_loss.device.type != "cpu" or not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grad_x.mul_(grad_loss)
            grad_w.mul_(grad_loss)
        return grad_x, grad_w if grad_w.numel() else None, None, None, None, None, None


class TiedEmbedding(torch.autograd.Function):
    """The token embedding's lookup when its weight is also the head of a :class:`LinearCrossEntropy` in the same
    graph (``shared``: the list through which that loss hands over its weight gradient). The loss's backward runs
    first and its weight gradient waits in autograd's buffer for this one; this backward adds the looked-up rows'
    gradients into it (``index_add_``) and returns none of its own. PyTorch's embedding backward would make a dense
    [vocab, d] gradient of zeros for a few rows and autograd would then add it to the loss's: for GPT-2 a 154 MB
    fill and a 154 MB addition, 43 ms of a 1.1 s CPU step (docs/benchmarks.md). Without the loss's gradient (its
    backward did not run) it returns the dense gradient as PyTorch would."""

    @staticmethod
    def forward(ctx, idx, weight, shared):
        ctx.save_for_backward(idx)
        ctx.shared, ctx.rows = shared, weight.size(0)
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        shared, ctx.shared = ctx.shared, None
        if not ctx.needs_input_grad[1]:
            return None, None, None
        if shared:
            head = shared.pop()
            head.index_add_(0, idx.reshape(-1), grad.reshape(-1, grad.size(-1)).to(head.dtype))
            return None, None, None
        return None, torch.ops.aten.embedding_dense_backward(grad, idx, ctx.rows, -1, False), None


def softmax_minus_one_hot(
    logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, scale: torch.Tensor, softcap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`LinearCrossEntropy`'s softmax in PyTorch's ops, for one chunk: the losses [R] of the columns of
    ``logits`` [V, R] (rows from ``vocab_size`` on are padding; targets < 0 ignored, loss 0) and their gradient times
    ``scale`` [R], (softmax - one-hot) * scale, made in place over ``logits``, through ``softcap`` if it is > 0."""
    if softcap > 0:
        tanh = torch.tanh(logits / softcap)
        logits = softcap * tanh
    logits[vocab_size:] = float("-inf")  # vocabulary padding, if any
    lse = torch.logsumexp(logits, dim=0)
    valid, t = targets >= 0, targets.clamp(min=0)
    cols = torch.arange(len(t), device=t.device)
    losses = (lse - logits[t, cols]) * valid
    probs = logits.sub_(lse).exp_()  # softmax, in place
    probs[t, cols] -= 1.0
    probs *= scale
    if softcap > 0:  # through c·tanh(z / c): d/dz = 1 - tanh^2
        probs *= 1 - tanh * tanh
    return losses, probs


def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """``F.gelu(x, approximate=approximate)``; on a CPU with AVX-512 the tanh form (GPT-2's) is gptlab's kernel,
    the same function to float rounding at 2-4x the speed of PyTorch's: :class:`TanhGelu` in training, the forward
    kernel alone in eager inference (GPT-2's 32 x 3,072 of a prompt's prefill: 25 against 99 us on an Intel Xeon).
    Compiled inference keeps PyTorch's, which inductor fuses with its neighbours."""
    if approximate == "tanh" and kernels.gelu_tanh_applies(x):
        if torch.is_grad_enabled() and x.requires_grad:
            return TanhGelu.apply(x)
        if not torch.compiler.is_compiling():
            return torch.ops.gptlab.gelu_tanh(x)
    return F.gelu(x, approximate=approximate)


class TanhGelu(torch.autograd.Function):
    """GELU's tanh form and its gradient by gptlab's CPU kernels (``gelu_tanh``, ``gelu_tanh_backward``:
    ``kernels.cpp`` says how); it keeps its input for backward, as PyTorch's GELU does."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.ops.gptlab.gelu_tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.gptlab.gelu_tanh_backward(grad.to(x.dtype), x)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` (``q``, ``k``, ``v`` [B, heads, T, head_dim]) in
    training under CPU bf16 autocast: :class:`CausalAttention` where gptlab's kernels take the shapes
    (:func:`gptlab.kernels.causal_attention_applies`; grouped key/value heads repeated for their query heads). None
    otherwise (no gradients, other devices or dtypes, inside ``torch.compile``), for the caller to use SDPA."""
    if not (
        q.device.type == "cpu"
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and not torch.compiler.is_compiling()
    ):
        return None
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))  # autocast's casts for SDPA
    if not kernels.causal_attention_applies(q, k, v):
        return None
    if k.size(1) != q.size(1):  # grouped-query attention, as SDPA's enable_gqa: query head h reads key/value head
        k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))  # h // group (gradients sum back)
    return CausalAttention.apply(q, k, v, q.size(-1) ** -0.5)


class CausalAttention(torch.autograd.Function):
    """Causal attention of bf16 [B, heads, T, 64] by gptlab's kernels (``causal_attention`` and its backward:
    ``kernels.cpp`` says how): FlashAttention-2's arithmetic (Dao 2023), one head's whole scores at a time, every
    product by oneDNN's AMX micro-kernel. The output is a [B, heads, T, 64] view of a [B, T, heads, 64] tensor, the
    layout the attention's output projection reads. Keeps its inputs, output and the rows' log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = torch.ops.gptlab.causal_attention(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        g = grad.to(torch.bfloat16)
        g = g if g.stride(3) == 1 else g.contiguous()
        dq, dk, dv = torch.ops.gptlab.causal_attention_backward(g, q, k, v, out, lse, ctx.scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None


def in_halves(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` (``torch.addmm(bias, a, b)`` with a bias) for an even number of rows, as one batched product of
    ``a``'s two row halves against ``b``. oneDNN's AMX kernel (torch 2.13, an Intel Xeon) runs a bf16 product with at
    most ~900 output columns no faster on two threads than on one: GPT-2's [1,024 x 3,072] by [3,072 x 768] at 1.05
    TFLOP/s, its two halves as a batch of two at 1.63 (docs/benchmarks.md), with the same bits in every output
    (:func:`halves_pay` checks). ``b`` is best contiguous."""
    m, n = a.size(0), b.size(1)
    a2, b2 = a.unflatten(0, (2, m // 2)), b.expand(2, *b.shape)
    out = torch.bmm(a2, b2) if bias is None else torch.baddbmm(bias.expand(2, m // 2, n), a2, b2)
    return out.view(m, n)


_HALVES_PAY: dict[tuple[Any, ...], bool] = {}  # which products in_halves takes, by shape: see halves_pay


def halves_pay(key: tuple[Any, ...], whole: Callable[[], torch.Tensor], split: Callable[[], torch.Tensor]) -> bool:
    """Whether ``split`` (a product by :func:`in_halves`) beats ``whole`` (the same product as PyTorch makes it) for
    the product ``key`` names (its shapes) on this CPU: measured on its first occurrence in a process (interleaved,
    best of 3), and taken only where both give the same bits, so the choice never changes a result."""
    key = (*key, torch.get_num_threads())
    if key not in _HALVES_PAY:
        best = [float("inf"), float("inf")]
        for _ in range(3):
            for i, f in enumerate((whole, split)):
                t0 = time.perf_counter()
                f()
                best[i] = min(best[i], time.perf_counter() - t0)
        _HALVES_PAY[key] = best[1] * 1.05 < best[0] and torch.equal(whole(), split())
    return _HALVES_PAY[key]


class AutocastLinear(torch.autograd.Function):
    """``nn.Linear`` under CPU bf16 autocast, in training: autocast's arithmetic bit for bit (bf16 casts of input,
    weight and bias, ``addmm``; in backward ``grad @ W``, ``grad.T @ x`` and the bias's sum, cast back to the
    inputs' dtypes), with the products whose output is narrow taken :func:`in_halves` where :func:`halves_pay`
    measured that it pays: the forward product (against the weight's transpose, made by
    :func:`gptlab.kernels.transpose_to`) and the input's gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        bf16 = torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            x2 = x.reshape(-1, x.size(-1)).to(bf16)
            wb = weight.to(bf16)
            bb = None if bias is None else bias.to(bf16)
            whole = lambda: x2 @ wb.t() if bb is None else torch.addmm(bb, x2, wb.t())
            split = lambda: in_halves(x2, kernels.transpose_to(weight, bf16), bb)
            key = ("forward", *x2.shape, *wb.shape, bb is not None)
            y = split() if x2.size(0) % 2 == 0 and halves_pay(key, whole, split) else whole()
        ctx.save_for_backward(x2, wb)
        ctx.dtypes = x.dtype, weight.dtype, None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        x2, wb = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g2 = grad.reshape(-1, grad.size(-1)).to(torch.bfloat16)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            whole, split = (lambda: g2 @ wb), (lambda: in_halves(g2, wb))
            key = ("input gradient", *g2.shape, *wb.shape)
            gx = split() if g2.size(0) % 2 == 0 and halves_pay(key, whole, split) else whole()
            gx = gx.view(*grad.shape[:-1], -1).to(x_dtype)
        if ctx.needs_input_grad[1]:
            gw = (g2.t() @ x2).to(w_dtype)
        if ctx.needs_input_grad[2]:
            gb = g2.sum(0).to(b_dtype)
        return gx, gw, gb


class Linear(nn.Linear):
    """``nn.Linear`` with an optional LoRA adapter (a ``lora`` child: :mod:`gptlab.lora`). Inside
    ``torch.compile`` a product with a single row (decoding one token) is written as multiply-and-sum, which
    inductor fuses into one vectorized, bandwidth-bound loop over the weight. On a 2-core AVX-512 CPU that streams
    GPT-2's matrices at ~34 GB/s where MKL's sgemv reaches ~10 GB/s (docs/generation.md). Same weights, same state
    dict. In inference on a CPU, a product of 2 to 64 rows (a decode step of several sequences, compiled or not;
    any number of rows, eager, inside :func:`gptlab.kernels.row_invariant`) and, eager, of one row takes gptlab's
    fp32 kernel (:func:`gptlab.kernels.f32_linear`), which reads each weight row once per step (MKL's sgemm reads
    them at a third of that speed for such few rows). In training under CPU bf16 autocast it is
    :class:`AutocastLinear` (autocast's arithmetic, some products split in row halves); longer inputs otherwise use
    the ordinary matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, compiling = x.shape[:-1].numel(), torch.compiler.is_compiling()
        if compiling and rows == 1:
            y = (x.unsqueeze(-2) * self.weight).sum(-1)
            y = y if self.bias is None else y + self.bias
        elif not compiling and self.autocast_training(x):
            y = AutocastLinear.apply(x, self.weight, self.bias)
        else:
            few = None if compiling and rows > kernels.F32_MAX_ROWS else kernels.f32_linear(x, self.weight, self.bias)
            y = super().forward(x) if few is None else few
        return with_adapter(self, x, y)

    def autocast_training(self, x: torch.Tensor) -> bool:
        """Whether this product is one :class:`AutocastLinear` takes: bf16 autocast on a CPU with AVX-512 (where
        gptlab's transposing kernel runs), gradients wanted, an fp32 weight that is a plain tensor (not a DTensor
        shard of FSDP or tensor parallelism)."""
        return (
            x.device.type == "cpu"
            and torch.is_grad_enabled()
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and type(self.weight) is nn.Parameter
            and self.weight.dtype == torch.float32
            and (x.requires_grad or self.weight.requires_grad)
            and kernels.has_avx512_kernels()
        )


def with_adapter(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` (the layer's own product, fresh) plus the update of the layer's LoRA adapter (:mod:`gptlab.lora`), if it
    has one that is on, added into ``y``'s row slices in place: no full-width copy is made or kept for backward."""
    lora: Any = layer._modules.get("lora")
    return lora.add_to(y, x) if lora is not None and lora.enabled else y


def make_norm(cfg: GPTConfig, dim: int) -> nn.Module:
    """The config's normalization over ``dim`` channels: LayerNorm (Ba et al. 2016; bias with ``cfg.bias``) or
    RMSNorm (Zhang & Sennrich 2019: x / sqrt(mean(x^2) + eps), no centring), with a learned gain unless
    ``norm_weight`` is off (nanochat's parameter-free norm)."""
    if cfg.norm_type == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.layer_norm_eps, elementwise_affine=cfg.norm_weight)
    return nn.LayerNorm(dim, eps=cfg.layer_norm_eps, elementwise_affine=cfg.norm_weight, bias=cfg.bias)


def rope_frequencies(cfg: GPTConfig, device: torch.device | None = None) -> torch.Tensor:
    """The rotary frequencies θ_i = theta^(-2i/d) of a head of d channels (Su et al. 2021, RoFormer, eq. 15), with
    Llama 3.1's rescaling when ``rope_scaling == "llama3"``: wavelengths longer than original_context /
    low_freq_factor are divided by ``rope_factor``, those shorter than original_context / high_freq_factor kept,
    and those between interpolated smoothly (Meta's reference code; ``transformers``'
    ``_compute_llama3_parameters``)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    if cfg.rope_scaling == "llama3":
        ctx, factor = cfg.rope_original_context, cfg.rope_factor
        low, high = ctx / cfg.rope_low_freq_factor, ctx / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low, inv / factor, inv)
        smooth = (ctx / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        inv = torch.where((wavelen >= high) & (wavelen <= low), mid, scaled)
    return inv


def rope_cos_sin(cfg: GPTConfig, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles, [..., T, head_dim] for ``pos`` [..., T], computed in
    float32 whatever the model's dtype (as ``transformers`` does), then cast."""
    freqs = pos.float()[..., None] * rope_frequencies(cfg, pos.device)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, heads, T, d] by the angles of ``cos``/``sin`` ([T, d] or [B, T, d]): each channel i of the
    first half is paired with channel i + d/2 (the "rotate half" layout of GPT-NeoX, Llama and ``transformers``),
    so the score between positions m and n depends on m - n only."""
    if cos.dim() == 3:  # per-row positions: [B, 1, T, d] to broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """c * tanh(logits / c): logits kept within (-c, c), nearly unchanged where small (Gemma 2; nanochat's 15)."""
    return cap * torch.tanh(logits / cap) if cap > 0 else logits
