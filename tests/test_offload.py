"""DeepSpeed ZeRO-Inference weight offload (execution.offload) on CPU: DeepSpeed's CPU
accelerator, gloo. Offloaded units compute exactly what resident ones do; the engine's
greedy output with offload equals the engine's without; the dry run's memory plan against
hand-computed bytes; configuration errors name the setting."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ds3dist.checkpoint.layout import expected_tensors, expert_of
from ds3dist.config import preset
from ds3dist.jobs import schema
from ds3dist.jobs.memory_plan import Holding, rank_table
from ds3dist.parallel.layout import ParallelLayout
from ds3dist.runtime.options import OffloadOptions

# deepspeed is imported by the ranks (and the subprocesses below), never by the test process;
# DeepSpeed's CPU accelerator loads its shm_comm op, built once before the session's tests
pytestmark = [pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="the deepspeed extra is not installed"),
              pytest.mark.ops("shm_comm")]
needs_aio = pytest.mark.ops("async_io")  # NVMe: DeepSpeed's async I/O op (libaio)

PROMPTS = ["The capital of France is", "Hello",
           "Mixture-of-experts models route each token to a few experts, and",
           "1 2 3 4 5 6", "def fibonacci(n):"]
NEW_TOKENS = 16

# One process, a one-rank gloo group: every unit's forward with offload against the same
# model part resident (logits of a whole causal forward, three steps: the first records
# DeepSpeed's trace, the next ones prefetch from it).
UNIT_CHECK = textwrap.dedent("""
    import dataclasses, json, sys
    import torch, torch.distributed as dist
    from ds3dist.model.load import load_model
    from ds3dist.runtime.offload import Offloaded
    from ds3dist.runtime.options import OffloadOptions
    ckpt, execution, params, device, nvme, store, dtype, compute = sys.argv[1:9]
    dtype = getattr(torch, dtype)
    if compute == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if compute == "cuda" else "gloo",
                            init_method="file://" + store, rank=0, world_size=1)
    group = dist.new_group([0])
    tokens = torch.randint(0, 5000, (3, 9), generator=torch.Generator().manual_seed(0))
    ref = load_model(ckpt, execution=execution, dtype=dtype, device=compute)(tokens)
    opt = OffloadOptions(device=device, nvme_path=nvme, params=params)
    model = load_model(ckpt, execution=execution, dtype=dtype, device=compute, host=opt.holds)
    off = Offloaded(model, opt, group, 0, torch.device(compute))
    equal = []
    for _ in range(3):
        off.begin_step()
        equal.append(torch.equal(model(tokens), ref))
    held = [n for n, b in model.named_buffers() if b.numel()]
    print(json.dumps({"equal": equal, "stats": dataclasses.asdict(off.stats()), "resident": held}))
