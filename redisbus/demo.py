"""The main job: a trainer and worker processes exchanging weights over the bus.

``redisbus demo`` (or ``python -m redisbus.demo``) publishes a few versions of a
small policy and prints, per version, when each worker applied it. With no
URL it runs on an embedded real Redis which it stops again at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import queue
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import torch
from tensordict import TensorDict

from .publisher import WeightPublisher
from .subscriber import WeightSubscriber

__all__ = ["run_demo", "make_policy", "weights_digest"]


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


if __name__ == "__main__":
    sys.exit(run_demo())
