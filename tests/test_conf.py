"""The Hydra config tree: every file composes and resolves to a valid layout for its model.

Nothing is run: configs are composed with Hydra's compose API and planned with
ParallelLayout.plan against the model config. The launch CLI is run as a subprocess only for
`--cfg job`, `job.dry_run` and the error paths (which fail before anything starts).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import ds3dist
from ds3dist.checkpoint.layout import expected_tensors
from ds3dist.config import preset
from ds3dist.jobs import schema
from ds3dist.jobs.memory_plan import Holding, rank_table
from ds3dist.jobs.schema import LaunchConfigError

CONF = Path(ds3dist.__file__).parent / "conf"
REPO = Path(__file__).resolve().parents[1]
GROUPS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml"))
          for g in ("model", "parallel", "execution")}
LOCAL_LAYOUTS = {"single", "pp2", "ep2", "pp2ep2", "ep4"}
CLUSTER_LAYOUTS = {"ep8", "ep16", "ep32", "pp2ep8", "pp2ep16", "pp4ep16"}
# ranks = GPUs needed, layers per stage, routed experts per rank: on the full DeepSeek-V3
CLUSTER_EXPECT = {
    "ep8": (8, [61], 32),
    "ep16": (16, [61], 16),
    "ep32": (32, [61], 8),
    "pp2ep8": (16, [32, 29], 32),
    "pp2ep16": (32, [32, 29], 16),
    "pp4ep16": (64, [16, 16, 16, 13], 16),
}
H200_BYTES = 141e9


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_groups_are_complete():
    assert GROUPS["model"] == ["deepseek_v3", "small", "tiny"]
    assert set(GROUPS["parallel"]) == LOCAL_LAYOUTS | CLUSTER_LAYOUTS
    assert GROUPS["execution"] == ["bf16", "fp8"]


def test_default_config_is_tiny_single_process():
    cfg = compose_cfg()
    assert cfg.model.preset == "tiny" and cfg.model.path is None
    r = schema.validate(cfg)
    assert (r.layout.pp, r.layout.ep, r.layout.device, r.layout.backend) == (1, 1, "cpu", "gloo")
    assert r.execution == "bf16"
    assert cfg.job.input is None and cfg.job.output is None
    defaults = OmegaConf.load(CONF / "config.yaml").defaults
    assert not any("parallel" in str(d) for d in defaults)  # added with +parallel=<name>


@pytest.mark.parametrize("name", GROUPS["model"])
def test_every_model_file_resolves(name):
    cfg = compose_cfg(f"model={name}")
    assert cfg.model.preset == name and cfg.model.path is None
    r = schema.validate(cfg)
    assert r.model == preset(name)
    assert len(r.plans) == 1 and r.plans[0].layers == tuple(range(r.model.num_hidden_layers))


@pytest.mark.parametrize("name", GROUPS["execution"])
def test_every_execution_file_resolves(name):
    cfg = compose_cfg(f"execution={name}", "execution.dtype=float32")
    assert schema.validate(cfg).execution == name


def _check_plan(r, world, layers_per_stage, experts_per_rank):
    plans = r.plans
    assert r.layout.world_size == len(plans) == world
    stages = sorted({p.stage for p in plans})
    assert [len(next(p for p in plans if p.stage == s).layers) for s in stages] == \
        layers_per_stage
    # every layer in exactly one stage, every expert on exactly one rank per stage
    all_layers = [lay for s in stages for lay in next(p for p in plans if p.stage == s).layers]
    assert all_layers == list(range(r.model.num_hidden_layers))
    for s in stages:
        owned = sorted(e for p in plans if p.stage == s for e in p.experts)
        assert owned == list(range(r.model.n_routed_experts))
    assert {len(p.experts) for p in plans} == {experts_per_rank}
    assert [p.rank for p in plans] == list(range(world))
    assert all(p.embed == (p.stage == 0) and p.head == (p.stage == stages[-1]) for p in plans)


@pytest.mark.parametrize("name", sorted(CLUSTER_LAYOUTS))
def test_cluster_layouts_against_deepseek_v3(name):
    cfg = compose_cfg("model=deepseek_v3", f"+parallel={name}")
    r = schema.validate(cfg)
    assert r.model == preset("deepseek_v3")
    assert r.layout.device == "cuda" and r.layout.backend == "nccl"
    world, layers, experts = CLUSTER_EXPECT[name]
    _check_plan(r, world, layers, experts)
    # one GPU per rank: a cluster with one GPU too few is refused, naming the layout
    r.layout.check_resources({"GPU": float(world), "CPU": 4.0 * world})
    with pytest.raises(Exception, match="parallel"):
        r.layout.check_resources({"GPU": float(world - 1), "CPU": 4.0 * world})
    # the FP8 weights each rank holds fit a 141 GB GPU; staged layouts are balanced
    rows = rank_table(r.model, r.layout, Holding(execution="fp8"))
    per_rank = [row["weight_bytes"] for row in rows]
    assert max(per_rank) < H200_BYTES
    # every tensor of the main model is held somewhere (shared parts once per ep rank)
    main = sum(s.nbytes for s in expected_tensors(r.model, mtp=False).values())
    assert sum(per_rank) >= main
    assert all(row["offloaded_bytes"] == 0 and row["resident_bytes"] == row["weight_bytes"]
               for row in rows)
    if r.layout.pp > 1:  # balanced within ~2 layers' bytes, with the MTP layer loaded or not
        for mtp_passes in (0, 1):
            rows = rank_table(r.model, r.layout, Holding(execution="fp8", mtp_passes=mtp_passes))
            stage_bytes = {row["stage"]: row["weight_bytes"] for row in rows}
            two_layers = 2.2 * r.layout.pp / r.model.num_hidden_layers
            assert max(stage_bytes.values()) / min(stage_bytes.values()) < 1 + two_layers


@pytest.mark.parametrize("name", sorted(LOCAL_LAYOUTS))
@pytest.mark.parametrize("model", ["tiny", "small"])
def test_local_layouts_against_presets(name, model):
    cfg = compose_cfg(f"model={model}", f"+parallel={name}")
    r = schema.validate(cfg)
    assert r.layout.device == "cpu" and r.layout.backend == "gloo"
    pp, ep = r.layout.pp, r.layout.ep
    n = r.model.num_hidden_layers
    _check_plan(r, pp * ep, [len(range(s * n // pp, (s + 1) * n // pp)) for s in range(pp)],
                r.model.n_routed_experts // ep)


def test_compose_from_the_installed_module_and_the_top_level_conf():
    with initialize_config_module(config_module="ds3dist.conf", version_base=None):
        a = compose(config_name="config", overrides=["+parallel=pp2ep2"])
    top = REPO / "conf"
    assert top.resolve() == CONF.resolve()
    with initialize_config_dir(config_dir=str(top), version_base=None):
        b = compose(config_name="config", overrides=["+parallel=pp2ep2"])
    assert OmegaConf.to_container(a) == OmegaConf.to_container(b)
    assert (a.parallel.pp, a.parallel.ep) == (2, 2)


def test_overrides_of_single_fields_without_a_layout_file():
    cfg = compose_cfg("parallel.ep=4", "parallel.stage_boundaries=[0,1,3]", "parallel.pp=2")
    r = schema.validate(cfg)
    assert [len(p.experts) for p in r.plans] == [4] * 8
    assert r.plans[0].layers == (0,) and r.plans[-1].layers == (1, 2)


def test_wrong_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg("parallel.epp=2")
    assert "epp" in str(e.value) + str(e.value.__cause__)
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg("+parallel=pp2ep2", "sampling.temprature=0")
    assert "temprature" in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("override,key", [
    ("parallel.ep=3", "parallel.ep"),
    ("parallel.pp=100", "parallel.pp"),
    ("parallel.stage_boundaries=[0,10,61]", "parallel.stage_boundaries"),
    ("parallel.device=tpu", "parallel.device"),
    ("sampling.top_p=1.5", "sampling.top_p"),
    ("sampling.max_new_tokens=0", "sampling.max_new_tokens"),
    ("runtime.max_seqs=0", "runtime.max_seqs"),
    ("runtime.control=fast", "runtime.control"),
    ("execution.dtype=float8", "execution.dtype"),
    ("model.preset=huge", "model.preset"),
])
def test_bad_values_fail_naming_the_key(override, key):
    cfg = compose_cfg("model=deepseek_v3", override)
    with pytest.raises(LaunchConfigError) as e:
        schema.validate(cfg)
    assert str(e.value).startswith(key + ":"), str(e.value)


def test_model_path_config_json_is_used(tmp_path):
    small = preset("small")
    import json

    (tmp_path / "config.json").write_text(json.dumps(small.to_json_dict()))
    cfg = compose_cfg(f"model.path={tmp_path}", "model.preset=null", "parallel.ep=64")
    r = schema.validate(cfg)
    assert r.model == small and len(r.plans) == 64
    with pytest.raises(LaunchConfigError, match="^model.path: no config.json"):
        schema.validate(compose_cfg(f"model.path={tmp_path / 'nowhere'}", "model.preset=null"))


# ---- the launch CLI as a subprocess (nothing is started: --cfg, dry run, errors) ------------
def launch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HYDRA_FULL_ERROR="0")
    env.pop("RAY_ADDRESS", None)
    pkg_root = str(Path(ds3dist.__file__).resolve().parents[1])  # importable from any cwd
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [x for x in [env.get("PYTHONPATH")] if x])
    return subprocess.run([sys.executable, "-m", "ds3dist.launch", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_cfg_job_shows_resolved_config(tmp_path):
    p = launch("+parallel=ep16", "model=deepseek_v3", "--cfg", "job", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    cfg = OmegaConf.create(p.stdout)
    assert cfg.model.preset == "deepseek_v3"
    assert (cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.device) == (1, 16, "cuda")
    assert cfg.parallel.backend == "nccl" and cfg.execution.mode == "bf16"
    assert set(cfg.keys()) == {"model", "parallel", "execution", "sampling", "job", "runtime",
                               "cluster", "workload"}  # the last two: the planner's
    assert (cfg.cluster.gpu, cfg.cluster.nodes, cfg.workload.input) == ("h100", 1, None)


def test_cli_help_lists_groups(tmp_path):
    p = launch("--help", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "python -m ds3dist.launch" in p.stdout
    for group, options in GROUPS.items():
        assert f"{group}: {', '.join(sorted(options))}" in p.stdout


def test_cli_dry_run_prints_the_rank_plan(tmp_path):
    p = launch("+parallel=pp2ep8", "model=deepseek_v3", "execution=fp8", "job.dry_run=true",
               "cluster.nodes=2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    table, planned = p.stdout.strip().split("\n\n")
    lines = table.splitlines()
    assert "pp=2 ep=8 -> 16 ranks on cuda (nccl)" in lines[0]
    assert len(lines) == 2 + 16 + 1
    assert lines[2].split()[:5] == ["0", "0", "0", "0-31", "32"]
    assert lines[17].split()[:5] == ["15", "1", "7", "32-60", "32"]  # no MTP: not speculating
    assert lines[-1].startswith("most a rank needs on its device:")
    # then the planner's report of this one layout on the cluster.* keys' cluster
    planned = planned.splitlines()
    assert planned[0].startswith("cluster: 2 node(s) x 8 h100")
    assert "launch keys: parallel.pp=2 parallel.ep=8 parallel.device=cuda" in planned[2]
    assert planned[-1].startswith("verdict: fits;")
    p = launch("+parallel=pp2ep8", "model=deepseek_v3", "execution=fp8", "job.dry_run=true",
               "sampling.speculative.method=mtp", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[17].split()[:5] == ["15", "1", "7", "32-60+mtp", "32"]
    # the default cluster (one node of 8) is too small for 16 ranks: said, naming the keys
    assert "verdict: does not fit: devices: needs 16" in p.stdout
    assert "cluster.nodes=1 x cluster.gpus_per_node=8" in p.stdout


def test_cli_dry_run_of_a_cpu_layout_plans_on_this_machine(tmp_path):
    p = launch("+parallel=pp2ep2", "model=small", "job.dry_run=true", "cluster.gpu=v100",
               cwd=tmp_path)
    assert p.returncode == 0, p.stderr  # a CPU layout: the cpu entry, whatever cluster.gpu
    planned = p.stdout.strip().split("\n\n")[1].splitlines()
    assert planned[0].startswith("cluster: 1 node(s) x 4 cpu (this machine measured")
    assert planned[-1].startswith("verdict: fits;")
    p = launch("model=small", "job.dry_run=true", "workload.prompt_tokens=-1", cwd=tmp_path)
    assert p.returncode == 2 and "workload.prompt_tokens" in p.stderr, p.stderr


@pytest.mark.parametrize("args,needle", [
    (["parallel.epp=2"], "epp"),
    (["model=deepseek_v3", "parallel.ep=3"], "parallel.ep"),
    (["+parallel=ep2", "parallel.ep=3"], "parallel.ep"),
    (["parallel.ep=two"], "parallel.ep"),
    (["execution.mode=fp9"], "execution.mode"),
    (["model=deepseek_v3"], "model.path"),  # the release is never synthesized
    (["job.input=/nonexistent/in.jsonl"], "job.input"),
])
def test_cli_errors_name_the_setting(tmp_path, args, needle, monkeypatch):
    monkeypatch.setenv("DS3DIST_CACHE", str(tmp_path / "cache"))
    p = launch(*args, cwd=tmp_path)
    assert p.returncode != 0
    assert needle in p.stdout + p.stderr, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "cache").exists()  # failed before synthesizing anything


# ---- cluster scripts: valid bash (they are run end to end in test_launch_e2e.py) -----------
@pytest.mark.parametrize("script", ["slurm/run.sh", "launch/start_head.sh", "launch/node_ip.sh",
                                    "launch/start_worker.sh"])
def test_cluster_scripts_are_valid_bash(script):
    path = REPO / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    p = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    if script == "slurm/run.sh":
        text = path.read_text()
        for opt in ("--nodes", "--gpus-per-node", "--ntasks-per-node=1"):
            assert f"#SBATCH {opt}" in text
        assert 'python -m ds3dist.launch "$@"' in text and "ray stop" not in text


def test_threads_per_rank_have_one_rule(monkeypatch):
    """The launch and the Python API's Engine give a rank the same torch threads: a new local
    cluster's cores / ranks unless set (RuntimeOptions.rank_threads)."""
    from ds3dist.runtime.options import RuntimeOptions

    monkeypatch.delenv("DS3DIST_TORCH_THREADS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    rt = RuntimeOptions()
    assert rt.rank_threads(4) == rt.rank_cpus(4) == 2
    assert rt.rank_threads(1) == 8  # runtime.control=local: the whole machine
    assert rt.rank_threads(4, threads=3) == 3
    assert RuntimeOptions(cpus_per_rank=3).rank_threads(4) == 3
    assert RuntimeOptions(address="10.0.0.1:6379").rank_threads(4) == 1
    monkeypatch.setenv("DS3DIST_TORCH_THREADS", "5")
    assert rt.rank_threads(4) == 5


# ---- settings checked before the expensive part (exit 2 in seconds, naming the key) --------
def _one_line_input(tmp_path: Path) -> Path:
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "prompt": "hello"}\n')
    return inp


