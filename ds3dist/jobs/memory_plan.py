"""The dry run's rank plan: per rank, its layers and experts and the weight bytes it holds in
the execution's form, split into resident and offloaded, with the offload's fetch window
and the bytes a decode step streams; so a layout can be sized before any GPU is booked.

Bytes follow what load_model keeps: in fp8 execution FP8 weights with their float32 scales,
in bf16 execution every weight dequantized into the compute dtype (scales dropped); norms
and the gate in the compute dtype, the gate's bias in float32. The MTP layer counts only when
speculative decoding loads it, without its copy of the head (the main one serves) and with
its copy of the embedding only on a last stage that lacks the main one. On CPUs the
oneDNN-packed copies (up to the plain weights again) are not counted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ds3dist.checkpoint.layout import TensorSpec, expected_tensors, expert_of, layer_of
from ds3dist.config import ModelConfig
from ds3dist.parallel.layout import ParallelLayout, RankPlan
from ds3dist.runtime.options import OffloadOptions


@dataclass(frozen=True)
class Holding:
    """How ranks hold weights: execution form, compute dtype, MTP passes per step (0: the MTP
    layer is not loaded), offload (None: everything resident), paged cache per rank."""

    execution: str = "fp8"
    dtype: torch.dtype = torch.bfloat16
    mtp_passes: int = 0
    offload: OffloadOptions | None = None
    cache_bytes: float | None = None


def held_bytes(spec: TensorSpec, h: Holding) -> int:
    """Bytes of one checkpoint tensor once loaded."""
    if spec.is_scale:
        return spec.nbytes if h.execution == "fp8" else 0
    if spec.dtype == "F8_E4M3" and h.execution == "fp8":
        return spec.nbytes
    if spec.dtype == "F32":
        return spec.nbytes
    return spec.numel * h.dtype.itemsize


# What decides whether a rank holds a tensor: its layer, its expert and its kind.
_Group = tuple[int | None, int | None, str]

# Components a rank's weight bytes are split into (RankBytes.components, in this order).
COMPONENTS = ("attention", "dense_mlp", "router", "routed_experts", "shared_experts",
              "embedding", "head", "mtp")


@dataclass(frozen=True)
class Components:
    """A rank's held weight bytes by component. attention: projections and the layers' norms;
    router: the MoE gates; head: the final norm and lm_head; mtp: everything of the MTP layer
    the rank holds (its experts and embedding copy included)."""

    attention: int = 0
    dense_mlp: int = 0
    router: int = 0
    routed_experts: int = 0
    shared_experts: int = 0
    embedding: int = 0
    head: int = 0
    mtp: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, c) for c in COMPONENTS)


@dataclass(frozen=True)
class RankBytes:
    """One rank's row of the plan: what it holds and what its device must fit (bytes)."""

    rank: int
    stage: int
    ep_rank: int
    layers: tuple[int, ...]
    mtp: bool  # holds the MTP layer (speculating, last stage)
    num_experts: int  # routed experts per MoE layer (the most over its layers)
    components: Components
    read_bytes: int  # read from the checkpoint to load it (the checkpoint's form)
    resident_bytes: int
    offloaded_bytes: int
    window_bytes: int  # offload units fetched at once
    streamed_bytes_per_step: int  # offloaded bytes a decode step fetches
    cache_bytes: float  # Holding.cache_bytes (0: not given)

    @property
    def weight_bytes(self) -> int:
        return self.components.total

    @property
    def device_bytes(self) -> float:
        return self.resident_bytes + self.window_bytes + self.cache_bytes

    def as_row(self) -> dict[str, Any]:
        """The dry run's row (JSON-ready)."""
        return {"rank": self.rank, "stage": self.stage, "ep_rank": self.ep_rank,
                "layers": [self.layers[0], self.layers[-1]] if self.layers else [],
                "num_layers": len(self.layers), "mtp": self.mtp,
                "num_experts": self.num_experts, "weight_bytes": self.weight_bytes,
                "components": asdict(self.components), "read_bytes": self.read_bytes,
                "resident_bytes": self.resident_bytes, "offloaded_bytes": self.offloaded_bytes,
                "window_bytes": self.window_bytes,
                "streamed_bytes_per_step": self.streamed_bytes_per_step,
                "device_bytes": self.device_bytes}


def _group(name: str) -> _Group:
    layer, expert = layer_of(name), expert_of(name)
    if layer is None:
        kind = "embed" if name.startswith("model.embed_tokens") else "head"
    else:
        kind = ("head_copy" if name.endswith("shared_head.head.weight") else
                "embed_copy" if name.endswith(".embed_tokens.weight") else
                "routed" if expert is not None else
                "shared" if ".mlp.shared_experts." in name else
                "router" if ".mlp.gate." in name else
                "mlp" if ".mlp." in name else "layer")
    return layer, expert, kind


def _component(group: _Group, mtp_ids: set[int]) -> str:
    layer, _, kind = group
    if layer is None:
        return "embedding" if kind == "embed" else "head"
    if layer in mtp_ids:
        return "mtp"
    return {"routed": "routed_experts", "shared": "shared_experts", "router": "router",
            "mlp": "dense_mlp"}.get(kind, "attention")


def _held(group: _Group, plan: RankPlan, mtp_ids: set[int], h: Holding) -> bool:
    layer, expert, kind = group
    if layer is None:
        return plan.embed if kind == "embed" else plan.head
    if expert is not None and expert not in plan.experts_of(layer):
        return False
    if layer in mtp_ids:
        if not (plan.mtp and h.mtp_passes) or kind == "head_copy":
            return False
        return not (plan.embed and kind == "embed_copy")
    return layer in plan.layers


