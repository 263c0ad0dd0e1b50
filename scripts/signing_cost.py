#!/usr/bin/env python
"""Measure what opt-in signing costs: publish and pull of one policy with and without a signing key.

usage: python scripts/signing_cost.py [--size-mb M] [--repeat N] [--url URL]

Without --url it starts its own redis-server (no persistence, a free loopback
port). Each round publishes the policy (snapshot, upload, commit) and has a
worker pull, verify and apply it (``sync()`` without a listener), first
unsigned, then signed (the publisher adds a BLAKE2b-256 digest per chunk and
an HMAC-SHA256 of the manifest; the worker checks both on top of the xxh3
checksums). Prints the median time and throughput of each, the overhead,
and the raw hashing speeds behind it.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/signing_cost.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=64.0, help="policy size in MB (default 64)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds per measurement; the median is kept (default 5)")
    parser.add_argument("--url", help="an existing Redis (default: start a throwaway redis-server)")
    args = parser.parse_args(argv)

    import torch
    import xxhash
    from tensordict import TensorDict

    from redisbus import WeightPublisher, WeightSubscriber
    from redisbus.embedded import EmbeddedRedis

    server = None
    url = args.url
    if url is None:
        server = EmbeddedRedis().start()
        url = server.url
    n = int(args.size_mb * 1024 * 1024 / 4)
    policy = TensorDict({"w": torch.randn(n), "b": torch.randn(64)}, [])
    target = policy.apply(torch.zeros_like)
    size = sum(t.numel() * t.element_size() for t in policy.values(True, True))
    key = b"k" * 32
    results = {}
    try:
        for label, settings in (("unsigned", {}), ("signed", {"signing_key": key})):
            namespace = f"signing-cost-{label}"
            with WeightPublisher(url, namespace=namespace, keep_versions=1, grace_seconds=0, **settings) as pub, \
                    WeightSubscriber(url, namespace=namespace, target=target, **settings) as sub:
                pub.publish(policy)  # warm-up: buffers, connections, scripts
                sub.sync()
                publish = _median_seconds(lambda: pub.publish(policy), args.repeat)

                def pull() -> None:
                    pub.publish(policy)
                    started = time.perf_counter()
                    assert sub.sync() is not None
                    pull.times.append(time.perf_counter() - started)

                pull.times = []
                for _ in range(args.repeat):
                    pull()
                results[label] = (publish, statistics.median(pull.times))
            assert torch.equal(target["w"], policy["w"])
    finally:
        if server is not None:
            server.stop()
    blob = memoryview(policy["w"].numpy()).cast("B")
    blake = _median_seconds(lambda: hashlib.blake2b(blob, digest_size=32).digest(), args.repeat)
    xxh = _median_seconds(lambda: xxhash.xxh3_64_intdigest(blob), args.repeat)
    mb = size / 1e6
    print(f"policy {mb:.1f} MB, median of {args.repeat} rounds, redis at {url.split('@')[-1]}")
    print(f"{'':10} {'publish':>18} {'pull + verify + apply':>24}")
    for label, (publish, pull_s) in results.items():
        print(f"{label:10} {publish * 1e3:8.1f} ms {mb / publish:5.0f} MB/s {pull_s * 1e3:12.1f} ms {mb / pull_s:5.0f} MB/s")
    (pu, su), (ps, ss) = results["unsigned"], results["signed"]
    print(f"{'overhead':10} {(ps - pu) * 1e3:+8.1f} ms {100 * (ps / pu - 1):+5.0f} %    "
          f"{(ss - su) * 1e3:+12.1f} ms {100 * (ss / su - 1):+5.0f} %")
    print(f"raw hashing: BLAKE2b-256 {len(blob) / blake / 1e6:.0f} MB/s, xxh3-64 {len(blob) / xxh / 1e6:.0f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
