"""The main job: a trainer and worker processes exchanging weights over the bus.

``redisbus demo`` (or ``python -m redisbus.demo``) publishes a few versions of a
small policy and prints, per version, when each worker applied it. With no
URL it runs on an embedded real Redis which it stops again at the end.

The two roles also run on their own, one process each, as in a multi-host
deployment (``docker/compose.yaml``); both read ``REDISBUS_URL`` and
``REDISBUS_NAMESPACE``::

    python -m redisbus.demo trainer --interval 1        # publishes until stopped
    python -m redisbus.demo worker                      # applies every version it sees

The trainer prints ``published version V step S digest D``, each worker
``applied version V digest D``; equal digests mean bit-identical weights.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

import torch
from tensordict import TensorDict

from .errors import BusConnectionError, ConfigError, RedisBusError
from .publisher import WeightPublisher
from .subscriber import WeightSubscriber

__all__ = ["run_demo", "run_trainer", "run_worker", "make_policy", "weights_digest", "main"]


def make_policy(seed: int = 0) -> torch.nn.Module:
    """A small MLP policy (about 20 KB of float32 weights)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every tensor's bytes, in key order: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for key, value in sorted(TensorDict.from_module(module).items(include_nested=True, leaves_only=True), key=lambda kv: str(kv[0])):
        h.update(str(key).encode())
        h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _worker(url: str, namespace: str, worker_id: str, reports: Any, stop: Any) -> None:
    policy = make_policy(seed=12345)  # deliberately not the trainer's weights
    with WeightSubscriber(url, namespace=namespace, target=policy, worker_id=worker_id, poll_interval=0.5) as sub:
        sub.start()
        reports.put(("ready", worker_id, None, time.time(), None))
        while not stop.is_set():
            version = sub.sync()  # the safe point between two rollouts
            if version is not None:
                reports.put(("applied", worker_id, version, time.time(), weights_digest(policy)))
            time.sleep(0.002)


@contextlib.contextmanager
def _redis_url(url: str | None, out: TextIO) -> Iterator[str]:
    if url:
        yield url
        return
    from .embedded import EmbeddedRedis

    with EmbeddedRedis() as server:
        print(f"started an embedded redis-server ({server.binary}) at {server.url}", file=out)
        yield server.url
    print("stopped the embedded redis-server", file=out)


