"""Parameter and byte counts of a checkpoint, per model component, for `inspect`.

`summary(path)` counts layers, layer kinds, experts, dtypes and the parameters and bytes of
each component (`component_of`) from the shard headers, reading no tensor data (a tensor whose
shard is unreadable is counted from the expected table); `format_summary` renders it as the
text `python -m ds3dist.checkpoint.inspect` prints.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from ds3dist.checkpoint.layout import (
    DTYPE_BYTES,
    SCALE_SUFFIX,
    expected_tensors,
    expert_of,
    layer_of,
)
from ds3dist.checkpoint.reader import (
    CONFIG_NAME,
    CheckpointError,
    HeaderError,
    load_index,
    read_header,
)
from ds3dist.config import ModelConfig

COMPONENTS = ("embedding", "attention", "dense_mlp", "routed_experts", "shared_experts", "gate",
              "norms", "head", "mtp")


def component_of(name: str, cfg: ModelConfig) -> str:
    """Which part of the model a tensor belongs to (scales go with their weight)."""
    layer = layer_of(name)
    if layer is not None and layer >= cfg.num_hidden_layers:
        return "mtp"
    if name == "model.embed_tokens.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "head"
    if name.endswith(("norm.weight",)):
        return "norms"
    if ".self_attn." in name:
        return "attention"
    if expert_of(name) is not None:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp.gate." in name:
        return "gate"
    if ".mlp." in name:
        return "dense_mlp"
    return "other"


def summary(path: str | Path) -> dict[str, Any]:
    """Counts for inspect: layers, layer kinds, experts, dtypes, params/bytes per component.

    Uses the shard headers where readable, else the expected table for the index's names.
    """
    path = Path(path)
    cfg = ModelConfig.from_json(path / CONFIG_NAME)  # ConfigError if unusable
    expected = expected_tensors(cfg, mtp=True)
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    for p in sorted(path.glob("*.safetensors")):
        try:
            h = read_header(p)
        except (HeaderError, OSError):
            continue
        for n, e in h.entries.items():
            specs.setdefault(n, (e.dtype, e.shape))
    try:
        wm, _ = load_index(path)
        for n in wm:
            if n not in specs and n in expected:
                specs[n] = (expected[n].dtype, expected[n].shape)
    except CheckpointError:
        pass
    comps = {c: {"params": 0, "bytes": 0, "tensors": 0} for c in COMPONENTS}
    dtypes: Counter = Counter()
    dtype_bytes: Counter = Counter()
    mtp_copies = 0  # the MTP layer's second copies of the embedding and head
    for n, (dt, shape) in specs.items():
        c = component_of(n, cfg)
        if c == "mtp" and n.endswith((".embed_tokens.weight", ".shared_head.head.weight")):
            mtp_copies += math.prod(shape)
        comps.setdefault(c, {"params": 0, "bytes": 0, "tensors": 0})
        nb = math.prod(shape) * DTYPE_BYTES.get(dt, 0)
        comps[c]["bytes"] += nb
        comps[c]["tensors"] += 1
        if not n.endswith(SCALE_SUFFIX):
            comps[c]["params"] += math.prod(shape)
        dtypes[dt] += 1
        dtype_bytes[dt] += nb
    mtp_ids = cfg.mtp_layer_ids
    return {
        "path": str(path),
        "format": "fp8" if cfg.is_fp8 else "bf16",
        "layers": cfg.num_hidden_layers,
        "dense_layers": [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)],
        "moe_layers": [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)],
        "mtp_layers": mtp_ids,
        "routed_experts": cfg.n_routed_experts,
        "shared_experts": cfg.n_shared_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "tensors": len(specs),
        "shards": len(list(path.glob("*.safetensors"))),
        "dtypes": {d: {"tensors": dtypes[d], "bytes": dtype_bytes[d]} for d in sorted(dtypes)},
        "components": comps,
        "total_params": sum(c["params"] for c in comps.values()),
        "main_params": sum(v["params"] for c, v in comps.items() if c != "mtp"),
        "mtp_unique_params": comps["mtp"]["params"] - mtp_copies,
        "total_bytes": sum(c["bytes"] for c in comps.values()),
    }


def _fmt_n(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return str(int(x))


def _ranges(ids: list[int]) -> str:
    if not ids:
        return "none"
    if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2:
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"checkpoint {s['path']} ({s['format']}, {s['shards']} shards, {s['tensors']} tensors)",
        f"layers {s['layers']}: dense {_ranges(s['dense_layers'])}, MoE {_ranges(s['moe_layers'])}, "
        f"MTP {_ranges(s['mtp_layers'])}",
        f"experts: {s['routed_experts']} routed, {s['shared_experts']} shared, "
        f"{s['experts_per_token']} per token",
        "dtypes: " + ", ".join(f"{d} {v['tensors']} tensors {_fmt_n(v['bytes'])}B"
                               for d, v in s["dtypes"].items()),
        f"{'component':<16}{'params':>12}{'bytes':>12}{'tensors':>9}",
    ]
    for c, v in s["components"].items():
        lines.append(f"{c:<16}{_fmt_n(v['params']):>12}{_fmt_n(v['bytes']):>12}{v['tensors']:>9}")
    lines.append(f"{'total':<16}{_fmt_n(s['total_params']):>12}{_fmt_n(s['total_bytes']):>12}"
                 f"{s['tensors']:>9}")
    lines.append(f"main model {_fmt_n(s['main_params'])} params; MTP adds "
                 f"{_fmt_n(s['mtp_unique_params'])} unique (its embedding and head are copies)")
    return "\n".join(lines)
