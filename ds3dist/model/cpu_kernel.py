"""CPU kernels for decode (kernels/*.cpp): routed experts at 1-4 rows, a whole MoE layer's
routing and experts for a few tokens, absorbed MLA attention of short queries over the paged
cache, and approximate logits against an int8 head (speculative drafts, AVX512-VNNI).

At decode row counts a step is mostly fixed costs: about 14 us per oneDNN call and a few us
per small torch op, for each expert and each sequence of each layer. The kernels do each
layer's experts in one call (each weight read once for all its rows) and each layer's decode
attention in one call (straight from the pages). Every output row is computed alone, in a
fixed order, so a row does not depend on what shares its batch.

Built once per machine with torch's C++ extension tooling (a C++ compiler and ninja; about
45 s on 2 cores) into $DS3DIST_CACHE/kernels/, under a file lock every process waits on for at
most BUILD_TIMEOUT_S; used on CPUs with AVX-512. Elsewhere, when the build fails (a warning
says why, once), or with DS3DIST_CPU_KERNEL=0, the same math runs as torch ops.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from ds3dist.config import cache_root
from ds3dist.model.options import cpu_flags

MAX_ROWS = 4  # rows per expert the kernel takes; more go through GEMMs
MOE_TOKENS = 64  # tokens up to which moe_decode runs a whole layer's routed experts
BUILD_TIMEOUT_S = 600.0
_DIR = Path(__file__).with_name("kernels")
_SOURCES = sorted(_DIR.glob("*.cpp"))
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
log = logging.getLogger(__name__)


@functools.cache
def kernel():
    """The built extension module, or None where it is not used (see the module doc)."""
    if os.environ.get("DS3DIST_CPU_KERNEL", "1") == "0" or "avx512f" not in cpu_flags():
        return None
    parts = [*(f.read_bytes() for f in sorted(_DIR.iterdir())), torch.__version__.encode(),
             " ".join(_CFLAGS).encode(), " ".join(sorted(cpu_flags())).encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    name = f"ds3dist_kernels_{key}"
    build_dir = cache_root() / "kernels" / name
    failed = build_dir / "FAILED"  # an earlier build's error: not retried by every process
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive(build_dir / "build.lock", BUILD_TIMEOUT_S):
            if failed.exists():
                raise RuntimeError(f"an earlier build failed (delete {build_dir} to retry): "
                                   f"{failed.read_text()}")
            (build_dir / "lock").unlink(missing_ok=True)  # torch's baton from a killed build
            if not any(build_dir.glob(f"{name}*.so")):
                log.warning("building the CPU decode kernels into %s (once per machine, about "
                            "45 s)", build_dir)
            mod = _build(name, build_dir, failed)
    except Exception as e:  # no compiler, no ninja, a failed build, the lock timed out
        warnings.warn(f"the CPU decode kernels are not available ({type(e).__name__}: "
                      f"...{str(e)[-400:]}); decode runs as torch ops (slower)")
        return None
    return mod if mod.avx512() else None


def _int64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def grouped_experts(x_sd: torch.Tensor, experts: list[int], starts: list[int],
                    counts: list[int], w13_egd: torch.Tensor, w2_edi: torch.Tensor,
                    out_sd: torch.Tensor) -> None:
    """Rows starts[g] .. starts[g] + counts[g] - 1 of x_sd (1-4 each) through local expert
    experts[g] (bf16 weights w13 [E, 2I, D] = [gate; up], w2 [E, D, I]), into the same rows of
    out_sd. Needs kernel()."""
    kernel().grouped_experts(x_sd.contiguous(), _int64(experts), _int64(starts),
                             _int64(counts), w13_egd, w2_edi, out_sd)


def moe_decode(x_td: torch.Tensor, gate_w_ed: torch.Tensor, bias_e: torch.Tensor, n_group: int,
               topk_group: int, top_k: int, scaling: float, w13_egd: torch.Tensor,
               w2_edi: torch.Tensor, received_e: torch.Tensor) -> torch.Tensor:
    """A MoE layer's routed part for a few tokens with all E experts local (bf16): gate.route,
    then each token's K expert outputs (rows of an expert in chunks of MAX_ROWS), each rounded
    and scaled by its weight as Experts does, summed in float32 in k order as
    LocalDispatcher.combine does. Adds each expert's copies to received_e. Needs kernel()."""
    out_td = torch.empty_like(x_td)
    kernel().moe_decode(x_td.contiguous(), gate_w_ed, bias_e, n_group, topk_group, top_k,
                        scaling, w13_egd, w2_edi, out_td, received_e)
    return out_td


def has_int8_logits() -> bool:
    """Whether the kernels run int8_logits (built with AVX512-VNNI)."""
    mod = kernel()
    return mod is not None and hasattr(mod, "int8_logits")


def int8_logits(x_md: torch.Tensor, w_vd: torch.Tensor, w_scale_v: torch.Tensor,
                w_sum_v: torch.Tensor) -> torch.Tensor:
    """Approximate float32 logits [M, V] of rows x_md against an int8 head w_vd (per-row
    scales w_scale_v, row sums w_sum_v); x is quantized to int8 per row. Needs
    has_int8_logits()."""
    out = torch.empty(x_md.shape[0], w_vd.shape[0], dtype=torch.float32)
    kernel().int8_logits(x_md.float().contiguous(), w_vd, w_scale_v, w_sum_v, out)
    return out


def mla_decode(q_thc: torch.Tensor, rows: list[int], kv_lens: list[int],
               page_starts: list[int], page_ids: torch.Tensor, pool: torch.Tensor, r: int,
               scale: float, out_thr: torch.Tensor) -> None:
    """For each g (a query row, of a one-token or a short sequence): the query at row rows[g]
    of q_thc [T, H, C] attends (softmax of scale * q.k)
    to keys 0 .. kv_lens[g] - 1, held in the pages page_ids[page_starts[g]:] of pool
    [P, page, C]; the attended latents (first r columns) go to row rows[g] of out_thr."""
    kernel().mla_decode(q_thc.contiguous(), _int64(rows), _int64(kv_lens), _int64(page_starts),
                        page_ids, pool, r, scale, out_thr)


def _build(name: str, build_dir: Path, failed: Path):
    from torch.utils import cpp_extension  # imports setuptools: only when loading the kernel
    try:
        return cpp_extension.load(name=name, sources=[str(f) for f in _SOURCES],
                                  extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
                                  build_directory=str(build_dir))
    except (RuntimeError, OSError, ImportError) as e:
        failed.write_text(str(e)[-2000:])
        raise


@contextmanager
def _exclusive(path: Path, timeout_s: float):
    """An exclusive lock on path, released when the holder exits or dies."""
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} held by another build for over {timeout_s:.0f} s")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
