"""Let a module stand for its main function.

`ds3dist.checkpoint.synthesize` is both a module (`python -m ds3dist.checkpoint.synthesize`)
and a function (`ds3dist.checkpoint.synthesize(out_dir, ...)`); once the module is imported,
Python resolves the package attribute to the module, so the module itself must be callable.
"""

from __future__ import annotations

import sys
import types


def make_module_callable(module_name: str, fn) -> None:
    """Calling module `module_name` calls `fn`."""

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return fn(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
