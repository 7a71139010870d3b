"""ds3dist: a distributed runner for DeepSeek-V3 MoE models.

`load_model` and `generate` are imported lazily so `import ds3dist` stays light.
"""

from __future__ import annotations

__all__ = ["load_model", "generate"]


def __getattr__(name: str):
    if name == "load_model":
        from ds3dist.model.load import load_model

        return load_model
    if name == "generate":
        from ds3dist.generation import generate

        return generate
    raise AttributeError(f"module 'ds3dist' has no attribute {name!r}")
