"""Every collective x algorithm x dtype against torch.distributed's own gloo collective, on 1 to 8 ranks.

Data are small integers (in every dtype), so sums, products and extremes are exact whatever the reduction
order, and results must equal the reference bit for bit; one test on random normals uses a tolerance.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

import commlab
from commlab.collectives.algorithms import algorithms_for, get_algorithm
from commlab.collectives.schedule import OPS
from commlab.collectives.transport import TorchTransport, Transport
from commlab.errors import CollectiveMismatchError, CollectiveTimeoutError, CommlabError, InvalidArgumentError
from tests.distributed import RankError

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.int8,
]
NATIVE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "avg": dist.ReduceOp.SUM,  # gloo has no AVG: the reference divides the sum
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "prod": dist.ReduceOp.PRODUCT,
}
_native_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_native_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def reduce_ops_for(dtype: torch.dtype, full: bool) -> list[str]:
    ops = ["sum", "max", "min", "prod"] if full else ["sum", "max"]
    return [*ops, "avg"] if dtype.is_floating_point and (full or dtype != torch.float64) else ops


def make_data(shape: tuple[int, ...], dtype: torch.dtype, op: str, seed: int) -> torch.Tensor:
    """Small integers for which every reduction is exact in every dtype."""
    gen = torch.Generator().manual_seed(seed)
    unsigned = dtype == torch.uint8
    if op == "prod":
        choices = torch.tensor([1, 2] if unsigned else [-1, 1, 2])
        return choices[torch.randint(len(choices), shape, generator=gen)].to(dtype)
    low, high = (0, 9) if unsigned else (-4, 5)
    if op in ("max", "min"):
        low, high = (0, 200) if unsigned else (-100, 101)
    return torch.randint(low, high, shape, generator=gen).to(dtype)


def _reference(kind: str, x: torch.Tensor, op: str, root: int, world: int) -> torch.Tensor:
    if kind == "allreduce":
        ref = x.clone()
        dist.all_reduce(ref, op=NATIVE_OPS[op])
    elif kind == "reduce":
        ref = x.clone()
        dist.reduce(ref, root, op=NATIVE_OPS[op])
    elif kind == "reduce_scatter":
        ref = torch.empty(x.numel() // world, dtype=x.dtype)
        _native_reduce_scatter(ref, x.reshape(-1), op=NATIVE_OPS[op])
    elif kind == "allgather":
        ref = torch.empty(x.numel() * world, dtype=x.dtype)
        _native_all_gather(ref, x.reshape(-1))
    else:
        ref = x.clone()
        dist.broadcast(ref, root)
    if op == "avg":
        ref = ref / world if ref.dtype.is_floating_point else ref
    return ref.to(x.dtype)


def _run_commlab(
    kind: str, x: torch.Tensor, op: str, root: int, algorithm: str, world: int, group=None
) -> torch.Tensor:
    if kind == "allreduce":
        out = x.clone()
        commlab.all_reduce(out, op=op, algorithm=algorithm, group=group)
    elif kind == "reduce":
        out = x.clone()
        commlab.reduce(out, root, op=op, algorithm=algorithm, group=group)
        assert dist.get_rank() == root or torch.equal(out, x), "reduce changed a non-root rank's tensor"
    elif kind == "reduce_scatter":
        out = torch.full((x.numel() // world,), 77, dtype=x.dtype)
        before = x.clone()
        commlab.reduce_scatter(out, x, op=op, algorithm=algorithm, group=group)
        assert torch.equal(x, before), "reduce_scatter modified its input"
    elif kind == "allgather":
        out = torch.full((x.numel() * world,), 77, dtype=x.dtype)
        commlab.all_gather(out, x, algorithm=algorithm, group=group)
    else:
        out = x.clone() if dist.get_rank() == root else torch.full_like(x, 77)
        commlab.broadcast(out, root, algorithm=algorithm, group=group)
    return out


def check_against_torch(
    sizes: list[int],
    dtypes: list[torch.dtype],
    full_ops: bool,
    seed: int,
    hosts: str | None = None,
    transport: Callable[[], Transport] | None = None,
) -> list[str]:
    """On every rank: run every op x algorithm x dtype x size, compare with the native collective.
    `hosts` (a host map spec such as '2x2') runs commlab on a communicator that sees those hosts;
    `transport` (a module-level factory) runs it on that transport instead of the group's own."""
    rank, world = dist.get_rank(), dist.get_world_size()
    group = None
    if hosts is not None or transport is not None:
        group = commlab.Communicator(transport() if transport else TorchTransport(), hosts=hosts)
    names = {  # across hosts: the algorithms that read the host map (the others ignore it)
        kind: [a for a in algorithms_for(kind) if hosts is None or get_algorithm(a).topology_aware]
        for kind in OPS
    }
    failures = []
    kinds = ["allreduce", "reduce_scatter", "allgather", "broadcast", "reduce"]
    for kind in kinds:
        for dtype in dtypes:
            ops = (
                reduce_ops_for(dtype, full_ops)
                if kind in ("allreduce", "reduce_scatter", "reduce")
                else ["-"]
            )
            for op in ops:
                for size in sizes:
                    for algorithm in ["auto", *names[kind]]:
                        root = (size + 1) % world
                        numel = size * world if kind == "reduce_scatter" else size
                        x = make_data((numel,), dtype, op, seed + 1000 * rank + size)
                        ref = _reference(kind, x, op, root, world)
                        got = _run_commlab(kind, x, op, root, algorithm, world, group).reshape(-1)
                        if kind == "reduce" and rank != root:
                            continue
                        if not torch.equal(got, ref.reshape(-1)):
                            bad = int((got != ref.reshape(-1)).sum())
                            failures.append(
                                f"{kind} {algorithm} {dtype} op={op} n={size} root={root}: {bad} wrong"
                            )
    if group is not None:
        group.close()
        close = getattr(group.transport, "close", None)
        if close is not None:
            close()
    return failures


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_collective_matches_torch(rank_pools, world_size):
    pool = rank_pools(world_size)
    results = pool.run(check_against_torch, [0, 1, 5, 67, 1000], DTYPES, True, seed=world_size)
    failures = [f for per_rank in results for f in per_rank]
    assert not failures, "\n".join(failures[:40])


