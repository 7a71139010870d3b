"""CPU kernels for decode (kernels/*.cpp): routed experts at 1-4 rows, a whole MoE layer's
routing and experts for a few tokens, absorbed MLA attention of short queries over the paged
cache, a few rows against a bf16 weight (linear), and approximate logits against an int8 head
(speculative drafts).

At decode row counts a step is mostly fixed costs and weight reads: about 14 us per oneDNN
call and a few us per small torch op, for each expert and each sequence of each layer, and
on a CPU without bf16 instructions torch converts a bf16 weight whole on every call. The
kernels do each layer's experts in one call (each weight read once for all its rows, bf16
widened in registers) and each layer's decode attention in one call (straight from the pages).
Every output row is computed alone, in a fixed order, so a row does not depend on what shares
its batch.

One source, written over ATen's portable vectors, compiled once per instruction set (ISAS:
AVX-512, AVX2 + FMA, ARM NEON, plain C++) with torch's C++ extension tooling (a C++ compiler
and ninja; about 30 s each on 2 cores) into torch's extension folder ($TORCH_EXTENSIONS_DIR,
else ~/.cache/torch_extensions/<python>_<accelerator>/), under a file lock every process waits
on for at most BUILD_TIMEOUT_S. A process uses the build for torch's own CPU capability
(torch.backends.cpu.get_cpu_capability(), which ATEN_CPU_CAPABILITY=avx2 lowers):
`python -m ds3dist.build_ops` and the launch build it (and the other x86 ones this CPU runs)
up front, and a process that meets no build builds it where it first needs it. When the build
fails (a warning says why, once), or with DS3DIST_CPU_KERNEL=0, the same math runs as torch ops.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
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
LINEAR_ROWS = 16  # rows up to which a bf16 Linear may take the kernel (linear.LinearPath)
BUILD_TIMEOUT_S = 600.0
ISAS = ("avx512", "avx2", "neon", "default")  # best first
_DIR = Path(__file__).with_name("kernels")
_SOURCES = sorted(_DIR.glob("*.cpp"))
_CFLAGS = ["-O3", "-fopenmp"]
# compiler flags and the CPU flags each needs (ATen's CPU_CAPABILITY picks its vector type)
_ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "neon": ["-DCPU_CAPABILITY=DEFAULT"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}
_ISA_NEEDS = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"},
              "avx2": {"avx2", "fma", "f16c"}, "neon": set(), "default": set()}
_ARM = platform.machine().lower() in ("aarch64", "arm64")
log = logging.getLogger(__name__)
_chosen: str | None = None  # use_isa()


@dataclass(frozen=True)
class Build:
    """The kernels on this machine: the loaded module, or why there is none (unavailable: not
    for this CPU or switched off; error: the build failed)."""
    module: Any = None
    unavailable: str = ""
    error: str = ""


def host_isa() -> str:
    """The build this process uses: torch's CPU capability (ATEN_CPU_CAPABILITY lowers it)."""
    if _ARM:
        return "neon"
    cap = torch.backends.cpu.get_cpu_capability().lower()
    return cap if cap in ("avx512", "avx2") else "default"


def runnable_isas() -> list[str]:
    """The builds this CPU can run, best first."""
    if _ARM:
        return ["neon"]
    flags = cpu_flags()
    return [isa for isa in ISAS if isa != "neon" and _ISA_NEEDS[isa] <= flags]


def variants() -> list[str]:
    """What build_ops builds: this process's build and the vector ones below it (so that
    ATEN_CPU_CAPABILITY may choose any without a build, and tests check each)."""
    host = host_isa()
    below = runnable_isas()[runnable_isas().index(host):] if host in runnable_isas() else [host]
    return [host] + [isa for isa in below[1:] if isa != "default"]


def active_isa() -> str:
    return _chosen or host_isa()


@contextmanager
def use_isa(isa: str):
    """Run the kernels of another build (one runnable_isas() lists) inside the block."""
    global _chosen
    if isa not in runnable_isas():
        raise ValueError(f"this CPU cannot run the {isa} build (it runs {runnable_isas()})")
    before, _chosen = _chosen, isa
    try:
        yield
    finally:
        _chosen = before


