// gptlab's int8 and int4 weight-only matrix products for x86 CPUs with AVX2 (AVX-512BW and AVX-512 VNNI loops chosen
// at run time), an fp32 product for decode steps (AVX-512), a decode step's attention (AVX2), and for training the
// softmax of the fused head-and-loss (AVX2) and GELU's tanh form (AVX-512). Built and loaded
// by gptlab/kernels.py, which documents the scheme; tests/test_quant.py checks it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

// max |p[k]| over n values, 8 lanes at a time (AVX2, which every CPU the kernels run on has), |x| by clearing the
// sign bit
static float absmax(const float* p, int64_t n) {
  const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const int64_t n8 = n / 8 * 8;
  __m256 vmax = _mm256_setzero_ps();
  for (int64_t k = 0; k < n8; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(p + k), nosign));
  float lanes[8];
  _mm256_storeu_ps(lanes, vmax);
  float amax = 0.f;
  for (float v : lanes) amax = std::max(amax, v);
  for (int64_t k = n8; k < n; ++k) amax = std::max(amax, std::fabs(p[k]));
  return amax;
}

// Activations as int16 fixed point, one scale per row: x ~ xs[m] * xq[m, k], xs = max|x_m| / 32767. The
// rounding error, at most xs / 2 per element, is 2^-16 of the row's largest value: 128x finer than an int8 code.
// The rounding of vcvtps2dq is to nearest even, as lrintf's in the default rounding mode, so the codes are those of
// the scalar loop.
static void rows_to_int16(const float* x, int64_t M, int64_t K, int16_t* xq, float* xs) {
  const int64_t K8 = K / 8 * 8;
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * K;
    const float amax = absmax(r, K);
    xs[m] = amax > 0.f ? amax / 32767.f : 1.f;
    const float inv = 1.f / xs[m];
    const __m256 vinv = _mm256_set1_ps(inv);
    int16_t* q = xq + m * K;
    for (int64_t k = 0; k < K8; k += 8) {
      const __m256i i32 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(r + k), vinv));
      const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), i16);
    }
    for (int64_t k = K8; k < K; ++k) q[k] = static_cast<int16_t>(std::lrintf(r[k] * inv));
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
  TORCH_CHECK(x.size(0) <= 64, "gptlab kernel: at most 64 rows");
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

// Where the 512-bit int8, int4 and fp32 loops prefetch their weights: into L2 (prefetcht1) or L1 (prefetcht0),
// measured per process (kernels.py, set_prefetch_l2). A core keeps only so many misses to L1 in flight (its fill
// buffers), more to L2, and a stream from memory needs bandwidth x latency bytes in flight: on an AMD EPYC Zen 4 VM,
// GPT-2's products for one token on 2 threads took 5.2 ms (int8), 2.4 ms (int4 g64) and 13.0 ms (fp32)
// prefetching into L1, 3.1, 1.9 and 10.3 ms into L2. How far ahead the int8 and int4 loops prefetch, in bytes along
// the thread's rows (contiguous), at least one block: on an AMD EPYC Zen 5 (2 threads reading 77 GB/s), GPT-2's
// int4 products took 2.3 ms prefetching the next block of 4 rows (1.5 KiB ahead) into L1, 1.9 ms at 4 KiB, 1.6 ms
// at 8 or 16 KiB; on the Zen 4, 16 KiB was the best into L2 (of 8, 16, 32 and 64). The fp32 loop prefetches the
// rows after next (Zen 4: as fast as 8 blocks ahead into L2).
static std::atomic<bool> prefetch_l2{true};
static void set_prefetch_l2(bool l2) { prefetch_l2 = l2; }
static bool prefetches_l2() { return prefetch_l2; }
static inline void prefetch_weights(const void* p, bool l2) {
  if (l2) _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
  else _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
}
static inline int64_t prefetch_bytes(bool l2) { return l2 ? 16384 : 8192; }

// The sum of a vector's 16 lanes in one fixed order, written out (the one GCC's _mm512_reduce_add_ps uses; other
// compilers may sum in other orders): the 512-bit int8, int4 and fp32 loops all sum this way, so a row's result
// does not depend on which block or loop computed it. hsum512x16 sums 16 accumulators at once in the same order, two
// at a time per shuffle (30 shuffles and 15 adds where 16 hsum512 take 64 and 64).
__attribute__((target("avx512f"))) static inline float hsum512(__m512 a) {
  const __m256 t = _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));  // lanes j + j+8, then +4
  const __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q));                                  // [q0 + q2, q1 + q3]
  return _mm_cvtss_f32(_mm_add_ss(p, _mm_movehdup_ps(p)));                              // (q0 + q2) + (q1 + q3)
}

__attribute__((target("avx512f"))) static inline __m512 hsum512x16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // lanes j + j+8 of a[2i] | of a[2i+1]
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // then + 4: 128-bit lane L holds a[4i + L]'s four partial sums
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // [q0 + q2, q1 + q3] of a[8i + L] and of a[8i + 4 + L], interleaved
    d[i] = _mm512_add_ps(_mm512_unpacklo_ps(c[2 * i], c[2 * i + 1]), _mm512_unpackhi_ps(c[2 * i], c[2 * i + 1]));
  const __m512 e = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(d[0]), _mm512_castps_pd(d[1]))),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(d[0]), _mm512_castps_pd(d[1]))));
  // lane 4L + t holds the sum of a[4t + L]: a 4 x 4 transpose puts a[i]'s in lane i
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, e);
}

// hsum512 of a[0..3] into out[0..3]: the same order, the four trees sharing each shuffle (9 shuffles and 5 adds where
// four hsum512 take 16 and 16)
__attribute__((target("avx512f"))) static inline void hsum512x4(const __m512* a, float* out) {
  const __m512 b0 = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x44), _mm512_shuffle_f32x4(a[0], a[1], 0xEE));
  const __m512 b1 = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], 0x44), _mm512_shuffle_f32x4(a[2], a[3], 0xEE));
  // then + 4: 128-bit lane L holds a[L]'s four partial sums
  __m512 c = _mm512_add_ps(_mm512_shuffle_f32x4(b0, b1, 0x88), _mm512_shuffle_f32x4(b0, b1, 0xDD));
  c = _mm512_add_ps(c, _mm512_shuffle_ps(c, c, _MM_SHUFFLE(1, 0, 3, 2)));  // [q0 + q2, q1 + q3]
  c = _mm512_add_ps(c, _mm512_shuffle_ps(c, c, _MM_SHUFFLE(2, 3, 0, 1)));  // (q0 + q2) + (q1 + q3)
  const __m512i first = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(first, c)));
}

// out[i] = hsum512(a[i]) for i < n, four at a time
__attribute__((target("avx512f"))) static inline void hsum512n(const __m512* a, int n, float* out) {
  int i = 0;
  for (; i + 4 <= n; i += 4) hsum512x4(a + i, out + i);
  for (; i < n; ++i) out[i] = hsum512(a[i]);
}

// The same with 512-bit registers (AVX-512BW: every CPU PyTorch calls AVX512 has it), 64 columns at a time, for
// half the instructions per weight, and W weight rows at a time sharing each activation load (R x 2 loads of
// activations per step for all W rows; one row alone is bound by its loads, measured); the weights prefetch_bytes
// ahead, or the next block's rows where they are longer, are prefetched. One int32 chain per (weight row,
// activation row), two (the even and odd 32 columns of a step) for blocks of up to 4 pairs, where one chain of
// dependent products bounds the loop (1.05x for GPT-2 at one row): each gains at most 4 * 127 * 32767 per step, so
// the lanes go to fp32 every 2048 columns (32 steps), long before 2^31. Integer sums are exact in any order and the
// fp32 flushes follow the same 2048 columns whatever W and R are, so a row's result does not depend on the block.
// A call takes `rows` weight rows, W at a time (the tail one at a time): for one activation row, a thread's whole
// share (int8_rows); a call per block of 4 rows, each setting up anew, and their 4 reductions apart made one core's
// products of a 768-column matrix from the cache 1.5x slower on an AMD EPYC Zen 4 (38 against 57 GB/s).
// Defined twice by a macro: with AVX-512 VNNI, vpdpwssd multiplies the int16 pairs and adds them into the int32
// lanes in one instruction (Intel's intrinsics guide, _mm512_dpwssd_epi32) where vpmaddwd + vpaddd take two.

#define GPTLAB_INT8_DOTS512(NAME, TARGET, DOT)                                                                     \
  template <int R, int W>                                                                                          \
  __attribute__((target(TARGET))) static void NAME(const int8_t* w, const int16_t* x, int64_t K, int64_t rows,     \
                                                   float* out) {                                                   \
    const bool l2 = prefetch_l2.load(std::memory_order_relaxed);                                                   \
    const int64_t K64 = K / 64 * 64, pd = std::max<int64_t>(prefetch_bytes(l2), W * K);                            \
    constexpr bool kSplit = W * R <= 4; /* two chains per pair: the odd 32 columns in b */                         \
    for (int64_t n = 0; n + W <= rows; n += W, w += W * K, out += W * R) {                                         \
      __m512 f[W * R];                                                                                             \
      __m512i a[W * R], b[kSplit ? W * R : 1];                                                                     \
      for (int i = 0; i < W * R; ++i) f[i] = _mm512_setzero_ps();                                                  \
      for (int64_t k0 = 0; k0 < K64; k0 += 2048) {                                                                 \
        const int64_t k1 = std::min(K64, k0 + 2048);                                                               \
        for (int i = 0; i < W * R; ++i) a[i] = _mm512_setzero_si512();                                             \
        if constexpr (kSplit)                                                                                      \
          for (int i = 0; i < W * R; ++i) b[i] = _mm512_setzero_si512();                                           \
        for (int64_t k = k0; k < k1; k += 64) {                                                                    \
          __m512i x0[R], x1[R];                                                                                    \
          for (int r = 0; r < R; ++r) {                                                                            \
            x0[r] = _mm512_loadu_si512(x + r * K + k);                                                             \
            x1[r] = _mm512_loadu_si512(x + r * K + k + 32);                                                        \
            asm("" : "+v"(x0[r]), "+v"(x1[r])); /* loaded once for the W rows, not folded into each product */     \
          }                                                                                                        \
          for (int v = 0; v < W; ++v) {                                                                            \
            prefetch_weights(w + v * K + k + pd, l2);                                                              \
            const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + v * K + k))); \
            const __m512i w1 =                                                                                     \
                _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + v * K + k + 32)));    \
            for (int r = 0; r < R; ++r) {                                                                          \
              a[v * R + r] = DOT(a[v * R + r], w0, x0[r]);                                                         \
              if constexpr (kSplit) b[v * R + r] = DOT(b[v * R + r], w1, x1[r]);                                   \
              else a[v * R + r] = DOT(a[v * R + r], w1, x1[r]);                                                    \
            }                                                                                                      \
          }                                                                                                        \
        }                                                                                                          \
        for (int i = 0; i < W * R; ++i) {                                                                          \
          if constexpr (kSplit) a[i] = _mm512_add_epi32(a[i], b[i]);                                               \
          f[i] = _mm512_add_ps(f[i], _mm512_cvtepi32_ps(a[i]));                                                    \
        }                                                                                                          \
      }                                                                                                            \
      hsum512n(f, W * R, out);                                                                                     \
      for (int v = 0; v < W; ++v)                                                                                  \
        for (int r = 0; r < R; ++r)                                                                                \
          for (int64_t j = K64; j < K; ++j)                                                                        \
            out[v * R + r] += static_cast<float>(x[r * K + j]) * static_cast<float>(w[v * K + j]);                 \
    }                                                                                                              \
    if constexpr (W > 1)                                                                                           \
      if (rows % W) NAME<R, 1>(w, x, K, rows % W, out);                                                            \
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

// A block's loops have compile-time shapes (R activation rows x W weight rows: the accumulators stay in registers);
// a block at the edge of the matrices has fewer, ws <= W and rows <= R. block<R, W>(ws, rows, f) calls
// f(Rows<r>, Rows<w>) with r = rows and w = ws, as compile-time constants.
template <int N>
using Rows = std::integral_constant<int, N>;

