"""An AVX2 kernel for weight-only int8 matrix products on CPUs where PyTorch's has only its scalar loop.

PyTorch's ``_weight_int8pack_mm`` has vectorized CPU paths for AVX-512 and NEON. On an AVX2-only CPU it runs a
scalar loop at about 1 GB/s, slower than fp32, and inductor's own int8 code is no faster (docs/benchmarks.md).
Batch-1 decoding is a matrix-vector product bound by reading the weights. The kernel below reads each int8 row
once per call, for up to 16 batch rows. It widens 32 codes at a time to fp32 (``vpmovsxbd``, ``vcvtdq2ps``) and
accumulates with FMA into four independent accumulators per batch row, then applies the row's scale; blocks of rows
are spread over PyTorch's intra-op threads. The activations stay fp32, as the weight-only scheme specifies; llama.cpp's
q8_0 path also rounds the activations to 8 bits and multiplies integers, which is cheaper per weight.

It is compiled once per machine with the system C++ compiler, against the installed torch, into
``$XDG_CACHE_HOME/gptlab/kernels``; the library is written under a temporary name and renamed, so a crash leaves no
half-written file. It registers ``torch.ops.gptlab.int8_mm`` with a fake (shape-only) implementation, so
``torch.compile`` calls it as an opaque kernel. :func:`int8_mm` is None when the CPU is not AVX2-only, when no
compiler is available, or when ``GPTLAB_NO_KERNELS=1``. :class:`gptlab.quant.quantize.QuantLinear` then uses
PyTorch's kernel, with the same results up to fp32 summation order (tested).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

// out[m, n] = scales[n] * sum_k x[m, k] * w[n, k]; x fp32 [M, K], w int8 [N, K], scales fp32 [N], all contiguous
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "int8_mm: shapes do not match");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat,
              "int8_mm: dtypes must be float32, int8, float32");
  auto xc = x.contiguous(); auto wc = w.contiguous(); auto sc = scales.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  auto out = at::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const int8_t* wp = wc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  TORCH_CHECK(M <= 16, "int8_mm: at most 16 rows");
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    __m256 acc[16][4];  // four independent accumulators per batch row: FMA latency, not a dependency chain
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* row = wp + n * K;
      for (int64_t m = 0; m < M; ++m)
        for (int j = 0; j < 4; ++j) acc[m][j] = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {  // 32 codes widened to fp32 once, then used by every batch row
        __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
        __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
        __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
        __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
        for (int64_t m = 0; m < M; ++m) {
          const float* xr = xp + m * K + k;
          acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[m][0]);
          acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[m][1]);
          acc[m][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), acc[m][2]);
          acc[m][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), acc[m][3]);
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        __m256 a = _mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3]));
        __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
        float sum = _mm_cvtss_f32(s4);
        const float* xr = xp + m * K;
        for (int64_t j = k; j < K; ++j) sum += xr[j] * static_cast<float>(row[j]);
        op[m * N + n] = sum * sp[n];
      }
    }
  });
  return out;
}

TORCH_LIBRARY(gptlab, m) { m.def("int8_mm(Tensor x, Tensor w, Tensor scales) -> Tensor"); }
TORCH_LIBRARY_IMPL(gptlab, CPU, m) { m.impl("int8_mm", &int8_mm); }
"""

MAX_ROWS = 16  # batch rows the kernel serves; longer inputs (prefill) dequantize and use the BLAS GEMM


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptlab" / "kernels"


def _build(target: Path) -> None:
    from torch.utils.cpp_extension import include_paths, library_paths

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise OSError("no C++ compiler")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "int8_mm.cpp"
        src.write_text(SOURCE)
        out = Path(tmp) / target.name
        flags = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
        flags += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
        incs = [f"-I{p}" for p in include_paths()]
        libs = [f"-L{p}" for p in library_paths()] + ["-lc10", "-ltorch_cpu", "-ltorch"]
        subprocess.run([compiler, *flags, *incs, str(src), "-o", str(out), *libs], check=True, capture_output=True)
        os.replace(out, target)  # atomic: a reader sees no library or a whole one


@functools.cache
def load() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``torch.ops.gptlab.int8_mm``, built on first use, or None where it does not apply (module docstring)."""
    if os.environ.get("GPTLAB_NO_KERNELS") == "1" or sys.platform != "linux":
        return None
    if torch.backends.cpu.get_cpu_capability() != "AVX2":
        return None
    key = hashlib.sha256((SOURCE + torch.__version__ + sys.version).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"gptlab_int8_{key}.so"
    try:
        if not lib.exists():
            _build(lib)
        torch.ops.load_library(str(lib))
    except (OSError, subprocess.CalledProcessError, RuntimeError):
        return None

    @torch.library.register_fake("gptlab::int8_mm")
    def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.size(0), w.size(0))

    return torch.ops.gptlab.int8_mm
