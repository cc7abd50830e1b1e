// The AVX2 loops of cpu_matvec.cpp, for CPUs without AVX-512 (AMD's Zen 3, older Intel):
// 256 bits at a time, one row of W at a time, each row widened once for up to kGroup rows
// of x. int8 through vpmaddwd against x rounded to int16 (inductor's loop there read 3 GB/s
// of int8 weights), bf16 widened to fp32 by a shift and a mask, then FMA.

#include "cpu_matvec.h"

#include <utility>

namespace tinyskip_matvec {

__attribute__((target("avx2")))
inline int32_t sum8(__m256i v) {
  const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i t = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 1)));
}

// 16 int8 weights widened to int16, and their products with 16 int16 entries of x added
// in pairs: 8 int32 sums.
__attribute__((target("avx2")))
inline __m256i widen16(const int8_t* w) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
}

__attribute__((target("avx2")))
inline __m256i product16(__m256i w, const int16_t* x) {
  return _mm256_madd_epi16(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}

// The sum of 8 fp32 lanes.
__attribute__((target("avx2")))
inline float sum8f(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 16 bf16 weights (8 pairs, 32-bit lanes) widened to fp32: the shift makes each pair's
// first weight an fp32 (to meet x's 8 even entries), the mask its second (the odd ones).
using Pairs = std::pair<__m256, __m256>;

__attribute__((target("avx2")))
inline Pairs widen16(const at::BFloat16* w) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i second = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
          _mm256_castsi256_ps(_mm256_and_si256(v, second))};
}

// G rows of x against one row of W: each 32 columns of W are widened once for all G.
template <int G>
__attribute__((target("avx2,fma")))
void bf16_row_avx2(const at::BFloat16* w, const PairedRows& XP, const at::BFloat16* X,
                   at::BFloat16* Y, int64_t m0, int64_t o, int64_t N, int64_t K, bool fetch) {
  const int64_t Kv = XP.Kv;
  const float* x[G];
  for (int j = 0; j < G; ++j) x[j] = XP.v.data() + (m0 + j) * Kv;
  __m256 even[G], odd[G];
  for (int j = 0; j < G; ++j) even[j] = odd[j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= Kv; k += 32) {
    if (fetch) _mm_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetch, _MM_HINT_T0);
    const Pairs a = widen16(w + k), b = widen16(w + k + 16);
    for (int j = 0; j < G; ++j) {
      even[j] = _mm256_fmadd_ps(b.first, _mm256_loadu_ps(x[j] + k + 16),
                                _mm256_fmadd_ps(a.first, _mm256_loadu_ps(x[j] + k), even[j]));
      odd[j] = _mm256_fmadd_ps(b.second, _mm256_loadu_ps(x[j] + k + 24),
                               _mm256_fmadd_ps(a.second, _mm256_loadu_ps(x[j] + k + 8), odd[j]));
    }
  }
  if (k < Kv) {                                          // 16 columns left
    const Pairs a = widen16(w + k);
    for (int j = 0; j < G; ++j) {
      even[j] = _mm256_fmadd_ps(a.first, _mm256_loadu_ps(x[j] + k), even[j]);
      odd[j] = _mm256_fmadd_ps(a.second, _mm256_loadu_ps(x[j] + k + 8), odd[j]);
    }
  }
  for (int j = 0; j < G; ++j) {
    float total = sum8f(_mm256_add_ps(even[j], odd[j]));
    for (int64_t c = Kv; c < K; ++c)
      total += static_cast<float>(X[(m0 + j) * K + c]) * static_cast<float>(w[c]);
    Y[(m0 + j) * N + o] = at::BFloat16(total);
  }
}

__attribute__((target("avx2,fma")))
void bf16_blocks_avx2(const at::BFloat16* W, const PairedRows& XP, const at::BFloat16* X,
                      at::BFloat16* Y, int64_t M, int64_t N, int64_t K, int64_t b0, int64_t b1) {
  for (int64_t o = b0 * kRows; o < std::min(N, b1 * kRows); ++o) {
    const at::BFloat16* w = W + o * K;
    for (int64_t m0 = 0; m0 < M; m0 += kGroup) {
      const bool fetch = m0 == 0;
      switch (std::min(kGroup, M - m0)) {
        case 4: bf16_row_avx2<4>(w, XP, X, Y, m0, o, N, K, fetch); break;
        case 3: bf16_row_avx2<3>(w, XP, X, Y, m0, o, N, K, fetch); break;
        case 2: bf16_row_avx2<2>(w, XP, X, Y, m0, o, N, K, fetch); break;
        default: bf16_row_avx2<1>(w, XP, X, Y, m0, o, N, K, fetch);
      }
    }
  }
}

