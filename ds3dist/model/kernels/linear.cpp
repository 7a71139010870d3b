// y = x @ w^T for a few rows against a bf16 weight, w widened to float32 in registers and
// each weight row read once for all the rows: where a CPU has no bf16 instructions, torch's
// bf16 linear converts the whole weight on every call (a ninth of the memory bandwidth at 8
// rows on an AVX2 server). Each output is a fixed-order dot product (rows do not depend on
// what shares their batch), rounded once into y's dtype.
#include "common.h"

namespace ds3dist {

// x_mk [M, K] bf16 or float32; w_nk [N, K] bf16; out_mn [M, N] of x's dtype (all contiguous).
void linear(const at::Tensor& x_mk, const at::Tensor& w_nk, at::Tensor& out_mn) {
  TORCH_CHECK(w_nk.scalar_type() == at::kBFloat16 && w_nk.is_contiguous() && w_nk.device().is_cpu(),
              "linear: the weight must be a contiguous bf16 CPU tensor");
  TORCH_CHECK(x_mk.dim() == 2 && out_mn.dim() == 2 && x_mk.size(1) == w_nk.size(1) &&
              out_mn.size(0) == x_mk.size(0) && out_mn.size(1) == w_nk.size(0) &&
              out_mn.is_contiguous() && out_mn.scalar_type() == x_mk.scalar_type() &&
              (x_mk.scalar_type() == at::kBFloat16 || x_mk.scalar_type() == at::kFloat),
              "linear: shapes or dtypes do not agree");
  const int64_t m = x_mk.size(0), k = x_mk.size(1), n = w_nk.size(0);
  const auto xf = x_mk.to(at::kFloat).contiguous();
  const float* xp = xf.const_data_ptr<float>();
  const auto* wp = w_nk.const_data_ptr<c10::BFloat16>();
  const bool bf16_out = out_mn.scalar_type() == at::kBFloat16;
  // Weight rows in blocks of kBlock, each block kept in cache for every 4 rows of x.
  constexpr int64_t kBlock = 16;
  at::parallel_for(0, n, kBlock, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; b += kBlock) {
      const int64_t nb = std::min<int64_t>(kBlock, hi - b);
      for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
        const int64_t rows = std::min<int64_t>(kMaxRows, m - r0);
        if (bf16_out)
          gemv(wp + b * k, nb, k, xp + r0 * k, rows, out_mn.data_ptr<c10::BFloat16>() + r0 * n + b, n);
        else
          gemv(wp + b * k, nb, k, xp + r0 * k, rows, out_mn.data_ptr<float>() + r0 * n + b, n);
      }
    }
  });
}

}  // namespace ds3dist
