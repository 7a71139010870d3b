"""StageWorker: one rank = one pipeline stage x one expert-parallel slice, as a Ray actor.

The worker holds its stage's layers with its own routed experts (through `load_model`), a
StepRunner with the paged cache of its expert-parallel column (attention is data-parallel
inside the stage: each column serves its own requests) and the process groups the runtime
made for it. Each step it runs its column's share of the plan: embed (first stage) -> its
layers -> sample (last stage); every rank runs every step, with no tokens if it has none,
so the MoE collectives stay in step.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import replace
from datetime import timedelta

import ray
import torch
import torch.distributed as dist

from ds3dist.core.engine import LoadInfo, RankStats
from ds3dist.model.load import expert_tensors, load_model, swap_experts
from ds3dist.model.options import DEFAULT_ATTN_FORM
from ds3dist.parallel.dispatcher import AllToAllDispatcher, CollectiveLog
from ds3dist.parallel.layout import ParallelLayout, RankPlan
from ds3dist.parallel.placement import Placement
from ds3dist.runtime import handoff, progress, rendezvous
from ds3dist.runtime.handoff import HiddenRef, StageHandoff
from ds3dist.runtime.hostmem import release_free_memory, retain_freed_memory
from ds3dist.runtime.offload import Offloaded
from ds3dist.runtime.options import OffloadOptions
from ds3dist.rank.column import run_column
from ds3dist.core.plan import StepPlan
from ds3dist.rank.runner import StepRunner
from ds3dist.core.options import BalanceOptions, SpeculativeConfig


class RankStepError(RuntimeError):
    """A step failed on this rank; the message says where (step, last collective) and keeps
    the original exception's type and message whole."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank

    def __reduce__(self):
        return RankStepError, (str(self), self.rank)


