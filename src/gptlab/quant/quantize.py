"""Weight-only quantization of a GPT's linear layers (int8 per output channel, int4 per group), gpt-fast's recipe.

Only the weights are stored in fewer bits and expanded inside the matmul; activations stay in the compute dtype,
except inside gptlab's AVX2 kernels (:mod:`.kernels`), which round them to int16 per row (2^-16 of the row's
largest value) for integer multiply-adds. On any x86 CPU with AVX2 (AVX-512 ones included), where PyTorch's
int8 and int4 kernels decode slower than fp32, those serve every input, 64 rows a call (a decode step, a prefill),
faster than the BLAS GEMM on the dequantized weight even at 1,024 rows (docs/benchmarks.md).

- **int8**: symmetric, one scale per output row: ``scale = max|w_row| / 127``, ``q = round(w / scale)`` in
  [-127, 127]. Matmul: PyTorch's ``_weight_int8pack_mm`` on the CPU (gptlab's kernel where AVX2 is); elsewhere
  ``F.linear(x, q) * scale``, which ``torch.compile`` fuses into one kernel reading int8 (gpt-fast's CUDA path).
- **int4**: asymmetric, one scale and one offset per group of ``group_size`` input columns: ``scale = (max - min) /
  15``, ``w ≈ (q - 8) * scale + zero`` with ``zero = min + 8 * scale`` (the convention of PyTorch's int4
  "tinygemm" kernels), scale and zero stored in fp16 (as llama.cpp's q4_1 stores its scale and minimum: 4.5 bits
  per weight with groups of 64, where fp32 took 5), and ``q = round((w - offset) / scale)`` in [0, 15] from the
  stored values (``offset = zero - 8 * scale``). Two codes per byte, the even column in the high nibble. Matmul:
  ``_weight_int4pack_mm_for_cpu`` on the CPU (gptlab's kernel where AVX2 is), ``_weight_int4pack_mm`` on CUDA
  (bf16), each from a kernel-specific layout built by :meth:`QuantLinear.prepare` when the model reaches its
  device. Another device is refused in one line.

Checkpoints store the portable form (codes, scales, zeros) in safetensors, next to a ``quantization`` record in
``state.json`` (:func:`quantization_record`); :func:`quantize_model` and :func:`empty_quantized` rebuild the modules.
A tied embedding + head (GPT-2) is quantized once: the head's codes also serve the embedding lookup
(:class:`QuantEmbedding`), so the weights are stored and read once, as in llama.cpp's GPT-2 files.
"""

from __future__ import annotations

import sys
from typing import Any, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..errors import GptlabError
from ..layers import with_adapter
from ..lora import merged_adapters
from ..model import GPT
from .config import DEFAULT_GROUP_SIZE, GROUP_SIZES

