"""Calibrated profiles of a live transport: the file format, the piecewise cost model, the active profile.

`commlab calibrate` measures a transport on this host and writes a JSON profile (format
"commlab-calibration"). For every world size p it measured (the *level*: p ranks exchanging at once, as in
one step of a ring), the profile holds:
- `link`: the time of one message of m bytes while all p ranks send and receive one, as a piecewise
  line alpha + beta x m (one to a few size ranges, e.g. below and above an eager/rendezvous switch);
- `step`: the part of the link's alpha a step pays once, however many messages it carries (measured by a
  fan-out step of several messages per rank against the ring's one): a message's own alpha is the rest;
- `concurrency`: how much faster a rank moves k large messages at once (to k peers) than one after
  another, measured by the same fan-out step at large sizes (1 where it was not measured);
- `launch`: seconds per collective call on top of its steps;
- `gamma`: seconds per reduced byte, per dtype, while p ranks reduce at once; and `gamma_by_size` (with
  `clone_by_size`, `copy_by_size` for the API's local copies): the same per-byte costs at each measured
  size, since a buffer that fits in the caches is reduced or copied 2-4x faster than one that does not.
  Between measured sizes the cost is interpolated in log(size); beyond them the nearest one holds.
- `algorithms`: the measured time of every algorithm of each op at a few sizes (`AlgorithmTimes`).
It also keeps the one-pair ping-pong fit, the machine description and the raw medians.

Calibrated with ranks on several hosts (`commlab testbed run -- commlab calibrate`, or any launcher that
sets LOCAL_WORLD_SIZE or $COMMLAB_HOSTS), the `levels` above are flat rings over ranks 0..p-1, which cross
hosts where a flat ring does, and the profile adds two levels (optional keys: profiles without them load
as before):
- `intra_host`: levels of p = 2..L ranks of one host exchanging at once (the ranks of the first host
  with the most ranks, L), the host's own software costs (loopback, shared memory);
- `inter_host`: one level of the ranks of every local index all hosts have (0..m-1, m the fewest ranks
  on a host: every rank where hosts are equal) sending to the rank of the same local index on the next
  host and receiving from the previous one, all at once (the rails of `hierarchical` and `multiring`,
  as many crossing at once as on the smallest host, whose ranks carry the most rails), with `hosts`,
  the host map it was measured on (uneven maps as '3,1').
`cost_model(p, hosts=...)` then gives `auto` a three-level model (`CostModel.intra`, `CostModel.inter`),
and the simulator prices every message's software by the intra-host levels, the wire by the topology.

`algorithm="auto"` on a measured world size picks the algorithm with the least measured time at the call's
size (interpolated between the measured sizes); for ops or world sizes not measured it ranks algorithms
by their formulas under `PiecewiseCostModel`, which prices each message by the size range it falls in.
Which profile is active: an explicit one (argument), else the file named by $COMMLAB_PROFILE, else the
default shipped for the backend (`commlab/profiles/<backend>.json`).
Every rank must see the same profile, or ranks may choose different algorithms (the argument check then
fails the call with CollectiveMismatchError): set COMMLAB_PROFILE alike on every rank.

This module sits in the collectives layer (no sim, no torch.distributed): the simulator reads the same
files through `commlab.sim.network.profile`.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from commlab.collectives.cost import CostModel
from commlab.collectives.hosts import HostMap
from commlab.errors import InvalidArgumentError, invalid

FORMAT = "commlab-calibration"
VERSION = 1
PROFILE_ENV = "COMMLAB_PROFILE"
BACKENDS = ("gloo", "mpi")
DEFAULT_DTYPE = "float32"


@dataclass(frozen=True)
class Segment:
    """Messages of up to `max_bytes` (inf for the last range) cost alpha + beta x bytes seconds."""

    max_bytes: float
    alpha: float
    beta: float

    def time(self, nbytes: float) -> float:
        return self.alpha + self.beta * nbytes


@dataclass(frozen=True)
class LinkFit:
    """A piecewise-linear time per message: segments by increasing `max_bytes`, the last unbounded."""

    segments: tuple[Segment, ...]
    r2: float = math.nan  # coefficient of determination of the fit on its measurements
    max_relative_error: float = math.nan  # largest |fit - measured| / measured over the measured sizes

    def __post_init__(self) -> None:
        if not self.segments:
            raise invalid("segments", self.segments, "one or more segments")
        bounds = [s.max_bytes for s in self.segments]
        if bounds != sorted(bounds) or not math.isinf(bounds[-1]) or len(set(bounds)) != len(bounds):
            raise invalid("segments", bounds, "increasing max_bytes, the last one unbounded (null)")
        for s in self.segments:
            for name in ("alpha", "beta"):
                value = getattr(s, name)
                if not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                    raise invalid(name, value, "a finite number of seconds >= 0")

    def segment(self, nbytes: float) -> Segment:
        """The segment whose size range holds a message of `nbytes`."""
        index = bisect.bisect_left([s.max_bytes for s in self.segments], nbytes)
        return self.segments[min(index, len(self.segments) - 1)]

    def time(self, nbytes: float) -> float:
        """Seconds for one message of `nbytes`."""
        return self.segment(nbytes).time(nbytes)

    def to_dict(self) -> dict:
        return {
            "segments": [
                {
                    "max_bytes": None if math.isinf(s.max_bytes) else s.max_bytes,
                    "alpha": s.alpha,
                    "beta": s.beta,
                }
                for s in self.segments
            ],
            "r2": self.r2,
            "max_relative_error": self.max_relative_error,
        }

    @classmethod
    def from_dict(cls, data: object, where: str) -> LinkFit:
        if not isinstance(data, dict) or not isinstance(data.get("segments"), list):
            raise _bad(where, "a table with a list of segments (max_bytes, alpha, beta)")
        segments = []
        for i, item in enumerate(data["segments"]):
            if not isinstance(item, dict) or not {"max_bytes", "alpha", "beta"} <= set(item):
                raise _bad(f"{where}.segments[{i}]", "a table with max_bytes, alpha, beta")
            bound = (
                math.inf if item["max_bytes"] is None else _number(item["max_bytes"], f"{where}.max_bytes")
            )
            segments.append(
                Segment(
                    bound, _number(item["alpha"], f"{where}.alpha"), _number(item["beta"], f"{where}.beta")
                )
            )
        try:
            return cls(tuple(segments), _optional(data.get("r2")), _optional(data.get("max_relative_error")))
        except InvalidArgumentError as error:
            raise InvalidArgumentError(f"{where}: {error}") from None


@dataclass(frozen=True)
class RateCurve:
    """Seconds per byte at measured sizes ((size, seconds per byte), by increasing size), interpolated
    linearly in log(size) between them and held constant beyond them."""

    points: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        sizes = [size for size, _ in self.points]
        if not self.points or sizes != sorted(set(sizes)) or sizes[0] <= 0:
            raise invalid("points", self.points, "(size > 0, seconds per byte) pairs by increasing size")
        for _, per_byte in self.points:
            if not isinstance(per_byte, numbers.Real) or not math.isfinite(per_byte) or per_byte < 0:
                raise invalid("seconds per byte", per_byte, "a finite number >= 0")

    def at(self, nbytes: float) -> float:
        """Seconds per byte for a buffer of `nbytes`."""
        return _interpolate(self.points, nbytes)

    def at_sizes(self, nbytes: np.ndarray) -> np.ndarray:
        """`at` for an array of sizes at once (the simulator prices every message of a plan)."""
        sizes, per_byte = np.array(self.points).T
        return np.interp(np.log(np.maximum(nbytes, sizes[0])), np.log(sizes), per_byte)

    def to_dict(self) -> dict[str, float]:
        return {str(int(size)): per_byte for size, per_byte in self.points}

    @classmethod
    def from_times(cls, times: dict) -> RateCurve:
        """From measured {size: seconds} (keys may be strings)."""
        return cls(tuple(sorted((float(size), float(t) / float(size)) for size, t in times.items())))

    @classmethod
    def from_dict(cls, data: object, where: str) -> RateCurve:
        if not isinstance(data, dict) or not data:
            raise _bad(where, "a table of size in bytes -> seconds per byte")
        try:
            return cls(tuple(sorted((float(k), _number(v, f"{where}[{k!r}]")) for k, v in data.items())))
        except (ValueError, InvalidArgumentError) as error:
            raise _bad(where, f"a table of size in bytes (> 0) -> seconds per byte ({error})") from None


@dataclass(frozen=True, eq=False)
class AlgorithmTimes:
    """Measured seconds of every algorithm of each op on one world size, at a few total sizes:
    {op: {algorithm: ((nbytes, seconds), ...) by increasing nbytes}} (float32).

    `fastest` compares the algorithms' *smoothed* times: a larger buffer never takes less time with the
    same algorithm, so each algorithm's times are made non-decreasing in size (pool-adjacent-violators:
    a dip is averaged with the sizes before it), which keeps one slow sample (gloo's vary up to 5x at
    small sizes here) from flipping the decision at one size; they are interpolated linearly in log(size)
    and log(time) between the measured sizes (the nearest measured size holds beyond them). That is the
    measured part of `auto`'s decision (see docs/calibration.md). Compared and hashed by identity (a
    profile's table is one object), so models holding it stay cheap keys for the tuner's cache.
    """

    times: dict[str, dict[str, tuple[tuple[float, float], ...]]]
    smoothed: dict[str, dict[str, tuple[tuple[float, float], ...]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        smoothed = {
            op: {
                name: tuple(zip((n for n, _ in points), non_decreasing([t for _, t in points]), strict=True))
                for name, points in per_alg.items()
            }
            for op, per_alg in self.times.items()
        }
        object.__setattr__(self, "smoothed", smoothed)

    def fastest(self, op: str, nbytes: float, among: tuple[str, ...] | None = None) -> str | None:
        """The algorithm of `op` with the least interpolated time at `nbytes` (of `among`, if given); None
        when `op` was not measured."""
        best, best_time = None, math.inf
        for name, points in self.smoothed.get(op, {}).items():
            if among is not None and name not in among:
                continue
            seconds = _interpolate(points, nbytes, log_value=True)
            if seconds < best_time:
                best, best_time = name, seconds
        return best

    def to_dict(self) -> dict:
        return {
            op: {name: {str(int(n)): t for n, t in points} for name, points in per_alg.items()}
            for op, per_alg in self.times.items()
        }

    @classmethod
    def from_dict(cls, data: object, where: str) -> AlgorithmTimes:
        """From {op: {algorithm: {size: seconds}}} (sizes may be strings)."""
        if not isinstance(data, dict):
            raise _bad(where, "a table of op -> algorithm -> (size in bytes -> seconds)")
        times: dict[str, dict[str, tuple[tuple[float, float], ...]]] = {}
        for op, per_alg in data.items():
            if not isinstance(per_alg, dict):
                raise _bad(f"{where}.{op}", "a table of algorithm -> (size in bytes -> seconds)")
            times[str(op)] = {}
            for name, table in per_alg.items():
                at = f"{where}.{op}.{name}"
                if not isinstance(table, dict) or not table:
                    raise _bad(at, "a table of size in bytes -> seconds")
                try:
                    points = tuple(sorted((float(k), _number(v, f"{at}[{k!r}]")) for k, v in table.items()))
                except ValueError:
                    raise _bad(at, "a table of size in bytes -> seconds") from None
                if any(n <= 0 or t <= 0 for n, t in points):
                    raise _bad(at, "sizes and seconds > 0")
                times[str(op)][str(name)] = points
        return cls(times)


def non_decreasing(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence to `values` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count] of pooled runs
    for value in values:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, c1), (m0, c0) = blocks.pop(), blocks.pop()
            blocks.append([(m0 * c0 + m1 * c1) / (c0 + c1), c0 + c1])
    return [mean for mean, count in blocks for _ in range(int(count))]


def _interpolate(points: tuple[tuple[float, float], ...], nbytes: float, log_value: bool = False) -> float:
    """The value at `nbytes` from (size, value) points by increasing size: linear in log(size) (and in
    log(value) with `log_value`) between them, the nearest point's value beyond them."""
    if nbytes <= points[0][0]:
        return points[0][1]
    if nbytes >= points[-1][0]:
        return points[-1][1]
    index = bisect.bisect_right([n for n, _ in points], nbytes)
    (n0, v0), (n1, v1) = points[index - 1], points[index]
    weight = math.log(nbytes / n0) / math.log(n1 / n0)
    if log_value:
        return math.exp(math.log(v0) + weight * (math.log(v1) - math.log(v0)))
    return v0 + weight * (v1 - v0)