""")


def _unit_check(ckpt, execution, params, device, nvme, dtype, compute="cpu") -> dict:
    # a file store (beside nvme): no port picked, released and raced for by other tests
    store = nvme.parent / "store"
    p = subprocess.run([sys.executable, "-c", UNIT_CHECK, str(ckpt), execution, params, device,
                        str(nvme), str(store), dtype, compute], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("execution,params,device,dtype", [
    ("bf16", "layers", "cpu", "float32"), ("fp8", "experts", "cpu", "float32"),
    pytest.param("fp8", "layers", "nvme", "float32", marks=needs_aio),
    pytest.param("bf16", "experts", "nvme", "float32", marks=needs_aio),
    # bf16: stacked experts and the CPU kernels (grouped experts, fused MoE decode)
    ("bf16", "layers", "cpu", "bfloat16"), ("bf16", "experts", "cpu", "bfloat16")])
def test_offloaded_units_compute_exactly_as_resident(tiny_fp8_dir, tmp_path, execution, params,
                                                     device, dtype):
    out = _unit_check(tiny_fp8_dir, execution, params, device, tmp_path / "nvme", dtype)
    assert out["equal"] == [True, True, True]
    assert out["stats"]["offloaded_bytes"] > 0
    # what stays resident: nothing of an offloaded unit
    unit = "layers." if params == "layers" else ".mlp.experts."
    assert not [n for n in out["resident"] if unit in n or n.startswith(unit)]
    if device == "nvme":  # swap files under nvme_path (DeepSpeed may keep some in its buffers)
        assert 0 < len(list((tmp_path / "nvme").rglob("*.swp"))) <= out["stats"]["units"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("execution,params,device", [
    ("fp8", "experts", "cpu"), ("bf16", "layers", "cpu"),
    pytest.param("fp8", "layers", "nvme", marks=needs_aio)])
def test_offloaded_units_on_a_gpu_compute_exactly_as_resident(tiny_fp8_dir, tmp_path,
                                                              execution, params, device):
    """The GPU path: units loaded into host memory (or NVMe), fetched onto the GPU."""
    out = _unit_check(tiny_fp8_dir, execution, params, device, tmp_path / "nvme", "bfloat16",
                      compute="cuda")
    assert out["equal"] == [True, True, True]
    assert out["stats"]["offloaded_bytes"] > 0


@pytest.fixture(scope="module")
def resident_tokens(ray_cluster, tiny_fp8_dir):
    """Greedy tokens of the pp1ep2 engine without offload."""
    return _engine_tokens(tiny_fp8_dir, None)[0]


def _engine_tokens(ckpt, offload, layout=ParallelLayout(pp=1, ep=2), speculative=None):
    from ds3dist import Engine

    with Engine(ckpt, layout, execution="bf16", dtype=torch.float32, offload=offload,
                speculative=speculative) as engine:
        got = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0)
        return [g.token_ids for g in got], engine.load_info


def _planned_offload(ckpt, opt) -> list[int]:
    from ds3dist.config import ModelConfig

    h = Holding(execution="bf16", dtype=torch.float32, offload=opt)
    return [r["offloaded_bytes"] for r in rank_table(ModelConfig.from_json(ckpt),
                                                     ParallelLayout(pp=1, ep=2), h)]


def test_engine_with_offload_matches_without(ray_cluster, tiny_fp8_dir, resident_tokens):
    opt = OffloadOptions(device="cpu", params="layers")
    tokens, load_info = _engine_tokens(tiny_fp8_dir, opt)
    assert tokens == resident_tokens
    assert any(len(set(t)) > 3 for t in tokens)  # not a constant stream
    # each rank offloaded what the dry run plans (tensors aligned to 64 bytes in the buffer)
    got = [i.offload.offloaded_bytes for i in load_info]
    for g, planned in zip(got, _planned_offload(tiny_fp8_dir, opt)):
        assert planned <= g <= planned + 64 * 40


@needs_aio
def test_engine_with_nvme_expert_offload_matches_without(ray_cluster, tiny_fp8_dir, tmp_path,
                                                         resident_tokens):
    opt = OffloadOptions(device="nvme", nvme_path=str(tmp_path / "nvme"), params="experts")
    tokens, load_info = _engine_tokens(tiny_fp8_dir, opt)
    assert tokens == resident_tokens
    got = [i.offload.offloaded_bytes for i in load_info]
    for g, planned in zip(got, _planned_offload(tiny_fp8_dir, opt)):
        assert planned <= g <= planned + 64 * 40
    assert not list((tmp_path / "nvme").iterdir())  # the engine removed its swap folders


def test_pipeline_speculating_with_expert_offload_matches_without(ray_cluster, tiny_fp8_dir):
    """pp2: the stages hold different units (stage 0 none: its one layer is dense; the last
    stage its MoE layers and the MTP layer's experts, run k times a step)."""
    from ds3dist.core.options import SpeculativeConfig

    spec = SpeculativeConfig("mtp", 2, "exact")
    lay = ParallelLayout(pp=2, ep=1)
    want = _engine_tokens(tiny_fp8_dir, None, lay, spec)[0]
    got, load_info = _engine_tokens(tiny_fp8_dir, OffloadOptions(params="experts"), lay, spec)
    assert got == want
    assert [i.offload.units for i in load_info] == [0, 3]


def test_memory_plan_of_expert_offload_on_ep8():
    """deepseek_v3, ep8, FP8, routed experts offloaded: hand-computed bytes."""
    model = preset("deepseek_v3")
    opt = OffloadOptions(params="experts", prefetch_layers=1)
    rows = rank_table(model, ParallelLayout(ep=8, device="cuda"),
                      Holding(execution="fp8", offload=opt, cache_bytes=20e9))
    expert = 3 * 2048 * 7168 + 3 * (16 * 56) * 4  # FP8 weights + float32 128x128 block scales
    moe_layers = 61 - 3
    for r in rows:
        assert r["offloaded_bytes"] == 32 * moe_layers * expert
        assert r["streamed_bytes_per_step"] == r["offloaded_bytes"]
        assert r["window_bytes"] == 2 * 32 * expert  # the layer computing + one prefetched
        assert r["resident_bytes"] == r["weight_bytes"] - r["offloaded_bytes"]
        assert r["device_bytes"] == r["resident_bytes"] + r["window_bytes"] + 20e9
        assert r["device_bytes"] < 80e9  # fits an 80 GB GPU with a 20 GB cache
    resident = rank_table(model, ParallelLayout(ep=8, device="cuda"), Holding(execution="fp8"))
    assert [r["weight_bytes"] for r in resident] == [r["weight_bytes"] for r in rows]
    assert all(r["device_bytes"] > 80e9 for r in resident)  # without offload it does not


def test_memory_plan_counts_the_mtp_layer_only_when_speculating():
    model = preset("deepseek_v3")
    lay = ParallelLayout(pp=2, ep=8, device="cuda")
    off, on = (rank_table(model, lay, Holding(execution="fp8", mtp_passes=k)) for k in (0, 2))
    mtp = {s.name: s for s in expected_tensors(model).values()
           if s.name.startswith("model.layers.61.")}
    # the last stage's rank 8: the MTP layer's shared parts, its own experts, its embedding
    # copy (the last stage lacks the main one), not its head copy (the main head serves)
    experts = set(lay.plan(model)[8].experts)
    extra = sum(s.nbytes for s in mtp.values()
                if not s.name.endswith("shared_head.head.weight")
                and (expert_of(s.name) is None or expert_of(s.name) in experts))
    assert on[8]["weight_bytes"] - off[8]["weight_bytes"] == extra
    assert [r["weight_bytes"] for r in on[:8]] == [r["weight_bytes"] for r in off[:8]]
    # layers offload leaves the MTP layer resident; experts offload streams its experts k times
    opt = OffloadOptions(params="experts")
    rows = rank_table(model, lay, Holding(execution="fp8", mtp_passes=2, offload=opt))
    mtp_experts = sum(s.nbytes for s in mtp.values() if expert_of(s.name) in experts)
    assert rows[8]["streamed_bytes_per_step"] == rows[8]["offloaded_bytes"] + mtp_experts


def _cfg(*overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="ds3dist.conf", version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_offload_settings_are_checked():
    with pytest.raises(schema.LaunchConfigError) as e:
        schema.validate(_cfg("execution.offload.backend=deepspeed",
                             "execution.offload.device=nvme", "execution.offload.params=all"))
    assert "execution.offload.nvme_path" in str(e.value)
    assert "execution.offload.params" in str(e.value)
    with pytest.raises(schema.LaunchConfigError, match="execution.offload.backend"):
        schema.validate(_cfg("execution.offload.backend=zero"))
    with pytest.raises(schema.LaunchConfigError, match="runtime.control=local"):
        schema.validate(_cfg("execution.offload.backend=deepspeed", "runtime.control=local"))
    cfg = _cfg("execution.offload.backend=deepspeed", "execution.offload.params=experts")
    assert schema.validate(cfg).offload == OffloadOptions(params="experts")
    assert schema.validate(_cfg()).offload is None


def test_missing_deepspeed_fails_at_once_with_the_install_hint(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    with pytest.raises(schema.LaunchConfigError) as e:
        schema.validate(_cfg("execution.offload.backend=deepspeed"))
    assert "execution.offload.backend: DeepSpeed is not installed" in str(e.value)
    assert "pip install 'ds3dist[deepspeed]'" in str(e.value)


def test_launch_without_deepspeed_stops_before_starting_anything(tmp_path):
    """The launch with the backend chosen and deepspeed not importable: exit 2, the key and
    the install hint, no cluster started and no output written."""
    import os

    import ds3dist

    code = ("import sys; sys.modules['deepspeed'] = None; sys.argv[0] = 'ds3dist.launch'; "
            "from ds3dist.launch import main; main()")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ADDRESS="127.0.0.1:1",
               PYTHONPATH=str(Path(ds3dist.__file__).resolve().parents[1]))
    p = subprocess.run([sys.executable, "-c", code, "execution.offload.backend=deepspeed",
                        f"job.output={tmp_path / 'out.jsonl'}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "execution.offload.backend: DeepSpeed is not installed" in p.stderr
    assert "pip install 'ds3dist[deepspeed]'" in p.stderr
    assert not (tmp_path / "out.jsonl").exists()
