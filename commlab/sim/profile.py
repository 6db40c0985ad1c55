"""Software costs a network model does not see: per-message latency, reduction speed, launch, efficiency.

A `Profile` is what a transport adds on top of the wires: `alpha` seconds to post each message, `gamma`
seconds per byte reduced, `launch` seconds once per collective (kernel launch, argument checks), and
`efficiency`, the fraction of a link's bandwidth the transport's protocol delivers. Profiles load from
JSON, TOML or YAML files with those keys (numbers in seconds, or strings like "5us").
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path

from commlab.errors import TopologyError, invalid
from commlab.sim.units import parse_time

FIELDS = ("alpha", "gamma", "launch", "efficiency", "name")


@dataclass(frozen=True)
class Profile:
    """Per-message alpha (s), per-byte gamma (s/byte), per-collective launch (s), bandwidth efficiency."""

    alpha: float = 0.0
    gamma: float = 0.0
    launch: float = 0.0
    efficiency: float = 1.0
    name: str = "ideal"

    def __post_init__(self) -> None:
        for field in ("alpha", "gamma", "launch"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
                raise invalid(field, value, "a finite number of seconds >= 0")
        e = self.efficiency
        if isinstance(e, bool) or not isinstance(e, numbers.Real) or not 0 < e <= 1:
            raise invalid("efficiency", e, "a fraction in (0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "profile") -> Profile:
        """A profile from a mapping with keys among alpha, gamma, launch, efficiency, name."""
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
        """Read a profile file (.json, .toml, .yaml/.yml)."""
        from commlab.sim.topology_io import read_mapping

        return cls.from_dict(read_mapping(path), str(path))


IDEAL = Profile()
