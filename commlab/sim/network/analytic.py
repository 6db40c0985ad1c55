"""The analytic fidelity: an algorithm's closed-form alpha-beta-gamma cost on the topology.

Beta comes from the bottleneck bandwidth of the ring through the ranks, alpha from the profile plus that
ring's longest route latency (a calibrated profile: its own piecewise model for the world size, plus the
route latency). O(1) in the number of ranks: no schedule is built. `link_model` is also the model that
picks pipelined algorithms' segment counts, and the one the training simulator's timer uses.
"""

from __future__ import annotations

from commlab.collectives.algorithms import get_algorithm
from commlab.collectives.array_schedule import ArraySchedule
from commlab.collectives.calibration import LinkFit, PiecewiseCostModel, Segment
from commlab.collectives.cost import CostModel
from commlab.collectives.schedule import Schedule
from commlab.sim.network.engine import SimResult
from commlab.sim.network.profile import IDEAL, Profile
from commlab.sim.network.topology import Topology


def _model(
    profile: Profile, bandwidth: float, latency: float, world_size: int, dtype: str = "float32"
) -> CostModel:
    """Alpha-beta-gamma on links of `bandwidth` and route `latency`; a calibrated profile's own piecewise
    model (plus the route latency) for `world_size` ranks and `dtype`, its per-byte cost never below the
    links' (a host calibrated on loopback does not make a slower wire faster; see `costs.message_costs`)."""
    if profile.calibration is not None:
        level = profile.calibration.level(world_size)
        wire = 1.0 / (bandwidth * profile.efficiency) if bandwidth > 0 else 0.0
        link = LinkFit(tuple(Segment(s.max_bytes, s.alpha, max(s.beta, wire)) for s in level.link.segments))
        return PiecewiseCostModel.of(
            link,
            level.gamma_of(dtype),
            latency,
            level.step,
            level.concurrency,
            level.gamma_curve(dtype),
        )
    if world_size == 1:
        return CostModel(profile.alpha, 0.0, profile.gamma)
    return CostModel(profile.alpha + latency, 1.0 / (bandwidth * profile.efficiency), profile.gamma)


def analytic_time(
    op: str,
    algorithm: str,
    world_size: int,
    nbytes: float,
    bandwidth: float,
    latency: float,
    profile: Profile = IDEAL,
    segments: int | None = None,
    dtype: str = "float32",
) -> float:
    """The closed-form time on links of `bandwidth` (bytes/s) and route `latency` (s), plus the launch."""
    run = profile.for_run(world_size, dtype)
    launch = run.launch + profile.local_copy_time(op, nbytes, world_size)
    if world_size == 1:
        return launch
    model = _model(profile, bandwidth, latency, world_size, dtype)
    return launch + get_algorithm(algorithm).cost(op, world_size, nbytes, model, segments)


def link_model(
    topology: Topology, world_size: int, profile: Profile = IDEAL, dtype: str = "float32"
) -> CostModel:
    """The alpha-beta-gamma model the analytic fidelity uses on `topology` (also picks segment counts)."""
    bandwidth, latency, _ = topology.ring_bottleneck(world_size)
    return _model(profile, bandwidth, latency, world_size, dtype)


def segments_of(schedule: Schedule | ArraySchedule) -> int:
    """The pipeline depth a registry schedule was built with (tree allreduce has two chunks per segment)."""
    entry = get_algorithm(schedule.algorithm)
    if schedule.op not in entry.pipelined_ops:
        return 1
    if schedule.algorithm == "tree" and schedule.op == "allreduce":
        return max(1, schedule.num_chunks // 2)
    return schedule.num_chunks


def simulate_analytic(
    op: str,
    algorithm: str,
    topology: Topology,
    world_size: int,
    nbytes: int,
    segments: int | None,
    dtype: str,
    profile: Profile,
) -> SimResult:
    """The analytic fidelity's result for `nbytes` (already what the op moves) on `topology`'s first
    `world_size` ranks; the result reports `segments` only for algorithms that pipeline `op`."""
    entry = get_algorithm(algorithm)
    bandwidth, latency, link = topology.ring_bottleneck(world_size)
    time = analytic_time(op, entry.name, world_size, nbytes, bandwidth, latency, profile, segments, dtype)
    reported = segments if op in entry.pipelined_ops else 1
    return SimResult(
        op, entry.name, "analytic", world_size, nbytes, dtype, time, topology,
        bottleneck_link=link, segments=reported,
    )  # fmt: skip
