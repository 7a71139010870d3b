"""Triton kernels of the GPU path, each beside a torch reference of the same math.

- mla_decode: paged absorbed-MLA attention for 1-4 query rows per sequence (split-KV).
- moe: grouped routed experts, one launch per layer (bf16/float32 or FP8 block-scaled).
- sampling: Gumbel-max sampling on the device, one host read of the ids per step.
(The FP8 block GEMM lives with the FP8 math, ds3dist.checkpoint.fp8.)

`use_triton(t)` decides where they run: on CUDA tensors (when Triton is installed), or, for
tests only, on any tensor while `forced()` is on (or DS3DIST_FORCE_TRITON=1): then Triton's
interpreter (TRITON_INTERPRET=1, numpy underneath) runs them on the CPU, so the GPU path's
kernels, page tables and dispatch are exercised without a GPU. The CPU paths are unchanged.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from typing import Iterator

import torch

FORCE_ENV = "DS3DIST_FORCE_TRITON"
_forced = os.environ.get(FORCE_ENV, "") == "1"


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run under the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(t: torch.Tensor) -> bool:
    """Whether work on tensor t runs the Triton kernels."""
    if _forced:
        return True
    return t.is_cuda and available()


@contextmanager
def forced(on: bool = True) -> Iterator[None]:
    """Select the Triton kernels for every tensor (tests: CPU tensors under the interpreter)."""
    global _forced
    if on and not interpreting() and not torch.cuda.is_available():
        raise RuntimeError("forcing the Triton kernels on CPU tensors needs TRITON_INTERPRET=1 "
                           "set before the first kernel is built")
    before, _forced = _forced, on
    try:
        yield
    finally:
        _forced = before


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton block sizes."""
    return 1 << max(0, n - 1).bit_length()


def dot_upcast() -> bool:
    """Kernels take this as a constexpr: cast tiles to float32 before tl.dot. Under the
    interpreter tl.dot on bfloat16 tiles is wrong (Triton 3.9); on a GPU bf16 tiles feed the
    tensor cores directly."""
    return interpreting()


def jit(fn):
    """triton.jit, made on first use (so TRITON_INTERPRET is read when a kernel is first
    launched, not at import, and importing a kernel module does not import Triton) and cached
    per interpreter setting. The kernel's module names triton.language `tl`."""
    made: dict[bool, object] = {}

    def kernel():
        key = interpreting()
        if key not in made:
            import triton
            import triton.language

            if fn.__globals__.get("tl") is None:  # modules hold `tl = None` until first use
                fn.__globals__["tl"] = triton.language
            made[key] = triton.jit(fn)
        return made[key]

    return kernel
