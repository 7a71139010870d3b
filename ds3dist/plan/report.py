"""The planner's output: a table for people, or JSON for scripts (the same figures)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ds3dist.plan.cluster import Cluster, Workload
from ds3dist.plan.estimate import Estimate, Roofline


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


def _roof(r: Roofline | None) -> str:
    if r is None:
        return "-"
    return (f"{r.tokens_per_s:,.0f} tok/s ({r.binding}-bound; step {r.seconds * 1e3:.1f} ms: "
            f"compute {r.compute_s * 1e3:.1f}, hbm {r.hbm_s * 1e3:.1f}, "
            f"link {r.link_s * 1e3:.1f}, host {r.host_s * 1e3:.1f}; "
            f"{r.tokens:g} tokens per plan and column)")


def detail(e: Estimate) -> str:
    """One layout in full: per rank of each stage (its first column) and the estimates."""
    lay = e.candidate.layout
    lines = [f"layout {e.candidate.name}: pp={lay.pp} ep={lay.ep} x {e.candidate.replicas} "
             f"replica(s) = {lay.world_size * e.candidate.replicas} devices; launch keys: "
             + " ".join(e.candidate.launch),
             "rank stage layers    experts  GB: attention dense_mlp router routed shared "
             "embed head mtp | weights window workspace cache | cache tokens"]
    for r in e.ranks:
        w = r.weights
        if w.ep_rank:
            continue
        c = w.components
        lay_s = (f"{w.layers[0]}-{w.layers[-1]}" if w.layers else "-") + ("+mtp" if w.mtp else "")
        lines.append(
            f"{w.rank:>4} {w.stage:>5} {lay_s:<9} {w.num_experts:>7}  "
            + " ".join(_gb(x) for x in (c.attention, c.dense_mlp, c.router, c.routed_experts,
                                        c.shared_experts, c.embedding, c.head, c.mtp))
            + f" | {_gb(w.weight_bytes)} {_gb(w.window_bytes)} {_gb(r.workspace_bytes)} "
              f"{_gb(r.cache_bytes)} | {r.cache_tokens:,}")
    t = e.traffic
    lines += [
        f"cache: {e.cache_bytes_per_token:,} bytes per token on a rank; "
        f"{e.cache_tokens_per_column:,} tokens per column",
        f"sent per token by a rank (bytes, node / between nodes): decode {t.decode_intra:,.0f} "
        f"/ {t.decode_inter:,.0f}, prefill {t.prefill_intra:,.0f} / {t.prefill_inter:,.0f}, "
        f"stage hand-off {t.handoff_intra:,.0f} / {t.handoff_inter:,.0f}",
        f"decode:  {_roof(e.decode)}",
        f"prefill: {_roof(e.prefill)}",
        f"verdict: fits; {e.completion_tokens_per_s:,.0f} completion tokens/s (estimate)"
        if e.fits else f"verdict: does not fit: {e.reason}"]
    return "\n".join(lines)


def one_layout(e: Estimate, cluster: Cluster, workload: Workload) -> str:
    """One layout on a cluster (what the planner prints without --search, and the dry run)."""
    return "\n".join([f"cluster: {cluster.describe()}", _workload(workload), detail(e)])


def _workload(w: Workload) -> str:
    return (f"workload: prompt {w.prompt_tokens:.0f} tokens, output {w.output_tokens:.0f} "
            f"tokens ({w.source})")


def table(found: list[Estimate], cluster: Cluster, workload: Workload) -> str:
    """The search: one line per layout, ranked."""
    lines = [f"cluster: {cluster.describe()}", _workload(workload),
             f"{'#':>3} {'layout':<10} {'devices':>7} {'GB/rank':>7} {'cache tok':>10} "
             f"{'decode/s':>9} {'prefill/s':>10} {'compl tok/s':>11}  verdict / launch keys"]
    for i, e in enumerate(found, 1):
        lay = e.candidate.layout
        need = max(r.need_bytes for r in e.ranks)
        dec = f"{e.decode.tokens_per_s:,.0f}" if e.decode else "-"
        pre = f"{e.prefill.tokens_per_s:,.0f}" if e.prefill else "-"
        tail = (f"fits ({e.decode.binding}/{e.prefill.binding}-bound): "
                + " ".join(e.candidate.launch) if e.fits else f"does not fit: {e.reason}")
        lines.append(f"{i:>3} {e.candidate.name:<10} "
                     f"{lay.world_size:>3}x{e.candidate.replicas:<3} {_gb(need):>7} "
                     f"{e.cache_tokens_per_column if e.fits else 0:>10,} {dec:>9} {pre:>10} "
                     f"{e.completion_tokens_per_s:>11,.0f}  {tail}")
    return "\n".join(lines)


def to_json(found: list[Estimate], cluster: Cluster, workload: Workload) -> dict[str, Any]:
    def one(e: Estimate) -> dict[str, Any]:
        lay = e.candidate.layout
        return {
            "name": e.candidate.name, "pp": lay.pp, "ep": lay.ep,
            "replicas": e.candidate.replicas, "launch": e.candidate.launch,
            "fits": e.fits, "reason": e.reason,
            "completion_tokens_per_s": e.completion_tokens_per_s,
            "cache_bytes_per_token": e.cache_bytes_per_token,
            "cache_tokens_per_column": e.cache_tokens_per_column,
            "traffic": asdict(e.traffic),
            "decode": _roof_json(e.decode), "prefill": _roof_json(e.prefill),
            "ranks": [{**r.weights.as_row(), "workspace_bytes": r.workspace_bytes,
                       "cache_bytes": r.cache_bytes, "cache_tokens": r.cache_tokens,
                       "need_bytes": r.need_bytes} for r in e.ranks],
        }
    return {"cluster": {**asdict(cluster.device), "gpus_per_node": cluster.gpus_per_node,
                        "nodes": cluster.nodes},
            "workload": asdict(workload), "layouts": [one(e) for e in found]}


def _roof_json(r: Roofline | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {**asdict(r), "seconds": r.seconds, "binding": r.binding}
