"""What every network engine shares: the routed schedule it runs, what a message costs, what it returns.

A schedule-running engine (`congestion.py`, `flow.py`: an `Engine`) takes a schedule compiled to arrays
(`compiled.py`) and routed on a topology (`routed_plan`), each message's bytes and, under a calibrated
profile, its per-message costs (`costs.py`: `MessageCosts`), and returns a `Timing`; `collective.py`
turns that into the `SimResult` every fidelity reports (the analytic fidelity, `analytic.py`, builds
no schedule and returns a `SimResult` directly). `rendezvous_rounds` is the symbolic checker's
rule (a message moves in the first round both its ends have reached the steps that hold it), used by
the congestion engine, the flow engine's fast path and the calibrated pricing alike.

In every engine a message costs `profile.alpha` to post (a rank posts a step's messages one after
another), its route's latency, and its bytes over the bandwidth it gets (links x `profile.efficiency`);
a step that reduces costs `profile.gamma` per reduced byte at its end; the collective costs
`profile.launch` once.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from commlab.collectives.array_schedule import ArraySchedule
from commlab.collectives.schedule import Schedule
from commlab.errors import ScheduleError
from commlab.shared.ops import bus_factor
from commlab.sim.network.compiled import CompiledSchedule, compile_schedule
from commlab.sim.network.profile import Profile
from commlab.sim.network.routing import Routes, _expand, unique_ints
from commlab.sim.network.topology import Topology

_PLAN_CACHE_SIZE = 16


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


def message_posts(plan: CompiledSchedule, costs: MessageCosts | None) -> tuple[np.ndarray, np.ndarray]:
    """How many alphas pass before each message is posted at its sender and at its receiver: the calibrated
    run's own (`MessageCosts.send_posts`, `recv_posts`), else its position in its step + 1."""
    if costs is not None and costs.send_posts is not None and costs.recv_posts is not None:
        return costs.send_posts, costs.recv_posts
    return plan.msg_send_pos + 1.0, plan.msg_recv_pos + 1.0


@dataclass(frozen=True)
class RoutedPlan:
    """A compiled schedule on one topology: the distinct (sender, receiver) pairs and their routes."""

    plan: CompiledSchedule
    msg_pair: np.ndarray  # index into the routes, per message
    routes: Routes


def routed_plan(schedule: Schedule | ArraySchedule, topology: Topology) -> RoutedPlan:
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
    small next to the number of keys, numpy's unique otherwise: the pass costs O(bound))."""
    if bound > max(1 << 20, 4 * len(keys)):
        distinct, inverse = np.unique(keys, return_inverse=True)
        return distinct, inverse.astype(np.int64)
    present = np.zeros(bound, bool)
    present[keys] = True
    distinct = np.flatnonzero(present)
    index = np.cumsum(present) - 1
    return distinct, index[keys]


@dataclass(frozen=True)
class Timing:
    """What an engine returns: total time, each step's start and end, each message's bandwidth phase."""

    time: float
    step_start: np.ndarray
    step_end: np.ndarray
    msg_start: np.ndarray
    msg_end: np.ndarray
    events: int


class Engine(Protocol):
    """A schedule-running fidelity: times a routed schedule whose messages carry `msg_bytes`."""

    def __call__(
        self,
        routed: RoutedPlan,
        msg_bytes: np.ndarray,
        topology: Topology,
        profile: Profile,
        *,
        costs: MessageCosts | None = None,
    ) -> Timing: ...


def link_bytes(routed: RoutedPlan, msg_bytes: np.ndarray, num_links: int) -> np.ndarray:
    """Bytes every link carries over the whole collective."""
    routes = routed.routes
    pair_bytes = np.bincount(routed.msg_pair, weights=msg_bytes, minlength=len(routes.ptr) - 1)
    owner = np.repeat(np.arange(len(pair_bytes)), routes.hops)
    return np.bincount(routes.links, weights=pair_bytes[owner], minlength=num_links)


def reduce_time(
    plan: CompiledSchedule, msg_bytes: np.ndarray, profile: Profile, costs: MessageCosts | None
) -> np.ndarray:
    """Seconds each step spends reducing: the calibrated per-step times, else gamma x bytes reduced."""
    if costs is not None and costs.reduce is not None:
        return costs.reduce
    reduced = np.bincount(
        plan.msg_dst_step[plan.msg_reduce], weights=msg_bytes[plan.msg_reduce], minlength=plan.num_steps
    )
    return profile.gamma * reduced


