// Approximate logits for speculative drafts: a few rows against an int8 copy of the head
// (one scale per vocabulary row), the rows quantized to int8 per row (-127..127), products
// summed exactly in int32, so every instruction set gives the same logits:
// AVX512-VNNI vpdpbusd (unsigned x signed bytes: x offset by 128, 128 x the row's weight sum
// taken back), AVX2 / AVX-512 without VNNI vpmaddubsw on |x| and sign(x) w (pairs stay under
// 2^15) then vpmaddwd, ARM sdot (or widening multiplies), plain C++ elsewhere. A quarter of
// the bf16 head's bytes; only the drafts use it (verification reads the exact head).
#include "common.h"

#include <cmath>
#include <vector>

namespace ds3dist {

namespace {

constexpr int64_t kRows = 8;

// dots[r] = sum_k x[r, k] w[k] for R rows x (int8, row stride d; d a multiple of 64).
template <int R>
void dot_i8(const int8_t* x, const int8_t* w, int64_t d, int32_t w_sum, int32_t* dots) {
#if defined(__AVX512VNNI__) && defined(CPU_CAPABILITY_AVX512)
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
  for (int64_t k = 0; k < d; k += 64) {
    const __m512i wk = _mm512_loadu_si512(w + k);
    for (int r = 0; r < R; ++r) {
      const __m512i xu = _mm512_xor_si512(_mm512_loadu_si512(x + r * d + k), offset);  // x + 128
      acc[r] = _mm512_dpbusd_epi32(acc[r], xu, wk);
    }
  }
  for (int r = 0; r < R; ++r) dots[r] = _mm512_reduce_add_epi32(acc[r]) - 128 * w_sum;
#elif defined(__AVX2__)
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
  for (int64_t k = 0; k < d; k += 32) {
    const __m256i wk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    for (int r = 0; r < R; ++r) {
      const __m256i xk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * d + k));
      const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(xk, xk), _mm256_sign_epi8(wk, xk));
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(pairs, ones));
    }
  }
  for (int r = 0; r < R; ++r) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc[r]), _mm256_extracti128_si256(acc[r], 1));
    s = _mm_hadd_epi32(s, s);
    dots[r] = _mm_cvtsi128_si32(_mm_hadd_epi32(s, s));
  }
  (void)w_sum;
#elif defined(__aarch64__)
  int32x4_t acc[R];
  for (int r = 0; r < R; ++r) acc[r] = vdupq_n_s32(0);
  for (int64_t k = 0; k < d; k += 16) {
    const int8x16_t wk = vld1q_s8(w + k);
    for (int r = 0; r < R; ++r) {
      const int8x16_t xk = vld1q_s8(x + r * d + k);
#if defined(__ARM_FEATURE_DOTPROD)
      acc[r] = vdotq_s32(acc[r], xk, wk);
#else
      const int16x8_t lo = vmull_s8(vget_low_s8(xk), vget_low_s8(wk));
      acc[r] = vpadalq_s16(acc[r], vmlal_high_s8(lo, xk, wk));
#endif
    }
  }
  for (int r = 0; r < R; ++r) dots[r] = vaddvq_s32(acc[r]);
  (void)w_sum;
#else
  for (int r = 0; r < R; ++r) {
    int32_t s = 0;
    for (int64_t k = 0; k < d; ++k) s += static_cast<int32_t>(x[r * d + k]) * w[k];
    dots[r] = s;
  }
  (void)w_sum;
#endif
}

// out[r, row] for R quantized rows x and head rows lo..hi-1.
template <int R>
void rows_dot(const int8_t* x, const int8_t* w, const float* w_scale, const int32_t* w_sum,
              const float* x_scale, int64_t d, int64_t v, int64_t lo, int64_t hi, float* out) {
  int32_t dots[R];
  for (int64_t row = lo; row < hi; ++row) {
    dot_i8<R>(x, w + row * d, d, w_sum[row], dots);
    for (int r = 0; r < R; ++r)
      out[r * v + row] = static_cast<float>(dots[r]) * x_scale[r] * w_scale[row];
  }
}

}  // namespace

// x_md [M, D] float32 -> out_mv [M, V] float32 = (x q(x)) . (s_v w_v) approximately.
// w_vd int8 [V, D] (D a multiple of 64), w_scale float [V], w_sum int32 [V] = sum_d w_vd.
void int8_logits(const at::Tensor& x_md, const at::Tensor& w_vd, const at::Tensor& w_scale,
                 const at::Tensor& w_sum, at::Tensor& out_mv) {
  TORCH_CHECK(x_md.scalar_type() == at::kFloat && w_vd.scalar_type() == at::kChar &&
              w_scale.scalar_type() == at::kFloat && w_sum.scalar_type() == at::kInt &&
              out_mv.scalar_type() == at::kFloat, "int8_logits: float x, int8 w, float scale, "
              "int32 sum, float out");
  const int64_t m = x_md.size(0), d = x_md.size(1), v = w_vd.size(0);
  TORCH_CHECK(w_vd.size(1) == d && d % 64 == 0 && w_scale.numel() == v && w_sum.numel() == v &&
              out_mv.size(0) == m && out_mv.size(1) == v && x_md.is_contiguous() &&
              w_vd.is_contiguous() && out_mv.is_contiguous(), "int8_logits: shapes do not agree");
  std::vector<int8_t> xq(m * d);
  std::vector<float> xs(m);
  const float* xp = x_md.const_data_ptr<float>();
  for (int64_t r = 0; r < m; ++r) {
    float top = 0.f;
    for (int64_t k = 0; k < d; ++k) top = std::max(top, std::fabs(xp[r * d + k]));
    xs[r] = top > 0.f ? top / 127.f : 1.f;
    for (int64_t k = 0; k < d; ++k) xq[r * d + k] = static_cast<int8_t>(std::lrint(xp[r * d + k] / xs[r]));
  }
  const int8_t* wp = w_vd.const_data_ptr<int8_t>();
  const float* sp = w_scale.const_data_ptr<float>();
  const int32_t* sump = w_sum.const_data_ptr<int32_t>();
  float* op = out_mv.data_ptr<float>();
  for (int64_t r0 = 0; r0 < m; r0 += kRows) {  // kRows rows per pass over the head
    const int64_t rows = std::min<int64_t>(kRows, m - r0);
    const int8_t* x = xq.data() + r0 * d;
    float* out = op + r0 * v;
    const float* scale = xs.data() + r0;
    at::parallel_for(0, v, 256, [&](int64_t lo, int64_t hi) {
      switch (rows) {
        case 1: rows_dot<1>(x, wp, sp, sump, scale, d, v, lo, hi, out); break;
        case 2: rows_dot<2>(x, wp, sp, sump, scale, d, v, lo, hi, out); break;
        case 3: rows_dot<3>(x, wp, sp, sump, scale, d, v, lo, hi, out); break;
        case 4: rows_dot<4>(x, wp, sp, sump, scale, d, v, lo, hi, out); break;
        case 5: rows_dot<5>(x, wp, sp, sump, scale, d, v, lo, hi, out); break;
        case 6: rows_dot<6>(x, wp, sp, sump, scale, d, v, lo, hi, out); break;
        case 7: rows_dot<7>(x, wp, sp, sump, scale, d, v, lo, hi, out); break;
        default: rows_dot<8>(x, wp, sp, sump, scale, d, v, lo, hi, out); break;
      }
    });
  }
}

}  // namespace ds3dist
