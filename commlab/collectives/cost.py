"""The alpha-beta-gamma cost model: what a message, a byte moved and a byte reduced cost.

Every algorithm family states its time as a closed formula in this model (in its module's docstring and in
its `cost` function), so tuning can rank algorithms without running the simulator.

How the formulas count, the same way for every family:
- A schedule runs in steps; a step costs, for its busiest rank, `step` once (what a step costs whatever
  it carries: posting, waiting, waking the process), alpha per message it sends or receives (whichever
  count is larger: concurrent messages of one rank are not free), beta per byte it sends or receives (the
  larger), and gamma per byte it reduces. The time is the sum over the steps on the critical path, a
  bulk-synchronous bound. `step` is 0 unless a calibrated profile measured it (then alpha is only the
  per-message part): with it, a step of p-1 messages (direct) costs less than p-1 steps of one (ring).
- `concurrency` is how much faster k messages a rank moves at once are than one after another (1: no
  faster; a calibrated profile measures it for a one-step fan-out): a step of k = messages / steps
  messages moves its bytes at min(k, concurrency) times one message's bandwidth.
- n is the bytes per rank for allreduce, broadcast and reduce; for reduce-scatter and allgather it is the
  total size (p blocks of n/p bytes), as nccl-tests counts it.
- Pipelined algorithms split the buffer into k segments and trade alpha (more steps) for overlap;
  `best_segment_count` picks k by evaluating the formula.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from commlab.errors import invalid

MAX_SEGMENTS = 64  # the largest pipeline depth the tuner considers


@dataclass(frozen=True)
class CostModel:
    """Seconds per message (alpha), per byte sent or received (beta), per byte reduced (gamma), and per
    step on the critical path (`step`, beyond its messages' alpha), and the bandwidth gain of concurrent
    messages (`concurrency`; see the module docstring). These describe messages within a host; `inter`,
    where set, is the model of messages between hosts (a two-level model: NVLink or shared memory inside
    a host, the network between them), which topology-aware algorithms price their phases by.

    A model calibrated across hosts (`Calibration.cost_model` with a host map) is three-level: the model
    itself is what flat schedules over all the ranks cost (measured as such, crossing hosts where a flat
    ring does), `intra` the messages inside one host and `inter` a message between hosts while every
    local rank sends one between hosts at once (the rails of the topology-aware schedules). Without
    `intra` the model itself is the level inside a host and flat schedules across hosts go at `inter`."""

    alpha: float
    beta: float
    gamma: float = 0.0
    step: float = 0.0
    concurrency: float = 1.0
    # the level between hosts, where it differs from this one (keyword-only: subclasses add positional fields)
    inter: CostModel | None = field(default=None, kw_only=True)
    # the level inside one host, where this model describes flat schedules across hosts
    intra: CostModel | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma", "step"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise invalid(name, value, "a finite number of seconds >= 0")
        c = self.concurrency
        if not isinstance(c, numbers.Real) or not math.isfinite(c) or c < 1:
            raise invalid("concurrency", c, "a finite number >= 1")
        if self.inter is not None and not isinstance(self.inter, CostModel):
            raise invalid("inter", type(self.inter).__name__, "a CostModel (between hosts) or None")
        if self.intra is not None and not isinstance(self.intra, CostModel):
            raise invalid("intra", type(self.intra).__name__, "a CostModel (inside a host) or None")

    def between_hosts(self) -> CostModel:
        """The model of messages between hosts: `inter` where a two-level model sets it, else this one."""
        return self.inter if self.inter is not None else self

    def within_host(self) -> CostModel:
        """The model of messages inside one host: `intra` where a cross-host calibration sets it, else
        this one."""
        return self.intra if self.intra is not None else self

    def flat_across_hosts(self) -> CostModel:
        """The model a flat schedule spanning hosts is priced by: this one where it was measured across
        hosts (`intra` set), else the level between hosts; either with no gain from concurrent messages
        (concurrency 1).

        Why no gain: a flat schedule's concurrent messages between hosts leave and enter each host by its
        one link, so k of them at once move no faster than one after another, whatever a calibration's
        fan measured on the host. On 3 + 1 ranks over 1 Gbit/s (the emulated cluster, 2026-12-07) a fan of
        one rank reaches two local peers beside the remote one, the calibration measured a gain of 1.45
        at 4 ranks (1.0 in an earlier run of the same layout), and `direct` came out priced 22% under
        its wire floor (660 ms for 64 MiB against the 840 ms that 1.5 n bytes each way over one 1 Gbit/s
        link take); auto took it at 256 KiB - 64 MiB, 1.1-1.46x slower than the fastest measured
        algorithm (docs/testbed-validation.md)."""
        level = self if self.intra is not None else self.between_hosts()
        return level if level.concurrency == 1 else replace(level, concurrency=1.0)

    def gain(self, messages: float, steps: float) -> float:
        """The bandwidth gain of a step of messages / steps concurrent messages: min(k, concurrency), >= 1."""
        if self.concurrency == 1 or steps <= 0:
            return 1.0
        return min(max(messages / steps, 1.0), self.concurrency)

    @classmethod
    def from_rates(cls, latency: float, bandwidth: float, reduce_bandwidth: float = math.inf) -> CostModel:
        """A model from a message latency (s) and bandwidths in bytes/s (reduction free by default)."""
        for name, rate in (("bandwidth", bandwidth), ("reduce_bandwidth", reduce_bandwidth)):
            if not isinstance(rate, numbers.Real) or not rate > 0:
                raise invalid(name, rate, "bytes per second > 0")
        return cls(latency, 1.0 / bandwidth, 1.0 / reduce_bandwidth)

    def measured_choice(self, op: str, nbytes: float, among: tuple[str, ...]) -> str | None:
        """The algorithm measurements say is fastest for `op` at `nbytes` (of `among`), if this model
        holds any (a calibrated profile's; see `calibration.AlgorithmTimes`); None: rank by the formulas."""
        return None

    def time(self, messages: float, moved: float, reduced: float = 0.0, steps: float | None = None) -> float:
        """Seconds for `messages` messages in `steps` steps (default: one message per step) moving `moved`
        bytes, of which `reduced` bytes are reduced."""
        steps = messages if steps is None else steps
        bandwidth = moved * self.beta / self.gain(messages, steps)
        return steps * self.step + messages * self.alpha + bandwidth + reduced * self.gamma


DEFAULT_COST_MODEL = CostModel(alpha=40e-6, beta=1 / 2.5e9, gamma=1 / 4e9)
"""Loopback gloo on one CPU host: 40 us per message, 2.5 GB/s per rank, 4 GB/s reduction.

Rough placeholder constants, to be replaced by a calibrated profile of the live transport.
"""


def best_segment_count(cost_of: Callable[[int], float], max_segments: int = MAX_SEGMENTS) -> int:
    """The segment count k in 1..max_segments whose cost is lowest (the smallest k on a tie)."""
    if max_segments < 1:
        raise invalid("max_segments", max_segments, "an integer >= 1")
    best, best_time = 1, cost_of(1)
    for k in range(2, max_segments + 1):
        time = cost_of(k)
        if time < best_time:
            best, best_time = k, time
    return best


def ceil_log2(world_size: int) -> int:
    """ceil(lg p): the rounds of a doubling algorithm on p ranks (0 for one rank)."""
    return (world_size - 1).bit_length()


def floor_pow2(world_size: int) -> int:
    """The largest power of two <= p."""
    return 1 << (world_size.bit_length() - 1)
