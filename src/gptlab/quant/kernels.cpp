// gptlab's int8 and int4 weight-only matrix products for x86 CPUs with AVX2 (and AVX-512BW, chosen at run time).
// Built and loaded by gptlab/quant/kernels.py, which documents the scheme; tests/test_quant.py checks it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

// Activations as int16 fixed point, one scale per row: x ~ xs[m] * xq[m, k], xs = max|x_m| / 32767. The
// rounding error, at most xs / 2 per element, is 2^-16 of the row's largest value: 128x finer than an int8 code.
static void rows_to_int16(const float* x, int64_t M, int64_t K, int16_t* xq, float* xs) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * K;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(r[k]));
    xs[m] = amax > 0.f ? amax / 32767.f : 1.f;
    const float inv = 1.f / xs[m];
    for (int64_t k = 0; k < K; ++k) xq[m * K + k] = static_cast<int16_t>(std::lrintf(r[k] * inv));
  }
}

static inline float hsum(__m256 a) {
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  return _mm_cvtss_f32(s4);
}

static void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "gptlab kernel: x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "gptlab kernel: x must be float32");
  TORCH_CHECK(x.size(0) <= 16, "gptlab kernel: at most 16 rows");
}

// int8 x int16 dot products of one weight row with R activation rows (R <= 4, a compile-time constant, so the
// accumulators stay in registers), two accumulators per row over 32 columns at a time. Each int32 lane gains at
// most 2 * 127 * 32767 per instruction, so the lanes go to fp32 every 2048 columns, long before 2^31.
template <int R>
static inline void int8_dots(const int8_t* w, const int16_t* x, int64_t K, int64_t K32, float* out) {
  __m256 f[R];
  __m256i a[R], b[R];
  for (int r = 0; r < R; ++r) f[r] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < K32; k0 += 2048) {
    const int64_t k1 = std::min(K32, k0 + 2048);
    for (int r = 0; r < R; ++r) { a[r] = _mm256_setzero_si256(); b[r] = _mm256_setzero_si256(); }
    for (int64_t k = k0; k < k1; k += 32) {
      __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
      __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16)));
      for (int r = 0; r < R; ++r) {
        const int16_t* xr = x + r * K + k;
        a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr))));
        b[r] = _mm256_add_epi32(
            b[r], _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 16))));
      }
    }
    for (int r = 0; r < R; ++r) f[r] = _mm256_add_ps(f[r], _mm256_cvtepi32_ps(_mm256_add_epi32(a[r], b[r])));
  }
  for (int r = 0; r < R; ++r) {
    float sum = hsum(f[r]);
    for (int64_t j = K32; j < K; ++j) sum += static_cast<float>(x[r * K + j]) * static_cast<float>(w[j]);
    out[r] = sum;
  }
}

// The same with 512-bit registers (AVX-512BW: every CPU PyTorch calls AVX512 has it), 64 columns at a time, for
// half the instructions per weight; the flush interval stays 2048 columns (32 steps, 2 products per lane each).
template <int R>
__attribute__((target("avx512f,avx512bw"))) static void int8_dots512(const int8_t* w, const int16_t* x, int64_t K,
                                                                      float* out) {
  const int64_t K64 = K / 64 * 64;
  __m512 f[R];
  __m512i a[R], b[R];
  for (int r = 0; r < R; ++r) f[r] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K64; k0 += 2048) {
    const int64_t k1 = std::min(K64, k0 + 2048);
    for (int r = 0; r < R; ++r) { a[r] = _mm512_setzero_si512(); b[r] = _mm512_setzero_si512(); }
    for (int64_t k = k0; k < k1; k += 64) {
      __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)));
      __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 32)));
      for (int r = 0; r < R; ++r) {
        const int16_t* xr = x + r * K + k;
        a[r] = _mm512_add_epi32(a[r], _mm512_madd_epi16(w0, _mm512_loadu_si512(xr)));
        b[r] = _mm512_add_epi32(b[r], _mm512_madd_epi16(w1, _mm512_loadu_si512(xr + 32)));
      }
    }
    for (int r = 0; r < R; ++r) f[r] = _mm512_add_ps(f[r], _mm512_cvtepi32_ps(_mm512_add_epi32(a[r], b[r])));
  }
  for (int r = 0; r < R; ++r) {
    float sum = _mm512_reduce_add_ps(f[r]);
    for (int64_t j = K64; j < K; ++j) sum += static_cast<float>(x[r * K + j]) * static_cast<float>(w[j]);
    out[r] = sum;
  }
}

// out[m, n] = scales[n] * sum_k x[m, k] * w[n, k]; w int8 [N, K]. Codes widened to int16 (vpmovsxbw) and
// multiplied by the int16 activations in pairs (vpmaddwd), 16 per instruction.
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat,
              "int8_mm: w must be int8 [N, K], scales float32 [N]");
  const int64_t K = w.size(1), N = w.size(0);
  check_x(x, K);
  auto xc = x.contiguous(); auto wc = w.contiguous(); auto sc = scales.contiguous();
  const int64_t M = xc.size(0);
  auto out = at::empty({M, N}, xc.options());
  std::vector<int16_t> xq(M * K); std::vector<float> xs(M);
  rows_to_int16(xc.data_ptr<float>(), M, K, xq.data(), xs.data());
  const int8_t* wp = wc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int16_t* xqp = xq.data();
  const int64_t K32 = K / 32 * 32;
#ifdef GPTLAB_AVX2_ONLY
  static const bool wide = false;  // built with GPTLAB_KERNELS=avx2: the 256-bit loop on every CPU (tests, benchmarks)
#else
  static const bool wide = __builtin_cpu_supports("avx512bw");  // the 512-bit loop where the CPU has one
