"""The executor on an in-memory transport: lookahead posting, sliced schedules and scratch reuse.

Every rank runs in a thread of this process and messages go through mailboxes, so these tests check the
executor's own logic (dependencies, scratch layout, pieces) deterministically, without gloo or MPI.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from commlab.collectives import schedule as ir
from commlab.collectives.algorithms import ALGORITHMS, build_schedule
from commlab.collectives.executor import REDUCERS, bind, compile_program, execute, posting_order, run
from commlab.collectives.schedule import ROOTED_OPS, subdivide, verify
from commlab.collectives.transport import Message
from commlab.errors import CollectiveTimeoutError

CASES = [(name, op) for name, algorithm in ALGORITHMS.items() for op in algorithm.ops]


class Mailboxes:
    """Messages between in-process ranks, matched by (source, destination, tag).

    A send leaves a reference to its tensor; the receiver copies from it when it waits, and only then
    does the send complete. So a transport reads the sent tensor at the latest moment it may, and a step
    that overwrote a tensor still being sent (a wrong lookahead dependency) would send wrong values.
    """

    def __init__(self) -> None:
        self.boxes: dict[tuple[int, int, int], torch.Tensor] = {}
        self.taken: set[tuple[int, int, int]] = set()
        self.reducing: dict[tuple[int, int, int], tuple] = {}  # reducing receives waiting for their send
        self.reduced: set[tuple[int, int, int]] = set()  # reducing receives done, not yet waited for
        self.ready = threading.Condition()

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        if not self.ready.wait_for(predicate, timeout=max(timeout, 0)):
            raise CollectiveTimeoutError(f"{what} did not complete")


class Receive:
    def __init__(self, mail: Mailboxes, key: tuple[int, int, int], into: torch.Tensor) -> None:
        self.mail, self.key, self.into = mail, key, into

    def wait(self, timeout: float) -> None:
        with self.mail.ready:
            self.mail.wait_for(lambda: self.key in self.mail.boxes, timeout, f"receive {self.key}")
            payload = self.mail.boxes.pop(self.key)
            assert payload.numel() == self.into.numel(), (self.key, payload.numel(), self.into.numel())
            self.into.copy_(payload)
            self.mail.taken.add(self.key)
            self.mail.ready.notify_all()


class Send:
    def __init__(self, mail: Mailboxes, key: tuple[int, int, int]) -> None:
        self.mail, self.key = mail, key

    def wait(self, timeout: float) -> None:
        with self.mail.ready:
            self.mail.wait_for(lambda: self.key in self.mail.taken, timeout, f"send {self.key}")
            self.mail.taken.discard(self.key)


class InMemoryTransport:
    """Ranks in threads of this process, exchanging tensors through Mailboxes."""

    device_type = "cpu"
    default_timeout = 30.0

    def __init__(self, mail: Mailboxes, rank: int, size: int) -> None:
        self.mail, self.rank, self.size = mail, rank, size

    def post(self, sends: list[Message], recvs: list[Message]) -> list:
        with self.mail.ready:
            for m in sends:
                key = (self.rank, m.peer, m.tag)
                assert key not in self.mail.boxes, f"tag {m.tag} reused between {self.rank} and {m.peer}"
                self.mail.boxes[key] = m.tensor
            self.mail.ready.notify_all()
        assert not any(m.reduce for m in recvs), "a reducing receive on a transport that does not reduce"
        requests = [Receive(self.mail, (m.peer, self.rank, m.tag), m.tensor) for m in recvs]
        return requests + [Send(self.mail, (self.rank, m.peer, m.tag)) for m in sends]


class Reduced:
    """A reducing receive of EagerReducingTransport: done once its sender's post has reduced it."""

    def __init__(self, mail: Mailboxes, key: tuple[int, int, int]) -> None:
        self.mail, self.key = mail, key

    def wait(self, timeout: float) -> None:
        with self.mail.ready:
            self.mail.wait_for(lambda: self.key in self.mail.reduced, timeout, f"receive {self.key}")
            self.mail.reduced.discard(self.key)


