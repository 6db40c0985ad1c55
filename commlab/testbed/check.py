"""`commlab testbed check`: does every wire deliver what was set? TCP throughput and round trips per wire.

Each direction of each wire is measured on a route between two hosts that crosses it (for a host's wire,
a partner on the same switch where there is one): the probe's receiver times the bytes, and the result
is compared with the slowest set rate on that route, which is what TCP can reach there. The round trip
is compared with the set latencies of the route, out and back (what the probe adds on its own, tens of
microseconds of veth, bridge and Python, is reported, not subtracted). Where a wire is a user-space delay
line (no netem), the route's round trip is that relay's: never below the set value, above it by the
relay's wake-up delays (tens of microseconds idle, more under load). A wire whose relay died fails the
check with an error naming it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass

from commlab.errors import TestbedError
from commlab.testbed import probe
from commlab.testbed.plan import Host, Wire
from commlab.testbed.testbed import Testbed

PORT = 5301
PROBE = (sys.executable, probe.__file__)  # run as a file: importing commlab (torch) takes seconds
TARGET = 0.9  # a wire passes when it delivers at least this fraction of its route's set rate


@dataclass
class LinkCheck:
    """One direction of one wire: the route measured and what it delivered against what was set."""

    wire: int
    direction: str  # "a->b" names, e.g. "npu0->switch"
    route: str  # "npu0 -> npu1"
    set_rate: float  # bytes/s: the slowest set rate on the route
    measured_rate: float
    set_rtt: float  # s: the route's set latencies, out and back
    measured_rtt: float  # s: median probe round trip
    delay_line: bool = False  # whether the route crosses a user-space delay line (no netem)

    @property
    def ratio(self) -> float:
        return self.measured_rate / self.set_rate

    @property
    def passed(self) -> bool:
        return self.ratio >= TARGET


def _probe(testbed: Testbed, src: Host, dst: Host, args: list[str], timeout: float) -> dict:
    server = subprocess.Popen(
        testbed.command(dst, [*PROBE, "serve", str(PORT), str(timeout)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = server.stdout.readline().strip()
        if ready != "ready":
            raise TestbedError(
                f"the probe server on {dst.hostname} did not start: {server.stderr.read()[-500:]}"
            )
        client = [*PROBE, args[0], dst.address, str(PORT), *args[1:]]
        done = subprocess.run(
            testbed.command(src, [*client, str(timeout)]),
            capture_output=True,
            text=True,
            timeout=timeout + 10,
        )
        if done.returncode != 0:
            raise TestbedError(f"probe {src.hostname} -> {dst.hostname} failed: {done.stderr.strip()[-500:]}")
        return json.loads(done.stdout)
    except subprocess.TimeoutExpired:
        raise TestbedError(f"probe {src.hostname} -> {dst.hostname} took over {timeout + 10:g} s") from None
    finally:
        try:
            server.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _route_figures(testbed: Testbed, src: Host, dst: Host) -> tuple[float, float]:
    """The slowest set rate from src to dst, and the set round trip (latencies out and back)."""
    hops = testbed.plan.route(src, dst)
    rate = min(w.rate_ab if forward else w.rate_ba for w, forward in hops)
    rtt = sum(w.latency_ab + w.latency_ba for w, _ in hops)
    return rate, rtt


def _pair_for(testbed: Testbed, wire: Wire) -> tuple[Host, Host]:
    """Two hosts whose route crosses `wire` a -> b: the first host on a's side, then one on b's side."""
    plan = testbed.plan
    hosts = plan.hosts
    for src in hosts:
        for dst in hosts:
            if src is dst:
                continue
            if any(w.index == wire.index and forward for w, forward in plan.route(src, dst)):
                if wire.host and src.label == wire.a:
                    same = [h for h in hosts if h is not src and h.switch == src.switch]
                    if same:
                        return src, same[0]
                return src, dst
    raise TestbedError(f"no two hosts are joined over wire {wire.index} ({wire.a} <-> {wire.b})")


def check(testbed: Testbed, seconds: float = 1.0, pings: int = 50, timeout: float = 30.0) -> list[LinkCheck]:
    """Measure both directions of every wire: about `seconds` of TCP traffic at the set rate each."""
    if len(testbed.plan.hosts) < 2:
        raise TestbedError("check needs at least two hosts")
    dead = testbed.dead_relays()
    if dead:
        wires = {w.index: w for w in testbed.plan.wires}
        names = ", ".join(
            f"wire {k} ({wires[k].a} <-> {wires[k].b}, relay pid {pid})" for k, pid in sorted(dead.items())
        )
        raise TestbedError(
            f"dead wires: the delay line of {names} no longer runs, so nothing crosses it; "
            "commlab testbed down, then up again (the relay's log: "
            f"{testbed.directory}/{testbed.run}.delay*.log)"
        )
    relays = testbed.relays()
    results = []
    for wire in testbed.plan.wires:
        src, dst = _pair_for(testbed, wire)
        for a, b, name in ((src, dst, f"{wire.a}->{wire.b}"), (dst, src, f"{wire.b}->{wire.a}")):
            set_rate, set_rtt = _route_figures(testbed, a, b)
            size = int(min(max(set_rate * seconds, 1 << 20), 256 << 20))
            sent = _probe(testbed, a, b, ["send", str(size)], timeout)
            rtt = _probe(testbed, a, b, ["rtt", str(pings)], timeout)
            rate = sent["bytes"] / sent["seconds"] if sent["seconds"] > 0 else 0.0
            route = f"{a.hostname} -> {b.hostname}"
            relayed = any(w.index in relays for w, _ in testbed.plan.route(a, b))
            results.append(
                LinkCheck(wire.index, name, route, set_rate, rate, set_rtt, rtt["median"], relayed)
            )
    return results


def report(results: list[LinkCheck]) -> list[str]:
    """The check as a table: one line per wire direction, then a verdict line."""
    lines = [
        f"{'wire':>4}  {'direction':<22} {'route':<20} {'set':>10} {'measured':>10} {'ratio':>6}  "
        f"{'set rtt':>9} {'rtt':>9}  ok"
    ]
    for r in results:
        lines.append(
            f"{r.wire:>4}  {r.direction:<22} {r.route:<20} {r.set_rate * 8e-6:>6.1f} Mb/s "
            f"{r.measured_rate * 8e-6:>6.1f} Mb/s {r.ratio:>6.1%}  {r.set_rtt * 1e3:>6.3f} ms "
            f"{r.measured_rtt * 1e3:>6.3f} ms  {'yes' if r.passed else 'NO'}"
            + ("  (delay line)" if r.delay_line else "")
        )
    passed = sum(r.passed for r in results)
    lines.append(f"{passed}/{len(results)} wire directions deliver >= {TARGET:.0%} of their set rate")
    return lines


def as_json(results: list[LinkCheck]) -> list[dict]:
    return [dict(asdict(r), ratio=r.ratio, passed=r.passed) for r in results]