template <int R, int W, class F>
static void block(int64_t ws, int64_t rows, F&& f) {
  if constexpr (W > 1) {
    if (ws < W) return block<R, W - 1>(ws, rows, f);
  }
  if constexpr (R > 1) {
    if (rows < R) return block<R - 1, W>(ws, rows, f);
  }
  f(Rows<R>{}, Rows<W>{});
}

// Weight rows per block of the 512-bit int8 and int4 loops for one activation row (a decode step of one sequence):
// 4, sharing each activation load, the fastest where the weights come from the cache (compute-bound; 1.8x one row
// for a 6 MB int8 matrix on an AMD EPYC Zen 4), or 1, reading the weights in address order, the fastest where they
// come from memory (2x four rows there for 50 MB of 768-byte rows: four rows' interleaved loads fetch at half the
// speed). A decode step streams all of a model's weights, so which applies depends on the CPU's caches and on the
// loop (int4's does more work per byte: four rows were 1.1x one row there on the same EPYC); kernels.py measures
// both for each loop once per process and sets them (set_single_row_blocks). Each (weight row, activation row)
// pair has its own accumulators whatever the block, so the choice changes no result.
// The fp32 loop's block for one activation row is measured the same way, 1, 2, 4 or 8 weight rows (f32_mm).
static std::atomic<int64_t> int8_single_row_block{4}, int4_single_row_block{4}, f32_single_row_block{2};
static void set_single_row_blocks(int64_t int8_rows, int64_t int4_rows, int64_t f32_rows) {
  TORCH_CHECK((int8_rows == 1 || int8_rows == 4) && (int4_rows == 1 || int4_rows == 4) &&
              (f32_rows == 1 || f32_rows == 2 || f32_rows == 4 || f32_rows == 8),
              "set_single_row_blocks: 1 or 4 weight rows (int8, int4), 1, 2, 4 or 8 (fp32)");
  int8_single_row_block = int8_rows;
  int4_single_row_block = int4_rows;
  f32_single_row_block = f32_rows;
}
static std::vector<int64_t> single_row_blocks() {
  return {int8_single_row_block, int4_single_row_block, f32_single_row_block};
}

// The block shapes of the int8 and int4 loops: bw weight rows (the loop's single-row block for one activation row,
// for more 2 in int8's 512-bit loop and 1 elsewhere) by 1 or 4 activation rows.
template <class F>
static void quant_block(int64_t bw, int64_t ws, int64_t rows, F&& f) {
  if (bw == 4) block<1, 4>(ws, rows, f);
  else if (bw == 2) block<4, 2>(ws, rows, f);
  else block<4, 1>(ws, rows, f);
}

// One int8 block: W weight rows against R activation rows, out[v * R + r]. The 256-bit loop takes one weight row at
// a time.
template <int R, int W>
static void int8_block(Isa isa, const int8_t* w, const int16_t* x, int64_t K, int64_t K32, float* out) {
  if (isa == kVnni) int8_dots512_vnni<R, W>(w, x, K, W, out);
  else if (isa == kAvx512) int8_dots512<R, W>(w, x, K, W, out);
  else if constexpr (W == 1) int8_dots<R>(w, x, K, K32, out);
}

// One activation row against weight rows [0, rows) (a thread's share), bw at a time, with the 512-bit loops.
static void int8_rows(Isa isa, int64_t bw, const int8_t* w, const int16_t* x, int64_t K, int64_t rows, float* out) {
  if (bw == 4 && isa == kVnni) int8_dots512_vnni<1, 4>(w, x, K, rows, out);
  else if (bw == 4) int8_dots512<1, 4>(w, x, K, rows, out);
  else if (isa == kVnni) int8_dots512_vnni<1, 1>(w, x, K, rows, out);
  else int8_dots512<1, 1>(w, x, K, rows, out);
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
  // weight rows per block: int8_single_row_block for one activation row (a decode step of one sequence), 2 for more;
  // 1 in 256 bits
  const int64_t BW = isa == kAvx2 ? 1 : (M == 1 ? int8_single_row_block.load() : 2);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (isa != kAvx2 && M == 1) {  // a thread's rows in one call (as int4_rows)
      int8_rows(isa, BW, wp + n0 * K, xqp, K, n1 - n0, op + n0);
      for (int64_t n = n0; n < n1; ++n) op[n] = op[n] * xs[0] * sp[n];
      return;
    }
    float d[16];
    for (int64_t n = n0; n < n1; n += BW) {
      const int64_t ws = std::min(BW, n1 - n);
      for (int64_t m0 = 0; m0 < M; m0 += 4) {  // the rows stay in L1 across the blocks of 4 activation rows
        const int64_t R = std::min<int64_t>(4, M - m0);
        quant_block(BW, ws, R, [&](auto r, auto v) { int8_block<r, v>(isa, wp + n * K, xqp + m0 * K, K, K32, d); });
        for (int64_t v = 0; v < ws; ++v)
          for (int64_t r = 0; r < R; ++r) op[(m0 + r) * N + n + v] = d[v * R + r] * xs[m0 + r] * sp[n + v];
      }
    }
  });
  return out;
}

// Activations of the int4 products as int8 codes per group of g columns (llama.cpp's q8_0 rounds its q4_0 products'
// activations the same way, per block of 32): x ~ xs[m, gi] * xq, xs = max|x over the group| / 127, the rounding of
// vcvtps2dq (to nearest even). Each row's codes are laid out per 128 columns as the 64 even then the 64 odd columns'
// (the order in which a 64-byte step of packed weights yields its high and low nibbles), rows KP = K rounded up to
// 128 bytes apart (the caller zeroes the padding); or, transposed, for int4_dots512t: per block of 16 groups, D = g /
// 8 pairs of 64-byte vectors whose int32 lane L holds 4 even (then 4 odd) columns' codes of the block's group L, the
// columns of bytes 4s..4s+3 of that group's weights in vector pair s; rows KP = G rounded up to 16 groups apart. A
// row's codes and scales depend on that row alone. Also each group's sum of x itself (8 lanes over its g columns),
// laid out [M, G rounded up to 8], for the offsets' share.
// G groups rounded up to 8: the row length of the group sums (groups_to_int8, int4_dots, int4_dots512)
static inline int64_t groups_padded(int64_t G) { return (G + 7) / 8 * 8; }

static void groups_to_int8(const float* x, int64_t M, int64_t K, int64_t g, int64_t KP, int8_t* xq, float* xs,
                           float* gsum, bool transposed) {
  const int64_t G = K / g;
  // within each 128-bit lane, the 8 even bytes then the 8 odd ones
  const __m256i evens_first = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                               0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * K;
    int8_t* out = xq + m * KP;
    for (int64_t gi = 0; gi < G; ++gi) {  // g is a multiple of 32: whole vectors
      const float* p = r + gi * g;
      __m256 sum = _mm256_loadu_ps(p);
      for (int64_t k = 8; k < g; k += 8) sum = _mm256_add_ps(sum, _mm256_loadu_ps(p + k));
      gsum[m * groups_padded(G) + gi] = hsum(sum);
      const float amax = absmax(p, g);
      const float s = amax > 0.f ? amax / 127.f : 1.f;
      xs[m * G + gi] = s;
      const __m256 vinv = _mm256_set1_ps(1.f / s);
      for (int64_t k = 0; k < g; k += 32) {
        __m256i q[4];
        for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + k + 8 * i), vinv));
        // the packs work within 128-bit lanes: the permute restores column order; then the 16 even columns'
        // codes in the low half, the 16 odd ones' in the high half
        const __m256i b = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])),
            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        const __m256i eo = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(b, evens_first), 0xD8);
        if (transposed) {  // int32 lane gi % 16 of block gi / 16's registers k / 8 .. k / 8 + 3 (int4_dots512t)
          alignas(32) int32_t d[8];
          _mm256_store_si256(reinterpret_cast<__m256i*>(d), eo);
          int8_t* c = out + gi / 16 * 16 * g + k / 8 * 128 + gi % 16 * 4;
          for (int i = 0; i < 4; ++i) {
            std::memcpy(c + 128 * i, d + i, 4);
            std::memcpy(c + 128 * i + 64, d + 4 + i, 4);
          }
          continue;
        }
        int8_t* c = out + (gi * g + k) / 128 * 128 + (gi * g + k) % 128 / 2;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(c), _mm256_castsi256_si128(eo));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(c + 64), _mm256_extracti128_si256(eo, 1));
      }
    }
  }
}

// n <= 8 fp16 values at p, the lanes past them zero, with no read past p + n
static inline __m128i load_halves(const uint16_t* p, int64_t n) {
  if (n == 8) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m128i v = n >= 4 ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)) : _mm_setzero_si128();
  switch (n) {
    case 7: v = _mm_insert_epi16(v, p[6], 6); [[fallthrough]];
    case 6: v = _mm_insert_epi16(v, p[5], 5); [[fallthrough]];
    case 5: v = _mm_insert_epi16(v, p[4], 4); break;
    case 3: v = _mm_insert_epi16(v, p[2], 2); [[fallthrough]];
    case 2: v = _mm_insert_epi16(v, p[1], 1); [[fallthrough]];
    case 1: v = _mm_insert_epi16(v, p[0], 0); break;
  }
  return v;
}

// One int4 weight row against R activation rows (their int8 codes KP apart): per 16 bytes of weights, the high and
// low nibbles as one vector of 32 unsigned bytes against the 16 even and 16 odd columns' codes, vpmaddubsw (pairs
// summed to int16: at most 2 * 15 * 127, no saturation) and vpmaddwd by ones to int32; per group, the int32 sums
// scaled by the group's weight scale times the row's activation scale into fp32 lanes; per 8 groups, their offsets
// (zero - 8 scale, computed in fp32 from the fp16 scale and zero as dequantize_int4 computes them) times the
// activation rows' group sums (gsum, rows GP apart, zero past G) into the same lanes.
template <int R>
static inline void int4_dots(const uint8_t* w, const int8_t* x, int64_t KP, int64_t G, int64_t gb,
                             const uint16_t* scale, const uint16_t* zero, const float* xs, const float* gsum,
                             int64_t GP, float* out) {
  const __m128i low4 = _mm_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 f[R];
  for (int r = 0; r < R; ++r) f[r] = _mm256_setzero_ps();
  for (int64_t gi = 0; gi < G; ++gi) {
    if (gi % 8 == 0) {
      const int64_t n = std::min<int64_t>(8, G - gi);
      const __m256 o = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), _mm256_cvtph_ps(load_halves(scale + gi, n)),
                                        _mm256_cvtph_ps(load_halves(zero + gi, n)));
      for (int r = 0; r < R; ++r) f[r] = _mm256_fmadd_ps(o, _mm256_loadu_ps(gsum + r * GP + gi), f[r]);
    }
    __m256i a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm256_setzero_si256();
    for (int64_t j = gi * gb; j < (gi + 1) * gb; j += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j));
      const __m256i q = _mm256_set_m128i(_mm_and_si128(b, low4), _mm_and_si128(_mm_srli_epi16(b, 4), low4));
      const int64_t c = j / 64 * 128 + j % 64;  // this step's even columns in the row's codes; its odd 64 later
      for (int r = 0; r < R; ++r) {
        const int8_t* xr = x + r * KP + c;
        const __m256i xv = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(xr + 64),
                                               reinterpret_cast<const __m128i*>(xr));
        a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones));
      }
    }
    const float sw = _cvtsh_ss(scale[gi]);
    for (int r = 0; r < R; ++r) f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r]), _mm256_set1_ps(sw * xs[r * G + gi]), f[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(f[r]);
}

