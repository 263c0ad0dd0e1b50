"""A reusable host byte buffer: the publisher's snapshot and the worker's staging area.

One buffer is kept and grown only when a larger blob arrives, so memory stays
at about one policy's size and pages are faulted in once. When the other side
of a copy lives on CUDA the buffer is pinned, so device copies can be
asynchronous.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

import torch

from .wire import TensorEntry

__all__ = ["HostBuffer", "LazyFill"]


class HostBuffer:
    """A growable uint8 host buffer with typed views into it."""

    def __init__(self) -> None:
        self._storage = torch.empty(0, dtype=torch.uint8)
        self._pinned = False
        self.size = 0

    @property
    def pinned(self) -> bool:
        return self._pinned

    @property
    def capacity(self) -> int:
        return self._storage.numel()

    def reserve(self, size: int, *, pinned: bool = False) -> None:
        """Make room for ``size`` bytes (reusing the current allocation when it fits)."""
        pinned = pinned and torch.cuda.is_available()
        if size > self.capacity or pinned != self._pinned:
            self._storage = torch.empty(0, dtype=torch.uint8)  # drop the old one before allocating anew
            self._storage = torch.empty(max(size, 1), dtype=torch.uint8, pin_memory=pinned)
            self._pinned = pinned
        self.size = size

    def release(self) -> None:
        """Give the memory back."""
        self._storage = torch.empty(0, dtype=torch.uint8)
        self._pinned = False
        self.size = 0

    def bytes(self) -> torch.Tensor:
        """The first ``size`` bytes as a uint8 tensor."""
        return self._storage[: self.size]

    def memoryview(self) -> memoryview:
        """The first ``size`` bytes as a writable memoryview (no copy)."""
        return memoryview(self._storage.numpy()).cast("B")[: self.size]

    def view(self, entry: TensorEntry) -> torch.Tensor:
        """The bytes of one tensor of the blob, typed and shaped (no copy)."""
        raw = self._storage[entry.offset : entry.offset + entry.nbytes]
        return raw.view(entry.torch_dtype).view(entry.shape)


class LazyFill:
    """Copies tensors into a :class:`HostBuffer` at their entries' offsets, front to back, on demand.

    A blocking publish uses it so the snapshot copy runs chunk by chunk just
    ahead of the upload (overlapping the transfer) instead of all before it:
    :meth:`fill_to` makes the buffer's first ``end`` bytes hold the tensors'
    bytes (padding between tensors is left as it is). Thread-safe; calls for
    bytes already filled return at once. CPU tensors only.
    """

    def __init__(self, buffer: HostBuffer, entries: Sequence[TensorEntry], tensors: Sequence[torch.Tensor]) -> None:
        self._buffer = buffer
        self._todo = deque(zip(entries, tensors))  # in offset order, as plan_layout lays them out
        self._head = 0  # bytes of the first pending tensor already copied
        self._lock = threading.Lock()

    @property
    def complete(self) -> bool:
        return not self._todo

    def fill_to(self, end: int) -> None:
        """Copy every tensor byte that lies below offset ``end`` (if not done yet)."""
        with self._lock, torch.no_grad():
            while self._todo:
                entry, tensor = self._todo[0]
                if entry.nbytes and entry.offset >= end:
                    return
                stop = min(entry.nbytes, end - entry.offset)
                if entry.nbytes and _byte_sliceable(tensor):
                    if stop <= self._head:
                        return
                    # a plain memcpy on this thread: torch's copy_ would wake its intra-op
                    # threads, whose spinning afterwards steals the CPU the transfer needs
                    src = memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())
                    dst = self._buffer.memoryview()
                    dst[entry.offset + self._head : entry.offset + stop] = src[self._head : stop]
                    self._head = stop
                    if stop < entry.nbytes:
                        return
                elif entry.nbytes:
                    self._buffer.view(entry).copy_(tensor.detach())  # strided, conjugate...: whole, typed
                self._todo.popleft()
                self._head = 0


def _byte_sliceable(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s raw bytes can be sliced as a flat uint8 view (a plain, dense CPU tensor)."""
    return (
        tensor.device.type == "cpu"
        and tensor.is_contiguous()
        and not tensor.is_conj()
        and not tensor.is_neg()
        and tensor.numel() > 0
    )