@pytest.mark.parametrize("hosts", ["2x2", "3,1", "1,3"])
def test_every_collective_matches_torch_across_emulated_hosts(rank_pools, hosts):
    """The topology-aware algorithms (and auto, which weighs them across hosts) on 4 ranks seen as hosts
    of equal and of different sizes, every dtype, against gloo's own collectives."""
    results = rank_pools(4).run(check_against_torch, [1, 7, 1003], DTYPES, False, 11, hosts)
    failures = [f for per_rank in results for f in per_rank]
    assert not failures, "\n".join(failures[:40])


def pipelined_hierarchical(spec: str, segments: int, seed: int) -> bool:
    """On every rank: hierarchical allreduce on host map `spec` in `segments` pipeline segments, run by
    the executor over gloo, equals gloo's own allreduce (float64 sums of small integers: exact)."""
    from commlab.collectives.algorithms import build_schedule
    from commlab.collectives.executor import REDUCERS, compile_program, execute
    from commlab.collectives.hosts import HostMap

    rank, world = dist.get_rank(), dist.get_world_size()
    schedule = build_schedule("allreduce", "hierarchical", world, None, segments, HostMap.parse(spec))
    numel = 1001  # not a multiple of the chunks: uneven chunks
    plan = compile_program(schedule, rank, numel, 1)
    x = torch.randint(-50, 50, (numel,), generator=torch.Generator().manual_seed(seed + rank)).double()
    ref = x.clone()
    dist.all_reduce(ref)
    scratch = torch.zeros(max(plan.scratch_numel, 1), dtype=x.dtype)
    execute(plan, x, TorchTransport(), REDUCERS["sum"], time.monotonic() + 60, 0, "hierarchical", scratch)
    return torch.equal(x, ref)


@pytest.mark.parametrize(("hosts", "segments"), [("2x2", 3), ("3,1", 2)])
def test_pipelined_hierarchical_allreduce_matches_torch(rank_pools, hosts, segments):
    assert all(rank_pools(4).run(pipelined_hierarchical, hosts, segments, 5))


def test_eight_ranks_match_torch(rank_pools):
    pool = rank_pools(8)
    results = pool.run(check_against_torch, [3, 1003], [torch.float32, torch.int64], False, seed=8)
    failures = [f for per_rank in results for f in per_rank]
    assert not failures, "\n".join(failures[:40])


def float_allreduce_close(seed: int) -> float:
    """Random normals (float32): every allreduce algorithm within float tolerance of gloo's."""
    x = torch.randn(100_003, generator=torch.Generator().manual_seed(seed + dist.get_rank()))
    ref = x.clone()
    dist.all_reduce(ref)
    worst = 0.0
    for algorithm in algorithms_for("allreduce"):
        out = x.clone()
        commlab.all_reduce(out, algorithm=algorithm)
        # 3 float32 terms of |x| < 5 summed in another order: at most 2 (n-1) u sum|t| = 4 x 6e-8 x 15 ~ 4e-6
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        worst = max(worst, float((out - ref).abs().max()))
    return worst


