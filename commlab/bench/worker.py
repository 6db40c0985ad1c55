"""What every rank of `commlab bench` runs: buffers, the native collective, the data check and the timing.

Per size, every variant (each commlab algorithm, then the native collective) is warmed up, checked once
against values every rank computes locally, then timed in `repeats` samples of `iters` back-to-back calls;
the variants take turns inside each repetition (the starting one rotates), so a noisy moment of a shared
machine hits them all alike. A sample's time is the slowest rank's mean per call; a row reports the
median sample.

    python -m commlab.bench.worker   (the configuration in $COMMLAB_BENCH_CONFIG; see launch.py)
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch

import commlab
from commlab.bench.config import AUTO_CHECK_OFF, BenchConfig
from commlab.bench.launch import worker_main
from commlab.bench.report import Reporter
from commlab.collectives.tuning import resolve
from commlab.errors import invalid
from commlab.shared.ops import op_info


@dataclass
class Ranks:
    """The running group: commlab's communicator, this rank, and the backend's native operations."""

    comm: commlab.Communicator
    rank: int
    world: int
    barrier: Callable[[], None]
    max_all: Callable[[torch.Tensor], torch.Tensor]  # elementwise max over ranks (float64)
    native: Callable[[str, str, int], Callable[[dict], Callable[[], None]] | None]
    describe: str
    close: Callable[[], None] = lambda: None  # destroys the process group when this run created it


def start(config: BenchConfig) -> Ranks:
    """Join the group of the configured backend (environment set by torchrun, mpiexec or launch.py)."""
    torch.set_num_threads(1)
    if config.backend == "mpi":
        from mpi4py import MPI

        from commlab.collectives.mpi import MPITransport

        world_comm = MPI.COMM_WORLD
        comm = commlab.Communicator(MPITransport(world_comm, timeout=config.timeout))

        def max_all(values: torch.Tensor) -> torch.Tensor:
            out = values.clone()
            world_comm.Allreduce(MPI.IN_PLACE, out.numpy(), op=MPI.MAX)
            return out

        return Ranks(
            comm,
            world_comm.Get_rank(),
            world_comm.Get_size(),
            world_comm.Barrier,
            max_all,
            lambda op, redop, root: _mpi_native(world_comm, op, redop, root),
            MPI.Get_library_version().splitlines()[0].strip(),
        )
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=timedelta(seconds=config.timeout))

    def max_all(values: torch.Tensor) -> torch.Tensor:
        out = values.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    return Ranks(
        commlab.communicator(None),
        dist.get_rank(),
        dist.get_world_size(),
        dist.barrier,
        max_all,
        _gloo_native,
        f"torch {torch.__version__} gloo",
        # gloo's threads must stop before interpreter exit, or the process may abort with
        # "terminate called without an active exception" (pytorch/pytorch#190489)
        (lambda: (commlab.release(), dist.destroy_process_group())) if created else (lambda: None),
    )


def _gloo_native(op: str, redop: str, root: int) -> Callable[[dict], Callable[[], None]]:
    import torch.distributed as dist

    reduce_op = {
        "sum": dist.ReduceOp.SUM,
        "avg": dist.ReduceOp.SUM,  # gloo has no AVG: sum, then divide
        "max": dist.ReduceOp.MAX,
        "min": dist.ReduceOp.MIN,
        "prod": dist.ReduceOp.PRODUCT,
    }[redop]
    world = dist.get_world_size()
    scale = (lambda t: t.div_(world)) if redop == "avg" else (lambda t: None)
    # torch >= 2.11 names them *_single; the *_tensor names are the older (now deprecated) ones
    _REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    _ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def make(b: dict) -> Callable[[], None]:
        if op == "allreduce":
            return lambda: (dist.all_reduce(b["work"], op=reduce_op), scale(b["work"]))
        if op == "reduce_scatter":
            return lambda: (_REDUCE_SCATTER(b["out"], b["input"], op=reduce_op), scale(b["out"]))
        if op == "allgather":
            return lambda: _ALL_GATHER(b["out"], b["input"])
        if op == "alltoall":
            return lambda: dist.all_to_all_single(b["out"], b["input"])
        if op == "broadcast":
            return lambda: dist.broadcast(b["work"], src=root)
        return lambda: (dist.reduce(b["work"], dst=root, op=reduce_op), scale(b["work"]))

    return make


def _mpi_native(comm: Any, op: str, redop: str, root: int) -> Callable[[dict], Callable[[], None]] | None:
    from mpi4py import MPI

    mpi_op = {"sum": MPI.SUM, "avg": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}[redop]
    world, rank = comm.Get_size(), comm.Get_rank()

    def make(b: dict) -> Callable[[], None]:
        arrays = {name: t.numpy() for name, t in b.items() if isinstance(t, torch.Tensor)}
        scale = (lambda a: a.__itruediv__(world)) if redop == "avg" else (lambda a: None)
        if op == "allreduce":
            work = arrays["work"]
            return lambda: (comm.Allreduce(MPI.IN_PLACE, work, op=mpi_op), scale(work))
        if op == "reduce_scatter":
            src, out = arrays["input"], arrays["out"]
            return lambda: (comm.Reduce_scatter_block(src, out, op=mpi_op), scale(out))
        if op == "allgather":
            src, out = arrays["input"], arrays["out"]
            return lambda: comm.Allgather(src, out)
        if op == "alltoall":
            src, out = arrays["input"], arrays["out"]
            return lambda: comm.Alltoall(src, out)
        work = arrays["work"]
        if op == "broadcast":
            return lambda: comm.Bcast(work, root=root)
        if rank == root:
            return lambda: (comm.Reduce(MPI.IN_PLACE, work, op=mpi_op, root=root), scale(work))
        return lambda: comm.Reduce(work, None, op=mpi_op, root=root)

    return make


def pattern(rank: int, start: int, count: int, redop: str, dtype: torch.dtype) -> torch.Tensor:
    """Rank `rank`'s values at elements start..start+count: small integers, exact in every dtype."""
    return _values(rank, start, count, redop, dtype == torch.uint8).to(dtype)