def _unit(group: _Group, mtp_ids: set[int], offload: OffloadOptions | None) -> int | None:
    """The offload unit (a layer id) a held tensor is fetched with, or None: resident."""
    if offload is None:
        return None
    layer, expert, _ = group
    if offload.params == "experts":
        return layer if expert is not None else None
    return layer if layer is not None and layer not in mtp_ids else None


@dataclass(frozen=True)
class WeightGroups:
    """The expected-tensor table summed per group (layer, expert, kind): held bytes in the
    holding's form and the checkpoint's bytes. Made once per model and holding."""

    held: dict[_Group, int]
    read: dict[_Group, int]

    def of_rank(self, plan: RankPlan, mtp_ids: set[int]) -> Iterator[_Group]:
        """The groups a rank may hold: every non-expert one, and its own experts' in the
        layers it holds (the others' are never looked at: a search plans many ranks)."""
        mine = set(plan.layers) | (mtp_ids if plan.mtp else set())
        for g in self.held:
            if g[1] is None:
                yield g
        for layer in sorted(mine):
            if (layer, None, "router") in self.held:
                for e in plan.experts_of(layer):
                    yield layer, e, "routed"

    @classmethod
    def of(cls, model: ModelConfig, h: Holding) -> "WeightGroups":
        held: dict[_Group, int] = defaultdict(int)
        read: dict[_Group, int] = defaultdict(int)
        for spec in expected_tensors(model).values():
            g = _group(spec.name)
            held[g] += held_bytes(spec, h)
            read[g] += spec.nbytes
        return cls(dict(held), dict(read))


def rank_bytes(model: ModelConfig, layout: ParallelLayout, h: Holding,
               groups: WeightGroups | None = None) -> list[RankBytes]:
    """Each rank's weight bytes by component, resident vs offloaded, the fetch window and the
    bytes streamed per decode step, from the expected-tensor table (no checkpoint read)."""
    groups = groups or WeightGroups.of(model, h)
    mtp_ids = set(model.mtp_layer_ids)
    rows = []
    for plan in layout.plan(model):
        parts: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
        nread = 0
        units: dict[int, int] = defaultdict(int)  # offload unit (layer) -> bytes
        for group in groups.of_rank(plan, mtp_ids):
            if not _held(group, plan, mtp_ids, h):
                continue
            n = groups.held[group]
            parts[_component(group, mtp_ids)] += n
            nread += groups.read[group]
            unit = _unit(group, mtp_ids, h.offload)
            if unit is not None:
                units[unit] += n
        offloaded = sum(units.values())
        window = (h.offload.prefetch_layers + 1) * max(units.values()) if units else 0
        streamed = sum(n * (h.mtp_passes if layer in mtp_ids else 1) for layer, n in units.items())
        comp = Components(**parts)
        rows.append(RankBytes(
            rank=plan.rank, stage=plan.stage, ep_rank=plan.ep_rank, layers=plan.layers,
            mtp=bool(plan.mtp and h.mtp_passes), num_experts=_physical_experts(plan),
            components=comp, read_bytes=nread, resident_bytes=comp.total - offloaded,
            offloaded_bytes=offloaded, window_bytes=window, streamed_bytes_per_step=streamed,
            cache_bytes=h.cache_bytes or 0))
    return rows


def rank_table(model: ModelConfig, layout: ParallelLayout, h: Holding) -> list[dict[str, Any]]:
    """rank_bytes as the dry run's JSON-ready rows."""
    return [r.as_row() for r in rank_bytes(model, layout, h)]


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f}"


def describe(model: ModelConfig, layout: ParallelLayout, h: Holding, name: str = "") -> str:
    rows = rank_bytes(model, layout, h)
    lines = [f"layout {name + ': ' if name else ''}pp={layout.pp} ep={layout.ep} "
             f"-> {layout.world_size} ranks on {layout.device} ({layout.backend}); "
             f"{model.num_hidden_layers} layers, {model.n_routed_experts} routed experts; "
             f"weights {h.execution} in {str(h.dtype).removeprefix('torch.')}"]
    off = h.offload
    if off is None:
        lines.append("rank stage ep_rank layers      experts  weights GB")
    else:
        lines.append(f"offload: {off.params} to {off.device} ({off.backend}), "
                     f"{off.prefetch_layers} prefetched; GB:")
        lines.append("rank stage ep_rank layers      experts  weights resident offloaded "
                     "window streamed/step")
    for r in rows:
        lay = (f"{r.layers[0]}-{r.layers[-1]}" if r.layers else "-") + ("+mtp" if r.mtp else "")
        line = (f"{r.rank:>4} {r.stage:>5} {r.ep_rank:>7} {lay:<11} "
                f"{r.num_experts:>7}  {gb(r.weight_bytes):>7}")
        if off is not None:
            line += (f" {gb(r.resident_bytes):>8} {gb(r.offloaded_bytes):>9} "
                     f"{gb(r.window_bytes):>6} {gb(r.streamed_bytes_per_step):>13}")
        lines.append(line)
    need = max(r.device_bytes for r in rows)
    cache = (f" + cache {gb(h.cache_bytes)}" if h.cache_bytes else
             " (+ the paged cache: runtime.cache_gb)")
    lines.append(f"most a rank needs on its device: {gb(need)} GB (resident"
                 + (" + window" if off is not None else "") + f"{cache})")
    return "\n".join(lines)


def _physical_experts(plan: RankPlan) -> int:
    """Experts a rank holds per MoE layer (the largest count over its layers)."""
    if plan.layer_experts is None:
        return len(plan.experts)
    return max((len(v) for v in plan.layer_experts.values()), default=0)
