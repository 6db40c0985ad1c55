"""The argument check's exchange on gloo: a native ring allgather, or one direct round of point-to-point.

Gloo's argument check gathers every rank's call signature (a few int64) before the call's first step.
gloo's own allgather runs as a ring of p-1 steps, each a round trip of its point-to-point (the receiver's
ready notice, then the data): across hosts, where a trip costs milliseconds, that is (p-1) round trips
per call. The direct exchange posts a receive from every peer and a send to every peer at once and then
waits: one round trip whatever p, at the price of 2(p-1) operations posted from Python instead of one
native call. Which one a group uses is `check_exchange_mode` (docs/design.md "Argument check" gives the
measurements behind the rule).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import torch

from commlab.collectives.hosts import HostMap
from commlab.collectives.transport import Message, Transport
from commlab.errors import CollectiveTimeoutError, TransportError, invalid

CHECK_EXCHANGE_ENV = "COMMLAB_CHECK_EXCHANGE"
CHECK_EXCHANGES = ("auto", "direct", "native")

# A receive that failed or timed out may still be written to by a late message; its table (and the
# requests) are kept here for the life of the process so that memory is never reused under it.
_ABANDONED: list[tuple[torch.Tensor, torch.Tensor, list]] = []


def check_exchange_mode(hosts: HostMap, environ: Mapping[str, str] = os.environ) -> str:
    """'direct' or 'native': how a gloo group of this host map exchanges its call signatures.

    $COMMLAB_CHECK_EXCHANGE forces one ('direct', 'native'); unset or 'auto': direct when the group spans
    hosts (each of the ring's p-1 round trips then costs a network latency, and one round beats p-1),
    native when it is on one host (loopback round trips cost tens of microseconds, and gloo's ring in C++
    is cheaper than 2(p-1) operations posted from Python). Every rank derives it from the same host map
    and environment, so all ranks of a group choose alike.
    """
    value = environ.get(CHECK_EXCHANGE_ENV, "auto") or "auto"
    if value not in CHECK_EXCHANGES:
        raise invalid(CHECK_EXCHANGE_ENV, value, CHECK_EXCHANGES)
    if value != "auto":
        return value
    return "direct" if hosts.num_hosts > 1 else "native"


def exchange_direct(
    transport: Transport, send: torch.Tensor, table: torch.Tensor, deadline: float, tag: int
) -> None:
    """Every rank's `send` into `table` (rank r's at block r) in one round of point-to-point messages.

    Posts a receive from every peer into its block and a send of `send` to every peer, all on `tag`
    (one message per pair and direction, so one tag of the call's check range suffices), then waits for
    all of them by `deadline` (time.monotonic()). Every rank receives every peer's signature, whatever
    they hold, so a disagreement is seen on every rank and no message is left unreceived. A peer that
    does not answer in time raises CollectiveTimeoutError, one whose connection fails TransportError;
    either names every peer whose receive or send did not complete.
    """
    rank, size = transport.rank, transport.size
    width = send.numel()
    table[rank * width : (rank + 1) * width] = send
    peers = [peer for peer in range(size) if peer != rank]
    recvs = [Message(table[peer * width : (peer + 1) * width], peer, tag) for peer in peers]
    sends = [Message(send, peer, tag) for peer in peers]
    requests = transport.post(sends, recvs)  # receives first, then sends
    failed: dict[int, str] = {}  # peer -> what went wrong first
    timed_out = False
    for index, request in enumerate(requests):
        peer = peers[index % len(peers)]
        what = "signature from" if index < len(peers) else "signature to"
        # after a failure the rest only get what is left of the deadline (at least 1 ms to look)
        try:
            request.wait(deadline - time.monotonic())
        except CollectiveTimeoutError as error:
            timed_out = True
            failed.setdefault(peer, f"{what} rank {peer} timed out ({error})")
        except TransportError as error:
            failed.setdefault(peer, f"{what} rank {peer} failed ({error})")
    if not failed:
        return
    _ABANDONED.append((send, table, requests))
    names = ", ".join(f"rank {peer}" for peer in sorted(failed))
    first = failed[min(failed)]
    error_type = CollectiveTimeoutError if timed_out else TransportError
    raise error_type(f"no answer from {names} in the direct exchange of signatures: {first}")
