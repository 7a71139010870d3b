"""python -m ds3dist.plan: size a layout (or search them all) for a cluster before booking it.

    python -m ds3dist.plan model=deepseek_v3 +parallel=pp2ep8 execution=fp8 --gpu h100 --nodes 2
    python -m ds3dist.plan model=deepseek_v3 execution=fp8 --gpu h100 --gpus-per-node 8 \
        --nodes 2 --search [--prompt-tokens 1000 --output-tokens 300 | --input requests.jsonl]

Positional arguments are the launch's Hydra overrides (the same config is composed and
validated); the cluster and the workload are flags. `--set FIGURE=VALUE` overrides a figure of
the accelerator table (memory_gb, hbm_tbps, bf16_tflops, fp8_tflops, intra_gbps, inter_gbps,
host_gbps). A bad value stops with one line naming the setting, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn

from ds3dist.plan.accelerators import ACCELERATORS

# Workload defaults when neither lengths nor an input file are given: the prompt mean here,
# the output from the config's sampling.max_new_tokens.
DEFAULT_PROMPT_TOKENS = 1000
TOKENS_PER_CHAR = 0.3  # a JSONL input's prompts: characters -> tokens (English text, roughly)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ds3dist.plan", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="the launch's Hydra overrides (key=value)")
    p.add_argument("--gpu", default="h100", help=f"one of {sorted(ACCELERATORS)} (h100)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="devices per node (8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (1)")
    p.add_argument("--set", action="append", default=[], metavar="FIGURE=VALUE",
                   help="override a figure of the accelerator table (repeatable)")
    p.add_argument("--prompt-tokens", type=float, default=None, help="mean prompt length")
    p.add_argument("--output-tokens", type=float, default=None,
                   help="mean output length (default: sampling.max_new_tokens)")
    p.add_argument("--input", default=None, help="JSONL requests to read the lengths from "
                   "(default: job.input when set)")
    p.add_argument("--search", action="store_true", help="rank every layout that fits")
    p.add_argument("--json", action="store_true", help="JSON instead of the table")
    return p


def _figures(pairs: list[str]) -> dict[str, float]:
    from ds3dist.plan.cluster import PlanError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            out[key] = float(value) if sep else float("nan")
        except ValueError:
            raise PlanError(f"cluster.{key}: not a number: {value!r}") from None
        if not sep:
            raise PlanError(f"--set {pair}: want FIGURE=VALUE")
    return out


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
        raise PlanError(" ".join(f"config: {e} {e.__cause__ or ''}".split())) from None


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    from ds3dist.jobs import schema
    from ds3dist.plan.cluster import Cluster, PlanError

    try:
        cluster = Cluster.of(a.gpu, a.gpus_per_node, a.nodes, _figures(a.set))
        cfg = _compose(a.overrides)
        try:
            r = schema.validate(cfg)
        except schema.LaunchConfigError as e:
            raise PlanError("; ".join(str(e).splitlines())) from None
        workload = _workload(a, r)
        found = _run(a, r, cluster, workload)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ds3dist.plan import report

    if a.json:
        print(json.dumps(report.to_json(found, cluster, workload), indent=1))
    elif a.search:
        print(report.table(found, cluster, workload))
    else:
        print(f"cluster: {cluster.describe()}")
        print(report.detail(found[0]))
    return 0


def _workload(a: argparse.Namespace, r: Any) -> Any:
    from ds3dist.plan.cluster import PlanError, Workload

    path = a.input or r.job.input
    output = a.output_tokens if a.output_tokens is not None else r.sampling.max_new_tokens
    if path is not None and a.prompt_tokens is None:
        w = Workload.from_jsonl(path, TOKENS_PER_CHAR, r.sampling.max_new_tokens)
        if a.output_tokens is not None:
            w = Workload(w.prompt_tokens, a.output_tokens, w.source)
        return w
    if a.prompt_tokens is not None and a.prompt_tokens < 0:
        raise PlanError(f"workload.prompt_tokens: must be a number >= 0, got {a.prompt_tokens:g}")
    prompt = DEFAULT_PROMPT_TOKENS if a.prompt_tokens is None else a.prompt_tokens
    return Workload(prompt, output, "given" if a.prompt_tokens is not None else "default")


def _run(a: argparse.Namespace, r: Any, cluster: Any, workload: Any) -> list:
    import torch

    from ds3dist.core.options import num_drafts
    from ds3dist.jobs.memory_plan import Holding, WeightGroups
    from ds3dist.model.options import default_dtype
    from ds3dist.plan.estimate import Candidate, Setup, estimate
    from ds3dist.plan.search import launch_keys, on_cluster, search

    dtype = getattr(torch, r.dtype) if r.dtype else default_dtype(cluster.kind)
    holding = Holding(execution=r.execution, dtype=dtype, mtp_passes=num_drafts(r.speculative),
                      offload=r.offload)
    setup = Setup(r.model, holding, r.serving, cluster, workload,
                  WeightGroups.of(r.model, holding))
    layout = on_cluster(r.layout, setup)
    own = [o for o in a.overrides if o.lstrip("+").startswith("parallel")]
    keys = (own + (["parallel.device=" + layout.device] if layout is not r.layout else [])
            + [f"runtime.replicas={r.runtime.replicas}"]) if own else \
        launch_keys(layout, r.runtime.replicas, None)
    name = next((o.partition("=")[2] for o in own if o.startswith("+parallel=")), "given")
    given = Candidate(name, layout, r.runtime.replicas, keys)
    return search(setup, [given]) if a.search else [estimate(setup, given)]


if __name__ == "__main__":
    raise SystemExit(main())
