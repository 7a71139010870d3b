"""ds3dist: a distributed runner for DeepSeek-V3 MoE models.

`load_model`, `generate`, `Engine` and `ParallelLayout` are imported lazily so that
`import ds3dist` stays light.
"""

from __future__ import annotations

__all__ = ["load_model", "generate", "Engine", "ParallelLayout"]


def __getattr__(name: str):
    if name == "load_model":
        from ds3dist.model.load import load_model

        return load_model
    if name == "generate":
        from ds3dist.local import generate

        return generate
    if name == "Engine":
        from ds3dist.runtime.engine import Engine

        return Engine
    if name == "ParallelLayout":
        from ds3dist.parallel.layout import ParallelLayout

        return ParallelLayout
    raise AttributeError(f"module 'ds3dist' has no attribute {name!r}")
