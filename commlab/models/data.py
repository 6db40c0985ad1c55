"""Small real data sets that need no download, and deterministic batches sharded across dp ranks.

Every batch is a pure function of (seed, step): the global batch never depends on the rank or the
number of ranks, so rank shards stacked in rank order are exactly the batch one process draws, and a
run resumes at any step (under any dp size) without replaying the data stream.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from commlab.errors import CommlabError, invalid

CACHE_ENV = "COMMLAB_CACHE"
_CORPUS_FORMAT = 1  # bump when the way the corpus is built changes, so old caches are not reused
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


class MissingDependencyError(CommlabError, ImportError):
    """An optional dependency a feature needs is not installed."""


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where commlab caches data: `path`, else $COMMLAB_CACHE, else ~/.cache/commlab."""
    chosen = path or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "commlab"
    return Path(chosen).expanduser()


def mix_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed from (seed, step): neighbouring steps get unrelated random streams."""
    digest = hashlib.blake2b(f"commlab:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _check_shard(global_batch: int, rank: int, world: int) -> int:
    """Validate a dp shard of a global batch and return the per-rank batch size."""
    if not isinstance(world, int) or world < 1:
        raise invalid("world", world, "a positive int")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise invalid("rank", rank, f"an int in [0, {world})")
    if not isinstance(global_batch, int) or global_batch < 1 or global_batch % world:
        raise invalid("global_batch", global_batch, f"a positive multiple of the dp size world={world}")
    return global_batch // world


def stdlib_sources(max_bytes: int) -> bytes:
    """The standard library's .py files concatenated in sorted path order, cut at max_bytes.

    Skips site-packages, test directories and test_*.py files, and any file it cannot read.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)  # prune, and walk in sorted order
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            try:
                data = (Path(dirpath) / name).read_bytes()
            except OSError:
                continue
            chunks.append(data[: max_bytes - total])
            total += len(chunks[-1])
            if total >= max_bytes:
                return b"".join(chunks)
    return b"".join(chunks)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ByteCorpus:
    """A byte-level language-modelling corpus (vocabulary 256): the last val_fraction of bytes validates.

    Build the standard library's own sources with ByteCorpus.from_stdlib(), or wrap any bytes.
    """

    vocab_size = 256

    def __init__(
        self, data: bytes | np.ndarray, val_fraction: float = 0.05, path: Path | None = None
    ) -> None:
        array = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else np.asarray(data)
        if array.dtype != np.uint8 or array.ndim != 1:
            raise invalid("data", f"{array.dtype} array of shape {array.shape}", "bytes or a 1-D uint8 array")
        if not 0.0 < val_fraction < 1.0:
            raise invalid("val_fraction", val_fraction, "a float in (0, 1)")
        n_val = max(1, round(len(array) * val_fraction))
        if len(array) - n_val < 1:
            raise invalid("len(data)", len(array), "at least 2 bytes, so both splits are non-empty")
        self.data = array.copy() if not array.flags.writeable else array  # torch wants writable memory
        self.train, self.val = self.data[:-n_val], self.data[-n_val:]
        self.path = path  # the cache file it was loaded from, if any

    @classmethod
    def from_stdlib(
        cls,
        max_bytes: int = 8_000_000,
        cache: str | os.PathLike | None = None,
        val_fraction: float = 0.05,
    ) -> ByteCorpus:
        """The standard library's .py sources (up to max_bytes), cached in cache_dir(cache).

        The cache file name carries the Python implementation, version, stdlib location and byte cap,
        so a cache built by another Python or with another cap is never reused.
        """
        if not isinstance(max_bytes, int) or max_bytes < 2:
            raise invalid("max_bytes", max_bytes, "an int >= 2")
        v = sys.version_info
        stdlib = sysconfig.get_paths()["stdlib"]
        where = hashlib.blake2b(stdlib.encode(), digest_size=4).hexdigest()
        python = f"{sys.implementation.name}{v.major}.{v.minor}.{v.micro}"
        name = f"stdlib-{python}-{where}-{max_bytes}-v{_CORPUS_FORMAT}"
        path = cache_dir(cache) / f"{name}.bin"
        if path.is_file():
            return cls(np.fromfile(path, dtype=np.uint8), val_fraction, path)
        data = stdlib_sources(max_bytes)
        if len(data) < 2:
            raise CommlabError(f"found no readable .py files under the standard library at {stdlib!r}")
        try:
            _write_atomic(path, data)
        except OSError as e:  # an unwritable cache only costs a rebuild next time
            warnings.warn(f"could not cache the corpus at {path}: {e}", stacklevel=2)
            path = None
        return cls(data, val_fraction, path)

    def split(self, name: str) -> np.ndarray:
        """The 'train' or 'val' bytes."""
        if name not in ("train", "val"):
            raise invalid("split", name, ("train", "val"))
        return self.train if name == "train" else self.val

    def unigram_log_probs(self) -> np.ndarray:
        """log p(byte) of the 256 bytes under the train split's frequencies, add-one smoothed."""
        counts = np.bincount(self.train, minlength=256).astype(np.float64) + 1.0
        return np.log(counts / counts.sum())

    def unigram_loss(self) -> float:
        """Cross-entropy in nats of the validation bytes under train byte frequencies (add-one smoothed).

        The loss of the best model that ignores context: a trained LM must beat it.
        """
        return float(-self.unigram_log_probs()[self.val].mean())

    @staticmethod
    def decode(tokens: Tensor | np.ndarray | list[int]) -> str:
        """Byte ids -> text (invalid UTF-8 shown as U+FFFD)."""
        return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")

    @staticmethod
    def encode(text: str) -> Tensor:
        """Text -> byte ids, a 1-D int64 tensor."""
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def lm_batch(
    split: np.ndarray | Tensor,
    step: int,
    global_batch: int,
    seq_len: int,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
) -> tuple[Tensor, Tensor]:
    """This rank's share of a step's batch: inputs and next-byte targets, each (global_batch/world, seq_len).

    The global batch is global_batch windows at random offsets drawn from a generator seeded by
    (seed, step); rank r takes rows [r * b, (r + 1) * b) of it, b = global_batch / world.
    """
    local = _check_shard(global_batch, rank, world)
    data = torch.as_tensor(split)
    if not isinstance(seq_len, int) or seq_len < 1 or len(data) < seq_len + 1:
        raise invalid("seq_len", seq_len, f"a positive int below the split's length {len(data)}")
    generator = torch.Generator().manual_seed(mix_seed(seed, step))
    offsets = torch.randint(0, len(data) - seq_len, (global_batch,), generator=generator)
    offsets = offsets[rank * local : (rank + 1) * local]
    windows = data[offsets[:, None] + torch.arange(seq_len + 1)].long()
    return windows[:, :-1], windows[:, 1:]


