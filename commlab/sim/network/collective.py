"""Simulate a collective: run its Schedule on a Topology at one of three fidelities and predict its time.

One interface, three fidelities, one engine module each, in the `FIDELITY_TABLE`:
- `analytic` (`analytic.py`): the algorithm's closed-form alpha-beta-gamma cost (`Algorithm.cost`) with
  beta from the bottleneck bandwidth of the ring through the ranks and alpha from the profile plus that
  ring's longest route latency. O(1) in the number of ranks: no schedule is built.
- `congestion` (`congestion.py`): the schedule runs in rendezvous rounds (a message moves in the first
  round both its ends have reached the steps that hold it, as in the symbolic checker); every round
  lasts as long as its busiest link needs for the bytes all its messages put on it, plus the longest
  message latency and the largest reduction.
- `flow` (`flow.py`): event-driven; every message is a flow along its route from the moment both ends
  have posted it; flows share each link max-min fairly, and rates are recomputed whenever a flow starts
  or ends.

What a message costs is in `engine.py` (plain profiles) and `costs.py` (calibrated profiles).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import networkx as nx
import numpy as np

from commlab.collectives.algorithms import ALGORITHMS, get_algorithm
from commlab.collectives.algorithms.vectorized import build_array_schedule
from commlab.collectives.array_schedule import ArraySchedule
from commlab.collectives.hosts import HostMap
from commlab.collectives.schedule import Schedule
from commlab.errors import invalid
from commlab.shared.ops import BLOCKED_OPS, ROOTED_OPS, SIGNATURE_INTS
from commlab.sim.network.analytic import link_model, segments_of, simulate_analytic
from commlab.sim.network.compiled import usable_bytes
from commlab.sim.network.congestion import run_congestion
from commlab.sim.network.costs import message_costs
from commlab.sim.network.engine import Engine, SimResult, link_bytes, routed_plan
from commlab.sim.network.flow import run_flow
from commlab.sim.network.profile import IDEAL, Profile
from commlab.sim.network.topology import Topology, as_topology

DTYPES = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int8": 1,
    "uint8": 1,
}


def itemsize_of(dtype: str) -> int:
    """Bytes per element of a dtype name."""
    if dtype not in DTYPES:
        raise invalid("dtype", dtype, list(DTYPES))
    return DTYPES[dtype]


def _simulate_closed_form(
    schedule: Schedule | ArraySchedule, topology: Topology, nbytes: int, dtype: str, profile: Profile
) -> SimResult:
    """The analytic fidelity for a schedule: its algorithm's formula at the depth it was built with."""
    segments = segments_of(schedule)
    return simulate_analytic(
        schedule.op, schedule.algorithm, topology, schedule.world_size, nbytes, segments, dtype, profile
    )


def _simulate_routed(
    engine: Engine,
    fidelity: str,
    schedule: Schedule | ArraySchedule,
    topology: Topology,
    nbytes: int,
    dtype: str,
    profile: Profile,
) -> SimResult:
    """A schedule-running fidelity: compile and route the schedule, price its messages, run `engine`."""
    p = schedule.world_size
    routed = routed_plan(schedule, topology)
    plan = routed.plan
    msg_bytes = plan.message_bytes(plan.chunk_bytes(nbytes, itemsize_of(dtype))).astype(float)
    between_hosts = None
    if profile.calibration is not None:  # only calibrated messages are priced by where they go
        host = np.empty(p, np.int64)
        for h, ranks in enumerate(topology.host_map(p).hosts):
            host[list(ranks)] = h
        between_hosts = host[plan.msg_src] != host[plan.msg_dst]
    costs = message_costs(profile, routed, msg_bytes, p, dtype, between_hosts)
    copies = profile.local_copy_time(schedule.op, nbytes, p)
    profile = profile.for_run(p, dtype)
    if copies:  # the API's copies around the schedule count like launch: once, before the steps
        profile = Profile(profile.alpha, profile.gamma, profile.launch + copies, profile.efficiency,
                          profile.name, profile.calibration)  # fmt: skip
    timing = engine(routed, msg_bytes, topology, profile, costs=costs)
    return SimResult(
        schedule.op,
        schedule.algorithm,
        fidelity,
        p,
        nbytes,
        dtype,
        profile.launch + timing.time,
        topology,
        routed,
        timing.step_start + profile.launch,
        timing.step_end + profile.launch,
        msg_bytes,
        timing.msg_start + profile.launch,
        timing.msg_end + profile.launch,
        link_bytes(routed, msg_bytes, topology.compiled.num_links),
        timing.events,
        segments=segments_of(schedule) if schedule.algorithm in ALGORITHMS else 1,
    )


