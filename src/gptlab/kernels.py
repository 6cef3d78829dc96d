"""x86 kernels (AVX2, AVX-512, AVX-512 VNNI) for int8 and int4 weight-only matrix products, faster on CPUs than
PyTorch's, an fp32 one for eager decode steps and the server's packed prefill (:func:`f32_linear`, AVX-512), the
attention of a decode step (:func:`decode_attention`, AVX2), which reads only the cache slots its mask admits, and
for training the softmax of the fused head-and-loss (:func:`softmax_xent_`, AVX2) and, in training and eager
inference, GELU's tanh form (:func:`gelu_tanh_applies`, AVX-512).

PyTorch's ``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` decode GPT-2 124M slower than fp32 on the
CPUs measured here: 0.33-0.40x (int8) on an AVX2-only EPYC, and 0.19x (int8, 9.2 against 49.5 tok/s) and 0.08x
(int4) on an AVX-512 (VNNI, BF16) EPYC; inductor's own int8 code is no faster (docs/benchmarks.md). Batch-1 decoding
is a matrix-vector product bound by reading the weights, so these kernels read each weight row once per call, for up
to 16 batch rows, and spread blocks of rows over PyTorch's intra-op threads. They need AVX2, FMA and F16C (int4's
fp16 scales), which every AVX-512 CPU also has.

The int8 kernel first rounds the activation rows to int16 fixed point, one scale per row (max|x| / 32767): the error
is at most half a step, 2^-16 of the row's largest value, 128 times finer than an int8 weight code. Codes are then
widened to int16 and multiplied with ``vpmaddwd``: 16 products per instruction into int32 lanes. On AVX-512 CPUs it
runs the same loops on 512-bit registers, and where the CPU has AVX-512 VNNI, ``vpdpwssd`` multiplies and
accumulates in one instruction (``vpmaddwd`` + ``vpaddd`` in two); the loop is chosen per call from the CPU's
features. int8 keeps one scale per output row.

The int4 kernel (two codes per byte, groupwise scale and zero) rounds the activations to int8 codes per group of the
weights' group size (scale max|x_group| / 127), as llama.cpp's q8_0 does per block of 32 for its q4_0 products: the
weights' 4-bit codes are then unsigned bytes multiplied by signed activation bytes, 64 products an instruction with
VNNI (``vpdpbusd``), where int16 activations took two ``vpdpwssd`` of 32 (GPT-2 124M's int4 products for 8 rows:
1.3x faster on an AMX Xeon, docs/benchmarks.md); without VNNI ``vpmaddubsw`` + ``vpmaddwd``. Each group's integer
sum is scaled once by the product of the two scales, and the zero point's share comes from the group sums of the
activations themselves. The rounding costs a small fraction of what the weights' 4-bit rounding does (a test holds
it under a quarter; 13 % on GPT-2-shaped logits). The tests check every loop against a float64 computation of its
scheme and against the hand bound of the rounding; docs/benchmarks.md has the perplexity through the kernels.

The C++ source is ``kernels.cpp`` beside this file. It is compiled once per machine with the system C++ compiler
(``$CXX``, else ``c++``), against the installed torch, into ``kernels/`` under gptlab's cache
(:func:`gptlab.assets.cache_dir`, ``$GPTLAB_CACHE``), keyed on the source, the flags, the compiler's identity, torch
and Python; the library is written under a temporary name and renamed, so a crash leaves no half-written file. The
ops are registered as ``torch.ops.gptlab.int8_mm``, ``int4_mm``, ``f32_mm``, ``decode_attention``,
``softmax_xent_``, ``gelu_tanh`` and ``gelu_tanh_backward`` with fake (shape-only) implementations, so
``torch.compile`` calls them as opaque kernels.

:func:`load` is None (and :class:`gptlab.quant.quantize.QuantLinear` uses PyTorch's kernels) when the CPU lacks AVX2,
off Linux, or with ``GPTLAB_KERNELS=off``; a failed build prints the compiler's error once and is also None, unless
``GPTLAB_KERNELS=required`` (CI), where it is an error. ``GPTLAB_KERNELS=avx2`` builds a library that takes the
256-bit loops only, and ``avx512`` one that takes the 512-bit loops without VNNI, so that every loop runs, and is
tested, on the widest CPUs too.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .assets import cache_dir
from .errors import GptlabError

# Rows of one int8 or int4 kernel call (a full CPU serving pool's decode step, as F32_MAX_ROWS); QuantLinear feeds
# longer inputs (prefills, QLoRA's forward) 64 rows at a time. Inputs past 16 rows used to take the BLAS GEMM on the
# dequantized weight, 9-30x slower at 17-64 rows and still 1.3-1.9x at 1,024 (GPT-2, docs/benchmarks.md).
MAX_ROWS = 64
F32_MAX_ROWS = 64  # rows the fp32 kernel serves in inference (decode steps of a full CPU pool); past that, MKL


SOURCE = Path(__file__).with_name("kernels.cpp")
MODES = ("auto", "off", "avx2", "avx512", "required")  # GPTLAB_KERNELS
AVX2, AVX512, VNNI = 1, 2, 3  # the loops kernels.cpp takes (its Isa), as isa() reports them
MAX_ISA = {"avx2": AVX2, "avx512": AVX512}  # the widest loop a build may take; other modes: the CPU's best


_thread = threading.local()  # any_rows: inside row_invariant() on this thread


def f32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` by gptlab's fp32 kernel (``f32_mm``: each weight row read once per step, at
    memory speed up to 8 rows, where MKL's sgemm reads GPT-2's head at a third of it; 1.2-1.4x MKL at 16-32 rows,
    level at 64), for inference on up to ``F32_MAX_ROWS`` rows of plain fp32 CPU tensors (any number inside
    :func:`row_invariant`); None where it does not apply (gradients, autocast, other devices, dtypes or tensor
    types, more rows, no kernels), for the caller to use ``F.linear``. A row's result is the same bits whatever the
    other rows are (a decode step's rows are other requests)."""
    rows = x.numel() // max(1, x.size(-1))
    if (
        (rows > F32_MAX_ROWS and not getattr(_thread, "any_rows", False))
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or type(weight) not in (torch.Tensor, torch.nn.Parameter)
        or not weight.is_contiguous()
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or torch.is_autocast_enabled("cpu")
    ):
        return None
    if not has_f32_kernel():
        return None
    return torch.ops.gptlab.f32_mm(x.reshape(rows, x.size(-1)), weight, bias).view(*x.shape[:-1], weight.size(0))


