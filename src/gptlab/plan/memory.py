"""Memory for training and inference, per device, and inference sizing against a given accelerator.

Sources, per formula:
- Weights, gradients and optimizer state per parameter, and ZeRO stages 1–3: Rajbhandari et al. 2020 (ZeRO),
  section 3.1 and Figure 1: mixed-precision Adam keeps 2 + 2 + K bytes per parameter, K = 12 (fp32 master weights,
  momentum, variance); stage 1 shards the K bytes over the data-parallel degree, stage 2 the gradients too, stage 3
  the weights too.
- Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", eqs. 1–5:
  per layer s·b·h·(34 + 5·a·s/h) bytes (16-bit activations, with dropout masks) without parallelism;
  s·b·h·(10 + 24/t + 5·a·s/(h·t)) with t-way tensor parallelism; s·b·h·(34/t + 5·a·s/(h·t)) with sequence
  parallelism as well; selective recomputation drops the 5·a·s/h term; full recomputation keeps 2·s·b·h per layer
  (the layer's input). With 1F1B pipelining the first stage holds L layers' worth whatever the pipeline degree.
  The paper's terms are counted per tensor kept, so they generalise to the shapes it does not cover
  (:func:`activation_bytes_per_layer`): grouped-query attention keeps fewer keys and values, a SwiGLU MLP keeps
  four ff-wide tensors where GELU keeps two, a run without dropout keeps no masks, and fused attention
  (FlashAttention, Dao et al. 2022, and PyTorch's scaled_dot_product_attention) keeps no a·s² scores, as selective
  recomputation does not. On GPT-3's shape with dropout and materialised scores this is the paper's 34 + 5·a·s/h.
- The head and the loss (:func:`loss_bytes`): with a vocabulary of 50k their fp32 logits and gradients weigh as
  much as several layers' activations.
- The high-water mark of a step (``peak``): weights, optimizer state and FSDP's gathered buffers, plus the larger of
  the activations and the loss's memory (all alive at the end of the forward pass) and the gradients (complete at
  the end of the backward pass, when the activations are freed): gradients are freed between steps
  (``zero_grad(set_to_none)``) and, layer by layer, appear as activations go. With gradient accumulation the
  gradients outlive the step, so both count. FSDP2 (ZeRO-3) holds one block's parameters gathered while it computes
  and prefetches the next block's (PyTorch's FSDP2 docs, "implicit prefetching"): two blocks' weights. ``total`` is
  the sum of every part, the bound the ZeRO paper tabulates. Transient buffers (an attention kernel's workspace)
  are not modelled: measured against PyTorch's own memory tracker they are within a few per cent
  (``docs/benchmarks.md``).
- KV cache: 2 (keys and values) · layers · kv_heads · head_dim · sequence · batch · bytes.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import GptlabError
from ..layers import loss_chunk_rows
from .hardware import Hardware
from .shape import Shape, matmul_params, params

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
# Bytes per parameter: (weights, gradients, optimizer state) for each optimizer and precision.
OPTIMIZERS = {
    ("adamw", "mixed"): (2, 2, 12),  # bf16/fp16 weights and grads; fp32 master, m, v (ZeRO's K = 12)
    ("adamw", "fp32"): (4, 4, 8),  # m, v
    ("adam8bit", "mixed"): (2, 2, 6),  # fp32 master + 8-bit m and v (Dettmers et al. 2022)
    ("adam8bit", "fp32"): (4, 4, 2),
    ("sgd", "mixed"): (2, 2, 8),  # fp32 master + fp32 momentum
    ("sgd", "fp32"): (4, 4, 4),  # momentum
}
RECOMPUTE = ("none", "selective", "full")
ATTENTION = ("eager", "flash")  # scores materialised, or a fused kernel that keeps none


def dtype_bytes(dtype: str) -> float:
    if dtype not in DTYPE_BYTES:
        raise GptlabError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def weights_bytes(s: Shape, dtype: str = "bf16") -> float:
    return params(s)["total"] * dtype_bytes(dtype)


def kv_cache_bytes(s: Shape, seq_len: int, batch: int = 1, dtype: str = "bf16") -> float:
    """2 · n_layer · n_kv_head · head_dim · seq_len · batch · bytes (what :class:`gptlab.model.KVCache` allocates)."""
    return 2.0 * s.n_layer * s.kv_heads * s.head_dim * seq_len * batch * dtype_bytes(dtype)


def activation_bytes_per_layer(
    s: Shape,
    seq_len: int,
    micro_batch: int,
    tp: int = 1,
    sequence_parallel: bool = False,
    recompute: str = "none",
    attention: str = "flash",
    dropout: bool = False,
) -> float:
    """Bytes of activations one layer keeps for the backward pass, per device: Korthikanti et al. 2022, eqs. 1–5,
    counted tensor by tensor (see the module docstring), in units of s·b·h bytes at 16 bits:

    - the two norms' inputs (4), the QKV and MLP matmuls' inputs (2 + 2), a dropout mask after attention and after
      the MLP (1 + 1, with ``dropout``): kept whole on every tensor-parallel rank unless ``sequence_parallel``;
    - queries, keys and values (2·(d_attn + 2·kv_dim)/h), the attention output projection's input (2·d_attn/h),
      the MLP's hidden tensors (2·ff/h each: GELU's input and output, or SwiGLU's gate-and-up, SiLU output and
      product), and with ``attention="eager"`` the scores: softmax output, its dropout mask and the dropout output
      (5·a·s/h; 4 without dropout): split over the ``tp`` ranks.

    ``attention="flash"`` (a fused kernel that keeps no scores) and ``recompute="selective"`` drop the score term;
    ``recompute="full"`` keeps only the layer's input, 2·s·b·h."""
    if recompute not in RECOMPUTE:
        raise GptlabError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    if attention not in ATTENTION:
        raise GptlabError(f"attention must be one of {ATTENTION}, got {attention!r}")
    sbh, a, h, t = seq_len * micro_batch * s.d_model, s.n_head, s.d_model, tp
    if recompute == "full":
        return 2.0 * sbh / (t if sequence_parallel else 1)
    kv_dim = s.kv_heads * s.head_dim
    whole = 4.0 + 2.0 + 2.0 + (2.0 if dropout else 0.0)
    split = 2.0 * (s.d_attn + 2 * kv_dim) / h + 2.0 * s.d_attn / h + 2.0 * _mlp_width(s) * (4 if s.gated_mlp else 2) / h
    if attention == "eager" and recompute == "none":
        split += (5.0 if dropout else 4.0) * a * seq_len / h
    return sbh * ((whole + split) / t if sequence_parallel else whole + split / t)


