"""Reading another process's memory in one copy: Linux cross-memory attach (process_vm_readv, via ctypes).

The shared-memory transport sends long messages as a descriptor (the sender's address) and the receiver
copies the bytes straight from the sender's buffer into its own: one copy instead of two through a ring
(as MPICH and Open MPI do for large messages). The kernel allows it where the reader may ptrace the
owner (same user, and Yama's ptrace_scope 0, or a container that permits it); the transport probes that
at setup. ctypes releases the GIL during the call. `AVAILABLE` is False off Linux.
"""

from __future__ import annotations

import ctypes
import sys


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _bind() -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        readv = ctypes.CDLL(None, use_errno=True).process_vm_readv
    except (OSError, AttributeError):
        return None
    readv.restype = ctypes.c_ssize_t
    readv.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_IoVec),
        ctypes.c_ulong,
        ctypes.POINTER(_IoVec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    return readv


_READV = _bind()
AVAILABLE = _READV is not None


def read(pid: int, remote: int, local: int, nbytes: int) -> int:
    """Copy up to `nbytes` from address `remote` of process `pid` to `local`; bytes copied, or -1
    (ctypes.get_errno() says why: ESRCH, no such process; EPERM, not allowed; EFAULT, a bad address)."""
    if _READV is None:
        return -1
    local_iov = _IoVec(local, nbytes)
    remote_iov = _IoVec(remote, nbytes)
    return _READV(pid, ctypes.byref(local_iov), 1, ctypes.byref(remote_iov), 1, 0)
