// Helpers shared by the CPU decode kernels: bf16 or float loads into float32 AVX-512 lanes
// and fixed-order dot products, so that every output is computed alone, in the same order
// whatever is computed beside it. Without AVX-512 the kernels are not built in (avx512()).
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#ifdef __AVX512F__
#include <immintrin.h>

namespace ds3dist {

constexpr int kMaxRows = 4;  // rows per expert weight pass (cpu_kernel.MAX_ROWS)

inline float round_bf16(float v) { return static_cast<float>(c10::BFloat16(v)); }

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16(const c10::BFloat16* p) {  // 16 bf16 -> float32, exact
  __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

// out[r] = w . x[r] for R rows x (float, row stride n) against one row w of length n.
template <int R, typename T>
inline void dot_rows(const T* w, const float* x, int64_t n, float* out) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < 4; ++u) acc[r][u] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 64 <= n; d += 64) {
    for (int u = 0; u < 4; ++u) {
      __m512 wf = load16(w + d + 16 * u);
      for (int r = 0; r < R; ++r)
        acc[r][u] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(x + r * n + d + 16 * u), acc[r][u]);
    }
  }
  for (; d + 16 <= n; d += 16) {
    __m512 wf = load16(w + d);
    for (int r = 0; r < R; ++r)
      acc[r][0] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(x + r * n + d), acc[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    out[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]),
                                                _mm512_add_ps(acc[r][2], acc[r][3])));
    for (int64_t j = d; j < n; ++j) out[r] += static_cast<float>(w[j]) * x[r * n + j];
  }
}

// acc[0:n] += a * v[0:n]
template <typename T>
inline void axpy(float a, const T* v, int64_t n, float* acc) {
  const __m512 av = _mm512_set1_ps(a);
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) store16(acc + d, _mm512_fmadd_ps(av, load16(v + d), load16(acc + d)));
  for (; d < n; ++d) acc[d] += a * static_cast<float>(v[d]);
}

// y[r, :] = w @ x[r, :] for `rows` (1..4) rows (row stride n in x, ld_y in y); w is [out, n].
inline void gemv(const c10::BFloat16* w, int64_t out, int64_t n, const float* x, int64_t rows,
                 float* y, int64_t ld_y) {
  float tmp[kMaxRows];
  for (int64_t o = 0; o < out; ++o) {
    const c10::BFloat16* wo = w + o * n;
    switch (rows) {
      case 1: dot_rows<1>(wo, x, n, tmp); break;
      case 2: dot_rows<2>(wo, x, n, tmp); break;
      case 3: dot_rows<3>(wo, x, n, tmp); break;
      default: dot_rows<4>(wo, x, n, tmp); break;
    }
    for (int64_t r = 0; r < rows; ++r) y[r * ld_y + o] = tmp[r];
  }
}

}  // namespace ds3dist
#endif
