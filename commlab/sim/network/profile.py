"""Software costs a network model does not see: per-message latency, reduction speed, launch, efficiency.

A `Profile` is what a transport adds on top of the wires: `alpha` seconds to post each message, `gamma`
seconds per byte reduced, `launch` seconds once per collective (kernel launch, argument checks), and
`efficiency`, the fraction of a link's bandwidth the transport's protocol delivers. Profiles load from
JSON, TOML or YAML files with those keys (numbers in seconds, or strings like "5us").

A profile may instead carry a `calibration` (a `commlab calibrate` file, format "commlab-calibration",
read by the same `Profile.load`): then messages are priced by size from the calibrated fits of the
schedule's world size, and gamma and launch come from there too (`for_run`, `network.message_costs`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from commlab.collectives.calibration import Calibration, is_calibration
from commlab.errors import TopologyError, invalid
from commlab.sim.network.topology_io import read_mapping
from commlab.sim.network.units import parse_time

FIELDS = ("alpha", "gamma", "launch", "efficiency", "name")


@dataclass(frozen=True)
class Profile:
    """Per-message alpha (s), per-byte gamma (s/byte), per-collective launch (s), bandwidth efficiency."""

    alpha: float = 0.0
    gamma: float = 0.0
    launch: float = 0.0
    efficiency: float = 1.0
    name: str = "ideal"
    calibration: Calibration | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("alpha", "gamma", "launch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
                raise invalid(name, value, "a finite number of seconds >= 0")
        e = self.efficiency
        if isinstance(e, bool) or not isinstance(e, numbers.Real) or not 0 < e <= 1:
            raise invalid("efficiency", e, "a fraction in (0, 1]")

    def to_dict(self) -> dict:
        data = {key: getattr(self, key) for key in FIELDS}
        if self.calibration is not None:
            cal = self.calibration
            data["calibration"] = {
                "backend": cal.backend,
                "world_sizes": list(cal.world_sizes),
                "source": cal.source,
                "host": cal.machine.get("hostname"),
            }
        return data

    @classmethod
    def from_calibration(cls, calibration: Calibration) -> Profile:
        """The profile of a calibrated transport: per-message costs by size, per world size and dtype."""
        host = calibration.machine.get("hostname", "?")
        return cls(name=f"calibrated {calibration.backend} on {host}", calibration=calibration)

    def local_copy_time(self, op: str, nbytes: float, world_size: int) -> float:
        """Seconds of the API's own copies around the schedule (calibrated profiles only; else 0)."""
        if self.calibration is None:
            return 0.0
        return self.calibration.level(world_size).local_copy_time(op, nbytes, world_size)

    def for_run(self, world_size: int, dtype: str = "float32") -> Profile:
        """The scalar costs of one run: a calibrated profile's launch and gamma for `world_size` and
        `dtype` (its per-message alpha and beta come from `network.message_costs`); else itself."""
        if self.calibration is None:
            return self
        level = self.calibration.level(world_size)
        return Profile(0.0, level.gamma_of(dtype), level.launch, self.efficiency, self.name, self.calibration)

    @classmethod
    def from_dict(cls, data: dict, source: str = "profile") -> Profile:
        """A profile from a mapping with keys among alpha, gamma, launch, efficiency, name, or from a
        calibration (format "commlab-calibration")."""
        if is_calibration(data):
            return cls.from_calibration(Calibration.from_dict(data, source))
        if not isinstance(data, dict):
            raise TopologyError(
                f"{source}: expected a table of {', '.join(FIELDS)}, got {type(data).__name__}"
            )
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise TopologyError(f"{source}: unknown keys {unknown}; accepted: {', '.join(FIELDS)}")
        values = dict(data)
        for key in ("alpha", "launch"):
            if key in values:
                values[key] = parse_time(values[key], key)
        if "gamma" in values and isinstance(values["gamma"], str):
            values["gamma"] = float(values["gamma"])
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile file (.json, .toml, .yaml/.yml), or a calibration file (JSON)."""
        return cls.from_dict(read_mapping(path), str(path))


IDEAL = Profile()
