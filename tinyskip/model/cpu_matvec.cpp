// One-row products of a decoding step on x86 CPUs: y (M, N) = x (M, K) @ W (N, K).T for a
// few rows of x (one per sequence), with W in bf16, or in int8 with one scale per row.
//
// A decoding step is bound by reading W. Inductor's generated loop for these products
// converts every bf16 or int8 weight to fp32 lane by lane: on a 1M x 576 weight it read
// 12.6-14.1 GB/s (bf16) and 10.2-12.7 GB/s (int8) where torch.sum of 1 GiB read 21.7-22.6.
// These loops multiply bf16 pairs in one instruction (AVX512-BF16's vdpbf16ps), multiply
// int8 weights by x rounded to int16 in integers (vpmaddwd), and prefetch each row 4 KiB
// ahead (the bf16 loop without the prefetch: 15 GB/s).
//
// On CPUs without AVX-512 (AMD's Zen 3, older Intel) AVX2 loops (cpu_matvec_avx2.cpp) do
// the work 256 bits at a time, one row of W at a time: int8 through vpmaddwd as above (inductor's loop there read
// 3 GB/s of int8 weights), bf16 widened to fp32 by a shift and a mask, then FMA.
// Each product also has a portable loop. The CPU's features decide at run time which
// loop runs (a CPU without them would stop at the first instruction it lacks otherwise);
// ``loop="avx2"`` and the others ask for one, which the tests use to hold every loop this
// CPU runs against the portable one.

#include "cpu_matvec.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace tinyskip_matvec {

bool has_avx512_bf16() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16");
  return yes;
}

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}

bool has_avx2_fma() {
  static const bool yes = has_avx2() && __builtin_cpu_supports("fma");
  return yes;
}

enum class Loop { kPortable, kAvx2, kAvx512 };

// The loops this CPU runs, fastest first, of those a product has.
std::vector<std::string> loops_for(bool avx512, bool avx2) {
  std::vector<std::string> out;
  if (avx512) out.push_back("avx512");
  if (avx2) out.push_back("avx2");
  out.push_back("portable");
  return out;
}

// ``asked``: "best" or one of the loops ``available`` names (this product's, on this CPU).
Loop choose(c10::string_view loop, const std::vector<std::string>& available) {
  const std::string asked(loop), name = asked == "best" ? available.front() : asked;
  TORCH_CHECK(std::find(available.begin(), available.end(), name) != available.end(),
              "cpu_matvec: loop='", asked, "' is not one this product has on this CPU (",
              c10::Join(", ", available), ", best)");
  return name == "avx512" ? Loop::kAvx512 : name == "avx2" ? Loop::kAvx2 : Loop::kPortable;
}

// Blocks [b0, b1) of kRows rows of W (N, K) against the M rows of x.
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void bf16_blocks_avx512(const at::BFloat16* W, const at::BFloat16* X, at::BFloat16* Y,
                        int64_t M, int64_t N, int64_t K, int64_t b0, int64_t b1) {
  const int64_t Kv = K - K % 32;                    // whole vectors of 32 bf16
  const __mmask32 tail = static_cast<__mmask32>((1ull << (K % 32)) - 1);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t o0 = b * kRows, rows = std::min(kRows, N - o0);
    const at::BFloat16* w[kRows];
    for (int r = 0; r < kRows; ++r) w[r] = W + (o0 + std::min<int64_t>(r, rows - 1)) * K;
    for (int64_t m = 0; m < M; ++m) {
      const at::BFloat16* x = X + m * K;
      __m512 acc[kRows];
      for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t k = 0; k < Kv; k += 32) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
        for (int r = 0; r < kRows; ++r) {
          if (m == 0) _mm_prefetch(reinterpret_cast<const char*>(w[r] + k) + kPrefetch, _MM_HINT_T0);
          acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w[r] + k), xv);
        }
      }
      if (tail) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + Kv);
        for (int r = 0; r < kRows; ++r)
          acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(tail, w[r] + Kv), xv);
      }
      for (int r = 0; r < rows; ++r) Y[m * N + o0 + r] = at::BFloat16(_mm512_reduce_add_ps(acc[r]));
    }
  }
}

PairedRows paired(const at::BFloat16* X, int64_t M, int64_t K) {
  const int64_t Kv = K - K % 16;
  PairedRows rows{std::vector<float>(M * Kv), Kv};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < Kv; k += 16)
      for (int j = 0; j < 8; ++j) {
        rows.v[m * Kv + k + j] = static_cast<float>(X[m * K + k + 2 * j]);
        rows.v[m * Kv + k + 8 + j] = static_cast<float>(X[m * K + k + 2 * j + 1]);
      }
  return rows;
}