#endif
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    float d[4];
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* row = wp + n * K;
      for (int64_t m0 = 0; m0 < M; m0 += 4) {  // the row stays in L1 across the blocks of 4 activation rows
        const int64_t R = std::min<int64_t>(4, M - m0);
        const int16_t* xb = xqp + m0 * K;
        if (wide) {
          switch (R) {
            case 1: int8_dots512<1>(row, xb, K, d); break;
            case 2: int8_dots512<2>(row, xb, K, d); break;
            case 3: int8_dots512<3>(row, xb, K, d); break;
            default: int8_dots512<4>(row, xb, K, d);
          }
        } else {
          switch (R) {
            case 1: int8_dots<1>(row, xb, K, K32, d); break;
            case 2: int8_dots<2>(row, xb, K, K32, d); break;
            case 3: int8_dots<3>(row, xb, K, K32, d); break;
            default: int8_dots<4>(row, xb, K, K32, d);
          }
        }
        for (int64_t r = 0; r < R; ++r) op[(m0 + r) * N + n] = d[r] * xs[m0 + r] * sp[n];
      }
    }
  });
  return out;
}

// One int4 weight row against R activation rows (even and odd columns apart): per group, the int32 sums of
// q * x̂, scaled by the group's scale into fp32 lanes. A group's lanes gain at most 2 * 2 * 15 * 32767 per 16 bytes.
template <int R>
static inline void int4_dots(const uint8_t* w, const int16_t* xe, const int16_t* xo, int64_t H, int64_t G,
                             int64_t gb, const float* scale, float* out) {
  const __m256i low4 = _mm256_set1_epi16(15);
  __m256 f[R];
  for (int r = 0; r < R; ++r) f[r] = _mm256_setzero_ps();
  for (int64_t gi = 0; gi < G; ++gi) {
    __m256i a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm256_setzero_si256();
    for (int64_t j = gi * gb; j < (gi + 1) * gb; j += 16) {
      __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j)));
      __m256i hi = _mm256_srli_epi16(b, 4), lo = _mm256_and_si256(b, low4);
      for (int r = 0; r < R; ++r) {
        __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xe + r * H + j));
        __m256i o = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xo + r * H + j));
        a[r] = _mm256_add_epi32(a[r], _mm256_add_epi32(_mm256_madd_epi16(hi, e), _mm256_madd_epi16(lo, o)));
      }
    }
    const __m256 s = _mm256_set1_ps(scale[gi]);
    for (int r = 0; r < R; ++r) f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r]), s, f[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(f[r]);
}

// Groupwise int4, w ~ (q - 8) * scale + zero per group of g columns (gptlab.quant.quantize), packed [N, K / 2]
// with column 2j in the high nibble of byte j. sum_k x_k w_k = sum_groups (scale * sum x_k q_k + offset * sum x_k),
// offset = zero - 8 * scale (given). 16 bytes are widened to int16 (vpmovzxbw); a shift and a mask split them into
// the even and odd columns, each multiplied by the activations' even or odd columns (vpmaddwd).
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& offsets,
                   int64_t g) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte, "int4_mm: w must be uint8 [N, K / 2]");
  const int64_t K = w.size(1) * 2, N = w.size(0);
  TORCH_CHECK(g % 32 == 0 && K % g == 0, "int4_mm: the group size must be a multiple of 32 dividing K");
  const int64_t G = K / g;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && offsets.scalar_type() == at::kFloat &&
              scales.size(0) == N && scales.size(1) == G && offsets.size(0) == N && offsets.size(1) == G,
              "int4_mm: scales and offsets must be float32 [N, K / g]");
  check_x(x, K);
  auto xc = x.contiguous(); auto wc = w.contiguous(); auto sc = scales.contiguous(); auto oc = offsets.contiguous();
  const int64_t M = xc.size(0), H = K / 2;
  auto out = at::empty({M, N}, xc.options());
  std::vector<int16_t> xq(M * K), xe(M * H), xo(M * H); std::vector<float> xs(M), gsum(M * G, 0.f);
  const float* xp = xc.data_ptr<float>();
  rows_to_int16(xp, M, K, xq.data(), xs.data());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < H; ++j) { xe[m * H + j] = xq[m * K + 2 * j]; xo[m * H + j] = xq[m * K + 2 * j + 1]; }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) gsum[m * G + k / g] += xp[m * K + k];
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* opp = oc.data_ptr<float>();
  float* outp = out.data_ptr<float>();
  const int16_t* xep = xe.data();
  const int16_t* xop = xo.data();
  const int64_t gb = g / 2;  // bytes per group
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    float d[4];
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = wp + n * H;
      const float* sn = sp + n * G;
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t R = std::min<int64_t>(4, M - m0);
        const int16_t* e = xep + m0 * H;
        const int16_t* o = xop + m0 * H;
        switch (R) {
          case 1: int4_dots<1>(row, e, o, H, G, gb, sn, d); break;
          case 2: int4_dots<2>(row, e, o, H, G, gb, sn, d); break;
          case 3: int4_dots<3>(row, e, o, H, G, gb, sn, d); break;
          default: int4_dots<4>(row, e, o, H, G, gb, sn, d);
        }
        for (int64_t r = 0; r < R; ++r) {
          float bias = 0.f;
          for (int64_t gi = 0; gi < G; ++gi) bias += opp[n * G + gi] * gsum[(m0 + r) * G + gi];
          outp[(m0 + r) * N + n] = d[r] * xs[m0 + r] + bias;
        }
      }
    }
  });
  return out;
}

TORCH_LIBRARY(gptlab, m) {
  m.def("int8_mm(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor w, Tensor scales, Tensor offsets, int group_size) -> Tensor");
}
TORCH_LIBRARY_IMPL(gptlab, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
}
