"""AllToAllDispatcher vs an all-reduce reference, on 2 and 4 gloo ranks (no Ray).

Reference (the DeepSeek reference code's scheme): every rank sees all tokens, computes the
weighted outputs of its own experts for them, and an all-reduce sums the contributions.
"""

import faulthandler
import os
import tempfile
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ds3dist.checkpoint.fp8 import act_dequant, act_quant
from ds3dist.parallel.dispatcher import AllToAllDispatcher
from ds3dist.parallel.placement import Placement

D = 256  # two 128-channel groups for the fp8 payload
E = 8
K = 2
JOIN_S = 120  # a rank still running after this is killed and reported as hung


def _expert_weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(E, D, D, generator=g) / D**0.5


def _run_experts(x_sd, counts_e, w_s, local_experts, w_edd):
    y = torch.empty_like(x_sd)
    start = 0
    for e, c in zip(local_experts, counts_e):
        y[start:start + c] = (x_sd[start:start + c] @ w_edd[e]) * w_s[start:start + c, None]
        start += c
    return y


def _case_inputs(case: str, rank: int, world: int):
    """Tokens, routing and weights of one rank for a named case (same on every call)."""
    g = torch.Generator().manual_seed(100 + rank)
    t = {"uneven": 5 + 3 * rank, "empty_rank": 0 if rank == 1 else 6,
         "one_rank": 7, "idle_experts": 9, "fp8": 6, "map": 5 + rank, "replicas": 8 + rank}[case]
    x = torch.randn(t, D, generator=g)
    if case == "one_rank":  # every token goes to experts owned by rank 0
        idx = torch.stack([torch.zeros(t, dtype=torch.long), torch.ones(t, dtype=torch.long)], 1)
    elif case == "replicas":  # mostly the hot experts 0 and 1
        idx = torch.stack([torch.tensor([0, 1])[torch.randperm(2, generator=g)] if i % 3
                           else torch.randperm(E, generator=g)[:K] for i in range(t)])
    elif case == "idle_experts":  # experts 2, 3, 6 never receive anything
        pool = torch.tensor([0, 1, 4, 5, 7])
        idx = torch.stack([pool[torch.randperm(5, generator=g)[:K]] for _ in range(t)]) if t else torch.empty(0, K, dtype=torch.long)
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]) if t else torch.empty(0, K, dtype=torch.long)
    w = torch.rand(t, K, generator=g)
    return x, idx, w


def _reference(x, idx, w, rank, world, owner, fp8):
    """All-gather every token, compute own experts' weighted outputs, all-reduce."""
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]]))
    sizes = [int(s) for s in sizes]
    n_max = max(sizes)

    def gather(t):  # gloo all_gather needs equal sizes: pad to the largest, then trim
        pad = torch.cat([t, t.new_zeros((n_max - t.shape[0], *t.shape[1:]))])
        out = [torch.empty_like(pad) for _ in sizes]
        dist.all_gather(out, pad)
        return torch.cat([o[:n] for o, n in zip(out, sizes)])
    xa, ia, wa = gather(x), gather(idx), gather(w)
    if fp8:
        q, s = act_quant(xa)
        xa = act_dequant(q, s)
    w_edd = _expert_weights()
    y = torch.zeros(xa.shape[0], K, D)
    for e in range(E):
        if owner[e] != rank:
            continue
        hit = ia == e  # [T, K]
        tok, kk = hit.nonzero(as_tuple=True)
        y[tok, kk] = (xa[tok] @ w_edd[e]) * wa[tok, kk, None]
    out = y.sum(1)
    dist.all_reduce(out)
    start = sum(sizes[:rank])
    return out[start:start + x.shape[0]]


def _worker(rank, world, store, case, errors):
    # a hung rank prints where it waits (to the test's captured stderr) before it is killed
    faulthandler.dump_traceback_later(JOIN_S - 10, exit=False)
    try:
        torch.set_num_threads(1)
        # a file store: no port picked, released and raced for by other tests' processes
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=JOIN_S - 20))
        owner = [e * world // E for e in range(E)]
        if case == "map":  # explicit, non-contiguous expert -> rank map
            owner = [(e * 3) % world for e in range(E)]
        held = [[e for e in range(E) if owner[e] == r] for r in range(world)]
        if case == "replicas":  # hot experts 0 and 1 on every rank, 5 on ranks 0 and 1
            held = [sorted({*h, 0, 1} | ({5} if r < 2 else set())) for r, h in enumerate(held)]
        place = Placement(E, world, {0: tuple(tuple(h) for h in held)})
        disp = AllToAllDispatcher(dist.group.WORLD, place.dest_table(0), held[rank],
                                  fp8_payload=(case == "fp8"))
        x, idx, w = _case_inputs(case, rank, world)
        d = disp.dispatch(x, idx, w)
        assert len(d.counts_e) == len(disp.local_experts)
        assert sum(d.counts_e) == d.x_sd.shape[0] == d.w_s.shape[0]
        y = _run_experts(d.x_sd, d.counts_e, d.w_s, disp.local_experts, _expert_weights())
        got = disp.combine(y, d)
        want = _reference(x, idx, w, rank, world, owner, case == "fp8")
        assert got.shape == x.shape, (got.shape, x.shape)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # statistics: received counts equal what everyone routed to my experts
        all_idx = [torch.zeros(E, dtype=torch.long) for _ in range(world)]
        dist.all_gather(all_idx, torch.bincount(idx.reshape(-1), minlength=E))
        total = torch.stack(all_idx).sum(0)
        got_e = disp.received_e.clone()
        dist.all_reduce(got_e)  # every copy received once, by one of its expert's holders
        assert torch.equal(got_e, total), (got_e, total)
        if case == "replicas":  # experts 0 and 1 on every rank: each gets an even share,
            for e in (0, 1):  # within one copy per sender
                assert abs(float(disp.received_e[e]) - float(total[e]) / world) <= world
        if case == "idle_experts":
            assert all(disp.received_e[e] == 0 for e in (2, 3, 6))
        dist.destroy_process_group()
    except Exception:
        errors.put(f"rank {rank}: {traceback.format_exc()}")


def _spawn(world, case):
    ctx = mp.get_context("fork")
    errors = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world, store, case, errors))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=JOIN_S)
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert not alive, f"ranks hung: {[procs.index(p) for p in alive]}; errors: {msgs}"
    assert not msgs, "\n".join(msgs)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", ["uneven", "empty_rank", "one_rank", "idle_experts", "fp8", "map",
                                  "replicas"])
def test_all_to_all_matches_all_reduce_reference(world, case):
    _spawn(world, case)


def test_reference_would_catch_a_wrong_combine():
    """The comparison is not vacuous: experts that drop the routing weights fail it."""
    orig = _run_experts

    def unweighted(x_sd, counts_e, w_s, local_experts, w_edd):
        return orig(x_sd, counts_e, torch.ones_like(w_s), local_experts, w_edd)

    globals()["_run_experts"] = unweighted  # forked ranks inherit this
    try:
        with pytest.raises(AssertionError):
            _spawn(2, "uneven")
    finally:
        globals()["_run_experts"] = orig
