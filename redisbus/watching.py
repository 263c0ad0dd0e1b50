"""Following a namespace live: one event per commit, worker apply, pin change or heartbeat lost.

The notify channel wakes the follower up (by ``SSUBSCRIBE`` on a Redis 7
cluster, where notices travel by ``SPUBLISH``); ``latest``, the pin and the worker
reports are also polled, so a lost notice only delays an event. Events are
plain dicts (``event``, ``time`` and the event's fields), ready for JSON.

>>> events = follow(admin, poll_interval=0.5, dead_after=30.0, timeout=60)  # doctest: +SKIP
>>> next(events)["event"]  # doctest: +SKIP
'version'
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .errors import ManifestError, VersionNotFoundError
from .records import WorkerStatus, json_ready
from .transport import read_manifest, translate_errors, uses_sharded_pubsub

if TYPE_CHECKING:
    from .busview import BusView

__all__ = ["follow"]


def follow(
    admin: BusView, *, poll_interval: float, dead_after: float, timeout: float | None, clock: Callable[[], float]
) -> Iterator[dict[str, Any]]:
    """Subscribe to ``admin``'s namespace now, and return the events from here on (see :meth:`~redisbus.busview.BusView.watch`).

    The starting point (latest, pin, worker reports) and the subscription are
    taken by this call, not at the first ``next()``, so nothing that happens
    in between is missed.

    Raises:
        BusConnectionError: Redis unreachable (now, or while following).
    """
    latest, pin = admin.head()
    known = {w.worker_id: w for w in admin.workers(dead_after)}
    # A Redis 7 cluster carries notices by SPUBLISH (as the publisher and the workers decide): SSUBSCRIBE there.
    sharded = uses_sharded_pubsub(admin.client)
    pubsub = admin.client.pubsub(ignore_subscribe_messages=True)
    with translate_errors("subscribing to notices", admin.client):
        (pubsub.ssubscribe if sharded else pubsub.subscribe)(admin.keys.notify)
    receive = pubsub.get_sharded_message if sharded else pubsub.get_message
    # everything above ran now; only the generator below waits for the caller's next()
    return _events(admin, pubsub, receive, latest or 0, pin, known, poll_interval, dead_after, timeout, clock)


def _events(
    admin: BusView,
    pubsub: Any,
    receive: Callable[..., Any],
    seen_version: int,
    pin: int | None,
    known: dict[str, WorkerStatus],
    poll_interval: float,
    dead_after: float,
    timeout: float | None,
    clock: Callable[[], float],
) -> Iterator[dict[str, Any]]:
    client, keys = admin.client, admin.keys
    deadline = None if timeout is None else clock() + timeout
    try:
        next_poll = 0.0
        while True:
            now = clock()
            if deadline is not None and now >= deadline:
                return
            wait = poll_interval if deadline is None else max(0.0, min(poll_interval, deadline - now))
            with translate_errors("waiting for notices", client):
                message = receive(timeout=wait)
            if message is None and clock() < next_poll:
                continue
            next_poll = clock() + poll_interval
            latest, new_pin = admin.head()
            if latest is not None and latest > seen_version:
                with translate_errors("listing new versions", client):
                    fresh = [int(v) for v in client.zrangebyscore(keys.versions, f"({seen_version}", "+inf")]
                for version in fresh:
                    yield _version_event(admin, version)
                seen_version = max([latest, *fresh])
            if new_pin != pin:
                yield {"event": "pin", "time": time.time(), "version": new_pin, "previous": pin}
                pin = new_pin
            for w in admin.workers(dead_after):
                before = known.get(w.worker_id)
                known[w.worker_id] = w
                base = {"time": time.time(), "worker": w.worker_id, "host": w.host, "pid": w.pid}
                if before is None and w.version is None:
                    yield {"event": "joined", **base}
                if w.version is not None and (before is None or before.version != w.version):
                    yield {"event": "applied", **base, "version": w.version, "previous": before.version if before else None, "lag": w.lag}
                if before is not None and w.dead != before.dead:
                    yield {"event": "dead" if w.dead else "alive", **base, "heartbeat_age": round(w.heartbeat_age, 3)}
    finally:
        with contextlib.suppress(Exception):  # the connection may already be gone
            pubsub.close()


def _version_event(admin: BusView, version: int) -> dict[str, Any]:
    """The ``version`` event of a committed version (with ``error`` instead of its details when unreadable)."""
    event: dict[str, Any] = {"event": "version", "time": time.time(), "version": version}
    try:
        m = read_manifest(admin.client, admin.keys, version, admin.config)[0]
    except (ManifestError, VersionNotFoundError) as exc:
        event["error"] = str(exc)
        return event
    event.update(
        total_bytes=m.total_bytes,
        tensors=len(m.tensors),
        created=m.created,
        publisher=json_ready(dict(m.publisher)),
        metadata=json_ready(dict(m.metadata)),
    )
    return event