class EagerReducingTransport(InMemoryTransport):
    """Reduces on receipt (`Message.reduce`) at the earliest moment it may: as soon as both the send and
    the reducing receive are posted, whichever comes second does the reduction into the receiver's buffer.
    So a fused receive that the executor posted too early (before an earlier step finished writing or
    sending its chunks) changes values a correct program would not have let it touch yet. Plain
    receives still copy at the latest moment, as in InMemoryTransport."""

    reduces_on_receipt = True

    def post(self, sends: list[Message], recvs: list[Message]) -> list:
        mail = self.mail
        requests: list = []
        with mail.ready:
            for m in recvs:
                key = (m.peer, self.rank, m.tag)
                if m.reduce is None:
                    requests.append(Receive(mail, key, m.tensor))
                    continue
                requests.append(Reduced(mail, key))
                if key in mail.boxes:
                    self._reduce(key, m.tensor, m.reduce, mail.boxes.pop(key))
                else:
                    mail.reducing[key] = (m.tensor, m.reduce)
            for m in sends:
                key = (self.rank, m.peer, m.tag)
                assert key not in mail.boxes, f"tag {m.tag} reused between {self.rank} and {m.peer}"
                if key in mail.reducing:
                    self._reduce(key, *mail.reducing.pop(key), m.tensor)
                else:
                    mail.boxes[key] = m.tensor
                requests.append(Send(mail, key))
            mail.ready.notify_all()
        return requests

    def _reduce(self, key, into: torch.Tensor, reduce, payload: torch.Tensor) -> None:
        assert payload.numel() == into.numel(), (key, payload.numel(), into.numel())
        reduce(into, payload.clone())
        self.mail.taken.add(key)  # the send is complete
        self.mail.reduced.add(key)  # and so is the receive


