#!/usr/bin/env python3
"""Small-policy latency of two source trees, measured in one run with their bursts interleaved.

usage: latency_ab.py [-h] [--subscribers N] [--policy {100K,1M}] [--rounds N] [--burst N]
                     [--json FILE] [--redis-server PATH] A=TREE B=TREE

On a shared machine the same code's latency moves by 2x from one minute to
the next (other tenants' load), so two trees measured one after the other
compare the minutes, not the trees. This script starts one private
``redis-server`` and, for each tree, a publisher process and --subscribers
worker processes that import that tree (``PYTHONPATH=TREE``); then it makes
the publishers take turns, --burst versions at a time for --rounds rounds
(the order alternates; a first round is warm-up), so both trees meet the same
conditions. Latency runs from the start of ``publish()`` to the worker's
``on_apply`` (``apply="immediate"``), both read from the host's one monotonic
clock, as in ``bench.py``'s latency section; the idle tree's processes only
wait meanwhile. Prints, per tree: p50/p99 over every worker and version, p50
of the last worker of each version, and the CPU each version costs the
publisher (including its stand-in training step) and each worker.

Example, the tree of a commit against the working tree::

    git worktree add /tmp/before HEAD~3
    python scripts/latency_ab.py before=/tmp/before after=.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _subscriber(url: str, ns: str, policy: str, idx: int) -> None:
    """A worker: applies every version at once, then prints ``version time cpu`` per apply when stdin closes."""
    import torch
    from tensordict import TensorDict

    import bench
    import redisbus
    from redisbus import WeightSubscriber

    torch.set_num_threads(1)  # as collectors run
    target = TensorDict.from_module(bench.small_policy(policy)).apply(torch.zeros_like)
    applied: list[tuple[int, float, float]] = []

    def record(version: int) -> None:
        applied.append((version, time.perf_counter(), time.process_time()))

    sub = WeightSubscriber(url, namespace=ns, target=target, apply="immediate", on_apply=record, worker_id=f"ab-{idx}")
    sub.start()
    print("ready", redisbus.__file__, flush=True)
    sys.stdin.read()
    sub.close()
    for row in applied:
        print(*row)


def _publisher(url: str, ns: str, policy: str) -> None:
    """The trainer: for each line ``N`` on stdin, N publishes 6 ms apart; prints ``v version start`` and ``cpu``."""
    import torch
    from tensordict import TensorDict

    import bench
    import redisbus
    from redisbus import WeightPublisher

    torch.set_num_threads(1)  # the stand-in training step's idle threads would spin on the workers' cores
    model = bench.small_policy(policy)
    weights = TensorDict.from_module(model)
    with WeightPublisher(url, namespace=ns) as pub:
        print("ready", redisbus.__file__, flush=True)
        for line in sys.stdin:
            count = int(line)
            cpu = time.process_time()
            for _ in range(count):
                bench.bump(model)
                start = time.perf_counter()
                print("v", pub.publish(weights), start)
                time.sleep(0.006)  # versions never queue
            print("cpu", time.process_time() - cpu, count)
            print("done", flush=True)


def _spawn(tree: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(tree).resolve()), str(HERE)])}
    return subprocess.Popen([sys.executable, str(HERE / "latency_ab.py"), *args], cwd=tree, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip


def compare(trees: dict[str, str], *, subscribers: int, policy: str, rounds: int, burst: int, url: str) -> dict[str, Any]:
    """Run the interleaved bursts against ``url`` and return each tree's figures (see the module docstring)."""
    from bench import percentile  # as bench.py's latency tables compute them
    procs: dict[str, tuple[subprocess.Popen[str], list[subprocess.Popen[str]]]] = {}
    try:
        for name, tree in trees.items():
            workers = [_spawn(tree, "--role", "subscriber", url, name, policy, str(i)) for i in range(subscribers)]
            pub = _spawn(tree, "--role", "publisher", url, name, policy)
            procs[name] = (pub, workers)
            for p in [*workers, pub]:
                line = p.stdout.readline().split() if p.stdout is not None else []
                if line[:1] != ["ready"]:
                    raise SystemExit(f"latency_ab.py: a process of tree {name!r} ({tree}) did not start")
                if not Path(line[1]).resolve().is_relative_to(Path(tree).resolve()):  # an installed redisbus won
                    raise SystemExit(f"latency_ab.py: tree {name!r} imported {line[1]}, not the one in {tree}")
        started: dict[str, dict[int, float]] = {name: {} for name in trees}
        cpu: dict[str, list[float]] = {name: [0.0, 0.0] for name in trees}
        for number in range(rounds + 1):  # round 0 warms both trees up and is not counted
            for name in list(trees) if number % 2 else list(trees)[::-1]:
                pub = procs[name][0]
                assert pub.stdin is not None and pub.stdout is not None
                pub.stdin.write(f"{burst}\n")
                pub.stdin.flush()
                while (line := pub.stdout.readline().split())[0] != "done":
                    if number and line[0] == "v":
                        started[name][int(line[1])] = float(line[2])
                    elif number and line[0] == "cpu":
                        cpu[name][0] += float(line[1])
                        cpu[name][1] += int(line[2])
                time.sleep(0.2)
        results = {}
        for name, (pub, workers) in procs.items():
            assert pub.stdin is not None
            pub.stdin.close()
            pub.wait(30)
            latency: list[float] = []
            last: dict[int, float] = {}
            worker_cpu: list[float] = []
            for w in workers:
                out, _ = w.communicate(timeout=60)
                rows = [(int(v), float(t), float(c)) for v, t, c in (line.split() for line in out.splitlines())]
                for version, at, _ in rows:
                    if version in started[name]:
                        latency.append((at - started[name][version]) * 1e3)
                        last[version] = max(last.get(version, 0.0), at)
                # CPU from one measured apply to the next, per version (the idle gaps in between are tiny)
                steps = [(c2 - c1) / (v2 - v1) for (v1, _, c1), (v2, _, c2) in zip(rows, rows[1:])
                         if v1 in started[name] and v2 in started[name]]  # fmt: skip
                if steps:
                    worker_cpu.append(statistics.median(steps) * 1e3)
            alls = [(at - started[name][v]) * 1e3 for v, at in last.items()]
            results[name] = {
                "tree": trees[name], "subscribers": subscribers, "policy": policy, "samples": len(latency),
                "expected": len(started[name]) * subscribers,
                "p50_ms": percentile(latency, 0.5), "p99_ms": percentile(latency, 0.99), "all_p50_ms": percentile(alls, 0.5),
                "publisher_cpu_ms": cpu[name][0] / max(1.0, cpu[name][1]) * 1e3,
                "subscriber_cpu_ms": statistics.median(worker_cpu) if worker_cpu else None,
            }  # fmt: skip
        return results
    finally:
        for pub, workers in procs.values():
            for p in [pub, *workers]:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["--role", "subscriber"]:
        url, ns, policy, idx = argv[2:6]
        _subscriber(url, ns, policy, int(idx))
        return 0
    if argv[:2] == ["--role", "publisher"]:
        _publisher(*argv[2:5])
        return 0
    p = argparse.ArgumentParser(prog="latency_ab.py", description=__doc__.split("\n\n")[0])
    p.add_argument("trees", nargs=2, metavar="NAME=TREE", help="a name and a source tree (the folder holding redisbus/)")
    p.add_argument("--subscribers", type=int, default=8, help="worker processes per tree (default 8)")
    p.add_argument("--policy", choices=("100K", "1M"), default="100K", help="the small MLP of bench.py (default 100K)")
    p.add_argument("--rounds", type=int, default=10, help="bursts per tree, after one warm-up burst (default 10)")
    p.add_argument("--burst", type=int, default=30, help="versions per burst (default 30)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    p.add_argument("--redis-server", help="redis-server binary (default as bench.py)")
    args = p.parse_args(argv)
    trees = {}
    for spec in args.trees:
        name, sep, tree = spec.partition("=")
        if not sep or not name or not (Path(tree) / "redisbus" / "__init__.py").is_file():
            p.error(f"{spec!r}: expected NAME=TREE, TREE a folder holding redisbus/")
        trees[name] = tree
    if len(trees) != 2:
        p.error("the two trees need different names")
    sys.path.insert(0, str(HERE))
    import bench

    with bench.redis_server(bench.find_redis_server(args.redis_server)) as url:
        results = compare(trees, subscribers=args.subscribers, policy=args.policy, rounds=args.rounds,
                          burst=args.burst, url=url)  # fmt: skip
    for name, r in results.items():
        worker = "-" if r["subscriber_cpu_ms"] is None else f"{r['subscriber_cpu_ms']:.2f}"
        print(f"{name:>10}: {r['subscribers']} x {r['policy']} MLP  p50 {r['p50_ms']:.2f}  p99 {r['p99_ms']:.2f}  "
              f"last-worker p50 {r['all_p50_ms']:.2f} ms  ({r['samples']}/{r['expected']} applies)  CPU per version: "
              f"publisher {r['publisher_cpu_ms']:.2f} (with its training step), worker {worker} ms")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
