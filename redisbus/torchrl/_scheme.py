"""The bus on TorchRL's current API: :class:`RedisWeightSyncScheme`, a real ``WeightSyncScheme``.

Imported only where torchrl is installed.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from tensordict import TensorDict
from torch import nn
from torchrl.weight_update.weight_sync_schemes import WeightSyncScheme

from ..config import BusConfig
from ..errors import ConfigError
from ..publisher import WeightPublisher
from ..subscriber import WeightSubscriber
from ._common import (
    Freshness,
    PreCollectHook,
    as_weights,
    catch_up,
    check_apply_mode,
    copy_weights,
    default_worker_id,
    is_leaf_collector,
    keep_bus_version,
    same_storage,
    set_collector_version,
)


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
        return self._scheme()._receive_now(timeout)

    def setup_connection_and_weights_on_sender(self) -> None:
        pass

    def setup_connection_and_weights_on_receiver(
        self, *, worker_idx: int | None = None, weights: Any = None, model: Any = None, strategy: Any = None
    ) -> Any:
        return None


class RedisWeightSyncScheme(WeightSyncScheme):
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
        check_apply_mode(apply)
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
        self._hook: PreCollectHook | None = None
        self._freshness = Freshness()
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
        state["_freshness"] = Freshness()
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
            wid = default_worker_id(f"{self.model_id}:{index}")
        else:  # one scheme pickled into several worker processes: one id each
            wid = self.worker_id if self._worker_idx is None else f"{self.worker_id}:{self._worker_idx}"
        sub = self._subscribe(model, wid)
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
    @WeightSyncScheme.context.setter
    def context(self, context: Any) -> None:
        WeightSyncScheme.context.fset(self, context)
        self._remove_hook()
        if not is_leaf_collector(context):
            return
        if self.initialized_on_receiver:
            self._hook = PreCollectHook(context, self._at_safe_point)
            set_collector_version(context, self.last_version)
        elif self.initialized_on_sender:  # a trainer-side Collector
            self._hook = keep_bus_version(context, lambda: self.last_version)

    @WeightSyncScheme.model.setter
    def model(self, model: Any) -> None:
        ref = self._model_ref
        old = ref() if ref is not None else None
        WeightSyncScheme.model.fset(self, model)
        if self._subscriber is not None and model is not None and model is not old:
            # TorchRL's mp runner swaps in the collector's own copy of the policy after connect
            self._retarget(model)

    def _remove_hook(self) -> None:
        hook = getattr(self, "_hook", None)  # shutdown() runs from __del__, maybe on a half-built scheme
        if hook is not None:
            hook.remove()
            self._hook = None

    def _subscribe(self, model: Any, worker_id: str) -> WeightSubscriber:
        return WeightSubscriber(self.bus_config, target=model, worker_id=worker_id, apply=self.apply_mode).start()

    def _retarget(self, model: Any) -> None:
        old_sub = self._subscriber
        assert old_sub is not None
        if self._target is not None and same_storage(self._target, model):
            self._target = model
            return
        version = old_sub.version
        wid = old_sub.worker_id
        old_sub.close()
        if version is not None:  # carry the applied weights over, then follow the bus
            copy_weights(model, self._target)
        sub = self._subscribe(model, wid)
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
        return as_weights(weights)

    def prepare_weights(self, weights: Any, model_id: str, strategy: Any, context: Any = None) -> Any:
        return self._resolve_sender_weights(weights)

    def _publish(self, weights: Any) -> int:
        if self._publisher is None:
            raise RuntimeError("RedisWeightSyncScheme: call connect() before sending weights")
        version = self._publisher.publish(weights, metadata=self.metadata)
        assert isinstance(version, int)
        self.last_version = version
        set_collector_version(self.context, version)  # the sender's own tracker (MultiCollector.policy_version)
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
        set_collector_version(ctx, version)
        # an intermediate node (a collector that also sends to its own workers): pass the weights on
        if cascade and ctx is not None and getattr(ctx, "_weight_sync_schemes", None):
            ctx.update_policy_weights_(model_id=self.model_id or "policy", policy_or_weights=self._target)

    def _apply_newest(self, timeout: float | None = None) -> int | None:
        sub = self._subscriber
        if sub is None:
            return None
        if self.fresh or timeout:
            applied = catch_up(sub, timeout=timeout or self.timeout, strict=False, freshness=self._freshness)
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
        return self._receive_now(timeout)

    def _receive_now(self, timeout: float | None) -> Any:
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
        self._remove_hook()
        self._sender_model = None
        for name in ("_subscriber", "_publisher"):
            obj = getattr(self, name, None)
            if obj is not None:
                setattr(self, name, None)
                obj.close()
        super().shutdown()
