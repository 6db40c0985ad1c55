"""The commands the testbed runs: `ip` (namespaces, veth pairs, bridges, addresses) and `tc` (shaping).

Every command names its namespace with `ip -n NS` / `tc -n NS`, so nothing here configures the root
namespace's network. A failed command raises TestbedError with the command and its stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from commlab.errors import TestbedError, invalid

NETNS_ETC = Path("/etc/netns")  # `ip netns exec NS` bind-mounts /etc/netns/NS/hosts over /etc/hosts
COMMAND_TIMEOUT = 30.0  # seconds for one ip/tc command; they normally take milliseconds


CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21  # bits of the capability sets (linux/capability.h)


def effective_capabilities() -> int:
    """This process's effective capability set, from /proc/self/status (0 where it cannot be read)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def is_privileged() -> bool:
    """Whether this process may create namespaces and configure their networks."""
    caps = effective_capabilities()
    return os.geteuid() == 0 and bool(caps >> CAP_NET_ADMIN & 1) and bool(caps >> CAP_SYS_ADMIN & 1)


def require_root() -> None:
    """Raise TestbedError unless this process may create namespaces and configure their networks."""
    if not is_privileged():
        raise TestbedError(
            "commlab testbed needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN (network namespaces, veth "
            "pairs, bridges, tc); run it with sudo"
        )
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            raise TestbedError(f"commlab testbed needs `{tool}` (iproute2, util-linux) on PATH")


