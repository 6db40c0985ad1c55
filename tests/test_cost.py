"""The cost formulas: closed forms at hand-computed points, and agreement with the schedules they price."""

from __future__ import annotations

import math

import pytest

from commlab.collectives.algorithms import ALGORITHMS, build_schedule, get_algorithm
from commlab.collectives.cost import (
    DEFAULT_COST_MODEL,
    MAX_SEGMENTS,
    CostModel,
    best_segment_count,
    ceil_log2,
    floor_pow2,
)
from commlab.collectives.schedule import ROOTED_OPS, Schedule, simulate
from commlab.errors import InvalidArgumentError

A, B, G = 1e-5, 1e-9, 2e-9
MODEL = CostModel(A, B, G)
ALPHA_ONLY, BETA_ONLY, GAMMA_ONLY = CostModel(1, 0, 0), CostModel(0, 1, 0), CostModel(0, 0, 1)


def _cost(name: str, op: str, p: int, n: float, model: CostModel = MODEL, segments: int | None = 1) -> float:
    return get_algorithm(name).cost(op, p, n, model, segments)


# --- the model ------------------------------------------------------------------------------------------


def test_cost_model_validates_and_converts_rates() -> None:
    with pytest.raises(InvalidArgumentError, match=r"alpha=-1"):
        CostModel(-1, 0, 0)
    with pytest.raises(InvalidArgumentError, match=r"beta=nan"):
        CostModel(0, math.nan)
    model = CostModel.from_rates(2e-6, 1e9, 4e9)
    assert model == CostModel(2e-6, 1e-9, 0.25e-9)
    assert CostModel.from_rates(1e-6, 1e9).gamma == 0
    assert model.time(3, 1000, 400) == pytest.approx(3 * 2e-6 + 1000e-9 + 100e-9)
    assert CostModel(40e-6, 1 / 2.5e9, 1 / 4e9) == DEFAULT_COST_MODEL


def test_helpers() -> None:
    assert [ceil_log2(p) for p in (1, 2, 3, 4, 5, 8, 9)] == [0, 1, 2, 2, 3, 3, 4]
    assert [floor_pow2(p) for p in (1, 2, 3, 4, 7, 8, 9)] == [1, 2, 2, 4, 4, 8, 8]
    assert best_segment_count(lambda k: (k - 5) ** 2) == 5
    assert best_segment_count(lambda k: -k) == MAX_SEGMENTS
    assert best_segment_count(lambda k: 1.0) == 1


# --- closed forms at hand-computed points -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "op", "p", "n", "segments", "expected"),
    [
        ("ring", "allreduce", 4, 1000, 1, 6 * A + 1500 * B + 750 * G),
        ("ring", "reduce_scatter", 4, 1000, 1, 3 * A + 750 * B + 750 * G),
        ("ring", "allgather", 4, 1000, 1, 3 * A + 750 * B),
        ("ring", "broadcast", 4, 1000, 2, 4 * (A + 500 * B)),
        ("ring", "reduce", 4, 1000, 2, 4 * (A + 500 * B + 500 * G)),
        # p = 8: height 3, at most 2 messages per rank per slot and phase, 2 partial sums added.
        ("tree", "allreduce", 8, 1000, 2, 8 * (2 * A + 500 * B) + 4 * 500 * G),
        ("tree", "broadcast", 8, 1000, 2, 4 * (2 * A + 1000 * B)),
        ("tree", "reduce", 8, 1000, 2, 4 * (2 * A + 1000 * B + 1000 * G)),
        ("halving_doubling", "allreduce", 8, 800, 1, 6 * A + 1400 * B + 700 * G),
        # p = 6: p' = 4, rem = 2; fold and unfold move the whole buffer.
        ("halving_doubling", "allreduce", 6, 600, 1, 6 * A + (900 + 1200) * B + (450 + 600) * G),
        ("halving_doubling", "reduce_scatter", 8, 800, 1, 3 * A + 700 * B + 700 * G),
        # p = 6, blocks of 100: fold 600, halving (2+2) + (1+1) blocks, fix-up 100.
        ("halving_doubling", "reduce_scatter", 6, 600, 1, 4 * A + 1300 * B + 1200 * G),
        ("halving_doubling", "allgather", 6, 600, 1, 4 * A + (100 + 600 + 500) * B),
        ("halving_doubling", "broadcast", 5, 100, 1, 3 * (A + 100 * B)),
        ("halving_doubling", "reduce", 5, 100, 1, 3 * (A + 100 * B + 100 * G)),
        ("bruck", "allgather", 5, 500, 1, 3 * A + 400 * B),
        ("direct", "allreduce", 4, 1000, 1, 6 * A + 1500 * B + 750 * G),
        ("direct", "reduce_scatter", 4, 1000, 1, 3 * A + 750 * B + 750 * G),
        ("direct", "allgather", 4, 1000, 1, 3 * A + 750 * B),
        ("direct", "broadcast", 4, 1000, 1, 3 * A + 3000 * B),
        ("direct", "reduce", 4, 1000, 1, 3 * A + 3000 * B + 3000 * G),
    ],
)
def test_formula_at_a_point(name: str, op: str, p: int, n: int, segments: int, expected: float) -> None:
    assert _cost(name, op, p, n, segments=segments) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_one_rank_and_zero_bytes(name: str) -> None:
    for op in ALGORITHMS[name].ops:
        assert _cost(name, op, 1, 1e6, segments=4 if op in ALGORITHMS[name].pipelined_ops else 1) == 0
        latency = _cost(name, op, 8, 0, ALPHA_ONLY)
        assert latency >= 1 and _cost(name, op, 8, 0) == pytest.approx(latency * A)


