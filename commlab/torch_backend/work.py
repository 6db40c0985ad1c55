"""The `torch.distributed.Work` the backend returns: a wait with a timeout and a torch Future of outputs.

DDP's reducer and comm hooks read `get_future()`: a `torch.futures.Future` whose value is the list of the
op's output tensors. The Work completes when commlab's call does (on the communicator's worker thread
for asynchronous calls), after the op's copy-out step, so a waiter never sees half-written outputs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from commlab.errors import CollectiveTimeoutError

_MARGIN_S = 5.0  # a wait outlasts the call's own deadline by this much, so the call's error comes first


class CommlabWork(dist.Work):
    """One op of the backend: completed by `finish(error)`, waited on with a timeout."""

    def __init__(self, label: str, outputs: list[torch.Tensor], timeout_s: float) -> None:
        super().__init__()
        self.label = label
        self._outputs = outputs
        self._timeout_s = timeout_s
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._future: torch.futures.Future = torch.futures.Future()

    def finish(self, error: BaseException | None, after: Callable[[], None] | None = None) -> None:
        """Complete the work: run `after` (the copy-out) unless the op failed, then resolve the future."""
        if error is None and after is not None:
            try:
                after()
            except BaseException as failure:  # a copy-out that fails is the op's error
                error = failure
        self._error = error
        self._done.set()
        if error is None:
            self._future.set_result(self._outputs)
        else:
            self._future.set_exception(error)

    def wait(self, timeout: timedelta | None = None) -> bool:
        """Block until the op is done (at most `timeout`, else the op's own timeout); re-raise its error."""
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else 0.0
        if seconds <= 0:  # torch passes 0 for "no timeout": the op's deadline bounds it
            seconds = self._timeout_s + _MARGIN_S
        if not self._done.wait(seconds):
            raise CollectiveTimeoutError(f"commlab backend: {self.label} not complete after {seconds:g} s")
        if self._error is not None:
            raise self._error
        return True

    def is_completed(self) -> bool:
        return self._done.is_set()

    def is_success(self) -> bool:
        return self._done.is_set() and self._error is None

    def exception(self) -> BaseException | None:
        return self._error

    def result(self) -> list[torch.Tensor]:
        self.wait()
        return self._outputs

    def get_future(self) -> torch.futures.Future:
        return self._future

    def synchronize(self) -> None:
        self.wait()
