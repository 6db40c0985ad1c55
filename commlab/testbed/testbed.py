"""`Testbed`: one emulated cluster on this machine, built from a plan and recorded in a state file.

    with Testbed.up("switch:n=2,bandwidth=200Mb/s") as testbed:
        testbed.exec("npu0", ["hostname"])

Layout of a run `commlab-<id>`: a namespace `commlab-<id>-fabric` holds one Linux bridge per switch and
the switch ends of every veth pair (`w<k>` for host wire k, `w<k>a`/`w<k>b` for a switch-switch wire);
a namespace `commlab-<id>-<hostname>` per host holds the host end, `eth0`, with the host's address. Each
direction of a wire is shaped on the egress of the end that sends it (tbf rate; netem delay where the
kernel has it). A wire with latency on a kernel without netem is a delay line instead of a veth pair:
the same two device names, as TAP devices joined by a relay process (commlab.testbed.delay) that adds
the latency. The state file `<state dir>/<run>.json` is written before anything is created and lists
every namespace (and each relay's pid as it starts), so `down` removes a crashed run's leftovers too
(processes still in them, and relays, included).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from commlab.errors import TestbedError, invalid
from commlab.sim.network.topology import Topology
from commlab.sim.network.topology_io import parse_topology
from commlab.testbed import delay_line, system
from commlab.testbed.plan import (
    HOST_DEVICE,
    Host,
    NetworkPlan,
    Wire,
    plan_for,
    topology_toml,
    with_ranks_per_host,
)

PREFIX = "commlab-"
WIRE_STATES = ("up", "down", "drop")
STATE_ENV = "COMMLAB_TESTBED_DIR"


def state_dir() -> Path:
    """Where runs are recorded: $COMMLAB_TESTBED_DIR, else /run/commlab-testbed."""
    return Path(os.environ.get(STATE_ENV) or "/run/commlab-testbed")


@dataclass
class Testbed:
    """A built (or recorded) emulated cluster: its run id, plan and state directory."""

    __test__ = False  # a name pytest would otherwise try to collect from the tests that import it

    run: str
    plan: NetworkPlan
    directory: Path
    relay: bool | None = None  # delay lines: None where the kernel lacks netem, True always, False never
    bucket: float = system.BUCKET_SECONDS  # each wire's token bucket, in seconds of its rate

    # ------------------------------------------------------------------------------------------ names
    @property
    def fabric(self) -> str:
        return f"{self.run}-fabric"

    def namespace(self, host: Host) -> str:
        return f"{self.run}-{host.hostname}"

    def namespaces(self) -> list[str]:
        return [self.fabric, *(self.namespace(h) for h in self.plan.hosts)]

    @property
    def state_file(self) -> Path:
        return self.directory / f"{self.run}.json"

    @property
    def topology_file(self) -> Path:
        """The emulated network as a commlab topology file: `commlab sim ... --topology` this file."""
        return self.directory / f"{self.run}.toml"

    def bridge(self, switch: str) -> str:
        return f"br{self.plan.switches.index(switch)}"

    @staticmethod
    def ends(wire: Wire) -> tuple[str, str]:
        """The fabric-side device names of a wire: the switch end of a host wire (and "" for the host side,
        which is `eth0` in the host's namespace), or both ends of a switch-switch wire."""
        return (f"w{wire.index}", "") if wire.host else (f"w{wire.index}a", f"w{wire.index}b")

    # ------------------------------------------------------------------------------------------ life
    @classmethod
    def up(
        cls,
        topology: str | Topology,
        ranks_per_host: int | str | Sequence[int] = 1,
        directory: Path | None = None,
        relay: bool | None = None,
        bucket: float = system.BUCKET_SECONDS,
    ) -> Testbed:
        """Build the emulated cluster of `topology` (a spec, a file, or a Topology) with `ranks_per_host`
        ranks on every host, or one count per host ('3,1', [3, 1]: uneven hosts). On any failure, or
        Ctrl-C, while building, whatever was created is removed again. `relay`: how a wire gets its
        latency: None, by netem where the kernel has it, else by a user-space delay line; True, always by
        a delay line; False, only by netem (an error without it). `bucket`: the seconds of its rate each
        wire's token bucket holds (`system.bucket_bytes`)."""
        if relay not in (None, True, False):
            raise invalid("relay", relay, [None, True, False])
        system.bucket_bytes(1.0, bucket)  # a bad value fails here, before anything is built
        system.require_root()
        topo = parse_topology(topology) if isinstance(topology, str) else topology
        topo = with_ranks_per_host(topo, ranks_per_host)
        plan = plan_for(topo)
        directory = Path(directory) if directory else state_dir()
        directory.mkdir(parents=True, exist_ok=True)
        testbed = cls(PREFIX + secrets.token_hex(3), plan, directory, relay, bucket)
        testbed._save(spec=topology if isinstance(topology, str) else topo.name)
        testbed.topology_file.write_text(topology_toml(topo))
        try:
            testbed._build()
        except BaseException:
            testbed.down()
            raise
        return testbed

    def _save(self, spec: str) -> None:
        state = {
            "run": self.run,
            "spec": spec,
            "created": time.time(),
            "pid": os.getpid(),
            "namespaces": self.namespaces(),
            "bucket": self.bucket,
            "plan": self.plan.to_dict(),
        }
        self.state_file.write_text(json.dumps(state, indent=1))

    def _build(self) -> None:
        fabric = self.fabric
        system.add_namespace(fabric)
        for switch in self.plan.switches:
            bridge = self.bridge(switch)
            system.ip(fabric, "link", "add", bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0")
            system.ip(fabric, "link", "set", bridge, "up")
        entries = [(h.address, h.hostname) for h in self.plan.hosts]
        for host in self.plan.hosts:
            namespace = self.namespace(host)
            system.add_namespace(namespace)
            system.write_hosts_file(namespace, entries, host.hostname)
        for wire in self.plan.wires:
            a_end, b_end = self.ends(wire)
            if self.delayed(wire):
                self._delay_line(wire)
            elif wire.host:
                host = self.plan.host(wire.a)
                namespace = self.namespace(host)
                system.ip(fabric, "link", "add", a_end, "type", "veth", "peer", "name", HOST_DEVICE,
                          "netns", namespace)  # fmt: skip
                system.ip(namespace, "addr", "add", f"{host.address}/16", "dev", HOST_DEVICE)
                system.ip(namespace, "link", "set", HOST_DEVICE, "up")
                system.ip(fabric, "link", "set", a_end, "master", self.bridge(wire.b), "up")
                system.shape(namespace, HOST_DEVICE, wire.rate_ab, wire.latency_ab, self.bucket)
                system.shape(fabric, a_end, wire.rate_ba, wire.latency_ba, self.bucket)
            else:
                system.ip(fabric, "link", "add", a_end, "type", "veth", "peer", "name", b_end)
                system.ip(fabric, "link", "set", a_end, "master", self.bridge(wire.a), "up")
                system.ip(fabric, "link", "set", b_end, "master", self.bridge(wire.b), "up")
                system.shape(fabric, a_end, wire.rate_ab, wire.latency_ab, self.bucket)
                system.shape(fabric, b_end, wire.rate_ba, wire.latency_ba, self.bucket)

    def delayed(self, wire: Wire) -> bool:
        """Whether `wire` is built as a user-space delay line (TAP pair + relay) instead of a veth pair:
        where it needs latency and netem cannot give it (or `relay` asks for delay lines)."""
        needs = max(wire.latency_ab, wire.latency_ba) > system.LATENCY_FLOOR
        if not needs or self.relay is False:
            return False
        return self.relay is True or not system.has_netem()

    def _delay_line(self, wire: Wire) -> None:
        """A wire as two TAP devices joined by a relay process (commlab.testbed.delay): the same device
        names, addresses, bridge ports and token buckets as a veth pair; the relay adds the latency."""
        fabric = self.fabric
        a_end, b_end = self.ends(wire)
        if wire.host:
            host = self.plan.host(wire.a)
            a_ns, a_dev, b_ns, b_dev = self.namespace(host), HOST_DEVICE, fabric, a_end
        else:
            a_ns, a_dev, b_ns, b_dev = fabric, a_end, fabric, b_end
        pid = delay_line.start(
            fabric, (a_ns, a_dev), (b_ns, b_dev), wire.latency_ab, wire.latency_ba,
            self.directory / f"{self.run}.delay{wire.index}.log",
        )  # fmt: skip
        self._record_relay(wire.index, pid)
        if wire.host:
            system.ip(a_ns, "addr", "add", f"{host.address}/16", "dev", a_dev)
            system.ip(a_ns, "link", "set", a_dev, "up")
            system.ip(fabric, "link", "set", b_dev, "master", self.bridge(wire.b), "up")
        else:
            system.ip(fabric, "link", "set", a_dev, "master", self.bridge(wire.a), "up")
            system.ip(fabric, "link", "set", b_dev, "master", self.bridge(wire.b), "up")
        system.shape(a_ns, a_dev, wire.rate_ab, 0.0, self.bucket, system.TAP_MIN_BUCKET_BYTES)
        system.shape(b_ns, b_dev, wire.rate_ba, 0.0, self.bucket, system.TAP_MIN_BUCKET_BYTES)

    def _record_relay(self, wire: int, pid: int) -> None:
        """Add a relay's pid to the state file at once, so a crash later in the build still finds it."""
        state = json.loads(self.state_file.read_text())
        state.setdefault("relays", {})[str(wire)] = pid
        self.state_file.write_text(json.dumps(state, indent=1))

    def relays(self) -> dict[int, int]:
        """The pid of each wire's delay line (wire index -> pid), from the state file; {} where none."""
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return {int(k): int(v) for k, v in state.get("relays", {}).items()}

    def dead_relays(self) -> dict[int, int]:
        """The delay lines that no longer run (wire index -> pid): their wires carry nothing."""
        return {w: pid for w, pid in self.relays().items() if not delay_line.alive(pid, self.run)}

    def down(self) -> None:
        """Stop the run's delay lines, delete every namespace of the run (their veths and bridges go with
        them) and its files."""
        remove_run(self.run, self.directory)

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ------------------------------------------------------------------------------------------ use
    def command(self, host: Host | str, command: list[str]) -> list[str]:
        """argv running `command` on `host` (its namespace and hostname)."""
        host = host if isinstance(host, Host) else self.plan.host(host)
        return system.wrap(self.namespace(host), host.hostname, command)

    def counters(self) -> dict[int, tuple[int, int]]:
        """Bytes that crossed each wire so far, per wire index: (a -> b, b -> a), read at the switch end
        (a host wire's switch end receives what the host sends)."""
        fabric = system.link_counters(self.fabric)
        out = {}
        for wire in self.plan.wires:
            a_end, b_end = self.ends(wire)
            tx, rx = fabric[a_end]
            out[wire.index] = (rx, tx) if wire.host else (tx, fabric[b_end][0])
        return out

    def set_wire(self, wire: Wire, state: str) -> None:
        """Break or mend a wire: "down" (`ip link set down` on its switch ends: the host sees no carrier;
        on a delay line the host keeps its carrier and the relay's frames to the downed end are lost),
        "drop" (its bridge ports disabled: every frame lost while the link stays up, as with 100% loss),
        or "up" (both undone)."""
        if state not in WIRE_STATES:
            raise invalid("state", state, WIRE_STATES)
        for end in filter(None, self.ends(wire)):
            if state == "down":
                system.ip(self.fabric, "link", "set", end, "down")
            else:
                system.ip(self.fabric, "link", "set", end, "up")
                system.wait_operational(self.fabric, end)
                system.set_port(self.fabric, end, forwarding=state == "up")

    def kill_host(self, host: Host | str) -> int:
        """SIGKILL every process in a host's namespace (a host crash, its network staying up); how many."""
        host = host if isinstance(host, Host) else self.plan.host(host)
        pids = [int(p) for p in system.run(["ip", "netns", "pids", self.namespace(host)]).split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        return len(pids)

    def describe(self) -> list[str]:
        """Lines for `commlab testbed status`: hosts, wires with their rates and latencies."""
        plan = self.plan
        lines = [
            f"run {self.run}: {plan.name}, {len(plan.hosts)} hosts ({plan.host_spec} ranks), "
            f"{len(plan.switches)} switches; topology file {self.topology_file}"
        ]
        for host in plan.hosts:
            ranks = f"{host.ranks[0]}..{host.ranks[-1]}" if len(host.ranks) > 1 else str(host.ranks[0])
            lines.append(
                f"  host {host.hostname:<12} {host.address:<12} ranks {ranks:<6} namespace "
                f"{self.namespace(host)} -> {host.switch}"
            )
        relays = self.relays()
        for wire in plan.wires:
            relay = relays.get(wire.index)
            state = "" if relay is None else "dead" if not delay_line.alive(relay, self.run) else "running"
            lines.append(
                f"  wire {wire.index}: {wire.a} <-> {wire.b}  {_rate(wire.rate_ab)} / {_rate(wire.rate_ba)}"
                f"  {wire.latency_ab * 1e3:g} ms / {wire.latency_ba * 1e3:g} ms"
                + (f"  delay line pid {relay} ({state})" if relay is not None else "")
            )
        return lines


def _rate(rate: float) -> str:
    bits = rate * 8
    return f"{bits / 1e9:g} Gbit/s" if bits >= 1e9 else f"{bits / 1e6:g} Mbit/s"


def runs(directory: Path | None = None) -> list[str]:
    """Run ids recorded in the state directory, oldest first."""
    directory = Path(directory) if directory else state_dir()
    files = sorted(directory.glob(f"{PREFIX}*.json"), key=lambda p: p.stat().st_mtime)
    return [p.stem for p in files]


def load(run: str | None = None, directory: Path | None = None) -> Testbed:
    """The recorded run `run`, or the only (else the newest) one when None."""
    directory = Path(directory) if directory else state_dir()
    known = runs(directory)
    if run is None:
        if not known:
            raise TestbedError(f"no testbed is up (none recorded in {directory}): commlab testbed up first")
        run = known[-1]
    if run not in known:
        raise invalid("run", run, known or f"a run recorded in {directory} (none is)")
    state = json.loads((directory / f"{run}.json").read_text())
    bucket = state.get("bucket", system.BUCKET_SECONDS)
    return Testbed(run, NetworkPlan.from_dict(state["plan"]), directory, bucket=bucket)


def remove_run(run: str, directory: Path | None = None) -> list[str]:
    """Delete a run's namespaces (recorded or found by name) and files; the namespaces deleted."""
    directory = Path(directory) if directory else state_dir()
    state_file = directory / f"{run}.json"
    recorded, relays = [], {}
    if state_file.exists():
        try:
            state = json.loads(state_file.read_text())
            recorded, relays = state.get("namespaces", []), state.get("relays", {})
        except (OSError, ValueError):
            recorded = []
    delay_line.stop([int(pid) for pid in relays.values()], run)
    found = [n for n in system.namespaces() if n.startswith(run + "-")]
    deleted = []
    for namespace in dict.fromkeys([*recorded, *found]):
        system.delete_namespace(namespace)
        deleted.append(namespace)
    for path in (state_file, directory / f"{run}.toml", directory / f"{run}.launch"):
        path.unlink(missing_ok=True)
    for path in directory.glob(f"{run}.delay*.log"):
        path.unlink(missing_ok=True)
    return deleted


def remove_all(directory: Path | None = None) -> list[str]:
    """Delete every recorded run and every namespace named like a testbed's (crashed runs' leftovers)."""
    deleted = []
    for run in runs(directory):
        deleted += remove_run(run, directory)
    for namespace in system.namespaces():
        if namespace.startswith(PREFIX):
            system.delete_namespace(namespace)
            deleted.append(namespace)
    return deleted