// Per 16 groups g0.. of W weight rows (their scales G apart) and R activation rows (the lanes past G zero): each
// group's offset (zero - 8 scale, in fp32 from the fp16 scale and zero as dequantize_int4 computes it) times the
// activation row's group sum (rows GP apart) into f[v * R + r], the fp32 lanes of the 512-bit int4 loops below, and
// the weight scales in fp32, sw[v]; int4_scales also makes sc[v * R + r], each group's weight scale x activation
// scale.
template <int R, int W>
__attribute__((target("avx512f,avx512bw"), always_inline)) static inline void int4_offsets(
    const uint16_t* scale, const uint16_t* zero, int64_t G, int64_t g0, __mmask16 m, const float* gsum, int64_t GP,
    __m512* sw, __m512* f) {
  for (int v = 0; v < W; ++v) {
    sw[v] = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_maskz_loadu_epi16(m, scale + v * G + g0)));
    const __m512 zw = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_maskz_loadu_epi16(m, zero + v * G + g0)));
    const __m512 off = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), sw[v], zw);
    for (int r = 0; r < R; ++r)
      f[v * R + r] = _mm512_fmadd_ps(off, _mm512_maskz_loadu_ps(m, gsum + r * GP + g0), f[v * R + r]);
  }
}
template <int R, int W>
__attribute__((target("avx512f,avx512bw"), always_inline)) static inline void int4_scales(
    const uint16_t* scale, const uint16_t* zero, int64_t G, int64_t g0, __mmask16 m, const float* xs,
    const float* gsum, int64_t GP, __m512* sc, __m512* f) {
  __m512 sw[W];
  int4_offsets<R, W>(scale, zero, G, g0, m, gsum, GP, sw, f);
  for (int v = 0; v < W; ++v)
    for (int r = 0; r < R; ++r) sc[v * R + r] = _mm512_mul_ps(sw[v], _mm512_maskz_loadu_ps(m, xs + r * G + g0));
}

// int4_dots with 512-bit registers, 64 bytes (128 columns) a step, for groups of a multiple of 128 columns (whole
// steps a group; smaller groups take int4_dots512t and int4_dots512r below): the high and low nibbles of the step's
// bytes as two vectors of 64 unsigned bytes, against the 64 even and the 64 odd columns' codes, in one instruction
// each with VNNI (vpdpbusd, Intel's intrinsics guide _mm512_dpbusd_epi32: 64 products where the int16 activations of
// gptlab before took two vpdpwssd for 32 each), else vpmaddubsw + vpmaddwd + vpaddd; W weight rows at a time sharing
// each activation load, the weights ahead prefetched as in int8's loop. A group's steps sum in int32, then go to
// fp32 scaled by the group's weight scale x activation scale (a permute of the 16 groups' products broadcasts it).
// Per 16 groups, their offsets times the activation rows' group sums go into the same fp32 lanes (as in int4_dots).
// One int32 chain per (weight row, activation row) and group: exact in any order, so a row's result does not
// depend on the block.
#define GPTLAB_INT4_STEP(DOT, J)                                                                                   \
  do {                                                                                                             \
    __m512i xe_[R], xo_[R];                                                                                        \
    for (int r = 0; r < R; ++r) {                                                                                  \
      xe_[r] = _mm512_loadu_si512(x + r * KP + 2 * (J));                                                           \
      xo_[r] = _mm512_loadu_si512(x + r * KP + 2 * (J) + 64);                                                      \
      asm("" : "+v"(xe_[r]), "+v"(xo_[r])); /* loaded once for the W rows */                                       \
    }                                                                                                              \
    for (int v = 0; v < W; ++v) {                                                                                  \
      prefetch_weights(w + v * H + (J) + pd, l2);                                                                  \
      const __m512i b_ = _mm512_loadu_si512(w + v * H + (J));                                                      \
      const __m512i hi_ = _mm512_and_si512(_mm512_srli_epi16(b_, 4), low4), lo_ = _mm512_and_si512(b_, low4);      \
      for (int r = 0; r < R; ++r) a[v * R + r] = DOT(DOT(a[v * R + r], hi_, xe_[r]), lo_, xo_[r]);                 \
    }                                                                                                              \
  } while (0)
/* the int32 sums to fp32, scaled by entry GIDX of the (weight row, activation row) pair's 16 scales */
#define GPTLAB_INT4_FLUSH(GIDX)                                                                                    \
  do {                                                                                                             \
    for (int i = 0; i < W * R; ++i) {                                                                              \
      f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[i]), _mm512_permutexvar_ps((GIDX), sc[i]), f[i]);                \
      a[i] = _mm512_setzero_si512();                                                                               \
    }                                                                                                              \
  } while (0)
#define GPTLAB_INT4_DOTS512(NAME, TARGET, DOT)                                                                     \
  template <int R, int W>                                                                                          \
  __attribute__((target(TARGET))) static void NAME(const uint8_t* w, const int8_t* x, int64_t KP, int64_t H,       \
                                                   int64_t G, int64_t gb, const uint16_t* scale,                   \
                                                   const uint16_t* zero, const float* xs, const float* gsum,       \
                                                   int64_t GP, float* out) {                                       \
    const __m512i low4 = _mm512_set1_epi8(15);                                                                     \
    const bool l2 = prefetch_l2.load(std::memory_order_relaxed);                                                   \
    const int64_t pd = std::max<int64_t>(prefetch_bytes(l2), W * H);                                               \
    __m512 f[W * R], sc[W * R]; /* sc: 16 groups' weight scale x activation scale, per (v, r) */                   \
    __m512i a[W * R];                                                                                              \
    for (int i = 0; i < W * R; ++i) f[i] = _mm512_setzero_ps();                                                    \
    for (int i = 0; i < W * R; ++i) a[i] = _mm512_setzero_si512();                                                 \
    for (int64_t g0 = 0; g0 < G; g0 += 16) {                                                                       \
      const int64_t g1 = std::min<int64_t>(G, g0 + 16);                                                            \
      const __mmask16 m = static_cast<__mmask16>((1u << (g1 - g0)) - 1);                                          \
      int4_scales<R, W>(scale, zero, G, g0, m, xs, gsum, GP, sc, f);                                              \
      for (int64_t gi = g0; gi < g1; ++gi) { /* whole steps a group */                                             \
        for (int64_t j = gi * gb; j < (gi + 1) * gb; j += 64) GPTLAB_INT4_STEP(DOT, j);                            \
        GPTLAB_INT4_FLUSH(_mm512_set1_epi32(static_cast<int>(gi - g0)));                                           \
      }                                                                                                            \
    }                                                                                                              \
    hsum512n(f, W * R, out);                                                                                       \
  }

#define GPTLAB_MADDUBS_ADD(acc, a, b) \
  _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(a, b), _mm512_set1_epi16(1)))
GPTLAB_INT4_DOTS512(int4_dots512, "avx512f,avx512bw", GPTLAB_MADDUBS_ADD)
GPTLAB_INT4_DOTS512(int4_dots512_vnni, "avx512f,avx512bw,avx512vnni", _mm512_dpbusd_epi32)

// Groups of 32 and 64 columns (16 and 32 bytes; GGUF's q4_0 and gptlab's default): per 16 groups, D = gb / 4
// vectors of 64 bytes of a weight row are transposed in registers so that int32 lane L of vector s holds bytes
// 4s..4s+3 of group L, log2(D) stages of D two-source dword permutes (vpermt2d) whose indices Int4Transpose works
// out once by following each dword. Each lane then sums one group over the block's D vectors (with the activations
// laid out to match, groups_to_int8), and the 16 groups' int32 sums go to fp32 once, scaled by their scales in lane
// order: where the loop above, whose lanes change group every 64 bytes, converts, permutes the scales and adds per
// 64 bytes and activation row. The permutes are per weight row and shared by the activation rows: GPT-2's int4
// products (g64) for 8 rows, AMD EPYC Zen 4, 2 threads, both loops alternating in one process: 16.1 -> 12.1 ms and
// 13.3 -> 11.3 in two runs (g32: 13.7 -> 10.1). One call takes up to 8 activation rows (R; their accumulators in
// registers, each scale made as it is applied rather than kept in one) against a run of weight rows, writing each
// result in place: calls of 4 activation rows and one weight row (the transposes made again for the second 4, and
// constants, scales and results set up and copied per call) were 1.3-1.6x slower for GPT-2's products, Zen 4, 2
// threads, alternating (g64: 8 rows 10.75 -> 7.05 ms, 16 rows 21.5 -> 14.1, 3 rows 6.72 -> 4.73; g32: 10.27 ->
// 7.95, 19.8 -> 12.1, 5.17 -> 3.35). Results are bit for bit the same as before (the same operations per row).
struct Int4Transpose {
  alignas(64) int32_t idx[3][8][16];  // stage, output vector: the 16 source lanes (0-15 the first, 16-31 the second)
};

static Int4Transpose int4_transpose(int gb) {
  const int D = gb / 4, stages = D == 8 ? 3 : 2;
  Int4Transpose t{};
  int cur[8][16], nxt[8][16];  // group * 16 + dword of each vector's lanes: at first memory order
  for (int v = 0; v < D; ++v)
    for (int l = 0; l < 16; ++l) cur[v][l] = (64 * v + 4 * l) / gb * 16 + (64 * v + 4 * l) % gb / 4;
  for (int st = 0; st < stages; ++st) {
    // output vector v takes the dwords of vectors v and v ^ (1 << st) whose index has bit st of v (so after the
    // last stage vector s holds dword s of every group), in lane order of their group at the last stage
    for (int v = 0; v < D; ++v) {
      const int a = v & ~(1 << st), b = a | (1 << st);
      int n = 0;
      for (int i = 0; i < 32; ++i) {
        const int e = i < 16 ? cur[a][i] : cur[b][i - 16];
        if ((e % 16 >> st & 1) == (v >> st & 1)) {
          TORCH_CHECK(n < 16, "int4_transpose");
          t.idx[st][v][n] = i;
          nxt[v][n++] = e;
        }
      }
      TORCH_CHECK(n == 16, "int4_transpose");
      if (st == stages - 1) {  // lane L: group L
        int order[16], seen = 0;
        for (int l = 0; l < 16; ++l) order[nxt[v][l] / 16] = t.idx[st][v][l], seen |= 1 << nxt[v][l] / 16;
        TORCH_CHECK(seen == 0xFFFF, "int4_transpose");
        for (int l = 0; l < 16; ++l) t.idx[st][v][l] = order[l], nxt[v][l] = l * 16 + v;
      }
    }
    std::memcpy(cur, nxt, sizeof cur);
  }
  return t;
}
// built on first use (a failed check is then an error of the call, not of loading the library)
static const Int4Transpose& int4_transpose_of(int D) {
  static const Int4Transpose t16 = int4_transpose(16), t32 = int4_transpose(32);
  return D == 8 ? t32 : t16;
}