_FIXPOINT_SWEEPS = 16


def rendezvous_rounds(plan: CompiledSchedule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(round of each message, start round of each step, end round of each step).

    A message moves in round max(start of its two steps); a step ends in the last round one of its
    messages moves (its start round if it has none), and the rank's next step starts one round later.
    These rounds are the least solution of those equations: `_rounds_by_sweeps` finds it in a few
    whole-array sweeps when dependencies run mostly along ranks (a ring: one sweep), else the round by
    round walk below computes it (and reports a deadlock).
    """
    swept = _rounds_by_sweeps(plan)
    if swept is not None:
        return swept
    return _rounds_by_walk(plan)


def _rounds_by_sweeps(plan: CompiledSchedule) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The rounds by monotone iteration from the lower bound start = index of the step in its rank: each
    sweep takes every message's round from the current starts, then recomputes every rank's starts in
    one segmented running maximum (start[i] = i + max(0, max over j < i of end[j] - j)); stops when
    nothing changes, or gives up (None) after `_FIXPOINT_SWEEPS` sweeps."""
    steps = plan.num_steps
    if steps == 0:
        return None
    index = plan.step_index
    rank = plan.step_rank
    first = np.zeros(steps, bool)
    first[plan.step_ptr[:-1][np.diff(plan.step_ptr) > 0]] = True
    has = np.diff(plan.step_msg_ptr) > 0
    busy = np.flatnonzero(has)
    offset = rank * (2 * steps + 2)  # separates ranks in one running maximum (every value is < 2 steps)
    start = index.copy()
    for _ in range(_FIXPOINT_SWEEPS):
        msg_round = np.maximum(start[plan.msg_src_step], start[plan.msg_dst_step])
        end = start.copy()
        if len(busy):
            latest = np.maximum.reduceat(msg_round[plan.step_msgs], plan.step_msg_ptr[:-1][has])
            end[busy] = np.maximum(latest, start[busy])
        carried = np.empty(steps, np.int64)  # end[j] - j of the step before, 0 at a rank's first step
        carried[1:] = end[:-1] - index[:-1]
        carried[first] = 0
        lifted = np.maximum.accumulate(np.maximum(carried, 0) + offset) - offset
        new_start = index + lifted
        if np.array_equal(new_start, start):
            return msg_round, start, end
        if new_start.max() > 2 * steps:  # no schedule needs more rounds than steps: a deadlock
            return None
        start = new_start
    return None


def _rounds_by_walk(plan: CompiledSchedule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`rendezvous_rounds` round by round: the steps current in a round move their matched messages."""
    steps, messages = plan.num_steps, plan.num_messages
    total = np.diff(plan.step_msg_ptr)
    left = total.copy()
    ends = np.zeros(messages, np.int8)
    msg_round = np.full(messages, -1, np.int64)
    start = np.full(steps, -1, np.int64)
    end = np.full(steps, -1, np.int64)
    following = plan.step_next()
    counts = np.diff(plan.step_ptr)
    current = plan.step_ptr[:-1][counts > 0]
    t = 0
    while len(current):
        start[current] = t
        _, pos = _expand(plan.step_msg_ptr, current)
        msgs = plan.step_msgs[pos]
        np.add.at(ends, msgs, 1)
        moved = unique_ints(msgs[ends[msgs] == 2])
        msg_round[moved] = t
        touched = np.concatenate([plan.msg_src_step[moved], plan.msg_dst_step[moved]])
        np.subtract.at(left, touched, 1)
        touched = unique_ints(np.concatenate([touched, current[total[current] == 0]]))
        done = touched[left[touched] == 0]
        end[done] = t
        nxt = following[done]
        current = nxt[nxt >= 0]
        t += 1
    if np.any(end < 0):
        stuck = int(np.flatnonzero(end < 0)[0])
        rank = int(plan.step_rank[stuck])
        raise ScheduleError(
            f"deadlock: rank {rank} never finishes its step {stuck - int(plan.step_ptr[rank])} "
            "(a message it waits for is never posted by its peer)"
        )
    return msg_round, start, end


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
