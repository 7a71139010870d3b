"""One layout on one cluster: per rank its bytes (weights by component from the dry run's
memory plan, activation workspace, offload window, paged cache), the bytes the MoE all-to-all
and the stage hand-offs send per token, a roofline of a decode step and of prefill, and a
verdict naming what is short.

The roofline takes, per stage, the largest of four times: compute (FLOPs / dense peak), HBM
(weights read + cache read / bandwidth), links (all-to-all and hand-off bytes over the node's
links, or between nodes) and host (offloaded bytes fetched per step). A step's plans flow
through the stages (one plan per stage in flight), so the slowest stage sets the pace. Token
routing is taken as uniform over the experts (a balanced load). These are bounds, not
measurements: real steps are slower (kernel efficiency, launch and collective latency).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ds3dist.config import ModelConfig
from ds3dist.core.options import ServingOptions
from ds3dist.jobs.memory_plan import Holding, RankBytes, WeightGroups, rank_bytes
from ds3dist.parallel.layout import ParallelLayout, RankPlan
from ds3dist.plan.cluster import Cluster, Workload

# Accepted share of a draft token (DeepSeek-V3 technical report, section 5.4.3: 85-90% for
# the second token predicted by the MTP module); the low end.
DRAFT_ACCEPTANCE = 0.85
SCALE_BLOCK = 128  # an FP8 activation row carries one float32 scale per 128 values


@dataclass(frozen=True)
class Setup:
    """What every layout is evaluated with: the model, how ranks hold and serve it, the
    cluster and the workload."""
    model: ModelConfig
    holding: Holding
    serving: ServingOptions
    cluster: Cluster
    workload: Workload
    groups: WeightGroups

    @property
    def itemsize(self) -> int:
        return self.holding.dtype.itemsize

    @property
    def drafts(self) -> int:
        return self.holding.mtp_passes


@dataclass(frozen=True)
class RankMemory:
    weights: RankBytes
    workspace_bytes: int  # activations at the step token budget (estimate)
    cache_bytes: float  # the paged cache's budget
    cache_tokens: int  # tokens that fit in it (whole pages)
    need_bytes: float  # resident + window + workspace (+ cache when runtime.cache_gb is given)


@dataclass(frozen=True)
class Traffic:
    """Bytes a rank sends per token of its column (the most of any rank): MoE dispatch +
    combine over all its MoE layers, and the hidden state handed to the next stage; to ranks
    within its node / on other nodes."""
    decode_intra: float
    decode_inter: float
    prefill_intra: float
    prefill_inter: float
    handoff_intra: float
    handoff_inter: float


@dataclass(frozen=True)
class Roofline:
    """Seconds of one step of the slowest stage under each bound; tokens/s of the replica."""
    tokens: float  # tokens per plan and column
    compute_s: float
    hbm_s: float
    link_s: float
    host_s: float
    tokens_per_s: float

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.hbm_s, self.link_s, self.host_s)

    @property
    def binding(self) -> str:
        return max((self.compute_s, "compute"), (self.hbm_s, "hbm"), (self.link_s, "link"),
                   (self.host_s, "host"))[1]


@dataclass(frozen=True)
class Candidate:
    """A layout to evaluate, with the runner's keys that launch it."""
    name: str
    layout: ParallelLayout
    replicas: int
    launch: list[str]


@dataclass(frozen=True)
class Estimate:
    candidate: Candidate
    ranks: list[RankMemory]
    cache_bytes_per_token: int  # per rank, the most of any stage
    cache_tokens_per_column: int
    traffic: Traffic
    decode: Roofline | None
    prefill: Roofline | None
    completion_tokens_per_s: float  # all replicas, for the workload
    fits: bool
    reason: str  # why not (empty when it fits)
    notes: list[str] = field(default_factory=list)


# ---- per-token figures of the model ---------------------------------------------------------
def _attention_params(c: ModelConfig) -> int:
    return (c.hidden_size * c.q_lora_rank + c.q_lora_rank * c.num_attention_heads * c.qk_head_dim
            + c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim)
            + c.kv_lora_rank * c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim)
            + c.num_attention_heads * c.v_head_dim * c.hidden_size)