// ``avx2``: the vector loops' rounding (the portable loop keeps the scalar one).
template <typename T>
Int16Rows to_int16(const T* X, int64_t M, int64_t K, bool avx2) {
  Int16Rows rows{std::vector<int16_t>(M * ((K + 31) / 32 * 32), 0), std::vector<float>(M), (K + 31) / 32 * 32};
  for (int64_t m = 0; m < M; ++m) {
    const T* x = X + m * K;
    int16_t* q = rows.q.data() + m * rows.Kp;
    bool finite = true;
    const float amax = avx2 ? row_amax_avx2(x, K, finite) : row_amax(x, K, finite);
    const float s = amax > 0.f ? amax / 32767.f : 1.f, inv = 1.f / s;
    // A NaN or infinite entry makes the row's outputs NaN, as a float product would.
    rows.scale[m] = finite ? s : std::numeric_limits<float>::quiet_NaN();
    if (!finite) continue;
    if (avx2) round_row_avx2(x, K, inv, q);
    else for (int64_t k = 0; k < K; ++k) q[k] = round16(static_cast<float>(x[k]), inv);
  }
  return rows;
}

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void int8_blocks_avx512(const int8_t* W, const Int16Rows& X, const T* S, T* Y,
                        int64_t M, int64_t N, int64_t K, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t o0 = b * kRows, rows = std::min(kRows, N - o0);
    const int8_t* w[kRows];
    for (int r = 0; r < kRows; ++r) w[r] = W + (o0 + std::min<int64_t>(r, rows - 1)) * K;
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* x = X.q.data() + m * X.Kp;
      int64_t total[kRows] = {0, 0, 0, 0};
      for (int64_t c0 = 0; c0 < K; c0 += kChunk) {
        const int64_t c1 = std::min(K, c0 + kChunk);
        __m512i acc[kRows];
        for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_si512();
        for (int64_t k = c0; k < c1; k += 32) {
          const __m512i xv = _mm512_loadu_si512(x + k);    // x is zero past K
          const __mmask32 keep = c1 - k >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << (c1 - k)) - 1);
          for (int r = 0; r < kRows; ++r) {
            if (m == 0 && k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(w[r] + k) + kPrefetch, _MM_HINT_T0);
            const __m512i wv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(keep, w[r] + k));
            acc[r] = _mm512_add_epi32(acc[r], _mm512_madd_epi16(wv, xv));
          }
        }
        for (int r = 0; r < kRows; ++r) total[r] += _mm512_reduce_add_epi32(acc[r]);
      }
      for (int r = 0; r < rows; ++r)
        Y[m * N + o0 + r] = scaled(total[r], X.scale[m], S[o0 + r]);
    }
  }
}

// The same products, portable: for CPUs without the vector loops (and to test them against).
void bf16_blocks_portable(const at::BFloat16* W, const at::BFloat16* X, at::BFloat16* Y,
                          int64_t M, int64_t N, int64_t K, int64_t b0, int64_t b1) {
  for (int64_t o = b0 * kRows; o < std::min(N, b1 * kRows); ++o)
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += static_cast<float>(X[m * K + k]) * static_cast<float>(W[o * K + k]);
      Y[m * N + o] = at::BFloat16(s);
    }
}

template <typename T>
void int8_blocks_portable(const int8_t* W, const Int16Rows& X, const T* S, T* Y,
                          int64_t M, int64_t N, int64_t K, int64_t b0, int64_t b1) {
  for (int64_t o = b0 * kRows; o < std::min(N, b1 * kRows); ++o)
    for (int64_t m = 0; m < M; ++m) {
      int64_t total = 0;
      for (int64_t k = 0; k < K; ++k) total += int64_t(X.q[m * X.Kp + k]) * W[o * K + k];
      Y[m * N + o] = scaled(total, X.scale[m], S[o]);
    }
}

void check(const at::Tensor& x, const at::Tensor& w, at::ScalarType wtype) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "cpu_matvec: CPU tensors only");
  TORCH_CHECK(w.scalar_type() == wtype && w.dim() == 2 && w.is_contiguous(),
              "cpu_matvec: W must be a contiguous (N, K) matrix of ", wtype);
  TORCH_CHECK(x.size(-1) == w.size(1), "cpu_matvec: x has ", x.size(-1), " columns, W ", w.size(1));
  TORCH_CHECK(w.size(1) > 0, "cpu_matvec: W has no columns");
}

at::Tensor output(const at::Tensor& x, int64_t N, at::ScalarType dtype) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return at::empty(sizes, x.options().dtype(dtype));
}