def run(args: list[str], check: bool = True, timeout: float = COMMAND_TIMEOUT) -> str:
    """Run one command; its stdout. check=False returns "" on failure instead of raising."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TestbedError(f"`{' '.join(args)}` did not finish within {timeout:g} s") from None
    if done.returncode != 0:
        if not check:
            return ""
        raise TestbedError(f"`{' '.join(args)}` failed (exit {done.returncode}): {done.stderr.strip()}")
    return done.stdout


def ip(namespace: str, *args: str, check: bool = True) -> str:
    return run(["ip", "-n", namespace, *args], check)


def tc(namespace: str, *args: str, check: bool = True) -> str:
    return run(["tc", "-n", namespace, *args], check)


def namespaces() -> list[str]:
    """The names of every network namespace `ip netns` knows."""
    out = run(["ip", "-j", "netns", "list"], check=False).strip()
    return [entry["name"] for entry in json.loads(out)] if out else []


def add_namespace(name: str) -> None:
    run(["ip", "netns", "add", name])
    ip(name, "link", "set", "lo", "up")


def delete_namespace(name: str) -> None:
    """Kill what still runs in a namespace, delete it (its veth ends go with it, and so do their peers)
    and its /etc/netns files."""
    if name in namespaces():
        for pid in run(["ip", "netns", "pids", name], check=False).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        run(["ip", "netns", "delete", name], check=False)
    shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


def write_hosts_file(namespace: str, entries: list[tuple[str, str]], own: str) -> None:
    """/etc/netns/NS/hosts: localhost and every emulated host, so names resolve (c10d, hydra need it)."""
    folder = NETNS_ETC / namespace
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["127.0.0.1 localhost", "::1 localhost"]
    lines += [f"{address} {hostname}" for address, hostname in entries]
    (folder / "hosts").write_text("\n".join(lines) + "\n")
    (folder / "hostname").write_text(own + "\n")


LATENCY_FLOOR = 20e-6  # s: a veth pair and a bridge already take about this long; less is not emulated


BUCKET_SECONDS = 0.001  # the default token bucket: this much of the wire's traffic (see bucket_bytes)
GSO_SEGMENT = 64 << 10  # the largest packet a veth hands its qdisc (TCP segmentation offload)
MIN_BUCKET_BYTES = 2 * GSO_SEGMENT  # a veth's bucket at least: a smaller one stalls TCP (bucket_bytes)
TAP_MIN_BUCKET_BYTES = 64 << 10  # a delay line's TAP devices pass frames <= MTU (no offloads)


def bucket_bytes(rate: float, bucket: float = BUCKET_SECONDS, floor: int = MIN_BUCKET_BYTES) -> int:
    """The tbf bucket (burst) of a wire of `rate` bytes/s: `bucket` seconds of its traffic, at least
    `floor` bytes. A message that finds the bucket full leaves at the device's speed, not the wire's
    (a real wire never does), so the bucket is kept small: 1 ms, or two GSO segments (128 KiB) on a veth,
    where a bucket of one segment stalls TCP (a 64 KiB exchange step at 400 Mbit/s took 6x the wire
    time). Measured in benchmarks/testbed_bucket.py; docs/design.md, "the tbf bucket"."""
    if isinstance(bucket, bool) or not isinstance(bucket, (int, float)) or not 0 < bucket <= 1:
        raise invalid("bucket", bucket, "seconds in (0, 1], e.g. 0.001")
    return max(floor, round(rate * bucket))


def shape(
    namespace: str,
    device: str,
    rate: float,
    latency: float,
    bucket: float = BUCKET_SECONDS,
    floor: int = MIN_BUCKET_BYTES,
) -> None:
    """Egress of `device`: a token bucket at `rate` bytes/s (tbf) of `bucket_bytes(rate, bucket, floor)`,
    and a netem child delaying by `latency` seconds where that is above LATENCY_FLOOR. Replaces whatever
    was there. The queue holds 50 ms, enough for TCP to keep the link busy."""
    bits = max(8, round(rate * 8))
    burst = bucket_bytes(rate, bucket, floor)
    tc(namespace, "qdisc", "del", "dev", device, "root", check=False)
    tc(namespace, "qdisc", "add", "dev", device, "root", "handle", "1:", "tbf", "rate", f"{bits}bit",
       "burst", str(burst), "latency", "50ms")  # fmt: skip
    if latency > LATENCY_FLOOR:
        if not has_netem():
            raise TestbedError(
                f"a link latency of {latency * 1e3:g} ms needs tc's netem, which this kernel lacks "
                "(CONFIG_NET_SCH_NETEM); give the topology latency <= "
                f"{LATENCY_FLOOR * 1e6:g} us (e.g. latency=0) or use a kernel with netem"
            )
        delay = f"{round(latency * 1e6)}us"
        tc(namespace, "qdisc", "add", "dev", device, "parent", "1:1", "handle", "10:", "netem",
           "delay", delay, "limit", "100000")  # fmt: skip


_NETEM: list[bool] = []


def has_netem() -> bool:
    """Whether the kernel has tc's netem qdisc (tried once on a veth pair in a scratch namespace)."""
    if not _NETEM:
        scratch = f"commlab-probe-{os.getpid()}"
        add_namespace(scratch)
        try:
            ip(scratch, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
            tc(scratch, "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms", check=False)
            _NETEM.append(_qdisc_kind(scratch, "p0") == "netem")
        finally:
            delete_namespace(scratch)
    return _NETEM[0]


def _qdisc_kind(namespace: str, device: str) -> str:
    out = tc(namespace, "-j", "qdisc", "show", "dev", device, check=False)
    qdiscs = json.loads(out) if out.strip() else []
    return qdiscs[0].get("kind", "") if qdiscs else ""


def wait_operational(namespace: str, device: str, timeout: float = 5.0) -> None:
    """Wait until a device just set up has its carrier (a bridge port's state cannot be set before)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = ip(namespace, "-j", "link", "show", "dev", device, check=False)
        if out.strip() and json.loads(out)[0].get("operstate") in ("UP", "UNKNOWN"):
            return
        time.sleep(0.05)
    raise TestbedError(f"{device} in {namespace} did not come up within {timeout:g} s")


def set_port(namespace: str, device: str, forwarding: bool) -> None:
    """A bridge port forwarding, or disabled: frames on it are dropped silently while the link stays up
    (what 100% loss looks like to TCP: no reset, no carrier change, only retransmissions)."""
    state = "3" if forwarding else "0"  # `ip link set type bridge_slave state` is ignored by some kernels
    run(["ip", "netns", "exec", namespace, "bridge", "link", "set", "dev", device, "state", state])


def link_counters(namespace: str) -> dict[str, tuple[int, int]]:
    """(tx_bytes, rx_bytes) of every interface in a namespace, from `ip -s -j link`."""
    out = ip(namespace, "-s", "-j", "link", "show")
    counters = {}
    for link in json.loads(out):
        stats = link.get("stats64", {})
        counters[link["ifname"]] = (int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"]))
    return counters


def wrap(namespace: str, hostname: str, command: list[str]) -> list[str]:
    """argv that runs `command` in a namespace under its own hostname: `ip netns exec` (network, and the
    /etc/netns hosts file) then a fresh UTS namespace whose hostname is set before `command` starts."""
    return ["ip", "netns", "exec", namespace, "unshare", "--uts", "--", "sh", "-c",
            'hostname "$0" && exec "$@"', hostname, *command]  # fmt: skip
