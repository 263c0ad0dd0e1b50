#!/usr/bin/env python3
"""redisbus benchmark: redisbus side by side with the raw RESP ceiling and the peers people use.

usage: bench.py [-h] [--url URL] [--json FILE] [--quick] [--sizes SIZES] [--repeats N]
                [--subscribers N] [--publishes N] [--fanout-size SIZE] [--fanout-workers N]
                [--memory-size SIZE] [--memory-versions N] [--checksum-size SIZE]
                [--only SECTIONS] [--cluster] [--redis-server PATH]

Starts its own ``redis-server`` on a free loopback port (never 6379; the
binary is --redis-server, ``$REDISBUS_BENCH_REDIS_SERVER``, /usr/bin/redis-server
or the one on PATH) unless --url names a server, then measures:

throughput  for each policy size, each contender's publish (trainer -> Redis)
            and pull (Redis -> worker, verified and applied into the worker's
            tensors), medians of --repeats rounds; contenders run interleaved
            within each round (the order rotates), so noise from other work on
            the machine hits them all alike:
              raw        hand-written RESP on one socket: SET each 4 MiB chunk
                         from a memoryview, GET each with recv_into a
                         preallocated buffer (the physical ceiling here);
              naive      torch.save + redis-py set/get + torch.load(weights_only=True)
                         and a copy into the worker's tensors;
              tensordict tensordict.store.TensorDictStore: update() from a
                         TensorDict, to_tensordict() and update_() into one;
              torchrl    TorchRL's same-host schemes (SharedMemWeightSyncScheme,
                         MultiProcessWeightSyncScheme) to one worker process:
                         send() until the worker acknowledged (same host only);
              redisbus   WeightPublisher.publish() (snapshot, xxh3, upload,
                         commit, GC) and WeightSubscriber.sync() without a
                         listener (read latest, manifest, chunks, verify, apply);
                         publish(block=False): the time the caller is blocked.
latency     small MLPs (~100 KB, ~1 MB), --subscribers worker processes,
            publish-to-applied latency p50/p99 (apply="immediate", and on_sync
            with the worker waiting at its safe point in wait_for_version()).
fanout      --fanout-workers processes pulling one --fanout-size policy at once,
            aggregate GB/s, against as many raw-socket GET clients.
memory      a worker's and a publisher's extra resident memory against the policy
            size over --memory-versions versions (peak and growth; Linux /proc).
checksum    xxh3 over --checksum-size against that size's transfer time.
cluster     (--cluster) the fan-out against a local 3-master Redis Cluster
            (tests/cluster_fixtures.py) next to the single node.

Output: one throughput table (GB/s, and redisbus's ratio to each peer), then
the latency, fan-out, memory, checksum tables and the issue's targets with
pass/miss. --json FILE writes every figure (raw samples too). --quick runs a
small subset (16 MiB and 64 MiB policies, fewer rounds) in under a minute.
GB/s are 10^9 bytes per second; sizes are MiB/GiB (2^20 / 2^30 bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import torch
from tensordict import TensorDict

import redisbus
from redisbus import BusConfig, WeightPublisher, WeightSubscriber
from redisbus.wire import chunk_checksum, chunk_spans

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
CHUNK = redisbus.defaults.CHUNK_SIZE
SECTIONS = ("throughput", "latency", "fanout", "memory", "checksum")
#: Every key this run writes contains it, so a server given by --url is cleaned of exactly those.
RUN_ID = uuid.uuid4().hex[:8]

# --------------------------------------------------------------------------- small helpers


def parse_size(text: str) -> int:
    """``"256M"``, ``"1G"``, ``"100K"``, ``"4096"`` -> bytes (binary units)."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def human(nbytes: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if nbytes >= size:
            value = nbytes / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{int(nbytes)} B"


