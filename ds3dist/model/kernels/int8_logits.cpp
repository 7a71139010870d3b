// Approximate logits for speculative drafts: a few rows against an int8 copy of the head
// (one scale per vocabulary row), the rows quantized to int8 per row, products summed in
// int32 with AVX512-VNNI (vpdpbusd: unsigned x signed bytes, so x is offset by 128 and
// 128 x the row's weight sum is taken back). A quarter of the bf16 head's bytes; only the
// drafts use it (verification reads the exact head).
#include "common.h"

#include <cmath>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
namespace ds3dist {

namespace {

constexpr int64_t kRows = 8;

// out[r, row] for R quantized rows x (offset by 128) and head rows lo..hi-1.
template <int R>
void rows_dot(const uint8_t* x, const int8_t* w, const float* w_scale, const int32_t* w_sum,
              const float* x_scale, int64_t d, int64_t v, int64_t lo, int64_t hi, float* out) {
  for (int64_t row = lo; row < hi; ++row) {
    const int8_t* wr = w + row * d;
    __m512i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
    for (int64_t k = 0; k < d; k += 64) {
      const __m512i wk = _mm512_loadu_si512(wr + k);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_loadu_si512(x + r * d + k), wk);
    }
    for (int r = 0; r < R; ++r) {
      const int32_t dot = _mm512_reduce_add_epi32(acc[r]) - 128 * w_sum[row];
      out[r * v + row] = static_cast<float>(dot) * x_scale[r] * w_scale[row];
    }
  }
}

}  // namespace

// x_md [M, D] float32 -> out_mv [M, V] float32 = (x q(x)) . (s_v w_v) approximately.
// w_vd int8 [V, D] (D a multiple of 64), w_scale float [V], w_sum int32 [V] = sum_d w_vd.
void int8_logits(const torch::Tensor& x_md, const torch::Tensor& w_vd, const torch::Tensor& w_scale,
                 const torch::Tensor& w_sum, torch::Tensor& out_mv) {
  TORCH_CHECK(x_md.scalar_type() == at::kFloat && w_vd.scalar_type() == at::kChar &&
              w_scale.scalar_type() == at::kFloat && w_sum.scalar_type() == at::kInt &&
              out_mv.scalar_type() == at::kFloat, "int8_logits: float x, int8 w, float scale, "
              "int32 sum, float out");
  const int64_t m = x_md.size(0), d = x_md.size(1), v = w_vd.size(0);
  TORCH_CHECK(w_vd.size(1) == d && d % 64 == 0 && w_scale.numel() == v && w_sum.numel() == v &&
              out_mv.size(0) == m && out_mv.size(1) == v && x_md.is_contiguous() &&
              w_vd.is_contiguous() && out_mv.is_contiguous(), "int8_logits: shapes do not agree");
  std::vector<uint8_t> xq(m * d);
  std::vector<float> xs(m);
  const float* xp = x_md.const_data_ptr<float>();
  for (int64_t r = 0; r < m; ++r) {
    float top = 0.f;
    for (int64_t k = 0; k < d; ++k) top = std::max(top, std::fabs(xp[r * d + k]));
    xs[r] = top > 0.f ? top / 127.f : 1.f;
    for (int64_t k = 0; k < d; ++k)
      xq[r * d + k] = static_cast<uint8_t>(std::lrint(xp[r * d + k] / xs[r]) + 128);
  }
  const int8_t* wp = w_vd.const_data_ptr<int8_t>();
  const float* sp = w_scale.const_data_ptr<float>();
  const int32_t* sump = w_sum.const_data_ptr<int32_t>();
  float* op = out_mv.data_ptr<float>();
  for (int64_t r0 = 0; r0 < m; r0 += kRows) {  // kRows rows per pass over the head
    const int64_t rows = std::min<int64_t>(kRows, m - r0);
    const uint8_t* x = xq.data() + r0 * d;
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
#endif
