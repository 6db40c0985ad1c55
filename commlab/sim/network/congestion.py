"""Congestion fidelity: the schedule in rendezvous rounds, each as long as its busiest link needs.

Rounds come from the same rule as the symbolic checker: a rank starts its step k+1 in the round after all
messages of step k moved, and a message moves in the first round in which both of its ends are at the
steps that hold it. A round then lasts
    max over its messages (alpha x posting position + route latency)
  + max over links (bytes of all the round's messages on the link / (bandwidth x efficiency))
  + max over the steps ending in it (gamma x bytes reduced),
and the collective lasts the sum of its rounds. Everything is vectorized over the messages of a round.
"""

from __future__ import annotations

import numpy as np

from commlab.shared.sorting import stable_argsort
from commlab.sim.network.engine import (
    MessageCosts,
    RoutedPlan,
    Timing,
    message_posts,
    reduce_time,
    rendezvous_rounds,
)
from commlab.sim.network.profile import Profile
from commlab.sim.network.routing import _expand
from commlab.sim.network.topology import Topology

_BLOCK = 1 << 22  # (rounds x links) entries per bincount block


def run_congestion(
    routed: RoutedPlan,
    msg_bytes: np.ndarray,
    topology: Topology,
    profile: Profile,
    costs: MessageCosts | None = None,
) -> Timing:
    """Time of every round and step of the routed plan (see the module docstring); `costs` gives
    per-message posting costs and link work (calibrated runs)."""
    plan, routes = routed.plan, routed.routes
    msg_round, start, end = rendezvous_rounds(plan)
    rounds = int(end.max()) + 1 if len(end) else 0
    capacity = topology.compiled.bandwidth * profile.efficiency
    links = len(capacity)

    send_posts, recv_posts = message_posts(plan, costs)
    posting = np.maximum(send_posts, recv_posts)
    alpha = profile.alpha if costs is None else costs.alpha
    work = msg_bytes if costs is None else costs.work
    step = 0.0 if costs is None else costs.step  # paid once per step, before its first message
    msg_latency = routes.latency[routed.msg_pair] + step + alpha * posting
    round_latency = np.zeros(rounds)
    np.maximum.at(round_latency, msg_round, msg_latency)

    round_bandwidth = np.zeros(rounds)
    order = stable_argsort(msg_round)
    sorted_rounds = msg_round[order]
    per_block = max(1, _BLOCK // max(links, 1))
    for first in range(0, rounds, per_block):
        last = min(rounds, first + per_block)
        lo, hi = np.searchsorted(sorted_rounds, [first, last])
        msgs = order[lo:hi]
        owner, pos = _expand(routes.ptr, routed.msg_pair[msgs])
        key = (msg_round[msgs][owner] - first) * links + routes.links[pos]
        load = np.bincount(key, weights=work[msgs][owner], minlength=(last - first) * links)
        round_bandwidth[first:last] = (load.reshape(last - first, links) / capacity).max(axis=1)
    if costs is not None and costs.cap is not None:
        np.maximum.at(round_bandwidth, msg_round, work / costs.cap)

    round_reduce = np.zeros(rounds)
    np.maximum.at(round_reduce, end, reduce_time(plan, msg_bytes, profile, costs))

    duration = round_latency + round_bandwidth + round_reduce
    clock = np.concatenate([[0.0], np.cumsum(duration)])
    msg_start = clock[msg_round] + msg_latency
    msg_end = clock[msg_round] + round_latency[msg_round] + round_bandwidth[msg_round]
    return Timing(float(clock[-1]), clock[start], clock[end + 1], msg_start, msg_end, rounds)
