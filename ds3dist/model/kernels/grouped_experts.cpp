// Routed experts at decode row counts: one call per MoE layer instead of several oneDNN calls
// per expert. Each weight row is read once for all the rows its expert got (at most 4), bf16
// accumulated in float32; experts are spread over the threads.
#include "common.h"

#include <cmath>
#include <vector>

namespace ds3dist {
// y [rows, d] = down(silu(gate(x)) * up(x)) for rows (1..4) of x [rows, d], float32 out; gate
// and up rounded to bf16 as a bf16 GEMM rounds them, the product rounded once. h [4, 2I] and
// a [4, I] are scratch.
void expert_rows(const float* x, int64_t rows, const c10::BFloat16* w13, const c10::BFloat16* w2,
                 int64_t d, int64_t inter, float* h, float* a, float* y) {
  gemv(w13, 2 * inter, d, x, rows, h, 2 * inter);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < inter; ++j) {
      const float gate = round_bf16(h[r * 2 * inter + j]);
      const float up = round_bf16(h[r * 2 * inter + inter + j]);
      a[r * inter + j] = round_bf16(gate / (1.f + std::exp(-gate)) * up);
    }
  gemv(w2, d, inter, a, rows, y, d);
}

// Groups g: rows starts[g] .. starts[g] + counts[g] - 1 of x_sd (counts 1..4) go through local
// expert experts[g] (expert_rows). w13 [E, 2I, D] ([gate; up]), w2 [E, D, I], all
// bf16 and contiguous. Writes those rows of out_sd [S, D] and no others.
void grouped_experts(const at::Tensor& x_sd, const at::Tensor& experts,
                     const at::Tensor& starts, const at::Tensor& counts,
                     const at::Tensor& w13, const at::Tensor& w2, at::Tensor& out_sd) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x_sd, &w13, &w2, &out_sd})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->device().is_cpu(),
                "grouped_experts: contiguous bf16 CPU tensors only");
  const int64_t d = x_sd.size(1), inter = w2.size(2), groups = experts.size(0);
  TORCH_CHECK(w13.size(1) == 2 * inter && w13.size(2) == d && w2.size(1) == d &&
              out_sd.sizes() == x_sd.sizes(), "grouped_experts: shapes do not agree");
  const int64_t* ex = experts.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  const int64_t* ct = counts.data_ptr<int64_t>();
  for (int64_t g = 0; g < groups; ++g)
    TORCH_CHECK(ct[g] >= 1 && ct[g] <= kMaxRows && st[g] >= 0 && st[g] + ct[g] <= x_sd.size(0) &&
                ex[g] >= 0 && ex[g] < w13.size(0), "grouped_experts: group ", g, " out of range");
  const auto xf = x_sd.to(at::kFloat);
  const float* xp = xf.data_ptr<float>();
  const auto* w13p = w13.const_data_ptr<c10::BFloat16>();
  const auto* w2p = w2.const_data_ptr<c10::BFloat16>();
  auto* yp = out_sd.data_ptr<c10::BFloat16>();
  at::parallel_for(0, groups, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> h(kMaxRows * 2 * inter), a(kMaxRows * inter), y(kMaxRows * d);
    for (int64_t g = lo; g < hi; ++g) {
      const int64_t r0 = st[g], rows = ct[g];
      expert_rows(xp + r0 * d, rows, w13p + ex[g] * 2 * inter * d, w2p + ex[g] * d * inter, d,
                  inter, h.data(), a.data(), y.data());
      for (int64_t i = 0; i < rows * d; ++i) yp[r0 * d + i] = c10::BFloat16(y[i]);
    }
  });
}

}  // namespace ds3dist