class StageWorker:
    def __init__(self, plan: RankPlan, layout: ParallelLayout, checkpoint: str,
                 execution: str, dtype: str | None, attn_form: str = DEFAULT_ATTN_FORM,
                 threads: int = 1, fault_ids: tuple[str, ...] = (), engine_id: str = "",
                 speculative: SpeculativeConfig | None = None,
                 offload: OffloadOptions | None = None):
        torch.set_num_threads(threads)
        retain_freed_memory()
        self.plan = plan
        self.layout = layout
        self.checkpoint = checkpoint
        self.execution = execution
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.attn_form = attn_form
        self.fault_ids = fault_ids  # test hook: requests whose processing fails
        self.runner: StepRunner | None = None
        self.device = torch.device("cuda", 0) if layout.device == "cuda" else torch.device("cpu")
        self.model = None
        self.ep_group = None
        self.busy_s = 0.0
        self.steps = 0
        self.load_info: LoadInfo | None = None
        self.net: dict = {}
        self.collectives = CollectiveLog()
        self.engine_id = engine_id  # the key of this rank's published progress
        self.speculative = speculative if plan.head else None  # the last stage drafts
        self.offload = offload
        self.own_group = None  # a group of this rank alone (what the offload partitions over)
        self.offloaded: Offloaded | None = None
        self.handoff: StageHandoff | None = None  # hidden states to/from the next/previous stage

    # ---- set-up ---------------------------------------------------------------------
    def node_info(self) -> dict:
        return {"node_ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(),
                "pid": os.getpid(), "rank": self.plan.rank, "stage": self.plan.stage,
                "ep_rank": self.plan.ep_rank}

    def rendezvous_address(self, port: int | None) -> tuple[str, int]:
        """Rank 0: the address and a free port on its node for the TCP store."""
        ip = self.node_info()["node_ip"]
        return ip, rendezvous.free_port(ip, port)

    def init_distributed(self, addr: str, port: int, timeout_s: float) -> dict:
        ip = self.node_info()["node_ip"]
        env = rendezvous.set_socket_ifname(ip)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # one rank talks to nobody: no group, no gloo threads (unless the offload needs one)
        if self.layout.world_size > 1 or self.offload is not None:
            self._init_groups(addr, port, timeout_s)
        progress.start_heartbeat(self.engine_id, self.plan.rank, self._progress)
        self.net = {"node_ip": ip, "rendezvous": f"{addr}:{port}",
                    "socket_ifname": {v: os.environ.get(v) for v in
                                      ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")},
                    "ifname_set_here": env}
        return self.net

    def _init_groups(self, addr: str, port: int, timeout_s: float) -> None:
        dist.init_process_group(
            self.layout.backend, init_method=f"tcp://{addr}:{port}", rank=self.plan.rank,
            world_size=self.layout.world_size, timeout=timedelta(seconds=timeout_s),
        )
        # Every rank creates every stage's expert-parallel group, in the same order.
        for stage in range(self.layout.pp):
            ranks = [self.layout.rank_of(stage, r) for r in range(self.layout.ep)]
            group = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s))
            if stage == self.plan.stage:
                self.ep_group = group
        if self.layout.pp > 1 and handoff.wanted(self.device):
            p, lay = self.plan, self.layout
            self.handoff = StageHandoff(
                lay.rank_of(p.stage - 1, p.ep_rank) if p.stage > 0 else None,
                lay.rank_of(p.stage + 1, p.ep_rank) if p.stage < lay.pp - 1 else None,
                self.device)
        if self.offload is not None:  # the same for one-rank groups
            for rank in range(self.layout.world_size):
                group = dist.new_group([rank], timeout=timedelta(seconds=timeout_s))
                if rank == self.plan.rank:
                    self.own_group = group

    def load(self) -> LoadInfo:
        t0 = time.perf_counter()
        if self.offload is not None:
            self.offload.check_host()  # this host's NVMe folder, before minutes of loading
        self.model = load_model(
            self.checkpoint, execution=self.execution, dtype=self.dtype, device=self.device,
            layers=self.plan.layers, mtp=self.speculative is not None,
            experts=self.plan.layer_experts or set(self.plan.experts),
            embed=self.plan.embed, head=self.plan.head, attn_form=self.attn_form,
            host=self.offload.holds if self.offload is not None else None,
        )
        if self.layout.ep > 1:
            place = self.layout.placement_for(self.model.config)
            for layer_id, moe in self.model.moe_layers().items():
                moe.dispatcher = AllToAllDispatcher(
                    self.ep_group, place.dest_table(layer_id), moe.experts.expert_ids,
                    fp8_payload=(self.execution == "fp8"), layer_id=layer_id,
                    log=self.collectives)
        offload = None
        if self.offload is not None:
            self.offloaded = Offloaded(self.model, self.offload, self.own_group, self.plan.rank,
                                       self.device)
            release_free_memory()  # the loaded copies of what is now offloaded
            offload = self.offloaded.stats()
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        if free is not None and offload is not None:  # the units fetched at once need room
            free -= offload.window_bytes
        self.load_info = LoadInfo(self.model.load_stats["bytes_read"], time.perf_counter() - t0,
                                  _rss_bytes(), str(self.model.dtype), free, offload)
        return self.load_info

    def apply_placement(self, place: Placement, transfer: str = "checkpoint") -> dict:
        """Hold the experts `place` gives this rank in each of its MoE layers and route by it
        (between steps). Experts it keeps stay; new ones come from the checkpoint, or with
        transfer="peers" from a rank of the stage that holds them now (over the
        expert-parallel group). Returns {"seconds", "experts_read", "bytes_read",
        "experts_received"}."""
        from ds3dist.checkpoint.reader import CheckpointReader

        t0 = time.perf_counter()
        got = self._receive_experts(place) if transfer == "peers" else {}
        read = 0
        with CheckpointReader(self.checkpoint) as reader:
            start = reader.bytes_read
            for layer_id, moe in self.model.moe_layers().items():
                old = moe.dispatcher
                read += swap_experts(self.model, layer_id,
                                     place.experts(layer_id, self.plan.ep_rank), reader,
                                     got.get(layer_id))
                moe.dispatcher = AllToAllDispatcher(
                    self.ep_group, place.dest_table(layer_id), moe.experts.expert_ids,
                    fp8_payload=old.fp8_payload, layer_id=layer_id, log=self.collectives)
                moe.dispatcher.sent_e += old.sent_e  # the job's counts go on
                moe.dispatcher.received_e += old.received_e
            nbytes = reader.bytes_read - start
        release_free_memory()
        self.layout = replace(self.layout, placement=place)
        return {"seconds": time.perf_counter() - t0, "experts_read": read, "bytes_read": nbytes,
                "experts_received": sum(len(v) for v in got.values())}

    def _receive_experts(self, place: Placement) -> dict[int, dict[int, dict]]:
        """Every expert a rank of this stage gains, sent by the lowest rank holding it now:
        one batch of sends and receives over the expert-parallel group, in an order every
        rank computes alike. Returns {layer: {expert: {name: tensor}}} of what this rank got."""
        cfg, me, ep = self.model.config, self.plan.ep_rank, self.layout.ep
        now = self.layout.placement_for(cfg)
        ops, got = [], {}
        for layer_id in sorted(self.model.moe_layers()):
            held = [set(now.layers[layer_id][r]) for r in range(ep)]
            like = expert_tensors(self.model, layer_id,
                                  self.model.moe_layers()[layer_id].experts.expert_ids[0])
            for r in range(ep):
                for e in place.experts(layer_id, r):
                    if e in held[r]:
                        continue
                    src = min(s for s in range(ep) if e in held[s])
                    peer = self.layout.rank_of(self.plan.stage, r if src == me else src)
                    if src == me:
                        tensors = expert_tensors(self.model, layer_id, e).values()
                        ops += [dist.P2POp(dist.isend, _wire(t), peer, self.ep_group)
                                for t in tensors]
                    elif r == me:
                        bufs = {k: torch.empty_like(v) for k, v in like.items()}
                        got.setdefault(layer_id, {})[e] = bufs
                        ops += [dist.P2POp(dist.irecv, _wire(t), peer, self.ep_group)
                                for t in bufs.values()]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()  # bounded by the group's timeout
        return got

    def setup_cache(self, num_pages: int, page_size: int, cuda_graphs: bool = False,
                    load_window: int = BalanceOptions().window) -> int:
        """Allocate this rank's page pool (the same page ids on every stage of its column).
        cuda_graphs: decode steps as CUDA graphs where this rank can (not with offload)."""
        self.runner = StepRunner(self.model, num_pages, page_size, self.speculative,
                                 cuda_graphs and self.offloaded is None, load_window)
        self.runner.fail_ids = set(self.fault_ids)
        return self.runner.cache.nbytes()

    def _progress(self) -> dict:
        return {"step": self.steps, "entered": self.collectives.entered,
                "last": self.collectives.last}

    # ---- steps ------------------------------------------------------------------------
    def step(self, plan: StepPlan, payload=None):
        """This rank's column of one step (see ds3dist.rank.column.run_column): the next
        stage's payload, or on the last stage its column's StepResult."""
        t0 = time.perf_counter()
        entered = self.collectives.entered
        try:
            if self.offloaded is not None:
                self.offloaded.begin_step()
            if payload is not None and isinstance(payload[1], HiddenRef):
                payload = (payload[0], self.handoff.recv(payload[1]))
            out = run_column(self.runner, plan, plan.columns[self.plan.ep_rank],
                             self.plan.embed, self.plan.head, payload)
            if self.handoff is not None and not self.plan.head:
                out = (out[0], self.handoff.send(out[1]))
        except Exception as e:
            log = self.collectives
            where = (f", in collective #{log.entered} ({log.last})" if log.entered > entered
                     else "")
            p = self.plan
            err = RankStepError(f"rank {p.rank} (stage {p.stage}, ep rank {p.ep_rank}), step "
                                f"{plan.step_id}{where}: {type(e).__name__}: {e}", p.rank)
            progress.publish(self.engine_id, p.rank,
                             {**self._progress(), "error": f"RankStepError: {err}"})
            raise err from e
        self.busy_s += time.perf_counter() - t0
        self.steps += 1
        return out

    # ---- introspection --------------------------------------------------------------
    def stats(self) -> RankStats:
        layers = self.model.moe_layers() if self.model is not None else {}
        dispatch = {layer_id: moe.dispatcher.stats() for layer_id, moe in layers.items()}
        window, covered = ({}, 0) if self.runner is None else self.runner.load.window(
            {i: d["received_per_expert"] for i, d in dispatch.items()})
        p, info = self.plan, self.node_info()
        return RankStats(p.rank, p.stage, p.ep_rank, info["node_ip"], info["hostname"],
                         info["pid"], self.load_info, self.net, _rss_bytes(),
                         _rss_bytes("VmHWM"), self.busy_s, self.steps, dispatch,
                         window_load=window, window_steps=covered,
                         held_experts={i: list(m.experts.expert_ids) for i, m in layers.items()})


def _rss_bytes(field: str = "VmRSS") -> int:
    """Resident memory now (VmRSS) or at its peak (VmHWM), from /proc; 0 where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _wire(t: torch.Tensor) -> torch.Tensor:
    """A tensor as it travels: FP8 as its uint8 bytes (gloo carries no float8)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