@dataclass(frozen=True)
class PiecewiseCostModel(CostModel):
    """A CostModel whose alpha and beta depend on the message size, by the segments of a LinkFit.

    `time(messages, moved, reduced, steps)` prices `messages` messages of moved/messages bytes each with
    the segment that size falls in, plus `step` per step. `alpha` and `beta` (the fields) are those of the
    largest-size segment, for code that reads them directly.
    """

    segments: tuple[Segment, ...] = ()
    gamma_curve: RateCurve | None = None  # gamma by the size reduced at once (a message's); else `gamma`
    measured: AlgorithmTimes | None = None  # measured algorithm times of this world size (for `auto`)
    segment_steps: tuple[float, ...] = ()  # the step paid by a step of each segment's messages (`of`)

    def segment_index(self, size: float) -> int:
        """The index of the segment that prices a message of `size` bytes."""
        index = bisect.bisect_left([s.max_bytes for s in self.segments], size)
        return min(index, len(self.segments) - 1)

    def measured_choice(self, op: str, nbytes: float, among: tuple[str, ...]) -> str | None:
        """The fastest measured algorithm of `among` for `op` at `nbytes`, or None where not measured."""
        return None if self.measured is None else self.measured.fastest(op, nbytes, among)

    def time(self, messages: float, moved: float, reduced: float = 0.0, steps: float | None = None) -> float:
        if not self.segments or messages <= 0:
            return super().time(messages, moved, reduced, steps)
        steps = messages if steps is None else steps
        size = moved / messages
        index = self.segment_index(size)
        seg = self.segments[index]
        step = self.segment_steps[index] if self.segment_steps else self.step
        bandwidth = moved * seg.beta / self.gain(messages, steps)
        gamma = self.gamma if self.gamma_curve is None or not reduced else self.gamma_curve.at(size)
        return steps * step + messages * seg.alpha + bandwidth + reduced * gamma

    @classmethod
    def of(
        cls,
        link: LinkFit,
        gamma: float,
        extra_latency: float = 0.0,
        step: float = 0.0,
        concurrency: float = 1.0,
        gamma_curve: RateCurve | None = None,
        measured: AlgorithmTimes | None = None,
    ) -> PiecewiseCostModel:
        """The model of a fitted link (plus `extra_latency` per message) and a reduction cost (by size
        where a curve is given), with `step` of each segment's alpha charged per step instead of per
        message (so a one-message step still costs the fitted alpha), and the bandwidth gain of concurrent
        messages.

        A segment whose alpha is below `step` pays its whole alpha per step and nothing per message (its
        step is min(step, alpha)), so each segment's one-message step is still its fitted time. Why per
        segment, not one step capped by the smallest alpha: the step is measured on small messages, and a
        large-size segment's alpha is a fit's intercept, not a latency; capped by it (6.4 ms against the
        8.9 ms measured on the delay network's 4 ranks, 2026-12-08) the difference was charged to every
        small message of a step, and direct's three concurrent messages came out 33% too slow."""
        steps = tuple(min(step, s.alpha) for s in link.segments)
        segments = tuple(
            Segment(s.max_bytes, s.alpha - own + extra_latency, s.beta)
            for s, own in zip(link.segments, steps, strict=True)
        )
        last = segments[-1]
        return cls(
            last.alpha, last.beta, gamma, steps[-1], concurrency, segments, gamma_curve, measured, steps
        )