def run_everywhere(
    schedule, inputs: list[torch.Tensor], window: int, fuse: bool = False
) -> list[torch.Tensor]:
    """Execute `schedule` on every rank (one thread each); the buffers afterwards. `fuse`: programs with
    reducing receives fused, on EagerReducingTransport."""
    mail = Mailboxes()
    buffers = [x.clone() for x in inputs]
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            plan = compile_program(schedule, rank, buffers[rank].numel(), window, fuse)
            kind = EagerReducingTransport if fuse else InMemoryTransport
            transport = kind(mail, rank, schedule.world_size)
            execute(plan, buffers[rank], transport, REDUCERS["sum"], time.monotonic() + 30)
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(schedule.world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert not mail.boxes, f"undelivered messages: {sorted(mail.boxes)}"
    return buffers


def expected(op: str, inputs: list[torch.Tensor], root: int | None) -> list[torch.Tensor | None]:
    """What each rank's buffer must hold afterwards (None: anything)."""
    p = len(inputs)
    total = torch.stack(inputs).sum(0)
    block = inputs[0].numel() // p
    if op == "allreduce":
        return [total] * p
    if op == "reduce":
        return [total if r == root else None for r in range(p)]
    if op == "broadcast":
        return [inputs[root]] * p
    if op == "allgather":
        gathered = torch.cat([inputs[r][r * block : (r + 1) * block] for r in range(p)])
        return [gathered] * p
    return [total[r * block : (r + 1) * block] for r in range(p)]  # reduce_scatter: block r only


def check(
    name: str, op: str, p: int, numel: int, pieces: int, window: int, segments: int = 1, fuse: bool = False
) -> None:
    root = (p - 1) // 2 if op in ROOTED_OPS else None
    schedule = subdivide(build_schedule(op, name, p, root, segments), pieces)
    if op in ("reduce_scatter", "allgather"):
        numel = numel * p
    if op == "alltoall":  # p x p blocks: block (s, d) is what s sends to d
        numel = numel * p * p
    inputs = [torch.randint(-50, 50, (numel,)).to(torch.float64) for _ in range(p)]
    got = run_everywhere(schedule, inputs, window, fuse)
    if op == "alltoall":
        b = numel // (p * p)
        for rank in range(p):
            for src in range(p):
                at = slice((src * p + rank) * b, (src * p + rank + 1) * b)
                assert torch.equal(got[rank][at], inputs[src][at]), f"{name} alltoall p={p} {rank}<-{src}"
        return
    block = numel // p
    for rank, (have, want) in enumerate(zip(got, expected(op, inputs, root), strict=True)):
        if want is None:
            continue
        if op == "reduce_scatter":
            have = have[rank * block : (rank + 1) * block]
        assert torch.equal(have, want), (
            f"{name} {op} p={p} n={numel} pieces={pieces} window={window} rank {rank}"
        )


@pytest.mark.parametrize(("name", "op"), CASES, ids=[f"{a}-{o}" for a, o in CASES])
def test_every_algorithm_with_lookahead_and_pieces(name: str, op: str) -> None:
    for p in (2, 3, 4, 5):
        for pieces, window in ((1, 1), (1, 3), (3, 2), (4, 5)):
            check(name, op, p, 37, pieces, window, segments=2)


@pytest.mark.parametrize(("name", "op"), CASES, ids=[f"{a}-{o}" for a, o in CASES])
def test_every_algorithm_with_reductions_fused_on_receipt(name: str, op: str) -> None:
    """Reducing receives land reduced in the buffer, at the earliest moment a transport may reduce them
    (EagerReducingTransport): the values are exact (integers in float64), so a fused receive posted
    before its chunks were free, or two reductions into a chunk taken out of order, would show."""
    for p in (2, 3, 4, 5):
        for pieces, window in ((1, 1), (1, 3), (3, 2)):
            check(name, op, p, 37, pieces, window, segments=2, fuse=True)


def test_fusion_only_where_no_other_transfer_of_the_step_touches_the_chunks() -> None:
    """Ring allreduce fuses its reduce-scatter receives; recursive doubling sends the very chunks it
    reduces into in the same step, so it must keep them in scratch (the send carries the unreduced
    values); without fuse_reduce nothing is fused."""

    def fused(name: str, fuse: bool) -> list[bool]:
        plan = compile_program(build_schedule("allreduce", name, 4), 0, 4000, 3, fuse)
        return [r.reduce and r.scratch_offset < 0 for step in plan.steps for r in step.recvs]

    assert fused("ring", True) == [True] * 3 + [False] * 3
    assert fused("recursive_doubling", True) == [False, False]
    assert not any(fused("ring", False))


def test_a_fused_receive_waits_until_its_chunks_are_sent() -> None:
    """Rank 0 sends chunk 0 to rank 1 in step 0 and reduces rank 2's chunk 0 into it in step 1: the
    fused receive of step 1 must not be posted (and so reduced, on a transport that reduces at once)
    before step 0's send is complete, or rank 1 would receive x0 + x2 instead of x0. Rank 1 starts last
    (after rank 0 had every chance to post step 1 early), and reads what it receives at its wait."""
    schedule = ir.Schedule(
        "allreduce",
        "custom",
        3,
        1,
        (
            (ir.Step(sends=(ir.Send(1, (0,)),)), ir.Step(recvs=(ir.Recv(2, (0,), True),))),
            (ir.Step(recvs=(ir.Recv(0, (0,), True),)),),
            (ir.Step(sends=(ir.Send(0, (0,)),)),),
        ),
    )
    plan = compile_program(schedule, 0, 8, 3, True)
    assert plan.steps[1].after == 0 and plan.steps[1].recvs[0].scratch_offset < 0
    mail = Mailboxes()
    inputs = [torch.full((8,), float(10**r)) for r in range(3)]
    buffers = [x.clone() for x in inputs]
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            plan = compile_program(schedule, rank, 8, 3, True)
            transport = EagerReducingTransport(mail, rank, 3)
            execute(plan, buffers[rank], transport, REDUCERS["sum"], time.monotonic() + 30)
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = {r: threading.Thread(target=rank_main, args=(r,)) for r in range(3)}
    threads[2].start()
    threads[0].start()
    with mail.ready:  # a wrong plan reduces rank 2's chunk at once; a right one never before rank 1 runs
        mail.ready.wait_for(lambda: (2, 0, 0) in mail.reduced, timeout=0.5)
    threads[1].start()
    for thread in threads.values():
        thread.join(30)
    assert not errors, errors
    assert torch.equal(buffers[1], inputs[1] + inputs[0])
    assert torch.equal(buffers[0], inputs[0] + inputs[2])


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(
    case=st.sampled_from(CASES),
    p=st.integers(2, 7),
    numel=st.integers(0, 90),
    pieces=st.integers(1, 4),
    window=st.integers(1, 6),
    segments=st.integers(1, 3),
)
def test_random_shapes(case, p: int, numel: int, pieces: int, window: int, segments: int) -> None:
    check(*case, p, numel, pieces, window, segments)


@pytest.mark.parametrize(("name", "op"), CASES, ids=[f"{a}-{o}" for a, o in CASES])
def test_sliced_schedules_verify(name: str, op: str) -> None:
    for p in range(1, 10):
        root = p // 2 if op in ROOTED_OPS else None
        for pieces in (2, 3):
            verify(subdivide(build_schedule(op, name, p, root, 2), pieces))


def test_plans_post_after_their_dependencies_and_keep_scratch_disjoint() -> None:
    for name, op in CASES:
        for p in (3, 4, 8):
            root = 0 if op in ROOTED_OPS else None
            schedule = subdivide(build_schedule(op, name, p, root, 2), 3)
            for rank in range(p):
                numel = 1000 * p * (p if op == "alltoall" else 1)  # whole blocks (p x p for all-to-all)
                plan = compile_program(schedule, rank, numel, 3)
                posted_at = posting_order(plan.steps, plan.window)
                for index, step in enumerate(plan.steps):
                    assert step.after < index and posted_at[index] <= index
                    assert index - posted_at[index] < plan.window
                    mine = _regions(step)
                    for other in range(posted_at[index], index):  # steps in flight with this one
                        for a, b in mine:
                            for c, d in _regions(plan.steps[other]):
                                assert b <= c or d <= a, (name, op, p, rank, index, other)
                    assert all(b <= plan.scratch_numel for _, b in mine)


def _regions(step) -> list[tuple[int, int]]:
    return [
        (t.scratch_offset, t.scratch_offset + t.numel)
        for t in (*step.sends, *step.recvs)
        if t.scratch_offset >= 0
    ]


def test_lookahead_posts_independent_slices_early() -> None:
    """Sliced ring allreduce: slice g of a step waits only for slice g of the step before."""
    schedule = subdivide(build_schedule("allreduce", "ring", 4), 3)
    plan = compile_program(schedule, 0, 12_000, 4)
    assert [s.after for s in plan.steps[:6]] == [-1, -1, -1, 0, 1, 2]
    assert posting_order(plan.steps, 4)[:6] == [0, 0, 0, 1, 2, 3]


def test_subdivide_rejects_bad_pieces() -> None:
    from commlab.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=r"pieces=0.*an integer >= 1"):
        subdivide(build_schedule("allreduce", "ring", 4), 0)
    assert subdivide(build_schedule("allreduce", "ring", 4), 1) is build_schedule("allreduce", "ring", 4)


