"""`python -m ds3dist.launch`: the Hydra entry point that runs a batch generation job.

    python -m ds3dist.launch                                   # tiny model, bundled sample prompts
    python -m ds3dist.launch model=tiny +parallel=pp2ep2 job.input=in.jsonl job.output=out.jsonl
    python -m ds3dist.launch model=deepseek_v3 model.path=/data/DeepSeek-V3 +parallel=pp2ep8 \
        execution=fp8 job.input=requests.jsonl job.output=results.jsonl
    python -m ds3dist.launch +parallel=ep16 model=deepseek_v3 --cfg job   # show the config
    python -m ds3dist.launch +parallel=pp4ep16 model=deepseek_v3 job.dry_run=true  # rank plan

Steps: validate the config (layout planned against the model: a bad value fails naming it);
preflight, before any Ray cluster starts: read the input (encoding named, binary refused, an
empty input ends here with a warning), lock the output and check the files beside it, reach
the Ray address within runtime.connect_timeout_s, synthesize the preset into the cache when
`model.path` is null and the cache lacks it, validate the checkpoint's headers (and with
model.verify its data); then start the Engine, run the batch job (ds3dist.jobs.batch), print
where the outputs are, shut the Engine down. A failure prints one line naming its cause; the
traceback goes to the run's log file, whose path is printed.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ds3dist import build_ops
from ds3dist.checkpoint.synthesize import synthesize
from ds3dist.config import ConfigError
from ds3dist.core.engine import ServingEngine
from ds3dist.core.options import num_drafts
from ds3dist.local import LocalEngine
from ds3dist.jobs import schema
from ds3dist.jobs.batch import default_paths, expert_load_path, run_batch_job
from ds3dist.jobs.report import JobSummary
from ds3dist.jobs.errors import JobError
from ds3dist.jobs.input_text import InputText, read_input
from ds3dist.jobs.memory_plan import Holding, describe
from ds3dist.jobs.output_file import OutputFile
from ds3dist.jobs.preflight import check_checkpoint, check_settings, check_side_files
from ds3dist.jobs.schema import LaunchConfigError
from ds3dist.jobs.stop import EXIT_INTERRUPTED, GracefulStop, Interrupted
from ds3dist.model.load import load_model
from ds3dist.model.options import default_dtype
from ds3dist.parallel.layout import LayoutError
from ds3dist.runtime import cluster
from ds3dist.runtime.cluster import ClusterError, check_address, ray_address
from ds3dist.runtime.engine import Engine, EngineError
from ds3dist.runtime.hostmem import retain_freed_memory
from ds3dist.runtime.options import OffloadError
from ds3dist.runtime.replicas import ReplicaSet
from ds3dist.tokenizer import TokenizerError, load_tokenizer


SAMPLE_PROMPTS = "sample_prompts.jsonl"
REAL_WEIGHTS_COMMAND = ("python -m ds3dist.launch model=deepseek_v3 model.path=/path/to/DeepSeek-V3 "
                        "+parallel=ep8 execution=fp8 job.input=prompts.jsonl")
EngineFactory = Callable[[Path, schema.Resolved], ServingEngine]


def bundled_sample() -> Path:
    """The sample prompts shipped with the package (ds3dist/data/sample_prompts.jsonl)."""
    return Path(str(files("ds3dist") / "data" / SAMPLE_PROMPTS))


def _run_dir() -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not under @hydra.main (compose API, tests)
        return Path("outputs") / time.strftime("%Y-%m-%d_%H-%M-%S")


def resolve_checkpoint(source: schema.ModelConf, progress: bool = True) -> Path:
    """`model.path`, or the preset synthesized into the cache dir (made on first use)."""
    if source.path is not None:
        p = Path(str(source.path)).expanduser()
        if not (p / "config.json").is_file():
            raise LaunchConfigError(f"model.path: no config.json in {p}")
        return p
    name = source.preset
    if name == "deepseek_v3":
        raise LaunchConfigError(
            "model.path: the deepseek_v3 model needs its checkpoint directory "
            "(model.path=/path/to/DeepSeek-V3); only tiny and small are synthesized"
        )
    seed = int(source.seed)
    target = schema.cached_checkpoint_dir(name, seed)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"synthesizing the {name} checkpoint (seed {seed}) into {target}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        synthesize(tmp, preset=name, seed=seed, progress=progress)
        try:
            os.rename(tmp, target)  # atomic: the cache dir is complete or absent
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent run's copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def compute_dtype(r: schema.Resolved) -> torch.dtype:
    """execution.dtype, else the device's default (model.options.default_dtype)."""
    return getattr(torch, r.dtype) if r.dtype else default_dtype(r.layout.device)