#define GPTLAB_INT4_DOTS512T(NAME, TARGET, DOT)                                                                    \
  template <int R, int D>                                                                                          \
  __attribute__((target(TARGET))) static void NAME(const uint8_t* w, const int8_t* x, int64_t KP, int64_t H,       \
                                                   int64_t G, const uint16_t* scale, const uint16_t* zero,         \
                                                   const float* xs, const float* gsum, int64_t GP, int64_t rows,   \
                                                   float* out, int64_t ldo) {                                      \
    constexpr int64_t gb = 4 * D;                                                                                  \
    constexpr int stages = D == 8 ? 3 : 2;                                                                         \
    const Int4Transpose& tp = int4_transpose_of(D);                                                                \
    const __m512i low4 = _mm512_set1_epi8(15);                                                                     \
    const bool l2 = prefetch_l2.load(std::memory_order_relaxed);                                                   \
    const int64_t pd = std::max<int64_t>(prefetch_bytes(l2), H);                                                   \
    for (int64_t n = 0; n < rows; ++n, w += H, scale += G, zero += G) {                                            \
      __m512 f[R];                                                                                                 \
      for (int r = 0; r < R; ++r) f[r] = _mm512_setzero_ps();                                                      \
      for (int64_t g0 = 0; g0 < G; g0 += 16) {                                                                     \
        const int64_t g1 = std::min<int64_t>(G, g0 + 16), nb = (g1 - g0) * gb;                                    \
        const __mmask16 m = static_cast<__mmask16>((1u << (g1 - g0)) - 1);                                        \
        __m512 sw;                                                                                                 \
        int4_offsets<R, 1>(scale, zero, G, g0, m, gsum, GP, &sw, f);                                              \
        const int8_t* xb = x + g0 * 2 * gb; /* the block's activation codes in the first row */                   \
        const uint8_t* p = w + g0 * gb;                                                                            \
        __m512i t[D], u[D];                                                                                        \
        for (int k = 0; k < D; ++k) {                                                                              \
          prefetch_weights(p + 64 * k + pd, l2);                                                                   \
          const int64_t left = nb - 64 * k; /* a short block: its last vectors masked, zero past the row */       \
          t[k] = left >= 64 ? _mm512_loadu_si512(p + 64 * k)                                                       \
                 : left > 0 ? _mm512_maskz_loadu_epi8(~0ull >> (64 - left), p + 64 * k)                            \
                            : _mm512_setzero_si512();                                                              \
        }                                                                                                          \
        for (int st = 0; st < stages; ++st) {                                                                      \
          for (int k = 0; k < D; ++k) {                                                                            \
            const int a = k & ~(1 << st);                                                                          \
            u[k] = _mm512_permutex2var_epi32(t[a], _mm512_load_si512(tp.idx[st][k]), t[a | (1 << st)]);            \
          }                                                                                                        \
          for (int k = 0; k < D; ++k) t[k] = u[k];                                                                 \
        }                                                                                                          \
        __m512i a[R];                                                                                              \
        for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_si512();                                                 \
        for (int k = 0; k < D; ++k) {                                                                              \
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(t[k], 4), low4), lo = _mm512_and_si512(t[k], low4); \
          for (int r = 0; r < R; ++r)                                                                              \
            a[r] = DOT(DOT(a[r], hi, _mm512_loadu_si512(xb + r * KP + 128 * k)), lo,                               \
                       _mm512_loadu_si512(xb + r * KP + 128 * k + 64));                                            \
        }                                                                                                          \
        for (int r = 0; r < R; ++r) { /* each scale as int4_scales makes it, made as it is applied */             \
          const __m512 sc = _mm512_mul_ps(sw, _mm512_maskz_loadu_ps(m, xs + r * G + g0));                          \
          f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r]), sc, f[r]);                                              \
        }                                                                                                          \
      }                                                                                                            \
      float o[R];                                                                                                  \
      hsum512n(f, R, o);                                                                                           \
      for (int r = 0; r < R; ++r) out[r * ldo + n] = o[r];                                                         \
    }                                                                                                              \
  }
GPTLAB_INT4_DOTS512T(int4_dots512t, "avx512f,avx512bw", GPTLAB_MADDUBS_ADD)
GPTLAB_INT4_DOTS512T(int4_dots512t_vnni, "avx512f,avx512bw,avx512vnni", _mm512_dpbusd_epi32)

// One activation row (a decode step of one sequence; the weights read in memory order, the activations in the
// layout of int4_dots512 above, shared by the W weight rows): no transposes; instead each 64-byte step's int32 sums
// (lane L: bytes 4L..4L+3, 16 / D lanes a group) stay apart, and pairs of steps fold into one vector of the sums of
// adjacent lanes (two permutes and an add) until lane L holds group L's sum over the 16 groups' D steps: the same
// integers as int4_dots512t's (int32 sums are exact in any order), the same fp32 arithmetic after them, so a row
// gets the same bits alone as in a batch (tests/test_quant.py). Per 64 bytes about the operations of the loop with
// a flush per step that it replaced: GPT-2's products for one row, AMD EPYC Zen 4, 1 and 2 threads, g32 and g64,
// within 4 % of it either way. One call takes a thread's whole share of weight rows, W at a time: a call per block
// (its constants set up anew each time) and four separate reductions of its W = 4 rows made one core's products of
// a 768-column matrix from the cache 1.3-1.4x slower (compute-bound there, 384 bytes a row; Zen 4, groups of 64:
// 20.5 against 28.4 GB/s).
#define GPTLAB_INT4_DOTS512R(NAME, TARGET, DOT)                                                                    \
  template <int W, int D>                                                                                          \
  __attribute__((target(TARGET))) static void NAME(const uint8_t* w, const int8_t* x, int64_t H, int64_t G,        \
                                                   const uint16_t* scale, const uint16_t* zero, const float* xs,   \
                                                   const float* gsum, int64_t rows, float* out) {                  \
    constexpr int64_t gb = 4 * D;                                                                                  \
    constexpr int levels = D == 8 ? 3 : 2;                                                                         \
    const __m512i low4 = _mm512_set1_epi8(15);                                                                     \
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);             \
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);              \
    const bool l2 = prefetch_l2.load(std::memory_order_relaxed);                                                   \
    const int64_t pd = std::max<int64_t>(prefetch_bytes(l2), W * H);                                               \
    for (int64_t n = 0; n + W <= rows; n += W, w += W * H, scale += W * G, zero += W * G, out += W) {              \
      __m512 f[W], sc[W];                                                                                          \
      for (int v = 0; v < W; ++v) f[v] = _mm512_setzero_ps();                                                      \
      for (int64_t g0 = 0; g0 < G; g0 += 16) {                                                                     \
        const int64_t g1 = std::min<int64_t>(G, g0 + 16), nb = (g1 - g0) * gb;                                     \
        const __mmask16 m = static_cast<__mmask16>((1u << (g1 - g0)) - 1);                                         \
        int4_scales<1, W>(scale, zero, G, g0, m, xs, gsum, 0, sc, f);                                              \
        __m512i lvl[W][levels];                                                                                    \
        _Pragma("GCC unroll 8") for (int st = 0; st < D; ++st) {                                                   \
          const int64_t j = g0 * gb + 64 * st, left = nb - 64 * st;                                                \
          __m512i xe = _mm512_setzero_si512(), xo = xe;                                                            \
          if (left > 0) {                                                                                          \
            xe = _mm512_loadu_si512(x + 2 * j);                                                                    \
            xo = _mm512_loadu_si512(x + 2 * j + 64);                                                               \
          }                                                                                                        \
          _Pragma("GCC unroll 4") for (int v = 0; v < W; ++v) {                                                    \
            __m512i acc = _mm512_setzero_si512();                                                                  \
            if (left > 0) { /* a short block: its last step masked, the steps past the row zero */                 \
              prefetch_weights(w + v * H + j + pd, l2);                                                            \
              const __m512i b = left >= 64 ? _mm512_loadu_si512(w + v * H + j)                                     \
                                           : _mm512_maskz_loadu_epi8(~0ull >> (64 - left), w + v * H + j);         \
              const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low4), lo = _mm512_and_si512(b, low4);  \
              acc = DOT(DOT(acc, hi, xe), lo, xo);                                                                 \
            }                                                                                                      \
            _Pragma("GCC unroll 3") for (int l = 0; l < levels; ++l) { /* fold: step st closes level l when bit l  \
                                                                           of st is set */                         \
              if (!(st >> l & 1)) {                                                                                \
                lvl[v][l] = acc;                                                                                   \
                break;                                                                                             \
              }                                                                                                    \
              acc = _mm512_add_epi32(_mm512_permutex2var_epi32(lvl[v][l], even, acc),                              \
                                     _mm512_permutex2var_epi32(lvl[v][l], odd, acc));                              \
            }                                                                                                      \
            if (st == D - 1) f[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), sc[v], f[v]);                         \
          }                                                                                                        \
        }                                                                                                          \
      }                                                                                                            \
      hsum512n(f, W, out);                                                                                         \
    }                                                                                                              \
    if constexpr (W > 1)                                                                                           \
      if (rows % W) NAME<1, D>(w, x, H, G, scale, zero, xs, gsum, rows % W, out);                                  \
  }
GPTLAB_INT4_DOTS512R(int4_dots512r, "avx512f,avx512bw", GPTLAB_MADDUBS_ADD)
GPTLAB_INT4_DOTS512R(int4_dots512r_vnni, "avx512f,avx512bw,avx512vnni", _mm512_dpbusd_epi32)

// Whether the 512-bit int4 loops take groups of gb bytes: 16 or 32 (int4_dots512t for several activation rows,
// int4_dots512r for one), or whole 64-byte steps a group (int4_dots512); others take the 256-bit loop.
static bool int4_small_groups(int64_t gb) { return gb == 16 || gb == 32; }
static bool int4_wide_groups(int64_t gb) { return int4_small_groups(gb) || gb % 64 == 0; }

// One int4 block: W weight rows (their scales G apart) against R activation rows, out[v * R + r]. The 256-bit loop
// takes one weight row at a time.
template <int R, int W>
static void int4_block(Isa isa, const uint8_t* w, const int8_t* x, int64_t KP, int64_t H, int64_t G, int64_t gb,
                       const uint16_t* scale, const uint16_t* zero, const float* xs, const float* gsum, int64_t GP,
                       float* out) {
  if (isa == kVnni && gb % 64 == 0) int4_dots512_vnni<R, W>(w, x, KP, H, G, gb, scale, zero, xs, gsum, GP, out);
  else if (isa == kAvx512 && gb % 64 == 0) int4_dots512<R, W>(w, x, KP, H, G, gb, scale, zero, xs, gsum, GP, out);
  else if constexpr (W == 1) int4_dots<R>(w, x, KP, G, gb, scale, zero, xs, gsum, GP, out);
}

// R activation rows (codes KP apart, laid out for int4_dots512t) against weight rows [0, rows), out[r * ldo + n].
template <int R>
static void int4_batch(Isa isa, int64_t gb, const uint8_t* w, const int8_t* x, int64_t KP, int64_t H, int64_t G,
                       const uint16_t* scale, const uint16_t* zero, const float* xs, const float* gsum, int64_t GP,
                       int64_t rows, float* out, int64_t ldo) {
  const bool vnni = isa == kVnni, g16 = gb == 16;
  if (vnni && g16) int4_dots512t_vnni<R, 4>(w, x, KP, H, G, scale, zero, xs, gsum, GP, rows, out, ldo);
  else if (vnni) int4_dots512t_vnni<R, 8>(w, x, KP, H, G, scale, zero, xs, gsum, GP, rows, out, ldo);
  else if (g16) int4_dots512t<R, 4>(w, x, KP, H, G, scale, zero, xs, gsum, GP, rows, out, ldo);
  else int4_dots512t<R, 8>(w, x, KP, H, G, scale, zero, xs, gsum, GP, rows, out, ldo);
}

// One activation row against weight rows [0, rows) (a thread's share) in blocks of bw: int4_dots512r.
static void int4_rows(Isa isa, int64_t bw, const uint8_t* w, const int8_t* x, int64_t H, int64_t G, int64_t gb,
                      const uint16_t* scale, const uint16_t* zero, const float* xs, const float* gsum, int64_t rows,
                      float* out) {
  const bool vnni = isa == kVnni, g16 = gb == 16;
  if (bw == 4 && vnni && g16) int4_dots512r_vnni<4, 4>(w, x, H, G, scale, zero, xs, gsum, rows, out);
  else if (bw == 4 && vnni) int4_dots512r_vnni<4, 8>(w, x, H, G, scale, zero, xs, gsum, rows, out);
  else if (bw == 4 && g16) int4_dots512r<4, 4>(w, x, H, G, scale, zero, xs, gsum, rows, out);
  else if (bw == 4) int4_dots512r<4, 8>(w, x, H, G, scale, zero, xs, gsum, rows, out);
  else if (vnni && g16) int4_dots512r_vnni<1, 4>(w, x, H, G, scale, zero, xs, gsum, rows, out);
  else if (vnni) int4_dots512r_vnni<1, 8>(w, x, H, G, scale, zero, xs, gsum, rows, out);
  else if (g16) int4_dots512r<1, 4>(w, x, H, G, scale, zero, xs, gsum, rows, out);
  else int4_dots512r<1, 8>(w, x, H, G, scale, zero, xs, gsum, rows, out);
}

