"""Which commlab algorithm the torch backend runs for each op, and whether it checks arguments.

Read from the environment when the first group is created (`COMMLAB_ALGORITHM="allreduce=ring,
allgather=bruck"`, `COMMLAB_CHECK=0|1`) and changeable at any time in the program with `configure(...)`,
which wins over the environment. Ops not named run `auto`. Every rank must configure alike: the
argument check (on by default) catches ranks that do not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from commlab.collectives.algorithms import algorithms_for
from commlab.collectives.schedule import OPS
from commlab.errors import InvalidArgumentError, invalid

ALGORITHM_ENV = "COMMLAB_ALGORITHM"
CHECK_ENV = "COMMLAB_CHECK"


@dataclass
class Settings:
    """The backend's per-op algorithm ('auto' when absent) and the cross-rank argument check."""

    algorithms: dict[str, str] = field(default_factory=dict)
    check: bool = True

    def algorithm(self, op: str) -> str:
        return self.algorithms.get(op, "auto")


_SETTINGS: Settings | None = None


def settings() -> Settings:
    """The current settings: configure()'s, else the environment's (read once)."""
    global _SETTINGS
    if _SETTINGS is None:
        _SETTINGS = Settings(
            parse_algorithms(os.environ.get(ALGORITHM_ENV, ""), ALGORITHM_ENV),
            _parse_check(os.environ.get(CHECK_ENV, "1")),
        )
    return _SETTINGS


def configure(algorithm: dict[str, str] | str | None = None, check: bool | None = None) -> Settings:
    """Set the backend's algorithm per op (a dict or 'op=name,...'; ops left out keep theirs) and the
    argument check, for every commlab group of this process from the next call on. Returns the settings."""
    current = settings()
    if algorithm is not None:
        if isinstance(algorithm, str):
            chosen = parse_algorithms(algorithm, "algorithm")
        elif isinstance(algorithm, dict):
            chosen = {op: _check_pair(op, name, "algorithm") for op, name in algorithm.items()}
        else:
            raise invalid("algorithm", algorithm, "a dict {op: algorithm} or a string 'op=algorithm,...'")
        current.algorithms.update(chosen)
    if check is not None:
        if not isinstance(check, bool):
            raise invalid("check", check, "True or False")
        current.check = check
    return current


def reset() -> None:
    """Forget configure()'s settings; the environment is read again on next use."""
    global _SETTINGS
    _SETTINGS = None


def parse_algorithms(text: str, name: str) -> dict[str, str]:
    """{op: algorithm} from 'allreduce=ring,allgather=bruck' (empty: none), each pair validated."""
    chosen: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        op, sep, algorithm = item.partition("=")
        if not sep:
            raise invalid(
                name, text, "comma-separated op=algorithm pairs, e.g. 'allreduce=ring,allgather=bruck'"
            )
        chosen[op.strip()] = _check_pair(op.strip(), algorithm.strip(), name)
    return chosen


def _check_pair(op: str, algorithm: str, name: str) -> str:
    if op not in OPS:
        raise invalid(f"{name} op", op, OPS)
    accepted = ("auto", *algorithms_for(op))
    if algorithm not in accepted:
        raise InvalidArgumentError(
            f"{name}: {op}={algorithm!r} is not an algorithm of {op}; accepted: {accepted}"
        )
    return algorithm


def _parse_check(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise invalid(CHECK_ENV, text, "1 or 0")