@pytest.mark.parametrize("lg", range(1, 8))
def test_rabenseifner_matches_the_textbook_form_for_powers_of_two(lg: int) -> None:
    p, n = 1 << lg, 1e6
    textbook = 2 * lg * A + 2 * n * (p - 1) / p * B + n * (p - 1) / p * G
    assert _cost("halving_doubling", "allreduce", p, n) == pytest.approx(textbook)
    assert _cost("halving_doubling", "reduce_scatter", p, n) == pytest.approx(
        lg * A + n * (p - 1) / p * (B + G)
    )
    assert _cost("halving_doubling", "allgather", p, n) == pytest.approx(_cost("bruck", "allgather", p, n))


# --- formulas agree with the schedules ---------------------------------------------------------------


def _per_rank(schedule: Schedule, nbytes: float) -> tuple[int, float, float]:
    """(most messages, most bytes sent or received, most bytes reduced) over ranks, whole schedule."""
    buffer = nbytes * schedule.world_size if schedule.op == "alltoall" else nbytes  # n: a rank's input
    chunk = buffer / schedule.num_chunks
    messages, moved, reduced = 0, 0.0, 0.0
    for steps in schedule.steps:
        sent = sum(len(s.chunks) for step in steps for s in step.sends) * chunk
        got = sum(len(r.chunks) for step in steps for r in step.recvs) * chunk
        added = sum(len(r.chunks) for step in steps for r in step.recvs if r.reduce) * chunk
        count = max(sum(len(step.sends) for step in steps), sum(len(step.recvs) for step in steps))
        messages, moved, reduced = max(messages, count), max(moved, sent, got), max(reduced, added)
    return messages, moved, reduced


def _coefficients(name: str, op: str, p: int, n: float, segments: int = 1) -> tuple[float, float, float]:
    return tuple(_cost(name, op, p, n, m, segments) for m in (ALPHA_ONLY, BETA_ONLY, GAMMA_ONLY))


def _schedule(name: str, op: str, p: int, segments: int = 1) -> Schedule:
    return build_schedule(op, name, p, 0 if op in ROOTED_OPS else None, segments)


LATENCY_BOUND = [("ring", op) for op in ALGORITHMS["ring"].ops]
LATENCY_BOUND += [("halving_doubling", op) for op in ALGORITHMS["halving_doubling"].ops] + [
    ("bruck", "allgather"),
    ("bruck", "alltoall"),
    ("pairwise", "alltoall"),
]


@pytest.mark.parametrize(("name", "op"), LATENCY_BOUND, ids=[f"{a}-{o}" for a, o in LATENCY_BOUND])
@pytest.mark.parametrize("p", [2, 3, 4, 6, 8, 11, 16, 32])
def test_alpha_coefficient_is_the_critical_path_in_steps(name: str, op: str, p: int) -> None:
    for segments in (1, 3) if op in ALGORITHMS[name].pipelined_ops else (1,):
        schedule = _schedule(name, op, p, segments)
        alpha, _, _ = _coefficients(name, op, p, 1.0, segments)
        assert alpha == simulate(schedule).rounds
        if op not in ALGORITHMS[name].pipelined_ops:
            assert alpha == max(len(steps) for steps in schedule.steps)