def _values(rank: int, start: int, count: int, redop: str, unsigned: bool) -> torch.Tensor:
    i = torch.arange(start, start + count, dtype=torch.int64)
    if redop == "prod":
        return ((i + rank) % 3 == 0).to(torch.int64) * int(rank < 6) + 1
    if redop in ("max", "min"):
        return (rank * 7 + i * 3) % 11 - (0 if unsigned else 5)
    return (i + rank) % 4 + 1


def expected(world: int, start: int, count: int, redop: str, dtype: torch.dtype) -> torch.Tensor:
    """The reduction over every rank's pattern, computed locally in float64 and rounded once."""
    unsigned = dtype == torch.uint8
    total = _values(0, start, count, redop, unsigned).double()
    for rank in range(1, world):
        other = _values(rank, start, count, redop, unsigned).double()
        if redop == "prod":
            total.mul_(other)
        elif redop == "max":
            torch.maximum(total, other, out=total)
        elif redop == "min":
            torch.minimum(total, other, out=total)
        else:
            total.add_(other)
    if redop == "avg":
        total.div_(world)
    return total.to(dtype)


def buffers(op: str, count: int, ranks: Ranks, config: BenchConfig, dtype: torch.dtype) -> dict:
    """The pristine input, the work buffers and the expected output of one size on this rank."""
    rank, world, redop = ranks.rank, ranks.world, config.redop
    if op == "reduce_scatter":
        pristine = pattern(rank, 0, count * world, redop, dtype)
        want = expected(world, rank * count, count, redop, dtype) if config.check else None
        return {"pristine": pristine, "input": pristine.clone(), "out": torch.empty(count, dtype=dtype),
                "want": want, "result": "out"}  # fmt: skip
    if op == "allgather":
        pristine = pattern(rank, rank * count, count, redop, dtype)
        want = None
        if config.check:
            want = torch.cat([pattern(r, r * count, count, redop, dtype) for r in range(world)])
        out = torch.empty(count * world, dtype=dtype)
        return {"pristine": pristine, "input": pristine.clone(), "out": out, "want": want, "result": "out"}
    if op == "alltoall":  # block d of rank r's input goes to rank d; rank r's output block s is from s
        pristine = torch.cat([pattern(rank, d * count, count, redop, dtype) for d in range(world)])
        want = None
        if config.check:
            want = torch.cat([pattern(s, rank * count, count, redop, dtype) for s in range(world)])
        out = torch.empty(count * world, dtype=dtype)
        return {"pristine": pristine, "input": pristine.clone(), "out": out, "want": want, "result": "out"}
    if op == "broadcast" and rank != config.root:
        pristine = torch.full((count,), 77, dtype=dtype)  # never a pattern value: an unwritten one shows
    else:
        pristine = pattern(rank, 0, count, redop, dtype)
    want = None
    if config.check and op == "broadcast":
        want = pattern(config.root, 0, count, redop, dtype)
    elif config.check and (op == "allreduce" or rank == config.root):
        want = expected(world, 0, count, redop, dtype)
    return {"pristine": pristine, "work": pristine.clone(), "want": want, "result": "work"}