// Groupwise int4, w ~ (q - 8) * scale + zero per group of g columns, scale and zero fp16 (gptlab.quant.quantize),
// packed [N, K / 2] with column 2j in the high nibble of byte j. sum_k x_k w_k = sum_groups (scale * sum x_k q_k +
// offset * sum x_k), offset = zero - 8 * scale: the codes' part with the activations' int8 codes (groups_to_int8),
// the offsets' with the group sums of x itself. A shift and a mask split the bytes into the even and odd columns'
// codes, unsigned bytes multiplied by the activations' signed ones (int4_dots, int4_dots512).
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros,
                   int64_t g) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte, "int4_mm: w must be uint8 [N, K / 2]");
  const int64_t K = w.size(1) * 2, N = w.size(0);
  TORCH_CHECK(g % 32 == 0 && K % g == 0, "int4_mm: the group size must be a multiple of 32 dividing K");
  const int64_t G = K / g;
  TORCH_CHECK(scales.scalar_type() == at::kHalf && zeros.scalar_type() == at::kHalf && scales.dim() == 2 &&
              zeros.dim() == 2 && scales.size(0) == N && scales.size(1) == G && zeros.size(0) == N &&
              zeros.size(1) == G, "int4_mm: scales and zeros must be float16 [N, K / g]");
  check_x(x, K);
  auto xc = x.contiguous(); auto wc = w.contiguous(); auto sc = scales.contiguous(); auto zc = zeros.contiguous();
  const int64_t M = xc.size(0), H = K / 2;
  auto out = at::empty({M, N}, xc.options());
  const int64_t gb = g / 2;  // bytes per group
  const Isa isa = cpu_isa();
  const bool transposed = isa != kAvx2 && int4_small_groups(gb) && M > 1;  // int4_dots512t's layout
  const int64_t KP = transposed ? (G + 15) / 16 * 16 * g : (K + 127) / 128 * 128;
  std::vector<int8_t> xq(M * KP); std::vector<float> xs(M * G), gsum(M * groups_padded(G), 0.f);
  const float* xp = xc.data_ptr<float>();
  groups_to_int8(xp, M, K, g, KP, xq.data(), xs.data(), gsum.data(), transposed);
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(zc.data_ptr<at::Half>());
  float* outp = out.data_ptr<float>();
  // weight rows per block: int4_single_row_block for one activation row; one for more (with int16 activations one
  // was 1.1x two for GPT-2 at 8 rows on an AMD EPYC Zen 5; with int8 codes, 8 activation rows a block of int4_dots512
  // were no faster than two blocks of 4 on an AMX Xeon), and where the group size takes the 256-bit loop
  const bool wide = isa != kAvx2 && int4_wide_groups(gb);
  const int64_t BW = wide && M == 1 ? int4_single_row_block.load() : 1;
  const int64_t GP = groups_padded(G);
  const bool rows = wide && M == 1 && int4_small_groups(gb);  // int4_dots512r, a thread's rows in one call
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (rows) return int4_rows(isa, BW, wp + n0 * H, xq.data(), H, G, gb, sp + n0 * G, zp + n0 * G, xs.data(),
                               gsum.data(), n1 - n0, outp + n0);
    if (transposed) {  // up to 8 activation rows per pass over 16 weight rows (kept in L1 for the next 8)
      for (int64_t n = n0; n < n1; n += 16)
        for (int64_t m0 = 0; m0 < M; m0 += 8)
          block<8, 1>(1, std::min<int64_t>(8, M - m0), [&](auto r, auto) {
            int4_batch<r>(isa, gb, wp + n * H, xq.data() + m0 * KP, KP, H, G, sp + n * G, zp + n * G,
                          xs.data() + m0 * G, gsum.data() + m0 * GP, GP, std::min<int64_t>(16, n1 - n),
                          outp + m0 * N + n, N);
          });
      return;
    }
    float d[16];
    for (int64_t n = n0; n < n1; n += BW) {
      const int64_t ws = std::min(BW, n1 - n);
      const uint8_t* row = wp + n * H;
      const uint16_t* sn = sp + n * G;
      const uint16_t* zn = zp + n * G;
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t R = std::min<int64_t>(4, M - m0);
        const int8_t* xr = xq.data() + m0 * KP;
        const float* sr = xs.data() + m0 * G;
        const float* gr = gsum.data() + m0 * GP;
        quant_block(BW, ws, R, [&](auto r, auto v) {
          int4_block<r, v>(isa, row, xr, KP, H, G, gb, sn, zn, sr, gr, GP, d);
        });
        for (int64_t v = 0; v < ws; ++v)
          for (int64_t r = 0; r < R; ++r) outp[(m0 + r) * N + n + v] = d[v * R + r];
      }
    }
  });
  return out;
}

// fp32 products of a few rows (decode steps), out[m, n] = sum_k x[m, k] w[n, k] + bias[n], w [N, K] as nn.Linear
// keeps it: a block of W weight rows is read once for R activation rows at a time (the W x R accumulators in
// registers, the weight rows in L1 across the blocks of R), so a step reads the weights once, at memory speed.
// MKL's sgemm reads them at a third of that for 1 to 16 rows on the CPUs measured (docs/benchmarks.md). AVX-512 CPUs
// only; others get at::linear. Each k step loads W weight and R activation vectors for W x R FMAs; the block shapes
// for several rows are the ones measured fastest on an AMX Xeon (loads, not FMAs, bound the loop there): up to 8
// rows, 2 x 8 with the rows after next prefetched (memory-bound: few weight streams, far ahead); more rows, 6 x 4
// (compute-bound: 24 FMAs per 10 loads against 16 per 10). One row (a decode step of one sequence) takes 1, 2, 4 or
// 8 weight rows, measured per process (f32_single_row_block): 1 was 1.2x 2 on an AMD EPYC Zen 5, 2 the best on the
// Xeon.
//
// Every dot product is one accumulator of 16 lanes summed in one fixed order (hsum512, hsum512x16), whatever the
// block it is computed in, so a row's result does not depend on the other rows of the step (a request decodes the
// same bits alone or in a busy batch; tests/test_quant.py checks it).

// out[v * R + r] = w[v] . x[r] for the W weight rows at w and the R activation rows at x (both K apart).
template <int R, int W, bool PREFETCH>
__attribute__((target("avx512f"))) static void f32_dots(const float* w, const float* x, int64_t K, float* out) {
  const int64_t K16 = K / 16 * 16;
  const bool l2 = prefetch_l2.load(std::memory_order_relaxed);
  __m512 a[W * R];
  for (int i = 0; i < W * R; ++i) a[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K16; k += 16) {
    __m512 wv[W];
    for (int v = 0; v < W; ++v) {
      wv[v] = _mm512_loadu_ps(w + v * K + k);
      if constexpr (PREFETCH) prefetch_weights(w + (v + 2 * W) * K + k, l2);
    }
    for (int r = 0; r < R; ++r) {
      __m512 xv = _mm512_loadu_ps(x + r * K + k);
      asm("" : "+v"(xv));  // one load per activation vector: GCC would fold it into each FMA, W loads for one
      for (int v = 0; v < W; ++v) a[v * R + r] = _mm512_fmadd_ps(wv[v], xv, a[v * R + r]);
    }
  }
  int i = 0;
  for (; i + 16 <= W * R; i += 16) _mm512_storeu_ps(out + i, hsum512x16(a + i));
  hsum512n(a + i, W * R - i, out + i);
  for (int v = 0; v < W; ++v)
    for (int r = 0; r < R; ++r)
      for (int64_t j = K16; j < K; ++j) out[v * R + r] += x[r * K + j] * w[v * K + j];
}

// Activation rows per tile: up to 1 MiB of them, so that a tile stays in L2 while every weight block of the thread's
// share streams past it once (the packed prefill's hundreds of rows: without tiles, 1,056 rows of K = 768 fell from
// 270 to 130 GFLOP/s on the Xeon of docs/benchmarks.md as the rows left L2 between weight blocks). The tiles change
// no output's order of summation, so a row's bits are those of any other number of rows.
constexpr int64_t F32_TILE_BYTES = 1 << 20;
at::Tensor f32_mm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "f32_mm: w must be float32 [N, K]");
  const int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == at::kFloat, "f32_mm: x must be float32 [M, K]");
  if (cpu_isa() < kAvx512) return at::linear(x, w, bias);  // (f32_linear does not call it there)
  auto xc = x.contiguous(); auto wc = w.contiguous();
  const int64_t M = xc.size(0);
  auto out = at::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  at::Tensor bc;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) { bc = bias->contiguous().to(at::kFloat); bp = bc.data_ptr<float>(); }
  float* op = out.data_ptr<float>();
  const bool few = M <= 8;
  const int64_t W1 = f32_single_row_block.load();
  const int64_t BW = M == 1 ? W1 : few ? 2 : 6, BR = few ? 8 : 4;  // the block: weight rows x activation rows
  const int64_t MT = std::max<int64_t>(BR, F32_TILE_BYTES / (K * 4) / BR * BR);  // rows per tile
  at::parallel_for(0, N, 24, [&](int64_t n0, int64_t n1) {
    float d[32];
    for (int64_t t0 = 0; t0 < M; t0 += MT)
      for (int64_t n = n0; n < n1; n += BW) {
        const int64_t ws = std::min(BW, n1 - n);
        for (int64_t m0 = t0; m0 < std::min(M, t0 + MT); m0 += BR) {
          const int64_t R = std::min(BR, M - m0);
          const auto dots = [&](auto r, auto v) { f32_dots<r, v, true>(wp + n * K, xp + m0 * K, K, d); };
          if (M == 1 && W1 == 8) block<1, 8>(ws, R, dots);
          else if (M == 1 && W1 == 4) block<1, 4>(ws, R, dots);
          else if (M == 1 && W1 == 1) block<1, 1>(ws, R, dots);
          else if (few) block<8, 2>(ws, R, dots);
          else block<4, 6>(ws, R, [&](auto r, auto v) { f32_dots<r, v, false>(wp + n * K, xp + m0 * K, K, d); });
          for (int64_t v = 0; v < ws; ++v)
            for (int64_t r = 0; r < R; ++r) op[(m0 + r) * N + n + v] = d[v * R + r] + (bp ? bp[n + v] : 0.f);
        }
      }
  });
  return out;
}

// Attention of one query per row and head (a decode step) over a KV cache, reading only the keys and values its
// mask admits: out[b, h] = sum_l softmax_l(q[b, h] . k[b, h / group, l] * scale) v[b, h / group, l] over the slots l
// with mask[b, l]. F.scaled_dot_product_attention reads every slot of the cache it is given, and a compiled step's
// cache is rounded up to 256 slots (gptlab.generate.engine), a serving pool's to its longest row: on GPT-2 124M
// that was 1.5 MB per layer per row for a 100-token context, a fifth of an int4 step (docs/benchmarks.md). One
// (row, head) per task: two passes, the scores of the admitted slots (then their exponentials) in a buffer, then
// the weighted sum of their values, 8 channels at a time; grouped-query heads read their group's key/value head.
// A row's result depends only on its own query, keys, values and mask, not on the other rows or the cache length.
static inline float dot8(const float* a, const float* b, int64_t D) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), s1);
  }
  if (d < D) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), s0);
  return hsum(_mm256_add_ps(s0, s1));
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                            double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4, "decode_attention: 4-d tensors");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(q.size(2) == 1, "decode_attention: one query per row");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "decode_attention: float32 q, k, v");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && Hkv > 0 && H % Hkv == 0,
              "decode_attention: k and v [B, kv_heads, L, D], query heads a multiple of kv heads");
  TORCH_CHECK(D % 8 == 0 && D <= 512, "decode_attention: head size a multiple of 8, at most 512");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.size(0) == B && mask.size(2) == 1 && mask.size(3) == L,
              "decode_attention: bool mask [B, 1, 1, L]");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k and v contiguous in the head dimension");
  auto qc = q.contiguous();
  auto out = at::empty({B, H, 1, D}, qc.options());
  const float* qp = qc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const int64_t group = H / Hkv, ms0 = mask.stride(0), ms3 = mask.stride(3);
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(L);
    std::vector<int32_t> at(L);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H;
      const float* qv = qp + t * D;
      const float* kb = kp + b * k.stride(0) + (h / group) * k.stride(1);
      const float* vb = vp + b * v.stride(0) + (h / group) * v.stride(1);
      const bool* mb = mp + b * ms0;
      int64_t n = 0;
      float top = -INFINITY;
      for (int64_t l = 0; l < L; ++l)
        if (mb[l * ms3]) {
          const float s = dot8(qv, kb + l * k.stride(2), D) * sc;
          top = std::max(top, s);
          p[n] = s;
          at[n++] = static_cast<int32_t>(l);
        }
      float total = 0.f;
      for (int64_t i = 0; i < n; ++i) total += (p[i] = std::exp(p[i] - top));
      float* o = op + t * D;
      const __m256 inv = _mm256_set1_ps(n ? 1.f / total : 0.f);
      int64_t d0 = 0;
      for (; d0 + 64 <= D; d0 += 64) {  // 64 channels in registers, each value row read once
        __m256 acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; ++i) {
          const __m256 w = _mm256_set1_ps(p[i]);
          const float* row = vb + at[i] * v.stride(2) + d0;
          for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 8 * j), acc[j]);
        }
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(o + d0 + 8 * j, _mm256_mul_ps(acc[j], inv));
      }
      for (; d0 < D; d0 += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; ++i)
          acc = _mm256_fmadd_ps(_mm256_set1_ps(p[i]), _mm256_loadu_ps(vb + at[i] * v.stride(2) + d0), acc);
        _mm256_storeu_ps(o + d0, _mm256_mul_ps(acc, inv));
      }
    }
  });
  return out;
}

