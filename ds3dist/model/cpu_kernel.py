"""CPU kernels for decode (kernels/*.cpp): routed experts at 1-4 rows, a whole MoE layer's
routing and experts for a few tokens, absorbed MLA attention of short queries over the paged
cache, and approximate logits against an int8 head (speculative drafts, AVX512-VNNI).

At decode row counts a step is mostly fixed costs: about 14 us per oneDNN call and a few us
per small torch op, for each expert and each sequence of each layer. The kernels do each
layer's experts in one call (each weight read once for all its rows) and each layer's decode
attention in one call (straight from the pages). Every output row is computed alone, in a
fixed order, so a row does not depend on what shares its batch.

Built once per machine with torch's C++ extension tooling (a C++ compiler and ninja; about
a minute on 2 cores) into torch's extension folder ($TORCH_EXTENSIONS_DIR, else
~/.cache/torch_extensions/<python>_<accelerator>/), under a file lock every process waits on for
at most BUILD_TIMEOUT_S: `python -m ds3dist.build_ops` and the launch build them up front, and a
process that meets no build builds it where it first needs it. Used on CPUs with AVX-512.
Elsewhere, when the build fails (a warning says why, once), or with DS3DIST_CPU_KERNEL=0, the
same math runs as torch ops.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ds3dist.model.options import cpu_flags

MAX_ROWS = 4  # rows per expert the kernel takes; more go through GEMMs
MOE_TOKENS = 64  # tokens up to which moe_decode runs a whole layer's routed experts
BUILD_TIMEOUT_S = 600.0
_DIR = Path(__file__).with_name("kernels")
_SOURCES = sorted(_DIR.glob("*.cpp"))
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Build:
    """The kernels on this machine: the loaded module, or why there is none (unavailable: not
    for this CPU or switched off; error: the build failed)."""
    module: Any = None
    unavailable: str = ""
    error: str = ""


def unavailable() -> str:
    """Why the kernels are not used on this machine, or "" where they are."""
    if os.environ.get("DS3DIST_CPU_KERNEL", "1") == "0":
        return "switched off by DS3DIST_CPU_KERNEL=0"
    if "avx512f" not in cpu_flags():
        return "this CPU has no AVX-512"
    return ""


def extensions_dir() -> Path:
    """torch's folder of built C++ extensions, where DeepSpeed's ops are built too."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    accel = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
             f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "torch_extensions" / f"{py}_{accel}"


def build_dir() -> Path:
    """This source (and its place), torch and CPU's build folder (a new one when any of them
    changes)."""
    parts = [str(_DIR).encode(),  # a checkout of its own: ninja rebuilds for moved sources
             *(f.read_bytes() for f in sorted(_DIR.iterdir())), torch.__version__.encode(),
             " ".join(_CFLAGS).encode(), " ".join(sorted(cpu_flags())).encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return extensions_dir() / f"ds3dist_kernels_{key}"


def is_built() -> bool:
    d = build_dir()
    return any(d.glob(f"{d.name}*.so"))


@functools.cache
def load() -> Build:
    """The kernels, built first where this machine has no build yet (see the module doc)."""
    why = unavailable()
    if why:
        return Build(unavailable=why)
    d = build_dir()
    failed = d / "FAILED"  # an earlier build's error: not retried by every process
    try:
        with build_lock(d):
            if failed.exists():
                raise RuntimeError(f"an earlier build failed (delete {d} to retry): "
                                   f"{failed.read_text()}")
            if not is_built():
                log.warning("building the CPU decode kernels into %s (once per machine, about "
                            "a minute)", d)
            mod = _build(d.name, d, failed)
    except Exception as e:  # no compiler, no ninja, a failed build, the lock timed out
        error = f"{type(e).__name__}: ...{str(e)[-400:]}"
        warnings.warn(f"the CPU decode kernels are not available ({error}); decode runs as "
                      f"torch ops (slower)")
        return Build(error=error)
    if not mod.avx512():
        return Build(unavailable="built without AVX-512 (the compiler's -march=native)")
    return Build(module=mod)


def kernel():
    """The built extension module, or None where it is not used (see the module doc)."""
    return load().module


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
def build_lock(folder: Path, timeout_s: float = BUILD_TIMEOUT_S):
    """Sole use of an extension's build folder among ds3dist's processes (waited for at most
    timeout_s); torch's own baton file left there by a killed build, on which torch would wait
    forever, is cleared."""
    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder / "build.lock", timeout_s):
        (folder / "lock").unlink(missing_ok=True)
        yield


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