// As int8_blocks_avx512, but one row of W at a time, 32 columns a step. x (K int16) stays
// in L1 either way, and on Zen 3 a plain stream through W reads faster than four rows
// interleaved: 10.8-12.9 GB/s on one thread and 16.2-22.1 on two, against 7.8-9.4 and
// 9.7-16.0 (a sum of fp32 read 13.8-15.1 and 18.1-23.3; one 115 MB weight, the same
// runs). Each 16 weights are widened once for G rows of x (bf16_blocks_avx2's groups).
// The columns past the last whole 16 go one by one (a 16-byte load there would take the
// next row's weights, or read past the end of W on the last row: AVX2 has no masked byte
// load).
template <int G, typename T>
__attribute__((target("avx2")))
void int8_row_avx2(const int8_t* w, const Int16Rows& X, const T* S, T* Y, int64_t m0,
                   int64_t o, int64_t N, int64_t K, bool fetch) {
  const int64_t Kv = K - K % 16;
  const int16_t* x[G];
  for (int j = 0; j < G; ++j) x[j] = X.q.data() + (m0 + j) * X.Kp;
  int64_t total[G] = {};
  for (int64_t c0 = 0; c0 < Kv; c0 += kChunk) {
    const int64_t c1 = std::min(Kv, c0 + kChunk);       // a multiple of 32, or 16 short of one
    __m256i acc[G];
    for (int j = 0; j < G; ++j) acc[j] = _mm256_setzero_si256();
    int64_t k = c0;
    for (; k + 32 <= c1; k += 32) {
      if (fetch) _mm_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetch, _MM_HINT_T0);
      const __m256i a = widen16(w + k), b = widen16(w + k + 16);
      for (int j = 0; j < G; ++j)
        acc[j] = _mm256_add_epi32(acc[j], _mm256_add_epi32(product16(a, x[j] + k),
                                                           product16(b, x[j] + k + 16)));
    }
    if (k < c1) {
      const __m256i a = widen16(w + k);
      for (int j = 0; j < G; ++j) acc[j] = _mm256_add_epi32(acc[j], product16(a, x[j] + k));
    }
    for (int j = 0; j < G; ++j) total[j] += sum8(acc[j]);
  }
  for (int j = 0; j < G; ++j) {
    for (int64_t k = Kv; k < K; ++k) total[j] += int64_t(x[j][k]) * w[k];
    Y[(m0 + j) * N + o] = scaled(total[j], X.scale[m0 + j], S[o]);
  }
}

template <typename T>
__attribute__((target("avx2")))
void int8_blocks_avx2(const int8_t* W, const Int16Rows& X, const T* S, T* Y,
                      int64_t M, int64_t N, int64_t K, int64_t b0, int64_t b1) {
  for (int64_t o = b0 * kRows; o < std::min(N, b1 * kRows); ++o) {
    const int8_t* w = W + o * K;
    for (int64_t m0 = 0; m0 < M; m0 += kGroup) {
      const bool fetch = m0 == 0;
      switch (std::min(kGroup, M - m0)) {
        case 4: int8_row_avx2<4, T>(w, X, S, Y, m0, o, N, K, fetch); break;
        case 3: int8_row_avx2<3, T>(w, X, S, Y, m0, o, N, K, fetch); break;
        case 2: int8_row_avx2<2, T>(w, X, S, Y, m0, o, N, K, fetch); break;
        default: int8_row_avx2<1, T>(w, X, S, Y, m0, o, N, K, fetch);
      }
    }
  }
}

// x's entries widened to fp32, 8 at a time (bf16: the 16 bits moved to the top).
__attribute__((target("avx2")))
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }

__attribute__((target("avx2")))
inline __m256 load8(const at::BFloat16* x) {
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

// row_amax and round16 8 entries a step: the same maximum, the same fp32 product and the
// same rounding (to nearest, ties to even), so the same int16 rows. Scalar, they cost
// about 12 ns an entry: a third of a 576-column int8 product of one row on this AMD EPYC.
template <typename T>
__attribute__((target("avx2")))
float row_amax_avx2(const T* x, int64_t K, bool& finite) {
  const __m256 sign = _mm256_set1_ps(-0.f), zero = _mm256_setzero_ps();
  __m256 amax = zero, nan_if_not_finite = zero;          // infinity or NaN times 0 is NaN
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = load8(x + k);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
    nan_if_not_finite = _mm256_add_ps(nan_if_not_finite, _mm256_mul_ps(v, zero));
  }
  finite = finite && _mm256_movemask_ps(_mm256_cmp_ps(nan_if_not_finite, zero, _CMP_NEQ_UQ)) == 0;
  float lanes[8];
  _mm256_storeu_ps(lanes, amax);
  float out = *std::max_element(lanes, lanes + 8);
  return std::max(out, row_amax(x + k, K - k, finite));
}

template <typename T>
__attribute__((target("avx2")))
void round_row_avx2(const T* x, int64_t K, float inv, int16_t* q) {
  const __m256 f = _mm256_set1_ps(inv), hi = _mm256_set1_ps(32767.f), lo = _mm256_set1_ps(-32767.f);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(load8(x + k), f),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i i = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    // packs works within 128-bit halves: (i0-3, i0-3, i4-7, i4-7); 64-bit lanes 0 and 2 hold i0-7.
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(i, i), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm256_castsi256_si128(p));
  }
  for (; k < K; ++k) q[k] = round16(static_cast<float>(x[k]), inv);
}

template void int8_blocks_avx2<float>(const int8_t*, const Int16Rows&, const float*, float*,
                                      int64_t, int64_t, int64_t, int64_t, int64_t);
template void int8_blocks_avx2<at::BFloat16>(const int8_t*, const Int16Rows&, const at::BFloat16*,
                                             at::BFloat16*, int64_t, int64_t, int64_t, int64_t,
                                             int64_t);
template float row_amax_avx2<float>(const float*, int64_t, bool&);
template float row_amax_avx2<at::BFloat16>(const at::BFloat16*, int64_t, bool&);
template void round_row_avx2<float>(const float*, int64_t, float, int16_t*);
template void round_row_avx2<at::BFloat16>(const at::BFloat16*, int64_t, float, int16_t*);

}  // namespace tinyskip_matvec
