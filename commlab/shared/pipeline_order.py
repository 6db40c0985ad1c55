"""Pipeline schedules: their names and the order in which every pipeline rank runs its tasks.

A task is (FORWARD or BACKWARD, microbatch, chunk on this rank). GPipe runs every forward, then every
backward; 1F1B runs pp - rank - 1 warm-up forwards, then alternates one forward and one backward, then
the cool-down backwards; interleaved 1F1B is Megatron-LM's order over v chunks per rank (virtual stage
k = chunk x pp + rank). The runtime's `Pipeline` (parallel/pipeline.py) runs these orders and the
training simulator (sim/training/pipeline.py) times them: one definition, so both run the same sequence.
"""

from __future__ import annotations

from commlab.errors import invalid

SCHEDULES = ("gpipe", "1f1b", "interleaved")
FORWARD, BACKWARD = 0, 1
Task = tuple[int, int, int]  # (FORWARD or BACKWARD, microbatch, chunk on this rank)


def pipeline_order(schedule: str, rank: int, stages: int, microbatches: int, chunks: int = 1) -> list[Task]:
    """The tasks pipeline rank `rank` of `stages` runs, in order, for `microbatches` and `chunks` per rank."""
    p, m, v = stages, microbatches, chunks
    if schedule == "gpipe":
        return [(FORWARD, i, 0) for i in range(m)] + [(BACKWARD, i, 0) for i in range(m)]
    if schedule == "1f1b":
        warmup = min(p - rank - 1, m)
        order: list[Task] = [(FORWARD, i, 0) for i in range(warmup)]
        for i in range(m - warmup):
            order += [(FORWARD, warmup + i, 0), (BACKWARD, i, 0)]
        return order + [(BACKWARD, i, 0) for i in range(m - warmup, m)]
    if schedule == "interleaved":
        return _interleaved(rank, p, m, v)
    raise invalid("schedule", schedule, SCHEDULES)


def _interleaved(rank: int, p: int, m: int, v: int) -> list[Task]:
    """Megatron-LM's interleaved 1F1B (forward_backward_pipelining_with_interleaving): microbatches in
    groups of p run through chunk 0, then chunk 1, ...; backwards take the chunks in reverse."""
    total = m * v
    warmup = total if m == p else min((p - rank - 1) * 2 + (v - 1) * p, total)

    def task(kind: int, k: int) -> Task:
        group = k % (p * v)
        chunk = group // p
        if kind == BACKWARD:
            chunk = v - 1 - chunk
        return (kind, (k // (p * v)) * p + k % p, chunk)

    order = [task(FORWARD, k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [task(FORWARD, warmup + k), task(BACKWARD, k)]
    return order + [task(BACKWARD, k) for k in range(total - warmup, total)]