def make_engine(checkpoint: Path, r: schema.Resolved,
                stop: GracefulStop | None = None) -> ServingEngine:
    """runtime.replicas Engines (the first starts or joins the Ray cluster), each rebuilt up
    to runtime.max_restarts times when it fails; or with runtime.control=local the whole model
    in this process (no Ray). stop: once requested, a lost replica is not rebuilt."""
    rt, lay = r.runtime, r.layout
    ranks = lay.world_size * rt.replicas
    build_ops.for_ranks(lay.device, r.offload)  # compiled once per machine, here, with progress
    if r.serving.control == "local":
        return local_engine(checkpoint, r)
    cluster.connect(rt.address, rt.cluster_cpus(ranks), rt.connect_timeout_s)
    if stop is not None:
        stop.arm()  # ray.init replaced the SIGTERM handler; loading may take minutes

    def build(replica: int, attempt: int) -> Engine:
        # a rebuilt replica waits for replacement resources as long as it may take to start
        return Engine(checkpoint, lay, execution=r.execution, dtype=compute_dtype(r),
                      serving=r.serving, runtime=rt, speculative=r.speculative,
                      offload=r.offload, balance=r.balance, ranks_in_cluster=ranks,
                      resource_wait_s=rt.startup_timeout_s if attempt else 0.0)

    return ReplicaSet(build, rt.replicas, rt.max_restarts,
                      should_stop=stop if stop is not None else (lambda: False))


def local_engine(checkpoint: Path, r: schema.Resolved) -> LocalEngine:
    """The serving loop with the whole model in the launch's process (runtime.control=local):
    as many torch threads as one rank of a local cluster would get (RuntimeOptions.rank_threads:
    default every core), freed memory kept as a rank keeps it."""
    torch.set_num_threads(r.runtime.rank_threads(1, r.serving.threads))
    retain_freed_memory()
    model = load_model(checkpoint, execution=r.execution, dtype=compute_dtype(r),
                       device=r.layout.device, mtp=r.speculative is not None)
    return LocalEngine(model, load_tokenizer(checkpoint), r.serving, speculative=r.speculative,
                       balance=r.balance)


@dataclass
class _Prepared:
    """What the preflight checks produced: nothing of it needs a Ray cluster."""
    input: InputText
    output: OutputFile  # locked
    paths: tuple[Path, Path, Path, Path]  # output, errors, summary, plot
    checkpoint: Path


def preflight(r: schema.Resolved) -> _Prepared | None:
    """Every check that needs no cluster, cheapest first; None for an empty input."""
    job = r.job
    input_path = Path(job.input) if job.input is not None else bundled_sample()
    inp = read_input(input_path)
    if inp.nonblank == 0:
        print(f"warning: job.input: {input_path} holds no requests; nothing to do",
              file=sys.stderr, flush=True)
        return None
    output = Path(job.output) if job.output is not None else _run_dir() / "results.jsonl"
    paths = default_paths(output, job.errors, job.summary, job.plot)
    out = OutputFile.open(paths[0])
    try:
        check_side_files({"job.errors": paths[1], "job.summary": paths[2], "job.plot": paths[3]})
        if r.serving.control != "local":  # local: no Ray cluster
            address, source = ray_address(r.runtime.address)
            check_address(address, source, r.runtime.connect_timeout_s)
        checkpoint = resolve_checkpoint(r.source, progress=job.progress)
        check_checkpoint(checkpoint, verify=bool(r.source.verify), progress=job.progress)
        check_settings(r)
    except BaseException:
        out.close()
        raise
    return _Prepared(inp, out, paths, checkpoint)


