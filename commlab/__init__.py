"""commlab: collective communication for deep learning, written once as schedules.

The collectives are shaped like torch.distributed's: `commlab.all_reduce(tensor, op="sum", group=None,
algorithm="auto", async_op=False)`, `reduce_scatter`, `all_gather`, `broadcast`, `reduce`.
"""

__version__ = "0.1.0"

from commlab.collectives.api import (
    all_gather,
    all_reduce,
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
)

__all__ = [
    "CollectiveMismatchError",
    "CollectiveTimeoutError",
    "CommlabError",
    "Communicator",
    "InvalidArgumentError",
    "ScheduleError",
    "TransportError",
    "Work",
    "__version__",
    "all_gather",
    "all_reduce",
    "broadcast",
    "communicator",
    "reduce",
    "reduce_scatter",
    "release",
]
