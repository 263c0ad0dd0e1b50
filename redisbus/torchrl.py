"""TorchRL integration: redisbus as the weight updater of TorchRL collectors.

Two generations of TorchRL's API are covered:

* **The current API** (``torchrl>=0.11``): :class:`RedisWeightSyncScheme`, a
  real subclass of ``torchrl.weight_update.WeightSyncScheme``. A trainer with
  no collector calls ``init_on_sender(model=policy)``, ``connect()`` and then
  ``send()`` after each optimiser step; a collector on another host takes it
  as ``Collector(..., weight_recv_schemes={"policy": scheme})``; a local
  ``MultiSyncCollector`` / ``MultiAsyncCollector`` takes it as
  ``weight_sync_schemes={"policy": scheme}``. Weights are applied at the
  collector's safe point (the top of each rollout) and the batch's
  ``policy_version`` is the trainer's version number.
* **The legacy updater API** (``Collector(..., weight_updater=...)``):
  :class:`RedisWeightUpdater` (trainer side: one new version per call) and
  :class:`RedisLocalWeightUpdater` (worker side: pulls and applies the newest
  version when the collector's ``update_policy_weights_()`` runs). They work
  without torchrl installed. With torchrl installed they pass
  ``isinstance(x, torchrl.collectors.WeightUpdaterBase)`` through ABC virtual
  registration, done when the first updater is created, so that importing
  this module never triggers TorchRL's deprecation warnings (TorchRL still
  warns, as it should, when a ``Collector`` is given a ``weight_updater``).

``import redisbus`` never imports this module, nor torchrl.
"""

from __future__ import annotations

import abc
import logging
import os
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from . import defaults
from .config import BusConfig
from .errors import BusConnectionError, ConfigError
from .publisher import WeightPublisher
from .registry import list_workers
from .subscriber import WeightSubscriber
from .transport import RedisSource

try:  # warning-free: does NOT import torchrl.collectors
    from torchrl.weight_update.weight_sync_schemes import WeightSyncScheme as _TorchRLWeightSyncScheme

    HAS_TORCHRL = True
except ImportError:  # exercised by the no-torchrl subprocess test
    _TorchRLWeightSyncScheme = None
    HAS_TORCHRL = False

__all__ = [
    "HAS_TORCHRL",
    "RedisLocalWeightUpdater",
    "RedisWeightSyncScheme",
    "RedisWeightUpdater",
    "WeightUpdaterBase",
]

log = logging.getLogger("redisbus.torchrl")

_APPLY_MODES = ("on_sync", "immediate")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _bus_config(url: str | BusConfig | None, namespace: str | None, settings: Mapping[str, Any]) -> BusConfig:
    """One picklable :class:`BusConfig` (no live connection) from a URL or a config, plus overrides."""
    overrides = dict(settings)
    if namespace is not None:
        overrides["namespace"] = namespace
    if isinstance(url, BusConfig):
        return url.with_options(**overrides) if overrides else url
    if url is None or isinstance(url, str):
        return BusConfig.from_env(url, **overrides)
    raise ConfigError(
        f"expected a Redis URL or a BusConfig, not {type(url).__name__}: the scheme is pickled into "
        "worker processes, so it cannot carry a live client"
    )


def _as_weights(obj: Any) -> TensorDictBase | Mapping[str, Any] | None:
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


def _first_weights(policy_weights: Any) -> Any:
    """TorchRL's ``{device: TensorDict}`` -> its first entry; anything else as is."""
    if (
        isinstance(policy_weights, Mapping)
        and not isinstance(policy_weights, TensorDictBase)
        and policy_weights
        and all(isinstance(k, (torch.device, str, int)) for k in policy_weights)
        and all(isinstance(v, (TensorDictBase, nn.Module)) for v in policy_weights.values())
    ):
        return next(iter(policy_weights.values()))
    return policy_weights


def _default_worker_id(suffix: str | int | None = None) -> str:
    base = f"{socket.gethostname()}:{os.getpid()}"
    return base if suffix is None else f"{base}:{suffix}"


def _set_collector_version(collector: Any, version: int | None) -> None:
    """Write the bus version into the collector's ``PolicyVersion`` tracker (integer trackers only)."""
    if collector is None or version is None:
        return
    tracker = getattr(collector, "policy_version_tracker", None)
    if tracker is None or getattr(tracker, "version_type", int) not in (int, "int"):
        return
    tracker.version = int(version)


def _is_leaf_collector(obj: Any) -> bool:
    """A single-process ``torchrl.collectors.Collector``, whose ``rollout()`` runs ``pre_collect_hook``.

    Never a ``MultiCollector``: its ``pre_collect_hook`` setter cloudpickles the
    hook into every worker (torchrl/collectors/_multi_base.py, ``pre_collect_hook``).
    """
    collectors = sys.modules.get("torchrl.collectors")
    leaf = getattr(collectors, "Collector", None) if collectors is not None else None
    return leaf is not None and isinstance(obj, leaf) and hasattr(obj, "pre_collect_hook")


class _PreCollectHook:
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