def commlab_call(op: str, algorithm: str, b: dict, ranks: Ranks, config: BenchConfig) -> Callable[[], None]:
    kwargs = {"group": ranks.comm, "algorithm": algorithm, "check": config.arg_check}
    if op == "allreduce":
        return lambda: commlab.all_reduce(b["work"], op=config.redop, **kwargs)
    if op == "reduce_scatter":
        return lambda: commlab.reduce_scatter(b["out"], b["input"], op=config.redop, **kwargs)
    if op == "allgather":
        return lambda: commlab.all_gather(b["out"], b["input"], **kwargs)
    if op == "alltoall":
        return lambda: commlab.all_to_all(b["out"], b["input"], **kwargs)
    if op == "broadcast":
        return lambda: commlab.broadcast(b["work"], config.root, **kwargs)
    return lambda: commlab.reduce(b["work"], config.root, op=config.redop, **kwargs)


def restore(b: dict) -> None:
    """Put the input back (in-place collectives overwrite it)."""
    if "work" in b:
        b["work"].copy_(b["pristine"])


def wrong_elements(b: dict, dtype: torch.dtype, redop: str) -> int:
    """Elements of the result that differ from the expected values (avg: beyond rounding)."""
    want = b["want"]
    if want is None:
        return 0
    got = b[b["result"]]
    if redop == "avg" and dtype.is_floating_point:
        close = torch.isclose(got.double(), want.double(), rtol=4 * torch.finfo(dtype).eps, atol=0)
        return int((~close).sum())
    return int((got != want).sum())


