"""Topology-aware schedules built from a host map: hierarchical (intra-host, then across hosts) and
multi-channel rings.

Hierarchical. A buffer is cut into rails, one per local rank index (L = the most ranks on one host); on
host h rail j is carried by local rank j mod l_h, so hosts of different sizes still line up. Allreduce is
an intra-host ring reduce-scatter of the rails (each rank ends with its host's sum of the rails it
carries), an allreduce of each rail among its carriers, one per host (a ring over the hosts on H
sub-chunks: every carrier moves 1/L of the data across hosts), and an intra-host ring allgather.
Reduce-scatter and allgather do the same with the output blocks grouped by their owner's local index
(rail j holds the blocks of the ranks with local index j), the cross-host phase being a ring
reduce-scatter (allgather) among the rail's carriers. Broadcast is a binomial tree across hosts on the
root's rail, then a binomial tree inside every host; reduce is the reverse. One host: the flat ring (or
binomial tree); one rank per host: the ring across hosts. The 2D torus ring is this schedule with the
torus rows as hosts (rings along each dimension).

Multi-channel rings (`multiring`, NCCL's channels): k = L rings over p ranks (one ring on a single
host), each carrying 1/k of the data. Channel c visits every host in host order and enters it at local
rank c (mod the host's size), leaving from the local rank before it, so each channel crosses between
hosts on its own pair of local ranks: with one NIC per local rank, every NIC carries one channel.

Cost (H hosts of l ranks, n bytes, intra-host model a, inter-host model e):
    hierarchical allreduce       a.time(l-1, n(l-1)/l, n(l-1)/l) + e.time(2(H-1), 2(n/l)(H-1)/H, (n/l)(H-1)/H)
                                 + a.time(l-1, n(l-1)/l)
                                 pipelined over S segments, with phases A, B, C of the sum above on n/S:
                                 A + B + C + (S-1) max(B, A + C) (in the steady state a segment's
                                 crossing runs beside its neighbours' phases inside the hosts)
    hierarchical reduce_scatter  a.time(l-1, n(l-1)/l, n(l-1)/l) + e.time(H-1, (n/l)(H-1)/H, (n/l)(H-1)/H)
    hierarchical allgather       e.time(H-1, (n/l)(H-1)/H) + a.time(l-1, n(l-1)/l)
    hierarchical broadcast       ceil(lg H) e.time(1, n) + ceil(lg l) a.time(1, n)   (reduce: + gamma n)
    multiring allreduce          2(p-1) steps of chunks b = n/(kp): each max(e.time(1, b), a.time(k-1,
                                 (k-1) b, steps=1)) + gamma b (one host: a.time(k, k b, steps=1));
                                 reduce_scatter/allgather: (p-1) such steps
Hosts of different sizes are priced by the smallest host, whose ranks carry the most rails: hierarchical
with ceil(L / l_min) rails per carrier across hosts; multiring with ceil(k / l_h) of a rank's k messages
per step leaving a host of l_h ranks (e.time(c, c b, steps=1), c = ceil(k / l_h)) and the rest inside,
the slowest host's step.
"""

from __future__ import annotations

import math

from commlab.collectives.cost import CostModel, ceil_log2
from commlab.collectives.hosts import HostMap
from commlab.collectives.schedule import OPS, Schedule, ScheduleBuilder
from commlab.errors import invalid

HIERARCHICAL = "hierarchical"
MULTIRING = "multiring"
HIERARCHICAL_OPS = ("allreduce", "reduce_scatter", "allgather", "broadcast", "reduce")  # no all-to-all
MULTIRING_OPS = ("allreduce", "reduce_scatter", "allgather")

