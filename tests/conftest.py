"""Shared test fixtures.

Session-scoped checkpoints (built once per test run, read-only for tests; copy before
modifying):
  tiny_fp8_dir   the `tiny` preset synthesized with seed 0 in 4 shards (release format, FP8)
  tiny_bf16_dir  the same checkpoint converted to bf16 (scales dropped)
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
