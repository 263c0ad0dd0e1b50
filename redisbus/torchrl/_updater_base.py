"""TorchRL's legacy weight-updater surface (``WeightUpdaterBase``), usable without torchrl.

The names and signatures are TorchRL's (``RemoteWeightUpdaterBase`` /
``MultiProcessedRemoteWeightUpdate``, spring 2025). With torchrl installed the
class passes ``isinstance(x, torchrl.collectors.WeightUpdaterBase)`` through
ABC virtual registration, done when the first updater is created, so that
importing this module never triggers TorchRL's deprecation warnings.
"""

from __future__ import annotations

import abc
import functools
import sys
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ._common import HAS_TORCHRL

if TYPE_CHECKING:
    from typing_extensions import Self


@functools.cache
def _register_with_torchrl() -> None:
    """Make our updaters ``isinstance(x, torchrl.collectors.WeightUpdaterBase)`` (ABC registration).

    TorchRL's ``WeightUpdaterBase.__init_subclass__`` warns on every real
    subclass, and importing ``torchrl.collectors`` warns once for each of
    TorchRL's own subclasses, so this module neither subclasses it nor imports
    it at import time. Called when the first updater is created (by then the
    user has imported ``torchrl.collectors`` to build a Collector), or at import
    when ``torchrl.collectors.weight_update`` is already loaded. Registering
    twice (two threads at once) is harmless.
    """
    if not HAS_TORCHRL:
        return
    try:
        from torchrl.collectors.weight_update import WeightUpdaterBase as TorchRLWeightUpdaterBase
    except ImportError:  # a torchrl without the legacy API: our own base is enough
        return
    TorchRLWeightUpdaterBase.register(WeightUpdaterBase)


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

    Example:
        >>> class Printer(WeightUpdaterBase):
        ...     def _sync_weights_with_worker(self, *, worker_id=None, server_weights):
        ...         print(worker_id, server_weights)
        >>> Printer()({"w": 1}, worker_ids=[0, 1])
        0 {'w': 1}
        1 {'w': 1}
    """

    _collector_ref: weakref.ReferenceType[Any] | None = None
    _post_hooks: list[Callable[[], Any]] | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        _register_with_torchrl()
        return super().__new__(cls)

    # -- collector registration -------------------------------------------------------------

    @classmethod
    def from_policy(cls, policy: Any) -> WeightUpdaterBase | None:  # noqa: ARG003 - TorchRL's signature
        """TorchRL's optional factory hook; not used."""
        return None

    def register_collector(self, collector: Any) -> None:
        """Register the collector this updater serves (a Collector does it once, when given the updater).

        Raises:
            RuntimeError: a collector was registered already, this one included: a
                second registration is refused; create one updater per collector.
        """
        if self._collector_ref is not None:
            current = self._collector_ref()
            held = "a collector that is gone" if current is None else f"{type(current).__name__} at 0x{id(current):x}"
            raise RuntimeError(
                f"{type(self).__name__} is already registered with {held}; create one updater per collector"
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

    def _targets(self, worker_ids: Any) -> list[Any] | None:
        """The workers named, else :meth:`all_worker_ids`, less the skipped; None: the one anonymous target."""
        ids = self._normalize_worker_ids(worker_ids)
        if ids is None:
            ids = self.all_worker_ids()
        return None if ids is None else [w for w in ids if not self._skip_update(w)]

    def _server_weights(self, policy_or_weights: Any) -> Any:
        """The weights given, else the server's; then mapped."""
        return self._maybe_map_weights(self._get_server_weights() if policy_or_weights is None else policy_or_weights)

    def _sync_targets(self, targets: list[Any] | None, server_weights: Any) -> Any:
        if targets is None:
            return self._sync_weights_with_worker(worker_id=None, server_weights=server_weights)
        result = None
        for worker_id in targets:
            result = self._sync_weights_with_worker(worker_id=worker_id, server_weights=server_weights)
        return result

    def _push_weights(self, *, policy_or_weights: Any = None, worker_ids: Any = None) -> Any:
        server_weights = self._server_weights(policy_or_weights)
        return self._sync_targets(self._targets(worker_ids), server_weights)

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


if HAS_TORCHRL and "torchrl.collectors.weight_update" in sys.modules:
    _register_with_torchrl()  # already imported by the user: registering raises no new warning