def _attention_flops_per_key(c: ModelConfig, decode: bool) -> int:
    """Scores and values per query token and cached position: absorbed MLA when decoding
    (over the latent rows), the naive form in prefill (per head)."""
    h = c.num_attention_heads
    if decode:
        return 2 * h * (c.kv_lora_rank + c.qk_rope_head_dim) + 2 * h * c.kv_lora_rank
    return 2 * h * c.qk_head_dim + 2 * h * c.v_head_dim


def _layer_flops(c: ModelConfig, layer: int, rows: float, keys: float, decode: bool) -> float:
    """One layer's FLOPs on one rank for `rows` tokens of its column with `keys` cached
    positions each; the routed experts' share is the rank's 1/ep of the group's copies, which
    for uniform routing equals rows x top-k."""
    f = rows * (2 * _attention_params(c) + keys * _attention_flops_per_key(c, decode))
    expert = 2 * 3 * c.hidden_size * c.moe_intermediate_size
    if c.is_moe_layer(layer):
        f += rows * (2 * c.hidden_size * c.n_routed_experts + c.n_shared_experts * expert
                     + c.num_experts_per_tok * expert)
    else:
        f += rows * 2 * 3 * c.hidden_size * c.intermediate_size
    return f


def workspace_bytes(c: ModelConfig, s: Setup, plan: RankPlan) -> int:
    """Activations of a step at the token budget: the residual stream and its neighbours (4
    rows of hidden), plus the widest intermediate (naive attention's q, k and v per head; the
    routed copies' gate+up and received rows; the dense MLP's gate+up), in the compute
    dtype; on a last stage the float32 logits of every row it samples."""
    t = s.serving.max_tokens_per_step
    h = c.hidden_size
    widest = max(c.num_attention_heads * (c.qk_head_dim + c.qk_nope_head_dim + c.v_head_dim),
                 c.num_experts_per_tok * (2 * c.moe_intermediate_size + h),
                 3 * c.intermediate_size)
    n = t * (4 * h + widest) * s.itemsize
    if plan.head:
        n += s.serving.max_seqs * (1 + s.drafts) * c.vocab_size * 4
    return n


def cache_bytes_per_token(c: ModelConfig, rb: RankBytes, itemsize: int) -> int:
    """One token's latent rows on a rank: (kv_lora_rank + qk_rope_head_dim) per layer held
    (the MTP layer's too when it runs), in the compute dtype."""
    return (len(rb.layers) + rb.mtp) * (c.kv_lora_rank + c.qk_rope_head_dim) * itemsize


# ---- where the bytes go --------------------------------------------------------------------
def _node(global_rank: int, cluster: Cluster) -> int:
    return global_rank // cluster.gpus_per_node


def _peer_shares(layout: ParallelLayout, stage: int, cluster: Cluster) -> tuple[float, float]:
    """Of a rank's token copies, the shares sent to other ranks of its node and to other
    nodes (uniform over the stage's expert-parallel group; replica 0's ranks)."""
    ep = layout.ep
    ranks = [layout.rank_of(stage, r) for r in range(ep)]
    intra = inter = 0
    for a in ranks:
        for b in ranks:
            if a != b:
                if _node(a, cluster) == _node(b, cluster):
                    intra += 1
                else:
                    inter += 1
    return intra / (ep * ep), inter / (ep * ep)


def _copy_bytes(c: ModelConfig, s: Setup) -> float:
    """Bytes one token copy costs on the wire: dispatch (FP8 + scales with fp8 execution,
    else the compute dtype; its float32 routing weight) and combine (the compute dtype)."""
    h = c.hidden_size
    out = h + math.ceil(h / SCALE_BLOCK) * 4 if s.holding.execution == "fp8" else h * s.itemsize
    return out + 4 + h * s.itemsize


def _moe_layers(c: ModelConfig, rb: RankBytes) -> int:
    return sum(c.is_moe_layer(i) for i in rb.layers)


def _mtp_moe_layers(c: ModelConfig, rb: RankBytes) -> int:
    return sum(c.is_moe_layer(i) for i in c.mtp_layer_ids) if rb.mtp else 0


