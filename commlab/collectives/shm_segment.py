"""The shared-memory segment of a SharedMemoryTransport: its layout, naming, creation and cleanup.

A segment is one file in /dev/shm (POSIX shared memory), named `commlab-shm-<creator pid>-<token>`, made
by one rank of the group (see `shm_setup`) and mapped by every rank. It is unlinked as soon as every rank
has mapped it (or when its maker exits, if some rank never did), so a run that crashes later leaves
nothing behind (the kernel frees the memory with the last mapping); only a crash before that can leave a
file, and `sweep_stale` (run by the maker of every new segment) removes the files whose maker is gone.
Process liveness is judged by /proc/<pid>/stat: the process exists, is not a zombie, and has the start
time recorded when the transport was made (so a reused pid does not count).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from dataclasses import dataclass

from commlab.errors import TransportError

SHM_DIR = "/dev/shm"
PREFIX = "commlab-shm-"

STATUS_BYTES = 64  # per rank, one cache line: state, sleeping flag, doorbell, base address, pid, start,
# joined flag
GATHER_WORDS = 32  # per rank and parity: a sequence number and up to 31 int64 values (allgather_int64)
CHANNEL_CTRL_BYTES = 128  # per ordered pair: the head counter (sender's line), the tail counter (receiver's)
PAGE = 4096

RUNNING, CLOSED, FAILED = 0, 1, 2
CAN_READ, CANNOT_READ = 1, 2  # a receiver's answer in `Layout.can_read_word`


@dataclass(frozen=True)
class Layout:
    """Byte offsets in a segment of `size` ranks with rings of `ring_bytes` per ordered pair of ranks.

    [status of each rank][two allgather slots per rank][head, tail of each pair][ring of each pair]
    Counters sit on their own cache lines so a sender's and a receiver's writes never share one.
    """

    size: int
    ring_bytes: int

    @property
    def gather_base(self) -> int:
        return self.size * STATUS_BYTES

    @property
    def channel_base(self) -> int:
        return self.gather_base + self.size * 2 * GATHER_WORDS * 8

    @property
    def data_base(self) -> int:
        end = self.channel_base + self.size * self.size * CHANNEL_CTRL_BYTES
        return -(-end // PAGE) * PAGE

    @property
    def total_bytes(self) -> int:
        return self.data_base + self.size * self.size * self.ring_bytes

    def status_word(self, rank: int) -> int:
        """Index (in int64 words) of a rank's state word."""
        return rank * STATUS_BYTES // 8

    def waiting_word(self, rank: int) -> int:
        """Index of a rank's flag: 1 while it sleeps (or is about to) on its doorbell."""
        return rank * STATUS_BYTES // 8 + 1

    def base_word(self, rank: int) -> int:
        """Index of the address at which a rank mapped the segment (for the cma probe)."""
        return rank * STATUS_BYTES // 8 + 3

    def pid_word(self, rank: int) -> int:
        """Index of a rank's process id (0 until it joined)."""
        return rank * STATUS_BYTES // 8 + 4

    def started_word(self, rank: int) -> int:
        """Index of a rank's process start time (see `start_time`), for telling a reused pid apart."""
        return rank * STATUS_BYTES // 8 + 5

    def joined_word(self, rank: int) -> int:
        """Index of a rank's joined flag: 1 once its base address, pid and start time are written."""
        return rank * STATUS_BYTES // 8 + 6

    def doorbell_offset(self, rank: int) -> int:
        """Byte offset of a rank's doorbell, the int32 its peers change (and futex-wake) to wake it."""
        return rank * STATUS_BYTES + 16

    def gather_word(self, rank: int, parity: int) -> int:
        """Index of a rank's allgather slot of parity 0 or 1: [sequence, values...]."""
        return (self.gather_base + (rank * 2 + parity) * GATHER_WORDS * 8) // 8

    def head_word(self, src: int, dst: int) -> int:
        """Index of the bytes-written counter of the ring src -> dst (written by src only)."""
        return (self.channel_base + (src * self.size + dst) * CHANNEL_CTRL_BYTES) // 8

    def tail_word(self, src: int, dst: int) -> int:
        """Index of the bytes-consumed counter of the ring src -> dst (written by dst only)."""
        return self.head_word(src, dst) + CHANNEL_CTRL_BYTES // 16

    def can_read_word(self, src: int, dst: int) -> int:
        """Index of dst's answer (on the tail's line, written by dst only) to whether it can read src's
        memory: 0 not known yet, CAN_READ (src may send long messages as descriptors), CANNOT_READ."""
        return self.tail_word(src, dst) + 1

    def ring_offset(self, src: int, dst: int) -> int:
        return self.data_base + (src * self.size + dst) * self.ring_bytes


def segment_path(creator_pid: int, token: int) -> str:
    return os.path.join(SHM_DIR, f"{PREFIX}{creator_pid}-{token:x}")


def new_token() -> int:
    """A random positive 62-bit run id (it names the segment, so names never repeat)."""
    return secrets.randbits(62) | 1


def create(path: str, nbytes: int) -> mmap.mmap:
    """Create the segment file (it must not exist) of `nbytes` zero bytes and map it."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        if hasattr(os, "posix_fallocate"):  # reserve the pages now: a full /dev/shm is an error here,
            os.posix_fallocate(fd, 0, nbytes)  # not a SIGBUS at the first copy into a ring
        return mmap.mmap(fd, nbytes)
    except OSError:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def attach(path: str, nbytes: int) -> mmap.mmap:
    """Map an existing segment of `nbytes` bytes."""
    fd = os.open(path, os.O_RDWR)
    try:
        if os.fstat(fd).st_size != nbytes:
            raise TransportError(f"shared-memory segment {path} has the wrong size (expected {nbytes} bytes)")
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


def unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def start_time(pid: int) -> int | None:
    """The start time (clock ticks after boot) of a live, non-zombie process; None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return None
    fields = text[text.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X", b"x"):
        return None
    return int(fields[19])  # field 22 of stat(5); fields[0] is field 3


def is_alive(pid: int, started: int) -> bool:
    """Whether process `pid` still runs and is the one that started at `started`."""
    return start_time(pid) == started


def sweep_stale() -> list[str]:
    """Remove commlab segments whose creator process is gone; return their paths."""
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(PREFIX):
            continue
        pid_text = name[len(PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and start_time(int(pid_text)) is None:
            path = os.path.join(SHM_DIR, name)
            unlink(path)
            removed.append(path)
    return removed


def host_identity() -> bytes:
    """What ranks on one host share: the host name and the kernel's boot id."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as source:
            boot = source.read().strip()
    except OSError:
        boot = b""
    return os.uname().nodename.encode() + b"/" + boot
