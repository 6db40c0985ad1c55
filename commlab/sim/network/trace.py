"""Chrome trace export of simulated collectives (chrome://tracing and https://ui.perfetto.dev open it).

One process per simulated collective; in it a track per rank with a slice per step (its bytes sent and
received and its peers in the slice's arguments), and counter tracks with the utilization over time of the
busiest links (each message's bytes spread evenly over its bandwidth phase, on every link of its route).
Times are microseconds, as the format wants.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from commlab.errors import invalid
from commlab.sim.network.engine import SimResult
from commlab.sim.network.routing import _expand
from commlab.sim.network.units import format_size


def _step_events(result: SimResult, pid: int) -> list[dict]:
    plan = result.routed.plan
    sent = np.bincount(plan.msg_src_step, weights=result.msg_bytes, minlength=plan.num_steps)
    received = np.bincount(plan.msg_dst_step, weights=result.msg_bytes, minlength=plan.num_steps)
    peers: list[list[int]] = [[] for _ in range(plan.num_steps)]
    for src_step, dst_step, src, dst in zip(
        plan.msg_src_step.tolist(),
        plan.msg_dst_step.tolist(),
        plan.msg_src.tolist(),
        plan.msg_dst.tolist(),
        strict=True,
    ):
        peers[src_step].append(dst)
        peers[dst_step].append(src)
    index = plan.step_index
    events = []
    for s in range(plan.num_steps):
        start, end = float(result.step_start[s]), float(result.step_end[s])
        events.append(
            {
                "name": f"step {int(index[s])}",
                "ph": "X",
                "pid": pid,
                "tid": int(plan.step_rank[s]),
                "ts": start * 1e6,
                "dur": max(end - start, 0.0) * 1e6,
                "args": {
                    "bytes_sent": int(sent[s]),
                    "bytes_received": int(received[s]),
                    "peers": sorted(set(peers[s])),
                },
            }
        )
    return events


def _link_counters(result: SimResult, pid: int, links: int) -> list[dict]:
    """Utilization counters of the `links` busiest links over time."""
    util = result.link_utilization()
    if util is None or links <= 0:
        return []
    routes = result.routed.routes
    top = np.argsort(util)[::-1][:links]
    top = top[util[top] > 0]
    capacity = result.topology.compiled.bandwidth
    start, end = result.msg_start, result.msg_end
    busy = end > start
    msgs = np.flatnonzero(busy)
    owner, pos = _expand(routes.ptr, result.routed.msg_pair[msgs])
    link = routes.links[pos]
    events = []
    for rank_in_top, lid in enumerate(top.tolist()):
        on = link == lid
        m = msgs[owner[on]]
        if len(m) == 0:
            continue
        rate = result.msg_bytes[m] / (end[m] - start[m]) / capacity[lid]
        times = np.concatenate([start[m], end[m]])
        delta = np.concatenate([rate, -rate])
        order = np.argsort(times, kind="stable")
        times, level = times[order], np.cumsum(delta[order])
        last = np.r_[times[1:] != times[:-1], True]
        u, v = result.topology.link_label(lid)
        name = f"link {rank_in_top}: {u} -> {v}"
        events.extend(
            {
                "name": name,
                "ph": "C",
                "pid": pid,
                "ts": t * 1e6,
                "args": {"utilization": round(max(x, 0.0), 6)},
            }
            for t, x in zip(times[last].tolist(), level[last].tolist(), strict=True)
        )
    return events


def chrome_trace(results: SimResult | Sequence[SimResult], links: int = 8) -> dict:
    """The trace of one or more simulated collectives (congestion or flow fidelity), as a dict."""
    if isinstance(results, SimResult):
        results = [results]
    events: list[dict] = []
    for pid, result in enumerate(results, start=1):
        if result.routed is None:
            raise invalid(
                "fidelity", result.fidelity, "'congestion' or 'flow' (analytic results have no timeline)"
            )
        label = (
            f"{result.algorithm} {result.op} {format_size(result.nbytes)} on {result.topology.name} "
            f"({result.fidelity}, {result.time * 1e6:.1f} us)"
        )
        events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": label}})
        for rank in range(result.world_size):
            events.append(
                {"name": "thread_name", "ph": "M", "pid": pid, "tid": rank, "args": {"name": f"rank {rank}"}}
            )
        events.extend(_step_events(result, pid))
        events.extend(_link_counters(result, pid, links))
    return {"traceEvents": events, "displayTimeUnit": "ns"}


def write_trace(results: SimResult | Sequence[SimResult], path: str | Path, links: int = 8) -> Path:
    """Write the Chrome trace JSON of `results` to `path`."""
    path = Path(path)
    path.write_text(json.dumps(chrome_trace(results, links)))
    return path
