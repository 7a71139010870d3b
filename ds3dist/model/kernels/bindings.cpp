// The CPU decode kernels' Python bindings (ds3dist.model.cpu_kernel builds and loads them),
// one module per instruction set (isa()).
#include <torch/extension.h>  // pybind11 and its tensor casters: only this file

#include "common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", [] { return std::string(DS3DIST_STR(DS3DIST_ISA)); }, "the instruction set this module is built for");
  m.def("lanes", [] { return ds3dist::kLanes; }, "float32 lanes of its vectors");
  m.def("grouped_experts", &ds3dist::grouped_experts, "routed experts for groups of 1-4 rows");
  m.def("moe_decode", &ds3dist::moe_decode, "a MoE layer's routed part, every expert local");
  m.def("mla_decode", &ds3dist::mla_decode, "absorbed MLA attention of one-token queries");
  m.def("int8_logits", &ds3dist::int8_logits, "approximate logits against an int8 head");
  m.def("linear", &ds3dist::linear, "a few rows against a bf16 weight");
}
