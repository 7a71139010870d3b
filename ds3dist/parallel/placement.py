"""Expert placement: which routed experts each expert-parallel rank holds, per MoE layer.

A placement lists, for every MoE layer, each rank's physical expert slots and the logical
expert in each. A logical expert may have copies on several ranks (redundant experts); the
dispatcher splits its tokens among them (`Placement.dest_table`). The default placement is
today's: contiguous ranges, one copy each. `ds3dist.balance` writes placements from measured
load; `parallel.placement=FILE` runs one.

File (JSON): {"format": "ds3dist.placement/1", "n_routed_experts": E, "ep": R,
"redundant_experts": N, "layers": {"<layer id>": [[experts of rank 0], ...], ...}, ...}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ds3dist.config import ModelConfig

FORMAT = "ds3dist.placement/1"


class PlacementError(ValueError):
    """A placement that does not fit the model or the layout; the message says what."""


@dataclass(frozen=True)
class Placement:
    n_experts: int
    ep: int
    layers: dict[int, tuple[tuple[int, ...], ...]]  # MoE layer -> per rank, its experts
    source: str = ""  # the file it came from

    # ---- made, read, checked ------------------------------------------------------------
    @classmethod
    def contiguous(cls, cfg: ModelConfig, ep: int, owner: list[int] | None = None
                   ) -> "Placement":
        """One copy of each expert: contiguous ranges, or expert j on rank owner[j]."""
        e = cfg.n_routed_experts
        owner = owner or [j * ep // e for j in range(e)]
        ranks = tuple(tuple(j for j in range(e) if owner[j] == r) for r in range(ep))
        return cls(e, ep, {i: ranks for i in moe_layer_ids(cfg)})

    @classmethod
    def load(cls, path: str | Path) -> "Placement":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise PlacementError(f"parallel.placement: cannot read {path}: {e}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise PlacementError(f"parallel.placement: {path} is not a placement file "
                                 f"(format {raw.get('format') if isinstance(raw, dict) else None!r}"
                                 f", want {FORMAT!r})")
        try:
            layers = {int(i): tuple(tuple(int(x) for x in rank) for rank in ranks)
                      for i, ranks in raw["layers"].items()}
            return cls(int(raw["n_routed_experts"]), int(raw["ep"]), layers, str(path))
        except (KeyError, TypeError, ValueError) as e:
            raise PlacementError(f"parallel.placement: {path}: malformed ({e!r})") from None

    def check(self, cfg: ModelConfig, ep: int) -> None:
        """Raise PlacementError naming the first problem: another model or rank count, a MoE
        layer missing, a logical expert with no copy, one held twice by a rank."""
        where = f"parallel.placement {self.source or '(given)'}"
        if self.n_experts != cfg.n_routed_experts:
            raise PlacementError(f"{where}: made for {self.n_experts} routed experts, the model "
                                 f"has {cfg.n_routed_experts}")
        if self.ep != ep:
            raise PlacementError(f"{where}: made for ep={self.ep}, the layout has ep={ep}")
        missing = [i for i in moe_layer_ids(cfg, mtp=False) if i not in self.layers]
        if missing:
            raise PlacementError(f"{where}: MoE layers {missing[:8]} are missing")
        for i, ranks in sorted(self.layers.items()):
            if len(ranks) != ep:
                raise PlacementError(f"{where}: layer {i} lists {len(ranks)} ranks, want {ep}")
            for r, held in enumerate(ranks):
                bad = [x for x in held if not 0 <= x < self.n_experts]
                if bad:
                    raise PlacementError(f"{where}: layer {i} rank {r}: expert ids {bad[:8]} "
                                         f"outside 0..{self.n_experts - 1}")
                if len(set(held)) != len(held):
                    raise PlacementError(f"{where}: layer {i} rank {r} holds an expert twice")
            have = {x for held in ranks for x in held}
            lost = [x for x in range(self.n_experts) if x not in have]
            if lost:
                raise PlacementError(f"{where}: layer {i}: experts {lost[:8]} have no copy")

    def with_defaults(self, cfg: ModelConfig) -> "Placement":
        """Layers the file leaves out (the MTP layer) get the contiguous placement."""
        base = Placement.contiguous(cfg, self.ep)
        return Placement(self.n_experts, self.ep, {**base.layers, **self.layers}, self.source)

    def to_json(self, **extra) -> dict:
        return {"format": FORMAT, "n_routed_experts": self.n_experts, "ep": self.ep,
                "layers": {str(i): [list(r) for r in ranks]
                           for i, ranks in sorted(self.layers.items())}, **extra}

    # ---- what ranks and dispatchers read --------------------------------------------------
    def experts(self, layer: int, ep_rank: int) -> tuple[int, ...]:
        return tuple(sorted(self.layers[layer][ep_rank]))

    def copies(self, layer: int) -> int:
        return sum(len(r) for r in self.layers[layer])

    def dest_table(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where a logical expert's tokens can go: (holders_ec [E, C]: the ranks holding each
        expert, ascending, padded with their first; count_e [E])."""
        ranks = self.layers[layer]
        holders = [[r for r in range(self.ep) if x in ranks[r]] for x in range(self.n_experts)]
        c = max(len(h) for h in holders)
        holders_ec = torch.tensor([h + [h[0]] * (c - len(h)) for h in holders], dtype=torch.int64)
        return holders_ec, torch.tensor([len(h) for h in holders])


def moe_layer_ids(cfg: ModelConfig, mtp: bool = True) -> list[int]:
    """Every MoE layer id (the MTP layers too unless mtp=False)."""
    main = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    return main + (list(cfg.mtp_layer_ids) if mtp else [])