// ---- The softmax of the fused head-and-loss (gptlab/layers.py, LinearCrossEntropy) over logits kept transposed,
// [vocab, rows] (a column per token). One pass reads the logits for each column's log-sum-exp (online: each thread
// keeps a running maximum and rescaled sum per column over its share of the vocabulary, merged after), a second
// overwrites them in place with the gradient of the mean loss, (softmax - one-hot) * scale; PyTorch's ops take nine
// passes over an fp32 copy. Both go along the rows, contiguous memory (a column block read down 50,257 rows 2 KiB
// apart, 2x slower), 16 lanes a vector with AVX-512, 8 with AVX2.

// e^x, x <= 88.37: x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' degree-6 polynomial for expf (relative error
// ~1e-7), 2^n through the exponent field. Arguments below -87.33 give 2^-126 rather than 0: negligible in any sum of
// terms of which one is 1, as here. A macro for the two widths: exp8 (AVX2), exp16 (AVX-512, also GELU's below).
#define GPTLAB_EXP(NAME, TARGET, BITS)                                                                     \
  TARGET static inline __m##BITS NAME(__m##BITS x) {                                                       \
    x = _mm##BITS##_min_ps(_mm##BITS##_max_ps(x, _mm##BITS##_set1_ps(-87.33f)), _mm##BITS##_set1_ps(88.37f)); \
    const auto ni = _mm##BITS##_cvtps_epi32(_mm##BITS##_mul_ps(x, _mm##BITS##_set1_ps(1.44269504088896341f))); \
    const __m##BITS n = _mm##BITS##_cvtepi32_ps(ni); /* x / ln2 to nearest */                             \
    __m##BITS r = _mm##BITS##_fnmadd_ps(n, _mm##BITS##_set1_ps(0.693359375f), x);                         \
    r = _mm##BITS##_fnmadd_ps(n, _mm##BITS##_set1_ps(-2.12194440e-4f), r);                                 \
    __m##BITS p = _mm##BITS##_set1_ps(1.9875691500e-4f);                                                   \
    p = _mm##BITS##_fmadd_ps(p, r, _mm##BITS##_set1_ps(1.3981999507e-3f));                                 \
    p = _mm##BITS##_fmadd_ps(p, r, _mm##BITS##_set1_ps(8.3334519073e-3f));                                 \
    p = _mm##BITS##_fmadd_ps(p, r, _mm##BITS##_set1_ps(4.1665795894e-2f));                                 \
    p = _mm##BITS##_fmadd_ps(p, r, _mm##BITS##_set1_ps(1.6666665459e-1f));                                 \
    p = _mm##BITS##_fmadd_ps(p, r, _mm##BITS##_set1_ps(5.0000001201e-1f));                                 \
    p = _mm##BITS##_fmadd_ps(p, _mm##BITS##_mul_ps(r, r), _mm##BITS##_add_ps(r, _mm##BITS##_set1_ps(1.f))); \
    const auto e = _mm##BITS##_slli_epi32(_mm##BITS##_add_epi32(ni, _mm##BITS##_set1_epi32(127)), 23);     \
    return _mm##BITS##_mul_ps(p, _mm##BITS##_castsi##BITS##_ps(e));                                        \
  }
GPTLAB_EXP(exp8, , 256)

static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const at::BFloat16* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
static inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
static inline void store8(at::BFloat16* p, __m256 v) {  // rounded to nearest even, as PyTorch's casts
  const __m256i b = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i h = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}

#define GPTLAB_AVX512 __attribute__((target("avx512f")))
GPTLAB_EXP(exp16, GPTLAB_AVX512, 512)
GPTLAB_AVX512 static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
GPTLAB_AVX512 static inline __m512 load16(const at::BFloat16* p) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
GPTLAB_AVX512 static inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
GPTLAB_AVX512 static inline void store16(at::BFloat16* p, __m512 v) {  // to nearest even, as store8
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i h = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(h));
}

// Rows [v0, v1) of L [V, R] into the running maximum m, rescaled sum s and not-finite flag bad of each column (R
// floats each): 16 rows at a time (32 KiB of bf16 for R = 1024, in L1), their maximum first, then one exp a logit.
// And rows [v0, v1) of L overwritten with exp(x - lse) * scale, column by column's lse and scale. A macro for the two
// widths (8 lanes, AVX2; 16, AVX-512: GPT-2's [50,304 x 1,024] bf16 logits in 37 ms against 46 on an AMX Xeon): each
// column's arithmetic is the same in both, lane for lane, so they give the same bits.
#define GPTLAB_XENT(SUFFIX, TARGET, BITS, N, LOAD, STORE, EXP)                                                   \
  template <class T>                                                                                               \
  TARGET static void xent_rows##SUFFIX(const T* L, int64_t v0, int64_t v1, int64_t R, float* m, float* s,         \
                                       float* bad) {                                                               \
    constexpr int64_t CHUNK = 16;                                                                                  \
    const int64_t RN = R / N * N;                                                                                  \
    const __m##BITS zero = _mm##BITS##_setzero_ps();                                                               \
    for (int64_t a = v0; a < v1; a += CHUNK) {                                                                     \
      const int64_t b = std::min(v1, a + CHUNK);                                                                   \
      for (int64_t c = 0; c < RN; c += N) {                                                                        \
        const __m##BITS m0 = _mm##BITS##_loadu_ps(m + c);                                                          \
        __m##BITS cm = m0, bd = _mm##BITS##_loadu_ps(bad + c);                                                     \
        for (int64_t v = a; v < b; ++v) {                                                                          \
          const __m##BITS x = LOAD(L + v * R + c);                                                                 \
          cm = _mm##BITS##_max_ps(cm, x);                                                                          \
          bd = _mm##BITS##_fmadd_ps(x, zero, bd); /* x * 0 is NaN for an inf or NaN logit, else 0 */               \
        }                                                                                                          \
        __m##BITS sum = _mm##BITS##_mul_ps(_mm##BITS##_loadu_ps(s + c), EXP(_mm##BITS##_sub_ps(m0, cm)));          \
        for (int64_t v = a; v < b; ++v)                                                                            \
          sum = _mm##BITS##_add_ps(sum, EXP(_mm##BITS##_sub_ps(LOAD(L + v * R + c), cm)));                         \
        _mm##BITS##_storeu_ps(m + c, cm);                                                                          \
        _mm##BITS##_storeu_ps(s + c, sum);                                                                         \
        _mm##BITS##_storeu_ps(bad + c, bd);                                                                        \
      }                                                                                                            \
      for (int64_t c = RN; c < R; ++c) {                                                                           \
        float cm = m[c];                                                                                           \
        for (int64_t v = a; v < b; ++v) {                                                                          \
          const float x = static_cast<float>(L[v * R + c]);                                                        \
          cm = std::max(cm, x);                                                                                    \
          bad[c] += x * 0.f;                                                                                       \
        }                                                                                                          \
        float sum = s[c] * std::exp(m[c] - cm);                                                                    \
        for (int64_t v = a; v < b; ++v) sum += std::exp(static_cast<float>(L[v * R + c]) - cm);                   \
        m[c] = cm;                                                                                                 \
        s[c] = sum;                                                                                                \
      }                                                                                                            \
    }                                                                                                              \
  }                                                                                                                \
  template <class T>                                                                                               \
  TARGET static void xent_softmax_rows##SUFFIX(T* L, int64_t v0, int64_t v1, int64_t R, const float* lse,         \
                                               const float* scale) {                                               \
    const int64_t RN = R / N * N;                                                                                  \
    for (int64_t v = v0; v < v1; ++v) {                                                                            \
      T* row = L + v * R;                                                                                          \
      for (int64_t c = 0; c < RN; c += N)                                                                          \
        STORE(row + c, _mm##BITS##_mul_ps(EXP(_mm##BITS##_sub_ps(LOAD(row + c), _mm##BITS##_loadu_ps(lse + c))),   \
                                          _mm##BITS##_loadu_ps(scale + c)));                                       \
      for (int64_t c = RN; c < R; ++c) row[c] = std::exp(static_cast<float>(row[c]) - lse[c]) * scale[c];          \
    }                                                                                                              \
  }
GPTLAB_XENT(8, , 256, 8, load8, store8, exp8)
GPTLAB_XENT(16, GPTLAB_AVX512, 512, 16, load16, store16, exp16)

at::Tensor softmax_xent_(at::Tensor& logits, const at::Tensor& targets, int64_t vocab_size, const at::Tensor& scale) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "softmax_xent_: logits must be a contiguous [V, R]");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "softmax_xent_: float32 or bfloat16 logits");
  const int64_t V = logits.size(0), R = logits.size(1);
  TORCH_CHECK(vocab_size > 0 && vocab_size <= V, "softmax_xent_: 0 < vocab_size <= logits.size(0)");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == R,
              "softmax_xent_: int64 targets [R]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == R,
              "softmax_xent_: float32 scale [R]");
  auto tc = targets.contiguous();
  auto sc = scale.contiguous();
  const int64_t* tp = tc.data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(tp, tp + R, [&](int64_t t) { return t < vocab_size; }),
              "softmax_xent_: targets must be < vocab_size (or negative: ignored)");
  auto loss = at::empty({R}, sc.options());
  const float* sp = sc.data_ptr<float>();
  float* lp = loss.data_ptr<float>();
  const bool wide = cpu_isa() >= kAvx512;
  auto run = [&](auto* L) {
    // pass 1: each thread's share of the vocabulary into its own (m, s, bad), merged after
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), vocab_size / 64));
    std::vector<float> state(3 * parts * R);
    for (int64_t p = 0; p < parts; ++p) std::fill_n(state.data() + 3 * p * R, R, -INFINITY);
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        float* st = state.data() + 3 * p * R;
        const int64_t v0 = vocab_size * p / parts, v1 = vocab_size * (p + 1) / parts;
        wide ? xent_rows16(L, v0, v1, R, st, st + R, st + 2 * R) : xent_rows8(L, v0, v1, R, st, st + R, st + 2 * R);
      }
    });
    std::vector<float> lse(R), xt(R);
    for (int64_t c = 0; c < R; ++c) {
      float top = -INFINITY, sum = 0.f, bad = 0.f;
      for (int64_t p = 0; p < parts; ++p) top = std::max(top, state[3 * p * R + c]);
      for (int64_t p = 0; p < parts; ++p) {
        const float* st = state.data() + 3 * p * R;
        sum += st[R + c] * std::exp(st[c] - top);
        bad += st[2 * R + c];
      }
      const int64_t t = tp[c];
      lse[c] = top + std::log(sum);
      xt[c] = t >= 0 ? static_cast<float>(L[t * R + c]) : 0.f;
      lp[c] = bad != 0.f ? NAN : t >= 0 ? lse[c] - xt[c] : 0.f;
    }
    // pass 2: the gradient, in place; padding rows to zero; then the targets' entries, minus one
    at::parallel_for(0, V, 256, [&](int64_t v0, int64_t v1) {
      const int64_t end = std::min(v1, vocab_size);
      wide ? xent_softmax_rows16(L, v0, end, R, lse.data(), sp) : xent_softmax_rows8(L, v0, end, R, lse.data(), sp);
    });
    std::fill(L + vocab_size * R, L + V * R, 0.f);
    for (int64_t c = 0; c < R; ++c)
      if (tp[c] >= 0) L[tp[c] * R + c] = (std::exp(xt[c] - lse[c]) - 1.f) * sp[c];
  };
  if (logits.scalar_type() == at::kFloat) {
    run(logits.data_ptr<float>());
  } else {
    run(logits.data_ptr<at::BFloat16>());
  }
  return loss;
}