Blocks = list[tuple[int, ...]]
SEGMENT_BYTES = 4 << 20
"""Pipelined hierarchical allreduce keeps segments of at least 4 MiB: a segment's fixed costs (a step of
each phase: posting, waking, Python) are not all in a fitted alpha (a fit over large messages may put
alpha at 0, and then the formula wants 64 segments). Measured on 2 emulated hosts x 2 ranks at 1 Gbit/s
(benchmarks/hierarchical_pipeline.py): 16 MiB fastest with 4 segments, 64 MiB with 8-16."""


def _ring_reduce_scatter(builder: ScheduleBuilder, members: list[int], blocks: Blocks, slot: int) -> int:
    """Ring reduce-scatter among `members`: members[i] ends with the sum of blocks[i] (empty blocks are
    skipped). Returns the next free slot."""
    m = len(members)
    for t in range(m - 1):
        for i in range(m):
            chunks = blocks[(i - t - 1) % m]
            if chunks:
                builder.transfer(slot + t, members[i], members[(i + 1) % m], chunks, reduce=True)
    return slot + m - 1


def _ring_allgather(builder: ScheduleBuilder, members: list[int], blocks: Blocks, slot: int) -> int:
    """Ring allgather among `members`: blocks[i], held by members[i], reaches every member."""
    m = len(members)
    for t in range(m - 1):
        for i in range(m):
            chunks = blocks[(i - t) % m]
            if chunks:
                builder.transfer(slot + t, members[i], members[(i + 1) % m], chunks, reduce=False)
    return slot + m - 1


def _binomial(
    builder: ScheduleBuilder, members: list[int], chunks: tuple[int, ...], slot: int, up: bool
) -> int:
    """A binomial tree over `members`, members[0] at the root: a broadcast from it, or (up) a reduction to
    it. ceil(lg m) slots; returns the next free slot."""
    rounds = ceil_log2(len(members))
    for k in range(rounds):
        distance = 1 << (rounds - 1 - k if up else k)
        for i in range(distance):
            if i + distance < len(members):
                a, b = members[i], members[i + distance]
                builder.transfer(slot + k, *((b, a) if up else (a, b)), chunks, reduce=up)
    return slot + rounds


def _rotated(ranks: tuple[int, ...], start: int) -> list[int]:
    return [ranks[(start + i) % len(ranks)] for i in range(len(ranks))]


def _rail_blocks(hosts: HostMap, host: int, rail_chunks: list[tuple[int, ...]]) -> Blocks:
    """On `host`, the chunks each local rank carries: the rails j with j mod l_h == its local index."""
    size = len(hosts.hosts[host])
    return [tuple(c for j in range(i, len(rail_chunks), size) for c in rail_chunks[j]) for i in range(size)]


def hierarchical_allreduce(hosts: HostMap, segments: int = 1) -> Schedule:
    """Intra-host reduce-scatter of the rails, a ring allreduce of every rail across hosts, intra-host
    allgather, pipelined over `segments` pieces of the buffer: segment s starts its three phases P slots
    after segment s-1 (P = the longest phase), so one segment's cross-host phase runs beside the next
    one's reduce-scatter and the previous one's allgather inside the hosts. L x H chunks per segment:
    sub-chunk k of rail j of segment s is chunk (s L + j) H + k."""
    num_hosts, rails = hosts.num_hosts, hosts.max_local
    builder = ScheduleBuilder("allreduce", HIERARCHICAL, hosts.world_size, segments * rails * num_hosts)
    inside, across = rails - 1, 2 * (num_hosts - 1)  # slots of each intra-host phase, of the cross-host one
    period = max(inside, across, 1)
    for seg in range(segments):
        start, base = seg * period, seg * rails * num_hosts
        rail_chunks = [tuple(range(base + j * num_hosts, base + (j + 1) * num_hosts)) for j in range(rails)]
        for h, ranks in enumerate(hosts.hosts):
            _ring_reduce_scatter(builder, list(ranks), _rail_blocks(hosts, h, rail_chunks), start)
        for j in range(rails):
            carriers = [hosts.rail_member(h, j) for h in range(num_hosts)]
            sub_chunks = [(base + j * num_hosts + h,) for h in range(num_hosts)]
            after = _ring_reduce_scatter(builder, carriers, sub_chunks, start + inside)
            _ring_allgather(builder, carriers, sub_chunks, after)
        for h, ranks in enumerate(hosts.hosts):
            _ring_allgather(
                builder, list(ranks), _rail_blocks(hosts, h, rail_chunks), start + inside + across
            )
    return builder.build()


