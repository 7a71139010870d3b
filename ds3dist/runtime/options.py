"""The runtime's options as plain data (no torch, no Ray): how the Ray engine runs its ranks
(RuntimeOptions, the launch's runtime.* keys) and the weight offload (OffloadOptions,
execution.offload.*). Every default is written here once; the launch's schema takes its
defaults from these classes."""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

BACKENDS = ("deepspeed",)
DEVICES = ("cpu", "nvme")
PARAMS = ("layers", "experts")
INSTALL_HINT = "pip install 'ds3dist[deepspeed]' (or: pip install deepspeed)"


class OffloadError(RuntimeError):
    """The offload cannot be set up; the message names the execution.offload setting."""


@dataclass(frozen=True)
class RuntimeOptions:
    """runtime.*: the Ray cluster, the ranks' CPUs, timeouts, replicas and recovery."""
    address: str | None = None  # Ray address; None: $RAY_ADDRESS, else a new local cluster
    num_cpus: int | None = None  # logical CPUs of a new local cluster (None: max(8, ranks x cpus))
    connect_timeout_s: float = 30.0  # an existing cluster must answer within this
    cpus_per_rank: int | None = None  # CPUs (= torch threads) per rank; None: by layout
    rendezvous_port: int | None = None  # torch.distributed port on rank 0 (None: a free one)
    collective_timeout_s: float = 120.0  # a collective slower than this fails
    startup_timeout_s: float = 600.0  # placement, process groups and weight loading
    replicas: int = 1  # independent engines (pp x ep ranks each) fed from the one input
    max_restarts: int = 3  # rebuilds of each replica after a lost rank, node or hung step
    drain_timeout_s: float = 20.0  # after SIGTERM/SIGINT: how long requests in flight may finish

    @property
    def new_local_cluster(self) -> bool:
        """Whether the launch starts a Ray cluster of its own on this host (no runtime.address,
        no $RAY_ADDRESS), so that its ranks run here."""
        return not (self.address or os.environ.get("RAY_ADDRESS"))

    def rank_cpus(self, ranks: int) -> int:
        """CPUs (and torch threads) per rank: cpus_per_rank, else a new local cluster shares
        this machine's cores between its `ranks`, and on an existing cluster each rank gets
        one."""
        if self.cpus_per_rank:
            return self.cpus_per_rank
        if not self.new_local_cluster:
            return 1
        return max(1, (os.cpu_count() or 1) // ranks)

    def rank_threads(self, ranks: int, threads: int | None = None) -> int:
        """Torch threads per rank, the one rule for the launch and the Python API's Engine:
        `threads` (ServingOptions.threads), else $DS3DIST_TORCH_THREADS, else rank_cpus."""
        return threads or int(os.environ.get("DS3DIST_TORCH_THREADS") or self.rank_cpus(ranks))

    def cluster_cpus(self, ranks: int) -> int:
        """Logical CPUs of a new local cluster: num_cpus, else room for `ranks` ranks, and
        at least 8."""
        return self.num_cpus or max(8, ranks * self.rank_cpus(ranks))


@dataclass(frozen=True)
class OffloadOptions:
    """execution.offload: where a rank's offloaded weights live and what is offloaded.

    device: cpu (host memory) | nvme (files under nvme_path, read with async I/O)
    params: layers (every decoder layer the rank holds; embedding, head and MTP layer stay
            resident) | experts (only the routed experts, most of the bytes)
    prefetch_layers: units fetched ahead of the one computing
    pin_memory: page-locked host buffers (GPU only)
    """

    backend: str = "deepspeed"
    device: str = "cpu"
    nvme_path: str | None = None
    params: str = "layers"
    prefetch_layers: int = 1
    pin_memory: bool = True

    def problems(self) -> list[str]:
        out = []
        for key, value, allowed in (("backend", self.backend, BACKENDS),
                                    ("device", self.device, DEVICES),
                                    ("params", self.params, PARAMS)):
            if value not in allowed:
                out.append(f"execution.offload.{key}: must be one of {list(allowed)}, "
                           f"got {value!r}")
        if self.device == "nvme" and not self.nvme_path:
            out.append("execution.offload.nvme_path: needed with device=nvme (a directory on "
                       "a local NVMe drive, one folder per rank is made in it)")
        if self.prefetch_layers < 0:
            out.append(f"execution.offload.prefetch_layers: must be >= 0, got "
                       f"{self.prefetch_layers}")
        return out

    def check_host(self) -> None:
        """On the host that runs ranks, before loading (device=nvme): nvme_path is (or can be
        made) a folder this process can write in, and libaio can be loaded. OffloadError
        names the key."""
        if self.device != "nvme":
            return
        folder = Path(self.nvme_path or "").expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OffloadError(f"execution.offload.nvme_path: cannot make {folder} on "
                               f"{socket.gethostname()}: {e.strerror}") from None
        if not folder.is_dir():
            raise OffloadError(f"execution.offload.nvme_path: {folder} is not a folder on "
                               f"{socket.gethostname()} (device=nvme keeps a swap folder per "
                               f"rank in it)")
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".ds3dist-probe"):
                pass
        except OSError as e:
            raise OffloadError(f"execution.offload.nvme_path: cannot write in {folder} on "
                               f"{socket.gethostname()}: {e.strerror}") from None
        if ctypes.util.find_library("aio") is None:
            raise OffloadError(f"execution.offload.device=nvme: libaio is not installed on "
                               f"{socket.gethostname()} (DeepSpeed's async I/O needs it: "
                               f"apt-get install libaio-dev)")

    def holds(self, module_name: str) -> bool:
        """Whether the Transformer module `module_name` belongs to an offload unit."""
        if self.params == "experts":
            return ".mlp.experts." in module_name
        return module_name.startswith("layers.")


def deepspeed_missing() -> str | None:
    """Why the deepspeed backend cannot be used here (not installed), or None."""
    try:
        found = importlib.util.find_spec("deepspeed") is not None
    except ValueError:  # deepspeed in sys.modules as None: import blocked
        found = False
    if not found:
        return f"DeepSpeed is not installed: {INSTALL_HINT}"
    return None