BANDWIDTH = [
    (name, op)
    for name in ("ring", "halving_doubling", "bruck", "pairwise", "direct")
    for op in ALGORITHMS[name].ops
    if op not in ALGORITHMS[name].pipelined_ops
]


@pytest.mark.parametrize(("name", "op"), BANDWIDTH, ids=[f"{a}-{o}" for a, o in BANDWIDTH])
@pytest.mark.parametrize("p", [2, 4, 8, 16, 32])
def test_beta_and_gamma_coefficients_are_the_busiest_ranks_bytes(name: str, op: str, p: int) -> None:
    n = 64.0 * p
    _, beta, gamma = _coefficients(name, op, p, n)
    _, moved, reduced = _per_rank(_schedule(name, op, p), n)
    assert beta == pytest.approx(moved) and gamma == pytest.approx(reduced)


@pytest.mark.parametrize("p", [3, 5, 6, 7, 12, 13])
@pytest.mark.parametrize("op", ["allreduce", "reduce_scatter", "allgather"])
def test_folded_halving_doubling_bounds_the_busiest_ranks_bytes(op: str, p: int) -> None:
    n = 64.0 * p
    alpha, beta, gamma = _coefficients("halving_doubling", op, p, n)
    schedule = _schedule("halving_doubling", op, p)
    _, moved, reduced = _per_rank(schedule, n)
    assert alpha == max(len(steps) for steps in schedule.steps) == simulate(schedule).rounds
    assert beta >= moved - 1e-9 and gamma >= reduced - 1e-9


@pytest.mark.parametrize("p", [2, 4, 8, 16])
@pytest.mark.parametrize("op", ["allreduce", "reduce_scatter", "allgather"])
def test_direct_alpha_coefficient_counts_every_message(op: str, p: int) -> None:
    alpha, _, _ = _coefficients("direct", op, p, 1.0)
    messages, _, _ = _per_rank(_schedule("direct", op, p), 1.0)
    assert alpha == messages == (2 if op == "allreduce" else 1) * (p - 1)


@pytest.mark.parametrize("p", [2, 3, 5, 8, 13, 32])
@pytest.mark.parametrize("op", ["allreduce", "broadcast", "reduce"])
def test_tree_formula_bounds_its_schedule(op: str, p: int) -> None:
    for segments in (1, 2, 8):
        schedule = _schedule("tree", op, p, segments)
        alpha, beta, gamma = _coefficients("tree", op, p, 1e6, segments)
        _, moved, reduced = _per_rank(schedule, 1e6)
        assert alpha >= simulate(schedule).rounds
        assert beta >= moved - 1e-6 and gamma >= reduced - 1e-6


# --- segments -----------------------------------------------------------------------------------------

PIPELINED = [
    ("ring", "broadcast"),
    ("ring", "reduce"),
    ("tree", "allreduce"),
    ("tree", "broadcast"),
    ("tree", "reduce"),
]


@pytest.mark.parametrize(("name", "op"), PIPELINED, ids=[f"{a}-{o}" for a, o in PIPELINED])
@pytest.mark.parametrize("p", [4, 16])
def test_best_segments_grows_with_size(name: str, op: str, p: int) -> None:
    algorithm = get_algorithm(name)
    sizes = [10.0**e for e in range(1, 11)]
    best = [algorithm.best_segments(op, p, n, DEFAULT_COST_MODEL) for n in sizes]
    assert best == sorted(best)
    assert best[0] == 1 and 1 < best[-1] <= MAX_SEGMENTS
    for n, k in zip(sizes, best, strict=True):
        chosen = algorithm.cost(op, p, n, DEFAULT_COST_MODEL)
        assert chosen == algorithm.cost(op, p, n, DEFAULT_COST_MODEL, k)
        assert chosen == min(
            algorithm.cost(op, p, n, DEFAULT_COST_MODEL, j) for j in range(1, MAX_SEGMENTS + 1)
        )


def test_unpipelined_ops_have_one_segment_and_ignore_it() -> None:
    ring = get_algorithm("ring")
    assert ring.best_segments("allreduce", 8, 1e9, DEFAULT_COST_MODEL) == 1
    assert ring.cost("allreduce", 8, 1e6, MODEL, 9) == ring.cost("allreduce", 8, 1e6, MODEL)
    assert get_algorithm("direct").best_segments("broadcast", 8, 1e9, DEFAULT_COST_MODEL) == 1


