"""Real local Redis Clusters and primary/replica sets, for tests and benchmarks.

Plain Python first (no pytest needed), so ``scripts/bench.py`` can use it too::

    import sys; sys.path.insert(0, "tests")
    from cluster_fixtures import local_cluster, local_replica_set

    with local_cluster(masters=3) as cluster:          # 3 masters, no replicas
        url = cluster.url                              # redis://127.0.0.1:PORT/0?cluster=true
        ...
    with local_replica_set(replicas=1) as rs:          # one primary + one --replicaof replica
        rs.primary.url, rs.replicas[0].url

Then the pytest fixtures (load with ``pytest_plugins = ["cluster_fixtures"]``
in a test module): ``redis_cluster`` (module-scoped 3 masters + 3 replicas,
flushed before each test through ``cluster``), ``cluster`` (that cluster,
flushed), ``cluster_factory`` (fresh clusters torn down after the test, e.g.
for a failover), ``replica_set`` (a primary and a replica, per test).

Every server runs ``/usr/bin/redis-server`` (or ``$REDISBUS_TEST_REDIS_SERVER``;
sharded pub/sub needs Redis 7) on ``127.0.0.1``, persistence off, in its own
temporary directory, on a free port whose cluster bus port (+10000) is free
too. Port 6379 is never used.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import redis
from redis.cluster import ClusterNode, RedisCluster

HOST = "127.0.0.1"
FORBIDDEN_PORT = 6379

__all__ = [
    "LocalCluster",
    "LocalReplicaSet",
    "RedisNode",
    "find_binary",
    "local_cluster",
    "local_replica_set",
]


def find_binary(name: str) -> str:
    """Path of ``redis-server`` / ``redis-cli``: ``$REDISBUS_TEST_REDIS_SERVER``'s directory, /usr/bin, else PATH."""
    env = os.environ.get("REDISBUS_TEST_REDIS_SERVER")
    candidates = []
    if env:
        candidates.append(str(Path(env).with_name(name)) if name != "redis-server" else env)
    candidates += [f"/usr/bin/{name}", f"/usr/local/bin/{name}"]
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found (set REDISBUS_TEST_REDIS_SERVER)")
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    """First port of the kernel's range for outgoing connections (32768 when unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def pick_cluster_port(taken: set[int] | None = None) -> int:
    """A free loopback port whose cluster bus port (port + 10000) is free too, both below the kernel's
    ephemeral range: a port found free there can be taken by any outgoing connection before the node binds it."""
    taken = taken or set()
    high = max(10001, min(55000, _ephemeral_low() - 10001))
    for _ in range(1000):
        port = random.randint(10000, high)
        if port in taken or port == FORBIDDEN_PORT or port + 10000 in taken:
            continue
        if _port_free(port) and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair found")


class RedisNode:
    """One ``redis-server`` process (cluster node, primary or replica)."""

    def __init__(self, binary: str, port: int, extra_args: Sequence[str] = (), root: Path | None = None) -> None:
        self.binary = binary
        self.host = HOST
        self.port = port
        self.extra_args = list(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix=f"rb-node-{port}-", dir=root))
        self.process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (this node alone, not the cluster)."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        return [
            self.binary, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 15.0) -> RedisNode:
        """Start the server and wait until it answers PING."""
        if self.running:
            return self
        self.process = subprocess.Popen(
            self.command(), cwd=self.dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited: {self.log()[-2000:]}")
            try:
                with self.client(socket_timeout=1) as c:
                    if c.ping():
                        return self
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not answer: {self.log()[-2000:]}")
            time.sleep(0.02)

    def client(self, **kwargs: object) -> redis.Redis:
        """A plain ``redis.Redis`` to this node only (bytes replies)."""
        return redis.Redis(host=self.host, port=self.port, **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def info(self, section: str) -> dict:
        with self.client(socket_timeout=2) as c:
            return c.info(section)

    def pause(self) -> None:
        """SIGSTOP: the node stops answering but keeps its sockets (a hung peer)."""
        if self.running:
            os.kill(self.process.pid, signal.SIGSTOP)  # type: ignore[union-attr]
            self._paused = True

    def resume(self) -> None:
        """SIGCONT a paused node."""
        if self._paused and self.running:
            os.kill(self.process.pid, signal.SIGCONT)  # type: ignore[union-attr]
        self._paused = False

    def kill(self) -> None:
        """SIGKILL (a crash)."""
        self._paused = False
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def close(self) -> None:
        """Kill the server and remove its directory."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<RedisNode {self.address} running={self.running}>"


def _wait(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}" + (f" (last error: {last})" if last else ""))


