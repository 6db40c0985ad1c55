"""Chrome trace of a simulated training step (chrome://tracing or https://ui.perfetto.dev open it).

One process per pipeline rank of the simulated data-parallel replica, with tracks for compute,
tensor-parallel collectives, point-to-point transfers and data-parallel gradient buckets. Every forward
(F) and backward (B) task is laid out segment by segment: merged compute kernels on the compute track,
each TP collective on the TP track while the compute stream waits for it. Times in microseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

from commlab.errors import invalid
from commlab.sim.training.pipeline import FORWARD
from commlab.sim.training.step import TrainingResult, mesh_rank

TRACKS = {"compute": 0, "tensor parallel": 1, "pipeline p2p": 2, "data parallel": 3}


def training_trace(result: TrainingResult) -> dict:
    """The trace of `result` (simulated with keep_timeline=True) as a dict."""
    run, templates = result.run, result.templates
    if run is None or templates is None:
        raise invalid("result", "without timeline", "a result of simulate_training(..., keep_timeline=True)")
    layout = result.layout
    p = layout.pp
    events: list[dict] = []
    for d in range(p):
        rank = mesh_rank(0, d, 0, layout)
        events.append(
            {
                "name": "process_name",
                "ph": "M",
                "pid": d,
                "args": {"name": f"pipeline rank {d} (rank {rank})"},
            }
        )
        events.append({"name": "process_sort_index", "ph": "M", "pid": d, "args": {"sort_index": d}})
        for name, tid in TRACKS.items():
            events.append({"name": "thread_name", "ph": "M", "pid": d, "tid": tid, "args": {"name": name}})
        for (kind, mb, chunk), start, end in zip(run.orders[d], run.starts[d], run.ends[d], strict=True):
            k = chunk * p + d
            label = f"{'F' if kind == FORWARD else 'B'} mb{mb}" + (
                f" c{chunk}" if layout.virtual_stages > 1 else ""
            )
            events.append(_slice(label, d, TRACKS["compute"], start, end, {"virtual_stage": k}))
            stages = len(result.sends) + 1
            if kind == FORWARD and k < stages - 1:
                events.append(_slice(f"send F mb{mb}", d, TRACKS["pipeline p2p"], end, end + result.sends[k]))
            elif kind != FORWARD and k > 0:
                events.append(
                    _slice(f"send B mb{mb}", d, TRACKS["pipeline p2p"], end, end + result.sends[k - 1])
                )
            t = start
            for is_comm, name, seconds in templates[k][0 if kind == FORWARD else 1]:
                if is_comm:
                    events.append(_slice(name, d, TRACKS["tensor parallel"], t, t + seconds))
                t += seconds
        for i, (start, end) in enumerate(result.buckets[d] if result.buckets else []):
            events.append(_slice(f"gradient bucket {i}", d, TRACKS["data parallel"], start, end))
    tail_start = result.step_time - sum(v for k, v in result.tail.items() if k != "data_parallel_wait")
    t = tail_start
    for name in ("embedding_sync", "optimizer", "zero_allgather"):
        seconds = result.tail[name]
        if seconds > 0:
            track = TRACKS["compute"] if name == "optimizer" else TRACKS["data parallel"]
            for d in range(p):
                events.append(_slice(name.replace("_", " "), d, track, t, t + seconds))
            t += seconds
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": result.to_dict()}


def _slice(name: str, pid: int, tid: int, start: float, end: float, args: dict | None = None) -> dict:
    event = {
        "name": name,
        "ph": "X",
        "pid": pid,
        "tid": tid,
        "ts": start * 1e6,
        "dur": max(end - start, 0.0) * 1e6,
    }
    if args:
        event["args"] = args
    return event


def write_training_trace(result: TrainingResult, path: str | Path) -> Path:
    """Write the Chrome trace JSON of `result` to `path`."""
    path = Path(path)
    path.write_text(json.dumps(training_trace(result)))
    return path
