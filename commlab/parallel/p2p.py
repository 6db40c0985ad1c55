"""Point-to-point messages between pipeline stages, over the pipeline group's commlab transport.

Sends are nonblocking and complete by `flush()`; a receive blocks, with a timeout. A send may be
deferred and posted together with the next receive from the same peer (Megatron's send-forward /
receive-backward pairing): on gloo it changes nothing, on NCCL (one stream per peer pair) it keeps two
stages that exchange in opposite directions from waiting on each other. Tags are the message's
(microbatch, kind), so messages never need to arrive in order.
"""

from __future__ import annotations

import time

import torch

from commlab.collectives.communicator import Communicator
from commlab.collectives.transport import Message
from commlab.errors import CollectiveTimeoutError, invalid

KINDS = ("activation shape", "activation", "gradient")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
HEADER = 8  # int64 words: ndim, up to 6 sizes, dtype index


def tag_of(micro_batch: int, kind: str) -> int:
    return len(KINDS) * micro_batch + KINDS.index(kind)


def encode_header(tensor: torch.Tensor) -> torch.Tensor:
    """Shape and dtype of `tensor` as HEADER int64 words (what the receiver allocates)."""
    if tensor.dim() > HEADER - 2 or tensor.dtype not in DTYPES:
        raise invalid("activation", f"{tensor.dtype} {tuple(tensor.shape)}", "at most 6-D, a float dtype")
    words = [tensor.dim(), *tensor.shape] + [0] * (HEADER - 2 - tensor.dim()) + [DTYPES.index(tensor.dtype)]
    return torch.tensor(words, dtype=torch.int64, device=tensor.device)


def decode_header(header: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    words = header.tolist()
    return tuple(words[1 : 1 + words[0]]), DTYPES[words[-1]]


class PointToPoint:
    """Stage-to-stage transfers on `comm`'s transport; peers are ranks of the pipeline group (stages)."""

    def __init__(self, comm: Communicator, timeout: float | None = None) -> None:
        self.transport, self.rank = comm.transport, comm.rank
        self.timeout = comm.timeout if timeout is None else float(timeout)
        self._deferred: list[Message] = []
        self._in_flight: list = []  # (request, message) of posted sends
        self.bytes_sent = 0
        self.waited_s = 0.0  # seconds blocked waiting on peers (receives and flushes): the stage's idle time

    def send(self, tensor: torch.Tensor, peer: int, micro_batch: int, kind: str, defer: bool = False) -> None:
        """Post a send of `tensor` (kept alive until flush); deferred sends go out with the next recv."""
        message = Message(tensor.detach().contiguous(), peer, tag_of(micro_batch, kind))
        self.bytes_sent += message.tensor.numel() * message.tensor.element_size()
        self._deferred.append(message)
        if not defer:
            self._post([])

    def recv(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, peer: int, micro_batch: int,
        kind: str,
    ) -> torch.Tensor:  # fmt: skip
        """Receive a tensor from stage `peer`, waiting at most the timeout."""
        buffer = torch.empty(shape, dtype=dtype, device=device)
        request = self._post([Message(buffer, peer, tag_of(micro_batch, kind))])[0]
        self._wait(
            request, self.timeout, f"the {kind} of microbatch {micro_batch} from stage {peer} did not arrive"
        )
        return buffer

    def recv_header(self, device: torch.device, peer: int, micro_batch: int) -> tuple:
        """Receive an activation's (shape, dtype) announcement."""
        header = self.recv((HEADER,), torch.int64, device, peer, micro_batch, "activation shape")
        return decode_header(header)

    def _post(self, recvs: list[Message]) -> list:
        sends, self._deferred = self._deferred, []
        requests = self.transport.post(sends, recvs)
        self._in_flight += list(zip(requests[len(recvs) :], sends, strict=True))
        return requests[: len(recvs)]

    def flush(self) -> None:
        """Post deferred sends and wait until every send is delivered (within the timeout, in total)."""
        if self._deferred:
            self._post([])
        deadline = time.monotonic() + self.timeout
        in_flight, self._in_flight = self._in_flight, []
        for request, message in in_flight:
            what = f"a send to stage {message.peer} (tag {message.tag}) was not received"
            self._wait(request, deadline - time.monotonic(), what)

    def _wait(self, request, timeout: float, what: str) -> None:
        """Wait for `request`, counting the time as idle (`waited_s`); a timeout says `what` failed."""
        start = time.perf_counter()
        try:
            request.wait(timeout)
        except CollectiveTimeoutError as error:
            raise CollectiveTimeoutError(
                f"pipeline stage {self.rank}: {what} within {self.timeout:g} s ({error})"
            ) from error
        finally:
            self.waited_s += time.perf_counter() - start
