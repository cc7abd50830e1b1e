// What cpu_matvec.cpp (the ops, the AVX-512 and portable loops) and cpu_matvec_avx2.cpp
// (the AVX2 loops) share: the work's units, how x is prepared for each loop, and the AVX2
// loops' entry points. cpu_matvec.py builds the two together and rebuilds them when this
// header changes (its digest is one of the build's flags).
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace tinyskip_matvec {

constexpr int64_t kRows = 4;           // rows of W the AVX-512 loops multiply together (x loaded once
                                       // for them); every loop's unit of work between threads
constexpr int64_t kPrefetch = 4096;    // bytes ahead of each row (measured: 1 KiB 17, 4-9 KiB 23-28 GB/s)
constexpr int64_t kGrain = 16;         // blocks of kRows rows per thread, at least

// Columns summed in int32 before moving to int64: 512 products of |q| <= 32767 and
// |w| <= 127 stay below 2^31.
constexpr int64_t kChunk = 512;

// Rows of x go kGroup at a time, the rest in one group of fewer (a verify of k + 1
// positions): x stays in L1, and each row of W is read and widened once per group.
constexpr int64_t kGroup = 4;

// bf16 on AVX2, which has no bf16 arithmetic: a 256-bit load of 16 weights holds 8 pairs
// (32-bit lanes, the first weight in the low half), which widen16 widens to fp32. x is split
// to match once per call, each 16 columns as their 8 even then 8 odd entries in fp32. One
// row of W at a time, as the AVX2 int8 loop.
struct PairedRows {
  std::vector<float> v;         // (M, Kv): x's first Kv columns, paired as above
  int64_t Kv;                   // K less its columns past the last whole 16
};

// int8 products take x rounded to int16, one scale per row of x: integer products then
// need no widening to fp32, and vpmaddwd multiplies 32 weights by x and adds them in
// pairs in one instruction. The rounding moves an entry by at most 1/65534 of its row's
// largest entry: 1/128 of bf16's own rounding for entries near the largest, more for
// entries far below it (an outlier row).
struct Int16Rows {
  std::vector<int16_t> q;       // (M, Kp), zero past K
  std::vector<float> scale;     // (M,)
  int64_t Kp;                   // K rounded up to whole vectors of 32
};

// One entry of x rounded to int16 at ``inv`` per unit, ties to even: |x * inv| <= 32767
// (to the last bit of inv's rounding), clamped there.
inline int16_t round16(float v, float inv) {
  return static_cast<int16_t>(std::clamp(std::nearbyint(v * inv), -32767.f, 32767.f));
}

// The largest |entry| of a row of x (K entries), and whether every entry is finite.
template <typename T>
float row_amax(const T* x, int64_t K, bool& finite) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float v = static_cast<float>(x[k]);
    finite = finite && std::isfinite(v);
    amax = std::max(amax, std::abs(v));
  }
  return amax;
}

// An int8 product's output: its exact integer sum times the scales of x's row and W's.
template <typename T>
inline T scaled(int64_t total, float x_scale, T w_scale) {
  return T(static_cast<float>(total) * x_scale * static_cast<float>(w_scale));
}

// The AVX2 loops (cpu_matvec_avx2.cpp): blocks [b0, b1) of kRows rows of W (N, K) against
// the M rows of x, and the rounding of one row of x to int16 as round16 and row_amax do it.
__attribute__((target("avx2,fma")))
void bf16_blocks_avx2(const at::BFloat16* W, const PairedRows& XP, const at::BFloat16* X,
                      at::BFloat16* Y, int64_t M, int64_t N, int64_t K, int64_t b0, int64_t b1);
template <typename T>
__attribute__((target("avx2")))
void int8_blocks_avx2(const int8_t* W, const Int16Rows& X, const T* S, T* Y,
                      int64_t M, int64_t N, int64_t K, int64_t b0, int64_t b1);
template <typename T>
__attribute__((target("avx2")))
float row_amax_avx2(const T* x, int64_t K, bool& finite);
template <typename T>
__attribute__((target("avx2")))
void round_row_avx2(const T* x, int64_t K, float inv, int16_t* q);

}  // namespace tinyskip_matvec
