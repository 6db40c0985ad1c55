"""Sleeping on a 32-bit word in shared memory until another process changes it (Linux futexes, via ctypes).

The shared-memory transport waits on a per-rank doorbell word: `wait(address, expected, timeout)`
returns when the word no longer holds `expected`, when `wake(address)` is called on it, or after
`timeout` seconds (so a lost wake-up costs time, never a hang). The word lives in a segment shared
between processes, so the process-shared (not private) futex operations are used. ctypes releases the
GIL during the call. `AVAILABLE` is False where there is no futex (not Linux, or an unknown
architecture); callers then nap instead.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine().lower())
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_WAKE_ALL = 0x7FFFFFFF


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or _SYS_FUTEX is None:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        return libc
    except OSError:
        return None


_LIBC = _libc()
AVAILABLE = _LIBC is not None and os.environ.get("COMMLAB_SHM_FUTEX", "1") != "0"


def wait(address: int, expected: int, timeout: float) -> None:
    """Sleep while the int32 at `address` equals `expected`, at most `timeout` seconds (> 0)."""
    assert _LIBC is not None
    seconds = max(timeout, 0.0)
    spec = _Timespec(int(seconds), int((seconds - int(seconds)) * 1e9))
    _LIBC.syscall(
        _SYS_FUTEX,
        ctypes.c_void_p(address),
        _FUTEX_WAIT,
        ctypes.c_int(expected),
        ctypes.byref(spec),
        None,
        0,
    )


def wake(address: int) -> None:
    """Wake every process sleeping on the int32 at `address`."""
    assert _LIBC is not None
    _LIBC.syscall(_SYS_FUTEX, ctypes.c_void_p(address), _FUTEX_WAKE, _WAKE_ALL, None, None, 0)
