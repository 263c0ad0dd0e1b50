#!/usr/bin/env python
"""Soak test: one publisher and N worker processes while redis-server is killed and restarted at random.

usage: python scripts/soak.py [--workers N] [--versions V] [--interval S] [--size-mb M]
                              [--kill-min S] [--kill-max S] [--down-max S] [--poison-every K]
                              [--seed N] [--redis-server PATH] [--json] [--verbose]

It starts its own redis-server (no persistence, a free loopback port; never
6379), N worker processes (half apply from the listener, half at a sync point
of their own loop), and a trainer thread that publishes V versions of a
policy of about M MB, one every S seconds. Meanwhile a chaos thread SIGKILLs
the server every kill-min..kill-max seconds and restarts it, empty, on the
same port after up to down-max seconds. Every K-th version is poisoned (one
chunk overwritten between upload and commit, as a corrupting writer would):
every worker must refuse it.

At the end it checks, for every worker: it holds exactly the trainer's last
weights at the trainer's last version; every version it applied was, bit for
bit, weights the trainer published (nothing torn, nothing corrupt, nothing
poisoned); its versions only went forward. It prints the versions committed,
the restarts survived and the maximum lag (seconds from a version's commit to
the moment a worker held it or a newer one). Exit status 0 when every check
passed, 1 otherwise, 2 on a usage error.

Example (about two minutes on 2 cores):
    python scripts/soak.py --workers 3 --versions 300 --interval 0.2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NAMESPACE = "soak"
WORKER_SETTINGS = {
    "poll_interval": 0.5,
    "heartbeat_interval": 1.0,
    "socket_timeout": 2.0,
    "health_check_interval": 1.0,
    "backoff_cap": 0.5,
}


# --------------------------------------------------------------------------- redis-server


def _newest_redis_server(explicit: str | None) -> str:
    if explicit:
        found = shutil.which(explicit)
        if not found:
            raise SystemExit(f"error: redis-server {explicit!r} not found")
        return found
    candidates = {}
    for directory in os.get_exec_path():
        found = shutil.which("redis-server", path=directory)
        if found:
            candidates.setdefault(os.path.realpath(found), found)
    if not candidates:
        raise SystemExit("error: no redis-server on PATH (give --redis-server)")

    def version(binary: str) -> tuple[int, ...]:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"v=(\d+(?:\.\d+)*)", out)
        return tuple(int(p) for p in match.group(1).split(".")) if match else ()

    return max(candidates.values(), key=version)


def _free_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != 6379:
            return port


class Server:
    """A redis-server without persistence that can be SIGKILLed and restarted on the same port."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="redisbus-soak-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                   "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log")]
        deadline = time.monotonic() + 15
        while True:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break  # e.g. the port is still in TIME_WAIT after a kill: try again
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                        sock.sendall(b"PING\r\n")
                        if sock.recv(16).startswith(b"+PONG"):
                            return
                except OSError:
                    pass
                time.sleep(0.01)
            if time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- policy


def make_policy(step: int, size_mb: float, seed: int) -> Any:
    import torch
    from tensordict import TensorDict

    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    n = max(1, int(size_mb * 1024 * 1024 / 4))
    return TensorDict(
        {
            "actor": {"w": torch.randn(n, generator=g), "b": torch.randn(64, generator=g).to(torch.bfloat16)},
            "steps": torch.tensor([step], dtype=torch.int64),
        },
        batch_size=[],
    )