def _owner_rails(hosts: HostMap) -> list[tuple[int, ...]]:
    """Rail j: the blocks (one per rank) of the ranks whose local index is j."""
    return [tuple(host[j] for host in hosts.hosts if j < len(host)) for j in range(hosts.max_local)]


def hierarchical_reduce_scatter(hosts: HostMap) -> Schedule:
    """Intra-host ring reduce-scatter by rail, then a ring reduce-scatter of every rail across hosts."""
    builder = ScheduleBuilder("reduce_scatter", HIERARCHICAL, hosts.world_size, hosts.world_size)
    rails = _owner_rails(hosts)
    for h, ranks in enumerate(hosts.hosts):
        _ring_reduce_scatter(builder, list(ranks), _rail_blocks(hosts, h, rails), 0)
    for j in range(hosts.max_local):
        carriers = [hosts.rail_member(h, j) for h in range(hosts.num_hosts)]
        blocks = [(host[j],) if j < len(host) else () for host in hosts.hosts]
        _ring_reduce_scatter(builder, carriers, blocks, hosts.max_local - 1)
    return builder.build()


def hierarchical_allgather(hosts: HostMap) -> Schedule:
    """A ring allgather of every rail across hosts, then an intra-host ring allgather by rail."""
    builder = ScheduleBuilder("allgather", HIERARCHICAL, hosts.world_size, hosts.world_size)
    for j in range(hosts.max_local):
        carriers = [hosts.rail_member(h, j) for h in range(hosts.num_hosts)]
        blocks = [(host[j],) if j < len(host) else () for host in hosts.hosts]
        _ring_allgather(builder, carriers, blocks, 0)
    rails = _owner_rails(hosts)
    for h, ranks in enumerate(hosts.hosts):
        _ring_allgather(builder, list(ranks), _rail_blocks(hosts, h, rails), hosts.num_hosts - 1)
    return builder.build()


def _rooted_orders(hosts: HostMap, root: int) -> tuple[list[int], list[list[int]]]:
    """The carriers of the root's rail, root's host first, and every host's ranks from its carrier on."""
    root_host, rail = hosts.host_of(root), hosts.local_rank(root)
    host_order = _rotated(tuple(range(hosts.num_hosts)), root_host)
    carriers = [hosts.rail_member(h, rail) for h in host_order]
    inside = [_rotated(ranks, ranks.index(hosts.rail_member(h, rail))) for h, ranks in enumerate(hosts.hosts)]
    return carriers, inside


def hierarchical_broadcast(hosts: HostMap, root: int) -> Schedule:
    """Binomial tree across hosts on the root's rail, then a binomial tree inside every host."""
    builder = ScheduleBuilder("broadcast", HIERARCHICAL, hosts.world_size, 1, root)
    carriers, inside = _rooted_orders(hosts, root)
    after = _binomial(builder, carriers, (0,), 0, up=False)
    for ranks in inside:
        _binomial(builder, ranks, (0,), after, up=False)
    return builder.build()


def hierarchical_reduce(hosts: HostMap, root: int) -> Schedule:
    """Binomial reduction inside every host to the root's rail, then across hosts to the root."""
    builder = ScheduleBuilder("reduce", HIERARCHICAL, hosts.world_size, 1, root)
    carriers, inside = _rooted_orders(hosts, root)
    for ranks in inside:
        _binomial(builder, ranks, (0,), 0, up=True)
    _binomial(builder, carriers, (0,), ceil_log2(hosts.max_local), up=True)
    return builder.build()


