// gptlab's int8 and int4 weight-only matrix products for x86 CPUs with AVX2 (AVX-512BW and AVX-512 VNNI loops chosen
// at run time), and an fp32 product for decode steps (AVX-512). Built and loaded by gptlab/kernels.py, which
// documents the scheme; tests/test_quant.py checks it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cmath>
#include <optional>
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
// Defined twice by a macro: with AVX-512 VNNI, vpdpwssd multiplies the int16 pairs and adds them into the int32
// lanes in one instruction (Intel's intrinsics guide, _mm512_dpwssd_epi32) where vpmaddwd + vpaddd take two.
#define GPTLAB_INT8_DOTS512(NAME, TARGET, DOT)                                                                     \
  template <int R>                                                                                                 \
  __attribute__((target(TARGET))) static void NAME(const int8_t* w, const int16_t* x, int64_t K, float* out) {    \
    const int64_t K64 = K / 64 * 64;                                                                               \
    __m512 f[R];                                                                                                   \
    __m512i a[R], b[R];                                                                                            \
    for (int r = 0; r < R; ++r) f[r] = _mm512_setzero_ps();                                                        \
    for (int64_t k0 = 0; k0 < K64; k0 += 2048) {                                                                   \
      const int64_t k1 = std::min(K64, k0 + 2048);                                                                 \
      for (int r = 0; r < R; ++r) { a[r] = _mm512_setzero_si512(); b[r] = _mm512_setzero_si512(); }               \
      for (int64_t k = k0; k < k1; k += 64) {                                                                      \
        __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)));            \
        __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 32)));       \
        for (int r = 0; r < R; ++r) {                                                                              \
          const int16_t* xr = x + r * K + k;                                                                       \
          a[r] = DOT(a[r], w0, _mm512_loadu_si512(xr));                                                            \
          b[r] = DOT(b[r], w1, _mm512_loadu_si512(xr + 32));                                                       \
        }                                                                                                          \
      }                                                                                                            \
      for (int r = 0; r < R; ++r) f[r] = _mm512_add_ps(f[r], _mm512_cvtepi32_ps(_mm512_add_epi32(a[r], b[r])));   \
    }                                                                                                              \
    for (int r = 0; r < R; ++r) {                                                                                  \
      float sum = _mm512_reduce_add_ps(f[r]);                                                                      \
      for (int64_t j = K64; j < K; ++j) sum += static_cast<float>(x[r * K + j]) * static_cast<float>(w[j]);        \
      out[r] = sum;                                                                                                \
    }                                                                                                              \
  }

#define GPTLAB_MADD_ADD(acc, a, b) _mm512_add_epi32(acc, _mm512_madd_epi16(a, b))
GPTLAB_INT8_DOTS512(int8_dots512, "avx512f,avx512bw", GPTLAB_MADD_ADD)
GPTLAB_INT8_DOTS512(int8_dots512_vnni, "avx512f,avx512bw,avx512vnni", _mm512_dpwssd_epi32)

// Which loop a call takes: 256-bit AVX2, 512-bit AVX-512BW, or 512-bit with VNNI; the CPU's best, capped by the
// build (GPTLAB_MAX_ISA, set from GPTLAB_KERNELS=avx2|avx512 so that tests run every loop on the widest CPUs).
enum Isa { kAvx2 = 1, kAvx512 = 2, kVnni = 3 };
#ifndef GPTLAB_MAX_ISA
#define GPTLAB_MAX_ISA 3
#endif
static Isa cpu_isa() {
  static const Isa isa = [] {
    int best = __builtin_cpu_supports("avx512bw") ? (__builtin_cpu_supports("avx512vnni") ? kVnni : kAvx512) : kAvx2;
    return static_cast<Isa>(std::min(best, GPTLAB_MAX_ISA));
  }();
  return isa;
}

