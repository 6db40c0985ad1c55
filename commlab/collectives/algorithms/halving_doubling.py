"""Recursive halving and doubling (Rabenseifner), recursive doubling, binomial trees, Bruck: lg p rounds.

Non-powers of two use MPICH's fold: with p' the largest power of two <= p and rem = p - p', among the first
2 rem ranks each even rank hands its data to rank+1 and sits out; the p' remaining ranks (virtual rank v is
real rank 2v+1 for v < rem, else v+rem) run the power-of-two algorithm, and the odd ranks hand the result
back at the end. Virtual rank v answers for the blocks of the real ranks folded into it, which are
contiguous, so halving and doubling move contiguous block ranges.

Cost (p ranks, n bytes, p' = 2^floor(lg p), rem = p - p', L = lg p', f = [rem > 0], b = n/p):
    allreduce       (2L + 2f) alpha + (2n(p'-1)/p' + 2fn) beta + (n(p'-1)/p' + fn) gamma
    reduce_scatter  (L + 2f) alpha + f(n + b) beta + f n gamma + sum_h (h + min(rem, h)) b (beta + gamma)
    allgather       (L + 2f) alpha + f(b + (p-1)b) beta + sum_h (h + min(rem, h)) b beta
                    (h over p'/2, ..., 2, 1; both reduce to L alpha + n(p-1)/p beta (+gamma) for p = p')
    broadcast       ceil(lg p) (alpha + n beta)                       (binomial tree)
    reduce          ceil(lg p) (alpha + n (beta + gamma))
    bruck allgather ceil(lg p) alpha + n(p-1)/p beta                  (any p, no fold)
    bruck alltoall  ceil(lg p) alpha + sum_k |{o in 1..p-1: bit k of o}| n/p beta
                    (about lg p / 2 times the bytes of a direct exchange, in lg p rounds: small messages)
    recursive doubling allreduce (the whole buffer every step: fewest steps, for small messages)
                    (L + 2f) alpha + (L + 2f) n beta + (L + f) n gamma
"""

from __future__ import annotations

from collections.abc import Callable

from commlab.collectives.cost import CostModel, ceil_log2, floor_pow2
from commlab.collectives.schedule import Schedule, ScheduleBuilder
from commlab.errors import invalid

NAME = "halving_doubling"
OPS = ("allreduce", "reduce_scatter", "allgather", "broadcast", "reduce")  # no all-to-all
BRUCK = "bruck"
BRUCK_OPS = ("allgather", "alltoall")
RECURSIVE_DOUBLING = "recursive_doubling"
RECURSIVE_DOUBLING_OPS = ("allreduce",)


def _real(virtual: int, rem: int) -> int:
    """The real rank that plays virtual rank `virtual` after the fold."""
    return 2 * virtual + 1 if virtual < rem else virtual + rem


def _block_start(virtual: int, rem: int) -> int:
    """The first block that virtual rank `virtual` answers for (blocks of folded-in ranks are contiguous)."""
    return 2 * virtual if virtual <= rem else virtual + rem


def _halving(builder: ScheduleBuilder, p2: int, rem: int, slot: int, start: Callable[[int], int]) -> int:
    """Recursive halving over the p2 virtual ranks; v ends with the sum of chunks start(v)..start(v+1)-1.

    At distance d (p2/2 down to 1) v keeps the half of its group's chunks on its side of bit d and sends
    the other half to v xor d, which adds it in. Returns the next free slot.
    """
    d = p2 // 2
    while d >= 1:
        for v in range(p2):
            other = (v ^ d) & ~(d - 1)  # first virtual rank of the half v gives away
            chunks = range(start(other), start(other + d))
            builder.transfer(slot, _real(v, rem), _real(v ^ d, rem), chunks, reduce=True)
        d //= 2
        slot += 1
    return slot


def _doubling(builder: ScheduleBuilder, p2: int, rem: int, slot: int, start: Callable[[int], int]) -> int:
    """Recursive doubling over p2 virtual ranks: v starts with chunks start(v)..start(v+1)-1, ends with all.

    At distance d (1 up to p2/2) v sends the chunks of its group of d virtual ranks to v xor d.
    """
    d = 1
    while d < p2:
        for v in range(p2):
            own = v & ~(d - 1)
            chunks = range(start(own), start(own + d))
            builder.transfer(slot, _real(v, rem), _real(v ^ d, rem), chunks, reduce=False)
        d *= 2
        slot += 1
    return slot