@dataclass(frozen=True)
class Level:
    """What a profile knows about p ranks working at once: message costs, launch, reduction per dtype."""

    world_size: int
    link: LinkFit
    launch: float
    gamma: tuple[tuple[str, float], ...]
    clone: float = 0.0  # seconds per byte of a tensor clone (fresh allocation), p ranks at once
    copy: float = 0.0  # seconds per byte of a copy into an existing tensor
    step: float = 0.0  # seconds of the link's alpha paid once per step, not per message (see `of`)
    concurrency: float = 1.0  # bandwidth gain of concurrent messages of one rank (fan-out), >= 1
    gamma_curves: tuple[tuple[str, RateCurve], ...] = ()  # gamma by size, per dtype (where measured)
    clone_curve: RateCurve | None = None  # clone and copy costs by size (where measured)
    copy_curve: RateCurve | None = None
    algorithms: AlgorithmTimes | None = None  # every algorithm's measured time, per op and size

    def local_copy_time(self, op: str, nbytes: float, world_size: int) -> float:
        """Seconds of the copies the API makes around the schedule (see `api_copies`), each priced at the
        size it copies."""
        cloned, copied = api_copies(op, nbytes, world_size)
        clone = self.clone if self.clone_curve is None or not cloned else self.clone_curve.at(cloned)
        copy = self.copy if self.copy_curve is None or not copied else self.copy_curve.at(copied)
        return cloned * clone + copied * copy

    def gamma_curve(self, dtype: str) -> RateCurve | None:
        """Gamma by size for `dtype` (float32's when the dtype was not measured); None if not measured."""
        table = dict(self.gamma_curves)
        return table.get(dtype, table.get(DEFAULT_DTYPE))

    def gamma_of(self, dtype: str) -> float:
        """Seconds per reduced byte of `dtype` (float32's when the dtype was not measured)."""
        table = dict(self.gamma)
        if dtype in table:
            return table[dtype]
        return table.get(DEFAULT_DTYPE, next(iter(table.values()), 0.0))


