"""The layouts a cluster could run: the shipped `+parallel=` files and every generated
pp x ep (ep dividing the routed experts, the default stage boundaries), each with as many
replicas as the cluster holds; evaluated and ranked by completion tokens/s (fitting first)."""

from __future__ import annotations

from dataclasses import replace
from importlib import resources
from typing import Any

from omegaconf import OmegaConf

from ds3dist.parallel.layout import LayoutError, ParallelLayout
from ds3dist.plan.cluster import Cluster, Workload
from ds3dist.plan.estimate import Candidate, Estimate, Setup, estimate


def shipped_layouts() -> dict[str, ParallelLayout]:
    """The `+parallel=NAME` files shipped in ds3dist/conf/parallel."""
    out = {}
    for f in sorted(resources.files("ds3dist.conf").joinpath("parallel").iterdir(),
                    key=lambda f: f.name):
        if f.name.endswith(".yaml"):
            raw = OmegaConf.to_container(OmegaConf.create(f.read_text()))
            out[f.name.removesuffix(".yaml")] = ParallelLayout(
                pp=raw.get("pp", 1), ep=raw.get("ep", 1),
                stage_boundaries=raw.get("stage_boundaries"), expert_map=raw.get("expert_map"),
                device=raw.get("device", "cpu"), backend=raw.get("backend"))
    return out


def on_cluster(layout: ParallelLayout, s: Setup) -> ParallelLayout:
    """The layout on the cluster's device kind (its backend by device)."""
    if layout.device == s.cluster.kind:
        return layout
    return replace(layout, device=s.cluster.kind, backend=None)


def launch_keys(layout: ParallelLayout, replicas: int, name: str | None) -> list[str]:
    keys = [f"+parallel={name}"] if name else [
        f"parallel.pp={layout.pp}", f"parallel.ep={layout.ep}",
        f"parallel.device={layout.device}"]
    return keys + [f"runtime.replicas={replicas}"]


def plan_setup(r: Any, cluster: Cluster, workload: Workload) -> Setup:
    """The Setup of a validated launch config (schema.Resolved) on a cluster: its model, the
    weights held as its execution holds them (the compute dtype by the cluster's device kind
    unless execution.dtype is given), its serving options."""
    import torch

    from ds3dist.core.options import num_drafts
    from ds3dist.jobs.memory_plan import Holding, WeightGroups
    from ds3dist.model.options import default_dtype

    dtype = getattr(torch, r.dtype) if r.dtype else default_dtype(cluster.kind)
    holding = Holding(execution=r.execution, dtype=dtype, mtp_passes=num_drafts(r.speculative),
                      offload=r.offload)
    return Setup(r.model, holding, r.serving, cluster, workload,
                 WeightGroups.of(r.model, holding))


def given_candidate(r: Any, s: Setup, overrides: list[str] | None = None) -> Candidate:
    """The launch config's own layout on the cluster's device kind, with the keys that launch
    it: the `parallel` overrides it was composed with when given, else pp/ep/device; named
    after its +parallel= file, else "given"."""
    layout = on_cluster(r.layout, s)
    own = overrides or []
    if own:
        keys = (own + (["parallel.device=" + layout.device] if layout is not r.layout else [])
                + [f"runtime.replicas={r.runtime.replicas}"])
    else:
        keys = launch_keys(layout, r.runtime.replicas, None)
    name = next((o.partition("=")[2] for o in own if o.startswith("+parallel=")),
                "given")
    return Candidate(name, layout, r.runtime.replicas, keys)


def candidates(s: Setup) -> list[Candidate]:
    """Every shipped layout for the cluster's device kind that plans against the model, then
    every other pp x ep of at most the cluster's devices; replicas: as many as fit."""
    c, devices = s.model, s.cluster.devices
    out, seen = [], set()
    layouts = [(name, lay) for name, lay in shipped_layouts().items()
               if lay.device == s.cluster.kind]
    divisors = [e for e in range(1, c.n_routed_experts + 1) if c.n_routed_experts % e == 0]
    layouts += [(None, ParallelLayout(pp=pp, ep=ep, device=s.cluster.kind))
                for pp in range(1, min(c.num_hidden_layers, devices) + 1)
                for ep in divisors if pp * ep <= devices]
    for name, lay in layouts:
        key = (lay.pp, lay.ep)
        if key in seen or lay.world_size > devices:
            continue
        try:
            lay.plan(c)
        except LayoutError:
            continue
        seen.add(key)
        replicas = devices // lay.world_size
        out.append(Candidate(name or f"pp{lay.pp}ep{lay.ep}", lay, replicas,
                             launch_keys(lay, replicas, name)))
    return out


def search(s: Setup, extra: list[Candidate] = ()) -> list[Estimate]:
    """Every candidate (and `extra`, e.g. the composed config's own layout) evaluated, those
    that fit first, fastest first."""
    def same(a: Candidate, b: Candidate) -> bool:
        la, lb = a.layout, b.layout
        return ((la.pp, la.ep, la.boundaries(s.model)) == (lb.pp, lb.ep, lb.boundaries(s.model))
                and la.placement is lb.placement is None and la.expert_map == lb.expert_map)

    cands = candidates(s)
    cands = [*[x for x in extra if not any(same(x, y) for y in cands)], *cands]
    found = [estimate(s, cand) for cand in cands]
    return sorted(found, key=lambda e: (not e.fits, -e.completion_tokens_per_s,
                                        e.candidate.layout.world_size))
