"""A reusable host byte buffer: the publisher's snapshot and the worker's staging area.

One buffer is kept and grown only when a larger blob arrives, so memory stays
at about one policy's size and pages are faulted in once. When the other side
of a copy lives on CUDA the buffer is pinned, so device copies can be
asynchronous.

Host-to-host copies of plain CPU tensors go through :func:`copy_bytes`: memcpy
in pieces that this thread and one helper thread take in turn. torch's own
``copy_`` splits a copy evenly between its intra-op threads and waits for the
slowest, so on a busy machine (several workers per core, the usual RL setup)
one descheduled thread holds the whole copy up: measured 2-3x slower than a
single thread. Pieces taken in turn degrade to one thread instead.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .wire import TensorEntry

__all__ = ["HostBuffer", "LazyFill", "TensorBlob", "copy_bytes"]

#: Bytes per piece of a host copy: large enough to amortise taking a piece, small enough to share out.
COPY_PIECE_BYTES = 4 * 1024 * 1024
#: Copies smaller than this stay on the calling thread.
PARALLEL_COPY_BYTES = 2 * COPY_PIECE_BYTES

_helper: ThreadPoolExecutor | None = None
_helper_lock = threading.Lock()
_increment_version = getattr(torch.autograd.graph, "increment_version", None)


def copy_bytes(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """Copy each ``(dst, src)`` pair of equally long uint8 arrays.

    Large totals are cut into :data:`COPY_PIECE_BYTES` pieces that the calling
    thread and one helper thread take in turn (``np.copyto`` releases the GIL),
    so two idle cores copy twice as fast and a busy core never stalls the other.
    """
    total = sum(dst.nbytes for dst, _ in pairs)
    if total < PARALLEL_COPY_BYTES or (os.cpu_count() or 1) < 2:
        for dst, src in pairs:
            np.copyto(dst, src)
        return
    pieces = deque(
        (dst[a : a + COPY_PIECE_BYTES], src[a : a + COPY_PIECE_BYTES])
        for dst, src in pairs
        for a in range(0, dst.nbytes, COPY_PIECE_BYTES)
    )

    def work() -> None:
        while True:
            try:
                dst, src = pieces.popleft()  # atomic: each piece is taken once
            except IndexError:
                return
            np.copyto(dst, src)

    global _helper
    with _helper_lock:
        if _helper is None:
            _helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="redisbus-copy")
        helper = _helper.submit(work)
    work()
    helper.result()


def _as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A plain CPU tensor's memory as a flat uint8 array (no copy; see :func:`_byte_sliceable`)."""
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()


class HostBuffer:
    """A growable uint8 host buffer with typed views into it."""

    def __init__(self) -> None:
        self._storage = torch.empty(0, dtype=torch.uint8)
        self._pinned = False
        self._copy_plan: _CopyPlan | None = None
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
            self._copy_plan = None  # it holds views of the old storage
            self._storage = torch.empty(0, dtype=torch.uint8)  # drop the old one before allocating anew
            self._storage = torch.empty(max(size, 1), dtype=torch.uint8, pin_memory=pinned)
            self._pinned = pinned
        self.size = size

    def release(self) -> None:
        """Give the memory back."""
        self._copy_plan = None
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

    def copy_out(self, pairs: Sequence[tuple[TensorEntry, torch.Tensor]]) -> None:
        """Copy each entry's bytes into its tensor (same dtype and shape, as matched against the manifest).

        Plain CPU tensors get a :func:`copy_bytes` memcpy (and their autograd
        version counter bumped, as ``copy_`` would); others (CUDA: asynchronous
        from pinned memory; strided, conjugate...) get ``copy_``. How each
        tensor is copied is worked out once and reused while the next apply has
        the same layout and tensors: for a small policy, working it out costs
        several times the copy.
        """
        plan = self._copy_plan
        if plan is None or not plan.fits(self._storage, pairs):
            plan = self._copy_plan = _CopyPlan(self, pairs)
        plan.run()