def default_channels(hosts: HostMap) -> int:
    """One channel per local rank (each host's NICs) across hosts; on one host one ring (the flat ring:
    p rings over shared memory would only multiply the messages)."""
    return hosts.max_local if hosts.num_hosts > 1 else 1


def channel_orders(hosts: HostMap, channels: int | None = None) -> list[list[int]]:
    """The rank order of each channel's ring: hosts in order, channel c entering each at local rank c."""
    k = default_channels(hosts) if channels is None else channels
    return [[r for ranks in hosts.hosts for r in _rotated(ranks, c % len(ranks))] for c in range(k)]


def multiring(op: str, hosts: HostMap, channels: int | None = None) -> Schedule:
    """`op` as k concurrent rings (`default_channels` unless given), each on 1/k of every block."""
    orders = channel_orders(hosts, channels)
    k, p = len(orders), hosts.world_size
    if op == "allreduce":  # channel c, ring position i: chunk c p + i
        builder = ScheduleBuilder(op, MULTIRING, p, k * p)
        for c, order in enumerate(orders):
            chunks = [(c * p + i,) for i in range(p)]
            _ring_allgather(builder, order, chunks, _ring_reduce_scatter(builder, order, chunks, 0))
        return builder.build()
    builder = ScheduleBuilder(op, MULTIRING, p, k * p)  # block b, channel c: chunk b k + c
    for c, order in enumerate(orders):
        blocks = [(order[i] * k + c,) for i in range(p)]
        (_ring_reduce_scatter if op == "reduce_scatter" else _ring_allgather)(builder, order, blocks, 0)
    return builder.build()


def build(
    op: str, world_size: int, root: int | None = None, segments: int = 1, hosts: HostMap | None = None
) -> Schedule:
    """The hierarchical schedule for `op` on `hosts` (one host of `world_size` ranks if None)."""
    hosts = _hosts(world_size, hosts)
    if op == "allreduce":
        return hierarchical_allreduce(hosts, segments)
    if op == "reduce_scatter":
        return hierarchical_reduce_scatter(hosts)
    if op == "allgather":
        return hierarchical_allgather(hosts)
    if op == "broadcast":
        return hierarchical_broadcast(hosts, root)
    if op == "reduce":
        return hierarchical_reduce(hosts, root)
    raise invalid("op", op, OPS)


def build_multiring(
    op: str, world_size: int, root: int | None = None, segments: int = 1, hosts: HostMap | None = None
) -> Schedule:
    """The multi-channel ring schedule for `op` on `hosts` (one host of `world_size` ranks if None)."""
    if op not in MULTIRING_OPS:
        raise invalid("op", op, MULTIRING_OPS)
    return multiring(op, _hosts(world_size, hosts))


def _hosts(world_size: int, hosts: HostMap | None) -> HostMap:
    if hosts is None:
        return HostMap.flat(world_size)
    if hosts.world_size != world_size:
        raise invalid("hosts", str(hosts), f"a host map of {world_size} ranks (the world size)")
    return hosts


def _intra_time(hosts: HostMap, nbytes: float, model: CostModel, reduce: bool) -> float:
    """The slowest host's intra-host ring phase: l_h - 1 steps, each moving one rank's rails
    (ceil(L / l_h) of the L rails of n / L bytes)."""
    rails, worst = hosts.max_local, 0.0
    for host in hosts.hosts:
        size = len(host)
        if size > 1:
            moved = (size - 1) * math.ceil(rails / size) * nbytes / rails
            worst = max(worst, model.time(size - 1, moved, moved if reduce else 0.0))
    return worst


def _carried(hosts: HostMap, n: float) -> tuple[int, float]:
    """The rails the busiest carrier rank takes across hosts (the smallest host's ranks carry all L
    rails), and the bytes it sends per ring pass over the hosts: its rails' share of n x (H - 1) / H."""
    rails, num_hosts = hosts.max_local, hosts.num_hosts
    per_carrier = math.ceil(rails / min(len(host) for host in hosts.hosts))
    return per_carrier, per_carrier * n / rails * (num_hosts - 1) / num_hosts