def unavailable() -> str:
    """Why the kernels are not used on this machine, or "" where they are."""
    if os.environ.get("DS3DIST_CPU_KERNEL", "1") == "0":
        return "switched off by DS3DIST_CPU_KERNEL=0"
    return ""


def usable() -> bool:
    """Whether this process's kernels are on and not known to have failed to build (cheap:
    builds nothing)."""
    return not unavailable() and not (build_dir() / "FAILED").exists()


def isa_flags(isa: str) -> list[str]:
    flags = list(_ISA_FLAGS[isa]) + [f"-DDS3DIST_ISA={isa}"]
    if isa == "avx512" and "avx512_vnni" in cpu_flags():
        flags.append("-mavx512vnni")  # int8_logits takes vpdpbusd
    if isa == "neon" and "asimddp" in cpu_flags():
        flags.append("-march=armv8.2-a+dotprod")  # int8_logits takes sdot
    return flags


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


def build_dir(isa: str | None = None) -> Path:
    """The build folder of one instruction set's build of this source (and its place), torch
    and compiler flags (a new one when any of them changes)."""
    isa = isa or active_isa()
    parts = [str(_DIR).encode(),  # a checkout of its own: ninja rebuilds for moved sources
             *(f.read_bytes() for f in sorted(_DIR.iterdir())), torch.__version__.encode(),
             " ".join(_CFLAGS + isa_flags(isa)).encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return extensions_dir() / f"ds3dist_kernels_{isa}_{key}"


def is_built(isa: str | None = None) -> bool:
    d = build_dir(isa)
    return any(d.glob(f"{d.name}*.so"))


@functools.cache
def load(isa: str | None = None) -> Build:
    """One instruction set's kernels (this process's by default), built first where this
    machine has no build yet (see the module doc)."""
    why = unavailable()
    if why:
        return Build(unavailable=why)
    isa = isa or active_isa()
    d = build_dir(isa)
    failed = d / "FAILED"  # an earlier build's error: not retried by every process
    try:
        with build_lock(d):
            if failed.exists():
                raise RuntimeError(f"an earlier build failed (delete {d} to retry): "
                                   f"{failed.read_text()}")
            if not is_built(isa):
                log.warning("building the CPU decode kernels (%s) into %s (once per machine, "
                            "about 30 s)", isa, d)
            mod = _build(d.name, d, failed, isa)
    except Exception as e:  # no compiler, no ninja, a failed build, the lock timed out
        error = f"{type(e).__name__}: ...{str(e)[-400:]}"
        warnings.warn(f"the CPU decode kernels ({isa}) are not available ({error}); decode "
                      f"runs as torch ops (slower)")
        return Build(error=error)
    return Build(module=mod)


def kernel():
    """The built extension module of active_isa(), or None where it is not used (see the
    module doc)."""
    return load(active_isa()).module


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
    """Whether the kernels run int8_logits (wherever they are built)."""
    return kernel() is not None


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


def linear(x_mk: torch.Tensor, w_nk: torch.Tensor) -> torch.Tensor:
    """x_mk [M, K] (bf16 or float32) @ w_nk.T for a contiguous bf16 weight [N, K], in x's
    dtype; each weight row read once for every 4 rows of x. Needs kernel()."""
    out = torch.empty(x_mk.shape[0], w_nk.shape[0], dtype=x_mk.dtype)
    kernel().linear(x_mk, w_nk, out)
    return out


def _build(name: str, build_dir: Path, failed: Path, isa: str):
    from torch.utils import cpp_extension  # imports setuptools: only when loading the kernel
    try:
        return cpp_extension.load(name=name, sources=[str(f) for f in _SOURCES],
                                  extra_cflags=_CFLAGS + isa_flags(isa),
                                  extra_ldflags=["-fopenmp"], build_directory=str(build_dir))
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