def dry_run_plan(r: schema.Resolved, cfg: Any = None) -> str:
    """What the dry run prints: the rank plan (weight bytes per rank as the execution holds
    them), then the planner's report of this one layout (python -m ds3dist.plan without
    --search): on the cluster.* keys' accelerator, or on a CPU layout this machine measured
    (the `cpu` entry, the layout's ranks spread over cluster.nodes); the workload.* keys."""
    holding = Holding(execution=r.execution, dtype=compute_dtype(r),
                      mtp_passes=num_drafts(r.speculative), offload=r.offload,
                      cache_bytes=None if r.serving.cache_gb is None else r.serving.cache_gb * 1e9)
    return describe(r.model, r.layout, holding) + "\n\n" + planned_layout(r, cfg)


def planned_layout(r: schema.Resolved, cfg: Any = None) -> str:
    """The planner's one-layout report of the launch's layout (see dry_run_plan)."""
    from ds3dist.plan import report
    from ds3dist.plan.cluster import Cluster, ClusterSpec, PlanError, WorkloadSpec
    from ds3dist.plan.estimate import estimate
    from ds3dist.plan.search import given_candidate, plan_setup

    spec = ClusterSpec.of(cfg.cluster) if cfg is not None and "cluster" in cfg else ClusterSpec()
    work = (WorkloadSpec.of(cfg.workload) if cfg is not None and "workload" in cfg
            else WorkloadSpec())
    try:
        if r.layout.device == "cpu":
            ranks = r.layout.world_size * r.runtime.replicas
            per_node = -(-ranks // spec.nodes) if isinstance(spec.nodes, int) and spec.nodes > 0 \
                else spec.nodes
            cluster = Cluster.of("cpu", per_node, spec.nodes, spec.figures)
        else:
            cluster = spec.cluster()
        workload = work.workload(r.sampling.max_new_tokens, r.job.input)
    except PlanError as e:
        raise LaunchConfigError(str(e)) from None
    setup = plan_setup(r, cluster, workload)
    return report.one_layout(estimate(setup, given_candidate(r, setup)), cluster, workload)


def run(cfg: Any, engine_factory: EngineFactory | None = None) -> JobSummary | None:
    """Validate, prepare and run the job described by a composed config; return its summary.

    engine_factory(checkpoint, resolved) builds the engine (default: make_engine).
    """
    r = schema.validate(cfg)
    if r.job.dry_run:
        print(dry_run_plan(r, cfg))
        return None
    with GracefulStop(r.runtime.drain_timeout_s) as stop:  # from the start: every phase
        try:
            prep = preflight(r)
            if prep is None:
                return None
            summary = _run_prepared(r, cfg, prep, stop, engine_factory)
        except KeyboardInterrupt as e:
            raise stop.interruption(e) from None
    _print_closing(summary, prep.paths, synthesized=r.source.path is None,
                   model=r.source.preset or prep.checkpoint.name)
    return summary


def _run_prepared(r: schema.Resolved, cfg: Any, prep: _Prepared, stop: GracefulStop,
                  engine_factory: EngineFactory | None) -> JobSummary:
    """The job after its preflight: tokenizer, engine (op builds, cluster, ranks), generation."""
    checkpoint = prep.checkpoint
    model_name = r.source.preset or checkpoint.name
    replicas = r.runtime.replicas
    with prep.output as out:
        tokenizer = load_tokenizer(checkpoint)
        print(f"model {model_name} from {checkpoint}; layout pp={r.layout.pp} "
              f"ep={r.layout.ep} ({r.layout.world_size} ranks, {r.layout.device}"
              + (f", {replicas} replicas" if replicas > 1 else "")
              + f"); execution {r.execution}", flush=True)
        print(f"input {prep.input.path}", flush=True)
        engine = (engine_factory(checkpoint, r) if engine_factory is not None
                  else make_engine(checkpoint, r, stop))
        stop.arm()  # ray.init replaced the SIGTERM handler
        try:
            summary = run_batch_job(
                engine, tokenizer, prep.input, out, sampling=r.sampling,
                errors_path=prep.paths[1], summary_path=prep.paths[2], plot_path=prep.paths[3],
                max_prompt_tokens=r.job.max_prompt_tokens,
                max_position_embeddings=r.model.max_position_embeddings,
                fmt=r.job.format, model_name=model_name, progress=r.job.progress,
                mtp_layers=r.model.mtp_layer_ids, stop=stop,
                meta={"checkpoint": str(checkpoint),
                      "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
                      if isinstance(cfg, DictConfig) else None},
            )
        finally:
            engine.shutdown()
    return summary


def _print_closing(summary: JobSummary, paths: tuple[Path, ...], synthesized: bool,
                   model: str) -> None:
    c, t = summary.counts, summary.throughput
    print(f"outputs: {paths[0].resolve()} ({c.output_records} records; {c.generated} "
          f"generated now, {c.already_done} already done)")
    print(f"errors:  {paths[1].resolve()} ({c.errors} malformed lines, {c.failed} "
          f"requests failed in the engine)")
    print(f"summary: {paths[2].resolve()}")
    if summary.plot:
        print(f"plot:    {Path(summary.plot).resolve()}")
    load = expert_load_path(paths[0])
    if load.exists():
        print(f"load:    {load.resolve()} (python -m ds3dist.balance places experts from it)")
    if t.completion_tokens_per_second is not None:
        print(f"throughput: {t.sequences_per_second:.2f} seq/s, "
              f"{t.completion_tokens_per_second:.1f} completion tok/s")
    recovery = summary.engine.recovery
    if recovery is not None and recovery.restarts:
        print(f"recovery: {len(recovery.restarts)} restarts, {recovery.lost_seconds:.1f} s lost")
    if summary.stopped and c.not_run:
        print(f"stopped by {summary.stopped}: {c.drained} requests finished during the drain, "
              f"{c.not_run} not run; rerun the same command to finish the job")
    elif summary.stopped:
        print(f"stopped by {summary.stopped}: every request of the input is written "
              f"({c.drained} finished during the drain); the job is complete")
    if synthesized:
        print(f"note: the {model} model was synthesized with random weights, so its text is "
              f"noise by design; the figures above are real. With real weights:\n"
              f"  {REAL_WEIGHTS_COMMAND}")


def _log_file() -> Path:
    """Hydra's log file of this run, else launch.log in the run dir."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            return Path(h.baseFilename)
    return _run_dir() / "launch.log"


def _fail(e: BaseException, code: int, prefix: str = "") -> None:
    """Print a short message; keep the traceback in the log file and print its path."""
    path = _log_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
        where = f"\n(traceback in {path})"
    except OSError:
        where = ""
    print(f"error: {prefix}{e}{where}", file=sys.stderr, flush=True)
    sys.exit(code)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Exit codes: 0 done, 1 engine or unexpected error, 2 bad config or input,
    EXIT_INTERRUPTED (75) stopped by a signal before every request ended (rerun to finish)."""
    try:
        summary = run(cfg)
    except KeyboardInterrupt as e:  # a second signal, or the drain ran out of time
        _fail(e if str(e) else Interrupted("interrupted"), EXIT_INTERRUPTED)
    except (LaunchConfigError, JobError, ConfigError, ClusterError, OffloadError) as e:
        _fail(e, 2)
    except (EngineError, LayoutError, TokenizerError) as e:
        _fail(e, 1)
    except Exception as e:  # a bug: still a short message, the traceback in the log
        _fail(e, 1, prefix=f"unexpected {type(e).__name__}: ")
    if summary is not None and summary.stopped and summary.counts.not_run:
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
