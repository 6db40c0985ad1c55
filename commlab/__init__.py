"""commlab: collective communication for deep learning, written once as schedules.

The collectives are shaped like torch.distributed's: `commlab.all_reduce(tensor, op="sum", group=None,
algorithm="auto", async_op=False)`, `reduce_scatter`, `all_gather`, `broadcast`, `reduce`, `all_to_all`.
Importing commlab registers the torch.distributed backend "commlab" (`commlab.torch_backend`): at once if
torch is already imported, else the moment torch finishes importing. The API names load on first use, so
commands that never touch tensors (`commlab sim ...`) start without importing torch (about 2 s).
"""

__version__ = "0.1.0"

import importlib
import importlib.abc
import importlib.util
import sys

from commlab.errors import (
    CollectiveMismatchError,
    CollectiveTimeoutError,
    CommlabError,
    InvalidArgumentError,
    ScheduleError,
    TransportError,
    UnsupportedOperationError,
)
from commlab.shared import lazy

# name -> module it lives in; loaded on first access (PEP 562), as each of them imports torch
_API = ("all_gather", "all_reduce", "all_to_all", "broadcast", "communicator", "reduce", "reduce_scatter")
_LAZY = {
    **dict.fromkeys((*_API, "release"), "commlab.collectives.api"),
    "Communicator": "commlab.collectives.communicator",
    "Work": "commlab.collectives.communicator",
    "configure": "commlab.torch_backend",
    "register_backend": "commlab.torch_backend",
}


def __getattr__(name: str) -> object:
    return lazy.load(__name__, _LAZY, globals(), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def _register_backend() -> None:
    importlib.import_module("commlab.torch_backend").register_backend()


class _RegisterAfterTorch(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `torch` is first imported, wraps its loader so that the backend is
    registered right after torch's own import completes (torch.distributed is imported by then)."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> object:
        if fullname != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: object) -> None:
            exec_module(module)
            try:
                _register_backend()
            except Exception as error:  # never break `import torch` itself; say why the backend is missing
                import warnings

                warnings.warn(
                    f"commlab: torch.distributed backend 'commlab' not registered: {error!r}", stacklevel=2
                )

        spec.loader.exec_module = exec_then_register
        return spec


if "torch" in sys.modules:
    _register_backend()
elif not any(isinstance(finder, _RegisterAfterTorch) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTorch())

__all__ = [
    "CollectiveMismatchError",
    "CollectiveTimeoutError",
    "CommlabError",
    "InvalidArgumentError",
    "ScheduleError",
    "TransportError",
    "UnsupportedOperationError",
    "Work",
    "__version__",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "broadcast",
    "communicator",
    "configure",
    "reduce",
    "reduce_scatter",
    "register_backend",
    "release",
]