class ShardedBatchSampler:
    """Per-rank batches of dataset indices whose union over ranks is the single-process global batch.

    Step k's global batch is block k % steps_per_epoch of a permutation seeded by (seed, epoch); rank r
    takes its r-th contiguous 1/world. Iterating yields this rank's batches from `position` on, forever
    (the last partial batch of an epoch is dropped). position counts batches handed out; resume with
    state_dict()/load_state_dict(), also under another dp size. With a prefetching DataLoader, set
    position from the steps actually trained rather than saving it.
    """

    def __init__(
        self, num_samples: int, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0
    ) -> None:
        self.local_batch = _check_shard(global_batch, rank, world)
        if not isinstance(num_samples, int) or num_samples < global_batch:
            raise invalid("num_samples", num_samples, f"an int >= global_batch={global_batch}")
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.rank, self.world = rank, world
        self.position = 0
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def global_indices(self, step: int) -> list[int]:
        """The whole global batch of step `step`, as one process would draw it."""
        if step < 0:
            raise invalid("step", step, "an int >= 0")
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.num_samples, generator=generator)
        return self._perm[k * self.global_batch : (k + 1) * self.global_batch].tolist()

    def indices(self, step: int) -> list[int]:
        """This rank's share of step `step`'s global batch."""
        start = self.rank * self.local_batch
        return self.global_indices(step)[start : start + self.local_batch]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            batch = self.indices(self.position)
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {
            "position": self.position,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at state['position']; the data stream (seed, num_samples, global_batch) must match."""
        for key in ("seed", "num_samples", "global_batch"):
            if state.get(key) != getattr(self, key):
                raise invalid(f"state[{key!r}]", state.get(key), f"this sampler's {key}={getattr(self, key)}")
        position = state.get("position")
        if not isinstance(position, int) or position < 0:
            raise invalid("state['position']", position, "an int >= 0")
        self.position = position


class ImageSplits(NamedTuple):
    """Images (N, C, H, W) float32 and labels (N,) int64 of a fixed train/test split."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def load_digits_images(image_size: int = 16) -> ImageSplits:
    """scikit-learn's 1797 8x8 handwritten digits, upsampled (bilinear) to image_size and standardized.

    Fixed split: every fifth image (index % 5 == 0) is test. Pixels are scaled by the train set's mean
    and standard deviation. Needs the optional extra: pip install 'commlab[vision]'.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise MissingDependencyError(
            "load_digits_images needs scikit-learn, which is not installed: pip install 'commlab[vision]'"
        ) from e
    if not isinstance(image_size, int) or image_size < 1:
        raise invalid("image_size", image_size, "a positive int")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.long)
    test = torch.arange(len(labels)) % 5 == 0
    mean, std = images[~test].mean(), images[~test].std()
    images = (images - mean) / std
    return ImageSplits(images[~test], labels[~test], images[test], labels[test])