def gbps(nbytes: int, seconds: float | None) -> float | None:
    return None if not seconds else nbytes / seconds / 1e9


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def fmt(value: float | None, spec: str = ".2f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_bytes() -> dict[str, int] | None:
    """Current and peak resident set size of this process (Linux /proc), or None elsewhere."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024
    return out if len(out) == 2 else None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "redisbus": redisbus.__version__,
        "cpus": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / (1 << 20), 1)
                break
        info["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    for mod in ("tensordict", "torchrl", "xxhash"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a version is nice to have
            pass
    return info


# --------------------------------------------------------------------------- the Redis server


def find_redis_server(explicit: str | None) -> str:
    for candidate in (explicit, os.environ.get("REDISBUS_BENCH_REDIS_SERVER"), "/usr/bin/redis-server"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("redis-server")
    if not found:
        raise SystemExit("bench.py: no redis-server found (use --redis-server PATH or --url URL)")
    return found


def free_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port != 6379:
            return port


@contextlib.contextmanager
def redis_server(binary: str) -> Iterator[str]:
    """A private redis-server on a free loopback port, persistence off; yields its URL."""
    tmp = tempfile.mkdtemp(prefix="redisbus-bench-")
    port = free_port()
    cmd = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", tmp, "--logfile", os.path.join(tmp, "redis.log"), "--protected-mode", "no",
        # the naive contender stores a whole policy in one value: allow values past 512 MB
        "--proto-max-bulk-len", "2gb", "--client-query-buffer-limit", "2gb",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(port=port, socket_timeout=1).ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"bench.py: {binary} did not start on port {port}") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def clear(client: redis.Redis, owned: bool) -> None:
    """Empty our private server; on a server given by --url, delete only this run's keys."""
    if owned:
        client.flushdb()
        return
    batch = []
    for key in client.scan_iter(match=f"*{RUN_ID}*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            client.unlink(*batch)
            batch = []
    if batch:
        client.unlink(*batch)


def server_version(client: redis.Redis) -> str:
    try:
        return str(client.info("server").get("redis_version"))
    except redis.RedisError:
        return "?"


# --------------------------------------------------------------------------- the raw ceiling


class RawClient:
    """Hand-written RESP over one socket: the ceiling every contender is measured against.

    ``set_chunks`` sends ``SET`` headers, then each payload straight from its
    memoryview, with at most ``window`` bytes unacknowledged; ``get_into``
    pipelines ``GET``s with at most ``window`` requested bytes outstanding and
    receives each value with ``recv_into`` straight into its view. Nothing
    is checked beyond the RESP framing.
    """

    def __init__(self, url: str) -> None:
        cfg = BusConfig.from_url(url)
        if cfg.unix_socket_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(cfg.unix_socket_path)
        else:
            sock = socket.create_connection((cfg.host, cfg.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if cfg.ssl:
            ctx = ssl.create_default_context(cafile=cfg.ssl_ca_certs)
            ctx.check_hostname = cfg.ssl_check_hostname
            if cfg.ssl_certfile:
                ctx.load_cert_chain(cfg.ssl_certfile, cfg.ssl_keyfile)
            sock = ctx.wrap_socket(sock, server_hostname=cfg.host)
        self.sock = sock
        self.buf = bytearray(1 << 16)
        self.mv = memoryview(self.buf)
        self.start = self.end = 0
        if cfg.password:
            auth = [b"AUTH", cfg.password.encode()] if not cfg.username else [b"AUTH", cfg.username.encode(), cfg.password.encode()]
            self.command(*auth)
        if cfg.db:
            self.command(b"SELECT", str(cfg.db).encode())

    def close(self) -> None:
        self.sock.close()

    @staticmethod
    def _pack(*args: bytes) -> bytes:
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        return b"".join(out)

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n", self.start, self.end)
            if i >= 0:
                line = bytes(self.buf[self.start : i])
                self.start = i + 2
                return line
            if self.start:
                n = self.end - self.start
                self.buf[:n] = self.buf[self.start : self.end]
                self.start, self.end = 0, n
            got = self.sock.recv_into(self.mv[self.end :])
            if not got:
                raise ConnectionError("server closed the connection")
            self.end += got

    def _exact(self, view: memoryview) -> None:
        n = len(view)
        take = min(n, self.end - self.start)
        view[:take] = self.mv[self.start : self.start + take]
        self.start += take
        pos = take
        while pos < n:
            got = self.sock.recv_into(view[pos:], n - pos)
            if not got:
                raise ConnectionError("server closed the connection")
            pos += got

    def command(self, *args: bytes) -> bytes:
        self.sock.sendall(self._pack(*args))
        line = self._line()
        if line[:1] == b"-":
            raise RuntimeError(line.decode())
        if line[:1] == b"$" and int(line[1:]) >= 0:
            data = bytearray(int(line[1:]) + 2)
            self._exact(memoryview(data))
            return bytes(data[:-2])
        return line

    def set_chunks(self, keys: Sequence[bytes], views: Sequence[memoryview], window: int = 64 * MiB) -> None:
        pending: list[int] = []
        unacked = 0
        trailer = b""
        for key, view in zip(keys, views):
            self.sock.sendall(trailer + b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(key), key, len(view)))
            self.sock.sendall(view)
            trailer = b"\r\n"
            pending.append(len(view))
            unacked += len(view)
            while unacked > window:
                self.sock.sendall(trailer)
                trailer = b""
                self._ok()
                unacked -= pending.pop(0)
        if trailer:
            self.sock.sendall(trailer)
        for _ in pending:
            self._ok()

    def _ok(self) -> None:
        line = self._line()
        if line != b"+OK":
            raise RuntimeError(f"SET answered {line[:80]!r}")

    def get_into(self, keys: Sequence[bytes], views: Sequence[memoryview], window: int = 2 * MiB) -> None:
        n = len(keys)
        sent = done = 0
        outstanding = 0
        while done < n:
            if sent < n and (sent == done or outstanding < window):
                batch = []
                while sent < n and (sent == done or outstanding < window):
                    batch.append(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(keys[sent]), keys[sent]))
                    outstanding += len(views[sent])
                    sent += 1
                self.sock.sendall(b"".join(batch))
            line = self._line()
            view = views[done]
            if line[:1] != b"$" or int(line[1:]) != len(view):
                raise RuntimeError(f"GET answered {line[:80]!r}, expected ${len(view)}")
            self._exact(view)
            crlf = bytearray(2)
            self._exact(memoryview(crlf))
            outstanding -= len(view)
            done += 1


def raw_layout(nbytes: int, prefix: str) -> tuple[list[bytes], list[tuple[int, int]]]:
    spans = chunk_spans(nbytes, CHUNK)
    return [f"{prefix}:{i}".encode() for i in range(len(spans))], spans


# --------------------------------------------------------------------------- policies


def big_policy(nbytes: int, *, fill: float = 0.0) -> torch.nn.Module:
    """An MLP of square float32 layers (weights and biases) of about ``nbytes`` in all."""
    width = 2048
    while width > 64 and width * width * 4 * 4 > nbytes:
        width //= 2
    layers = max(1, round(nbytes / ((width * width + width) * 4)))
    model = torch.nn.Sequential(*[torch.nn.utils.skip_init(torch.nn.Linear, width, width) for _ in range(layers)])
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.fill_(fill + i)  # touch every page: weights are resident, like a trained model's
    return model


def small_policy(kind: str) -> torch.nn.Module:
    """The common RL case: an MLP of ~100 KB (``"100K"``) or ~1 MB (``"1M"``)."""
    dims = {"100K": (64, 128, 128, 8), "1M": (256, 512, 256, 16)}[kind]
    layers: list[torch.nn.Module] = []
    for a, b in zip(dims, dims[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def policy_blob(model: torch.nn.Module) -> torch.Tensor:
    """The policy's tensors' bytes laid end to end (what the raw ceiling moves)."""
    leaves = list(TensorDict.from_module(model).values(include_nested=True, leaves_only=True))
    blob = torch.empty(sum(t.numel() * t.element_size() for t in leaves), dtype=torch.uint8)
    offset = 0
    for t in leaves:
        n = t.numel() * t.element_size()
        blob[offset : offset + n].copy_(t.reshape(-1).view(torch.uint8))
        offset += n
    return blob


def wait_ready(queue: Any, count: int, procs: Sequence[Any], what: str, timeout: float = 300.0) -> None:
    """Take ``count`` items from ``queue``, failing fast if one of ``procs`` died first."""
    deadline = time.monotonic() + timeout
    got = 0
    while got < count:
        try:
            queue.get(timeout=1.0)
            got += 1
        except Exception:  # noqa: BLE001 - queue.Empty
            dead = [p for p in procs if not p.is_alive()]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what}: {len(dead)} worker process(es) died before they were ready") from None


def policy_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bump(model: torch.nn.Module) -> None:
    """A training step, as far as the bytes are concerned."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)


# --------------------------------------------------------------------------- throughput contenders


@dataclass
class Samples:
    """Seconds per run of one contender at one size."""

    publish: list[float] = field(default_factory=list)
    pull: list[float] = field(default_factory=list)
    roundtrip: list[float] = field(default_factory=list)
    blocked: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.extra.setdefault(name, []).append(seconds)


class Contender:
    """One way of moving the policy; ``round()`` runs one publish and one pull and records them."""

    name = ""
    label = ""

    def __init__(self, url: str, model: torch.nn.Module, nbytes: int, target: TensorDict) -> None:
        self.url = url
        self.model = model
        self.nbytes = nbytes
        self.target = target  # the worker's tensors (zeros, same layout; shared by the contenders, one at a time)
        self.samples = Samples()

    def setup(self) -> None:
        pass

    def round(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Raw(Contender):
    """The ceiling: each round SETs the policy's bytes as a new version (new keys, like any versioned
    store: Redis allocates fresh memory for them; versions older than the last two expire after 1 s, as
    redisbus's are collected here), GETs them back, then SETs them again over the same keys (reported
    apart: no new allocation in Redis)."""

    name, label = "raw", "raw RESP socket (ceiling)"

    def setup(self) -> None:
        self.client = RawClient(self.url)
        self.blob = policy_blob(self.model)
        self.dst = torch.zeros(self.nbytes, dtype=torch.uint8)  # preallocated, faulted in
        self.prefix = f"bench:{RUN_ID}:raw:{uuid.uuid4().hex[:6]}"
        self.spans = chunk_spans(self.nbytes, CHUNK)
        src_mv = memoryview(self.blob.numpy())
        dst_mv = memoryview(self.dst.numpy())
        self.src_views = [src_mv[a:b] for a, b in self.spans]
        self.dst_views = [dst_mv[a:b] for a, b in self.spans]
        self.versions: list[list[bytes]] = []

    def round(self) -> None:
        keys = [f"{self.prefix}:{len(self.versions)}:{i}".encode() for i in range(len(self.spans))]
        self.versions.append(keys)
        t0 = time.perf_counter()
        self.client.set_chunks(keys, self.src_views)
        t1 = time.perf_counter()
        self.client.get_into(keys, self.dst_views)
        t2 = time.perf_counter()
        self.client.set_chunks(keys, self.src_views)
        t3 = time.perf_counter()
        self.samples.publish.append(t1 - t0)
        self.samples.pull.append(t2 - t1)
        self.samples.roundtrip.append(t2 - t0)
        self.samples.add("set_same_keys", t3 - t2)
        if len(self.versions) > 2:  # GC as redisbus's here: keep 2 versions, older ones expire after 1 s
            for key in self.versions[-3]:
                self.client.command(b"PEXPIRE", key, b"1000")
            self.versions[-3] = []

    def close(self) -> None:
        with contextlib.suppress(Exception):
            for keys in self.versions[-3:]:
                if keys:
                    self.client.command(b"DEL", *keys)
        self.client.close()


class Naive(Contender):
    name, label = "naive", "naive torch.save + redis-py + torch.load"

    def setup(self) -> None:
        self.client = redis.Redis.from_url(self.url)
        self.key = f"bench:{RUN_ID}:naive:{uuid.uuid4().hex[:6]}"
        self.by_name = dict(self.target.flatten_keys(".").items())  # state_dict names -> the worker's tensors

    def round(self) -> None:
        t0 = time.perf_counter()
        buf = io.BytesIO()
        torch.save(self.model.state_dict(), buf)
        self.client.set(self.key, buf.getvalue())
        del buf
        t1 = time.perf_counter()
        loaded = torch.load(io.BytesIO(self.client.get(self.key)), weights_only=True)
        with torch.no_grad():
            for k, v in loaded.items():
                self.by_name[k].copy_(v)
        del loaded
        t2 = time.perf_counter()
        self.samples.publish.append(t1 - t0)
        self.samples.pull.append(t2 - t1)
        self.samples.roundtrip.append(t2 - t0)

    def close(self) -> None:
        self.client.delete(self.key)
        self.client.close()


class TDStore(Contender):
    name, label = "tensordict", "tensordict TensorDictStore"

    def setup(self) -> None:
        from tensordict.store import TensorDictStore

        cfg = BusConfig.from_url(self.url)
        kwargs: dict[str, Any] = {"db": cfg.db, "prefix": f"bench-{RUN_ID}-td", "td_id": uuid.uuid4().hex, "batch_size": []}
        if cfg.unix_socket_path:
            kwargs["unix_socket_path"] = cfg.unix_socket_path
        else:
            kwargs.update(host=cfg.host, port=cfg.port)
        if cfg.password:
            kwargs["password"] = cfg.password
        if cfg.username:
            kwargs["username"] = cfg.username
        if cfg.ssl:
            kwargs.update(ssl=True, ssl_ca_certs=cfg.ssl_ca_certs)
        self.store = TensorDictStore(**kwargs)
        self.src = TensorDict.from_module(self.model)

    def round(self) -> None:
        t0 = time.perf_counter()
        self.store.update(self.src)
        t1 = time.perf_counter()
        local = self.store.to_tensordict()
        self.target.update_(local)
        del local
        t2 = time.perf_counter()
        self.samples.publish.append(t1 - t0)
        self.samples.pull.append(t2 - t1)
        self.samples.roundtrip.append(t2 - t0)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.store.clear_redis()
        with contextlib.suppress(Exception):
            self.store.close()


def _torchrl_receiver(scheme: Any, width: int, layers: int, ready: Any) -> None:
    torch.set_num_threads(1)
    model = torch.nn.Sequential(*[torch.nn.utils.skip_init(torch.nn.Linear, width, width) for _ in range(layers)])
    scheme.init_on_receiver(model_id="policy", model=model, worker_idx=0)
    scheme.connect(worker_idx=0)  # starts the receiver's background thread (applies, then acks)
    ready.set()
    while True:
        time.sleep(3600)


class TorchRLScheme(Contender):
    """TorchRL's same-host schemes: ``send()`` returns once the worker applied and acknowledged."""

    scheme_name = ""

    def setup(self) -> None:
        import torchrl.weight_update as wu

        ctx = mp.get_context("spawn")
        self.scheme = getattr(wu, self.scheme_name)(strategy="tensordict")
        first = self.model[0]
        self.scheme.init_on_sender(
            model_id="policy", weights=TensorDict.from_module(self.model), devices=[torch.device("cpu")],
            num_workers=1, ctx=ctx,
        )  # fmt: skip
        ready = ctx.Event()
        self.proc = ctx.Process(
            target=_torchrl_receiver, args=(self.scheme, first.in_features, len(self.model), ready), daemon=True
        )
        self.proc.start()
        self.scheme.connect()
        if not ready.wait(120):
            raise RuntimeError(f"{self.scheme_name} worker did not start")

    def round(self) -> None:
        weights = TensorDict.from_module(self.model)
        t0 = time.perf_counter()
        self.scheme.send(weights)
        t1 = time.perf_counter()
        self.samples.roundtrip.append(t1 - t0)

    def close(self) -> None:
        self.proc.kill()
        self.proc.join(10)
        with contextlib.suppress(Exception):
            self.scheme.shutdown()


class TorchRLShared(TorchRLScheme):
    name, label, scheme_name = "torchrl_shm", "TorchRL SharedMemWeightSyncScheme (same host)", "SharedMemWeightSyncScheme"


class TorchRLMP(TorchRLScheme):
    name, label, scheme_name = "torchrl_mp", "TorchRL MultiProcessWeightSyncScheme (same host)", "MultiProcessWeightSyncScheme"


class _Timed:
    """Wraps a module-level function to add its wall time to a running total (for the breakdown)."""

    def __init__(self, module: Any, name: str, totals: dict[str, float], label: str) -> None:
        self.module, self.name, self.totals, self.label = module, name, totals, label
        self.inner = getattr(module, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.totals[self.label] = self.totals.get(self.label, 0.0) + time.perf_counter() - t0

    def __enter__(self) -> _Timed:
        setattr(self.module, self.name, self)
        return self

    def __exit__(self, *exc: object) -> None:
        if isinstance(self.module, type(sys)):
            setattr(self.module, self.name, self.inner)
        else:
            delattr(self.module, self.name)  # an instance: its class's method shows through again


class RedisBus(Contender):
    name, label = "redisbus", "redisbus"

    def setup(self) -> None:
        self.ns = f"bench-{RUN_ID}-{uuid.uuid4().hex[:6]}"
        # keep 2, grace 1 s instead of 3 and 60 s: evicted versions of a 1 GiB policy must not pile up in
        # this machine's memory (GC does the same work whatever the settings)
        self.pub = WeightPublisher(self.url, namespace=self.ns, keep_versions=2, grace_seconds=1.0)
        self.src = TensorDict.from_module(self.model)
        self.sub = WeightSubscriber(self.url, namespace=self.ns, target=self.target)
        # warm-up: fault in the snapshot and staging buffers once, as any long-running process would
        self.pub.publish(self.src)
        self.sub.sync()

    def round(self) -> None:
        import redisbus.publisher as P
        import redisbus.subscriber as S

        totals: dict[str, float] = {}
        with _Timed(P, "upload_and_commit", totals, "pub_hash_upload_commit"), \
                _Timed(P, "collect", totals, "pub_gc"), _Timed(S, "read_chunks_into", totals, "pull_network_verify"), \
                _Timed(S, "verify_chunks", totals, "pull_verify"), _Timed(self.sub, "_apply_staged", totals, "pull_apply"):  # fmt: skip
            t0 = time.perf_counter()
            self.pub.publish(self.src)
            t1 = time.perf_counter()
            applied = self.sub.sync()
            t2 = time.perf_counter()
        if applied is None:
            raise RuntimeError("redisbus subscriber applied nothing")
        self.samples.publish.append(t1 - t0)
        self.samples.pull.append(t2 - t1)
        self.samples.roundtrip.append(t2 - t0)
        for k, v in totals.items():
            self.samples.add(k, v)
        # asynchronous publish: the caller is blocked for the snapshot only
        t0 = time.perf_counter()
        future = self.pub.publish(self.src, block=False)
        t1 = time.perf_counter()
        future.result()
        t2 = time.perf_counter()
        self.samples.blocked.append(t1 - t0)
        self.samples.add("async_total", t2 - t0)

    def close(self) -> None:
        self.sub.close()
        self.pub.close()


CONTENDERS: dict[str, type[Contender]] = {
    c.name: c for c in (Raw, Naive, TDStore, TorchRLShared, TorchRLMP, RedisBus)
}


def run_throughput(url: str, sizes: Sequence[int], repeats: int, contenders: Sequence[str],
                   torchrl_max: int = 1 << 62, owned: bool = True) -> dict[str, Any]:  # fmt: skip
    results: dict[str, Any] = {}
    flush = redis.Redis.from_url(url)
    for size in sizes:
        log(f"throughput: {human(size)} policy, {repeats} rounds of {', '.join(contenders)}")
        clear(flush, owned)
        model = big_policy(size)
        nbytes = policy_bytes(model)
        target = TensorDict.from_module(model).apply(torch.zeros_like)
        runners: list[Contender] = []
        for name in contenders:
            if name.startswith("torchrl") and size > torchrl_max:
                results.setdefault(str(size), {})[name] = {"error": f"skipped above {human(torchrl_max)} (--torchrl-max-size)"}
                continue
            runner = CONTENDERS[name](url, model, nbytes, target)
            try:
                runner.setup()
            except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                log(f"  {name}: cannot run ({type(exc).__name__}: {exc})")
                results.setdefault(str(size), {})[name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            runners.append(runner)
        for r in range(repeats):
            order = runners[r % len(runners) :] + runners[: r % len(runners)] if runners else []
            for runner in order:
                bump(model)
                try:
                    runner.round()
                except Exception as exc:  # noqa: BLE001
                    log(f"  {runner.name}: round {r} failed ({type(exc).__name__}: {exc})")
                    runner.samples.add("errors", 1.0)
                gc.collect()
            log(f"  round {r + 1}/{repeats} done")
        entry = results.setdefault(str(size), {})
        for runner in runners:
            s = runner.samples
            entry[runner.name] = {
                "label": runner.label,
                "bytes": nbytes,
                "publish_s": s.publish,
                "pull_s": s.pull,
                "roundtrip_s": s.roundtrip,
                "blocked_s": s.blocked,
                "extra_s": s.extra,
                "publish_gbps": gbps(nbytes, median(s.publish)),
                "pull_gbps": gbps(nbytes, median(s.pull)),
                "roundtrip_gbps": gbps(nbytes, median(s.roundtrip)),
                "blocked_ms": None if not s.blocked else median(s.blocked) * 1e3,
                "breakdown_ms": {k: median(v) * 1e3 for k, v in s.extra.items() if k != "errors"},
            }
            with contextlib.suppress(Exception):
                runner.close()
        del runners, model, target
        gc.collect()
        clear(flush, owned)
    flush.close()
    return results


# --------------------------------------------------------------------------- worker processes

_CTX: Any = None


def mp_context() -> Any:
    """A forkserver context with torch and redisbus preloaded: workers start in a fraction of a second."""
    global _CTX
    if _CTX is None:
        methods = mp.get_all_start_methods()
        _CTX = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            _CTX.set_forkserver_preload(["torch", "tensordict", "redisbus", "redis"])
    return _CTX


def _stop_all(procs: Sequence[Any]) -> None:
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)


def _latency_worker(url: str, ns: str, kind: str, mode: str, idx: int, done: Any, ready: Any, results: Any,
                    stop: Any) -> None:  # fmt: skip
    torch.set_num_threads(1)  # eight workers on a small box: one intra-op thread each, as collectors run
    target = TensorDict.from_module(small_policy(kind)).apply(torch.zeros_like)
    times: list[tuple[int, float, float]] = []  # version, when applied, this worker's CPU so far

    def record(version: int) -> None:
        # perf_counter is CLOCK_MONOTONIC: one clock for every process; process_time: this worker's CPU so far
        times.append((version, time.perf_counter(), time.process_time()))
        done.release()  # tells the publisher (after the time is taken)

    if mode == "immediate":
        sub = WeightSubscriber(url, namespace=ns, target=target, apply="immediate", on_apply=record,
                               worker_id=f"lat-{idx}")  # fmt: skip
        sub.start()
        ready.put(idx)
        stop.wait()
    else:  # on_sync: the worker waits at its safe point for the next version
        sub = WeightSubscriber(url, namespace=ns, target=target, worker_id=f"lat-{idx}")
        sub.start()
        ready.put(idx)
        have = 0
        while not stop.is_set():
            try:
                have = sub.wait_for_version(have + 1, timeout=0.2)
            except TimeoutError:
                continue
            record(have)
    sub.close()
    results.put((idx, times))


def run_latency(url: str, configs: Sequence[tuple[str, str, int]], publishes: int, warmup: int = 10) -> dict[str, Any]:
    """For each ``(policy kind, apply mode, subscribers)``: publish-to-applied latency in every subscriber process.

    The publisher publishes a new version once every worker applied the last
    one (plus 2 ms), so versions never queue; latency runs from the start of
    the ``publish()`` call to the worker's ``on_apply`` (or the return of its
    ``wait_for_version()``), both read from the one system-wide monotonic clock.

    Also the CPU time each version costs the publisher process, Redis and each
    subscriber: when the processes outnumber the cores, the scheduler shares
    the cores out among all the subscribers at once, so they finish together,
    at about (total CPU per version) / (cores) after the notice.

    The stand-in training step between two publishes (``bump``) runs on one
    thread: torch's idle intra-op threads would otherwise spin on the cores
    the subscribers need, which measures the benchmark's training step, not the bus.
    """
    ctx = mp_context()
    out: dict[str, Any] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind, mode, subscribers in configs:
            out[f"{kind}/{mode}/{subscribers}"] = _latency_run(ctx, url, kind, mode, subscribers, publishes=publishes,
                                                               warmup=warmup)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return out


def _redis_cpu(url: str) -> float:
    client = BusConfig.from_url(url).client()
    try:
        info = client.info("cpu")
    finally:
        client.close()
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _latency_run(ctx: Any, url: str, kind: str, mode: str, subscribers: int, *, publishes: int,
                 warmup: int) -> dict[str, Any]:  # fmt: skip
    """One latency configuration (see :func:`run_latency`)."""
    policy = small_policy(kind)
    nbytes = policy_bytes(policy)
    src = TensorDict.from_module(policy)
    log(f"latency: {kind} MLP ({human(nbytes)}), {subscribers} subscribers, apply={mode}, {publishes} publishes")
    ns = f"bench-{RUN_ID}-lat-{uuid.uuid4().hex[:6]}"
    done = ctx.Semaphore(0)
    ready, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_latency_worker, args=(url, ns, kind, mode, i, done, ready, results, stop),
                         daemon=True) for i in range(subscribers)]  # fmt: skip
    for p in procs:
        p.start()
    try:
        wait_ready(ready, len(procs), procs, "latency")
        sent: dict[int, float] = {}
        call_ms: list[float] = []
        with WeightPublisher(url, namespace=ns) as pub:
            for i in range(warmup + publishes):
                if i == warmup:
                    cpu0, redis0 = time.process_time(), _redis_cpu(url)
                bump(policy)
                t0 = time.perf_counter()
                version = pub.publish(src)
                call_ms.append((time.perf_counter() - t0) * 1e3)
                if i >= warmup:
                    sent[version] = t0
                for _ in procs:  # every worker applied it (a missed notice shows as a late apply)
                    done.acquire(timeout=10)
                time.sleep(0.002)  # a breath between versions: they never queue
        publisher_cpu, redis_cpu = time.process_time() - cpu0, _redis_cpu(url) - redis0
        stop.set()
        while done.acquire(timeout=0):  # releases of versions not waited for (none expected)
            pass
        per_worker: list[float] = []
        all_applied: dict[int, float] = {}
        worker_cpu: list[float] = []
        got = 0
        for _ in procs:
            with contextlib.suppress(Exception):
                _, times = results.get(timeout=30)
                got += 1
                for version, t, _cpu in times:
                    if version in sent:
                        per_worker.append((t - sent[version]) * 1e3)
                        all_applied[version] = max(all_applied.get(version, 0.0), t)
                measured = [(v, cpu) for v, _, cpu in times if v in sent]
                before = [cpu for v, _, cpu in times if v < min(sent)]
                if measured and before:  # from the apply before the first measured version to the last
                    worker_cpu.append((measured[-1][1] - before[-1]) / len(measured))
    finally:
        stop.set()
        _stop_all(procs)
    last = [(t - sent[v]) * 1e3 for v, t in all_applied.items()]
    missed = publishes * subscribers - len(per_worker)
    return {
        "policy_bytes": nbytes, "subscribers": subscribers, "publishes": publishes, "mode": mode,
        "workers_reporting": got, "missed": missed,
        "p50_ms": percentile(per_worker, 0.5), "p99_ms": percentile(per_worker, 0.99),
        "max_ms": max(per_worker) if per_worker else None,
        "all_applied_p50_ms": percentile(last, 0.5), "all_applied_p99_ms": percentile(last, 0.99),
        "publish_call_p50_ms": percentile(call_ms[warmup:], 0.5),
        "cpu_ms_per_version": {
            "publisher": publisher_cpu / publishes * 1e3,
            "redis": redis_cpu / publishes * 1e3,
            "subscriber_mean": (sum(worker_cpu) / len(worker_cpu) * 1e3) if worker_cpu else None,
        },
        "samples_ms": per_worker,
    }  # fmt: skip


def _fanout_worker(url: str, kind: str, ns: str, size: int, nbytes: int, idx: int, barrier: Any, results: Any,
                   rounds: int, ready: Any) -> None:  # fmt: skip
    torch.set_num_threads(1)
    if kind == "redisbus":
        target = TensorDict.from_module(big_policy(size)).apply(torch.zeros_like)
        sub = WeightSubscriber(url, namespace=ns, target=target, worker_id=f"fan-{idx}")
        sub.sync()  # warm: connection and staging buffer, as a long-running worker has them

        def pull() -> None:
            if sub.sync() is None:
                raise RuntimeError("fan-out worker applied nothing")
    else:
        client = RawClient(url)
        dst = torch.zeros(nbytes, dtype=torch.uint8)
        mv = memoryview(dst.numpy())
        spans = chunk_spans(nbytes, CHUNK)
        keys = [f"{ns}:{i}".encode() for i in range(len(spans))]
        views = [mv[a:b] for a, b in spans]

        def pull() -> None:
            client.get_into(keys, views)

        pull()
    ready.put(idx)
    for r in range(rounds):
        barrier.wait()
        t0 = time.perf_counter()
        pull()
        results.put((kind, idx, r, t0, time.perf_counter()))


def run_fanout(url: str, size: int, workers: int, rounds: int, kinds: Sequence[str] = ("redisbus", "raw"),
               label: str = "") -> dict[str, Any]:  # fmt: skip
    """``workers`` processes per kind pull the same policy at once; aggregate GB/s per round, interleaved."""
    ctx = mp_context()
    model = big_policy(size)
    nbytes = policy_bytes(model)
    src = TensorDict.from_module(model)
    ns = f"bench-{RUN_ID}-fan-{uuid.uuid4().hex[:6]}"
    pub = WeightPublisher(url, namespace=ns, grace_seconds=5.0) if "redisbus" in kinds else None
    if pub is not None:
        pub.publish(src)
    raw_ns = f"bench-{RUN_ID}-fanraw-{uuid.uuid4().hex[:6]}"
    if "raw" in kinds:
        raw = RawClient(url)
        blob = memoryview(policy_blob(model).numpy())
        spans = chunk_spans(nbytes, CHUNK)
        raw.set_chunks([f"{raw_ns}:{i}".encode() for i in range(len(spans))], [blob[a:b] for a, b in spans])
        raw.close()
    log(f"fan-out{label}: {workers} workers x {', '.join(kinds)} pulling {human(nbytes)}, {rounds} rounds")
    groups = {}
    results, ready = ctx.Queue(), ctx.Queue()
    for kind in kinds:
        barrier = ctx.Barrier(workers + 1)
        procs = [ctx.Process(target=_fanout_worker, args=(url, kind, ns if kind == "redisbus" else raw_ns, size, nbytes, i, barrier,
                                                          results, rounds, ready), daemon=True) for i in range(workers)]  # fmt: skip
        for p in procs:
            p.start()
        groups[kind] = (barrier, procs)
    # every worker warm (it holds the current version) before the first round
    wait_ready(ready, workers * len(kinds), [p for _, procs in groups.values() for p in procs], "fan-out")
    agg: dict[str, list[float]] = {k: [] for k in kinds}
    spread: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for r in range(rounds):
            order = list(kinds) if r % 2 == 0 else list(kinds)[::-1]
            for kind in order:
                if kind == "redisbus":
                    bump(model)
                    pub.publish(src)
                barrier, procs = groups[kind]
                barrier.wait(timeout=300)
                rows = []
                while len(rows) < len(procs):
                    try:
                        rows.append(results.get(timeout=5))
                    except Exception:  # noqa: BLE001 - queue.Empty: is everyone still alive?
                        if not all(p.is_alive() for p in procs):
                            raise RuntimeError(f"a {kind} fan-out worker died") from None
                t0 = min(row[3] for row in rows)
                t1 = max(row[4] for row in rows)
                agg[kind].append(workers * nbytes / (t1 - t0) / 1e9)
                spread[kind].append(statistics.median(row[4] - row[3] for row in rows))
    finally:
        for _, procs in groups.values():
            for p in procs:
                p.kill()
            _stop_all(procs)
        if pub is not None:
            pub.close()
    return {
        "policy_bytes": nbytes, "workers": workers, "rounds": rounds,
        **{f"{k}_gbps": median(v) for k, v in agg.items()},
        **{f"{k}_samples_gbps": v for k, v in agg.items()},
        **{f"{k}_per_worker_s": median(v) for k, v in spread.items()},
    }  # fmt: skip


def _memory_publisher(url: str, ns: str, size: int, versions: int, conn: Any, results: Any) -> None:
    model = big_policy(size)
    src = TensorDict.from_module(model)
    gc.collect()
    base = rss_bytes()
    pub = WeightPublisher(url, namespace=ns, grace_seconds=1.0)
    reset_peak_rss()
    samples = []
    for i in range(versions):
        bump(model)
        # alternately blocking (sent from the tensors) and not (a snapshot copy, then a background upload)
        version = pub.publish(src) if i % 2 else pub.publish(src, block=False).result()
        conn.send(version)
        conn.recv()
        samples.append(rss_bytes()["VmRSS"] - base["VmRSS"])
    end = rss_bytes()
    pub.close()
    results.put(("publisher", {"base": base["VmRSS"], "peak_extra": end["VmHWM"] - base["VmRSS"], "rss_extra": samples}))


def _memory_worker(url: str, ns: str, size: int, versions: int, conn: Any, results: Any) -> None:
    target = TensorDict.from_module(big_policy(size)).apply(torch.zeros_like)
    gc.collect()
    base = rss_bytes()
    sub = WeightSubscriber(url, namespace=ns, target=target)
    reset_peak_rss()
    samples = []
    for _ in range(versions):
        version = conn.recv()
        if sub.sync() != version:
            raise RuntimeError(f"memory worker did not apply version {version}")
        samples.append(rss_bytes()["VmRSS"] - base["VmRSS"])
        conn.send(version)
    end = rss_bytes()
    sub.close()
    results.put(("worker", {"base": base["VmRSS"], "peak_extra": end["VmHWM"] - base["VmRSS"], "rss_extra": samples}))


def run_memory(url: str, size: int, versions: int) -> dict[str, Any]:
    if rss_bytes() is None or not reset_peak_rss():
        return {"error": "needs Linux /proc (VmRSS, VmHWM, clear_refs)"}
    ctx = mp_context()
    nbytes = policy_bytes(big_policy(size))
    log(f"memory: {human(nbytes)} policy, {versions} versions, publisher and worker in their own processes")
    ns = f"bench-{RUN_ID}-mem-{uuid.uuid4().hex[:6]}"
    a, b = ctx.Pipe()
    results = ctx.Queue()
    procs = [ctx.Process(target=_memory_publisher, args=(url, ns, size, versions, a, results), daemon=True),
             ctx.Process(target=_memory_worker, args=(url, ns, size, versions, b, results), daemon=True)]  # fmt: skip
    for p in procs:
        p.start()
    out: dict[str, Any] = {"policy_bytes": nbytes, "versions": versions}
    try:
        for _ in procs:
            role, data = results.get(timeout=60 + versions * max(2.0, nbytes / 1e8))
            settle = data["rss_extra"][min(2, len(data["rss_extra"]) - 1)] if data["rss_extra"] else 0
            out[role] = {
                "peak_extra_bytes": data["peak_extra"],
                "peak_ratio": data["peak_extra"] / nbytes,
                "growth_bytes": (data["rss_extra"][-1] - settle) if data["rss_extra"] else None,
                "rss_extra_bytes": data["rss_extra"],
            }
    finally:
        _stop_all(procs)
    return out


def run_checksum(url: str, size: int, transfer: dict[str, float | None], rounds: int = 7) -> dict[str, Any]:
    """What verification costs: the time it adds to a pull (chunks read with and without the per-chunk
    check, interleaved), and xxh3 over ``size`` bytes on its own against transfer times of that size."""
    from redisbus.transport import read_chunks_into, read_manifest
    from redisbus.wire import verify_chunks

    log(f"checksum: a pull of {human(size)} with and without verification, and xxh3 over it")
    model = big_policy(size)
    nbytes = policy_bytes(model)
    ns = f"bench-{RUN_ID}-cs-{uuid.uuid4().hex[:6]}"
    with WeightPublisher(url, namespace=ns, grace_seconds=1.0) as pub:
        version = pub.publish(model)
        del model
        gc.collect()
        manifest, _ = read_manifest(pub._client, pub.keys, version, pub.config)
        staging = torch.zeros(nbytes, dtype=torch.uint8)
        dst = memoryview(staging.numpy())
        with_v: list[float] = []
        without: list[float] = []
        for r in range(rounds):
            for verify in ((True, False) if r % 2 == 0 else (False, True)):
                t0 = time.perf_counter()
                read_chunks_into(pub._client, pub.keys, manifest, dst, verify=verify_chunks if verify else None)
                (with_v if verify else without).append(time.perf_counter() - t0)
    spans = chunk_spans(nbytes, CHUNK)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for a, b in spans:
            chunk_checksum(dst[a:b])
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    base = statistics.median(without)
    out: dict[str, Any] = {
        "bytes": nbytes, "xxh3_s": seconds, "xxh3_gbps": nbytes / seconds / 1e9,
        "pull_without_verify_s": base, "pull_with_verify_s": statistics.median(with_v),
        "added_s": statistics.median(with_v) - base, "added_fraction": (statistics.median(with_v) - base) / base,
    }  # fmt: skip
    for name, gb_per_s in {**transfer, "pull without verification": nbytes / base / 1e9}.items():
        if gb_per_s:
            transfer_s = nbytes / (gb_per_s * 1e9)
            out[f"vs_{name}"] = {"transfer_s": transfer_s, "fraction": seconds / transfer_s}
    del staging
    gc.collect()
    return out


def run_cluster(workers: int, size: int, rounds: int, single_url: str) -> dict[str, Any]:
    """Fan-out of redisbus workers: one node against a local 3-master cluster (tests/cluster_fixtures.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from cluster_fixtures import local_cluster
    except ImportError as exc:
        return {"error": f"tests/cluster_fixtures.py not importable: {exc}"}
    out: dict[str, Any] = {"single_node": run_fanout(single_url, size, workers, rounds, kinds=("redisbus",), label=" (1 node)")}
    try:
        with local_cluster(masters=3) as cluster:
            out["cluster_3_masters"] = run_fanout(cluster.url, size, workers, rounds, kinds=("redisbus",),
                                                  label=" (3-master cluster)")  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - a cluster that cannot start is reported
        out["cluster_3_masters"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


# --------------------------------------------------------------------------- report

TARGETS = {
    "pull": ("pull + verify + apply >= 85% of raw GET", 0.85),
    "publish": ("publish >= 90% of raw SET", 0.90),
    "naive": (">= 5x naive torch.save + redis-py round trip", 5.0),
    "tensordict": (">= 2.5x TensorDictStore round trip", 2.5),
    "latency_p50": ("small-policy p50 <= 2 ms (8 subscribers)", 2.0),
    "latency_p99": ("small-policy p99 <= 10 ms (8 subscribers)", 10.0),
    "fanout": ("fan-out >= 80% of raw GET clients", 0.80),
    "memory": ("extra RSS <= 1.1x the policy, no growth", 1.10),
    "checksum": ("xxh3 < 10% of the transfer time", 0.10),
}


def compute_ratios(throughput: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size, entry in throughput.items():
        rb = entry.get("redisbus", {})
        if "error" in rb or not rb:
            continue
        ratios: dict[str, Any] = {}
        for name, peer in entry.items():
            if name == "redisbus" or "error" in peer:
                continue
            ratios[name] = {
                "publish": ratio(rb.get("publish_gbps"), peer.get("publish_gbps")),
                "pull": ratio(rb.get("pull_gbps"), peer.get("pull_gbps")),
                "roundtrip": ratio(rb.get("roundtrip_gbps"), peer.get("roundtrip_gbps")),
            }
        out[size] = ratios
    return out


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target: measured figures, pass/miss (None when not measured)."""
    rows: list[dict[str, Any]] = []
    ratios = results.get("ratios", {})

    def add(key: str, values: dict[str, float | None], passed: bool | None, note: str = "") -> None:
        rows.append({"target": key, "what": TARGETS[key][0], "values": values, "pass": passed, "note": note})

    for key, peer, field_, higher in (("pull", "raw", "pull", True), ("publish", "raw", "publish", True),
                                      ("naive", "naive", "roundtrip", True), ("tensordict", "tensordict", "roundtrip", True)):  # fmt: skip
        values = {human(int(size)): r.get(peer, {}).get(field_) for size, r in ratios.items()}
        got = [v for v in values.values() if v is not None]
        add(key, values, (min(got) >= TARGETS[key][1]) if got else None)
    lat = results.get("latency", {})
    wanted = results["args"]["subscribers"]
    imm = {k.split("/")[0]: v for k, v in lat.items() if v.get("mode") == "immediate" and v["subscribers"] == wanted}
    for key, field_ in (("latency_p50", "p50_ms"), ("latency_p99", "p99_ms")):
        values = {f"{k} MLP": v.get(field_) for k, v in imm.items()}
        got = [v for v in values.values() if v is not None]
        add(key, values, (max(got) <= TARGETS[key][1]) if got else None, f"apply=immediate, {wanted} subscribers")
    fan = results.get("fanout", {})
    if fan.get("raw_gbps") and fan.get("redisbus_gbps"):
        r = fan["redisbus_gbps"] / fan["raw_gbps"]
        add("fanout", {f"{fan['workers']} x {human(fan['policy_bytes'])}": r}, r >= TARGETS["fanout"][1])
    else:
        add("fanout", {}, None)
    mem = results.get("memory", {})
    if "worker" in mem and "publisher" in mem:
        values = {role: mem[role]["peak_ratio"] for role in ("worker", "publisher")}
        growth = max(abs(mem[role]["growth_bytes"] or 0) for role in ("worker", "publisher"))
        ok = max(values.values()) <= TARGETS["memory"][1] and growth <= 0.02 * mem["policy_bytes"] + 4 * MiB
        add("memory", values, ok, f"largest growth {human(growth)} over {mem['versions']} versions")
    else:
        add("memory", {}, None)
    cs = results.get("checksum", {})
    if cs:
        values = {"added to a pull": cs["added_fraction"],
                  **{f"alone vs {k[3:]}": v["fraction"] for k, v in cs.items() if k.startswith("vs_")}}  # fmt: skip
        add("checksum", values, cs["added_fraction"] < TARGETS["checksum"][1],
            f"{human(cs['bytes'])}; pass/miss on the time added to a pull (hashing overlaps the transfer)")  # fmt: skip
    else:
        add("checksum", {}, None)
    return rows


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render(results: dict[str, Any]) -> str:
    lines: list[str] = []
    m = results["machine"]
    lines.append(f"redisbus benchmark ({time.strftime('%Y-%m-%d %H:%M', time.localtime(results['started']))})")
    lines.append(f"machine: {m.get('cpu', '?')}, {m.get('cpus')} cores, {m.get('memory_gib', '?')} GiB, {m.get('platform')}")
    lines.append(f"software: Python {m.get('python')}, torch {m.get('torch')}, tensordict {m.get('tensordict', '-')}, "
                 f"torchrl {m.get('torchrl', '-')}, redisbus {m.get('redisbus')}, Redis {results.get('redis_version')} "
                 f"({results.get('server')})")  # fmt: skip
    lines.append(f"load average before/after: {' '.join(m.get('loadavg', []))} / {' '.join(results.get('loadavg_after', []))}")
    lines.append(f"command: {results['command']}")
    tp = results.get("throughput", {})
    if tp:
        lines.append("")
        lines.append(f"Throughput: GB/s (10^9 B/s), median of {results['args']['repeats']} interleaved rounds; "
                     "ratio = redisbus / contender")  # fmt: skip
        head = f"{'size':<8} {'contender':<50} {'publish':>8} {'pull':>8} {'round trip':>10}   {'redisbus: publish':>17} {'pull':>7} {'round trip':>10}"
        lines.append(head)
        lines.append("-" * len(head))
        for size, entry in tp.items():
            first = True
            ratios = results.get("ratios", {}).get(size, {})
            for name in CONTENDERS:
                if name not in entry:
                    continue
                e = entry[name]
                tag = human(int(size)) if first else ""
                first = False
                if "error" in e:
                    lines.append(f"{tag:<8} {CONTENDERS[name].label:<50} could not run: {e['error'][:60]}")
                    continue
                r = ratios.get(name, {})
                lines.append(
                    f"{tag:<8} {e['label']:<50} {fmt(e['publish_gbps']):>8} {fmt(e['pull_gbps']):>8} {fmt(e['roundtrip_gbps']):>10}   "
                    + (f"{_x(r.get('publish')):>17} {_x(r.get('pull')):>7} {_x(r.get('roundtrip')):>10}" if name != "redisbus" else "")
                )  # fmt: skip
            rb = entry.get("redisbus", {})
            raw = entry.get("raw", {})
            if rb.get("blocked_ms") is not None:
                nb = rb["bytes"]
                lines.append(f"{'':<8} {'redisbus publish(block=False): caller blocked':<50} {rb['blocked_ms']:8.1f} ms "
                             f"({fmt(gbps(nb, rb['blocked_ms'] / 1e3))} GB/s snapshot); upload+commit done after "
                             f"{rb['breakdown_ms'].get('async_total', 0):.0f} ms")  # fmt: skip
            if raw.get("breakdown_ms", {}).get("set_same_keys"):
                nb = raw["bytes"]
                lines.append(f"{'':<8} {'raw SET over the same keys (no new Redis memory)':<50} "
                             f"{fmt(gbps(nb, raw['breakdown_ms']['set_same_keys'] / 1e3)):>8}")  # fmt: skip
            if rb.get("breakdown_ms"):
                parts = ", ".join(f"{k} {v:.0f}" for k, v in rb["breakdown_ms"].items() if k != "async_total")
                lines.append(f"{'':<8} redisbus breakdown (ms, medians): {parts}")
    lat = results.get("latency", {})
    if lat:
        lines.append("")
        any_ = next(iter(lat.values()))
        lines.append(f"Small-policy latency: start of publish() -> applied in a subscriber process, {any_['publishes']} "
                     "publishes (ms; p50/p99 over every worker and version; 'all' = the last worker of each version)")  # fmt: skip
        lines.append("CPU ms per version: the publisher process, Redis, each subscriber (mean), and all of them "
                     f"together over the machine's {os.cpu_count()} cores (the wall time they need at the least)")  # fmt: skip
        head = (f"{'policy':<20} {'apply':<10} {'subs':>4} {'p50':>6} {'p99':>6} {'max':>6}   {'all p50':>7} {'all p99':>7}"
                f"   {'publish()':>9}   {'CPU: pub':>8} {'redis':>6} {'sub':>5} {'/cores':>6}")  # fmt: skip
        lines.append(head)
        lines.append("-" * len(head))
        for key, e in lat.items():
            kind, mode, subs = key.split("/")
            cpu = e.get("cpu_ms_per_version") or {}
            parts = [cpu.get("publisher"), cpu.get("redis"), cpu.get("subscriber_mean")]
            per_core = None if None in parts else (parts[0] + parts[1] + parts[2] * int(subs)) / (os.cpu_count() or 1)
            lines.append(f"{kind + ' MLP (' + human(e['policy_bytes']) + ')':<20} {mode:<10} {subs:>4} {fmt(e['p50_ms']):>6} "
                         f"{fmt(e['p99_ms']):>6} {fmt(e['max_ms']):>6}   {fmt(e['all_applied_p50_ms']):>7} "
                         f"{fmt(e['all_applied_p99_ms']):>7}   {fmt(e['publish_call_p50_ms']):>9}   "
                         f"{fmt(parts[0]):>8} {fmt(parts[1]):>6} {fmt(parts[2]):>5} {fmt(per_core):>6}"
                         + (f"   ({e['missed']} missed)" if e["missed"] else ""))  # fmt: skip
    fan = results.get("fanout", {})
    if fan:
        lines.append("")
        lines.append(f"Fan-out: {fan['workers']} processes pulling one {human(fan['policy_bytes'])} policy at once "
                     f"(aggregate GB/s, median of {fan['rounds']} rounds)")  # fmt: skip
        lines.append(f"  redisbus workers (sync: pull + verify + apply) {fmt(fan.get('redisbus_gbps')):>6}")
        lines.append(f"  raw-socket GET clients                         {fmt(fan.get('raw_gbps')):>6}")
        lines.append(f"  ratio                                          {_x(ratio(fan.get('redisbus_gbps'), fan.get('raw_gbps'))):>6}")
    cl = results.get("cluster")
    if cl:
        lines.append("")
        lines.append("Redis Cluster fan-out (redisbus workers, aggregate GB/s)")
        for key, e in cl.items():
            if isinstance(e, dict) and "error" in e:
                lines.append(f"  {key:<20} could not run: {e['error'][:80]}")
            elif isinstance(e, dict):
                lines.append(f"  {key:<20} {e['workers']} workers x {human(e['policy_bytes'])}: {fmt(e.get('redisbus_gbps'))}")
    mem = results.get("memory", {})
    if mem:
        lines.append("")
        if "error" in mem:
            lines.append(f"Memory: not measured ({mem['error']})")
        else:
            lines.append(f"Memory: extra resident memory over {mem['versions']} versions of a {human(mem['policy_bytes'])} policy")
            for role in ("worker", "publisher"):
                if role in mem:
                    e = mem[role]
                    lines.append(f"  {role:<10} peak {human(e['peak_extra_bytes']):>10} ({e['peak_ratio']:.2f}x the policy), "
                                 f"growth after the first versions {e['growth_bytes'] / MiB:+.1f} MiB")  # fmt: skip
    cs = results.get("checksum", {})
    if cs:
        lines.append("")
        parts = ", ".join(f"{v['fraction'] * 100:.1f}% of a {k[3:]} ({v['transfer_s']:.2f} s)" for k, v in cs.items() if k.startswith("vs_"))
        lines.append(f"Checksum: xxh3 over {human(cs['bytes'])} takes {cs['xxh3_s'] * 1e3:.0f} ms ({cs['xxh3_gbps']:.1f} GB/s) on its own"
                     + (f" = {parts}" if parts else ""))  # fmt: skip
        lines.append(f"  added to a pull (each chunk checked as it lands): {cs['pull_with_verify_s'] * 1e3:.0f} ms with vs "
                     f"{cs['pull_without_verify_s'] * 1e3:.0f} ms without = {cs['added_fraction'] * 100:+.1f}%")  # fmt: skip
    rows = results.get("targets", [])
    if rows:
        lines.append("")
        lines.append("Targets (issue 5)")
        for row in rows:
            mark = {True: "pass", False: "MISS", None: "n/a "}[row["pass"]]
            vals = ", ".join(f"{k} {v:.2f}" for k, v in row["values"].items() if v is not None) or "not measured"
            lines.append(f"  [{mark}] {row['what']:<46} {vals}" + (f"  ({row['note']})" if row["note"] else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench.py",
        description="redisbus side by side with the raw RESP ceiling, naive torch.save + redis-py, "
        "tensordict's TensorDictStore and TorchRL's same-host schemes.",
    )
    p.add_argument("--url", help="use this Redis instead of starting one (never flushed: the run's own keys, all "
                                 "named with a per-run id, are deleted at the end)")
    p.add_argument("--json", metavar="FILE", help="write every figure (and raw samples) to FILE")
    p.add_argument("--quick", action="store_true", help="small subset, under a minute")
    p.add_argument("--sizes", help="policy sizes for the throughput table, e.g. 256M,1G (default 256M,1G; quick 16M)")
    p.add_argument("--repeats", type=int, help="interleaved rounds per size (default 7; quick 3)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"subset of {','.join(CONTENDERS)}")
    p.add_argument("--torchrl-max-size", default="256M",
                   help="largest policy the TorchRL same-host schemes run at (each needs a worker process holding "
                        "a copy; default 256M)")  # fmt: skip
    p.add_argument("--subscribers", type=int, default=8, help="subscriber processes in the latency test (default 8)")
    p.add_argument("--publishes", type=int, help="measured publishes per latency run (default 200; quick 30)")
    p.add_argument("--fanout-size", help="policy size of the fan-out test (default 64M; quick 16M)")
    p.add_argument("--fanout-workers", type=int, default=8, help="processes per side in the fan-out test (default 8)")
    p.add_argument("--fanout-rounds", type=int, help="fan-out rounds (default 5; quick 2)")
    p.add_argument("--memory-size", help="policy size of the memory test (default 256M; quick 16M)")
    p.add_argument("--memory-versions", type=int, help="versions in the memory test (default 100; quick 10)")
    p.add_argument("--checksum-size", help="bytes hashed in the checksum test (default 1G; quick 64M)")
    p.add_argument("--only", help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--cluster", action="store_true", help="also the fan-out against a local 3-master Redis Cluster")
    p.add_argument("--redis-server", help="redis-server binary for the private server (default /usr/bin/redis-server)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the private server and every worker process are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    q = args.quick
    sizes = [parse_size(s) for s in (args.sizes or ("16M" if q else "256M,1G")).split(",") if s.strip()]
    repeats = args.repeats or (3 if q else 7)
    publishes = args.publishes or (30 if q else 200)
    fan_size = parse_size(args.fanout_size or ("16M" if q else "64M"))
    fan_rounds = args.fanout_rounds or (2 if q else 5)
    mem_size = parse_size(args.memory_size or ("16M" if q else "256M"))
    mem_versions = args.memory_versions or (10 if q else 100)
    cs_size = parse_size(args.checksum_size or ("64M" if q else "1G"))
    sections = [s.strip() for s in (args.only or ",".join(SECTIONS)).split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if unknown or set(contenders) - set(CONTENDERS):
        build_parser().error(f"unknown section or contender: {sorted(unknown | (set(contenders) - set(CONTENDERS)))}")
    results: dict[str, Any] = {
        "command": " ".join(["scripts/bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "started": time.time(),
        "machine": machine(),
        "args": {"sizes": sizes, "repeats": repeats, "publishes": publishes, "subscribers": args.subscribers,
                 "fanout_size": fan_size, "fanout_workers": args.fanout_workers, "fanout_rounds": fan_rounds,
                 "memory_size": mem_size, "memory_versions": mem_versions, "checksum_size": cs_size,
                 "sections": sections, "contenders": contenders, "quick": q},  # fmt: skip
    }
    with contextlib.ExitStack() as stack:
        if args.url:
            url = args.url
            results["server"] = "given by --url"
        else:
            url = stack.enter_context(redis_server(find_redis_server(args.redis_server)))
            results["server"] = f"private redis-server on {url.split('//')[1].split('/')[0]}, persistence off"
        probe = BusConfig.from_url(url).client()
        results["redis_version"] = server_version(probe)
        probe.close()
        mp_context()
        if "throughput" in sections:
            results["throughput"] = run_throughput(url, sizes, repeats, contenders, parse_size(args.torchrl_max_size),
                                                   owned=not args.url)  # fmt: skip
            results["ratios"] = compute_ratios(results["throughput"])
        if "latency" in sections:
            configs = [(kind, mode, args.subscribers) for kind in ("100K", "1M") for mode in ("immediate", "on_sync")]
            configs.append(("100K", "immediate", 1))  # the floor: one worker, nothing to share the CPU with
            results["latency"] = run_latency(url, configs, publishes)
        if "fanout" in sections:
            results["fanout"] = run_fanout(url, fan_size, args.fanout_workers, fan_rounds)
        if args.cluster:
            results["cluster"] = run_cluster(args.fanout_workers, fan_size, fan_rounds, url)
        if "memory" in sections:
            results["memory"] = run_memory(url, mem_size, mem_versions)
        if "checksum" in sections:
            transfer: dict[str, float | None] = {}
            tp = results.get("throughput", {})
            if tp:
                largest = tp[str(max(int(k) for k in tp))]
                transfer["raw GET"] = largest.get("raw", {}).get("pull_gbps")
                transfer["redisbus pull"] = largest.get("redisbus", {}).get("pull_gbps")
            results["checksum"] = run_checksum(url, cs_size, transfer)
        if args.url:
            with contextlib.suppress(Exception):
                cleaner = BusConfig.from_url(url).client()
                clear(cleaner, owned=False)
                cleaner.close()
    results["loadavg_after"] = machine().get("loadavg", [])
    results["targets"] = evaluate(results)
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
