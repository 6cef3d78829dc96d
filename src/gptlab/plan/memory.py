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
- KV cache: 2 (keys and values) · layers · kv_heads · head_dim · sequence · batch · bytes.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import GptlabError
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
    s: Shape, seq_len: int, micro_batch: int, tp: int = 1, sequence_parallel: bool = False, recompute: str = "none"
) -> float:
    """Korthikanti et al. 2022, eqs. 1–5 (see the module docstring): bytes of activations one layer keeps for the
    backward pass, per device."""
    if recompute not in RECOMPUTE:
        raise GptlabError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    sbh, a, h, t = seq_len * micro_batch * s.d_model, s.n_head, s.d_model, tp
    if recompute == "full":
        return 2.0 * sbh / (t if sequence_parallel else 1)
    attention_scores = 0.0 if recompute == "selective" else 5.0 * a * seq_len / (h * t)
    linear = 34.0 / t if sequence_parallel else 10.0 + 24.0 / t
    return sbh * (linear + attention_scores)


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
) -> dict[str, float]:
    """Bytes per device while training: weights, gradients, optimizer state (each split over tp·pp model-parallel
    ranks, then over the dp data-parallel ranks per the ZeRO stage) and activations (Korthikanti)."""
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
    n = params(s)["total"] / (tp * pp)
    out = {
        "weights": n * w / (dp if zero >= 3 else 1),
        "gradients": n * g / (dp if zero >= 2 else 1),
        "optimizer": n * k / (dp if zero >= 1 else 1),
        "activations": s.n_layer
        * activation_bytes_per_layer(s, seq_len, micro_batch, tp, sequence_parallel, recompute),
    }
    if precision == "fp32":
        out["activations"] *= 2  # the formula counts 16-bit activations
    out["total"] = sum(out.values())
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
