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
  without torchrl installed and never trigger TorchRL's deprecation warnings
  at import (TorchRL still warns, as it should, when a ``Collector`` is given
  a ``weight_updater``).

``import redisbus`` never imports this package, nor torchrl.
"""

from __future__ import annotations

from typing import Any

from ._common import HAS_TORCHRL
from ._updater_base import WeightUpdaterBase
from ._updaters import RedisLocalWeightUpdater, RedisWeightUpdater

if HAS_TORCHRL:
    from ._scheme import RedisWeightSyncScheme
else:

    class RedisWeightSyncScheme:  # type: ignore[no-redef]
        """Placeholder: TorchRL is not installed."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError("RedisWeightSyncScheme needs torchrl>=0.11: pip install 'redisbus[torchrl]'")


__all__ = [
    "HAS_TORCHRL",
    "RedisLocalWeightUpdater",
    "RedisWeightSyncScheme",
    "RedisWeightUpdater",
    "WeightUpdaterBase",
]
