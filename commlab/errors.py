"""The errors commlab raises: every one names the bad value and what is accepted."""

from __future__ import annotations

from collections.abc import Iterable


class CommlabError(Exception):
    """Base class of every error commlab raises on purpose."""


class InvalidArgumentError(CommlabError, ValueError):
    """An argument has a value commlab does not accept."""


class ScheduleError(CommlabError):
    """A schedule is malformed, deadlocks, or does not compute its collective."""


class CollectiveMismatchError(CommlabError):
    """Ranks called a collective with different arguments (op, size, dtype, algorithm, root)."""


class CollectiveTimeoutError(CommlabError, TimeoutError):
    """A collective did not complete within its timeout (a peer is dead, slow, or never called it)."""


class TransportError(CommlabError):
    """The transport failed under a collective (a peer closed its connection, a send failed)."""


class TestbedError(CommlabError):
    """The emulated cluster could not be built, reached or torn down (no root, a failed `ip`/`tc` command,
    an unknown run or host)."""


class TopologyError(CommlabError, ValueError):
    """A simulated network is malformed: a bad link attribute, a disconnected pair, an unreadable file."""


def invalid(name: str, value: object, accepted: Iterable[object] | str) -> InvalidArgumentError:
    """Build the standard 'bad argument' error: the argument, its value and what is accepted."""
    if not isinstance(accepted, str):
        accepted = ", ".join(repr(a) for a in accepted)
    return InvalidArgumentError(f"{name}={value!r} is not accepted; accepted: {accepted}")


class UnsupportedOperationError(CommlabError, NotImplementedError):
    """An operation commlab does not implement (a torch.distributed op or reduction the backend lacks)."""