def rabenseifner_allreduce(world_size: int) -> Schedule:
    """Fold, recursive-halving reduce-scatter and recursive-doubling allgather over p' chunks, unfold."""
    p = world_size
    p2 = floor_pow2(p)
    rem = p - p2
    everything = range(p2)
    builder = ScheduleBuilder("allreduce", NAME, p, p2)
    for i in range(rem):
        builder.transfer(0, 2 * i, 2 * i + 1, everything, reduce=True)
    slot = _halving(builder, p2, rem, 1, lambda v: v)
    slot = _doubling(builder, p2, rem, slot, lambda v: v)
    for i in range(rem):
        builder.transfer(slot, 2 * i + 1, 2 * i, everything, reduce=False)
    return builder.build()


def halving_reduce_scatter(world_size: int) -> Schedule:
    """Fold, recursive halving over blocks, then each folded pair's odd rank returns its partner's block."""
    p = world_size
    p2 = floor_pow2(p)
    rem = p - p2
    builder = ScheduleBuilder("reduce_scatter", NAME, p, p)
    for i in range(rem):
        builder.transfer(0, 2 * i, 2 * i + 1, range(p), reduce=True)
    slot = _halving(builder, p2, rem, 1, lambda v: _block_start(v, rem))
    for i in range(rem):
        builder.transfer(slot, 2 * i + 1, 2 * i, [2 * i], reduce=False)
    return builder.build()


def doubling_allgather(world_size: int) -> Schedule:
    """Folded pairs' even ranks give rank+1 their block; recursive doubling; even ranks get the rest."""
    p = world_size
    p2 = floor_pow2(p)
    rem = p - p2
    builder = ScheduleBuilder("allgather", NAME, p, p)
    for i in range(rem):
        builder.transfer(0, 2 * i, 2 * i + 1, [2 * i], reduce=False)
    slot = _doubling(builder, p2, rem, 1, lambda v: _block_start(v, rem))
    for i in range(rem):
        builder.transfer(slot, 2 * i + 1, 2 * i, [b for b in range(p) if b != 2 * i], reduce=False)
    return builder.build()


def binomial_broadcast(world_size: int, root: int) -> Schedule:
    """At step s every virtual rank v < 2^s (v = rank - root mod p) sends the buffer to v + 2^s."""
    p = world_size
    builder = ScheduleBuilder("broadcast", NAME, p, 1, root)
    for s in range(ceil_log2(p)):
        d = 1 << s
        for v in range(min(d, p - d)):
            builder.transfer(s, (v + root) % p, (v + d + root) % p, [0], reduce=False)
    return builder.build()


def binomial_reduce(world_size: int, root: int) -> Schedule:
    """At step s every virtual rank whose lowest set bit is 2^s sends its partial sum to v - 2^s."""
    p = world_size
    builder = ScheduleBuilder("reduce", NAME, p, 1, root)
    for s in range(ceil_log2(p)):
        d = 1 << s
        for v in range(d, p, 2 * d):
            builder.transfer(s, (v + root) % p, (v - d + root) % p, [0], reduce=True)
    return builder.build()


def bruck_allgather(world_size: int) -> Schedule:
    """ceil(lg p) steps: at distance d rank r sends the min(d, p-d) blocks r, r+1, ... (mod p) to r-d."""
    p = world_size
    builder = ScheduleBuilder("allgather", BRUCK, p, p)
    for s in range(ceil_log2(p)):
        d = 1 << s
        count = min(d, p - d)
        for r in range(p):
            builder.transfer(s, r, (r - d) % p, [(r + i) % p for i in range(count)], reduce=False)
    return builder.build()


def recursive_doubling_allreduce(world_size: int) -> Schedule:
    """Fold; at distance d (1 up to p'/2) v and v xor d swap their whole buffers and both add; unfold.

    lg p' steps (plus 2 for the fold) instead of Rabenseifner's 2 lg p', at lg p' times the bytes: the
    fastest allreduce while a message costs more than moving the buffer.
    """
    p = world_size
    p2 = floor_pow2(p)
    rem = p - p2
    builder = ScheduleBuilder("allreduce", RECURSIVE_DOUBLING, p, 1)
    for i in range(rem):
        builder.transfer(0, 2 * i, 2 * i + 1, [0], reduce=True)
    slot, d = 1, 1
    while d < p2:
        for v in range(p2):
            builder.transfer(slot, _real(v, rem), _real(v ^ d, rem), [0], reduce=True)
        d *= 2
        slot += 1
    for i in range(rem):
        builder.transfer(slot, 2 * i + 1, 2 * i, [0], reduce=False)
    return builder.build()


def build(op: str, world_size: int, root: int | None = None, segments: int = 1) -> Schedule:
    """The halving-doubling family's schedule for `op` (arguments already validated by the registry)."""
    if op == "allreduce":
        return rabenseifner_allreduce(world_size)
    if op == "reduce_scatter":
        return halving_reduce_scatter(world_size)
    if op == "allgather":
        return doubling_allgather(world_size)
    if op == "broadcast":
        return binomial_broadcast(world_size, root)
    if op == "reduce":
        return binomial_reduce(world_size, root)
    raise invalid("op", op, OPS)


