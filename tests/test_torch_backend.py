"""Backend "commlab" under unmodified torch clients, each compared with the same program on gloo.

Every program in tests/torch_clients.py runs twice on the same ranks: once with
`init_process_group("gloo")`, once with `init_process_group("commlab")`. Where every reduction is over
two ranks (2-rank groups, the dp=2 x tp=2 mesh) commlab and gloo add the same two numbers, so results
must be bitwise equal. On four ranks the summation order differs (commlab's schedule vs gloo's ring),
so float32 results may differ by rounding: each gradient element is a sum of 4 terms of magnitude < 1
(seeded inputs, a small network), off by at most 3 ulp of 1 (3 x 1.2e-7) between two orders; SGD with lr
0.1 over 3 steps moves a parameter by 0.1 x that per step, and the loss surface feeds it back mildly, so
1e-6 bounds the difference with a wide margin while still failing any real error (a wrong sum is off
by > 1e-2 in these programs). The `calls` each program returns show that the ops ran on commlab's
schedules (not on the inner gloo).

The backend's data moves through shared memory by default (every rank here is on one host); the last
tests check that it does, that $COMMLAB_SHM=0 puts it back on gloo, that each group's segment goes with
the group (and survives a forked child), and that a peer dying in a collective is a TransportError.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from datetime import timedelta

import pytest
import torch

import commlab
from commlab.collectives import shm_segment as seg
from commlab.collectives.shm import shm_enabled
from commlab.torch_backend import config
from tests import torch_clients as clients
from tests.distributed import RankPool

needs_shm = pytest.mark.skipif(not os.path.isdir(seg.SHM_DIR), reason="needs /dev/shm")


@pytest.fixture(scope="module")
def pools():
    """Ranks without a group (2 and 4 of them), reused by every test here; each task makes its own."""
    made: dict[int, RankPool] = {}

    def get(world_size: int) -> RankPool:
        if world_size not in made:
            made[world_size] = RankPool(world_size, backend=None)
        return made[world_size]

    yield get
    for pool in made.values():
        pool.close()


def both(pool: RankPool, tmp_path, program, *args, backends=("gloo", "commlab")) -> dict[str, list]:
    """Run `program` on every rank of `pool` on each backend in turn; results by backend, in rank order."""
    results = {}
    for backend in backends:
        store = os.path.join(tmp_path, f"store-{backend}-{program.__name__}")
        results[backend] = pool.run(clients.on_backend, backend, store, program, *args)
    return results


def assert_same(gloo: list[torch.Tensor], mine: list[torch.Tensor], atol: float = 0.0) -> None:
    assert len(gloo) == len(mine)
    for want, got in zip(gloo, mine, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        if atol == 0.0:
            assert torch.equal(got, want), (got - want).abs().max()
        else:
            torch.testing.assert_close(got, want, rtol=0.0, atol=atol)


@pytest.mark.parametrize(("hook", "no_sync"), [(False, False), (True, True)])
def test_ddp_matches_gloo_bitwise_on_two_ranks(pools, tmp_path, hook, no_sync):
    results = both(pools(2), tmp_path, clients.ddp, hook, no_sync)
    for gloo, mine in zip(results["gloo"], results["commlab"], strict=True):
        assert_same(gloo["params"], mine["params"])
        assert mine["calls"]["allreduce"] >= clients.STEPS and mine["calls"]["broadcast"] >= 1
        assert gloo["calls"] == {}


def test_ddp_on_four_ranks_within_rounding(pools, tmp_path):
    results = both(pools(4), tmp_path, clients.ddp, False, False)
    for gloo, mine in zip(results["gloo"], results["commlab"], strict=True):
        assert_same(gloo["params"], mine["params"], atol=1e-6)
    first = results["commlab"][0]["params"]
    for other in results["commlab"][1:]:  # DDP keeps replicas identical: every rank got the same sums
        assert_same(first, other["params"])


@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_fsdp2_matches_gloo_bitwise(pools, tmp_path, reshard_after_forward):
    results = both(pools(2), tmp_path, clients.fsdp2, reshard_after_forward)
    for gloo, mine in zip(results["gloo"], results["commlab"], strict=True):
        assert_same(gloo["params"], mine["params"])
        assert mine["calls"]["all_gather_into_tensor"] >= 1 and mine["calls"]["reduce_scatter_tensor"] >= 1


def test_fsdp2_with_tensor_parallel_on_a_2d_mesh(pools, tmp_path):
    results = both(pools(4), tmp_path, clients.fsdp_tp, 2, 2)
    for gloo, mine in zip(results["gloo"], results["commlab"], strict=True):
        assert_same(gloo["params"], mine["params"])  # every reduction is over 2 ranks
        assert mine["calls"]["reduce_scatter_tensor"] >= 1 and mine["calls"]["allreduce"] >= 1


def test_dtensor_redistribute(pools, tmp_path):
    results = both(pools(2), tmp_path, clients.redistribute)
    for gloo, mine in zip(results["gloo"], results["commlab"], strict=True):
        assert_same(gloo["tensors"], mine["tensors"])
        assert sum(mine["calls"].values()) >= 3  # gather, all-reduce and reduce-scatter ran on commlab


def test_distributed_checkpoint_save_and_load(pools, tmp_path):
    results = {}
    for backend in ("gloo", "commlab"):
        directory = os.path.join(tmp_path, f"checkpoint-{backend}")
        store = os.path.join(tmp_path, f"store-checkpoint-{backend}")
        results[backend] = pools(2).run(clients.on_backend, backend, store, clients.checkpoint, directory)
    for gloo, mine in zip(results["gloo"], results["commlab"], strict=True):
        assert_same(mine["saved"], mine["loaded"])
        assert_same(gloo["saved"], mine["saved"])


def test_subgroup_of_two_on_four_ranks(pools, tmp_path):
    pool = pools(4)
    gloo = pool.run(clients.on_backend, "gloo", os.path.join(tmp_path, "sub-gloo"), clients.subgroup, "gloo")
    mine = pool.run(
        clients.on_backend, "commlab", os.path.join(tmp_path, "sub-commlab"), clients.subgroup, "commlab"
    )
    for rank in range(4):
        assert_same(gloo[rank]["tensors"], mine[rank]["tensors"])
        assert mine[rank]["name"] == ("commlab" if rank < 2 else None)


@pytest.mark.parametrize("dtype", ["float32", "int32", "bfloat16"])
def test_every_reduce_op(pools, tmp_path, dtype):
    results = both(pools(2), tmp_path, clients.reduce_ops, dtype)
    for rank, (gloo, mine) in enumerate(zip(results["gloo"], results["commlab"], strict=True)):
        for name in clients.REDUCE_OPS:
            if name == "AVG" and dtype == "int32":
                continue
            if name == "PREMUL_SUM" and dtype == "int32":  # a float factor on integers: refused
                assert mine[name] == "UnsupportedOperationError"
            elif name == "PREMUL_SUM":  # gloo refuses it: commlab's must be 0.5 x gloo's SUM (exact: halves)
                assert isinstance(gloo[name], str)
                want = [t * 0.5 for t in gloo["SUM"][:2]]
                want.append(gloo["SUM"][2] * 0.5 if rank == 0 else gloo["SUM"][2])  # non-roots: the input
                assert_same(want, mine[name])
            else:
                assert_same(gloo[name], mine[name])


def test_uneven_all_to_all_single(pools, tmp_path):
    results = both(pools(4), tmp_path, clients.uneven_all_to_all)
    for gloo, mine in zip(results["gloo"], results["commlab"], strict=True):
        assert_same(gloo["tensors"], mine["tensors"])
        assert mine["calls"] == {"all_to_all_single": 2, "all_to_all": 1}


def test_unsupported_ops_raise_naming_the_op(pools, tmp_path):
    store = os.path.join(tmp_path, "store-unsupported")
    for messages in pools(2).run(clients.on_backend, "commlab", store, clients.unsupported):
        band, boolean, coalesced, after = messages
        assert band.startswith("UnsupportedOperationError") and "allreduce with ReduceOp" in band
        assert boolean.startswith("UnsupportedOperationError") and "allreduce on torch.bool" in boolean
        assert coalesced.startswith("UnsupportedOperationError") and "allgather_coalesced" in coalesced
        assert after == "[2.0, 2.0]"


def algorithm_and_timeout(algorithms: str) -> dict:
    """The algorithm each op ran with under configure(...), and the group's timeout."""
    import torch.distributed as dist

    commlab.configure(algorithm=algorithms)
    try:
        dist.all_reduce(torch.ones(1000))
        dist.all_gather_into_tensor(torch.empty(2000), torch.ones(1000))
        group = dist.group.WORLD
        ran = sorted({(key[0], key[1]) for key in group.communicator._programs if key[0] != "check"})
        return {"ran": ran, "timeout": group.communicator.timeout}
    finally:
        config.reset()


