"""commlab: collective communication for deep learning, written once as schedules.

The collectives are shaped like torch.distributed's: `commlab.all_reduce(tensor, op="sum", group=None,
algorithm="auto", async_op=False)`, `reduce_scatter`, `all_gather`, `broadcast`, `reduce`, `all_to_all`.
Importing commlab registers the torch.distributed backend "commlab" (`commlab.torch_backend`).
"""

__version__ = "0.1.0"

from commlab.collectives.api import (
    all_gather,
    all_reduce,
    all_to_all,
    broadcast,
    communicator,
    reduce,
    reduce_scatter,
    release,
)
from commlab.collectives.communicator import Communicator, Work
from commlab.errors import (
    CollectiveMismatchError,
    CollectiveTimeoutError,
    CommlabError,
    InvalidArgumentError,
    ScheduleError,
    TransportError,
    UnsupportedOperationError,
)
from commlab.torch_backend import configure, register_backend

register_backend()

__all__ = [
    "CollectiveMismatchError",
    "CollectiveTimeoutError",
    "CommlabError",
    "Communicator",
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