class _CopyPlan:
    """How :meth:`HostBuffer.copy_out` copies one layout into one set of tensors.

    Valid while the buffer's storage, the entries and every destination tensor
    (the same object, at the same address, as contiguous as it was) stay the
    same: a tensor replaced in the target, or moved by ``set_`` or ``resize_``,
    gets a new plan.
    """

    __slots__ = ("storage", "pairs", "addresses", "memcpy", "bump", "typed")

    def __init__(self, buffer: HostBuffer, pairs: Sequence[tuple[TensorEntry, torch.Tensor]]) -> None:
        self.storage = buffer._storage
        self.pairs = list(pairs)
        self.addresses = [(dst.data_ptr(), dst.is_contiguous()) for _, dst in pairs]
        src = self.storage.numpy()
        self.memcpy: list[tuple[np.ndarray, np.ndarray]] = []
        self.bump: list[torch.Tensor] = []
        self.typed: list[tuple[torch.Tensor, torch.Tensor]] = []
        for entry, dst in pairs:
            if entry.nbytes and _increment_version is not None and _byte_sliceable(dst):
                self.memcpy.append((_as_bytes(dst), src[entry.offset : entry.offset + entry.nbytes]))
                self.bump.append(dst)
            else:
                self.typed.append((dst, buffer.view(entry)))

    def fits(self, storage: torch.Tensor, pairs: Sequence[tuple[TensorEntry, torch.Tensor]]) -> bool:
        if storage is not self.storage or len(pairs) != len(self.pairs):
            return False
        for (entry, dst), (known_entry, known_dst), address in zip(pairs, self.pairs, self.addresses):
            if dst is not known_dst or (entry is not known_entry and entry != known_entry):
                return False
            if (dst.data_ptr(), dst.is_contiguous()) != address:
                return False
        return True

    def run(self) -> None:
        with torch.no_grad():
            for dst, src in self.typed:
                dst.copy_(src, non_blocking=dst.is_cuda)
        if self.memcpy:
            copy_bytes(self.memcpy)
            _increment_version(self.bump)  # type: ignore[misc]  # a plan has memcpy pairs only where it exists


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
        with self._lock:
            pending: list[tuple[np.ndarray, np.ndarray]] = []
            self._plan(end, pending)
            copy_bytes(pending)  # a chunk's worth on this thread; a whole snapshot shared with a helper

    def _plan(self, end: int, pending: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Advance the front to ``end``: memcpy pieces go to ``pending``, other tensors are copied now."""
        with torch.no_grad():
            while self._todo:
                entry, tensor = self._todo[0]
                if entry.nbytes and entry.offset >= end:
                    return
                stop = min(entry.nbytes, end - entry.offset)
                if entry.nbytes and _byte_sliceable(tensor):
                    if stop <= self._head:
                        return
                    # memcpy, not torch's copy_: its intra-op threads would wait on each other and
                    # spin afterwards, stealing the CPU the transfer needs (see copy_bytes)
                    src = _as_bytes(tensor)[self._head : stop]
                    dst = self._buffer.bytes().numpy()[entry.offset + self._head : entry.offset + stop]
                    pending.append((dst, src))
                    self._head = stop
                    if stop < entry.nbytes:
                        return
                elif entry.nbytes:
                    self._buffer.view(entry).copy_(tensor.detach())  # strided, conjugate...: whole, typed
                self._todo.popleft()
                self._head = 0


class TensorBlob:
    """A blob's bytes read straight from the tensors' memory: no snapshot, no copy.

    :meth:`views` returns the views that make up bytes ``[start, stop)`` of the
    blob as laid out by ``entries``: slices of the tensors, and zero bytes for
    the alignment padding between them. Only for tensors :meth:`supports`
    (plain, dense CPU tensors), and only while nothing writes to them.
    """

    _ZEROS = memoryview(bytes(4096))

    def __init__(self, entries: Sequence[TensorEntry], tensors: Sequence[torch.Tensor]) -> None:
        self._parts = [(e.offset, e.nbytes, _as_bytes(t)) for e, t in zip(entries, tensors) if e.nbytes]
        self._starts = [offset for offset, _, _ in self._parts]

    @staticmethod
    def supports(tensors: Sequence[torch.Tensor]) -> bool:
        return all(t.device.type == "cpu" and (t.numel() == 0 or _byte_sliceable(t)) for t in tensors)

    def views(self, start: int, stop: int) -> list[memoryview]:
        out: list[memoryview] = []
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        pos = start
        while pos < stop:
            offset, nbytes, data = self._parts[i] if i < len(self._parts) else (stop, 0, None)
            if pos < offset:  # padding before the next tensor
                end = min(stop, offset, pos + len(self._ZEROS))
                out.append(self._ZEROS[: end - pos])
                pos = end
            elif pos >= offset + nbytes:
                i += 1
            else:
                end = min(stop, offset + nbytes)
                out.append(memoryview(data[pos - offset : end - offset]))
                pos = end
        return out


def _byte_sliceable(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s raw bytes can be sliced as a flat uint8 view (a plain, dense CPU tensor)."""
    return (
        tensor.device.type == "cpu"
        and tensor.is_contiguous()
        and not tensor.is_conj()
        and not tensor.is_neg()
        and tensor.numel() > 0
    )
