"""The network engine: runs a collective's Schedule on a Topology and predicts its time.

One interface, three fidelities:
- `analytic`: the algorithm's closed-form alpha-beta-gamma cost (`Algorithm.cost`) with beta from the
  bottleneck bandwidth of the ring through the ranks and alpha from the profile plus that ring's longest
  route latency. O(1) in the number of ranks: no schedule is built.
- `congestion`: the schedule runs in rendezvous rounds (a message moves in the first round both its ends
  have reached the steps that hold it, as in the symbolic checker); every round lasts as long as its
  busiest link needs for the bytes all its messages put on it, plus the longest message latency and the
  largest reduction.
- `flow`: event-driven; every message is a flow along its route from the moment both ends have posted it;
  flows share each link max-min fairly, and rates are recomputed whenever a flow starts or ends.

In all three a message costs `profile.alpha` to post (a rank posts a step's messages one after another),
its route's latency, and its bytes over the bandwidth it gets (links x `profile.efficiency`); a step that
reduces costs `profile.gamma` per reduced byte at its end; the collective costs `profile.launch` once.

A calibrated profile (`commlab calibrate`) prices messages by size instead: a message of m bytes costs
alpha(m) to post and, alone on its route, m x beta(m) to move (the fit of the level of the ranks busy
in its rendezvous round, or the ping-pong fit for a transfer alone: `message_costs`).
A message runs at most at its `cap`, its route's bandwidth / the level's `concurrency` c, and puts
m x beta(m) x cap "work bytes" on its links, so alone it takes exactly the calibrated time, and messages
that share a link (two sends of one rank on its port of a `local` host) slow each other as real bytes
would, k of them together moving their bytes min(k, c) times faster than one after another (as in the
`auto` model). Gamma and launch come from the same level; a step reduces each message it receives at
gamma(m), the level's reduction cost for buffers of that size (in cache faster than out of it). A level's
`step` is paid once per step before its first message is posted, and taken off every message's alpha(m),
as in the `auto` model: a one-message step costs the calibrated time, a direct step of p-1 messages less
than p-1 such steps. Where a round has more busy ranks than the profile's host has cores, a message waits
for the round's messages per busy rank rather than its position in its step (`posting_alphas`).
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from commlab.collectives.algorithms import build_schedule, get_algorithm
from commlab.collectives.calibration import PiecewiseCostModel
from commlab.collectives.cost import CostModel
from commlab.collectives.schedule import OPS, Schedule
from commlab.errors import invalid
from commlab.sim.plan import Plan, compile_schedule, usable_bytes
from commlab.sim.profile import IDEAL, Profile
from commlab.sim.routing import Routes
from commlab.sim.topology import Topology, as_topology

FIDELITIES = ("analytic", "congestion", "flow")
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
_PLAN_CACHE_SIZE = 16


def bus_factor(op: str, world_size: int) -> float:
    """nccl-tests' busbw / algbw: 2(p-1)/p for allreduce, (p-1)/p for reduce-scatter/allgather, else 1."""
    p = world_size
    if op == "allreduce":
        return 2 * (p - 1) / p
    if op in ("reduce_scatter", "allgather"):
        return (p - 1) / p
    if op in OPS:
        return 1.0
    raise invalid("op", op, OPS)


def itemsize_of(dtype: str) -> int:
    """Bytes per element of a dtype name."""
    if dtype not in DTYPES:
        raise invalid("dtype", dtype, list(DTYPES))
    return DTYPES[dtype]


@dataclass(frozen=True)
class MessageCosts:
    """Per-message posting cost (s), the bytes each message puts on its links, what a step pays once
    before its first message is posted (a calibrated run: its level's `step`), and the most bytes/s each
    message may run at (None: its route's bandwidth)."""

    alpha: np.ndarray
    work: np.ndarray
    step: np.ndarray | float = 0.0
    cap: np.ndarray | None = None
    reduce: np.ndarray | None = None  # seconds each step spends reducing (None: gamma x bytes reduced)
    send_posts: np.ndarray | None = None  # alphas before each message is posted at its sender and at its
    recv_posts: np.ndarray | None = None  # receiver (None: its position in the step + 1)


