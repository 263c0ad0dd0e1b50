"""A reusable host byte buffer: the publisher's snapshot and the worker's staging area.

One buffer is kept and grown only when a larger blob arrives, so memory stays
at about one policy's size and pages are faulted in once. When the other side
of a copy lives on CUDA the buffer is pinned, so device copies can be
asynchronous.
"""

from __future__ import annotations

import torch

from .wire import TensorEntry

__all__ = ["HostBuffer"]


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
