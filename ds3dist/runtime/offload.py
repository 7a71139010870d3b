"""ZeRO-Inference weight offload: a rank's decoder layers (or only their routed experts) held
by DeepSpeed ZeRO-3 in host memory or on NVMe and fetched layer by layer, with prefetch, for
each step.

Each offload unit (a DecoderLayer; or a MoE layer, holding only its routed experts' weights)
becomes a ZeRO-3 leaf module with one parameter: every weight tensor of the offloaded part
(its buffers and the fused, stacked or dequantized forms load_model made) copied into one flat
buffer of 2-byte words, the one dtype DeepSpeed's NVMe swapper keeps for every accelerator.
Each tensor is a slot: a view of that buffer (dtype, shape, stride, offset). When the unit is
called, DeepSpeed's pre-forward hook fetches the buffer; ours then points every slot at its
view and remakes the oneDNN-packed copies (CPU); after the forward ours drops them, before
DeepSpeed releases the buffer. So the unit computes with exactly the tensors it had, on the
same path (the fused MoE decode kernel included), and the model knows nothing of this.

Each rank partitions over a process group of its own rank (the worker makes it): its weights
are its own, nothing is sharded further.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ds3dist.core.engine import OffloadStats
from ds3dist.model.load import pack_weights, unpack_weights
from ds3dist.model.transformer import Transformer
from ds3dist.runtime.options import INSTALL_HINT, OffloadError, OffloadOptions

WORD = torch.bfloat16  # the flat buffer's dtype (DeepSpeed swaps parameters as 2-byte words)
ALIGN = 64  # bytes: every tensor's region starts at a multiple (any dtype views it)


def units(model: Transformer, params: str) -> list[tuple[nn.Module, nn.Module]]:
    """(module, part) in the order a step calls them: the part's weights are offloaded and
    fetched when the module is called. A decoder layer is its own part; a MoE layer's routed
    experts are fetched when the MoE layer is called, since its fused decode path
    (cpu_kernel.moe_decode) reads them without calling its Experts."""
    if params == "experts":
        return [(moe, moe.experts) for moe in model.moe_layers().values()]
    return [(layer, layer) for layer in model.layers.values()]


# ---- slots: a unit's tensors as views of one flat buffer -----------------------------------
@dataclass(frozen=True)
class _Slot:
    module: nn.Module
    name: str  # buffer or attribute name
    in_tuple: bool  # an element of a tuple attribute (its slots come in the tuple's order)
    is_buffer: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # in elements of dtype from the buffer's start


def _held_tensors(unit: nn.Module) -> Iterator[tuple[nn.Module, str, bool, bool, torch.Tensor]]:
    """Every non-empty tensor the unit's modules hold: buffers, tensor attributes, tuples."""
    for m in unit.modules():
        for name, t in m._buffers.items():
            if t is not None and t.numel():
                yield m, name, False, True, t
        for name, v in vars(m).items():
            if isinstance(v, torch.Tensor) and v.numel():
                yield m, name, False, False, v
            elif isinstance(v, tuple) and v and all(isinstance(t, torch.Tensor) for t in v):
                for t in v:
                    yield m, name, True, False, t


