"""Sharded training checkpoints that are either complete and verified or ignored.

Layout: `<directory>/step-00000120/` holds one file per shard (`<name>.pt`, written by the rank that owns
it) and `manifest.json`, written last by rank 0 once every shard is on disk. Each file is written to a
temporary name, fsynced and renamed, so a crash leaves either the old file or the new one, never half a
file. The manifest lists every shard with its size and SHA-256 and the parallel layout; loading checks all
three and names what is wrong. A step directory without a manifest (a crash during save) is skipped with a
warning and the previous complete checkpoint is used. Files load with `torch.load(weights_only=True)`.

`save_training` / `load_training` put a training state in that layout (`Layout`: one model and optimizer
shard per (pp, tp) coordinate, ZeRO optimizer shards per dp rank, RNG per rank); loading accepts another
dp size (ZeRO shards are regathered by `reshard_zero_state`) but not another pp or tp. Fault-injection
points (`commlab.parallel.faults`) sit between a shard's temporary file and its rename, before the
manifest, and after a load. docs/fault_tolerance.md has the whole story.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from commlab.collectives.api import Group, all_reduce, communicator
from commlab.errors import CommlabError, invalid
from commlab.parallel.faults import fault_point

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class CheckpointError(CommlabError):
    """A checkpoint is missing, incomplete, corrupted or does not match the current layout."""


def write_atomic(path: Path, data: bytes, before_rename: Callable[[], None] | None = None) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one (tmp, fsync, rename).

    `before_rename` runs once the temporary file is on disk (the fault-injection point `save-temp`).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if before_rename is not None:
        before_rename()
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
        rank = self.comm.rank
        for name, state in shards.items():
            buffer = io.BytesIO()
            torch.save(state, buffer)
            data = buffer.getvalue()
            write_atomic(target / f"{name}.pt", data, lambda: fault_point("save-temp", step, rank))
            entries[name] = {"bytes": len(data), "sha256": sha256(data), "rank": self.comm.rank}
        write_atomic(target / f".entries-rank{self.comm.rank}.json", json.dumps(entries).encode())
        self._barrier()
        fault_point("save-manifest", step, rank)
        if rank == 0:
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
        fault_point("load", step, self.comm.rank)
        return out


@dataclass(frozen=True)
class Layout:
    """The dp x pp x tp layout of a run and this rank's coordinates in it: which shards it saves and loads.

    Model and optimizer state is one shard per (pp, tp) coordinate, `model-pp{p}-tp{t}` and
    `optimizer-pp{p}-tp{t}`, written by dp rank 0 (data-parallel replicas hold the same values); a ZeRO
    optimizer adds the dp coordinate, `optimizer-pp{p}-tp{t}-dp{d}`, one per rank.
    """

    dp: int = 1
    pp: int = 1
    tp: int = 1
    dp_rank: int = 0
    pp_rank: int = 0
    tp_rank: int = 0

    @classmethod
    def data_parallel(cls, rank: int, size: int) -> Layout:
        """Plain data parallelism over `size` ranks."""
        return cls(dp=size, dp_rank=rank)

    @classmethod
    def of(cls, mesh: Any) -> Layout:
        """The layout of a `commlab.parallel.Mesh`."""
        return cls(mesh.dp, mesh.pp, mesh.tp, mesh.dp_rank, mesh.pp_rank, mesh.tp_rank)

    def sizes(self, zero: bool) -> dict[str, int]:
        """What the manifest records: the axis sizes and whether the optimizer state is ZeRO-sharded."""
        return {"dp": self.dp, "pp": self.pp, "tp": self.tp, "zero": int(zero)}

    @property
    def place(self) -> str:
        return f"pp{self.pp_rank}-tp{self.tp_rank}"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _is_zero(optimizer: Any) -> bool:
    return hasattr(optimizer, "local_state_bytes")  # ZeroOptimizer: every dp rank owns a shard


def save_training(
    manager: CheckpointManager,
    step: int,
    model: torch.nn.Module,
    optimizer: Any,
    layout: Layout | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save a training state: this (pp, tp) coordinate's model and optimizer (from dp rank 0; ZeRO: a
    shard per dp rank), every rank's RNG states, and `extra` (step-level state such as the data position).

    `layout` defaults to plain data parallelism over the manager's group; `model` is this rank's part
    (a PipelineStage under pipelining, the module, or a DataParallel wrapping it).
    """
    rank = manager.comm.rank
    layout = layout or Layout.data_parallel(rank, manager.comm.size)
    shards: dict[str, dict[str, Any]] = {f"rng-rank{rank}": rng_state()}
    zero = _is_zero(optimizer)
    if zero:
        shards[f"optimizer-{layout.place}-dp{layout.dp_rank}"] = optimizer.state_dict()
    if layout.dp_rank == 0:
        shards[f"model-{layout.place}"] = _unwrap(model).state_dict()
        if not zero:
            shards[f"optimizer-{layout.place}"] = optimizer.state_dict()
    if rank == 0:
        shards["trainer"] = {"step": step, "extra": extra or {}}
    return manager.save(step, shards, layout.sizes(zero))