def test_algorithm_per_op_and_timeout(pools, tmp_path):
    store = os.path.join(tmp_path, "store-configure")
    runs = pools(2).run(
        clients.on_backend,
        "commlab",
        store,
        algorithm_and_timeout,
        "allreduce=recursive_doubling,allgather=bruck",
        timeout_s=17.0,
    )
    for result in runs:
        assert result["ran"] == [("allgather", "bruck"), ("allreduce", "recursive_doubling")]
        assert result["timeout"] == 17.0


def test_configure_validates_names():
    with pytest.raises(commlab.InvalidArgumentError, match=r"allreduce='bruck'.*accepted.*'ring'"):
        config.parse_algorithms("allreduce=bruck", "COMMLAB_ALGORITHM")
    with pytest.raises(commlab.InvalidArgumentError, match=r"op='gather'"):
        config.parse_algorithms("gather=ring", "COMMLAB_ALGORITHM")
    with pytest.raises(commlab.InvalidArgumentError, match=r"op=algorithm pairs"):
        config.parse_algorithms("ring", "COMMLAB_ALGORITHM")
    assert config.parse_algorithms(" alltoall=pairwise , allreduce=ring", "x") == {
        "alltoall": "pairwise",
        "allreduce": "ring",
    }


def test_object_collectives(pools, tmp_path):
    results = both(pools(2), tmp_path, clients.objects)
    for gloo, mine in zip(results["gloo"], results["commlab"], strict=True):
        calls = mine.pop("calls")
        gloo.pop("calls")
        assert mine == gloo
        assert calls["allgather"] >= 2 and calls["broadcast"] >= 2
    assert results["commlab"][0]["gathered"][1] == {"rank": 1, "items": [0, 1, 2], "name": "xxxx"}