def traffic(c: ModelConfig, s: Setup, layout: ParallelLayout, rows: list[RankBytes]) -> Traffic:
    """The most any rank sends per token of its column, figure by figure (decode counts the
    MTP passes; the hand-off is the hidden state in the compute dtype)."""
    copy = _copy_bytes(c, s) * c.num_experts_per_tok
    hand = c.hidden_size * s.itemsize
    each = []
    for rb in rows:
        intra, inter = _peer_shares(layout, rb.stage, s.cluster)
        dec = (_moe_layers(c, rb) + s.drafts * _mtp_moe_layers(c, rb)) * copy
        pre = (_moe_layers(c, rb) + _mtp_moe_layers(c, rb)) * copy
        last = rb.stage == layout.pp - 1
        nxt = layout.rank_of(rb.stage + 1, rb.ep_rank) if not last else rb.rank
        cross = _node(rb.rank, s.cluster) != _node(nxt, s.cluster)
        each.append((dec * intra, dec * inter, pre * intra, pre * inter,
                     0 if last or cross else hand, hand if cross else 0))
    return Traffic(*(max(col) for col in zip(*each)))


# ---- the roofline ------------------------------------------------------------------------
def _stage_times(c: ModelConfig, s: Setup, layout: ParallelLayout, rb: RankBytes,
                 rows: float, keys: float, decode: bool) -> tuple[float, float, float, float]:
    """(compute, hbm, link, host) seconds of one plan step on rank rb."""
    d = s.cluster.device
    layers = list(rb.layers) + (list(c.mtp_layer_ids) * (s.drafts if decode else 1)
                                if rb.mtp else [])
    flops = sum(_layer_flops(c, i, rows, keys, decode) for i in layers)
    if rb.mtp:
        flops += rows * 2 * 2 * c.hidden_size * c.hidden_size * (s.drafts if decode else 1)
    if rb.components.head:
        flops += (rows if decode else 1) * (1 + s.drafts) * 2 * c.hidden_size * c.vocab_size
    read = step_read_bytes(c, s.itemsize, s.drafts, layout, rb, rows, keys, decode)
    intra, inter = _peer_shares(layout, rb.stage, s.cluster)
    moe = _moe_layers(c, rb) + _mtp_moe_layers(c, rb) * (s.drafts if decode else 1)
    sent = rows * moe * c.num_experts_per_tok * _copy_bytes(c, s)
    hand = rows * c.hidden_size * s.itemsize if rb.stage < layout.pp - 1 else 0
    nxt = layout.rank_of(min(rb.stage + 1, layout.pp - 1), rb.ep_rank)
    cross = _node(rb.rank, s.cluster) != _node(nxt, s.cluster)
    link = max((sent * intra + (0 if cross else hand)) / (d.intra_gbps * 1e9),
               (sent * inter + (hand if cross else 0)) / (d.inter_gbps * 1e9))
    host = rb.streamed_bytes_per_step / (d.host_gbps * 1e9)
    return (flops / d.peak_flops(s.holding.execution), read / (d.hbm_tbps * 1e12), link, host)


def step_read_bytes(c: ModelConfig, itemsize: int, drafts: int, layout: ParallelLayout,
                    rb: RankBytes, rows: float, keys: float, decode: bool) -> float:
    """Bytes one plan step of `rows` rows reads on rank rb: its weights, of the routed experts
    only those the step's copies reach (uniform routing over the group's copies) and of the
    embedding only the rows' own, and the cache (decode: `keys` cached tokens per row)."""
    comp = rb.components
    copies = rows * layout.ep * c.num_experts_per_tok
    hit = 1 - (1 - 1 / c.n_routed_experts) ** copies
    mtp = comp.mtp * (drafts if decode else 1)
    embedding = min(comp.embedding, rows * c.hidden_size * itemsize)
    weights = (comp.total - comp.routed_experts - comp.mtp - comp.embedding
               + comp.routed_experts * hit + mtp + embedding)
    per_token_cache = cache_bytes_per_token(c, rb, itemsize)
    return weights + (rows * keys * per_token_cache if decode else rows * per_token_cache)