// Built once: every call chooses its loop from these.
const std::vector<std::string>& bf16_loops() {
  static const std::vector<std::string> loops = loops_for(has_avx512_bf16(), has_avx2_fma());
  return loops;
}
const std::vector<std::string>& int8_loops() {
  static const std::vector<std::string> loops = loops_for(has_avx512(), has_avx2());
  return loops;
}

// y (..., N) = x (..., K) @ w (N, K).T, all bf16.
at::Tensor matvec_bf16(const at::Tensor& x, const at::Tensor& w, c10::string_view loop) {
  check(x, w, at::kBFloat16);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "cpu_matvec: x must be bf16 for bf16 weights");
  const Loop chosen = choose(loop, bf16_loops());
  const auto xc = x.contiguous();
  const int64_t N = w.size(0), K = w.size(1), M = xc.numel() / K;
  auto y = output(xc, N, at::kBFloat16);
  const auto *W = w.const_data_ptr<at::BFloat16>(), *X = xc.const_data_ptr<at::BFloat16>();
  auto* Y = y.mutable_data_ptr<at::BFloat16>();
  const PairedRows XP = chosen == Loop::kAvx2 ? paired(X, M, K) : PairedRows{};
  at::parallel_for(0, (N + kRows - 1) / kRows, kGrain, [&](int64_t b0, int64_t b1) {
    if (chosen == Loop::kAvx512) bf16_blocks_avx512(W, X, Y, M, N, K, b0, b1);
    else if (chosen == Loop::kAvx2) bf16_blocks_avx2(W, XP, X, Y, M, N, K, b0, b1);
    else bf16_blocks_portable(W, X, Y, M, N, K, b0, b1);
  });
  return y;
}

template <typename T>
void int8_matvec_into(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                      at::Tensor& y, Loop chosen) {
  const int64_t N = w.size(0), K = w.size(1), M = x.numel() / K;
  // Rounded once per call (M * K entries), in plain vectors: ATen's ops would cost more
  // than the product of a small projection.
  const Int16Rows X = to_int16(x.const_data_ptr<T>(), M, K, chosen != Loop::kPortable);
  const auto* W = w.const_data_ptr<int8_t>();
  const T* S = scale.const_data_ptr<T>();
  T* Y = y.mutable_data_ptr<T>();
  at::parallel_for(0, (N + kRows - 1) / kRows, kGrain, [&](int64_t b0, int64_t b1) {
    if (chosen == Loop::kAvx512) int8_blocks_avx512<T>(W, X, S, Y, M, N, K, b0, b1);
    else if (chosen == Loop::kAvx2) int8_blocks_avx2<T>(W, X, S, Y, M, N, K, b0, b1);
    else int8_blocks_portable<T>(W, X, S, Y, M, N, K, b0, b1);
  });
}

// y (..., N) = (x (..., K) @ w (N, K).T) * scale (N,), w int8; x, scale and y in one dtype
// (fp32 or bf16).
at::Tensor matvec_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       c10::string_view loop) {
  check(x, w, at::kChar);
  TORCH_CHECK(scale.numel() == w.size(0) && scale.is_contiguous() && scale.scalar_type() == x.scalar_type(),
              "cpu_matvec: the scales must be (N,) contiguous, in x's dtype");
  const auto xc = x.contiguous();
  auto y = output(xc, w.size(0), x.scalar_type());
  const Loop chosen = choose(loop, int8_loops());
  if (x.scalar_type() == at::kBFloat16) int8_matvec_into<at::BFloat16>(xc, w, scale, y, chosen);
  else if (x.scalar_type() == at::kFloat) int8_matvec_into<float>(xc, w, scale, y, chosen);
  else TORCH_CHECK(false, "cpu_matvec: int8 products take fp32 or bf16 activations");
  return y;
}

// The loops this CPU runs, fastest first: (bf16's, int8's).
std::tuple<std::vector<std::string>, std::vector<std::string>> loops() { return {bf16_loops(), int8_loops()}; }

}  // namespace tinyskip_matvec

using namespace tinyskip_matvec;

TORCH_LIBRARY(tinyskip, m) {
  m.def("matvec_bf16(Tensor x, Tensor w, str loop='best') -> Tensor");
  m.def("matvec_int8(Tensor x, Tensor w, Tensor scale, str loop='best') -> Tensor");
  m.def("loops() -> (str[], str[])", &loops);
}

TORCH_LIBRARY_IMPL(tinyskip, CPU, m) {
  m.impl("matvec_bf16", &matvec_bf16);
  m.impl("matvec_int8", &matvec_int8);
}