def test_cost_errors() -> None:
    with pytest.raises(InvalidArgumentError, match=r"'bruck' does not implement reduce.*'ring'"):
        get_algorithm("bruck").cost("reduce", 4, 100, MODEL)
    with pytest.raises(InvalidArgumentError, match=r"nbytes=-1"):
        get_algorithm("ring").cost("allreduce", 4, -1, MODEL)
    with pytest.raises(InvalidArgumentError, match=r"model='dict'"):
        get_algorithm("ring").cost("allreduce", 4, 1, {})
    with pytest.raises(InvalidArgumentError, match=r"segments=0"):
        get_algorithm("tree").cost("allreduce", 4, 1, MODEL, 0)


def test_ring_beats_halving_doubling_only_where_bandwidth_dominates() -> None:
    # Latency-bound sizes favour lg p steps, large ones favour the fewest bytes (equal here for p = 2^k).
    small = {
        name: _cost(name, "allreduce", 16, 1e3, DEFAULT_COST_MODEL, None)
        for name in ("ring", "halving_doubling")
    }
    assert small["halving_doubling"] < small["ring"]
    ratio = _cost("ring", "allreduce", 16, 1e10, DEFAULT_COST_MODEL) / _cost(
        "halving_doubling", "allreduce", 16, 1e10, DEFAULT_COST_MODEL
    )
    assert ratio == pytest.approx(1.0, rel=1e-3)


def test_flat_schedules_across_hosts_gain_nothing_from_concurrent_messages() -> None:
    """A calibrated gain for concurrent messages (measured on a host) must not make a flat schedule's
    messages between hosts faster than their host's one link: 3 + 1 ranks, direct allreduce (its three
    messages per phase at once) costs the same under concurrency 1.45 as under 1, while on one host the
    gain still applies (there the ranks' copies run on several cores)."""
    from dataclasses import replace

    from commlab.collectives.hosts import HostMap

    inside = CostModel(alpha=1e-4, beta=1e-10, concurrency=2.0)
    flat = CostModel(alpha=5e-4, beta=8e-9, gamma=1e-10, concurrency=1.45, intra=inside, inter=inside)
    hosts = HostMap.parse("3,1")
    direct = ALGORITHMS["direct"]
    n = 64 << 20
    across = direct.cost("allreduce", 4, n, flat, hosts=hosts)
    assert flat.flat_across_hosts().concurrency == 1.0
    assert across == direct.cost("allreduce", 4, n, replace(flat, concurrency=1.0), hosts=hosts)
    # the wire-bound part alone: 2 phases x 3 messages of n/4 bytes one after another at beta
    assert across >= 2 * 3 * (n / 4) * flat.beta
    one_host = direct.cost("allreduce", 4, n, flat)
    assert one_host < direct.cost("allreduce", 4, n, replace(flat, concurrency=1.0))


def test_pieces_are_sized_by_the_largest_message() -> None:
    """`pieces_for` cuts a schedule's largest message, not its chunk, into pieces of about piece_bytes:
    halving-doubling's first step sends half the buffer (2 of p = 4 chunks) to one peer, the ring one
    chunk per message; so at 16 MiB and 1 MiB pieces the ring takes 4 pieces, halving-doubling 8, and
    both stop at MAX_PIECES. One rank, or piece_bytes 0, means no slicing."""
    from commlab.collectives.tuning import MAX_PIECES, pieces_for

    mib = 1 << 20
    assert pieces_for("allreduce", "ring", 4, 16 * mib, 1, mib) == 4
    assert pieces_for("allreduce", "halving_doubling", 4, 16 * mib, 1, mib) == 8
    assert pieces_for("allreduce", "halving_doubling", 4, 4 * mib, 1, mib) == 2
    assert pieces_for("allreduce", "halving_doubling", 4, 1024 * mib, 1, mib) == MAX_PIECES
    assert pieces_for("allreduce", "ring", 4, mib, 1, mib) == 1
    assert pieces_for("allreduce", "halving_doubling", 1, 16 * mib, 1, mib) == 1
    assert pieces_for("allreduce", "halving_doubling", 4, 16 * mib, 1, 0) == 1
