"""StageWorker: one rank = one pipeline stage x one expert-parallel slice, as a Ray actor.

The worker holds its stage's layers with its own routed experts (through `load_model`), one
latent cache per (micro-batch) sub-batch of the sequences it owns (attention is
data-parallel inside the stage), and the process groups the runtime made for it. It runs
one micro-batch step at a time: embed (first stage) -> its layers -> sample (last stage).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ds3dist.parallel.dispatcher import AllToAllDispatcher, CollectiveLog
from ds3dist.parallel.layout import ParallelLayout, RankPlan
from ds3dist.runtime import rendezvous


class RankStepError(RuntimeError):
    """A step failed on this rank; the message says where (step, last collective) and keeps
    the original exception's type and message whole."""


@dataclass
class _SubBatch:
    """The sequences of one micro-batch that this rank owns, and their cache."""
    seq_ids: list[int]
    cache: object  # LatentCache; cache.lens = tokens already held per sequence
    sampling: dict = field(default_factory=dict)
    generators: list = field(default_factory=list)


class StageWorker:
    def __init__(self, plan: RankPlan, layout: ParallelLayout, checkpoint: str,
                 execution: str, dtype: str | None, attn_form: str = "absorbed",
                 transfer: str = "ray"):
        torch.set_num_threads(int(os.environ.get("DS3DIST_TORCH_THREADS", "1")))
        self.plan = plan
        self.layout = layout
        self.checkpoint = checkpoint
        self.execution = execution
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.attn_form = attn_form
        self.transfer = transfer  # stage-to-stage hidden states: "ray" objects or "p2p"
        self.device = torch.device("cuda", 0) if layout.device == "cuda" else torch.device("cpu")
        self.model = None
        self.ep_group = None
        self.subs: dict[int, _SubBatch] = {}
        self.busy_s = 0.0
        self.steps = 0
        self.load_info: dict = {}
        self.net: dict = {}
        self.collectives = CollectiveLog()

    # ---- set-up ---------------------------------------------------------------------
    def node_info(self) -> dict:
        import ray

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
        self.net = {"node_ip": ip, "rendezvous": f"{addr}:{port}",
                    "socket_ifname": {v: os.environ.get(v) for v in
                                      ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")},
                    "ifname_set_here": env}
        return self.net

    def load(self) -> dict:
        from ds3dist.model.load import load_model

        t0 = time.perf_counter()
        self.model = load_model(
            self.checkpoint, execution=self.execution, dtype=self.dtype, device=self.device,
            layers=self.plan.layers, experts=set(self.plan.experts), mtp=self.plan.mtp,
            embed=self.plan.embed, head=self.plan.head, attn_form=self.attn_form,
        )
        if self.layout.ep > 1:
            owner = self.layout.expert_to_rank(self.model.config)
            for layer_id, moe in self.model.moe_layers().items():
                moe.dispatcher = AllToAllDispatcher(
                    self.ep_group, owner, fp8_payload=(self.execution == "fp8"),
                    layer_id=layer_id, log=self.collectives)
        self.load_info = {"bytes_read": self.model.load_stats["bytes_read"],
                          "load_seconds": time.perf_counter() - t0, "rss_bytes": _rss_bytes()}
        return self.load_info

    # ---- generation -----------------------------------------------------------------
    def begin(self, mb: int, seq_ids: list[int], max_len: int, sampling: dict) -> None:
        """Open a sub-batch: a fresh cache for these sequences (may be empty)."""
        from ds3dist.generation import sequence_generator

        gens = [sequence_generator(sampling.get("seed"), s) for s in seq_ids] if self.plan.head else []
        self.subs[mb] = _SubBatch(list(seq_ids), self.model.new_cache(len(seq_ids), max_len),
                                  dict(sampling), gens)

    def step(self, mb: int, payload, new_lens: list[int], want: str = "sample",
             keep: list[int] | None = None):
        """One forward of micro-batch `mb` through this stage.

        payload: first stage, token ids per sequence (prompt on prefill, one token on
        decode); later stages, the previous stage's hidden states [b, t, D] (right-padded).
        new_lens: tokens each sequence adds in this step. Returns the hidden states, or on
        the last stage the sampled token id per sequence (want="sample") or the float32
        logits of each sequence's new positions (want="logits"). keep: the cache rows that
        stay (finished sequences leave first)."""
        t0 = time.perf_counter()
        entered = self.collectives.entered
        try:
            out = self._step(mb, payload, new_lens, want, keep)
        except Exception as e:
            log = self.collectives
            where = (f", in collective #{log.entered} ({log.last})" if log.entered > entered
                     else "")
            raise RankStepError(f"step {self.steps + 1} (micro-batch {mb}){where}: "
                                f"{type(e).__name__}: {e}") from e
        self.busy_s += time.perf_counter() - t0
        self.steps += 1
        return out

    def _step(self, mb: int, payload, new_lens: list[int], want: str, keep: list[int] | None):
        sub = self.subs[mb]
        if keep is not None and len(keep) < sub.cache.batch:
            sub.cache.select(keep)
            sub.seq_ids = [sub.seq_ids[k] for k in keep]
            sub.generators = [sub.generators[k] for k in keep] if sub.generators else []
        with torch.inference_mode():
            if self.plan.embed:
                h_btd = self.model.embed(_pad(payload, self.device))
            elif self.transfer == "p2p":
                h_btd = self._recv(new_lens)
            else:
                h_btd = payload.to(self.device)
            t = h_btd.shape[1]
            positions_bt = sub.cache.lens.view(-1, 1) + torch.arange(t).view(1, -1)
            h_btd = self.model.forward_layers(h_btd, positions_bt, cache=sub.cache,
                                              seq_lens_b=torch.tensor(new_lens, dtype=torch.long))
            if not self.plan.head and self.transfer == "p2p":
                out = self._send(h_btd)
            elif not self.plan.head:
                out = h_btd.cpu() if self.device.type == "cuda" else h_btd
            elif want == "logits":
                logits_btv = self.model.logits(h_btd).cpu()
                out = [logits_btv[i, :n] for i, n in enumerate(new_lens)]
            else:
                out = self._sample(sub, h_btd, new_lens)
        return out

    def _recv(self, new_lens: list[int]) -> torch.Tensor:
        src = self.layout.rank_of(self.plan.stage - 1, self.plan.ep_rank)
        h_btd = torch.empty(len(new_lens), max(new_lens, default=1),
                            self.model.config.hidden_size, dtype=self.model.dtype, device=self.device)
        if h_btd.numel():
            self.collectives.enter(f"recv of hidden states from rank {src}")
            dist.recv(h_btd, src=src)
        return h_btd

    def _send(self, h_btd: torch.Tensor) -> None:
        if h_btd.numel():
            dst = self.layout.rank_of(self.plan.stage + 1, self.plan.ep_rank)
            self.collectives.enter(f"send of hidden states to rank {dst}")
            dist.send(h_btd.contiguous(), dst=dst)

    def _sample(self, sub: _SubBatch, h_btd: torch.Tensor, new_lens: list[int]) -> list[int]:
        from ds3dist.generation import sample_next

        if h_btd.shape[0] == 0:
            return []
        last = torch.tensor([n - 1 for n in new_lens], device=h_btd.device)
        h_last_bd = h_btd[torch.arange(h_btd.shape[0], device=h_btd.device), last]
        logits_bv = self.model.logits(h_last_bd[:, None, :])[:, 0]
        return sample_next(logits_bv, sub.sampling, sub.generators).tolist()

    def end(self, mb: int) -> None:
        self.subs.pop(mb, None)

    # ---- introspection --------------------------------------------------------------
    def stats(self) -> dict:
        load = {}
        if self.model is not None:
            for layer_id, moe in self.model.moe_layers().items():
                s = getattr(moe.dispatcher, "stats", None)
                if s is not None:
                    load[layer_id] = s()
        return {**self.node_info(), **self.load_info, "net": self.net, "rss_bytes": _rss_bytes(),
                "busy_seconds": self.busy_s, "steps": self.steps, "dispatch": load}

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _pad(token_lists: list[list[int]], device) -> torch.Tensor:
    """Right-padded [b, t] token ids."""
    t = max((len(ids) for ids in token_lists), default=1)
    out = torch.zeros(len(token_lists), t, dtype=torch.long)
    for i, ids in enumerate(token_lists):
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out.to(device)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