def bruck_alltoall(world_size: int) -> Schedule:
    """Bruck's all-to-all: block (s, d) travels offset o = (d - s) mod p in hops of the bits of o.

    At round k a block whose offset has bit k set moves 2^k ranks on; its holder then is s + (o mod 2^k).
    Each rank sends one message per round (every block it holds with bit k set), ceil(lg p) rounds. The
    p x p layout keeps each block at its own index on every rank it passes, so no local rotation is needed.
    """
    p = world_size
    builder = ScheduleBuilder("alltoall", BRUCK, p, p * p)
    for k in range(ceil_log2(p)):
        hop = 1 << k
        outgoing: dict[int, list[int]] = {}
        for s in range(p):
            for d in range(p):
                offset = (d - s) % p
                if offset & hop:
                    holder = (s + (offset & (hop - 1))) % p
                    outgoing.setdefault(holder, []).append(s * p + d)
        for holder, chunks in sorted(outgoing.items()):
            builder.transfer(k, holder, (holder + hop) % p, sorted(chunks), reduce=False)
    return builder.build()


def bruck_alltoall_blocks(world_size: int) -> int:
    """Blocks a rank sends over Bruck's all-to-all: offsets 1..p-1 counted once per set bit."""
    return sum(bin(offset).count("1") for offset in range(1, world_size))


def build_bruck(op: str, world_size: int, root: int | None = None, segments: int = 1) -> Schedule:
    """Bruck's allgather or all-to-all."""
    if op == "allgather":
        return bruck_allgather(world_size)
    if op == "alltoall":
        return bruck_alltoall(world_size)
    raise invalid("op", op, BRUCK_OPS)


def build_recursive_doubling(
    op: str, world_size: int, root: int | None = None, segments: int = 1
) -> Schedule:
    """Recursive doubling allreduce (the only op it builds)."""
    if op != "allreduce":
        raise invalid("op", op, RECURSIVE_DOUBLING_OPS)
    return recursive_doubling_allreduce(world_size)


def _folded_blocks(p2: int, rem: int) -> int:
    """Blocks the busiest rank moves over the halving (or the doubling) steps: sum_h (h + min(rem, h))."""
    total, h = 0, p2 // 2
    while h >= 1:
        total += h + min(rem, h)
        h //= 2
    return total


def cost(op: str, world_size: int, nbytes: float, model: CostModel, segments: int = 1) -> float:
    """Seconds for the halving-doubling `op` on p ranks moving n bytes (formulas in the module docstring)."""
    p, n = world_size, nbytes
    p2 = floor_pow2(p)
    rem = p - p2
    steps = p2.bit_length() - 1
    fold = 1 if rem else 0
    block = n / p
    if op == "allreduce":
        share = n * (p2 - 1) / p2
        return model.time(2 * steps + 2 * fold, 2 * share + 2 * fold * n, share + fold * n)
    if op == "reduce_scatter":
        moved = _folded_blocks(p2, rem) * block
        return model.time(steps + 2 * fold, fold * (n + block) + moved, fold * n + moved)
    if op == "allgather":
        moved = _folded_blocks(p2, rem) * block
        return model.time(steps + 2 * fold, fold * (block + (p - 1) * block) + moved)
    if op == "broadcast":
        return ceil_log2(p) * model.time(1, n)
    if op == "reduce":
        return ceil_log2(p) * model.time(1, n, n)
    raise invalid("op", op, OPS)


def bruck_cost(op: str, world_size: int, nbytes: float, model: CostModel, segments: int = 1) -> float:
    """Seconds for Bruck's allgather (ceil(lg p) alpha + n(p-1)/p beta) or all-to-all (module docstring)."""
    if op == "allgather":
        return model.time(ceil_log2(world_size), nbytes * (world_size - 1) / world_size)
    if op == "alltoall":
        blocks = bruck_alltoall_blocks(world_size)
        return model.time(ceil_log2(world_size), blocks * nbytes / world_size)
    raise invalid("op", op, BRUCK_OPS)


def recursive_doubling_cost(
    op: str, world_size: int, nbytes: float, model: CostModel, segments: int = 1
) -> float:
    """Seconds for recursive doubling allreduce: (L + 2f)(alpha + n beta) + (L + f) n gamma."""
    if op != "allreduce":
        raise invalid("op", op, RECURSIVE_DOUBLING_OPS)
    p2 = floor_pow2(world_size)
    steps = p2.bit_length() - 1
    fold = 1 if world_size > p2 else 0
    return model.time(steps + 2 * fold, (steps + 2 * fold) * nbytes, (steps + fold) * nbytes)