@pytest.mark.parametrize(
    ("name", "op", "pieces"),
    [("ring", "allreduce", 2), ("halving_doubling", "reduce_scatter", 1), ("tree", "broadcast", 3)],
)
def test_a_bound_program_reruns_on_new_data(name, op, pieces):
    """One BoundProgram per rank (views, gathers, reductions made once) runs three calls in a row on the
    same buffer, new values written in place before each; every call gives that call's result."""
    p, numel = 4, 4 * 37
    root = 1 if op in ROOTED_OPS else None
    schedule = subdivide(build_schedule(op, name, p, root), pieces)
    mail = Mailboxes()
    buffers = [torch.zeros(numel) for _ in range(p)]
    calls = [[torch.randn(numel, generator=torch.Generator().manual_seed(10 * c + r)) for r in range(p)]
             for c in range(3)]  # fmt: skip
    results: list[list[torch.Tensor]] = [[None] * p for _ in range(3)]  # type: ignore[list-item]
    errors: list[BaseException] = []
    barrier = threading.Barrier(p)

    def rank_main(rank: int) -> None:
        try:
            plan = compile_program(schedule, rank, numel, 3)
            bound = bind(plan, buffers[rank])
            transport = InMemoryTransport(mail, rank, p)
            for c, inputs in enumerate(calls):
                buffers[rank].copy_(inputs[rank])
                barrier.wait(30)
                run(bound, transport, REDUCERS["sum"], time.monotonic() + 30, tag_base=c << 20)
                results[c][rank] = buffers[rank].clone()
                barrier.wait(30)
        except BaseException as error:  # surfaced below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(p)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    for c, inputs in enumerate(calls):
        for rank, want in enumerate(expected(op, inputs, root)):
            if want is None:
                continue
            got = results[c][rank]
            if op == "reduce_scatter":
                block = numel // p
                got = got[rank * block : (rank + 1) * block]
            # float32 sums of 4 values in schedule order: within a few ulps of torch's order
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
