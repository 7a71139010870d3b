"""ParallelLayout: rank plans and the errors for impossible layouts."""

import pytest

from ds3dist.config import preset
from ds3dist.parallel.layout import LayoutError, ParallelLayout


def test_stage_major_plan_on_the_release():
    cfg = preset("deepseek_v3")
    plans = ParallelLayout(pp=4, ep=16, device="cuda").plan(cfg)
    assert len(plans) == 64
    # rank = stage * ep + ep_rank; stages split the 61 layers as 15/15/15/16
    assert [p.layers[0] for p in plans[::16]] == [0, 15, 30, 45]
    assert plans[63].layers[-1] == 60 and plans[63].mtp and plans[63].head
    assert plans[0].embed and not plans[0].head and not plans[16].embed
    assert plans[17].stage == 1 and plans[17].ep_rank == 1
    assert plans[17].experts == tuple(range(16, 32))
    # every expert owned exactly once per stage
    for s in range(4):
        owned = sorted(e for p in plans[s * 16:(s + 1) * 16] for e in p.experts)
        assert owned == list(range(256))


def test_explicit_boundaries_and_expert_map():
    cfg = preset("tiny")
    emap = [e % 3 for e in range(cfg.n_routed_experts)]
    plans = ParallelLayout(pp=2, ep=3, stage_boundaries=[0, 2, 3], expert_map=emap).plan(cfg)
    assert plans[0].layers == (0, 1) and plans[3].layers == (2,)
    assert plans[4].experts == tuple(e for e in range(16) if e % 3 == 1)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(ep=3), "parallel.ep"),
    (dict(pp=62), "parallel.pp"),
    (dict(pp=2, stage_boundaries=[0, 70, 61]), "parallel.stage_boundaries"),
    (dict(pp=2, stage_boundaries=[0, 61]), "parallel.stage_boundaries"),
    (dict(ep=2, expert_map=[0] * 10), "parallel.expert_map"),
    (dict(ep=2, expert_map=[5] * 256), "parallel.expert_map"),
])
def test_impossible_layouts_name_the_setting(kwargs, needle):
    with pytest.raises(LayoutError, match=needle):
        ParallelLayout(**kwargs).plan(preset("deepseek_v3"))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(pp=0), "parallel.pp"),
    (dict(ep=-1), "parallel.ep"),
    (dict(device="tpu"), "parallel.device"),
    (dict(backend="nccl"), "parallel.backend"),
])
def test_bad_values_rejected_at_construction(kwargs, needle):
    with pytest.raises(LayoutError, match=needle):
        ParallelLayout(**kwargs)


def test_too_few_cluster_resources_reports_what_ray_has():
    layout = ParallelLayout(pp=2, ep=16, device="cuda")
    with pytest.raises(LayoutError) as e:
        layout.check_resources({"CPU": 64.0, "GPU": 8.0})
    assert "needs 32 ranks" in str(e.value) and "'GPU': 8.0" in str(e.value)
    ParallelLayout(pp=2, ep=2).check_resources({"CPU": 4.0})
