"""An on-disk cache of hop-distance tables, so a repeat run on a large fabric skips the search.

The distance tables (`routing.distances_to`) of a k=64 fat-tree cost seconds to compute and depend only on
the links and on which nodes forward; a file named by a hash of exactly those arrays, the targets and
`CODE_VERSION` holds the table, so a changed graph or search gets a new name rather than a stale answer.
Only searches of at least `MIN_WORK` (targets x links) are stored: small fabrics compute faster than they
load. The folder is `$COMMLAB_CACHE_DIR` (set it empty to turn the cache off), else
`$XDG_CACHE_HOME/commlab/distances` (`~/.cache/commlab/distances`). Any failure to read or write the cache
is ignored: the table is then computed, as without a cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

CODE_VERSION = "distances-1"  # bump when distances_to's meaning or encoding changes
MIN_WORK = 1 << 26  # targets x links below which a table is not stored (it computes in well under 1 s)


def cache_dir() -> Path | None:
    """The cache folder, or None when `$COMMLAB_CACHE_DIR` is set empty (cache off)."""
    chosen = os.environ.get("COMMLAB_CACHE_DIR")
    if chosen is not None:
        return Path(chosen) if chosen else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "commlab" / "distances"


def table_key(link_src: np.ndarray, link_dst: np.ndarray, forwarding: np.ndarray, targets: np.ndarray) -> str:
    """A name for the distance table of `targets` on this graph: a hash of everything the table depends on."""
    digest = hashlib.sha256(CODE_VERSION.encode())
    for array in (link_src, link_dst, forwarding, targets):
        a = np.ascontiguousarray(array, np.int64)
        digest.update(str(a.shape).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()[:32]


def load(key: str, shape: tuple[int, int]) -> np.ndarray | None:
    """The stored table named `key`, or None (no cache, no file, wrong shape or unreadable)."""
    folder = cache_dir()
    if folder is None:
        return None
    try:
        table = np.load(folder / f"{key}.npy", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return table if table.shape == shape and table.dtype == np.int16 else None


def store(key: str, table: np.ndarray) -> None:
    """Write the table under `key` (atomically: a reader sees the whole file or none)."""
    folder = cache_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                np.save(out, table, allow_pickle=False)
            os.replace(tmp, folder / f"{key}.npy")
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        return