@contextlib.contextmanager
def row_invariant() -> Iterator[None]:
    """Inside (on this thread), :func:`f32_linear` takes products of any number of rows, so that where it applies
    (:func:`has_f32_kernel`) a row's result never depends on the other rows or their number: the serving scheduler
    prefills several prompts in one pass with it, each to the bits of its pass alone (:mod:`gptlab.serve.scheduler`).
    Past 64 rows MKL's sgemm is faster (1.3-1.4x from 512 rows on an AMX Xeon: docs/benchmarks.md), but which bits
    a row gets from it depends on how many rows there are."""
    before = getattr(_thread, "any_rows", False)
    _thread.any_rows = True
    try:
        yield
    finally:
        _thread.any_rows = before


def constant_when_compiled(fn: Callable[[], bool]) -> Callable[[], bool]:
    """``torch.compiler.assume_constant_result``: inside ``torch.compile`` a call of ``fn`` is its result, taken
    once as a constant (these answers depend on the CPU only). Marked as that decorator marks a function, without
    its import of ``torch._dynamo``: 1.0 s of gptlab's 2.7 s import on an Intel Xeon, paid by every CLI command
    (a test holds the marking equal to the decorator's)."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@constant_when_compiled
def has_avx512_kernels() -> bool:
    """Whether the kernels' AVX-512 loops run here: the fp32 products' and GELU's have no other."""
    return isa() >= AVX512


@constant_when_compiled
def has_f32_kernel() -> bool:
    """Whether :func:`f32_linear` applies on this CPU (the fp32 kernel's loops are AVX-512 only); the first call
    measures its block for one row (:func:`tuned_ops`)."""
    return has_avx512_kernels() and tuned_ops() is not None


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor | None:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)`` for one query per row (a decode
    step: ``q`` [B, heads, 1, head_dim], ``k`` and ``v`` [B, kv_heads, L, head_dim], ``mask`` bool [B, 1, 1, L]) by
    gptlab's kernel (``decode_attention``), which reads only the slots the mask admits where SDPA reads all ``L``
    (a compiled step's cache is rounded up to 256 slots, a serving pool's view to its longest row); None where it
    does not apply (gradients, other devices or dtypes, a head size not a multiple of 8, no kernels), for the caller
    to use SDPA. A row's result does not depend on the other rows or on ``L``."""
    if (
        mask is None
        or q.size(2) != 1
        or mask.dtype != torch.bool
        or q.device.type != "cpu"
        or not q.dtype == k.dtype == v.dtype == torch.float32
        or q.size(-1) % 8
        or q.size(-1) > 512
        or k.stride(-1) != 1
        or v.stride(-1) != 1
        or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
        or not have_kernels()
    ):
        return None
    return torch.ops.gptlab.decode_attention(q, k, v, mask, q.size(-1) ** -0.5)