def run_demo(
    url: str | None = None,
    workers: int = 2,
    versions: int = 5,
    interval: float = 0.5,
    namespace: str = "demo",
    out: TextIO = sys.stdout,
) -> int:
    """Run a trainer and ``workers`` worker processes for ``versions`` publishes.

    Args:
        url: a Redis URL; None starts an embedded redis-server.
        workers: number of worker processes (spawned).
        versions: number of versions the trainer publishes.
        interval: seconds between publishes.
        namespace: bus namespace used.
        out: where the report goes.

    Returns:
        0 when every worker ended with the trainer's exact last weights, else 1.

    Raises:
        ConfigError: no URL given and no redis-server can be found.
    """
    ctx = mp.get_context("spawn")
    with _redis_url(url, out) as bus_url:
        reports = ctx.Queue()
        stop = ctx.Event()
        names = [f"worker-{i}" for i in range(workers)]
        procs = [ctx.Process(target=_worker, args=(bus_url, namespace, n, reports, stop), daemon=True) for n in names]
        for p in procs:
            p.start()
        applied: dict[int, dict[str, tuple[float, str]]] = {}
        ready: set[str] = set()

        def drain(timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    kind, worker_id, version, at, digest = reports.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    return
                if kind == "ready":
                    ready.add(worker_id)
                else:
                    applied.setdefault(version, {})[worker_id] = (at, digest)

        try:
            deadline = time.monotonic() + 60
            while len(ready) < workers and time.monotonic() < deadline and any(p.is_alive() for p in procs):
                drain(0.2)
            policy = make_policy(seed=0)
            published: dict[int, tuple[float, str]] = {}
            with WeightPublisher(bus_url, namespace=namespace, publisher_id="demo-trainer") as pub:
                print(f"trainer publishing {versions} versions to namespace {namespace!r} for {workers} workers", file=out)
                for step in range(versions):
                    with torch.no_grad():
                        for p in policy.parameters():
                            p.add_(torch.randn_like(p) * 0.01)  # stands in for an optimiser step
                    t0 = time.time()
                    version = pub.publish(policy, metadata={"step": step})
                    published[version] = (t0, weights_digest(policy))
                    drain(interval)
                last = max(published)
                deadline = time.monotonic() + 30
                while len(applied.get(last, {})) < workers and time.monotonic() < deadline:
                    drain(0.2)
        finally:
            stop.set()
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.terminate()
    return _report(published, applied, names, out)


def _report(published: dict[int, tuple[float, str]], applied: dict[int, dict[str, tuple[float, str]]],
            names: list[str], out: TextIO) -> int:
    print(f"{'version':>7}  " + "  ".join(f"{n:>16}" for n in names), file=out)
    for version, (t0, _) in sorted(published.items()):
        cells = []
        for n in names:
            got = applied.get(version, {}).get(n)
            cells.append(f"{(got[0] - t0) * 1000:>13.1f} ms" if got else f"{'skipped':>16}")
        print(f"{version:>7}  " + "  ".join(cells), file=out)
    last = max(published)
    want = published[last][1]
    ok = [n for n in names if applied.get(last, {}).get(n, (0, ""))[1] == want]
    print(f"{len(ok)}/{len(names)} workers hold the trainer's exact weights of version {last}", file=out)
    return 0 if len(ok) == len(names) else 1


def _stop_on_signals() -> threading.Event:
    """An event set by SIGTERM / SIGINT (``docker stop``, Ctrl-C), so a role ends cleanly."""
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    return stop


def _connect(make: Any, what: str, timeout: float, stop: threading.Event, out: TextIO) -> Any:
    """``make()`` until it stops failing with BusConnectionError (a cluster connects at once; it may still be forming)."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            return make()
        except BusConnectionError as exc:
            if time.monotonic() + delay > deadline or stop.is_set():
                raise
            print(f"{what}: waiting for Redis ({exc})", file=out, flush=True)
            stop.wait(delay)
            delay = min(delay * 2, 5.0)


def run_trainer(
    url: str | None = None,
    namespace: str | None = None,
    versions: int = 0,
    interval: float = 1.0,
    seed: int = 0,
    connect_timeout: float = 60.0,
    out: TextIO = sys.stdout,
    stop: threading.Event | None = None,
) -> int:
    """The trainer role alone: publish a new version of the demo policy every ``interval`` seconds.

    Args:
        url: Redis URL (``REDISBUS_URL`` when None); ``?cluster=true`` etc. work.
        namespace: bus namespace (``REDISBUS_NAMESPACE``, else ``demo``).
        versions: versions to publish; 0 publishes until SIGTERM / SIGINT.
        interval: seconds between publishes.
        seed: seed of the initial weights (the same seed gives the same digests).
        connect_timeout: how long to wait for Redis at start.
        out: where ``published version V step S digest D`` lines go.
        stop: an event that ends the loop (default: set by SIGTERM / SIGINT).

    Returns:
        0 when every publish succeeded (a failed publish is reported and retried at the next step), 1 otherwise.
    """
    stop = stop or _stop_on_signals()
    namespace = namespace or os.environ.get("REDISBUS_NAMESPACE") or "demo"
    policy = make_policy(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    failures = 0
    pub = _connect(lambda: WeightPublisher(url, namespace=namespace, publisher_id=f"demo-trainer:{os.getpid()}"),
                   "trainer", connect_timeout, stop, out)  # fmt: skip
    with pub:
        print(f"trainer publishing to {pub.config.redacted_url()} namespace {namespace!r} every {interval}s", file=out, flush=True)
        step = 0
        while not stop.is_set() and (versions <= 0 or step < versions):
            with torch.no_grad():
                for p in policy.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.01)  # stands in for an optimiser step
            try:
                version = pub.publish(policy, metadata={"step": step})
            except RedisBusError as exc:
                failures += 1
                print(f"trainer: publish of step {step} failed: {exc}", file=out, flush=True)
            else:
                print(f"published version {version} step {step} digest {weights_digest(policy)}", file=out, flush=True)
            step += 1
            stop.wait(interval)
    return 1 if failures else 0


def run_worker(
    url: str | None = None,
    namespace: str | None = None,
    worker_id: str | None = None,
    until_version: int | None = None,
    poll_interval: float = 0.5,
    connect_timeout: float = 60.0,
    out: TextIO = sys.stdout,
    stop: threading.Event | None = None,
) -> int:
    """The worker role alone: follow the bus and apply each new version at the safe point between two "rollouts".

    Args:
        url: Redis URL (``REDISBUS_URL`` when None).
        namespace: bus namespace (``REDISBUS_NAMESPACE``, else ``demo``).
        worker_id: how the worker reports itself (``REDISBUS_WORKER_ID``, else host:pid:random).
        until_version: exit 0 once a version >= this is applied; None runs until SIGTERM / SIGINT.
        poll_interval: seconds between reads of ``latest`` when no notice arrives.
        connect_timeout: how long to wait for Redis at start.
        out: where ``applied version V digest D`` lines go.
        stop: an event that ends the loop (default: set by SIGTERM / SIGINT).

    Returns:
        0 (stopped, or ``until_version`` reached); 1 if stopped before ``until_version``.
    """
    stop = stop or _stop_on_signals()
    namespace = namespace or os.environ.get("REDISBUS_NAMESPACE") or "demo"
    worker_id = worker_id or os.environ.get("REDISBUS_WORKER_ID") or None
    policy = make_policy(seed=12345)  # deliberately not the trainer's weights
    sub = _connect(lambda: WeightSubscriber(url, namespace=namespace, target=policy, worker_id=worker_id,
                                            poll_interval=poll_interval),
                   "worker", connect_timeout, stop, out)  # fmt: skip
    with sub:
        print(f"worker {sub.worker_id} following {sub.config.redacted_url()} namespace {namespace!r}", file=out, flush=True)
        sub.start()
        while not stop.is_set():
            version = sub.sync()  # the safe point between two rollouts
            if version is not None:
                print(f"applied version {version} digest {weights_digest(policy)}", file=out, flush=True)
                if until_version is not None and version >= until_version:
                    return 0
            stop.wait(0.02)  # a rollout
    return 1 if until_version is not None else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m redisbus.demo [all|trainer|worker] ...``: the whole demo, or one role of it."""
    parser = argparse.ArgumentParser(prog="python -m redisbus.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="Redis URL (default: $REDISBUS_URL; 'all' starts an embedded Redis)")
    parser.add_argument("--namespace", "-n", default=None, help="bus namespace (default: $REDISBUS_NAMESPACE, else 'demo')")
    roles = parser.add_subparsers(dest="role")
    both = roles.add_parser("all", help="a trainer and worker processes on one machine (the default)")
    both.add_argument("--workers", type=int, default=2)
    both.add_argument("--versions", type=int, default=5)
    both.add_argument("--interval", type=float, default=0.5)
    trainer = roles.add_parser("trainer", help="publish a new version every --interval seconds")
    trainer.add_argument("--versions", type=int, default=0, help="versions to publish (0: until stopped)")
    trainer.add_argument("--interval", type=float, default=1.0, help="seconds between publishes")
    trainer.add_argument("--seed", type=int, default=0)
    trainer.add_argument("--connect-timeout", type=float, default=60.0)
    worker = roles.add_parser("worker", help="apply every version the trainer publishes")
    worker.add_argument("--worker-id", default=None, help="report name (default: $REDISBUS_WORKER_ID, else host:pid)")
    worker.add_argument("--until-version", type=int, default=None, help="exit once this version is applied")
    worker.add_argument("--poll-interval", type=float, default=0.5)
    worker.add_argument("--connect-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    url = args.url or os.environ.get("REDISBUS_URL") or None
    try:
        if args.role == "trainer":
            return run_trainer(url, args.namespace, args.versions, args.interval, args.seed, args.connect_timeout)
        if args.role == "worker":
            return run_worker(url, args.namespace, args.worker_id, args.until_version, args.poll_interval,
                              args.connect_timeout)  # fmt: skip
        if args.role == "all":
            return run_demo(url, args.workers, args.versions, args.interval, args.namespace or "demo")
        return run_demo(url, namespace=args.namespace or "demo")
    except (ConfigError, BusConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 4


if __name__ == "__main__":
    sys.exit(main())