@pytest.mark.numerics
def test_random_floats_within_tolerance(rank_pools):
    worst = rank_pools(3).run(float_allreduce_close, 5)
    assert max(worst) < 1e-4


def shapes_and_layouts() -> None:
    """Any shape, non-contiguous tensors, zero elements, ReduceOp objects, in-place all_gather."""
    rank, world = dist.get_rank(), dist.get_world_size()
    base = torch.arange(6 * 10, dtype=torch.float32).reshape(6, 10) * (rank + 1)
    strided = base[:, ::3]  # non-contiguous view
    assert not strided.is_contiguous()
    expected = strided * sum(range(1, world + 1)) / (rank + 1)
    commlab.all_reduce(strided, op=dist.ReduceOp.SUM)
    torch.testing.assert_close(strided, expected)
    assert torch.equal(base[:, 1], torch.arange(1, 60, 10, dtype=torch.float32) * (rank + 1)), (
        "touched other columns"
    )

    empty = torch.empty(0, 3)
    commlab.all_reduce(empty)
    commlab.broadcast(empty, 0)
    assert empty.shape == (0, 3)

    cube = torch.full((2, 3, 5), float(rank))
    commlab.all_reduce(cube, op="max")
    assert torch.equal(cube, torch.full((2, 3, 5), float(world - 1)))

    out = torch.zeros(world, 4, 2)  # all_gather into a shaped output; output's block r aliases the input
    own = out[rank]
    own.fill_(rank)
    commlab.all_gather(out, own)
    assert torch.equal(out, torch.arange(world, dtype=torch.float32).view(world, 1, 1).expand(world, 4, 2))

    gathered_t = torch.zeros(4, world).t()  # non-contiguous output
    commlab.all_gather(gathered_t, torch.full((4,), float(rank)))
    assert torch.equal(gathered_t, torch.arange(world, dtype=torch.float32).view(world, 1).expand(world, 4))


def test_shapes_and_layouts(rank_pools):
    rank_pools(3).run(shapes_and_layouts)


def async_handles() -> list[bool]:
    """Several async collectives in flight, then a sync one: all complete, in order, with right values."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tensors = [torch.full((50_000,), float(rank + i)) for i in range(4)]
    works = [
        commlab.all_reduce(t, algorithm=a, async_op=True)
        for t, a in zip(tensors, ["ring", "tree", "halving_doubling", "direct"], strict=True)
    ]
    last = torch.full((10,), float(rank))
    commlab.all_reduce(last)  # sync call queued behind the async ones
    assert all(w.is_completed() for w in works), "a sync call returned before earlier async work finished"
    for i, (work, tensor) in enumerate(zip(works, tensors, strict=True)):
        assert work.wait(timeout=30) is True
        assert torch.equal(tensor, torch.full((50_000,), float(sum(r + i for r in range(world)))))
    gathered = torch.empty(world * 3)
    work = commlab.all_gather(gathered, torch.full((3,), float(rank)), async_op=True)
    work.wait()
    assert torch.equal(gathered, torch.arange(world).repeat_interleave(3).float())
    assert torch.equal(last, torch.full((10,), float(sum(range(world)))))
    return [w.is_completed() for w in works]


def test_async_handles(rank_pools):
    for completed in rank_pools(3).run(async_handles):
        assert all(completed)


def release_and_reuse() -> tuple[bool, bool, bool, float]:
    """release() waits for queued async calls, stops the worker thread and forgets the communicator."""
    import threading

    rank = dist.get_rank()
    first = commlab.communicator(None)
    tensor = torch.full((20_000,), float(rank))
    work = commlab.all_reduce(tensor, async_op=True)
    commlab.release()
    finished = work.is_completed()
    workers = [t for t in threading.enumerate() if t.name.startswith("commlab-comm")]
    second = commlab.communicator(None)
    commlab.all_reduce(tensor, async_op=True).wait(timeout=30)  # a new worker serves the new communicator
    commlab.release(dist.group.WORLD)
    return finished, not workers, second is not first, tensor[0].item()


def test_release_closes_the_cached_communicators(rank_pools):
    for finished, stopped, fresh, value in rank_pools(2).run(release_and_reuse):
        assert finished and stopped and fresh
        assert value == 2.0  # (0 + 1) summed twice over 2 ranks


def replayed_calls() -> tuple[list[bool], int]:
    """Repeated blocking calls on the same tensors take the replay path (`Communicator.replay`); every
    repeat must see its inputs anew: all_gather's and reduce_scatter's inputs are copied in again."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = commlab.communicator(None)
    taken: list[bool] = []
    replay = comm.replay
    comm.replay = lambda *args: taken.append(replay(*args)) or taken[-1]
    ok = []
    tensor, block, gathered = torch.zeros(1000), torch.zeros(7), torch.zeros(world * 7)
    rs_in, rs_out, root_data = torch.zeros(world * 5), torch.zeros(5), torch.zeros(9)
    base = float(sum(range(world)))
    try:
        for i in range(3):
            tensor.fill_(rank + i)
            commlab.all_reduce(tensor, algorithm="ring")
            ok.append(torch.equal(tensor, torch.full((1000,), base + world * i)))
            block.fill_(rank * 10 + i)
            commlab.all_gather(gathered, block)
            want = torch.tensor([r * 10.0 + i for r in range(world)]).repeat_interleave(7)
            ok.append(torch.equal(gathered, want))
            rs_in.copy_(torch.arange(world * 5.0) + rank + i)
            commlab.reduce_scatter(rs_out, rs_in)
            want = torch.arange(world * 5.0) * world + base + world * i
            ok.append(torch.equal(rs_out, want[rank * 5 : (rank + 1) * 5]))
            root_data.fill_(rank + 100 * i)
            commlab.broadcast(root_data, src=1)
            ok.append(torch.equal(root_data, torch.full((9,), 1.0 + 100 * i)))
        view = tensor.view(10, 100)  # another tensor over the same memory replays the same call
        view.fill_(1.0)
        commlab.all_reduce(view, algorithm="ring")
        ok.append(torch.equal(tensor, torch.full((1000,), float(world))))
        comm.release_scratch()  # releases every binding: the next call binds anew, then replays
        for _ in range(2):
            tensor.fill_(2.0)
            commlab.all_reduce(tensor, algorithm="ring")
            ok.append(torch.equal(tensor, torch.full((1000,), 2.0 * world)))
    finally:
        del comm.replay
    return ok, sum(taken)


