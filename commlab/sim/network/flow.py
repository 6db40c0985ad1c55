"""Flow fidelity: an event-driven run where messages are flows sharing links max-min fairly.

Events, processed in time order and in batches of (nearly) equal times:
- a step starts: its messages whose other end has started too become ready; each is activated once both
  ends have posted it (the k-th message of a step is posted k x alpha after the step starts);
- a flow activates: it takes its route; alone on its links it runs at its route's bottleneck bandwidth
  (or its cap under a calibrated profile, `MessageCosts.cap`), else the rates of all flows on shared
  links are recomputed max-min fairly, each cap acting as a link of its own flow;
- a flow's last byte leaves: the links it used are freed (rates of flows that shared them recomputed),
  and the message arrives one route latency later;
- a message arrives: the steps at both ends count it; a step whose messages all arrived ends after its
  reduction (gamma per reduced byte) and the rank starts its next step.
Batches are vectorized with numpy; a flow keeps its predicted end time until its rate changes, so only
flows on contended links are ever revisited.

Fast path: when no two flows ever use one link at the same time, every flow runs at its route's bandwidth
and the event order is just the rendezvous-round order, so the whole timeline is computed round by round
(vectorized, as many iterations as rounds). `run_flow` computes that timeline, then checks it: if two
routes share a link and their flows overlap in time there, it runs the event-driven engine instead. The
result is the same either way; only the cost differs.
"""

from __future__ import annotations

import heapq
import itertools

import numpy as np

from commlab.errors import ScheduleError
from commlab.sim.network.engine import (
    MessageCosts,
    RoutedPlan,
    Timing,
    message_posts,
    reduce_time,
    rendezvous_rounds,
)
from commlab.sim.network.maxmin import max_min_rates
from commlab.sim.network.profile import Profile
from commlab.sim.network.routing import _expand, unique_ints
from commlab.sim.network.topology import Topology

_DONE, _ARRIVE, _START, _ACTIVATE = 0, 1, 2, 3
_MERGE = 1e-12  # events closer than this (relative) are one batch