M = TypeVar("M", bound=nn.Module)
MODES = ("int8", "int4")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [n, k], scales fp32 [n]) with w ≈ codes * scales[:, None]."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return codes.float() * scales.float()[:, None]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] [n, k] -> bytes [n, k / 2], column 2j in the high nibble of byte j."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: int32 codes [n, 2 * bytes]."""
    hi, lo = (packed >> 4).to(torch.int32), (packed & 15).to(torch.int32)
    return torch.stack([hi, lo], dim=-1).flatten(-2)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [n, k / 2], scales [n, k / g], zeros [n, k / g]) with w ≈ (q - 8) * scale + zero per group;
    scales and zeros fp16."""
    n, k = w.shape
    if k % group_size:
        raise GptlabError(f"int4: a layer has {k} input features, not a multiple of --group-size {group_size}")
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=2**-24).half()  # (2^-24: fp16's smallest step; a constant group's scale)
    zeros = (lo + 8 * scales.float()).half()
    if not (torch.isfinite(scales).all() and torch.isfinite(zeros).all()):
        raise GptlabError(
            "int4: a layer has weights beyond fp16's range (65504) for its scales and zeros; keep it in float "
            "(--exclude NAME) or use --mode int8"
        )
    offsets = zeros.float() - 8 * scales.float()  # the codes are chosen for the scale and zero stored
    q = torch.round((g - offsets[..., None]) / scales.float()[..., None]).clamp(0, 15).reshape(n, k)
    return pack_int4(q), scales, zeros


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    q = unpack_int4(packed).float()
    n, k = q.shape
    groups = scales.size(1)
    w = (q.reshape(n, groups, k // groups) - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(n, k)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(‖w‖² / ‖w - ŵ‖²)."""
    noise = (reference.float() - approx.float()).pow(2).sum().clamp(min=1e-30)
    return float(10 * torch.log10(reference.float().pow(2).sum() / noise))


class QuantLinear(nn.Module):
    """A bias-optional linear layer with int8 or int4 weights (see the module docstring)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: str, group_size: int = 64) -> None:
        super().__init__()
        if mode not in MODES:
            raise GptlabError(f"unknown quantization mode {mode!r}; choose int8 or int4")
        self.in_features, self.out_features, self.mode, self.group_size = in_features, out_features, mode, group_size
        n, k = out_features, in_features
        if mode == "int8":
            self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(n))
        else:
            if k % group_size:
                raise GptlabError(f"int4: {k} input features are not a multiple of --group-size {group_size}")
            self.register_buffer("qweight", torch.zeros(n, k // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(n, k // group_size, dtype=torch.float16))
            self.register_buffer("zeros", torch.zeros(n, k // group_size, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(n) if bias else None)
        self._kernel: tuple[torch.Tensor, torch.Tensor] | None = None  # int4: PyTorch's kernel layout, per device
        self._ops: Any = None  # on an AVX2 CPU: gptlab's kernels (gptlab.kernels), set by prepare()
        self._prepared_for: torch.device | None = None

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, mode: str, group_size: int = 64
    ) -> QuantLinear:
        n, k = weight.shape
        m = cls(k, n, bias is not None, mode, group_size)
        with torch.no_grad():
            if mode == "int8":
                m.qweight, m.scales = quantize_int8(weight)
            else:
                m.qweight, m.scales, m.zeros = quantize_int4(weight, group_size)
            if bias is not None:
                m.bias = bias.detach().float().clone()
        return m.to(weight.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # int4 scales and zeros are fp16 (checkpoints store floats as fp32, and those of gptlab before 2026-12 held
        # fp32 scales and zeros: rounded here, as quantize_int4 now rounds them)
        if self.mode == "int4":
            for name in ("scales", "zeros"):
                if prefix + name in state_dict:
                    state_dict[prefix + name] = state_dict[prefix + name].half()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def dequantized(self) -> torch.Tensor:
        if self.mode == "int8":
            return dequantize_int8(self.qweight, self.scales)
        return dequantize_int4(self.qweight, self.scales, self.zeros)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dequantized rows ``idx`` of the weight (the embedding lookup of a tied head), fp32."""
        if self.mode == "int8":
            return self.qweight[idx].float() * self.scales[idx, None]
        q = unpack_int4(self.qweight[idx].reshape(-1, self.qweight.size(1))).float()
        s, z = self.scales[idx].reshape(-1, self.scales.size(1)), self.zeros[idx].reshape(-1, self.zeros.size(1))
        w = (q.reshape(q.size(0), s.size(1), -1) - 8) * s[..., None] + z[..., None]
        return w.reshape(*idx.shape, self.in_features)

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in (self.qweight, self.scales, getattr(self, "zeros", None)) if t is not None)

    def prepare(self) -> None:
        """Get the kernels ready for the device the module is on: on an AVX2 CPU gptlab's (:mod:`.kernels`);
        otherwise, for int4, PyTorch's weight layout."""
        dev = self.qweight.device
        self._prepared_for, self._kernel = dev, None
        self._ops = kernels.tuned_ops() if dev.type == "cpu" else None
        if self.mode == "int4" and self._ops is None:
            self._kernel = self._pytorch_int4_layout()

    def _pytorch_int4_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed weight and scales-and-zeros of PyTorch's int4 kernels (rows padded to a multiple of 16, as
        its CPU kernel needs)."""
        dev, n = self.qweight.device, self.out_features
        pad = -n % 16
        q = unpack_int4(self.qweight)
        s, z = self.scales, self.zeros
        if pad:
            q = torch.cat([q, q.new_full((pad, q.size(1)), 8)])
            s, z = torch.cat([s, s.new_ones(pad, s.size(1))]), torch.cat([z, z.new_zeros(pad, z.size(1))])
        scales_and_zeros = torch.stack([s, z], dim=-1).transpose(0, 1).contiguous()  # [k / g, n, 2]
        if dev.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        elif dev.type == "cuda":
            packed = torch.ops.aten._convert_weight_to_int4pack(pack_int4(q).contiguous(), 8)
            scales_and_zeros = scales_and_zeros.to(torch.bfloat16)
        else:
            raise GptlabError(f"int4 has a kernel on CPU and CUDA only, not on {dev.type}; use --mode int8")
        return packed, scales_and_zeros

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # QLoRA: gradients flow to the input, never to the codes
            y = FrozenQuantMatmul.apply(x, self)
        else:
            y = self.product(x)
        return with_adapter(self, x, y)

    def _kernel_product(self, x: torch.Tensor) -> torch.Tensor:
        """gptlab's kernel on at most ``kernels.MAX_ROWS`` rows of fp32 ``x`` [rows, in_features]."""
        if self.mode == "int8":
            return self._ops.int8_mm(x, self.qweight, self.scales.float())
        return self._ops.int4_mm(x, self.qweight, self.scales.half(), self.zeros.half(), self.group_size)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` with the quantized ``W``, by the fastest kernel the device has."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self._prepared_for != self.qweight.device:
            self.prepare()
        if self._ops is not None and x2.dtype == torch.float32:  # an AVX2 CPU: gptlab's kernels
            chunks = [self._kernel_product(c) for c in x2.split(kernels.MAX_ROWS)]
            y = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        elif self.mode == "int8":
            if x2.device.type == "cpu":
                y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scales.to(x2.dtype))
            else:
                y = F.linear(x2, self.qweight.to(x2.dtype)) * self.scales.to(x2.dtype)
        else:
            if self._kernel is None:  # an AVX2 CPU computing in another dtype than float32
                self._kernel = self._pytorch_int4_layout()
            packed, sz = self._kernel
            if x2.device.type == "cpu":
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x2.contiguous(), packed, self.group_size, sz.to(x2.dtype)
                )
            else:
                y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16), packed, self.group_size, sz).to(x2.dtype)
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)


class FrozenQuantMatmul(torch.autograd.Function):
    """A quantized layer as a frozen function of its input (QLoRA, Dettmers et al. 2023): forward by the layer's
    kernels, backward ``grad @ W`` with ``W`` dequantized for the moment (the codes take no gradient)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer.product(x).clone()  # (the kernels' output may be a view: an adapter adds into it in place)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.layer.dequantized().to(grad.dtype)
        return grad @ w, None


class QuantEmbedding(nn.Module):
    """The token embedding of a model whose tied head is quantized: rows dequantized from the head's codes (the
    head is held by reference, not registered, so its tensors are stored once)."""

    def __init__(self, head: QuantLinear) -> None:
        super().__init__()
        self._head = [head]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self._head[0].rows(idx)


def linear_names(model: GPT, exclude: tuple[str, ...] = ()) -> list[str]:
    """The quantizable linear layers: attention and MLP projections, and the head unless excluded (MoE experts are
    stacked matmuls and stay in float)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("router")]
    return [n for n in names if not any(n == e or n.startswith(e + ".") or n.endswith("." + e) for e in exclude)]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def layer_mode(name: str, mode: str, head_mode: str | None) -> str:
    """The mode of layer ``name`` under a quantization of ``mode`` whose head may have its own, ``head_mode``."""
    return (head_mode or mode) if name == "lm_head" else mode


def quantize_model(
    model: GPT,
    mode: str,
    group_size: int = DEFAULT_GROUP_SIZE,
    exclude: tuple[str, ...] = (),
    head_mode: str | None = None,
) -> GPT:
    """Replace ``model``'s linear layers by :class:`QuantLinear` in place (round to nearest) and return it, its
    kernel layouts built for the device it is on (call :func:`prepare` again after moving it). ``head_mode``: the
    head's own mode (and a tied embedding's), e.g. int8 under int4 blocks, as llama.cpp's 4-bit files keep their
    output matrix at 8 or 6 bits."""
    for m in (mode, head_mode or mode):
        if m not in MODES:
            raise GptlabError(f"unknown quantization mode {m!r}; choose int8 or int4")
    if head_mode and "lm_head" in exclude:
        raise GptlabError("--head-mode quantizes the head and --exclude lm_head keeps it in float; drop one of them")
    if "int4" in (mode, head_mode) and group_size not in GROUP_SIZES:
        raise GptlabError(f"--group-size {group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
    if getattr(model, "quantization", None):
        raise GptlabError("the model is already quantized")
    if getattr(model, "lora", None):
        raise GptlabError("the model carries LoRA adapters; quantize the base first, then add them (QLoRA)")
    for name in linear_names(model, exclude):
        lin = model.get_submodule(name)
        assert isinstance(lin, nn.Linear)
        q = QuantLinear.from_weight(lin.weight.detach(), lin.bias, layer_mode(name, mode, head_mode), group_size)
        _set(model, name, q)
    if model.config.tie_weights and isinstance(model.lm_head, QuantLinear):
        model.wte = QuantEmbedding(model.lm_head)
    model.quantization = quantization_record(mode, group_size, exclude, head_mode)  # type: ignore[assignment]
    return prepare(model)


def quantization_record(
    mode: str, group_size: int, exclude: tuple[str, ...], head_mode: str | None = None
) -> dict[str, Any]:
    int4 = "int4" in (mode, head_mode)
    record = {"mode": mode, "group_size": group_size if int4 else None, "exclude": list(exclude)}
    return record | ({"head_mode": head_mode} if head_mode and head_mode != mode else {})


def check_record(record: Any) -> dict[str, Any]:
    """A checkpoint's quantization record, checked: {mode: int8|int4, group_size: one of GROUP_SIZES where a layer is
    int4 (None or absent for int8 alone), exclude: a list of layer names, and optionally head_mode: int8|int4, the
    head's own}."""
    ok = isinstance(record, dict) and record.get("mode") in MODES and record.get("head_mode") in (None, *MODES)
    if ok:
        group, exclude = record.get("group_size"), record.get("exclude", [])
        int4 = "int4" in (record["mode"], record.get("head_mode"))
        ok = (group in GROUP_SIZES and not isinstance(group, bool)) or (group is None and not int4)
        ok = ok and isinstance(exclude, list) and all(isinstance(e, str) for e in exclude)
    if not ok:
        raise GptlabError(
            f"the checkpoint's quantization record {str(record)[:120]} is damaged (it needs mode int8|int4, an int4 "
            f"group_size in {list(GROUP_SIZES)}, exclude: a list of names, head_mode int8|int4 if any); quantize the "
            "float model again"
        )
    return record


def empty_quantized(model: GPT, record: dict[str, Any]) -> GPT:
    """``model`` (any weights, e.g. on the meta device) with the quantized modules of ``record`` in place, ready to
    receive a quantized checkpoint's tensors."""
    record = check_record(record)
    mode, group = record["mode"], record.get("group_size") or 64
    for name in linear_names(model, tuple(record.get("exclude", ()))):
        lin = model.get_submodule(name)
        assert isinstance(lin, nn.Linear)
        m = layer_mode(name, mode, record.get("head_mode"))
        _set(model, name, QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, m, group))
    if model.config.tie_weights and isinstance(model.lm_head, QuantLinear):
        model.wte = QuantEmbedding(model.lm_head)
    model.quantization = dict(record)  # type: ignore[assignment]
    return model


def export_state(model: GPT, to: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What to write when saving ``model`` as ``to`` ("gptlab", "hf" or "gguf"): the state dict on the CPU (floats
    as float32, int4 scales and zeros as their fp16) and the checkpoint's extra metadata. A quantized model keeps
    its codes and its quantization record in a gptlab checkpoint, so it loads back quantized; a Hugging Face folder
    or a GGUF file gets float weights (GGUF re-quantizes them with ``--gguf-type``), so there it is dequantized,
    with a one-line notice."""
    record = getattr(model, "quantization", None)
    cpu = lambda t: t.detach().to("cpu", torch.float32) if t.is_floating_point() else t.detach().cpu()
    if to == "gptlab":
        state = {k: cpu(v) for k, v in model.state_dict().items()}
        for n, m in model.named_modules():  # int4 scales and zeros stay fp16, as the layer holds them
            if isinstance(m, QuantLinear) and m.mode == "int4":
                state.update({f"{n}.{b}": getattr(m, b).detach().cpu() for b in ("scales", "zeros")})
        return state, records(model)
    if not record:
        return merged_adapters(model, {k: cpu(v) for k, v in model.state_dict().items()}), {}
    print(
        f"gptlab: note: the {record['mode']} weights are dequantized to float32 for the "
        f"{'Hugging Face folder' if to == 'hf' else 'GGUF file'}",
        file=sys.stderr,
    )
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    out = {k: cpu(v) for k, v in model.state_dict().items() if k.rpartition(".")[0] not in quant}
    for n, m in quant.items():
        out[f"{n}.weight"] = cpu(m.dequantized())
        if m.bias is not None:
            out[f"{n}.bias"] = cpu(m.bias)
    if isinstance(model.wte, QuantEmbedding):
        out["wte.weight"] = out["lm_head.weight"]
    return merged_adapters(model, out), {}


def records(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint's ``state.json`` records so that the loader rebuilds ``model``'s modules: its quantization
    and its LoRA adapters (:func:`gptlab.checkpoint.skeleton`)."""
    return {key: dict(getattr(model, key)) for key in ("quantization", "lora") if getattr(model, key, None)}


def prepare(model: M) -> M:
    """Build every int4 kernel layout for the device the model is on (call after moving it)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.prepare()
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight the model reads per token: quantized codes and scales, float parameters, each once."""
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.weight_bytes
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.nbytes
    return total