def loss_bytes(s: Shape, seq_len: int, micro_batch: int) -> float:
    """Bytes the head and the cross-entropy hold at the end of the forward pass, with gptlab's fused head-and-loss
    (:class:`gptlab.layers.LinearCrossEntropy`, which forms both gradients in the forward pass and never makes the
    whole [rows, vocab] logits): the fp32 logits of one chunk of rows (:func:`gptlab.layers.loss_chunk_rows`), and
    the fp32 gradients of the head's input (rows × d_model) and of its weight (vocab × d_model). For GPT-2 at 4 × 256
    tokens that is 206 + 3 + 154 MB, against 604 MB for the twelve layers: not the few s·b·h the layer formula's
    authors leave out."""
    rows, V, d = seq_len * micro_batch, s.vocab_size, s.d_model
    return 4.0 * (min(rows, loss_chunk_rows(V)) * V + rows * d + V * d)


def _mlp_width(s: Shape) -> float:
    """The MLP hidden width a token passes through, averaged over the layers (a routed layer's token goes through
    ``experts_per_token`` experts, and the shared expert where there is one)."""
    M, L = s.moe_layers, s.n_layer
    routed = s.experts_per_token * (s.expert_ff or s.ff) + (s.ff if s.shared_expert else 0)
    return ((L - M) * s.ff + M * routed) / L


def training_memory(
    s: Shape,
    micro_batch: int = 1,
    seq_len: int | None = None,
    optimizer: str = "adamw",
    precision: str = "mixed",
    dp: int = 1,
    tp: int = 1,
    pp: int = 1,
    zero: int = 0,
    sequence_parallel: bool = False,
    recompute: str = "none",
    attention: str = "flash",
    dropout: bool = False,
    grad_accum: int = 1,
) -> dict[str, float]:
    """Bytes per device while training: weights, gradients, optimizer state (each split over tp·pp model-parallel
    ranks, then over the dp data-parallel ranks per the ZeRO stage), activations (Korthikanti), FSDP's gathered
    blocks (ZeRO-3), their sum ``total`` and the step's high-water mark ``peak`` (see the module docstring)."""
    if (optimizer, precision) not in OPTIMIZERS:
        raise GptlabError(
            f"unknown optimizer/precision {optimizer}/{precision}; choose optimizer from "
            f"{sorted({o for o, _ in OPTIMIZERS})} and precision from mixed, fp32"
        )
    if zero not in (0, 1, 2, 3):
        raise GptlabError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero}")
    if s.n_head % tp:
        raise GptlabError(f"tensor parallelism {tp} must divide the {s.n_head} attention heads")
    if pp > s.n_layer:
        raise GptlabError(f"pipeline parallelism {pp} exceeds the {s.n_layer} layers")
    seq_len = seq_len or s.n_ctx
    w, g, k = OPTIMIZERS[(optimizer, precision)]
    p = params(s)
    n = p["total"] / (tp * pp)
    per_layer = ((p["attention"] + p["mlp"]) / s.n_layer + 2 * s.norm_params(s.d_model)) / tp  # one block
    out = {
        "weights": n * w / (dp if zero >= 3 else 1),
        "gradients": n * g / (dp if zero >= 2 else 1),
        "optimizer": n * k / (dp if zero >= 1 else 1),
        "activations": s.n_layer
        * activation_bytes_per_layer(s, seq_len, micro_batch, tp, sequence_parallel, recompute, attention, dropout),
        "fsdp_buffers": 2 * per_layer * w if zero >= 3 and dp > 1 else 0.0,
        "loss": loss_bytes(s, seq_len, micro_batch),
    }
    if precision == "fp32":
        out["activations"] *= 2  # the formula counts 16-bit activations
    out["total"] = sum(out.values())
    forward = out["activations"] + out["loss"]  # all alive at the end of the forward pass
    grads_and_activations = out["gradients"] + forward if grad_accum > 1 else max(out["gradients"], forward)
    out["peak"] = out["weights"] + out["optimizer"] + out["fsdp_buffers"] + grads_and_activations
    return out