def silent_peer() -> str:
    """Rank 1 skips an all_reduce: rank 0's call must end in CollectiveTimeoutError (group timeout 2 s).

    Rank 1 stays alive well past the timeout (closing its group would end rank 0's wait with a
    TransportError instead)."""
    import time

    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(8.0)
        return "skipped"
    try:
        dist.all_reduce(torch.ones(4))
    except commlab.CollectiveTimeoutError as error:
        return f"timeout: {error}"
    return "completed"


def test_init_process_group_timeout_is_honoured(pools, tmp_path):
    store = os.path.join(tmp_path, "store-timeout")
    try:
        results = pools(2).run(clients.on_backend, "commlab", store, silent_peer, timeout_s=2.0, timeout=60)
    finally:
        pools(2).close()  # a timed-out gloo pair is unusable: fresh ranks for later tests
    assert results[1] == "skipped"
    assert results[0].startswith("timeout:") and "timeout 2 s" in results[0]


# ----- the transport under the backend: shared memory by default -----


def _mapped_segments() -> set[str]:
    """The commlab shared-memory segments this process maps (unlinked files still show in its maps)."""
    with open("/proc/self/maps") as maps:
        return {line.split()[5] for line in maps if seg.PREFIX in line and len(line.split()) > 5}


def _fork_and_shut_down(groups: list, timeout: float = 30.0) -> int | None:
    """Fork a child that does what a careless data loader worker's teardown could: shut its copies of
    the groups down, then exit. Its exit code (None: still running after `timeout`, then killed)."""
    import time

    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            for group in groups:
                group.shutdown()
        except BaseException:
            code = 1
        os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