def message_posts(plan: Plan, costs: MessageCosts | None) -> tuple[np.ndarray, np.ndarray]:
    """How many alphas pass before each message is posted at its sender and at its receiver: the calibrated
    run's own (`MessageCosts.send_posts`, `recv_posts`), else its position in its step + 1."""
    if costs is not None and costs.send_posts is not None and costs.recv_posts is not None:
        return costs.send_posts, costs.recv_posts
    return plan.msg_send_pos + 1.0, plan.msg_recv_pos + 1.0


@dataclass(frozen=True)
class RoutedPlan:
    """A compiled schedule on one topology: the distinct (sender, receiver) pairs and their routes."""

    plan: Plan
    msg_pair: np.ndarray  # index into the routes, per message
    routes: Routes


def routed_plan(schedule: Schedule, topology: Topology) -> RoutedPlan:
    """Compile `schedule` and route its messages on `topology` (memoized on the topology)."""
    topology.check_world_size(schedule.world_size)
    cache: OrderedDict = topology.__dict__.setdefault("_plans", OrderedDict())
    key = id(schedule)
    hit = cache.get(key)
    if hit is not None and hit[0] is schedule:
        cache.move_to_end(key)
        return hit[1]
    plan = compile_schedule(schedule)
    p = schedule.world_size
    pairs, msg_pair = _distinct(plan.msg_src * p + plan.msg_dst, p * p)
    routes = topology.routes(pairs // p, pairs % p)
    result = RoutedPlan(plan, msg_pair.astype(np.int64), routes)
    cache[key] = (schedule, result)
    if len(cache) > _PLAN_CACHE_SIZE:
        cache.popitem(last=False)
    return result


def _distinct(keys: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct keys in [0, bound) and each key's index among them (a marking pass when bound is
    small enough, numpy's unique otherwise)."""
    if bound > 1 << 26:
        distinct, inverse = np.unique(keys, return_inverse=True)
        return distinct, inverse.astype(np.int64)
    present = np.zeros(bound, bool)
    present[keys] = True
    distinct = np.flatnonzero(present)
    index = np.cumsum(present) - 1
    return distinct, index[keys]


@dataclass
class SimResult:
    """A simulated collective: its time, bandwidths, per-step timeline and per-link load."""

    op: str
    algorithm: str
    fidelity: str
    world_size: int
    nbytes: int
    dtype: str
    time: float
    topology: Topology = field(repr=False)
    routed: RoutedPlan | None = field(default=None, repr=False)
    step_start: np.ndarray | None = field(default=None, repr=False)
    step_end: np.ndarray | None = field(default=None, repr=False)
    msg_bytes: np.ndarray | None = field(default=None, repr=False)
    msg_start: np.ndarray | None = field(default=None, repr=False)  # bandwidth phase of each message
    msg_end: np.ndarray | None = field(default=None, repr=False)
    link_bytes: np.ndarray | None = field(default=None, repr=False)
    events: int = 0  # rounds (congestion) or event batches (flow) processed
    bottleneck_link: int = -1  # analytic: the link that set the bandwidth
    segments: int = 1

    @property
    def algbw(self) -> float:
        """nbytes / time (bytes/s), as nccl-tests defines it."""
        return self.nbytes / self.time if self.time > 0 else math.inf

    @property
    def busbw(self) -> float:
        """algbw x the op's bus factor (bytes/s), comparable across world sizes."""
        return self.algbw * bus_factor(self.op, self.world_size)

    def link_utilization(self) -> np.ndarray | None:
        """Per link: bytes carried / (bandwidth x total time)."""
        if self.link_bytes is None or self.time <= 0:
            return None
        return self.link_bytes / (self.topology.compiled.bandwidth * self.time)

    def busiest_link(self) -> tuple[tuple[object, object] | None, float | None]:
        """The most utilized link (from, to) and its utilization; analytic: the bottleneck, no utilization."""
        util = self.link_utilization()
        if util is None or len(util) == 0:
            if self.bottleneck_link >= 0:
                return self.topology.link_label(self.bottleneck_link), None
            return None, None
        link = int(np.argmax(util))
        return self.topology.link_label(link), float(util[link])

    def to_dict(self) -> dict:
        """A JSON-ready summary (no per-step arrays)."""
        link, util = self.busiest_link()
        return {
            "op": self.op,
            "algorithm": self.algorithm,
            "fidelity": self.fidelity,
            "world_size": self.world_size,
            "nbytes": self.nbytes,
            "dtype": self.dtype,
            "segments": self.segments,
            "time_us": self.time * 1e6,
            "algbw_GBps": self.algbw / 1e9,
            "busbw_GBps": self.busbw / 1e9,
            "busiest_link": None if link is None else [str(link[0]), str(link[1])],
            "busiest_link_utilization": util,
            "events": self.events,
        }


def _model(
    profile: Profile, bandwidth: float, latency: float, world_size: int, dtype: str = "float32"
) -> CostModel:
    """Alpha-beta-gamma on links of `bandwidth` and route `latency`; a calibrated profile's own piecewise
    model (plus the route latency) for `world_size` ranks and `dtype`."""
    if profile.calibration is not None:
        level = profile.calibration.level(world_size)
        return PiecewiseCostModel.of(
            level.link,
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


def message_costs(
    profile: Profile, routed: RoutedPlan, msg_bytes: np.ndarray, world_size: int, dtype: str = "float32"
) -> MessageCosts | None:
    """Per-message alpha, link work and per-step cost under a calibrated profile (None for a plain one),
    priced by the same model as `auto` (a one-message step costs the fitted alpha(m) + m beta(m)).

    Each message is priced by how busy the host is in its rendezvous round (`busy_ranks`): a round of
    b >= 2 ranks by the level of b ranks, a round with a single transfer by the ping-pong fit. Why: the
    fold steps of halving-doubling on 3 ranks move whole buffers between two ranks while the third idles,
    and priced at the 3-ranks-busy level they came out up to 2.6x too slow (gloo)."""
    calibration = profile.calibration
    if calibration is None:
        return None
    busy, share = round_load(routed.plan)
    alpha, beta, step = np.zeros(len(msg_bytes)), np.zeros(len(msg_bytes)), np.zeros(len(msg_bytes))
    concurrency = np.ones(len(msg_bytes))
    for count in np.unique(busy):
        if count == 1 and calibration.pingpong is not None:
            model = PiecewiseCostModel.of(calibration.pingpong, 0.0)
        else:
            level = calibration.level(min(max(int(count), 2), world_size))
            model = PiecewiseCostModel.of(level.link, 0.0, step=level.step, concurrency=level.concurrency)
        mine = busy == count
        bounds = np.array([s.max_bytes for s in model.segments])
        index = np.minimum(np.searchsorted(bounds, msg_bytes[mine], side="left"), len(model.segments) - 1)
        alpha[mine] = np.array([s.alpha for s in model.segments])[index]
        beta[mine] = np.array([s.beta for s in model.segments])[index]
        step[mine] = model.step
        concurrency[mine] = model.concurrency
    cap = routed.routes.bandwidth[routed.msg_pair] * profile.efficiency / concurrency
    reduce = reduce_seconds(profile, routed.plan, msg_bytes, world_size, dtype)
    cores = calibration.machine.get("logical_cores")
    send_posts, recv_posts = posting_alphas(routed.plan, busy, share, cores if isinstance(cores, int) else 0)
    return MessageCosts(alpha, msg_bytes * beta * cap, step, cap, reduce, send_posts, recv_posts)


def posting_alphas(
    plan: Plan, busy: np.ndarray, share: np.ndarray, cores: int
) -> tuple[np.ndarray, np.ndarray]:
    """How many alphas pass before each message is posted at its sender and at its receiver: its position
    in its step + 1; but in a round of more busy ranks than the host has `cores` (0: unknown), the ranks
    take turns on the cores, so a message waits for the round's messages per busy rank (`share`), not for
    its own rank's count. Why: on 2 cores, tree allreduce on 4 ranks (one rank receiving two messages
    where the others handle one) ran 1.5-1.8x faster at 64 KiB-1 MiB than priced by position."""
    send, recv = plan.msg_send_pos + 1.0, plan.msg_recv_pos + 1.0
    if cores <= 0:
        return send, recv
    crowded = busy > cores
    limit = np.where(crowded, np.maximum(share, 1.0), np.inf)
    return np.minimum(send, limit), np.minimum(recv, limit)


def reduce_seconds(
    profile: Profile, plan: Plan, msg_bytes: np.ndarray, world_size: int, dtype: str
) -> np.ndarray | None:
    """Seconds each step spends reducing under a calibrated profile with reduction costs by size: every
    message it reduces at gamma(its size); None without such costs (then gamma x bytes reduced)."""
    level = profile.calibration.level(world_size) if profile.calibration is not None else None
    curve = None if level is None else level.gamma_curve(dtype)
    if curve is None:
        return None
    sizes = msg_bytes[plan.msg_reduce]
    seconds = sizes * curve.at_sizes(sizes)
    return np.bincount(plan.msg_dst_step[plan.msg_reduce], weights=seconds, minlength=plan.num_steps)


def reduce_time(
    plan: Plan, msg_bytes: np.ndarray, profile: Profile, costs: MessageCosts | None
) -> np.ndarray:
    """Seconds each step spends reducing: the calibrated per-step times, else gamma x bytes reduced."""
    if costs is not None and costs.reduce is not None:
        return costs.reduce
    reduced = np.bincount(
        plan.msg_dst_step[plan.msg_reduce], weights=msg_bytes[plan.msg_reduce], minlength=plan.num_steps
    )
    return profile.gamma * reduced


def busy_ranks(plan: Plan) -> np.ndarray:
    """For every message, the ranks that send or receive in its rendezvous round; 1 where the round holds
    transfers in a single direction between one pair (a transfer alone on the host)."""
    return round_load(plan)[0]


def round_load(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """For every message, `busy_ranks` and the round's messages per rank taking part in it."""
    from commlab.sim.congestion import rendezvous_rounds  # congestion imports this module

    msg_round, _, _ = rendezvous_rounds(plan)
    busy = np.zeros(len(msg_round), np.int64)
    share = np.zeros(len(msg_round))
    order = np.argsort(msg_round, kind="stable")
    bounds = np.searchsorted(msg_round[order], np.arange(int(msg_round.max(initial=-1)) + 2))
    for lo, hi in itertools.pairwise(bounds):
        msgs = order[lo:hi]
        if len(msgs) == 0:
            continue
        src, dst = plan.msg_src[msgs], plan.msg_dst[msgs]
        ranks = len(np.unique(np.concatenate([src, dst])))
        one_way = len(np.unique(src)) == 1 and len(np.unique(dst)) == 1
        busy[msgs] = 1 if one_way else ranks
        share[msgs] = len(msgs) / ranks
    return busy, share


def _check_fidelity(fidelity: str) -> None:
    if fidelity not in FIDELITIES:
        raise invalid("fidelity", fidelity, FIDELITIES)


def _segments_of(schedule: Schedule) -> int:
    """The pipeline depth a registry schedule was built with (tree allreduce has two chunks per segment)."""
    entry = get_algorithm(schedule.algorithm)
    if schedule.op not in entry.pipelined_ops:
        return 1
    if schedule.algorithm == "tree" and schedule.op == "allreduce":
        return max(1, schedule.num_chunks // 2)
    return schedule.num_chunks


def simulate(
    schedule: Schedule,
    topology: Topology | nx.DiGraph,
    nbytes: int,
    *,
    dtype: str = "float32",
    fidelity: str = "flow",
    profile: Profile = IDEAL,
) -> SimResult:
    """Run `schedule` on `topology` for a buffer of `nbytes` (per rank; the total for reduce-scatter and
    allgather) of `dtype`, at `fidelity`; ranks 0..p-1 sit on the topology's first p placed endpoints."""
    from commlab.sim.congestion import run_congestion
    from commlab.sim.flow import run_flow

    _check_fidelity(fidelity)
    topology = as_topology(topology)
    if not isinstance(schedule, Schedule):
        raise invalid("schedule", type(schedule).__name__, "a commlab.collectives.schedule.Schedule")
    if not isinstance(profile, Profile):
        raise invalid("profile", type(profile).__name__, "a commlab.sim.profile.Profile")
    itemsize = itemsize_of(dtype)
    nbytes = usable_bytes(schedule, int(nbytes), itemsize)
    p = schedule.world_size
    topology.check_world_size(p)
    if fidelity == "analytic":
        bandwidth, latency, link = topology.ring_bottleneck(p)
        segments = _segments_of(schedule)
        time = analytic_time(
            schedule.op, schedule.algorithm, p, nbytes, bandwidth, latency, profile, segments, dtype
        )
        return SimResult(
            schedule.op, schedule.algorithm, fidelity, p, nbytes, dtype, time, topology,
            bottleneck_link=link, segments=segments,
        )  # fmt: skip
    routed = routed_plan(schedule, topology)
    plan = routed.plan
    msg_bytes = plan.message_bytes(plan.chunk_bytes(nbytes, itemsize)).astype(float)
    run = run_congestion if fidelity == "congestion" else run_flow
    costs = message_costs(profile, routed, msg_bytes, p, dtype)
    copies = profile.local_copy_time(schedule.op, nbytes, p)
    profile = profile.for_run(p, dtype)
    if copies:  # the API's copies around the schedule count like launch: once, before the steps
        profile = Profile(profile.alpha, profile.gamma, profile.launch + copies, profile.efficiency,
                          profile.name, profile.calibration)  # fmt: skip
    timing = run(routed, msg_bytes, topology, profile, costs=costs)
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
        segments=_segments_of(schedule) if schedule.algorithm in _registry_names() else 1,
    )


def _registry_names() -> tuple[str, ...]:
    from commlab.collectives.algorithms import ALGORITHMS

    return tuple(ALGORITHMS)


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
) -> SimResult:
    """Simulate `algorithm`'s `op` on the topology's ranks (all of them unless `world_size` says fewer).

    Rooted ops default to root 0. Pipelined algorithms take `segments`, or by default the count their cost
    formula finds best under the analytic link model of this topology.
    """
    _check_fidelity(fidelity)
    topology = as_topology(topology)
    p = topology.num_ranks if world_size is None else world_size
    topology.check_world_size(p)
    entry = get_algorithm(algorithm)
    if op in ("broadcast", "reduce") and root is None:
        root = 0
    itemsize = itemsize_of(dtype)
    if segments is None:
        segments = entry.best_segments(op, p, nbytes, link_model(topology, p, profile, dtype))
    if fidelity == "analytic":
        entry.cost(op, p, nbytes, link_model(topology, p, profile, dtype), segments)  # validates op, segments
        numel = int(nbytes) // itemsize
        if op in ("reduce_scatter", "allgather"):
            numel -= numel % p
        bandwidth, latency, link = topology.ring_bottleneck(p)
        nb = numel * itemsize
        time = analytic_time(op, entry.name, p, nb, bandwidth, latency, profile, segments, dtype)
        seg = segments if op in entry.pipelined_ops else 1
        return SimResult(
            op, entry.name, fidelity, p, nb, dtype, time, topology, bottleneck_link=link, segments=seg
        )
    schedule = build_schedule(op, entry.name, p, root, segments)
    return simulate(schedule, topology, nbytes, dtype=dtype, fidelity=fidelity, profile=profile)


def link_bytes(routed: RoutedPlan, msg_bytes: np.ndarray, num_links: int) -> np.ndarray:
    """Bytes every link carries over the whole collective."""
    routes = routed.routes
    pair_bytes = np.bincount(routed.msg_pair, weights=msg_bytes, minlength=len(routes.ptr) - 1)
    owner = np.repeat(np.arange(len(pair_bytes)), routes.hops)
    return np.bincount(routes.links, weights=pair_bytes[owner], minlength=num_links)


@dataclass(frozen=True)
class Timing:
    """What an engine returns: total time, each step's start and end, each message's bandwidth phase."""

    time: float
    step_start: np.ndarray
    step_end: np.ndarray
    msg_start: np.ndarray
    msg_end: np.ndarray
    events: int
