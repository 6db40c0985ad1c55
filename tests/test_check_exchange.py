"""The argument check's direct exchange on gloo (commlab/collectives/check_exchange.py).

Gloo groups that span hosts exchange call signatures in one round of point-to-point messages instead of
gloo's ring allgather. These tests run it on one host over gloo's TCP loopback (a TorchTransport, never
shared memory) by giving the Communicator a host map of several hosts, which is what selects it.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import commlab
from commlab.collectives.check_exchange import CHECK_EXCHANGE_ENV, check_exchange_mode
from commlab.collectives.communicator import Communicator
from commlab.collectives.hosts import HostMap
from commlab.collectives.transport import TorchTransport
from commlab.errors import CollectiveMismatchError, CollectiveTimeoutError, InvalidArgumentError
from commlab.sim.network.collective import argument_check_time, simulate_collective
from commlab.sim.network.profile import Profile
from commlab.sim.network.topology_io import parse_topology


def _direct_communicator(timeout: float | None = None) -> Communicator:
    """A gloo communicator whose host map puts every rank on its own host: the direct exchange."""
    size = dist.get_world_size()
    comm = Communicator(TorchTransport(), timeout=timeout, hosts=f"{size}x1")
    assert comm.check_exchange == "direct"
    return comm


def agreeing_calls() -> list[float]:
    """Five calls in a row (five tag windows) with the check on; each result is the exact sum."""
    comm = _direct_communicator()
    rank, size = dist.get_rank(), dist.get_world_size()
    sums = []
    for call in range(5):
        tensor = torch.full((1024,), float(rank + call))
        commlab.all_reduce(tensor, group=comm, algorithm="ring")
        expected = sum(r + call for r in range(size))  # small integers: exact in float32
        assert torch.equal(tensor, torch.full((1024,), float(expected))), (call, tensor[:4])
        sums.append(float(tensor[0]))
    comm.close()
    return sums


@pytest.mark.parametrize("world_size", [2, 4])
def test_direct_exchange_agrees_and_the_calls_are_right(rank_pools, world_size):
    results = rank_pools(world_size).run(agreeing_calls)
    assert all(sums == results[0] for sums in results), results


def mismatched_then_in_step(field: str) -> tuple[str, list[float]]:
    """Rank 1 disagrees in `field`; every rank must raise, and the next (agreeing) call must work."""
    comm = _direct_communicator()
    odd = dist.get_rank() == 1
    message = "no error"
    try:
        if field == "elements":
            commlab.all_reduce(torch.ones(10 + odd), group=comm, algorithm="ring")
        else:
            commlab.all_reduce(torch.ones(10), group=comm, algorithm="tree" if odd else "ring")
    except CollectiveMismatchError as error:
        message = str(error)
    after = torch.ones(6)
    commlab.all_reduce(after, group=comm, algorithm="ring")  # nothing of the failed check is left over
    comm.close()
    return message, after.tolist()


@pytest.mark.parametrize("field", ["elements", "algorithm"])
def test_a_disagreeing_rank_raises_on_every_rank(rank_pools, field):
    size = 3
    for message, after in rank_pools(size).run(mismatched_then_in_step, field):
        assert field in message and "rank 0" in message and "rank 1" in message, message
        assert after == [float(size)] * 6, after


def absent_peer() -> tuple[str, str, float]:
    """Rank 2 of 3 never calls: ranks 0 and 1 must time out in the check, naming rank 2 and no other."""
    comm = _direct_communicator(timeout=1.5)
    if dist.get_rank() == 2:
        time.sleep(4)
        return ("", "", 0.0)
    start = time.monotonic()
    try:
        commlab.all_reduce(torch.ones(100), group=comm, algorithm="ring")
    except CollectiveTimeoutError as error:
        return (type(error).__name__, str(error), time.monotonic() - start)
    return ("no error", "", 0.0)


@pytest.mark.timing
def test_an_absent_peer_times_out_named(rank_pools):
    results = rank_pools(3).run(absent_peer, breaks_group=True)
    for rank, (kind, message, elapsed) in enumerate(results[:2]):
        assert kind == "CollectiveTimeoutError", (kind, message)
        assert "all_reduce argument check (a direct exchange" in message, message
        assert f"rank {rank}:" in message and "no answer from rank 2 " in message, message
        assert "timeout 1.5 s" in message, message
        assert elapsed < 1.5 + 3.0, elapsed  # the deadline, plus the 1 ms looks and slack for a busy host


def test_the_mode_follows_the_host_map_and_the_environment():
    assert check_exchange_mode(HostMap.parse("2x2"), {}) == "direct"
    assert check_exchange_mode(HostMap.flat(4), {}) == "native"
    assert check_exchange_mode(HostMap.flat(4), {CHECK_EXCHANGE_ENV: "direct"}) == "direct"
    assert check_exchange_mode(HostMap.parse("2x2"), {CHECK_EXCHANGE_ENV: "native"}) == "native"
    assert check_exchange_mode(HostMap.parse("2x2"), {CHECK_EXCHANGE_ENV: "auto"}) == "direct"
    with pytest.raises(InvalidArgumentError, match=CHECK_EXCHANGE_ENV + ".*direct"):
        check_exchange_mode(HostMap.flat(2), {CHECK_EXCHANGE_ENV: "ring"})


def test_the_simulator_prices_the_check_as_the_runtime_runs_it():
    """4 ranks, one per host, on a switch with 2 ms per link (4 ms per route). Across hosts the runtime
    uses the direct exchange: one round, whose messages cross the route twice (gloo's ready notice, then
    the data): 2 x 4 ms. On one host (a host map of one host) it is gloo's ring: p-1 = 3 such rounds.
    The signatures' wire time (64 B per message at 100 Mbit/s: 5 us, at most 3 in a row on a link) is
    within rel=1e-2 of these; every fidelity must agree."""
    topology = parse_topology("switch:n=4,bandwidth=100Mb/s,latency=2ms")
    for fidelity in ("analytic", "congestion", "flow"):
        assert argument_check_time(topology, 4, fidelity, Profile()) == pytest.approx(2 * 4e-3, rel=1e-2)
        on_one_host = argument_check_time(topology, 4, fidelity, Profile(), HostMap.flat(4))
        assert on_one_host == pytest.approx(3 * 2 * 4e-3, rel=1e-2)
        assert argument_check_time(topology, 2, fidelity, Profile()) == pytest.approx(2 * 4e-3, rel=1e-2)
        assert argument_check_time(topology, 1, fidelity, Profile()) == 0.0
    checked = simulate_collective("allreduce", "ring", topology, 4096, argument_check=True)
    plain = simulate_collective("allreduce", "ring", topology, 4096)
    assert checked.time - plain.time == pytest.approx(2 * 4e-3, rel=1e-2)