def shared_memory_lifecycle(store: str) -> dict:
    """The default group and subgroups {0, 1} and {2, 3} on backend commlab: their transports and segments
    while they live, a forked child that shuts them down, collectives after it (in {2, 3} a broadcast from
    global rank 3 and a reduce to global rank 2: torch hands the group its own ranks, 1 and 0), and the
    segments after destroy."""
    import torch.distributed as dist

    rank, world = int(os.environ["COMMLAB_TEST_RANK"]), int(os.environ["COMMLAB_TEST_WORLD"])
    dist.init_process_group(
        "commlab", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        lower = dist.new_group([0, 1], backend="commlab")
        upper = dist.new_group([2, 3], backend="commlab")
        mine = lower if rank < 2 else upper
        groups = [dist.group.WORLD, mine]
        transports = [type(g.communicator.transport).__name__ for g in groups]
        paths = [g.communicator.transport._path for g in groups]
        live = _mapped_segments()
        child_exit_code = _fork_and_shut_down(groups)
        total = torch.full((1000,), float(rank + 1))
        dist.all_reduce(total)
        pair = torch.full((1000,), float(rank + 1))
        if rank < 2:
            dist.all_reduce(pair, group=lower)
        else:
            dist.broadcast(pair, src=3, group=upper)
            dist.reduce(pair, dst=2, group=upper)
    finally:
        commlab.release()
        dist.destroy_process_group()
    return {
        "transports": transports,
        "paths": paths,
        "mapped while alive": [path in live for path in paths],
        "mapped after destroy": sorted(_mapped_segments() & set(paths)),
        "child exit code": child_exit_code,
        "sums": [total[0].item(), pair[0].item()],
    }


@needs_shm
def test_backend_moves_data_through_shared_memory_and_releases_it(pools, tmp_path):
    results = pools(4).run(shared_memory_lifecycle, os.path.join(tmp_path, "store-shm"))
    for got in results:
        assert got["transports"] == ["SharedMemoryTransport"] * 2
        assert got["mapped while alive"] == [True, True]
        assert got["mapped after destroy"] == []  # destroy_process_group unmapped every segment
        assert got["child exit code"] == 0
    # the forked child's shutdown left the groups working: 1+2+3+4 on the world; 1+2 on {0, 1}; on
    # {2, 3} rank 3's 4 broadcast, then reduced to rank 2 (4 + 4), rank 3 keeping its input
    assert [got["sums"] for got in results] == [[10.0, 3.0], [10.0, 3.0], [10.0, 8.0], [10.0, 4.0]]
    world, lower, upper = {results[0]["paths"][0]}, results[0]["paths"][1], results[2]["paths"][1]
    assert {got["paths"][0] for got in results} == world  # one segment per group, shared by its ranks
    assert results[1]["paths"][1] == lower and results[3]["paths"][1] == upper
    assert len(world | {lower, upper}) == 3


def with_environment(env: dict[str, str], backend: str, store: str, program, *args) -> dict:
    """`clients.on_backend` with `env` set in this rank while the group is made; adds the transport."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        return clients.on_backend(backend, store, _with_transport, program, *args)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _with_transport(program, *args) -> dict:
    import torch.distributed as dist

    result = program(*args)
    comm = getattr(dist.group.WORLD, "communicator", None)
    result["transport"] = None if comm is None else type(comm.transport).__name__
    return result


def test_shm_off_runs_on_gloo_and_matches(pools, tmp_path):
    results = {}
    for backend in ("gloo", "commlab"):
        store = os.path.join(tmp_path, f"store-noshm-{backend}")
        results[backend] = pools(2).run(
            with_environment, {"COMMLAB_SHM": "0"}, backend, store, clients.ddp, False, False
        )
    for gloo, mine in zip(results["gloo"], results["commlab"], strict=True):
        assert mine["transport"] == "BackendTransport"
        assert_same(gloo["params"], mine["params"])


def test_shm_switch_defaults_on_for_the_backend():
    assert shm_enabled({}, default=True) and not shm_enabled({}, default=False)
    assert not shm_enabled({"COMMLAB_SHM": "0"}, default=True)
    with pytest.raises(commlab.InvalidArgumentError, match="COMMLAB_SHM"):
        shm_enabled({"COMMLAB_SHM": "on"}, default=True)


# ----- a rank that dies in a collective: own processes, since a dead rank breaks a pool's group -----


def _rank_of_a_dying_pair(rank: int, store: str, results: mp.Queue) -> None:
    """Rank 1 exits (as a crash) once the group is made; rank 0 is in an all_reduce it never joins."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "commlab", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
        )
        transport = type(dist.group.WORLD.communicator.transport).__name__
        if rank == 1:
            os._exit(3)  # no cleanup, no goodbye
        try:
            # async, as DDP's buckets: the call runs on the communicator's worker thread
            dist.all_reduce(torch.ones(1000), async_op=True).wait()
            results.put(f"no error ({transport})")
        except BaseException as error:
            results.put(f"{type(error).__name__} ({transport}): {error}")
    except BaseException as error:
        results.put(f"setup failed: {error}\n{traceback.format_exc()}")
    results.close()
    results.join_thread()  # the answer is written before the exit below
    os._exit(0)  # the group's other member is gone: skip the teardown


@needs_shm
def test_dead_peer_in_a_backend_collective_raises_transport_error():
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory(prefix="commlab-backend-test-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [context.Process(target=_rank_of_a_dying_pair, args=(r, store, results)) for r in range(2)]
        for proc in procs:
            proc.start()
        try:
            message = results.get(timeout=120)
        except queue.Empty:
            message = "no answer from rank 0 within 120 s"
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    # a TransportError, not a CollectiveTimeoutError: rank 0 noticed before its 60 s deadline
    assert message.startswith("TransportError (SharedMemoryTransport)"), message
    assert "rank 1" in message and "exited" in message, message


@pytest.mark.parametrize(
    "first", ["commlab.collectives.shm", "commlab.torch_backend.process_group", "commlab"]
)
def test_backend_registered_whatever_commlab_module_is_imported_before_torch(first):
    """Registration runs from a hook at the end of `import torch`; a commlab module that imports torch may
    be half-loaded then (`import commlab.collectives.shm` in a fresh interpreter). The hook must import
    nothing of commlab's, or registration fails (it warned "not registered" before; -W error makes any
    such warning fail here)."""
    import subprocess
    import sys

    code = (
        f"import {first}\n"
        "import torch.distributed as dist\n"
        "assert 'COMMLAB' in dist.Backend._plugins, sorted(dist.Backend._plugins)\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
