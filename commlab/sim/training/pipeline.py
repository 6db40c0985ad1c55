"""A dependency simulation of one data-parallel replica's pipeline schedule.

A task is the forward (F) or backward (B) of one microbatch on one model chunk. Each pipeline rank runs
its tasks in the order its schedule gives (`commlab.shared.pipeline_order`, the order the runtime's
`Pipeline` runs: GPipe, 1F1B, or Megatron-LM's interleaved 1F1B over v chunks per rank).
A forward on virtual stage k waits for the same microbatch's forward on stage k - 1 and the
point-to-point transfer of its activations; a backward on stage k waits for stage k + 1's backward and
the gradient transfer. Virtual stage k = chunk x pp + rank, so chunk c of the last rank feeds chunk c + 1
of the first. A task starts when its rank is free and its input has arrived.
"""

from __future__ import annotations

from dataclasses import dataclass

from commlab.shared.pipeline_order import BACKWARD, FORWARD, Task, pipeline_order


def schedule_order(schedule: str, rank: int, stages: int, microbatches: int, chunks: int = 1) -> list[Task]:
    """The tasks pipeline rank `rank` of `stages` runs, in order (the runtime's order: `pipeline_order`)."""
    return pipeline_order(schedule, rank, stages, microbatches, chunks)


def peak_in_flight(order: list[Task], weights: list[float]) -> float:
    """The most activation bytes a rank holds at once: chunk c's forward adds weights[c], its backward
    frees them."""
    level = peak = 0.0
    for kind, _, chunk in order:
        level += weights[chunk] if kind == FORWARD else -weights[chunk]
        peak = max(peak, level)
    return peak


@dataclass
class PipelineRun:
    """Start and end of every task on every rank (in each rank's order), and summary figures."""

    orders: list[list[Task]]
    starts: list[list[float]]
    ends: list[list[float]]

    @property
    def makespan(self) -> float:
        return max(e[-1] for e in self.ends if e)

    def busy(self, rank: int) -> float:
        return sum(e - s for s, e in zip(self.starts[rank], self.ends[rank], strict=True))

    def bubble_fraction(self) -> float:
        """Idle share of the ranks' time until the last task ends, averaged over ranks."""
        span = self.makespan
        if span <= 0:
            return 0.0
        idle = sum(span - self.busy(r) for r in range(len(self.orders)))
        return idle / (span * len(self.orders))

    def last_backward(self, rank: int, chunk: int) -> tuple[float, float]:
        """(start, end) of the last backward of `chunk` on `rank`: when that chunk's gradients are done."""
        for i in range(len(self.orders[rank]) - 1, -1, -1):
            kind, _, c = self.orders[rank][i]
            if kind == BACKWARD and c == chunk:
                return self.starts[rank][i], self.ends[rank][i]
        raise ValueError(f"rank {rank} has no backward of chunk {chunk}")


def run_pipeline(
    orders: list[list[Task]],
    forward: list[float],
    backward: list[float],
    send_forward: list[float],
    send_backward: list[float],
    microbatches: int,
) -> PipelineRun:
    """Simulate the ranks' task orders. Per virtual stage k: `forward[k]`, `backward[k]` durations;
    `send_forward[k]` the transfer from stage k to k + 1, `send_backward[k]` from k + 1 to k."""
    p = len(orders)
    stages = len(forward)
    m = microbatches
    fend = [-1.0] * (m * stages)
    bend = [-1.0] * (m * stages)
    ptr, free = [0] * p, [0.0] * p
    starts: list[list[float]] = [[] for _ in range(p)]
    ends: list[list[float]] = [[] for _ in range(p)]
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for d in range(p):
            order, i, t = orders[d], ptr[d], free[d]
            start_d, end_d = starts[d], ends[d]
            while i < len(order):
                kind, mb, chunk = order[i]
                k = chunk * p + d
                slot = mb * stages + k
                if kind == FORWARD:
                    if k == 0:
                        ready = 0.0
                    else:
                        done = fend[slot - 1]
                        if done < 0:
                            break
                        ready = done + send_forward[k - 1]
                    start = t if t > ready else ready
                    t = start + forward[k]
                    fend[slot] = t
                else:
                    if k == stages - 1:
                        ready = fend[slot]
                    else:
                        done = bend[slot + 1]
                        if done < 0:
                            break
                        ready = done + send_backward[k]
                    start = t if t > ready else ready
                    t = start + backward[k]
                    bend[slot] = t
                start_d.append(start)
                end_d.append(t)
                i += 1
            if i != ptr[d]:
                progressed = True
                remaining -= i - ptr[d]
                ptr[d], free[d] = i, t
        if not progressed:
            raise RuntimeError("pipeline schedule deadlocked: a task waits for one that never runs")
    return PipelineRun(orders, starts, ends)