def softmax_xent_(
    logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, scale: torch.Tensor
) -> torch.Tensor | None:
    """The softmax cross-entropy of each column of ``logits`` [V, R] (fp32 or bf16, contiguous, on a CPU; rows from
    ``vocab_size`` on are padding) against ``targets`` [R] (< 0: ignored), by gptlab's kernel (``softmax_xent_``,
    two passes over the logits, in place): returns the losses [R] (fp32, 0 where ignored, NaN where a logit is not
    finite) and overwrites ``logits`` with their gradient times ``scale`` [R], (softmax - one-hot) * scale, rounded
    once to its dtype. None where it does not apply (other devices or dtypes, no kernels), for the caller to use
    PyTorch's ops. :class:`gptlab.layers.LinearCrossEntropy` calls it."""
    if (
        logits.device.type != "cpu"
        or logits.dtype not in (torch.float32, torch.bfloat16)
        or not logits.is_contiguous()
        or not have_kernels()
    ):
        return None
    return torch.ops.gptlab.softmax_xent_(logits, targets, vocab_size, scale.to(torch.float32))


def gelu_tanh_applies(x: torch.Tensor) -> bool:
    """Whether ``gelu_tanh`` / ``gelu_tanh_backward`` (GELU's tanh form, AVX-512) take ``x``:
    :class:`gptlab.layers.TanhGelu` uses them in training, :func:`gptlab.layers.gelu` the forward one in eager
    inference."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and has_avx512_kernels()


# The longest sequence gptlab's causal attention takes: one head's [T, T] scores (fp32) and probabilities (bf16) per
# thread, in its L2 up to here. Forward and backward of 12 heads of 64 on an AMX Xeon, 2 threads, against PyTorch's
# flash attention: T=256 (B=4) 7.9 against 23.6 ms, T=512 (B=2) 15.6 against 24.8, T=1024 34.0 against 31.4, T=2048
# 204 against 96.
CAUSAL_ATTENTION_MAX_T = 512


def causal_attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether gptlab's causal attention kernels (``causal_attention``, ``causal_attention_backward``) take these
    bf16 CPU tensors, q [B, heads, T, 64] and k, v [B, kv_heads, T, 64] (kv_heads dividing heads: the caller repeats
    them for the kernels), T a multiple of 64 up to ``CAUSAL_ATTENTION_MAX_T``: where AVX-512 runs and oneDNN packs
    bf16 operands for its AMX micro-kernel (``at::native::cpublas::could_pack``). :func:`gptlab.layers.causal_attention`
    uses them."""
    return (
        q.device.type == "cpu"
        and q.dim() == k.dim() == 4
        and k.shape == v.shape
        and (q.size(0), *q.shape[2:]) == (k.size(0), *k.shape[2:])
        and q.size(1) % k.size(1) == 0
        and q.size(3) == 64
        and q.size(2) % 64 == 0
        and q.size(2) <= CAUSAL_ATTENTION_MAX_T
        and all(type(t) is torch.Tensor and t.dtype == torch.bfloat16 and t.stride(3) == 1 for t in (q, k, v))
        and has_causal_attention()
    )


@functools.cache
def has_causal_attention() -> bool:
    return has_avx512_kernels() and bool(torch.ops.gptlab.causal_attention_runs())


