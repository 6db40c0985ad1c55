"""A pool of gloo rank processes for tests: one process group reused by every test of a module.

`RankPool(world_size)` spawns the ranks once (each joins a gloo group through a file store); `pool.run(fn,
*args)` runs a module-level function on every rank and returns the per-rank results, re-raising a rank's
exception with its traceback. A task that breaks the group (a timeout closes gloo's pairs) is run with
`pool.run(..., breaks_group=True)`, after which the pool restarts its ranks on next use.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

GROUP_TIMEOUT_S = 60.0


class RankError(AssertionError):
    """A task failed on one or more ranks; the message holds each rank's traceback."""


def _serve(
    rank: int, world_size: int, store_path: str, tasks: mp.Queue, results: mp.Queue, backend: str | None
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["COMMLAB_TEST_RANK"] = str(rank)  # for tasks that make their own groups (backend=None)
    os.environ["COMMLAB_TEST_WORLD"] = str(world_size)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if backend is not None:
        dist.init_process_group(
            backend,
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=GROUP_TIMEOUT_S),
        )
    results.put((rank, "ready", None))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, "ok", fn(*args, **kwargs)))
        except BaseException as error:  # report everything, keep serving
            results.put((rank, "error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    import commlab

    commlab.release()  # close commlab's communicators before their group goes
    if dist.is_initialized():
        dist.destroy_process_group()


class RankPool:
    """`world_size` spawned processes in one gloo group, running test functions on request.

    `backend=None` starts the ranks without a group (tasks create their own, e.g. to run a program on
    two backends in turn); the ranks find their rank and world size in $COMMLAB_TEST_RANK/_WORLD.
    """

    def __init__(self, world_size: int, start_timeout: float = 120.0, backend: str | None = "gloo") -> None:
        self.world_size = world_size
        self.backend = backend
        self.start_timeout = start_timeout
        self._procs: list = []

    def _start(self) -> None:
        context = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory(prefix="commlab-test-")
        store = os.path.join(self._dir.name, "store")
        self._results = context.Queue()
        self._tasks = [context.Queue() for _ in range(self.world_size)]
        self._procs = [
            context.Process(
                target=_serve,
                args=(r, self.world_size, store, self._tasks[r], self._results, self.backend),
                daemon=True,
            )
            for r in range(self.world_size)
        ]
        for proc in self._procs:
            proc.start()
        self._collect(self.start_timeout, "start")

    def _collect(self, timeout: float, what: str) -> list[Any]:
        """Gather one answer per rank; a rank process that dies or stays silent past `timeout` fails fast."""
        out: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(out) < self.world_size:
            try:
                rank, status, value = self._results.get(timeout=0.5)
            except queue.Empty:
                dead = {r: p.exitcode for r, p in enumerate(self._procs) if r not in out and not p.is_alive()}
                if dead:
                    self.close()
                    raise RankError(f"rank process(es) died during {what}: exit codes {dead}") from None
                if time.monotonic() > deadline:
                    missing = sorted(set(range(self.world_size)) - set(out))
                    self.close()
                    raise RankError(f"ranks {missing} gave no answer to {what} within {timeout} s") from None
                continue
            out[rank] = (status, value)
        errors = [f"--- rank {r} ---\n{v}" for r, (s, v) in sorted(out.items()) if s == "error"]
        if errors:
            raise RankError(f"{what} failed on {len(errors)} rank(s):\n" + "\n".join(errors))
        return [out[r][1] for r in range(self.world_size)]

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float = 240.0,
        breaks_group: bool = False,
        per_rank_kwargs: list[dict] | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Run fn(*args, **kwargs) on every rank; return the results in rank order."""
        if not self._procs:
            self._start()
        for rank, tasks in enumerate(self._tasks):
            extra = per_rank_kwargs[rank] if per_rank_kwargs else {}
            tasks.put((fn, args, {**kwargs, **extra}))
        try:
            return self._collect(timeout, getattr(fn, "__name__", "task"))
        finally:
            if breaks_group:
                self.close()

    def close(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(timeout=10)
        self._procs = []
