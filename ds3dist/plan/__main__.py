"""python -m ds3dist.plan: size a layout (or search them all) for a cluster before booking it.

    python -m ds3dist.plan model=deepseek_v3 +parallel=pp2ep8 execution=fp8 cluster.nodes=2
    python -m ds3dist.plan model=deepseek_v3 execution=fp8 cluster.gpu=h100 \
        cluster.gpus_per_node=8 cluster.nodes=2 --search [--json]
    python -m ds3dist.plan model=small cluster.gpu=cpu cluster.gpus_per_node=2 --search

Arguments are the launch's Hydra overrides: the same config is composed and validated, and
its `cluster.*` and `workload.*` keys (ignored by the launch) say what to plan for:
  cluster.gpu            h100 (default) | h200 | h800 | a100 | b200 | mi300x | cpu (this
                         machine, measured once: one rank's share with gpus_per_node ranks)
  cluster.gpus_per_node  devices (CPU: ranks) per node (8)
  cluster.nodes          nodes (1)
  +cluster.figures.F=V   override a figure of the accelerator: memory_gb, hbm_tbps,
                         bf16_tflops, fp8_tflops, intra_gbps, inter_gbps, host_gbps
  workload.prompt_tokens, workload.output_tokens   mean lengths (default: from the input,
                         else 1000 and sampling.max_new_tokens)
  workload.input         JSONL requests to read the lengths from (default: job.input)
Without --search: the composed layout (parallel.*) in full. A bad value stops with one line
naming the key, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ds3dist.plan", description=__doc__.split("\n\n")[0],
                epilog=__doc__.split("\n\n", 2)[2],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="the launch's Hydra overrides (key=value), "
                   "cluster.* and workload.* included")
    p.add_argument("--search", action="store_true", help="rank every layout that fits")
    p.add_argument("--json", action="store_true", help="JSON instead of the table")
    return p


def _compose(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ds3dist.jobs import schema
    from ds3dist.plan.cluster import PlanError

    schema.register()
    try:
        with initialize_config_module(config_module="ds3dist.conf", version_base=None):
            return compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
        key = getattr(cause, "full_key", None)
        if key and getattr(cause, "msg", None):  # the key first, as every other refusal
            msg = " ".join(str(cause.msg).split()).split(" full_key:")[0]
            if "not in struct" in msg:
                msg += f" (a new key takes a plus: +{key}=...)"
            raise PlanError(f"{key}: {msg}") from None
        raise PlanError(" ".join(f"config: {e} {e.__cause__ or ''}".split())) from None


def main(argv: list[str] | None = None) -> int:
    try:
        a = _parser().parse_intermixed_args(argv)
    except SystemExit as e:  # a bad flag (2), or --help (0)
        return int(e.code or 0)
    from ds3dist.jobs import schema
    from ds3dist.plan import report
    from ds3dist.plan.cluster import ClusterSpec, PlanError, WorkloadSpec
    from ds3dist.plan.search import plan_setup

    try:
        cfg = _compose(a.overrides)
        cluster = ClusterSpec.of(cfg.cluster).cluster()
        try:
            r = schema.validate(cfg)
        except schema.LaunchConfigError as e:
            raise PlanError("; ".join(str(e).splitlines())) from None
        workload = WorkloadSpec.of(cfg.workload).workload(r.sampling.max_new_tokens,
                                                          r.job.input)
        found = _run(a, r, plan_setup(r, cluster, workload))
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(report.to_json(found, cluster, workload), indent=1))
    elif a.search:
        print(report.table(found, cluster, workload))
    else:
        print(report.one_layout(found[0], cluster, workload))
    return 0


def _run(a: argparse.Namespace, r: Any, setup: Any) -> list:
    from ds3dist.plan.estimate import estimate
    from ds3dist.plan.search import given_candidate, search

    own = [o for o in a.overrides if o.lstrip("+").startswith("parallel")]
    given = given_candidate(r, setup, own)
    return search(setup, [given]) if a.search else [estimate(setup, given)]


if __name__ == "__main__":
    raise SystemExit(main())
