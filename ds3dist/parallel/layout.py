"""ParallelLayout: pipeline stages x expert-parallel ranks, validated against a model.

Ranks are numbered stage-major: rank = stage * ep + ep_rank, so one stage's expert-parallel
group is a run of consecutive ranks (and of consecutive placement-group bundles, which keeps
it on one node when it fits). Every rank of a stage holds all of the stage's layers (attention
is data-parallel inside the stage) and its own slice of each MoE layer's routed experts.
"""

from __future__ import annotations

from dataclasses import dataclass

from ds3dist.config import ModelConfig
from ds3dist.parallel.placement import Placement, PlacementError


class LayoutError(ValueError):
    """An impossible parallel layout; the message names the setting at fault."""


@dataclass(frozen=True)
class RankPlan:
    rank: int
    stage: int
    ep_rank: int
    layers: tuple[int, ...]  # decoder layers held (not the MTP layer)
    experts: tuple[int, ...]  # routed experts held in some MoE layer of the stage (all: union)
    embed: bool  # first stage: token embedding
    head: bool  # last stage: final norm, lm_head, sampling
    mtp: bool  # last stage: the MTP layer(s)
    # MoE layer -> the experts held there, with a placement (None: `experts` in every layer)
    layer_experts: dict[int, tuple[int, ...]] | None = None

    def experts_of(self, layer: int) -> tuple[int, ...]:
        return self.experts if self.layer_experts is None else self.layer_experts[layer]


@dataclass
class ParallelLayout:
    pp: int = 1
    ep: int = 1
    stage_boundaries: list[int] | None = None  # [0, b1, ..., num_hidden_layers], pp + 1 entries
    expert_map: list[int] | None = None  # expert id -> ep rank; default: contiguous ranges
    device: str = "cpu"  # "cpu" or "cuda"
    backend: str | None = None  # "gloo" or "nccl"; default by device
    placement: Placement | None = None  # per MoE layer, each rank's experts (copies allowed)

    def __post_init__(self) -> None:
        for name in ("pp", "ep"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LayoutError(f"parallel.{name}: must be an integer >= 1, got {v!r}")
        if self.device not in ("cpu", "cuda"):
            raise LayoutError(f"parallel.device: must be 'cpu' or 'cuda', got {self.device!r}")
        if self.backend is None:
            self.backend = "nccl" if self.device == "cuda" else "gloo"
        if self.backend not in ("gloo", "nccl"):
            raise LayoutError(f"parallel.backend: must be 'gloo' or 'nccl', got {self.backend!r}")
        if self.backend == "nccl" and self.device != "cuda":
            raise LayoutError("parallel.backend: nccl needs parallel.device=cuda")
        if self.placement is not None and self.expert_map is not None:
            raise LayoutError("parallel.placement and parallel.expert_map: give one of them")

    @property
    def world_size(self) -> int:
        return self.pp * self.ep

    def rank_of(self, stage: int, ep_rank: int) -> int:
        return stage * self.ep + ep_rank

    # ---- model-dependent plan ---------------------------------------------------------
    def boundaries(self, cfg: ModelConfig) -> list[int]:
        n = cfg.num_hidden_layers
        if self.pp > n:
            raise LayoutError(f"parallel.pp: {self.pp} stages but the model has only {n} layers")
        if self.stage_boundaries is None:
            return [s * n // self.pp for s in range(self.pp)] + [n]
        b = list(self.stage_boundaries)
        if len(b) != self.pp + 1 or b[0] != 0 or b[-1] != n:
            raise LayoutError(
                f"parallel.stage_boundaries: need {self.pp + 1} entries from 0 to {n} "
                f"(num_hidden_layers), got {b}"
            )
        if any(b2 <= b1 for b1, b2 in zip(b, b[1:])):
            raise LayoutError(f"parallel.stage_boundaries: must be strictly increasing, got {b}")
        return b

    def expert_to_rank(self, cfg: ModelConfig) -> list[int]:
        e = cfg.n_routed_experts
        if self.expert_map is None:
            if e % self.ep:
                raise LayoutError(
                    f"parallel.ep: {e} routed experts are not divisible by ep={self.ep}; "
                    f"choose ep dividing {e} or give parallel.expert_map"
                )
            per = e // self.ep
            return [j // per for j in range(e)]
        m = list(self.expert_map)
        if len(m) != e:
            raise LayoutError(f"parallel.expert_map: needs one rank per expert ({e}), got {len(m)}")
        bad = [j for j, r in enumerate(m) if not isinstance(r, int) or not 0 <= r < self.ep]
        if bad:
            raise LayoutError(
                f"parallel.expert_map: experts {bad[:8]} map outside ranks 0..{self.ep - 1}"
            )
        return m

    def placement_for(self, cfg: ModelConfig) -> Placement:
        """The placement the ranks run: the given one (checked; layers it leaves out
        contiguous), else one copy of each expert by expert_map or contiguous ranges."""
        if self.placement is None:
            return Placement.contiguous(cfg, self.ep, self.expert_to_rank(cfg))
        try:
            self.placement.check(cfg, self.ep)
        except PlacementError as e:
            raise LayoutError(str(e)) from None
        return self.placement.with_defaults(cfg)

    def plan(self, cfg: ModelConfig) -> list[RankPlan]:
        """Each rank's layers and experts, in rank order; raises LayoutError if impossible."""
        bounds = self.boundaries(cfg)
        place = self.placement_for(cfg)
        owner = self.expert_to_rank(cfg) if self.placement is None else None
        plans = []
        for stage in range(self.pp):
            layers = tuple(range(bounds[stage], bounds[stage + 1]))
            last = stage == self.pp - 1
            moe = [i for i in place.layers if i in layers or (last and i in cfg.mtp_layer_ids)]
            for r in range(self.ep):
                per_layer = {i: place.experts(i, r) for i in moe}
                union = tuple(sorted({x for held in per_layer.values() for x in held}))
                plans.append(
                    RankPlan(
                        rank=self.rank_of(stage, r),
                        stage=stage,
                        ep_rank=r,
                        layers=layers,
                        experts=union if owner is None
                        else tuple(j for j, o in enumerate(owner) if o == r),
                        embed=stage == 0,
                        head=last,
                        mtp=last and cfg.num_nextn_predict_layers > 0,
                        layer_experts=per_layer if owner is None else None,
                    )
                )
        return plans

    # ---- cluster check ----------------------------------------------------------------
    def check_resources(self, available: dict[str, float]) -> None:
        """Fail if the cluster (as Ray reports it) has too few GPUs or CPUs for one rank each."""
        key = "GPU" if self.device == "cuda" else "CPU"
        have = int(available.get(key, 0))
        if have < self.world_size:
            raise LayoutError(
                f"parallel: pp={self.pp} x ep={self.ep} needs {self.world_size} ranks with one "
                f"{key} each, but the Ray cluster has {have} {key} available "
                f"(Ray reports: {dict(sorted(available.items()))})"
            )
