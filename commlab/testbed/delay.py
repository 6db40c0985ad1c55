"""A user-space delay line: one emulated wire with latency, for kernels without tc's netem.

    python -m commlab.testbed.delay HOME A_NAMESPACE:A_DEVICE B_NAMESPACE:B_DEVICE LATENCY_AB LATENCY_BA

The relay creates two TAP devices (IFF_TAP | IFF_NO_PI, so plain Ethernet frames of at most the MTU with
full checksums: no offloads are enabled), each in its namespace: /dev/net/tun is opened after entering
that namespace, which is where the kernel creates the device, and the descriptor stays valid wherever the
process goes next. It then enters HOME (the testbed's fabric namespace, so `ip netns pids` and the
namespace's deletion find it), prints "ready", and copies every frame read from one device to the other
LATENCY seconds later (per direction, in order: one queue per direction, `select` sleeping until the next
frame is due). The wire's rate is not the relay's business: tc's token bucket on each TAP's egress sets
it, as on a veth pair; frames beyond what the relay keeps up with wait in, then drop from, the kernel's
queue of the TAP, as on a congested link.

The devices exist only while the relay holds them (not persistent): a relay that dies takes its wire with
it. It exits on SIGTERM/SIGINT, and by itself within a second once HOME is deleted (the testbed is gone).

Only the standard library: the testbed runs this file directly, without importing commlab (and torch).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"  # where `ip netns add` mounts the namespaces it names
MAX_FRAME = 65535
QUEUE_LIMIT = 20000  # frames held per direction; beyond this the relay drops (far above rate x latency)
READ_BATCH = 64  # frames read from one device per wake-up before the other gets its turn
HOME_POLL = 1.0  # s between checks that the testbed still exists


def enter_namespace(name: str) -> None:
    """Move this (single-threaded) process into the named network namespace (`ip netns` names)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns into network namespace {name!r}: {os.strerror(code)}")
    finally:
        os.close(fd)


def open_tap(namespace: str, device: str) -> int:
    """A non-blocking descriptor of a new TAP device `device` created in `namespace`."""
    if not device or len(device.encode()) > 15:
        raise ValueError(f"device name {device!r}: 1 to 15 bytes accepted")
    enter_namespace(namespace)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", device.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


class DelayLine:
    """Two TAP descriptors and a queue per direction: frames read from `ends[d]` are written to the other
    end `latency[d]` seconds after they were read."""

    def __init__(self, a: int, b: int, latency_ab: float, latency_ba: float) -> None:
        for name, value in (("latency_ab", latency_ab), ("latency_ba", latency_ba)):
            if not 0 <= value < 60:
                raise ValueError(f"{name} = {value!r}: seconds in [0, 60) accepted")
        self.ends = (a, b)
        self.latency = (latency_ab, latency_ba)
        self.queues: tuple[collections.deque, collections.deque] = (collections.deque(), collections.deque())
        self.dropped = [0, 0]
        self.relayed = [0, 0]

    def _read(self, d: int, now: float) -> None:
        queue, due = self.queues[d], now + self.latency[d]
        for _ in range(READ_BATCH):
            try:
                frame = os.read(self.ends[d], MAX_FRAME)
            except (BlockingIOError, InterruptedError):
                return
            if len(queue) >= QUEUE_LIMIT:
                self.dropped[d] += 1
            else:
                queue.append((due, frame))

    def _flush(self, now: float) -> None:
        for d, queue in enumerate(self.queues):
            out = self.ends[1 - d]
            while queue and queue[0][0] <= now:
                frame = queue.popleft()[1]
                try:
                    os.write(out, frame)
                    self.relayed[d] += 1
                except OSError as err:  # EIO: that end is down (a broken wire); EAGAIN: its queue is full
                    if err.errno not in (errno.EIO, errno.EAGAIN, errno.ENOBUFS, errno.EINVAL):
                        raise
                    self.dropped[d] += 1

    def next_due(self) -> float | None:
        heads = [q[0][0] for q in self.queues if q]
        return min(heads) if heads else None

    def step(self, longest: float) -> None:
        """Write what is due, then wait (at most `longest` s) for frames or the next due time."""
        now = time.monotonic()
        self._flush(now)
        due = self.next_due()
        timeout = longest if due is None else min(longest, max(0.0, due - time.monotonic()))
        try:
            ready, _, _ = select.select(self.ends, [], [], timeout)
        except InterruptedError:
            return
        now = time.monotonic()
        for d, fd in enumerate(self.ends):
            if fd in ready:
                self._read(d, now)


def _parse_end(text: str) -> tuple[str, str]:
    namespace, sep, device = text.rpartition(":")
    if not sep or not namespace or not device:
        raise ValueError(f"{text!r}: NAMESPACE:DEVICE accepted")
    return namespace, device


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    home, a_text, b_text, ab_text, ba_text = argv
    try:
        (a_ns, a_dev), (b_ns, b_dev) = _parse_end(a_text), _parse_end(b_text)
        latency_ab, latency_ba = float(ab_text), float(ba_text)
        a = open_tap(a_ns, a_dev)
        b = open_tap(b_ns, b_dev)
        enter_namespace(home)
        line = DelayLine(a, b, latency_ab, latency_ba)
    except (OSError, ValueError) as err:
        print(f"delay line {a_text} <-> {b_text}: {err}", file=sys.stderr)
        return 1
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _: stop.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _: stop.append(signum))
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # whoever waited for "ready" may close its end of the pipe
    os.close(devnull)
    marker = os.path.join(NETNS_DIR, home)
    checked = time.monotonic()
    while not stop:
        line.step(HOME_POLL)
        if time.monotonic() - checked >= HOME_POLL:
            checked = time.monotonic()
            if not os.path.exists(marker):
                break
    print(
        f"delay line {a_text} <-> {b_text}: relayed {line.relayed} frames, dropped {line.dropped}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
