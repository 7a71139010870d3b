"""The accelerator figures the planner reasons with, one row per kind, each from a public source.

Per device (one GPU, or one CPU rank): memory (GB), HBM bandwidth (TB/s), dense peak
(TFLOPS, no sparsity) in BF16 and FP8 (0: no FP8 units; FP8 execution then runs at the BF16
rate), link bandwidth per direction to the other devices of its node (GB/s) and to other nodes
(GB/s, its share of the node's network), and the host link (GB/s per direction: what an
offload fetches over). Units are decimal (1 GB = 1e9 bytes). Each can be overridden per
cluster (`Accelerator.with_figures`, the cluster.figures keys).

The `cpu` kind is not a datasheet's: `this_machine()` measures the machine the planner runs on
(memory, and per core a large copy's bandwidth and torch's matrix-multiply rates), once per
process, and one CPU rank gets its share of it (`cpu_rank`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_gb: float
    hbm_tbps: float
    bf16_tflops: float
    fp8_tflops: float
    intra_gbps: float  # per direction, to the node's other devices
    inter_gbps: float  # per direction, to other nodes (one NIC's share)
    host_gbps: float  # per direction, to host memory (PCIe)

    def peak_flops(self, execution: str) -> float:
        fp8 = execution == "fp8" and self.fp8_tflops > 0
        return (self.fp8_tflops if fp8 else self.bf16_tflops) * 1e12

    def with_figures(self, **figures: float) -> "Accelerator":
        """A copy with some figures replaced (the cluster's overrides)."""
        return replace(self, **figures)


FIGURES = tuple(f.name for f in fields(Accelerator) if f.name != "name")

ACCELERATORS = {
    # NVIDIA H100 Tensor Core GPU datasheet (H100 SXM5): 80 GB HBM3 at 3.35 TB/s, BF16
    # 989 TFLOPS and FP8 1,979 TFLOPS dense (the datasheet's figures halved: they are with
    # sparsity), NVLink 900 GB/s (both directions), PCIe Gen5 128 GB/s (both directions);
    # inter-node: NVIDIA DGX H100 datasheet, one 400 Gb/s ConnectX-7 port per GPU.
    "h100": Accelerator("h100", 80, 3.35, 989, 1979, 450, 50, 64),
    # NVIDIA H200 Tensor Core GPU datasheet (H200 SXM): 141 GB HBM3e at 4.8 TB/s, the same
    # compute and NVLink as the H100 SXM; inter-node: NVIDIA HGX H200 (400 Gb/s per GPU).
    "h200": Accelerator("h200", 141, 4.8, 989, 1979, 450, 50, 64),
    # NVIDIA H800 SXM5 product brief: H100 SXM5 memory and compute, NVLink cut to 400 GB/s
    # (both directions); inter-node as in the DeepSeek-V3 technical report (section 3.1:
    # 400 Gb/s InfiniBand per GPU).
    "h800": Accelerator("h800", 80, 3.35, 989, 1979, 200, 50, 64),
    # NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM): 2,039 GB/s HBM2e, BF16 312
    # TFLOPS dense, no FP8, NVLink 600 GB/s (both directions), PCIe Gen4 64 GB/s (both);
    # inter-node: NVIDIA DGX A100 datasheet, one 200 Gb/s HDR port per GPU.
    "a100": Accelerator("a100", 80, 2.039, 312, 0, 300, 25, 32),
    # NVIDIA HGX B200 datasheet, per GPU (the 8-GPU board's figures / 8): 180 GB HBM3e at
    # 7.7 TB/s, BF16 2.25 PFLOPS and FP8 4.5 PFLOPS dense, NVLink 1.8 TB/s (both directions);
    # inter-node: NVIDIA DGX B200 datasheet, one 400 Gb/s ConnectX-7 port per GPU.
    "b200": Accelerator("b200", 180, 7.7, 2250, 4500, 900, 50, 64),
    # AMD Instinct MI300X data sheet: 192 GB HBM3 at 5.3 TB/s, BF16 1,307.4 TFLOPS and FP8
    # 2,614.9 TFLOPS dense, Infinity Fabric 896 GB/s peer-to-peer (both directions), PCIe Gen5
    # 128 GB/s (both); inter-node: AMD Instinct MI300X platform brief, 400 Gb/s per GPU.
    "mi300x": Accelerator("mi300x", 192, 5.3, 1307.4, 2614.9, 448, 50, 64),
}

# What a CPU rank's links are taken as (not measured): ranks of a node exchange through gloo
# over loopback TCP (about 20 GB/s per direction on a current server core pair), nodes over a
# 100 Gb/s Ethernet port; the host is the device (an offload's fetch is a memory copy: 300).
CPU_LINKS = {"intra_gbps": 20.0, "inter_gbps": 12.5, "host_gbps": 300.0}

# The measurements' shapes: a decode step's matrix multiply on `small` (8 rows, hidden 1024,
# the dense MLP's 2816), over enough distinct weights to leave the caches (as a decode step
# reads its weights from memory); a large square one (the reachable compute rate); a copy
# large enough to leave the caches.
DECODE_GEMM = (8, 1024, 2816)
LARGE_GEMM = 2048
COPY_BYTES = 256 * 2**20


@dataclass(frozen=True)
class MachineFigures:
    """This machine: its cores and memory, and what one core does through torch (one thread:
    a core's figures do not depend on what else runs on the machine, which a multi-threaded
    matmul's barriers do). Decimal units."""
    cores: int
    memory_gb: float  # physical memory (MemTotal)
    copy_tbps: float  # a large copy: bytes read + written per second
    large_tflops: float  # a [n x n] x [n x n] matmul in bfloat16
    decode_tflops: float  # DECODE_GEMM in bfloat16, weights from memory, packed as the model
    # packs them on CPUs
    decode_tbps: float  # DECODE_GEMM's weight bytes per second


def meminfo_gb(field: str) -> float | None:
    """A /proc/meminfo figure (MemTotal, MemAvailable, ...) in GB, or None without it."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def _memory_gb() -> float:
    total = meminfo_gb("MemTotal")
    return total if total is not None else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def this_machine() -> MachineFigures:
    """Measure this machine once per process (about a second): one torch thread, the best of
    a few repeats of each."""
    import torch

    from ds3dist.model.linear import fastest_seconds, packed_linear, packed_weight

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            src = torch.ones(COPY_BYTES // 4, dtype=torch.float32)
            dst = torch.empty_like(src)
            copy_s = fastest_seconds(lambda: dst.copy_(src), 5)
            n = LARGE_GEMM
            a = torch.randn(n, n, dtype=torch.bfloat16)
            b = torch.randn(n, n, dtype=torch.bfloat16)
            large_s = fastest_seconds(lambda: torch.mm(a, b), 3)
            m, k, out = DECODE_GEMM
            weights = [torch.full((out, k), 0.01 * i, dtype=torch.bfloat16) for i in range(48)]
            x = torch.randn(m, k, dtype=torch.bfloat16)
            packed = [packed_weight(w) for w in weights]  # as the model holds them on CPUs

            def decode() -> None:
                for w, p in zip(weights, packed):  # 48 x 5.8 MB: more than the caches hold
                    packed_linear(x, p) if p is not None else torch.nn.functional.linear(x, w)

            decode_s = fastest_seconds(decode, 5) / len(weights)
    finally:
        torch.set_num_threads(threads)
    return MachineFigures(
        cores=_cores(), memory_gb=_memory_gb(), copy_tbps=2 * COPY_BYTES / copy_s / 1e12,
        large_tflops=2 * n**3 / large_s / 1e12, decode_tflops=2 * m * k * out / decode_s / 1e12,
        decode_tbps=k * out * 2 / decode_s / 1e12)


def cpu_rank(ranks_per_node: int) -> Accelerator:
    """One CPU rank of a node like this machine running `ranks_per_node` ranks: its share of
    the memory, and its cores' worth (the launch's share, cores // ranks, at least one) of a
    core's figures: memory bandwidth as a decode step's matrix multiplies reach it reading
    weights from memory (at most the copy's), compute as the large matmul's rate. Cores are
    taken to add up (shared memory bandwidth saturating is not modelled)."""
    m = this_machine()
    cores = max(1, m.cores // ranks_per_node)
    return Accelerator("cpu", m.memory_gb / ranks_per_node,
                       min(m.copy_tbps, m.decode_tbps) * cores, m.large_tflops * cores, 0,
                       **CPU_LINKS)


KINDS = (*ACCELERATORS, "cpu")  # what cluster.gpu accepts


def accelerator(kind: str, per_node: int) -> Accelerator:
    """The figures of one device of a kind: the table's row, or for `cpu` this machine's
    share per rank when a node runs `per_node` ranks."""
    return cpu_rank(per_node) if kind == "cpu" else ACCELERATORS[kind]
