"""Sharded training checkpoints that are either complete and verified or ignored.

Layout: `<directory>/step-00000120/` holds one file per shard (`<name>.pt`, written by the rank that owns
it) and `manifest.json`, written last by rank 0 once every shard is on disk. Each file is written to a
temporary name, fsynced and renamed, so a crash leaves either the old file or the new one, never half a
file. The manifest lists every shard with its size and SHA-256 and the parallel layout; loading checks all
three and names what is wrong. A step directory without a manifest (a crash during save) is skipped with a
warning and the previous complete checkpoint is used. Files load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from commlab.collectives.api import Group, all_reduce, communicator
from commlab.errors import CommlabError, invalid

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class CheckpointError(CommlabError):
    """A checkpoint is missing, incomplete, corrupted or does not match the current layout."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one (tmp, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def rng_state() -> dict[str, Any]:
    """The torch, numpy and Python RNG states in a form `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached": cached},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }  # fmt: skip


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by `rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss"]))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CheckpointManager:
    """Saves and loads one step's shards across the ranks of `group`; keeps the newest `keep` checkpoints.

    Every rank calls `save` and `load` collectively. `layout` (e.g. {"dp": 2, "tp": 1, "pp": 1}) is stored
    in the manifest; `load` refuses a checkpoint whose layout differs in a key named in `must_match`.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3, group: Group = None) -> None:
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise invalid("keep", keep, "an integer >= 1")
        self.directory = Path(directory)
        self.keep = keep
        self.comm = communicator(group)

    def _barrier(self) -> None:
        """All ranks reach this point (a one-element allreduce); also surfaces a failure on any rank."""
        all_reduce(torch.zeros(1), group=self.comm)

    def step_dir(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}"

    def save(self, step: int, shards: dict[str, dict[str, Any]], layout: dict[str, int]) -> Path:
        """Write this rank's `shards` ({name: state}) for `step`; rank 0 writes the manifest after all."""
        if not isinstance(step, int) or step < 0:
            raise invalid("step", step, "an integer >= 0")
        for name in shards:
            if not _SHARD_NAME.match(name):
                raise invalid("shard name", name, "letters, digits, '_', '.', '-'")
        target = self.step_dir(step)
        if self.comm.rank == 0:
            target.mkdir(parents=True, exist_ok=True)
            (target / MANIFEST).unlink(missing_ok=True)  # an overwritten step is incomplete until the end
        self._barrier()
        entries = {}
        for name, state in shards.items():
            buffer = io.BytesIO()
            torch.save(state, buffer)
            data = buffer.getvalue()
            write_atomic(target / f"{name}.pt", data)
            entries[name] = {"bytes": len(data), "sha256": sha256(data), "rank": self.comm.rank}
        write_atomic(target / f".entries-rank{self.comm.rank}.json", json.dumps(entries).encode())
        self._barrier()
        if self.comm.rank == 0:
            files: dict[str, Any] = {}
            for rank in range(self.comm.size):
                sidecar = target / f".entries-rank{rank}.json"
                files.update(json.loads(sidecar.read_text()))
                sidecar.unlink()
            manifest = {"format": FORMAT_VERSION, "step": step, "layout": layout, "files": files}
            write_atomic(target / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
            self._prune()
        self._barrier()
        return target

    def _prune(self) -> None:
        """Delete all but the newest `keep` complete checkpoints (and incomplete ones older than them)."""
        complete = [s for s in self.steps() if (self.step_dir(s) / MANIFEST).exists()]
        if len(complete) <= self.keep:
            return
        oldest_kept = complete[-self.keep]
        for step in self.steps():
            if step < oldest_kept:
                shutil.rmtree(self.step_dir(step), ignore_errors=True)

    def steps(self) -> list[int]:
        """Steps that have a directory, oldest first (complete or not)."""
        if not self.directory.is_dir():
            return []
        found = (_STEP_DIR.match(p.name) for p in self.directory.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def manifest(self, step: int) -> dict[str, Any]:
        """The manifest of `step`, or CheckpointError saying why there is none."""
        path = self.step_dir(step) / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path.parent} has no {MANIFEST}: the save did not complete") from None
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path} is not valid JSON ({error})") from None
        if manifest.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
        return manifest

    def latest(self) -> int | None:
        """The newest step with a complete manifest; incomplete newer ones are skipped with a warning."""
        for step in reversed(self.steps()):
            try:
                self.manifest(step)
            except CheckpointError as error:
                warnings.warn(f"skipping checkpoint: {error}", stacklevel=2)
                continue
            return step
        return None

    def load(
        self, step: int, names: list[str], layout: dict[str, int], must_match: tuple[str, ...] = ()
    ) -> dict[str, dict[str, Any]]:
        """Load and verify the shards `names` of `step`; raise CheckpointError naming any problem."""
        manifest = self.manifest(step)
        for key in must_match:
            if manifest["layout"].get(key) != layout.get(key):
                raise CheckpointError(
                    f"checkpoint step {step} was saved with {key}={manifest['layout'].get(key)}, "
                    f"this run has {key}={layout.get(key)} (saved layout {manifest['layout']})"
                )
        out = {}
        for name in names:
            entry = manifest["files"].get(name)
            path = self.step_dir(step) / f"{name}.pt"
            if entry is None:
                raise CheckpointError(
                    f"checkpoint step {step} has no shard {name!r}; it has {sorted(manifest['files'])}"
                )
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise CheckpointError(f"shard file {path} listed in the manifest is missing") from None
            if len(data) != entry["bytes"] or sha256(data) != entry["sha256"]:
                raise CheckpointError(
                    f"shard file {path} is corrupted: {len(data)} bytes with SHA-256 {sha256(data)[:12]}..., "
                    f"manifest says {entry['bytes']} bytes, {entry['sha256'][:12]}..."
                )
            out[name] = torch.load(io.BytesIO(data), weights_only=True)
        return out


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def save_training(
    manager: CheckpointManager,
    step: int,
    model: torch.nn.Module,
    optimizer: Any,
    layout: dict[str, int],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save a data-parallel training state: model and optimizer (rank 0; ZeRO: a shard per rank), each
    rank's RNG states, and `extra` (step-level state such as the data position and LR schedule)."""
    rank = manager.comm.rank
    shards: dict[str, dict[str, Any]] = {f"rng-rank{rank}": rng_state()}
    sharded = hasattr(optimizer, "local_state_bytes")  # ZeroOptimizer: every rank owns a shard
    if sharded:
        shards[f"optimizer-dp{rank}"] = optimizer.state_dict()
    if rank == 0:
        shards["model"] = _unwrap(model).state_dict()
        shards["trainer"] = {"step": step, "extra": extra or {}}
        if not sharded:
            shards["optimizer"] = optimizer.state_dict()
    return manager.save(step, shards, {**layout, "zero": int(sharded)})


def load_training(
    manager: CheckpointManager, model: torch.nn.Module, optimizer: Any, layout: dict[str, int]
) -> tuple[int, dict[str, Any]] | None:
    """Restore the newest complete checkpoint into `model` and `optimizer` (and this rank's RNG).

    Returns (step, extra) or None when there is no checkpoint. A plain optimizer resumes under any dp
    size; a ZeRO-sharded one needs the same dp size (CheckpointError otherwise).
    """
    step = manager.latest()
    if step is None:
        return None
    rank = manager.comm.rank
    sharded = hasattr(optimizer, "local_state_bytes")
    names = ["model", "trainer", f"optimizer-dp{rank}" if sharded else "optimizer"]
    must_match = ("zero", "dp") if sharded else ("zero",)
    state = manager.load(step, names, {**layout, "zero": int(sharded)}, must_match)
    _unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state[names[2]])
    rng_name = f"rng-rank{rank}"
    if rng_name in manager.manifest(step)["files"]:
        set_rng_state(manager.load(step, [rng_name], layout)[rng_name])
    return state["trainer"]["step"], state["trainer"]["extra"]
