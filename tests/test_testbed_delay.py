"""The testbed's user-space delay line (commlab.testbed.delay): latency on kernels without netem.

The relay's logic is tested anywhere on socket pairs (a frame per datagram, as on a TAP). The emulated
wires need root; where the tests do not run as root they skip and say why. No test asserts a speed: a
delay line cannot deliver a frame before its latency is up, so the set latency is a lower bound that holds
however loaded the machine is; the upper bounds are the set value plus 250 ms, far above any wake-up delay
of a loaded 2-core machine, so they only catch a relay that does not relay.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from commlab import errors
from commlab.testbed import delay_line, system
from commlab.testbed.delay import DelayLine
from commlab.testbed.testbed import Testbed, remove_run

ROOT = Path(__file__).resolve().parents[1]
SLACK = 0.25  # s: the generous upper margin (see the module docstring)
SPEC = "switch:n=2,bandwidth=100Mb/s,latency=5ms"  # 5 ms per direction of each host's wire
needs_root = pytest.mark.skipif(
    not system.is_privileged(),
    reason="the delay line builds TAP devices in network namespaces: needs root (CAP_NET_ADMIN, "
    "CAP_SYS_ADMIN); these tests run as root in CI",
)


# ------------------------------------------------------------------------------------ the relay (anywhere)


def _relay_until(line: DelayLine, done, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        line.step(0.01)


def test_delay_line_relays_each_direction_in_order_no_earlier_than_its_latency() -> None:
    a_outer, a_inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b_outer, b_inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a_inner, b_inner, b_outer, a_outer):
        s.setblocking(False)
    line = DelayLine(a_inner.fileno(), b_inner.fileno(), latency_ab=0.03, latency_ba=0.01)
    sent = time.monotonic()
    frames = [bytes([k]) * (60 + k) for k in range(20)]
    for frame in frames:
        a_outer.send(frame)
    b_outer.send(b"back")
    got_b: list[bytes] = []
    got_a: list[tuple[float, bytes]] = []
    arrival_b: list[float] = []

    def drain() -> bool:
        for sock, out, times in ((b_outer, got_b, arrival_b), (a_outer, got_a, None)):
            try:
                while True:
                    data = sock.recv(2048)
                    if times is None:
                        out.append((time.monotonic(), data))
                    else:
                        out.append(data)
                        times.append(time.monotonic())
            except BlockingIOError:
                pass
        return len(got_b) == len(frames) and len(got_a) == 1

    _relay_until(line, drain)
    assert got_b == frames  # every frame, in order, byte for byte
    assert got_a[0][1] == b"back"
    # A frame is queued when read (after `sent`) and written when due: never before its latency.
    assert min(arrival_b) - sent >= 0.03 and got_a[0][0] - sent >= 0.01
    assert max(arrival_b) - sent < 0.03 + SLACK
    assert line.relayed == [20, 1] and line.dropped == [0, 0]
    for s in (a_outer, a_inner, b_outer, b_inner):
        s.close()


def test_delay_line_refuses_a_latency_it_cannot_hold() -> None:
    with pytest.raises(ValueError, match="latency_ba"):
        DelayLine(0, 1, 0.001, -1.0)


# ------------------------------------------------------------------------------------ emulated wires (root)


def _running(pids: list[int], run: str) -> list[int]:
    return [pid for pid in pids if delay_line.alive(pid, run)]


@needs_root
def test_delay_topology_round_trip_is_at_least_the_set_latency_and_tcp_crosses_it(tmp_path) -> None:
    from commlab.testbed.check import check, report

    with Testbed.up(SPEC, directory=tmp_path, relay=True) as testbed:
        relays = testbed.relays()
        assert sorted(relays) == [0, 1] and _running(list(relays.values()), testbed.run)
        kinds = system.run(["ip", "-n", testbed.fabric, "-d", "link", "show", "dev", "w0"])
        assert "tun type tap" in kinds and "master br0" in kinds
        described = "\n".join(testbed.describe())
        assert f"delay line pid {relays[0]} (running)" in described
        results = check(testbed, seconds=0.25, pings=5)
        print("\n".join(report(results)))
        for r in results:
            assert r.delay_line and r.set_rtt == pytest.approx(0.02)  # 5 ms x 2 wires x out and back
            assert r.set_rtt <= r.measured_rtt < r.set_rtt + SLACK
            assert r.measured_rate > 0  # >= 1 MiB crossed both relays over TCP
        wire = testbed.plan.wires[0]
        crossed = testbed.counters()[wire.index]
        assert min(crossed) >= 1 << 20  # the bytes went through the TAP ends, not around them


@needs_root
def test_a_dead_relay_is_named_by_check_and_down_leaves_no_relay_and_no_namespace(tmp_path) -> None:
    from commlab.testbed.check import check

    with Testbed.up(SPEC, directory=tmp_path, relay=True) as testbed:
        pids = testbed.relays()
        os.kill(pids[1], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while delay_line.alive(pids[1], testbed.run) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert testbed.dead_relays() == {1: pids[1]}
        with pytest.raises(errors.TestbedError, match=r"wire 1 \(npu1 <-> switch, relay pid"):
            check(testbed, seconds=0.25, pings=2)
    assert not _running(list(pids.values()), testbed.run)
    assert not [n for n in system.namespaces() if n.startswith(testbed.run)]


@needs_root
def test_relays_outlive_the_process_that_built_them_until_down(tmp_path) -> None:
    """`commlab testbed up` exits after building: its relays must carry on, and `down` stop them."""
    code = (
        "import os; from commlab.testbed.testbed import Testbed; "
        f"t = Testbed.up({SPEC!r}, directory={str(tmp_path)!r}, relay=True); "
        "print(t.run, *t.relays().values(), flush=True); os._exit(0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    run, *pids = done.stdout.split()
    try:
        assert done.returncode == 0, done.stderr
        assert len(_running([int(p) for p in pids], run)) == 2
    finally:
        remove_run(run, tmp_path)
    assert not _running([int(p) for p in pids], run)
    assert not [n for n in system.namespaces() if n.startswith(run)] and not list(tmp_path.glob(f"{run}*"))


@needs_root
def test_a_relay_exits_by_itself_once_its_testbed_namespace_is_gone(tmp_path) -> None:
    testbed = Testbed.up(SPEC, directory=tmp_path, relay=True)
    try:
        pids = list(testbed.relays().values())
        system.run(["ip", "netns", "delete", testbed.fabric])  # the name only: nothing is killed
        deadline = time.monotonic() + 10  # the relay looks once a second
        while _running(pids, testbed.run) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(pids, testbed.run)
    finally:
        testbed.down()
    assert not [n for n in system.namespaces() if n.startswith(testbed.run)]


@needs_root
def test_a_relay_that_cannot_start_fails_the_build_and_leaves_nothing(tmp_path) -> None:
    before = set(system.namespaces())
    with pytest.raises(errors.TestbedError, match=r"did not start.*latency_ab = 100.0"):
        Testbed.up("switch:n=2,latency=100s", directory=tmp_path, relay=True)
    assert set(system.namespaces()) == before and not list(tmp_path.glob("commlab-*"))
