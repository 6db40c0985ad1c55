"""What every rank of `commlab calibrate` runs: message timings through commlab's own executor.

Three kinds of measurement, each a tiny schedule run by `executor.execute` on the live transport, so the
numbers include exactly what a collective pays per step (posting, waiting, Python):
- `pingpong`: ranks 0 and 1 send a message back and forth, the others idle: one pair's latency and speed;
- `ring p` (p = 2..N): ranks 0..p-1 each send a message to the next and receive one from the previous, as
  in every step of a ring algorithm, all at once; the time per step at every size is what a collective on
  p ranks of this host pays per message while its peers are busy too (on a host with fewer cores than
  ranks, that includes their sharing of the cores);
- `launch p`: the same with one step per call, against the per-step time of the K-step calls: what a call
  costs beyond its steps;
- `fan p`: ranks 0..p-1 each send FAN_MESSAGES(p) messages (one to every other rank, or two to the
  one peer when p = 2) and receive as many in one step, against `ring p`'s one: at small sizes, which part
  of a message's latency a step pays once (the level's `step`, so `auto` sees that direct's p-1 messages
  in one step cost less than ring's p-1 steps); at two large sizes, how much faster concurrent messages
  move their bytes than one after another (the level's `concurrency`);
- `reduce p`: ranks 0..p-1 add a tensor into another at once, per dtype (the executor's reduction; timed
  on its own, since next to a message's latency on a shared host it drowns in noise);
- `clone p`, `copy p`: ranks 0..p-1 clone (fresh allocation) or copy a tensor at once: the local copies
  the API makes around a schedule (reduce_scatter copies its input into staging, allgather its block in);
- `algorithms` (`measure_algorithms`, after the fits): every algorithm of every op called through the API
  on a sub-group of ranks 0..p-1 at a few total sizes, the times `auto` decides by on the measured world
  sizes.
Idle ranks wait in a barrier that does not spin. Every size runs its variants in `repeats` interleaved
rounds (the first variant rotates), so a noisy moment hits all of them; the slowest active rank's mean
time per call is a sample, the median sample is kept.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch

import commlab
from commlab.calibrate.config import CalibrateConfig
from commlab.collectives.algorithms import algorithms_for, build_schedule
from commlab.collectives.calibration import Calibration
from commlab.collectives.communicator import Communicator
from commlab.collectives.cost import CostModel
from commlab.collectives.executor import REDUCERS, Program, compile_program, execute
from commlab.collectives.hosts import HostMap, host_map_from_env
from commlab.collectives.schedule import Recv, Schedule, Send, Step, subdivide
from commlab.collectives.transport import TorchTransport
from commlab.collectives.tuning import resolve
from commlab.shared.ops import OPS, ROOTED_OPS

_TAG_WINDOW = 1 << 20
_MAX_ITERS = 2000


@dataclass
class Group:
    """The running ranks: their transport, a barrier that does not spin, and an elementwise max."""

    rank: int
    world: int
    transport: object
    barrier: Callable[[], None]
    max_all: Callable[[torch.Tensor], torch.Tensor]
    detail: str
    tag_calls: int
    close: Callable[[], None]
    subgroup: Callable[[int], object | None]  # ranks 0..p-1 as a transport (None on the others); collective
    hosts: HostMap | None = None  # which ranks share a host (launcher's environment), None if not known


def join(config: CalibrateConfig) -> Group:
    """Join the ranks of the configured backend (environment from torchrun, mpiexec or the launcher)."""
    torch.set_num_threads(1)
    if config.backend == "mpi":
        from mpi4py import MPI

        from commlab.collectives.mpi import MPITransport

        world = MPI.COMM_WORLD
        transport = MPITransport(world, timeout=config.timeout)

        def barrier() -> None:
            _wait_napping(world.Ibarrier())

        def max_all(values: torch.Tensor) -> torch.Tensor:
            out = values.clone()
            _wait_napping(world.Iallreduce(MPI.IN_PLACE, out.numpy(), op=MPI.MAX))
            return out

        calls = max(1, min(1024, (transport.max_tag + 1) // _TAG_WINDOW))
        detail = MPI.Get_library_version().splitlines()[0].strip()

        def mpi_subgroup(p: int) -> MPITransport | None:
            sub = world.Split(0 if world.Get_rank() < p else MPI.UNDEFINED, world.Get_rank())
            return None if sub == MPI.COMM_NULL else MPITransport(sub, timeout=config.timeout)

        return Group(
            world.Get_rank(), world.Get_size(), transport, barrier, max_all, detail, calls, lambda: None,
            mpi_subgroup, host_map_from_env(range(world.Get_size())),
        )  # fmt: skip
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=timedelta(seconds=config.timeout))

    def gloo_max(values: torch.Tensor) -> torch.Tensor:
        out = values.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    close = dist.destroy_process_group if created else (lambda: None)
    detail = f"torch {torch.__version__} gloo"
    transport = TorchTransport()

    def gloo_subgroup(p: int) -> TorchTransport | None:
        sub = dist.new_group(list(range(p)))
        return TorchTransport(sub) if dist.get_rank() < p else None

    return Group(
        dist.get_rank(), dist.get_world_size(), transport, dist.barrier, gloo_max, detail, 1024, close,
        gloo_subgroup, host_map_from_env(range(dist.get_world_size())),
    )  # fmt: skip


def _wait_napping(request) -> None:
    """Wait for an MPI request with naps growing from 20 us to 1 ms: a rank idle while others are timed
    wakes rarely, so it takes little of the CPU they share (with fixed 50 us naps, idle ranks on a 2-core
    host slowed the timed ones by up to 40%), at the price of up to 1 ms more per barrier."""
    nap = 20e-6
    while not request.Test():
        time.sleep(nap)
        nap = min(2 * nap, 1e-3)


def shift_schedule(world: int, active: int, steps: int, reduce: bool = False) -> Schedule:
    """Ranks 0..active-1 in a ring: at step s each sends chunk s%2 to the next and receives chunk (s+1)%2
    from the previous, reducing it in if `reduce` (step s+1 sends what step s received: none runs ahead)."""
    return permutation_schedule(world, {r: (r + 1) % active for r in range(active)}, steps, reduce)


def permutation_schedule(world: int, successor: dict[int, int], steps: int, reduce: bool = False) -> Schedule:
    """`shift_schedule` over any cycle of ranks: each rank r of `successor` sends to successor[r] and
    receives from the rank whose successor it is (a permutation of its keys); the other ranks idle."""
    previous = {dst: src for src, dst in successor.items()}
    if sorted(previous) != sorted(successor):
        raise ValueError(f"successor={successor} is not a permutation of its ranks")
    rank_steps = []
    for r in range(world):
        if r not in successor:
            rank_steps.append(())
            continue
        nxt, prev = successor[r], previous[r]
        rank_steps.append(
            tuple(Step((Send(nxt, (s % 2,)),), (Recv(prev, ((s + 1) % 2,), reduce),)) for s in range(steps))
        )
    return Schedule("broadcast", "calibrate-shift", world, 2, tuple(rank_steps), 0)


def host_schedules(hosts: HostMap | None, steps: int) -> dict[str, Schedule]:
    """Where the ranks span hosts (of any sizes): `intra p` (p = 2..L, L the most ranks on one host), a
    ring of the first p ranks of the first host with L ranks; `rails`, the ranks of every local index
    that every host has (0..m-1, m the fewest ranks on one host) each sending to the rank of its local
    index on the next host and receiving from the previous host's, all at once. On hosts of equal size
    that is every rank; on uneven hosts it is what the cross-host phases of the topology-aware algorithms
    load the smallest host's link with (its m ranks carry the most rails and cross at once, see
    docs/calibration.md). Nothing on one host."""
    if hosts is None or hosts.num_hosts < 2:
        return {}
    largest = list(next(host for host in hosts.hosts if len(host) == hosts.max_local))
    found = {
        f"intra {p}": permutation_schedule(
            hosts.world_size, {largest[i]: largest[(i + 1) % p] for i in range(p)}, steps
        )
        for p in range(2, len(largest) + 1)
    }
    count, shared = hosts.num_hosts, min(len(host) for host in hosts.hosts)
    rails = {
        host[j]: hosts.hosts[(h + 1) % count][j] for h, host in enumerate(hosts.hosts) for j in range(shared)
    }
    found["rails"] = permutation_schedule(hosts.world_size, rails, steps)
    return found


def fan_messages(active: int) -> int:
    """Messages each rank sends (and receives) per step of `fan_schedule`: p-1, at least 2."""
    return max(2, active - 1)


def fan_large_sizes(sizes: list[int]) -> list[int]:
    """The two sizes at which the fan measures concurrency: the largest at most a quarter of the largest
    message (big enough that latency is small next to the bytes, small enough to stay quick)."""
    return [s for s in sizes if 4 * s <= sizes[-1]][-2:] if len(sizes) > 4 else []


def fan_schedule(world: int, active: int, steps: int) -> Schedule:
    """Ranks 0..active-1 each send chunk 0 in `fan_messages(active)` messages per step, to every other rank
    (twice to the one peer when active = 2), and receive as many into chunks 1, 2, ... (as a direct step)."""
    count = fan_messages(active)
    rank_steps = []
    for r in range(world):
        if r >= active:
            rank_steps.append(())
            continue
        offsets = [1 + j % (active - 1) for j in range(count)]
        sends = tuple(Send((r + d) % active, (0,)) for d in offsets)
        recvs = tuple(Recv((r - d) % active, (1 + j,), False) for j, d in enumerate(offsets))
        rank_steps.append(tuple(Step(sends, recvs) for _ in range(steps)))
    return Schedule("broadcast", "calibrate-fan", world, 1 + count, tuple(rank_steps), 0)


def pingpong_schedule(world: int, steps: int) -> Schedule:
    """Ranks 0 and 1 pass one chunk back and forth `steps` times (one message per step)."""
    rank_steps: list[tuple[Step, ...]] = [() for _ in range(world)]
    for r in (0, 1):
        other = 1 - r
        rank_steps[r] = tuple(
            Step((Send(other, (0,)),), ()) if s % 2 == r else Step((), (Recv(other, (0,), False),))
            for s in range(steps)
        )
    return Schedule("broadcast", "calibrate-pingpong", world, 1, tuple(rank_steps), 0)


@dataclass
class Variant:
    """One timed thing at one size: its name, steps per call, and this rank's call (None when idle)."""

    name: str
    steps: int
    call: Callable[[], None] | None


