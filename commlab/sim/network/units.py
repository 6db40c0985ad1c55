"""Parse and print the quantities the simulator takes from people: sizes, bandwidths and times.

Sizes use binary multiples as nccl-tests does (1K = 1024 bytes, 1M = 2^20, 1G = 2^30); bandwidths use
decimal ones (1 GB/s = 1e9 bytes/s, 1 Gb/s = 1.25e8 bytes/s); times accept s, ms, us and ns.
"""

from __future__ import annotations

import math
import numbers
import re

from commlab.errors import invalid

_SIZE = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_RATE = {"": 1.0, "B/S": 1.0, "KB/S": 1e3, "MB/S": 1e6, "GB/S": 1e9, "TB/S": 1e12}
_BIT_RATE = {"BPS": 1 / 8, "KBPS": 1e3 / 8, "MBPS": 1e6 / 8, "GBPS": 1e9 / 8, "TBPS": 1e12 / 8}
_BIT_RATE.update({"B/S": 1 / 8, "KB/S": 1e3 / 8, "MB/S": 1e6 / 8, "GB/S": 1e9 / 8, "TB/S": 1e12 / 8})
_TIME = {"": 1.0, "S": 1.0, "MS": 1e-3, "US": 1e-6, "NS": 1e-9}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z/]*)\s*$")


def _split(name: str, text: str, accepted: str) -> tuple[float, str]:
    match = _NUMBER.match(text)
    if not match:
        raise invalid(name, text, accepted)
    return float(match.group(1)), match.group(2)


def parse_size(text: str | int, name: str = "size") -> int:
    """Bytes from '4096', '64K', '1M', '1G' (binary multiples, an optional trailing 'B')."""
    if isinstance(text, numbers.Integral) and not isinstance(text, bool):
        if text < 0:
            raise invalid(name, text, "a number of bytes >= 0")
        return int(text)
    accepted = "bytes like 4096, 64K, 1M, 1G"
    value, unit = _split(name, str(text), accepted)
    unit = unit.upper()
    if unit.endswith("B") and unit != "B":
        unit = unit[:-1]
    if unit not in _SIZE:
        raise invalid(name, text, accepted)
    result = value * _SIZE[unit]
    if not result.is_integer():
        raise invalid(name, text, accepted + " (a whole number of bytes)")
    return int(result)


def parse_sizes(text: str, name: str = "size") -> list[int]:
    """'1K:1G' (doubling), '1K:1G:4' (x4 each time), '1M' or '1K,64K,1M' to a list of byte sizes."""
    accepted = "a size, a list 'A,B,C', or a range 'MIN:MAX[:FACTOR]' like 1K:1G"
    if "," in text:
        return [parse_size(part, name) for part in text.split(",")]
    parts = text.split(":")
    if len(parts) == 1:
        return [parse_size(parts[0], name)]
    if len(parts) not in (2, 3):
        raise invalid(name, text, accepted)
    low, high = parse_size(parts[0], name), parse_size(parts[1], name)
    factor = int(parts[2]) if len(parts) == 3 and parts[2].isdigit() else (2 if len(parts) == 2 else 0)
    if low < 1 or high < low or factor < 2:
        raise invalid(name, text, accepted + " with 1 <= MIN <= MAX and an integer FACTOR >= 2")
    sizes = []
    size = low
    while size <= high:
        sizes.append(size)
        size *= factor
    return sizes


def parse_bandwidth(text: str | float, name: str = "bandwidth") -> float:
    """Bytes/s from a number or '50GB/s', '400Gb/s', '400Gbps' (decimal; lower-case b means bits)."""
    if isinstance(text, numbers.Real) and not isinstance(text, bool):
        value = float(text)
    else:
        accepted = "bytes/s like 50e9, '50GB/s', '400Gb/s' or '400Gbps'"
        number, unit = _split(name, str(text), accepted)
        bits = "b" in unit and "B" not in unit
        table = _BIT_RATE if bits else _RATE
        key = unit.upper()
        if key not in table:
            raise invalid(name, text, accepted)
        value = number * table[key]
    if not math.isfinite(value) or value <= 0:
        raise invalid(name, text, "a bandwidth > 0")
    return value


def parse_time(text: str | float, name: str = "latency") -> float:
    """Seconds from a number or '1us', '500ns', '2ms', '0.1s'."""
    if isinstance(text, numbers.Real) and not isinstance(text, bool):
        value = float(text)
    else:
        accepted = "seconds like 1e-6, '1us', '500ns'"
        number, unit = _split(name, str(text), accepted)
        if unit.upper() not in _TIME:
            raise invalid(name, text, accepted)
        value = number * _TIME[unit.upper()]
    if not math.isfinite(value) or value < 0:
        raise invalid(name, text, "a time >= 0")
    return value


def format_size(nbytes: float) -> str:
    """'1K', '64M', '3000' style: the largest binary unit that divides the size, else bytes."""
    for unit in ("T", "G", "M", "K"):
        if nbytes >= _SIZE[unit] and nbytes % _SIZE[unit] == 0:
            return f"{int(nbytes // _SIZE[unit])}{unit}"
    return str(int(nbytes))
