"""`python -m ds3dist.launch`: the Hydra entry point that runs a batch generation job.

    python -m ds3dist.launch                                   # tiny model, bundled sample prompts
    python -m ds3dist.launch model=tiny +parallel=pp2ep2 job.input=in.jsonl job.output=out.jsonl
    python -m ds3dist.launch model=deepseek_v3 model.path=/data/DeepSeek-V3 +parallel=pp2ep8 \
        execution=fp8 job.input=requests.jsonl job.output=results.jsonl
    python -m ds3dist.launch +parallel=ep16 model=deepseek_v3 --cfg job   # show the config
    python -m ds3dist.launch +parallel=pp4ep16 model=deepseek_v3 job.dry_run=true  # rank plan

Steps: validate the config (layout planned against the model: a bad value fails naming it),
synthesize the preset into the cache when `model.path` is null and the cache lacks it, start
the Engine (a new local Ray cluster, or the one at runtime.address / $RAY_ADDRESS), run the
batch job (ds3dist.jobs.batch), print where the outputs are, shut the Engine down.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig, OmegaConf

from ds3dist.jobs import schema
from ds3dist.jobs.batch import JobError, default_paths, run_batch_job
from ds3dist.jobs.schema import LaunchConfigError


SAMPLE_PROMPTS = "sample_prompts.jsonl"
EngineFactory = Callable[..., Any]


def bundled_sample() -> Path:
    """The sample prompts shipped with the package (ds3dist/data/sample_prompts.jsonl)."""
    from importlib.resources import files

    return Path(str(files("ds3dist") / "data" / SAMPLE_PROMPTS))


def _run_dir() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not under @hydra.main (compose API, tests)
        return Path("outputs") / time.strftime("%Y-%m-%d_%H-%M-%S")


def resolve_checkpoint(cfg: Any, progress: bool = True) -> Path:
    """`model.path`, or the preset synthesized into the cache dir (made on first use)."""
    path = cfg.model.path
    if path is not None:
        p = Path(str(path)).expanduser()
        if not (p / "config.json").is_file():
            raise LaunchConfigError(f"model.path: no config.json in {p}")
        return p
    name = cfg.model.preset
    if name == "deepseek_v3":
        raise LaunchConfigError(
            "model.path: the deepseek_v3 model needs its checkpoint directory "
            "(model.path=/path/to/DeepSeek-V3); only tiny and small are synthesized"
        )
    seed = int(cfg.model.seed)
    target = schema.cached_checkpoint_dir(name, seed)
    if (target / "config.json").is_file():
        return target
    from ds3dist.checkpoint.synthesize import synthesize

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


def make_engine(checkpoint: Path, resolved: schema.Resolved, cfg: Any) -> Any:
    """The distributed Engine for this config (Ray cluster started or joined by the Engine)."""
    import torch

    from ds3dist.runtime.engine import Engine

    dtype = cfg.execution.dtype
    opts = schema.runtime_options(cfg)
    return Engine(
        checkpoint,
        resolved.layout,
        execution=schema.execution_mode(cfg),
        dtype=None if dtype is None else getattr(torch, dtype),
        **opts,
    )


def run(cfg: Any, engine_factory: EngineFactory | None = None) -> dict[str, Any] | None:
    """Validate, prepare and run the job described by a composed config; return its summary.

    engine_factory(checkpoint, resolved, cfg) builds the engine (default: make_engine).
    """
    resolved = schema.validate(cfg)
    if cfg.job.dry_run:
        print(schema.describe(resolved.model, resolved.layout))
        return None
    input_path = Path(cfg.job.input) if cfg.job.input is not None else bundled_sample()
    if not input_path.is_file():
        raise LaunchConfigError(f"job.input: no such file {input_path}")
    progress = bool(cfg.job.progress)
    checkpoint = resolve_checkpoint(cfg, progress=progress)
    output = Path(cfg.job.output) if cfg.job.output is not None else _run_dir() / "results.jsonl"
    out_path, err_path, sum_path, png_path = default_paths(
        output, cfg.job.errors, cfg.job.summary, cfg.job.plot)

    from ds3dist.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    model_name = cfg.model.preset or checkpoint.name
    print(f"model {model_name} from {checkpoint}; layout pp={resolved.layout.pp} "
          f"ep={resolved.layout.ep} ({resolved.layout.world_size} ranks, "
          f"{resolved.layout.device}); execution {schema.execution_mode(cfg)}", flush=True)
    print(f"input {input_path}", flush=True)

    factory = engine_factory or make_engine
    engine = factory(checkpoint, resolved, cfg)
    try:
        summary = run_batch_job(
            engine,
            tokenizer,
            input_path,
            out_path,
            sampling=schema.sampling_defaults(cfg),
            batch_size=int(cfg.job.batch_size),
            errors_path=err_path,
            summary_path=sum_path,
            plot_path=png_path,
            max_prompt_tokens=cfg.job.max_prompt_tokens,
            max_position_embeddings=resolved.model.max_position_embeddings,
            fmt=schema.job_format(cfg),
            model_name=model_name,
            progress=progress,
            mtp_layers=resolved.model.mtp_layer_ids,
            meta={"checkpoint": str(checkpoint),
                  "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
                  if isinstance(cfg, DictConfig) else None},
        )
    finally:
        shutdown = getattr(engine, "shutdown", None)
        if shutdown is not None:
            shutdown()

    c, t = summary["counts"], summary["throughput"]
    print(f"outputs: {out_path.resolve()} ({c['output_records']} records; {c['generated']} "
          f"generated now, {c['already_done']} already done)")
    print(f"errors:  {err_path.resolve()} ({c['errors']} malformed lines)")
    print(f"summary: {sum_path.resolve()}")
    if summary.get("plot"):
        print(f"plot:    {Path(summary['plot']).resolve()}")
    if t["completion_tokens_per_second"] is not None:
        print(f"throughput: {t['sequences_per_second']:.2f} seq/s, "
              f"{t['completion_tokens_per_second']:.1f} completion tok/s")
    return summary


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from ds3dist.config import ConfigError

    try:
        run(cfg)
    except (LaunchConfigError, JobError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as e:
        # Engine failures (a rank died or timed out) carry a message naming rank and node.
        if type(e).__name__ in ("EngineError", "LayoutError", "TokenizerError"):
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