class LocalCluster:
    """A real Redis Cluster on loopback: ``masters`` masters, ``replicas`` replicas per master.

    Built with ``redis-cli --cluster create ... --cluster-yes``; ready when every
    node reports ``cluster_state:ok``, knows every node, and every replica's link
    to its master is up. ``node_timeout_ms`` is the failure-detection time
    (short, so a failover takes about two seconds).

    Attributes: ``nodes`` (all :class:`RedisNode`), ``url``
    (``redis://127.0.0.1:PORT/0?cluster=true``, the redisbus spelling),
    ``startup_nodes`` (``host:port`` strings).
    """

    def __init__(self, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 1000,
                 binary: str | None = None, extra_args: Sequence[str] = ()) -> None:  # fmt: skip
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.masters = masters
        self.replicas_per_master = replicas
        self.node_timeout_ms = node_timeout_ms
        self.binary = binary or find_binary("redis-server")
        self.cli = str(Path(self.binary).with_name("redis-cli"))
        if not os.access(self.cli, os.X_OK):
            self.cli = find_binary("redis-cli")
        self.extra_args = list(extra_args)
        self.root = Path(tempfile.mkdtemp(prefix="rb-cluster-"))
        self.nodes: list[RedisNode] = []

    # -- lifecycle
    def start(self, timeout: float = 30.0) -> LocalCluster:
        taken: set[int] = set()
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms), "--repl-diskless-sync-delay", "0",
                *self.extra_args]  # fmt: skip
        try:
            for _ in range(self.masters * (1 + self.replicas_per_master)):
                port = pick_cluster_port(taken)
                taken |= {port, port + 10000}
                self.nodes.append(RedisNode(self.binary, port, args, root=self.root).start())
            create = [self.cli, "--cluster", "create", *(n.address for n in self.nodes),
                      "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]  # fmt: skip
            result = subprocess.run(create, capture_output=True, text=True, timeout=timeout)
            if result.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
            self.wait_ready(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every running node sees ``cluster_state:ok``, all nodes, and linked replicas."""
        running = [n for n in self.nodes if n.running]

        def ready() -> bool:
            for node in running:
                with node.client(socket_timeout=2) as c:
                    info = c.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    if "cluster_state:ok" not in text:
                        return False
                    if f"cluster_known_nodes:{len(self.nodes)}" not in text:
                        return False
                    repl = c.info("replication")
                    if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                        return False
            masters = [n for n in running if n.info("replication").get("role") == "master"]
            return len(masters) == self.masters

        _wait(ready, timeout, "the cluster to be ready")

    def close(self) -> None:
        """Kill every node and remove all directories."""
        for node in self.nodes:
            node.close()
        shutil.rmtree(self.root, ignore_errors=True)

    stop = close

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- addresses and clients
    @property
    def startup_nodes(self) -> list[str]:
        return [n.address for n in self.nodes if n.running]

    @property
    def url(self) -> str:
        """redisbus URL of the cluster (seed: the first running node)."""
        return f"redis://{self.startup_nodes[0]}/0?cluster=true"

    def client(self, **kwargs: object) -> RedisCluster:
        """A ``redis.cluster.RedisCluster`` to this cluster (bytes replies); close it yourself."""
        nodes = [ClusterNode(n.host, n.port) for n in self.nodes if n.running]
        return RedisCluster(startup_nodes=nodes, **kwargs)  # type: ignore[arg-type]

    def master_nodes(self) -> list[RedisNode]:
        """Running nodes whose role is master."""
        return [n for n in self.nodes if n.running and n.info("replication").get("role") == "master"]

    def replicas_of(self, master: RedisNode) -> list[RedisNode]:
        """Running replicas whose master is ``master``."""
        out = []
        for n in self.nodes:
            if n is master or not n.running:
                continue
            repl = n.info("replication")
            if repl.get("role") == "slave" and int(repl.get("master_port", 0)) == master.port:
                out.append(n)
        return out

    def node_holding(self, key: str | bytes) -> RedisNode:
        """The running master that owns ``key``'s slot (asked with CLUSTER KEYSLOT / CLUSTER SLOTS)."""
        any_node = self.master_nodes()[0]
        with any_node.client(socket_timeout=2) as c:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(master[1])
                    port_node = {n.port: n for n in self.nodes}
                    return port_node[port]
        raise LookupError(f"no master owns the slot of {key!r}")

    def flushall(self) -> None:
        """FLUSHALL on every master (replicas follow)."""
        for node in self.master_nodes():
            with node.client(socket_timeout=5) as c:
                c.flushall()

    def wait_synced(self, timeout: float = 10.0) -> None:
        """Wait until every replica has caught up with its master's replication offset."""
        def synced() -> bool:
            for master in self.master_nodes():
                offset = master.info("replication").get("master_repl_offset", 0)
                for replica in self.replicas_of(master):
                    if replica.info("replication").get("slave_repl_offset", -1) < offset:
                        return False
            return True

        _wait(synced, timeout, "replicas to catch up")

    def kill_master_with_replica(self, key: str | None = None) -> RedisNode:
        """SIGKILL a master that has a replica (the one owning ``key`` if given), and return it."""
        candidates = [self.node_holding(key)] if key is not None else self.master_nodes()
        for master in candidates:
            if self.replicas_of(master):
                self.wait_synced()
                master.kill()
                return master
        raise LookupError("no master with a replica")

    def wait_failover(self, dead: RedisNode, timeout: float = 20.0) -> None:
        """Wait until a replica of ``dead`` was promoted and the cluster is ok again."""
        survivors = [n for n in self.nodes if n.running]

        def recovered() -> bool:
            for node in survivors:
                with node.client(socket_timeout=2) as c:
                    text = c.execute_command("CLUSTER", "INFO")
                    text = text.decode() if isinstance(text, bytes) else str(text)
                    if "cluster_state:ok" not in text:
                        return False
            return len(self.master_nodes()) == self.masters

        _wait(recovered, timeout, f"a failover of {dead.address}", interval=0.1)


@contextlib.contextmanager
def local_cluster(masters: int = 3, replicas: int = 0, **kwargs: object) -> Iterator[LocalCluster]:
    """Start a :class:`LocalCluster`, yield it, and stop it."""
    cluster = LocalCluster(masters, replicas, **kwargs).start()  # type: ignore[arg-type]
    try:
        yield cluster
    finally:
        cluster.close()


class LocalReplicaSet:
    """A primary and ``replicas`` replicas (``--replicaof``) on loopback.

    Attributes: ``primary`` and ``replicas`` (:class:`RedisNode`), ``url``
    (the primary's), ``replica_addresses`` (``host:port`` strings).
    """

    def __init__(self, replicas: int = 1, binary: str | None = None) -> None:
        self.binary = binary or find_binary("redis-server")
        self.root = Path(tempfile.mkdtemp(prefix="rb-replset-"))
        self.count = replicas
        self.primary: RedisNode | None = None
        self.replicas: list[RedisNode] = []

    def start(self, timeout: float = 15.0) -> LocalReplicaSet:
        try:
            taken: set[int] = set()
            port = pick_cluster_port(taken)
            taken.add(port)
            self.primary = RedisNode(self.binary, port, ["--repl-diskless-sync-delay", "0"], root=self.root).start()
            for _ in range(self.count):
                port = pick_cluster_port(taken)
                taken.add(port)
                node = RedisNode(self.binary, port, ["--replicaof", HOST, str(self.primary.port)], root=self.root)
                self.replicas.append(node.start())
            self.wait_linked(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_linked(self, timeout: float = 15.0) -> None:
        """Wait until every running replica's link to the primary is up."""
        _wait(lambda: all(r.info("replication").get("master_link_status") == "up"
                          for r in self.replicas if r.running), timeout, "replicas to link")  # fmt: skip

    @property
    def url(self) -> str:
        assert self.primary is not None
        return self.primary.url

    @property
    def replica_addresses(self) -> list[str]:
        return [r.address for r in self.replicas]

    def close(self) -> None:
        for node in [*self.replicas, *([self.primary] if self.primary else [])]:
            node.close()
        shutil.rmtree(self.root, ignore_errors=True)

    stop = close

    def __enter__(self) -> LocalReplicaSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def local_replica_set(replicas: int = 1, **kwargs: object) -> Iterator[LocalReplicaSet]:
    """Start a :class:`LocalReplicaSet`, yield it, and stop it."""
    rs = LocalReplicaSet(replicas, **kwargs).start()  # type: ignore[arg-type]
    try:
        yield rs
    finally:
        rs.close()


# --------------------------------------------------------------------------- pytest fixtures

try:
    import pytest
except ImportError:  # pragma: no cover - plain use from scripts
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    def _skip_without_binary() -> str:
        try:
            binary = find_binary("redis-server")
            find_binary("redis-cli")
        except FileNotFoundError as exc:
            pytest.skip(str(exc))
        return binary

    @pytest.fixture(scope="module")
    def redis_cluster() -> Iterator[LocalCluster]:
        """A 3-master, 3-replica cluster shared by a test module (use ``cluster`` to get it flushed)."""
        binary = _skip_without_binary()
        with local_cluster(masters=3, replicas=1, binary=binary) as c:
            yield c

    @pytest.fixture
    def cluster(redis_cluster: LocalCluster) -> LocalCluster:
        """The module's cluster, flushed before the test."""
        redis_cluster.flushall()
        return redis_cluster

    @pytest.fixture
    def cluster_factory() -> Iterator:
        """``make(masters=3, replicas=0) -> LocalCluster``; every cluster made is closed after the test."""
        binary = _skip_without_binary()
        made: list[LocalCluster] = []

        def make(masters: int = 3, replicas: int = 0, **kwargs: object) -> LocalCluster:
            c = LocalCluster(masters, replicas, binary=binary, **kwargs).start()  # type: ignore[arg-type]
            made.append(c)
            return c

        yield make
        for c in made:
            c.close()

    @pytest.fixture
    def replica_set() -> Iterator[LocalReplicaSet]:
        """A primary and one replica (``--replicaof``), fresh per test."""
        binary = _skip_without_binary()
        with local_replica_set(replicas=1, binary=binary) as rs:
            yield rs
