"""Checkpoint format: expected-tensor table, FP8 math, reading, validating, writing, converting.

`synthesize` and `convert` are both a submodule and its main function: the submodules are
callable (calling `ds3dist.checkpoint.synthesize(...)` calls `synthesize.synthesize(...)`), so
`from ds3dist.checkpoint import synthesize` works whichever of the two Python resolves.
"""

from __future__ import annotations

import importlib

__all__ = ["synthesize", "convert", "CheckpointReader", "CheckpointError", "validate"]


def __getattr__(name: str):
    # Lazy, so that importing one submodule does not import them all.
    if name in ("synthesize", "convert"):
        return importlib.import_module(f"{__name__}.{name}")
    if name in ("CheckpointReader", "CheckpointError"):
        return getattr(importlib.import_module(f"{__name__}.reader"), name)
    if name == "validate":
        return importlib.import_module(f"{__name__}.validation").validate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