def inference(
    s: Shape,
    hw: Hardware,
    context: int,
    batch: int = 1,
    dtype: str = "bf16",
    kv_dtype: str | None = None,
    devices: int | None = None,
    usable: float = 0.9,
    prompt_tokens: int | None = None,
) -> dict[str, Any]:
    """Serving ``s`` with ``batch`` sequences of ``context`` tokens on ``hw``:

    - memory: weights + KV cache (+ the largest transient activation, the [batch, vocab] logits in fp32);
    - ``min_devices``: the fewest devices whose ``usable`` memory fraction holds that, and
      ``min_tensor_parallel``: the fewest that also divide the attention heads (tensor parallelism splits heads);
    - ``max_batch``: the most sequences of ``context`` tokens that fit on ``devices`` (default ``min_devices``);
    - decode tokens/s per sequence, bounded by memory bandwidth (every weight and every cached key/value read once
      per step) and by compute (2·N_matmul + 4·L·d·context FLOPs per token), and the prefill time of a
      ``prompt_tokens`` prompt (default ``context``), compute-bound at the devices' peak.
    These are upper bounds (rooflines): real engines reach a fraction of them."""
    kv_dtype = kv_dtype or dtype
    wbytes = weights_bytes(s, dtype)
    kv_seq = kv_cache_bytes(s, context, 1, kv_dtype)
    logits = batch * s.vocab_size * 4.0
    need = wbytes + batch * kv_seq + logits
    per_device = hw.memory_bytes * usable
    min_devices = max(1, math.ceil(need / per_device))
    min_tp = next(t for t in range(min_devices, s.n_head + 1) if s.n_head % t == 0) if min_devices <= s.n_head else None
    n_dev = devices or min_devices
    max_batch = max(0, math.floor((n_dev * per_device - wbytes) / (kv_seq + s.vocab_size * 4.0)))
    flops_token = 2.0 * matmul_params(s) + 4.0 * s.n_layer * s.d_model * context
    step_bytes = wbytes + batch * kv_seq
    bw_bound = n_dev * hw.bandwidth / step_bytes  # steps per second = tokens/s per sequence
    compute_bound = n_dev * hw.peak_flops / (flops_token * batch)
    prompt = prompt_tokens or context
    prefill_flops = prompt * batch * 2.0 * matmul_params(s) + batch * 2.0 * s.n_layer * s.d_model * prompt**2
    return {
        "weights_bytes": wbytes,
        "kv_cache_bytes_per_sequence": kv_seq,
        "kv_cache_bytes": batch * kv_seq,
        "logits_bytes": logits,
        "memory_needed": need,
        "device_memory": hw.memory_bytes,
        "min_devices": min_devices,
        "min_tensor_parallel": min_tp,
        "devices": n_dev,
        "max_batch": max_batch,
        "fits": need <= n_dev * per_device,
        "decode_tokens_per_second_bandwidth_bound": bw_bound,
        "decode_tokens_per_second_compute_bound": compute_bound,
        "decode_tokens_per_second_bound": min(bw_bound, compute_bound),
        "decode_ms_per_token_bound": 1000.0 / min(bw_bound, compute_bound),
        "batch_tokens_per_second_bound": batch * min(bw_bound, compute_bound),
        "prefill_seconds_bound": max(prefill_flops / (n_dev * hw.peak_flops), wbytes / (n_dev * hw.bandwidth)),
    }