def transpose_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.t().contiguous().to(dtype)`` for a 2-D CPU tensor (fp32 or bf16, to fp32 or bf16): gptlab's kernel
    (``transpose_to``, 16 x 16 register tiles; 8-40 GB/s here against PyTorch's strided copy at ~2.5) where AVX-512
    runs, PyTorch elsewhere. The same values either way."""
    floats = (torch.float32, torch.bfloat16)
    if x.dtype in floats and dtype in floats and x.stride(-1) == 1 and x.device.type == "cpu" and has_avx512_kernels():
        return torch.ops.gptlab.transpose_to(x, dtype)
    return x.t().to(dtype).contiguous()


@functools.cache
def tuned_ops() -> Any:
    """:func:`load`'s ops with the block of the int8, int4 and fp32 loops for one activation row (a decode step of one
    sequence) set by :func:`measure_single_row_blocks`, and the cache these loops prefetch their weights into by
    :func:`measure_prefetch_l2`, once per process; None as :func:`load`."""
    ops = load()
    if ops is not None and isa() >= AVX512:
        products = probe_products(ops)
        ops.set_single_row_blocks(*measure_single_row_blocks(ops, products=products))
        ops.set_prefetch_l2(measure_prefetch_l2(ops, products=products))
    return ops


SINGLE_ROW_BLOCKS = ((1, 4), (1, 4), (1, 2, 4, 8))  # the weight rows a block may take: int8, int4, fp32 loops


def probe_products(ops: Any) -> dict[int, Callable[[], Any]]:
    """The probes' one-row products (int8, int4 g64, fp32: keys 0, 1, 2) over weight rows of 768 columns filling
    twice the L3 (at least 64, at most 256 MiB): a decode step streams all of a model's weights, so this is the cache
    its weights meet."""
    size = min(max(2 * l3_bytes(), 64 << 20), 256 << 20)
    n = size // 768
    codes = torch.ones(n, 768, dtype=torch.int8)  # written, so that every page is real memory
    packed = codes.view(torch.uint8).view(2 * n, 384)  # int4: 768 columns a row, as int8's
    ones16 = torch.ones(2 * n, 768 // 64, dtype=torch.float16)
    weights = torch.ones(n // 4, 768)  # fp32: the same bytes
    x, scales = torch.ones(1, 768), torch.ones(n)
    return {
        0: lambda: ops.int8_mm(x, codes, scales),
        1: lambda: ops.int4_mm(x, packed, ones16, ones16, 64),
        2: lambda: ops.f32_mm(x, weights, None),
    }


def measure_single_row_blocks(
    ops: Any, rounds: int = 3, products: dict[int, Callable[[], Any]] | None = None
) -> tuple[int, int, int]:
    """The fastest block of the 512-bit int8, int4 and fp32 loops for one activation row (weight rows: 4 or 1 for
    int8 and int4; 1, 2, 4 or 8 for fp32), timed on this machine (``kernels.cpp`` says why each wins where it does)
    on :func:`probe_products`, the blocks alternating, the best of ``rounds`` each: on the AMD EPYC Zen 4 of
    docs/benchmarks.md (32 MiB of L3) int8 takes one row and int4 four; on a Zen 5 fp32 takes one (1.2x the two it
    took before). About 0.1 s."""
    products = products or probe_products(ops)
    before = list(ops.single_row_blocks())
    chosen = list(before)
    try:
        for which, product in products.items():
            best = dict.fromkeys(SINGLE_ROW_BLOCKS[which], float("inf"))
            for _ in range(rounds):
                for rows in best:
                    chosen[which] = rows
                    ops.set_single_row_blocks(*chosen)
                    t0 = time.perf_counter()
                    product()
                    best[rows] = min(best[rows], time.perf_counter() - t0)
            chosen[which] = min(best, key=lambda rows: best[rows])
    finally:
        ops.set_single_row_blocks(*before)
    return chosen[0], chosen[1], chosen[2]


def measure_prefetch_l2(ops: Any, rounds: int = 3, products: dict[int, Callable[[], Any]] | None = None) -> bool:
    """Whether the 512-bit int8, int4 and fp32 loops run faster prefetching their weights into L2 (prefetcht1) than
    into L1 (prefetcht0), timed on the three :func:`probe_products` in turn, the two settings alternating, the best
    of ``rounds`` each (``kernels.cpp`` says why L2 can win: GPT-2's products on the AMD EPYC Zen 4 of
    docs/benchmarks.md, 1.3x fp32 and int4, 1.7x int8)."""
    products = products or probe_products(ops)
    before = bool(ops.prefetches_l2())
    best = {False: float("inf"), True: float("inf")}
    try:
        for _ in range(rounds):
            for l2 in best:
                ops.set_prefetch_l2(l2)
                t0 = time.perf_counter()
                for product in products.values():
                    product()
                best[l2] = min(best[l2], time.perf_counter() - t0)
    finally:
        ops.set_prefetch_l2(before)
    return min(best, key=lambda l2: best[l2])


def l3_bytes() -> int:
    """The size of the last-level (L3) cache CPU 0 sees, from sysfs; 32 MiB where it does not say."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                size = (index / "size").read_text().strip()
                return int(size.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(size[-1], 0)
        except (OSError, ValueError):
            continue
    return 32 << 20


@constant_when_compiled  # (load() is not traceable)
def have_kernels() -> bool:
    return load() is not None


def mode() -> str:
    value = os.environ.get("GPTLAB_KERNELS", "auto")
    if os.environ.get("GPTLAB_NO_KERNELS") == "1":  # the old switch, kept
        value = "off"
    if value not in MODES:
        raise GptlabError(f"GPTLAB_KERNELS={value!r} is not one of {'|'.join(MODES)}")
    return value


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def build_command(cxx: str, source: Path, out: Path, how: str) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
    flags += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    flags += [f"-DGPTLAB_MAX_ISA={MAX_ISA[how]}"] if how in MAX_ISA else []
    incs = [f"-I{p}" for p in include_paths()]
    libs = [f"-L{p}" for p in library_paths()] + ["-lc10", "-ltorch_cpu", "-ltorch"]
    return [cxx, *flags, *incs, str(source), "-o", str(out), *libs]


def library_path(cxx: str, how: str) -> Path:
    """Where the build of this source with these flags by this compiler, for this torch and Python, is cached."""
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    flags = " ".join(build_command(cxx, SOURCE, Path("out"), how)[1:])
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), flags, cxx, version, torch.__version__, sys.version]).encode()
    ).hexdigest()[:16]
    return cache_dir() / "kernels" / f"gptlab_kernels_{key}.so"


