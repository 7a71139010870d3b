// The CPU decode kernels' Python bindings (ds3dist.model.cpu_kernel builds and loads them),
// one module per instruction set (isa()).
#include "common.h"

namespace ds3dist {
void grouped_experts(const torch::Tensor& x_sd, const torch::Tensor& experts,
                     const torch::Tensor& starts, const torch::Tensor& counts,
                     const torch::Tensor& w13, const torch::Tensor& w2, torch::Tensor& out_sd);
void mla_decode(const torch::Tensor& q_thc, const torch::Tensor& rows, const torch::Tensor& kv_lens,
                const torch::Tensor& page_starts, const torch::Tensor& page_ids,
                const torch::Tensor& pool, int64_t r, double scale, torch::Tensor& out_thr);
void moe_decode(const torch::Tensor& x_td, const torch::Tensor& gate_w, const torch::Tensor& bias,
                int64_t n_group, int64_t topk_group, int64_t top_k, double scaling,
                const torch::Tensor& w13, const torch::Tensor& w2, torch::Tensor& out_td,
                torch::Tensor& received_e);
void int8_logits(const torch::Tensor& x_md, const torch::Tensor& w_vd, const torch::Tensor& w_scale,
                 const torch::Tensor& w_sum, torch::Tensor& out_mv);
void linear(const torch::Tensor& x_mk, const torch::Tensor& w_nk, torch::Tensor& out_mn);
}  // namespace ds3dist

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", [] { return std::string(DS3DIST_STR(DS3DIST_ISA)); }, "the instruction set this module is built for");
  m.def("lanes", [] { return ds3dist::kLanes; }, "float32 lanes of its vectors");
  m.def("grouped_experts", &ds3dist::grouped_experts, "routed experts for groups of 1-4 rows");
  m.def("moe_decode", &ds3dist::moe_decode, "a MoE layer's routed part, every expert local");
  m.def("mla_decode", &ds3dist::mla_decode, "absorbed MLA attention of one-token queries");
  m.def("int8_logits", &ds3dist::int8_logits, "approximate logits against an int8 head");
  m.def("linear", &ds3dist::linear, "a few rows against a bf16 weight");
}
