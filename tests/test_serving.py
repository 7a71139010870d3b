"""The serving core end to end on `tiny` (float32): a mixed workload gives every request
exactly the tokens it gets alone, in one process and on pp2ep2 and pp1ep4; a 40,000-token
prompt completes beside short requests that finish first, within bounded memory; a request
too big for the cache is rejected alone; a request failing inside the engine fails alone."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ds3dist
from ds3dist.config import ModelConfig
from ds3dist.local import LocalEngine
from ds3dist.parallel.layout import ParallelLayout
from ds3dist.core.options import ServingOptions
from ds3dist.core.params import SamplingParams
from ds3dist.core.request import Request, RequestStatus
from ds3dist.text import make_request

PAGE = 16
VOCAB_IDS = (10, 100_000)  # token ids drawn from the release tokenizer's range


@pytest.fixture(scope="module")
def model(tiny_fp8_dir):
    return ds3dist.load_model(tiny_fp8_dir, dtype=torch.float32, mtp=False)


def _spec(i: int, rng: random.Random) -> dict:
    n = 1 if i == 0 else 3000 if i == 1 else int(math.exp(rng.uniform(0, math.log(3000))))
    kind = ("greedy", "sampled", "stop")[i % 3]
    params = SamplingParams(0.8, 0.9, 50, seed=rng.randrange(1000)) if kind == "sampled" \
        else SamplingParams()
    return {"id": f"r{i}", "prompt": [rng.randrange(*VOCAB_IDS) for _ in range(n)],
            "params": params, "max_new": rng.randint(1, 64), "kind": kind, "stop": None}


def _request(spec: dict, tok) -> Request:
    return make_request(tok, spec["id"], spec["prompt"], spec["params"], spec["max_new"],
                        spec["stop"])


@pytest.fixture(scope="module")
def workload(model, tok):
    """44 requests and what each gets run alone (a stop string cut from its own output)."""
    rng = random.Random(7)
    specs = [_spec(i, rng) for i in range(44)]
    alone = {}
    for s in specs:
        (r,) = LocalEngine(model, tok, ServingOptions(page_size=PAGE), cache_pages=200).stream([_request(s, tok)])
        if s["kind"] == "stop" and len(r.output_ids) >= 6:  # stop on a piece of its own text
            s["stop"] = [tok.decode(r.output_ids[3:5]) or "x"]
            (r,) = LocalEngine(model, tok, ServingOptions(page_size=PAGE), cache_pages=200).stream(
                [_request(s, tok)])
        alone[s["id"]] = (r.output_ids, r.finish_reason)
    assert sum(a[1] == "stop" for a in alone.values()) >= 3
    assert max(len(s["prompt"]) for s in specs) == 3000
    return specs, alone


def _check(ended: list[Request], specs: list[dict], alone: dict) -> None:
    got = {r.id: (r.output_ids, r.finish_reason) for r in ended}
    assert len(ended) == len(specs) and all(r.status is RequestStatus.FINISHED for r in ended)
    bad = [k for k in alone if got[k] != alone[k]]
    assert not bad, f"{len(bad)} requests differ from their run alone: {bad[:5]}"


def test_mixed_workload_in_one_process(model, tok, workload):
    specs, alone = workload
    eng = LocalEngine(model, tok, ServingOptions(page_size=PAGE, max_tokens_per_step=256,
                                                 max_seqs=12), cache_pages=260)
    ended = list(eng.stream(_request(s, tok) for s in specs))
    _check(ended, specs, alone)
    st = eng.scheduler.stats
    print(f"one process: {st.steps} steps, {st.preemptions} preemptions")
    assert st.preemptions > 0  # the pool is tight on purpose: recompute is exercised too


@pytest.mark.slow
# compiled at two ranks: on CPUs its actors spin a core each (test_engine runs it at four)
@pytest.mark.parametrize("pp,ep,control", [(1, 2, "compiled"), (1, 4, "classic")])
def test_mixed_workload_on_ranks(ray_cluster, tiny_fp8_dir, tok, workload, pp, ep, control):
    from ds3dist import Engine

    specs, alone = workload
    cfg = ModelConfig.from_json(tiny_fp8_dir)
    layers = max(len(p.layers) for p in ParallelLayout(pp=pp, ep=ep).plan(cfg))
    gb = 260 * layers * PAGE * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 / 1e9
    serving = ServingOptions(cache_gb=gb, page_size=PAGE, max_tokens_per_step=256, max_seqs=12,
                             control=control)
    with Engine(tiny_fp8_dir, ParallelLayout(pp=pp, ep=ep), dtype=torch.float32,
                serving=serving) as engine:
        assert engine.sched_cfg.pages_per_column == 260
        ended = list(engine.stream(_request(s, tok) for s in specs))
        stats = engine.stats()
    _check(ended, specs, alone)
    print(f"pp{pp}ep{ep}: {stats.scheduler}")


LONG_SCRIPT = r"""
import json, random, sys, torch, ds3dist
from ds3dist.local import LocalEngine
from ds3dist.core.params import SamplingParams
from ds3dist.core.request import Request
torch.set_num_threads(int(sys.argv[2]))
model = ds3dist.load_model(sys.argv[1], dtype=torch.float32, mtp=False)
rng = random.Random(1)
ids = lambda n: [rng.randrange(10, 100000) for _ in range(n)]
reqs = [Request("long", ids(40000), SamplingParams(), 4)]
reqs += [Request(f"short{i}", ids(20 + i), SamplingParams(), 6) for i in range(3)]
reqs += [Request("huge", ids(60000), SamplingParams(), 4)]
from ds3dist.core.options import ServingOptions
eng = LocalEngine(model, None, ServingOptions(page_size=16), cache_pages=2600)
order = [(r.id, r.status.value, r.error, r.output_ids) for r in eng.stream(reqs)]
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"order": order, "peak": peak}))
"""


def _check_long(order: list, peak: int) -> list:
    ids = [o[0] for o in order]
    status = {o[0]: (o[1], o[2]) for o in order}
    assert ids[0] == "huge" and status["huge"][0] == "rejected"
    assert "can never fit the cache pool" in status["huge"][1]
    assert ids.index("long") == len(ids) - 1, ids  # the short ones finish first
    assert all(status[k][0] == "finished" for k in ids if k != "huge")
    assert peak < 3e9, f"peak resident memory {peak / 1e9:.2f} GB"
    return {o[0]: o[3] for o in order}


@pytest.mark.slow
def test_40k_token_prompt_beside_short_requests(tiny_fp8_dir, ray_cluster):
    """One process (a subprocess, so its peak memory is its own), then pp2ep2: the long
    prompt completes, the short requests finish before it, a prompt bigger than the cache
    pool is rejected with its reason, and every process stays under 3 GB."""
    threads = torch.get_num_threads()  # the test process's share of the cores
    p = subprocess.run([sys.executable, "-c", LONG_SCRIPT, str(tiny_fp8_dir), str(threads)],
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    one = json.loads(p.stdout.strip().splitlines()[-1])
    want = _check_long(one["order"], one["peak"])
    print(f"one process: peak {one['peak'] / 1e9:.2f} GB")

    from ds3dist import Engine

    cfg = ModelConfig.from_json(tiny_fp8_dir)
    layers = max(len(p.layers) for p in ParallelLayout(pp=2, ep=2).plan(cfg))
    gb = 2600 * layers * 16 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 / 1e9
    rng = random.Random(1)
    ids = lambda n: [rng.randrange(10, 100000) for _ in range(n)]  # noqa: E731
    reqs = [Request("long", ids(40000), SamplingParams(), 4)]
    reqs += [Request(f"short{i}", ids(20 + i), SamplingParams(), 6) for i in range(3)]
    reqs += [Request("huge", ids(60000), SamplingParams(), 4)]
    # the test process's threads per rank (the session's default is one): the long prompt's
    # column works alone, and its attention is most of the test's time
    with Engine(tiny_fp8_dir, ParallelLayout(pp=2, ep=2), dtype=torch.float32,
                serving=ServingOptions(cache_gb=gb, page_size=16, threads=threads)) as engine:
        order = [(r.id, r.status.value, r.error, r.output_ids) for r in engine.stream(reqs)]
        peak = max(st.peak_rss_bytes for st in engine.stats().ranks)
    got = _check_long(order, peak)
    assert got == want  # the same tokens as one process
    print(f"pp2ep2: peak {peak / 1e9:.2f} GB per rank")


def test_failing_request_fails_alone_in_a_job(ray_cluster, tiny_fp8_dir, tmp_path, tok):
    """A request made to fail inside the engine (test hook) goes to the errors file, every
    other line completes, and a rerun without the fault finishes the job."""
    from hydra import compose, initialize_config_module

    from ds3dist import Engine, launch

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Request number {i}"}) + "\n"
                           for i in range(8)))
    out = tmp_path / "out.jsonl"
    with initialize_config_module(config_module="ds3dist.conf", version_base=None):
        cfg = compose(config_name="config", overrides=[
            f"model.path={tiny_fp8_dir}", f"job.input={inp}", f"job.output={out}",
            "sampling.temperature=0", "sampling.max_new_tokens=5", "job.progress=false",
            "execution.dtype=float32"])

    def factory(faults):
        return lambda ckpt, resolved: Engine(ckpt, ParallelLayout(pp=1, ep=2),
                                             dtype=torch.float32, fault_ids=faults)

    s = launch.run(cfg, engine_factory=factory(('"q3"',))).as_dict()
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == [f"q{i}" for i in range(8) if i != 3]
    (err,) = [json.loads(x) for x in Path(str(out) + ".errors.jsonl").read_text().splitlines()]
    assert (err["id"], err["line"], err["code"]) == ("q3", 4, "engine_error")
    assert "injected fault" in err["reason"] and s["counts"]["failed"] == 1
    load = json.loads(Path(str(out) + ".expert_load.json").read_text())  # ds3dist.balance's input
    assert load["format"] == "ds3dist.expert_load/1" and load["layout"]["ep"] == 2
    assert set(load["total"]) == set(load["window"]) == {str(i) for i in s["expert_load"]}
    assert all(sum(load["window"][i]) <= sum(load["total"][i]) for i in load["total"])
    s2 = launch.run(cfg, engine_factory=factory(())).as_dict()
    assert s2["counts"]["generated"] == 1 and s2["counts"]["already_done"] == 7
    assert len(out.read_text().splitlines()) == 8