def cost(
    op: str,
    hosts: HostMap,
    nbytes: float,
    intra: CostModel,
    inter: CostModel | None = None,
    segments: int = 1,
) -> float:
    """Seconds for the hierarchical `op` by the formulas in this module's docstring (uneven hosts: the
    slowest host inside, the carrier of the most rails across; allreduce pipelined over `segments`)."""
    inter = intra if inter is None else inter
    if op == "allreduce" and segments > 1:
        phases = _allreduce_phases(hosts, nbytes / segments, intra, inter)
        return sum(phases) + (segments - 1) * max(phases[1], phases[0] + phases[2])
    n, num_hosts, rails = nbytes, hosts.num_hosts, hosts.max_local
    per_carrier, across = _carried(hosts, n)
    ring_steps = num_hosts - 1
    if op == "allreduce":
        return sum(_allreduce_phases(hosts, n, intra, inter))
    if op == "reduce_scatter":
        crossing = inter.time(ring_steps * per_carrier, across, across, steps=ring_steps)
        return _intra_time(hosts, n, intra, True) + crossing
    if op == "allgather":
        return inter.time(ring_steps * per_carrier, across, steps=ring_steps) + _intra_time(
            hosts, n, intra, False
        )
    reduced = n if op == "reduce" else 0.0
    if op in ("broadcast", "reduce"):
        return ceil_log2(num_hosts) * inter.time(1, n, reduced) + ceil_log2(rails) * intra.time(1, n, reduced)
    raise invalid("op", op, OPS)


def _allreduce_phases(
    hosts: HostMap, n: float, intra: CostModel, inter: CostModel
) -> tuple[float, float, float]:
    """Seconds of hierarchical allreduce's three phases on n bytes: inside, across, inside again."""
    per_carrier, across = _carried(hosts, n)
    steps = 2 * (hosts.num_hosts - 1)
    crossing = inter.time(steps * per_carrier, 2 * across, across, steps=steps)
    return _intra_time(hosts, n, intra, True), crossing, _intra_time(hosts, n, intra, False)


def multiring_cost(
    op: str,
    hosts: HostMap,
    nbytes: float,
    intra: CostModel,
    inter: CostModel | None = None,
    segments: int = 1,
) -> float:
    """Seconds for the multi-channel ring `op` by the formulas in this module's docstring (not pipelined:
    `segments` is always 1)."""
    inter = intra if inter is None else inter
    p, k = hosts.world_size, default_channels(hosts)
    if p == 1:
        return 0.0
    chunk = nbytes / (k * p)
    if hosts.num_hosts == 1:
        step = intra.time(k, k * chunk, steps=1)
    else:
        step = max(_multiring_step(size, k, chunk, intra, inter) for size in {len(h) for h in hosts.hosts})
    if op == "allreduce":
        return 2 * (p - 1) * step + (p - 1) * k * chunk * intra.gamma
    if op == "reduce_scatter":
        return (p - 1) * (step + k * chunk * intra.gamma)
    if op == "allgather":
        return (p - 1) * step
    raise invalid("op", op, MULTIRING_OPS)


def _multiring_step(size: int, channels: int, chunk: float, intra: CostModel, inter: CostModel) -> float:
    """One step of the busiest rank of a host of `size` ranks in `channels` rings of `chunk`-byte
    messages: each channel leaves the host once, from the local rank before its entry (c - 1 mod size),
    so that rank sends ceil(channels / size) of its messages across hosts and the rest inside, at once."""
    out = math.ceil(channels / size)
    inside = channels - out
    crossing = inter.time(out, out * chunk, steps=1)
    return max(crossing, intra.time(inside, inside * chunk, steps=1) if inside else 0.0)