template <int R>
static inline void int8_dots_best(Isa isa, const int8_t* w, const int16_t* x, int64_t K, int64_t K32, float* out) {
  if (isa == kVnni) int8_dots512_vnni<R>(w, x, K, out);
  else if (isa == kAvx512) int8_dots512<R>(w, x, K, out);
  else int8_dots<R>(w, x, K, K32, out);
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
  const Isa isa = cpu_isa();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    float d[4];
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* row = wp + n * K;
      for (int64_t m0 = 0; m0 < M; m0 += 4) {  // the row stays in L1 across the blocks of 4 activation rows
        const int64_t R = std::min<int64_t>(4, M - m0);
        const int16_t* xb = xqp + m0 * K;
        switch (R) {
          case 1: int8_dots_best<1>(isa, row, xb, K, K32, d); break;
          case 2: int8_dots_best<2>(isa, row, xb, K, K32, d); break;
          case 3: int8_dots_best<3>(isa, row, xb, K, K32, d); break;
          default: int8_dots_best<4>(isa, row, xb, K, K32, d);
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

// The same with 512-bit registers, 64 columns (32 bytes) a step, plain (vpmaddwd + vpaddd) or with VNNI (vpdpwssd).
// Groups of 64 columns or more (gb a multiple of 32 bytes) sum whole steps and are scaled once; groups of 32 (gb 16)
// fill half a step each, so a step holds two groups, whose int32 lanes (the low and high 8) are scaled by a vector
// of the two scales; an odd last group is a half step, its upper bytes masked off. Other group sizes take the
// 256-bit loop.
#define GPTLAB_INT4_STEP(DOT, B, J, M)                                                                             \
  do {                                                                                                             \
    const __m512i b_ = (B), hi_ = _mm512_srli_epi16(b_, 4), lo_ = _mm512_and_si512(b_, low4);                      \
    for (int r = 0; r < R; ++r) {                                                                                  \
      const __m512i e = _mm512_maskz_loadu_epi16(M, xe + r * H + (J));                                            \
      const __m512i o = _mm512_maskz_loadu_epi16(M, xo + r * H + (J));                                            \
      a[r] = DOT(a[r], hi_, e); /* the even and the odd columns in chains of their own: DOT's latency hides */    \
      c[r] = DOT(c[r], lo_, o);                                                                                    \
    }                                                                                                              \
  } while (0)
#define GPTLAB_INT4_FLUSH(S)                                                                                       \
  do {                                                                                                             \
    const __m512 s_ = (S);                                                                                         \
    for (int r = 0; r < R; ++r) {                                                                                  \
      f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a[r], c[r])), s_, f[r]);                         \
      a[r] = c[r] = _mm512_setzero_si512();                                                                        \
    }                                                                                                              \
  } while (0)
#define GPTLAB_INT4_DOTS512(NAME, TARGET, DOT)                                                                     \
  template <int R>                                                                                                 \
  __attribute__((target(TARGET))) static void NAME(const uint8_t* w, const int16_t* xe, const int16_t* xo,         \
                                                   int64_t H, int64_t G, int64_t gb, const float* scale,           \
                                                   float* out) {                                                   \
    const __m512i low4 = _mm512_set1_epi16(15);                                                                    \
    __m512 f[R];                                                                                                   \
    __m512i a[R], c[R];                                                                                            \
    for (int r = 0; r < R; ++r) f[r] = _mm512_setzero_ps();                                                        \
    for (int r = 0; r < R; ++r) a[r] = c[r] = _mm512_setzero_si512();                                              \
    if (gb % 32 == 0) {                                                                                            \
      for (int64_t gi = 0; gi < G; ++gi) {                                                                         \
        for (int64_t j = gi * gb; j < (gi + 1) * gb; j += 32)                                                      \
          GPTLAB_INT4_STEP(DOT, _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j))),  \
                           j, ~0u);                                                                                \
        GPTLAB_INT4_FLUSH(_mm512_set1_ps(scale[gi]));                                                              \
      }                                                                                                            \
    } else { /* gb == 16 */                                                                                        \
      int64_t gi = 0;                                                                                              \
      for (; gi + 1 < G; gi += 2) {                                                                                \
        const __m256i two = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + gi * 16));                     \
        GPTLAB_INT4_STEP(DOT, _mm512_cvtepu8_epi16(two), gi * 16, ~0u);                                            \
        const __m512d lo = _mm512_castps_pd(_mm512_set1_ps(scale[gi]));                                           \
        const __m256d hi = _mm256_castps_pd(_mm256_set1_ps(scale[gi + 1]));                                       \
        GPTLAB_INT4_FLUSH(_mm512_castpd_ps(_mm512_insertf64x4(lo, hi, 1)));                                        \
      }                                                                                                            \
      if (gi < G) {                                                                                                \
        __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + gi * 16));                             \
        GPTLAB_INT4_STEP(DOT, _mm512_cvtepu8_epi16(_mm256_inserti128_si256(_mm256_setzero_si256(), half, 0)),     \
                         gi * 16, 0xFFFFu);                                                                        \
        GPTLAB_INT4_FLUSH(_mm512_set1_ps(scale[gi]));                                                              \
      }                                                                                                            \
    }                                                                                                              \
    for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(f[r]);                                               \
  }

GPTLAB_INT4_DOTS512(int4_dots512, "avx512f,avx512bw", GPTLAB_MADD_ADD)
GPTLAB_INT4_DOTS512(int4_dots512_vnni, "avx512f,avx512bw,avx512vnni", _mm512_dpwssd_epi32)