# fidelity -> how a schedule is simulated at it: (schedule, topology, nbytes, dtype, profile) -> SimResult
FIDELITY_TABLE: dict[str, Callable[[Schedule | ArraySchedule, Topology, int, str, Profile], SimResult]] = {
    "analytic": _simulate_closed_form,
    "congestion": partial(_simulate_routed, run_congestion, "congestion"),
    "flow": partial(_simulate_routed, run_flow, "flow"),
}
FIDELITIES = tuple(FIDELITY_TABLE)


def _check_fidelity(fidelity: str) -> None:
    if fidelity not in FIDELITY_TABLE:
        raise invalid("fidelity", fidelity, FIDELITIES)


def simulate(
    schedule: Schedule | ArraySchedule,
    topology: Topology | nx.DiGraph,
    nbytes: int,
    *,
    dtype: str = "float32",
    fidelity: str = "flow",
    profile: Profile = IDEAL,
) -> SimResult:
    """Run `schedule` on `topology` for a buffer of `nbytes` (per rank; the total for reduce-scatter and
    allgather) of `dtype`, at `fidelity`; ranks 0..p-1 sit on the topology's first p placed endpoints."""
    _check_fidelity(fidelity)
    topology = as_topology(topology)
    if not isinstance(schedule, Schedule | ArraySchedule):
        raise invalid("schedule", type(schedule).__name__, "a commlab Schedule or ArraySchedule")
    if not isinstance(profile, Profile):
        raise invalid("profile", type(profile).__name__, "a commlab.sim.network.profile.Profile")
    nbytes = usable_bytes(schedule, int(nbytes), itemsize_of(dtype))
    topology.check_world_size(schedule.world_size)
    return FIDELITY_TABLE[fidelity](schedule, topology, nbytes, dtype, profile)


def simulate_collective(
    op: str,
    algorithm: str,
    topology: Topology | nx.DiGraph,
    nbytes: int,
    *,
    world_size: int | None = None,
    root: int | None = None,
    segments: int | None = None,
    dtype: str = "float32",
    fidelity: str = "flow",
    profile: Profile = IDEAL,
    hosts: HostMap | None = None,
    argument_check: bool = False,
) -> SimResult:
    """Simulate `algorithm`'s `op` on the topology's ranks (all of them unless `world_size` says fewer).

    Rooted ops default to root 0. Pipelined algorithms take `segments`, or by default the count their cost
    formula finds best under the analytic link model of this topology. The analytic fidelity builds no
    schedule: the formula prices the op directly. Topology-aware algorithms build from `hosts`, by
    default the topology's own host map (`Topology.host_map`). `argument_check`: add what a gloo call with
    its argument check on (the runtime's default) spends before its first step, `argument_check_time`;
    a calibrated profile is measured with the check off, and on MPI and shared memory the check rides the
    first step's messages instead, so it is off by default.
    """
    _check_fidelity(fidelity)
    topology = as_topology(topology)
    p = topology.num_ranks if world_size is None else world_size
    topology.check_world_size(p)
    entry = get_algorithm(algorithm)
    if op in ROOTED_OPS and root is None:
        root = 0
    itemsize = itemsize_of(dtype)
    if entry.topology_aware and hosts is None:
        hosts = topology.host_map(p)
    if segments is None:
        segments = entry.best_segments(op, p, nbytes, link_model(topology, p, profile, dtype), hosts)
    if fidelity == "analytic":
        entry.cost(op, p, nbytes, link_model(topology, p, profile, dtype), segments)  # validates op, segments
        numel = int(nbytes) // itemsize
        if op in BLOCKED_OPS:
            numel -= numel % p
        result = simulate_analytic(op, entry.name, topology, p, numel * itemsize, segments, dtype, profile)
    else:
        schedule = build_array_schedule(op, entry.name, p, root, segments, hosts)  # rows where regular
        result = simulate(schedule, topology, nbytes, dtype=dtype, fidelity=fidelity, profile=profile)
    if not argument_check:
        return result
    check = argument_check_time(topology, p, fidelity, profile, hosts)
    return dataclasses.replace(
        result,
        time=result.time + check,
        step_start=None if result.step_start is None else result.step_start + check,
        step_end=None if result.step_end is None else result.step_end + check,
        msg_start=None if result.msg_start is None else result.msg_start + check,
        msg_end=None if result.msg_end is None else result.msg_end + check,
    )


