"""`commlab bench`'s configuration: the sweep (`BenchConfig`, handed to the ranks as JSON in
$COMMLAB_BENCH_CONFIG) and the size and count argument types `commlab calibrate` shares."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field

BACKENDS = ("gloo", "mpi")
DTYPES = ("float32", "float64", "float16", "bfloat16", "int32", "int64", "uint8", "int8")
REDUCE_OPS = ("sum", "avg", "max", "min", "prod")
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
AUTO_CHECK_OFF = "auto:check-off"  # the row of `auto` without the argument check (--check-off-row)
CONFIG_ENV = "COMMLAB_BENCH_CONFIG"  # how a launcher hands the configuration to the ranks it starts


@dataclass
class BenchConfig:
    """One sweep: an op over sizes min_bytes, min_bytes*factor, ... up to max_bytes, for some algorithms."""

    op: str = "allreduce"
    min_bytes: int = 8
    max_bytes: int = 64 << 20
    factor: int = 2
    algorithms: list[str] = field(default_factory=lambda: ["auto"])
    backend: str = "gloo"
    ranks: int = 4
    dtype: str = "float32"
    redop: str = "sum"
    root: int = 0
    iters: int = 20
    warmup: int = 5
    repeats: int = 5  # timed samples per row, interleaved across algorithms; the median is reported
    sample_seconds: float = 0.0  # > 0: fewer iterations per sample where a call is slow (see worker)
    check: bool = True  # count wrong elements (#wrong) against locally computed expected values
    arg_check: bool = True  # commlab's cross-rank argument check on every call (its default)
    check_off_row: bool = False  # also time `auto` with the argument check off, interleaved (AUTO_CHECK_OFF)
    native: bool = True
    json_path: str | None = None
    plot_path: str | None = None
    progress: bool = True
    timeout: float = 600.0  # seconds for any one collective

    def sizes(self) -> list[int]:
        """The swept sizes in bytes: min_bytes times powers of factor, up to max_bytes."""
        sizes, size = [], self.min_bytes
        while size <= self.max_bytes:
            sizes.append(size)
            if self.factor == 1:
                break
            size *= self.factor
        return sizes

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> BenchConfig:
        return cls(**json.loads(os.environ[CONFIG_ENV]))


def parse_size(text: str) -> int:
    """Bytes from '8', '4K', '64M', '1G' (binary units)."""
    value = text.strip().upper().removesuffix("B")
    try:
        scale = UNITS.get(value[-1:], 1)
        number = int(float(value[:-1]) * scale) if scale > 1 else int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not accepted; accepted: a byte count like 8, 4K, 64M, 1G"
        ) from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted; accepted: a size of at least 1 byte")
    return number


def count_at_least(minimum: int):
    """An argparse type: an integer >= `minimum`, with an error naming what is accepted."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not accepted; accepted: an integer >= {minimum}")
        return value

    return parse
