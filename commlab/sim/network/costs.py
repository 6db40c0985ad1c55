"""Per-message prices under a calibrated profile (`commlab calibrate`), for the congestion and flow engines.

A message of m bytes costs alpha(m) to post and, alone on its route, m x beta(m) to move (the fit of the
level of the ranks busy in its rendezvous round, or the ping-pong fit for a transfer alone:
`message_costs`; a profile calibrated across hosts prices this software part by its intra-host levels,
`Calibration.host_level`). A message runs at most at its `cap`, its route's bandwidth / the level's
`concurrency` c, and puts m x beta(m) x cap "work bytes" on its links, so alone it takes exactly the
calibrated time,
and messages that share a link (two sends of one rank on its port of a `local` host) slow each other as
real bytes would, k of them together moving their bytes min(k, c) times faster than one after another
(as in the `auto` model). Gamma and launch come from the same level; a step reduces each message it
receives at gamma(m), the level's reduction cost for buffers of that size (in cache faster than out of
it). A level's `step` is paid once per step before its first message is posted, and taken off every
message's alpha(m), as in the `auto` model: a one-message step costs the calibrated time, a direct step
of p-1 messages less than p-1 such steps. Where a round has more busy ranks than the profile's host has
cores, a message waits for the round's messages per busy rank rather than its position in its step
(`posting_alphas`).

A message between hosts (of the topology's host map) pays its host's software and then the wire: its
calibrated per-byte cost m x beta(m) is added to its alpha (the sender's and receiver's copies, system
calls, gloo's thread: CPU time on a shared host, not overlapped with the wire), and it puts its real m
bytes on its links at up to the route's bandwidth x the profile's efficiency. The software part comes
from the intra-host levels where the profile has them (`Calibration.host_level`); a profile calibrated
on hosts of one rank each measured its fits across the wire, so its software part is what exceeds the
wire's 1 / bandwidth. Inside a host the calibration alone prices a message (a topology's links inside
hosts, such as `local`'s ports, are placeholders the calibration stands for). Why: a profile calibrated
on loopback (about 1 GB/s per message) priced every message on a shaped 1 Gbit/s wire 8x too fast (it
ignored the topology's link speeds); with the wire alone (software overlapped) the predictions on the
emulated cluster were biased low (median -15% on 2 hosts x 2 ranks at 1 Gbit/s), with software then
wire -6% (docs/testbed-validation.md). Likewise a fit measured across the wire holds the route's latency
in its alpha (on gloo about two one-way trips per message: the receiver's ready notice, then the data);
the engine adds the route's latency itself, so such an alpha gives up one latency for messages between
hosts (on a 2 ms-per-link network the predictions were 30-60% too slow per step before).
"""

from __future__ import annotations

import itertools

import numpy as np

from commlab.collectives.calibration import PiecewiseCostModel
from commlab.shared.sorting import stable_argsort
from commlab.sim.network.compiled import CompiledSchedule
from commlab.sim.network.engine import MessageCosts, RoutedPlan, rendezvous_rounds
from commlab.sim.network.profile import Profile


def message_costs(
    profile: Profile,
    routed: RoutedPlan,
    msg_bytes: np.ndarray,
    world_size: int,
    dtype: str = "float32",
    between_hosts: np.ndarray | None = None,
) -> MessageCosts | None:
    """Per-message alpha, link work and per-step cost under a calibrated profile (None for a plain one),
    priced by the same model as `auto` (a one-message step costs the fitted alpha(m) + m beta(m)).

    Each message is priced by how busy the host is in its rendezvous round (`busy_ranks`): a round of
    b >= 2 ranks by the level of b ranks, a round with a single transfer by the ping-pong fit. Why: the
    fold steps of halving-doubling on 3 ranks move whole buffers between two ranks while the third idles,
    and priced at the 3-ranks-busy level they came out up to 2.6x too slow (gloo).

    `between_hosts` (per message: its ranks are on different hosts of the topology's host map) marks the
    messages whose wire the topology describes and prices (the module docstring)."""
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
            level = calibration.host_level(min(max(int(count), 2), world_size))
            model = PiecewiseCostModel.of(level.link, 0.0, step=level.step, concurrency=level.concurrency)
        mine = busy == count
        bounds = np.array([s.max_bytes for s in model.segments])
        index = np.minimum(np.searchsorted(bounds, msg_bytes[mine], side="left"), len(model.segments) - 1)
        alpha[mine] = np.array([s.alpha for s in model.segments])[index]
        beta[mine] = np.array([s.beta for s in model.segments])[index]
        step[mine] = np.array(model.segment_steps or [model.step] * len(model.segments))[index]
        concurrency[mine] = model.concurrency
    wire = routed.routes.bandwidth[routed.msg_pair] * profile.efficiency
    crossing = np.zeros(len(msg_bytes), bool) if between_hosts is None else np.asarray(between_hosts, bool)
    # between hosts: the host's software per byte, then the wire's (see the module docstring); where the
    # fit itself was measured across the wire (hosts of one rank each), its software is what exceeds it
    software = np.maximum(beta - 1.0 / wire, 0.0) if calibration.levels_include_wire else beta
    alpha = alpha + np.where(crossing, msg_bytes * software, 0.0)
    if calibration.levels_include_wire:  # the fit holds the route's latency, which the engine adds itself:
        # take it off the message's fixed cost (the level's per-step part first, then its alpha)
        excess = np.where(crossing, routed.routes.latency[routed.msg_pair], 0.0)
        from_step = np.minimum(step, excess)
        step = step - from_step
        alpha = np.maximum(alpha - (excess - from_step), 0.0)
    cap = np.where(crossing, wire, wire / concurrency)
    work = np.where(crossing, msg_bytes, msg_bytes * beta * cap)
    reduce = reduce_seconds(profile, routed.plan, msg_bytes, world_size, dtype)
    cores = calibration.machine.get("logical_cores")
    send_posts, recv_posts = posting_alphas(routed.plan, busy, share, cores if isinstance(cores, int) else 0)
    return MessageCosts(alpha, work, step, cap, reduce, send_posts, recv_posts)


def posting_alphas(
    plan: CompiledSchedule, busy: np.ndarray, share: np.ndarray, cores: int
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
    profile: Profile, plan: CompiledSchedule, msg_bytes: np.ndarray, world_size: int, dtype: str
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


def busy_ranks(plan: CompiledSchedule) -> np.ndarray:
    """For every message, the ranks that send or receive in its rendezvous round; 1 where the round holds
    transfers in a single direction between one pair (a transfer alone on the host)."""
    return round_load(plan)[0]


def round_load(plan: CompiledSchedule) -> tuple[np.ndarray, np.ndarray]:
    """For every message, `busy_ranks` and the round's messages per rank taking part in it."""
    msg_round, _, _ = rendezvous_rounds(plan)
    busy = np.zeros(len(msg_round), np.int64)
    share = np.zeros(len(msg_round))
    order = stable_argsort(msg_round)
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