class Runner:
    """Times variants on this rank: calls per sample agreed by all ranks, samples interleaved."""

    def __init__(self, group: Group, config: CalibrateConfig) -> None:
        self.group, self.config = group, config
        self.windows = 0  # tag windows handed out, alike on every rank (idle ranks count too)

    def executor_call(
        self, schedule: Schedule, nbytes: int, dtype: torch.dtype = torch.uint8
    ) -> Callable[[], None] | None:
        """A call running `schedule` over a buffer of `nbytes` per chunk on this rank (None if idle)."""
        group = self.group
        tag_base = (self.windows % group.tag_calls) * _TAG_WINDOW  # one window per variant: repeated calls
        self.windows += 1  # reuse it, matched in order (messages between a pair do not overtake)
        if not schedule.steps[group.rank]:
            return None
        itemsize = torch.empty(0, dtype=dtype).element_size()
        numel = max(1, nbytes // itemsize) * schedule.num_chunks
        plan: Program = compile_program(schedule, group.rank, numel, 1)
        buffer = torch.zeros(numel, dtype=dtype)
        scratch = torch.zeros(max(plan.scratch_numel, 1), dtype=dtype)
        reducer = REDUCERS["sum"]

        def call() -> None:
            deadline = time.monotonic() + self.config.timeout
            execute(plan, buffer, group.transport, reducer, deadline, tag_base, schedule.algorithm, scratch)

        return call

    def time_variants(self, variants: list[Variant]) -> list[float]:
        """The median over `repeats` samples of each variant's seconds per step (slowest active rank)."""
        group, config = self.group, self.config
        warm = torch.zeros(len(variants), dtype=torch.float64)
        for i, v in enumerate(variants):
            group.barrier()
            if v.call is not None:
                v.call()  # first call: connections, page faults
                start = time.perf_counter()
                v.call()
                warm[i] = time.perf_counter() - start
        warm = group.max_all(warm)
        iters = [max(1, min(_MAX_ITERS, int(config.sample_seconds / max(float(w), 1e-7)))) for w in warm]
        samples = torch.zeros(config.repeats, len(variants), dtype=torch.float64)
        for rep in range(config.repeats):
            for shift in range(len(variants)):
                i = (rep + shift) % len(variants)
                v = variants[i]
                group.barrier()
                if v.call is None:
                    continue
                start = time.perf_counter()
                for _ in range(iters[i]):
                    v.call()
                samples[rep, i] = (time.perf_counter() - start) / (iters[i] * v.steps)
        samples = group.max_all(samples)
        return [statistics.median(samples[:, i].tolist()) for i in range(len(variants))]

    def time_reduction(self, active: int, dtype: torch.dtype, nbytes: int) -> Variant:
        """Ranks 0..active-1 add a scratch tensor of `nbytes` of `dtype` into another at once, as the
        executor applies a reducing receive."""
        if self.group.rank >= active:
            return Variant(f"reduce {active}", 1, None)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        dst = torch.zeros(max(1, nbytes // itemsize), dtype=dtype)
        src = torch.zeros_like(dst)
        add = REDUCERS["sum"]
        return Variant(f"reduce {active}", 1, lambda: add(dst, src))

    def local_copy(self, active: int, kind: str, nbytes: int) -> Variant:
        """Ranks 0..active-1 clone (kind 'clone') or copy into a kept tensor ('copy') `nbytes` at once."""
        if self.group.rank >= active:
            return Variant(f"{kind} {active}", 1, None)
        src = torch.ones(max(1, nbytes // 4))
        dst = torch.empty_like(src)
        if kind == "clone":
            return Variant(f"{kind} {active}", 1, lambda: src.clone())
        return Variant(f"{kind} {active}", 1, lambda: dst.copy_(src))


class Progress:
    """Progress on stderr (rank 0): a bar on a terminal, else a line every few seconds."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.monotonic()

    def update(self, done: int, what: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        elapsed = now - self.start
        if self.tty:
            filled = 30 * done // max(self.total, 1)
            line = f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} {what:<28} {elapsed:.0f}s "
            sys.stderr.write(line)
            if done == self.total:
                sys.stderr.write("\n")
        elif now - self.last > 5 or done == self.total:
            sys.stderr.write(f"calibrate: {done}/{self.total} {what} ({elapsed:.0f}s)\n")
            self.last = now
        sys.stderr.flush()


def measure(group: Group, config: CalibrateConfig) -> dict:
    """Every measurement of the calibration; the same dict on every rank (medians in seconds)."""
    runner = Runner(group, config)
    world, steps = group.world, config.steps
    levels = list(range(2, world + 1))
    sizes = config.sizes()
    reduce_sizes = config.reduce_sizes()
    launch_sizes = sizes[:2]
    # small messages: the fan's per-step share of alpha (a median over four sizes); large: its concurrency
    fan_sizes = sorted(set(sizes[:4]) | set(fan_large_sizes(sizes)))
    total = len(sizes) * config.passes + len(levels) * (len(config.dtypes) + 1)
    progress = Progress(group.rank == 0 and config.progress, total)
    done = 0
    pingpong = pingpong_schedule(world, steps) if world >= 2 else None
    rings = {p: shift_schedule(world, p, steps) for p in levels}
    singles = {p: shift_schedule(world, p, 1) for p in levels}
    fans = {p: fan_schedule(world, p, steps) for p in levels}
    across = host_schedules(group.hosts, steps)  # ranks on several hosts: the intra-host and rails levels
    passes: dict[int, dict[str, list[float]]] = {size: {} for size in sizes}
    for number in range(config.passes):  # each pass sweeps every size: slow drift hits all sizes alike
        for size in sizes:
            progress.update(done, f"messages of {size} B, pass {number + 1}/{config.passes}")
            variants = []
            if pingpong is not None:
                variants.append(Variant("pingpong", steps, runner.executor_call(pingpong, size)))
            for p in levels:
                variants.append(Variant(f"ring {p}", steps, runner.executor_call(rings[p], size)))
            for p in levels:
                if size in launch_sizes:
                    variants.append(Variant(f"launch {p}", 1, runner.executor_call(singles[p], size)))
                if size in fan_sizes:
                    variants.append(Variant(f"fan {p}", steps, runner.executor_call(fans[p], size)))
            for name, schedule in across.items():
                variants.append(Variant(name, steps, runner.executor_call(schedule, size)))
            for variant, seconds in zip(variants, runner.time_variants(variants), strict=True):
                passes[size].setdefault(variant.name, []).append(seconds)
            done += 1
    result: dict = {
        "pingpong": {},
        "ring": {str(p): {} for p in levels},
        "launch": {str(p): {} for p in levels},
        "fan": {str(p): {} for p in levels},
    }
    if across:
        assert group.hosts is not None
        result["hosts"] = group.hosts.spec()
        result["rails"] = {}
        result["intra"] = {name.split()[1]: {} for name in across if name != "rails"}
    for size, by_name in passes.items():
        for name, values in by_name.items():
            kind, _, p = name.partition(" ")
            table = result[kind] if not p else result[kind][p]
            table[str(size)] = statistics.median(values)
    result["reduce"] = {str(p): {} for p in levels}
    result["clone"] = {str(p): {} for p in levels}
    result["copy"] = {str(p): {} for p in levels}
    for p in levels:
        for name in config.dtypes:
            progress.update(done, f"reductions, {p} ranks, {name}")
            dtype = getattr(torch, name)
            variants = [runner.time_reduction(p, dtype, n) for n in reduce_sizes]
            medians = runner.time_variants(variants)
            result["reduce"][str(p)][name] = {str(n): t for n, t in zip(reduce_sizes, medians, strict=True)}
            done += 1
        progress.update(done, f"local copies, {p} ranks")
        variants = [runner.local_copy(p, kind, n) for kind in ("clone", "copy") for n in reduce_sizes]
        medians = runner.time_variants(variants)
        for v, n, t in zip(variants, reduce_sizes * 2, medians, strict=True):
            result[v.name.split()[0]][str(p)][str(n)] = t
        done += 1
    progress.update(done, "done")
    return result


def api_call(op: str, algorithm: str, comm: Communicator, size: int) -> Callable[[], None]:
    """A blocking commlab call of `op` with `algorithm` on a float32 buffer of `size` bytes in total (the
    full buffer for reduce-scatter and allgather, as `auto` counts it), root 0 for the rooted ops."""
    count = max(comm.size, size // 4 // comm.size * comm.size)
    full, block = torch.zeros(count), torch.zeros(count // comm.size)
    if op == "allreduce":
        return lambda: commlab.all_reduce(full, algorithm=algorithm, group=comm)
    if op == "reduce_scatter":
        return lambda: commlab.reduce_scatter(block, full, algorithm=algorithm, group=comm)
    if op == "allgather":
        return lambda: commlab.all_gather(full, block, algorithm=algorithm, group=comm)
    if op == "broadcast":
        return lambda: commlab.broadcast(full, 0, algorithm=algorithm, group=comm)
    if op == "alltoall":
        received = torch.zeros(count)
        return lambda: commlab.all_to_all(received, full, algorithm=algorithm, group=comm)
    return lambda: commlab.reduce(full, 0, algorithm=algorithm, group=comm)


def algorithm_variants(
    comm: Communicator | None,
    model: CostModel,
    piece_bytes: int,
    p: int,
    size: int,
    hosts: HostMap | None = None,
) -> list[tuple[str, str, Variant]]:
    """(op, algorithm, variant) for every algorithm of every op through commlab's API on `comm` (ranks
    0..p-1; None on the others, whose variants are idle) at total `size` bytes, with the segments and
    pieces a call resolves to under `model` and `piece_bytes` (the same on every rank, so every rank lists
    the same variants); algorithms whose programs coincide (ring, direct and halving-doubling allreduce on
    2 ranks...) share one variant, timed once. With `hosts` spanning several hosts the topology-aware
    algorithms are timed too, on that host map."""
    hosts = hosts if hosts is not None and hosts.num_hosts > 1 else None  # one host: the flat algorithms
    programs: dict[tuple, Variant] = {}
    result = []
    for op in OPS:
        root = 0 if op in ROOTED_OPS else None
        for name in algorithms_for(op, topology_aware=hosts is not None):
            choice = resolve(op, name, p, size, model, piece_bytes, hosts)
            schedule = subdivide(build_schedule(op, name, p, root, choice.segments, hosts), choice.pieces)
            key = (schedule.num_chunks, schedule.steps)
            if key not in programs:
                call = None if comm is None else api_call(op, name, comm, size)
                programs[key] = Variant(f"{op} {name} {p}", 1, call)
            result.append((op, name, programs[key]))
    return result


def measure_algorithms(group: Group, config: CalibrateConfig, calibration: Calibration) -> dict:
    """Every algorithm of every op timed through commlab's API on p = 2..N ranks (sub-groups) at the
    config's algorithm sizes (float32 sums; `calibration` picks pipeline segments as a call would):
    {p: {op: {algorithm: {size: seconds per call}}}}, medians over passes, the same on every rank.

    Where the ranks span hosts only p = N is timed, on the launcher's host map and with the topology-aware
    algorithms among the rest: the first ranks of a host map are not a layout anyone runs, and what a call
    costs across hosts depends on the whole map (`Calibration.cost_model` uses these times for that map
    only)."""
    runner = Runner(group, config)
    sizes = config.algorithm_sizes()
    hosts = group.hosts if group.hosts is not None and group.hosts.num_hosts > 1 else None
    levels = [group.world] if hosts is not None else list(range(2, group.world + 1))
    comms: dict[int, Communicator | None] = {}
    for p in levels:  # collective: every rank takes part in forming every sub-group
        transport = group.subgroup(p)
        comms[p] = None if transport is None else Communicator(transport, check=False, profile=calibration)
    # what every call resolves to must be known on every rank: the members' slicing, shared
    mine = [float(comms[p].piece_bytes) if comms[p] is not None else 0.0 for p in levels]
    shared = group.max_all(torch.tensor(mine, dtype=torch.float64)).tolist()
    piece_bytes = {p: int(b) for p, b in zip(levels, shared, strict=True)}
    models = {p: calibration.cost_model(p, hosts=hosts) for p in levels}
    progress = Progress(group.rank == 0 and config.progress, len(sizes) * config.passes)
    samples: dict[tuple[int, str, str, int], list[float]] = {}
    try:
        for number in range(config.passes):
            for i, size in enumerate(sizes):
                progress.update(number * len(sizes) + i, f"algorithms at {size} B, pass {number + 1}")
                rows = [
                    (p, *row)
                    for p in levels
                    for row in algorithm_variants(comms[p], models[p], piece_bytes[p], p, size, hosts)
                ]
                unique = list({id(v): v for *_, v in rows}.values())
                seconds = dict(zip((id(v) for v in unique), runner.time_variants(unique), strict=True))
                for p, op, name, variant in rows:
                    samples.setdefault((p, op, name, size), []).append(seconds[id(variant)])
    finally:
        for comm in comms.values():
            if comm is not None:
                comm.close()
    progress.update(len(sizes) * config.passes, "algorithms done")
    timed: dict = {}
    for (p, op, name, size), values in samples.items():
        per_size = timed.setdefault(str(p), {}).setdefault(op, {}).setdefault(name, {})
        per_size[str(size)] = statistics.median(values)
    return timed
