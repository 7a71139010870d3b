// A whole MoE layer's routed part at decode token counts, with every routed expert local:
// gate, noaux_tc routing, grouping by expert, the experts and the weighted combine in one
// call, where the torch path takes about 30 small ops. Same math as gate.route, the
// LocalDispatcher and the grouped experts kernel; every token is computed alone.
#include "common.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace ds3dist {

void expert_rows(const float* x, int64_t rows, const c10::BFloat16* w13, const c10::BFloat16* w2,
                 int64_t d, int64_t inter, float* h, float* a, float* y);

namespace {

// Indices of the n largest of v[0:len], best first; ties keep the lower index first.
void top_n(const float* v, int64_t len, int64_t n, int64_t* out) {
  std::vector<int64_t> order(len);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + n, order.end(),
                    [&](int64_t a, int64_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
  std::copy(order.begin(), order.begin() + n, out);
}

// gate.route for one token: logits [E] -> idx [K] (best first), w [K].
void route_one(const float* logits, const float* bias, int64_t e_n, int64_t n_group,
               int64_t topk_group, int64_t top_k, float scaling, int64_t* idx, float* w) {
  std::vector<float> s(e_n), biased(e_n), group(n_group);
  for (int64_t e = 0; e < e_n; ++e) {
    s[e] = 1.f / (1.f + std::exp(-logits[e]));
    biased[e] = s[e] + bias[e];
  }
  const int64_t per = e_n / n_group;
  int64_t best2[2];
  for (int64_t g = 0; g < n_group; ++g) {
    top_n(biased.data() + g * per, per, 2, best2);
    group[g] = biased[g * per + best2[0]] + biased[g * per + best2[1]];
  }
  std::vector<int64_t> kept(topk_group);
  top_n(group.data(), n_group, topk_group, kept.data());
  std::vector<float> masked(e_n, -INFINITY);
  for (int64_t g : kept) std::copy_n(biased.data() + g * per, per, masked.data() + g * per);
  top_n(masked.data(), e_n, top_k, idx);
  float sum = 0.f;
  for (int64_t k = 0; k < top_k; ++k) sum += (w[k] = s[idx[k]]);
  for (int64_t k = 0; k < top_k; ++k) w[k] = w[k] / sum * scaling;
}

}  // namespace

// x_td [T, D] bf16; gate_w [E, D] bf16; bias [E] float32; w13 [E, 2I, D], w2 [E, D, I] bf16
// (all E experts, ascending id). out_td [T, D] bf16 = sum over k (float32, k order) of
// bf16(w_k * bf16(expert_k(x))); received_e [E] int64 += copies per expert.
void moe_decode(const at::Tensor& x_td, const at::Tensor& gate_w, const at::Tensor& bias,
                int64_t n_group, int64_t topk_group, int64_t top_k, double scaling,
                const at::Tensor& w13, const at::Tensor& w2, at::Tensor& out_td,
                at::Tensor& received_e) {
  for (const at::Tensor* t :
       std::initializer_list<const at::Tensor*>{&x_td, &gate_w, &w13, &w2, &out_td})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->device().is_cpu(),
                "moe_decode: contiguous bf16 CPU tensors only");
  const int64_t t_n = x_td.size(0), d = x_td.size(1), e_n = gate_w.size(0), inter = w2.size(2);
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == e_n && bias.is_contiguous(),
              "moe_decode: bias must be float32 [E]");
  TORCH_CHECK(received_e.scalar_type() == at::kLong && received_e.numel() == e_n,
              "moe_decode: received_e must be int64 [E]");
  TORCH_CHECK(gate_w.size(1) == d && w13.size(0) == e_n && w13.size(1) == 2 * inter &&
              w13.size(2) == d && w2.size(0) == e_n && w2.size(1) == d &&
              out_td.sizes() == x_td.sizes(), "moe_decode: shapes do not agree");
  TORCH_CHECK(n_group > 0 && e_n % n_group == 0 && e_n / n_group >= 2 && topk_group >= 1 &&
              topk_group <= n_group && top_k >= 1 && top_k <= topk_group * (e_n / n_group),
              "moe_decode: bad routing sizes");
  const auto xf = x_td.to(at::kFloat);
  const float* xp = xf.data_ptr<float>();
  std::vector<float> logits(t_n * e_n), w(t_n * top_k);
  std::vector<int64_t> idx(t_n * top_k);
  for (int64_t t0 = 0; t0 < t_n; t0 += kMaxRows)  // logits [T, E] = x @ gate_w^T
    gemv(gate_w.const_data_ptr<c10::BFloat16>(), e_n, d, xp + t0 * d,
         std::min<int64_t>(kMaxRows, t_n - t0), logits.data() + t0 * e_n, e_n);
  for (int64_t t = 0; t < t_n; ++t)
    route_one(logits.data() + t * e_n, bias.const_data_ptr<float>(), e_n, n_group, topk_group,
              top_k, static_cast<float>(scaling), idx.data() + t * top_k, w.data() + t * top_k);

  // Copies n = t * K + k grouped by expert (ascending), in n order, in chunks of <= 4.
  std::vector<std::vector<int64_t>> by_expert(e_n);
  for (int64_t n = 0; n < t_n * top_k; ++n) by_expert[idx[n]].push_back(n);
  std::vector<std::pair<int64_t, int64_t>> chunks;  // (expert, first position in its list)
  int64_t* recv = received_e.data_ptr<int64_t>();
  for (int64_t e = 0; e < e_n; ++e) {
    recv[e] += static_cast<int64_t>(by_expert[e].size());
    for (size_t i = 0; i < by_expert[e].size(); i += kMaxRows) chunks.emplace_back(e, i);
  }
  std::vector<float> y_nd(t_n * top_k * d);
  const auto* w13p = w13.const_data_ptr<c10::BFloat16>();
  const auto* w2p = w2.const_data_ptr<c10::BFloat16>();
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> xin(kMaxRows * d), h(kMaxRows * 2 * inter), a(kMaxRows * inter),
        y(kMaxRows * d);
    for (int64_t c = lo; c < hi; ++c) {
      const auto [e, first] = chunks[c];
      const auto& copies = by_expert[e];
      const int64_t rows = std::min<int64_t>(kMaxRows, copies.size() - first);
      for (int64_t r = 0; r < rows; ++r)
        std::copy_n(xp + (copies[first + r] / top_k) * d, d, xin.data() + r * d);
      expert_rows(xin.data(), rows, w13p + e * 2 * inter * d, w2p + e * d * inter, d, inter,
                  h.data(), a.data(), y.data());
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = copies[first + r];
        for (int64_t i = 0; i < d; ++i)
          y_nd[n * d + i] = round_bf16(round_bf16(y[r * d + i]) * w[n]);
      }
    }
  });
  auto* outp = out_td.data_ptr<c10::BFloat16>();
  for (int64_t t = 0; t < t_n; ++t)
    for (int64_t i = 0; i < d; ++i) {
      float acc = 0.f;
      for (int64_t k = 0; k < top_k; ++k) acc += y_nd[(t * top_k + k) * d + i];
      outp[t * d + i] = c10::BFloat16(acc);
    }
}

}  // namespace ds3dist