def digest(td: Any) -> str:
    import torch

    h = hashlib.blake2b(digest_size=16)
    for key in sorted(td.keys(True, True), key=str):
        h.update(td[key].reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- worker process


def worker_main(url: str, index: int, size_mb: float, seed: int, stop: Any, results: Any, verbose: bool) -> None:
    import logging

    from redisbus import WeightSubscriber

    logging.basicConfig(level=logging.INFO if verbose else logging.CRITICAL,
                        format=f"%(asctime)s worker {index} %(levelname)s %(message)s")

    target = make_policy(0, size_mb, seed).apply(lambda t: t.zero_())
    applies: list[tuple[int, str, float]] = []

    def record(version: int) -> None:
        applies.append((version, digest(target), time.time()))

    mode = "immediate" if index % 2 == 0 else "on_sync"
    sub = WeightSubscriber(url, namespace=NAMESPACE, target=target, worker_id=f"soak-{index}", apply=mode,
                           on_apply=record, **WORKER_SETTINGS)
    with sub:
        sub.start()
        results.put(("ready", index))
        while not stop.is_set():
            if mode == "on_sync":
                sub.sync()  # the worker's safe point, between two "rollouts"
            stop.wait(0.01)
        sub.sync()
        stats = sub.stats()
        results.put(("done", index, {
            "mode": mode,
            "version": sub.version,
            "digest": digest(target),
            "applies": applies,
            "failed_versions": stats["failed_versions"],
            "errors_by_type": stats["errors_by_type"],
            "reconnects": stats["reconnects"],
            "subscribes": stats["subscribes"],
        }))


# --------------------------------------------------------------------------- trainer and chaos


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.server = Server(_newest_redis_server(args.redis_server))
        self.committed: dict[int, tuple[str, float]] = {}  # version -> (weights digest, commit time)
        self.good_digests: set[str] = set()
        self.poisoned_versions: set[int] = set()
        self.poisoned_digests: set[str] = set()
        self.publish_failures = 0
        self.restarts = 0
        self.publishing = threading.Event()
        self.chaos_done = threading.Event()
        self.republished = 0
        self.last: tuple[int, str] | None = None

    def chaos(self) -> None:
        try:
            while self.publishing.is_set():
                time.sleep(self.rng.uniform(self.args.kill_min, self.args.kill_max))
                if not self.publishing.is_set():
                    break
                self.server.kill()
                time.sleep(self.rng.uniform(0.0, self.args.down_max))
                self.server.start()
                self.restarts += 1
        finally:
            self.chaos_done.set()

    def trainer(self) -> None:
        import redis

        import redisbus.publisher as publisher_module
        from redisbus import PublishError, WeightPublisher
        from redisbus.keys import KeySpace

        real_encode = publisher_module.encode_manifest
        poison_next = threading.Event()
        writer = redis.Redis.from_url(self.server.url, socket_timeout=2.0)  # the corrupting writer's own connection
        keys = KeySpace(NAMESPACE)

        def encode(manifest: Any) -> bytes:
            # Between upload and commit (the publisher encodes the manifest it commits once its chunks are sent),
            # a corrupting writer gets in: once the first chunk is stored whole, its first bytes are overwritten.
            if poison_next.is_set() and manifest.chunk_count:
                self.poisoned_versions.add(manifest.version)
                key, size = keys.chunk(manifest.version, 0), manifest.spans()[0][1]
                deadline = time.monotonic() + 5
                while writer.strlen(key) != size and time.monotonic() < deadline:
                    time.sleep(0.001)  # the chunks went out on the publisher's own connection just now
                writer.setrange(key, 0, b"\xa5" * 64)
            return real_encode(manifest)

        publisher_module.encode_manifest = encode
        with WeightPublisher(self.server.url, namespace=NAMESPACE, keep_versions=3, grace_seconds=5,
                             socket_timeout=2.0, backoff_cap=0.5) as pub:
            for step in range(1, self.args.versions + 1):
                poisoned = self.args.poison_every > 0 and step % self.args.poison_every == 0
                poisoned = poisoned and step != self.args.versions  # the last version is a good one
                policy = make_policy(step, self.args.size_mb, self.args.seed)
                weights = digest(policy)
                (self.poisoned_digests if poisoned else self.good_digests).add(weights)
                while True:
                    if poisoned:
                        poison_next.set()
                    try:
                        version = pub.publish(policy, metadata={"step": step})
                    except PublishError:
                        self.publish_failures += 1
                        time.sleep(0.1)
                        continue  # a trainer keeps its weights and tries again
                    except Exception:  # the poisoning itself met a dead server: try again
                        self.publish_failures += 1
                        time.sleep(0.1)
                        continue
                    finally:
                        poison_next.clear()
                    break
                if not poisoned:
                    self.committed[version] = (weights, time.time())
                    self.last = (version, weights)
                time.sleep(self.args.interval)
            self.publishing.clear()
            self.chaos_done.wait()
            # A kill just after the last publish takes that version with it (no persistence): publish the
            # last weights again, as a trainer does after an outage (same publisher: numbers keep rising).
            if self.last is not None and pub.latest_version() != self.last[0]:
                version = pub.publish(policy, metadata={"step": self.args.versions, "republished": True})
                self.committed[version] = (self.last[1], time.time())
                self.last = (version, self.last[1])
                self.republished += 1
        publisher_module.encode_manifest = real_encode
        writer.close()

    def run(self) -> dict[str, Any]:
        ctx = mp.get_context("spawn")
        stop, results = ctx.Event(), ctx.Queue()
        self.server.start()
        procs = [ctx.Process(target=worker_main, args=(self.server.url, i, self.args.size_mb, self.args.seed,
                                                        stop, results, self.args.verbose), daemon=True)
                 for i in range(self.args.workers)]
        for p in procs:
            p.start()
        try:
            for _ in procs:
                kind, _index = results.get(timeout=120)[:2]
                assert kind == "ready"
            started = time.monotonic()
            self.publishing.set()
            chaos = threading.Thread(target=self.chaos, daemon=True)
            chaos.start()
            self.trainer()
            self.publishing.clear()
            chaos.join()
            assert self.last is not None
            final_version = self.last[0]
            # let every worker reach the final version (they poll; Redis is up now)
            from redisbus import BusConfig
            from redisbus.keys import KeySpace
            from redisbus.registry import list_workers

            client = BusConfig.from_url(self.server.url).client()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    reports = {r.worker_id: r.version for r in list_workers(client, KeySpace(NAMESPACE))}
                except Exception:  # noqa: BLE001 - the server may still be starting
                    reports = {}
                if len(reports) == len(procs) and all(v == final_version for v in reports.values()):
                    break
                time.sleep(0.2)
            client.close()
            stop.set()
            workers = {}
            for _ in procs:
                kind, index, report = results.get(timeout=60)
                workers[index] = report
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
            self.server.close()
        return self.check(workers, elapsed)

    def check(self, workers: dict[int, dict[str, Any]], elapsed: float) -> dict[str, Any]:
        assert self.last is not None
        final_version, final_digest = self.last
        problems: list[str] = []
        max_lag = 0.0
        commits = sorted((v, t) for v, (_, t) in self.committed.items())
        for index, w in sorted(workers.items()):
            name = f"worker {index} ({w['mode']})"
            if w["version"] != final_version or w["digest"] != final_digest:
                problems.append(f"{name} ends on version {w['version']}, not the trainer's last ({final_version})")
            versions = [v for v, _, _ in w["applies"]]
            if versions != sorted(set(versions)):
                problems.append(f"{name} went back or applied a version twice: {versions}")
            for version, applied_digest, _ in w["applies"]:
                if version in self.poisoned_versions or applied_digest in self.poisoned_digests:
                    problems.append(f"{name} applied poisoned version {version}")
                elif applied_digest not in self.good_digests:
                    problems.append(f"{name} applied version {version} whose bytes the trainer never published")
                elif version in self.committed and self.committed[version][0] != applied_digest:
                    problems.append(f"{name} applied version {version} with another version's bytes")
            for version, committed_at in commits:
                held = [t for v, _, t in w["applies"] if v >= version]
                if held:
                    max_lag = max(max_lag, min(held) - committed_at)
                else:
                    problems.append(f"{name} never held version {version} or newer")
        return {
            "ok": not problems,
            "problems": problems,
            "versions_committed": len(self.committed),
            "final_version": final_version,
            "poisoned_versions": sorted(self.poisoned_versions),
            "publish_failures": self.publish_failures,
            "republished_after_loss": self.republished,
            "restarts": self.restarts,
            "max_lag_seconds": round(max_lag, 3),
            "elapsed_seconds": round(elapsed, 1),
            "workers": {
                index: {
                    "mode": w["mode"],
                    "applies": len(w["applies"]),
                    "refused_versions": w["failed_versions"],
                    "errors_by_type": w["errors_by_type"],
                    "reconnects": w["reconnects"],
                    "subscribes": w["subscribes"],
                }
                for index, w in sorted(workers.items())
            },
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/soak.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    parser.add_argument("--versions", type=int, default=300, help="versions the trainer publishes (default 300)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between publishes (default 0.2)")
    parser.add_argument("--size-mb", type=float, default=4.0, help="policy size in MB (default 4)")
    parser.add_argument("--kill-min", type=float, default=1.0, help="shortest time between kills, s (default 1)")
    parser.add_argument("--kill-max", type=float, default=4.0, help="longest time between kills, s (default 4)")
    parser.add_argument("--down-max", type=float, default=1.0, help="longest downtime per kill, s (default 1)")
    parser.add_argument("--poison-every", type=int, default=25, help="poison every K-th version; 0: never (default 25)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--redis-server", help="redis-server binary (default: the newest on PATH)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--verbose", action="store_true", help="show the workers' and the trainer's log")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.versions < 1 or args.interval < 0 or not 0 < args.kill_min <= args.kill_max:
        parser.error("need --workers >= 1, --versions >= 1, --interval >= 0 and 0 < --kill-min <= --kill-max")
    import logging

    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL,
                        format="%(asctime)s trainer %(levelname)s %(message)s")
    summary = Soak(args).run()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"versions committed  {summary['versions_committed']} good (last v{summary['final_version']}) "
              f"+ {len(summary['poisoned_versions'])} poisoned, which no worker applied")
        print(f"restarts survived   {summary['restarts']} (kill -9, empty restart); "
              f"{summary['publish_failures']} publish attempts failed and were retried")
        print(f"max lag             {summary['max_lag_seconds']:.3f} s (commit -> a worker holds it or newer)")
        print(f"elapsed             {summary['elapsed_seconds']} s")
        for index, w in summary["workers"].items():
            print(f"worker {index} ({w['mode']:9}) {w['applies']} applies, {w['reconnects']} reconnects, "
                  f"{w['subscribes']} subscribes, refused {w['refused_versions']}")
        print("OK: every worker holds the trainer's last weights; nothing torn, corrupt or poisoned was applied"
              if summary["ok"] else "FAILED:\n  " + "\n  ".join(summary["problems"]))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