def test_an_nvme_folder_that_cannot_work_fails_before_any_build(tmp_path, tiny_fp8_dir):
    t0 = time.monotonic()
    p = launch("model=tiny", f"model.path={tiny_fp8_dir}", "+parallel=ep2",
               f"job.input={_one_line_input(tmp_path)}", f"job.output={tmp_path / 'o.jsonl'}",
               "execution.offload.backend=deepspeed", "execution.offload.device=nvme",
               "execution.offload.nvme_path=/proc/nope", cwd=tmp_path)
    took = time.monotonic() - t0
    assert p.returncode == 2, p.stdout + p.stderr
    assert "execution.offload.nvme_path: cannot make /proc/nope on" in p.stderr
    assert "building" not in p.stdout + p.stderr and "Ray" not in p.stdout
    assert took < 10, f"{took:.1f} s"


def test_settings_checked_before_the_cluster(tmp_path, tiny_fp8_dir):
    """runtime.cache_gb against this host's memory, replicas x ranks against the local
    cluster's CPUs, speculation against the checkpoint's MTP layer: exit 2, naming the key."""
    common = ["model=tiny", f"model.path={tiny_fp8_dir}", f"job.input={_one_line_input(tmp_path)}",
              f"job.output={tmp_path / 'o.jsonl'}"]
    p = launch(*common, "runtime.cache_gb=100000", cwd=tmp_path)
    assert p.returncode == 2 and "runtime.cache_gb: 100000 GB per rank x 1 ranks" in p.stderr
    p = launch(*common, "+parallel=ep2", "runtime.replicas=3", "runtime.cpus_per_rank=2",
               "runtime.num_cpus=4", cwd=tmp_path)
    assert p.returncode == 2 and "runtime.replicas x ranks: 6 ranks x 2 CPUs" in p.stderr, p.stderr
    from dataclasses import replace

    from ds3dist.checkpoint.synthesize import synthesize

    no_mtp = synthesize(tmp_path / "no-mtp", replace(preset("tiny"), num_nextn_predict_layers=0),
                        progress=False)
    p = launch(*common[:1], f"model.path={no_mtp}", *common[2:],
               "sampling.speculative.method=mtp", "sampling.speculative.num_tokens=1",
               cwd=tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "sampling.speculative: the model has no MTP layer" in p.stderr, p.stderr