template <int R>
static inline void int4_dots_best(Isa isa, const uint8_t* w, const int16_t* xe, const int16_t* xo, int64_t H,
                                  int64_t G, int64_t gb, const float* scale, float* out) {
  const bool fits = gb % 32 == 0 || gb == 16;
  if (isa == kVnni && fits) int4_dots512_vnni<R>(w, xe, xo, H, G, gb, scale, out);
  else if (isa == kAvx512 && fits) int4_dots512<R>(w, xe, xo, H, G, gb, scale, out);
  else int4_dots<R>(w, xe, xo, H, G, gb, scale, out);
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
  const Isa isa = cpu_isa();
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
          case 1: int4_dots_best<1>(isa, row, e, o, H, G, gb, sn, d); break;
          case 2: int4_dots_best<2>(isa, row, e, o, H, G, gb, sn, d); break;
          case 3: int4_dots_best<3>(isa, row, e, o, H, G, gb, sn, d); break;
          default: int4_dots_best<4>(isa, row, e, o, H, G, gb, sn, d);
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

// fp32 products of a few rows (decode steps), out[m, n] = sum_k x[m, k] w[n, k] + bias[n], w [N, K] as nn.Linear
// keeps it: each weight row is read once for up to 8 activation rows (their accumulators in registers, the row in
// L1 across the blocks of 8), so a step reads the weights once, at memory speed. MKL's sgemm reads them at a third
// of that for 1 to 16 rows on the CPUs measured (docs/benchmarks.md). AVX-512 CPUs only; others get at::linear.
// Two weight rows (W = 2) share each load of an activation row: 2R FMAs per R + 2 loads, so the loop is bound by
// the FMA units, not by loads (one row alone: R FMAs per R + 1 loads).
template <int R, int W>
__attribute__((target("avx512f"))) static void f32_dots(const float* w, const float* x, int64_t K, float* out) {
  const int64_t K16 = K / 16 * 16;
  __m512 a[W][R];
  for (int v = 0; v < W; ++v)
    for (int r = 0; r < R; ++r) a[v][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K16; k += 16) {
    __m512 wv[W];
    for (int v = 0; v < W; ++v) {
      wv[v] = _mm512_loadu_ps(w + v * K + k);
      _mm_prefetch(reinterpret_cast<const char*>(w + (v + 2 * W) * K + k), _MM_HINT_T0);  // the rows after next
    }
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * K + k);
      for (int v = 0; v < W; ++v) a[v][r] = _mm512_fmadd_ps(wv[v], xv, a[v][r]);
    }
  }
  for (int v = 0; v < W; ++v)
    for (int r = 0; r < R; ++r) {
      float sum = _mm512_reduce_add_ps(a[v][r]);
      for (int64_t j = K16; j < K; ++j) sum += x[r * K + j] * w[v * K + j];
      out[v * 8 + r] = sum;
    }
}

template <int W>
static void f32_block(const float* row, const float* xb, int64_t K, int64_t R, float* d) {
  switch (R) {
    case 1: f32_dots<1, W>(row, xb, K, d); break;
    case 2: f32_dots<2, W>(row, xb, K, d); break;
    case 3: f32_dots<3, W>(row, xb, K, d); break;
    case 4: f32_dots<4, W>(row, xb, K, d); break;
    case 5: f32_dots<5, W>(row, xb, K, d); break;
    case 6: f32_dots<6, W>(row, xb, K, d); break;
    case 7: f32_dots<7, W>(row, xb, K, d); break;
    default: f32_dots<8, W>(row, xb, K, d);
  }
}

at::Tensor f32_mm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "f32_mm: w must be float32 [N, K]");
  const int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == at::kFloat, "f32_mm: x must be float32 [M, K]");
  if (cpu_isa() < kAvx512) return at::linear(x, w, bias);
  auto xc = x.contiguous(); auto wc = w.contiguous();
  const int64_t M = xc.size(0);
  auto out = at::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  at::Tensor bc;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) { bc = bias->contiguous().to(at::kFloat); bp = bc.data_ptr<float>(); }
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    float d[16];
    for (int64_t n = n0; n < n1; n += 2) {
      const int64_t W = std::min<int64_t>(2, n1 - n);
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const int64_t R = std::min<int64_t>(8, M - m0);
        if (W == 2) f32_block<2>(wp + n * K, xp + m0 * K, K, R, d);
        else f32_block<1>(wp + n * K, xp + m0 * K, K, R, d);
        for (int64_t v = 0; v < W; ++v)
          for (int64_t r = 0; r < R; ++r) op[(m0 + r) * N + n + v] = d[v * 8 + r] + (bp ? bp[n + v] : 0.f);
      }
    }
  });
  return out;
}

TORCH_LIBRARY(gptlab, m) {
  m.def("int8_mm(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor w, Tensor scales, Tensor offsets, int group_size) -> Tensor");
  m.def("f32_mm(Tensor x, Tensor w, Tensor? bias) -> Tensor");
}
TORCH_LIBRARY_IMPL(gptlab, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
  m.impl("f32_mm", &f32_mm);
}