def flatten(unit: nn.Module) -> tuple[torch.Tensor, list[_Slot]]:
    """The unit's tensors copied into one flat WORD buffer (views of one storage share one
    region), and their slots. The unit's packed copies must be dropped first."""
    held = list(_held_tensors(unit))
    regions: dict[int, tuple[int, torch.UntypedStorage]] = {}  # storage ptr -> (byte offset, s)
    total = 0
    for *_, t in held:
        s = t.untyped_storage()
        if s.data_ptr() not in regions:
            regions[s.data_ptr()] = (total, s)
            total += -(-s.nbytes() // ALIGN) * ALIGN
    device = held[0][-1].device if held else torch.device("cpu")
    flat = torch.empty(total // WORD.itemsize, dtype=WORD, device=device)
    flat_bytes = flat.view(torch.uint8)
    for start, s in regions.values():
        flat_bytes[start:start + s.nbytes()].copy_(
            torch.empty(0, dtype=torch.uint8, device=s.device).set_(s))
    slots = [_Slot(m, name, in_tuple, is_buf, t.dtype, tuple(t.shape), tuple(t.stride()),
                   regions[t.untyped_storage().data_ptr()][0] // t.element_size()
                   + t.storage_offset())
             for m, name, in_tuple, is_buf, t in held]
    return flat, slots


def restore(flat: torch.Tensor, slots: list[_Slot]) -> None:
    """Point every slot at its view of `flat` (fetched)."""
    tuples: dict[tuple[int, str], tuple[nn.Module, str, list[torch.Tensor]]] = {}
    for s in slots:
        base = flat.view(s.dtype)
        t = base.as_strided(s.shape, s.stride, base.storage_offset() + s.offset)
        if s.is_buffer:
            s.module._buffers[s.name] = t
        elif s.in_tuple:
            tuples.setdefault((id(s.module), s.name), (s.module, s.name, []))[2].append(t)
        else:
            setattr(s.module, s.name, t)
    for module, name, parts in tuples.values():
        setattr(module, name, tuple(parts))


def drop(slots: list[_Slot], device: torch.device) -> None:
    """Replace every slot by a placeholder (an empty tensor of its dtype; None for
    attributes), so nothing keeps the fetched buffer alive once DeepSpeed releases it."""
    for s in slots:
        if s.is_buffer:
            s.module._buffers[s.name] = torch.empty(0, dtype=s.dtype, device=device)
        else:
            setattr(s.module, s.name, None)


# ---- DeepSpeed ----------------------------------------------------------------------------
def ds_config(opt: OffloadOptions, unit_words: list[int], swap_folder: str | None,
              gpu: bool) -> dict:
    """The DeepSpeed config: ZeRO-3, parameter offload, no persistence (everything in a unit
    is offloaded), nothing kept past its use, `prefetch_layers` units fetched ahead."""
    largest = max(unit_words)
    offload = {"device": opt.device, "pin_memory": bool(opt.pin_memory and gpu)}
    if opt.device == "nvme":
        offload.update(nvme_path=swap_folder, buffer_count=opt.prefetch_layers + 2,
                       buffer_size=largest)
    return {
        "train_batch_size": 1,
        "zero_optimization": {
            "stage": 3,
            "offload_param": offload,
            "memory_efficient_linear": False,  # else DeepSpeed replaces F.linear globally
            "stage3_param_persistence_threshold": 0,
            "stage3_model_persistence_threshold": 0,
            "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": opt.prefetch_layers * largest,
            "stage3_max_live_parameters": (opt.prefetch_layers + 1) * largest,
        },
    }


def swap_dir(nvme_path: str, host: str | None = None, pid: int | None = None) -> Path:
    """The swap folder under nvme_path of the rank process `pid` on `host` (default: this
    process)."""
    host, pid = host or socket.gethostname(), pid or os.getpid()
    return Path(nvme_path).expanduser() / f"ds3dist-{host}-{pid}"


def remove_swap_dirs(nvme_path: str, ranks: list[dict]) -> None:
    """Remove the swap folders of ranks ({"hostname", "pid"}) that ran on this host (the
    engine's shutdown kills its ranks; a rank's own start removes stale ones on its host)."""
    here = socket.gethostname()
    for r in ranks:
        if r.get("hostname") == here:
            shutil.rmtree(swap_dir(nvme_path, here, r["pid"]), ignore_errors=True)


def _own_swap_dir(nvme_path: str) -> str:
    """This process's swap folder, made empty; folders of processes of this host that no
    longer run (killed ranks') are removed first."""
    own = swap_dir(nvme_path)
    for old in own.parent.glob(f"ds3dist-{socket.gethostname()}-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    try:
        own.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OffloadError(f"execution.offload.nvme_path: cannot create {own}: {e}") from None
    return str(own)


class _OneRank:
    """The model-parallel unit DeepSpeed asks for: data parallelism over one rank."""

    def __init__(self, group):
        self.group = group

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_world_size(self) -> int:
        return 1

    def get_data_parallel_rank(self) -> int:
        return 0

    get_model_parallel_group = get_data_parallel_group
    get_model_parallel_world_size = get_data_parallel_world_size
    get_model_parallel_rank = get_data_parallel_rank


def import_deepspeed(device_type: str):
    """deepspeed, with its accelerator chosen by the rank's device (set before import)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device_type == "cuda" else "cpu")
    os.environ.setdefault("LOCAL_RANK", "0")  # each rank sees its one device as 0
    try:
        import deepspeed
    except ImportError as e:
        raise OffloadError(f"execution.offload.backend=deepspeed: cannot import deepspeed "
                           f"({e}); {INSTALL_HINT}") from None
    return deepspeed


def _skip_world_trace_check() -> None:
    """DeepSpeed's coordinator checks, at the first reset_step, that every rank of the world
    recorded the same module order, by broadcasts on the world group (a data-parallel
    assumption). Here each rank is a data-parallel world of its own, holding other layers
    than its peers: those broadcasts would pair with unrelated ranks' (a pipeline hangs)."""
    from deepspeed.runtime.zero import partitioned_param_coordinator

    partitioned_param_coordinator.assert_ints_same_as_other_ranks = lambda ints: None


class Offloaded:
    """A model part whose offload units DeepSpeed holds; call begin_step() before each step."""

    def __init__(self, model: Transformer, opt: OffloadOptions, group, rank: int,
                 device: torch.device):
        deepspeed = import_deepspeed(device.type)
        from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
        from deepspeed.utils import set_z3_leaf_module

        deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), verbose=False,
                                        auto_mpi_discovery=False)
        _skip_world_trace_check()
        pairs = units(model, opt.params)
        self.units = [unit for unit, _ in pairs]
        self.device = device
        self.zero = None
        slots = []
        for unit, part in pairs:
            unpack_weights(part)
            flat, part_slots = flatten(part)
            drop(part_slots, device)
            unit.register_parameter("offload_words", nn.Parameter(flat, requires_grad=False))
            set_z3_leaf_module(unit, True)
            slots.append(part_slots)
        words = [u.offload_words.numel() for u in self.units]
        self.bytes = sum(words) * WORD.itemsize
        # fetched at once: the unit computing and those prefetched
        self.window_bytes = (opt.prefetch_layers + 1) * max(words, default=0) * WORD.itemsize
        if not self.units:
            return
        swap = _own_swap_dir(opt.nvme_path) if opt.device == "nvme" else None
        cfg = ds_config(opt, words, swap, device.type == "cuda")
        mpu = _OneRank(group)
        zc = deepspeed.runtime.config.DeepSpeedConfig(cfg, mpu=mpu).zero_config
        self.zero = DeepSpeedZeRoOffload(  # hooks the units only: not the rest of the model
            nn.ModuleList(self.units), timers=None, ds_config=cfg,
            overlap_comm=zc.overlap_comm, prefetch_bucket_size=zc.prefetch_bucket_size,
            max_reuse_distance=zc.max_reuse_distance,
            max_live_parameters=zc.max_live_parameters,
            param_persistence_threshold=zc.param_persistence_threshold,
            model_persistence_threshold=zc.model_persistence_threshold,
            offload_param_config=zc.offload_param, mpu=mpu)
        for (unit, part), part_slots in zip(pairs, slots):
            self._hook(unit, part, part_slots)

    def _hook(self, unit: nn.Module, part: nn.Module, slots: list[_Slot]) -> None:
        """After DeepSpeed's hooks exist: ours run after its fetch and before its release."""
        param = unit.offload_words
        repack = self.device.type == "cpu"

        def fetched(module, args):
            restore(param.data, slots)
            if repack:
                pack_weights(part)

        def done(module, args, out):
            unpack_weights(part)
            drop(slots, self.device)

        unit.register_forward_pre_hook(fetched)
        unit.register_forward_hook(done, prepend=True)

    def begin_step(self) -> None:
        """A new step: DeepSpeed replays its recorded unit order from the start (prefetch)."""
        if self.zero is not None:
            self.zero.get_param_coordinator().reset_step()

    def stats(self) -> OffloadStats:
        return OffloadStats(self.bytes, self.window_bytes, len(self.units))