class _FlowRun:
    """State of one flow-level run (arrays indexed by message or step id)."""

    def __init__(
        self,
        routed: RoutedPlan,
        msg_bytes: np.ndarray,
        topology: Topology,
        profile: Profile,
        costs: MessageCosts | None = None,
    ):
        plan, routes = routed.plan, routed.routes
        self.plan, self.routes, self.pair = plan, routes, routed.msg_pair
        self.bytes = msg_bytes if costs is None else costs.work  # what each flow puts on its links
        alpha = profile.alpha if costs is None else costs.alpha
        self.alpha = np.broadcast_to(np.asarray(alpha, float), (plan.num_messages,))
        step = 0.0 if costs is None else costs.step  # paid once per step, before its first message
        self.step = np.broadcast_to(np.asarray(step, float), (plan.num_messages,))
        self.send_posts, self.recv_posts = message_posts(plan, costs)
        self.capacity = topology.compiled.bandwidth * profile.efficiency
        self.cap = None if costs is None else costs.cap  # per-flow rate limit (calibrated concurrency)
        self.solo = solo_rates(routed, profile, costs)
        self.latency = routes.latency[self.pair]
        m, s = plan.num_messages, plan.num_steps
        self.left = np.diff(plan.step_msg_ptr).copy()
        self.following = plan.step_next()
        self.reduce_s = reduce_time(plan, msg_bytes, profile, costs)
        self.step_start = np.full(s, np.nan)
        self.step_end = np.full(s, np.nan)
        self.ends = np.zeros(m, np.int8)
        self.msg_start = np.full(m, np.nan)
        self.msg_end = np.full(m, np.nan)
        self.rate = np.zeros(m)
        self.remaining = np.zeros(m)
        self.updated = np.zeros(m)
        self.finish = np.full(m, np.inf)
        self.is_active = np.zeros(m, bool)
        self.active = np.zeros(0, np.int64)
        self.link_users = np.zeros(len(self.capacity), np.int64)
        self.heap: list = []
        self.counter = itertools.count()
        self.batches = 0
        self.events = 0

    # -- event queue
    def push(self, times: np.ndarray, ids: np.ndarray, kind: int) -> np.ndarray:
        """Queue `ids` at `times`, one entry per group of nearly equal times; returns the times used."""
        if len(ids) == 0:
            return times
        order = np.argsort(times, kind="stable")
        t = times[order]
        cut = np.flatnonzero(np.diff(t) > _MERGE * np.maximum(t[1:], 1e-9)) + 1
        bounds = np.concatenate([[0], cut, [len(t)]])
        snapped = np.empty_like(t)
        for a, b in itertools.pairwise(bounds):
            when = float(t[b - 1])
            snapped[a:b] = when
            heapq.heappush(self.heap, (when, next(self.counter), kind, ids[order[a:b]]))
        result = np.empty_like(times)
        result[order] = snapped
        return result

    # -- steps
    def start_steps(self, steps: np.ndarray, now: float, activate_now: list) -> None:
        plan = self.plan
        self.step_start[steps] = now
        _, pos = _expand(plan.step_msg_ptr, steps)
        msgs = plan.step_msgs[pos]
        np.add.at(self.ends, msgs, 1)
        ready = unique_ints(msgs[self.ends[msgs] == 2])
        empty = steps[self.left[steps] == 0]
        if len(empty):
            self.end_steps(empty, now, activate_now)
        if len(ready) == 0:
            return
        at = (
            np.maximum(
                self.step_start[plan.msg_src_step[ready]] + self.alpha[ready] * self.send_posts[ready],
                self.step_start[plan.msg_dst_step[ready]] + self.alpha[ready] * self.recv_posts[ready],
            )
            + self.step[ready]
        )
        due = at <= now
        activate_now.append(ready[due])
        self.push(at[~due], ready[~due], _ACTIVATE)

    def end_steps(self, steps: np.ndarray, now: float, activate_now: list) -> None:
        finish = now + self.reduce_s[steps]
        self.step_end[steps] = finish
        nxt = self.following[steps]
        keep = nxt >= 0
        nxt, finish = nxt[keep], finish[keep]
        later = finish > now
        if np.any(~later):
            self.start_steps(nxt[~later], now, activate_now)
        self.push(finish[later], nxt[later], _START)

    # -- flows
    def links_of(self, flows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        owner, pos = _expand(self.routes.ptr, self.pair[flows])
        return owner, self.routes.links[pos]

    def set_rates(self, flows: np.ndarray, rates: np.ndarray, now: float) -> None:
        """Give `flows` new rates from `now`; re-queue their ends."""
        changed = rates != self.rate[flows]
        flows, rates = flows[changed], rates[changed]
        if len(flows) == 0:
            return
        self.remaining[flows] -= self.rate[flows] * (now - self.updated[flows])
        self.remaining[flows] = np.maximum(self.remaining[flows], 0.0)
        self.updated[flows] = now
        self.rate[flows] = rates
        self.finish[flows] = self.push(now + self.remaining[flows] / rates, flows, _DONE)

    def activate(self, flows: np.ndarray, now: float) -> bool:
        """Start flows; returns whether some now share a link (rates must be recomputed)."""
        self.msg_start[flows] = now
        empty = self.bytes[flows] == 0
        if np.any(empty):
            idle = flows[empty]
            self.msg_end[idle] = now
            self.push(now + self.latency[idle], idle, _ARRIVE)
            flows = flows[~empty]
        if len(flows) == 0:
            return False
        self.is_active[flows] = True
        self.active = np.concatenate([self.active, flows])
        self.remaining[flows] = self.bytes[flows]
        self.updated[flows] = now
        self.rate[flows] = 0.0
        _, links = self.links_of(flows)
        np.add.at(self.link_users, links, 1)
        if self.link_users[links].max() > 1:
            return True
        self.set_rates(flows, self.solo[flows], now)
        return False

    def complete(self, flows: np.ndarray, now: float) -> bool:
        """Flows whose last byte left at `now`; returns whether others shared their links."""
        self.is_active[flows] = False
        self.active = self.active[self.is_active[self.active]]
        self.rate[flows] = 0.0
        self.finish[flows] = np.inf
        self.msg_end[flows] = now
        _, links = self.links_of(flows)
        np.subtract.at(self.link_users, links, 1)
        self.push(now + self.latency[flows], flows, _ARRIVE)
        return bool(self.link_users[links].max() > 0)

    def rebalance(self, now: float) -> None:
        """Recompute rates: flows alone on their links get their route bandwidth, the rest max-min fair."""
        flows = self.active
        if len(flows) == 0:
            return
        owner, links = self.links_of(flows)
        shared = np.zeros(len(flows), bool)
        shared[owner[self.link_users[links] > 1]] = True
        alone = flows[~shared]
        self.set_rates(alone, self.solo[alone], now)
        if shared.any():
            contended = flows[shared]
            keep = shared[owner]
            local = np.cumsum(shared) - 1
            flow_of, link_of, capacity = local[owner[keep]], links[keep], self.capacity
            if self.cap is not None:  # each flow's own limit, as a link only it crosses
                mine = np.arange(len(contended))
                flow_of = np.concatenate([flow_of, mine])
                link_of = np.concatenate([link_of, len(capacity) + mine])
                capacity = np.concatenate([capacity, self.cap[contended]])
            rates = max_min_rates(flow_of, link_of, capacity, len(contended))
            self.set_rates(contended, rates, now)

    def arrive(self, msgs: np.ndarray, now: float, activate_now: list) -> None:
        plan = self.plan
        touched = np.concatenate([plan.msg_src_step[msgs], plan.msg_dst_step[msgs]])
        np.subtract.at(self.left, touched, 1)
        touched = unique_ints(touched)
        done = touched[self.left[touched] == 0]
        if len(done):
            self.end_steps(done, now, activate_now)

    # -- main loop
    def run(self) -> Timing:
        plan = self.plan
        counts = np.diff(plan.step_ptr)
        activate_now: list = []
        self.start_steps(plan.step_ptr[:-1][counts > 0], 0.0, activate_now)
        now = 0.0
        while True:
            batch: dict[int, list] = {}
            if self.heap:
                limit = self.heap[0][0] * (1 + _MERGE) + 1e-18
                while self.heap and self.heap[0][0] <= limit:
                    when, _, kind, ids = heapq.heappop(self.heap)
                    if kind == _DONE:
                        ids = ids[self.finish[ids] == when]
                    now = max(now, when)
                    batch.setdefault(kind, []).append(ids)
            elif not activate_now:
                break
            self.batches += 1
            dirty = False
            if _DONE in batch:
                flows = np.concatenate(batch[_DONE])
                self.events += len(flows)
                if len(flows):
                    dirty |= self.complete(flows, now)
            if _ARRIVE in batch:
                self.events += sum(len(ids) for ids in batch[_ARRIVE])
                self.arrive(np.concatenate(batch[_ARRIVE]), now, activate_now)
            if _START in batch:
                self.start_steps(np.concatenate(batch[_START]), now, activate_now)
            starting = batch.get(_ACTIVATE, []) + activate_now
            activate_now = []
            if starting:
                flows = np.concatenate(starting)
                self.events += len(flows)
                if len(flows):
                    dirty |= self.activate(flows, now)
            if dirty:
                self.rebalance(now)
        if np.any(np.isnan(self.step_end)):
            stuck = int(np.flatnonzero(np.isnan(self.step_end))[0])
            rank = int(plan.step_rank[stuck])
            raise ScheduleError(
                f"deadlock: rank {rank} never finishes its step {stuck - int(plan.step_ptr[rank])} "
                "(a message it waits for is never posted by its peer)"
            )
        total = float(self.step_end.max()) if len(self.step_end) else 0.0
        return Timing(total, self.step_start, self.step_end, self.msg_start, self.msg_end, self.events)


def solo_rates(routed: RoutedPlan, profile: Profile, costs: MessageCosts | None = None) -> np.ndarray:
    """Each message's rate alone on its route: the route's bandwidth, or its cap when lower."""
    solo = routed.routes.bandwidth[routed.msg_pair] * profile.efficiency
    return solo if costs is None or costs.cap is None else np.minimum(solo, costs.cap)


def solo_timeline(
    routed: RoutedPlan, msg_bytes: np.ndarray, profile: Profile, costs: MessageCosts | None = None
) -> tuple:
    """The timeline if every flow ran alone at its route's bandwidth, computed in rendezvous-round order.

    Returns (step_start, step_end, msg_start, msg_end, rounds); msg_start/msg_end bound each message's
    bandwidth phase.
    """
    plan, routes = routed.plan, routed.routes
    msg_round, _, end_round = rendezvous_rounds(plan)
    rounds = int(end_round.max()) + 1 if len(end_round) else 0
    solo = solo_rates(routed, profile, costs)
    work = msg_bytes if costs is None else costs.work
    duration = np.divide(work, solo, out=np.zeros(len(msg_bytes)), where=work > 0)
    latency = routes.latency[routed.msg_pair]
    reduce_s = reduce_time(plan, msg_bytes, profile, costs)
    alpha = profile.alpha if costs is None else costs.alpha
    step = 0.0 if costs is None else costs.step  # paid once per step, before its first message
    send_posts, recv_posts = message_posts(plan, costs)
    send_post = np.broadcast_to(step + alpha * send_posts, duration.shape)
    recv_post = np.broadcast_to(step + alpha * recv_posts, duration.shape)
    m, s = len(msg_bytes), plan.num_steps
    # Work in round order, so that a round touches contiguous slices (this loop is memory-bound): messages
    # by their round, steps by the round they end in (`place` maps a step to its position there).
    m_order = _round_order(msg_round, rounds)
    m_bounds = np.searchsorted(msg_round[m_order], np.arange(rounds + 1))
    s_order = _round_order(end_round, rounds)
    s_bounds = np.searchsorted(end_round[s_order], np.arange(rounds + 1))
    place = np.empty(s, np.int64)
    place[s_order] = np.arange(s)
    src_step, dst_step = place[plan.msg_src_step[m_order]], place[plan.msg_dst_step[m_order]]
    send_o, recv_o = send_post[m_order], recv_post[m_order]
    duration_o, latency_o = duration[m_order], latency[m_order]
    # One value array: the arrivals (in round order), every step's start (in end-round order), and one
    # more slot that takes the writes for "the step after a rank's last step". A step ends at the latest
    # of its start and its messages' arrivals (an arrival is never before its step's start, so the start
    # changes nothing where there are messages): one entry per message end and one for the step itself.
    value = np.full(m + s + 1, np.nan)
    start = value[m : m + s]
    start[place[plan.step_ptr[:-1][np.diff(plan.step_ptr) > 0]]] = 0.0
    position = np.empty(m, np.int64)
    position[m_order] = np.arange(m)
    counts = np.diff(plan.step_msg_ptr)[s_order] + 1
    entry_ptr = np.zeros(s + 1, np.int64)
    np.cumsum(counts, out=entry_ptr[1:])
    _, pos = _expand(plan.step_msg_ptr, s_order)
    entries = np.empty(int(entry_ptr[-1]), np.int64)
    own = entry_ptr[1:] - 1
    entries[own] = m + np.arange(s)
    mask = np.ones(len(entries), bool)
    mask[own] = False
    entries[mask] = position[plan.step_msgs[pos]]
    reduce_o = reduce_s[s_order]
    following = plan.step_next()[s_order]
    following = m + np.where(following >= 0, place[np.maximum(following, 0)], s)
    step_end_o = np.empty(s)
    msg_start_o = np.zeros(m)
    # Per round: its message slice, its step slice, its entry slice and each step's offset in it.
    round_of_step = np.repeat(np.arange(rounds), np.diff(s_bounds))
    local = entry_ptr[:-1] - entry_ptr[s_bounds[:-1]][round_of_step]
    bounds = zip(m_bounds[:-1].tolist(), m_bounds[1:].tolist(), s_bounds[:-1].tolist(),
                 s_bounds[1:].tolist(), entry_ptr[s_bounds[:-1]].tolist(), entry_ptr[s_bounds[1:]].tolist(),
                 strict=True)  # fmt: skip
    for a, b, c, d, lo, hi in bounds:
        if b > a:
            act = np.maximum(start[src_step[a:b]] + send_o[a:b], start[dst_step[a:b]] + recv_o[a:b])
            msg_start_o[a:b] = act  # the bandwidth phase starts here; the value is its arrival
            np.add(act, duration_o[a:b], out=value[a:b])
            value[a:b] += latency_o[a:b]
        if d > c:
            ends = np.maximum.reduceat(value[entries[lo:hi]], local[c:d])
            ends += reduce_o[c:d]
            step_end_o[c:d] = ends
            value[following[c:d]] = ends
    step_end = np.empty(s)
    step_end[s_order] = step_end_o
    msg_start = np.empty(m)
    msg_start[m_order] = msg_start_o
    step_start = np.empty(s)
    step_start[s_order] = start
    return step_start, step_end, msg_start, msg_start + duration, rounds


def _round_order(rounds_of: np.ndarray, rounds: int) -> np.ndarray:
    """A stable order by round (numpy radix-sorts 16-bit keys: linear time, where rounds allow)."""
    if rounds <= 1 << 16:
        return np.argsort(rounds_of.astype(np.uint16), kind="stable")
    return np.argsort(rounds_of, kind="stable")


def overlaps_on_shared_links(routed: RoutedPlan, start: np.ndarray, end: np.ndarray) -> bool:
    """Whether two flows use one link at overlapping times (intervals [start, end) per message)."""
    plan, routes = routed.plan, routed.routes
    busy = end > start
    # Two messages of one pair posted in one step run together on every link of the route.
    same = np.sort(routed.msg_pair[busy] * plan.num_steps + plan.msg_src_step[busy])
    if np.any(same[1:] == same[:-1]):
        return True
    # Otherwise only links on the routes of two or more pairs can be shared.
    shared = np.bincount(routes.links, minlength=int(routes.links.max(initial=0)) + 1) > 1
    if not shared.any():
        return False
    msgs = np.flatnonzero(busy)
    owner, pos = _expand(routes.ptr, routed.msg_pair[msgs])
    link = routes.links[pos]
    on_shared = shared[link]
    msgs, link = msgs[owner[on_shared]], link[on_shared]
    order = np.lexsort((start[msgs], link))
    link, msgs = link[order], msgs[order]
    same_link = link[1:] == link[:-1]
    tolerance = 1e-12 * np.maximum(end[msgs[:-1]], 1e-9)
    return bool(np.any(same_link & (start[msgs[1:]] < end[msgs[:-1]] - tolerance)))


def run_flow(
    routed: RoutedPlan,
    msg_bytes: np.ndarray,
    topology: Topology,
    profile: Profile,
    events: bool = False,
    costs: MessageCosts | None = None,
) -> Timing:
    """Max-min fair flow-level run of the routed plan (see the module docstring); `events=True` skips the
    contention-free fast path; `costs` gives per-message posting costs and link work (calibrated runs)."""
    if not events:
        step_start, step_end, msg_start, msg_end, _ = solo_timeline(routed, msg_bytes, profile, costs)
        if not overlaps_on_shared_links(routed, msg_start, msg_end):
            total = float(np.nanmax(step_end)) if len(step_end) else 0.0
            return Timing(total, step_start, step_end, msg_start, msg_end, 3 * len(msg_bytes))
    return _FlowRun(routed, msg_bytes, topology, profile, costs).run()
