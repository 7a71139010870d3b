"""The accelerator figures the planner reasons with, one row per kind, each from a public source.

Per device (one GPU, or one CPU rank): memory (GB), HBM bandwidth (TB/s), dense peak
(TFLOPS, no sparsity) in BF16 and FP8 (0: no FP8 units; FP8 execution then runs at the BF16
rate), link bandwidth per direction to the other devices of its node (GB/s) and to other nodes
(GB/s, its share of the node's network), and the host link (GB/s per direction: what an
offload fetches over). Units are decimal (1 GB = 1e9 bytes). Each can be overridden per
cluster (`Accelerator.with_figures`).
"""

from __future__ import annotations

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
    # One CPU rank: nominal figures, not a datasheet's (override them for the machine):
    # one socket of an 8-channel DDR5-4800 server (JEDEC DDR5-4800: 38.4 GB/s a channel),
    # 256 GB of it; ~4 TFLOPS of BF16 matrix throughput reached by torch (the AMX peak is far
    # higher; the CPU path's kernels do not come near it); shared memory between ranks of a
    # node, a 100 Gb/s Ethernet port between nodes.
    "cpu": Accelerator("cpu", 256, 0.307, 4, 0, 20, 12.5, 300),
}
