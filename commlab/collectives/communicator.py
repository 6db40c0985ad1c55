"""A group of ranks commlab runs collectives in: its transport, timeout, argument check and work queue.

Collectives on one communicator run one at a time in the order they are called, as on a NCCL stream: a
synchronous call on an idle communicator runs on the caller's thread; an asynchronous one (and anything
called while one is pending) goes to the communicator's worker thread, and the caller gets a `Work`.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from commlab.collectives.algorithms import ALGORITHMS, build_schedule
from commlab.collectives.calibration import Calibration, active_profile, as_calibration
from commlab.collectives.check_exchange import check_exchange_mode, exchange_direct
from commlab.collectives.cost import DEFAULT_COST_MODEL, CostModel
from commlab.collectives.executor import (
    DEFAULT_WINDOW,
    REDUCERS,
    BoundProgram,
    Program,
    Reducer,
    compile_program,
    execute,
    run,
)
from commlab.collectives.hosts import HostMap
from commlab.collectives.schedule import OPS, subdivide
from commlab.collectives.transport import Transport
from commlab.collectives.tuning import DEFAULT_PIECE_BYTES
from commlab.errors import CollectiveMismatchError, CollectiveTimeoutError, TransportError, invalid

# Tags: each call gets a window of _TAG_WINDOW tags; the argument check uses the first few of it. The
# number of windows is what fits below the transport's largest tag (MPI's TAG_UB may be 2^29 - 1 or less).
_TAG_WINDOW = 1 << 20
_TAG_CALLS = 1024
_CHECK_TAGS = 64
_PLAN_CACHE = 256  # compiled programs kept per communicator
_BOUND_CACHE = 8  # programs bound to a buffer kept per communicator (each keeps its buffer alive)
_BOUND_BYTES = 128 << 20  # ...and the buffers they keep alive hold at most this much (the newest stays)
_REPLAY_CACHE = 64  # blocking calls kept for replay per communicator (each holds a bound program)


@dataclass
class Call:
    """One collective call, resolved: the flat buffer to run on and what to do before and after."""

    op: str  # one of schedule.OPS
    reduce_op: str | None
    buffer: torch.Tensor  # flat and contiguous; the schedule runs on it in place
    algorithm: str
    segments: int
    root: int | None
    label: str  # the public name, e.g. "all_reduce", for messages
    finish: Callable[[], None]
    signature: tuple[int, ...]  # what must agree across ranks (see Communicator.check_signature)
    pieces: int = 1  # slices per chunk (schedule.subdivide), for overlap of transfer and reduction

    def describe(self) -> str:
        """The call for error messages, e.g. 'all_reduce (ring, 1000 x torch.float32)'."""
        return f"{self.label} ({self.algorithm}, {self.buffer.numel()} x {self.buffer.dtype})"


class Work:
    """Handle of an asynchronous collective, shaped like torch.distributed's Work."""

    def __init__(self, future: Future, label: str) -> None:
        self._future = future
        self._label = label

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the collective is done (its own timeout applies); re-raise its error, if any."""
        try:
            self._future.result(timeout)
        except FutureTimeout:
            raise CollectiveTimeoutError(f"{self._label} not complete after waiting {timeout} s") from None
        return True

    def is_completed(self) -> bool:
        return self._future.done()

    def add_done_callback(self, callback: Callable[[BaseException | None], None]) -> None:
        """Call `callback(error)` (None on success) once the collective is done: at once if it is, else on
        the thread that completes it (the communicator's worker)."""
        self._future.add_done_callback(lambda future: callback(future.exception()))

    def exception(self) -> BaseException | None:
        return self._future.exception() if self._future.done() else None


class Communicator:
    """Ranks of one transport, with a default timeout (seconds) and the cross-rank argument check.

    `check=True` (the default) exchanges a few integers describing each call (op, reduction, dtype, size,
    root, algorithm) before running it, so ranks that disagree all get a CollectiveMismatchError instead of
    wrong data or a hang. It costs one small allgather (ceil(lg p) latency-bound rounds) per call; turn it
    off per communicator or per call (`check=False`) once a program is known to be consistent.

    Tuning: `cost_model` ranks the algorithms for `algorithm="auto"`; without one, `profile` (a
    `calibration.Calibration` or the path of a `commlab calibrate` file) gives a model per dtype, else the
    active calibration of the transport's backend ($COMMLAB_PROFILE, else the profile shipped for gloo or
    mpi), else the transport's `cost_model`, else `cost.DEFAULT_COST_MODEL`. Every rank must use the same
    profile (see `calibration`). Messages larger than `piece_bytes` are
    sliced so transfers overlap reductions (default: the transport's `piece_bytes`, else
    `tuning.DEFAULT_PIECE_BYTES`; 0 turns slicing off); `window` is how many steps the executor keeps in
    flight. Scratch space is kept per dtype and reused across calls (`release_scratch()` frees it).

    `hosts`: which ranks share a host (a `HostMap`, or a spec such as '2x4'), for the topology-aware
    algorithms and for `auto` across hosts; default: what the transport learned (the launcher's
    environment, MPI's processor names), else one host.
    """

    def __init__(
        self,
        transport: Transport,
        timeout: float | None = None,
        check: bool = True,
        cost_model: CostModel | None = None,
        piece_bytes: int | None = None,
        window: int = DEFAULT_WINDOW,
        profile: Calibration | str | Path | None = None,
        hosts: HostMap | str | None = None,
    ) -> None:
        if timeout is not None and not timeout > 0:
            raise invalid("timeout", timeout, "a positive number of seconds, or None for the group's own")
        if cost_model is not None and not isinstance(cost_model, CostModel):
            raise invalid("cost_model", type(cost_model).__name__, "a commlab CostModel or None")
        if piece_bytes is not None and (not isinstance(piece_bytes, int) or piece_bytes < 0):
            raise invalid("piece_bytes", piece_bytes, "an integer >= 0 (0: no slicing) or None")
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise invalid("window", window, "an integer >= 1")
        self.transport = transport
        self.rank = transport.rank
        self.size = transport.size
        self.hosts = _host_map(hosts if hosts is not None else getattr(transport, "hosts", None), self.size)
        self.timeout = float(timeout) if timeout is not None else transport.default_timeout
        self.check = check
        # gloo's argument check: 'direct' (one round) or 'native' (gloo's ring allgather), see check_signature
        self.check_exchange = check_exchange_mode(self.hosts)
        self.calibration: Calibration | None = None
        if cost_model is None:
            backend = getattr(transport, "backend", None)
            self.calibration = as_calibration(profile) if profile is not None else active_profile(backend)
        if self.calibration is not None:
            cost_model = self.calibration.cost_model(self.size, hosts=self.hosts)
        self.cost_model = cost_model or getattr(transport, "cost_model", None) or DEFAULT_COST_MODEL
        self._models: dict[torch.dtype, CostModel] = {}
        default_pieces = getattr(transport, "piece_bytes", DEFAULT_PIECE_BYTES)
        self.piece_bytes = default_pieces if piece_bytes is None else piece_bytes
        self.window = window
        max_tag = getattr(transport, "max_tag", (1 << 31) - 1)
        self.tag_calls = max(1, min(_TAG_CALLS, (max_tag + 1) // _TAG_WINDOW))
        self._calls = 0
        self._pending = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue | None = None
        self._programs: OrderedDict[tuple, Program] = OrderedDict()
        self._bound: OrderedDict[tuple, BoundProgram] = OrderedDict()
        self._replays: dict[tuple, _Replay] = {}  # see replay()
        self.choices: dict[tuple, tuple] = {}  # api's resolved (algorithm, segments, pieces, signature)
        self.persistent = callable(getattr(transport, "prepare", None))
        # reducing receives land reduced in the buffer where the transport can (see executor)
        self.fuse_reduce = bool(getattr(transport, "reduces_on_receipt", False))
        self._exchange: Any = None  # the transport's signature exchange, made on first use
        self._scratch: dict[tuple, Any] = {}  # scratch per (dtype, device); argument-check buffers

    def cost_model_for(self, dtype: torch.dtype) -> CostModel:
        """The model `auto` ranks algorithms by for a call on `dtype` (the calibrated gamma of that dtype)."""
        if self.calibration is None:
            return self.cost_model
        model = self._models.get(dtype)
        if model is None:
            model = self.calibration.cost_model(self.size, str(dtype).replace("torch.", ""), self.hosts)
            self._models[dtype] = model
        return model

    def program(self, call: Call) -> Program:
        """The compiled program of a call on this rank, built once per (op, algorithm, root, size, ...)."""
        key = (call.op, call.algorithm, call.root, call.segments, call.pieces, call.buffer.numel())
        plan = self._programs.get(key)
        if plan is None:
            schedule = build_schedule(
                call.op, call.algorithm, self.size, call.root, call.segments, self.hosts
            )
            plan = compile_program(
                subdivide(schedule, call.pieces), self.rank, key[-1], self.window, self.fuse_reduce
            )
            self._programs[key] = plan
            if len(self._programs) > _PLAN_CACHE:
                self._programs.popitem(last=False)
        else:
            self._programs.move_to_end(key)
        return plan

    def bound(self, call: Call, plan: Program) -> BoundProgram:
        """The plan bound to the call's buffer and this communicator's scratch, reused while both stay.

        Binding precomputes every view, gather and reduction of the program (and, on a transport with
        persistent requests, makes them), so repeating a call on the same buffer costs a few Python
        operations per step. A bound program keeps its buffer alive: at most _BOUND_CACHE are kept,
        holding at most _BOUND_BYTES of buffers (a call on a fresh copy each time, an async clone or a
        non-contiguous tensor, binds anew and must not pile up copies).
        """
        buffer = call.buffer
        scratch = self.scratch(buffer, plan.scratch_numel)
        key = (buffer.data_ptr(), buffer.dtype, buffer.device, scratch.data_ptr(), plan.numel, id(plan))
        bound = self._bound.get(key)
        if bound is not None and bound.plan is plan and bound.scratch is scratch:
            self._bound.move_to_end(key)
            return bound
        transport = self.transport if self.persistent else None
        bound = BoundProgram(plan, buffer, scratch, transport, _CHECK_TAGS)
        old = self._bound.pop(key, None)
        self._bound[key] = bound
        held = sum(b.buffer.numel() * b.buffer.element_size() for b in self._bound.values())
        while len(self._bound) > 1 and (len(self._bound) > _BOUND_CACHE or held > _BOUND_BYTES):
            oldest = self._bound.popitem(last=False)[1]
            held -= oldest.buffer.numel() * oldest.buffer.element_size()
            self._forget(oldest)
        if old is not None:
            self._forget(old)
        return bound

    def _forget(self, bound: BoundProgram) -> None:
        """Release a bound program and drop the replays that run it (they would keep its buffer alive)."""
        bound.release()
        for key in [k for k, replay in list(self._replays.items()) if replay.bound is bound]:
            self._replays.pop(key, None)

    def _release_bound(self) -> None:
        for bound in self._bound.values():
            bound.release()
        self._bound.clear()
        self._replays.clear()

    def scratch(self, like: torch.Tensor, numel: int) -> torch.Tensor:
        """A scratch tensor of at least `numel` elements of `like`'s dtype and device, reused across calls.

        Collectives on a communicator run one at a time, so one buffer per dtype and device suffices.
        """
        key = (like.dtype, like.device)
        scratch = self._scratch.get(key)
        if scratch is None or scratch.numel() < numel:
            scratch = like.new_empty(max(numel, 1))
            self._scratch[key] = scratch
        return scratch

    def staging(self, like: torch.Tensor, numel: int) -> torch.Tensor:
        """A reused flat buffer of `numel` elements of `like`'s dtype and device for a blocking call's
        private copy of its input (reduce_scatter, reduce on non-root ranks), apart from `scratch`.

        Why: a fresh clone of tens of MiB gets new pages from the allocator on every call (glibc maps
        blocks above its mmap threshold afresh), so each call page-faults the whole buffer; a kept buffer
        is only copied into. Only blocking calls may use it: an async call's buffer lives on after the call
        returns, while the next call would overwrite the staging buffer. `release_scratch()` frees it.
        """
        key = ("staging", like.dtype, like.device)
        staging = self._scratch.get(key)
        if staging is None or staging.numel() < numel:
            staging = like.new_empty(max(numel, 1))
            self._scratch[key] = staging
        return staging[:numel]

    def release_scratch(self) -> None:
        """Free the cached scratch buffers (they are reallocated on the next call that needs them)."""
        self._release_bound()
        self._scratch.clear()

    def run(
        self,
        call: Call,
        async_op: bool,
        timeout: float | None,
        check: bool | None,
        replay_key: tuple | None = None,
        before: Callable[[], None] | None = None,
    ) -> Work | None:
        """Run (or queue) a call; return a Work when async_op, else None after completion.

        `replay_key`: a blocking call that runs inline is kept under this key for `replay`, with `before`
        (what the caller did to its buffer before the call, e.g. copying an input in; None: nothing).
        """
        timeout = self.timeout if timeout is None else timeout
        if not timeout > 0:
            raise invalid("timeout", timeout, "a positive number of seconds")
        check = self.check if check is None else check
        with self._lock:
            sequence = self._calls
            self._calls += 1
            inline = not async_op and self._pending == 0
            self._pending += 1
        if inline:
            try:
                bound = self._execute(call, sequence, timeout, check)
            finally:
                with self._lock:
                    self._pending -= 1
            if replay_key is not None:
                if len(self._replays) >= _REPLAY_CACHE:
                    self._replays.clear()
                self._replays[replay_key] = _Replay(call, bound, before)
            return None
        future: Future = Future()
        self._worker_queue().put((_Job(self, call, sequence, timeout, check), future))
        work = Work(future, call.label)
        if async_op:
            return work
        work.wait()
        return None

    def replay(self, key: tuple, timeout: float | None, check: bool | None) -> bool:
        """Run again the blocking call kept under `key` (see `run`); False if there is none to run.

        The fast path of a repeated call: the caller's key holds everything the call's arguments decide
        (collective, reduction, algorithm, and each tensor's address, dtype, size and device), so the
        checks, the algorithm choice, the program and its binding (MPI: the persistent requests) are the
        first call's, and a repeat costs a dict lookup, the argument check (if on) and the steps. False
        while an asynchronous call is pending (calls stay in order through the worker) or when the kept
        binding was released (the caller then takes the full path, which keeps the call anew).
        """
        replay = self._replays.get(key)
        if replay is None:
            return False
        if timeout is None:
            timeout = self.timeout
        elif not timeout > 0:
            raise invalid("timeout", timeout, "a positive number of seconds")
        lock = self._lock
        with lock:
            # nothing pending: no worker is binding (and so releasing) programs while we look
            if self._pending or replay.bound.released:
                return False
            sequence = self._calls
            self._calls = sequence + 1
            self._pending = 1
        try:
            if replay.before is not None:
                replay.before()
            check = self.check if check is None else check
            self._execute(replay.call, sequence, timeout, check, replay.bound, replay.reducer)
        finally:
            with lock:
                self._pending -= 1
        return True

    def _execute(
        self,
        call: Call,
        sequence: int,
        timeout: float,
        check: bool,
        bound: BoundProgram | None = None,
        reducer: Reducer | None = None,
    ) -> BoundProgram:
        """Run one call on this thread: the argument check, then the bound program (made unless given:
        a replay's), reducing with `reducer` (None: the call's, looked up); then the call's `finish`.
        Returns the bound program (for `run` to keep)."""
        deadline = time.monotonic() + timeout
        tag_base = (sequence % self.tag_calls) * _TAG_WINDOW
        try:
            plan = self.program(call) if bound is None else bound.plan
            verify = None
            if check and self.size > 1:
                verify = self.signature_check(call, deadline)
                if verify is None:
                    self.check_signature(call, deadline, tag_base)
            if bound is None:
                bound = self.bound(call, plan)
            if reducer is None:
                reducer = REDUCERS[call.reduce_op or "sum"]
            run(bound, self.transport, reducer, deadline, tag_base + _CHECK_TAGS, call.describe, verify)
        except CollectiveTimeoutError as error:
            raise CollectiveTimeoutError(f"{error} [timeout {timeout:g} s]") from error
        call.finish()
        return bound

    def _worker_queue(self) -> queue.Queue:
        with self._lock:
            if self._queue is None:
                self._queue = queue.Queue()
                name = f"commlab-comm-rank{self.rank}"
                threading.Thread(target=self._serve, args=(self._queue,), name=name, daemon=True).start()
            return self._queue

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker thread (after the calls queued before it) and free cached plans and scratch.

        The communicator stays usable: a later async call starts a new worker. `commlab.release()` calls
        this, and runs at interpreter exit, so no transport outlives the interpreter.
        """
        with self._lock:
            jobs, self._queue = self._queue, None
        if jobs is not None:
            done = threading.Event()
            jobs.put((None, done))
            done.wait(timeout)
        self._programs.clear()
        self._release_bound()
        self._scratch.clear()
        self._exchange = None  # (its views of a shared segment would keep the mapping alive)

    def _serve(self, jobs: queue.Queue) -> None:
        while True:
            job, future = jobs.get()
            if job is None:  # close(): every call queued before it has run
                future.set()
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                job()
            except BaseException as error:
                future.set_exception(error)
            else:
                future.set_result(None)
            finally:
                with self._lock:
                    self._pending -= 1

    def signature_check(self, call: Call, deadline: float) -> Callable[[Any], None] | None:
        """The argument check that rides beside the call's first step, where the transport offers one.

        Starts the exchange of signatures (every rank's to every other: persistent MPI requests posted
        before the data, so it adds no round trip) and returns the `verify` the executor calls once step 0
        is posted: it waits for every peer's signature and, if any differs, undoes the posted step on
        every rank (`transport.discard`, collective) and raises CollectiveMismatchError. None: the
        transport has no such exchange (check with `check_signature` before the call instead).
        """
        make = getattr(self.transport, "signature_exchange", None)
        if make is None:
            return None
        exchange = self._exchange
        if exchange is None or exchange.width != len(call.signature):
            exchange = self._exchange = make(len(call.signature))
        exchange.start(call.signature)

        def verify(first: Any) -> None:
            try:
                agree = exchange.finish(deadline, first)
            except (CollectiveTimeoutError, TransportError) as error:
                raise type(error)(f"{call.label} argument check, rank {self.rank}: {error}") from error
            if agree:
                return
            rows = exchange.rows()
            self.transport.discard(first, deadline)
            raise CollectiveMismatchError(f"{call.label}: ranks disagree: " + describe_signatures(rows))

        return verify

    def check_signature(self, call: Call, deadline: float, tag_base: int) -> None:
        """Allgather every rank's call signature; any difference raises CollectiveMismatchError.

        On a transport with a native allgather (gloo) the exchange is `check_exchange`: 'native', gloo's
        own allgather (a ring of p-1 round trips, cheapest on one host), or 'direct', one round of
        point-to-point messages to and from every peer on the call's first check tag (`tag_base`; across
        hosts one network round trip instead of p-1). Elsewhere a Bruck allgather through the executor.
        """
        send, table = self._check_buffers(len(call.signature), call.buffer.device)
        if send.device.type == "cpu":
            send.numpy()[:] = call.signature
        else:
            send.copy_(torch.tensor(call.signature, dtype=torch.int64))
        native = getattr(self.transport, "allgather_int64", None)
        if native is not None:  # one native call (or one direct round) instead of ceil(lg p) rounds
            direct = self.check_exchange == "direct" and send.device.type == "cpu"
            try:
                if direct:
                    exchange_direct(self.transport, send, table, deadline, tag_base)
                else:
                    native(send, table, deadline)
            except (CollectiveTimeoutError, TransportError) as error:
                if direct:  # its receives may still land in these buffers: the next check takes new ones
                    self._scratch.pop(_check_key(send.numel(), send.device), None)
                peers = ", ".join(f"rank {r}" for r in range(self.size) if r != self.rank)
                how = "a direct exchange" if direct else "an allgather"
                where = f"{call.label} argument check ({how} with {peers}), rank {self.rank}"
                raise type(error)(f"{where}: {error}") from error
        else:
            width = send.numel()
            table[self.rank * width : (self.rank + 1) * width] = send
            key = ("check", width)
            plan = self._programs.get(key)
            if plan is None:
                plan = compile_program(
                    build_schedule("allgather", "bruck", self.size), self.rank, table.numel()
                )
                self._programs[key] = plan
            scratch = self.scratch(table, plan.scratch_numel)
            label = f"{call.label} argument check"
            execute(plan, table, self.transport, REDUCERS["sum"], deadline, tag_base, label, scratch)
        rows = table.view(self.size, -1).tolist()
        if any(row != rows[0] for row in rows):
            raise CollectiveMismatchError(f"{call.label}: ranks disagree: " + describe_signatures(rows))

    def _check_buffers(self, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's signature and the table of all ranks' (int64), kept per (width, device)."""
        key = _check_key(width, device)
        buffers = self._scratch.get(key)
        if buffers is None:
            buffers = (
                torch.zeros(width, dtype=torch.int64, device=device),
                torch.zeros(self.size * width, dtype=torch.int64, device=device),
            )
            self._scratch[key] = buffers
        return buffers

    def __repr__(self) -> str:
        return f"Communicator({self.transport!r}, timeout={self.timeout} s, check={self.check})"


def _host_map(hosts: HostMap | str | None, size: int) -> HostMap:
    """A HostMap of `size` ranks from a map, a spec ('2x4', '3,2,3') or None (one host)."""
    if hosts is None:
        return HostMap.flat(size)
    if isinstance(hosts, str):
        hosts = HostMap.parse(hosts)
    if not isinstance(hosts, HostMap):
        raise invalid("hosts", type(hosts).__name__, "a HostMap, a spec such as '2x4', or None")
    if hosts.world_size != size:
        raise invalid("hosts", str(hosts), f"a host map of {size} ranks (the communicator's size)")
    return hosts


@dataclass
class _Replay:
    """A blocking call kept for `Communicator.replay`: the call, its bound program, and what to redo on
    the buffer before each run (None: nothing)."""

    call: Call
    bound: BoundProgram
    before: Callable[[], None] | None
    reducer: Reducer = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.reducer = REDUCERS[self.call.reduce_op or "sum"]


@dataclass
class _Job:
    """A queued call (asynchronous, or behind one): run on the communicator's worker thread."""

    comm: Communicator
    call: Call
    sequence: int
    timeout: float
    check: bool

    def __call__(self) -> None:
        self.comm._execute(self.call, self.sequence, self.timeout, self.check)


# Signature fields, in order; codes index these tuples so every rank encodes alike.
SIGNATURE_FIELDS = (
    "collective",
    "reduce op",
    "dtype",
    "elements",
    "root",
    "algorithm",
    "segments",
    "pieces",
)
DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.int8,
)


def encode_signature(
    op: str,
    reduce_op: str | None,
    dtype: torch.dtype,
    numel: int,
    root: int | None,
    algorithm_index: int,
    segments: int,
    pieces: int = 1,
) -> tuple[int, ...]:
    """The integers every rank must agree on for one call (`shared.ops.SIGNATURE_INTS` of them)."""
    reduce_code = -1 if reduce_op is None else REDUCE_CODES.index(reduce_op)
    return (
        OPS.index(op),
        reduce_code,
        DTYPES.index(dtype),
        numel,
        -1 if root is None else root,
        algorithm_index,
        segments,
        pieces,
    )


REDUCE_CODES = tuple(REDUCERS)


def describe_signatures(rows: list[list[int]]) -> str:
    """Name each field that differs and what every rank passed, e.g. 'elements: rank 0: 10, rank 1: 12'."""
    names = {
        0: OPS,
        1: REDUCE_CODES,
        2: tuple(str(d).replace("torch.", "") for d in DTYPES),
        5: tuple(ALGORITHMS),
    }

    def show(field: int, value: int) -> str:
        table = names.get(field)
        if table is not None and 0 <= value < len(table):
            return table[value]
        return "none" if value == -1 and field in (1, 4) else str(value)

    parts = []
    for field, name in enumerate(SIGNATURE_FIELDS):
        values = [row[field] for row in rows]
        if len(set(values)) > 1:
            ranks = ", ".join(f"rank {r}: {show(field, v)}" for r, v in enumerate(values))
            parts.append(f"{name}: {ranks}")
    return "; ".join(parts)


def _check_key(width: int, device: torch.device) -> tuple:
    """The scratch key of the argument check's buffers of `width` values on `device`."""
    return ("check buffers", width, device)
