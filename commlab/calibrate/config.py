"""`commlab calibrate`'s configuration (`CalibrateConfig`, handed to the ranks as JSON in
$COMMLAB_CALIBRATE_CONFIG) and the `--quick` settings."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

BACKENDS = ("gloo", "mpi")
DTYPES = ("float32", "float64", "float16", "bfloat16", "int32", "int64", "uint8", "int8")
CONFIG_ENV = "COMMLAB_CALIBRATE_CONFIG"


@dataclass
class CalibrateConfig:
    """One calibration: message sizes min_bytes x factor^i up to max_bytes, timing settings, output."""

    backend: str = "gloo"
    ranks: int = 4
    min_bytes: int = 8
    max_bytes: int = 64 << 20
    factor: int = 2
    repeats: int = 3  # interleaved samples per size, variant and pass; the median is kept
    passes: int = 3  # sweeps over all message sizes (the median over passes is kept): minutes-long drift
    # of a shared host then lands on every size alike instead of bending the fitted curve
    sample_seconds: float = 0.04  # about this long per sample (calls per sample follow from a warm-up)
    steps: int = 8  # steps per timed call (a call's launch cost is spread over them)
    dtypes: list[str] = field(default_factory=lambda: list(DTYPES))
    output: str = "commlab-profile.json"
    quick: bool = False
    timeout: float = 300.0
    progress: bool = True
    algorithms: bool = True  # also time every algorithm of every op (auto's measured decisions)
    timed_sizes: list[int] | None = None  # where the algorithms are timed (None: `algorithm_sizes`' rule)

    def sizes(self) -> list[int]:
        sizes, size = [], self.min_bytes
        while size <= self.max_bytes:
            sizes.append(size)
            size *= self.factor
        return sizes

    def reduce_sizes(self) -> list[int]:
        """Sizes of the reduction and copy timings: from cache-resident to well beyond the caches, up to
        the largest message (at least 16 MiB), since their per-byte cost is taken at the largest sizes."""
        if self.quick:
            return [64 << 10, 1 << 20, 4 << 20]
        return [
            s for s in (64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20) if s <= max(self.max_bytes, 16 << 20)
        ]

    def algorithm_sizes(self) -> list[int]:
        """Total sizes at which every algorithm is timed: `timed_sizes` where given (--algorithm-sizes),
        else 1 KiB x 4^i (quick: x 16^i) up to the largest message, and the largest message itself ([]
        with algorithms off)."""
        if not self.algorithms:
            return []
        if self.timed_sizes is not None:
            return list(self.timed_sizes)
        factor, size, sizes = (16 if self.quick else 4), 1 << 10, []
        while size <= self.max_bytes:
            sizes.append(size)
            size *= factor
        if self.max_bytes not in sizes and self.max_bytes >= 1 << 10:
            sizes.append(self.max_bytes)
        return sizes

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> CalibrateConfig:
        return cls(**json.loads(os.environ[CONFIG_ENV]))


QUICK = {
    "max_bytes": 1 << 20,
    "factor": 4,
    "repeats": 3,
    "passes": 1,
    "sample_seconds": 0.01,
    "dtypes": ["float32"],
}