@dataclass
class Calibration:
    """A calibrated profile of one backend on one host (see the module docstring for the format)."""

    backend: str
    levels: dict[int, Level]
    pingpong: LinkFit | None = None
    machine: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    measurements: dict = field(default_factory=dict)
    source: str = "calibration"
    # measured with ranks on several hosts (see the module docstring): p ranks of one host at once, and
    # the rails between hosts, with the host map (a HostMap spec) they were measured on
    intra_host: dict[int, Level] = field(default_factory=dict)
    inter_host: Level | None = None
    hosts: str | None = None

    def __post_init__(self) -> None:
        if not self.levels:
            raise InvalidArgumentError(f"{self.source}: a calibration needs at least one measured world size")
        if (self.inter_host is None) != (self.hosts is None):
            raise InvalidArgumentError(f"{self.source}: inter_host and hosts are set together or not at all")

    @property
    def world_sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self.levels))

    def level(self, world_size: int) -> Level:
        """The measured level for `world_size`: its own, else the largest measured below it, else the
        smallest (beyond the calibrated ranks the last level stands in; see docs/calibration.md)."""
        if world_size in self.levels:
            return self.levels[world_size]
        below = [p for p in self.levels if p <= world_size]
        return self.levels[max(below) if below else min(self.levels)]

    @property
    def levels_include_wire(self) -> bool:
        """Whether the message fits were measured across hosts with no intra-host level beside them (one
        rank per host): then every fit, ping-pong included, holds the wire's time as well as the host's."""
        return self.hosts is not None and not self.intra_host

    def host_level(self, busy: int) -> Level:
        """What `busy` ranks of one host pay per message in software: the levels measured inside one
        host where the calibration spans hosts (`intra_host`), else the levels (all on one host)."""
        levels = self.intra_host or self.levels
        below = [p for p in levels if p <= busy]
        return levels[max(below) if below else min(levels)]

    def cost_model(
        self, world_size: int, dtype: str = DEFAULT_DTYPE, hosts: HostMap | None = None
    ) -> PiecewiseCostModel:
        """The cost model `algorithm="auto"` ranks algorithms by for `world_size` ranks and `dtype`.

        With `hosts` spanning several hosts and a calibration measured across hosts (`inter_host`), the
        model is three-level (see `CostModel`): itself the flat level of `world_size` ranks as measured
        across hosts, `intra` the level of one host's ranks, `inter` the rails between hosts.

        The measured algorithm times (`Level.algorithms`) come with the model only where they were taken on
        the layout asked about: on one host for a calibration on one host; for one across hosts, on the
        same host map (`hosts.spec() == self.hosts`), since a call across hosts costs what the whole map
        makes it cost."""
        level = self.level(world_size)
        spans = hosts is not None and hosts.num_hosts > 1
        across = spans and self.inter_host is not None
        taken_here = hosts.spec() == self.hosts if spans else self.hosts is None  # the layout timed on
        measured = level.algorithms if level.world_size == world_size and taken_here else None
        model = _level_model(level, dtype, measured)
        if not across:
            return model
        assert self.inter_host is not None and hosts is not None
        intra = _level_model(self.host_level(max(hosts.max_local, 2)), dtype)
        inter = _level_model(self.inter_host, dtype)
        return dataclasses.replace(model, intra=intra, inter=inter)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "backend": self.backend,
            "machine": self.machine,
            "settings": self.settings,
            "pingpong": None if self.pingpong is None else self.pingpong.to_dict(),
            "levels": {str(p): _level_dict(lv) for p, lv in sorted(self.levels.items())},
            "intra_host": {str(p): _level_dict(lv) for p, lv in sorted(self.intra_host.items())} or None,
            "inter_host": None
            if self.inter_host is None
            else {**_level_dict(self.inter_host), "hosts": self.hosts},
            "measurements": self.measurements,
        }

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON (atomically: a temporary file renamed over `path`)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def from_dict(cls, data: object, source: str = "calibration") -> Calibration:
        """A calibration from its JSON mapping; errors name the file and the bad field."""
        if not is_calibration(data):
            raise InvalidArgumentError(f"{source}: not a commlab calibration (expected format={FORMAT!r})")
        assert isinstance(data, dict)
        if data.get("version") != VERSION:
            raise InvalidArgumentError(f"{source}: version={data.get('version')!r}; accepted: {VERSION}")
        backend = data.get("backend")
        if backend not in BACKENDS:
            raise InvalidArgumentError(f"{source}: backend={backend!r}; accepted: {', '.join(BACKENDS)}")
        levels_data = data.get("levels")
        if not isinstance(levels_data, dict) or not levels_data:
            raise _bad(f"{source}: levels", 'a table of world sizes ("2", "3", ...) with link, launch, gamma')
        levels = {}
        for key, item in levels_data.items():
            levels[_world_key(key, f"{source}: levels[{key!r}]")] = _level_from_dict(
                key, item, f"{source}: levels[{key!r}]"
            )
        intra_host = {}
        for key, item in (data.get("intra_host") or {}).items():
            where = f"{source}: intra_host[{key!r}]"
            intra_host[_world_key(key, where)] = _level_from_dict(key, item, where)
        inter_host, hosts = None, None
        inter_data = data.get("inter_host")
        if inter_data is not None:
            where = f"{source}: inter_host"
            if not isinstance(inter_data, dict) or not isinstance(inter_data.get("hosts"), str):
                raise _bad(where, "a level table (link, launch, gamma, ...) with the host map measured "
                           '("hosts": "2,2")')  # fmt: skip
            try:
                hosts = HostMap.parse(inter_data["hosts"])
            except InvalidArgumentError as error:
                raise InvalidArgumentError(f"{where}.hosts: {error}") from None
            inter_host = _level_from_dict(str(hosts.world_size), inter_data, where)
        pingpong = data.get("pingpong")
        return cls(
            backend,
            levels,
            None if pingpong is None else LinkFit.from_dict(pingpong, f"{source}: pingpong"),
            dict(data.get("machine") or {}),
            dict(data.get("settings") or {}),
            dict(data.get("measurements") or {}),
            source,
            intra_host,
            inter_host,
            None if hosts is None else hosts.spec(),
        )

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration file (JSON), with errors that name the file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as error:
            raise InvalidArgumentError(
                f"cannot read calibration profile {path}: {error.strerror or error}"
            ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise InvalidArgumentError(f"{path} is not valid JSON: {error}") from None
        return cls.from_dict(data, str(path))


def _level_model(level: Level, dtype: str, measured: AlgorithmTimes | None = None) -> PiecewiseCostModel:
    return PiecewiseCostModel.of(
        level.link,
        level.gamma_of(dtype),
        step=level.step,
        concurrency=level.concurrency,
        gamma_curve=level.gamma_curve(dtype),
        measured=measured,
    )


def _level_dict(lv: Level) -> dict:
    return {
        "link": lv.link.to_dict(),
        "launch": lv.launch,
        "gamma": dict(lv.gamma),
        "clone": lv.clone,
        "copy": lv.copy,
        "step": lv.step,
        "concurrency": lv.concurrency,
        "gamma_by_size": {dtype: curve.to_dict() for dtype, curve in lv.gamma_curves},
        "clone_by_size": None if lv.clone_curve is None else lv.clone_curve.to_dict(),
        "copy_by_size": None if lv.copy_curve is None else lv.copy_curve.to_dict(),
        "algorithms": None if lv.algorithms is None else lv.algorithms.to_dict(),
    }


def _world_key(key: object, where: str) -> int:
    if not str(key).isdigit() or int(str(key)) < 2:
        raise _bad(where, "a world size >= 2 mapped to a table with link, launch, gamma")
    return int(str(key))


def _level_from_dict(key: object, item: object, where: str) -> Level:
    if not isinstance(item, dict):
        raise _bad(where, "a world size >= 2 mapped to a table with link, launch, gamma")
    gamma = item.get("gamma", {})
    if not isinstance(gamma, dict):
        raise _bad(f"{where}.gamma", "a table of dtype name -> seconds per byte")
    return Level(
        int(str(key)),
        LinkFit.from_dict(item.get("link"), f"{where}.link"),
        _number(item.get("launch", 0.0), f"{where}.launch"),
        tuple((str(k), _number(v, f"{where}.gamma.{k}")) for k, v in gamma.items()),
        _number(item.get("clone", 0.0), f"{where}.clone"),
        _number(item.get("copy", 0.0), f"{where}.copy"),
        _number(item.get("step", 0.0), f"{where}.step"),
        _concurrency(item.get("concurrency", 1.0), f"{where}.concurrency"),
        _gamma_curves(item.get("gamma_by_size") or {}, f"{where}.gamma_by_size"),
        _curve(item.get("clone_by_size"), f"{where}.clone_by_size"),
        _curve(item.get("copy_by_size"), f"{where}.copy_by_size"),
        _algorithm_times(item.get("algorithms"), f"{where}.algorithms"),
    )


def api_copies(op: str, nbytes: float, world_size: int) -> tuple[float, float]:
    """(bytes cloned, bytes copied) by a blocking `commlab.collectives.api` call around an op's schedule on
    contiguous tensors: reduce_scatter copies its input into the communicator's staging buffer (n) and its
    block out (n/p); all_gather copies its block in (n/p); reduce copies its input on the ranks that are
    not the root (the slowest); all_to_all copies its input in and its output out (2n); allreduce and
    broadcast run in place. (An async call clones instead of
    copying: not priced.) `nbytes` counts as the simulator counts it (the total for blocked ops)."""
    if op == "reduce_scatter":
        return 0.0, nbytes + nbytes / world_size
    if op == "allgather":
        return 0.0, nbytes / world_size
    if op == "reduce" and world_size > 1:
        return 0.0, float(nbytes)
    if op == "alltoall":  # the input into the p x p staging buffer, the received blocks out
        return 0.0, 2.0 * nbytes
    return 0.0, 0.0


def is_calibration(data: object) -> bool:
    """Whether a parsed mapping is a calibration profile (rather than a plain simulator profile)."""
    return isinstance(data, dict) and data.get("format") == FORMAT


def _number(value: object, where: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise _bad(where, f"a finite number >= 0 (got {value!r})")
    return float(value)


def _optional(value: object) -> float:
    """A fit-quality number from JSON (None, for NaN, reads back as NaN)."""
    return math.nan if value is None else float(value)


def _curve(data: object, where: str) -> RateCurve | None:
    return None if data is None else RateCurve.from_dict(data, where)


def _algorithm_times(data: object, where: str) -> AlgorithmTimes | None:
    return None if data is None else AlgorithmTimes.from_dict(data, where)


def _gamma_curves(data: object, where: str) -> tuple[tuple[str, RateCurve], ...]:
    if not isinstance(data, dict):
        raise _bad(where, "a table of dtype name -> (size -> seconds per byte)")
    return tuple((str(name), RateCurve.from_dict(table, f"{where}.{name}")) for name, table in data.items())


def _concurrency(value: object, where: str) -> float:
    number = _number(value, where)
    if number < 1:
        raise _bad(where, f"a finite number >= 1 (got {value!r})")
    return number


def _bad(where: str, accepted: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{where} is not accepted; accepted: {accepted}")


def default_profile_path(backend: str) -> Path | None:
    """The profile shipped in the package for `backend` (commlab/profiles/<backend>.json), if present."""
    if backend not in BACKENDS:
        return None
    path = Path(__file__).resolve().parent.parent / "profiles" / f"{backend}.json"
    return path if path.is_file() else None


def active_profile_path(backend: str) -> Path | None:
    """$COMMLAB_PROFILE if set, else the shipped default for `backend` (None for other backends)."""
    named = os.environ.get(PROFILE_ENV)
    if named:
        return Path(named)
    return default_profile_path(backend)


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, mtime_ns: int) -> Calibration:
    return Calibration.load(path)


def load_profile(path: str | Path) -> Calibration:
    """A calibration file, read once per (path, modification time)."""
    path = Path(path)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as error:
        raise InvalidArgumentError(
            f"cannot read calibration profile {path}: {error.strerror or error}"
        ) from None
    return _load_cached(str(path), mtime)


def active_profile(backend: str) -> Calibration | None:
    """The active calibration for `backend`: $COMMLAB_PROFILE, else the shipped default, else None.

    A profile named by $COMMLAB_PROFILE must exist and be valid (an error says why not); its backend may
    differ from `backend` (a gloo profile can price an MPI run) but then the numbers are the other's.
    """
    path = active_profile_path(backend)
    return None if path is None else load_profile(path)


def as_calibration(profile: Calibration | str | Path) -> Calibration:
    """A Calibration from itself or from a file path (the `profile=` arguments)."""
    if isinstance(profile, Calibration):
        return profile
    if isinstance(profile, (str, Path)):
        return load_profile(profile)
    raise invalid("profile", type(profile).__name__, "a Calibration or the path of a calibration file")
