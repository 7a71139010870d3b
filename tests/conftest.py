"""Shared test fixtures.

Session-scoped checkpoints (built once per test run, read-only for tests; copy before
modifying):
  tiny_fp8_dir   the `tiny` preset synthesized with seed 0 in 4 shards (release format, FP8)
  tiny_bf16_dir  the same checkpoint converted to bf16 (scales dropped)
  tok            the release tokenizer that tiny checkpoint carries
  ray_cluster    one local Ray cluster (num_cpus=8) shared by the session's tests
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_fp8_dir(tmp_path_factory) -> Path:
    from ds3dist.checkpoint.synthesize import synthesize

    out = tmp_path_factory.mktemp("ckpt") / "tiny-fp8"
    synthesize(out, preset="tiny", seed=0, shards=4, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_bf16_dir(tiny_fp8_dir, tmp_path_factory) -> Path:
    from ds3dist.checkpoint.convert import convert

    out = tmp_path_factory.mktemp("ckpt") / "tiny-bf16"
    convert(tiny_fp8_dir, out, to="bf16", progress=False)
    return out


@pytest.fixture(scope="session")
def tok(tiny_fp8_dir):
    from ds3dist.tokenizer import load_tokenizer

    return load_tokenizer(tiny_fp8_dir)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (more logical CPUs than cores)."""
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("DS3DIST_TORCH_THREADS", "1")
    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