def roofline(c: ModelConfig, s: Setup, layout: ParallelLayout, rows: list[RankBytes],
             tokens: float, keys: float, decode: bool) -> Roofline:
    """The slowest stage's step for `tokens` per plan and column; tokens/s of one replica
    (every column, one plan per stage in flight)."""
    step_rows = tokens * (1 + s.drafts) if decode else tokens
    worst = max((_stage_times(c, s, layout, rb, step_rows, keys, decode) for rb in rows),
                key=max)
    made = tokens * (1 + s.drafts * DRAFT_ACCEPTANCE) if decode else tokens
    return Roofline(tokens, *worst, tokens_per_s=layout.ep * made / max(worst))


# ---- one layout ---------------------------------------------------------------------------
def estimate(s: Setup, cand: Candidate) -> Estimate:
    c, layout, dev = s.model, cand.layout, s.cluster.device
    rows = rank_bytes(c, layout, s.holding, s.groups)
    plans = layout.plan(c)
    memory = dev.memory_gb * 1e9
    ranks = []
    for rb, plan in zip(rows, plans):
        work = workspace_bytes(c, s, plan)
        base = rb.resident_bytes + rb.window_bytes + work
        free = max(memory - base, 0.0)
        budget = s.serving.cache_bytes(free if s.cluster.kind == "cuda" else None)
        per_page = cache_bytes_per_token(c, rb, s.itemsize) * s.serving.page_size
        tokens = int(budget // per_page) * s.serving.page_size
        need = base + (budget if s.serving.cache_gb is not None else 0)
        ranks.append(RankMemory(rb, work, budget, tokens, need))
    per_token = max(cache_bytes_per_token(c, r.weights, s.itemsize) for r in ranks)
    column = min(r.cache_tokens for r in ranks)
    w = s.workload
    reason = _short(s, cand, ranks, column)
    decode = prefill = None
    tps = 0.0
    if not reason:
        in_flight = w.prompt_tokens + w.output_tokens / 2  # a running request's mean context
        seqs = min(s.serving.max_seqs, column // max(in_flight, 1))
        decode = roofline(c, s, layout, rows, max(seqs / layout.pp, 1 / layout.pp),
                          in_flight, decode=True)
        chunk = s.serving.max_tokens_per_step / layout.pp
        prefill = roofline(c, s, layout, rows, chunk, w.prompt_tokens / 2, decode=False)
        per_request = w.prompt_tokens / prefill.tokens_per_s + w.output_tokens / decode.tokens_per_s
        tps = cand.replicas * w.output_tokens / per_request
    return Estimate(cand, ranks, per_token, column, traffic(c, s, layout, rows), decode, prefill,
                    tps, not reason, reason)


def _short(s: Setup, cand: Candidate, ranks: list[RankMemory], column: int) -> str:
    """Why the layout cannot run here (empty: it fits): devices, then memory, then cache."""
    cl, dev = s.cluster, s.cluster.device
    want = cand.layout.world_size * cand.replicas
    if want > cl.devices:
        return (f"devices: needs {want} ({cand.layout.world_size} ranks x {cand.replicas} "
                f"replicas), the cluster has {cl.devices} (cluster.nodes={cl.nodes} x "
                f"cluster.gpus_per_node={cl.gpus_per_node})")
    memory = dev.memory_gb * 1e9
    worst = max(ranks, key=lambda r: r.need_bytes)
    if worst.need_bytes > memory:
        rb = worst.weights
        parts = [f"weights {rb.resident_bytes / 1e9:.1f}"]
        if rb.window_bytes:
            parts.append(f"offload window {rb.window_bytes / 1e9:.1f}")
        parts.append(f"workspace {worst.workspace_bytes / 1e9:.1f}")
        if s.serving.cache_gb is not None:
            parts.append(f"cache {worst.cache_bytes / 1e9:.1f}")
        return (f"memory: rank {rb.rank} (stage {rb.stage}) needs {' + '.join(parts)} = "
                f"{worst.need_bytes / 1e9:.1f} GB > {dev.memory_gb:g} GB ({dev.name}); "
                f"short {(worst.need_bytes - memory) / 1e9:.1f} GB")
    one = s.workload.prompt_tokens + s.workload.output_tokens
    if column < one:
        return (f"cache: a column holds {column} tokens, one mean request needs {one:.0f} "
                f"(prompt + output)")
    return ""