// ---- GELU's tanh approximation in training (gptlab/layers.py, gelu): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
// is x * sigmoid(u), u = 2 sqrt(2/pi) (x + 0.044715 x^3), and its derivative s + x s (1 - s) du/dx, s = sigmoid(u):
// one exp and one division a value. PyTorch's CPU kernel for it took 3.1 ms for GPT-2's [1024, 3072] activations on
// an AMX Xeon (its exact erf form 0.6 ms). 16 lanes, AVX-512 (kernels.py's has_avx512_kernels).
constexpr float kGeluK = 1.5957691216057308f, kGeluC = 0.044715f;  // 2 sqrt(2/pi), and the cubic's coefficient

static inline float gelu_sigmoid(float x) { return 1.f / (1.f + std::exp(-kGeluK * (x + kGeluC * x * x * x))); }
GPTLAB_AVX512 static inline __m512 gelu_sigmoid16(__m512 x) {
  const __m512 x2 = _mm512_mul_ps(x, x);
  const __m512 u = _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(-kGeluK)),
                                 _mm512_fmadd_ps(x2, _mm512_set1_ps(kGeluC), _mm512_set1_ps(1.f)));
  return _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), exp16(u)));
}

// y = gelu(x) (g null), or the gradient g * gelu'(x), over n values
template <class T>
GPTLAB_AVX512 static void gelu_tanh_span(const T* x, const T* g, T* y, int64_t n) {
  const int64_t n16 = n / 16 * 16;
  const __m512 one = _mm512_set1_ps(1.f), k = _mm512_set1_ps(kGeluK), c3 = _mm512_set1_ps(3.f * kGeluC);
  for (int64_t i = 0; i < n16; i += 16) {
    const __m512 v = load16(x + i), s = gelu_sigmoid16(v);
    if (g == nullptr) {
      store16(y + i, _mm512_mul_ps(v, s));
    } else {  // s + x s (1 - s) k (1 + 3 c x^2)
      const __m512 du = _mm512_mul_ps(k, _mm512_fmadd_ps(_mm512_mul_ps(v, v), c3, one));
      const __m512 d = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(v, s), _mm512_sub_ps(one, s)), du, s);
      store16(y + i, _mm512_mul_ps(load16(g + i), d));
    }
  }
  for (int64_t i = n16; i < n; ++i) {
    const float v = static_cast<float>(x[i]), s = gelu_sigmoid(v);
    y[i] = g == nullptr ? v * s
                        : static_cast<float>(g[i]) * (s + v * s * (1.f - s) * kGeluK * (1.f + 3.f * kGeluC * v * v));
  }
}

static at::Tensor gelu_tanh_apply(const at::Tensor& x, const at::Tensor* g) {
  TORCH_CHECK(cpu_isa() >= kAvx512, "gelu_tanh: needs AVX-512");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "gelu_tanh: float32 or bfloat16");
  auto xc = x.contiguous();
  auto gc = g == nullptr ? at::Tensor() : g->contiguous();
  TORCH_CHECK(g == nullptr || (gc.scalar_type() == x.scalar_type() && gc.sizes() == x.sizes()),
              "gelu_tanh_backward: the gradient must have x's shape and dtype");
  auto y = at::empty_like(xc);
  const int64_t n = xc.numel();
  auto run = [&](auto* out) {
    using T = std::remove_pointer_t<decltype(out)>;
    const T* xp = xc.data_ptr<T>();
    const T* gp = g == nullptr ? nullptr : gc.data_ptr<T>();
    at::parallel_for(0, n, 1 << 14, [&](int64_t i0, int64_t i1) {
      gelu_tanh_span(xp + i0, gp == nullptr ? nullptr : gp + i0, out + i0, i1 - i0);
    });
  };
  if (x.scalar_type() == at::kFloat) {
    run(y.data_ptr<float>());
  } else {
    run(y.data_ptr<at::BFloat16>());
  }
  return y;
}
at::Tensor gelu_tanh(const at::Tensor& x) { return gelu_tanh_apply(x, nullptr); }
at::Tensor gelu_tanh_backward(const at::Tensor& g, const at::Tensor& x) { return gelu_tanh_apply(x, &g); }

// out[c, r] = x[r, c] for a 2-D x whose rows are contiguous, cast to out's dtype (fp32 or bf16, to nearest even),
// 16 x 16 tiles transposed in registers (interleave 32-bit, then 64-bit pairs, then 128-bit lanes). PyTorch's
// strided copy (x.t().contiguous()) moved ~2.5 GB/s here; training uses this for operands of oneDNN's products
// laid out the way its AMX kernel runs fastest (gptlab/layers.py).
template <class S, class D>
GPTLAB_AVX512 static void transpose_strip(const S* x, int64_t ld, D* out, int64_t R, int64_t c0, int64_t cn,
                                          int64_t ra, int64_t rb) {  // rows [ra, rb) of columns [c0, c0 + cn)
  __m512 r[16], t[16];
  int64_t r0 = ra;
  if (cn == 16) {
    for (; r0 + 16 <= rb; r0 += 16) {
      for (int i = 0; i < 16; ++i) r[i] = load16(x + (r0 + i) * ld + c0);
      for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
      }
      for (int j = 0; j < 4; ++j) {
        const __m512d a = _mm512_castps_pd(t[4 * j]), b = _mm512_castps_pd(t[4 * j + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * j + 2]), d = _mm512_castps_pd(t[4 * j + 3]);
        r[4 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * j + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * j + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
      }
      // r[4 j + m], 128-bit lane k: rows 4j..4j+3 of column 4k + m
      for (int m = 0; m < 4; ++m) {
        const __m512 v = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88), w = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xDD);
        const __m512 v2 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
        const __m512 w2 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xDD);
        store16(out + (c0 + m) * R + r0, _mm512_shuffle_f32x4(v, v2, 0x88));
        store16(out + (c0 + 4 + m) * R + r0, _mm512_shuffle_f32x4(w, w2, 0x88));
        store16(out + (c0 + 8 + m) * R + r0, _mm512_shuffle_f32x4(v, v2, 0xDD));
        store16(out + (c0 + 12 + m) * R + r0, _mm512_shuffle_f32x4(w, w2, 0xDD));
      }
    }
  }
  for (int64_t c = c0; c < c0 + cn; ++c) {  // the edges
    for (int64_t i = r0; i < rb; ++i) out[c * R + i] = static_cast<D>(static_cast<float>(x[i * ld + c]));
  }
}

at::Tensor transpose_to(const at::Tensor& x, at::ScalarType dtype) {
  TORCH_CHECK(cpu_isa() >= kAvx512, "transpose_to: needs AVX-512");
  TORCH_CHECK(x.dim() == 2 && (x.size(1) <= 1 || x.stride(1) == 1), "transpose_to: a 2-D tensor with contiguous rows");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "transpose_to: float32 or bfloat16");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "transpose_to: to float32 or bfloat16");
  const int64_t R = x.size(0), C = x.size(1), ld = x.size(0) > 1 ? x.stride(0) : C;
  auto out = at::empty({C, R}, x.options().dtype(dtype));
  auto run = [&](const auto* src, auto* dst) {
    // blocks of kRows input rows (read once, in cache) by every column; each block writes kRows values to each row
    // of out
    constexpr int64_t kRows = 32;
    at::parallel_for(0, (R + kRows - 1) / kRows, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t ra = b * kRows, rb = std::min(R, ra + kRows);
        for (int64_t c = 0; c < C; c += 16) transpose_strip(src, ld, dst, R, c, std::min<int64_t>(16, C - c), ra, rb);
      }
    });
  };
  const bool f32_in = x.scalar_type() == at::kFloat, f32_out = dtype == at::kFloat;
  if (f32_in && f32_out) run(x.data_ptr<float>(), out.data_ptr<float>());
  if (f32_in && !f32_out) run(x.data_ptr<float>(), out.data_ptr<at::BFloat16>());
  if (!f32_in && f32_out) run(x.data_ptr<at::BFloat16>(), out.data_ptr<float>());
  if (!f32_in && !f32_out) run(x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
  return out;
}

// ---- Causal self-attention in training (gptlab/layers.py, CausalAttention), bf16, head size 64, sequence length a
// multiple of 64: one head at a time per thread, its whole [T, T] scores in the thread's L2, every product by
// oneDNN's batch-reduce GEMM micro-kernel (at::native::cpublas::brgemm: bf16 operands, fp32 results; AMX), the
// softmax and its gradient by the row loops below. The arithmetic of FlashAttention-2 (Dao 2023): the forward keeps
// each row's log-sum-exp, the backward recomputes the probabilities from it; PyTorch's CPU flash attention runs the
// same arithmetic block by block with oneDNN's general GEMM per block, its backward 12 ms a layer
// for GPT-2 at B=4, T=256 on the AMX Xeon of docs/benchmarks.md. Blocks of 64 keys and queries above the diagonal
// are skipped in every product.
namespace cpublas = at::native::cpublas;
constexpr int64_t kAttnBlock = 64;  // keys and queries per block; the head size; oneDNN's packed B is 64 wide

// the first n (< 16) lanes
GPTLAB_AVX512 static inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }

// y (T bf16) = v (the first n fp32 values, n <= T), then zeros: 16 at a time, the last partial vector one by one
GPTLAB_AVX512 static inline void store_row(at::BFloat16* y, const float* v, int64_t n, int64_t T) {
  const int64_t n16 = n / 16 * 16;
  for (int64_t j = 0; j < n16; j += 16) store16(y + j, _mm512_loadu_ps(v + j));
  for (int64_t j = n16; j < n; ++j) y[j] = at::BFloat16(v[j]);  // (to nearest even, as store16)
  std::fill(y + n, y + T, at::BFloat16(0.f));
}

// One row's softmax of scale * s over its first n scores (s overwritten with the probabilities), returning the
// log-sum-exp: the maximum first, then one exp a score (exp16).
GPTLAB_AVX512 static float softmax_row(float* s, int64_t n, float scale) {
  const int64_t n16 = n / 16 * 16;
  const __mmask16 tail = first_lanes(n - n16);
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n16; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + j));
  if (tail) vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(vmax, tail, s + n16));
  const float m = _mm512_reduce_max_ps(vmax) * scale;  // (scale > 0)
  const __m512 vs = _mm512_set1_ps(scale), vm = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n16; j += 16) {
    const __m512 e = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vs, vm));
    _mm512_storeu_ps(s + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (tail) {
    const __m512 e = _mm512_maskz_mov_ps(tail, exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(tail, s + n16), vs, vm)));
    _mm512_mask_storeu_ps(s + n16, tail, e);
    sum = _mm512_add_ps(sum, e);
  }
  const float total = _mm512_reduce_add_ps(sum);
  const __m512 inv = _mm512_set1_ps(1.f / total);
  for (int64_t j = 0; j < n16; j += 16) _mm512_storeu_ps(s + j, _mm512_mul_ps(_mm512_loadu_ps(s + j), inv));
  if (tail) _mm512_mask_storeu_ps(s + n16, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, s + n16), inv));
  return m + std::log(total);
}