def load_training(
    manager: CheckpointManager, model: torch.nn.Module, optimizer: Any, layout: Layout | None = None
) -> tuple[int, dict[str, Any]] | None:
    """Restore the newest complete checkpoint into `model` and `optimizer` (and this rank's RNG).

    Returns (step, extra) or None when there is no checkpoint. The pp and tp sizes must be those of the
    save (CheckpointError naming both layouts otherwise); the dp size may differ: model and plain
    optimizer state are the same on every replica, and ZeRO shards are regathered into the full flat
    state and cut again for the new dp size. RNG states are restored only under the same layout (with
    another dp size the ranks' RNG streams have no one-to-one counterpart; each rank keeps its own).
    """
    step = manager.latest()
    if step is None:
        return None
    rank = manager.comm.rank
    layout = layout or Layout.data_parallel(rank, manager.comm.size)
    zero = _is_zero(optimizer)
    sizes = layout.sizes(zero)
    saved = manager.manifest(step)["layout"]
    differ = [key for key in ("pp", "tp", "zero") if saved.get(key, int(key != "zero")) != sizes[key]]
    if differ:
        raise CheckpointError(
            f"checkpoint step {step} in {manager.step_dir(step)} was saved with layout {saved}; this run "
            f"has {sizes}: {' and '.join(differ)} differ (pp, tp and ZeRO must match the save; dp may change)"
        )
    names = [f"model-{layout.place}", "trainer"]
    if zero:
        names += [f"optimizer-{layout.place}-dp{d}" for d in range(saved["dp"])]
    else:
        names.append(f"optimizer-{layout.place}")
    state = manager.load(step, names, sizes)
    _unwrap(model).load_state_dict(state[names[0]])
    if zero:
        optimizer.load_state_dict(reshard_zero_state(optimizer, [state[n] for n in names[2:]]))
    else:
        optimizer.load_state_dict(state[names[2]])
    rng_name = f"rng-rank{rank}"
    if saved.get("dp") == layout.dp:
        set_rng_state(manager.load(step, [rng_name], sizes)[rng_name])
    return state["trainer"]["step"], state["trainer"]["extra"]


def reshard_zero_state(optimizer: Any, saved: list[dict[str, Any]]) -> dict[str, Any]:
    """This rank's `ZeroOptimizer` state cut from the shards `saved` by every rank of another (or the same)
    dp size: per dtype group, the shards' flat state tensors are concatenated, the old padding dropped,
    padded for the new size and sliced at this rank's offset; scalars (Adam's step) are shared."""
    size, rank = optimizer.comm.size, optimizer.comm.rank
    if [s.get("rank") for s in saved] != list(range(len(saved))):
        ranks = [s.get("rank") for s in saved]
        raise CheckpointError(f"ZeRO optimizer shards are out of order: ranks {ranks}")
    old_numels = saved[0]["shard_numels"]
    if len(old_numels) != len(optimizer.shards):
        raise CheckpointError(
            f"the checkpoint's ZeRO optimizer has {len(old_numels)} dtype groups, "
            f"this one {len(optimizer.shards)}"
        )
    states: dict[int, dict[str, Any]] = {}
    for index, shard in enumerate(optimizer.shards):
        numel = sum(p.numel() for p in shard.params)
        per_rank = [s["optimizer"]["state"].get(index, {}) for s in saved]
        if not per_rank[0]:
            continue
        state = {}
        for key, value in per_rank[0].items():
            if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == old_numels[index]:
                full = torch.cat([r[key] for r in per_rank])[:numel]
                padded = torch.zeros(shard.shard_numel * size, dtype=value.dtype)
                padded[:numel] = full
                state[key] = padded[rank * shard.shard_numel : (rank + 1) * shard.shard_numel].clone()
            else:
                state[key] = value
        states[index] = state
    return {
        "world_size": size,
        "rank": rank,
        "shard_numels": [s.shard_numel for s in optimizer.shards],
        "optimizer": {"state": states, "param_groups": saved[0]["optimizer"]["param_groups"]},
    }