def _build(cxx: str, target: Path, how: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        done = subprocess.run(build_command(cxx, SOURCE, out, how), capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"{cxx} failed (exit {done.returncode}):\n{done.stderr.strip()[-4000:]}")
        os.replace(out, target)  # atomic: a reader sees no library or a whole one


class BuildError(GptlabError):
    """The kernels did not build or load."""


@functools.cache
def isa() -> int:
    """The widest loops the kernels take on this CPU and build (``kernels.cpp``'s ``cpu_isa``: 1 AVX2, 2 AVX-512,
    3 AVX-512 VNNI), 0 without them."""
    ops = load()
    return 0 if ops is None else int(ops.isa())


@functools.cache
def load() -> Any:
    """``torch.ops.gptlab`` (``int8_mm``, ``int4_mm``, ``f32_mm``, ``decode_attention``, ``softmax_xent_``,
    ``gelu_tanh`` / ``gelu_tanh_backward``, ``transpose_to``, ``isa``, ``set_single_row_blocks`` /
    ``single_row_blocks`` and ``set_prefetch_l2`` / ``prefetches_l2``: see :func:`tuned_ops`), built on first use,
    or None where it does not apply (module docstring)."""
    how = mode()
    if how == "off" or sys.platform != "linux":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):  # PyTorch's names for x86 with AVX2+
        return None
    try:
        cxx = compiler()
        if cxx is None:
            raise BuildError("no C++ compiler (install g++, or set CXX)")
        lib = library_path(cxx, how)
        if not lib.exists():
            _build(cxx, lib, how)
        torch.ops.load_library(str(lib))
    except (BuildError, OSError, RuntimeError) as e:
        if how == "required":
            raise BuildError(
                f"gptlab's CPU kernels (int8/int4, fp32 decode steps) are required (GPTLAB_KERNELS=required) but: {e}"
            ) from None
        print(
            f"gptlab: warning: gptlab's CPU kernels (int8/int4, fp32 decode steps) are unavailable, PyTorch's are used "
            f"instead: {e}",
            file=sys.stderr,
        )
        return None

    @torch.library.register_fake("gptlab::int8_mm")
    def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.size(0), w.size(0))

    @torch.library.register_fake("gptlab::f32_mm")
    def _f(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty(x.size(0), w.size(0))

    @torch.library.register_fake("gptlab::int4_mm")
    def _4(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g: int) -> torch.Tensor:
        return x.new_empty(x.size(0), w.size(0))

    @torch.library.register_fake("gptlab::decode_attention")
    def _a(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        return q.new_empty(q.shape)

    @torch.library.register_fake("gptlab::softmax_xent_")
    def _x(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, scale: torch.Tensor) -> torch.Tensor:
        return scale.new_empty(logits.size(1))

    @torch.library.register_fake("gptlab::gelu_tanh")
    def _g(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("gptlab::gelu_tanh_backward")
    def _gb(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("gptlab::causal_attention")
    def _ca(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, D = q.shape
        return q.new_empty(B, T, H, D), q.new_empty(B, H, T, dtype=torch.float32)

    @torch.library.register_fake("gptlab::causal_attention_backward")
    def _cab(
        g: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return out.new_empty(out.shape), out.new_empty(out.shape), out.new_empty(out.shape)

    @torch.library.register_fake("gptlab::transpose_to")
    def _t(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.new_empty(x.size(1), x.size(0), dtype=dtype)

    return torch.ops.gptlab