// One row of the backward pass over its first n columns: P = exp(scale * s - lse) into s, dS = scale * P * (dp -
// sum_d dO O) into dp (fp32), then both stored as bf16 rows of T.
GPTLAB_AVX512 static void softmax_backward_row(float* s, float* dp, int64_t n, int64_t T, float scale, float lse,
                                               const at::BFloat16* o, const at::BFloat16* g, at::BFloat16* p_out,
                                               at::BFloat16* ds_out) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < kAttnBlock; d += 16) acc = _mm512_fmadd_ps(load16(g + d), load16(o + d), acc);
  const __m512 vs = _mm512_set1_ps(scale), vl = _mm512_set1_ps(lse), vd = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
  const int64_t n16 = n / 16 * 16;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = j < n16 ? static_cast<__mmask16>(0xFFFF) : first_lanes(n - n16);
    const __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, s + j), vs, vl)));
    const __m512 d = _mm512_mul_ps(_mm512_mul_ps(e, vs), _mm512_sub_ps(_mm512_maskz_loadu_ps(k, dp + j), vd));
    _mm512_mask_storeu_ps(s + j, k, e);
    _mm512_mask_storeu_ps(dp + j, k, d);
  }
  store_row(p_out, s, n, T);
  store_row(ds_out, dp, n, T);
}

// out[c * ldo + r] = x[r * ld + c] for rows x cols bf16 values
GPTLAB_AVX512 static void transpose_bf16(const at::BFloat16* x, int64_t ld, int64_t rows, int64_t cols,
                                         at::BFloat16* out, int64_t ldo) {
  for (int64_t c0 = 0; c0 < cols; c0 += 16) transpose_strip(x, ld, out, ldo, c0, std::min<int64_t>(16, cols - c0), 0, rows);
}

// oneDNN's packed form of a [K, 64] bf16 B operand whose rows are ld apart (pack reads rows 64 apart: copied first)
static void pack_rows(const at::BFloat16* x, int64_t ld, int64_t K, at::BFloat16* tmp, at::BFloat16* out) {
  for (int64_t k = 0; k < K; ++k) std::copy(x + k * ld, x + k * ld + kAttnBlock, tmp + k * kAttnBlock);
  cpublas::pack(K, kAttnBlock, kAttnBlock, kAttnBlock, at::kBFloat16, at::kBFloat16, tmp, out);
}

// the packed B operand x^T for x [T, 64] (rows ld apart), one [64, 64] block of columns after another
static void pack_transposed(const at::BFloat16* x, int64_t ld, int64_t T, at::BFloat16* tmp, at::BFloat16* out) {
  for (int64_t c = 0; c < T; c += kAttnBlock) {
    transpose_bf16(x + c * ld, ld, kAttnBlock, kAttnBlock, tmp, kAttnBlock);
    cpublas::pack(kAttnBlock, kAttnBlock, kAttnBlock, kAttnBlock, at::kBFloat16, at::kBFloat16, tmp, out + c * kAttnBlock);
  }
}

// C [T, T] fp32 = A [T, 64] (rows lda apart) B^T, B given packed-transposed (pack_transposed), on and below the
// diagonal blocks only
static void scores(const at::BFloat16* a, int64_t lda, const at::BFloat16* bt, int64_t T, float* c) {
  for (int64_t j = 0; j < T; j += kAttnBlock)
    cpublas::brgemm(T - j, kAttnBlock, kAttnBlock, lda, kAttnBlock, T, false, a + j * lda, bt + j * kAttnBlock,
                    c + j * T + j);
}

// C [T, 64] fp32 = A [T, T] (bf16, zero above the diagonal) B, B [T, 64] packed (pack_rows): block row i of A
// against rows [0, i + 64) of B (lower), or A's transpose-like rows [i, T) against rows [i, T) (upper: A = P^T)
static void lower_times(const at::BFloat16* a, const at::BFloat16* b, int64_t T, float* c) {
  for (int64_t i = 0; i < T; i += kAttnBlock)
    cpublas::brgemm(kAttnBlock, kAttnBlock, i + kAttnBlock, T, kAttnBlock, kAttnBlock, false, a + i * T, b,
                    c + i * kAttnBlock);
}
static void upper_times(const at::BFloat16* a, const at::BFloat16* b, int64_t T, float* c) {
  for (int64_t i = 0; i < T; i += kAttnBlock)
    cpublas::brgemm(kAttnBlock, kAttnBlock, T - i, T, kAttnBlock, kAttnBlock, false, a + i * T + i,
                    b + i * kAttnBlock, c + i * kAttnBlock);
}

// rows [T, 64] fp32 -> bf16 rows ld apart
GPTLAB_AVX512 static void store_rows(const float* x, int64_t T, at::BFloat16* y, int64_t ld) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t d = 0; d < kAttnBlock; d += 16) store16(y + t * ld + d, _mm512_loadu_ps(x + t * kAttnBlock + d));
}

// q, k, v [B, H, T, 64] bf16 (rows of 64 contiguous; any other strides), the head's element (b, h) at
// b * stride(0) + h * stride(1)
static const at::BFloat16* head(const at::Tensor& x, int64_t b, int64_t h) {
  return x.const_data_ptr<at::BFloat16>() + b * x.stride(0) + h * x.stride(1);
}

// Whether the kernels below run here (kernels.py asks before it calls them)
static bool causal_attention_runs() { return cpu_isa() >= kAvx512 && cpublas::could_pack(at::kBFloat16); }

static void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(causal_attention_runs(),
              "causal_attention: needs AVX-512 and oneDNN's packed bf16 GEMM (AMX)");
  TORCH_CHECK(q.dim() == 4 && q.sizes() == k.sizes() && q.sizes() == v.sizes() && q.size(3) == kAttnBlock &&
              q.size(2) % kAttnBlock == 0, "causal_attention: q, k, v [B, H, T, 64], T a multiple of 64");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->stride(3) == 1, "causal_attention: bf16, head dim contiguous");
}

// Forward: out [B, T, H, 64] bf16 (its [B, H, T, 64] view is the attention) and lse [B, H, T] fp32.
std::tuple<at::Tensor, at::Tensor> causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    double scale) {
  check_attention(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = kAttnBlock;
  auto out = at::empty({B, T, H, D}, q.options());
  auto lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  at::parallel_for(0, B * H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> s(T * T), o(T * D);
    std::vector<at::BFloat16> p(T * T), kt(T * D), vp(T * D), tmp(T * D);
    for (int64_t bh = h0; bh < h1; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      pack_transposed(head(k, b, h), k.stride(2), T, tmp.data(), kt.data());
      pack_rows(head(v, b, h), v.stride(2), T, tmp.data(), vp.data());
      scores(head(q, b, h), q.stride(2), kt.data(), T, s.data());
      float* l = lse.data_ptr<float>() + bh * T;
      for (int64_t i = 0; i < T; ++i) {
        l[i] = softmax_row(s.data() + i * T, i + 1, static_cast<float>(scale));
        store_row(p.data() + i * T, s.data() + i * T, i + 1, T);
      }
      lower_times(p.data(), vp.data(), T, o.data());
      store_rows(o.data(), T, out.data_ptr<at::BFloat16>() + (b * T * H + h) * D, H * D);
    }
    cpublas::brgemm_release();
  });
  return {out, lse};
}

// Backward: dq, dk, dv, each [B, T, H, 64] bf16, from the inputs, the forward's output (out, [B, T, H, 64]) and lse,
// and the output's gradient g ([B, H, T, 64], rows contiguous).
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(const at::Tensor& g, const at::Tensor& q,
                                                                         const at::Tensor& k, const at::Tensor& v,
                                                                         const at::Tensor& out,
                                                                         const at::Tensor& lse, double scale) {
  check_attention(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = kAttnBlock;
  TORCH_CHECK(g.sizes() == q.sizes() && g.scalar_type() == at::kBFloat16 && g.stride(3) == 1,
              "causal_attention_backward: the gradient must be bf16 [B, H, T, 64], head dim contiguous");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == at::IntArrayRef({B, T, H, D}) && lse.is_contiguous(),
              "causal_attention_backward: the forward's out [B, T, H, 64] and lse");
  auto dq = at::empty({B, T, H, D}, q.options()), dk = at::empty_like(dq), dv = at::empty_like(dq);
  at::parallel_for(0, B * H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> s(T * T), dp(T * T), acc(T * D);
    std::vector<at::BFloat16> p(T * T), ds(T * T), tr(T * T), kt(T * D), vt(T * D), kp(T * D), qp(T * D), gp(T * D),
        tmp(T * D);
    for (int64_t bh = h0; bh < h1; ++bh) {
      const int64_t b = bh / H, h = bh % H, row = H * D, at = (b * T * H + h) * D;
      const at::BFloat16 *qh = head(q, b, h), *kh = head(k, b, h), *vh = head(v, b, h), *gh = head(g, b, h);
      pack_transposed(kh, k.stride(2), T, tmp.data(), kt.data());
      pack_transposed(vh, v.stride(2), T, tmp.data(), vt.data());
      pack_rows(kh, k.stride(2), T, tmp.data(), kp.data());
      pack_rows(qh, q.stride(2), T, tmp.data(), qp.data());
      pack_rows(gh, g.stride(2), T, tmp.data(), gp.data());
      scores(qh, q.stride(2), kt.data(), T, s.data());
      scores(gh, g.stride(2), vt.data(), T, dp.data());
      const float* l = lse.const_data_ptr<float>() + bh * T;
      const at::BFloat16* o = out.const_data_ptr<at::BFloat16>() + at;
      for (int64_t i = 0; i < T; ++i)
        softmax_backward_row(s.data() + i * T, dp.data() + i * T, i + 1, T, static_cast<float>(scale), l[i],
                             o + i * row, gh + i * g.stride(2), p.data() + i * T, ds.data() + i * T);
      lower_times(ds.data(), kp.data(), T, acc.data());  // dQ = dS K
      store_rows(acc.data(), T, dq.data_ptr<at::BFloat16>() + at, row);
      transpose_bf16(ds.data(), T, T, T, tr.data(), T);
      upper_times(tr.data(), qp.data(), T, acc.data());  // dK = dS^T Q
      store_rows(acc.data(), T, dk.data_ptr<at::BFloat16>() + at, row);
      transpose_bf16(p.data(), T, T, T, tr.data(), T);
      upper_times(tr.data(), gp.data(), T, acc.data());  // dV = P^T dO
      store_rows(acc.data(), T, dv.data_ptr<at::BFloat16>() + at, row);
    }
    cpublas::brgemm_release();
  });
  return {dq, dk, dv};
}

static int64_t isa() { return cpu_isa(); }  // for Python: which loops run here (kernels.py's isa())

TORCH_LIBRARY(gptlab, m) {
  m.def("isa() -> int", &isa);
  m.def("set_single_row_blocks(int int8_rows, int int4_rows, int f32_rows) -> ()", &set_single_row_blocks);
  m.def("single_row_blocks() -> int[]", &single_row_blocks);
  m.def("set_prefetch_l2(bool l2) -> ()", &set_prefetch_l2);
  m.def("prefetches_l2() -> bool", &prefetches_l2);
  m.def("int8_mm(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor w, Tensor scales, Tensor zeros, int group_size) -> Tensor");
  m.def("f32_mm(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
  m.def("softmax_xent_(Tensor(a!) logits, Tensor targets, int vocab_size, Tensor scale) -> Tensor");
  m.def("gelu_tanh(Tensor x) -> Tensor");
  m.def("gelu_tanh_backward(Tensor grad, Tensor x) -> Tensor");
  m.def("transpose_to(Tensor x, ScalarType dtype) -> Tensor");
  m.def("causal_attention_runs() -> bool", &causal_attention_runs);
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("causal_attention_backward(Tensor g, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(gptlab, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
  m.impl("f32_mm", &f32_mm);
  m.impl("decode_attention", &decode_attention);
  m.impl("softmax_xent_", &softmax_xent_);
  m.impl("gelu_tanh", &gelu_tanh);
  m.impl("gelu_tanh_backward", &gelu_tanh_backward);
  m.impl("transpose_to", &transpose_to);
  m.impl("causal_attention", &causal_attention);
  m.impl("causal_attention_backward", &causal_attention_backward);
}