def test_repeated_calls_replay_and_see_new_inputs(rank_pools):
    for ok, replays in rank_pools(3).run(replayed_calls):
        assert all(ok), ok
        assert replays >= 9  # each collective's 2nd and 3rd call, the view, the call after the rebind


def mismatch_after_replay() -> str:
    """Rank 0 repeats a kept call (the replay path) while rank 1 changes the algorithm: both must raise."""
    tensor = torch.ones(10)
    for _ in range(2):
        commlab.all_reduce(tensor, algorithm="ring")
    try:
        commlab.all_reduce(tensor, algorithm="tree" if dist.get_rank() == 1 else "ring")
    except CollectiveMismatchError as error:
        return str(error)
    return "no error"


def test_mismatch_is_caught_on_the_replay_path(rank_pools):
    for message in rank_pools(2).run(mismatch_after_replay):
        assert "algorithm" in message and "rank 0: ring" in message and "rank 1: tree" in message, message


def mismatched_call(field: str) -> str:
    """Rank 1 calls with one argument different; every rank must raise CollectiveMismatchError."""
    rank = dist.get_rank()
    odd = rank == 1
    try:
        if field == "elements":
            commlab.all_reduce(torch.ones(10 + odd))
        elif field == "dtype":
            commlab.all_reduce(torch.ones(10, dtype=torch.float64 if odd else torch.float32))
        elif field == "reduce op":
            commlab.all_reduce(torch.ones(10), op="max" if odd else "sum")
        elif field == "algorithm":
            commlab.all_reduce(torch.ones(10), algorithm="tree" if odd else "ring")
        elif field == "root":
            commlab.broadcast(torch.ones(10), src=1 if odd else 0)
        elif field == "collective":
            if odd:
                commlab.broadcast(torch.ones(10), src=0, algorithm="direct")
            else:
                commlab.reduce(torch.ones(10), dst=0, algorithm="direct")
    except CollectiveMismatchError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize("field", ["elements", "dtype", "reduce op", "algorithm", "root", "collective"])
def test_mismatched_arguments_raise_on_every_rank(rank_pools, field):
    messages = rank_pools(2).run(mismatched_call, field)
    for message in messages:
        assert field in message, message
        assert "rank 0" in message and "rank 1" in message, message


