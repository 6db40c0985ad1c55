"""Activation memory, measured: the bytes autograd keeps for backward, live and at their peak.

A `torch.autograd.graph.saved_tensors_hooks` pair wraps every tensor saved for backward; its storage
counts once however many ops save it (or views of it), parameters' storages not at all, and it stops
counting when autograd frees the graph. This is exactly activation memory, on any device, with no
allocator involved: what the pipeline schedules differ in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class ActivationMeter:
    """Bytes autograd keeps for backward (parameters excluded), now and at peak: activation memory."""

    def __init__(self, parameters: Sequence[Tensor]) -> None:
        self._exclude = {p.untyped_storage().data_ptr() for p in parameters}
        self._live: dict[int, list[int]] = {}  # storage -> [references, bytes]
        self.bytes = self.peak = 0
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def _pack(self, tensor: Tensor) -> object:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._exclude or ptr == 0:
            return tensor
        entry = self._live.setdefault(ptr, [0, storage.nbytes()])
        if entry[0] == 0:
            self.bytes += entry[1]
            self.peak = max(self.peak, self.bytes)
        entry[0] += 1
        return _Held(self, ptr, tensor)

    @staticmethod
    def _unpack(held: object) -> Tensor:
        return held.tensor if isinstance(held, _Held) else held

    def _release(self, ptr: int) -> None:
        entry = self._live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.bytes -= entry[1]
            del self._live[ptr]

    def __enter__(self) -> ActivationMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None


class _Held:
    __slots__ = ("meter", "ptr", "tensor")

    def __init__(self, meter: ActivationMeter, ptr: int, tensor: Tensor) -> None:
        self.meter, self.ptr, self.tensor = meter, ptr, tensor

    def __del__(self) -> None:
        self.meter._release(self.ptr)