def _materialize_meta(model: nn.Module, device: torch.device | str = "cpu") -> bool:
    """Give a meta-device ("stateless") policy real, uninitialised storage, in place.

    ``MultiSyncCollector`` sends each worker a meta copy of ``policy`` and leaves
    the weights to the scheme. Returns True when something was materialised.
    """
    params = TensorDict.from_module(model, as_module=True)
    if not any(t.is_meta for t in params.values(True, True)):
        return False

    def _empty(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(t, device=device) if t.is_meta else t.data
        if isinstance(t, nn.Parameter):
            return nn.Parameter(out, requires_grad=t.requires_grad)
        return out

    params.apply(_empty, filter_empty=False).to_module(model)
    return True


def _same_storage(a: nn.Module | TensorDictBase, b: nn.Module | TensorDictBase) -> bool:
    la = TensorDict.from_module(a) if isinstance(a, nn.Module) else a
    lb = TensorDict.from_module(b) if isinstance(b, nn.Module) else b
    va, vb = list(la.values(True, True)), list(lb.values(True, True))
    return len(va) == len(vb) and all(x.data_ptr() == y.data_ptr() and x.device == y.device for x, y in zip(va, vb))


class _Freshness:
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


def _catch_up(sub: WeightSubscriber, *, timeout: float, strict: bool, freshness: _Freshness | None = None) -> int | None:
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


# --------------------------------------------------------------------------------------------
# legacy updater API
# --------------------------------------------------------------------------------------------

_REGISTERED = False
_REG_LOCK = threading.Lock()


def _register_with_torchrl() -> None:
    """Make our updaters ``isinstance(x, torchrl.collectors.WeightUpdaterBase)`` (ABC registration).

    TorchRL's ``WeightUpdaterBase.__init_subclass__`` warns on every real
    subclass, and importing ``torchrl.collectors`` warns once for each of
    TorchRL's own subclasses, so this module neither subclasses it nor imports
    it at import time. Called when the first updater is created (by then the
    user has imported ``torchrl.collectors`` to build a Collector), or at import
    when ``torchrl.collectors.weight_update`` is already loaded.
    """
    global _REGISTERED
    if _REGISTERED or not HAS_TORCHRL:
        return
    with _REG_LOCK:
        if _REGISTERED:
            return
        try:
            from torchrl.collectors.weight_update import WeightUpdaterBase as _TorchRLWeightUpdaterBase
        except ImportError:  # a torchrl without the legacy API: our own base is enough
            _REGISTERED = True
            return
        _TorchRLWeightUpdaterBase.register(WeightUpdaterBase)
        _REGISTERED = True


class WeightUpdaterBase(abc.ABC):
    """The legacy updater surface (TorchRL's ``WeightUpdaterBase`` names and signatures), without torchrl.

    Subclasses implement :meth:`_sync_weights_with_worker`; they may override
    :meth:`_get_server_weights`, :meth:`_maybe_map_weights` (which must accept
    None) and :meth:`all_worker_ids`. A collector uses ``register_collector``,
    ``collector`` and ``__call__(policy_or_weights=..., worker_ids=...)``.

    Where torchrl is installed, every instance is also an instance of
    ``torchrl.collectors.WeightUpdaterBase`` (virtual subclass, registered when
    the first instance is created, or at import if ``torchrl.collectors`` was
    imported first; ``issubclass`` on the classes is True from then on).
    """

    _collector_ref: weakref.ReferenceType[Any] | None = None
    _post_hooks: list[Callable[[], Any]] | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> WeightUpdaterBase:
        _register_with_torchrl()
        return super().__new__(cls)

    # -- collector registration -------------------------------------------------------------

    @classmethod
    def from_policy(cls, policy: Any) -> WeightUpdaterBase | None:  # noqa: ARG003 - TorchRL's signature
        """TorchRL's optional factory hook; not used."""
        return None

    def register_collector(self, collector: Any) -> None:
        """Register the collector this updater serves; registering a different second one is refused.

        Raises:
            RuntimeError: another (live) collector is already registered.
        """
        current = self.collector
        if current is collector:
            return
        if current is not None:
            raise RuntimeError(
                f"{type(self).__name__} is already registered with {type(current).__name__} at "
                f"0x{id(current):x}; create one updater per collector"
            )
        self._collector_ref = weakref.ref(collector)
        self._on_register(collector)

    def _on_register(self, collector: Any) -> None:
        """Called once a collector is registered (subclass hook)."""

    @property
    def collector(self) -> Any | None:
        """The registered collector, or None."""
        return None if self._collector_ref is None else self._collector_ref()

    @property
    def collectors(self) -> list[Any] | None:
        """The registered collector in a list (TorchRL's spelling), or None."""
        c = self.collector
        return None if c is None else [c]

    def init(self, *args: Any, **kwargs: Any) -> None:
        """TorchRL calls it after registration; nothing to do."""
        return None

    # -- post hooks -------------------------------------------------------------------------

    @property
    def post_hooks(self) -> list[Callable[[], Any]]:
        """Callables run (no arguments) after each update."""
        if self._post_hooks is None:
            self._post_hooks = []
        return self._post_hooks

    def register_post_hook(self, hook: Callable[[], Any]) -> None:
        """Run ``hook()`` after every update."""
        self.post_hooks.append(hook)

    # -- what subclasses define -------------------------------------------------------------

    @abc.abstractmethod
    def _sync_weights_with_worker(self, *, worker_id: Any = None, server_weights: Any) -> Any:
        """Synchronise one worker (``worker_id`` None: the only target)."""

    def _get_server_weights(self) -> Any:
        """The newest weights of the server when a call gets none (default: None)."""
        return None

    def _maybe_map_weights(self, server_weights: Any) -> Any:
        """Map the weights before distribution (identity; accepts None)."""
        return server_weights

    def all_worker_ids(self) -> list[Any] | None:
        """Identifiers of every worker (default: None, meaning one anonymous target)."""
        return None

    def _skip_update(self, worker_id: Any) -> bool:  # noqa: ARG002 - TorchRL's signature
        return False

    # -- driving ----------------------------------------------------------------------------

    @staticmethod
    def _normalize_worker_ids(worker_ids: Any) -> list[Any] | None:
        if worker_ids is None:
            return None
        if isinstance(worker_ids, (int, str, torch.device)):
            return [worker_ids]
        return list(worker_ids)

    def _push_weights(self, *, policy_or_weights: Any = None, worker_ids: Any = None) -> Any:
        server_weights = self._get_server_weights() if policy_or_weights is None else policy_or_weights
        server_weights = self._maybe_map_weights(server_weights)
        ids = self._normalize_worker_ids(worker_ids)
        if ids is None:
            ids = self.all_worker_ids()
        if ids is None:
            return self._sync_weights_with_worker(worker_id=None, server_weights=server_weights)
        result = None
        for worker_id in ids:
            if not self._skip_update(worker_id):
                result = self._sync_weights_with_worker(worker_id=worker_id, server_weights=server_weights)
        return result

    def push_weights(self, policy_or_weights: Any = None, worker_ids: Any = None) -> Any:
        """Update the workers named (all when None), then run the post hooks."""
        result = self._push_weights(policy_or_weights=policy_or_weights, worker_ids=worker_ids)
        for hook in self.post_hooks:
            hook()
        return result

    def __call__(
        self, weights: Any = None, worker_ids: Any = None, *, policy_or_weights: Any = None, **kwargs: Any
    ) -> Any:
        """``updater(weights=None, worker_ids=None)``; TorchRL calls it with ``policy_or_weights=``.

        ``worker_ids`` is an int, a device, a string or a list of them; None means all.
        """
        if "policy_weights" in kwargs:  # TorchRL's deprecated spelling, forwarded by its mp runner
            policy_or_weights = kwargs.pop("policy_weights")
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
        if weights is not None and policy_or_weights is not None:
            raise ValueError("pass weights or policy_or_weights, not both")
        return self.push_weights(weights if weights is not None else policy_or_weights, worker_ids)

    def update_weights(self, weights: Any = None, worker_ids: Any = None, **kwargs: Any) -> Any:
        """Same as calling the updater."""
        return self(weights, worker_ids, **kwargs)

    def increment_version(self) -> None:
        """Bump the registered collector's local policy version (TorchRL's method)."""
        c = self.collector
        if c is not None and hasattr(c, "increment_version"):
            c.increment_version()


class RedisWeightUpdater(WeightUpdaterBase):
    """Trainer side of the legacy API: each call publishes ONE new version to the bus.

    The bus is a broadcast medium: ``updater(worker_ids=[...])`` publishes once,
    whatever the number of workers named, and returns the version number.

    Args:
        get_server_weights: returns the trainer's current weights (a TensorDict,
            an ``nn.Module`` or a mapping of tensors); used when a call gets no weights.
        policy_weights: TorchRL's ``{device: TensorDict}`` (or one TensorDict or
            module): the trainer's weights when there is no getter. Other entries
            of the dict are updated in place after each call, as TorchRL does.

    Keyword Args:
        url: a Redis URL, a :class:`~redisbus.BusConfig`, or an existing
            ``redis.Redis`` client (None: ``REDISBUS_URL``).
        namespace: the bus namespace.
        metadata: a dict (or a callable returning one) stored with every version.
        wait_for_workers: after publishing, wait up to this many seconds until
            the workers named (or, with ``worker_ids=None``, every live worker
            of the namespace) report the new version; ``TimeoutError`` otherwise.
        **settings: any other :class:`~redisbus.BusConfig` field.

    Example:
        >>> up = RedisWeightUpdater(lambda: policy, url="redis://bus:6379/0", namespace="ppo")  # doctest: +SKIP
        >>> v = up()  # publishes version v  # doctest: +SKIP
    """

    def __init__(
        self,
        get_server_weights: Callable[[], Any] | None = None,
        policy_weights: Mapping[torch.device, TensorDictBase] | TensorDictBase | nn.Module | None = None,
        *,
        url: RedisSource = None,
        namespace: str | None = None,
        metadata: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
        wait_for_workers: float | None = None,
        **settings: Any,
    ) -> None:
        self.get_server_weights = get_server_weights
        self.policy_weights = policy_weights
        self.metadata = metadata
        self.wait_for_workers = wait_for_workers
        self._publisher = WeightPublisher(url, namespace=namespace, **settings)
        self.config = self._publisher.config
        self.namespace = self.config.namespace
        self._shared_client = url if hasattr(url, "execute_command") else None
        self._registry_client: Any = None
        self._call_version: int | None = None
        self.last_version: int | None = None
        self._hook: _PreCollectHook | None = None

    def __repr__(self) -> str:
        return f"RedisWeightUpdater({self.config.redacted_url()!r}, namespace={self.namespace!r})"

    # -- the bus ----------------------------------------------------------------------------

    def _registry(self) -> Any:
        if self._shared_client is not None:
            return self._shared_client
        if self._registry_client is None:
            self._registry_client = self.config.client()
        return self._registry_client

    def all_worker_ids(self, dead_after: float = defaults.DEAD_AFTER_SECONDS) -> list[str]:
        """Ids of the workers that reported to this namespace and are alive (heartbeat within ``dead_after`` s)."""
        now = time.time()
        return [r.worker_id for r in list_workers(self._registry(), self.config.keys) if not r.is_dead(dead_after, now)]

    def _get_server_weights(self) -> Any:
        """The getter's weights, else the first of ``policy_weights``, else the registered collector's policy."""
        if self.get_server_weights is not None:
            return self.get_server_weights()
        if self.policy_weights is not None:
            return _first_weights(self.policy_weights)
        c = self.collector
        if c is not None and hasattr(c, "get_model"):
            return c.get_model("policy")
        return None

    def _maybe_map_weights(self, server_weights: Any) -> Any:
        """Modules become TensorDicts of their parameters and buffers; None stays None."""
        return _as_weights(server_weights)

    def _publish(self, server_weights: Any) -> int:
        meta = self.metadata() if callable(self.metadata) else self.metadata
        version = self._publisher.publish(server_weights, metadata=dict(meta) if meta else None)
        assert isinstance(version, int)
        self.last_version = version
        return version

    def _sync_weights_with_worker(self, *, worker_id: Any = None, server_weights: Any) -> int:
        # One publish per call, however many workers are named: every worker pulls the same version.
        if self._call_version is None:
            if server_weights is None:
                raise ValueError("no weights to publish: pass weights, or give get_server_weights or policy_weights")
            self._call_version = self._publish(server_weights)
        return self._call_version

    def _push_weights(self, *, policy_or_weights: Any = None, worker_ids: Any = None) -> int:
        self._call_version = None
        try:
            named = self._normalize_worker_ids(worker_ids)
            # Listing workers is a Redis read: only done when waiting for them.
            targets = named if named is not None else (self.all_worker_ids() if self.wait_for_workers else None)
            targets = [w for w in targets if not self._skip_update(w)] if targets else None
            server_weights = self._maybe_map_weights(
                self._get_server_weights() if policy_or_weights is None else policy_or_weights
            )
            version = 0
            for worker_id in targets or [None]:
                version = self._sync_weights_with_worker(worker_id=worker_id, server_weights=server_weights)
            self._update_local_copies(server_weights)
            if self.wait_for_workers and targets:
                self._wait_for(targets, version, self.wait_for_workers)
            _set_collector_version(self.collector, version)
            return version
        finally:
            self._call_version = None

    def _update_local_copies(self, weights: Any) -> None:
        """TorchRL's ``policy_weights`` semantics: the per-device copies follow, in place."""
        if weights is None or not isinstance(self.policy_weights, Mapping) or isinstance(self.policy_weights, TensorDictBase):
            return
        src = weights if isinstance(weights, TensorDictBase) else TensorDict(dict(weights)).unflatten_keys(".")
        for dest in self.policy_weights.values():
            if isinstance(dest, nn.Module):
                dest = TensorDict.from_module(dest)
            if isinstance(dest, TensorDictBase) and not _same_storage(dest, src):
                dest.data.update_(src)

    def _wait_for(self, worker_ids: Sequence[Any], version: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = {str(w) for w in worker_ids}
        while True:
            for report in list_workers(self._registry(), self.config.keys):
                if report.worker_id in pending and (report.version or 0) >= version:
                    pending.discard(report.worker_id)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {sorted(pending)} did not report version {version} within {timeout}s")
            time.sleep(0.02)

    def _on_register(self, collector: Any) -> None:
        # A Collector adds a local +1 to its version after calling us (Collector.update_policy_weights_);
        # re-assert the bus version at its next safe point so its batches carry the trainer's version.
        if getattr(collector, "policy_version_tracker", None) is not None and _is_leaf_collector(collector):
            self._hook = _PreCollectHook(collector, lambda: _set_collector_version(collector, self.last_version))

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Finish a pending upload and release the connections (idempotent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._publisher.close()
        if self._registry_client is not None:
            self._registry_client.close()
            self._registry_client = None

    def __enter__(self) -> RedisWeightUpdater:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisLocalWeightUpdater(WeightUpdaterBase):
    """Worker side of the legacy API: ``collector.update_policy_weights_()`` applies the newest version.

    A background listener pulls and verifies new versions as they are
    announced; the local weights change only when the updater is called
    (TorchRL calls it from ``update_policy_weights_()``), in place, in one step.

    Args:
        policy_weights: the local weights to keep up to date (an ``nn.Module``,
            a TensorDict, or TorchRL's ``{device: TensorDict}``). None: the
            collector's policy, when the collector registers the updater.

    Keyword Args:
        url: a Redis URL, a :class:`~redisbus.BusConfig`, or an existing
            ``redis.Redis`` client (None: ``REDISBUS_URL``).
        namespace: the bus namespace.
        worker_id: the name reported to the bus (default ``host:pid``).
        apply: ``"on_sync"`` (default: apply when called) or ``"immediate"``
            (apply as soon as a version is verified, from the listener thread).
        fresh: each call first reads ``latest`` and waits up to ``timeout`` for
            it, so a version committed before the call is always applied
            (default). False: apply whatever the listener has staged.
        timeout: seconds to wait for a version (start-up and ``fresh`` calls).
        initial_sync: apply the newest published version at start-up (default).
        **settings: any other :class:`~redisbus.BusConfig` field.

    Raises (from a call, or from the Collector's constructor at start-up):
        SchemaMismatchError: the newest version does not fit the local weights
            (other refusals: ``CorruptBlobError``, ``SignatureError``, ...); the
            weights are unchanged.
    """

    def __init__(
        self,
        policy_weights: Any = None,
        *,
        url: RedisSource = None,
        namespace: str | None = None,
        worker_id: str | None = None,
        apply: str = "on_sync",
        fresh: bool = True,
        timeout: float = 10.0,
        initial_sync: bool = True,
        **settings: Any,
    ) -> None:
        if apply not in _APPLY_MODES:
            raise ConfigError(f"apply must be 'on_sync' or 'immediate', not {apply!r}")
        self._source = url
        self._namespace = namespace
        self._settings = settings
        self.worker_id = worker_id or _default_worker_id()
        self.apply = apply
        self.fresh = fresh
        self.timeout = timeout
        self.initial_sync = initial_sync
        self._subscriber: WeightSubscriber | None = None
        self._hook: _PreCollectHook | None = None
        self._freshness = _Freshness()
        self.policy_weights: Any = None
        if policy_weights is not None:
            self._start(_first_weights(policy_weights))

    def __repr__(self) -> str:
        return f"RedisLocalWeightUpdater(worker_id={self.worker_id!r}, version={self.version})"

    @property
    def version(self) -> int | None:
        """The version applied to the local weights, or None."""
        return None if self._subscriber is None else self._subscriber.version

    def _start(self, target: Any) -> None:
        if not isinstance(target, (nn.Module, TensorDictBase)):
            raise TypeError(f"policy_weights must be an nn.Module or a TensorDict, not {type(target).__name__}")
        sub = WeightSubscriber(
            self._source, namespace=self._namespace, target=target, worker_id=self.worker_id, apply=self.apply,
            **self._settings,
        )  # fmt: skip
        sub.start()
        try:
            if self.initial_sync:
                _catch_up(sub, timeout=self.timeout, strict=True)
        except BaseException:
            sub.close()
            raise
        self.policy_weights = target
        self._subscriber = sub

    def _on_register(self, collector: Any) -> None:
        if self._subscriber is None:
            policy = collector.get_model("policy") if hasattr(collector, "get_model") else collector.policy
            try:
                self._start(policy)
            except BaseException:
                self._collector_ref = None
                raise
        _set_collector_version(collector, self.version)
        if getattr(collector, "policy_version_tracker", None) is not None and _is_leaf_collector(collector):
            # undo Collector.update_policy_weights_'s local +1 at the next safe point
            self._hook = _PreCollectHook(collector, lambda: _set_collector_version(collector, self.version))

    def _pull(self) -> int | None:
        sub = self._subscriber
        if sub is None:
            raise RuntimeError("RedisLocalWeightUpdater has no target yet: pass policy_weights or register a collector")
        if self.fresh:
            return _catch_up(sub, timeout=self.timeout, strict=False, freshness=self._freshness)
        return sub.sync()

    def _sync_weights_with_worker(self, *, worker_id: Any = None, server_weights: Any) -> int | None:
        """Pull and apply the newest version; explicit weights are copied in place instead (no bus)."""
        if server_weights is not None:
            if self.policy_weights is None:
                raise RuntimeError("no local weights to update: pass policy_weights or register a collector")
            dest = self.policy_weights
            dest = TensorDict.from_module(dest) if isinstance(dest, nn.Module) else dest
            src = server_weights if isinstance(server_weights, TensorDictBase) else TensorDict(dict(server_weights)).unflatten_keys(".")
            dest.data.update_(src)
            return None
        return self._pull()

    def _maybe_map_weights(self, server_weights: Any) -> Any:
        return _as_weights(server_weights)

    def stats(self) -> dict[str, Any]:
        """The subscriber's counters (see :meth:`redisbus.WeightSubscriber.stats`)."""
        return {} if self._subscriber is None else self._subscriber.stats()

    def close(self) -> None:
        """Stop the listener and release the connection (idempotent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._subscriber is not None:
            self._subscriber.close()
            self._subscriber = None

    def __enter__(self) -> RedisLocalWeightUpdater:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if HAS_TORCHRL and "torchrl.collectors.weight_update" in sys.modules:
    _register_with_torchrl()  # already imported by the user: registering raises no new warning


# --------------------------------------------------------------------------------------------
# current API: WeightSyncScheme
# --------------------------------------------------------------------------------------------

if HAS_TORCHRL:

    class _RedisTransport:
        """TorchRL transport (send/receive and initial-sync protocols) over the bus; one per scheme."""

        def __init__(self, scheme: RedisWeightSyncScheme) -> None:
            self._scheme_ref = weakref.ref(scheme)

        def _scheme(self) -> RedisWeightSyncScheme:
            scheme = self._scheme_ref()
            if scheme is None:
                raise RuntimeError("the RedisWeightSyncScheme of this transport is gone")
            return scheme

        def send_weights(self, weights: Any) -> None:
            self._scheme()._publish(weights)

        def receive_weights(
            self, timeout: float | None = None, *, weights: Any = None, model: Any = None, strategy: Any = None
        ) -> Any:
            scheme = self._scheme()
            return None if scheme._apply_newest(timeout=timeout) is None else scheme._target

        def setup_connection_and_weights_on_sender(self) -> None:
            pass

        def setup_connection_and_weights_on_receiver(
            self, *, worker_idx: int | None = None, weights: Any = None, model: Any = None, strategy: Any = None
        ) -> Any:
            return None

    class RedisWeightSyncScheme(_TorchRLWeightSyncScheme):
        """A TorchRL ``WeightSyncScheme`` whose transport is the redisbus.

        Trainer without a collector::

            scheme = RedisWeightSyncScheme("redis://bus:6379/0", namespace="ppo-run-7")
            scheme.init_on_sender(model=policy)
            scheme.connect()              # publishes the current weights
            ...; optim.step(); v = scheme.send()   # one new version; returns its number

        Collector on another host::

            Collector(env, policy, ..., track_policy_version=True,
                      weight_recv_schemes={"policy": RedisWeightSyncScheme(url, namespace=...)})

        Local worker processes::

            MultiSyncCollector([make_env] * 4, policy, ...,
                               weight_sync_schemes={"policy": RedisWeightSyncScheme(url, namespace=...)})

        A receiver applies the newest version at the collector's safe point (the
        top of each rollout, before any env or policy step), never mid-rollout
        unless ``apply="immediate"``; its batches carry the trainer's version
        number in ``("next", "policy_version")`` when ``track_policy_version=True``.
        ``Collector.shutdown()`` does not shut receiver schemes down: call
        :meth:`shutdown` (garbage collection does it otherwise).

        Args:
            url: a Redis URL or a :class:`~redisbus.BusConfig` (None:
                ``REDISBUS_URL``). No live client: the scheme is pickled into worker processes.

        Keyword Args:
            namespace: the bus namespace.
            apply: ``"on_sync"`` (default) or ``"immediate"`` (apply as soon as a
                version is verified, mid-rollout included).
            fresh: at each safe point read ``latest`` and wait up to ``timeout``
                for it, so a version committed before the batch starts is used by
                that batch (default). False: apply only what is already staged
                (no Redis read on the collector's thread; may lag one batch).
            timeout: seconds a safe point waits for a version (``fresh``); on
                timeout or a lost Redis the batch runs on the weights it has.
            connect_timeout: seconds a receiver whose policy has no weights yet
                (``MultiSyncCollector`` sends meta copies) waits at connect for a first version.
            publish_on_connect: the sender publishes its current weights at ``connect()`` (default).
            read_only: never publish. For a ``MultiSyncCollector`` on a host that
                follows a trainer elsewhere: its worker processes follow the bus
                directly, and ``update_policy_weights_()`` / :meth:`send` raise.
            worker_id: the name reported to the bus (default ``host:pid:<model_id>:<worker_idx>``;
                inside a multi-process collector, ``<worker_id>:<worker_idx>``).
            metadata: a dict stored with every version this sender publishes.
            strategy: TorchRL's weight strategy (``"tensordict"`` or ``"state_dict"``).
            **settings: any other :class:`~redisbus.BusConfig` field.

        Raises (at ``connect()``, i.e. in the collector's constructor, or at a safe point):
            SchemaMismatchError: the newest version does not fit the local policy
                (other refusals: ``CorruptBlobError``, ``SignatureError``, ...); the
                policy's weights are unchanged.
        """

        #: Attributes that hold live state (connections, threads, hooks, tensors): never pickled.
        _RUNTIME = (
            "_publisher",
            "_subscriber",
            "_target",
            "_hook",
            "_weights",
            "_sender_model",
            "_shared_transport",
            "_receiver_transport",
            "_sender_transports",
        )

        def __init__(
            self,
            url: str | BusConfig | None = None,
            *,
            namespace: str | None = None,
            apply: str = "on_sync",
            fresh: bool = True,
            timeout: float = 10.0,
            connect_timeout: float = 60.0,
            publish_on_connect: bool = True,
            read_only: bool = False,
            worker_id: str | None = None,
            metadata: Mapping[str, Any] | None = None,
            strategy: str = "tensordict",
            **settings: Any,
        ) -> None:
            super().__init__(strategy=strategy)
            if apply not in _APPLY_MODES:
                raise ConfigError(f"apply must be 'on_sync' or 'immediate', not {apply!r}")
            self.bus_config = _bus_config(url, namespace, settings)  # picklable; no connection
            self.apply_mode = apply
            self.fresh = fresh
            self.timeout = timeout
            self.connect_timeout = connect_timeout
            self.publish_on_connect = publish_on_connect
            self.read_only = read_only
            self.worker_id = worker_id
            self.metadata = dict(metadata) if metadata else None
            self._publisher: WeightPublisher | None = None
            self._subscriber: WeightSubscriber | None = None
            self._target: Any = None
            self._sender_model: Any = None
            self._hook: _PreCollectHook | None = None
            self._freshness = _Freshness()
            self.last_version: int | None = None

        def __repr__(self) -> str:
            side = "sender" if self.initialized_on_sender else "receiver" if self.initialized_on_receiver else "unbound"
            return (
                f"RedisWeightSyncScheme({self.bus_config.redacted_url()!r}, namespace={self.bus_config.namespace!r}, "
                f"{side}, version={self.version})"
            )

        # -- pickling: never carry a live connection -----------------------------------------

        def __getstate__(self) -> dict[str, Any]:
            state = super().__getstate__()
            for name in self._RUNTIME:
                state[name] = None
            state["_freshness"] = _Freshness()
            return state

        # -- TorchRL hooks -------------------------------------------------------------------

        def create_transport(self, **kwargs: Any) -> _RedisTransport:
            return _RedisTransport(self)

        def _init_on_sender_impl(
            self, *, model_id: str = "policy", context: Any = None, model: Any = None, weights: Any = None, **kwargs: Any
        ) -> None:
            # kwargs may carry ctx= (MultiCollector), devices=, params_map=, ...: the bus needs none of them
            self.model_id = model_id
            self.context = context
            if model is not None:
                self.model = model
                self._sender_model = model  # TorchRL keeps a weak reference: `init_on_sender(model=make_policy())` must work
            if weights is not None:
                self._weights = weights

        def _init_on_receiver_impl(
            self, *, model_id: str, context: Any = None, model: Any = None, worker_idx: int | None = None, **kwargs: Any
        ) -> None:
            self.model_id = model_id
            if model is None and context is not None and hasattr(context, "get_model"):
                model = context.get_model(model_id)
            if model is not None:
                self.model = model
            if worker_idx is not None:
                self.worker_idx = worker_idx
            self.context = context  # installs the safe-point hook on a leaf Collector

        def _setup_connection_and_weights_on_sender_impl(self, *, worker_idx: int | None = None, weights: Any = None) -> None:
            self._shared_transport = self.create_transport()
            if self.read_only:
                return  # the worker processes (receivers) follow the bus on their own
            self._publisher = WeightPublisher(self.bus_config)
            if self.publish_on_connect:
                w = self._resolve_sender_weights(weights)
                if w is not None:
                    self._publish(w)

        def _setup_connection_and_weights_on_receiver_impl(self, *, worker_idx: int | None = None) -> None:
            if worker_idx is not None:
                self._worker_idx = worker_idx
            model = self.model
            if model is None:
                raise RuntimeError(f"RedisWeightSyncScheme: no model {self.model_id!r} to receive into")
            had_no_weights = isinstance(model, nn.Module) and _materialize_meta(model)
            if self.worker_id is None:
                index = self._worker_idx if self._worker_idx is not None else 0
                wid = _default_worker_id(f"{self.model_id}:{index}")
            else:  # one scheme pickled into several worker processes: one id each
                wid = self.worker_id if self._worker_idx is None else f"{self.worker_id}:{self._worker_idx}"
            sub = WeightSubscriber(self.bus_config, target=model, worker_id=wid, apply=self.apply_mode)
            sub.start()
            try:
                self._initial_sync(sub, wait_for_first=had_no_weights)
            except BaseException:
                sub.close()
                raise
            self._target = model
            self._subscriber = sub
            self._shared_transport = self.create_transport()
            # no cascade yet: an intermediate collector's own senders connect later, from its (updated) policy
            self._after_apply(sub.version, cascade=False)

        def _initial_sync(self, sub: WeightSubscriber, *, wait_for_first: bool) -> None:
            """Apply the newest published version; a policy without weights waits for a first one."""
            deadline = time.monotonic() + (self.connect_timeout if wait_for_first else 0.0)
            wanted = sub.wanted_version()
            while wanted is None and time.monotonic() < deadline:
                time.sleep(0.05)
                wanted = sub.wanted_version()
            if wanted is None:
                if wait_for_first:
                    raise TimeoutError(
                        f"no version was published on namespace {self.bus_config.namespace!r} within "
                        f"{self.connect_timeout}s, and the policy has no weights of its own"
                    )
                return  # nothing published yet: start from the policy's own weights
            sub.wait_for_version(wanted, timeout=max(self.timeout, 1.0))

        # The context setter installs the safe-point hook once a collector is known
        # (MultiCollector workers set it late, in register_scheme_receiver).
        def _get_context(self) -> Any:
            return _TorchRLWeightSyncScheme.context.fget(self)

        def _set_context(self, context: Any) -> None:
            _TorchRLWeightSyncScheme.context.fset(self, context)
            hook = getattr(self, "_hook", None)
            if hook is not None:
                hook.remove()
                self._hook = None
            if not _is_leaf_collector(context):
                return
            if self.initialized_on_receiver:
                self._hook = _PreCollectHook(context, self._at_safe_point)
                _set_collector_version(context, self.last_version)
            elif self.initialized_on_sender and getattr(context, "policy_version_tracker", None) is not None:
                # A trainer-side Collector adds a local +1 after send() (Collector.update_policy_weights_):
                # re-assert the bus version at its next safe point.
                self._hook = _PreCollectHook(context, lambda: _set_collector_version(self.context, self.last_version))

        context = property(_get_context, _set_context)

        def _get_model(self) -> Any:
            return _TorchRLWeightSyncScheme.model.fget(self)

        def _set_model(self, model: Any) -> None:
            ref = getattr(self, "_model_ref", None)
            old = ref() if ref is not None else None
            _TorchRLWeightSyncScheme.model.fset(self, model)
            if getattr(self, "_subscriber", None) is not None and model is not None and model is not old:
                # TorchRL's mp runner swaps in the collector's own copy of the policy after connect
                self._retarget(model)

        model = property(_get_model, _set_model)

        def _retarget(self, model: Any) -> None:
            old_sub = self._subscriber
            assert old_sub is not None
            if self._target is not None and _same_storage(self._target, model):
                self._target = model
                return
            version = old_sub.version
            wid = old_sub.worker_id
            old_sub.close()
            if version is not None:  # carry the applied weights over, then follow the bus
                dst = TensorDict.from_module(model) if isinstance(model, nn.Module) else model
                src = TensorDict.from_module(self._target) if isinstance(self._target, nn.Module) else self._target
                dst.data.update_(src.data)
            sub = WeightSubscriber(self.bus_config, target=model, worker_id=wid, apply=self.apply_mode)
            sub.start()
            self._target = model
            self._subscriber = sub
            if version is not None:
                sub.wait_for_version(version, timeout=max(self.timeout, 1.0))

        # -- sender --------------------------------------------------------------------------

        def _resolve_sender_weights(self, weights: Any) -> Any:
            if weights is None:
                weights = getattr(self, "_weights", None)
            if weights is None:
                try:
                    weights = self.model  # model= given to init_on_sender, or the context's policy
                except (AttributeError, KeyError, ValueError):
                    weights = None
            if weights is None and self.context is not None:
                weights = getattr(self.context, "_fallback_policy", None)
            return _as_weights(weights)

        def prepare_weights(self, weights: Any, model_id: str, strategy: Any, context: Any = None) -> Any:
            return self._resolve_sender_weights(weights)

        def _publish(self, weights: Any) -> int:
            if self._publisher is None:
                raise RuntimeError("RedisWeightSyncScheme: call connect() before sending weights")
            version = self._publisher.publish(weights, metadata=self.metadata)
            assert isinstance(version, int)
            self.last_version = version
            _set_collector_version(self.context, version)  # the sender's own tracker (MultiCollector.policy_version)
            return version

        def send(self, weights: Any = None, worker_ids: int | list[int] | None = None) -> int:  # type: ignore[override]
            """Publish ONE new version (the bus broadcasts: ``worker_ids`` is ignored) and return its number.

            ``weights`` defaults to the model given to ``init_on_sender`` (or the collector's policy).
            """
            if not self.initialized_on_sender:
                raise RuntimeError("Must be initialized on sender before sending weights")
            if not self.synchronized_on_sender:
                raise RuntimeError("Must be synchronized on sender before sending weights (call connect())")
            if self.read_only:
                raise RuntimeError(
                    "this RedisWeightSyncScheme is read_only: its workers follow the bus; publish from the trainer"
                )
            w = self._resolve_sender_weights(weights)
            if w is None:
                raise ValueError("no weights to send: pass weights, or init_on_sender(model=...)")
            return self._publish(w)

        # -- receiver ------------------------------------------------------------------------

        def _after_apply(self, version: int | None, *, cascade: bool = True) -> None:
            if version is None:
                return
            self.last_version = version
            ctx = self.context
            _set_collector_version(ctx, version)
            # an intermediate node (a collector that also sends to its own workers): pass the weights on
            if cascade and ctx is not None and getattr(ctx, "_weight_sync_schemes", None):
                ctx.update_policy_weights_(model_id=self.model_id or "policy", policy_or_weights=self._target)

        def _apply_newest(self, timeout: float | None = None) -> int | None:
            sub = self._subscriber
            if sub is None:
                return None
            if self.fresh or timeout:
                applied = _catch_up(sub, timeout=timeout or self.timeout, strict=False, freshness=self._freshness)
            else:
                applied = sub.sync()
            self._after_apply(applied)
            return applied

        def _at_safe_point(self) -> None:
            if self.apply_mode == "immediate":
                sub = self._subscriber
                if sub is not None and sub.version != self.last_version:
                    self._after_apply(sub.version)  # applied mid-rollout already: tag the batch
                return
            self._apply_newest()

        def receive(self, timeout: float | None = None) -> Any:
            """Apply the newest version now (what ``collector.receive_weights()`` calls).

            Returns:
                The updated model when a version was applied, else None.
            """
            if not self.initialized_on_receiver:
                raise RuntimeError("Must be initialized on receiver before receiving weights")
            if not self.synchronized_on_receiver:
                raise RuntimeError("Must be synchronized on receiver before receiving weights (call connect())")
            return None if self._apply_newest(timeout=timeout) is None else self._target

        @property
        def version(self) -> int | None:
            """The version applied (receiver) or last published (sender)."""
            sub = getattr(self, "_subscriber", None)
            if sub is not None:
                return sub.version
            return getattr(self, "last_version", None)

        def stats(self) -> dict[str, Any]:
            """A receiver's subscriber counters (see :meth:`redisbus.WeightSubscriber.stats`); {} otherwise."""
            sub = getattr(self, "_subscriber", None)
            return {} if sub is None else sub.stats()

        def shutdown(self) -> None:
            """Remove the safe-point hook, stop the listener, close the connections (idempotent)."""
            hook = getattr(self, "_hook", None)
            if hook is not None:
                hook.remove()
                self._hook = None
            self._sender_model = None
            for name in ("_subscriber", "_publisher"):
                obj = getattr(self, name, None)
                if obj is not None:
                    setattr(self, name, None)
                    obj.close()
            super().shutdown()

else:

    class RedisWeightSyncScheme:  # type: ignore[no-redef]
        """Placeholder: TorchRL is not installed."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError("RedisWeightSyncScheme needs torchrl>=0.11: pip install 'redisbus[torchrl]'")
