// Helpers shared by the CPU decode kernels, written once over ATen's portable vector type
// (at::vec::Vectorized<float>: 16 lanes on AVX-512, 8 on AVX2, 4 on NEON, plain C++ elsewhere).
// The build compiles these sources once per instruction set (DS3DIST_ISA, CPU_CAPABILITY_*);
// ds3dist.model.cpu_kernel loads the one this CPU runs. bf16 is widened to float32 in
// registers; every output is a fixed-order dot product, whatever is computed beside it.
// Only ATen's tensor and vector headers here: torch/extension.h, four times slower to
// compile, is for bindings.cpp alone.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#ifndef DS3DIST_ISA
#define DS3DIST_ISA default
#endif
#define DS3DIST_STR2(x) #x
#define DS3DIST_STR(x) DS3DIST_STR2(x)

namespace ds3dist {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = fVec::size();
constexpr int kMaxRows = 4;  // rows per weight pass (cpu_kernel.MAX_ROWS)
// Accumulators per row: AVX2 has 16 vector registers, AVX-512 and NEON 32.
#if defined(CPU_CAPABILITY_AVX2)
constexpr int kUnroll = 2;
#else
constexpr int kUnroll = 4;
#endif

inline float round_bf16(float v) { return static_cast<float>(c10::BFloat16(v)); }

inline fVec load(const float* p) { return fVec::loadu(p); }

inline fVec load(const c10::BFloat16* p) {  // kLanes bf16 -> float32, exact, in registers
#if defined(CPU_CAPABILITY_AVX512)
  __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return fVec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
#elif defined(CPU_CAPABILITY_AVX2)
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return fVec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16)));
#elif defined(__aarch64__) && !defined(CPU_CAPABILITY_SVE256)
  return fVec(vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16)));
#else
  float v[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return fVec::loadu(v);
#endif
}

inline float sum(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](const fVec& a, const fVec& b) { return a + b; }, v);
}

// out[r] = w . x[r] for R rows x (float, row stride n) against one row w of length n.
template <int R, typename T>
inline void dot_rows(const T* w, const float* x, int64_t n, float* out) {
  constexpr int64_t step = kLanes * kUnroll;
  fVec acc[R][kUnroll];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < kUnroll; ++u) acc[r][u] = fVec(0.f);
  int64_t d = 0;
  for (; d + step <= n; d += step) {
    for (int u = 0; u < kUnroll; ++u) {
      const fVec wf = load(w + d + kLanes * u);
      for (int r = 0; r < R; ++r)
        acc[r][u] = at::vec::fmadd(wf, fVec::loadu(x + r * n + d + kLanes * u), acc[r][u]);
    }
  }
  for (; d + kLanes <= n; d += kLanes) {
    const fVec wf = load(w + d);
    for (int r = 0; r < R; ++r) acc[r][0] = at::vec::fmadd(wf, fVec::loadu(x + r * n + d), acc[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    fVec total = acc[r][0];
    for (int u = 1; u < kUnroll; ++u) total = total + acc[r][u];
    out[r] = sum(total);
    for (int64_t j = d; j < n; ++j) out[r] += static_cast<float>(w[j]) * x[r * n + j];
  }
}

// acc[0:n] += a * v[0:n]
template <typename T>
inline void axpy(float a, const T* v, int64_t n, float* acc) {
  const fVec av(a);
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) at::vec::fmadd(av, load(v + d), fVec::loadu(acc + d)).store(acc + d);
  for (; d < n; ++d) acc[d] += a * static_cast<float>(v[d]);
}

// y[r, o] = w[o] . x[r] for R rows of x (row stride n), outputs o of w [out, n]: each weight
// row streamed once, contiguously, for the R rows. (Tiles of 4 weight rows at a time, which
// reuse each x vector, were faster only while the weights sat in cache; at decode they come
// from memory, and one stream per row read 10-25% faster on AVX-512 and AVX2.)
template <int R, typename T, typename Y>
inline void gemv_rows(const T* w, int64_t out, int64_t n, const float* x, Y* y, int64_t ld_y) {
  float dots[R];
  for (int64_t o = 0; o < out; ++o) {
    dot_rows<R>(w + o * n, x, n, dots);
    for (int r = 0; r < R; ++r) y[r * ld_y + o] = static_cast<Y>(dots[r]);
  }
}

// y[r, o] = w[o] . x[r] for `rows` (1..4) rows of x (row stride n), outputs o of w [out, n].
template <typename T, typename Y>
inline void gemv(const T* w, int64_t out, int64_t n, const float* x, int64_t rows, Y* y,
                 int64_t ld_y) {
  switch (rows) {
    case 1: gemv_rows<1>(w, out, n, x, y, ld_y); break;
    case 2: gemv_rows<2>(w, out, n, x, y, ld_y); break;
    case 3: gemv_rows<3>(w, out, n, x, y, ld_y); break;
    default: gemv_rows<4>(w, out, n, x, y, ld_y); break;
  }
}

// The kernels (one file each; bindings.cpp exposes them).
void grouped_experts(const at::Tensor& x_sd, const at::Tensor& experts,
                     const at::Tensor& starts, const at::Tensor& counts,
                     const at::Tensor& w13, const at::Tensor& w2, at::Tensor& out_sd);
void mla_decode(const at::Tensor& q_thc, const at::Tensor& rows, const at::Tensor& kv_lens,
                const at::Tensor& page_starts, const at::Tensor& page_ids,
                const at::Tensor& pool, int64_t r, double scale, at::Tensor& out_thr);
void moe_decode(const at::Tensor& x_td, const at::Tensor& gate_w, const at::Tensor& bias,
                int64_t n_group, int64_t topk_group, int64_t top_k, double scaling,
                const at::Tensor& w13, const at::Tensor& w2, at::Tensor& out_td,
                at::Tensor& received_e);
void int8_logits(const at::Tensor& x_md, const at::Tensor& w_vd, const at::Tensor& w_scale,
                 const at::Tensor& w_sum, at::Tensor& out_mv);
void linear(const at::Tensor& x_mk, const at::Tensor& w_nk, at::Tensor& out_mn);

}  // namespace ds3dist
