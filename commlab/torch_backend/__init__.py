"""commlab as a torch.distributed backend: `dist.init_process_group("commlab")` and unmodified programs
(DDP, FSDP2, DeviceMesh, DTensor, torch.distributed.checkpoint) run their collectives on commlab's schedules.

`import commlab` registers the backend (`register_backend()`, idempotent): registration only adds a name to
torch's table of backends, and the point of the backend is a one-line switch in programs we did not
write, so it must not need a second call (docs/design.md). `configure(...)` or $COMMLAB_ALGORITHM fix the
algorithm per op; the rest is `auto`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from commlab.shared import lazy
from commlab.torch_backend.name import BACKEND_NAME

if TYPE_CHECKING:
    from commlab.torch_backend.process_group import CommlabProcessGroup

__all__ = ["BACKEND_NAME", "CommlabProcessGroup", "configure", "register_backend"]

# Loaded on first use, not here: registration runs from a hook at the end of `import torch`, possibly while
# a commlab module that imports torch is itself half-loaded (`import commlab.collectives.shm` first), so
# registering must import nothing of commlab's (the group's modules load when torch creates a group), and
# this package imports torch only inside its functions (it may itself be the module being loaded).
_LAZY = {
    "CommlabProcessGroup": "commlab.torch_backend.process_group",
    "configure": "commlab.torch_backend.config",
}


def __getattr__(name: str) -> object:
    return lazy.load(__name__, _LAZY, globals(), name)


def _create(options: object, backend_options: object = None) -> CommlabProcessGroup:
    """torch's creator hook (extended API): one CommlabProcessGroup per group torch makes."""
    from commlab.torch_backend.process_group import CommlabProcessGroup

    global_ranks = list(getattr(options, "global_ranks_in_group", []) or range(options.group_size))
    return CommlabProcessGroup(
        options.store, options.group_rank, options.group_size, options.timeout, global_ranks
    )


def register_backend() -> bool:
    """Register backend "commlab" with torch.distributed (CPU tensors); False if it already was."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if BACKEND_NAME.upper() in dist.Backend._plugins:
        return False
    # devices must be a list: torch iterates a string letter by letter
    dist.Backend.register_backend(BACKEND_NAME, _create, extended_api=True, devices=["cpu"])
    return True