def argument_check_time(
    topology: Topology, world_size: int, fidelity: str, profile: Profile, hosts: HostMap | None = None
) -> float:
    """Seconds gloo's argument check takes before a call's first step, as the runtime does it
    (`check_exchange.check_exchange_mode`): on one host gloo's native allgather of every rank's signature
    (`SIGNATURE_INTS` int64), a ring of p-1 steps; across hosts (`hosts`, default the topology's host
    map) the direct exchange, one round in which every rank sends its signature to every peer at once.

    Each message crosses its route twice, as gloo's point-to-point does (the receiver's ready notice, then
    the data: a 4 KiB exchange measured 10.6 ms on 2 ms links, 2.65 one-way trips of 4 ms), once per
    round: p-1 rounds for the ring, one for the direct exchange (measured on 4 hosts with 2 ms links:
    +28 ms per call for the ring, +10 ms direct, `benchmarks/check_cost.py`). The closed form (analytic)
    prices the direct allgather's p-1 messages one after another, so one round is its time over p-1.

    Under a calibrated profile the direct exchange also pays the host's software, priced like any
    message of a schedule (`costs.message_costs`): its 2(p-1) operations are posted from Python through
    the same transport and executor wait as a schedule's, one step of p-1 messages each way, which is
    what the calibration's `fan p` measures. Measured on the emulated cluster (1 Gbit/s, no delay; the
    same ring and halving-doubling calls with the check on and off, 256 KiB - 2 MiB, two launches each):
    the check cost 1.8-3.5 ms per call on 4 hosts x 1 rank and 1.0-2.1 ms on 2 hosts x 2 ranks, where the
    wire alone prices it at under 10 us; priced so, 2.7 and 1.8 ms. Where the profile's fits were
    measured across the wire itself (one rank per host, `levels_include_wire`) they already hold the ready
    notice's trip (a ring step on 2 ms links measured 8.7-8.9 ms, two trips of 4 ms and the software), so
    it is not added again. The native ring on one host runs in gloo's C++ and pays none of commlab's
    per-step software: there only the wire (and its notices) counts, as under the closed form (analytic
    fidelity), which prices the wire alone."""
    if world_size < 2:
        return 0.0
    if hosts is None:
        hosts = topology.host_map(world_size)
    direct = hosts.num_hosts > 1
    rounds = 1 if direct else world_size - 1
    schedule = build_array_schedule("allgather", "direct" if direct else "ring", world_size, None, 1, None)
    nbytes = world_size * SIGNATURE_INTS * 8
    calibrated = direct and fidelity != "analytic" and profile.calibration is not None
    priced = profile if calibrated else Profile(efficiency=profile.efficiency)
    exchange = simulate(schedule, topology, nbytes, dtype="float64", fidelity=fidelity, profile=priced)
    if exchange.routed is None:  # the closed form: p-1 messages in a row, each crossing twice
        return 2 * exchange.time * rounds / (world_size - 1)
    notice = float(exchange.routed.routes.latency[exchange.routed.msg_pair].max(initial=0.0))
    if not calibrated:
        return exchange.time + rounds * notice  # each round waits for a ready notice first
    # the call's launch and the API's copies are its own, paid once: only the exchange's steps count here
    own = profile.for_run(world_size, "float64").launch
    own += profile.local_copy_time("allgather", nbytes, world_size)
    in_fits = profile.calibration.levels_include_wire
    return exchange.time - own + (0.0 if in_fits else notice)