def absent_peer() -> tuple[str, float]:
    """Rank 1 never joins; rank 0 must fail within its timeout, naming the collective and the timeout."""
    if dist.get_rank() == 1:
        time.sleep(4)
        return ("", 0.0)
    start = time.monotonic()
    try:
        commlab.all_reduce(torch.ones(1000), algorithm="ring", timeout=1.5)
    except CollectiveTimeoutError as error:
        return (str(error), time.monotonic() - start)
    return ("no error", 0.0)


@pytest.mark.timing
def test_absent_peer_times_out(rank_pools):
    (message, elapsed), _ = rank_pools(2).run(absent_peer, breaks_group=True)
    assert "all_reduce" in message and "timeout 1.5 s" in message, message
    assert elapsed < 5.0


def unchecked_size_mismatch() -> str:
    """With the argument check off, a size mismatch must still end (an error or a dead rank), not hang."""
    try:
        commlab.all_reduce(torch.ones(1000 + 500 * dist.get_rank()), algorithm="ring", check=False, timeout=3)
    except CommlabError as error:
        return type(error).__name__
    return "no error"


@pytest.mark.timing
def test_unchecked_mismatch_ends_instead_of_hanging(rank_pools):
    """gloo aborts a process whose receive is shorter than the message: the pool must report it fast."""
    start = time.monotonic()
    try:
        names = rank_pools(2).run(unchecked_size_mismatch, breaks_group=True)
    except RankError as error:
        assert "died" in str(error) or "failed" in str(error), error
    else:
        assert names != ["no error", "no error"], names
    assert time.monotonic() - start < 30


def bad_arguments() -> list[tuple[str, str]]:
    """Each bad call and the message it raised (InvalidArgumentError naming the argument)."""
    t = torch.ones(8)
    cases = {
        "algorithm": lambda: commlab.all_reduce(t, algorithm="butterfly"),
        "op": lambda: commlab.all_reduce(t, op="mean"),
        "dtype": lambda: commlab.all_reduce(torch.ones(4, dtype=torch.int32), op="avg"),
        "tensor": lambda: commlab.all_reduce([1.0, 2.0]),
        "tensor.dtype": lambda: commlab.all_reduce(torch.ones(4, dtype=torch.complex64)),
        "output": lambda: commlab.all_gather(torch.ones(7), torch.ones(3)),
        "input": lambda: commlab.reduce_scatter(torch.ones(3), torch.ones(5)),
        "bruck": lambda: commlab.all_reduce(t, algorithm="bruck"),
        "src": lambda: commlab.broadcast(t, src=5),
        "timeout": lambda: commlab.all_reduce(t, timeout=-1),
        "group": lambda: commlab.all_reduce(t, group="world"),
    }
    out = []
    for name, call in cases.items():
        try:
            call()
        except InvalidArgumentError as error:
            out.append((name, str(error)))
        else:
            out.append((name, "no error"))
    return out


def test_bad_arguments_name_the_value_and_what_is_accepted(rank_pools):
    (cases,) = rank_pools(1).run(bad_arguments)
    messages = dict(cases)
    for name, message in messages.items():
        assert message != "no error", name
        assert "accepted" in message or "must match" in message, (name, message)
    assert "'butterfly'" in messages["algorithm"] and "'ring'" in messages["algorithm"]
    assert "'mean'" in messages["op"] and "avg" in messages["op"]
    assert "float32" in messages["dtype"]
    assert "complex64" in messages["tensor.dtype"] and "bfloat16" in messages["tensor.dtype"]
    assert "7 elements" in messages["output"]
    assert "does not implement allreduce" in messages["bruck"]


def test_uninitialized_torch_distributed_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(CommlabError, match="init_process_group"):
        commlab.all_reduce(torch.ones(3))


def test_default_group_replaced_gets_a_new_communicator():
    """`communicator(None)` keeps torch's default group's Communicator for a fast lookup; after
    destroy_process_group and a new init_process_group the default group is a new object, and the next
    call must run on it (a stale Communicator would talk over the destroyed group). In a fresh process:
    it owns the default group."""
    import subprocess
    import sys

    code = (
        "import torch, torch.distributed as dist, commlab; from commlab.collectives import api; "
        "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1); "
        "first = api.communicator(None); assert api.communicator(None) is first; "
        "x = torch.ones(3); commlab.all_reduce(x); "
        "dist.destroy_process_group(); "
        "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1); "
        "second = api.communicator(None); "
        "assert second is not first and second.transport.group is dist.group.WORLD; "
        "commlab.all_reduce(x); print(x.tolist()); commlab.release(); dist.destroy_process_group()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == ["[1.0,", "1.0,", "1.0]"]
