"""Linear layer without bias, holding either a plain weight or an FP8 weight + block scales,
and how a plain CPU weight is multiplied (matmul)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ds3dist.checkpoint.fp8 import FP8_DTYPE, fp8_linear, weight_dequant
from ds3dist.model import cpu_kernel
from ds3dist.model.options import native_bf16

FEW_ROWS, MANY_ROWS = 8, 128  # the row counts at which matmul's paths are timed


class Linear(nn.Module):
    """y = x @ W^T.

    Plain: `weight` [out, in] in the compute dtype, F.linear.
    FP8: `weight` [out, in] float8_e4m3fn plus `weight_scale_inv` [ceil(out/b0), ceil(in/b1)]
    float32; forward quantizes x per token per 128 channels (fp8_linear), output in x's dtype.
    Buffer names equal the checkpoint's, so a state dict key maps to a tensor name.
    """

    def __init__(self, in_features: int, out_features: int, fp8: bool = False,
                 dtype: torch.dtype = torch.bfloat16, block: tuple[int, int] = (128, 128)):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        if fp8:
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE))
            scale_shape = (math.ceil(out_features / block[0]), math.ceil(in_features / block[1]))
            self.register_buffer("weight_scale_inv", torch.empty(scale_shape, dtype=torch.float32))
        else:
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=dtype))
            self.register_buffer("weight_scale_inv", None)
        self.packed: torch.Tensor | None = None  # oneDNN copy of `weight` (pack)

    @property
    def is_fp8(self) -> bool:
        return self.weight_scale_inv is not None

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a plain [out, in] tensor (dequantized when FP8)."""
        if self.is_fp8:
            return weight_dequant(self.weight, self.weight_scale_inv, self.block, dtype)
        return self.weight.to(dtype)

    def pack(self) -> bool:
        """Keep a oneDNN-packed copy of the weight (`packed_weight`) and use it for every 2-D
        input: for the 129k-row head at 8 rows it runs about 2x faster than F.linear (whose
        skinny GEMM reaches half the memory bandwidth). Costs the weight's bytes again.
        Returns whether it packed."""
        self.packed = None if self.is_fp8 else packed_weight(self.weight)
        return self.packed is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_fp8:
            return fp8_linear(x, self.weight, self.weight_scale_inv, self.block, out_dtype=x.dtype)
        return matmul(x, self.weight, self.packed)

    def extra_repr(self) -> str:
        kind = "fp8" if self.is_fp8 else str(self.weight.dtype).removeprefix("torch.")
        return f"{self.in_features} -> {self.out_features}, {kind}"


def packed_weight(w: torch.Tensor) -> torch.Tensor | None:
    """A oneDNN-packed copy of a float32 (or, on CPUs with bf16 instructions, bfloat16) CPU weight
    [out, in], or None (other dtypes, GPUs, builds without oneDNN). With it a linear runs
    1.5-2x faster than F.linear at 1-64 rows here, and its rows do not depend on the batch
    they share (F.linear's float32 rows differ by ~1e-5 between batch sizes)."""
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if w.dtype != torch.float32 and not (w.dtype == torch.bfloat16 and native_bf16()):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(w, 16)


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [n, in] @ packed.T (packed from packed_weight)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


@dataclass(frozen=True)
class MatmulPaths:
    """How matmul multiplies rows by one bf16 CPU weight shape, timed once (choose_paths):
    kernel: up to cpu_kernel.LINEAR_ROWS rows through the kernel (bf16 widened in registers)
    rather than torch's bf16 linear; upcast: more rows as float32 GEMMs on a float32 copy of the
    weight made for the call (dropped after it) rather than torch's bf16 linear, which on a CPU
    without bf16 instructions converts the weight inside at a fraction of float32's speed."""
    kernel: bool = False
    upcast: bool = False


def matmul(x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T for a plain weight [out, in] (packed: its oneDNN-packed copy, if kept)."""
    if packed is not None and x.dim() == 2 and x.dtype == w.dtype:
        return packed_linear(x, packed)
    paths = _paths.get(_key(w)) if w.dtype == torch.bfloat16 and w.device.type == "cpu" else None
    if paths is not None and x.dim() == 2:
        if paths.kernel and x.shape[0] <= cpu_kernel.LINEAR_ROWS and w.is_contiguous():
            return cpu_kernel.linear(x, w)
        if paths.upcast and x.shape[0] > cpu_kernel.LINEAR_ROWS:
            return F.linear(x.float(), w.float()).to(x.dtype)
    return F.linear(x, w)


_paths: dict[tuple, MatmulPaths] = {}


def _key(w: torch.Tensor) -> tuple:
    return (*w.shape, torch.get_num_threads(), cpu_kernel.active_isa())


def choose_paths(w: torch.Tensor, packed: torch.Tensor | None = None) -> MatmulPaths | None:
    """matmul's paths for bf16 CPU weights of w's shape: timed on w the first time this shape
    is seen (at load: a few calls of each path), then kept for the process. None for other
    weights (float32, FP8, GPU): torch's linear."""
    if w.dtype != torch.bfloat16 or w.device.type != "cpu" or w.dim() != 2:
        return None
    key = _key(w)
    if key not in _paths:
        _paths[key] = _time_paths(w, packed)
    return _paths[key]


def _time_paths(w: torch.Tensor, packed: torch.Tensor | None) -> MatmulPaths:
    few = torch.randn(FEW_ROWS, w.shape[1]).bfloat16()
    many = torch.randn(MANY_ROWS, w.shape[1]).bfloat16()
    library = ((lambda x: packed_linear(x, packed)) if packed is not None
               else (lambda x: F.linear(x, w)))
    kernel = (cpu_kernel.kernel() is not None and w.is_contiguous()
              and fastest_seconds(lambda: cpu_kernel.linear(few, w)) < fastest_seconds(lambda: library(few)))
    upcast = (packed is None and
              fastest_seconds(lambda: F.linear(many.float(), w.float())) < fastest_seconds(lambda: library(many)))
    return MatmulPaths(kernel=kernel, upcast=upcast)


def fastest_seconds(fn, repeats: int = 3) -> float:
    """The fastest of `repeats` calls, after one to warm up (allocation, kernel selection)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
