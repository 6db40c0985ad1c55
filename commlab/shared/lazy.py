"""Package attributes loaded on first use (PEP 562): what `commlab` and `commlab.torch_backend` share.

A package whose names live in modules that import torch lists them as name -> module; its `__getattr__`
calls `load`, which imports the module, keeps the value in the package's namespace (so the next access is
a plain lookup) and returns it. Why: `import commlab` must not import torch (commands that never touch
tensors start without it), and backend registration must not import commlab's torch modules while one of
them may be half-loaded."""

from __future__ import annotations

import importlib


def load(package: str, names: dict[str, str], namespace: dict, name: str) -> object:
    """`name` of `package` from the module `names` maps it to; AttributeError for names it does not list."""
    module = names.get(name)
    if module is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    namespace[name] = value
    return value
