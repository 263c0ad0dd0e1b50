"""The bus on TorchRL's legacy updater API: the trainer's and the worker's ``WeightUpdaterBase``."""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from tensordict import TensorDictBase
from torch import nn

from .. import defaults
from ..publisher import WeightPublisher
from ..registry import list_workers
from ..subscriber import WeightSubscriber
from ..transport import RedisSource
from ._common import (
    Freshness,
    PreCollectHook,
    as_tensordict,
    as_weights,
    catch_up,
    check_apply_mode,
    copy_weights,
    default_worker_id,
    keep_bus_version,
    same_storage,
    set_collector_version,
)
from ._updater_base import WeightUpdaterBase

if TYPE_CHECKING:
    from typing_extensions import Self


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


class _BusUpdater(WeightUpdaterBase):
    """What both bus updaters share: weights as TensorDicts, the bus version in a Collector's batches, ``with``."""

    _hook: PreCollectHook | None = None

    @abc.abstractmethod
    def _bus_version(self) -> int | None:
        """The version a registered Collector's batches must carry."""

    def _maybe_map_weights(self, server_weights: Any) -> Any:
        """Modules become TensorDicts of their parameters and buffers; None stays None."""
        return as_weights(server_weights)

    def _on_register(self, collector: Any) -> None:
        self._hook = keep_bus_version(collector, self._bus_version)

    def close(self) -> None:
        """Take the hook off the collector; subclasses release the bus too (idempotent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisWeightUpdater(_BusUpdater):
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

    def _bus_version(self) -> int | None:
        return self.last_version

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

    def _targets(self, worker_ids: Any) -> list[Any] | None:
        if worker_ids is None and not self.wait_for_workers:
            return None  # listing the workers is a Redis read: only done to wait for them
        return super()._targets(worker_ids) or None  # nobody left to wait for: still one publish

    def _push_weights(self, *, policy_or_weights: Any = None, worker_ids: Any = None) -> int:
        self._call_version = None
        try:
            targets = self._targets(worker_ids)
            server_weights = self._server_weights(policy_or_weights)
            version: int = self._sync_targets(targets, server_weights)
            self._update_local_copies(server_weights)
            if self.wait_for_workers and targets:
                self._wait_for(targets, version, self.wait_for_workers)
            set_collector_version(self.collector, version)
            return version
        finally:
            self._call_version = None

    def _update_local_copies(self, weights: Any) -> None:
        """TorchRL's ``policy_weights`` semantics: the per-device copies follow, in place."""
        if weights is None or not isinstance(self.policy_weights, Mapping) or isinstance(self.policy_weights, TensorDictBase):
            return
        src = as_tensordict(weights)
        for dest in self.policy_weights.values():
            if isinstance(dest, (nn.Module, TensorDictBase)) and not same_storage(dest, src):
                copy_weights(dest, src)

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

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Finish a pending upload and release the connections (idempotent)."""
        super().close()
        self._publisher.close()
        if self._registry_client is not None:
            self._registry_client.close()
            self._registry_client = None


class RedisLocalWeightUpdater(_BusUpdater):
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

    Example:
        >>> local = RedisLocalWeightUpdater(url="redis://bus:6379/0", namespace="ppo")  # doctest: +SKIP
        >>> collector = Collector(env, policy, weight_updater=local, ...)  # doctest: +SKIP
        >>> collector.update_policy_weights_()  # applies the newest version  # doctest: +SKIP
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
        check_apply_mode(apply)
        self._source = url
        self._namespace = namespace
        self._settings = settings
        self.worker_id = worker_id or default_worker_id()
        self.apply = apply
        self.fresh = fresh
        self.timeout = timeout
        self.initial_sync = initial_sync
        self._subscriber: WeightSubscriber | None = None
        self._freshness = Freshness()
        self.policy_weights: Any = None
        if policy_weights is not None:
            self._start(_first_weights(policy_weights))

    def __repr__(self) -> str:
        return f"RedisLocalWeightUpdater(worker_id={self.worker_id!r}, version={self.version})"

    @property
    def version(self) -> int | None:
        """The version applied to the local weights, or None."""
        return None if self._subscriber is None else self._subscriber.version

    def _bus_version(self) -> int | None:
        return self.version

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
                catch_up(sub, timeout=self.timeout, strict=True)
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
        set_collector_version(collector, self.version)
        super()._on_register(collector)

    def _pull(self) -> int | None:
        sub = self._subscriber
        if sub is None:
            raise RuntimeError("RedisLocalWeightUpdater has no target yet: pass policy_weights or register a collector")
        if self.fresh:
            return catch_up(sub, timeout=self.timeout, strict=False, freshness=self._freshness)
        return sub.sync()

    def _sync_weights_with_worker(self, *, worker_id: Any = None, server_weights: Any) -> int | None:
        """Pull and apply the newest version; explicit weights are copied in place instead (no bus)."""
        if server_weights is not None:
            if self.policy_weights is None:
                raise RuntimeError("no local weights to update: pass policy_weights or register a collector")
            copy_weights(self.policy_weights, server_weights)
            return None
        return self._pull()

    def stats(self) -> dict[str, Any]:
        """The subscriber's counters (see :meth:`redisbus.WeightSubscriber.stats`)."""
        return {} if self._subscriber is None else self._subscriber.stats()

    def close(self) -> None:
        """Stop the listener and release the connection (idempotent)."""
        super().close()
        if self._subscriber is not None:
            self._subscriber.close()
            self._subscriber = None
