"""The cluster planner (python -m ds3dist.plan): per-rank weight bytes against a hand
computation on the release's layouts, against the model parts ranks build on `small`, and
against what an engine's ranks read and allocate on `small` (a sparse copy) and `tiny`; the
latent cache per token; the search on two 8-GPU nodes; bad settings refused in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ds3dist.checkpoint.layout import expected_tensors, expert_of
from ds3dist.config import ModelConfig, preset
from ds3dist.core.options import ServingOptions
from ds3dist.jobs.memory_plan import Holding, WeightGroups, rank_bytes
from ds3dist.parallel.layout import ParallelLayout
from ds3dist.parallel.placement import Placement
from ds3dist.plan.__main__ import main
from ds3dist.plan.cluster import Cluster, Workload
from ds3dist.plan.estimate import Candidate, Setup, estimate

RELEASE_LAYOUTS = {  # as the shipped +parallel= files give them
    "pp1ep16": ParallelLayout(pp=1, ep=16, device="cuda"),
    "pp2ep8": ParallelLayout(pp=2, ep=8, stage_boundaries=[0, 32, 61], device="cuda"),
    "pp4ep16": ParallelLayout(pp=4, ep=16, stage_boundaries=[0, 16, 32, 48, 61], device="cuda"),
}


def _fp8(out_f: int, in_f: int) -> int:
    """An FP8 linear: one byte a weight, a float32 scale per 128x128 block."""
    return out_f * in_f + math.ceil(out_f / 128) * math.ceil(in_f / 128) * 4


def _hand_rank_bytes(stage_layers: range, ep: int, first: bool, last: bool) -> int:
    """The release (hidden 7168, 61 layers, 3 dense, 256 experts of 2048, 128 heads), FP8
    weights and scales, norms and the gate in bf16, the gate's bias in float32; no MTP."""
    h, bf16 = 7168, 2
    attention = (_fp8(1536, h) + 1536 * bf16 + _fp8(128 * 192, 1536) + _fp8(512 + 64, h)
                 + 512 * bf16 + _fp8(128 * (128 + 128), 512) + _fp8(h, 128 * 128)
                 + 2 * h * bf16)  # + input and post-attention norms
    dense = 2 * _fp8(18432, h) + _fp8(h, 18432)
    expert = 2 * _fp8(2048, h) + _fp8(h, 2048)
    moe_shared = 256 * h * bf16 + 256 * 4 + expert  # gate, its bias, one shared expert
    total = 0
    for i in stage_layers:
        total += attention + (dense if i < 3 else moe_shared + 256 // ep * expert)
    if first:
        total += 129280 * h * bf16
    if last:
        total += h * bf16 + 129280 * h * bf16  # final norm, lm_head
    return total


@pytest.mark.parametrize("name", sorted(RELEASE_LAYOUTS))
def test_release_rank_bytes_match_the_hand_computation_and_sum_to_the_checkpoint(name):
    model, layout = preset("deepseek_v3"), RELEASE_LAYOUTS[name]
    rows = rank_bytes(model, layout, Holding(execution="fp8"))
    bounds = layout.boundaries(model)
    for r in rows:
        want = _hand_rank_bytes(range(bounds[r.stage], bounds[r.stage + 1]), layout.ep,
                                r.stage == 0, r.stage == layout.pp - 1)
        assert r.weight_bytes == want, (name, r.rank)
        assert r.read_bytes == r.weight_bytes  # FP8 execution holds the checkpoint's form
        assert r.components.mtp == 0 and r.offloaded_bytes == 0
    # every routed expert once over the ranks; everything else once over one column
    main_model = expected_tensors(model, mtp=False).values()
    routed = sum(s.nbytes for s in main_model if expert_of(s.name) is not None)
    rest = sum(s.nbytes for s in main_model if expert_of(s.name) is None)
    assert sum(r.components.routed_experts for r in rows) == routed
    assert sum(r.weight_bytes - r.components.routed_experts
               for r in rows if r.ep_rank == 0) == rest
    assert routed + rest == sum(s.nbytes for s in main_model)


def test_release_dequantized_bytes_and_the_mtp_layer():
    model, layout = preset("deepseek_v3"), RELEASE_LAYOUTS["pp2ep8"]
    fp8 = rank_bytes(model, layout, Holding(execution="fp8"))
    bf16 = rank_bytes(model, layout, Holding(execution="bf16", dtype=torch.bfloat16))
    # dequantized: two bytes a weight, no scales; the embedding is bf16 either way
    expert = 3 * 2048 * 7168
    assert bf16[0].components.routed_experts == 29 * 32 * 2 * expert
    assert fp8[0].components.routed_experts == 29 * 32 * (2 * _fp8(2048, 7168) + _fp8(7168, 2048))
    assert bf16[0].components.embedding == fp8[0].components.embedding
    assert bf16[0].read_bytes == fp8[0].read_bytes  # the same tensors are read
    spec = rank_bytes(model, layout, Holding(execution="fp8", mtp_passes=1))
    # the MTP layer on the last stage: its attention, shared parts, 32 experts, embedding copy
    # (that stage lacks the main one), not its head copy
    h = 7168
    mtp = (_hand_rank_bytes(range(61, 62), 8, False, False)  # the decoder layer, 32 experts
           + 129280 * h * 2  # its embedding copy
           + 3 * h * 2  # enorm, hnorm, shared_head.norm
           + h * 2 * h * 2)  # eh_proj, stored in bf16
    assert spec[8].components.mtp == mtp
    assert [r.weight_bytes for r in spec[:8]] == [r.weight_bytes for r in fp8[:8]]


def _setup(model: ModelConfig, gpu: str, nodes: int, prompt: float, output: float,
           **serving) -> Setup:
    h = Holding(execution="fp8")
    return Setup(model, h, ServingOptions(**serving), Cluster.of(gpu, 8, nodes),
                 Workload(prompt, output), WeightGroups.of(model, h))


def test_latent_cache_bytes_per_token_and_tokens_that_fit():
    model = preset("deepseek_v3")
    s = _setup(model, "h200", 1, 1000, 200, cache_gb=20.0)
    e = estimate(s, Candidate("ep8", ParallelLayout(ep=8, device="cuda"), 1, []))
    assert e.cache_bytes_per_token == 61 * (512 + 64) * 2 == 70_272
    per_page = 70_272 * 64
    assert e.cache_tokens_per_column == int(20e9 // per_page) * 64
    assert e.fits and e.completion_tokens_per_s > 0
    staged = estimate(s, Candidate("pp2ep8", RELEASE_LAYOUTS["pp2ep8"], 1, []))
    assert staged.cache_bytes_per_token == 32 * 576 * 2  # stage 0's 32 layers, the most
    # the same layout on 80 GB GPUs: what is short is named
    small = estimate(_setup(model, "h100", 1, 1000, 200),
                     Candidate("ep8", ParallelLayout(ep=8, device="cuda"), 1, []))
    assert not small.fits and small.reason.startswith("memory: rank 0")
    assert "> 80 GB (h100); short" in small.reason


def test_search_on_two_h100_nodes(capsys):
    rc = main(["model=deepseek_v3", "execution=fp8", "cluster.gpu=h100",
               "cluster.gpus_per_node=8", "cluster.nodes=2", "workload.prompt_tokens=1000",
               "workload.output_tokens=300", "--search", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    layouts = {x["name"]: x for x in out["layouts"]}
    fitting = [x for x in out["layouts"] if x["fits"]]
    assert fitting and all(x["fits"] for x in out["layouts"][:len(fitting)])  # fits first
    rates = [x["completion_tokens_per_s"] for x in fitting]
    assert rates == sorted(rates, reverse=True) and rates[0] > 0
    assert layouts["pp2ep8"]["fits"] and layouts["ep16"]["fits"]
    assert layouts["pp2ep8"]["launch"] == ["+parallel=pp2ep8", "runtime.replicas=1"]
    assert not layouts["ep8"]["fits"] and "short" in layouts["ep8"]["reason"]
    assert layouts["pp1ep1"]["reason"].startswith("memory:")
    for x in fitting:
        assert x["decode"]["binding"] in ("compute", "hbm", "link", "host")
        assert all(r["need_bytes"] + r["cache_bytes"] <= 80e9 + 1 for r in x["ranks"])
    # ep16 spans both nodes: its all-to-all crosses them; pp2ep8's stays in a node
    assert layouts["ep16"]["traffic"]["decode_inter"] > 0
    assert layouts["pp2ep8"]["traffic"]["decode_inter"] == 0
    assert layouts["pp2ep8"]["traffic"]["handoff_inter"] > 0  # stage 0 -> 1 crosses nodes


def test_one_layout_table_and_a_workload_file(capsys, tmp_path):
    f = tmp_path / "req.jsonl"
    f.write_text(json.dumps({"id": 1, "prompt": "x" * 1000, "max_new_tokens": 100}) + "\n"
                 + json.dumps({"id": 2, "prompt": "y" * 3000, "max_new_tokens": 300}) + "\n")
    rc = main(["model=deepseek_v3", "+parallel=pp2ep8", "execution=fp8", "cluster.gpu=h100",
               "cluster.nodes=2", f"workload.input={f}"])
    assert rc == 0
    out = capsys.readouterr().out
    # (1000 + 3000) / 2 characters x 0.3 tokens a character; the lines' own output limits
    assert "workload: prompt 600 tokens, output 200 tokens" in out
    assert "launch keys: +parallel=pp2ep8 runtime.replicas=1" in out
    assert "verdict: fits" in out and "decode:" in out and "prefill:" in out


@pytest.mark.parametrize("args, key", [
    (["cluster.gpu=v100"], "cluster.gpu"),
    (["cluster.nodes=0"], "cluster.nodes"),
    (["cluster.gpus_per_node=-1"], "cluster.gpus_per_node"),
    (["workload.prompt_tokens=-5"], "workload.prompt_tokens"),
    (["workload.output_tokens=-1"], "workload.output_tokens"),
    (["+cluster.figures.memory_gb=-3"], "cluster.figures.memory_gb"),
    (["+cluster.figures.hbm_gbps=3"], "cluster.figures.hbm_gbps"),
    (["workload.input=/nonexistent/in.jsonl"], "workload.input"),
    (["parallel.ep=3"], "parallel.ep"),
    (["--gpu", "h200"], "unrecognized arguments"),  # the cluster is keys, not flags
])
def test_bad_settings_are_refused_in_one_line(capsys, args, key):
    assert main(["model=deepseek_v3", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {key}"), err


def test_cluster_and_workload_keys(capsys):
    """The keys' defaults are the planner's (one place); a figure override reaches the plan."""
    from ds3dist.plan.__main__ import _compose
    from ds3dist.plan.cluster import ClusterSpec, WorkloadSpec

    cfg = _compose([])
    assert ClusterSpec.of(cfg.cluster) == ClusterSpec()
    assert WorkloadSpec.of(cfg.workload) == WorkloadSpec()
    assert main(["model=deepseek_v3", "+parallel=pp2ep8", "execution=fp8", "cluster.gpu=h200",
                 "cluster.nodes=2", "+cluster.figures.hbm_tbps=6.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cluster"]["name"] == "h200" and out["cluster"]["hbm_tbps"] == 6.5
    assert out["cluster"]["memory_gb"] == 141 and out["cluster"]["nodes"] == 2


def test_the_cpu_entry_is_this_machine_measured_once():
    from ds3dist.plan.accelerators import this_machine

    m = this_machine()
    assert this_machine() is m  # measured once per process
    assert m.cores >= 1 and m.memory_gb > 0 and m.copy_tbps > 0
    assert m.large_tflops > 0 and m.decode_tflops > 0 and m.decode_tbps > 0
    # one rank a core: a core's figures; fewer ranks than cores: their cores' worth
    one = Cluster.of("cpu", m.cores, 1).device
    assert one.bf16_tflops == m.large_tflops and one.fp8_tflops == 0
    assert one.hbm_tbps == min(m.copy_tbps, m.decode_tbps)
    assert one.memory_gb == pytest.approx(m.memory_gb / m.cores)
    alone = Cluster.of("cpu", 1, 1).device
    assert alone.bf16_tflops == m.cores * m.large_tflops and alone.memory_gb == m.memory_gb
    assert Cluster.of("cpu", 2, 1, {"hbm_tbps": 0.1}).device.hbm_tbps == 0.1
    assert Cluster.of("cpu", 2, 1).kind == "cpu"


def _sparse_small(out):
    """`small` in the release format with holes for data: FP8 weights, norms and embeddings
    read as zeros (a sparse file), block scales written as ones (a load refuses others)."""
    import struct

    from ds3dist.checkpoint.layout import SCALE_SUFFIX
    from ds3dist.checkpoint.synthesize import plan_shards, shard_name, write_json

    cfg = preset("small")
    table = expected_tensors(cfg)
    out.mkdir()
    wm = {}
    for k, group in enumerate(plan_shards(list(table.values()), 4), start=1):
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for t in group:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                              "data_offsets": [off, off + t.nbytes]}
            off += t.nbytes
            wm[t.name] = shard_name(k, 4)
        hj = json.dumps(header).encode()
        hj += b" " * (-len(hj) % 8)
        with open(out / shard_name(k, 4), "wb") as f:
            f.write(struct.pack("<Q", len(hj)) + hj)
            for t in group:
                if t.name.endswith(SCALE_SUFFIX):
                    f.seek(8 + len(hj) + header[t.name]["data_offsets"][0])
                    f.write(torch.ones(t.numel).numpy().tobytes())
            f.truncate(8 + len(hj) + off)
    write_json(out / "model.safetensors.index.json",
               {"metadata": {"total_size": sum(t.nbytes for t in table.values())},
                "weight_map": wm})
    write_json(out / "config.json", cfg.to_json_dict())
    return out


def test_ranks_read_and_allocate_what_the_planner_says(ray_cluster, tiny_fp8_dir, tmp_path):
    """pp2ep2 on `small` (a sparse copy in the release format), and ep2 on tiny with a
    redundant copy of an expert while speculating (the MTP layer loaded): each rank's bytes
    read from the checkpoint are the planner's figure exactly, and so are the cache pages."""
    import shutil

    from ds3dist import Engine
    from ds3dist.core.options import SpeculativeConfig

    small = _sparse_small(tmp_path / "small")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_fp8_dir / name, small / name)
    copies = (tuple(range(9)), tuple(range(8, 16)))  # expert 8 on both ranks
    place = Placement(16, 2, {1: copies, 2: copies})
    cases = [(small, ParallelLayout(pp=2, ep=2), None),
             (tiny_fp8_dir, ParallelLayout(ep=2, placement=place),
              SpeculativeConfig("mtp", 1, "exact"))]
    for ckpt, layout, spec in cases:
        cfg = ModelConfig.from_json(ckpt)
        execution = "fp8" if spec is None else "bf16"
        h = Holding(execution=execution, dtype=torch.float32, mtp_passes=1 if spec else 0)
        planned = rank_bytes(cfg, layout, h)
        serving = ServingOptions(cache_gb=0.05)
        with Engine(ckpt, layout, execution=execution, dtype=torch.float32,
                    speculative=spec, serving=serving) as engine:
            read = [st.load.bytes_read for st in engine.stats().ranks]
            pages = engine.sched_cfg.pages_per_column
        assert read == [r.read_bytes for r in planned], (layout, read)
        s = Setup(cfg, h, serving, Cluster.of("h100", 8, 1), Workload(100, 10),
                  WeightGroups.of(cfg, h))
        est = estimate(s, Candidate("case", layout, 1, []))
        assert est.cache_tokens_per_column == pages * serving.page_size  # what ranks allocate
        if spec:  # the copy of expert 8 counted on both ranks, the MTP layer on each
            assert all(r.components.mtp > 0 for r in planned)
            assert all(r.num_experts == 9 if r.ep_rank == 0 else 8 for r in planned)


@pytest.mark.parametrize("execution", ["fp8", "bf16"])
def test_small_rank_bytes_equal_the_model_parts_the_ranks_build(execution):
    """On `small`, pp1ep2, pp2ep2 and ep4 with a redundant copy on every rank: each rank's
    planned weight bytes equal the tensors of the model part a rank builds for its plan
    (load_model's structure on the meta device, in the execution's form; no checkpoint)."""
    from ds3dist.model.options import BuildOptions
    from ds3dist.model.transformer import Transformer

    cfg = preset("small")
    base = Placement.contiguous(cfg, 4)
    extra = [20, 40, 60, 0]  # each rank another rank's expert
    place = Placement(cfg.n_routed_experts, 4, {
        i: tuple(tuple(sorted({*held, extra[r]})) for r, held in enumerate(ranks))
        for i, ranks in base.layers.items()})
    for layout in (ParallelLayout(ep=2), ParallelLayout(pp=2, ep=2),
                   ParallelLayout(ep=4, placement=place)):
        rows = rank_bytes(cfg, layout, Holding(execution=execution, dtype=torch.bfloat16))
        for plan, row in zip(layout.plan(cfg), rows):
            per_layer = tuple(sorted(plan.layer_experts.items())) if plan.layer_experts else None
            opts = BuildOptions(cfg, execution, torch.bfloat16,
                                None if per_layer else plan.experts, layer_experts=per_layer)
            with torch.device("meta"):
                part = Transformer(opts, plan.layers, embed=plan.embed, head=plan.head, mtp=False)
            built = sum(t.numel() * t.element_size() for t in part.state_dict().values())
            assert row.weight_bytes == built, (layout, plan.rank)
