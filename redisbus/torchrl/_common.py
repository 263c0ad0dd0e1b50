"""Plumbing that both TorchRL APIs share: weights, worker ids, version tracking, the safe point, catching up."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from tensordict import TensorDict, TensorDictBase
from torch import nn

from ..errors import BusConnectionError, ConfigError
from ..subscriber import WeightSubscriber

try:  # warning-free: does NOT import torchrl.collectors
    from torchrl.weight_update.weight_sync_schemes import WeightSyncScheme  # noqa: F401

    HAS_TORCHRL = True
except ImportError:  # exercised by the no-torchrl subprocess test
    HAS_TORCHRL = False

log = logging.getLogger("redisbus.torchrl")

APPLY_MODES = ("on_sync", "immediate")


def check_apply_mode(apply: str) -> None:
    """Refuse an unknown ``apply`` mode (:class:`~redisbus.ConfigError`)."""
    if apply not in APPLY_MODES:
        raise ConfigError(f"apply must be 'on_sync' or 'immediate', not {apply!r}")


def as_weights(obj: Any) -> TensorDictBase | Mapping[str, Any] | None:
    """Module -> detached TensorDict of parameters and buffers; TensorDict -> ``.data``; a mapping as is."""
    if obj is None:
        return None
    if isinstance(obj, nn.Module):
        return TensorDict.from_module(obj).data
    if isinstance(obj, TensorDictBase):
        return obj.data
    if isinstance(obj, Mapping):
        return obj
    raise TypeError(f"expected an nn.Module, a TensorDictBase or a Mapping of tensors, not {type(obj).__name__}")


def as_tensordict(weights: nn.Module | TensorDictBase | Mapping[str, Any]) -> TensorDictBase:
    """A module's parameters and buffers, a TensorDict as is, or a mapping of tensors (dotted keys nest)."""
    if isinstance(weights, nn.Module):
        return TensorDict.from_module(weights)
    if isinstance(weights, TensorDictBase):
        return weights
    return TensorDict(dict(weights)).unflatten_keys(".")


def copy_weights(dest: nn.Module | TensorDictBase, src: nn.Module | TensorDictBase | Mapping[str, Any]) -> None:
    """Copy ``src`` into the tensors of ``dest``, in place."""
    as_tensordict(dest).data.update_(as_tensordict(src).data)


def same_storage(a: nn.Module | TensorDictBase, b: nn.Module | TensorDictBase) -> bool:
    va, vb = list(as_tensordict(a).values(True, True)), list(as_tensordict(b).values(True, True))
    return len(va) == len(vb) and all(x.data_ptr() == y.data_ptr() and x.device == y.device for x, y in zip(va, vb))


def default_worker_id(suffix: str | int | None = None) -> str:
    base = f"{socket.gethostname()}:{os.getpid()}"
    return base if suffix is None else f"{base}:{suffix}"


def set_collector_version(collector: Any, version: int | None) -> None:
    """Write the bus version into the collector's ``PolicyVersion`` tracker (integer trackers only)."""
    if collector is None or version is None:
        return
    tracker = getattr(collector, "policy_version_tracker", None)
    if tracker is None or getattr(tracker, "version_type", int) not in (int, "int"):
        return
    tracker.version = int(version)


def is_leaf_collector(obj: Any) -> bool:
    """A single-process ``torchrl.collectors.Collector``, whose ``rollout()`` runs ``pre_collect_hook``.

    Never a ``MultiCollector``: its ``pre_collect_hook`` setter cloudpickles the
    hook into every worker (torchrl/collectors/_multi_base.py, ``pre_collect_hook``).
    """
    collectors = sys.modules.get("torchrl.collectors")
    leaf = getattr(collectors, "Collector", None) if collectors is not None else None
    return leaf is not None and isinstance(obj, leaf) and hasattr(obj, "pre_collect_hook")


class PreCollectHook:
    """Chains a callback in front of a collector's ``pre_collect_hook``.

    ``Collector.rollout()`` calls ``pre_collect_hook`` first, before any env or
    policy step: between two batches, never inside one. That is the safe point.
    """

    def __init__(self, collector: Any, callback: Callable[[], None]) -> None:
        self._collector_ref = weakref.ref(collector)
        self.previous = collector.pre_collect_hook
        self.callback = callback
        collector.pre_collect_hook = self

    def __call__(self) -> None:
        self.callback()
        if self.previous is not None:
            self.previous()

    def remove(self) -> None:
        collector = self._collector_ref()
        if collector is not None and collector.pre_collect_hook is self:
            collector.pre_collect_hook = self.previous


def keep_bus_version(collector: Any, version: Callable[[], int | None]) -> PreCollectHook | None:
    """Put ``version()`` back into a Collector's version tracker at each of its safe points.

    ``Collector.update_policy_weights_()`` adds a local +1 after the weights were
    sent or received; its batches must carry the trainer's version instead.
    Returns the hook, or None when the collector tracks no versions (or is not a leaf ``Collector``).
    """
    if getattr(collector, "policy_version_tracker", None) is None or not is_leaf_collector(collector):
        return None
    collector_ref = weakref.ref(collector)  # the collector holds the hook: no cycle back to it
    return PreCollectHook(collector, lambda: set_collector_version(collector_ref(), version()))


class Freshness:
    """Whether a safe point may read ``latest`` now: not for a while after Redis was unreachable.

    While Redis is down (or a black hole), each read could stall for the socket
    timeout; the collector goes on with what it has, and the listener thread,
    which reconnects on its own, stages new versions for ``sync()`` meanwhile.
    """

    def __init__(self) -> None:
        self.offline_until = 0.0

    def ok(self) -> bool:
        return time.monotonic() >= self.offline_until

    def went_offline(self, backoff: float) -> None:
        self.offline_until = time.monotonic() + backoff


def catch_up(sub: WeightSubscriber, *, timeout: float, strict: bool, freshness: Freshness | None = None) -> int | None:
    """Apply what was committed before this call (``wanted_version``), else whatever is staged.

    A refused version (``SchemaMismatchError``, ``CorruptBlobError``, ...)
    raises: the target is unchanged. When ``strict`` is False, an unreachable
    Redis or a version that does not arrive within ``timeout`` is logged and the
    caller goes on with the weights it has (they catch up at a later safe point).

    Returns:
        The version applied now, or None.
    """
    if freshness is not None and not freshness.ok():
        return sub.sync()
    try:
        wanted = sub.wanted_version()
    except BusConnectionError as exc:
        if strict:
            raise
        if freshness is not None:
            freshness.went_offline(max(sub.config.poll_interval, 1.0))
        log.warning("worker %s: cannot read the newest version (%s); keeping version %s",
                    sub.worker_id, exc, sub.version)  # fmt: skip
        return sub.sync()
    if wanted is None or wanted <= (sub.version or 0):
        return sub.sync()
    try:
        before = sub.version
        applied = sub.wait_for_version(wanted, timeout=timeout)
        return applied if applied != before else None
    except TimeoutError as exc:
        if strict:
            raise
        log.warning("worker %s: %s; going on with version %s", sub.worker_id, exc, sub.version)
        return sub.sync()
