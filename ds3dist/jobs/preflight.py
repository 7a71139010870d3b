"""Checks a launch makes before any Ray cluster starts, each failing with a message that names
the setting at fault.

- `check_side_files`: the errors, summary and plot files can be written (not a directory, a
  writable folder) without writing them yet.
- `check_checkpoint`: the header-only validation of the checkpoint against its config (seconds
  even for the 163-shard release) and, when asked, the streaming integrity check.
- `check_settings`: what would fail only after op builds, the cluster and weight loading: the
  NVMe offload folder and libaio, the MTP layer speculation needs, runtime.cache_gb against
  this host's memory, runtime.replicas x ranks against the local cluster's CPUs or GPUs.

The input (`ds3dist.jobs.input_text.read_input`), the output lock
(`ds3dist.jobs.output_file.OutputFile.open`) and the Ray address
(`ds3dist.runtime.cluster.check_address`) are the other checks; the launch runs them all in
order.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ds3dist.checkpoint.validation import validate
from ds3dist.checkpoint.verify import verify as verify_data
from ds3dist.jobs.errors import JobError
from ds3dist.jobs.schema import LaunchConfigError
from ds3dist.plan.accelerators import meminfo_gb

MAX_LISTED = 10  # checkpoint problems quoted in the error; inspect lists them all


def check_side_files(paths: dict[str, Path]) -> None:
    """paths: setting -> file. Each must not be a directory and its folder must take a file."""
    for key, path in paths.items():
        if path.is_dir():
            raise JobError(f"{key}: {path} is a directory; name a file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe"):
                pass
        except OSError as e:
            raise JobError(f"{key}: cannot write in {path.parent}: {e.strerror}") from None


def check_checkpoint(path: Path, verify: bool = False, progress: bool = True) -> None:
    """Header-only validation (and with verify, checksums and values); LaunchConfigError
    listing the problems, each naming file and tensor."""
    problems = validate(path)
    if verify and not problems:
        problems = verify_data(path, progress=progress)
    if not problems:
        return
    listed = "\n".join(f"  {p}" for p in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise LaunchConfigError(
        f"model.path: the checkpoint in {path} is invalid ({len(problems)} problem(s)):\n"
        f"{listed}{more}\nlist them all with: python -m ds3dist.checkpoint.inspect "
        f"{'--verify ' if verify else ''}{path}")


def check_settings(r) -> None:
    """Settings that would otherwise fail only after the op builds, the cluster and weight
    loading (minutes): checked on this host first, each failure naming its key. `r` is the
    launch's schema.Resolved. Host-specific ones only where the ranks run here (a new local
    cluster); on an existing cluster each rank checks what it can first thing."""
    local = r.runtime.new_local_cluster
    ranks = r.layout.world_size * r.runtime.replicas
    if r.offload is not None and local:
        r.offload.check_host()  # device=nvme: its folder and libaio
    if r.speculative is not None:
        _check_mtp(r.model)
    if local and r.layout.device == "cpu" and r.serving.cache_gb is not None:
        need, have = r.serving.cache_gb * ranks, meminfo_gb("MemAvailable")
        if have is not None and need > have:
            raise LaunchConfigError(
                f"runtime.cache_gb: {r.serving.cache_gb:g} GB per rank x {ranks} ranks on this "
                f"host = {need:g} GB of paged cache, but this host has {have:.1f} GB available")
    if local:
        _check_devices(r, ranks)


def _check_mtp(model) -> None:
    """Speculation needs the MTP layer (check_checkpoint has matched the tensors to the config)."""
    if not model.mtp_layer_ids:
        raise LaunchConfigError("sampling.speculative: the model has no MTP layer "
                                "(num_nextn_predict_layers = 0 in its config.json); leave "
                                "sampling.speculative unset")


def _check_devices(r, ranks: int) -> None:
    if r.layout.device == "cuda":
        import torch

        have = torch.cuda.device_count()
        if ranks > have:
            raise LaunchConfigError(f"runtime.replicas x ranks: {r.runtime.replicas} x "
                                    f"{r.layout.world_size} GPU ranks, but this host has "
                                    f"{have} GPU(s)")
        return
    per_rank = r.runtime.rank_cpus(ranks)
    cpus = r.runtime.cluster_cpus(ranks)
    if ranks * per_rank > cpus:
        raise LaunchConfigError(f"runtime.replicas x ranks: {ranks} ranks x {per_rank} CPUs "
                                f"each need {ranks * per_rank} logical CPUs, but the local "
                                f"cluster gets runtime.num_cpus={cpus}")
