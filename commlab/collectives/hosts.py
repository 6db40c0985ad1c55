"""The host map: which ranks share a host, so topology-aware schedules can keep traffic inside hosts.

A `HostMap` lists each host's ranks in local-rank order. The runtime learns it once when a communicator
is created (each rank's host name gathered, or given explicitly); the simulator derives it from the
topology (ranks behind the same node). Hosts may hold different numbers of ranks. Torch-free, so the
schedules, the tuner and the simulator share it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from commlab.errors import invalid

HOSTS_ENV = "COMMLAB_HOSTS"  # a host map of the whole job, e.g. '2x2', to emulate hosts on one machine

SPEC_FORMS = "'HxL' (H hosts of L ranks, e.g. '2x4') or ranks per host separated by commas (e.g. '3,2,3')"


@dataclass(frozen=True)
class HostMap:
    """`hosts[h]` are the ranks on host h, local rank i at position i; every rank 0..p-1 appears once."""

    hosts: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        hosts = tuple(tuple(int(r) for r in host) for host in self.hosts)
        object.__setattr__(self, "hosts", hosts)
        ranks = sorted(r for host in hosts for r in host)
        if not hosts or any(not host for host in hosts) or ranks != list(range(len(ranks))):
            raise invalid("hosts", self.hosts, "non-empty hosts that hold every rank 0..p-1 exactly once")

    @classmethod
    def uniform(cls, num_hosts: int, per_host: int) -> HostMap:
        """`num_hosts` hosts of `per_host` consecutive ranks (what torchrun gives with --nproc-per-node)."""
        if num_hosts < 1 or per_host < 1:
            raise invalid("hosts", (num_hosts, per_host), "at least one host of at least one rank")
        return cls(tuple(tuple(range(h * per_host, (h + 1) * per_host)) for h in range(num_hosts)))

    @classmethod
    def flat(cls, world_size: int) -> HostMap:
        """All ranks on one host: what a schedule sees when nothing is known about hosts."""
        return cls.uniform(1, world_size)

    @classmethod
    def from_sizes(cls, sizes: Sequence[int]) -> HostMap:
        """Hosts of the given rank counts, consecutive ranks per host."""
        hosts, start = [], 0
        for size in sizes:
            if size < 1:
                raise invalid("hosts", list(sizes), "rank counts >= 1 per host")
            hosts.append(tuple(range(start, start + size)))
            start += size
        return cls(tuple(hosts))

    @classmethod
    def from_labels(cls, labels: Sequence[Hashable]) -> HostMap:
        """Ranks grouped by a per-rank host label (host name), hosts in the order of their first rank."""
        groups: dict[str, list[int]] = {}
        for rank, label in enumerate(labels):
            groups.setdefault(label, []).append(rank)
        return cls(tuple(tuple(g) for g in groups.values()))

    @classmethod
    def parse(cls, text: str) -> HostMap:
        """A map from `SPEC_FORMS`: '2x4' or '3,2,3'."""
        text = text.strip()
        match = re.fullmatch(r"(\d+)\s*x\s*(\d+)", text)
        if match:
            return cls.uniform(int(match[1]), int(match[2]))
        if re.fullmatch(r"\d+(\s*,\s*\d+)*", text):
            return cls.from_sizes([int(s) for s in text.split(",")])
        raise invalid("hosts", text, SPEC_FORMS)

    @property
    def world_size(self) -> int:
        return sum(len(host) for host in self.hosts)

    @property
    def num_hosts(self) -> int:
        return len(self.hosts)

    @property
    def max_local(self) -> int:
        """The most ranks on one host."""
        return max(len(host) for host in self.hosts)

    @property
    def is_uniform(self) -> bool:
        return len({len(host) for host in self.hosts}) == 1

    def host_of(self, rank: int) -> int:
        return next(h for h, host in enumerate(self.hosts) if rank in host)

    def local_rank(self, rank: int) -> int:
        return self.hosts[self.host_of(rank)].index(rank)

    def rail_member(self, host: int, rail: int) -> int:
        """The rank of `host` that carries rail `rail` (local rank rail mod the host's size)."""
        ranks = self.hosts[host]
        return ranks[rail % len(ranks)]

    def spec(self) -> str:
        """The short form parse() reads: '2x4' for uniform hosts, else '3,2,3' (consecutive ranks)."""
        if self.is_uniform:
            return f"{self.num_hosts}x{len(self.hosts[0])}"
        return ",".join(str(len(host)) for host in self.hosts)

    def __str__(self) -> str:
        return f"{self.num_hosts} hosts ({self.spec()})"


def host_map_from_env(global_ranks: Sequence[int], environ: Mapping[str, str] = os.environ) -> HostMap | None:
    """The host map of a group of `global_ranks` from the launcher's environment, without communicating:
    $COMMLAB_HOSTS (a spec of the whole job, see HostMap.parse), else torchrun's LOCAL_WORLD_SIZE (every
    host runs that many consecutive global ranks); None where neither is set."""
    spec = environ.get(HOSTS_ENV)
    if spec:
        world = HostMap.parse(spec)
        if max(global_ranks, default=0) >= world.world_size:
            raise invalid(HOSTS_ENV, spec, f"a host map of at least {max(global_ranks) + 1} ranks")
        return HostMap.from_labels([world.host_of(g) for g in global_ranks])
    local = environ.get("LOCAL_WORLD_SIZE")
    if local and local.isdigit() and int(local) > 0:
        return HostMap.from_labels([g // int(local) for g in global_ranks])
    return None


def most_local_ranks(environ: Mapping[str, str] = os.environ) -> int | None:
    """The most ranks one host of the job runs, from the launcher's environment: $COMMLAB_HOSTS's
    largest host, else torchrun's LOCAL_WORLD_SIZE; None where neither is set. The same on every rank,
    also on uneven hosts (where LOCAL_WORLD_SIZE differs between hosts), so a setting derived from it
    (the slicing of chunks into pieces) is one that every rank agrees on."""
    spec = environ.get(HOSTS_ENV)
    if spec:
        return HostMap.parse(spec).max_local
    local = environ.get("LOCAL_WORLD_SIZE")
    return int(local) if local and local.isdigit() and int(local) > 0 else None
