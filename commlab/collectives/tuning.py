"""`algorithm="auto"` and the runtime knobs of a call: algorithm, pipeline segments and slices.

The algorithm is the fastest measured one where the cost model carries a calibrated profile's measured
algorithm times for the op and world size (`calibration.AlgorithmTimes`), else the cheapest by its
alpha-beta-gamma cost formula. Pipeline `segments` belong to an
algorithm's schedule (trees, chains) and come from its formula too. `pieces` slice every chunk of a
schedule into independent copies run step-major (`schedule.subdivide`), so the executor overlaps one
slice's reduction with the next one's transfer; the schedule's largest message is cut into pieces of
about `piece_bytes` (`pieces_for`).
Every decision depends only on (op, algorithm, world size, bytes, host map) and the communicator's
settings, so all ranks reach the same one without talking (and the argument check would catch it if they
did not).

Across hosts (a host map of several hosts) `auto` also weighs the topology-aware algorithms. Where the
profile was calibrated across hosts on this same host map with its algorithms timed (`commlab testbed run
-- commlab calibrate`, or any launcher), the measured times decide there too; otherwise every algorithm is
priced by its formula at the model's two levels (`CostModel.inter` between hosts), and the candidates
predicted within TIE_TOLERANCE of the cheapest are a tie, decided for the fewest messages on the
critical path (see `choose` and docs/design.md, "auto across hosts").
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from commlab.collectives.algorithms import ALGORITHMS, algorithms_for, build_schedule, get_algorithm
from commlab.collectives.cost import DEFAULT_COST_MODEL, CostModel
from commlab.collectives.hosts import HostMap
from commlab.collectives.schedule import ROOTED_OPS, Schedule
from commlab.errors import InvalidArgumentError, invalid

MAX_PIECES = 16  # slices per chunk at most: each one is a message, with its own latency
DEFAULT_PIECE_BYTES = 1 << 20  # slice chunks larger than this (see benchmarks/collectives.py)
TIE_TOLERANCE = 0.15
"""Across hosts, algorithms predicted within 15% of the cheapest are a tie: the model's own uncertainty
in ranking two algorithms. On the emulated cluster (six auto sweeps, 3 host layouts x 6 sizes, every
measured pair of algorithms) the predicted ratio of two algorithms' times missed the measured ratio by
20% in the median (32% at <= 1 MiB, 13% above); see docs/design.md, "auto across hosts"."""
_COUNT_MESSAGES = CostModel(1.0, 0.0)  # a formula under it: the messages on the critical path


@dataclass(frozen=True)
class Choice:
    """The algorithm to run, its pipeline segments, its predicted time (s) and the slices per chunk."""

    algorithm: str
    segments: int
    predicted_time: float
    pieces: int = 1


def _spans_hosts(hosts: HostMap | None) -> bool:
    return hosts is not None and hosts.num_hosts > 1


def segments_for(
    algorithm: str, op: str, world_size: int, nbytes: int, model: CostModel, hosts: HostMap | None = None
) -> int:
    """Pipeline segments for a pipelined algorithm (from its cost formula); 1 for the others."""
    entry = get_algorithm(algorithm)
    if not entry.pipelined:
        return 1
    if entry.topology_aware:  # priced at both levels, on the host map
        return entry.best_segments(op, world_size, nbytes, model, hosts)
    level = model.flat_across_hosts() if _spans_hosts(hosts) else model
    return entry.best_segments(op, world_size, nbytes, level)


def choose(
    op: str,
    world_size: int,
    nbytes: int,
    model: CostModel = DEFAULT_COST_MODEL,
    hosts: HostMap | None = None,
) -> Choice:
    """The cheapest algorithm for `op` on `world_size` ranks moving `nbytes` per rank: the fastest measured
    one where the model holds measurements of this op (a calibrated profile's, taken on this layout: one
    host, or this host map; `Calibration.cost_model`), else by the formulas (topology-aware algorithms
    included when `hosts` spans several hosts).

    Across hosts, of the algorithms predicted within TIE_TOLERANCE of the cheapest, the one with the
    fewest messages on its critical path (`critical_messages`), then the cheapest: per-message and
    per-step costs are what a calibrated model prices least well (on the emulated cluster it predicted
    calls of <= 1 MiB 1.1-2x too fast, larger ones 1.15-1.2x: medians per layout and run), so of two
    algorithms it cannot tell apart the one with fewer messages carries less of what it misses."""
    across = _spans_hosts(hosts)
    names = algorithms_for(op, topology_aware=across)
    measured = model.measured_choice(op, nbytes, names) if world_size > 1 else None
    if measured is not None:
        segments = segments_for(measured, op, world_size, nbytes, model, hosts)
        time = ALGORITHMS[measured].cost(op, world_size, nbytes, model, segments, hosts)
        return Choice(measured, segments, time)
    candidates = []
    for name in names:
        segments = segments_for(name, op, world_size, nbytes, model, hosts)
        time = ALGORITHMS[name].cost(op, world_size, nbytes, model, segments, hosts)
        candidates.append(Choice(name, segments, time))
    best = min(candidates, key=lambda c: c.predicted_time)  # the first of equals, in registry order
    if not across:
        return best
    tied = [c for c in candidates if c.predicted_time <= best.predicted_time * (1 + TIE_TOLERANCE)]
    return min(tied, key=lambda c: (critical_messages(op, c, world_size, nbytes, hosts), c.predicted_time))


def critical_messages(op: str, choice: Choice, world_size: int, nbytes: int, hosts: HostMap | None) -> float:
    """The messages on the critical path of `choice` (its formula at one second per message, nothing
    else): 2 lg p for recursive doubling, 2(p-1) for the ring, p-1 per phase for `direct`, ..."""
    return ALGORITHMS[choice.algorithm].cost(op, world_size, nbytes, _COUNT_MESSAGES, choice.segments, hosts)


def piece_bytes_for_host(local_ranks: int, threads_per_rank: int = 2) -> int:
    """DEFAULT_PIECE_BYTES if this host has a core for every thread of every local rank, else 0.

    Overlapping one slice's reduction with the next one's transfer needs the transport's own thread
    (gloo's I/O loop) to run beside the rank's main thread; with fewer cores the two take turns, and
    slicing only adds messages (measured in benchmarks/collectives.py on 2 cores).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return DEFAULT_PIECE_BYTES if cores >= threads_per_rank * max(local_ranks, 1) else 0


def pieces_for(
    op: str,
    algorithm: str,
    world_size: int,
    nbytes: int,
    segments: int,
    piece_bytes: int,
    hosts: HostMap | None = None,
) -> int:
    """Slices per chunk so that the schedule's largest message is cut into pieces of about `piece_bytes`
    (1 up to MAX_PIECES; 1 for one rank).

    Sized by the largest message, not by the chunk: where a step sends several chunks to one peer
    (halving-doubling's first step sends half the buffer), a piece of each is one message of several
    chunks' pieces. The pipeline's cost where a step changes peers is about one such message (the next
    step's pieces cannot start before the first piece of this one has landed), so it is the message that
    must be small. Measured on the emulated cluster (4 hosts x 1 rank, 1 Gbit/s, 16 MiB allreduce,
    median of 5 interleaved, several runs): halving-doubling 225-229 ms with 2 MiB messages, 218-226 with
    1 MiB, 216-219 with 512 KiB, against the ring's 212-214 with any of them (docs/design.md, "Pieces").
    """
    if world_size == 1 or piece_bytes <= 0:
        return 1
    root = 0 if op in ROOTED_OPS else None
    schedule = build_schedule(op, algorithm, world_size, root, segments, hosts)
    largest = nbytes * _largest_message_chunks(schedule) // schedule.num_chunks
    return max(1, min(MAX_PIECES, largest // piece_bytes))


def _largest_message_chunks(schedule: Schedule) -> int:
    """The most chunks any one message of `schedule` carries."""
    return max(
        (len(send.chunks) for steps in schedule.steps for step in steps for send in step.sends), default=1
    )


@functools.lru_cache(maxsize=4096)
def resolve(
    op: str,
    algorithm: str,
    world_size: int,
    nbytes: int,
    model: CostModel = DEFAULT_COST_MODEL,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    hosts: HostMap | None = None,
) -> Choice:
    """Everything a call needs decided: the algorithm ('auto' or a name), its segments and its pieces,
    for ranks on `hosts` (None: one host)."""
    if algorithm == "auto":
        choice = choose(op, world_size, nbytes, model, hosts)
    else:
        if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
            raise invalid("algorithm", algorithm, ["auto", *ALGORITHMS])
        if op not in get_algorithm(algorithm).ops:
            raise InvalidArgumentError(
                f"algorithm={algorithm!r} does not implement {op}; accepted: 'auto', "
                + ", ".join(repr(a) for a in algorithms_for(op))
            )
        segments = segments_for(algorithm, op, world_size, nbytes, model, hosts)
        predicted = ALGORITHMS[algorithm].cost(op, world_size, nbytes, model, segments, hosts)
        choice = Choice(algorithm, segments, predicted)
    pieces = pieces_for(op, choice.algorithm, world_size, nbytes, choice.segments, piece_bytes, hosts)
    return Choice(choice.algorithm, choice.segments, choice.predicted_time, pieces)