def run_size(size: int, ranks: Ranks, config: BenchConfig) -> list[dict]:
    """Every variant at one size: rows for rank 0's report (every rank returns the same rows)."""
    dtype = getattr(torch, config.dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    world, op = ranks.world, config.op
    info = op_info(op)
    count = info.count(size, itemsize, world)
    nbytes = info.total_bytes(count, itemsize, world)
    b = buffers(op, count, ranks, config, dtype)
    calls: dict[str, Callable[[], None]] = {
        a: commlab_call(op, a, b, ranks, config) for a in config.algorithms
    }
    if config.check_off_row and "auto" in config.algorithms:
        calls[AUTO_CHECK_OFF] = commlab_call(op, "auto", b, ranks, replace(config, arg_check=False))
    native = ranks.native(op, config.redop, config.root) if config.native else None
    if native is not None:
        with contextlib.suppress(TypeError, ValueError, KeyError):  # no numpy (MPI) type for bfloat16
            calls["native"] = native(b)
    wrong = {}
    warm = torch.zeros(len(calls), dtype=torch.float64)
    for index, (name, call) in enumerate(calls.items()):
        restore(b)
        call()
        wrong[name] = wrong_elements(b, dtype, config.redop) if config.check else 0
        start = time.perf_counter()
        for _ in range(config.warmup):
            restore(b)
            call()
        warm[index] = (time.perf_counter() - start) / max(config.warmup, 1)
    warm = ranks.max_all(warm)
    iters = config.iters
    if config.sample_seconds > 0 and float(warm.max()) > 0:
        iters = max(1, min(iters, int(config.sample_seconds / float(warm.max()))))
    names = list(calls)
    samples = torch.zeros(config.repeats, len(names), dtype=torch.float64)
    for rep in range(config.repeats):
        for shift in range(len(names)):
            index = (rep + shift) % len(names)
            call = calls[names[index]]
            restore(b)
            ranks.barrier()
            start = time.perf_counter()
            for _ in range(iters):
                call()
            samples[rep, index] = (time.perf_counter() - start) / iters
    samples = ranks.max_all(samples)
    counts = torch.tensor([float(wrong[n]) for n in names], dtype=torch.float64)
    counts = _sum_all(ranks, counts)
    factor = info.bus_factor(world)
    median = {n: statistics.median(samples[:, i].tolist()) for i, n in enumerate(names)}
    native_time = median.get("native")
    rows = []
    for i, name in enumerate(names):
        if name == "native":
            continue
        seconds = median[name]
        # what the call ran: auto's pick, and the pipeline segments and pieces of every row (what a
        # simulation of the row must run; docs/testbed-validation.md predicts with them)
        comm = ranks.comm
        model = comm.cost_model_for(getattr(torch, config.dtype))
        asked = "auto" if name in ("auto", AUTO_CHECK_OFF) else name
        choice = resolve(op, asked, world, nbytes, model, comm.piece_bytes, comm.hosts)
        resolved = choice.algorithm
        row = {
            "op": op,
            "size": nbytes,
            "count": count,
            "type": config.dtype,
            "redop": config.redop if info.reduces else "none",
            "root": config.root if info.rooted else -1,
            "algorithm": name,
            "resolved": resolved,
            "segments": choice.segments,
            "pieces": choice.pieces,
            "iters": iters,
            "time_us": seconds * 1e6,
            "algbw": nbytes / seconds / 1e9,
            "busbw": nbytes / seconds / 1e9 * factor,
            "wrong": int(counts[i]),
            "samples_us": [s * 1e6 for s in samples[:, i].tolist()],
        }
        if native_time is not None:
            row["native_time_us"] = native_time * 1e6
            row["native_busbw"] = nbytes / native_time / 1e9 * factor
            row["native_samples_us"] = [s * 1e6 for s in samples[:, names.index("native")].tolist()]
            row["ratio"] = native_time / seconds
        rows.append(row)
    return rows


def _sum_all(ranks: Ranks, values: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over ranks, through the max (every rank adds its value at its own slot)."""
    table = torch.zeros(ranks.world, values.numel(), dtype=torch.float64)
    table[ranks.rank] = values
    return ranks.max_all(table).sum(dim=0)


def run_worker(config: BenchConfig) -> None:
    """Join the ranks, sweep the sizes, report on rank 0."""
    ranks = start(config)
    if op_info(config.op).rooted and not 0 <= config.root < ranks.world:
        raise invalid("--root", config.root, f"a rank in 0..{ranks.world - 1}")
    reporter = Reporter(config, ranks.world, ranks.describe, enabled=ranks.rank == 0)
    reporter.header()
    rows = []
    sizes = config.sizes()
    for index, size in enumerate(sizes):
        reporter.progress(index, len(sizes), size)
        for row in run_size(size, ranks, config):
            rows.append(row)
            reporter.row(row)
    reporter.progress(len(sizes), len(sizes), None)
    reporter.footer(rows)
    reporter.save(rows)
    ranks.barrier()
    ranks.close()


def main() -> int:
    return worker_main(lambda: run_worker(BenchConfig.from_env()))


if __name__ == "__main__":
    sys.exit(main())
